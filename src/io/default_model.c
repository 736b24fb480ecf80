#include "io/default_model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Set by CMakeLists.txt: the installed copy and the source tree's folder. */
#ifndef M3_INSTALLED_MODEL_DIR
#error "M3_INSTALLED_MODEL_DIR must be defined (CMakeLists.txt)"
#endif
#ifndef M3_SOURCE_MODEL_DIR
#error "M3_SOURCE_MODEL_DIR must be defined (CMakeLists.txt)"
#endif

static int holds_config(const char *dir) {
  char path[4200];
  if ((size_t)snprintf(path, sizeof path, "%s/config.json", dir) >= sizeof path) return 0;
  return access(path, F_OK) == 0;
}

m3_status m3_model_dir_first(const char *const *candidates, int n, char *out, size_t cap) {
  char looked[2048] = "";
  size_t used = 0;
  for (int i = 0; i < n; i++) {
    const char *dir = candidates[i];
    if (!dir || !dir[0]) continue;
    if (holds_config(dir)) {
      if (strlen(dir) + 1 > cap)
        return m3_fail(M3_ERR_ARG, "%s: path longer than the caller's buffer", dir);
      snprintf(out, cap, "%s", dir);
      return M3_OK;
    }
    if (used < sizeof looked) {
      int wrote = snprintf(looked + used, sizeof looked - used, "%s%s", used ? ", " : "", dir);
      if (wrote > 0) used += (size_t)wrote;
    }
  }
  return m3_fail(M3_ERR_MISSING, "no default model: no config.json in %s; pass --model DIR, or "
                 "make a random one with `m3 tiny DIR`", used ? looked : "(no folder given)");
}

m3_status m3_default_model_dir(char *out, size_t cap) {
  /* A variable the user set names the model they want: a typo there must not fall through to
   * another model silently. */
  const char *env = getenv("M3_MODEL_DIR");
  if (env && env[0] && !holds_config(env))
    return m3_fail(M3_ERR_MISSING, "M3_MODEL_DIR=%s: no config.json there", env);
  const char *const candidates[] = {env, M3_INSTALLED_MODEL_DIR, M3_SOURCE_MODEL_DIR};
  return m3_model_dir_first(candidates, 3, out, cap);
}
