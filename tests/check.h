/* check.h: the assertions every C test uses. Each failure prints file:line and the values; a test
 * program ends with check_summary(), which prints "N passed, N failed" and returns the exit code. */
#ifndef M3_TESTS_CHECK_H
#define M3_TESTS_CHECK_H
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "base/status.h"

static int check_passed, check_failed;

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (cond) {                                                                       \
      check_passed++;                                                                 \
    } else {                                                                          \
      check_failed++;                                                                 \
      fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);       \
    }                                                                                 \
  } while (0)

#define CHECK_EQ_INT(a, b)                                                            \
  do {                                                                                \
    long long check_a_ = (long long)(a), check_b_ = (long long)(b);                   \
    if (check_a_ == check_b_) {                                                       \
      check_passed++;                                                                 \
    } else {                                                                          \
      check_failed++;                                                                 \
      fprintf(stderr, "%s:%d: %s == %s failed: %lld != %lld\n", __FILE__, __LINE__,   \
              #a, #b, check_a_, check_b_);                                            \
    }                                                                                 \
  } while (0)

/* |a - b| <= tol, NaN never passes. */
#define CHECK_NEAR(a, b, tol)                                                         \
  do {                                                                                \
    double check_a_ = (double)(a), check_b_ = (double)(b);                            \
    if (fabs(check_a_ - check_b_) <= (double)(tol)) {                                 \
      check_passed++;                                                                 \
    } else {                                                                          \
      check_failed++;                                                                 \
      fprintf(stderr, "%s:%d: %s ~ %s failed: %.9g vs %.9g (tol %g)\n", __FILE__,     \
              __LINE__, #a, #b, check_a_, check_b_, (double)(tol));                   \
    }                                                                                 \
  } while (0)

#define CHECK_STR(a, b)                                                               \
  do {                                                                                \
    const char *check_a_ = (a), *check_b_ = (b);                                      \
    if (check_a_ && check_b_ && strcmp(check_a_, check_b_) == 0) {                    \
      check_passed++;                                                                 \
    } else {                                                                          \
      check_failed++;                                                                 \
      fprintf(stderr, "%s:%d: %s == %s failed: \"%s\" != \"%s\"\n", __FILE__,         \
              __LINE__, #a, #b, check_a_ ? check_a_ : "(null)",                       \
              check_b_ ? check_b_ : "(null)");                                        \
    }                                                                                 \
  } while (0)

/* The call must fail with `status` and its message must contain `needle`. */
#define CHECK_FAILS_WITH(expr, status, needle)                                        \
  do {                                                                                \
    m3_status check_s_ = (expr);                                                      \
    const char *check_m_ = m3_last_error();                                           \
    if (check_s_ == (status) && strstr(check_m_, (needle))) {                         \
      check_passed++;                                                                 \
    } else {                                                                          \
      check_failed++;                                                                 \
      fprintf(stderr, "%s:%d: %s: expected %s with \"%s\", got %s: \"%s\"\n",         \
              __FILE__, __LINE__, #expr, m3_status_name(status), (needle),            \
              m3_status_name(check_s_), check_m_);                                    \
    }                                                                                 \
  } while (0)

#define CHECK_OK(expr)                                                                \
  do {                                                                                \
    m3_status check_s_ = (expr);                                                      \
    if (check_s_ == M3_OK) {                                                          \
      check_passed++;                                                                 \
    } else {                                                                          \
      check_failed++;                                                                 \
      fprintf(stderr, "%s:%d: %s failed: %s: %s\n", __FILE__, __LINE__, #expr,        \
              m3_status_name(check_s_), m3_last_error());                             \
    }                                                                                 \
  } while (0)

static inline int check_summary(void) {
  printf("%d passed, %d failed\n", check_passed, check_failed);
  return check_failed == 0 && check_passed > 0 ? 0 : 1;
}

#endif
