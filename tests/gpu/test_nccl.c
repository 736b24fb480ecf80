/* test_nccl: the NCCL collectives (src/backend/cuda/collectives.h) on every visible GPU, one thread
 * and one CUDA backend per GPU as the engine runs them, against host references:
 *   all-reduce   float32 sums of random values of many exponents (so that a + b rounds), sizes
 *                1 .. 16M: with 2 ranks bit-equal to the host's float a + b, with more within
 *                (ranks - 1) roundings of the float64 sum; issued per thread and, once, by one
 *                thread for all ranks in a group;
 *   all-gather   every rank's part in its place, out of place and in place (bits);
 *   broadcast    root 0 and the last rank (bits);
 *   TP matmul    the row-split matmul of the model: rank r multiplies its slice of x's columns
 *                by the same slice of W's columns through the backend's matmul, then all-reduce;
 *                against the single-GPU matmul of the whole W (F32 and BF16 weights, 1 to 200
 *                tokens): inputs in eighths, whose sums are exact in any order, must match it and
 *                the host's exact sum bit for bit; uniform inputs within the float32 rounding
 *                bound of both summations;
 *   errors       bad arguments are refused with a message naming the operation; a collective
 *                that only one rank issues fails m3_nccl_wait at its deadline (aborted, no hang).
 * Then the bus bandwidth of all-reduce at the sizes of a decode step, NCCL against the
 * peer-to-peer all-reduce (src/backend/cuda/p2p.h, checked by test_p2p), alone and with the add +
 * norm that follow it in the model (a table for bench/RESULTS.md). scripts/gpu-multi.sh runs it; not a CTest test (CI has no GPU). Prints SKIP
 * and exits 77 with fewer than 2 GPUs; exits 1 on any failure. */
#include <cuda_runtime_api.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend/backend.h"
#include "backend/cuda/collectives.h"
#include "backend/cuda/p2p.h"
#include "base/dtype.h"
#include "test_values.h"

enum { MAX_RANKS = 16, WAIT_MS = 30000, ABORT_WAIT_MS = 2000 };

typedef struct {
  int rank;
  m3_backend *be;
  m3_nccl *comm;
  m3_nccl *peer_abort_comm; /* test_abort_from_peer's communicator */
  m3_p2p *p2p;              /* on p2p_group */
  pthread_t thread;
  float *result; /* the TP matmul's output, for rank 0 to compare */
} rank_ctx;

static int nranks;
static rank_ctx ranks[MAX_RANKS];
static m3_nccl_id id;
static m3_p2p_group *p2p_group;
static pthread_barrier_t barrier;
static int setup_failed;

static void sync_ranks(void) { pthread_barrier_wait(&barrier); }

static void must(const rank_ctx *r, m3_status st, const char *what) { test_must(r->rank, st, what); }

static void *must_alloc(const rank_ctx *r, size_t bytes) {
  return test_must_alloc(r->rank, r->be, bytes);
}

/* Names a case on stderr before it runs: a hang on the GPU machine then shows which. */
static void progress(const rank_ctx *r, const char *what, size_t n) {
  if (r->rank == 0) fprintf(stderr, "   %s %zu\n", what, n);
}

/* ---- results ---- */

enum {
  C_ALL_REDUCE, C_ALL_REDUCE_GROUPED, C_ALL_GATHER, C_ALL_GATHER_IN_PLACE, C_BROADCAST,
  C_TP_EXACT, C_TP_ROUNDED, C_ERRORS, C_COUNT
};

typedef struct {
  const char *name, *criterion;
  int cases, failed;
  double worst; /* the worst error over its tolerance (0 for bit checks that passed) */
} check_row;

static check_row checks[C_COUNT] = {
    [C_ALL_REDUCE] = {"all_reduce_sum", "2 ranks: bits of a+b; else rounding bound", 0, 0, 0},
    [C_ALL_REDUCE_GROUPED] = {"all_reduce_sum, one thread, group", "as above", 0, 0, 0},
    [C_ALL_GATHER] = {"all_gather", "bits", 0, 0, 0},
    [C_ALL_GATHER_IN_PLACE] = {"all_gather in place", "bits", 0, 0, 0},
    [C_BROADCAST] = {"broadcast", "bits", 0, 0, 0},
    [C_TP_EXACT] = {"TP matmul + all-reduce, exact inputs", "bits of 1-GPU and host", 0, 0, 0},
    [C_TP_ROUNDED] = {"TP matmul + all-reduce, uniform inputs", "fp32 summation bound", 0, 0, 0},
    [C_ERRORS] = {"bad arguments refused", "status + message", 0, 0, 0},
};
static pthread_mutex_t rows_lock = PTHREAD_MUTEX_INITIALIZER;

