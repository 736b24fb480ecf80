/* moe_grouped.cu: the routed experts of a prefill as two grouped GEMMs on the BF16 tensor cores,
 * issued without waiting for the host (issue 7). moe.cu's moe_group has sorted the T*k
 * slots by expert (expert e owns positions [start[e], start[e + 1])); here:
 *   1. scatter: xy [n, H] = BF16(h[token of the slot at each position]), a token at a time;
 *   2. tile offsets: tile_start[e] = sum over e' < e of ceil(cnt_e' / BM), on the device;
 *   3. gate/up GEMM, SwiGLU-OAI fused: act [n, I] = BF16(SwiGLU-OAI(xy gate_e^T, xy up_e^T));
 *   4. down GEMM: y [n, H] = act down_e^T, float32 (moe.cu's combine follows).
 * MXFP8 experts run the same steps in f16 instead of BF16 (below).
 * The GEMMs launch a grid of (n-tiles, an upper bound on the m-tiles): block row y finds its
 * expert by binary search in tile_start and exits when y is past the real count. A block computes
 * C [BM rows, BN columns] = A [rows, K] W [columns, K]^T, both operands K-contiguous, with
 * mma.sync m16n8k16 (BF16 in, float32 accumulate; the wgmma kernel below reads the same shared
 * memory tiles through descriptors instead); tiles of K go global -> shared memory by
 * 16-byte cp.async in a STAGES-deep ring (rows outside the tile's valid range zero-filled,
 * their addresses clamped to a valid row), and shared memory -> fragments by ldmatrix.
 * MXFP8 experts (E4M3 bytes, an e8m0 scale per row and 32 columns: BK / 32 per row of a K tile)
 * come into shared memory as bytes; each thread decodes the 16-byte chunks it copied into an f16
 * B tile that the warps then read as above, with mma.sync in f16. Why f16: E4M3 -> f16 is one
 * instruction per pair (cvt.rn.f16x2.e4m3x2) and the block scale one more (a power of two times
 * an f16 pair), where BF16 takes float32 on the way (6 per pair): the decoding is what held these
 * GEMMs below the BF16 ones. f16's range needs powers of two kept apart, all exact:
 *   - each row of xy carries 2^row_exp[p], chosen so that its largest |value| is in [2^14, 2^15)
 *     (f16 keeps 11 significant bits there, BF16 8);
 *   - each weight row carries 2^(134 - smax), smax its largest e8m0 scale: a block with scale s
 *     decodes to E4M3 * 2^(s - smax + 7), at most 448 * 2^7 < 65504, exactly down to 22
 *     binades under the row's largest; further under, f16's subnormals round it (31 under: to
 *     0), an error under 2^-40 of the row's largest weight, against float32 sums' 2^-24;
 *   - act carries 2^act_exp, from the bound SwiGLU-OAI's clamp puts on it (gg_act_exp);
 * and the epilogues take them off before SwiGLU and in y. NaN bytes and scale 0xFF give NaN as on
 * the CPU. Results do not depend on timing: every output element is one block's fixed-order sum. */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <float.h>

#include "backend/cuda/cuda_internal.h"

/* The candidate tiles (M3_MOE_GROUPED_TILE picks one at backend creation; unset: gg_tile's choice):
 * X(index, BM sorted rows, BN B rows, BK columns of K, STAGES of the cp.async ring, WM warps over
 * rows, MINB blocks per SM asked of the compiler, KIND). 8 warps. KIND 0 (mma.sync): WM over rows
 * x 8 / WM over B rows, each warp BM / WM = 64 rows by BN * WM / 8 B rows (32 or 64). KIND 1
 * (wgmma): BM 128 and BK 64, two warpgroups of 64 rows by all BN B rows. KIND 2 (MXFP8; BF16
 * takes KIND 1): the weights as wgmma's A operand from registers, BN 256 weight rows by BM 128
 * tokens (moe_grouped_ra_kernel). KIND 3 (MXFP8): kind 2's tile with a warpgroup that only
 * copies, 384 threads (moe_grouped_ws_kernel); BF16 takes KIND 1 with at most 4 stages (a BF16
 * B tile is twice the E4M3 one: 6 stages would not fit). Gate/up tiles hold BN / 2 gate rows and
 * the same BN / 2 rows of up. MINB 2 caps registers at 128: only where that compiles without
 * spills (ptxas -v), else 1 and the shared memory sized for one block. */
#define GG_TILES(X)                 \
  X(0, 128, 128, 32, 4, 2, 2, 0)    \
  X(1, 128, 128, 64, 4, 2, 1, 0)    \
  X(2, 128, 256, 32, 4, 2, 1, 0)    \
  X(3, 64, 256, 32, 4, 1, 1, 0)     \
  X(4, 128, 256, 64, 3, 2, 1, 0)    \
  X(5, 128, 128, 32, 6, 2, 2, 0)    \
  X(6, 128, 256, 64, 4, 2, 1, 1)    \
  X(7, 128, 128, 64, 3, 2, 2, 1)    \
  X(8, 128, 256, 64, 4, 2, 1, 2)    \
  X(9, 128, 256, 64, 6, 2, 1, 3)

enum {
  GG_THREADS = 256,
  GG_MX_BLOCK = 32,   /* MXFP8 columns per e8m0 scale */
  GG_F16_TOP = 15,    /* f16 rows are scaled to a largest |value| under 2^15 */
  GG_MX_HEADROOM = 7, /* a row's largest block decodes to E4M3 * 2^7: under 448 * 2^7 < 65504 */
  GG_MX_UNSCALE = 127 + GG_MX_HEADROOM,
  GG_ACT_EXP_MIN = -6, /* act's power of two at the loosest clamp taken (gg_act_exp) */
  GG_SCATTER_THREADS = 256,
  GG_MAX_K = 64, /* choices a token (moe.cu's ROUTE_MAX_K) */
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
  static_assert((BK == 32 || BK == 64) && AJ >= 1 && XJ >= 1 && STAGES >= 3, "tile shape");
};

/* A ring slot: the A tile, then the B tile (BF16, or MX: E4M3 bytes); MX adds DEC decoded f16 B
 * tiles after the ring (decoded tile t at t % DEC). Past the default 48 KB: opted in (gg_launch). */
template <class C, int MX, int DEC = 2> struct gg_smem_layout {
  enum {
    stage = C::A_BYTES + (MX ? C::MX_BYTES : C::B_BYTES),
    decoded = C::STAGES * stage,
    bytes = decoded + (MX ? DEC * C::B_BYTES : 0),
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
    dev_cp_async16(sa + ch.dst + 4096u * j, ch.src_a[j] + 2 * koff, (ch.zero_a >> j) & 1 ? 0 : 16);
#pragma unroll
  for (int j = 0; j < gg_chunks<C, MX>::BJ; j++)
    dev_cp_async16(sb + (MX ? ch.dst_mx : ch.dst) + 4096u * j, ch.src_b[j] + koff * (MX ? 1 : 2),
                  (ch.zero_b >> j) & 1 ? 0 : 16);
}

/* An MXFP8 block's factor in its row's f16 tile, in both halves of a pair: 2^(s - smax + 7), s
 * the block's e8m0 scale and smax the row's largest (the file comment); exact down to 2^-24,
 * then 0; NaN for scale 0xFF. */
__device__ __forceinline__ __half2 gg_block_factor(int s, int smax) {
  /* 2^t in float (t clamped to the normal floats), rounded to f16 once: exact from 2^-24 up, 2^-25
   * a tie that goes to the even 0, and 0 below; no branches in the decoding loops */
  const int t = max(s - smax + GG_MX_HEADROOM, -126);
  const __half f = __float2half_rn(dev_pow2(t));
  return __half2half2(s == 0xff ? __ushort_as_half((unsigned short)0x7e00u) : f);
}

/* Four E4M3 bytes w (lowest first) times f as two f16 pairs: out[0] bytes 0 and 1, out[1] bytes 2
 * and 3 (the pair conversion, exact; the product exact wherever it is a normal f16). */
__device__ __forceinline__ void gg_e4m3x4_to_f16(uint32_t w, __half2 f, uint32_t out[2]) {
#pragma unroll
  for (int j = 0; j < 2; j++) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)((w >> (16 * j)) & 0xffff), __NV_E4M3);
    const __half2 v = __hmul2(__half2(h), f);
    out[j] = *(const uint32_t *)&v;
  }
}

/* 16 E4M3 bytes of the B tile (raw, in shared memory) times the block's factor f as f16, into
 * chunks 2 c and 2 c + 1 of row r of the decoded tile at out: E4M3 -> f16 is exact, and so is
 * the product wherever it is a normal f16; NaN bytes stay NaN. */
template <int BK>
__device__ __forceinline__ void gg_decode_mx(const uint8_t *raw, __half2 f, uint8_t *out, int r, int c) {
  const uint4 u = *(const uint4 *)raw;
  const uint32_t p[4] = {u.x, u.y, u.z, u.w};
  uint32_t o[8];
#pragma unroll
  for (int i = 0; i < 4; i++) gg_e4m3x4_to_f16(p[i], f, o + 2 * i);
  *(uint4 *)(out + gg_swizzle<BK>(r, 2 * c)) = make_uint4(o[0], o[1], o[2], o[3]);
  *(uint4 *)(out + gg_swizzle<BK>(r, 2 * c + 1)) = make_uint4(o[4], o[5], o[6], o[7]);
}

/* The largest of a row's e8m0 scales row[b], b < nb, that are part's of parts: 16-byte units
 * part, part + parts, ... where the row is 16-byte aligned and nb a multiple of 16, else single
 * scales b = part, part + parts, ... */
