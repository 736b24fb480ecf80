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
  int chunk_blocks; /* blocks per score thread block */
  int chunks;       /* score thread blocks per token: ceil(num_blocks / chunk_blocks) */
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

/* ---- prefill scores: a tile of tokens against each block ----
 * A prefill's tokens share their candidate blocks, so the scan per token above would read every
 * index key once per token (8192 tokens of an 8K prompt: 17 GB through L2). Here a thread block
 * takes MSA_TILE_ROWS query rows, (token, head) pairs of 128 / G consecutive tokens, held in
 * shared memory for its life, and runs the blocks of a chunk of the table against them as a
 * float32 matrix product on CUDA cores, as the scan does (no tensor-core rounding, so that the
 * selection stays the CPU's up to near-ties): a key tile is one block of 128 keys, its dims
 * staged 32 at a time in a double buffer (the next slab in flight during the products: cp.async
 * for float32 keys, registers decoded after the products for E4M3), each thread owning 8 rows x
 * 8 keys; the block max per row then takes the keys each row's token sees, reduced over the 16
 * threads of a row group by shuffles (H200, an 8192-token prompt: the selection 2.37 -> 1.17
 * ms). */
enum {
  MSA_TILE_ROWS = 128,
  MSA_TILE_KEYS = 128,   /* keys per tile: one block (the kernel runs for block_size 128 only) */
  MSA_TILE_DK = 32,      /* dims per staged slab */
  MSA_TILE_MAX_IHD = 128,
  /* Shared row strides in floats: 16-byte rows for the copies. A half warp's 8-byte loads of 16
   * key rows then meet two to a bank pair; rows of 34 floats avoid that but take 8-byte copies,
   * and were slower (H200, 8192 tokens: 1137 -> 1270 us). */
  MSA_TILE_LDQ = MSA_TILE_MAX_IHD + 4,
  MSA_TILE_LDK = MSA_TILE_DK + 4,
  MSA_TILE_CHUNK = 8,    /* blocks per thread block */
  MSA_TILE_MIN_T = MSA_FUSED_MAX_T + 1,
};

static size_t msa_tile_smem_bytes(void) {
  return ((size_t)MSA_TILE_ROWS * MSA_TILE_LDQ + 2 * MSA_TILE_KEYS * MSA_TILE_LDK) * sizeof(float);
}

/* Chunk x of this thread's share of a slab (dims slab * 32 .. + 32 of a block's keys): key f / 8,
 * dims 4 (f % 8) .. + 4 of the slab, f = tid + 256 x. */
__device__ __forceinline__ int msa_slab_key(int x) { return ((int)threadIdx.x + 256 * x) >> 3; }
__device__ __forceinline__ int msa_slab_dim(int x) { return 4 * (((int)threadIdx.x + 256 * x) & 7); }

/* A slab of E4M3 keys in registers (bytes and row scales) until the products of the current one
 * are done. */
typedef struct {
  uint32_t q[4];
  float sc[4];
} msa_slab8;

/* Starts slab `slab` of the block at `page` toward the key buffer kf [128, LDK] (float32: cp.async,
 * committed; fp8: into r). Dims past ihd are zeros. */
template <bool FP8>
__device__ __forceinline__ void msa_slab_fetch(const msa_args &a, int32_t page, int slab, float *kf, msa_slab8 &r) {
  const int ihd = a.kv.ihd;
#pragma unroll
  for (int x = 0; x < 4; x++) {
    const int key = msa_slab_key(x), d = slab * MSA_TILE_DK + msa_slab_dim(x);
    if constexpr (FP8) {
      const kv8_rows keys8 = kv8_page_rows(a.kv.ik, a.ik_page_bytes, page, MSA_TILE_KEYS, ihd, 0);
      r.q[x] = d < ihd ? *(const uint32_t *)(keys8.q + (size_t)key * ihd + d) : 0u;
      r.sc[x] = keys8.scale[key];
    } else {
      const float *keys = (const float *)a.kv.ik + (size_t)page * MSA_TILE_KEYS * ihd;
      dev_cp_async16((uint32_t)__cvta_generic_to_shared(kf + key * MSA_TILE_LDK + msa_slab_dim(x)),
                     d < ihd ? keys + (size_t)key * ihd + d : keys, d < ihd ? 16 : 0);
    }
  }
  if constexpr (!FP8) dev_cp_async_commit();
}

