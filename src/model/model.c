/* model.c: loading the model and the layer schedule of a forward step (m3_text_spec.md §10).
 *
 *   x = embed(ids)                                        [T, H], no sqrt(H) scaling
 *   for each layer: attention half (attention.c), FFN half (ffn.c), each adding to x
 *   logits = GemmaRMSNorm(x, final_norm) lm_head^T        [T, V] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/quantize.h"
#include "model/layers.h"
#include "model/step_graph.h"
#include "model/vision.h"

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
  const size_t T = (size_t)m->step_tokens, H = (size_t)c->hidden_size;
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
      {(void **)&s->route_w, T * k * 4},    {(void **)&s->xe, T * H * 4},
      {(void **)&s->ids, T * 4},            {(void **)&s->pos, T * 4},
      {(void **)&s->rows, T * 4},
  };
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
    /* Zero-sized buffers (no sparse layers, no experts) still get a valid pointer. */
    *bufs[i].p = m->be->ops->alloc(m->be, bufs[i].bytes ? bufs[i].bytes : 4);
    if (!*bufs[i].p)
      return m3_fail(M3_ERR_NOMEM, "model: cannot allocate %zu bytes of step scratch",
                     bufs[i].bytes);
  }
  m3_host_side *hs = &m->hs;
  if (!m->be->ops->device_memory) {
    *hs = (m3_host_side){s->ids, s->pos, s->rows};
    return M3_OK;
  }
  const size_t V = (size_t)c->vocab_size;
  s->logits = m->be->ops->alloc(m->be, (size_t)M3_MODEL_STEP_TOKENS * V * 4);
  hs->ids = malloc(T * 4);
  hs->pos = malloc(T * 4);
  hs->rows = malloc(T * 4);
  if (!s->logits || !hs->ids || !hs->pos || !hs->rows)
    return m3_fail(M3_ERR_NOMEM, "model: cannot allocate the logits (%zu x %zu) and host mirrors "
                   "of the step", T, V);
  return M3_OK;
}

/* The buffers of a vocabulary-split head (head_rows): the ranks' slices side by side for the
 * all-reduce, and for every row count n <= M3_MODEL_STEP_TOKENS the ids that gather row t of
 * slice r (slices row r n + t) into out row t, column block r (out row t W + r of width slice);
 * and the ranks' candidates of a greedy step (head_pairs), on both sides. */
static m3_status alloc_head_split(m3_model *m) {
  if (m->head_world <= 1) return M3_OK;
  /* A candidate carries its token id as a float32: exact below 2^24. */
  if (m->cfg.vocab_size > 1 << 24)
    return m3_fail(M3_ERR_UNSUPPORTED, "config: vocab_size %d split over %d ranks: the greedy "
                   "pick's token ids travel as float32, exact up to 2^24", m->cfg.vocab_size,
                   m->head_world);
  m3_backend *be = m->be;
  const size_t W = (size_t)m->head_world, S = M3_MODEL_STEP_TOKENS;
  const size_t slice = (size_t)m->w.lm_head.rows, n_ids = W * S * (S + 1) / 2;
  const size_t pair_bytes = W * S * 2 * sizeof(float);
  m->head_part = be->ops->alloc(be, W * S * slice * sizeof(float));
  m->head_gather = be->ops->alloc(be, n_ids * sizeof(int32_t));
  m->head_pairs = be->ops->alloc(be, pair_bytes);
  m->head_pairs_host = be->ops->device_memory ? malloc(pair_bytes) : m->head_pairs;
  int32_t *ids = malloc(n_ids * sizeof *ids);
  m3_status st = M3_OK;
  if (!m->head_part || !m->head_gather || !m->head_pairs || !m->head_pairs_host || !ids) {
    st = m3_fail(M3_ERR_NOMEM, "model: the vocabulary-split head's %zu x %zu logits of %zu ranks",
                 S, slice, W);
  } else {
    for (size_t n = 1, at = 0; n <= S; at += W * n, n++)
      for (size_t t = 0; t < n; t++)
        for (size_t r = 0; r < W; r++) ids[at + t * W + r] = (int32_t)(r * n + t);
    st = be->ops->to_device(be, m->head_gather, ids, n_ids * sizeof *ids);
  }
  free(ids);
  return st;
}

static void free_scratch(m3_model *m) {
  m3_scratch *s = &m->s;
  m3_host_side *hs = &m->hs;
  if (m->be->ops->device_memory) {
    void *host[] = {hs->ids, hs->pos, hs->rows};
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++) free(host[i]);
  }
  void *bufs[] = {s->x,   s->h,      s->q,         s->k,       s->v,   s->iq,
                  s->ik,  s->sel,    s->att,       s->out,     s->gate, s->up,
                  s->router, s->route_ids, s->route_w, s->xe,  s->ids, s->pos,
                  s->rows, s->logits};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    if (bufs[i]) m->be->ops->free(m->be, bufs[i]);
}

/* Hands every weight the forward reads to the backend, once (prepare_tensor); a tied lm_head then
 * shares the embedding's copy. m->prepared lists what to release at free. */
