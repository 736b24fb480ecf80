/* test_engine_quantize: quantized weights at load, end to end on the CPU backend.
 *
 * --quantize mxfp8: `m3 tiny` quantizes the linears of its MXFP8 checkpoint from the BF16 values
 * of the same seed, so a BF16 tiny model converted at load must hold, tensor for tensor, the bytes
 * of the MXFP8 tiny model and give its logits bit for bit. The converted values are also checked
 * against the BF16 source with the E4M3 error bound, so a wrong block or scale rule that tiny
 * shared would still fail.
 * Per-channel FP8: a checkpoint written here (E4M3 weight + `weight_scale` [N, 1] or [N]) from a
 * tiny F32 model decodes to the values computed here, and its logits equal those of the same
 * model with those values stored as F32. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/dtype.h"
#include "check.h"
#include "engine/kvcache.h"
#include "engine/runner.h"
#include "io/quantize.h"
#include "io/safetensors.h"
#include "io/tiny.h"
#include "io/weights.h"
#include "model/model.h"

enum { N_IDS = 40 };

/* ---- a checkpoint opened and bound, as the loader does ---- */

typedef struct {
  m3_config cfg;
  m3_safetensors *st;
  m3_weights w;
} bound;

static int open_bound(const char *dir, bound *b) {
  memset(b, 0, sizeof *b);
  char path[600];
  snprintf(path, sizeof path, "%s/config.json", dir);
  m3_status s = m3_config_load(path, &b->cfg);
  CHECK_OK(s);
  if (s == M3_OK) CHECK_OK(s = m3_st_open_dir(dir, &b->st));
  if (s == M3_OK) CHECK_OK(s = m3_weights_bind(&b->cfg, b->st, &b->w));
  return s == M3_OK;
}

static void close_bound(bound *b) {
  m3_weights_free(&b->w);
  if (b->st) m3_st_close(b->st);
  m3_config_free(&b->cfg);
}

/* Every tensor of the text model (layers, MTP), in a fixed order: *n of them into out. */
static void add_layer(const m3_config *c, m3_layer_weights *l, int moe, m3_tensor **out, int *n) {
  m3_tensor *f[] = {&l->input_norm, &l->post_attn_norm, &l->q_proj,       &l->k_proj,
                    &l->v_proj,     &l->o_proj,         &l->q_norm,       &l->k_norm,
                    &l->index_q_proj, &l->index_k_proj, &l->index_q_norm, &l->index_k_norm,
                    &l->mlp_gate,   &l->mlp_up,         &l->mlp_down,     &l->router,
                    &l->router_bias, &l->shared_gate,   &l->shared_up,    &l->shared_down};
  for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) out[(*n)++] = f[i];
  for (int e = 0; moe && e < c->num_experts; e++) {
    out[(*n)++] = &l->expert_gate[e];
    out[(*n)++] = &l->expert_up[e];
    out[(*n)++] = &l->expert_down[e];
  }
}

static int all_tensors(bound *b, m3_tensor **out) {
  int n = 0;
  out[n++] = &b->w.embed;
  out[n++] = &b->w.final_norm;
  out[n++] = &b->w.lm_head;
  for (int i = 0; i < b->cfg.num_layers; i++)
    add_layer(&b->cfg, &b->w.layers[i], b->cfg.layer_mlp[i] == M3_MLP_MOE, out, &n);
  for (int i = 0; i < b->w.num_mtp; i++) {
    out[n++] = &b->w.mtp[i].eh_proj;
    add_layer(&b->cfg, &b->w.mtp[i].layer, 1, out, &n);
  }
  return n;
}

static size_t scale_bytes(const m3_tensor *t) {
  return t->quant == M3_WQ_NONE ? 0
         : (size_t)(t->scale_rows * t->scale_cols) * (t->quant == M3_WQ_MXFP8 ? 1 : 4);
}

/* ---- logits through the runner ---- */

