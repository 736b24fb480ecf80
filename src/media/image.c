/* image.c: image bytes -> 8-bit RGB (JPEG, PNG, WebP, GIF first frame), EXIF orientation, alpha
 * composited onto white (m3_vision_chat_spec.md §2.1). */
#include <errno.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "media/media.h"

void m3_rgb_image_free(m3_rgb_image *img) {
  if (!img) return;
  free(img->rgb);
  *img = (m3_rgb_image){0};
}

#ifdef M3_MEDIA_CODECS
#include <gif_lib.h>
#include <jpeglib.h>
#include <jerror.h>
#include <png.h>
#include <webp/decode.h>

/* Images past this many pixels are refused before any large allocation (a decompression bomb
 * declares a huge size in a few bytes). 3584^2 is the largest input the spec's size modes accept
 * after resizing; inputs may be larger, but not unboundedly. */
enum { MAX_DECODED_PIXELS = 16384 * 16384 };

static m3_status alloc_image(int width, int height, const char *label, m3_rgb_image *out) {
  if (width <= 0 || height <= 0 || (int64_t)width * height > MAX_DECODED_PIXELS)
    return m3_fail(M3_ERR_LIMIT, "%s: image size %dx%d is empty or over %d pixels", label, width,
                   height, MAX_DECODED_PIXELS);
  out->rgb = malloc((size_t)width * (size_t)height * 3);
  if (!out->rgb) return m3_fail(M3_ERR_NOMEM, "%s: %dx%d image", label, width, height);
  out->width = width;
  out->height = height;
  return M3_OK;
}

/* PIL's paste of an RGBA image onto white through its alpha (vLLM's rgba_to_rgb), with PIL's
 * rounded division by 255: t = bg * (255 - a) + fg * a + 128; out = ((t >> 8) + t) >> 8. */
static uint8_t over_white(int fg, int a) {
  int t = 255 * (255 - a) + fg * a + 128;
  return (uint8_t)(((t >> 8) + t) >> 8);
}

static void composite_rgba(const uint8_t *rgba, size_t n_pixels, uint8_t *rgb) {
  for (size_t i = 0; i < n_pixels; i++) {
    const uint8_t *p = rgba + 4 * i;
    for (int c = 0; c < 3; c++) rgb[3 * i + c] = p[3] == 255 ? p[c] : over_white(p[c], p[3]);
  }
}

/* ---- EXIF orientation (TIFF IFD0 tag 0x0112 inside a JPEG APP1 "Exif\0\0" block) ---- */

static unsigned read_u16(const uint8_t *p, int big) {
  return big ? (unsigned)p[0] << 8 | p[1] : (unsigned)p[1] << 8 | p[0];
}

static uint32_t read_u32(const uint8_t *p, int big) {
  return big ? (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]
             : (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0];
}

/* 1..8, or 1 when the block carries none (or is malformed: orientation is a hint, not data). */
static int exif_orientation(const uint8_t *app1, size_t len) {
  if (len < 14 || memcmp(app1, "Exif\0\0", 6) != 0) return 1;
  const uint8_t *tiff = app1 + 6;
  size_t n = len - 6;
  int big;
  if (memcmp(tiff, "MM", 2) == 0) big = 1;
  else if (memcmp(tiff, "II", 2) == 0) big = 0;
  else return 1;
  if (read_u16(tiff + 2, big) != 42) return 1;
  uint32_t ifd = read_u32(tiff + 4, big);
  if (ifd > n || n - ifd < 2) return 1;
  unsigned count = read_u16(tiff + ifd, big);
  for (unsigned i = 0; i < count; i++) {
    size_t at = (size_t)ifd + 2 + (size_t)i * 12;
    if (at + 12 > n) return 1;
    if (read_u16(tiff + at, big) != 0x0112) continue;
    unsigned type = read_u16(tiff + at + 2, big), value = read_u16(tiff + at + 8, big);
    return type == 3 && value >= 1 && value <= 8 ? (int)value : 1;
  }
  return 1;
}

