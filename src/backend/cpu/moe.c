/* moe.c: MoE routing and the routed experts (shared/spec/m3_text_spec.md §3.5), all in float32.
 * The experts group the (token, choice) slots by expert so each expert's weights stream through
 * once per call, as one batched matmul over the tokens that chose it. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_internal.h"

void cpu_moe_route(m3_backend *be, const float *logits, const float *bias, int T, int E, int k,
                   float scaling, int32_t *ids, float *weights) {
  (void)be;
  float *s = malloc(2 * (size_t)E * sizeof(float));
  if (!s) { /* Out of memory in an op that cannot fail: a visibly invalid routing. */
    for (int i = 0; i < T * k; i++) ids[i] = -1, weights[i] = NAN;
    return;
  }
  float *choice = s + E;
  for (int t = 0; t < T; t++) {
    const float *l = logits + (size_t)t * E;
    for (int e = 0; e < E; e++) {
      s[e] = 1.0f / (1.0f + expf(-l[e]));
      choice[e] = bias ? s[e] + bias[e] : s[e];
    }
    int32_t *id = ids + (size_t)t * k;
    float *wt = weights + (size_t)t * k;
    cpu_topk(choice, E, k, id);
    float sum = 0;
    for (int j = 0; j < k; j++) sum += s[id[j]];
    for (int j = 0; j < k; j++) wt[j] = s[id[j]] / sum * scaling;
  }
  free(s);
}

/* ---- routed experts ---- */

/* The T*k (token, choice) slots grouped by local expert e = id - first, e in [0, E) (the experts
 * this rank holds, m3_moe_experts), stable in slot order (a counting sort): expert e owns sorted
 * positions [start[e], start[e + 1]); slot_at[p] is the slot t*k + j at sorted position p and
 * pos_of[slot] its position, or one of: */
enum {
  NO_EXPERT = -1,  /* a negative id: no expert at all (moe_route out of memory): the row is NaN */
  OTHER_RANK = -2, /* an expert outside [first, first + E): another rank adds it, skipped here */
};
typedef struct {
  int32_t *start;   /* [E + 1] */
  int32_t *slot_at; /* [T*k] */
  int32_t *pos_of;  /* [T*k] */
} expert_groups;

/* The local expert of router id `id`, or -1 when this rank does not hold it. */
static int local_expert(int32_t id, int first, int E) {
  return id >= first && id - first < E ? id - first : -1; /* id >= first >= 0: no overflow */
}

static void group_slots(const int32_t *ids, int n, int first, int E, expert_groups *g) {
  for (int e = 0; e <= E; e++) g->start[e] = 0;
  for (int i = 0; i < n; i++) {
    const int e = local_expert(ids[i], first, E);
    if (e >= 0) g->start[e + 1]++;
  }
  for (int e = 0; e < E; e++) g->start[e + 1] += g->start[e];
  /* start[e] advances as slots are placed; start[e] of the next expert restores it afterwards. */
  for (int i = 0; i < n; i++) {
    const int e = local_expert(ids[i], first, E);
    if (e < 0) {
      g->pos_of[i] = ids[i] < 0 ? NO_EXPERT : OTHER_RANK;
      continue;
    }
    g->slot_at[g->start[e]] = i;
    g->pos_of[i] = g->start[e]++;
  }
  for (int e = E; e > 0; e--) g->start[e] = g->start[e - 1];
  g->start[0] = 0;
}

typedef struct {
  const cpu_kernels *k;
  float *x;
  const float *y, *weights;
  const int32_t *pos_of;
  int k_per_tok, H;
} combine_job;

/* x[t] += w[t, j] * y[pos_of[t*k + j]] for j in order, skipping other ranks' experts; a choice
 * of no expert makes the row NaN. */
static void combine_rows(void *ctx, int64_t t0, int64_t t1, int worker) {
  (void)worker;
  const combine_job *job = ctx;
  const int k = job->k_per_tok, H = job->H;
  for (int64_t t = t0; t < t1; t++) {
    float *xt = job->x + t * H;
    for (int j = 0; j < k; j++) {
      int32_t p = job->pos_of[t * k + j];
      if (p == OTHER_RANK) continue;
      if (p == NO_EXPERT) {
        for (int c = 0; c < H; c++) xt[c] = NAN;
        break;
      }
      job->k->axpy(xt, job->weights[t * k + j], job->y + (size_t)p * H, H);
    }
  }
}

