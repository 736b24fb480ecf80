/* matmul.cu: y = x . W^T for weights of any stored dtype, and the embedding lookup.
 *
 * T <= GEMV_MAX_T (decode; BF16 weights of 2048 rows or more: T <= GEMV_BF16_MAX_T) is bound by
 * reading W once: 32-byte steps of each row decoded in registers (E4M3 by the hardware's pair
 * conversion, its MXFP8 or block scale applied to each 32-column sum) and applied to every token, float32
 * accumulation: the same math as the CPU to rounding. One token on a matrix of 2112 rows or
 * more (H200): a warp takes 2 or 4 rows and walks K alone, loads two steps ahead; matmul_set puts
 * several weights of one kind whose rows add up to that in one such launch (q with k, v and the
 * index branch; gate with up), so that the short ones cost no launch of their own. A short matrix
 * (k/v, the router), or 2..8 tokens on one under 4224 rows: a block of 256 threads shares 1, 2 or 4
 * rows. 2..8 tokens on a tall matrix: a warp takes 4 rows and the block stages x in shared memory
 * slice by slice.
 * One token of E4M3 weights (32-byte steps under one scale, K % 16 == 0; MXFP8 K % 128 == 0) on
 * 32 rows for every SM at least, alone or in a matmul_set: mx1_set_kernel, the copy engine filling
 * shared memory and the tensor cores doing the products (weight_load.cuh mx1_*), where the GEMV's
 * decoding and FMAs held E4M3 rows at half the copy bandwidth.
 * E4M3 weights (MXFP8, FP8 block, per channel; K % 8 == 0) from 2 to MX_MAX_T = 64 tokens take neither
 * (mx_mma_fits): a tensor-core kernel decodes each 8-byte piece of W to BF16 in registers and
 * applies the scales to fp32 partial products, reading W once for all tokens (x as hi + lo BF16,
 * about float32 accuracy).
 * Larger T goes through cuBLASLt: F32 weights as a pure float32 SGEMM; all others with x rounded to
 * BF16 (up to 64 tokens as two BF16 terms, hi + lo), W as stored (BF16) or decoded to BF16 in
 * chunks of rows (F16, MXFP8, FP8 block), float32 accumulation and output. A tiled CUDA-core
 * kernel that decodes W tile by tile covers what cuBLASLt declines. cuda_matmul_lane runs these
 * GEMMs on a side stream with that stream's own workspace and scratch (the MoE prefill's lanes),
 * reading a BF16 copy of x its caller made for many GEMMs at once where one is given. */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <math.h>
#include <string.h>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/weight_load.cuh"

/* GEMV_MAX_T: the GEMV spends T float32 FMAs per weight element on the CUDA cores (128 per clock
 * per SM), while the memory delivers about 8 BF16 or 16 E4M3 weights per clock per SM on an
 * H100/H200: past about 8 tokens (E4M3) to 16 (BF16) the FMAs, not the bytes, set its time, and
 * cuBLASLt's tensor cores are faster even with the activations rounded to BF16. */
enum { GEMV_MAX_T = 8, GEMV_BF16_MAX_T = 2, GEMV_BF16_LT_ROWS = 2048, GEMV_THREADS = 256 };

/* y[t, r] = dot(W[r, :], x[t, :]) for t < T <= NT and the R rows of this block. All 256 threads of
 * the block share the row, so a short matrix (k/v: 512 rows) still spreads over every SM and each
 * x element loaded serves R rows. A row is read in 16-byte units (weight_load.cuh wk_chunk), thread
 * i taking units i and i + 256, then i + 512 and i + 768, ...: each load instruction of a warp
 * moves 512 contiguous bytes, whole 32-byte sectors, and R x 2 loads are in flight per thread
 * before any is used. (A thread's own 32-byte step in two 16-byte loads, as before, used half of
 * every sector each load moved, and the weights bypass L1: k/v read at 11-27% of the copy
 * bandwidth.) An E4M3 unit's 16 columns lie inside one 32-column MXFP8 block: its scale multiplies
 * the unit's float32 sum. Columns past the last whole unit go one at a time. Partial sums meet
 * through shared memory in a fixed order: the result does not depend on timing. */
template <int NT, int WK, int R>
__device__ __forceinline__ void gemv_rows(const cuda_weight &w, const float *__restrict__ x, int T,
                                          float *__restrict__ y, int64_t r0) {
  constexpr int E = WK == WK_ANY ? 0 : wk_chunk<WK>::n; /* elements per unit */
  /* Units in flight per row and thread: a row of 8192 columns at most (the index branch and the
   * router at 6144: 768 BF16 or 1536 F32 units) in one round of loads, not two to six that each
   * waited for the one before; more rows keep two each, as the registers allow. */
  constexpr int U = R == 1 && E ? 32 / E : 2;
  const int tid = threadIdx.x;
  const int64_t N = w.rows, K = w.cols;
  int64_t rows[R];
#pragma unroll
  for (int r = 0; r < R; r++) rows[r] = r0 + r < N ? r0 + r : N - 1; /* ragged end: reread a row */
  float acc[R][NT];
#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int t = 0; t < NT; t++) acc[r][t] = 0.0f;
  const int64_t units = E ? K / E : 0;
  if (E) {
    for (int64_t j0 = tid; j0 < units; j0 += U * GEMV_THREADS) {
      /* units j0, j0 + 256, ... of every row: the first `have` exist (no load for the others) */
      const int have = (int)min((int64_t)U, (units - j0 + GEMV_THREADS - 1) / GEMV_THREADS);
      uint4 u[R][U];
      float sc[R][U]; /* loaded with the weights: not a second round trip after them */
#pragma unroll
      for (int r = 0; r < R; r++)
#pragma unroll
        for (int h = 0; h < U; h++) {
          const int64_t j = j0 + (int64_t)h * GEMV_THREADS;
          u[r][h] = make_uint4(0u, 0u, 0u, 0u), sc[r][h] = 0.0f;
          if (h >= have) continue;
          u[r][h] = ld_stream16(w.data + ((size_t)rows[r] * (size_t)K + (size_t)j * E) * (size_t)w.elem_bytes);
          sc[r][h] = WK == WK_E4M3 ? step_scale(w, rows[r], j >> 1) : 1.0f;
        }
#pragma unroll
      for (int h = 0; h < U; h++) {
        if (h >= have) break;
        const float *xj = x + (size_t)(j0 + (int64_t)h * GEMV_THREADS) * E;
        float part[R][NT];
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
          for (int t = 0; t < NT; t++) part[r][t] = 0.0f;
#pragma unroll
        for (int g = 0; g < E / 4; g++) {
          float4 xv[NT];
#pragma unroll
          for (int t = 0; t < NT; t++)
            if (t < T) xv[t] = __ldg((const float4 *)(xj + (size_t)t * K) + g);
#pragma unroll
          for (int r = 0; r < R; r++) {
            float wv[4];
            decode_quad<WK>(&u[r][h], g, wv);
#pragma unroll
            for (int t = 0; t < NT; t++)
              if (t < T)
                part[r][t] += wv[0] * xv[t].x + wv[1] * xv[t].y + wv[2] * xv[t].z + wv[3] * xv[t].w;
          }
        }
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
          for (int t = 0; t < NT; t++)
            acc[r][t] += WK == WK_E4M3 ? part[r][t] * sc[r][h] : part[r][t];
      }
    }
  }
  for (int64_t c = units * E + tid; c < K; c += GEMV_THREADS) {
#pragma unroll
    for (int r = 0; r < R; r++) {
      const float wv = dev_w(w, rows[r], c);
#pragma unroll
      for (int t = 0; t < NT; t++)
        if (t < T) acc[r][t] += wv * x[(size_t)t * K + c];
    }
  }
  __shared__ float partial[GEMV_THREADS / 32][R * NT];
  const int lane = tid & 31, warp = tid >> 5;
#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int t = 0; t < NT; t++) {
      const float v = warp_sum(acc[r][t]);
      if (lane == 0) partial[warp][r * NT + t] = v;
    }
  __syncthreads();
  if (tid < R * NT) {
    const int r = tid / NT, t = tid % NT;
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < GEMV_THREADS / 32; i++) sum += partial[i][tid];
    if (t < T && r0 + r < N) y[(size_t)t * N + r0 + r] = sum;
  }
}

template <int NT, int WK, int R>
__global__ void __launch_bounds__(GEMV_THREADS)
    gemv_kernel(cuda_weight w, const float *__restrict__ x, int T, float *__restrict__ y) {
  dev_pdl_enter();
  gemv_rows<NT, WK, R>(w, x, T, y, (int64_t)blockIdx.x * R);
}