__device__ __forceinline__ int gg_scale_max(const uint8_t *row, int nb, int part, int parts) {
  uint32_t m = 0;
  if ((uintptr_t)row % 16 == 0 && nb % 16 == 0) {
    for (int u = part; u < nb / 16; u += parts) {
      const uint4 v = __ldg((const uint4 *)row + u);
      m = __vmaxu4(m, __vmaxu4(__vmaxu4(v.x, v.y), __vmaxu4(v.z, v.w)));
    }
    return (int)max(max(m & 0xffu, (m >> 8) & 0xffu), max((m >> 16) & 0xffu, m >> 24));
  }
  for (int b = part; b < nb; b += parts) m = max(m, (uint32_t)row[b]);
  return (int)m;
}

/* MX: this thread's chunks of K tile t (its own wait covers their copies) decoded from ring slot
 * t % STAGES into decoded tile t % DEC; scale_next: the scales of tile t, replaced by tile t + 1's
 * (a load a tile ahead); smax: the rows' largest scales. */
template <class C, int DEC>
__device__ __forceinline__ void gg_decode_tile(uint8_t *smem, int t, int KT, const gg_chunks<C, 1> &ch,
                                               uint8_t scale_next[C::XJ], const int smax[C::XJ], int tid) {
  const uint8_t *raw = smem + (uint32_t)(t % C::STAGES) * gg_smem_layout<C, 1>::stage + C::A_BYTES + ch.dst_mx;
  uint8_t *dec = smem + gg_smem_layout<C, 1>::decoded + (t % DEC) * C::B_BYTES;
#pragma unroll
  for (int j = 0; j < C::XJ; j++) {
    const uint8_t s_now = scale_next[j];
    if (ch.scales[j] && t + 1 < KT) scale_next[j] = ch.scales[j][(size_t)(t + 1) * (C::BK / GG_MX_BLOCK)];
    gg_decode_mx<C::BK>(raw + 4096u * j, gg_block_factor(s_now, smax[j]), dec,
                        tid / C::MX_CPR + j * (GG_THREADS / C::MX_CPR), tid % C::MX_CPR);
  }
}

/* The sorted positions [*s0, *s1) of expert e, clamped into [0, n): the offsets come from device
 * memory, and both the tile offsets and the GEMMs hold their reads to this range. */
__device__ __forceinline__ void gg_expert_rows(const int32_t *start, int e, int n, int *s0, int *s1) {
  const int a = min(max(start[e], 0), n);
  *s0 = a;
  *s1 = min(max(start[e + 1], a), n);
}

/* The place of column k (0..63) of a 64-column block of K in the permuted order kind 2's token
 * tiles keep (moe_grouped_ra_kernel): with k = 16 q + 4 s + r (r < 4), column 16 s + 2 q + (r & 1)
 * + 8 (r >> 1), where k16 step s of an m16n8k16 A fragment has thread q's columns 2 q, 2 q + 1,
 * 2 q + 8, 2 q + 9. So thread q's weights for all four steps are bytes 16 q .. 16 q + 15 of a row,
 * one 16-byte load under one e8m0 scale. */
__device__ __forceinline__ int gr_perm_col(int k) {
  const int q = k >> 4, s = (k >> 2) & 3, r = k & 3;
  return 16 * s + 2 * q + (r & 1) + 8 * (r >> 1);
}

/* xy[p] = BF16(h[t]) at the sorted position p = pos_of[t * k + j] of each choice j of token t =
 * blockIdx.x that this rank's experts hold (0 <= p < n); F16: xy[p] = f16(h[t] * 2^e), row_exp[p]
 * = e = dev_f16_exp of the row's largest |value| (bringing it to [2^14, 2^15); 0 for a row of
 * zeros or with an infinity); PERM: each 64 columns in gr_perm_col's order; h_bf16 (NULL: none):
 * BF16(h[t]) in row t, for the shared expert. A block a token reads its row once for its k
 * copies: a block a position read each row k times (k = 4: 0.37 ms of an 8192-token prefill on
 * an H200, against 0.17). k <= GG_MAX_K, H % 4 == 0 (PERM: % 64), h 16-byte aligned. */
template <int F16, int PERM> __global__ void __launch_bounds__(GG_SCATTER_THREADS)
    moe_scatter_kernel(const float *__restrict__ h, const int32_t *__restrict__ pos_of, int k, int n, int64_t H,
                       void *__restrict__ xy, int32_t *__restrict__ row_exp, __nv_bfloat16 *__restrict__ h_bf16) {
  dev_pdl_enter();
  __shared__ int32_t dst[GG_MAX_K];
  const int t = blockIdx.x;
  int mine = 0;
  if ((int)threadIdx.x < k) {
    const int32_t p = pos_of[(size_t)t * k + threadIdx.x];
    mine = p >= 0 && p < n;
    dst[threadIdx.x] = mine ? p : -1; /* another rank's expert, or none */
  }
  if (!__syncthreads_or(mine) && !h_bf16) return; /* the same for the whole block */
  const float4 *src = (const float4 *)(h + (size_t)t * (size_t)H);
  int e = 0;
  if (F16) {
    float m = 0.0f;
    for (int64_t c = threadIdx.x; c < H / 4; c += GG_SCATTER_THREADS) m = fmaxf(m, dev_amax4(src[c]));
    e = dev_f16_exp(block_max(m));
    if ((int)threadIdx.x < k && dst[threadIdx.x] >= 0) row_exp[dst[threadIdx.x]] = e;
  }
  for (int64_t c = threadIdx.x; c < H / 4; c += GG_SCATTER_THREADS) {
    const float4 v = src[c];
    uint32_t lo, hi;
    if (F16) {
      const __half2 a = __floats2half2_rn(dev_ldexp(v.x, e), dev_ldexp(v.y, e));
      const __half2 b = __floats2half2_rn(dev_ldexp(v.z, e), dev_ldexp(v.w, e));
      lo = *(const uint32_t *)&a, hi = *(const uint32_t *)&b;
    } else {
      const __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
      lo = *(const uint32_t *)&a, hi = *(const uint32_t *)&b;
    }
    if (h_bf16) {
      const __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
      ((uint2 *)h_bf16)[(size_t)t * (size_t)(H / 4) + c] = make_uint2(*(const uint32_t *)&a, *(const uint32_t *)&b);
    }
    /* PERM: columns 4c, 4c + 1 land side by side, 4c + 2, 4c + 3 eight further */
    const int64_t at = PERM ? (4 * c & ~(int64_t)63) + gr_perm_col((int)(4 * c & 63)) : 4 * c;
    for (int j = 0; j < k; j++) {
      if (dst[j] < 0) continue;
      uint32_t *row = (uint32_t *)xy + (size_t)dst[j] * (size_t)(H / 2);
      if (PERM) row[at / 2] = lo, row[at / 2 + 4] = hi;
      else *(uint2 *)(row + at / 2) = make_uint2(lo, hi);
    }
  }
}

/* tile_start[e] = sum over e' < e of ceil(cnt_e' / bm), tile_start[E] the total: one warp, an
 * inclusive scan of 32 experts at a time. */
__global__ void __launch_bounds__(32)
    moe_tile_offsets_kernel(const int32_t *__restrict__ start, int E, int n, int bm,
                            int32_t *__restrict__ tile_start) {
  dev_pdl_enter();
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

/* Block row `tile` (in tile_start's numbering) of a grouped GEMM with BM-row tiles: its expert
 * *e, the tile's first sorted position *m0 and its row count *rows (1..BM); 0 when the row is past
 * the real m-tile count. */
__device__ __forceinline__ int gg_find_tile(const int32_t *tile_start, const int32_t *start, int E, int n,
                                            int bm, int tile, int *e, int *m0, int *rows) {
  if (tile >= tile_start[E]) return 0;
  int lo = 0, hi = E; /* the expert with tile_start[e] <= tile < tile_start[e + 1] */
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (tile_start[mid] <= tile) lo = mid;
    else hi = mid;
  }
  int s0, s1;
  gg_expert_rows(start, lo, n, &s0, &s1);
  *e = lo;
  *m0 = s0 + (tile - tile_start[lo]) * bm;
  *rows = min(s1 - *m0, bm); /* >= 1 by the tile count */
  return *rows > 0;
}

/* MX: the scales of B tile row rb (GATED: rows BN/2 .. BN - 1 are w1's) at the 32-column block of
 * 16-byte chunk cb of K step 0 (NULL for a row past N, whose bytes are zeros: scale 127, 1.0),
 * and *smax = the row's largest scale, its MX_CPR chunks' threads (adjacent lanes) each taking
 * every MX_CPR-th block of it. Every lane of the warp takes part. */
template <class C, int GATED>
__device__ __forceinline__ const uint8_t *gg_row_scales(const cuda_weight &w0, const cuda_weight &w1, int64_t n0,
                                                        int64_t K, int64_t N, int rb, int cb, int *smax) {
  const cuda_weight &w = GATED && rb >= C::BN / 2 ? w1 : w0;
  const int64_t wr = n0 + (GATED ? rb % (C::BN / 2) : rb);
  const uint8_t *sc = wr < N ? w.scale + (size_t)wr * (size_t)w.scale_cols + cb / 2 : NULL;
  int m = sc ? gg_scale_max(sc - cb / 2, (int)(K / GG_MX_BLOCK), cb, C::MX_CPR) : 127;
#pragma unroll
  for (int o = 1; o < C::MX_CPR; o <<= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
  *smax = m;
  return sc;
}

/* This thread's copies (gg_chunks, the scales aside) of the tile at sorted row m0 (rows valid)
 * and weight row n0 of w0 (GATED: B rows BN/2 .. BN - 1 from w1). Rows outside the valid range
 * read zeros from the tile's first row (valid: rows >= 1, n0 < N). */
template <class C, int GATED, int MX>
__device__ __forceinline__ void gg_setup_copies(const cuda_weight &w0, const cuda_weight &w1, const uint16_t *a,
                                                int m0, int rows, int64_t n0, int64_t K, int64_t N, int tid,
                                                gg_chunks<C, MX> &ch) {
  enum { B_CPR = MX ? C::MX_CPR : C::CPR, B_J = MX ? C::XJ : C::BJ };
  const int ca = tid % C::CPR, cb = tid % B_CPR;
  ch.dst = gg_swizzle<C::BK>(tid / C::CPR, ca);
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
  }
}

