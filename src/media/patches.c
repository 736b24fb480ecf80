/* patches.c: CLIP normalisation and the cut into tower patches (spec §2.4-§2.5).
 *
 * Row n of the output is one Conv3d window flattened in (c, tt, py, px) order; rows run over
 * t, then merge-window row, window column, then (dy, dx) inside the window, so that 4 consecutive
 * rows are one 2x2 merge window. */
#include <stdlib.h>
#include <string.h>

#include "media/media.h"

/* OpenAI CLIP statistics (preprocessor_config.json image_mean / image_std). */
static const double CLIP_MEAN[3] = {0.48145466, 0.4578275, 0.40821073};
static const double CLIP_STD[3] = {0.26862954, 0.26130258, 0.27577711};

void m3_patches_free(m3_patches *p) {
  if (!p) return;
  free(p->pixels);
  free(p->timestamps);
  *p = (m3_patches){0};
}

int m3_patches_tokens(const m3_patches *p, int merge_size) {
  return p->grid_t * p->grid_h * p->grid_w / (merge_size * merge_size);
}

m3_status m3_patchify(const m3_rgb_image *frames, int n_frames, const m3_media_geometry *g,
                      m3_patches *out) {
  *out = (m3_patches){0};
  const int P = g->patch_size, TP = g->temporal_patch_size, M = g->merge_size;
  const int W = frames[0].width, H = frames[0].height;
  if (n_frames <= 0 || W % (P * M) != 0 || H % (P * M) != 0)
    return m3_fail(M3_ERR_ARG, "patchify: %d frames of %dx%d (sides must be multiples of %d)",
                   n_frames, W, H, P * M);
  for (int f = 1; f < n_frames; f++)
    if (frames[f].width != W || frames[f].height != H)
      return m3_fail(M3_ERR_ARG, "patchify: frame %d is %dx%d, frame 0 %dx%d", f, frames[f].width,
                     frames[f].height, W, H);
  const int gt = (n_frames + TP - 1) / TP, gh = H / P, gw = W / P;
  const int row_len = 3 * TP * P * P;
  const size_t rows = (size_t)gt * gh * gw;
  out->pixels = malloc(rows * (size_t)row_len * sizeof(float));
  if (!out->pixels) return m3_fail(M3_ERR_NOMEM, "patchify: %zu patches", rows);
  /* The fast processor fuses rescale and normalise: (v - 255 mean) / (255 std) in float32. */
  float mean255[3], std255[3];
  for (int c = 0; c < 3; c++) {
    mean255[c] = (float)CLIP_MEAN[c] * 255.0f;
    std255[c] = (float)CLIP_STD[c] * 255.0f;
  }
  float *v = out->pixels;
  for (int t = 0; t < gt; t++)
    for (int bh = 0; bh < gh / M; bh++)
      for (int bw = 0; bw < gw / M; bw++)
        for (int dy = 0; dy < M; dy++)
          for (int dx = 0; dx < M; dx++) {
            const int y0 = (bh * M + dy) * P, x0 = (bw * M + dx) * P;
            for (int c = 0; c < 3; c++)
              for (int tt = 0; tt < TP; tt++) {
                /* An odd frame count repeats the last frame. */
                int f = t * TP + tt < n_frames ? t * TP + tt : n_frames - 1;
                const uint8_t *img = frames[f].rgb;
                for (int py = 0; py < P; py++)
                  for (int px = 0; px < P; px++) {
                    float value = img[((size_t)(y0 + py) * W + (x0 + px)) * 3 + c];
                    *v++ = (value - mean255[c]) / std255[c];
                  }
              }
          }
  out->rows = (int)rows;
  out->row_len = row_len;
  out->grid_t = gt;
  out->grid_h = gh;
  out->grid_w = gw;
  return M3_OK;
}

m3_status m3_image_preprocess(const void *data, size_t len, const char *label,
                              const m3_media_geometry *g, m3_patches *out) {
  *out = (m3_patches){0};
  m3_rgb_image img = {0}, sized = {0};
  int h, w;
  m3_status st = m3_image_decode(data, len, label, &img);
  if (st == M3_OK) st = m3_smart_resize(img.height, img.width, g, label, &h, &w);
  if (st == M3_OK) st = m3_resize_bicubic(&img, h, w, &sized);
  /* A still image is one frame; patchify repeats it to fill the temporal patch. */
  if (st == M3_OK) st = m3_patchify(&sized, 1, g, out);
  m3_rgb_image_free(&img);
  m3_rgb_image_free(&sized);
  return st;
}
