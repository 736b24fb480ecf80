/* model.h: the MiniMax-M3 text model (shared/spec/m3_text_spec.md §4, §10) as a sequence of backend
 * ops.
 *
 * The model owns the config, the mapped checkpoint, the bound weights and the activation scratch
 * of one step; it does not own a KV cache. A forward step writes the new tokens' keys into the
 * per-layer cache views the caller passes (engine/kvcache.h builds them from a sequence's block
 * table), so the same forward serves prefill, chunked prefill and decode. */
#ifndef M3_MODEL_MODEL_H
#define M3_MODEL_MODEL_H

#include <stdint.h>

#include "backend/backend.h"
#include "base/status.h"
#include "io/config.h"

typedef struct m3_model m3_model;

/* Tokens one internal step processes (m3_model_step_tokens); the scratch is sized for it once at
 * load, and longer forwards run as consecutive steps. Host backends take 256: the step's
 * activations stay in the last-level cache. Device backends take 8192: a prefill's GEMMs and each
 * expert's share of the routed tokens (8192 x top-k / E rows) then are large enough to keep the
 * tensor cores busy, for ~3 GB of scratch at full M3 width. Logits are computed at most
 * M3_MODEL_STEP_TOKENS rows at a time whatever the step (a prefill wants one row per sequence). */
#define M3_MODEL_STEP_TOKENS 256
#define M3_MODEL_DEVICE_STEP_TOKENS 8192
/* Steps of up to this many tokens may be recorded as backend graphs and replayed (decode, small
 * batches, speculative verification; model/step_graph.h). */
#define M3_MODEL_GRAPH_MAX_TOKENS 64

/* Where a forward records its MSA block selections:
 * blocks [n_sparse_layers, n_tokens, index heads, topk] int32, sparse layers in layer order;
 * token t of the forward lands at row first + t. Ids ascending, -1 padded. */
typedef struct {
  int32_t *blocks;    /* host memory */
  int n_tokens, first;
} m3_selection_capture;

/* Reads DIR/config.json and DIR's safetensors, binds every tensor, hands the weights the forward
 * reads to `be` (prepare_tensor: uploads on a device backend) and allocates the step scratch
 * through it (`be` must outlive the model). */
m3_status m3_model_load(const char *dir, m3_backend *be, m3_model **out);

typedef struct {
  /* 1: convert the plain weights of the kinds the MXFP8 release quantizes to MXFP8 before the
   * backend sees them (`--quantize mxfp8`, io/quantize.h); the model owns the converted copy. */
  int quantize_mxfp8;
  int threads; /* for the conversion; 0 = one per core */
  void (*progress)(uint64_t done, uint64_t total, void *user); /* conversion progress, or NULL */
  void *user;
  /* Tensor parallelism: load rank tp_rank's share of tp_size ranks (model/shard.c says what each
   * holds); tp_size 0 or 1 is the whole model. m3_model_config then gives the rank's narrowed
   * sizes (query, KV and index heads, intermediate sizes), which size its KV cache. A config the
   * size does not divide is M3_ERR_CONFIG naming the key; a quantized tensor whose scale blocks a
   * split would cut is M3_ERR_SHAPE naming the tensor. The ranks' forwards sum to the whole
   * model's through m3_model_set_all_reduce. */
  int tp_size, tp_rank;
  /* Expert parallelism: ep_size groups of tp_size ranks (world = tp_size * ep_size ranks; this
   * one is rank ep_rank * tp_size + tp_rank, engine/parallel.h). Each EP group holds the routed
   * experts [ep_rank * E / ep_size, +E / ep_size), split inside by tp; attention and dense MLPs
   * are replicated over the EP groups; the shared expert is split over all world ranks. ep_size
   * 0 or 1: every rank holds every expert. E not divisible by ep_size is M3_ERR_CONFIG naming
   * num_local_experts (the checkpoint's key for E), a shared width the world does not divide
   * names shared_intermediate_size, ep_size > 1 on a model without MoE layers names
   * mlp_layer_types. The other experts are never read, converted nor handed to the backend.
   * m3_model_config keeps num_experts = E, the router's count (every rank routes every token);
   * the weights (m3_model_weights) hold the other groups' expert tensors absent. */
  int ep_size, ep_rank;
} m3_model_load_options;

