/* norm_elementwise.cu: Gemma RMSNorm (alone and after the residual add), partial NeoX RoPE (alone,
 * fused with the norm, and fused with the norm and the KV cache store of the keys), SwiGLU-OAI and
 * the residual add (shared/spec/m3_text_spec.md §3.1-3.4), each in the CPU's float32 operation
 * order; and the greedy argmax of logits rows (whole, or a vocabulary slice's candidate). */
#include <math.h>
#include <string.h>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/kv_fp8.cuh"
#include "backend/cuda/norm_row.cuh"

enum { ELEM_THREADS = 256, ELEM_MAX_BLOCKS = 8192, ROPE_MAX_HALF = 256 };

static unsigned elem_blocks(size_t n) {
  size_t b = (n + ELEM_THREADS - 1) / ELEM_THREADS;
  if (b > (size_t)ELEM_MAX_BLOCKS) b = (size_t)ELEM_MAX_BLOCKS;
  return (unsigned)(b < 1 ? 1 : b);
}

/* The addends of norm_row: none (rmsnorm), or row y of a [nrows, n] matrix (add_rmsnorm). */
struct no_addend {
  static const bool add = false;
  __device__ void load(int64_t, float[4]) const {}
};

struct row_addend {
  static const bool add = true;
  const float *row;
  int n, vec;
  __device__ void load(int64_t c, float a[4]) const { load_quad(row, c, n, vec, a); }
};

__global__ void __launch_bounds__(512)
    rmsnorm_kernel(const float *x, cuda_weight w, int gain, float eps, int n, int vec, float *out) {
  dev_pdl_enter();
  /* x is only read (no addend): the cast drops const for the shared body */
  norm_row((float *)x + (size_t)blockIdx.x * n, no_addend{}, w, gain, eps, n, vec,
           out + (size_t)blockIdx.x * n);
}

__global__ void __launch_bounds__(512) add_rmsnorm_kernel(float *x, const float *y, cuda_weight w,
                                                          int gain, float eps, int n, int vec,
                                                          float *out) {
  dev_pdl_enter();
  const size_t r = (size_t)blockIdx.x * n;
  norm_row(x + r, row_addend{y + r, n, vec}, w, gain, eps, n, vec, out + r);
}

static int aligned16(const void *p) { return (uintptr_t)p % 16 == 0; }

void cuda_rmsnorm(m3_backend *be, const float *x, const m3_tensor *w, float eps, int nrows, int n,
                  float *y) {
  cuda_backend *cb = cuda_of(be);
  if (nrows <= 0 || n <= 0) return;
  const int vec = n % 4 == 0 && aligned16(x) && aligned16(y);
  dev_launch(rmsnorm_kernel, nrows, norm_threads(n), 0, cb->stream, x, cuda_weight_of(w), gain_kind(w, n), eps, n, vec,
             y);
  cuda_launched(cb, "rmsnorm");
}

void cuda_add_rmsnorm(m3_backend *be, float *x, const float *y, const m3_tensor *w, float eps,
                      int nrows, int n, float *out) {
  cuda_backend *cb = cuda_of(be);
  if (nrows <= 0 || n <= 0) return;
  const int vec = n % 4 == 0 && aligned16(x) && aligned16(y) && aligned16(out);
  dev_launch(add_rmsnorm_kernel, nrows, norm_threads(n), 0, cb->stream, x, y, cuda_weight_of(w), gain_kind(w, n), eps,
             n, vec, out);
  cuda_launched(cb, "add_rmsnorm");
}

typedef struct {
  float inv_freq[ROPE_MAX_HALF];
} rope_freqs;

/* Pair (a, b) = (x[i], x[i + half]) rotated by the angle of cosine c and sine s: x * cos +
 * rotate_half(x) * sin, two rounded products, then the sum (no FMA), as the CPU backend does. */
