/* kernels_avx512.c: the AVX-512 (F, BW, VL) kernel set.
 *
 * Weights are decoded 32 columns at a time straight into registers: BF16 by a shift, F16 by
 * vcvtph2ps, E4M3 by rewriting each byte as an F16 (sign-extend, shift the exponent and mantissa
 * into place) and converting, then one multiply by the block scale (times 256, see
 * cpu_e8m0_x256_table). E4M3 NaN bytes become F16 NaNs, so every value decodes exactly. The GEMV
 * and the tiled GEMM sum in the same order (CPU_K_CHUNK), so results do not depend on T. */
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
      __m256i b = _mm256_loadu_si256((const __m256i *)(row->data + c));
      __m512i h = _mm512_cvtepi8_epi16(b);
      h = _mm512_and_si512(_mm512_slli_epi16(h, 7), _mm512_set1_epi16((short)0xBFFF));
      /* NaN bytes (0x7F, 0xFF) do not occur in real weights: test, and fix up only if present. */
      __mmask32 nan = _mm256_cmpeq_epi8_mask(_mm256_or_si256(b, _mm256_set1_epi8((char)0x80)),
                                             _mm256_set1_epi8(-1));
      if (__builtin_expect(nan != 0, 0)) h = _mm512_mask_mov_epi16(h, nan, _mm512_set1_epi16(0x7E00));
      *lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
      *hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
      return;
    }
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

/* y[i] = dot(W[r + i], x) for i < nrows (1..4), in the order of CPU_K_CHUNK: per chunk one
 * accumulator per row over 16-column groups (32 per step), then reduce4.
 * Each step also prefetches the same columns `ahead` bytes on (cpu_gemv_prefetch_distance). */
INLINE void gemv_rows(cpu_wkind kind, const m3_tensor *w, const float *x, int64_t r, int nrows,
                      float *y, size_t ahead) {
  const int scaled = kind == CPU_W_MXFP8 || kind == CPU_W_FP8_BLOCK;
  const size_t es = m3_dtype_size(w->dtype);
  cpu_wrow row[4];
  for (int i = 0; i < nrows; i++) row[i] = cpu_wrow_at(w, r + i), y[i] = 0;
  for (int64_t k0 = 0; k0 < w->cols; k0 += CPU_K_CHUNK) {
    const int64_t k1 = w->cols - k0 < CPU_K_CHUNK ? w->cols : k0 + CPU_K_CHUNK;
    __m512 acc[4];
    for (int i = 0; i < nrows; i++) acc[i] = _mm512_setzero_ps();
    int64_t c = k0;
    for (; c + 32 <= k1; c += 32) {
      __m512 x0 = _mm512_loadu_ps(x + c), x1 = _mm512_loadu_ps(x + c + 16);
      for (int i = 0; i < nrows; i++) {
        /* An address, not a pointer: past the last row it points outside the matrix. */
        uintptr_t next = (uintptr_t)row[i].data + (size_t)c * es + ahead;
        for (size_t b = 0; b < 32 * es; b += 64) _mm_prefetch((const char *)(next + b), _MM_HINT_T0);
        __m512 lo, hi;
        decode32(kind, &row[i], c, &lo, &hi);
        if (scaled) {
          __m512 s = _mm512_set1_ps(scale32(kind, &row[i], c));
          lo = _mm512_mul_ps(lo, s);
          hi = _mm512_mul_ps(hi, s);
        }
        acc[i] = _mm512_fmadd_ps(hi, x1, _mm512_fmadd_ps(lo, x0, acc[i]));
      }
    }
    if (c < k1) { /* the chunk's last columns, zero-padded to whole 16-column groups */
      const int n = (int)(k1 - c);
      for (int i = 0; i < nrows; i++) {
        float buf[32] = {0};
        cpu_decode_row(w, r + i, c, n, buf);
        for (int g = 0; g < n; g += 16) {
          __mmask16 m = n - g >= 16 ? 0xFFFF : (__mmask16)((1u << (n - g)) - 1);
          acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, buf + g),
                                   _mm512_maskz_loadu_ps(m, x + c + g), acc[i]);
        }
      }
    }
    float sums[4];
    _mm_storeu_ps(sums, reduce4(acc[0], acc[nrows > 1], acc[nrows > 2 ? 2 : 0], acc[nrows > 3 ? 3 : 0]));
    for (int i = 0; i < nrows; i++) y[i] += sums[i];
  }
}

