/* mtp.c: the MTP drafter (m3_text_spec.md §8.1), module m at position p:
 *
 *   e   = embed_tokens[x_{p+1}], zero at p == 0                       [T, H]  (vLLM, RTP)
 *   z   = [GemmaRMSNorm(e, enorm) ; GemmaRMSNorm(hprev, hnorm)]         [T, 2H]
 *   u   = z eh_proj^T                                                  [T, H]
 *   out = decoder layer (MSA attention over the module's own K/V/IK cache layer, MoE)(u)
 * and draft.c applies final_layernorm and the target's lm_head. The decoder layer is the target's
 * own code (attention.c, ffn.c) run on a one-layer view of the model whose layer 0 is the
 * module's transformer_layer; it shares the target's step scratch, which is free while the
 * drafter runs. */
#include <stdlib.h>
#include <string.h>

#include "model/draft_internal.h"

typedef struct {
  m3_drafter base;
  m3_model body;          /* one-layer view: cfg, weights and router bias of the current module */
  uint8_t attn_kind, mlp_kind;
  int num_mtp;
  float **router_bias;    /* [num_mtp] decoded e_score_correction_bias, backend memory */
  float *e, *hn, *z;      /* [STEP, H], [STEP, H], [STEP, 2H] */
  float *zero_row;        /* host [H] */
  m3_segment *segs;       /* [STEP] the step's segments on the module's cache layer */
  m3_tensor **prepared;   /* weights handed to a device backend */
  int num_prepared;
  m3_moe_experts *experts; /* [num_mtp] each module's routed experts, prepared */
} mtp_drafter;

static m3_status mtp_body(m3_drafter *d, const m3_segment *segs, int n_segs, int T, int step) {
  mtp_drafter *m = (mtp_drafter *)d;
  m3_backend *be = d->be;
  const m3_config *c = &m->body.cfg;
  const int H = d->H, module = step % m->num_mtp;
  const m3_mtp_weights *w = &(&d->target->w)->mtp[module];
  m->body.w.layers = (m3_layer_weights *)&w->layer;
  m->body.router_bias = &m->router_bias[module];
  m->body.experts = &m->experts[module];
  d->head_norm = &w->final_norm;

  be->ops->embed(be, &(&d->target->w)->embed, d->ids, T, m->e);
  /* Position 0 has no previous token: its embedding input is masked (spec §8.1). */
  for (int t = 0; t < T; t++)
    if (d->h_pos[t] == 0) {
      m3_status st = be->ops->to_device(be, m->e + (size_t)t * H, m->zero_row, (size_t)H * 4);
      if (st != M3_OK) return st;
    }
  be->ops->rmsnorm(be, m->e, &w->enorm, c->rms_norm_eps, T, H, m->e);
  be->ops->rmsnorm(be, d->hin, &w->hnorm, c->rms_norm_eps, T, H, m->hn);
  m3_drafter_concat(be, m->e, m->hn, T, H, m->z);
  be->ops->matmul(be, &w->eh_proj, m->z, T, m->body.s.x);

  /* The body reads segment views as layer 0: point each at the module's cache layer. */
  for (int i = 0; i < n_segs; i++) {
    m->segs[i] = segs[i];
    m->segs[i].kv = segs[i].kv + module;
  }
  m->body.s.ids = d->ids;
  m->body.s.pos = d->pos;
  be->ops->rmsnorm(be, m->body.s.x, &w->layer.input_norm, c->rms_norm_eps, T, H, m->body.s.h);
  m3_attention_block(&m->body, 0, m->segs, n_segs, T);
  m3_ffn_block(&m->body, 0, T, NULL);
  return be->ops->copy(be, d->out, m->body.s.x, (size_t)T * H * sizeof(float));
}

