/* moe.cu: MoE routing and the routed experts (shared/spec/m3_text_spec.md §3.5) on the GPU.
 * Routing, all in float32: sigmoid scores, biased top-k with the CPU's order (ties to the lower
 * expert, NaN last), weights renormalised over the chosen experts in choice order and scaled. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/weight_load.cuh"

enum { ROUTE_THREADS = 128, ROUTE_MAX_K = 64 };

/* One block per token. Shared memory: s [E] floats, then the choice keys [E]. */
__global__ void __launch_bounds__(ROUTE_THREADS)
    moe_route_kernel(const float *__restrict__ logits, const float *__restrict__ bias, int E, int k,
                     float scaling, int32_t *__restrict__ ids, float *__restrict__ weights) {
  dev_pdl_enter();
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
  dev_launch(moe_route_kernel, T, ROUTE_THREADS, smem, cb->stream, logits, bias, E, k, scaling, ids, weights);
  cuda_launched(cb, "moe_route");
}

/* ---- routed experts ----
 *
 * The T*k (token, choice) slots are grouped by expert on the device (one warp: counts, exclusive
 * prefix, stable placement in slot order, the list of experts with tokens), so expert e owns the
 * sorted positions [start[e], start[e + 1]) and every per-slot buffer below is in that order.
 * Decode sizes (T <= MOE_DECODE_MAX_T) never wait for the host: a grouped GEMV runs one block row
 * per possibly active expert (blocks past the active count exit), a warp per weight row applied
 * to the expert's tokens MOE_TOKENS_PER_PASS at a time (later passes find the row in L1/L2):
 * first gate and up together with SwiGLU-OAI into act [slot, I], then down into y [slot, H].
 * E4M3 experts (MXFP8, FP8 block) take the same two steps on the tensor cores (moe_mx_kernel): a
 * block per 16 weight rows, its warps splitting K, activations as hi + lo BF16. One token (T = 1,
 * batch-1 decode) takes neither: moe_warp_kernel, a warp per 2 or 4 rows walking K alone with
 * loads two steps ahead, for every dtype with 16-byte rows (float32 activations).
 * Larger T reads the expert offsets back once (prefill is compute-bound) and runs each active
 * expert's chain: gate and up matmuls, SwiGLU-OAI over its rows, down matmul (cuBLASLt with BF16
 * activations, any dtype). One expert's GEMMs at a few hundred tokens fill a fraction of the SMs,
 * so the chains run on several lanes (side streams with their own cuBLASLt workspace and
 * scratch, cuda_internal.h cuda_lane) at once. BF16 and MXFP8 experts (H and I multiples of 32,
 * 16-byte aligned) take neither the readback nor the lanes: moe_grouped.cu runs the whole prefill
 * as two grouped GEMMs over (expert, m-tile, n-tile) tiles found on the device, SwiGLU-OAI fused
 * into the first, where that was measured faster (grouped_wins); M3_MOE_GROUPED=0 or 1 (read at
 * backend creation into cb->moe_grouped) keeps them on the lanes or always groups them. Both end
 * with the combine: x[t] += w[t, j] * y[slot(t, j)] in choice order j, float32, then the shared
 * expert's row when the op has one (at one token of mx1 experts one more expert of their launches,
 * otherwise the matmul and SwiGLU ops into y's rows past the slots). */

enum {
  MOE_DECODE_MAX_T = 64,
  MOE_ROWS_PER_BLOCK = 8,
  MOE_TOKENS_PER_PASS = 8,
  MOE_MAX_E = 6144, /* the grouping keeps two ints per expert in 48 KB of shared memory */
  MOE_ROW_THREADS = 256,
  /* Lanes of the prefill: a 3072 x 256 expert GEMM is a few dozen output tiles, a sixth to a
   * third of the H200's 132 SMs */
  MOE_DEFAULT_LANES = 8,
};

/* What prepare_experts keeps for one layer. */
typedef struct {
  cuda_weight *w;      /* device [3 * E]: the gate experts, then up, then down */
  cuda_weight *shared; /* device [3]: the shared expert's gate, up and down; NULL: none */
  int shared_mx1;      /* the shared expert has the routed experts' shapes, dtype and alignment:
                        * at one token it joins their moe_mx1_kernel launches */
  int wide;            /* every expert's data is 16-byte aligned, so wide loads are possible */
  int scales4;         /* every MXFP8 expert's scales 4-byte aligned (moe_mx1_kernel copies them 4
                        * bytes at once) */
  int32_t *host_start; /* host [E + 1]: the expert offsets the prefill path reads back */
  int8_t *lane_of;     /* host [E]: the prefill's lane of each expert, -1: the backend's stream */
  uint8_t *chain_kind; /* host [E]: how the prefill runs each expert's matmuls (CHAIN_*) */
} moe_table;

/* An expert's prefill chain: matmuls routed one by one (cuda_matmul); all GEMMs
 * (chain_on_lane); all GEMMs on one BF16 rounding of their inputs (cuda_matmul_takes_bf16). */
enum { CHAIN_ANY, CHAIN_GEMM, CHAIN_GEMM_BF16 };

/* The slots grouped by expert: device arrays in moe_scratch. */
typedef struct {
  int32_t *start;    /* [E + 1] expert e owns sorted positions [start[e], start[e + 1]) */
  int32_t *active;   /* [E] the experts with slots, ascending; the first *n_active are set */
  int32_t *n_active; /* [1] */
  int32_t *slot_at;  /* [T*k] the slot t*k + j at each sorted position */
  int32_t *pos_of;   /* [T*k] the sorted position of each slot; MOE_NO_EXPERT for a negative id,
                      * MOE_OTHER_RANK for an expert outside [first, first + E) (m3_moe_experts) */
  int n;             /* T*k: the bound the kernels hold device offsets to */
  /* One token (moe_mx1_kernel, moe_combine_kernel): no grouping, the k choices stay in choice
   * order, slot j at position j; NULL: the arrays above hold the grouping. */
  const int32_t *ids;
  int first, E;      /* the local experts [first, first + E) of the router's numbering */
} moe_groups;

/* pos_of of a choice no sorted position holds: a negative id (no expert: moe_route out of memory)
 * turns its token's row NaN in the combine; another rank's expert is skipped there. */
enum { MOE_NO_EXPERT = -1, MOE_OTHER_RANK = -2 };

/* The local expert id - first of router id `id`, or -1 when this rank does not hold it. */
__device__ __forceinline__ int moe_local_expert(int id, int first, int E) {
  return id >= first && id - first < E ? id - first : -1; /* id >= first >= 0: no overflow */
}

/* Grouping the n = T * k slots by local expert, in slot order within each expert (a stable
 * counting sort: the placement does not depend on timing). Up to MOE_GROUP_CHUNK slots, one warp
 * does it all (moe_group_kernel); more (a prefill: 8192 tokens are 32768 slots, which one warp
 * walked in 0.53 ms on an H200) go in chunks of MOE_GROUP_CHUNK, a warp each: counts per chunk
 * (moe_group_count_kernel), the chunks' offsets and the experts' starts (moe_group_scan_kernel),
 * then each chunk placed from its offsets (moe_group_place_kernel). */
enum { MOE_GROUP_CHUNK = 512 };

/* One warp: counts[e] += the slots of [i0, i1) whose local expert is e (counts [E]).
 * __match_any_sync groups the lanes of a round of 32 slots by expert. */
__device__ __forceinline__ void moe_group_count(const int32_t *__restrict__ ids, const moe_groups &g, int i0,
                                                int i1, int32_t *counts, int lane) {
  const unsigned below = (1u << lane) - 1u;
  for (int b = i0; b < i1; b += 32) {
    const int i = b + lane;
    const int e = i < i1 ? moe_local_expert(ids[i], g.first, g.E) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (e >= 0 && (peers & below) == 0) counts[e] += __popc(peers);
    __syncwarp();
  }
}

/* One warp: g.start, g.active and *g.n_active from the experts' totals counts [E]; next[e] =
 * start[e]. */
__device__ __forceinline__ void moe_group_starts(const moe_groups &g, const int32_t *counts, int32_t *next,
                                                 int lane) {
  const unsigned all = 0xffffffffu, below = (1u << lane) - 1u;
  int run = 0, n_active = 0;
  for (int e0 = 0; e0 < g.E; e0 += 32) {
    const int e = e0 + lane;
    const int c = e < g.E ? counts[e] : 0;
    int incl = c; /* inclusive prefix over the lanes */
    for (int o = 1; o < 32; o <<= 1) {
      int v = __shfl_up_sync(all, incl, o);
      if (lane >= o) incl += v;
    }
    if (e < g.E) g.start[e] = next[e] = run + incl - c;
    const unsigned has = __ballot_sync(all, c > 0);
    if (c > 0) g.active[n_active + __popc(has & below)] = e;
    n_active += __popc(has);
    run += __shfl_sync(all, incl, 31);
  }
  if (lane == 0) {
    g.start[g.E] = run;
    *g.n_active = n_active;
  }
}