/* err_over_tol: the case's worst error divided by its tolerance; a case fails above 1. */
static void record(int check, int failed, double err_over_tol) {
  pthread_mutex_lock(&rows_lock);
  checks[check].cases++;
  checks[check].failed += failed != 0;
  if (err_over_tol > checks[check].worst) checks[check].worst = err_over_tol;
  pthread_mutex_unlock(&rows_lock);
}



/* ---- all-reduce ---- */

static const size_t reduce_sizes[] = {1, 1000, 6144, 64 * 6144, 16u << 20};

/* got[i] against the ranks' spread_value(salt, k, i): the worst error over its bound. 2 ranks:
 * NCCL adds the two once, so the bits are the host's float a + b; more ranks: any order, within
 * (ranks - 1) float32 roundings of the float64 sum. */
static double reduce_error(const float *got, size_t n, uint64_t salt) {
  double worst = 0;
  for (size_t i = 0; i < n; i++) {
    if (nranks == 2) {
      float want = spread_value(salt, 0, i) + spread_value(salt, 1, i);
      if (!same_bits(got[i], want)) return INFINITY;
      continue;
    }
    double sum = 0, mag = 0;
    for (int k = 0; k < nranks; k++) {
      float v = spread_value(salt, k, i);
      sum += v;
      mag += fabs(v);
    }
    double gamma = (nranks - 1) * 0x1p-24 / (1 - (nranks - 1) * 0x1p-24);
    double e = fabs((double)got[i] - sum) / (gamma * mag);
    if (!(e <= worst)) worst = e; /* NaN counts */
  }
  return worst;
}

static void test_all_reduce(rank_ctx *r) {
  for (size_t s = 0; s < sizeof reduce_sizes / sizeof reduce_sizes[0]; s++) {
    size_t n = reduce_sizes[s];
    uint64_t salt = 100 + s;
    progress(r, "all_reduce_sum", n);
    float *h = test_host_alloc(n * sizeof(float)), *d = must_alloc(r, n * sizeof(float));
    fill_spread(h, n, salt, r->rank);
    must(r, r->be->ops->to_device(r->be, d, h, n * sizeof(float)), "to_device");
    must(r, m3_nccl_all_reduce_sum(r->comm, d, n), "all_reduce_sum");
    must(r, m3_nccl_wait(r->comm, WAIT_MS), "wait after all_reduce_sum");
    must(r, r->be->ops->to_host(r->be, h, d, n * sizeof(float)), "to_host");
    double e = reduce_error(h, n, salt);
    record(C_ALL_REDUCE, !(e <= 1), e);
    r->be->ops->free(r->be, d);
    free(h);
  }
}

/* Rank 0's thread issues every rank's all-reduce inside one group (a thread that drives several
 * GPUs); the buffers are each rank's own, filled and checked by its thread. */
static float *grouped_bufs[MAX_RANKS];

static void test_all_reduce_grouped(rank_ctx *r) {
  const size_t n = 6144;
  const uint64_t salt = 200;
  progress(r, "all_reduce_sum grouped", n);
  float *h = test_host_alloc(n * sizeof(float));
  grouped_bufs[r->rank] = must_alloc(r, n * sizeof(float));
  fill_spread(h, n, salt, r->rank);
  must(r, r->be->ops->to_device(r->be, grouped_bufs[r->rank], h, n * sizeof(float)), "to_device");
  sync_ranks(); /* rank 0's calls queue behind the upload on each rank's stream */
  if (r->rank == 0) {
    must(r, m3_nccl_group_begin(), "group_begin");
    for (int k = 0; k < nranks; k++)
      must(r, m3_nccl_all_reduce_sum(ranks[k].comm, grouped_bufs[k], n), "grouped all_reduce_sum");
    must(r, m3_nccl_group_end(), "group_end");
  }
  sync_ranks();
  must(r, m3_nccl_wait(r->comm, WAIT_MS), "wait after the grouped all_reduce_sum");
  must(r, r->be->ops->to_host(r->be, h, grouped_bufs[r->rank], n * sizeof(float)), "to_host");
  double e = reduce_error(h, n, salt);
  record(C_ALL_REDUCE_GROUPED, !(e <= 1), e);
  r->be->ops->free(r->be, grouped_bufs[r->rank]);
  free(h);
}

