/* cuda_env.c: see cuda_env.h. */
#include "cuda_env.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_VARS = 4 };

m3_status cuda_with_env(const char *const *names, const char *const *values, int n,
                        m3_backend **out) {
  if (n < 0 || n > MAX_VARS) return m3_fail(M3_ERR_ARG, "cuda_with_env: %d variables", n);
  char *saved[MAX_VARS];
  for (int i = 0; i < n; i++) {
    const char *old = getenv(names[i]);
    saved[i] = old ? strdup(old) : NULL;
    setenv(names[i], values[i], 1);
  }
  m3_status st = m3_backend_create("cuda", 0, out);
  for (int i = 0; i < n; i++) {
    if (saved[i]) setenv(names[i], saved[i], 1);
    else unsetenv(names[i]);
    free(saved[i]);
  }
  return st;
}

m3_status cuda_with_streams(const char *streams, m3_backend **out) {
  static const char *const names[2] = {"M3_MOE_STREAMS", "M3_MOE_GROUPED"};
  const char *const values[2] = {streams, "0"};
  return cuda_with_env(names, values, 2, out);
}

m3_status cuda_with_tile(int tile, m3_backend **out) {
  static const char *const names[2] = {"M3_MOE_GROUPED", "M3_MOE_GROUPED_TILE"};
  char value[16];
  snprintf(value, sizeof value, "%d", tile);
  const char *const values[2] = {"1", value};
  return cuda_with_env(names, values, 2, out);
}
