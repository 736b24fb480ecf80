/* sample.cu: sample_rows, the sampler's steps 3-7 (engine/sampler.h) on the GPU, one block per
 * logits row, so a sampling step moves one id a row to the host instead of the row.
 *
 * The CPU's filters in order statistics. Rank order: logit descending, ties to the lower id: the
 * order of rank_key (cuda_internal.h). A token's weight is exp((l - max) / T) in double, as the
 * CPU computes it; weights are monotone in the logit, so every filter keeps a rank-order prefix:
 *   top_k: the members ranked at or before the k-th best;
 *   top_p: the shortest prefix whose weight reaches top_p * (the weight of the top_k set, or of
 *          every finite token);
 *   min_p: the members of weight >= min_p (the best has weight 1).
 * The draw takes the first candidate whose cumulative weight exceeds unit * total: cumulated in
 * rank order when top_k or top_p filtered, else in id order (m3_sampler_candidates' draw order).
 *
 * Each rank-order question ("the first member, in rank order, where the cumulative count or
 * weight meets a target") is one descent over the row (`descend`), no sort: a pass histograms the
 * members still in question into 256 bins ordered as rank order, finds the bin where the target is
 * met, and keeps only that bin's members for the next pass. The first pass bins by the scaled
 * distance from the maximum z = (max - l) / T (8 bins per unit, the tail beyond z = 32 in one
 * bin), which spreads a row's logits evenly; later passes bin by the next 8 bits of the rank key
 * below the bits every remaining member shares. A bin whose members share one key holds one
 * token: the answer. At most 9 passes; a few in practice. The id-order draw is one block prefix
 * scan over contiguous id chunks per thread.
 *
 * Sums run in another order than the CPU's: where unit * total (or a top_p target) lies within
 * rounding of a boundary between cumulative weights the neighbour may be picked (the op's
 * contract). A target never met because of that rounding picks the last member, as the CPU's
 * scans do. */
#include <math.h>

#include "backend/cuda/cuda_ops.h"

enum { SAMPLE_THREADS = 1024, SAMPLE_WARPS = SAMPLE_THREADS / 32, SAMPLE_BINS = 256 };

#define SAMPLE_Z_BINS_PER_UNIT 8.0 /* first-pass bins per unit of z; z >= 31.875 share bin 255 */

typedef struct {
  /* One pass's histogram: bin b's member count, weight and smallest / largest rank key. */
  double weight[SAMPLE_BINS];
  unsigned long long kmin[SAMPLE_BINS], kmax[SAMPLE_BINS];
  unsigned count[SAMPLE_BINS];
  /* Block reductions' per-warp partials. */
  double dpart[SAMPLE_WARPS];
  unsigned long long upart[SAMPLE_WARPS];
  int ipart[SAMPLE_WARPS];
  /* What thread 0 decides after a pass, for every thread. */
  unsigned long long lo, hi, result;
  double acc, target;
  int done;
  int found_id, last_id;
} sample_shared;

/* The tokens a question is about: finite logits ranked at or before `from` (key >= from; 0: no
 * cut) and of weight >= floor_w (0: no floor). */
typedef struct {
  unsigned long long from;
  double floor_w;
} sample_domain;

/* What one row's passes share. */
typedef struct {
  const float *l;
  int vocab;
  double max, inv_t; /* the row's largest logit; 1 / temperature */
  unsigned long long best; /* its rank key, the answer of an empty question */
} sample_row;

__device__ __forceinline__ double row_z(const sample_row &r, float v) {
  return (r.max - (double)v) * r.inv_t;
}

/* exp((l - max) / T), bit for bit as every pass computes it (membership must not change). */
__device__ __forceinline__ double row_weight(const sample_row &r, float v) { return exp(-row_z(r, v)); }

