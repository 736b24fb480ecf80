/* media.c: images in chat requests (srv.h). Parsing checks each image part (a base64 data: URL
 * or an Anthropic base64 source, or an http(s) URL fetched under --allow-remote-media; a known
 * image type, decodable, within the pixel and count limits) and keeps its bytes; generation
 * turns them into the engine's m3_media and expands the prompt's placeholders. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "media/media.h"
#include "server/fetch.h"
#include "server/srv.h"

/* The 6-bit value of a base64 character (RFC 4648 standard alphabet), or -1. */
static int b64_value(unsigned char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

int srv_base64_decode(const char *text, size_t len, uint8_t **out, size_t *out_len) {
  *out = NULL;
  *out_len = 0;
  /* Strict: padded to a multiple of 4, '=' only as the last one or two characters, and the
   * unused bits of the last group zero, so each byte string has exactly one encoding. */
  if (len == 0 || len % 4 != 0) return -1;
  const size_t pad = text[len - 1] == '=' ? (text[len - 2] == '=' ? 2 : 1) : 0;
  uint8_t *bytes = malloc(len / 4 * 3);
  if (!bytes) return -1;
  size_t n = 0;
  for (size_t i = 0; i < len; i += 4) {
    const bool last = i + 4 == len;
    int v[4];
    for (int k = 0; k < 4; k++) {
      const bool padding = last && k >= 4 - (int)pad;
      v[k] = padding ? 0 : b64_value((unsigned char)text[i + k]);
      if (v[k] < 0) {
        free(bytes);
        return -1;
      }
    }
    const uint32_t group = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 |
                           (uint32_t)v[3];
    const int keep = last ? 3 - (int)pad : 3;
    if (last && (group & ((1u << (8 * (3 - keep))) - 1)) != 0) {
      free(bytes);
      return -1;
    }
    for (int k = 0; k < keep; k++) bytes[n++] = (uint8_t)(group >> (16 - 8 * k));
  }
  *out = bytes;
  *out_len = n;
  return 0;
}

static bool known_image_type(const char *type, size_t len) {
  static const char *const types[] = {"image/jpeg", "image/png", "image/webp", "image/gif"};
  for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
    if (strlen(types[i]) == len && strncasecmp(type, types[i], len) == 0) return true;
  return false;
}

/* The 400 of one content part: "<label>: <why>", param = the label (copied into e, so the error
 * outlives the request). */
__attribute__((format(printf, 3, 4)))
static int part_fail(srv_error *e, const char *label, const char *fmt, ...) {
  char why[400];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, sizeof why, fmt, ap);
  va_end(ap);
  snprintf(e->where, sizeof e->where, "%s", label);
  return srv_fail(e, 400, e->where, "%s: %s", label, why);
}

/* Checked before any decoding or download, which the refused image would waste. */
static int check_room(const srv_ctx *ctx, const srv_request *r, const char *label, srv_error *e) {
  if (r->n_media < ctx->limits.max_media) return 0;
  snprintf(e->where, sizeof e->where, "messages");
  return srv_fail(e, 400, e->where, "%s: more than %d images in one request (--max-media-per-"
                  "request)", label, ctx->limits.max_media);
}

/* Appends an image's encoded bytes (taking them, also on failure) once they decode within the
 * pixel limit; `source` prefixes the cause of a failure ("" or "fetched from <url>: "). */
static int add_bytes(const srv_ctx *ctx, srv_request *r, uint8_t *bytes, size_t len,
                     const char *source, const char *label, srv_error *e) {
  m3_rgb_image img = {0};
  int rc = 0;
  if (m3_image_decode(bytes, len, "the image", &img) != M3_OK) {
    rc = part_fail(e, label, "%sundecodable image data: %s", source, m3_last_error());
  } else if ((int64_t)img.width * img.height > ctx->limits.max_image_pixels) {
    rc = part_fail(e, label, "%sthe image has %dx%d pixels; this server allows at most %lld "
                   "(--max-image-pixels)", source, img.width, img.height,
                   (long long)ctx->limits.max_image_pixels);
  }
  m3_rgb_image_free(&img);
  srv_media_item *grown = rc ? NULL : realloc(r->media, sizeof *grown * (size_t)(r->n_media + 1));
  if (rc == 0 && !grown) rc = srv_fail(e, 500, NULL, "out of memory");
  if (rc) {
    free(bytes);
    return -1;
  }
  r->media = grown;
  r->media[r->n_media] = (srv_media_item){.bytes = bytes, .len = len};
  snprintf(r->media[r->n_media].label, sizeof r->media[0].label, "%s", label);
  r->n_media++;
  return 0;
}

int srv_media_add(const srv_ctx *ctx, srv_request *r, const char *media_type, size_t type_len,
                  const char *base64, const char *label, srv_error *e) {
  if (check_room(ctx, r, label, e)) return -1;
  if (!known_image_type(media_type, type_len)) {
    return part_fail(e, label, "media type '%.*s' is not accepted; expected image/jpeg, "
                     "image/png, image/webp or image/gif", (int)(type_len < 48 ? type_len : 48),
                     media_type);
  }
  uint8_t *bytes;
  size_t len;
  if (srv_base64_decode(base64, strlen(base64), &bytes, &len) != 0)
    return part_fail(e, label, "the image data is not valid base64");
  return add_bytes(ctx, r, bytes, len, "", label, e);
}

