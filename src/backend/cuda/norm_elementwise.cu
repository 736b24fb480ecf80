/* norm_elementwise.cu: Gemma RMSNorm (alone and after the residual add), partial NeoX RoPE (alone,
 * fused with the norm, and fused with the norm and the KV cache store of the keys), SwiGLU-OAI and
 * the residual add (shared/spec/m3_text_spec.md §3.1-3.4), each in the CPU's float32 operation
 * order; and the greedy argmax of logits rows (whole, or a vocabulary slice's candidate). */
#include <cuda_bf16.h>
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

/* A lane's elements of a head vector v [hd]: e[j] = v[lane + 32 j] (0 past hd), all loaded before
 * the first is used. */
template <int NE>
__device__ __forceinline__ void head_load(const float *__restrict__ v, int hd, int lane, float e[NE]) {
#pragma unroll
  for (int j = 0; j < NE; j++) e[j] = lane + 32 * j < hd ? v[lane + 32 * j] : 0.0f;
}

/* The norm's gains at a lane's elements, gain[j] for column lane + 32 j. Plain F32 and BF16 gains
 * (every M3 checkpoint's) outside dev_w's per-element switch, whose branches kept each gain load
 * waiting for the one before (H200, warm: the dense layer's kv_store_rope 6.2 -> 4.4 us,
 * rmsnorm_rope of 64 heads 5.7 -> 4.6 us). */
template <int NE> __device__ __forceinline__ void head_gains(const cuda_weight &w, int hd, int lane, float gain[NE]) {
  if (w.quant == M3_WQ_NONE && w.type == CW_F32) {
#pragma unroll
    for (int j = 0; j < NE; j++) gain[j] = lane + 32 * j < hd ? ((const float *)w.data)[lane + 32 * j] : 0.0f;
  } else if (w.quant == M3_WQ_NONE && w.type == CW_BF16) {
    uint16_t raw[NE];
#pragma unroll
    for (int j = 0; j < NE; j++) raw[j] = lane + 32 * j < hd ? ((const uint16_t *)w.data)[lane + 32 * j] : (uint16_t)0;
#pragma unroll
    for (int j = 0; j < NE; j++) gain[j] = dev_bf16(raw[j]);
  } else {
#pragma unroll
    for (int j = 0; j < NE; j++) gain[j] = lane + 32 * j < hd ? dev_w(w, 0, lane + 32 * j) : 0.0f;
  }
}

/* Gemma RMSNorm of a head held as head_load left it, in place, as norm_row computes it: the
 * squares summed lane by lane in j order, then across the warp. Every head norm of this file goes
 * through here, so the fused kernels and rmsnorm_rope give the same bits. */
template <int NE>
__device__ __forceinline__ void head_norm(float e[NE], const float gain[NE], float eps, int hd, int lane) {
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < NE; j++)
    if (lane + 32 * j < hd) ss += e[j] * e[j];
  const float inv = 1.0f / sqrtf(warp_sum(ss) / (float)hd + eps);
#pragma unroll
  for (int j = 0; j < NE; j++) e[j] = __fmul_rn(__fmul_rn(e[j], inv), 1.0f + gain[j]);
}

/* The normed head e (a lane's elements, as head_load lays them out) after rope_kernel's rotation
 * at position p, into dst [hd], through buf [hd] (the warp's row of shared memory, where each lane
 * reads the partner of its pairs): lane takes pairs j = lane, lane + 32, ... < half (j and
 * j + half share one angle, computed once), then the unrotated rest. */
template <int NE> __device__ __forceinline__ void rope_head_store(const float (&e)[NE], float *buf, float *dst, int hd,
                                                                  int half, float p, const rope_freqs &f, int lane) {
#pragma unroll
  for (int j = 0; j < NE; j++)
    if (lane + 32 * j < hd) buf[lane + 32 * j] = e[j];
  __syncwarp();
  for (int j = lane; j < half; j += 32) {
    const float2 t = rope_cos_sin(p, f, j);
    const float2 r = rope_rotate(buf[j], buf[j + half], t.x, t.y);
    dst[j] = r.x;
    dst[j + half] = r.y;
  }
  for (int i = 2 * half + lane; i < hd; i += 32) dst[i] = buf[i];
}

