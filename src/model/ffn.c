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
 * [expert_start[e], expert_start[e+1]) of slot_tok / slot_w. */
static void group_by_expert(m3_scratch *s, int T, int E, int k) {
  int32_t *start = s->expert_start;
  for (int e = 0; e <= E; e++) start[e] = 0;
  for (int i = 0; i < T * k; i++) start[s->route_ids[i] + 1]++;
  for (int e = 0; e < E; e++) start[e + 1] += start[e];
  /* start[e] now advances as slots are placed; shift back afterwards. */
  for (int i = 0; i < T * k; i++) {
    int e = s->route_ids[i];
    s->slot_tok[start[e]] = i / k;
    s->slot_w[start[e]] = s->route_w[i];
    start[e]++;
  }
  for (int e = E; e > 0; e--) start[e] = start[e - 1];
  start[0] = 0;
}

static void moe(m3_model *m, int l, int T) {
  const m3_config *c = &m->cfg;
  const m3_layer_weights *w = &m->w.layers[l];
  m3_scratch *s = &m->s;
  m3_backend *be = m->be;
  const int H = c->hidden_size, E = c->num_experts, k = c->num_experts_per_tok;

  be->ops->matmul(be, &w->router, s->h, T, s->router);
  be->ops->moe_route(be, s->router, m->router_bias[l], T, E, k, c->routed_scaling_factor,
                     s->route_ids, s->route_w);
  group_by_expert(s, T, E, k);

  /* h viewed as a float32 table, so gathering an expert's rows is the embed op. */
  const m3_tensor h_rows = {.name = "post-attention hidden", .data = s->h, .dtype = M3_DT_F32,
                            .rows = T, .cols = H, .quant = M3_WQ_NONE};
  for (int e = 0; e < E; e++) {
    int first = s->expert_start[e], n = s->expert_start[e + 1] - first;
    if (n == 0) continue;
    be->ops->embed(be, &h_rows, s->slot_tok + first, n, s->xe);
    swiglu_mlp(m, &w->expert_gate[e], &w->expert_up[e], &w->expert_down[e], s->xe, n, s->out);
    for (int i = 0; i < n; i++)
      be->ops->add_scaled_rows(be, s->x + (size_t)s->slot_tok[first + i] * H,
                               s->out + (size_t)i * H, &s->slot_w[first + i], 1, H);
  }

  if (m3_tensor_present(&w->shared_gate)) {
    swiglu_mlp(m, &w->shared_gate, &w->shared_up, &w->shared_down, s->h, T, s->out);
    be->ops->add(be, s->x, s->out, (size_t)T * H);
  }
}

void m3_ffn_block(m3_model *m, int l, int T) {
  const m3_config *c = &m->cfg;
  const m3_layer_weights *w = &m->w.layers[l];
  m3_scratch *s = &m->s;
  m3_backend *be = m->be;

  be->ops->rmsnorm(be, s->x, &w->post_attn_norm, c->rms_norm_eps, T, c->hidden_size, s->h);
  if (c->layer_mlp[l] == M3_MLP_MOE) {
    moe(m, l, T);
  } else {
    swiglu_mlp(m, &w->mlp_gate, &w->mlp_up, &w->mlp_down, s->h, T, s->out);
    be->ops->add(be, s->x, s->out, (size_t)T * c->hidden_size);
  }
}
