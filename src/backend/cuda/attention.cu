/* attention.cu: paged KV-cache writes and causal GQA attention over the pages, dense or restricted
 * to the MSA-selected blocks (shared/spec/msa_spec.md §5).
 *
 * Attention is flash-attention style, in two kernels (below). A thread block takes a tile of
 * query rows, (token, query head) pairs of `tt` consecutive tokens and all `group` query heads of
 * one KV head, so every K and V row it loads is used by all of them: at decode (one token) the 16
 * heads of a group, at prefill 4 tokens x 16 heads. Keys come in tiles of 32 (one page slice),
 * staged in shared memory; each warp owns rows w, w + 8, ...: scores with one key per lane, an
 * online softmax in fp32 with the row max and sum in registers, then P.V with lanes over the head
 * dims. The key list of a tile is every visible block (dense) or the union of its tokens'
 * selected blocks, each with the mask of tokens that selected it (sparse); causality j <= pos is
 * masked per row. Split-K: when the tiles alone do not fill the GPU (decode), the list's key tiles
 * are cut into splits, down to one key tile each (a decode token's 16 selected blocks of 128 keys
 * are 64 tiles per KV head: 256 thread blocks for M3's 4 KV heads), each leaving (max, sum,
 * unnormalized output) per row for a combine kernel. A decode split issues the loads of its next
 * key tile before computing the current one, and fetches its query rows, positions and selections
 * together, so that its time is a few memory latencies rather than one per dependent load.
 *
 * Both kernels share that scheme. The fp32 one (CUDA cores, 64-row tiles, 32-key tiles, split-K)
 * serves fewer than ATT_TC_MIN_T tokens (decode, speculative verify) and head dims other than 64
 * and 128, at fp32 accuracy. Prefill (ATT_TC_MIN_T tokens or more, head dim 64 or 128) takes the
 * tensor-core kernel: 128-row tiles, 64-key tiles, S = Q K^T and O += P V as BF16 mma.sync with
 * fp32 accumulation and an fp32 online softmax, no split-K (the tiles fill the GPU).
 *
 * An fp8 cache (kv_fp8.cuh) runs the same kernels, instantiated for it: the key tiles are loaded
 * as E4M3 bytes, a fourth of the float32 traffic, and decoded times their row scale as they are
 * staged in shared memory, so everything after staging is the float32 code on the dequantized
 * values. */
#include <cuda_bf16.h>
#include <math.h>
#include <string.h>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/kv_fp8.cuh"

enum {
  ATT_WARPS = 8,
  ATT_KT = 32,            /* keys per tile: one per lane while scoring */
  ATT_MAX_ROWS = 64,      /* query rows per tile: up to 8 per warp */
  ATT_DECODE_ROWS = 16,   /* tiles of up to 16 rows (a decode token's group) run a lighter kernel */
  ATT_MAX_TT = 32,        /* tokens per tile: the bits of a block's token mask */
  ATT_MAX_ENTRIES = 512,  /* selection entries (tokens x topk) a sparse tile gathers */
  ATT_MAX_SPLITS = 256,
  ATT_COMBINE_THREADS = 256,
  ATT_MAX_HD = 256,
};
static_assert((int)ATT_MAX_HD <= (int)KV8_SLAB, "a query row of an fp8 cache is rotated as one slab");

/* One block per token: K and V rows of every KV head, and the index key, into the token's page
 * slot, of a float32 cache. Positions without a page (and padding, pos < 0) are skipped, as on the
 * CPU. */
__global__ void kv_store_kernel(m3_kv_view kv, const int32_t *__restrict__ pos, const float *__restrict__ k,
                                const float *__restrict__ v, const float *__restrict__ ik) {
  dev_pdl_enter();
  const int t = blockIdx.x, bs = kv.block_size, nkv = kv.nkv, hd = kv.hd;
  const int32_t p = pos[t];
  if (p < 0 || p / bs >= kv.num_blocks) return;
  const size_t page = (size_t)kv.block_table[p / bs], slot = (size_t)(p % bs);
  for (int e = threadIdx.x; e < nkv * hd; e += blockDim.x) {
    int h = e / hd, d = e % hd;
    size_t dst = ((page * nkv + h) * bs + slot) * hd + d;
    ((float *)kv.k)[dst] = k[(size_t)t * nkv * hd + e];
    ((float *)kv.v)[dst] = v[(size_t)t * nkv * hd + e];
  }
  if (ik && kv.ik)
    for (int d = threadIdx.x; d < kv.ihd; d += blockDim.x)
      ((float *)kv.ik)[(page * bs + slot) * kv.ihd + d] = ik[(size_t)t * kv.ihd + d];
}

/* The same for an fp8 cache: one warp per row (K and V of each KV head, then the index key), K
 * rotated. */
__global__ void kv_store_fp8_kernel(m3_kv_view kv, size_t kv_page_bytes, size_t ik_page_bytes,
                                    const int32_t *__restrict__ pos, const float *__restrict__ k,
                                    const float *__restrict__ v, const float *__restrict__ ik) {
  dev_pdl_enter();
  const int t = blockIdx.x, bs = kv.block_size, nkv = kv.nkv, hd = kv.hd;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int32_t p = pos[t];
  if (p < 0 || p / bs >= kv.num_blocks) return;
  const int32_t page = kv.block_table[p / bs];
  const int slot = p % bs, nrows = 2 * nkv + (ik && kv.ik ? 1 : 0);
  for (int row = warp; row < nrows; row += nwarps) {
    if (row == 2 * nkv) {
      kv8_store_row((uint8_t *)kv.ik + (size_t)page * ik_page_bytes, bs, kv.ihd, slot,
                    ik + (size_t)t * kv.ihd, false, lane);
      continue;
    }
    const int h = row >> 1;
    const float *src = (row & 1 ? v : k) + ((size_t)t * nkv + h) * hd;
    uint8_t *dst = (uint8_t *)(row & 1 ? kv.v : kv.k) + (size_t)page * kv_page_bytes;
    kv8_store_row(dst, nkv * bs, hd, h * bs + slot, src, !(row & 1), lane);
  }
}

void cuda_kv_store(m3_backend *be, const m3_kv_view *kv, const int32_t *pos, int T, const float *k,
                   const float *v, const float *ik) {
  cuda_backend *cb = cuda_of(be);
  if (T <= 0) return;
  if (kv->dtype == M3_KV_FP8) {
    const size_t kv_pb = m3_kv_pool_page_bytes(M3_KV_FP8, (size_t)kv->nkv * kv->block_size, (size_t)kv->hd);
    const size_t ik_pb = m3_kv_pool_page_bytes(M3_KV_FP8, (size_t)kv->block_size, (size_t)kv->ihd);
    dev_launch(kv_store_fp8_kernel, T, 256, 0, cb->stream, *kv, kv_pb, ik_pb, pos, k, v, ik);
  } else {
    dev_launch(kv_store_kernel, T, 256, 0, cb->stream, *kv, pos, k, v, ik);
  }
  cuda_launched(cb, "kv_store");
}

typedef struct {
  const float *q;     /* [T, nh, hd] */
  float *out;         /* [T, nh, hd], written directly when one split runs */
  float *part;        /* [T, nh, nsplit, hd + 4]: unnormalized output, max, sum, the count of splits
                         that ran (split 0's record), 1 unused (rows 16-byte aligned) (nsplit > 1) */
  m3_kv_view kv;
  const int32_t *pos;
  const int32_t *sel; /* [T, nkv, topk], or NULL: dense */
  int T, nh, group, topk;
  int tt;             /* tokens per tile */
  int rows;           /* tt * group */
  int upb;            /* key tiles per block: ceil(block_size / ATT_KT) */
  int nsplit;
  float scale;
  size_t kv_page_bytes; /* fp8 cache: bytes of one K or V page */
  /* The tensor-core kernel's keys and values, staged in BF16 by logical block (att_stage_kernel):
   * [num_blocks, nkv, rpb, hd], rows swizzled, and for an fp8 cache their row scales
   * [num_blocks, nkv, rpb]. */
  const __nv_bfloat16 *kb, *vb;
  const float *kbs, *vbs;
} att_args;

/* Ints of a tile's key-list workspace in shared memory (att_tile_list): for a sparse tile of
 * `entries` selection entries, six arrays of them (the lists as read, then each list's first
 * place; each entry's valid block or -1; the list and its token masks; the same by block id), a
 * bit per block of the table and the running count of those bits before each word, and a bit per
 * place; none for a dense tile. */
