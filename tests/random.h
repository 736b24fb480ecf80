/* random.h: reproducible random test inputs (xorshift64: the same numbers on every machine).
 * A test program may set test_rng_state to its own seed before drawing. */
#ifndef M3_TESTS_RANDOM_H
#define M3_TESTS_RANDOM_H
#include <stdint.h>

static uint64_t test_rng_state = 0x9E3779B97F4A7C15ull;

static inline uint32_t rnd(void) {
  test_rng_state ^= test_rng_state << 13;
  test_rng_state ^= test_rng_state >> 7;
  test_rng_state ^= test_rng_state << 17;
  return (uint32_t)(test_rng_state >> 16);
}

/* Uniform in [lo, hi] on a grid of 1e-6 of the range. */
static inline float uniform(float lo, float hi) {
  return lo + (hi - lo) * (float)(rnd() % 1000001) / 1e6f;
}

#endif
