/* bench_tp: issue 11's benchmark on a full-width few-layer model (the folder is the argument;
 * scripts/gpu-multi.sh writes it with `m3 tiny`): the whole model on GPU 0 against TP2 and EP2
 * over GPUs 0 and 1 (tp_ranks.h), figures only.
 *
 *   decode   B sequences (B = 1, 8, 64), each after its own 16-token context, one token each per
 *            step, greedy ids fed back (m3_model_forward_batch_argmax: the ids come to the host,
 *            which ends the step); 4 warm-up steps (the first sight of a step runs it directly, the
 *            second records its graph), then the median of 30. Steps replay recorded CUDA graphs
 *            ("graphs": no hook on 1 GPU, M3_ALL_REDUCE_CAPTURABLE with NCCL inside on 2) or run
 *            op by op ("op by op": a hook without the flag; on 1 GPU a group of one, which sums
 *            nothing). Every variant decodes in a KV cache of its own, all kept until the model
 *            goes: a recording bakes in the cache's addresses, so no variant can replay another's
 *            graph (recorded under another hook).
 *   prefill  8192 tokens from an empty cache in one forward, the last row's argmax: one warm-up,
 *            then the median of 5.
 * A step's time is the host wall time of the slowest rank, the ranks released together by a
 * barrier before each step. Scaling efficiency t1 / (2 t2); the goal: TP2 decode at batch 1
 * t2 / t1 <= 0.6.
 *
 * Time in collectives, two ways:
 *   in the step  the same runs with a hook that returns without summing (each rank computes on
 *                its partial sums: wrong values, the same work), and the difference divided by the
 *                layers;
 *   isolated     the all-reduce of the step's [T, hidden] floats alone on the same communicator
 *                (back to back on the stream, 50 calls, or 5 at 8192 tokens; the median of 5
 *                such runs), times the calls per step that reach NCCL, divided by the layers.
 * The hook counts its calls per group in an op-by-op run (a replayed graph does not call it).
 * M3_P2P=1 sums on 2 GPUs through the peer-to-peer all-reduce wherever it takes the size, with the
 * add + norm fused (tp_attach_p2p, as the engine's ranks run), the isolated all-reduce too;
 * otherwise everything goes through NCCL.
 * Not a CTest test (CI has no GPU). Prints SKIP and exits 77 with fewer than 2 GPUs; exits 1 when
 * a layout could not be measured. */
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/step_graph.h"
#include "tp_ranks.h"

enum { GPUS = 2, CONTEXT = 16, WARM = 4, STEPS = 30, PREFILL = 8192, PREFILL_REPS = 5 };
enum { AR_REPS = 5, JOB_S = 130 };
enum { N_BATCH = 3, N_LAYOUTS = 3, N_SIZES = N_BATCH + 1 };
static const int batches[N_BATCH] = {1, 8, 64};
/* The isolated all-reduce's token counts: the decode batches, then the prefill. */
static const int size_tokens[N_SIZES] = {1, 8, 64, PREFILL};
static const tp_layout layouts[N_LAYOUTS] = {{"1 GPU", 1, 1}, {"TP2", 2, 1}, {"EP2", 1, 2}};

typedef struct {
  char error[600]; /* why the layout was not measured; "" when it was */
  double load_s;
  /* [batch][graphs][collectives: 0 a hook that sums nothing, 1 summed] ms per step, 0 where not
   * measured (1 GPU has only collectives 1); replayed: steps of the 30 that replayed a graph */
  double decode[N_BATCH][2][2];
  uint64_t replayed[N_BATCH][2][2];
  double prefill[2]; /* [collectives] ms */
  /* per op-by-op decode step with collectives: hook calls and floats per call, per group */
  double calls[N_BATCH][2], floats[N_BATCH][2];
} layout_result;

static layout_result results[N_LAYOUTS];
static double all_reduce_us[N_SIZES]; /* isolated, per call */
static const char *model_dir;
static int use_p2p; /* M3_P2P=1 */
static int hidden, num_layers, vocab;

/* [rank][sample]: each rank's own row, read by rank 0 between two tp_syncs. */
static double rank_ms[TP_MAX_RANKS][STEPS];

