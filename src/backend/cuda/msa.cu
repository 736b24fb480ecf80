/* msa.cu: MSA block selection (shared/spec/msa_spec.md §2-4, m3_text_spec.md §5.3).
 *
 * Scores: a decode token's selection scans every index key of its context (64 MiB of float32 at
 * 128K tokens), so the scan is spread over the whole GPU and kept bound by memory bandwidth. A
 * thread block takes a chunk of up to MSA_CHUNK_MAX consecutive blocks of one token, chunks sized
 * so that the grid is about two blocks per SM (MSA_SCORE_CTAS_PER_SM) for decode, (token, chunk)
 * flattened into grid.x (a prefill's tokens pass grid.y's 65535); its 8 warps split every block's
 * keys. A warp takes 16/G keys per step, the loads of several steps issued together
 * (16-byte loads, each lane four dims of every key, 16 loads in flight per lane); the queries of
 * all heads sit in registers. The 16 partial dots of a step per lane (keys x heads) are summed
 * over the warp by a halving butterfly, 16 shuffles for all of them, and each lane keeps the
 * running max of one (key slot, head); the block max per head follows through shared memory.
 * An fp8 cache's index keys are loaded as E4M3 bytes (4 per lane and load where float32 takes a
 * float4) and decoded times their row scale in registers (kv_fp8.cuh).
 *
 * Selection: one warp per (token, index head): forced init and local blocks, then the `want`
 * best candidates by (score, lower id), drawn one per round: each lane keeps the best of its
 * strided share below the last winner, the warp's max key and then the lowest id at that key
 * name the winner (two redux instructions), and only the winner's lane rescans. Written in
 * ascending block order (init ids, the winners ranked by id, local ids), -1 padded: the same
 * rules as the CPU backend's msa.c. At decode (few tokens, a context whose candidate keys fit
 * shared memory) the last score block of a token to finish runs its selection (a counter per
 * token), which saves a launch; otherwise a second kernel does. */
#include <math.h>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/kv_fp8.cuh"

enum {
  MSA_MAX_G = 16,
  MSA_MAX_IHD = 256,
  SCORE_WARPS = 8,
  SELECT_WARPS = 8,            /* rows (token, head) per block of the separate selection kernel */
  MSA_CHUNK_MAX = 16,          /* blocks per score thread block */
  MSA_SCORE_CTAS_PER_SM = 2,   /* resident score blocks per SM, up to 4 heads (128 registers a
                                  thread; more heads take more, and two waves) */
  MSA_FUSED_MAX_T = 64,        /* tokens whose selection the last score block runs */
  MSA_FUSED_SMEM = 48 * 1024,  /* its shared memory (candidate keys and winners per warp) at most */
};

/* Score blocks of token t done so far, modulo its chunk count: atomicInc wraps it back to 0 when
 * the last one arrives, so it is 0 between launches. The backend's ops run in one stream, one
 * at a time, so one launch uses it at a time. */
__device__ unsigned int msa_chunks_done[MSA_FUSED_MAX_T];

