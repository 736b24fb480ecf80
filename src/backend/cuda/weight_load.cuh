/* weight_load.cuh: how a warp reads a weight row in 16-byte loads, decoded in registers (BF16/F16
 * 8 per load, E4M3 16 per load with its MXFP8 or block scale, F32 4 per load, or one element at a
 * time through dev_w for anything else), and E4M3 weights as tensor-core fragments (mx_accumulate).
 * Shared by the GEMVs and tensor-core kernels of matmul.cu and the grouped expert kernels of
 * moe.cu. Included by .cu files only. */
#ifndef M3_BACKEND_CUDA_WEIGHT_LOAD_CUH
#define M3_BACKEND_CUDA_WEIGHT_LOAD_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"

/* How a kernel reads a row: elements per 16-byte load, or one at a time (WK_ANY). */
enum { WK_F32, WK_BF16, WK_F16, WK_E4M3, WK_ANY };

template <int WK> struct wk_chunk { enum { n = WK == WK_F32 ? 4 : WK == WK_E4M3 ? 16 : WK == WK_ANY ? 1 : 8 }; };

/* 16 bytes of weights, read once per block: through the read-only path and not kept in L1, where
 * they would only evict x. volatile: an asm without it counts as a pure function of p, which the
 * compiler hoists above the caller's bounds check (moe_gemv_kernel's first chunk went ahead of
 * `c < K`, so lanes past a short row read up to 496 bytes beyond its end, past the allocation
 * at a tensor's last rows: compute-sanitizer's invalid reads, an illegal address where the next
 * page is unmapped). */
__device__ __forceinline__ uint4 ld_stream16(const uint8_t *p) {
  uint4 u;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w)
      : "l"(p));
  return u;
}

/* 8 bytes of weights, read the same way (the MXFP8 tensor-core kernel of matmul.cu: 8 columns of
 * one row per lane, so that a quad of lanes covers one 32-column scale block). */
__device__ __forceinline__ uint2 ld_stream8(const uint8_t *p) {
  uint2 u;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(u.x), "=r"(u.y) : "l"(p));
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

/* Bytes 0x7f / 0xff (E4M3 NaN) set bit 7 of their byte: ORed over a row, nonzero means NaN. */
__device__ __forceinline__ uint32_t e4m3_nan_bits(uint32_t b) {
  return ((b & 0x7f7f7f7fu) + 0x01010101u) & 0x80808080u;
}

/* The scale of the 32 E4M3 columns [32 s, 32 s + 32) of row r (1 without one). */
__device__ __forceinline__ float step_scale(const cuda_weight &w, int64_t r, int64_t s) {
  if (w.quant == M3_WQ_MXFP8) return dev_e8m0(w.scale[(size_t)r * w.scale_cols + s]);
  if (w.quant == M3_WQ_FP8_BLOCK)
    return ((const float *)w.scale)[(size_t)(r / w.block_rows) * w.scale_cols + s * 32 / w.block_cols];
  return 1.0f;
}

/* ---- a row in 32-byte steps (matmul.cu's gemv_kernel and gemv_tall_kernel) or 16-byte units
 * (warp_rows_dot: the one-token GEMVs of matmul.cu and moe.cu) ---- */

/* Elements in one 32-byte step of a row of kind WK; WK_ANY rows go one element at a time through
 * dev_w. */
template <int WK> struct wk_step { enum { n = WK == WK_F32 ? 8 : WK == WK_E4M3 ? 32 : WK == WK_ANY ? 0 : 16 }; };

/* Four E4M3 bytes (the lowest first) as float32, before any scale, through the hardware's pair
 * conversion (cvt.rn.f16x2.e4m3x2: exact, subnormals and NaN included, two weights per
 * instruction) and the f16 -> f32 widening, which runs on the FMA pipe. A NaN byte gives a NaN
 * weight, so a row's sum is NaN as on the CPU without a separate test. */
__device__ __forceinline__ void e4m3x4_f32(uint32_t b, float *v) {
  const __half2_raw h01 = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(b & 0xffffu), __NV_E4M3);
  const __half2_raw h23 = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(b >> 16), __NV_E4M3);
  const float2 f01 = __half22float2(__half2(h01)), f23 = __half22float2(__half2(h23));
  v[0] = f01.x, v[1] = f01.y, v[2] = f23.x, v[3] = f23.y;
}

/* Elements [4g, 4g + 4) of the weights at u (a 32-byte step u[0], u[1], or a 16-byte unit u[0]
 * with g below its elements / 4) as float32, before any scale. */
template <int WK>
__device__ __forceinline__ void decode_quad(const uint4 *u, int g, float *v) {
  const uint32_t *p = (const uint32_t *)u;
  if (WK == WK_F32) {
    for (int i = 0; i < 4; i++) v[i] = __uint_as_float(p[4 * g + i]);
  } else if (WK == WK_BF16) {
    for (int i = 0; i < 2; i++) {
      v[2 * i] = __uint_as_float(p[2 * g + i] << 16);
      v[2 * i + 1] = __uint_as_float(p[2 * g + i] & 0xffff0000u);
    }
  } else if (WK == WK_F16) {
    for (int i = 0; i < 2; i++) {
      __half2_raw raw;
      raw.x = (unsigned short)(p[2 * g + i] & 0xffff);
      raw.y = (unsigned short)(p[2 * g + i] >> 16);
      float2 f = __half22float2(__half2(raw));
      v[2 * i] = f.x, v[2 * i + 1] = f.y;
    }
  } else {
    e4m3x4_f32(p[g], v);
  }
}