/* ---- all-gather and broadcast ---- */

/* all[k * n + i] must hold rank k's spread_value(salt, k, i). */
static int gathered_ok(const float *all, size_t n, uint64_t salt) {
  for (int k = 0; k < nranks; k++)
    for (size_t i = 0; i < n; i++)
      if (!same_bits(all[(size_t)k * n + i], spread_value(salt, k, i))) return 0;
  return 1;
}

static void test_all_gather(rank_ctx *r) {
  static const size_t sizes[] = {1, 1000, 6144, 64 * 6144};
  for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
    for (int in_place = 0; in_place < 2; in_place++) {
      size_t n = sizes[s], bytes = n * sizeof(float);
      uint64_t salt = 300 + s;
      progress(r, in_place ? "all_gather in place" : "all_gather", n);
      float *h = test_host_alloc(bytes * (size_t)nranks);
      float *all = must_alloc(r, bytes * (size_t)nranks);
      float *part = in_place ? all + (size_t)r->rank * n : must_alloc(r, bytes);
      /* the output's other parts hold garbage (this rank's values) until the gather fills them */
      for (int k = 0; k < nranks; k++) fill_spread(h + (size_t)k * n, n, salt, r->rank);
      must(r, r->be->ops->to_device(r->be, all, h, bytes * (size_t)nranks), "to_device");
      if (!in_place) must(r, r->be->ops->to_device(r->be, part, h, bytes), "to_device");
      must(r, m3_nccl_all_gather(r->comm, part, all, bytes), "all_gather");
      must(r, m3_nccl_wait(r->comm, WAIT_MS), "wait after all_gather");
      must(r, r->be->ops->to_host(r->be, h, all, bytes * (size_t)nranks), "to_host");
      int ok = gathered_ok(h, n, salt);
      record(in_place ? C_ALL_GATHER_IN_PLACE : C_ALL_GATHER, !ok, ok ? 0 : INFINITY);
      if (!in_place) r->be->ops->free(r->be, part);
      r->be->ops->free(r->be, all);
      free(h);
    }
  }
}

static void test_broadcast(rank_ctx *r) {
  static const size_t sizes[] = {1, 64 * 6144};
  const int roots[2] = {0, nranks - 1};
  for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
    for (int j = 0; j < 2; j++) {
      size_t n = sizes[s], bytes = n * sizeof(float);
      uint64_t salt = 400 + s;
      progress(r, "broadcast", n);
      float *h = test_host_alloc(bytes), *d = must_alloc(r, bytes);
      fill_spread(h, n, salt, r->rank);
      must(r, r->be->ops->to_device(r->be, d, h, bytes), "to_device");
      must(r, m3_nccl_broadcast(r->comm, d, bytes, roots[j]), "broadcast");
      must(r, m3_nccl_wait(r->comm, WAIT_MS), "wait after broadcast");
      must(r, r->be->ops->to_host(r->be, h, d, bytes), "to_host");
      int ok = 1;
      for (size_t i = 0; i < n && ok; i++) ok = same_bits(h[i], spread_value(salt, roots[j], i));
      record(C_BROADCAST, !ok, ok ? 0 : INFINITY);
      r->be->ops->free(r->be, d);
      free(h);
    }
  }
}

/* ---- the tensor-parallel matmul ---- */

/* y [T, N] = x [T, K] . W^T, W [N, K] (a down or o projection). Rank r holds the columns
 * [K r / ranks, K (r + 1) / ranks) of W and multiplies the same columns of x; the all-reduce sums
 * the partial products: the model's row-parallel layer. */
enum { TP_K = 6144, TP_N = 256 };

typedef float (*value_fn)(uint64_t salt, int stream, size_t i);

