/* moe_experts of the CPU backend against a naive per-token reference written here in double
 * precision: for each token and each of its k choices in order, the chosen expert's gate, up and
 * down rows applied to that token alone. Weights F32, BF16 and MXFP8 (their exact decoded values
 * are the reference's weights); ragged expert loads (unused experts, one expert in every token);
 * T = 1 and T = 37; a negative choice (no expert) turns only its token's row into NaN.
 * Expert parallelism: a rank holding experts [first, first + held) of E (m3_moe_experts.first)
 * against the same reference counting only those choices, and bit for bit against the whole op
 * restricted by hand (every other choice's weight 0, whose products add +0).
 * A shared expert (m3_moe_experts.shared_*): added after the routed choices, against the same
 * reference, and bit for bit against the routed op followed by the ops the model ran for the
 * shared expert before the experts op took it (matmul gate and up, swiglu_oai, matmul down, add). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "base/dtype.h"
#include "base/mxfp8.h"
#include "check.h"
#include "random.h"



enum { W_F32, W_BF16, W_MXFP8, W_KINDS };
static const char *const kind_name[W_KINDS] = {"F32", "BF16", "MXFP8"};

/* One expert matrix: the tensor the backend reads and its exact values for the reference. */
typedef struct {
  m3_tensor t;
  void *data, *scale;
  double *ref; /* [rows * cols] */
} weight;

static weight make_weight(int kind, int64_t rows, int64_t cols, float range) {
  weight w;
  memset(&w, 0, sizeof w);
  const size_t n = (size_t)rows * (size_t)cols;
  float *f = malloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) f[i] = uniform(-range, range);
  w.ref = malloc(n * sizeof(double));
  w.t.name = "expert";
  w.t.rows = rows;
  w.t.cols = cols;
  if (kind == W_F32) {
    for (size_t i = 0; i < n; i++) w.ref[i] = f[i];
    w.data = f;
    w.t.dtype = M3_DT_F32;
  } else if (kind == W_BF16) {
    uint16_t *d = malloc(n * 2);
    for (size_t i = 0; i < n; i++) {
      d[i] = m3_f32_to_bf16(f[i]);
      w.ref[i] = m3_bf16_to_f32(d[i]);
    }
    free(f);
    w.data = d;
    w.t.dtype = M3_DT_BF16;
  } else {
    const int64_t sc = (cols + 31) / 32;
    uint8_t *q = malloc(n), *s = malloc((size_t)(rows * sc));
    for (int64_t r = 0; r < rows; r++) m3_mxfp8_quantize_row(f + r * cols, cols, q + r * cols, s + r * sc);
    for (int64_t r = 0; r < rows; r++)
      for (int64_t c = 0; c < cols; c++) /* the engine multiplies in float32 */
        w.ref[r * cols + c] = m3_e4m3_to_f32(q[r * cols + c]) * m3_e8m0_to_f32(s[r * sc + c / 32]);
    free(f);
    w.data = q;
    w.scale = s;
    w.t.dtype = M3_DT_F8_E4M3;
    w.t.quant = M3_WQ_MXFP8;
    w.t.block_rows = 1;
    w.t.block_cols = 32;
    w.t.scale_rows = rows;
    w.t.scale_cols = sc;
  }
  w.t.data = w.data;
  w.t.scale = w.scale;
  return w;
}

static void free_weight(weight *w) {
  free(w->data);
  free(w->scale);
  free(w->ref);
}

typedef struct {
  int H, I, E, k, T;
  int kind;
  int skew;        /* 1: expert 0 is every token's first choice; choices use only half the experts */
  int bad_token;   /* >= 0: this token's last choice is -1 */
  int first, held; /* the rank's experts [first, first + held); held 0: all E */
  int S;           /* > 0: a shared expert of this width (held == E) */
} moe_case;

static const float ALPHA = 1.702f, BETA = 1.0f, LIMIT = 7.0f;

static double ref_swiglu(double g, double u) {
  g = fmin(g, LIMIT);
  u = fmin(fmax(u, -LIMIT), LIMIT);
  return g / (1.0 + exp(-ALPHA * g)) * (u + BETA);
}

/* x_ref[t] += SwiGLU expert (gate, up, down; width I) of h[t], and mag[t] its absolute terms,
 * both times `scale`. */
static void ref_expert(const weight *gate, const weight *up, const weight *down, int H, int I,
                       const float *ht, double scale, double *act, double *x_ref, double *mag) {
  for (int r = 0; r < I; r++) {
    double g = 0, u = 0;
    for (int col = 0; col < H; col++) {
      g += gate->ref[(size_t)r * H + col] * ht[col];
      u += up->ref[(size_t)r * H + col] * ht[col];
    }
    act[r] = ref_swiglu(g, u);
  }
  for (int r = 0; r < H; r++) {
    double y = 0, m = 0;
    for (int col = 0; col < I; col++) {
      y += down->ref[(size_t)r * I + col] * act[col];
      m += fabs(down->ref[(size_t)r * I + col] * act[col]);
    }
    x_ref[r] += scale * y;
    mag[r] += scale * m;
  }
}