/* m3_model_load with options; opts NULL is m3_model_load. */
m3_status m3_model_load_with(const char *dir, m3_backend *be, const m3_model_load_options *opts,
                             m3_model **out);
void m3_model_free(m3_model *m);

/* The all-reduce of a tensor / expert parallel rank: buf[0, n) = the sum over the ranks of
 * `group` of their buf, in place; buf is backend memory. It is called in issue order on the
 * rank's backend, so a device collective enqueued on the backend's stream keeps the forward
 * asynchronous. Every rank gets the same calls with the same groups whatever the layout: with
 * tp_size 1 the TP group is the rank alone and fn must leave buf as it is (no collective). */
typedef enum {
  M3_REDUCE_TP,    /* over the tp_size ranks of this rank's TP group (attention, dense MLP) */
  M3_REDUCE_WORLD, /* over all tp_size * ep_size ranks (an MoE layer's routed + shared sum) */
} m3_reduce_group;
typedef m3_status (*m3_all_reduce_fn)(void *user, m3_reduce_group group, float *buf, size_t n);

/* flags of m3_model_set_all_reduce */
enum {
  /* fn only enqueues work on the rank's backend stream (a device collective such as NCCL's,
   * which a CUDA graph can record), so decode steps may still be recorded and replayed as graphs
   * with the collectives inside. Without it, steps run op by op. */
  M3_ALL_REDUCE_CAPTURABLE = 1,
};

/* Makes every forward of a tensor-parallel rank call fn on the partial outputs the ranks split:
 * per layer, the attention output after o_proj and the FFN output (dense MLP down, or shared
 * expert down plus routed experts, summed first so that an MoE layer takes one call), each
 * [T, hidden] of the step's T tokens, before its residual add. Every rank must run the same
 * forwards, so the calls pair up. fn NULL removes the hook (the unsharded forward, unchanged).
 * With a hook, steps run op by op (no recorded CUDA graphs) unless flags has
 * M3_ALL_REDUCE_CAPTURABLE, and a failure fn returns is the
 * forward's status (later calls of the step still run, so that the peers' calls still pair).
 * The head: a replicated lm_head (a world the vocabulary size does not divide) gives every rank
 * the same logits, so a rank that wants none passes NULL for them and skips it; a split one
 * (shard.c) has every rank compute its slice and meet in one more world all-reduce per head call,
 * so every rank runs it, a rank that wants no logits still with NULL for them (its n_logits as
 * its peers'), and all of them the same forward variant (m3_model_forward_batch_argmax exchanges
 * each slice's best candidate, the others its logits). M3_ERR_NOMEM when the scratch for an MoE
 * layer without a shared expert cannot be allocated. */
m3_status m3_model_set_all_reduce(m3_model *m, m3_all_reduce_fn fn, void *user,
                                  unsigned flags);

/* An all-reduce fused with what follows it in the layer: x [T, H] += the sum over `group` of
 * part [T, H], then, when norm is not NULL, h = GemmaRMSNorm(x, norm, eps), with the bits of the
 * all-reduce followed by the backend's add_rmsnorm (or add). The hook sets *done = 0 to leave a
 * call to the model, which then runs the all-reduce hook and add_rmsnorm; either way the call
 * pairs with the peers' (they decide alike for the same sizes). Called with the all-reduce hook's
 * user, only while that hook is set; fn NULL removes it. */
typedef m3_status (*m3_reduce_add_norm_fn)(void *user, m3_reduce_group group, const float *part,
                                           float *x, const m3_tensor *norm, float eps, int T,
                                           int H, float *h, int *done);
void m3_model_set_reduce_add_norm(m3_model *m, m3_reduce_add_norm_fn fn);

const m3_config *m3_model_config(const m3_model *m);
m3_backend *m3_model_backend(const m3_model *m);
/* Tokens per internal step on this model's backend (M3_MODEL_STEP_TOKENS or
 * M3_MODEL_DEVICE_STEP_TOKENS): the most a caller gains from feeding at once. */
int m3_model_step_tokens(const m3_model *m);
/* The weights the model reads, as loaded (converted under --quantize): shapes, dtypes and
 * scales for accounting. On a device backend their data points to device memory. */
