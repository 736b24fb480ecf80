/* test_tok_chat.c: chat rendering against goldens rendered by jinja2 from the checkpoints' own
 * chat templates (tests/fixtures/chat, tools/make_chat_goldens.py). Every case in cases.json is
 * one template rule: thinking modes and generation prompts, root/system/developer mapping,
 * media placeholders, tool definitions, reasoning retention, tool-call XML, tool results, and
 * the M2 format. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "tok/chat.h"
#include "tok/pyjson.h"

static char *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *s = malloc((size_t)n + 1);
  if (s && fread(s, 1, (size_t)n, f) != (size_t)n) {
    free(s);
    s = NULL;
  }
  if (s) s[n] = 0;
  if (len) *len = (size_t)n;
  fclose(f);
  return s;
}

static void check_case(const cJSON *c) {
  const char *name = cJSON_GetObjectItem(c, "name")->valuestring;
  char path[512];
  snprintf(path, sizeof path, "%s/tests/fixtures/chat/%s.txt", M3_SOURCE_DIR, name);
  size_t want_len;
  char *want = read_file(path, &want_len);
  CHECK(want != NULL);
  if (!want) return;

  m3_chat_options opt = {0};
  opt.format = strcmp(cJSON_GetObjectItem(c, "format")->valuestring, "m2") == 0
                   ? M3_CHAT_FORMAT_M2 : M3_CHAT_FORMAT_M3;
  const char *mode = cJSON_GetStringValue(cJSON_GetObjectItem(c, "thinking_mode"));
  opt.thinking = !mode || strcmp(mode, "adaptive") == 0 ? M3_THINKING_ADAPTIVE
                 : strcmp(mode, "enabled") == 0         ? M3_THINKING_ENABLED
                                                        : M3_THINKING_DISABLED;
  const cJSON *agp = cJSON_GetObjectItem(c, "add_generation_prompt");
  opt.add_generation_prompt = !agp || cJSON_IsTrue(agp);
  opt.tools = cJSON_GetObjectItem(c, "tools");

  m3_chat chat;
  CHECK_OK(m3_chat_from_json(cJSON_GetObjectItem(c, "messages"), &chat));
  char *got = NULL;
  size_t got_len = 0;
  m3_status st = m3_chat_render(chat.msgs, chat.n, &opt, &got, &got_len);
  if (strncmp(want, "ERROR: ", 7) == 0) {
    /* The template raised; the renderer must refuse the same conversation. */
    CHECK_EQ_INT(st, M3_ERR_ARG);
    CHECK(strstr(m3_last_error(), "tool result without a preceding assistant tool call"));
  } else {
    CHECK_OK(st);
    if (st == M3_OK && (got_len != want_len || memcmp(got, want, want_len) != 0)) {
      size_t at = 0;
      while (at < got_len && at < want_len && got[at] == want[at]) at++;
      fprintf(stderr, "%s: differs at byte %zu\n  got:  \"%.60s\"\n  want: \"%.60s\"\n", name,
              at, got + at, want + at);
      CHECK(0);
    } else if (st == M3_OK) {
      CHECK(1);
    }
  }
  free(got);
  m3_chat_free(&chat);
  free(want);
}

static void test_goldens(void) {
  char path[512];
  snprintf(path, sizeof path, "%s/tests/fixtures/chat/cases.json", M3_SOURCE_DIR);
  char *text = read_file(path, NULL);
  CHECK(text != NULL);
  cJSON *cases = cJSON_Parse(text);
  CHECK(cJSON_GetArraySize(cases) >= 20);
  for (const cJSON *c = cases ? cases->child : NULL; c; c = c->next) check_case(c);
  cJSON_Delete(cases);
  free(text);
}

/* Python's repr(float), reference values from CPython 3.11. */
static void test_py_float(void) {
  static const struct { double x; const char *want; } cases[] = {
      {2.5, "2.5"},       {1e-07, "1e-07"},     {0.1, "0.1"},      {1e16, "1e+16"},
      {1e15, "1000000000000000.0"},             {123456.789, "123456.789"},
      {0.0001, "0.0001"}, {0.00001, "1e-05"},   {-3.25, "-3.25"},  {1.0 / 3, "0.3333333333333333"},
      {2.5e-300, "2.5e-300"}, {1.7976931348623157e308, "1.7976931348623157e+308"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    m3_sbuf b = {0};
    m3_py_float(&b, cases[i].x);
    CHECK_STR(b.data, cases[i].want);
    m3_sbuf_free(&b);
  }
  m3_sbuf b = {0};
  m3_py_number(&b, 42);
  m3_sbuf_putc(&b, ' ');
  m3_py_number(&b, -0.0);
  m3_sbuf_putc(&b, ' ');
  m3_pyjson_string(&b, "a\"b\\c\n\x01\xc3\xa9", 9);
  CHECK_STR(b.data, "42 0 \"a\\\"b\\\\c\\n\\u0001\xc3\xa9\"");
  m3_sbuf_free(&b);
}

static void test_errors(void) {
  cJSON *m = cJSON_Parse("[{\"role\": \"wizard\", \"content\": \"x\"}]");
  m3_chat chat;
  CHECK_FAILS_WITH(m3_chat_from_json(m, &chat), M3_ERR_FORMAT, "messages[0].role");
  cJSON_Delete(m);
  m = cJSON_Parse("[{\"role\": \"user\", \"content\": [{\"type\": \"audio\"}]}]");
  CHECK_FAILS_WITH(m3_chat_from_json(m, &chat), M3_ERR_FORMAT, "part type audio");
  cJSON_Delete(m);
  m = cJSON_Parse("[{\"role\": \"assistant\", \"content\": null, \"tool_calls\": [{\"function\": "
                  "{\"name\": \"f\", \"arguments\": \"[1, 2]\"}}]}]");
  CHECK_OK(m3_chat_from_json(m, &chat));
  m3_chat_options opt = {.format = M3_CHAT_FORMAT_M3};
  char *out = NULL;
  CHECK_FAILS_WITH(m3_chat_render(chat.msgs, chat.n, &opt, &out, NULL), M3_ERR_ARG,
                   "not a JSON object");
  m3_chat_free(&chat);
  cJSON_Delete(m);

  CHECK(m3_chat_prompt_opens_reasoning(&(m3_chat_options){.thinking = M3_THINKING_ENABLED}));
  CHECK(!m3_chat_prompt_opens_reasoning(&(m3_chat_options){.thinking = M3_THINKING_ADAPTIVE}));
  CHECK(m3_chat_prompt_opens_reasoning(&(m3_chat_options){.format = M3_CHAT_FORMAT_M2}));
}

int main(void) {
  test_goldens();
  test_py_float();
  test_errors();
  return check_summary();
}