static size_t att_list_ints(int entries, int num_blocks) {
  return entries > 0 ? 6 * (size_t)entries + 2 * (((size_t)num_blocks + 31) / 32) + ((size_t)entries + 32) / 32 : 0;
}

/* Dynamic shared memory of one tile, in bytes: Q [rows, hd], K [KT, hd + 4] (rows padded so that
 * lanes reading different keys hit different banks), V [KT, hd], P [warps, rpw, KT], then for
 * sparse tiles the key-list workspace of tt * topk entries (att_list_ints). */
static size_t att_smem_bytes(int rows, int hd, int entries, int num_blocks) {
  const int rpw = (rows + ATT_WARPS - 1) / ATT_WARPS;
  return ((size_t)rows * hd + (size_t)ATT_KT * (hd + 4) + (size_t)ATT_KT * hd +
          (size_t)ATT_WARPS * rpw * ATT_KT) * sizeof(float) + att_list_ints(entries, num_blocks) * sizeof(int);
}

/* Builds the sparse tile's key list: the distinct blocks selected by any of its `ntok` tokens
 * into ents + 2 ne_max, with the mask of tokens that selected each into ents + 3 ne_max. An entry
 * counts when it precedes the first negative id of its list, is in the table and holds a key
 * j <= pos of its token; mp is the tile's latest position. Returns the list length. All threads
 * call it. The lists are read into shared memory with one load per entry, so that the scan for
 * a list's first negative id does not chain global loads.
 * Order: the tokens' lists taken in turns (the first block of each token, then the second of
 * each, ...), each block where it first comes, and the block holding mp last (att_units counts
 * its key tiles up to mp). The tensor-core kernel's warps each multiply one token's blocks from
 * a ring of key tiles that every warp must pass: in ascending order, a token's run of blocks
 * held the others waiting (Nsight Compute: a quarter of the warps' time at the ring's barrier);
 * in turns, the tiles in the ring belong to different warps. The work is passes over entries,
 * blocks' bits and places, with no entry compared to every other: each valid entry sets its
 * block's bit in a bitmap of the table, so that a block's rank by id is the count of bits below
 * it; the block's place is the least turn of its entries (atomicMin), and its position the count
 * of smaller places, again bits. */
__device__ int att_union(const att_args &a, int t0, int ntok, int kvh, int32_t mp, int *ents, int ne_max) {
  __shared__ int count;
  const int topk = a.topk, ne = ntok * topk, bs = a.kv.block_size, nw = (a.kv.num_blocks + 31) >> 5;
  const int last_block = mp >= 0 ? mp / bs : -1;
  int *lists = ents, *blk = ents + ne_max, *ublk = ents + 2 * ne_max, *by_id = ents + 4 * ne_max;
  int *place = lists; /* once the lists are read */
  uint32_t *umask = (uint32_t *)(ents + 3 * ne_max), *mask_by_id = (uint32_t *)(ents + 5 * ne_max);
  uint32_t *words = (uint32_t *)(ents + 6 * ne_max), *before = words + nw, *places = before + nw;
  const int pw = (ne_max + 32) >> 5; /* words of places 0..ne_max */
  for (int e = threadIdx.x; e < ne; e += blockDim.x) {
    lists[e] = a.sel[((size_t)(t0 + e / topk) * a.kv.nkv + kvh) * topk + e % topk];
    mask_by_id[e] = 0u;
  }
  for (int w = threadIdx.x; w < nw; w += blockDim.x) words[w] = 0u;
  for (int w = threadIdx.x; w < pw; w += blockDim.x) places[w] = 0u;
  __syncthreads();
  for (int e = threadIdx.x; e < ne; e += blockDim.x) {
    const int tt = e / topk, i = e % topk;
    const int *list = lists + tt * topk;
    const int32_t p = a.pos[t0 + tt];
    int32_t b = list[i];
    for (int j = 0; j < i && b >= 0; j++)
      if (list[j] < 0) b = -1;
    if (b >= 0 && (p < 0 || b >= a.kv.num_blocks || (int64_t)b * bs > p)) b = -1;
    blk[e] = b;
    if (b >= 0) atomicOr(&words[b >> 5], 1u << (b & 31));
  }
  __syncthreads();
  if (threadIdx.x < 32) { /* before[w] = bits in words [0, w): a lane a run of words, then a scan */
    const int lane = threadIdx.x, per = (nw + 31) >> 5, w0 = lane * per, w1 = min(w0 + per, nw);
    int run = 0;
    for (int w = w0; w < w1; w++) run += __popc(words[w]);
    int incl = run;
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    int at = incl - run;
    for (int w = w0; w < w1; w++) before[w] = at, at += __popc(words[w]);
    if (lane == 31) count = incl;
  }
  for (int e = threadIdx.x; e < ne; e += blockDim.x) place[e] = ne_max + 1;
  __syncthreads();
  for (int e = threadIdx.x; e < ne; e += blockDim.x) {
    const int b = blk[e];
    if (b < 0) continue;
    const int r = (int)before[b >> 5] + __popc(words[b >> 5] & ((1u << (b & 31)) - 1u));
    by_id[r] = b; /* the same value from every entry of the block */
    atomicOr(&mask_by_id[r], 1u << (e / topk));
    atomicMin(&place[r], b == last_block ? ne_max : (e % topk) * ntok + e / topk);
  }
  __syncthreads();
  for (int r = threadIdx.x; r < count; r += blockDim.x) atomicOr(&places[place[r] >> 5], 1u << (place[r] & 31));
  __syncthreads();
  for (int r = threadIdx.x; r < count; r += blockDim.x) {
    const int pl = place[r];
    int at = __popc(places[pl >> 5] & ((1u << (pl & 31)) - 1u));
    for (int w = 0; w < (pl >> 5); w++) at += __popc(places[w]);
    ublk[at] = by_id[r];
    umask[at] = mask_by_id[r];
  }
  __syncthreads();
  return count;
}

/* The key list of a tile, after its rows are staged: the distinct blocks its tokens selected
 * (sparse, as att_union leaves them in ents) or every block up to its latest position (dense);
 * *mp gets that latest position (-1: padding only). All threads call it. */
__device__ int att_tile_list(const att_args &a, int t0, int ntok, int kvh, int *ents, int ne_max,
                             int32_t *mp) {
  __shared__ int maxpos;
  if (threadIdx.x == 0) {
    int32_t m = -1;
    for (int tt = 0; tt < ntok; tt++) m = a.pos[t0 + tt] > m ? a.pos[t0 + tt] : m;
    maxpos = m;
  }
  __syncthreads();
  *mp = maxpos;
  if (a.sel) return att_union(a, t0, ntok, kvh, *mp, ents, ne_max);
  const int bs = a.kv.block_size;
  return *mp < 0 ? 0 : (*mp / bs + 1 < a.kv.num_blocks ? *mp / bs + 1 : a.kv.num_blocks);
}

/* A key tile of a tile's list: list entry li, key tile sub (of upb = ceil(block_size / kt)) of its
 * block. The loops step it one key tile at a time (att_next), with no division per tile. */
typedef struct {
  int li, sub;
} att_cursor;

__device__ __forceinline__ att_cursor att_cursor_at(int u, int upb) { return {u / upb, u % upb}; }

__device__ __forceinline__ void att_next(att_cursor &c, int upb) {
  if (++c.sub == upb) c.sub = 0, c.li++;
}

/* The tensor-core kernel's order of the same key tiles: every block but the last (nfull of them)
 * a key tile at a time across the blocks (tile 0 of each, then tile 1 of each, ...), then the
 * last block's, the one holding the tile's latest position (att_units). A ring of key tiles then
 * holds as many different blocks as it can, and so work for as many warps (each multiplies only
 * its token's blocks): block by block, two stages of four held one block's two tiles. Starts at
 * {0, 0}. */
__device__ __forceinline__ void att_next_across(att_cursor &c, int nfull, int upb) {
  if (c.li < nfull) {
    if (++c.li == nfull && ++c.sub < upb) c.li = 0;
    else if (c.li == nfull) c.sub = 0;
  } else {
    c.sub++;
  }
}

/* Key tile c of a tile's list (kt keys): its block *b, first key *j0 within the block, and the
 * count of its keys up to the tile's latest position mp (<= 0: none). */
