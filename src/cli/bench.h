/* bench.h: the parts of `m3 bench <what>` (bench.c dispatches). Each is called with argv[0] =
 * "bench <what>", the name its messages use, and returns the exit status like a command. */
#ifndef M3_CLI_BENCH_H
#define M3_CLI_BENCH_H

#include <stddef.h>

#include "base/threadpool.h"

int m3_bench_ops(int argc, char **argv);    /* bench_ops.c: kernels against copy bandwidth */
int m3_bench_model(int argc, char **argv);  /* bench_model.c: decode and prefill of a whole model */
int m3_bench_engine(int argc, char **argv); /* bench_engine.c: batched serving */
int m3_bench_tok(int argc, char **argv);    /* tokenize.c: tokenizer encode speed */
int m3_bench_spec(int argc, char **argv);   /* bench_spec.c: speculative decoding costs */
int m3_bench_accept(int argc, char **argv); /* bench_accept.c: drafter acceptance on real text */

/* CLOCK_MONOTONIC in seconds (bench.c). */
double m3_bench_seconds(void);

/* bench_ops.c: the best of `reps` passes over buffers of `bytes` on the pool's threads, in GB/s,
 * 0 when out of memory. Copy counts bytes read + bytes written; read is a vectorized integer sum,
 * the ceiling for GEMV. Buffers far larger than the last-level cache measure memory. */
double m3_bench_copy_bandwidth(m3_threadpool *pool, size_t bytes, int reps);
double m3_bench_read_bandwidth(m3_threadpool *pool, size_t bytes, int reps);

#endif
