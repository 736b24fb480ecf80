/* ranks.c: the ranks of one node, their jobs and collectives (ranks.h says what each holds and how
 * a step runs; nodes.c links several nodes). */
#include "engine/ranks.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/parallel.h"
#include "engine/ranks_internal.h"
#include "io/config.h"

void m3_ranks_layout(const m3_engine_options *o, int *tp, int *ep) {
  *tp = o->tp > 1 ? o->tp : 1;
  *ep = o->ep > 1 ? o->ep : 1;
}

int m3_ranks_threads(int threads, int world) {
  long cores = threads > 0 ? threads : sysconf(_SC_NPROCESSORS_ONLN);
  long each = cores > 0 ? cores / world : 1;
  return each > 0 ? (int)each : 1;
}

/* "cuda" -> 0, "cuda:K" -> K; -1 for "cpu" or anything else (the backend factory names it). */
static int first_gpu(const char *device) {
  if (strncmp(device, "cuda", 4) != 0) return -1;
  if (device[4] == '\0') return 0;
  if (device[4] != ':') return -1;
  char *end;
  errno = 0;
  long k = strtol(device + 5, &end, 10);
  return end != device + 5 && *end == '\0' && errno == 0 && k >= 0 && k <= 1024 ? (int)k : -1;
}

/* The node layout (ranks.h m3_ranks_check). */
static m3_status check_nodes(const m3_engine_options *o, int tp, int ep) {
  const int nnodes = o->nnodes > 1 ? o->nnodes : 1;
  if (nnodes == 1) return M3_OK;
  const char *device = o->device ? o->device : "cpu";
  if (o->node_rank < 0 || o->node_rank >= nnodes)
    return m3_fail(M3_ERR_ARG, "--node-rank %d: expected 0..%d (--nnodes %d)", o->node_rank,
                   nnodes - 1, nnodes);
  if (!o->master_addr || !o->master_addr[0])
    return m3_fail(M3_ERR_ARG, "--nnodes %d: needs --master-addr HOST[:PORT]", nnodes);
  if ((tp * ep) % nnodes != 0)
    return m3_fail(M3_ERR_ARG, "--nnodes %d does not divide the %d ranks of --tp %d x --ep %d "
                   "(each node hosts the same number of ranks)", nnodes, tp * ep, tp, ep);
  if (first_gpu(device) < 0)
    return m3_fail(M3_ERR_ARG, "--nnodes %d needs --device cuda: the CPU ranks (--device %s) sum "
                   "on the host of one process", nnodes, device);
#ifndef M3_HAVE_NCCL
  return m3_fail(M3_ERR_UNSUPPORTED, "--nnodes %d: this build has no NCCL, which several nodes "
                 "need (configure with M3_CUDA=ON and M3_NCCL_ROOT where NCCL is installed)",
                 nnodes);
#else
  return M3_OK;
#endif
}

/* Whether the ranks try the peer-to-peer all-reduce (connect_p2p): M3_P2P=1 or 0 turns it on or
 * off, P2P_BY_DEFAULT otherwise. On: its calls take about NCCL's time (2 x H200: 10 us for one
 * token's row), but they let every rank record its decode steps as CUDA graphs, which NCCL's
 * capture does not (TP2 decode 5-7% faster, bench/RESULTS.md). It spans the world, so a layout
 * that sums over TP subgroups (tp and ep both above 1) takes NCCL, and peer access joins the GPUs
 * of one process, so several nodes do too. */
enum { P2P_BY_DEFAULT = 1 };

static int p2p_wanted(int tp, int ep, int nnodes) {
#ifdef M3_HAVE_NCCL
  const char *env = getenv("M3_P2P");
  const int on = env && env[0] ? strcmp(env, "0") != 0 : P2P_BY_DEFAULT;
  return on && nnodes == 1 && (tp == 1 || ep == 1) && tp * ep <= M3_P2P_MAX_RANKS;
#else
  (void)tp, (void)ep, (void)nnodes;
  return 0;
#endif
}

void m3_ranks_before_backends(const m3_engine_options *o) {
  int tp, ep;
  m3_ranks_layout(o, &tp, &ep);
  if (tp * ep > 1 && first_gpu(o->device ? o->device : "cpu") >= 0 &&
      p2p_wanted(tp, ep, o->nnodes > 1 ? o->nnodes : 1))
    setenv("CUDA_MODULE_LOADING", "EAGER", 0);
}

