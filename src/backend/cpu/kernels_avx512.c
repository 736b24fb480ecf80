/* kernels_avx512.c: the AVX-512 (F, BW, VL) kernel set.
 *
 * Weights are decoded 32 columns at a time straight into registers: BF16 by a shift, F16 by
 * vcvtph2ps, E4M3 by rewriting each byte as an F16 (sign-extend, shift the exponent and mantissa
 * into place) and converting; the block scale (times 256, see cpu_e8m0_x256_table) multiplies the
 * block's partial dot product. E4M3 NaN bytes become F16 NaNs, so every value decodes exactly. */
#if defined(__x86_64__)
#include <immintrin.h>

#include "backend/cpu/cpu_internal.h"

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline)) TARGET

/* The block scale of columns [c, c + 32) (1 for unscaled kinds; 256 folded in for E4M3, which
 * decode32 leaves 256 times too small). */
INLINE float scale32(cpu_wkind kind, const cpu_wrow *row, int64_t c) {
  if (kind == CPU_W_MXFP8) return cpu_e8m0_x256_table[row->mx[c >> 5]];
  if (kind == CPU_W_FP8_BLOCK) return row->fb[c >> row->fb_shift] * 256.0f;
  return 1.0f;
}

/* Columns [c, c + 32) of the row into lo and hi, without the block scale. */
INLINE void decode32(cpu_wkind kind, const cpu_wrow *row, int64_t c, __m512 *lo, __m512 *hi) {
  switch (kind) {
    case CPU_W_F32:
      *lo = _mm512_loadu_ps((const float *)row->data + c);
      *hi = _mm512_loadu_ps((const float *)row->data + c + 16);
      return;
    case CPU_W_BF16: {
      const __m256i *p = (const __m256i *)(row->data + 2 * c);
      *lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p)), 16));
      *hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p + 1)), 16));
      return;
    }
    case CPU_W_F16: {
      const __m256i *p = (const __m256i *)(row->data + 2 * c);
      *lo = _mm512_cvtph_ps(_mm256_loadu_si256(p));
      *hi = _mm512_cvtph_ps(_mm256_loadu_si256(p + 1));
      return;
    }
    case CPU_W_MXFP8:
    case CPU_W_FP8_BLOCK: {
      /* s eeee mmm -> F16 s 0eeee mmm0000000: sign-extend to 16 bits, shift, clear bit 14. */
      __m512i h = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(row->data + c)));
      h = _mm512_and_si512(_mm512_slli_epi16(h, 7), _mm512_set1_epi16((short)0xBFFF));
      __mmask32 nan = _mm512_cmpeq_epi16_mask(_mm512_and_si512(h, _mm512_set1_epi16(0x3F80)),
                                              _mm512_set1_epi16(0x3F80));
      h = _mm512_mask_mov_epi16(h, nan, _mm512_set1_epi16(0x7E00)); /* NaN stays NaN */
      *lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
      *hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
      return;
    }
  }
}

/* y[i] = dot(W[r + i], x) for i < nrows (1..4), 32 columns (one scale block) per step. */
INLINE void gemv_rows(cpu_wkind kind, const m3_tensor *w, const float *x, int64_t r, int nrows,
                      float *y) {
  const int scaled = kind == CPU_W_MXFP8 || kind == CPU_W_FP8_BLOCK;
  cpu_wrow row[4];
  __m512 acc[4][2];
  for (int i = 0; i < nrows; i++) {
    row[i] = cpu_wrow_at(w, r + i);
    acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  }
  const int64_t K32 = w->cols & ~(int64_t)31;
  for (int64_t c = 0; c < K32; c += 32) {
    __m512 x0 = _mm512_loadu_ps(x + c), x1 = _mm512_loadu_ps(x + c + 16);
    for (int i = 0; i < nrows; i++) {
      __m512 lo, hi;
      decode32(kind, &row[i], c, &lo, &hi);
      if (scaled) { /* the block's dot product, then one multiply-add by its scale */
        __m512 part = _mm512_fmadd_ps(hi, x1, _mm512_mul_ps(lo, x0));
        acc[i][0] = _mm512_fmadd_ps(part, _mm512_set1_ps(scale32(kind, &row[i], c)), acc[i][0]);
      } else {
        acc[i][0] = _mm512_fmadd_ps(lo, x0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(hi, x1, acc[i][1]);
      }
    }
  }
  for (int i = 0; i < nrows; i++) {
    y[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
    if (K32 < w->cols) y[i] += cpu_row_tail_dot(w, r + i, K32, x);
  }
}

INLINE void gemv_kind(cpu_wkind kind, const m3_tensor *w, const float *x, int64_t r0, int64_t r1,
                      float *y) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) gemv_rows(kind, w, x, r, 4, y + (r - r0));
  for (; r < r1; r++) gemv_rows(kind, w, x, r, 1, y + (r - r0));
}