/* One warp: slots [i0, i1) placed at next[e] onward in slot order (next [E] advances); a lane's
 * rank among its earlier peers keeps the placement stable. */
__device__ __forceinline__ void moe_group_place(const int32_t *__restrict__ ids, const moe_groups &g, int i0,
                                                int i1, int32_t *next, int lane) {
  const unsigned below = (1u << lane) - 1u;
  for (int b = i0; b < i1; b += 32) {
    const int i = b + lane;
    const int id = i < i1 ? ids[i] : -1;
    const int e = i < i1 ? moe_local_expert(id, g.first, g.E) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (e >= 0) {
      const int p = next[e] + __popc(peers & below);
      g.slot_at[p] = i;
      g.pos_of[i] = p;
    } else if (i < i1) {
      g.pos_of[i] = id < 0 ? MOE_NO_EXPERT : MOE_OTHER_RANK;
    }
    __syncwarp();
    if (e >= 0 && (peers & below) == 0) next[e] += __popc(peers);
    __syncwarp();
  }
}

/* n <= MOE_GROUP_CHUNK: one warp, shared memory counts [E] then next [E]. */
__global__ void __launch_bounds__(32) moe_group_kernel(const int32_t *__restrict__ ids, moe_groups g) {
  dev_pdl_enter();
  extern __shared__ int32_t counts[];
  int32_t *next = counts + g.E;
  const int lane = threadIdx.x;
  for (int e = lane; e < g.E; e += 32) counts[e] = 0;
  __syncwarp();
  moe_group_count(ids, g, 0, g.n, counts, lane);
  moe_group_starts(g, counts, next, lane);
  __syncwarp();
  moe_group_place(ids, g, 0, g.n, next, lane);
}

/* The slots [*i0, *i1) of chunk blockIdx.x. */
__device__ __forceinline__ void moe_group_chunk(const moe_groups &g, int *i0, int *i1) {
  *i0 = (int)blockIdx.x * MOE_GROUP_CHUNK;
  *i1 = g.n - *i0 < MOE_GROUP_CHUNK ? g.n : *i0 + MOE_GROUP_CHUNK;
}

/* Chunk blockIdx.x's counts into chunk_counts [chunks][E] (shared memory counts [E]). */
__global__ void __launch_bounds__(32)
    moe_group_count_kernel(const int32_t *__restrict__ ids, moe_groups g, int32_t *chunk_counts) {
  dev_pdl_enter();
  extern __shared__ int32_t counts[];
  const int lane = threadIdx.x;
  int i0, i1;
  moe_group_chunk(g, &i0, &i1);
  for (int e = lane; e < g.E; e += 32) counts[e] = 0;
  __syncwarp();
  moe_group_count(ids, g, i0, i1, counts, lane);
  for (int e = lane; e < g.E; e += 32) chunk_counts[(size_t)blockIdx.x * g.E + e] = counts[e];
}

enum { MOE_SCAN_THREADS = 256 };

/* chunk_counts [chunks][E] -> where each chunk's slots of expert e start among that expert's
 * slots (the earlier chunks' counts), a thread per expert walking the chunks (one warp over 129
 * experts walked them five times over, 60 us of an 8192-token prefill); then one warp sets the
 * experts' starts (shared memory totals [E], next [E]). The place kernel adds start[e]. */
__global__ void __launch_bounds__(MOE_SCAN_THREADS)
    moe_group_scan_kernel(moe_groups g, int32_t *chunk_counts, int chunks) {
  dev_pdl_enter();
  extern __shared__ int32_t totals[];
  int32_t *next = totals + g.E;
  for (int e = threadIdx.x; e < g.E; e += blockDim.x) {
    int run = 0;
    for (int c0 = 0; c0 < chunks; c0 += 8) { /* 8 loads in flight: a store may not pass them */
      int v[8];
#pragma unroll
      for (int j = 0; j < 8; j++) v[j] = c0 + j < chunks ? chunk_counts[(size_t)(c0 + j) * g.E + e] : 0;
#pragma unroll
      for (int j = 0; j < 8; j++)
        if (c0 + j < chunks) {
          chunk_counts[(size_t)(c0 + j) * g.E + e] = run;
          run += v[j];
        }
    }
    totals[e] = run;
  }
  __syncthreads();
  if (threadIdx.x < 32) moe_group_starts(g, totals, next, threadIdx.x);
}

/* Chunk blockIdx.x placed from its offsets and the experts' starts (shared memory next [E]). */
__global__ void __launch_bounds__(32)
    moe_group_place_kernel(const int32_t *__restrict__ ids, moe_groups g, const int32_t *chunk_offsets) {
  dev_pdl_enter();
  extern __shared__ int32_t next[];
  const int lane = threadIdx.x;
  int i0, i1;
  moe_group_chunk(g, &i0, &i1);
  for (int e = lane; e < g.E; e += 32) next[e] = g.start[e] + chunk_offsets[(size_t)blockIdx.x * g.E + e];
  __syncwarp();
  moe_group_place(ids, g, i0, i1, next, lane);
}

/* Groups g.n slots of ids (moe_groups); chunk_counts: scratch [ceil(n / MOE_GROUP_CHUNK)][E]
 * (unused up to one chunk). */
static void moe_group(cuda_backend *cb, const int32_t *ids, const moe_groups &g, int32_t *chunk_counts) {
  const size_t e_bytes = (size_t)g.E * sizeof(int32_t);
  if (g.n <= MOE_GROUP_CHUNK) {
    dev_launch(moe_group_kernel, 1, 32, 2 * e_bytes, cb->stream, ids, g);
  } else {
    const int chunks = (g.n + MOE_GROUP_CHUNK - 1) / MOE_GROUP_CHUNK;
    dev_launch(moe_group_count_kernel, (unsigned)chunks, 32, e_bytes, cb->stream, ids, g, chunk_counts);
    dev_launch(moe_group_scan_kernel, 1, MOE_SCAN_THREADS, 2 * e_bytes, cb->stream, g, chunk_counts, chunks);
    dev_launch(moe_group_place_kernel, (unsigned)chunks, 32, e_bytes, cb->stream, ids, g,
               (const int32_t *)chunk_counts);
  }
  cuda_launched(cb, "moe_experts (grouping)");
}

/* dot(w[0..CH), x[0..CH)); x 16-byte aligned when CH > 1. */
template <int CH>
__device__ __forceinline__ float chunk_dot(const float *w, const float *x) {
  if (CH == 1) return w[0] * x[0];
  float s = 0.0f;
#pragma unroll
  for (int q = 0; q < CH / 4; q++) {
    float4 xv = *(const float4 *)(x + 4 * q);
    s += w[4 * q] * xv.x + w[4 * q + 1] * xv.y + w[4 * q + 2] * xv.z + w[4 * q + 3] * xv.w;
  }
  return s;
}

/* The grouped GEMV. blockIdx.y: index into the active experts; warp: weight row r of expert e.
 * GATED: out = act [slot, I] = SwiGLU-OAI(gate_e h[token], up_e h[token]), token =
 *   slot_at[p] / k, weights w0 = gate, w1 = up;
 * otherwise: out = y [slot, H] = down_e x[p], x = act rows in sorted order, w0 = down. */
template <int WK, int GATED>
__global__ void __launch_bounds__(32 * MOE_ROWS_PER_BLOCK)
    moe_gemv_kernel(const cuda_weight *__restrict__ w0s, const cuda_weight *__restrict__ w1s,
                    moe_groups g, const float *__restrict__ x, int k, float alpha, float beta,
                    float limit, float *__restrict__ out) {
  dev_pdl_enter();
  constexpr int CH = wk_chunk<WK>::n, NT = MOE_TOKENS_PER_PASS;
  if ((int)blockIdx.y >= *g.n_active) return;
  const int e = g.active[blockIdx.y];
  const cuda_weight w0 = w0s[e];
  const cuda_weight w1 = GATED ? w1s[e] : w0;
  const int64_t r = (int64_t)blockIdx.x * MOE_ROWS_PER_BLOCK + (threadIdx.x >> 5);
  if (r >= w0.rows) return; /* the whole warp: no warp_sum waits on it */
  const int lane = threadIdx.x & 31;
  const int64_t K = w0.cols, N = w0.rows;
  const int end = min(g.start[e + 1], g.n); /* offsets come from device memory: bounded loops */
  for (int p0 = max(g.start[e], 0); p0 < end; p0 += NT) {
    const int nt = end - p0 < NT ? end - p0 : NT;
    const float *xr[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) {
      const int p = p0 + (t < nt ? t : 0); /* rows past nt repeat a valid one, unused */
      xr[t] = x + (size_t)(GATED ? g.slot_at[p] / k : p) * (size_t)K;
    }
    float a0[NT], a1[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) a0[t] = a1[t] = 0.0f;
#pragma unroll 2
    for (int64_t c = (int64_t)lane * CH; c < K; c += 32 * CH) {
      float v0[CH], v1[CH];
      load_chunk<WK>(w0, r, c, v0);
      if (GATED) load_chunk<WK>(w1, r, c, v1);
#pragma unroll
      for (int t = 0; t < NT; t++) {
        if (t >= nt) break;
        a0[t] += chunk_dot<CH>(v0, xr[t] + c);
        if (GATED) a1[t] += chunk_dot<CH>(v1, xr[t] + c);
      }
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
      const float s0 = warp_sum(a0[t]);
      const float s1 = GATED ? warp_sum(a1[t]) : 0.0f;
      if (lane == 0 && t < nt)
        out[(size_t)(p0 + t) * (size_t)N + r] = GATED ? dev_swiglu_oai(s0, s1, alpha, beta, limit) : s0;
    }
  }
}