/* The GEMV for 2..8 tokens on tall matrices. Read per block, x costs T x K x 4 bytes; the kernel
 * above reads it for every 4 rows, 4T times the weight bytes: at T = 8 that traffic, not the
 * weights, set its time. Here a block takes 8 x RW rows (RW per warp) and walks K in slices of 32
 * steps: the block stages the slice of x in shared memory once, then each lane reads one 32-byte
 * step of each of its warp's rows (loads issued before the staging, so they are in flight
 * meanwhile) and takes x from shared memory: x traffic falls to T / (4 RW) of the weight bytes. */
template <int NT, int WK, int RW>
__global__ void __launch_bounds__(GEMV_THREADS)
    gemv_tall_kernel(cuda_weight w, const float *__restrict__ x, int T, float *__restrict__ y) {
  dev_pdl_enter();
  constexpr int E = wk_step<WK>::n, SLICE = 32 * E, Q = E / 4;
  /* xs[t][g][l]: x[t, 32 E s0 + E l + 4 g, + 4): lane l's quad g, so that the lanes of a warp read
   * consecutive float4 (no bank conflicts) */
  __shared__ float4 xs[NT][Q][32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t N = w.rows, K = w.cols, steps = K / E;
  int64_t rows[RW];
#pragma unroll
  for (int r = 0; r < RW; r++) {
    const int64_t row = ((int64_t)blockIdx.x * (GEMV_THREADS / 32) + warp) * RW + r;
    rows[r] = row < N ? row : N - 1; /* ragged end: reread a row */
  }
  float acc[RW][NT];
#pragma unroll
  for (int r = 0; r < RW; r++)
#pragma unroll
    for (int t = 0; t < NT; t++) acc[r][t] = 0.0f;
  for (int64_t s0 = 0; s0 < steps; s0 += 32) {
    const int64_t s = s0 + lane;
    const bool live = s < steps;
    uint4 u[RW][2];
    float sc[RW]; /* loaded with the weights: not a second round trip after them */
#pragma unroll
    for (int r = 0; r < RW; r++) {
      const uint8_t *p = w.data + ((size_t)rows[r] * (size_t)K + (size_t)(live ? s : 0) * E) * (size_t)w.elem_bytes;
      u[r][0] = ld_stream16(p);
      u[r][1] = ld_stream16(p + 16);
      sc[r] = WK == WK_E4M3 ? step_scale(w, rows[r], live ? s : 0) : 1.0f;
    }
    const int64_t cols = (steps - s0 < 32 ? steps - s0 : 32) * E; /* of x in this slice */
    __syncthreads(); /* the previous slice of x is used up */
    for (int i = tid; i < NT * (SLICE / 4); i += GEMV_THREADS) {
      const int t = i / (SLICE / 4), q = i % (SLICE / 4);
      if (t < T && 4 * q < cols)
        xs[t][q % Q][q / Q] = __ldg((const float4 *)(x + (size_t)t * K + (size_t)s0 * E) + q);
    }
    __syncthreads();
    if (!live) continue;
    float part[RW][NT];
#pragma unroll
    for (int r = 0; r < RW; r++)
#pragma unroll
      for (int t = 0; t < NT; t++) part[r][t] = 0.0f;
#pragma unroll
    for (int g = 0; g < E / 4; g++) {
      float4 xv[NT];
#pragma unroll
      for (int t = 0; t < NT; t++)
        if (t < T) xv[t] = xs[t][g][lane];
#pragma unroll
      for (int r = 0; r < RW; r++) {
        float wv[4];
        decode_quad<WK>(u[r], g, wv);
#pragma unroll
        for (int t = 0; t < NT; t++)
          if (t < T) part[r][t] += wv[0] * xv[t].x + wv[1] * xv[t].y + wv[2] * xv[t].z + wv[3] * xv[t].w;
      }
    }
#pragma unroll
    for (int r = 0; r < RW; r++)
#pragma unroll
      for (int t = 0; t < NT; t++) acc[r][t] += WK == WK_E4M3 ? part[r][t] * sc[r] : part[r][t];
  }
  for (int64_t c = steps * E + lane; c < K; c += 32) {
#pragma unroll
    for (int r = 0; r < RW; r++) {
      const float wv = dev_w(w, rows[r], c);
#pragma unroll
      for (int t = 0; t < NT; t++)
        if (t < T) acc[r][t] += wv * x[(size_t)t * K + c];
    }
  }
#pragma unroll
  for (int r = 0; r < RW; r++) {
    const int64_t row = ((int64_t)blockIdx.x * (GEMV_THREADS / 32) + warp) * RW + r;
#pragma unroll
    for (int t = 0; t < NT; t++) {
      const float v = warp_sum(acc[r][t]);
      if (lane == 0 && t < T && row < N) y[(size_t)t * N + row] = v;
    }
  }
}

/* y[r0, r0 + RW) of w: one warp's share of gemv_warp_kernel or gemv_set_kernel (r0 < w.rows;
 * rows past the end are not stored). */
template <int WK, int RW>
__device__ __forceinline__ void gemv_warp_task(const cuda_weight &w, const float *__restrict__ x,
                                               int64_t r0, float *__restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int64_t N = w.rows;
  int64_t rows[RW];
#pragma unroll
  for (int r = 0; r < RW; r++) rows[r] = r0 + r < N ? r0 + r : N - 1; /* ragged end: reread a row */
  float acc[1][RW];
  warp_rows_dot<WK, 1, RW>(w, w, rows, x, acc);
#pragma unroll
  for (int r = 0; r < RW; r++) {
    const float v = warp_sum(acc[0][r]);
    if (lane == 0 && r0 + r < N) y[r0 + r] = v;
  }
}

/* One token on a matrix of at least 16 rows per SM: a warp owns RW consecutive rows and walks K
 * alone (weight_load.cuh warp_rows_dot: a lane's 16-byte units lane, lane + 32, ..., the next
 * units of each row loaded while the current ones are used), 8 warps a block, no shared memory and
 * no barrier. Against gemv_kernel (256 threads sharing 4 rows, one step each at K 6144 for E4M3:
 * a block lived for one round trip and re-read all of x for 24 KB of weights) a block keeps its
 * loads in flight for its whole life (32 KB at 4 rows), and the x it reads (from L1 after the
 * first warp) serves RW rows per load. At 2 blocks per SM (the launch bound holds registers to
 * 128) q_proj's 256 blocks are resident at once. */
template <int WK, int RW>
__global__ void __launch_bounds__(GEMV_THREADS, 2)
    gemv_warp_kernel(cuda_weight w, const float *__restrict__ x, float *__restrict__ y) {
  dev_pdl_enter();
  const int64_t r0 = ((int64_t)blockIdx.x * (GEMV_THREADS / 32) + (threadIdx.x >> 5)) * RW;
  if (r0 >= w.rows) return; /* the whole warp; nothing waits on it */
  gemv_warp_task<WK, RW>(w, x, r0, y);
}

/* The weights of one gemv_set_kernel (or mx1_set_kernel) launch: weight m (of n) holds the rows
 * (mx1: groups of 16 rows) [first[m], first[m + 1]) of their concatenation; first[0] = 0,
 * first[n] = all of them. */
typedef struct {
  cuda_weight w[M3_MATMUL_SET_MAX];
  float *y[M3_MATMUL_SET_MAX];
  int64_t first[M3_MATMUL_SET_MAX + 1];
  int n;
} gemv_set;

/* gemv_warp_kernel over the rows of several weights of one kind at once (matmul_set, one token),
 * so that the short ones (k/v, the index branch) ride in the launch of a tall one instead of
 * costing one each. Warp w of the launch takes the w-th equal share of the concatenated rows, RW at
 * a time where RW remain in its share of one weight, else one. With a warp for every RW rows that
 * is RW rows each (gemv_warp_kernel's tasks); launch_gemv_set_wk launches fewer for E4M3 (below).
 * A row's sum does not depend on the rows beside it, so every row comes out bit for bit as
 * gemv_warp_kernel computes it. The table and the weight are read where they lie, in the parameter
 * space (__grid_constant__): a register copy of an E4M3 weight spilled at 4 rows a warp. */
template <int WK, int RW>
__global__ void __launch_bounds__(GEMV_THREADS, 2)
    gemv_set_kernel(const __grid_constant__ gemv_set s, const float *__restrict__ x) {
  dev_pdl_enter();
  const int64_t warps = (int64_t)gridDim.x * (GEMV_THREADS / 32);
  const int64_t warp = (int64_t)blockIdx.x * (GEMV_THREADS / 32) + (threadIdx.x >> 5);
  const int64_t total = s.first[s.n], end = total * (warp + 1) / warps;
  int m = 0;
  for (int64_t g = total * warp / warps; g < end;) { /* the same path for the whole warp */
    while (g >= s.first[m + 1]) m++;
    const int64_t stop = end < s.first[m + 1] ? end : s.first[m + 1];
    if (stop - g >= RW) {
      gemv_warp_task<WK, RW>(s.w[m], x, g - s.first[m], s.y[m]);
      g += RW;
    } else {
      gemv_warp_task<WK, 1>(s.w[m], x, g - s.first[m], s.y[m]);
      g += 1;
    }
  }
}

/* The table of the outputs out[idx[0..n)], first[] counting rows in groups of `group` rows. */
static gemv_set gemv_set_of(const m3_matmul_out *out, const int *idx, int n, int64_t group) {
  gemv_set s;
  memset(&s, 0, sizeof s);
  s.n = n;
  for (int i = 0; i < n; i++) {
    const m3_tensor *t = out[idx[i]].w;
    s.w[i] = cuda_weight_of(t);
    s.y[i] = out[idx[i]].y;
    s.first[i + 1] = s.first[i] + (t->rows + group - 1) / group;
  }
  return s;
}

/* gemv_kernel at one token and a block a row over the rows of several short weights of one kind
 * (matmul_set: the index branch's q and k, 512 + 128 rows), each row's bits as gemv_kernel gives
 * them alone: the short one's launch cost (3.6 us for 1.6 MB, H200) goes. */
template <int WK>
__global__ void __launch_bounds__(GEMV_THREADS)
    gemv_rows_set_kernel(const __grid_constant__ gemv_set s, const float *__restrict__ x) {
  dev_pdl_enter();
  int m = 0;
  while ((int64_t)blockIdx.x >= s.first[m + 1]) m++;
  gemv_rows<1, WK, 1>(s.w[m], x, 1, s.y[m], (int64_t)blockIdx.x - s.first[m]);
}

/* One token of E4M3 weights on the tensor cores (weight_load.cuh mx1_*): the weights of s (one
 * kind, the same K; gemv_set's first[] counts groups of 16 rows here), a block taking an equal
 * run of the groups and staging x once. Each row's sum does not depend on the block or the launch
 * it falls in: a weight alone and in a set get the same bits. */
__global__ void __launch_bounds__(MX1_THREADS)
    mx1_set_kernel(const __grid_constant__ gemv_set s, const float *__restrict__ x) {
  dev_pdl_enter();
  extern __shared__ __align__(128) uint8_t mx1_smem[];
  __shared__ uint64_t bars[2 * MX1_SLOTS];
  __shared__ float part[2][MX1_CONSUMERS][16];
  __shared__ float red[MX1_CONSUMERS];
  const int64_t K = s.w[0].cols, groups = s.first[s.n];
  const int64_t g0 = groups * blockIdx.x / gridDim.x, g1 = groups * (blockIdx.x + 1) / gridDim.x;
  const mx1_ring rg = mx1_ring_init(mx1_smem, K, bars);
  const int warp = threadIdx.x >> 5;
  uint32_t n = 0;
  int m = 0;
  if (warp >= MX1_CONSUMERS) {
    for (int64_t b = g0; b < g1; b++) {
      while (b >= s.first[m + 1]) m++;
      const int64_t r = (b - s.first[m]) * 16;
      mx1_produce_group(rg, n, mx1_half{&s.w[m], r}, mx1_half{&s.w[m], r + 8});
    }
    return;
  }
  const float back = mx1_stage_x(x, K, (uint32_t *)mx1_smem, red);
  for (int64_t b = g0; b < g1; b++) {
    while (b >= s.first[m + 1]) m++;
    const int64_t r = (b - s.first[m]) * 16;
    const float sum = mx1_consume_group(rg, n, s.w[m], (const uint32_t *)mx1_smem, part[b & 1]);
    if (threadIdx.x < 16 && r + threadIdx.x < s.w[m].rows) s.y[m][r + threadIdx.x] = sum * back;
  }
}

/* 1 when the mx1 kernel takes `rows` rows of E4M3 weights (mx1_fits) at one token: a group of 32
 * rows for every SM at least. Fewer leave SMs with little to read (with 32-row groups, k/v's 512
 * rows went 5.3 -> 14.5 us, a 3072-row expert 15.5 -> 16.8 us); the GEMVs split K wider. */
static int mx1_rows_fit(const cuda_backend *cb, int64_t rows) {
  return !cb->mx1_off && (rows + 31) / 32 >= (int64_t)cb->num_sms;
}

/* The outputs out[idx[0..n)] (mx1_fits, one K) in one mx1_set_kernel launch: no more blocks than
 * the SMs hold at once, so that each stages x once, and runs of equal length (mx1_blocks). */
static void launch_mx1_set(cuda_backend *cb, const float *x, const m3_matmul_out *out,
                           const int *idx, int n) {
  const gemv_set s = gemv_set_of(out, idx, n, 16);
  const char *op = "matmul (e4m3 one token, tensor cores)";
  const int64_t K = s.w[0].cols;
  const size_t smem = mx1_smem_bytes(K);
  cuda_allow_smem(cb, (const void *)mx1_set_kernel, smem, op);
  const int64_t blocks_max = (int64_t)cuda_blocks_per_sm(cb, (const void *)mx1_set_kernel, MX1_THREADS, smem, op) * cb->num_sms;
  const unsigned blocks = mx1_blocks(s.first[n], blocks_max);
  dev_launch(mx1_set_kernel, blocks, MX1_THREADS, smem, cb->stream, s, x);
  cuda_launched(cb, op);
}

/* Rows per block: the most that still leave about 8 blocks per SM (each load of x then serves more
 * rows); fewer on short matrices (k/v: 512 rows) so that every SM reads. */
static int gemv_rows_per_block(const cuda_backend *cb, int64_t rows) {
  const int64_t blocks_wanted = 8 * (int64_t)cb->num_sms;
  return rows >= 4 * blocks_wanted ? 4 : rows >= 2 * blocks_wanted ? 2 : 1;
}

enum { GEMV_TALL_RW = 4, GEMV_TALL_ROWS = GEMV_THREADS / 32 * GEMV_TALL_RW };

template <int NT, int WK>
static void launch_gemv_wk(cuda_backend *cb, int R, const cuda_weight &w, const float *x, int T, float *y) {
  const unsigned blocks = (unsigned)((w.rows + R - 1) / R);
  if constexpr (NT > 1 && WK != WK_ANY) {
    /* tall enough for a block on every SM with 32 rows a block (not k/v) */
    if (w.rows >= (int64_t)cb->num_sms * GEMV_TALL_ROWS) {
      dev_launch(gemv_tall_kernel<NT, WK, GEMV_TALL_RW>, (unsigned)((w.rows + GEMV_TALL_ROWS - 1) / GEMV_TALL_ROWS),
                 GEMV_THREADS, 0, cb->stream, w, x, T, y);
      return;
    }
  }
  if (R == 4) dev_launch(gemv_kernel<NT, WK, 4>, blocks, GEMV_THREADS, 0, cb->stream, w, x, T, y);
  else if (R == 2) dev_launch(gemv_kernel<NT, WK, 2>, blocks, GEMV_THREADS, 0, cb->stream, w, x, T, y);
  else dev_launch(gemv_kernel<NT, WK, 1>, blocks, GEMV_THREADS, 0, cb->stream, w, x, T, y);
}

template <int NT>
static void launch_gemv_nt(cuda_backend *cb, int kind, int R, const cuda_weight &w, const float *x,
                           int T, float *y) {
  switch (kind) {
    case WK_F32: launch_gemv_wk<NT, WK_F32>(cb, R, w, x, T, y); break;
    case WK_BF16: launch_gemv_wk<NT, WK_BF16>(cb, R, w, x, T, y); break;
    case WK_F16: launch_gemv_wk<NT, WK_F16>(cb, R, w, x, T, y); break;
    case WK_E4M3: launch_gemv_wk<NT, WK_E4M3>(cb, R, w, x, T, y); break;
    default: launch_gemv_wk<NT, WK_ANY>(cb, R, w, x, T, y); break;
  }
}

/* Rows per warp of gemv_warp_kernel: 4, or 2 where 4 would leave SMs without a block; 0 (not
 * taken) on shorter matrices (k/v, the router), which need gemv_kernel's K split to reach every
 * SM, and for WK_ANY. */
static int gemv_warp_rows(const cuda_backend *cb, int kind, int64_t rows) {
  const int64_t sms = cb->num_sms, warps = GEMV_THREADS / 32;
  if (kind == WK_ANY || cb->gemv_old) return 0;
  return rows >= 4 * warps * sms ? 4 : rows >= 2 * warps * sms ? 2 : 0;
}

template <int WK>
static void launch_gemv_warp(cuda_backend *cb, int RW, const cuda_weight &w, const float *x, float *y) {
  const int64_t rows_per_block = GEMV_THREADS / 32 * RW;
  const unsigned blocks = (unsigned)((w.rows + rows_per_block - 1) / rows_per_block);
  if (RW == 4) dev_launch(gemv_warp_kernel<WK, 4>, blocks, GEMV_THREADS, 0, cb->stream, w, x, y);
  else dev_launch(gemv_warp_kernel<WK, 2>, blocks, GEMV_THREADS, 0, cb->stream, w, x, y);
}

/* Warps of a gemv_set_kernel launch: one per RW rows, except for E4M3, bound by its decoding
 * rather than by the bytes: there a second, partial round of blocks (q with k, v and the index
 * branch: 9856 rows, 1.17 rounds of the 2112 warps an H200 holds) leaves most SMs idle while it
 * runs, so the launch has at most the warps the SMs hold and each takes its share (4.7 rows).
 * Same H200, the full-width set at one token: E4M3 39.3 us in five launches, 41.1 us in one of
 * 4-row tasks, 35.2 us shared out 2 rows at a time (37.8 at 4: the loop's state made it spill);
 * BF16 36.4 us as tasks against 47.1 shared out (the bytes want every warp's loads in flight). */
template <int WK>
static void launch_gemv_set_wk(cuda_backend *cb, int RW, const gemv_set &s, const float *x) {
  constexpr int E4M3 = WK == WK_E4M3, WIDE = E4M3 ? 2 : 4; /* E4M3 at 4 spilled in the share loop */
  const int64_t per_block = GEMV_THREADS / 32, resident = 2 * per_block * (int64_t)cb->num_sms;
  if (E4M3) RW = 2;
  int64_t warps = (s.first[s.n] + RW - 1) / RW;
  if (E4M3 && warps > resident) warps = resident;
  const unsigned blocks = (unsigned)((warps + per_block - 1) / per_block);
  if (RW == 4) dev_launch(gemv_set_kernel<WK, WIDE>, blocks, GEMV_THREADS, 0, cb->stream, s, x);
  else dev_launch(gemv_set_kernel<WK, 2>, blocks, GEMV_THREADS, 0, cb->stream, s, x);
}

/* One gemv_set_kernel launch for the n outputs out[idx[0..n)], all of `kind`, RW rows a warp. */
static void launch_gemv_set(cuda_backend *cb, int kind, int RW, const float *x,
                            const m3_matmul_out *out, const int *idx, int n) {
  const gemv_set s = gemv_set_of(out, idx, n, 1);
  switch (kind) {
    case WK_F32: launch_gemv_set_wk<WK_F32>(cb, RW, s, x); break;
    case WK_BF16: launch_gemv_set_wk<WK_BF16>(cb, RW, s, x); break;
    case WK_F16: launch_gemv_set_wk<WK_F16>(cb, RW, s, x); break;
    default: launch_gemv_set_wk<WK_E4M3>(cb, RW, s, x); break;
  }
  cuda_launched(cb, "matmul_set");
}

/* One gemv_rows_set_kernel launch for the n short outputs out[idx[0..n)], all of `kind` (not
 * WK_ANY), a block a row. */
static void launch_gemv_rows_set(cuda_backend *cb, int kind, const float *x, const m3_matmul_out *out,
                                 const int *idx, int n) {
  const gemv_set s = gemv_set_of(out, idx, n, 1);
  const unsigned blocks = (unsigned)s.first[n];
  switch (kind) {
    case WK_F32: dev_launch(gemv_rows_set_kernel<WK_F32>, blocks, GEMV_THREADS, 0, cb->stream, s, x); break;
    case WK_BF16: dev_launch(gemv_rows_set_kernel<WK_BF16>, blocks, GEMV_THREADS, 0, cb->stream, s, x); break;
    case WK_F16: dev_launch(gemv_rows_set_kernel<WK_F16>, blocks, GEMV_THREADS, 0, cb->stream, s, x); break;
    default: dev_launch(gemv_rows_set_kernel<WK_E4M3>, blocks, GEMV_THREADS, 0, cb->stream, s, x); break;
  }
  cuda_launched(cb, "matmul_set (short weights)");
}

static void launch_gemv(cuda_backend *cb, const m3_tensor *t, const float *x, int T, float *y) {
  if (T == 1 && mx1_fits(t, x, cb->smem_optin) && mx1_rows_fit(cb, t->rows)) {
    const m3_matmul_out out = {t, y};
    const int idx = 0;
    launch_mx1_set(cb, x, &out, &idx, 1);
    return;
  }
  cuda_weight w = cuda_weight_of(t);
  int kind = gemv_step_kind(t, x), R = gemv_rows_per_block(cb, t->rows);
  const int RW = T == 1 ? gemv_warp_rows(cb, kind, t->rows) : 0;
  if (RW) {
    switch (kind) {
      case WK_F32: launch_gemv_warp<WK_F32>(cb, RW, w, x, y); break;
      case WK_BF16: launch_gemv_warp<WK_BF16>(cb, RW, w, x, y); break;
      case WK_F16: launch_gemv_warp<WK_F16>(cb, RW, w, x, y); break;
      default: launch_gemv_warp<WK_E4M3>(cb, RW, w, x, y); break;
    }
  } else if (T == 1) launch_gemv_nt<1>(cb, kind, R, w, x, T, y);
  else if (T == 2) launch_gemv_nt<2>(cb, kind, R, w, x, T, y);
  else if (T <= 4) launch_gemv_nt<4>(cb, kind, R, w, x, T, y);
  else launch_gemv_nt<8>(cb, kind, R, w, x, T, y);
  cuda_launched(cb, "matmul (gemv)");
}

/* ---- tiled GEMM for any weight: 64 weight rows x 64 tokens per block, 16 columns a step ---- */

enum { TILE = 64, TILE_K = 16 };

__global__ void __launch_bounds__(256)
    gemm_tiled_kernel(cuda_weight w, const float *__restrict__ x, int T, float *__restrict__ y) {
  dev_pdl_enter();
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

static void launch_tiled(cuda_backend *cb, cudaStream_t stream, const m3_tensor *t, const float *x,
                         int T, float *y) {
  dim3 grid((unsigned)((t->rows + TILE - 1) / TILE), (unsigned)((T + TILE - 1) / TILE));
  dev_launch(gemm_tiled_kernel, grid, 256, 0, stream, cuda_weight_of(t), x, T, y);
  cuda_launched(cb, "matmul (tiled)");
}

/* ---- cuBLASLt ---- */

enum { DEQUANT_CHUNK_BYTES = 128 << 20 };

/* Up to LT_SPLIT_MAX_T tokens the GEMM is bound by reading W, so the activations can go in as
 * two BF16 terms, x = hi + lo (hi = bf16(x), lo = bf16(x - hi)), for the price of nothing but
 * twice the columns: 16 bits of mantissa instead of 8, about the float32 GEMV's accuracy. A
 * single BF16 rounding of every activation made logits of the tiny reference models drift by
 * up to 5e-2 (relative L2), the same drift the CPU shows when it rounds the same inputs. */
enum { LT_SPLIT_MAX_T = 64 };

/* bf16(a), bf16(b) as one word, a in the low half; *lo gets bf16 of what each rounding left. */
__device__ __forceinline__ uint32_t bf16_pair_split(float a, float b, uint32_t *lo) {
  const __nv_bfloat162 hi = __floats2bfloat162_rn(a, b);
  const __nv_bfloat162 rest = __floats2bfloat162_rn(a - __low2float(hi), b - __high2float(hi));
  *lo = *(const uint32_t *)&rest;
  return *(const uint32_t *)&hi;
}

/* out[0, n) = bf16(x); with split, out[n, 2n) = bf16(x - bf16(x)) as well. Four values a thread
 * and step (one float4 load, 8-byte stores) where x, out and n % 4 allow it: one value a thread
 * moved a prefill's activations at about 70% of the copy rate (H200: 8192 x 8192 in 0.14 ms). */
__global__ void to_bf16_kernel(const float *__restrict__ x, size_t n, int split,
                               __nv_bfloat16 *__restrict__ out) {
  dev_pdl_enter();
  const size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
  if ((uintptr_t)x % 16 == 0 && (uintptr_t)out % 8 == 0 && n % 4 == 0) {
    for (size_t i = first; i < n / 4; i += stride) {
      const float4 v = ((const float4 *)x)[i];
      uint2 lo;
      const uint2 hi = make_uint2(bf16_pair_split(v.x, v.y, &lo.x), bf16_pair_split(v.z, v.w, &lo.y));
      ((uint2 *)out)[i] = hi;
      if (split) ((uint2 *)(out + n))[i] = lo;
    }
    return;
  }
  for (size_t i = first; i < n; i += stride) {
    const __nv_bfloat16 hi = __float2bfloat16_rn(x[i]);
    out[i] = hi;
    if (split) out[n + i] = __float2bfloat16_rn(x[i] - __bfloat162float(hi));
  }
}

/* y[i] = parts[i] + parts[n + i]: the hi and lo products of a split GEMM summed. */
__global__ void add_split_kernel(const float *__restrict__ parts, size_t n, float *__restrict__ y) {
  dev_pdl_enter();
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    y[i] = parts[i] + parts[n + i];
}

/* Rows [r0, r0 + nrows) of w decoded (scale applied) and rounded to BF16: exact for E4M3 with
 * MXFP8 scales, one rounding for F16 and FP8-block values. */
__global__ void dequant_bf16_kernel(cuda_weight w, int64_t r0, int64_t nrows, __nv_bfloat16 *__restrict__ out) {
  dev_pdl_enter();
  const size_t n = (size_t)nrows * (size_t)w.cols;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    out[i] = __float2bfloat16_rn(dev_w(w, r0 + (int64_t)(i / (size_t)w.cols), (int64_t)(i % (size_t)w.cols)));
}

/* The same for MXFP8 rows (E4M3, K % 32 == 0, 16-byte aligned), 16 bytes a thread: one vector
 * load and exact conversions instead of a decoder call per element, so that a prefill's experts
 * (three matrices each, decoded once per call) are not bound by their decoding. The same values,
 * rounded the same way, as dequant_bf16_kernel. */
__global__ void dequant_mx_bf16_kernel(cuda_weight w, int64_t r0, int64_t nrows, __nv_bfloat16 *__restrict__ out) {
  dev_pdl_enter();
  const int64_t per_row = w.cols / 16;
  const size_t n = (size_t)nrows * (size_t)per_row;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const int64_t r = (int64_t)(i / (size_t)per_row), c = (int64_t)(i % (size_t)per_row) * 16;
    float v[16];
    load_chunk<WK_E4M3>(w, r0 + r, c, v);
    uint4 o[2];
    uint32_t *p = (uint32_t *)o;
#pragma unroll
    for (int j = 0; j < 8; j++) {
      const __nv_bfloat162 b = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
      p[j] = *(const uint32_t *)&b;
    }
    uint4 *dst = (uint4 *)(out + (size_t)r * (size_t)w.cols + (size_t)c);
    dst[0] = o[0];
    dst[1] = o[1];
  }
}

static int dequant_mx_fits(const cuda_weight &w) {
  return w.type == CW_E4M3 && w.quant == M3_WQ_MXFP8 && w.cols % 32 == 0 && (uintptr_t)w.data % 16 == 0;
}

static unsigned grid_for(size_t n) {
  size_t b = (n + 255) / 256;
  return (unsigned)(b > 8192 ? 8192 : b < 1 ? 1 : b);
}

/* The largest power of two (at most 256) dividing every address: what cuBLASLt may assume. */
static int common_alignment(const void *a, const void *b, const void *c) {
  uintptr_t bits = (uintptr_t)a | (uintptr_t)b | (uintptr_t)c | 256;
  return (int)(bits & (~bits + 1));
}

/* The cached plan for this GEMM, or NULL when there is none yet. */
static cuda_lt_plan *find_plan(cuda_backend *cb, cudaDataType ab, uint64_t rows, uint64_t K,
                               int T, int exact, uint64_t ldy, int align) {
  for (int i = 0; i < CUDA_LT_PLANS; i++) {
    cuda_lt_plan *p = &cb->lt_plans[i];
    if (p->used && p->ab == ab && p->rows == rows && p->K == K && p->T == T && p->exact == exact &&
        p->ldy == ldy && p->align == align)
      return p;
  }
  return NULL;
}

/* The token count a plan is chosen for: T itself (exact), else the next power of two, so that the
 * per-expert GEMMs of a MoE prefill, each with its own token count, share a few plans instead of
 * asking cuBLASLt hundreds of times (a query cost about a millisecond of host time on the H200
 * machine: a prefill's MoE layer spent most of its 260 ms in them). */
static int plan_tokens(int T, int exact) {
  if (exact) return T;
  int b = 16;
  while (b < T && b < (1 << 30)) b <<= 1;
  return b;
}

/* Destroys p's descriptors and empties the slot. */
static void plan_release(cuda_lt_plan *p) {
  if (p->lc) cublasLtMatrixLayoutDestroy(p->lc);
  if (p->lb) cublasLtMatrixLayoutDestroy(p->lb);
  if (p->la) cublasLtMatrixLayoutDestroy(p->la);
  if (p->op) cublasLtMatmulDescDestroy(p->op);
  memset(p, 0, sizeof *p);
}

void cuda_lt_plans_release(cuda_backend *cb) {
  for (int i = 0; i < CUDA_LT_PLANS; i++) plan_release(&cb->lt_plans[i]);
  cb->lt_plan_next = 0;
}

/* The plan for the GEMM at plan_tokens(T, exact) tokens (operands aligned to `align` bytes): from
 * the cache, else asked of cuBLASLt with the descriptors it keeps, and cached. NULL when the query
 * failed. */
static cuda_lt_plan *plan_gemm(cuda_backend *cb, cudaDataType ab, uint64_t rows, uint64_t K,
                               int T, int exact, uint64_t ldy, int align) {
  const int plan_T = plan_tokens(T, exact);
  cuda_lt_plan *p = find_plan(cb, ab, rows, K, plan_T, exact, ldy, align);
  if (p) return p;
  cuda_lt_plan q;
  memset(&q, 0, sizeof q);
  cublasLtMatmulPreference_t pref = NULL;
  cublasLtMatmulHeuristicResult_t heur;
  int found = 0;
  const uint32_t align_bytes = (uint32_t)align;
  const cublasOperation_t trans = CUBLAS_OP_T;
  int ok = cublasLtMatmulDescCreate(&q.op, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS &&
           cublasLtMatmulDescSetAttribute(q.op, CUBLASLT_MATMUL_DESC_TRANSA, &trans, sizeof trans) ==
               CUBLAS_STATUS_SUCCESS &&
           cublasLtMatrixLayoutCreate(&q.la, ab, K, rows, (int64_t)K) == CUBLAS_STATUS_SUCCESS &&
           cublasLtMatrixLayoutCreate(&q.lb, ab, K, (uint64_t)plan_T, (int64_t)K) == CUBLAS_STATUS_SUCCESS &&
           cublasLtMatrixLayoutCreate(&q.lc, CUDA_R_32F, rows, (uint64_t)plan_T, (int64_t)ldy) ==
               CUBLAS_STATUS_SUCCESS &&
           cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS;
  const cublasLtMatmulPreferenceAttributes_t aligns[] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  ok = ok && cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                  &cb->lt_workspace_bytes,
                                                  sizeof cb->lt_workspace_bytes) == CUBLAS_STATUS_SUCCESS;
  for (int i = 0; i < 4 && ok; i++)
    ok = cublasLtMatmulPreferenceSetAttribute(pref, aligns[i], &align_bytes, sizeof align_bytes) ==
         CUBLAS_STATUS_SUCCESS;
  ok = ok && cublasLtMatmulAlgoGetHeuristic(cb->lt, q.op, q.la, q.lb, q.lc, q.lc, pref, 1, &heur,
                                            &found) == CUBLAS_STATUS_SUCCESS;
  if (pref) cublasLtMatmulPreferenceDestroy(pref);
  if (!ok || found <= 0) plan_release(&q); /* nothing will run with them */
  if (!ok) return NULL; /* a failed query is not cached: it may be transient */
  p = &cb->lt_plans[cb->lt_plan_next];
  cb->lt_plan_next = (cb->lt_plan_next + 1) % CUDA_LT_PLANS;
  plan_release(p);
  q.used = 1, q.found = found > 0, q.ab = ab, q.rows = rows, q.K = K, q.ldy = ldy;
  q.T = plan_T, q.exact = exact, q.align = align;
  if (found > 0) q.algo = heur.algo, q.cols = plan_T;
  *p = q;
  return p;
}

/* Sets the token columns of p's B and C layouts to T (their only dimension a call changes). */
static int plan_set_cols(cuda_lt_plan *p, int T) {
  if (p->cols == T) return 1;
  const uint64_t cols = (uint64_t)T;
  p->cols = 0; /* unknown until both are set */
  if (cublasLtMatrixLayoutSetAttribute(p->lb, CUBLASLT_MATRIX_LAYOUT_COLS, &cols, sizeof cols) !=
          CUBLAS_STATUS_SUCCESS ||
      cublasLtMatrixLayoutSetAttribute(p->lc, CUBLASLT_MATRIX_LAYOUT_COLS, &cols, sizeof cols) !=
          CUBLAS_STATUS_SUCCESS)
    return 0;
  p->cols = T;
  return 1;
}

/* y[t * ldy + r] = dot(A[r, :], B[t, :]) for r < rows, t < T through cuBLASLt, float32
 * accumulation and output; A and B row-major of K columns in type ab. Column-major, that is
 * y[rows, T] (ld ldy) = A^T[rows, K] B[K, T]. The algorithm is the one planned for T's power of
 * two, or when cuBLASLt refuses it for T, one planned for T itself. Runs on `stream` with
 * `workspace` (lt_workspace_bytes). Returns 0 when cuBLASLt finds no algorithm or fails (nothing
 * ran). */
static int lt_gemm(cuda_backend *cb, cudaStream_t stream, void *workspace, cudaDataType ab,
                   const void *A, uint64_t rows, uint64_t K, const void *B, int T, float *y,
                   uint64_t ldy) {
  const int align = common_alignment(A, B, y);
  for (int exact = 0; exact < 2; exact++) {
    cuda_lt_plan *plan = plan_gemm(cb, ab, rows, K, T, exact, ldy, align);
    if (!plan || !plan->found || !plan_set_cols(plan, T)) continue;
    const float alpha = 1.0f, beta = 0.0f;
    if (cublasLtMatmul(cb->lt, plan->op, &alpha, A, plan->la, B, plan->lb, &beta, y, plan->lc, y,
                       plan->lc, &plan->algo, workspace, cb->lt_workspace_bytes,
                       stream) == CUBLAS_STATUS_SUCCESS)
      return 1;
    if (plan_tokens(T, 0) == T) break; /* the exact plan is the same query */
  }
  return 0;
}

/* Where lt_matmul keeps its BF16 copies for a weight at T tokens, in one scratch buffer: x (split:
 * hi then lo), the split's two products, then the chunk of decoded weight rows. */
typedef struct {
  int direct;      /* F32 weights: a float32 SGEMM on x itself, no scratch */
  int stored_bf16; /* W goes in as stored */
  int split, cols; /* x as hi + lo (T <= LT_SPLIT_MAX_T); GEMM columns: 2T split, else T */
  uint64_t chunk;  /* rows of W decoded at a time */
  size_t xbytes, pbytes, bytes; /* x's copy, the split's products, everything */
} lt_layout;

static lt_layout lt_layout_of(const m3_tensor *t, int T) {
  lt_layout L;
  memset(&L, 0, sizeof L);
  const uint64_t N = (uint64_t)t->rows, K = (uint64_t)t->cols;
  L.direct = t->quant == M3_WQ_NONE && t->dtype == M3_DT_F32;
  if (L.direct) return L;
  L.stored_bf16 = t->quant == M3_WQ_NONE && t->dtype == M3_DT_BF16;
  /* whole multiples of 256 rows (with chunks of 5461 rows q_proj's MXFP8 prefill, 8192 x 6144 at
   * 8192 tokens, took 6.5 times as long as o_proj's with chunks of 4096), as few chunks as the
   * bound allows, of one size (each GEMM ends in a partial wave: q_proj and o_proj in one chunk
   * each instead of 5376 + 2816 and 4096 + 2048 rows) */
  const uint64_t per_chunk = DEQUANT_CHUNK_BYTES / (K * 2), chunks = (N + per_chunk - 1) / (per_chunk ? per_chunk : 1);
  uint64_t chunk = L.stored_bf16 || chunks <= 1 ? N : ((N + chunks - 1) / chunks + 255) / 256 * 256;
  L.chunk = chunk < 256 ? 256 : chunk > N ? N : chunk;
  L.split = T <= LT_SPLIT_MAX_T;
  L.cols = L.split ? 2 * T : T;
  L.xbytes = ((size_t)L.cols * K * 2 + 255) / 256 * 256;
  L.pbytes = L.split ? ((size_t)L.cols * N * 4 + 255) / 256 * 256 : 0; /* hi and lo products */
  L.bytes = L.xbytes + L.pbytes + (L.stored_bf16 ? 0 : L.chunk * K * 2);
  return L;
}

/* y = x W^T on the tensor cores: F32 weights as a float32 SGEMM; every other weight with x
 * rounded to BF16 (up to LT_SPLIT_MAX_T tokens: split into two BF16 terms) and W as stored (BF16)
 * or decoded to BF16 a chunk of rows at a time, in `scratch` (L.bytes). x_bf16 (NULL: none) is
 * x's single rounding made beforehand: taken instead of a copy in scratch when unsplit and as
 * aligned as the scratch for the other operands, so the GEMM gets the same plan (common_alignment
 * picks it) and the same result. Runs on `stream` with `workspace`. Returns 0 when cuBLASLt
 * declines, before anything was written to y. */
static int lt_matmul_on(cuda_backend *cb, cudaStream_t stream, void *workspace, uint8_t *scratch,
                        const lt_layout &L, const m3_tensor *t, const float *x,
                        const __nv_bfloat16 *x_bf16, int T, float *y) {
  const uint64_t N = (uint64_t)t->rows, K = (uint64_t)t->cols;
  if (L.direct) return lt_gemm(cb, stream, workspace, CUDA_R_32F, t->data, N, K, x, T, y, N);
  __nv_bfloat16 *xs = (__nv_bfloat16 *)scratch, *wb = (__nv_bfloat16 *)(scratch + L.xbytes + L.pbytes);
  float *out = L.split ? (float *)(scratch + L.xbytes) : y;
  const void *A = L.stored_bf16 ? (const void *)t->data : (const void *)wb;
  const __nv_bfloat16 *xb = xs;
  if (x_bf16 && !L.split && (uintptr_t)x_bf16 % (uintptr_t)common_alignment(A, out, out) == 0) {
    xb = x_bf16;
  } else {
    dev_launch(to_bf16_kernel, grid_for((size_t)T * K), 256, 0, stream, x, (size_t)T * K, L.split, xs);
    cuda_launched(cb, "matmul (bf16 activations)");
  }
  if (L.stored_bf16) {
    if (!lt_gemm(cb, stream, workspace, CUDA_R_16BF, t->data, N, K, xb, L.cols, out, N)) return 0;
  } else {
    const cuda_weight w = cuda_weight_of(t);
    for (uint64_t r0 = 0; r0 < N; r0 += L.chunk) {
      uint64_t nr = N - r0 < L.chunk ? N - r0 : L.chunk;
      if (dequant_mx_fits(w))
        dev_launch(dequant_mx_bf16_kernel, grid_for(nr * K / 16), 256, 0, stream, w, (int64_t)r0, (int64_t)nr, wb);
      else
        dev_launch(dequant_bf16_kernel, grid_for(nr * K), 256, 0, stream, w, (int64_t)r0, (int64_t)nr, wb);
      cuda_launched(cb, "matmul (weights to bf16)");
      if (!lt_gemm(cb, stream, workspace, CUDA_R_16BF, wb, nr, K, xb, L.cols, out + r0, N)) {
        if (r0 == 0) return 0;
        cuda_note(cb, cudaErrorNotSupported, "matmul (cuBLASLt declined a later chunk of rows)");
        return 1;
      }
    }
  }
  if (L.split) {
    dev_launch(add_split_kernel, grid_for((size_t)T * N), 256, 0, stream, out, (size_t)T * N, y);
    cuda_launched(cb, "matmul (hi + lo)");
  }
  return 1;
}

/* lt_matmul_on on the backend's stream, workspace and scratch. */
static int lt_matmul(cuda_backend *cb, const m3_tensor *t, const float *x, int T, float *y) {
  const lt_layout L = lt_layout_of(t, T);
  uint8_t *scratch = NULL;
  if (!L.direct && !(scratch = (uint8_t *)cuda_scratch(cb, L.bytes, "matmul"))) return 0;
  return lt_matmul_on(cb, cb->stream, cb->lt_workspace, scratch, L, t, x, NULL, T, y);
}

void cuda_to_bf16(cuda_backend *cb, cudaStream_t stream, const float *x, size_t n,
                  __nv_bfloat16 *out) {
  if (n == 0) return;
  dev_launch(to_bf16_kernel, grid_for(n), 256, 0, stream, x, n, 0, out);
  cuda_launched(cb, "bf16 activations");
}

/* ---- E4M3 weights (MXFP8, FP8 block, per channel) on the tensor cores, 1..64 tokens ----
 * (the inner loop, mx_accumulate, and its fragment layout: weight_load.cuh)
 * A block of MX_WARPS warps: WR of them side by side over rows (each MT tiles of 16 rows), the
 * other MX_WARPS / WR splitting K in groups of U blocks of 32 columns; the K-split partials
 * meet in shared memory in a fixed order, so results do not depend on timing. x: up to 8 tokens
 * straight from float32 (L1), split in registers; more tokens from a hi/lo BF16 copy made first
 * (to_bf16_kernel), which the WR warps of a block that share K then read through L1. */

/* y[t, r] = dot(W[r, :], x[t, :]) for t < T <= 8 * NTB, W E4M3 [N, K] (mx_weight_fits).
 * PRESPLIT: xs holds x as BF16 hi [T, K] then lo [T, K]; otherwise x (16-byte aligned) is read as
 * float32 and split here. */
template <int NTB, int MT, int WR, int PRESPLIT, int U>
__global__ void __launch_bounds__(32 * MX_WARPS)
    mx_mma_kernel(cuda_weight w, const float *__restrict__ x, const uint16_t *__restrict__ xs,
                  int T, float *__restrict__ y) {
  dev_pdl_enter();
  constexpr int WK = MX_WARPS / WR, ACC = MT * NTB * 4;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2;
  const int wr = warp % WR, wk = warp / WR;
  const int64_t N = w.rows, K = w.cols;
  int64_t rows[MT][2];
  mx_rows<MT>(w, ((int64_t)blockIdx.x * WR + wr) * 16 * MT, rows);
  mx_x xr[NTB];
#pragma unroll
  for (int n = 0; n < NTB; n++) {
    const int t = 8 * n + g;
    xr[n] = mx_x{NULL, NULL, NULL};
    if (t < T) {
      if (PRESPLIT) xr[n].hi = xs + (size_t)t * K, xr[n].lo = xs + ((size_t)T + t) * K;
      else xr[n].f = x + (size_t)t * K;
    }
  }
  float acc[MT][NTB][4] = {};
  uint32_t nan_bits[MT][2] = {};
  mx_accumulate<NTB, MT, PRESPLIT, U>(w, rows, xr, wk, WK, acc, nan_bits);
  mx_mark_nan<NTB, MT>(nan_bits, acc);
  __shared__ float partial[MX_WARPS][ACC][32];
#pragma unroll
  for (int m = 0; m < MT; m++)
#pragma unroll
    for (int n = 0; n < NTB; n++)
#pragma unroll
      for (int i = 0; i < 4; i++) partial[warp][(m * NTB + n) * 4 + i][lane] = acc[m][n][i];
  __syncthreads();
  for (int e = threadIdx.x; e < WR * ACC * 32; e += 32 * MX_WARPS) {
    const int l = e % 32, idx = (e / 32) % ACC, ew = e / (32 * ACC); /* ew: the row group wr */
    const int i = idx % 4, n = (idx / 4) % NTB, m = idx / (4 * NTB);
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < WK; k++) sum += partial[k * WR + ew][idx][l];
    const int64_t r = ((int64_t)blockIdx.x * WR + ew) * 16 * MT + 16 * m + (l >> 2) + (i >= 2 ? 8 : 0);
    const int t = 8 * n + 2 * (l & 3) + (i & 1);
    if (r < N && t < T) y[(size_t)t * N + r] = sum;
  }
}