m3_status m3_ranks_check(const char *model_dir, const m3_engine_options *o) {
  int tp, ep;
  m3_ranks_layout(o, &tp, &ep);
  m3_status nodes = check_nodes(o, tp, ep);
  if (nodes != M3_OK) return nodes;
  if (o->speculative && o->speculative[0])
    return m3_fail(M3_ERR_ARG, "--speculative %s with --tp %d --ep %d: speculative "
                   "decoding does not run over several ranks yet", o->speculative, tp, ep);
#if defined(M3_HAVE_CUDA) && !defined(M3_HAVE_NCCL)
  if (first_gpu(o->device ? o->device : "cpu") >= 0)
    return m3_fail(M3_ERR_UNSUPPORTED, "--tp %d --ep %d on %s: this build has no NCCL, which "
                   "several GPUs need (configure with M3_NCCL_ROOT where NCCL is installed)", tp,
                   ep, o->device);
#endif
  char path[4200];
  if ((size_t)snprintf(path, sizeof path, "%s/config.json", model_dir) >= sizeof path)
    return m3_fail(M3_ERR_ARG, "model folder path too long: %s", model_dir);
  m3_config cfg;
  m3_status st = m3_config_load(path, &cfg);
  if (st != M3_OK) return st;
  m3_plan *plan = malloc(sizeof *plan);
  st = plan ? m3_parallel_plan(&cfg, tp, ep, plan) : m3_fail(M3_ERR_NOMEM, "ranks: out of memory");
  free(plan);
  m3_config_free(&cfg);
  return st;
}

/* ---- the host all-reduce ---- */

/* 1 when every member arrived, 0 when the group was aborted first (abortable only; otherwise it
 * waits for every member whatever happens). An abortable barrier is passed by all members or by
 * none: the last to arrive either finds the group aborted and is not counted, or advances the
 * phase that releases all the others. */
static int group_barrier(host_group *g, int abortable) {
  pthread_mutex_lock(&g->mu);
  int ok = !(abortable && g->aborted);
  if (ok) {
    const uint64_t phase = g->phase;
    if (++g->arrived == g->size) {
      g->arrived = 0;
      g->phase++;
      pthread_cond_broadcast(&g->cv);
    } else {
      while (g->phase == phase && !(abortable && g->aborted)) pthread_cond_wait(&g->cv, &g->mu);
      ok = g->phase != phase;
    }
  }
  pthread_mutex_unlock(&g->mu);
  return ok;
}

static void group_abort(host_group *g) {
  pthread_mutex_lock(&g->mu);
  g->aborted = 1;
  pthread_cond_broadcast(&g->cv);
  pthread_mutex_unlock(&g->mu);
}

/* After a step, every rank idle: ready for the next. */
static void group_reset(host_group *g) {
  pthread_mutex_lock(&g->mu);
  g->aborted = 0;
  g->arrived = 0;
  pthread_mutex_unlock(&g->mu);
}

static m3_status host_all_reduce(void *user, m3_reduce_group group, float *buf, size_t n) {
  rank *k = user;
  host_group *g = group == M3_REDUCE_TP ? k->tp_group : k->world_group;
  if (g->size == 1) return M3_OK;
  const int me = group == M3_REDUCE_TP ? k->tp_rank : k->index;
  g->bufs[me] = buf;
  if (!group_barrier(g, 1)) return m3_fail(M3_ERR_IO, "all-reduce: another rank failed");
  const size_t lo = n * (size_t)me / (size_t)g->size, hi = n * (size_t)(me + 1) / (size_t)g->size;
  for (size_t i = lo; i < hi; i++) {
    float sum = 0.0f;
    for (int m = 0; m < g->size; m++) sum += g->bufs[m][i];
    for (int m = 0; m < g->size; m++) g->bufs[m][i] = sum;
  }
  /* Not abortable: every member passed the first barrier and writes slices of the others'
   * buffers, so none may return to its own buffer before all are done, even when another rank
   * failed meanwhile (ThreadSanitizer caught a rank back in its add_rmsnorm while a peer still
   * summed into its rows). All of them arrive: nothing in the loop can fail. */
  group_barrier(g, 0);
  return M3_OK;
}

#ifdef M3_HAVE_NCCL
/* The peer-to-peer all-reduce of group, or NULL: it spans the world, so it serves the TP group
 * only when that is the world (ep 1; set-up refuses tp > 1 with ep > 1). */
static m3_p2p *p2p_of(const rank *k, m3_reduce_group group) {
  return group == M3_REDUCE_WORLD || k->all->ep == 1 ? k->p2p : NULL;
}