/* Gemma RMSNorm of every head vector of x [rows = T * nheads, hd], then the rotation, written
 * back: one read and write of x. A warp takes rpw <= RPW consecutive rows (heads) and loads all of
 * them before it norms the first, NE elements a lane (hd <= 32 NE): a head a warp kept one head's
 * 512 bytes in flight per warp and ran an 8192-token prompt's 64 query heads at a quarter of the
 * copy bandwidth. Few rows (a decode step) take a head a warp (rpw = 1): there the rows of a warp
 * would be normed one after the other while other SMs sit idle. M = half / 32 where the rotated
 * half is a multiple of 32 (M3's: 32 pairs): element j's partner j + half is then the same lane's
 * element j + M, and a lane needs the angles of its own M pairs only, once per token of its rows.
 * M = 0: the partners meet through shared memory (rope_head_store). The same bits either way. */
template <int NE, int RPW, int M> __global__ void __launch_bounds__(32 * NORM_ROPE_WARPS)
    rmsnorm_rope_kernel(float *x, cuda_weight w, float eps, const int32_t *__restrict__ pos, int64_t rows, int nheads,
                        int hd, int half, rope_freqs f, int rpw) {
  dev_pdl_enter();
  __shared__ float row_buf[M ? 1 : NORM_ROPE_WARPS][M ? 1 : 32 * NE];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t r0 = ((int64_t)blockIdx.x * NORM_ROPE_WARPS + warp) * rpw;
  if (r0 >= rows) return; /* whole warps leave: no block-wide barrier follows */
  const int64_t r_end = r0 + rpw < rows ? r0 + rpw : rows;
  float e[RPW][NE], gain[NE];
#pragma unroll
  for (int i = 0; i < RPW; i++)
    if (r0 + i < r_end) head_load<NE>(x + (size_t)(r0 + i) * hd, hd, lane, e[i]);
  head_gains<NE>(w, hd, lane, gain);
  int64_t token = -1;
  float2 cs[M ? M : 1];
#pragma unroll
  for (int i = 0; i < RPW; i++) {
    const int64_t r = r0 + i;
    if (r >= r_end) break;
    float *v = x + (size_t)r * hd;
    const int64_t t = r / nheads;
    head_norm<NE>(e[i], gain, eps, hd, lane);
    if (M == 0) {
      rope_head_store<NE>(e[i], row_buf[warp], v, hd, half, (float)pos[t], f, lane);
      __syncwarp();
      continue;
    }
    if (t != token) { /* the angles of the lane's pairs at this row's position */
      token = t;
      const float p = (float)pos[t];
#pragma unroll
      for (int j = 0; j < M; j++) cs[j] = rope_cos_sin(p, f, 32 * j + lane);
    }
#pragma unroll
    for (int j = 0; j < NE; j++) {
      if (j < M) {
        const float2 rot = rope_rotate(e[i][j], e[i][j + M], cs[j].x, cs[j].y);
        v[lane + 32 * j] = rot.x;
        v[lane + 32 * (j + M)] = rot.y;
      } else if (j >= 2 * M && lane + 32 * j < hd) {
        v[lane + 32 * j] = e[i][j];
      }
    }
  }
}

/* Rows a warp of rmsnorm_rope_kernel and kv_store_rope_kernel: `most` where the rows still give
 * every SM two blocks of NORM_ROPE_WARPS warps, else 1 (a decode step's few rows a warp each). */
