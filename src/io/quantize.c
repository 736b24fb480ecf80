/* quantize.c: MXFP8 at load (see quantize.h). */
#include "io/quantize.h"

#include <stdlib.h>

#include "base/mxfp8.h"
#include "base/threadpool.h"

/* Rows a thread converts per claim: enough to amortize the claim, few enough to balance. */
enum { ROWS_PER_CHUNK = 16 };
/* Progress is reported every this many source bytes (and at the end), as the prefault does. */
#define PROGRESS_BYTES (64ull << 20)

static int64_t add_target(m3_tensor *t, m3_tensor **out, int64_t n) {
  if (!m3_tensor_present(t) || t->quant != M3_WQ_NONE) return n;
  if (out) out[n] = t;
  return n + 1;
}

static int64_t layer_targets(const m3_config *c, m3_layer_weights *l, int moe, m3_tensor **out,
                             int64_t n) {
  m3_tensor *dense[] = {&l->q_proj,      &l->k_proj,    &l->v_proj,    &l->o_proj,
                        &l->mlp_gate,    &l->mlp_up,    &l->mlp_down,  &l->shared_gate,
                        &l->shared_up,   &l->shared_down};
  for (size_t i = 0; i < sizeof dense / sizeof dense[0]; i++) n = add_target(dense[i], out, n);
  for (int e = 0; moe && l->expert_gate && e < c->num_experts; e++) {
    n = add_target(&l->expert_gate[e], out, n);
    n = add_target(&l->expert_up[e], out, n);
    n = add_target(&l->expert_down[e], out, n);
  }
  return n;
}

int64_t m3_weights_mxfp8_targets(const m3_config *cfg, m3_weights *w, m3_tensor **out) {
  int64_t n = 0;
  for (int i = 0; w->layers && i < cfg->num_layers; i++)
    n = layer_targets(cfg, &w->layers[i], cfg->layer_mlp[i] == M3_MLP_MOE, out, n);
  for (int i = 0; i < w->num_mtp; i++) n = layer_targets(cfg, &w->mtp[i].layer, 1, out, n);
  return n;
}

typedef struct {
  const m3_tensor *src;
  uint8_t *q, *scale; /* [rows, cols] E4M3, [rows, scale_cols] e8m0 */
  int64_t scale_cols;
  float *rows;        /* one row of cols floats per thread */
} convert_job;

static void convert_rows(void *ctx, int64_t begin, int64_t end, int worker) {
  const convert_job *j = ctx;
  const int64_t cols = j->src->cols;
  float *x = j->rows + (size_t)worker * (size_t)cols;
  for (int64_t r = begin; r < end; r++) {
    m3_tensor_row_f32(j->src, r, x);
    m3_mxfp8_quantize_row(x, cols, j->q + r * cols, j->scale + r * j->scale_cols);
  }
}

/* One tensor: E4M3 data and e8m0 scales in one buffer the weights own, then t points at it. */
static m3_status convert(m3_weights *w, m3_tensor *t, m3_threadpool *pool, float *rows) {
  const int64_t scale_cols = (t->cols + M3_MXFP8_BLOCK - 1) / M3_MXFP8_BLOCK;
  uint8_t *mem = malloc((size_t)(t->rows * (t->cols + scale_cols)) + 1);
  if (!mem)
    return m3_fail(M3_ERR_NOMEM, "--quantize mxfp8: tensor %s [%lld, %lld]", t->name,
                   (long long)t->rows, (long long)t->cols);
  convert_job j = {.src = t, .q = mem, .scale = mem + t->rows * t->cols, .scale_cols = scale_cols,
                   .rows = rows};
  m3_parallel_for(pool, t->rows, ROWS_PER_CHUNK, convert_rows, &j);
  m3_status st = m3_weights_adopt(w, mem, t->data);
  if (st != M3_OK) return st;
  t->data = j.q;
  t->dtype = M3_DT_F8_E4M3;
  t->quant = M3_WQ_MXFP8;
  t->scale = j.scale;
  t->scale_rows = t->rows;
  t->scale_cols = scale_cols;
  t->block_rows = 1;
  t->block_cols = M3_MXFP8_BLOCK;
  w->num_quantized++;
  return M3_OK;
}

m3_status m3_weights_quantize_mxfp8(const m3_config *cfg, m3_weights *w, int threads,
                                    void (*progress)(uint64_t done, uint64_t total, void *user),
                                    void *user) {
  const int64_t n = m3_weights_mxfp8_targets(cfg, w, NULL);
  m3_tensor **targets = malloc((size_t)(n ? n : 1) * sizeof *targets);
  if (!targets) return m3_fail(M3_ERR_NOMEM, "--quantize mxfp8: list of %lld tensors", (long long)n);
  m3_weights_mxfp8_targets(cfg, w, targets);
  uint64_t total = 0, done = 0, reported = 0;
  int64_t widest = 1;
  for (int64_t i = 0; i < n; i++) {
    total += (uint64_t)(targets[i]->rows * targets[i]->cols) * m3_dtype_size(targets[i]->dtype);
    if (targets[i]->cols > widest) widest = targets[i]->cols;
  }
  m3_threadpool *pool = NULL;
  float *rows = NULL;
  m3_status st = m3_threadpool_create(threads, &pool);
  if (st == M3_OK) {
    rows = malloc((size_t)m3_threadpool_size(pool) * (size_t)widest * sizeof *rows);
    if (!rows) st = m3_fail(M3_ERR_NOMEM, "--quantize mxfp8: row buffers");
  }
  for (int64_t i = 0; i < n && st == M3_OK; i++) {
    const uint64_t bytes = (uint64_t)(targets[i]->rows * targets[i]->cols) *
                           m3_dtype_size(targets[i]->dtype);
    st = convert(w, targets[i], pool, rows);
    done += bytes;
    if (progress && st == M3_OK && (done - reported >= PROGRESS_BYTES || done == total)) {
      progress(done, total, user);
      reported = done;
    }
  }
  free(rows);
  if (pool) m3_threadpool_destroy(pool);
  free(targets);
  return st;
}
