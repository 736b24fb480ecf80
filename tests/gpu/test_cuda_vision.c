/* test_cuda_vision: the vision tower (src/model/vision.c) on the CUDA backend, run on the GPU
 * machine by scripts/gpu.sh; not a CTest test (CI has no GPU).
 *
 * Check: the committed tiny vision checkpoint (tests/fixtures/vision/vl_vision_f32) encodes the
 * committed pixel values of each fixture item (rgba, tiny, video; `large` stores only every 20th
 * row, so it is skipped as in tests/test_engine_vision_logits.c) on the GPU and on the CPU. The GPU
 * embeddings must be within relative L2 1e-2 of the reference (embeds_<item>.f32, the spec tower
 * in float64) and within 1e-4 of the CPU's (all F32 weights: every op runs in float32, expect
 * ~1e-6). Random pixels on the `large` item's grid (2240 patches: many attention tiles) and on a
 * video of 6 temporal patches (segments of 4 and 2) are checked against the CPU alone. Then each
 * committed prompt (reference.json "prompts": text ids with the items' placeholder runs) runs on
 * the GPU in one forward with the items' GPU embeddings spliced in: its logits must be within
 * relative L2 1e-2 of transformers' (logits_<prompt>.f32) at every position, same argmax.
 *
 * Figures, not a test: the tower at the real M3 vision config (m3_vision_chat_spec.md §1.2: width
 * 1280, 16 heads of 80, 32 layers, MLP 5120, projector and merger 6144 wide), random BF16 weights
 * (the patch embedding F32, as in the checkpoint), on one 1024x1024 image at the two sizes the
 * spec's processors give it and on a 16-frame 448x448 video; a markdown table on stdout.
 *
 * Usage: test_cuda_vision [source dir] (default: the configured source tree). Exits 1 when a
 * check fails. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../compare.h"
#include "../random.h"
#include "backend/backend.h"
#include "base/dtype.h"
#include "engine/kvcache.h"
#include "model/layers.h"
#include "model/model.h"

static void must(m3_status st, const char *what) {
  if (st != M3_OK) {
    fprintf(stderr, "FATAL: %s: %s\n", what, m3_last_error());
    exit(1);
  }
}

/* The whole file, or NULL with a message. */
static void *read_file(const char *path, size_t *bytes) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    fprintf(stderr, "FAIL: cannot open %s\n", path);
    return NULL;
  }
  fseek(f, 0, SEEK_END);
  long len = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *data = malloc((size_t)(len > 0 ? len : 0) + 1);
  if (!data || len < 0 || fread(data, 1, (size_t)len, f) != (size_t)len) {
    fprintf(stderr, "FAIL: cannot read %s\n", path);
    free(data);
    fclose(f);
    return NULL;
  }
  fclose(f);
  data[len] = 0;
  *bytes = (size_t)len;
  return data;
}

/* ---- the fixtures, GPU against the reference and the CPU ---- */

