/* kernels_avx2.c: the AVX2 + FMA + F16C kernel set, for x86 CPUs without AVX-512. The weight
 * decoding is that of kernels_avx512.c on 8-wide registers: 16 columns become two vectors. */
#if defined(__x86_64__)
#include <immintrin.h>

#include "backend/cpu/cpu_internal.h"

#define TARGET __attribute__((target("avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline)) TARGET

/* The block scale of columns [c, c + 16) (1 for unscaled kinds; 256 folded in for E4M3, which
 * decode16 leaves 256 times too small, as in kernels_avx512.c). */
INLINE float scale16(cpu_wkind kind, const cpu_wrow *row, int64_t c) {
  if (kind == CPU_W_MXFP8) return cpu_e8m0_x256_table[row->mx[c >> 5]];
  if (kind == CPU_W_FP8_BLOCK) return row->fb[c >> row->fb_shift] * 256.0f;
  return 1.0f;
}

/* Columns [c, c + 16) of the row into lo (first 8) and hi, without the block scale. */
INLINE void decode16(cpu_wkind kind, const cpu_wrow *row, int64_t c, __m256 *lo, __m256 *hi) {
  switch (kind) {
    case CPU_W_F32:
      *lo = _mm256_loadu_ps((const float *)row->data + c);
      *hi = _mm256_loadu_ps((const float *)row->data + c + 8);
      return;
    case CPU_W_BF16: {
      __m128i h0 = _mm_loadu_si128((const __m128i *)(row->data + 2 * c));
      __m128i h1 = _mm_loadu_si128((const __m128i *)(row->data + 2 * c + 16));
      *lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h0), 16));
      *hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h1), 16));
      return;
    }
    case CPU_W_F16:
      *lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row->data + 2 * c)));
      *hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row->data + 2 * c + 16)));
      return;
    case CPU_W_MXFP8:
    case CPU_W_FP8_BLOCK: {
      /* s eeee mmm -> F16 s 0eeee mmm0000000; NaN bytes become an F16 NaN. */
      __m128i b = _mm_loadu_si128((const __m128i *)(row->data + c));
      __m256i h = _mm256_cvtepi8_epi16(b);
      h = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xBFFF));
      /* NaN bytes (0x7F, 0xFF) do not occur in real weights: test, and fix up only if present. */
      __m128i nan = _mm_cmpeq_epi8(_mm_or_si128(b, _mm_set1_epi8((char)0x80)), _mm_set1_epi8(-1));
      if (__builtin_expect(_mm_movemask_epi8(nan) != 0, 0))
        h = _mm256_or_si256(h, _mm256_and_si256(_mm256_cvtepi8_epi16(nan), _mm256_set1_epi16(0x7C00)));
      *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
      *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
      return;
    }
  }
}

INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* Lanes [0, n) set, n in [0, 8]: the mask of _mm256_maskload_ps for a row's last columns. */
INLINE __m256i tail_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* y[i] = dot(W[r + i], x) for i < nrows (1..4), in the order of CPU_K_CHUNK: per chunk one
 * accumulator per row over 8-column groups (16 per step), then hsum.
 * Each step also prefetches the same columns `ahead` bytes on (cpu_gemv_prefetch_distance). */
INLINE void gemv_rows(cpu_wkind kind, const m3_tensor *w, const float *x, int64_t r, int nrows,
                      float *y, size_t ahead) {
  const int scaled = kind == CPU_W_MXFP8 || kind == CPU_W_FP8_BLOCK;
  const size_t es = m3_dtype_size(w->dtype);
  cpu_wrow row[4];
  for (int i = 0; i < nrows; i++) row[i] = cpu_wrow_at(w, r + i), y[i] = 0;
  for (int64_t k0 = 0; k0 < w->cols; k0 += CPU_K_CHUNK) {
    const int64_t k1 = w->cols - k0 < CPU_K_CHUNK ? w->cols : k0 + CPU_K_CHUNK;
    __m256 acc[4];
    for (int i = 0; i < nrows; i++) acc[i] = _mm256_setzero_ps();
    int64_t c = k0;
    for (; c + 16 <= k1; c += 16) {
      __m256 x0 = _mm256_loadu_ps(x + c), x1 = _mm256_loadu_ps(x + c + 8);
      for (int i = 0; i < nrows; i++) {
        /* An address, not a pointer: past the last row it points outside the matrix. */
        uintptr_t next = (uintptr_t)row[i].data + (size_t)c * es + ahead;
        for (size_t b = 0; b < 16 * es; b += 64) _mm_prefetch((const char *)(next + b), _MM_HINT_T0);
        __m256 lo, hi;
        decode16(kind, &row[i], c, &lo, &hi);
        if (scaled) {
          __m256 s = _mm256_set1_ps(scale16(kind, &row[i], c));
          lo = _mm256_mul_ps(lo, s);
          hi = _mm256_mul_ps(hi, s);
        }
        acc[i] = _mm256_fmadd_ps(hi, x1, _mm256_fmadd_ps(lo, x0, acc[i]));
      }
    }
    if (c < k1) { /* the chunk's last columns, zero-padded to whole 8-column groups */
      const int n = (int)(k1 - c);
      for (int i = 0; i < nrows; i++) {
        float buf[16] = {0};
        cpu_decode_row(w, r + i, c, n, buf);
        for (int g = 0; g < n; g += 8) {
          __m256i m = tail_mask(n - g);
          acc[i] = _mm256_fmadd_ps(_mm256_maskload_ps(buf + g, m), _mm256_maskload_ps(x + c + g, m),
                                   acc[i]);
        }
      }
    }
    for (int i = 0; i < nrows; i++) y[i] += hsum(acc[i]);
  }
}