static void mtp_destroy(m3_drafter *d) {
  mtp_drafter *m = (mtp_drafter *)d;
  m3_backend *be = d->be;
  for (int i = 0; m->experts && i < m->num_mtp; i++) m3_moe_experts_release(be, &m->experts[i]);
  free(m->experts);
  for (int i = 0; i < m->num_prepared; i++) be->ops->release_tensor(be, m->prepared[i]);
  free(m->prepared);
  for (int i = 0; m->router_bias && i < m->num_mtp; i++)
    if (m->router_bias[i]) be->ops->free(be, m->router_bias[i]);
  free(m->router_bias);
  float *bufs[] = {m->e, m->hn, m->z};
  for (int i = 0; i < 3; i++)
    if (bufs[i]) be->ops->free(be, bufs[i]);
  free(m->zero_row);
  free(m->segs);
  m3_drafter_free_base(d);
  free(m);
}

static const m3_drafter_ops mtp_ops = {mtp_body, mtp_destroy};

/* Hands the modules' weights to the backend (uploads on a device backend), once. */
static m3_status prepare_modules(mtp_drafter *m, m3_weights *w, int E) {
  enum { PER_MODULE = 4 + 15 };
  const size_t cap = (size_t)m->num_mtp * (PER_MODULE + 1 + 3 * (size_t)E);
  m->prepared = calloc(cap, sizeof *m->prepared);
  if (!m->prepared) return m3_fail(M3_ERR_NOMEM, "MTP: list of %zu weights", cap);
  m3_backend *be = m->base.be;
  for (int i = 0; i < m->num_mtp; i++) {
    m3_mtp_weights *t = &w->mtp[i];
    m3_layer_weights *L = &t->layer;
    m3_tensor *list[PER_MODULE] = {
        &t->enorm,         &t->hnorm,          &t->eh_proj,     &t->final_norm,
        &L->input_norm,    &L->post_attn_norm, &L->q_proj,      &L->k_proj,
        &L->v_proj,        &L->o_proj,         &L->q_norm,      &L->k_norm,
        &L->index_q_proj,  &L->index_k_proj,   &L->index_q_norm, &L->index_k_norm,
        &L->router,        &L->shared_gate,    &L->shared_up};
    for (int j = 0; j < PER_MODULE + 1 + 3 * E; j++) {
      m3_tensor *x = j < PER_MODULE ? list[j]
                     : j == PER_MODULE ? &L->shared_down
                     : (j - PER_MODULE - 1) % 3 == 0 ? &L->expert_gate[(j - PER_MODULE - 1) / 3]
                     : (j - PER_MODULE - 1) % 3 == 1 ? &L->expert_up[(j - PER_MODULE - 1) / 3]
                                                     : &L->expert_down[(j - PER_MODULE - 1) / 3];
      if (!m3_tensor_present(x)) continue;
      m3_status st = be->ops->prepare_tensor(be, x);
      if (st != M3_OK) return st;
      m->prepared[m->num_prepared++] = x;
    }
  }
  return M3_OK;
}

static m3_status prepare_experts(mtp_drafter *m, m3_weights *w) {
  const m3_config *c = m3_model_config(m->base.target);
  m->experts = calloc((size_t)m->num_mtp, sizeof *m->experts);
  if (!m->experts) return m3_fail(M3_ERR_NOMEM, "MTP: expert tables");
  for (int i = 0; i < m->num_mtp; i++) {
    m3_status st = m3_moe_experts_prepare(m->base.be, c, &w->mtp[i].layer, &m->experts[i]);
    if (st != M3_OK) return st;
  }
  return M3_OK;
}