/* The grouped products of E4M3 experts on the tensor cores (weight_load.cuh mx_accumulate), the
 * same outputs as moe_gemv_kernel: blockIdx.y picks the active expert, blockIdx.x a tile of 16
 * weight rows, and the 8 warps split K (gate and up: H; down: I) in groups of MX_U 32-column
 * blocks; the expert's tokens go 8 at a time (one B tile; later passes find the rows in L1/L2).
 * The warps' partial sums meet in shared memory in a fixed order; GATED applies SwiGLU-OAI to
 * the gate and up sums of each (row, token). */
template <int GATED>
__global__ void __launch_bounds__(32 * MX_WARPS)
    moe_mx_kernel(const cuda_weight *__restrict__ w0s, const cuda_weight *__restrict__ w1s,
                  moe_groups grp, const float *__restrict__ x, int k, float alpha, float beta,
                  float limit, float *__restrict__ out) {
  dev_pdl_enter();
  if ((int)blockIdx.y >= *grp.n_active) return; /* the whole block */
  const int e = grp.active[blockIdx.y];
  const cuda_weight w0 = w0s[e];
  const cuda_weight w1 = GATED ? w1s[e] : w0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2;
  const int64_t N = w0.rows, K = w0.cols, r0 = (int64_t)blockIdx.x * 16;
  int64_t rows[1][2];
  mx_rows<1>(w0, r0, rows);
  __shared__ float partial[GATED ? 2 : 1][MX_WARPS][4][32];
  const int end = min(grp.start[e + 1], grp.n); /* offsets come from device memory: bounded loops */
  for (int p0 = max(grp.start[e], 0); p0 < end; p0 += 8) {
    const int nt = end - p0 < 8 ? end - p0 : 8;
    mx_x xr[1] = {{NULL, NULL, NULL}};
    if (g < nt) xr[0].f = x + (size_t)(GATED ? grp.slot_at[p0 + g] / k : p0 + g) * (size_t)K;
    float acc0[1][1][4] = {}, acc1[1][1][4] = {};
    uint32_t nan0[1][2] = {}, nan1[1][2] = {};
    mx_accumulate<1, 1, 0, MX_U>(w0, rows, xr, warp, MX_WARPS, acc0, nan0);
    mx_mark_nan<1, 1>(nan0, acc0);
    if (GATED) {
      mx_accumulate<1, 1, 0, MX_U>(w1, rows, xr, warp, MX_WARPS, acc1, nan1);
      mx_mark_nan<1, 1>(nan1, acc1);
    }
    __syncthreads(); /* the previous pass's sums are used up */
#pragma unroll
    for (int i = 0; i < 4; i++) {
      partial[0][warp][i][lane] = acc0[0][0][i];
      if (GATED) partial[GATED ? 1 : 0][warp][i][lane] = acc1[0][0][i];
    }
    __syncthreads();
    if (threadIdx.x < 4 * 32) {
      const int l = threadIdx.x % 32, i = threadIdx.x / 32;
      float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
      for (int wk = 0; wk < MX_WARPS; wk++) {
        s0 += partial[0][wk][i][l];
        if (GATED) s1 += partial[GATED ? 1 : 0][wk][i][l];
      }
      const int64_t r = r0 + (l >> 2) + (i >= 2 ? 8 : 0);
      const int t = 2 * (l & 3) + (i & 1);
      if (r < N && t < nt)
        out[(size_t)(p0 + t) * (size_t)N + r] = GATED ? dev_swiglu_oai(s0, s1, alpha, beta, limit) : s0;
    }
  }
}

template <int GATED>
static void launch_grouped(cuda_backend *cb, int kind, dim3 grid, const cuda_weight *w0,
                           const cuda_weight *w1, const moe_groups &g, const float *x, int k,
                           const m3_moe_experts *ex, float *out) {
  dim3 block(32 * MOE_ROWS_PER_BLOCK);
  float a = ex->alpha, b = ex->beta, l = ex->limit;
  decltype(&moe_gemv_kernel<WK_ANY, GATED>) kernel;
  switch (kind) {
    case WK_F32: kernel = moe_gemv_kernel<WK_F32, GATED>; break;
    case WK_BF16: kernel = moe_gemv_kernel<WK_BF16, GATED>; break;
    case WK_F16: kernel = moe_gemv_kernel<WK_F16, GATED>; break;
    case WK_E4M3: kernel = moe_gemv_kernel<WK_E4M3, GATED>; break;
    default: kernel = moe_gemv_kernel<WK_ANY, GATED>; break;
  }
  dev_launch(kernel, grid, block, 0, cb->stream, w0, w1, g, x, k, a, b, l, out);
  cuda_launched(cb, GATED ? "moe_experts (gate, up, swiglu)" : "moe_experts (down)");
}

/* The grouped GEMV at one token (T = 1: each active expert has one slot, or one per time a token
 * chose it; E4M3 experts that fit take moe_mx1_kernel, below): the same outputs as
 * moe_gemv_kernel, with matmul.cu gemv_warp_kernel's layout:
 * blockIdx.y picks the active expert, each of 8 warps owns RW rows (GATED: of gate and of up
 * both, which then share every load of x) and walks K alone through warp_rows_dot, the next units
 * loaded while the current ones are used: 128 bytes in flight per lane, 2 blocks per SM, against
 * moe_gemv_kernel's 64 bytes per lane (one row, 16-byte chunks, unrolled twice) and moe_mx_kernel's
 * tensor-core tiles that at one token use one column of eight. */
template <int WK, int GATED, int RW>
__global__ void __launch_bounds__(32 * MOE_ROWS_PER_BLOCK, 2)
    moe_warp_kernel(const cuda_weight *__restrict__ w0s, const cuda_weight *__restrict__ w1s,
                    moe_groups g, const float *__restrict__ x, int k, float alpha, float beta,
                    float limit, float *__restrict__ out) {
  dev_pdl_enter();
  if ((int)blockIdx.y >= *g.n_active) return;
  const int e = g.active[blockIdx.y];
  const cuda_weight w0 = w0s[e];
  const cuda_weight w1 = GATED ? w1s[e] : w0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t N = w0.rows, K = w0.cols;
  const int64_t r0 = ((int64_t)blockIdx.x * MOE_ROWS_PER_BLOCK + warp) * RW;
  if (r0 >= N) return; /* the whole warp: no warp_sum waits on it */
  int64_t rows[RW];
#pragma unroll
  for (int r = 0; r < RW; r++) rows[r] = r0 + r < N ? r0 + r : N - 1; /* ragged end: reread a row */
  const int end = min(g.start[e + 1], g.n); /* offsets come from device memory: bounded loops */
  for (int p = max(g.start[e], 0); p < end; p++) {
    const float *xr = x + (size_t)(GATED ? g.slot_at[p] / k : p) * (size_t)K;
    float acc[GATED ? 2 : 1][RW];
    warp_rows_dot<WK, GATED ? 2 : 1, RW>(w0, w1, rows, xr, acc);
#pragma unroll
    for (int r = 0; r < RW; r++) {
      const float s0 = warp_sum(acc[0][r]);
      const float s1 = GATED ? warp_sum(acc[GATED ? 1 : 0][r]) : 0.0f;
      if (lane == 0 && r0 + r < N)
        out[(size_t)p * (size_t)N + r0 + r] = GATED ? dev_swiglu_oai(s0, s1, alpha, beta, limit) : s0;
    }
  }
}

/* moe_warp_kernel over the active experts: gate and up 2 rows a warp (4 row streams, as down's 4
 * rows), down 4. A 3072 x 6144 expert is then 192 blocks of either: 768 for 4 experts, under
 * three waves of 2 blocks on each of 132 SMs. */
