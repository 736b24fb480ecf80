/* bench_cuda_ops: first timings of the CUDA backend's ops on the GPU machine, each against a
 * ceiling measured in the same run (scripts/gpu.sh runs it; figures, not a test):
 *   - device-to-device copy bandwidth (bytes read + written): the memory ceiling;
 *   - batch-1 decode's small ops (rmsnorm, add_rmsnorm, embed of one 6144-wide row; moe_experts
 *     on tiny experts at T = 1 and 8: grouping and combine), timed through a recorded graph;
 *   - kv_store_rope (the heads' norm + RoPE fused with the keys' cache store) at T = 1 and 8192
 *     beside the five ops it replaces, on float32 and fp8 caches;
 *   - matmul_set at T = 1 (a sparse layer's q, k, v, index_q, index_k of one input in one pass)
 *     beside the 5 matmuls it replaces, through recorded graphs;
 *   - (M3_BENCH_SHAPES=RxC,... alone) matmul at T = 1 on the shapes given, MXFP8 or BF16;
 *   - matmul at decode (T = 1, 8, 64) on every full-width M3 shape in BF16 and MXFP8: weight
 *     bytes read per second against that ceiling (BF16: T <= 8 is the GEMV, T = 64 goes through
 *     cuBLASLt; MXFP8: up to 64 tokens the E4M3 tensor-core kernel, weights read once);
 *   - prefill (8192 tokens) on q_proj, o_proj and the expert shapes: a plain cuBLASLt BF16 GEMM
 *     (BF16 in, float32 accumulation and out: the ceiling) beside m3's matmul op, which first
 *     rounds the float32 activations to BF16: TFLOP/s;
 *   - MSA decode per layer at 2K, 32K and 128K context, batch 1 and 16 sequences of their own
 *     caches (index scan + top-k, then attention over the 16 selected blocks, per sequence): the
 *     bytes a step must read against the copy bandwidth, the ratio to 2K, and dense attention;
 *     at 32K and 128K also on an fp8 cache (E4M3 rows and their scales: about a fourth the bytes)
 *     (M3_BENCH_MSA_DECODE=1: only 2K and 32K on the float32 cache);
 *   - attention over an 8192-token prompt, dense causal and over 16 MSA blocks, and the MSA
 *     selection of that prompt: TFLOP/s (M3_BENCH_PREFILL_ATTENTION=1: these rows only);
 *   - the routed experts of one full-width MoE layer at decode sizes and at 2048 and 8192 tokens,
 *     the latter as grouped GEMMs and on the default lanes (or M3_MOE_STREAMS), and at 8192 on
 *     1 stream and on 4 lanes: TFLOP/s (M3_BENCH_MOE_ONLY=1: these rows only;
 *     M3_BENCH_GROUPED_SWEEP=1: only the grouped GEMMs at 2048 and 8192, per tile candidate;
 *     with M3_BENCH_GROUPED_ONLY=<candidate>, MXFP8 at that candidate alone).
 * Times are medians of repeated runs (host clock around a queue of launches, synchronized),
 * inputs are random (never zeros) and rotate over copies larger than L2 where that matters. */
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "cuda_env.h"
#include "base/dtype.h"

static m3_backend *gpu;

static void must(m3_status st, const char *what) {
  if (st != M3_OK) {
    fprintf(stderr, "FATAL: %s: %s\n", what, m3_last_error());
    exit(1);
  }
}

static void must_cuda(cudaError_t e, const char *what) {
  if (e != cudaSuccess) {
    fprintf(stderr, "FATAL: %s: %s\n", what, cudaGetErrorString(e));
    exit(1);
  }
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return (uint32_t)(rng_state >> 16);
}

enum { FILL_CHUNK = 16 << 20 };

/* Fills device memory with random valid values of `dt` (F32 in [-1, 1], BF16 in [-1, 1], E4M3 not
 * NaN, U8 scales 118..125): a random 16 MiB chunk repeated. */
static void *device_random(m3_dtype dt, size_t bytes) {
  void *d = gpu->ops->alloc(gpu, bytes);
  if (!d) must(M3_ERR_NOMEM, "alloc");
  uint8_t *chunk = malloc(FILL_CHUNK);
  for (size_t i = 0; i < FILL_CHUNK; i += 4) {
    float f = (float)(rnd() % 2000001) / 1e6f - 1.0f;
    uint32_t u;
    if (dt == M3_DT_F32) {
      memcpy(&u, &f, 4);
    } else if (dt == M3_DT_BF16) {
      float g = (float)(rnd() % 2000001) / 1e6f - 1.0f;
      u = (uint32_t)m3_f32_to_bf16(f) | (uint32_t)m3_f32_to_bf16(g) << 16;
    } else if (dt == M3_DT_U8) {
      u = 0;
      for (int b = 0; b < 4; b++) u |= (uint32_t)(118 + rnd() % 8) << (8 * b);
    } else {
      u = rnd() & 0x7e7e7e7eu; /* E4M3 without the NaN pattern */
    }
    memcpy(chunk + i, &u, 4);
  }
  for (size_t off = 0; off < bytes; off += FILL_CHUNK)
    must(gpu->ops->to_device(gpu, (uint8_t *)d + off, chunk,
                             bytes - off < FILL_CHUNK ? bytes - off : FILL_CHUNK), "to_device");
  free(chunk);
  return d;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void sync_gpu(void) {
  static int32_t *probe;
  int32_t h;
  if (!probe) probe = gpu->ops->alloc(gpu, 4);
  must(gpu->ops->to_host(gpu, &h, probe, 4), "sync");
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

typedef void (*bench_fn)(void *ctx, int iter);

/* Median over 7 samples of the time per call, each sample `reps` queued calls. */
static double time_call(bench_fn fn, void *ctx, int reps) {
  double samples[7];
  for (int i = 0; i < 3; i++) fn(ctx, i);
  sync_gpu();
  for (int s = 0; s < 7; s++) {
    double t0 = now_s();
    for (int r = 0; r < reps; r++) fn(ctx, r);
    sync_gpu();
    samples[s] = (now_s() - t0) / reps;
  }
  qsort(samples, 7, sizeof samples[0], cmp_double);
  return samples[3];
}

/* Median over 7 calls of the host's wall time issuing one call on an idle GPU (the GPU drained
 * before each): when it is near time_call's figure, the host's launches bound the op. */
static double host_call(bench_fn fn, void *ctx) {
  double samples[7];
  for (int s = 0; s < 7; s++) {
    sync_gpu();
    const double t0 = now_s();
    fn(ctx, s);
    samples[s] = now_s() - t0;
  }
  sync_gpu();
  qsort(samples, 7, sizeof samples[0], cmp_double);
  return samples[3];
}

/* ---- memory ceiling ---- */

static double copy_bandwidth(void) {
  const size_t bytes = (size_t)1 << 30;
  void *a, *b;
  must_cuda(cudaMalloc(&a, bytes), "cudaMalloc");
  must_cuda(cudaMalloc(&b, bytes), "cudaMalloc");
  must_cuda(cudaMemset(a, 0x5a, bytes), "cudaMemset");
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0), cudaEventCreate(&e1);
  double samples[9];
  for (int i = 0; i < 9; i++) {
    cudaEventRecord(e0, 0);
    must_cuda(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, 0), "copy");
    cudaEventRecord(e1, 0);
    cudaEventSynchronize(e1);
    float ms;
    cudaEventElapsedTime(&ms, e0, e1);
    samples[i] = ms * 1e-3;
  }
  qsort(samples, 9, sizeof samples[0], cmp_double);
  cudaEventDestroy(e0), cudaEventDestroy(e1);
  cudaFree(a), cudaFree(b);
  return 2.0 * (double)bytes / samples[4] / 1e9;
}

/* ---- matmul ---- */

typedef struct {
  m3_tensor w[8];
  int copies, T;
  float *x, *y;
} matmul_ctx;

static void run_matmul(void *ctx, int iter) {
  matmul_ctx *m = ctx;
  gpu->ops->matmul(gpu, &m->w[iter % m->copies], m->x, m->T, m->y);
}

enum { BENCH_BF16, BENCH_MXFP8, BENCH_F32 };
static const char *const bench_kind[] = {"BF16", "MXFP8", "F32"};

/* Bytes of a weight's data, and of its MXFP8 scales (0 for other kinds). */
static size_t bench_weight_bytes(int64_t rows, int64_t cols, int kind) {
  return (size_t)rows * cols * (kind == BENCH_MXFP8 ? 1 : kind == BENCH_F32 ? 4 : 2);
}
static size_t bench_scale_bytes(int64_t rows, int64_t cols, int kind) {
  return kind == BENCH_MXFP8 ? (size_t)rows * (cols / 32) : 0;
}

/* A random weight in device memory (bench_weight_free frees it). */
static m3_tensor bench_weight(const char *label, int64_t rows, int64_t cols, int kind) {
  m3_tensor t;
  memset(&t, 0, sizeof t);
  const int mx = kind == BENCH_MXFP8;
  t.name = label;
  t.rows = rows, t.cols = cols;
  t.dtype = mx ? M3_DT_F8_E4M3 : kind == BENCH_F32 ? M3_DT_F32 : M3_DT_BF16;
  t.data = device_random(t.dtype, bench_weight_bytes(rows, cols, kind));
  if (mx) {
    t.quant = M3_WQ_MXFP8;
    t.scale = device_random(M3_DT_U8, bench_scale_bytes(rows, cols, kind));
    t.scale_rows = rows, t.scale_cols = cols / 32;
    t.block_rows = 1, t.block_cols = 32;
  }
  return t;
}

