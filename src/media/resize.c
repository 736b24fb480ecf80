/* resize.c: the target size (smart_resize, spec §2.2 mode A) and the antialiased bicubic resize
 * in uint8 (spec §2.3).
 *
 * The resize reproduces torchvision's uint8 antialias kernel (which the transformers 5.17 fast
 * processor runs): per axis, Keys cubic weights (a = -0.5) widened by the scale when shrinking,
 * normalised in double, then rounded to int16 fixed point at the largest precision that keeps
 * every weight below 2^15; each output is (sum + 2^(p-1)) >> p clamped to [0, 255]. Horizontal
 * pass first, then vertical; an axis whose size does not change is not resampled. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "media/media.h"

m3_media_geometry m3_media_image_geometry(int patch_size, int temporal_patch_size, int merge_size) {
  return (m3_media_geometry){patch_size, temporal_patch_size, merge_size, 3136, 451584};
}

m3_media_geometry m3_media_video_geometry(int patch_size, int temporal_patch_size, int merge_size) {
  return (m3_media_geometry){patch_size, temporal_patch_size, merge_size, 3136, 602112};
}

m3_status m3_smart_resize(int height, int width, const m3_media_geometry *g, const char *label,
                          int *out_height, int *out_width) {
  const double F = (double)g->patch_size * g->merge_size, h = height, w = width;
  if (height <= 0 || width <= 0)
    return m3_fail(M3_ERR_ARG, "%s: empty image (%dx%d)", label, width, height);
  if ((h > w ? h / w : w / h) > 200)
    return m3_fail(M3_ERR_ARG, "%s: aspect ratio of %dx%d is over 200", label, width, height);
  /* Python's round() is half-to-even: nearbyint under the default rounding mode. */
  double h1 = F * nearbyint(h / F), w1 = F * nearbyint(w / F);
  if (h1 * w1 > (double)g->max_pixels) {
    double beta = sqrt(h * w / (double)g->max_pixels);
    h1 = fmax(F, F * floor(h / beta / F));
    w1 = fmax(F, F * floor(w / beta / F));
  } else if (h1 * w1 < (double)g->min_pixels) {
    double beta = sqrt((double)g->min_pixels / (h * w));
    h1 = F * ceil(h * beta / F);
    w1 = F * ceil(w * beta / F);
  }
  if (h1 > 65536 || w1 > 65536)
    return m3_fail(M3_ERR_LIMIT, "%s: resized size %.0fx%.0f is too large", label, w1, h1);
  *out_height = (int)h1;
  *out_width = (int)w1;
  return M3_OK;
}

static double keys_cubic(double x) {
  const double a = -0.5;
  x = fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
  return 0.0;
}

/* For each output index i: taps [start[i], start[i] + size[i]) with int16 weights w[i * taps ..]. */
typedef struct {
  int *start, *size;
  int16_t *w;
  int taps, precision;
} axis_weights;

static void axis_weights_free(axis_weights *a) {
  free(a->start);
  free(a->size);
  free(a->w);
}

static m3_status axis_weights_make(int in, int out, axis_weights *a) {
  const double scale = (double)in / out;
  const double support = scale >= 1.0 ? 2.0 * scale : 2.0;
  const double invscale = scale >= 1.0 ? 1.0 / scale : 1.0;
  a->taps = (int)ceil(support) * 2 + 1;
  a->start = malloc((size_t)out * sizeof *a->start);
  a->size = malloc((size_t)out * sizeof *a->size);
  double *wd = calloc((size_t)out * a->taps, sizeof *wd);
  a->w = calloc((size_t)out * a->taps, sizeof *a->w);
  if (!a->start || !a->size || !wd || !a->w) {
    free(wd);
    axis_weights_free(a);
    return m3_fail(M3_ERR_NOMEM, "resize: weights for %d -> %d", in, out);
  }
  double w_max = 0.0;
  for (int i = 0; i < out; i++) {
    const double center = scale * (i + 0.5);
    /* Truncation toward zero, as the reference's integer casts do. */
    int64_t lo = (int64_t)(center - support + 0.5), hi = (int64_t)(center + support + 0.5);
    if (lo < 0) lo = 0;
    if (hi > in) hi = in;
    int64_t n = hi - lo;
    if (n < 0) n = 0;
    if (n > a->taps) n = a->taps;
    a->start[i] = (int)lo;
    a->size[i] = (int)n;
    double *wi = wd + (size_t)i * a->taps, total = 0.0;
    for (int j = 0; j < n; j++) total += wi[j] = keys_cubic((j + lo - center + 0.5) * invscale);
    for (int j = 0; j < n && total != 0.0; j++) {
      wi[j] /= total;
      if (wi[j] > w_max) w_max = wi[j];
    }
  }
  int p = 0;
  for (; p < 22; p++)
    if ((int)(0.5 + w_max * (double)(1 << (p + 1))) >= (1 << 15)) break;
  a->precision = p;
  for (size_t k = 0; k < (size_t)out * a->taps; k++) {
    double v = wd[k] * (double)(1 << p);
    a->w[k] = (int16_t)(v < 0 ? (int)(-0.5 + v) : (int)(0.5 + v));
  }
  free(wd);
  return M3_OK;
}

