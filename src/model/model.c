/* model.c: loading the model and the layer schedule of a forward step (m3_text_spec.md §10).
 *
 *   x = embed(ids)                                        [T, H], no sqrt(H) scaling
 *   for each layer: attention half (attention.c), FFN half (ffn.c), each adding to x
 *   logits = GemmaRMSNorm(x, final_norm) lm_head^T        [T, V] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/layers.h"

static m3_status check_supported(const m3_config *c) {
  if (c->num_kv_heads <= 0 || c->num_heads % c->num_kv_heads != 0)
    return m3_fail(M3_ERR_CONFIG, "config: num_attention_heads %d is not a multiple of "
                   "num_key_value_heads %d", c->num_heads, c->num_kv_heads);
  if (c->rotary_dim <= 0 || c->rotary_dim % 2 != 0 || c->rotary_dim > c->head_dim)
    return m3_fail(M3_ERR_CONFIG, "config: rotated width %d (rotary_dim / partial_rotary_factor) "
                   "must be even and within head_dim %d", c->rotary_dim, c->head_dim);
  int any_sparse = 0, any_moe = 0;
  for (int l = 0; l < c->num_layers; l++) {
    any_sparse |= c->layer_attn[l] == M3_ATTN_SPARSE;
    any_moe |= c->layer_mlp[l] == M3_MLP_MOE;
  }
  if (any_sparse) {
    /* Index head g selects the blocks KV head g attends to (msa_spec.md §4). */
    if (c->index_num_heads != c->num_kv_heads)
      return m3_fail(M3_ERR_UNSUPPORTED, "config: index_n_heads %d must equal "
                     "num_key_value_heads %d", c->index_num_heads, c->num_kv_heads);
    /* The index branch shares the main RoPE; a rotated width past index_head_dim would give
     * the two halves of a pair different angles (m3_text_spec.md §5.1), which m3 does not do. */
    if (c->rotary_dim > c->index_head_dim)
      return m3_fail(M3_ERR_UNSUPPORTED, "config: rotated width %d exceeds index_head_dim %d",
                     c->rotary_dim, c->index_head_dim);
    if (c->index_topk_blocks <= 0 || c->index_block_size <= 0)
      return m3_fail(M3_ERR_CONFIG, "config: index_topk_blocks %d and index_block_size %d must "
                     "be > 0", c->index_topk_blocks, c->index_block_size);
  }
  if (any_moe && (c->num_experts_per_tok <= 0 || c->num_experts_per_tok > c->num_experts))
    return m3_fail(M3_ERR_CONFIG, "config: num_experts_per_tok %d must be in 1..num_local_experts "
                   "(%d)", c->num_experts_per_tok, c->num_experts);
  return M3_OK;
}

static int max3(int a, int b, int c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

static m3_status alloc_scratch(m3_model *m) {
  const m3_config *c = &m->cfg;
  m3_scratch *s = &m->s;
  const size_t T = M3_MODEL_STEP_TOKENS, H = (size_t)c->hidden_size;
  const size_t qw = (size_t)c->num_heads * c->head_dim, kvw = (size_t)c->num_kv_heads * c->head_dim;
  const size_t I = (size_t)max3(c->dense_intermediate_size, c->intermediate_size,
                                c->shared_intermediate_size);
  const size_t E = (size_t)c->num_experts, k = (size_t)c->num_experts_per_tok;
  const size_t G = (size_t)c->index_num_heads, ihd = (size_t)c->index_head_dim;
  struct {
    void **p;
    size_t bytes;
  } bufs[] = {
      {(void **)&s->x, T * H * 4},          {(void **)&s->h, T * H * 4},
      {(void **)&s->q, T * qw * 4},         {(void **)&s->k, T * kvw * 4},
      {(void **)&s->v, T * kvw * 4},        {(void **)&s->iq, T * G * ihd * 4},
      {(void **)&s->ik, T * ihd * 4},       {(void **)&s->sel, T * G * (size_t)m->msa.topk * 4},
      {(void **)&s->att, T * qw * 4},       {(void **)&s->out, T * H * 4},
      {(void **)&s->gate, T * I * 4},       {(void **)&s->up, T * I * 4},
      {(void **)&s->router, T * E * 4},     {(void **)&s->route_ids, T * k * 4},
      {(void **)&s->route_w, T * k * 4},    {(void **)&s->slot_tok, T * k * 4},
      {(void **)&s->slot_w, T * k * 4},     {(void **)&s->expert_start, (E + 1) * 4},
      {(void **)&s->xe, T * H * 4},
  };
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
    /* Zero-sized buffers (no sparse layers, no experts) still get a valid pointer. */
    *bufs[i].p = m->be->ops->alloc(m->be, bufs[i].bytes ? bufs[i].bytes : 4);
    if (!*bufs[i].p)
      return m3_fail(M3_ERR_NOMEM, "model: cannot allocate %zu bytes of step scratch",
                     bufs[i].bytes);
  }
  return M3_OK;
}