typedef struct {
  const float *iq; /* [T, G, ihd] */
  int G;
  m3_kv_view kv;
  const int32_t *pos;
  m3_msa_params p;
  float *scores;   /* [T, G, kv.num_blocks] */
  size_t ik_page_bytes; /* fp8 cache: bytes of one index-key page */
  int32_t *sel;    /* [T, G, topk] */
  int chunk_blocks; /* blocks per score thread block (the scan per token) */
  int chunks;       /* score thread blocks per token: ceil(num_blocks / chunk_blocks); the prefill
                       tiles: per tile */
  int fused;        /* 1: the last score block of a token selects (T <= MSA_FUSED_MAX_T) */
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

/* Shared memory of one selecting warp, in 4-byte words: the keys of up to num_blocks candidates
 * and up to topk winners. */
static int msa_row_words(const m3_kv_view *kv, const m3_msa_params *p) { return kv->num_blocks + p->topk; }

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

/* The best (key desc, index asc) of keys[i], i = lane, lane + 32, ... < n, strictly below the
 * bound (bk, bi): key < bk, or key == bk and i > bi. *k = 0 when none is (every score key is
 * above 0). Indices grow along the scan, so the first of equal keys is the lowest. */
__device__ __forceinline__ void lane_best_below(const uint32_t *keys, int n, int lane, uint32_t bk,
                                                int bi, uint32_t *k, int *i_out) {
  uint32_t best = 0;
  int at = 0x7fffffff;
#pragma unroll 8
  for (int i = lane; i < n; i += 32) {
    const uint32_t key = keys[i];
    if ((key < bk || (key == bk && i > bi)) && key > best) best = key, at = i;
  }
  *k = best, *i_out = at;
}

/* One warp selects row (t, g) from the row's block scores (written by this launch's other thread
 * blocks or an earlier kernel: read through L2). keys [num_blocks] and win [topk] are the warp's
 * shared memory. */
__device__ void msa_select_row(const msa_args &a, int t, int g, uint32_t *keys, int32_t *win, int lane) {
  const int topk = a.p.topk;
  int32_t *out = a.sel + ((size_t)t * a.G + g) * topk;
  int nb, c0, c1;
  if (!msa_candidates(a, a.pos[t], &nb, &c0, &c1)) {
    for (int i = lane; i < topk; i += 32) out[i] = i < nb ? i : -1;
    return;
  }
  /* Forced blocks: init, then local (vLLM scores them 1e30 and 1e29), which only matters when
   * they alone exceed topk. */
  const int ninit = c0 < topk ? c0 : topk;
  const int nlocal = nb - c1 < topk - ninit ? nb - c1 : topk - ninit;
  const int n = c1 - c0, want = topk - ninit - nlocal < n ? topk - ninit - nlocal : n;
  const float *s = a.scores + ((size_t)t * a.G + g) * a.kv.num_blocks + c0;
  __syncwarp(); /* the warp's previous row is done with keys and win */
#pragma unroll 8 /* loads in flight together */
  for (int i = lane; i < n; i += 32) keys[i] = score_key(__ldcg(s + i));
  __syncwarp();
  uint32_t bk;
  int bi;
  lane_best_below(keys, n, lane, 0xffffffffu, -1, &bk, &bi); /* every score key is below ~0 */
  for (int r = 0; r < want; r++) { /* want <= n: a candidate is left every round */
    const uint32_t mk = __reduce_max_sync(0xffffffffu, bk);
    const int mi = (int)__reduce_min_sync(0xffffffffu, bk == mk ? (unsigned)bi : 0xffffffffu);
    if (lane == 0) win[r] = mi;
    if (bk == mk && bi == mi) lane_best_below(keys, n, lane, mk, mi, &bk, &bi);
  }
  __syncwarp();
  /* Ascending: init ids, the winners by id (distinct, so a rank is the count of smaller ones),
   * local ids, then -1. */
  for (int i = lane; i < ninit; i += 32) out[i] = i;
  for (int r = lane; r < want; r += 32) {
    const int w = win[r];
    int rank = 0;
    for (int j = 0; j < want; j++) rank += win[j] < w;
    out[ninit + rank] = c0 + w;
  }
  for (int i = lane; i < nlocal; i += 32) out[ninit + want + i] = c1 + i;
  for (int i = ninit + want + nlocal + lane; i < topk; i += 32) out[i] = -1;
}

/* GP: G rounded up to a power of two; CH: float4 chunks per lane, ihd <= 128 * CH; FP8: the
 * cache's dtype. Thread block: token t, blocks [chunk * chunk_blocks, + chunk_blocks) of its
 * candidates. */
template <int GP, int CH, bool FP8>
__global__ void __launch_bounds__(32 * SCORE_WARPS, GP <= 4 ? MSA_SCORE_CTAS_PER_SM : 1) msa_score_kernel(msa_args a) {
  dev_pdl_enter();
  constexpr int KPW = 16 / GP; /* keys per warp step: KPW * GP = 16 dots per lane */
  constexpr int SCORE_STEPS = GP / CH > 1 ? GP / CH : 1; /* steps loaded at once: 16 float4 per lane */
  __shared__ float warp_best[SCORE_WARPS][MSA_CHUNK_MAX][GP];
  __shared__ int32_t pages[MSA_CHUNK_MAX];
  const int t = (int)(blockIdx.x / (unsigned)a.chunks), chunk = (int)(blockIdx.x % (unsigned)a.chunks);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int32_t p = a.pos[t];
  int nb, c0, c1;
  int b0 = chunk * a.chunk_blocks, b1 = b0 + a.chunk_blocks;
  if (msa_candidates(a, p, &nb, &c0, &c1)) {
    b0 = b0 > c0 ? b0 : c0;
    b1 = b1 < c1 ? b1 : c1;
  } else {
    b1 = b0; /* every visible block is selected: nothing to score */
  }
  if (b0 < b1) { /* the same for the whole block */
    const int G = a.G, ihd = a.kv.ihd, ihd4 = ihd >> 2, bs = a.kv.block_size, nblk = b1 - b0;
    if ((int)threadIdx.x < nblk) pages[threadIdx.x] = a.kv.block_table[b0 + threadIdx.x];
    float4 q[GP][CH];
#pragma unroll
    for (int g = 0; g < GP; g++)
#pragma unroll
      for (int c = 0; c < CH; c++) {
        const int ch = lane + 32 * c;
        q[g][c] = g < G && ch < ihd4 ? ((const float4 *)(a.iq + ((size_t)t * G + g) * ihd))[ch]
                                     : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
    __syncthreads(); /* pages */
    const int slot = (lane >> 1) & 15, slot_key = slot / GP, slot_head = slot % GP;
    for (int bl = 0; bl < nblk; bl++) {
      const int b = b0 + bl;
      const int n = p - b * bs + 1 < bs ? p - b * bs + 1 : bs;
      const float4 *keys = (const float4 *)((const float *)a.kv.ik + (size_t)pages[bl] * bs * ihd);
      const kv8_rows keys8 = kv8_page_rows(a.kv.ik, a.ik_page_bytes, pages[bl], bs, ihd, 0);
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
      if ((lane & 1) == 0 && lane < 2 * GP) warp_best[warp][bl][slot_head] = best;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nblk * G; i += blockDim.x) {
      const int bl = i / G, g = i % G;
      float s = -INFINITY;
#pragma unroll
      for (int w = 0; w < SCORE_WARPS; w++) s = fmaxf(s, warp_best[w][bl][g]);
      a.scores[((size_t)t * G + g) * a.kv.num_blocks + b0 + bl] = s;
    }
  }
  if (!a.fused) return;
  /* The last of the token's thread blocks to finish selects its rows, one warp per head: the
   * scores of every block are written (each writer fenced before its block counted). */
  extern __shared__ uint32_t row_smem[]; /* per warp: keys [num_blocks], winners [topk] */
  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicInc(&msa_chunks_done[t], (unsigned)a.chunks - 1u) == (unsigned)a.chunks - 1u;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int words = a.kv.num_blocks + a.p.topk;
  uint32_t *mine = row_smem + (size_t)warp * words;
  for (int g = warp; g < a.G; g += SCORE_WARPS)
    msa_select_row(a, t, g, mine, (int32_t *)(mine + a.kv.num_blocks), lane);
}

/* ---- prefill scores: a tile of tokens against each block, on tensor cores ----
 * A prefill's tokens share their candidate blocks, so the scan per token above would read every
 * index key once per token (8192 tokens of an 8K prompt: 17 GB through L2). Here a thread block
 * takes MSA_TILE_ROWS query rows, (token, head) pairs of 128 / G consecutive tokens, held in
 * shared memory for its life, and multiplies the blocks of its share of their candidates
 * against them, one block of 128 keys at a time, with mma.sync m16n8k16 (f16 in, float32
 * accumulate).
 *
 * Why f16 in pieces: the selection must stay the float32 scan's (the CPU's) up to near-ties, and
 * one f16 or BF16 rounding of q and k moves scores by ~2^-11 relative, far past that. So a
 * float32 row of queries (a block of keys) is scaled by a power of two 2^e that brings its
 * largest magnitude to [2^14, 2^15) and split into hi = f16(x 2^e) and lo = f16(x 2^e - hi):
 * 22 of float32's 24 bits, and f16's range below 2^15 keeps every value that can matter next to
 * the largest (down to 2^-24). q.k is then ql.kh + qh.kl + qh.kh (each product exact in float32;
 * ql.kl, ~2^-22 of the dot, left out), times 2^-(e_q + e_k): three products where the CUDA-core
 * scan spent one float32 FMA, at many times the rate. An fp8 cache's keys are split from their
 * float32 values (E4M3 times the row scale, as the scan decodes them).
 *
 * The keys are split once per call, a block of the table at a time (msa_split_keys_kernel, into
 * the scratch after the scores), not once per tile that reads them; a tile's thread block then
 * brings each block's hi and lo by one bulk copy, two blocks in flight. Warp w multiplies rows
 * 32 (w % 4) .. + 32 by keys 64 (w / 4) .. + 64; the block max per row takes the keys each row's
 * token sees (candidates are whole blocks in its past; the mask is for local_blocks 0), over a
 * lane quad by shuffles, then over the two key halves through shared memory. (H200, 8192 tokens,
 * 4 index heads of 128: the whole selection 1137 us as a float32 product on CUDA cores, 332 us.) */
enum {
  MSA_TILE_ROWS = 128,
  MSA_TILE_KEYS = 128, /* keys per tile: one block (the kernel runs for block_size 128 only) */
  MSA_TILE_MAX_IHD = 128,
  MSA_TILE_WAVES = 4,    /* thread blocks per SM that the parts of the tiles aim at */
  MSA_TILE_MIN_PART = 4, /* blocks of the table per part, at least */
  MSA_TILE_MIN_T = MSA_FUSED_MAX_T + 1,
};

/* f16 row pitch of the split tiles: the index dim rounded up to 16, plus 8, so that the 8 rows of
 * an ldmatrix phase (an odd number of 16-byte chunks apart) fall in 8 distinct bank groups. */
static __host__ __device__ __forceinline__ int msa_pitch(int ihd) { return ((ihd + 15) & ~15) + 8; }

/* Bytes of one block's split keys (hi rows, then lo rows); of the query tile the same. */
static __host__ __device__ __forceinline__ uint32_t msa_split_bytes(int ihd) {
  return (uint32_t)(2 * MSA_TILE_KEYS * msa_pitch(ihd) * 2);
}

/* Shared memory of a tile: the query pieces, two blocks of key pieces, the rows' exponents, the
 * two key halves' row maxima of two blocks, two barriers. */
static size_t msa_tile_smem_bytes(int ihd) {
  return 3 * (size_t)msa_split_bytes(ihd) + (1 + 4) * MSA_TILE_ROWS * sizeof(float) + 2 * sizeof(uint64_t);
}

/* Four values times `up` (2^e) as f16 hi and lo = f16(v 2^e - hi), stored at hi + at and lo + at. */
__device__ __forceinline__ void msa_split4(float4 v, float up, __half *hi, __half *lo, size_t at) {
  const float x[4] = {v.x * up, v.y * up, v.z * up, v.w * up};
  const __half2 h01 = __floats2half2_rn(x[0], x[1]), h23 = __floats2half2_rn(x[2], x[3]);
  const float2 b01 = __half22float2(h01), b23 = __half22float2(h23);
  const __half2 l01 = __floats2half2_rn(x[0] - b01.x, x[1] - b01.y),
                l23 = __floats2half2_rn(x[2] - b23.x, x[3] - b23.y);
  *(uint2 *)(hi + at) = make_uint2(*(const uint32_t *)&h01, *(const uint32_t *)&h23);
  *(uint2 *)(lo + at) = make_uint2(*(const uint32_t *)&l01, *(const uint32_t *)&l23);
}

/* Split keys of table block blockIdx.x: hi rows [128, pitch], lo rows, and the block's exponent
 * into key_exp[b]. Warp w takes key rows w + 8 i, lane l dims 4l .. 4l + 3 (dims past ihd, up to
 * the pitch: zeros). Rows past the call's latest position are zeros: no token sees them, and a
 * page's unwritten rows hold whatever the memory held, which must not set the exponent. */
template <bool FP8>
__global__ void __launch_bounds__(256) msa_split_keys_kernel(msa_args a, int T, __half *split, int32_t *key_exp) {
  dev_pdl_enter();
  __shared__ int32_t warp_pos_s[8];
  const int b = (int)blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, ihd = a.kv.ihd,
            pitch = msa_pitch(ihd);
  const int32_t page = a.kv.block_table[b];
  int32_t last = -1;
  for (int t = (int)threadIdx.x; t < T; t += 256) last = max(last, a.pos[t]);
  last = __reduce_max_sync(0xffffffffu, last);
  if (lane == 0) warp_pos_s[warp] = last;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < 8; w++) last = max(last, warp_pos_s[w]);
  const int rows = last - b * MSA_TILE_KEYS + 1; /* rows of the block some token sees */
  float4 v[16];
  float m = 0.0f;
#pragma unroll
  for (int i = 0; i < 16; i++) {
    const int r = warp + 8 * i;
    v[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (4 * lane < ihd && r < rows) {
      if constexpr (FP8) {
        const kv8_rows keys8 = kv8_page_rows(a.kv.ik, a.ik_page_bytes, page, MSA_TILE_KEYS, ihd, 0);
        v[i] = kv8_dequant4(*(const uint32_t *)(keys8.q + (size_t)r * ihd + 4 * lane), keys8.scale[r]);
      } else {
        v[i] = *(const float4 *)((const float *)a.kv.ik + ((size_t)page * MSA_TILE_KEYS + r) * ihd + 4 * lane);
      }
    }
    m = fmaxf(m, dev_amax4(v[i])); /* NaN values do not count */
  }
  const int e = dev_f16_exp(block_max(m));
  __half *hi = split + (size_t)b * (msa_split_bytes(ihd) / 2), *lo = hi + MSA_TILE_KEYS * pitch;
  if (4 * lane < pitch)
#pragma unroll
    for (int i = 0; i < 16; i++) msa_split4(v[i], dev_pow2(e), hi, lo, (size_t)(warp + 8 * i) * pitch + 4 * lane);
  if (threadIdx.x == 0) key_exp[b] = e;
}

/* Thread block: tokens [tile * tq, + tq) (rows token * G + head) and part `part` of a.chunks of
 * the blocks that some of them has among its candidates, each scored for the rows whose
 * candidates hold it. The last tiles, whose tokens see the most blocks, come first in the grid,
 * so that the short ones fill in behind them. */
__global__ void __launch_bounds__(256, 1)
    msa_score_tile_kernel(msa_args a, int T, int tq, const __half *split, const int32_t *key_exp) {
  dev_pdl_enter();
  extern __shared__ float4 msa_tile_smem[];
  const int ihd = a.kv.ihd, pitch = msa_pitch(ihd), ksteps = (ihd + 15) >> 4;
  const uint32_t bytes = msa_split_bytes(ihd);
  __half *qh = (__half *)msa_tile_smem, *ql = qh + MSA_TILE_ROWS * pitch;
  uint8_t *kbuf = (uint8_t *)msa_tile_smem + bytes; /* [2][bytes] */
  int32_t *qe = (int32_t *)(kbuf + 2 * (size_t)bytes);
  float *rmax = (float *)(qe + MSA_TILE_ROWS); /* [2][2][128] */
  uint64_t *full = (uint64_t *)(rmax + 4 * MSA_TILE_ROWS);
  __shared__ int32_t tpos[MSA_TILE_ROWS];
  __shared__ int lo_s, hi_s;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tiles = (T + tq - 1) / tq, tile = tiles - 1 - (int)(blockIdx.x / (unsigned)a.chunks),
            part = (int)(blockIdx.x % (unsigned)a.chunks);
  const int t0 = tile * tq, ntok = T - t0 < tq ? T - t0 : tq, G = a.G, nrows = ntok * G;

  /* The blocks of this part of the candidates of the tile's tokens. */
  if (tid == 0) {
    lo_s = 0x7fffffff, hi_s = 0;
    mbar_init(&full[0], 1), mbar_init(&full[1], 1);
    mbar_init_fence();
  }
  __syncthreads();
  if (tid < tq) {
    const int32_t p = tid < ntok ? a.pos[t0 + tid] : -1;
    tpos[tid] = p;
    int nb, c0, c1;
    if (msa_candidates(a, p, &nb, &c0, &c1) && c0 < c1) atomicMin(&lo_s, c0), atomicMax(&hi_s, c1);
  }
  __syncthreads();
  const int64_t span = hi_s > lo_s ? hi_s - lo_s : 0;
  const int b0 = lo_s + (int)(span * part / a.chunks), b1 = lo_s + (int)(span * (part + 1) / a.chunks);
  if (b0 >= b1) return; /* the same for the whole block */

  if (tid == 0)
    for (int s = 0; s < 2 && b0 + s < b1; s++) {
      mbar_expect_bytes(&full[s], bytes);
      dev_bulk_copy(kbuf + s * (size_t)bytes, (const uint8_t *)split + (size_t)(b0 + s) * bytes, bytes, &full[s]);
      mbar_arrive(&full[s]);
    }
  /* The query rows, each by its own exponent (rows past the tile: zeros). Warp w takes rows
   * w + 8 i, lane l dims 4l .. 4l + 3. */
  {
    float4 v[16];
    float m[16];
#pragma unroll
    for (int i = 0; i < 16; i++) {
      const int r = warp + 8 * i;
      v[i] = r < nrows && 4 * lane < ihd ? *(const float4 *)(a.iq + ((size_t)t0 * G + r) * ihd + 4 * lane)
                                         : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      m[i] = dev_amax4(v[i]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
      for (int i = 0; i < 16; i++) m[i] = fmaxf(m[i], __shfl_xor_sync(0xffffffffu, m[i], o));
#pragma unroll
    for (int i = 0; i < 16; i++) {
      const int r = warp + 8 * i, e = dev_f16_exp(m[i]);
      if (4 * lane < pitch) msa_split4(v[i], dev_pow2(e), qh, ql, (size_t)r * pitch + 4 * lane);
      if (lane == 0) qe[r] = e;
    }
  }
  __syncthreads(); /* the query pieces */

  /* ldmatrix addresses. A (rows 16 mt .. of the warp's 32, dims 16 ks ..): lane l gives row l % 16,
   * dims 8 (l / 16) ..; B (keys 16 np .. of the warp's 64 as two n8 tiles, dims 16 ks ..): lane l
   * gives key (l % 8) + 8 (l / 16), dims 8 ((l / 8) % 2) .. */
  const int wm = warp & 3, wn = warp >> 2, g = lane >> 2, q4 = lane & 3;
  const uint32_t sqh = smem_addr(qh) + (uint32_t)(((32 * wm + (lane & 15)) * pitch + 8 * (lane >> 4)) * 2);
  const uint32_t sql = sqh + (uint32_t)(MSA_TILE_ROWS * pitch * 2);
  const uint32_t kb_off = (uint32_t)(((64 * wn + (lane & 7) + 8 * (lane >> 4)) * pitch + 8 * ((lane >> 3) & 1)) * 2);

  for (int b = b0; b < b1; b++) {
    const int s = (b - b0) & 1;
    mbar_wait(&full[s], (uint32_t)(((b - b0) >> 1) & 1));
    const uint32_t skh = smem_addr(kbuf + s * (size_t)bytes) + kb_off,
                   skl = skh + (uint32_t)(MSA_TILE_KEYS * pitch * 2);
    float acc[2][8][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
      for (int nt = 0; nt < 8; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[mt][nt][i] = 0.0f;
    /* Per k16 step every fragment first, then the products term by term, so that each of a
     * warp's 16 accumulators sees its three products 16 MMAs apart. */
#pragma unroll 2
    for (int ks = 0; ks < ksteps; ks++) {
      uint32_t ah[2][4], al[2][4], bh[4][4], bl[4][4];
#pragma unroll
      for (int mt = 0; mt < 2; mt++) {
        const uint32_t at = (uint32_t)((mt * 16 * pitch + ks * 16) * 2);
        dev_ldmatrix_x4(ah[mt], sqh + at);
        dev_ldmatrix_x4(al[mt], sql + at);
      }
#pragma unroll
      for (int np = 0; np < 4; np++) { /* keys 16 np .. of the warp's: n8 tiles 2 np, 2 np + 1 */
        const uint32_t at = (uint32_t)((np * 16 * pitch + ks * 16) * 2);
        dev_ldmatrix_x4(bh[np], skh + at);
        dev_ldmatrix_x4(bl[np], skl + at);
      }
#pragma unroll
      for (int term = 0; term < 3; term++)
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
          for (int nt = 0; nt < 8; nt++) {
            const uint32_t *fa = term == 0 ? al[mt] : ah[mt], *fb = term == 1 ? bl[nt >> 1] : bh[nt >> 1];
            dev_mma16816<1>(acc[mt][nt], fa, fb[2 * (nt & 1)], fb[2 * (nt & 1) + 1]);
          }
    }
    /* Row maxima over the warp's 64 keys: lane (g, q4) holds rows g, g + 8 of each m16 tile and
     * keys 8 nt + 2 q4 + {0, 1}. */
    float *rm = rmax + s * 2 * MSA_TILE_ROWS;
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const int r = 32 * wm + 16 * mt + 8 * h + g;
        const int seen = (r < nrows ? tpos[r / G] : -1) - b * MSA_TILE_KEYS - 64 * wn; /* last key seen */
        float best = -INFINITY; /* NaN dots never win */
        if (seen >= 63) {
#pragma unroll
          for (int nt = 0; nt < 8; nt++) best = fmaxf(best, fmaxf(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]));
        } else {
#pragma unroll
          for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int c = 0; c < 2; c++)
              if (8 * nt + 2 * q4 + c <= seen) best = fmaxf(best, acc[mt][nt][2 * h + c]);
        }
        best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, 1));
        best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, 2));
        if (q4 == 0) rm[wn * MSA_TILE_ROWS + r] = best;
      }
    __syncthreads(); /* the row maxima are written; key buffer s is free */
    if (tid == 0 && b + 2 < b1) {
      mbar_expect_bytes(&full[s], bytes);
      dev_bulk_copy(kbuf + s * (size_t)bytes, (const uint8_t *)split + (size_t)(b + 2) * bytes, bytes, &full[s]);
      mbar_arrive(&full[s]);
    }
    if (tid < nrows) {
      const int32_t p = tpos[tid / G];
      int nb, c0, c1;
      if (msa_candidates(a, p, &nb, &c0, &c1) && b >= c0 && b < c1)
        a.scores[((size_t)t0 * G + tid) * a.kv.num_blocks + b] =
            dev_ldexp(fmaxf(rm[tid], rm[MSA_TILE_ROWS + tid]), -(qe[tid] + key_exp[b]));
    }
  }
}

