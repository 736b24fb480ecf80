/* Every op of the CPU backend against a naive double-precision reference written here, on random
 * inputs, for every kernel set this CPU can run (portable, AVX2, AVX-512). Outputs are filled with
 * NaN before each call so an element the op forgets to write fails the comparison. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu.h"
#include "base/dtype.h"
#include "base/threadpool.h"
#include "check.h"
#include "random.h"

/* ---- random inputs ---- */



static float *random_floats(size_t n, float lo, float hi) {
  float *v = malloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) v[i] = uniform(lo, hi);
  return v;
}

/* Multiples of 1/8 in [-1, 1]: dot products of a few of them are exact in float32, so scores
 * tie exactly where the reference says they tie. */
static float *random_eighths(size_t n) {
  float *v = malloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) v[i] = (float)((int)(rnd() % 17) - 8) / 8.0f;
  return v;
}

static void poison(float *v, size_t n) {
  for (size_t i = 0; i < n; i++) v[i] = NAN;
}

/* ---- independent decoders for the reference ---- */

static double ref_e4m3(uint8_t b) {
  int e = (b >> 3) & 15, m = b & 7;
  if (e == 15 && m == 7) return NAN;
  double v = e == 0 ? ldexp(m, -9) : ldexp(8 + m, e - 10);
  return (b & 0x80) ? -v : v;
}

static double ref_f16(uint16_t h) {
  int e = (h >> 10) & 31, m = h & 1023;
  double v = e == 0 ? ldexp(m, -24) : ldexp(1024 + m, e - 25);
  return (h & 0x8000) ? -v : v;
}

static double ref_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* ---- weights of every dtype with their exact values in double ---- */

typedef struct {
  m3_tensor t;
  void *data, *scale;
  double *ref; /* [rows * cols] */
} test_weight;

enum { W_F32, W_F16, W_BF16, W_MXFP8, W_FP8_BLOCK, W_KINDS };
static const char *const kind_name[W_KINDS] = {"F32", "F16", "BF16", "MXFP8", "FP8 block"};

/* A random e4m3 byte that is not NaN. */
static uint8_t random_e4m3(void) {
  uint8_t b;
  do b = (uint8_t)rnd(); while ((b & 0x7f) == 0x7f);
  return b;
}

static test_weight make_weight(int kind, int64_t rows, int64_t cols, int block_rows,
                               int block_cols) {
  test_weight w = {0};
  size_t n = (size_t)rows * (size_t)cols;
  w.ref = malloc(n * sizeof(double));
  w.t.rows = rows;
  w.t.cols = cols;
  w.t.name = "test";
  switch (kind) {
    case W_F32: {
      float *d = random_floats(n, -1, 1);
      for (size_t i = 0; i < n; i++) w.ref[i] = d[i];
      w.data = d;
      w.t.dtype = M3_DT_F32;
      break;
    }
    case W_F16:
    case W_BF16: {
      uint16_t *d = malloc(n * 2);
      for (size_t i = 0; i < n; i++) {
        float f = uniform(-1, 1);
        d[i] = kind == W_F16 ? m3_f32_to_f16(f) : m3_f32_to_bf16(f);
        w.ref[i] = kind == W_F16 ? ref_f16(d[i]) : ref_bf16(d[i]);
      }
      /* F16 subnormals and a few exact powers of two exercise the conversion edges. */
      if (kind == W_F16 && n > 3) d[0] = 0x0001, d[1] = 0x83ff, d[2] = 0x7bff;
      if (kind == W_F16 && n > 3)
        for (int i = 0; i < 3; i++) w.ref[i] = ref_f16(d[i]);
      w.data = d;
      w.t.dtype = kind == W_F16 ? M3_DT_F16 : M3_DT_BF16;
      break;
    }
    case W_MXFP8:
    case W_FP8_BLOCK: {
      uint8_t *d = malloc(n);
      for (size_t i = 0; i < n; i++) d[i] = random_e4m3();
      w.data = d;
      w.t.dtype = M3_DT_F8_E4M3;
      if (kind == W_MXFP8) {
        w.t.quant = M3_WQ_MXFP8;
        w.t.block_rows = 1;
        w.t.block_cols = 32;
      } else {
        w.t.quant = M3_WQ_FP8_BLOCK;
        w.t.block_rows = block_rows;
        w.t.block_cols = block_cols;
      }
      w.t.scale_rows = (rows + w.t.block_rows - 1) / w.t.block_rows;
      w.t.scale_cols = (cols + w.t.block_cols - 1) / w.t.block_cols;
      size_t ns = (size_t)(w.t.scale_rows * w.t.scale_cols);
      if (kind == W_MXFP8) {
        uint8_t *s = malloc(ns);
        for (size_t i = 0; i < ns; i++) s[i] = (uint8_t)(114 + rnd() % 12);
        w.scale = s;
      } else {
        float *s = random_floats(ns, 0.0005f, 0.01f);
        w.scale = s;
      }
      for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
          size_t si = (size_t)(r / w.t.block_rows * w.t.scale_cols + c / w.t.block_cols);
          double scale = kind == W_MXFP8 ? ldexp(1.0, ((uint8_t *)w.scale)[si] - 127)
                                         : (double)((float *)w.scale)[si];
          /* The engine multiplies in float32, as the reference dequantization does. */
          w.ref[r * cols + c] = (double)((float)ref_e4m3(d[r * cols + c]) * (float)scale);
        }
      break;
    }
  }
  w.t.data = w.data;
  w.t.scale = w.scale;
  return w;
}