/* Distinct choices per token (moe_route's top-k never repeats an expert). */
static void random_ids(const moe_case *c, int32_t *ids) {
  const int pool = c->skew ? c->E / 2 : c->E;
  for (int t = 0; t < c->T; t++)
    for (int j = 0; j < c->k; j++) {
      int32_t e;
      int dup;
      do {
        e = c->skew && j == 0 ? 0 : (int32_t)(rnd() % (uint32_t)pool);
        dup = 0;
        for (int i = 0; i < j; i++) dup |= ids[t * c->k + i] == e;
      } while (dup);
      ids[t * c->k + j] = e;
    }
  if (c->bad_token >= 0) ids[c->bad_token * c->k + c->k - 1] = -1;
}

static void run_case(m3_backend *be, const moe_case *c) {
  const int H = c->H, I = c->I, E = c->E, k = c->k, T = c->T;
  weight *gate = malloc((size_t)E * sizeof *gate), *up = malloc((size_t)E * sizeof *up),
         *down = malloc((size_t)E * sizeof *down);
  m3_tensor *tg = malloc((size_t)E * sizeof *tg), *tu = malloc((size_t)E * sizeof *tu),
            *td = malloc((size_t)E * sizeof *td);
  for (int e = 0; e < E; e++) {
    gate[e] = make_weight(c->kind, I, H, 0.5f), tg[e] = gate[e].t;
    up[e] = make_weight(c->kind, I, H, 0.5f), tu[e] = up[e].t;
    down[e] = make_weight(c->kind, H, I, 0.5f), td[e] = down[e].t;
  }
  const int first = c->first, held = c->held ? c->held : E;
  m3_moe_experts ex = {.gate = tg + first, .up = tu + first, .down = td + first, .E = held,
                       .first = first, .alpha = ALPHA, .beta = BETA, .limit = LIMIT};
  weight sg = {0}, su = {0}, sd = {0};
  if (c->S) {
    sg = make_weight(c->kind, c->S, H, 0.5f), su = make_weight(c->kind, c->S, H, 0.5f);
    sd = make_weight(c->kind, H, c->S, 0.5f);
    ex.shared_gate = &sg.t, ex.shared_up = &su.t, ex.shared_down = &sd.t;
  }
  CHECK_OK(be->ops->prepare_experts(be, &ex));

  float *h = malloc((size_t)T * H * sizeof(float)), *x = malloc((size_t)T * H * sizeof(float));
  float *w = malloc((size_t)T * k * sizeof(float));
  int32_t *ids = malloc((size_t)T * k * sizeof(int32_t));
  for (int i = 0; i < T * H; i++) h[i] = uniform(-2, 2), x[i] = uniform(-1, 1);
  for (int i = 0; i < T * k; i++) w[i] = uniform(0.05f, 1.5f);
  random_ids(c, ids);
  double *x_ref = malloc((size_t)T * H * sizeof(double)), *mag = calloc((size_t)T * H, sizeof(double));
  double *act = malloc((size_t)(I > c->S ? I : c->S) * sizeof(double));
  for (int i = 0; i < T * H; i++) x_ref[i] = x[i];
  for (int t = 0; t < T; t++) {
    const float *ht = h + (size_t)t * H;
    for (int j = 0; j < k; j++) {
      const int e = ids[t * k + j];
      if (e < first || e >= first + held) continue;
      ref_expert(&gate[e], &up[e], &down[e], H, I, ht, w[t * k + j], act, x_ref + (size_t)t * H,
                 mag + (size_t)t * H);
    }
    if (c->S) ref_expert(&sg, &su, &sd, H, c->S, ht, 1.0, act, x_ref + (size_t)t * H, mag + (size_t)t * H);
  }

  float *x_whole = malloc((size_t)T * H * sizeof(float));
  memcpy(x_whole, x, (size_t)T * H * sizeof(float));
  be->ops->moe_experts(be, &ex, h, T, ids, w, k, x);
  int bad = 0;
  for (int t = 0; t < T; t++)
    for (int r = 0; r < H; r++) {
      const size_t i = (size_t)t * H + r;
      const int ok = t == c->bad_token
                         ? isnan(x[i])
                         : fabs(x[i] - x_ref[i]) <= 1e-4 * (mag[i] + fabs(x_ref[i])) + 1e-6;
      if (!ok && bad++ < 3)
        fprintf(stderr, "  %s H %d I %d E %d k %d T %d skew %d: x[%d][%d] = %.9g, reference %.9g\n",
                kind_name[c->kind], H, I, E, k, T, c->skew, t, r, x[i], x_ref[i]);
    }
  CHECK_EQ_INT(bad, 0);
  if (c->S) { /* the routed op, then the shared expert as the model's ops ran it */
    m3_moe_experts routed = ex;
    routed.shared_gate = routed.shared_up = routed.shared_down = NULL;
    float *g = malloc((size_t)T * c->S * 2 * sizeof(float)), *u = g + (size_t)T * c->S;
    float *out = malloc((size_t)T * H * sizeof(float));
    be->ops->moe_experts(be, &routed, h, T, ids, w, k, x_whole);
    be->ops->matmul(be, &sg.t, h, T, g);
    be->ops->matmul(be, &su.t, h, T, u);
    be->ops->swiglu_oai(be, g, u, (size_t)T * c->S, ALPHA, BETA, LIMIT, g);
    be->ops->matmul(be, &sd.t, g, T, out);
    be->ops->add(be, x_whole, out, (size_t)T * H);
    CHECK(memcmp(x, x_whole, (size_t)T * H * sizeof(float)) == 0);
    free(g), free(out);
    free_weight(&sg), free_weight(&su), free_weight(&sd);
  }
  if (held < E) {
    m3_moe_experts whole = {.gate = tg, .up = tu, .down = td, .E = E, .alpha = ALPHA,
                            .beta = BETA, .limit = LIMIT};
    CHECK_OK(be->ops->prepare_experts(be, &whole));
    for (int i = 0; i < T * k; i++)
      if (ids[i] < first || ids[i] >= first + held) w[i] = 0;
    be->ops->moe_experts(be, &whole, h, T, ids, w, k, x_whole);
    CHECK(memcmp(x, x_whole, (size_t)T * H * sizeof(float)) == 0);
    be->ops->release_experts(be, &whole);
  }

  be->ops->release_experts(be, &ex);
  for (int e = 0; e < E; e++) free_weight(&gate[e]), free_weight(&up[e]), free_weight(&down[e]);
  free(gate), free(up), free(down), free(tg), free(tu), free(td);
  free(h), free(x), free(x_whole), free(w), free(ids), free(x_ref), free(mag), free(act);
}

