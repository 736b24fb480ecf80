/* The vision tower and the splice on the CPU against tests/fixtures/vision (written by
 * tools/make_vision_fixtures.py from transformers 5.17's processors and text model, with the tower
 * of m3_vision_chat_spec.md §4):
 *   - embeddings of the reference pixel values: relative L2 <= 1e-4 per item (two images and a
 *     4-temporal-patch video);
 *   - end to end, m3's own pre-processing of the media files -> tower -> splice -> every
 *     position's logits of the fixture prompts: relative L2 <= 1e-4 and the same argmax, whether
 *     the prompt runs at once or in chunks of 5 (placeholder runs split across steps).
 * Prints the measured errors. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "compare.h"
#include "engine/kvcache.h"
#include "media/media.h"
#include "model/model.h"

#define FIX M3_SOURCE_DIR "/tests/fixtures/vision"

static void *read_all(const char *path, size_t *bytes) {
  uint8_t *data = NULL;
  CHECK_OK(m3_read_file(path, (size_t)64 << 20, &data, bytes));
  return data;
}

static const cJSON *item(const cJSON *ref, const char *key) {
  return cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(ref, "items"), key);
}

static void grid_of(const cJSON *it, m3_vision_input *in) {
  const cJSON *g = cJSON_GetObjectItemCaseSensitive(it, "grid");
  in->grid_t = cJSON_GetArrayItem(g, 0)->valueint;
  in->grid_h = cJSON_GetArrayItem(g, 1)->valueint;
  in->grid_w = cJSON_GetArrayItem(g, 2)->valueint;
}

/* The tower on the fixture's own pixel values. */
static void test_embeddings(m3_model *m, const cJSON *ref) {
  const char *keys[] = {"rgba", "tiny", "video"};
  const int H = m3_model_config(m)->hidden_size;
  for (int k = 0; k < 3; k++) {
    const cJSON *it = item(ref, keys[k]);
    CHECK(it != NULL);
    if (!it) continue;
    char path[4096];
    size_t bytes = 0, ebytes = 0;
    snprintf(path, sizeof path, FIX "/pixels_%s.f32", keys[k]);
    float *pix = read_all(path, &bytes);
    snprintf(path, sizeof path, FIX "/embeds_%s.f32", keys[k]);
    float *want = read_all(path, &ebytes);
    m3_vision_input in = {.pixels = pix};
    grid_of(it, &in);
    const int n = m3_model_vision_tokens(m, &in);
    CHECK_EQ_INT(ebytes, (size_t)n * H * sizeof(float));
    float *got = malloc((size_t)n * H * sizeof(float));
    CHECK_OK(m3_model_encode_vision(m, &in, got));
    if (ebytes == (size_t)n * H * sizeof(float)) {
      double rel = rel_l2(got, want, (size_t)n * H);
      printf("  %s: %d tokens, embeddings relative L2 %.3g\n", keys[k], n, rel);
      CHECK(rel <= 1e-4);
    }
    free(got);
    free(pix);
    free(want);
  }
  /* A grid the merge cannot divide is refused by name, not computed. */
  m3_vision_input bad = {.pixels = NULL, .grid_t = 1, .grid_h = 3, .grid_w = 4};
  CHECK_FAILS_WITH(m3_model_encode_vision(m, &bad, NULL), M3_ERR_ARG, "grid");
}

/* m3's own preprocessing of one fixture item: [tokens, H] embeddings appended at rows. */
static int encode_file(m3_model *m, const cJSON *it, float *rows) {
  const char *file = cJSON_GetObjectItemCaseSensitive(it, "file")->valuestring;
  char path[4096];
  snprintf(path, sizeof path, FIX "/media/%s", file);
  m3_patches p = {0};
  const int is_video = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(it, "is_video"));
  if (is_video) {
    const m3_media_geometry g = m3_media_video_geometry(14, 2, 2);
    CHECK_OK(m3_video_preprocess(path, 1.0, 768, &g, &p));
  } else {
    const m3_media_geometry g = m3_media_image_geometry(14, 2, 2);
    size_t len = 0;
    uint8_t *data = read_all(path, &len);
    CHECK_OK(m3_image_preprocess(data, len, path, &g, &p));
    free(data);
  }
  m3_vision_input in = {p.pixels, p.grid_t, p.grid_h, p.grid_w};
  const int n = p.pixels ? m3_model_vision_tokens(m, &in) : 0;
  if (n) CHECK_OK(m3_model_encode_vision(m, &in, rows));
  m3_patches_free(&p);
  return n;
}

