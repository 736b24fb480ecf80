/* The fp8 KV cache through the engine's cache and runner:
 *   - the budget: page bytes by hand for the full model's attention shape (fp8 rows are hd bytes
 *     plus a 4-byte scale against 4 * hd bytes), and one budget holds that many times the pages;
 *   - copy-on-write of an fp8 page: forked sequences that then diverge each keep the shared rows
 *     (scales included, which live in the page) and their own new row;
 *   - a backend without kv_fp8 refuses the cache by name; --kv-dtype values; the engine option
 *     (m3_engine_options.kv_dtype) refuses a bad value and reports the dtype it uses;
 *   - every committed text fixture (tests/fixtures/text), prefill and 7-token chunks: the drift of
 *     the logits with the fp8 cache from those with the float32 cache, relative L2 per position,
 *     worst and median printed. The fixtures are tiny random models (head dims 8 and 16), in
 *     which E4M3's 3-bit mantissa (about 2.4% RMS error per K and V value) reaches the logits
 *     almost undamped: the median position drifts 3-5% and a position whose MSA selection flips
 *     or whose logits are small drifts far more, so a per-position bound of 3e-2 does not hold
 *     here. What is asserted is what a defect would break (a lost scale, wrong rows, a wrong
 *     page): median drift <= MEDIAN_MAX, every drift finite, the argmax kept on >= ARGMAX_MIN
 *     of the positions. That the ops compute exactly on the dequantized values is
 *     test_cpu_kv_fp8's check. */
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
#include "compare.h"
#include "engine/runner.h"
#include "m3.h"
#include "media/media.h"

/* Measured on the fixtures: median 0.031-0.049, argmax kept on 88-93% of positions. */
static const double MEDIAN_MAX = 0.08, ARGMAX_MIN = 0.85;

static m3_config attention_config(int layers, int nkv, int hd, int ihd, int bs, uint8_t *attn) {
  m3_config c = {0};
  c.num_layers = layers, c.num_kv_heads = nkv, c.head_dim = hd, c.index_head_dim = ihd;
  c.index_block_size = bs;
  for (int l = 0; l < layers; l++) attn[l] = l % 2 ? M3_ATTN_SPARSE : M3_ATTN_FULL;
  c.layer_attn = attn;
  return c;
}

/* Two layers (one sparse) of the full model's shape: 4 KV heads of 128, index dim 128, 128-token
 * pages. f32: 2 x (K + V) of 4*128*128*4 bytes + 128*128*4 of IK. fp8: rows of 128 bytes + a
 * 4-byte scale (multiples of 16 already, no padding). */
static void test_budget(m3_backend *be) {
  uint8_t attn[2];
  m3_config cfg = attention_config(2, 4, 128, 128, 128, attn);
  const size_t f32 = 2 * 2 * (4 * 128 * 128 * 4) + 128 * 128 * 4;
  const size_t fp8 = 2 * 2 * (4 * 128 * (128 + 4)) + 128 * (128 + 4);
  CHECK_EQ_INT(m3_kv_page_bytes(&cfg, M3_KV_F32), f32);
  CHECK_EQ_INT(m3_kv_page_bytes(&cfg, M3_KV_FP8), fp8);
  CHECK_EQ_INT(m3_kv_bytes_for_tokens(&cfg, M3_KV_FP8, 129), 2 * fp8);
  const size_t budget = 8 * f32;
  m3_kv_cache *a = NULL, *b = NULL;
  CHECK_OK(m3_kv_cache_create(&cfg, be, M3_KV_F32, budget, &a));
  CHECK_OK(m3_kv_cache_create(&cfg, be, M3_KV_FP8, budget, &b));
  if (a && b) {
    double ratio = (double)m3_kv_cache_num_pages(b) / m3_kv_cache_num_pages(a);
    printf("budget of %zu bytes: %d f32 pages, %d fp8 pages (%.2fx)\n", budget,
           m3_kv_cache_num_pages(a), m3_kv_cache_num_pages(b), ratio);
    CHECK_EQ_INT(m3_kv_cache_num_pages(a), 8);
    CHECK_EQ_INT(m3_kv_cache_num_pages(b), (int)(budget / fp8));
    CHECK(ratio >= 3.8);
    CHECK(m3_kv_cache_dtype(b) == M3_KV_FP8);
  }
  m3_kv_cache_free(a);
  m3_kv_cache_free(b);
  /* Odd shapes pad each page to 16 bytes: 2 heads x 4 tokens of 5 -> 8 * 9 = 72 -> 80;
   * IK 4 tokens of 3 -> 28 -> 32. */
  m3_config odd = attention_config(2, 2, 5, 3, 4, attn);
  CHECK_EQ_INT(m3_kv_page_bytes(&odd, M3_KV_FP8), 2 * 2 * 80 + 32);
}

