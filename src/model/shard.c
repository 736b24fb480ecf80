/* shard.c: one rank's share of the text model in a tensor x expert parallel layout, cut at load
 * (engine/parallel.h).
 *
 * Rank (tp_rank, ep_rank) of tp x ep (world rank ep_rank * tp + tp_rank) holds the unsharded
 * model's math on narrower shapes; its partial outputs sum to the unsharded ones through the
 * all-reduce hook (model.h): o_proj and the dense MLP's down over its TP group (the tp ranks of
 * its EP group), an MoE layer's shared expert plus routed experts over the world. What it holds:
 *   q_proj        rows of query heads [t nh/tp, +nh/tp)          (row slice: a view)
 *   o_proj        the same heads' columns                         (column slice: a copy)
 *   k_proj v_proj rows of KV heads [t nkv/tp, +nkv/tp); tp > nkv: the one KV head its query
 *                 heads read, replicated on tp/nkv ranks (GQA groups never straddle ranks)
 *   index_q_proj  rows of the index heads of those KV groups (index head g selects for KV head g)
 *   mlp           gate/up rows and down columns of [t I/tp, +I/tp)
 *   experts       the routed experts [ep_rank E/ep, +E/ep) only, each split inside like the mlp;
 *                 the others are left absent (never read, converted or prepared)
 *   shared        split like the mlp but over the world: [w S/world, +S/world), so that the
 *                 world all-reduce, which combines the EP groups' experts, counts it once
 *   lm_head       rows [w V/world, +V/world) of the vocabulary when the world divides it (tied to
 *                 the embedding: a view of those rows of it), else replicated; the ranks' logits
 *                 meet through a world all-reduce of the slices, zeros elsewhere (model.c head)
 *   replicated    embedding, norms, index_k_proj, router and its bias; attention and the dense
 *                 MLP over the EP groups
 * (t = tp_rank, w = world rank.) The config copy gets the narrowed sizes (num_heads,
 * num_kv_heads, index_num_heads and the three intermediate sizes), so the ops, the step scratch
 * and the KV cache sizing see the rank's shapes; hidden_size and head_dim stay, and so does
 * num_experts: it is the router's count, which routing (the router matmul, moe_route, the
 * selection bias, the router scratch) reads whole on every rank. The experts a layer holds are
 * its present expert tensors, a run [first, first + E/ep) that m3_moe_experts_prepare hands the
 * backend as m3_moe_experts.first and .E. MTP modules are not sharded: a rank drops them. */
#include <stdlib.h>
#include <string.h>

#include "model/layers.h"

/* n must split into `parts` equal parts: else M3_ERR_CONFIG naming the key and the layout size. */
static m3_status check_split(int n, int parts, const char *key, const char *what) {
  if (n % parts != 0)
    return m3_fail(M3_ERR_CONFIG, "config: %s %d is not a multiple of the %s %d", key, n, what,
                   parts);
  return M3_OK;
}

/* t = rows [r0, r0 + n) of t: a view of the same memory, its scale rows with it. */
static m3_status slice_rows(m3_tensor *t, int64_t r0, int64_t n) {
  if (!m3_tensor_present(t)) return M3_OK;
  if (t->quant == M3_WQ_MXFP8) {
    t->scale = (const uint8_t *)t->scale + r0 * t->scale_cols;
    t->scale_rows = n;
  } else if (t->quant == M3_WQ_FP8_BLOCK && t->scale_rows > 1) {
    /* (One scale row, e.g. per-tensor FP8, spans every row: it stays as it is.) */
    const int br = t->block_rows;
    if (r0 % br != 0 || (n % br != 0 && r0 + n != t->rows))
      return m3_fail(M3_ERR_SHAPE, "tensor %s: the tensor-parallel row split at %lld (+%lld) of %lld "
                     "rows cuts its %d-row scale blocks", t->name, (long long)r0, (long long)n,
                     (long long)t->rows, br);
    t->scale = (const float *)t->scale + (r0 / br) * t->scale_cols;
    t->scale_rows = (n + br - 1) / br;
  }
  t->data = (const uint8_t *)t->data + (size_t)r0 * (size_t)t->cols * m3_dtype_size(t->dtype);
  t->rows = n;
  return M3_OK;
}

/* dst[rows, n] = the columns [c0, c0 + n) of src[rows, cols], elements of `size` bytes. */
static void gather_cols(void *dst, const void *src, int64_t rows, int64_t cols, int64_t c0,
                        int64_t n, size_t size) {
  for (int64_t r = 0; r < rows; r++)
    memcpy((uint8_t *)dst + (size_t)(r * n) * size, (const uint8_t *)src + (size_t)(r * cols + c0) * size,
           (size_t)n * size);
}

