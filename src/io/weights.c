/* weights.c: binds checkpoint tensors to the model's structure (see weights.h).
 *
 * Every tensor of the checkpoint must end up in exactly one slot (or be the scale of one), so a
 * checkpoint that does not match the config fails by name instead of loading half a model.
 * Names follow shared/spec/m3_text_spec.md §2, §8.5, §9 and m3_vision_chat_spec.md §5. */
#include "io/weights.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/mxfp8.h"

#define VL_PREFIX "language_model."
#define MTP_STEM "model.mtp.layers."

enum { NAME_CAP = 512, MAX_WANT_DIMS = 5 };
enum { OPTIONAL = 0, REQUIRED = 1 };
/* DeepSeek-style FP8 checkpoints use 128x128 blocks when the config does not say otherwise. */
enum { FP8_DEFAULT_BLOCK = 128 };

#define TRY(expr)                       \
  do {                                  \
    m3_status try_s_ = (expr);          \
    if (try_s_ != M3_OK) return try_s_; \
  } while (0)

typedef struct {
  int ndim;
  int64_t d[MAX_WANT_DIMS];
} want_shape;

static want_shape vec(int64_t n) { return (want_shape){1, {n}}; }
static want_shape mat(int64_t rows, int64_t cols) { return (want_shape){2, {rows, cols}}; }

typedef struct {
  const m3_config *cfg;
  const m3_safetensors *st;
  m3_weights *w;
  int count;  /* tensors in the checkpoint */
  int *table; /* open addressing: tensor index + 1, 0 = empty */
  size_t table_mask;
  uint8_t *claimed; /* per tensor index */
  int fp8_block_rows, fp8_block_cols;
} binder;

static uint64_t hash_name(const char *s) {
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
  return h;
}

static int lookup(const binder *b, const char *name) {
  for (size_t i = hash_name(name) & b->table_mask;; i = (i + 1) & b->table_mask) {
    int slot = b->table[i];
    if (slot == 0) return -1;
    if (strcmp(m3_st_at(b->st, slot - 1)->name, name) == 0) return slot - 1;
  }
}

static m3_status index_names(binder *b) {
  size_t cap = 16;
  while (cap < 2 * (size_t)b->count) cap *= 2;
  b->table = calloc(cap, sizeof *b->table);
  b->claimed = calloc((size_t)b->count + 1, 1);
  if (!b->table || !b->claimed)
    return m3_fail(M3_ERR_NOMEM, "weights: name index of %d tensors", b->count);
  b->table_mask = cap - 1;
  for (int t = 0; t < b->count; t++) {
    size_t i = hash_name(m3_st_at(b->st, t)->name) & b->table_mask;
    while (b->table[i]) i = (i + 1) & b->table_mask;
    b->table[i] = t + 1;
  }
  return M3_OK;
}

static void format_dims(char *buf, size_t cap, int ndim, const int64_t *d) {
  size_t n = (size_t)snprintf(buf, cap, "[");
  for (int i = 0; i < ndim && n < cap; i++)
    n += (size_t)snprintf(buf + n, cap - n, "%s%lld", i ? ", " : "", (long long)d[i]);
  if (n < cap) snprintf(buf + n, cap - n, "]");
}

static m3_status check_shape(const m3_st_tensor *t, want_shape want) {
  int same = t->ndim == want.ndim;
  for (int i = 0; same && i < want.ndim; i++) same = t->shape[i] == want.d[i];
  if (same) return M3_OK;
  char found[160], expected[160];
  format_dims(found, sizeof found, t->ndim, t->shape);
  format_dims(expected, sizeof expected, want.ndim, want.d);
  return m3_fail(M3_ERR_SHAPE, "tensor %s: shape %s, expected %s", t->name, found, expected);
}

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

static int64_t pow2_at_least(int64_t n) {
  int64_t p = 32;
  while (p < n) p *= 2;
  return p;
}

/* An FP8 scale as float32: a view when stored F32 (and aligned), else a decoded copy the weights
 * own (compressed-tensors stores per-channel scales in the model's dtype, BF16). */
