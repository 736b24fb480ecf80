/* test_tp: the tensor-parallel text model (model/shard.c, m3_model_set_all_reduce) over NCCL on 2
 * GPUs, one thread and one CUDA backend per GPU as test_nccl runs them, against the whole model
 * on GPU 0. For each committed text fixture whose sizes divide by 2 (others are skipped with the
 * loader's reason) and for two random models written here (BF16 and MXFP8, layers FD,SM,FM,SM,
 * widths multiples of 64): the prompt at once, then greedy single-token decode steps, each model
 * with its own KV cache (engine/kvcache.h, sized from the rank's narrowed config). Checks, per
 * position: TP2 logits (rank 0) within 1e-2 relative L2 of the 1-GPU logits (float32
 * activations: only the summation order differs, expect ~1e-6), the same argmax; rank 1's logits
 * within 1e-6 of rank 0's; the greedy continuations identical; a rank's KV page half the whole
 * model's K/V bytes. Then timings of the random models: a 512-token prefill and batch-1 decode
 * steps, 1 GPU (with and without recorded CUDA graphs) against TP2 (no graphs), figures only.
 * scripts/gpu-multi.sh runs it; not a CTest test (CI has no GPU). Prints SKIP and exits 77 with
 * fewer than 2 GPUs; exits 1 on any failure. */
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
#include "engine/kvcache.h"
#include "io/tiny.h"
#include "model/model.h"

enum { TP = 2, PROMPT = 13, DECODE = 6, MAX_POS = PROMPT + DECODE, WAIT_MS = 60000 };
enum { BENCH_PREFILL = 512, BENCH_DECODE = 32, BENCH_POS = BENCH_PREFILL + BENCH_DECODE + 1 };

typedef struct {
  int rank;
  m3_backend *be;
  m3_nccl *comm;
  pthread_t thread;
} rank_ctx;

static rank_ctx ranks[TP];
static m3_nccl_id id;
static pthread_barrier_t barrier;
static int setup_failed, failures;

static void sync_ranks(void) { pthread_barrier_wait(&barrier); }