INLINE void gemv_kind(cpu_wkind kind, const m3_tensor *w, const float *x, int64_t r0, int64_t r1,
                      float *y) {
  const size_t ahead = cpu_gemv_prefetch_distance(w);
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) gemv_rows(kind, w, x, r, 4, y + (r - r0), ahead);
  for (; r < r1; r++) gemv_rows(kind, w, x, r, 1, y + (r - r0), ahead);
}

TARGET static void gemv_avx2(const m3_tensor *w, const float *x, int64_t r0, int64_t r1,
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
  const int kc16 = kc & ~15;
  for (int i = 0; i < nr; i++) {
    cpu_wrow row = cpu_wrow_at(w, r0 + i);
    float *d = dst + (size_t)i * kc;
    for (int c = 0; c < kc16; c += 16) {
      __m256 lo, hi, s = _mm256_set1_ps(scale16(kind, &row, k0 + c));
      decode16(kind, &row, k0 + c, &lo, &hi);
      _mm256_storeu_ps(d + c, _mm256_mul_ps(lo, s));
      _mm256_storeu_ps(d + c + 8, _mm256_mul_ps(hi, s));
    }
    if (kc16 < kc) cpu_decode_row(w, r0 + i, k0 + kc16, kc - kc16, d + kc16);
  }
}

TARGET static void decode_tile_avx2(const m3_tensor *w, int64_t r0, int nr, int64_t k0, int kc,
                                    float *dst) {
  switch (cpu_wkind_of(w)) {
    case CPU_W_F32: decode_tile_kind(CPU_W_F32, w, r0, nr, k0, kc, dst); break;
    case CPU_W_BF16: decode_tile_kind(CPU_W_BF16, w, r0, nr, k0, kc, dst); break;
    case CPU_W_F16: decode_tile_kind(CPU_W_F16, w, r0, nr, k0, kc, dst); break;
    case CPU_W_MXFP8: decode_tile_kind(CPU_W_MXFP8, w, r0, nr, k0, kc, dst); break;
    case CPU_W_FP8_BLOCK: decode_tile_kind(CPU_W_FP8_BLOCK, w, r0, nr, k0, kc, dst); break;
  }
}


/* y[t][i] += dot(tile row i, x row t) for a TB x RB block (TB <= 2, RB <= 4: 8 accumulators fit
 * beside the loads in 16 registers). */
INLINE void micro(const float *tile, int kc, const float *x, int64_t ldx, float *y, int64_t ldy,
                  int TB, int RB) {
  __m256 acc[2][4];
  for (int t = 0; t < TB; t++)
    for (int i = 0; i < RB; i++) acc[t][i] = _mm256_setzero_ps();
  for (int k = 0; k < kc; k += 8) {
    __m256i m = tail_mask(kc - k);
    __m256 wv[4];
    for (int i = 0; i < RB; i++) wv[i] = _mm256_maskload_ps(tile + (size_t)i * kc + k, m);
    for (int t = 0; t < TB; t++) {
      __m256 xv = _mm256_maskload_ps(x + t * ldx + k, m);
      for (int i = 0; i < RB; i++) acc[t][i] = _mm256_fmadd_ps(wv[i], xv, acc[t][i]);
    }
  }
  for (int t = 0; t < TB; t++)
    for (int i = 0; i < RB; i++) y[t * ldy + i] += hsum(acc[t][i]);
}

#define MICRO(tb, rb) \
  case (tb) * 8 + (rb): micro(tile + (size_t)i * kc, kc, x + t * ldx, ldx, y + t * ldy + i, ldy, tb, rb); break

TARGET static void tile_gemm_avx2(const float *tile, int nr, int kc, const float *x, int64_t ldx,
                                  int T, float *y, int64_t ldy) {
  for (int t = 0; t < T; t += 2)
    for (int i = 0; i < nr; i += 4) {
      int tb = T - t < 2 ? T - t : 2, rb = nr - i < 4 ? nr - i : 4;
      switch (tb * 8 + rb) {
        MICRO(1, 1); MICRO(1, 2); MICRO(1, 3); MICRO(1, 4);
        MICRO(2, 1); MICRO(2, 2); MICRO(2, 3); MICRO(2, 4);
      }
    }
}

