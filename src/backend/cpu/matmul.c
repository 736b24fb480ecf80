/* matmul.c: y = x . W^T for weights of any dtype, and the embedding lookup.
 *
 * T = 1 (decode) is a GEMV bound by memory bandwidth: threads split the rows and each weight row
 * streams through once. T > 1 decodes a tile of TILE_ROWS x CPU_K_CHUNK weights into a stack buffer
 * and applies it to every token, so decoding is paid once per tile rather than once per token. */
#include <math.h>
#include <string.h>

#include "backend/cpu/cpu_internal.h"

enum { TILE_ROWS = 32 };

/* Whether the SIMD kernels can decode w: they read 32 columns under one scale. */
static int simd_decodable(const m3_tensor *w) {
  switch (w->quant) {
    case M3_WQ_NONE:
      return w->dtype == M3_DT_F32 || w->dtype == M3_DT_BF16 || w->dtype == M3_DT_F16;
    case M3_WQ_MXFP8: return w->dtype == M3_DT_F8_E4M3;
    case M3_WQ_FP8_BLOCK:
      return w->dtype == M3_DT_F8_E4M3 && w->block_cols >= 32 &&
             (w->block_cols & (w->block_cols - 1)) == 0;
  }
  return 0;
}

typedef struct {
  const cpu_kernels *k;
  const m3_tensor *w;
  const float *x;
  int T;
  float *y;
} matmul_job;

static void gemv_rows(void *ctx, int64_t r0, int64_t r1, int worker) {
  (void)worker;
  const matmul_job *job = ctx;
  job->k->gemv(job->w, job->x, r0, r1, job->y + r0);
}

static void gemm_row_tiles(void *ctx, int64_t tile0, int64_t tile1, int worker) {
  (void)worker;
  const matmul_job *job = ctx;
  const m3_tensor *w = job->w;
  const int64_t K = w->cols, N = w->rows;
  float tile[TILE_ROWS * CPU_K_CHUNK];
  for (int64_t ti = tile0; ti < tile1; ti++) {
    int64_t r0 = ti * TILE_ROWS;
    int nr = N - r0 < TILE_ROWS ? (int)(N - r0) : TILE_ROWS;
    for (int t = 0; t < job->T; t++) memset(job->y + t * N + r0, 0, (size_t)nr * sizeof(float));
    for (int64_t k0 = 0; k0 < K; k0 += CPU_K_CHUNK) {
      int kc = K - k0 < CPU_K_CHUNK ? (int)(K - k0) : CPU_K_CHUNK;
      job->k->decode_tile(w, r0, nr, k0, kc, tile);
      job->k->tile_gemm(tile, nr, kc, job->x + k0, K, job->T, job->y + r0, N);
    }
  }
}

void cpu_matmul(m3_backend *be, const m3_tensor *w, const float *x, int T, float *y) {
  cpu_backend *cb = cpu_of(be);
  if (T <= 0 || w->rows <= 0) return;
  matmul_job job = {simd_decodable(w) ? cb->k : &cpu_kernels_portable, w, x, T, y};
  int threads = m3_threadpool_size(cb->pool);
  if (T == 1) {
    /* One contiguous, 16-row aligned range per thread: each streams its share of W once. */
    int64_t chunk = (w->rows + threads - 1) / threads;
    chunk = (chunk + 15) / 16 * 16;
    m3_parallel_for(cb->pool, w->rows, chunk, gemv_rows, &job);
  } else {
    int64_t tiles = (w->rows + TILE_ROWS - 1) / TILE_ROWS;
    m3_parallel_for(cb->pool, tiles, tiles / (4 * threads) + 1, gemm_row_tiles, &job);
  }
}

typedef struct {
  const m3_tensor *table;
  const int32_t *ids;
  float *out;
} embed_job;

static void embed_rows(void *ctx, int64_t t0, int64_t t1, int worker) {
  (void)worker;
  const embed_job *job = ctx;
  const int64_t cols = job->table->cols;
  for (int64_t t = t0; t < t1; t++) {
    float *row = job->out + t * cols;
    int32_t id = job->ids[t];
    if (id >= 0 && id < job->table->rows)
      cpu_decode_row(job->table, id, 0, cols, row);
    else /* The model validates ids; an invalid one shows up as NaN rather than reading past the table. */
      for (int64_t c = 0; c < cols; c++) row[c] = NAN;
  }
}

void cpu_embed(m3_backend *be, const m3_tensor *table, const int32_t *ids, int T, float *out) {
  embed_job job = {table, ids, out};
  m3_parallel_for(cpu_of(be)->pool, T, 0, embed_rows, &job);
}
