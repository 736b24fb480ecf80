/* msa.cu: MSA block selection (shared/spec/msa_spec.md §2-4, m3_text_spec.md §5.3).
 *
 * Scores: one thread block per (candidate block, token) scans the block's index keys once for all
 * G heads, which a decode token's O(L) scan spreads over the whole GPU. A warp takes 16/G keys per
 * step, the loads of several steps issued together (16-byte loads, each lane four dims of every
 * key, 16 loads in flight per lane); the queries of all heads sit in registers. The 16 partial
 * dots of a step per lane (keys x heads) are summed over the warp by a halving butterfly, 16
 * shuffles for all of them, and each lane keeps the running max of one (key slot, head); the block max per head follows.
 * Selection: one thread block per (token, index head): forced init and local blocks, then the best
 * candidates by (score, lower id): each warp draws its share's best, warp 0 draws the winners
 * from those; written in ascending block order, -1 padded. The same rules as the CPU backend's
 * msa.c. An fp8 cache's index keys are loaded as E4M3 bytes (4 per lane and load where float32
 * takes a float4) and decoded times their row scale in registers (kv_fp8.cuh). */
#include <math.h>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/kv_fp8.cuh"

enum {
  MSA_MAX_G = 16,
  MSA_MAX_IHD = 256,
  SCORE_WARPS = 8,
  SELECT_WARPS = 8,
};

typedef struct {
  const float *iq; /* [T, G, ihd] */
  int G;
  m3_kv_view kv;
  const int32_t *pos;
  m3_msa_params p;
  float *scores;   /* [T, G, kv.num_blocks] */
  size_t ik_page_bytes; /* fp8 cache: bytes of one index-key page */
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

/* One butterfly step over lanes L and L ^ O for v[0..2N): a lane keeps one half (the upper one
 * when bit O is set), sends the other to its partner and adds what the partner sent for the kept
 * half into v[0..N). */
template <int O, int N>
__device__ __forceinline__ void warp_halve(float (&v)[16], int lane) {
  const bool upper = (lane & O) != 0;
#pragma unroll
  for (int i = 0; i < N; i++) {
    const float send = upper ? v[i] : v[i + N];
    const float keep = upper ? v[i + N] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
  }
}

/* Sums each of v[0..16) over the warp in 16 shuffles; lane L gets the total of v[(L >> 1) & 15]. */
__device__ __forceinline__ float warp_sum16(float (&v)[16], int lane) {
  warp_halve<16, 8>(v, lane);
  warp_halve<8, 4>(v, lane);
  warp_halve<4, 2>(v, lane);
  warp_halve<2, 1>(v, lane);
  return v[0] + __shfl_xor_sync(0xffffffffu, v[0], 1);
}

/* GP: G rounded up to a power of two; CH: float4 chunks per lane, ihd <= 128 * CH; FP8: the
 * cache's dtype. */
template <int GP, int CH, bool FP8>
__global__ void __launch_bounds__(32 * SCORE_WARPS) msa_score_kernel(msa_args a) {
  constexpr int KPW = 16 / GP; /* keys per warp step: KPW * GP = 16 dots per lane */
  constexpr int SCORE_STEPS = GP / CH > 1 ? GP / CH : 1; /* steps loaded at once: 16 float4 per lane */
  __shared__ float warp_best[SCORE_WARPS][GP];
  const int b = blockIdx.x, t = blockIdx.y;
  const int32_t p = a.pos[t];
  int nb, c0, c1;
  if (!msa_candidates(a, p, &nb, &c0, &c1) || b < c0 || b >= c1) return; /* whole block */
  const int G = a.G, ihd = a.kv.ihd, ihd4 = ihd >> 2, bs = a.kv.block_size;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float4 q[GP][CH];
#pragma unroll
  for (int g = 0; g < GP; g++)
#pragma unroll
    for (int c = 0; c < CH; c++) {
      const int ch = lane + 32 * c;
      q[g][c] = g < G && ch < ihd4 ? ((const float4 *)(a.iq + ((size_t)t * G + g) * ihd))[ch]
                                   : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  const int n = p - b * bs + 1 < bs ? p - b * bs + 1 : bs;
  const int32_t page = a.kv.block_table[b];
  const float4 *keys = (const float4 *)((const float *)a.kv.ik + (size_t)page * bs * ihd);
  const kv8_rows keys8 = kv8_page_rows(a.kv.ik, a.ik_page_bytes, page, bs, ihd, 0);
  const int slot = (lane >> 1) & 15, slot_key = slot / GP, slot_head = slot % GP;
  float best = -INFINITY; /* of (key slot_key of each step, head slot_head); NaN dots never win */
  for (int j0 = warp * KPW * SCORE_STEPS; j0 < n; j0 += SCORE_WARPS * KPW * SCORE_STEPS) {
    /* float32: the keys; fp8: their bytes and row scales, decoded a step at a time (half the
     * registers of decoded keys, so the loads of all steps stay in flight). */
    float4 k[SCORE_STEPS][KPW][CH];
    uint32_t k8[SCORE_STEPS][KPW][CH];
    float k8s[SCORE_STEPS][KPW];
#pragma unroll
    for (int st = 0; st < SCORE_STEPS; st++)
#pragma unroll
      for (int kk = 0; kk < KPW; kk++) {
        const int j = j0 + st * KPW + kk;
        if constexpr (FP8) k8s[st][kk] = j < n ? keys8.scale[j] : 0.0f;
#pragma unroll
        for (int c = 0; c < CH; c++) {
          const int ch = lane + 32 * c;
          if constexpr (FP8)
            k8[st][kk][c] = j < n && ch < ihd4 ? ((const uint32_t *)keys8.q)[(size_t)j * ihd4 + ch] : 0u;
          else
            k[st][kk][c] = j < n && ch < ihd4 ? keys[(size_t)j * ihd4 + ch] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
      }
#pragma unroll
    for (int st = 0; st < SCORE_STEPS; st++) {
      float4 ks[KPW][CH]; /* this step's keys */
#pragma unroll
      for (int kk = 0; kk < KPW; kk++)
#pragma unroll
        for (int c = 0; c < CH; c++) {
          if constexpr (FP8) ks[kk][c] = kv8_dequant4(k8[st][kk][c], k8s[st][kk]);
          else ks[kk][c] = k[st][kk][c];
        }
      float v[16];
#pragma unroll
      for (int kk = 0; kk < KPW; kk++)
#pragma unroll
        for (int g = 0; g < GP; g++) {
          float d = 0.0f;
#pragma unroll
          for (int c = 0; c < CH; c++)
            d += q[g][c].x * ks[kk][c].x + q[g][c].y * ks[kk][c].y + q[g][c].z * ks[kk][c].z +
                 q[g][c].w * ks[kk][c].w;
          v[kk * GP + g] = d;
        }
      const float dot = warp_sum16(v, lane);
      if (j0 + st * KPW + slot_key < n) best = fmaxf(best, dot);
    }
  }
  /* Max over the lanes of one head: lane bits 1..log2(GP) hold the head. */
  best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, 1));
#pragma unroll
  for (int o = 2 * GP; o < 32; o <<= 1) best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, o));
  if ((lane & 1) == 0 && lane < 2 * GP) warp_best[warp][slot_head] = best;
  __syncthreads();
  if (threadIdx.x < G) {
    float s = -INFINITY;
#pragma unroll
    for (int w = 0; w < SCORE_WARPS; w++) s = fmaxf(s, warp_best[w][threadIdx.x]);
    a.scores[((size_t)t * G + threadIdx.x) * a.kv.num_blocks + b] = s;
  }
}

