/* moe_grouped.cu: the routed experts of a prefill as two grouped GEMMs on the BF16 tensor cores,
 * issued without waiting for the host (issue 7). moe.cu's moe_group_kernel has sorted the T*k
 * slots by expert (expert e owns positions [start[e], start[e + 1])); here:
 *   1. gather: xy [n, H] = BF16(h[token of the slot at each position]);
 *   2. tile offsets: tile_start[e] = sum over e' < e of ceil(cnt_e' / GG_BM), on the device;
 *   3. gate/up GEMM, SwiGLU-OAI fused: act [n, I] = BF16(SwiGLU-OAI(xy gate_e^T, xy up_e^T));
 *   4. down GEMM: y [n, H] = act down_e^T, float32 (moe.cu's combine follows).
 * The GEMMs launch a grid of (n-tiles, an upper bound on the m-tiles): block row y finds its
 * expert by binary search in tile_start and exits when y is past the real count. A block computes
 * C [GG_BM rows, GG_BN columns] = A [rows, K] W [columns, K]^T, both operands K-contiguous, with
 * mma.sync m16n8k16 (BF16 in, float32 accumulate); tiles of K go global -> shared memory by
 * 16-byte cp.async in a GG_STAGES-deep ring (rows outside the tile's valid range zero-filled,
 * their addresses clamped to a valid row), and shared memory -> fragments by ldmatrix.
 * MXFP8 experts (E4M3 bytes, an e8m0 scale per row and 32 columns: one scale per row of a K tile)
 * come into shared memory as bytes; each thread decodes the 16 it copied, times their scale, into
 * a BF16 B tile that the warps then read as above: the values dequant_mx_bf16_kernel gives the
 * lanes' GEMMs (exact in float32, one rounding to BF16).
 * Results do not depend on timing: every output element is one block's fixed-order sum. */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "backend/cuda/cuda_internal.h"

enum {
  GG_BM = 128,            /* sorted rows (tokens) of one tile */
  GG_BN = 128,            /* B rows of one tile: down's 128 output columns, or gate's 64 and up's 64 */
  GG_BN_GATED = GG_BN / 2, /* act columns of one gate/up tile */
  GG_BK = MOE_GROUPED_BK, /* 32 columns of K: a tile row is 64 bytes, 4 chunks of 16 */
  GG_STAGES = 4,
  GG_THREADS = 256,       /* 8 warps: 2 over rows (64 each) x 4 over columns (32 each) */
  GG_TILE_BYTES = GG_BM * GG_BK * 2, /* 8 KB; A and B tiles alike (GG_BM == GG_BN) */
  GG_MX_TILE_BYTES = GG_BN * GG_BK,  /* 4 KB: a B tile of E4M3 bytes */
  GG_GATHER_THREADS = 256,
  GG_MAX_GRID_Y = 65535,
};

/* A ring slot: the A tile, then the B tile (BF16, or MX: E4M3 bytes); MX adds one decoded BF16 B
 * tile after the ring. 64 KB (BF16) or 56 KB (MX): past the default 48 KB, opted in. */
template <int MX> struct gg_smem_layout {
  enum {
    stage = GG_TILE_BYTES + (MX ? GG_MX_TILE_BYTES : GG_TILE_BYTES),
    decoded = GG_STAGES * stage,
    bytes = decoded + (MX ? GG_TILE_BYTES : 0),
  };
};

/* The byte offset of 16-byte chunk c (0..3) of tile row r: rows are 64 bytes, so 8 rows at one
 * chunk (what one ldmatrix phase reads) would fall in 2 bank groups of 16 bytes; XORing the chunk
 * with bits 1-2 of the row spreads any 8 consecutive rows from a multiple of 8 over all 8 groups
 * (4r + (c ^ ((r >> 1) & 3)) mod 8 is distinct for r = 0..7). */
__device__ __forceinline__ uint32_t gg_swizzle(int r, int c) {
  return (uint32_t)(r * (GG_BK * 2) + ((c ^ ((r >> 1) & 3)) << 4));
}