/* Bin of the first pass: 255 for z = 0, falling with z: the order of rank keys. */
__device__ __forceinline__ int z_digit(double z) {
  const double b = z * SAMPLE_Z_BINS_PER_UNIT;
  return b < (double)(SAMPLE_BINS - 1) ? SAMPLE_BINS - 1 - (int)b : 0;
}

__device__ __forceinline__ unsigned long long min_u64(unsigned long long a, unsigned long long b) {
  return a < b ? a : b;
}
__device__ __forceinline__ unsigned long long max_u64(unsigned long long a, unsigned long long b) {
  return a > b ? a : b;
}

/* Sum and max over the block; every thread gets them. */
__device__ int block_sum_int(int v, sample_shared *sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) sh->ipart[threadIdx.x >> 5] = v;
  __syncthreads();
  int total = 0;
  for (int w = 0; w < SAMPLE_WARPS; w++) total += sh->ipart[w];
  __syncthreads();
  return total;
}

__device__ unsigned long long block_max_key(unsigned long long v, sample_shared *sh) {
  v = warp_max_u64(v);
  if ((threadIdx.x & 31) == 0) sh->upart[threadIdx.x >> 5] = v;
  __syncthreads();
  unsigned long long m = 0;
  for (int w = 0; w < SAMPLE_WARPS; w++) m = max_u64(m, sh->upart[w]);
  __syncthreads();
  return m;
}

