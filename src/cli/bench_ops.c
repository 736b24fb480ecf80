/* m3 bench ops: throughput of the CPU kernels against the machine's own copy bandwidth.
 *
 * Prints the memcpy bandwidth over buffers far larger than the last-level cache (all threads),
 * the GEMV (T = 1, decode) bandwidth for every weight dtype over a matrix larger than the cache,
 * and the GEMM (prefill) rate at T = 64 and 256, each with 1 thread and with all threads. Decode
 * is memory-bound, so the figure to watch is GEMV bandwidth as a fraction of copy bandwidth.
 * Last, one decode token of full-size sparse and dense attention at 4K and 32K context. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu.h"
#include "base/dtype.h"
#include "base/threadpool.h"
#include "cli/bench.h"
#include "cli/commands.h"

static uint64_t bench_rng = 88172645463325252ull;
static uint32_t bench_rand(void) {
  bench_rng ^= bench_rng << 13;
  bench_rng ^= bench_rng >> 7;
  bench_rng ^= bench_rng << 17;
  return (uint32_t)(bench_rng >> 16);
}

typedef struct {
  char *dst;
  const char *src;
} copy_job;

static void copy_range(void *ctx, int64_t b, int64_t e, int worker) {
  (void)worker;
  const copy_job *job = ctx;
  memcpy(job->dst + b, job->src + b, (size_t)(e - b));
}

typedef struct {
  const uint64_t *src;
  uint64_t sums[64]; /* one per worker, so the reads cannot be optimized away */
} read_job;

static void read_range(void *ctx, int64_t b, int64_t e, int worker) {
  read_job *job = ctx;
  uint64_t s = 0;
  for (int64_t i = b; i < e; i++) s += job->src[i];
  job->sums[worker & 63] += s;
}

double m3_bench_read_bandwidth(m3_threadpool *pool, size_t bytes, int reps) {
  uint64_t *src = malloc(bytes);
  if (!src) return 0;
  memset(src, 1, bytes);
  read_job job = {src, {0}};
  double best = 1e30;
  for (int r = 0; r < reps; r++) {
    double t0 = m3_bench_seconds();
    m3_parallel_for(pool, (int64_t)(bytes / 8), 0, read_range, &job);
    double dt = m3_bench_seconds() - t0;
    if (dt < best) best = dt;
  }
  free(src);
  return job.sums[0] == 0 ? 0 : (double)bytes / best / 1e9;
}

double m3_bench_copy_bandwidth(m3_threadpool *pool, size_t bytes, int reps) {
  char *src = malloc(bytes), *dst = malloc(bytes);
  if (!src || !dst) {
    free(src);
    free(dst);
    return 0;
  }
  memset(src, 1, bytes);
  memset(dst, 2, bytes);
  copy_job job = {dst, src};
  double best = 1e30;
  for (int r = 0; r < reps; r++) {
    double t0 = m3_bench_seconds();
    m3_parallel_for(pool, (int64_t)bytes, 0, copy_range, &job);
    double dt = m3_bench_seconds() - t0;
    if (dt < best) best = dt;
  }
  free(src);
  free(dst);
  return 2.0 * (double)bytes / best / 1e9;
}

enum { B_F32, B_F16, B_BF16, B_MXFP8, B_FP8_BLOCK, B_KINDS };
static const char *const bench_kind_name[B_KINDS] = {"F32", "F16", "BF16", "MXFP8", "FP8-128"};

typedef struct {
  m3_tensor t;
  void *data, *scale;
  size_t bytes; /* weights plus scales: what one GEMV reads */
} bench_weight;