const m3_weights *m3_model_weights(const m3_model *m);
int m3_model_num_sparse_layers(const m3_model *m);
/* The ranks lm_head's vocabulary is split over (shard.c): the world size, or 1 (replicated). */
int m3_model_head_slices(const m3_model *m);

/* Runs T tokens ids[T] at absolute positions pos[T] (each position's page must exist in every
 * view; positions may repeat earlier ones, which overwrites their keys). ids, pos, logits and the
 * capture are host memory; the views point at backend memory (engine/kvcache.h).
 *   kv      [num_layers] cache views; the tokens' K, V (and IK) are stored before attention, so
 *           each token attends to itself and to every earlier position already in the cache.
 *   logits  [T, vocab] float32, or NULL to skip the head.
 *   capture NULL, or where the block selections go.
 * Bad ids or positions are M3_ERR_ARG naming the value; nothing is computed then. */
m3_status m3_model_forward(m3_model *m, const m3_kv_view *kv, const int32_t *ids,
                           const int32_t *pos, int T, float *logits,
                           const m3_selection_capture *capture);

/* One sequence's share of a batched forward. */
typedef struct {
  const m3_kv_view *kv;   /* [num_layers] this sequence's cache views */
  const int32_t *ids;     /* [T] */
  const int32_t *pos;     /* [T] absolute positions, as for m3_model_forward */
  int T;
  int n_logits;           /* logits for the last n_logits of the T tokens (0..T) */
  const m3_selection_capture *capture; /* NULL, or where this sequence's selections go */
  /* Vision embeddings (m3_model_encode_vision) replacing the embedding rows of the sequence's
   * image/video placeholder ids, in order: NULL, or [n_media, hidden] host memory. Of ids[0..T),
   * the k-th placeholder takes row media_first + k (placeholders past n_media keep their text
   * embedding). */
  const float *media;
  int n_media, media_first;
} m3_model_seq;

/* Hidden states a speculative drafter reads from the target (EAGLE3 auxiliary states, MTP's
 * final hidden). layers[n] picks them, in order: l < num_layers is the residual stream entering
 * layer l (vLLM's aux_hidden_states), l == num_layers the final hidden after model.norm (the
 * head's input). Each takes H floats of a token's row of the hidden buffers that
 * m3_model_forward_batch_hidden fills; other forwards copy nothing. Bad or repeated ids are
 * M3_ERR_ARG. */
m3_status m3_model_set_hidden_layers(m3_model *m, const int *layers, int n);
int m3_model_hidden_width(const m3_model *m);

/* A forward over several sequences at once (continuous batching): the linear layers, norms and
 * MoE run over all tokens of the batch together; cache stores, MSA selection and attention run
 * per sequence on its own views and positions, so a sequence's results do not depend on what
 * else is in the batch (up to the float rounding of the matmul kernels for different row counts).
 *   logits [sum of n_logits, vocab]: the requested rows, sequence by sequence, or NULL when no
 *          sequence asks for any (or, on a rank of a vocabulary-split head, when this rank
 *          returns none: see m3_model_set_all_reduce).
 * A batch of one with n_logits = T is exactly m3_model_forward. Bad ids or positions in any
 * sequence are M3_ERR_ARG naming the sequence; nothing is computed then. */
m3_status m3_model_forward_batch(m3_model *m, const m3_model_seq *seqs, int n_seqs,
                                 float *logits);

/* m3_model_forward_batch that also hands out hidden states: hidden[i] is NULL or
 * [seqs[i].T, m3_model_hidden_width] host memory for sequence i (hidden itself may be NULL). */
m3_status m3_model_forward_batch_hidden(m3_model *m, const m3_model_seq *seqs, int n_seqs,
                                        float *logits, float *const *hidden);

