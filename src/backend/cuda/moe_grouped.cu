/* moe_grouped.cu: the routed experts of a prefill as two grouped GEMMs on the BF16 tensor cores,
 * issued without waiting for the host (issue 7). moe.cu's moe_group_kernel has sorted the T*k
 * slots by expert (expert e owns positions [start[e], start[e + 1])); here:
 *   1. gather: xy [n, H] = BF16(h[token of the slot at each position]);
 *   2. tile offsets: tile_start[e] = sum over e' < e of ceil(cnt_e' / BM), on the device;
 *   3. gate/up GEMM, SwiGLU-OAI fused: act [n, I] = BF16(SwiGLU-OAI(xy gate_e^T, xy up_e^T));
 *   4. down GEMM: y [n, H] = act down_e^T, float32 (moe.cu's combine follows).
 * The GEMMs launch a grid of (n-tiles, an upper bound on the m-tiles): block row y finds its
 * expert by binary search in tile_start and exits when y is past the real count. A block computes
 * C [BM rows, BN columns] = A [rows, K] W [columns, K]^T, both operands K-contiguous, with
 * mma.sync m16n8k16 (BF16 in, float32 accumulate); tiles of K go global -> shared memory by
 * 16-byte cp.async in a STAGES-deep ring (rows outside the tile's valid range zero-filled,
 * their addresses clamped to a valid row), and shared memory -> fragments by ldmatrix.
 * MXFP8 experts (E4M3 bytes, an e8m0 scale per row and 32 columns: BK / 32 per row of a K tile)
 * come into shared memory as bytes; each thread decodes the 16-byte chunks it copied, times their
 * scales, into a BF16 B tile that the warps then read as above: the values
 * dequant_mx_bf16_kernel gives the lanes' GEMMs (exact in float32, one rounding to BF16).
 * Results do not depend on timing: every output element is one block's fixed-order sum. */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "backend/cuda/cuda_internal.h"

/* The candidate tiles (M3_MOE_GROUPED_TILE picks one at backend creation; unset: gg_tile's choice):
 * X(index, BM sorted rows, BN B rows, BK columns of K, STAGES of the cp.async ring, WM warps over
 * rows, MINB blocks per SM asked of the compiler). 8 warps: WM over rows x 8 / WM over B rows,
 * each warp BM / WM = 64 rows by BN * WM / 8 B rows (32 or 64). Gate/up tiles hold BN / 2 gate
 * rows and the same BN / 2 rows of up. MINB 2 caps registers at 128: only where that compiles
 * without spills (ptxas -v), else 1 and the shared memory sized for one block. */
#define GG_TILES(X)              \
  X(0, 128, 128, 32, 4, 2, 2)    \
  X(1, 128, 128, 64, 4, 2, 1)    \
  X(2, 128, 256, 32, 4, 2, 1)    \
  X(3, 64, 256, 32, 4, 1, 1)     \
  X(4, 128, 256, 64, 3, 2, 1)

enum {
  GG_THREADS = 256,
  GG_MX_BLOCK = 32, /* MXFP8 columns per e8m0 scale */
  GG_GATHER_THREADS = 256,
  GG_MAX_GRID_Y = 65535,
};

/* One tile configuration and the sizes that follow from it. */
template <int BM_, int BN_, int BK_, int STAGES_, int WM_, int MINB_> struct gg_cfg {
  enum {
    BM = BM_, BN = BN_, BK = BK_, STAGES = STAGES_, WM = WM_, WN = 8 / WM_, MIN_BLOCKS = MINB_,
    WTM = BM / WM, WTN = BN / WN, /* a warp's rows and B rows */
    MT = WTM / 16, NT = WTN / 8,  /* its m16 and n8 tiles */
    CPR = BK / 8,                 /* 16-byte chunks of a BF16 tile row */
    MX_CPR = BK / 16,             /* 16-byte chunks of an E4M3 tile row */
    AJ = BM * CPR / GG_THREADS, BJ = BN * CPR / GG_THREADS, XJ = BN * MX_CPR / GG_THREADS,
    A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2, MX_BYTES = BN * BK,
  };
  static_assert(WM * WN == 8 && WTM == 64 && (WTN == 32 || WTN == 64), "8 warps of 64 x 32 or 64 x 64");
  static_assert((BK == 32 || BK == 64) && AJ >= 1 && XJ >= 1, "tile shape");
};