/* 16 bytes global -> shared, bypassing L1; bytes = 0 reads nothing and writes zeros. */
__device__ __forceinline__ void gg_cp_async16(uint32_t dst, const void *src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void gg_cp_async_commit(void) {
  asm volatile("cp.async.commit_group;" ::: "memory");
}

/* Waits until at most N of this thread's committed groups are pending. */
template <int N>
__device__ __forceinline__ void gg_cp_async_wait(void) {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

/* Four 8x8 BF16 matrices: lanes 8i .. 8i + 7 give the row addresses of matrix i, which lands in
 * r[i]; lane 4g + q receives row g, elements 2q and 2q + 1 of each. */
__device__ __forceinline__ void gg_ldmatrix_x4(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

/* d += A B for one m16n8k16 tile in the PTX ISA's fragment order. */
__device__ __forceinline__ void gg_mma(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* K tile kt (this thread's two chunks of A, and of B: two of BF16 at dst, or MX one of E4M3
 * bytes at dst_mx) into ring slot kt % GG_STAGES of the shared memory at smem. src_b: the chunks'
 * bytes at k = 0. */
template <int MX>
__device__ __forceinline__ void gg_load_stage(uint32_t smem, int kt, const __nv_bfloat16 *const src_a[2],
                                              const int bytes_a[2], const uint8_t *const src_b[2],
                                              const int bytes_b[2], const uint32_t dst[2], uint32_t dst_mx) {
  const uint32_t sa = smem + (uint32_t)(kt % GG_STAGES) * gg_smem_layout<MX>::stage, sb = sa + GG_TILE_BYTES;
  const size_t koff = (size_t)kt * GG_BK;
#pragma unroll
  for (int j = 0; j < 2; j++) gg_cp_async16(sa + dst[j], src_a[j] + koff, bytes_a[j]);
  if (MX) {
    gg_cp_async16(sb + dst_mx, src_b[0] + koff, bytes_b[0]);
  } else {
#pragma unroll
    for (int j = 0; j < 2; j++) gg_cp_async16(sb + dst[j], src_b[j] + koff * 2, bytes_b[j]);
  }
}

/* This thread's 16 E4M3 bytes of the B tile (raw, in shared memory) times 2^(s - 127) as BF16,
 * into chunks 2 c and 2 c + 1 of row r of the decoded tile at out: E4M3 -> half -> float is exact
 * and so is the product in float32 (at least 2^-136), rounded once, as dequant_mx_bf16_kernel
 * rounds it; NaN bytes and scale 0xFF give NaN as on the CPU. */
__device__ __forceinline__ void gg_decode_mx(const uint8_t *raw, uint8_t s, uint8_t *out, int r, int c) {
  const uint4 u = *(const uint4 *)raw;
  const uint32_t p[4] = {u.x, u.y, u.z, u.w};
  const float sf = dev_e8m0(s);
  uint32_t o[8];
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 2; j++) {
      const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)((p[i] >> (16 * j)) & 0xffff), __NV_E4M3);
      const float2 f = __half22float2(__half2(h));
      const __nv_bfloat162 b = __floats2bfloat162_rn(f.x * sf, f.y * sf);
      o[2 * i + j] = *(const uint32_t *)&b;
    }
  *(uint4 *)(out + gg_swizzle(r, 2 * c)) = make_uint4(o[0], o[1], o[2], o[3]);
  *(uint4 *)(out + gg_swizzle(r, 2 * c + 1)) = make_uint4(o[4], o[5], o[6], o[7]);
}

/* The sorted positions [*s0, *s1) of expert e, clamped into [0, n): the offsets come from device
 * memory, and both the tile offsets and the GEMMs hold their reads to this range. */
__device__ __forceinline__ void gg_expert_rows(const int32_t *start, int e, int n, int *s0, int *s1) {
  const int a = min(max(start[e], 0), n);
  *s0 = a;
  *s1 = min(max(start[e + 1], a), n);
}

/* xy[p] = BF16(h[slot_at[p] / k]) for the used positions p < min(start[E], n); one block per
 * position of the grid's n, the unused ones exit. H % 4 == 0, h 16-byte aligned. */
__global__ void __launch_bounds__(GG_GATHER_THREADS)
    moe_gather_bf16_kernel(const float *__restrict__ h, const int32_t *__restrict__ slot_at,
                           const int32_t *__restrict__ start, int E, int k, int n, int64_t H,
                           __nv_bfloat16 *__restrict__ xy) {
  const int p = blockIdx.x;
  if (p >= min(start[E], n)) return;
  const float4 *src = (const float4 *)(h + (size_t)(slot_at[p] / k) * (size_t)H);
  __nv_bfloat162 *dst = (__nv_bfloat162 *)(xy + (size_t)p * (size_t)H);
  for (int64_t c = threadIdx.x; c < H / 4; c += blockDim.x) {
    const float4 v = src[c];
    dst[2 * c] = __floats2bfloat162_rn(v.x, v.y);
    dst[2 * c + 1] = __floats2bfloat162_rn(v.z, v.w);
  }
}

/* tile_start[e] = sum over e' < e of ceil(cnt_e' / GG_BM), tile_start[E] the total: one warp,
 * an inclusive scan of 32 experts at a time. */
__global__ void __launch_bounds__(32)
    moe_tile_offsets_kernel(const int32_t *__restrict__ start, int E, int n,
                            int32_t *__restrict__ tile_start) {
  const unsigned all = 0xffffffffu;
  const int lane = threadIdx.x;
  int run = 0;
  for (int e0 = 0; e0 < E; e0 += 32) {
    const int e = e0 + lane;
    int c = 0;
    if (e < E) {
      int s0, s1;
      gg_expert_rows(start, e, n, &s0, &s1);
      c = (s1 - s0 + GG_BM - 1) / GG_BM;
    }
    int incl = c;
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(all, incl, o);
      if (lane >= o) incl += v;
    }
    if (e < E) tile_start[e] = run + incl - c;
    run += __shfl_sync(all, incl, 31);
  }
  if (lane == 0) tile_start[E] = run;
}

