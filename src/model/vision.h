/* vision.h (internal to src/model): the splice of vision embeddings into a step (vision.c). */
#ifndef M3_MODEL_VISION_H
#define M3_MODEL_VISION_H

#include "model/layers.h"

/* Overwrites the step's embedding rows (s.x) of each segment's image/video placeholder ids with
 * its sequence's media rows (m3_model_seq.media). */
m3_status m3_vision_splice(m3_model *m, const m3_segment *segs, int n_segs,
                           const m3_model_seq *seqs);

#endif
