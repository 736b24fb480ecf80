/* Image and video pre-processing against transformers 5.17's processors (tests/fixtures/vision,
 * written by tools/make_vision_fixtures.py): the grid of every item and its pixel values within a
 * mean absolute error of 1e-2 (normalised units); smart_resize on the spec's worked examples;
 * PNG, GIF and WebP decoding of one picture agree exactly; the video sampler; bad bytes fail with
 * the file's name. Prints the max and mean pixel error of each item. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "media/media.h"

#define FIX M3_SOURCE_DIR "/tests/fixtures/vision"

static void *read_all(const char *path, size_t *bytes) {
  uint8_t *data = NULL;
  m3_status st = m3_read_file(path, (size_t)64 << 20, &data, bytes);
  CHECK_OK(st);
  return data;
}

static const cJSON *item(const cJSON *ref, const char *key) {
  return cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(ref, "items"), key);
}

static int json_int(const cJSON *obj, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
  return cJSON_IsNumber(v) ? v->valueint : -1;
}

/* Compares m3's patches with the fixture's pixel rows (every stride-th row was kept). */
static void compare_pixels(const char *key, const cJSON *it, const m3_patches *p) {
  const cJSON *grid = cJSON_GetObjectItemCaseSensitive(it, "grid");
  CHECK_EQ_INT(p->grid_t, cJSON_GetArrayItem(grid, 0)->valueint);
  CHECK_EQ_INT(p->grid_h, cJSON_GetArrayItem(grid, 1)->valueint);
  CHECK_EQ_INT(p->grid_w, cJSON_GetArrayItem(grid, 2)->valueint);
  const int rows = json_int(it, "rows"), row_len = json_int(it, "row_len");
  const int stride = json_int(it, "pixel_row_stride");
  CHECK_EQ_INT(p->rows, rows);
  CHECK_EQ_INT(p->row_len, row_len);
  if (p->rows != rows || p->row_len != row_len) return;
  char path[4096];
  snprintf(path, sizeof path, FIX "/pixels_%s.f32", key);
  size_t bytes = 0;
  float *want = read_all(path, &bytes);
  const int kept = (rows + stride - 1) / stride;
  CHECK_EQ_INT(bytes, (size_t)kept * row_len * sizeof(float));
  if (!want || bytes != (size_t)kept * row_len * sizeof(float)) {
    free(want);
    return;
  }
  double sum = 0, worst = 0;
  size_t off_by_more = 0;
  for (int r = 0; r < kept; r++)
    for (int i = 0; i < row_len; i++) {
      double d = fabs((double)p->pixels[(size_t)r * stride * row_len + i] - want[(size_t)r * row_len + i]);
      sum += d;
      if (!(d <= worst)) worst = d;
      off_by_more += d > 0.02; /* more than one 8-bit step */
    }
  const double mae = sum / ((double)kept * row_len);
  printf("  %s: grid %dx%dx%d, pixel |error| mean %.3g max %.3g, %zu values beyond one 8-bit step\n",
         key, p->grid_t, p->grid_h, p->grid_w, mae, worst, off_by_more);
  CHECK(mae <= 1e-2);
  free(want);
}

static void test_images(const cJSON *ref) {
  const m3_media_geometry g = m3_media_image_geometry(14, 2, 2);
  const char *keys[] = {"rgba", "tiny", "large"};
  for (int k = 0; k < 3; k++) {
    const cJSON *it = item(ref, keys[k]);
    CHECK(it != NULL);
    if (!it) continue;
    char path[4096];
    snprintf(path, sizeof path, FIX "/media/%s",
             cJSON_GetObjectItemCaseSensitive(it, "file")->valuestring);
    size_t len = 0;
    uint8_t *data = read_all(path, &len);
    m3_patches p;
    CHECK_OK(m3_image_preprocess(data, len, path, &g, &p));
    compare_pixels(keys[k], it, &p);
    CHECK_EQ_INT(m3_patches_tokens(&p, 2), p.grid_h * p.grid_w / 4);
    m3_patches_free(&p);
    free(data);
  }
}

static void test_video(const cJSON *ref) {
  const cJSON *it = item(ref, "video");
  CHECK(it != NULL);
  if (!it) return;
  const m3_media_geometry g = m3_media_video_geometry(14, 2, 2);
  m3_patches p;
  CHECK_OK(m3_video_preprocess(FIX "/media/clip_16f_2fps.mkv", 1.0, 768, &g, &p));
  CHECK(p.is_video);
  compare_pixels("video", it, &p);
  const cJSON *ts = cJSON_GetObjectItemCaseSensitive(it, "timestamps");
  CHECK_EQ_INT(cJSON_GetArraySize(ts), p.grid_t);
  for (int k = 0; k < p.grid_t && k < cJSON_GetArraySize(ts); k++)
    CHECK_NEAR(p.timestamps[k], cJSON_GetArrayItem(ts, k)->valuedouble, 1e-9);
  m3_patches_free(&p);

  /* vLLM's sampler (spec §3.1): 300 frames at 29.97 fps keep 0, 30, ..., 270. */
  int keep[400];
  int n = m3_video_sample_indices(300, 29.97, 1.0, keep, 400);
  CHECK_EQ_INT(n, 10);
  for (int i = 0; i < n; i++) CHECK_EQ_INT(keep[i], 30 * i);
  CHECK_EQ_INT(m3_video_sample_indices(0, 30.0, 1.0, keep, 400), 1);
  /* Faster sampling than the stream: every frame once. */
  n = m3_video_sample_indices(5, 2.0, 10.0, keep, 400);
  CHECK_EQ_INT(n, 5);
  CHECK_EQ_INT(keep[4], 4);
}