/* One (expert, m-tile, n-tile) of a grouped GEMM. blockIdx.y: the m-tile in tile_start's
 * numbering; blockIdx.x: the n-tile. a: [n, K] BF16 in sorted order; ws: the experts' weights,
 * BF16 [N, K] or MX (GATED: gate at ws[e], up at ws[E + e]; otherwise down at ws[e]).
 * GATED: B rows 0..63 are gate rows i0 .. i0 + 63, rows 64..127 the same rows of up; warp wn
 * takes B rows 16 wn .. + 15 of both (n8 tiles 0, 1: gate; 2, 3: up), so that each lane holds the
 * gate and up sums of the same (row, column) and writes out (BF16 [n, N]) = their SwiGLU-OAI.
 * Otherwise warp wn takes B rows 32 wn .. + 31 and writes out (float32 [n, N]) as summed.
 * MX: the weights are MXFP8 (E4M3 [N, K], e8m0 scales [N, scale_cols], column block 32 = one K
 * tile); each K step first decodes the ring slot's bytes into the decoded tile (gg_decode_mx).
 * K % GG_BK == 0; a, the weights and out 16-byte aligned (and so their rows). */
template <int GATED, int MX>
__global__ void __launch_bounds__(GG_THREADS, 2)
    moe_grouped_gemm_kernel(const cuda_weight *__restrict__ ws, int E,
                            const int32_t *__restrict__ start, const int32_t *__restrict__ tile_start,
                            int n, const __nv_bfloat16 *__restrict__ a, int64_t K, int64_t N,
                            float alpha, float beta, float limit, void *__restrict__ out) {
  extern __shared__ __align__(128) uint8_t gg_smem[];
  const int tile = blockIdx.y;
  if (tile >= tile_start[E]) return; /* the whole block: past the real m-tile count */
  int lo = 0, hi = E; /* the expert with tile_start[e] <= tile < tile_start[e + 1] */
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (tile_start[mid] <= tile) lo = mid;
    else hi = mid;
  }
  const int e = lo;
  int s0, s1;
  gg_expert_rows(start, e, n, &s0, &s1);
  const int m0 = s0 + (tile - tile_start[e]) * GG_BM;
  const int rows = min(s1 - m0, (int)GG_BM); /* >= 1 by the tile count */
  if (rows <= 0) return;
  const int64_t n0 = (int64_t)blockIdx.x * (GATED ? GG_BN_GATED : GG_BN);
  const cuda_weight &w0 = ws[e], &w1 = GATED ? ws[E + e] : ws[e];

  /* This thread's cp.async chunks: i = tid + 256 j (j = 0, 1) of a tile's 512, row i / 4 and
   * chunk i % 4, in the A and (BF16) in the B tile; MX: B row tid / 2, bytes 16 (tid % 2) ..
   * + 15 of the K tile, and that row's scales. Rows outside the valid range read zeros from the
   * tile's first row (valid: rows >= 1, n0 < N). */
  const int tid = threadIdx.x;
  const __nv_bfloat16 *src_a[2];
  const uint8_t *src_b[2], *scales = NULL;
  int bytes_a[2], bytes_b[2];
  uint32_t dst[2];
