/* Images in chat requests without an engine: the strict base64 decoder against RFC 4648's
 * vectors, OpenAI image_url data: URLs and Anthropic base64 image blocks (bytes kept equal to the
 * fixture file, placeholders in the converted conversation), and the 400s naming the content
 * part: bad base64, a non-image media type, a remote URL, undecodable bytes, the pixel limit, and
 * too many images naming "messages". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "server/srv.h"

static srv_ctx test_ctx(void) {
  srv_ctx ctx = {.model_name = "m3-test",
                 .limits = {.max_tokens = 100, .max_n = 4, .max_image_pixels = 1 << 20,
                            .max_media = 2}};
  ctx.info.vocab_size = 1000;
  ctx.info.max_context = 4096;
  return ctx;
}

static int parse(const srv_ctx *ctx, srv_endpoint ep, const char *json, srv_request *r,
                 srv_error *e) {
  *r = (srv_request){0};
  *e = (srv_error){0};
  cJSON *body = cJSON_Parse(json);
  return ep == SRV_EP_MESSAGES ? srv_anthropic_parse(ctx, body, r, e)
                               : srv_openai_parse(ctx, ep, body, r, e);
}

/* The test's own encoder (RFC 4648 §4, padded), independent of the server's decoder. */
static char *encode(const unsigned char *b, size_t n) {
  static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  char *out = malloc((n + 2) / 3 * 4 + 1), *o = out;
  for (size_t i = 0; i < n; i += 3) {
    unsigned v = (unsigned)b[i] << 16 | (i + 1 < n ? (unsigned)b[i + 1] << 8 : 0) |
                 (i + 2 < n ? b[i + 2] : 0);
    *o++ = abc[v >> 18 & 63];
    *o++ = abc[v >> 12 & 63];
    *o++ = i + 1 < n ? abc[v >> 6 & 63] : '=';
    *o++ = i + 2 < n ? abc[v & 63] : '=';
  }
  *o = 0;
  return out;
}

static unsigned char *read_fixture(const char *name, size_t *len) {
  char path[512];
  snprintf(path, sizeof path, "%s/tests/fixtures/vision/media/%s", M3_SOURCE_DIR, name);
  FILE *f = fopen(path, "rb");
  CHECK(f != NULL);
  unsigned char *buf = malloc(1 << 16);
  *len = f ? fread(buf, 1, 1 << 16, f) : 0;
  if (f) fclose(f);
  return buf;
}

static void test_base64(void) {
  static const char *const good[][2] = {{"Zg==", "f"},         {"Zm8=", "fo"},
                                        {"Zm9v", "foo"},       {"Zm9vYg==", "foob"},
                                        {"Zm9vYmE=", "fooba"}, {"Zm9vYmFy", "foobar"},
                                        {"+/+/", "\xfb\xff\xbf"}};
  for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
    uint8_t *out;
    size_t n;
    CHECK_EQ_INT(srv_base64_decode(good[i][0], strlen(good[i][0]), &out, &n), 0);
    CHECK_EQ_INT((int)n, (int)strlen(good[i][1]));
    CHECK(out && memcmp(out, good[i][1], n) == 0);
    free(out);
  }
  /* Unpadded, bits left over, padding inside, whitespace, URL-safe alphabet, empty. */
  static const char *const bad[] = {"Zg", "Zg=", "Zh==", "Zm9=", "Zg==Zg==", "Zm9v\n",
                                    "Zm=v", "-_-_", "====", ""};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    uint8_t *out = (uint8_t *)"x";
    size_t n = 7;
    CHECK_EQ_INT(srv_base64_decode(bad[i], strlen(bad[i]), &out, &n), -1);
    CHECK(out == NULL && n == 0);
  }
}

