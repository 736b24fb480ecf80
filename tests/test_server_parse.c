/* Request parsing of both APIs without an engine: field types and ranges, limits, the model
 * check, tool_choice, thinking modes, the Anthropic conversation rewritten into OpenAI form, and
 * each API's error shape. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "server/srv.h"

static srv_ctx test_ctx(void) {
  srv_ctx ctx = {.model_name = "m3-test",
                 .limits = {.max_tokens = 100, .max_n = 4, .test_hooks = false,
                            .max_image_pixels = 1 << 20, .max_media = 4}};
  ctx.info.vocab_size = 1000;
  ctx.info.max_context = 4096;
  return ctx;
}

/* Parses `json` for `ep`; returns the parser's result, leaves the request in *r. */
static int parse(srv_endpoint ep, const char *json, srv_request *r, srv_error *e) {
  srv_ctx ctx = test_ctx();
  *r = (srv_request){0};
  *e = (srv_error){0};
  cJSON *body = cJSON_Parse(json);
  return ep == SRV_EP_MESSAGES ? srv_anthropic_parse(&ctx, body, r, e)
                               : srv_openai_parse(&ctx, ep, body, r, e);
}

/* The request must fail with `status` naming `param`. */
static void expect_error(srv_endpoint ep, const char *json, int status, const char *param) {
  srv_request r;
  srv_error e;
  CHECK_EQ_INT(parse(ep, json, &r, &e), -1);
  CHECK_EQ_INT(e.status, status);
  CHECK_STR(e.param ? e.param : "(none)", param);
  CHECK(e.message[0] != 0);
  srv_request_free(&r);
}

#define MSG "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]"

static void test_openai_fields(void) {
  srv_request r;
  srv_error e;
  CHECK_EQ_INT(parse(SRV_EP_CHAT,
                     "{\"model\":\"m3-test\"," MSG ",\"temperature\":0.5,\"top_p\":0.9,\"top_k\":-1,"
                     "\"seed\":42,\"n\":2,\"max_completion_tokens\":7,\"stop\":\"END\","
                     "\"logprobs\":true,\"top_logprobs\":3,\"stream\":true,"
                     "\"stream_options\":{\"include_usage\":true},\"logit_bias\":{\"5\":-100},"
                     "\"chat_template_kwargs\":{\"thinking_mode\":\"enabled\"}}",
                     &r, &e),
               0);
  CHECK_NEAR(r.params.temperature, 0.5, 1e-6);
  CHECK_NEAR(r.params.top_p, 0.9, 1e-6);
  CHECK_EQ_INT(r.params.top_k, 0);
  CHECK_EQ_INT((int)r.params.seed, 42);
  CHECK_EQ_INT(r.params.has_seed, 1);
  CHECK_EQ_INT(r.params.n, 2);
  CHECK_EQ_INT(r.params.max_tokens, 7);
  CHECK_EQ_INT(r.params.n_stop, 1);
  CHECK_STR(r.params.stop[0], "END");
  CHECK_EQ_INT(r.params.top_logprobs, 3);
  CHECK_EQ_INT(r.params.n_logit_bias, 1);
  CHECK_EQ_INT(r.params.logit_bias_ids[0], 5);
  CHECK(r.stream && r.include_usage);
  CHECK_EQ_INT(r.chat.thinking, M3_THINKING_ENABLED);
  srv_request_free(&r);
  /* Defaults: temperature 1 as in both APIs. */
  CHECK_EQ_INT(parse(SRV_EP_CHAT, "{" MSG "}", &r, &e), 0);
  CHECK_NEAR(r.params.temperature, 1.0, 1e-6);
  CHECK_EQ_INT(r.chat.thinking, M3_THINKING_ADAPTIVE);
  srv_request_free(&r);
  CHECK_EQ_INT(parse(SRV_EP_CHAT, "{" MSG ",\"thinking\":{\"type\":\"disabled\"}}", &r, &e), 0);
  CHECK_EQ_INT(r.chat.thinking, M3_THINKING_DISABLED);
  srv_request_free(&r);
  CHECK_EQ_INT(parse(SRV_EP_COMPLETIONS, "{\"prompt\":[[1]]}", &r, &e), -1);
  srv_request_free(&r);
  CHECK_EQ_INT(parse(SRV_EP_COMPLETIONS, "{\"prompt\":[\"one\"],\"logprobs\":2}", &r, &e), 0);
  CHECK(cJSON_IsString(r.prompt));
  CHECK_EQ_INT(r.params.top_logprobs, 2);
  srv_request_free(&r);
}

