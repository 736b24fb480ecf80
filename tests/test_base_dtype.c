/* test_base_dtype: every scalar conversion of base/dtype.h against values computed here from the
 * format definitions (sign / exponent / mantissa with ldexp), independently of dtype.c. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include "base/dtype.h"
#include "check.h"

/* ---- reference decoders: value = (implicit + mantissa) * 2^(exponent - bias - mantissa bits) ----
 */

/* A binary float with `eb` exponent bits and `mb` mantissa bits, IEEE-style (all-ones exponent is
 * inf/NaN) unless `fn` (E4M3 "fn": no infinities, only all-ones exponent and mantissa is NaN). */
static double ref_decode(uint32_t code, int eb, int mb, int fn) {
  uint32_t man = code & ((1u << mb) - 1);
  uint32_t exp = (code >> mb) & ((1u << eb) - 1);
  int negative = (code >> (eb + mb)) & 1;
  int bias = (1 << (eb - 1)) - 1;
  uint32_t all_ones = (1u << eb) - 1;
  double mag;
  if (fn && exp == all_ones && man == (1u << mb) - 1) return NAN;
  if (!fn && exp == all_ones) {
    if (man) return NAN;
    mag = INFINITY;
  } else if (exp == 0) {
    mag = ldexp((double)man, 1 - bias - mb);
  } else {
    mag = ldexp((double)((1u << mb) + man), (int)exp - bias - mb);
  }
  return negative ? -mag : mag;
}

static double ref_bf16(uint16_t h) { return ref_decode(h, 8, 7, 0); }
static double ref_f16(uint16_t h) { return ref_decode(h, 5, 10, 0); }
static double ref_e4m3(uint8_t v) { return ref_decode(v, 4, 3, 1); }
static double ref_e5m2(uint8_t v) { return ref_decode(v, 5, 2, 0); }

/* Same value, including the sign of zero; any NaN equals any NaN. */
static int same(double a, float b) {
  if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
  return a == (double)b && !signbit(a) == !signbit(b);
}

static void test_bf16_decode_all(void) {
  int bad = 0;
  for (uint32_t h = 0; h < 65536; h++) {
    if (!same(ref_bf16((uint16_t)h), m3_bf16_to_f32((uint16_t)h)) && bad++ == 0)
      fprintf(stderr, "bf16 0x%04x: %.9g vs %.9g\n", h, ref_bf16((uint16_t)h),
              m3_bf16_to_f32((uint16_t)h));
  }
  CHECK_EQ_INT(bad, 0);
  CHECK(m3_bf16_to_f32(0x3f80) == 1.0f);
  CHECK(m3_bf16_to_f32(0xc049) == -3.140625f);
  CHECK(m3_bf16_to_f32(0x0001) == ldexpf(1.0f, -133)); /* smallest subnormal */
  CHECK(isinf(m3_bf16_to_f32(0xff80)) && m3_bf16_to_f32(0xff80) < 0);
  CHECK(isnan(m3_bf16_to_f32(0x7fc1)));
}

static void test_f16_decode_all(void) {
  int bad = 0;
  for (uint32_t h = 0; h < 65536; h++) {
    if (!same(ref_f16((uint16_t)h), m3_f16_to_f32((uint16_t)h)) && bad++ == 0)
      fprintf(stderr, "f16 0x%04x: %.9g vs %.9g\n", h, ref_f16((uint16_t)h),
              m3_f16_to_f32((uint16_t)h));
  }
  CHECK_EQ_INT(bad, 0);
  CHECK(m3_f16_to_f32(0x3c00) == 1.0f);
  CHECK(m3_f16_to_f32(0x7bff) == 65504.0f);
  CHECK(m3_f16_to_f32(0x0001) == ldexpf(1.0f, -24));
  CHECK(m3_f16_to_f32(0x03ff) == ldexpf(1023.0f, -24)); /* largest subnormal */
  CHECK(m3_f16_to_f32(0x0400) == ldexpf(1.0f, -14));    /* smallest normal */
  CHECK(isinf(m3_f16_to_f32(0x7c00)));
  CHECK(isnan(m3_f16_to_f32(0x7e00)) && isnan(m3_f16_to_f32(0xfc01)));
  CHECK(signbit(m3_f16_to_f32(0x8000)) && m3_f16_to_f32(0x8000) == 0.0f);
}

/* ---- reference encoders: nearest representable by search over the reference decoder ---- */

