/* m3 bench spec: what speculative decoding costs on this machine, for one sequence after a
 * context of --context tokens: a decode step (one token), a verification of k drafts (k + 1
 * tokens in one forward) for k = 1..7 relative to it, and a drafter step (MTP and, with --draft,
 * EAGLE3): one chained row, and a catch-up of k + 1 rows after a verification. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/bench.h"
#include "cli/commands.h"
#include "cli/model_args.h"
#include "engine/kvcache.h"
#include "io/tiny.h"
#include "model/draft.h"
#include "model/model.h"

static const char usage[] =
    "usage: m3 bench spec [--model DIR] [--draft DIR] [--context N] [--repeat N] [--threads N]\n"
    "                     [--device cpu|cuda|cuda:N]\n"
    "  times, after a context of N tokens (default 256): one decode step; verifying k = 1..7\n"
    "  drafts (one forward of k + 1 tokens) as a multiple of it; the MTP drafter (when the\n"
    "  checkpoint has MTP modules) and the EAGLE3 draft in --draft: one chained step and a\n"
    "  catch-up of k + 1 rows. Median of --repeat runs (default 20).\n";

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int by_value(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

typedef struct {
  m3_model *model;
  m3_kv_cache *cache;
  m3_kv_seq seq;
  m3_kv_view *views;
  int32_t ids[16], pos[16];
  int context, repeat;
  m3_backend *be;
  void *probe; /* 4 bytes of backend memory */
} bench;

/* Waits for every op issued so far: a forward without logits returns before a device backend has
 * run it, and its time would fall into the next measurement. */
static m3_status wait_device(bench *b) {
  uint32_t sink;
  return b->be->ops->to_host(b->be, &sink, b->probe, sizeof sink);
}

/* Median seconds of a target forward of T tokens at positions context..context+T-1. */
static m3_status time_target(bench *b, int T, double *out) {
  double t[64];
  for (int r = 0; r < b->repeat; r++) {
    for (int i = 0; i < T; i++) b->pos[i] = b->context + i;
    double t0 = now_seconds();
    m3_status st = m3_model_forward(b->model, b->views, b->ids, b->pos, T, NULL, NULL);
    if (st == M3_OK) st = wait_device(b);
    t[r] = now_seconds() - t0;
    if (st != M3_OK) return st;
  }
  qsort(t, (size_t)b->repeat, sizeof t[0], by_value);
  *out = t[b->repeat / 2];
  return M3_OK;
}

/* The head is part of every step that samples: time it with logits. */
static m3_status time_target_logits(bench *b, int T, float *logits, double *out) {
  double t[64];
  for (int r = 0; r < b->repeat; r++) {
    for (int i = 0; i < T; i++) b->pos[i] = b->context + i;
    double t0 = now_seconds();
    m3_status st = m3_model_forward(b->model, b->views, b->ids, b->pos, T, logits, NULL);
    t[r] = now_seconds() - t0;
    if (st != M3_OK) return st;
  }
  qsort(t, (size_t)b->repeat, sizeof t[0], by_value);
  *out = t[b->repeat / 2];
  return M3_OK;
}