__device__ __forceinline__ float2 rope_rotate(float a, float b, float c, float s) {
  return make_float2(__fadd_rn(__fmul_rn(a, c), __fmul_rn(-b, s)), __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
}

/* (cos, sin) of pair j's fp32 angle at position p: every rotation of this file takes its angles
 * here, so that they all rotate by the same bits. */
__device__ __forceinline__ float2 rope_cos_sin(float p, const rope_freqs &f, int j) {
  const float angle = __fmul_rn(p, f.inv_freq[j]);
  return make_float2(cosf(angle), sinf(angle));
}

/* One block per token: cos/sin of the token's fp32 angles once, then every (head, pair). */
__global__ void rope_kernel(float *x, const int32_t *__restrict__ pos, int nheads, int hd, int half,
                            rope_freqs f) {
  dev_pdl_enter();
  __shared__ float2 cs[ROPE_MAX_HALF];
  const int t = blockIdx.x;
  const float p = (float)pos[t];
  for (int i = threadIdx.x; i < half; i += blockDim.x) cs[i] = rope_cos_sin(p, f, i);
  __syncthreads();
  for (int e = threadIdx.x; e < nheads * half; e += blockDim.x) {
    int h = e / half, i = e % half;
    float *v = x + ((size_t)t * nheads + h) * hd;
    const float2 r = rope_rotate(v[i], v[i + half], cs[i].x, cs[i].y);
    v[i] = r.x;
    v[i + half] = r.y;
  }
}

/* The rotated pairs of a head (0 = none) and their frequencies: inv_freq = 1 / theta^(arange(0,
 * rot, 2) / rot), on the host with the CPU backend's expression so both backends rotate by
 * bit-identical frequencies. */
static int rope_frequencies(int hd, int rot, double theta, rope_freqs *f) {
  if (rot > hd) rot = hd;
  int half = rot / 2;
  if (half <= 0) return 0;
  if (half > ROPE_MAX_HALF) half = ROPE_MAX_HALF; /* rotary widths are at most a head */
  for (int i = 0; i < half; i++) {
    float exponent = (float)(2 * i) / (float)rot;
    f->inv_freq[i] = 1.0f / powf((float)theta, exponent);
  }
  return half;
}

void cuda_rope(m3_backend *be, float *x, const int32_t *pos, int T, int nheads, int hd, int rot,
               double theta) {
  cuda_backend *cb = cuda_of(be);
  rope_freqs f;
  int half = rope_frequencies(hd, rot, theta, &f);
  if (half <= 0 || T <= 0) return;
  dev_launch(rope_kernel, T, 256, 0, cb->stream, x, pos, nheads, hd, half, f);
  cuda_launched(cb, "rope");
}

enum { NORM_ROPE_WARPS = 8, NORM_ROPE_MAX_HD = 512 };

/* One warp's Gemma RMSNorm of a head vector v [hd] (hd <= NORM_ROPE_MAX_HD) as norm_row
 * computes it, into buf [hd] (the warp's row of shared memory) so that each lane can then read
 * the partner of its pair. rmsnorm_rope_kernel and kv_store_rope_kernel both norm through this
 * one function: the same loads, reduction and roundings, so their results are the same bits. */
__device__ __forceinline__ void norm_head_to_shared(const float *__restrict__ v, const cuda_weight &w,
                                                    float eps, int hd, float *buf, int lane) {
  /* a lane's elements and gains in registers, all loaded before the first is used: one round
   * trip, not one per element and another for the weights */
  float e[NORM_ROPE_MAX_HD / 32], gain[NORM_ROPE_MAX_HD / 32];
#pragma unroll
  for (int j = 0; j < NORM_ROPE_MAX_HD / 32; j++)
    e[j] = lane + 32 * j < hd ? v[lane + 32 * j] : 0.0f;
  /* plain F32 and BF16 gains (every M3 checkpoint's) outside dev_w's per-element switch, whose
   * branches kept each gain load waiting for the one before (H200, warm: the dense layer's
   * kv_store_rope 6.2 -> 4.4 us, rmsnorm_rope of 64 heads 5.7 -> 4.6 us) */
  if (w.quant == M3_WQ_NONE && w.type == CW_F32) {
#pragma unroll
    for (int j = 0; j < NORM_ROPE_MAX_HD / 32; j++)
      gain[j] = lane + 32 * j < hd ? ((const float *)w.data)[lane + 32 * j] : 0.0f;
  } else if (w.quant == M3_WQ_NONE && w.type == CW_BF16) {
    uint16_t raw[NORM_ROPE_MAX_HD / 32];
#pragma unroll
    for (int j = 0; j < NORM_ROPE_MAX_HD / 32; j++)
      raw[j] = lane + 32 * j < hd ? ((const uint16_t *)w.data)[lane + 32 * j] : (uint16_t)0;
#pragma unroll
    for (int j = 0; j < NORM_ROPE_MAX_HD / 32; j++) gain[j] = dev_bf16(raw[j]);
  } else {
#pragma unroll
    for (int j = 0; j < NORM_ROPE_MAX_HD / 32; j++)
      gain[j] = lane + 32 * j < hd ? dev_w(w, 0, lane + 32 * j) : 0.0f;
  }
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < NORM_ROPE_MAX_HD / 32; j++)
    if (lane + 32 * j < hd) ss += e[j] * e[j];
  const float inv = 1.0f / sqrtf(warp_sum(ss) / (float)hd + eps);
#pragma unroll
  for (int j = 0; j < NORM_ROPE_MAX_HD / 32; j++)
    if (lane + 32 * j < hd) buf[lane + 32 * j] = __fmul_rn(__fmul_rn(e[j], inv), 1.0f + gain[j]);
  __syncwarp();
}