static m3_status nccl_all_reduce(void *user, m3_reduce_group group, float *buf, size_t n) {
  rank *k = user;
  const m3_ranks *r = k->all;
  m3_p2p *p = p2p_of(k, group);
  if (p && m3_p2p_fits_sum(p, n)) return m3_p2p_all_reduce_sum(p, buf, n);
  m3_nccl *c = group == M3_REDUCE_WORLD ? k->world_comm
               : r->tp == 1             ? NULL
               : r->ep == 1             ? k->world_comm
                                        : k->tp_comm;
  return c ? m3_nccl_all_reduce_sum(c, buf, n) : M3_OK;
}

/* The model's fused all-reduce + residual add + norm, where the peer-to-peer all-reduce takes
 * the size; elsewhere the model runs nccl_all_reduce and add_rmsnorm. */
static m3_status p2p_add_norm(void *user, m3_reduce_group group, const float *part, float *x,
                              const m3_tensor *norm, float eps, int T, int H, float *h,
                              int *done) {
  m3_p2p *p = p2p_of(user, group);
  *done = p && m3_p2p_fits_add_norm(p, T, H);
  return *done ? m3_p2p_add_norm(p, part, x, norm, eps, T, H, h) : M3_OK;
}
#endif

/* ---- jobs ---- */

/* The thread watching the other nodes' links looks again (a failure, the job's end). */
static void wake_watcher(m3_ranks *r) {
  if (r->wake[1] >= 0) (void)!write(r->wake[1], "", 1); /* full: a wake-up is pending anyway */
}

/* Records the job's first failure (`why`, naming the rank or node) and releases the peers that
 * may wait for it in a collective: on the host, the barriers; with NCCL, every local rank's
 * communicators are aborted (a rank that failed before issuing its part of an all-reduce would
 * otherwise leave the others' streams, and rank 0's wait for its logits, blocked forever), and
 * the watcher of the other nodes is woken to have them abort theirs. The communicators are not
 * remade: later steps fail, naming this failure. */
void m3_ranks_fail_step(m3_ranks *r, m3_status st, const char *why) {
  pthread_mutex_lock(&r->mu);
  const int first = r->failed == M3_OK;
  if (first) {
    r->failed = st;
    snprintf(r->failure, sizeof r->failure, "%s", why);
  }
#ifdef M3_HAVE_NCCL
  /* (Steps only: at set-up a communicator may be half made, and NCCL's init has no abort.) */
  const int abort_comms = first && r->on_device && r->kind == JOB_FORWARD && !r->aborted[0];
  if (abort_comms) snprintf(r->aborted, sizeof r->aborted, "%s", r->failure);
#endif
  pthread_mutex_unlock(&r->mu);
  if (r->groups)
    for (int g = 0; g < 1 + r->ep; g++) group_abort(&r->groups[g]);
#ifdef M3_HAVE_NCCL
  /* The peer-to-peer calls first: a peer spinning in one this rank never made holds its GPU busy,
   * and tearing a communicator down may wait for that GPU. */
  if (abort_comms) m3_p2p_abort(r->p2p);
  for (int i = 0; abort_comms && i < r->local; i++) {
    m3_nccl_abort(r->ranks[i].world_comm);
    m3_nccl_abort(r->ranks[i].tp_comm);
  }
#endif
  wake_watcher(r);
}

/* fail_step naming the rank, with this thread's message. */
static void note_failure(m3_ranks *r, int index, m3_status st) {
  char why[600];
  snprintf(why, sizeof why, "rank %d: %s", index, m3_last_error());
  m3_ranks_fail_step(r, st, why);
}

/* A worker finished the job. */
void m3_ranks_job_done(m3_ranks *r) {
  pthread_mutex_lock(&r->mu);
  const int last = --r->pending == 0;
  if (last) pthread_cond_signal(&r->done);
  pthread_mutex_unlock(&r->mu);
  if (last) wake_watcher(r);
}

static void finish_job(rank *k, m3_status st) {
  if (st != M3_OK) note_failure(k->all, k->index, st);
  m3_ranks_job_done(k->all);
}

/* A worker waits for the job after the one it took last (*seen). */
job_kind m3_ranks_take_job(m3_ranks *r, uint64_t *seen) {
  pthread_mutex_lock(&r->mu);
  while (r->generation == *seen) pthread_cond_wait(&r->go, &r->mu);
  *seen = r->generation;
  const job_kind kind = r->kind;
  pthread_mutex_unlock(&r->mu);
  return kind;
}