static void free_weight(test_weight *w) {
  free(w->data);
  free(w->scale);
  free(w->ref);
}

/* ---- the backends under test ---- */

static m3_backend *backends[M3_CPU_ISA_COUNT];
static int isa_under_test;

/* ---- matmul and embed ---- */

/* |y - ref| within 2e-6 of sum |x w|: float32 accumulation over K terms in any order. */
static int matmul_case(m3_backend *be, int kind, int64_t rows, int64_t cols, int T, int br,
                       int bc, float **out_y) {
  test_weight w = make_weight(kind, rows, cols, br, bc);
  float *x = random_floats((size_t)T * cols, -1, 1);
  float *y = malloc((size_t)T * rows * sizeof(float));
  poison(y, (size_t)T * rows);
  be->ops->matmul(be, &w.t, x, T, y);
  int bad = 0;
  for (int t = 0; t < T; t++)
    for (int64_t r = 0; r < rows; r++) {
      double ref = 0, mag = 0;
      for (int64_t c = 0; c < cols; c++) {
        ref += (double)x[t * cols + c] * w.ref[r * cols + c];
        mag += fabs((double)x[t * cols + c] * w.ref[r * cols + c]);
      }
      double got = y[t * rows + r];
      if (!(fabs(got - ref) <= 2e-6 * mag + 1e-30)) {
        if (bad++ < 3)
          fprintf(stderr, "  matmul %s %s %lldx%lld T=%d: y[%d][%lld] = %.9g, reference %.9g\n",
                  m3_cpu_isa_name(isa_under_test), kind_name[kind], (long long)rows,
                  (long long)cols, T, t, (long long)r, got, ref);
      }
    }
  free_weight(&w);
  free(x);
  if (out_y)
    *out_y = y;
  else
    free(y);
  return bad;
}

static void test_matmul(m3_backend *be) {
  static const int64_t plain_shapes[][2] = {{37, 61}, {64, 320}, {33, 1000}, {5, 7}};
  static const int64_t mx_shapes[][2] = {{37, 96}, {40, 288}, {66, 544}, {9, 80}};
  static const int Ts[] = {1, 3, 17};
  for (int kind = 0; kind < W_KINDS; kind++)
    for (int s = 0; s < 4; s++)
      for (int ti = 0; ti < 3; ti++) {
        const int64_t *shape = kind >= W_MXFP8 ? mx_shapes[s] : plain_shapes[s];
        CHECK_EQ_INT(matmul_case(be, kind, shape[0], shape[1], Ts[ti], 128, 128, NULL), 0);
      }
  /* FP8 blocks smaller than the matrix, and blocks of 48 columns that the SIMD decoders do not
   * take (the portable kernels handle them). */
  CHECK_EQ_INT(matmul_case(be, W_FP8_BLOCK, 150, 300, 3, 64, 64, NULL), 0);
  CHECK_EQ_INT(matmul_case(be, W_FP8_BLOCK, 150, 300, 1, 32, 32, NULL), 0);
  CHECK_EQ_INT(matmul_case(be, W_FP8_BLOCK, 70, 200, 17, 16, 48, NULL), 0);
  CHECK_EQ_INT(matmul_case(be, W_FP8_BLOCK, 70, 200, 1, 16, 48, NULL), 0);
  /* Many tokens: several token blocks of the tiled path. */
  CHECK_EQ_INT(matmul_case(be, W_BF16, 96, 512, 64, 0, 0, NULL), 0);
}

/* Batch invariance: each token's output has the same bits whether it runs alone (GEMV) or among
 * others (tiled GEMM), so decoding token by token reproduces a prefill exactly. */