/* Nearest of the positive codes 0..limit (ascending values) to x >= 0, ties to the even code.
 * `beyond` is the value the code after `limit` stands for when rounding (the IEEE overflow
 * threshold: a value at or past the midpoint to it rounds past the largest finite). Returns
 * limit + 1 for "past the largest finite". */
static uint32_t ref_nearest(double x, uint32_t limit, double (*dec)(uint32_t), double beyond) {
  uint32_t lo = 0, hi = limit;
  while (lo < hi) { /* largest code with value <= x */
    uint32_t mid = (lo + hi + 1) / 2;
    if (dec(mid) <= x)
      lo = mid;
    else
      hi = mid - 1;
  }
  double below = dec(lo);
  if (below == x) return lo;
  double above = lo == limit ? beyond : dec(lo + 1);
  double d_lo = x - below, d_hi = above - x;
  if (d_lo < d_hi) return lo;
  if (d_hi < d_lo) return lo + 1;
  return (lo & 1) ? lo + 1 : lo;
}

static double dec_bf16_u32(uint32_t c) { return ref_bf16((uint16_t)c); }
static double dec_f16_u32(uint32_t c) { return ref_f16((uint16_t)c); }
static double dec_e4m3_u32(uint32_t c) { return ref_e4m3((uint8_t)c); }

static uint16_t ref_f32_to_bf16(float f) {
  double x = fabs((double)f);
  uint16_t sign = signbit(f) ? 0x8000 : 0;
  if (isinf(f)) return sign | 0x7f80;
  /* 0x7f80 follows the largest finite bf16 0x7f7f; 2^128 is where it would sit. */
  return sign | (uint16_t)ref_nearest(x, 0x7f7f, dec_bf16_u32, ldexp(1.0, 128));
}

static uint16_t ref_f32_to_f16(float f) {
  double x = fabs((double)f);
  uint16_t sign = signbit(f) ? 0x8000 : 0;
  if (isinf(f)) return sign | 0x7c00;
  return sign | (uint16_t)ref_nearest(x, 0x7bff, dec_f16_u32, 65536.0);
}

/* About a million f32 bit patterns spread over the whole range (a prime stride); 0 once it wraps.
 */
enum { SWEEP_STRIDE = 4093 };
static int sweep_next(uint32_t *bits) {
  *bits += SWEEP_STRIDE;
  return *bits >= SWEEP_STRIDE;
}

static void test_bf16_encode(void) {
  int bad = 0;
  uint32_t bits = 0;
  do {
    float f = m3_f32_from_bits(bits);
    if (isnan(f)) continue;
    if (m3_f32_to_bf16(f) != ref_f32_to_bf16(f) && bad++ == 0)
      fprintf(stderr, "bf16 encode 0x%08x: 0x%04x vs 0x%04x\n", bits, m3_f32_to_bf16(f),
              ref_f32_to_bf16(f));
  } while (sweep_next(&bits));
  CHECK_EQ_INT(bad, 0);
  /* Every exact tie (low half 0x8000) of every exponent and sign. */
  bad = 0;
  for (uint32_t hi = 0; hi < 65536; hi++) {
    float f = m3_f32_from_bits(hi << 16 | 0x8000u);
    if (!isnan(f) && m3_f32_to_bf16(f) != ref_f32_to_bf16(f)) bad++;
  }
  CHECK_EQ_INT(bad, 0);
  /* Ties: exactly halfway between two bf16 values goes to the even one. */
  CHECK_EQ_INT(m3_f32_to_bf16(m3_f32_from_bits(0x3f808000u)), 0x3f80); /* 1 + 2^-8: down to even */
  CHECK_EQ_INT(m3_f32_to_bf16(m3_f32_from_bits(0x3f818000u)), 0x3f82); /* up to even */
  CHECK_EQ_INT(m3_f32_to_bf16(m3_f32_from_bits(0x3f808001u)), 0x3f81); /* just past the tie */
  CHECK_EQ_INT(m3_f32_to_bf16(m3_f32_from_bits(0x00008000u)), 0x0000); /* subnormal tie to 0 */
  CHECK_EQ_INT(m3_f32_to_bf16(m3_f32_from_bits(0x00018000u)), 0x0002);
  CHECK_EQ_INT(m3_f32_to_bf16(FLT_MAX), 0x7f80); /* rounds past max: inf */
  CHECK_EQ_INT(m3_f32_to_bf16(-INFINITY), 0xff80);
  CHECK(isnan(m3_bf16_to_f32(m3_f32_to_bf16(NAN))));
  /* A signalling-NaN pattern whose payload sits in the low bits must stay a NaN, not become inf. */
  CHECK(isnan(m3_bf16_to_f32(m3_f32_to_bf16(m3_f32_from_bits(0x7f800001u)))));
}

