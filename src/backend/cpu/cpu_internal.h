/* cpu_internal.h: what the files of the CPU backend share: the backend object, the per-ISA kernel
 * table and the scalar weight decoder every kernel set falls back on for tails. */
#ifndef M3_BACKEND_CPU_CPU_INTERNAL_H
#define M3_BACKEND_CPU_CPU_INTERNAL_H

#include <stdint.h>

#include "backend/backend.h"
#include "backend/cpu/cpu.h"
#include "base/threadpool.h"

/* Columns per matmul chunk. Every kernel set sums a row's products chunk by chunk in the same
 * order whether it runs as a GEMV (T = 1) or on a decoded tile (T > 1): y starts at 0 and gets
 * each chunk's sum added, and within a chunk the lanes accumulate column groups in order, the
 * last group zero-padded, reduced by one fixed shuffle tree. So a token's output does not depend
 * on how many tokens share the call: decoding token by token gives the bits of one prefill. */
enum { CPU_K_CHUNK = 256 };

/* Kernels one instruction set provides. Weight rows are decoded on the fly; no kernel writes a
 * dequantized copy of more than one small tile. */
typedef struct {
  /* y[r - r0] = dot(W[r, :], x) for r in [r0, r1).  x [W.cols] */
  void (*gemv)(const m3_tensor *w, const float *x, int64_t r0, int64_t r1, float *y);
  /* dst[i * kc + k] = W[r0 + i, k0 + k] for i < nr, k < kc; k0 is a multiple of 32. Weights the
   * SIMD kernels take: F32, BF16, F16, MXFP8 and FP8 block with block_cols a power of two >= 32;
   * the portable set takes every float dtype. */
  void (*decode_tile)(const m3_tensor *w, int64_t r0, int nr, int64_t k0, int kc, float *dst);
  /* y[t * ldy + i] += dot(tile[i * kc ..], x[t * ldx ..]) over kc <= CPU_K_CHUNK, for t < T,
   * i < nr, summed in the order gemv uses for one chunk. */
  void (*tile_gemm)(const float *tile, int nr, int kc, const float *x, int64_t ldx, int T,
                    float *y, int64_t ldy);
  float (*dot)(const float *a, const float *b, int n);
  void (*axpy)(float *y, float a, const float *x, int n); /* y += a * x */
  /* o[i][:] += sum over j < n of p[i * ldp + j] * v[j][:] for i < nq.  v [n, d], o [nq, d] */
  void (*pv)(const float *p, int ldp, int nq, const float *v, int n, int d, float *o);
  void (*scale)(float *y, float a, int n);                /* y *= a */
  /* s[j] = exp(s[j] - m) for j < n (within 2 ulp of expf); returns the sum of the new s. */
  float (*exp_sum)(float *s, int n, float m);
  /* out[i] = E4M3 value of q[i] times scale, for i < n: an fp8 KV row (cpu_kv_rows), to the bit
   * the product cpu_e4m3_table[q[i]] * scale. Only for bytes kv_store wrote, which are never the
   * NaN codes. */
  void (*dequant_e4m3)(const uint8_t *q, int n, float scale, float *out);
} cpu_kernels;

extern const cpu_kernels cpu_kernels_portable;
#if defined(__x86_64__)
extern const cpu_kernels cpu_kernels_avx2;
extern const cpu_kernels cpu_kernels_avx512;
#endif

typedef struct {
  m3_backend base;
  m3_threadpool *pool;
  m3_cpu_isa isa;
  const cpu_kernels *k;
} cpu_backend;

static inline cpu_backend *cpu_of(m3_backend *be) { return (cpu_backend *)be; }

/* Columns [c0, c0 + n) of row r of w decoded to float32 with any quantization scale applied
 * (exact: each value is the float32 the stored element and scale represent). A dtype that is not
 * a float type decodes as NaN so that misuse shows up in the output. */
void cpu_decode_row(const m3_tensor *w, int64_t r, int64_t c0, int64_t n, float *dst);

/* The float32 value of each E4M3 byte (NaN for 0x7F / 0xFF). */
extern float cpu_e4m3_table[256];
/* 2^(e - 127) * 256 for each E8M0 byte e: the SIMD kernels decode E4M3 through F16, which leaves
 * every value 256 times too small (bias 15 against 7), and fold the 256 into the block scale. No
 * scale a quantizer derives from finite data (e <= 246) overflows. */
extern float cpu_e8m0_x256_table[256];
void cpu_init_tables(void);

/* How the SIMD kernels read one weight row: the decoder kind and the row's scales. */
typedef enum { CPU_W_F32, CPU_W_BF16, CPU_W_F16, CPU_W_MXFP8, CPU_W_FP8_BLOCK } cpu_wkind;

typedef struct {
  const uint8_t *data;  /* the row's first element */
  const uint8_t *mx;    /* MXFP8: the row's E8M0 scales */
  const float *fb;      /* FP8 block: the scales of the row's block row */
  int fb_shift;         /* FP8 block: log2 of the columns per scale (a power of two) */
} cpu_wrow;

