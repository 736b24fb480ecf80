/* test_cuda_ops: every op of the CUDA backend against the CPU backend on the same random inputs
 * (several shapes each, ragged positions with padding rows, paged caches with shuffled block
 * tables, real MSA selections), run on the GPU machine by scripts/gpu.sh; not a CTest test (CI
 * has no GPU). GPU outputs are poisoned with NaN before each call, so an element a kernel forgets
 * to write fails. Prints one line per op (cases, worst normalized error max|gpu - cpu| / max|cpu|,
 * tolerance) and the block-selection and routing mismatches, counting those on near-ties
 * separately; exits 1 on any failure. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "../random.h"
#include "base/dtype.h"
#include "base/mxfp8.h"

static m3_backend *cpu, *gpu;

/* ---- random inputs ---- */



static float *random_floats(size_t n, float lo, float hi) {
  float *v = calloc(n + 1, sizeof(float));
  for (size_t i = 0; i < n; i++) v[i] = uniform(lo, hi);
  return v;
}

/* Multiples of 1/8 in [-1, 1]: short dot products of them are exact, so ties are real ties. */
static float *random_eighths(size_t n) {
  float *v = calloc(n + 1, sizeof(float));
  for (size_t i = 0; i < n; i++) v[i] = (float)((int)(rnd() % 17) - 8) / 8.0f;
  return v;
}

/* ---- one buffer on both backends ---- */

typedef struct {
  void *c, *g;
  size_t bytes;
} pair;

static void must(m3_status st, const char *what) {
  if (st != M3_OK) {
    fprintf(stderr, "FATAL: %s: %s\n", what, m3_last_error());
    exit(1);
  }
}

/* Names a case on stderr before it runs (the table on stdout comes at the end): a hang or a crash
 * on the GPU machine then shows which case. */
static void progress(const char *what) { fprintf(stderr, "   %s\n", what); }

static pair pair_from(const void *host, size_t bytes) {
  pair p = {cpu->ops->alloc(cpu, bytes), gpu->ops->alloc(gpu, bytes), bytes};
  if (!p.c || !p.g) must(M3_ERR_NOMEM, "alloc");
  must(cpu->ops->to_device(cpu, p.c, host, bytes), "to_device (cpu)");
  must(gpu->ops->to_device(gpu, p.g, host, bytes), "to_device (cuda)");
  return p;
}

/* n floats: the CPU copy zeroed, the GPU copy NaN. */
static pair pair_poisoned(size_t n) {
  float *nan = malloc(n * sizeof(float) + 4);
  for (size_t i = 0; i < n; i++) nan[i] = NAN;
  pair p = pair_from(nan, n * sizeof(float));
  memset(p.c, 0, n * sizeof(float));
  free(nan);
  return p;
}

static void pair_free(pair *p) {
  cpu->ops->free(cpu, p->c);
  gpu->ops->free(gpu, p->g);
}

/* The GPU copy, fetched into a malloc'd host buffer. */
static void *gpu_copy(const pair *p) {
  void *h = malloc(p->bytes + 4);
  must(gpu->ops->to_host(gpu, h, p->g, p->bytes), "to_host");
  return h;
}

/* ---- per-op results ---- */

typedef struct {
  const char *name;
  int cases, failed;
  double worst, tol;
  int mismatches, near_ties; /* selections / routes that differ; of them, on near-ties */
} op_result;

enum {
  OP_EMBED, OP_MATMUL_F32, OP_MATMUL_SPLIT, OP_MATMUL_BF16ACT, OP_RMSNORM, OP_ROPE, OP_RMSNORM_ROPE, OP_SWIGLU, OP_ADD,
  OP_ADD_RMSNORM, OP_ADD_RMSNORM_SELF, OP_ARGMAX,
  OP_KV_STORE, OP_MSA, OP_ATT_DENSE, OP_ATT_SPARSE, OP_ATT_TC_DENSE, OP_ATT_TC_SPARSE, OP_MOE,
  OP_MOE_EXPERTS_DECODE, OP_MOE_EXPERTS_PREFILL,
  OP_VIS_LAYERNORM, OP_VIS_ADD_BIAS, OP_VIS_GELU, OP_VIS_ROPE3D, OP_VIS_ATTENTION,
  OP_KV8_STORE, OP_KV8_ATT_DENSE, OP_KV8_ATT_SPARSE, OP_KV8_ATT_TC_DENSE, OP_KV8_ATT_TC_SPARSE, OP_COUNT
};
static op_result results[OP_COUNT] = {
    [OP_EMBED] = {"embed", 0, 0, 0, 1e-6, 0, 0},
    [OP_MATMUL_F32] = {"matmul (fp32 activations)", 0, 0, 0, 1e-5, 0, 0},
    [OP_MATMUL_SPLIT] = {"matmul (hi + lo bf16 act., cuBLASLt/e4m3 tc)", 0, 0, 0, 1e-4, 0, 0},
    [OP_MATMUL_BF16ACT] = {"matmul (bf16 activations or weights, cuBLASLt)", 0, 0, 0, 1e-2, 0, 0},
    [OP_RMSNORM] = {"rmsnorm", 0, 0, 0, 1e-5, 0, 0},
    [OP_ROPE] = {"rope", 0, 0, 0, 1e-5, 0, 0},
    [OP_RMSNORM_ROPE] = {"rmsnorm_rope (fused)", 0, 0, 0, 1e-5, 0, 0},
    [OP_SWIGLU] = {"swiglu_oai", 0, 0, 0, 1e-5, 0, 0},
    [OP_ADD] = {"add", 0, 0, 0, 1e-6, 0, 0},
    [OP_ADD_RMSNORM] = {"add_rmsnorm (fused)", 0, 0, 0, 1e-5, 0, 0},
    [OP_ADD_RMSNORM_SELF] = {"add_rmsnorm vs CUDA add + rmsnorm (bits)", 0, 0, 0, 0, 0, 0},
    [OP_ARGMAX] = {"argmax_rows (ids, exact)", 0, 0, 0, 0, 0, 0},
    [OP_KV_STORE] = {"kv_store", 0, 0, 0, 1e-6, 0, 0},
    [OP_MSA] = {"msa_select", 0, 0, 0, 0, 0, 0},
    [OP_ATT_DENSE] = {"attention (dense)", 0, 0, 0, 1e-5, 0, 0},
    [OP_ATT_SPARSE] = {"attention (MSA blocks)", 0, 0, 0, 1e-5, 0, 0},
    [OP_ATT_TC_DENSE] = {"attention (dense, prefill BF16 tensor cores)", 0, 0, 0, 1e-2, 0, 0},
    [OP_ATT_TC_SPARSE] = {"attention (MSA blocks, prefill BF16 tensor cores)", 0, 0, 0, 1e-2, 0, 0},
    [OP_MOE] = {"moe_route (weights)", 0, 0, 0, 1e-5, 0, 0},
    [OP_MOE_EXPERTS_DECODE] = {"moe_experts (grouped GEMV)", 0, 0, 0, 1e-4, 0, 0},
    [OP_MOE_EXPERTS_PREFILL] = {"moe_experts (per-expert matmuls)", 0, 0, 0, 2e-2, 0, 0},
    [OP_VIS_LAYERNORM] = {"vision layernorm", 0, 0, 0, 1e-5, 0, 0},
    [OP_VIS_ADD_BIAS] = {"vision add_bias", 0, 0, 0, 1e-6, 0, 0},
    [OP_VIS_GELU] = {"vision gelu", 0, 0, 0, 1e-5, 0, 0},
    [OP_VIS_ROPE3D] = {"vision rope_3d", 0, 0, 0, 1e-5, 0, 0},
    [OP_VIS_ATTENTION] = {"vision attention_full", 0, 0, 0, 1e-5, 0, 0},
    [OP_KV8_STORE] = {"kv_store fp8 (bytes differing)", 0, 0, 0, 0, 0, 0},
    [OP_KV8_ATT_DENSE] = {"attention fp8 cache (dense)", 0, 0, 0, 1e-5, 0, 0},
    [OP_KV8_ATT_SPARSE] = {"attention fp8 cache (MSA blocks)", 0, 0, 0, 1e-5, 0, 0},
    [OP_KV8_ATT_TC_DENSE] = {"attention fp8 cache (dense, prefill TC)", 0, 0, 0, 1e-2, 0, 0},
    [OP_KV8_ATT_TC_SPARSE] = {"attention fp8 cache (MSA, prefill TC)", 0, 0, 0, 1e-2, 0, 0},
};

/* max|got - ref| / max|ref|; NaN where ref is not NaN (or the reverse) counts as infinite. */
static double normalized_error(const float *ref, const float *got, size_t n) {
  double worst = 0, scale = 0;
  for (size_t i = 0; i < n; i++)
    if (!isnan(ref[i]) && fabs(ref[i]) > scale) scale = fabs(ref[i]);
  for (size_t i = 0; i < n; i++) {
    if (isnan(ref[i]) != isnan(got[i])) return INFINITY;
    if (!isnan(ref[i]) && fabs((double)got[i] - ref[i]) > worst) worst = fabs((double)got[i] - ref[i]);
  }
  return scale > 0 ? worst / scale : worst;
}

static void record(int op, const char *what, const float *ref, const float *got, size_t n) {
  op_result *r = &results[op];
  double e = normalized_error(ref, got, n);
  r->cases++;
  if (e > r->worst) r->worst = e;
  if (!(e <= r->tol)) {
    r->failed++;
    fprintf(stderr, "FAIL %s [%s]: error %.3g over %.1g\n", r->name, what, e, r->tol);
  }
}

/* Compares a float output of both backends and frees it. */
static void compare(int op, const char *what, pair *out) {
  float *g = gpu_copy(out);
  record(op, what, out->c, g, out->bytes / sizeof(float));
  free(g);
}

/* ---- weights of every stored form ---- */

enum { W_F32, W_F16, W_BF16, W_MXFP8, W_FP8_BLOCK, W_KINDS };
static const char *const kind_name[W_KINDS] = {"F32", "F16", "BF16", "MXFP8", "FP8 block"};