template <int GATED>
static void launch_grouped_warp(cuda_backend *cb, int kind, unsigned experts, const cuda_weight *w0,
                                const cuda_weight *w1, const moe_groups &g, const float *x, int k,
                                int64_t rows, const m3_moe_experts *ex, float *out) {
  constexpr int RW = GATED ? 2 : 4;
  const dim3 grid((unsigned)((rows + MOE_ROWS_PER_BLOCK * RW - 1) / (MOE_ROWS_PER_BLOCK * RW)), experts);
  const dim3 block(32 * MOE_ROWS_PER_BLOCK);
  const float a = ex->alpha, b = ex->beta, l = ex->limit;
  decltype(&moe_warp_kernel<WK_E4M3, GATED, RW>) kernel;
  switch (kind) {
    case WK_F32: kernel = moe_warp_kernel<WK_F32, GATED, RW>; break;
    case WK_BF16: kernel = moe_warp_kernel<WK_BF16, GATED, RW>; break;
    case WK_F16: kernel = moe_warp_kernel<WK_F16, GATED, RW>; break;
    default: kernel = moe_warp_kernel<WK_E4M3, GATED, RW>; break;
  }
  dev_launch(kernel, grid, block, 0, cb->stream, w0, w1, g, x, k, a, b, l, out);
  cuda_launched(cb, GATED ? "moe_experts (gate, up, swiglu; one token)" : "moe_experts (down; one token)");
}

/* One token's active experts on the tensor cores (weight_load.cuh mx1_*): the items (active
 * expert, group of rows: 16 of down, or GATED 8 of gate and the same 8 of up in one 16-row stage,
 * out = swiglu of the two) in equal runs, one a block, each item once per position of its expert.
 * The shared expert, when given, is one more expert after the active ones, at sorted position n
 * (past the routed slots); at 3 x 3072 x 6144 it would otherwise pay the fixed cost of two
 * launches of its own. A block stages x when a position's x differs from the one it holds (gate
 * and up: the token's hidden state, the same for every expert at one token; down: the expert's
 * activation, which a run of items of one expert shares). Gate and up share a stage's rows, so that
 * an item is one pass: the gate and up of 4 experts and the shared one 61-62 -> 56.7 us against
 * two passes of 16 rows each (H200, ncu; one pass of 16 + 16 rows and 512 columns before that took
 * 53-54 us for the 4 experts against 47-49 in two passes). The experts a block's run reaches are
 * looked up once, into shared memory (moe_mx1_fill), not at every item. */
enum { MOE_MX1_CACHED = 4 }; /* experts a block holds looked up: a run spans 1-2 at full width */

/* An active expert (or the shared one) as moe_mx1_kernel's items use it: its matrices (gate and
 * up, or down twice) and the sorted positions it applies to. */
typedef struct {
  cuda_weight w[2];
  int begin, end;
} moe_mx1_expert;

/* Thread c < MOE_MX1_CACHED looks up expert a0 + c (below a_end) into cached[c]: active expert
 * a of the groups (one token: choice a, at position a; none when it is not a local expert), or
 * past them the shared one at position n. Offsets come from device memory: begin and end are
 * bounded to [0, n]. */
template <int GATED>
__device__ __forceinline__ void moe_mx1_fill(const cuda_weight *__restrict__ w0s, const cuda_weight *__restrict__ w1s,
                                             const cuda_weight *__restrict__ shared, const moe_groups &g,
                                             int n_active, int a0, int a_end, moe_mx1_expert *cached) {
  const int c = threadIdx.x, a = a0 + c;
  if (c >= MOE_MX1_CACHED || a >= a_end) return;
  if (a >= n_active) { /* the shared expert */
    cached[c].w[0] = shared[GATED ? 0 : 2], cached[c].w[1] = shared[GATED ? 1 : 2];
    cached[c].begin = g.n, cached[c].end = g.n + 1;
    return;
  }
  const int e = g.ids ? moe_local_expert(g.ids[a], g.first, g.E) : g.active[a];
  cached[c].w[0] = w0s[e >= 0 ? e : 0];
  cached[c].w[1] = GATED ? w1s[e >= 0 ? e : 0] : w0s[e >= 0 ? e : 0];
  cached[c].begin = g.ids ? a : max(g.start[e], 0);
  cached[c].end = g.ids ? a + (e >= 0) : min(g.start[e + 1], g.n);
}

template <int GATED>
__global__ void __launch_bounds__(MX1_THREADS)
    moe_mx1_kernel(const cuda_weight *__restrict__ w0s, const cuda_weight *__restrict__ w1s,
                   const cuda_weight *__restrict__ shared, moe_groups g, const float *__restrict__ x,
                   int k, int64_t groups, float alpha, float beta, float limit,
                   float *__restrict__ out) {
  dev_pdl_enter();
  extern __shared__ __align__(128) uint8_t mx1_smem[];
  __shared__ uint64_t bars[2 * MX1_SLOTS];
  __shared__ float part[2][MX1_CONSUMERS][16];
  __shared__ float red[MX1_CONSUMERS];
  __shared__ moe_mx1_expert cached[MOE_MX1_CACHED];
  const int n_active = g.ids ? g.n : *g.n_active, experts = n_active + (shared != NULL);
  const int64_t K = w0s[0].cols, items = (int64_t)experts * groups;
  const int64_t i0 = items * blockIdx.x / gridDim.x, i1 = items * (blockIdx.x + 1) / gridDim.x;
  int a0 = (int)(i0 / groups);
  moe_mx1_fill<GATED>(w0s, w1s, shared, g, n_active, a0, experts, cached);
  const mx1_ring rg = mx1_ring_init(mx1_smem, K, bars); /* its barrier publishes `cached` */
  const int warp = threadIdx.x >> 5, producer = warp >= MX1_CONSUMERS;
  const float *staged = NULL;
  float back = 1.0f;
  uint32_t n = 0, done = 0;
  for (int64_t i = i0; i < i1; i++) { /* the same path for the block */
    /* the active experts' items, then the shared expert's at position n (its token's row) */
    const int a = (int)(i / groups);
    if (a - a0 >= MOE_MX1_CACHED) { /* a run past the looked-up experts (small ones): the next */
      __syncthreads();
      a0 = a;
      moe_mx1_fill<GATED>(w0s, w1s, shared, g, n_active, a0, experts, cached);
      __syncthreads();
    }
    const moe_mx1_expert &ce = cached[a - a0];
    const cuda_weight &w0 = ce.w[0], &w1 = ce.w[1];
    const int64_t N = w0.rows, r = i % groups * (GATED ? 8 : 16); /* GATED: 8 rows of gate, 8 of up */
    for (int p = ce.begin; p < ce.end; p++) {
      if (producer) {
        mx1_produce_group(rg, n, mx1_half{&w0, r}, mx1_half{&w1, GATED ? r : r + 8});
        continue;
      }
      const float *xr = x + (size_t)(GATED ? (p >= g.n ? p - g.n : g.ids ? p / k : g.slot_at[p] / k) : p) * (size_t)K;
      if (xr != staged) back = mx1_stage_x(xr, K, (uint32_t *)mx1_smem, red), staged = xr;
      const float sum = mx1_consume_group(rg, n, w0, (const uint32_t *)mx1_smem, part[done++ & 1]);
      const float up = GATED ? __shfl_down_sync(0xffffffffu, sum, 8) : 0.0f; /* slot row t + 8 to t < 8 */
      const int t = threadIdx.x;
      if (t < (GATED ? 8 : 16) && r + t < N)
        out[(size_t)p * (size_t)N + r + t] =
            GATED ? dev_swiglu_oai(sum * back, up * back, alpha, beta, limit) : sum * back;
    }
  }
}

/* moe_mx1_kernel over at most `experts` active experts of `rows` rows and K columns (mx1_fits),
 * and the shared expert unless `shared` is NULL, no more blocks than the SMs hold at once, in runs
 * of equal length (mx1_blocks). */
template <int GATED>
static void launch_moe_mx1(cuda_backend *cb, unsigned experts, const cuda_weight *w0,
                           const cuda_weight *w1, const cuda_weight *shared, const moe_groups &g,
                           const float *x, int k, int64_t rows, int64_t K, const m3_moe_experts *ex,
                           float *out) {
  const void *kernel = (const void *)moe_mx1_kernel<GATED>;
  const char *op = GATED ? "moe_experts (gate, up, swiglu; e4m3 one token)" : "moe_experts (down; e4m3 one token)";
  const size_t smem = mx1_smem_bytes(K);
  const int64_t groups = GATED ? (rows + 7) / 8 : (rows + 15) / 16; /* items of an expert */
  cuda_allow_smem(cb, kernel, smem, op);
  const int64_t blocks_max = (int64_t)cuda_blocks_per_sm(cb, kernel, MX1_THREADS, smem, op) * cb->num_sms,
                items = ((int64_t)experts + (shared != NULL)) * groups;
  const unsigned blocks = mx1_blocks(items, blocks_max);
  dev_launch(moe_mx1_kernel<GATED>, blocks, MX1_THREADS, smem, cb->stream, w0, w1, shared, g, x, k, groups, ex->alpha,
             ex->beta, ex->limit, out);
  cuda_launched(cb, op);
}

