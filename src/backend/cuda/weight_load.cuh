/* weight_load.cuh: how a warp reads a weight row in 16-byte loads, decoded in registers (BF16/F16
 * 8 per load, E4M3 16 per load with its MXFP8 or block scale, F32 4 per load, or one element at a
 * time through dev_w for anything else). Shared by the GEMV of matmul.cu and the grouped expert
 * GEMV of moe.cu. Included by .cu files only. */
#ifndef M3_BACKEND_CUDA_WEIGHT_LOAD_CUH
#define M3_BACKEND_CUDA_WEIGHT_LOAD_CUH

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "backend/cuda/cuda_internal.h"

/* How a kernel reads a row: elements per 16-byte load, or one at a time (WK_ANY). */
enum { WK_F32, WK_BF16, WK_F16, WK_E4M3, WK_ANY };

template <int WK> struct wk_chunk { enum { n = WK == WK_F32 ? 4 : WK == WK_E4M3 ? 16 : WK == WK_ANY ? 1 : 8 }; };

/* 16 bytes of weights, read once per block: through the read-only path and not kept in L1, where
 * they would only evict x. */
__device__ __forceinline__ uint4 ld_stream16(const uint8_t *p) {
  uint4 u;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w)
      : "l"(p));
  return u;
}

/* Columns [c, c + n) of row r as float32 with the scale applied; c is a multiple of n. */
template <int WK>
__device__ __forceinline__ void load_chunk(const cuda_weight &w, int64_t r, int64_t c, float *v) {
  const uint8_t *row = w.data + (size_t)r * (size_t)w.cols * (size_t)w.elem_bytes;
  if (WK == WK_ANY) {
    v[0] = dev_w(w, r, c);
  } else if (WK == WK_F32) {
    uint4 u = ld_stream16(row + (size_t)c * 4);
    v[0] = __uint_as_float(u.x), v[1] = __uint_as_float(u.y), v[2] = __uint_as_float(u.z);
    v[3] = __uint_as_float(u.w);
  } else if (WK == WK_BF16) {
    uint4 u = ld_stream16(row + (size_t)c * 2);
    uint32_t p[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
      v[2 * i] = __uint_as_float(p[i] << 16);
      v[2 * i + 1] = __uint_as_float(p[i] & 0xffff0000u);
    }
  } else if (WK == WK_F16) {
    uint4 u = ld_stream16(row + (size_t)c * 2);
    uint32_t p[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
      __half2_raw raw;
      raw.x = (unsigned short)(p[i] & 0xffff);
      raw.y = (unsigned short)(p[i] >> 16);
      float2 f = __half22float2(__half2(raw));
      v[2 * i] = f.x, v[2 * i + 1] = f.y;
    }
  } else { /* E4M3, exact through f16 (one cvt per pair), then the block's scale */
    uint4 u = ld_stream16(row + c);
    uint32_t p[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
#pragma unroll
      for (int j = 0; j < 2; j++) {
        __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(
            (__nv_fp8x2_storage_t)((p[i] >> (16 * j)) & 0xffff), __NV_E4M3);
        float2 f = __half22float2(__half2(raw));
        v[4 * i + 2 * j] = f.x, v[4 * i + 2 * j + 1] = f.y;
      }
    }
    float s = 1.0f;
    if (w.quant == M3_WQ_MXFP8) s = dev_e8m0(w.scale[(size_t)r * w.scale_cols + c / 32]);
    if (w.quant == M3_WQ_FP8_BLOCK)
      s = ((const float *)w.scale)[(size_t)(r / w.block_rows) * w.scale_cols + c / w.block_cols];
    if (w.quant != M3_WQ_NONE)
#pragma unroll
      for (int i = 0; i < 16; i++) v[i] *= s;
  }
}

/* The kernel variant that reads w with x: 16-byte loads need aligned rows and x. */
static inline int gemv_kind(const m3_tensor *t, const float *x) {
  const int64_t K = t->cols;
  if ((uintptr_t)t->data % 16 != 0 || (uintptr_t)x % 16 != 0 || K % 4 != 0) return WK_ANY;
  if (t->quant == M3_WQ_NONE) {
    if (t->dtype == M3_DT_F32) return WK_F32;
    if (t->dtype == M3_DT_BF16 && K % 8 == 0) return WK_BF16;
    if (t->dtype == M3_DT_F16 && K % 8 == 0) return WK_F16;
    if (t->dtype == M3_DT_F8_E4M3 && K % 16 == 0) return WK_E4M3;
    return WK_ANY;
  }
  if (t->dtype != M3_DT_F8_E4M3 || K % 16 != 0) return WK_ANY;
  if (t->quant == M3_WQ_FP8_BLOCK && (t->block_cols <= 0 || t->block_cols % 16 != 0)) return WK_ANY;
  return WK_E4M3;
}

#endif