/* A ring slot: the A tile, then the B tile (BF16, or MX: E4M3 bytes); MX adds one decoded BF16 B
 * tile after the ring. Past the default 48 KB: opted in (gg_launch). */
template <class C, int MX> struct gg_smem_layout {
  enum {
    stage = C::A_BYTES + (MX ? C::MX_BYTES : C::B_BYTES),
    decoded = C::STAGES * stage,
    bytes = decoded + (MX ? C::B_BYTES : 0),
  };
};

/* The byte offset of 16-byte chunk c of tile row r. BK 32: rows are 64 bytes, so 8 rows at one
 * chunk (what one ldmatrix phase reads) would fall in 2 bank groups of 16 bytes; XORing the chunk
 * with bits 1-2 of the row spreads any 8 consecutive rows from a multiple of 8 over all 8 groups
 * (4r + (c ^ ((r >> 1) & 3)) mod 8 is distinct for r = 0..7). BK 64: rows are 128 bytes, one
 * chunk per group; c ^ (r & 7) puts rows 0..7 in 8 distinct groups. */
template <int BK>
__device__ __forceinline__ uint32_t gg_swizzle(int r, int c) {
  return (uint32_t)(r * (BK * 2) + ((c ^ (BK == 64 ? (r & 7) : ((r >> 1) & 3))) << 4));
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

/* This thread's share of the cp.async copies of one K tile: chunk i = tid + 256 j of a tile, row
 * i / (chunks per row), chunk tid % (chunks per row) (256 is a multiple of the chunks per row, and
 * 256 / chunks per row a multiple of 8, so chunk j lands 4096 j bytes past chunk 0 in the swizzled
 * tile as in the raw E4M3 one). src: the chunks' bytes at k = 0, the tile's first row (A) or row
 * n0 (B) where the row is outside the valid range (its bit in zero_a / zero_b set: cp.async
 * writes zeros). MX: the B chunks are E4M3 (XJ of them), with their rows' scales at column block 0
 * of this chunk (NULL: a row past N). */
template <class C, int MX> struct gg_chunks {
  enum { BJ = MX ? C::XJ : C::BJ };
  const uint8_t *src_a[C::AJ], *src_b[BJ], *scales[MX ? BJ : 1];
  uint32_t dst, dst_mx; /* chunk 0's offset in a BF16 tile, in an E4M3 tile */
  uint32_t zero_a, zero_b;
};

/* K tile kt into ring slot kt % STAGES of the shared memory at smem. */
template <class C, int MX>
__device__ __forceinline__ void gg_load_stage(uint32_t smem, int kt, const gg_chunks<C, MX> &ch) {
  const uint32_t sa = smem + (uint32_t)(kt % C::STAGES) * gg_smem_layout<C, MX>::stage, sb = sa + C::A_BYTES;
  const size_t koff = (size_t)kt * C::BK;
#pragma unroll
  for (int j = 0; j < C::AJ; j++)
    gg_cp_async16(sa + ch.dst + 4096u * j, ch.src_a[j] + 2 * koff, (ch.zero_a >> j) & 1 ? 0 : 16);
#pragma unroll
  for (int j = 0; j < gg_chunks<C, MX>::BJ; j++)
    gg_cp_async16(sb + (MX ? ch.dst_mx : ch.dst) + 4096u * j, ch.src_b[j] + koff * (MX ? 1 : 2),
                  (ch.zero_b >> j) & 1 ? 0 : 16);
}

/* 16 E4M3 bytes of the B tile (raw, in shared memory) times 2^(s - 127) as BF16, into chunks 2 c
 * and 2 c + 1 of row r of the decoded tile at out: E4M3 -> half -> float is exact and so is the
 * product in float32 (at least 2^-136), rounded once, as dequant_mx_bf16_kernel rounds it; NaN
 * bytes and scale 0xFF give NaN as on the CPU. */
template <int BK>
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
  *(uint4 *)(out + gg_swizzle<BK>(r, 2 * c)) = make_uint4(o[0], o[1], o[2], o[3]);
  *(uint4 *)(out + gg_swizzle<BK>(r, 2 * c + 1)) = make_uint4(o[4], o[5], o[6], o[7]);
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

/* tile_start[e] = sum over e' < e of ceil(cnt_e' / bm), tile_start[E] the total: one warp, an
 * inclusive scan of 32 experts at a time. */
__global__ void __launch_bounds__(32)
    moe_tile_offsets_kernel(const int32_t *__restrict__ start, int E, int n, int bm,
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
      c = (s1 - s0 + bm - 1) / bm;
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

/* One (expert, m-tile, n-tile) of a grouped GEMM with tiles of C. blockIdx.y: the m-tile in
 * tile_start's numbering; blockIdx.x: the n-tile. a: [n, K] BF16 in sorted order; ws: the experts'
 * weights, BF16 [N, K] or MX (GATED: gate at ws[e], up at ws[E + e]; otherwise down at ws[e]).
 * Warp (wm, wn) computes rows 64 wm .. + 63 of the tile. GATED: B rows 0 .. BN/2 - 1 are gate rows
 * n0 .. n0 + BN/2 - 1, the next BN/2 the same rows of up; warp wn takes WTN/2 rows of each at
 * WTN/2 wn (its first NT/2 n8 tiles gate, the last NT/2 up), so that each lane holds the gate
 * and up sums of the same (row, column) and writes out (BF16 [n, N]) = their SwiGLU-OAI.
 * Otherwise warp wn takes B rows WTN wn .. + WTN - 1 and writes out (float32 [n, N]) as summed.
 * MX: the weights are MXFP8 (E4M3 [N, K], e8m0 scales [N, scale_cols], one per 32 columns: BK / 32
 * per row of a K tile); each K step first decodes the ring slot's bytes into the decoded tile.
 * K % BK == 0; a, the weights and out 16-byte aligned (and so their rows). */
template <class C, int GATED, int MX>
__global__ void __launch_bounds__(GG_THREADS, C::MIN_BLOCKS)
    moe_grouped_gemm_kernel(const cuda_weight *__restrict__ ws, int E,
                            const int32_t *__restrict__ start, const int32_t *__restrict__ tile_start,
                            int n, const __nv_bfloat16 *__restrict__ a, int64_t K, int64_t N,
                            float alpha, float beta, float limit, void *__restrict__ out) {
  enum { BK = C::BK, NT = C::NT, HALF_NT = C::NT / 2, B_CPR = MX ? C::MX_CPR : C::CPR,
         B_J = MX ? C::XJ : C::BJ };
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
  const int m0 = s0 + (tile - tile_start[e]) * C::BM;
  const int rows = min(s1 - m0, (int)C::BM); /* >= 1 by the tile count */
  if (rows <= 0) return;
  const int64_t n0 = (int64_t)blockIdx.x * (GATED ? C::BN / 2 : C::BN);
  const cuda_weight &w0 = ws[e], &w1 = GATED ? ws[E + e] : ws[e];

  /* This thread's chunks (gg_chunks). Rows outside the valid range read zeros from the tile's
   * first row (valid: rows >= 1, n0 < N). */
  const int tid = threadIdx.x, ca = tid % C::CPR, cb = tid % B_CPR;
  gg_chunks<C, MX> ch;
  ch.dst = gg_swizzle<BK>(tid / C::CPR, ca);
  ch.dst_mx = 16u * (uint32_t)tid;
  ch.zero_a = ch.zero_b = 0;
#pragma unroll
  for (int j = 0; j < C::AJ; j++) {
    const int r = tid / C::CPR + j * (GG_THREADS / C::CPR);
    ch.zero_a |= (uint32_t)(r >= rows) << j;
    ch.src_a[j] = (const uint8_t *)(a + (size_t)(m0 + (r < rows ? r : 0)) * (size_t)K + 8 * ca);
  }
#pragma unroll
  for (int j = 0; j < B_J; j++) {
    const int rb = tid / B_CPR + j * (GG_THREADS / B_CPR);
    const cuda_weight &w = GATED && rb >= C::BN / 2 ? w1 : w0;
    const int64_t wr = n0 + (GATED ? rb % (C::BN / 2) : rb), wr_read = wr < N ? wr : n0;
    ch.zero_b |= (uint32_t)(wr >= N) << j;
    ch.src_b[j] = w.data + (size_t)wr_read * (size_t)K * (MX ? 1 : 2) + 16 * cb;
    if (MX) ch.scales[j] = wr < N ? w.scale + (size_t)wr * (size_t)w.scale_cols + cb / 2 : NULL;
  }
  const uint32_t smem = (uint32_t)__cvta_generic_to_shared(gg_smem);
  const int KT = (int)(K / BK);
  /* MX: the scales of this thread's rows for the K step about to be decoded, loaded a step ahead;
   * 127 (1.0) for a row past N, whose bytes are zeros */
  uint8_t scale_next[MX ? C::XJ : 1];
#pragma unroll
  for (int j = 0; j < (MX ? C::XJ : 1); j++) scale_next[j] = MX && ch.scales[j] ? ch.scales[j][0] : 127;

  /* ldmatrix addresses. A (m16 tile mt, k16 step ks): lanes 0-7 rows 0-7 and 8-15 rows 8-15 at
   * k 0-7 (a0, a1), lanes 16-31 the same rows at k 8-15 (a2, a3): row lane & 15, chunk
   * 2 ks + lane / 16. B (n8 tile nt, 32 columns kh of the K tile): lane 8i + j gives B row j at
   * chunk 4 kh + i, so r[0], r[1] are b0, b1 of k16 step 2 kh and r[2], r[3] those of 2 kh + 1.
   * Tile row bases are multiples of 8 (A: of 16), so each swizzle depends on the lane alone. */
  const int lane = tid & 31, warp = tid >> 5, wm = warp / C::WN, wn = warp % C::WN;
  const int sw = BK == 64 ? lane & 7 : (lane >> 1) & 3;
  const uint32_t a_row = (uint32_t)((C::WTM * wm + (lane & 15)) * (BK * 2));
  uint32_t a_chunk[BK / 16], b_chunk[BK / 32], b_row[NT];
#pragma unroll
  for (int ks = 0; ks < BK / 16; ks++) a_chunk[ks] = (uint32_t)(((2 * ks + (lane >> 4)) ^ sw) << 4);
#pragma unroll
  for (int kh = 0; kh < BK / 32; kh++) b_chunk[kh] = (uint32_t)(((4 * kh + (lane >> 3)) ^ sw) << 4);
#pragma unroll
  for (int nt = 0; nt < NT; nt++) {
    const int brow = GATED ? (nt / HALF_NT) * (C::BN / 2) + (C::WTN / 2) * wn + 8 * (nt % HALF_NT)
                           : C::WTN * wn + 8 * nt;
    b_row[nt] = (uint32_t)((brow + (lane & 7)) * (BK * 2));
  }

  float acc[C::MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < C::MT; mt++)
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
      for (int i = 0; i < 4; i++) acc[mt][nt][i] = 0.0f;

  /* The ring: STAGES - 1 tiles in flight ahead of the one computed. One commit per step (empty
   * past the last tile), so before step kt exactly STAGES - 1 + kt groups are committed and
   * waiting until STAGES - 2 are pending means tile kt has landed. The barrier after the wait
   * makes every thread's copies visible and also ends every warp's reads of step kt - 1, whose
   * slot (kt - 1) % STAGES = (kt + STAGES - 1) % STAGES the next load reuses. */
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; s++) {
    if (s < KT) gg_load_stage<C, MX>(smem, s, ch);
    gg_cp_async_commit();
  }
  for (int kt = 0; kt < KT; kt++) {
    gg_cp_async_wait<C::STAGES - 2>();
    __syncthreads();
    if (kt + C::STAGES - 1 < KT) gg_load_stage<C, MX>(smem, kt + C::STAGES - 1, ch);
    gg_cp_async_commit();
    const uint32_t sa = smem + (uint32_t)(kt % C::STAGES) * gg_smem_layout<C, MX>::stage;
    uint32_t sb = sa + C::A_BYTES;
    if (MX) {
      /* the bytes this thread copied (its own wait covers them) into the decoded tile, which
       * every warp finished reading in step kt - 1 (the barrier above); a second barrier
       * publishes it */
#pragma unroll
      for (int j = 0; j < (MX ? C::XJ : 1); j++) {
        const uint8_t s_now = scale_next[j];
        if (ch.scales[j] && kt + 1 < KT) scale_next[j] = ch.scales[j][(size_t)(kt + 1) * (BK / GG_MX_BLOCK)];
        gg_decode_mx<BK>(gg_smem + (sb - smem) + ch.dst_mx + 4096u * j, s_now,
                         gg_smem + gg_smem_layout<C, MX>::decoded,
                         tid / C::MX_CPR + j * (GG_THREADS / C::MX_CPR), cb);
      }
      __syncthreads();
      sb = smem + gg_smem_layout<C, MX>::decoded;
    }
#pragma unroll
    for (int kh = 0; kh < BK / 32; kh++) {
      uint32_t bf[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; nt++) gg_ldmatrix_x4(bf[nt], sb + b_row[nt] + b_chunk[kh]);
#pragma unroll
      for (int ks = 0; ks < 2; ks++)
#pragma unroll
        for (int mt = 0; mt < C::MT; mt++) {
          uint32_t af[4];
          gg_ldmatrix_x4(af, sa + a_row + (uint32_t)(mt * 16 * BK * 2) + a_chunk[2 * kh + ks]);
#pragma unroll
          for (int nt = 0; nt < NT; nt++) gg_mma(acc[mt][nt], af, bf[nt][2 * ks], bf[nt][2 * ks + 1]);
        }
    }
  }
  gg_cp_async_wait<0>(); /* only empty groups remain; none outlives the block */

  /* C fragment: lane 4g + q holds rows g (c0, c1) and g + 8 (c2, c3) at columns 2q, 2q + 1 of
   * each n8 tile. Columns come in even pairs and N is even: a pair is inside N or past it. */
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int mt = 0; mt < C::MT; mt++)
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
      const int r = C::WTM * wm + 16 * mt + g + 8 * hh;
      if (r >= rows) continue;
      const size_t row = (size_t)(m0 + r) * (size_t)N;
      if (GATED) {
        __nv_bfloat16 *o = (__nv_bfloat16 *)out + row;
#pragma unroll
        for (int nt = 0; nt < HALF_NT; nt++) {
          const int64_t col = n0 + (C::WTN / 2) * wn + 8 * nt + 2 * q;
          if (col >= N) continue;
          const float v0 = dev_swiglu_oai(acc[mt][nt][2 * hh], acc[mt][nt + HALF_NT][2 * hh], alpha, beta, limit);
          const float v1 = dev_swiglu_oai(acc[mt][nt][2 * hh + 1], acc[mt][nt + HALF_NT][2 * hh + 1], alpha, beta, limit);
          *(__nv_bfloat162 *)(o + col) = __floats2bfloat162_rn(v0, v1);
        }
      } else {
        float *o = (float *)out + row;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
          const int64_t col = n0 + C::WTN * wn + 8 * nt + 2 * q;
          if (col < N) *(float2 *)(o + col) = make_float2(acc[mt][nt][2 * hh], acc[mt][nt][2 * hh + 1]);
        }
      }
    }
}

