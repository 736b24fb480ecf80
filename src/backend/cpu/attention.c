/* attention.c: the paged KV cache writes and causal GQA attention, dense or restricted to the
 * MSA-selected blocks (shared/spec/msa_spec.md §5).
 *
 * One work item is (token, KV head): the group's query heads run together so that each K and V
 * row is loaded once for all of them. Keys are taken a block (page) at a time: scores for the
 * whole block, then one online-softmax rescale per head and block. An fp8 cache's block is
 * dequantized into a per-worker tile first, so the same SIMD kernels run on either dtype; its keys
 * are stored rotated (backend.h m3_kv_rotate_key), so the group's queries are rotated first. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_internal.h"
#include "base/dtype.h"

/* Start of page `page` of a pool of `rows` rows of `dim` values per page. */
static uint8_t *pool_page(const m3_kv_view *kv, const void *pool, int32_t page, int rows, int dim) {
  return (uint8_t *)pool +
         (size_t)page * m3_kv_pool_page_bytes(kv->dtype, (size_t)rows, (size_t)dim);
}

/* x [n] -> E4M3 q [n] and its scale (backend.h, kv_store). A scale that underflows to 0 stores a
 * row of zeros: dividing by it would make the NaN pattern out of 0 / 0. */
static void quantize_row(const float *x, int n, uint8_t *q, float *scale) {
  float amax = 0.0f;
  for (int i = 0; i < n; i++) {
    float a = fabsf(x[i]);
    if (isnan(a) || a > amax) amax = a; /* a NaN sticks */
  }
  float s = amax / 448.0f;
  if (!isfinite(s) || s == 0.0f) {
    *scale = isfinite(s) ? 0.0f : NAN;
    memset(q, 0, (size_t)n);
    return;
  }
  *scale = s;
  for (int i = 0; i < n; i++) q[i] = m3_f32_to_e4m3(x[i] / s);
}

/* Row r of page `page` of a pool = x [dim], in the pool's dtype. */
static void store_row(const m3_kv_view *kv, void *pool, int32_t page, int rows, int dim, int r,
                      const float *x) {
  uint8_t *base = pool_page(kv, pool, page, rows, dim);
  if (kv->dtype == M3_KV_F32)
    memcpy((float *)base + (size_t)r * dim, x, (size_t)dim * sizeof(float));
  else
    quantize_row(x, dim, base + (size_t)rows * sizeof(float) + (size_t)r * dim, (float *)base + r);
}

const float *cpu_kv_rows(const cpu_kernels *k, const m3_kv_view *kv, const void *pool,
                         int32_t page, int rows_per_page, int dim, int r0, int n, float *tile) {
  const uint8_t *base = pool_page(kv, pool, page, rows_per_page, dim);
  if (kv->dtype == M3_KV_F32) return (const float *)base + (size_t)r0 * dim;
  const float *scale = (const float *)base + r0;
  const uint8_t *q = base + (size_t)rows_per_page * sizeof(float) + (size_t)r0 * dim;
  for (int i = 0; i < n; i++)
    k->dequant_e4m3(q + (size_t)i * dim, dim, scale[i], tile + (size_t)i * dim);
  return tile;
}

/* K row r of page `page` = k [hd]. An fp8 pool stores it rotated (m3_kv_rotate_key), through
 * rot [hd]; without rot (out of memory in an op that cannot fail) the row reads back NaN. */
static void store_key_row(const m3_kv_view *kv, int32_t page, int r, const float *k, float *rot) {
  const int rows = kv->nkv * kv->block_size, hd = kv->hd;
  if (kv->dtype == M3_KV_FP8) {
    if (!rot) {
      store_row(kv, kv->k, page, rows, hd, r, k);
      ((float *)pool_page(kv, kv->k, page, rows, hd))[r] = NAN;
      return;
    }
    memcpy(rot, k, (size_t)hd * sizeof(float));
    m3_kv_rotate_key(rot, hd);
    k = rot;
  }
  store_row(kv, kv->k, page, rows, hd, r, k);
}

