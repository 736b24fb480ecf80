/* test_values.h: what the multi-GPU tests (test_nccl, test_p2p) share: their inputs, a pure
 * function of (salt, stream, index) so that any rank can rebuild another rank's, and the ways a
 * rank fails. */
#ifndef M3_TESTS_GPU_TEST_VALUES_H
#define M3_TESTS_GPU_TEST_VALUES_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend/backend.h"
#include "base/dtype.h"

static inline uint64_t mix(uint64_t salt, uint64_t stream, uint64_t i) {
  uint64_t z = salt * 0x9E3779B97F4A7C15ull + (stream << 40) + i + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* +-(1 + m / 2^23) * 2^e, e in [-10, 10]: 24 significant bits over many exponents, so that the
 * sum of two rounds (an all-reduce computed in a wider type would differ in the last bit). */
static inline float spread_value(uint64_t salt, int stream, size_t i) {
  uint64_t z = mix(salt, (uint64_t)stream, i);
  float v = ldexpf(1.0f + (float)(z & 0x7fffff) / 8388608.0f, (int)((z >> 23) % 21) - 10);
  return (z >> 63) ? -v : v;
}

/* Uniform in [-1, 1) on a grid of 2^-23. */
static inline float uniform_value(uint64_t salt, int stream, size_t i) {
  return (float)((double)(mix(salt, (uint64_t)stream, i) >> 40) / 8388608.0 - 1.0);
}

/* Multiples of 1/8 in [-1, 1]: products are multiples of 1/64 and sums of up to 2^18 of them are
 * exact in float32, in any order. */
static inline float eighth_value(uint64_t salt, int stream, size_t i) {
  return (float)((int)(mix(salt, (uint64_t)stream, i) % 17) - 8) / 8.0f;
}

static inline int same_bits(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }

static inline void fill_spread(float *h, size_t n, uint64_t salt, int stream) {
  for (size_t i = 0; i < n; i++) h[i] = spread_value(salt, stream, i);
}

/* A Gemma norm weight [1, cols] in BF16 of uniform values, prepared on be; *host holds its data
 * until the tensor is released. */
static inline m3_status test_norm_weight(m3_backend *be, int cols, uint64_t salt, m3_tensor *t,
                                         void **host) {
  uint16_t *h = malloc((size_t)cols * sizeof *h);
  if (!h) return m3_fail(M3_ERR_NOMEM, "norm weight of %d columns", cols);
  for (int c = 0; c < cols; c++) h[c] = m3_f32_to_bf16(uniform_value(salt, 91, (size_t)c));
  memset(t, 0, sizeof *t);
  t->name = "test.norm";
  t->data = h;
  t->dtype = M3_DT_BF16;
  t->rows = 1;
  t->cols = cols;
  t->quant = M3_WQ_NONE;
  *host = h;
  return be->ops->prepare_tensor(be, t);
}

/* A failure after a collective was issued may leave the peers blocked or spinning in it, which no
 * other thread can interrupt: the process ends, which frees every GPU's work. */
static inline void test_must(int rank, m3_status st, const char *what) {
  if (st != M3_OK) {
    fprintf(stderr, "FATAL: rank %d: %s: %s\n", rank, what, m3_last_error());
    fflush(stdout);
    _exit(1);
  }
}

static inline void *test_must_alloc(int rank, m3_backend *be, size_t bytes) {
  void *p = be->ops->alloc(be, bytes);
  if (!p) test_must(rank, M3_ERR_NOMEM, "backend alloc");
  return p;
}

/* Zeroed, so that no byte a test reads back is indeterminate. */
static inline void *test_host_alloc(size_t bytes) {
  void *p = calloc(bytes ? bytes : 1, 1);
  if (!p) {
    fprintf(stderr, "FATAL: out of host memory\n");
    _exit(1);
  }
  return p;
}

static inline double test_now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#endif