static void test_f16_encode(void) {
  int bad = 0;
  uint32_t bits = 0;
  do {
    float f = m3_f32_from_bits(bits);
    if (isnan(f)) continue;
    if (m3_f32_to_f16(f) != ref_f32_to_f16(f) && bad++ == 0)
      fprintf(stderr, "f16 encode 0x%08x (%g): 0x%04x vs 0x%04x\n", bits, f, m3_f32_to_f16(f),
              ref_f32_to_f16(f));
  } while (sweep_next(&bits));
  CHECK_EQ_INT(bad, 0);
  /* Every f32 whose low 13 bits are a normal-range f16 tie (0x1000), every exponent and sign. */
  bad = 0;
  for (uint32_t hi = 0; hi < (1u << 19); hi++) {
    float f = m3_f32_from_bits(hi << 13 | 0x1000u);
    if (!isnan(f) && m3_f32_to_f16(f) != ref_f32_to_f16(f)) bad++;
  }
  CHECK_EQ_INT(bad, 0);
  /* Every f16 value survives the round trip. */
  bad = 0;
  for (uint32_t h = 0; h < 65536; h++) {
    float f = m3_f16_to_f32((uint16_t)h);
    if (!isnan(f) && m3_f32_to_f16(f) != h) bad++;
  }
  CHECK_EQ_INT(bad, 0);
  /* Ties to even, normal and subnormal. */
  CHECK_EQ_INT(m3_f32_to_f16(1.0f + ldexpf(1.0f, -11)), 0x3c00);
  CHECK_EQ_INT(m3_f32_to_f16(1.0f + 3 * ldexpf(1.0f, -11)), 0x3c02);
  CHECK_EQ_INT(m3_f32_to_f16(ldexpf(1.0f, -25)), 0x0000);
  CHECK_EQ_INT(m3_f32_to_f16(ldexpf(3.0f, -25)), 0x0002);
  CHECK_EQ_INT(m3_f32_to_f16(ldexpf(1.0f, -26)), 0x0000);
  CHECK_EQ_INT(m3_f32_to_f16(ldexpf(1023.5f, -24)),
               0x0400); /* largest subnormal + half: to normal */
  /* Overflow: 65520 is the midpoint past 65504 and rounds (to even) to infinity. */
  CHECK_EQ_INT(m3_f32_to_f16(65504.0f), 0x7bff);
  CHECK_EQ_INT(m3_f32_to_f16(nextafterf(65520.0f, 0.0f)), 0x7bff);
  CHECK_EQ_INT(m3_f32_to_f16(65520.0f), 0x7c00);
  CHECK_EQ_INT(m3_f32_to_f16(-1e6f), 0xfc00);
  CHECK_EQ_INT(m3_f32_to_f16(FLT_MAX), 0x7c00);
  CHECK_EQ_INT(m3_f32_to_f16(INFINITY), 0x7c00);
  CHECK_EQ_INT(m3_f32_to_f16(-0.0f), 0x8000);
  CHECK(isnan(m3_f16_to_f32(m3_f32_to_f16(NAN))));
}

static void test_e4m3_decode_all(void) {
  int bad = 0;
  for (uint32_t v = 0; v < 256; v++) {
    if (!same(ref_e4m3((uint8_t)v), m3_e4m3_to_f32((uint8_t)v)) && bad++ == 0)
      fprintf(stderr, "e4m3 0x%02x: %.9g vs %.9g\n", v, ref_e4m3((uint8_t)v),
              m3_e4m3_to_f32((uint8_t)v));
  }
  CHECK_EQ_INT(bad, 0);
  CHECK(m3_e4m3_to_f32(0x7e) == 448.0f);
  CHECK(m3_e4m3_to_f32(0xfe) == -448.0f);
  CHECK(m3_e4m3_to_f32(0x01) == ldexpf(1.0f, -9));
  CHECK(m3_e4m3_to_f32(0x07) == ldexpf(7.0f, -9));
  CHECK(m3_e4m3_to_f32(0x08) == ldexpf(1.0f, -6));
  CHECK(m3_e4m3_to_f32(0x38) == 1.0f);
  CHECK(m3_e4m3_to_f32(0x78) == 256.0f); /* exponent 15 is finite in the fn variant */
  CHECK(isnan(m3_e4m3_to_f32(0x7f)) && isnan(m3_e4m3_to_f32(0xff)));
  CHECK(signbit(m3_e4m3_to_f32(0x80)) && m3_e4m3_to_f32(0x80) == 0.0f);
}

