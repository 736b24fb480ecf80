/* cuda_ops.h: the ops of the CUDA backend, one file per concern (semantics in backend/backend.h). */
#ifndef M3_BACKEND_CUDA_CUDA_OPS_H
#define M3_BACKEND_CUDA_CUDA_OPS_H

#include <cuda_bf16.h>

#include "backend/cuda/cuda_internal.h"

void cuda_embed(m3_backend *be, const m3_tensor *table, const int32_t *ids, int T, float *out);
void cuda_matmul(m3_backend *be, const m3_tensor *w, const float *x, int T, float *y);
void cuda_matmul_set(m3_backend *be, const float *x, int T, const m3_matmul_out *out, int n);
/* 1 when cuda_matmul runs w at T tokens (x as given: alignment counts) as a GEMM (cuBLASLt, or the
 * tiled kernel where it declines) rather than a GEMV or the E4M3 tensor-core kernel. */
int cuda_matmul_is_gemm(const m3_tensor *w, const float *x, int T);
/* The scratch bytes cuda_matmul_lane needs for w at T tokens. */
size_t cuda_matmul_lane_scratch(const m3_tensor *w, int T);
/* 1 when cuda_matmul_lane of w at T tokens reads x as one BF16 rounding of it (no hi + lo split,
 * not a float32 SGEMM), so that a copy made beforehand (cuda_to_bf16) can stand in for x. */
int cuda_matmul_takes_bf16(const m3_tensor *w, int T);
/* cuda_matmul of a cuda_matmul_is_gemm shape, the same result, on lane's stream with lane's
 * workspace and scratch (at least cuda_matmul_lane_scratch bytes): nothing of cb's own; lane NULL:
 * the backend's stream, workspace and scratch. xb: NULL, or x already as cuda_to_bf16 [T, K] for
 * a cuda_matmul_takes_bf16 shape, read instead of a fresh copy where that keeps cuBLASLt's plan
 * (x is still read should cuBLASLt decline). */
void cuda_matmul_lane(cuda_backend *cb, cuda_lane *lane, const m3_tensor *w, const float *x,
                      const __nv_bfloat16 *xb, int T, float *y);
/* out[i] = bf16(x[i]) for i < n (one rounding to nearest even) on `stream`. */
void cuda_to_bf16(cuda_backend *cb, cudaStream_t stream, const float *x, size_t n,
                  __nv_bfloat16 *out);
/* Destroys the cuBLASLt descriptors the plans hold (before the handle goes). */
void cuda_lt_plans_release(cuda_backend *cb);
void cuda_rmsnorm(m3_backend *be, const float *x, const m3_tensor *w, float eps, int nrows, int n,
                  float *y);
void cuda_rope(m3_backend *be, float *x, const int32_t *pos, int T, int nheads, int hd, int rot,
               double theta);
void cuda_rmsnorm_rope(m3_backend *be, float *x, const m3_tensor *w, float eps,
                       const int32_t *pos, int T, int nheads, int hd, int rot, double theta);
void cuda_swiglu_oai(m3_backend *be, const float *gate, const float *up, size_t n, float alpha,
                     float beta, float limit, float *out);
/* cuda_swiglu_oai on `stream`, with BF16(out) written to out_bf16 as well (NULL: none): the input
 * of a GEMM that takes a BF16 copy (cuda_matmul_lane), without a pass of its own. */
void cuda_swiglu_oai_copy(cuda_backend *cb, cudaStream_t stream, const float *gate, const float *up, size_t n,
                          float alpha, float beta, float limit, float *out, __nv_bfloat16 *out_bf16);
void cuda_add(m3_backend *be, float *x, const float *y, size_t n);
void cuda_add_rmsnorm(m3_backend *be, float *x, const float *y, const m3_tensor *w, float eps,
                      int nrows, int n, float *out);
m3_status cuda_argmax_rows(m3_backend *be, const float *logits, int nrows, int vocab,
                           int32_t *out_host);
void cuda_argmax_pairs(m3_backend *be, const float *logits, int nrows, int cols, int first,
                       float *pairs);
m3_status cuda_sample_rows(m3_backend *be, const float *logits, int nrows, int vocab,
                           const m3_row_sampling *rows, int32_t *out_host);
void cuda_kv_store(m3_backend *be, const m3_kv_view *kv, const int32_t *pos, int T, const float *k,
                   const float *v, const float *ik);
void cuda_kv_store_rope(m3_backend *be, const m3_kv_view *kv, const int32_t *pos, int T, const m3_attention_rows *r);
void cuda_msa_select(m3_backend *be, const float *iq, int G, const m3_kv_view *kv,
                     const int32_t *pos, int T, const m3_msa_params *p, int32_t *sel);
void cuda_attention(m3_backend *be, const float *q, int nh, const m3_kv_view *kv,
                    const int32_t *pos, int T, const int32_t *sel, int topk, float *out);
void cuda_moe_route(m3_backend *be, const float *logits, const float *bias, int T, int E, int k,
                    float scaling, int32_t *ids, float *weights);
m3_status cuda_prepare_experts(m3_backend *be, m3_moe_experts *ex);
void cuda_release_experts(m3_backend *be, m3_moe_experts *ex);
/* The lanes of the MoE prefill (M3_MOE_STREAMS, default MOE_DEFAULT_LANES in moe.cu), made at
 * backend creation and destroyed with the backend (after `stream` has finished). */
m3_status cuda_moe_lanes_create(cuda_backend *cb);
void cuda_moe_lanes_destroy(cuda_backend *cb);
void cuda_moe_experts(m3_backend *be, const m3_moe_experts *ex, const float *h, int T,
                      const int32_t *ids, const float *weights, int k, float *x);
/* The vision tower's ops (vision.cu), the op table's `vision`. */
extern const m3_vision_ops cuda_vision_ops;

#endif