TARGET static void gemv_avx512(const m3_tensor *w, const float *x, int64_t r0, int64_t r1,
                               float *y) {
  switch (cpu_wkind_of(w)) {
    case CPU_W_F32: gemv_kind(CPU_W_F32, w, x, r0, r1, y); break;
    case CPU_W_BF16: gemv_kind(CPU_W_BF16, w, x, r0, r1, y); break;
    case CPU_W_F16: gemv_kind(CPU_W_F16, w, x, r0, r1, y); break;
    case CPU_W_MXFP8: gemv_kind(CPU_W_MXFP8, w, x, r0, r1, y); break;
    case CPU_W_FP8_BLOCK: gemv_kind(CPU_W_FP8_BLOCK, w, x, r0, r1, y); break;
  }
}

INLINE void decode_tile_kind(cpu_wkind kind, const m3_tensor *w, int64_t r0, int nr, int64_t k0,
                             int kc, float *dst) {
  const int kc32 = kc & ~31;
  for (int i = 0; i < nr; i++) {
    cpu_wrow row = cpu_wrow_at(w, r0 + i);
    float *d = dst + (size_t)i * kc;
    for (int c = 0; c < kc32; c += 32) {
      __m512 lo, hi, s = _mm512_set1_ps(scale32(kind, &row, k0 + c));
      decode32(kind, &row, k0 + c, &lo, &hi);
      _mm512_storeu_ps(d + c, _mm512_mul_ps(lo, s));
      _mm512_storeu_ps(d + c + 16, _mm512_mul_ps(hi, s));
    }
    if (kc32 < kc) cpu_decode_row(w, r0 + i, k0 + kc32, kc - kc32, d + kc32);
  }
}

TARGET static void decode_tile_avx512(const m3_tensor *w, int64_t r0, int nr, int64_t k0, int kc,
                                      float *dst) {
  switch (cpu_wkind_of(w)) {
    case CPU_W_F32: decode_tile_kind(CPU_W_F32, w, r0, nr, k0, kc, dst); break;
    case CPU_W_BF16: decode_tile_kind(CPU_W_BF16, w, r0, nr, k0, kc, dst); break;
    case CPU_W_F16: decode_tile_kind(CPU_W_F16, w, r0, nr, k0, kc, dst); break;
    case CPU_W_MXFP8: decode_tile_kind(CPU_W_MXFP8, w, r0, nr, k0, kc, dst); break;
    case CPU_W_FP8_BLOCK: decode_tile_kind(CPU_W_FP8_BLOCK, w, r0, nr, k0, kc, dst); break;
  }
}

/* The two 256-bit halves of a added (AVX-512F alone has no float32x8 extract). */
INLINE __m256 fold256(__m512 a) {
  __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
  return _mm256_add_ps(_mm512_castps512_ps256(a), hi);
}

/* The four horizontal sums of a0..a3, in lanes 0..3: a shared shuffle tree, cheaper than four
 * separate reductions. */
