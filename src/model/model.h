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

/* Tokens one internal step processes; the scratch is sized for it once at load, and longer
 * forwards run as consecutive steps. */
#define M3_MODEL_STEP_TOKENS 256

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
void m3_model_free(m3_model *m);

const m3_config *m3_model_config(const m3_model *m);
m3_backend *m3_model_backend(const m3_model *m);
int m3_model_num_sparse_layers(const m3_model *m);

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
} m3_model_seq;

/* A forward over several sequences at once (continuous batching): the linear layers, norms and
 * MoE run over all tokens of the batch together; cache stores, MSA selection and attention run
 * per sequence on its own views and positions, so a sequence's results do not depend on what
 * else is in the batch (up to the float rounding of the matmul kernels for different row counts).
 *   logits [sum of n_logits, vocab]: the requested rows, sequence by sequence, or NULL when no
 *          sequence asks for any.
 * A batch of one with n_logits = T is exactly m3_model_forward. Bad ids or positions in any
 * sequence are M3_ERR_ARG naming the sequence; nothing is computed then. */
m3_status m3_model_forward_batch(m3_model *m, const m3_model_seq *seqs, int n_seqs,
                                 float *logits);

/* Reads every byte of the mapped weights once so the first step does not page them in,
 * reporting (bytes done, bytes total) along the way; progress may be NULL. */
void m3_model_prefault(const m3_model *m, void (*progress)(uint64_t done, uint64_t total, void *user),
                       void *user);

#endif