static int norm_rope_rows_per_warp(const cuda_backend *cb, int64_t rows, int most) {
  return rows >= (int64_t)2 * NORM_ROPE_WARPS * most * cb->num_sms ? most : 1;
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
  const int64_t rows = (int64_t)T * nheads;
  const int narrow = hd <= 128, rpw = norm_rope_rows_per_warp(cb, rows, narrow ? 8 : 2);
  const unsigned blocks = (unsigned)((rows + NORM_ROPE_WARPS * rpw - 1) / (NORM_ROPE_WARPS * rpw));
  const int in_lane = half % 32 == 0 ? half / 32 : 0; /* M, where rmsnorm_rope_kernel has one */
  void (*kernel)(float *, cuda_weight, float, const int32_t *, int64_t, int, int, int, rope_freqs, int) =
      !narrow        ? rmsnorm_rope_kernel<NORM_ROPE_MAX_HD / 32, 2, 0>
      : in_lane == 1 ? rmsnorm_rope_kernel<4, 8, 1>
      : in_lane == 2 ? rmsnorm_rope_kernel<4, 8, 2>
                     : rmsnorm_rope_kernel<4, 8, 0>;
  dev_launch(kernel, blocks, 32 * NORM_ROPE_WARPS, 0, cb->stream, x, cuda_weight_of(w), eps, pos, rows, nheads, hd,
             half, f, rpw);
  cuda_launched(cb, "rmsnorm_rope");
}

/* What kv_store_rope_kernel reads besides the view and positions. */
typedef struct {
  const float *k, *v, *ik; /* [T, nkv, hd], [T, nkv, hd], [T, ihd] or NULL */
  float *q, *iq;           /* [T, nq, hd], [T, niq, ihd], normed and rotated in place; NULL: none */
  int nq, niq;             /* their rows a token (0 where NULL) */
  cuda_weight k_norm, ik_norm, q_norm, iq_norm;
  float eps;
  int k_half, ik_half;                 /* rotated pairs of a head of hd and of ihd */
  size_t kv_page_bytes, ik_page_bytes; /* fp8 pools' page bytes (m3_kv_pool_page_bytes) */
} kv_rope_args;

/* A token's rows in kv_store_rope_kernel: K heads 0..nkv-1, V heads nkv..2nkv-1, the index key
 * (when stored), then the query heads and the index query heads. */
__device__ __forceinline__ int kvr_cache_rows(const m3_kv_view &kv, const kv_rope_args &a) {
  return 2 * kv.nkv + (a.ik ? 1 : 0);
}

/* Row i of token t: its memory and width. Only query rows are written through it (the cast drops
 * the keys' const for one return type). */
__device__ __forceinline__ float *kvr_row(const m3_kv_view &kv, const kv_rope_args &a, int t, int i, int *dim) {
  const int nkv = kv.nkv, cached = kvr_cache_rows(kv, a);
  *dim = i < 2 * nkv || (i >= cached && i < cached + a.nq) ? kv.hd : kv.ihd;
  if (i < nkv) return (float *)a.k + ((size_t)t * nkv + i) * kv.hd;
  if (i < 2 * nkv) return (float *)a.v + ((size_t)t * nkv + i - nkv) * kv.hd;
  if (i < cached) return (float *)a.ik + (size_t)t * kv.ihd;
  if (i < cached + a.nq) return a.q + ((size_t)t * a.nq + i - cached) * kv.hd;
  return a.iq + ((size_t)t * a.niq + i - cached - a.nq) * kv.ihd;
}

/* The norm's gains of row i (kvr_row's order; V heads have none), loaded with the row: a warp's
 * rows are of every kind, and one array picked among four by the row kind would live in local
 * memory. */
template <int NE> __device__ __forceinline__ void kvr_gains(const m3_kv_view &kv, const kv_rope_args &a, int i,
                                                            int lane, float (&g)[NE]) {
  const int nkv = kv.nkv, cached = kvr_cache_rows(kv, a);
  if (i < nkv) head_gains<NE>(a.k_norm, kv.hd, lane, g);
  else if (i < 2 * nkv) return;
  else if (i < cached) head_gains<NE>(a.ik_norm, kv.ihd, lane, g);
  else if (i < cached + a.nq) head_gains<NE>(a.q_norm, kv.hd, lane, g);
  else head_gains<NE>(a.iq_norm, kv.ihd, lane, g);
}