INLINE __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  __m256 b0 = fold256(a0);
  __m256 b1 = fold256(a1);
  __m256 b2 = fold256(a2);
  __m256 b3 = fold256(a3);
  __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* y[t][i] += dot(tile row i, x row t) for a TB x RB block: TB * RB accumulators in registers,
 * each tile and x load shared by RB or TB multiply-adds. */
INLINE void micro(const float *tile, int kc, const float *x, int64_t ldx, float *y, int64_t ldy,
                  int TB, int RB) {
  __m512 acc[4][4];
  for (int t = 0; t < TB; t++)
    for (int i = 0; i < RB; i++) acc[t][i] = _mm512_setzero_ps();
  int k = 0;
  for (; k + 16 <= kc; k += 16) {
    __m512 wv[4];
    for (int i = 0; i < RB; i++) wv[i] = _mm512_loadu_ps(tile + (size_t)i * kc + k);
    for (int t = 0; t < TB; t++) {
      __m512 xv = _mm512_loadu_ps(x + t * ldx + k);
      for (int i = 0; i < RB; i++) acc[t][i] = _mm512_fmadd_ps(wv[i], xv, acc[t][i]);
    }
  }
  if (k < kc) {
    __mmask16 m = (__mmask16)((1u << (kc - k)) - 1);
    __m512 wv[4];
    for (int i = 0; i < RB; i++) wv[i] = _mm512_maskz_loadu_ps(m, tile + (size_t)i * kc + k);
    for (int t = 0; t < TB; t++) {
      __m512 xv = _mm512_maskz_loadu_ps(m, x + t * ldx + k);
      for (int i = 0; i < RB; i++) acc[t][i] = _mm512_fmadd_ps(wv[i], xv, acc[t][i]);
    }
  }
  for (int t = 0; t < TB; t++) {
    if (RB == 4) {
      __m128 sums = reduce4(acc[t][0], acc[t][1], acc[t][2], acc[t][3]);
      _mm_storeu_ps(y + t * ldy, _mm_add_ps(_mm_loadu_ps(y + t * ldy), sums));
    } else {
      for (int i = 0; i < RB; i++) y[t * ldy + i] += _mm512_reduce_add_ps(acc[t][i]);
    }
  }
}

#define MICRO(tb, rb) \
  case (tb) * 8 + (rb): micro(tile + (size_t)i * kc, kc, x + t * ldx, ldx, y + t * ldy + i, ldy, tb, rb); break

TARGET static void tile_gemm_avx512(const float *tile, int nr, int kc, const float *x,
                                    int64_t ldx, int T, float *y, int64_t ldy) {
  for (int t = 0; t < T; t += 4)
    for (int i = 0; i < nr; i += 4) {
      int tb = T - t < 4 ? T - t : 4, rb = nr - i < 4 ? nr - i : 4;
      switch (tb * 8 + rb) {
        MICRO(1, 1); MICRO(1, 2); MICRO(1, 3); MICRO(1, 4);
        MICRO(2, 1); MICRO(2, 2); MICRO(2, 3); MICRO(2, 4);
        MICRO(3, 1); MICRO(3, 2); MICRO(3, 3); MICRO(3, 4);
        MICRO(4, 1); MICRO(4, 2); MICRO(4, 3); MICRO(4, 4);
      }
    }
}

TARGET static float dot_avx512(const float *a, const float *b, int n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

TARGET static void axpy_avx512(float *y, float a, const float *x, int n) {
  __m512 av = _mm512_set1_ps(a);
  for (int i = 0; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    __m512 r = _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i));
    _mm512_mask_storeu_ps(y + i, m, r);
  }
}

TARGET static void scale_avx512(float *y, float a, int n) {
  __m512 av = _mm512_set1_ps(a);
  for (int i = 0; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(av, _mm512_maskz_loadu_ps(m, y + i)));
  }
}

const cpu_kernels cpu_kernels_avx512 = {
    .gemv = gemv_avx512,
    .decode_tile = decode_tile_avx512,
    .tile_gemm = tile_gemm_avx512,
    .dot = dot_avx512,
    .axpy = axpy_avx512,
    .scale = scale_avx512,
};
#endif