/* 1 when the tensor-core kernel takes this weight and x at T tokens. One token stays on the GEMV:
 * on the H200 the GEMV reads q_proj at 46% of copy bandwidth, this kernel at 34% (lm_head 59 vs
 * 40%), while from 2 to 8 tokens this kernel holds its rate and the GEMV's falls (16% at 8). */
static int mx_mma_fits(const m3_tensor *t, const float *x, int T) {
  return T >= 2 && T <= MX_MAX_T && mx_weight_fits(t) && (T > 8 || (uintptr_t)x % 16 == 0);
}

template <int NTB, int MT, int WR, int PRESPLIT, int U = MX_U>
static void launch_mx(cuda_backend *cb, const cuda_weight &w, const float *x, const uint16_t *xs, int T, float *y) {
  const unsigned blocks = (unsigned)((w.rows + 16 * MT * WR - 1) / (16 * MT * WR));
  dev_launch(mx_mma_kernel<NTB, MT, WR, PRESPLIT, U>, blocks, 32 * MX_WARPS, 0, cb->stream, w, x, xs, T, y);
}

/* More than 8 tokens: the hi/lo copy of x, and as many warps of a block side by side over rows
 * (sharing x through L1) as still leave a block per SM. */
template <int NTB>
static void launch_mx_split(cuda_backend *cb, const cuda_weight &w, const uint16_t *xs, int T, float *y) {
  const int64_t tiles = (w.rows + 15) / 16, sms = cb->num_sms;
  if (tiles >= 4 * sms) launch_mx<NTB, 1, 4, 1>(cb, w, NULL, xs, T, y);
  else if (tiles >= 2 * sms) launch_mx<NTB, 1, 2, 1>(cb, w, NULL, xs, T, y);
  else launch_mx<NTB, 1, 1, 1>(cb, w, NULL, xs, T, y);
}