/* A failure that leaves the other rank blocked in a collective: the process ends. */
static void must(const rank_ctx *r, m3_status st, const char *what) {
  if (st != M3_OK) {
    fprintf(stderr, "FATAL: rank %d: %s: %s\n", r->rank, what, m3_last_error());
    fflush(stdout);
    _exit(1);
  }
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static m3_status nccl_all_reduce(void *user, m3_reduce_group group, float *buf, size_t n) {
  (void)group; /* tp only: one group */
  return m3_nccl_all_reduce_sum(user, buf, n);
}

/* ---- one sequence on one model ---- */

typedef struct {
  m3_model *m;
  m3_kv_cache *cache;
  m3_kv_seq seq;
  m3_kv_view *views;
} seq_ctx;

static m3_status seq_open(m3_model *m, int tokens, seq_ctx *s) {
  const m3_config *c = m3_model_config(m);
  *s = (seq_ctx){.m = m};
  m3_kv_seq_init(&s->seq);
  if (!(s->views = calloc((size_t)c->num_layers, sizeof *s->views))) return M3_ERR_NOMEM;
  return m3_kv_cache_create(c, m3_model_backend(m), M3_KV_F32,
                            m3_kv_bytes_for_tokens(c, M3_KV_F32, tokens), &s->cache);
}

static void seq_close(seq_ctx *s) {
  if (s->cache) {
    m3_kv_seq_release(s->cache, &s->seq);
    m3_kv_cache_free(s->cache);
  }
  free(s->views);
}

/* T tokens at the sequence's next positions; logits of the last n_logits rows (or none). */
static m3_status seq_forward(seq_ctx *s, const int32_t *ids, int T, int n_logits, float *logits) {
  int32_t pos[BENCH_PREFILL];
  const int first = s->seq.num_tokens;
  for (int t = 0; t < T; t++) pos[t] = first + t;
  m3_status st = m3_kv_seq_extend(s->cache, &s->seq, T);
  if (st != M3_OK) return st;
  m3_kv_seq_views(s->cache, &s->seq, s->views);
  const m3_model_seq q = {.kv = s->views, .ids = ids, .pos = pos, .T = T, .n_logits = n_logits};
  return m3_model_forward_batch(s->m, &q, 1, n_logits ? logits : NULL);
}

static int argmax(const float *row, int n) {
  int best = 0;
  for (int i = 1; i < n; i++)
    if (row[i] > row[best]) best = i;
  return best;
}

/* The prompt at once, then DECODE greedy steps: logits [MAX_POS, V], tokens [DECODE]. */
static m3_status run_greedy(m3_model *m, float *logits, int32_t *tokens) {
  const int V = m3_model_config(m)->vocab_size;
  int32_t ids[PROMPT];
  for (int t = 0; t < PROMPT; t++) ids[t] = (int32_t)((t * 37 + 11) % V);
  seq_ctx s;
  m3_status st = seq_open(m, MAX_POS, &s);
  if (st == M3_OK) st = seq_forward(&s, ids, PROMPT, PROMPT, logits);
  int32_t next = st == M3_OK ? argmax(logits + (size_t)(PROMPT - 1) * V, V) : 0;
  for (int i = 0; i < DECODE && st == M3_OK; i++) {
    float *row = logits + (size_t)(PROMPT + i) * V;
    tokens[i] = next;
    st = seq_forward(&s, &next, 1, 1, row);
    next = argmax(row, V);
  }
  seq_close(&s);
  return st;
}

/* ---- the cases ---- */

typedef struct {
  char dir[4096];
  char label[64];
  int bench;
} test_case;

enum { MAX_CASES = 16 };
static test_case cases[MAX_CASES];
static int n_cases;

/* What rank 0's thread compares, filled by both ranks. */
static float *tp_logits[TP];
static int32_t tp_tokens[TP][DECODE];
static m3_status load_status[TP];
static char load_error[TP][512];

static double rel_l2(const float *got, const float *want, int n) {
  double num = 0, den = 0;
  for (int i = 0; i < n; i++) {
    num += ((double)got[i] - want[i]) * ((double)got[i] - want[i]);
    den += (double)want[i] * want[i];
  }
  return sqrt(num / (den > 0 ? den : 1));
}

/* K and V bytes of one page: 2 * layers * nkv * block * hd floats (the IK pool aside). */
static size_t kv_bytes(const m3_config *c) {
  return (size_t)2 * c->num_layers * c->num_kv_heads * c->index_block_size * c->head_dim * 4;
}

static void compare(const test_case *tc, const m3_config *whole, const m3_config *part,
                    const float *ref, const int32_t *ref_tokens) {
  const int V = whole->vocab_size;
  double worst = 0, worst_ranks = 0;
  int argmax_bad = 0;
  for (int p = 0; p < MAX_POS; p++) {
    const size_t o = (size_t)p * V;
    double e = rel_l2(tp_logits[0] + o, ref + o, V), er = rel_l2(tp_logits[1] + o, tp_logits[0] + o, V);
    if (!(e <= worst)) worst = e;
    if (!(er <= worst_ranks)) worst_ranks = er;
    argmax_bad += argmax(tp_logits[0] + o, V) != argmax(ref + o, V);
  }
  const int greedy_same = memcmp(tp_tokens[0], ref_tokens, sizeof tp_tokens[0]) == 0 &&
                          memcmp(tp_tokens[1], ref_tokens, sizeof tp_tokens[1]) == 0;
  /* A rank's K/V pool: nkv / 2 heads (2 or more KV heads), else the one replicated head. */
  const size_t want_kv = whole->num_kv_heads >= TP ? kv_bytes(whole) / TP
                                                    : kv_bytes(whole) / (size_t)whole->num_kv_heads;
  const int kv_ok = kv_bytes(part) == want_kv &&
                    m3_kv_page_bytes(part, M3_KV_F32) - kv_bytes(part) ==
                        m3_kv_page_bytes(whole, M3_KV_F32) - kv_bytes(whole);
  const int ok = worst <= 1e-2 && worst_ranks <= 1e-6 && argmax_bad == 0 && greedy_same && kv_ok;
  failures += !ok;
  printf("| %s | %d | %.2e | %.2e | %d | %s | %zu / %zu | %s |\n", tc->label, MAX_POS, worst,
         worst_ranks, argmax_bad, greedy_same ? "same" : "DIFFER", m3_kv_page_bytes(part, M3_KV_F32),
         m3_kv_page_bytes(whole, M3_KV_F32), ok ? "PASS" : "FAIL");
}

/* ---- timings ---- */

typedef struct {
  double prefill_ms, decode_ms;
} timing;

/* A BENCH_PREFILL-token prompt (last row's logits) then BENCH_DECODE single-token steps, after a
 * warm-up of the same; on TP ranks both threads run it between barriers. */
static timing time_model(const rank_ctx *r, m3_model *m, int lockstep) {
  const int V = m3_model_config(m)->vocab_size;
  int32_t ids[BENCH_PREFILL];
  for (int t = 0; t < BENCH_PREFILL; t++) ids[t] = (int32_t)((t * 7 + 3) % V);
  float *logits = malloc((size_t)V * sizeof *logits);
  timing best = {INFINITY, INFINITY};
  for (int rep = 0; rep < 2; rep++) { /* the first is the warm-up */
    seq_ctx s;
    must(r, seq_open(m, BENCH_POS, &s), "bench kv cache");
    if (lockstep) sync_ranks();
    double t0 = now_s();
    must(r, seq_forward(&s, ids, BENCH_PREFILL, 1, logits), "bench prefill");
    if (lockstep) sync_ranks();
    double t1 = now_s();
    for (int i = 0; i < BENCH_DECODE; i++) {
      int32_t tok = ids[i];
      must(r, seq_forward(&s, &tok, 1, 1, logits), "bench decode");
    }
    if (lockstep) sync_ranks();
    double t2 = now_s();
    if (rep > 0) best = (timing){(t1 - t0) * 1e3, (t2 - t1) * 1e3 / BENCH_DECODE};
    seq_close(&s);
  }
  free(logits);
  return best;
}

static timing bench_rows[MAX_CASES][3]; /* 1 GPU graphs, 1 GPU op by op, TP2 */
/* M3_CUDA_GRAPHS as the run started, set before any thread exists: changing a variable that
 * exists replaces one pointer, where adding or removing one moves the environment that NCCL's
 * threads may be reading. */
static const char *graphs_env;

/* ---- the ranks ---- */

static void run_case(rank_ctx *r, int ci) {
  const test_case *tc = &cases[ci];
  m3_model *whole = NULL, *part = NULL;
  m3_model_load_options opts = {.tp_size = TP, .tp_rank = r->rank};
  load_status[r->rank] = m3_model_load_with(tc->dir, r->be, &opts, &part);
  snprintf(load_error[r->rank], sizeof load_error[r->rank], "%s", m3_last_error());
  if (r->rank == 0 && load_status[0] == M3_OK)
    must(r, m3_model_load(tc->dir, r->be, &whole), "load the whole model");
  sync_ranks();
  if (load_status[0] != M3_OK || load_status[1] != M3_OK) {
    if (r->rank == 0) {
      const int i = load_status[0] != M3_OK ? 0 : 1;
      const int skip = load_status[i] == M3_ERR_CONFIG || load_status[i] == M3_ERR_SHAPE;
      printf("| %s | SKIP%s: %s |\n", tc->label, skip ? "" : " (FAIL)", load_error[i]);
      failures += !skip;
    }
    m3_model_free(part);
    m3_model_free(whole);
    sync_ranks();
    return;
  }
  const m3_config *pc = m3_model_config(part);
  const size_t logits_n = (size_t)MAX_POS * pc->vocab_size;
  float *ref = NULL;
  int32_t ref_tokens[DECODE];
  if (r->rank == 0) {
    ref = malloc(logits_n * sizeof *ref);
    must(r, run_greedy(whole, ref, ref_tokens), "1-GPU forward");
  }
  tp_logits[r->rank] = malloc(logits_n * sizeof(float));
  must(r, m3_model_set_all_reduce(part, nccl_all_reduce, r->comm, 0), "set_all_reduce");
  sync_ranks();
  must(r, run_greedy(part, tp_logits[r->rank], tp_tokens[r->rank]), "TP forward");
  must(r, m3_nccl_wait(r->comm, WAIT_MS), "wait after the TP forward");
  sync_ranks();
  if (r->rank == 0) compare(tc, m3_model_config(whole), pc, ref, ref_tokens);
  sync_ranks();
  free(tp_logits[r->rank]);
  free(ref);
  if (tc->bench) {
    if (r->rank == 0) {
      bench_rows[ci][0] = time_model(r, whole, 0);
      m3_model_free(whole);
      setenv("M3_CUDA_GRAPHS", "0", 1); /* read at load; rank 1 waits at the barrier below */
      must(r, m3_model_load(tc->dir, r->be, &whole), "load the whole model, no graphs");
      setenv("M3_CUDA_GRAPHS", graphs_env, 1);
      bench_rows[ci][1] = time_model(r, whole, 0);
    }
    sync_ranks();
    timing t = time_model(r, part, 1);
    if (r->rank == 0) bench_rows[ci][2] = t;
  }
  m3_model_free(part);
  m3_model_free(whole);
  sync_ranks();
}

static void *rank_main(void *arg) {
  rank_ctx *r = arg;
  if (m3_backend_cuda_create(r->rank, &r->be) != M3_OK) {
    fprintf(stderr, "FATAL: rank %d: cuda backend: %s\n", r->rank, m3_last_error());
    setup_failed = 1;
  }
  sync_ranks(); /* init blocks until every rank calls it: only when both backends exist */
  if (setup_failed) return NULL;
  must(r, m3_nccl_init(&id, TP, r->rank, r->be, &r->comm), "m3_nccl_init");
  if (r->rank == 0) {
    printf("\n| model | positions | TP2 vs 1 GPU (rel L2, worst) | rank 1 vs rank 0 | argmax "
           "differs | greedy | KV page bytes rank / whole | |\n|---|---|---|---|---|---|---|---|\n");
  }
  for (int i = 0; i < n_cases; i++) {
    if (r->rank == 0) fprintf(stderr, "   %s\n", cases[i].label);
    run_case(r, i);
  }
  m3_nccl_destroy(r->comm);
  r->be->ops->destroy(r->be);
  return NULL;
}

/* ---- main ---- */

static void add_fixtures(void) {
  static const char *const names[] = {"full_dense_gqa2_f32", "gqa8_local2_tied_f32",
                                      "long_sparse_gqa4_f32", "mixed_bf16",
                                      "mixed_gqa4_rot_half_f32", "mxfp8", "vl_inspect_f32"};
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    test_case *tc = &cases[n_cases++];
    snprintf(tc->dir, sizeof tc->dir, "%s/tests/fixtures/text/%s", M3_SOURCE_DIR, names[i]);
    snprintf(tc->label, sizeof tc->label, "%s", names[i]);
  }
}

