/* kv_fp8.cuh: the fp8 KV cache as the CUDA kernels read and write it (layout and rounding rules
 * in backend/backend.h: a page holds float32 scales [rows], then E4M3 bytes [rows, dim]). Kernels
 * read the bytes themselves, 4 values per 32-bit load (dim is a multiple of 4, so every row and
 * the byte area start 4-aligned), and decode them in registers; kv_store and kv_store_rope write
 * rows through kv8_store_row. Included by .cu files only. */
#ifndef M3_BACKEND_CUDA_KV_FP8_CUH
#define M3_BACKEND_CUDA_KV_FP8_CUH

#include <stdint.h>

#include "backend/cuda/cuda_internal.h"

/* Rows r0.. of one page of an fp8 pool: their scales and their bytes. */
typedef struct {
  const float *scale;
  const uint8_t *q;
} kv8_rows;

/* page_bytes: m3_kv_pool_page_bytes(M3_KV_FP8, rows, dim), computed on the host. */
__device__ __forceinline__ kv8_rows kv8_page_rows(const void *pool, size_t page_bytes, int32_t page,
                                                  int rows, int dim, int r0) {
  const uint8_t *base = (const uint8_t *)pool + (size_t)page * page_bytes;
  kv8_rows r;
  r.scale = (const float *)base + r0;
  r.q = base + (size_t)rows * sizeof(float) + (size_t)r0 * dim;
  return r;
}

/* The E4M3 value of the low byte of b, exactly: its magnitude bits placed at float32 exponent
 * and mantissa bits 27..20 make 2^-120 times the value (a float32 subnormal for E4M3
 * subnormals), then the exact power-of-two product. The NaN pattern (S.1111.111) is not decoded:
 * kv_store never writes it (a row with a NaN stores zeros and a NaN scale). */
__device__ __forceinline__ float kv8_e4m3(uint32_t b) {
  return __uint_as_float(((b & 0x80u) << 24) | ((b & 0x7fu) << 20)) * 0x1p120f;
}

/* Four stored values of a row, E4M3(byte) * scale (one float32 rounding, as the CPU's). */
__device__ __forceinline__ float4 kv8_dequant4(uint32_t w, float scale) {
  return make_float4(kv8_e4m3(w) * scale, kv8_e4m3(w >> 8) * scale, kv8_e4m3(w >> 16) * scale,
                     kv8_e4m3(w >> 24) * scale);
}

/* float32 (bits u) -> E4M3 rounded to nearest even, saturating at +-448, NaN -> 0x7f, -0 and
 * negative values that round to zero -> 0x80: m3_f32_to_e4m3 of base/dtype.c, bit for bit
 * (checked over all 2^32 inputs when this was written). Integer arithmetic only, so the result
 * does not depend on the device's floating-point modes. */
__host__ __device__ __forceinline__ uint8_t kv8_e4m3_rne(uint32_t u) {
  const uint32_t sign = (u >> 24) & 0x80u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7f;
  if (a >= 0x43e00000u) return (uint8_t)(sign | 0x7eu); /* >= 448, infinity included */
  const int e = a >= 0x00800000u ? (int)(a >> 23) - 127 : -126; /* value = m 2^(e - 23) */
  const uint32_t m = (a & 0x7fffffu) | (a >= 0x00800000u ? 0x800000u : 0u);
  /* The E4M3 grid step is 2^(max(e, -6) - 3): keep m >> s, s = 20 for normals, more below 2^-6. */
  const int s = e >= -6 ? 20 : 14 - e;
  if (s >= 25) return (uint8_t)sign; /* below a quarter of the smallest subnormal step: zero */
  uint32_t r = m >> s;
  const uint32_t rem = m & ((1u << s) - 1u), half = 1u << (s - 1);
  r += rem > half || (rem == half && (r & 1u));
  /* Normals: r in [8, 16] is 1.mmm (16 carries into the exponent); subnormals: r in [0, 8] is the
   * code itself (8 being the smallest normal, 2^-6). */
  return (uint8_t)(sign | ((e >= -6 ? (uint32_t)(e + 6) << 3 : 0u) + r));
}

/* One warp quantizes x [dim] into row r of an fp8 page (backend.h, kv_store): scale = amax / 448,
 * bytes = E4M3(x / scale); a row of zeros, or one whose scale underflows to 0, stores scale 0 and
 * zeros; a row with a NaN or an infinity stores a NaN scale and zeros. The same operations as the
 * CPU's quantize_row (IEEE divisions, kv8_e4m3_rne), so the bytes and scales are the same bits. */
__device__ inline void kv8_store_row(uint8_t *page, int rows, int dim, int r,
                                     const float *__restrict__ x, int lane) {
  float amax = 0.0f;
  bool nan = false;
  for (int d = lane; d < dim; d += 32) {
    const float a = fabsf(x[d]);
    nan |= isnan(a);
    amax = fmaxf(amax, a);
  }
  amax = warp_max(amax);
  nan = __any_sync(0xffffffffu, nan);
  const float s = __fdiv_rn(amax, 448.0f);
  const bool finite = !nan && isfinite(s), zero = !finite || s == 0.0f;
  if (lane == 0) ((float *)page)[r] = finite ? s : __uint_as_float(0x7fc00000u);
  uint8_t *q = page + (size_t)rows * sizeof(float) + (size_t)r * dim;
  for (int d = lane; d < dim; d += 32)
    q[d] = zero ? 0 : kv8_e4m3_rne(__float_as_uint(__fdiv_rn(x[d], s)));
}

#endif