/* out[p] = h[slot_at[p] / k] for the used sorted positions p < gridDim.x. */
__global__ void moe_gather_kernel(const float *__restrict__ h, const int32_t *__restrict__ slot_at,
                                  int k, int64_t H, float *__restrict__ out) {
  dev_pdl_enter();
  const int p = blockIdx.x;
  const float *src = h + (size_t)(slot_at[p] / k) * (size_t)H;
  float *dst = out + (size_t)p * (size_t)H;
  for (int64_t c = threadIdx.x; c < H; c += blockDim.x) dst[c] = src[c];
}

enum { COMBINE_THREADS = 128, COMBINE_J = 8 };

/* pos_of of slot j at one token without grouping (moe_groups.ids): j itself for a local expert. */
__device__ __forceinline__ int32_t moe_one_token_pos(const moe_groups &g, int j) {
  const int32_t id = g.ids[j];
  return moe_local_expert(id, g.first, g.E) >= 0 ? j : id < 0 ? MOE_NO_EXPERT : MOE_OTHER_RANK;
}

/* Columns [c, c + 4) of a row (VEC: one 16-byte load; else element by element, 0 past H). */
template <int VEC>
__device__ __forceinline__ void combine_load4(const float *row, int64_t c, int64_t H, float v[4]) {
  if (VEC) {
    const float4 f = *(const float4 *)(row + c);
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
  } else {
#pragma unroll
    for (int i = 0; i < 4; i++) v[i] = c + i < H ? row[c + i] : 0.0f;
  }
}

/* x[t] += w[t, j] * y[pos_of[t*k + j]] for j in order, the CPU's fmaf chain per element, skipping
 * other ranks' experts; a choice of no expert makes the row NaN, as on the CPU; then, given
 * shared_y, x[t] += shared_y[t]. Grid (T, column blocks): a thread takes 4 columns of one token
 * and loads the (position, weight) pairs of COMBINE_J choices at once, then their COMBINE_J rows
 * of y, so that a token's k + 1 row reads are in flight together instead of one pos_of -> y chain
 * per choice and column (one block per token took 42 us at H 6144: about 100 dependent DRAM round
 * trips per thread). VEC: H % 4 == 0 and x 16-byte aligned (y is carved 256-byte aligned): 16-byte
 * loads and stores; otherwise the same per element. */
template <int VEC>
__global__ void __launch_bounds__(COMBINE_THREADS)
    moe_combine_kernel(float *__restrict__ x, const float *__restrict__ y, const float *__restrict__ w,
                       moe_groups g, int k, int64_t H, const float *__restrict__ shared_y) {
  dev_pdl_enter();
  const int64_t t = blockIdx.x, c = ((int64_t)blockIdx.y * COMBINE_THREADS + threadIdx.x) * 4;
  if (c >= H) return;
  float *xt = x + (size_t)t * (size_t)H + c;
  float acc[4];
  combine_load4<VEC>(x + (size_t)t * (size_t)H, c, H, acc);
  for (int j0 = 0; j0 < k; j0 += COMBINE_J) {
    int32_t p[COMBINE_J];
    float wj[COMBINE_J], v[COMBINE_J][4];
#pragma unroll
    for (int jj = 0; jj < COMBINE_J; jj++) {
      const int j = j0 + jj;
      p[jj] = j >= k ? -1 : g.ids ? moe_one_token_pos(g, j) : g.pos_of[(size_t)t * k + j];
      wj[jj] = j < k ? w[(size_t)t * k + j] : 0.0f;
    }
#pragma unroll
    for (int jj = 0; jj < COMBINE_J; jj++) {
      if (p[jj] < 0) v[jj][0] = v[jj][1] = v[jj][2] = v[jj][3] = 0.0f;
      else combine_load4<VEC>(y + (size_t)p[jj] * (size_t)H, c, H, v[jj]);
    }
#pragma unroll
    for (int jj = 0; jj < COMBINE_J; jj++) {
      if (j0 + jj >= k) break;
#pragma unroll
      for (int i = 0; i < 4; i++)
        acc[i] = p[jj] == MOE_NO_EXPERT ? __uint_as_float(0x7fc00000u)
                 : p[jj] < 0            ? acc[i]
                                        : fmaf(wj[jj], v[jj][i], acc[i]);
    }
  }
  if (shared_y) { /* then the shared expert's row, added as the model's residual add did */
    float v[4];
    combine_load4<VEC>(shared_y + (size_t)t * (size_t)H, c, H, v);
#pragma unroll
    for (int i = 0; i < 4; i++) acc[i] = __fadd_rn(acc[i], v[i]);
  }
  if (VEC) {
    *(float4 *)xt = make_float4(acc[0], acc[1], acc[2], acc[3]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; i++)
      if (c + i < H) xt[i] = acc[i];
  }
}

/* Where a prefill's activations already are in BF16 (cuda_to_bf16): xy's rows [T*k, H] and the
 * SwiGLU output's [T*k, I], or NULL where each matmul rounds its own input. */
typedef struct {
  const __nv_bfloat16 *x;
  __nv_bfloat16 *act;
} moe_bf16;

/* Expert e's chain over its cnt sorted rows from `first`: gate, up [cnt, I] from xy [cnt, H],
 * SwiGLU-OAI into gate, then down into xy. gemm (its matmuls are all GEMMs, chain_on_lane): on
 * `lane` (NULL: the backend's stream) through cuda_matmul_lane, reading the BF16 copies of bf
 * where given; else through cuda_matmul. In place is safe: only this chain, in its own stream
 * order, touches these rows. */
static void expert_chain(cuda_backend *cb, cuda_lane *lane, int gemm, moe_bf16 bf,
                         const m3_moe_experts *ex, int e, int first, int cnt, float *xy,
                         float *gate, float *up) {
  const size_t H = (size_t)ex->gate[0].cols, I = (size_t)ex->gate[0].rows, n = (size_t)cnt * I;
  float *x = xy + (size_t)first * H, *g = gate + (size_t)first * I, *u = up + (size_t)first * I;
  const __nv_bfloat16 *xb = bf.x ? bf.x + (size_t)first * H : NULL;
  __nv_bfloat16 *gb = bf.act ? bf.act + (size_t)first * I : NULL;
  const m3_tensor *w[3] = {&ex->gate[e], &ex->up[e], &ex->down[e]};
  const float *in[3] = {x, x, g};
  const __nv_bfloat16 *in_bf16[3] = {xb, xb, gb};
  float *out[3] = {g, u, x};
  for (int m = 0; m < 3; m++) {
    if (m == 2) /* the float stays for the tiled fallback */
      cuda_swiglu_oai_copy(cb, lane ? lane->stream : cb->stream, g, u, n, ex->alpha, ex->beta, ex->limit, g, gb);
    if (gemm) cuda_matmul_lane(cb, lane, w[m], in[m], in_bf16[m], cnt, out[m]);
    else cuda_matmul(&cb->base, w[m], in[m], cnt, out[m]);
  }
}

/* 1 when all three matmuls of expert e over its rows are GEMMs (cuda_matmul_is_gemm), which a
 * lane can run; the others (a few rows: GEMV or E4M3 tensor-core kernels) stay on the stream. */
static int chain_on_lane(const m3_moe_experts *ex, int e, int first, int cnt, const float *xy,
                         const float *gate) {
  const size_t H = (size_t)ex->gate[0].cols, I = (size_t)ex->gate[0].rows;
  return cuda_matmul_is_gemm(&ex->gate[e], xy + (size_t)first * H, cnt) &&
         cuda_matmul_is_gemm(&ex->up[e], xy + (size_t)first * H, cnt) &&
         cuda_matmul_is_gemm(&ex->down[e], gate + (size_t)first * I, cnt);
}

/* Prefill: xy [T*k, H] gets the gathered rows, then each expert's output in place of its input;
 * gate, up [T*k, I]. Experts whose matmuls are all GEMMs go to the lanes, each to the one with the
 * fewest rows so far (a host-side choice from the offsets alone: the same every run); the
 * stream forks to them after the gather, runs the other experts itself and joins them before
 * returning. The lanes' scratch grows first, while none of their work is pending (what they ran
 * for an earlier call was joined into the stream, which cuda_grow synchronizes). Every expert
 * writes only its own rows, with the same GEMM plans on any lane: results do not depend on the
 * lane count or on timing. Experts whose GEMMs take one BF16 rounding of their inputs
 * (cuda_matmul_takes_bf16) read the rows of one copy of xy made for all of them before the fork,
 * [T*k, H] in xy_bf16, and have their SwiGLU write its BF16 copy [T*k, I] into act_bf16: two
 * conversion launches an expert fewer, the same values. Returns 0 when nothing more should run
 * (a failure, already noted). */