static m3_status decode_biases(mtp_drafter *m, m3_weights *w, int E) {
  m3_backend *be = m->base.be;
  m->router_bias = calloc((size_t)m->num_mtp, sizeof *m->router_bias);
  float *host = malloc((size_t)E * sizeof(float) + 1);
  m3_status st = m->router_bias && host ? M3_OK : m3_fail(M3_ERR_NOMEM, "MTP: router biases");
  for (int i = 0; i < m->num_mtp && st == M3_OK; i++) {
    const m3_tensor *b = &w->mtp[i].layer.router_bias;
    if (!m3_tensor_present(b)) continue;
    if (b->rows * b->cols != E) {
      st = m3_fail(M3_ERR_SHAPE, "%s: %lld values, expected %d (num_local_experts)", b->name,
                   (long long)(b->rows * b->cols), E);
    } else if (!(m->router_bias[i] = be->ops->alloc(be, (size_t)E * sizeof(float)))) {
      st = m3_fail(M3_ERR_NOMEM, "MTP: router bias of module %d", i);
    } else {
      m3_tensor_row_f32(b, 0, host);
      st = be->ops->to_device(be, m->router_bias[i], host, (size_t)E * sizeof(float));
    }
  }
  free(host);
  return st;
}

m3_status m3_drafter_mtp_create(m3_model *target, m3_drafter **out) {
  *out = NULL;
  m3_weights *w = &target->w;
  const m3_config *c = m3_model_config(target);
  if (w->num_mtp == 0)
    return m3_fail(M3_ERR_MISSING, "MTP: the checkpoint has no model.mtp.layers.* tensors");
  mtp_drafter *m = calloc(1, sizeof *m);
  if (!m) return m3_fail(M3_ERR_NOMEM, "MTP: out of memory");
  m3_drafter *d = &m->base;
  d->ops = &mtp_ops;
  d->be = m3_model_backend(target);
  d->target = target;
  d->H = c->hidden_size;
  d->in_width = c->hidden_size;
  d->vocab = c->vocab_size;
  d->head_eps = c->rms_norm_eps;
  d->head_norm = &w->mtp[0].final_norm;
  d->lm_head = &w->lm_head;
  m->num_mtp = w->num_mtp;

  /* One physical view of the target model with a single sparse MoE layer. */
  m->body = *target;
  m->attn_kind = M3_ATTN_SPARSE;
  m->mlp_kind = M3_MLP_MOE;
  m->body.cfg.num_layers = 1;
  m->body.cfg.layer_attn = &m->attn_kind;
  m->body.cfg.layer_mlp = &m->mlp_kind;
  m->body.segs = NULL;
  m->body.segs_cap = 0;
  m->body.hidden_slot = NULL;
  m->body.num_hidden = 0;

  const size_t S = M3_MODEL_STEP_TOKENS, H = (size_t)d->H;
  m3_backend *be = d->be;
  m3_status st = M3_OK;
  if (!(d->target_layers = malloc(sizeof *d->target_layers))) {
    st = m3_fail(M3_ERR_NOMEM, "MTP: out of memory");
    goto fail;
  }
  d->target_layers[0] = c->num_layers; /* the final hidden after model.norm (spec §8.2) */
  d->n_target_layers = 1;
  m->e = be->ops->alloc(be, S * H * 4);
  m->hn = be->ops->alloc(be, S * H * 4);
  m->z = be->ops->alloc(be, S * 2 * H * 4);
  m->zero_row = calloc(H, sizeof *m->zero_row);
  m->segs = malloc(S * sizeof *m->segs);
  if (!m->e || !m->hn || !m->z || !m->zero_row || !m->segs) {
    st = m3_fail(M3_ERR_NOMEM, "MTP: step buffers");
    goto fail;
  }
  if ((st = m3_drafter_cache_layers(d, m->num_mtp, M3_ATTN_SPARSE, M3_MLP_MOE)) != M3_OK ||
      (st = m3_drafter_alloc_steps(d)) != M3_OK ||
      (st = decode_biases(m, w, c->num_experts)) != M3_OK ||
      (st = prepare_modules(m, w, c->num_experts)) != M3_OK ||
      (st = prepare_experts(m, w)) != M3_OK)
    goto fail;
  *out = d;
  return M3_OK;

fail:
  mtp_destroy(d);
  return st;
}
