#include "cli/model_args.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kvcache.h"

m3_status m3_cli_parse_long(const char *flag, const char *value, long min, long max, long *out) {
  char *end;
  errno = 0;
  long v = strtol(value, &end, 10);
  if (end == value || *end != '\0' || errno == ERANGE || v < min || v > max)
    return m3_fail(M3_ERR_ARG, "%s '%s': expected an integer in %ld..%ld", flag, value, min, max);
  *out = v;
  return M3_OK;
}

m3_status m3_cli_parse_unit(const char *flag, const char *value, double max, double *out) {
  char *end;
  double t = strtod(value, &end);
  if (end == value || *end != '\0' || !(t >= 0.0 && t <= max))
    return m3_fail(M3_ERR_ARG, "%s '%s': expected a number in 0..%g", flag, value, max);
  *out = t;
  return M3_OK;
}

void m3_cli_load_progress(uint64_t done, uint64_t total, void *user) {
  (void)user;
  if (total > 0) fprintf(stderr, "\rloading weights: %3d%%", (int)(100.0 * (double)done / (double)total));
  if (done == total) fprintf(stderr, "\n");
}

m3_status m3_cli_parse_ids(const char *list, int32_t **ids, int *n) {
  *ids = NULL;
  *n = 0;
  int cap = 1;
  for (const char *p = list; *p; p++) cap += *p == ',';
  int32_t *out = malloc((size_t)cap * sizeof *out);
  if (!out) return m3_fail(M3_ERR_NOMEM, "--ids: out of memory");
  const char *p = list;
  for (int i = 0; i < cap; i++) {
    char *end;
    errno = 0;
    long v = strtol(p, &end, 10);
    if (end == p || (*end != ',' && *end != '\0') || errno == ERANGE || v < INT32_MIN ||
        v > INT32_MAX) {
      size_t len = strcspn(p, ",");
      free(out);
      return m3_fail(M3_ERR_ARG, "--ids: entry %d '%.*s' is not an integer token id", i,
                     (int)(len > 64 ? 64 : len), p);
    }
    out[i] = (int32_t)v;
    p = end + (*end == ',');
  }
  *ids = out;
  *n = cap;
  return M3_OK;
}

m3_status m3_cli_check_ids(const int32_t *ids, int n, int vocab) {
  for (int i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= vocab)
      return m3_fail(M3_ERR_ARG, "--ids: token id %d (entry %d) is outside the vocabulary 0..%d",
                     ids[i], i, vocab - 1);
  return M3_OK;
}

int m3_cli_spec_flag(const char *flag, const char *value, m3_cli_spec *spec, m3_status *st) {
  long n = 0;
  if (strcmp(flag, "--speculative") == 0) {
    spec->kind = value;
    if (strcmp(value, "mtp") != 0 && strcmp(value, "eagle3") != 0)
      *st = m3_fail(M3_ERR_ARG, "--speculative '%s': expected mtp or eagle3", value);
  } else if (strcmp(flag, "--draft") == 0) {
    spec->draft = value;
  } else if (strcmp(flag, "--num-draft") == 0) {
    if ((*st = m3_cli_parse_long(flag, value, 1, 16, &n)) == M3_OK) spec->num_draft = (int)n;
  } else if (strcmp(flag, "--quantize") == 0) {
    *st = m3_cli_parse_quantize(value, &spec->quantize);
  } else if (strcmp(flag, "--kv-dtype") == 0) {
    m3_kv_dtype dt;
    if ((*st = m3_cli_parse_kv_dtype(value, &dt)) == M3_OK) spec->kv_dtype = value;
  } else {
    return 0;
  }
  return 1;
}

void m3_cli_spec_apply(const m3_cli_spec *spec, m3_engine_options *o) {
  o->speculative = spec->kind;
  o->draft_dir = spec->draft;
  o->num_draft = spec->num_draft;
  o->quantize = spec->quantize;
  o->kv_dtype = spec->kv_dtype;
}

m3_status m3_cli_parse_kv_dtype(const char *value, m3_kv_dtype *out) {
  return m3_kv_dtype_parse("--kv-dtype", value, out);
}

m3_status m3_cli_parse_quantize(const char *value, const char **out) {
  if (strcmp(value, "mxfp8") != 0)
    return m3_fail(M3_ERR_ARG, "--quantize '%s': expected mxfp8", value);
  *out = value;
  return M3_OK;
}

m3_status m3_cli_open_backend(const char *device, int threads, m3_backend **out) {
  return m3_backend_create(device, threads, out);
}