/* Hands the workers a job (its data written before). */
void m3_ranks_post(m3_ranks *r, job_kind kind) {
  pthread_mutex_lock(&r->mu);
  r->kind = kind;
  r->generation++;
  r->pending = r->workers;
  r->failed = M3_OK;
  pthread_cond_broadcast(&r->go);
  pthread_mutex_unlock(&r->mu);
}

/* Waits until the workers finished the job; its first failure. */
m3_status m3_ranks_wait_done(m3_ranks *r) {
  pthread_mutex_lock(&r->mu);
  while (r->pending > 0) pthread_cond_wait(&r->done, &r->mu);
  const m3_status st = r->failed;
  pthread_mutex_unlock(&r->mu);
  return st;
}

/* wait_done with the failure's message on this thread. */
m3_status m3_ranks_wait(m3_ranks *r) {
  const m3_status st = m3_ranks_wait_done(r);
  return st == M3_OK ? M3_OK : m3_fail(st, "%s", r->failure);
}

static m3_status load_rank(rank *k) {
  m3_ranks *r = k->all;
  char device[32] = "cpu";
  if (r->on_device) snprintf(device, sizeof device, "cuda:%d", r->first_gpu + k->local);
  m3_status st = m3_backend_create(device, r->threads, &k->be);
  if (st != M3_OK)
    return m3_fail_context(st, "--tp %d --ep %d: rank %d of %d takes %s (GPUs %d..%d)", r->tp,
                           r->ep, k->index, r->world, device, r->first_gpu,
                           r->first_gpu + r->local - 1);
  m3_model_load_options load = r->load;
  load.tp_size = r->tp;
  load.tp_rank = k->tp_rank;
  load.ep_size = r->ep;
  load.ep_rank = k->ep_rank;
  if ((st = m3_model_load_with(r->dir, k->be, &load, &k->model)) != M3_OK) return st;
  m3_model_prefault(k->model, NULL, NULL);
  return M3_OK;
}

/* The collectives' set-up of a rank (its own thread, or rank 0's on the engine thread). */
static m3_status connect_rank(rank *k) {
#ifdef M3_HAVE_NCCL
  m3_ranks *r = k->all;
  if (r->on_device) {
    m3_status st = m3_nccl_init(&r->world_id, r->world, k->index, k->be, &k->world_comm);
    if (st == M3_OK && r->tp > 1 && r->ep > 1)
      st = m3_nccl_init(&r->tp_ids[k->ep_rank], r->tp, k->tp_rank, k->be, &k->tp_comm);
    if (st != M3_OK) return st;
    /* Not M3_ALL_REDUCE_CAPTURABLE while NCCL does the all-reduces (connect_p2p says why); the
     * peer-to-peer set-up that follows may make it so. */
    return m3_model_set_all_reduce(k->model, nccl_all_reduce, k, 0);
  }
#endif
  return m3_model_set_all_reduce(k->model, host_all_reduce, k, 0);
}

static m3_status setup_rank(rank *k) {
  m3_ranks *r = k->all;
  m3_status st = connect_rank(k);
  if (st != M3_OK) return st;
  return m3_kv_cache_create_pages(m3_model_config(k->model), k->be, r->kv_dtype, r->pages,
                                  &k->store);
}

/* Room for n batch entries' views and sequences. */
static m3_status grow_entries(rank *k, int n) {
  if (n <= k->cap_seqs) return M3_OK;
  const size_t L = (size_t)m3_model_config(k->model)->num_layers;
  m3_kv_view *views = realloc(k->views, (size_t)n * L * sizeof *views);
  if (views) k->views = views;
  m3_model_seq *seqs = realloc(k->seqs, (size_t)n * sizeof *seqs);
  if (seqs) k->seqs = seqs;
  if (!views || !seqs) return m3_fail(M3_ERR_NOMEM, "rank %d: views of %d sequences", k->index, n);
  k->cap_seqs = n;
  return M3_OK;
}

/* The step's block tables where this rank's ops read them: the host copy, or uploaded. */
static m3_status rank_tables(rank *k, const int32_t **out) {
  m3_ranks *r = k->all;
  *out = r->tables;
  if (!k->be->ops->device_memory) return M3_OK;
  const size_t total = r->n ? r->table_at[r->n - 1] + (size_t)r->table_blocks[r->n - 1] : 0;
  if (total > k->cap_tables) {
    int32_t *dev = k->be->ops->alloc(k->be, total * 2 * sizeof *dev);
    if (!dev) return m3_fail(M3_ERR_NOMEM, "rank %d: block tables of %zu entries", k->index, total);
    if (k->tables_dev) k->be->ops->free(k->be, k->tables_dev);
    k->tables_dev = dev;
    k->cap_tables = total * 2;
  }
  *out = k->tables_dev;
  return total ? k->be->ops->to_device(k->be, k->tables_dev, r->tables, total * sizeof(int32_t))
               : M3_OK;
}