/* 16-byte units a lane of warp_rows_dot takes per round: U x NW x RW x 16 bytes loaded while the
 * previous round is used (128 at 4 rows: 32 KB a block of 8 warps, 64 KB an SM at 2 blocks). */
enum { WARP_ROWS_U = 2 };

/* Units j0, j0 + 32, ... (U of them) of each of the RW rows of NW matrices, with their scales
 * (E4M3: a unit of 16 columns lies inside one 32-column block); a unit past the row's last,
 * `units`, rereads j0 (never used). */
template <int WK, int NW, int RW, int U>
__device__ __forceinline__ void load_rows_units(const cuda_weight &w0, const cuda_weight &w1,
                                                const int64_t rows[RW], int64_t j0, int64_t units,
                                                uint4 u[U][NW][RW], float sc[U][NW][RW]) {
#pragma unroll
  for (int i = 0; i < U; i++) {
    const int64_t j = j0 + 32 * i < units ? j0 + 32 * i : j0;
#pragma unroll
    for (int m = 0; m < NW; m++) {
      const cuda_weight &w = m ? w1 : w0;
#pragma unroll
      for (int r = 0; r < RW; r++) {
        u[i][m][r] = ld_stream16(w.data + ((size_t)rows[r] * (size_t)w.cols) * (size_t)w.elem_bytes + (size_t)j * 16);
        sc[i][m][r] = WK == WK_E4M3 ? step_scale(w, rows[r], j >> 1) : 1.0f;
      }
    }
  }
}

/* One lane's share of y[m][r] = dot(W_m[rows[r], :], x[0, K)) for the NW matrices w0 (and w1:
 * the same shape, NW = 2) and RW rows each; the caller sums the lanes (warp_sum). x 16-byte
 * aligned, rows 16-byte aligned (gemv_kind's conditions), WK != WK_ANY.
 * A row is read in 16-byte units, lane l taking units l, l + 32, ...: each load instruction of the
 * warp reads 512 contiguous bytes, whole 32-byte sectors. (Two 16-byte loads of a lane's own
 * 32 bytes, as before, each used half of every sector it moved; the weights bypass L1, so each
 * sector came from L2 twice, and the L2-to-SM traffic, not DRAM, held the E4M3 rows at 35-45% of
 * the copy bandwidth: Nsight Compute, 16.1 of 32 bytes used per sector.) The next U units of
 * every row are loaded before the current ones are decoded and multiplied, so a warp's arithmetic
 * overlaps its next round trip. Each unit's sum is scaled (E4M3) and added; columns past the last
 * whole unit go one at a time. */
template <int WK, int NW, int RW>
__device__ __forceinline__ void warp_rows_dot(const cuda_weight &w0, const cuda_weight &w1,
                                              const int64_t rows[RW], const float *__restrict__ x,
                                              float acc[NW][RW]) {
  constexpr int N = wk_chunk<WK>::n, U = WARP_ROWS_U; /* elements per unit */
  const int lane = threadIdx.x & 31;
  const int64_t K = w0.cols, units = K / N;
#pragma unroll
  for (int m = 0; m < NW; m++)
#pragma unroll
    for (int r = 0; r < RW; r++) acc[m][r] = 0.0f;
  uint4 u[U][NW][RW];
  float sc[U][NW][RW];
  if (lane < units) load_rows_units<WK, NW, RW, U>(w0, w1, rows, lane, units, u, sc);
  for (int64_t j0 = lane; j0 < units; j0 += 32 * U) {
    uint4 cur[U][NW][RW];
    float cur_sc[U][NW][RW];
#pragma unroll
    for (int i = 0; i < U; i++)
#pragma unroll
      for (int m = 0; m < NW; m++)
#pragma unroll
        for (int r = 0; r < RW; r++) cur[i][m][r] = u[i][m][r], cur_sc[i][m][r] = sc[i][m][r];
    if (j0 + 32 * U < units) load_rows_units<WK, NW, RW, U>(w0, w1, rows, j0 + 32 * U, units, u, sc);
#pragma unroll
    for (int i = 0; i < U; i++) {
      const int64_t j = j0 + 32 * i;
      if (j >= units) break;
      float part[NW][RW];
#pragma unroll
      for (int m = 0; m < NW; m++)
#pragma unroll
        for (int r = 0; r < RW; r++) part[m][r] = 0.0f;
#pragma unroll
      for (int g = 0; g < N / 4; g++) {
        const float4 xv = __ldg((const float4 *)(x + (size_t)j * N) + g);
#pragma unroll
        for (int m = 0; m < NW; m++)
#pragma unroll
          for (int r = 0; r < RW; r++) {
            float wv[4];
            decode_quad<WK>(&cur[i][m][r], g, wv);
            part[m][r] += wv[0] * xv.x + wv[1] * xv.y + wv[2] * xv.z + wv[3] * xv.w;
          }
      }
#pragma unroll
      for (int m = 0; m < NW; m++)
#pragma unroll
        for (int r = 0; r < RW; r++) acc[m][r] += WK == WK_E4M3 ? part[m][r] * cur_sc[i][m][r] : part[m][r];
    }
  }
  for (int64_t c = units * N + lane; c < K; c += 32) {
    const float xv = x[c];
#pragma unroll
    for (int m = 0; m < NW; m++)
#pragma unroll
      for (int r = 0; r < RW; r++) acc[m][r] += dev_w(m ? w1 : w0, rows[r], c) * xv;
  }
}