/* The selection of rows blockIdx.x * warps + warp (warps = blockDim.x / 32), one warp each,
 * from the scores of an earlier launch (or none: no token has candidates). */
__global__ void __launch_bounds__(32 * SELECT_WARPS) msa_select_kernel(msa_args a, int rows) {
  dev_pdl_enter();
  extern __shared__ uint32_t row_smem[]; /* per warp: keys [num_blocks], winners [topk] */
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row = (int)blockIdx.x * (int)(blockDim.x >> 5) + warp;
  if (row >= rows) return;
  const int words = a.kv.num_blocks + a.p.topk;
  uint32_t *mine = row_smem + (size_t)warp * words;
  msa_select_row(a, row / a.G, row % a.G, mine, (int32_t *)(mine + a.kv.num_blocks), lane);
}

template <int GP, bool FP8>
static void msa_launch_scores_of(cuda_backend *cb, const msa_args &a, unsigned grid, size_t smem) {
  if (a.kv.ihd <= 128) dev_launch(msa_score_kernel<GP, 1, FP8>, grid, 32 * SCORE_WARPS, smem, cb->stream, a);
  else dev_launch(msa_score_kernel<GP, 2, FP8>, grid, 32 * SCORE_WARPS, smem, cb->stream, a);
}

template <int GP>
static void msa_launch_scores(cuda_backend *cb, const msa_args &a, unsigned grid, size_t smem) {
  if (a.kv.dtype == M3_KV_FP8) msa_launch_scores_of<GP, true>(cb, a, grid, smem);
  else msa_launch_scores_of<GP, false>(cb, a, grid, smem);
}