static void test_matmul_batch_invariant(m3_backend *be) {
  static const int64_t shapes[][2] = {{37, 600}, {40, 608}, {9, 80}, {70, 1000}};
  for (int kind = 0; kind < W_KINDS; kind++)
    for (int s = 0; s < 4; s++) {
      int64_t rows = shapes[s][0], cols = shapes[s][1];
      test_weight w = make_weight(kind, rows, cols, 128, 128);
      const int T = 6;
      float *x = random_floats((size_t)T * cols, -1, 1);
      float *all = malloc((size_t)T * rows * sizeof(float)), *one = malloc((size_t)T * rows * sizeof(float));
      be->ops->matmul(be, &w.t, x, T, all);
      for (int t = 0; t < T; t++) be->ops->matmul(be, &w.t, x + t * cols, 1, one + t * rows);
      CHECK(memcmp(all, one, (size_t)T * rows * sizeof(float)) == 0);
      free(x), free(all), free(one);
      free_weight(&w);
    }
}

/* An E4M3 NaN byte (0x7F) must make its row's dot product NaN and leave other rows finite. */
static void test_matmul_e4m3_nan(m3_backend *be) {
  for (int T = 1; T <= 2; T++) {
    test_weight w = make_weight(W_MXFP8, 8, 64, 1, 32);
    ((uint8_t *)w.data)[2 * 64 + 5] = 0x7f;
    ((uint8_t *)w.data)[6 * 64 + 40] = 0xff;
    float x[128], y[16];
    for (int i = 0; i < 128; i++) x[i] = 0.5f;
    poison(y, 16);
    be->ops->matmul(be, &w.t, x, T, y);
    for (int t = 0; t < T; t++)
      for (int r = 0; r < 8; r++) CHECK((r == 2 || r == 6) == (isnan(y[t * 8 + r]) != 0));
    free_weight(&w);
  }
}

static void test_embed(m3_backend *be) {
  for (int kind = 0; kind < W_KINDS; kind++) {
    test_weight w = make_weight(kind, 50, 96, 16, 32);
    int32_t ids[5] = {3, 49, 0, 3, 17};
    float out[5 * 96];
    poison(out, 5 * 96);
    be->ops->embed(be, &w.t, ids, 5, out);
    int bad = 0;
    for (int t = 0; t < 5; t++)
      for (int c = 0; c < 96; c++) bad += out[t * 96 + c] != (float)w.ref[ids[t] * 96 + c];
    CHECK_EQ_INT(bad, 0);
    free_weight(&w);
  }
}

/* Every kernel set gives the portable set's result to float32 rounding. */
static void test_matmul_across_isas(void) {
  for (int kind = 0; kind < W_KINDS; kind++)
    for (int T = 1; T <= 17; T += 16) {
      float *y[M3_CPU_ISA_COUNT] = {0};
      uint64_t seed = test_rng_state;
      for (int isa = 0; isa < M3_CPU_ISA_COUNT; isa++) {
        if (!backends[isa]) continue;
        test_rng_state = seed;
        isa_under_test = isa;
        matmul_case(backends[isa], kind, 45, 352, T, 128, 128, &y[isa]);
      }
      for (int isa = 1; isa < M3_CPU_ISA_COUNT; isa++) {
        if (!y[isa]) continue;
        /* Differences relative to the output's scale (single outputs may cancel to near 0). */
        double worst = 0, scale = 0;
        for (int i = 0; i < 45 * T; i++) scale = fmax(scale, fabs(y[0][i]));
        for (int i = 0; i < 45 * T; i++) worst = fmax(worst, fabs(y[isa][i] - y[0][i]) / scale);
        if (!(worst < 1e-5)) fprintf(stderr, "  %s vs portable, %s T=%d: relative difference %g\n",
                                     m3_cpu_isa_name(isa), kind_name[kind], T, worst);
        CHECK(worst < 1e-5);
      }
      for (int isa = 0; isa < M3_CPU_ISA_COUNT; isa++) free(y[isa]);
    }
}

/* ---- norms, rope, elementwise ---- */

/* zero clears exactly the bytes it is given (the split lm_head zeroes the other ranks' parts). */
static void test_zero(m3_backend *be) {
  enum { N = 100 };
  float *buf = be->ops->alloc(be, N * sizeof(float));
  CHECK(buf != NULL);
  if (!buf) return;
  for (int i = 0; i < N; i++) buf[i] = (float)(i + 1);
  CHECK_OK(be->ops->zero(be, buf + 3, 50 * sizeof(float)));
  CHECK_OK(be->ops->zero(be, buf + 90, 0));
  for (int i = 0; i < N; i++) CHECK(buf[i] == (i >= 3 && i < 53 ? 0.0f : (float)(i + 1)));
  be->ops->free(be, buf);
}

/* argmax_pairs against its definition, written here as a maximum: the entry of the largest score
 * (NaN as -inf, but +inf at whole-row index 0), the lowest index among equals; its score and
 * whole-row index. Ragged widths, slices at offset 0 and beyond, rows of ties, NaN (at a slice's
 * start too), infinities, -0 against +0. */