/* ---- E4M3 weights on the tensor cores (matmul.cu mx_mma_kernel, moe.cu moe_mx_kernel) ----
 *
 * Up to 64 tokens reading W once is the whole cost, so W is never decoded to memory: each lane
 * loads 8 bytes of a row (ld_stream8), turns them into BF16 in registers (exact: E4M3 has 4
 * significant bits) and feeds mma.sync m16n8k16 (BF16 in, fp32 accumulate) with x as two BF16
 * terms, hi + lo, as the split cuBLASLt path takes it (about float32 accuracy). Fragments follow
 * the PTX ISA ("Matrix Fragments for mma.m16n8k16"): lane = 4 g + q holds A rows g and g + 8 at
 * k = 2q, 2q + 1, 2q + 8, 2q + 9 and B column (token) g at the same k. The k order inside one MMA
 * is free as long as A and B agree, so MMA j (0, 1) of a 32-column block gives lane q the
 * physical columns 8q + 4j .. + 3 (logical k 2q, 2q + 1 -> 8q + 4j, + 1; 2q + 8, 2q + 9 ->
 * 8q + 4j + 2, + 3): a lane's 8 bytes are consecutive, the quad covers exactly one 32-column
 * block, and both MMAs of a block stay inside it. Its scale (MXFP8 e8m0 per row and 32 columns;
 * FP8 block f32 per block_rows x block_cols, a multiple of 32; per channel the same with one
 * column of scales) then multiplies the block's fp32 partial product, as the GEMV does: the BF16
 * operands carry only exact E4M3 values, so FP8-block weights keep float32 scales too. */
enum { MX_WARPS = 8, MX_U = 4, MX_MAX_T = 64 };

/* 2^120 as a pair of BF16: see e4m3x4_bf16. */
enum : uint32_t { BF16X2_2P120 = 0x7b807b80u };

/* Four E4M3 bytes as two BF16 pairs (bytes 0, 1 in p01 and 2, 3 in p23, the lower byte in the lower
 * half), exactly. Each byte's sign, exponent and mantissa go to the same bit places of a BF16
 * (there is no E4M3 -> BF16 conversion instruction on sm_90), which is the value times 2^-120 (E4M3 subnormals become BF16
 * subnormals); one multiplication by 2^120 on the bf16x2 pipe (no rounding: the product is
 * representable) restores the value, normal in BF16. NaN bytes come out finite (480): callers
 * check them with e4m3_nan_bits. */
__device__ __forceinline__ void e4m3x4_bf16(uint32_t b, uint32_t &p01, uint32_t &p23) {
  const uint32_t hi = (b & 0x80808080u) | ((b >> 4) & 0x07070707u), lo = (b << 4) & 0xf0f0f0f0u;
  const uint32_t e01 = __byte_perm(lo, hi, 0x5140), e23 = __byte_perm(lo, hi, 0x7362);
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(p01) : "r"(e01), "r"((uint32_t)BF16X2_2P120));
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(p23) : "r"(e23), "r"((uint32_t)BF16X2_2P120));
}

/* a, b (two floats) as hi + lo BF16 pairs, rounded as matmul.cu's to_bf16_kernel rounds them. */
__device__ __forceinline__ void split_bf16x2(float a, float b, uint32_t &hi, uint32_t &lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  const float2 hf = __bfloat1622float2(h);
  const __nv_bfloat162 l = __floats2bfloat162_rn(a - hf.x, b - hf.y);
  hi = *(const uint32_t *)&h;
  lo = *(const uint32_t *)&l;
}

/* Where a lane's token (B column g of one 8-token tile) comes from: a float32 row f [K], or BF16
 * rows hi and lo [K] already split; all NULL for a token past the last (its B fragment is 0). */
typedef struct {
  const float *f;
  const uint16_t *hi, *lo;
} mx_x;

/* rows[m][h]: the weight row of A-fragment rows g + 8 h of tile m, from r0; rows past the end
 * reread the last one (never stored). */
template <int MT>
__device__ __forceinline__ void mx_rows(const cuda_weight &w, int64_t r0, int64_t rows[MT][2]) {
  const int g = (threadIdx.x & 31) >> 2;
#pragma unroll
  for (int m = 0; m < MT; m++)
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int64_t r = r0 + 16 * m + g + 8 * h;
      rows[m][h] = r < w.rows ? r : w.rows - 1;
    }
}

/* acc[m][n] += W[rows of tile m] . x[tokens of tile n] over the 32-column blocks wk * U + i,
 * i = 0, 1, ... U - 1 in steps of WK * U (this warp's share of K; U x MT x 2 loads of 8 bytes in
 * flight per lane before the first is used), C-fragment layout (lane
 * 4 g + q: rows g and g + 8, tokens 2q and 2q + 1). W: E4M3 [N, K], K % 8 == 0, rows 8-byte
 * aligned; x rows 16-byte aligned. nan_bits[m][h] collects the NaN bytes this lane read. The
 * whole warp calls it (mma.sync). */