__device__ __forceinline__ int att_unit_keys(const att_args &a, att_cursor c, const int *ublk, int32_t mp, int kt,
                                             int *b, int *j0) {
  const int bs = a.kv.block_size;
  *j0 = c.sub * kt;
  *b = a.sel ? ublk[c.li] : c.li;
  const int nk = bs - *j0 < kt ? bs - *j0 : kt, seen = mp - (*b * bs + *j0) + 1;
  return seen < nk ? seen : nk;
}

/* The key tiles (kt keys, upb per block) of a tile's list up to its latest position mp: every
 * tile of each listed block but the last, whose tiles past mp hold no key the tile's rows may
 * see. Every tile counted holds at least one such key. */
__device__ __forceinline__ int att_units(const att_args &a, int nlist, const int *ublk, int32_t mp, int kt, int upb) {
  if (nlist <= 0) return 0;
  const int bs = a.kv.block_size, last = a.sel ? ublk[nlist - 1] : nlist - 1;
  return (nlist - 1) * upb + (last == mp / bs ? (mp % bs) / kt + 1 : upb);
}

/* Chunks i0 + x * 256 (x < S, below nk * hd4) of key tile (page, keys j0..j0 + nk) of KV head kvh
 * into registers: chunk i is 4 values of key i / hd4. float32: K's float4 in kr, V's in vr; fp8:
 * K's and V's 4 bytes and their rows' scales, packed as (K bytes, V bytes, K scale, V scale) in
 * kr (the bytes as float bit patterns, moved, never computed on). */
template <bool FP8, int S>
__device__ __forceinline__ void att_fetch_round(const att_args &a, int32_t page, int kvh, int j0, int nk, int i0,
                                                float4 (&kr)[S], float4 (&vr)[S]) {
  const int hd = a.kv.hd, hd4 = hd >> 2, bs = a.kv.block_size, nkv = a.kv.nkv;
  if constexpr (FP8) {
    const int r0 = kvh * bs + j0;
    const kv8_rows k8 = kv8_page_rows(a.kv.k, a.kv_page_bytes, page, nkv * bs, hd, r0),
                   v8 = kv8_page_rows(a.kv.v, a.kv_page_bytes, page, nkv * bs, hd, r0);
#pragma unroll
    for (int x = 0; x < S; x++) {
      const int i = i0 + x * 32 * ATT_WARPS;
      if (i < nk * hd4)
        kr[x] = make_float4(__uint_as_float(((const uint32_t *)k8.q)[i]), __uint_as_float(((const uint32_t *)v8.q)[i]),
                            k8.scale[i / hd4], v8.scale[i / hd4]);
    }
  } else {
    const size_t base = (((size_t)page * nkv + kvh) * bs + j0) * hd;
    const float4 *kg = (const float4 *)((const float *)a.kv.k + base), *vg = (const float4 *)((const float *)a.kv.v + base);
#pragma unroll
    for (int x = 0; x < S; x++) {
      const int i = i0 + x * 32 * ATT_WARPS;
      if (i < nk * hd4) kr[x] = kg[i], vr[x] = vg[i];
    }
  }
}

/* Stores what att_fetch_round left (fp8 decoded times the row scales) into the shared K tile
 * [KT, hd + 4] and V tile [KT, hd]. */
template <bool FP8, int S>
__device__ __forceinline__ void att_put_round(float *ks, float *vs, int hd, int nk, int i0, const float4 (&kr)[S],
                                              const float4 (&vr)[S]) {
  const int hd4 = hd >> 2;
#pragma unroll
  for (int x = 0; x < S; x++) {
    const int i = i0 + x * 32 * ATT_WARPS;
    if (i >= nk * hd4) continue;
    float4 k4 = kr[x], v4 = vr[x];
    if constexpr (FP8) {
      k4 = kv8_dequant4(__float_as_uint(kr[x].x), kr[x].z);
      v4 = kv8_dequant4(__float_as_uint(kr[x].y), kr[x].w);
    }
    *(float4 *)(ks + (size_t)(i / hd4) * (hd + 4) + 4 * (i % hd4)) = k4;
    ((float4 *)vs)[i] = v4;
  }
}

/* Chunk i (a float4) of the tile's query rows [rows, hd]: row r = (token r / group, head r %
 * group of KV head kvh); zero past the rows or past T. */
__device__ __forceinline__ float4 att_q_chunk(const att_args &a, int t0, int ntok, int kvh, int i) {
  const int hd4 = a.kv.hd >> 2, r = i / hd4, c = i % hd4, tt = r / a.group, hh = r % a.group;
  if (r >= a.rows || tt >= ntok) return make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  return ((const float4 *)(a.q + ((size_t)(t0 + tt) * a.nh + (size_t)kvh * a.group + hh) * a.kv.hd))[c];
}

/* CPL: float4 chunks of a head row per lane, hd <= 128 * CPL. RPW: rows per warp at most, so
 * that decode tiles (16 rows) keep few registers and many blocks in flight. */
