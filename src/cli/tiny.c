/* m3 tiny DIR [--seed N] [--layers PLAN] [--dtype bf16|f32|mxfp8] [--hidden N ...] [--vocab N]
 * [--no-mtp] [--no-vision] [--threads N]: writes a tiny checkpoint, or a larger one of the same
 * layout with the size flags. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/commands.h"
#include "cli/model_args.h"
#include "io/tiny.h"

static void tiny_usage(FILE *f) {
  fprintf(f,
          "usage: m3 tiny DIR [--seed N] [--layers PLAN] [--dtype bf16|f32|mxfp8]\n"
          "  writes config.json, model.safetensors and tokenizer.json of a small random model\n"
          "  in the official MiniMax-M3 layout into DIR (created if missing)\n"
          "  --seed N       weights seed, 0..2^64-1 (default 1); same seed, same bytes\n"
          "  --layers PLAN  comma-separated layers, each F|S (full/sparse attention) then\n"
          "                 D|M (dense MLP/MoE) (default " M3_TINY_DEFAULT_LAYERS ")\n"
          "  --dtype T      bf16 (default), f32, or mxfp8 (quantized linears + e8m0 scales)\n"
          "  sizes (default: the tiny ones):\n"
          "  --hidden N --heads N --kv-heads N --head-dim N --rotary-dim N\n"
          "  --experts N --experts-per-token N --expert-width N --shared-width N --dense-width N\n"
          "  --index-dim N --block-size N --topk-blocks N\n"
          "  --vocab N      vocab_size, from the tokenizer's size (the default) to 262144; the\n"
          "                 tokenizer stays the small built-in one\n"
          "  --no-mtp       no MTP module\n"
          "  --no-vision    the text-only layout (MiniMaxM3SparseForCausalLM, no vision tower)\n"
          "  --threads N    generating threads (default one per core; same bytes for any N)\n");
}

/* The size flag `flag` names, or NULL. */
static int *size_option(m3_tiny_options *o, const char *flag) {
  const struct {
    const char *flag;
    int *value;
  } sizes[] = {
      {"--hidden", &o->hidden},
      {"--heads", &o->heads},
      {"--kv-heads", &o->kv_heads},
      {"--head-dim", &o->head_dim},
      {"--rotary-dim", &o->rotary_dim},
      {"--experts", &o->experts},
      {"--experts-per-token", &o->experts_per_token},
      {"--expert-width", &o->expert_width},
      {"--shared-width", &o->shared_width},
      {"--dense-width", &o->dense_width},
      {"--index-dim", &o->index_dim},
      {"--block-size", &o->block_size},
      {"--topk-blocks", &o->topk_blocks},
  };
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
    if (strcmp(flag, sizes[i].flag) == 0) return sizes[i].value;
  return NULL;
}

static m3_status parse_seed(const char *s, uint64_t *out) {
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (!*s || *end || errno || s[0] == '-') return m3_fail(M3_ERR_ARG, "--seed '%s': not an integer in 0..2^64-1", s);
  *out = (uint64_t)v;
  return M3_OK;
}

static m3_status parse_dtype(const char *s, m3_tiny_dtype *out) {
  if (strcmp(s, "bf16") == 0) *out = M3_TINY_BF16;
  else if (strcmp(s, "f32") == 0) *out = M3_TINY_F32;
  else if (strcmp(s, "mxfp8") == 0) *out = M3_TINY_MXFP8;
  else return m3_fail(M3_ERR_ARG, "--dtype '%s': expected bf16, f32 or mxfp8", s);
  return M3_OK;
}

int m3_cmd_tiny(int argc, char **argv) {
  m3_tiny_options opt = m3_tiny_default_options();
  const char *dir = NULL;
  m3_status st = M3_OK;
  for (int i = 1; i < argc && st == M3_OK; i++) {
    const char *a = argv[i];
    if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
      tiny_usage(stdout);
      return 0;
    }
    int *size = size_option(&opt, a);
    int takes_value = size || strcmp(a, "--seed") == 0 || strcmp(a, "--layers") == 0 ||
                      strcmp(a, "--dtype") == 0 || strcmp(a, "--vocab") == 0 ||
                      strcmp(a, "--threads") == 0;
    long v;
    if (takes_value && i + 1 >= argc) {
      st = m3_fail(M3_ERR_ARG, "%s needs a value", a);
    } else if (size) {
      st = m3_cli_parse_long(a, argv[++i], 1, 65536, &v);
      *size = (int)v;
    } else if (strcmp(a, "--vocab") == 0) {
      st = m3_cli_parse_long(a, argv[++i], 1, M3_TINY_VOCAB_MAX, &v);
      opt.vocab = (int)v;
    } else if (strcmp(a, "--threads") == 0) {
      st = m3_cli_parse_long(a, argv[++i], 1, 256, &v);
      opt.threads = (int)v;
    } else if (strcmp(a, "--no-mtp") == 0) {
      opt.no_mtp = 1;
    } else if (strcmp(a, "--no-vision") == 0) {
      opt.no_vision = 1;
    } else if (strcmp(a, "--seed") == 0) {
      st = parse_seed(argv[++i], &opt.seed);
    } else if (strcmp(a, "--layers") == 0) {
      opt.layers = argv[++i];
    } else if (strcmp(a, "--dtype") == 0) {
      st = parse_dtype(argv[++i], &opt.dtype);
    } else if (a[0] == '-') {
      st = m3_fail(M3_ERR_ARG, "unknown option '%s' (see m3 tiny --help)", a);
    } else if (dir) {
      st = m3_fail(M3_ERR_ARG, "one folder expected, got '%s' and '%s'", dir, a);
    } else {
      dir = a;
    }
  }
  if (st == M3_OK && !dir) st = m3_fail(M3_ERR_ARG, "missing DIR (usage: m3 tiny DIR [options])");
  if (st == M3_OK) st = m3_tiny_write(dir, &opt);
  if (st != M3_OK) return m3_cli_fail("tiny", st);
  printf("wrote %s/{config.json, model.safetensors, tokenizer.json}\n", dir);
  return 0;
}
