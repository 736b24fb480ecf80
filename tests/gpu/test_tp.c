/* test_tp: the text model split over 2 GPUs (issue 11) against the whole model on GPU 0, one
 * thread and one CUDA backend per GPU (tp_ranks.h), in two layouts: TP2 (tp 2, ep 1: heads and
 * widths split, all-reduces over both ranks) and EP2 (tp 1, ep 2: half the routed experts each,
 * attention replicated, the MoE sum over both ranks).
 *
 * Models: the committed text fixtures (each of tests/fixtures/text; a layout whose sizes one does
 * not divide is skipped with the loader's reason), a random MXFP8 model written here (FD,SM,FM,SM,
 * hidden 2048, 16 experts: the MXFP8 fixture's widths split no whole scale blocks) and, when its
 * folder is the argument, a full-width few-layer model (scripts/gpu-multi.sh writes it with
 * `m3 tiny`); on those two a refused layout is a failure. Each runs a 13-token prompt at
 * once, then 16 greedy single-token steps (the argmax of each row fed back), with its own KV cache
 * sized from the rank's narrowed config. Cases, one PASS / FAIL / SKIP line each:
 *   <layout> vs 1 GPU    every position's logits on rank 0 within 1e-2 relative L2 of the whole
 *                        model's (float32 activations: only summation orders differ, expect
 *                        ~1e-6), the same argmax at every position, the same 16 greedy tokens on
 *                        both ranks, rank 1's logits within 1e-6 of rank 0's (both compute the
 *                        replicated head on the same summed state: expect 0), and a rank's KV
 *                        pages holding its own KV heads (TP: nkv / 2, or the one replicated head)
 *                        with the index keys unchanged;
 *   <layout> graphs      the same run with M3_ALL_REDUCE_CAPTURABLE (decode steps recorded as
 *                        CUDA graphs with the NCCL all-reduces inside, then replayed) against the
 *                        run without it: the same greedy tokens, logits within 1e-6 (bit-identical
 *                        expected: the same kernels on the same inputs; the line says whether they
 *                        are), and replayed steps on every rank (else the check proved nothing).
 * scripts/gpu-multi.sh runs it; not a CTest test (CI has no GPU). M3_SOURCE_DIR in the environment
 * overrides where the fixtures are (binaries built elsewhere). Prints SKIP and exits 77 with
 * fewer than 2 GPUs; exits 1 on any failure. */
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/tiny.h"
#include "model/step_graph.h"
#include "tp_ranks.h"

enum { GPUS = 2, PROMPT = 13, STEPS = 16, POSITIONS = PROMPT + STEPS, JOB_S = 130 };

static const tp_layout whole_gpu = {"1 GPU", 1, 1};
static const tp_layout layouts[] = {{"TP2", 2, 1}, {"EP2", 1, 2}};

typedef struct {
  char dir[4096], label[128];
  int must_run;   /* the full-width model: a layout its loader refuses is a failure, not a skip */
  /* the whole model on GPU 0 (job_reference) */
  float *ref;     /* [POSITIONS, V], NULL when that run failed */
  int32_t ref_tokens[STEPS];
  int V, nkv;             /* its vocabulary and KV heads */
  size_t kv, page;        /* its K/V bytes and whole bytes of one KV page */
} test_case;

static int passed, failed, skipped;

static void verdict(int ok, const char *layout, const char *what, const char *label) {
  passed += ok;
  failed += !ok;
  printf("%s %s %s %s:", ok ? "PASS" : "FAIL", layout, what, label);
}

static void prompt_ids(int V, int32_t *ids) {
  for (int t = 0; t < PROMPT; t++) ids[t] = (int32_t)((t * 37 + 11) % V);
}

static double rel_l2(const float *got, const float *want, int n) {
  double num = 0, den = 0;
  for (int i = 0; i < n; i++) {
    const double d = (double)got[i] - want[i];
    num += d * d;
    den += (double)want[i] * want[i];
  }
  return sqrt(num / (den > 0 ? den : 1));
}

