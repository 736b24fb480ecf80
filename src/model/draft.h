/* draft.h: the drafters of speculative decoding, behind one interface.
 *
 * A drafter predicts the token after position p from two inputs at p: the embedding of the token
 * x_{p+1} that follows p, and a hidden state at p. It runs at position p (RoPE and causal mask of
 * p) over its own KV cache, like a one-layer model appended to the target:
 *   catch-up   the hidden state is the target's (m3_model_set_hidden_layers picks what the
 *              drafter reads), over every position whose next token is known; this fills the
 *              drafter's cache and its last row proposes the first draft;
 *   chained    the hidden state is the drafter's own output at p - 1 (x_{p+1} = the previous
 *              draft), for drafts 2..k.
 * Kinds:
 *   MTP     the checkpoint's own multi-token-prediction modules (m3_text_spec.md §8): enorm,
 *           hnorm, eh_proj over [embedding; hidden], a sparse MoE decoder layer, final norm,
 *           the target's lm_head. Reads the target's final hidden after model.norm; chains the
 *           pre-final_layernorm output (vLLM's semantics, spec §8.2). Draft step s uses module
 *           s mod num_mtp (catch-up: module 0), each with its own cache layer.
 *   EAGLE3  a one-layer Llama draft in its own folder (vLLM llama_eagle3): fc over the target's
 *           auxiliary states concatenated, input_layernorm on the embedding and hidden_norm on
 *           the hidden state, attention over [embedding; hidden] (2H wide), SiLU MLP, norm, its
 *           own or the target's lm_head, draft ids mapped to target ids by d2t. Chains the
 *           pre-norm output.
 * Drafts are greedy (argmax), as vLLM's default. */
#ifndef M3_MODEL_DRAFT_H
#define M3_MODEL_DRAFT_H

#include <stdint.h>

#include "backend/backend.h"
#include "io/config.h"
#include "model/model.h"

typedef struct m3_drafter m3_drafter;

/* The MTP modules bound with the target (m3_weights.mtp); M3_ERR_MISSING when it has none. */
m3_status m3_drafter_mtp_create(m3_model *target, m3_drafter **out);
/* An EAGLE3 draft from DIR (config.json + safetensors) for `target`. Bad layouts name the key or
 * tensor at fault. */
m3_status m3_drafter_eagle3_load(const char *dir, m3_model *target, m3_drafter **out);
void m3_drafter_free(m3_drafter *d);

/* Target layers the drafter reads (for m3_model_set_hidden_layers); *n entries. */
const int *m3_drafter_target_layers(const m3_drafter *d, int *n);
/* Shape of the drafter's cache (for m3_kv_cache_create): its layers, heads, block size. */
const m3_config *m3_drafter_cache_config(const m3_drafter *d);
/* Width of the chained hidden state (the drafter's hidden size). */
int m3_drafter_hidden_size(const m3_drafter *d);
/* Vocabulary of the drafter's own logits (EAGLE3 draft_vocab_size; MTP: the target's). */
int m3_drafter_vocab(const m3_drafter *d);

/* One sequence's share of a drafter forward. */
typedef struct {
  const m3_kv_view *kv;   /* [cache layers] the sequence's drafter cache views */
  const int32_t *ids;     /* [T] x_{p+1}, target vocabulary */
  const int32_t *pos;     /* [T] p */
  int T;
  const float *hidden;    /* [T, width] host: target states (catch-up; width =
                           * m3_model_hidden_width) or chained states (width = hidden size) */
  float *hidden_out;      /* NULL or [T, hidden size] host: the states to chain from */
  float *logits;          /* NULL or [T, m3_drafter_vocab] host: the drafter's logits */
  int32_t *draft;         /* NULL or where the last row's greedy draft (target id) goes */
} m3_draft_seq;

/* Runs seqs[n] through draft step `step` (0 = catch-up from target states; s >= 1 = chained,
 * module s mod num_mtp for MTP). */
m3_status m3_drafter_forward(m3_drafter *d, const m3_draft_seq *seqs, int n, int step);

#endif
