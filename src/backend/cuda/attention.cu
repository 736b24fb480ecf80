/* attention.cu: paged KV-cache writes and causal GQA attention over the pages, dense or restricted
 * to the MSA-selected blocks (shared/spec/msa_spec.md §5).
 *
 * Flash-decoding: the keys of a token's block list (all visible blocks, or its topk selected ones)
 * are taken in units of 32 keys (a block is ceil(block_size / 32) units). A work item is (token,
 * KV head, split); a split walks a contiguous run of units, keeps an online softmax per query head
 * of the group, and leaves (max, sum, unnormalized output) for the combine kernel. A decode token
 * thus spreads over the whole GPU even with 16 selected blocks, and prefill (many tokens) runs one
 * split per item. Within a split a warp owns one query head at a time: one key per lane for the
 * scores, then lanes over head dims to accumulate V. */
#include <math.h>

#include "backend/cuda/cuda_ops.h"

enum { ATT_MAX_HD = 256, ATT_WARPS = 8 };

/* One block per token: K and V rows of every KV head, and the index key, into the token's page
 * slot. Positions without a page (and padding, pos < 0) are skipped, as on the CPU. */
__global__ void kv_store_kernel(m3_kv_view kv, const int32_t *__restrict__ pos, const float *__restrict__ k,
                                const float *__restrict__ v, const float *__restrict__ ik) {
  const int t = blockIdx.x, bs = kv.block_size, nkv = kv.nkv, hd = kv.hd;
  const int32_t p = pos[t];
  if (p < 0 || p / bs >= kv.num_blocks) return;
  const size_t page = (size_t)kv.block_table[p / bs], slot = (size_t)(p % bs);
  for (int e = threadIdx.x; e < nkv * hd; e += blockDim.x) {
    int h = e / hd, d = e % hd;
    size_t dst = ((page * nkv + h) * bs + slot) * hd + d;
    kv.k[dst] = k[(size_t)t * nkv * hd + e];
    kv.v[dst] = v[(size_t)t * nkv * hd + e];
  }
  if (ik && kv.ik)
    for (int d = threadIdx.x; d < kv.ihd; d += blockDim.x)
      kv.ik[(page * bs + slot) * kv.ihd + d] = ik[(size_t)t * kv.ihd + d];
}

void cuda_kv_store(m3_backend *be, const m3_kv_view *kv, const int32_t *pos, int T, const float *k,
                   const float *v, const float *ik) {
  cuda_backend *cb = cuda_of(be);
  if (T <= 0) return;
  kv_store_kernel<<<T, 256, 0, cb->stream>>>(*kv, pos, k, v, ik);
  cuda_launched(cb, "kv_store");
}

typedef struct {
  const float *q;
  int nh, group;
  m3_kv_view kv;
  const int32_t *pos;
  const int32_t *sel; /* NULL: dense */
  int topk;
  int nlist;          /* list entries: topk, or num_blocks when dense */
  int units_per_block; /* ceil(block_size / 32) */
  int per_split;      /* units per split */
  int nsplit;
  float scale;
  float *part;        /* [T, nh, nsplit, hd + 2]: output, max, sum */
} att_args;

template <int DPL> /* head dims per lane: hd <= 32 * DPL */
__global__ void __launch_bounds__(32 * ATT_WARPS) attention_split_kernel(att_args a) {
  extern __shared__ float qs[]; /* [group, hd] */
  const int nkv = a.kv.nkv, hd = a.kv.hd, bs = a.kv.block_size, group = a.group;
  const int t = blockIdx.x / nkv, kvh = blockIdx.x % nkv, split = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float *qg = a.q + ((size_t)t * a.nh + (size_t)kvh * group) * hd;
  for (int i = threadIdx.x; i < group * hd; i += blockDim.x) qs[i] = qg[i];
  __syncthreads();
  const int32_t p = a.pos[t];
  const int32_t *list = a.sel ? a.sel + ((size_t)t * nkv + kvh) * a.topk : NULL;
  const int ub = a.units_per_block, nunits = a.nlist * ub;
  const int u0 = split * a.per_split;
  const int u1 = u0 + a.per_split < nunits ? u0 + a.per_split : nunits;
  /* A -1 ends the selection list: entries after it are ignored, also in later splits. */
  int live = p >= 0;
  if (list)
    for (int i = 0; i < u0 / ub && live; i++) live = list[i] >= 0;

  for (int h = warp; h < group; h += ATT_WARPS) {
    const float *qh = qs + (size_t)h * hd;
    float m = -INFINITY, l = 0.0f, o[DPL];
#pragma unroll
    for (int d = 0; d < DPL; d++) o[d] = 0.0f;
    for (int u = u0; live && u < u1; u++) {
      const int i = u / ub;
      const int32_t b = list ? list[i] : i;
      if (b < 0) break;
      if (b >= a.kv.num_blocks || (int64_t)b * bs > p) continue;
      const int n = p - b * bs + 1 < bs ? p - b * bs + 1 : bs;
      const size_t base = ((size_t)a.kv.block_table[b] * nkv + kvh) * bs * hd;
      const float *kb = a.kv.k + base, *vb = a.kv.v + base;
      const int j0 = (u % ub) * 32;
      if (j0 < n) {
        const int j = j0 + lane;
        float s = -INFINITY;
        if (j < n) {
          const float *kr = kb + (size_t)j * hd;
          float dot = 0.0f;
          if ((hd & 3) == 0) {
#pragma unroll 8
            for (int d = 0; d < hd; d += 4) {
              float4 kv4 = *(const float4 *)(kr + d);
              dot += qh[d] * kv4.x + qh[d + 1] * kv4.y + qh[d + 2] * kv4.z + qh[d + 3] * kv4.w;
            }
          } else {
            for (int d = 0; d < hd; d++) dot += qh[d] * kr[d];
          }
          s = dot * a.scale;
        }
        const float mnew = fmaxf(m, warp_max(s));
        const float corr = m == -INFINITY ? 0.0f : expf(m - mnew);
        const float pj = j < n ? expf(s - mnew) : 0.0f;
        l = l * corr + warp_sum(pj);
#pragma unroll
        for (int d = 0; d < DPL; d++) o[d] *= corr;
        const int nj = n - j0 < 32 ? n - j0 : 32;
        for (int jj = 0; jj < nj; jj++) {
          const float pjj = __shfl_sync(0xffffffffu, pj, jj);
          const float *vr = vb + (size_t)(j0 + jj) * hd;
#pragma unroll
          for (int d = 0; d < DPL; d++)
            if (lane + 32 * d < hd) o[d] += pjj * vr[lane + 32 * d];
        }
        m = mnew;
      }
    }
    float *out = a.part + (((size_t)t * a.nh + (size_t)kvh * group + h) * a.nsplit + split) * (hd + 2);
#pragma unroll
    for (int d = 0; d < DPL; d++)
      if (lane + 32 * d < hd) out[lane + 32 * d] = o[d];
    if (lane == 0) out[hd] = m, out[hd + 1] = l;
  }
}

