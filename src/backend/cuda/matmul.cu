/* matmul.cu: y = x . W^T for weights of any stored dtype, and the embedding lookup.
 *
 * T <= GEMV_MAX_T (decode) is bound by reading W once: one warp per weight row, 16-byte loads,
 * decoded in registers (BF16/F16 8 per load, E4M3 16 per load with its MXFP8 or block scale) and
 * applied to every token, float32 accumulation: the same math as the CPU to rounding.
 * Larger T goes through cuBLASLt: F32 weights as a pure float32 SGEMM; all others with x rounded to
 * BF16, W as stored (BF16) or decoded to BF16 in chunks of rows (F16, MXFP8, FP8 block), float32
 * accumulation and output. A tiled CUDA-core kernel that decodes W tile by tile covers what
 * cuBLASLt declines. */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <math.h>

#include "backend/cuda/cuda_ops.h"

enum { GEMV_MAX_T = 8, GEMV_ROWS_PER_BLOCK = 8 };

/* How the GEMV kernel reads a row: elements per 16-byte load, or one at a time (WK_ANY). */
enum { WK_F32, WK_BF16, WK_F16, WK_E4M3, WK_ANY };

template <int WK> struct wk_chunk { enum { n = WK == WK_F32 ? 4 : WK == WK_E4M3 ? 16 : WK == WK_ANY ? 1 : 8 }; };

