/* The fp8 KV cache on the CPU backend (backend.h m3_kv_dtype): kv_store's bytes and scales equal
 * a scalar reference quantizer written here from the contract (nearest E4M3 by search over all
 * codes, ties to the even code), at the offsets the page layout gives, K rows after the key
 * rotation (m3_kv_rotate_key, itself checked against the Hadamard matrix); attention and
 * msa_select over an fp8 cache equal the same ops over a float32 cache that holds the dequantized
 * values (keys rotated back). Shapes include odd sizes whose pages need padding, ragged positions
 * and padding rows. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "check.h"
#include "random.h"

/* E4M3 code c (no sign) as a value: exp 0 is subnormal, m * 2^-9. */
static double ref_e4m3_value(int c) {
  int e = c >> 3, m = c & 7;
  return e == 0 ? ldexp(m, -9) : ldexp(8 + m, e - 10);
}

/* Nearest finite E4M3 code to v (codes 0..0x7E are increasing), ties to the even code, which is
 * the even significand; 448 and beyond saturate. */
static uint8_t ref_e4m3(float v) {
  uint8_t sign = signbit(v) ? 0x80 : 0;
  double a = fabs((double)v);
  int best = 0x7e;
  if (a < 448.0) {
    best = 0;
    for (int c = 1; c <= 0x7e; c++) {
      double d = fabs(ref_e4m3_value(c) - a), db = fabs(ref_e4m3_value(best) - a);
      if (d < db || (d == db && (c & 1) == 0)) best = c;
    }
  }
  return sign | (uint8_t)best;
}

static float ref_dequant(uint8_t b, float scale) {
  float v = (float)ref_e4m3_value(b & 0x7f);
  return (b & 0x80 ? -v : v) * scale;
}

/* The contract: scale = amax / 448, bytes = E4M3(x / scale); zeros: 0 and 0; NaN or inf: NaN, 0. */
static void ref_quantize(const float *x, int n, uint8_t *q, float *scale) {
  float amax = 0;
  int bad = 0;
  for (int i = 0; i < n; i++) {
    bad |= !isfinite(x[i]);
    if (fabsf(x[i]) > amax) amax = fabsf(x[i]);
  }
  *scale = bad ? NAN : amax / 448.0f;
  for (int i = 0; i < n; i++) q[i] = bad || *scale == 0.0f ? 0 : ref_e4m3(x[i] / *scale);
}

/* Where row r of page p sits in an fp8 pool of `rows` rows of `dim` per page, as the layout
 * comment says: pages of 16-byte-padded (scales [rows] float32, bytes [rows, dim]). */
static size_t ref_page_bytes(int rows, int dim) {
  return ((size_t)rows * (4 + dim) + 15) / 16 * 16;
}
static float ref_scale_at(const void *pool, int p, int rows, int dim, int r) {
  float s;
  memcpy(&s, (const uint8_t *)pool + p * ref_page_bytes(rows, dim) + (size_t)r * 4, 4);
  return s;
}
static const uint8_t *ref_bytes_at(const void *pool, int p, int rows, int dim, int r) {
  return (const uint8_t *)pool + p * ref_page_bytes(rows, dim) + (size_t)rows * 4 + (size_t)r * dim;
}

typedef struct {
  int L, nkv, hd, ihd, bs, nb;
  float *K, *V, *IK;   /* [L, nkv, hd], [L, nkv, hd], [L, ihd] what was stored */
  int32_t *table;      /* [nb] shuffled pages */
  m3_kv_view kv;
} cache;

static float *random_row_values(size_t n) {
  float *x = malloc(n * sizeof *x);
  for (size_t i = 0; i < n; i++) x[i] = uniform(-1, 1);
  return x;
}

