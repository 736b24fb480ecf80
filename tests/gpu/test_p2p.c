/* test_p2p: the peer-to-peer all-reduce (src/backend/cuda/p2p.h) with W = 2 and W = 4 ranks, one
 * thread and one CUDA backend each as the engine's ranks run, rank r on GPU r % GPUs: where there
 * are fewer GPUs than ranks, ranks share one (the whole check runs on a single GPU). Against host
 * references, bit for bit:
 *   sum        the host's float sum of the ranks' values in rank order (1 .. 3M floats, a ragged
 *              chunk, several launches);
 *   add + norm the backend's add_rmsnorm (or add) of x and that sum (1 to 200 rows, more than one
 *              launch's blocks; widths 6144, 1001, 16384);
 *   mixed      40 calls of alternating sizes and kinds, pushed and through staging (p2p.h's two
 *              protocols): every inbox and staging slot rewritten while launches of other shapes
 *              read it;
 *   graph      rank 0 records a sum and an add + norm into a CUDA graph and replays it, while
 *              the others issue the same calls directly;
 *   abort      rank 0 makes a call nobody joins; rank 1 aborts the group from its own thread:
 *              rank 0's stream wait returns, the group reports it, later calls are refused.
 * scripts/gpu.sh and scripts/gpu-multi.sh run it; not a CTest test (CI has no GPU). Exits 1 on
 * any failure. */
#include <cuda_runtime_api.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend/backend.h"
#include "backend/cuda/p2p.h"
#include "test_values.h"

typedef struct {
  int rank, gpu;
  m3_backend *be;
  m3_p2p *p2p;
  pthread_t thread;
} rank_ctx;

static int nranks;
static rank_ctx ranks[M3_P2P_MAX_RANKS];
static m3_p2p_group *p2p_group;
static pthread_barrier_t barrier;
static int setup_failed;

static void sync_ranks(void) { pthread_barrier_wait(&barrier); }

/* Before a rank issues calls. Where ranks share a GPU, an allocation, a free or a graph's
 * instantiation waits for every kernel on the device, and copies from pageable memory share the
 * device's staging buffers, so a rank's upload still queued behind a peer's read-back (itself
 * queued behind that peer's call, spinning for this rank's) never runs: every rank's memory is
 * made and its uploads done before any rank issues. (Ranks on GPUs of their own, as the engine
 * runs them, share none of this.) */
static void before_calls(void) {
  cudaDeviceSynchronize();
  sync_ranks();
}

static void must(const rank_ctx *r, m3_status st, const char *what) { test_must(r->rank, st, what); }

static void *must_alloc(const rank_ctx *r, size_t bytes) {
  return test_must_alloc(r->rank, r->be, bytes);
}

/* Names a case on stderr before it runs: a hang then shows which. */
static void progress(const rank_ctx *r, const char *what, size_t n) {
  if (r->rank == 0) fprintf(stderr, "   W %d: %s %zu\n", nranks, what, n);
}

enum { C_P2P_SUM, C_P2P_ADD_NORM, C_P2P_MIXED, C_P2P_GRAPH, C_COUNT };

typedef struct {
  const char *name, *criterion;
  int cases, failed;
} check_row;

static check_row checks[C_COUNT] = {
    [C_P2P_SUM] = {"all_reduce_sum", "bits of the rank-order sum", 0, 0},
    [C_P2P_ADD_NORM] = {"add + norm", "bits of that sum + add_rmsnorm", 0, 0},
    [C_P2P_MIXED] = {"alternating sizes and kinds", "bits, as above", 0, 0},
    [C_P2P_GRAPH] = {"rank 0 from a CUDA graph", "bits of the host's", 0, 0},
};
static pthread_mutex_t rows_lock = PTHREAD_MUTEX_INITIALIZER;

/* Every rank records its own cases. */
static void record(int check, int failed, double unused) {
  (void)unused;
  pthread_mutex_lock(&rows_lock);
  checks[check].cases++;
  checks[check].failed += failed != 0;
  pthread_mutex_unlock(&rows_lock);
}

/* ---- the checks ---- */

/* The host's float sum of the ranks' spread values in rank order: p2p's bits. */
static float rank_order_sum(uint64_t salt, size_t i) {
  float s = spread_value(salt, 0, i);
  for (int k = 1; k < nranks; k++) s += spread_value(salt, k, i);
  return s;
}

static float *upload(rank_ctx *r, const float *h, size_t n) {
  float *d = must_alloc(r, n * sizeof(float));
  must(r, r->be->ops->to_device(r->be, d, h, n * sizeof(float)), "to_device");
  return d;
}

