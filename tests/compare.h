/* compare.h: how far a result is from its reference, for tests that check against fixtures. */
#ifndef M3_TESTS_COMPARE_H
#define M3_TESTS_COMPARE_H
#include <math.h>
#include <stddef.h>

/* ||a - b|| / ||b|| in double; ||a - b|| when b is all zeros. */
static inline double rel_l2(const float *a, const float *b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    den += (double)b[i] * b[i];
  }
  return sqrt(num) / (den > 0 ? sqrt(den) : 1);
}

#endif