template <int NTB, int MT, int PRESPLIT, int U>
__device__ __forceinline__ void mx_accumulate(const cuda_weight &w, const int64_t rows[MT][2],
                                              const mx_x xr[NTB], int wk, int WK,
                                              float acc[MT][NTB][4], uint32_t nan_bits[MT][2]) {
  const int q = threadIdx.x & 3;
  const int64_t K = w.cols, nblk = (K + 31) / 32;
  for (int64_t b0 = (int64_t)wk * U; b0 < nblk; b0 += (int64_t)WK * U) {
    uint2 wv[U][MT][2];
    float sc[U][MT][2];
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int64_t b = b0 + u, c = 32 * b + 8 * q; /* c < K: a whole 8 columns (K % 8 == 0) */
#pragma unroll
      for (int m = 0; m < MT; m++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
          wv[u][m][h] = c < K ? ld_stream8(w.data + (size_t)rows[m][h] * (size_t)K + (size_t)c)
                              : make_uint2(0u, 0u);
          sc[u][m][h] = b < nblk ? step_scale(w, rows[m][h], b) : 0.0f;
        }
    }
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int64_t b = b0 + u, c = 32 * b + 8 * q;
      if (b >= nblk) break; /* the same for the whole warp */
      uint32_t a[MT][2][4]; /* [m][j]: the A fragment of MMA j */
#pragma unroll
      for (int m = 0; m < MT; m++) {
        nan_bits[m][0] |= e4m3_nan_bits(wv[u][m][0].x) | e4m3_nan_bits(wv[u][m][0].y);
        nan_bits[m][1] |= e4m3_nan_bits(wv[u][m][1].x) | e4m3_nan_bits(wv[u][m][1].y);
        e4m3x4_bf16(wv[u][m][0].x, a[m][0][0], a[m][0][2]);
        e4m3x4_bf16(wv[u][m][1].x, a[m][0][1], a[m][0][3]);
        e4m3x4_bf16(wv[u][m][0].y, a[m][1][0], a[m][1][2]);
        e4m3x4_bf16(wv[u][m][1].y, a[m][1][1], a[m][1][3]);
      }
#pragma unroll
      for (int n = 0; n < NTB; n++) {
        uint4 bh = make_uint4(0u, 0u, 0u, 0u), bl = bh; /* columns c .. c + 7 of the lane's token */
        if (c < K) {
          if (PRESPLIT) {
            if (xr[n].hi) {
              bh = __ldg((const uint4 *)(xr[n].hi + c));
              bl = __ldg((const uint4 *)(xr[n].lo + c));
            }
          } else if (xr[n].f) {
            const float4 f0 = __ldg((const float4 *)(xr[n].f + c));
            const float4 f1 = __ldg((const float4 *)(xr[n].f + c) + 1);
            split_bf16x2(f0.x, f0.y, bh.x, bl.x);
            split_bf16x2(f0.z, f0.w, bh.y, bl.y);
            split_bf16x2(f1.x, f1.y, bh.z, bl.z);
            split_bf16x2(f1.z, f1.w, bh.w, bl.w);
          }
        }
#pragma unroll
        for (int m = 0; m < MT; m++) {
          float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          dev_mma16816<0>(part, a[m][0], bh.x, bh.y);
          dev_mma16816<0>(part, a[m][0], bl.x, bl.y);
          dev_mma16816<0>(part, a[m][1], bh.z, bh.w);
          dev_mma16816<0>(part, a[m][1], bl.z, bl.w);
          acc[m][n][0] = fmaf(part[0], sc[u][m][0], acc[m][n][0]);
          acc[m][n][1] = fmaf(part[1], sc[u][m][0], acc[m][n][1]);
          acc[m][n][2] = fmaf(part[2], sc[u][m][1], acc[m][n][2]);
          acc[m][n][3] = fmaf(part[3], sc[u][m][1], acc[m][n][3]);
        }
      }
    }
  }
}

/* A NaN byte anywhere in a row (in the quad's columns of this warp's share of K) makes the row's
 * partial sums NaN, so its outputs are NaN as on the CPU. The whole warp calls it. */
template <int NTB, int MT>
__device__ __forceinline__ void mx_mark_nan(const uint32_t nan_bits[MT][2], float acc[MT][NTB][4]) {
#pragma unroll
  for (int m = 0; m < MT; m++)
#pragma unroll
    for (int h = 0; h < 2; h++) {
      uint32_t bits = nan_bits[m][h];
      bits |= __shfl_xor_sync(0xffffffffu, bits, 1);
      bits |= __shfl_xor_sync(0xffffffffu, bits, 2);
      if (bits)
#pragma unroll
        for (int n = 0; n < NTB; n++) acc[m][n][2 * h] = acc[m][n][2 * h + 1] = __uint_as_float(0x7fc00000u);
    }
}

/* ---- one token of E4M3 weights on the tensor cores (mx1: matmul.cu mx1_set_kernel, moe.cu
 * moe_mx1_kernel) ----
 * The CUDA-core GEMV (warp_rows_dot) spends per E4M3 weight a pair conversion, a widening to
 * float32 and an FMA, plus a float32 of x from L1: at one token it read the E4M3 rows at about
 * half the copy bandwidth where BF16 rows reach 90%. Here the tensor cores do the multiplying and
 * adding. A group is 16 rows of one matrix; each warp walks its share of K 128 columns a step,
 * lane (g, q) taking 16 bytes of row g and of row g + 8 per 64 columns, decoding them to f16 in
 * registers (E4M3 is exact in f16) and feeding mma.sync m16n8k16 (f16 in, f32 accumulate). x is
 * staged once per block in shared memory as two f16 terms, hi + lo, after multiplying by a power
 * of two 2^sx that puts max|x| in [2^14, 2^15): no overflow, about 22 significant bits for an
 * element within 2^-17 of the largest, and an error under 2^-39 of the largest for smaller ones
 * (lo then falls below f16's normal range). Only the B column of one token is needed, so the 8
 * columns of B keep the four 32-column scale blocks of a step apart: in MMA i of half h, lane q
 * supplies A columns of block 2h + q / 2 and B is nonzero only in columns 2 (2h + q / 2) (hi) and
 * + 1 (lo), from the lanes g of that pair. After a step, lane 4 g + q holds block q's hi and lo
 * sums of rows g and g + 8 (D columns 2q, 2q + 1), which its scale multiplies into float32
 * accumulators, as the GEMV scales each block's sum.
 *
 * The weights reach shared memory through two slots of stages filled by the copy engine
 * (cp.async.bulk, one copy per row of a stage; the scales by cp.async) and read by the consumer
 * warps, with several blocks an SM. A stage is one step of every consumer warp: 16 rows x 1024
 * columns (16 KB), each row padded by 64 bytes so that the two rows a phase of eight lanes reads
 * fall in different banks. One producer warp a block waits for a slot's consumers and
 * starts its copies, never for memory itself: a load waited for there queues behind every SM's
 * copies. Measured (H200, 2-layer FD,SM MXFP8 model, decode step): loads into registers (three
 * 2 KB steps a warp, 16 warps an SM) 0.442 ms; these two slots, 3-4 blocks an SM, 0.398-0.405 ms;
 * three slots (two blocks) 0.439 ms; 16 or 4 consumer warps 0.449-0.458 ms; one block an SM with
 * 12 slots 0.590 ms, and with 6 slots and four producer warps 0.436 ms: one producer warp issues
 * a block's copies no faster than about a stage a microsecond, and eight consumer warps an SM
 * leave the decoding's latency exposed, so slots buy less than blocks. */
