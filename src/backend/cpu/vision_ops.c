/* vision_ops.c: the CPU vision-tower ops (backend.h m3_vision_ops; m3_vision_chat_spec.md §4):
 * LayerNorm with bias, bias add, exact GELU, axial 3-D RoPE, non-causal attention. */
#include <math.h>
#include <stdlib.h>

#include "backend/cpu/cpu_internal.h"
#include "backend/cpu/vision_ops.h"

/* Ops below this many elements run on the calling thread: waking the pool costs more. */
enum { PARALLEL_MIN = 1 << 15 };

/* A vector weight (bias, norm gain) decoded to float32; NULL when out of memory. */
static float *decode_vector(const m3_tensor *w, int n) {
  float *v = malloc((size_t)n * sizeof(float));
  if (v) cpu_decode_row(w, 0, 0, n, v);
  return v;
}

/* The ops cannot fail: out of memory leaves a visibly wrong (NaN) result. */
static void poison(float *y, size_t n) {
  for (size_t i = 0; i < n; i++) y[i] = NAN;
}

typedef struct {
  const float *x, *w, *b;
  float eps;
  int n;
  float *y;
} layernorm_job;

static void layernorm_rows(void *ctx, int64_t r0, int64_t r1, int worker) {
  (void)worker;
  const layernorm_job *job = ctx;
  const int n = job->n;
  for (int64_t r = r0; r < r1; r++) {
    const float *x = job->x + r * n;
    float *y = job->y + r * n;
    /* Moments in double: the reference's fp32 kernel is a compensated sum; double is closer to
     * both than a plain float loop. */
    double sum = 0.0, sq = 0.0;
    for (int i = 0; i < n; i++) sum += x[i];
    const double mean = sum / n;
    for (int i = 0; i < n; i++) sq += (x[i] - mean) * (x[i] - mean);
    const float m = (float)mean, inv = (float)(1.0 / sqrt(sq / n + (double)job->eps));
    for (int i = 0; i < n; i++) y[i] = (x[i] - m) * inv * job->w[i] + job->b[i];
  }
}

static void cpu_layernorm(m3_backend *be, const float *x, const m3_tensor *w, const m3_tensor *b,
                          float eps, int nrows, int n, float *y) {
  float *wv = decode_vector(w, n), *bv = decode_vector(b, n);
  if (wv && bv) {
    layernorm_job job = {x, wv, bv, eps, n, y};
    int64_t chunk = (int64_t)nrows * n < PARALLEL_MIN ? nrows : 0;
    m3_parallel_for(cpu_of(be)->pool, nrows, chunk, layernorm_rows, &job);
  } else {
    poison(y, (size_t)nrows * (size_t)n);
  }
  free(wv);
  free(bv);
}

static void cpu_add_bias(m3_backend *be, float *x, const m3_tensor *b, int T, int n) {
  (void)be;
  float *bv = decode_vector(b, n);
  if (!bv) {
    poison(x, (size_t)T * (size_t)n);
    return;
  }
  for (int t = 0; t < T; t++)
    for (int i = 0; i < n; i++) x[(size_t)t * n + i] += bv[i];
  free(bv);
}

static void cpu_gelu(m3_backend *be, float *x, size_t n) {
  (void)be;
  /* 1 + erf(x / sqrt 2) as erfc(-x / sqrt 2): the sum cancels for negative x, where erff's last
   * bit would become the result's third digit */
  for (size_t i = 0; i < n; i++) x[i] = 0.5f * x[i] * erfcf(-x[i] * (float)M_SQRT1_2);
}

enum { ROPE_MAX_ANGLES = 3 * 128 };

typedef struct {
  float *x;
  const int32_t *pos;
  int nheads, hd, freqs; /* freqs = axis_dim / 2 per axis */
  const float *inv_freq; /* [freqs] */
} rope3_job;