static void test_openai_errors(void) {
  expect_error(SRV_EP_CHAT, "{" MSG ",\"temperature\":\"hot\"}", 400, "temperature");
  expect_error(SRV_EP_CHAT, "{" MSG ",\"temperature\":3}", 400, "temperature");
  expect_error(SRV_EP_CHAT, "{" MSG ",\"model\":\"gpt-4\"}", 404, "model");
  expect_error(SRV_EP_CHAT, "{" MSG ",\"max_tokens\":101}", 400, "max_tokens");
  expect_error(SRV_EP_CHAT, "{" MSG ",\"max_tokens\":1.5}", 400, "max_tokens");
  expect_error(SRV_EP_CHAT, "{" MSG ",\"n\":5}", 400, "n");
  expect_error(SRV_EP_CHAT, "{" MSG ",\"stream\":1}", 400, "stream");
  expect_error(SRV_EP_CHAT, "{" MSG ",\"stop\":[1]}", 400, "stop");
  expect_error(SRV_EP_CHAT, "{" MSG ",\"logit_bias\":{\"1000\":1}}", 400, "logit_bias");
  expect_error(SRV_EP_CHAT, "{" MSG ",\"tool_choice\":\"required\"}", 400, "tool_choice");
  expect_error(SRV_EP_CHAT, "{" MSG ",\"tools\":[{\"type\":\"function\"}]}", 400, "tools");
  expect_error(SRV_EP_CHAT,
               "{" MSG ",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"a\"}}],"
               "\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"b\"}}}",
               400, "tool_choice");
  expect_error(SRV_EP_CHAT, "{" MSG ",\"chat_template_kwargs\":{\"thinking_mode\":\"maybe\"}}", 400,
               "chat_template_kwargs");
  expect_error(SRV_EP_CHAT, "{" MSG ",\"m3_test_forced_text\":\"x\"}", 400, "m3_test_forced_text");
  expect_error(SRV_EP_CHAT, "{\"messages\":[]}", 400, "messages");
  expect_error(SRV_EP_COMPLETIONS, "{\"prompt\":[1,2,1000]}", 400, "prompt");
  /* Ids far outside int32 were once cast before the range check, undefined behaviour that UBSan
   * reports (found by tests/fuzz/fuzz_request). */
  expect_error(SRV_EP_COMPLETIONS, "{\"prompt\":[-28888888888888888888888888888]}", 400, "prompt");
  expect_error(SRV_EP_COMPLETIONS, "{\"prompt\":[1e300]}", 400, "prompt");
  expect_error(SRV_EP_COMPLETIONS, "{\"prompt\":\"x\",\"echo\":true}", 400, "echo");
}