static void bench_weight_free(m3_tensor *t) {
  gpu->ops->free(gpu, (void *)t->data);
  if (t->scale) gpu->ops->free(gpu, (void *)t->scale);
}

static void bench_matmul(const char *label, int64_t rows, int64_t cols, int kind, const int *Ts, int nT,
                         double copy_gbs, FILE *table) {
  matmul_ctx m;
  memset(&m, 0, sizeof m);
  const size_t wbytes = bench_weight_bytes(rows, cols, kind), sbytes = bench_scale_bytes(rows, cols, kind);
  /* Enough copies to read at least 256 MiB per round, so L2 (50 MiB) holds none of them. */
  m.copies = (int)((256u << 20) / wbytes + 1);
  if (m.copies > 8) m.copies = 8;
  for (int c = 0; c < m.copies; c++) m.w[c] = bench_weight(label, rows, cols, kind);
  int Tmax = 0;
  for (int i = 0; i < nT; i++) Tmax = Ts[i] > Tmax ? Ts[i] : Tmax;
  m.x = device_random(M3_DT_F32, (size_t)Tmax * cols * 4);
  m.y = gpu->ops->alloc(gpu, (size_t)Tmax * rows * 4);
  for (int i = 0; i < nT; i++) {
    m.T = Ts[i];
    double s = time_call(run_matmul, &m, m.T > 64 ? 5 : 50);
    double gbs = (double)(wbytes + sbytes) / s / 1e9;
    double tflops = 2.0 * m.T * rows * cols / s / 1e12;
    fprintf(table, "| matmul %s %s %lldx%lld T=%d | %.1f us | %.0f GB/s weights = %.0f%% of copy | %.1f TFLOP/s |\n",
            label, bench_kind[kind], (long long)rows, (long long)cols, m.T, s * 1e6, gbs,
            100.0 * gbs / copy_gbs, tflops);
    fflush(table);
  }
  for (int c = 0; c < m.copies; c++) bench_weight_free(&m.w[c]);
  gpu->ops->free(gpu, m.x), gpu->ops->free(gpu, m.y);
}

/* matmul at T = 1 for each shape of list ("RxC,RxC,..."); 0 (with a message) where list is
 * malformed. */
static int bench_shapes(const char *list, int kind, double copy_gbs, FILE *table) {
  static const int one[] = {1};
  for (const char *p = list; *p;) {
    long long rows, cols;
    int used = 0;
    if (sscanf(p, "%lldx%lld%n", &rows, &cols, &used) != 2 || rows <= 0 || cols <= 0 || cols % 32 != 0 ||
        (p[used] != ',' && p[used] != '\0')) {
      fprintf(stderr, "bench_cuda_ops: M3_BENCH_SHAPES: expected ROWSxCOLS[,...] with COLS a multiple of 32 at \"%s\"\n", p);
      return 0;
    }
    bench_matmul("shape", rows, cols, kind, one, 1, copy_gbs, table);
    p += used + (p[used] == ',');
  }
  return 1;
}

/* ---- logits to the host ---- */

typedef struct {
  void *dst;
  const void *src;
  size_t bytes;
} d2h_ctx;

static void run_d2h(void *ctx, int iter) {
  (void)iter;
  d2h_ctx *c = ctx;
  must(gpu->ops->to_host(gpu, c->dst, c->src, c->bytes), "to_host");
}

/* The logits of 1 and 8 rows of a 200064-token vocabulary (800 KB, 6.4 MB) copied to pageable
 * (malloc) and to pinned (cudaMallocHost) host memory: what a decode or verify step pays to hand
 * its logits to the sampler. */
static void bench_logits_to_host(FILE *table) {
  const size_t row = (size_t)200064 * 4;
  void *dev = device_random(M3_DT_F32, 8 * row);
  void *pageable = malloc(8 * row), *pinned = NULL;
  must_cuda(cudaMallocHost(&pinned, 8 * row), "cudaMallocHost");
  memset(pageable, 0, 8 * row);
  for (int rows = 1; rows <= 8; rows *= 8)
    for (int p = 0; p < 2; p++) {
      d2h_ctx c = {p ? pinned : pageable, dev, rows * row};
      double s = time_call(run_d2h, &c, 20);
      fprintf(table, "| logits to host, %d row%s (%.1f MB), %s memory | %.1f us | %.1f GB/s |\n", rows,
              rows > 1 ? "s" : "", (double)(rows * row) / 1e6, p ? "pinned" : "pageable", s * 1e6,
              (double)(rows * row) / s / 1e9);
    }
  fflush(table);
  cudaFreeHost(pinned);
  free(pageable);
  gpu->ops->free(gpu, dev);
}

/* ---- sampling on the GPU ---- */

typedef struct {
  const float *logits;
  int rows;
  const m3_row_sampling *params;
  int32_t *ids;
} sample_ctx;

static void run_sample(void *ctx, int iter) {
  (void)iter;
  sample_ctx *c = ctx;
  must(gpu->ops->sample_rows(gpu, c->logits, c->rows, 200064, c->params, c->ids), "sample_rows");
}

/* sample_rows on 1, 8 and 64 rows of a 200064-token vocabulary (a bulk of logits within +-4.5
 * and one token in 2000 raised by 8..16, as a model's rows look), top_p 0.9, top_k 50 and a plain
 * draw, all at temperature 1, beside the copy of the same rows to pinned host memory that the
 * host sampler needs first (which then spends about 1 ms of host time per row). */
static void bench_sample_rows(FILE *table) {
  enum { V = 200064, MAX_ROWS = 64 };
  const size_t row = (size_t)V * 4;
  float *lh = malloc(MAX_ROWS * row);
  for (size_t i = 0; i < (size_t)MAX_ROWS * V; i++) {
    float bulk = 0.0f;
    for (int k = 0; k < 3; k++) bulk += (float)(rnd() % 1000001) / 1e6f;
    lh[i] = 3.0f * bulk - 4.5f + (rnd() % 2000 == 0 ? 8.0f + (float)(rnd() % 9) : 0.0f);
  }
  float *dev = gpu->ops->alloc(gpu, MAX_ROWS * row);
  if (!dev) must(M3_ERR_NOMEM, "alloc");
  must(gpu->ops->to_device(gpu, dev, lh, MAX_ROWS * row), "to_device");
  void *pinned = NULL;
  must_cuda(cudaMallocHost(&pinned, MAX_ROWS * row), "cudaMallocHost");
  m3_row_sampling params[MAX_ROWS];
  int32_t ids[MAX_ROWS];
  static const struct {
    const char *label;
    float top_p;
    int top_k;
  } kinds[] = {{"top_p 0.9", 0.9f, 0}, {"top_k 50", 1.0f, 50}, {"plain draw", 1.0f, 0}};
  for (int rows = 1; rows <= MAX_ROWS; rows *= 8) {
    d2h_ctx copy = {pinned, dev, rows * row};
    const double copy_s = time_call(run_d2h, &copy, 10);
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
      for (int r = 0; r < rows; r++)
        params[r] = (m3_row_sampling){.temperature = 1.0f, .top_p = kinds[k].top_p,
                                      .top_k = kinds[k].top_k, .unit = (double)rnd() / 4294967296.0};
      sample_ctx c = {dev, rows, params, ids};
      const double s = time_call(run_sample, &c, 10);
      fprintf(table, "| sample_rows %d row%s of 200064, %s, T 1 | %.1f us | logits to pinned host "
              "memory: %.1f us |\n", rows, rows > 1 ? "s" : "", kinds[k].label, s * 1e6, copy_s * 1e6);
    }
  }
  fflush(table);
  cudaFreeHost(pinned);
  gpu->ops->free(gpu, dev);
  free(lh);
}

/* ---- the vocabulary-split head's greedy candidates ---- */

typedef struct {
  const float *logits;
  int rows, cols, first;
  float *pairs;
  int32_t *ids;
} pick_ctx;

static void run_argmax_pairs(void *ctx, int iter) {
  (void)iter;
  pick_ctx *c = ctx;
  gpu->ops->argmax_pairs(gpu, c->logits, c->rows, c->cols, c->first, c->pairs);
}

static void run_argmax_rows(void *ctx, int iter) {
  (void)iter;
  pick_ctx *c = ctx;
  must(gpu->ops->argmax_rows(gpu, c->logits, c->rows, c->cols, c->ids), "argmax_rows");
}

/* argmax_pairs on one rank's slice of a 200064-token vocabulary over 2 and 8 ranks, 1, 8 and 64
 * rows (a split head's greedy step: what replaces gathering the rows), beside argmax_rows on
 * whole rows (which also waits for the ids on the host). */
static void bench_argmax_pairs(FILE *table) {
  enum { V = 200064, MAX_ROWS = 64 };
  float *dev = device_random(M3_DT_F32, (size_t)MAX_ROWS * V * 4);
  float *pairs = gpu->ops->alloc(gpu, MAX_ROWS * 2 * sizeof(float));
  int32_t ids[MAX_ROWS];
  if (!pairs) must(M3_ERR_NOMEM, "alloc");
  for (int rows = 1; rows <= MAX_ROWS; rows *= 8) {
    pick_ctx whole = {dev, rows, V, 0, pairs, ids};
    const double rows_s = time_call(run_argmax_rows, &whole, 10);
    for (int world = 2; world <= 8; world *= 4) {
      pick_ctx c = {dev, rows, V / world, V / world, pairs, ids};
      const double s = time_call(run_argmax_pairs, &c, 20);
      fprintf(table, "| argmax_pairs %d row%s of a 1/%d slice of 200064 | %.1f us | argmax_rows "
              "of the whole rows, ids on the host: %.1f us |\n", rows, rows > 1 ? "s" : "", world,
              s * 1e6, rows_s * 1e6);
    }
  }
  fflush(table);
  gpu->ops->free(gpu, pairs);
  gpu->ops->free(gpu, dev);
}

