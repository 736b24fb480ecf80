/* mxfp8.h: quantizing float32 rows to MXFP8 (OCP Microscaling, E4M3 elements, E8M0 scale per 32).
 *
 * Layout as in the MiniMax-M3-MXFP8 checkpoint (shared/spec/m3_text_spec.md §9.3): a row of n
 * values becomes n E4M3 bytes plus ceil(n/32) E8M0 bytes, block b covering columns
 * [32b, 32b+32) (the last block may be short), and x[i] ~= e4m3(q[i]) * 2^(scale[i/32] - 127). */
#ifndef M3_BASE_MXFP8_H
#define M3_BASE_MXFP8_H

#include <stdint.h>

#define M3_MXFP8_BLOCK 32

/* q_e4m3: n bytes; scale_e8m0: ceil(n / 32) bytes. */
void m3_mxfp8_quantize_row(const float *x, int64_t n, uint8_t *q_e4m3, uint8_t *scale_e8m0);

#endif