static void test_argmax_pairs(m3_backend *be) {
  static const int shapes[][3] = {{5, 1, 0}, {7, 33, 0}, {7, 33, 33}, {3, 1000, 0}, {9, 257, 514},
                                  {2, 4099, 100000}};
  for (int c = 0; c < 6; c++) {
    const int rows = shapes[c][0], cols = shapes[c][1], first = shapes[c][2];
    float *l = random_floats((size_t)rows * cols, -4, 4), pairs[2 * 9];
    for (int r = 0; r < rows; r++)
      for (int i = 0; i < cols; i++) {
        float *v = &l[(size_t)r * cols + i];
        const uint32_t u = rnd() % 100;
        if (r % 4 == 1) *v = (float)((int)(rnd() % 3) - 1); /* ties */
        if (r % 4 == 2) *v = u < 30 ? NAN : u < 40 ? -INFINITY : u < 45 ? INFINITY : *v;
        if (r % 4 == 3) *v = i == 0 ? NAN : u < 50 ? -0.0f : 0.0f;
      }
    be->ops->argmax_pairs(be, l, rows, cols, first, pairs);
    for (int r = 0; r < rows; r++) {
      const float *x = l + (size_t)r * cols;
      int best = 0;
      float top = -INFINITY;
      for (int i = 0; i < cols; i++) {
        const float s = isnan(x[i]) ? (first + i == 0 ? INFINITY : -INFINITY) : x[i];
        if (i == 0 || s > top) {
          top = s;
          best = i;
        }
      }
      CHECK(pairs[2 * r] == top);
      CHECK(pairs[2 * r + 1] == (float)(first + best));
    }
    free(l);
  }
}

static void test_rmsnorm(m3_backend *be) {
  static const int shapes[][2] = {{5, 128}, {3, 1000}, {2, 6144}, {40, 24}};
  for (int s = 0; s < 4; s++)
    for (int kind = W_F32; kind <= W_BF16; kind++) {
      int nrows = shapes[s][0], n = shapes[s][1];
      test_weight w = make_weight(kind, 1, n, 0, 0);
      float *x = random_floats((size_t)nrows * n, -3, 3);
      float *y = malloc((size_t)nrows * n * sizeof(float));
      float *inplace = malloc((size_t)nrows * n * sizeof(float));
      memcpy(inplace, x, (size_t)nrows * n * sizeof(float));
      poison(y, (size_t)nrows * n);
      be->ops->rmsnorm(be, x, &w.t, 1e-6f, nrows, n, y);
      be->ops->rmsnorm(be, inplace, &w.t, 1e-6f, nrows, n, inplace);
      int bad = 0;
      for (int r = 0; r < nrows; r++) {
        double ss = 0;
        for (int i = 0; i < n; i++) ss += (double)x[r * n + i] * x[r * n + i];
        double inv = 1.0 / sqrt(ss / n + 1e-6);
        for (int i = 0; i < n; i++) {
          double ref = x[r * n + i] * inv * (1.0 + w.ref[i]);
          bad += !(fabs(y[r * n + i] - ref) <= 1e-5 * fabs(ref) + 1e-6);
          bad += inplace[r * n + i] != y[r * n + i];
        }
      }
      CHECK_EQ_INT(bad, 0);
      free_weight(&w);
      free(x);
      free(y);
      free(inplace);
    }
}

/* The angle is float32 (float(pos) * inv_freq, inv_freq from float32 pow): at position 300000 a
 * double-precision angle differs by ~1e-2 rad, which this reference would catch. */
static void test_rope(m3_backend *be) {
  static const int cfg[][3] = {{4, 16, 8}, {3, 128, 64}, {2, 32, 32}}; /* nheads, hd, rot */
  const int32_t pos[3] = {0, 17, 300001};
  const double theta = 5e6;
  for (int c = 0; c < 3; c++) {
    int nheads = cfg[c][0], hd = cfg[c][1], rot = cfg[c][2], half = rot / 2;
    size_t n = (size_t)3 * nheads * hd;
    float *x = random_floats(n, -2, 2);
    float *y = malloc(n * sizeof(float));
    memcpy(y, x, n * sizeof(float));
    be->ops->rope(be, y, pos, 3, nheads, hd, rot, theta);
    int bad = 0;
    for (int t = 0; t < 3; t++)
      for (int h = 0; h < nheads; h++) {
        const float *xv = x + ((size_t)t * nheads + h) * hd;
        const float *yv = y + ((size_t)t * nheads + h) * hd;
        for (int i = 0; i < half; i++) {
          float inv = 1.0f / powf((float)theta, (float)(2 * i) / (float)rot);
          double angle = (float)pos[t] * inv;
          double r0 = xv[i] * cos(angle) - xv[i + half] * sin(angle);
          double r1 = xv[i + half] * cos(angle) + xv[i] * sin(angle);
          bad += !(fabs(yv[i] - r0) <= 2e-6 * (fabs(xv[i]) + fabs(xv[i + half])));
          bad += !(fabs(yv[i + half] - r1) <= 2e-6 * (fabs(xv[i]) + fabs(xv[i + half])));
        }
        for (int i = rot; i < hd; i++) bad += yv[i] != xv[i];
      }
    CHECK_EQ_INT(bad, 0);
    free(x);
    free(y);
  }
}

