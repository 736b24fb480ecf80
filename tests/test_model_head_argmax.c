/* test_model_head_argmax: the greedy forward of a vocabulary-split lm_head (model.h
 * m3_model_forward_batch_argmax, issue 11), whose ranks exchange each row's best candidate of
 * their slice (backend argmax_pairs, combined by m3_model_head_pick) instead of its logits.
 *   pick       the combination alone, against the greedy pick written here (engine/sampler.c's
 *              scan: the first index of the largest value, a NaN never taken but one at index 0
 *              kept) and against the backend's argmax_rows, on rows of every kind: random; small
 *              integers (ties inside and across slices); a NaN at index 0 with +inf later; a NaN
 *              opening a later slice whose best comes after it; scattered NaN and infinities; all
 *              NaN; all -inf; -inf then NaN; -0 against +0 across slices; the top tied on both
 *              sides of a slice border; cut into W = 1..5 equal slices and at random ragged
 *              points, each rank's candidates written into its part of a zeroed [W, n, 2] buffer
 *              and summed over the ranks as the all-reduce does; hand-made candidates (ties to the
 *              lower rank, +inf and -inf ties);
 *   forwards   the world's ranks in lockstep (one CPU backend and thread each, a host all-reduce
 *              hook) on committed fixtures whose vocabulary the world divides: a 300-token prompt
 *              with every row's logits (two head chunks of 256 and 44 rows) and greedy decode
 *              steps, each run as the logits forward and then again as the argmax forward at the
 *              same positions: the ids equal the argmax of the same ranks' logits rows exactly and
 *              the whole model's (one rank) greedy picks; the argmax forward's head all-reduces
 *              carry W x rows x 2 floats; ranks of odd index ask for no ids (NULL). tp 2 (untied
 *              head), tp 4 (tied head), tp 2 x ep 2 (MoE), and ep 2 on a CPU backend claiming
 *              device memory (the candidates move through the host mirror);
 *   refusals   the argmax forward of a whole model without a tokens buffer. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "lockstep.h"
#include "mirror_backend.h"
#include "model/model.h"
#include "random.h"

enum { MAX_RANKS = LOCKSTEP_MAX_RANKS, PROMPT = 300, DECODE = 3, MAX_POS = PROMPT + DECODE };

static const char *fixture(const char *name) {
  static char path[4096];
  snprintf(path, sizeof path, "%s/tests/fixtures/text/%s", M3_SOURCE_DIR, name);
  return path;
}

/* engine/sampler.c's greedy pick, written again: only a strictly larger value moves the choice. */
static int32_t greedy_pick(const float *l, int n) {
  int32_t best = 0;
  for (int32_t i = 1; i < n; i++)
    if (l[i] > l[best]) best = i;
  return best;
}

/* ---- pick ---- */

enum { V = 240, ROWS = 12, KINDS = 12 };

/* Row kind k of V entries; `border` is a slice border the tie kinds straddle. */
static void make_row(float *l, int kind, int border) {
  for (int i = 0; i < V; i++) {
    const uint32_t u = rnd() % 100;
    l[i] = uniform(-20, 20);
    if (kind == 1) l[i] = (float)((int)(rnd() % 4) - 2);
    if (kind == 2) l[i] = u < 10 ? -INFINITY : u < 20 ? NAN : u < 22 ? INFINITY : l[i];
    if (kind == 5) l[i] = NAN;
    if (kind == 6) l[i] = -INFINITY;
    if (kind == 8) l[i] = u < 40 ? -0.0f : u < 50 ? 0.0f : -1.0f;
  }
  if (kind == 3) {
    l[0] = NAN;
    l[V - 1] = INFINITY;
  }
  if (kind == 4 && border < V) { /* a NaN opens the slice; its best (and the row's) is after it */
    l[border] = NAN;
    l[border + 1 < V ? border + 1 : border] = 50.0f;
  }
  if (kind == 7) {
    l[0] = -INFINITY;
    for (int i = 1; i < V; i++) l[i] = NAN;
  }
  if (kind == 9 && border > 0 && border < V) l[border - 1] = l[border] = 40.0f;
  if (kind == 10) { /* -0 first on the later side of the border, +0 after: equal, lower wins */
    for (int i = 0; i < V; i++) l[i] = -1.0f;
    if (border < V) l[border] = -0.0f;
    l[V - 1] = 0.0f;
  }
  if (kind == 11 && border < V) { /* +inf on both sides, the row's first at the border */
    l[border] = INFINITY;
    l[V - 1] = INFINITY;
  }
}

/* Rows cut at cuts[0] = 0 < cuts[1] < ... < cuts[W] = V: each rank's candidates in its part of
 * its own zeroed [W, ROWS, 2] buffer, the buffers summed in rank order (the all-reduce), then
 * picked; against greedy_pick and argmax_rows of the whole rows. */
