/* video.c: a video file -> sampled frames -> tower patches (m3_vision_chat_spec.md §3).
 *
 * Frames are decoded in stream order with libavformat/libavcodec, converted to RGB24 with
 * libswscale (an RGB stream converts exactly; YUV streams go through swscale's conversion, which
 * is not byte-identical to the OpenCV decoder vLLM reads frames with), and kept when their index
 * is the next one the reference sampler picks, so only the kept frames stay in memory. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "media/media.h"

/* The index the sampler keeps after keeping `last` (spec §3.1): the first frame at least one
 * interval (less 1e-4 s) after it, and never the same frame twice. */
static int64_t next_index(int64_t last, double video_fps, double fps) {
  const double prev_ts = (double)last / video_fps;
  int64_t target = (int64_t)ceil((prev_ts + 1.0 / fps - 1e-4) * video_fps);
  return target > last + 1 ? target : last + 1;
}

int m3_video_sample_indices(int total_frames, double video_fps, double fps, int *keep, int cap) {
  int n = 0;
  for (int64_t i = 0; i < total_frames && n < cap; i = next_index(i, video_fps, fps)) keep[n++] = (int)i;
  if (n == 0 && cap > 0) keep[n++] = 0;
  return n;
}

#ifdef M3_MEDIA_CODECS
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <libavutil/imgutils.h>
#include <libswscale/swscale.h>

typedef struct {
  AVFormatContext *fmt;
  AVCodecContext *dec;
  struct SwsContext *sws;
  AVPacket *pkt;
  AVFrame *frame;
  int stream;
  double fps;
} decoder;

static void decoder_close(decoder *d) {
  sws_freeContext(d->sws);
  av_frame_free(&d->frame);
  av_packet_free(&d->pkt);
  avcodec_free_context(&d->dec);
  avformat_close_input(&d->fmt);
}

static m3_status av_error(const char *path, const char *what, int err) {
  char msg[AV_ERROR_MAX_STRING_SIZE] = "";
  av_strerror(err, msg, sizeof msg);
  return m3_fail(M3_ERR_FORMAT, "%s: cannot decode video (%s: %s)", path, what, msg);
}

static m3_status decoder_open(const char *path, decoder *d) {
  int err = avformat_open_input(&d->fmt, path, NULL, NULL);
  if (err < 0) return av_error(path, "open", err);
  if ((err = avformat_find_stream_info(d->fmt, NULL)) < 0) return av_error(path, "stream info", err);
  const AVCodec *codec = NULL;
  d->stream = av_find_best_stream(d->fmt, AVMEDIA_TYPE_VIDEO, -1, -1, &codec, 0);
  if (d->stream < 0) return av_error(path, "no video stream", d->stream);
  const AVStream *s = d->fmt->streams[d->stream];
  AVRational rate = s->avg_frame_rate.num > 0 ? s->avg_frame_rate : s->r_frame_rate;
  d->fps = rate.num > 0 && rate.den > 0 ? av_q2d(rate) : 0.0;
  if (!(d->fps > 0 && d->fps < 1e4))
    return m3_fail(M3_ERR_FORMAT, "%s: video stream has no usable frame rate", path);
  if (!(d->dec = avcodec_alloc_context3(codec)) || !(d->pkt = av_packet_alloc()) ||
      !(d->frame = av_frame_alloc()))
    return m3_fail(M3_ERR_NOMEM, "%s: decoder", path);
  if ((err = avcodec_parameters_to_context(d->dec, s->codecpar)) < 0) return av_error(path, "codec", err);
  if ((err = avcodec_open2(d->dec, codec, NULL)) < 0) return av_error(path, "codec open", err);
  return M3_OK;
}

/* Converts the decoded frame to an RGB image of its own size. */
static m3_status frame_to_rgb(decoder *d, const char *path, m3_rgb_image *out) {
  const AVFrame *f = d->frame;
  if (f->width <= 0 || f->height <= 0 || (int64_t)f->width * f->height > (int64_t)1 << 26)
    return m3_fail(M3_ERR_FORMAT, "%s: frame size %dx%d", path, f->width, f->height);
  d->sws = sws_getCachedContext(d->sws, f->width, f->height, f->format, f->width, f->height,
                                AV_PIX_FMT_RGB24, SWS_BICUBIC | SWS_ACCURATE_RND | SWS_FULL_CHR_H_INT,
                                NULL, NULL, NULL);
  if (!d->sws) return m3_fail(M3_ERR_UNSUPPORTED, "%s: pixel format %d", path, f->format);
  out->rgb = malloc((size_t)f->width * f->height * 3);
  if (!out->rgb) return m3_fail(M3_ERR_NOMEM, "%s: frame", path);
  out->width = f->width;
  out->height = f->height;
  uint8_t *dst[4] = {out->rgb, NULL, NULL, NULL};
  int stride[4] = {f->width * 3, 0, 0, 0};
  sws_scale(d->sws, (const uint8_t *const *)f->data, f->linesize, 0, f->height, dst, stride);
  return M3_OK;
}