static m3_status scale_as_f32(binder *b, const m3_st_tensor *scale, const void **out) {
  if (scale->dtype == M3_DT_F32 && (uintptr_t)scale->data % 4 == 0) {
    *out = scale->data;
    return M3_OK;
  }
  size_t n = scale->nbytes / m3_dtype_size(scale->dtype);
  float *f = malloc((n ? n : 1) * sizeof *f);
  if (!f) return m3_fail(M3_ERR_NOMEM, "tensor %s: %zu scales", scale->name, n);
  m3_decode_f32(scale->dtype, scale->data, f, n);
  *out = f;
  return m3_weights_adopt(b->w, f, NULL);
}

/* `<X>.weight_scale` (compressed-tensors / fp8 per-channel or per-tensor): F32, BF16 or F16 of
 * shape [rows, 1] or [rows] (one scale per output row), [] or [1] (one for the whole matrix). */
static m3_status attach_channel_scale(binder *b, m3_tensor *out, const m3_st_tensor *data,
                                      const m3_st_tensor *scale) {
  if (scale->dtype != M3_DT_F32 && scale->dtype != M3_DT_BF16 && scale->dtype != M3_DT_F16)
    return m3_fail(M3_ERR_SHAPE, "tensor %s: dtype %s (F32, BF16 or F16 per-channel scales)",
                   scale->name, m3_dtype_name(scale->dtype));
  int64_t rows = data->shape[0], n = 1;
  for (int i = 0; i < scale->ndim; i++) n *= scale->shape[i];
  int per_channel = (scale->ndim == 2 && scale->shape[1] == 1) || scale->ndim == 1;
  if (!(per_channel && n == rows) && !(scale->ndim <= 1 && n == 1)) {
    char found[160];
    format_dims(found, sizeof found, scale->ndim, scale->shape);
    return m3_fail(M3_ERR_SHAPE, "tensor %s: shape %s, expected [%lld, 1] or [%lld] (one scale "
                   "per row of %s) or [] / [1] (one per tensor)", scale->name, found,
                   (long long)rows, (long long)rows, data->name);
  }
  TRY(scale_as_f32(b, scale, &out->scale));
  out->quant = M3_WQ_FP8_BLOCK;
  out->scale_rows = n;
  out->scale_cols = 1;
  out->block_rows = n == rows ? 1 : (int)rows;
  out->block_cols = (int)pow2_at_least(data->shape[1]);
  return M3_OK;
}

/* Attaches the scale of the F8_E4M3 weight `<X>.weight`: `<X>.weight_scale_inv`, whose dtype says
 * the format (U8 e8m0 per 1x32 = MXFP8, F32 per block = FP8 block), or `<X>.weight_scale`
 * (per-channel FP8). Per tensor, because checkpoints mix quantized and plain tensors (spec §9.3:
 * indexer and MTP eh_proj vary). */
static m3_status attach_scale(binder *b, m3_tensor *out, const m3_st_tensor *data) {
  /* Bound names are shorter than NAME_CAP (bind builds them there), so the suffix always fits. */
  char scale_name[NAME_CAP + sizeof "_scale_inv"], channel_name[NAME_CAP + sizeof "_scale"];
  size_t len = strlen(data->name);
  int is_weight = len > 7 && strcmp(data->name + len - 7, ".weight") == 0;
  snprintf(scale_name, sizeof scale_name, "%s_scale_inv", data->name);
  snprintf(channel_name, sizeof channel_name, "%s_scale", data->name);
  int idx = is_weight ? lookup(b, scale_name) : -1;
  int channel_idx = is_weight ? lookup(b, channel_name) : -1;
  if (idx >= 0 && channel_idx >= 0)
    return m3_fail(M3_ERR_UNEXPECTED, "tensor %s: has both %s and %s", data->name, scale_name,
                   channel_name);
  if (idx < 0) idx = channel_idx;
  if (idx < 0) {
    if (data->dtype != M3_DT_F8_E4M3) return M3_OK;
    if (!is_weight)
      return m3_fail(M3_ERR_SHAPE, "tensor %s: dtype F8_E4M3 (only a .weight can be quantized)",
                     data->name);
    return m3_fail(M3_ERR_MISSING, "tensor %s: F8_E4M3 without its scale %s (or %s)", data->name,
                   scale_name, channel_name);
  }
  const m3_st_tensor *scale = m3_st_at(b->st, idx);
  if (data->dtype != M3_DT_F8_E4M3)
    return m3_fail(M3_ERR_SHAPE, "tensor %s: has a scale %s but dtype %s (only F8_E4M3 takes one)",
                   data->name, scale->name, m3_dtype_name(data->dtype));
  if (data->ndim != 2)
    return m3_fail(M3_ERR_SHAPE, "tensor %s: quantized tensor of rank %d (only matrices are)",
                   data->name, data->ndim);
  b->claimed[idx] = 1;
  b->w->num_quantized++;
  if (idx == channel_idx) return attach_channel_scale(b, out, data, scale);
  int br, bc;
  if (scale->dtype == M3_DT_U8) {
    out->quant = M3_WQ_MXFP8;
    br = 1;
    bc = M3_MXFP8_BLOCK;
  } else if (scale->dtype == M3_DT_F32) {
    out->quant = M3_WQ_FP8_BLOCK;
    br = b->fp8_block_rows;
    bc = b->fp8_block_cols;
  } else {
    return m3_fail(M3_ERR_SHAPE, "tensor %s: dtype %s (U8 e8m0 for MXFP8, F32 for FP8 block)",
                   scale->name, m3_dtype_name(scale->dtype));
  }
  m3_status s = check_shape(scale, mat(ceil_div(data->shape[0], br), ceil_div(data->shape[1], bc)));
  if (s != M3_OK) return s;
  out->scale = scale->data;
  out->scale_rows = scale->shape[0];
  out->scale_cols = scale->shape[1];
  out->block_rows = br;
  out->block_cols = bc;
  return M3_OK;
}