static int prefill_experts(cuda_backend *cb, const m3_moe_experts *ex, moe_table *tab,
                           const moe_groups &g, const float *h, int k, int n, float *xy,
                           float *gate, float *up, __nv_bfloat16 *xy_bf16,
                           __nv_bfloat16 *act_bf16) {
  const int E = ex->E;
  const int64_t H = ex->gate[0].cols;
  int32_t *start = tab->host_start;
  cuda_note(cb, cudaMemcpyAsync(start, g.start, (size_t)(E + 1) * sizeof(int32_t),
                                cudaMemcpyDeviceToHost, cb->stream), "moe_experts (offsets)");
  cuda_note(cb, cudaStreamSynchronize(cb->stream), "moe_experts (offsets)");
  if (cb->error != cudaSuccess) return 0;
  int ok = start[0] == 0 && start[E] <= n;
  for (int e = 0; e < E && ok; e++) ok = start[e] <= start[e + 1];
  if (!ok) {
    cuda_note(cb, cudaErrorIllegalState, "moe_experts (expert offsets out of order)");
    return 0;
  }
  const int used = start[E];
  if (used == 0) return 1;
  const int lanes = cb->moe_lanes > 1 ? cb->moe_lanes : 0;
  int8_t *lane_of = tab->lane_of; /* [E] the lane of each expert, -1: the stream */
  uint8_t *kind = tab->chain_kind; /* [E] CHAIN_* */
  int64_t rows[CUDA_MAX_LANES] = {0};
  size_t need[CUDA_MAX_LANES] = {0};
  int any_bf16 = 0;
  for (int e = 0; e < E; e++) {
    const int first = start[e], cnt = start[e + 1] - first;
    lane_of[e] = -1;
    kind[e] = CHAIN_ANY;
    if (cnt == 0 || !chain_on_lane(ex, e, first, cnt, xy, gate)) continue;
    const int bf16 = cuda_matmul_takes_bf16(&ex->gate[e], cnt) &&
                     cuda_matmul_takes_bf16(&ex->up[e], cnt) &&
                     cuda_matmul_takes_bf16(&ex->down[e], cnt);
    kind[e] = bf16 ? CHAIN_GEMM_BF16 : CHAIN_GEMM;
    any_bf16 |= bf16;
    if (!lanes) continue;
    int best = 0;
    for (int l = 1; l < lanes; l++) best = rows[l] < rows[best] ? l : best;
    lane_of[e] = (int8_t)best;
    rows[best] += cnt;
    const size_t s[3] = {cuda_matmul_lane_scratch(&ex->gate[e], cnt),
                         cuda_matmul_lane_scratch(&ex->up[e], cnt),
                         cuda_matmul_lane_scratch(&ex->down[e], cnt)};
    for (int m = 0; m < 3; m++) need[best] = s[m] > need[best] ? s[m] : need[best];
  }
  for (int l = 0; l < lanes; l++) {
    cuda_lane *ln = &cb->lanes[l];
    if (rows[l] && need[l] &&
        !cuda_grow(cb, &ln->scratch, &ln->scratch_bytes, need[l], "moe_experts (lane scratch)"))
      return 0;
  }
  dev_launch(moe_gather_kernel, used, MOE_ROW_THREADS, 0, cb->stream, h, g.slot_at, k, H, xy);
  cuda_launched(cb, "moe_experts (gather)");
  if (any_bf16) cuda_to_bf16(cb, cb->stream, xy, (size_t)used * (size_t)H, xy_bf16);
  const moe_bf16 bf_none = {NULL, NULL}, bf_all = {xy_bf16, act_bf16};
  if (lanes) cuda_note(cb, cudaEventRecord(cb->moe_fork, cb->stream), "moe_experts (fork)");
  for (int l = 0; l < lanes; l++)
    if (rows[l])
      cuda_note(cb, cudaStreamWaitEvent(cb->lanes[l].stream, cb->moe_fork, 0), "moe_experts (fork)");
  /* the lanes' work first, so that they start while the stream runs the rest */
  for (int pass = 0; pass < 2; pass++)
    for (int e = 0; e < E; e++) {
      const int first = start[e], cnt = start[e + 1] - first;
      if (cnt > 0 && (lane_of[e] >= 0) == (pass == 0))
        expert_chain(cb, pass == 0 ? &cb->lanes[lane_of[e]] : NULL, kind[e] != CHAIN_ANY,
                     kind[e] == CHAIN_GEMM_BF16 ? bf_all : bf_none, ex, e, first, cnt, xy, gate, up);
    }
  for (int l = 0; l < lanes; l++) {
    if (!rows[l]) continue;
    cuda_lane *ln = &cb->lanes[l];
    cuda_note(cb, cudaEventRecord(ln->done, ln->stream), "moe_experts (join)");
    cuda_note(cb, cudaStreamWaitEvent(cb->stream, ln->done, 0), "moe_experts (join)");
  }
  return 1;
}

/* Unless M3_MOE_GROUPED says which: the grouped GEMMs where they were measured faster than the
 * lanes (an H200 at full width, E 128, top 4): MXFP8 always (mma.sync tiles, 2048 tokens 6.8
 * against 31 ms, 8192 17.6 against 17.9), BF16 on wgmma tiles always (2048 tokens 4.2 against
 * 5.8 ms, 8192 10.2 against 11.4) and on mma.sync tiles while the average expert has at most 128
 * rows (2048 tokens 5.1 against 5.8; at 8192, 256 rows each, cuBLASLt's per-expert GEMMs win,
 * 11.4 against 13.4). */
static int grouped_wins(const cuda_backend *cb, const m3_moe_experts *ex, int n) {
  return ex->gate[0].quant == M3_WQ_MXFP8 || cuda_moe_grouped_on_wgmma(cb, ex) ||
         (int64_t)n <= 128 * (int64_t)ex->E;
}

/* The shared expert of a prefill or a batch, y [T, H] = SwiGLU-OAI(h gate^T, h up^T) down^T, by
 * the ops the model would run for it; gate and up wait in sg [2, T, S]. With h_bf16 (h's BF16
 * copy; every matrix a cuda_matmul_takes_bf16 shape) gate and up read it, and SwiGLU leaves the
 * down GEMM its BF16 copy in act_bf16 [T, S]; else matmul_set on h, matmul on the activations. */
static void shared_expert(m3_backend *be, const m3_moe_experts *ex, const float *h, const __nv_bfloat16 *h_bf16, int T,
                          float *sg, __nv_bfloat16 *act_bf16, float *y) {
  cuda_backend *cb = cuda_of(be);
  const size_t S = (size_t)ex->shared_gate->rows;
  float *su = sg + (size_t)T * S;
  if (h_bf16) {
    cuda_matmul_lane(cb, NULL, ex->shared_gate, h, h_bf16, T, sg);
    cuda_matmul_lane(cb, NULL, ex->shared_up, h, h_bf16, T, su);
    cuda_swiglu_oai_copy(cb, cb->stream, sg, su, (size_t)T * S, ex->alpha, ex->beta, ex->limit, sg, act_bf16);
    cuda_matmul_lane(cb, NULL, ex->shared_down, sg, act_bf16, T, y);
    return;
  }
  const m3_matmul_out proj[2] = {{ex->shared_gate, sg}, {ex->shared_up, su}};
  cuda_matmul_set(be, h, T, proj, 2);
  cuda_swiglu_oai(be, sg, su, (size_t)T * S, ex->alpha, ex->beta, ex->limit, sg);
  cuda_matmul(be, ex->shared_down, sg, T, y);
}

/* The next 256-byte aligned offset for `bytes` more after *off. */
static size_t carve(size_t *off, size_t bytes) {
  size_t at = (*off + 255) / 256 * 256;
  *off = at + bytes;
  return at;
}