static m3_status prepare_weights(m3_model *m) {
  const m3_config *c = &m->cfg;
  m3_weights *w = &m->w;
  m3_backend *be = m->be;
  enum { PER_LAYER = 19, VISION_PER_LAYER = 16, VISION_OUTER = 11 };
  /* The tower's weights only where the backend can run it (a device backend uploads them). */
  const int vision = w->vision.present && be->ops->vision;
  const size_t cap = 3 + (size_t)c->num_layers * (PER_LAYER + 3 * (size_t)c->num_experts) +
                     (vision ? VISION_OUTER + (size_t)c->vision.num_layers * VISION_PER_LAYER : 0);
  m->prepared = calloc(cap, sizeof *m->prepared);
  if (!m->prepared) return m3_fail(M3_ERR_NOMEM, "model: list of %zu weights", cap);
  m3_tensor **list = m->prepared;
  size_t n = 0;
  list[n++] = &w->embed;
  list[n++] = &w->final_norm;
  if (!w->lm_head_tied) list[n++] = &w->lm_head;
  for (int l = 0; l < c->num_layers; l++) {
    m3_layer_weights *L = &w->layers[l];
    /* router_bias is not here: moe_route reads the float32 copy decode_router_biases makes. */
    m3_tensor *fields[PER_LAYER] = {
        &L->input_norm,   &L->post_attn_norm, &L->q_proj,       &L->k_proj,
        &L->v_proj,       &L->o_proj,         &L->q_norm,       &L->k_norm,
        &L->index_q_proj, &L->index_k_proj,   &L->index_q_norm, &L->index_k_norm,
        &L->mlp_gate,     &L->mlp_up,         &L->mlp_down,     &L->router,
        &L->shared_gate,  &L->shared_up,      &L->shared_down};
    for (int i = 0; i < PER_LAYER; i++) list[n++] = fields[i];
    if (c->layer_mlp[l] != M3_MLP_MOE || !L->expert_gate) continue;
    for (int e = 0; e < c->num_experts; e++) {
      list[n++] = &L->expert_gate[e];
      list[n++] = &L->expert_up[e];
      list[n++] = &L->expert_down[e];
    }
  }
  if (vision) {
    m3_vision_weights *v = &w->vision;
    m3_tensor *outer[VISION_OUTER] = {&v->patch_embed, &v->pre_ln_w, &v->pre_ln_b, &v->proj1_w,
                                      &v->proj1_b,     &v->proj2_w,  &v->proj2_b,  &v->merge1_w,
                                      &v->merge1_b,    &v->merge2_w, &v->merge2_b};
    for (int i = 0; i < VISION_OUTER; i++) list[n++] = outer[i];
    for (int l = 0; l < c->vision.num_layers; l++) {
      m3_vision_layer_weights *L = &v->layers[l];
      m3_tensor *fields[VISION_PER_LAYER] = {&L->ln1_w, &L->ln1_b, &L->ln2_w, &L->ln2_b,
                                             &L->q_w,   &L->q_b,   &L->k_w,   &L->k_b,
                                             &L->v_w,   &L->v_b,   &L->out_w, &L->out_b,
                                             &L->fc1_w, &L->fc1_b, &L->fc2_w, &L->fc2_b};
      for (int i = 0; i < VISION_PER_LAYER; i++) list[n++] = fields[i];
    }
  }
  for (size_t i = 0; i < n; i++) {
    if (!m3_tensor_present(list[i])) continue;
    m3_status st = be->ops->prepare_tensor(be, list[i]);
    if (st != M3_OK) return st;
    m->prepared[m->num_prepared++] = list[i];
  }
  if (w->lm_head_tied) m3_model_tie_head(m);
  return M3_OK;
}

/* The routed experts of each MoE layer, handed to the backend after their tensors. */
static m3_status prepare_experts(m3_model *m) {
  const m3_config *c = &m->cfg;
  m->experts = calloc((size_t)c->num_layers, sizeof *m->experts);
  if (!m->experts) return m3_fail(M3_ERR_NOMEM, "model: expert tables of %d layers", c->num_layers);
  for (int l = 0; l < c->num_layers; l++) {
    const m3_layer_weights *L = &m->w.layers[l];
    if (c->layer_mlp[l] != M3_MLP_MOE || !L->expert_gate) continue;
    m3_status st = m3_moe_experts_prepare(m->be, c, L, &m->experts[l]);
    if (st != M3_OK) return st;
  }
  return M3_OK;
}

static void release_experts(m3_model *m) {
  for (int l = 0; m->experts && l < m->cfg.num_layers; l++)
    m3_moe_experts_release(m->be, &m->experts[l]);
  free(m->experts);
}

static void release_weights(m3_model *m) {
  for (int i = 0; i < m->num_prepared; i++) m->be->ops->release_tensor(m->be, m->prepared[i]);
  free(m->prepared);
}

/* moe_route takes the selection bias as float32 in backend memory; decode it once on the host,
 * whatever its stored dtype, and hand it over. */