void cpu_kv_store(m3_backend *be, const m3_kv_view *kv, const int32_t *pos, int T, const float *k,
                  const float *v, const float *ik) {
  (void)be;
  const int bs = kv->block_size, nkv = kv->nkv, hd = kv->hd;
  float *rot = kv->dtype == M3_KV_FP8 ? malloc((size_t)hd * sizeof(float)) : NULL;
  for (int t = 0; t < T; t++) {
    int32_t p = pos[t];
    if (p < 0 || p / bs >= kv->num_blocks) continue; /* padding rows; positions past the table */
    int32_t page = kv->block_table[p / bs];
    int slot = p % bs;
    for (int h = 0; h < nkv; h++) {
      size_t src = ((size_t)t * nkv + h) * hd;
      store_key_row(kv, page, h * bs + slot, k + src, rot);
      store_row(kv, kv->v, page, nkv * bs, hd, h * bs + slot, v + src);
    }
    if (ik && kv->ik) store_row(kv, kv->ik, page, bs, kv->ihd, slot, ik + (size_t)t * kv->ihd);
  }
  free(rot);
}

/* Norms and rotates q, iq, k and ik in place (the keys' in place is what the contract allows),
 * then stores: on the CPU the rows stay in cache between the passes, and the unfused ops' own code
 * makes the bits theirs by construction. */
void cpu_kv_store_rope(m3_backend *be, const m3_kv_view *kv, const int32_t *pos, int T, const m3_attention_rows *r) {
  if (r->q) cpu_rmsnorm_rope(be, r->q, r->q_norm, r->eps, pos, T, r->nh, kv->hd, r->rot, r->theta);
  if (r->iq) cpu_rmsnorm_rope(be, r->iq, r->iq_norm, r->eps, pos, T, r->niq, kv->ihd, r->rot, r->theta);
  cpu_rmsnorm_rope(be, (float *)r->k, r->k_norm, r->eps, pos, T, kv->nkv, kv->hd, r->rot, r->theta);
  if (r->ik) cpu_rmsnorm_rope(be, (float *)r->ik, r->ik_norm, r->eps, pos, T, 1, kv->ihd, r->rot, r->theta);
  cpu_kv_store(be, kv, pos, T, r->k, r->v, r->ik);
}

typedef struct {
  const cpu_kernels *k;
  const float *q;
  int nh;
  const m3_kv_view *kv;
  const int32_t *pos;
  const int32_t *sel;
  int topk;
  float *out;
  /* per worker: scores [group][block_size], max [group], sum [group], and for an fp8 cache the
   * block's dequantized K and V [2][block_size][hd] and the group's rotated queries [group][hd] */
  float *scratch;
  size_t scratch_per_worker;
} attention_job;

/* Folds keys [0, n) of one page into the running softmax of every head of the group. */
static void attend_block(const attention_job *job, int group, const float *q, const float *kb,
                         const float *vb, int n, float *s, float *m, float *l, float *o) {
  const cpu_kernels *k = job->k;
  const int hd = job->kv->hd, bs = job->kv->block_size;
  const float scale = (float)(1.0 / sqrt((double)hd));
  for (int h = 0; h < group; h++) memset(s + (size_t)h * bs, 0, (size_t)n * sizeof(float));
  k->tile_gemm(kb, n, hd, q, hd, group, s, bs); /* s[h][j] = dot(q[h], K[j]) */
  for (int h = 0; h < group; h++) {
    float *sh = s + (size_t)h * bs;
    float bmax = -INFINITY;
    for (int j = 0; j < n; j++) {
      sh[j] *= scale;
      if (sh[j] > bmax) bmax = sh[j]; /* a NaN score still reaches the output through exp */
    }
    float mnew = fmaxf(m[h], bmax);
    float corr = m[h] == -INFINITY ? 0.0f : expf(m[h] - mnew);
    l[h] = l[h] * corr + k->exp_sum(sh, n, mnew);
    m[h] = mnew;
    k->scale(o + (size_t)h * hd, corr, hd);
  }
  k->pv(s, bs, group, vb, n, hd, o); /* o[h] += sum_j p[h][j] V[j] */
}