static m3_status bind_index(binder *b, m3_tensor *out, int idx, want_shape want) {
  const m3_st_tensor *t = m3_st_at(b->st, idx);
  m3_status s = check_shape(t, want);
  if (s != M3_OK) return s;
  if (t->dtype != M3_DT_F32 && t->dtype != M3_DT_F16 && t->dtype != M3_DT_BF16 &&
      t->dtype != M3_DT_F8_E4M3)
    return m3_fail(M3_ERR_SHAPE,
                   "tensor %s: dtype %s is not a weight dtype (F32, F16, BF16, F8_E4M3)", t->name,
                   m3_dtype_name(t->dtype));
  /* Kernels load elements in place from the mapping; every known writer (the reference one and
   * ours) aligns each tensor to its element size, and one that did not would need a copy. */
  if ((uintptr_t)t->data % m3_dtype_size(t->dtype) != 0)
    return m3_fail(M3_ERR_FORMAT, "tensor %s: data not aligned to its %zu-byte elements",
                   t->name, m3_dtype_size(t->dtype));
  *out = (m3_tensor){.name = t->name, .data = t->data, .dtype = t->dtype, .quant = M3_WQ_NONE};
  /* Vectors are one row; higher ranks (the Conv3d patch embedding) fold into the columns. */
  out->rows = t->ndim == 1 ? 1 : t->shape[0];
  out->cols = 1;
  for (int i = t->ndim == 1 ? 0 : 1; i < t->ndim; i++) out->cols *= t->shape[i];
  b->claimed[idx] = 1;
  return attach_scale(b, out, t);
}

/* Binds `base + sub`, or `base + alt_sub` when that is the spelling present (alt_sub may be NULL).
 * An absent optional tensor leaves *out zeroed. */
static m3_status bind(binder *b, m3_tensor *out, int required, want_shape want, const char *base,
                      const char *sub, const char *alt_sub) {
  char name[NAME_CAP], alt[NAME_CAP];
  snprintf(name, sizeof name, "%s%s", base, sub);
  int idx = lookup(b, name);
  if (idx < 0 && alt_sub) {
    snprintf(alt, sizeof alt, "%s%s", base, alt_sub);
    idx = lookup(b, alt);
  }
  if (idx >= 0) return bind_index(b, out, idx, want);
  if (!required) return M3_OK;
  if (alt_sub) return m3_fail(M3_ERR_MISSING, "missing tensor %s (or %s)", name, alt);
  return m3_fail(M3_ERR_MISSING, "missing tensor %s", name);
}