/* gg_setup_copies, and MX: scale_next = the scales of K step 0 of this thread's B chunks (127,
 * 1.0, for a row past N, whose bytes are zeros), smax = their rows' largest scales
 * (gg_row_scales), and b_exp[row] = smax - 134 for the epilogue (published by the main loop's
 * barriers; KT >= 1). */
template <class C, int GATED, int MX>
__device__ __forceinline__ void gg_setup(const cuda_weight &w0, const cuda_weight &w1, const uint16_t *a,
                                         int m0, int rows, int64_t n0, int64_t K, int64_t N, int tid,
                                         gg_chunks<C, MX> &ch, uint8_t scale_next[], int smax[], int *b_exp) {
  enum { B_CPR = MX ? C::MX_CPR : C::CPR };
  gg_setup_copies<C, GATED, MX>(w0, w1, a, m0, rows, n0, K, N, tid, ch);
  const int cb = tid % B_CPR;
#pragma unroll
  for (int j = 0; j < (MX ? C::XJ : 1); j++) {
    scale_next[j] = 127;
    if constexpr (MX) {
      const int rb = tid / B_CPR + j * (GG_THREADS / B_CPR);
      ch.scales[j] = gg_row_scales<C, GATED>(w0, w1, n0, K, N, rb, cb, &smax[j]);
      if (ch.scales[j]) scale_next[j] = ch.scales[j][0];
      if (cb == 0) b_exp[rb] = smax[j] - GG_MX_UNSCALE;
    }
  }
}

/* Tile row r's outputs at B rows b, b + 1 of a tile of C whose first row is sorted position m0
 * and first weight row n0: GATED, s the gate sums there and u the up sums at BN/2 + b, + 1, out
 * (BF16 [n, N]; MX: f16 times 2^act_exp) their SwiGLU-OAI; otherwise out (float32 [n, N]) = s.
 * Columns come in even pairs and N is even: a pair is inside N or past it. MX: each sum times
 * 2^(b_exp of its B row - ea, the A row's power of two), exact (dev_ldexp). */
template <class C, int GATED, int MX>
__device__ __forceinline__ void gg_store_pair(void *out, int m0, int r, int64_t n0, int64_t N, int b, float2 s,
                                              float2 u, const int *b_exp, int ea, int act_exp, float alpha,
                                              float beta, float limit) {
  const int64_t col = n0 + b;
  if (col >= N) return;
  const size_t row = (size_t)(m0 + r) * (size_t)N;
  if (MX) {
    s.x = dev_ldexp(s.x, b_exp[b] - ea), s.y = dev_ldexp(s.y, b_exp[b + 1] - ea);
    if (GATED) u.x = dev_ldexp(u.x, b_exp[C::BN / 2 + b] - ea), u.y = dev_ldexp(u.y, b_exp[C::BN / 2 + b + 1] - ea);
  }
  if (!GATED) {
    *(float2 *)((float *)out + row + col) = s;
    return;
  }
  const float v0 = dev_swiglu_oai(s.x, u.x, alpha, beta, limit), v1 = dev_swiglu_oai(s.y, u.y, alpha, beta, limit);
  uint32_t *o = (uint32_t *)((uint16_t *)out + row);
  if (MX) {
    const __half2 h2 = __floats2half2_rn(dev_ldexp(v0, act_exp), dev_ldexp(v1, act_exp));
    o[col / 2] = *(const uint32_t *)&h2;
  } else {
    const __nv_bfloat162 b2 = __floats2bfloat162_rn(v0, v1);
    o[col / 2] = *(const uint32_t *)&b2;
  }
}

/* The parameters of both GEMM kernels (one launch path takes either). */
#define GG_KERNEL_PARAMS                                                                                  \
  const cuda_weight *__restrict__ ws, int E, const int32_t *__restrict__ start,                         \
      const int32_t *__restrict__ tile_start, int n, const uint16_t *__restrict__ a,                    \
      const int32_t *__restrict__ a_exp, int act_exp, int64_t K, int64_t N, float alpha, float beta,    \
      float limit, void *__restrict__ out

/* One (expert, m-tile, n-tile) of a grouped GEMM with tiles of C. blockIdx.y: the m-tile in
 * tile_start's numbering; blockIdx.x: the n-tile. a: [n, K] BF16 in sorted order (MX: f16, row p
 * times 2^a_exp[p] when GATED, every row times 2^act_exp otherwise); ws: the experts' weights,
 * BF16 [N, K] or MX (GATED: gate at ws[e], up at ws[E + e]; otherwise down at ws[e]).
 * Warp (wm, wn) computes rows 64 wm .. + 63 of the tile. GATED: B rows 0 .. BN/2 - 1 are gate rows
 * n0 .. n0 + BN/2 - 1, the next BN/2 the same rows of up; warp wn takes WTN/2 rows of each at
 * WTN/2 wn (its first NT/2 n8 tiles gate, the last NT/2 up), so that each lane holds the gate
 * and up sums of the same (row, column) (gg_store_pair). Otherwise warp wn takes B rows
 * WTN wn .. + WTN - 1. MX: the weights are MXFP8 (E4M3 [N, K], e8m0 scales [N, scale_cols], one
 * per 32 columns: BK / 32 per row of a K tile); each K step first decodes the ring slot's bytes
 * into the decoded f16 tile, each B row in its own power of two (the file comment).
 * K % BK == 0; a, the weights and out 16-byte aligned (and so their rows). */
template <class C, int GATED, int MX>
__global__ void __launch_bounds__(GG_THREADS, C::MIN_BLOCKS)
    moe_grouped_gemm_kernel(GG_KERNEL_PARAMS) {
  dev_pdl_enter();
  enum { BK = C::BK, NT = C::NT, HALF_NT = C::NT / 2 };
  extern __shared__ __align__(128) uint8_t gg_smem[];
  __shared__ int b_exp[MX ? C::BN : 1]; /* MX: 2^b_exp[r] takes B row r's power of two off */
  int e, m0, rows;
  if (!gg_find_tile(tile_start, start, E, n, C::BM, blockIdx.y, &e, &m0, &rows)) return;
  const int64_t n0 = (int64_t)blockIdx.x * (GATED ? C::BN / 2 : C::BN);
  const int tid = threadIdx.x;
  gg_chunks<C, MX> ch;
  uint8_t scale_next[MX ? C::XJ : 1];
  int smax[MX ? C::XJ : 1];
  gg_setup<C, GATED, MX>(ws[e], GATED ? ws[E + e] : ws[e], a, m0, rows, n0, K, N, tid, ch, scale_next, smax, b_exp);
  const uint32_t smem = (uint32_t)__cvta_generic_to_shared(gg_smem);
  const int KT = (int)(K / BK);

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
   * waiting until STAGES - 2 are pending means tile kt has landed (MX: STAGES - 3, tile kt + 1,
   * which this step decodes). The barrier after the wait makes every thread's copies (and MX
   * decoded tile kt, written in step kt - 1) visible, and ends every warp's reads of step
   * kt - 1: of ring slot (kt - 1) % STAGES = (kt + STAGES - 1) % STAGES, which the next load
   * reuses, and MX of decoded tile (kt + 1) % 2, which this step's decoding reuses. One barrier a
   * step: a warp's decoding of tile kt + 1 overlaps the other warps' products of tile kt. */
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; s++) {
    if (s < KT) gg_load_stage<C, MX>(smem, s, ch);
    dev_cp_async_commit();
  }
  if constexpr (MX) {
    dev_cp_async_wait<C::STAGES - 2>();
    gg_decode_tile<C, 2>(gg_smem, 0, KT, ch, scale_next, smax, tid);
  }
  for (int kt = 0; kt < KT; kt++) {
    if (MX) dev_cp_async_wait<C::STAGES - 3>();
    else dev_cp_async_wait<C::STAGES - 2>();
    __syncthreads();
    if (kt + C::STAGES - 1 < KT) gg_load_stage<C, MX>(smem, kt + C::STAGES - 1, ch);
    dev_cp_async_commit();
    const uint32_t sa = smem + (uint32_t)(kt % C::STAGES) * gg_smem_layout<C, MX>::stage;
    const uint32_t sb = MX ? smem + gg_smem_layout<C, MX>::decoded + (uint32_t)(kt & 1) * C::B_BYTES
                           : sa + C::A_BYTES;
#pragma unroll
    for (int kh = 0; kh < BK / 32; kh++) {
      uint32_t bf[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; nt++) dev_ldmatrix_x4(bf[nt], sb + b_row[nt] + b_chunk[kh]);
#pragma unroll
      for (int ks = 0; ks < 2; ks++)
#pragma unroll
        for (int mt = 0; mt < C::MT; mt++) {
          uint32_t af[4];
          dev_ldmatrix_x4(af, sa + a_row + (uint32_t)(mt * 16 * BK * 2) + a_chunk[2 * kh + ks]);
#pragma unroll
          for (int nt = 0; nt < NT; nt++) dev_mma16816<MX>(acc[mt][nt], af, bf[nt][2 * ks], bf[nt][2 * ks + 1]);
        }
    }
    if constexpr (MX)
      if (kt + 1 < KT) gg_decode_tile<C, 2>(gg_smem, kt + 1, KT, ch, scale_next, smax, tid);
  }
  dev_cp_async_wait<0>(); /* only empty groups remain; none outlives the block */

  /* C fragment: lane 4g + q holds rows g (c0, c1) and g + 8 (c2, c3) at columns 2q, 2q + 1 of
   * each n8 tile. */
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int mt = 0; mt < C::MT; mt++)
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
      const int r = C::WTM * wm + 16 * mt + g + 8 * hh;
      if (r >= rows) continue;
      const int ea = MX ? (GATED ? a_exp[m0 + r] : act_exp) : 0;