/* A copy of cols [c0, c0 + n) of src's `rows` rows, owned by w; NULL after m3_fail. */
static void *owned_cols(m3_weights *w, const m3_tensor *t, const void *src, int64_t rows,
                        int64_t cols, int64_t c0, int64_t n, size_t size) {
  void *mem = malloc((size_t)(rows * n) * size);
  if (!mem) {
    m3_fail(M3_ERR_NOMEM, "tensor %s: %lld x %lld tensor-parallel column slice", t->name,
            (long long)rows, (long long)n);
    return NULL;
  }
  gather_cols(mem, src, rows, cols, c0, n, size);
  return m3_weights_adopt(w, mem, NULL) == M3_OK ? mem : NULL;
}

/* t = columns [c0, c0 + n) of t, gathered into memory w owns (the backend then takes it as any
 * other tensor); scale columns cut at the same place, which must be a scale block boundary. */
static m3_status slice_cols(m3_weights *w, m3_tensor *t, int64_t c0, int64_t n) {
  if (!m3_tensor_present(t) || (c0 == 0 && n == t->cols)) return M3_OK; /* nothing to cut */
  /* MXFP8 always at block boundaries, so that every slice keeps whole 32-column blocks as the
   * checkpoint's do; an FP8 scale column that spans every column (per-channel, per-tensor, or
   * one block wider than the matrix) stays as it is wherever the cut. */
  if (t->quant == M3_WQ_MXFP8 || (t->quant == M3_WQ_FP8_BLOCK && t->scale_cols > 1)) {
    const int bc = t->block_cols;
    if (c0 % bc != 0 || n % bc != 0)
      return m3_fail(M3_ERR_SHAPE, "tensor %s: the tensor-parallel column split at %lld (+%lld) of "
                     "%lld columns is not a multiple of its %d-column scale blocks", t->name,
                     (long long)c0, (long long)n, (long long)t->cols, bc);
    const size_t size = t->quant == M3_WQ_MXFP8 ? 1 : sizeof(float);
    const void *scale = owned_cols(w, t, t->scale, t->scale_rows, t->scale_cols, c0 / bc, n / bc, size);
    if (!scale) return M3_ERR_NOMEM;
    t->scale = scale;
    t->scale_cols = n / bc;
  }
  const void *data = owned_cols(w, t, t->data, t->rows, t->cols, c0, n, m3_dtype_size(t->dtype));
  if (!data) return M3_ERR_NOMEM;
  t->data = data;
  t->cols = n;
  return M3_OK;
}

/* gate/up rows and down columns [r0, r0 + n) of one SwiGLU MLP. */
static m3_status slice_mlp(m3_weights *w, m3_tensor *gate, m3_tensor *up, m3_tensor *down,
                           int64_t r0, int64_t n) {
  m3_status st = slice_rows(gate, r0, n);
  if (st == M3_OK) st = slice_rows(up, r0, n);
  if (st == M3_OK) st = slice_cols(w, down, r0, n);
  return st;
}

/* t = this rank's rows of the vocabulary, one of head_world equal slices (lm_head's share). */
static m3_status slice_vocab(const m3_model *m, m3_tensor *t) {
  const int64_t slice = m->cfg.vocab_size / m->head_world;
  return slice_rows(t, (int64_t)m->head_rank * slice, slice);
}

/* What the layout cuts in m's layers. */
typedef struct {
  int sparse, dense, moe, shared;
} layer_kinds;

static layer_kinds kinds_of(const m3_model *m) {
  const m3_config *c = &m->cfg;
  layer_kinds k = {0};
  for (int l = 0; l < c->num_layers; l++) {
    k.sparse |= c->layer_attn[l] == M3_ATTN_SPARSE;
    k.dense |= c->layer_mlp[l] == M3_MLP_DENSE;
    k.moe |= c->layer_mlp[l] == M3_MLP_MOE;
    k.shared |= m3_tensor_present(&m->w.layers[l].shared_gate);
  }
  return k;
}

static m3_status check_layout(const m3_model *m, const m3_shard *lay) {
  const m3_config *c = &m->cfg;
  const int tp = lay->tp, ep = lay->ep;
  if (tp < 1 || lay->tp_rank < 0 || lay->tp_rank >= tp)
    return m3_fail(M3_ERR_ARG, "model: tensor-parallel rank %d of %d", lay->tp_rank, tp);
  if (ep < 1 || lay->ep_rank < 0 || lay->ep_rank >= ep)
    return m3_fail(M3_ERR_ARG, "model: expert-parallel rank %d of %d", lay->ep_rank, ep);
  const layer_kinds k = kinds_of(m);
  m3_status st = check_split(c->num_heads, tp, "num_attention_heads", "tensor-parallel size");
  if (st == M3_OK && c->num_kv_heads % tp != 0 && (tp % c->num_kv_heads != 0))
    st = m3_fail(M3_ERR_CONFIG, "config: num_key_value_heads %d and the tensor-parallel size %d: "
                 "neither divides the other", c->num_kv_heads, tp);
  if (st == M3_OK && k.dense)
    st = check_split(c->dense_intermediate_size, tp, "dense_intermediate_size",
                     "tensor-parallel size");
  if (st == M3_OK && ep > 1 && !k.moe)
    st = m3_fail(M3_ERR_CONFIG, "config: mlp_layer_types has no MoE layer whose experts the "
                 "expert-parallel size %d could split", ep);
  if (st == M3_OK && k.moe)
    st = check_split(c->num_experts, ep, "num_local_experts", "expert-parallel size");
  if (st == M3_OK && k.moe)
    st = check_split(c->intermediate_size, tp, "intermediate_size", "tensor-parallel size");
  if (st == M3_OK && k.shared)
    st = check_split(c->shared_intermediate_size, tp * ep, "shared_intermediate_size",
                     "world size (tensor x expert parallel)");
  return st;
}