/* The rows and K tile of each candidate, for the checks and grids made on the host. */
#define GG_DIMS(i, bm, bn, bk, stages, wm, minb) {bm, bk},
static const struct {
  int bm, bk;
} gg_dims[] = {GG_TILES(GG_DIMS)};
static_assert(sizeof gg_dims / sizeof gg_dims[0] == MOE_GROUPED_TILES, "MOE_GROUPED_TILES: the candidates");

/* The stored forms the GEMMs read: BF16, or MXFP8 (E4M3 with an e8m0 scale per row and 32
 * columns, rows a multiple of 16 bytes); both 16-byte aligned (the caller's `wide`). */
static int gg_weight_fits(const m3_tensor *t) {
  if (t->dtype == M3_DT_BF16 && t->quant == M3_WQ_NONE) return 1;
  return t->dtype == M3_DT_F8_E4M3 && t->quant == M3_WQ_MXFP8 && t->scale &&
         t->scale_cols >= t->cols / GG_MX_BLOCK;
}

/* The tile of a layer's experts: M3_MOE_GROUPED_TILE when set; else the fastest measured on an
 * H200 at full width (bench/RESULTS.md, the sweep of bench_cuda_ops): BF16 128 x 256 x 64 in 3
 * stages (candidate 4: 13.4 ms at 8192 tokens against 15.2 for candidate 0), MXFP8 candidate 0
 * (as fast, and half the shared memory), or candidate 0 where K is not a multiple of 64. */