/* One item: 1 when it passes. */
static int check_item(const char *fix, const cJSON *it, const char *key, m3_model *on_cpu,
                      m3_model *on_gpu) {
  const cJSON *g = cJSON_GetObjectItemCaseSensitive(it, "grid");
  if (cJSON_GetArraySize(g) != 3) {
    printf("| %s | bad grid in reference.json | | | | | FAIL |\n", key);
    return 0;
  }
  char path[8192];
  size_t pbytes = 0, ebytes = 0;
  snprintf(path, sizeof path, "%s/pixels_%s.f32", fix, key);
  float *pix = read_file(path, &pbytes);
  snprintf(path, sizeof path, "%s/embeds_%s.f32", fix, key);
  float *want = read_file(path, &ebytes);
  m3_vision_input in = {.pixels = pix,
                        .grid_t = cJSON_GetArrayItem(g, 0)->valueint,
                        .grid_h = cJSON_GetArrayItem(g, 1)->valueint,
                        .grid_w = cJSON_GetArrayItem(g, 2)->valueint};
  const int H = m3_model_config(on_gpu)->hidden_size, n = m3_model_vision_tokens(on_gpu, &in);
  const size_t count = (size_t)n * H, row_len = 3 * 2 * 14 * 14;
  int ok = pix && want && ebytes == count * sizeof(float) &&
           pbytes == (size_t)in.grid_t * in.grid_h * in.grid_w * row_len * sizeof(float);
  if (!ok) {
    printf("| %s | %dx%dx%d | %d | fixture files missing or of the wrong size | | | FAIL |\n", key,
           in.grid_t, in.grid_h, in.grid_w, n);
  } else {
    float *got = malloc(count * sizeof(float)), *cpu = malloc(count * sizeof(float));
    m3_status sg = m3_model_encode_vision(on_gpu, &in, got);
    const char *gpu_error = sg == M3_OK ? "" : m3_last_error();
    char gpu_msg[256];
    snprintf(gpu_msg, sizeof gpu_msg, "%s", gpu_error);
    must(m3_model_encode_vision(on_cpu, &in, cpu), "encode_vision (cpu)");
    if (sg != M3_OK) {
      printf("| %s | %dx%dx%d | %d | cuda: %s | | | FAIL |\n", key, in.grid_t, in.grid_h, in.grid_w,
             n, gpu_msg);
      ok = 0;
    } else {
      const double vs_ref = rel_l2(got, want, count), vs_cpu = rel_l2(got, cpu, count);
      const double cpu_ref = rel_l2(cpu, want, count);
      ok = vs_ref <= 1e-2 && vs_cpu <= 1e-4;
      printf("| %s | %dx%dx%d | %d | %.3g | %.3g | %.3g | %s |\n", key, in.grid_t, in.grid_h,
             in.grid_w, n, vs_ref, vs_cpu, cpu_ref, ok ? "PASS" : "FAIL");
    }
    free(got);
    free(cpu);
  }
  free(pix);
  free(want);
  return ok;
}

/* Random pixels on grids without a reference, GPU against CPU only: many attention tiles in one
 * segment, and a video split into segments of 4 and 2 temporal patches. 1 when it passes. */
static int check_random(const char *what, int grid_t, int gh, int gw, m3_model *on_cpu,
                        m3_model *on_gpu) {
  m3_vision_input in = {NULL, grid_t, gh, gw};
  const size_t rows = (size_t)grid_t * gh * gw, row_len = 3 * 2 * 14 * 14;
  const int H = m3_model_config(on_gpu)->hidden_size, n = m3_model_vision_tokens(on_gpu, &in);
  float *pix = malloc(rows * row_len * sizeof(float));
  float *got = malloc((size_t)n * H * sizeof(float)), *cpu = malloc((size_t)n * H * sizeof(float));
  for (size_t i = 0; i < rows * row_len; i++) pix[i] = uniform(-2, 2);
  in.pixels = pix;
  int ok = m3_model_encode_vision(on_gpu, &in, got) == M3_OK;
  if (!ok) {
    printf("| %s | %dx%dx%d | %d | - | cuda: %s | - | FAIL |\n", what, grid_t, gh, gw, n,
           m3_last_error());
  } else {
    must(m3_model_encode_vision(on_cpu, &in, cpu), "encode_vision (cpu)");
    const double vs_cpu = rel_l2(got, cpu, (size_t)n * H);
    ok = vs_cpu <= 1e-4;
    printf("| %s | %dx%dx%d | %d | - | %.3g | - | %s |\n", what, grid_t, gh, gw, n, vs_cpu,
           ok ? "PASS" : "FAIL");
  }
  free(pix);
  free(got);
  free(cpu);
  return ok;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* The items' pixels encoded on the GPU, one item after another: [rows, H]; NULL on failure. */
static float *encode_items(const char *fix, const cJSON *items, const cJSON *names, m3_model *m,
                           int *rows) {
  const int H = m3_model_config(m)->hidden_size;
  float *out = NULL;
  *rows = 0;
  const cJSON *name;
  cJSON_ArrayForEach(name, names) {
    const cJSON *g = cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(items, name->valuestring), "grid");
    char path[8192];
    snprintf(path, sizeof path, "%s/pixels_%s.f32", fix, name->valuestring);
    size_t bytes = 0;
    float *pix = cJSON_GetArraySize(g) == 3 ? read_file(path, &bytes) : NULL;
    m3_vision_input in = {pix, 0, 0, 0};
    if (pix) {
      in.grid_t = cJSON_GetArrayItem(g, 0)->valueint;
      in.grid_h = cJSON_GetArrayItem(g, 1)->valueint;
      in.grid_w = cJSON_GetArrayItem(g, 2)->valueint;
    }
    const int n = pix ? m3_model_vision_tokens(m, &in) : 0;
    float *grown = n > 0 ? realloc(out, (size_t)(*rows + n) * H * sizeof(float)) : NULL;
    const int ok = grown && m3_model_encode_vision(m, &in, grown + (size_t)*rows * H) == M3_OK;
    free(pix);
    if (grown) out = grown;
    if (!ok) {
      printf("FAIL: %s: cannot encode on the GPU: %s\n", name->valuestring, m3_last_error());
      free(out);
      return NULL;
    }
    *rows += n;
  }
  return out;
}