typedef struct {
  m3_tensor c, g; /* host view for the CPU, prepared copy for the GPU */
  void *data, *scale;
} weight;

static uint8_t random_e4m3(void) {
  uint8_t b;
  do b = (uint8_t)rnd();
  while ((b & 0x7f) == 0x7f);
  return b;
}

static weight make_weight(int kind, int64_t rows, int64_t cols) {
  weight w;
  memset(&w, 0, sizeof w);
  m3_tensor *t = &w.c;
  t->name = kind_name[kind];
  t->rows = rows;
  t->cols = cols;
  size_t n = (size_t)rows * (size_t)cols;
  switch (kind) {
    case W_F32: {
      t->dtype = M3_DT_F32;
      w.data = random_floats(n, -1, 1);
      break;
    }
    case W_F16:
    case W_BF16: {
      uint16_t *d = malloc(n * 2);
      for (size_t i = 0; i < n; i++) {
        float f = uniform(-1, 1);
        d[i] = kind == W_F16 ? m3_f32_to_f16(f) : m3_f32_to_bf16(f);
      }
      t->dtype = kind == W_F16 ? M3_DT_F16 : M3_DT_BF16;
      w.data = d;
      break;
    }
    case W_MXFP8: {
      uint8_t *d = malloc(n);
      for (size_t i = 0; i < n; i++) d[i] = random_e4m3();
      t->scale_rows = rows;
      t->scale_cols = (cols + 31) / 32;
      uint8_t *s = malloc((size_t)(rows * t->scale_cols));
      /* 2^-15 .. 2^-8: every value below 1.75, as a real checkpoint's scales keep its weights
       * small. Larger ones (up to 448) put the experts' gate and up outputs in the hundreds,
       * where SwiGLU-OAI's clamp at 7 turns the BF16 rounding of activations into errors of
       * 5% that say nothing about the kernels. */
      for (int64_t i = 0; i < rows * t->scale_cols; i++) s[i] = (uint8_t)(112 + rnd() % 8);
      t->dtype = M3_DT_F8_E4M3;
      t->quant = M3_WQ_MXFP8;
      t->block_rows = 1;
      t->block_cols = 32;
      w.data = d;
      w.scale = s;
      break;
    }
    default: {
      uint8_t *d = malloc(n);
      for (size_t i = 0; i < n; i++) d[i] = random_e4m3();
      t->block_rows = 16;
      t->block_cols = 32;
      t->scale_rows = (rows + 15) / 16;
      t->scale_cols = (cols + 31) / 32;
      float *s = random_floats((size_t)(t->scale_rows * t->scale_cols), 0.001f, 0.01f);
      t->dtype = M3_DT_F8_E4M3;
      t->quant = M3_WQ_FP8_BLOCK;
      w.data = d;
      w.scale = s;
      break;
    }
  }
  t->data = w.data;
  t->scale = w.scale;
  w.g = w.c;
  must(cpu->ops->prepare_tensor(cpu, &w.c), "prepare_tensor (cpu)");
  must(gpu->ops->prepare_tensor(gpu, &w.g), "prepare_tensor (cuda)");
  return w;
}

static void free_weight(weight *w) {
  cpu->ops->release_tensor(cpu, &w->c);
  gpu->ops->release_tensor(gpu, &w->g);
  free(w->data);
  free(w->scale);
}

/* ---- ops ---- */

static void test_matmul(void) {
  static const int64_t shapes[][2] = {{37, 64}, {64, 320}, {33, 1000}, {5, 7}, {300, 2048}, {96, 96},
                                      {2100, 96}};
  /* T <= 8 (BF16 weights of 2048 rows or more: 2): the GEMV; then up to 64: cuBLASLt with the
   * activations as two BF16 terms; more: one */
  static const int Ts[] = {1, 2, 3, 8, 9, 17, 64, 65, 130};
  for (int kind = 0; kind < W_KINDS; kind++)
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
      int64_t rows = shapes[s][0], cols = shapes[s][1];
      if (kind >= W_MXFP8 && cols % 32 != 0) continue; /* MXFP8 checkpoints pad rows to 32 */
      char shape[64];
      snprintf(shape, sizeof shape, "%s %lldx%lld", kind_name[kind], (long long)rows, (long long)cols);
      progress(shape);
      weight w = make_weight(kind, rows, cols);
      for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++) {
        int T = Ts[ti];
        float *xh = random_floats((size_t)T * cols, -1, 1);
        pair x = pair_from(xh, (size_t)T * cols * 4), y = pair_poisoned((size_t)T * rows);
        cpu->ops->matmul(cpu, &w.c, x.c, T, y.c);
        gpu->ops->matmul(gpu, &w.g, x.g, T, y.g);
        char what[96];
        snprintf(what, sizeof what, "%s %lldx%lld T=%d", kind_name[kind], (long long)rows,
                 (long long)cols, T);
        /* F16 and FP8-block weights are rounded to BF16 on the way to cuBLASLt, so only BF16
         * and MXFP8 (exact in BF16) reach the split path's accuracy. BF16 weights of 2048 rows
         * or more leave the GEMV after 2 tokens, all others after 8. */
        const int exact_bf16 = kind == W_BF16 || kind == W_MXFP8;
        const int gemv = kind == W_F32 || T <= (kind == W_BF16 && rows >= 2048 ? 2 : 8);
        const int e4m3_tc = kind >= W_MXFP8 && T <= 64; /* matmul.cu mx_mma_kernel */
        compare(e4m3_tc                       ? OP_MATMUL_SPLIT
                : gemv                        ? OP_MATMUL_F32
                : T <= 64 && exact_bf16       ? OP_MATMUL_SPLIT
                                              : OP_MATMUL_BF16ACT,
                what, &y);
        pair_free(&x), pair_free(&y), free(xh);
      }
      free_weight(&w);
    }
}

/* The GEMV (T <= 8) on what its fast path must get right: rows not a multiple of the rows a block
 * takes (enough rows for 2 and 4 per block on an H100/H200), K not a whole number of 32-byte steps
 * (E4M3 with K % 32 == 16: its last MXFP8 block half full), x not 16-byte aligned (the element
 * path), an E4M3 NaN that only one lane's steps hold. */
static void test_matmul_gemv_edges(void) {
  static const int64_t shapes[][2] = {{4229, 80}, {2115, 336}, {3, 48}};
  static const int Ts[] = {1, 3, 8};
  for (int kind = 0; kind < W_KINDS; kind++)
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
      int64_t rows = shapes[s][0], cols = shapes[s][1];
      char shape[64];
      snprintf(shape, sizeof shape, "gemv %s %lldx%lld", kind_name[kind], (long long)rows, (long long)cols);
      progress(shape);
      weight w = make_weight(kind, rows, cols);
      if (kind >= W_MXFP8 && rows > 1000) {
        /* An E4M3 NaN byte in row 1000, column 40: the second 32-byte step, which another lane
         * than lane 0 reads; the row's outputs are NaN on both backends. */
        ((uint8_t *)w.data)[1000 * cols + 40] = 0x7f;
        must(gpu->ops->to_device(gpu, (void *)w.g.data, w.data, (size_t)(rows * cols)), "to_device");
      }
      for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++)
        for (int offset = 0; offset < 2; offset++) {
          int T = Ts[ti];
          float *xh = random_floats((size_t)T * cols + 1, -1, 1);
          pair x = pair_from(xh, ((size_t)T * cols + 1) * 4), y = pair_poisoned((size_t)T * rows);
          cpu->ops->matmul(cpu, &w.c, (float *)x.c + offset, T, y.c);
          gpu->ops->matmul(gpu, &w.g, (float *)x.g + offset, T, y.g);
          char what[96];
          snprintf(what, sizeof what, "gemv %s %lldx%lld T=%d x offset %d", kind_name[kind],
                   (long long)rows, (long long)cols, T, offset);
          /* E4M3 with x aligned: the tensor-core kernel (hi + lo BF16 activations) */
          compare(kind >= W_MXFP8 && offset == 0 ? OP_MATMUL_SPLIT : OP_MATMUL_F32, what, &y);
          pair_free(&x), pair_free(&y), free(xh);
        }
      free_weight(&w);
    }
}

/* FP8 per-channel weights (compressed-tensors): one float32 scale per row, as src/io/weights.c
 * attaches them (block_rows 1, block_cols the next power of two >= cols, so one scale column). */
static weight make_channel_weight(int64_t rows, int64_t cols) {
  weight w;
  memset(&w, 0, sizeof w);
  m3_tensor *t = &w.c;
  t->name = "FP8 per channel";
  t->rows = rows, t->cols = cols;
  uint8_t *d = malloc((size_t)(rows * cols));
  for (int64_t i = 0; i < rows * cols; i++) d[i] = random_e4m3();
  int bc = 32;
  while (bc < cols) bc *= 2;
  t->dtype = M3_DT_F8_E4M3;
  t->quant = M3_WQ_FP8_BLOCK;
  t->block_rows = 1, t->block_cols = bc;
  t->scale_rows = rows, t->scale_cols = 1;
  w.data = d;
  w.scale = random_floats((size_t)rows, 0.001f, 0.01f);
  t->data = w.data, t->scale = w.scale;
  w.g = w.c;
  must(cpu->ops->prepare_tensor(cpu, &w.c), "prepare_tensor (cpu)");
  must(gpu->ops->prepare_tensor(gpu, &w.g), "prepare_tensor (cuda)");
  return w;
}

/* E4M3 weights on the tensor-core kernel (1..64 tokens, matmul.cu mx_mma_kernel) and past it
 * (65, 300: cuBLASLt), MXFP8, FP8 block and per channel: rows not a multiple of the 16 or 32 rows a
 * warp or block takes, K with a short last 32-column block (K % 32 = 8, 16, 24), both row splits
 * of the launch (the 4229-row shape gives 2 m-tiles and several warps side by side per block on
 * an H100/H200), an E4M3 NaN in one row, and a matrix of only E4M3 subnormals (exponent field 0;
 * the BF16 conversion must keep them: flushed, the output would be 0). */
