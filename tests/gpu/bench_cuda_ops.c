/* bench_cuda_ops: first timings of the CUDA backend's ops on the GPU machine, each against a
 * ceiling measured in the same run (scripts/gpu.sh runs it; figures, not a test):
 *   - device-to-device copy bandwidth (bytes read + written): the memory ceiling;
 *   - matmul at decode (T = 1, 8) on full-width M3 shapes in BF16 and MXFP8: weight bytes read
 *     per second against that ceiling;
 *   - matmul at prefill (T = 2048, BF16 through cuBLASLt): TFLOP/s;
 *   - MSA decode per layer at 2K, 32K and 128K context (index scan + top-k, then attention over
 *     the 16 selected blocks), with dense attention beside it.
 * Times are medians of repeated runs (host clock around a queue of launches, synchronized),
 * inputs are random (never zeros) and rotate over copies larger than L2 where that matters. */
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
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

static void bench_matmul(const char *label, int64_t rows, int64_t cols, int mx, const int *Ts, int nT,
                         double copy_gbs, FILE *table) {
  matmul_ctx m;
  memset(&m, 0, sizeof m);
  size_t wbytes = (size_t)rows * cols * (mx ? 1 : 2), sbytes = mx ? (size_t)rows * (cols / 32) : 0;
  /* Enough copies to read at least 256 MiB per round, so L2 (50 MiB) holds none of them. */
  m.copies = (int)((256u << 20) / wbytes + 1);
  if (m.copies > 8) m.copies = 8;
  for (int c = 0; c < m.copies; c++) {
    m3_tensor *t = &m.w[c];
    t->name = label;
    t->rows = rows, t->cols = cols;
    t->dtype = mx ? M3_DT_F8_E4M3 : M3_DT_BF16;
    t->data = device_random(t->dtype, wbytes);
    if (mx) {
      t->quant = M3_WQ_MXFP8;
      t->scale = device_random(M3_DT_U8, sbytes);
      t->scale_rows = rows, t->scale_cols = cols / 32;
      t->block_rows = 1, t->block_cols = 32;
    }
  }
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
            label, mx ? "MXFP8" : "BF16", (long long)rows, (long long)cols, m.T, s * 1e6, gbs,
            100.0 * gbs / copy_gbs, tflops);
    fflush(table);
  }
  for (int c = 0; c < m.copies; c++) {
    gpu->ops->free(gpu, (void *)m.w[c].data);
    if (m.w[c].scale) gpu->ops->free(gpu, (void *)m.w[c].scale);
  }
  gpu->ops->free(gpu, m.x), gpu->ops->free(gpu, m.y);
}

/* ---- MSA decode ---- */

typedef struct {
  m3_kv_view kv;
  float *q, *iq, *out;
  int32_t *pos, *sel;
  int T, nh, G;
  m3_msa_params p;
} msa_ctx;

static void run_select(void *ctx, int iter) {
  (void)iter;
  msa_ctx *c = ctx;
  gpu->ops->msa_select(gpu, c->iq, c->G, &c->kv, c->pos, c->T, &c->p, c->sel);
}

static void run_sparse(void *ctx, int iter) {
  (void)iter;
  msa_ctx *c = ctx;
  gpu->ops->attention(gpu, c->q, c->nh, &c->kv, c->pos, c->T, c->sel, c->p.topk, c->out);
}

static void run_dense(void *ctx, int iter) {
  (void)iter;
  msa_ctx *c = ctx;
  gpu->ops->attention(gpu, c->q, c->nh, &c->kv, c->pos, c->T, NULL, 0, c->out);
}