static inline cpu_wkind cpu_wkind_of(const m3_tensor *w) {
  if (w->quant == M3_WQ_MXFP8) return CPU_W_MXFP8;
  if (w->quant == M3_WQ_FP8_BLOCK) return CPU_W_FP8_BLOCK;
  return w->dtype == M3_DT_F32 ? CPU_W_F32 : w->dtype == M3_DT_BF16 ? CPU_W_BF16 : CPU_W_F16;
}

static inline cpu_wrow cpu_wrow_at(const m3_tensor *w, int64_t r) {
  cpu_wrow row = {(const uint8_t *)w->data + (size_t)r * (size_t)w->cols * m3_dtype_size(w->dtype),
                  NULL, NULL, 0};
  while ((1 << row.fb_shift) < w->block_cols) row.fb_shift++;
  if (w->quant == M3_WQ_MXFP8) row.mx = (const uint8_t *)w->scale + (size_t)r * (size_t)w->scale_cols;
  if (w->quant == M3_WQ_FP8_BLOCK)
    row.fb = (const float *)w->scale + (size_t)(r / w->block_rows) * (size_t)w->scale_cols;
  return row;
}

/* How far ahead of the rows it reads a GEMV prefetches, in bytes: a whole number of 4-row
 * groups, at least GEMV_PREFETCH_BYTES. The SIMD GEMVs read 4 rows at once, 4 interleaved
 * streams of one row each; in the model's matrices a row is 0.5-2 KB, too short for the
 * hardware prefetcher to ramp up on, and without software prefetch such a GEMV reads memory at
 * about half the bandwidth that long rows get. Prefetches past the last row never fault. */
enum { GEMV_PREFETCH_BYTES = 8192 };
static inline size_t cpu_gemv_prefetch_distance(const m3_tensor *w) {
  size_t group = 4 * (size_t)w->cols * m3_dtype_size(w->dtype);
  return group == 0 ? 0 : (GEMV_PREFETCH_BYTES + group - 1) / group * group;
}

/* Writes the `k` indices of the largest scores to idx, best first; ties go to the lower index and
 * NaN ranks below everything. Requires k <= n. */
void cpu_topk(const float *score, int n, int k, int32_t *idx);

/* Rows [r0, r0 + n) of page `page` of one KV pool of kv (rows_per_page rows of dim values per
 * page; backend.h's layout) as float32 [n, dim]: an f32 pool's own memory, or an fp8 pool's rows
 * dequantized (E4M3 value * row scale) into tile [n, dim], which is then what is returned. The
 * one reader of the fp8 layout: attention and msa_select take their keys and values through it. */
const float *cpu_kv_rows(const cpu_kernels *k, const m3_kv_view *kv, const void *pool,
                         int32_t page, int rows_per_page, int dim, int r0, int n, float *tile);

/* The ops, one file per concern. */
void cpu_embed(m3_backend *be, const m3_tensor *table, const int32_t *ids, int T, float *out);
void cpu_matmul(m3_backend *be, const m3_tensor *w, const float *x, int T, float *y);
void cpu_rmsnorm(m3_backend *be, const float *x, const m3_tensor *w, float eps, int nrows, int n,
                 float *y);
void cpu_rope(m3_backend *be, float *x, const int32_t *pos, int T, int nheads, int hd, int rot,
              double theta);
void cpu_rmsnorm_rope(m3_backend *be, float *x, const m3_tensor *w, float eps,
                      const int32_t *pos, int T, int nheads, int hd, int rot, double theta);
void cpu_swiglu_oai(m3_backend *be, const float *gate, const float *up, size_t n, float alpha,
                    float beta, float limit, float *out);
void cpu_add(m3_backend *be, float *x, const float *y, size_t n);
void cpu_add_rmsnorm(m3_backend *be, float *x, const float *y, const m3_tensor *w, float eps,
                     int nrows, int n, float *out);
m3_status cpu_argmax_rows(m3_backend *be, const float *logits, int nrows, int vocab,
                          int32_t *out);
void cpu_argmax_pairs(m3_backend *be, const float *logits, int nrows, int cols, int first,
                      float *pairs);
void cpu_kv_store(m3_backend *be, const m3_kv_view *kv, const int32_t *pos, int T, const float *k,
                  const float *v, const float *ik);
void cpu_kv_store_rope(m3_backend *be, const m3_kv_view *kv, const int32_t *pos, int T, const m3_attention_rows *r);
void cpu_msa_select(m3_backend *be, const float *iq, int G, const m3_kv_view *kv,
                    const int32_t *pos, int T, const m3_msa_params *p, int32_t *sel);
void cpu_attention(m3_backend *be, const float *q, int nh, const m3_kv_view *kv,
                   const int32_t *pos, int T, const int32_t *sel, int topk, float *out);
void cpu_moe_route(m3_backend *be, const float *logits, const float *bias, int T, int E, int k,
                   float scaling, int32_t *ids, float *weights);
void cpu_moe_experts(m3_backend *be, const m3_moe_experts *ex, const float *h, int T,
                     const int32_t *ids, const float *weights, int k, float *x);

#endif
