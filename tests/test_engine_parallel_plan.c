/* The TP x EP layout plan for the real M3 config (tests/data/m3_full: hidden 6144, 64 heads /
 * 4 KV heads x 128, 128 experts x 3072, shared 3072, dense 12288, vocab 200064, 3 full-attention
 * dense layers then 57 sparse MoE layers): ranges cover every head and expert exactly once per
 * group, lm_head's vocabulary is split over the world (the embedding whole on every rank), GQA
 * groups stay with their KV head, the parameter shares add up to
 * the text model `m3 inspect` counts (426174572928), and bad layouts are refused naming the
 * option. */
#include <stdlib.h>

#include "check.h"
#include "engine/parallel.h"

/* params_text of `m3 inspect --model tests/data/m3_full --json` (tests/cli_inspect.sh checks
 * params_total against the Python count). */
static const int64_t TEXT_PARAMS = 426174572928;

static int64_t width(m3_range r) { return r.end - r.begin; }

/* The ranges ranks[first], ranks[first + stride], ... (n of them) picked by `get` tile [0, size)
 * in order, each `each` wide. */
static void check_tiling(const m3_plan *p, int first, int stride, int n, m3_range (*get)(const m3_rank_plan *),
                         int size, int each) {
  int at = 0;
  for (int i = 0; i < n; i++) {
    m3_range r = get(&p->ranks[first + i * stride]);
    CHECK_EQ_INT(r.begin, at);
    if (each) CHECK_EQ_INT(width(r), each);
    at = r.end;
  }
  CHECK_EQ_INT(at, size);
}

static m3_range q_of(const m3_rank_plan *r) { return r->q_heads; }
static m3_range dense_of(const m3_rank_plan *r) { return r->dense_cols; }
static m3_range ecols_of(const m3_rank_plan *r) { return r->expert_cols; }
static m3_range experts_of(const m3_rank_plan *r) { return r->experts; }
static m3_range shared_of(const m3_rank_plan *r) { return r->shared_cols; }
static m3_range vocab_of(const m3_rank_plan *r) { return r->vocab; }

