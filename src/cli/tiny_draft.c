/* m3 tiny-draft DIR [--model TARGET] [--seed N]: a tiny random EAGLE3 draft for a target. */
#include <stdio.h>
#include <string.h>

#include "cli/commands.h"
#include "cli/model_args.h"
#include "io/config.h"
#include "io/tiny.h"
#include "io/tiny_draft.h"

static const char usage[] =
    "usage: m3 tiny-draft DIR [--model TARGET] [--seed N]\n"
    "  writes config.json and model.safetensors of a small random EAGLE3 draft (one Llama\n"
    "  layer over three auxiliary states, half-size draft vocabulary with d2t) for the target\n"
    "  TARGET (default: the built-in tiny model) into DIR; same seed (default 1), same bytes.\n";

int m3_cmd_tiny_draft(int argc, char **argv) {
  const char *dir = NULL, *model = NULL;
  long seed = 1;
  m3_status st = M3_OK;
  for (int i = 1; i < argc && st == M3_OK; i++) {
    if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      fputs(usage, stdout);
      return 0;
    }
    if (argv[i][0] != '-') {
      dir = argv[i];
      continue;
    }
    if (i + 1 >= argc) {
      st = m3_fail(M3_ERR_ARG, "%s: missing value (see --help)", argv[i]);
    } else if (strcmp(argv[i], "--model") == 0) {
      model = argv[++i];
    } else if (strcmp(argv[i], "--seed") == 0) {
      st = m3_cli_parse_long(argv[i], argv[i + 1], 0, 0x7fffffffL, &seed);
      i++;
    } else {
      st = m3_fail(M3_ERR_ARG, "unknown option '%s' (see --help)", argv[i]);
    }
  }
  if (st == M3_OK && !dir) st = m3_fail(M3_ERR_ARG, "give the output folder DIR (see --help)");
  char target[4096], path[4096 + 16];
  if (st == M3_OK && !model && (st = m3_builtin_model_dir(target, sizeof target)) == M3_OK)
    model = target;
  m3_config cfg = {0};
  if (st == M3_OK) {
    snprintf(path, sizeof path, "%s/config.json", model);
    st = m3_config_load(path, &cfg);
  }
  if (st == M3_OK) st = m3_tiny_eagle3_write(dir, &cfg, (uint64_t)seed);
  m3_config_free(&cfg);
  return st == M3_OK ? 0 : m3_cli_fail("tiny-draft", st);
}