static void test_dtype_names(m3_backend *be) {
  m3_kv_dtype dt = M3_KV_FP8;
  CHECK_OK(m3_kv_dtype_parse("--kv-dtype", "f32", &dt));
  CHECK(dt == M3_KV_F32);
  CHECK_OK(m3_kv_dtype_parse("--kv-dtype", "fp8", &dt));
  CHECK(dt == M3_KV_FP8);
  CHECK_FAILS_WITH(m3_kv_dtype_parse("--kv-dtype", "e4m3", &dt), M3_ERR_ARG, "--kv-dtype 'e4m3'");
  CHECK_STR(m3_kv_dtype_name(M3_KV_FP8), "fp8");
  /* The CPU backend's table with kv_fp8 off stands for a backend without fp8 kernels. */
  m3_backend_ops ops = *be->ops;
  ops.kv_fp8 = 0;
  ops.name = "nofp8";
  m3_backend other = {&ops};
  uint8_t attn[2];
  m3_config cfg = attention_config(2, 2, 8, 8, 4, attn);
  m3_kv_cache *c = NULL;
  CHECK_FAILS_WITH(m3_kv_cache_create(&cfg, &other, M3_KV_FP8, 1 << 20, &c), M3_ERR_UNSUPPORTED,
                   "--kv-dtype fp8: not supported on the nofp8 backend");
  CHECK(c == NULL);
  CHECK_FAILS_WITH(m3_kv_dtype_check(&other, M3_KV_FP8), M3_ERR_UNSUPPORTED, "nofp8");
  CHECK_OK(m3_kv_dtype_check(&other, M3_KV_F32));
}

/* The built-in model opened with kv_dtype fp8 and f32 in the same KV budget. */
static void test_engine_option(void) {
  setenv("M3_CACHE", "m3_cache", 1); /* the built-in model under the test's working folder */
  m3_engine_options o;
  m3_engine_options_init(&o);
  o.threads = 1;
  o.kv_memory_bytes = 1 << 20;
  o.kv_dtype = "e5m2";
  m3_engine *e = NULL;
  CHECK_FAILS_WITH(m3_engine_open(&o, &e), M3_ERR_ARG, "kv_dtype 'e5m2'");
  int pages[2] = {0, 0};
  const char *names[2] = {"f32", "fp8"};
  for (int i = 0; i < 2; i++) {
    o.kv_dtype = names[i];
    CHECK_OK(m3_engine_open(&o, &e));
    if (!e) continue;
    m3_model_info info;
    m3_engine_model_info(e, &info);
    CHECK_STR(info.kv_dtype, names[i]);
    pages[i] = info.kv_pages_total;
    m3_engine_close(e);
    e = NULL;
  }
  printf("built-in model, 1 MiB of KV: %d pages f32, %d fp8\n", pages[0], pages[1]);
  CHECK(pages[1] >= 3 * pages[0] && pages[0] > 0);
}

/* Row r of page p of an fp8 pool of `rows` x `dim` per page: its scale and bytes (the layout of
 * backend.h, by hand). */
