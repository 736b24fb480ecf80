/* kv_store_rope on the CPU backend (backend.h): the cache and the queries it leaves are, byte for
 * byte, what rmsnorm_rope of q, of iq, of k, of ik and kv_store leave, for float32 and fp8 caches,
 * with and without the index branch, at T = 1, 5 and 130 tokens whose positions cross page
 * boundaries (with a padding row and a row past the block table: their keys skipped, their
 * queries normed), over pages that already hold other bytes (which must stay). Independently of
 * the unfused ops, the queries and the float32 cache's keys equal a double-precision norm and
 * rotation written here from the spec (m3_text_spec.md §3.1-3.2). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "base/dtype.h"
#include "check.h"
#include "random.h"

static float *random_floats(size_t n, float lo, float hi) {
  float *v = malloc(n * sizeof *v);
  for (size_t i = 0; i < n; i++) v[i] = uniform(lo, hi);
  return v;
}

static float *copy_floats(const float *x, size_t n) {
  float *c = malloc(n * sizeof *c);
  memcpy(c, x, n * sizeof *c);
  return c;
}

/* A [n] norm weight, BF16 as the checkpoints store q_norm and k_norm. */
static m3_tensor bf16_weight(int n, uint16_t **data) {
  *data = malloc((size_t)n * sizeof **data);
  for (int i = 0; i < n; i++) (*data)[i] = m3_f32_to_bf16(uniform(-0.5f, 0.5f));
  m3_tensor t = {.name = "norm", .data = *data, .dtype = M3_DT_BF16, .rows = 1, .cols = n};
  return t;
}

typedef struct {
  int bs, nkv, hd, ihd, rot;
} shape;

/* One cache's pools (K, V, IK) and what they started as. */
typedef struct {
  uint8_t *pool[3], *start[3];
  size_t bytes[3];
} pools;

static pools make_pools(m3_kv_dtype dt, const shape *s, int pages) {
  pools p;
  p.bytes[0] = p.bytes[1] = pages * m3_kv_pool_page_bytes(dt, (size_t)s->nkv * s->bs, (size_t)s->hd);
  p.bytes[2] = pages * m3_kv_pool_page_bytes(dt, (size_t)s->bs, (size_t)s->ihd);
  for (int i = 0; i < 3; i++) {
    p.pool[i] = malloc(p.bytes[i]);
    p.start[i] = malloc(p.bytes[i]);
    /* what an earlier store left: bytes below 0x60 make finite float32 values and no E4M3 NaN */
    for (size_t b = 0; b < p.bytes[i]; b++) p.start[i][b] = (uint8_t)(rnd() % 0x60);
    memcpy(p.pool[i], p.start[i], p.bytes[i]);
  }
  return p;
}

/* Pools of the same bytes as p. */
static pools clone_pools(const pools *p) {
  pools c = *p;
  for (int i = 0; i < 3; i++) {
    c.pool[i] = malloc(p->bytes[i]);
    c.start[i] = malloc(p->bytes[i]);
    memcpy(c.pool[i], p->pool[i], p->bytes[i]);
    memcpy(c.start[i], p->start[i], p->bytes[i]);
  }
  return c;
}

static void free_pools(pools *p) {
  for (int i = 0; i < 3; i++) free(p->pool[i]), free(p->start[i]);
}

/* Double-precision reference of one key head x [dim]: Gemma RMSNorm with weight w, then the NeoX
 * rotation of the first min(rot, dim) dims at position p, angle = float32(p * inv_freq) with
 * inv_freq = float32(1 / theta^(2i / rot)) as the reference model computes them. */
static void ref_norm_rope(const float *x, const m3_tensor *w, int dim, int rot, double theta,
                          int32_t p, double eps, double *out) {
  double ss = 0;
  for (int i = 0; i < dim; i++) ss += (double)x[i] * x[i];
  const double inv = 1.0 / sqrt(ss / dim + eps);
  for (int i = 0; i < dim; i++)
    out[i] = x[i] * inv * (1.0 + m3_bf16_to_f32(((const uint16_t *)w->data)[i]));
  if (rot > dim) rot = dim;
  const int half = rot / 2;
  for (int i = 0; i < half; i++) {
    const float inv_freq = 1.0f / powf((float)theta, (float)(2 * i) / (float)rot);
    const double angle = (double)((float)p * inv_freq);
    const double a = out[i], b = out[i + half];
    out[i] = a * cos(angle) - b * sin(angle);
    out[i + half] = b * cos(angle) + a * sin(angle);
  }
}