/* Row i of a token's 2 nkv (+ 1) cache rows in kv_store_rope_kernel: K heads 0..nkv-1, normed and
 * rotated (head_norm, rope_head_store: rmsnorm_rope's bits), V heads nkv..2nkv-1 as they are, and
 * the index key (when stored) normed and rotated with its own frequencies (its rotated width is
 * clamped to ihd, the heads' to hd), each into its page's row: float32 straight, fp8 staged in out
 * and quantized by kv8_store_row, kv_store's code (K heads through the key rotation). v: the row's
 * elements as head_load left them; g: its norm's gains (kvr_gains). */
template <int FP8, int NE>
__device__ __forceinline__ void kvr_store_row(const m3_kv_view &kv, const kv_rope_args &a, const rope_freqs &fk,
                                              const rope_freqs &fik, int i, int dim, int32_t p, float (&v)[NE],
                                              const float (&g)[NE], float *buf, float *out, int lane) {
  const int nkv = kv.nkv, bs = kv.block_size, slot = p % bs;
  const int32_t page = kv.block_table[p / bs];
  const bool index_key = i == 2 * nkv, key = i < nkv;
  const int h = key ? i : i - nkv, r = index_key ? slot : h * bs + slot, page_rows = index_key ? bs : nkv * bs;
  uint8_t *dst = index_key ? (FP8 ? (uint8_t *)kv.ik + (size_t)page * a.ik_page_bytes
                                  : (uint8_t *)((float *)kv.ik + (size_t)page * bs * kv.ihd))
                           : (FP8 ? (uint8_t *)(key ? kv.k : kv.v) + (size_t)page * a.kv_page_bytes
                                  : (uint8_t *)((float *)(key ? kv.k : kv.v) + (size_t)page * nkv * bs * kv.hd));
  float *row = FP8 ? out : (float *)dst + (size_t)r * dim;
  if (key || index_key) {
    head_norm<NE>(v, g, a.eps, dim, lane);
    rope_head_store<NE>(v, buf, row, dim, index_key ? a.ik_half : a.k_half, (float)p, index_key ? fik : fk, lane);
  } else {
#pragma unroll
    for (int j = 0; j < NE; j++)
      if (lane + 32 * j < dim) row[lane + 32 * j] = v[j];
  }
  __syncwarp();
  if (FP8) {
    kv8_store_row(dst, page_rows, dim, r, out, key, lane);
    __syncwarp();
  }
}

/* The rows of the tokens' K heads, V heads and index keys (2 nkv + 1 a token, kvr_store_row), then
 * their query and index query heads (normed and rotated in place at any position, as rmsnorm_rope
 * does), in order: a warp takes rpw of them, each row's loads out while the row before is stored
 * (a warp a row waited for each row's loads alone: an 8192-token prompt's 9 rows a token at a
 * third of the copy bandwidth; a decode step's few rows keep a warp each). NE elements a lane
 * (hd, ihd <= 32 NE). Cache rows at positions without a page (and padding, pos < 0) are skipped,
 * as kv_store skips them. */
