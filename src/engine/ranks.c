/* ranks.c: the ranks of one process (ranks.h says what each holds and how a step runs). */
#include "engine/ranks.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/parallel.h"
#include "io/config.h"

#ifdef M3_HAVE_NCCL
#include "backend/cuda/collectives.h"
#endif

/* The host all-reduce of one group (the world, or one TP group): members post their buffers,
 * meet at a barrier, each sums its share of the indices over the members in member order (so
 * every member ends with the same bits), and they meet again. `aborted` releases every waiter
 * when a rank's forward failed, since its peers would otherwise wait for it forever. */
typedef struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int size, arrived, aborted;
  uint64_t phase;
  float *bufs[M3_PARALLEL_MAX_RANKS];
} host_group;

typedef struct {
  int32_t from, to;
} page_copy;

typedef enum { JOB_LOAD, JOB_SETUP, JOB_FORWARD, JOB_QUIT } job_kind;

typedef struct {
  m3_ranks *all;
  int index, tp_rank, ep_rank;
  m3_backend *be;
  m3_model *model;
  m3_kv_cache *store;      /* ranks >= 1: storage mirroring rank 0's pages */
  host_group *world_group, *tp_group; /* CPU ranks */
#ifdef M3_HAVE_NCCL
  m3_nccl *world_comm, *tp_comm; /* tp_comm: own communicator when tp > 1 and ep > 1 */
#endif
  m3_kv_view *views;       /* [cap_seqs * layers] */
  m3_model_seq *seqs;      /* [cap_seqs] */
  int cap_seqs;
  int32_t *tables_dev;     /* device backends: the step's block tables */
  size_t cap_tables;
  uint64_t seen;           /* the last job taken */
  pthread_t thread;
  int started;
} rank;

struct m3_ranks {
  int tp, ep, world, on_device;
  char dir[4096];
  m3_model_load_options load;
  int first_gpu, threads;
  rank ranks[M3_PARALLEL_MAX_RANKS];
  host_group *groups;      /* CPU: [1 + ep] the world, then TP group e */
#ifdef M3_HAVE_NCCL
  m3_nccl_id world_id, tp_ids[M3_PARALLEL_MAX_RANKS];
#endif
  /* The job the engine thread posted, guarded by mu (written before the post, read after it). */
  pthread_mutex_t mu;
  pthread_cond_t go, done;
  job_kind kind;
  uint64_t generation;
  int pending;             /* ranks 1.. yet to finish the job */
  m3_status failed;        /* the job's first failure, in time */
  char failure[600];
  char aborted[600];       /* NCCL: why every communicator was aborted (then every step fails) */
  int pages;               /* JOB_SETUP */
  m3_kv_dtype kv_dtype;
  const m3_model_seq *batch; /* JOB_FORWARD */
  int n;
  int32_t *tables;         /* [total blocks] the batch's block tables, one after another */
  size_t cap_tables;
  size_t *table_at;        /* [cap_n] where entry i's table starts in `tables` */
  int *table_blocks;       /* [cap_n] its length */
  int cap_n;
  page_copy *copies;       /* rank 0's page copies since the last forward, in order */
  int n_copies, cap_copies;
};

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

