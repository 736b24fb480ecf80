/* tiny_draft.h: a small deterministic random EAGLE3 draft for a target config, in the layout of
 * published drafts (LlamaForCausalLMEagle3: config.json + model.safetensors).
 *
 * It exercises every part of the EAGLE3 path: fc over three auxiliary target states, the
 * [embedding; hidden] attention input, a draft vocabulary of half the target's with its own
 * lm_head and a d2t map, and the target's embedding (no embed_tokens of its own). Weights are
 * float32 from an integer PRNG seeded per tensor name: same seed, same bytes. */
#ifndef M3_IO_TINY_DRAFT_H
#define M3_IO_TINY_DRAFT_H

#include <stdint.h>

#include "base/status.h"
#include "io/config.h"

/* Writes the draft for `target` (4+ layers) into dir (created if missing). */
m3_status m3_tiny_eagle3_write(const char *dir, const m3_config *target, uint64_t seed);

#endif