/* An http(s) URL: downloaded (fetch.h) when the server allows it, then checked as inline bytes
 * are. A request's images share fetch_max_bytes (--max-body), as inline ones share the body, so
 * 16 URLs cannot make the server hold 16 times that. Errors name the URL, cut to fit. */
static int add_remote(const srv_ctx *ctx, srv_request *r, const char *url, const char *label,
                      srv_error *e) {
  if (ctx->limits.fetch_timeout_ms <= 0)
    return part_fail(e, label, "remote image URLs are fetched only when the server runs with "
                     "--allow-remote-media; send the image inline as a data: URL "
                     "(data:image/png;base64,...)");
  if (check_room(ctx, r, label, e)) return -1;
  size_t held = 0;
  for (int i = 0; i < r->n_media; i++) held += r->media[i].len;
  const size_t max = ctx->limits.fetch_max_bytes;
  /* At most 120 bytes of the URL, cut before a UTF-8 continuation byte so the JSON stays valid. */
  int cut = (int)strnlen(url, 120);
  while (cut > 0 && url[cut] != 0 && ((unsigned char)url[cut] & 0xC0) == 0x80) cut--;
  char shown[128];
  snprintf(shown, sizeof shown, "%.*s%s", cut, url, url[cut] ? "..." : "");
  char source[160];
  snprintf(source, sizeof source, "fetched from %s: ", shown);
  uint8_t *bytes;
  size_t len;
  char why[200];
  const int status = srv_fetch(url, held < max ? max - held : 0, ctx->limits.fetch_timeout_ms,
                               &bytes, &len, why, sizeof why);
  if (status == 0) return add_bytes(ctx, r, bytes, len, source, label, e);
  snprintf(e->where, sizeof e->where, "%s", label);
  return srv_fail(e, status, e->where, "%s: cannot fetch %s: %s", label, shown, why);
}

int srv_media_add_url(const srv_ctx *ctx, srv_request *r, const char *url, const char *label,
                      srv_error *e) {
  if (strncasecmp(url, "http://", 7) == 0 || strncasecmp(url, "https://", 8) == 0)
    return add_remote(ctx, r, url, label, e);
  /* data:<type>[;param]*;base64,<data> (RFC 2397); only base64 carries binary images. */
  const char *comma = strncasecmp(url, "data:", 5) == 0 ? strchr(url, ',') : NULL;
  if (!comma)
    return part_fail(e, label, "expected a data: URL (data:image/png;base64,...)");
  const char *type = url + 5;
  const size_t type_len = strcspn(type, ";,");
  if (comma - url < 12 || strncasecmp(comma - 7, ";base64", 7) != 0)
    return part_fail(e, label, "the data: URL must be base64 (';base64,')");
  return srv_media_add(ctx, r, type, type_len, comma + 1, label, e);
}

/* OpenAI content parts: image_url with a data: URL (the url string or {"url": ...}). Video and
 * bare image parts carry nothing an API client can send here. */
static int collect_part(const srv_ctx *ctx, srv_request *r, const cJSON *part, const char *label,
                        srv_error *e) {
  const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
  const char *t = cJSON_IsString(type) ? type->valuestring : "";
  if (strcmp(t, "video") == 0 || strcmp(t, "video_url") == 0)
    return part_fail(e, label, "video input is not accepted over the API (use m3 run --video)");
  if (strcmp(t, "image") == 0)
    return part_fail(e, label, "send images as {\"type\": \"image_url\", \"image_url\": "
                     "{\"url\": \"data:image/png;base64,...\"}}");
  if (strcmp(t, "image_url") != 0) return 0;
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(part, "image_url");
  if (cJSON_IsObject(v)) v = cJSON_GetObjectItemCaseSensitive(v, "url");
  if (!cJSON_IsString(v))
    return part_fail(e, label, "image_url needs a string 'url'");
  return srv_media_add_url(ctx, r, v->valuestring, label, e);
}

int srv_media_collect(const srv_ctx *ctx, srv_request *r, srv_error *e) {
  int i = 0;
  const cJSON *m;
  cJSON_ArrayForEach(m, r->messages) {
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
    int k = 0;
    const cJSON *part;
    if (cJSON_IsArray(content)) cJSON_ArrayForEach(part, content) {
        char label[64];
        snprintf(label, sizeof label, "messages[%d].content[%d]", i, k++);
        if (collect_part(ctx, r, part, label, e)) return -1;
      }
    i++;
  }
  return 0;
}

int srv_media_load(srv_ctx *ctx, srv_request *r, srv_error *e) {
  if (r->n_media == 0 || r->loaded) return 0;
  r->loaded = calloc((size_t)r->n_media, sizeof *r->loaded);
  if (!r->loaded) return srv_fail(e, 500, NULL, "out of memory");
  for (int i = 0; i < r->n_media; i++) {
    const srv_media_item *it = &r->media[i];
    if (m3_media_image(ctx->engine, it->bytes, it->len, "the image", &r->loaded[i]) != M3_OK)
      return part_fail(e, it->label, "%s", m3_last_error());
  }
  return 0;
}

void srv_media_free(srv_request *r) {
  for (int i = 0; r->loaded && i < r->n_media; i++) m3_media_free(r->loaded[i]);
  for (int i = 0; i < r->n_media; i++) free(r->media[i].bytes);
  free(r->loaded);
  free(r->media);
}