/* The worst per-position relative L2 of a [POSITIONS, V] against b (NaN counts as worst). */
static double worst_rel_l2(const float *a, const float *b, int V) {
  double worst = 0;
  for (int p = 0; p < POSITIONS; p++) {
    const double e = rel_l2(a + (size_t)p * V, b + (size_t)p * V, V);
    if (!(e <= worst)) worst = e;
  }
  return worst;
}

/* K and V bytes of one page over every layer (the IK pool aside). */
static size_t kv_bytes(const m3_config *c) {
  return (size_t)2 * c->num_layers * c->num_kv_heads * c->index_block_size * c->head_dim * 4;
}

/* ---- the whole model on GPU 0 ---- */

static void job_reference(tp_rank *r, void *arg) {
  test_case *tc = arg;
  if (!tp_in_layout(r, &whole_gpu)) return;
  m3_model *m = NULL;
  m3_status st = tp_load(r, &whole_gpu, tc->dir, &m);
  if (st == M3_OK) {
    const m3_config *c = m3_model_config(m);
    const int V = tc->V = c->vocab_size;
    tc->nkv = c->num_kv_heads;
    tc->kv = kv_bytes(c);
    tc->page = m3_kv_page_bytes(c, M3_KV_F32);
    int32_t ids[PROMPT];
    prompt_ids(V, ids);
    tc->ref = malloc((size_t)POSITIONS * V * sizeof *tc->ref);
    st = tc->ref ? tp_greedy(m, ids, PROMPT, STEPS, tc->ref, tc->ref_tokens)
                 : m3_fail(M3_ERR_NOMEM, "reference logits");
  }
  if (st != M3_OK) {
    verdict(0, whole_gpu.name, "reference", tc->label);
    printf(" %s\n", m3_last_error());
    free(tc->ref);
    tc->ref = NULL;
  }
  m3_model_free(m);
}

/* ---- a layout over both GPUs ---- */

typedef struct {
  test_case *tc;
  const tp_layout *L;
  float *logits[GPUS], *graph_logits[GPUS], *p2p_logits[GPUS]; /* [POSITIONS, V] each rank's */
  int32_t tokens[GPUS][STEPS], graph_tokens[GPUS][STEPS], p2p_tokens[GPUS][STEPS];
  const m3_config *part;          /* rank 0's narrowed config, while its model lives */
  uint64_t replayed[GPUS];        /* steps replayed as graphs in the capturable run */
  uint64_t p2p_replayed[GPUS];    /* the same in the peer-to-peer run */
  int graphs_enabled, p2p_ran;
} layout_run;

static void compare_whole(const layout_run *run) {
  const test_case *tc = run->tc;
  const m3_config *p = run->part;
  const int V = tc->V;
  int argmax_differs = 0;
  for (int q = 0; q < POSITIONS; q++) {
    const size_t o = (size_t)q * V;
    argmax_differs += tp_argmax(run->logits[0] + o, V) != tp_argmax(tc->ref + o, V);
  }
  const double worst = worst_rel_l2(run->logits[0], tc->ref, V);
  const double ranks = worst_rel_l2(run->logits[1], run->logits[0], V);
  int greedy_same = 1;
  for (int i = 0; i < GPUS; i++)
    greedy_same &= memcmp(run->tokens[i], tc->ref_tokens, sizeof tc->ref_tokens) == 0;
  /* TP holds nkv / tp KV heads, or one replicated when tp > nkv; EP replicates attention. */
  const int heads = tc->nkv >= run->L->tp ? tc->nkv / run->L->tp : 1;
  const size_t page = m3_kv_page_bytes(p, M3_KV_F32);
  const int kv_ok = p->num_kv_heads == heads &&
                    kv_bytes(p) == tc->kv / (size_t)tc->nkv * (size_t)heads &&
                    page - kv_bytes(p) == tc->page - tc->kv;
  const int ok = worst <= 1e-2 && argmax_differs == 0 && greedy_same && ranks <= 1e-6 && kv_ok;
  verdict(ok, run->L->name, "vs 1 GPU", tc->label);
  printf(" worst rel L2 %.2e (<= 1e-2), argmax differs at %d of %d positions, greedy %d tokens "
         "%s, rank 1 vs rank 0 %.2e (<= 1e-6), KV heads %d of %d, page %zu of %zu bytes%s\n",
         worst, argmax_differs, POSITIONS, STEPS, greedy_same ? "same" : "DIFFER", ranks,
         p->num_kv_heads, tc->nkv, page, tc->page, kv_ok ? "" : " (KV pages WRONG)");
}

