#include "engine/sampler.h"

#include <math.h>

void m3_sampler_init(m3_sampler *s, float temperature, uint64_t seed) {
  s->temperature = temperature;
  s->rng = seed;
}

/* splitmix64 (Steele, Lea, Flood 2014): one add and a mixing function per draw. */
static uint64_t next_u64(m3_sampler *s) {
  uint64_t z = (s->rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* Uniform in [0, 1) with 53 random bits. */
static double next_unit(m3_sampler *s) { return (double)(next_u64(s) >> 11) * 0x1.0p-53; }

static int32_t argmax(const float *logits, int vocab) {
  int32_t best = 0;
  for (int i = 1; i < vocab; i++)
    if (logits[i] > logits[best]) best = i;
  return best;
}

int32_t m3_sampler_sample(m3_sampler *s, const float *logits, int vocab) {
  int32_t best = argmax(logits, vocab);
  if (s->temperature <= 0.0f) return best;
  /* Weights exp((l - max) / T) never overflow; sums in double over a 200k vocab stay exact
   * enough that the last token is reachable. */
  const double inv_t = 1.0 / s->temperature, max = logits[best];
  double total = 0.0;
  for (int i = 0; i < vocab; i++) total += exp(((double)logits[i] - max) * inv_t);
  double u = next_unit(s) * total, acc = 0.0;
  int32_t last_positive = best;
  for (int i = 0; i < vocab; i++) {
    double p = exp(((double)logits[i] - max) * inv_t);
    if (p <= 0.0) continue;
    acc += p;
    last_positive = i;
    if (u < acc) return i;
  }
  /* Rounding left u at the very top of the range. */
  return last_positive;
}