static void test_elementwise(m3_backend *be) {
  const size_t n = 70001; /* past the parallel threshold, odd */
  float *gate = random_floats(n, -12, 12), *up = random_floats(n, -12, 12);
  float *out = malloc(n * sizeof(float)), *alias = malloc(n * sizeof(float));
  memcpy(alias, gate, n * sizeof(float));
  poison(out, n);
  be->ops->swiglu_oai(be, gate, up, n, 1.702f, 1.0f, 7.0f, out);
  be->ops->swiglu_oai(be, alias, up, n, 1.702f, 1.0f, 7.0f, alias);
  int bad = 0;
  for (size_t i = 0; i < n; i++) {
    double g = fmin(gate[i], 7.0), u = fmax(fmin(up[i], 7.0), -7.0);
    double ref = g / (1.0 + exp(-1.702 * g)) * (u + 1.0);
    bad += !(fabs(out[i] - ref) <= 1e-5 * fabs(ref) + 1e-6);
    bad += alias[i] != out[i];
  }
  CHECK_EQ_INT(bad, 0);

  float *x = random_floats(n, -1, 1), *x0 = malloc(n * sizeof(float));
  memcpy(x0, x, n * sizeof(float));
  be->ops->add(be, x, up, n);
  bad = 0;
  for (size_t i = 0; i < n; i++) bad += x[i] != x0[i] + up[i];
  CHECK_EQ_INT(bad, 0);
  free(gate), free(up), free(out), free(alias), free(x), free(x0);
}

/* ---- paged cache, MSA selection, attention ---- */

typedef struct {
  int L, nkv, hd, ihd, bs;
  float *K, *V, *IK; /* logical [L, nkv, hd], [L, nkv, hd], [L, ihd] */
  m3_kv_view kv;
  int32_t *table;
} test_cache;

/* A cache of L tokens with pages in shuffled order, filled through kv_store in uneven chunks. */
static test_cache make_cache(m3_backend *be, int L, int nkv, int hd, int ihd, int bs, int eighths) {
  test_cache c = {L, nkv, hd, ihd, bs, NULL, NULL, NULL, {0}, NULL};
  c.K = eighths ? random_eighths((size_t)L * nkv * hd) : random_floats((size_t)L * nkv * hd, -1, 1);
  c.V = random_floats((size_t)L * nkv * hd, -1, 1);
  c.IK = eighths ? random_eighths((size_t)L * ihd) : random_floats((size_t)L * ihd, -1, 1);
  int nb = (L + bs - 1) / bs + 1; /* one spare page */
  c.table = malloc((size_t)nb * sizeof(int32_t));
  for (int i = 0; i < nb; i++) c.table[i] = i;
  for (int i = nb - 1; i > 0; i--) {
    int j = (int)(rnd() % (uint32_t)(i + 1)), tmp = c.table[i];
    c.table[i] = c.table[j];
    c.table[j] = tmp;
  }
  c.kv = (m3_kv_view){be->ops->alloc(be, (size_t)nb * nkv * bs * hd * sizeof(float)),
                      be->ops->alloc(be, (size_t)nb * nkv * bs * hd * sizeof(float)),
                      be->ops->alloc(be, (size_t)nb * bs * ihd * sizeof(float)),
                      c.table, nb, bs, nkv, hd, ihd, M3_KV_F32};
  int32_t *pos = malloc((size_t)L * sizeof(int32_t));
  for (int i = 0; i < L; i++) pos[i] = i;
  for (int t0 = 0; t0 < L;) {
    int n = 1 + (int)(rnd() % 23);
    if (n > L - t0) n = L - t0;
    be->ops->kv_store(be, &c.kv, pos + t0, n, c.K + (size_t)t0 * nkv * hd,
                      c.V + (size_t)t0 * nkv * hd, c.IK + (size_t)t0 * ihd);
    t0 += n;
  }
  free(pos);
  return c;
}

