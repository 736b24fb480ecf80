/* norm_elementwise.cu: Gemma RMSNorm (alone and after the residual add), partial NeoX RoPE (alone,
 * fused with the norm, and fused with the norm and the KV cache store of the keys), SwiGLU-OAI and
 * the residual add (shared/spec/m3_text_spec.md §3.1-3.4), each in the CPU's float32 operation
 * order; and the greedy argmax of logits rows. */
#include <math.h>
#include <string.h>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/kv_fp8.cuh"

enum { ELEM_THREADS = 256, ELEM_MAX_BLOCKS = 8192, ROPE_MAX_HALF = 256 };

static unsigned elem_blocks(size_t n) {
  size_t b = (n + ELEM_THREADS - 1) / ELEM_THREADS;
  if (b > (size_t)ELEM_MAX_BLOCKS) b = (size_t)ELEM_MAX_BLOCKS;
  return (unsigned)(b < 1 ? 1 : b);
}

/* Threads per row of the norms: the reduction order follows from it, so rmsnorm and add_rmsnorm
 * take the same count for the same width (the fused op's norm then equals the plain one's). */
static int norm_threads(int n) { return n >= 1024 ? 512 : n >= 256 ? 256 : 64; }

/* Columns [4q, 4q + 4) of a row: a thread's unit of the norms (NORM_QUADS of them per pass).
 * VEC (n % 4 == 0, rows 16-byte aligned) reads and writes them as one float4; otherwise element by
 * element, columns past n read as 0 and never written. Which thread owns which column, and so the
 * reduction order, is the same either way. */
enum { NORM_QUADS = 4 };

__device__ __forceinline__ void load_quad(const float *row, int64_t c, int n, int vec, float v[4]) {
  if (vec) {
    const float4 f = *(const float4 *)(row + c);
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
  } else {
    for (int i = 0; i < 4; i++) v[i] = c + i < n ? row[c + i] : 0.0f;
  }
}

__device__ __forceinline__ void store_quad(float *row, int64_t c, int n, int vec, const float v[4]) {
  if (vec) {
    *(float4 *)(row + c) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    for (int i = 0; i < 4; i++)
      if (c + i < n) row[c + i] = v[i];
  }
}

/* How the norms read their weight row: 4 columns in one load (BF16: 8 bytes, F32: 16 bytes; the
 * row's data aligned to that and n % 4 == 0), or element by element through dev_w. */
enum { GAIN_ANY, GAIN_BF16, GAIN_F32 };

static int gain_kind(const m3_tensor *w, int n) {
  if (w->quant != M3_WQ_NONE || n % 4 != 0) return GAIN_ANY;
  if (w->dtype == M3_DT_BF16 && (uintptr_t)w->data % 8 == 0) return GAIN_BF16;
  if (w->dtype == M3_DT_F32 && (uintptr_t)w->data % 16 == 0) return GAIN_F32;
  return GAIN_ANY;
}

/* Weight columns [c, c + 4) (0 past n). */
__device__ __forceinline__ void load_gain(const cuda_weight &w, int kind, int64_t c, int n, float g[4]) {
  if (kind == GAIN_BF16) {
    const uint2 u = *(const uint2 *)(w.data + 2 * c);
    g[0] = __uint_as_float(u.x << 16), g[1] = __uint_as_float(u.x & 0xffff0000u);
    g[2] = __uint_as_float(u.y << 16), g[3] = __uint_as_float(u.y & 0xffff0000u);
  } else if (kind == GAIN_F32) {
    const float4 f = *(const float4 *)(w.data + 4 * c);
    g[0] = f.x, g[1] = f.y, g[2] = f.z, g[3] = f.w;
  } else {
    for (int i = 0; i < 4; i++) g[i] = c + i < n ? dev_w(w, 0, c + i) : 0.0f;
  }
}

/* Gemma RMSNorm of one row per block: out = x * (1 / sqrt(mean(x^2) + eps)) * (1 + w); ADD first
 * sets x += y (written back) and norms the sums, as the CUDA add then rmsnorm compute them. Thread
 * i owns the quads i, i + blockDim.x, ...; rows up to NORM_QUADS x 4 x blockDim.x columns (8192
 * at 512 threads) stay in registers between the sum of squares and the scaling, and their x, y
 * and weight loads are all issued before the first is used (the old loop took one DRAM round trip
 * per element per thread, twice: 13 us for one 6144-wide row); wider rows take passes and read x
 * again. The squares are summed with explicit fmaf in quad order, then block_sum: the same order
 * for both ops, so the fused one equals add + rmsnorm bit for bit. Each thread writes only the
 * columns it owns, after reading them: out may alias x. */