/* Each committed prompt on the GPU in one forward: 1 when all pass. */
static int check_prompts(const char *fix, const cJSON *ref, m3_model *m) {
  const m3_config *cfg = m3_model_config(m);
  const int V = cfg->vocab_size;
  const cJSON *items = cJSON_GetObjectItemCaseSensitive(ref, "items");
  printf("| prompt | tokens | worst rel L2 vs transformers (<= 1e-2) | median | argmax agree | result |\n");
  printf("|---|---|---|---|---|---|\n");
  int all = 1;
  const cJSON *p;
  cJSON_ArrayForEach(p, cJSON_GetObjectItemCaseSensitive(ref, "prompts")) {
    const cJSON *jids = cJSON_GetObjectItemCaseSensitive(p, "ids");
    const int n = cJSON_GetArraySize(jids);
    char path[8192];
    snprintf(path, sizeof path, "%s/logits_%s.f32", fix, p->string);
    size_t bytes = 0;
    float *want = read_file(path, &bytes);
    int rows = 0;
    float *media = encode_items(fix, items, cJSON_GetObjectItemCaseSensitive(p, "items"), m, &rows);
    int32_t *ids = malloc((size_t)n * sizeof *ids), *pos = malloc((size_t)n * sizeof *pos);
    float *got = malloc((size_t)n * V * sizeof(float));
    m3_kv_view *views = calloc((size_t)cfg->num_layers, sizeof *views);
    m3_kv_cache *cache = NULL;
    m3_kv_seq seq;
    m3_kv_seq_init(&seq);
    int ok = want && bytes == (size_t)n * V * sizeof(float) && media && ids && pos && got && views;
    ok = ok && m3_kv_cache_create(cfg, m3_model_backend(m), M3_KV_F32,
                                  m3_kv_bytes_for_tokens(cfg, M3_KV_F32, n), &cache) == M3_OK &&
         m3_kv_seq_extend(cache, &seq, n) == M3_OK;
    if (ok) {
      for (int i = 0; i < n; i++) ids[i] = cJSON_GetArrayItem(jids, i)->valueint, pos[i] = i;
      m3_kv_seq_views(cache, &seq, views);
      const m3_model_seq q = {.kv = views, .ids = ids, .pos = pos, .T = n, .n_logits = n,
                              .media = media, .n_media = rows, .media_first = 0};
      ok = m3_model_forward_batch(m, &q, 1, got) == M3_OK;
    }
    if (!ok) {
      printf("| %s | %d | failed: %s | | | FAIL |\n", p->string, n, m3_last_error());
    } else {
      double worst = 0, *rel = malloc((size_t)n * sizeof *rel);
      int agree = 0;
      for (int t = 0; t < n; t++) {
        const float *g = got + (size_t)t * V, *w = want + (size_t)t * V;
        rel[t] = rel_l2(g, w, (size_t)V);
        worst = rel[t] > worst ? rel[t] : worst;
        int ag = 0, aw = 0;
        for (int v = 1; v < V; v++) ag = g[v] > g[ag] ? v : ag, aw = w[v] > w[aw] ? v : aw;
        agree += ag == aw;
      }
      qsort(rel, (size_t)n, sizeof *rel, cmp_double);
      ok = worst <= 1e-2 && agree == n;
      printf("| %s | %d | %.3g | %.3g | %d of %d | %s |\n", p->string, n, worst, rel[n / 2], agree, n,
             ok ? "PASS" : "FAIL");
      free(rel);
    }
    if (cache) {
      m3_kv_seq_release(cache, &seq);
      m3_kv_cache_free(cache);
    }
    free(views), free(got), free(ids), free(pos), free(media), free(want);
    all &= ok;
  }
  printf("\n");
  return all;
}

