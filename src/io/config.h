/* config.h: config.json -> struct m3_config.
 *
 * Accepts the VL wrapper (`text_config`, `vision_config`, image/video token ids,
 * `projector_hidden_size`) and a bare text config; both spellings of the sparse-attention settings
 * (legacy `sparse_attention_config` + `sparse_attention_freq` / `moe_layer_freq` arrays, and the
 * newer flat `index_*` keys + `layer_types` / `mlp_layer_types`); defaults as in
 * shared/spec/m3_text_spec.md §1. An inconsistent config is M3_ERR_CONFIG naming the key. */
#ifndef M3_IO_CONFIG_H
#define M3_IO_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

typedef enum { M3_ATTN_FULL = 0, M3_ATTN_SPARSE = 1 } m3_attn_kind;
typedef enum { M3_MLP_DENSE = 0, M3_MLP_MOE = 1 } m3_mlp_kind;

typedef enum {
  M3_QUANT_NONE = 0,
  M3_QUANT_MXFP8,     /* e4m3 weight + u8 e8m0 scale per 1x32 */
  M3_QUANT_FP8_BLOCK, /* e4m3 weight + f32 scale per block (128x128) */
  M3_QUANT_FP8,       /* e4m3 weight + per-channel / per-tensor `weight_scale`: "fp8" without
                       * weight_block_size, "compressed-tensors" in format "float-quantized" */
  M3_QUANT_OTHER,     /* a quant_method we do not know: reported, then rejected by weight binding */
} m3_quant_method;

typedef struct {
  int present;
  m3_quant_method method;
  char method_name[32];      /* quant_method as written */
  int block_rows, block_cols; /* weight_block_size, e.g. [1, 32] or [128, 128] */
  char activation_scheme[16];
} m3_quant_config;

typedef struct {
  int present;
  int hidden_size;           /* 1280 */
  int num_heads;             /* 16 */
  int num_layers;            /* 32 */
  int intermediate_size;     /* 5120 */
  int num_channels;          /* 3 */
  int patch_size;            /* 14 */
  int temporal_patch_size;   /* 2 */
  int spatial_merge_size;    /* 2 */
  float layer_norm_eps;      /* 1e-5 */
  double rope_theta;         /* 10000 */
  int segment_max_frames;    /* 4 (temporal patches) */
} m3_vision_config;

typedef struct {
  /* Text backbone. */
  int hidden_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size;
  int64_t max_position_embeddings;
  float rms_norm_eps;
  double rope_theta;
  int rotary_dim;            /* resolved rotated width (spec §3.2) */
  float swiglu_alpha, swiglu_beta, swiglu_limit;
  int intermediate_size;         /* routed expert width */
  int shared_intermediate_size;  /* shared expert width (0 when n_shared_experts == 0) */
  int dense_intermediate_size;   /* dense-layer MLP width */
  int num_experts, num_experts_per_tok, num_shared_experts;
  float routed_scaling_factor;
  int use_routing_bias;
  int tie_word_embeddings;
  int num_mtp_modules;
  int bos_token_id, eos_token_id;

  /* MiniMax Sparse Attention. */
  int index_num_heads, index_head_dim, index_block_size, index_topk_blocks;
  int index_local_blocks, index_init_blocks;

  /* Per layer, num_layers entries each (owned). */
  uint8_t *layer_attn; /* m3_attn_kind */
  uint8_t *layer_mlp;  /* m3_mlp_kind */

  /* VL wrapper. */
  int is_vl;
  char architecture[96];
  int image_token_id, video_token_id, projector_hidden_size;
  m3_vision_config vision;

  m3_quant_config quant;
} m3_config;

m3_status m3_config_load(const char *path, m3_config *out);
/* `label` names the source in error messages (usually the path). */
m3_status m3_config_parse(const char *json, size_t len, const char *label, m3_config *out);
void m3_config_free(m3_config *cfg);

/* Writes cfg as a config.json in the official VL layout (what `m3 tiny` uses). Keys are those
 * transformers 5.17 reads, so the file loads there too. */
m3_status m3_config_write(const m3_config *cfg, const char *path);

#endif