#pragma unroll
      for (int nt = 0; nt < (GATED ? HALF_NT : NT); nt++) {
        const float2 sv = make_float2(acc[mt][nt][2 * hh], acc[mt][nt][2 * hh + 1]);
        const float2 uv = GATED ? make_float2(acc[mt][nt + HALF_NT][2 * hh], acc[mt][nt + HALF_NT][2 * hh + 1]) : sv;
        const int b = (GATED ? C::WTN / 2 : C::WTN) * wn + 8 * nt + 2 * q;
        gg_store_pair<C, GATED, MX>(out, m0, r, n0, N, b, sv, uv, b_exp, ea, act_exp, alpha, beta, limit);
      }
    }
}

/* ---- The same GEMMs on warpgroup MMA (wgmma), candidates of kind 1 ----
 * Two warpgroups; warpgroup wg owns tile rows 64 wg .. + 63 and all BN B rows, one
 * wgmma.m64nBNk16 a 16 columns of K reading A and B straight from shared memory through matrix
 * descriptors, where mma.sync needs every fragment moved through registers by ldmatrix first
 * (what held the kind-0 kernels to a third of cuBLASLt's rate: bench/RESULTS.md). BK is 64, so a
 * tile row is 128 bytes and gg_swizzle<64> (chunk c of row r at 16 (c ^ (r & 7))) is the
 * hardware's 128-byte swizzle, given tiles at multiples of 1024 bytes: the ring, the copies and
 * the MX decoding are the kind-0 kernel's. The accumulators are the same m16n8 fragments side by
 * side: d[4 i + 2 hh + j] is row 16 (warp % 4) + lane / 4 + 8 hh, column 8 i + 2 (lane % 4) + j. */

/* A K-major operand at shared address addr (a multiple of 16 past a 1024-byte-aligned tile):
 * 128-byte swizzle (bits 62-63 = 1), 1024 bytes between groups of 8 rows (bits 32-45, in 16-byte
 * units); the leading offset (bits 16-29) is unused by swizzled K-major layouts. The k16 steps of
 * a 64-column tile start 32 bytes apart. */
__device__ __forceinline__ uint64_t gw_desc(uint32_t addr) {
  return (uint64_t)((addr & 0x3ffffu) >> 4) | (uint64_t)1 << 16 | (uint64_t)(1024 >> 4) << 32 | (uint64_t)1 << 62;
}

/* Orders this warpgroup's register and shared-memory accesses before the wgmma that follow. */
__device__ __forceinline__ void gw_fence(void) { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }

__device__ __forceinline__ void gw_commit(void) { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }

/* Waits until at most N of this warpgroup's committed wgmma groups are pending. */
template <int N>
__device__ __forceinline__ void gw_wait(void) {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

/* Shared memory written through the generic proxy (stores, cp.async) made visible to wgmma's
 * reads, which go through the async proxy. */
__device__ __forceinline__ void gw_fence_shared(void) { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

/* The MMA groups a wgmma kernel leaves running across a step's end: 1 for BF16 where the ring
 * has 4 stages or more, else 0. Measured at full width, 8192 tokens, 4 stages: BF16 10.5 ms at
 * LAG 0 against 10.2 at 1; MX 11.6 against 12.4 (a third decoded tile, the ring a tile
 * shallower), and 12.3 with its E4M3 tiles copied a step ahead of A, so it is not the copies in
 * flight that MX at LAG 1 lacks. */
#define GW_LAG(C, MX) (!(MX) && (C::STAGES) >= 4 ? 1 : 0)

/* Keeps the compiler from moving uses of d across the asynchronous MMAs that write it. */
template <int ND>
__device__ __forceinline__ void gw_hold(float d[ND]) {
#pragma unroll
  for (int i = 0; i < ND; i++) asm volatile("" : "+f"(d[i])::"memory");
}

/* wgmma's operand lists: ND accumulators, then the descriptors a and b; the scale of d (1: add
 * to d) is operand ND + 2, made a predicate. */
#define GW_ACC64 \
"{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, " \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, " \
  "%56, %57, %58, %59, %60, %61, %62, %63}"
#define GW_REGS64 GW_ACC64 ", %64, %65"
#define GW_REGS128 \
"{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, " \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, " \
  "%56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, " \
  "%74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, " \
  "%92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, " \
  "%108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, " \
  "%123, %124, %125, %126, %127}, %128, %129"
#define GW_D8(i)                                                                                          \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define GW_D64 GW_D8(0), GW_D8(8), GW_D8(16), GW_D8(24), GW_D8(32), GW_D8(40), GW_D8(48), GW_D8(56)
#define GW_D128 GW_D64, GW_D8(64), GW_D8(72), GW_D8(80), GW_D8(88), GW_D8(96), GW_D8(104), GW_D8(112), GW_D8(120)
#define GW_MMA(n, type, regs, scale, ...)                                                                  \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " scale ", 0;\nwgmma.mma_async.sync.aligned.m64n" #n      \
               "k16.f32" type " " regs ", p, 1, 1, 0, 0;\n}"                                                \
               : __VA_ARGS__                                                                                \
               : "l"(da), "l"(db), "r"(1))

/* d (64 x BN of the warpgroup) += A (64 x 16 at descriptor da) B (BN x 16 at db)^T, float32
 * sums of F16 or BF16 products. */
template <int BN, int F16>
__device__ __forceinline__ void gw_mma(float d[BN / 2], uint64_t da, uint64_t db) {
  static_assert(BN == 128 || BN == 256, "wgmma tiles of 128 or 256 B rows");
  if constexpr (BN == 128 && F16) GW_MMA(128, ".f16.f16", GW_REGS64, "%66", GW_D64);
  if constexpr (BN == 128 && !F16) GW_MMA(128, ".bf16.bf16", GW_REGS64, "%66", GW_D64);
  if constexpr (BN == 256 && F16) GW_MMA(256, ".f16.f16", GW_REGS128, "%130", GW_D128);
  if constexpr (BN == 256 && !F16) GW_MMA(256, ".bf16.bf16", GW_REGS128, "%130", GW_D128);
}

/* d (64 x NTOK of the warpgroup) += A (64 x 16, this thread's m16n8k16-style fragment a[4] of its
 * warp's 16 rows, f16 pairs in registers) B (NTOK x 16 at descriptor db)^T, float32 sums in
 * d[0 .. NTOK / 2 - 1]. NTOK 16, 32, 64 or 128: the register-operand kernels multiply a ragged
 * token tile at the least of these that holds its rows. */
#define GW_ACC8 "{%0, %1, %2, %3, %4, %5, %6, %7}"
#define GW_ACC16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define GW_ACC32                                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
  "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define GW_MMA_RA(n, acc, a_regs, db_reg, scale_reg, ...)                                            \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " scale_reg ", 0;\nwgmma.mma_async.sync.aligned.m64n" #n \
               "k16.f32.f16.f16 " acc ", {" a_regs "}, " db_reg ", p, 1, 1, 0;\n}"                         \
               : __VA_ARGS__                                                                                \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1))
template <int NTOK>
__device__ __forceinline__ void gw_mma_ra(float d[64], const uint32_t a[4], uint64_t db) {
  static_assert(NTOK == 16 || NTOK == 32 || NTOK == 64 || NTOK == 128, "token tiles of 16, 32, 64 or 128");
  if constexpr (NTOK == 16) GW_MMA_RA(16, GW_ACC8, "%8, %9, %10, %11", "%12", "%13", GW_D8(0));
  if constexpr (NTOK == 32) GW_MMA_RA(32, GW_ACC16, "%16, %17, %18, %19", "%20", "%21", GW_D8(0), GW_D8(8));
  if constexpr (NTOK == 64)
    GW_MMA_RA(64, GW_ACC32, "%32, %33, %34, %35", "%36", "%37", GW_D8(0), GW_D8(8), GW_D8(16), GW_D8(24));
  if constexpr (NTOK == 128) GW_MMA_RA(128, GW_ACC64, "%64, %65, %66, %67", "%68", "%69", GW_D64);
}
#undef GW_MMA_RA
#undef GW_ACC32
#undef GW_ACC16
#undef GW_ACC8
#undef GW_MMA
#undef GW_D128
#undef GW_D64
#undef GW_D8
#undef GW_REGS128
#undef GW_REGS64
#undef GW_ACC64

/* moe_grouped_gemm_kernel's contract, on wgmma: tiles of C with BM 128, BK 64 (C::WM, WN and
 * the fragment counts unused). Both warpgroups read the whole B tile; GATED, B rows 0 .. BN/2 - 1
 * are gate and the rest up, so a lane's gate sums at i < BN/16 and up sums at BN/16 + i are the
 * same (row, column). The dynamic shared memory is aligned up to 1024 bytes here (1 KB more is
 * asked at launch). Each step's MMAs run while this thread decodes the next MX tile and, with
 * LAG 1, through the next step's barrier and copies (the loop's comment). */
