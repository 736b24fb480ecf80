/* threadpool.h: a small persistent pthread pool for data-parallel loops.
 *
 * m3_parallel_for splits [0, n) into chunks of `chunk` indices that the calling thread and the
 * pool's workers claim from a shared counter until none are left, then returns. Workers stay alive
 * between calls (spinning briefly, then sleeping) so that the hundreds of small ops of one decode
 * step do not pay thread start-up each time. One caller at a time: a pool is not re-entrant. */
#ifndef M3_BASE_THREADPOOL_H
#define M3_BASE_THREADPOOL_H

#include <stdint.h>

#include "base/status.h"

typedef struct m3_threadpool m3_threadpool;

/* fn handles indices [begin, end); `worker` in [0, m3_threadpool_size) names the thread running it
 * (for per-thread scratch). */
typedef void (*m3_chunk_fn)(void *ctx, int64_t begin, int64_t end, int worker);

/* threads: total threads including the caller; 0 = one per online core. */
m3_status m3_threadpool_create(int threads, m3_threadpool **out);
void m3_threadpool_destroy(m3_threadpool *pool);
int m3_threadpool_size(const m3_threadpool *pool);

/* chunk <= 0 splits [0, n) into one contiguous range per thread. */
void m3_parallel_for(m3_threadpool *pool, int64_t n, int64_t chunk, m3_chunk_fn fn, void *ctx);

#endif
