/* The fused residual add + Gemma RMSNorm (add_rmsnorm) of the CPU backend, for every kernel set
 * this CPU can run: bit for bit the two ops it replaces (add, then rmsnorm of the new rows), which
 * the model's forward relied on before the fusion, and within rounding of a double-precision
 * reference written here. Shapes: widths that are not a multiple of the SIMD lanes, M3's hidden
 * width (6144), and enough rows to cross the thread pool's threshold; weights in F32, BF16, F16. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu.h"
#include "base/dtype.h"
#include "check.h"
#include "random.h"

static float *random_floats(size_t n, float lo, float hi) {
  float *v = malloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) v[i] = uniform(lo, hi);
  return v;
}

enum { W_F32, W_BF16, W_F16, W_KINDS };

/* A norm weight [n] of `kind` and its exact values in float. */
typedef struct {
  m3_tensor t;
  void *data;
  float *value;
} norm_weight;

static norm_weight make_weight(int kind, int n) {
  norm_weight w = {0};
  static const m3_dtype dtypes[W_KINDS] = {M3_DT_F32, M3_DT_BF16, M3_DT_F16};
  w.data = malloc((size_t)n * 4);
  w.value = malloc((size_t)n * sizeof(float));
  for (int i = 0; i < n; i++) {
    float v = uniform(-0.5f, 0.5f);
    if (kind == W_F32) {
      ((float *)w.data)[i] = v;
    } else if (kind == W_BF16) {
      ((uint16_t *)w.data)[i] = m3_f32_to_bf16(v);
      v = m3_bf16_to_f32(((uint16_t *)w.data)[i]);
    } else {
      ((uint16_t *)w.data)[i] = m3_f32_to_f16(v);
      v = m3_f16_to_f32(((uint16_t *)w.data)[i]);
    }
    w.value[i] = v;
  }
  w.t = (m3_tensor){.name = "norm", .data = w.data, .dtype = dtypes[kind], .rows = 1, .cols = n,
                    .quant = M3_WQ_NONE};
  return w;
}

/* Counts the elements of a row set that differ from the reference
 *   x' = x + y (float32), out = x' / sqrt(mean(x'^2) + eps) * (1 + w) in double. */
static int reference_errors(const float *x0, const float *y, const float *w, float eps, int nrows,
                            int n, const float *x, const float *out) {
  int bad = 0;
  for (int r = 0; r < nrows; r++) {
    const size_t o = (size_t)r * n;
    double ss = 0;
    for (int i = 0; i < n; i++) {
      float sum = x0[o + i] + y[o + i];
      bad += x[o + i] != sum;
      ss += (double)sum * sum;
    }
    double inv = 1.0 / sqrt(ss / n + eps);
    for (int i = 0; i < n; i++) {
      double ref = (double)x[o + i] * inv * (1.0 + w[i]);
      bad += !(fabs(out[o + i] - ref) <= 1e-5 * fabs(ref) + 1e-6);
    }
  }
  return bad;
}

static void test_backend(m3_backend *be) {
  static const int shapes[][2] = {{5, 128}, {3, 1000}, {2, 6144}, {40, 24}, {1, 33}, {300, 130}};
  const float eps = 1e-6f;
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (int kind = 0; kind < W_KINDS; kind++) {
      const int nrows = shapes[s][0], n = shapes[s][1];
      const size_t len = (size_t)nrows * n;
      norm_weight w = make_weight(kind, n);
      float *x0 = random_floats(len, -3, 3), *y = random_floats(len, -3, 3);
      float *x_fused = malloc(len * sizeof(float)), *x_two = malloc(len * sizeof(float));
      float *out_fused = malloc(len * sizeof(float)), *out_two = malloc(len * sizeof(float));
      memcpy(x_fused, x0, len * sizeof(float));
      memcpy(x_two, x0, len * sizeof(float));
      for (size_t i = 0; i < len; i++) out_fused[i] = out_two[i] = NAN;

      be->ops->add_rmsnorm(be, x_fused, y, &w.t, eps, nrows, n, out_fused);
      be->ops->add(be, x_two, y, len);
      be->ops->rmsnorm(be, x_two, &w.t, eps, nrows, n, out_two);

      CHECK(memcmp(x_fused, x_two, len * sizeof(float)) == 0);
      CHECK(memcmp(out_fused, out_two, len * sizeof(float)) == 0);
      CHECK_EQ_INT(reference_errors(x0, y, w.value, eps, nrows, n, x_fused, out_fused), 0);
      free(x0), free(y), free(x_fused), free(x_two), free(out_fused), free(out_two);
      free(w.data), free(w.value);
    }
}

int main(void) {
  for (int isa = 0; isa < M3_CPU_ISA_COUNT; isa++) {
    if (!m3_cpu_isa_supported(isa)) {
      printf("skipping %s kernels: not supported here\n", m3_cpu_isa_name(isa));
      continue;
    }
    m3_backend *be = NULL;
    CHECK_OK(m3_backend_cpu_create_isa(2, isa, &be));
    if (!be) continue;
    test_backend(be);
    be->ops->destroy(be);
  }
  /* One thread: the same rows without the pool. */
  m3_backend *one = NULL;
  CHECK_OK(m3_backend_cpu_create(1, &one));
  if (one) {
    test_backend(one);
    one->ops->destroy(one);
  }
  return check_summary();
}