template <class C, int GATED, int MX>
__global__ void __launch_bounds__(GG_THREADS, C::MIN_BLOCKS)
    moe_grouped_wgmma_kernel(GG_KERNEL_PARAMS) {
  dev_pdl_enter();
  enum { BK = C::BK, BN = C::BN, ND = BN / 2, LAG = GW_LAG(C, MX), DEC = 2 + LAG };
  static_assert(C::BM == 128 && BK == 64, "wgmma tiles: 2 warpgroups of 64 rows, 128-byte rows of K");
  extern __shared__ __align__(128) uint8_t gg_smem[];
  __shared__ int b_exp[MX ? BN : 1];
  int e, m0, rows;
  if (!gg_find_tile(tile_start, start, E, n, C::BM, blockIdx.y, &e, &m0, &rows)) return;
  const int64_t n0 = (int64_t)blockIdx.x * (GATED ? BN / 2 : BN);
  const int tid = threadIdx.x;
  gg_chunks<C, MX> ch;
  uint8_t scale_next[MX ? C::XJ : 1];
  int smax[MX ? C::XJ : 1];
  gg_setup<C, GATED, MX>(ws[e], GATED ? ws[E + e] : ws[e], a, m0, rows, n0, K, N, tid, ch, scale_next, smax, b_exp);
  const uint32_t raw_base = (uint32_t)__cvta_generic_to_shared(gg_smem), align = (1024u - (raw_base & 1023u)) & 1023u;
  const uint32_t smem = raw_base + align;
  uint8_t *smem_p = gg_smem + align;
  const int KT = (int)(K / BK), wg = tid >> 7;

  float d[ND];
#pragma unroll
  for (int i = 0; i < ND; i++) d[i] = 0.0f;

  /* The ring as in moe_grouped_gemm_kernel, LAG tiles shallower: with LAG 1 a step's MMAs are
   * still running when the next step issues its own (each step waits for all but the last
   * group), so that the tensor cores do not idle through the barrier. Step kt then loads tile
   * kt + STAGES - 1 - LAG into the slot of tile kt - 1 - LAG, whose MMAs every warpgroup has
   * waited for before this step's barrier; MX decodes tile kt + 1 into decoded tile
   * (kt + 1) % DEC, last read by the MMAs of tile kt + 1 - DEC (DEC = 2 + LAG). The fence before
   * each barrier hands this thread's landed copies and decoded tile to the async proxy. */
#pragma unroll
  for (int s = 0; s < C::STAGES - 1 - LAG; s++) {
    if (s < KT) gg_load_stage<C, MX>(smem, s, ch);
    dev_cp_async_commit();
  }
  if constexpr (MX) {
    dev_cp_async_wait<C::STAGES - 2 - LAG>();
    gg_decode_tile<C, DEC>(smem_p, 0, KT, ch, scale_next, smax, tid);
  }
  for (int kt = 0; kt < KT; kt++) {
    if (MX) dev_cp_async_wait<C::STAGES - 3 - LAG>();
    else dev_cp_async_wait<C::STAGES - 2 - LAG>();
    gw_fence_shared();
    __syncthreads();
    if (kt + C::STAGES - 1 - LAG < KT) gg_load_stage<C, MX>(smem, kt + C::STAGES - 1 - LAG, ch);
    dev_cp_async_commit();
    const uint32_t sa = smem + (uint32_t)(kt % C::STAGES) * gg_smem_layout<C, MX, DEC>::stage;
    const uint32_t sb = MX ? smem + gg_smem_layout<C, MX, DEC>::decoded + (uint32_t)(kt % DEC) * C::B_BYTES
                           : sa + C::A_BYTES;
    const uint64_t da = gw_desc(sa + (uint32_t)wg * 64u * (BK * 2)), db = gw_desc(sb);
    gw_fence();
#pragma unroll
    for (int ks = 0; ks < BK / 16; ks++) gw_mma<BN, MX>(d, da + 2 * ks, db + 2 * ks);
    gw_commit();
    if constexpr (MX)
      if (kt + 1 < KT) gg_decode_tile<C, DEC>(smem_p, kt + 1, KT, ch, scale_next, smax, tid);
    gw_wait<LAG>();
  }
  gw_wait<0>();
  gw_hold<ND>(d);
  dev_cp_async_wait<0>();

  const int lane = tid & 31, g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int hh = 0; hh < 2; hh++) {
    const int r = 64 * wg + 16 * ((tid >> 5) & 3) + g + 8 * hh;
    if (r >= rows) continue;
    const int ea = MX ? (GATED ? a_exp[m0 + r] : act_exp) : 0;
#pragma unroll
    for (int i = 0; i < (GATED ? BN / 16 : BN / 8); i++) {
      const float2 sv = make_float2(d[4 * i + 2 * hh], d[4 * i + 2 * hh + 1]);
      const int iu = GATED ? i + BN / 16 : i;
      const float2 uv = make_float2(d[4 * iu + 2 * hh], d[4 * iu + 2 * hh + 1]);
      gg_store_pair<C, GATED, MX>(out, m0, r, n0, N, 8 * i + 2 * q, sv, uv, b_exp, ea, act_exp, alpha, beta, limit);
    }
  }
}

/* ---- MXFP8 with the weights as wgmma's A operand, from registers (kind 2) ----
 * Kinds 0 and 1 decode the E4M3 B tile into a shared f16 tile that every warp then reads (bench/
 * RESULTS.md, twentieth session: the decoding is latency-bound and a step moves about 160 KB
 * through shared memory). Here the roles turn: the weights are the A operand, 64 rows a wgmma,
 * each thread decoding its own fragment's bytes into registers, and the sorted tokens are the B
 * operand (the same swizzled tile of xy or act as kind 1's A tile). Tile: BN = 256 weight rows (a
 * warpgroup 2 x 64; GATED: warpgroup w's gate rows 64 w .. + 63 and the same rows of up, so that a
 * thread holds the gate and up sums of one (row, token)) by BM = 128 tokens. K is permuted within
 * each 64 columns (gr_perm_col, by the scatter and by this kernel's gate/up epilogue), so that a
 * thread's fragment of a weight row for a whole K step is one 16-byte load under one scale.
 * The ring and its barrier are kind 1's; the decoding of step kt + 1 runs while step kt's MMAs
 * do, into the other of two register sets. The epilogue goes through shared memory, to store
 * whole token rows: act [n, I] f16 (permuted, times 2^act_exp) or y [n, H] float32.
 * Measured (H200, E 128, top 4, 3072 x 6144, 8192 tokens): 12.1-12.3 ms against kind 1's
 * 11.3-11.5, the tensor pipe 43-45% busy, the warps (two a scheduler) stalled most on fixed
 * latencies and then at the block barrier, so it is not the default (bench/RESULTS.md). */
template <class C> struct gr_layout {
  enum {
    ring = C::STAGES * gg_smem_layout<C, 1>::stage,
    ACT_LD = C::BN / 2 + 8, Y_LD = C::BN + 4, /* halves / floats a staged output row: no bank conflicts */
    y = C::BM * Y_LD * 4,                     /* the larger stage (act's is BM * ACT_LD * 2) */
    bytes = ring > y ? ring : y,
  };
};

/* This thread's weight rows in the B tile (kinds 2 and 3; thread tid < GG_THREADS of the
 * multiplying warps): rb[j], j = 2 m + h, m the warpgroup's 64-row block, h the fragment's row g
 * or g + 8; sc[j] their scales at chunk q's block (NULL past N), s_next[j] those of step 0, and
 * smax[j] their largest (the epilogue's powers of two too: a thread's outputs are its own rows'). */
struct gr_rows {
  int rb[4], smax[4];
  const uint8_t *sc[4];
  uint8_t s_next[4];
};

template <class C, int GATED>
__device__ __forceinline__ void gr_rows_setup(const cuda_weight &w0, const cuda_weight &w1, int64_t n0, int64_t K,
                                              int64_t N, int tid, gr_rows &r) {
  const int wg = tid >> 7, wi = (tid >> 5) & 3, g = (tid & 31) >> 2, q = tid & 3;
#pragma unroll
  for (int j = 0; j < 4; j++) {
    const int m = j >> 1, h = j & 1;
    r.rb[j] = (GATED ? (C::BN / 2) * m + 64 * wg : 128 * wg + 64 * m) + 16 * wi + g + 8 * h;
    r.sc[j] = gg_row_scales<C, GATED>(w0, w1, n0, K, N, r.rb[j], q, &r.smax[j]);
    r.s_next[j] = r.sc[j] ? r.sc[j][0] : 127;
  }
}

/* This thread's fragments f[m][k16 step][a0..a3] of K step t, decoded from ring slot `slot` (t %
 * STAGES) of the shared memory at smem_p (its copies landed); r.s_next: the scales of step t,
 * replaced by step t + 1's (a load a step ahead). */
template <class C>
__device__ __forceinline__ void gr_decode(const uint8_t *smem_p, int t, int slot, int KT, int q, gr_rows &r,
                                          uint32_t (&f)[2][4][4]) {
  const uint8_t *raw = smem_p + (size_t)slot * gg_smem_layout<C, 1>::stage + C::A_BYTES + 16 * q;
  uint4 u[4];
  __half2 fac[4];
#pragma unroll
  for (int j = 0; j < 4; j++) {
    u[j] = *(const uint4 *)(raw + r.rb[j] * C::BK);
    fac[j] = gg_block_factor(r.s_next[j], r.smax[j]);
    if (r.sc[j] && t + 1 < KT) r.s_next[j] = r.sc[j][(size_t)(t + 1) * (C::BK / GG_MX_BLOCK)];
  }
#pragma unroll
  for (int j = 0; j < 4; j++) {
    const uint32_t word[4] = {u[j].x, u[j].y, u[j].z, u[j].w};
#pragma unroll
    for (int st = 0; st < 4; st++) { /* bytes 0, 1: columns 2q, 2q + 1 (a0 / a1); 2, 3: 2q + 8, 2q + 9 (a2 / a3) */
      uint32_t pair[2];
      gg_e4m3x4_to_f16(word[st], fac[j], pair);
      f[j >> 1][st][j & 1] = pair[0];
      f[j >> 1][st][2 + (j & 1)] = pair[1];
    }
  }
}

