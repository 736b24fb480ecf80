/* norm_rope.c: Gemma RMSNorm (alone and after the residual add) and partial NeoX RoPE
 * (shared/spec/m3_text_spec.md §3.1-3.2). */
#include <math.h>
#include <stdlib.h>

#include "backend/cpu/cpu_internal.h"

/* Ops below this many elements run on the calling thread: waking the pool costs more. */
enum { PARALLEL_MIN = 1 << 15 };

typedef struct {
  const cpu_kernels *k;
  float *resid;       /* add_rmsnorm: [nrows, n] the residual stream, += add before the norm;
                       * NULL for a plain rmsnorm */
  const float *add;   /* [nrows, n] */
  const float *x;     /* [nrows, n] the rows normed (resid itself for add_rmsnorm) */
  const float *gain;  /* 1 + w, [n] */
  float eps;
  int n;
  float *y;
} rmsnorm_job;

static void rmsnorm_rows(void *ctx, int64_t r0, int64_t r1, int worker) {
  (void)worker;
  const rmsnorm_job *job = ctx;
  const int n = job->n;
  for (int64_t r = r0; r < r1; r++) {
    if (job->resid) {
      /* The add of cpu_add, element by element: the sum the norm then reads is the same. */
      float *acc = job->resid + r * n;
      const float *add = job->add + r * n;
      for (int i = 0; i < n; i++) acc[i] += add[i];
    }
    const float *x = job->x + r * n;
    float *y = job->y + r * n;
    float mean = job->k->dot(x, x, n) / (float)n;
    float inv = 1.0f / sqrtf(mean + job->eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * inv * job->gain[i];
  }
}

/* Runs `job` (everything but k and gain filled in) over nrows rows with the gain of w. */
static void run_rmsnorm(m3_backend *be, rmsnorm_job *job, const m3_tensor *w, int nrows) {
  cpu_backend *cb = cpu_of(be);
  const int n = job->n;
  float *gain = malloc((size_t)n * sizeof(float));
  if (!gain) { /* Out of memory in an op that cannot fail: leave a visibly wrong result. */
    for (size_t i = 0; i < (size_t)nrows * (size_t)n; i++) job->y[i] = NAN;
    return;
  }
  cpu_decode_row(w, 0, 0, n, gain);
  for (int i = 0; i < n; i++) gain[i] = 1.0f + gain[i];
  job->k = cb->k;
  job->gain = gain;
  int64_t chunk = (int64_t)nrows * n < PARALLEL_MIN ? nrows : 0;
  m3_parallel_for(cb->pool, nrows, chunk, rmsnorm_rows, job);
  free(gain);
}

void cpu_rmsnorm(m3_backend *be, const float *x, const m3_tensor *w, float eps, int nrows, int n,
                 float *y) {
  rmsnorm_job job = {.x = x, .eps = eps, .n = n, .y = y};
  run_rmsnorm(be, &job, w, nrows);
}

void cpu_add_rmsnorm(m3_backend *be, float *x, const float *y, const m3_tensor *w, float eps,
                     int nrows, int n, float *out) {
  rmsnorm_job job = {.resid = x, .add = y, .x = x, .eps = eps, .n = n, .y = out};
  run_rmsnorm(be, &job, w, nrows);
}

typedef struct {
  float *x;
  const int32_t *pos;
  int nheads, hd, half;
  const float *inv_freq; /* [half] */
} rope_job;

static void rope_tokens(void *ctx, int64_t t0, int64_t t1, int worker) {
  (void)worker;
  const rope_job *job = ctx;
  const int half = job->half;
  float c[256], s[256];
  for (int64_t t = t0; t < t1; t++) {
    /* fp32 angle as the reference computes it: float(pos) * inv_freq, then cos/sin in fp32. */
    float p = (float)job->pos[t];
    for (int i = 0; i < half; i++) {
      float angle = p * job->inv_freq[i];
      c[i] = cosf(angle);
      s[i] = sinf(angle);
    }
    for (int h = 0; h < job->nheads; h++) {
      float *v = job->x + (t * job->nheads + h) * job->hd;
      for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        /* x * cos + rotate_half(x) * sin, two rounded products then the sum. */
        v[i] = a * c[i] + (-b) * s[i];
        v[i + half] = b * c[i] + a * s[i];
      }
    }
  }
}

void cpu_rope(m3_backend *be, float *x, const int32_t *pos, int T, int nheads, int hd, int rot,
              double theta) {
  cpu_backend *cb = cpu_of(be);
  if (rot > hd) rot = hd;
  int half = rot / 2;
  if (half <= 0) return;
  if (half > 256) half = 256; /* rotary widths are at most a head (<= 512 dims) */
  /* inv_freq = 1 / theta^(arange(0, rot, 2) / rot), each step in float32 as torch does it. */
  float inv_freq[256];
  for (int i = 0; i < half; i++) {
    float exponent = (float)(2 * i) / (float)rot;
    inv_freq[i] = 1.0f / powf((float)theta, exponent);
  }
  rope_job job = {x, pos, nheads, hd, half, inv_freq};
  int64_t chunk = (int64_t)T * nheads * rot < PARALLEL_MIN ? T : 0;
  m3_parallel_for(cb->pool, T, chunk, rope_tokens, &job);
}

/* Two passes over x: each is already one parallel sweep, and on the CPU x stays in cache between
 * them at the sizes a step has, so fusing would buy nothing here. */
void cpu_rmsnorm_rope(m3_backend *be, float *x, const m3_tensor *w, float eps, const int32_t *pos,
                      int T, int nheads, int hd, int rot, double theta) {
  cpu_rmsnorm(be, x, w, eps, T * nheads, hd, x);
  cpu_rope(be, x, pos, T, nheads, hd, rot, theta);
}