static m3_status decode_router_biases(m3_model *m) {
  const m3_config *c = &m->cfg;
  const size_t bytes = (size_t)c->num_experts * sizeof(float);
  m->router_bias = calloc((size_t)c->num_layers, sizeof *m->router_bias);
  float *host = malloc(bytes ? bytes : 1);
  m3_status st = M3_OK;
  if (!m->router_bias || !host) st = m3_fail(M3_ERR_NOMEM, "model: router bias table");
  for (int l = 0; l < c->num_layers && st == M3_OK; l++) {
    const m3_tensor *b = &m->w.layers[l].router_bias;
    if (c->layer_mlp[l] != M3_MLP_MOE || !m3_tensor_present(b)) continue;
    if (b->rows * b->cols != c->num_experts) {
      st = m3_fail(M3_ERR_SHAPE, "%s: %lld values, expected %d (num_local_experts)", b->name,
                   (long long)(b->rows * b->cols), c->num_experts);
    } else if (!(m->router_bias[l] = m->be->ops->alloc(m->be, bytes))) {
      st = m3_fail(M3_ERR_NOMEM, "model: router bias of layer %d", l);
    } else {
      m3_tensor_row_f32(b, 0, host);
      st = m->be->ops->to_device(m->be, m->router_bias[l], host, bytes);
    }
  }
  free(host);
  return st;
}

/* Recorded decode steps where the backend has graph ops, unless M3_CUDA_GRAPHS=0 (the op-by-op
 * path, to compare against). */
static m3_status init_graphs(m3_model *m) {
  const char *env = getenv("M3_CUDA_GRAPHS");
  if (!m->be->ops->graph_begin || (env && strcmp(env, "0") == 0)) return M3_OK;
  if (!(m->graphs = calloc(1, sizeof *m->graphs)))
    return m3_fail(M3_ERR_NOMEM, "model: recorded step cache");
  return M3_OK;
}

static int compare_address(const void *a, const void *b) {
  uintptr_t x = (uintptr_t)*(const void *const *)a, y = (uintptr_t)*(const void *const *)b;
  return (x > y) - (x < y);
}

/* The rank a load asks for; sizes 0 (options left zeroed) mean 1. */
static m3_shard shard_of(const m3_model_load_options *o) {
  if (!o) return (m3_shard){1, 0, 1, 0};
  return (m3_shard){o->tp_size > 0 ? o->tp_size : 1, o->tp_rank, o->ep_size > 0 ? o->ep_size : 1,
                    o->ep_rank};
}

m3_status m3_model_load(const char *dir, m3_backend *be, m3_model **out) {
  return m3_model_load_with(dir, be, NULL, out);
}

m3_status m3_model_load_with(const char *dir, m3_backend *be, const m3_model_load_options *opts,
                             m3_model **out) {
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
  const m3_shard lay = shard_of(opts);
  if ((st = m3_model_shard_experts(m, &lay)) != M3_OK) goto fail;
  if (opts && opts->quantize_mxfp8) {
    st = m3_weights_quantize_mxfp8(&m->cfg, &m->w, opts->threads, opts->progress, opts->user);
    if (st != M3_OK) goto fail;
    /* Sorted for the prefault's lookups. */
    qsort(m->w.replaced, (size_t)m->w.num_replaced, sizeof *m->w.replaced, compare_address);
  }
  if ((st = m3_model_shard(m, &lay)) != M3_OK) goto fail;
  for (int l = 0; l < m->cfg.num_layers; l++) m->num_sparse += m->cfg.layer_attn[l] == M3_ATTN_SPARSE;
  m->msa = (m3_msa_params){.topk = m->cfg.index_topk_blocks,
                           .local_blocks = m->cfg.index_local_blocks,
                           .init_blocks = m->cfg.index_init_blocks};
  if ((st = decode_router_biases(m)) != M3_OK) goto fail;
  if ((st = prepare_weights(m)) != M3_OK) goto fail;
  if ((st = prepare_experts(m)) != M3_OK) goto fail;
  m->step_tokens = be->ops->device_memory ? M3_MODEL_DEVICE_STEP_TOKENS : M3_MODEL_STEP_TOKENS;
  if ((st = alloc_scratch(m)) != M3_OK) goto fail;
  if ((st = alloc_head_split(m)) != M3_OK) goto fail;
  if ((st = init_graphs(m)) != M3_OK) goto fail;
  *out = m;
  return M3_OK;

fail:
  m3_model_free(m);
  return st;
}

void m3_model_free(m3_model *m) {
  if (!m) return;
  if (m->graphs) {
    m3_step_graphs_clear(m->graphs, m->be);
    free(m->graphs);
  }
  free_scratch(m);
  if (m->zeros) m->be->ops->free(m->be, m->zeros);
  if (m->head_part) m->be->ops->free(m->be, m->head_part);
  if (m->head_gather) m->be->ops->free(m->be, m->head_gather);
  if (m->head_pairs_host != m->head_pairs) free(m->head_pairs_host);
  if (m->head_pairs) m->be->ops->free(m->be, m->head_pairs);
  if (m->router_bias) {
    for (int l = 0; l < m->cfg.num_layers; l++)
      if (m->router_bias[l]) m->be->ops->free(m->be, m->router_bias[l]);
    free(m->router_bias);
  }
  free(m->segs);
  free(m->hidden_slot);
  release_experts(m);
  release_weights(m);
  m3_weights_free(&m->w);
  if (m->st) m3_st_close(m->st);
  m3_config_free(&m->cfg);
  free(m);
}