/* The outputs of a kind 2 or 3 tile, NTOK tokens multiplied (rows <= NTOK), from d[m][4 i + 2 hh
 * + jj]: weight row 16 wi + g + 8 hh of block m (r.rb[2 m + hh]), token 8 i + 2 q + jj. Staged in
 * the ring's shared memory at smem_p (every multiplying warp done with it), to store whole token
 * rows: act [n, I] f16 (permuted, times 2^act_exp) or y [n, H] float32. The multiplying warps
 * meet at named barrier 1 (a producer warpgroup, if any, takes no part). */
template <class C, int GATED, int NTOK>
__device__ __forceinline__ void gr_epilogue(uint8_t *smem_p, const float (&d)[2][64], const gr_rows &r,
                                            const int32_t *__restrict__ a_exp, int act_exp, int m0, int rows,
                                            int64_t n0, int64_t N, float alpha, float beta, float limit,
                                            void *__restrict__ out, int tid) {
  const int wg = tid >> 7, wi = (tid >> 5) & 3, g = (tid & 31) >> 2, q = tid & 3;
  dev_bar_sync_first<GG_THREADS>(); /* the ring's shared memory now stages the outputs */
  if constexpr (GATED) {
    uint16_t *st = (uint16_t *)smem_p; /* [BM tokens][ACT_LD]: act columns n0 .. n0 + BN/2 - 1, permuted */
#pragma unroll
    for (int i = 0; i < NTOK / 8; i++)
#pragma unroll
      for (int jj = 0; jj < 2; jj++) {
        const int t = 8 * i + 2 * q + jj;
        if (t >= rows) continue;
        const int ea = a_exp[m0 + t];
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
          const int pc = 64 * wg + gr_perm_col(16 * wi + g + 8 * hh);
          const float v = dev_swiglu_oai(dev_ldexp(d[0][4 * i + 2 * hh + jj], r.smax[hh] - GG_MX_UNSCALE - ea),
                                         dev_ldexp(d[1][4 * i + 2 * hh + jj], r.smax[2 + hh] - GG_MX_UNSCALE - ea),
                                         alpha, beta, limit);
          const __half hv = __float2half_rn(dev_ldexp(v, act_exp));
          st[t * gr_layout<C>::ACT_LD + pc] = *(const uint16_t *)&hv;
        }
      }
    dev_bar_sync_first<GG_THREADS>();
    enum { CHUNKS = C::BN / 2 / 8 }; /* 16-byte chunks of a token's act columns */
    for (int i = tid; i < rows * CHUNKS; i += GG_THREADS) {
      const int t = i / CHUNKS, c8 = 8 * (i % CHUNKS);
      if (n0 + c8 < N)
        *(uint4 *)((uint16_t *)out + (size_t)(m0 + t) * (size_t)N + n0 + c8) =
            *(const uint4 *)(st + t * gr_layout<C>::ACT_LD + c8);
    }
  } else {
    float *st = (float *)smem_p; /* [BM tokens][Y_LD]: y columns n0 .. n0 + BN - 1 */
#pragma unroll
    for (int m = 0; m < 2; m++)
#pragma unroll
      for (int hh = 0; hh < 2; hh++) {
        const int c = 128 * wg + 64 * m + 16 * wi + g + 8 * hh, be = r.smax[2 * m + hh] - GG_MX_UNSCALE - act_exp;
#pragma unroll
        for (int i = 0; i < NTOK / 8; i++)
#pragma unroll
          for (int jj = 0; jj < 2; jj++) {
            const int t = 8 * i + 2 * q + jj;
            st[t * gr_layout<C>::Y_LD + c] = dev_ldexp(d[m][4 * i + 2 * hh + jj], be);
          }
      }
    dev_bar_sync_first<GG_THREADS>();
    enum { CHUNKS = C::BN / 4 };
    for (int i = tid; i < rows * CHUNKS; i += GG_THREADS) {
      const int t = i / CHUNKS, c4 = 4 * (i % CHUNKS);
      if (n0 + c4 < N)
        *(float4 *)((float *)out + (size_t)(m0 + t) * (size_t)N + n0 + c4) =
            *(const float4 *)(st + t * gr_layout<C>::Y_LD + c4);
    }
  }
}

template <class C, int GATED>
__global__ void __launch_bounds__(GG_THREADS, 1) moe_grouped_ra_kernel(GG_KERNEL_PARAMS) {
  dev_pdl_enter();
  enum { BK = C::BK, S = C::STAGES, STAGE = gg_smem_layout<C, 1>::stage };
  static_assert(C::BM == 128 && C::BN == 256 && BK == 64 && S >= 3,
                "two warpgroups of 2 x 64 weight rows, 128 tokens, 64-column steps");
  extern __shared__ __align__(128) uint8_t gg_smem[];
  int e, m0, rows;
  if (!gg_find_tile(tile_start, start, E, n, C::BM, blockIdx.y, &e, &m0, &rows)) return;
  const int64_t n0 = (int64_t)blockIdx.x * (GATED ? C::BN / 2 : C::BN);
  const int tid = threadIdx.x, q = tid & 3;
  const cuda_weight &w0 = ws[e], &w1 = GATED ? ws[E + e] : ws[e];
  gg_chunks<C, 1> ch;
  gg_setup_copies<C, GATED, 1>(w0, w1, a, m0, rows, n0, K, N, tid, ch);
  const uint32_t raw_base = (uint32_t)__cvta_generic_to_shared(gg_smem), align = (1024u - (raw_base & 1023u)) & 1023u;
  const uint32_t smem = raw_base + align;
  uint8_t *smem_p = gg_smem + align;
  const int KT = (int)(K / BK);
  gr_rows r;
  gr_rows_setup<C, GATED>(w0, w1, n0, K, N, tid, r);

  float d[2][64];
#pragma unroll
  for (int m = 0; m < 2; m++)
#pragma unroll
    for (int i = 0; i < 64; i++) d[m][i] = 0.0f;
  gw_hold<64>(d[0]);
  gw_hold<64>(d[1]);

  /* the ring of kind 1 (STAGES - 1 tiles ahead, a commit a step); step kt: the MMAs of kt issued,
   * those of kt - 1 waited for (freeing their register set and, after the barrier, their slot),
   * tile kt + 1 waited for, the slot of kt - 1 refilled, tile kt + 1 decoded. Measured against
   * mbarriers (full: a slot's copies landed, through cp.async.mbarrier.arrive; empty: its MMAs
   * done) in place of the block barrier: 12.1 -> 13.0 ms. */
#pragma unroll
  for (int st = 0; st < S - 1; st++) {
    if (st < KT) gg_load_stage<C, 1>(smem, st, ch);
    dev_cp_async_commit();
  }
  /* step kt with its fragments in cur, decoding step kt + 1 into nxt; the two register sets
   * alternate by unrolling the loop twice (indexing them by kt & 1 would put them in memory) */
  auto step = [&](int kt, uint32_t (&cur)[2][4][4], uint32_t (&nxt)[2][4][4]) {
    const uint64_t db = gw_desc(smem + (uint32_t)(kt % S) * STAGE);
    gw_fence();
#pragma unroll
    for (int st = 0; st < 4; st++)
#pragma unroll
      for (int m = 0; m < 2; m++) gw_mma_ra<128>(d[m], cur[m][st], db + 2 * st);
    gw_commit();
    gw_wait<1>();
    dev_cp_async_wait<S - 3>();
    gw_fence_shared(); /* this thread's landed copies, to wgmma's reads after the barrier */
    __syncthreads();
    if (kt + S - 1 < KT) gg_load_stage<C, 1>(smem, kt + S - 1, ch);
    dev_cp_async_commit();
    if (kt + 1 < KT) gr_decode<C>(smem_p, kt + 1, (kt + 1) % S, KT, q, r, nxt);
  };
  uint32_t af0[2][4][4], af1[2][4][4];
  dev_cp_async_wait<S - 2>();
  gw_fence_shared();
  __syncthreads();
  gr_decode<C>(smem_p, 0, 0, KT, q, r, af0);
  for (int kt = 0; kt < KT; kt += 2) {
    step(kt, af0, af1);
    if (kt + 1 < KT) step(kt + 1, af1, af0);
  }
  gw_wait<0>();
  gw_hold<64>(d[0]);
  gw_hold<64>(d[1]);
  dev_cp_async_wait<0>();
  gr_epilogue<C, GATED, 128>(smem_p, d, r, a_exp, act_exp, m0, rows, n0, N, alpha, beta, limit, out, tid);
}

/* ---- kind 2's tiles with warp specialization (kind 3) ----
 * Kind 2's warps each copy, decode and multiply, and meet at a block barrier every step; its
 * tensor pipe was busy 43-45% of the time. Here a third warpgroup only copies (cp.async, its
 * registers given up to the others by setmaxnreg), and a ring of STAGES slots behind mbarriers
 * replaces the block barrier: full[s] (the producer's 4 warps: the slot's copies landed and are
 * fenced to the async proxy) and empty[s] (the 8 multiplying warps: the MMAs that read the slot
 * are done, and so are their decodings before them). The multiplying warps are kind 2's (the
 * same rows, fragments, decoding and epilogue), and a tile with fewer than 128 tokens multiplies
 * only the least of 16, 32, 64 or 128 that holds them: an expert's last tile is often a few rows
 * (8192 tokens over 128 experts, top 4: 256 +- 16 each). */