/* The normed head in buf [hd] after rope_kernel's rotation at position p, into dst [hd]: lane
 * takes pairs j = lane, lane + 32, ... < half (j and j + half share one angle, computed once),
 * then the unrotated rest. cs: the angles' (cos, sin) already in shared memory (the block's
 * heads all of one token), or NULL to compute them here. */
__device__ __forceinline__ void rope_head_store(const float *buf, float *dst, int hd, int half, float p,
                                                const rope_freqs &f, const float2 *cs, int lane) {
  for (int j = lane; j < half; j += 32) {
    const float2 t = cs ? cs[j] : rope_cos_sin(p, f, j);
    const float2 r = rope_rotate(buf[j], buf[j + half], t.x, t.y);
    dst[j] = r.x;
    dst[j + half] = r.y;
  }
  for (int i = 2 * half + lane; i < hd; i += 32) dst[i] = buf[i];
}

/* One warp per head vector (row r = t * nheads + h of x): norm_head_to_shared, then the rotation
 * written back. One launch and one read and write of x instead of two. Where the block's rows
 * are heads of one token (nheads a multiple of the warps, as M3's 64 query heads), the token's
 * cos and sin are computed once for the block, not once per head: the same values, fewer
 * evaluations (H200, an 8192-token prompt's q and index-q calls: 0.476 -> 0.437 ms). */
__global__ void __launch_bounds__(32 * NORM_ROPE_WARPS)
    rmsnorm_rope_kernel(float *x, cuda_weight w, float eps, const int32_t *__restrict__ pos,
                        int rows, int nheads, int hd, int half, rope_freqs f) {
  dev_pdl_enter();
  __shared__ float row_buf[NORM_ROPE_WARPS][NORM_ROPE_MAX_HD];
  __shared__ float2 token_cs[NORM_ROPE_MAX_HD / 2];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r0 = blockIdx.x * NORM_ROPE_WARPS, r = r0 + warp;
  const int last = r0 + NORM_ROPE_WARPS - 1 < rows ? r0 + NORM_ROPE_WARPS - 1 : rows - 1;
  const bool one_token = r0 / nheads == last / nheads; /* the same for the whole block */
  const float p = (float)pos[(r < rows ? r : last) / nheads]; /* loaded beside the row's elements */
  float *v = x + (size_t)(r < rows ? r : last) * hd, *buf = row_buf[warp];
  if (r < rows) norm_head_to_shared(v, w, eps, hd, buf, lane);
  if (one_token) { /* every warp of the block, rows or not */
    for (int j = threadIdx.x; j < half; j += blockDim.x) token_cs[j] = rope_cos_sin(p, f, j);
    __syncthreads();
  }
  if (r < rows) rope_head_store(buf, v, hd, half, p, f, one_token ? token_cs : NULL, lane);
}

void cuda_rmsnorm_rope(m3_backend *be, float *x, const m3_tensor *w, float eps, const int32_t *pos,
                       int T, int nheads, int hd, int rot, double theta) {
  cuda_backend *cb = cuda_of(be);
  if (T <= 0 || nheads <= 0 || hd <= 0) return;
  if (hd > NORM_ROPE_MAX_HD) { /* wider than any M3 head: the two ops one after the other */
    cuda_rmsnorm(be, x, w, eps, T * nheads, hd, x);
    cuda_rope(be, x, pos, T, nheads, hd, rot, theta);
    return;
  }
  rope_freqs f;
  const int half = rope_frequencies(hd, rot, theta, &f);
  const int rows = T * nheads;
  dev_launch(rmsnorm_rope_kernel, (rows + NORM_ROPE_WARPS - 1) / NORM_ROPE_WARPS, 32 * NORM_ROPE_WARPS, 0, cb->stream,
             x, cuda_weight_of(w), eps, pos, rows, nheads, hd, half, f);
  cuda_launched(cb, "rmsnorm_rope");
}