static size_t fp8_page(int rows, int dim) { return ((size_t)rows * (4 + dim) + 15) / 16 * 16; }
static float row_scale(const void *pool, int p, int rows, int dim, int r) {
  float s;
  memcpy(&s, (const uint8_t *)pool + p * fp8_page(rows, dim) + (size_t)r * 4, 4);
  return s;
}
static const uint8_t *row_bytes(const void *pool, int p, int rows, int dim, int r) {
  return (const uint8_t *)pool + p * fp8_page(rows, dim) + (size_t)rows * 4 + (size_t)r * dim;
}

/* Token t's K, V and IK rows: distinct values per token and head, so every row has its own
 * scale. k, v [nkv, hd], ik [ihd] */
static void token_rows(int t, int nkv, int hd, int ihd, float *k, float *v, float *ik) {
  for (int i = 0; i < nkv * hd; i++) {
    k[i] = (float)(t + 1) * 0.1f * (float)((i % 7) - 3);
    v[i] = (float)(t + 2) * 0.03f * (float)((i % 5) + 1);
  }
  for (int i = 0; i < ihd; i++) ik[i] = (float)(t + 3) * 0.02f * (float)(i - 1);
}

/* Token t's rows at position `pos` of every layer. */
static void store_token(m3_backend *be, const m3_kv_cache *c, const m3_kv_seq *s, int layers,
                        int32_t pos, int t, int nkv, int hd, int ihd) {
  float k[64], v[64], ik[16];
  token_rows(t, nkv, hd, ihd, k, v, ik);
  for (int l = 0; l < layers; l++) {
    m3_kv_view view;
    m3_kv_seq_view(c, s, l, &view);
    be->ops->kv_store(be, &view, &pos, 1, k, v, view.ik ? ik : NULL);
  }
}

/* Whether slot `slot` of page `page` holds token t's rows in every pool of layer l: the scale is
 * amax / 448 of the row (K's rotated; checked exactly) and the bytes equal those of a reference page. */
static int slot_holds(const m3_kv_view *v, int page, int slot, int t, const m3_kv_view *ref,
                      int ref_page) {
  float k[64], vv[64], ik[16];
  token_rows(t, v->nkv, v->hd, v->ihd, k, vv, ik);
  for (int h = 0; h < v->nkv; h++) m3_kv_rotate_key(k + h * v->hd, v->hd); /* as K is stored */
  const int rows = v->nkv * v->block_size;
  int ok = 1;
  for (int h = 0; h < v->nkv; h++) {
    int r = h * v->block_size + slot;
    float amax_k = 0, amax_v = 0;
    for (int d = 0; d < v->hd; d++) {
      amax_k = fmaxf(amax_k, fabsf(k[h * v->hd + d]));
      amax_v = fmaxf(amax_v, fabsf(vv[h * v->hd + d]));
    }
    ok &= row_scale(v->k, page, rows, v->hd, r) == amax_k / 448.0f;
    ok &= row_scale(v->v, page, rows, v->hd, r) == amax_v / 448.0f;
    ok &= memcmp(row_bytes(v->k, page, rows, v->hd, r), row_bytes(ref->k, ref_page, rows, v->hd, r),
                 (size_t)v->hd) == 0;
    ok &= memcmp(row_bytes(v->v, page, rows, v->hd, r), row_bytes(ref->v, ref_page, rows, v->hd, r),
                 (size_t)v->hd) == 0;
  }
  if (v->ik) {
    float amax = 0;
    for (int d = 0; d < v->ihd; d++) amax = fmaxf(amax, fabsf(ik[d]));
    ok &= row_scale(v->ik, page, v->block_size, v->ihd, slot) == amax / 448.0f;
    ok &= memcmp(row_bytes(v->ik, page, v->block_size, v->ihd, slot),
                 row_bytes(ref->ik, ref_page, v->block_size, v->ihd, slot), (size_t)v->ihd) == 0;
  }
  return ok;
}

