/* kv_fp8.cuh: the fp8 KV cache as the CUDA kernels read and write it (layout and rounding rules
 * in backend/backend.h: a page holds float32 scales [rows], then E4M3 bytes [rows, dim]). Kernels
 * read the bytes themselves, 4 values per 32-bit load (dim is a multiple of 4, so every row and
 * the byte area start 4-aligned), and decode them in registers; kv_store and kv_store_rope write
 * rows through kv8_store_row, K rows rotated (kv8_rotate), and attention rotates its queries to
 * match (kv8_rotate_query). Included by .cu files only. */
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

/* Rows are handled a slab of 256 values at a time, 8 a lane: m3_kv_key_block never exceeds it. */
enum { KV8_SLAB = M3_KV_KEY_BLOCK_MAX, KV8_SLAB_NJ = KV8_SLAB / 32 };

/* m3_kv_key_block (backend.h) on the device. */
__device__ __forceinline__ int kv8_key_block(int n) {
  const int b = n & -n;
  return b < KV8_SLAB ? b : KV8_SLAB;
}

/* backend.h m3_kv_rotate_key on n values of a row held by a warp, v[j] = value lane + 32 j (0
 * past n), in blocks of b: spans under 32 pair lanes (lane ^ span), wider ones registers
 * (j ^ span / 32), in the order of the CPU's butterflies, each pair as a + b below and a - b
 * above, so the bits are the same. Every lane of the warp calls it. */
__device__ __forceinline__ void kv8_rotate(float (&v)[KV8_SLAB_NJ], int n, int b, int lane) {
  for (int span = 1; span < b && span < 32; span <<= 1) {
    const bool upper = lane & span;
#pragma unroll
    for (int j = 0; j < KV8_SLAB_NJ; j++)
      if (32 * j < n) { /* the same for the whole warp */
        const float other = __shfl_xor_sync(0xffffffffu, v[j], span);
        v[j] = upper ? other - v[j] : v[j] + other;
      }
  }
#pragma unroll
  for (int s = 1; s < KV8_SLAB_NJ; s <<= 1)
    if (32 * s < b)
#pragma unroll
      for (int j = 0; j < KV8_SLAB_NJ; j++)
        if (!(j & s)) {
          const float lo = v[j], hi = v[j + s];
          v[j] = lo + hi;
          v[j + s] = lo - hi;
        }
}

/* A query row of hd <= KV8_SLAB values as attention scores it against an fp8 cache's rotated
 * keys (backend.h): rotated, then times 1 / B, a power of two (exact). */
__device__ __forceinline__ void kv8_rotate_query(float (&v)[KV8_SLAB_NJ], int hd, int lane) {
  const int b = kv8_key_block(hd);
  kv8_rotate(v, hd, b, lane);
  const float inv = 1.0f / (float)b;
#pragma unroll
  for (int j = 0; j < KV8_SLAB_NJ; j++) v[j] *= inv;
}

/* kv8_rotate_query on a row held as float4 chunks, lane l holding values 4 (l % (hd / 4)) .. + 3,
 * hd a power of two up to 128 (so a row is hd / 4 consecutive lanes of one warp): spans 1 and 2
 * within the chunk, wider ones across lanes, in the CPU's order with the same pairs. */
__device__ __forceinline__ float4 kv8_rotate_query4(float4 q, int hd, int lane) {
  const float a = q.x + q.y, b = q.x - q.y, c = q.z + q.w, d = q.z - q.w; /* span 1 */
  float4 v = make_float4(a + c, b + d, a - c, b - d);                     /* span 2 */
  for (int m = 1; 4 * m < hd; m <<= 1) {                                  /* span 4 m */
    const bool upper = lane & m;
    const float4 o = make_float4(__shfl_xor_sync(0xffffffffu, v.x, m), __shfl_xor_sync(0xffffffffu, v.y, m),
                                 __shfl_xor_sync(0xffffffffu, v.z, m), __shfl_xor_sync(0xffffffffu, v.w, m));
    v = upper ? make_float4(o.x - v.x, o.y - v.y, o.z - v.z, o.w - v.w)
              : make_float4(v.x + o.x, v.y + o.y, v.z + o.z, v.w + o.w);
  }
  const float inv = 1.0f / (float)hd;
  return make_float4(v.x * inv, v.y * inv, v.z * inv, v.w * inv);
}

/* Values [base, base + KV8_SLAB) of x [dim] into v (0 past dim), rotated in blocks of b when
 * b > 1; returns how many there are. */
__device__ __forceinline__ int kv8_load_slab(float (&v)[KV8_SLAB_NJ], const float *__restrict__ x,
                                             int base, int dim, int b, int lane) {
  const int n = dim - base < KV8_SLAB ? dim - base : KV8_SLAB;
#pragma unroll
  for (int j = 0; j < KV8_SLAB_NJ; j++) v[j] = lane + 32 * j < n ? x[base + lane + 32 * j] : 0.0f;
  if (b > 1) kv8_rotate(v, n, b, lane);
  return n;
}

/* One warp quantizes x [dim] into row r of an fp8 page (backend.h, kv_store), a key row rotated
 * first: scale = amax / 448, bytes = E4M3(x / scale); a row of zeros, or one whose scale
 * underflows to 0, stores scale 0 and zeros; a row with a NaN or an infinity stores a NaN scale
 * and zeros. The same operations as the CPU's quantize_row (IEEE divisions, kv8_e4m3_rne), so the
 * bytes and scales are the same bits. A row wider than a slab is loaded (and rotated) twice: for
 * its amax, then for its bytes. */
__device__ inline void kv8_store_row(uint8_t *page, int rows, int dim, int r,
                                     const float *__restrict__ x, bool key, int lane) {
  const int b = key ? kv8_key_block(dim) : 1;
  float v[KV8_SLAB_NJ], amax = 0.0f;
  bool nan = false;
  for (int base = 0; base < dim; base += KV8_SLAB) {
    kv8_load_slab(v, x, base, dim, b, lane);
#pragma unroll
    for (int j = 0; j < KV8_SLAB_NJ; j++) {
      const float a = fabsf(v[j]);
      nan |= isnan(a);
      amax = fmaxf(amax, a);
    }
  }
  amax = warp_max(amax);
  nan = __any_sync(0xffffffffu, nan);
  const float s = __fdiv_rn(amax, 448.0f);
  const bool finite = !nan && isfinite(s), zero = !finite || s == 0.0f;
  if (lane == 0) ((float *)page)[r] = finite ? s : __uint_as_float(0x7fc00000u);
  uint8_t *q = page + (size_t)rows * sizeof(float) + (size_t)r * dim;
  for (int base = 0; base < dim; base += KV8_SLAB) {
    const int n = dim > KV8_SLAB ? kv8_load_slab(v, x, base, dim, b, lane) : dim;
#pragma unroll
    for (int j = 0; j < KV8_SLAB_NJ; j++)
      if (lane + 32 * j < n)
        q[base + lane + 32 * j] = zero ? 0 : kv8_e4m3_rne(__float_as_uint(__fdiv_rn(v[j], s)));
  }
}

#endif