/* out[t, h] = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M); zero when no key was visible. */
__global__ void attention_combine_kernel(const float *__restrict__ part, int nsplit, int hd,
                                         float *__restrict__ out) {
  const float *pr = part + (size_t)blockIdx.x * nsplit * (hd + 2);
  float M = -INFINITY;
  for (int s = 0; s < nsplit; s++) M = fmaxf(M, pr[(size_t)s * (hd + 2) + hd]);
  float L = 0.0f;
  for (int s = 0; s < nsplit; s++) {
    const float *ps = pr + (size_t)s * (hd + 2);
    if (ps[hd] != -INFINITY) L += ps[hd + 1] * expf(ps[hd] - M);
  }
  const float inv = L > 0.0f ? 1.0f / L : 0.0f;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < nsplit; s++) {
      const float *ps = pr + (size_t)s * (hd + 2);
      if (ps[hd] != -INFINITY) acc += ps[d] * expf(ps[hd] - M);
    }
    out[(size_t)blockIdx.x * hd + d] = acc * inv;
  }
}

void cuda_attention(m3_backend *be, const float *q, int nh, const m3_kv_view *kv,
                    const int32_t *pos, int T, const int32_t *sel, int topk, float *out) {
  cuda_backend *cb = cuda_of(be);
  if (T <= 0) return;
  const int hd = kv->hd;
  if (hd > ATT_MAX_HD || nh % kv->nkv != 0) {
    cuda_note(cb, cudaErrorInvalidValue, "attention (head_dim over 256 or nh not a multiple of nkv)");
    return;
  }
  att_args a;
  a.q = q;
  a.nh = nh;
  a.group = nh / kv->nkv;
  a.kv = *kv;
  a.pos = pos;
  a.sel = sel;
  a.topk = topk;
  a.nlist = sel ? topk : kv->num_blocks;
  a.scale = (float)(1.0 / sqrt((double)hd));
  a.units_per_block = (kv->block_size + 31) / 32;
  /* Enough (token, KV head, split) items to fill the GPU twice over, at least one unit each. */
  const int items = T * kv->nkv, nunits = a.nlist * a.units_per_block;
  int nsplit = (2 * cb->num_sms + items - 1) / items;
  if (nsplit > nunits) nsplit = nunits;
  if (nsplit < 1) nsplit = 1;
  a.per_split = (nunits + nsplit - 1) / nsplit;
  if (a.per_split < 1) a.per_split = 1;
  a.nsplit = (nunits + a.per_split - 1) / a.per_split;
  if (a.nsplit < 1) a.nsplit = 1;
  a.part = (float *)cuda_scratch(cb, (size_t)T * nh * a.nsplit * (hd + 2) * sizeof(float), "attention");
  if (!a.part) return;
  dim3 grid((unsigned)items, (unsigned)a.nsplit);
  size_t smem = (size_t)a.group * hd * sizeof(float);
  if (hd <= 32) attention_split_kernel<1><<<grid, 32 * ATT_WARPS, smem, cb->stream>>>(a);
  else if (hd <= 64) attention_split_kernel<2><<<grid, 32 * ATT_WARPS, smem, cb->stream>>>(a);
  else if (hd <= 128) attention_split_kernel<4><<<grid, 32 * ATT_WARPS, smem, cb->stream>>>(a);
  else attention_split_kernel<8><<<grid, 32 * ATT_WARPS, smem, cb->stream>>>(a);
  cuda_launched(cb, "attention");
  attention_combine_kernel<<<(unsigned)(T * nh), 128, 0, cb->stream>>>(a.part, a.nsplit, hd, out);
  cuda_launched(cb, "attention (combine)");
}
