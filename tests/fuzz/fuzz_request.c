/* fuzz_request: HTTP request bodies of every endpoint that takes one, through what the server
 * does before the engine is involved: cJSON parse, the endpoint's parser (srv_openai_parse for
 * chat completions, completions and /tokenize, srv_anthropic_parse for messages, images decoded
 * and checked against the limits included; srv_parse_token_ids for /detokenize) and, for a chat
 * that parsed, srv_render_chat of its prompt. None of these needs an engine, so the context has
 * none. A rejected request must carry a 4xx status and a message. Input: byte 0 picks the
 * endpoint (bits 0-1: chat, completions, messages, detokenize), the model's chat format and
 * whether test hooks are on; the rest is the body. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "server/srv.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  static const srv_endpoint endpoints[] = {SRV_EP_CHAT, SRV_EP_COMPLETIONS, SRV_EP_MESSAGES};
  const int detokenize = (data[0] & 3) == 3;
  srv_endpoint ep = endpoints[detokenize ? 0 : data[0] & 3];
  srv_ctx ctx = {
      .info = {.vocab_size = 600, .chat_format = data[0] & 4 ? M3_CHAT_M2 : M3_CHAT_M3},
      .model_name = "m3",
      .limits = {.max_tokens = 4096, .max_n = 4, .test_hooks = data[0] & 8,
                 .max_image_pixels = 64 * 64, .max_media = 4},
  };
  /* As http.c: anything but a JSON object is refused before the endpoint sees it. */
  cJSON *body = cJSON_ParseWithLength((const char *)data + 1, size - 1);
  if (!cJSON_IsObject(body)) {
    cJSON_Delete(body);
    return 0;
  }
  srv_error e = {0};
  if (detokenize) {
    int32_t *ids = NULL;
    int n = 0;
    if (srv_parse_token_ids(body, ctx.info.vocab_size, &ids, &n, &e)) {
      if (e.status < 400 || e.status > 499 || !e.message[0] || ids) abort();
    } else {
      for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= ctx.info.vocab_size) abort();
    }
    free(ids);
    cJSON_Delete(body);
    return 0;
  }
  srv_request req = {0};
  int rc = ep == SRV_EP_MESSAGES ? srv_anthropic_parse(&ctx, body, &req, &e)
                                 : srv_openai_parse(&ctx, ep, body, &req, &e);
  if (rc) {
    if (e.status < 400 || e.status > 499 || !e.message[0]) abort();
  } else if (ep != SRV_EP_COMPLETIONS) {
    char *text = NULL, *prefix = NULL;
    bool in_reasoning;
    if (srv_render_chat(req.messages, &req.chat, &text, &prefix, &in_reasoning) == M3_OK &&
        (!text || (prefix && !strstr(text, prefix))))
      abort();
    free(text);
    free(prefix);
  }
  srv_request_free(&req);
  return 0;
}