/* a holds 6 tokens (pages of 4: the second page half full); b forks it; each then writes its
 * own token 6. a's write copies the shared page first; both must still hold tokens 4 and 5, and
 * each its own token 6. A third sequence that stored the same tokens privately is the reference
 * for the bytes. */
static void test_copy_on_write(m3_backend *be) {
  enum { LAYERS = 2, NKV = 2, HD = 8, IHD = 4, BS = 4 };
  uint8_t attn[LAYERS];
  m3_config cfg = attention_config(LAYERS, NKV, HD, IHD, BS, attn);
  m3_kv_cache *c = NULL;
  CHECK_OK(m3_kv_cache_create(&cfg, be, M3_KV_FP8, 16 * m3_kv_page_bytes(&cfg, M3_KV_FP8), &c));
  if (!c) return;
  m3_kv_seq a, b, ra, rb;
  m3_kv_seq_init(&a), m3_kv_seq_init(&b), m3_kv_seq_init(&ra), m3_kv_seq_init(&rb);
  CHECK_OK(m3_kv_seq_extend(c, &a, 6));
  for (int t = 0; t < 6; t++) store_token(be, c, &a, LAYERS, t, t, NKV, HD, IHD);
  CHECK_OK(m3_kv_seq_fork(c, &a, &b));
  int32_t shared = a.block_table[1];
  CHECK_EQ_INT(m3_kv_page_refcount(c, shared), 2);
  CHECK_OK(m3_kv_seq_extend(c, &a, 1));
  CHECK_OK(m3_kv_seq_extend(c, &b, 1));
  CHECK(a.block_table[1] != shared);   /* a copied */
  CHECK_EQ_INT(b.block_table[1], shared); /* b was then the only holder: wrote in place */
  store_token(be, c, &a, LAYERS, 6, 6, NKV, HD, IHD);
  store_token(be, c, &b, LAYERS, 6, 100, NKV, HD, IHD); /* b's token 6 differs */
  /* References: tokens 4, 5, 6 and 4, 5, 100 stored privately into fresh pages. */
  CHECK_OK(m3_kv_seq_extend(c, &ra, 7));
  CHECK_OK(m3_kv_seq_extend(c, &rb, 7));
  for (int t = 4; t < 7; t++) store_token(be, c, &ra, LAYERS, t, t, NKV, HD, IHD);
  for (int t = 4; t < 7; t++) store_token(be, c, &rb, LAYERS, t, t == 6 ? 100 : t, NKV, HD, IHD);
  int good = 0, checks = 0;
  for (int l = 0; l < LAYERS; l++) {
    m3_kv_view va, vb, vra, vrb;
    m3_kv_seq_view(c, &a, l, &va), m3_kv_seq_view(c, &b, l, &vb);
    m3_kv_seq_view(c, &ra, l, &vra), m3_kv_seq_view(c, &rb, l, &vrb);
    for (int slot = 0; slot < 3; slot++, checks += 2) {
      int t = 4 + slot;
      good += slot_holds(&va, a.block_table[1], slot, t, &vra, ra.block_table[1]);
      good += slot_holds(&vb, b.block_table[1], slot, t == 6 ? 100 : t, &vrb, rb.block_table[1]);
    }
  }
  CHECK_EQ_INT(good, checks);
  /* The check can fail: a's token 6 is not b's. */
  m3_kv_view va;
  m3_kv_seq_view(c, &a, 0, &va);
  CHECK(!slot_holds(&va, a.block_table[1], 2, 100, &va, a.block_table[1]));
  m3_kv_seq_release(c, &a), m3_kv_seq_release(c, &b);
  m3_kv_seq_release(c, &ra), m3_kv_seq_release(c, &rb);
  m3_kv_cache_free(c);
}

/* ---- the text fixtures ---- */