/* ---- routed experts at prefill ---- */

typedef struct {
  m3_moe_experts ex;
  int T, k;
  float *h, *x, *weights;
  int32_t *ids;
} moe_ctx;

static void run_moe(void *ctx, int iter) {
  (void)iter;
  moe_ctx *c = ctx;
  gpu->ops->moe_experts(gpu, &c->ex, c->h, c->T, c->ids, c->weights, c->k, c->x);
}

enum { MOE_E = 128, MOE_K = 4, MOE_H = 6144, MOE_I = 3072 };

/* One MoE layer's expert weights at full width (128 experts of 3072 over 6144, BF16 or MXFP8),
 * made once per dtype: filling 384 tensors with random data takes the host about 15 s, longer
 * than all the timings of one row together. */
static void moe_weights_make(int mx, m3_tensor w[3][MOE_E]) {
  for (int m = 0; m < 3; m++)
    for (int e = 0; e < MOE_E; e++) {
      m3_tensor *t = &w[m][e];
      memset(t, 0, sizeof *t);
      t->name = m == 0 ? "expert w1" : m == 1 ? "expert w3" : "expert w2";
      t->rows = m == 2 ? MOE_H : MOE_I, t->cols = m == 2 ? MOE_I : MOE_H;
      t->dtype = mx ? M3_DT_F8_E4M3 : M3_DT_BF16;
      t->data = device_random(t->dtype, (size_t)MOE_H * MOE_I * (mx ? 1 : 2));
      if (mx) {
        t->quant = M3_WQ_MXFP8;
        t->scale = device_random(M3_DT_U8, (size_t)MOE_H * MOE_I / 32);
        t->scale_rows = t->rows, t->scale_cols = t->cols / 32;
        t->block_rows = 1, t->block_cols = 32;
      }
    }
}

static void moe_weights_free(m3_tensor w[3][MOE_E]) {
  for (int m = 0; m < 3; m++)
    for (int e = 0; e < MOE_E; e++) {
      gpu->ops->free(gpu, (void *)w[m][e].data);
      if (w[m][e].scale) gpu->ops->free(gpu, (void *)w[m][e].scale);
    }
}

/* The routed experts of one MoE layer (w from moe_weights_make) over T tokens with uniform random
 * routing, top 4: TFLOP/s of the three expert GEMMs (against the cuBLASLt ceiling printed for the
 * expert shapes) and the bytes of the distinct experts read (MXFP8: with their scales) against
 * the copy bandwidth (what bounds decode sizes). */
static void bench_moe_labeled(int T, int mx, m3_tensor w[3][MOE_E], double copy_gbs,
                              const char *streams, FILE *table) {
  enum { E = MOE_E, K = MOE_K, H = MOE_H, I = MOE_I };
  moe_ctx c;
  memset(&c, 0, sizeof c);
  c.ex = (m3_moe_experts){.gate = w[0], .up = w[1], .down = w[2], .E = E, .alpha = 1.702f,
                          .beta = 1.0f, .limit = 7.0f};
  must(gpu->ops->prepare_experts(gpu, &c.ex), "prepare_experts");
  c.T = T, c.k = K;
  int32_t *ids = malloc((size_t)T * K * 4);
  for (int t = 0; t < T; t++)
    for (int j = 0; j < K; j++) {
      int fresh;
      do {
        ids[t * K + j] = (int32_t)(rnd() % E);
        fresh = 1;
        for (int i = 0; i < j; i++) fresh &= ids[t * K + i] != ids[t * K + j];
      } while (!fresh);
    }
  int used[E] = {0}, distinct = 0;
  for (int i = 0; i < T * K; i++) distinct += !used[ids[i]]++;
  c.ids = gpu->ops->alloc(gpu, (size_t)T * K * 4);
  must(gpu->ops->to_device(gpu, c.ids, ids, (size_t)T * K * 4), "to_device");
  free(ids);
  c.h = device_random(M3_DT_F32, (size_t)T * H * 4);
  c.x = device_random(M3_DT_F32, (size_t)T * H * 4);
  c.weights = device_random(M3_DT_F32, (size_t)T * K * 4);
  fprintf(stderr, "   moe_experts %s T=%d: %d experts\n", mx ? "MXFP8" : "BF16", T, distinct);
  double s = time_call(run_moe, &c, T > 64 ? 2 : 20);
  const double gbs = distinct * 3.0 * H * I * (mx ? 1.0 + 1.0 / 32 : 2.0) / s / 1e9;
  /* the prefill path (T > 64) issues a thousand launches or so from the host: how long that takes
   * (including its one wait for the expert offsets) next to the GPU time above */
  char host[96] = "";
  if (T > 64) snprintf(host, sizeof host, "; host issues the call in %.1f us", host_call(run_moe, &c) * 1e6);
  fprintf(table, "| moe_experts %s E=%d k=%d %dx%d T=%d%s | %.1f us | %.1f TFLOP/s | %d experts read at %.0f GB/s = %.0f%% of copy%s |\n",
          mx ? "MXFP8" : "BF16", E, K, I, H, T, streams, s * 1e6, 2.0 * 3 * T * K * (double)H * I / s / 1e12, distinct, gbs,
          100 * gbs / copy_gbs, host);
  fflush(table);
  gpu->ops->release_experts(gpu, &c.ex);
  gpu->ops->free(gpu, c.ids), gpu->ops->free(gpu, c.h), gpu->ops->free(gpu, c.x);
  gpu->ops->free(gpu, c.weights);
}

static void bench_moe(int T, int mx, m3_tensor w[3][MOE_E], double copy_gbs, FILE *table) {
  bench_moe_labeled(T, mx, w, copy_gbs, "", table);
}

/* The grouped GEMMs' tile candidates (M3_MOE_GROUPED_TILE 0, 1, ... until the backend refuses
 * one; moe_grouped.cu GG_TILES lists their shapes), BF16 and MXFP8, the full-width layer at 2048
 * and 8192 tokens: one row each. `gpu` points at each candidate's backend in turn. */
static void bench_grouped_sweep(double copy_gbs, FILE *table) {
  static const int Ts[2] = {2048, 8192};
  m3_backend *own = gpu, *tiled = NULL;
  const char *only_env = getenv("M3_BENCH_GROUPED_ONLY");
  const int only = only_env ? atoi(only_env) : -1;
  for (int mx = only >= 0; mx < 2; mx++) {
    static m3_tensor w[3][MOE_E];
    moe_weights_make(mx, w);
    m3_status st = M3_OK;
    int tile = only >= 0 ? only : 0;
    while ((only < 0 || tile == only) && (st = cuda_with_tile(tile, &tiled)) == M3_OK) {
      char label[64];
      snprintf(label, sizeof label, ", grouped GEMMs, M3_MOE_GROUPED_TILE=%d", tile);
      gpu = tiled;
      for (int i = 0; i < 2; i++) bench_moe_labeled(Ts[i], mx, w, copy_gbs, label, table);
      gpu = own;
      tiled->ops->destroy(tiled);
      tile++;
    }
    if (st != M3_OK && (only >= 0 || st != M3_ERR_ARG)) must(st, "cuda backend, M3_MOE_GROUPED_TILE");
    moe_weights_free(w);
  }
}

/* ---- decode-size small ops (batch 1) ---- */

typedef struct {
  m3_graph *g;
} graph_ctx;

static void run_graph(void *ctx, int iter) {
  (void)iter;
  must(gpu->ops->graph_launch(gpu, ((graph_ctx *)ctx)->g), "graph_launch");
}

enum { GRAPH_REPS = 100 };

/* Time per call of fn for kernels of a few microseconds, shorter than a launch from the host: a
 * graph of GRAPH_REPS calls replayed (after one call outside it, so that scratch has grown), or
 * queued calls where the backend records no graphs. */
static double time_small(bench_fn fn, void *ctx) {
  fn(ctx, 0);
  sync_gpu();
  if (gpu->ops->graph_begin && gpu->ops->graph_begin(gpu) == M3_OK) {
    for (int r = 0; r < GRAPH_REPS; r++) fn(ctx, r);
    graph_ctx c = {NULL};
    if (gpu->ops->graph_end(gpu, &c.g) == M3_OK) {
      const double s = time_call(run_graph, &c, 5) / GRAPH_REPS;
      gpu->ops->graph_free(gpu, c.g);
      return s;
    }
  }
  return time_call(fn, ctx, 200);
}

enum { SMALL_COPIES = 16, SMALL_H = 6144, EMBED_ROWS = 16384 };

typedef struct {
  m3_tensor norm_w, table;
  float *x[SMALL_COPIES], *y[SMALL_COPIES], *out;
  int32_t *ids; /* [SMALL_COPIES] random rows of the table */
} small_ctx;

static void run_rmsnorm(void *ctx, int iter) {
  small_ctx *c = ctx;
  gpu->ops->rmsnorm(gpu, c->x[iter % SMALL_COPIES], &c->norm_w, 1e-6f, 1, SMALL_H, c->out);
}

