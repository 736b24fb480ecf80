/* elementwise.c: SwiGLU-OAI, residual adds and per-row scaled adds. */
#include <math.h>

#include "backend/cpu/cpu_internal.h"

enum { PARALLEL_MIN = 1 << 15, CHUNK = 1 << 13 };

typedef struct {
  const float *gate, *up;
  float alpha, beta, limit;
  float *out;
} swiglu_job;

static void swiglu_range(void *ctx, int64_t i0, int64_t i1, int worker) {
  (void)worker;
  const swiglu_job *job = ctx;
  for (int64_t i = i0; i < i1; i++) {
    float g = fminf(job->gate[i], job->limit);
    float u = fminf(fmaxf(job->up[i], -job->limit), job->limit);
    float glu = g * (1.0f / (1.0f + expf(-(g * job->alpha))));
    job->out[i] = (u + job->beta) * glu;
  }
}

void cpu_swiglu_oai(m3_backend *be, const float *gate, const float *up, size_t n, float alpha,
                    float beta, float limit, float *out) {
  swiglu_job job = {gate, up, alpha, beta, limit, out};
  m3_parallel_for(cpu_of(be)->pool, (int64_t)n, n < PARALLEL_MIN ? (int64_t)n : CHUNK,
                  swiglu_range, &job);
}

typedef struct {
  float *x;
  const float *y;
} add_job;

static void add_range(void *ctx, int64_t i0, int64_t i1, int worker) {
  (void)worker;
  const add_job *job = ctx;
  for (int64_t i = i0; i < i1; i++) job->x[i] += job->y[i];
}

void cpu_add(m3_backend *be, float *x, const float *y, size_t n) {
  add_job job = {x, y};
  m3_parallel_for(cpu_of(be)->pool, (int64_t)n, n < PARALLEL_MIN ? (int64_t)n : CHUNK, add_range,
                  &job);
}