static float *logits_of(const char *dir, int quantize_mxfp8, int *vocab) {
  m3_backend *be = NULL;
  m3_model *model = NULL;
  m3_runner *runner = NULL;
  float *logits = NULL;
  m3_kv_seq seq;
  m3_kv_seq_init(&seq);
  CHECK_OK(m3_backend_cpu_create(2, &be));
  const m3_model_load_options o = {.quantize_mxfp8 = quantize_mxfp8, .threads = 2};
  if (be) CHECK_OK(m3_model_load_with(dir, be, &o, &model));
  if (model) {
    const m3_config *cfg = m3_model_config(model);
    int32_t ids[N_IDS];
    uint32_t s = 777;
    for (int i = 0; i < N_IDS; i++) {
      s = s * 1664525u + 1013904223u;
      ids[i] = (int32_t)((s >> 8) % (uint32_t)(cfg->vocab_size - 2));
    }
    *vocab = cfg->vocab_size;
    logits = malloc((size_t)N_IDS * (size_t)cfg->vocab_size * sizeof *logits);
    CHECK_OK(m3_runner_create(model, M3_KV_F32, m3_kv_bytes_for_tokens(cfg, M3_KV_F32, N_IDS),
                              &runner));
    if (runner) {
      CHECK_OK(m3_runner_feed(runner, &seq, ids, N_IDS, 0, logits, NULL));
      m3_kv_seq_release(m3_runner_cache(runner), &seq);
    }
    m3_runner_free(runner);
  }
  m3_model_free(model);
  if (be) be->ops->destroy(be);
  return logits;
}

/* ---- --quantize mxfp8 ---- */

/* |converted - source| within E4M3's rounding: half an ulp (1/16 of the value) for normal
 * values, the subnormal step for tiny ones, and the saturation at 448 x scale for a block's
 * largest values (amax / 2^e can reach 511.9 under the OCP rule). */
static int count_outside_e4m3_bound(const m3_tensor *q, const m3_tensor *src) {
  float *a = malloc((size_t)q->cols * sizeof *a), *b = malloc((size_t)q->cols * sizeof *b);
  int bad = 0;
  for (int64_t r = 0; r < q->rows; r++) {
    m3_tensor_row_f32(q, r, a);
    m3_tensor_row_f32(src, r, b);
    for (int64_t c0 = 0; c0 < q->cols; c0 += 32) {
      int64_t c1 = c0 + 32 < q->cols ? c0 + 32 : q->cols;
      double amax = 0;
      for (int64_t c = c0; c < c1; c++) amax = fmax(amax, fabs(b[c]));
      for (int64_t c = c0; c < c1; c++) {
        double err = fabs((double)a[c] - b[c]);
        if (err > fabs(b[c]) / 16 * 1.0000001 + amax / 65536 && err > fabs(b[c]) - amax * 448 / 512)
          bad++;
      }
    }
  }
  free(a);
  free(b);
  return bad;
}