static int gg_tile(const cuda_backend *cb, const m3_moe_experts *ex) {
  if (cb->moe_grouped_tile >= 0) return cb->moe_grouped_tile;
  const int64_t H = ex->gate[0].cols, I = ex->gate[0].rows;
  return ex->gate[0].quant != M3_WQ_MXFP8 && H % gg_dims[4].bk == 0 && I % gg_dims[4].bk == 0 ? 4 : 0;
}

int cuda_moe_grouped_fits(const cuda_backend *cb, const m3_moe_experts *ex, int wide, const float *h, int n) {
  const m3_tensor *g0 = &ex->gate[0], *d0 = &ex->down[0];
  const int tile = gg_tile(cb, ex);
  const int64_t H = g0->cols, I = g0->rows, bm = gg_dims[tile].bm, bk = gg_dims[tile].bk;
  const int64_t m_tiles = ((int64_t)n + bm - 1) / bm + (ex->E < n ? ex->E : n);
  /* up and every other expert share gate[0]'s or down[0]'s form (moe.cu check_experts) */
  return wide && gg_weight_fits(g0) && gg_weight_fits(d0) && H > 0 && I > 0 && H % bk == 0 &&
         I % bk == 0 && (uintptr_t)h % 16 == 0 && n > 0 && m_tiles <= GG_MAX_GRID_Y;
}