static void check_layout(const m3_config *c, int tp, int ep) {
  m3_plan p;
  CHECK_OK(m3_parallel_plan(c, tp, ep, &p));
  int world = tp * ep;
  CHECK_EQ_INT(p.world, world);
  int64_t H = 6144, hd = 128, ihd = c->index_head_dim, V = 200064, E = 128;
  int nkv = 4, group = 64 / 4, replicas = tp > nkv ? tp / nkv : 1;
  CHECK_EQ_INT(p.kv_replicas, replicas);
  for (int e = 0; e < ep; e++) {
    int g0 = e * tp; /* the TP group of EP rank e */
    check_tiling(&p, g0, 1, tp, q_of, 64, 64 / tp);
    check_tiling(&p, g0, 1, tp, dense_of, 12288, 12288 / tp);
    check_tiling(&p, g0, 1, tp, ecols_of, 3072, 3072 / tp);
  }
  for (int t = 0; t < tp; t++) check_tiling(&p, t, tp, ep, experts_of, 128, 128 / ep);
  check_tiling(&p, 0, 1, world, shared_of, 3072, 3072 / world);
  check_tiling(&p, 0, 1, world, vocab_of, V, V / world);

  int holders[4] = {0};
  for (int r = 0; r < world; r++) {
    const m3_rank_plan *k = &p.ranks[r];
    CHECK_EQ_INT(k->tp_rank, r % tp);
    CHECK_EQ_INT(k->ep_rank, r / tp);
    /* Every query head's KV head (h / group) is one this rank holds; the index heads are its
     * KV groups. */
    for (int h = k->q_heads.begin; h < k->q_heads.end; h++)
      CHECK(h / group >= k->kv_heads.begin && h / group < k->kv_heads.end);
    CHECK_EQ_INT(width(k->kv_heads), tp > nkv ? 1 : nkv / tp);
    CHECK_EQ_INT(k->index_heads.begin, k->kv_heads.begin);
    CHECK_EQ_INT(k->index_heads.end, k->kv_heads.end);
    if (k->ep_rank == 0)
      for (int h = k->kv_heads.begin; h < k->kv_heads.end; h++) holders[h]++;
  }
  for (int h = 0; h < nkv; h++) CHECK_EQ_INT(holders[h], replicas);

  /* Shares of each layer kind against the whole, from the shapes: replicated tensors are
   * counted once per holder. */
  int64_t attn = 2 * 64 * hd * H + 2 * nkv * hd * H + 2 * H + 2 * hd;
  int64_t attn_extra_kv = (int64_t)(replicas - 1) * nkv * 2 * hd * H;
  int64_t index = nkv * ihd * H + ihd * H + 2 * ihd;
  int64_t index_extra = (int64_t)(replicas - 1) * nkv * ihd * H;
  int64_t router = E * H + E;
  int64_t moe = router + E * 3 * H * 3072 + 3 * H * 3072;
  int64_t sum_full = 0, sum_sparse = 0, sum_dense = 0, sum_moe = 0, sum_vocab = 0, sum_total = 0;
  for (int r = 0; r < world; r++) {
    const m3_rank_params *w = &p.ranks[r].params;
    if (p.ranks[r].ep_rank == 0) {
      sum_full += w->attn_full;
      sum_sparse += w->attn_sparse;
      sum_dense += w->dense_mlp;
    }
    sum_moe += w->moe;
    sum_vocab += w->embed + w->lm_head;
    sum_total += w->total;
  }
  int64_t norms = (int64_t)(tp - 1) * (2 * H + 2 * hd);
  CHECK_EQ_INT(sum_full, attn + attn_extra_kv + norms);
  CHECK_EQ_INT(sum_sparse, attn + attn_extra_kv + norms + index + index_extra +
                               (int64_t)(tp - 1) * (ihd * H + 2 * ihd));
  CHECK_EQ_INT(sum_dense, 3 * H * 12288);
  CHECK_EQ_INT(sum_moe, moe + (int64_t)(world - 1) * router);
  CHECK_EQ_INT(sum_vocab, (int64_t)world * V * H + V * H); /* embedding on every rank, one head */
  if (world == 1) CHECK_EQ_INT(sum_total, TEXT_PARAMS);
  if (ep == 1 && tp <= nkv) {
    /* Only norms, index_k_proj (+ its norms), the router, the final norm and the embedding are
     * copied. */
    int64_t copied = 60 * (2 * H + 2 * hd) + 57 * (ihd * H + 2 * ihd) + 57 * router + H + V * H;
    CHECK_EQ_INT(sum_total, TEXT_PARAMS + (int64_t)(tp - 1) * copied);
  }
}

static void check_collectives(const m3_config *c) {
  m3_plan p;
  CHECK_OK(m3_parallel_plan(c, 1, 1, &p));
  CHECK_EQ_INT(p.n_collectives, 0);
  CHECK_OK(m3_parallel_plan(c, 2, 1, &p));
  /* o_proj, dense MLP, MoE combine, the split head's candidates or gather */
  CHECK_EQ_INT(p.n_collectives, 5);
  CHECK_EQ_INT(p.collectives[0].per_step, 60);
  CHECK_EQ_INT(p.collectives[0].bytes_per_token, 4 * 6144);
  CHECK_EQ_INT(p.collectives[1].per_step, 3);
  CHECK_EQ_INT(p.collectives[2].per_step, 57);
  CHECK_EQ_INT(p.collectives[3].per_step, 1);
  CHECK_EQ_INT(p.collectives[3].bytes_per_token, 8 * 2);
  CHECK_EQ_INT(p.collectives[4].per_step, 1);
  CHECK_EQ_INT(p.collectives[4].bytes_per_token, 4 * 200064);
  /* EP alone: attention and dense MLP are whole on each rank: the MoE combine and the head. */
  CHECK_OK(m3_parallel_plan(c, 1, 2, &p));
  CHECK_EQ_INT(p.n_collectives, 3);
  for (int i = 0; i < p.n_collectives; i++) CHECK(p.collectives[i].group == M3_GROUP_WORLD);
  char *text = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&text, &len);
  CHECK_OK(m3_parallel_plan(c, 8, 1, &p));
  m3_parallel_plan_print(&p, f);
  fclose(f);
  CHECK(strstr(text, "tp 8 x ep 1 = 8 GPUs; KV heads replicated 2x") != NULL);
  CHECK(strstr(text, "rank 7 (tp 7, ep 0): q heads 56-63, KV heads 3-3") != NULL);
  CHECK(strstr(text, "rank 7 (tp 7, ep 0)") != NULL && strstr(text, "vocab 175056-200063") != NULL);
  free(text);
  /* Without experts the range prints as none, not as "0--1". */
  m3_config dense = *c;
  dense.num_experts = 0;
  text = NULL;
  f = open_memstream(&text, &len);
  CHECK_OK(m3_parallel_plan(&dense, 2, 1, &p));
  m3_parallel_plan_print(&p, f);
  fclose(f);
  CHECK(strstr(text, ", experts none x cols ") != NULL);
  CHECK(strstr(text, "--1") == NULL);
  free(text);
}