static m3_status time_drafter(bench *b, m3_drafter *d, const char *name, double decode) {
  const m3_config *dc = m3_drafter_cache_config(d);
  const int H = m3_drafter_hidden_size(d), W = m3_model_hidden_width(b->model);
  const int n = b->context + 16;
  m3_kv_cache *cache = NULL;
  m3_status st = m3_kv_cache_create(dc, m3_model_backend(b->model), M3_KV_F32,
                                    m3_kv_bytes_for_tokens(dc, M3_KV_F32, n), &cache);
  if (st != M3_OK) return st;
  m3_kv_seq seq;
  m3_kv_seq_init(&seq);
  m3_kv_view *views = calloc((size_t)dc->num_layers, sizeof *views);
  float *hidden = calloc((size_t)n * (size_t)(W > H ? W : H), sizeof *hidden);
  float *hout = calloc((size_t)n * (size_t)H, sizeof *hout);
  int32_t *ids = calloc((size_t)n, sizeof *ids), *pos = malloc((size_t)n * sizeof *pos);
  if (!views || !hidden || !hout || !ids || !pos) st = m3_fail(M3_ERR_NOMEM, "bench spec: buffers");
  if (st == M3_OK) st = m3_kv_seq_extend(cache, &seq, n);
  for (int i = 0; i < n; i++) {
    pos[i] = i;
    ids[i] = i % 200 + 10;
  }
  for (int i = 0; i < n * (W > H ? W : H); i++) hidden[i] = (float)((i * 37) % 101) / 101.0f - 0.5f;
  int32_t draft;
  if (st == M3_OK) {
    m3_kv_seq_views(cache, &seq, views);
    /* Warm the drafter cache over the context. */
    const m3_draft_seq warm = {views, ids, pos, b->context, hidden, hout, NULL, &draft};
    st = m3_drafter_forward(d, &warm, 1, 0);
  }
  printf("%s drafter (catch-up rows from the target, chained rows from itself):\n", name);
  for (int rows = 1; rows <= 8 && st == M3_OK; rows++) {
    double t[64];
    for (int r = 0; r < b->repeat && st == M3_OK; r++) {
      const m3_draft_seq q = {views, ids + b->context, pos + b->context, rows, hidden, hout, NULL, &draft};
      double t0 = now_seconds();
      st = m3_drafter_forward(d, &q, 1, rows == 1 ? 1 : 0);
      if (st == M3_OK) st = wait_device(b);
      t[r] = now_seconds() - t0;
    }
    qsort(t, (size_t)b->repeat, sizeof t[0], by_value);
    printf("  %s %d row%s: %8.3f ms  (%.2fx a decode step)\n", rows == 1 ? "chained " : "catch-up", rows,
           rows == 1 ? " " : "s", 1e3 * t[b->repeat / 2], t[b->repeat / 2] / decode);
  }
  free(views);
  free(hidden);
  free(hout);
  free(ids);
  free(pos);
  m3_kv_seq_release(cache, &seq);
  m3_kv_cache_free(cache);
  return st;
}