static void test_quantize_mxfp8(const char *root) {
  char d_bf16[512], d_mx[512];
  snprintf(d_bf16, sizeof d_bf16, "%s/bf16", root);
  snprintf(d_mx, sizeof d_mx, "%s/mxfp8", root);
  m3_tiny_options opt = m3_tiny_default_options();
  opt.no_vision = 1;
  opt.threads = 2;
  CHECK_OK(m3_tiny_write(d_bf16, &opt));
  opt.dtype = M3_TINY_MXFP8;
  CHECK_OK(m3_tiny_write(d_mx, &opt));

  bound b, src, m;
  if (!open_bound(d_bf16, &b) || !open_bound(d_bf16, &src) || !open_bound(d_mx, &m)) return;
  const int64_t n_targets = m3_weights_mxfp8_targets(&b.cfg, &b.w, NULL);
  CHECK_OK(m3_weights_quantize_mxfp8(&b.cfg, &b.w, 2, NULL, NULL));
  CHECK_EQ_INT(b.w.num_quantized, m.w.num_quantized);
  CHECK_EQ_INT(b.w.num_quantized, (int)n_targets);
  CHECK_EQ_INT(b.w.num_replaced, (int)n_targets);
  CHECK_EQ_INT(m3_weights_mxfp8_targets(&b.cfg, &b.w, NULL), 0); /* nothing left to convert */
  enum { CAP = 4096 };
  m3_tensor **tb = malloc(CAP * sizeof *tb), **tm = malloc(CAP * sizeof *tm),
            **ts = malloc(CAP * sizeof *ts);
  int n = all_tensors(&b, tb);
  CHECK_EQ_INT(all_tensors(&m, tm), n);
  all_tensors(&src, ts);
  int differ = 0, converted = 0, bound_bad = 0;
  for (int i = 0; i < n; i++) {
    const m3_tensor *x = tb[i], *y = tm[i];
    if (!m3_tensor_present(y)) {
      differ += m3_tensor_present(x);
      continue;
    }
    size_t bytes = (size_t)(x->rows * x->cols) * m3_dtype_size(x->dtype);
    int same = x->dtype == y->dtype && x->quant == y->quant && x->rows == y->rows &&
               x->cols == y->cols && x->block_rows == y->block_rows &&
               x->block_cols == y->block_cols && x->scale_cols == y->scale_cols &&
               memcmp(x->data, y->data, bytes) == 0 &&
               (x->quant == M3_WQ_NONE || memcmp(x->scale, y->scale, scale_bytes(x)) == 0);
    if (!same && differ++ == 0) fprintf(stderr, "tensor %s differs from %s\n", x->name, y->name);
    if (x->quant == M3_WQ_MXFP8) {
      converted++;
      bound_bad += count_outside_e4m3_bound(x, ts[i]);
    }
  }
  CHECK_EQ_INT(differ, 0);
  CHECK_EQ_INT(converted, (int)n_targets);
  CHECK(converted > 0);
  CHECK_EQ_INT(bound_bad, 0);
  free(tb);
  free(tm);
  free(ts);
  close_bound(&b);
  close_bound(&src);
  close_bound(&m);

  int vocab = 0;
  float *lq = logits_of(d_bf16, 1, &vocab), *lm = logits_of(d_mx, 0, &vocab),
        *lb = logits_of(d_bf16, 0, &vocab);
  if (lq && lm && lb) {
    size_t bytes = (size_t)N_IDS * (size_t)vocab * sizeof *lq;
    CHECK(memcmp(lq, lm, bytes) == 0);
    CHECK(memcmp(lq, lb, bytes) != 0); /* the conversion did change the model */
  }
  free(lq);
  free(lm);
  free(lb);
}

/* The conversion reports the bytes of the tensors it converts; the prefault afterwards touches
 * the rest of the checkpoint, not the BF16 data nothing reads any more. */
typedef struct {
  uint64_t done, total;
  int calls;
} progress_log;

static void log_progress(uint64_t done, uint64_t total, void *user) {
  progress_log *p = user;
  p->done = done;
  p->total = total;
  p->calls++;
}

static void test_load_progress(const char *dir) {
  bound b;
  if (!open_bound(dir, &b)) return;
  const int64_t n = m3_weights_mxfp8_targets(&b.cfg, &b.w, NULL);
  m3_tensor **targets = malloc((size_t)n * sizeof *targets);
  m3_weights_mxfp8_targets(&b.cfg, &b.w, targets);
  uint64_t converted = 0, file = 0;
  for (int64_t i = 0; i < n; i++) converted += (uint64_t)(targets[i]->rows * targets[i]->cols) * 2;
  for (int i = 0; i < m3_st_count(b.st); i++) file += m3_st_at(b.st, i)->nbytes;
  free(targets);
  close_bound(&b);

  m3_backend *be = NULL;
  m3_model *model = NULL;
  progress_log load = {0}, prefault = {0};
  CHECK_OK(m3_backend_cpu_create(2, &be));
  const m3_model_load_options o = {.quantize_mxfp8 = 1, .threads = 2, .progress = log_progress,
                                   .user = &load};
  if (be) CHECK_OK(m3_model_load_with(dir, be, &o, &model));
  if (model) {
    CHECK(load.calls >= 1);
    CHECK(load.done == converted && load.total == converted);
    m3_model_prefault(model, log_progress, &prefault);
    CHECK(prefault.calls >= 1);
    CHECK(prefault.total == file - converted && prefault.done == prefault.total);
  }
  m3_model_free(model);
  if (be) be->ops->destroy(be);
}

/* ---- per-channel FP8 ---- */

