/* profile.c: a backend that runs another one op by op and says where the time goes.
 *
 * Every op of the wrapped backend (and every transfer) is followed by a wait for its completion
 * (a 4-byte to_host), and the wall time of op + wait is added to the row of (op, weight name with
 * layer numbers folded to '#'), so "matmul model.layers.#.self_attn.q_proj.weight" sums every
 * layer's q projection. The row also sums the host time of the call alone, before the wait: on a
 * GPU, the time to issue the op's kernels, which bounds a step made of many short ones. The waits
 * serialize what a GPU would overlap and add a few microseconds each: the table is for finding
 * the op that dominates a phase, not for the phase's total, which the caller times without the
 * wrapper. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"

enum { PROF_MAX_ROWS = 512, PROF_KEY = 192 }; /* room for a matmul_set's weight names */

typedef struct {
  char key[PROF_KEY];
  long calls;
  double seconds, host_seconds;
} prof_row;

typedef struct {
  m3_backend base;
  m3_backend *inner;
  void *probe; /* 4 bytes of the inner backend's memory, read back to wait for its ops */
  prof_row rows[PROF_MAX_ROWS];
  int nrows;
  long dropped; /* calls whose key found no free row */
} prof_backend;

static prof_backend *prof_of(m3_backend *be) { return (prof_backend *)be; }
static m3_backend *inner_of(m3_backend *be) { return prof_of(be)->inner; }

/* "model.layers.12.mlp.experts.3.w1.weight" -> "model.layers.#.mlp.experts.#.w1.weight". */
static void fold_digits(const char *name, char *out, size_t cap) {
  size_t n = 0;
  for (const char *p = name; *p && n + 1 < cap;) {
    if (*p >= '0' && *p <= '9') {
      out[n++] = '#';
      while (*p >= '0' && *p <= '9') p++;
    } else {
      out[n++] = *p++;
    }
  }
  out[n] = '\0';
}