m3_status m3_video_preprocess(const char *path, double fps, int max_frames,
                              const m3_media_geometry *g, m3_patches *out) {
  *out = (m3_patches){0};
  if (!(fps > 0) || max_frames <= 0)
    return m3_fail(M3_ERR_ARG, "video sampling: fps %g, max_frames %d", fps, max_frames);
  decoder d = {0};
  m3_rgb_image *frames = calloc((size_t)max_frames, sizeof *frames);
  int64_t *indices = calloc((size_t)max_frames, sizeof *indices);
  m3_rgb_image *sized = calloc((size_t)max_frames, sizeof *sized);
  int n = 0;
  m3_status st = frames && indices && sized ? decoder_open(path, &d)
                                             : m3_fail(M3_ERR_NOMEM, "%s: frame list", path);
  int64_t index = 0, want = 0;
  for (int eof = 0; st == M3_OK && !eof && n < max_frames;) {
    int err = av_read_frame(d.fmt, d.pkt);
    if (err == AVERROR_EOF) {
      eof = 1;
      err = avcodec_send_packet(d.dec, NULL); /* drain */
    } else if (err < 0) {
      st = av_error(path, "read", err);
      break;
    } else {
      err = d.pkt->stream_index == d.stream ? avcodec_send_packet(d.dec, d.pkt) : 0;
      av_packet_unref(d.pkt);
    }
    if (err < 0 && err != AVERROR(EAGAIN)) {
      st = av_error(path, "decode", err);
      break;
    }
    while (st == M3_OK && n < max_frames && (err = avcodec_receive_frame(d.dec, d.frame)) >= 0) {
      if (index == want) {
        indices[n] = index;
        st = frame_to_rgb(&d, path, &frames[n]);
        if (st == M3_OK && n > 0 &&
            (frames[n].width != frames[0].width || frames[n].height != frames[0].height))
          st = m3_fail(M3_ERR_FORMAT, "%s: frame %lld is %dx%d, the first %dx%d", path,
                       (long long)index, frames[n].width, frames[n].height, frames[0].width,
                       frames[0].height);
        n++;
        want = next_index(index, d.fps, fps);
      }
      index++;
      av_frame_unref(d.frame);
    }
    if (st == M3_OK && err < 0 && err != AVERROR(EAGAIN) && err != AVERROR_EOF)
      st = av_error(path, "decode", err);
  }
  if (st == M3_OK && n == 0) st = m3_fail(M3_ERR_FORMAT, "%s: no video frames decoded", path);
  int h = 0, w = 0;
  if (st == M3_OK) st = m3_smart_resize(frames[0].height, frames[0].width, g, path, &h, &w);
  for (int i = 0; i < n && st == M3_OK; i++) st = m3_resize_bicubic(&frames[i], h, w, &sized[i]);
  if (st == M3_OK) st = m3_patchify(sized, n, g, out);
  if (st == M3_OK) {
    out->is_video = 1;
    out->timestamps = malloc((size_t)out->grid_t * sizeof *out->timestamps);
    if (!out->timestamps) st = m3_fail(M3_ERR_NOMEM, "%s: timestamps", path);
    /* Each temporal patch is labelled with its first frame's time (spec §3.4). */
    for (int k = 0, f = 0; st == M3_OK && k < out->grid_t; k++, f += g->temporal_patch_size)
      out->timestamps[k] = (double)indices[f < n ? f : n - 1] / d.fps;
  }
  for (int i = 0; frames && i < max_frames; i++) m3_rgb_image_free(&frames[i]);
  for (int i = 0; sized && i < max_frames; i++) m3_rgb_image_free(&sized[i]);
  free(frames);
  free(sized);
  free(indices);
  decoder_close(&d);
  if (st != M3_OK) m3_patches_free(out);
  return st;
}
#else
/* Built with -DM3_MEDIA=OFF: no libav*, so videos are refused by name. */
m3_status m3_video_preprocess(const char *path, double fps, int max_frames,
                              const m3_media_geometry *g, m3_patches *out) {
  (void)fps, (void)max_frames, (void)g;
  *out = (m3_patches){0};
  return m3_fail(M3_ERR_UNSUPPORTED, "%s: this m3 was built without video decoding "
                 "(cmake -DM3_MEDIA=OFF)", path);
}
#endif