m3_status m3_ranks_check(const char *model_dir, const m3_engine_options *o) {
  int tp, ep;
  m3_ranks_layout(o, &tp, &ep);
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

/* 1 when every member arrived, 0 when the group was aborted first. */
static int group_barrier(host_group *g) {
  pthread_mutex_lock(&g->mu);
  int ok = !g->aborted;
  if (ok) {
    const uint64_t phase = g->phase;
    if (++g->arrived == g->size) {
      g->arrived = 0;
      g->phase++;
      pthread_cond_broadcast(&g->cv);
    } else {
      while (g->phase == phase && !g->aborted) pthread_cond_wait(&g->cv, &g->mu);
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
  if (!group_barrier(g)) return m3_fail(M3_ERR_IO, "all-reduce: another rank failed");
  const size_t lo = n * (size_t)me / (size_t)g->size, hi = n * (size_t)(me + 1) / (size_t)g->size;
  for (size_t i = lo; i < hi; i++) {
    float sum = 0.0f;
    for (int m = 0; m < g->size; m++) sum += g->bufs[m][i];
    for (int m = 0; m < g->size; m++) g->bufs[m][i] = sum;
  }
  if (!group_barrier(g)) return m3_fail(M3_ERR_IO, "all-reduce: another rank failed");
  return M3_OK;
}

#ifdef M3_HAVE_NCCL
static m3_status nccl_all_reduce(void *user, m3_reduce_group group, float *buf, size_t n) {
  rank *k = user;
  const m3_ranks *r = k->all;
  m3_nccl *c = group == M3_REDUCE_WORLD ? k->world_comm
               : r->tp == 1             ? NULL
               : r->ep == 1             ? k->world_comm
                                        : k->tp_comm;
  return c ? m3_nccl_all_reduce_sum(c, buf, n) : M3_OK;
}
#endif

/* ---- jobs ---- */

/* Records the job's first failure (this thread's message, naming the rank) and releases the
 * peers that may wait for this rank in a collective: on the host, the barriers; with NCCL, every
 * rank's communicators are aborted (a rank that failed before issuing its part of an all-reduce
 * would otherwise leave the others' streams, and rank 0's wait for its logits, blocked forever).
 * The communicators are not remade: later steps fail, naming this failure. */
static void note_failure(m3_ranks *r, int index, m3_status st) {
  pthread_mutex_lock(&r->mu);
  const int first = r->failed == M3_OK;
  if (first) {
    r->failed = st;
    snprintf(r->failure, sizeof r->failure, "rank %d: %s", index, m3_last_error());
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
  for (int i = 0; abort_comms && i < r->world; i++) {
    m3_nccl_abort(r->ranks[i].world_comm);
    m3_nccl_abort(r->ranks[i].tp_comm);
  }
#endif
}

static void finish_job(rank *k, m3_status st) {
  m3_ranks *r = k->all;
  if (st != M3_OK) note_failure(r, k->index, st);
  pthread_mutex_lock(&r->mu);
  if (--r->pending == 0) pthread_cond_signal(&r->done);
  pthread_mutex_unlock(&r->mu);
}

static job_kind take_job(rank *k) {
  m3_ranks *r = k->all;
  pthread_mutex_lock(&r->mu);
  while (r->generation == k->seen) pthread_cond_wait(&r->go, &r->mu);
  k->seen = r->generation;
  const job_kind kind = r->kind;
  pthread_mutex_unlock(&r->mu);
  return kind;
}

/* Engine thread: hands ranks 1.. a job (its data written before). */
static void post(m3_ranks *r, job_kind kind) {
  pthread_mutex_lock(&r->mu);
  r->kind = kind;
  r->generation++;
  r->pending = r->world - 1;
  r->failed = M3_OK;
  pthread_cond_broadcast(&r->go);
  pthread_mutex_unlock(&r->mu);
}

/* Engine thread: waits until ranks 1.. finished the job; its first failure. */
static m3_status wait_done(m3_ranks *r) {
  pthread_mutex_lock(&r->mu);
  while (r->pending > 0) pthread_cond_wait(&r->done, &r->mu);
  const m3_status st = r->failed;
  pthread_mutex_unlock(&r->mu);
  return st;
}

/* wait_done with the failure's message on this thread. */
static m3_status wait_ranks(m3_ranks *r) {
  const m3_status st = wait_done(r);
  return st == M3_OK ? M3_OK : m3_fail(st, "%s", r->failure);
}

static m3_status load_rank(rank *k) {
  m3_ranks *r = k->all;
  char device[32] = "cpu";
  if (r->on_device) snprintf(device, sizeof device, "cuda:%d", r->first_gpu + k->index);
  m3_status st = m3_backend_create(device, r->threads, &k->be);
  if (st != M3_OK)
    return m3_fail_context(st, "--tp %d --ep %d: rank %d of %d takes %s (GPUs %d..%d)", r->tp,
                           r->ep, k->index, r->world, device, r->first_gpu,
                           r->first_gpu + r->world - 1);
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
    /* Not M3_ALL_REDUCE_CAPTURABLE: a rank's step signature holds its own KV views (rank 0 the
     * sequences' table copies, the others one table buffer per step), so one rank may record a
     * step while another runs it directly, and NCCL's capture of a collective registers the
     * buffers with its peers, a handshake a peer running directly never joins (the step hung on
     * 2 x H200). Steps of several ranks run op by op (tests/gpu/test_tp checks recorded
     * collectives where every rank decides alike). */
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

static m3_status forward_rank(rank *k) {
  m3_ranks *r = k->all;
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
  return m3_model_forward_batch(k->model, k->seqs, r->n, NULL);
}

/* Everything of a rank's backend is freed on its thread, as it was made. */
static void teardown_rank(rank *k) {
  if (k->tables_dev) k->be->ops->free(k->be, k->tables_dev);
  m3_kv_cache_free(k->store);
#ifdef M3_HAVE_NCCL
  m3_nccl_destroy(k->tp_comm);
  m3_nccl_destroy(k->world_comm);
#endif
  m3_model_free(k->model);
  if (k->be) k->be->ops->destroy(k->be);
  free(k->views);
  free(k->seqs);
}

static void *rank_main(void *arg) {
  rank *k = arg;
  finish_job(k, load_rank(k));
  for (job_kind kind; (kind = take_job(k)) != JOB_QUIT;)
    finish_job(k, kind == JOB_SETUP ? setup_rank(k) : forward_rank(k));
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
  pthread_mutex_init(&r->mu, NULL);
  pthread_cond_init(&r->go, NULL);
  pthread_cond_init(&r->done, NULL);
  /* The load is the job every rank starts with. */
  r->kind = JOB_LOAD;
  r->pending = r->world - 1;
  for (int i = 0; i < r->world; i++) {
    rank *k = &r->ranks[i];
    *k = (rank){.all = r, .index = i, .tp_rank = i % r->tp, .ep_rank = i / r->tp};
  }
  *out = r;
  for (int i = 1; i < r->world; i++) {
    rank *k = &r->ranks[i];
    const int rc = pthread_create(&k->thread, NULL, rank_main, k);
    if (rc != 0) {
      pthread_mutex_lock(&r->mu);
      r->pending -= r->world - i; /* the ranks never started finish nothing */
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
    page_copy *copies = realloc(r->copies, (size_t)cap * sizeof *copies);
    if (!copies) return m3_fail(M3_ERR_NOMEM, "ranks: page copies");
    r->copies = copies;
    r->cap_copies = cap;
  }
  r->copies[r->n_copies++] = (page_copy){from, to};
  return M3_OK;
}

m3_status m3_ranks_connect(m3_ranks *r, m3_model *model0, m3_kv_cache *cache0) {
  m3_status st = wait_ranks(r);
  if (st != M3_OK) return st;
  rank *k0 = &r->ranks[0];
  k0->be = m3_model_backend(model0);
  k0->model = model0;
  st = r->on_device ? make_ids(r) : make_groups(r);
  if (st != M3_OK) return st;
  r->pages = m3_kv_cache_num_pages(cache0);
  r->kv_dtype = m3_kv_cache_dtype(cache0);
  post(r, JOB_SETUP);
  /* Rank 0's communicators alongside the others' (NCCL's init waits for every rank). */
  m3_status st0 = connect_rank(k0);
  if (st0 != M3_OK) note_failure(r, 0, st0);
  if ((st = wait_ranks(r)) != M3_OK) return st;
  m3_kv_cache_set_copy_hook(cache0, log_copy, r);
  return M3_OK;
}

void m3_ranks_free(m3_ranks *r) {
  if (!r) return;
  wait_done(r); /* a load or set-up still running; the caller's error message stays */
  post(r, JOB_QUIT);
#ifdef M3_HAVE_NCCL
  /* Rank 0's backend and model are the engine's, its communicators the ranks': they go while
   * the other ranks free theirs. */
  m3_nccl_destroy(r->ranks[0].tp_comm);
  m3_nccl_destroy(r->ranks[0].world_comm);
#endif
  for (int i = 1; i < r->world; i++)
    if (r->ranks[i].started) pthread_join(r->ranks[i].thread, NULL);
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
                       m3_status (*run0)(void *user), void *user) {
  if (r->aborted[0])
    return m3_fail(M3_ERR_IO, "--tp %d --ep %d: the ranks' NCCL communicators were aborted after "
                   "a failed step (%s); restart to use them again", r->tp, r->ep, r->aborted);
  m3_status st = pack_tables(r, kv, n);
  if (st != M3_OK) return st;
  r->batch = batch;
  r->n = n;
  post(r, JOB_FORWARD);
  m3_status st0 = run0(user);
  if (st0 != M3_OK) note_failure(r, 0, st0);
  st = wait_ranks(r);
  /* Every rank is idle: the copies are applied everywhere, the barriers can be reused. */
  r->n_copies = 0;
  for (int g = 0; r->groups && g < 1 + r->ep; g++) group_reset(&r->groups[g]);
  return st;
}
