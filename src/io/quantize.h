/* quantize.h: `--quantize mxfp8`, converting a BF16 checkpoint to MXFP8 at load.
 *
 * The tensors the published MXFP8 checkpoint quantizes (shared/spec/m3_text_spec.md §9.3, as
 * `m3 tiny --dtype mxfp8` writes them): attention q/k/v/o, the dense MLP, routed and shared
 * experts, in the decoder layers and in the MTP modules' transformer layers. Not the router, norms,
 * embedding, lm_head, indexer projections, MTP eh_proj or vision tower. Each plain (F32, F16,
 * BF16) one becomes E4M3 [rows, cols] + e8m0 [rows, ceil(cols/32)] by the rule of base/mxfp8.h
 * (a short last block, as the published format has for widths not a multiple of 32), in memory
 * the weights own; already quantized tensors stay as they are. So the backends see an ordinary
 * MXFP8 checkpoint, bit for bit the one `m3 tiny --dtype mxfp8` writes from the same values. */
#ifndef M3_IO_QUANTIZE_H
#define M3_IO_QUANTIZE_H

#include <stdint.h>

#include "base/status.h"
#include "io/config.h"
#include "io/weights.h"

/* Converts tensor by tensor (peak: the converted tensors plus one), rows in parallel over
 * `threads` threads (0 = one per core), reporting (source bytes done, total) to progress (may be
 * NULL). The checkpoint data no longer read is listed in w->replaced. */
m3_status m3_weights_quantize_mxfp8(const m3_config *cfg, m3_weights *w, int threads,
                                    void (*progress)(uint64_t done, uint64_t total, void *user),
                                    void *user);

/* The tensors m3_weights_quantize_mxfp8 converts (plain ones of the kinds above): their count,
 * and when `out` is not NULL, pointers to them in out[0 .. count). */
int64_t m3_weights_mxfp8_targets(const m3_config *cfg, m3_weights *w, m3_tensor **out);

#endif