static int check_fixtures(const char *src, m3_backend *cpu, m3_backend *gpu) {
  char fix[4096], path[4200];
  snprintf(fix, sizeof fix, "%s/tests/fixtures/vision", src);
  snprintf(path, sizeof path, "%s/reference.json", fix);
  size_t len = 0;
  char *json = read_file(path, &len);
  cJSON *ref = json ? cJSON_ParseWithLength(json, len) : NULL;
  free(json);
  if (!ref) {
    printf("FAIL: %s: not JSON\n", path);
    return 0;
  }
  snprintf(path, sizeof path, "%s/vl_vision_f32", fix);
  m3_model *on_cpu = NULL, *on_gpu = NULL;
  must(m3_model_load(path, cpu, &on_cpu), "load (cpu)");
  must(m3_model_load(path, gpu, &on_gpu), "load (cuda)");
  printf("## tower on the committed fixtures (%s)\n\n", path);
  printf("| item | grid t x h x w | tokens | rel L2 GPU vs reference (<= 1e-2) | "
         "rel L2 GPU vs CPU (<= 1e-4) | rel L2 CPU vs reference | result |\n");
  printf("|---|---|---|---|---|---|---|\n");
  static const char *const keys[] = {"rgba", "tiny", "video"};
  const cJSON *items = cJSON_GetObjectItemCaseSensitive(ref, "items");
  int ok = 1;
  for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(items, keys[k]);
    if (!it) {
      printf("| %s | missing from reference.json | | | | | FAIL |\n", keys[k]);
      ok = 0;
      continue;
    }
    ok &= check_item(fix, it, keys[k], on_cpu, on_gpu);
  }
  ok &= check_random("random image (the large item's grid)", 1, 56, 40, on_cpu, on_gpu);
  ok &= check_random("random video (segments of 4 and 2)", 6, 8, 10, on_cpu, on_gpu);
  printf("\n");
  ok &= check_prompts(fix, ref, on_gpu);
  m3_model_free(on_cpu);
  m3_model_free(on_gpu);
  cJSON_Delete(ref);
  return ok;
}

/* ---- timing at the real width ---- */

/* m3_vision_chat_spec.md §1.2 and §1.1 (projector_hidden_size) and the text hidden size. */
enum {
  REAL_WIDTH = 1280, REAL_HEADS = 16, REAL_LAYERS = 32, REAL_MLP = 5120, REAL_PROJ = 6144,
  REAL_HIDDEN = 6144, ROW_LEN = 3 * 2 * 14 * 14, MERGE = 2, SEGMENT_FRAMES = 4
};