static void check_refusals(m3_config *c) {
  m3_plan p;
  CHECK_FAILS_WITH(m3_parallel_plan(c, 0, 1, &p), M3_ERR_ARG, "--tp 0");
  CHECK_FAILS_WITH(m3_parallel_plan(c, 1, 0, &p), M3_ERR_ARG, "--ep 0");
  CHECK_FAILS_WITH(m3_parallel_plan(c, 16, 8, &p), M3_ERR_ARG, "128 ranks, more than the 64");
  CHECK_FAILS_WITH(m3_parallel_plan(c, 3, 1, &p), M3_ERR_ARG, "--tp 3: num_attention_heads 64 is not divisible by 3");
  CHECK_FAILS_WITH(m3_parallel_plan(c, 1, 3, &p), M3_ERR_ARG, "--ep 3: num_local_experts 128 is not divisible by 3");
  CHECK_OK(m3_parallel_plan(c, 16, 4, &p)); /* 64 ranks: the limit itself */

  m3_config odd = *c;
  odd.intermediate_size = 3000;
  CHECK_FAILS_WITH(m3_parallel_plan(&odd, 16, 1, &p), M3_ERR_ARG, "--tp 16: intermediate_size 3000");
  odd = *c;
  odd.dense_intermediate_size = 12000;
  CHECK_FAILS_WITH(m3_parallel_plan(&odd, 64, 1, &p), M3_ERR_ARG, "--tp 64: dense_intermediate_size 12000");
  odd = *c;
  odd.shared_intermediate_size = 3000;
  CHECK_FAILS_WITH(m3_parallel_plan(&odd, 1, 16, &p), M3_ERR_ARG, "--tp 1 x --ep 16: shared_intermediate_size 3000");
  /* 48 heads over 3 KV heads: 2 ranks cannot share 3 KV heads, 4 cannot replicate them. */
  odd = *c;
  odd.num_heads = 48;
  odd.num_kv_heads = odd.index_num_heads = 3;
  CHECK_FAILS_WITH(m3_parallel_plan(&odd, 2, 1, &p), M3_ERR_ARG, "--tp 2: num_key_value_heads 3 is not divisible by 2");
  CHECK_FAILS_WITH(m3_parallel_plan(&odd, 4, 1, &p), M3_ERR_ARG, "--tp 4: above num_key_value_heads 3");
  CHECK_OK(m3_parallel_plan(&odd, 3, 1, &p));
  odd = *c;
  odd.index_num_heads = 8;
  CHECK_FAILS_WITH(m3_parallel_plan(&odd, 2, 1, &p), M3_ERR_ARG, "index heads 8 differ from KV heads 4");
}

int main(void) {
  m3_config c;
  if (m3_config_load(M3_SOURCE_DIR "/tests/data/m3_full/config.json", &c) != M3_OK) {
    fprintf(stderr, "config: %s\n", m3_last_error());
    return 1;
  }
  const int layouts[][2] = {{1, 1}, {2, 1}, {4, 1}, {8, 1}, {1, 2}, {1, 8}, {2, 2}, {8, 8}};
  for (size_t i = 0; i < sizeof layouts / sizeof layouts[0]; i++)
    check_layout(&c, layouts[i][0], layouts[i][1]);
  check_collectives(&c);
  check_refusals(&c);
  m3_config_free(&c);
  return check_summary();
}