/* A cache of L tokens of dtype dt over shuffled pages, stored through kv_store in uneven chunks. */
static cache make_cache(m3_backend *be, m3_kv_dtype dt, int L, int nkv, int hd, int ihd, int bs,
                        const float *K, const float *V, const float *IK, const int32_t *table) {
  cache c = {L, nkv, hd, ihd, bs, (L + bs - 1) / bs + 1, NULL, NULL, NULL, NULL, {0}};
  c.table = malloc((size_t)c.nb * sizeof *c.table);
  memcpy(c.table, table, (size_t)c.nb * sizeof *c.table);
  c.kv = (m3_kv_view){
      be->ops->alloc(be, c.nb * m3_kv_pool_page_bytes(dt, (size_t)nkv * bs, (size_t)hd)),
      be->ops->alloc(be, c.nb * m3_kv_pool_page_bytes(dt, (size_t)nkv * bs, (size_t)hd)),
      be->ops->alloc(be, c.nb * m3_kv_pool_page_bytes(dt, (size_t)bs, (size_t)ihd)),
      c.table, c.nb, bs, nkv, hd, ihd, dt};
  int32_t *pos = malloc((size_t)L * sizeof *pos);
  for (int i = 0; i < L; i++) pos[i] = i;
  for (int t0 = 0; t0 < L;) {
    int n = 1 + (int)(rnd() % 7);
    if (n > L - t0) n = L - t0;
    be->ops->kv_store(be, &c.kv, pos + t0, n, K + (size_t)t0 * nkv * hd, V + (size_t)t0 * nkv * hd,
                      IK + (size_t)t0 * ihd);
    t0 += n;
  }
  free(pos);
  return c;
}

static void free_cache(m3_backend *be, cache *c) {
  be->ops->free(be, c->kv.k), be->ops->free(be, c->kv.v), be->ops->free(be, c->kv.ik);
  free(c->table);
}

static int32_t *shuffled_pages(int nb) {
  int32_t *t = malloc((size_t)nb * sizeof *t);
  for (int i = 0; i < nb; i++) t[i] = i;
  for (int i = nb - 1; i > 0; i--) {
    int j = (int)(rnd() % (uint32_t)(i + 1));
    int32_t tmp = t[i];
    t[i] = t[j], t[j] = tmp;
  }
  return t;
}

/* Checks one stored row against the reference quantizer; returns the mismatches. Writes the
 * dequantized row to deq. A key row (key = 1) is quantized rotated and rotated back after. */
static int check_row(const void *pool, int page, int rows, int dim, int r, const float *x, int key,
                     float *deq) {
  uint8_t *q = malloc((size_t)dim);
  float *rot = malloc((size_t)dim * sizeof *rot);
  memcpy(rot, x, (size_t)dim * sizeof *rot);
  if (key) m3_kv_rotate_key(rot, dim);
  float s;
  ref_quantize(rot, dim, q, &s);
  float got_s = ref_scale_at(pool, page, rows, dim, r);
  const uint8_t *got = ref_bytes_at(pool, page, rows, dim, r);
  int bad = isnan(s) ? !isnan(got_s) : memcmp(&s, &got_s, 4) != 0;
  for (int d = 0; d < dim; d++) {
    bad += got[d] != q[d] || (got[d] & 0x7f) == 0x7f;
    deq[d] = ref_dequant(got[d], got_s);
  }
  if (key) { /* H H = B I */
    m3_kv_rotate_key(deq, dim);
    for (int d = 0; d < dim; d++) deq[d] /= (float)m3_kv_key_block(dim);
  }
  free(q), free(rot);
  return bad;
}

/* kv_store over an fp8 cache: every row's bytes and scale bit-exact, and the dequantized values
 * of all rows (deqK, deqV, deqIK, shaped like K, V, IK) for the comparisons below. */
static void check_store(const cache *c, float *deqK, float *deqV, float *deqIK) {
  int bad = 0;
  const int rows = c->nkv * c->bs;
  for (int j = 0; j < c->L; j++) {
    int page = c->table[j / c->bs], s = j % c->bs;
    for (int h = 0; h < c->nkv; h++) {
      size_t at = ((size_t)j * c->nkv + h) * c->hd;
      bad += check_row(c->kv.k, page, rows, c->hd, h * c->bs + s, c->K + at, 1, deqK + at);
      bad += check_row(c->kv.v, page, rows, c->hd, h * c->bs + s, c->V + at, 0, deqV + at);
    }
    bad += check_row(c->kv.ik, page, c->bs, c->ihd, s, c->IK + (size_t)j * c->ihd, 0,
                     deqIK + (size_t)j * c->ihd);
  }
  CHECK_EQ_INT(bad, 0);
}

/* max |a - b| over max(1, max |b|): the fp8 cache's attention scores rotated keys against rotated
 * queries, the float32 one the keys rotated back against the queries, equal up to rounding. */
static float max_rel_diff(const float *a, const float *b, size_t n) {
  float m = 0, top = 1;
  for (size_t i = 0; i < n; i++) {
    float d = fabsf(a[i] - b[i]);
    if (!(d <= m)) m = d; /* a NaN shows */
    top = fmaxf(top, fabsf(b[i]));
  }
  return m / top;
}

