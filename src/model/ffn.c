/* ffn.c: the feed-forward half of a decoder layer (m3_text_spec.md §3.4, §3.5, §4.2, §4.3).
 *
 *   h = GemmaRMSNorm(x, post_attn_norm)                                   [T, H]
 * dense layers:
 *   x += SwiGLU_OAI(h Wgate^T, h Wup^T) Wdown^T                           [T, I] -> [T, H]
 * MoE layers:
 *   logits = h Wrouter^T in fp32 (router weights as stored, F32)          [T, E]
 *   ids, w = moe_route(logits, bias)  sigmoid, biased top-k, renormalised, x routed_scaling
 *   x += sum_j w[t, j] * Expert_{ids[t, j]}(h[t])   each expert runs once on its gathered tokens
 *   x += SharedExpert(h)                            unscaled */
#include "model/layers.h"

/* out[n, H] = SwiGLU_OAI(in Wgate^T, in Wup^T) Wdown^T for n rows of in [n, H]. */
static void swiglu_mlp(m3_model *m, const m3_tensor *gate, const m3_tensor *up,
                       const m3_tensor *down, const float *in, int n, float *out) {
  const m3_config *c = &m->cfg;
  m3_scratch *s = &m->s;
  m3_backend *be = m->be;
  be->ops->matmul(be, gate, in, n, s->gate);
  be->ops->matmul(be, up, in, n, s->up);
  be->ops->swiglu_oai(be, s->gate, s->up, (size_t)n * (size_t)gate->rows, c->swiglu_alpha,
                      c->swiglu_beta, c->swiglu_limit, s->gate);
  be->ops->matmul(be, down, s->gate, n, out);
}

/* Groups the T*k (token, choice) slots by expert (a counting sort, stable in token order), so
 * each expert reads its weights once per step: expert e owns slots
 * [expert_start[e], expert_start[e+1]) of slot_tok / slot_w. Host arrays. */
static void group_by_expert(m3_host_side *hs, int T, int E, int k) {
  int32_t *start = hs->expert_start;
  for (int e = 0; e <= E; e++) start[e] = 0;
  for (int i = 0; i < T * k; i++) start[hs->route_ids[i] + 1]++;
  for (int e = 0; e < E; e++) start[e + 1] += start[e];
  /* start[e] now advances as slots are placed; shift back afterwards. */
  for (int i = 0; i < T * k; i++) {
    int e = hs->route_ids[i];
    hs->slot_tok[start[e]] = i / k;
    hs->slot_w[start[e]] = hs->route_w[i];
    start[e]++;
  }
  for (int e = E; e > 0; e--) start[e] = start[e - 1];
  start[0] = 0;
}

/* The routing of the step's T tokens, grouped by expert on the host: the expert loop below is
 * host control flow, so it needs the routing there. */
static m3_status route(m3_model *m, int l, int T) {
  const m3_config *c = &m->cfg;
  m3_scratch *s = &m->s;
  m3_host_side *hs = &m->hs;
  m3_backend *be = m->be;
  const int E = c->num_experts, k = c->num_experts_per_tok;
  const size_t slots = (size_t)T * (size_t)k;

  be->ops->matmul(be, &m->w.layers[l].router, s->h, T, s->router);
  be->ops->moe_route(be, s->router, m->router_bias[l], T, E, k, c->routed_scaling_factor,
                     s->route_ids, s->route_w);
  m3_status st = m3_download(m, hs->route_ids, s->route_ids, slots * sizeof(int32_t));
  if (st == M3_OK) st = m3_download(m, hs->route_w, s->route_w, slots * sizeof(float));
  if (st != M3_OK) return st;
  group_by_expert(hs, T, E, k);
  st = m3_upload(m, s->slot_tok, hs->slot_tok, slots * sizeof(int32_t));
  if (st == M3_OK) st = m3_upload(m, s->slot_w, hs->slot_w, slots * sizeof(float));
  return st;
}

static m3_status moe(m3_model *m, int l, int T) {
  const m3_config *c = &m->cfg;
  const m3_layer_weights *w = &m->w.layers[l];
  m3_scratch *s = &m->s;
  const m3_host_side *hs = &m->hs;
  m3_backend *be = m->be;
  const int H = c->hidden_size, E = c->num_experts;

  m3_status st = route(m, l, T);
  if (st != M3_OK) return st;

  /* h viewed as a float32 table, so gathering an expert's rows is the embed op. */
  const m3_tensor h_rows = {.name = "post-attention hidden", .data = s->h, .dtype = M3_DT_F32,
                            .rows = T, .cols = H, .quant = M3_WQ_NONE};
  for (int e = 0; e < E; e++) {
    int first = hs->expert_start[e], n = hs->expert_start[e + 1] - first;
    if (n == 0) continue;
    be->ops->embed(be, &h_rows, s->slot_tok + first, n, s->xe);
    swiglu_mlp(m, &w->expert_gate[e], &w->expert_up[e], &w->expert_down[e], s->xe, n, s->out);
    for (int i = 0; i < n; i++)
      be->ops->add_scaled_rows(be, s->x + (size_t)hs->slot_tok[first + i] * H,
                               s->out + (size_t)i * H, &s->slot_w[first + i], 1, H);
  }

  if (m3_tensor_present(&w->shared_gate)) {
    swiglu_mlp(m, &w->shared_gate, &w->shared_up, &w->shared_down, s->h, T, s->out);
    be->ops->add(be, s->x, s->out, (size_t)T * H);
  }
  return M3_OK;
}

m3_status m3_ffn_block(m3_model *m, int l, int T) {
  const m3_config *c = &m->cfg;
  const m3_layer_weights *w = &m->w.layers[l];
  m3_scratch *s = &m->s;
  m3_backend *be = m->be;

  be->ops->rmsnorm(be, s->x, &w->post_attn_norm, c->rms_norm_eps, T, c->hidden_size, s->h);
  if (c->layer_mlp[l] == M3_MLP_MOE) return moe(m, l, T);
  swiglu_mlp(m, &w->mlp_gate, &w->mlp_up, &w->mlp_down, s->h, T, s->out);
  be->ops->add(be, s->x, s->out, (size_t)T * c->hidden_size);
  return M3_OK;
}