static m3_status bind_attention(binder *b, m3_layer_weights *l, const char *base, int sparse) {
  const m3_config *c = b->cfg;
  int64_t H = c->hidden_size, hd = c->head_dim;
  int64_t q_width = (int64_t)c->num_heads * hd, kv_width = (int64_t)c->num_kv_heads * hd;
  TRY(bind(b, &l->input_norm, REQUIRED, vec(H), base, "input_layernorm.weight", NULL));
  TRY(bind(b, &l->post_attn_norm, REQUIRED, vec(H), base, "post_attention_layernorm.weight", NULL));
  TRY(bind(b, &l->q_proj, REQUIRED, mat(q_width, H), base, "self_attn.q_proj.weight", NULL));
  TRY(bind(b, &l->k_proj, REQUIRED, mat(kv_width, H), base, "self_attn.k_proj.weight", NULL));
  TRY(bind(b, &l->v_proj, REQUIRED, mat(kv_width, H), base, "self_attn.v_proj.weight", NULL));
  TRY(bind(b, &l->o_proj, REQUIRED, mat(H, q_width), base, "self_attn.o_proj.weight", NULL));
  TRY(bind(b, &l->q_norm, REQUIRED, vec(hd), base, "self_attn.q_norm.weight", NULL));
  TRY(bind(b, &l->k_norm, REQUIRED, vec(hd), base, "self_attn.k_norm.weight", NULL));
  if (!sparse) return M3_OK;
  int64_t ihd = c->index_head_dim;
  TRY(bind(b, &l->index_q_proj, REQUIRED, mat((int64_t)c->index_num_heads * ihd, H), base,
           "self_attn.index_q_proj.weight", NULL));
  TRY(bind(b, &l->index_k_proj, REQUIRED, mat(ihd, H), base, "self_attn.index_k_proj.weight",
           NULL));
  TRY(bind(b, &l->index_q_norm, REQUIRED, vec(ihd), base, "self_attn.index_q_norm.weight", NULL));
  TRY(bind(b, &l->index_k_norm, REQUIRED, vec(ihd), base, "self_attn.index_k_norm.weight", NULL));
  return M3_OK;
}

/* transformers 5.17 save_pretrained writes the dense MLP under `block_sparse_moe.` (spec §9.1). */
static m3_status bind_dense_mlp(binder *b, m3_layer_weights *l, const char *base) {
  int64_t H = b->cfg->hidden_size, I = b->cfg->dense_intermediate_size;
  TRY(bind(b, &l->mlp_gate, REQUIRED, mat(I, H), base, "mlp.gate_proj.weight",
           "block_sparse_moe.gate_proj.weight"));
  TRY(bind(b, &l->mlp_up, REQUIRED, mat(I, H), base, "mlp.up_proj.weight",
           "block_sparse_moe.up_proj.weight"));
  TRY(bind(b, &l->mlp_down, REQUIRED, mat(H, I), base, "mlp.down_proj.weight",
           "block_sparse_moe.down_proj.weight"));
  return M3_OK;
}

/* `experts` is room for 3 x num_experts tensors: [gate x E | up x E | down x E]. */
static m3_status bind_moe(binder *b, m3_layer_weights *l, const char *base, m3_tensor *experts) {
  const m3_config *c = b->cfg;
  int64_t H = c->hidden_size, E = c->num_experts, I = c->intermediate_size;
  TRY(bind(b, &l->router, REQUIRED, mat(E, H), base, "block_sparse_moe.gate.weight", NULL));
  /* The official checkpoint keeps the bias at block level; accept it under the gate too. */
  TRY(bind(b, &l->router_bias, c->use_routing_bias ? REQUIRED : OPTIONAL, vec(E), base,
           "block_sparse_moe.e_score_correction_bias",
           "block_sparse_moe.gate.e_score_correction_bias"));
  l->expert_gate = experts;
  l->expert_up = experts + E;
  l->expert_down = experts + 2 * E;
  for (int64_t e = 0; e < E; e++) {
    char sub[96];
    snprintf(sub, sizeof sub, "block_sparse_moe.experts.%lld.w1.weight", (long long)e);
    TRY(bind(b, &l->expert_gate[e], REQUIRED, mat(I, H), base, sub, NULL));
    snprintf(sub, sizeof sub, "block_sparse_moe.experts.%lld.w3.weight", (long long)e);
    TRY(bind(b, &l->expert_up[e], REQUIRED, mat(I, H), base, sub, NULL));
    snprintf(sub, sizeof sub, "block_sparse_moe.experts.%lld.w2.weight", (long long)e);
    TRY(bind(b, &l->expert_down[e], REQUIRED, mat(H, I), base, sub, NULL));
  }
  if (c->num_shared_experts <= 0) return M3_OK;
  int64_t S = c->shared_intermediate_size;
  TRY(bind(b, &l->shared_gate, REQUIRED, mat(S, H), base,
           "block_sparse_moe.shared_experts.gate_proj.weight", NULL));
  TRY(bind(b, &l->shared_up, REQUIRED, mat(S, H), base,
           "block_sparse_moe.shared_experts.up_proj.weight", NULL));
  TRY(bind(b, &l->shared_down, REQUIRED, mat(H, S), base,
           "block_sparse_moe.shared_experts.down_proj.weight", NULL));
  return M3_OK;
}