static void mx_mma_case(weight *w, const char *label, int nan_row, const int *Ts, int nT) {
  const int64_t rows = w->c.rows, cols = w->c.cols;
  if (nan_row >= 0) {
    ((uint8_t *)w->data)[nan_row * cols + cols - 3] = 0x7f; /* in the last (maybe short) block */
    must(gpu->ops->to_device(gpu, (void *)w->g.data, w->data, (size_t)(rows * cols)), "to_device");
  }
  for (int ti = 0; ti < nT; ti++) {
    const int T = Ts[ti];
    float *xh = random_floats((size_t)T * cols, -1, 1);
    pair x = pair_from(xh, (size_t)T * cols * 4), y = pair_poisoned((size_t)T * rows);
    cpu->ops->matmul(cpu, &w->c, x.c, T, y.c);
    gpu->ops->matmul(gpu, &w->g, x.g, T, y.g);
    char what[128];
    snprintf(what, sizeof what, "e4m3 tc %s %lldx%lld T=%d", label, (long long)rows, (long long)cols, T);
    compare(T <= 64 ? OP_MATMUL_SPLIT : OP_MATMUL_BF16ACT, what, &y);
    pair_free(&x), pair_free(&y), free(xh);
  }
}

static void test_matmul_e4m3_tc(void) {
  static const int64_t shapes[][2] = {{4229, 80}, {37, 200}, {513, 1048}, {300, 2048}, {16, 8}, {2115, 336}};
  static const int Ts[] = {1, 2, 3, 7, 8, 9, 16, 33, 64, 65, 300};
  const int nT = (int)(sizeof Ts / sizeof Ts[0]);
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (int layout = 0; layout < 3; layout++) {
      const int64_t rows = shapes[s][0], cols = shapes[s][1];
      char label[96];
      snprintf(label, sizeof label, "%s", layout == 0 ? "MXFP8" : layout == 1 ? "FP8 block" : "FP8 per channel");
      char shape[128];
      snprintf(shape, sizeof shape, "e4m3 tc %s %lldx%lld", label, (long long)rows, (long long)cols);
      progress(shape);
      weight w = layout == 2 ? make_channel_weight(rows, cols)
                             : make_weight(layout == 0 ? W_MXFP8 : W_FP8_BLOCK, rows, cols);
      mx_mma_case(&w, label, rows > 100 ? (int)(rows - 1) / 2 : -1, Ts, nT);
      free_weight(&w);
    }
  static const int sub_Ts[] = {1, 8, 64};
  for (int layout = 0; layout < 2; layout++) {
    weight w = make_weight(layout == 0 ? W_MXFP8 : W_FP8_BLOCK, 300, 2048);
    uint8_t *d = w.data;
    for (size_t i = 0; i < (size_t)300 * 2048; i++) d[i] &= 0x87; /* exponent 0: subnormal or zero */
    must(gpu->ops->to_device(gpu, (void *)w.g.data, d, (size_t)300 * 2048), "to_device");
    progress(layout == 0 ? "e4m3 tc MXFP8 subnormals" : "e4m3 tc FP8 block subnormals");
    mx_mma_case(&w, layout == 0 ? "MXFP8 subnormals" : "FP8 block subnormals", -1, sub_Ts, 3);
    free_weight(&w);
  }
}

static void test_embed(void) {
  for (int kind = 0; kind < W_KINDS; kind++) {
    weight w = make_weight(kind, 50, 96);
    int32_t ids[7] = {3, 49, 0, 3, -1, 50, 17}; /* two invalid ids give NaN rows on both */
    pair id = pair_from(ids, sizeof ids), out = pair_poisoned(7 * 96);
    cpu->ops->embed(cpu, &w.c, id.c, 7, out.c);
    gpu->ops->embed(gpu, &w.g, id.g, 7, out.g);
    compare(OP_EMBED, kind_name[kind], &out);
    pair_free(&id), pair_free(&out), free_weight(&w);
  }
}

static void test_rmsnorm(void) {
  static const int shapes[][2] = {{5, 128}, {3, 1000}, {2, 6144}, {40, 24}, {1024, 128}};
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (int kind = W_F32; kind <= W_BF16; kind++)
      for (int alias = 0; alias < 2; alias++) {
        int rows = shapes[s][0], n = shapes[s][1];
        weight w = make_weight(kind, 1, n);
        float *xh = random_floats((size_t)rows * n, -3, 3);
        pair x = pair_from(xh, (size_t)rows * n * 4), y = pair_poisoned((size_t)rows * n);
        pair *out = alias ? &x : &y;
        cpu->ops->rmsnorm(cpu, x.c, &w.c, 1e-6f, rows, n, out->c);
        gpu->ops->rmsnorm(gpu, x.g, &w.g, 1e-6f, rows, n, out->g);
        char what[64];
        snprintf(what, sizeof what, "%dx%d %s%s", rows, n, kind_name[kind], alias ? " in place" : "");
        compare(OP_RMSNORM, what, out);
        pair_free(&x), pair_free(&y), free(xh), free_weight(&w);
      }
}

static void test_rope(void) {
  static const int cfg[][3] = {{4, 16, 8}, {3, 128, 64}, {2, 32, 32}, {64, 128, 64}, {1, 128, 64}};
  for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++) {
    int nheads = cfg[c][0], hd = cfg[c][1], rot = cfg[c][2], T = 13;
    int32_t pos[13];
    for (int t = 0; t < T; t++) pos[t] = t < 4 ? t : (int32_t)(rnd() % 200000);
    float *xh = random_floats((size_t)T * nheads * hd, -2, 2);
    pair p = pair_from(pos, sizeof pos), x = pair_from(xh, (size_t)T * nheads * hd * 4);
    cpu->ops->rope(cpu, x.c, p.c, T, nheads, hd, rot, 5e6);
    gpu->ops->rope(gpu, x.g, p.g, T, nheads, hd, rot, 5e6);
    char what[64];
    snprintf(what, sizeof what, "heads %d hd %d rot %d", nheads, hd, rot);
    compare(OP_ROPE, what, &x);
    pair_free(&p), pair_free(&x), free(xh);
  }
}

/* The fused op against the CPU's two ops (rmsnorm then rope), on q-, k- and index-shaped heads. */
static void test_rmsnorm_rope(void) {
  static const int cfg[][4] = {{64, 128, 64, 1}, {4, 128, 64, 5}, {1, 128, 64, 300},
                               {8, 16, 8, 7},    {2, 24, 24, 3},  {3, 640, 64, 2}};
  for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++)
    for (int kind = W_F32; kind <= W_BF16; kind++) {
      int nheads = cfg[c][0], hd = cfg[c][1], rot = cfg[c][2], T = cfg[c][3];
      int32_t *pos = malloc((size_t)T * sizeof *pos);
      for (int t = 0; t < T; t++) pos[t] = t < 4 ? t : (int32_t)(rnd() % 200000);
      weight w = make_weight(kind, 1, hd);
      float *xh = random_floats((size_t)T * nheads * hd, -3, 3);
      pair p = pair_from(pos, (size_t)T * sizeof *pos), x = pair_from(xh, (size_t)T * nheads * hd * 4);
      cpu->ops->rmsnorm_rope(cpu, x.c, &w.c, 1e-6f, p.c, T, nheads, hd, rot, 5e6);
      gpu->ops->rmsnorm_rope(gpu, x.g, &w.g, 1e-6f, p.g, T, nheads, hd, rot, 5e6);
      char what[80];
      snprintf(what, sizeof what, "T %d heads %d hd %d rot %d %s", T, nheads, hd, rot, kind_name[kind]);
      compare(OP_RMSNORM_ROPE, what, &x);
      pair_free(&p), pair_free(&x), free(xh), free(pos), free_weight(&w);
    }
}

static void test_elementwise(void) {
  static const size_t sizes[] = {1, 1000, 3 * 6144, 1 << 20};
  for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
    size_t n = sizes[s];
    float *a = random_floats(n, -12, 12), *b = random_floats(n, -12, 12);
    char what[32];
    snprintf(what, sizeof what, "n=%zu", n);
    pair g = pair_from(a, n * 4), u = pair_from(b, n * 4);
    cpu->ops->swiglu_oai(cpu, g.c, u.c, n, 1.702f, 1.0f, 7.0f, g.c); /* out aliases gate */
    gpu->ops->swiglu_oai(gpu, g.g, u.g, n, 1.702f, 1.0f, 7.0f, g.g);
    compare(OP_SWIGLU, what, &g);
    pair_free(&g), pair_free(&u);
    pair x = pair_from(a, n * 4), y = pair_from(b, n * 4);
    cpu->ops->add(cpu, x.c, y.c, n);
    gpu->ops->add(gpu, x.g, y.g, n);
    compare(OP_ADD, what, &x);
    pair_free(&x), pair_free(&y), free(a), free(b);
  }
}

/* The fused residual add + norm against the CPU's (x and out), and against the CUDA backend's own
 * add then rmsnorm, which it must equal bit for bit (same threads per row, same reduction). */