static void test_anthropic_conversion(void) {
  srv_request r;
  srv_error e;
  CHECK_EQ_INT(
      parse(SRV_EP_MESSAGES,
            "{\"model\":\"m3-test\",\"max_tokens\":10,\"system\":[{\"type\":\"text\",\"text\":\"Be brief.\"}],"
            "\"stop_sequences\":[\"X\"],\"thinking\":{\"type\":\"enabled\",\"budget_tokens\":1024},"
            "\"tools\":[{\"name\":\"w\",\"description\":\"d\",\"input_schema\":{\"type\":\"object\"}}],"
            "\"tool_choice\":{\"type\":\"tool\",\"name\":\"w\"},"
            "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},"
            "{\"role\":\"assistant\",\"content\":[{\"type\":\"thinking\",\"thinking\":\"t\",\"signature\":\"\"},"
            "{\"type\":\"text\",\"text\":\"ok\"},{\"type\":\"tool_use\",\"id\":\"u1\",\"name\":\"w\",\"input\":{\"a\":1}}]},"
            "{\"role\":\"user\",\"content\":[{\"type\":\"tool_result\",\"tool_use_id\":\"u1\",\"content\":"
            "[{\"type\":\"text\",\"text\":\"r\"}]},{\"type\":\"text\",\"text\":\"more\"}]}]}",
            &r, &e),
      0);
  char *messages = cJSON_PrintUnformatted(r.messages);
  CHECK_STR(messages,
            "[{\"role\":\"system\",\"content\":\"Be brief.\"},{\"role\":\"user\",\"content\":\"hi\"},"
            "{\"role\":\"assistant\",\"content\":\"ok\",\"reasoning_content\":\"t\",\"tool_calls\":"
            "[{\"id\":\"u1\",\"type\":\"function\",\"function\":{\"name\":\"w\",\"arguments\":\"{\\\"a\\\":1}\"}}]},"
            "{\"role\":\"tool\",\"tool_call_id\":\"u1\",\"content\":\"r\"},{\"role\":\"user\",\"content\":\"more\"}]");
  free(messages);
  char *tools = cJSON_PrintUnformatted(r.chat.tools);
  CHECK_STR(tools, "[{\"type\":\"function\",\"function\":{\"name\":\"w\",\"description\":\"d\","
                   "\"parameters\":{\"type\":\"object\"}}}]");
  free(tools);
  CHECK_EQ_INT(r.chat.tool_choice, SRV_TOOLS_NAMED);
  CHECK_STR(r.chat.tool_name, "w");
  CHECK_EQ_INT(r.chat.thinking, M3_THINKING_ENABLED);
  CHECK_EQ_INT(r.params.max_tokens, 10);
  CHECK_STR(r.params.stop[0], "X");
  srv_request_free(&r);
  expect_error(SRV_EP_MESSAGES, "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 400, "max_tokens");
  expect_error(SRV_EP_MESSAGES, "{\"max_tokens\":5,\"messages\":[{\"role\":\"system\",\"content\":\"x\"}]}", 400, "messages");
  expect_error(SRV_EP_MESSAGES,
               "{\"max_tokens\":5,\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image\"}]}]}",
               400, "messages[0].content[0]");
  expect_error(SRV_EP_MESSAGES, "{\"max_tokens\":5,\"tool_choice\":{\"type\":\"any\"},"
               "\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", 400, "tool_choice");
}

static void test_error_shapes(void) {
  srv_error e;
  srv_fail(&e, 401, NULL, "no key");
  cJSON *o = srv_openai_error(&e), *a = srv_anthropic_error(&e);
  char *os = cJSON_PrintUnformatted(o), *as = cJSON_PrintUnformatted(a);
  CHECK_STR(os, "{\"error\":{\"message\":\"no key\",\"type\":\"authentication_error\",\"param\":null,\"code\":null}}");
  CHECK_STR(as, "{\"type\":\"error\",\"error\":{\"type\":\"authentication_error\",\"message\":\"no key\"}}");
  free(os), free(as), cJSON_Delete(o), cJSON_Delete(a);
  static const struct { int status; const char *openai, *anthropic; } table[] = {
      {400, "invalid_request_error", "invalid_request_error"}, {404, "invalid_request_error", "not_found_error"},
      {413, "invalid_request_error", "request_too_large"},     {429, "rate_limit_error", "rate_limit_error"},
      {500, "server_error", "api_error"},                      {503, "server_error", "overloaded_error"}};
  for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
    srv_fail(&e, table[i].status, "p", "m");
    o = srv_openai_error(&e);
    a = srv_anthropic_error(&e);
    CHECK_STR(cJSON_GetObjectItem(cJSON_GetObjectItem(o, "error"), "type")->valuestring, table[i].openai);
    CHECK_STR(cJSON_GetObjectItem(cJSON_GetObjectItem(o, "error"), "param")->valuestring, "p");
    CHECK_STR(cJSON_GetObjectItem(cJSON_GetObjectItem(a, "error"), "type")->valuestring, table[i].anthropic);
    cJSON_Delete(o);
    cJSON_Delete(a);
  }
}

int main(void) {
  test_openai_fields();
  test_openai_errors();
  test_anthropic_conversion();
  test_error_shapes();
  return check_summary();
}