/* One shape: store, check the bytes, then attention (dense, sparse) and msa_select over the fp8
 * cache against a float32 cache of the dequantized values. */
static void shape_case(m3_backend *be, int L, int nh, int nkv, int hd, int ihd, int bs, int T) {
  const size_t kvn = (size_t)L * nkv * hd, ikn = (size_t)L * ihd;
  cache c = {0};
  c.K = random_row_values(kvn), c.V = random_row_values(kvn), c.IK = random_row_values(ikn);
  /* Rows at the edges: all zeros, one large value among small ones, values past 448. */
  memset(c.K, 0, (size_t)hd * sizeof(float));
  c.V[(size_t)nkv * hd] = 3000.0f;
  for (int d = 0; d < ihd; d++) c.IK[(size_t)(L - 1) * ihd + d] = 1e-3f * (float)(d + 1);
  int32_t *table = shuffled_pages((L + bs - 1) / bs + 1);
  cache f8 = make_cache(be, M3_KV_FP8, L, nkv, hd, ihd, bs, c.K, c.V, c.IK, table);
  f8.K = c.K, f8.V = c.V, f8.IK = c.IK;
  float *dK = malloc(kvn * sizeof(float)), *dV = malloc(kvn * sizeof(float));
  float *dIK = malloc(ikn * sizeof(float));
  check_store(&f8, dK, dV, dIK);
  cache f32 = make_cache(be, M3_KV_F32, L, nkv, hd, ihd, bs, dK, dV, dIK, table);

  int32_t *pos = malloc((size_t)T * sizeof *pos);
  for (int t = 0; t < T; t++) pos[t] = (int32_t)(rnd() % (uint32_t)L);
  pos[0] = L - 1;
  if (T > 2) pos[1] = -1, pos[2] = bs - 1 < L ? bs - 1 : 0; /* padding; the end of block 0 */
  const int G = nkv, topk = 3;
  m3_msa_params mp = {topk, 1, 1};
  float *iq = random_row_values((size_t)T * G * ihd);
  int32_t *sel8 = malloc((size_t)T * G * topk * sizeof *sel8);
  int32_t *sel32 = malloc((size_t)T * G * topk * sizeof *sel32);
  be->ops->msa_select(be, iq, G, &f8.kv, pos, T, &mp, sel8);
  be->ops->msa_select(be, iq, G, &f32.kv, pos, T, &mp, sel32);
  CHECK(memcmp(sel8, sel32, (size_t)T * G * topk * sizeof *sel8) == 0);

  const size_t on = (size_t)T * nh * hd;
  float *q = random_row_values(on);
  float *o8 = malloc(on * sizeof(float)), *o32 = malloc(on * sizeof(float));
  be->ops->attention(be, q, nh, &f8.kv, pos, T, NULL, 0, o8);
  be->ops->attention(be, q, nh, &f32.kv, pos, T, NULL, 0, o32);
  CHECK_NEAR(max_rel_diff(o8, o32, on), 0.0, 1e-6);
  be->ops->attention(be, q, nh, &f8.kv, pos, T, sel32, topk, o8);
  be->ops->attention(be, q, nh, &f32.kv, pos, T, sel32, topk, o32);
  CHECK_NEAR(max_rel_diff(o8, o32, on), 0.0, 1e-6);
  /* The comparison is not empty: fp8 moves the output off the float32 values of the inputs. */
  cache raw = make_cache(be, M3_KV_F32, L, nkv, hd, ihd, bs, c.K, c.V, c.IK, table);
  be->ops->attention(be, q, nh, &raw.kv, pos, T, NULL, 0, o32);
  be->ops->attention(be, q, nh, &f8.kv, pos, T, NULL, 0, o8);
  CHECK(max_rel_diff(o8, o32, on) > 1e-4f);

  free(q), free(o8), free(o32), free(iq), free(sel8), free(sel32), free(pos);
  free(dK), free(dV), free(dIK), free(table);
  free(c.K), free(c.V), free(c.IK);
  free_cache(be, &f8), free_cache(be, &f32), free_cache(be, &raw);
}

