/* m3 bench accept: how well the drafters guess, on real text. Prompts are --prompt-tokens windows
 * of --file at evenly spaced offsets; each is generated greedily for --gen-tokens tokens, one
 * request at a time (single-stream speed is what speculation is for), first without speculation,
 * then with the checkpoint's MTP module and with the EAGLE3 draft (--draft) at k = 1..--max-draft
 * drafts per round. Prints per drafter and k the acceptance rate, the mean acceptance length
 * (tokens emitted per target forward: 1 + accepted / rounds) and tokens/s against the plain run,
 * and checks that every speculative output is token for token the plain one (exit 1 if not). */
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/bench.h"
#include "cli/commands.h"
#include "cli/model_args.h"
#include "m3.h"
#include "media/media.h"
#include "tok/tokenizer.h"

/* Texts larger than this are refused rather than read whole. */
#define MAX_TEXT_BYTES ((size_t)1 << 30)

static const char usage[] =
    "usage: m3 bench accept --file F [--model DIR] [--draft DIR] [--prompts N] [--prompt-tokens P]\n"
    "                       [--gen-tokens G] [--max-draft K] [--device D] [--threads N]\n"
    "  greedy generation of G tokens (default 128) after N (default 16) windows of P (default 64)\n"
    "  tokens of F, without speculation, then with MTP (when the checkpoint has it) and the EAGLE3\n"
    "  draft in --draft at k = 1..K (default 4): acceptance rate, mean acceptance length, tokens/s,\n"
    "  and whether the outputs are identical to the plain ones. Without --model: the default\n"
    "  model and, without --draft, its EAGLE3 draft.\n";

typedef struct {
  int32_t *tokens;
  int n, cap;
} output;

static void on_token(const m3_token_event *ev, void *user) {
  output *o = user;
  if (ev->token >= 0 && o->n < o->cap) o->tokens[o->n++] = ev->token;
}

typedef struct {
  const char *model, *device, *draft;
  int threads, prompts, prompt_tokens, gen_tokens, max_draft;
  const int32_t *ids; /* the file's tokens */
  int n_ids;
} accept_run;

/* Generates every prompt in turn on an engine opened with (kind, k); outputs [prompts][gen_tokens].
 * *missing is set when the engine has no such drafter (a checkpoint without MTP). */
static m3_status generate(const accept_run *a, const char *kind, int k, int32_t *outputs,
                          m3_engine_stats *stats, double *seconds, int *missing) {
  m3_engine_options o;
  m3_engine_options_init(&o);
  o.model_dir = a->model;
  o.device = a->device;
  o.threads = a->threads;
  o.max_running = 1;
  o.prefix_cache = 0;
  o.speculative = kind;
  o.draft_dir = kind && strcmp(kind, "eagle3") == 0 ? a->draft : NULL;
  o.num_draft = k;
  m3_engine *e = NULL;
  m3_status st = m3_engine_open(&o, &e);
  *missing = st == M3_ERR_MISSING && kind != NULL;
  if (st != M3_OK) return *missing ? M3_OK : st;
  m3_sampling_params p;
  m3_sampling_params_init(&p);
  p.temperature = 0.0f;
  p.max_tokens = a->gen_tokens;
  p.ignore_eos = 1;
  const double t0 = m3_bench_seconds();
  for (int i = 0; i < a->prompts && st == M3_OK; i++) {
    const int start = (int)((long long)i * (a->n_ids - a->prompt_tokens) / a->prompts);
    output out = {outputs + (size_t)i * a->gen_tokens, 0, a->gen_tokens};
    st = m3_submit(e, a->ids + start, a->prompt_tokens, &p, on_token, &out, NULL);
    for (int active = 1; st == M3_OK && active;) st = m3_engine_step(e, &active);
    if (st == M3_OK && out.n != a->gen_tokens)
      st = m3_fail(M3_ERR_LIMIT, "bench accept: prompt %d generated %d of %d tokens", i, out.n,
                   a->gen_tokens);
  }
  *seconds = m3_bench_seconds() - t0;
  m3_engine_stats_get(e, stats);
  m3_engine_close(e);
  return st;
}

/* Tokens of `path` with the model's tokenizer (special tokens spelled in the text stay text, as
 * m3_tokenize with special = 0 encodes them). */
static m3_status tokenize_file(const accept_run *a, const char *path, int32_t **ids, int *n) {
  char tok_path[4200];
  snprintf(tok_path, sizeof tok_path, "%s/tokenizer.json", a->model);
  uint8_t *text = NULL;
  size_t len = 0;
  m3_tokenizer *tok = NULL;
  m3_tok_ids out = {0};
  m3_status st = m3_read_file(path, MAX_TEXT_BYTES, &text, &len);
  if (st == M3_OK) st = m3_tok_load(tok_path, &tok);
  if (st == M3_OK) st = m3_tok_encode(tok, (const char *)text, len, false, &out);
  m3_tok_free(tok);
  free(text);
  if (st == M3_OK && out.len < (size_t)a->prompt_tokens + 1)
    st = m3_fail(M3_ERR_ARG, "--file %s: %zu tokens, fewer than --prompt-tokens %d + 1", path, out.len,
                 a->prompt_tokens);
  if (st != M3_OK) {
    m3_tok_ids_free(&out);
    return st;
  }
  *ids = out.data;
  *n = (int)out.len;
  return M3_OK;
}

