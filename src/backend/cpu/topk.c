/* topk.c: deterministic top-k shared by MoE routing and MSA block selection. */
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