/* The largest difference of heads [T * heads, dim] from ref_norm_rope of the heads they were. */
static double heads_against_reference(const float *got, const float *was, const int32_t *pos, int T, int heads, int dim,
                                      const m3_tensor *w, int rot, double theta, float eps) {
  double ref[256], worst = 0;
  for (int t = 0; t < T; t++)
    for (int h = 0; h < heads; h++) {
      const size_t at = ((size_t)t * heads + h) * dim;
      ref_norm_rope(was + at, w, dim, rot, theta, pos[t], eps, ref);
      for (int i = 0; i < dim; i++) worst = fmax(worst, fabs(got[at + i] - ref[i]));
    }
  return worst;
}

/* The float32 cache's key rows of every stored token against ref_norm_rope. */
static void check_against_reference(const m3_kv_view *kv, const pools *fused, const int32_t *pos,
                                    int T, const float *k, const float *ik, const m3_tensor *k_norm,
                                    const m3_tensor *ik_norm, int rot, double theta, float eps) {
  const int bs = kv->block_size, nkv = kv->nkv, hd = kv->hd, ihd = kv->ihd;
  double ref[256];
  double worst = 0;
  for (int t = 0; t < T; t++) {
    if (pos[t] < 0 || pos[t] / bs >= kv->num_blocks) continue;
    const int32_t page = kv->block_table[pos[t] / bs];
    const int slot = pos[t] % bs;
    for (int h = 0; h < nkv; h++) {
      ref_norm_rope(k + ((size_t)t * nkv + h) * hd, k_norm, hd, rot, theta, pos[t], eps, ref);
      const float *got = (const float *)fused->pool[0] + (((size_t)page * nkv + h) * bs + slot) * hd;
      for (int i = 0; i < hd; i++) worst = fmax(worst, fabs(got[i] - ref[i]));
    }
    if (ik) {
      ref_norm_rope(ik + (size_t)t * ihd, ik_norm, ihd, rot, theta, pos[t], eps, ref);
      const float *got = (const float *)fused->pool[2] + ((size_t)page * bs + slot) * ihd;
      for (int i = 0; i < ihd; i++) worst = fmax(worst, fabs(got[i] - ref[i]));
    }
  }
  CHECK_NEAR(worst, 0.0, 2e-5); /* values of magnitude about 1: a few float32 roundings */
}

/* T tokens from position `first` on (a padding row and a row one page past the table when
 * T > 3), stored both ways into two caches that start with the same bytes. */