static m3_status bind_layer(binder *b, m3_layer_weights *l, const char *base, int sparse,
                            m3_tensor *experts) {
  TRY(bind_attention(b, l, base, sparse));
  return experts ? bind_moe(b, l, base, experts) : bind_dense_mlp(b, l, base);
}

/* One zeroed allocation holding `n` structs of `size` bytes followed by room for the experts of
 * `n_moe` MoE layers, so m3_weights_free releases a layer array and all its experts with one
 * free() (m3_weights keeps no layer count to walk). *experts points at the expert room. */
static void *alloc_layers(binder *b, size_t n, size_t size, size_t n_moe, m3_tensor **experts) {
  size_t per_layer = 3 * (size_t)(b->cfg->num_experts > 0 ? b->cfg->num_experts : 0);
  _Static_assert(sizeof(m3_layer_weights) % _Alignof(m3_tensor) == 0, "expert room alignment");
  _Static_assert(sizeof(m3_mtp_weights) % _Alignof(m3_tensor) == 0, "expert room alignment");
  char *block = calloc(1, n * size + n_moe * per_layer * sizeof(m3_tensor) + 1);
  *experts = block ? (m3_tensor *)(block + n * size) : NULL;
  return block;
}

/* MTP modules are counted from the checkpoint, not the config: the BF16 release has
 * num_mtp_modules = 7 and no MTP tensors, the MTP release one module (spec §8.2). Returns the
 * highest `<prefix>model.mtp.layers.<i>.` index + 1; a gap shows up as a missing tensor later. */
static m3_status count_mtp(const binder *b, int *out) {
  char stem[64];
  snprintf(stem, sizeof stem, "%s" MTP_STEM, b->w->prefix);
  size_t stem_len = strlen(stem);
  int count = 0;
  for (int t = 0; t < b->count; t++) {
    const char *name = m3_st_at(b->st, t)->name;
    if (strncmp(name, stem, stem_len) != 0) continue;
    const char *p = name + stem_len;
    int64_t i = 0;
    int digits = 0;
    for (; *p >= '0' && *p <= '9' && i <= b->count; p++, digits++) i = i * 10 + (*p - '0');
    /* Not a module name, or an index past the tensor count (such a module cannot be complete):
     * left unclaimed, so it is reported as unexpected. */
    if (!digits || *p != '.' || i >= b->count) continue;
    if (i + 1 > count) count = (int)i + 1;
  }
  *out = count;
  return M3_OK;
}

static m3_status bind_mtp(binder *b) {
  m3_weights *w = b->w;
  TRY(count_mtp(b, &w->num_mtp));
  if (w->num_mtp == 0) return M3_OK;
  m3_tensor *experts;
  w->mtp = alloc_layers(b, (size_t)w->num_mtp, sizeof *w->mtp, (size_t)w->num_mtp, &experts);
  if (!w->mtp) return m3_fail(M3_ERR_NOMEM, "weights: %d MTP modules", w->num_mtp);
  int64_t H = b->cfg->hidden_size, per_layer = 3 * (int64_t)b->cfg->num_experts;
  for (int i = 0; i < w->num_mtp; i++) {
    m3_mtp_weights *m = &w->mtp[i];
    char base[NAME_CAP], layer_base[NAME_CAP];
    snprintf(base, sizeof base, "%s" MTP_STEM "%d.", w->prefix, i);
    snprintf(layer_base, sizeof layer_base, "%s" MTP_STEM "%d.transformer_layer.", w->prefix, i);
    TRY(bind(b, &m->enorm, REQUIRED, vec(H), base, "enorm.weight", NULL));
    TRY(bind(b, &m->hnorm, REQUIRED, vec(H), base, "hnorm.weight", NULL));
    TRY(bind(b, &m->eh_proj, REQUIRED, mat(H, 2 * H), base, "eh_proj.weight", NULL));
    TRY(bind(b, &m->final_norm, REQUIRED, vec(H), base, "final_layernorm.weight", NULL));
    /* Always sparse attention + MoE, whatever the last decoder layer is (spec §8.1). */
    TRY(bind_layer(b, &m->layer, layer_base, 1, experts + i * per_layer));
  }
  return M3_OK;
}