static void run_add_rmsnorm(void *ctx, int iter) {
  small_ctx *c = ctx;
  const int i = iter % SMALL_COPIES;
  gpu->ops->add_rmsnorm(gpu, c->x[i], c->y[i], &c->norm_w, 1e-6f, 1, SMALL_H, c->out);
}

static void run_embed(void *ctx, int iter) {
  small_ctx *c = ctx;
  gpu->ops->embed(gpu, &c->table, c->ids + iter % SMALL_COPIES, 1, c->out);
}

/* One row of width 6144 (BF16 weights): rmsnorm, add_rmsnorm, embed (BF16 table of 16384 rows,
 * random ids): microseconds per call and the bytes each moves (read + written) against the copy
 * bandwidth; inputs rotate over 16 copies (L2-resident: these ops read what the step just wrote). */
static void bench_small_ops(double copy_gbs, FILE *table) {
  small_ctx c;
  memset(&c, 0, sizeof c);
  c.norm_w = (m3_tensor){.name = "norm", .rows = 1, .cols = SMALL_H, .dtype = M3_DT_BF16};
  c.norm_w.data = device_random(M3_DT_BF16, SMALL_H * 2);
  c.table = (m3_tensor){.name = "embed", .rows = EMBED_ROWS, .cols = SMALL_H, .dtype = M3_DT_BF16};
  c.table.data = device_random(M3_DT_BF16, (size_t)EMBED_ROWS * SMALL_H * 2);
  for (int i = 0; i < SMALL_COPIES; i++) {
    c.x[i] = device_random(M3_DT_F32, SMALL_H * 4);
    c.y[i] = device_random(M3_DT_F32, SMALL_H * 4);
  }
  c.out = gpu->ops->alloc(gpu, SMALL_H * 4);
  int32_t ids[SMALL_COPIES];
  for (int i = 0; i < SMALL_COPIES; i++) ids[i] = (int32_t)(rnd() % EMBED_ROWS);
  c.ids = gpu->ops->alloc(gpu, sizeof ids);
  must(gpu->ops->to_device(gpu, c.ids, ids, sizeof ids), "to_device");
  static const struct {
    const char *label;
    bench_fn fn;
    double bytes;
  } ops[] = {{"rmsnorm", run_rmsnorm, SMALL_H * (4.0 + 2 + 4)},
             {"add_rmsnorm", run_add_rmsnorm, SMALL_H * (4.0 + 4 + 4 + 2 + 4)},
             {"embed (BF16 table)", run_embed, SMALL_H * (2.0 + 4)}};
  for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++) {
    const double s = time_small(ops[i].fn, &c), gbs = ops[i].bytes / s / 1e9;
    fprintf(table, "| %s 1x%d T=1 | %.2f us | %.0f GB/s = %.1f%% of copy |\n", ops[i].label, SMALL_H,
            s * 1e6, gbs, 100 * gbs / copy_gbs);
  }
  fflush(table);
  gpu->ops->free(gpu, (void *)c.norm_w.data), gpu->ops->free(gpu, (void *)c.table.data);
  for (int i = 0; i < SMALL_COPIES; i++) gpu->ops->free(gpu, c.x[i]), gpu->ops->free(gpu, c.y[i]);
  gpu->ops->free(gpu, c.out), gpu->ops->free(gpu, c.ids);
}

/* ---- a decode step's projections of one input in one matmul_set ---- */

enum { SET_N = 5, SET_COPIES = 2, SET_H = 6144 };

typedef struct {
  m3_tensor w[SET_COPIES][SET_N];
  m3_matmul_out out[SET_COPIES][SET_N];
  float *x;
} set_ctx;

static void run_set(void *ctx, int iter) {
  set_ctx *c = ctx;
  gpu->ops->matmul_set(gpu, c->x, 1, c->out[iter % SET_COPIES], SET_N);
}

static void run_set_apart(void *ctx, int iter) {
  set_ctx *c = ctx;
  const m3_matmul_out *o = c->out[iter % SET_COPIES];
  for (int i = 0; i < SET_N; i++) gpu->ops->matmul(gpu, o[i].w, c->x, 1, o[i].y);
}

/* A sparse layer's projections of its attention input at T = 1 (q 8192, k and v 512, index_q 512,
 * index_k 128 rows over 6144; BF16 and MXFP8) as one matmul_set beside the 5 matmuls it replaces,
 * both through a recorded graph as decode steps run: microseconds, and the weight bytes read
 * against the copy bandwidth. Two copies of the weights alternate, so L2 holds neither's. */
static void bench_matmul_set(double copy_gbs, FILE *table) {
  static const struct {
    const char *label;
    int64_t rows;
  } proj[SET_N] = {{"q_proj", 8192}, {"k_proj", 512}, {"v_proj", 512}, {"index_q", 512}, {"index_k", 128}};
  for (int kind = BENCH_BF16; kind <= BENCH_MXFP8; kind++) {
    set_ctx c;
    memset(&c, 0, sizeof c);
    double bytes = 0;
    int64_t rows = 0;
    for (int i = 0; i < SET_N; i++) {
      rows += proj[i].rows;
      bytes += (double)(bench_weight_bytes(proj[i].rows, SET_H, kind) +
                        bench_scale_bytes(proj[i].rows, SET_H, kind));
      for (int k = 0; k < SET_COPIES; k++) {
        c.w[k][i] = bench_weight(proj[i].label, proj[i].rows, SET_H, kind);
        c.out[k][i] = (m3_matmul_out){&c.w[k][i], gpu->ops->alloc(gpu, (size_t)proj[i].rows * 4)};
        if (!c.out[k][i].y) must(M3_ERR_NOMEM, "alloc");
      }
    }
    c.x = device_random(M3_DT_F32, SET_H * 4);
    const double set = time_small(run_set, &c), apart = time_small(run_set_apart, &c);
    const double set_gbs = bytes / set / 1e9, apart_gbs = bytes / apart / 1e9;
    fprintf(table, "| matmul_set %s q k v index_q index_k (%lld rows) x %d T=1 | %.1f us | %.0f GB/s "
            "weights = %.0f%% of copy | 5 matmuls: %.1f us, %.0f%% of copy |\n", bench_kind[kind],
            (long long)rows, SET_H, set * 1e6, set_gbs, 100 * set_gbs / copy_gbs, apart * 1e6, 100 * apart_gbs / copy_gbs);
    fflush(table);
    for (int k = 0; k < SET_COPIES; k++)
      for (int i = 0; i < SET_N; i++) {
        bench_weight_free(&c.w[k][i]);
        gpu->ops->free(gpu, c.out[k][i].y);
      }
    gpu->ops->free(gpu, c.x);
  }
}

/* ---- the heads' norm + RoPE + the keys' cache store ---- */

enum {
  KVR_NH = 64,
  KVR_NIQ = 4,
  KVR_NKV = 4,
  KVR_HD = 128,
  KVR_IHD = 128,
  KVR_ROT = 64,
  KVR_BS = 128,
  KVR_FIRST = 1000
};

typedef struct {
  m3_kv_view kv;
  m3_tensor q_norm, iq_norm, k_norm, ik_norm;
  float *q, *iq, *k, *v, *ik;
  int32_t *pos;
  int T;
} kvr_ctx;

static void run_kv_store_rope(void *ctx, int iter) {
  (void)iter;
  kvr_ctx *c = ctx;
  const m3_attention_rows r = {.q = c->q,
                               .iq = c->iq,
                               .k = c->k,
                               .v = c->v,
                               .ik = c->ik,
                               .q_norm = &c->q_norm,
                               .iq_norm = &c->iq_norm,
                               .k_norm = &c->k_norm,
                               .ik_norm = &c->ik_norm,
                               .nh = KVR_NH,
                               .niq = KVR_NIQ,
                               .eps = 1e-6f,
                               .rot = KVR_ROT,
                               .theta = 5e6};
  gpu->ops->kv_store_rope(gpu, &c->kv, c->pos, c->T, &r);
}

/* What kv_store_rope replaces: the four norm + RoPE passes (q, iq, k and ik in place), then the
 * store. */
static void run_kv_store_unfused(void *ctx, int iter) {
  (void)iter;
  kvr_ctx *c = ctx;
  gpu->ops->rmsnorm_rope(gpu, c->q, &c->q_norm, 1e-6f, c->pos, c->T, KVR_NH, KVR_HD, KVR_ROT, 5e6);
  gpu->ops->rmsnorm_rope(gpu, c->iq, &c->iq_norm, 1e-6f, c->pos, c->T, KVR_NIQ, KVR_IHD, KVR_ROT, 5e6);
  gpu->ops->rmsnorm_rope(gpu, c->k, &c->k_norm, 1e-6f, c->pos, c->T, KVR_NKV, KVR_HD, KVR_ROT, 5e6);
  gpu->ops->rmsnorm_rope(gpu, c->ik, &c->ik_norm, 1e-6f, c->pos, c->T, 1, KVR_IHD, KVR_ROT, 5e6);
  gpu->ops->kv_store(gpu, &c->kv, c->pos, c->T, c->k, c->v, c->ik);
}

/* kv_store_rope of a sparse layer at full width (64 query heads, 4 index query heads and 4 KV
 * heads of 128, index key 128, rot 64; pages of 128 tokens from position 1000 on) at T = 1 (through
 * a recorded graph) and 8192, on float32 and fp8 caches, beside the five ops it fuses: the bytes of
 * its pass (q, iq read and written, k, v, ik read, the cache rows written) against the copy
 * bandwidth. */