/* The group's queries q [group][hd] as an fp8 cache's rotated keys need them (backend.h
 * attention): each row rotated, then times 1 / B, into out. */
static const float *rotated_queries(const float *q, int group, int hd, float *out) {
  const float inv = 1.0f / (float)m3_kv_key_block(hd);
  for (int h = 0; h < group; h++) {
    float *row = out + (size_t)h * hd;
    memcpy(row, q + (size_t)h * hd, (size_t)hd * sizeof(float));
    m3_kv_rotate_key(row, hd);
    for (int d = 0; d < hd; d++) row[d] *= inv;
  }
  return out;
}

static void attention_items(void *ctx, int64_t i0, int64_t i1, int worker) {
  const attention_job *job = ctx;
  const m3_kv_view *kv = job->kv;
  const int nkv = kv->nkv, hd = kv->hd, bs = kv->block_size, group = job->nh / nkv;
  float *s = job->scratch + (size_t)worker * job->scratch_per_worker;
  float *m = s + (size_t)group * bs, *l = m + group;
  float *ktile = l + group, *vtile = ktile + (size_t)bs * hd, *qrot = vtile + (size_t)bs * hd;
  for (int64_t item = i0; item < i1; item++) {
    int64_t t = item / nkv;
    int kvh = (int)(item % nkv);
    const float *q = job->q + ((size_t)t * job->nh + (size_t)kvh * group) * hd;
    if (kv->dtype == M3_KV_FP8) q = rotated_queries(q, group, hd, qrot);
    float *o = job->out + ((size_t)t * job->nh + (size_t)kvh * group) * hd;
    memset(o, 0, (size_t)group * hd * sizeof(float));
    int32_t p = job->pos[t];
    if (p < 0) continue; /* padding row: zero output */
    for (int h = 0; h < group; h++) m[h] = -INFINITY, l[h] = 0;
    const int32_t *list = job->sel ? job->sel + ((size_t)t * nkv + kvh) * job->topk : NULL;
    int nlist = job->sel ? job->topk : p / bs + 1;
    for (int i = 0; i < nlist; i++) {
      int32_t b = list ? list[i] : i;
      if (b < 0) break;
      if (b >= kv->num_blocks || (int64_t)b * bs > p) continue;
      int n = p - b * bs + 1 < bs ? p - b * bs + 1 : bs;
      int32_t page = kv->block_table[b];
      const float *kb = cpu_kv_rows(job->k, kv, kv->k, page, nkv * bs, hd, kvh * bs, n, ktile);
      const float *vb = cpu_kv_rows(job->k, kv, kv->v, page, nkv * bs, hd, kvh * bs, n, vtile);
      attend_block(job, group, q, kb, vb, n, s, m, l, o);
    }
    for (int h = 0; h < group; h++)
      if (l[h] > 0) job->k->scale(o + (size_t)h * hd, 1.0f / l[h], hd);
  }
}

void cpu_attention(m3_backend *be, const float *q, int nh, const m3_kv_view *kv,
                   const int32_t *pos, int T, const int32_t *sel, int topk, float *out) {
  cpu_backend *cb = cpu_of(be);
  const int group = nh / kv->nkv;
  size_t per_worker = (size_t)group * kv->block_size + 2 * (size_t)group;
  if (kv->dtype == M3_KV_FP8) per_worker += (2 * (size_t)kv->block_size + (size_t)group) * kv->hd;
  float *scratch = malloc(per_worker * m3_threadpool_size(cb->pool) * sizeof(float));
  if (!scratch) { /* Out of memory in an op that cannot fail: a visibly wrong result. */
    for (size_t i = 0; i < (size_t)T * nh * kv->hd; i++) out[i] = NAN;
    return;
  }
  attention_job job = {cb->k, q, nh, kv, pos, sel, topk, out, scratch, per_worker};
  m3_parallel_for(cb->pool, (int64_t)T * kv->nkv, 1, attention_items, &job);
  free(scratch);
}