int main(void) {
  test_rng_state = 0x2545F4914F6CDD1Dull; /* this program's inputs since it was written */
  m3_backend *be;
  CHECK_OK(m3_backend_cpu_create(2, &be));
  static const int shapes[][4] = {{64, 32, 8, 2}, {96, 64, 16, 4}, {128, 96, 6, 6}}; /* H I E k */
  static const int Ts[] = {1, 37};
  for (int kind = 0; kind < W_KINDS; kind++)
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
      for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++)
        for (int skew = 0; skew < 2; skew++) {
          moe_case c = {shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3], Ts[ti], kind,
                        skew, -1, 0, 0, 0};
          if (skew && c.k > c.E / 2) continue; /* k distinct choices among E/2 experts */
          run_case(be, &c);
        }
  /* One token's out-of-range choice: that row is NaN, every other row is exact. */
  moe_case bad = {64, 32, 8, 2, 5, W_BF16, 0, 3, 0, 0, 0};
  run_case(be, &bad);
  /* Expert-parallel ranks: the first, a middle and the last of E / held, and with a bad token
   * (NaN whatever rank) or the skewed load (expert 0 on rank 0 only). */
  static const int ranks[][5] = {{8, 4, 0, 0, 0}, {8, 4, 4, 0, 0}, {16, 4, 8, 1, 0},
                                 {16, 4, 12, 0, 1}, {6, 2, 2, 0, 0}}; /* E held first skew bad */
  for (size_t r = 0; r < sizeof ranks / sizeof ranks[0]; r++)
    for (int kind = 0; kind < W_KINDS; kind++) {
      const int E = ranks[r][0];
      moe_case ep = {E == 16 ? 96 : 64, 32, E, E == 6 ? 6 : 4, 37, kind, ranks[r][3],
                     ranks[r][4] ? 7 : -1, ranks[r][2], ranks[r][1], 0};
      run_case(be, &ep);
    }
  /* A single-thread backend runs the same code without the pool. */
  m3_backend *one;
  CHECK_OK(m3_backend_cpu_create(1, &one));
  moe_case c1 = {96, 64, 16, 4, 37, W_MXFP8, 1, -1, 0, 0, 0};
  run_case(one, &c1);
  /* A shared expert of the routed width and of another, each dtype, one token and 37. */
  for (int kind = 0; kind < W_KINDS; kind++)
    for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++) {
      moe_case sh = {96, 64, 16, 4, Ts[ti], kind, 0, -1, 0, 0, 64};
      run_case(be, &sh);
      moe_case wide = {64, 32, 8, 2, Ts[ti], kind, 0, ti ? 3 : -1, 0, 0, 96};
      run_case(be, &wide);
    }
  one->ops->destroy(one);
  be->ops->destroy(be);
  return check_summary();
}