#pragma unroll
  for (int j = 0; j < 2; j++) {
    const int i = tid + GG_THREADS * j, r = i >> 2, c = i & 3;
    dst[j] = gg_swizzle(r, c);
    bytes_a[j] = r < rows ? 16 : 0;
    src_a[j] = a + (size_t)(m0 + (r < rows ? r : 0)) * (size_t)K + 8 * c;
    const int rb = MX ? tid >> 1 : r, cb = MX ? tid & 1 : c;
    const cuda_weight &w = GATED && rb >= GG_BN_GATED ? w1 : w0;
    const int64_t wr = n0 + (GATED ? (rb & (GG_BN_GATED - 1)) : rb), wr_read = wr < N ? wr : n0;
    bytes_b[j] = wr < N ? 16 : 0;
    src_b[j] = w.data + ((size_t)wr_read * (size_t)K + (MX ? 16 : 8) * cb) * (MX ? 1 : 2);
    if (MX && wr < N) scales = w.scale + (size_t)wr * (size_t)w.scale_cols;
  }
  const uint32_t dst_mx = (uint32_t)((tid >> 1) * GG_BK + 16 * (tid & 1));
  const uint32_t smem = (uint32_t)__cvta_generic_to_shared(gg_smem);
  const int KT = (int)(K / GG_BK);
  /* MX: the scale of this thread's row for the K step about to be decoded, loaded a step ahead;
   * 127 (1.0) for a row past N, whose bytes are zeros */
  uint8_t scale_next = MX && scales ? scales[0] : 127;

  /* ldmatrix addresses. A (m16 tile mt, k16 step ks): lanes 0-7 rows 0-7 and 8-15 rows 8-15 at
   * k 0-7 (a0, a1), lanes 16-31 the same rows at k 8-15 (a2, a3): row lane & 15, chunk
   * 2 ks + lane / 16. B (n8 tile nt): lane 8i + j gives B row j at chunk i, so r[0], r[1] are b0,
   * b1 of k16 step 0 and r[2], r[3] those of step 1. Tile row bases are multiples of 8, so each
   * swizzle depends on the lane alone. */
  const int lane = tid & 31, warp = tid >> 5, wm = warp >> 2, wn = warp & 3;
  const int sw = (lane >> 1) & 3;
  const uint32_t a_row = (uint32_t)((64 * wm + (lane & 15)) * (GG_BK * 2));
  uint32_t a_chunk[2];
#pragma unroll
  for (int ks = 0; ks < 2; ks++) a_chunk[ks] = (uint32_t)(((2 * ks + (lane >> 4)) ^ sw) << 4);
  uint32_t b_off[4];
#pragma unroll
  for (int nt = 0; nt < 4; nt++) {
    const int brow = GATED ? (nt >> 1) * GG_BN_GATED + 16 * wn + 8 * (nt & 1) : 32 * wn + 8 * nt;
    b_off[nt] = (uint32_t)((brow + (lane & 7)) * (GG_BK * 2) + (((lane >> 3) ^ sw) << 4));
  }

  float acc[4][4][4];
#pragma unroll
  for (int mt = 0; mt < 4; mt++)
#pragma unroll
    for (int nt = 0; nt < 4; nt++)
#pragma unroll
      for (int i = 0; i < 4; i++) acc[mt][nt][i] = 0.0f;

  /* The ring: GG_STAGES - 1 tiles in flight ahead of the one computed. One commit per step (empty
   * past the last tile), so before step kt exactly GG_STAGES - 1 + kt groups are committed and
   * waiting until GG_STAGES - 2 are pending means tile kt has landed. The barrier after the wait
   * makes every thread's copies visible and also ends every warp's reads of step kt - 1, whose
   * slot (kt - 1) % GG_STAGES = (kt + GG_STAGES - 1) % GG_STAGES the next load reuses. */