static void test_add_rmsnorm(void) {
  static const int shapes[][2] = {{5, 128}, {3, 1000}, {2, 6144}, {40, 24}, {1024, 128},
                                  {7, 6144}, {1, 33}, {300, 257}};
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (int kind = W_F32; kind <= W_BF16; kind++) {
      const int rows = shapes[s][0], n = shapes[s][1];
      const size_t len = (size_t)rows * n;
      weight w = make_weight(kind, 1, n);
      float *xh = random_floats(len, -3, 3), *yh = random_floats(len, -3, 3);
      pair x = pair_from(xh, len * 4), y = pair_from(yh, len * 4), out = pair_poisoned(len);
      pair x2 = pair_from(xh, len * 4), out2 = pair_poisoned(len);
      cpu->ops->add_rmsnorm(cpu, x.c, y.c, &w.c, 1e-6f, rows, n, out.c);
      gpu->ops->add_rmsnorm(gpu, x.g, y.g, &w.g, 1e-6f, rows, n, out.g);
      gpu->ops->add(gpu, x2.g, y.g, len);
      gpu->ops->rmsnorm(gpu, x2.g, &w.g, 1e-6f, rows, n, out2.g);
      char what[64];
      snprintf(what, sizeof what, "%dx%d %s out", rows, n, kind_name[kind]);
      float *fused = gpu_copy(&out), *two = gpu_copy(&out2);
      record(OP_ADD_RMSNORM_SELF, what, two, fused, len);
      free(fused), free(two);
      compare(OP_ADD_RMSNORM, what, &out);
      snprintf(what, sizeof what, "%dx%d %s x", rows, n, kind_name[kind]);
      compare(OP_ADD_RMSNORM, what, &x);
      pair_free(&x), pair_free(&y), pair_free(&out), pair_free(&x2), pair_free(&out2);
      free(xh), free(yh), free_weight(&w);
    }
}

/* Greedy ids of both backends, exactly. Rows of every kind: continuous values; small integers
 * (exact ties, the lower id wins); scattered -inf, +inf, NaN; a NaN at index 0 (kept: the
 * sampler's scan starts there), with a +inf later; all -inf; all NaN; -0 against +0. */
static void argmax_case(int rows, int vocab) {
  const size_t len = (size_t)rows * vocab;
  float *lh = random_floats(len, -30, 30);
  for (int r = 0; r < rows; r++) {
    float *l = lh + (size_t)r * vocab;
    const int kind = r % 8;
    for (int i = 0; i < vocab; i++) {
      const uint32_t u = rnd() % 100;
      if (kind == 1) l[i] = (float)((int)(rnd() % 5) - 2);
      if (kind == 2) l[i] = u < 5 ? -INFINITY : u < 8 ? NAN : u < 9 ? INFINITY : l[i];
      if (kind == 4) l[i] = -INFINITY;
      if (kind == 5) l[i] = NAN;
      if (kind == 6) l[i] = u < 50 ? -0.0f : u < 60 ? 0.0f : -1.0f;
    }
    if (kind == 3) {
      l[0] = NAN;
      l[vocab - 1] = INFINITY;
    }
    if (kind == 7) l[vocab - 1] = l[vocab / 2] = 31.0f; /* a tie at the top, far apart */
  }
  pair l = pair_from(lh, len * 4);
  int32_t *ids_c = malloc((size_t)rows * sizeof *ids_c);
  int32_t *ids_g = gpu->ops->alloc_host(gpu, (size_t)rows * sizeof *ids_g);
  if (!ids_c || !ids_g) must(M3_ERR_NOMEM, "argmax ids");
  for (int r = 0; r < rows; r++) ids_c[r] = ids_g[r] = -7;
  must(cpu->ops->argmax_rows(cpu, l.c, rows, vocab, ids_c), "argmax_rows (cpu)");
  must(gpu->ops->argmax_rows(gpu, l.g, rows, vocab, ids_g), "argmax_rows (cuda)");
  float *ref = malloc((size_t)rows * sizeof *ref), *got = malloc((size_t)rows * sizeof *got);
  for (int r = 0; r < rows; r++) ref[r] = (float)ids_c[r], got[r] = (float)ids_g[r];
  char what[48];
  snprintf(what, sizeof what, "%d rows of %d", rows, vocab);
  record(OP_ARGMAX, what, ref, got, (size_t)rows);
  pair_free(&l), free(lh), free(ids_c), gpu->ops->free_host(gpu, ids_g), free(ref), free(got);
}

static void test_argmax_rows(void) {
  static const int cfg[][2] = {{1, 200064}, {8, 200064}, {64, 200064}, {3, 1}, {9, 31},
                               {257, 1000}, {16, 1025}, {1, 33}};
  for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++) argmax_case(cfg[c][0], cfg[c][1]);
}

/* ---- paged caches ---- */

typedef struct {
  m3_kv_view c, g;
  pair k, v, ik, table;
  int32_t *table_h;
  float *ik_h; /* host copy of the index keys, for the near-tie check */
  int pages;
} cache;

/* A cache of `blocks` blocks in as many pages, shuffled, filled with random keys (eighths when
 * exact ties are wanted). */
static cache make_cache(int blocks, int bs, int nkv, int hd, int ihd, int eighths) {
  cache c;
  memset(&c, 0, sizeof c);
  c.pages = blocks + 3; /* spare pages that no block uses */
  c.table_h = malloc((size_t)blocks * 4);
  int32_t *perm = malloc((size_t)c.pages * 4);
  for (int i = 0; i < c.pages; i++) perm[i] = i;
  for (int i = c.pages - 1; i > 0; i--) {
    int j = (int)(rnd() % (uint32_t)(i + 1));
    int32_t tmp = perm[i];
    perm[i] = perm[j], perm[j] = tmp;
  }
  memcpy(c.table_h, perm, (size_t)blocks * 4);
  free(perm);
  size_t kvn = (size_t)c.pages * nkv * bs * hd, ikn = (size_t)c.pages * bs * ihd;
  float *kh = eighths ? random_eighths(kvn) : random_floats(kvn, -1, 1);
  float *vh = random_floats(kvn, -1, 1);
  c.ik_h = eighths ? random_eighths(ikn) : random_floats(ikn, -1, 1);
  c.k = pair_from(kh, kvn * 4);
  c.v = pair_from(vh, kvn * 4);
  c.ik = pair_from(c.ik_h, ikn * 4);
  c.table = pair_from(c.table_h, (size_t)blocks * 4);
  free(kh), free(vh);
  m3_kv_view base = {NULL, NULL, NULL, NULL, blocks, bs, nkv, hd, ihd, M3_KV_F32};
  c.c = c.g = base;
  c.c.k = c.k.c, c.c.v = c.v.c, c.c.ik = c.ik.c, c.c.block_table = c.table.c;
  c.g.k = c.k.g, c.g.v = c.v.g, c.g.ik = c.ik.g, c.g.block_table = c.table.g;
  return c;
}

static void free_cache(cache *c) {
  pair_free(&c->k), pair_free(&c->v), pair_free(&c->ik), pair_free(&c->table);
  free(c->table_h), free(c->ik_h);
}

/* T positions in [0, len): ragged (random, repeats allowed), the last always len - 1, and a
 * padding row (-1) when T > 2. */
static int32_t *random_positions(int T, int len) {
  int32_t *pos = malloc((size_t)T * 4);
  for (int t = 0; t < T; t++) pos[t] = (int32_t)(rnd() % (uint32_t)len);
  pos[T - 1] = len - 1;
  if (T > 2) pos[1] = -1;
  return pos;
}

static void test_kv_store(void) {
  static const int cfg[][5] = {{16, 2, 32, 16, 9}, {128, 4, 128, 128, 40}}; /* bs nkv hd ihd blocks */
  for (size_t i = 0; i < sizeof cfg / sizeof cfg[0]; i++) {
    int bs = cfg[i][0], nkv = cfg[i][1], hd = cfg[i][2], ihd = cfg[i][3], blocks = cfg[i][4];
    cache c = make_cache(blocks, bs, nkv, hd, ihd, 0);
    int T = 21;
    /* Distinct ragged positions, a padding row and one past the table (both skipped). */
    int32_t *pos = malloc((size_t)T * 4);
    int at = (int)(rnd() % 5);
    for (int t = 0; t < T; t++, at += 1 + (int)(rnd() % (uint32_t)(blocks * bs / (2 * T)))) pos[t] = at;
    pos[1] = -1;
    pos[2] = blocks * bs + 5;
    float *kh = random_floats((size_t)T * nkv * hd, -1, 1), *vh = random_floats((size_t)T * nkv * hd, -1, 1);
    float *ikh = random_floats((size_t)T * ihd, -1, 1);
    pair p = pair_from(pos, (size_t)T * 4), k = pair_from(kh, (size_t)T * nkv * hd * 4),
         v = pair_from(vh, (size_t)T * nkv * hd * 4), ik = pair_from(ikh, (size_t)T * ihd * 4);
    cpu->ops->kv_store(cpu, &c.c, p.c, T, k.c, v.c, ik.c);
    gpu->ops->kv_store(gpu, &c.g, p.g, T, k.g, v.g, ik.g);
    compare(OP_KV_STORE, "K pages", &c.k);
    compare(OP_KV_STORE, "V pages", &c.v);
    compare(OP_KV_STORE, "index-key pages", &c.ik);
    pair_free(&p), pair_free(&k), pair_free(&v), pair_free(&ik);
    free(pos), free(kh), free(vh), free(ikh), free_cache(&c);
  }
}

/* Block score of (query iq_t_g, block b) in double: the max over visible keys of the dot. */
static double ref_block_score(const cache *c, const float *q, int32_t p, int b) {
  const int bs = c->c.block_size, ihd = c->c.ihd;
  int n = p - b * bs + 1 < bs ? p - b * bs + 1 : bs;
  double best = -INFINITY;
  for (int j = 0; j < n; j++) {
    const float *key = c->ik_h + ((size_t)c->table_h[b] * bs + j) * ihd;
    double d = 0;
    for (int i = 0; i < ihd; i++) d += (double)q[i] * key[i];
    if (d > best) best = d;
  }
  return best;
}

/* Compares selections row by row. A differing row is a near-tie when the blocks in one list but
 * not the other all score (in double) within 1e-5 of each other, relative to the row's scores. */