static int is_vision_name(const char *name) {
  return strncmp(name, "vision_tower.", 13) == 0 ||
         strncmp(name, "multi_modal_projector.", 22) == 0 ||
         strncmp(name, "patch_merge_mlp.", 16) == 0;
}

/* Linear with its bias: projector and encoder linears always have one (nn.Linear(bias=True) in
 * the reference), so both are required. */
static m3_status bind_linear(binder *b, m3_tensor *wt, m3_tensor *bias, int64_t rows, int64_t cols,
                             const char *base, const char *stem, const char *alt_stem) {
  char sub[128], alt[128], sub_b[128], alt_b[128];
  snprintf(sub, sizeof sub, "%s.weight", stem);
  snprintf(sub_b, sizeof sub_b, "%s.bias", stem);
  if (alt_stem) {
    snprintf(alt, sizeof alt, "%s.weight", alt_stem);
    snprintf(alt_b, sizeof alt_b, "%s.bias", alt_stem);
  }
  TRY(bind(b, wt, REQUIRED, mat(rows, cols), base, sub, alt_stem ? alt : NULL));
  return bind(b, bias, REQUIRED, vec(rows), base, sub_b, alt_stem ? alt_b : NULL);
}

static m3_status bind_vision(binder *b) {
  const m3_config *c = b->cfg;
  const m3_vision_config *vc = &c->vision;
  m3_vision_weights *v = &b->w->vision;
  int64_t D = vc->hidden_size, Iv = vc->intermediate_size, H = c->hidden_size;
  int64_t P = c->projector_hidden_size,
          merge = (int64_t)vc->spatial_merge_size * vc->spatial_merge_size;
  const char *tower = "vision_tower.vision_model.";
  v->present = 1;
  want_shape patch = {
      5, {D, vc->num_channels, vc->temporal_patch_size, vc->patch_size, vc->patch_size}};
  TRY(bind(b, &v->patch_embed, REQUIRED, patch, tower, "embeddings.patch_embedding.weight", NULL));
  TRY(bind(b, &v->pre_ln_w, REQUIRED, vec(D), tower, "pre_layrnorm.weight", NULL));
  TRY(bind(b, &v->pre_ln_b, REQUIRED, vec(D), tower, "pre_layrnorm.bias", NULL));
  v->layers = calloc((size_t)(vc->num_layers > 0 ? vc->num_layers : 0) + 1, sizeof *v->layers);
  if (!v->layers) return m3_fail(M3_ERR_NOMEM, "weights: %d vision layers", vc->num_layers);
  for (int i = 0; i < vc->num_layers; i++) {
    m3_vision_layer_weights *l = &v->layers[i];
    char base[NAME_CAP];
    snprintf(base, sizeof base, "%sencoder.layers.%d.", tower, i);
    TRY(bind(b, &l->ln1_w, REQUIRED, vec(D), base, "layer_norm1.weight", NULL));
    TRY(bind(b, &l->ln1_b, REQUIRED, vec(D), base, "layer_norm1.bias", NULL));
    TRY(bind(b, &l->ln2_w, REQUIRED, vec(D), base, "layer_norm2.weight", NULL));
    TRY(bind(b, &l->ln2_b, REQUIRED, vec(D), base, "layer_norm2.bias", NULL));
    TRY(bind_linear(b, &l->q_w, &l->q_b, D, D, base, "self_attn.q_proj", NULL));
    TRY(bind_linear(b, &l->k_w, &l->k_b, D, D, base, "self_attn.k_proj", NULL));
    TRY(bind_linear(b, &l->v_w, &l->v_b, D, D, base, "self_attn.v_proj", NULL));
    TRY(bind_linear(b, &l->out_w, &l->out_b, D, D, base, "self_attn.out_proj", NULL));
    /* transformers 5.17 re-saves the vision MLP as block_sparse_moe.fc{1,2} (vision spec §5.1). */
    TRY(bind_linear(b, &l->fc1_w, &l->fc1_b, Iv, D, base, "mlp.fc1", "block_sparse_moe.fc1"));
    TRY(bind_linear(b, &l->fc2_w, &l->fc2_b, D, Iv, base, "mlp.fc2", "block_sparse_moe.fc2"));
  }
  /* Projector: Dv -> P -> H per patch, then merge 2x2 patches: merge*H -> P -> H (spec §4.7). */
  TRY(bind_linear(b, &v->proj1_w, &v->proj1_b, P, D, "", "multi_modal_projector.linear_1", NULL));
  TRY(bind_linear(b, &v->proj2_w, &v->proj2_b, H, P, "", "multi_modal_projector.linear_2", NULL));
  TRY(bind_linear(b, &v->merge1_w, &v->merge1_b, P, merge * H, "", "patch_merge_mlp.linear_1",
                  NULL));
  TRY(bind_linear(b, &v->merge2_w, &v->merge2_b, H, P, "", "patch_merge_mlp.linear_2", NULL));
  return M3_OK;
}

