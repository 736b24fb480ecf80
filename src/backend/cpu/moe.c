/* moe.c: MoE routing (shared/spec/m3_text_spec.md §3.5), all in float32. */
#include <math.h>
#include <stdlib.h>

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