static void compare_graphs(const layout_run *run) {
  const int V = run->tc->V;
  if (!run->graphs_enabled) {
    skipped++;
    printf("SKIP %s graphs %s: the model records no graphs (M3_CUDA_GRAPHS=0?)\n", run->L->name,
           run->tc->label);
    return;
  }
  double worst = 0;
  int bits = 1, greedy_same = 1, replayed = 1;
  for (int i = 0; i < GPUS; i++) {
    const double e = worst_rel_l2(run->graph_logits[i], run->logits[i], V);
    if (!(e <= worst)) worst = e;
    bits &= memcmp(run->graph_logits[i], run->logits[i], (size_t)POSITIONS * V * sizeof(float)) == 0;
    greedy_same &= memcmp(run->graph_tokens[i], run->tokens[i], sizeof run->tokens[i]) == 0;
    replayed &= run->replayed[i] > 0;
  }
  const int ok = worst <= 1e-6 && greedy_same && replayed;
  verdict(ok, run->L->name, "graphs", run->tc->label);
  printf(" capturable vs op by op: worst rel L2 %.2e (<= 1e-6), bit-identical %s, greedy %s, "
         "steps replayed rank 0 %llu, rank 1 %llu (> 0)\n", worst, bits ? "yes" : "no",
         greedy_same ? "same" : "DIFFER", (unsigned long long)run->replayed[0],
         (unsigned long long)run->replayed[1]);
}

/* The peer-to-peer all-reduce with its fused add + norm, recorded into graphs, against NCCL op by
 * op: each rank sums in rank order, so with 2 ranks the bits are NCCL's a + b. */
static void compare_p2p(const layout_run *run) {
  const int V = run->tc->V;
  if (!run->p2p_ran) {
    skipped++;
    printf("SKIP %s p2p %s: no peer-to-peer all-reduce on these GPUs\n", run->L->name,
           run->tc->label);
    return;
  }
  double worst = 0;
  int bits = 1, greedy_same = 1, replayed = !run->graphs_enabled;
  for (int i = 0; i < GPUS; i++) {
    const double e = worst_rel_l2(run->p2p_logits[i], run->logits[i], V);
    if (!(e <= worst)) worst = e;
    bits &= memcmp(run->p2p_logits[i], run->logits[i], (size_t)POSITIONS * V * sizeof(float)) == 0;
    greedy_same &= memcmp(run->p2p_tokens[i], run->tokens[i], sizeof run->tokens[i]) == 0;
    replayed |= run->p2p_replayed[i] > 0;
  }
  const int ok = worst <= 1e-6 && bits && greedy_same && replayed;
  verdict(ok, run->L->name, "p2p", run->tc->label);
  printf(" p2p + fused norm (graphs) vs NCCL op by op: worst rel L2 %.2e (<= 1e-6), "
         "bit-identical %s, greedy %s, steps replayed rank 0 %llu, "
         "rank 1 %llu\n", worst, bits ? "yes" : "no", greedy_same ? "same" : "DIFFER",
         (unsigned long long)run->p2p_replayed[0], (unsigned long long)run->p2p_replayed[1]);
}