/* The integer options: flag, range, field. */
static const struct {
  const char *flag;
  long min, max;
  size_t offset;
} numeric[] = {
    {"--threads", 0, 4096, offsetof(accept_run, threads)},
    {"--prompts", 1, 4096, offsetof(accept_run, prompts)},
    {"--prompt-tokens", 1, 1 << 20, offsetof(accept_run, prompt_tokens)},
    {"--gen-tokens", 1, 1 << 16, offsetof(accept_run, gen_tokens)},
    {"--max-draft", 1, 16, offsetof(accept_run, max_draft)},
};

static m3_status parse_option(const char *flag, const char *value, accept_run *a, const char **file) {
  if (strcmp(flag, "--model") == 0) a->model = value;
  else if (strcmp(flag, "--draft") == 0) a->draft = value;
  else if (strcmp(flag, "--file") == 0) *file = value;
  else if (strcmp(flag, "--device") == 0) a->device = value;
  else {
    for (size_t i = 0; i < sizeof numeric / sizeof numeric[0]; i++) {
      if (strcmp(flag, numeric[i].flag) != 0) continue;
      long v;
      m3_status st = m3_cli_parse_long(flag, value, numeric[i].min, numeric[i].max, &v);
      if (st == M3_OK) *(int *)((char *)a + numeric[i].offset) = (int)v;
      return st;
    }
    return m3_fail(M3_ERR_ARG, "unknown option '%s' (see --help)", flag);
  }
  return M3_OK;
}

static m3_status parse(int argc, char **argv, accept_run *a, const char **file) {
  for (int i = 1; i < argc; i += 2) {
    if (i + 1 >= argc) return m3_fail(M3_ERR_ARG, "%s: missing value (see --help)", argv[i]);
    m3_status st = parse_option(argv[i], argv[i + 1], a, file);
    if (st != M3_OK) return st;
  }
  return *file ? M3_OK : m3_fail(M3_ERR_ARG, "--file F is required (see --help)");
}

int m3_bench_accept(int argc, char **argv) {
  for (int i = 1; i < argc; i++)
    if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      fputs(usage, stdout);
      return 0;
    }
  accept_run a = {.prompts = 16, .prompt_tokens = 64, .gen_tokens = 128, .max_draft = 4};
  const char *file = NULL;
  m3_status st = parse(argc, argv, &a, &file);
  /* The default model, and with it its EAGLE3 draft unless --draft names another. */
  m3_cli_spec defaults = {.kind = "eagle3", .draft = a.draft};
  m3_cli_model_paths paths;
  if (st == M3_OK && (st = m3_cli_model_or_default(&a.model, &defaults, &paths)) == M3_OK)
    a.draft = defaults.draft;
  int32_t *ids = NULL;
  if (st == M3_OK) st = tokenize_file(&a, file, &ids, &a.n_ids);
  a.ids = ids;
  const size_t per_run = (size_t)a.prompts * (size_t)a.gen_tokens;
  int32_t *plain = st == M3_OK ? malloc(per_run * sizeof *plain) : NULL;
  int32_t *spec = st == M3_OK ? malloc(per_run * sizeof *spec) : NULL;
  if (st == M3_OK && (!plain || !spec)) st = m3_fail(M3_ERR_NOMEM, "bench accept: out of memory");
  m3_engine_stats stats;
  double plain_s = 0, s;
  int missing, differ_total = 0;
  if (st == M3_OK) st = generate(&a, NULL, 0, plain, &stats, &plain_s, &missing);
  if (st == M3_OK) {
    printf("%d prompts of %d tokens from %s, %d generated each, greedy, one at a time\n",
           a.prompts, a.prompt_tokens, file, a.gen_tokens);
    printf("%-8s %2s %10s %10s %9s %12s %10s %8s %s\n", "drafter", "k", "drafted", "accepted",
           "rate", "accept len", "tok/s", "speedup", "identical");
    printf("%-8s %2s %10s %10s %9s %12s %10.1f %8s %s\n", "none", "-", "-", "-", "-", "1.00",
           per_run / plain_s, "1.00x", "-");
  }
  const char *kinds[] = {"mtp", "eagle3"};
  for (int d = 0; d < 2 && st == M3_OK; d++) {
    if (d == 1 && !a.draft) break;
    for (int k = 1; k <= a.max_draft && st == M3_OK; k++) {
      if ((st = generate(&a, kinds[d], k, spec, &stats, &s, &missing)) != M3_OK) break;
      if (missing) {
        printf("%-8s    (the checkpoint has no MTP module)\n", kinds[d]);
        break;
      }
      int differ = 0;
      for (int i = 0; i < a.prompts; i++)
        differ += memcmp(plain + (size_t)i * a.gen_tokens, spec + (size_t)i * a.gen_tokens,
                         (size_t)a.gen_tokens * sizeof *plain) != 0;
      differ_total += differ;
      const double rounds = stats.spec_rounds ? (double)stats.spec_rounds : 1.0;
      printf("%-8s %2d %10llu %10llu %8.1f%% %12.2f %10.1f %7.2fx %s\n", kinds[d], k,
             (unsigned long long)stats.spec_draft_tokens,
             (unsigned long long)stats.spec_accepted_tokens,
             100.0 * (double)stats.spec_accepted_tokens /
                 (double)(stats.spec_draft_tokens ? stats.spec_draft_tokens : 1),
             1.0 + (double)stats.spec_accepted_tokens / rounds, per_run / s, plain_s / s,
             differ ? "NO" : "yes");
      if (differ) printf("         %d of %d outputs differ from the plain run\n", differ, a.prompts);
    }
  }
  free(ids);
  free(plain);
  free(spec);
  if (st != M3_OK) return m3_cli_fail("bench accept", st);
  if (differ_total) {
    fprintf(stderr, "m3 bench accept: speculative greedy outputs differ from plain greedy ones\n");
    return 1;
  }
  return 0;
}