static void check_cuts(m3_backend *be, const float *rows, const int *cuts, int W) {
  const size_t part = 2 * ROWS, total = (size_t)W * part;
  float *own = calloc(total * (size_t)W, sizeof *own), *sum = calloc(total, sizeof *sum);
  int32_t got[ROWS], whole[ROWS];
  for (int r = 0; r < W; r++) {
    const int cols = cuts[r + 1] - cuts[r];
    float *slice = malloc((size_t)ROWS * (size_t)cols * sizeof *slice);
    float *mine = own + (size_t)r * total + (size_t)r * part; /* rank r's part of its buffer */
    for (int t = 0; t < ROWS; t++)
      memcpy(slice + (size_t)t * cols, rows + (size_t)t * V + cuts[r], (size_t)cols * 4);
    be->ops->argmax_pairs(be, slice, ROWS, cols, cuts[r], mine);
    for (int t = 0; t < ROWS; t++) { /* a candidate of the slice, its score the entry's value */
      const float *c = mine + 2 * t;
      const int i = (int)c[1];
      const float v = rows[(size_t)t * V + i];
      CHECK(i >= cuts[r] && i < cuts[r + 1] && c[1] == (float)i);
      CHECK(isnan(v) ? isinf(c[0]) && (c[0] > 0) == (i == 0) : c[0] == v);
    }
    free(slice);
  }
  for (size_t j = 0; j < total; j++) {
    float s = 0.0f;
    for (int r = 0; r < W; r++) s += own[(size_t)r * total + j];
    sum[j] = s;
  }
  m3_model_head_pick(sum, W, ROWS, got);
  CHECK_OK(be->ops->argmax_rows(be, rows, ROWS, V, whole));
  for (int t = 0; t < ROWS; t++) {
    const int32_t want = greedy_pick(rows + (size_t)t * V, V);
    if (got[t] != want || whole[t] != want)
      fprintf(stderr, "row %d (kind %d), %d slices: pick %d, argmax_rows %d, want %d\n", t,
              t % KINDS, W, got[t], whole[t], want);
    CHECK_EQ_INT(got[t], want);
    CHECK_EQ_INT(whole[t], want);
  }
  free(own);
  free(sum);
}

static void test_pick(void) {
  m3_backend *be = NULL;
  CHECK_OK(m3_backend_cpu_create(2, &be));
  if (!be) return;
  float *rows = malloc((size_t)ROWS * V * sizeof *rows);
  for (int round = 0; round < 20; round++)
    for (int W = 1; W <= 5; W++) {
      int cuts[6];
      for (int r = 0; r <= W; r++) cuts[r] = r * V / W; /* 240 divides by 1..5 */
      if (round % 2) /* ragged: random increasing cut points */
        for (int r = 1; r < W; r++) {
          const int lo = cuts[r - 1] + 1, hi = V - (W - r);
          cuts[r] = lo + (int)(rnd() % (uint32_t)(hi - lo + 1));
        }
      const int border = W > 1 ? cuts[1 + (int)(rnd() % (uint32_t)(W - 1))] : V / 2;
      for (int t = 0; t < ROWS; t++) make_row(rows + (size_t)t * V, t % KINDS, border);
      check_cuts(be, rows, cuts, W);
    }
  free(rows);
  be->ops->destroy(be);

  /* Hand-made candidates, [W = 3, n = 4, 2]: a tie of ranks 1 and 2 (rank 1 wins), the NaN at
   * index 0 (+inf) against a later +inf, all -inf (rank 0's index 0), the largest on rank 2. */
  const float pairs[3][4][2] = {
      {{1.0f, 5.0f}, {INFINITY, 0.0f}, {-INFINITY, 0.0f}, {2.0f, 7.0f}},
      {{3.0f, 120.0f}, {INFINITY, 130.0f}, {-INFINITY, 100.0f}, {2.0f, 101.0f}},
      {{3.0f, 250.0f}, {5.0f, 210.0f}, {-INFINITY, 200.0f}, {2.5f, 299.0f}}};
  int32_t ids[4];
  m3_model_head_pick(&pairs[0][0][0], 3, 4, ids);
  CHECK_EQ_INT(ids[0], 120);
  CHECK_EQ_INT(ids[1], 0);
  CHECK_EQ_INT(ids[2], 0);
  CHECK_EQ_INT(ids[3], 299);
  m3_model_head_pick(&pairs[0][0][0], 1, 4, ids); /* one rank: its own candidates */
  CHECK_EQ_INT(ids[0], 5);
  CHECK_EQ_INT(ids[3], 7);
}

/* ---- forwards ---- */

typedef struct {
  int tp, ep;
} layout;