static void job_layout(tp_rank *r, void *arg) {
  layout_run *run = arg;
  const tp_layout *L = run->L;
  const test_case *tc = run->tc;
  m3_model *m = NULL;
  tp_failure why;
  m3_status st = tp_load(r, L, tc->dir, &m);
  const int V = st == M3_OK ? m3_model_config(m)->vocab_size : 0;
  const size_t bytes = (size_t)POSITIONS * V * sizeof(float);
  if (st == M3_OK && V != tc->V)
    st = m3_fail(M3_ERR_ARG, "the rank's vocabulary is %d, the whole model's %d", V, tc->V);
  if (st == M3_OK && (!(run->logits[r->rank] = malloc(bytes)) ||
                      !(run->graph_logits[r->rank] = malloc(bytes)) ||
                      !(run->p2p_logits[r->rank] = malloc(bytes))))
    st = m3_fail(M3_ERR_NOMEM, "logits of %d positions", POSITIONS);
  if (st == M3_OK) st = tp_attach(r, L, m, 1, 0);
  if (!tp_agree(r, L, st, &why)) {
    if (r->rank == 0) {
      /* A config the layout does not divide is refused by design: the case does not apply. */
      const int refused =
          !tc->must_run && (why.status == M3_ERR_CONFIG || why.status == M3_ERR_SHAPE);
      skipped += refused;
      failed += !refused;
      printf("%s %s %s: rank %d: %s\n", refused ? "SKIP" : "FAIL", L->name, tc->label, why.rank,
             why.message);
    }
    m3_model_free(m);
    return;
  }
  if (r->rank == 0) run->part = m3_model_config(m);
  int32_t ids[PROMPT];
  prompt_ids(V, ids);
  /* Collectives from here on: a failure ends the process (tp_must). */
  tp_must(r, tp_greedy(m, ids, PROMPT, STEPS, run->logits[r->rank], run->tokens[r->rank]),
          "the forward, op by op");
  tp_must(r, tp_wait(r), "wait after the forward");
  tp_must(r, tp_attach(r, L, m, 1, M3_ALL_REDUCE_CAPTURABLE), "set the capturable hook");
  const m3_step_graph_stats before = m3_model_graph_stats(m);
  tp_must(r, tp_greedy(m, ids, PROMPT, STEPS, run->graph_logits[r->rank],
                       run->graph_tokens[r->rank]), "the forward with graphs");
  tp_must(r, tp_wait(r), "wait after the forward with graphs");
  const m3_step_graph_stats after = m3_model_graph_stats(m);
  run->replayed[r->rank] = after.replayed - before.replayed;
  if (r->rank == 0) run->graphs_enabled = after.enabled;
  if (tp_agree(r, L, tp_attach_p2p(r, L, m, M3_ALL_REDUCE_CAPTURABLE), NULL)) {
    /* (Taken after the hook is set: setting it drops the recorded steps, which record anew.) */
    const m3_step_graph_stats p2p_before = m3_model_graph_stats(m);
    tp_must(r, tp_greedy(m, ids, PROMPT, STEPS, run->p2p_logits[r->rank], run->p2p_tokens[r->rank]),
            "the forward peer to peer");
    tp_must(r, tp_wait(r), "wait after the forward peer to peer");
    run->p2p_replayed[r->rank] = m3_model_graph_stats(m).replayed - p2p_before.replayed;
    run->p2p_ran = 1;
  }
  tp_sync(L);
  if (r->rank == 0) {
    compare_whole(run);
    compare_graphs(run);
    compare_p2p(run);
  }
  tp_sync(L); /* rank 0 has read every rank's buffers */
  m3_model_free(m);
}

static void run_case(test_case *tc) {
  fprintf(stderr, "   %s: 1 GPU\n", tc->label);
  tp_run(tc->label, JOB_S, job_reference, tc);
  if (!tc->ref) return;
  for (size_t i = 0; i < sizeof layouts / sizeof layouts[0]; i++) {
    layout_run run = {.tc = tc, .L = &layouts[i]};
    fprintf(stderr, "   %s: %s\n", tc->label, run.L->name);
    tp_run(tc->label, JOB_S, job_layout, &run);
    for (int g = 0; g < GPUS; g++) {
      free(run.logits[g]);
      free(run.graph_logits[g]);
      free(run.p2p_logits[g]);
    }
  }
  free(tc->ref);
  tc->ref = NULL;
}

/* ---- main ---- */