const m3_config *m3_model_config(const m3_model *m) { return &m->cfg; }

m3_status m3_model_set_all_reduce(m3_model *m, m3_all_reduce_fn fn, void *user,
                                  unsigned flags) {
  int bare_moe = 0; /* an MoE layer without a shared expert: its sum starts from zeros */
  for (int l = 0; l < m->cfg.num_layers; l++)
    bare_moe |= m->cfg.layer_mlp[l] == M3_MLP_MOE && !m3_tensor_present(&m->w.layers[l].shared_gate);
  if (fn && bare_moe && !m->zeros) {
    const size_t bytes = (size_t)m->step_tokens * (size_t)m->cfg.hidden_size * sizeof(float);
    if (!(m->zeros = m->be->ops->alloc(m->be, bytes))) /* alloc zeroes */
      return m3_fail(M3_ERR_NOMEM, "model: %zu bytes of zeros for the tensor-parallel MoE sum",
                     bytes);
  }
  /* A recorded step holds the old hook's collectives (or none): record anew under this one. */
  if (m->graphs) m3_step_graphs_clear(m->graphs, m->be);
  m->all_reduce = fn;
  m->all_reduce_user = user;
  m->all_reduce_flags = fn ? flags : 0;
  return M3_OK;
}

void m3_model_set_reduce_add_norm(m3_model *m, m3_reduce_add_norm_fn fn) {
  if (m->graphs) m3_step_graphs_clear(m->graphs, m->be);
  m->reduce_add_norm = fn;
}

m3_status m3_model_set_hidden_layers(m3_model *m, const int *layers, int n) {
  const int L = m->cfg.num_layers;
  if (!m->hidden_slot && !(m->hidden_slot = malloc((size_t)(L + 1) * sizeof *m->hidden_slot)))
    return m3_fail(M3_ERR_NOMEM, "model: hidden-state slots");
  for (int l = 0; l <= L; l++) m->hidden_slot[l] = -1;
  m->num_hidden = 0;
  for (int i = 0; i < n; i++) {
    if (layers[i] < 0 || layers[i] > L || m->hidden_slot[layers[i]] >= 0)
      return m3_fail(M3_ERR_ARG, "hidden-state layer %d (entry %d): expected distinct ids in "
                     "0..%d", layers[i], i, L);
    m->hidden_slot[layers[i]] = i;
  }
  m->num_hidden = n;
  return M3_OK;
}

int m3_model_hidden_width(const m3_model *m) { return m->num_hidden * m->cfg.hidden_size; }
m3_backend *m3_model_backend(const m3_model *m) { return m->be; }
int m3_model_step_tokens(const m3_model *m) { return m->step_tokens; }
const m3_weights *m3_model_weights(const m3_model *m) { return &m->w; }
int m3_model_num_sparse_layers(const m3_model *m) { return m->num_sparse; }
int m3_model_head_slices(const m3_model *m) { return m->head_world > 1 ? m->head_world : 1; }

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

/* Copies each segment's block selections of the current sparse layer (s.sel) into its
 * sequence's capture (host memory). */
static m3_status capture_selections(m3_model *m, const m3_segment *segs, int n_segs,
                                    const m3_model_seq *seqs, int sparse) {
  const size_t sel_row = (size_t)m->cfg.index_num_heads * (size_t)m->msa.topk;
  m3_status st = M3_OK;
  for (int i = 0; i < n_segs && st == M3_OK; i++) {
    const m3_selection_capture *cap = seqs[segs[i].seq].capture;
    if (!cap) continue;
    size_t row = (size_t)sparse * cap->n_tokens + (size_t)cap->first + (size_t)segs[i].offset;
    st = m->be->ops->to_host(m->be, cap->blocks + row * sel_row,
                             m->s.sel + (size_t)segs[i].first * sel_row,
                             (size_t)segs[i].T * sel_row * sizeof(int32_t));
  }
  return st;
}

/* Copies rows of src [T, H] (backend memory) into slot `slot` of each segment's sequence's hidden
 * rows (host memory), for the sequences that ask for them. */
static m3_status capture_hidden(m3_model *m, const m3_segment *segs, int n_segs,
                                const float *src, int slot) {
  const size_t H = (size_t)m->cfg.hidden_size, width = (size_t)m->num_hidden * H;
  m3_status st = M3_OK;
  for (int i = 0; i < n_segs && st == M3_OK; i++) {
    float *hidden = m->hidden[segs[i].seq];
    for (int j = 0; hidden && j < segs[i].T && st == M3_OK; j++)
      st = m->be->ops->to_host(m->be, hidden + (size_t)(segs[i].offset + j) * width + (size_t)slot * H,
                               src + (size_t)(segs[i].first + j) * H, H * sizeof(float));
  }
  return st;
}

static int any_hidden(const m3_model *m, const m3_segment *segs, int n_segs) {
  for (int i = 0; m->hidden && i < n_segs; i++)
    if (m->hidden[segs[i].seq]) return 1;
  return 0;
}

/* The step rows whose logits were asked for (each sequence's last n_logits tokens), in order,
 * into hs.rows; returns how many. */
