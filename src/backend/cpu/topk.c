/* topk.c: deterministic top-k shared by MoE routing and MSA block selection, and the greedy argmax
 * of logits rows (whole, or a vocabulary slice's candidate). */
#include <math.h>

#include "backend/cpu/cpu_internal.h"

/* NaN ranks as -inf; among equal scores the lower index wins. */
static int ranks_above(const float *score, int32_t a, int32_t b) {
  float sa = isnan(score[a]) ? -INFINITY : score[a];
  float sb = isnan(score[b]) ? -INFINITY : score[b];
  return sa > sb || (sa == sb && a < b);
}

void cpu_topk(const float *score, int n, int k, int32_t *idx) {
  int count = 0;
  for (int32_t i = 0; i < n; i++) {
    if (count == k && !ranks_above(score, i, idx[k - 1])) continue;
    int j = count < k ? count++ : k - 1;
    for (; j > 0 && ranks_above(score, i, idx[j - 1]); j--) idx[j] = idx[j - 1];
    idx[j] = i;
  }
}

/* The greedy pick's order as a score: a NaN as -inf (it never wins), except at whole-row index 0,
 * where engine/sampler.c's scan starts and a NaN stays (as +inf: nothing ranks above it, and a +inf
 * later ties it and loses on the index). */
static float pick_score(float v, int64_t index) {
  return isnan(v) ? (index == 0 ? INFINITY : -INFINITY) : v;
}

/* The entry of l[0..n) that the greedy pick's scan keeps, entry i being whole-row index first + i;
 * *score gets its pick_score. The scan of engine/sampler.c: only a strictly larger value moves the
 * choice, so ties keep the lower index and a NaN never takes it (NaN > x is false). */
static int32_t row_pick(const float *l, int n, int64_t first, float *score) {
  int32_t best = 0;
  float top = pick_score(l[0], first);
  for (int32_t i = 1; i < n; i++)
    if (l[i] > top) {
      top = l[i];
      best = i;
    }
  *score = top;
  return best;
}

typedef struct {
  const float *logits;
  int cols, first;
  int32_t *ids;  /* argmax_rows */
  float *pairs;  /* argmax_pairs */
} pick_job;

static void pick_range(void *ctx, int64_t r0, int64_t r1, int worker) {
  (void)worker;
  const pick_job *job = ctx;
  for (int64_t r = r0; r < r1; r++) {
    float score;
    const int32_t i = row_pick(job->logits + r * job->cols, job->cols, job->first, &score);
    if (job->ids) job->ids[r] = i;
    if (job->pairs) {
      job->pairs[2 * r] = score;
      job->pairs[2 * r + 1] = (float)(job->first + i);
    }
  }
}

static void pick_rows(m3_backend *be, pick_job *job, int nrows) {
  if (nrows <= 0 || job->cols <= 0) return;
  /* A row per chunk (the rows of a step are long and few), unless waking the pool costs more. */
  const int64_t chunk = (int64_t)nrows * job->cols < (1 << 15) ? nrows : 1;
  m3_parallel_for(cpu_of(be)->pool, nrows, chunk, pick_range, job);
}

m3_status cpu_argmax_rows(m3_backend *be, const float *logits, int nrows, int vocab,
                          int32_t *out) {
  pick_job job = {logits, vocab, 0, out, NULL};
  pick_rows(be, &job, nrows);
  return M3_OK;
}

void cpu_argmax_pairs(m3_backend *be, const float *logits, int nrows, int cols, int first,
                      float *pairs) {
  pick_job job = {logits, cols, first, NULL, pairs};
  pick_rows(be, &job, nrows);
}