void cuda_moe_experts(m3_backend *be, const m3_moe_experts *ex, const float *h, int T,
                      const int32_t *ids, const float *weights, int k, float *x) {
  cuda_backend *cb = cuda_of(be);
  moe_table *tab = (moe_table *)ex->table;
  if (T <= 0 || k <= 0) return;
  if (!tab) {
    cuda_note(cb, cudaErrorInvalidValue, "moe_experts (experts not prepared)");
    return;
  }
  const int E = ex->E, n = T * k, decode = T <= MOE_DECODE_MAX_T;
  const int grouped = !decode && cb->moe_grouped != 0 && cuda_moe_grouped_fits(cb, ex, tab->wide, h, n, k) &&
                      (cb->moe_grouped == 1 || grouped_wins(cb, ex, n));
  const size_t H = (size_t)ex->gate[0].cols, I = (size_t)ex->gate[0].rows, sn = (size_t)n;
  /* The shared expert: at one token inside the experts' tensor-core launches (its rows of act and
   * y at position n), otherwise by the ops the model would run for it, its output in y's rows
   * [n, n + T) for the combine to add last. */
  const int shared = ex->shared_gate != NULL;
  if (shared && !tab->shared) {
    cuda_note(cb, cudaErrorInvalidValue, "moe_experts (shared expert not prepared)");
    return;
  }
  const size_t S = shared ? (size_t)ex->shared_gate->rows : 0, yn = shared ? sn + (size_t)T : sn;
  const int shared_from_scatter = grouped && shared && cuda_matmul_takes_bf16(ex->shared_gate, T) &&
                                  cuda_matmul_takes_bf16(ex->shared_up, T) &&
                                  cuda_matmul_takes_bf16(ex->shared_down, T);
  /* the grouped prefill needs neither float gate nor up: only y and 16-bit copies (BF16; f16 for
   * MXFP8 experts, with their rows' powers of two) */
  size_t off = 0;
  const size_t o_start = carve(&off, (size_t)(E + 1) * 4), o_active = carve(&off, (size_t)E * 4),
               o_n_active = carve(&off, 4), o_slot = carve(&off, sn * 4), o_pos = carve(&off, sn * 4),
               o_y = carve(&off, yn * H * 4), o_act = grouped ? 0 : carve(&off, yn * I * 4),
               o_shared = shared ? carve(&off, 2 * (size_t)T * S * 4) : 0,
               o_up = decode || grouped ? 0 : carve(&off, sn * I * 4), o_xy16 = decode ? 0 : carve(&off, sn * H * 2),
               o_act16 = decode ? 0 : carve(&off, sn * I * 2), o_tiles = grouped ? carve(&off, (size_t)(E + 1) * 4) : 0,
               o_row_exp = grouped ? carve(&off, sn * 4) : 0,
               o_hb = shared_from_scatter ? carve(&off, (size_t)T * H * 2) : 0,
               o_sb = shared_from_scatter ? carve(&off, (size_t)T * S * 2) : 0,
               o_chunks = carve(&off, (sn + MOE_GROUP_CHUNK - 1) / MOE_GROUP_CHUNK * (size_t)E * 4);
  uint8_t *base = (uint8_t *)cuda_grow(cb, &cb->moe_scratch, &cb->moe_scratch_bytes, off,
                                       "moe_experts");
  if (!base) return;
  moe_groups g = {(int32_t *)(base + o_start), (int32_t *)(base + o_active),
                  (int32_t *)(base + o_n_active), (int32_t *)(base + o_slot),
                  (int32_t *)(base + o_pos), n, NULL, ex->first, E};
  float *y = (float *)(base + o_y), *act = (float *)(base + o_act);
  const int mx1_one = T == 1 && tab->wide && tab->scales4 && !cb->mx1_off &&
                      mx1_fits(&ex->gate[0], h, cb->smem_optin) && mx1_fits(&ex->down[0], act, cb->smem_optin);
  const int shared_mx1 = shared && mx1_one && tab->shared_mx1;
  if (mx1_one) { /* one token: nothing to group, each choice its own position (moe_groups.ids) */
    g.ids = ids;
  } else {
    moe_group(cb, ids, g, (int32_t *)(base + o_chunks));
  }
  /* the grouped prefill's scatter reads every row of h once: it leaves the shared expert's BF16
   * copy of h too, in place of another pass over h (to_bf16) */
  __nv_bfloat16 *h_bf16 = shared_from_scatter ? (__nv_bfloat16 *)(base + o_hb) : NULL;
  __nv_bfloat16 *act_bf16 = shared_from_scatter ? (__nv_bfloat16 *)(base + o_sb) : NULL;
  if (shared && !shared_mx1 && !h_bf16) shared_expert(be, ex, h, NULL, T, (float *)(base + o_shared), NULL, y + sn * H);
  if (decode) {
    const unsigned experts = (unsigned)(E < n ? E : n);
    const int kind_gate = tab->wide ? gemv_kind(&ex->gate[0], h) : WK_ANY;
    const int kind_down = tab->wide ? gemv_kind(&ex->down[0], act) : WK_ANY;
    const int step_gate = tab->wide ? gemv_step_kind(&ex->gate[0], h) : WK_ANY;
    const int step_down = tab->wide ? gemv_step_kind(&ex->down[0], act) : WK_ANY;
    if (mx1_one) {
      const cuda_weight *sw = shared_mx1 ? tab->shared : NULL;
      launch_moe_mx1<1>(cb, experts, tab->w, tab->w + E, sw, g, h, k, (int64_t)I, (int64_t)H, ex, act);
      launch_moe_mx1<0>(cb, experts, tab->w + 2 * E, NULL, sw, g, act, k, (int64_t)H, (int64_t)I, ex, y);
    } else if (T == 1 && step_gate != WK_ANY && step_down != WK_ANY && !cb->gemv_old) {
      launch_grouped_warp<1>(cb, step_gate, experts, tab->w, tab->w + E, g, h, k, (int64_t)I, ex, act);
      launch_grouped_warp<0>(cb, step_down, experts, tab->w + 2 * E, NULL, g, act, k, (int64_t)H, ex, y);
    } else if (tab->wide && mx_weight_fits(&ex->gate[0]) && mx_weight_fits(&ex->down[0]) &&
        (uintptr_t)h % 16 == 0) { /* act is carved 256-byte aligned, I % 8 == 0 */
      const float a = ex->alpha, b = ex->beta, l = ex->limit;
      dev_launch(moe_mx_kernel<1>, dim3((unsigned)((I + 15) / 16), experts), 32 * MX_WARPS, 0, cb->stream, tab->w,
                 tab->w + E, g, h, k, a, b, l, act);
      cuda_launched(cb, "moe_experts (gate, up, swiglu; e4m3 tensor cores)");
      dev_launch(moe_mx_kernel<0>, dim3((unsigned)((H + 15) / 16), experts), 32 * MX_WARPS, 0, cb->stream,
                 tab->w + 2 * E, NULL, g, act, k, a, b, l, y);
      cuda_launched(cb, "moe_experts (down; e4m3 tensor cores)");
    } else {
      dim3 grid_gate((unsigned)((I + MOE_ROWS_PER_BLOCK - 1) / MOE_ROWS_PER_BLOCK), experts);
      dim3 grid_down((unsigned)((H + MOE_ROWS_PER_BLOCK - 1) / MOE_ROWS_PER_BLOCK), experts);
      launch_grouped<1>(cb, kind_gate, grid_gate, tab->w, tab->w + E, g, h, k, ex, act);
      launch_grouped<0>(cb, kind_down, grid_down, tab->w + 2 * E, NULL, g, act, k, ex, y);
    }
  } else if (grouped) {
    cuda_moe_grouped(cb, ex, tab->w, g.start, g.pos_of, n, k, h, h_bf16, (int32_t *)(base + o_tiles), base + o_xy16,
                     (int32_t *)(base + o_row_exp), base + o_act16, y);
    if (h_bf16) shared_expert(be, ex, h, h_bf16, T, (float *)(base + o_shared), act_bf16, y + sn * H);
  } else if (!prefill_experts(cb, ex, tab, g, h, k, n, y, act, (float *)(base + o_up),
                              (__nv_bfloat16 *)(base + o_xy16),
                              (__nv_bfloat16 *)(base + o_act16))) {
    return;
  }
  const dim3 grid_combine((unsigned)T, (unsigned)((H + 4 * COMBINE_THREADS - 1) / (4 * COMBINE_THREADS)));
  const float *shared_y = shared ? y + sn * H : NULL;
  if (H % 4 == 0 && (uintptr_t)x % 16 == 0)
    dev_launch(moe_combine_kernel<1>, grid_combine, COMBINE_THREADS, 0, cb->stream, x, y, weights, g, k, (int64_t)H,
               shared_y);
  else
    dev_launch(moe_combine_kernel<0>, grid_combine, COMBINE_THREADS, 0, cb->stream, x, y, weights, g, k, (int64_t)H,
               shared_y);
  cuda_launched(cb, "moe_experts (combine)");
}

/* Expert tensors of one layer must share their stored form: the kernels pick one decoder. */
static int same_form(const m3_tensor *a, const m3_tensor *b) {
  return a->dtype == b->dtype && a->quant == b->quant && a->rows == b->rows && a->cols == b->cols &&
         a->scale_cols == b->scale_cols && a->block_rows == b->block_rows &&
         a->block_cols == b->block_cols;
}