static void test_e4m3_encode(void) {
  /* Round trip of every non-NaN code (including -0 as 0x80). */
  int bad = 0;
  for (uint32_t v = 0; v < 256; v++) {
    if ((v & 0x7f) == 0x7f) continue;
    if (m3_f32_to_e4m3(m3_e4m3_to_f32((uint8_t)v)) != v && bad++ == 0)
      fprintf(stderr, "e4m3 round trip 0x%02x -> 0x%02x\n", v,
              m3_f32_to_e4m3(m3_e4m3_to_f32((uint8_t)v)));
  }
  CHECK_EQ_INT(bad, 0);
  /* Midpoints of neighbouring codes go to the even code; a hair either side goes to the nearer. */
  bad = 0;
  for (uint32_t v = 0; v < 0x7e; v++) {
    float mid =
        (float)((ref_e4m3((uint8_t)v) + ref_e4m3((uint8_t)(v + 1))) / 2); /* exact: 5 bits */
    uint8_t even = (v & 1) ? (uint8_t)(v + 1) : (uint8_t)v;
    if (m3_f32_to_e4m3(mid) != even) bad++;
    if (m3_f32_to_e4m3(nextafterf(mid, 0.0f)) != v) bad++;
    if (m3_f32_to_e4m3(nextafterf(mid, 1000.0f)) != v + 1) bad++;
    if (m3_f32_to_e4m3(-mid) != (0x80 | even)) bad++;
  }
  CHECK_EQ_INT(bad, 0);
  /* A sweep against the reference nearest-even search, below the saturation point. */
  bad = 0;
  for (int i = -4000; i <= 4000; i++) {
    float f = ldexpf((float)i, -4) * 0.37f; /* |f| <= 92.5, many non-grid values */
    uint8_t want = (uint8_t)((signbit(f) ? 0x80 : 0) |
                             ref_nearest(fabs((double)f), 0x7e, dec_e4m3_u32, 480.0));
    if (m3_f32_to_e4m3(f) != want && bad++ == 0)
      fprintf(stderr, "e4m3 encode %g: 0x%02x vs 0x%02x\n", f, m3_f32_to_e4m3(f), want);
  }
  CHECK_EQ_INT(bad, 0);
  /* Saturation (torch float8_e4m3fn cast of finite values past 448, as dtype.h documents). */
  CHECK_EQ_INT(m3_f32_to_e4m3(448.0f), 0x7e);
  CHECK_EQ_INT(m3_f32_to_e4m3(464.0f), 0x7e);
  CHECK_EQ_INT(m3_f32_to_e4m3(1e6f), 0x7e);
  CHECK_EQ_INT(m3_f32_to_e4m3(-1e6f), 0xfe);
  CHECK_EQ_INT(m3_f32_to_e4m3(NAN), 0x7f);
  CHECK_EQ_INT(m3_f32_to_e4m3(ldexpf(1.0f, -10)), 0x00); /* half the smallest subnormal: to 0 */
  CHECK_EQ_INT(m3_f32_to_e4m3(ldexpf(3.0f, -10)), 0x02);
  CHECK_EQ_INT(m3_f32_to_e4m3(ldexpf(1.0f, -12)), 0x00);
  CHECK_EQ_INT(m3_f32_to_e4m3(-0.0f), 0x80);
}

static void test_e8m0(void) {
  int bad = 0;
  for (int v = 0; v < 255; v++)
    if (m3_e8m0_to_f32((uint8_t)v) != (float)ldexp(1.0, v - 127)) bad++;
  CHECK_EQ_INT(bad, 0);
  CHECK(m3_e8m0_to_f32(0) == (float)ldexp(1.0, -127));
  CHECK(m3_e8m0_to_f32(0) > 0.0f && m3_e8m0_to_f32(0) < FLT_MIN); /* a subnormal, not 0 */
  CHECK(m3_e8m0_to_f32(127) == 1.0f);
  CHECK(m3_e8m0_to_f32(254) == (float)ldexp(1.0, 127));
  CHECK(isnan(m3_e8m0_to_f32(255)));
}