/* Exclusive prefix sum of v over the threads in order; *total gets the sum. */
__device__ double block_exclusive_sum(double v, sample_shared *sh, double *total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double x = v;
  for (int o = 1; o < 32; o <<= 1) {
    double y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  double before_in_warp = __shfl_up_sync(0xffffffffu, x, 1);
  if (lane == 0) before_in_warp = 0.0;
  if (lane == 31) sh->dpart[warp] = x;
  __syncthreads();
  double before = 0.0, all = 0.0;
  for (int w = 0; w < SAMPLE_WARPS; w++) {
    if (w < warp) before += sh->dpart[w];
    all += sh->dpart[w];
  }
  __syncthreads();
  *total = all;
  return before + before_in_warp;
}

/* The first member of domain d, in rank order, where the cumulative count (weighted = 0: >=
 * target) or weight (weighted = 1: >= target, or > target when strict) meets the target; in
 * weight mode with frac >= 0 the target is frac * the domain's total weight. Returns its rank key;
 * the last member when rounding leaves the target unmet; r.best when the domain is empty. Called
 * by every thread of the block. */
__device__ unsigned long long descend(const sample_row &r, sample_domain d, int weighted,
                                      int strict, double target, double frac, sample_shared *sh) {
  const int tid = threadIdx.x, lane = tid & 31;
  const int need_weight = weighted || d.floor_w > 0.0;
  unsigned long long lo = 0, hi = ~0ull;
  double acc = 0.0; /* count or weight of the members ranked before the range [lo, hi] */
  for (int first = 1;; first = 0) {
    for (int b = tid; b < SAMPLE_BINS; b += blockDim.x) {
      sh->weight[b] = 0.0;
      sh->kmin[b] = ~0ull;
      sh->kmax[b] = 0;
      sh->count[b] = 0;
    }
    __syncthreads();
    /* The digit: bits [shift, shift + 8) of the key, just below the bits the range shares. */
    const int shared_bits = first ? 0 : __clzll((long long)(lo ^ hi));
    const int shift = 64 - shared_bits - 8 > 0 ? 64 - shared_bits - 8 : 0;
    /* Bin 0 (the first pass's tail, where most of a row lands) gathers in registers: atomics on
     * one shared address would serialize. */
    unsigned c0 = 0;
    double w0 = 0.0;
    unsigned long long min0 = ~0ull, max0 = 0;
    for (int i = tid; i < r.vocab; i += blockDim.x) {
      const float v = r.l[i];
      if (!(v > -INFINITY)) continue;
      const unsigned long long k = rank_key(score_key(v), i);
      if (k < d.from || k < lo || k > hi) continue;
      const double z = row_z(r, v);
      const double w = need_weight ? exp(-z) : 0.0;
      if (w < d.floor_w) continue;
      const int b = first ? z_digit(z) : (int)((k >> shift) & (SAMPLE_BINS - 1));
      if (b == 0) {
        c0++;
        w0 += w;
        min0 = min_u64(min0, k);
        max0 = max_u64(max0, k);
      } else {
        atomicAdd(&sh->count[b], 1u);
        if (weighted) atomicAdd(&sh->weight[b], w);
        atomicMin(&sh->kmin[b], k);
        atomicMax(&sh->kmax[b], k);
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      c0 += __shfl_xor_sync(0xffffffffu, c0, o);
      w0 += __shfl_xor_sync(0xffffffffu, w0, o);
      min0 = min_u64(min0, __shfl_xor_sync(0xffffffffu, min0, o));
      max0 = max_u64(max0, __shfl_xor_sync(0xffffffffu, max0, o));
    }
    if (lane == 0 && c0 > 0) {
      atomicAdd(&sh->count[0], c0);
      if (weighted) atomicAdd(&sh->weight[0], w0);
      atomicMin(&sh->kmin[0], min0);
      atomicMax(&sh->kmax[0], max0);
    }
    __syncthreads();
    if (tid == 0) {
      if (first && weighted && frac >= 0.0) {
        double total = 0.0;
        for (int b = SAMPLE_BINS - 1; b >= 0; b--) total += sh->weight[b];
        target = frac * total;
      }
      double cum = acc;
      int found = -1, lowest = -1;
      for (int b = SAMPLE_BINS - 1; b >= 0 && found < 0; b--) {
        if (!sh->count[b]) continue;
        lowest = b;
        const double next = cum + (weighted ? sh->weight[b] : (double)sh->count[b]);
        if (strict ? next > target : next >= target) found = b;
        else cum = next;
      }
      sh->done = 1;
      sh->target = target;
      if (found < 0) sh->result = lowest >= 0 ? sh->kmin[lowest] : r.best;
      else if (sh->kmin[found] == sh->kmax[found]) sh->result = sh->kmax[found];
      else {
        sh->done = 0;
        sh->acc = cum;
        sh->lo = sh->kmin[found];
        sh->hi = sh->kmax[found];
      }
    }
    __syncthreads();
    if (sh->done) return sh->result; /* rewritten only after the next question's barriers */
    /* Thread 0 writes these again only after the next pass's two barriers. */
    lo = sh->lo;
    hi = sh->hi;
    acc = sh->acc;
    target = sh->target;
  }
}

/* The draw in id order among domain d (no cut, maybe a floor): the first member whose cumulative
 * weight in id order exceeds unit * total; the last member when rounding leaves it unmet. Each
 * thread owns a contiguous chunk of ids. */
__device__ int draw_id_order(const sample_row &r, sample_domain d, double unit, sample_shared *sh) {
  const int chunk = (r.vocab + (int)blockDim.x - 1) / (int)blockDim.x;
  const int i0 = (int)threadIdx.x * chunk, i1 = i0 + chunk < r.vocab ? i0 + chunk : r.vocab;
  double mine = 0.0;
  int last = -1;
  for (int i = i0; i < i1; i++) {
    const float v = r.l[i];
    if (!(v > -INFINITY)) continue;
    const double w = row_weight(r, v);
    if (w < d.floor_w) continue;
    mine += w;
    last = i;
  }
  if (threadIdx.x == 0) {
    sh->found_id = INT32_MAX;
    sh->last_id = -1;
  }
  double total;
  double acc = block_exclusive_sum(mine, sh, &total); /* its syncs order the writes above */
  const double target = unit * total;
  if (last >= 0 && acc <= target) {
    for (int i = i0; i <= last; i++) {
      const float v = r.l[i];
      if (!(v > -INFINITY)) continue;
      const double w = row_weight(r, v);
      if (w < d.floor_w) continue;
      acc += w;
      if (target < acc) {
        atomicMin(&sh->found_id, i);
        break;
      }
    }
  }
  if (last >= 0) atomicMax(&sh->last_id, last);
  __syncthreads();
  const int id = sh->found_id != INT32_MAX ? sh->found_id : sh->last_id;
  __syncthreads();
  return id;
}

__device__ __forceinline__ int id_of(unsigned long long key) {
  return (int)~(uint32_t)(key & 0xffffffffu);
}

__global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_rows_kernel(const float *logits, int vocab, const m3_row_sampling *rows, int32_t *out) {
  dev_pdl_enter();
  __shared__ sample_shared sh;
  const m3_row_sampling p = rows[blockIdx.x];
  sample_row r;
  r.l = logits + (size_t)blockIdx.x * vocab;
  r.vocab = vocab;
  /* The argmax as argmax_rows picks it (a NaN at index 0 stays), and the finite count. */
  unsigned long long best = 0;
  int finite = 0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = r.l[i];
    best = max_u64(best, rank_key(score_key(i == 0 && isnan(v) ? INFINITY : v), i));
    finite += v > -INFINITY;
  }
  best = block_max_key(best, &sh);
  finite = block_sum_int(finite, &sh);
  const int best_id = id_of(best);
  const float top = r.l[best_id];
  /* Greedy, or every token banned: the sampler returns the argmax and draws nothing. */
  if (!(p.temperature > 0.0f) || !(top > -INFINITY)) {
    if (threadIdx.x == 0) out[blockIdx.x] = best_id;
    return;
  }
  r.max = (double)top;
  r.inv_t = 1.0 / (double)p.temperature;
  r.best = best;
  const int top_k = p.top_k > 0 && p.top_k < finite;
  const int top_p = p.top_p > 0.0f && p.top_p < 1.0f;
  sample_domain d = {0, 0.0};
  if (top_k) d.from = descend(r, d, 0, 0, (double)p.top_k, -1.0, &sh);
  if (top_p) d.from = descend(r, d, 1, 0, 0.0, (double)p.top_p, &sh);
  if (p.min_p > 0.0f) d.floor_w = (double)p.min_p;
  const int id = top_k || top_p ? id_of(descend(r, d, 1, 1, 0.0, p.unit, &sh))
                                : draw_id_order(r, d, p.unit, &sh);
  if (threadIdx.x == 0) out[blockIdx.x] = id;
}

m3_status cuda_sample_rows(m3_backend *be, const float *logits, int nrows, int vocab,
                           const m3_row_sampling *rows, int32_t *out_host) {
  cuda_backend *cb = cuda_of(be);
  if (nrows > 0 && vocab > 0) {
    /* [nrows] row parameters, then [nrows] ids; the parameters' size is a multiple of 8. */
    const size_t param_bytes = (size_t)nrows * sizeof(m3_row_sampling);
    const size_t id_bytes = (size_t)nrows * sizeof(int32_t);
    uint8_t *buf = (uint8_t *)cuda_scratch(cb, param_bytes + id_bytes, "sample_rows");
    if (buf) {
      m3_row_sampling *params = (m3_row_sampling *)buf;
      int32_t *ids = (int32_t *)(buf + param_bytes);
      cuda_note(cb, cudaMemcpyAsync(params, rows, param_bytes, cudaMemcpyHostToDevice, cb->stream),
                "sample_rows");
      dev_launch(sample_rows_kernel, nrows, SAMPLE_THREADS, 0, cb->stream, logits, vocab, params, ids);
      cuda_launched(cb, "sample_rows");
      cuda_note(cb, cudaMemcpyAsync(out_host, ids, id_bytes, cudaMemcpyDeviceToHost, cb->stream),
                "sample_rows");
    }
  }
  cuda_note(cb, cudaStreamSynchronize(cb->stream), "sample_rows");
  return cuda_take_error(cb, "sample_rows");
}