/* What kv_store_rope_kernel reads besides the view and positions. */
typedef struct {
  const float *k, *v, *ik; /* [T, nkv, hd], [T, nkv, hd], [T, ihd] or NULL */
  cuda_weight k_norm, ik_norm;
  float eps;
  int k_half, ik_half;                 /* rotated pairs of a key head and of the index key */
  size_t kv_page_bytes, ik_page_bytes; /* fp8 pools' page bytes (m3_kv_pool_page_bytes) */
} kv_rope_args;

/* Head vector src [dim], normed with w and rotated at position p (norm_head_to_shared,
 * rope_head_store: rmsnorm_rope_kernel's bits), into row r of its page: float32 straight from
 * the rotation; fp8 staged in out [dim] and quantized by kv8_store_row, kv_store's code (a key
 * head, not the index key, through the key rotation). */
template <int FP8>
__device__ __forceinline__ void store_normed_head(const float *__restrict__ src, const cuda_weight &w,
                                                  float eps, int dim, int half, const rope_freqs &f,
                                                  float p, uint8_t *page, int rows, int r, bool key,
                                                  float *buf, float *out, int lane) {
  norm_head_to_shared(src, w, eps, dim, buf, lane);
  if (FP8) {
    rope_head_store(buf, out, dim, half, p, f, NULL, lane);
    __syncwarp();
    kv8_store_row(page, rows, dim, r, out, key, lane);
  } else {
    rope_head_store(buf, (float *)page + (size_t)r * dim, dim, half, p, f, NULL, lane);
  }
}

/* One warp per row of a token, rows 0..nkv-1 its K heads, nkv..2nkv-1 its V heads, 2nkv its index
 * key (when stored): the keys through store_normed_head, V as kv_store writes it. Positions
 * without a page (and padding, pos < 0) are skipped, as kv_store skips them. fik: the index key's
 * frequencies (its rotated width is clamped to ihd, the heads' to hd). */