static int col_begin(int rank) { return (int)((int64_t)TP_K * rank / nranks); }

/* W's columns [c0, c1) as a prepared weight of `dtype` (F32 or BF16) on r's backend. */
static m3_tensor tp_weight(rank_ctx *r, m3_dtype dtype, value_fn f, uint64_t salt, int c0, int c1,
                           void **host) {
  size_t cols = (size_t)(c1 - c0), n = (size_t)TP_N * cols;
  void *h = test_host_alloc(n * 4);
  for (size_t row = 0; row < TP_N; row++)
    for (size_t c = 0; c < cols; c++) {
      float v = f(salt, 1, row * TP_K + (size_t)c0 + c);
      if (dtype == M3_DT_BF16)
        ((uint16_t *)h)[row * cols + c] = m3_f32_to_bf16(v);
      else
        ((float *)h)[row * cols + c] = v;
    }
  m3_tensor t;
  memset(&t, 0, sizeof t);
  t.name = "tp.weight";
  t.data = h;
  t.dtype = dtype;
  t.rows = TP_N;
  t.cols = (int64_t)cols;
  t.quant = M3_WQ_NONE;
  must(r, r->be->ops->prepare_tensor(r->be, &t), "prepare_tensor");
  *host = h;
  return t;
}

/* x's columns [c0, c1) of T tokens, uploaded. */
static float *tp_input(rank_ctx *r, value_fn f, uint64_t salt, int T, int c0, int c1) {
  size_t cols = (size_t)(c1 - c0), bytes = (size_t)T * cols * sizeof(float);
  float *h = test_host_alloc(bytes), *d = must_alloc(r, bytes);
  for (size_t t = 0; t < (size_t)T; t++)
    for (size_t c = 0; c < cols; c++) h[t * cols + c] = f(salt, 2, t * TP_K + (size_t)c0 + c);
  must(r, r->be->ops->to_device(r->be, d, h, bytes), "to_device");
  free(h);
  return d;
}

/* The whole W as the backend reads it (BF16 rounds it) and the whole x, in float64. */
static double *host_matrix(int rows, m3_dtype dtype, value_fn f, uint64_t salt, int stream) {
  double *m = test_host_alloc((size_t)rows * TP_K * sizeof(double));
  for (size_t i = 0; i < (size_t)rows * TP_K; i++) {
    float v = f(salt, stream, i);
    m[i] = dtype == M3_DT_BF16 ? (double)m3_bf16_to_f32(m3_f32_to_bf16(v)) : (double)v;
  }
  return m;
}

/* Rank 0, once every rank's result is in: each rank's all-reduced y against the single-GPU y.
 * exact: eighths, so both are the exact sum (host float64, exact too) to the bit. Otherwise each
 * of the two results is within gamma of its summation count (K products, or 2K with x as BF16
 * hi + lo, plus the ranks' sum) times sum |x||w| of the exact value, so they differ by at most
 * the sum of the two bounds; BF16 rounding of x (hi, or hi + lo) scales |x| by under 1 + 2^-6. */
static void tp_compare(const float *single, m3_dtype dtype, value_fn f, uint64_t salt, int T,
                       int exact) {
  double worst = 0;
  int failed = 0;
  double *xs = host_matrix(T, M3_DT_F32, f, salt, 2), *ws = host_matrix(TP_N, dtype, f, salt, 1);
  for (int t = 0; t < T; t++)
    for (int row = 0; row < TP_N; row++) {
      const double *x = xs + (size_t)t * TP_K, *w = ws + (size_t)row * TP_K;
      double sum = 0, mag = 0;
      for (int c = 0; c < TP_K; c++) {
        sum += x[c] * w[c];
        mag += fabs(x[c] * w[c]);
      }
      double tol = (2.0 * (2 * TP_K) + nranks) * 0x1p-24 * mag * (1 + 0x1p-6);
      size_t at = (size_t)t * TP_N + (size_t)row;
      if (exact && !same_bits(single[at], (float)sum)) failed = 1;
      for (int k = 0; k < nranks; k++) {
        float got = ranks[k].result[at];
        if (exact) {
          if (!same_bits(got, single[at])) failed = 1;
        } else {
          double e = fabs((double)got - (double)single[at]) / tol;
          if (!(e <= worst)) worst = e;
          if (!same_bits(got, ranks[0].result[at])) failed = 1; /* every rank holds one result */
        }
      }
    }
  free(xs);
  free(ws);
  if (failed) worst = INFINITY;
  record(exact ? C_TP_EXACT : C_TP_ROUNDED, !(worst <= 1), worst);
}