template <int FP8, int NE> __global__ void __launch_bounds__(32 * NORM_ROPE_WARPS)
    kv_store_rope_kernel(m3_kv_view kv, const int32_t *__restrict__ pos, int T, kv_rope_args a, rope_freqs fk,
                         rope_freqs fik, int rpw) {
  dev_pdl_enter();
  __shared__ float row_buf[NORM_ROPE_WARPS][32 * NE];
  __shared__ float out_buf[FP8 ? NORM_ROPE_WARPS : 1][FP8 ? 32 * NE : 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int cached = kvr_cache_rows(kv, a), per_token = cached + a.nq + a.niq;
  const int64_t rows = (int64_t)T * per_token, r0 = ((int64_t)blockIdx.x * NORM_ROPE_WARPS + warp) * rpw;
  if (r0 >= rows) return; /* whole warps leave: no block-wide barrier follows */
  const int64_t r_end = r0 + rpw < rows ? r0 + rpw : rows;
  float *buf = row_buf[warp], *out = FP8 ? out_buf[warp] : NULL;
  float cur[NE], nxt[NE] = {}, g[NE] = {}, g_nxt[NE] = {};
  int dim, next_dim = 0;
  float *row = kvr_row(kv, a, (int)(r0 / per_token), (int)(r0 % per_token), &dim), *next_row = NULL;
  head_load<NE>(row, dim, lane, cur);
  kvr_gains<NE>(kv, a, (int)(r0 % per_token), lane, g);
  for (int64_t r = r0; r < r_end; r++) {
    if (r + 1 < r_end) {
      next_row = kvr_row(kv, a, (int)((r + 1) / per_token), (int)((r + 1) % per_token), &next_dim);
      head_load<NE>(next_row, next_dim, lane, nxt);
      kvr_gains<NE>(kv, a, (int)((r + 1) % per_token), lane, g_nxt);
    }
    const int32_t p = pos[r / per_token];
    const int i = (int)(r % per_token);
    if (i >= cached) { /* a query head: back where it came from */
      const bool query = i < cached + a.nq;
      head_norm<NE>(cur, g, a.eps, dim, lane);
      rope_head_store<NE>(cur, buf, row, dim, query ? a.k_half : a.ik_half, (float)p, query ? fk : fik, lane);
      __syncwarp();
    } else if (p >= 0 && p / kv.block_size < kv.num_blocks) {
      kvr_store_row<FP8, NE>(kv, a, fk, fik, i, dim, p, cur, g, buf, out, lane);
    }
#pragma unroll
    for (int j = 0; j < NE; j++) cur[j] = nxt[j], g[j] = g_nxt[j];
    dim = next_dim, row = next_row;
  }
}

void cuda_kv_store_rope(m3_backend *be, const m3_kv_view *kv, const int32_t *pos, int T, const m3_attention_rows *r) {
  cuda_backend *cb = cuda_of(be);
  if (T <= 0 || kv->nkv <= 0 || kv->hd <= 0) return;
  const int with_ik = r->ik && r->ik_norm && kv->ik; /* kv_store stores ik only into a view that has it */
  const int nq = r->q ? r->nh : 0, niq = r->iq ? r->niq : 0;
  const int64_t cache_rows = (int64_t)T * (2 * kv->nkv + with_ik), query_rows = (int64_t)T * (nq + niq);
  const int wide = kv->hd > NORM_ROPE_MAX_HD || ((with_ik || niq) && kv->ihd > NORM_ROPE_MAX_HD);
  /* A decode step's few rows take one launch for all five branches. A prompt's many query rows
   * take rmsnorm_rope's kernel, whose warps norm 8 heads each and meet RoPE partners in lane. */
  const int fuse_queries = !wide && norm_rope_rows_per_warp(cb, cache_rows + query_rows, 8) == 1;
  if (!fuse_queries) {
    if (nq) cuda_rmsnorm_rope(be, r->q, r->q_norm, r->eps, pos, T, nq, kv->hd, r->rot, r->theta);
    if (niq) cuda_rmsnorm_rope(be, r->iq, r->iq_norm, r->eps, pos, T, niq, kv->ihd, r->rot, r->theta);
  }
  if (wide) { /* wider than any M3 head: the ops the contract names, the keys normed in place */
    cuda_rmsnorm_rope(be, (float *)r->k, r->k_norm, r->eps, pos, T, kv->nkv, kv->hd, r->rot, r->theta);
    if (with_ik) cuda_rmsnorm_rope(be, (float *)r->ik, r->ik_norm, r->eps, pos, T, 1, kv->ihd, r->rot, r->theta);
    cuda_kv_store(be, kv, pos, T, r->k, r->v, with_ik ? r->ik : NULL);
    return;
  }
  kv_rope_args a;
  memset(&a, 0, sizeof a);
  a.k = r->k, a.v = r->v, a.ik = with_ik ? r->ik : NULL;
  a.k_norm = cuda_weight_of(r->k_norm);
  if (with_ik) a.ik_norm = cuda_weight_of(r->ik_norm);
  if (fuse_queries && nq) a.q = r->q, a.nq = nq, a.q_norm = cuda_weight_of(r->q_norm);
  if (fuse_queries && niq) a.iq = r->iq, a.niq = niq, a.iq_norm = cuda_weight_of(r->iq_norm);
  a.eps = r->eps;
  rope_freqs fk, fik;
  memset(&fik, 0, sizeof fik);
  a.k_half = rope_frequencies(kv->hd, r->rot, r->theta, &fk);
  if (a.ik || a.iq) a.ik_half = rope_frequencies(kv->ihd, r->rot, r->theta, &fik);
  const int64_t rows = cache_rows + (fuse_queries ? query_rows : 0);
  const int rpw = norm_rope_rows_per_warp(cb, rows, 8);
  const unsigned blocks = (unsigned)((rows + NORM_ROPE_WARPS * rpw - 1) / (NORM_ROPE_WARPS * rpw));
  const int narrow = kv->hd <= 128 && (!(a.ik || a.iq) || kv->ihd <= 128), fp8 = kv->dtype == M3_KV_FP8;
  if (fp8) {
    a.kv_page_bytes = m3_kv_pool_page_bytes(M3_KV_FP8, (size_t)kv->nkv * kv->block_size, (size_t)kv->hd);
    a.ik_page_bytes = m3_kv_pool_page_bytes(M3_KV_FP8, (size_t)kv->block_size, (size_t)kv->ihd);
  }
  void (*kernel)(m3_kv_view, const int32_t *, int, kv_rope_args, rope_freqs, rope_freqs, int) =
      fp8 ? (narrow ? kv_store_rope_kernel<1, 4> : kv_store_rope_kernel<1, NORM_ROPE_MAX_HD / 32>)
          : (narrow ? kv_store_rope_kernel<0, 4> : kv_store_rope_kernel<0, NORM_ROPE_MAX_HD / 32>);
  dev_launch(kernel, blocks, 32 * NORM_ROPE_WARPS, 0, cb->stream, *kv, pos, T, a, fk, fik, rpw);
  cuda_launched(cb, "kv_store_rope");
}

/* out[i] = SwiGLU-OAI(gate[i], up[i]) (out may be gate); out_bf16 (NULL: none) gets BF16(out) as
 * well, what cuda_to_bf16 of out would write. */
__global__ void swiglu_kernel(const float *gate, const float *up, size_t n, float alpha, float beta, float limit,
                              float *out, __nv_bfloat16 *out_bf16) {
  dev_pdl_enter();
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const float v = dev_swiglu_oai(gate[i], up[i], alpha, beta, limit);
    out[i] = v;
    if (out_bf16) out_bf16[i] = __float2bfloat16_rn(v);
  }
}

void cuda_swiglu_oai_copy(cuda_backend *cb, cudaStream_t stream, const float *gate, const float *up, size_t n,
                          float alpha, float beta, float limit, float *out, __nv_bfloat16 *out_bf16) {
  if (n == 0) return;
  dev_launch(swiglu_kernel, elem_blocks(n), ELEM_THREADS, 0, stream, gate, up, n, alpha, beta, limit, out, out_bf16);
  cuda_launched(cb, "swiglu_oai");
}

void cuda_swiglu_oai(m3_backend *be, const float *gate, const float *up, size_t n, float alpha,
                     float beta, float limit, float *out) {
  cuda_backend *cb = cuda_of(be);
  cuda_swiglu_oai_copy(cb, cb->stream, gate, up, n, alpha, beta, limit, out, NULL);
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