/* m3_model_forward_batch_hidden for greedy decoding: tokens [sum of n_logits] (host memory) gets
 * the argmax of each requested logits row (the backend's argmax_rows: ties to the lower id, the
 * sampler's pick at temperature 0 without logit bias or penalties) instead of the row. `logits` is
 * the buffer m3_model_forward_batch_hidden would fill: a host-memory backend computes the rows
 * there; a device backend keeps them in its own memory and moves only the ids to the host.
 * On a vocabulary-split head (m3_model_head_slices > 1) no logits row is gathered: each rank
 * computes its slice's rows and their best candidate (argmax_pairs), the world all-reduce moves
 * 8 bytes a row and rank (not 4 a vocabulary entry), and m3_model_head_pick makes each row's id,
 * the same argmax_rows gives on the whole row. `logits` is then not written (it may be NULL), and
 * a rank that returns no ids passes NULL tokens; all the split's ranks make this call together. */
m3_status m3_model_forward_batch_argmax(m3_model *m, const m3_model_seq *seqs, int n_seqs,
                                        float *logits, int32_t *tokens, float *const *hidden);

/* The split head's pick: ids[t] = the index of the best of row t's world candidates,
 * pairs [world, n, 2] (slice r's (score, index) of row t at pairs + 2 (r n + t), argmax_pairs of
 * ranks in vocabulary order): the larger score, ties to the lower rank, which holds the lower
 * indices. That is the whole row's argmax_rows, NaN rules included, since each candidate is its
 * slice's best in that order. */
void m3_model_head_pick(const float *pairs, int world, int n, int32_t *ids);

/* m3_model_forward_batch_argmax that samples on the backend (its sample_rows): tokens[r] gets
 * logits row r drawn as sampling[r] says (temperature <= 0: the argmax), sampling [sum of
 * n_logits] host memory. M3_ERR_UNSUPPORTED on a backend without sample_rows (the CPU: there the
 * engine's sampler reads the rows directly). */
m3_status m3_model_forward_batch_sample(m3_model *m, const m3_model_seq *seqs, int n_seqs,
                                        float *logits, const m3_row_sampling *sampling,
                                        int32_t *tokens, float *const *hidden);

/* One image, or one video, as the vision tower takes it (m3_vision_chat_spec.md §2.5, §3.3). */
typedef struct {
  const float *pixels;        /* [grid_t * grid_h * grid_w, 3 * tp * p * p] host memory */
  int grid_t, grid_h, grid_w; /* in patches; grid_h and grid_w multiples of the merge size */
} m3_vision_input;

/* Merged tokens (placeholder ids) the item becomes: grid_t * grid_h * grid_w / merge^2. */
int m3_model_vision_tokens(const m3_model *m, const m3_vision_input *in);

/* The vision tower, projector and patch merger over one item (a video in segments of at most
 * vision_segment_max_frames temporal patches, each attending only to itself, temporal RoPE
 * positions restarting per segment): out [m3_model_vision_tokens, hidden] host memory.
 * M3_ERR_UNSUPPORTED when the model has no vision tower or the backend no vision ops;
 * M3_ERR_ARG for a grid that does not fit the config. */
m3_status m3_model_encode_vision(m3_model *m, const m3_vision_input *in, float *out);

/* Reads every byte of the mapped weights once so the first step does not page them in (less the
 * checkpoint tensors converted at load, which nothing reads any more),
 * reporting (bytes done, bytes total) along the way; progress may be NULL. */
/* A model's steps by how they ran (model/step_graph.h: decode steps recorded once as backend
 * graphs, then replayed). */
typedef struct {
  int enabled;       /* 1: the model records steps (graph ops, M3_CUDA_GRAPHS not 0) */
  uint64_t recorded; /* recorded and launched */
  uint64_t replayed; /* launched from an earlier recording */
  uint64_t direct;   /* graphable but issued op by op (first sight at an epoch, a failed recording) */
  uint64_t skipped;  /* not graphable (prefill chunks, media, captures, graphs off) */
} m3_step_graph_stats;
/* How the model's steps ran since it was loaded; all zero without graphs. */
m3_step_graph_stats m3_model_graph_stats(const m3_model *m);

/* Waits until every forward issued so far has finished and returns their first failure. A device
 * backend's forward without logits returns once its work is queued (nothing it computes goes to
 * the host), so whoever times or must know the outcome of such forwards calls this. */
m3_status m3_model_finish(m3_model *m);

void m3_model_prefault(const m3_model *m, void (*progress)(uint64_t done, uint64_t total, void *user),
                       void *user);

#endif