template <int FP8>
__global__ void __launch_bounds__(32 * NORM_ROPE_WARPS)
    kv_store_rope_kernel(m3_kv_view kv, const int32_t *__restrict__ pos, int T, kv_rope_args a,
                         rope_freqs fk, rope_freqs fik) {
  dev_pdl_enter();
  __shared__ float row_buf[NORM_ROPE_WARPS][NORM_ROPE_MAX_HD];
  __shared__ float out_buf[FP8 ? NORM_ROPE_WARPS : 1][FP8 ? NORM_ROPE_MAX_HD : 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nkv = kv.nkv, hd = kv.hd, bs = kv.block_size, per_token = 2 * nkv + (a.ik ? 1 : 0);
  const int64_t r = (int64_t)blockIdx.x * NORM_ROPE_WARPS + warp;
  if (r >= (int64_t)T * per_token) return; /* whole warps leave: no block-wide barrier follows */
  const int t = (int)(r / per_token), row = (int)(r % per_token);
  const int32_t p = pos[t];
  if (p < 0 || p / bs >= kv.num_blocks) return;
  const int32_t page = kv.block_table[p / bs];
  const int slot = p % bs;
  float *buf = row_buf[warp], *out = FP8 ? out_buf[warp] : NULL;
  if (row == 2 * nkv) {
    uint8_t *dst = FP8 ? (uint8_t *)kv.ik + (size_t)page * a.ik_page_bytes
                       : (uint8_t *)((float *)kv.ik + (size_t)page * bs * kv.ihd);
    store_normed_head<FP8>(a.ik + (size_t)t * kv.ihd, a.ik_norm, a.eps, kv.ihd, a.ik_half, fik,
                           (float)p, dst, bs, slot, false, buf, out, lane);
    return;
  }
  const int h = row < nkv ? row : row - nkv, kv_row = h * bs + slot;
  const size_t src = ((size_t)t * nkv + h) * hd;
  uint8_t *dst = FP8 ? (uint8_t *)(row < nkv ? kv.k : kv.v) + (size_t)page * a.kv_page_bytes
                     : (uint8_t *)((float *)(row < nkv ? kv.k : kv.v) + (size_t)page * nkv * bs * hd);
  if (row < nkv) {
    store_normed_head<FP8>(a.k + src, a.k_norm, a.eps, hd, a.k_half, fk, (float)p, dst, nkv * bs,
                           kv_row, true, buf, out, lane);
  } else if (FP8) {
    kv8_store_row(dst, nkv * bs, hd, kv_row, a.v + src, false, lane);
  } else {
    for (int d = lane; d < hd; d += 32) ((float *)dst)[(size_t)kv_row * hd + d] = a.v[src + d];
  }
}

void cuda_kv_store_rope(m3_backend *be, const m3_kv_view *kv, const int32_t *pos, int T,
                        const float *k, const m3_tensor *k_norm, const float *v, const float *ik,
                        const m3_tensor *ik_norm, float eps, int rot, double theta) {
  cuda_backend *cb = cuda_of(be);
  if (T <= 0 || kv->nkv <= 0 || kv->hd <= 0) return;
  const int with_ik = ik && ik_norm && kv->ik; /* kv_store stores ik only into a view that has it */
  if (kv->hd > NORM_ROPE_MAX_HD || (with_ik && kv->ihd > NORM_ROPE_MAX_HD)) {
    /* wider than any M3 head: the ops the contract names, the keys normed in place */
    cuda_rmsnorm_rope(be, (float *)k, k_norm, eps, pos, T, kv->nkv, kv->hd, rot, theta);
    if (with_ik) cuda_rmsnorm_rope(be, (float *)ik, ik_norm, eps, pos, T, 1, kv->ihd, rot, theta);
    cuda_kv_store(be, kv, pos, T, k, v, with_ik ? ik : NULL);
    return;
  }
  kv_rope_args a;
  memset(&a, 0, sizeof a);
  a.k = k, a.v = v, a.ik = with_ik ? ik : NULL;
  a.k_norm = cuda_weight_of(k_norm);
  if (with_ik) a.ik_norm = cuda_weight_of(ik_norm);
  a.eps = eps;
  rope_freqs fk, fik;
  memset(&fik, 0, sizeof fik);
  a.k_half = rope_frequencies(kv->hd, rot, theta, &fk);
  if (with_ik) a.ik_half = rope_frequencies(kv->ihd, rot, theta, &fik);
  const int64_t rows = (int64_t)T * (2 * kv->nkv + with_ik);
  const unsigned blocks = (unsigned)((rows + NORM_ROPE_WARPS - 1) / NORM_ROPE_WARPS);
  if (kv->dtype == M3_KV_FP8) {
    a.kv_page_bytes = m3_kv_pool_page_bytes(M3_KV_FP8, (size_t)kv->nkv * kv->block_size, (size_t)kv->hd);
    a.ik_page_bytes = m3_kv_pool_page_bytes(M3_KV_FP8, (size_t)kv->block_size, (size_t)kv->ihd);
    dev_launch(kv_store_rope_kernel<1>, blocks, 32 * NORM_ROPE_WARPS, 0, cb->stream, *kv, pos, T, a, fk, fik);
  } else {
    dev_launch(kv_store_rope_kernel<0>, blocks, 32 * NORM_ROPE_WARPS, 0, cb->stream, *kv, pos, T, a, fk, fik);
  }
  cuda_launched(cb, "kv_store_rope");
}

__global__ void swiglu_kernel(const float *gate, const float *up, size_t n, float alpha, float beta,
                              float limit, float *out) {
  dev_pdl_enter();
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x)
    out[i] = dev_swiglu_oai(gate[i], up[i], alpha, beta, limit);
}

void cuda_swiglu_oai(m3_backend *be, const float *gate, const float *up, size_t n, float alpha,
                     float beta, float limit, float *out) {
  cuda_backend *cb = cuda_of(be);
  if (n == 0) return;
  dev_launch(swiglu_kernel, elem_blocks(n), ELEM_THREADS, 0, cb->stream, gate, up, n, alpha, beta, limit, out);
  cuda_launched(cb, "swiglu_oai");
}

__global__ void add_kernel(float *x, const float *y, size_t n) {
  dev_pdl_enter();
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x)
    x[i] += y[i];
}

void cuda_add(m3_backend *be, float *x, const float *y, size_t n) {
  cuda_backend *cb = cuda_of(be);
  if (n == 0) return;
  dev_launch(add_kernel, elem_blocks(n), ELEM_THREADS, 0, cb->stream, x, y, n);
  cuda_launched(cb, "add");
}

