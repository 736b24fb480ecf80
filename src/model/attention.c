/* attention.c: the attention half of a decoder layer (m3_text_spec.md §4.1, §5; msa_spec.md §9).
 *
 *   h  = GemmaRMSNorm(x, input_norm)                         [T, H]   on entry (layers.h)
 *   q  = RoPE(RMSNorm_hd(h Wq^T, q_norm))                    [T, nh, hd]
 *   k  = RoPE(RMSNorm_hd(h Wk^T, k_norm))                    [T, nkv, hd]
 *   v  = h Wv^T                                              [T, nkv, hd]   no norm, no RoPE
 * sparse layers only:
 *   iq = RoPE(RMSNorm_ihd(h Wiq^T, index_q_norm))            [T, G, ihd]
 *   ik = RoPE(RMSNorm_ihd(h Wik^T, index_k_norm))            [T, ihd]       one shared head
 *   store k, v (, ik) at pos, then select blocks per token and index head from the whole cache
 *   o  = attention(q, cache, selection or plain causal)      [T, nh, hd]
 *   x += o Wo^T                                              [T, H]   tensor-parallel: summed
 *                                                                     over the ranks' heads first
 *   h  = GemmaRMSNorm(x, post_attn_norm)                     [T, H]   the FFN half's input,
 *                                                                     fused with the add */
#include "model/layers.h"

void m3_attention_block(m3_model *m, int l, const m3_segment *segs, int n_segs, int T) {
  const m3_config *c = &m->cfg;
  const m3_layer_weights *w = &m->w.layers[l];
  m3_scratch *s = &m->s;
  m3_backend *be = m->be;
  const int sparse = c->layer_attn[l] == M3_ATTN_SPARSE;
  const int32_t *pos = s->pos;

  /* Every projection of h in one pass: at decode k, v and the index branch are too short to
   * be worth a launch each. */
  const m3_matmul_out proj[] = {{&w->q_proj, s->q},
                                {&w->k_proj, s->k},
                                {&w->v_proj, s->v},
                                {&w->index_q_proj, s->iq},
                                {&w->index_k_proj, s->ik}};
  be->ops->matmul_set(be, s->h, T, proj, sparse ? 5 : 3);

  /* Per sequence, into its cache before attention: its tokens attend to themselves and each
   * other, never to another sequence's. Every head is normed (one [dim] weight shared by a
   * branch's heads), then rotated, as the reference orders them, in the store's pass: the
   * queries in place, the keys on their way into the cache (s->k and s->ik hold unspecified
   * values afterwards; nothing reads them). */
  const size_t qw = (size_t)c->num_heads * c->head_dim, kvw = (size_t)c->num_kv_heads * c->head_dim;
  const size_t iqw = (size_t)c->index_num_heads * c->index_head_dim, ihd = (size_t)c->index_head_dim;
  const size_t selw = (size_t)c->index_num_heads * m->msa.topk;
  for (int i = 0; i < n_segs; i++) {
    const m3_kv_view *kv = &segs[i].kv[l];
    const size_t r = (size_t)segs[i].first;
    const int n = segs[i].T;
    const m3_attention_rows rows = {.q = s->q + r * qw,
                                    .iq = sparse ? s->iq + r * iqw : NULL,
                                    .k = s->k + r * kvw,
                                    .v = s->v + r * kvw,
                                    .ik = sparse ? s->ik + r * ihd : NULL,
                                    .q_norm = &w->q_norm,
                                    .iq_norm = sparse ? &w->index_q_norm : NULL,
                                    .k_norm = &w->k_norm,
                                    .ik_norm = sparse ? &w->index_k_norm : NULL,
                                    .nh = c->num_heads,
                                    .niq = c->index_num_heads,
                                    .eps = c->rms_norm_eps,
                                    .rot = c->rotary_dim,
                                    .theta = c->rope_theta};
    be->ops->kv_store_rope(be, kv, pos + r, n, &rows);
    if (sparse)
      be->ops->msa_select(be, s->iq + r * iqw, c->index_num_heads, kv, pos + r, n, &m->msa,
                          s->sel + r * selw);
    be->ops->attention(be, s->q + r * qw, c->num_heads, kv, pos + r, n,
                       sparse ? s->sel + r * selw : NULL, m->msa.topk, s->att + r * qw);
  }

  be->ops->matmul(be, &w->o_proj, s->att, T, s->out);
  m3_model_reduce_residual(m, M3_REDUCE_TP, T, &w->post_attn_norm); /* TP: the heads' partial sums */
}