template <int ADD>
__global__ void __launch_bounds__(512)
    norm_kernel(float *x, const float *y, cuda_weight w, int gain, float eps, int n, int vec, float *out) {
  const int nt = blockDim.x, tid = threadIdx.x;
  float *xr = x + (size_t)blockIdx.x * n, *outr = out + (size_t)blockIdx.x * n;
  const float *yr = ADD ? y + (size_t)blockIdx.x * n : NULL;
  const int64_t nq = ((int64_t)n + 3) / 4, per_pass = (int64_t)NORM_QUADS * nt;
  const int whole = nq <= per_pass;
  float v[NORM_QUADS][4], g[NORM_QUADS][4];
  float ss = 0.0f;
  for (int64_t q0 = 0; q0 < nq; q0 += per_pass) {
#pragma unroll
    for (int j = 0; j < NORM_QUADS; j++) {
      const int64_t q = q0 + (int64_t)j * nt + tid;
      for (int i = 0; i < 4; i++) v[j][i] = g[j][i] = 0.0f;
      if (q >= nq) continue;
      load_quad(xr, 4 * q, n, vec, v[j]);
      if (ADD) {
        float a[4];
        load_quad(yr, 4 * q, n, vec, a);
        for (int i = 0; i < 4; i++) v[j][i] = v[j][i] + a[i];
        store_quad(xr, 4 * q, n, vec, v[j]);
      }
      if (whole) load_gain(w, gain, 4 * q, n, g[j]);
    }
#pragma unroll
    for (int j = 0; j < NORM_QUADS; j++)
      for (int i = 0; i < 4; i++) ss = fmaf(v[j][i], v[j][i], ss); /* 0 past n: adds nothing */
  }
  const float inv = 1.0f / sqrtf(block_sum(ss) / (float)n + eps);
  for (int64_t q0 = 0; q0 < nq; q0 += per_pass) {
#pragma unroll
    for (int j = 0; j < NORM_QUADS; j++) {
      const int64_t q = q0 + (int64_t)j * nt + tid;
      if (q >= nq) continue;
      if (!whole) {
        load_quad(xr, 4 * q, n, vec, v[j]);
        load_gain(w, gain, 4 * q, n, g[j]);
      }
      float o[4];
      for (int i = 0; i < 4; i++) o[i] = __fmul_rn(__fmul_rn(v[j][i], inv), 1.0f + g[j][i]);
      store_quad(outr, 4 * q, n, vec, o);
    }
  }
}

static int aligned16(const void *p) { return (uintptr_t)p % 16 == 0; }

void cuda_rmsnorm(m3_backend *be, const float *x, const m3_tensor *w, float eps, int nrows, int n,
                  float *y) {
  cuda_backend *cb = cuda_of(be);
  if (nrows <= 0 || n <= 0) return;
  const int vec = n % 4 == 0 && aligned16(x) && aligned16(y);
  /* x is only read (ADD = 0): the cast drops const for the shared kernel */
  norm_kernel<0><<<nrows, norm_threads(n), 0, cb->stream>>>((float *)x, NULL, cuda_weight_of(w),
                                                             gain_kind(w, n), eps, n, vec, y);
  cuda_launched(cb, "rmsnorm");
}

void cuda_add_rmsnorm(m3_backend *be, float *x, const float *y, const m3_tensor *w, float eps,
                      int nrows, int n, float *out) {
  cuda_backend *cb = cuda_of(be);
  if (nrows <= 0 || n <= 0) return;
  const int vec = n % 4 == 0 && aligned16(x) && aligned16(y) && aligned16(out);
  norm_kernel<1><<<nrows, norm_threads(n), 0, cb->stream>>>(x, y, cuda_weight_of(w), gain_kind(w, n),
                                                             eps, n, vec, out);
  cuda_launched(cb, "add_rmsnorm");
}

typedef struct {
  float inv_freq[ROPE_MAX_HALF];
} rope_freqs;

/* One block per token: cos/sin of the token's fp32 angles once, then every (head, pair). */
__global__ void rope_kernel(float *x, const int32_t *__restrict__ pos, int nheads, int hd, int half,
                            rope_freqs f) {
  __shared__ float c[ROPE_MAX_HALF], s[ROPE_MAX_HALF];
  const int t = blockIdx.x;
  const float p = (float)pos[t];
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    float angle = __fmul_rn(p, f.inv_freq[i]);
    c[i] = cosf(angle);
    s[i] = sinf(angle);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < nheads * half; e += blockDim.x) {
    int h = e / half, i = e % half;
    float *v = x + ((size_t)t * nheads + h) * hd;
    float a = v[i], b = v[i + half];
    /* x * cos + rotate_half(x) * sin: two rounded products, then the sum (no FMA). */
    v[i] = __fadd_rn(__fmul_rn(a, c[i]), __fmul_rn(-b, s[i]));
    v[i + half] = __fadd_rn(__fmul_rn(b, c[i]), __fmul_rn(a, s[i]));
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
  rope_kernel<<<T, 256, 0, cb->stream>>>(x, pos, nheads, hd, half, f);
  cuda_launched(cb, "rope");
}

