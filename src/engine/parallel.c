/* parallel.c: the TP x EP layout plan (parallel.h says what each rank holds and why). */
#include "engine/parallel.h"

#include <string.h>

/* Part `i` of `n` equal parts of [0, size); the caller checked that n divides size. */
static m3_range even_part(int size, int n, int i) {
  return (m3_range){i * (size / n), (i + 1) * (size / n)};
}

static int64_t width(m3_range r) { return r.end - r.begin; }

/* Refuses a split of `size` (named `what`) into `n` parts when n does not divide it. */
static m3_status check_divides(const char *flag, int n, const char *what, int size) {
  if (size % n != 0)
    return m3_fail(M3_ERR_ARG, "--%s %d: %s %d is not divisible by %d", flag, n, what, size, n);
  return M3_OK;
}

static m3_status check_layout(const m3_config *c, int tp, int ep) {
  if (tp < 1) return m3_fail(M3_ERR_ARG, "--tp %d: expected at least 1", tp);
  if (ep < 1) return m3_fail(M3_ERR_ARG, "--ep %d: expected at least 1", ep);
  if (tp > M3_PARALLEL_MAX_RANKS / ep)
    return m3_fail(M3_ERR_ARG, "--tp %d x --ep %d: %d ranks, more than the %d one host can have",
                   tp, ep, tp * ep, M3_PARALLEL_MAX_RANKS);
  int world = tp * ep, nkv = c->num_kv_heads;
  if (c->index_num_heads != nkv)
    return m3_fail(M3_ERR_ARG, "--tp %d: index heads %d differ from KV heads %d, so index q "
                   "cannot be split by KV group", tp, c->index_num_heads, nkv);
  m3_status st;
  if ((st = check_divides("tp", tp, "num_attention_heads", c->num_heads)) != M3_OK) return st;
  if (tp <= nkv && (st = check_divides("tp", tp, "num_key_value_heads", nkv)) != M3_OK) return st;
  if (tp > nkv && tp % nkv != 0)
    return m3_fail(M3_ERR_ARG, "--tp %d: above num_key_value_heads %d it must be a multiple of "
                   "it (each KV head replicated on tp / %d ranks)", tp, nkv, nkv);
  if ((st = check_divides("tp", tp, "dense_intermediate_size", c->dense_intermediate_size)) != M3_OK)
    return st;
  if (c->num_experts > 0) {
    if ((st = check_divides("ep", ep, "num_local_experts", c->num_experts)) != M3_OK) return st;
    if ((st = check_divides("tp", tp, "intermediate_size", c->intermediate_size)) != M3_OK) return st;
    /* The shared expert is split over all ranks (tp * ep): name the option that made it odd. */
    if (c->shared_intermediate_size % world != 0)
      return m3_fail(M3_ERR_ARG, "--tp %d x --ep %d: shared_intermediate_size %d is not divisible "
                     "by %d ranks", tp, ep, c->shared_intermediate_size, world);
  } else if (ep > 1) {
    return m3_fail(M3_ERR_ARG, "--ep %d: the model has no routed experts", ep);
  }
  return M3_OK;
}

/* Parameters of rank p's share of each layer kind (inspect.c counts the whole model the same
 * way; test_engine_parallel_plan checks the shares add up to it). */
static m3_rank_params rank_params(const m3_config *c, const m3_plan *plan, const m3_rank_plan *p) {
  int64_t H = c->hidden_size, hd = c->head_dim, ihd = c->index_head_dim;
  m3_rank_params r = {0};
  int64_t q = width(p->q_heads) * hd, kv = width(p->kv_heads) * hd;
  /* q_proj [q, H], k/v_proj [kv, H], o_proj [H, q]; input and post-attention norms [H];
   * q_norm, k_norm [hd] (per head, shared by all heads). */
  r.attn_full = 2 * q * H + 2 * kv * H + 2 * H + 2 * hd;
  /* index_q_proj [heads * ihd, H], index_k_proj [ihd, H] replicated, index q/k norms [ihd]. */
  r.attn_sparse = r.attn_full + width(p->index_heads) * ihd * H + ihd * H + 2 * ihd;
  r.dense_mlp = 3 * H * width(p->dense_cols);
  if (c->num_experts > 0) {
    int64_t router = (int64_t)c->num_experts * H + (c->use_routing_bias ? c->num_experts : 0);
    int64_t shared = c->num_shared_experts > 0 ? 3 * H * width(p->shared_cols) : 0;
    r.moe = router + width(p->experts) * 3 * H * width(p->expert_cols) + shared;
  }
  r.embed = (int64_t)c->vocab_size * H;
  r.lm_head = c->tie_word_embeddings ? 0 : width(p->vocab) * H;
  r.final_norm = H;
  r.total = plan->full_layers * r.attn_full + plan->sparse_layers * r.attn_sparse +
            plan->dense_layers * r.dense_mlp + plan->moe_layers * r.moe + r.embed + r.lm_head +
            r.final_norm;
  return r;
}

static void add_collective(m3_plan *p, const char *what, m3_group g, int per_step, int64_t bytes) {
  int ranks = g == M3_GROUP_TP ? p->tp : p->world;
  if (ranks < 2 || per_step == 0) return;
  p->collectives[p->n_collectives++] =
      (m3_collective){.what = what, .group = g, .ranks = ranks, .per_step = per_step,
                      .bytes_per_token = bytes};
}