static double ref_e4m3(uint8_t v) {
  int exp = (v >> 3) & 15, man = v & 7;
  double mag = exp == 0 ? ldexp(man, -9) : ldexp(8 + man, exp - 10);
  return (v & 0x80) ? -mag : mag;
}

static int is_target(const char *name, m3_tensor *const *targets, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    if (strcmp(targets[i]->name, name) == 0) return 1;
  return 0;
}

static int copy_file(const char *from, const char *to) {
  FILE *a = fopen(from, "rb"), *b = fopen(to, "wb");
  int ok = a && b;
  char buf[4096];
  for (size_t got; ok && (got = fread(buf, 1, sizeof buf, a)) > 0;) ok = fwrite(buf, 1, got, b) == got;
  if (a) fclose(a);
  if (b && fclose(b) != 0) ok = 0;
  return ok;
}

/* From the F32 tiny model in src: dir_q holds the linears as E4M3 + per-row scale (F32 [N, 1]
 * for every other target, BF16 [N] for the rest: compressed-tensors keeps the model's dtype),
 * dir_f the same values decoded here, as F32. */
static int write_channel_pair(const char *src, const char *dir_q, const char *dir_f) {
  bound b;
  if (!open_bound(src, &b)) return 0;
  const int64_t n_targets = m3_weights_mxfp8_targets(&b.cfg, &b.w, NULL);
  m3_tensor **targets = malloc((size_t)n_targets * sizeof *targets);
  m3_weights_mxfp8_targets(&b.cfg, &b.w, targets);
  m3_st_writer *wq = m3_st_writer_new(), *wf = m3_st_writer_new();
  m3_status s = M3_OK;
  int64_t quantized = 0;
  for (int i = 0; i < m3_st_count(b.st) && s == M3_OK; i++) {
    const m3_st_tensor *t = m3_st_at(b.st, i);
    if (!is_target(t->name, targets, n_targets)) {
      s = m3_st_writer_add(wq, t->name, t->dtype, t->ndim, t->shape, t->data);
      if (s == M3_OK) s = m3_st_writer_add(wf, t->name, t->dtype, t->ndim, t->shape, t->data);
      continue;
    }
    const int64_t rows = t->shape[0], cols = t->shape[1];
    const float *x = t->data; /* an F32 checkpoint */
    uint8_t *q = malloc((size_t)(rows * cols));
    float *deq = malloc((size_t)(rows * cols) * sizeof *deq), *scale = malloc((size_t)rows * 4);
    uint16_t *scale_bf16 = malloc((size_t)rows * 2);
    const int use_bf16 = quantized++ % 2;
    for (int64_t r = 0; r < rows; r++) {
      float amax = 0;
      for (int64_t c = 0; c < cols; c++) amax = fmaxf(amax, fabsf(x[r * cols + c]));
      float sc = amax > 0 ? amax / 448.0f : 1.0f;
      if (use_bf16) {
        scale_bf16[r] = m3_f32_to_bf16(sc);
        sc = m3_bf16_to_f32(scale_bf16[r]);
      }
      scale[r] = sc;
      for (int64_t c = 0; c < cols; c++) {
        q[r * cols + c] = m3_f32_to_e4m3(x[r * cols + c] / sc);
        deq[r * cols + c] = (float)ref_e4m3(q[r * cols + c]) * sc;
      }
    }
    char scale_name[600];
    snprintf(scale_name, sizeof scale_name, "%s_scale", t->name);
    s = m3_st_writer_add(wq, t->name, M3_DT_F8_E4M3, 2, t->shape, q);
    if (s == M3_OK && use_bf16)
      s = m3_st_writer_add(wq, scale_name, M3_DT_BF16, 1, (const int64_t[]){rows}, scale_bf16);
    else if (s == M3_OK)
      s = m3_st_writer_add(wq, scale_name, M3_DT_F32, 2, (const int64_t[]){rows, 1}, scale);
    if (s == M3_OK) s = m3_st_writer_add(wf, t->name, M3_DT_F32, 2, t->shape, deq);
    free(q);
    free(deq);
    free(scale);
    free(scale_bf16);
  }
  char path[600], cfg_from[600], cfg_to[600];
  const char *dirs[] = {dir_q, dir_f};
  m3_st_writer *ws[] = {wq, wf};
  for (int k = 0; k < 2 && s == M3_OK; k++) {
    snprintf(path, sizeof path, "mkdir -p %s", dirs[k]);
    CHECK(system(path) == 0);
    snprintf(path, sizeof path, "%s/model.safetensors", dirs[k]);
    CHECK_OK(s = m3_st_writer_write(ws[k], path));
    snprintf(cfg_from, sizeof cfg_from, "%s/config.json", src);
    snprintf(cfg_to, sizeof cfg_to, "%s/config.json", dirs[k]);
    CHECK(copy_file(cfg_from, cfg_to));
  }
  CHECK(quantized > 2);
  m3_st_writer_free(wq);
  m3_st_writer_free(wf);
  free(targets);
  close_bound(&b);
  return s == M3_OK;
}