static void bench_msa(int len, double copy_gbs, FILE *table) {
  const int bs = 128, nkv = 4, hd = 128, ihd = 128, nh = 64;
  msa_ctx c;
  memset(&c, 0, sizeof c);
  c.nh = nh, c.G = nkv;
  c.p = (m3_msa_params){16, 1, 0};
  int blocks = (len + bs - 1) / bs;
  int32_t *table_h = malloc((size_t)blocks * 4);
  for (int b = 0; b < blocks; b++) table_h[b] = b;
  for (int b = blocks - 1; b > 0; b--) { /* shuffled pages */
    int j = (int)(rnd() % (uint32_t)(b + 1));
    int32_t tmp = table_h[b];
    table_h[b] = table_h[j], table_h[j] = tmp;
  }
  int32_t *table_d = gpu->ops->alloc(gpu, (size_t)blocks * 4);
  must(gpu->ops->to_device(gpu, table_d, table_h, (size_t)blocks * 4), "to_device");
  size_t kvn = (size_t)blocks * nkv * bs * hd;
  c.kv = (m3_kv_view){device_random(M3_DT_F32, kvn * 4), device_random(M3_DT_F32, kvn * 4),
                      device_random(M3_DT_F32, (size_t)blocks * bs * ihd * 4), table_d, blocks, bs,
                      nkv, hd, ihd};
  int32_t pos_h[16];
  c.q = device_random(M3_DT_F32, (size_t)16 * nh * hd * 4);
  c.iq = device_random(M3_DT_F32, (size_t)16 * nkv * ihd * 4);
  c.out = gpu->ops->alloc(gpu, (size_t)16 * nh * hd * 4);
  c.sel = gpu->ops->alloc(gpu, (size_t)16 * nkv * c.p.topk * 4);
  c.pos = gpu->ops->alloc(gpu, sizeof pos_h);
  static const int Ts[] = {1, 16};
  for (int i = 0; i < 2; i++) {
    c.T = Ts[i];
    for (int t = 0; t < c.T; t++) pos_h[t] = len - c.T + t; /* the last T positions */
    must(gpu->ops->to_device(gpu, c.pos, pos_h, sizeof pos_h), "to_device");
    double ts = time_call(run_select, &c, 20), ta = time_call(run_sparse, &c, 20);
    double td = time_call(run_dense, &c, len > 40000 ? 3 : 20);
    double scan = (double)len * ihd * 4 * c.T; /* index keys read per call, fp32 */
    fprintf(table, "| MSA decode ctx %d T=%d | select %.1f us (index scan %.0f GB/s = %.0f%% of copy) "
            "+ sparse attention %.1f us = %.1f us | dense attention %.1f us |\n",
            len, c.T, ts * 1e6, scan / ts / 1e9, 100.0 * scan / ts / 1e9 / copy_gbs, ta * 1e6,
            (ts + ta) * 1e6, td * 1e6);
    fflush(table);
  }
  gpu->ops->free(gpu, c.kv.k), gpu->ops->free(gpu, c.kv.v), gpu->ops->free(gpu, c.kv.ik);
  gpu->ops->free(gpu, table_d), gpu->ops->free(gpu, c.q), gpu->ops->free(gpu, c.iq);
  gpu->ops->free(gpu, c.out), gpu->ops->free(gpu, c.sel), gpu->ops->free(gpu, c.pos);
  free(table_h);
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
  static const int decode_T[] = {1, 8}, prefill_T[] = {2048};
  static const struct {
    const char *label;
    int64_t rows, cols;
  } shapes[] = {{"q_proj", 8192, 6144}, {"o_proj", 6144, 8192}, {"expert w1", 3072, 6144},
                {"lm_head", 200064, 6144}};
  for (int s = 0; s < 4; s++)
    for (int mx = 0; mx < 2; mx++)
      bench_matmul(shapes[s].label, shapes[s].rows, shapes[s].cols, mx, decode_T, 2, copy_gbs, table);
  bench_matmul("q_proj", 8192, 6144, 0, prefill_T, 1, copy_gbs, table);
  bench_matmul("q_proj", 8192, 6144, 1, prefill_T, 1, copy_gbs, table);
  static const int contexts[] = {2048, 32768, 131072};
  for (int i = 0; i < 3; i++) bench_msa(contexts[i], copy_gbs, table);
  gpu->ops->destroy(gpu);
  if (table != stdout) fclose(table);
  return 0;
}