/* Columns [c, c + n) of row r as float32 with the scale applied; c is a multiple of n. */
template <int WK>
__device__ __forceinline__ void load_chunk(const cuda_weight &w, int64_t r, int64_t c, float *v) {
  const uint8_t *row = w.data + (size_t)r * (size_t)w.cols * (size_t)w.elem_bytes;
  if (WK == WK_ANY) {
    v[0] = dev_w(w, r, c);
  } else if (WK == WK_F32) {
    float4 f = *(const float4 *)(row + (size_t)c * 4);
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
  } else if (WK == WK_BF16) {
    uint4 u = *(const uint4 *)(row + (size_t)c * 2);
    uint32_t p[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
      v[2 * i] = __uint_as_float(p[i] << 16);
      v[2 * i + 1] = __uint_as_float(p[i] & 0xffff0000u);
    }
  } else if (WK == WK_F16) {
    uint4 u = *(const uint4 *)(row + (size_t)c * 2);
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
    uint4 u = *(const uint4 *)(row + c);
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

/* y[t, r] = dot(W[r, :], x[t, :]) for t < T <= NT: one warp per row. */
template <int NT, int WK>
__global__ void __launch_bounds__(32 * GEMV_ROWS_PER_BLOCK)
    gemv_kernel(cuda_weight w, const float *__restrict__ x, int T, float *__restrict__ y) {
  constexpr int CH = wk_chunk<WK>::n;
  const int lane = threadIdx.x & 31;
  const int64_t r = (int64_t)blockIdx.x * GEMV_ROWS_PER_BLOCK + (threadIdx.x >> 5);
  if (r >= w.rows) return;
  const int64_t K = w.cols;
  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; t++) acc[t] = 0.0f;
#pragma unroll 2
  for (int64_t c = (int64_t)lane * CH; c < K; c += 32 * CH) {
    float wv[CH];
    load_chunk<WK>(w, r, c, wv);
#pragma unroll
    for (int t = 0; t < NT; t++) {
      if (t >= T) break;
      const float *xt = x + (size_t)t * K + c;
      if (CH == 1) {
        acc[t] += wv[0] * xt[0];
      } else {
#pragma unroll
        for (int q = 0; q < CH / 4; q++) {
          float4 xv = *(const float4 *)(xt + 4 * q);
          acc[t] += wv[4 * q] * xv.x + wv[4 * q + 1] * xv.y + wv[4 * q + 2] * xv.z +
                    wv[4 * q + 3] * xv.w;
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < NT; t++) {
    float s = warp_sum(acc[t]);
    if (lane == 0 && t < T) y[(size_t)t * w.rows + r] = s;
  }
}

/* The kernel variant that reads w with x: 16-byte loads need aligned rows and x. */
static int gemv_kind(const m3_tensor *t, const float *x) {
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

template <int NT>
static void launch_gemv_nt(cuda_backend *cb, int kind, const cuda_weight &w, const float *x, int T,
                           float *y) {
  dim3 grid((unsigned)((w.rows + GEMV_ROWS_PER_BLOCK - 1) / GEMV_ROWS_PER_BLOCK));
  dim3 block(32 * GEMV_ROWS_PER_BLOCK);
  switch (kind) {
    case WK_F32: gemv_kernel<NT, WK_F32><<<grid, block, 0, cb->stream>>>(w, x, T, y); break;
    case WK_BF16: gemv_kernel<NT, WK_BF16><<<grid, block, 0, cb->stream>>>(w, x, T, y); break;
    case WK_F16: gemv_kernel<NT, WK_F16><<<grid, block, 0, cb->stream>>>(w, x, T, y); break;
    case WK_E4M3: gemv_kernel<NT, WK_E4M3><<<grid, block, 0, cb->stream>>>(w, x, T, y); break;
    default: gemv_kernel<NT, WK_ANY><<<grid, block, 0, cb->stream>>>(w, x, T, y); break;
  }
}

static void launch_gemv(cuda_backend *cb, const m3_tensor *t, const float *x, int T, float *y) {
  cuda_weight w = cuda_weight_of(t);
  int kind = gemv_kind(t, x);
  if (T == 1) launch_gemv_nt<1>(cb, kind, w, x, T, y);
  else if (T == 2) launch_gemv_nt<2>(cb, kind, w, x, T, y);
  else if (T <= 4) launch_gemv_nt<4>(cb, kind, w, x, T, y);
  else launch_gemv_nt<8>(cb, kind, w, x, T, y);
  cuda_launched(cb, "matmul (gemv)");
}

/* ---- tiled GEMM for any weight: 64 weight rows x 64 tokens per block, 16 columns a step ---- */

enum { TILE = 64, TILE_K = 16 };

__global__ void __launch_bounds__(256)
    gemm_tiled_kernel(cuda_weight w, const float *__restrict__ x, int T, float *__restrict__ y) {
  __shared__ float ws[TILE_K][TILE + 1], xs[TILE_K][TILE + 1];
  const int64_t N = w.rows, K = w.cols;
  const int64_t n0 = (int64_t)blockIdx.x * TILE;
  const int t0 = blockIdx.y * TILE;
  const int tid = threadIdx.x, tr = tid % 16, tt = tid / 16;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += TILE_K) {
    for (int e = tid; e < TILE * TILE_K; e += 256) {
      int rr = e / TILE_K, kk = e % TILE_K;
      int64_t kc = k0 + kk;
      ws[kk][rr] = n0 + rr < N && kc < K ? dev_w(w, n0 + rr, kc) : 0.0f;
      xs[kk][rr] = t0 + rr < T && kc < K ? x[(size_t)(t0 + rr) * K + kc] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < TILE_K; kk++) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; i++) a[i] = ws[kk][tr + 16 * i], b[i] = xs[kk][tt + 16 * i];
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 4; j++) {
      int64_t n = n0 + tr + 16 * i;
      int t = t0 + tt + 16 * j;
      if (n < N && t < T) y[(size_t)t * N + n] = acc[i][j];
    }
}

static void launch_tiled(cuda_backend *cb, const m3_tensor *t, const float *x, int T, float *y) {
  dim3 grid((unsigned)((t->rows + TILE - 1) / TILE), (unsigned)((T + TILE - 1) / TILE));
  gemm_tiled_kernel<<<grid, 256, 0, cb->stream>>>(cuda_weight_of(t), x, T, y);
  cuda_launched(cb, "matmul (tiled)");
}

/* ---- cuBLASLt ---- */

enum { DEQUANT_CHUNK_BYTES = 64 << 20 };

__global__ void to_bf16_kernel(const float *__restrict__ x, size_t n, __nv_bfloat16 *__restrict__ out) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    out[i] = __float2bfloat16_rn(x[i]);
}

/* Rows [r0, r0 + nrows) of w decoded (scale applied) and rounded to BF16: exact for E4M3 with
 * MXFP8 scales, one rounding for F16 and FP8-block values. */
__global__ void dequant_bf16_kernel(cuda_weight w, int64_t r0, int64_t nrows, __nv_bfloat16 *__restrict__ out) {
  const size_t n = (size_t)nrows * (size_t)w.cols;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    out[i] = __float2bfloat16_rn(dev_w(w, r0 + (int64_t)(i / (size_t)w.cols), (int64_t)(i % (size_t)w.cols)));
}

static unsigned grid_for(size_t n) {
  size_t b = (n + 255) / 256;
  return (unsigned)(b > 8192 ? 8192 : b < 1 ? 1 : b);
}

/* y[t * ldy + r] = dot(A[r, :], B[t, :]) for r < rows, t < T through cuBLASLt, float32
 * accumulation and output; A and B row-major of K columns in type ab. Column-major, that is
 * y[rows, T] (ld ldy) = A^T[rows, K] B[K, T]. Returns 0 when cuBLASLt finds no algorithm or
 * fails (nothing ran). */
static int lt_gemm(cuda_backend *cb, cudaDataType ab, const void *A, uint64_t rows, uint64_t K,
                   const void *B, int T, float *y, uint64_t ldy) {
  cublasLtMatmulDesc_t op = NULL;
  cublasLtMatrixLayout_t la = NULL, lb = NULL, lc = NULL;
  cublasLtMatmulPreference_t pref = NULL;
  cublasLtMatmulHeuristicResult_t heur;
  int found = 0, done = 0;
  cublasOperation_t trans = CUBLAS_OP_T;
  if (cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &trans, sizeof trans) ==
          CUBLAS_STATUS_SUCCESS &&
      cublasLtMatrixLayoutCreate(&la, ab, K, rows, (int64_t)K) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatrixLayoutCreate(&lb, ab, K, (uint64_t)T, (int64_t)K) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, rows, (uint64_t)T, (int64_t)ldy) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                           &cb->lt_workspace_bytes,
                                           sizeof cb->lt_workspace_bytes) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulAlgoGetHeuristic(cb->lt, op, la, lb, lc, lc, pref, 1, &heur, &found) ==
          CUBLAS_STATUS_SUCCESS &&
      found > 0) {
    const float alpha = 1.0f, beta = 0.0f;
    cublasStatus_t s = cublasLtMatmul(cb->lt, op, &alpha, A, la, B, lb, &beta, y, lc, y, lc,
                                      &heur.algo, cb->lt_workspace, cb->lt_workspace_bytes,
                                      cb->stream);
    done = s == CUBLAS_STATUS_SUCCESS;
  }
  if (pref) cublasLtMatmulPreferenceDestroy(pref);
  if (lc) cublasLtMatrixLayoutDestroy(lc);
  if (lb) cublasLtMatrixLayoutDestroy(lb);
  if (la) cublasLtMatrixLayoutDestroy(la);
  if (op) cublasLtMatmulDescDestroy(op);
  return done;
}