template <int CPL, int RPW, bool FP8>
__global__ void __launch_bounds__(32 * ATT_WARPS, 2) attention_kernel(att_args a) {
  dev_pdl_enter();
  extern __shared__ float4 att_smem[];
  const int hd = a.kv.hd, hd4 = hd >> 2, bs = a.kv.block_size, nkv = a.kv.nkv, group = a.group;
  const int R = a.rows, rpw = (R + ATT_WARPS - 1) / ATT_WARPS;
  float *qs = (float *)att_smem;
  float *ks = qs + (size_t)R * hd;
  float *vs = ks + (size_t)ATT_KT * (hd + 4);
  float *ps = vs + (size_t)ATT_KT * hd;
  int *ents = (int *)(ps + (size_t)ATT_WARPS * rpw * ATT_KT);
  const int ne_max = a.sel ? a.tt * a.topk : 0;

  const int tile = blockIdx.x / nkv, kvh = blockIdx.x % nkv, split = blockIdx.y;
  const int t0 = tile * a.tt, ntok = a.T - t0 < a.tt ? a.T - t0 : a.tt;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  /* Decode tiles (RPW <= 2: up to 16 rows, 2 CPL chunks a thread) hold their query chunks in
   * registers while the key list is built, so that the query, positions and selections are
   * fetched together rather than one after another; the first key tile's barrier publishes them. */
  constexpr int QPT = RPW <= 2 ? 2 * CPL : 1;
  float4 qv[QPT];
  if constexpr (RPW <= 2) {
#pragma unroll
    for (int x = 0; x < QPT; x++) qv[x] = att_q_chunk(a, t0, ntok, kvh, tid + x * 32 * ATT_WARPS);
  } else {
    for (int i = tid; i < R * hd4; i += blockDim.x) ((float4 *)qs)[i] = att_q_chunk(a, t0, ntok, kvh, i);
  }
  int32_t mp;
  const int nlist = att_tile_list(a, t0, ntok, kvh, ents, ne_max, &mp);
  const int *ublk = ents + 2 * ne_max;
  const uint32_t *umask = (const uint32_t *)(ents + 3 * ne_max);
  /* The split count was fixed on the host for the longest list the tile could have (a recorded
   * step replays at every context length); the list known, only as many splits run as there are
   * key tiles up to the latest position: at a short context one split does the whole row and
   * writes it, and the combine has nothing to do. */
  const int units = att_units(a, nlist, ublk, mp, ATT_KT, a.upb);
  const int nsplit = units < a.nsplit ? (units > 1 ? units : 1) : a.nsplit;
  if (split >= nsplit) return; /* the same for the whole block, before the query is staged */
  /* An fp8 cache's keys are stored rotated, so the queries are rotated too (backend.h
   * attention): in registers where each row is lanes of one warp, else in shared memory. */
  const bool rotate_in_registers = RPW <= 2 && CPL == 1 && 32 % hd4 == 0;
  if constexpr (RPW <= 2) {
#pragma unroll
    for (int x = 0; x < QPT; x++) {
      if (FP8 && rotate_in_registers) qv[x] = kv8_rotate_query4(qv[x], hd, lane);
      if (tid + x * 32 * ATT_WARPS < R * hd4) ((float4 *)qs)[tid + x * 32 * ATT_WARPS] = qv[x];
    }
  }
  if (FP8 && !rotate_in_registers) { /* the same for the whole block */
    __syncthreads();
    for (int r = warp; r < R; r += ATT_WARPS) {
      float v[KV8_SLAB_NJ]; /* hd <= ATT_MAX_HD = KV8_SLAB */
#pragma unroll
      for (int j = 0; j < KV8_SLAB_NJ; j++) v[j] = lane + 32 * j < hd ? qs[(size_t)r * hd + lane + 32 * j] : 0.0f;
      kv8_rotate_query(v, hd, lane);
#pragma unroll
      for (int j = 0; j < KV8_SLAB_NJ; j++)
        if (lane + 32 * j < hd) qs[(size_t)r * hd + lane + 32 * j] = v[j];
    }
  }

  /* This warp's rows: position (-1: inactive) and token within the tile. */
  int32_t prow[RPW];
  int ttr[RPW];
  float m[RPW], l[RPW];
  float4 o[RPW][CPL];
#pragma unroll
  for (int i = 0; i < RPW; i++) {
    const int r = warp + ATT_WARPS * i;
    ttr[i] = r < R ? r / group : 0;
    prow[i] = r < R && ttr[i] < ntok ? a.pos[t0 + ttr[i]] : -1;
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < CPL; c++) o[i][c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  bool active = false; /* whether this warp has a row to compute */
#pragma unroll
  for (int i = 0; i < RPW; i++) active |= prow[i] >= 0;
  float *pw = ps + (size_t)warp * rpw * ATT_KT;

  const int u0 = (int)((int64_t)split * units / nsplit), u1 = (int)((int64_t)(split + 1) * units / nsplit);
  /* Decode tiles are bound by memory: all of a thread's loads of a key tile first (4 + 4 float4
   * in flight at hd 128), then the stores; prefill tiles keep their registers for the rows. When
   * one such round holds a whole key tile (PIPE: decode, hd <= 128), the next tile's loads are
   * issued before this one is computed, so a split streams its keys without waiting on each. */
  constexpr int STAGE = RPW <= 2 ? 4 / CPL : 1;
  constexpr bool PIPE = RPW <= 2 && CPL == 1;
  float4 kreg[PIPE ? STAGE : 1], vreg[PIPE ? STAGE : 1];
  int fetched = -1; /* PIPE: the key tile whose chunks kreg, vreg hold */
  att_cursor cur = att_cursor_at(u0, a.upb);
  for (int u = u0; u < u1; u++, att_next(cur, a.upb)) {
    int b, j0;
    const int nk = att_unit_keys(a, cur, ublk, mp, ATT_KT, &b, &j0);
    if (nk <= 0) continue; /* the same for every thread */
    const uint32_t bmask = a.sel ? umask[cur.li] : 0xffffffffu;
    const int kpos0 = b * bs + j0;
    if constexpr (PIPE) {
      if (fetched != u) att_fetch_round<FP8, STAGE>(a, a.kv.block_table[b], kvh, j0, nk, tid, kreg, vreg);
      __syncthreads(); /* every warp is done with the previous tile */
      att_put_round<FP8, STAGE>(ks, vs, hd, nk, tid, kreg, vreg);
      int b2, j2;
      att_cursor next = cur;
      att_next(next, a.upb);
      const int nk2 = u + 1 < u1 ? att_unit_keys(a, next, ublk, mp, ATT_KT, &b2, &j2) : 0;
      if (nk2 > 0) {
        att_fetch_round<FP8, STAGE>(a, a.kv.block_table[b2], kvh, j2, nk2, tid, kreg, vreg);
        fetched = u + 1;
      }
    } else {
      const int32_t page = a.kv.block_table[b];
      __syncthreads(); /* every warp is done with the previous tile */
      for (int i0 = tid; i0 < nk * hd4; i0 += STAGE * 32 * ATT_WARPS) {
        float4 lk[STAGE], lv[STAGE]; /* this round's only */
        att_fetch_round<FP8, STAGE>(a, page, kvh, j0, nk, i0, lk, lv);
        att_put_round<FP8, STAGE>(ks, vs, hd, nk, i0, lk, lv);
      }
    }
    __syncthreads();

    /* Scores: lane = key. */
    const int kp = kpos0 + lane;
    float s[RPW];
#pragma unroll
    for (int i = 0; i < RPW; i++) s[i] = 0.0f;
    if (lane < nk) {
      const float *kr = ks + (size_t)lane * (hd + 4);
#pragma unroll(RPW <= 2 ? 8 : 1) /* decode rows: loads of several dims in flight */
      for (int d = 0; d < hd; d += 4) {
        const float4 k4 = *(const float4 *)(kr + d);
#pragma unroll
        for (int i = 0; i < RPW; i++)
          if (prow[i] >= 0) {
            const float4 q4 = *(const float4 *)(qs + (size_t)(warp + ATT_WARPS * i) * hd + d);
            s[i] += q4.x * k4.x + q4.y * k4.y + q4.z * k4.z + q4.w * k4.w;
          }
      }
    }
    /* Online softmax per row (warp-uniform branches). */
#pragma unroll
    for (int i = 0; i < RPW; i++)
      if (prow[i] >= 0) {
        const bool ok = lane < nk && kp <= prow[i] && ((bmask >> ttr[i]) & 1u);
        const float sc = ok ? s[i] * a.scale : -INFINITY;
        const float mnew = fmaxf(m[i], warp_max(sc));
        float pj = 0.0f, corr = 1.0f;
        if (mnew != -INFINITY) {
          pj = ok ? expf(sc - mnew) : 0.0f;
          corr = expf(m[i] - mnew);
        }
        l[i] = l[i] * corr + warp_sum(pj);
        m[i] = mnew;
        pw[i * ATT_KT + lane] = pj;
#pragma unroll
        for (int c = 0; c < CPL; c++) {
          o[i][c].x *= corr, o[i][c].y *= corr, o[i][c].z *= corr, o[i][c].w *= corr;
        }
      }
    __syncwarp();
    /* P.V: lanes over the head dims. */
    if (active)
#pragma unroll(RPW <= 2 ? 4 : 1)
      for (int j = 0; j < nk; j++) {
        float4 v4[CPL];
#pragma unroll
        for (int c = 0; c < CPL; c++) {
          const int ch = lane + 32 * c;
          v4[c] = ch < hd4 ? ((const float4 *)vs)[j * hd4 + ch] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int i = 0; i < RPW; i++)
          if (prow[i] >= 0) {
            const float pj = pw[i * ATT_KT + j];
#pragma unroll
            for (int c = 0; c < CPL; c++) {
              o[i][c].x += pj * v4[c].x, o[i][c].y += pj * v4[c].y;
              o[i][c].z += pj * v4[c].z, o[i][c].w += pj * v4[c].w;
            }
          }
      }
    __syncwarp();
  }

#pragma unroll
  for (int i = 0; i < RPW; i++) {
    const int r = warp + ATT_WARPS * i;
    if (r >= R || ttr[i] >= ntok) continue;
    const size_t row = (size_t)(t0 + ttr[i]) * a.nh + (size_t)kvh * group + r % group;
    float *rec = a.nsplit > 1 ? a.part + (row * a.nsplit + split) * (hd + 4) : NULL;
    if (rec && lane == 0 && split == 0) rec[hd + 2] = __int_as_float(nsplit); /* for the combine */
    if (nsplit == 1) { /* zero when no key was visible (padding rows) */
      const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
      float4 *dst = (float4 *)(a.out + row * hd);
#pragma unroll
      for (int c = 0; c < CPL; c++)
        if (lane + 32 * c < hd4)
          dst[lane + 32 * c] = make_float4(o[i][c].x * inv, o[i][c].y * inv, o[i][c].z * inv, o[i][c].w * inv);
    } else {
#pragma unroll
      for (int c = 0; c < CPL; c++)
        if (lane + 32 * c < hd4) ((float4 *)rec)[lane + 32 * c] = o[i][c];
      if (lane == 0) rec[hd] = m[i], rec[hd + 1] = l[i];
    }
  }
}

/* out[row] = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M) over the splits that ran (split 0's
 * record says how many; one: the attention kernel wrote the row itself); zero when no split saw a
 * key. One block per row: warp 0 weighs the splits, then the threads split the row's float4
 * columns (hd4 of them) and the splits (ATT_COMBINE_THREADS / hd4 groups, each a strided share),
 * so each thread's loads are few and issued together; the groups' sums meet in shared memory. */
__global__ void __launch_bounds__(ATT_COMBINE_THREADS) attention_combine_kernel(const float *__restrict__ part,
                                                                                int stride_splits, int hd,
                                                                                float *__restrict__ out) {
  dev_pdl_enter();
  __shared__ float weight[ATT_MAX_SPLITS];
  __shared__ float4 group_sum[ATT_COMBINE_THREADS];
  __shared__ float inv_sum;
  const int stride = hd + 4, hd4 = hd >> 2, tid = threadIdx.x;
  const float *pr = part + (size_t)blockIdx.x * stride_splits * stride;
  const int nsplit = __float_as_int(pr[hd + 2]);
  if (nsplit <= 1) return; /* the same for the whole block */
  if (tid < 32) {
    float M = -INFINITY;
    for (int s = tid; s < nsplit; s += 32) M = fmaxf(M, pr[(size_t)s * stride + hd]);
    M = warp_max(M);
    float L = 0.0f;
    for (int s = tid; s < nsplit; s += 32) {
      const float ms = pr[(size_t)s * stride + hd];
      const float w = ms == -INFINITY ? 0.0f : expf(ms - M);
      weight[s] = w;
      L += w * pr[(size_t)s * stride + hd + 1];
    }
    L = warp_sum(L);
    if (tid == 0) inv_sum = L > 0.0f ? 1.0f / L : 0.0f;
  }
  __syncthreads();
  const int groups = ATT_COMBINE_THREADS / hd4, c = tid % hd4, grp = tid / hd4; /* hd4 <= 64 */
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (grp < groups) {
#pragma unroll 4
    for (int s = grp; s < nsplit; s += groups) {
      const float w = weight[s];
      const float4 v = ((const float4 *)(pr + (size_t)s * stride))[c];
      acc.x += w * v.x, acc.y += w * v.y, acc.z += w * v.z, acc.w += w * v.w;
    }
  }
  group_sum[tid] = acc;
  __syncthreads();
  if (tid < hd4) {
    float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int g = 0; g < groups; g++) {
      const float4 v = group_sum[g * hd4 + tid];
      sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
    }
    const float inv = inv_sum;
    ((float4 *)(out + (size_t)blockIdx.x * hd))[tid] = make_float4(sum.x * inv, sum.y * inv, sum.z * inv, sum.w * inv);
  }
}

