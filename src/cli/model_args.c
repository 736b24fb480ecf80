#include "cli/model_args.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/commands.h"
#include "engine/kvcache.h"
#include "engine/parallel.h"
#include "engine/rendezvous.h"
#include "io/config.h"
#include "io/default_model.h"

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
  } else if (strcmp(flag, "--tp") == 0 || strcmp(flag, "--ep") == 0) {
    if ((*st = m3_cli_parse_long(flag, value, 1, M3_PARALLEL_MAX_RANKS, &n)) == M3_OK)
      *(flag[2] == 't' ? &spec->tp : &spec->ep) = (int)n;
  } else if (strcmp(flag, "--nnodes") == 0) {
    if ((*st = m3_cli_parse_long(flag, value, 1, M3_RENDEZVOUS_MAX_NODES, &n)) == M3_OK)
      spec->nnodes = (int)n;
  } else if (strcmp(flag, "--node-rank") == 0) {
    if ((*st = m3_cli_parse_long(flag, value, 0, M3_RENDEZVOUS_MAX_NODES - 1, &n)) == M3_OK)
      spec->node_rank = (int)n;
  } else if (strcmp(flag, "--master-addr") == 0) {
    char host[256];
    int port;
    if ((*st = m3_rendezvous_parse_addr(value, host, sizeof host, &port)) == M3_OK)
      spec->master_addr = value;
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
  o->tp = spec->tp;
  o->ep = spec->ep;
  o->nnodes = spec->nnodes;
  o->node_rank = spec->node_rank;
  o->master_addr = spec->master_addr;
}

int m3_cli_follow(const char *cmd, const m3_engine_options *o) {
  printf("m3 %s: node %d of %d follows node 0 at %s\n", cmd, o->node_rank, o->nnodes,
         o->master_addr);
  fflush(stdout);
  m3_status st = m3_engine_follow(o);
  return st == M3_OK ? 0 : m3_cli_fail(cmd, st);
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

m3_status m3_cli_model_or_default(const char **model, m3_cli_spec *spec, m3_cli_model_paths *paths) {
  if (*model) return M3_OK;
  m3_status st = m3_default_model_dir(paths->model, sizeof paths->model);
  if (st != M3_OK) return st;
  *model = paths->model;
  if (!spec || spec->draft || !spec->kind || strcmp(spec->kind, "eagle3") != 0) return M3_OK;
  /* The draft lies next to the model: models/m3-small-eagle3 beside models/m3-small. */
  size_t len = strlen(paths->model);
  while (len > 1 && paths->model[len - 1] == '/') len--;
  while (len > 0 && paths->model[len - 1] != '/') len--;
  if ((size_t)snprintf(paths->draft, sizeof paths->draft, "%.*s%s", (int)len, paths->model,
                       M3_DEFAULT_DRAFT_NAME) >= sizeof paths->draft)
    return m3_fail(M3_ERR_ARG, "%s: path too long for its draft folder", paths->model);
  spec->draft = paths->draft;
  return M3_OK;
}

m3_status m3_cli_print_plan(const char *model_dir, int tp, int ep) {
  char path[4200];
  snprintf(path, sizeof path, "%s/config.json", model_dir);
  m3_config cfg;
  m3_status st = m3_config_load(path, &cfg);
  if (st != M3_OK) return st;
  m3_plan plan;
  st = m3_parallel_plan(&cfg, tp ? tp : 1, ep ? ep : 1, &plan);
  if (st == M3_OK) m3_parallel_plan_print(&plan, stdout);
  fflush(stdout); /* before the caller's error line on stderr */
  m3_config_free(&cfg);
  return st;
}

m3_status m3_cli_parallel_gate(const m3_cli_spec *s, const char *model_dir) {
  int nnodes = s->nnodes ? s->nnodes : 1;
  if (s->node_rank >= nnodes)
    return m3_fail(M3_ERR_ARG, "--node-rank %d: expected 0..%d (--nnodes %d)", s->node_rank,
                   nnodes - 1, nnodes);
  if (nnodes > 1 && !s->master_addr)
    return m3_fail(M3_ERR_ARG, "--nnodes %d: needs --master-addr HOST[:PORT]", nnodes);
  if (s->tp <= 1 && s->ep <= 1) return M3_OK;
  return m3_cli_print_plan(model_dir, s->tp, s->ep);
}