/* Applies orientation o the way PIL's exif_transpose does (2 mirror, 3 rotate 180, 4 flip,
 * 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90 counter-clockwise). */
static m3_status apply_orientation(m3_rgb_image *img, int o, const char *label) {
  if (o == 1) return M3_OK;
  const int W = img->width, H = img->height, swap = o >= 5;
  m3_rgb_image out = {0};
  m3_status st = alloc_image(swap ? H : W, swap ? W : H, label, &out);
  if (st != M3_OK) return st;
  for (int y = 0; y < out.height; y++)
    for (int x = 0; x < out.width; x++) {
      int sx, sy;
      switch (o) {
        case 2: sx = W - 1 - x, sy = y; break;
        case 3: sx = W - 1 - x, sy = H - 1 - y; break;
        case 4: sx = x, sy = H - 1 - y; break;
        case 5: sx = y, sy = x; break;
        case 6: sx = y, sy = H - 1 - x; break;
        case 7: sx = W - 1 - y, sy = H - 1 - x; break;
        default: sx = W - 1 - y, sy = x; break; /* 8 */
      }
      memcpy(out.rgb + ((size_t)y * out.width + x) * 3, img->rgb + ((size_t)sy * W + sx) * 3, 3);
    }
  m3_rgb_image_free(img);
  *img = out;
  return M3_OK;
}

/* ---- JPEG ---- */

typedef struct {
  struct jpeg_error_mgr base;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
} jpeg_error;

static void jpeg_on_error(j_common_ptr cinfo) {
  jpeg_error *err = (jpeg_error *)cinfo->err;
  cinfo->err->format_message(cinfo, err->message);
  longjmp(err->jump, 1);
}

/* libjpeg reports corrupt data as warnings and carries on; PIL does too, except at a premature
 * end of the data (a truncated file), which it refuses, and so do we. */
static void jpeg_on_warning(j_common_ptr cinfo, int level) {
  jpeg_error *err = (jpeg_error *)cinfo->err;
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) {
    snprintf(err->message, sizeof err->message, "the data ends early (truncated file)");
    longjmp(err->jump, 1);
  }
}

static m3_status decode_jpeg(const uint8_t *data, size_t len, const char *label,
                             m3_rgb_image *out) {
  struct jpeg_decompress_struct cinfo;
  jpeg_error err;
  /* Everything the jump may skip past lives in these volatile locals. */
  m3_rgb_image *volatile img = out;
  volatile m3_status st = M3_OK;
  cinfo.err = jpeg_std_error(&err.base);
  err.base.error_exit = jpeg_on_error;
  err.base.emit_message = jpeg_on_warning;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    m3_rgb_image_free(img);
    return st != M3_OK ? st : m3_fail(M3_ERR_FORMAT, "%s: cannot decode JPEG: %s", label, err.message);
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, (unsigned long)len);
  jpeg_save_markers(&cinfo, JPEG_APP0 + 1, 0xffff);
  jpeg_read_header(&cinfo, TRUE);
  int orientation = 1;
  for (jpeg_saved_marker_ptr m = cinfo.marker_list; m; m = m->next)
    if (m->marker == JPEG_APP0 + 1 && orientation == 1)
      orientation = exif_orientation(m->data, m->data_length);
  if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
    jpeg_destroy_decompress(&cinfo);
    return m3_fail(M3_ERR_UNSUPPORTED, "%s: CMYK JPEG images are not supported", label);
  }
  cinfo.out_color_space = JCS_RGB;
  jpeg_start_decompress(&cinfo);
  if ((st = alloc_image((int)cinfo.output_width, (int)cinfo.output_height, label, img)) != M3_OK)
    longjmp(err.jump, 1);
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row = img->rgb + (size_t)cinfo.output_scanline * img->width * 3;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return apply_orientation(out, orientation, label);
}