static uint8_t fixed_to_u8(int32_t sum, int precision) {
  /* Arithmetic shift (floor) then saturation, as the reference's vector kernel does. */
  int32_t v = sum >= 0 ? sum >> precision : -((-sum + (1 << precision) - 1) >> precision);
  return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

/* dst [rows, out_w, 3] from src [rows, in_w, 3] along x. */
static void pass_horizontal(const uint8_t *src, int rows, int in_w, const axis_weights *a,
                            int out_w, uint8_t *dst) {
  const int32_t half = a->precision > 0 ? 1 << (a->precision - 1) : 0;
  for (int y = 0; y < rows; y++) {
    const uint8_t *row = src + (size_t)y * in_w * 3;
    for (int x = 0; x < out_w; x++) {
      const int16_t *w = a->w + (size_t)x * a->taps;
      const uint8_t *px = row + (size_t)a->start[x] * 3;
      int32_t s[3] = {half, half, half};
      for (int j = 0; j < a->size[x]; j++)
        for (int c = 0; c < 3; c++) s[c] += (int32_t)px[j * 3 + c] * w[j];
      for (int c = 0; c < 3; c++) dst[((size_t)y * out_w + x) * 3 + c] = fixed_to_u8(s[c], a->precision);
    }
  }
}

/* dst [out_h, width, 3] from src [in_h, width, 3] along y. */
static void pass_vertical(const uint8_t *src, int width, const axis_weights *a, int out_h,
                          uint8_t *dst) {
  const int32_t half = a->precision > 0 ? 1 << (a->precision - 1) : 0;
  const size_t stride = (size_t)width * 3;
  for (int y = 0; y < out_h; y++) {
    const int16_t *w = a->w + (size_t)y * a->taps;
    for (size_t k = 0; k < stride; k++) {
      int32_t s = half;
      for (int j = 0; j < a->size[y]; j++) s += (int32_t)src[(size_t)(a->start[y] + j) * stride + k] * w[j];
      dst[(size_t)y * stride + k] = fixed_to_u8(s, a->precision);
    }
  }
}

m3_status m3_resize_bicubic(const m3_rgb_image *in, int out_height, int out_width,
                            m3_rgb_image *out) {
  *out = (m3_rgb_image){0};
  if (out_height <= 0 || out_width <= 0)
    return m3_fail(M3_ERR_ARG, "resize: target %dx%d", out_width, out_height);
  const size_t out_bytes = (size_t)out_width * out_height * 3;
  out->rgb = malloc(out_bytes);
  if (!out->rgb) return m3_fail(M3_ERR_NOMEM, "resize: %dx%d image", out_width, out_height);
  out->width = out_width;
  out->height = out_height;
  const int need_h = out_width != in->width, need_v = out_height != in->height;
  if (!need_h && !need_v) {
    memcpy(out->rgb, in->rgb, out_bytes);
    return M3_OK;
  }
  axis_weights ax = {0}, ay = {0};
  uint8_t *mid = NULL;
  m3_status st = M3_OK;
  if (need_h && (st = axis_weights_make(in->width, out_width, &ax)) != M3_OK) goto done;
  if (need_v && (st = axis_weights_make(in->height, out_height, &ay)) != M3_OK) goto done;
  const uint8_t *rows = in->rgb;
  if (need_h) {
    uint8_t *dst = need_v ? (mid = malloc((size_t)out_width * in->height * 3)) : out->rgb;
    if (!dst) {
      st = m3_fail(M3_ERR_NOMEM, "resize: %dx%d intermediate", out_width, in->height);
      goto done;
    }
    pass_horizontal(in->rgb, in->height, in->width, &ax, out_width, dst);
    rows = dst;
  }
  if (need_v) pass_vertical(rows, out_width, &ay, out_height, out->rgb);
done:
  axis_weights_free(&ax);
  axis_weights_free(&ay);
  free(mid);
  if (st != M3_OK) m3_rgb_image_free(out);
  return st;
}