int m3_bench_spec(int argc, char **argv) {
  const char *model_dir = NULL, *draft_dir = NULL, *device = "cpu";
  long context = 256, repeat = 20, threads = 0;
  m3_status st = M3_OK;
  for (int i = 1; i < argc && st == M3_OK; i++) {
    if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      fputs(usage, stdout);
      return 0;
    }
    if (i + 1 >= argc) {
      st = m3_fail(M3_ERR_ARG, "%s: missing value (see --help)", argv[i]);
      break;
    }
    const char *flag = argv[i], *value = argv[++i];
    if (strcmp(flag, "--model") == 0) model_dir = value;
    else if (strcmp(flag, "--draft") == 0) draft_dir = value;
    else if (strcmp(flag, "--device") == 0) device = value;
    else if (strcmp(flag, "--context") == 0) st = m3_cli_parse_long(flag, value, 1, 1L << 20, &context);
    else if (strcmp(flag, "--repeat") == 0) st = m3_cli_parse_long(flag, value, 1, 64, &repeat);
    else if (strcmp(flag, "--threads") == 0) st = m3_cli_parse_long(flag, value, 0, 4096, &threads);
    else st = m3_fail(M3_ERR_ARG, "unknown option '%s' (see --help)", flag);
  }
  char dir[4096];
  if (st == M3_OK && !model_dir && (st = m3_builtin_model_dir(dir, sizeof dir)) == M3_OK) model_dir = dir;
  m3_backend *be = NULL;
  bench b = {.context = (int)context, .repeat = (int)repeat};
  float *logits = NULL;
  if (st == M3_OK) st = m3_cli_open_backend(device, (int)threads, &be);
  if (st == M3_OK) st = m3_model_load(model_dir, be, &b.model);
  b.be = be;
  if (st == M3_OK && !(b.probe = be->ops->alloc(be, 4))) st = m3_fail(M3_ERR_NOMEM, "bench spec: probe");
  if (st == M3_OK) {
    const m3_config *cfg = m3_model_config(b.model);
    st = m3_kv_cache_create(cfg, be, M3_KV_F32,
                            m3_kv_bytes_for_tokens(cfg, M3_KV_F32, b.context + 16), &b.cache);
    b.views = calloc((size_t)cfg->num_layers, sizeof *b.views);
    logits = be->ops->alloc_host(be, 8 * (size_t)cfg->vocab_size * sizeof *logits);
    if (st == M3_OK && (!b.views || !logits)) st = m3_fail(M3_ERR_NOMEM, "bench spec: buffers");
  }
  if (st == M3_OK) {
    m3_kv_seq_init(&b.seq);
    st = m3_kv_seq_extend(b.cache, &b.seq, b.context + 16);
  }
  int32_t *ctx = NULL;
  if (st == M3_OK && !(ctx = malloc((size_t)b.context * sizeof *ctx))) st = m3_fail(M3_ERR_NOMEM, "bench spec: context");
  if (st == M3_OK) {
    m3_kv_seq_views(b.cache, &b.seq, b.views);
    for (int i = 0; i < b.context; i++) ctx[i] = i % 200 + 10;
    for (int i = 0; i < 16; i++) b.ids[i] = i + 30;
    /* Fill the cache over the context, a step at a time. */
    int32_t pos[M3_MODEL_STEP_TOKENS];
    for (int t0 = 0; t0 < b.context && st == M3_OK; t0 += M3_MODEL_STEP_TOKENS) {
      int n = b.context - t0 < M3_MODEL_STEP_TOKENS ? b.context - t0 : M3_MODEL_STEP_TOKENS;
      for (int i = 0; i < n; i++) pos[i] = t0 + i;
      st = m3_model_forward(b.model, b.views, ctx + t0, pos, n, NULL, NULL);
    }
  }
  double decode = 0;
  if (st == M3_OK) st = time_target_logits(&b, 1, logits, &decode);
  if (st == M3_OK) {
    printf("context %d, %s: decode step (1 token + head) %.3f ms\n", b.context, device, 1e3 * decode);
    printf("verify k drafts (k + 1 tokens + head) relative to a decode step:\n");
  }
  for (int k = 1; k <= 7 && st == M3_OK; k++) {
    double t, body;
    st = time_target_logits(&b, k + 1, logits, &t);
    if (st == M3_OK) st = time_target(&b, k + 1, &body);
    if (st == M3_OK)
      printf("  k=%d: %8.3f ms  %.2fx  (without the head %.3f ms)\n", k, 1e3 * t, t / decode, 1e3 * body);
  }
  m3_drafter *d = NULL;
  if (st == M3_OK && m3_drafter_mtp_create(b.model, &d) == M3_OK) {
    const int *layers;
    int n;
    layers = m3_drafter_target_layers(d, &n);
    st = m3_model_set_hidden_layers(b.model, layers, n);
    if (st == M3_OK) st = time_drafter(&b, d, "MTP", decode);
    m3_drafter_free(d);
    d = NULL;
  }
  if (st == M3_OK && draft_dir && (st = m3_drafter_eagle3_load(draft_dir, b.model, &d)) == M3_OK) {
    const int *layers;
    int n;
    layers = m3_drafter_target_layers(d, &n);
    st = m3_model_set_hidden_layers(b.model, layers, n);
    if (st == M3_OK) st = time_drafter(&b, d, "EAGLE3", decode);
    m3_drafter_free(d);
  }
  free(ctx);
  if (logits) be->ops->free_host(be, logits);
  free(b.views);
  if (b.cache) {
    m3_kv_seq_release(b.cache, &b.seq);
    m3_kv_cache_free(b.cache);
  }
  m3_model_free(b.model);
  if (b.probe) be->ops->free(be, b.probe);
  if (be) be->ops->destroy(be);
  return st == M3_OK ? 0 : m3_cli_fail("bench spec", st);
}