/* ---- PNG (libpng's simplified API: any bit depth, palette, grey, tRNS -> 8-bit RGBA) ---- */

static m3_status decode_png(const uint8_t *data, size_t len, const char *label, m3_rgb_image *out) {
  png_image png;
  memset(&png, 0, sizeof png);
  png.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_memory(&png, data, len))
    return m3_fail(M3_ERR_FORMAT, "%s: cannot decode PNG: %s", label, png.message);
  png.format = PNG_FORMAT_RGBA;
  m3_status st = alloc_image((int)png.width, (int)png.height, label, out);
  uint8_t *rgba = st == M3_OK ? malloc((size_t)png.width * png.height * 4) : NULL;
  if (st == M3_OK && !rgba) st = m3_fail(M3_ERR_NOMEM, "%s: PNG pixels", label);
  if (st == M3_OK && !png_image_finish_read(&png, NULL, rgba, 0, NULL))
    st = m3_fail(M3_ERR_FORMAT, "%s: cannot decode PNG: %s", label, png.message);
  if (st == M3_OK) composite_rgba(rgba, (size_t)png.width * png.height, out->rgb);
  png_image_free(&png);
  free(rgba);
  if (st != M3_OK) m3_rgb_image_free(out);
  return st;
}

/* ---- WebP ---- */

static m3_status decode_webp(const uint8_t *data, size_t len, const char *label,
                             m3_rgb_image *out) {
  int w = 0, h = 0;
  if (!WebPGetInfo(data, len, &w, &h))
    return m3_fail(M3_ERR_FORMAT, "%s: cannot decode WebP header", label);
  m3_status st = alloc_image(w, h, label, out);
  if (st != M3_OK) return st;
  uint8_t *rgba = WebPDecodeRGBA(data, len, &w, &h);
  if (!rgba) {
    m3_rgb_image_free(out);
    return m3_fail(M3_ERR_FORMAT, "%s: cannot decode WebP data", label);
  }
  composite_rgba(rgba, (size_t)w * h, out->rgb);
  WebPFree(rgba);
  return M3_OK;
}

/* ---- GIF (first frame on a white canvas; the transparent index is alpha 0) ---- */

typedef struct {
  const uint8_t *data;
  size_t len, at;
} gif_reader;

static int gif_read(GifFileType *gif, GifByteType *buf, int n) {
  gif_reader *r = gif->UserData;
  size_t take = r->len - r->at < (size_t)n ? r->len - r->at : (size_t)n;
  memcpy(buf, r->data + r->at, take);
  r->at += take;
  return (int)take;
}

static m3_status decode_gif(const uint8_t *data, size_t len, const char *label, m3_rgb_image *out) {
  gif_reader reader = {data, len, 0};
  int error = 0;
  GifFileType *gif = DGifOpen(&reader, gif_read, &error);
  if (!gif) return m3_fail(M3_ERR_FORMAT, "%s: cannot decode GIF: %s", label, GifErrorString(error));
  m3_status st = M3_OK;
  /* DGifSlurp reads every frame; the first is all we need but the library offers no cheaper
   * whole-frame path with extensions attached. */
  if (DGifSlurp(gif) != GIF_OK || gif->ImageCount < 1) {
    st = m3_fail(M3_ERR_FORMAT, "%s: cannot decode GIF: %s", label,
                 GifErrorString(gif->Error ? gif->Error : D_GIF_ERR_NO_IMAG_DSCR));
  } else {
    const SavedImage *frame = &gif->SavedImages[0];
    const GifImageDesc *d = &frame->ImageDesc;
    const ColorMapObject *map = d->ColorMap ? d->ColorMap : gif->SColorMap;
    GraphicsControlBlock gcb = {.TransparentColor = NO_TRANSPARENT_COLOR};
    DGifSavedExtensionToGCB(gif, 0, &gcb);
    if (!map) {
      st = m3_fail(M3_ERR_FORMAT, "%s: GIF frame has no colour map", label);
    } else if ((st = alloc_image(gif->SWidth, gif->SHeight, label, out)) == M3_OK) {
      memset(out->rgb, 255, (size_t)out->width * out->height * 3);
      for (int y = 0; y < d->Height; y++)
        for (int x = 0; x < d->Width; x++) {
          int cx = d->Left + x, cy = d->Top + y;
          if (cx < 0 || cy < 0 || cx >= out->width || cy >= out->height) continue;
          int idx = frame->RasterBits[(size_t)y * d->Width + x];
          if (idx == gcb.TransparentColor || idx >= map->ColorCount) continue;
          uint8_t *p = out->rgb + ((size_t)cy * out->width + cx) * 3;
          p[0] = map->Colors[idx].Red;
          p[1] = map->Colors[idx].Green;
          p[2] = map->Colors[idx].Blue;
        }
    }
  }
  DGifCloseFile(gif, &error);
  return st;
}