static void test_tp_matmul(rank_ctx *r) {
  static const int tokens[] = {1, 4, 64, 200};
  static const m3_dtype dtypes[] = {M3_DT_F32, M3_DT_BF16};
  const int c0 = col_begin(r->rank), c1 = col_begin(r->rank + 1);
  for (int di = 0; di < 2; di++)
    for (int exact = 1; exact >= 0; exact--)
      for (size_t ti = 0; ti < sizeof tokens / sizeof tokens[0]; ti++) {
        const int T = tokens[ti];
        const m3_dtype dtype = dtypes[di];
        const value_fn f = exact ? eighth_value : uniform_value;
        const uint64_t salt = 500 + 10 * (uint64_t)di + 2 * ti + (uint64_t)exact;
        const size_t ybytes = (size_t)T * TP_N * sizeof(float);
        progress(r, dtype == M3_DT_BF16 ? "TP matmul bf16, tokens" : "TP matmul f32, tokens",
                 (size_t)T);
        void *wh;
        m3_tensor w = tp_weight(r, dtype, f, salt, c0, c1, &wh);
        float *x = tp_input(r, f, salt, T, c0, c1), *y = must_alloc(r, ybytes);
        r->be->ops->matmul(r->be, &w, x, T, y);
        must(r, m3_nccl_all_reduce_sum(r->comm, y, (size_t)T * TP_N), "all_reduce_sum of y");
        must(r, m3_nccl_wait(r->comm, WAIT_MS), "wait after the TP matmul");
        r->result = test_host_alloc(ybytes);
        must(r, r->be->ops->to_host(r->be, r->result, y, ybytes), "to_host");
        float *single = NULL;
        if (r->rank == 0) { /* the whole matmul on one GPU */
          void *fh;
          m3_tensor full = tp_weight(r, dtype, f, salt, 0, TP_K, &fh);
          float *xf = tp_input(r, f, salt, T, 0, TP_K);
          r->be->ops->matmul(r->be, &full, xf, T, y);
          single = test_host_alloc(ybytes);
          must(r, r->be->ops->to_host(r->be, single, y, ybytes), "to_host (single GPU)");
          r->be->ops->release_tensor(r->be, &full);
          r->be->ops->free(r->be, xf);
          free(fh);
        }
        sync_ranks();
        if (r->rank == 0) tp_compare(single, dtype, f, salt, T, exact);
        sync_ranks();
        free(single);
        free(r->result);
        r->result = NULL;
        r->be->ops->release_tensor(r->be, &w);
        r->be->ops->free(r->be, x);
        r->be->ops->free(r->be, y);
        free(wh);
      }
}

/* ---- refusals ---- */

static void expect_refusal(m3_status st, const char *needle) {
  int ok = st == M3_ERR_ARG && strstr(m3_last_error(), needle) != NULL;
  if (!ok) fprintf(stderr, "FAIL: expected a refusal naming '%s', got status %d: %s\n", needle,
                   (int)st, m3_last_error());
  record(C_ERRORS, !ok, ok ? 0 : INFINITY);
}

static void test_refusals(rank_ctx *r) {
  float *d = must_alloc(r, sizeof(float));
  expect_refusal(m3_nccl_broadcast(r->comm, d, sizeof(float), nranks), "broadcast");
  expect_refusal(m3_nccl_broadcast(r->comm, d, sizeof(float), -1), "root -1");
  expect_refusal(m3_nccl_wait(r->comm, 0), "wait");
  m3_nccl *none = NULL;
  expect_refusal(m3_nccl_init(&id, nranks, nranks, r->be, &none), "out of range");
  r->be->ops->free(r->be, d);
}

/* ---- the peer-to-peer all-reduce ---- */

/* ---- all-reduce timings ---- */

/* What a timed call issues: an all-reduce through NCCL or peer to peer, alone or with the add
 * and norm that follow it in the model (rows of BENCH_H). */