static int same_device_bits(rank_ctx *r, const float *a, const float *b, size_t n) {
  float *ha = test_host_alloc(n * sizeof(float)), *hb = test_host_alloc(n * sizeof(float));
  must(r, r->be->ops->to_host(r->be, ha, a, n * sizeof(float)), "to_host");
  must(r, r->be->ops->to_host(r->be, hb, b, n * sizeof(float)), "to_host");
  const int same = memcmp(ha, hb, n * sizeof(float)) == 0;
  free(ha);
  free(hb);
  return same;
}

/* One p2p sum of the ranks' spread values (salt) over n floats: 1 when every rank got the bits of
 * the rank-order sum. */
static int p2p_sum_ok(rank_ctx *r, size_t n, uint64_t salt) {
  float *h = test_host_alloc(n * sizeof(float));
  fill_spread(h, n, salt, r->rank);
  float *d = upload(r, h, n);
  before_calls();
  must(r, m3_p2p_all_reduce_sum(r->p2p, d, n), "p2p all_reduce_sum");
  must(r, r->be->ops->to_host(r->be, h, d, n * sizeof(float)), "to_host");
  int ok = 1;
  for (size_t i = 0; i < n && ok; i++) ok = same_bits(h[i], rank_order_sum(salt, i));
  r->be->ops->free(r->be, d);
  free(h);
  return ok;
}

/* p2p add (+ norm) of rows x cols: x (the same on every rank) += the ranks' parts, against the
 * backend's add_rmsnorm (or add) of x and the host's rank-order sum. 1 when x and the norm's
 * output match bit for bit. */
static int p2p_add_norm_ok(rank_ctx *r, int rows, int cols, int with_norm, uint64_t salt) {
  const size_t n = (size_t)rows * cols;
  float *h = test_host_alloc(n * sizeof(float));
  fill_spread(h, n, salt, 90);
  float *x = upload(r, h, n), *x_ref = upload(r, h, n);
  fill_spread(h, n, salt, r->rank);
  float *part = upload(r, h, n);
  for (size_t i = 0; i < n; i++) h[i] = rank_order_sum(salt, i);
  float *sum = upload(r, h, n), *out = must_alloc(r, n * sizeof(float)),
        *out_ref = must_alloc(r, n * sizeof(float));
  void *norm_host = NULL;
  m3_tensor norm;
  must(r, test_norm_weight(r->be, cols, salt, &norm, &norm_host), "norm weight");
  const float eps = 1e-6f;
  before_calls();
  must(r, m3_p2p_add_norm(r->p2p, part, x, with_norm ? &norm : NULL, eps, rows, cols, out),
       "p2p add_norm");
  if (with_norm) r->be->ops->add_rmsnorm(r->be, x_ref, sum, &norm, eps, rows, cols, out_ref);
  else r->be->ops->add(r->be, x_ref, sum, n);
  const int ok = same_device_bits(r, x, x_ref, n) &&
                 (!with_norm || same_device_bits(r, out, out_ref, n));
  r->be->ops->release_tensor(r->be, &norm);
  free(norm_host);
  float *bufs[] = {x, x_ref, part, sum, out, out_ref};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) r->be->ops->free(r->be, bufs[i]);
  free(h);
  return ok;
}

static void test_p2p(rank_ctx *r) {
  static const size_t sizes[] = {1, 1000, 6144, 16385, 64 * 6144, 3u << 20};
  for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
    progress(r, "p2p all_reduce_sum", sizes[s]);
    record(C_P2P_SUM, !p2p_sum_ok(r, sizes[s], 300 + s), 0);
  }
  static const struct {
    int rows, cols;
  } shapes[] = {{1, 6144}, {8, 6144}, {64, 6144}, {200, 6144}, {3, 1001}, {2, 16384}};
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (int with_norm = 0; with_norm < 2; with_norm++) {
      progress(r, "p2p add_norm rows", (size_t)shapes[s].rows);
      record(C_P2P_ADD_NORM,
             !p2p_add_norm_ok(r, shapes[s].rows, shapes[s].cols, with_norm, 400 + s), 0);
    }
  /* A decode step's pattern, many times: each call of another size or kind than the last, so
   * every inbox and staging slot is rewritten while blocks of other sizes read it. 24 rows and
   * sums past 16 chunks of 16384 floats take staging, the others push (where a launch may have
   * more than 16 blocks; with M3_P2P_PUSH=0 all take staging). */
  progress(r, "p2p alternating calls", 40);
  int ok = 1;
  for (int i = 0; i < 40 && ok; i++)
    ok = i % 2 ? p2p_add_norm_ok(r, i % 7 == 3 ? 24 : 1 + i % 5, 6144, i % 3 != 0, 500 + (uint64_t)i)
               : p2p_sum_ok(r, (size_t)(1 + i) * 8001, 500 + (uint64_t)i);
  record(C_P2P_MIXED, !ok, 0);
}

