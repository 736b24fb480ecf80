/* tp_ranks.c: the multi-GPU harness of test_tp and bench_tp (tp_ranks.h). */
#include "tp_ranks.h"

#include <cuda_runtime_api.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* The rank threads and the one job they run at a time. */
static struct {
  int n;
  tp_rank ranks[TP_MAX_RANKS];
  pthread_t threads[TP_MAX_RANKS];
  pthread_barrier_t barrier;
  pthread_mutex_t lock;
  pthread_cond_t wake, done; /* done waits on CLOCK_MONOTONIC */
  uint64_t generation;       /* bumped for each job */
  int finished, quit;
  tp_job job;
  void *arg;
  m3_nccl_id id;
  m3_p2p_group *p2p;
  /* tp_agree's exchange */
  m3_status status[TP_MAX_RANKS];
  char message[TP_MAX_RANKS][512];
} h = {.lock = PTHREAD_MUTEX_INITIALIZER};

double tp_now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void *rank_thread(void *arg) {
  tp_rank *r = arg;
  uint64_t seen = 0;
  for (;;) {
    pthread_mutex_lock(&h.lock);
    while (h.generation == seen && !h.quit) pthread_cond_wait(&h.wake, &h.lock);
    if (h.generation == seen) { /* quit, with no job left to run */
      pthread_mutex_unlock(&h.lock);
      return NULL;
    }
    seen = h.generation;
    const tp_job job = h.job;
    void *job_arg = h.arg;
    pthread_mutex_unlock(&h.lock);
    job(r, job_arg);
    pthread_mutex_lock(&h.lock);
    h.finished++;
    pthread_cond_signal(&h.done);
    pthread_mutex_unlock(&h.lock);
  }
}

void tp_run(const char *what, int timeout_s, tp_job job, void *arg) {
  struct timespec deadline;
  clock_gettime(CLOCK_MONOTONIC, &deadline);
  deadline.tv_sec += timeout_s;
  pthread_mutex_lock(&h.lock);
  h.job = job;
  h.arg = arg;
  h.finished = 0;
  h.generation++;
  pthread_cond_broadcast(&h.wake);
  while (h.finished < h.n) {
    if (pthread_cond_timedwait(&h.done, &h.lock, &deadline) == ETIMEDOUT && h.finished < h.n) {
      /* A rank blocked in CUDA or NCCL cannot be woken from here: only the exit frees it. */
      printf("FATAL: %s: %d of %d ranks still running after %d s (blocked in a collective a peer "
             "never issued, or slower than that)\n", what, h.n - h.finished, h.n, timeout_s);
      fflush(stdout);
      _exit(1);
    }
  }
  pthread_mutex_unlock(&h.lock);
}

/* ---- set-up ---- */

static int start_failed;

static void report_failure(const tp_rank *r, m3_status st, const char *what) {
  if (st == M3_OK) return;
  printf("FATAL: rank %d: %s: %s\n", r->rank, what, m3_last_error());
  pthread_mutex_lock(&h.lock);
  start_failed = 1;
  pthread_mutex_unlock(&h.lock);
}

static void job_backend(tp_rank *r, void *arg) {
  (void)arg;
  report_failure(r, m3_backend_cuda_create(r->rank, &r->be), "CUDA backend");
}

static void job_comm(tp_rank *r, void *arg) {
  (void)arg;
  report_failure(r, m3_nccl_init(&h.id, r->nranks, r->rank, r->be, &r->comm), "m3_nccl_init");
}

/* Joins the p2p group; the harness's barrier separates the joins from the connects. */
static void job_p2p(tp_rank *r, void *arg) {
  (void)arg;
  if (m3_p2p_join(h.p2p, r->rank, r->be, &r->p2p) != M3_OK) {
    h.status[r->rank] = M3_ERR_IO;
    snprintf(h.message[r->rank], sizeof h.message[r->rank], "%s", m3_last_error());
  }
  pthread_barrier_wait(&h.barrier);
  if (r->p2p && m3_p2p_connect(r->p2p) != M3_OK) {
    h.status[r->rank] = M3_ERR_UNSUPPORTED;
    snprintf(h.message[r->rank], sizeof h.message[r->rank], "%s", m3_last_error());
  }
}

