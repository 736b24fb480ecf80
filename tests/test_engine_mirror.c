/* The model and the KV cache on a backend whose memory is not host memory, without a GPU: the CPU
 * backend with its op table's device_memory set, so every host mirror and transfer the CUDA
 * backend needs (weights through prepare_tensor, ids and positions up, block tables kept in backend
 * memory, routing down and expert groups up, selections and logits down, the page copy on write
 * through the copy op) runs here. The same kernels then see the same numbers, so the results must
 * equal the plain CPU backend's bit for bit; a mirror left stale (an upload missed) shows as a
 * difference. The plain results themselves are checked against transformers by
 * test_engine_fixtures. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "mirror_backend.h"
#include "engine/kvcache.h"
#include "engine/runner.h"
#include "model/model.h"


static const char *fixture(const char *name, char *buf, size_t cap) {
  snprintf(buf, cap, "%s/tests/fixtures/text/%s", M3_SOURCE_DIR, name);
  return buf;
}

enum { N_IDS = 60 };

static void make_ids(int32_t *ids, int n, int vocab) {
  uint32_t s = 12345;
  for (int i = 0; i < n; i++) {
    s = s * 1664525u + 1013904223u;
    ids[i] = (int32_t)((s >> 8) % (uint32_t)(vocab - 2));
  }
}

typedef struct {
  float *logits;   /* [N_IDS, V] */
  int32_t *blocks; /* [n_sparse, N_IDS, G, K] */
  size_t n_logits, n_blocks;
} fed;

/* All N_IDS tokens through the runner, `chunk` at a time, every position's logits and selections. */
static int feed(const char *dir, int mirrored, int chunk, fed *r) {
  memset(r, 0, sizeof *r);
  m3_backend *be = open_backend(mirrored);
  m3_model *model = NULL;
  m3_runner *runner = NULL;
  m3_kv_seq seq;
  m3_kv_seq_init(&seq);
  int ok = 0;
  if (be) CHECK_OK(m3_model_load(dir, be, &model));
  if (model) {
    const m3_config *cfg = m3_model_config(model);
    int32_t ids[N_IDS];
    make_ids(ids, N_IDS, cfg->vocab_size);
    r->n_logits = (size_t)N_IDS * cfg->vocab_size;
    r->n_blocks = (size_t)m3_model_num_sparse_layers(model) * N_IDS * cfg->index_num_heads *
                  cfg->index_topk_blocks;
    r->logits = malloc(r->n_logits * sizeof *r->logits);
    r->blocks = malloc((r->n_blocks + 1) * sizeof *r->blocks);
    CHECK_OK(m3_runner_create(model, M3_KV_F32, m3_kv_bytes_for_tokens(cfg, M3_KV_F32, N_IDS),
                              &runner));
    m3_selection_capture cap = {r->blocks, N_IDS, 0};
    if (runner) {
      CHECK_OK(m3_runner_feed(runner, &seq, ids, N_IDS, chunk, r->logits, &cap));
      m3_kv_seq_release(m3_runner_cache(runner), &seq);
      ok = 1;
    }
  }
  m3_runner_free(runner);
  m3_model_free(model);
  if (be) be->ops->destroy(be);
  return ok;
}

static void test_feed(const char *name, int chunk) {
  char dir[4096];
  fed plain, mirrored;
  int a = feed(fixture(name, dir, sizeof dir), 0, chunk, &plain);
  int b = feed(dir, 1, chunk, &mirrored);
  CHECK(a && b);
  if (a && b) {
    CHECK(memcmp(plain.logits, mirrored.logits, plain.n_logits * sizeof(float)) == 0);
    CHECK(plain.n_blocks == mirrored.n_blocks &&
          memcmp(plain.blocks, mirrored.blocks, plain.n_blocks * sizeof(int32_t)) == 0);
  }
  free(plain.logits);
  free(plain.blocks);
  free(mirrored.logits);
  free(mirrored.blocks);
}

/* The views' tables (what the ops read) hold the sequence's pages. */
static void check_table(const m3_kv_cache *c, const m3_kv_seq *s, int mirrored) {
  m3_kv_view v;
  m3_kv_seq_view(c, s, 0, &v);
  CHECK_EQ_INT(v.num_blocks, s->num_blocks);
  CHECK(mirrored ? v.block_table != s->block_table : v.block_table == s->block_table);
  CHECK(s->num_blocks == 0 ||
        memcmp(v.block_table, s->block_table, (size_t)s->num_blocks * sizeof(int32_t)) == 0);
}

/* Two sequences forked from one prompt in one batched step: the fork's first write copies the
 * shared partial page (the copy op), the tables change under both, and only some rows want
 * logits (the gathered head). Writes [1 + 2, V] logits. */