/* Launches moe_grouped_gemm_kernel<C, GATED, MX>, allowing it its dynamic shared memory on cb's
 * device first (cuda_allow_smem). */
template <class C, int GATED, int MX>
static void gg_launch(cuda_backend *cb, dim3 grid, const cuda_weight *ws, int E, const int32_t *start,
                      const int32_t *tile_start, int n, const __nv_bfloat16 *a, int64_t K, int64_t N,
                      const m3_moe_experts *ex, void *out) {
  const int smem = gg_smem_layout<C, MX>::bytes;
  cuda_allow_smem(cb, (const void *)moe_grouped_gemm_kernel<C, GATED, MX>, smem,
                  "moe_experts (grouped gemm shared memory)");
  moe_grouped_gemm_kernel<C, GATED, MX><<<grid, GG_THREADS, smem, cb->stream>>>(
      ws, E, start, tile_start, n, a, K, N, ex->alpha, ex->beta, ex->limit, out);
  cuda_launched(cb, GATED ? "moe_experts (grouped gate, up, swiglu)" : "moe_experts (grouped down)");
}

/* The two GEMMs with tiles of C over m_tiles block rows (an upper bound on the real count). */
template <class C>
static void gg_gemms(cuda_backend *cb, const m3_moe_experts *ex, const cuda_weight *w, const int32_t *start,
                     const int32_t *tile_start, int n, unsigned m_tiles, const __nv_bfloat16 *xy,
                     __nv_bfloat16 *act, float *y) {
  const int E = ex->E;
  const int64_t H = ex->gate[0].cols, I = ex->gate[0].rows;
  const dim3 grid_gate((unsigned)((I + C::BN / 2 - 1) / (C::BN / 2)), m_tiles);
  const dim3 grid_down((unsigned)((H + C::BN - 1) / C::BN), m_tiles);
  if (ex->gate[0].quant == M3_WQ_MXFP8)
    gg_launch<C, 1, 1>(cb, grid_gate, w, E, start, tile_start, n, xy, H, I, ex, act);
  else
    gg_launch<C, 1, 0>(cb, grid_gate, w, E, start, tile_start, n, xy, H, I, ex, act);
  if (ex->down[0].quant == M3_WQ_MXFP8)
    gg_launch<C, 0, 1>(cb, grid_down, w + 2 * E, E, start, tile_start, n, act, I, H, ex, y);
  else
    gg_launch<C, 0, 0>(cb, grid_down, w + 2 * E, E, start, tile_start, n, act, I, H, ex, y);
}

