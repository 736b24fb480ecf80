/* moe.cu: MoE routing and the routed experts (shared/spec/m3_text_spec.md §3.5) on the GPU.
 * Routing, all in float32: sigmoid scores, biased top-k with the CPU's order (ties to the lower
 * expert, NaN last), weights renormalised over the chosen experts in choice order and scaled. */
#include <math.h>
#include <stdlib.h>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/weight_load.cuh"

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
 * block per 16 weight rows, its warps splitting K, activations as hi + lo BF16.
 * Larger T reads the expert offsets back once (prefill is compute-bound) and runs each active
 * expert's three matmuls through cuda_matmul (cuBLASLt with BF16 activations, any dtype). Both
 * end with the combine: x[t] += w[t, j] * y[slot(t, j)] in choice order j, float32. */

enum {
  MOE_DECODE_MAX_T = 64,
  MOE_ROWS_PER_BLOCK = 8,
  MOE_TOKENS_PER_PASS = 8,
  MOE_MAX_E = 6144, /* the grouping keeps two ints per expert in 48 KB of shared memory */
  MOE_ROW_THREADS = 256,
};

/* What prepare_experts keeps for one layer. */
typedef struct {
  cuda_weight *w;      /* device [3 * E]: the gate experts, then up, then down */
  int wide;            /* every expert's data is 16-byte aligned, so wide loads are possible */
  int32_t *host_start; /* host [E + 1]: the expert offsets the prefill path reads back */
} moe_table;

/* The slots grouped by expert: device arrays in moe_scratch. */
typedef struct {
  int32_t *start;    /* [E + 1] expert e owns sorted positions [start[e], start[e + 1]) */
  int32_t *active;   /* [E] the experts with slots, ascending; the first *n_active are set */
  int32_t *n_active; /* [1] */
  int32_t *slot_at;  /* [T*k] the slot t*k + j at each sorted position */
  int32_t *pos_of;   /* [T*k] the sorted position of each slot; -1 for a choice outside [0, E) */
  int n;             /* T*k: the bound the kernels hold device offsets to */
} moe_groups;

/* One warp, shared memory count [E] then next [E]. __match_any_sync groups the lanes of a round
 * of 32 slots by expert; a lane's rank among its earlier peers keeps the placement stable. */
__global__ void __launch_bounds__(32)
    moe_group_kernel(const int32_t *__restrict__ ids, int n, int E, moe_groups g) {
  extern __shared__ int32_t counts[];
  int32_t *next = counts + E;
  const unsigned all = 0xffffffffu;
  const int lane = threadIdx.x;
  const unsigned below = (1u << lane) - 1u;
  for (int e = lane; e < E; e += 32) counts[e] = 0;
  __syncwarp();
  for (int i0 = 0; i0 < n; i0 += 32) {
    const int i = i0 + lane;
    int e = i < n ? ids[i] : -1;
    if (e < 0 || e >= E) e = -1;
    const unsigned peers = __match_any_sync(all, e);
    if (e >= 0 && (peers & below) == 0) counts[e] += __popc(peers);
    __syncwarp();
  }
  int run = 0, n_active = 0;
  for (int e0 = 0; e0 < E; e0 += 32) {
    const int e = e0 + lane;
    const int c = e < E ? counts[e] : 0;
    int incl = c; /* inclusive prefix over the lanes */
    for (int o = 1; o < 32; o <<= 1) {
      int v = __shfl_up_sync(all, incl, o);
      if (lane >= o) incl += v;
    }
    if (e < E) g.start[e] = next[e] = run + incl - c;
    const unsigned has = __ballot_sync(all, c > 0);
    if (c > 0) g.active[n_active + __popc(has & below)] = e;
    n_active += __popc(has);
    run += __shfl_sync(all, incl, 31);
  }
  if (lane == 0) {
    g.start[E] = run;
    *g.n_active = n_active;
  }
  __syncwarp();
  for (int i0 = 0; i0 < n; i0 += 32) {
    const int i = i0 + lane;
    int e = i < n ? ids[i] : -1;
    if (e < 0 || e >= E) e = -1;
    const unsigned peers = __match_any_sync(all, e);
    if (e >= 0) {
      const int p = next[e] + __popc(peers & below);
      g.slot_at[p] = i;
      g.pos_of[i] = p;
    } else if (i < n) {
      g.pos_of[i] = -1;
    }
    __syncwarp();
    if (e >= 0 && (peers & below) == 0) next[e] += __popc(peers);
    __syncwarp();
  }
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
  switch (kind) {
    case WK_F32: moe_gemv_kernel<WK_F32, GATED><<<grid, block, 0, cb->stream>>>(w0, w1, g, x, k, a, b, l, out); break;
    case WK_BF16: moe_gemv_kernel<WK_BF16, GATED><<<grid, block, 0, cb->stream>>>(w0, w1, g, x, k, a, b, l, out); break;
    case WK_F16: moe_gemv_kernel<WK_F16, GATED><<<grid, block, 0, cb->stream>>>(w0, w1, g, x, k, a, b, l, out); break;
    case WK_E4M3: moe_gemv_kernel<WK_E4M3, GATED><<<grid, block, 0, cb->stream>>>(w0, w1, g, x, k, a, b, l, out); break;
    default: moe_gemv_kernel<WK_ANY, GATED><<<grid, block, 0, cb->stream>>>(w0, w1, g, x, k, a, b, l, out); break;
  }
  cuda_launched(cb, GATED ? "moe_experts (gate, up, swiglu)" : "moe_experts (down)");
}

