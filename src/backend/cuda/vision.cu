/* vision.cu: the vision tower's ops (backend.h m3_vision_ops; m3_vision_chat_spec.md §4): LayerNorm
 * with bias, bias add, exact GELU, axial 3-D RoPE and non-causal attention, all in float32, each
 * in the CPU backend's operation order where it has one (vision_ops.c). */
#include <math.h>

#include "backend/cuda/cuda_ops.h"

enum { VIS_THREADS = 256, VIS_MAX_BLOCKS = 8192, ROPE3_MAX_ANGLES = 3 * 128 };

static unsigned vis_blocks(size_t n) {
  size_t b = (n + VIS_THREADS - 1) / VIS_THREADS;
  if (b > (size_t)VIS_MAX_BLOCKS) b = (size_t)VIS_MAX_BLOCKS;
  return (unsigned)(b < 1 ? 1 : b);
}

__global__ void vis_fill_nan_kernel(float *x, size_t n) {
  dev_pdl_enter();
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x)
    x[i] = __uint_as_float(0x7fc00000u);
}

/* The CPU's answer to arguments it cannot compute (vision_ops.c poison): NaN everywhere. */
static void fill_nan(cuda_backend *cb, float *x, size_t n, const char *op) {
  if (n == 0) return;
  dev_launch(vis_fill_nan_kernel, vis_blocks(n), VIS_THREADS, 0, cb->stream, x, n);
  cuda_launched(cb, op);
}

/* ---- LayerNorm ---- */

/* One block per row. Two passes over the row (mean, then the mean of squared deviations: the
 * biased variance without the cancellation of E[x^2] - mean^2), then
 * y = (x - mean) * inv * w + b rounded step by step as the CPU does. x and y may alias: each thread
 * writes only the elements it read itself, after both reductions. */
__global__ void layernorm_kernel(const float *x, cuda_weight w, cuda_weight b, float eps, int n,
                                 float *y) {
  dev_pdl_enter();
  const float *xr = x + (size_t)blockIdx.x * n;
  float *yr = y + (size_t)blockIdx.x * n;
  float s = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += xr[i];
  const float mean = block_sum(s) / (float)n;
  float sq = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float d = xr[i] - mean;
    sq += d * d;
  }
  const float inv = 1.0f / sqrtf(block_sum(sq) / (float)n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    yr[i] = __fadd_rn(__fmul_rn(__fmul_rn(__fsub_rn(xr[i], mean), inv), dev_w(w, 0, i)),
                      dev_w(b, 0, i));
}

static void cuda_layernorm(m3_backend *be, const float *x, const m3_tensor *w, const m3_tensor *b,
                           float eps, int nrows, int n, float *y) {
  cuda_backend *cb = cuda_of(be);
  if (nrows <= 0 || n <= 0) return;
  const int threads = n >= 1024 ? 512 : n >= 256 ? 256 : 64;
  dev_launch(layernorm_kernel, nrows, threads, 0, cb->stream, x, cuda_weight_of(w), cuda_weight_of(b), eps, n, y);
  cuda_launched(cb, "layernorm");
}

/* ---- bias, GELU ---- */

__global__ void add_bias_kernel(float *x, cuda_weight b, size_t total, int n) {
  dev_pdl_enter();
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x)
    x[i] += dev_w(b, 0, (int64_t)(i % (size_t)n));
}

static void cuda_add_bias(m3_backend *be, float *x, const m3_tensor *b, int T, int n) {
  cuda_backend *cb = cuda_of(be);
  if (T <= 0 || n <= 0) return;
  const size_t total = (size_t)T * (size_t)n;
  dev_launch(add_bias_kernel, vis_blocks(total), VIS_THREADS, 0, cb->stream, x, cuda_weight_of(b), total, n);
  cuda_launched(cb, "add_bias");
}

/* 0.5 x (1 + erf(x / sqrt 2)) as 0.5 x erfc(-x / sqrt 2), as the CPU computes it (no cancellation
 * for negative x), products rounded in the CPU's order (no FMA). */