/* Up to 8 tokens: 32 rows a block where that still gives every SM a block (fewer, fuller waves:
 * q_proj's 256 blocks of 32 rows fit the H200's 2 x 132 slots at once, its 512 blocks of 16 rows
 * do not; each block keeps 32 KB of loads in flight), else 16 rows with loads twice as deep, so
 * that the fewer blocks of a short matrix (a 3072-row expert: 192) still keep as many bytes in
 * flight. */
static void launch_mx_mma(cuda_backend *cb, const m3_tensor *t, const float *x, int T, float *y) {
  const cuda_weight w = cuda_weight_of(t);
  if (T <= 8) {
    if ((t->rows + 31) / 32 >= (int64_t)cb->num_sms) launch_mx<1, 2, 1, 0>(cb, w, x, NULL, T, y);
    else launch_mx<1, 1, 1, 0, 2 * MX_U>(cb, w, x, NULL, T, y);
  } else {
    const size_t n = (size_t)T * (size_t)t->cols;
    uint16_t *xs = (uint16_t *)cuda_scratch(cb, n * 4, "matmul");
    if (!xs) return;
    dev_launch(to_bf16_kernel, grid_for(n), 256, 0, cb->stream, x, n, 1, (__nv_bfloat16 *)xs);
    cuda_launched(cb, "matmul (bf16 activations)");
    if (T <= 16) launch_mx_split<2>(cb, w, xs, T, y);
    else if (T <= 32) launch_mx_split<4>(cb, w, xs, T, y);
    else launch_mx_split<8>(cb, w, xs, T, y);
  }
  cuda_launched(cb, "matmul (e4m3 tensor cores)");
}