static void bench_kv_store_rope(double copy_gbs, FILE *table) {
  static const int Ts[] = {1, 8192};
  kvr_ctx c;
  memset(&c, 0, sizeof c);
  c.q_norm = (m3_tensor){.name = "q_norm", .rows = 1, .cols = KVR_HD, .dtype = M3_DT_BF16};
  c.iq_norm = (m3_tensor){.name = "index_q_norm", .rows = 1, .cols = KVR_IHD, .dtype = M3_DT_BF16};
  c.q_norm.data = device_random(M3_DT_BF16, KVR_HD * 2);
  c.iq_norm.data = device_random(M3_DT_BF16, KVR_IHD * 2);
  c.k_norm = (m3_tensor){.name = "k_norm", .rows = 1, .cols = KVR_HD, .dtype = M3_DT_BF16};
  c.ik_norm = (m3_tensor){.name = "index_k_norm", .rows = 1, .cols = KVR_IHD, .dtype = M3_DT_BF16};
  c.k_norm.data = device_random(M3_DT_BF16, KVR_HD * 2);
  c.ik_norm.data = device_random(M3_DT_BF16, KVR_IHD * 2);
  const int Tmax = Ts[1], blocks = (KVR_FIRST + Tmax) / KVR_BS + 1;
  c.q = device_random(M3_DT_F32, (size_t)Tmax * KVR_NH * KVR_HD * 4);
  c.iq = device_random(M3_DT_F32, (size_t)Tmax * KVR_NIQ * KVR_IHD * 4);
  c.k = device_random(M3_DT_F32, (size_t)Tmax * KVR_NKV * KVR_HD * 4);
  c.v = device_random(M3_DT_F32, (size_t)Tmax * KVR_NKV * KVR_HD * 4);
  c.ik = device_random(M3_DT_F32, (size_t)Tmax * KVR_IHD * 4);
  int32_t *h = malloc((size_t)(blocks > Tmax ? blocks : Tmax) * 4);
  for (int t = 0; t < Tmax; t++) h[t] = KVR_FIRST + t;
  c.pos = gpu->ops->alloc(gpu, (size_t)Tmax * 4);
  must(gpu->ops->to_device(gpu, c.pos, h, (size_t)Tmax * 4), "to_device");
  for (int b = 0; b < blocks; b++) h[b] = b;
  int32_t *table_d = gpu->ops->alloc(gpu, (size_t)blocks * 4);
  must(gpu->ops->to_device(gpu, table_d, h, (size_t)blocks * 4), "to_device");
  free(h);
  for (int dt = M3_KV_F32; dt <= M3_KV_FP8; dt++) {
    const size_t kv_pb = m3_kv_pool_page_bytes((m3_kv_dtype)dt, (size_t)KVR_NKV * KVR_BS, KVR_HD);
    const size_t ik_pb = m3_kv_pool_page_bytes((m3_kv_dtype)dt, KVR_BS, KVR_IHD);
    c.kv = (m3_kv_view){gpu->ops->alloc(gpu, blocks * kv_pb), gpu->ops->alloc(gpu, blocks * kv_pb),
                        gpu->ops->alloc(gpu, blocks * ik_pb), table_d, blocks, KVR_BS, KVR_NKV,
                        KVR_HD, KVR_IHD, (m3_kv_dtype)dt};
    if (!c.kv.k || !c.kv.v || !c.kv.ik) must(M3_ERR_NOMEM, "alloc");
    for (int i = 0; i < 2; i++) {
      c.T = Ts[i];
      const double fused = c.T == 1 ? time_small(run_kv_store_rope, &c) : time_call(run_kv_store_rope, &c, 20);
      const double unfused = c.T == 1 ? time_small(run_kv_store_unfused, &c) : time_call(run_kv_store_unfused, &c, 20);
      const double row_bytes = dt == M3_KV_F32 ? 4.0 : 1.0 + 4.0 / KVR_HD; /* per value written */
      const double bytes = (double)c.T * ((2.0 * KVR_NKV * KVR_HD + KVR_IHD) * (4.0 + row_bytes) +
                                          (KVR_NH * KVR_HD + KVR_NIQ * KVR_IHD) * 8.0);
      const double gbs = bytes / fused / 1e9;
      fprintf(table,
              "| kv_store_rope %s cache nh %d niq %d nkv %d hd %d ihd %d rot %d T=%d | %.2f us | unfused "
              "(rmsnorm_rope q, iq, k, ik, kv_store) %.2f us = %.2fx | %.0f GB/s = %.1f%% of copy |\n",
              dt == M3_KV_F32 ? "f32" : "fp8", KVR_NH, KVR_NIQ, KVR_NKV, KVR_HD, KVR_IHD, KVR_ROT, c.T, fused * 1e6,
              unfused * 1e6, unfused / fused, gbs, 100 * gbs / copy_gbs);
      fflush(table);
    }
    gpu->ops->free(gpu, c.kv.k), gpu->ops->free(gpu, c.kv.v), gpu->ops->free(gpu, c.kv.ik);
  }
  gpu->ops->free(gpu, (void *)c.k_norm.data), gpu->ops->free(gpu, (void *)c.ik_norm.data);
  gpu->ops->free(gpu, (void *)c.q_norm.data), gpu->ops->free(gpu, (void *)c.iq_norm.data);
  gpu->ops->free(gpu, c.q), gpu->ops->free(gpu, c.iq);
  gpu->ops->free(gpu, c.k), gpu->ops->free(gpu, c.v), gpu->ops->free(gpu, c.ik);
  gpu->ops->free(gpu, c.pos), gpu->ops->free(gpu, table_d);
}

/* moe_experts of 128 experts of width 32 over 6144 (BF16, one 25 MB buffer), uniform top-4 routing:
 * the experts' reads are small, so this shows what the op costs beyond them: grouping, the launch
 * of the grouped GEMVs, the combine (T x 4 rows of 6144 floats gathered into x). */
static void bench_moe_small(int T, double copy_gbs, FILE *table) {
  enum { E = MOE_E, K = MOE_K, H = MOE_H, I = 32 };
  static m3_tensor w[3][E];
  const size_t each = (size_t)H * I * 2;
  uint8_t *buf = device_random(M3_DT_BF16, 3 * E * each);
  for (int m = 0; m < 3; m++)
    for (int e = 0; e < E; e++) {
      m3_tensor *t = &w[m][e];
      memset(t, 0, sizeof *t);
      t->name = m == 0 ? "small w1" : m == 1 ? "small w3" : "small w2";
      t->rows = m == 2 ? H : I, t->cols = m == 2 ? I : H;
      t->dtype = M3_DT_BF16;
      t->data = buf + (size_t)(m * E + e) * each;
    }
  moe_ctx c;
  memset(&c, 0, sizeof c);
  c.ex = (m3_moe_experts){.gate = w[0], .up = w[1], .down = w[2], .E = E, .alpha = 1.702f,
                          .beta = 1.0f, .limit = 7.0f};
  must(gpu->ops->prepare_experts(gpu, &c.ex), "prepare_experts");
  c.T = T, c.k = K;
  int32_t *ids = malloc((size_t)T * K * 4);
  for (int t = 0; t < T; t++)
    for (int j = 0; j < K; j++) ids[t * K + j] = (int32_t)((t * K + j) * 37 % E); /* distinct per token */
  c.ids = gpu->ops->alloc(gpu, (size_t)T * K * 4);
  must(gpu->ops->to_device(gpu, c.ids, ids, (size_t)T * K * 4), "to_device");
  free(ids);
  c.h = device_random(M3_DT_F32, (size_t)T * H * 4);
  c.x = device_random(M3_DT_F32, (size_t)T * H * 4);
  c.weights = device_random(M3_DT_F32, (size_t)T * K * 4);
  const double s = time_small(run_moe, &c);
  /* combine: x read and written, T k rows of y read */
  const double gbs = (double)T * H * 4 * (2 + K) / s / 1e9;
  fprintf(table, "| moe_experts BF16 E=%d k=%d %dx%d T=%d (tiny experts: grouping + combine) | %.2f us | combine bytes at %.0f GB/s = %.1f%% of copy |\n",
          E, K, I, H, T, s * 1e6, gbs, 100 * gbs / copy_gbs);
  fflush(table);
  gpu->ops->release_experts(gpu, &c.ex);
  gpu->ops->free(gpu, c.ids), gpu->ops->free(gpu, c.h), gpu->ops->free(gpu, c.x);
  gpu->ops->free(gpu, c.weights), gpu->ops->free(gpu, buf);
}

/* ---- cuBLASLt ceiling for prefill ---- */

typedef struct {
  cublasLtHandle_t lt;
  cublasLtMatmulDesc_t op;
  cublasLtMatrixLayout_t la, lb, lc;
  cublasLtMatmulHeuristicResult_t heur;
  void *w, *x, *y, *workspace;
  size_t workspace_bytes;
} lt_ctx;

static void run_lt(void *ctx, int iter) {
  (void)iter;
  lt_ctx *c = ctx;
  const float alpha = 1.0f, beta = 0.0f;
  if (cublasLtMatmul(c->lt, c->op, &alpha, c->w, c->la, c->x, c->lb, &beta, c->y, c->lc, c->y, c->lc,
                     &c->heur.algo, c->workspace, c->workspace_bytes, 0) != CUBLAS_STATUS_SUCCESS) {
    fprintf(stderr, "FATAL: cublasLtMatmul\n");
    exit(1);
  }
  /* sync_gpu waits on the backend's stream only; a GEMM of ~1 ms hides this wait */
  must_cuda(cudaStreamSynchronize(0), "cublasLtMatmul");
}