/* Rank 0 records a sum and an add + norm into a CUDA graph and launches it three times, while the
 * other ranks issue the same calls directly each time: the epochs live on the device, so the
 * replays pair with the direct calls. Every round's results against the host's. */
static void test_p2p_graph(rank_ctx *r) {
  enum { N = 6144, ROUNDS = 3 };
  progress(r, "p2p from a CUDA graph", N);
  float *h = test_host_alloc(N * sizeof(float)), *base = test_host_alloc(N * sizeof(float));
  fill_spread(base, N, 600, r->rank);
  float *d = must_alloc(r, N * sizeof(float)), *x = must_alloc(r, N * sizeof(float)),
        *out = must_alloc(r, N * sizeof(float));
  void *norm_host = NULL;
  m3_tensor norm;
  must(r, test_norm_weight(r->be, N, 600, &norm, &norm_host), "norm weight");
  m3_graph *g = NULL;
  int ok = 1;
  for (int round = 0; round < ROUNDS; round++) {
    /* inputs reset each round: the sum runs in place, the add accumulates */
    must(r, r->be->ops->to_device(r->be, d, base, N * sizeof(float)), "to_device");
    must(r, r->be->ops->to_device(r->be, x, base, N * sizeof(float)), "to_device");
    const int graphed = r->rank == 0;
    before_calls();
    if (graphed && round == 0) { /* recording issues nothing */
      must(r, r->be->ops->graph_begin(r->be), "graph_begin");
      must(r, m3_p2p_all_reduce_sum(r->p2p, d, N), "p2p sum (recorded)");
      must(r, m3_p2p_add_norm(r->p2p, d, x, &norm, 1e-6f, 1, N, out), "p2p add_norm (recorded)");
      must(r, r->be->ops->graph_end(r->be, &g), "graph_end");
    }
    /* The graph instantiated. A plain barrier: a device-wide wait here, on a GPU rank 0 shares,
     * would wait on its stream while it records and spoil the recording. */
    sync_ranks();
    if (graphed) {
      must(r, r->be->ops->graph_launch(r->be, g), "graph_launch");
    } else {
      must(r, m3_p2p_all_reduce_sum(r->p2p, d, N), "p2p sum");
      must(r, m3_p2p_add_norm(r->p2p, d, x, &norm, 1e-6f, 1, N, out), "p2p add_norm");
    }
    must(r, r->be->ops->to_host(r->be, h, x, N * sizeof(float)), "to_host");
    /* d is the rank-order sum S on every rank, so the add gives x = base + (S + S + ...) */
    for (size_t i = 0; i < N && ok; i++) {
      const float sum = rank_order_sum(600, i);
      float acc = sum;
      for (int k = 1; k < nranks; k++) acc += sum;
      ok = same_bits(h[i], base[i] + acc);
    }
  }
  record(C_P2P_GRAPH, !ok, 0);
  r->be->ops->graph_free(r->be, g);
  r->be->ops->release_tensor(r->be, &norm);
  free(norm_host);
  float *bufs[] = {d, x, out};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) r->be->ops->free(r->be, bufs[i]);
  free(h);
  free(base);
}

/* Rank 0 makes a p2p call nobody joins; rank 1 aborts the group from its thread: rank 0's wait
 * on its stream returns, the group reports the abort, and later calls are refused. Last: the
 * group is dead afterwards. */
static int test_p2p_abort(rank_ctx *r) {
  int ok = 1;
  if (r->rank == 0) {
    float *d = must_alloc(r, 6144 * sizeof(float)), host = 0.0f;
    must(r, m3_p2p_all_reduce_sum(r->p2p, d, 6144), "lone p2p all_reduce_sum");
    sync_ranks();
    const double t0 = test_now_s();
    const m3_status st = r->be->ops->to_host(r->be, &host, d, sizeof host);
    const double waited = test_now_s() - t0;
    ok = st == M3_OK && waited < M3_P2P_DEADLINE_S && m3_p2p_check(p2p_group) == M3_ERR_IO &&
         m3_p2p_all_reduce_sum(r->p2p, d, 6144) == M3_ERR_IO;
    printf("p2p abort from a peer's thread: rank 0's wait returned after %.2f s, check: %s, "
           "later calls refused: %s\n", waited, m3_p2p_check(p2p_group) ? m3_last_error() : "ok",
           ok ? "PASS" : "FAIL");
    r->be->ops->free(r->be, d);
  } else {
    sync_ranks();
    if (r->rank == 1) {
      struct timespec nap = {0, 300 * 1000 * 1000};
      nanosleep(&nap, NULL);
      m3_p2p_abort(p2p_group);
    }
  }
  sync_ranks();
  return ok;
}


