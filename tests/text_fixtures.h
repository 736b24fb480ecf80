/* text_fixtures.h: runs a test over every committed text fixture (tests/fixtures/text/NAME with a
 * reference.json), in name order. Include after check.h. */
#ifndef M3_TESTS_TEXT_FIXTURES_H
#define M3_TESTS_TEXT_FIXTURES_H
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/backend.h"

typedef void (*text_fixture_fn)(m3_backend *be, const char *dir, const char *name);

static int text_fixture_by_name(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

static void for_each_text_fixture(m3_backend *be, text_fixture_fn fn) {
  const char *root = M3_SOURCE_DIR "/tests/fixtures/text";
  DIR *d = opendir(root);
  CHECK(d != NULL);
  if (!d) {
    fprintf(stderr, "no fixture folder %s\n", root);
    return;
  }
  char *names[256];
  int count = 0;
  for (struct dirent *e; (e = readdir(d)) && count < 256;) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s/reference.json", root, e->d_name);
    if (e->d_name[0] != '.' && access(path, R_OK) == 0) names[count++] = strdup(e->d_name);
  }
  closedir(d);
  qsort(names, (size_t)count, sizeof *names, text_fixture_by_name);
  CHECK(count > 0);
  for (int i = 0; i < count; i++) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/%s", root, names[i]);
    fn(be, dir, names[i]);
    free(names[i]);
  }
}

#endif