/* M3_RANKS_FAIL=R:F makes world rank R's F-th forward (from 1; R >= 1, rank 0's forward being the
 * engine's own) fail before it issues anything, while its peers go on into the step and block in
 * its first all-reduce, which R never joins: how the checks of a failing rank (peers released,
 * not hung; the step failing by R's name; NCCL and p2p aborted) inject one, in CI on CPU ranks
 * and on GPUs. */
static void inject_failure(m3_ranks *r, const char *spec) {
  int rank_index, forward;
  char tail;
  if (spec && sscanf(spec, "%d:%d%c", &rank_index, &forward, &tail) == 2 && rank_index >= 0 &&
      forward > 0) {
    r->fail_rank = rank_index;
    r->fail_forward = forward;
  }
}

static m3_status forward_rank(rank *k) {
  m3_ranks *r = k->all;
  if (r->fail_forward && k->index == r->fail_rank && ++k->forwards == r->fail_forward)
    return m3_fail(M3_ERR_IO, "failure injected at its forward %d (M3_RANKS_FAIL)", k->forwards);
  m3_status st = M3_OK;
  for (int i = 0; i < r->n_copies && st == M3_OK; i++)
    st = m3_kv_cache_copy_page(k->store, r->copies[i].from, r->copies[i].to);
  const int32_t *tables = NULL;
  if (st == M3_OK) st = grow_entries(k, r->n);
  if (st == M3_OK) st = rank_tables(k, &tables);
  if (st != M3_OK) return st;
  const int L = m3_model_config(k->model)->num_layers;
  for (int i = 0; i < r->n; i++) {
    m3_kv_view *views = k->views + (size_t)i * L;
    m3_kv_cache_table_views(k->store, tables + r->table_at[i], r->table_blocks[i], views);
    k->seqs[i] = r->batch[i];
    k->seqs[i].kv = views;
    /* A split head needs every rank (model.h); a replicated one only rank 0. */
    if (m3_model_head_slices(k->model) == 1) k->seqs[i].n_logits = 0;
    k->seqs[i].capture = NULL;
  }
  /* Rank 0's variant: a split head's all-reduce moves candidates or logits (model.h). */
  return r->argmax ? m3_model_forward_batch_argmax(k->model, k->seqs, r->n, NULL, NULL, NULL)
                   : m3_model_forward_batch(k->model, k->seqs, r->n, NULL);
}

/* Everything of a rank's backend is freed on its thread, as it was made. */
static void teardown_rank(rank *k) {
  if (k->tables_dev) k->be->ops->free(k->be, k->tables_dev);
  m3_kv_cache_free(k->store);
#ifdef M3_HAVE_NCCL
  m3_nccl_destroy(k->tp_comm);
  m3_nccl_destroy(k->world_comm);
  m3_p2p_leave(k->p2p);
#endif
  m3_model_free(k->model);
  if (k->be) k->be->ops->destroy(k->be);
  free(k->views);
  free(k->seqs);
}

#ifdef M3_HAVE_NCCL
/* The peer-to-peer all-reduce's set-up on a rank (its own thread, or rank 0's on the engine
 * thread), in three jobs the engine thread separates with waits: every rank joins (allocates
 * and publishes its buffers), then connects (peer access to the others' GPUs) and takes the
 * hooks, or, when any rank failed either, leaves with the hooks back on NCCL alone. */
static m3_status p2p_job(rank *k, job_kind kind) {
  m3_ranks *r = k->all;
  if (kind == JOB_P2P_JOIN) return m3_p2p_join(r->p2p, k->index, k->be, &k->p2p);
  if (kind == JOB_P2P_CONNECT) {
    m3_status st = k->p2p ? m3_p2p_connect(k->p2p) : M3_OK;
    if (st != M3_OK) return st;
    m3_model_set_reduce_add_norm(k->model, p2p_add_norm);
    return m3_model_set_all_reduce(k->model, nccl_all_reduce, k,
                                   r->p2p_graphs ? M3_ALL_REDUCE_CAPTURABLE : 0);
  }
  m3_model_set_reduce_add_norm(k->model, NULL);
  m3_p2p_leave(k->p2p);
  k->p2p = NULL;
  return m3_model_set_all_reduce(k->model, nccl_all_reduce, k, 0);
}
#endif