void cuda_moe_grouped(cuda_backend *cb, const m3_moe_experts *ex, const cuda_weight *w,
                      const int32_t *start, const int32_t *slot_at, int n, int k, const float *h,
                      int32_t *tile_start, __nv_bfloat16 *xy, __nv_bfloat16 *act, float *y) {
  const int E = ex->E, tile = gg_tile(cb, ex), bm = gg_dims[tile].bm;
  const int64_t H = ex->gate[0].cols;
  moe_gather_bf16_kernel<<<(unsigned)n, GG_GATHER_THREADS, 0, cb->stream>>>(h, slot_at, start, E, k, n, H, xy);
  cuda_launched(cb, "moe_experts (gather to bf16)");
  moe_tile_offsets_kernel<<<1, 32, 0, cb->stream>>>(start, E, n, bm, tile_start);
  cuda_launched(cb, "moe_experts (tile offsets)");
  const unsigned m_tiles = (unsigned)((n + bm - 1) / bm + (E < n ? E : n));
#define GG_CASE(i, bm_, bn, bk, stages, wm, minb)                                                          \
  case i:                                                                                                  \
    gg_gemms<gg_cfg<bm_, bn, bk, stages, wm, minb> >(cb, ex, w, start, tile_start, n, m_tiles, xy, act, y); \
    break;
  switch (tile) { GG_TILES(GG_CASE) }
#undef GG_CASE
}
