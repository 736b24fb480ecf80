/* media.h: images and videos turned into the vision tower's input (m3_vision_chat_spec.md §2-§3).
 *
 *   decode (JPEG, PNG, WebP, GIF first frame; video through libavformat)
 *   -> 8-bit RGB, EXIF orientation applied, alpha composited onto white
 *   -> smart_resize target (Python rounding) -> antialiased bicubic resize in uint8
 *   -> CLIP normalisation -> patches of [C, tp, p, p] in merge-window order.
 *
 * Nothing here knows about tensors or backends: the output is float32 host memory. */
#ifndef M3_MEDIA_MEDIA_H
#define M3_MEDIA_MEDIA_H

#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

/* 8-bit RGB, rows top to bottom, pixels RGBRGB... */
typedef struct {
  int width, height;
  uint8_t *rgb; /* [height, width, 3] */
} m3_rgb_image;

void m3_rgb_image_free(m3_rgb_image *img);

/* Decodes an image file held in memory (format from its magic bytes), applies its EXIF orientation
 * (JPEG APP1) and composites any alpha onto white as PIL's paste does (what vLLM does for served
 * requests). `label` names the source in errors (a path, "image 2"). Undecodable bytes (or
 * another format) are M3_ERR_FORMAT, CMYK JPEGs M3_ERR_UNSUPPORTED. */
m3_status m3_image_decode(const void *data, size_t len, const char *label, m3_rgb_image *out);

/* Reads a whole file (for the CLI). *data is malloc'd. */
m3_status m3_read_file(const char *path, size_t max_bytes, uint8_t **data, size_t *len);

/* How images and video frames are cut (config vision_config + processor defaults). */
typedef struct {
  int patch_size;          /* 14 */
  int temporal_patch_size; /* 2 */
  int merge_size;          /* 2 */
  int64_t min_pixels;      /* 3136 */
  int64_t max_pixels;      /* 451584 images, 602112 video frames */
} m3_media_geometry;

/* The image defaults of m3_vision_chat_spec.md §1.3 for the given patch sizes. */
m3_media_geometry m3_media_image_geometry(int patch_size, int temporal_patch_size, int merge_size);
m3_media_geometry m3_media_video_geometry(int patch_size, int temporal_patch_size, int merge_size);

/* smart_resize (spec §2.2 mode A): the target height and width, multiples of
 * factor = patch_size * merge_size. Aspect ratio over 200 is M3_ERR_ARG naming `label`. */
m3_status m3_smart_resize(int height, int width, const m3_media_geometry *g, const char *label,
                          int *out_height, int *out_width);

/* Antialiased bicubic resize (a = -0.5) in uint8, separable, horizontal pass then vertical, with
 * the fixed-point weights and rounding of torchvision's uint8 kernel (spec §2.3). */
m3_status m3_resize_bicubic(const m3_rgb_image *in, int out_height, int out_width,
                            m3_rgb_image *out);

/* The tower's input for one image or video. */
typedef struct {
  float *pixels;               /* [rows, row_len], row_len = 3 * tp * p * p */
  int rows, row_len;
  int grid_t, grid_h, grid_w;  /* in patches; rows = grid_t * grid_h * grid_w */
  int is_video;
  double *timestamps;          /* video: [grid_t] seconds of each temporal patch's first frame */
} m3_patches;

void m3_patches_free(m3_patches *p);

/* Merged tokens the item becomes: grid_t * grid_h * grid_w / merge^2. */
int m3_patches_tokens(const m3_patches *p, int merge_size);

/* Normalises frames (all of one size, multiples of patch_size * merge_size) with the CLIP mean
 * and std and cuts them into patches (spec §2.5): an odd frame count repeats the last frame. */
m3_status m3_patchify(const m3_rgb_image *frames, int n_frames, const m3_media_geometry *g,
                      m3_patches *out);

/* decode -> smart_resize -> resize -> patchify for one image file in memory. */
m3_status m3_image_preprocess(const void *data, size_t len, const char *label,
                              const m3_media_geometry *g, m3_patches *out);

/* Frame sampling of the reference video backend (spec §3.1, vLLM): frames at `fps` per second
 * of the stream, at least one. keep [cap]; returns how many were kept (<= cap). */
int m3_video_sample_indices(int total_frames, double video_fps, double fps, int *keep, int cap);

/* Decodes a video file, samples frames at `fps` (at most max_frames), resizes them to one
 * smart_resize size and cuts them into patches with the timestamp of each temporal patch. */
m3_status m3_video_preprocess(const char *path, double fps, int max_frames,
                              const m3_media_geometry *g, m3_patches *out);

#endif