static void compare_selection(const cache *c, const float *iq, const int32_t *pos, int T, int G,
                              int topk, const int32_t *ref, const int32_t *got, const char *what) {
  op_result *r = &results[OP_MSA];
  r->cases++;
  int bad = 0;
  for (int row = 0; row < T * G; row++) {
    const int32_t *a = ref + (size_t)row * topk, *b = got + (size_t)row * topk;
    if (memcmp(a, b, (size_t)topk * 4) == 0) continue;
    r->mismatches++;
    int in_table = 1; /* ids past the table (or unwritten poison) cannot be scored: not a tie */
    for (int i = 0; i < topk; i++) in_table &= b[i] >= -1 && b[i] < c->c.num_blocks;
    if (!in_table) {
      bad++;
      continue;
    }
    const float *q = iq + (size_t)row * c->c.ihd;
    const int32_t p = pos[row / G];
    double lo = INFINITY, hi = -INFINITY, scale = 1e-30;
    int count_a = 0, count_b = 0;
    for (int i = 0; i < topk; i++) {
      count_a += a[i] >= 0, count_b += b[i] >= 0;
      for (int side = 0; side < 2; side++) {
        const int32_t *x = side ? b : a, *y = side ? a : b;
        if (x[i] < 0) continue;
        int shared = 0;
        for (int j = 0; j < topk; j++) shared |= y[j] == x[i];
        double sc = ref_block_score(c, q, p, x[i]);
        scale = fmax(scale, fabs(sc));
        if (!shared) lo = fmin(lo, sc), hi = fmax(hi, sc);
      }
    }
    if (count_a == count_b && hi - lo <= 1e-5 * scale) r->near_ties++;
    else bad++;
  }
  if (bad) {
    r->failed++;
    fprintf(stderr, "FAIL msa_select [%s]: %d rows differ beyond near-ties\n", what, bad);
  }
}

/* The CUDA backend's attention runs on BF16 tensor cores from 128 tokens on at head dims 64 and
 * 128 (ATT_TC_MIN_T in src/backend/cuda/attention.cu), in fp32 otherwise: the tolerance differs. */
static int attention_category(int T, int hd, int sparse) {
  if (T >= 128 && (hd == 64 || hd == 128)) return sparse ? OP_ATT_TC_SPARSE : OP_ATT_TC_DENSE;
  return sparse ? OP_ATT_SPARSE : OP_ATT_DENSE;
}

static void attention_pair(cache *c, int nh, int T, const pair *pos, const pair *sel, int topk,
                           const char *what) {
  const int hd = c->c.hd;
  float *qh = random_floats((size_t)T * nh * hd, -1, 1);
  pair q = pair_from(qh, (size_t)T * nh * hd * 4), out = pair_poisoned((size_t)T * nh * hd);
  cpu->ops->attention(cpu, q.c, nh, &c->c, pos->c, T, sel ? sel->c : NULL, topk, out.c);
  gpu->ops->attention(gpu, q.g, nh, &c->g, pos->g, T, sel ? sel->g : NULL, topk, out.g);
  const int fp8_rows = c->c.dtype == M3_KV_FP8 ? OP_KV8_ATT_DENSE - OP_ATT_DENSE : 0;
  compare(attention_category(T, hd, sel != NULL) + fp8_rows, what, &out);
  pair_free(&q), pair_free(&out), free(qh);
}

static cache make_cache8(int blocks, int bs, int nkv, int hd, int ihd);

/* MSA selection and attention (dense and over the selected blocks) on one cache, float32 (values
 * in eighths: exact ties) or fp8 (make_cache8; its attention rows are counted apart). */
static void msa_attention_case(int bs, int nh, int nkv, int hd, int ihd, int len, int T,
                               m3_msa_params mp, int eighths, int fp8) {
  int blocks = (len + bs - 1) / bs;
  cache c = fp8 ? make_cache8(blocks, bs, nkv, hd, ihd) : make_cache(blocks, bs, nkv, hd, ihd, eighths);
  int32_t *posh = random_positions(T, len);
  const int G = nkv;
  float *iqh = eighths ? random_eighths((size_t)T * G * ihd) : random_floats((size_t)T * G * ihd, -1, 1);
  pair pos = pair_from(posh, (size_t)T * 4), iq = pair_from(iqh, (size_t)T * G * ihd * 4);
  int32_t *poison = malloc((size_t)T * G * mp.topk * 4);
  for (int i = 0; i < T * G * mp.topk; i++) poison[i] = 0x7eadbeef;
  pair sel = pair_from(poison, (size_t)T * G * mp.topk * 4);
  char what[128];
  snprintf(what, sizeof what, "%sbs %d nh %d nkv %d hd %d ihd %d len %d T %d topk %d local %d init %d%s",
           fp8 ? "fp8 cache " : "", bs, nh, nkv, hd, ihd, len, T, mp.topk, mp.local_blocks,
           mp.init_blocks, eighths ? " exact ties" : "");
  progress(what);
  cpu->ops->msa_select(cpu, iq.c, G, &c.c, pos.c, T, &mp, sel.c);
  gpu->ops->msa_select(gpu, iq.g, G, &c.g, pos.g, T, &mp, sel.g);
  int32_t *selg = gpu_copy(&sel);
  compare_selection(&c, iqh, posh, T, G, mp.topk, sel.c, selg, what);
  /* Attention reads the CPU's selection on both backends, so it is checked on its own. */
  must(gpu->ops->to_device(gpu, sel.g, sel.c, sel.bytes), "to_device");
  attention_pair(&c, nh, T, &pos, NULL, 0, what);
  attention_pair(&c, nh, T, &pos, &sel, mp.topk, what);
  pair_free(&pos), pair_free(&iq), pair_free(&sel);
  free(posh), free(iqh), free(poison), free(selg), free_cache(&c);
}

static void test_msa_attention(void) {
  static const int geo[][6] = {
      /* bs nh nkv hd ihd len */
      {16, 8, 2, 32, 16, 200}, {8, 4, 4, 64, 32, 97}, {128, 64, 4, 128, 128, 2048 + 77},
      {128, 64, 4, 128, 128, 9000}, {32, 16, 4, 128, 64, 1000}, {16, 12, 4, 96, 16, 333},
  };
  static const m3_msa_params params[] = {{4, 1, 0}, {4, 2, 1}, {16, 1, 0}, {3, 2, 0}, {5, 1, 1}};
  static const int Ts[] = {1, 3, 17};
  for (size_t gi = 0; gi < sizeof geo / sizeof geo[0]; gi++)
    for (size_t pi = 0; pi < sizeof params / sizeof params[0]; pi++)
      for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++) {
        if (geo[gi][5] > 4000 && (pi != 2 || ti == 2)) continue; /* long contexts: M3's params */
        msa_attention_case(geo[gi][0], geo[gi][1], geo[gi][2], geo[gi][3], geo[gi][4], geo[gi][5],
                           Ts[ti], params[pi], 0, 0);
      }
  /* Exact ties (scores of eighths): both must break them to the lower block id. */
  for (size_t pi = 0; pi < sizeof params / sizeof params[0]; pi++)
    msa_attention_case(16, 8, 2, 32, 16, 300, 9, params[pi], 1, 0);
}

/* Attention alone on decode and prefill shapes: query heads per KV head 16, 8, 4, 2 and 1, head
 * dims 256, 128, 96 and 16, long contexts (split-K across many splits) ending in a partial block,
 * consecutive positions (prefill, MTP drafts) and ragged ones with padding rows. The selections
 * are random distinct blocks, the token's own (local) block first so its causal mask is exercised,
 * some past the token or the table (skipped), and every third list cut short by a -1 followed by
 * more ids (ignored); topk <= blocks + 2 so that distinct ids exist. */
static void attention_shape_case(int bs, int nh, int nkv, int hd, int len, int T, int consecutive,
                                 int topk) {
  const int blocks = (len + bs - 1) / bs;
  cache c = make_cache(blocks, bs, nkv, hd, 16, 0);
  int32_t *posh = random_positions(T, len);
  if (consecutive)
    for (int t = 0; t < T; t++) posh[t] = len - T + t;
  int32_t *selh = malloc((size_t)T * nkv * topk * 4);
  /* ids drawn from [0, span): at least topk values, so the draws of distinct ids end */
  const uint32_t span = (uint32_t)(blocks + 2 > topk ? blocks + 2 : topk);
  for (int t = 0; t < T; t++)
    for (int h = 0; h < nkv; h++) {
      int32_t *row = selh + ((size_t)t * nkv + h) * topk;
      for (int i = 0; i < topk; i++) {
        int fresh;
        do {
          row[i] = i == 0 && posh[t] >= 0 ? posh[t] / bs : (int32_t)(rnd() % span);
          fresh = 1;
          for (int j = 0; j < i; j++) fresh &= row[j] != row[i];
        } while (!fresh);
      }
      if (topk > 1 && rnd() % 3 == 0) row[1 + rnd() % (uint32_t)(topk - 1)] = -1;
    }
  pair pos = pair_from(posh, (size_t)T * 4), sel = pair_from(selh, (size_t)T * nkv * topk * 4);
  char what[128];
  snprintf(what, sizeof what, "bs %d nh %d nkv %d hd %d len %d T %d %s topk %d", bs, nh, nkv, hd,
           len, T, consecutive ? "consecutive" : "ragged", topk);
  progress(what);
  attention_pair(&c, nh, T, &pos, NULL, 0, what);
  attention_pair(&c, nh, T, &pos, &sel, topk, what);
  pair_free(&pos), pair_free(&sel), free(posh), free(selh), free_cache(&c);
}

static void test_attention_shapes(void) {
  static const int cfg[][8] = {
      /* bs nh nkv hd len T consecutive topk */
      {128, 64, 4, 128, 20000, 1, 1, 16}, {128, 64, 4, 128, 20000, 3, 1, 16},
      {128, 64, 4, 128, 2048 + 77, 1, 1, 16}, {128, 64, 4, 128, 2048 + 77, 300, 1, 16},
      {128, 64, 4, 128, 5000, 300, 0, 16}, {128, 64, 4, 128, 129, 1, 1, 3},
      {128, 16, 4, 128, 9000, 1, 1, 16}, {128, 16, 4, 128, 3000, 300, 1, 16},
      {128, 16, 4, 128, 3000, 3, 0, 16}, {128, 4, 4, 128, 9000, 3, 1, 16},
      {128, 4, 4, 128, 3000, 300, 0, 16}, {128, 4, 4, 128, 20000, 1, 1, 16},
      {16, 64, 4, 16, 20000, 1, 1, 5}, {16, 64, 4, 16, 1000, 300, 1, 5},
      {16, 16, 4, 16, 333, 3, 1, 5}, {16, 4, 4, 16, 2000, 300, 0, 5},
      {8, 8, 1, 16, 77, 1, 1, 4}, {8, 8, 1, 16, 77, 17, 0, 4},
      {128, 16, 1, 256, 1500, 3, 1, 16}, {128, 16, 1, 256, 1500, 300, 1, 16},
      {64, 32, 16, 96, 700, 17, 0, 8}, {32, 2, 1, 128, 4000, 17, 0, 40},
  };
  for (size_t i = 0; i < sizeof cfg / sizeof cfg[0]; i++)
    attention_shape_case(cfg[i][0], cfg[i][1], cfg[i][2], cfg[i][3], cfg[i][4], cfg[i][5],
                         cfg[i][6], cfg[i][7]);
}