__global__ void gelu_kernel(float *x, size_t n) {
  dev_pdl_enter();
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const float v = x[i];
    x[i] = __fmul_rn(__fmul_rn(0.5f, v), erfcf(__fmul_rn(-v, (float)M_SQRT1_2)));
  }
}

static void cuda_gelu(m3_backend *be, float *x, size_t n) {
  cuda_backend *cb = cuda_of(be);
  if (n == 0) return;
  dev_launch(gelu_kernel, vis_blocks(n), VIS_THREADS, 0, cb->stream, x, n);
  cuda_launched(cb, "gelu");
}

/* ---- axial 3-D RoPE ---- */

typedef struct {
  float inv_freq[ROPE3_MAX_ANGLES / 3]; /* [F] the same vector for the t, y and x axes */
} rope3_freqs;

/* One block per token: cos/sin of its 3F angles (angle i: position axis i / F, frequency i % F)
 * once, then every (head, pair i < 3F) rotates dims i and i + 3F; dims from 6F on pass through. */
__global__ void rope3_kernel(float *x, const int32_t *__restrict__ pos, int nheads, int hd, int F,
                             rope3_freqs f) {
  dev_pdl_enter();
  __shared__ float c[ROPE3_MAX_ANGLES], s[ROPE3_MAX_ANGLES];
  const int t = blockIdx.x, half = 3 * F;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float p = (float)pos[(size_t)t * 3 + i / F];
    const float angle = __fmul_rn(p, f.inv_freq[i % F]);
    c[i] = cosf(angle);
    s[i] = sinf(angle);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < nheads * half; e += blockDim.x) {
    const int h = e / half, i = e % half;
    float *v = x + ((size_t)t * nheads + h) * hd;
    const float a = v[i], b = v[i + half];
    v[i] = __fadd_rn(__fmul_rn(a, c[i]), __fmul_rn(-b, s[i]));
    v[i + half] = __fadd_rn(__fmul_rn(b, c[i]), __fmul_rn(a, s[i]));
  }
}

static void cuda_rope_3d(m3_backend *be, float *x, const int32_t *pos, int N, int nheads, int hd,
                         int axis_dim, double theta) {
  cuda_backend *cb = cuda_of(be);
  if (N <= 0 || nheads <= 0 || hd <= 0) return;
  const int F = axis_dim / 2;
  if (F <= 0 || 6 * F > hd || 3 * F > ROPE3_MAX_ANGLES) {
    fill_nan(cb, x, (size_t)N * nheads * hd, "rope_3d");
    return;
  }
  /* On the host with the CPU backend's expression: both rotate by bit-identical frequencies. */
  rope3_freqs f;
  for (int j = 0; j < F; j++)
    f.inv_freq[j] = 1.0f / powf((float)theta, (float)(2 * j) / (float)axis_dim);
  dev_launch(rope3_kernel, N, 128, 0, cb->stream, x, pos, nheads, hd, F, f);
  cuda_launched(cb, "rope_3d");
}

/* ---- non-causal attention ----
 * Flash style in float32: a block takes BQ = 64 query rows of one head and walks the keys in
 * tiles of BK = 64, keeping per row a running max m and sum l (online softmax) and the output
 * accumulator in registers. 256 threads as 16 x 16 (ty, tx); per key tile:
 *   1. K and V rows j0..j0+63 of the head to shared memory (zero rows past N, zero dims past hd);
 *   2. S = Q K^T * scale: thread (ty, tx) computes rows ty + 16 i, keys tx + 16 c (i, c < 4),
 *      reading Q and K four dims at a time (float4); keys past N get -inf;
 *   3. softmax: 4 threads per row (row = tid / 4) find the tile max, turn S into
 *      p = exp(s - m_new) and update l; alpha = exp(m_old - m_new) rescales the output;
 *   4. O = O * alpha + P V: thread (ty, tx) owns rows ty + 16 i and dims tx + 16 j (j < DJ).
 * Shared rows of Q, K and V are padded to LD floats, LD / 4 odd: the float4 reads of 16 key rows
 * by the 16 tx of a half warp fall in distinct banks. */
enum { ATT_BQ = 64, ATT_BK = 64, ATT_THREADS = 256, ATT_LDS = ATT_BK + 4, ATT_MAX_HD = 128 };

