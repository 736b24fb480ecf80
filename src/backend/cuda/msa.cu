/* msa.cu: MSA block selection (shared/spec/msa_spec.md §2-4, m3_text_spec.md §5.3).
 *
 * Scores: one thread block per (candidate block, token), each index key read once for all G heads:
 * a warp per key, lanes over the index dims, so a decode token's O(L) scan of the index keys is
 * spread over the whole GPU and read at full width. Selection: one thread block per (token, index
 * head): forced init and local blocks, then the best candidates by (score, lower id), written in
 * ascending block order, -1 padded; the same rules as the CPU backend's msa.c. */
#include <math.h>

#include "backend/cuda/cuda_ops.h"

enum { MSA_MAX_G = 16, SCORE_WARPS = 4, SELECT_THREADS = 256 };

typedef struct {
  const float *iq; /* [T, G, ihd] */
  int G;
  m3_kv_view kv;
  const int32_t *pos;
  m3_msa_params p;
  float *scores;   /* [T, G, kv.num_blocks] */
  int32_t *sel;    /* [T, G, topk] */
} msa_args;

/* Visible blocks of position p and the candidate range [c0, c1) ranked by score; 0 when every
 * visible block is selected anyway. */
__device__ __forceinline__ int msa_candidates(const msa_args &a, int32_t p, int *nb, int *c0, int *c1) {
  *nb = p < 0 ? 0 : (p / a.kv.block_size + 1 < a.kv.num_blocks ? p / a.kv.block_size + 1 : a.kv.num_blocks);
  if (*nb <= a.p.topk) return 0;
  *c0 = a.p.init_blocks < *nb ? a.p.init_blocks : *nb;
  *c1 = *nb - a.p.local_blocks > *c0 ? *nb - a.p.local_blocks : *c0;
  return 1;
}

__global__ void __launch_bounds__(32 * SCORE_WARPS) msa_score_kernel(msa_args a) {
  extern __shared__ float q[]; /* [G, ihd] */
  __shared__ float warp_best[SCORE_WARPS][MSA_MAX_G];
  const int b = blockIdx.x, t = blockIdx.y;
  const int32_t p = a.pos[t];
  int nb, c0, c1;
  if (!msa_candidates(a, p, &nb, &c0, &c1) || b < c0 || b >= c1) return;
  const int G = a.G, ihd = a.kv.ihd, bs = a.kv.block_size;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < G * ihd; i += blockDim.x) q[i] = a.iq[(size_t)t * G * ihd + i];
  __syncthreads();
  const int n = p - b * bs + 1 < bs ? p - b * bs + 1 : bs;
  const float *keys = a.kv.ik + (size_t)a.kv.block_table[b] * bs * ihd;
  float best[MSA_MAX_G];
#pragma unroll
  for (int g = 0; g < MSA_MAX_G; g++) best[g] = -INFINITY; /* NaN dots never win */
  for (int j = warp; j < n; j += SCORE_WARPS) {
    const float *key = keys + (size_t)j * ihd;
    float dot[MSA_MAX_G];
#pragma unroll
    for (int g = 0; g < MSA_MAX_G; g++) dot[g] = 0.0f;
    for (int d = lane; d < ihd; d += 32) {
      const float kd = key[d];
#pragma unroll
      for (int g = 0; g < MSA_MAX_G; g++)
        if (g < G) dot[g] += q[g * ihd + d] * kd;
    }
#pragma unroll
    for (int g = 0; g < MSA_MAX_G; g++)
      if (g < G) {
        float s = warp_sum(dot[g]);
        if (s > best[g]) best[g] = s;
      }
  }
  if (lane == 0)