static m3_status load(const char *dir, layout lay, int rank, int mirrored, m3_backend **be,
                      m3_model **m) {
  *m = NULL;
  *be = open_backend(mirrored);
  if (!*be) return M3_ERR_NOMEM;
  m3_model_load_options opts = {.tp_size = lay.tp, .tp_rank = rank % lay.tp, .ep_size = lay.ep,
                                .ep_rank = rank / lay.tp};
  return m3_model_load_with(dir, *be, &opts, m);
}

static void unload(m3_backend *be, m3_model *m) {
  m3_model_free(m);
  if (be) be->ops->destroy(be);
}

/* What one rank runs: the prompt (every row's logits, then its ids) and DECODE steps feeding
 * `feed` (the whole model's continuation), each as the logits forward then the argmax forward. */
typedef struct {
  m3_model *m;
  lockstep_group *g;
  int rank, want_ids;
  const int32_t *prompt, *feed;
  float *logits;       /* [MAX_POS, vocab] */
  int32_t ids[MAX_POS]; /* the argmax forward's, where want_ids */
  int head_calls_ok;   /* rank 0: every argmax forward's last world calls were W x rows x 2 */
  m3_status st;
} run;

/* Rank 0: the world calls of the argmax forward of T tokens that all want ids, exactly: per model
 * step (m3_model_step_tokens tokens at most) one per MoE layer ([tokens, hidden]), then one per
 * head chunk of at most 256 rows, W x rows x 2 floats (no logits). */
static int pairs_calls(const run *r, int T) {
  const m3_config *c = m3_model_config(r->m);
  const lockstep_group *g = r->g;
  int moe = 0, k = 0;
  for (int l = 0; l < c->num_layers; l++) moe += c->layer_mlp[l] == M3_MLP_MOE;
  for (int t0 = 0, S = m3_model_step_tokens(r->m); t0 < T; t0 += S) {
    const int n = T - t0 < S ? T - t0 : S;
    for (int l = 0; l < moe; l++, k++)
      if (k >= g->n_world_calls || g->world_calls[k] != (size_t)n * (size_t)c->hidden_size)
        return 0;
    for (int r0 = 0; r0 < n; r0 += 256, k++)
      if (k >= g->n_world_calls ||
          g->world_calls[k] != (size_t)g->world * (size_t)(n - r0 < 256 ? n - r0 : 256) * 2)
        return 0;
  }
  return k == g->n_world_calls;
}

static m3_status both_forwards(run *r, const lockstep_cache *kc, const int32_t *ids, const int32_t *pos,
                               int T, int row0) {
  const int Vw = m3_model_config(r->m)->vocab_size;
  const m3_model_seq seq = {.kv = kc->views, .ids = ids, .pos = pos, .T = T, .n_logits = T};
  m3_status st = m3_model_forward_batch(r->m, &seq, 1, r->logits + (size_t)row0 * Vw);
  if (r->rank == 0) r->g->n_world_calls = 0;
  if (st == M3_OK)
    st = m3_model_forward_batch_argmax(r->m, &seq, 1, NULL, r->want_ids ? r->ids + row0 : NULL,
                                       NULL);
  if (r->rank == 0) r->head_calls_ok &= pairs_calls(r, T);
  return st;
}

static void *run_rank(void *arg) {
  run *r = arg;
  lockstep_cache kc = {0};
  int32_t pos[MAX_POS];
  for (int t = 0; t < MAX_POS; t++) pos[t] = t;
  r->head_calls_ok = 1;
  r->st = lockstep_cache_make(r->m, MAX_POS, &kc);
  if (r->st == M3_OK) r->st = both_forwards(r, &kc, r->prompt, pos, PROMPT, 0);
  for (int i = 0; i < DECODE && r->st == M3_OK; i++)
    r->st = both_forwards(r, &kc, &r->feed[i], &pos[PROMPT + i], 1, PROMPT + i);
  lockstep_cache_free(r->m, &kc);
  return NULL;
}

/* The whole model: logits of the prompt's rows and of DECODE greedy steps; feed its
 * continuation (the argmax of each last row). */
static void reference(m3_model *m, const int32_t *prompt, float *logits, int32_t *feed) {
  const int Vw = m3_model_config(m)->vocab_size;
  lockstep_cache kc = {0};
  int32_t pos[MAX_POS];
  for (int t = 0; t < MAX_POS; t++) pos[t] = t;
  CHECK_OK(lockstep_cache_make(m, MAX_POS, &kc));
  CHECK_OK(m3_model_forward(m, kc.views, prompt, pos, PROMPT, logits, NULL));
  for (int i = 0; i < DECODE; i++) {
    const int p = PROMPT + i;
    feed[i] = greedy_pick(logits + (size_t)(p - 1) * Vw, Vw);
    CHECK_OK(m3_model_forward(m, kc.views, &feed[i], &pos[p], 1, logits + (size_t)p * Vw, NULL));
  }
  lockstep_cache_free(m, &kc);
}