/* Completes this thread's share of the slab in kf: waits for its copies, or decodes r. */
template <bool FP8>
__device__ __forceinline__ void msa_slab_land(float *kf, const msa_slab8 &r) {
  if constexpr (FP8) {
#pragma unroll
    for (int x = 0; x < 4; x++)
      *(float4 *)(kf + msa_slab_key(x) * MSA_TILE_LDK + msa_slab_dim(x)) = kv8_dequant4(r.q[x], r.sc[x]);
  } else {
    dev_cp_async_wait<0>();
  }
}

/* Thread block: tokens [tile * tq, + tq) (rows token * G + head), blocks [chunk * MSA_TILE_CHUNK,
 * + MSA_TILE_CHUNK) of the table, each scored for the rows whose candidates hold it. Thread
 * (ty, tx) = (warp * 2 + lane / 16, lane % 16) owns rows ty + 16 i and keys tx + 16 j (i, j < 8). */
template <bool FP8>
__global__ void __launch_bounds__(256, 2) msa_score_tile_kernel(msa_args a, int T, int tq) {
  dev_pdl_enter();
  extern __shared__ float4 msa_tile_smem[];
  float *qs = (float *)msa_tile_smem;                    /* [128, LDQ]: row, dim */
  float *kf = qs + (size_t)MSA_TILE_ROWS * MSA_TILE_LDQ; /* [2][128, LDK]: key, dim of the slab */
  __shared__ int32_t tpos[MSA_TILE_ROWS];
  __shared__ int lo_s, hi_s;
  const int tid = threadIdx.x, lane = tid & 31, tx = lane & 15, ty = 2 * (tid >> 5) + (lane >> 4);
  const int tile = (int)(blockIdx.x / (unsigned)a.chunks), chunk = (int)(blockIdx.x % (unsigned)a.chunks);
  const int t0 = tile * tq, ntok = T - t0 < tq ? T - t0 : tq, G = a.G, ihd = a.kv.ihd;
  const int nrows = ntok * G, slabs = (ihd + MSA_TILE_DK - 1) / MSA_TILE_DK;

  /* The blocks of this chunk that some token of the tile has among its candidates. */
  if (tid == 0) lo_s = 0x7fffffff, hi_s = 0;
  __syncthreads();
  if (tid < tq) {
    const int32_t p = tid < ntok ? a.pos[t0 + tid] : -1;
    tpos[tid] = p;
    int nb, c0, c1;
    if (msa_candidates(a, p, &nb, &c0, &c1) && c0 < c1) atomicMin(&lo_s, c0), atomicMax(&hi_s, c1);
  }
  __syncthreads();
  const int b0 = lo_s > chunk * MSA_TILE_CHUNK ? lo_s : chunk * MSA_TILE_CHUNK;
  const int b1 = hi_s < (chunk + 1) * MSA_TILE_CHUNK ? hi_s : (chunk + 1) * MSA_TILE_CHUNK;
  if (b0 >= b1) return; /* the same for the whole block */

  msa_slab8 slab;
  msa_slab_fetch<FP8>(a, a.kv.block_table[b0], 0, kf, slab);
  for (int i = tid; i < MSA_TILE_ROWS * slabs * (MSA_TILE_DK / 4); i += blockDim.x) {
    const int r = i / (slabs * (MSA_TILE_DK / 4)), d = 4 * (i % (slabs * (MSA_TILE_DK / 4)));
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f); /* rows past the tile, dims past ihd: zeros */
    if (r < nrows && d < ihd) v = *(const float4 *)(a.iq + ((size_t)t0 * G + r) * ihd + d);
    *(float4 *)(qs + r * MSA_TILE_LDQ + d) = v;
  }
  msa_slab_land<FP8>(kf, slab);
  __syncthreads();
  float acc[8][8];
  const int steps = (b1 - b0) * slabs;
  for (int st = 0; st < steps; st++) {
    const int b = b0 + st / slabs, sl = st % slabs;
    float *knext = kf + (size_t)((st + 1) & 1) * MSA_TILE_KEYS * MSA_TILE_LDK;
    if (sl == 0) {
#pragma unroll
      for (int i = 0; i < 8; i++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[i][j] = 0.0f;
    }
    if (st + 1 < steps) msa_slab_fetch<FP8>(a, a.kv.block_table[b0 + (st + 1) / slabs], (st + 1) % slabs, knext, slab);
    const float *qd = qs + ty * MSA_TILE_LDQ + sl * MSA_TILE_DK,
                *kd = kf + (size_t)(st & 1) * MSA_TILE_KEYS * MSA_TILE_LDK + tx * MSA_TILE_LDK;
#pragma unroll 1 /* unrolled, the loads of later steps hoisted spill the accumulators */
    for (int d = 0; d < MSA_TILE_DK; d += 2) { /* two dims a step: 16 operand registers */
      float2 q[8];
#pragma unroll
      for (int i = 0; i < 8; i++) q[i] = *(const float2 *)(qd + 16 * i * MSA_TILE_LDQ + d);
#pragma unroll
      for (int j = 0; j < 8; j++) {
        const float2 k = *(const float2 *)(kd + 16 * j * MSA_TILE_LDK + d);
#pragma unroll
        for (int i = 0; i < 8; i++) acc[i][j] = fmaf(q[i].y, k.y, fmaf(q[i].x, k.x, acc[i][j]));
      }
    }
    if (sl == slabs - 1) { /* the block's dots are complete: its max per row over visible keys */
#pragma unroll
      for (int i = 0; i < 8; i++) {
        const int r = ty + 16 * i;
        const int32_t p = r < nrows ? tpos[r / G] : -1;
        float best = -INFINITY; /* NaN dots never win */
#pragma unroll
        for (int j = 0; j < 8; j++)
          if (b * MSA_TILE_KEYS + tx + 16 * j <= p) best = fmaxf(best, acc[i][j]);
#pragma unroll
        for (int o = 1; o < 16; o <<= 1) best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, o));
        int nb, c0, c1;
        if (tx == 0 && msa_candidates(a, p, &nb, &c0, &c1) && b >= c0 && b < c1)
          a.scores[((size_t)t0 * G + r) * a.kv.num_blocks + b] = best;
      }
    }
    if (st + 1 < steps) msa_slab_land<FP8>(knext, slab);
    __syncthreads();
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

