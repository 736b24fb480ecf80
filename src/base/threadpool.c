#include "base/threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

/* A worker spins this many polls for the next job before sleeping: decode issues ops back to back,
 * and a condition-variable wake-up costs tens of microseconds. */
enum { SPIN_POLLS = 20000 };

struct m3_threadpool {
  int size; /* threads including the caller */
  pthread_t *threads;
  pthread_mutex_t mutex;
  pthread_cond_t wake;
  atomic_uint generation; /* bumped once per job */
  atomic_int finished;    /* workers done with the current job */
  atomic_int stop;
  /* The current job. */
  m3_chunk_fn fn;
  void *ctx;
  int64_t n, chunk;
  atomic_llong next;
};

typedef struct {
  m3_threadpool *pool;
  int worker;
} worker_arg;

static void run_chunks(m3_threadpool *pool, int worker) {
  for (;;) {
    int64_t begin = atomic_fetch_add(&pool->next, pool->chunk);
    if (begin >= pool->n) return;
    int64_t end = begin + pool->chunk < pool->n ? begin + pool->chunk : pool->n;
    pool->fn(pool->ctx, begin, end, worker);
  }
}

static void *worker_main(void *p) {
  worker_arg arg = *(worker_arg *)p;
  free(p);
  m3_threadpool *pool = arg.pool;
  unsigned seen = 0;
  for (;;) {
    unsigned gen = atomic_load(&pool->generation);
    for (int i = 0; gen == seen && i < SPIN_POLLS; i++) gen = atomic_load(&pool->generation);
    if (gen == seen) {
      pthread_mutex_lock(&pool->mutex);
      while ((gen = atomic_load(&pool->generation)) == seen && !atomic_load(&pool->stop))
        pthread_cond_wait(&pool->wake, &pool->mutex);
      pthread_mutex_unlock(&pool->mutex);
    }
    if (atomic_load(&pool->stop)) return NULL;
    seen = gen;
    run_chunks(pool, arg.worker);
    atomic_fetch_add(&pool->finished, 1);
  }
}

m3_status m3_threadpool_create(int threads, m3_threadpool **out) {
  *out = NULL;
  if (threads < 0) return m3_fail(M3_ERR_ARG, "thread pool: %d threads", threads);
  if (threads == 0) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    threads = cores > 0 ? (int)cores : 1;
  }
  m3_threadpool *pool = calloc(1, sizeof *pool);
  if (!pool) return m3_fail(M3_ERR_NOMEM, "thread pool: out of memory");
  pool->size = threads;
  pthread_mutex_init(&pool->mutex, NULL);
  pthread_cond_init(&pool->wake, NULL);
  pool->threads = calloc((size_t)threads, sizeof *pool->threads);
  if (!pool->threads) {
    m3_threadpool_destroy(pool);
    return m3_fail(M3_ERR_NOMEM, "thread pool: out of memory");
  }
  for (int i = 1; i < threads; i++) {
    worker_arg *arg = malloc(sizeof *arg);
    if (arg) *arg = (worker_arg){pool, i};
    if (!arg || pthread_create(&pool->threads[i], NULL, worker_main, arg) != 0) {
      free(arg);
      pool->size = i;
      m3_threadpool_destroy(pool);
      return m3_fail(M3_ERR_NOMEM, "thread pool: cannot start thread %d of %d", i, threads);
    }
  }
  *out = pool;
  return M3_OK;
}

void m3_threadpool_destroy(m3_threadpool *pool) {
  if (!pool) return;
  pthread_mutex_lock(&pool->mutex);
  atomic_store(&pool->stop, 1);
  pthread_cond_broadcast(&pool->wake);
  pthread_mutex_unlock(&pool->mutex);
  for (int i = 1; i < pool->size; i++) pthread_join(pool->threads[i], NULL);
  pthread_cond_destroy(&pool->wake);
  pthread_mutex_destroy(&pool->mutex);
  free(pool->threads);
  free(pool);
}

int m3_threadpool_size(const m3_threadpool *pool) { return pool->size; }

void m3_parallel_for(m3_threadpool *pool, int64_t n, int64_t chunk, m3_chunk_fn fn, void *ctx) {
  if (n <= 0) return;
  if (chunk <= 0) chunk = (n + pool->size - 1) / pool->size;
  if (pool->size == 1 || chunk >= n) {
    fn(ctx, 0, n, 0);
    return;
  }
  pool->fn = fn;
  pool->ctx = ctx;
  pool->n = n;
  pool->chunk = chunk;
  atomic_store(&pool->next, 0);
  atomic_store(&pool->finished, 0);
  pthread_mutex_lock(&pool->mutex);
  atomic_fetch_add(&pool->generation, 1);
  pthread_cond_broadcast(&pool->wake);
  pthread_mutex_unlock(&pool->mutex);
  run_chunks(pool, 0);
  for (int i = 0; atomic_load(&pool->finished) < pool->size - 1; i++)
    if (i > SPIN_POLLS) sched_yield();
}