enum { ROUTE_MX, ROUTE_GEMV, ROUTE_GEMM };

/* Which kernel family cuda_matmul runs w at T tokens on (T >= 1). */
static int matmul_route(const m3_tensor *w, const float *x, int T) {
  /* BF16 weights need no decoding on the way to the tensor cores, and from GEMV_BF16_MAX_T + 1
   * tokens on those with split activations beat the GEMV's FMAs at the same accuracy, except on
   * short matrices, where cuBLASLt's fixed cost shows (H200, T = 8: q_proj 83 -> 33 us, a
   * 3072-row expert 61 -> 20 us, but k_proj's 512 rows 17 -> 23 us). */
  const int bf16_tall = w->quant == M3_WQ_NONE && w->dtype == M3_DT_BF16 && w->rows >= GEMV_BF16_LT_ROWS;
  if (mx_mma_fits(w, x, T)) return ROUTE_MX;
  if (T <= (bf16_tall ? GEMV_BF16_MAX_T : GEMV_MAX_T)) return ROUTE_GEMV;
  return ROUTE_GEMM;
}

void cuda_matmul(m3_backend *be, const m3_tensor *w, const float *x, int T, float *y) {
  cuda_backend *cb = cuda_of(be);
  if (T <= 0 || w->rows <= 0) return;
  switch (matmul_route(w, x, T)) {
    case ROUTE_MX: launch_mx_mma(cb, w, x, T, y); break;
    case ROUTE_GEMV: launch_gemv(cb, w, x, T, y); break;
    default:
      if (!lt_matmul(cb, w, x, T, y)) launch_tiled(cb, cb->stream, w, x, T, y);
  }
}