typedef enum { BENCH_NCCL, BENCH_P2P, BENCH_NCCL_NORM, BENCH_P2P_NORM, BENCH_KINDS } bench_kind;
enum { BENCH_H = 6144 };

static void bench_issue(rank_ctx *r, bench_kind kind, float *d, float *x, float *out,
                        const m3_tensor *norm, size_t n) {
  const int rows = (int)(n / BENCH_H);
  if (kind == BENCH_P2P) must(r, m3_p2p_all_reduce_sum(r->p2p, d, n), "p2p all_reduce_sum");
  if (kind == BENCH_P2P_NORM)
    must(r, m3_p2p_add_norm(r->p2p, d, x, norm, 1e-6f, rows, BENCH_H, out), "p2p add_norm");
  if (kind == BENCH_NCCL || kind == BENCH_NCCL_NORM)
    must(r, m3_nccl_all_reduce_sum(r->comm, d, n), "all_reduce_sum");
  if (kind == BENCH_NCCL_NORM) r->be->ops->add_rmsnorm(r->be, x, d, norm, 1e-6f, rows, BENCH_H, out);
}

/* Host wall time per call of `kind`, the slowest rank's, after a warm-up. */
static double bench_time(rank_ctx *r, bench_kind kind, float *d, float *x, float *out,
                         const m3_tensor *norm, size_t n, int iters) {
  float probe;
  for (int i = 0; i < 5; i++) bench_issue(r, kind, d, x, out, norm, n);
  must(r, r->be->ops->to_host(r->be, &probe, d, sizeof probe), "wait after warm-up");
  sync_ranks();
  const double t0 = test_now_s();
  for (int i = 0; i < iters; i++) bench_issue(r, kind, d, x, out, norm, n);
  must(r, r->be->ops->to_host(r->be, &probe, d, sizeof probe), "wait after the timed calls");
  sync_ranks(); /* the slowest rank's finish ends the measurement */
  return (test_now_s() - t0) / iters;
}

static void bench_all_reduce(rank_ctx *r) {
  static const struct {
    const char *what;
    size_t n;
    int iters;
  } cases[] = {{"6144 x 1 (decode, batch 1)", BENCH_H, 500},
               {"6144 x 8 (decode, batch 8)", BENCH_H * 8, 500},
               {"6144 x 64 (decode, batch 64)", BENCH_H * 64, 200},
               {"64 MB", 16u << 20, 20}};
  if (r->rank == 0) {
    printf("\nall-reduce (float32, sum, in place), %d GPUs, issued per thread, host wall time "
           "per call in us (busbw GB/s); with the add + norm that follow it in the model:\n",
           nranks);
    printf("| size | NCCL | p2p | NCCL + add_rmsnorm | p2p add + norm |\n|---|---|---|---|---|\n");
  }
  void *norm_host = NULL;
  m3_tensor norm;
  must(r, test_norm_weight(r->be, BENCH_H, 700, &norm, &norm_host), "norm weight");
  for (size_t s = 0; s < sizeof cases / sizeof cases[0]; s++) {
    const size_t n = cases[s].n, bytes = n * sizeof(float);
    progress(r, "bench all-reduce", n);
    /* zeros: the sums and the norms stay zero however often they run */
    float *d = must_alloc(r, bytes), *x = must_alloc(r, bytes), *out = must_alloc(r, bytes);
    double us[BENCH_KINDS];
    for (int k = 0; k < BENCH_KINDS; k++) {
      const int norm_kind = k == BENCH_NCCL_NORM || k == BENCH_P2P_NORM;
      us[k] = norm_kind && n % BENCH_H ? NAN
              : bench_time(r, (bench_kind)k, d, x, out, &norm, n, cases[s].iters) * 1e6;
    }
    if (r->rank == 0) {
      const double busbw = (double)bytes * 2.0 * (nranks - 1) / nranks / 1e3;
      printf("| %s | %.1f (%.1f) | %.1f (%.1f) | %.1f | %.1f |\n", cases[s].what, us[BENCH_NCCL],
             busbw / us[BENCH_NCCL], us[BENCH_P2P], busbw / us[BENCH_P2P], us[BENCH_NCCL_NORM],
             us[BENCH_P2P_NORM]);
    }
    r->be->ops->free(r->be, d);
    r->be->ops->free(r->be, x);
    r->be->ops->free(r->be, out);
  }
  r->be->ops->release_tensor(r->be, &norm);
  free(norm_host);
}