static void free_cache(m3_backend *be, test_cache *c) {
  be->ops->free(be, c->kv.k);
  be->ops->free(be, c->kv.v);
  be->ops->free(be, c->kv.ik);
  free(c->K), free(c->V), free(c->IK), free(c->table);
}

/* The cache pages hold exactly what was stored, where the layout comment says. */
static void test_kv_store(m3_backend *be) {
  test_cache c = make_cache(be, 53, 2, 24, 16, 8, 0);
  int bad = 0;
  for (int j = 0; j < c.L; j++) {
    size_t page = (size_t)c.table[j / c.bs], s = (size_t)(j % c.bs);
    for (int h = 0; h < c.nkv; h++)
      for (int d = 0; d < c.hd; d++) {
        size_t at = ((page * c.nkv + h) * c.bs + s) * c.hd + d;
        bad += ((float *)c.kv.k)[at] != c.K[((size_t)j * c.nkv + h) * c.hd + d];
        bad += ((float *)c.kv.v)[at] != c.V[((size_t)j * c.nkv + h) * c.hd + d];
      }
    for (int d = 0; d < c.ihd; d++)
      bad += ((float *)c.kv.ik)[(page * c.bs + s) * c.ihd + d] != c.IK[(size_t)j * c.ihd + d];
  }
  CHECK_EQ_INT(bad, 0);
  free_cache(be, &c);
}

/* Reference selection: rank all visible blocks by (forced, score desc, id asc), keep topk, and
 * list them ascending. */
static void ref_select(const test_cache *c, const float *iq, int32_t p, const m3_msa_params *mp,
                       int32_t *out) {
  for (int i = 0; i < mp->topk; i++) out[i] = -1;
  if (p < 0) return;
  int nb = p / c->bs + 1;
  double *key = malloc((size_t)nb * sizeof(double));
  char *taken = calloc((size_t)nb, 1);
  for (int b = 0; b < nb; b++) {
    double best = -INFINITY;
    for (int j = b * c->bs; j < (b + 1) * c->bs && j <= p; j++) {
      double d = 0;
      for (int i = 0; i < c->ihd; i++) d += (double)iq[i] * c->IK[(size_t)j * c->ihd + i];
      best = fmax(best, d);
    }
    int forced = b < mp->init_blocks || b >= nb - mp->local_blocks;
    key[b] = forced ? INFINITY : best;
  }
  int n = nb < mp->topk ? nb : mp->topk;
  for (int i = 0; i < n; i++) {
    int pick = -1;
    for (int b = 0; b < nb; b++)
      if (!taken[b] && (pick < 0 || key[b] > key[pick])) pick = b;
    taken[pick] = 1;
  }
  int k = 0;
  for (int b = 0; b < nb; b++)
    if (taken[b]) out[k++] = b;
  free(key);
  free(taken);
}

static void test_msa_select(m3_backend *be) {
  static const int params[][3] = {{4, 1, 0}, {4, 2, 1}, {5, 1, 1}, {3, 2, 0}}; /* topk, local, init */
  const int G = 2, ihd = 24, bs = 8, L = 150;
  test_cache c = make_cache(be, L, G, 16, ihd, bs, 1);
  static const int Ts[] = {1, 3, 17};
  for (int pi = 0; pi < 4; pi++)
    for (int ti = 0; ti < 3; ti++) {
      m3_msa_params mp = {params[pi][0], params[pi][1], params[pi][2]};
      int T = Ts[ti];
      int32_t pos[17];
      for (int t = 0; t < T; t++) pos[t] = (int32_t)(rnd() % L);
      pos[0] = L - 1;
      if (T > 2) pos[1] = 5, pos[2] = -1; /* a short context (-1 padding) and a padding row */
      float *iq = random_eighths((size_t)T * G * ihd);
      int32_t sel[17 * 2 * 5], want[5];
      for (int i = 0; i < T * G * mp.topk; i++) sel[i] = 12345;
      be->ops->msa_select(be, iq, G, &c.kv, pos, T, &mp, sel);
      int bad = 0;
      for (int t = 0; t < T; t++)
        for (int g = 0; g < G; g++) {
          ref_select(&c, iq + ((size_t)t * G + g) * ihd, pos[t], &mp, want);
          for (int i = 0; i < mp.topk; i++) bad += sel[(t * G + g) * mp.topk + i] != want[i];
        }
      CHECK_EQ_INT(bad, 0);
      free(iq);
    }
  free_cache(be, &c);
}

/* Equal block scores everywhere: the lower block ids win. Constant index keys make every dot
 * product equal. */