/* out[p] = h[slot_at[p] / k] for the used sorted positions p < gridDim.x. */
__global__ void moe_gather_kernel(const float *__restrict__ h, const int32_t *__restrict__ slot_at,
                                  int k, int64_t H, float *__restrict__ out) {
  const int p = blockIdx.x;
  const float *src = h + (size_t)(slot_at[p] / k) * (size_t)H;
  float *dst = out + (size_t)p * (size_t)H;
  for (int64_t c = threadIdx.x; c < H; c += blockDim.x) dst[c] = src[c];
}

/* x[t] += w[t, j] * y[pos_of[t*k + j]] for j in order, one block per token; a choice outside
 * [0, E) makes the row NaN, as on the CPU. */
__global__ void moe_combine_kernel(float *__restrict__ x, const float *__restrict__ y,
                                   const float *__restrict__ w, const int32_t *__restrict__ pos_of,
                                   int k, int64_t H) {
  const int t = blockIdx.x;
  float *xt = x + (size_t)t * (size_t)H;
  for (int64_t c = threadIdx.x; c < H; c += blockDim.x) {
    float acc = xt[c];
    for (int j = 0; j < k; j++) {
      const int32_t p = pos_of[(size_t)t * k + j];
      acc = p < 0 ? __uint_as_float(0x7fc00000u)
                  : fmaf(w[(size_t)t * k + j], y[(size_t)p * (size_t)H + c], acc);
    }
    xt[c] = acc;
  }
}

/* Prefill: xy [T*k, H] gets the gathered rows, then each expert's output in place of its input
 * (every gate and up matmul has run before the first down writes); gate, up [T*k, I]. Returns 0
 * when nothing more should run (a failure, already noted). */