/* x[t] += shared_down(SwiGLU_OAI(shared_gate h[t], shared_up h[t])): the ops the model ran for
 * the shared expert before the experts op took it, in the same order (x + the expert, as add). */
static void add_shared_expert(m3_backend *be, const m3_moe_experts *ex, const float *h, int T,
                              float *x) {
  const int64_t H = ex->shared_down->rows, S = ex->shared_gate->rows;
  float *gate = malloc(((size_t)T * (2 * (size_t)S + (size_t)H)) * sizeof(float));
  if (!gate) { /* out of memory in an op that cannot fail: a visibly invalid residual stream */
    for (size_t i = 0; i < (size_t)T * H; i++) x[i] = NAN;
    return;
  }
  float *up = gate + (size_t)T * S, *out = up + (size_t)T * S;
  cpu_matmul(be, ex->shared_gate, h, T, gate);
  cpu_matmul(be, ex->shared_up, h, T, up);
  cpu_swiglu_oai(be, gate, up, (size_t)T * S, ex->alpha, ex->beta, ex->limit, gate);
  cpu_matmul(be, ex->shared_down, gate, T, out);
  cpu_add(be, x, out, (size_t)T * H);
  free(gate);
}

void cpu_moe_experts(m3_backend *be, const m3_moe_experts *ex, const float *h, int T,
                     const int32_t *ids, const float *weights, int k, float *x) {
  cpu_backend *cb = cpu_of(be);
  if (T <= 0 || k <= 0) return;
  const int E = ex->E, n = T * k;
  const int64_t H = ex->gate[0].cols, I = ex->gate[0].rows;
  int32_t *ints = malloc(((size_t)E + 1 + 2 * (size_t)n) * sizeof(int32_t));
  expert_groups g = {ints, ints ? ints + E + 1 : NULL, ints ? ints + E + 1 + n : NULL};
  int max_rows = 0;
  if (ints) {
    group_slots(ids, n, ex->first, E, &g);
    for (int e = 0; e < E; e++)
      if (g.start[e + 1] - g.start[e] > max_rows) max_rows = g.start[e + 1] - g.start[e];
  }
  /* rows [n, H]: h gathered in sorted order, then each expert's output in place of its input;
   * gate, up [max_rows, I] of the current expert. */
  float *rows = ints ? malloc(((size_t)n * H + 2 * (size_t)max_rows * I) * sizeof(float)) : NULL;
  if (!rows) { /* Out of memory in an op that cannot fail: a visibly invalid residual stream. */
    for (size_t i = 0; i < (size_t)T * H; i++) x[i] = NAN;
    free(ints);
    return;
  }
  float *gate = rows + (size_t)n * H, *up = gate + (size_t)max_rows * I;
  for (int p = 0; p < g.start[E]; p++)
    memcpy(rows + (size_t)p * H, h + (size_t)(g.slot_at[p] / k) * H, (size_t)H * sizeof(float));
  for (int e = 0; e < E; e++) {
    const int first = g.start[e], cnt = g.start[e + 1] - first;
    if (cnt == 0) continue;
    float *xe = rows + (size_t)first * H;
    cpu_matmul(be, &ex->gate[e], xe, cnt, gate);
    cpu_matmul(be, &ex->up[e], xe, cnt, up);
    cpu_swiglu_oai(be, gate, up, (size_t)cnt * I, ex->alpha, ex->beta, ex->limit, gate);
    cpu_matmul(be, &ex->down[e], gate, cnt, xe);
  }
  combine_job job = {cb->k, x, rows, weights, g.pos_of, k, (int)H};
  m3_parallel_for(cb->pool, T, (int64_t)T * H * k < (1 << 15) ? T : 0, combine_rows, &job);
  free(rows);
  free(ints);
  if (ex->shared_gate) add_shared_expert(be, ex, h, T, x);
}
