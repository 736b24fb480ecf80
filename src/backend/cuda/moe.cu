/* moe.cu: MoE routing (shared/spec/m3_text_spec.md §3.5) on the GPU, all in float32: sigmoid
 * scores, biased top-k with the CPU's order (ties to the lower expert, NaN last), weights
 * renormalised over the chosen experts in choice order and scaled. */
#include <math.h>

#include "backend/cuda/cuda_ops.h"

enum { ROUTE_THREADS = 128, ROUTE_MAX_K = 64 };

/* One block per token. Shared memory: s [E] floats, then the choice keys [E]. */
__global__ void __launch_bounds__(ROUTE_THREADS)
    moe_route_kernel(const float *__restrict__ logits, const float *__restrict__ bias, int E, int k,
                     float scaling, int32_t *__restrict__ ids, float *__restrict__ weights) {
  extern __shared__ float s[];
  uint32_t *keys = (uint32_t *)(s + E);
  __shared__ int32_t chosen[ROUTE_MAX_K];
  const int t = blockIdx.x;
  const float *l = logits + (size_t)t * E;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    float se = 1.0f / (1.0f + expf(-l[e]));
    s[e] = se;
    keys[e] = score_key(bias ? se + bias[e] : se);
  }
  __syncthreads();
  block_topk(keys, E, k, chosen);
  if (threadIdx.x == 0) {
    float sum = 0.0f;
    for (int j = 0; j < k; j++) sum += s[chosen[j]];
    for (int j = 0; j < k; j++) {
      ids[(size_t)t * k + j] = chosen[j];
      weights[(size_t)t * k + j] = __fmul_rn(s[chosen[j]] / sum, scaling);
    }
  }
}

void cuda_moe_route(m3_backend *be, const float *logits, const float *bias, int T, int E, int k,
                    float scaling, int32_t *ids, float *weights) {
  cuda_backend *cb = cuda_of(be);
  if (T <= 0) return;
  if (k <= 0 || k > E || k > ROUTE_MAX_K) {
    cuda_note(cb, cudaErrorInvalidValue, "moe_route (k outside 1..min(E, 64))");
    return;
  }
  size_t smem = (size_t)E * (sizeof(float) + sizeof(uint32_t));
  moe_route_kernel<<<T, ROUTE_THREADS, smem, cb->stream>>>(logits, bias, E, k, scaling, ids, weights);
  cuda_launched(cb, "moe_route");
}