/* The outputs of a set that take cuBLASLt on BF16 activations (a prefill's projections), 2 of
 * them at least: x rounded to BF16 once, where each would round it again (q, k, v and the index
 * projections of an 8192-token prefill: 4 of 5 conversions of 200 MB saved, H200 MXFP8: the set
 * 1.94 -> 1.47 ms); each product as matmul computes it alone (the same rounding, plan and chunks).
 * Returns the bits of the outputs done (a weight cuBLASLt declines gets the tiled kernel, as in
 * matmul). */
static uint32_t matmul_set_gemms(cuda_backend *cb, const float *x, int T, const m3_matmul_out *out, int n) {
  uint32_t mine = 0;
  size_t bytes = 0;
  int64_t K = -1;
  lt_layout L[M3_MATMUL_SET_MAX];
  for (int i = 0; i < n; i++) {
    const m3_tensor *w = out[i].w;
    if (w->rows <= 0 || (K >= 0 && w->cols != K) || matmul_route(w, x, T) != ROUTE_GEMM) continue;
    L[i] = lt_layout_of(w, T);
    if (L[i].direct || L[i].split) continue;
    mine |= 1u << i;
    bytes = L[i].bytes > bytes ? L[i].bytes : bytes;
    K = w->cols;
  }
  if (__builtin_popcount(mine) < 2) return 0;
  uint8_t *scratch = (uint8_t *)cuda_scratch(cb, bytes, "matmul_set");
  if (!scratch) return 0; /* each output then takes matmul's way (the tiled kernel) */
  __nv_bfloat16 *xb = (__nv_bfloat16 *)scratch; /* where each would put its own copy */
  cuda_to_bf16(cb, cb->stream, x, (size_t)T * (size_t)K, xb);
  for (int i = 0; i < n; i++)
    if ((mine >> i & 1u) && !lt_matmul_on(cb, cb->stream, cb->lt_workspace, scratch, L[i], out[i].w, x, xb, T,
                                          out[i].y))
      launch_tiled(cb, cb->stream, out[i].w, x, T, out[i].y);
  return mine;
}

