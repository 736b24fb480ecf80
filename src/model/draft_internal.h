/* draft_internal.h (internal to src/model): what the two drafters share. draft.c runs the ragged
 * batch in steps, moves the inputs in and the chained states out, and applies the head; a kind
 * (mtp.c, eagle3.c) supplies only its body: from the step's ids, positions and input hidden
 * states to the pre-norm output rows. */
#ifndef M3_MODEL_DRAFT_INTERNAL_H
#define M3_MODEL_DRAFT_INTERNAL_H

#include "model/draft.h"
#include "model/layers.h"

typedef struct {
  /* d->out[T, H] from d->ids, d->pos [T] and d->hin [T, width] (width = d->in_width at step 0,
   * else d->H), segment i attending through segs[i].kv (the sequence's drafter views). */
  m3_status (*body)(m3_drafter *d, const m3_segment *segs, int n_segs, int T, int step);
  void (*destroy)(m3_drafter *d);
} m3_drafter_ops;

struct m3_drafter {
  const m3_drafter_ops *ops;
  m3_backend *be;
  m3_model *target;
  int *target_layers, n_target_layers; /* owned */
  m3_config cache_cfg;                 /* owns layer_attn / layer_mlp */
  int H, in_width, vocab;
  const m3_tensor *head_norm;          /* Gemma form [H] (EAGLE3 converts its Llama norms) */
  float head_eps;
  const m3_tensor *lm_head;            /* [vocab, H] */
  int32_t *d2t;                        /* host [vocab]: target id of each draft id; NULL = same */

  /* Step buffers in backend memory (STEP = M3_MODEL_STEP_TOKENS rows); h_* are their host sides
   * (the same arrays on a host-memory backend). */
  int32_t *ids, *pos, *rows;           /* [STEP] */
  int32_t *h_ids, *h_pos, *h_rows;
  float *hin;                          /* [STEP, max(in_width, H)] */
  float *out;                          /* [STEP, H] */
  float *head_in;                      /* [STEP, H] */
  float *logits, *h_logits;            /* [logits_cap, vocab], grown on demand */
  int logits_cap;
  m3_segment *segs;                    /* [STEP] */
};

/* Allocates the step buffers once H, in_width and vocab are set. */
m3_status m3_drafter_alloc_steps(m3_drafter *d);
/* Frees what m3_drafter_alloc_steps and the shared fields hold (not the drafter itself). */
void m3_drafter_free_base(m3_drafter *d);
/* cache_cfg = the target's config with n layers of the given kinds (owned arrays). */
m3_status m3_drafter_cache_layers(m3_drafter *d, int n, m3_attn_kind attn, m3_mlp_kind mlp);
/* dst[t, 0:H] = a[t], dst[t, H:2H] = b[t] for T rows: the [embedding; hidden] input. */
void m3_drafter_concat(m3_backend *be, const float *a, const float *b, int T, int H, float *dst);

#endif