static int logit_rows(m3_model *m, const m3_segment *segs, int n_segs, const m3_model_seq *seqs) {
  int n = 0;
  for (int i = 0; i < n_segs; i++) {
    const m3_model_seq *q = &seqs[segs[i].seq];
    for (int j = 0; j < segs[i].T; j++)
      if (segs[i].offset + j >= q->T - q->n_logits) m->hs.rows[n++] = segs[i].first + j;
  }
  return n;
}

/* The norm whose output s.h holds after layer l's FFN half (l = -1: after the embedding): the next
 * layer's input norm, else the final norm when `final` (the head or the final hidden reads it),
 * else none. */
static const m3_tensor *norm_after(const m3_model *m, int l, int final) {
  if (l + 1 < m->cfg.num_layers) return &m->w.layers[l + 1].input_norm;
  return final ? &m->w.final_norm : NULL;
}

/* What the ops of a step from the embedding to the head depend on (run_layers_and_head). */
typedef struct {
  const m3_segment *segs;
  int n_segs, T;
  const m3_model_seq *seqs;
  const int *slot; /* hidden-state slots of the step, or NULL */
  int rows;        /* logits rows wanted (hs.rows, already in s.rows) */
  float *logits;   /* host memory: where a host-memory backend's head writes */
  int pairs;       /* the split head of a greedy step: candidates (head_pairs), no logits */
} step_plan;

/* The head's input: the final hidden of every row (s.h), or of the wanted rows gathered (s.xe). */
static const float *head_input(const m3_model *m, int rows, int T) {
  return rows < T ? m->s.xe : m->s.h;
}

/* Where rows [r0, r0 + M3_MODEL_STEP_TOKENS) of the logits go: the device backend's buffer, or
 * the caller's on a host-memory backend; NULL for a rank that returns no logits (logits NULL:
 * it still computes its vocabulary slice, see head_rows). */
static float *head_output(m3_model *m, float *logits, int r0) {
  if (!logits) return NULL;
  return m->s.logits ? m->s.logits : logits + (size_t)r0 * (size_t)m->cfg.vocab_size;
}

/* buf [head_world, block]: every part but this rank's = 0, so that a world all-reduce (sums of
 * one value and zeros: exact) leaves each rank's part on every rank. */
static m3_status zero_other_parts(m3_model *m, float *buf, size_t block) {
  m3_backend *be = m->be;
  const size_t W = (size_t)m->head_world, me = (size_t)m->head_rank;
  m3_status st = M3_OK;
  if (me > 0) st = be->ops->zero(be, buf, me * block * sizeof(float));
  if (st == M3_OK && me + 1 < W)
    st = be->ops->zero(be, buf + (me + 1) * block, (W - me - 1) * block * sizeof(float));
  return st;
}

/* out [n, V] = in [n, H] lm_head^T. With a vocabulary split (shard.c) each rank computes its
 * slice into its part of head_part, zeros the other ranks' parts, and one world all-reduce
 * leaves every slice on every rank; the gather then reorders them into rows of the whole
 * vocabulary, skipped where out is NULL. Against the replicated head this reads 1/world of
 * lm_head (2.5 GB at M3's 200064 x 6144 in BF16: the largest matrix of a decode step) for n x V
 * floats through the all-reduce. */
static m3_status head_rows(m3_model *m, const float *in, int n, float *out) {
  m3_backend *be = m->be;
  if (m->head_world <= 1) {
    be->ops->matmul(be, &m->w.lm_head, in, n, out);
    return M3_OK;
  }
  const size_t W = (size_t)m->head_world, me = (size_t)m->head_rank;
  const size_t slice = (size_t)m->w.lm_head.rows, block = (size_t)n * slice;
  float *part = m->head_part;
  m3_status st = zero_other_parts(m, part, block);
  if (st != M3_OK) return st;
  be->ops->matmul(be, &m->w.lm_head, in, n, part + me * block);
  m3_model_all_reduce(m, M3_REDUCE_WORLD, part, W * block);
  if (!out) return M3_OK;
  const m3_tensor slices = {.name = "logits slices", .data = part, .dtype = M3_DT_F32,
                            .rows = (int64_t)(W * (size_t)n), .cols = (int64_t)slice,
                            .quant = M3_WQ_NONE};
  const int32_t *order = m->head_gather + W * (size_t)n * (size_t)(n - 1) / 2;
  be->ops->embed(be, &slices, order, (int)(W * (size_t)n), out);
  return M3_OK;
}

/* The split head of a greedy step, where only each row's argmax is wanted: each rank computes its
 * slice's rows [n, slice] (into head_part), their best (score, index) (argmax_pairs) into its part
 * of head_pairs [W, n, 2], zeros the others, and one world all-reduce of W x n x 2 floats (not
 * n x V) hands every rank every slice's candidates for head_pick. */
static m3_status head_pairs(m3_model *m, const float *in, int n) {
  m3_backend *be = m->be;
  const size_t me = (size_t)m->head_rank, slice = (size_t)m->w.lm_head.rows, block = 2 * (size_t)n;
  m3_status st = zero_other_parts(m, m->head_pairs, block);
  if (st != M3_OK) return st;
  be->ops->matmul(be, &m->w.lm_head, in, n, m->head_part);
  be->ops->argmax_pairs(be, m->head_part, n, (int)slice, (int)(me * slice),
                        m->head_pairs + me * block);
  m3_model_all_reduce(m, M3_REDUCE_WORLD, m->head_pairs, (size_t)m->head_world * block);
  return M3_OK;
}