/* The tensor-core path (T >= 128, hd 64 or 128) on what its tiles must get right: groups of 16,
 * 64, 4, 3, 2 and 1 query heads per KV head (tiles of 8, 2, 32, 42 and 64 tokens, 128 for dense
 * group 1; rows not filling the tile), T not a multiple of the tile, blocks of 128, 96 (a key tile
 * cut at 32), 64, 32 and 16 keys, consecutive and ragged positions with a padding row, and sparse
 * tiles cut to 12 tokens by 40 selection entries per token. */
static void test_attention_prefill(void) {
  static const int cfg[][8] = {
      /* bs nh nkv hd len T consecutive topk */
      {128, 64, 4, 128, 1000, 300, 1, 16}, {128, 8, 4, 128, 1500, 256, 0, 16},
      {64, 64, 4, 64, 900, 300, 0, 8},     {32, 16, 4, 64, 600, 129, 1, 12},
      {16, 64, 1, 128, 400, 200, 0, 20},   {96, 8, 8, 128, 500, 140, 1, 6},
      {128, 12, 4, 128, 2000, 128, 0, 16}, {32, 2, 1, 128, 4000, 300, 0, 40},
  };
  for (size_t i = 0; i < sizeof cfg / sizeof cfg[0]; i++)
    attention_shape_case(cfg[i][0], cfg[i][1], cfg[i][2], cfg[i][3], cfg[i][4], cfg[i][5],
                         cfg[i][6], cfg[i][7]);
}

static void test_moe_route(void) {
  static const int cfg[][2] = {{8, 2}, {128, 4}, {256, 8}, {16, 1}, {64, 6}}; /* E, k */
  for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++)
    for (int with_bias = 0; with_bias < 2; with_bias++) {
      int E = cfg[c][0], k = cfg[c][1], T = 37;
      float *lh = random_floats((size_t)T * E, -4, 4), *bh = random_floats((size_t)E, -0.5f, 0.5f);
      if (c == 3) /* exact ties between experts */
        for (int i = 0; i < T * E; i++) lh[i] = (float)((int)(rnd() % 5) - 2);
      pair l = pair_from(lh, (size_t)T * E * 4), b = pair_from(bh, (size_t)E * 4);
      pair ids = pair_poisoned((size_t)T * k), w = pair_poisoned((size_t)T * k);
      cpu->ops->moe_route(cpu, l.c, with_bias ? b.c : NULL, T, E, k, 2.5f, ids.c, w.c);
      gpu->ops->moe_route(gpu, l.g, with_bias ? b.g : NULL, T, E, k, 2.5f, ids.g, w.g);
      int32_t *idg = gpu_copy(&ids);
      float *wg = gpu_copy(&w);
      char what[64];
      snprintf(what, sizeof what, "E %d k %d%s", E, k, with_bias ? " bias" : "");
      op_result *r = &results[OP_MOE];
      int differ = 0;
      for (int t = 0; t < T; t++)
        if (memcmp((int32_t *)ids.c + t * k, idg + t * k, (size_t)k * 4) != 0) differ++;
      if (differ) {
        r->mismatches += differ;
        r->failed++;
        fprintf(stderr, "FAIL moe_route [%s]: %d tokens route differently\n", what, differ);
      } else {
        record(OP_MOE, what, w.c, wg, (size_t)T * k);
      }
      pair_free(&l), pair_free(&b), pair_free(&ids), pair_free(&w);
      free(lh), free(bh), free(idg), free(wg);
    }
}

/* moe_experts, E 16, k 4: T 1, 5 and 64 take the grouped GEMV (float32 activations), 65 and 300
 * the per-expert matmuls (BF16 activations once an expert has more than 8 rows). Routings are
 * distinct random choices, every other case with expert 0 in every token and only half the
 * experts used; BF16 and MXFP8 weights on every T, the other dtypes (their fallback decoders) on
 * one T of each path; down's width 96 or 64 (wide E4M3 loads need a multiple of 16). */
static void moe_experts_case(int kind, int H, int I, int T, int skew) {
  enum { E = 16, K = 4 };
  char what[96];
  snprintf(what, sizeof what, "%s H %d I %d T %d%s", kind_name[kind], H, I, T, skew ? " skewed" : "");
  progress(what);
  weight gate[E], up[E], down[E];
  m3_tensor tc[3][E], tg[3][E];
  for (int e = 0; e < E; e++) {
    gate[e] = make_weight(kind, I, H), up[e] = make_weight(kind, I, H);
    down[e] = make_weight(kind, H, I);
    tc[0][e] = gate[e].c, tc[1][e] = up[e].c, tc[2][e] = down[e].c;
    tg[0][e] = gate[e].g, tg[1][e] = up[e].g, tg[2][e] = down[e].g;
  }
  m3_moe_experts exc = {tc[0], tc[1], tc[2], E, 1.702f, 1.0f, 7.0f, NULL}, exg = exc;
  exg.gate = tg[0], exg.up = tg[1], exg.down = tg[2];
  must(cpu->ops->prepare_experts(cpu, &exc), "prepare_experts (cpu)");
  must(gpu->ops->prepare_experts(gpu, &exg), "prepare_experts (cuda)");
  int32_t *idh = malloc((size_t)T * K * 4);
  for (int t = 0; t < T; t++)
    for (int j = 0; j < K; j++) {
      int fresh;
      do {
        idh[t * K + j] = skew && j == 0 ? 0 : (int32_t)(rnd() % (skew ? E / 2 : E));
        fresh = 1;
        for (int i = 0; i < j; i++) fresh &= idh[t * K + i] != idh[t * K + j];
      } while (!fresh);
    }
  float *hh = random_floats((size_t)T * H, -1, 1), *xh = random_floats((size_t)T * H, -1, 1);
  float *wh = random_floats((size_t)T * K, 0.05f, 1.5f);
  pair h = pair_from(hh, (size_t)T * H * 4), x = pair_from(xh, (size_t)T * H * 4);
  pair ids = pair_from(idh, (size_t)T * K * 4), w = pair_from(wh, (size_t)T * K * 4);
  cpu->ops->moe_experts(cpu, &exc, h.c, T, ids.c, w.c, K, x.c);
  gpu->ops->moe_experts(gpu, &exg, h.g, T, ids.g, w.g, K, x.g);
  compare(T > 64 ? OP_MOE_EXPERTS_PREFILL : OP_MOE_EXPERTS_DECODE, what, &x);
  cpu->ops->release_experts(cpu, &exc);
  gpu->ops->release_experts(gpu, &exg);
  for (int e = 0; e < E; e++) free_weight(&gate[e]), free_weight(&up[e]), free_weight(&down[e]);
  pair_free(&h), pair_free(&x), pair_free(&ids), pair_free(&w);
  free(idh), free(hh), free(xh), free(wh);
}

static void test_moe_experts(void) {
  static const int Ts[] = {1, 5, 64, 65, 300};
  static const int kinds[] = {W_BF16, W_MXFP8};
  for (size_t ki = 0; ki < 2; ki++)
    for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++)
      for (int skew = 0; skew < 2; skew++) moe_experts_case(kinds[ki], 256, skew ? 64 : 96, Ts[ti], skew);
  static const int others[] = {W_F32, W_F16, W_FP8_BLOCK};
  for (size_t ki = 0; ki < 3; ki++) {
    moe_experts_case(others[ki], 256, 96, 5, 0);
    moe_experts_case(others[ki], 256, 96, 65, 1);
  }
}

/* moe_experts on the E4M3 tensor-core kernels (moe.cu moe_mx_kernel, up to 64 tokens): H 200 and
 * I 72 (K % 32 = 8 for gate/up and for down: a short last block; rows not a multiple of the 16 a
 * block takes), tokens per expert past one pass of 8 (skewed routing: expert 0 gets all T). */
static void test_moe_experts_e4m3_tc(void) {
  static const int Ts[] = {1, 3, 8, 9, 33, 64};
  for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++)
    for (int skew = 0; skew < 2; skew++) moe_experts_case(W_MXFP8, 200, 72, Ts[ti], skew);
  moe_experts_case(W_FP8_BLOCK, 200, 72, 7, 1);
  moe_experts_case(W_FP8_BLOCK, 200, 72, 64, 0);
}

/* ---- vision-tower ops (backend.h m3_vision_ops) ---- */

/* LayerNorm with rows whose mean is far from 0 (the variance must not cancel), gain and bias F32
 * and BF16, in place and not. */
static void test_vision_layernorm(void) {
  static const int shapes[][2] = {{5, 40}, {37, 1280}, {3, 1000}, {2, 7}, {300, 80}};
  const m3_vision_ops *cv = cpu->ops->vision, *gv = gpu->ops->vision;
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (int kind = W_F32; kind <= W_BF16; kind++)
      for (int alias = 0; alias < 2; alias++) {
        int rows = shapes[s][0], n = shapes[s][1];
        weight w = make_weight(kind, 1, n), b = make_weight(kind, 1, n);
        float *xh = random_floats((size_t)rows * n, -2, 6);
        pair x = pair_from(xh, (size_t)rows * n * 4), y = pair_poisoned((size_t)rows * n);
        pair *out = alias ? &x : &y;
        cv->layernorm(cpu, x.c, &w.c, &b.c, 1e-5f, rows, n, out->c);
        gv->layernorm(gpu, x.g, &w.g, &b.g, 1e-5f, rows, n, out->g);
        char what[64];
        snprintf(what, sizeof what, "%dx%d %s%s", rows, n, kind_name[kind], alias ? " in place" : "");
        compare(OP_VIS_LAYERNORM, what, out);
        pair_free(&x), pair_free(&y), free(xh), free_weight(&w), free_weight(&b);
      }
}