static m3_status check_experts(const m3_moe_experts *ex) {
  if (ex->E <= 0 || ex->E > MOE_MAX_E)
    return m3_fail(M3_ERR_UNSUPPORTED, "%s: %d experts; the CUDA backend takes 1..%d",
                   ex->E > 0 && ex->gate[0].name ? ex->gate[0].name : "moe experts", ex->E,
                   MOE_MAX_E);
  const m3_tensor *g0 = &ex->gate[0], *d0 = &ex->down[0];
  if (d0->rows != g0->cols || d0->cols != g0->rows)
    return m3_fail(M3_ERR_SHAPE, "%s: [%lld, %lld] does not undo %s [%lld, %lld]", d0->name,
                   (long long)d0->rows, (long long)d0->cols, g0->name, (long long)g0->rows,
                   (long long)g0->cols);
  for (int e = 0; e < ex->E; e++) {
    const m3_tensor *bad = !same_form(&ex->gate[e], g0) ? &ex->gate[e]
                           : !same_form(&ex->up[e], g0) ? &ex->up[e]
                           : !same_form(&ex->down[e], d0) ? &ex->down[e]
                                                          : NULL;
    if (bad)
      return m3_fail(M3_ERR_SHAPE, "%s: dtype, quantization or shape differs from %s", bad->name,
                     bad == &ex->down[e] ? d0->name : g0->name);
  }
  const m3_tensor *sg = ex->shared_gate, *su = ex->shared_up, *sd = ex->shared_down;
  if (sg && (!su || !sd || sg->cols != g0->cols || !same_form(su, sg) || sd->rows != g0->cols ||
             sd->cols != sg->rows))
    return m3_fail(M3_ERR_SHAPE, "%s: the shared expert's gate [%lld, %lld], up and down do not fit "
                   "hidden size %lld", sg->name, (long long)sg->rows, (long long)sg->cols,
                   (long long)g0->cols);
  return M3_OK;
}

m3_status cuda_prepare_experts(m3_backend *be, m3_moe_experts *ex) {
  cuda_backend *cb = cuda_of(be);
  ex->table = NULL;
  m3_status st = check_experts(ex);
  if (st != M3_OK) return st;
  const int E = ex->E, entries = 3 * E + (ex->shared_gate ? 3 : 0); /* the shared expert's last */
  moe_table *tab = (moe_table *)calloc(1, sizeof *tab);
  cuda_weight *host = (cuda_weight *)malloc((size_t)entries * sizeof *host);
  if (tab) {
    tab->host_start = (int32_t *)malloc((size_t)(E + 1) * sizeof(int32_t));
    tab->lane_of = (int8_t *)malloc((size_t)E);
    tab->chain_kind = (uint8_t *)malloc((size_t)E);
  }
  if (!tab || !host || !tab->host_start || !tab->lane_of || !tab->chain_kind) {
    if (tab) {
      free(tab->host_start);
      free(tab->lane_of);
      free(tab->chain_kind);
    }
    free(tab), free(host);
    return m3_fail(M3_ERR_NOMEM, "%s: expert table of %d experts", ex->gate[0].name, E);
  }
  tab->wide = 1, tab->scales4 = 1;
  for (int e = 0; e < E; e++) {
    const m3_tensor *t[3] = {&ex->gate[e], &ex->up[e], &ex->down[e]};
    for (int i = 0; i < 3; i++) {
      host[(size_t)i * E + e] = cuda_weight_of(t[i]);
      tab->wide &= (uintptr_t)t[i]->data % 16 == 0;
      tab->scales4 &= t[i]->quant != M3_WQ_MXFP8 || (uintptr_t)t[i]->scale % 4 == 0;
    }
  }
  if (ex->shared_gate) {
    const m3_tensor *t[3] = {ex->shared_gate, ex->shared_up, ex->shared_down};
    tab->shared_mx1 = same_form(t[0], &ex->gate[0]) && same_form(t[1], &ex->gate[0]) &&
                      same_form(t[2], &ex->down[0]);
    for (int i = 0; i < 3; i++) {
      host[(size_t)3 * E + i] = cuda_weight_of(t[i]);
      tab->shared_mx1 &= (uintptr_t)t[i]->data % 16 == 0 &&
                         (t[i]->quant != M3_WQ_MXFP8 || (uintptr_t)t[i]->scale % 4 == 0);
    }
  }
  const size_t bytes = (size_t)entries * sizeof *host;
  cudaError_t err = cudaMalloc((void **)&tab->w, bytes);
  if (err == cudaSuccess)
    err = cudaMemcpyAsync(tab->w, host, bytes, cudaMemcpyHostToDevice, cb->stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(cb->stream); /* host is freed next */
  free(host);
  if (err != cudaSuccess) {
    cudaGetLastError(); /* reported here, not by the next op's launch check */
    if (tab->w) cudaFree(tab->w);
    free(tab->host_start);
    free(tab->lane_of);
    free(tab->chain_kind);
    free(tab);
    return m3_fail(err == cudaErrorMemoryAllocation ? M3_ERR_NOMEM : M3_ERR_IO,
                   "%s: cannot upload the expert table: %s", ex->gate[0].name,
                   cudaGetErrorString(err));
  }
  tab->shared = ex->shared_gate ? tab->w + 3 * E : NULL;
  ex->table = tab;
  return M3_OK;
}

void cuda_release_experts(m3_backend *be, m3_moe_experts *ex) {
  cuda_backend *cb = cuda_of(be);
  moe_table *tab = (moe_table *)ex->table;
  if (!tab) return;
  cuda_note(cb, cudaStreamSynchronize(cb->stream), "release_experts"); /* queued ops read it */
  cudaFree(tab->w);
  free(tab->host_start);
  free(tab->lane_of);
  free(tab->chain_kind);
  free(tab);
  ex->table = NULL;
}

m3_status cuda_moe_lanes_create(cuda_backend *cb) {
  /* M3_MOE_GROUPED=0: the prefill of experts that moe_grouped.cu takes runs on the lanes instead;
   * 1: always grouped; unset: grouped_wins decides. Read here, with the lanes, once per backend */
  const char *grouped = getenv("M3_MOE_GROUPED");
  cb->moe_grouped = -1;
  if (grouped && *grouped) {
    if (strcmp(grouped, "0") != 0 && strcmp(grouped, "1") != 0)
      return m3_fail(M3_ERR_ARG, "M3_MOE_GROUPED=%s: expected 0 (the prefill's experts on the lanes) or 1",
                     grouped);
    cb->moe_grouped = grouped[0] == '1';
  }
  /* M3_MOE_GROUPED_TILE=i: the grouped GEMMs' tile shape, candidate i of moe_grouped.cu's table */
  const char *tile = getenv("M3_MOE_GROUPED_TILE");
  cb->moe_grouped_tile = -1; /* moe_grouped.cu's choice per dtype */
  if (tile && *tile) {
    char *end;
    const long v = strtol(tile, &end, 10);
    if (*end || v < 0 || v >= MOE_GROUPED_TILES)
      return m3_fail(M3_ERR_ARG, "M3_MOE_GROUPED_TILE=%s: expected 0..%d (unset: chosen per dtype)", tile,
                     MOE_GROUPED_TILES - 1);
    cb->moe_grouped_tile = (int)v;
  }
  const char *env = getenv("M3_MOE_STREAMS");
  int lanes = MOE_DEFAULT_LANES;
  if (env && *env) {
    char *end;
    const long v = strtol(env, &end, 10);
    if (*end || v < 1 || v > CUDA_MAX_LANES)
      return m3_fail(M3_ERR_ARG, "M3_MOE_STREAMS=%s: expected 1..%d (1: the MoE prefill on one stream)",
                     env, CUDA_MAX_LANES);
    lanes = (int)v;
  }
  cb->moe_lanes = lanes;
  if (lanes == 1) return M3_OK;
  const char *step = "cudaEventCreate";
  cudaError_t e = cudaEventCreateWithFlags(&cb->moe_fork, cudaEventDisableTiming);
  for (int l = 0; l < lanes && e == cudaSuccess; l++) {
    cuda_lane *ln = &cb->lanes[l];
    step = "cudaStreamCreate (MoE lane)";
    e = cudaStreamCreateWithFlags(&ln->stream, cudaStreamNonBlocking);
    if (e == cudaSuccess) {
      step = "cudaEventCreate (MoE lane)";
      e = cudaEventCreateWithFlags(&ln->done, cudaEventDisableTiming);
    }
    if (e == cudaSuccess) {
      step = "cudaMalloc (MoE lane cuBLASLt workspace)";
      e = cudaMalloc(&ln->lt_workspace, cb->lt_workspace_bytes);
    }
  }
  if (e != cudaSuccess) {
    cudaGetLastError(); /* reported here, not by the next op's launch check */
    return m3_fail(e == cudaErrorMemoryAllocation ? M3_ERR_NOMEM : M3_ERR_UNSUPPORTED,
                   "cuda:%d: %s: %s", cb->device, step, cudaGetErrorString(e));
  }
  return M3_OK;
}

void cuda_moe_lanes_destroy(cuda_backend *cb) {
  for (int l = 0; l < CUDA_MAX_LANES; l++) {
    cuda_lane *ln = &cb->lanes[l];
    if (ln->stream) cudaStreamSynchronize(ln->stream);
    if (ln->scratch) cudaFree(ln->scratch);
    if (ln->lt_workspace) cudaFree(ln->lt_workspace);
    if (ln->done) cudaEventDestroy(ln->done);
    if (ln->stream) cudaStreamDestroy(ln->stream);
  }
  if (cb->moe_fork) cudaEventDestroy(cb->moe_fork);
}