/* One token: the E4M3 outputs together tall enough for mx1_set_kernel (mx1_rows_fit), each of
 * them mx1_fits, take one launch of it, each row as its matmul computes it alone. The outputs of
 * each other kind of gemv_step_kind (WK_ANY aside), 2 of them at least, take one launch: whose
 * weights together are tall enough for gemv_warp_kernel (gemv_warp_rows of their summed rows),
 * gemv_set_kernel at the RW that sum gets (a weight that alone takes gemv_warp_kernel at that RW
 * gets the same bits as matmul; a short one, alone gemv_kernel's K split, differs by rounding);
 * shorter together, gemv_rows_set_kernel, each of them gemv_kernel's bits. More tokens: the
 * cuBLASLt products share one BF16 copy of x (matmul_set_gemms). Everything else (other kinds, a
 * weight alone of its kind) is matmul's, output by output. */
void cuda_matmul_set(m3_backend *be, const float *x, int T, const m3_matmul_out *out, int n) {
  cuda_backend *cb = cuda_of(be);
  uint32_t grouped = 0; /* bit i: out[i] went into a gemv_set_kernel launch */
  if (T == 1 && n <= M3_MATMUL_SET_MAX)
    for (int kind = 0; kind < WK_ANY; kind++) {
      int idx[M3_MATMUL_SET_MAX], g = 0;
      int64_t rows = 0;
      for (int i = 0; i < n; i++)
        if (out[i].w->rows > 0 && gemv_step_kind(out[i].w, x) == kind) {
          idx[g++] = i;
          rows += out[i].w->rows;
        }
      int mx1 = kind == WK_E4M3 && g > 0 && mx1_rows_fit(cb, rows);
      for (int i = 0; i < g && mx1; i++) mx1 = mx1_fits(out[idx[i]].w, x, cb->smem_optin);
      if (mx1) {
        launch_mx1_set(cb, x, out, idx, g);
        for (int i = 0; i < g; i++) grouped |= 1u << idx[i];
        continue;
      }
      const int RW = gemv_warp_rows(cb, kind, rows);
      if (g < 2) continue;
      /* short together (each alone gemv_kernel, a block a row): one launch of those blocks */
      if (RW) launch_gemv_set(cb, kind, RW, x, out, idx, g);
      else launch_gemv_rows_set(cb, kind, x, out, idx, g);
      for (int i = 0; i < g; i++) grouped |= 1u << idx[i];
    }
  if (T > 1 && n <= M3_MATMUL_SET_MAX) grouped |= matmul_set_gemms(cb, x, T, out, n);
  for (int i = 0; i < n; i++)
    if (i >= M3_MATMUL_SET_MAX || !(grouped >> i & 1u)) cuda_matmul(be, out[i].w, x, T, out[i].y);
}