/* A random model large enough for the timings to mean something, its widths multiples of
 * 64 (whole MXFP8 blocks on each of 2 ranks). */
static int add_random(const char *root, m3_tiny_dtype dtype, const char *name) {
  test_case *tc = &cases[n_cases];
  snprintf(tc->dir, sizeof tc->dir, "%s/%s", root, name);
  snprintf(tc->label, sizeof tc->label, "random %s", name);
  m3_tiny_options o = m3_tiny_default_options();
  o.dtype = dtype;
  o.layers = "FD,SM,FM,SM";
  o.hidden = 2048;
  o.heads = 16;
  o.kv_heads = 4;
  o.head_dim = 128;
  o.rotary_dim = 64;
  o.index_dim = 128;
  o.experts = 16;
  o.experts_per_token = 4;
  o.expert_width = 1024;
  o.shared_width = 1024;
  o.dense_width = 4096;
  o.no_vision = o.no_mtp = 1;
  if (m3_tiny_write(tc->dir, &o) != M3_OK) {
    fprintf(stderr, "FATAL: writing %s: %s\n", tc->dir, m3_last_error());
    return 0;
  }
  tc->bench = 1;
  n_cases++;
  return 1;
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count < TP) {
    printf("SKIP: test_tp needs 2 GPUs; found %d (%s)\n", e == cudaSuccess ? count : 0,
           cudaGetErrorString(e));
    return 77;
  }
  char root[] = "/tmp/m3-test-tp-XXXXXX";
  if (!mkdtemp(root)) {
    fprintf(stderr, "FATAL: mkdtemp\n");
    return 1;
  }
  const char *graphs = getenv("M3_CUDA_GRAPHS");
  graphs_env = graphs ? strdup(graphs) : "1";
  setenv("M3_CUDA_GRAPHS", graphs_env, 1);
  add_fixtures();
  if (!add_random(root, M3_TINY_BF16, "bf16") || !add_random(root, M3_TINY_MXFP8, "mxfp8"))
    return 1;
  if (m3_nccl_new_id(&id) != M3_OK) {
    fprintf(stderr, "FATAL: %s\n", m3_last_error());
    return 1;
  }
  printf("test_tp: TP %d over GPUs 0 and 1 (of %d), one thread each; 1-GPU reference on GPU 0\n",
         TP, count);
  pthread_barrier_init(&barrier, NULL, TP);
  for (int i = 0; i < TP; i++) {
    ranks[i].rank = i;
    if (pthread_create(&ranks[i].thread, NULL, rank_main, &ranks[i]) != 0) {
      fprintf(stderr, "FATAL: pthread_create\n");
      return 1;
    }
  }
  for (int i = 0; i < TP; i++) pthread_join(ranks[i].thread, NULL);
  if (setup_failed) return 1;
  printf("\ntimings (host wall time; prefill %d tokens with the last row's logits; decode: one "
         "token of one sequence, logits to the host, after the prefill):\n", BENCH_PREFILL);
  printf("| model | 1 GPU graphs prefill ms | decode ms | 1 GPU op by op prefill ms | decode ms "
         "| TP2 prefill ms | decode ms |\n|---|---|---|---|---|---|---|\n");
  for (int i = 0; i < n_cases; i++)
    if (cases[i].bench && bench_rows[i][2].decode_ms > 0)
      printf("| %s | %.2f | %.3f | %.2f | %.3f | %.2f | %.3f |\n", cases[i].label,
             bench_rows[i][0].prefill_ms, bench_rows[i][0].decode_ms, bench_rows[i][1].prefill_ms,
             bench_rows[i][1].decode_ms, bench_rows[i][2].prefill_ms, bench_rows[i][2].decode_ms);
  printf("%s\n", failures ? "FAILURES" : "ALL PASS");
  return failures ? 1 : 0;
}