static void test_smart_resize(void) {
  /* (h, w) -> (h1, w1), spec §2.2 worked examples plus Python's half-to-even rounding. */
  const int cases[][4] = {{768, 1024, 560, 756}, {1080, 1920, 504, 896}, {672, 672, 672, 672},
                          {100, 300, 112, 308},  {3000, 4000, 560, 756}, {70, 140, 56, 140},
                          {9, 23, 56, 112}};
  const m3_media_geometry g = m3_media_image_geometry(14, 2, 2);
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    int h = 0, w = 0;
    CHECK_OK(m3_smart_resize(cases[i][0], cases[i][1], &g, "case", &h, &w));
    CHECK_EQ_INT(h, cases[i][2]);
    CHECK_EQ_INT(w, cases[i][3]);
  }
  int h, w;
  CHECK_FAILS_WITH(m3_smart_resize(10, 2010, &g, "thin.png", &h, &w), M3_ERR_ARG, "thin.png");
}

static void decode_file(const char *name, m3_rgb_image *img) {
  char path[4096];
  snprintf(path, sizeof path, FIX "/media/%s", name);
  size_t len = 0;
  uint8_t *data = read_all(path, &len);
  CHECK_OK(m3_image_decode(data, len, path, img));
  free(data);
}

static void test_decoders(void) {
  m3_rgb_image png, gif, webp;
  decode_file("pattern.png", &png);
  decode_file("pattern.gif", &gif);
  decode_file("pattern.webp", &webp);
  CHECK_EQ_INT(png.width, 40);
  CHECK_EQ_INT(png.height, 30);
  const size_t n = (size_t)png.width * png.height * 3;
  CHECK(gif.width == png.width && gif.height == png.height && memcmp(gif.rgb, png.rgb, n) == 0);
  CHECK(webp.width == png.width && webp.height == png.height && memcmp(webp.rgb, png.rgb, n) == 0);
  m3_rgb_image_free(&png);
  m3_rgb_image_free(&gif);
  m3_rgb_image_free(&webp);

  /* EXIF orientation 6: the 1000x700 JPEG comes out 700 wide, 1000 high. */
  m3_rgb_image jpg;
  decode_file("large_1000x700_exif6.jpg", &jpg);
  CHECK_EQ_INT(jpg.width, 700);
  CHECK_EQ_INT(jpg.height, 1000);
  m3_rgb_image_free(&jpg);

  /* Alpha onto white: the last 6 rows of the RGBA picture are fully clear. */
  m3_rgb_image rgba;
  decode_file("rgba_97x61.png", &rgba);
  CHECK_EQ_INT(rgba.rgb[((size_t)60 * 97 + 50) * 3], 255);
  CHECK_EQ_INT(rgba.rgb[((size_t)60 * 97 + 50) * 3 + 1], 255);
  m3_rgb_image_free(&rgba);
}

static void test_bad_input(void) {
  m3_rgb_image img;
  CHECK_FAILS_WITH(m3_image_decode("hello world", 11, "notes.txt", &img), M3_ERR_FORMAT,
                   "notes.txt");
  const char *files[] = {"pattern.png", "large_1000x700_exif6.jpg", "pattern.gif", "pattern.webp"};
  for (int i = 0; i < 4; i++) {
    char path[4096];
    snprintf(path, sizeof path, FIX "/media/%s", files[i]);
    size_t len = 0;
    uint8_t *data = read_all(path, &len);
    /* Truncated to a third: a clear failure naming the file, never a crash. */
    CHECK_FAILS_WITH(m3_image_decode(data, len / 3, files[i], &img), M3_ERR_FORMAT, files[i]);
    free(data);
  }
  m3_patches p;
  const m3_media_geometry g = m3_media_video_geometry(14, 2, 2);
  CHECK_FAILS_WITH(m3_video_preprocess(FIX "/reference.json", 1.0, 16, &g, &p), M3_ERR_FORMAT,
                   "reference.json");
  CHECK_FAILS_WITH(m3_video_preprocess(FIX "/media/no_such.mkv", 1.0, 16, &g, &p), M3_ERR_FORMAT,
                   "no_such.mkv");
}

int main(void) {
  size_t len = 0;
  char *json = read_all(FIX "/reference.json", &len);
  cJSON *ref = json ? cJSON_ParseWithLength(json, len) : NULL;
  CHECK(ref != NULL);
  free(json);
  if (ref) {
    test_images(ref);
    test_video(ref);
  }
  cJSON_Delete(ref);
  test_smart_resize();
  test_decoders();
  test_bad_input();
  return check_summary();
}