/* ---- the missing peer ---- */

/* Rank 0 issues an all-reduce that no other rank joins (the size of one already run, so that
 * its connections exist and the call itself does not wait for peers): its wait must fail at the
 * deadline with the communicator aborted; the others then abort theirs, which must not wait. */
static int test_missing_peer(rank_ctx *r) {
  int ok = 1;
  if (r->rank == 0) {
    progress(r, "missing peer: wait deadline (ms)", ABORT_WAIT_MS);
    float *d = must_alloc(r, 6144 * sizeof(float));
    must(r, m3_nccl_all_reduce_sum(r->comm, d, 6144), "lone all_reduce_sum");
    double t0 = test_now_s();
    m3_status st = m3_nccl_wait(r->comm, ABORT_WAIT_MS);
    double waited = test_now_s() - t0;
    ok = st == M3_ERR_IO && strstr(m3_last_error(), "not done") != NULL;
    printf("\nmissing peer: wait returned after %.2f s: %s (%s)\n", waited, m3_last_error(),
           ok ? "PASS" : "FAIL: expected a deadline failure");
    ok = ok && m3_nccl_all_reduce_sum(r->comm, d, 6144) == M3_ERR_ARG; /* aborted: refused */
    r->be->ops->free(r->be, d);
  }
  sync_ranks();
  if (r->rank != 0) m3_nccl_abort(r->comm);
  return ok;
}

/* What engine/ranks.c does when a rank fails mid-step: rank 0 issues an all-reduce no rank joins
 * and waits on its stream (a blocking to_host, as for its logits); rank 1, on its own thread,
 * aborts rank 0's communicator. The wait must then return (well within WAIT_MS) and rank 0's
 * communicator refuse further calls. On a fresh communicator (the one above is aborted). */
static m3_nccl_id peer_abort_id;

static int test_abort_from_peer(rank_ctx *r) {
  int ok = 1;
  if (r->rank == 0 && m3_nccl_new_id(&peer_abort_id) != M3_OK) setup_failed = 1;
  sync_ranks();
  if (setup_failed) return 0;
  must(r, m3_nccl_init(&peer_abort_id, nranks, r->rank, r->be, &r->peer_abort_comm),
       "m3_nccl_init (abort from a peer)");
  /* One all-reduce together first: NCCL connects the ranks at a communicator's first
   * collective, which would otherwise wait inside the lone call below. */
  float *warm = must_alloc(r, 6144 * sizeof(float));
  must(r, m3_nccl_all_reduce_sum(r->peer_abort_comm, warm, 6144), "all_reduce_sum (connect)");
  must(r, m3_nccl_wait(r->peer_abort_comm, WAIT_MS), "wait (connect)");
  r->be->ops->free(r->be, warm);
  sync_ranks();
  if (r->rank == 0) {
    float *d = must_alloc(r, 6144 * sizeof(float)), host = 0.0f;
    must(r, m3_nccl_all_reduce_sum(r->peer_abort_comm, d, 6144), "lone all_reduce_sum");
    sync_ranks(); /* issued: rank 1 may abort it now */
    const double t0 = test_now_s();
    const m3_status st = r->be->ops->to_host(r->be, &host, d, sizeof host);
    const double waited = test_now_s() - t0;
    ok = waited < WAIT_MS / 1000.0 &&
         m3_nccl_all_reduce_sum(r->peer_abort_comm, d, 6144) == M3_ERR_ARG;
    printf("abort from a peer's thread: rank 0's wait on its stream returned after %.2f s (%s), "
           "later calls refused: %s\n", waited, st == M3_OK ? "ok" : m3_last_error(),
           ok ? "PASS" : "FAIL");
    r->be->ops->free(r->be, d);
  } else {
    sync_ranks();
    if (r->rank == 1) {
      struct timespec nap = {0, 300 * 1000 * 1000}; /* rank 0 is in its wait by then */
      nanosleep(&nap, NULL);
      m3_nccl_abort(ranks[0].peer_abort_comm);
    }
  }
  sync_ranks();
  m3_nccl_abort(r->peer_abort_comm);
  m3_nccl_destroy(r->peer_abort_comm);
  return ok;
}