/* Peers read each other's staging: every GPU idle before any rank leaves. */
static void job_leave_p2p(tp_rank *r, void *arg) {
  (void)arg;
  cudaDeviceSynchronize();
  pthread_barrier_wait(&h.barrier);
  m3_p2p_leave(r->p2p);
  r->p2p = NULL;
}

static void job_close(tp_rank *r, void *arg) {
  if (h.p2p) job_leave_p2p(r, arg);
  m3_nccl_destroy(r->comm); /* bounded: aborts a communicator that does not go quiet */
  r->comm = NULL;
  if (r->be) r->be->ops->destroy(r->be);
  r->be = NULL;
}

m3_status tp_start(int n) {
  if (n < 1 || n > TP_MAX_RANKS) return m3_fail(M3_ERR_ARG, "tp_start: %d ranks", n);
  pthread_condattr_t attr;
  pthread_condattr_init(&attr);
  pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
  pthread_cond_init(&h.done, &attr);
  pthread_condattr_destroy(&attr);
  pthread_cond_init(&h.wake, NULL);
  pthread_barrier_init(&h.barrier, NULL, (unsigned)n);
  h.n = 0;
  h.quit = start_failed = 0;
  for (int i = 0; i < n; i++) {
    h.ranks[i] = (tp_rank){.rank = i, .nranks = n};
    if (pthread_create(&h.threads[i], NULL, rank_thread, &h.ranks[i]) != 0) {
      tp_stop();
      return m3_fail(M3_ERR_NOMEM, "tp_start: thread of rank %d", i);
    }
    h.n++;
  }
  /* The init blocks until every rank has called it: only once every backend exists. */
  tp_run("CUDA backends", 60, job_backend, NULL);
  m3_status st = start_failed ? m3_fail(M3_ERR_UNSUPPORTED, "tp_start: a CUDA backend failed")
                              : M3_OK;
  if (st == M3_OK && n > 1 && (st = m3_nccl_new_id(&h.id)) == M3_OK) {
    tp_run("NCCL init", 120, job_comm, NULL);
    if (start_failed) st = m3_fail(M3_ERR_IO, "tp_start: the NCCL init failed");
  }
  if (st == M3_OK && n > 1 && m3_p2p_group_create(n, &h.p2p) == M3_OK) {
    for (int i = 0; i < n; i++) h.status[i] = M3_OK;
    tp_run("p2p set-up", 60, job_p2p, NULL);
    for (int i = 0; i < n && h.p2p; i++)
      if (h.status[i] != M3_OK) { /* no peer access: NCCL alone */
        printf("p2p all-reduce unavailable (rank %d: %s)\n", i, h.message[i]);
        tp_run("p2p leave", 60, job_leave_p2p, NULL);
        m3_p2p_group_free(h.p2p);
        h.p2p = NULL;
      }
  }
  if (st != M3_OK) tp_stop();
  return st;
}

void tp_stop(void) {
  if (h.n == 0) return;
  /* Bounded like any job: a destroy that waits on a dead peer would otherwise hang here. */
  tp_run("close the communicators and backends", 60, job_close, NULL);
  pthread_mutex_lock(&h.lock);
  h.quit = 1;
  pthread_cond_broadcast(&h.wake);
  pthread_mutex_unlock(&h.lock);
  for (int i = 0; i < h.n; i++) pthread_join(h.threads[i], NULL);
  m3_p2p_group_free(h.p2p);
  h.p2p = NULL;
  pthread_barrier_destroy(&h.barrier);
  h.n = 0;
}

/* ---- inside a job ---- */

int tp_layout_ranks(const tp_layout *L) { return L->tp * L->ep; }

int tp_in_layout(const tp_rank *r, const tp_layout *L) { return r->rank < tp_layout_ranks(L); }

/* A layout the harness runs: one rank, or every rank with TP groups of one or of all. */
static m3_status check_layout(const tp_rank *r, const tp_layout *L) {
  const int world = tp_layout_ranks(L);
  if (L->tp < 1 || L->ep < 1 || (world > 1 && world != r->nranks))
    return m3_fail(M3_ERR_ARG, "layout %s: %d x %d ranks on a harness of %d", L->name, L->tp,
                   L->ep, r->nranks);
  if (L->tp > 1 && L->tp != world)
    return m3_fail(M3_ERR_ARG, "layout %s: TP groups of %d in a world of %d need communicators "
                   "of their own", L->name, L->tp, world);
  return M3_OK;
}