/* y = x W^T on the tensor cores: F32 weights as a float32 SGEMM; every other weight with x
 * rounded to BF16 and W as stored (BF16) or decoded to BF16 a chunk of rows at a time. Returns 0
 * when cuBLASLt declines, before anything was written to y. */
static int lt_matmul(cuda_backend *cb, const m3_tensor *t, const float *x, int T, float *y) {
  const uint64_t N = (uint64_t)t->rows, K = (uint64_t)t->cols;
  if (t->quant == M3_WQ_NONE && t->dtype == M3_DT_F32)
    return lt_gemm(cb, CUDA_R_32F, t->data, N, K, x, T, y, N);
  const int stored_bf16 = t->quant == M3_WQ_NONE && t->dtype == M3_DT_BF16;
  uint64_t chunk = stored_bf16 ? N : DEQUANT_CHUNK_BYTES / (K * 2);
  chunk = chunk < 64 ? 64 : chunk > N ? N : chunk;
  const size_t xbytes = ((size_t)T * K * 2 + 255) / 256 * 256;
  uint8_t *scratch = (uint8_t *)cuda_scratch(cb, xbytes + (stored_bf16 ? 0 : chunk * K * 2), "matmul");
  if (!scratch) return 0;
  __nv_bfloat16 *xb = (__nv_bfloat16 *)scratch, *wb = (__nv_bfloat16 *)(scratch + xbytes);
  to_bf16_kernel<<<grid_for((size_t)T * K), 256, 0, cb->stream>>>(x, (size_t)T * K, xb);
  cuda_launched(cb, "matmul (bf16 activations)");
  if (stored_bf16) return lt_gemm(cb, CUDA_R_16BF, t->data, N, K, xb, T, y, N);
  const cuda_weight w = cuda_weight_of(t);
  for (uint64_t r0 = 0; r0 < N; r0 += chunk) {
    uint64_t nr = N - r0 < chunk ? N - r0 : chunk;
    dequant_bf16_kernel<<<grid_for(nr * K), 256, 0, cb->stream>>>(w, (int64_t)r0, (int64_t)nr, wb);
    cuda_launched(cb, "matmul (weights to bf16)");
    if (!lt_gemm(cb, CUDA_R_16BF, wb, nr, K, xb, T, y + r0, N)) {
      if (r0 == 0) return 0;
      cuda_note(cb, cudaErrorNotSupported, "matmul (cuBLASLt declined a later chunk of rows)");
      return 1;
    }
  }
  return 1;
}

void cuda_matmul(m3_backend *be, const m3_tensor *w, const float *x, int T, float *y) {
  cuda_backend *cb = cuda_of(be);
  if (T <= 0 || w->rows <= 0) return;
  if (T <= GEMV_MAX_T) launch_gemv(cb, w, x, T, y);
  else if (!lt_matmul(cb, w, x, T, y)) launch_tiled(cb, w, x, T, y);
}

/* ---- embedding ---- */

__global__ void embed_kernel(cuda_weight table, const int32_t *__restrict__ ids, float *__restrict__ out) {
  const int t = blockIdx.x;
  const int64_t cols = table.cols;
  const int32_t id = ids[t];
  float *row = out + (size_t)t * cols;
  /* The model validates ids; an invalid one shows up as NaN rather than reading past the table. */
  const int valid = id >= 0 && id < table.rows;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
    row[c] = valid ? dev_w(table, id, c) : __uint_as_float(0x7fc00000u);
}

void cuda_embed(m3_backend *be, const m3_tensor *table, const int32_t *ids, int T, float *out) {
  cuda_backend *cb = cuda_of(be);
  if (T <= 0) return;
  embed_kernel<<<T, 256, 0, cb->stream>>>(cuda_weight_of(table), ids, out);
  cuda_launched(cb, "embed");
}
