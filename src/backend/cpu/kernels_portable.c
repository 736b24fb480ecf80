/* kernels_portable.c: the kernel set in plain C, for any CPU; also the reference the SIMD sets are
 * tested against. */
#include <math.h>

#include "backend/cpu/cpu_internal.h"

static float dot_portable(const float *a, const float *b, int n) {
  /* Four partial sums: a shorter dependency chain, and closer to the SIMD sets' rounding. */
  float s[4] = {0, 0, 0, 0};
  int i = 0;
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; j++) s[j] += a[i + j] * b[i + j];
  for (; i < n; i++) s[0] += a[i] * b[i];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

static void axpy_portable(float *y, float a, const float *x, int n) {
  for (int i = 0; i < n; i++) y[i] += a * x[i];
}

static void pv_portable(const float *p, int ldp, int nq, const float *v, int n, int d, float *o) {
  for (int i = 0; i < nq; i++)
    for (int j = 0; j < n; j++) axpy_portable(o + (size_t)i * d, p[(size_t)i * ldp + j], v + (size_t)j * d, d);
}

static float exp_sum_portable(float *s, int n, float m) {
  float sum = 0;
  for (int j = 0; j < n; j++) sum += s[j] = expf(s[j] - m);
  return sum;
}

static void scale_portable(float *y, float a, int n) {
  for (int i = 0; i < n; i++) y[i] *= a;
}

static void gemv_portable(const m3_tensor *w, const float *x, int64_t r0, int64_t r1, float *y) {
  float buf[CPU_K_CHUNK];
  for (int64_t r = r0; r < r1; r++) {
    float acc = 0;
    for (int64_t c = 0; c < w->cols; c += CPU_K_CHUNK) {
      int n = w->cols - c < CPU_K_CHUNK ? (int)(w->cols - c) : CPU_K_CHUNK;
      cpu_decode_row(w, r, c, n, buf);
      acc += dot_portable(buf, x + c, n);
    }
    y[r - r0] = acc;
  }
}

static void decode_tile_portable(const m3_tensor *w, int64_t r0, int nr, int64_t k0, int kc,
                                 float *dst) {
  for (int i = 0; i < nr; i++) cpu_decode_row(w, r0 + i, k0, kc, dst + (size_t)i * kc);
}

static void tile_gemm_portable(const float *tile, int nr, int kc, const float *x, int64_t ldx,
                               int T, float *y, int64_t ldy) {
  for (int t = 0; t < T; t++)
    for (int i = 0; i < nr; i++)
      y[t * ldy + i] += dot_portable(tile + (size_t)i * kc, x + t * ldx, kc);
}

static void dequant_e4m3_portable(const uint8_t *q, int n, float scale, float *out) {
  for (int i = 0; i < n; i++) out[i] = cpu_e4m3_table[q[i]] * scale;
}

const cpu_kernels cpu_kernels_portable = {
    .gemv = gemv_portable,
    .decode_tile = decode_tile_portable,
    .tile_gemm = tile_gemm_portable,
    .dot = dot_portable,
    .axpy = axpy_portable,
    .pv = pv_portable,
    .scale = scale_portable,
    .exp_sum = exp_sum_portable,
    .dequant_e4m3 = dequant_e4m3_portable,
};