static void must_lt(cublasStatus_t s, const char *what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    fprintf(stderr, "FATAL: %s: cuBLAS status %d\n", what, (int)s);
    exit(1);
  }
}

/* y[T, rows] = x[T, cols] W[rows, cols]^T with W and x already BF16, float32 accumulation and
 * output, the best algorithm cuBLASLt's heuristic offers: what m3's matmul would reach if the
 * activations came in BF16. */
static double lt_ceiling_tflops(int64_t rows, int64_t cols, int T) {
  lt_ctx c;
  memset(&c, 0, sizeof c);
  c.workspace_bytes = 32u << 20;
  must_cuda(cudaMalloc(&c.workspace, c.workspace_bytes), "cudaMalloc");
  c.w = device_random(M3_DT_BF16, (size_t)rows * cols * 2);
  c.x = device_random(M3_DT_BF16, (size_t)T * cols * 2);
  c.y = gpu->ops->alloc(gpu, (size_t)T * rows * 4);
  cublasOperation_t trans = CUBLAS_OP_T;
  cublasLtMatmulPreference_t pref;
  int found = 0;
  must_lt(cublasLtCreate(&c.lt), "cublasLtCreate");
  must_lt(cublasLtMatmulDescCreate(&c.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc");
  must_lt(cublasLtMatmulDescSetAttribute(c.op, CUBLASLT_MATMUL_DESC_TRANSA, &trans, sizeof trans), "transa");
  must_lt(cublasLtMatrixLayoutCreate(&c.la, CUDA_R_16BF, (uint64_t)cols, (uint64_t)rows, cols), "layout");
  must_lt(cublasLtMatrixLayoutCreate(&c.lb, CUDA_R_16BF, (uint64_t)cols, (uint64_t)T, cols), "layout");
  must_lt(cublasLtMatrixLayoutCreate(&c.lc, CUDA_R_32F, (uint64_t)rows, (uint64_t)T, rows), "layout");
  must_lt(cublasLtMatmulPreferenceCreate(&pref), "preference");
  must_lt(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                               &c.workspace_bytes, sizeof c.workspace_bytes), "workspace");
  must_lt(cublasLtMatmulAlgoGetHeuristic(c.lt, c.op, c.la, c.lb, c.lc, c.lc, pref, 1, &c.heur, &found),
          "heuristic");
  if (found < 1) must_lt(CUBLAS_STATUS_NOT_SUPPORTED, "heuristic found no algorithm");
  double s = time_call(run_lt, &c, 5);
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(c.lc), cublasLtMatrixLayoutDestroy(c.lb), cublasLtMatrixLayoutDestroy(c.la);
  cublasLtMatmulDescDestroy(c.op);
  cublasLtDestroy(c.lt);
  gpu->ops->free(gpu, c.w), gpu->ops->free(gpu, c.x), gpu->ops->free(gpu, c.y);
  cudaFree(c.workspace);
  return 2.0 * T * rows * cols / s / 1e12;
}

/* ---- MSA decode ---- */

enum { MSA_BATCH = 16 };

/* A decode step of `batch` sequences at one context length, each with its own cache (pages of one
 * shuffled pool), called per sequence as src/model/attention.c calls the ops per segment. */
typedef struct {
  m3_kv_view kv[MSA_BATCH];
  float *q, *iq, *out;  /* [MSA_BATCH, nh, hd], [MSA_BATCH, G, ihd], [MSA_BATCH, nh, hd] */
  int32_t *pos, *sel;   /* [MSA_BATCH], [MSA_BATCH, G, topk] */
  int batch, nh, hd, G, ihd;
  m3_msa_params p;
} msa_ctx;

static void msa_select_seq(const msa_ctx *c, int b) {
  gpu->ops->msa_select(gpu, c->iq + (size_t)b * c->G * c->ihd, c->G, &c->kv[b], c->pos + b, 1,
                       &c->p, c->sel + (size_t)b * c->G * c->p.topk);
}

static void msa_attend_seq(const msa_ctx *c, int b, int sparse) {
  gpu->ops->attention(gpu, c->q + (size_t)b * c->nh * c->hd, c->nh, &c->kv[b], c->pos + b, 1,
                      sparse ? c->sel + (size_t)b * c->G * c->p.topk : NULL, c->p.topk,
                      c->out + (size_t)b * c->nh * c->hd);
}

static void run_select(void *ctx, int iter) {
  (void)iter;
  const msa_ctx *c = ctx;
  for (int b = 0; b < c->batch; b++) msa_select_seq(c, b);
}

static void run_sparse(void *ctx, int iter) {
  (void)iter;
  const msa_ctx *c = ctx;
  for (int b = 0; b < c->batch; b++) msa_attend_seq(c, b, 1);
}

static void run_layer(void *ctx, int iter) {
  (void)iter;
  const msa_ctx *c = ctx;
  for (int b = 0; b < c->batch; b++) msa_select_seq(c, b), msa_attend_seq(c, b, 1);
}

static void run_dense(void *ctx, int iter) {
  (void)iter;
  const msa_ctx *c = ctx;
  for (int b = 0; b < c->batch; b++) msa_attend_seq(c, b, 0);
}

/* An fp8 cache's pages (kv_store of random rows at positions 0..len-1, the same rows for every
 * sequence, into its own pages): k, v, ik get the pools. */
static void msa_fill_fp8(msa_ctx *c, int len, int nkv, int bs, size_t pages, void **k, void **v, void **ik) {
  const size_t kv_pb = m3_kv_pool_page_bytes(M3_KV_FP8, (size_t)nkv * bs, (size_t)c->hd);
  const size_t ik_pb = m3_kv_pool_page_bytes(M3_KV_FP8, (size_t)bs, (size_t)c->ihd);
  *k = gpu->ops->alloc(gpu, pages * kv_pb), *v = gpu->ops->alloc(gpu, pages * kv_pb);
  *ik = gpu->ops->alloc(gpu, pages * ik_pb);
  if (!*k || !*v || !*ik) must(M3_ERR_NOMEM, "alloc");
  const int T = (len + bs - 1) / bs * bs;
  float *src_k = device_random(M3_DT_F32, (size_t)T * nkv * c->hd * 4);
  float *src_v = device_random(M3_DT_F32, (size_t)T * nkv * c->hd * 4);
  float *src_ik = device_random(M3_DT_F32, (size_t)T * c->ihd * 4);
  int32_t *pos_all = malloc((size_t)T * 4);
  for (int t = 0; t < T; t++) pos_all[t] = t;
  int32_t *pos_d = gpu->ops->alloc(gpu, (size_t)T * 4);
  must(gpu->ops->to_device(gpu, pos_d, pos_all, (size_t)T * 4), "to_device");
  for (int b = 0; b < MSA_BATCH; b++) {
    m3_kv_view view = c->kv[b];
    view.k = *k, view.v = *v, view.ik = *ik;
    gpu->ops->kv_store(gpu, &view, pos_d, T, src_k, src_v, src_ik);
  }
  sync_gpu();
  gpu->ops->free(gpu, src_k), gpu->ops->free(gpu, src_v), gpu->ops->free(gpu, src_ik);
  gpu->ops->free(gpu, pos_d);
  free(pos_all);
}

/* MSA decode per layer at context len, batch 1 and MSA_BATCH, on a cache of dtype dt (float32, or
 * fp8: E4M3 values plus a float32 scale per row, about a fourth of the bytes, which the times
 * should follow where the float32 ones reach copy bandwidth). layer_us[i] (when not NULL) gets the
 * times of the two batches, and base_us (when not NULL) holds those at the shortest context for
 * the ratio. */
static void bench_msa(int len, m3_kv_dtype dt, double copy_gbs, FILE *table, double *layer_us,
                      const double *base_us) {
  msa_ctx c;
  memset(&c, 0, sizeof c);
  const int bs = 128, nkv = 4;
  c.nh = 64, c.hd = 128, c.G = nkv, c.ihd = 128;
  c.p = (m3_msa_params){16, 1, 0};
  const int blocks = (len + bs - 1) / bs, pages = blocks * MSA_BATCH;
  int32_t *perm = malloc((size_t)pages * 4);
  for (int i = 0; i < pages; i++) perm[i] = i;
  for (int i = pages - 1; i > 0; i--) { /* shuffled pages */
    int j = (int)(rnd() % (uint32_t)(i + 1));
    int32_t tmp = perm[i];
    perm[i] = perm[j], perm[j] = tmp;
  }
  int32_t *tables = gpu->ops->alloc(gpu, (size_t)pages * 4);
  must(gpu->ops->to_device(gpu, tables, perm, (size_t)pages * 4), "to_device");
  for (int b = 0; b < MSA_BATCH; b++)
    c.kv[b] = (m3_kv_view){NULL, NULL, NULL, tables + (size_t)b * blocks, blocks, bs, nkv, c.hd, c.ihd, dt};
  void *k, *v, *ik;
  if (dt == M3_KV_FP8) {
    msa_fill_fp8(&c, len, nkv, bs, (size_t)pages, &k, &v, &ik);
  } else {
    const size_t kvn = (size_t)pages * nkv * bs * c.hd;
    k = device_random(M3_DT_F32, kvn * 4), v = device_random(M3_DT_F32, kvn * 4);
    ik = device_random(M3_DT_F32, (size_t)pages * bs * c.ihd * 4);
  }
  for (int b = 0; b < MSA_BATCH; b++) c.kv[b].k = k, c.kv[b].v = v, c.kv[b].ik = ik;
  int32_t pos_h[MSA_BATCH];
  for (int b = 0; b < MSA_BATCH; b++) pos_h[b] = len - 1;
  c.q = device_random(M3_DT_F32, (size_t)MSA_BATCH * c.nh * c.hd * 4);
  c.iq = device_random(M3_DT_F32, (size_t)MSA_BATCH * c.G * c.ihd * 4);
  c.out = gpu->ops->alloc(gpu, (size_t)MSA_BATCH * c.nh * c.hd * 4);
  c.sel = gpu->ops->alloc(gpu, (size_t)MSA_BATCH * c.G * c.p.topk * 4);
  c.pos = gpu->ops->alloc(gpu, sizeof pos_h);
  must(gpu->ops->to_device(gpu, c.pos, pos_h, sizeof pos_h), "to_device");
  /* Bytes a step must read per sequence: every index key, the K and V rows of the selected blocks
   * (all of them below 16 blocks); dense: every K and V row. */
  const int fp8 = dt == M3_KV_FP8;
  const double kv_row = (double)nkv * (fp8 ? c.hd + 4 : c.hd * 4) * 2, ik_row = fp8 ? c.ihd + 4 : c.ihd * 4;
  static const int batches[2] = {1, MSA_BATCH};
  for (int i = 0; i < 2; i++) {
    c.batch = batches[i];
    const int reps = len * c.batch > 300000 ? 3 : 20;
    double ts = time_call(run_select, &c, reps), ta = time_call(run_sparse, &c, reps);
    double tl = time_call(run_layer, &c, reps), td = time_call(run_dense, &c, reps > 3 ? 10 : 2);
    const int chosen = blocks < c.p.topk ? blocks : c.p.topk;
    const double scan_bytes = c.batch * (double)len * ik_row, kv_bytes = c.batch * (double)chosen * bs * kv_row;
    const double sparse_bytes = scan_bytes + kv_bytes;
    const double dense_bytes = c.batch * (double)len * kv_row;
    if (layer_us) layer_us[i] = tl * 1e6;
    char ratio[80] = "";
    if (base_us) snprintf(ratio, sizeof ratio, " | %.2fx the %s-sequence layer at ctx 2K", tl * 1e6 / base_us[i], i ? "16" : "1");
    fprintf(table,
            "| MSA decode%s ctx %d batch %d | layer %.1f us (select %.1f + sparse attention %.1f) | "
            "reads %.1f MB = %.0f GB/s = %.0f%% of copy | select scans %.1f MB of index keys = %.0f GB/s = "
            "%.0f%% of copy | sparse attention reads %.1f MB of K and V = %.0f GB/s | "
            "dense attention %.1f us, %.0f GB/s = %.0f%% of copy%s |\n",
            fp8 ? " fp8 cache" : "", len, c.batch, tl * 1e6, ts * 1e6, ta * 1e6, sparse_bytes / 1e6,
            sparse_bytes / tl / 1e9, 100.0 * sparse_bytes / tl / 1e9 / copy_gbs, scan_bytes / 1e6,
            scan_bytes / ts / 1e9, 100.0 * scan_bytes / ts / 1e9 / copy_gbs, kv_bytes / 1e6, kv_bytes / ta / 1e9, td * 1e6,
            dense_bytes / td / 1e9, 100.0 * dense_bytes / td / 1e9 / copy_gbs, ratio);
    fflush(table);
  }
  gpu->ops->free(gpu, k), gpu->ops->free(gpu, v), gpu->ops->free(gpu, ik), gpu->ops->free(gpu, tables);
  gpu->ops->free(gpu, c.q), gpu->ops->free(gpu, c.iq), gpu->ops->free(gpu, c.out);
  gpu->ops->free(gpu, c.sel), gpu->ops->free(gpu, c.pos);
  free(perm);
}

/* ---- attention at prefill ---- */

typedef struct {
  m3_kv_view kv;
  float *q, *out;    /* [T, nh, hd] */
  float *iq;         /* [T, nkv, ihd]: the index queries of the MSA selection */
  int32_t *pos, *sel; /* [T], [T, nkv, topk] or NULL (dense) */
  int T, nh, topk;
} prefill_att_ctx;

static void run_prefill_attention(void *ctx, int iter) {
  (void)iter;
  const prefill_att_ctx *c = ctx;
  gpu->ops->attention(gpu, c->q, c->nh, &c->kv, c->pos, c->T, c->sel, c->topk, c->out);
}

static void run_prefill_select(void *ctx, int iter) {
  (void)iter;
  const prefill_att_ctx *c = ctx;
  const m3_msa_params p = {c->topk, 1, 0};
  gpu->ops->msa_select(gpu, c->iq, c->kv.nkv, &c->kv, c->pos, c->T, &p, c->sel);
}

/* One layer's attention over a T-token prompt (positions 0..T-1, M3's shapes: 64 query heads, 4
 * KV heads, head dim 128, blocks of 128), dense causal and over 16 selected blocks per token and
 * KV head (block 0, the token's own block and 14 other visible ones, ascending, -1 padded), as
 * MSA's init and local blocks force them. TFLOP/s count 4 hd per (query head, visible key). Then
 * the MSA selection of the same prompt (4 index heads of 128, random index keys): its scores
 * count 2 ihd per (index head, key of a candidate block). */
static void bench_attention_prefill(int T, FILE *table) {
  enum { NH = 64, NKV = 4, HD = 128, BS = 128, TOPK = 16 };
  const int blocks = (T + BS - 1) / BS;
  prefill_att_ctx c;
  memset(&c, 0, sizeof c);
  c.T = T, c.nh = NH;
  int32_t *h = malloc((size_t)T * NKV * TOPK * 4);
  for (int b = 0; b < blocks; b++) h[b] = b; /* an identity block table */
  int32_t *table_d = gpu->ops->alloc(gpu, (size_t)blocks * 4);
  must(gpu->ops->to_device(gpu, table_d, h, (size_t)blocks * 4), "to_device");
  const size_t kvn = (size_t)blocks * NKV * BS * HD;
  c.kv = (m3_kv_view){device_random(M3_DT_F32, kvn * 4), device_random(M3_DT_F32, kvn * 4), NULL, table_d,
                      blocks, BS, NKV, HD, 0, M3_KV_F32};
  for (int t = 0; t < T; t++) h[t] = t;
  c.pos = gpu->ops->alloc(gpu, (size_t)T * 4);
  must(gpu->ops->to_device(gpu, c.pos, h, (size_t)T * 4), "to_device");
  double dense_flop = 0, sparse_flop = 0;
  char *chosen = malloc((size_t)blocks);
  for (int t = 0; t < T; t++) {
    const int local = t / BS;
    dense_flop += (double)(t + 1) * NH * 4 * HD;
    for (int g = 0; g < NKV; g++) {
      memset(chosen, 0, (size_t)blocks);
      chosen[0] = chosen[local] = 1;
      int count = local > 0 ? 2 : 1;
      while (count < TOPK && count < local + 1) {
        const int b = (int)(rnd() % (uint32_t)(local + 1));
        if (!chosen[b]) chosen[b] = 1, count++;
      }
      int32_t *row = h + ((size_t)t * NKV + g) * TOPK;
      int n = 0;
      for (int b = 0; b <= local; b++)
        if (chosen[b]) {
          row[n++] = b;
          const int visible = t - b * BS + 1 < BS ? t - b * BS + 1 : BS;
          sparse_flop += (double)visible * (NH / NKV) * 4 * HD;
        }
      while (n < TOPK) row[n++] = -1;
    }
  }
  int32_t *sel_d = gpu->ops->alloc(gpu, (size_t)T * NKV * TOPK * 4);
  must(gpu->ops->to_device(gpu, sel_d, h, (size_t)T * NKV * TOPK * 4), "to_device");
  c.q = device_random(M3_DT_F32, (size_t)T * NH * HD * 4);
  c.out = gpu->ops->alloc(gpu, (size_t)T * NH * HD * 4);
  double td = time_call(run_prefill_attention, &c, 3);
  c.sel = sel_d, c.topk = TOPK;
  double ts = time_call(run_prefill_attention, &c, 3);
  fprintf(table, "| attention prefill T=%d nh %d nkv %d hd %d, dense causal | %.1f us | %.1f TFLOP/s |\n", T, NH,
          NKV, HD, td * 1e6, dense_flop / td / 1e12);
  fprintf(table, "| attention prefill T=%d nh %d nkv %d hd %d, MSA %d blocks | %.1f us | %.1f TFLOP/s |\n", T, NH,
          NKV, HD, TOPK, ts * 1e6, sparse_flop / ts / 1e12);
  enum { IHD = 128 };
  c.kv.ik = device_random(M3_DT_F32, (size_t)blocks * BS * IHD * 4);
  c.kv.ihd = IHD;
  c.iq = device_random(M3_DT_F32, (size_t)T * NKV * IHD * 4);
  double score_flop = 0;
  for (int t = 0; t < T; t++) score_flop += t / BS > TOPK - 1 ? (double)(t / BS) * BS * NKV * 2 * IHD : 0;
  const double tsel = time_call(run_prefill_select, &c, 3);
  fprintf(table, "| msa_select prefill T=%d, %d index heads of %d | %.1f us | scores %.1f TFLOP/s |\n", T, NKV, IHD,
          tsel * 1e6, score_flop / tsel / 1e12);
  fflush(table);
  gpu->ops->free(gpu, c.kv.ik), gpu->ops->free(gpu, c.iq);
  gpu->ops->free(gpu, c.kv.k), gpu->ops->free(gpu, c.kv.v), gpu->ops->free(gpu, table_d);
  gpu->ops->free(gpu, c.pos), gpu->ops->free(gpu, sel_d), gpu->ops->free(gpu, c.q);
  gpu->ops->free(gpu, c.out);
  free(h), free(chosen);
}

int main(int argc, char **argv) {
  FILE *table = stdout;
  if (argc > 1 && !(table = fopen(argv[1], "w"))) {
    perror(argv[1]);
    return 1;
  }
  must(m3_backend_create("cuda", 0, &gpu), "cuda backend");
  struct cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  double copy_gbs = copy_bandwidth();
  fprintf(table, "| card | %s, %d SMs |\n| device-to-device copy | %.0f GB/s (read + write) |\n",
          prop.name, prop.multiProcessorCount, copy_gbs);
  static const int decode_T[] = {1, 2, 3, 8, 64}, prefill_T[] = {8192};
  static const struct {
    const char *label;
    int64_t rows, cols;
    int prefill; /* also timed at prefill against the cuBLASLt ceiling */
  } shapes[] = {{"q_proj", 8192, 6144, 1},     {"o_proj", 6144, 8192, 1},
                {"k/v_proj", 512, 6144, 0},    {"expert w1/w3", 3072, 6144, 1},
                {"expert w2", 6144, 3072, 1},  {"dense w1/w3", 12288, 6144, 0},
                {"lm_head", 200064, 6144, 0},  {"router/index_k", 128, 6144, 0}};
  const int nshapes = (int)(sizeof shapes / sizeof shapes[0]);
  /* M3_BENCH_MOE_ONLY set: the routed experts alone (a quick look at one kernel family). */
  const int moe_only = getenv("M3_BENCH_MOE_ONLY") != NULL;
  /* M3_BENCH_GROUPED_SWEEP set: the grouped GEMMs' tile candidates alone (bench_grouped_sweep). */
  if (getenv("M3_BENCH_GROUPED_SWEEP")) {
    bench_grouped_sweep(copy_gbs, table);
    gpu->ops->destroy(gpu);
    if (table != stdout) fclose(table);
    return 0;
  }
  /* M3_BENCH_SHAPES=RxC,RxC,... set: one-token matmuls of those shapes alone (MXFP8; BF16 with
   * M3_BENCH_BF16 set), for a kernel's fixed cost and its rate (time against bytes). */
  if (getenv("M3_BENCH_SHAPES")) {
    const int ok = bench_shapes(getenv("M3_BENCH_SHAPES"), getenv("M3_BENCH_BF16") ? BENCH_BF16 : BENCH_MXFP8,
                                copy_gbs, table);
    gpu->ops->destroy(gpu);
    if (table != stdout) fclose(table);
    return ok ? 0 : 1;
  }
  /* M3_BENCH_MSA_DECODE set: the MSA decode rows at 2K and 32K alone (a quick look at the decode
   * selection and attention kernels). */
  if (getenv("M3_BENCH_MSA_DECODE")) {
    double base_us[2], layer_us[2];
    bench_msa(2048, M3_KV_F32, copy_gbs, table, base_us, NULL);
    bench_msa(32768, M3_KV_F32, copy_gbs, table, layer_us, base_us);
    gpu->ops->destroy(gpu);
    if (table != stdout) fclose(table);
    return 0;
  }
  /* M3_BENCH_PREFILL_ATTENTION set: the prefill attention and MSA selection rows alone. */
  if (getenv("M3_BENCH_PREFILL_ATTENTION")) {
    bench_attention_prefill(prefill_T[0], table);
    gpu->ops->destroy(gpu);
    if (table != stdout) fclose(table);
    return 0;
  }
  /* M3_BENCH_DECODE_ONLY set: the batch-1 decode rows alone (small ops, matmul at T = 1, the routed
   * experts at T = 1 and 8); with M3_CUDA_GEMV_OLD=1 in a second run, the previous one-token
   * GEMVs for comparison. */
  if (getenv("M3_BENCH_DECODE_ONLY")) {
    static const int one[] = {1};
    bench_small_ops(copy_gbs, table);
    bench_kv_store_rope(copy_gbs, table);
    bench_matmul_set(copy_gbs, table);
    for (int T = 1; T <= 8; T += 7) bench_moe_small(T, copy_gbs, table);
    for (int s = 0; s < nshapes; s++)
      for (int mx = 0; mx < 2; mx++)
        if (shapes[s].rows < 100000) bench_matmul(shapes[s].label, shapes[s].rows, shapes[s].cols, mx, one, 1, copy_gbs, table);
    for (int mx = 0; mx < 2; mx++) {
      static m3_tensor w[3][MOE_E];
      moe_weights_make(mx, w);
      bench_moe(1, mx, w, copy_gbs, table);
      bench_moe(8, mx, w, copy_gbs, table);
      moe_weights_free(w);
    }
    gpu->ops->destroy(gpu);
    if (table != stdout) fclose(table);
    return 0;
  }
  if (!moe_only) {
    bench_small_ops(copy_gbs, table);
    bench_kv_store_rope(copy_gbs, table);
    bench_matmul_set(copy_gbs, table);
    for (int T = 1; T <= 8; T += 7) bench_moe_small(T, copy_gbs, table);
  }
  for (int s = 0; s < nshapes && !moe_only; s++)
    for (int mx = 0; mx < 2; mx++)
      bench_matmul(shapes[s].label, shapes[s].rows, shapes[s].cols, mx, decode_T, 5, copy_gbs, table);
  for (int s = 0; s < nshapes && !moe_only; s++) {
    if (!shapes[s].prefill) continue;
    fprintf(table, "| cuBLASLt ceiling %s %lldx%lld T=%d (BF16 in, fp32 accumulate) | %.0f TFLOP/s |\n",
            shapes[s].label, (long long)shapes[s].rows, (long long)shapes[s].cols, prefill_T[0],
            lt_ceiling_tflops(shapes[s].rows, shapes[s].cols, prefill_T[0]));
    for (int mx = 0; mx < 2; mx++)
      bench_matmul(shapes[s].label, shapes[s].rows, shapes[s].cols, mx, prefill_T, 1, copy_gbs, table);
  }
  /* The router (F32, as checkpoints store it) and the routed experts of one prefill. */
  if (!moe_only) bench_matmul("router", 128, 6144, BENCH_F32, prefill_T, 1, copy_gbs, table);
  static const char *const moe_streams[2] = {"1", "4"};
  m3_backend *moe_backends[2], *moe_lanes;
  for (int i = 0; i < 2; i++) must(cuda_with_streams(moe_streams[i], &moe_backends[i]), "cuda backend (M3_MOE_STREAMS)");
  const char *env_streams = getenv("M3_MOE_STREAMS");
  must(cuda_with_streams(env_streams ? env_streams : "8", &moe_lanes), "cuda backend (M3_MOE_GROUPED=0)");
  for (int mx = 0; mx < 2; mx++) {
    static m3_tensor w[3][MOE_E];
    moe_weights_make(mx, w);
    for (int i = 0; i < 5; i++) bench_moe(decode_T[i], mx, w, copy_gbs, table);
    /* The prefill at 2048 and 8192 tokens on `gpu` (grouped GEMMs where moe.cu finds them faster), then
     * on the lanes (M3_MOE_GROUPED=0, M3_MOE_STREAMS as set, else the default); then at 8192 on
     * the lanes of backends of 1 stream (the experts one after another) and 4 lanes: `gpu`
     * points at each in turn, since every helper here issues and synchronizes through it. */
    char label[64];
    m3_backend *own = gpu;
    static const int moe_prefill_T[2] = {2048, 8192};
    for (int i = 0; i < 2; i++) {
      bench_moe_labeled(moe_prefill_T[i], mx, w, copy_gbs, ", default (grouped GEMMs where faster)", table);
      snprintf(label, sizeof label, ", lanes (M3_MOE_GROUPED=0, M3_MOE_STREAMS=%s)",
               env_streams ? env_streams : "default");
      gpu = moe_lanes;
      bench_moe_labeled(moe_prefill_T[i], mx, w, copy_gbs, label, table);
      gpu = own;
    }
    for (int i = 0; i < 2; i++) {
      snprintf(label, sizeof label, ", M3_MOE_STREAMS=%s", moe_streams[i]);
      gpu = moe_backends[i];
      bench_moe_labeled(prefill_T[0], mx, w, copy_gbs, label, table);
      gpu = own;
    }
    moe_weights_free(w);
  }
  if (!moe_only) {
    bench_logits_to_host(table);
    bench_sample_rows(table);
    bench_argmax_pairs(table);
    bench_attention_prefill(prefill_T[0], table);
    static const int contexts[] = {2048, 32768, 131072};
    double base_us[2], layer_us[2];
    for (int i = 0; i < 3; i++)
      bench_msa(contexts[i], M3_KV_F32, copy_gbs, table, i ? layer_us : base_us, i ? base_us : NULL);
    for (int i = 1; i < 3; i++) bench_msa(contexts[i], M3_KV_FP8, copy_gbs, table, NULL, NULL);
  }
  for (int i = 0; i < 2; i++) moe_backends[i]->ops->destroy(moe_backends[i]);
  moe_lanes->ops->destroy(moe_lanes);
  gpu->ops->destroy(gpu);
  if (table != stdout) fclose(table);
  return 0;
}
