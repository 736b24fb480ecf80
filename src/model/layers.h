/* layers.h (internal to src/model): the model object and the two halves of a decoder layer.
 *
 * Shapes: T tokens of the current step (<= M3_MODEL_STEP_TOKENS), H hidden, nh query heads,
 * nkv KV heads, hd head dim, G index heads (= nkv), ihd index head dim, E experts, k experts per
 * token, I the widest FFN (dense, routed or shared). */
#ifndef M3_MODEL_LAYERS_H
#define M3_MODEL_LAYERS_H

#include "io/safetensors.h"
#include "io/weights.h"
#include "model/model.h"

/* Activations of one step, allocated once through the backend. */
typedef struct {
  float *x;           /* [T, H] residual stream */
  float *h;           /* [T, H] normed input of the current sub-block (layers below) */
  float *q;           /* [T, nh, hd] */
  float *k, *v;       /* [T, nkv, hd] */
  float *iq;          /* [T, G, ihd] */
  float *ik;          /* [T, ihd] */
  int32_t *sel;       /* [T, G, topk] block ids of the current sparse layer */
  float *att;         /* [T, nh, hd] attention output, before o_proj */
  float *out;         /* [T, H] output of a projection back to H (o_proj, down) */
  float *gate, *up;   /* [T, I] */
  float *router;      /* [T, E] router logits */
  int32_t *route_ids; /* [T, k] */
  float *route_w;     /* [T, k] */
  float *xe;          /* [T, H] the final hidden rows that need logits */
  int32_t *ids, *pos; /* [T] the step's token ids and absolute positions */
  int32_t *rows;      /* [T] the rows that need logits */
  float *logits;      /* [T, V] device backends: the head's output on its way to the caller;
                       * NULL on a host-memory backend, where the head writes the caller's buffer */
} m3_scratch;

/* The step arrays host code fills or reads, on the host side. On a host-memory backend each one IS
 * the scratch array of the same name (no mirror, no transfer); on a device backend it is a host
 * allocation that m3_upload / m3_download move to and from the scratch. */
typedef struct {
  int32_t *ids, *pos, *rows;  /* [T] filled by the step schedule */
} m3_host_side;

/* The part of one sequence inside a step: rows [first, first + T) of the step's activations,
 * attending through the sequence's cache views kv [num_layers]. */
typedef struct {
  const m3_kv_view *kv;
  int first, T;
  int seq, offset; /* which m3_model_seq, and the index of row `first` among its tokens */
} m3_segment;

struct m3_model {
  m3_config cfg;
  m3_safetensors *st;
  m3_weights w;
  m3_backend *be;
  int num_sparse;
  float **router_bias;  /* [num_layers]: decoded e_score_correction_bias [E], NULL if none */
  m3_moe_experts *experts; /* [num_layers]: the routed experts of MoE layers, prepared */
  m3_msa_params msa;
  int step_tokens;      /* tokens per internal step (model.h) */
  m3_scratch s;
  m3_host_side hs;
  m3_tensor **prepared; /* [num_prepared] the weights handed to the backend, released at free */
  int num_prepared;
  m3_segment *segs;     /* [segs_cap] segments of the current step */
  int segs_cap;
  int *hidden_slot;     /* [num_layers + 1]: slot of m3_model_seq.hidden a layer's input (or,
                         * at num_layers, the final hidden) goes to; -1 = none */
  int num_hidden;       /* slots in use */
  float *const *hidden; /* during m3_model_forward_batch_hidden: each sequence's hidden rows */
  const m3_row_sampling *sampling; /* during m3_model_forward_batch_sample: the draws of the
                                   * logits rows not computed yet (each step moves it on) */
  struct m3_step_graphs *graphs; /* recorded decode steps (step_graph.h), or NULL: a backend
                                  * without graph ops, or M3_CUDA_GRAPHS=0 */
  m3_all_reduce_fn all_reduce;   /* tensor / expert parallelism (set_all_reduce), or NULL */
  void *all_reduce_user;
  unsigned all_reduce_flags;     /* M3_ALL_REDUCE_CAPTURABLE: steps with it may be recorded */
  m3_reduce_add_norm_fn reduce_add_norm; /* the fused form (set_reduce_add_norm), or NULL */
  m3_status reduce_status;       /* the step's first failed all-reduce, else M3_OK */
  float *zeros;                  /* [step_tokens, H] zeros: the routed experts' sum starts there
                                  * in an MoE layer without a shared expert (with a hook only) */
  /* The vocabulary split of lm_head (shard.c): this rank holds rows [head_rank * lm_head.rows,
   * +lm_head.rows) of head_world equal slices; head_world 1: the whole head. */
  int head_world, head_rank;
  float *head_part;     /* [head_world, M3_MODEL_STEP_TOKENS, slice] the ranks' logits, summed;
                         * a greedy step's own slice [n, slice] at its start (head_pairs) */
  int32_t *head_gather; /* embed ids that reorder head_part's first n rows of every slice into
                         * [n, vocab], at head_gather + head_world * n (n - 1) / 2, n <= 256 */
  float *head_pairs;    /* [head_world, M3_MODEL_STEP_TOKENS, 2] the ranks' candidates of a
                         * greedy step (argmax_pairs), summed */
  float *head_pairs_host; /* head_pairs on the host side (the same array on a host backend) */
};