static int prefill_experts(cuda_backend *cb, const m3_moe_experts *ex, moe_table *tab,
                           const moe_groups &g, const float *h, int k, int n, float *xy,
                           float *gate, float *up) {
  m3_backend *be = &cb->base;
  const int E = ex->E;
  const int64_t H = ex->gate[0].cols, I = ex->gate[0].rows;
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
  moe_gather_kernel<<<used, MOE_ROW_THREADS, 0, cb->stream>>>(h, g.slot_at, k, H, xy);
  cuda_launched(cb, "moe_experts (gather)");
  for (int e = 0; e < E; e++) {
    const int first = start[e], cnt = start[e + 1] - first;
    if (cnt == 0) continue;
    cuda_matmul(be, &ex->gate[e], xy + (size_t)first * H, cnt, gate + (size_t)first * I);
    cuda_matmul(be, &ex->up[e], xy + (size_t)first * H, cnt, up + (size_t)first * I);
  }
  cuda_swiglu_oai(be, gate, up, (size_t)used * (size_t)I, ex->alpha, ex->beta, ex->limit, gate);
  for (int e = 0; e < E; e++) {
    const int first = start[e], cnt = start[e + 1] - first;
    if (cnt == 0) continue;
    cuda_matmul(be, &ex->down[e], gate + (size_t)first * I, cnt, xy + (size_t)first * H);
  }
  return 1;
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
  const size_t H = (size_t)ex->gate[0].cols, I = (size_t)ex->gate[0].rows, sn = (size_t)n;
  size_t off = 0;
  const size_t o_start = carve(&off, (size_t)(E + 1) * 4), o_active = carve(&off, (size_t)E * 4),
               o_n_active = carve(&off, 4), o_slot = carve(&off, sn * 4),
               o_pos = carve(&off, sn * 4), o_y = carve(&off, sn * H * 4),
               o_act = carve(&off, sn * I * 4), o_up = decode ? 0 : carve(&off, sn * I * 4);
  uint8_t *base = (uint8_t *)cuda_grow(cb, &cb->moe_scratch, &cb->moe_scratch_bytes, off,
                                       "moe_experts");
  if (!base) return;
  moe_groups g = {(int32_t *)(base + o_start), (int32_t *)(base + o_active),
                  (int32_t *)(base + o_n_active), (int32_t *)(base + o_slot),
                  (int32_t *)(base + o_pos), n};
  float *y = (float *)(base + o_y), *act = (float *)(base + o_act);
  moe_group_kernel<<<1, 32, (size_t)E * 2 * sizeof(int32_t), cb->stream>>>(ids, n, E, g);
  cuda_launched(cb, "moe_experts (grouping)");
  if (decode) {
    const unsigned experts = (unsigned)(E < n ? E : n);
    const int kind_gate = tab->wide ? gemv_kind(&ex->gate[0], h) : WK_ANY;
    const int kind_down = tab->wide ? gemv_kind(&ex->down[0], act) : WK_ANY;
    if (tab->wide && mx_weight_fits(&ex->gate[0]) && mx_weight_fits(&ex->down[0]) &&
        (uintptr_t)h % 16 == 0) { /* act is carved 256-byte aligned, I % 8 == 0 */
      const float a = ex->alpha, b = ex->beta, l = ex->limit;
      moe_mx_kernel<1><<<dim3((unsigned)((I + 15) / 16), experts), 32 * MX_WARPS, 0, cb->stream>>>(
          tab->w, tab->w + E, g, h, k, a, b, l, act);
      cuda_launched(cb, "moe_experts (gate, up, swiglu; e4m3 tensor cores)");
      moe_mx_kernel<0><<<dim3((unsigned)((H + 15) / 16), experts), 32 * MX_WARPS, 0, cb->stream>>>(
          tab->w + 2 * E, NULL, g, act, k, a, b, l, y);
      cuda_launched(cb, "moe_experts (down; e4m3 tensor cores)");
    } else {
      dim3 grid_gate((unsigned)((I + MOE_ROWS_PER_BLOCK - 1) / MOE_ROWS_PER_BLOCK), experts);
      dim3 grid_down((unsigned)((H + MOE_ROWS_PER_BLOCK - 1) / MOE_ROWS_PER_BLOCK), experts);
      launch_grouped<1>(cb, kind_gate, grid_gate, tab->w, tab->w + E, g, h, k, ex, act);
      launch_grouped<0>(cb, kind_down, grid_down, tab->w + 2 * E, NULL, g, act, k, ex, y);
    }
  } else if (!prefill_experts(cb, ex, tab, g, h, k, n, y, act, (float *)(base + o_up))) {
    return;
  }
  moe_combine_kernel<<<T, MOE_ROW_THREADS, 0, cb->stream>>>(x, y, weights, g.pos_of, k, (int64_t)H);
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
  return M3_OK;
}

m3_status cuda_prepare_experts(m3_backend *be, m3_moe_experts *ex) {
  cuda_backend *cb = cuda_of(be);
  ex->table = NULL;
  m3_status st = check_experts(ex);
  if (st != M3_OK) return st;
  const int E = ex->E;
  moe_table *tab = (moe_table *)calloc(1, sizeof *tab);
  cuda_weight *host = (cuda_weight *)malloc((size_t)3 * E * sizeof *host);
  if (tab) tab->host_start = (int32_t *)malloc((size_t)(E + 1) * sizeof(int32_t));
  if (!tab || !host || !tab->host_start) {
    if (tab) free(tab->host_start);
    free(tab), free(host);
    return m3_fail(M3_ERR_NOMEM, "%s: expert table of %d experts", ex->gate[0].name, E);
  }
  tab->wide = 1;
  for (int e = 0; e < E; e++) {
    const m3_tensor *t[3] = {&ex->gate[e], &ex->up[e], &ex->down[e]};
    for (int i = 0; i < 3; i++) {
      host[(size_t)i * E + e] = cuda_weight_of(t[i]);
      tab->wide &= (uintptr_t)t[i]->data % 16 == 0;
    }
  }
  const size_t bytes = (size_t)3 * E * sizeof *host;
  cudaError_t err = cudaMalloc((void **)&tab->w, bytes);
  if (err == cudaSuccess)
    err = cudaMemcpyAsync(tab->w, host, bytes, cudaMemcpyHostToDevice, cb->stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(cb->stream); /* host is freed next */
  free(host);
  if (err != cudaSuccess) {
    cudaGetLastError(); /* reported here, not by the next op's launch check */
    if (tab->w) cudaFree(tab->w);
    free(tab->host_start);
    free(tab);
    return m3_fail(err == cudaErrorMemoryAllocation ? M3_ERR_NOMEM : M3_ERR_IO,
                   "%s: cannot upload the expert table: %s", ex->gate[0].name,
                   cudaGetErrorString(err));
  }
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
  free(tab);
  ex->table = NULL;
}