/* The best of the ranks of keys[i] for i = lane + lo, lane + lo + 32, ... < hi, skipping taken
 * (zero) keys; 0 when none is left. */
__device__ __forceinline__ uint64_t lane_best(const uint32_t *keys, int lo, int hi, int lane) {
  uint64_t best = 0;
  for (int i = lo + lane; i < hi; i += 32)
    if (keys[i]) {
      const uint64_t r = rank_key(keys[i], i);
      best = r > best ? r : best;
    }
  return best;
}

__global__ void __launch_bounds__(32 * SELECT_WARPS) msa_select_kernel(msa_args a) {
  extern __shared__ uint64_t finalists[]; /* [SELECT_WARPS, topk] rank keys, then keys [candidates] */
  __shared__ int forced, want;
  const int t = blockIdx.x / a.G, g = blockIdx.x % a.G, topk = a.p.topk;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int32_t p = a.pos[t];
  int32_t *out = a.sel + ((size_t)t * a.G + g) * topk;
  int nb, c0, c1;
  if (!msa_candidates(a, p, &nb, &c0, &c1)) {
    for (int i = threadIdx.x; i < topk; i += blockDim.x) out[i] = i < nb ? i : -1;
    return;
  }
  uint32_t *keys = (uint32_t *)(finalists + SELECT_WARPS * topk);
  if (threadIdx.x == 0) {
    /* Forced blocks: init, then local (vLLM scores them 1e30 and 1e29), which only matters when
     * they alone exceed topk. */
    int n = 0;
    for (int blk = 0; blk < c0 && n < topk; blk++) out[n++] = blk;
    for (int blk = c1; blk < nb && n < topk; blk++) out[n++] = blk;
    forced = n;
    want = topk - n < c1 - c0 ? topk - n : c1 - c0;
  }
  const int n = c1 - c0;
  const float *s = a.scores + ((size_t)t * a.G + g) * a.kv.num_blocks + c0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) keys[i] = score_key(s[i]);
  for (int i = threadIdx.x; i < SELECT_WARPS * topk; i += blockDim.x) finalists[i] = 0;
  __syncthreads();
  const int k = want, f = forced;
  if (k > 0) {
    /* Each warp: the k best of its share (fewer when the share is smaller; 0 fills the rest). */
    const int lo = (int)((int64_t)warp * n / SELECT_WARPS), hi = (int)((int64_t)(warp + 1) * n / SELECT_WARPS);
    uint64_t best = lane_best(keys, lo, hi, lane);
    for (int r = 0; r < k; r++) {
      const uint64_t m = warp_max_u64(best);
      if (m == 0) break; /* the same on every lane */
      if (lane == 0) finalists[warp * topk + r] = m;
      if (best == m) { /* rank keys are distinct: this lane owns the winner */
        keys[(int)~(uint32_t)m] = 0;
        best = lane_best(keys, lo, hi, lane);
      }
    }
    __syncthreads();
    /* Warp 0: the k best finalists; there are at least k. */
    if (warp == 0) {
      const int nf = SELECT_WARPS * topk;
      uint64_t fb = 0;
      for (int i = lane; i < nf; i += 32) fb = finalists[i] > fb ? finalists[i] : fb;
      for (int r = 0; r < k; r++) {
        const uint64_t m = warp_max_u64(fb);
        if (lane == 0) out[f + r] = (int32_t)~(uint32_t)m + c0;
        if (fb == m) {
          fb = 0;
          for (int i = lane; i < nf; i += 32) {
            if (finalists[i] == m) finalists[i] = 0;
            fb = finalists[i] > fb ? finalists[i] : fb;
          }
        }
      }
    }
  }
  if (threadIdx.x == 0) { /* its own writes above: out is complete */
    const int total = f + (k > 0 ? k : 0);
    for (int i = 1; i < total; i++) /* ascending block ids */
      for (int j = i; j > 0 && out[j - 1] > out[j]; j--) {
        int32_t tmp = out[j];
        out[j] = out[j - 1];
        out[j - 1] = tmp;
      }
    for (int i = total; i < topk; i++) out[i] = -1;
  }
}