typedef struct {
  m3_model m;
  m3_vision_layer_weights layers[REAL_LAYERS];
  uint16_t *bf16; /* random host values every BF16 weight is uploaded from */
  float *f32;
} real_tower;

/* A weight of the tower, uploaded to the GPU from the random host values. */
static m3_tensor upload_weight(m3_backend *gpu, const real_tower *rt, m3_dtype dt, int64_t rows,
                               int64_t cols) {
  m3_tensor t;
  memset(&t, 0, sizeof t);
  t.name = "vision (random)";
  t.data = dt == M3_DT_F32 ? (const void *)rt->f32 : (const void *)rt->bf16;
  t.dtype = dt;
  t.rows = rows;
  t.cols = cols;
  must(gpu->ops->prepare_tensor(gpu, &t), "prepare_tensor");
  return t;
}

/* The model object m3_model_encode_vision reads (config, vision weights, backend) at the real
 * vision config; nothing of the text model. Weights are small random values (a tower of 32
 * layers stays finite); the times do not depend on them. */
static void real_tower_build(m3_backend *gpu, real_tower *rt) {
  memset(rt, 0, sizeof *rt);
  const size_t most = (size_t)REAL_PROJ * 4 * REAL_HIDDEN; /* the merger's first linear */
  rt->bf16 = malloc(most * sizeof *rt->bf16);
  rt->f32 = malloc((size_t)REAL_WIDTH * ROW_LEN * sizeof *rt->f32);
  if (!rt->bf16 || !rt->f32) must(M3_ERR_NOMEM, "host weights");
  for (size_t i = 0; i < most; i++) rt->bf16[i] = m3_f32_to_bf16(uniform(-0.03f, 0.03f));
  for (size_t i = 0; i < (size_t)REAL_WIDTH * ROW_LEN; i++) rt->f32[i] = uniform(-0.03f, 0.03f);
  m3_config *c = &rt->m.cfg;
  c->hidden_size = REAL_HIDDEN;
  c->projector_hidden_size = REAL_PROJ;
  c->vision = (m3_vision_config){.present = 1, .hidden_size = REAL_WIDTH, .num_heads = REAL_HEADS,
                                 .num_layers = REAL_LAYERS, .intermediate_size = REAL_MLP,
                                 .num_channels = 3, .patch_size = 14, .temporal_patch_size = 2,
                                 .spatial_merge_size = MERGE, .layer_norm_eps = 1e-5f,
                                 .rope_theta = 10000.0, .segment_max_frames = SEGMENT_FRAMES};
  m3_vision_weights *w = &rt->m.w.vision;
  const m3_dtype B = M3_DT_BF16;
  const int D = REAL_WIDTH, I = REAL_MLP, P = REAL_PROJ, H = REAL_HIDDEN;
  w->present = 1;
  w->patch_embed = upload_weight(gpu, rt, M3_DT_F32, D, ROW_LEN);
  w->pre_ln_w = upload_weight(gpu, rt, B, 1, D);
  w->pre_ln_b = upload_weight(gpu, rt, B, 1, D);
  for (int l = 0; l < REAL_LAYERS; l++) {
    m3_vision_layer_weights *L = &rt->layers[l];
    L->ln1_w = upload_weight(gpu, rt, B, 1, D), L->ln1_b = upload_weight(gpu, rt, B, 1, D);
    L->ln2_w = upload_weight(gpu, rt, B, 1, D), L->ln2_b = upload_weight(gpu, rt, B, 1, D);
    L->q_w = upload_weight(gpu, rt, B, D, D), L->q_b = upload_weight(gpu, rt, B, 1, D);
    L->k_w = upload_weight(gpu, rt, B, D, D), L->k_b = upload_weight(gpu, rt, B, 1, D);
    L->v_w = upload_weight(gpu, rt, B, D, D), L->v_b = upload_weight(gpu, rt, B, 1, D);
    L->out_w = upload_weight(gpu, rt, B, D, D), L->out_b = upload_weight(gpu, rt, B, 1, D);
    L->fc1_w = upload_weight(gpu, rt, B, I, D), L->fc1_b = upload_weight(gpu, rt, B, 1, I);
    L->fc2_w = upload_weight(gpu, rt, B, D, I), L->fc2_b = upload_weight(gpu, rt, B, 1, D);
  }
  w->layers = rt->layers;
  w->proj1_w = upload_weight(gpu, rt, B, P, D), w->proj1_b = upload_weight(gpu, rt, B, 1, P);
  w->proj2_w = upload_weight(gpu, rt, B, H, P), w->proj2_b = upload_weight(gpu, rt, B, 1, H);
  w->merge1_w = upload_weight(gpu, rt, B, P, 4 * H), w->merge1_b = upload_weight(gpu, rt, B, 1, P);
  w->merge2_w = upload_weight(gpu, rt, B, H, P), w->merge2_b = upload_weight(gpu, rt, B, 1, H);
  rt->m.be = gpu;
}