static float *run_logits(m3_model *model, m3_kv_dtype dt, const int32_t *ids, int n, int chunk) {
  const m3_config *cfg = m3_model_config(model);
  float *logits = malloc((size_t)n * cfg->vocab_size * sizeof(float));
  m3_runner *runner = NULL;
  m3_kv_seq seq;
  m3_kv_seq_init(&seq);
  CHECK_OK(m3_runner_create(model, dt, m3_kv_bytes_for_tokens(cfg, dt, n), &runner));
  m3_status st = runner ? m3_runner_feed(runner, &seq, ids, n, chunk, logits, NULL) : M3_ERR_ARG;
  CHECK_OK(st);
  if (runner) m3_kv_seq_release(m3_runner_cache(runner), &seq);
  m3_runner_free(runner);
  if (st != M3_OK) {
    free(logits);
    return NULL;
  }
  return logits;
}

static int by_value(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* Per position: |a - b| / |b| over the vocab; the worst, the median, argmax agreements. */
static void drift(const float *a, const float *b, int n, int V, double *worst, double *median,
                  int *same_argmax) {
  double *rel = malloc((size_t)n * sizeof *rel);
  *same_argmax = 0;
  for (int t = 0; t < n; t++) {
    const float *x = a + (size_t)t * V, *y = b + (size_t)t * V;
    int ax = 0, ay = 0;
    for (int i = 0; i < V; i++) {
      if (x[i] > x[ax]) ax = i;
      if (y[i] > y[ay]) ay = i;
    }
    rel[t] = rel_l2(x, y, (size_t)V);
    if (isnan(rel[t])) rel[t] = INFINITY;
    *same_argmax += ax == ay;
  }
  qsort(rel, (size_t)n, sizeof *rel, by_value);
  *worst = rel[n - 1];
  *median = rel[n / 2];
  free(rel);
}

static void fixture_case(m3_backend *be, const char *dir, const char *name) {
  char path[8192];
  snprintf(path, sizeof path, "%s/reference.json", dir);
  uint8_t *json = NULL;
  size_t len = 0;
  CHECK_OK(m3_read_file(path, (size_t)1 << 20, &json, &len));
  cJSON *ref = json ? cJSON_ParseWithLength((const char *)json, len) : NULL;
  free(json);
  CHECK(ref != NULL);
  if (!ref) return;
  const cJSON *jids = cJSON_GetObjectItemCaseSensitive(ref, "ids");
  int n = cJSON_GetArraySize(jids);
  int32_t *ids = malloc((size_t)n * sizeof *ids);
  for (int i = 0; i < n; i++) ids[i] = cJSON_GetArrayItem(jids, i)->valueint;
  cJSON_Delete(ref);
  m3_model *model = NULL;
  CHECK_OK(m3_model_load(dir, be, &model));
  static const int chunks[] = {0, 7};
  for (int c = 0; model && c < 2; c++) {
    const int V = m3_model_config(model)->vocab_size;
    float *want = run_logits(model, M3_KV_F32, ids, n, chunks[c]);
    float *got = run_logits(model, M3_KV_FP8, ids, n, chunks[c]);
    if (want && got) {
      double worst, median;
      int same;
      drift(got, want, n, V, &worst, &median, &same);
      printf("%-26s chunk %d: fp8 vs f32 cache: rel L2 worst %.3g median %.3g, argmax %d/%d\n",
             name, chunks[c], worst, median, same, n);
      CHECK(median <= MEDIAN_MAX);
      CHECK(isfinite(worst) && worst > 0); /* > 0: the fp8 cache did run */
      CHECK(same >= ARGMAX_MIN * n);
    }
    free(want);
    free(got);
  }
  m3_model_free(model);
  free(ids);
}

static void test_fixtures(m3_backend *be) { for_each_text_fixture(be, fixture_case); }

int main(void) {
  m3_backend *be = NULL;
  CHECK_OK(m3_backend_cpu_create(2, &be));
  if (!be) return check_summary();
  test_budget(be);
  test_dtype_names(be);
  test_copy_on_write(be);
  test_engine_option();
  test_fixtures(be);
  be->ops->destroy(be);
  return check_summary();
}