void m3_model_head_pick(const float *pairs, int world, int n, int32_t *ids) {
  for (int t = 0; t < n; t++) {
    const float *best = pairs + 2 * (size_t)t;
    for (int r = 1; r < world; r++) {
      const float *c = pairs + 2 * ((size_t)r * (size_t)n + (size_t)t);
      /* The sampler's scan over the candidates: only a strictly larger score moves the choice
       * (scores are never NaN: argmax_pairs maps NaN to an infinity). */
      if (c[0] > best[0]) best = c;
    }
    ids[t] = (int32_t)best[1];
  }
}

/* Each row's id from head_pairs (its first n rows): waits for the step on a device backend. */
static m3_status head_pick(m3_model *m, int n, int32_t *ids) {
  const size_t bytes = (size_t)m->head_world * 2 * (size_t)n * sizeof(float);
  m3_status st = m3_download(m, m->head_pairs_host, m->head_pairs, bytes);
  if (st == M3_OK) m3_model_head_pick(m->head_pairs_host, m->head_world, n, ids);
  return st;
}

/* Rows [r0, r0 + n) of the step's head: their logits (head_rows), or on the split head of a
 * greedy step their candidates (head_pairs). */
static m3_status head_chunk(m3_model *m, const step_plan *p, int r0, int n) {
  const float *in = head_input(m, p->rows, p->T) + (size_t)r0 * (size_t)m->cfg.hidden_size;
  return p->pairs ? head_pairs(m, in, n) : head_rows(m, in, n, head_output(m, p->logits, r0));
}

/* The ops of a step from the embedding through the layers, the final norm and the head's first
 * M3_MODEL_STEP_TOKENS rows (with the hidden-state and selection transfers the step asks for):
 * without those transfers, everything a recorded step replays. */
static m3_status run_layers_and_head(m3_model *m, void *ctx) {
  const step_plan *p = ctx;
  const m3_config *c = &m->cfg;
  m3_scratch *s = &m->s;
  m3_backend *be = m->be;
  const m3_segment *segs = p->segs;
  const int n_segs = p->n_segs, T = p->T, rows = p->rows, *slot = p->slot;
  m3_status st;
  be->ops->embed(be, &m->w.embed, s->ids, T, s->x);
  if ((st = m3_vision_splice(m, segs, n_segs, p->seqs)) != M3_OK) return st;
  const int final_slot = slot ? slot[c->num_layers] : -1;
  const int final = rows > 0 || final_slot >= 0;
  const m3_tensor *first_norm = norm_after(m, -1, final);
  if (first_norm) be->ops->rmsnorm(be, s->x, first_norm, c->rms_norm_eps, T, c->hidden_size, s->h);
  for (int l = 0, sparse = 0; l < c->num_layers; l++) {
    if (slot && slot[l] >= 0 && (st = capture_hidden(m, segs, n_segs, s->x, slot[l])) != M3_OK)
      return st;
    m3_attention_block(m, l, segs, n_segs, T);
    if (c->layer_attn[l] == M3_ATTN_SPARSE &&
        (st = capture_selections(m, segs, n_segs, p->seqs, sparse++)) != M3_OK)
      return st;
    m3_ffn_block(m, l, T, norm_after(m, l, final));
  }
  if (!final) return M3_OK;
  /* s.h = GemmaRMSNorm(x, final_norm), fused with the last layer's residual add. */
  if (final_slot >= 0 &&
      (st = capture_hidden(m, segs, n_segs, s->h, final_slot)) != M3_OK)
    return st;
  if (rows == 0) return M3_OK;
  if (rows < T) {
    /* Decode steps want one row per sequence: gather them so the head runs on those alone. */
    const m3_tensor h_rows = {.name = "final hidden", .data = s->h, .dtype = M3_DT_F32,
                              .rows = T, .cols = c->hidden_size, .quant = M3_WQ_NONE};
    be->ops->embed(be, &h_rows, s->rows, rows, s->xe);
  }
  return head_chunk(m, p, 0, rows < M3_MODEL_STEP_TOKENS ? rows : M3_MODEL_STEP_TOKENS);
}

/* A step the recorded graphs take: a few tokens (decode, small batches, speculative
 * verification), and no transfer between its ops: no media rows to splice in, no hidden states
 * or block selections to hand over. Its logits rows (<= T) then take one head matmul. */
static int graphable(const m3_model *m, const step_plan *p) {
  /* A hook that does more than enqueue on the backend stream (a host exchange) would run once at
   * recording and never at a replay. */
  const int reduce_recordable = !m->all_reduce || (m->all_reduce_flags & M3_ALL_REDUCE_CAPTURABLE);
  if (!m->graphs || !reduce_recordable || p->T > M3_STEP_GRAPH_MAX_T || p->slot) return 0;
  for (int i = 0; i < p->n_segs; i++) {
    const m3_model_seq *q = &p->seqs[p->segs[i].seq];
    if (q->media || q->capture) return 0;
  }
  return 1;
}