int cuda_matmul_is_gemm(const m3_tensor *w, const float *x, int T) {
  return T >= 1 && w->rows >= 1 && matmul_route(w, x, T) == ROUTE_GEMM;
}

size_t cuda_matmul_lane_scratch(const m3_tensor *w, int T) { return lt_layout_of(w, T).bytes; }

int cuda_matmul_takes_bf16(const m3_tensor *w, int T) {
  const lt_layout L = lt_layout_of(w, T);
  return !L.direct && !L.split;
}

void cuda_matmul_lane(cuda_backend *cb, cuda_lane *lane, const m3_tensor *w, const float *x,
                      const __nv_bfloat16 *xb, int T, float *y) {
  if (T <= 0 || w->rows <= 0) return;
  const lt_layout L = lt_layout_of(w, T);
  if (!lane) {
    uint8_t *scratch = NULL;
    if ((L.direct || (scratch = (uint8_t *)cuda_scratch(cb, L.bytes, "matmul"))) &&
        lt_matmul_on(cb, cb->stream, cb->lt_workspace, scratch, L, w, x, xb, T, y))
      return;
    launch_tiled(cb, cb->stream, w, x, T, y); /* as cuda_matmul does */
    return;
  }
  if (L.bytes > lane->scratch_bytes) {
    cuda_note(cb, cudaErrorInvalidValue, "matmul (lane scratch smaller than the layout)");
    return;
  }
  if (!lt_matmul_on(cb, lane->stream, lane->lt_workspace, (uint8_t *)lane->scratch, L, w, x, xb,
                    T, y))
    launch_tiled(cb, lane->stream, w, x, T, y);
}

/* ---- embedding ---- */

enum { EMBED_THREADS = 256 };
/* How embed_kernel reads a row: 4 columns in one load (BF16: 8 bytes, F32: 16; cols % 4 == 0 and
 * the table aligned to that), or element by element through dev_w (any dtype, scales applied). */
enum { EMBED_ANY, EMBED_BF16, EMBED_F32 };

/* out[t] = table[ids[t]]. Grid (T, column blocks): a thread copies 4 columns with its loads
 * independent of each other (one block of 256 threads per token walked 6144 columns 256 at a
 * time: 24 dependent round trips, 14 us). VEC_OUT: out rows 16-byte aligned (cols % 4 == 0). */
__global__ void __launch_bounds__(EMBED_THREADS)
    embed_kernel(cuda_weight table, int kind, int vec_out, const int32_t *__restrict__ ids,
                 float *__restrict__ out) {
  dev_pdl_enter();
  const int64_t t = blockIdx.x, cols = table.cols;
  const int64_t c = ((int64_t)blockIdx.y * EMBED_THREADS + threadIdx.x) * 4;
  if (c >= cols) return;
  const int32_t id = ids[t];
  float v[4];
  if (id < 0 || id >= table.rows) {
    /* The model validates ids; an invalid one shows up as NaN rather than reading past the table. */
    v[0] = v[1] = v[2] = v[3] = __uint_as_float(0x7fc00000u);
  } else if (kind == EMBED_BF16) {
    const uint2 u = *(const uint2 *)(table.data + ((size_t)id * (size_t)cols + (size_t)c) * 2);
    v[0] = __uint_as_float(u.x << 16), v[1] = __uint_as_float(u.x & 0xffff0000u);
    v[2] = __uint_as_float(u.y << 16), v[3] = __uint_as_float(u.y & 0xffff0000u);
  } else if (kind == EMBED_F32) {
    const float4 f = *(const float4 *)(table.data + ((size_t)id * (size_t)cols + (size_t)c) * 4);
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
  } else {
#pragma unroll
    for (int i = 0; i < 4; i++) v[i] = c + i < cols ? dev_w(table, id, c + i) : 0.0f;
  }
  float *row = out + (size_t)t * (size_t)cols + c;
  if (vec_out) {
    *(float4 *)row = make_float4(v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; i++)
      if (c + i < cols) row[i] = v[i];
  }
}

void cuda_embed(m3_backend *be, const m3_tensor *table, const int32_t *ids, int T, float *out) {
  cuda_backend *cb = cuda_of(be);
  if (T <= 0 || table->cols <= 0) return;
  const int64_t cols = table->cols;
  const uintptr_t data = (uintptr_t)table->data;
  int kind = EMBED_ANY;
  if (table->quant == M3_WQ_NONE && cols % 4 == 0) {
    if (table->dtype == M3_DT_BF16 && data % 8 == 0) kind = EMBED_BF16;
    if (table->dtype == M3_DT_F32 && data % 16 == 0) kind = EMBED_F32;
  }
  const int vec_out = cols % 4 == 0 && (uintptr_t)out % 16 == 0;
  const dim3 grid((unsigned)T, (unsigned)((cols + 4 * EMBED_THREADS - 1) / (4 * EMBED_THREADS)));
  dev_launch(embed_kernel, grid, EMBED_THREADS, 0, cb->stream, cuda_weight_of(table), kind, vec_out, ids, out);
  cuda_launched(cb, "embed");
}
