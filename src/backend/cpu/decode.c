/* decode.c: scalar decoding of weight rows of every dtype and quantization. The portable kernels
 * use it throughout; the SIMD kernels use it for the last few columns of a row. */
#include <math.h>
#include <pthread.h>

#include "backend/cpu/cpu_internal.h"

float cpu_e4m3_table[256];
float cpu_e8m0_x256_table[256];

static void fill_tables(void) {
  for (int i = 0; i < 256; i++) {
    cpu_e4m3_table[i] = m3_e4m3_to_f32((uint8_t)i);
    cpu_e8m0_x256_table[i] = m3_e8m0_to_f32((uint8_t)i) * 256.0f;
  }
}

void cpu_init_tables(void) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, fill_tables);
}

static void decode_plain(m3_dtype dt, const uint8_t *src, int64_t n, float *dst) {
  switch (dt) {
    case M3_DT_F32: memcpy(dst, src, (size_t)n * 4); return;
    case M3_DT_BF16:
      for (int64_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, 2);
        dst[i] = m3_bf16_to_f32(h);
      }
      return;
    case M3_DT_F16:
      for (int64_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, 2);
        dst[i] = m3_f16_to_f32(h);
      }
      return;
    case M3_DT_F8_E4M3:
      for (int64_t i = 0; i < n; i++) dst[i] = cpu_e4m3_table[src[i]];
      return;
    default:
      if (m3_decode_f32(dt, src, dst, (size_t)n) != 0)
        for (int64_t i = 0; i < n; i++) dst[i] = NAN;
      return;
  }
}

void cpu_decode_row(const m3_tensor *w, int64_t r, int64_t c0, int64_t n, float *dst) {
  const size_t es = m3_dtype_size(w->dtype);
  const uint8_t *src = (const uint8_t *)w->data + ((size_t)r * (size_t)w->cols + (size_t)c0) * es;
  decode_plain(w->dtype, src, n, dst);
  if (w->quant == M3_WQ_MXFP8) {
    const uint8_t *scale = (const uint8_t *)w->scale + (size_t)r * (size_t)w->scale_cols;
    for (int64_t i = 0; i < n; i++) dst[i] *= m3_e8m0_to_f32(scale[(c0 + i) / 32]);
  } else if (w->quant == M3_WQ_FP8_BLOCK) {
    const float *scale = (const float *)w->scale + (size_t)(r / w->block_rows) * (size_t)w->scale_cols;
    for (int64_t i = 0; i < n; i++) dst[i] *= scale[(c0 + i) / w->block_cols];
  }
}