static void test_fp8_channel(const char *root) {
  char d_f32[512], d_q[512], d_f[512];
  snprintf(d_f32, sizeof d_f32, "%s/f32", root);
  snprintf(d_q, sizeof d_q, "%s/fp8_channel", root);
  snprintf(d_f, sizeof d_f, "%s/fp8_decoded", root);
  m3_tiny_options opt = m3_tiny_default_options();
  opt.no_vision = 1;
  opt.threads = 2;
  opt.dtype = M3_TINY_F32;
  CHECK_OK(m3_tiny_write(d_f32, &opt));
  if (!write_channel_pair(d_f32, d_q, d_f)) return;

  /* The loader's decode of every row equals the F32 values written beside it. */
  bound q, f;
  if (!open_bound(d_q, &q) || !open_bound(d_f, &f)) return;
  enum { CAP = 4096 };
  m3_tensor **tq = malloc(CAP * sizeof *tq), **tf = malloc(CAP * sizeof *tf);
  int n = all_tensors(&q, tq), channel = 0, bad = 0;
  all_tensors(&f, tf);
  for (int i = 0; i < n; i++) {
    if (!m3_tensor_present(tq[i]) || tq[i]->quant == M3_WQ_NONE) continue;
    channel++;
    CHECK_EQ_INT(tq[i]->quant, M3_WQ_FP8_BLOCK);
    CHECK_EQ_INT(tq[i]->block_rows, 1);
    float *a = malloc((size_t)tq[i]->cols * 4), *b = malloc((size_t)tq[i]->cols * 4);
    for (int64_t r = 0; r < tq[i]->rows; r++) {
      m3_tensor_row_f32(tq[i], r, a);
      m3_tensor_row_f32(tf[i], r, b);
      bad += memcmp(a, b, (size_t)tq[i]->cols * 4) != 0;
    }
    free(a);
    free(b);
  }
  CHECK(channel > 2);
  CHECK_EQ_INT(q.w.num_quantized, channel);
  CHECK_EQ_INT(bad, 0);
  free(tq);
  free(tf);
  close_bound(&q);
  close_bound(&f);

  int vocab = 0;
  float *lq = logits_of(d_q, 0, &vocab), *lf = logits_of(d_f, 0, &vocab);
  if (lq && lf) {
    double amax = 0, worst = 0;
    for (size_t i = 0; i < (size_t)N_IDS * (size_t)vocab; i++) amax = fmax(amax, fabs(lf[i]));
    for (size_t i = 0; i < (size_t)N_IDS * (size_t)vocab; i++)
      worst = fmax(worst, fabs((double)lq[i] - lf[i]));
    CHECK(amax > 0);
    CHECK_NEAR(worst / amax, 0.0, 1e-5);
  }
  free(lq);
  free(lf);
}

int main(void) {
  char root[] = "/tmp/m3_test_quantize_XXXXXX";
  if (!mkdtemp(root)) {
    fprintf(stderr, "mkdtemp failed\n");
    return 1;
  }
  test_quantize_mxfp8(root);
  char d_bf16[600];
  snprintf(d_bf16, sizeof d_bf16, "%s/bf16", root);
  test_load_progress(d_bf16);
  test_fp8_channel(root);
  char cmd[600];
  snprintf(cmd, sizeof cmd, "rm -rf %s", root);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", root);
  return check_summary();
}
