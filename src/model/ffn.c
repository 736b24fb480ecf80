/* ffn.c: the feed-forward half of a decoder layer (m3_text_spec.md §3.4, §3.5, §4.2, §4.3).
 *
 *   h = GemmaRMSNorm(x, post_attn_norm)                  [T, H]   on entry (the attention half's)
 * dense layers:
 *   x += SwiGLU_OAI(h Wgate^T, h Wup^T) Wdown^T                           [T, I] -> [T, H]
 * MoE layers:
 *   logits = h Wrouter^T in fp32 (router weights as stored, F32)          [T, E]
 *   ids, w = moe_route(logits, bias)  sigmoid, biased top-k, renormalised, x routed_scaling
 *   x += sum_j w[t, j] * Expert_{ids[t, j]}(h[t])   moe_experts: each expert reads its weights once
 *   x += SharedExpert(h)                            unscaled (moe_experts too, on one rank)
 * then, when the step goes on: h = GemmaRMSNorm(x, next norm), fused with the last add where the
 * model makes it (not after moe_experts, which adds onto x itself).
 * Tensor / expert parallel ranks (m3_model_set_all_reduce) sum each FFN output before its residual
 * add: a dense MLP's over the TP group (replicated over the EP groups, each of which computes it
 * whole), an MoE layer's over the world, once, the shared and routed experts together: each EP
 * group holds 1/ep of the experts (each split over its TP group) and each world rank 1/world of
 * the shared expert, so only the world sum holds every expert's share exactly once. */
#include "model/layers.h"

/* out[n, H] = SwiGLU_OAI(s->gate, s->up) Wdown^T: the second half of a SwiGLU MLP of width I
 * whose gate and up projections [n, I] wait in s->gate and s->up. */
static void swiglu_down(m3_model *m, int64_t I, const m3_tensor *down, int n, float *out) {
  const m3_config *c = &m->cfg;
  m3_scratch *s = &m->s;
  m3_backend *be = m->be;
  be->ops->swiglu_oai(be, s->gate, s->up, (size_t)n * (size_t)I, c->swiglu_alpha, c->swiglu_beta,
                      c->swiglu_limit, s->gate);
  be->ops->matmul(be, down, s->gate, n, out);
}

/* out[n, H] = SwiGLU_OAI(in Wgate^T, in Wup^T) Wdown^T for n rows of in [n, H]; gate and up in
 * one pass. */
static void swiglu_mlp(m3_model *m, const m3_tensor *gate, const m3_tensor *up,
                       const m3_tensor *down, const float *in, int n, float *out) {
  m3_scratch *s = &m->s;
  m3_backend *be = m->be;
  const m3_matmul_out proj[] = {{gate, s->gate}, {up, s->up}};
  be->ops->matmul_set(be, in, n, proj, 2);
  swiglu_down(m, gate->rows, down, n, out);
}

m3_status m3_moe_experts_prepare(m3_backend *be, const m3_config *c, const m3_layer_weights *L,
                                 m3_moe_experts *ex) {
  int first = 0, n = 0;
  while (first < c->num_experts && !m3_tensor_present(&L->expert_gate[first])) first++;
  while (first + n < c->num_experts && m3_tensor_present(&L->expert_gate[first + n])) n++;
  const int shared = m3_tensor_present(&L->shared_gate);
  *ex = (m3_moe_experts){.gate = L->expert_gate + first, .up = L->expert_up + first,
                         .down = L->expert_down + first,
                         .shared_gate = shared ? &L->shared_gate : NULL,
                         .shared_up = shared ? &L->shared_up : NULL,
                         .shared_down = shared ? &L->shared_down : NULL, .E = n, .first = first,
                         .alpha = c->swiglu_alpha, .beta = c->swiglu_beta, .limit = c->swiglu_limit};
  m3_status st = be->ops->prepare_experts(be, ex);
  if (st != M3_OK) *ex = (m3_moe_experts){0};
  return st;
}