static int make_bench_weight(int kind, int64_t rows, int64_t cols, bench_weight *w) {
  memset(w, 0, sizeof *w);
  size_t n = (size_t)rows * (size_t)cols;
  w->t = (m3_tensor){.name = "bench", .rows = rows, .cols = cols};
  switch (kind) {
    case B_F32: w->t.dtype = M3_DT_F32; break;
    case B_F16: w->t.dtype = M3_DT_F16; break;
    case B_BF16: w->t.dtype = M3_DT_BF16; break;
    default: w->t.dtype = M3_DT_F8_E4M3; break;
  }
  size_t es = m3_dtype_size(w->t.dtype);
  uint8_t *d = malloc(n * es);
  if (!d) return -1;
  /* Random finite values: E4M3 bytes other than the NaN codes, F32/F16/BF16 in [-1, 1]. */
  for (size_t i = 0; i < n; i++) {
    float f = (float)(int)(bench_rand() % 2001 - 1000) / 1000.0f;
    if (kind == B_F32) memcpy(d + 4 * i, &f, 4);
    if (kind == B_F16 || kind == B_BF16) {
      uint16_t h = kind == B_F16 ? m3_f32_to_f16(f) : m3_f32_to_bf16(f);
      memcpy(d + 2 * i, &h, 2);
    }
    if (kind >= B_MXFP8) d[i] = (uint8_t)(bench_rand() % 0x7f) | (uint8_t)(bench_rand() & 0x80);
  }
  w->data = d;
  w->t.data = d;
  w->bytes = n * es;
  if (kind == B_MXFP8) {
    w->t.quant = M3_WQ_MXFP8;
    w->t.block_rows = 1, w->t.block_cols = 32;
  } else if (kind == B_FP8_BLOCK) {
    w->t.quant = M3_WQ_FP8_BLOCK;
    w->t.block_rows = 128, w->t.block_cols = 128;
  }
  if (kind >= B_MXFP8) {
    w->t.scale_rows = (rows + w->t.block_rows - 1) / w->t.block_rows;
    w->t.scale_cols = (cols + w->t.block_cols - 1) / w->t.block_cols;
    size_t ns = (size_t)(w->t.scale_rows * w->t.scale_cols);
    size_t ss = kind == B_MXFP8 ? 1 : 4;
    uint8_t *s = malloc(ns * ss);
    if (!s) return -1;
    for (size_t i = 0; i < ns; i++) {
      if (kind == B_MXFP8) s[i] = 118;
      else {
        float f = 1.0f / 512.0f;
        memcpy(s + 4 * i, &f, 4);
      }
    }
    w->scale = s;
    w->t.scale = s;
    w->bytes += ns * ss;
  }
  return 0;
}

/* Seconds per matmul: best over runs filling about `seconds`. */
static double time_matmul(m3_backend *be, const bench_weight *w, const float *x, int T, float *y,
                          double seconds) {
  be->ops->matmul(be, &w->t, x, T, y); /* warm-up: page faults, thread wake-up */
  double best = 1e30, start = m3_bench_seconds();
  for (int r = 0; r < 3 || m3_bench_seconds() - start < seconds; r++) {
    double t0 = m3_bench_seconds();
    be->ops->matmul(be, &w->t, x, T, y);
    double dt = m3_bench_seconds() - t0;
    if (dt < best) best = dt;
    if (r > 1000) break;
  }
  return best;
}

/* One decode token of the full-size attention (64 query heads, 4 KV heads of 128, index dim 128,
 * 128-token pages) at context L: MSA selection (top 16 blocks), sparse and dense attention. */