/* The prefill scores by tiles of 128 / G tokens (msa_score_tile_kernel), chunks of
 * MSA_TILE_CHUNK blocks. */
static void msa_launch_score_tiles(cuda_backend *cb, msa_args &a, int T) {
  const int tq = MSA_TILE_ROWS / a.G;
  a.chunk_blocks = MSA_TILE_CHUNK;
  a.chunks = (a.kv.num_blocks + MSA_TILE_CHUNK - 1) / MSA_TILE_CHUNK;
  const unsigned grid = (unsigned)((int64_t)((T + tq - 1) / tq) * a.chunks);
  const size_t smem = msa_tile_smem_bytes();
  if (a.kv.dtype == M3_KV_FP8) {
    cuda_allow_smem(cb, (const void *)msa_score_tile_kernel<true>, smem, "msa_select (prefill tiles)");
    dev_launch(msa_score_tile_kernel<true>, grid, 256, smem, cb->stream, a, T, tq);
  } else {
    cuda_allow_smem(cb, (const void *)msa_score_tile_kernel<false>, smem, "msa_select (prefill tiles)");
    dev_launch(msa_score_tile_kernel<false>, grid, 256, smem, cb->stream, a, T, tq);
  }
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
    a.scores = (float *)cuda_scratch(cb, (size_t)T * G * kv->num_blocks * sizeof(float), "msa_select");
    if (!a.scores) return;
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
    if (T >= MSA_TILE_MIN_T && kv->block_size == MSA_TILE_KEYS && kv->ihd <= MSA_TILE_MAX_IHD) {
      msa_launch_score_tiles(cb, a, T);
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