enum {
  MX1_CONSUMERS = 8, MX1_THREADS = 32 * (MX1_CONSUMERS + 1), MX1_SLOTS = 2,
  MX1_STEP = 128, MX1_XV = 4, MX1_ROW_PAD = 64,
  MX1_STATIC_SMEM = 2048 /* the kernels' static shared memory (barriers, partial sums), rounded up */
};

/* Words of the lo half of the staged x from the start of the hi half: a multiple of 32 words
 * plus 4, so that the active lanes' 16-byte reads of hi and lo fall in different banks. */
__host__ __device__ __forceinline__ int64_t mx1_lo_words(int64_t K) { return (K / 2 + 31) / 32 * 32 + 4; }

/* Shared memory the staged x of K columns takes, rounded up to 128 bytes (the ring follows). */
__host__ __device__ __forceinline__ size_t mx1_stage_bytes(int64_t K) {
  return ((size_t)(mx1_lo_words(K) + K / 2) * 4 + 127) / 128 * 128;
}

/* The shape of a stage (one step of each consumer warp): rows, columns, padded row bytes, scale
 * blocks a row, the scale blocks each producer lane copies, and the slot's bytes (rows, then float
 * scales [rows][blocks]). */
enum {
  MX1_ROWS = 16, MX1_COLS = MX1_STEP * MX1_CONSUMERS, MX1_PITCH = MX1_COLS + MX1_ROW_PAD,
  MX1_BLOCKS = MX1_COLS / 32, MX1_LANE_BLOCKS = MX1_ROWS * MX1_BLOCKS / 32,
  MX1_SLOT = MX1_ROWS * MX1_PITCH + MX1_ROWS * MX1_BLOCKS * 4
};

/* Dynamic shared memory of an mx1 block: the staged x of K columns, then its slots. */
static inline size_t mx1_smem_bytes(int64_t K) { return mx1_stage_bytes(K) + (size_t)MX1_SLOTS * MX1_SLOT; }

/* bytes (a multiple of 16, both ends 16-byte aligned) from global src to shared dst by the copy
 * engine, counted on bar when they land. The weights are read once a step: marked first to leave
 * L2, they leave the activations, the KV cache and the scales there (H200, MXFP8 2-layer decode
 * step 0.421-0.430 -> 0.399-0.408 ms, o_proj alone 22.2 -> 20.4 us; the same hint on the GEMVs'
 * loads changed nothing, and prefetching the stage after next into L2 made every mx1 kernel
 * slower: q_proj 23.7 -> 27.3 us). */
__device__ __forceinline__ void bulk_copy_once(void *dst, const void *src, uint32_t bytes, uint64_t *bar) {
  uint64_t policy;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint "
               "[%0], [%1], %2, [%3], %4;"
               ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(policy)
               : "memory");
}

/* The consumer warps' own barrier (the producers never wait on the consumers this way). */
__device__ __forceinline__ void mx1_consumers_sync(void) { dev_bar_sync_first<32 * MX1_CONSUMERS>(); }

/* A block's slots: MX1_SLOTS of MX1_SLOT bytes from `base`; full[i] completes when
 * slot i's copies have landed (weights and scales), empty[i] when every consumer warp has read it.
 * Stage n of the block (counted over all its groups) takes slot n % MX1_SLOTS in its use
 * n / MX1_SLOTS. */
typedef struct {
  uint8_t *base;
  uint64_t *full, *empty;
} mx1_ring;

/* Sets up the slots after the staged x in the dynamic shared memory smem (K columns), their
 * barriers in bars [2 * MX1_SLOTS]. The whole block calls it; ends with a barrier. */
__device__ __forceinline__ mx1_ring mx1_ring_init(uint8_t *smem, int64_t K, uint64_t *bars) {
  mx1_ring rg = {smem + mx1_stage_bytes(K), bars, bars + MX1_SLOTS};
  if (threadIdx.x == 0) {
    for (int i = 0; i < MX1_SLOTS; i++) mbar_init(&rg.full[i], 32), mbar_init(&rg.empty[i], MX1_CONSUMERS);
    mbar_init_fence();
  }
  __syncthreads();
  return rg;
}

/* 4 bytes from global src to shared dst (both 4-byte aligned), asynchronously (cp.async). */
__device__ __forceinline__ void async_copy4(void *dst, const void *src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}

/* An arrival on bar once this thread's cp.async copies so far have landed, counted among the
 * arrivals bar waits for. */