/* Launches attention_kernel<CPL, RPW, FP8> for a, choosing the split count from the blocks the GPU
 * holds once and the key tiles a tile may have (max_units). */
template <int CPL, int RPW, bool FP8>
static void att_launch(cuda_backend *cb, att_args &a, int ntiles, int max_units, size_t smem) {
  const void *kernel = (const void *)attention_kernel<CPL, RPW, FP8>;
  cuda_allow_smem(cb, kernel, smem, "attention (shared memory)");
  const int per_sm = cuda_blocks_per_sm(cb, kernel, 32 * ATT_WARPS, smem, "attention (occupancy)");
  const int64_t slots = (int64_t)per_sm * cb->num_sms, items = (int64_t)ntiles * a.kv.nkv;
  /* Splits down to one key tile each: a decode step over 16 selected blocks is latency bound, and
   * the combine reads its splits in parallel. */
  int64_t nsplit = items >= slots ? 1 : (slots + items - 1) / items;
  if (nsplit > max_units) nsplit = max_units;
  if (nsplit > ATT_MAX_SPLITS) nsplit = ATT_MAX_SPLITS;
  if (nsplit < 1) nsplit = 1;
  a.nsplit = (int)nsplit;
  a.part = NULL;
  if (a.nsplit > 1) {
    a.part = (float *)cuda_scratch(cb, (size_t)a.T * a.nh * a.nsplit * (a.kv.hd + 4) * sizeof(float), "attention");
    if (!a.part) return;
  }
  dim3 grid((unsigned)items, (unsigned)a.nsplit);
  dev_launch(attention_kernel<CPL, RPW, FP8>, grid, 32 * ATT_WARPS, smem, cb->stream, a);
  cuda_launched(cb, "attention");
  if (a.nsplit > 1) {
    dev_launch(attention_combine_kernel, (unsigned)(a.T * a.nh), ATT_COMBINE_THREADS, 0, cb->stream, a.part, a.nsplit,
               a.kv.hd, a.out);
    cuda_launched(cb, "attention (combine)");
  }
}

/* attention_kernel's instance for the head dim and the tile's rows. */
template <bool FP8>
static void att_launch_hd(cuda_backend *cb, att_args &a, int ntiles, int max_units, size_t smem) {
  const int light = a.rows <= ATT_DECODE_ROWS;
  if (a.kv.hd <= 128) {
    if (light) att_launch<1, ATT_DECODE_ROWS / ATT_WARPS, FP8>(cb, a, ntiles, max_units, smem);
    else att_launch<1, ATT_MAX_ROWS / ATT_WARPS, FP8>(cb, a, ntiles, max_units, smem);
  } else {
    if (light) att_launch<2, ATT_DECODE_ROWS / ATT_WARPS, FP8>(cb, a, ntiles, max_units, smem);
    else att_launch<2, ATT_MAX_ROWS / ATT_WARPS, FP8>(cb, a, ntiles, max_units, smem);
  }
}

/* ---- prefill: BF16 tensor cores ----
 * A thread block takes ATT_TC_ROWS = 128 query rows (the same (token, head) tiles as above, up to
 * 128 / group tokens) and 8 warps of 16 rows each, FlashAttention-2 style: per key tile of 64
 * keys, S = Q K^T and O += P V are mma.sync m16n8k16 products (BF16 in, fp32 accumulate), with
 * S, O and the softmax state of a warp's rows in its registers, in the fragment layout of the PTX
 * ISA ("Matrix Fragments for mma.m16n8k16"): lane = 4 g + c holds rows g and g + 8, columns
 * 2c, 2c + 1 of each 8-wide n-tile. Q, K and V are rounded to BF16 (the softmax, row max, row sum
 * and rescaling of O, stays fp32; P is rounded to BF16 for PV).
 *
 * The keys and values are first staged once per call in BF16 (att_stage_kernel: the whole table,
 * a read of the cache and a write of half its bytes), by logical block, each block's rows padded
 * to a multiple of the key tile and zero past the call's latest position, each row's 16-byte
 * chunks swizzled (chunk c at c ^ (row & 7)) so that a key tile is one contiguous run whose
 * fragment loads hit every bank. A ninth warp then copies the tile's key tiles with the copy
 * engine into a ring of ATT_TC_STAGES slots, each with a full and an empty barrier, and the 8
 * warps multiply without waiting for each other: a sparse tile's list is the union of its
 * tokens' blocks (with unrelated selections, up to 8 x 16 blocks), and each warp multiplies only
 * the blocks its token chose, so a warp with nothing to do in a key tile moves on to the next
 * one that has landed rather than idling at a barrier of the whole block; the list is taken in
 * turns over the tokens (att_union), and its key tiles across the blocks (att_next_across: the
 * first tile of every block, then the second, ...), so that the tiles in the ring belong to
 * different warps (block by block, half the ring held one block; across: MSA at 8192 tokens 3.73
 * -> 3.43 ms, bench/RESULTS.md twenty-fifth session; a fifth stage made both orders slower).
 * This ring moved the union 1.26 times as fast as float32 converted in the loop, 1.04 times as
 * fast as a two-stage cp.async ring with block barriers, which kept two blocks an SM and with
 * them the dense tiles' rate (bench/RESULTS.md, nineteenth session). What holds it now (Nsight
 * Compute, H200, 8192 tokens of random selections, twenty-first session): about half the warps'
 * time in the products at 2 warps a scheduler and, before the list was taken in turns, a quarter
 * at the ring's full barrier, where a warp whose token owned several tiles in a row held the
 * others; not L2 (38% of its peak). */
enum {
  ATT_TC_MIN_T = 128,    /* fewer tokens keep the fp32 kernel (decode, verify, small fixtures) */
  ATT_TC_WARPS = 8,      /* warps that multiply; one more copies */
  ATT_TC_ROWS = 16 * ATT_TC_WARPS,
  ATT_TC_KT = 64,        /* keys per tile */
  ATT_TC_STAGES = 4,     /* key tiles in the ring */
  ATT_TC_PAD = 8,        /* BF16 of padding per shared row of Q: conflict-free fragment loads */
};

/* Rows of one (block, KV head) in the staged keys and values: block_size rounded up to the key
 * tile, so that every tile is whole. */
static int att_tc_rows_per_block(int bs) { return (bs + ATT_TC_KT - 1) / ATT_TC_KT * ATT_TC_KT; }

