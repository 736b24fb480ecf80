/* The default model's folder (io/default_model.h): the first candidate holding a config.json,
 * skipping unset, empty and config-less ones; none is M3_ERR_MISSING naming every folder looked
 * at and what to do; a short buffer is M3_ERR_ARG; $M3_MODEL_DIR comes before the built-in
 * places and is passed over when it holds no config.json. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "io/default_model.h"

static void make_model_dir(const char *dir) {
  char path[600];
  mkdir(dir, 0700);
  snprintf(path, sizeof path, "%s/config.json", dir);
  FILE *f = fopen(path, "w");
  if (f) {
    fputs("{}", f);
    fclose(f);
  }
}

static void test_first(const char *root) {
  char a[512], b[512], bare[512], none[512], out[512];
  snprintf(a, sizeof a, "%s/a", root);
  snprintf(b, sizeof b, "%s/b", root);
  snprintf(bare, sizeof bare, "%s/bare", root);
  snprintf(none, sizeof none, "%s/none", root);
  make_model_dir(a);
  make_model_dir(b);
  mkdir(bare, 0700); /* a folder, but no config.json */

  const char *const skip[] = {NULL, "", none, bare, b, a};
  CHECK_OK(m3_model_dir_first(skip, 6, out, sizeof out));
  CHECK_STR(out, b);
  const char *const order[] = {a, b};
  CHECK_OK(m3_model_dir_first(order, 2, out, sizeof out));
  CHECK_STR(out, a);

  const char *const missing[] = {NULL, none, bare};
  CHECK_FAILS_WITH(m3_model_dir_first(missing, 3, out, sizeof out), M3_ERR_MISSING, none);
  const char *msg = m3_last_error();
  CHECK(strstr(msg, bare) != NULL);
  CHECK(strstr(msg, "--model DIR") != NULL);
  CHECK(strstr(msg, "m3 tiny DIR") != NULL);
  CHECK(strchr(msg, '\n') == NULL);

  char small[8];
  CHECK_FAILS_WITH(m3_model_dir_first(order, 2, small, sizeof small), M3_ERR_ARG, a);
}

static void test_env(const char *root) {
  char env[512], bare[512], out[512], source[600];
  snprintf(env, sizeof env, "%s/env", root);
  snprintf(bare, sizeof bare, "%s/bare", root);
  make_model_dir(env);
  setenv("M3_MODEL_DIR", env, 1);
  CHECK_OK(m3_default_model_dir(out, sizeof out));
  CHECK_STR(out, env);

  /* A $M3_MODEL_DIR without a config.json is an error naming it, not a silent fallback. */
  setenv("M3_MODEL_DIR", bare, 1);
  CHECK_FAILS_WITH(m3_default_model_dir(out, sizeof out), M3_ERR_MISSING, bare);
  /* Empty counts as unset: an installed copy, else the source tree's folder. */
  setenv("M3_MODEL_DIR", "", 1);
  snprintf(source, sizeof source, "%s/models/m3-small", M3_SOURCE_DIR);
  CHECK_OK(m3_default_model_dir(out, sizeof out));
  size_t len = strlen(out), tail = strlen("/share/m3/models/m3-small");
  CHECK(strcmp(out, source) == 0 ||
        (len > tail && strcmp(out + len - tail, "/share/m3/models/m3-small") == 0));
  unsetenv("M3_MODEL_DIR");
  char again[512];
  CHECK_OK(m3_default_model_dir(again, sizeof again));
  CHECK_STR(again, out);
}

int main(void) {
  char root[] = "/tmp/m3_test_default_model_XXXXXX";
  if (!mkdtemp(root)) return 1;
  test_first(root);
  test_env(root);
  char cmd[600];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", root);
  return check_summary();
}