static int missing_peer_ok = 1;

static void *rank_main(void *arg) {
  rank_ctx *r = arg;
  m3_status st = m3_backend_cuda_create(r->rank, &r->be);
  if (st != M3_OK) {
    fprintf(stderr, "FATAL: rank %d: cuda backend: %s\n", r->rank, m3_last_error());
    setup_failed = 1;
  }
  sync_ranks(); /* init blocks until every rank calls it: only when all backends exist */
  if (setup_failed) return NULL;
  must(r, m3_nccl_init(&id, nranks, r->rank, r->be, &r->comm), "m3_nccl_init");
  test_all_reduce(r);
  sync_ranks();
  test_all_reduce_grouped(r);
  sync_ranks();
  test_all_gather(r);
  sync_ranks();
  test_broadcast(r);
  sync_ranks();
  test_tp_matmul(r);
  sync_ranks();
  test_refusals(r);
  sync_ranks();
  must(r, m3_p2p_join(p2p_group, r->rank, r->be, &r->p2p), "m3_p2p_join");
  sync_ranks();
  must(r, m3_p2p_connect(r->p2p), "m3_p2p_connect");
  sync_ranks();
  bench_all_reduce(r);
  sync_ranks();
  if (r->rank == 0) { /* the table before the one case that stops a communicator */
    printf("\n%-42s %6s %6s %12s  %s\n", "check", "cases", "failed", "worst/tol", "criterion");
    for (int i = 0; i < C_COUNT; i++)
      printf("%-42s %6d %6d %12.3g  %s  %s\n", checks[i].name, checks[i].cases, checks[i].failed,
             checks[i].worst, checks[i].criterion,
             checks[i].failed || !checks[i].cases ? "FAIL" : "PASS");
  }
  if (!test_missing_peer(r)) missing_peer_ok = 0;
  if (!test_abort_from_peer(r)) missing_peer_ok = 0;
  m3_p2p_leave(r->p2p);
  m3_nccl_destroy(r->comm);
  r->be->ops->destroy(r->be);
  return NULL;
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count < 2) {
    printf("SKIP: test_nccl needs 2 or more GPUs; found %d (%s)\n", e == cudaSuccess ? count : 0,
           cudaGetErrorString(e));
    return 77;
  }
  nranks = count < M3_P2P_MAX_RANKS ? count : M3_P2P_MAX_RANKS; /* every rank in the p2p group */
  const char *nvls = getenv("NCCL_NVLS_ENABLE");
  if (m3_nccl_new_id(&id) != M3_OK) {
    fprintf(stderr, "FATAL: %s\n", m3_last_error());
    return 1;
  }
  const char *nvls_now = getenv("NCCL_NVLS_ENABLE");
  printf("test_nccl: %d GPUs, one thread each; NCCL_NVLS_ENABLE=%s (%s before the first NCCL "
         "call)\n", nranks, nvls_now ? nvls_now : "(unset)", nvls ? "set" : "unset");
  pthread_barrier_init(&barrier, NULL, (unsigned)nranks);
  if (m3_p2p_group_create(nranks, &p2p_group) != M3_OK) {
    fprintf(stderr, "FATAL: %s\n", m3_last_error());
    return 1;
  }
  for (int i = 0; i < nranks; i++) {
    ranks[i].rank = i;
    if (pthread_create(&ranks[i].thread, NULL, rank_main, &ranks[i]) != 0) {
      fprintf(stderr, "FATAL: pthread_create\n");
      return 1;
    }
  }
  for (int i = 0; i < nranks; i++) pthread_join(ranks[i].thread, NULL);
  m3_p2p_group_free(p2p_group);
  if (setup_failed) return 1;
  int ok = missing_peer_ok && nvls_now && strcmp(nvls_now, "0") == 0;
  for (int i = 0; i < C_COUNT; i++) ok &= checks[i].failed == 0 && checks[i].cases > 0;
  printf("%s\n", ok ? "ALL PASS" : "FAILURES");
  return ok ? 0 : 1;
}