static void test_msa_ties(m3_backend *be) {
  const int ihd = 16, bs = 4, L = 40;
  test_cache c = make_cache(be, L, 1, 8, ihd, bs, 1);
  for (int j = 0; j < L; j++) {
    size_t page = (size_t)c.table[j / bs];
    for (int i = 0; i < ihd; i++) ((float *)c.kv.ik)[(page * bs + j % bs) * ihd + i] = 0.25f;
  }
  float iq[16];
  for (int i = 0; i < ihd; i++) iq[i] = (float)(i % 3) - 1.0f;
  m3_msa_params mp = {4, 1, 0};
  int32_t pos = L - 1, sel[4];
  be->ops->msa_select(be, iq, 1, &c.kv, &pos, 1, &mp, sel);
  CHECK_EQ_INT(sel[0], 0);
  CHECK_EQ_INT(sel[1], 1);
  CHECK_EQ_INT(sel[2], 2);
  CHECK_EQ_INT(sel[3], 9); /* the local block */
  mp = (m3_msa_params){4, 2, 1};
  be->ops->msa_select(be, iq, 1, &c.kv, &pos, 1, &mp, sel);
  CHECK_EQ_INT(sel[0], 0);
  CHECK_EQ_INT(sel[1], 1);
  CHECK_EQ_INT(sel[2], 8);
  CHECK_EQ_INT(sel[3], 9);
  free_cache(be, &c);
}

/* Reference attention of one query head: softmax over keys j <= p in the allowed blocks. */
static void ref_attention(const test_cache *c, const float *q, int kvh, int32_t p,
                          const int32_t *blocks, int nblocks, double *out) {
  for (int d = 0; d < c->hd; d++) out[d] = 0;
  if (p < 0) return;
  double *w = malloc((size_t)(p + 1) * sizeof(double));
  double mx = -INFINITY, sum = 0;
  for (int j = 0; j <= p; j++) {
    int allowed = !blocks;
    for (int i = 0; blocks && i < nblocks && blocks[i] >= 0; i++) allowed |= blocks[i] == j / c->bs;
    w[j] = -INFINITY;
    if (!allowed) continue;
    double s = 0;
    for (int d = 0; d < c->hd; d++) s += (double)q[d] * c->K[((size_t)j * c->nkv + kvh) * c->hd + d];
    w[j] = s / sqrt((double)c->hd);
    mx = fmax(mx, w[j]);
  }
  for (int j = 0; j <= p; j++) sum += w[j] = exp(w[j] - mx);
  for (int j = 0; j <= p; j++)
    for (int d = 0; d < c->hd; d++) out[d] += w[j] / sum * c->V[((size_t)j * c->nkv + kvh) * c->hd + d];
  free(w);
}

static void attention_case(m3_backend *be, int nh, int nkv, int hd, int bs, int L, int T,
                           int sparse) {
  test_cache c = make_cache(be, L, nkv, hd, 16, bs, 0);
  int32_t pos[17];
  for (int t = 0; t < T; t++) pos[t] = L - T + t; /* the newest T tokens, as in prefill/decode */
  if (T > 2) pos[1] = 3, pos[2] = -1;
  float *q = random_floats((size_t)T * nh * hd, -1, 1);
  float *out = malloc((size_t)T * nh * hd * sizeof(float));
  const int topk = 3;
  int32_t *sel = NULL;
  if (sparse) { /* random block lists, -1 terminated, local block always present */
    sel = malloc((size_t)T * nkv * topk * sizeof(int32_t));
    for (int t = 0; t < T; t++)
      for (int g = 0; g < nkv; g++) {
        int32_t *s = sel + ((size_t)t * nkv + g) * topk;
        for (int i = 0; i < topk; i++) s[i] = -1;
        if (pos[t] < 0) continue;
        int nb = pos[t] / bs + 1, n = 0;
        s[n++] = nb - 1;
        for (int b = 0; b < nb - 1 && n < topk; b++)
          if (rnd() % 2) s[n++] = b;
      }
  }
  poison(out, (size_t)T * nh * hd);
  be->ops->attention(be, q, nh, &c.kv, pos, T, sel, topk, out);
  double *ref = malloc((size_t)hd * sizeof(double));
  int bad = 0;
  for (int t = 0; t < T; t++)
    for (int h = 0; h < nh; h++) {
      int kvh = h / (nh / nkv);
      ref_attention(&c, q + ((size_t)t * nh + h) * hd, kvh, pos[t],
                    sel ? sel + ((size_t)t * nkv + kvh) * topk : NULL, topk, ref);
      for (int d = 0; d < hd; d++)
        bad += !(fabs(out[((size_t)t * nh + h) * hd + d] - ref[d]) <= 1e-5);
    }
  CHECK_EQ_INT(bad, 0);
  free(ref), free(q), free(out), free(sel);
  free_cache(be, &c);
}