void m3_moe_experts_release(m3_backend *be, m3_moe_experts *ex) {
  if (ex->gate) be->ops->release_experts(be, ex);
  *ex = (m3_moe_experts){0};
}

/* Tensor / expert parallelism: each rank holds a slice of the shared expert's width and of its
 * EP group's experts' widths (the choices of other groups' experts it skips), so its shared
 * expert and routed experts are partial sums. They go into s.out together (the shared expert's
 * output, or zeros, then the routed experts added onto it) so that one world all-reduce sums both
 * before the residual add. The shared expert's gate and up projections are in s->gate and s->up
 * already (moe); the experts op runs the routed ones alone. */
static void moe_parallel(m3_model *m, int l, int T, const m3_tensor *next) {
  const m3_config *c = &m->cfg;
  const m3_layer_weights *w = &m->w.layers[l];
  m3_scratch *s = &m->s;
  m3_backend *be = m->be;
  const size_t n = (size_t)T * c->hidden_size;
  m3_moe_experts routed = m->experts[l];
  routed.shared_gate = routed.shared_up = routed.shared_down = NULL;
  m3_status st;
  if (m3_tensor_present(&w->shared_gate))
    swiglu_down(m, w->shared_gate.rows, &w->shared_down, T, s->out);
  else if ((st = be->ops->copy(be, s->out, m->zeros, n * sizeof(float))) != M3_OK &&
           m->reduce_status == M3_OK)
    m->reduce_status = st; /* the step returns it; the all-reduce below still pairs up */
  be->ops->moe_experts(be, &routed, s->h, T, s->route_ids, s->route_w, c->num_experts_per_tok,
                       s->out);
  m3_model_reduce_residual(m, M3_REDUCE_WORLD, T, next);
}

static void moe(m3_model *m, int l, int T, const m3_tensor *next) {
  const m3_config *c = &m->cfg;
  const m3_layer_weights *w = &m->w.layers[l];
  m3_scratch *s = &m->s;
  m3_backend *be = m->be;
  const int k = c->num_experts_per_tok;
  const int shared = m3_tensor_present(&w->shared_gate);

  /* The router, and under tensor parallelism the shared expert's gate and up, in one pass over
   * h; those projections wait in s->gate and s->up, which routing and the routed experts leave
   * alone. On one rank the experts op runs the shared expert with the routed ones: on the GPU
   * its matrices then join the experts' launches at one token instead of three of their own. */
  const m3_matmul_out proj[] = {{&w->router, s->router}, {&w->shared_gate, s->gate},
                                {&w->shared_up, s->up}};
  be->ops->matmul_set(be, s->h, T, proj, shared && m->all_reduce ? 3 : 1);
  be->ops->moe_route(be, s->router, m->router_bias[l], T, c->num_experts, k,
                     c->routed_scaling_factor, s->route_ids, s->route_w);
  if (m->all_reduce) {
    moe_parallel(m, l, T, next);
    return;
  }
  be->ops->moe_experts(be, &m->experts[l], s->h, T, s->route_ids, s->route_w, k, s->x);
  if (next) /* the experts added onto x themselves: nothing to fuse the norm with */
    be->ops->rmsnorm(be, s->x, next, c->rms_norm_eps, T, c->hidden_size, s->h);
}

void m3_ffn_block(m3_model *m, int l, int T, const m3_tensor *next) {
  const m3_config *c = &m->cfg;
  const m3_layer_weights *w = &m->w.layers[l];
  m3_scratch *s = &m->s;

  if (c->layer_mlp[l] == M3_MLP_MOE) {
    moe(m, l, T, next);
    return;
  }
  swiglu_mlp(m, &w->mlp_gate, &w->mlp_up, &w->mlp_down, s->h, T, s->out);
  m3_model_reduce_residual(m, M3_REDUCE_TP, T, next); /* TP: the width slices' sums */
}