#pragma unroll
  for (int s = 0; s < GG_STAGES - 1; s++) {
    if (s < KT) gg_load_stage<MX>(smem, s, src_a, bytes_a, src_b, bytes_b, dst, dst_mx);
    gg_cp_async_commit();
  }
  for (int kt = 0; kt < KT; kt++) {
    gg_cp_async_wait<GG_STAGES - 2>();
    __syncthreads();
    if (kt + GG_STAGES - 1 < KT)
      gg_load_stage<MX>(smem, kt + GG_STAGES - 1, src_a, bytes_a, src_b, bytes_b, dst, dst_mx);
    gg_cp_async_commit();
    const uint32_t sa = smem + (uint32_t)(kt % GG_STAGES) * gg_smem_layout<MX>::stage;
    uint32_t sb = sa + GG_TILE_BYTES;
    if (MX) {
      /* the bytes this thread copied (its own wait covers them) into the decoded tile, which
       * every warp finished reading in step kt - 1 (the barrier above); a second barrier
       * publishes it */
      const uint8_t s_now = scale_next;
      if (scales && kt + 1 < KT) scale_next = scales[kt + 1];
      gg_decode_mx(gg_smem + (sb - smem) + dst_mx, s_now, gg_smem + gg_smem_layout<MX>::decoded,
                   tid >> 1, tid & 1);
      __syncthreads();
      sb = smem + gg_smem_layout<MX>::decoded;
    }
    uint32_t bf[4][4];
#pragma unroll
    for (int nt = 0; nt < 4; nt++) gg_ldmatrix_x4(bf[nt], sb + b_off[nt]);
#pragma unroll
    for (int ks = 0; ks < 2; ks++)
#pragma unroll
      for (int mt = 0; mt < 4; mt++) {
        uint32_t af[4];
        gg_ldmatrix_x4(af, sa + a_row + (uint32_t)(mt * 16 * GG_BK * 2) + a_chunk[ks]);
#pragma unroll
        for (int nt = 0; nt < 4; nt++) gg_mma(acc[mt][nt], af, bf[nt][2 * ks], bf[nt][2 * ks + 1]);
      }
  }
  gg_cp_async_wait<0>(); /* only empty groups remain; none outlives the block */

  /* C fragment: lane 4g + q holds rows g (c0, c1) and g + 8 (c2, c3) at columns 2q, 2q + 1 of
   * each n8 tile. Columns come in even pairs and N is even: a pair is inside N or past it. */
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int mt = 0; mt < 4; mt++)
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
      const int r = 64 * wm + 16 * mt + g + 8 * hh;
      if (r >= rows) continue;
      const size_t row = (size_t)(m0 + r) * (size_t)N;
      if (GATED) {
        __nv_bfloat16 *o = (__nv_bfloat16 *)out + row;
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
          const int64_t col = n0 + 16 * wn + 8 * nt + 2 * q;
          if (col >= N) continue;
          const float v0 = dev_swiglu_oai(acc[mt][nt][2 * hh], acc[mt][nt + 2][2 * hh], alpha, beta, limit);
          const float v1 = dev_swiglu_oai(acc[mt][nt][2 * hh + 1], acc[mt][nt + 2][2 * hh + 1], alpha, beta, limit);
          *(__nv_bfloat162 *)(o + col) = __floats2bfloat162_rn(v0, v1);
        }
      } else {
        float *o = (float *)out + row;
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
          const int64_t col = n0 + 32 * wn + 8 * nt + 2 * q;
          if (col < N) *(float2 *)(o + col) = make_float2(acc[mt][nt][2 * hh], acc[mt][nt][2 * hh + 1]);
        }
      }
    }
}

/* The stored forms the GEMMs read: BF16, or MXFP8 (E4M3 with an e8m0 scale per row and 32
 * columns, rows a multiple of 16 bytes); both 16-byte aligned (the caller's `wide`). */