static const char *const checkpoint_files[] = {"config.json", "model.safetensors", "tokenizer.json"};

/* A random MXFP8 model (the MXFP8 fixture's widths split no whole 32-column scale blocks): widths
 * multiples of 64, so each of 2 ranks holds whole blocks. */
static m3_status write_mxfp8(const char *dir) {
  m3_tiny_options o = m3_tiny_default_options();
  o.dtype = M3_TINY_MXFP8;
  o.layers = "FD,SM,FM,SM";
  o.hidden = 2048, o.heads = 16, o.kv_heads = 4, o.head_dim = 128, o.rotary_dim = 64;
  o.index_dim = 128, o.experts = 16, o.experts_per_token = 4, o.expert_width = 1024;
  o.shared_width = 1024, o.dense_width = 4096;
  o.no_vision = o.no_mtp = 1;
  return m3_tiny_write(dir, &o);
}

static void remove_checkpoint(const char *dir) {
  char path[4200];
  for (size_t i = 0; i < sizeof checkpoint_files / sizeof checkpoint_files[0]; i++) {
    snprintf(path, sizeof path, "%s/%s", dir, checkpoint_files[i]);
    unlink(path);
  }
  rmdir(dir);
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc > 2) {
    fprintf(stderr, "usage: test_tp [FULL_WIDTH_MODEL_DIR]\n");
    return 2;
  }
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count < GPUS) {
    printf("SKIP: test_tp needs %d GPUs; found %d (%s)\n", GPUS, e == cudaSuccess ? count : 0,
           cudaGetErrorString(e));
    return 77;
  }
  static const char *const fixtures[] = {"full_dense_gqa2_f32", "gqa8_local2_tied_f32",
                                         "long_sparse_gqa4_f32", "mixed_bf16",
                                         "mixed_gqa4_rot_half_f32", "mxfp8", "vl_inspect_f32"};
  enum { N_FIXTURES = sizeof fixtures / sizeof fixtures[0] };
  static test_case cases[N_FIXTURES + 2];
  int n_cases = 0;
  const char *src = getenv("M3_SOURCE_DIR");
  for (int i = 0; i < N_FIXTURES; i++, n_cases++) {
    snprintf(cases[i].dir, sizeof cases[i].dir, "%s/tests/fixtures/text/%s", src ? src : M3_SOURCE_DIR,
             fixtures[i]);
    snprintf(cases[i].label, sizeof cases[i].label, "%s", fixtures[i]);
  }
  char random_dir[] = "/tmp/m3-test-tp-XXXXXX";
  if (!mkdtemp(random_dir) || write_mxfp8(random_dir) != M3_OK) {
    printf("FATAL: writing the random MXFP8 model into %s: %s\n", random_dir, m3_last_error());
    return 1;
  }
  snprintf(cases[n_cases].dir, sizeof cases[n_cases].dir, "%s", random_dir);
  snprintf(cases[n_cases].label, sizeof cases[n_cases].label, "random-mxfp8(FD,SM,FM,SM, hidden 2048)");
  cases[n_cases++].must_run = 1;
  if (argc == 2) {
    snprintf(cases[n_cases].dir, sizeof cases[n_cases].dir, "%s", argv[1]);
    snprintf(cases[n_cases].label, sizeof cases[n_cases].label, "full-width(%s)", argv[1]);
    cases[n_cases].must_run = 1;
    n_cases++;
  }
  if (tp_start(GPUS) != M3_OK) {
    printf("FATAL: %s\n", m3_last_error());
    remove_checkpoint(random_dir);
    return 1;
  }
  printf("test_tp: TP2 and EP2 over GPUs 0 and 1 (of %d), one thread each, against the whole "
         "model on GPU 0; prompt %d tokens, then %d greedy steps\n", count, PROMPT, STEPS);
  for (int i = 0; i < n_cases; i++) run_case(&cases[i]);
  tp_stop();
  remove_checkpoint(random_dir);
  printf("test_tp: %d passed, %d failed, %d skipped\n", passed, failed, skipped);
  return failed ? 1 : 0;
}