static void rope3_tokens(void *ctx, int64_t t0, int64_t t1, int worker) {
  (void)worker;
  const rope3_job *job = ctx;
  const int F = job->freqs, half = 3 * F;
  float c[ROPE_MAX_ANGLES], s[ROPE_MAX_ANGLES];
  for (int64_t t = t0; t < t1; t++) {
    for (int axis = 0; axis < 3; axis++) {
      const float p = (float)job->pos[t * 3 + axis];
      for (int j = 0; j < F; j++) {
        float angle = p * job->inv_freq[j];
        c[axis * F + j] = cosf(angle);
        s[axis * F + j] = sinf(angle);
      }
    }
    for (int h = 0; h < job->nheads; h++) {
      float *v = job->x + (t * job->nheads + h) * job->hd;
      for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
      }
    }
  }
}

static void cpu_rope_3d(m3_backend *be, float *x, const int32_t *pos, int N, int nheads, int hd,
                        int axis_dim, double theta) {
  const int F = axis_dim / 2;
  if (F <= 0 || 6 * F > hd || 3 * F > ROPE_MAX_ANGLES) {
    poison(x, (size_t)N * nheads * hd);
    return;
  }
  float inv_freq[ROPE_MAX_ANGLES];
  for (int j = 0; j < F; j++) inv_freq[j] = 1.0f / powf((float)theta, (float)(2 * j) / (float)axis_dim);
  rope3_job job = {x, pos, nheads, hd, F, inv_freq};
  int64_t chunk = (int64_t)N * nheads * hd < PARALLEL_MIN ? N : 0;
  m3_parallel_for(cpu_of(be)->pool, N, chunk, rope3_tokens, &job);
}

typedef struct {
  const cpu_kernels *k;
  const float *q, *kk, *v;
  int N, nh, hd;
  float scale;
  float *scores; /* [threads, N] */
  float *out;
} attn_job;

/* Rows r = t * nh + h: query token t, head h. */
static void attention_rows(void *ctx, int64_t r0, int64_t r1, int worker) {
  const attn_job *job = ctx;
  const int N = job->N, nh = job->nh, hd = job->hd;
  float *s = job->scores + (size_t)worker * N;
  for (int64_t r = r0; r < r1; r++) {
    const int64_t t = r / nh, h = r % nh;
    const float *q = job->q + (t * nh + h) * hd;
    float m = -INFINITY;
    for (int j = 0; j < N; j++) {
      s[j] = job->k->dot(q, job->kk + ((int64_t)j * nh + h) * hd, hd) * job->scale;
      if (s[j] > m) m = s[j];
    }
    const float inv = 1.0f / job->k->exp_sum(s, N, m);
    float *o = job->out + (t * nh + h) * hd;
    for (int d = 0; d < hd; d++) o[d] = 0.0f;
    for (int j = 0; j < N; j++) job->k->axpy(o, s[j] * inv, job->v + ((int64_t)j * nh + h) * hd, hd);
  }
}

static void cpu_attention_full(m3_backend *be, const float *q, const float *k, const float *v,
                               int N, int nh, int hd, float *out) {
  cpu_backend *cb = cpu_of(be);
  const int threads = m3_threadpool_size(cb->pool);
  float *scores = malloc((size_t)threads * (size_t)N * sizeof(float));
  if (!scores) {
    poison(out, (size_t)N * nh * hd);
    return;
  }
  attn_job job = {cb->k, q, k, v, N, nh, hd, 1.0f / sqrtf((float)hd), scores, out};
  m3_parallel_for(cb->pool, (int64_t)N * nh, (int64_t)N * N * nh < PARALLEL_MIN ? (int64_t)N * nh : 0,
                  attention_rows, &job);
  free(scores);
}

const m3_vision_ops cpu_vision_ops = {
    .layernorm = cpu_layernorm,
    .add_bias = cpu_add_bias,
    .gelu = cpu_gelu,
    .rope_3d = cpu_rope_3d,
    .attention_full = cpu_attention_full,
};