static m3_status run_job(rank *k, job_kind kind) {
  switch (kind) {
  case JOB_SETUP: return setup_rank(k);
  case JOB_FORWARD: return forward_rank(k);
  case JOB_FINISH: return m3_model_finish(k->model);
#ifdef M3_HAVE_NCCL
  case JOB_P2P_JOIN:
  case JOB_P2P_CONNECT:
  case JOB_P2P_LEAVE: return p2p_job(k, kind);
#endif
  default: return m3_fail(M3_ERR_ARG, "rank %d: job %d out of place", k->index, (int)kind);
  }
}

static void *rank_main(void *arg) {
  rank *k = arg;
  finish_job(k, load_rank(k));
  for (job_kind kind; (kind = m3_ranks_take_job(k->all, &k->seen)) != JOB_QUIT;) finish_job(k, run_job(k, kind));
  teardown_rank(k);
  return NULL;
}

/* ---- the engine thread's side ---- */

m3_status m3_ranks_start(const char *model_dir, const m3_engine_options *o,
                         const m3_model_load_options *load, m3_ranks **out) {
  *out = NULL;
  m3_ranks *r = calloc(1, sizeof *r);
  if (!r) return m3_fail(M3_ERR_NOMEM, "ranks: out of memory");
  m3_ranks_layout(o, &r->tp, &r->ep);
  r->world = r->tp * r->ep;
  snprintf(r->dir, sizeof r->dir, "%s", model_dir);
  r->load = *load;
  r->load.progress = NULL; /* rank 0 reports the load; the others would interleave */
  r->first_gpu = first_gpu(o->device ? o->device : "cpu");
  r->on_device = r->first_gpu >= 0;
  r->threads = m3_ranks_threads(o->threads, r->world);
  r->nnodes = o->nnodes > 1 ? o->nnodes : 1;
  r->node_rank = r->nnodes > 1 ? o->node_rank : 0;
  r->local = r->world / r->nnodes;
  r->first_thread = r->node_rank == 0 ? 1 : 0;
  r->workers = r->local - r->first_thread;
  r->master_addr = o->master_addr;
  r->quantize_mxfp8 = load->quantize_mxfp8;
  r->wake[0] = r->wake[1] = -1;
  inject_failure(r, getenv("M3_RANKS_FAIL"));
  pthread_mutex_init(&r->mu, NULL);
  pthread_cond_init(&r->go, NULL);
  pthread_cond_init(&r->done, NULL);
  for (int i = 0; i < r->local; i++) {
    rank *k = &r->ranks[i];
    const int g = r->node_rank * r->local + i;
    *k = (rank){.all = r, .index = g, .local = i, .tp_rank = g % r->tp, .ep_rank = g / r->tp};
  }
  *out = r;
  m3_status st = r->nnodes > 1 ? m3_nodes_open(r) : M3_OK;
  if (st != M3_OK) return st;
  /* The load is the job every rank starts with. */
  r->kind = JOB_LOAD;
  r->pending = r->workers;
  for (int i = r->first_thread; i < r->local; i++) {
    rank *k = &r->ranks[i];
    const int rc = pthread_create(&k->thread, NULL, rank_main, k);
    if (rc != 0) {
      pthread_mutex_lock(&r->mu);
      r->pending -= r->local - i; /* the ranks never started finish nothing */
      pthread_mutex_unlock(&r->mu);
      return m3_fail(M3_ERR_IO, "ranks: cannot start the thread of rank %d (%s)", i, strerror(rc));
    }
    k->started = 1;
  }
  return M3_OK;
}

static m3_status make_groups(m3_ranks *r) {
  r->groups = calloc((size_t)(1 + r->ep), sizeof *r->groups);
  if (!r->groups) return m3_fail(M3_ERR_NOMEM, "ranks: out of memory");
  for (int g = 0; g < 1 + r->ep; g++) {
    pthread_mutex_init(&r->groups[g].mu, NULL);
    pthread_cond_init(&r->groups[g].cv, NULL);
    r->groups[g].size = g == 0 ? r->world : r->tp;
  }
  for (int i = 0; i < r->world; i++) {
    r->ranks[i].world_group = &r->groups[0];
    r->ranks[i].tp_group = &r->groups[1 + r->ranks[i].ep_rank];
  }
  return M3_OK;
}