static int compare_double(const void *a, const void *b) {
  const double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* The median over samples [0, n) of the slowest rank's time. */
static double slowest_median(const tp_layout *L, int n) {
  double v[STEPS];
  for (int i = 0; i < n; i++) {
    v[i] = 0;
    for (int k = 0; k < tp_layout_ranks(L); k++)
      if (rank_ms[k][i] > v[i]) v[i] = rank_ms[k][i];
  }
  qsort(v, (size_t)n, sizeof v[0], compare_double);
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* Every rank of L runs the same steps; rank 0 returns the figure. */
static double finish_samples(const tp_rank *r, const tp_layout *L, int n) {
  tp_sync(L);
  const double ms = r->rank == 0 ? slowest_median(L, n) : 0;
  tp_sync(L); /* rank 0 has read the samples before anyone writes the next */
  return ms;
}

static void *must_alloc(const tp_rank *r, size_t bytes) {
  void *p = malloc(bytes ? bytes : 1);
  if (!p) tp_must(r, m3_fail(M3_ERR_NOMEM, "%zu bytes of host memory", bytes), "bench buffers");
  return p;
}

typedef struct {
  double ms;
  uint64_t replayed;
  double calls[2], floats[2]; /* per step, per group (rank 0's hook) */
} decode_figure;

/* B sequences in `keep` (opened here, closed by the caller): the context, the warm-up, then the
 * timed steps. */
static decode_figure time_decode(tp_rank *r, const tp_layout *L, m3_model *m, int B,
                                 tp_batch *keep) {
  tp_must(r, tp_batch_open(m, B, CONTEXT + WARM + STEPS, CONTEXT, keep), "decode KV cache");
  int32_t *ids = must_alloc(r, (size_t)B * CONTEXT * sizeof *ids);
  int32_t *fed = must_alloc(r, (size_t)B * sizeof *fed), *got = must_alloc(r, (size_t)B * sizeof *got);
  float *logits = must_alloc(r, (size_t)B * vocab * sizeof *logits); /* the device keeps the rows */
  for (int i = 0; i < B * CONTEXT; i++) ids[i] = (int32_t)((i * 7 + 3) % vocab);
  for (int b = 0; b < B; b++) fed[b] = ids[b * CONTEXT];
  tp_must(r, tp_batch_forward(keep, ids, CONTEXT, 0, NULL, NULL), "decode context");
  m3_step_graph_stats before = {0};
  for (int i = 0; i < WARM + STEPS; i++) {
    if (i == WARM) {
      memset(r->hook.calls, 0, sizeof r->hook.calls);
      memset(r->hook.floats, 0, sizeof r->hook.floats);
      before = m3_model_graph_stats(m);
    }
    tp_sync(L);
    const double t0 = tp_now_s();
    tp_must(r, tp_batch_forward(keep, fed, 1, 1, logits, got), "decode step");
    tp_must(r, tp_wait(r), "wait after a decode step");
    if (i >= WARM) rank_ms[r->rank][i - WARM] = (tp_now_s() - t0) * 1e3;
    memcpy(fed, got, (size_t)B * sizeof *fed);
  }
  decode_figure f = {.replayed = m3_model_graph_stats(m).replayed - before.replayed};
  for (int g = 0; g < 2; g++) {
    f.calls[g] = (double)r->hook.calls[g] / STEPS;
    f.floats[g] = r->hook.calls[g] ? (double)r->hook.floats[g] / (double)r->hook.calls[g] : 0;
  }
  f.ms = finish_samples(r, L, STEPS);
  free(ids);
  free(fed);
  free(got);
  free(logits);
  return f;
}

static double time_prefill(tp_rank *r, const tp_layout *L, m3_model *m) {
  tp_batch b;
  tp_must(r, tp_batch_open(m, 1, PREFILL, PREFILL, &b), "prefill KV cache");
  int32_t *ids = must_alloc(r, PREFILL * sizeof *ids), got;
  float *logits = must_alloc(r, (size_t)vocab * sizeof *logits);
  for (int i = 0; i < PREFILL; i++) ids[i] = (int32_t)((i * 7 + 3) % vocab);
  for (int i = 0; i < 1 + PREFILL_REPS; i++) { /* the first warms up */
    tp_batch_reset(&b);
    tp_sync(L);
    const double t0 = tp_now_s();
    tp_must(r, tp_batch_forward(&b, ids, PREFILL, 1, logits, &got), "prefill");
    tp_must(r, tp_wait(r), "wait after the prefill");
    if (i > 0) rank_ms[r->rank][i - 1] = (tp_now_s() - t0) * 1e3;
  }
  const double ms = finish_samples(r, L, PREFILL_REPS);
  tp_batch_close(&b);
  free(ids);
  free(logits);
  return ms;
}

/* The all-reduce of [T, hidden] floats alone, per call, for each of size_tokens. */
static void time_all_reduce(tp_rank *r, const tp_layout *L) {
  const size_t most = (size_t)size_tokens[N_SIZES - 1] * hidden;
  float *buf = r->be->ops->alloc(r->be, most * sizeof *buf);
  if (!buf) tp_must(r, m3_fail(M3_ERR_NOMEM, "%zu floats on the GPU", most), "all-reduce buffer");
  for (int s = 0; s < N_SIZES; s++) {
    const size_t n = (size_t)size_tokens[s] * hidden;
    const int calls = size_tokens[s] >= 1024 ? 5 : 50;
    for (int rep = 0; rep < 1 + AR_REPS; rep++) { /* the first warms up */
      tp_sync(L);
      const double t0 = tp_now_s();
      for (int c = 0; c < calls; c++)
        tp_must(r, use_p2p && m3_p2p_fits_sum(r->p2p, n) ? m3_p2p_all_reduce_sum(r->p2p, buf, n)
                                                          : m3_nccl_all_reduce_sum(r->comm, buf, n),
                "all-reduce");
      tp_must(r, tp_wait(r), "wait after the all-reduces");
      if (rep > 0) rank_ms[r->rank][rep - 1] = (tp_now_s() - t0) * 1e3 / calls;
    }
    const double ms = finish_samples(r, L, AR_REPS);
    if (r->rank == 0) all_reduce_us[s] = ms * 1e3;
  }
  r->be->ops->free(r->be, buf);
}

/* The hook of one variant: 1 GPU with graphs has none (the plain model); op by op it has one over
 * a group of one (steps then run op by op, summing nothing). */
static void set_hook(tp_rank *r, const tp_layout *L, m3_model *m, int graphs, int reduce) {
  const unsigned flags = graphs ? M3_ALL_REDUCE_CAPTURABLE : 0;
  if (tp_layout_ranks(L) == 1 && graphs)
    tp_must(r, m3_model_set_all_reduce(m, NULL, NULL, 0), "remove the hook");
  else if (use_p2p && reduce && tp_layout_ranks(L) > 1)
    tp_must(r, tp_attach_p2p(r, L, m, flags), "set the p2p hook");
  else
    tp_must(r, tp_attach(r, L, m, reduce, flags), "set the hook");
}

typedef struct {
  const tp_layout *L;
  layout_result *res;
  int all_reduce; /* also time the isolated all-reduces (once: every 2-rank layout shares them) */
} bench_job;

static void job_layout(tp_rank *r, void *arg) {
  const bench_job *j = arg;
  const tp_layout *L = j->L;
  layout_result *res = j->res;
  if (!tp_in_layout(r, L)) return;
  m3_model *m = NULL;
  tp_failure why;
  const double t0 = tp_now_s();
  if (!tp_agree(r, L, tp_load(r, L, model_dir, &m), &why)) {
    if (r->rank == 0)
      snprintf(res->error, sizeof res->error, "rank %d: %s", why.rank, why.message);
    m3_model_free(m);
    return;
  }
  tp_sync(L);
  const m3_config *c = m3_model_config(m);
  if (r->rank == 0) {
    res->load_s = tp_now_s() - t0;
    hidden = c->hidden_size, num_layers = c->num_layers, vocab = c->vocab_size;
  }
  tp_sync(L); /* every rank reads hidden and vocab from here on */
  const int multi = tp_layout_ranks(L) > 1;
  tp_batch keep[N_BATCH][2][2];
  memset(keep, 0, sizeof keep);
  for (int bi = 0; bi < N_BATCH; bi++)
    for (int graphs = 1; graphs >= 0; graphs--)
      for (int reduce = multi ? 0 : 1; reduce <= 1; reduce++) {
        set_hook(r, L, m, graphs, reduce);
        const decode_figure f = time_decode(r, L, m, batches[bi], &keep[bi][graphs][reduce]);
        if (r->rank != 0) continue;
        res->decode[bi][graphs][reduce] = f.ms;
        res->replayed[bi][graphs][reduce] = f.replayed;
        if (!graphs && reduce)
          for (int g = 0; g < 2; g++) res->calls[bi][g] = f.calls[g], res->floats[bi][g] = f.floats[g];
      }
  for (int reduce = multi ? 0 : 1; reduce <= 1; reduce++) {
    set_hook(r, L, m, !multi, reduce); /* 1 GPU: the plain model; a prefill is never graphed */
    const double ms = time_prefill(r, L, m);
    if (r->rank == 0) res->prefill[reduce] = ms;
  }
  if (j->all_reduce) time_all_reduce(r, L);
  for (int bi = 0; bi < N_BATCH; bi++)
    for (int g = 0; g < 2; g++)
      for (int k = 0; k < 2; k++) tp_batch_close(&keep[bi][g][k]);
  m3_model_free(m);
}

/* ---- the report ---- */

static void cell_ms(double ms) {
  if (ms > 0) printf(" %.3f |", ms);
  else printf(" - |");
}

/* t2 against t1: the ratio, or the efficiency t1 / (2 t2). */
static void cell_ratio(double t1, double t2, int efficiency) {
  if (t1 > 0 && t2 > 0) printf(" %.2f |", efficiency ? t1 / (2 * t2) : t2 / t1);
  else printf(" - |");
}

static void print_times(void) {
  printf("\n## Step times, ms (the slowest rank's host wall time; decode: median of %d steps after "
         "%d warm-up, %d-token context per sequence; prefill: median of %d)\n\n", STEPS, WARM,
         CONTEXT, PREFILL_REPS);
  printf("| step |");
  for (int li = 0; li < N_LAYOUTS; li++) printf(" %s graphs | %s op by op |", layouts[li].name, layouts[li].name);
  printf("\n|---|---|---|---|---|---|---|\n");
  for (int bi = 0; bi < N_BATCH; bi++) {
    printf("| decode, batch %d |", batches[bi]);
    for (int li = 0; li < N_LAYOUTS; li++) {
      cell_ms(results[li].decode[bi][1][1]);
      cell_ms(results[li].decode[bi][0][1]);
    }
    printf("\n");
  }
  printf("| prefill %d (one forward, never graphed) |", PREFILL);
  for (int li = 0; li < N_LAYOUTS; li++) {
    cell_ms(results[li].prefill[1]);
    printf(" - |");
  }
  printf("\n\nGraphed steps replayed of the %d timed (each should be %d):", STEPS, STEPS);
  for (int li = 0; li < N_LAYOUTS; li++)
    for (int bi = 0; bi < N_BATCH; bi++) {
      const uint64_t n = results[li].replayed[bi][1][1];
      printf(" %s b%d %llu%s;", layouts[li].name, batches[bi], (unsigned long long)n,
             n == STEPS ? "" : " (NOT ALL)");
    }
  printf("\n");
}

static void print_scaling(void) {
  const layout_result *one = &results[0];
  printf("\n## Scaling (t1: 1 GPU, t2: 2 GPUs; efficiency t1 / (2 t2); goal: decode at batch 1 "
         "t2 / t1 <= 0.6)\n\n| figure | TP2 graphs | TP2 op by op | EP2 graphs | EP2 op by op |\n"
         "|---|---|---|---|---|\n");
  printf("| decode batch 1, t2 / t1 |");
  for (int li = 1; li < N_LAYOUTS; li++)
    for (int graphs = 1; graphs >= 0; graphs--)
      cell_ratio(one->decode[0][graphs][1], results[li].decode[0][graphs][1], 0);
  const double tp_ratio = results[1].decode[0][1][1] / one->decode[0][1][1];
  for (int bi = 0; bi < N_BATCH; bi++) {
    printf("\n| decode batch %d, efficiency |", batches[bi]);
    for (int li = 1; li < N_LAYOUTS; li++)
      for (int graphs = 1; graphs >= 0; graphs--)
        cell_ratio(one->decode[bi][graphs][1], results[li].decode[bi][graphs][1], 1);
  }
  printf("\n| prefill %d (never graphed), efficiency |", PREFILL);
  for (int li = 1; li < N_LAYOUTS; li++) {
    cell_ratio(one->prefill[1], results[li].prefill[1], 1);
    printf(" - |");
  }
  if (one->decode[0][1][1] > 0 && results[1].decode[0][1][1] > 0)
    printf("\n\nGoal, TP2 decode at batch 1 with graphs: t2 / t1 = %.2f: %s\n", tp_ratio,
           tp_ratio <= 0.6 ? "met (<= 0.6)" : "NOT met (> 0.6)");
  else
    printf("\n\nGoal, TP2 decode at batch 1 with graphs: not measured\n");
}

/* Calls per step that reach NCCL: TP calls only where the TP group has 2 ranks. */
static double nccl_calls(const tp_layout *L, const layout_result *res, int bi) {
  return (L->tp > 1 ? res->calls[bi][M3_REDUCE_TP] : 0) + res->calls[bi][M3_REDUCE_WORLD];
}

static void print_collectives(void) {
  printf("\n## Collectives\n\nIsolated all-reduce of [T, %d] floats, us per call (back to back on "
         "the stream, median of %d runs):", hidden, AR_REPS);
  for (int s = 0; s < N_SIZES; s++) printf(" T %d: %.1f;", size_tokens[s], all_reduce_us[s]);
  printf("\n\nPer layer (%d layers): \"in step\" = (step with the all-reduces - the same step with "
         "a hook that sums nothing) / layers; \"isolated\" = calls per step reaching NCCL x the "
         "isolated all-reduce / layers. Calls per op-by-op step, TP / WORLD group, and floats per "
         "call (expect T x %d).\n\n", num_layers, hidden);
  printf("| layout | step | calls TP / WORLD | floats per call | in step, graphs us | in step, op by "
         "op us | isolated us |\n|---|---|---|---|---|---|---|\n");
  for (int li = 1; li < N_LAYOUTS; li++) {
    const layout_result *res = &results[li];
    if (res->error[0]) continue;
    for (int bi = 0; bi < N_BATCH; bi++) {
      printf("| %s | decode batch %d | %.1f / %.1f | %.0f / %.0f |", layouts[li].name, batches[bi],
             res->calls[bi][0], res->calls[bi][1], res->floats[bi][0], res->floats[bi][1]);
      for (int graphs = 1; graphs >= 0; graphs--)
        printf(" %.1f |", (res->decode[bi][graphs][1] - res->decode[bi][graphs][0]) * 1e3 / num_layers);
      printf(" %.1f |\n", nccl_calls(&layouts[li], res, bi) * all_reduce_us[bi] / num_layers);
    }
    /* A prefill makes the op-by-op decode step's calls, each over T = 8192 rows. */
    printf("| %s | prefill %d | - | - | - | %.1f | %.1f |\n", layouts[li].name, PREFILL,
           (res->prefill[1] - res->prefill[0]) * 1e3 / num_layers,
           nccl_calls(&layouts[li], res, 0) * all_reduce_us[N_SIZES - 1] / num_layers);
  }
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc != 2) {
    fprintf(stderr, "usage: bench_tp MODEL_DIR (a full-width model: scripts/gpu-multi.sh)\n");
    return 2;
  }
  model_dir = argv[1];
  const char *p2p = getenv("M3_P2P");
  use_p2p = p2p && strcmp(p2p, "1") == 0;
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count < GPUS) {
    printf("SKIP: bench_tp needs %d GPUs; found %d (%s)\n", GPUS, e == cudaSuccess ? count : 0,
           cudaGetErrorString(e));
    return 77;
  }
  struct cudaDeviceProp prop;
  const int named = cudaGetDeviceProperties(&prop, 0) == cudaSuccess;
  if (tp_start(GPUS) != M3_OK) {
    printf("FATAL: %s\n", m3_last_error());
    return 1;
  }
  int unmeasured = 0;
  for (int li = 0; li < N_LAYOUTS; li++) {
    bench_job j = {.L = &layouts[li], .res = &results[li], .all_reduce = li == 1};
    fprintf(stderr, "   %s\n", layouts[li].name);
    tp_run(layouts[li].name, JOB_S, job_layout, &j);
    unmeasured += results[li].error[0] != 0;
  }
  tp_stop();
  printf("# bench_tp: %s\n\n%s x %d (of %d); hidden %d, %d layers, vocab %d; all-reduces: %s; "
         "load:", model_dir, named ? prop.name : "GPU", GPUS, count, hidden, num_layers, vocab,
         use_p2p ? "peer to peer where they fit (M3_P2P=1), add + norm fused" : "NCCL");
  for (int li = 0; li < N_LAYOUTS; li++)
    if (results[li].error[0]) printf(" %s FAILED: %s;", layouts[li].name, results[li].error);
    else printf(" %s %.1f s;", layouts[li].name, results[li].load_s);
  printf("\n");
  if (results[0].error[0]) return 1;
  print_times();
  print_scaling();
  print_collectives();
  return unmeasured ? 1 : 0;
}