#pragma unroll
    for (int g = 0; g < MSA_MAX_G; g++)
      if (g < G) warp_best[warp][g] = best[g];
  __syncthreads();
  if (threadIdx.x < G) {
    float s = -INFINITY;
    for (int w = 0; w < SCORE_WARPS; w++)
      if (warp_best[w][threadIdx.x] > s) s = warp_best[w][threadIdx.x];
    a.scores[((size_t)t * G + threadIdx.x) * a.kv.num_blocks + b] = s;
  }
}

__global__ void __launch_bounds__(SELECT_THREADS) msa_select_kernel(msa_args a) {
  extern __shared__ uint32_t keys[]; /* [candidates] */
  __shared__ int forced, want;
  const int t = blockIdx.x / a.G, g = blockIdx.x % a.G, topk = a.p.topk;
  const int32_t p = a.pos[t];
  int32_t *out = a.sel + ((size_t)t * a.G + g) * topk;
  int nb, c0, c1;
  if (!msa_candidates(a, p, &nb, &c0, &c1)) {
    for (int i = threadIdx.x; i < topk; i += blockDim.x) out[i] = i < nb ? i : -1;
    return;
  }
  if (threadIdx.x == 0) {
    /* Forced blocks: init, then local (vLLM scores them 1e30 and 1e29), which only matters when
     * they alone exceed topk. */
    int n = 0;
    for (int blk = 0; blk < c0 && n < topk; blk++) out[n++] = blk;
    for (int blk = c1; blk < nb && n < topk; blk++) out[n++] = blk;
    forced = n;
    want = topk - n < c1 - c0 ? topk - n : c1 - c0;
  }
  const float *s = a.scores + ((size_t)t * a.G + g) * a.kv.num_blocks + c0;
  for (int i = threadIdx.x; i < c1 - c0; i += blockDim.x) keys[i] = score_key(s[i]);
  __syncthreads();
  if (want > 0) block_topk(keys, c1 - c0, want, out + forced);
  if (threadIdx.x == 0) {
    int n = forced + (want > 0 ? want : 0);
    for (int i = forced; i < n; i++) out[i] += c0;
    for (int i = 1; i < n; i++) /* ascending block ids */
      for (int j = i; j > 0 && out[j - 1] > out[j]; j--) {
        int32_t tmp = out[j];
        out[j] = out[j - 1];
        out[j - 1] = tmp;
      }
    for (int i = n; i < topk; i++) out[i] = -1;
  }
}

void cuda_msa_select(m3_backend *be, const float *iq, int G, const m3_kv_view *kv,
                     const int32_t *pos, int T, const m3_msa_params *p, int32_t *sel) {
  cuda_backend *cb = cuda_of(be);
  if (T <= 0 || p->topk <= 0) return;
  if (G > MSA_MAX_G || kv->num_blocks <= 0) {
    cuda_note(cb, cudaErrorInvalidValue, "msa_select (more than 16 index heads or no blocks)");
    return;
  }
  msa_args a;
  a.iq = iq;
  a.G = G;
  a.kv = *kv;
  a.pos = pos;
  a.p = *p;
  a.sel = sel;
  a.scores = (float *)cuda_scratch(cb, (size_t)T * G * kv->num_blocks * sizeof(float), "msa_select");
  if (!a.scores) return;
  /* The positions live on the device: score blocks up to the table's end, and blocks past a
   * token's candidates return at once. */
  dim3 grid((unsigned)kv->num_blocks, (unsigned)T);
  msa_score_kernel<<<grid, 32 * SCORE_WARPS, (size_t)G * kv->ihd * sizeof(float), cb->stream>>>(a);
  cuda_launched(cb, "msa_select (scores)");
  size_t smem = (size_t)kv->num_blocks * sizeof(uint32_t);
  if (smem > 48 * 1024)
    cuda_note(cb, cudaFuncSetAttribute(msa_select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)smem), "msa_select (shared memory for the candidates)");
  msa_select_kernel<<<(unsigned)(T * G), SELECT_THREADS, smem, cb->stream>>>(a);
  cuda_launched(cb, "msa_select (top-k)");
}