static m3_status make_ids(m3_ranks *r) {
#ifdef M3_HAVE_NCCL
  m3_status st = m3_nccl_new_id(&r->world_id);
  for (int e = 0; e < r->ep && st == M3_OK && r->tp > 1 && r->ep > 1; e++)
    st = m3_nccl_new_id(&r->tp_ids[e]);
  return st;
#else
  return m3_fail(M3_ERR_UNSUPPORTED, "--tp %d --ep %d: several GPUs need a build with NCCL", r->tp,
                 r->ep);
#endif
}

static m3_status log_copy(void *user, int32_t from, int32_t to) {
  m3_ranks *r = user;
  if (r->n_copies == r->cap_copies) {
    const int cap = r->cap_copies ? 2 * r->cap_copies : 64;
    m3_page_copy *copies = realloc(r->copies, (size_t)cap * sizeof *copies);
    if (!copies) return m3_fail(M3_ERR_NOMEM, "ranks: page copies");
    r->copies = copies;
    r->cap_copies = cap;
  }
  r->copies[r->n_copies++] = (m3_page_copy){from, to};
  return M3_OK;
}

#ifdef M3_HAVE_NCCL
/* Every rank's job `kind`, rank 0's on this thread; the first failure. */
static m3_status all_ranks(m3_ranks *r, job_kind kind) {
  m3_ranks_post(r, kind);
  m3_status st0 = run_job(&r->ranks[0], kind);
  if (st0 != M3_OK) note_failure(r, 0, st0);
  return m3_ranks_wait(r);
}

/* The peer-to-peer all-reduce over the world, where p2p_wanted and the GPUs reach each other's
 * memory (NVLink, or PCIe peer access). Any failure on the way leaves NCCL doing everything.
 * With it, decode steps may record as CUDA graphs on each rank independently, once every
 * all-reduce of such a step (rows up to M3_MODEL_GRAPH_MAX_TOKENS) goes peer to peer: NCCL's
 * capture registers buffers with the peers, a handshake that a peer running the step op by op
 * (its KV views differ from rank 0's, so its step signatures do) never joins. */
static void connect_p2p(m3_ranks *r) {
  if (!p2p_wanted(r->tp, r->ep, r->nnodes) || m3_p2p_group_create(r->world, &r->p2p) != M3_OK)
    return;
  if (all_ranks(r, JOB_P2P_JOIN) == M3_OK) {
    const m3_model *m0 = r->ranks[0].model;
    const m3_p2p *p0 = r->ranks[0].p2p;
    const int rows = M3_MODEL_GRAPH_MAX_TOKENS, H = m3_model_config(m0)->hidden_size;
    const size_t head = m3_model_head_slices(m0) > 1 ? (size_t)rows * m3_model_config(m0)->vocab_size : 0;
    r->p2p_graphs = m3_p2p_fits_add_norm(p0, rows, H) && (!head || m3_p2p_fits_sum(p0, head));
    if (all_ranks(r, JOB_P2P_CONNECT) == M3_OK) return;
  }
  all_ranks(r, JOB_P2P_LEAVE);
  m3_p2p_group_free(r->p2p);
  r->p2p = NULL;
  r->p2p_graphs = 0;
}
#endif

m3_status m3_ranks_connect(m3_ranks *r, m3_model *model0, m3_kv_cache *cache0) {
  m3_status st = m3_ranks_wait(r);
  if (st != M3_OK) return st;
  rank *k0 = &r->ranks[0];
  k0->be = m3_model_backend(model0);
  k0->model = model0;
  st = r->on_device ? make_ids(r) : make_groups(r);
  if (st != M3_OK) return st;
  r->pages = m3_kv_cache_num_pages(cache0);
  r->kv_dtype = m3_kv_cache_dtype(cache0);
  r->hidden = m3_model_config(model0)->hidden_size;
  if (r->nnodes > 1 && (st = m3_nodes_meet(r)) != M3_OK) return st;
  m3_ranks_post(r, JOB_SETUP);
  /* Rank 0's communicators alongside the others' (NCCL's init waits for every rank). */
  m3_status st0 = connect_rank(k0);
  if (st0 != M3_OK) note_failure(r, 0, st0);
  if ((st = m3_ranks_wait(r)) != M3_OK) return st;
#ifdef M3_HAVE_NCCL
  if (r->on_device) connect_p2p(r);
#endif
  m3_kv_cache_set_copy_hook(cache0, log_copy, r);
  return M3_OK;
}