/* The prefill scores: the keys split once (msa_split_keys_kernel, into `split`), then tiles of
 * 128 / G tokens (msa_score_tile_kernel), each tile's candidate blocks in parts: about
 * MSA_TILE_WAVES thread blocks per SM in all, a part at least MSA_TILE_MIN_PART blocks of the
 * table (the query tile's split is paid once a part). */
static void msa_launch_score_tiles(cuda_backend *cb, msa_args &a, int T, __half *split, int32_t *key_exp) {
  if (a.kv.dtype == M3_KV_FP8)
    dev_launch(msa_split_keys_kernel<true>, (unsigned)a.kv.num_blocks, 256, 0, cb->stream, a, T, split, key_exp);
  else
    dev_launch(msa_split_keys_kernel<false>, (unsigned)a.kv.num_blocks, 256, 0, cb->stream, a, T, split, key_exp);
  const int tq = MSA_TILE_ROWS / a.G, tiles = (T + tq - 1) / tq;
  const int parts = (MSA_TILE_WAVES * cb->num_sms + tiles - 1) / tiles;
  const int most = (a.kv.num_blocks + MSA_TILE_MIN_PART - 1) / MSA_TILE_MIN_PART;
  a.chunks = parts < most ? parts : most;
  a.chunk_blocks = 0; /* a part's blocks follow from its tile's candidates */
  const size_t smem = msa_tile_smem_bytes(a.kv.ihd);
  cuda_allow_smem(cb, (const void *)msa_score_tile_kernel, smem, "msa_select (prefill tiles)");
  dev_launch(msa_score_tile_kernel, (unsigned)((int64_t)tiles * a.chunks), 256, smem, cb->stream, a, T, tq,
             (const __half *)split, (const int32_t *)key_exp);
}