static void bench_attention(m3_backend *be, int L, double seconds) {
  const int nh = 64, nkv = 4, hd = 128, ihd = 128, bs = 128, topk = 16;
  int nb = (L + bs - 1) / bs;
  float *k = be->ops->alloc(be, (size_t)nb * nkv * bs * hd * sizeof(float)),
        *v = be->ops->alloc(be, (size_t)nb * nkv * bs * hd * sizeof(float)),
        *ik = be->ops->alloc(be, (size_t)nb * bs * ihd * sizeof(float));
  m3_kv_view kv = {k, v, ik, NULL, nb, bs, nkv, hd, ihd, M3_KV_F32};
  int32_t *table = malloc((size_t)nb * sizeof(int32_t)), sel[4 * 16];
  float *q = malloc((size_t)nh * hd * sizeof(float)), *out = malloc((size_t)nh * hd * sizeof(float));
  if (!k || !v || !ik || !table || !q || !out) {
    printf("  (out of memory at L = %d)\n", L);
  } else {
    for (int i = 0; i < nb; i++) table[i] = i;
    kv.block_table = table;
    for (size_t i = 0; i < (size_t)nb * nkv * bs * hd; i++)
      k[i] = v[i] = (float)(int)(bench_rand() % 2001 - 1000) / 1000.0f;
    for (size_t i = 0; i < (size_t)nb * bs * ihd; i++) ik[i] = k[i];
    for (int i = 0; i < nh * hd; i++) q[i] = k[i];
    int32_t pos = L - 1;
    m3_msa_params mp = {topk, 1, 0};
    double best[3] = {1e30, 1e30, 1e30}, start = m3_bench_seconds();
    for (int r = 0; r < 3 || m3_bench_seconds() - start < seconds; r++) {
      double t0 = m3_bench_seconds();
      be->ops->msa_select(be, q, nkv, &kv, &pos, 1, &mp, sel);
      double t1 = m3_bench_seconds();
      be->ops->attention(be, q, nh, &kv, &pos, 1, sel, topk, out);
      double t2 = m3_bench_seconds();
      be->ops->attention(be, q, nh, &kv, &pos, 1, NULL, 0, out);
      double t3 = m3_bench_seconds();
      double dt[3] = {t1 - t0, t2 - t1, t3 - t2};
      for (int i = 0; i < 3; i++)
        if (dt[i] < best[i]) best[i] = dt[i];
    }
    printf("  L = %-7d %10.3f %10.3f %10.3f\n", L, 1e3 * best[0], 1e3 * best[1], 1e3 * best[2]);
  }
  be->ops->free(be, k), be->ops->free(be, v), be->ops->free(be, ik);
  free(table), free(q), free(out);
}

static int usage_error(const char *msg) {
  fprintf(stderr, "m3 bench ops: %s\n", msg);
  return 2;
}