/* Floats of shared memory per row of Q, K, V for head dim hd. */
static __host__ __device__ inline int att_ld(int hd) {
  const int hd4 = (hd + 3) / 4 * 4;
  return ((hd4 / 4) | 1) * 4;
}

static size_t att_smem_bytes(int hd) {
  return ((size_t)3 * ATT_BQ * att_ld(hd) + (size_t)ATT_BQ * ATT_LDS + 2 * ATT_BQ) * sizeof(float);
}

/* rows [r0, r0 + 64) of head h of src [N, nh, hd] -> dst [64, ld], zeros past N and past hd. */
__device__ __forceinline__ void att_load_tile(float *dst, const float *__restrict__ src, int r0, int N,
                                              int nh, int h, int hd, int hd4, int ld) {
  for (int e = threadIdx.x; e < ATT_BQ * hd4; e += ATT_THREADS) {
    const int r = e / hd4, d = e - r * hd4;
    float v = 0.0f;
    if (r0 + r < N && d < hd) v = src[((size_t)(r0 + r) * nh + h) * hd + d];
    dst[r * ld + d] = v;
  }
}

template <int DJ>
__global__ void __launch_bounds__(ATT_THREADS, 2)
    attention_full_kernel(const float *__restrict__ q, const float *__restrict__ k,
                          const float *__restrict__ v, int N, int nh, int hd, float scale,
                          float *__restrict__ out) {
  dev_pdl_enter();
  extern __shared__ float4 att_smem4[];
  const int ld = att_ld(hd), hd4 = (hd + 3) / 4 * 4;
  float *Qs = (float *)att_smem4;           /* [BQ, ld] */
  float *Ks = Qs + ATT_BQ * ld;             /* [BK, ld] */
  float *Vs = Ks + ATT_BK * ld;             /* [BK, ld] */
  float *Ss = Vs + ATT_BK * ld;             /* [BQ, ATT_LDS] scores, then p */
  float *alpha_s = Ss + ATT_BQ * ATT_LDS;   /* [BQ] this tile's rescale of each row */
  float *l_s = alpha_s + ATT_BQ;            /* [BQ] each row's running sum */
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int h = blockIdx.y, q0 = blockIdx.x * ATT_BQ;
  const int srow = tid / 4, spart = tid % 4; /* the softmax step's row and quarter */

  att_load_tile(Qs, q, q0, N, nh, h, hd, hd4, ld);
  float o[4][DJ];
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < DJ; j++) o[i][j] = 0.0f;
  float m_run = -INFINITY, l_run = 0.0f; /* of row srow, the same in its 4 threads */

  for (int j0 = 0; j0 < N; j0 += ATT_BK) {
    att_load_tile(Ks, k, j0, N, nh, h, hd, hd4, ld);
    att_load_tile(Vs, v, j0, N, nh, h, hd, hd4, ld);
    __syncthreads();

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
      for (int c = 0; c < 4; c++) acc[i][c] = 0.0f;
    for (int d = 0; d < hd4; d += 4) {
      float4 qv[4], kv[4];
#pragma unroll
      for (int i = 0; i < 4; i++) qv[i] = *(const float4 *)&Qs[(ty + 16 * i) * ld + d];
#pragma unroll
      for (int c = 0; c < 4; c++) kv[c] = *(const float4 *)&Ks[(tx + 16 * c) * ld + d];
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int c = 0; c < 4; c++) {
          float a = acc[i][c];
          a = fmaf(qv[i].x, kv[c].x, a);
          a = fmaf(qv[i].y, kv[c].y, a);
          a = fmaf(qv[i].z, kv[c].z, a);
          a = fmaf(qv[i].w, kv[c].w, a);
          acc[i][c] = a;
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
      for (int c = 0; c < 4; c++) {
        const int key = tx + 16 * c;
        Ss[(ty + 16 * i) * ATT_LDS + key] = j0 + key < N ? acc[i][c] * scale : -INFINITY;
      }
    __syncthreads();

    {
      float *srow_p = Ss + srow * ATT_LDS;
      float tmax = -INFINITY;
      for (int c = spart; c < ATT_BK; c += 4) tmax = fmaxf(tmax, srow_p[c]);
      tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
      tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
      const float m_new = fmaxf(m_run, tmax);
      /* The first tile has no earlier sum to rescale (and -inf - -inf would be NaN). */
      const float alpha = m_run == -INFINITY ? 0.0f : expf(m_run - m_new);
      float sum = 0.0f;
      for (int c = spart; c < ATT_BK; c += 4) {
        const float s = srow_p[c];
        const float p = s == -INFINITY ? 0.0f : expf(s - m_new);
        srow_p[c] = p;
        sum += p;
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      l_run = l_run * alpha + sum;
      m_run = m_new;
      if (spart == 0) {
        alpha_s[srow] = alpha;
        l_s[srow] = l_run;
      }
    }
    __syncthreads();

#pragma unroll
    for (int i = 0; i < 4; i++) {
      const float a = alpha_s[ty + 16 * i];
#pragma unroll
      for (int j = 0; j < DJ; j++) o[i][j] *= a;
    }
    for (int jj = 0; jj < ATT_BK; jj += 4) {
      float4 p[4];
#pragma unroll
      for (int i = 0; i < 4; i++) p[i] = *(const float4 *)&Ss[(ty + 16 * i) * ATT_LDS + jj];
#pragma unroll
      for (int j = 0; j < DJ; j++) {
        const int d = tx + 16 * j;
        if (d < hd) {
          const float v0 = Vs[jj * ld + d], v1 = Vs[(jj + 1) * ld + d];
          const float v2 = Vs[(jj + 2) * ld + d], v3 = Vs[(jj + 3) * ld + d];
#pragma unroll
          for (int i = 0; i < 4; i++) {
            float a = o[i][j];
            a = fmaf(p[i].x, v0, a);
            a = fmaf(p[i].y, v1, a);
            a = fmaf(p[i].z, v2, a);
            a = fmaf(p[i].w, v3, a);
            o[i][j] = a;
          }
        }
      }
    }
    __syncthreads(); /* the next tile overwrites Ks, Vs and Ss */
  }

#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int r = ty + 16 * i;
    if (q0 + r >= N) continue;
    const float inv = 1.0f / l_s[r];
    float *orow = out + ((size_t)(q0 + r) * nh + h) * hd;
#pragma unroll
    for (int j = 0; j < DJ; j++) {
      const int d = tx + 16 * j;
      if (d < hd) orow[d] = o[i][j] * inv;
    }
  }
}