static void real_tower_free(m3_backend *gpu, real_tower *rt) {
  m3_vision_weights *w = &rt->m.w.vision;
  m3_tensor *top[] = {&w->patch_embed, &w->pre_ln_w, &w->pre_ln_b, &w->proj1_w, &w->proj1_b,
                      &w->proj2_w,     &w->proj2_b,  &w->merge1_w, &w->merge1_b, &w->merge2_w,
                      &w->merge2_b};
  for (size_t i = 0; i < sizeof top / sizeof top[0]; i++) gpu->ops->release_tensor(gpu, top[i]);
  for (int l = 0; l < REAL_LAYERS; l++) {
    m3_vision_layer_weights *L = &rt->layers[l];
    m3_tensor *all[] = {&L->ln1_w, &L->ln1_b, &L->ln2_w, &L->ln2_b, &L->q_w,   &L->q_b,
                        &L->k_w,   &L->k_b,   &L->v_w,   &L->v_b,   &L->out_w, &L->out_b,
                        &L->fc1_w, &L->fc1_b, &L->fc2_w, &L->fc2_b};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) gpu->ops->release_tensor(gpu, all[i]);
  }
  free(rt->bf16);
  free(rt->f32);
}

/* Multiply-adds x 2 of every matmul of one segment of N patches, and of attention (q k^T and
 * p v: 2 N^2 D each per layer, D = heads x head dim); norms, RoPE, GELU, softmax and bias adds
 * are not counted. */
