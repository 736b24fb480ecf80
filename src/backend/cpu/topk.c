/* topk.c: deterministic top-k shared by MoE routing and MSA block selection, and the greedy argmax
 * of logits rows. */
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

typedef struct {
  const float *logits;
  int vocab;
  int32_t *out;
} argmax_job;

/* The scan of engine/sampler.c's greedy pick: only a strictly larger value moves the choice, so
 * ties keep the lower index and NaN never takes it (one at index 0 keeps it). */
static void argmax_range(void *ctx, int64_t r0, int64_t r1, int worker) {
  (void)worker;
  const argmax_job *job = ctx;
  for (int64_t r = r0; r < r1; r++) {
    const float *l = job->logits + r * job->vocab;
    int32_t best = 0;
    for (int32_t i = 1; i < job->vocab; i++)
      if (l[i] > l[best]) best = i;
    job->out[r] = best;
  }
}

m3_status cpu_argmax_rows(m3_backend *be, const float *logits, int nrows, int vocab,
                          int32_t *out) {
  if (nrows <= 0) return M3_OK;
  argmax_job job = {logits, vocab, out};
  /* A row per chunk (the rows of a step are long and few), unless waking the pool costs more. */
  const int64_t chunk = (int64_t)nrows * vocab < (1 << 15) ? nrows : 1;
  m3_parallel_for(cpu_of(be)->pool, nrows, chunk, argmax_range, &job);
  return M3_OK;
}