enum { ARGMAX_THREADS = 1024, ARGMAX_QUADS = 4, ARGMAX_CLUSTER = 8, ARGMAX_GRID_ROWS = 65535 };

/* Element i (value v) into a thread's best rank key. */
__device__ __forceinline__ void keep_best(uint64_t &best, float v, int i, bool lead) {
  const uint64_t r = rank_key(score_key(lead && i == 0 && isnan(v) ? INFINITY : v), i);
  best = r > best ? r : best;
}

/* The best rank key of l[c0, c1) (score key, then the lower index; NaN as -inf, -0 as +0:
 * block_topk's order), valid in thread 0 of the calling block: each thread keeps the best of its
 * strided share, then the warp's best by shuffles and the block's across the warps' in shared
 * memory. The keys order every element, so the order of the scan does not change the pick: the
 * range goes in 16-byte quads, ARGMAX_QUADS of them in flight per thread, with the unaligned head
 * and the tail element by element. `lead`: l starts the whole row, and its NaN at index 0 ranks as
 * +inf: the sampler's scan starts there and nothing strictly larger moves it, and a +inf elsewhere
 * ties it and loses on the index (elsewhere a NaN is -inf, below index 0's key, so never kept).
 * An empty range gives 0, below every key. */
__device__ __forceinline__ uint64_t block_range_best(const float *l, int c0, int c1, bool lead) {
  __shared__ uint64_t warp_best[ARGMAX_THREADS / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nt = blockDim.x;
  uint64_t best = 0;
  const int n = c1 > c0 ? c1 - c0 : 0;
  const int head = min((int)((16 - (uintptr_t)(l + c0) % 16) % 16 / sizeof(float)), n);
  const int quads = (n - head) / 4, tail = c0 + head + 4 * quads;
  const float4 *q = (const float4 *)(l + c0 + head);
  for (int i = c0 + threadIdx.x; i < c0 + head; i += nt) keep_best(best, l[i], i, lead);
  for (int j0 = threadIdx.x; j0 < quads; j0 += ARGMAX_QUADS * nt) {
    float4 v[ARGMAX_QUADS];
#pragma unroll
    for (int u = 0; u < ARGMAX_QUADS; u++)
      if (j0 + u * nt < quads) v[u] = q[j0 + u * nt];
#pragma unroll
    for (int u = 0; u < ARGMAX_QUADS; u++) {
      const int j = j0 + u * nt, i = c0 + head + 4 * j;
      if (j >= quads) break;
      keep_best(best, v[u].x, i, lead);
      keep_best(best, v[u].y, i + 1, lead);
      keep_best(best, v[u].z, i + 2, lead);
      keep_best(best, v[u].w, i + 3, lead);
    }
  }
  for (int i = tail + threadIdx.x; i < c1; i += nt) keep_best(best, l[i], i, lead);
  best = warp_max_u64(best);
  if (lane == 0) warp_best[warp] = best;
  __syncthreads();
  if (warp == 0) {
    best = lane < (int)(blockDim.x >> 5) ? warp_best[lane] : 0;
    best = warp_max_u64(best);
  }
  return best;
}

/* Every thread of every block of the cluster arrives; what each wrote before is visible to all
 * after (release / acquire). */
__device__ __forceinline__ void cluster_sync(void) {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

/* The index of this block in its cluster. */
__device__ __forceinline__ uint32_t cluster_rank(void) {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return rank;
}

/* Block 0 of this block's cluster (rank) gets the cluster's best of the keys each block put in
 * `mine` (all threads call it): distributed shared memory (PTX mapa / ld.shared::cluster) between
 * two cluster barriers, the second keeping every block's key alive until block 0 has read it. */
__device__ __forceinline__ uint64_t cluster_best(uint64_t *mine, uint32_t rank) {
  cluster_sync();
  uint64_t best = 0;
  if (rank == 0 && threadIdx.x < 32) {
    if (threadIdx.x < ARGMAX_CLUSTER) {
      const uint32_t local = (uint32_t)__cvta_generic_to_shared(mine);
      uint32_t remote;
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"((uint32_t)threadIdx.x));
      asm volatile("ld.shared::cluster.u64 %0, [%1];" : "=l"(best) : "r"(remote) : "memory");
    }
    best = warp_max_u64(best);
  }
  cluster_sync();
  return best;
}

/* The greedy pick of row blockIdx.y by a cluster of ARGMAX_CLUSTER blocks, each scanning an
 * equal, 16-byte-multiple part: one block pulls about 25 GB/s through its SM (half a 200064 row
 * took 17.3 us, the whole 47 us), eight share the row. The index, in thread 0 of the cluster's
 * block 0 (else -1). */
__device__ __forceinline__ int cluster_row_pick(const float *l, int n, bool lead) {
  __shared__ uint64_t block_best;
  const uint32_t rank = cluster_rank();
  const int part = (n + 4 * ARGMAX_CLUSTER - 1) / (4 * ARGMAX_CLUSTER) * 4;
  const int c0 = min(n, (int)rank * part), c1 = min(n, c0 + part);
  const uint64_t best = block_range_best(l, c0, c1, lead);
  if (threadIdx.x == 0) block_best = best;
  const uint64_t all = cluster_best(&block_best, rank);
  return rank == 0 && threadIdx.x == 0 ? (int)~(uint32_t)(all & 0xffffffffu) : -1;
}

__global__ void __cluster_dims__(ARGMAX_CLUSTER, 1, 1) __launch_bounds__(ARGMAX_THREADS)
    argmax_rows_kernel(const float *logits, int vocab, int32_t *out) {
  dev_pdl_enter();
  const int i = cluster_row_pick(logits + (size_t)blockIdx.y * vocab, vocab, true);
  if (i >= 0) out[blockIdx.y] = i;
}

/* A slice's candidate (backend.h argmax_pairs): the kept index and its score, NaN as -inf but at
 * whole-row index 0 as +inf (the pick's keys, as floats). */
__global__ void __cluster_dims__(ARGMAX_CLUSTER, 1, 1) __launch_bounds__(ARGMAX_THREADS)
    argmax_pairs_kernel(const float *logits, int cols, int first, float *pairs) {
  dev_pdl_enter();
  const float *l = logits + (size_t)blockIdx.y * cols;
  const int i = cluster_row_pick(l, cols, first == 0);
  if (i >= 0) {
    const float v = l[i];
    pairs[2 * (size_t)blockIdx.y] = isnan(v) ? (first + i == 0 ? INFINITY : -INFINITY) : v;
    pairs[2 * (size_t)blockIdx.y + 1] = (float)(first + i);
  }
}

m3_status cuda_argmax_rows(m3_backend *be, const float *logits, int nrows, int vocab,
                           int32_t *out_host) {
  cuda_backend *cb = cuda_of(be);
  if (nrows > 0 && vocab > 0) {
    const size_t bytes = (size_t)nrows * sizeof(int32_t);
    int32_t *ids = (int32_t *)cuda_scratch(cb, bytes, "argmax_rows");
    if (ids) {
      for (int r0 = 0; r0 < nrows; r0 += ARGMAX_GRID_ROWS) /* grid.y holds 65535 */
        dev_launch(argmax_rows_kernel, dim3(ARGMAX_CLUSTER, (unsigned)min(nrows - r0, (int)ARGMAX_GRID_ROWS)),
                   ARGMAX_THREADS, 0, cb->stream, logits + (size_t)r0 * vocab, vocab, ids + r0);
      cuda_launched(cb, "argmax_rows");
      cuda_note(cb, cudaMemcpyAsync(out_host, ids, bytes, cudaMemcpyDeviceToHost, cb->stream),
                "argmax_rows");
    }
  }
  cuda_note(cb, cudaStreamSynchronize(cb->stream), "argmax_rows");
  return cuda_take_error(cb, "argmax_rows");
}

void cuda_argmax_pairs(m3_backend *be, const float *logits, int nrows, int cols, int first,
                       float *pairs) {
  cuda_backend *cb = cuda_of(be);
  if (nrows <= 0 || cols <= 0) return;
  for (int r0 = 0; r0 < nrows; r0 += ARGMAX_GRID_ROWS) /* grid.y holds 65535 */
    dev_launch(argmax_pairs_kernel, dim3(ARGMAX_CLUSTER, (unsigned)min(nrows - r0, (int)ARGMAX_GRID_ROWS)),
               ARGMAX_THREADS, 0, cb->stream, logits + (size_t)r0 * cols, cols, first, pairs + 2 * (size_t)r0);
  cuda_launched(cb, "argmax_pairs");
}