m3_status m3_model_shard_experts(m3_model *m, const m3_shard *lay) {
  m3_status st = check_layout(m, lay);
  if (st != M3_OK || lay->tp * lay->ep == 1) return st;
  const m3_config *c = &m->cfg;
  const int held = c->num_experts / lay->ep, first = lay->ep_rank * held;
  for (int l = 0; lay->ep > 1 && l < c->num_layers; l++) {
    m3_layer_weights *L = &m->w.layers[l];
    for (int e = 0; L->expert_gate && e < c->num_experts; e++) {
      if (e >= first && e < first + held) continue;
      L->expert_gate[e] = L->expert_up[e] = L->expert_down[e] = (m3_tensor){0};
    }
  }
  m->w.num_mtp = 0;
  return M3_OK;
}

m3_status m3_model_shard(m3_model *m, const m3_shard *lay) {
  m3_config *c = &m->cfg;
  const int tp = lay->tp, rank = lay->tp_rank, world = tp * lay->ep;
  const int world_rank = lay->ep_rank * tp + rank;
  if (world == 1) return M3_OK;
  const int hd = c->head_dim, ihd = c->index_head_dim;
  const int nq = c->num_heads / tp, q0 = rank * nq;
  /* tp > nkv: the KV head of this rank's query heads (one GQA group of nh / nkv heads). */
  const int nkv = c->num_kv_heads >= tp ? c->num_kv_heads / tp : 1;
  const int kv0 = c->num_kv_heads >= tp ? rank * nkv : q0 / (c->num_heads / c->num_kv_heads);
  const int dense_n = c->dense_intermediate_size / tp, expert_n = c->intermediate_size / tp;
  const int shared_n = c->shared_intermediate_size / world;
  m3_weights *w = &m->w;
  m3_status st = M3_OK;
  for (int l = 0; l < c->num_layers && st == M3_OK; l++) {
    m3_layer_weights *L = &w->layers[l];
    st = slice_rows(&L->q_proj, (int64_t)q0 * hd, (int64_t)nq * hd);
    if (st == M3_OK) st = slice_cols(w, &L->o_proj, (int64_t)q0 * hd, (int64_t)nq * hd);
    if (st == M3_OK) st = slice_rows(&L->k_proj, (int64_t)kv0 * hd, (int64_t)nkv * hd);
    if (st == M3_OK) st = slice_rows(&L->v_proj, (int64_t)kv0 * hd, (int64_t)nkv * hd);
    if (st == M3_OK) st = slice_rows(&L->index_q_proj, (int64_t)kv0 * ihd, (int64_t)nkv * ihd);
    if (st == M3_OK)
      st = slice_mlp(w, &L->mlp_gate, &L->mlp_up, &L->mlp_down, (int64_t)rank * dense_n, dense_n);
    if (st == M3_OK)
      st = slice_mlp(w, &L->shared_gate, &L->shared_up, &L->shared_down,
                     (int64_t)world_rank * shared_n, shared_n);
    /* (The experts other EP groups hold are absent: their slices are no-ops.) */
    for (int e = 0; L->expert_gate && e < c->num_experts && st == M3_OK; e++)
      st = slice_mlp(w, &L->expert_gate[e], &L->expert_up[e], &L->expert_down[e],
                     (int64_t)rank * expert_n, expert_n);
  }
  if (st != M3_OK) return st;
  if (c->vocab_size % world == 0) {
    /* Tied: the slice of the embedding is checked here, taken at m3_model_tie_head (the
     * embedding is prepared whole: every rank looks up any token). */
    m->head_world = world;
    m->head_rank = world_rank;
    m3_tensor embed_rows = w->embed;
    if ((st = slice_vocab(m, w->lm_head_tied ? &embed_rows : &w->lm_head)) != M3_OK) return st;
  }
  c->num_heads = nq;
  c->num_kv_heads = nkv;
  if (kinds_of(m).sparse) c->index_num_heads = nkv; /* = num_kv_heads (check_supported) */
  c->dense_intermediate_size = dense_n;
  c->intermediate_size = expert_n;
  c->shared_intermediate_size = shared_n;
  return M3_OK;
}

void m3_model_tie_head(m3_model *m) {
  m3_weights *w = &m->w;
  w->lm_head = w->embed;
  if (m->head_world > 1) (void)slice_vocab(m, &w->lm_head); /* cannot fail: checked at shard */
}