/* Runs ids through a fresh cache `chunk` tokens per forward with media rows; logits [n, V]. */
static void run_prompt(m3_model *m, const int32_t *ids, int n, const float *media, int n_media,
                       int chunk, float *logits) {
  const m3_config *cfg = m3_model_config(m);
  m3_kv_cache *cache = NULL;
  CHECK_OK(m3_kv_cache_create(cfg, m3_model_backend(m), M3_KV_F32,
                              m3_kv_bytes_for_tokens(cfg, M3_KV_F32, n), &cache));
  if (!cache) return;
  m3_kv_seq seq;
  m3_kv_seq_init(&seq);
  m3_kv_view *views = calloc((size_t)cfg->num_layers, sizeof *views);
  int32_t *pos = malloc((size_t)n * sizeof *pos);
  for (int i = 0; i < n; i++) pos[i] = i;
  int used = 0; /* media rows taken by earlier chunks */
  for (int t0 = 0; t0 < n; t0 += chunk) {
    int T = n - t0 < chunk ? n - t0 : chunk;
    CHECK_OK(m3_kv_seq_extend(cache, &seq, T));
    m3_kv_seq_views(cache, &seq, views);
    m3_model_seq s = {.kv = views, .ids = ids + t0, .pos = pos + t0, .T = T, .n_logits = T,
                      .media = media, .n_media = n_media, .media_first = used};
    CHECK_OK(m3_model_forward_batch(m, &s, 1, logits + (size_t)t0 * cfg->vocab_size));
    for (int j = 0; j < T; j++)
      used += ids[t0 + j] == cfg->image_token_id || ids[t0 + j] == cfg->video_token_id;
  }
  m3_kv_seq_release(cache, &seq);
  m3_kv_cache_free(cache);
  free(views);
  free(pos);
}

static void test_prompts(m3_model *m, const cJSON *ref) {
  const m3_config *cfg = m3_model_config(m);
  const int V = cfg->vocab_size, H = cfg->hidden_size;
  CHECK_EQ_INT(cfg->image_token_id, cJSON_GetObjectItemCaseSensitive(ref, "image_token_id")->valueint);
  CHECK_EQ_INT(cfg->video_token_id, cJSON_GetObjectItemCaseSensitive(ref, "video_token_id")->valueint);
  const cJSON *prompts = cJSON_GetObjectItemCaseSensitive(ref, "prompts");
  const cJSON *p;
  cJSON_ArrayForEach(p, prompts) {
    const cJSON *jids = cJSON_GetObjectItemCaseSensitive(p, "ids");
    const cJSON *jitems = cJSON_GetObjectItemCaseSensitive(p, "items");
    const int n = cJSON_GetArraySize(jids);
    int32_t *ids = malloc((size_t)n * sizeof *ids);
    for (int i = 0; i < n; i++) ids[i] = cJSON_GetArrayItem(jids, i)->valueint;
    float *media = malloc((size_t)n * H * sizeof(float)); /* no more rows than ids */
    int n_media = 0;
    const cJSON *name;
    cJSON_ArrayForEach(name, jitems) {
      n_media += encode_file(m, item(ref, name->valuestring), media + (size_t)n_media * H);
    }
    char path[4096];
    snprintf(path, sizeof path, FIX "/logits_%s.f32", p->string);
    size_t bytes = 0;
    float *want = read_all(path, &bytes);
    CHECK_EQ_INT(bytes, (size_t)n * V * sizeof(float));
    float *got = malloc((size_t)n * V * sizeof(float));
    const int chunks[] = {n, 5};
    for (int c = 0; c < 2 && bytes == (size_t)n * V * sizeof(float); c++) {
      run_prompt(m, ids, n, media, n_media, chunks[c], got);
      double worst = 0;
      int argmax_diff = 0;
      for (int t = 0; t < n; t++) {
        double rel = rel_l2(got + (size_t)t * V, want + (size_t)t * V, (size_t)V);
        if (!(rel <= worst)) worst = rel;
        int a = 0, b = 0;
        for (int i = 1; i < V; i++) {
          if (got[(size_t)t * V + i] > got[(size_t)t * V + a]) a = i;
          if (want[(size_t)t * V + i] > want[(size_t)t * V + b]) b = i;
        }
        argmax_diff += a != b;
      }
      printf("  prompt %s (%d ids, %d media rows, chunk %d): logits max relative L2 %.3g, "
             "argmax differs at %d\n", p->string, n, n_media, chunks[c], worst, argmax_diff);
      CHECK(worst <= 1e-4);
      CHECK_EQ_INT(argmax_diff, 0);
    }
    /* Without the media the placeholders keep their text rows: the logits must move. */
    run_prompt(m, ids, n, NULL, 0, n, got);
    CHECK(rel_l2(got + (size_t)(n - 1) * V, want + (size_t)(n - 1) * V, (size_t)V) > 1e-2);
    free(got);
    free(want);
    free(media);
    free(ids);
  }
}

int main(void) {
  size_t len = 0;
  char *json = read_all(FIX "/reference.json", &len);
  cJSON *ref = json ? cJSON_ParseWithLength(json, len) : NULL;
  free(json);
  CHECK(ref != NULL);
  m3_backend *be = NULL;
  m3_model *m = NULL;
  CHECK_OK(m3_backend_cpu_create(2, &be));
  if (be) CHECK_OK(m3_model_load(FIX "/vl_vision_f32", be, &m));
  if (m && ref) {
    test_embeddings(m, ref);
    test_prompts(m, ref);
  }
  m3_model_free(m);
  if (be) be->ops->destroy(be);
  cJSON_Delete(ref);
  return check_summary();
}