static void free_scratch(m3_model *m) {
  m3_scratch *s = &m->s;
  void *bufs[] = {s->x,      s->h,         s->q,        s->k,       s->v,      s->iq,
                  s->ik,     s->sel,       s->att,      s->out,     s->gate,   s->up,
                  s->router, s->route_ids, s->route_w,  s->slot_tok, s->slot_w, s->expert_start,
                  s->xe};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    if (bufs[i]) m->be->ops->free(m->be, bufs[i]);
}

/* moe_route takes the selection bias as float32; decode it once, whatever its stored dtype. */
static m3_status decode_router_biases(m3_model *m) {
  const m3_config *c = &m->cfg;
  m->router_bias = calloc((size_t)c->num_layers, sizeof *m->router_bias);
  if (!m->router_bias) return m3_fail(M3_ERR_NOMEM, "model: router bias table");
  for (int l = 0; l < c->num_layers; l++) {
    const m3_tensor *b = &m->w.layers[l].router_bias;
    if (c->layer_mlp[l] != M3_MLP_MOE || !m3_tensor_present(b)) continue;
    if (b->rows * b->cols != c->num_experts)
      return m3_fail(M3_ERR_SHAPE, "%s: %lld values, expected %d (num_local_experts)", b->name,
                     (long long)(b->rows * b->cols), c->num_experts);
    m->router_bias[l] = m->be->ops->alloc(m->be, (size_t)c->num_experts * sizeof(float));
    if (!m->router_bias[l]) return m3_fail(M3_ERR_NOMEM, "model: router bias of layer %d", l);
    m3_tensor_row_f32(b, 0, m->router_bias[l]);
  }
  return M3_OK;
}

m3_status m3_model_load(const char *dir, m3_backend *be, m3_model **out) {
  *out = NULL;
  m3_model *m = calloc(1, sizeof *m);
  if (!m) return m3_fail(M3_ERR_NOMEM, "model: out of memory");
  m->be = be;
  char path[4096];
  m3_status st = M3_OK;
  if ((size_t)snprintf(path, sizeof path, "%s/config.json", dir) >= sizeof path) {
    st = m3_fail(M3_ERR_ARG, "model folder path too long: %s", dir);
    goto fail;
  }
  if ((st = m3_config_load(path, &m->cfg)) != M3_OK) goto fail;
  if ((st = check_supported(&m->cfg)) != M3_OK) goto fail;
  if ((st = m3_st_open_dir(dir, &m->st)) != M3_OK) goto fail;
  if ((st = m3_weights_bind(&m->cfg, m->st, &m->w)) != M3_OK) goto fail;
  for (int l = 0; l < m->cfg.num_layers; l++) m->num_sparse += m->cfg.layer_attn[l] == M3_ATTN_SPARSE;
  m->msa = (m3_msa_params){.topk = m->cfg.index_topk_blocks,
                           .local_blocks = m->cfg.index_local_blocks,
                           .init_blocks = m->cfg.index_init_blocks};
  if ((st = decode_router_biases(m)) != M3_OK) goto fail;
  if ((st = alloc_scratch(m)) != M3_OK) goto fail;
  *out = m;
  return M3_OK;

fail:
  m3_model_free(m);
  return st;
}