/* Dynamic shared memory of a tensor-core tile, in bytes: Q [128, hd + 8] in BF16, the ring (per
 * stage K and V [64, hd] in BF16, then K's and V's row scales [64] as float32), then the sparse
 * tile's key-list workspace of tt * topk entries (att_list_ints). */
static size_t att_tc_stage_bytes(int hd) {
  return 2 * (size_t)ATT_TC_KT * hd * sizeof(__nv_bfloat16) + 2 * (size_t)ATT_TC_KT * sizeof(float);
}
static size_t att_tc_smem_bytes(int hd, int entries, int num_blocks) {
  return (size_t)ATT_TC_ROWS * (hd + ATT_TC_PAD) * sizeof(__nv_bfloat16) + ATT_TC_STAGES * att_tc_stage_bytes(hd) +
         att_list_ints(entries, num_blocks) * sizeof(int);
}

/* Two floats as a BF16 pair, lo in the low half (the lower column of a fragment). */
__device__ __forceinline__ uint32_t bf16_pair(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, sizeof u);
  return u;
}

/* Stores 4 floats of a row as BF16 at dst (8-byte aligned). */
__device__ __forceinline__ void store_bf16x4(__nv_bfloat16 *dst, float4 v) {
  *(uint2 *)dst = make_uint2(bf16_pair(v.x, v.y), bf16_pair(v.z, v.w));
}

/* Element offset of (row, col) in a swizzled staged row block of hd columns: the 8-column
 * (16-byte) chunk col / 8 sits at chunk (col / 8) ^ (row & 7). */
__device__ __forceinline__ int att_swz(int row, int col, int hd) {
  return row * hd + ((((col >> 3) ^ (row & 7)) << 3) | (col & 7));
}

/* One thread block per (logical block b, KV head): its K and V rows into a.kb / a.vb in BF16 (rows
 * [rpb] per (b, kvh), swizzled), an fp8 cache's E4M3 values as they are (BF16 holds them exactly)
 * and their row scales into a.kbs / a.vbs. Rows past block_size or past the latest position of
 * the call's tokens, and blocks without a page, are zeros: a key tile copied whole holds nothing
 * stale (0 times a NaN left in a page would be NaN in P V). */
template <bool FP8>
__global__ void __launch_bounds__(256) att_stage_kernel(att_args a, int rpb) {
  dev_pdl_enter();
  const int nkv = a.kv.nkv, bs = a.kv.block_size, hd = a.kv.hd, hd4 = hd >> 2;
  const int b = (int)(blockIdx.x / (unsigned)nkv), kvh = (int)(blockIdx.x % (unsigned)nkv);
  __shared__ int32_t maxpos;
  int32_t m = -1;
  for (int t = threadIdx.x; t < a.T; t += blockDim.x) m = max(m, a.pos[t]);
  for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (threadIdx.x == 0) maxpos = -1;
  __syncthreads();
  if ((threadIdx.x & 31) == 0) atomicMax(&maxpos, m);
  __syncthreads();
  const int32_t table_page = a.kv.block_table[b], page = table_page < 0 ? 0 : table_page;
  int live = bs < maxpos - b * bs + 1 ? bs : maxpos - b * bs + 1; /* rows worth staging */
  if (table_page < 0 || live < 0) live = 0;
  const size_t row0 = ((size_t)b * nkv + kvh) * rpb;
  __nv_bfloat16 *kd = (__nv_bfloat16 *)a.kb + row0 * hd, *vd = (__nv_bfloat16 *)a.vb + row0 * hd;
  const kv8_rows k8 = kv8_page_rows(a.kv.k, a.kv_page_bytes, page, nkv * bs, hd, kvh * bs),
                 v8 = kv8_page_rows(a.kv.v, a.kv_page_bytes, page, nkv * bs, hd, kvh * bs);
  const size_t src = ((size_t)page * nkv * bs + (size_t)kvh * bs) * hd;
  const float4 *kg = (const float4 *)((const float *)a.kv.k + src), *vg = (const float4 *)((const float *)a.kv.v + src);
  for (int i = threadIdx.x; i < rpb * hd4; i += blockDim.x) {
    const int r = i / hd4, c = 4 * (i % hd4);
    float4 k4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f), v4 = k4;
    if (r < live) {
      if constexpr (FP8) {
        k4 = kv8_dequant4(((const uint32_t *)k8.q)[i], 1.0f);
        v4 = kv8_dequant4(((const uint32_t *)v8.q)[i], 1.0f);
      } else {
        k4 = kg[i], v4 = vg[i];
      }
    }
    store_bf16x4(kd + att_swz(r, c, hd), k4);
    store_bf16x4(vd + att_swz(r, c, hd), v4);
  }
  if constexpr (FP8)
    for (int r = threadIdx.x; r < rpb; r += blockDim.x) {
      ((float *)a.kbs)[row0 + r] = r < live ? k8.scale[r] : 0.0f;
      ((float *)a.vbs)[row0 + r] = r < live ? v8.scale[r] : 0.0f;
    }
}

/* Row g + 8 h of a warp's scores S [16, 64] in place: this lane's columns 8 nt + c2 + e (an fp8
 * cache: times their keys' scales) times scale_log2, or, where MASKED, -inf for a key the row may
 * not see (its token did not select the block, the key is past the tile's nk or past the row's
 * position prow). Returns the largest of them. */
template <bool FP8, bool MASKED, int NT>
__device__ __forceinline__ float att_tc_scale_row(float (&s)[NT][4], int h, const float *ksc, int c2, bool row_sees,
                                                  int nk, int kpos0, int32_t prow, float scale_log2) {
  float mx = -INFINITY;
#pragma unroll
  for (int nt = 0; nt < NT; nt++)
#pragma unroll
    for (int e = 0; e < 2; e++) {
      const int col = 8 * nt + c2 + e;
      float raw = s[nt][2 * h + e];
      if constexpr (FP8) raw *= ksc[col];
      const float sc = !MASKED || (row_sees && col < nk && kpos0 + col <= prow) ? raw * scale_log2 : -INFINITY;
      s[nt][2 * h + e] = sc;
      mx = fmaxf(mx, sc);
    }
  return mx;
}