template <int GP, bool FP8>
static void msa_launch_scores_of(cuda_backend *cb, const msa_args &a, dim3 grid) {
  if (a.kv.ihd <= 128) msa_score_kernel<GP, 1, FP8><<<grid, 32 * SCORE_WARPS, 0, cb->stream>>>(a);
  else msa_score_kernel<GP, 2, FP8><<<grid, 32 * SCORE_WARPS, 0, cb->stream>>>(a);
}

template <int GP>
static void msa_launch_scores(cuda_backend *cb, const msa_args &a, dim3 grid) {
  if (a.kv.dtype == M3_KV_FP8) msa_launch_scores_of<GP, true>(cb, a, grid);
  else msa_launch_scores_of<GP, false>(cb, a, grid);
}

void cuda_msa_select(m3_backend *be, const float *iq, int G, const m3_kv_view *kv,
                     const int32_t *pos, int T, const m3_msa_params *p, int32_t *sel) {
  cuda_backend *cb = cuda_of(be);
  if (T <= 0 || p->topk <= 0) return;
  if (G <= 0 || G > MSA_MAX_G || kv->num_blocks <= 0 || kv->ihd % 4 != 0 || kv->ihd > MSA_MAX_IHD) {
    cuda_note(cb, cudaErrorInvalidValue,
              "msa_select (1 to 16 index heads, index dim a multiple of 4 up to 256, some blocks)");
    return;
  }
  msa_args a;
  a.iq = iq;
  a.G = G;
  a.kv = *kv;
  a.pos = pos;
  a.p = *p;
  a.sel = sel;
  a.ik_page_bytes = m3_kv_pool_page_bytes(M3_KV_FP8, (size_t)kv->block_size, (size_t)kv->ihd);
  a.scores = (float *)cuda_scratch(cb, (size_t)T * G * kv->num_blocks * sizeof(float), "msa_select");
  if (!a.scores) return;
  /* The positions live on the device: score blocks up to the table's end, and blocks past a
   * token's candidates return at once. */
  dim3 grid((unsigned)kv->num_blocks, (unsigned)T);
  if (G == 1) msa_launch_scores<1>(cb, a, grid);
  else if (G == 2) msa_launch_scores<2>(cb, a, grid);
  else if (G <= 4) msa_launch_scores<4>(cb, a, grid);
  else if (G <= 8) msa_launch_scores<8>(cb, a, grid);
  else msa_launch_scores<16>(cb, a, grid);
  cuda_launched(cb, "msa_select (scores)");
  size_t smem = (size_t)SELECT_WARPS * p->topk * sizeof(uint64_t) + (size_t)kv->num_blocks * sizeof(uint32_t);
  static size_t smem_opted; /* the largest dynamic shared memory the kernel was allowed so far */
  if (smem > 48 * 1024 && smem > smem_opted) {
    cuda_note(cb, cudaFuncSetAttribute(msa_select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)smem), "msa_select (shared memory for the candidates)");
    smem_opted = smem;
  }
  msa_select_kernel<<<(unsigned)(T * G), 32 * SELECT_WARPS, smem, cb->stream>>>(a);
  cuda_launched(cb, "msa_select (top-k)");
}