static void store_case(m3_backend *be, m3_kv_dtype dt, const shape *s, int T, int32_t first,
                       int with_ik) {
  const int blocks = (first + T) / s->bs + 1, pages = blocks + 2;
  int32_t *table = malloc((size_t)blocks * sizeof *table);
  for (int b = 0; b < blocks; b++) table[b] = (b * 5 + 1) % pages; /* shuffled; 5 and pages coprime */
  int32_t *pos = malloc((size_t)T * sizeof *pos);
  for (int t = 0; t < T; t++) pos[t] = first + t;
  if (T > 3) pos[1] = -1, pos[2] = (blocks + 1) * s->bs + 2;
  /* queries: GQA 2 and an index head a KV head */
  const int nh = 2 * s->nkv, niq = s->nkv;
  const size_t kvn = (size_t)T * s->nkv * s->hd, ikn = (size_t)T * s->ihd;
  const size_t qn = (size_t)T * nh * s->hd, iqn = (size_t)T * niq * s->ihd;
  float *k = random_floats(kvn, -3, 3), *v = random_floats(kvn, -2, 2), *ik = random_floats(ikn, -3, 3);
  float *q = random_floats(qn, -3, 3), *iq = random_floats(iqn, -3, 3);
  uint16_t *kw, *ikw, *qw, *iqw;
  m3_tensor k_norm = bf16_weight(s->hd, &kw), ik_norm = bf16_weight(s->ihd, &ikw);
  m3_tensor q_norm = bf16_weight(s->hd, &qw), iq_norm = bf16_weight(s->ihd, &iqw);
  const float eps = 1e-6f;
  const double theta = 5e6;

  pools fused = make_pools(dt, s, pages), unfused = clone_pools(&fused);
  m3_kv_view view = {NULL, NULL, NULL, table, blocks, s->bs, s->nkv, s->hd, s->ihd, dt};

  m3_kv_view vf = view, vu = view;
  vf.k = fused.pool[0], vf.v = fused.pool[1], vf.ik = with_ik ? fused.pool[2] : NULL;
  vu.k = unfused.pool[0], vu.v = unfused.pool[1], vu.ik = with_ik ? unfused.pool[2] : NULL;
  float *kf = copy_floats(k, kvn), *ikf = copy_floats(ik, ikn), *qf = copy_floats(q, qn), *iqf = copy_floats(iq, iqn);
  const m3_attention_rows rows = {.q = qf,
                                  .iq = with_ik ? iqf : NULL,
                                  .k = kf,
                                  .v = v,
                                  .ik = with_ik ? ikf : NULL,
                                  .q_norm = &q_norm,
                                  .iq_norm = with_ik ? &iq_norm : NULL,
                                  .k_norm = &k_norm,
                                  .ik_norm = with_ik ? &ik_norm : NULL,
                                  .nh = nh,
                                  .niq = niq,
                                  .eps = eps,
                                  .rot = s->rot,
                                  .theta = theta};
  be->ops->kv_store_rope(be, &vf, pos, T, &rows);
  float *ku = copy_floats(k, kvn), *iku = copy_floats(ik, ikn), *qu = copy_floats(q, qn), *iqu = copy_floats(iq, iqn);
  be->ops->rmsnorm_rope(be, qu, &q_norm, eps, pos, T, nh, s->hd, s->rot, theta);
  if (with_ik) be->ops->rmsnorm_rope(be, iqu, &iq_norm, eps, pos, T, niq, s->ihd, s->rot, theta);
  be->ops->rmsnorm_rope(be, ku, &k_norm, eps, pos, T, s->nkv, s->hd, s->rot, theta);
  if (with_ik) be->ops->rmsnorm_rope(be, iku, &ik_norm, eps, pos, T, 1, s->ihd, s->rot, theta);
  be->ops->kv_store(be, &vu, pos, T, ku, v, with_ik ? iku : NULL);

  for (int i = 0; i < 3; i++) CHECK(memcmp(fused.pool[i], unfused.pool[i], fused.bytes[i]) == 0);
  CHECK(memcmp(qf, qu, qn * sizeof *qf) == 0);
  CHECK(memcmp(iqf, with_ik ? iqu : iq, iqn * sizeof *iqf) == 0); /* no index branch: iq untouched */
  CHECK_NEAR(heads_against_reference(qf, q, pos, T, nh, s->hd, &q_norm, s->rot, theta, eps), 0.0, 2e-5);
  if (with_ik)
    CHECK_NEAR(heads_against_reference(iqf, iq, pos, T, niq, s->ihd, &iq_norm, s->rot, theta, eps), 0.0, 2e-5);
  /* the stores did write (a test whose caches never change would pass the comparison above) */
  CHECK(memcmp(fused.pool[0], fused.start[0], fused.bytes[0]) != 0);
  CHECK(memcmp(fused.pool[1], fused.start[1], fused.bytes[1]) != 0);
  CHECK_EQ_INT(memcmp(fused.pool[2], fused.start[2], fused.bytes[2]) != 0, with_ik);
  if (dt == M3_KV_F32)
    check_against_reference(&vf, &fused, pos, T, k, with_ik ? ik : NULL, &k_norm, &ik_norm, s->rot,
                            theta, eps);

  free_pools(&fused), free_pools(&unfused);
  free(kf), free(ikf), free(ku), free(iku), free(k), free(v), free(ik), free(kw), free(ikw);
  free(qf), free(iqf), free(qu), free(iqu), free(q), free(iq), free(qw), free(iqw);
  free(pos), free(table);
}

int main(void) {
  m3_backend *be = NULL;
  CHECK_OK(m3_backend_cpu_create(2, &be));
  if (!be) return check_summary();
  static const shape shapes[] = {
      {16, 4, 128, 128, 64}, /* M3's heads: hd 128, ihd 128, rot 64 */
      {16, 2, 32, 16, 16},   /* small, the index key narrower than a head */
      {8, 3, 32, 16, 24},    /* rot wider than the index key: its rotation clamps to ihd */
  };
  static const int Ts[] = {1, 5, 130};
  for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
    for (int dt = M3_KV_F32; dt <= M3_KV_FP8; dt++)
      for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++)
        for (int with_ik = 0; with_ik < 2; with_ik++) {
          const shape *s = &shapes[si];
          const int T = Ts[ti];
          /* T = 1: a page's last slot; more: a run that starts 2 slots before a page ends */
          const int32_t first = T == 1 ? 2 * s->bs - 1 : 3 * s->bs - 2;
          store_case(be, (m3_kv_dtype)dt, s, T, first, with_ik);
          if (T == 1) store_case(be, (m3_kv_dtype)dt, s, T, 2 * s->bs, with_ik); /* first slot */
        }
  be->ops->destroy(be);
  return check_summary();
}