static double segment_flops(double N, double *attention) {
  const double D = REAL_WIDTH, I = REAL_MLP, P = REAL_PROJ, H = REAL_HIDDEN;
  *attention += REAL_LAYERS * 4.0 * N * N * D;
  return 2.0 * N * ROW_LEN * D                                   /* patch embedding */
         + REAL_LAYERS * (2.0 * N * (4.0 * D * D + 2.0 * D * I) /* q, k, v, out; fc1, fc2 */
                          + 4.0 * N * N * D)                      /* attention */
         + 2.0 * N * (D * P + P * H)                              /* projector */
         + 2.0 * (N / 4) * (4.0 * H * P + P * H);                 /* merger */
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* One row of the table: the median of 3 timed encodes after one warm-up (each includes the
 * upload of the pixels, the per-segment activation allocations and the download of the output). */
static void time_item(real_tower *rt, const char *what, int grid_t, int gh, int gw) {
  m3_vision_input in = {NULL, grid_t, gh, gw};
  const size_t rows = (size_t)grid_t * gh * gw;
  float *pix = malloc(rows * ROW_LEN * sizeof(float));
  const int tokens = m3_model_vision_tokens(&rt->m, &in);
  float *out = malloc((size_t)tokens * REAL_HIDDEN * sizeof(float));
  if (!pix || !out) must(M3_ERR_NOMEM, "pixels");
  for (size_t i = 0; i < rows * ROW_LEN; i++) pix[i] = uniform(-2, 2);
  in.pixels = pix;
  fprintf(stderr, "   timing %s\n", what);
  double samples[3];
  must(m3_model_encode_vision(&rt->m, &in, out), what);
  for (int s = 0; s < 3; s++) {
    double t0 = now_s();
    must(m3_model_encode_vision(&rt->m, &in, out), what);
    samples[s] = now_s() - t0;
  }
  qsort(samples, 3, sizeof samples[0], cmp_double);
  double attention = 0, flops = 0;
  int segments = 0;
  for (int t0 = 0; t0 < grid_t; t0 += SEGMENT_FRAMES, segments++) {
    const int seg_t = grid_t - t0 < SEGMENT_FRAMES ? grid_t - t0 : SEGMENT_FRAMES;
    flops += segment_flops((double)seg_t * gh * gw, &attention);
  }
  const double ms = samples[1] * 1e3;
  printf("| %s | %dx%dx%d | %d x %d | %d | %.1f | %.0f (%.0f%% attention) | %.1f |\n", what, grid_t,
         gh, gw, segments, grid_t < SEGMENT_FRAMES ? grid_t * gh * gw : SEGMENT_FRAMES * gh * gw,
         tokens, ms, flops / 1e9, 100.0 * attention / flops, flops / samples[1] / 1e12);
  free(pix);
  free(out);
}

static void time_real_tower(m3_backend *gpu) {
  real_tower *rt = malloc(sizeof *rt);
  if (!rt) must(M3_ERR_NOMEM, "tower");
  fprintf(stderr, "   building the real-width tower (random BF16 weights)\n");
  real_tower_build(gpu, rt);
  printf("## tower at the real M3 vision width (1280 wide, 16 heads of 80, 32 layers, MLP 5120; "
         "projector and merger 6144; random BF16 weights, patch embedding F32)\n\n");
  printf("| input | grid t x h x w | segments x patches | merged tokens | ms per item (median of 3) "
         "| GFLOP (matmuls + attention) | TFLOP/s |\n");
  printf("|---|---|---|---|---|---|---|\n");
  /* 1024x1024, m3's processor (smart resize, max_pixels 451584): 672x672 -> 48x48 patches. */
  time_item(rt, "image 1024x1024 -> 672x672 (max_pixels, m3)", 1, 48, 48);
  /* The same image under the API's long-side rule (2016): 1036x1036 -> 74x74 patches. */
  time_item(rt, "image 1024x1024 -> 1036x1036 (long side 2016)", 1, 74, 74);
  /* 16 frames of 448x448 (under the video max_pixels 602112, kept): 8 temporal patches of 32x32,
   * two segments of 4. */
  time_item(rt, "video 16 frames 448x448", 8, 32, 32);
  printf("\nFLOPs: 2 per multiply-add of every matmul (patch embedding, q/k/v/out, fc1/fc2, "
         "projector, merger) plus 4 N^2 D per layer for attention within each segment.\n");
  real_tower_free(gpu, rt);
  free(rt);
}

int main(int argc, char **argv) {
  const char *src = argc > 1 ? argv[1] : M3_SOURCE_DIR;
  setvbuf(stdout, NULL, _IOLBF, 0);
  m3_backend *cpu = NULL, *gpu = NULL;
  must(m3_backend_cpu_create(0, &cpu), "cpu backend");
  must(m3_backend_create("cuda", 0, &gpu), "cuda backend");
  int ok = check_fixtures(src, cpu, gpu);
  time_real_tower(gpu);
  cpu->ops->destroy(cpu);
  gpu->ops->destroy(gpu);
  printf("\n%s\n", ok ? "ALL PASS" : "FAILURES");
  return ok ? 0 : 1;
}
