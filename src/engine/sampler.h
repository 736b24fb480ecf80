/* sampler.h: picking the next token from a row of logits.
 *
 * temperature 0 is greedy (argmax, ties to the lower id); otherwise a draw from
 * softmax(logits / temperature) with a seeded PRNG, so a seed reproduces a generation. Filters
 * (top-k, top-p, min-p, penalties) slot in before the draw. */
#ifndef M3_ENGINE_SAMPLER_H
#define M3_ENGINE_SAMPLER_H

#include <stdint.h>

typedef struct {
  float temperature;
  uint64_t rng; /* splitmix64 state */
} m3_sampler;

void m3_sampler_init(m3_sampler *s, float temperature, uint64_t seed);
/* logits [vocab]; returns a token id in [0, vocab). */
int32_t m3_sampler_sample(m3_sampler *s, const float *logits, int vocab);

#endif
