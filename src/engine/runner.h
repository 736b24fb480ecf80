/* runner.h: a model, one KV cache, and the buffers to feed a sequence's tokens through them in
 * chunks: prefill (all at once), chunked prefill (N at a time) and decode (1 at a time) are the
 * same call with a different chunk size. Serving goes through the scheduler (m3.h); this direct
 * path serves `m3 logits` and the reference-fixture test, which need every position's logits and
 * a chosen chunking. */
#ifndef M3_ENGINE_RUNNER_H
#define M3_ENGINE_RUNNER_H

#include <stddef.h>
#include <stdint.h>

#include "engine/kvcache.h"
#include "model/model.h"

typedef struct m3_runner m3_runner;

/* A KV cache of kv_budget_bytes holding `dt` for `model` (which must outlive the runner). */
m3_status m3_runner_create(m3_model *model, m3_kv_dtype dt, size_t kv_budget_bytes,
                           m3_runner **out);
void m3_runner_free(m3_runner *r);
m3_kv_cache *m3_runner_cache(m3_runner *r);

/* Feeds ids[T] at the sequence's next positions (seq->num_tokens onwards), `chunk` tokens per
 * forward (0: as many as one model step takes). logits [T, vocab] or NULL; capture NULL or rows
 * [capture->first, capture->first + T) of its buffer. Returns when the device has finished the
 * work, with its status. On failure (bad id, out of pages) the
 * chunks already fed stay in the sequence. */
m3_status m3_runner_feed(m3_runner *r, m3_kv_seq *seq, const int32_t *ids, int T, int chunk,
                         float *logits, const m3_selection_capture *capture);

#endif