static m3_status bind_text(binder *b) {
  const m3_config *c = b->cfg;
  m3_weights *w = b->w;
  int64_t H = c->hidden_size, V = c->vocab_size;
  char model_base[64];
  snprintf(model_base, sizeof model_base, "%smodel.", w->prefix);
  TRY(bind(b, &w->embed, REQUIRED, mat(V, H), model_base, "embed_tokens.weight", NULL));
  TRY(bind(b, &w->final_norm, REQUIRED, vec(H), model_base, "norm.weight", NULL));
  /* As transformers does: a tying config uses the embedding even when the file also holds an
   * lm_head (tie_weights overwrites it after loading); an untied config without lm_head also
   * falls back to the embedding, as weights.h promises. */
  TRY(bind(b, &w->lm_head, OPTIONAL, mat(V, H), w->prefix, "lm_head.weight", NULL));
  if (c->tie_word_embeddings || !m3_tensor_present(&w->lm_head)) {
    if (m3_tensor_present(&w->lm_head) && w->lm_head.quant != M3_WQ_NONE) w->num_quantized--;
    w->lm_head = w->embed;
    w->lm_head_tied = 1;
  }
  int n_layers = c->num_layers > 0 ? c->num_layers : 0, n_moe = 0;
  for (int i = 0; i < n_layers; i++) n_moe += c->layer_mlp[i] == M3_MLP_MOE;
  m3_tensor *experts;
  w->layers = alloc_layers(b, (size_t)n_layers, sizeof *w->layers, (size_t)n_moe, &experts);
  if (!w->layers) return m3_fail(M3_ERR_NOMEM, "weights: %d layers", c->num_layers);
  for (int i = 0; i < n_layers; i++) {
    char base[NAME_CAP];
    snprintf(base, sizeof base, "%slayers.%d.", model_base, i);
    int moe = c->layer_mlp[i] == M3_MLP_MOE;
    TRY(bind_layer(b, &w->layers[i], base, c->layer_attn[i] == M3_ATTN_SPARSE,
                   moe ? experts : NULL));
    if (moe) experts += 3 * (int64_t)c->num_experts;
  }
  return M3_OK;
}

/* FP8 block size: quantization_config.weight_block_size when the config declares FP8 blocks,
 * else 128x128. An unknown quant_method is rejected here, as config.h promises. */
static m3_status choose_quant(binder *b) {
  const m3_quant_config *q = &b->cfg->quant;
  b->fp8_block_rows = b->fp8_block_cols = FP8_DEFAULT_BLOCK;
  if (!q->present) return M3_OK;
  if (q->method == M3_QUANT_OTHER)
    return m3_fail(M3_ERR_UNSUPPORTED,
                   "quantization_config.quant_method \"%s\" is not supported (mxfp8, fp8, "
                   "compressed-tensors in format float-quantized)",
                   q->method_name);
  if (q->block_rows <= 0 || q->block_cols <= 0) return M3_OK;
  if (q->method == M3_QUANT_FP8_BLOCK) {
    b->fp8_block_rows = q->block_rows;
    b->fp8_block_cols = q->block_cols;
  } else if (q->method == M3_QUANT_MXFP8 &&
             (q->block_rows != 1 || q->block_cols != M3_MXFP8_BLOCK)) {
    return m3_fail(M3_ERR_UNSUPPORTED,
                   "quantization_config.weight_block_size [%d, %d] for mxfp8 (only [1, 32])",
                   q->block_rows, q->block_cols);
  }
  return M3_OK;
}