static void test_decode_f32(void) {
  float out[4];
  const float f32[4] = {1.5f, -0.0f, 1e-40f, 3e38f};
  CHECK_EQ_INT(m3_decode_f32(M3_DT_F32, f32, out, 4), 0);
  CHECK(memcmp(out, f32, sizeof out) == 0);

  const double f64[3] = {0.1, -2.5, 1e300};
  CHECK_EQ_INT(m3_decode_f32(M3_DT_F64, f64, out, 3), 0);
  CHECK(out[0] == (float)0.1 && out[1] == -2.5f && isinf(out[2]));

  const uint16_t bf[3] = {0x3f80, 0xc120, 0x0001};
  CHECK_EQ_INT(m3_decode_f32(M3_DT_BF16, bf, out, 3), 0);
  CHECK(out[0] == 1.0f && out[1] == -10.0f && out[2] == ldexpf(1.0f, -133));

  const uint16_t h[3] = {0x3555, 0xfbff, 0x8001};
  CHECK_EQ_INT(m3_decode_f32(M3_DT_F16, h, out, 3), 0);
  CHECK(out[0] == (float)ref_f16(0x3555) && out[1] == -65504.0f && out[2] == -ldexpf(1.0f, -24));

  const uint8_t e4[3] = {0x7e, 0x81, 0x3c};
  CHECK_EQ_INT(m3_decode_f32(M3_DT_F8_E4M3, e4, out, 3), 0);
  CHECK(out[0] == 448.0f && out[1] == -ldexpf(1.0f, -9) && out[2] == 1.5f);

  int bad = 0;
  for (uint32_t v = 0; v < 256; v++) {
    uint8_t b = (uint8_t)v;
    CHECK_EQ_INT(m3_decode_f32(M3_DT_F8_E5M2, &b, out, 1), 0);
    if (!same(ref_e5m2(b), out[0])) bad++;
  }
  CHECK_EQ_INT(bad, 0);
  CHECK(isinf(ref_e5m2(0x7c)) &&
        isnan(ref_e5m2(0x7d))); /* the reference itself: e5m2 is IEEE-like */

  const int32_t i32[1] = {7};
  CHECK_EQ_INT(m3_decode_f32(M3_DT_I32, i32, out, 1), -1);
  CHECK_EQ_INT(m3_decode_f32(M3_DT_U8, i32, out, 1), -1);
}

static void test_names_and_sizes(void) {
  static const struct {
    const char *name;
    m3_dtype dt;
    size_t size;
  } table[] = {
      {"BOOL", M3_DT_BOOL, 1}, {"U8", M3_DT_U8, 1},           {"I8", M3_DT_I8, 1},
      {"I16", M3_DT_I16, 2},   {"U16", M3_DT_U16, 2},         {"F16", M3_DT_F16, 2},
      {"BF16", M3_DT_BF16, 2}, {"I32", M3_DT_I32, 4},         {"U32", M3_DT_U32, 4},
      {"F32", M3_DT_F32, 4},   {"F64", M3_DT_F64, 8},         {"I64", M3_DT_I64, 8},
      {"U64", M3_DT_U64, 8},   {"F8_E4M3", M3_DT_F8_E4M3, 1}, {"F8_E5M2", M3_DT_F8_E5M2, 1},
  };
  CHECK_EQ_INT(sizeof table / sizeof table[0], M3_DT_COUNT);
  for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
    m3_dtype dt = M3_DT_COUNT;
    CHECK_EQ_INT(m3_dtype_parse(table[i].name, &dt), 0);
    CHECK_EQ_INT(dt, table[i].dt);
    CHECK_STR(m3_dtype_name(table[i].dt), table[i].name);
    CHECK_EQ_INT(m3_dtype_size(table[i].dt), table[i].size);
  }
  m3_dtype dt;
  CHECK_EQ_INT(m3_dtype_parse("F8_E8M0", &dt), -1);
  CHECK_EQ_INT(m3_dtype_parse("bf16", &dt), -1); /* safetensors spells dtypes in upper case */
  CHECK_EQ_INT(m3_dtype_size(M3_DT_COUNT), 0);
}

int main(void) {
  test_bf16_decode_all();
  test_f16_decode_all();
  test_bf16_encode();
  test_f16_encode();
  test_e4m3_decode_all();
  test_e4m3_encode();
  test_e8m0();
  test_decode_f32();
  test_names_and_sizes();
  return check_summary();
}
