/* mxfp8.c: the OCP MX v1.0 scale rule for E4M3 blocks of 32.
 *
 * The rule (OCP "Microscaling Formats (MX) v1.0", §6.3, the conversion every implementation must
 * support; the same as torchao `to_mx` with ScaleCalculationMode.FLOOR,
 * pytorch/ao torchao/prototype/mx_formats/mx_tensor.py):
 *   shared exponent  e = floor(log2(amax)) - emax_elem,   emax_elem = 8 for E4M3 (448 = 1.75 * 2^8)
 *   floor(log2) is read from the float32 exponent field, so amax = 0 (and float32 subnormals)
 *   count as 2^-127; e is clamped to the E8M0 range [-127, 127] and stored biased (e + 127).
 *   A block whose amax is NaN or infinite gets the E8M0 NaN 0xFF (its elements become NaN).
 *   element          q = E4M3(x * 2^-e), round to nearest even, saturating to +-448 (amax / 2^e
 *                    can reach 511.9, past the E4M3 maximum).
 * So an all-zero block has scale byte 0 (2^-127) and zero elements. NVIDIA Transformer Engine and
 * ModelOpt instead round amax / 448 up to a power of two, which never saturates; which rule
 * produced the official MXFP8 checkpoint is not published, and decoding is the same for both. */
#include "base/mxfp8.h"

#include <math.h>

#include "base/dtype.h"

enum { E4M3_EMAX = 8, E8M0_BIAS = 127, E8M0_NAN = 0xff };

static uint8_t block_scale(float amax) {
  if (!isfinite(amax)) return E8M0_NAN;
  int floor_log2 = (int)((m3_bits_from_f32(amax) >> 23) & 0xffu) - E8M0_BIAS;
  int e = floor_log2 - E4M3_EMAX;
  if (e < -E8M0_BIAS) e = -E8M0_BIAS;
  return (uint8_t)(e + E8M0_BIAS);
}

void m3_mxfp8_quantize_row(const float *x, int64_t n, uint8_t *q_e4m3, uint8_t *scale_e8m0) {
  for (int64_t b0 = 0; b0 < n; b0 += M3_MXFP8_BLOCK) {
    int64_t b1 = b0 + M3_MXFP8_BLOCK < n ? b0 + M3_MXFP8_BLOCK : n;
    float amax = 0.0f;
    for (int64_t i = b0; i < b1; i++) {
      float a = fabsf(x[i]);
      if (isnan(a) || a > amax) amax = a; /* a NaN sticks: the block becomes NaN */
    }
    uint8_t s = block_scale(amax);
    scale_e8m0[b0 / M3_MXFP8_BLOCK] = s;
    /* 2^(127 - s) is exact in float32 for every s in [0, 254]: 2^127 down to 2^-127 (subnormal). */
    float inv_scale = s == E8M0_NAN ? NAN : ldexpf(1.0f, E8M0_BIAS - (int)s);
    for (int64_t i = b0; i < b1; i++) q_e4m3[i] = m3_f32_to_e4m3(x[i] * inv_scale);
  }
}