void m3_model_free(m3_model *m) {
  if (!m) return;
  free_scratch(m);
  if (m->router_bias) {
    for (int l = 0; l < m->cfg.num_layers; l++)
      if (m->router_bias[l]) m->be->ops->free(m->be, m->router_bias[l]);
    free(m->router_bias);
  }
  m3_weights_free(&m->w);
  if (m->st) m3_st_close(m->st);
  m3_config_free(&m->cfg);
  free(m);
}

const m3_config *m3_model_config(const m3_model *m) { return &m->cfg; }
m3_backend *m3_model_backend(const m3_model *m) { return m->be; }
int m3_model_num_sparse_layers(const m3_model *m) { return m->num_sparse; }

static m3_status check_inputs(const m3_model *m, const m3_kv_view *kv, const int32_t *ids,
                              const int32_t *pos, int T, const m3_selection_capture *capture) {
  const m3_config *c = &m->cfg;
  if (T < 0) return m3_fail(M3_ERR_ARG, "forward: %d tokens", T);
  int num_blocks = kv[0].num_blocks;
  for (int l = 1; l < c->num_layers; l++)
    if (kv[l].num_blocks < num_blocks) num_blocks = kv[l].num_blocks;
  for (int t = 0; t < T; t++) {
    if (ids[t] < 0 || ids[t] >= c->vocab_size)
      return m3_fail(M3_ERR_ARG, "token id %d (at %d) is outside the vocabulary of %d", ids[t], t,
                     c->vocab_size);
    if (pos[t] < 0 || pos[t] / kv[0].block_size >= num_blocks)
      return m3_fail(M3_ERR_ARG, "position %d (at %d) has no KV page (%d pages of %d tokens)",
                     pos[t], t, num_blocks, kv[0].block_size);
  }
  if (capture && (capture->first < 0 || capture->first + T > capture->n_tokens))
    return m3_fail(M3_ERR_ARG, "selection capture rows [%d, %d) outside its %d tokens",
                   capture->first, capture->first + T, capture->n_tokens);
  return M3_OK;
}

/* One step of T <= M3_MODEL_STEP_TOKENS tokens; `row` is the first token's row in the caller's
 * capture. */
static void step(m3_model *m, const m3_kv_view *kv, const int32_t *ids, const int32_t *pos, int T,
                 float *logits, const m3_selection_capture *capture, int row) {
  const m3_config *c = &m->cfg;
  m3_scratch *s = &m->s;
  m3_backend *be = m->be;
  const size_t sel_row = (size_t)c->index_num_heads * (size_t)m->msa.topk;

  be->ops->embed(be, &m->w.embed, ids, T, s->x);
  for (int l = 0, sparse = 0; l < c->num_layers; l++) {
    m3_attention_block(m, l, &kv[l], pos, T);
    if (c->layer_attn[l] == M3_ATTN_SPARSE) {
      if (capture)
        memcpy(capture->blocks + ((size_t)sparse * capture->n_tokens + row) * sel_row, s->sel,
               (size_t)T * sel_row * sizeof(int32_t));
      sparse++;
    }
    m3_ffn_block(m, l, T);
  }
  if (!logits) return;
  be->ops->rmsnorm(be, s->x, &m->w.final_norm, c->rms_norm_eps, T, c->hidden_size, s->h);
  be->ops->matmul(be, &m->w.lm_head, s->h, T, logits);
}

m3_status m3_model_forward(m3_model *m, const m3_kv_view *kv, const int32_t *ids,
                           const int32_t *pos, int T, float *logits,
                           const m3_selection_capture *capture) {
  m3_status st = check_inputs(m, kv, ids, pos, T, capture);
  if (st != M3_OK) return st;
  const size_t V = (size_t)m->cfg.vocab_size;
  for (int t0 = 0; t0 < T; t0 += M3_MODEL_STEP_TOKENS) {
    int n = T - t0 < M3_MODEL_STEP_TOKENS ? T - t0 : M3_MODEL_STEP_TOKENS;
    step(m, kv, ids + t0, pos + t0, n, logits ? logits + (size_t)t0 * V : NULL, capture,
         capture ? capture->first + t0 : 0);
  }
  return M3_OK;
}
