/* weights.h: the official tensor names of a checkpoint, bound to the model's structure.
 *
 * m3_weights_bind walks the config, finds every tensor the model needs under any accepted
 * spelling (shared/spec/m3_text_spec.md §9, m3_vision_chat_spec.md §5), checks dtype and shape
 * against the config, attaches quantization scales, and reports a missing or unexpected tensor by
 * name. Tensors are views into the safetensors mapping; the only copies are those the weights own
 * (m3_weights_adopt): FP8 scales stored in another dtype than F32, and tensors quantized at load
 * (io/quantize.h). */
#ifndef M3_IO_WEIGHTS_H
#define M3_IO_WEIGHTS_H

#include <stdint.h>

#include "base/dtype.h"
#include "base/status.h"
#include "io/config.h"
#include "io/safetensors.h"

typedef enum {
  M3_WQ_NONE = 0, /* plain F32 / F16 / BF16 */
  M3_WQ_MXFP8,    /* data F8_E4M3 [rows, cols]; scale U8 e8m0 [rows, ceil(cols/32)] */
  M3_WQ_FP8_BLOCK /* data F8_E4M3 [rows, cols]; scale F32 [ceil(rows/br), ceil(cols/bc)]. Also
                   * per-channel FP8 (`weight_scale` [rows, 1]): br 1, bc the smallest power of two
                   * >= max(cols, 32), so one block spans a row and every backend's FP8-block
                   * kernel (SIMD ones need power-of-two blocks) runs it; per-tensor FP8 (`weight_scale`
                   * [] or [1]): br rows, bc as per-channel, one scale. */
} m3_weight_quant;

/* A weight matrix [rows, cols] (PyTorch [out, in]) or vector (rows = 1). Higher-rank tensors
 * (the vision patch embedding) are viewed as [shape[0], product of the rest]. */
typedef struct {
  const char *name;      /* the checkpoint name it was bound from; NULL when absent */
  const void *data;
  m3_dtype dtype;
  int64_t rows, cols;
  m3_weight_quant quant;
  const void *scale;     /* NULL unless quantized */
  int64_t scale_rows, scale_cols;
  int block_rows, block_cols; /* 1x32 for MXFP8, from the scale shape for FP8 block */
} m3_tensor;

static inline int m3_tensor_present(const m3_tensor *t) { return t->data != 0; }

/* Decodes row r of t (cols values) to float32, applying any quantization scale exactly:
 * MXFP8 w = e4m3 * 2^(s-127); FP8 block w = e4m3 * scale[r/br][c/bc]. */
void m3_tensor_row_f32(const m3_tensor *t, int64_t r, float *out);

typedef struct {
  m3_tensor input_norm, post_attn_norm;           /* [H] Gemma (1+w) */
  m3_tensor q_proj, k_proj, v_proj, o_proj;       /* [nh*hd, H], [nkv*hd, H] x2, [H, nh*hd] */
  m3_tensor q_norm, k_norm;                       /* [hd] */
  m3_tensor index_q_proj, index_k_proj;           /* sparse layers: [nih*ihd, H], [ihd, H] */
  m3_tensor index_q_norm, index_k_norm;           /* [ihd] */
  m3_tensor mlp_gate, mlp_up, mlp_down;           /* dense layers: [I, H], [I, H], [H, I] */
  m3_tensor router, router_bias;                  /* MoE: [E, H] (F32 in the checkpoint), [E] */
  m3_tensor *expert_gate, *expert_up, *expert_down; /* MoE: E each, w1 [I,H], w3 [I,H], w2 [H,I] */
  m3_tensor shared_gate, shared_up, shared_down;  /* MoE with shared experts: [S, H] .. [H, S] */
} m3_layer_weights;

typedef struct {
  m3_tensor enorm, hnorm;      /* [H] */
  m3_tensor eh_proj;           /* [H, 2H] over [embedding; hidden] */
  m3_tensor final_norm;        /* [H] */
  m3_layer_weights layer;      /* always sparse attention + MoE */
} m3_mtp_weights;

typedef struct {
  m3_tensor ln1_w, ln1_b, ln2_w, ln2_b;
  m3_tensor q_w, q_b, k_w, k_b, v_w, v_b, out_w, out_b;
  m3_tensor fc1_w, fc1_b, fc2_w, fc2_b;
} m3_vision_layer_weights;

typedef struct {
  int present;
  m3_tensor patch_embed;              /* [D, C*tp*p*p] viewed from [D, C, tp, p, p] */
  m3_tensor pre_ln_w, pre_ln_b;
  m3_vision_layer_weights *layers;    /* vision.num_layers */
  m3_tensor proj1_w, proj1_b, proj2_w, proj2_b;    /* multi_modal_projector.linear_{1,2} */
  m3_tensor merge1_w, merge1_b, merge2_w, merge2_b; /* patch_merge_mlp.linear_{1,2} */
} m3_vision_weights;

typedef struct {
  m3_tensor embed;             /* [V, H] */
  m3_tensor final_norm;        /* [H] */
  m3_tensor lm_head;           /* [V, H]; equal to embed when tied */
  int lm_head_tied;            /* 1 when the checkpoint has no lm_head (or config ties) */
  m3_layer_weights *layers;    /* num_layers */
  int num_mtp;                 /* MTP modules found in the checkpoint (0 if none) */
  m3_mtp_weights *mtp;
  m3_vision_weights vision;
  const char *prefix;          /* "language_model." or "" as found */
  int num_quantized;           /* tensors with a scale attached */
  void **owned;                /* memory the tensors point into besides the mapping; freed here */
  int num_owned, cap_owned;
  const void **replaced;       /* checkpoint data no tensor reads any more (quantized at load) */
  int num_replaced;
} m3_weights;

m3_status m3_weights_bind(const m3_config *cfg, const m3_safetensors *st, m3_weights *out);
/* Hands `mem` (malloc'd) to w, which frees it in m3_weights_free; on failure frees it at once.
 * `replaced` is NULL, or the checkpoint data `mem` stands in for (listed in w->replaced). */
m3_status m3_weights_adopt(m3_weights *w, void *mem, const void *replaced);
void m3_weights_free(m3_weights *w);

#endif