static int fork_and_batch(const char *dir, int mirrored, float **out, size_t *n_out) {
  m3_backend *be = open_backend(mirrored);
  m3_model *model = NULL;
  m3_kv_cache *cache = NULL;
  int ok = 0;
  if (be) CHECK_OK(m3_model_load(dir, be, &model));
  if (model) {
    const m3_config *cfg = m3_model_config(model);
    const int L = cfg->num_layers, V = cfg->vocab_size;
    int32_t ids[N_IDS], pos[N_IDS];
    make_ids(ids, N_IDS, V);
    for (int i = 0; i < N_IDS; i++) pos[i] = i;
    CHECK_OK(m3_kv_cache_create(cfg, be, M3_KV_F32,
                                m3_kv_bytes_for_tokens(cfg, M3_KV_F32, 4 * N_IDS), &cache));
    m3_kv_view *views = calloc((size_t)2 * L, sizeof *views);
    *n_out = (size_t)3 * V;
    *out = malloc(*n_out * sizeof **out);
    m3_kv_seq a, b;
    m3_kv_seq_init(&a);
    m3_kv_seq_init(&b);
    if (cache && views && *out) {
      const int prompt = 22; /* not a whole number of pages: the last one is shared and partial */
      const int bs = m3_kv_cache_block_size(cache);
      CHECK(prompt % bs != 0);
      CHECK_OK(m3_kv_seq_extend(cache, &a, prompt));
      m3_kv_seq_views(cache, &a, views);
      CHECK_OK(m3_model_forward(model, views, ids, pos, prompt, NULL, NULL));
      CHECK_OK(m3_kv_seq_fork(cache, &a, &b));
      check_table(cache, &b, mirrored);
      CHECK_OK(m3_kv_seq_extend(cache, &a, 1));
      CHECK_OK(m3_kv_seq_extend(cache, &b, 3));
      check_table(cache, &a, mirrored);
      check_table(cache, &b, mirrored);
      CHECK(a.block_table[prompt / bs] != b.block_table[prompt / bs]); /* copied on write */
      m3_kv_seq_views(cache, &a, views);
      m3_kv_seq_views(cache, &b, views + L);
      const m3_model_seq batch[2] = {
          {.kv = views, .ids = ids + prompt, .pos = pos + prompt, .T = 1, .n_logits = 1},
          {.kv = views + L, .ids = ids + 40, .pos = pos + prompt, .T = 3, .n_logits = 2},
      };
      CHECK_OK(m3_model_forward_batch(model, batch, 2, *out));
      m3_kv_seq_truncate(cache, &b, 9);
      check_table(cache, &b, mirrored);
      ok = 1;
    }
    m3_kv_seq_release(cache, &a);
    m3_kv_seq_release(cache, &b);
    free(views);
  }
  m3_kv_cache_free(cache);
  m3_model_free(model);
  if (be) be->ops->destroy(be);
  return ok;
}

static void test_fork_batch(const char *name) {
  char dir[4096];
  float *plain = NULL, *mirrored = NULL;
  size_t n = 0, m = 0;
  int a = fork_and_batch(fixture(name, dir, sizeof dir), 0, &plain, &n);
  int b = fork_and_batch(dir, 1, &mirrored, &m);
  CHECK(a && b);
  if (a && b) CHECK(n == m && memcmp(plain, mirrored, n * sizeof(float)) == 0);
  free(plain);
  free(mirrored);
}

/* A prefix-cache hit hands a fresh sequence cached pages: its backend table must get them too. */
static void test_prefix_match(void) {
  char dir[4096];
  m3_backend *be = open_backend(1);
  m3_model *model = NULL;
  if (be) CHECK_OK(m3_model_load(fixture("long_sparse_gqa4_f32", dir, sizeof dir), be, &model));
  m3_kv_cache *cache = NULL;
  if (model) CHECK_OK(m3_kv_cache_create(m3_model_config(model), be, M3_KV_F32, 64u << 20, &cache));
  if (cache) {
    int32_t ids[N_IDS];
    make_ids(ids, N_IDS, 320);
    m3_kv_seq a, b;
    m3_kv_seq_init(&a);
    m3_kv_seq_init(&b);
    CHECK_OK(m3_kv_seq_extend(cache, &a, 40));
    m3_kv_seq_publish(cache, &a, ids, 40);
    CHECK_EQ_INT(m3_kv_seq_match_prefix(cache, &b, ids, 41), 40);
    check_table(cache, &b, 1);
    CHECK_OK(m3_kv_seq_extend(cache, &b, 30)); /* grows the table: a new backend copy */
    check_table(cache, &b, 1);
    m3_kv_seq_release(cache, &a);
    m3_kv_seq_release(cache, &b);
    CHECK(b.table_dev == NULL && b.block_table == NULL);
  }
  m3_kv_cache_free(cache);
  m3_model_free(model);
  if (be) be->ops->destroy(be);
}

int main(void) {
  /* Sparse attention + MoE; a tied lm_head; BF16 weights; all at once and in chunks of 7. */
  test_feed("long_sparse_gqa4_f32", 0);
  test_feed("long_sparse_gqa4_f32", 7);
  test_feed("gqa8_local2_tied_f32", 0);
  test_feed("mixed_bf16", 5);
  test_fork_batch("long_sparse_gqa4_f32");
  test_prefix_match();
  return check_summary();
}