/* An OpenAI chat body with one user message: "look" then image_url parts with these URLs. */
static char *openai_body(const char *const *urls, int n) {
  size_t cap = 256;
  for (int i = 0; i < n; i++) cap += strlen(urls[i]) + 64;
  char *b = malloc(cap);
  int at = snprintf(b, cap, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\","
                    "\"text\":\"look\"}");
  for (int i = 0; i < n; i++)
    at += snprintf(b + at, cap - (size_t)at, ",{\"type\":\"image_url\",\"image_url\":{\"url\":"
                   "\"%s\"}}", urls[i]);
  snprintf(b + at, cap - (size_t)at, "]}]}");
  return b;
}

static char *data_url(const char *type, const char *b64) {
  char *u = malloc(strlen(type) + strlen(b64) + 32);
  sprintf(u, "data:%s;base64,%s", type, b64);
  return u;
}

/* The OpenAI request with these URLs fails with 400 naming `param` (and `word` in the message). */
static void expect_openai_error(const srv_ctx *ctx, const char *const *urls, int n,
                                const char *param, const char *word) {
  char *body = openai_body(urls, n);
  srv_request r;
  srv_error e;
  CHECK_EQ_INT(parse(ctx, SRV_EP_CHAT, body, &r, &e), -1);
  CHECK_EQ_INT(e.status, 400);
  CHECK_STR(e.param ? e.param : "(none)", param);
  if (!strstr(e.message, word)) fprintf(stderr, "message without '%s': %s\n", word, e.message);
  CHECK(strstr(e.message, word) != NULL);
  /* The error body carries the param after the request is gone. */
  srv_request_free(&r);
  cJSON *o = srv_openai_error(&e);
  CHECK_STR(cJSON_GetObjectItem(cJSON_GetObjectItem(o, "error"), "param")->valuestring, param);
  cJSON_Delete(o);
  free(body);
}

static void test_openai(void) {
  srv_ctx ctx = test_ctx();
  size_t len;
  unsigned char *png = read_fixture("tiny_23x9.png", &len);
  char *b64 = encode(png, len);
  char *good = data_url("image/png", b64);
  char *jpeg_named = data_url("IMAGE/JPEG", b64); /* the bytes decide the format */
  const char *const urls[] = {good, jpeg_named};
  char *body = openai_body(urls, 2);
  srv_request r;
  srv_error e;
  CHECK_EQ_INT(parse(&ctx, SRV_EP_CHAT, body, &r, &e), 0);
  CHECK_EQ_INT(r.n_media, 2);
  if (r.n_media == 2) {
    CHECK(r.media[0].len == len && memcmp(r.media[0].bytes, png, len) == 0);
    CHECK_STR(r.media[0].label, "messages[0].content[1]");
    CHECK_STR(r.media[1].label, "messages[0].content[2]");
  }
  srv_request_free(&r);
  free(body);

  char *bad_b64 = data_url("image/png", "iVBORw0KGgo=x==");
  char *bmp = data_url("image/bmp", b64);
  char *text = data_url("text/plain", b64);
  char *hello = data_url("image/png", "aGVsbG8gd29ybGQ="); /* "hello world" */
  const char *const cases[][2] = {{bad_b64, "base64"},
                                  {bmp, "image/bmp"},
                                  {text, "text/plain"},
                                  {"data:image/png,plain", "base64"},
                                  {"https://example.com/cat.png", "remote"},
                                  {"HTTP://example.com/cat.png", "remote"},
                                  {"file:///etc/passwd", "data: URL"},
                                  {hello, "undecodable"}};
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const char *const one[] = {good, cases[i][0]};
    expect_openai_error(&ctx, one, 2, "messages[0].content[2]", cases[i][1]);
  }
  /* 23 x 9 = 207 pixels. */
  ctx.limits.max_image_pixels = 206;
  expect_openai_error(&ctx, urls, 1, "messages[0].content[1]", "23x9");
  ctx.limits.max_image_pixels = 207;
  const char *const three[] = {good, good, good};
  expect_openai_error(&ctx, three, 3, "messages", "more than 2");
  CHECK_EQ_INT(parse(&ctx, SRV_EP_CHAT,
                     "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"video_url\","
                     "\"video_url\":{\"url\":\"data:video/mp4;base64,AAAA\"}}]}]}",
                     &r, &e),
               -1);
  CHECK_STR(e.param ? e.param : "(none)", "messages[0].content[0]");
  srv_request_free(&r);
  free(bad_b64);
  free(bmp);
  free(text);
  free(hello);
  free(good);
  free(jpeg_named);
  free(b64);
  free(png);
}