static void test_attention(m3_backend *be) {
  static const int Ts[] = {1, 3, 17};
  for (int ti = 0; ti < 3; ti++) {
    attention_case(be, 6, 2, 40, 16, 70, Ts[ti], 0);
    attention_case(be, 8, 2, 32, 8, 61, Ts[ti], 1);
    attention_case(be, 4, 4, 128, 16, 100, Ts[ti], 1);
  }
}

static void test_moe_route(m3_backend *be) {
  const int T = 3, E = 16, k = 4;
  float *logits = random_floats((size_t)T * E, -4, 4), *bias = random_floats(E, -0.3f, 0.3f);
  /* Token 2: equal choices for experts 3, 5, 9, 12, 14: the lower ids win. */
  for (int e = 0; e < E; e++) logits[2 * E + e] = -5.0f;
  for (int e = 0; e < E; e++) bias[e] = 0;
  logits[2 * E + 14] = logits[2 * E + 9] = logits[2 * E + 3] = logits[2 * E + 12] =
      logits[2 * E + 5] = 1.0f;
  for (int pass = 0; pass < 2; pass++) {
    const float *b = pass ? bias : NULL;
    if (pass)
      for (int e = 0; e < E; e++) bias[e] = uniform(-0.3f, 0.3f);
    int32_t ids[12];
    float wts[12];
    poison(wts, 12);
    be->ops->moe_route(be, logits, b, T, E, k, 2.0f, ids, wts);
    for (int t = 0; t < T; t++) {
      double s[16], choice[16];
      for (int e = 0; e < E; e++) {
        s[e] = 1.0 / (1.0 + exp(-(double)logits[t * E + e]));
        choice[e] = s[e] + (b ? b[e] : 0);
      }
      char used[16] = {0};
      double sum = 0;
      int want[4];
      for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++)
          if (!used[e] && (best < 0 || choice[e] > choice[best] + 1e-9)) best = e;
        used[best] = 1;
        want[j] = best;
        sum += s[best];
      }
      for (int j = 0; j < k; j++) {
        CHECK_EQ_INT(ids[t * k + j], want[j]);
        CHECK_NEAR(wts[t * k + j], s[want[j]] / sum * 2.0, 1e-6);
      }
    }
  }
  free(logits), free(bias);
}

/* ---- the thread pool ---- */

typedef struct {
  int *hits;
} count_job;

static void count_range(void *ctx, int64_t b, int64_t e, int worker) {
  count_job *job = ctx;
  (void)worker;
  for (int64_t i = b; i < e; i++) __atomic_fetch_add(&job->hits[i], 1, __ATOMIC_RELAXED);
}

static void test_threadpool(void) {
  m3_threadpool *pool;
  CHECK_OK(m3_threadpool_create(3, &pool));
  CHECK_EQ_INT(m3_threadpool_size(pool), 3);
  int hits[1000];
  static const int64_t chunks[] = {0, 1, 7, 5000};
  for (int round = 0; round < 50; round++) {
    memset(hits, 0, sizeof hits);
    count_job job = {hits};
    m3_parallel_for(pool, 1000, chunks[round % 4], count_range, &job);
    int bad = 0;
    for (int i = 0; i < 1000; i++) bad += hits[i] != 1;
    CHECK_EQ_INT(bad, 0);
  }
  m3_threadpool_destroy(pool);
}

int main(void) {
  test_threadpool();
  for (int isa = 0; isa < M3_CPU_ISA_COUNT; isa++) {
    if (!m3_cpu_isa_supported(isa)) {
      printf("skipping %s kernels: not supported here\n", m3_cpu_isa_name(isa));
      continue;
    }
    CHECK_OK(m3_backend_cpu_create_isa(2, isa, &backends[isa]));
    m3_backend *be = backends[isa];
    if (!be) continue;
    isa_under_test = isa;
    CHECK_EQ_INT(m3_backend_cpu_isa(be), isa);
    test_matmul(be);
    test_matmul_e4m3_nan(be);
    test_matmul_batch_invariant(be);
    test_embed(be);
    test_zero(be);
    test_argmax_pairs(be);
    test_rmsnorm(be);
    test_rope(be);
    test_elementwise(be);
    test_kv_store(be);
    test_msa_select(be);
    test_msa_ties(be);
    test_attention(be);
    test_moe_route(be);
  }
  test_matmul_across_isas();
  /* A single-thread backend runs the same code without the pool. */
  m3_backend *one;
  CHECK_OK(m3_backend_cpu_create(1, &one));
  CHECK_EQ_INT(matmul_case(one, W_MXFP8, 40, 288, 17, 0, 0, NULL), 0);
  one->ops->destroy(one);
  for (int isa = 0; isa < M3_CPU_ISA_COUNT; isa++)
    if (backends[isa]) backends[isa]->ops->destroy(backends[isa]);
  return check_summary();
}