/* Registers a thread after setmaxnreg. 128 x 40 + 256 x 232 = 384 x 168, what the block got at
 * launch: a larger sum is never granted, and the multiplying warps would wait for it forever. */
enum {
  GS_PRODUCER_REGS = 40,  /* the copying warpgroup */
  GS_CONSUMER_REGS = 232, /* the multiplying warps */
  GS_THREADS = GG_THREADS + 128,
};

/* The producer, thread p of 128: every K step's tiles into slot t % STAGES (the layout of
 * gg_load_stage) once its last readers released it; full[t % STAGES] arrives when they have
 * landed, STAGES - 2 steps later (the copies in flight), or at the end. The arrival of step
 * t - (STAGES - 2) comes before the wait for slot t's release, so the multiplying warps never wait
 * on a slot that only their own release would free. Chunk p + 128 j of a tile: A (token) row
 * p / 8 + 16 j, chunk p % 8, swizzled (the swizzle depends on the row mod 8 alone, so chunk j lands
 * 2048 j past chunk 0); B (E4M3) row p / 4 + 32 j, chunk p % 4 (GATED: j < 4 gate rows, the rest
 * the same rows of up). Addresses from one base an operand, not gg_chunks' pointer a chunk: this
 * warpgroup runs on 40 registers. Rows past the tile's (A) or N (B) read nothing and write zeros. */
template <class C, int GATED>
__device__ __forceinline__ void gs_produce(const cuda_weight &w0, const cuda_weight &w1, const uint16_t *a, int m0,
                                           int rows, int64_t n0, int64_t K, int64_t N, int KT, uint32_t smem,
                                           uint64_t *full, uint64_t *empty, int p) {
  enum { S = C::STAGES, D = S - 2, STAGE = gg_smem_layout<C, 1>::stage, J = 8 };
  static_assert(C::BM * C::CPR == 128 * J && C::BN * C::MX_CPR == 128 * J, "8 chunks of each tile a thread");
  const int ar = p / C::CPR, br = p / C::MX_CPR, lane = p & 31;
  const uint8_t *pa = (const uint8_t *)(a + (size_t)(m0 + (ar < rows ? ar : 0)) * (size_t)K) + 16 * (p % C::CPR);
  const int64_t bw = n0 + br; /* B chunk j's weight row: bw + 32 (j % 4) (GATED; else bw + 32 j) */
  const uint8_t *pb0 = w0.data + (size_t)(bw < N ? bw : n0) * (size_t)K + 16 * (p % C::MX_CPR);
  const uint8_t *pb1 = w1.data + (size_t)(bw < N ? bw : n0) * (size_t)K + 16 * (p % C::MX_CPR);
  const uint32_t a_dst = gg_swizzle<C::BK>(ar, p % C::CPR), b_dst = C::A_BYTES + 16u * (uint32_t)p;
  const size_t a_step = (size_t)16 * (size_t)K * 2, b_step = (size_t)32 * (size_t)K;
  auto load = [&](int t) {
    const uint32_t slot = smem + (uint32_t)(t % S) * STAGE;
    const size_t koff = (size_t)t * C::BK;
#pragma unroll
    for (int j = 0; j < J; j++) {
      const int ok = ar + 16 * j < rows;
      dev_cp_async16(slot + a_dst + 2048u * j, pa + (ok ? j * a_step : 0) + 2 * koff, ok ? 16 : 0);
    }
#pragma unroll
    for (int j = 0; j < J; j++) {
      const int jr = GATED ? j % 4 : j;
      const int ok = bw + 32 * jr < N;
      dev_cp_async16(slot + b_dst + 2048u * j, (GATED && j >= 4 ? pb1 : pb0) + (ok ? jr * b_step : 0) + koff,
                    ok ? 16 : 0);
    }
  };
  auto publish = [&](int t) { /* this thread's copies of step t landed (the caller waited) */
    gw_fence_shared();
    __syncwarp();
    if (lane == 0) mbar_arrive(&full[t % S]);
  };
  for (int t = 0; t < KT; t++) {
    if (t >= D) { /* steps 0 .. t - 1 committed: at most D - 1 pending leaves step t - D landed */
      dev_cp_async_wait<D - 1>();
      publish(t - D);
    }
    if (t >= S) mbar_wait(&empty[t % S], (uint32_t)(t / S - 1) & 1);
    load(t);
    dev_cp_async_commit();
  }
  dev_cp_async_wait<0>();
  for (int t = KT - D > 0 ? KT - D : 0; t < KT; t++) publish(t);
}

/* The multiplying warps (tid < GG_THREADS) over a tile of NTOK tokens: kind 2's steps, each
 * waiting for its slot's copies (full) and releasing the slot of the step before once that
 * step's MMAs are done (empty). */
template <class C, int GATED, int NTOK>
__device__ __forceinline__ void gs_consume(uint8_t *smem_p, uint32_t smem, int KT, uint64_t *full, uint64_t *empty,
                                           gr_rows &r, const int32_t *__restrict__ a_exp, int act_exp,
                                           int m0, int rows, int64_t n0, int64_t N, float alpha, float beta,
                                           float limit, void *__restrict__ out, int tid) {
  enum { S = C::STAGES, STAGE = gg_smem_layout<C, 1>::stage };
  const int q = tid & 3, lane = tid & 31;
  float d[2][64];
#pragma unroll
  for (int m = 0; m < 2; m++)
#pragma unroll
    for (int i = 0; i < NTOK / 2; i++) d[m][i] = 0.0f;
  gw_hold<NTOK / 2>(d[0]);
  gw_hold<NTOK / 2>(d[1]);
  /* slot: step kt's ring slot; next, phase: step kt + 1's slot and the parity of its fill (kept
   * as counters: a division by STAGES a step is a dozen instructions the decoding waits behind) */
  int slot = 0, next = 1; /* STAGES >= 3 */
  uint32_t phase = 0;
  auto step = [&](int kt, uint32_t (&cur)[2][4][4], uint32_t (&nxt)[2][4][4]) {
    const uint64_t db = gw_desc(smem + (uint32_t)slot * STAGE);
    gw_fence();
#pragma unroll
    for (int st = 0; st < 4; st++)
#pragma unroll
      for (int m = 0; m < 2; m++) gw_mma_ra<NTOK>(d[m], cur[m][st], db + 2 * st);
    gw_commit();
    gw_wait<1>();
    if (kt > 0) {
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[slot == 0 ? S - 1 : slot - 1]);
    }
    if (kt + 1 < KT) {
      mbar_wait(&full[next], phase);
      gr_decode<C>(smem_p, kt + 1, next, KT, q, r, nxt);
    }
    slot = next;
    if (++next == S) {
      next = 0;
      phase ^= 1;
    }
  };
  uint32_t af0[2][4][4], af1[2][4][4];
  mbar_wait(&full[0], 0);
  gr_decode<C>(smem_p, 0, 0, KT, q, r, af0);
  for (int kt = 0; kt < KT; kt += 2) {
    step(kt, af0, af1);
    if (kt + 1 < KT) step(kt + 1, af1, af0);
  }
  gw_wait<0>();
  gw_hold<NTOK / 2>(d[0]);
  gw_hold<NTOK / 2>(d[1]);
  gr_epilogue<C, GATED, NTOK>(smem_p, d, r, a_exp, act_exp, m0, rows, n0, N, alpha, beta, limit, out, tid);
}

template <class C, int GATED>
__global__ void __launch_bounds__(GS_THREADS, 1) moe_grouped_ws_kernel(GG_KERNEL_PARAMS) {
  dev_pdl_enter();
  enum { S = C::STAGES };
  static_assert(C::BM == 128 && C::BN == 256 && C::BK == 64 && S >= 3,
                "two warpgroups of 2 x 64 weight rows, 128 tokens, 64-column steps");
  extern __shared__ __align__(128) uint8_t gg_smem[];
  __shared__ __align__(8) uint64_t full[S], empty[S];
  int e, m0, rows;
  if (!gg_find_tile(tile_start, start, E, n, C::BM, blockIdx.y, &e, &m0, &rows)) return;
  const int64_t n0 = (int64_t)blockIdx.x * (GATED ? C::BN / 2 : C::BN);
  const int tid = threadIdx.x, KT = (int)(K / C::BK);
  const cuda_weight &w0 = ws[e], &w1 = GATED ? ws[E + e] : ws[e];
  const uint32_t raw_base = (uint32_t)__cvta_generic_to_shared(gg_smem), align = (1024u - (raw_base & 1023u)) & 1023u;
  if (tid < S) {
    mbar_init(&full[tid], 4);
    mbar_init(&empty[tid], GG_THREADS / 32);
  }
  mbar_init_fence();
  __syncthreads();
  if (tid >= GG_THREADS) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"((int)GS_PRODUCER_REGS));
    gs_produce<C, GATED>(w0, w1, a, m0, rows, n0, K, N, KT, raw_base + align, full, empty, tid - GG_THREADS);
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"((int)GS_CONSUMER_REGS));
  gr_rows r;
  gr_rows_setup<C, GATED>(w0, w1, n0, K, N, tid, r);
#define GS_CONSUME(ntok)                                                                                          \
  gs_consume<C, GATED, ntok>(gg_smem + align, raw_base + align, KT, full, empty, r, a_exp, act_exp, m0, rows, n0, \
                             N, alpha, beta, limit, out, tid)
  if (rows <= 16) GS_CONSUME(16);
  else if (rows <= 32) GS_CONSUME(32);
  else if (rows <= 64) GS_CONSUME(64);
  else GS_CONSUME(128);
#undef GS_CONSUME
}