static void test_vision_elementwise(void) {
  static const int bias_shapes[][2] = {{1, 40}, {37, 1280}, {5, 7}, {300, 5120}};
  const m3_vision_ops *cv = cpu->ops->vision, *gv = gpu->ops->vision;
  for (size_t s = 0; s < sizeof bias_shapes / sizeof bias_shapes[0]; s++)
    for (int kind = W_F32; kind <= W_BF16; kind++) {
      int T = bias_shapes[s][0], n = bias_shapes[s][1];
      weight b = make_weight(kind, 1, n);
      float *xh = random_floats((size_t)T * n, -4, 4);
      pair x = pair_from(xh, (size_t)T * n * 4);
      cv->add_bias(cpu, x.c, &b.c, T, n);
      gv->add_bias(gpu, x.g, &b.g, T, n);
      char what[64];
      snprintf(what, sizeof what, "%dx%d %s", T, n, kind_name[kind]);
      compare(OP_VIS_ADD_BIAS, what, &x);
      pair_free(&x), free(xh), free_weight(&b);
    }
  static const size_t sizes[] = {1, 1000, 37 * 40, 1 << 20};
  for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
    size_t n = sizes[s];
    float *xh = random_floats(n, -8, 8);
    pair x = pair_from(xh, n * 4);
    cv->gelu(cpu, x.c, n);
    gv->gelu(gpu, x.g, n);
    char what[32];
    snprintf(what, sizeof what, "n=%zu", n);
    compare(OP_VIS_GELU, what, &x);
    pair_free(&x), free(xh);
  }
}

/* Axial RoPE at the tower's axis widths (vision.c rope_axis_dim: 6 for head dim 20, 26 for 80, 20
 * for 64, 42 for 128) with pass-through dims, patch positions of a grid and large ones; a width
 * too wide for the head (the CPU's NaN) must give NaN on the GPU too. */
static void test_vision_rope_3d(void) {
  static const int cfg[][4] = {/* N nheads hd axis_dim */
                               {24, 2, 20, 6},   {96, 2, 20, 6}, {37, 16, 80, 26},
                               {130, 4, 64, 20}, {5, 3, 128, 42}, {7, 2, 20, 8}};
  const m3_vision_ops *cv = cpu->ops->vision, *gv = gpu->ops->vision;
  for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++) {
    const int N = cfg[c][0], nheads = cfg[c][1], hd = cfg[c][2], axis_dim = cfg[c][3];
    int32_t *pos = malloc((size_t)N * 3 * sizeof *pos);
    for (int t = 0; t < N; t++) {
      const int large = t % 5 == 4; /* every fifth patch far out, the rest on a 74-wide grid */
      pos[3 * t] = large ? (int32_t)(rnd() % 1000) : (int32_t)(rnd() % 4);
      pos[3 * t + 1] = large ? (int32_t)(rnd() % 5000) : t / 74;
      pos[3 * t + 2] = large ? (int32_t)(rnd() % 5000) : t % 74;
    }
    float *xh = random_floats((size_t)N * nheads * hd, -2, 2);
    pair p = pair_from(pos, (size_t)N * 3 * sizeof *pos), x = pair_from(xh, (size_t)N * nheads * hd * 4);
    cv->rope_3d(cpu, x.c, p.c, N, nheads, hd, axis_dim, 10000.0);
    gv->rope_3d(gpu, x.g, p.g, N, nheads, hd, axis_dim, 10000.0);
    char what[80];
    snprintf(what, sizeof what, "N %d heads %d hd %d axis_dim %d", N, nheads, hd, axis_dim);
    compare(OP_VIS_ROPE3D, what, &x);
    pair_free(&p), pair_free(&x), free(xh), free(pos);
  }
}

/* Non-causal attention: N below, at and across the 64-row tiles (1, 24, 64, 65, 4097), head dims
 * of the test checkpoint (20), the real tower (80), 64, 128 and odd ones (7, 33). */
static void test_vision_attention(void) {
  static const int cfg[][3] = {/* N nh hd */
                               {24, 2, 20},  {96, 2, 20},  {1, 3, 20},   {64, 2, 80},
                               {65, 2, 80},  {200, 3, 80}, {130, 2, 64}, {77, 2, 128},
                               {70, 2, 33},  {50, 1, 7},   {1000, 2, 80}, {4097, 1, 80}};
  const m3_vision_ops *cv = cpu->ops->vision, *gv = gpu->ops->vision;
  for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++) {
    const int N = cfg[c][0], nh = cfg[c][1], hd = cfg[c][2];
    const size_t n = (size_t)N * nh * hd;
    char what[64];
    snprintf(what, sizeof what, "N %d heads %d hd %d", N, nh, hd);
    progress(what);
    float *qh = random_floats(n, -3, 3), *kh = random_floats(n, -1, 1), *vh = random_floats(n, -1, 1);
    pair q = pair_from(qh, n * 4), k = pair_from(kh, n * 4), v = pair_from(vh, n * 4);
    pair out = pair_poisoned(n);
    cv->attention_full(cpu, q.c, k.c, v.c, N, nh, hd, out.c);
    gv->attention_full(gpu, q.g, k.g, v.g, N, nh, hd, out.g);
    compare(OP_VIS_ATTENTION, what, &out);
    pair_free(&q), pair_free(&k), pair_free(&v), pair_free(&out), free(qh), free(kh), free(vh);
  }
}

static void test_vision_ops(void) {
  if (!gpu->ops->vision) {
    fprintf(stderr, "FAIL vision: the CUDA backend has no vision ops\n");
    return; /* the vision rows then show 0 cases: FAIL */
  }
  test_vision_layernorm();
  test_vision_elementwise();
  test_vision_rope_3d();
  test_vision_attention();
}

/* ---- fp8 KV cache ----
 * Both backends write an fp8 cache with their own kv_store from the same rows; the pages must be
 * the same bytes (E4M3 values and float32 scales are specified to the bit), and msa_select and
 * attention then read the same cache on both: the same tolerances as on a float32 cache. */

/* A buffer of `bytes` on both backends, zeroed (as alloc leaves it). */
static pair pair_zeroed(size_t bytes) {
  pair p = {cpu->ops->alloc(cpu, bytes), gpu->ops->alloc(gpu, bytes), bytes};
  if (!p.c || !p.g) must(M3_ERR_NOMEM, "alloc");
  return p;
}

/* Records the fraction of the bytes of p whose GPU copy differs from the CPU's (any fails). */
static void compare_bytes(int op, const char *what, const pair *p) {
  uint8_t *g = gpu_copy(p);
  size_t differ = 0;
  for (size_t i = 0; i < p->bytes; i++) differ += ((const uint8_t *)p->c)[i] != g[i];
  op_result *r = &results[op];
  const double e = (double)differ / (double)p->bytes;
  r->cases++;
  if (e > r->worst) r->worst = e;
  if (differ) {
    r->failed++;
    fprintf(stderr, "FAIL %s [%s]: %zu of %zu bytes differ\n", r->name, what, differ, p->bytes);
  }
  free(g);
}

/* rows x dim random values, each row times its own 2^-3..2^3 (so rows get different scales);
 * every 29th row zero. */
static float *kv8_random_rows(size_t rows, int dim) {
  float *x = random_floats(rows * dim, -1, 1);
  for (size_t r = 0; r < rows; r++) {
    const float mag = r % 29 == 28 ? 0.0f : ldexpf(1.0f, (int)(rnd() % 7) - 3);
    for (int d = 0; d < dim; d++) x[r * dim + d] *= mag;
  }
  return x;
}

/* kv_store of T tokens on both backends from the same host rows, then the pages compared. */
static void kv8_store_both(cache *c, const int32_t *posh, int T, const float *kh, const float *vh,
                           const float *ikh, const char *what) {
  const int nkv = c->c.nkv, hd = c->c.hd, ihd = c->c.ihd;
  pair pos = pair_from(posh, (size_t)T * 4), k = pair_from(kh, (size_t)T * nkv * hd * 4),
       v = pair_from(vh, (size_t)T * nkv * hd * 4), ik = pair_from(ikh, (size_t)T * ihd * 4);
  cpu->ops->kv_store(cpu, &c->c, pos.c, T, k.c, v.c, ik.c);
  gpu->ops->kv_store(gpu, &c->g, pos.g, T, k.g, v.g, ik.g);
  char label[160];
  snprintf(label, sizeof label, "K pages, %s", what);
  compare_bytes(OP_KV8_STORE, label, &c->k);
  snprintf(label, sizeof label, "V pages, %s", what);
  compare_bytes(OP_KV8_STORE, label, &c->v);
  snprintf(label, sizeof label, "index-key pages, %s", what);
  compare_bytes(OP_KV8_STORE, label, &c->ik);
  pair_free(&pos), pair_free(&k), pair_free(&v), pair_free(&ik);
}

/* An fp8 cache of `blocks` blocks in make_cache's shuffled pages, every slot written through
 * kv8_store_both (so its kv_store is checked on every cache); ik_h gets the index keys as the CPU
 * reads them back (E4M3 value times row scale), for compare_selection's near-tie scores. */