static m3_status report_leftover(const binder *b) {
  for (int t = 0; t < b->count; t++) {
    if (b->claimed[t]) continue;
    const m3_st_tensor *x = m3_st_at(b->st, t);
    return m3_fail(M3_ERR_UNEXPECTED,
                   "unexpected tensor %s in %s (not part of the model this config describes)",
                   x->name, m3_st_shard_path(b->st, x->shard));
  }
  return M3_OK;
}

static m3_status bind_all(binder *b) {
  const m3_config *c = b->cfg;
  m3_weights *w = b->w;
  TRY(choose_quant(b));
  TRY(index_names(b));
  /* The prefix is whatever the embedding uses; every other text name must follow it. */
  w->prefix = lookup(b, VL_PREFIX "model.embed_tokens.weight") >= 0 ? VL_PREFIX : "";
  TRY(bind_text(b));
  TRY(bind_mtp(b));
  int has_vision = 0;
  for (int t = 0; t < b->count && !has_vision; t++)
    has_vision = is_vision_name(m3_st_at(b->st, t)->name);
  /* A VL config over a text-only checkpoint binds text only; vision tensors under a text-only
   * config stay unclaimed and are reported. */
  if (c->vision.present && has_vision) TRY(bind_vision(b));
  return report_leftover(b);
}

m3_status m3_weights_bind(const m3_config *cfg, const m3_safetensors *st, m3_weights *out) {
  memset(out, 0, sizeof *out);
  binder b = {.cfg = cfg, .st = st, .w = out, .count = m3_st_count(st)};
  m3_status s = bind_all(&b);
  free(b.table);
  free(b.claimed);
  if (s != M3_OK) m3_weights_free(out);
  return s;
}

void m3_tensor_row_f32(const m3_tensor *t, int64_t r, float *out) {
  const uint8_t *row = (const uint8_t *)t->data + (size_t)(r * t->cols) * m3_dtype_size(t->dtype);
  if (t->quant == M3_WQ_NONE) {
    m3_decode_f32(t->dtype, row, out, (size_t)t->cols);
    return;
  }
  /* Both formats scale a run of block_cols columns by one factor: e8m0 2^(s-127) (a product with
   * a power of two, exact) or an f32 block scale [r / block_rows][c / block_cols]. */
  int64_t scale_row = r / t->block_rows;
  for (int64_t c0 = 0, blk = 0; c0 < t->cols; c0 += t->block_cols, blk++) {
    float scale;
    if (t->quant == M3_WQ_MXFP8) {
      scale = m3_e8m0_to_f32(((const uint8_t *)t->scale)[scale_row * t->scale_cols + blk]);
    } else {
      memcpy(&scale, (const uint8_t *)t->scale + 4 * (size_t)(scale_row * t->scale_cols + blk), 4);
    }
    int64_t end = c0 + t->block_cols < t->cols ? c0 + t->block_cols : t->cols;
    for (int64_t c = c0; c < end; c++) out[c] = m3_e4m3_to_f32(row[c]) * scale;
  }
}

m3_status m3_weights_adopt(m3_weights *w, void *mem, const void *replaced) {
  if (w->num_owned == w->cap_owned) {
    int cap = w->cap_owned ? 2 * w->cap_owned : 64;
    void **owned = realloc(w->owned, (size_t)cap * sizeof *owned);
    if (owned) w->owned = owned;
    const void **rep = owned ? realloc(w->replaced, (size_t)cap * sizeof *rep) : NULL;
    if (rep) w->replaced = rep;
    if (!owned || !rep) {
      free(mem);
      return m3_fail(M3_ERR_NOMEM, "weights: list of %d owned buffers", cap);
    }
    w->cap_owned = cap;
  }
  w->owned[w->num_owned++] = mem;
  if (replaced) w->replaced[w->num_replaced++] = replaced;
  return M3_OK;
}

void m3_weights_free(m3_weights *w) {
  for (int i = 0; i < w->num_owned; i++) free(w->owned[i]);
  free(w->owned);
  free(w->replaced);
  free(w->layers); /* expert arrays live in the same blocks (alloc_layers) */
  free(w->mtp);
  free(w->vision.layers);
  memset(w, 0, sizeof *w);
}
