/* The CPU forward pass against transformers (tests/fixtures/text/<case>, written by
 * tools/make_text_fixtures.py): every position's logits within 1e-4 relative L2 with the same
 * argmax, and identical MSA block selections, whether the ids go in all at once, 7 at a time or
 * one by one through the KV cache. Then the built-in tiny model (bf16, its own sparse/MoE
 * layout): the three chunkings must agree with each other to 1e-5. */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "text_fixtures.h"
#include "engine/runner.h"
#include "io/tiny.h"

static const int CHUNKS[] = {0, 7, 1}; /* 0: as many as one model step takes */

static void *read_all(const char *path, size_t *bytes) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *buf = malloc((size_t)n + 1);
  if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
    free(buf);
    buf = NULL;
  }
  fclose(f);
  if (buf) buf[n] = '\0';
  *bytes = (size_t)n;
  return buf;
}

/* One run of the model over ids with a chunk size. */
typedef struct {
  float *logits;   /* [n, V] */
  int32_t *blocks; /* [n_sparse, n, G, topk] */
  size_t n_blocks;
} run_result;

static int run_model(m3_model *model, const int32_t *ids, int n, int chunk, run_result *r) {
  const m3_config *cfg = m3_model_config(model);
  r->n_blocks = (size_t)m3_model_num_sparse_layers(model) * n * cfg->index_num_heads *
                cfg->index_topk_blocks;
  r->logits = malloc((size_t)n * cfg->vocab_size * sizeof(float));
  r->blocks = malloc((r->n_blocks + 1) * sizeof(int32_t));
  m3_runner *runner = NULL;
  m3_kv_seq seq;
  m3_kv_seq_init(&seq);
  CHECK_OK(m3_runner_create(model, M3_KV_F32, m3_kv_bytes_for_tokens(cfg, M3_KV_F32, n),
                            &runner));
  if (!runner) return 0;
  m3_selection_capture cap = {r->blocks, n, 0};
  m3_status st = m3_runner_feed(runner, &seq, ids, n, chunk, r->logits, &cap);
  CHECK_OK(st);
  m3_kv_seq_release(m3_runner_cache(runner), &seq);
  m3_runner_free(runner);
  return st == M3_OK;
}

static void free_result(run_result *r) {
  free(r->logits);
  free(r->blocks);
}

/* max over positions of |a - b| / |b| (L2 over the vocab); counts argmax disagreements. */
static double max_rel_l2(const float *a, const float *b, int n, int V, int *argmax_diff) {
  double worst = 0;
  *argmax_diff = 0;
  for (int t = 0; t < n; t++) {
    const float *x = a + (size_t)t * V, *y = b + (size_t)t * V;
    double num = 0, den = 0;
    int ax = 0, ay = 0;
    for (int i = 0; i < V; i++) {
      num += ((double)x[i] - y[i]) * ((double)x[i] - y[i]);
      den += (double)y[i] * y[i];
      if (x[i] > x[ax]) ax = i;
      if (y[i] > y[ay]) ay = i;
    }
    double rel = sqrt(num) / (sqrt(den) > 0 ? sqrt(den) : 1);
    if (!(rel <= worst)) worst = rel; /* NaN sticks */
    *argmax_diff += ax != ay;
  }
  return worst;
}

static size_t count_diff(const int32_t *a, const int32_t *b, size_t n) {
  size_t d = 0;
  for (size_t i = 0; i < n; i++) d += a[i] != b[i];
  return d;
}

static int json_int(const cJSON *obj, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
  return cJSON_IsNumber(v) ? v->valueint : -1;
}