static void test_anthropic(void) {
  srv_ctx ctx = test_ctx();
  size_t len;
  unsigned char *gif = read_fixture("pattern.gif", &len);
  char *b64 = encode(gif, len);
  char *body = malloc(strlen(b64) * 2 + 512);
  sprintf(body, "{\"max_tokens\":5,\"messages\":[{\"role\":\"user\",\"content\":["
          "{\"type\":\"text\",\"text\":\"a\"},{\"type\":\"image\",\"source\":{\"type\":\"base64\","
          "\"media_type\":\"image/gif\",\"data\":\"%s\"}},{\"type\":\"text\",\"text\":\"b\"}]}]}",
          b64);
  srv_request r;
  srv_error e;
  CHECK_EQ_INT(parse(&ctx, SRV_EP_MESSAGES, body, &r, &e), 0);
  CHECK_EQ_INT(r.n_media, 1);
  if (r.n_media == 1) CHECK(r.media[0].len == len && memcmp(r.media[0].bytes, gif, len) == 0);
  /* Rewritten as OpenAI parts: text, image placeholder, text. */
  const cJSON *content = cJSON_GetObjectItem(cJSON_GetArrayItem(r.messages, 0), "content");
  CHECK_EQ_INT(cJSON_GetArraySize(content), 3);
  CHECK_STR(cJSON_GetObjectItem(cJSON_GetArrayItem(content, 0), "text")->valuestring, "a");
  CHECK_STR(cJSON_GetObjectItem(cJSON_GetArrayItem(content, 1), "type")->valuestring, "image");
  CHECK_STR(cJSON_GetObjectItem(cJSON_GetArrayItem(content, 2), "text")->valuestring, "b");
  srv_request_free(&r);

  sprintf(body, "{\"max_tokens\":5,\"messages\":[{\"role\":\"user\",\"content\":["
          "{\"type\":\"text\",\"text\":\"a\"},{\"type\":\"image\",\"source\":{\"type\":\"base64\","
          "\"media_type\":\"application/pdf\",\"data\":\"%s\"}}]}]}", b64);
  CHECK_EQ_INT(parse(&ctx, SRV_EP_MESSAGES, body, &r, &e), -1);
  CHECK_STR(e.param ? e.param : "(none)", "messages[0].content[1]");
  srv_request_free(&r);
  CHECK_EQ_INT(parse(&ctx, SRV_EP_MESSAGES,
                     "{\"max_tokens\":5,\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
                     "\"image\",\"source\":{\"type\":\"url\",\"url\":\"https://x.test/a.png\"}}]}]}",
                     &r, &e),
               -1);
  CHECK_STR(e.param ? e.param : "(none)", "messages[0].content[0]");
  CHECK(strstr(e.message, "remote") != NULL);
  srv_request_free(&r);
  CHECK_EQ_INT(parse(&ctx, SRV_EP_MESSAGES,
                     "{\"max_tokens\":5,\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
                     "\"image\",\"source\":{\"type\":\"base64\",\"media_type\":\"image/png\","
                     "\"data\":\"not base64!\"}}]}]}",
                     &r, &e),
               -1);
  CHECK_STR(e.param ? e.param : "(none)", "messages[0].content[0]");
  srv_request_free(&r);
  free(body);
  free(b64);
  free(gif);
}

int main(void) {
  test_base64();
  test_openai();
  test_anthropic();
  return check_summary();
}