void cuda_msa_select(m3_backend *be, const float *iq, int G, const m3_kv_view *kv,
                     const int32_t *pos, int T, const m3_msa_params *p, int32_t *sel) {
  cuda_backend *cb = cuda_of(be);
  if (T <= 0 || p->topk <= 0) return;
  const size_t row_bytes = (size_t)msa_row_words(kv, p) * sizeof(uint32_t);
  if (G <= 0 || G > MSA_MAX_G || kv->num_blocks <= 0 || kv->ihd % 4 != 0 || kv->ihd > MSA_MAX_IHD ||
      row_bytes > 200 * 1024) {
    cuda_note(cb, cudaErrorInvalidValue,
              "msa_select (1 to 16 index heads, index dim a multiple of 4 up to 256, 1 to 50000 blocks)");
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
  a.scores = NULL;
  a.fused = 0;
  a.chunk_blocks = a.chunks = 1;
  if (kv->num_blocks > p->topk) { /* else no position has candidates: nothing to score */
    /* The scores; for the prefill tiles, then the split keys and their exponents. */
    const int tiles = T >= MSA_TILE_MIN_T && kv->block_size == MSA_TILE_KEYS && kv->ihd <= MSA_TILE_MAX_IHD &&
                      msa_tile_smem_bytes(kv->ihd) <= (size_t)cb->smem_optin;
    const size_t score_bytes = ((size_t)T * G * kv->num_blocks * sizeof(float) + 255) / 256 * 256;
    const size_t split_bytes = tiles ? (size_t)kv->num_blocks * msa_split_bytes(kv->ihd) : 0;
    uint8_t *scratch = (uint8_t *)cuda_scratch(
        cb, score_bytes + split_bytes + (tiles ? (size_t)kv->num_blocks * sizeof(int32_t) : 0), "msa_select");
    if (!scratch) return;
    a.scores = (float *)scratch;
    /* Blocks per thread block: the scan of all tokens over about MSA_SCORE_CTAS_PER_SM blocks
     * per SM (one wave), at least one block each, at most MSA_CHUNK_MAX. The positions live on
     * the device: chunks cover the table, and blocks past a token's candidates are skipped. */
    const int64_t total = (int64_t)T * kv->num_blocks, ctas = (int64_t)MSA_SCORE_CTAS_PER_SM * cb->num_sms;
    int64_t cb_blocks = (total + ctas - 1) / ctas;
    if (cb_blocks > MSA_CHUNK_MAX) cb_blocks = MSA_CHUNK_MAX;
    if (cb_blocks < 1) cb_blocks = 1;
    a.chunk_blocks = (int)cb_blocks;
    a.chunks = (kv->num_blocks + a.chunk_blocks - 1) / a.chunk_blocks;
    const int sel_warps = G < SCORE_WARPS ? G : SCORE_WARPS;
    const size_t fused_smem = (size_t)sel_warps * row_bytes;
    a.fused = T <= MSA_FUSED_MAX_T && fused_smem <= MSA_FUSED_SMEM;
    const size_t smem = a.fused ? fused_smem : 0;
    const unsigned grid = (unsigned)((int64_t)T * a.chunks);
    if (tiles) {
      msa_launch_score_tiles(cb, a, T, (__half *)(scratch + score_bytes),
                             (int32_t *)(scratch + score_bytes + split_bytes));
    } else if (G == 1) msa_launch_scores<1>(cb, a, grid, smem);
    else if (G == 2) msa_launch_scores<2>(cb, a, grid, smem);
    else if (G <= 4) msa_launch_scores<4>(cb, a, grid, smem);
    else if (G <= 8) msa_launch_scores<8>(cb, a, grid, smem);
    else msa_launch_scores<16>(cb, a, grid, smem);
    cuda_launched(cb, a.fused ? "msa_select (scores and top-k)" : "msa_select (scores)");
    if (a.fused) return;
  }
  /* Rows per thread block: up to SELECT_WARPS, as many as 96 KiB of candidates hold (one at least,
   * up to 200 KiB). */
  const int rows = T * G;
  int warps = (int)(96 * 1024 / row_bytes);
  warps = warps < 1 ? 1 : warps > SELECT_WARPS ? SELECT_WARPS : warps;
  const size_t smem = (size_t)warps * row_bytes;
  cuda_allow_smem(cb, (const void *)msa_select_kernel, smem, "msa_select (shared memory for the candidates)");
  dev_launch(msa_select_kernel, (unsigned)((rows + warps - 1) / warps), 32 * warps, smem, cb->stream, a, rows);
  cuda_launched(cb, "msa_select (top-k)");
}