/* One step over T <= m->step_tokens tokens (hs.ids, hs.pos) of n_segs segments; writes the
 * requested logits rows to `logits` (host memory), or with `picks` only each row's pick (argmax,
 * or with m->sampling the backend's draw) to `picked` (host memory, NULL on a rank of a split head
 * that returns none; `logits` is then where a host backend computes the rows, unused by a split
 * head's argmax), and their count to *n_rows. */
static m3_status step(m3_model *m, const m3_segment *segs, int n_segs, int T,
                      const m3_model_seq *seqs, float *logits, int picks, int32_t *picked,
                      int *n_rows) {
  const m3_config *c = &m->cfg;
  m3_scratch *s = &m->s;
  m3_backend *be = m->be;
  *n_rows = 0;

  /* A rank of a vocabulary split computes its slice of the head whether or not it returns logits:
   * the head's all-reduce pairs with its peers'. */
  const int rows = logits || m->head_world > 1 ? logit_rows(m, segs, n_segs, seqs) : 0;
  /* Every upload before the first op: a recorded step reads them from backend memory. */
  m3_status st = m3_upload(m, s->ids, m->hs.ids, (size_t)T * sizeof(int32_t));
  if (st == M3_OK) st = m3_upload(m, s->pos, m->hs.pos, (size_t)T * sizeof(int32_t));
  if (st == M3_OK && rows > 0 && rows < T)
    st = m3_upload(m, s->rows, m->hs.rows, (size_t)rows * sizeof(int32_t));
  if (st != M3_OK) return st;
  m->reduce_status = M3_OK;
  step_plan plan = {segs, n_segs, T, seqs,
                    m->num_hidden && any_hidden(m, segs, n_segs) ? m->hidden_slot : NULL,
                    rows, logits, picks && !m->sampling && m->head_world > 1};
  /* The head's output in the signature tells the pairs' recording from the logits' one. */
  const float *head_out0 = rows == 0   ? NULL
                           : plan.pairs ? m->head_pairs
                                        : head_output(m, logits, 0);
  if (graphable(m, &plan) &&
      m3_step_sig_build(m->graphs, be->ops->memory_epoch(be), T, segs, n_segs, c->num_layers,
                        m->hs.rows, rows, head_out0) == M3_OK) {
    st = m3_step_graphs_run(m->graphs, m, run_layers_and_head, &plan);
  } else {
    if (m->graphs) m->graphs->stats.skipped++;
    st = run_layers_and_head(m, &plan);
  }
  if (st == M3_OK) st = m->reduce_status;
  if (st != M3_OK || rows == 0) return st;
  /* A device backend computes the logits in its memory, M3_MODEL_STEP_TOKENS rows at a time, and
   * hands them over (picks: only each row's pick); the CPU writes the caller's buffer directly.
   * The first rows' head ran above. */
  const size_t V = (size_t)c->vocab_size;
  for (int r0 = 0; r0 < rows; r0 += M3_MODEL_STEP_TOKENS) {
    const int n = rows - r0 < M3_MODEL_STEP_TOKENS ? rows - r0 : M3_MODEL_STEP_TOKENS;
    if (r0 > 0 && (st = head_chunk(m, &plan, r0, n)) == M3_OK) st = m->reduce_status;
    if (st != M3_OK) return st;
    if (plan.pairs) {
      if (picked && (st = head_pick(m, n, picked + r0)) != M3_OK) return st;
      continue;
    }
    if (!logits) continue;
    float *head_out = head_output(m, logits, r0);
    if (picks && m->sampling)
      st = be->ops->sample_rows(be, head_out, n, (int)V, m->sampling + r0, picked + r0);
    else if (picks)
      st = be->ops->argmax_rows(be, head_out, n, (int)V, picked + r0);
    else if (head_out != logits + (size_t)r0 * V)
      st = be->ops->to_host(be, logits + (size_t)r0 * V, head_out, (size_t)n * V * sizeof(float));
    if (st != M3_OK) return st;
  }
  *n_rows = rows;
  return M3_OK;
}

static m3_status grow_segments(m3_model *m, int n) {
  if (n <= m->segs_cap) return M3_OK;
  m3_segment *segs = realloc(m->segs, (size_t)n * sizeof *segs);
  if (!segs) return m3_fail(M3_ERR_NOMEM, "model: %d batch segments", n);
  m->segs = segs;
  m->segs_cap = n;
  return M3_OK;
}