static int gg_weight_fits(const m3_tensor *t) {
  if (t->dtype == M3_DT_BF16 && t->quant == M3_WQ_NONE) return 1;
  return t->dtype == M3_DT_F8_E4M3 && t->quant == M3_WQ_MXFP8 && t->scale &&
         t->scale_cols >= t->cols / GG_BK;
}

int cuda_moe_grouped_fits(const m3_moe_experts *ex, int wide, const float *h, int n) {
  const m3_tensor *g0 = &ex->gate[0], *d0 = &ex->down[0];
  const int64_t H = g0->cols, I = g0->rows;
  const int64_t m_tiles = ((int64_t)n + GG_BM - 1) / GG_BM + (ex->E < n ? ex->E : n);
  /* up and every other expert share gate[0]'s or down[0]'s form (moe.cu check_experts) */
  return wide && gg_weight_fits(g0) && gg_weight_fits(d0) && H > 0 && I > 0 && H % GG_BK == 0 &&
         I % GG_BK == 0 && (uintptr_t)h % 16 == 0 && n > 0 && m_tiles <= GG_MAX_GRID_Y;
}

/* Launches moe_grouped_gemm_kernel<GATED, MX>, allowing it its dynamic shared memory on cb's
 * device first (once per device). */
template <int GATED, int MX>
static void gg_launch(cuda_backend *cb, dim3 grid, const cuda_weight *ws, int E, const int32_t *start,
                      const int32_t *tile_start, int n, const __nv_bfloat16 *a, int64_t K, int64_t N,
                      const m3_moe_experts *ex, void *out) {
  static uint64_t opted; /* bit d: done on device d (devices past 63: every call) */
  const uint64_t bit = cb->device < 64 ? 1ull << cb->device : 0;
  const int smem = gg_smem_layout<MX>::bytes;
  if (!bit || !(opted & bit)) {
    cuda_note(cb, cudaFuncSetAttribute(moe_grouped_gemm_kernel<GATED, MX>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
              "moe_experts (grouped gemm shared memory)");
    opted |= bit;
  }
  moe_grouped_gemm_kernel<GATED, MX><<<grid, GG_THREADS, smem, cb->stream>>>(
      ws, E, start, tile_start, n, a, K, N, ex->alpha, ex->beta, ex->limit, out);
  cuda_launched(cb, GATED ? "moe_experts (grouped gate, up, swiglu)" : "moe_experts (grouped down)");
}

void cuda_moe_grouped(cuda_backend *cb, const m3_moe_experts *ex, const cuda_weight *w,
                      const int32_t *start, const int32_t *slot_at, int n, int k, const float *h,
                      int32_t *tile_start, __nv_bfloat16 *xy, __nv_bfloat16 *act, float *y) {
  const int E = ex->E;
  const int64_t H = ex->gate[0].cols, I = ex->gate[0].rows;
  moe_gather_bf16_kernel<<<(unsigned)n, GG_GATHER_THREADS, 0, cb->stream>>>(h, slot_at, start, E, k, n, H, xy);
  cuda_launched(cb, "moe_experts (gather to bf16)");
  moe_tile_offsets_kernel<<<1, 32, 0, cb->stream>>>(start, E, n, tile_start);
  cuda_launched(cb, "moe_experts (tile offsets)");
  const unsigned m_tiles = (unsigned)((n + GG_BM - 1) / GG_BM + (E < n ? E : n));
  const dim3 grid_gate((unsigned)((I + GG_BN_GATED - 1) / GG_BN_GATED), m_tiles);
  const dim3 grid_down((unsigned)((H + GG_BN - 1) / GG_BN), m_tiles);
  if (ex->gate[0].quant == M3_WQ_MXFP8)
    gg_launch<1, 1>(cb, grid_gate, w, E, start, tile_start, n, xy, H, I, ex, act);
  else
    gg_launch<1, 0>(cb, grid_gate, w, E, start, tile_start, n, xy, H, I, ex, act);
  if (ex->down[0].quant == M3_WQ_MXFP8)
    gg_launch<0, 1>(cb, grid_down, w + 2 * E, E, start, tile_start, n, act, I, H, ex, y);
  else
    gg_launch<0, 0>(cb, grid_down, w + 2 * E, E, start, tile_start, n, act, I, H, ex, y);
}