int m3_bench_ops(int argc, char **argv) {
  int64_t gemv_rows = 8192, gemv_cols = 8192, gemm_rows = 4096, gemm_cols = 4096;
  double seconds = 1.0;
  int threads = 0;
  for (int i = 1; i < argc; i += 2) {
    if (strcmp(argv[i], "--help") == 0) {
      printf("usage: m3 bench ops [--gemv ROWSxCOLS] [--gemm ROWSxCOLS] [--seconds S] [--threads N]\n"
             "CPU kernel throughput: copy bandwidth, GEMV bandwidth per weight dtype, GEMM\n"
             "GFLOP/s at T = 64 and 256, with 1 thread and with N threads (default: one per\n"
             "core). M3_CPU_ISA picks the kernel set (avx512, avx2, portable).\n");
      return 0;
    }
    if (i + 1 >= argc) return usage_error("missing value after an option");
    long long a, b;
    if (strcmp(argv[i], "--gemv") == 0 && sscanf(argv[i + 1], "%lldx%lld", &a, &b) == 2 && a > 0 && b > 0)
      gemv_rows = a, gemv_cols = b;
    else if (strcmp(argv[i], "--gemm") == 0 && sscanf(argv[i + 1], "%lldx%lld", &a, &b) == 2 && a > 0 && b > 0)
      gemm_rows = a, gemm_cols = b;
    else if (strcmp(argv[i], "--seconds") == 0 && (seconds = atof(argv[i + 1])) > 0)
      ;
    else if (strcmp(argv[i], "--threads") == 0 && (threads = atoi(argv[i + 1])) > 0)
      ;
    else
      return usage_error("bad option; see m3 bench ops --help");
  }

  m3_backend *be[2] = {NULL, NULL};
  m3_status st = m3_backend_cpu_create(1, &be[0]);
  if (st == M3_OK) st = m3_backend_cpu_create(threads, &be[1]);
  if (st != M3_OK) {
    if (be[0]) be[0]->ops->destroy(be[0]);
    return m3_cli_fail("bench ops", st);
  }
  int nthreads[2] = {1, m3_backend_cpu_threads(be[1])};
  printf("kernels: %s; threads: 1 and %d\n", m3_cpu_isa_name(m3_backend_cpu_isa(be[1])), nthreads[1]);

  for (int p = 0; p < 2; p++) {
    m3_threadpool *pool;
    if (m3_threadpool_create(nthreads[p], &pool) != M3_OK) continue;
    printf("copy %d thread%s: %.1f GB/s (read + write, 2 x 512 MiB buffers); read: %.1f GB/s\n",
           nthreads[p], nthreads[p] > 1 ? "s" : "", m3_bench_copy_bandwidth(pool, (size_t)512 << 20, 5),
           m3_bench_read_bandwidth(pool, (size_t)1 << 30, 5));
    m3_threadpool_destroy(pool);
  }

  int64_t xn = gemv_cols > gemm_cols ? gemv_cols : gemm_cols;
  int64_t yn = gemv_rows > gemm_rows ? gemv_rows : gemm_rows;
  float *x = malloc((size_t)256 * xn * sizeof(float)), *y = malloc((size_t)256 * yn * sizeof(float));
  if (!x || !y) {
    free(x), free(y);
    be[0]->ops->destroy(be[0]), be[1]->ops->destroy(be[1]);
    return m3_cli_fail("bench ops", m3_fail(M3_ERR_NOMEM, "out of memory"));
  }
  for (int64_t i = 0; i < 256 * xn; i++) x[i] = (float)(int)(bench_rand() % 2001 - 1000) / 1000.0f;

  printf("\nGEMV %lld x %lld (T = 1), GB/s of weights read:\n", (long long)gemv_rows,
         (long long)gemv_cols);
  printf("  %-8s %10s %10s\n", "dtype", "1 thread", "all");
  for (int kind = 0; kind < B_KINDS; kind++) {
    bench_weight w;
    if (make_bench_weight(kind, gemv_rows, gemv_cols, &w) != 0) continue;
    printf("  %-8s", bench_kind_name[kind]);
    for (int p = 0; p < 2; p++)
      printf(" %10.1f", (double)w.bytes / time_matmul(be[p], &w, x, 1, y, seconds) / 1e9);
    printf("\n");
    free(w.data), free(w.scale);
  }

  printf("\nGEMM %lld x %lld, GFLOP/s:\n", (long long)gemm_rows, (long long)gemm_cols);
  printf("  %-8s %10s %10s %10s %10s\n", "dtype", "T64 x1", "T64 all", "T256 x1", "T256 all");
  for (int kind = 0; kind < B_KINDS; kind++) {
    bench_weight w;
    if (make_bench_weight(kind, gemm_rows, gemm_cols, &w) != 0) continue;
    printf("  %-8s", bench_kind_name[kind]);
    for (int T = 64; T <= 256; T *= 4)
      for (int p = 0; p < 2; p++) {
        double flop = 2.0 * (double)T * (double)gemm_rows * (double)gemm_cols;
        printf(" %10.1f", flop / time_matmul(be[p], &w, x, T, y, seconds) / 1e9);
      }
    printf("\n");
    free(w.data), free(w.scale);
  }
  free(x), free(y);

  printf("\nOne decode token of full-size attention, all threads, ms (64 q / 4 kv heads x 128):\n");
  printf("  %-11s %10s %10s %10s\n", "context", "MSA select", "sparse", "dense");
  for (int L = 4096; L <= 32768; L *= 8) bench_attention(be[1], L, seconds);
  be[0]->ops->destroy(be[0]);
  be[1]->ops->destroy(be[1]);
  return 0;
}
