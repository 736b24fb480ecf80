/* cuda_env.h: CUDA backends made under environment settings, for the GPU checks and timings
 * (test_cuda_ops, bench_cuda_ops), which compare the paths the backend's switches choose
 * (M3_MOE_STREAMS, M3_MOE_GROUPED, M3_MOE_GROUPED_TILE are read once, at creation). */
#ifndef M3_TESTS_GPU_CUDA_ENV_H
#define M3_TESTS_GPU_CUDA_ENV_H

#include "backend/backend.h"

/* A CUDA backend on GPU 0 created while names[i] = values[i] (i < n); each variable is restored
 * after, whatever the outcome. */
m3_status cuda_with_env(const char *const *names, const char *const *values, int n,
                        m3_backend **out);

/* M3_MOE_STREAMS=streams and M3_MOE_GROUPED=0: BF16 and MXFP8 experts' prefill on the lanes too,
 * not the grouped GEMMs. */
m3_status cuda_with_streams(const char *streams, m3_backend **out);

/* M3_MOE_GROUPED=1 and M3_MOE_GROUPED_TILE=tile: the grouped GEMMs with tile candidate `tile`;
 * M3_ERR_ARG past the last candidate. */
m3_status cuda_with_tile(int tile, m3_backend **out);

#endif