void tp_sync(const tp_layout *L) {
  if (tp_layout_ranks(L) > 1) pthread_barrier_wait(&h.barrier);
}

int tp_agree(const tp_rank *r, const tp_layout *L, m3_status st, tp_failure *why) {
  if (tp_layout_ranks(L) == 1) {
    if (st != M3_OK && why) {
      *why = (tp_failure){.rank = r->rank, .status = st};
      snprintf(why->message, sizeof why->message, "%s", m3_last_error());
    }
    return st == M3_OK;
  }
  h.status[r->rank] = st;
  snprintf(h.message[r->rank], sizeof h.message[r->rank], "%s", st == M3_OK ? "" : m3_last_error());
  tp_sync(L);
  int bad = -1;
  for (int i = 0; i < tp_layout_ranks(L) && bad < 0; i++)
    if (h.status[i] != M3_OK) bad = i;
  if (bad >= 0 && why) {
    *why = (tp_failure){.rank = bad, .status = h.status[bad]};
    snprintf(why->message, sizeof why->message, "%s", h.message[bad]);
  }
  tp_sync(L); /* nobody writes the next exchange before every rank has read this one */
  return bad < 0;
}

void tp_must(const tp_rank *r, m3_status st, const char *what) {
  if (st == M3_OK) return;
  printf("FATAL: rank %d: %s: %s\n", r->rank, what, m3_last_error());
  fflush(stdout);
  m3_nccl_abort(r->comm); /* this rank's own, from its own thread */
  _exit(1);
}

m3_status tp_load(const tp_rank *r, const tp_layout *L, const char *dir, m3_model **out) {
  *out = NULL;
  m3_status st = check_layout(r, L);
  if (st != M3_OK) return st;
  const m3_model_load_options o = {.tp_size = L->tp, .tp_rank = r->rank % L->tp,
                                   .ep_size = L->ep, .ep_rank = r->rank / L->tp};
  return m3_model_load_with(dir, r->be, &o, out);
}

static m3_status all_reduce_hook(void *user, m3_reduce_group group, float *buf, size_t n) {
  tp_hook *k = user;
  if (group != M3_REDUCE_TP && group != M3_REDUCE_WORLD)
    return m3_fail(M3_ERR_ARG, "all-reduce hook: unknown group %d", (int)group);
  k->calls[group]++;
  k->floats[group] += n;
  /* A group of one rank: the sum is the rank's own buffer. */
  if (!k->reduce || !k->group[group]) return M3_OK;
  if (k->p2p && m3_p2p_fits_sum(k->p2p, n)) return m3_p2p_all_reduce_sum(k->p2p, buf, n);
  return m3_nccl_all_reduce_sum(k->group[group], buf, n);
}

/* The p2p group spans every rank: it serves a group of more than one rank (the world). */
static m3_status add_norm_hook(void *user, m3_reduce_group group, const float *part, float *x,
                               const m3_tensor *norm, float eps, int T, int H, float *out,
                               int *done) {
  tp_hook *k = user;
  *done = k->p2p && k->group[group] && m3_p2p_fits_add_norm(k->p2p, T, H);
  if (!*done) return M3_OK;
  k->calls[group]++;
  k->floats[group] += (uint64_t)T * (uint64_t)H;
  return m3_p2p_add_norm(k->p2p, part, x, norm, eps, T, H, out);
}

m3_status tp_attach(tp_rank *r, const tp_layout *L, m3_model *m, int reduce, unsigned flags) {
  m3_status st = check_layout(r, L);
  if (st != M3_OK) return st;
  const int world = tp_layout_ranks(L);
  r->hook = (tp_hook){.reduce = reduce};
  r->hook.group[M3_REDUCE_TP] = L->tp > 1 ? r->comm : NULL;
  r->hook.group[M3_REDUCE_WORLD] = world > 1 ? r->comm : NULL;
  m3_model_set_reduce_add_norm(m, NULL);
  return m3_model_set_all_reduce(m, all_reduce_hook, &r->hook, flags);
}

m3_status tp_attach_p2p(tp_rank *r, const tp_layout *L, m3_model *m, unsigned flags) {
  m3_status st = tp_attach(r, L, m, 1, flags);
  if (st != M3_OK) return st;
  if (!r->p2p)
    return m3_fail(M3_ERR_UNSUPPORTED, "rank %d: no p2p all-reduce (no peer access)", r->rank);
  r->hook.p2p = tp_layout_ranks(L) > 1 ? r->p2p : NULL;
  m3_model_set_reduce_add_norm(m, add_norm_hook);
  return M3_OK;
}