static cache make_cache8(int blocks, int bs, int nkv, int hd, int ihd) {
  cache c = make_cache(blocks, bs, nkv, hd, ihd, 0);
  pair_free(&c.k), pair_free(&c.v), pair_free(&c.ik);
  const size_t kv_pb = m3_kv_pool_page_bytes(M3_KV_FP8, (size_t)nkv * bs, (size_t)hd);
  const size_t ik_pb = m3_kv_pool_page_bytes(M3_KV_FP8, (size_t)bs, (size_t)ihd);
  c.k = pair_zeroed(c.pages * kv_pb), c.v = pair_zeroed(c.pages * kv_pb), c.ik = pair_zeroed(c.pages * ik_pb);
  c.c.k = c.k.c, c.c.v = c.v.c, c.c.ik = c.ik.c, c.c.dtype = M3_KV_FP8;
  c.g.k = c.k.g, c.g.v = c.v.g, c.g.ik = c.ik.g, c.g.dtype = M3_KV_FP8;
  const int T = blocks * bs;
  int32_t *posh = malloc((size_t)T * 4);
  for (int t = 0; t < T; t++) posh[t] = t;
  float *kh = kv8_random_rows((size_t)T * nkv, hd), *vh = kv8_random_rows((size_t)T * nkv, hd);
  float *ikh = kv8_random_rows((size_t)T, ihd);
  char what[96];
  snprintf(what, sizeof what, "bs %d nkv %d hd %d ihd %d blocks %d", bs, nkv, hd, ihd, blocks);
  kv8_store_both(&c, posh, T, kh, vh, ikh, what);
  for (int p = 0; p < c.pages; p++) {
    const uint8_t *page = (const uint8_t *)c.ik.c + (size_t)p * ik_pb;
    for (int r = 0; r < bs; r++) {
      const float scale = ((const float *)page)[r];
      const uint8_t *q = page + (size_t)bs * 4 + (size_t)r * ihd;
      for (int d = 0; d < ihd; d++)
        c.ik_h[((size_t)p * bs + r) * ihd + d] = m3_e4m3_to_f32(q[d]) * scale;
    }
  }
  free(posh), free(kh), free(vh), free(ikh);
  return c;
}

/* Row r of dim values, of edge kind r % 8: zeros; negative zeros; a NaN; an infinity (both: NaN
 * scale, zero bytes); amax subnormal (a subnormal scale); amax so small that amax / 448
 * underflows to 0; amax 448 (scale 1) with values halfway between E4M3 neighbours (ties to even,
 * at the subnormal, normal and top ranges) and subnormal E4M3 values; values near FLT_MAX. */
static void kv8_edge_row(float *x, int dim, int r) {
  static const float ties[] = {448, 17, -17, 19, 15.5f, 432, 447, 0x1p-10f, -0x1p-10f, 0x3p-10f,
                               0x5p-10f, -0x1p-7f, 0x1p-6f + 0x1p-10f, 0x1p-12f, -0x1p-9f, 0x3p-11f};
  const int nties = (int)(sizeof ties / sizeof ties[0]);
  for (int d = 0; d < dim; d++) {
    const float u = uniform(-1, 1);
    switch (r % 8) {
      case 0: x[d] = 0.0f; break;
      case 1: x[d] = -0.0f; break;
      case 2: x[d] = d == 3 ? NAN : u; break;
      case 3: x[d] = d == dim - 1 ? -INFINITY : u; break;
      case 4: x[d] = u * 1e-39f; break;
      case 5: x[d] = u * 1e-44f; break;
      case 6: x[d] = d < nties ? ties[d] : u; break;
      default: x[d] = u * 3e38f; break;
    }
  }
}

/* kv_store's rounding edges, bit for bit, at ragged positions with a padding row and one past the
 * table (both skipped), over a cache written once already (the rows overwrite their slots). */
static void test_kv8_store_edges(void) {
  enum { BS = 16, NKV = 2, HD = 32, IHD = 16, BLOCKS = 4, T = 12 };
  cache c = make_cache8(BLOCKS, BS, NKV, HD, IHD);
  int32_t posh[T];
  for (int t = 0; t < T; t++) posh[t] = 5 * t + 1;
  posh[1] = -1;
  posh[2] = BLOCKS * BS + 3;
  float *kh = malloc(sizeof(float) * T * NKV * HD), *vh = malloc(sizeof(float) * T * NKV * HD);
  float *ikh = malloc(sizeof(float) * T * IHD);
  for (int r = 0; r < T * NKV; r++) kv8_edge_row(kh + (size_t)r * HD, HD, r), kv8_edge_row(vh + (size_t)r * HD, HD, r + 3);
  for (int r = 0; r < T; r++) kv8_edge_row(ikh + (size_t)r * IHD, IHD, r + 5);
  progress("fp8 kv_store edges");
  kv8_store_both(&c, posh, T, kh, vh, ikh, "edge rows");
  free(kh), free(vh), free(ikh), free_cache(&c);
}

/* kv_store, msa_select and attention on fp8 caches: decode (T = 1, 3, 17; split-K up to 9000
 * tokens) and prefill (T >= 128: the tensor-core kernel at head dims 64 and 128) in groups of 16,
 * 8, 4, 3, 2 and 1 query heads per KV head, head dims 32 to 256, index dims 16 to 256 (two chunks
 * per lane in the score kernel). The selection counts of these cases are printed on their own. */
static void test_kv_fp8(void) {
  static const int cfg[][10] = {
      /* bs nh nkv hd ihd len T topk local init */
      {16, 8, 2, 32, 16, 200, 3, 4, 2, 1},        {8, 4, 4, 64, 32, 97, 17, 3, 2, 0},
      {128, 64, 4, 128, 128, 2048 + 77, 1, 16, 1, 0}, {128, 64, 4, 128, 128, 9000, 1, 16, 1, 0},
      {128, 64, 4, 128, 128, 9000, 3, 16, 1, 0},  {128, 64, 4, 128, 128, 3000, 300, 16, 1, 0},
      {64, 16, 2, 64, 32, 900, 200, 5, 1, 1},     {32, 8, 8, 128, 64, 1000, 130, 8, 1, 0},
      {16, 12, 4, 96, 16, 333, 17, 5, 1, 1},      {128, 16, 1, 256, 128, 1500, 3, 4, 1, 0},
      {32, 16, 4, 128, 256, 700, 5, 4, 2, 1},     {64, 4, 2, 64, 64, 600, 140, 4, 1, 0},
  };
  const op_result before = results[OP_MSA];
  test_kv8_store_edges();
  for (size_t i = 0; i < sizeof cfg / sizeof cfg[0]; i++)
    msa_attention_case(cfg[i][0], cfg[i][1], cfg[i][2], cfg[i][3], cfg[i][4], cfg[i][5], cfg[i][6],
                       (m3_msa_params){cfg[i][7], cfg[i][8], cfg[i][9]}, 0, 1);
  const op_result *r = &results[OP_MSA];
  printf("%-40s %6d %6d %12s %9s  rows differing %d, of them near-ties %d (also in msa_select)\n",
         "msa_select (fp8 cache)", r->cases - before.cases, r->failed - before.failed, "-", "exact",
         r->mismatches - before.mismatches, r->near_ties - before.near_ties);
}

static int test_errors(void) {
  m3_backend *none = NULL;
  m3_status st = m3_backend_cuda_create(999, &none);
  int ok = st == M3_ERR_UNSUPPORTED && none == NULL && strstr(m3_last_error(), "999") != NULL;
  printf("%-40s %s (%s)\n", "cuda:999 refused", ok ? "PASS" : "FAIL", m3_last_error());
  return ok;
}

/* Names each group on stderr before it runs, so a hang or crash on the GPU machine shows where. */
static void run(const char *name, void (*test)(void)) {
  fprintf(stderr, "-- %s\n", name);
  time_t start = time(NULL);
  test();
  fprintf(stderr, "-- %s done in %.0f s\n", name, difftime(time(NULL), start));
}

int main(void) {
  test_rng_state = 0x243F6A8885A308D3ull; /* this program's inputs since it was written */
  setvbuf(stdout, NULL, _IOLBF, 0); /* the table reaches a log line by line, even if a case hangs */
  must(m3_backend_cpu_create(0, &cpu), "cpu backend");
  must(m3_backend_create("cuda", 0, &gpu), "cuda backend");
  int ok = test_errors();
  run("matmul", test_matmul);
  run("matmul_gemv_edges", test_matmul_gemv_edges);
  run("matmul_e4m3_tc", test_matmul_e4m3_tc);
  run("embed", test_embed);
  run("rmsnorm", test_rmsnorm);
  run("rope", test_rope);
  run("rmsnorm_rope", test_rmsnorm_rope);
  run("elementwise", test_elementwise);
  run("add_rmsnorm", test_add_rmsnorm);
  run("argmax_rows", test_argmax_rows);
  run("kv_store", test_kv_store);
  run("msa_attention", test_msa_attention);
  run("attention_shapes", test_attention_shapes);
  run("attention_prefill", test_attention_prefill);
  run("kv_fp8", test_kv_fp8);
  run("moe_route", test_moe_route);
  run("moe_experts", test_moe_experts);
  run("moe_experts_e4m3_tc", test_moe_experts_e4m3_tc);
  run("vision", test_vision_ops);
  printf("%-40s %6s %6s %12s %9s  %s\n", "op", "cases", "failed", "worst error", "tolerance", "");
  for (int i = 0; i < OP_COUNT; i++) {
    const op_result *r = &results[i];
    ok &= r->failed == 0 && r->cases > 0;
    if (i == OP_MSA)
      printf("%-40s %6d %6d %12s %9s  rows differing %d, of them near-ties %d  %s\n", r->name,
             r->cases, r->failed, "-", "exact", r->mismatches, r->near_ties,
             r->failed ? "FAIL" : "PASS");
    else
      printf("%-40s %6d %6d %12.3g %9.0e  %s%s\n", r->name, r->cases, r->failed, r->worst, r->tol,
             r->failed || !r->cases ? "FAIL" : "PASS",
             i == OP_MOE && r->mismatches ? " (routes differ)" : "");
  }
  cpu->ops->destroy(cpu);
  gpu->ops->destroy(gpu);
  printf("%s\n", ok ? "ALL PASS" : "FAILURES");
  return ok ? 0 : 1;
}