m3_status m3_parallel_plan(const m3_config *c, int tp, int ep, m3_plan *out) {
  m3_status st = check_layout(c, tp, ep);
  if (st != M3_OK) return st;
  memset(out, 0, sizeof *out);
  out->tp = tp;
  out->ep = ep;
  out->world = tp * ep;
  int nkv = c->num_kv_heads;
  out->kv_replicas = tp > nkv ? tp / nkv : 1;
  for (int i = 0; i < c->num_layers; i++) {
    out->sparse_layers += c->layer_attn[i] == M3_ATTN_SPARSE;
    out->moe_layers += c->layer_mlp[i] == M3_MLP_MOE;
  }
  out->full_layers = c->num_layers - out->sparse_layers;
  out->dense_layers = c->num_layers - out->moe_layers;

  for (int r = 0; r < out->world; r++) {
    m3_rank_plan *p = &out->ranks[r];
    int t = r % tp, e = r / tp;
    p->rank = r;
    p->tp_rank = t;
    p->ep_rank = e;
    p->q_heads = even_part(c->num_heads, tp, t);
    /* Replicated: KV head t / replicas, which the query heads [t*nh/tp, +nh/tp) all read since
     * nh/tp divides the GQA group nh/nkv. */
    p->kv_heads = tp > nkv ? (m3_range){t / out->kv_replicas, t / out->kv_replicas + 1}
                           : even_part(nkv, tp, t);
    p->index_heads = p->kv_heads;
    p->dense_cols = even_part(c->dense_intermediate_size, tp, t);
    if (c->num_experts > 0) {
      p->experts = even_part(c->num_experts, ep, e);
      p->expert_cols = even_part(c->intermediate_size, tp, t);
      p->shared_cols = even_part(c->shared_intermediate_size, out->world, r);
    }
    p->vocab = c->vocab_size % out->world == 0 ? even_part(c->vocab_size, out->world, r)
                                               : (m3_range){0, c->vocab_size}; /* lm_head's rows */
    p->params = rank_params(c, out, p);
  }

  /* One decode token carries one float32 hidden vector [H] through each all-reduce. */
  int64_t hidden_bytes = 4 * (int64_t)c->hidden_size;
  add_collective(out, "all-reduce after o_proj", M3_GROUP_TP, c->num_layers, hidden_bytes);
  add_collective(out, "all-reduce after the dense MLP", M3_GROUP_TP, out->dense_layers, hidden_bytes);
  add_collective(out, "MoE combine all-reduce (routing exchange)", M3_GROUP_WORLD, out->moe_layers,
                 hidden_bytes);
  /* The split head: a greedy step exchanges each rank's best (score, id) per row; any other
   * step gathers the float32 logits row [V] (one or the other per step). */
  if (c->vocab_size % out->world == 0) {
    add_collective(out, "lm_head argmax candidates (greedy steps)", M3_GROUP_WORLD, 1,
                   8 * (int64_t)out->world);
    add_collective(out, "lm_head logits gather (other steps)", M3_GROUP_WORLD, 1,
                   4 * (int64_t)c->vocab_size);
  }
  return M3_OK;
}

static double mib(int64_t params) { return 2.0 * (double)params / (1024.0 * 1024.0); }

/* label then "first-last", or "none" for an empty range (a model without experts, say). */
static void put_range(FILE *f, const char *label, m3_range r) {
  if (r.end > r.begin) fprintf(f, "%s%d-%d", label, r.begin, r.end - 1);
  else fprintf(f, "%snone", label);
}

void m3_parallel_plan_print(const m3_plan *p, FILE *f) {
  fprintf(f, "parallel layout: tp %d x ep %d = %d GPUs; KV heads replicated %dx\n", p->tp, p->ep,
          p->world, p->kv_replicas);
  fprintf(f, "  per rank, parameters held as BF16 MiB per layer: attn full/sparse, dense MLP, MoE;"
          " then embed+lm_head and the whole model share in GiB\n");
  for (int r = 0; r < p->world; r++) {
    const m3_rank_plan *k = &p->ranks[r];
    const m3_rank_params *w = &k->params;
    fprintf(f, "  rank %d (tp %d, ep %d): ", r, k->tp_rank, k->ep_rank);
    put_range(f, "q heads ", k->q_heads);
    put_range(f, ", KV heads ", k->kv_heads);
    put_range(f, " (MSA groups ", k->index_heads);
    put_range(f, "), dense cols ", k->dense_cols);
    put_range(f, ", experts ", k->experts);
    put_range(f, " x cols ", k->expert_cols);
    put_range(f, ", shared cols ", k->shared_cols);
    put_range(f, ", vocab ", k->vocab);
    fprintf(f, "; %.1f/%.1f, %.1f, %.1f MiB; %.1f MiB; %.2f GiB\n", mib(w->attn_full),
            mib(w->attn_sparse), mib(w->dense_mlp), mib(w->moe), mib(w->embed + w->lm_head),
            mib(w->total) / 1024.0);
  }
  fprintf(f, "  collectives per decode step (%d full + %d sparse layers, %d dense + %d MoE):\n",
          p->full_layers, p->sparse_layers, p->dense_layers, p->moe_layers);
  if (p->n_collectives == 0) fprintf(f, "    none (one GPU)\n");
  /* (One process on GPUs that reach each other's memory sums these peer to peer, each fused with
   * the residual add and the norm after it: backend/cuda/p2p.h.) */
  for (int i = 0; i < p->n_collectives; i++) {
    const m3_collective *c = &p->collectives[i];
    fprintf(f, "    %-42s x%-3d over %d ranks (%s), %lld bytes per token each\n", c->what,
            c->per_step, c->ranks, c->group == M3_GROUP_TP ? "TP group" : "all", (long long)c->bytes_per_token);
  }
}