template <int HD, bool FP8>
__global__ void __launch_bounds__(32 * (ATT_TC_WARPS + 1), 1) attention_tc_kernel(att_args a, int rpb) {
  dev_pdl_enter();
  constexpr int LD = HD + ATT_TC_PAD; /* Q's row stride in BF16: 4 mod 32 words, so the 8 rows x 4
                                         columns of a fragment load hit 32 banks */
  constexpr int NT = ATT_TC_KT / 8;   /* n-tiles of S */
  constexpr int DT = HD / 8;          /* n-tiles of O */
  constexpr uint32_t KV_BYTES = ATT_TC_KT * HD * sizeof(__nv_bfloat16);  /* K (or V) of a stage */
  constexpr uint32_t SC_BYTES = ATT_TC_KT * sizeof(float);
  constexpr uint32_t STAGE_BYTES = 2 * KV_BYTES + 2 * SC_BYTES;
  extern __shared__ float4 att_smem[];
  const int bs = a.kv.block_size, nkv = a.kv.nkv, group = a.group, R = a.rows;
  __nv_bfloat16 *qs = (__nv_bfloat16 *)att_smem;                /* [128, LD] */
  uint8_t *ring = (uint8_t *)(qs + (size_t)ATT_TC_ROWS * LD);   /* per stage K, V [64, HD], K, V scales [64] */
  int *ents = (int *)(ring + (size_t)ATT_TC_STAGES * STAGE_BYTES);
  const int ne_max = a.sel ? a.tt * a.topk : 0;
  /* full[s]: stage s's copies landed (the copying lane's arrival and their bytes); empty[s]: every
   * multiplying warp is done with it. */
  __shared__ uint64_t full[ATT_TC_STAGES], empty[ATT_TC_STAGES];

  /* The tiles of the latest tokens have the most keys (causal): they start first. */
  const int ntiles = (a.T + a.tt - 1) / a.tt;
  const int tile = ntiles - 1 - (int)(blockIdx.x / nkv), kvh = blockIdx.x % nkv;
  const int t0 = tile * a.tt, ntok = a.T - t0 < a.tt ? a.T - t0 : a.tt;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c2 = 2 * (lane & 3);

  if (tid == 0) {
    for (int s = 0; s < ATT_TC_STAGES; s++) mbar_init(&full[s], 1), mbar_init(&empty[s], ATT_TC_WARPS);
    mbar_init_fence();
  }
  int32_t mp;
  const int nlist = att_tile_list(a, t0, ntok, kvh, ents, ne_max, &mp); /* its barriers publish the barriers' init */
  const int *ublk = ents + 2 * ne_max;
  const uint32_t *umask = (const uint32_t *)(ents + 3 * ne_max);
  const int upb = rpb / ATT_TC_KT;
  const int units = att_units(a, nlist, ublk, mp, ATT_TC_KT, upb), nfull = nlist > 0 ? nlist - 1 : 0;

  att_cursor cur = {0, 0};
  if (warp == ATT_TC_WARPS) { /* the copying warp: key tile u into stage u % STAGES, once free */
    if (lane == 0)
      for (int u = 0; u < units; u++, att_next_across(cur, nfull, upb)) {
        const int st = u % ATT_TC_STAGES;
        int b, j0;
        att_unit_keys(a, cur, ublk, mp, ATT_TC_KT, &b, &j0);
        mbar_wait(&empty[st], ((u / ATT_TC_STAGES) & 1) ^ 1); /* the first use passes */
        uint8_t *dst = ring + (size_t)st * STAGE_BYTES;
        const size_t row0 = ((size_t)b * nkv + kvh) * rpb + j0;
        mbar_expect_bytes(&full[st], FP8 ? STAGE_BYTES : 2 * KV_BYTES);
        dev_bulk_copy(dst, a.kb + row0 * HD, KV_BYTES, &full[st]);
        dev_bulk_copy(dst + KV_BYTES, a.vb + row0 * HD, KV_BYTES, &full[st]);
        if constexpr (FP8) {
          dev_bulk_copy(dst + 2 * KV_BYTES, a.kbs + row0, SC_BYTES, &full[st]);
          dev_bulk_copy(dst + 2 * KV_BYTES + SC_BYTES, a.vbs + row0, SC_BYTES, &full[st]);
        }
        mbar_arrive(&full[st]);
      }
    return;
  }

  /* Q [128, hd] in BF16 by the multiplying warps while the copying warp starts on the first key
   * tiles; a named barrier of those warps publishes it. */
  if constexpr (FP8) { /* a warp a row, rotated as the keys are (backend.h attention) */
    for (int r = warp; r < ATT_TC_ROWS; r += ATT_TC_WARPS) {
      const int tt = r / group, hh = r % group;
      const bool live = r < R && tt < ntok; /* rows past R or T are zero */
      const float *src = live ? a.q + ((size_t)(t0 + tt) * a.nh + (size_t)kvh * group + hh) * HD : a.q;
      float v[KV8_SLAB_NJ];
#pragma unroll
      for (int j = 0; j < KV8_SLAB_NJ; j++) v[j] = live && 32 * j < HD ? src[lane + 32 * j] : 0.0f;
      kv8_rotate_query(v, HD, lane);
#pragma unroll
      for (int j = 0; j < HD / 32; j++) qs[(size_t)r * LD + lane + 32 * j] = __float2bfloat16_rn(v[j]);
    }
  } else {
    for (int i = tid; i < ATT_TC_ROWS * (HD / 4); i += 32 * ATT_TC_WARPS) { /* rows past R or T are zero */
      const int r = i / (HD / 4), c = i % (HD / 4), tt = r / group, hh = r % group;
      float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (r < R && tt < ntok)
        v = ((const float4 *)(a.q + ((size_t)(t0 + tt) * a.nh + (size_t)kvh * group + hh) * HD))[c];
      store_bf16x4(qs + (size_t)r * LD + 4 * c, v);
    }
  }
  dev_bar_sync_first<32 * ATT_TC_WARPS>();

  /* This lane's rows 16 warp + g and 16 warp + g + 8: position (-1: inactive) and the bit of
   * the row's token in a block's token mask (0 when inactive; dense tiles, whose tokens may pass
   * 32, never test it against anything but all ones). */
  int32_t prow[2];
  uint32_t rbit[2];
  for (int h = 0; h < 2; h++) {
    const int r = 16 * warp + g + 8 * h, tt = r / group;
    prow[h] = r < R && tt < ntok ? a.pos[t0 + tt] : -1;
    rbit[h] = prow[h] >= 0 ? 1u << (tt & 31) : 0u;
  }
  /* What the warp's 16 rows can see: their latest position and their tokens' mask bits, so that a
   * key tile none of them sees is skipped by the whole warp (branches stay warp-uniform). */
  int32_t wpos = max(prow[0], prow[1]);
  uint32_t wtok = rbit[0] | rbit[1];
  for (int s = 1; s < 32; s <<= 1) {
    wpos = max(wpos, __shfl_xor_sync(0xffffffffu, wpos, s));
    wtok |= __shfl_xor_sync(0xffffffffu, wtok, s);
  }

  float o[DT][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
  for (int dn = 0; dn < DT; dn++) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
  const float scale_log2 = a.scale * 1.4426950408889634f; /* exp(x) = exp2(x log2 e) */
  const __nv_bfloat16 *qw = qs + (size_t)(16 * warp + g) * LD + c2;
  /* ldmatrix.trans rows of V: lanes 8i..8i+7 give the rows of 8x8 matrix i, keys 8 (i & 1) +
   * 0..7 at dims 8 (i >> 1) + 0..7 of a 16-key x 16-dim step; the key's row & 7 is lane & 7. */
  const int vkey = 8 * ((lane >> 3) & 1) + (lane & 7), vchunk = lane >> 4;

  for (int u = 0; u < units; u++, att_next_across(cur, nfull, upb)) {
    const int st = u % ATT_TC_STAGES;
    int b, j0;
    const int nk = att_unit_keys(a, cur, ublk, mp, ATT_TC_KT, &b, &j0);
    const uint32_t bmask = a.sel ? umask[cur.li] : 0xffffffffu;
    const int kpos0 = b * bs + j0;
    /* Every warp waits for the tile, even one that skips it: its release of the stage must not
     * count toward the stage's previous use. */
    mbar_wait(&full[st], (u / ATT_TC_STAGES) & 1);
    if (wpos >= kpos0 && (bmask & wtok)) { /* some row of this warp sees a key here */
      const uint8_t *stage = ring + (size_t)st * STAGE_BYTES;
      const __nv_bfloat16 *ks = (const __nv_bfloat16 *)stage;
      const uint32_t vs = smem_addr(stage + KV_BYTES);
      const float *ksc = (const float *)(stage + 2 * KV_BYTES), *vsc = ksc + ATT_TC_KT;

      /* S [16, 64] = Q K^T; n-tiles past nk are left at 0 (masked below). */
      float s[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
      for (int k0 = 0; k0 < HD; k0 += 16) {
        uint32_t qa[4];
        qa[0] = *(const uint32_t *)(qw + k0);
        qa[1] = *(const uint32_t *)(qw + 8 * LD + k0);
        qa[2] = *(const uint32_t *)(qw + k0 + 8);
        qa[3] = *(const uint32_t *)(qw + 8 * LD + k0 + 8);
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
          if (8 * nt < nk) { /* B[k][n] = K[n][k]: key 8 nt + g, whose row & 7 is g */
            const __nv_bfloat16 *kr = ks + att_swz(8 * nt + g, k0 + c2, HD);
            dev_mma16816<0>(s[nt], qa, *(const uint32_t *)kr, *(const uint32_t *)(ks + att_swz(8 * nt + g, k0 + 8 + c2, HD)));
          }
      }
      /* Every row of the warp sees every key of a whole tile (most tiles): no masks to apply. */
      const bool whole = __all_sync(0xffffffffu, nk == ATT_TC_KT && (bmask & rbit[0]) && (bmask & rbit[1]) &&
                                                     kpos0 + ATT_TC_KT - 1 <= min(prow[0], prow[1]));
      /* Online softmax of rows g (h = 0) and g + 8 (h = 1); a row's 4 lanes reduce by shuffles. */
      float mnew[2], corr[2];
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const bool row_sees = (bmask & rbit[h]) != 0;
        float mx = whole ? att_tc_scale_row<FP8, false, NT>(s, h, ksc, c2, row_sees, nk, kpos0, prow[h], scale_log2)
                         : att_tc_scale_row<FP8, true, NT>(s, h, ksc, c2, row_sees, nk, kpos0, prow[h], scale_log2);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        mnew[h] = fmaxf(m[h], mx);
        /* mnew = -inf: the row has seen no key yet; everything stays 0 */
        corr[h] = mnew[h] == -INFINITY ? 1.0f : exp2f(m[h] - mnew[h]);
        m[h] = mnew[h];
        l[h] *= corr[h]; /* this lane's columns only: the row's 4 lanes add up at the end */
      }
#pragma unroll
      for (int dn = 0; dn < DT; dn++)
        o[dn][0] *= corr[0], o[dn][1] *= corr[0], o[dn][2] *= corr[1], o[dn][3] *= corr[1];
      /* P in BF16, packed at once (half the registers of S): the accumulators of n-tiles 2 kk and
       * 2 kk + 1 are the A fragment of keys 16 kk .. 16 kk + 15 for O += P V. */
      uint32_t pa[ATT_TC_KT / 16][4];
#pragma unroll
      for (int nt = 0; nt < NT; nt++) {
        float p[4];
#pragma unroll
        for (int x = 0; x < 4; x++) {
          const float sc = s[nt][x];
          p[x] = sc == -INFINITY ? 0.0f : exp2f(sc - mnew[x >> 1]);
          l[x >> 1] += p[x];
          if constexpr (FP8) p[x] *= vsc[8 * nt + c2 + (x & 1)];
        }
        pa[nt >> 1][2 * (nt & 1)] = bf16_pair(p[0], p[1]);
        pa[nt >> 1][2 * (nt & 1) + 1] = bf16_pair(p[2], p[3]);
      }
      /* O [16, hd] += P [16, 64] V [64, hd], 16 keys per step. */
#pragma unroll
      for (int kk = 0; kk < ATT_TC_KT / 16; kk++)
        if (16 * kk < nk) {
#pragma unroll
          for (int dn = 0; dn < DT; dn += 2) {
            uint32_t vb[4]; /* B fragments of dim n-tiles dn and dn + 1 */
            const uint32_t addr = vs + (uint32_t)(att_swz(16 * kk + vkey, 8 * (dn + vchunk), HD) * sizeof(__nv_bfloat16));
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                         : "=r"(vb[0]), "=r"(vb[1]), "=r"(vb[2]), "=r"(vb[3])
                         : "r"(addr));
            dev_mma16816<0>(o[dn], pa[kk], vb[0], vb[1]);
            dev_mma16816<0>(o[dn + 1], pa[kk], vb[2], vb[3]);
          }
        }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[st]);
  }

#pragma unroll
  for (int h = 0; h < 2; h++) {
    float sum = l[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int r = 16 * warp + g + 8 * h, tt = r / group;
    if (r >= R || tt >= ntok) continue;
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f; /* zero when no key was visible (padding) */
    float *dst = a.out + ((size_t)(t0 + tt) * a.nh + (size_t)kvh * group + r % group) * HD + c2;
#pragma unroll
    for (int dn = 0; dn < DT; dn++)
      *(float2 *)(dst + 8 * dn) = make_float2(o[dn][2 * h] * inv, o[dn][2 * h + 1] * inv);
  }
}

/* Stages the keys and values of every block of the table in BF16 (cuda scratch), then runs the
 * tensor-core kernel over them. */
template <int HD, bool FP8>
static void att_tc_launch(cuda_backend *cb, att_args &a, size_t smem) {
  const int rpb = att_tc_rows_per_block(a.kv.block_size);
  const size_t rows = (size_t)a.kv.num_blocks * a.kv.nkv * rpb;
  const size_t kv_bytes = rows * HD * sizeof(__nv_bfloat16), scale_bytes = FP8 ? rows * sizeof(float) : 0;
  uint8_t *stage = (uint8_t *)cuda_scratch(cb, 2 * (kv_bytes + scale_bytes), "attention (BF16 keys and values)");
  if (!stage) return;
  a.kb = (const __nv_bfloat16 *)stage;
  a.vb = (const __nv_bfloat16 *)(stage + kv_bytes);
  a.kbs = FP8 ? (const float *)(stage + 2 * kv_bytes) : NULL;
  a.vbs = FP8 ? (const float *)(stage + 2 * kv_bytes + scale_bytes) : NULL;
  dev_launch(att_stage_kernel<FP8>, (unsigned)(a.kv.num_blocks * a.kv.nkv), 256, 0, cb->stream, a, rpb);
  cuda_launched(cb, "attention (BF16 staging)");
  cuda_allow_smem(cb, (const void *)attention_tc_kernel<HD, FP8>, smem, "attention (shared memory)");
  const int ntiles = (a.T + a.tt - 1) / a.tt;
  dev_launch(attention_tc_kernel<HD, FP8>, (unsigned)(ntiles * a.kv.nkv), 32 * (ATT_TC_WARPS + 1), smem, cb->stream, a,
             rpb);
  cuda_launched(cb, "attention (tensor cores)");
}

void cuda_attention(m3_backend *be, const float *q, int nh, const m3_kv_view *kv,
                    const int32_t *pos, int T, const int32_t *sel, int topk, float *out) {
  cuda_backend *cb = cuda_of(be);
  if (T <= 0) return;
  const int hd = kv->hd;
  if (hd > ATT_MAX_HD || hd % 4 != 0 || kv->nkv <= 0 || nh % kv->nkv != 0 ||
      nh / kv->nkv > ATT_MAX_ROWS || (sel && topk <= 0)) {
    cuda_note(cb, cudaErrorInvalidValue,
              "attention (head_dim not a multiple of 4 up to 256, or more than 64 query heads per KV head)");
    return;
  }
  att_args a;
  a.q = q;
  a.out = out;
  a.kv = *kv;
  a.pos = pos;
  a.sel = sel;
  a.T = T;
  a.nh = nh;
  a.group = nh / kv->nkv;
  a.topk = sel ? topk : 0;
  a.scale = (float)(1.0 / sqrt((double)hd));
  a.upb = (kv->block_size + ATT_KT - 1) / ATT_KT;
  const bool fp8 = kv->dtype == M3_KV_FP8;
  a.kv_page_bytes = fp8 ? m3_kv_pool_page_bytes(M3_KV_FP8, (size_t)kv->nkv * kv->block_size, (size_t)hd) : 0;
  a.kb = a.vb = NULL;
  a.kbs = a.vbs = NULL;
  if (T >= ATT_TC_MIN_T && (hd == 64 || hd == 128)) {
    /* 128 rows; a sparse tile keeps the fp32 kernel's limits on tokens (a 32-bit token mask) and
     * on the selection entries att_union merges. */
    int tc_tt = ATT_TC_ROWS / a.group;
    if (sel && tc_tt > ATT_MAX_TT) tc_tt = ATT_MAX_TT;
    if (sel && tc_tt * topk > ATT_MAX_ENTRIES) tc_tt = ATT_MAX_ENTRIES / topk > 1 ? ATT_MAX_ENTRIES / topk : 1;
    if (tc_tt > T) tc_tt = T;
    a.tt = tc_tt;
    a.rows = tc_tt * a.group;
    a.nsplit = 1;
    a.part = NULL;
    const size_t tc_smem = att_tc_smem_bytes(hd, sel ? tc_tt * topk : 0, kv->num_blocks);
    if (hd == 64) fp8 ? att_tc_launch<64, true>(cb, a, tc_smem) : att_tc_launch<64, false>(cb, a, tc_smem);
    else fp8 ? att_tc_launch<128, true>(cb, a, tc_smem) : att_tc_launch<128, false>(cb, a, tc_smem);
    return;
  }
  /* Tokens per tile: up to 64 rows, a 32-bit token mask, and at most ATT_MAX_ENTRIES selection
   * entries to merge. */
  int tt = ATT_MAX_ROWS / a.group;
  if (tt > ATT_MAX_TT) tt = ATT_MAX_TT;
  if (sel && tt * topk > ATT_MAX_ENTRIES) tt = ATT_MAX_ENTRIES / topk > 1 ? ATT_MAX_ENTRIES / topk : 1;
  if (tt > T) tt = T;
  a.tt = tt;
  a.rows = tt * a.group;
  const int ntiles = (T + tt - 1) / tt;
  const int list_max = sel ? (tt * topk < kv->num_blocks ? tt * topk : kv->num_blocks) : kv->num_blocks;
  const int max_units = list_max * a.upb;
  const size_t smem = att_smem_bytes(a.rows, hd, sel ? tt * topk : 0, kv->num_blocks);
  if (fp8) att_launch_hd<true>(cb, a, ntiles, max_units, smem);
  else att_launch_hd<false>(cb, a, ntiles, max_units, smem);
}