static void check_layout(const char *name, layout lay, int mirrored) {
  const int world = lay.tp * lay.ep;
  m3_backend *be = NULL, *bes[MAX_RANKS] = {0};
  m3_model *whole = NULL, *parts[MAX_RANKS] = {0};
  CHECK_OK(load(fixture(name), (layout){1, 1}, 0, 0, &be, &whole));
  for (int r = 0; r < world; r++)
    CHECK_OK(load(fixture(name), lay, r, mirrored, &bes[r], &parts[r]));
  if (!whole || !parts[world - 1]) goto done;
  const int Vw = m3_model_config(whole)->vocab_size;
  CHECK_EQ_INT(m3_model_head_slices(parts[0]), world);
  int32_t prompt[PROMPT], feed[DECODE];
  for (int t = 0; t < PROMPT; t++) prompt[t] = (int32_t)((t * 37 + 11) % Vw);
  const size_t logits_n = (size_t)MAX_POS * Vw;
  float *ref = malloc(logits_n * sizeof *ref);
  reference(whole, prompt, ref, feed);
  lockstep_group g = {.tp = lay.tp, .world = world};
  pthread_barrier_init(&g.barrier, NULL, (unsigned)world);
  lockstep_rank users[MAX_RANKS];
  run runs[MAX_RANKS];
  pthread_t threads[MAX_RANKS];
  for (int r = 0; r < world; r++) {
    users[r] = (lockstep_rank){&g, r};
    CHECK_OK(m3_model_set_all_reduce(parts[r], lockstep_all_reduce, &users[r], 0));
    runs[r] = (run){.m = parts[r], .g = &g, .rank = r, .want_ids = r % 2 == 0, .prompt = prompt,
                    .feed = feed, .logits = malloc(logits_n * sizeof(float))};
  }
  for (int r = 0; r < world; r++) pthread_create(&threads[r], NULL, run_rank, &runs[r]);
  for (int r = 0; r < world; r++) pthread_join(threads[r], NULL);
  int differ_rows = 0, differ_whole = 0;
  for (int r = 0; r < world; r++) {
    CHECK_OK(runs[r].st);
    if (!runs[r].want_ids) continue;
    for (int p = 0; p < MAX_POS; p++) {
      differ_rows += runs[r].ids[p] != greedy_pick(runs[0].logits + (size_t)p * Vw, Vw);
      differ_whole += runs[r].ids[p] != greedy_pick(ref + (size_t)p * Vw, Vw);
    }
  }
  CHECK_EQ_INT(differ_rows, 0);
  CHECK_EQ_INT(differ_whole, 0);
  CHECK(runs[0].head_calls_ok);
  printf("%-24s tp %d ep %d%s: %d rows x %d ranks with ids, %d differ from the ranks' logits, %d "
         "from the whole model's; head all-reduces of %s\n",
         name, lay.tp, lay.ep, mirrored ? " (device memory)" : "", MAX_POS, (world + 1) / 2,
         differ_rows, differ_whole, runs[0].head_calls_ok ? "W x rows x 2 floats" : "other sizes");
  pthread_barrier_destroy(&g.barrier);
  for (int r = 0; r < world; r++) free(runs[r].logits);
  free(ref);
done:
  unload(be, whole);
  for (int r = 0; r < world; r++) unload(bes[r], parts[r]);
}

static void check_refusal(void) {
  m3_backend *be = NULL;
  m3_model *m = NULL;
  CHECK_OK(load(fixture("full_dense_gqa2_f32"), (layout){1, 1}, 0, 0, &be, &m));
  if (!m) return;
  lockstep_cache kc = {0};
  CHECK_OK(lockstep_cache_make(m, MAX_POS, &kc));
  const int32_t id = 5, pos = 0;
  float logits[320];
  const m3_model_seq seq = {.kv = kc.views, .ids = &id, .pos = &pos, .T = 1, .n_logits = 1};
  CHECK_FAILS_WITH(m3_model_forward_batch_argmax(m, &seq, 1, logits, NULL, NULL), M3_ERR_ARG,
                   "without a tokens buffer");
  lockstep_cache_free(m, &kc);
  unload(be, m);
}

int main(void) {
  test_pick();
  check_layout("full_dense_gqa2_f32", (layout){2, 1}, 0);
  check_layout("gqa8_local2_tied_f32", (layout){4, 1}, 0);
  check_layout("mixed_bf16", (layout){2, 2}, 0);
  check_layout("mixed_bf16", (layout){1, 2}, 1);
  check_refusal();
  return check_summary();
}