template <int DJ>
static void launch_attention_full(cuda_backend *cb, const float *q, const float *k, const float *v,
                                  int N, int nh, int hd, float *out) {
  const size_t smem = att_smem_bytes(hd);
  cuda_allow_smem(cb, (const void *)attention_full_kernel<DJ>, smem, "attention_full (shared memory)");
  dim3 grid((unsigned)((N + ATT_BQ - 1) / ATT_BQ), (unsigned)nh);
  dev_launch(attention_full_kernel<DJ>, grid, ATT_THREADS, smem, cb->stream, q, k, v, N, nh, hd,
             1.0f / sqrtf((float)hd), out);
  cuda_launched(cb, "attention_full");
}

static void cuda_attention_full(m3_backend *be, const float *q, const float *k, const float *v,
                                int N, int nh, int hd, float *out) {
  cuda_backend *cb = cuda_of(be);
  if (N <= 0 || nh <= 0 || hd <= 0) return;
  /* Output dims per thread and row: ceil(hd / 16), rounded up to an instantiated width. */
  if (hd <= 32) launch_attention_full<2>(cb, q, k, v, N, nh, hd, out);
  else if (hd <= 64) launch_attention_full<4>(cb, q, k, v, N, nh, hd, out);
  else if (hd <= 80) launch_attention_full<5>(cb, q, k, v, N, nh, hd, out);
  else if (hd <= ATT_MAX_HD) launch_attention_full<8>(cb, q, k, v, N, nh, hd, out);
  else cuda_note(cb, cudaErrorInvalidValue, "attention_full (head dim above 128)");
}

const m3_vision_ops cuda_vision_ops = {
    cuda_layernorm, cuda_add_bias, cuda_gelu, cuda_rope_3d, cuda_attention_full,
};