INLINE void gemv_kind(cpu_wkind kind, const m3_tensor *w, const float *x, int64_t r0, int64_t r1,
                      float *y) {
  const size_t ahead = cpu_gemv_prefetch_distance(w);
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) gemv_rows(kind, w, x, r, 4, y + (r - r0), ahead);
  for (; r < r1; r++) gemv_rows(kind, w, x, r, 1, y + (r - r0), ahead);
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
      for (int i = 0; i < RB; i++) /* the same tree as for four rows, so gemv_rows matches */
        y[t * ldy + i] += _mm_cvtss_f32(reduce4(acc[t][i], acc[t][i], acc[t][i], acc[t][i]));
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

/* Four query rows at a time against 64 columns of v: 16 accumulators, each v load shared by four
 * multiply-adds. Rows past nq repeat the last row and are not stored. */
TARGET static void pv_avx512(const float *p, int ldp, int nq, const float *v, int n, int d,
                             float *o) {
  for (int q0 = 0; q0 < nq; q0 += 4) {
    int qb = nq - q0 < 4 ? nq - q0 : 4;
    const float *pr[4];
    for (int i = 0; i < 4; i++) pr[i] = p + (size_t)(q0 + (i < qb ? i : qb - 1)) * ldp;
    for (int d0 = 0; d0 < d; d0 += 64) {
      __mmask16 m[4];
      __m512 acc[4][4];
      for (int k = 0; k < 4; k++) {
        int rem = d - d0 - 16 * k;
        m[k] = rem >= 16 ? 0xFFFF : rem <= 0 ? 0 : (__mmask16)((1u << rem) - 1);
        for (int i = 0; i < 4; i++) acc[i][k] = _mm512_setzero_ps();
      }
      for (int j = 0; j < n; j++) {
        const float *vr = v + (size_t)j * d + d0;
        __m512 vv[4];
        for (int k = 0; k < 4; k++) vv[k] = _mm512_maskz_loadu_ps(m[k], vr + 16 * k);
        for (int i = 0; i < 4; i++) {
          __m512 pi = _mm512_set1_ps(pr[i][j]);
          for (int k = 0; k < 4; k++) acc[i][k] = _mm512_fmadd_ps(pi, vv[k], acc[i][k]);
        }
      }
      for (int i = 0; i < 4; i++) /* constant bounds keep acc in registers */
        for (int k = 0; k < 4; k++) {
          if (i >= qb) continue;
          float *op = o + (size_t)(q0 + i) * d + d0 + 16 * k;
          _mm512_mask_storeu_ps(op, m[k], _mm512_add_ps(_mm512_maskz_loadu_ps(m[k], op), acc[i][k]));
        }
    }
  }
}

TARGET static void scale_avx512(float *y, float a, int n) {
  __m512 av = _mm512_set1_ps(a);
  for (int i = 0; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(av, _mm512_maskz_loadu_ps(m, y + i)));
  }
}

/* exp(x) for x <= 0 (Cephes expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n). Inputs
 * below -88 give a value below 2^-126 instead of 0, which no softmax sum notices; NaN stays NaN. */
INLINE __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-88.0f), x);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

TARGET static float exp_sum_avx512(float *s, int n, float m) {
  __m512 mv = _mm512_set1_ps(m), sum = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 16) {
    __mmask16 k = n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
    __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), mv));
    _mm512_mask_storeu_ps(s + j, k, e);
    sum = _mm512_mask_add_ps(sum, k, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

/* 32 bytes at a time through decode32 (values 256 times too small, exactly) times 256 * scale:
 * the same real product as value * scale, so the same float32. */
TARGET static void dequant_e4m3_avx512(const uint8_t *q, int n, float scale, float *out) {
  const cpu_wrow row = {q, NULL, NULL, 0};
  const __m512 s = _mm512_set1_ps(scale * 256.0f);
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512 lo, hi;
    decode32(CPU_W_MXFP8, &row, i, &lo, &hi);
    _mm512_storeu_ps(out + i, _mm512_mul_ps(lo, s));
    _mm512_storeu_ps(out + i + 16, _mm512_mul_ps(hi, s));
  }
  for (; i < n; i++) out[i] = cpu_e4m3_table[q[i]] * scale;
}

const cpu_kernels cpu_kernels_avx512 = {
    .gemv = gemv_avx512,
    .decode_tile = decode_tile_avx512,
    .tile_gemm = tile_gemm_avx512,
    .dot = dot_avx512,
    .axpy = axpy_avx512,
    .pv = pv_avx512,
    .scale = scale_avx512,
    .exp_sum = exp_sum_avx512,
    .dequant_e4m3 = dequant_e4m3_avx512,
};
#endif