m3_status tp_wait(tp_rank *r) { return r->comm ? m3_nccl_wait(r->comm, TP_WAIT_MS) : M3_OK; }

/* ---- sequences ---- */

void tp_batch_reset(tp_batch *b) {
  for (int i = 0; b->seqs && i < b->n; i++) m3_kv_seq_release(b->cache, &b->seqs[i]);
}

void tp_batch_close(tp_batch *b) {
  if (b->cache) {
    tp_batch_reset(b);
    m3_kv_cache_free(b->cache);
  }
  free(b->seqs);
  free(b->views);
  free(b->segs);
  free(b->pos);
  *b = (tp_batch){0};
}

m3_status tp_batch_open(m3_model *m, int n, int tokens_each, int max_T, tp_batch *b) {
  const m3_config *c = m3_model_config(m);
  *b = (tp_batch){.m = m, .n = n, .max_T = max_T};
  b->seqs = calloc((size_t)n, sizeof *b->seqs);
  b->views = calloc((size_t)n * (size_t)c->num_layers, sizeof *b->views);
  b->segs = calloc((size_t)n, sizeof *b->segs);
  b->pos = calloc((size_t)n * (size_t)max_T, sizeof *b->pos);
  if (!b->seqs || !b->views || !b->segs || !b->pos) {
    tp_batch_close(b);
    return m3_fail(M3_ERR_NOMEM, "tp_batch: %d sequences of %d tokens", n, max_T);
  }
  for (int i = 0; i < n; i++) m3_kv_seq_init(&b->seqs[i]);
  /* Whole pages for each sequence: n times one sequence's budget. */
  const size_t budget = (size_t)n * m3_kv_bytes_for_tokens(c, M3_KV_F32, tokens_each);
  m3_status st = m3_kv_cache_create(c, m3_model_backend(m), M3_KV_F32, budget, &b->cache);
  if (st != M3_OK) tp_batch_close(b);
  return st;
}

m3_status tp_batch_forward(tp_batch *b, const int32_t *ids, int T, int n_logits, float *logits,
                           int32_t *greedy) {
  if (T < 1 || T > b->max_T)
    return m3_fail(M3_ERR_ARG, "tp_batch: %d tokens per sequence, room for %d", T, b->max_T);
  const int L = m3_model_config(b->m)->num_layers;
  for (int i = 0; i < b->n; i++) {
    m3_kv_seq *s = &b->seqs[i];
    const int first = s->num_tokens;
    m3_status st = m3_kv_seq_extend(b->cache, s, T);
    if (st != M3_OK) return st;
    int32_t *pos = b->pos + (size_t)i * b->max_T;
    for (int t = 0; t < T; t++) pos[t] = first + t;
    m3_kv_view *views = b->views + (size_t)i * L;
    m3_kv_seq_views(b->cache, s, views);
    b->segs[i] = (m3_model_seq){.kv = views, .ids = ids + (size_t)i * T, .pos = pos, .T = T,
                                .n_logits = n_logits};
  }
  if (greedy) return m3_model_forward_batch_argmax(b->m, b->segs, b->n, logits, greedy, NULL);
  return m3_model_forward_batch(b->m, b->segs, b->n, n_logits ? logits : NULL);
}

int tp_argmax(const float *row, int n) {
  int best = 0;
  for (int i = 1; i < n; i++)
    if (row[i] > row[best]) best = i;
  return best;
}

m3_status tp_greedy(m3_model *m, const int32_t *prompt, int P, int steps, float *logits,
                    int32_t *tokens) {
  const int V = m3_model_config(m)->vocab_size;
  tp_batch b;
  m3_status st = tp_batch_open(m, 1, P + steps, P, &b);
  if (st != M3_OK) return st;
  st = tp_batch_forward(&b, prompt, P, P, logits, NULL);
  int32_t next = st == M3_OK ? tp_argmax(logits + (size_t)(P - 1) * V, V) : 0;
  for (int i = 0; i < steps && st == M3_OK; i++) {
    float *row = logits + (size_t)(P + i) * V;
    tokens[i] = next;
    st = tp_batch_forward(&b, &next, 1, 1, row, NULL);
    next = tp_argmax(row, V);
  }
  tp_batch_close(&b);
  return st;
}