static void test_case(m3_backend *be, const char *dir, const char *name) {
  char path[8192];
  size_t bytes;
  snprintf(path, sizeof path, "%s/reference.json", dir);
  char *json = read_all(path, &bytes);
  CHECK(json != NULL);
  cJSON *ref = json ? cJSON_Parse(json) : NULL;
  free(json);
  CHECK(ref != NULL);
  if (!ref) return;
  const cJSON *jids = cJSON_GetObjectItemCaseSensitive(ref, "ids");
  const cJSON *jsparse = cJSON_GetObjectItemCaseSensitive(ref, "sparse_layers");
  int n = cJSON_GetArraySize(jids), V = json_int(ref, "vocab");
  int G = json_int(ref, "index_heads"), K = json_int(ref, "topk");
  int n_sparse = cJSON_GetArraySize(jsparse);
  int32_t *ids = malloc((size_t)n * sizeof *ids);
  for (int i = 0; i < n; i++) ids[i] = cJSON_GetArrayItem(jids, i)->valueint;
  cJSON_Delete(ref);

  snprintf(path, sizeof path, "%s/logits.f32", dir);
  float *want_logits = read_all(path, &bytes);
  CHECK(want_logits && bytes == (size_t)n * V * sizeof(float));
  snprintf(path, sizeof path, "%s/blocks.i32", dir);
  size_t want_blocks_bytes = 0;
  int32_t *want_blocks = read_all(path, &want_blocks_bytes);
  CHECK(want_blocks && want_blocks_bytes == (size_t)n_sparse * n * G * K * sizeof(int32_t));

  m3_model *model = NULL;
  CHECK_OK(m3_model_load(dir, be, &model));
  if (model && want_logits && want_blocks) {
    const m3_config *cfg = m3_model_config(model);
    CHECK_EQ_INT(cfg->vocab_size, V);
    CHECK_EQ_INT(m3_model_num_sparse_layers(model), n_sparse);
    CHECK_EQ_INT(cfg->index_num_heads, G);
    CHECK_EQ_INT(cfg->index_topk_blocks, K);
    for (size_t c = 0; c < sizeof CHUNKS / sizeof CHUNKS[0] && cfg->vocab_size == V; c++) {
      run_result r;
      if (!run_model(model, ids, n, CHUNKS[c], &r)) continue;
      int argmax_diff;
      double rel = max_rel_l2(r.logits, want_logits, n, V, &argmax_diff);
      size_t sel_diff = r.n_blocks * 4 == want_blocks_bytes
                            ? count_diff(r.blocks, want_blocks, r.n_blocks)
                            : (size_t)-1;
      printf("%-28s chunk %-3d max rel L2 %.3g, argmax mismatches %d, selection mismatches %zu\n",
             name, CHUNKS[c], rel, argmax_diff, sel_diff);
      CHECK(rel <= 1e-4);
      CHECK_EQ_INT(argmax_diff, 0);
      CHECK_EQ_INT(sel_diff, 0);
      free_result(&r);
    }
  }
  m3_model_free(model);
  free(ids);
  free(want_logits);
  free(want_blocks);
}

static void test_fixtures(m3_backend *be) { for_each_text_fixture(be, test_case); }

/* The built-in tiny model over 41 ids (10+ blocks of 4, topk 3: real selection): chunked and
 * token-by-token runs must reproduce the all-at-once run. */
static void test_tiny_chunks(m3_backend *be) {
  char dir[4096];
  setenv("M3_CACHE", "m3_cache", 1); /* generate it under the test's working folder, not $HOME */
  CHECK_OK(m3_builtin_model_dir(dir, sizeof dir));
  m3_model *model = NULL;
  CHECK_OK(m3_model_load(dir, be, &model));
  if (!model) return;
  const m3_config *cfg = m3_model_config(model);
  enum { N = 41 };
  int32_t ids[N];
  for (int i = 0; i < N; i++) ids[i] = (int32_t)((i * 7919 + 13) % cfg->vocab_size);
  run_result all;
  if (run_model(model, ids, N, 0, &all)) {
    for (size_t c = 1; c < sizeof CHUNKS / sizeof CHUNKS[0]; c++) {
      run_result r;
      if (!run_model(model, ids, N, CHUNKS[c], &r)) continue;
      int argmax_diff;
      double rel = max_rel_l2(r.logits, all.logits, N, cfg->vocab_size, &argmax_diff);
      size_t sel_diff = count_diff(r.blocks, all.blocks, all.n_blocks);
      printf("tiny                         chunk %-3d vs all: max rel L2 %.3g, selection "
             "mismatches %zu\n", CHUNKS[c], rel, sel_diff);
      CHECK(rel <= 1e-5);
      CHECK_EQ_INT(sel_diff, 0);
      free_result(&r);
    }
    /* The capture really holds selections: the last token sees 11 blocks, keeps topk. */
    const int K = cfg->index_topk_blocks, G = cfg->index_num_heads;
    const int32_t *last = all.blocks + (size_t)(N - 1) * G * K;
    CHECK(m3_model_num_sparse_layers(model) > 0);
    CHECK_EQ_INT(last[K - 1], (N - 1) / cfg->index_block_size);
    free_result(&all);
  }
  m3_model_free(model);
}

int main(void) {
  m3_backend *be = NULL;
  CHECK_OK(m3_backend_cpu_create(0, &be));
  if (!be) return check_summary();
  test_fixtures(be);
  test_tiny_chunks(be);
  be->ops->destroy(be);
  return check_summary();
}