enum { NORM_ROPE_WARPS = 8, NORM_ROPE_MAX_HD = 512 };

/* One warp's Gemma RMSNorm of a head vector v [hd] (hd <= NORM_ROPE_MAX_HD) as norm_kernel
 * computes it, into buf [hd] (the warp's row of shared memory) so that each lane can then read
 * the partner of its pair. rmsnorm_rope_kernel and kv_store_rope_kernel both norm through this
 * one function: the same loads, reduction and roundings, so their results are the same bits. */
__device__ __forceinline__ void norm_head_to_shared(const float *__restrict__ v, const cuda_weight &w,
                                                    float eps, int hd, float *buf, int lane) {
  /* a lane's elements and gains in registers, all loaded before the first is used: one round
   * trip, not one per element and another for the weights */
  float e[NORM_ROPE_MAX_HD / 32], gain[NORM_ROPE_MAX_HD / 32];
#pragma unroll
  for (int j = 0; j < NORM_ROPE_MAX_HD / 32; j++) {
    const int i = lane + 32 * j;
    e[j] = i < hd ? v[i] : 0.0f;
    gain[j] = i < hd ? dev_w(w, 0, i) : 0.0f;
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

/* Element i of the normed head in buf after rope_kernel's rotation at position p (i >= 2 * half:
 * not rotated). */
__device__ __forceinline__ float rope_head_elem(const float *buf, int i, int half, float p,
                                                const rope_freqs &f) {
  if (i >= 2 * half) return buf[i];
  const int j = i < half ? i : i - half;
  const float angle = __fmul_rn(p, f.inv_freq[j]);
  const float c = cosf(angle), s = sinf(angle);
  const float a = buf[j], b = buf[j + half];
  return i < half ? __fadd_rn(__fmul_rn(a, c), __fmul_rn(-b, s))
                  : __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

/* One warp per head vector (row r = t * nheads + h of x): norm_head_to_shared, then the rotation
 * written back. One launch and one read and write of x instead of two. */
__global__ void __launch_bounds__(32 * NORM_ROPE_WARPS)
    rmsnorm_rope_kernel(float *x, cuda_weight w, float eps, const int32_t *__restrict__ pos,
                        int rows, int nheads, int hd, int half, rope_freqs f) {
  __shared__ float row_buf[NORM_ROPE_WARPS][NORM_ROPE_MAX_HD];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r = blockIdx.x * NORM_ROPE_WARPS + warp;
  if (r >= rows) return; /* whole warps leave: no block-wide barrier follows */
  float *v = x + (size_t)r * hd;
  float *buf = row_buf[warp];
  norm_head_to_shared(v, w, eps, hd, buf, lane);
  const float p = (float)pos[r / nheads];
  for (int i = lane; i < hd; i += 32) v[i] = rope_head_elem(buf, i, half, p, f);
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
  rmsnorm_rope_kernel<<<(rows + NORM_ROPE_WARPS - 1) / NORM_ROPE_WARPS, 32 * NORM_ROPE_WARPS, 0,
                        cb->stream>>>(x, cuda_weight_of(w), eps, pos, rows, nheads, hd, half, f);
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
 * rope_head_elem: rmsnorm_rope_kernel's bits), into row r of its page: float32 straight from
 * the rotation; fp8 staged in out [dim] and quantized by kv8_store_row, kv_store's code. */
template <int FP8>
__device__ __forceinline__ void store_normed_head(const float *__restrict__ src, const cuda_weight &w,
                                                  float eps, int dim, int half, const rope_freqs &f,
                                                  float p, uint8_t *page, int rows, int r,
                                                  float *buf, float *out, int lane) {
  norm_head_to_shared(src, w, eps, dim, buf, lane);
  if (FP8) {
    for (int i = lane; i < dim; i += 32) out[i] = rope_head_elem(buf, i, half, p, f);
    __syncwarp();
    kv8_store_row(page, rows, dim, r, out, lane);
  } else {
    float *dst = (float *)page + (size_t)r * dim;
    for (int i = lane; i < dim; i += 32) dst[i] = rope_head_elem(buf, i, half, p, f);
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
                           (float)p, dst, bs, slot, buf, out, lane);
    return;
  }
  const int h = row < nkv ? row : row - nkv, kv_row = h * bs + slot;
  const size_t src = ((size_t)t * nkv + h) * hd;
  uint8_t *dst = FP8 ? (uint8_t *)(row < nkv ? kv.k : kv.v) + (size_t)page * a.kv_page_bytes
                     : (uint8_t *)((float *)(row < nkv ? kv.k : kv.v) + (size_t)page * nkv * bs * hd);
  if (row < nkv) {
    store_normed_head<FP8>(a.k + src, a.k_norm, a.eps, hd, a.k_half, fk, (float)p, dst, nkv * bs,
                           kv_row, buf, out, lane);
  } else if (FP8) {
    kv8_store_row(dst, nkv * bs, hd, kv_row, a.v + src, lane);
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
    kv_store_rope_kernel<1><<<blocks, 32 * NORM_ROPE_WARPS, 0, cb->stream>>>(*kv, pos, T, a, fk, fik);
  } else {
    kv_store_rope_kernel<0><<<blocks, 32 * NORM_ROPE_WARPS, 0, cb->stream>>>(*kv, pos, T, a, fk, fik);
  }
  cuda_launched(cb, "kv_store_rope");
}

__global__ void swiglu_kernel(const float *gate, const float *up, size_t n, float alpha, float beta,
                              float limit, float *out) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x)
    out[i] = dev_swiglu_oai(gate[i], up[i], alpha, beta, limit);
}

void cuda_swiglu_oai(m3_backend *be, const float *gate, const float *up, size_t n, float alpha,
                     float beta, float limit, float *out) {
  cuda_backend *cb = cuda_of(be);
  if (n == 0) return;
  swiglu_kernel<<<elem_blocks(n), ELEM_THREADS, 0, cb->stream>>>(gate, up, n, alpha, beta, limit, out);
  cuda_launched(cb, "swiglu_oai");
}

__global__ void add_kernel(float *x, const float *y, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x)
    x[i] += y[i];
}