/* The rows, K tile and kind of each candidate, for the checks and grids made on the host. */
#define GG_DIMS(i, bm, bn, bk, stages, wm, minb, kind) {bm, bk, kind},
static const struct {
  int bm, bk, kind;
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
 * H200 at full width (bench/RESULTS.md, the sweep of bench_cuda_ops, 8192 tokens) where H and I
 * are multiples of 64 columns of K: BF16 the wgmma candidate 6 (10.2 ms against 13.7 for the best
 * mma.sync tile, candidate 4), MXFP8 the warp-specialized candidate 9 (10.5 ms against 11.4 for
 * candidate 6 and 12.1 for candidate 8); elsewhere mma.sync, BF16 candidate 0 and MXFP8 candidate
 * 5 (6 stages cover the decoding's extra step). */
static int gg_tile(const cuda_backend *cb, const m3_moe_experts *ex) {
  if (cb->moe_grouped_tile >= 0) return cb->moe_grouped_tile;
  const int64_t H = ex->gate[0].cols, I = ex->gate[0].rows;
  const int mx = ex->gate[0].quant == M3_WQ_MXFP8, bk = gg_dims[mx ? 9 : 6].bk;
  if (H % bk == 0 && I % bk == 0) return mx ? 9 : 6;
  return mx ? 5 : 0;
}

/* MXFP8 experts: *act_exp = the power of two the down GEMM's f16 input carries. SwiGLU-OAI's
 * clamp bounds its output: |up + beta| <= limit + |beta|, and gate * sigmoid(alpha gate) is at
 * most limit for gate >= 0 and at most 0.2785 / alpha in magnitude below (the largest u / (1 +
 * e^u) is 0.27846); times 2^act_exp the bound stays under 2^15. 0 when there is no bound (limit
 * not finite, alpha not positive) or a loose one (act_exp under GG_ACT_EXP_MIN: f16's smallest
 * step, 2^(-24 - act_exp) in act's units, is coarser than BF16's rounding for every value under
 * 2^(-17 - act_exp), 2^-11 at the minimum): those experts do not take the grouped GEMMs. */
static int gg_act_exp(const m3_moe_experts *ex, int *act_exp) {
  const float l = ex->limit, bound = (l + fabsf(ex->beta)) * fmaxf(l, 0.2785f / ex->alpha);
  if (!(l > 0.0f && ex->alpha > 0.0f && bound > 0.0f && bound <= FLT_MAX)) return 0;
  int x; /* bound in [2^(x - 1), 2^x) */
  frexpf(bound, &x);
  *act_exp = GG_F16_TOP - x;
  return *act_exp >= GG_ACT_EXP_MIN;
}

int cuda_moe_grouped_on_wgmma(const cuda_backend *cb, const m3_moe_experts *ex) {
  return gg_dims[gg_tile(cb, ex)].kind != 0;
}

int cuda_moe_grouped_fits(const cuda_backend *cb, const m3_moe_experts *ex, int wide, const float *h, int n, int k) {
  const m3_tensor *g0 = &ex->gate[0], *d0 = &ex->down[0];
  const int tile = gg_tile(cb, ex);
  const int64_t H = g0->cols, I = g0->rows, bm = gg_dims[tile].bm, bk = gg_dims[tile].bk;
  const int64_t m_tiles = ((int64_t)n + bm - 1) / bm + (ex->E < n ? ex->E : n);
  int act_exp;
  /* up and every other expert share gate[0]'s or down[0]'s form (moe.cu check_experts); gate and
   * down of one form, since act's (BF16 or f16) serves both */
  return wide && gg_weight_fits(g0) && gg_weight_fits(d0) && g0->quant == d0->quant &&
         (g0->quant != M3_WQ_MXFP8 || gg_act_exp(ex, &act_exp)) && H > 0 && I > 0 && H % bk == 0 && I % bk == 0 &&
         (uintptr_t)h % 16 == 0 && n > 0 && k > 0 && k <= GG_MAX_K && n % k == 0 && m_tiles <= GG_MAX_GRID_Y;
}

/* Launches the KIND kernel (moe_grouped_gemm_kernel, moe_grouped_wgmma_kernel, moe_grouped_ra_kernel or
 * moe_grouped_ws_kernel) for C, GATED,
 * MX, allowing it its dynamic shared memory on cb's device first (cuda_allow_smem). */
template <class C, int GATED, int MX, int KIND>
static void gg_launch(cuda_backend *cb, dim3 grid, const cuda_weight *ws, int E, const int32_t *start,
                      const int32_t *tile_start, int n, const void *a, const int32_t *a_exp, int act_exp,
                      int64_t K, int64_t N, const m3_moe_experts *ex, void *out) {
  void (*kernel)(GG_KERNEL_PARAMS);
  int smem;
  int threads = GG_THREADS;
  if constexpr (KIND == 3 && MX) { /* kinds 2 and 3 are MXFP8's; BF16 takes kind 1 at the same tile */
    kernel = moe_grouped_ws_kernel<C, GATED>;
    smem = gr_layout<C>::bytes + 1024; /* room to align to 1024 */
    threads = GS_THREADS;
  } else if constexpr (KIND == 2 && MX) {
    kernel = moe_grouped_ra_kernel<C, GATED>;
    smem = gr_layout<C>::bytes + 1024;
  } else if constexpr (KIND) {
    using C1 = gg_cfg<C::BM, C::BN, C::BK, (C::STAGES < 4 ? C::STAGES : 4), C::WM, C::MIN_BLOCKS>;
    kernel = moe_grouped_wgmma_kernel<C1, GATED, MX>;
    smem = gg_smem_layout<C1, MX, 2 + GW_LAG(C1, MX)>::bytes + 1024;
  } else {
    kernel = moe_grouped_gemm_kernel<C, GATED, MX>;
    smem = gg_smem_layout<C, MX>::bytes;
  }
  cuda_allow_smem(cb, (const void *)kernel, smem, "moe_experts (grouped gemm shared memory)");
  dev_launch(kernel, grid, threads, smem, cb->stream, ws, E, start, tile_start, n, (const uint16_t *)a, a_exp,
             act_exp, K, N, ex->alpha, ex->beta, ex->limit, out);
  cuda_launched(cb, GATED ? "moe_experts (grouped gate, up, swiglu)" : "moe_experts (grouped down)");
}

/* The two GEMMs with tiles of C over m_tiles block rows (an upper bound on the real count); MX:
 * xy's rows carry 2^row_exp, act 2^act_exp. */
template <class C, int KIND>
static void gg_gemms(cuda_backend *cb, const m3_moe_experts *ex, const cuda_weight *w, const int32_t *start,
                     const int32_t *tile_start, int n, unsigned m_tiles, const void *xy,
                     const int32_t *row_exp, int act_exp, void *act, float *y) {
  const int E = ex->E;
  const int64_t H = ex->gate[0].cols, I = ex->gate[0].rows;
  const dim3 grid_gate((unsigned)((I + C::BN / 2 - 1) / (C::BN / 2)), m_tiles);
  const dim3 grid_down((unsigned)((H + C::BN - 1) / C::BN), m_tiles);
  if (ex->gate[0].quant == M3_WQ_MXFP8) {
    gg_launch<C, 1, 1, KIND>(cb, grid_gate, w, E, start, tile_start, n, xy, row_exp, act_exp, H, I, ex, act);
    gg_launch<C, 0, 1, KIND>(cb, grid_down, w + 2 * E, E, start, tile_start, n, act, NULL, act_exp, I, H, ex, y);
  } else {
    gg_launch<C, 1, 0, KIND>(cb, grid_gate, w, E, start, tile_start, n, xy, NULL, 0, H, I, ex, act);
    gg_launch<C, 0, 0, KIND>(cb, grid_down, w + 2 * E, E, start, tile_start, n, act, NULL, 0, I, H, ex, y);
  }
}

void cuda_moe_grouped(cuda_backend *cb, const m3_moe_experts *ex, const cuda_weight *w, const int32_t *start,
                      const int32_t *pos_of, int n, int k, const float *h, __nv_bfloat16 *h_bf16, int32_t *tile_start,
                      void *xy, int32_t *row_exp, void *act, float *y) {
  const int E = ex->E, tile = gg_tile(cb, ex), bm = gg_dims[tile].bm;
  const int64_t H = ex->gate[0].cols;
  int act_exp = 0;
  const int mx = ex->gate[0].quant == M3_WQ_MXFP8 && gg_act_exp(ex, &act_exp);
  const unsigned tokens = (unsigned)(n / k);
  if (mx)
    dev_launch(gg_dims[tile].kind >= 2 ? moe_scatter_kernel<1, 1> : moe_scatter_kernel<1, 0>, tokens,
               GG_SCATTER_THREADS, 0, cb->stream, h, pos_of, k, n, H, xy, row_exp, h_bf16);
  else
    dev_launch(moe_scatter_kernel<0, 0>, tokens, GG_SCATTER_THREADS, 0, cb->stream, h, pos_of, k, n, H, xy, row_exp,
               h_bf16);
  cuda_launched(cb, mx ? "moe_experts (tokens to f16)" : "moe_experts (tokens to bf16)");
  dev_launch(moe_tile_offsets_kernel, 1, 32, 0, cb->stream, start, E, n, bm, tile_start);
  cuda_launched(cb, "moe_experts (tile offsets)");
  const unsigned m_tiles = (unsigned)((n + bm - 1) / bm + (E < n ? E : n));
#define GG_CASE(i, bm_, bn, bk, stages, wm, minb, kind)                                                        \
  case i:                                                                                                       \
    gg_gemms<gg_cfg<bm_, bn, bk, stages, wm, minb>, kind>(cb, ex, w, start, tile_start, n, m_tiles, xy, row_exp, \
                                                           act_exp, act, y);                                    \
    break;
  switch (tile) { GG_TILES(GG_CASE) }
#undef GG_CASE
}