static int abort_ok = 1;

static void *rank_main(void *arg) {
  rank_ctx *r = arg;
  if (m3_backend_cuda_create(r->gpu, &r->be) != M3_OK ||
      m3_p2p_join(p2p_group, r->rank, r->be, &r->p2p) != M3_OK) {
    fprintf(stderr, "FATAL: rank %d on GPU %d: %s\n", r->rank, r->gpu, m3_last_error());
    setup_failed = 1;
  }
  sync_ranks(); /* connect reads every rank's buffers */
  if (!setup_failed && m3_p2p_connect(r->p2p) != M3_OK) {
    fprintf(stderr, "FATAL: rank %d: %s\n", r->rank, m3_last_error());
    setup_failed = 1;
  }
  sync_ranks();
  if (!setup_failed) {
    test_p2p(r);
    sync_ranks();
    test_p2p_graph(r);
    sync_ranks();
    if (!test_p2p_abort(r)) abort_ok = 0;
  }
  cudaDeviceSynchronize(); /* peers read each other's staging: all idle before any leaves */
  sync_ranks();
  m3_p2p_leave(r->p2p);
  if (r->be) r->be->ops->destroy(r->be);
  return NULL;
}

static int run_world(int world, int gpus) {
  nranks = world;
  setup_failed = 0;
  if (m3_p2p_group_create(world, &p2p_group) != M3_OK) {
    fprintf(stderr, "FATAL: %s\n", m3_last_error());
    return 0;
  }
  pthread_barrier_init(&barrier, NULL, (unsigned)world);
  for (int i = 0; i < world; i++) {
    ranks[i] = (rank_ctx){.rank = i, .gpu = i % gpus};
    if (pthread_create(&ranks[i].thread, NULL, rank_main, &ranks[i]) != 0) {
      fprintf(stderr, "FATAL: pthread_create\n");
      _exit(1);
    }
  }
  for (int i = 0; i < world; i++) pthread_join(ranks[i].thread, NULL);
  pthread_barrier_destroy(&barrier);
  m3_p2p_group_free(p2p_group);
  p2p_group = NULL;
  return !setup_failed;
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  /* Ranks sharing a GPU share its context, where loading a kernel at its first launch (CUDA's
   * lazy loading) waits for the context's running kernels: a rank launching its first add_rmsnorm
   * while its call spins would hold the peer's launch back, a deadlock until the deadline (seen on
   * one H200). Ranks on GPUs of their own (the engine, test_tp) load lazily in contexts of their
   * own, which this does not touch. */
  setenv("CUDA_MODULE_LOADING", "EAGER", 1);
  int gpus = 0;
  const cudaError_t e = cudaGetDeviceCount(&gpus);
  if (e != cudaSuccess || gpus < 1) {
    printf("SKIP: test_p2p needs a GPU (%s)\n", cudaGetErrorString(e));
    return 77;
  }
  static const int worlds[] = {2, 4};
  int ok = 1;
  for (size_t w = 0; w < sizeof worlds / sizeof worlds[0]; w++) {
    const int set_up = run_world(worlds[w], gpus);
    ok &= set_up;
    printf("W %d ranks on %d GPU(s): %s\n", worlds[w], gpus < worlds[w] ? gpus : worlds[w],
           set_up ? "ran" : "SET-UP FAILED");
  }
  printf("\n%-32s %6s %6s  %s\n", "check", "cases", "failed", "criterion");
  for (int i = 0; i < C_COUNT; i++) {
    printf("%-32s %6d %6d  %s  %s\n", checks[i].name, checks[i].cases, checks[i].failed,
           checks[i].criterion, checks[i].failed || !checks[i].cases ? "FAIL" : "PASS");
    ok &= checks[i].failed == 0 && checks[i].cases > 0;
  }
  ok &= abort_ok;
  printf("%s\n", ok ? "ALL PASS" : "FAILURES");
  return ok ? 0 : 1;
}
