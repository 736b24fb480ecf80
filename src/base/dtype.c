#include "base/dtype.h"

#include <math.h>

static const struct {
  const char *name;
  size_t size;
} dtype_info[M3_DT_COUNT] = {
    [M3_DT_BOOL] = {"BOOL", 1},   [M3_DT_U8] = {"U8", 1},
    [M3_DT_I8] = {"I8", 1},       [M3_DT_I16] = {"I16", 2},
    [M3_DT_U16] = {"U16", 2},     [M3_DT_F16] = {"F16", 2},
    [M3_DT_BF16] = {"BF16", 2},   [M3_DT_I32] = {"I32", 4},
    [M3_DT_U32] = {"U32", 4},     [M3_DT_F32] = {"F32", 4},
    [M3_DT_F64] = {"F64", 8},     [M3_DT_I64] = {"I64", 8},
    [M3_DT_U64] = {"U64", 8},     [M3_DT_F8_E4M3] = {"F8_E4M3", 1},
    [M3_DT_F8_E5M2] = {"F8_E5M2", 1},
};

const char *m3_dtype_name(m3_dtype dt) {
  return (unsigned)dt < M3_DT_COUNT ? dtype_info[dt].name : "?";
}

size_t m3_dtype_size(m3_dtype dt) { return (unsigned)dt < M3_DT_COUNT ? dtype_info[dt].size : 0; }

int m3_dtype_parse(const char *name, m3_dtype *out) {
  for (int i = 0; i < M3_DT_COUNT; i++) {
    if (strcmp(name, dtype_info[i].name) == 0) {
      *out = (m3_dtype)i;
      return 0;
    }
  }
  return -1;
}

float m3_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return m3_f32_from_bits(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    /* Subnormal: man * 2^-24, exact in float32. */
    float v = ldexpf((float)man, -24);
    return sign ? -v : v;
  }
  return m3_f32_from_bits(sign | ((exp + 112u) << 23) | (man << 13));
}

uint16_t m3_f32_to_f16(float f) {
  uint32_t u = m3_bits_from_f32(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;     /* NaN */
  if (a >= 0x477ff000u) return sign | 0x7c00u;    /* rounds to >= 65520: infinity */
  if (a < 0x38800000u) {
    /* Result is subnormal (or zero): value / 2^-24 rounded to nearest even. */
    float v = ldexpf(m3_f32_from_bits(a), 24);
    return sign | (uint16_t)nearbyintf(v);
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
  return sign | (uint16_t)((r - (112u << 23)) >> 13);
}

float m3_e4m3_to_f32(uint8_t v) {
  uint32_t sign = v & 0x80u;
  uint32_t exp = (v >> 3) & 0xfu;
  uint32_t man = v & 0x7u;
  if (exp == 0xf && man == 0x7) return m3_f32_from_bits(0x7fc00000u | (sign << 24));
  float mag = exp == 0 ? ldexpf((float)man, -9) : ldexpf((float)(8u + man), (int)exp - 10);
  return sign ? -mag : mag;
}

uint8_t m3_f32_to_e4m3(float f) {
  if (isnan(f)) return 0x7f;
  uint8_t sign = signbit(f) ? 0x80 : 0;
  float a = fabsf(f);
  if (a >= 448.0f) return sign | 0x7e;
  /* Smallest normal is 2^-6; below it the grid step is 2^-9. */
  int e;
  frexpf(a, &e); /* a = m * 2^e, m in [0.5, 1) */
  int unbiased = e - 1;
  if (unbiased < -6) unbiased = -6;
  float step = ldexpf(1.0f, unbiased - 3);
  float q = nearbyintf(a / step); /* round to nearest even (default rounding mode) */
  float r = q * step;
  if (r >= 448.0f) return sign | 0x7e;
  if (r == 0.0f) return sign;
  int re;
  frexpf(r, &re);
  int rexp = re - 1;
  if (rexp < -6) return sign | (uint8_t)(r / ldexpf(1.0f, -9)); /* subnormal */
  uint32_t man = (uint32_t)(r / ldexpf(1.0f, rexp - 3)) - 8u;
  return sign | (uint8_t)(((uint32_t)(rexp + 7) << 3) | man);
}

static float e5m2_to_f32(uint8_t v) { return m3_f16_to_f32((uint16_t)((uint16_t)v << 8)); }

int m3_decode_f32(m3_dtype dt, const void *src, float *dst, size_t n) {
  switch (dt) {
    case M3_DT_F32: memcpy(dst, src, n * 4); return 0;
    case M3_DT_F64:
      for (size_t i = 0; i < n; i++) {
        double d;
        memcpy(&d, (const char *)src + 8 * i, 8);
        dst[i] = (float)d;
      }
      return 0;
    case M3_DT_BF16:
      for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, (const char *)src + 2 * i, 2);
        dst[i] = m3_bf16_to_f32(h);
      }
      return 0;
    case M3_DT_F16:
      for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, (const char *)src + 2 * i, 2);
        dst[i] = m3_f16_to_f32(h);
      }
      return 0;
    case M3_DT_F8_E4M3:
      for (size_t i = 0; i < n; i++) dst[i] = m3_e4m3_to_f32(((const uint8_t *)src)[i]);
      return 0;
    case M3_DT_F8_E5M2:
      for (size_t i = 0; i < n; i++) dst[i] = e5m2_to_f32(((const uint8_t *)src)[i]);
      return 0;
    default: return -1;
  }
}