/* m3_model_forward_batch_hidden, or with `picks` its argmax (sample) variant. */
static m3_status forward_batch(m3_model *m, const m3_model_seq *seqs, int n_seqs, float *logits,
                               int picks, int32_t *picked, float *const *hidden) {
  m->hidden = hidden;
  /* Only a rank of a split head may return nothing of the rows it computes. */
  const char *missing = m->head_world > 1 ? NULL
                        : !logits         ? " without a logits buffer"
                        : picks && !picked ? " without a tokens buffer"
                                           : NULL;
  m3_status st = M3_OK;
  for (int i = 0; i < n_seqs && st == M3_OK; i++) {
    const m3_model_seq *q = &seqs[i];
    if (q->n_logits < 0 || q->n_logits > q->T || (q->n_logits > 0 && missing))
      return m3_fail(M3_ERR_ARG, "forward: sequence %d asks for %d logit rows of %d tokens%s", i,
                     q->n_logits, q->T, q->n_logits > 0 && missing ? missing : "");
    st = check_inputs(m, q->kv, q->ids, q->pos, q->T, q->capture);
  }
  /* A step holds at most one segment per sequence. */
  const int S = m->step_tokens;
  if (st != M3_OK || (st = grow_segments(m, n_seqs < S ? n_seqs : S)) != M3_OK) return st;
  const size_t V = (size_t)m->cfg.vocab_size;
  size_t logit_row = 0;
  for (int i = 0, off = 0; i < n_seqs;) {
    /* Fill one step with consecutive tokens of the batch, splitting a sequence across steps
     * where it does not fit: later steps see its earlier tokens in the cache. */
    int T = 0, n_segs = 0;
    while (i < n_seqs && T < S) {
      const m3_model_seq *q = &seqs[i];
      int take = q->T - off < S - T ? q->T - off : S - T;
      if (take > 0) {
        m->segs[n_segs++] = (m3_segment){q->kv, T, take, i, off};
        memcpy(m->hs.ids + T, q->ids + off, (size_t)take * sizeof(int32_t));
        memcpy(m->hs.pos + T, q->pos + off, (size_t)take * sizeof(int32_t));
        T += take;
        off += take;
      }
      if (off == q->T) {
        i++;
        off = 0;
      }
    }
    if (T == 0) break;
    int rows;
    st = step(m, m->segs, n_segs, T, seqs, logits ? logits + logit_row * V : NULL, picks,
              picked ? picked + logit_row : NULL, &rows);
    if (st != M3_OK) return st;
    logit_row += (size_t)rows;
    if (m->sampling) m->sampling += rows;
  }
  return M3_OK;
}

m3_status m3_model_forward_batch(m3_model *m, const m3_model_seq *seqs, int n_seqs,
                                 float *logits) {
  return forward_batch(m, seqs, n_seqs, logits, 0, NULL, NULL);
}

m3_status m3_model_forward_batch_hidden(m3_model *m, const m3_model_seq *seqs, int n_seqs,
                                        float *logits, float *const *hidden) {
  return forward_batch(m, seqs, n_seqs, logits, 0, NULL, hidden);
}

m3_status m3_model_forward_batch_argmax(m3_model *m, const m3_model_seq *seqs, int n_seqs,
                                        float *logits, int32_t *tokens, float *const *hidden) {
  return forward_batch(m, seqs, n_seqs, logits, 1, tokens, hidden);
}

m3_status m3_model_forward_batch_sample(m3_model *m, const m3_model_seq *seqs, int n_seqs,
                                        float *logits, const m3_row_sampling *sampling,
                                        int32_t *tokens, float *const *hidden) {
  if (!m->be->ops->sample_rows)
    return m3_fail(M3_ERR_UNSUPPORTED, "forward: the %s backend does not sample", m->be->ops->name);
  m->sampling = sampling;
  m3_status st = forward_batch(m, seqs, n_seqs, logits, 1, tokens, hidden);
  m->sampling = NULL;
  return st;
}

m3_status m3_model_forward(m3_model *m, const m3_kv_view *kv, const int32_t *ids,
                           const int32_t *pos, int T, float *logits,
                           const m3_selection_capture *capture) {
  const m3_model_seq seq = {.kv = kv, .ids = ids, .pos = pos, .T = T,
                            .n_logits = logits ? T : 0, .capture = capture};
  return m3_model_forward_batch(m, &seq, 1, logits);
}

static int is_replaced(const m3_model *m, const m3_st_tensor *t) {
  return m->w.num_replaced > 0 && bsearch(&t->data, m->w.replaced, (size_t)m->w.num_replaced,
                                          sizeof *m->w.replaced, compare_address) != NULL;
}

m3_status m3_model_finish(m3_model *m) {
  float last; /* to_host waits for every op issued before it and reports their failures */
  return m->be->ops->to_host(m->be, &last, m->s.x, sizeof last);
}

void m3_model_prefault(const m3_model *m, void (*progress)(uint64_t done, uint64_t total, void *user),
                       void *user) {
  const int n = m3_st_count(m->st);
  uint64_t total = 0, done = 0, reported = 0;
  for (int i = 0; i < n; i++)
    if (!is_replaced(m, m3_st_at(m->st, i))) total += m3_st_at(m->st, i)->nbytes;
  volatile uint8_t sink = 0;
  for (int i = 0; i < n; i++) {
    const m3_st_tensor *t = m3_st_at(m->st, i);
    if (is_replaced(m, t)) continue;
    const uint8_t *p = t->data;
    for (size_t off = 0; off < t->nbytes; off += 4096) sink ^= p[off];
    done += t->nbytes;
    if (progress && (done - reported >= (64u << 20) || done == total)) {
      progress(done, total, user);
      reported = done;
    }
  }
  if (progress && total == 0) progress(0, 0, user);
  (void)sink;
}