__device__ __forceinline__ void async_copies_arrive(uint64_t *bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_addr(bar)) : "memory");
}

/* Rows r .. r + 7 of w: half of a 16-row stage (mx1_produce_group). */
typedef struct {
  const cuda_weight *w;
  int64_t r;
} mx1_half;

/* The producer warp's stages of one group: slot rows 0-7 from rows lo.r .. lo.r + 7 of lo.w, rows
 * 8-15 from hi's (one matrix: r and r + 8 of it; the gate and up of one expert: the same 8 rows of
 * each, so that an item computes both halves of its SwiGLU in one pass; same K and kind), rows
 * past a matrix's end rereading its last, from stage counter n on (advanced past the group's
 * stages). Lane i < 16 copies slot row i; each lane copies 16 of the stage's scales (blocks past
 * the last are left as they are: the consumers skip them) and arrives on the slot's full barrier
 * when they land. Nothing here waits for memory (a version that loaded the scales here and waited
 * for them took q_proj 34.7 us against 29.6 with cp.async, one block an SM both). The MXFP8
 * scales by the copy engine too, one bulk copy of 16 or 32 bytes a row beside the row's weights
 * (twice the copies a stage), made the 2-layer MXFP8 decode step 0.374-0.380 -> 0.433-0.439 ms
 * (H200). */
__device__ __forceinline__ void mx1_produce_group(const mx1_ring &rg, uint32_t &n, mx1_half lo, mx1_half hi) {
  const int lane = threadIdx.x & 31, i = lane % MX1_ROWS;
  const mx1_half mine = i < MX1_ROWS / 2 ? lo : hi;
  const cuda_weight &w = *mine.w;
  const int64_t K = w.cols, N = w.rows, nblk = (K + 31) / 32, stages = (K + MX1_COLS - 1) / MX1_COLS;
  const int64_t r = mine.r + i % (MX1_ROWS / 2), row = r < N ? r : N - 1;
  const int b0 = lane / MX1_ROWS * MX1_LANE_BLOCKS; /* this lane's scale blocks of the row in a stage */
  for (int64_t j = 0; j < stages; j++, n++) {
    const int slot = (int)(n % MX1_SLOTS);
    uint8_t *base = rg.base + (size_t)slot * MX1_SLOT, *scl = base + MX1_ROWS * MX1_PITCH;
    mbar_wait(&rg.empty[slot], ((n / MX1_SLOTS) & 1) ^ 1); /* the first use passes */
    const int64_t c0 = j * MX1_COLS, bytes = K - c0 < MX1_COLS ? K - c0 : MX1_COLS, b = j * MX1_BLOCKS + b0;
    if (lane == 0) mbar_expect_bytes(&rg.full[slot], (uint32_t)(MX1_ROWS * bytes));
    __syncwarp();
    if (lane < MX1_ROWS)
      bulk_copy_once(base + lane * MX1_PITCH, w.data + (size_t)row * (size_t)K + c0, (uint32_t)bytes,
                     &rg.full[slot]);
    if (w.quant == M3_WQ_MXFP8) { /* e8m0 bytes [rows][blocks], 4 at a time (nblk % 4 == 0) */
#pragma unroll
      for (int t = 0; t < MX1_LANE_BLOCKS; t += 4)
        if (b + t < nblk)
          async_copy4(scl + i * MX1_BLOCKS + b0 + t, w.scale + (size_t)row * (size_t)w.scale_cols + b + t);
      async_copies_arrive(&rg.full[slot]);
    } else if (w.quant == M3_WQ_FP8_BLOCK) { /* float32 [rows][blocks], each block's own */
      const float *fs = (const float *)w.scale + (size_t)(row / w.block_rows) * (size_t)w.scale_cols;
#pragma unroll
      for (int t = 0; t < MX1_LANE_BLOCKS; t++)
        if (b + t < nblk) async_copy4(scl + (i * MX1_BLOCKS + b0 + t) * 4, fs + (b + t) * 32 / w.block_cols);
      async_copies_arrive(&rg.full[slot]);
    } else {
#pragma unroll
      for (int t = 0; t < MX1_LANE_BLOCKS; t++) ((float *)scl)[i * MX1_BLOCKS + b0 + t] = 1.0f;
      mbar_arrive(&rg.full[slot]);
    }
  }
}

/* The scale of block b of slot row `row` (scales: the slot's, as mx1_produce_group left them), 0
 * past the last block. */
__device__ __forceinline__ float mx1_slot_scale(const cuda_weight &w, const uint8_t *scales, int row, int b,
                                                int64_t global_b) {
  if (global_b >= (w.cols + 31) / 32) return 0.0f;
  const int at = row * MX1_BLOCKS + b;
  return w.quant == M3_WQ_MXFP8 ? dev_e8m0(scales[at]) : ((const float *)scales)[at];
}

/* The whole block stages x [K] (16-byte aligned, K % 16 == 0) into xs: hi pairs from word 0, lo
 * pairs from mx1_lo_words(K), times 2^sx (above). red: MX1_CONSUMERS floats of shared memory.
 * Returns what multiplies the dot products back, 2^-sx. x with a NaN or infinity is staged
 * unscaled, its lo terms 0 where hi is not finite, so that NaN and infinities come out as the
 * CPU's float32 sums give them. The consumer warps call it; ends with their barrier. */