m3_status m3_image_decode(const void *bytes, size_t len, const char *label, m3_rgb_image *out) {
  const uint8_t *d = bytes;
  *out = (m3_rgb_image){0};
  if (len >= 3 && d[0] == 0xFF && d[1] == 0xD8 && d[2] == 0xFF) return decode_jpeg(d, len, label, out);
  if (len >= 8 && memcmp(d, "\x89PNG\r\n\x1a\n", 8) == 0) return decode_png(d, len, label, out);
  if (len >= 12 && memcmp(d, "RIFF", 4) == 0 && memcmp(d + 8, "WEBP", 4) == 0)
    return decode_webp(d, len, label, out);
  if (len >= 6 && (memcmp(d, "GIF87a", 6) == 0 || memcmp(d, "GIF89a", 6) == 0))
    return decode_gif(d, len, label, out);
  return m3_fail(M3_ERR_FORMAT, "%s: not a JPEG, PNG, WebP or GIF image", label);
}
#else
/* A build configured with -DM3_MEDIA=OFF (no codec libraries, e.g. a GPU machine that only serves
 * text) refuses images by name instead of failing to link. */
m3_status m3_image_decode(const void *bytes, size_t len, const char *label, m3_rgb_image *out) {
  (void)bytes, (void)len;
  *out = (m3_rgb_image){0};
  return m3_fail(M3_ERR_UNSUPPORTED, "%s: this m3 was built without image decoding "
                 "(cmake -DM3_MEDIA=OFF)", label);
}
#endif

m3_status m3_read_file(const char *path, size_t max_bytes, uint8_t **data, size_t *len) {
  *data = NULL;
  *len = 0;
  FILE *f = fopen(path, "rb");
  if (!f) return m3_fail(M3_ERR_IO, "%s: %s", path, strerror(errno));
  m3_status st = M3_OK;
  size_t cap = 1 << 16, n = 0;
  uint8_t *buf = malloc(cap);
  while (buf) {
    if (n == cap) {
      if (cap >= max_bytes) {
        st = m3_fail(M3_ERR_LIMIT, "%s: larger than %zu bytes", path, max_bytes);
        break;
      }
      cap = cap * 2 < max_bytes ? cap * 2 : max_bytes;
      uint8_t *grown = realloc(buf, cap);
      if (!grown) {
        st = m3_fail(M3_ERR_NOMEM, "%s: %zu bytes", path, cap);
        break;
      }
      buf = grown;
    }
    size_t got = fread(buf + n, 1, cap - n, f);
    n += got;
    if (got == 0) {
      if (ferror(f)) st = m3_fail(M3_ERR_IO, "%s: %s", path, strerror(errno));
      break;
    }
  }
  fclose(f);
  if (!buf && st == M3_OK) st = m3_fail(M3_ERR_NOMEM, "%s: file buffer", path);
  if (st != M3_OK) {
    free(buf);
    return st;
  }
  *data = buf;
  *len = n;
  return M3_OK;
}