void cuda_add(m3_backend *be, float *x, const float *y, size_t n) {
  cuda_backend *cb = cuda_of(be);
  if (n == 0) return;
  add_kernel<<<elem_blocks(n), ELEM_THREADS, 0, cb->stream>>>(x, y, n);
  cuda_launched(cb, "add");
}

enum { ARGMAX_THREADS = 1024 };

/* One block per row: each thread keeps the best rank key (score key, then the lower index; NaN as
 * -inf, -0 as +0: block_topk's order) of its strided share, then the warp's best by shuffles and
 * the block's across the warps' in shared memory. A NaN at index 0 ranks as +inf: the sampler's
 * scan starts there and nothing strictly larger moves it, and a +inf elsewhere ties it and loses
 * on the index. */
__global__ void __launch_bounds__(ARGMAX_THREADS)
    argmax_rows_kernel(const float *logits, int vocab, int32_t *out) {
  __shared__ uint64_t warp_best[ARGMAX_THREADS / 32];
  const float *l = logits + (size_t)blockIdx.x * vocab;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t best = 0; /* below every rank key */
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = l[i];
    const uint64_t r = rank_key(score_key(i == 0 && isnan(v) ? INFINITY : v), i);
    best = r > best ? r : best;
  }
  best = warp_max_u64(best);
  if (lane == 0) warp_best[warp] = best;
  __syncthreads();
  if (warp == 0) {
    uint64_t v = lane < (int)(blockDim.x >> 5) ? warp_best[lane] : 0;
    v = warp_max_u64(v);
    if (lane == 0) out[blockIdx.x] = (int32_t)~(uint32_t)(v & 0xffffffffu);
  }
}

m3_status cuda_argmax_rows(m3_backend *be, const float *logits, int nrows, int vocab,
                           int32_t *out_host) {
  cuda_backend *cb = cuda_of(be);
  if (nrows > 0 && vocab > 0) {
    const size_t bytes = (size_t)nrows * sizeof(int32_t);
    int32_t *ids = (int32_t *)cuda_scratch(cb, bytes, "argmax_rows");
    if (ids) {
      argmax_rows_kernel<<<nrows, ARGMAX_THREADS, 0, cb->stream>>>(logits, vocab, ids);
      cuda_launched(cb, "argmax_rows");
      cuda_note(cb, cudaMemcpyAsync(out_host, ids, bytes, cudaMemcpyDeviceToHost, cb->stream),
                "argmax_rows");
    }
  }
  cuda_note(cb, cudaStreamSynchronize(cb->stream), "argmax_rows");
  return cuda_take_error(cb, "argmax_rows");
}