__device__ __forceinline__ float mx1_stage_x(const float *__restrict__ x, int64_t K, uint32_t *xs, float *red) {
  enum { T = 32 * MX1_CONSUMERS };
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float4 *x4 = (const float4 *)x;
  const int64_t n4 = K / 4;
  float m = 0.0f;
  for (int64_t i0 = threadIdx.x; i0 < n4; i0 += MX1_XV * T) {
    float4 v[MX1_XV]; /* all loads of a round in flight at once: one round trip, not MX1_XV */
#pragma unroll
    for (int j = 0; j < MX1_XV; j++) {
      const int64_t i = i0 + (int64_t)j * T;
      v[j] = i < n4 ? __ldg(x4 + i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int j = 0; j < MX1_XV; j++) {
      const float a = fmaxf(fmaxf(fabsf(v[j].x), fabsf(v[j].y)), fmaxf(fabsf(v[j].z), fabsf(v[j].w)));
      m = isfinite(v[j].x) && isfinite(v[j].y) && isfinite(v[j].z) && isfinite(v[j].w) ? fmaxf(m, a) : INFINITY;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) red[warp] = m;
  mx1_consumers_sync();
  m = red[0];
#pragma unroll
  for (int i = 1; i < MX1_CONSUMERS; i++) m = fmaxf(m, red[i]);
  const int sx = dev_f16_exp(m);
  const float up = dev_pow2(sx);
  uint32_t *lo = xs + mx1_lo_words(K);
#pragma unroll MX1_XV
  for (int64_t i = threadIdx.x; i < n4; i += T) { /* x from L1 now */
    const float4 v = __ldg(x4 + i);
    const float a[4] = {v.x * up, v.y * up, v.z * up, v.w * up};
    uint32_t hw[2], lw[2];
#pragma unroll
    for (int p = 0; p < 2; p++) { /* columns 2p, 2p + 1 */
      const __half h0 = __float2half_rn(a[2 * p]), h1 = __float2half_rn(a[2 * p + 1]);
      const float r0 = __half2float(h0), r1 = __half2float(h1);
      const __half l0 = __float2half_rn(isfinite(r0) ? a[2 * p] - r0 : 0.0f);
      const __half l1 = __float2half_rn(isfinite(r1) ? a[2 * p + 1] - r1 : 0.0f);
      hw[p] = (uint32_t)__half_as_ushort(h0) | (uint32_t)__half_as_ushort(h1) << 16;
      lw[p] = (uint32_t)__half_as_ushort(l0) | (uint32_t)__half_as_ushort(l1) << 16;
    }
    ((uint2 *)xs)[i] = make_uint2(hw[0], hw[1]);
    ((uint2 *)lo)[i] = make_uint2(lw[0], lw[1]);
  }
  mx1_consumers_sync();
  return dev_pow2(-sx);
}

/* Bytes 0, 1 (p01) and 2, 3 (p23) of b as f16 pairs, the lower byte in the lower half, through
 * cvt.rn.f16x2.e4m3x2 on each 16-bit half of the register: exact (E4M3 is a subset of f16),
 * subnormals included, NaN bytes NaN. (Moving the bits into f16 places instead, as Marlin does,
 * then testing for NaN bytes, was slower here: H200, 4 experts at one token 123 us against 111.) */
__device__ __forceinline__ void mx1_decode(uint32_t b, uint32_t &p01, uint32_t &p23) {
  asm("{ .reg .b16 lo, hi;\n"
      "  mov.b32 {lo, hi}, %2;\n"
      "  cvt.rn.f16x2.e4m3x2 %0, lo;\n"
      "  cvt.rn.f16x2.e4m3x2 %1, hi; }"
      : "=r"(p01), "=r"(p23)
      : "r"(b));
}

/* One step s of a lane: units u[h][0] (row g) and u[h][1] (row g + 8) of columns 128 s + 64 h +
 * 16 q .., scales sc of those rows for block 4 s + q, into acc0 (row g) and acc1 (row g + 8). xb:
 * the lane's B source in the staged x (hi or lo, column 16 q); take0 / take1: whether the lane
 * supplies B in half 0 / 1. */
__device__ __forceinline__ void mx1_step(const uint4 u[2][2], const float sc[2], const uint32_t *xb,
                                         int64_t s, int64_t K, int take0, int take1, float &acc0,
                                         float &acc1) {
  const int q = threadIdx.x & 3;
  float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int h = 0; h < 2; h++) {
    uint4 b0 = make_uint4(0u, 0u, 0u, 0u), b1 = b0;
    if ((h ? take1 : take0) && MX1_STEP * s + 64 * h + 16 * q < K) {
      const uint4 *p = (const uint4 *)(xb + 64 * s + 32 * h);
      b0 = p[0], b1 = p[1];
    }
    const uint32_t bw[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
    const uint32_t w0[4] = {u[h][0].x, u[h][0].y, u[h][0].z, u[h][0].w};
    const uint32_t w1[4] = {u[h][1].x, u[h][1].y, u[h][1].z, u[h][1].w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
      uint32_t a[4];
      mx1_decode(w0[i], a[0], a[2]);
      mx1_decode(w1[i], a[1], a[3]);
      dev_mma16816<1>(d, a, bw[2 * i], bw[2 * i + 1]);
    }
  }
  acc0 = fmaf(d[0] + d[1], sc[0], acc0);
  acc1 = fmaf(d[2] + d[3], sc[1], acc1);
}

/* Consumer warp `warp`'s part of one group of w (in stage j, step MX1_CONSUMERS * j + warp of K) from
 * stage counter n on (advanced past the group's stages), with the staged x xs: the warps' partial
 * sums meet through part ([MX1_CONSUMERS][16], not the previous group's: callers alternate two) in
 * a fixed order, so a row's bits depend on neither its group nor the launch. Thread t < 16 gets
 * row r + t's sum (before the stage's factor); the others get 0. Ends with the consumers'
 * barrier. */
__device__ __forceinline__ float mx1_consume_group(const mx1_ring &rg, uint32_t &n, const cuda_weight &w,
                                                   const uint32_t *xs, float (*part)[16]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const int64_t K = w.cols, stages = (K + MX1_COLS - 1) / MX1_COLS;
  /* B: lane g supplies hi (g even) or lo (g odd) of block 2h + q / 2's columns in half h */
  const uint32_t *xb = xs + (g & 1 ? mx1_lo_words(K) : 0) + 8 * q;
  const int take0 = g >> 1 == q >> 1, take1 = g >> 1 == 2 + (q >> 1);
  const int row0 = g, row1 = row0 + 8;
  float acc0 = 0.0f, acc1 = 0.0f;
  for (int64_t j = 0; j < stages; j++, n++) {
    const int slot = (int)(n % MX1_SLOTS);
    const uint8_t *base = rg.base + (size_t)slot * MX1_SLOT;
    mbar_wait(&rg.full[slot], (n / MX1_SLOTS) & 1);
    const int64_t s = j * MX1_CONSUMERS + warp;
    uint4 u[2][2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int lc = MX1_STEP * warp + 64 * h + 16 * q;
      const int in = MX1_STEP * s + 64 * h + 16 * q < K; /* past K the slot holds stale bytes */
      u[h][0] = in ? *(const uint4 *)(base + row0 * MX1_PITCH + lc) : make_uint4(0u, 0u, 0u, 0u);
      u[h][1] = in ? *(const uint4 *)(base + row1 * MX1_PITCH + lc) : make_uint4(0u, 0u, 0u, 0u);
    }
    const uint8_t *scl = base + MX1_ROWS * MX1_PITCH;
    const float sc[2] = {mx1_slot_scale(w, scl, row0, 4 * warp + q, 4 * s + q),
                         mx1_slot_scale(w, scl, row1, 4 * warp + q, 4 * s + q)};
    __syncwarp(); /* every lane's reads of the slot done before lane 0 frees it */
    if (lane == 0) mbar_arrive(&rg.empty[slot]);
    mx1_step(u, sc, xb, s, K, take0, take1, acc0, acc1);
  }
  /* the quad's four blocks, in a fixed order */
  acc0 += __shfl_xor_sync(0xffffffffu, acc0, 1);
  acc1 += __shfl_xor_sync(0xffffffffu, acc1, 1);
  acc0 += __shfl_xor_sync(0xffffffffu, acc0, 2);
  acc1 += __shfl_xor_sync(0xffffffffu, acc1, 2);
  if (q == 0) part[warp][g] = acc0, part[warp][g + 8] = acc1;
  mx1_consumers_sync();
  const int t = threadIdx.x;
  float sum = 0.0f;
  if (t < 16)
#pragma unroll
    for (int k = 0; k < MX1_CONSUMERS; k++) sum += part[k][t];
  return sum;
}

/* Blocks for `items` equal runs of mx1 work where at most blocks_max fit at once: the runs as long
 * as the longest would be anyway, over as few blocks as that takes, so that no block ends while
 * others read one item more. Those others' last items run with the SMs half idle (H200, MXFP8
 * q_proj alone, 512 groups of 16 rows on 396 block slots: 26.8 us in runs of 1 or 2, 23.8 us as
 * 256 runs of 2; the q/k/v set's 9856 rows as one matrix, 616 groups, 28.3 -> 28.1 us). */
static inline unsigned mx1_blocks(int64_t items, int64_t blocks_max) {
  const int64_t per = items > blocks_max ? (items + blocks_max - 1) / blocks_max : 1;
  return (unsigned)((items + per - 1) / per);
}

/* 1 when mx_accumulate can read t: E4M3 rows of a multiple of 8 bytes, 8-byte aligned, with no
 * scale or one constant over each 32-column block. */
static inline int mx_weight_fits(const m3_tensor *t) {
  if (t->dtype != M3_DT_F8_E4M3 || t->cols <= 0 || t->cols % 8 != 0 || (uintptr_t)t->data % 8 != 0)
    return 0;
  if (t->quant == M3_WQ_FP8_BLOCK) return t->block_rows > 0 && t->block_cols > 0 && t->block_cols % 32 == 0;
  return t->quant == M3_WQ_MXFP8 || t->quant == M3_WQ_NONE;
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

/* gemv_kind's choice for 32-byte steps (wk_step), less E4M3 with FP8 blocks narrower than a step
 * (a step must sit under one scale). */
static inline int gemv_step_kind(const m3_tensor *t, const float *x) {
  const int kind = gemv_kind(t, x);
  if (kind == WK_E4M3 && t->quant == M3_WQ_FP8_BLOCK && t->block_cols % 32 != 0) return WK_ANY;
  return kind;
}

/* 1 when the mx1 kernels take t with x at one token: 32-byte steps of E4M3 under one scale
 * (gemv_step_kind), K % 16 == 0 (whole units, 16-byte aligned rows for the ring's copies), MXFP8
 * scales in 4-byte pieces (K % 128 == 0, aligned rows), and x staged with the slots beside it in
 * smem_optin bytes of shared memory. */
static inline int mx1_fits(const m3_tensor *t, const float *x, int smem_optin) {
  if (gemv_step_kind(t, x) != WK_E4M3 || t->cols % 16 != 0 ||
      mx1_smem_bytes(t->cols) + MX1_STATIC_SMEM > (size_t)smem_optin)
    return 0;
  return t->quant != M3_WQ_MXFP8 || (t->cols % 128 == 0 && (uintptr_t)t->scale % 4 == 0);
}

#endif
