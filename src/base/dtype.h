/* dtype.h: element types of checkpoint tensors and their scalar conversions.
 *
 * Conversions are exact: bf16/f16/e4m3/e8m0 all decode to a float32 that represents the stored
 * value exactly (e8m0 2^-127 is a float32 subnormal; 0xFF is NaN). Encoders round to nearest even. */
#ifndef M3_BASE_DTYPE_H
#define M3_BASE_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* The safetensors dtype set. */
typedef enum {
  M3_DT_BOOL,
  M3_DT_U8,
  M3_DT_I8,
  M3_DT_I16,
  M3_DT_U16,
  M3_DT_F16,
  M3_DT_BF16,
  M3_DT_I32,
  M3_DT_U32,
  M3_DT_F32,
  M3_DT_F64,
  M3_DT_I64,
  M3_DT_U64,
  M3_DT_F8_E4M3,
  M3_DT_F8_E5M2,
  M3_DT_COUNT
} m3_dtype;

/* "F32", "BF16", "F8_E4M3", ... exactly as safetensors spells them. */
const char *m3_dtype_name(m3_dtype dt);
/* Parses a safetensors dtype string; returns 0 and sets *out, or -1 if unknown. */
int m3_dtype_parse(const char *name, m3_dtype *out);
size_t m3_dtype_size(m3_dtype dt);

static inline float m3_f32_from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static inline uint32_t m3_bits_from_f32(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

static inline float m3_bf16_to_f32(uint16_t h) { return m3_f32_from_bits((uint32_t)h << 16); }

/* Round to nearest even; NaN stays a quiet NaN. */
static inline uint16_t m3_f32_to_bf16(float f) {
  uint32_t u = m3_bits_from_f32(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

float m3_f16_to_f32(uint16_t h);
uint16_t m3_f32_to_f16(float f);

/* OCP FP8 E4M3 ("fn"): bias 7, no infinities, 0x7F/0xFF are NaN, max 448. */
float m3_e4m3_to_f32(uint8_t v);
/* Round to nearest even, saturating to +-448 (what torch's float8_e4m3fn cast does for finite
 * values inside range; values past 448 saturate rather than becoming NaN). */
uint8_t m3_f32_to_e4m3(float f);

/* E8M0 scale: 2^(v-127); 0xFF is NaN. */
static inline float m3_e8m0_to_f32(uint8_t v) {
  if (v == 0xff) return m3_f32_from_bits(0x7fc00000u);
  if (v == 0) return m3_f32_from_bits(0x00400000u); /* 2^-127, a float32 subnormal */
  return m3_f32_from_bits((uint32_t)v << 23);
}

/* Decodes n elements of any floating dtype (F32, F16, BF16, F8_E4M3, F8_E5M2, F64) to float32.
 * Returns 0, or -1 for a non-floating dtype. */
int m3_decode_f32(m3_dtype dt, const void *src, float *dst, size_t n);

#endif
