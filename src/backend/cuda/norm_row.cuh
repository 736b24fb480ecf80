/* norm_row.cuh: one row's Gemma RMSNorm, optionally after the residual add, by one CUDA block
 * (shared/spec/m3_text_spec.md §3.1). It is the body of the rmsnorm and add_rmsnorm ops
 * (norm_elementwise.cu) and of the all-reduce fused with the add and the norm (p2p.cu), which
 * must give the bits of the all-reduce followed by add_rmsnorm. */
#ifndef M3_BACKEND_CUDA_NORM_ROW_CUH
#define M3_BACKEND_CUDA_NORM_ROW_CUH

#include "backend/cuda/cuda_internal.h"

/* Threads per row of the norms: the reduction order follows from it, so rmsnorm and add_rmsnorm
 * take the same count for the same width (the fused op's norm then equals the plain one's). */
static inline int norm_threads(int n) { return n >= 1024 ? 512 : n >= 256 ? 256 : 64; }

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

static inline int gain_kind(const m3_tensor *w, int n) {
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

/* Gemma RMSNorm of one row by the calling block: out = x * (1 / sqrt(mean(x^2) + eps)) * (1 + w);
 * with Addend::add, first x += the addend (written back) and the sums normed, as the CUDA add then
 * rmsnorm compute them. Addend::load(c, a) gives the addend of columns [c, c + 4) (0 past n). Thread
 * i owns the quads i, i + blockDim.x, ...; rows up to NORM_QUADS x 4 x blockDim.x columns (8192
 * at 512 threads) stay in registers between the sum of squares and the scaling, and their x, y
 * and weight loads are all issued before the first is used (the old loop took one DRAM round trip
 * per element per thread, twice: 13 us for one 6144-wide row); wider rows take passes and read x
 * again. The squares are summed with explicit fmaf in quad order, then block_sum: the same order
 * for both ops, so the fused one equals add + rmsnorm bit for bit. Each thread writes only the
 * columns it owns, after reading them: out may alias x. */
template <class Addend>
__device__ __forceinline__ void norm_row(float *xr, const Addend &y, const cuda_weight &w, int gain,
                                         float eps, int n, int vec, float *outr) {
  const int nt = blockDim.x, tid = threadIdx.x;
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
      if (Addend::add) {
        float a[4];
        y.load(4 * q, a);
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

#endif