static double wall(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double now_wait(prof_backend *pb) {
  uint32_t sink;
  (void)pb->inner->ops->to_host(pb->inner, &sink, pb->probe, sizeof sink);
  return wall();
}

/* Appends s to key (n characters so far), cut at PROF_KEY - 1 characters. */
static void append(char key[PROF_KEY], size_t *n, const char *s) {
  while (*s && *n + 1 < PROF_KEY) key[(*n)++] = *s++;
  key[*n] = '\0';
}

/* "op", then the names of the weights with their numbers folded: the first after a space, each
 * further one (a matmul_set's) after " + " and without the dotted prefix it shares with the
 * first ("... q_proj.weight + k_proj.weight + v_proj.weight"). */
static void make_key(const char *op, const m3_tensor *const *w, int nw, char key[PROF_KEY]) {
  char first[PROF_KEY] = "", name[PROF_KEY] = "";
  size_t n = 0;
  int named = 0;
  key[0] = '\0';
  append(key, &n, op);
  for (int i = 0; i < nw; i++) {
    if (!w[i] || !w[i]->name) continue;
    fold_digits(w[i]->name, named ? name : first, PROF_KEY);
    size_t from = 0; /* past the last '.' that name shares with first */
    for (size_t j = 0; named && name[j] && name[j] == first[j]; j++)
      if (name[j] == '.') from = j + 1;
    append(key, &n, named ? " + " : " ");
    append(key, &n, named ? name + from : first);
    named++;
  }
}

static void account_set(prof_backend *pb, const char *op, const m3_tensor *const *w, int nw,
                        double t0) {
  const double host = wall() - t0, dt = now_wait(pb) - t0;
  char key[PROF_KEY];
  make_key(op, w, nw, key);
  for (int i = 0; i < pb->nrows; i++)
    if (strcmp(pb->rows[i].key, key) == 0) {
      pb->rows[i].calls++;
      pb->rows[i].seconds += dt;
      pb->rows[i].host_seconds += host;
      return;
    }
  if (pb->nrows == PROF_MAX_ROWS) {
    pb->dropped++;
    return;
  }
  prof_row *r = &pb->rows[pb->nrows++];
  snprintf(r->key, sizeof r->key, "%s", key);
  r->calls = 1;
  r->seconds = dt;
  r->host_seconds = host;
}

static void account(prof_backend *pb, const char *op, const m3_tensor *w, double t0) {
  account_set(pb, op, &w, 1, t0);
}

/* Starts the clock once the ops issued before this one are done, so that each op is charged
 * only its own time. */
static double start(prof_backend *pb) { return now_wait(pb); }

#define INNER(be) (inner_of(be)->ops)

static void prof_destroy(m3_backend *be) {
  prof_backend *pb = prof_of(be);
  pb->inner->ops->free(pb->inner, pb->probe);
  pb->inner->ops->destroy(pb->inner);
  free((void *)pb->base.ops);
  free(pb);
}
static void *prof_alloc(m3_backend *be, size_t bytes) { return INNER(be)->alloc(inner_of(be), bytes); }
static void prof_free(m3_backend *be, void *p) { INNER(be)->free(inner_of(be), p); }
static void *prof_alloc_host(m3_backend *be, size_t bytes) { return INNER(be)->alloc_host(inner_of(be), bytes); }
static void prof_free_host(m3_backend *be, void *p) { INNER(be)->free_host(inner_of(be), p); }
static m3_status prof_to_device(m3_backend *be, void *dst, const void *src, size_t bytes) {
  double t0 = start(prof_of(be));
  m3_status st = INNER(be)->to_device(inner_of(be), dst, src, bytes);
  account(prof_of(be), "to_device", NULL, t0);
  return st;
}
static m3_status prof_to_host(m3_backend *be, void *dst, const void *src, size_t bytes) {
  double t0 = start(prof_of(be));
  m3_status st = INNER(be)->to_host(inner_of(be), dst, src, bytes);
  account(prof_of(be), "to_host", NULL, t0);
  return st;
}
static m3_status prof_copy(m3_backend *be, void *dst, const void *src, size_t bytes) {
  double t0 = start(prof_of(be));
  m3_status st = INNER(be)->copy(inner_of(be), dst, src, bytes);
  account(prof_of(be), "copy", NULL, t0);
  return st;
}
static m3_status prof_zero(m3_backend *be, void *dst, size_t bytes) {
  double t0 = start(prof_of(be));
  m3_status st = INNER(be)->zero(inner_of(be), dst, bytes);
  account(prof_of(be), "zero", NULL, t0);
  return st;
}
static m3_status prof_prepare_tensor(m3_backend *be, m3_tensor *t) {
  return INNER(be)->prepare_tensor(inner_of(be), t);
}
static void prof_release_tensor(m3_backend *be, m3_tensor *t) { INNER(be)->release_tensor(inner_of(be), t); }
static m3_status prof_prepare_experts(m3_backend *be, m3_moe_experts *ex) {
  return INNER(be)->prepare_experts(inner_of(be), ex);
}
static void prof_release_experts(m3_backend *be, m3_moe_experts *ex) {
  INNER(be)->release_experts(inner_of(be), ex);
}

static void prof_embed(m3_backend *be, const m3_tensor *table, const int32_t *ids, int T, float *out) {
  double t0 = start(prof_of(be));
  INNER(be)->embed(inner_of(be), table, ids, T, out);
  account(prof_of(be), "embed", NULL, t0);
}
static void prof_matmul(m3_backend *be, const m3_tensor *w, const float *x, int T, float *y) {
  double t0 = start(prof_of(be));
  INNER(be)->matmul(inner_of(be), w, x, T, y);
  account(prof_of(be), "matmul", w, t0);
}
static void prof_matmul_set(m3_backend *be, const float *x, int T, const m3_matmul_out *out,
                            int n) {
  double t0 = start(prof_of(be));
  INNER(be)->matmul_set(inner_of(be), x, T, out, n);
  const m3_tensor *w[M3_MATMUL_SET_MAX];
  const int nw = n < M3_MATMUL_SET_MAX ? n : M3_MATMUL_SET_MAX;
  for (int i = 0; i < nw; i++) w[i] = out[i].w;
  account_set(prof_of(be), "matmul_set", w, nw, t0);
}
static void prof_rmsnorm(m3_backend *be, const float *x, const m3_tensor *w, float eps, int nrows, int n,
                         float *y) {
  double t0 = start(prof_of(be));
  INNER(be)->rmsnorm(inner_of(be), x, w, eps, nrows, n, y);
  account(prof_of(be), "rmsnorm", NULL, t0);
}
static void prof_rope(m3_backend *be, float *x, const int32_t *pos, int T, int nheads, int hd, int rot,
                      double theta) {
  double t0 = start(prof_of(be));
  INNER(be)->rope(inner_of(be), x, pos, T, nheads, hd, rot, theta);
  account(prof_of(be), "rope", NULL, t0);
}
static void prof_rmsnorm_rope(m3_backend *be, float *x, const m3_tensor *w, float eps, const int32_t *pos,
                              int T, int nheads, int hd, int rot, double theta) {
  double t0 = start(prof_of(be));
  INNER(be)->rmsnorm_rope(inner_of(be), x, w, eps, pos, T, nheads, hd, rot, theta);
  account(prof_of(be), "rmsnorm_rope", NULL, t0);
}
static void prof_swiglu_oai(m3_backend *be, const float *gate, const float *up, size_t n, float alpha,
                            float beta, float limit, float *out) {
  double t0 = start(prof_of(be));
  INNER(be)->swiglu_oai(inner_of(be), gate, up, n, alpha, beta, limit, out);
  account(prof_of(be), "swiglu_oai", NULL, t0);
}
static void prof_add(m3_backend *be, float *x, const float *y, size_t n) {
  double t0 = start(prof_of(be));
  INNER(be)->add(inner_of(be), x, y, n);
  account(prof_of(be), "add", NULL, t0);
}
static void prof_add_rmsnorm(m3_backend *be, float *x, const float *y, const m3_tensor *w, float eps,
                             int nrows, int n, float *out) {
  double t0 = start(prof_of(be));
  INNER(be)->add_rmsnorm(inner_of(be), x, y, w, eps, nrows, n, out);
  account(prof_of(be), "add_rmsnorm", NULL, t0);
}
static m3_status prof_argmax_rows(m3_backend *be, const float *logits, int nrows, int vocab,
                                  int32_t *out_host) {
  double t0 = start(prof_of(be));
  m3_status st = INNER(be)->argmax_rows(inner_of(be), logits, nrows, vocab, out_host);
  account(prof_of(be), "argmax_rows", NULL, t0);
  return st;
}
static void prof_argmax_pairs(m3_backend *be, const float *logits, int nrows, int cols, int first,
                              float *pairs) {
  double t0 = start(prof_of(be));
  INNER(be)->argmax_pairs(inner_of(be), logits, nrows, cols, first, pairs);
  account(prof_of(be), "argmax_pairs", NULL, t0);
}
static m3_status prof_sample_rows(m3_backend *be, const float *logits, int nrows, int vocab,
                                  const m3_row_sampling *rows, int32_t *out_host) {
  double t0 = start(prof_of(be));
  m3_status st = INNER(be)->sample_rows(inner_of(be), logits, nrows, vocab, rows, out_host);
  account(prof_of(be), "sample_rows", NULL, t0);
  return st;
}
static void prof_kv_store(m3_backend *be, const m3_kv_view *kv, const int32_t *pos, int T, const float *k,
                          const float *v, const float *ik) {
  double t0 = start(prof_of(be));
  INNER(be)->kv_store(inner_of(be), kv, pos, T, k, v, ik);
  account(prof_of(be), "kv_store", NULL, t0);
}
static void prof_kv_store_rope(m3_backend *be, const m3_kv_view *kv, const int32_t *pos, int T,
                               const m3_attention_rows *r) {
  double t0 = start(prof_of(be));
  INNER(be)->kv_store_rope(inner_of(be), kv, pos, T, r);
  account(prof_of(be), "kv_store_rope", NULL, t0);
}
static void prof_msa_select(m3_backend *be, const float *iq, int G, const m3_kv_view *kv, const int32_t *pos,
                            int T, const m3_msa_params *p, int32_t *sel) {
  double t0 = start(prof_of(be));
  INNER(be)->msa_select(inner_of(be), iq, G, kv, pos, T, p, sel);
  account(prof_of(be), "msa_select", NULL, t0);
}
static void prof_attention(m3_backend *be, const float *q, int nh, const m3_kv_view *kv, const int32_t *pos,
                           int T, const int32_t *sel, int topk, float *out) {
  double t0 = start(prof_of(be));
  INNER(be)->attention(inner_of(be), q, nh, kv, pos, T, sel, topk, out);
  account(prof_of(be), sel ? "attention (MSA blocks)" : "attention (dense)", NULL, t0);
}
static void prof_moe_route(m3_backend *be, const float *logits, const float *bias, int T, int E, int k,
                           float scaling, int32_t *ids, float *weights) {
  double t0 = start(prof_of(be));
  INNER(be)->moe_route(inner_of(be), logits, bias, T, E, k, scaling, ids, weights);
  account(prof_of(be), "moe_route", NULL, t0);
}
static void prof_moe_experts(m3_backend *be, const m3_moe_experts *ex, const float *h, int T,
                             const int32_t *ids, const float *weights, int k, float *x) {
  double t0 = start(prof_of(be));
  INNER(be)->moe_experts(inner_of(be), ex, h, T, ids, weights, k, x);
  account(prof_of(be), "moe_experts", NULL, t0);
}

static m3_status prof_bind_thread(m3_backend *be) { return INNER(be)->bind_thread(inner_of(be)); }

m3_status m3_backend_profile_create(m3_backend *inner, m3_backend **out) {
  *out = NULL;
  prof_backend *pb = calloc(1, sizeof *pb);
  m3_backend_ops *ops = pb ? calloc(1, sizeof *ops) : NULL;
  void *probe = ops ? inner->ops->alloc(inner, 4) : NULL;
  if (!probe) {
    free(ops);
    free(pb);
    return m3_fail(M3_ERR_NOMEM, "profile: cannot wrap backend %s", inner->ops->name);
  }
  *ops = *inner->ops; /* name, device_memory and kv_fp8 as they are; every op is replaced below */
  ops->vision = NULL;  /* the tower's ops would get the wrapper as their backend: not profiled */
  /* Recorded graphs would run the inner ops unwaited, and get the wrapper as their backend: the
   * model then issues every op directly. */
  ops->graph_begin = NULL;
  ops->graph_end = NULL;
  ops->graph_launch = NULL;
  ops->graph_free = NULL;
  ops->memory_epoch = NULL;
  ops->bind_thread = inner->ops->bind_thread ? prof_bind_thread : NULL;
  ops->destroy = prof_destroy;
  ops->alloc = prof_alloc;
  ops->free = prof_free;
  ops->alloc_host = prof_alloc_host;
  ops->free_host = prof_free_host;
  ops->to_device = prof_to_device;
  ops->to_host = prof_to_host;
  ops->copy = prof_copy;
  ops->zero = prof_zero;
  ops->prepare_tensor = prof_prepare_tensor;
  ops->release_tensor = prof_release_tensor;
  ops->prepare_experts = prof_prepare_experts;
  ops->release_experts = prof_release_experts;
  ops->embed = prof_embed;
  ops->matmul = prof_matmul;
  ops->matmul_set = prof_matmul_set;
  ops->rmsnorm = prof_rmsnorm;
  ops->rope = prof_rope;
  ops->rmsnorm_rope = prof_rmsnorm_rope;
  ops->swiglu_oai = prof_swiglu_oai;
  ops->add = prof_add;
  ops->add_rmsnorm = prof_add_rmsnorm;
  ops->argmax_rows = prof_argmax_rows;
  ops->argmax_pairs = prof_argmax_pairs;
  ops->sample_rows = inner->ops->sample_rows ? prof_sample_rows : NULL;
  ops->kv_store = prof_kv_store;
  ops->kv_store_rope = prof_kv_store_rope;
  ops->msa_select = prof_msa_select;
  ops->attention = prof_attention;
  ops->moe_route = prof_moe_route;
  ops->moe_experts = prof_moe_experts;
  pb->base.ops = ops;
  pb->inner = inner;
  pb->probe = probe;
  *out = &pb->base;
  return M3_OK;
}

static int by_seconds_desc(const void *a, const void *b) {
  double x = ((const prof_row *)a)->seconds, y = ((const prof_row *)b)->seconds;
  return x < y ? 1 : x > y ? -1 : 0;
}

void m3_backend_profile_report(m3_backend *be, const char *title, FILE *f) {
  prof_backend *pb = prof_of(be);
  qsort(pb->rows, (size_t)pb->nrows, sizeof pb->rows[0], by_seconds_desc);
  double total = 0;
  for (int i = 0; i < pb->nrows; i++) total += pb->rows[i].seconds;
  fprintf(f, "profile of %s: %.3f ms in ops, each waited for\n", title, total * 1e3);
  fprintf(f, "  %9s %6s %8s %10s %10s  %s\n", "ms", "share", "calls", "us/call", "host us", "op");
  for (int i = 0; i < pb->nrows; i++) {
    const prof_row *r = &pb->rows[i];
    fprintf(f, "  %9.3f %5.1f%% %8ld %10.1f %10.1f  %s\n", r->seconds * 1e3,
            total > 0 ? 100 * r->seconds / total : 0.0, r->calls, r->seconds / (double)r->calls * 1e6,
            r->host_seconds / (double)r->calls * 1e6, r->key);
  }
  if (pb->dropped) fprintf(f, "  (%ld calls in more than %d distinct rows not shown)\n", pb->dropped, PROF_MAX_ROWS);
  m3_backend_profile_clear(be);
}

void m3_backend_profile_clear(m3_backend *be) {
  prof_of(be)->nrows = 0;
  prof_of(be)->dropped = 0;
}
