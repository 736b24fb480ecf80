/* MXFP8 quantization against values worked out by hand from the OCP MX rule:
 * scale exponent e = floor(log2(amax)) - 8 (byte e + 127), element = E4M3(x / 2^e). */
#include <math.h>
#include <stdint.h>

#include "base/dtype.h"
#include "base/mxfp8.h"
#include "check.h"

static void quantize32(const float *x, uint8_t *q, uint8_t *s) { m3_mxfp8_quantize_row(x, 32, q, s); }

static void test_exact_values(void) {
  float x[32] = {1.0f, 0.5f, -3.0f};
  uint8_t q[32], s;
  quantize32(x, q, &s);
  /* amax 3 = 1.5 * 2^1 -> e = 1 - 8 = -7 -> byte 120; elements scaled by 2^7. */
  CHECK_EQ_INT(s, 120);
  CHECK_EQ_INT(q[0], 0x70); /* 128 = 2^7: exponent field 7 + 7 = 14 */
  CHECK_EQ_INT(q[1], 0x68); /* 64 = 2^6: field 13 */
  CHECK_EQ_INT(q[2], 0xfc); /* -384 = -1.5 * 2^8: sign, field 15, mantissa 4 */
  CHECK_EQ_INT(q[3], 0x00);
}

static void test_round_to_nearest_even(void) {
  float x[32] = {1.0625f, 1.1875f, 1.09375f};
  uint8_t q[32], s;
  quantize32(x, q, &s);
  /* amax 1.1875 -> floor(log2) 0 -> e = -8 -> byte 119; elements times 256, step 32 at 2^8. */
  CHECK_EQ_INT(s, 119);
  CHECK_EQ_INT(q[0], 0x78); /* 272: tie between 256 (even) and 288 -> 256 */
  CHECK_EQ_INT(q[1], 0x7a); /* 304: tie between 288 and 320 (even) -> 320 */
  CHECK_EQ_INT(q[2], 0x79); /* 280: nearer 288 */
}

static void test_saturation(void) {
  float x[32] = {500.0f, -511.0f, 1.0f / 512.0f, 3.0f / 1024.0f};
  uint8_t q[32], s;
  quantize32(x, q, &s);
  /* amax 511 -> floor(log2) 8 -> e = 0 -> byte 127: 511 / 2^0 is past 448 and saturates. */
  CHECK_EQ_INT(s, 127);
  CHECK_EQ_INT(q[0], 0x7e);
  CHECK_EQ_INT(q[1], 0xfe);
  CHECK_EQ_INT(q[2], 0x01); /* 2^-9: smallest E4M3 subnormal */
  CHECK_EQ_INT(q[3], 0x02); /* 1.5 * 2^-9: tie -> 2 * 2^-9 (even) */
}

static void test_zero_and_tiny_blocks(void) {
  float zero[32] = {0.0f, -0.0f};
  uint8_t q[32], s;
  quantize32(zero, q, &s);
  CHECK_EQ_INT(s, 0); /* amax 0 counts as 2^-127; e clamps to -127 */
  CHECK_EQ_INT(q[0], 0x00);
  CHECK_EQ_INT(q[1], 0x80);

  float tiny[32] = {ldexpf(1.0f, -130)}; /* a float32 subnormal */
  quantize32(tiny, q, &s);
  CHECK_EQ_INT(s, 0);
  CHECK_EQ_INT(q[0], 0x20); /* 2^-130 * 2^127 = 2^-3: field 4 */
}

static void test_extremes(void) {
  float big[32] = {1.5f * ldexpf(1.0f, 127)};
  uint8_t q[32], s;
  quantize32(big, q, &s);
  CHECK_EQ_INT(s, 127 + 119); /* floor(log2) 127 -> e = 119 */
  CHECK_EQ_INT(q[0], 0x7c);   /* 384 */

  float bad[32] = {1.0f, NAN};
  quantize32(bad, q, &s);
  CHECK_EQ_INT(s, 0xff);
  CHECK(isnan(m3_e4m3_to_f32(q[0])));

  float inf[32] = {INFINITY};
  quantize32(inf, q, &s);
  CHECK_EQ_INT(s, 0xff);
}

static void test_blocks_and_tail(void) {
  /* 40 values: block 0 = columns 0..31 (amax 2), block 1 = the 8-column tail (amax 0.25). */
  float x[40] = {0};
  x[5] = 2.0f;
  x[31] = -0.125f;
  x[32] = 0.25f;
  x[39] = -0.0625f;
  uint8_t q[40], s[2];
  m3_mxfp8_quantize_row(x, 40, q, s);
  CHECK_EQ_INT(s[0], 127 + 1 - 8);  /* 120 */
  CHECK_EQ_INT(s[1], 127 - 2 - 8);  /* 117 */
  CHECK_EQ_INT(q[5], 0x78);         /* 2 * 2^7 = 2^8: field 15 */
  CHECK_EQ_INT(q[31], 0xd8);        /* -2^-3 * 2^7 = -2^4: field 11 */
  CHECK_EQ_INT(q[32], 0x78);        /* 2^-2 * 2^10 = 2^8: field 15 */
  CHECK_EQ_INT(q[39], 0xe8);        /* -2^-4 * 2^10 = -2^6: field 13 */
}

/* Decoding a quantized row stays within half an E4M3 step of the input for unsaturated blocks. */
static void test_round_trip_bound(void) {
  float x[96];
  for (int i = 0; i < 96; i++) x[i] = sinf((float)i * 0.37f) * ldexpf(1.0f, i / 32 * 3 - 2) * 0.9f;
  uint8_t q[96], s[3];
  m3_mxfp8_quantize_row(x, 96, q, s);
  int within = 1;
  for (int i = 0; i < 96; i++) {
    float scale = m3_e8m0_to_f32(s[i / 32]);
    float y = m3_e4m3_to_f32(q[i]) * scale;
    /* E4M3 has 3 mantissa bits: relative step 2^-3 for normals, absolute 2^-9 * scale below. */
    float tol = fmaxf(fabsf(x[i]) * 0.0625f, ldexpf(scale, -10));
    if (fabsf(y - x[i]) > tol) within = 0;
  }
  CHECK(within);
}

int main(void) {
  test_exact_values();
  test_round_to_nearest_even();
  test_saturation();
  test_zero_and_tiny_blocks();
  test_extremes();
  test_blocks_and_tail();
  test_round_trip_bound();
  return check_summary();
}
