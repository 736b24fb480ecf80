/* http(s) image URLs without an engine: refused with a 400 that names --allow-remote-media when
 * fetching is off (OpenAI image_url and Anthropic url sources, nothing contacted); with it on,
 * the image count limit is checked before any download, and a URL nobody answers gets a 400
 * naming the URL (long ones cut on a UTF-8 boundary). The fetch paths that need an image server are in tests/js/remote_media.mjs. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "server/srv.h"

/* Port 1 on loopback: nothing listens there, so a download fails at once ("connection
 * refused"), which the messages below tell apart from a refusal before any download. */
#define DEAD_URL "http://127.0.0.1:1/cat.png"

static srv_ctx test_ctx(int fetch_timeout_ms) {
  srv_ctx ctx = {.model_name = "m3-test",
                 .limits = {.max_tokens = 100, .max_n = 4, .max_image_pixels = 1 << 20,
                            .max_media = 2, .fetch_timeout_ms = fetch_timeout_ms,
                            .fetch_max_bytes = 1 << 16}};
  ctx.info.vocab_size = 1000;
  ctx.info.max_context = 4096;
  return ctx;
}

/* Parses `json` (an OpenAI chat body, or Anthropic when `anthropic`), which must fail with 400
 * naming `param` and containing every word of `words` (NULL-terminated). */
static void expect_400(const srv_ctx *ctx, bool anthropic, const char *json, const char *param,
                       const char *const *words) {
  srv_request r = {0};
  srv_error e = {0};
  cJSON *body = cJSON_Parse(json);
  CHECK(body != NULL);
  const int rc = anthropic ? srv_anthropic_parse(ctx, body, &r, &e)
                           : srv_openai_parse(ctx, SRV_EP_CHAT, body, &r, &e);
  CHECK_EQ_INT(rc, -1);
  CHECK_EQ_INT(e.status, 400);
  CHECK_EQ_INT(r.n_media, 0);
  CHECK_STR(e.param ? e.param : "(none)", param);
  for (const char *const *w = words; *w; w++) {
    if (!strstr(e.message, *w)) fprintf(stderr, "message without '%s': %s\n", *w, e.message);
    CHECK(strstr(e.message, *w) != NULL);
  }
  srv_request_free(&r);
}

static const char openai_one[] =
    "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"look\"},"
    "{\"type\":\"image_url\",\"image_url\":{\"url\":\"" DEAD_URL "\"}}]}]}";
static const char anthropic_one[] =
    "{\"max_tokens\":5,\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image\","
    "\"source\":{\"type\":\"url\",\"url\":\"" DEAD_URL "\"}}]}]}";

static void test_off(void) {
  const srv_ctx ctx = test_ctx(0);
  const char *const words[] = {"--allow-remote-media", "data:image/png;base64", NULL};
  expect_400(&ctx, false, openai_one, "messages[0].content[1]", words);
  expect_400(&ctx, true, anthropic_one, "messages[0].content[0]", words);
}

static void test_on(void) {
  srv_ctx ctx = test_ctx(5000);
  /* The download is attempted, fails, and the 400 names the URL and the cause. */
  const char *const dead[] = {"cannot fetch " DEAD_URL ": ", "onnect", NULL};
  expect_400(&ctx, false, openai_one, "messages[0].content[1]", dead);
  expect_400(&ctx, true, anthropic_one, "messages[0].content[0]", dead);
  /* A long URL is cut to 120 bytes, but never inside a UTF-8 sequence: here the 'é' that
   * starts at byte 119 goes whole. */
  char long_url[256], json[512];
  snprintf(long_url, sizeof long_url, "%s/%0100d\xc3\xa9/z.png", "http://127.0.0.1:1", 0);
  CHECK_EQ_INT((int)strlen(long_url), 127);
  snprintf(json, sizeof json, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
           "\"image_url\",\"image_url\":{\"url\":\"%s\"}}]}]}", long_url);
  char shown[160];
  snprintf(shown, sizeof shown, "cannot fetch %.119s...: ", long_url);
  const char *const cut[] = {shown, NULL};
  expect_400(&ctx, false, json, "messages[0].content[0]", cut);
  /* No room for another image: refused before the download (else the cause would be the
   * refused connection). */
  ctx.limits.max_media = 0;
  const char *const full[] = {"more than 0 images", NULL};
  expect_400(&ctx, false, openai_one, "messages", full);
}

int main(void) {
  setenv("no_proxy", "*", 1); /* libcurl would send DEAD_URL to a proxy from the environment */
  test_off();
  test_on();
  return check_summary();
}