TARGET static float dot_avx2(const float *a, const float *b, int n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i < n; i += 8) {
    __m256i m = tail_mask(n - i);
    s0 = _mm256_fmadd_ps(_mm256_maskload_ps(a + i, m), _mm256_maskload_ps(b + i, m), s0);
  }
  return hsum(_mm256_add_ps(s0, s1));
}

TARGET static void axpy_avx2(float *y, float a, const float *x, int n) {
  __m256 av = _mm256_set1_ps(a);
  for (int i = 0; i < n; i += 8) {
    __m256i m = tail_mask(n - i);
    __m256 r = _mm256_fmadd_ps(av, _mm256_maskload_ps(x + i, m), _mm256_maskload_ps(y + i, m));
    _mm256_maskstore_ps(y + i, m, r);
  }
}

/* Four query rows at a time against 16 columns of v: 8 accumulators, each v load shared by four
 * multiply-adds. Rows past nq repeat the last row and are not stored. */
TARGET static void pv_avx2(const float *p, int ldp, int nq, const float *v, int n, int d,
                           float *o) {
  for (int q0 = 0; q0 < nq; q0 += 4) {
    int qb = nq - q0 < 4 ? nq - q0 : 4;
    const float *pr[4];
    for (int i = 0; i < 4; i++) pr[i] = p + (size_t)(q0 + (i < qb ? i : qb - 1)) * ldp;
    for (int d0 = 0; d0 < d; d0 += 16) {
      __m256i m[2] = {tail_mask(d - d0), tail_mask(d - d0 - 8)};
      __m256 acc[4][2];
      for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
      for (int j = 0; j < n; j++) {
        const float *vr = v + (size_t)j * d + d0;
        __m256 v0 = _mm256_maskload_ps(vr, m[0]), v1 = _mm256_maskload_ps(vr + 8, m[1]);
        for (int i = 0; i < 4; i++) {
          __m256 pi = _mm256_set1_ps(pr[i][j]);
          acc[i][0] = _mm256_fmadd_ps(pi, v0, acc[i][0]);
          acc[i][1] = _mm256_fmadd_ps(pi, v1, acc[i][1]);
        }
      }
      for (int i = 0; i < 4; i++) /* constant bounds keep acc in registers */
        for (int k = 0; k < 2; k++) {
          if (i >= qb) continue;
          float *op = o + (size_t)(q0 + i) * d + d0 + 8 * k;
          _mm256_maskstore_ps(op, m[k], _mm256_add_ps(_mm256_maskload_ps(op, m[k]), acc[i][k]));
        }
    }
  }
}

TARGET static void scale_avx2(float *y, float a, int n) {
  __m256 av = _mm256_set1_ps(a);
  for (int i = 0; i < n; i += 8) {
    __m256i m = tail_mask(n - i);
    _mm256_maskstore_ps(y + i, m, _mm256_mul_ps(av, _mm256_maskload_ps(y + i, m)));
  }
}

/* exp(x) for x <= 0, as in kernels_avx512.c; 2^n is built in the exponent field (n >= -127). */
INLINE __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-88.0f), x);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

TARGET static float exp_sum_avx2(float *s, int n, float m) {
  __m256 mv = _mm256_set1_ps(m), sum = _mm256_setzero_ps();
  for (int j = 0; j < n; j += 8) {
    __m256i k = tail_mask(n - j);
    __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_maskload_ps(s + j, k), mv));
    e = _mm256_and_ps(e, _mm256_castsi256_ps(k));
    _mm256_maskstore_ps(s + j, k, e);
    sum = _mm256_add_ps(sum, e);
  }
  return hsum(sum);
}

/* 16 bytes at a time through decode16 (values 256 times too small, exactly) times 256 * scale:
 * the same real product as value * scale, so the same float32. */
TARGET static void dequant_e4m3_avx2(const uint8_t *q, int n, float scale, float *out) {
  const cpu_wrow row = {q, NULL, NULL, 0};
  const __m256 s = _mm256_set1_ps(scale * 256.0f);
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 lo, hi;
    decode16(CPU_W_MXFP8, &row, i, &lo, &hi);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(lo, s));
    _mm256_storeu_ps(out + i + 8, _mm256_mul_ps(hi, s));
  }
  for (; i < n; i++) out[i] = cpu_e4m3_table[q[i]] * scale;
}

const cpu_kernels cpu_kernels_avx2 = {
    .gemv = gemv_avx2,
    .decode_tile = decode_tile_avx2,
    .tile_gemm = tile_gemm_avx2,
    .dot = dot_avx2,
    .axpy = axpy_avx2,
    .pv = pv_avx2,
    .scale = scale_avx2,
    .exp_sum = exp_sum_avx2,
    .dequant_e4m3 = dequant_e4m3_avx2,
};
#endif