/* Rank (tp_rank, ep_rank) of a tp x ep layout (m3_model_load_options; 1 x 1: the whole model). */
typedef struct {
  int tp, tp_rank, ep, ep_rank;
} m3_shard;

/* Checks the layout against m's config and bound weights (a size it does not divide is
 * M3_ERR_CONFIG naming the key, a rank outside it M3_ERR_ARG), then leaves only the routed experts
 * of the rank's EP group bound (the others' tensors absent) and drops the MTP modules: before
 * quantization at load, which then converts only what the rank holds. */
m3_status m3_model_shard_experts(m3_model *m, const m3_shard *lay);

/* Cuts m's bound weights and config to the rank's slices (shard.c), after
 * m3_model_shard_experts and quantization, before the weights are prepared. */
m3_status m3_model_shard(m3_model *m, const m3_shard *lay);

/* Points a tied lm_head at the embedding's prepared rows: all of them, or the rank's vocabulary
 * slice (shard.c). */
void m3_model_tie_head(m3_model *m);

/* buf[0, n) = its sum over the ranks of `group`, when the model has a hook. Every rank makes the
 * same calls with the same groups whatever its layout (a TP group of one rank included: the hook
 * makes that a no-op), so the schedule never depends on the layout. A failure is kept for the
 * step to return; the call is still made, so that the peers' calls keep pairing. */
static inline void m3_model_all_reduce(m3_model *m, m3_reduce_group group, float *buf,
                                       size_t n) {
  if (!m->all_reduce) return;
  m3_status st = m->all_reduce(m->all_reduce_user, group, buf, n);
  if (m->reduce_status == M3_OK) m->reduce_status = st;
}

/* x += s.out (the last add onto the residual in a half), then h = GemmaRMSNorm(x, next) unless
 * next is NULL. */
static inline void m3_model_add_residual(m3_model *m, int T, const m3_tensor *next) {
  const m3_config *c = &m->cfg;
  m3_scratch *s = &m->s;
  m3_backend *be = m->be;
  if (next)
    be->ops->add_rmsnorm(be, s->x, s->out, next, c->rms_norm_eps, T, c->hidden_size, s->h);
  else
    be->ops->add(be, s->x, s->out, (size_t)T * c->hidden_size);
}

/* m3_model_add_residual of s.out summed over `group` first (the ranks' partial outputs): through
 * the fused hook when it takes the call, else the all-reduce and the add. */
static inline void m3_model_reduce_residual(m3_model *m, m3_reduce_group group, int T,
                                            const m3_tensor *next) {
  const m3_config *c = &m->cfg;
  m3_scratch *s = &m->s;
  int done = 0;
  if (m->all_reduce && m->reduce_add_norm) {
    m3_status st = m->reduce_add_norm(m->all_reduce_user, group, s->out, s->x, next,
                                      c->rms_norm_eps, T, c->hidden_size, s->h, &done);
    if (m->reduce_status == M3_OK) m->reduce_status = st;
  }
  if (done) return;
  m3_model_all_reduce(m, group, s->out, (size_t)T * c->hidden_size);
  m3_model_add_residual(m, T, next);
}

/* Host memory to backend memory and back, for the step arrays of m3_host_side; nothing to do on a
 * host-memory backend, where both sides are the same array. */
static inline m3_status m3_upload(m3_model *m, void *dst, const void *src, size_t bytes) {
  return dst == src ? M3_OK : m->be->ops->to_device(m->be, dst, src, bytes);
}
static inline m3_status m3_download(m3_model *m, void *dst, const void *src, size_t bytes) {
  return dst == src ? M3_OK : m->be->ops->to_host(m->be, dst, src, bytes);
}

/* The two halves pass the normed residual on in s.h: each ends with its add onto x fused with the
 * norm the next one starts with (add_rmsnorm), so whoever runs layer l first puts
 * GemmaRMSNorm(x, input_norm of l) in s.h.
 *
 * x += o_proj(attention(h)) for layer l over the step's T tokens (positions s.pos), h being
 * GemmaRMSNorm(x, input_norm) on entry; each segment stores its K, V, IK in its own cache views
 * first and attends only to them. Leaves h = GemmaRMSNorm(x, post_attn_norm), the FFN half's
 * input, and the layer's block selections in s.sel on sparse layers. */
void m3_attention_block(m3_model *m, int l, const m3_segment *segs, int n_segs, int T);

/* x += FFN(h) for layer l (dense SwiGLU-OAI MLP or MoE with shared expert), h being
 * GemmaRMSNorm(x, post_attn_norm) on entry; then h = GemmaRMSNorm(x, next) unless next is NULL
 * (the next layer's input_norm, or the final norm). */
void m3_ffn_block(m3_model *m, int l, int T, const m3_tensor *next);

/* ex = the routed experts layer L holds bound, handed to the backend's prepare_experts: the run
 * of present expert tensors [first, first + E) of the config's num_experts (all of them, or under
 * expert parallelism the rank's EP group's, m3_model_shard_experts), SwiGLU-OAI parameters of the
 * config; L's expert tensors must be prepared already. On failure ex is left empty.
 * m3_moe_experts_release undoes it (nothing for an empty ex) and must run before the expert
 * tensors are released. */
m3_status m3_moe_experts_prepare(m3_backend *be, const m3_config *c, const m3_layer_weights *L,
                                 m3_moe_experts *ex);
void m3_moe_experts_release(m3_backend *be, m3_moe_experts *ex);

#endif