void m3_ranks_free(m3_ranks *r) {
  if (!r) return;
  m3_ranks_wait_done(r); /* a load or set-up still running; the caller's error message stays */
#ifdef M3_HAVE_NCCL
  /* Peers read each other's staging: every GPU idle before any rank frees its own. */
  if (r->p2p) all_ranks(r, JOB_FINISH);
#endif
  m3_ranks_post(r, JOB_QUIT);
#ifdef M3_HAVE_NCCL
  /* Node 0's rank 0: its backend and model are the engine's, its communicators the ranks': they
   * go while the other ranks free theirs (a follower's rank 0 frees its own). */
  if (r->first_thread == 1) {
    m3_nccl_destroy(r->ranks[0].tp_comm);
    m3_nccl_destroy(r->ranks[0].world_comm);
    m3_p2p_leave(r->ranks[0].p2p);
  }
#endif
  for (int i = r->first_thread; i < r->local; i++)
    if (r->ranks[i].started) pthread_join(r->ranks[i].thread, NULL);
  m3_nodes_close(r);
#ifdef M3_HAVE_NCCL
  m3_p2p_group_free(r->p2p);
#endif
  for (int g = 0; r->groups && g < 1 + r->ep; g++) {
    pthread_mutex_destroy(&r->groups[g].mu);
    pthread_cond_destroy(&r->groups[g].cv);
  }
  free(r->groups);
  free(r->tables);
  free(r->table_at);
  free(r->table_blocks);
  free(r->copies);
  pthread_mutex_destroy(&r->mu);
  pthread_cond_destroy(&r->go);
  pthread_cond_destroy(&r->done);
  free(r);
}

/* The batch's block tables one after another in r->tables. */
static m3_status pack_tables(m3_ranks *r, const m3_kv_seq *const *kv, int n) {
  if (n > r->cap_n) {
    size_t *at = realloc(r->table_at, (size_t)n * sizeof *at);
    if (at) r->table_at = at;
    int *blocks = realloc(r->table_blocks, (size_t)n * sizeof *blocks);
    if (blocks) r->table_blocks = blocks;
    if (!at || !blocks) return m3_fail(M3_ERR_NOMEM, "ranks: tables of %d sequences", n);
    r->cap_n = n;
  }
  size_t total = 0;
  for (int i = 0; i < n; i++) total += (size_t)kv[i]->num_blocks;
  if (total > r->cap_tables) {
    int32_t *tables = realloc(r->tables, total * 2 * sizeof *tables);
    if (!tables) return m3_fail(M3_ERR_NOMEM, "ranks: block tables of %zu entries", total);
    r->tables = tables;
    r->cap_tables = total * 2;
  }
  size_t at = 0;
  for (int i = 0; i < n; i++) {
    r->table_at[i] = at;
    r->table_blocks[i] = kv[i]->num_blocks;
    if (kv[i]->num_blocks > 0)
      memcpy(r->tables + at, kv[i]->block_table, (size_t)kv[i]->num_blocks * sizeof *r->tables);
    at += (size_t)kv[i]->num_blocks;
  }
  return M3_OK;
}

m3_status m3_ranks_run(m3_ranks *r, const m3_model_seq *batch, const m3_kv_seq *const *kv, int n,
                       int argmax, m3_status (*run0)(void *user), void *user) {
  if (r->aborted[0])
    return m3_fail(M3_ERR_IO, "--tp %d --ep %d: the ranks' NCCL communicators were aborted after "
                   "a failed step (%s); restart to use them again", r->tp, r->ep, r->aborted);
  m3_status st = pack_tables(r, kv, n);
  if (st != M3_OK) return st;
  r->batch = batch;
  r->n = n;
  r->argmax = argmax;
  r->step++;
  m3_ranks_post(r, JOB_FORWARD);
  m3_status st0 = run0(user);
  if (st0 != M3_OK) note_failure(r, 0, st0);
  st = m3_ranks_wait(r);
#ifdef M3_HAVE_NCCL
  /* A peer-to-peer all-reduce that gave up (a peer past the deadline) left wrong sums; seen here
   * once rank 0's stream got that far (its logits wait for it), else at a later step. */
  if (st == M3_OK && r->p2p && (st = m3_p2p_check(r->p2p)) != M3_OK)
    snprintf(r->aborted, sizeof r->aborted, "%s", m3_last_error());
#endif
  /* Every rank is idle: the copies are applied everywhere, the barriers can be reused. */
  r->n_copies = 0;
  for (int g = 0; r->groups && g < 1 + r->ep; g++) group_reset(&r->groups[g]);
  return st;
}