/* A row holding NaN or infinity: scale NaN, bytes 0 (never the NaN code). */
static void test_nonfinite_rows(m3_backend *be) {
  const int nkv = 1, hd = 8, ihd = 4, bs = 2;
  float K[2 * 8], V[2 * 8], IK[2 * 4];
  for (int i = 0; i < 16; i++) K[i] = V[i] = 0.5f;
  for (int i = 0; i < 8; i++) IK[i] = 0.25f;
  K[3] = NAN, V[8 + 1] = INFINITY;
  int32_t table[2] = {1, 0};
  cache c = make_cache(be, M3_KV_FP8, 2, nkv, hd, ihd, bs, K, V, IK, table);
  CHECK(isnan(ref_scale_at(c.kv.k, 1, bs, hd, 0)));
  CHECK(isnan(ref_scale_at(c.kv.v, 1, bs, hd, 1)));
  /* K's second row, 0.5 everywhere, rotates into 8 * 0.5 at its first value and zeros */
  CHECK_NEAR(ref_scale_at(c.kv.k, 1, bs, hd, 1), 4.0f / 448.0f, 0);
  int nonzero = 0;
  for (int d = 0; d < hd; d++)
    nonzero += ref_bytes_at(c.kv.k, 1, bs, hd, 0)[d] != 0 ||
               ref_bytes_at(c.kv.v, 1, bs, hd, 1)[d] != 0;
  CHECK_EQ_INT(nonzero, 0);
  free_cache(be, &c);
}

/* m3_kv_rotate_key against the block-diagonal Sylvester-Hadamard matrix, H[i][j] =
 * (-1)^popcount(i & j) within each block of m3_kv_key_block(n) values, in double. */
static void test_key_rotation(void) {
  static const int dims[][2] = {{128, 128}, {24, 8}, {5, 1}, {12, 4}, {64, 64}, {48, 16}, {1024, 256}, {640, 128}};
  for (size_t c = 0; c < sizeof dims / sizeof dims[0]; c++) {
    const int n = dims[c][0], b = dims[c][1];
    CHECK_EQ_INT(m3_kv_key_block(n), b);
    float *x = random_row_values((size_t)n), *y = malloc((size_t)n * sizeof *y);
    memcpy(y, x, (size_t)n * sizeof *y);
    m3_kv_rotate_key(y, n);
    double err = 0;
    for (int i = 0; i < n; i++) {
      const int blk = i / b * b;
      double ref = 0;
      for (int j = 0; j < b; j++) {
        int odd = 0;
        for (unsigned bits = (unsigned)((i - blk) & j); bits; bits &= bits - 1) odd ^= 1;
        ref += (odd ? -1.0 : 1.0) * (double)x[blk + j];
      }
      err = fmax(err, fabs(ref - y[i]));
    }
    CHECK_NEAR(err, 0.0, 1e-5);
    free(x), free(y);
  }
}

/* The reference encoder itself against a few hand-worked values. */
static void test_reference(void) {
  CHECK_EQ_INT(ref_e4m3(448.0f), 0x7e);
  CHECK_EQ_INT(ref_e4m3(1000.0f), 0x7e);
  CHECK_EQ_INT(ref_e4m3(-448.0f), 0xfe);
  CHECK_EQ_INT(ref_e4m3(1.0f), 0x38);
  CHECK_EQ_INT(ref_e4m3(1.0625f), 0x38);      /* halfway 1 and 1.125: even code */
  CHECK_EQ_INT(ref_e4m3(1.1875f), 0x3a);      /* halfway 1.125 and 1.25: even code */
  CHECK_EQ_INT(ref_e4m3(ldexpf(1, -9)), 0x01); /* smallest subnormal */
  CHECK_EQ_INT(ref_e4m3(ldexpf(1, -10)), 0x00); /* halfway 0 and it: even (zero) */
}

int main(void) {
  test_reference();
  test_key_rotation();
  m3_backend *be = NULL;
  CHECK_OK(m3_backend_cpu_create(2, &be));
  if (!be) return check_summary();
  CHECK_EQ_INT(be->ops->kv_fp8, 1);
  /* L nh nkv hd ihd bs T */
  shape_case(be, 53, 4, 2, 24, 16, 8, 9);
  shape_case(be, 130, 8, 1, 64, 32, 16, 5);
  shape_case(be, 9, 2, 2, 5, 3, 3, 4); /* pages that need padding: 6 rows of 5, 3 rows of 3 */
  shape_case(be, 40, 4, 4, 128, 128, 4, 1);
  test_nonfinite_rows(be);
  be->ops->destroy(be);
  return check_summary();
}
