/* The prompt begun for tool_choice required/named (spec §7.8, §8.2), and the output parser that
 * reads the begun call first, as the server sets it up. Expected values are written out by hand. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "server/srv.h"

#define NS "]<]minimax[>["

typedef struct {
  m3_sbuf content, reasoning, calls; /* calls: "name(args);" per call */
  int starts, ends;
} collected;

static void on_event(void *user, const m3_out_event *ev) {
  collected *c = user;
  switch (ev->kind) {
    case M3_OUT_CONTENT: m3_sbuf_put(&c->content, ev->text, ev->len); break;
    case M3_OUT_REASONING: m3_sbuf_put(&c->reasoning, ev->text, ev->len); break;
    case M3_OUT_TOOL_START:
      if (c->starts++) m3_sbuf_puts(&c->calls, ";");
      m3_sbuf_puts(&c->calls, ev->name);
      m3_sbuf_puts(&c->calls, "=");
      break;
    case M3_OUT_TOOL_ARGS: m3_sbuf_put(&c->calls, ev->text, ev->len); break;
    case M3_OUT_TOOL_END: c->ends++; break;
  }
}

static void free_collected(collected *c) {
  m3_sbuf_free(&c->content);
  m3_sbuf_free(&c->reasoning);
  m3_sbuf_free(&c->calls);
}

static const char *str(const m3_sbuf *b) { return b->len ? b->data : ""; }

/* Feeds the begun call (if any), then `text` in pieces of `chunk` bytes, through a parser set
 * up as gen.c does. */
static void run(const srv_chat_setup *setup, bool in_reasoning, const char *prefix,
                const char *text, size_t chunk, collected *c) {
  m3_out_options opt = {.format = setup->format, .starts_in_reasoning = in_reasoning,
                        .parse_tools = setup->tools && setup->tool_choice != SRV_TOOLS_NONE,
                        .tools = setup->tools};
  m3_out_parser *p = NULL;
  *c = (collected){0};
  CHECK_OK(m3_out_parser_new(&opt, on_event, c, &p));
  if (!p) return;
  if (prefix) CHECK_OK(m3_out_parser_feed(p, prefix, strlen(prefix)));
  for (size_t at = 0, n = strlen(text); at < n; at += chunk)
    CHECK_OK(m3_out_parser_feed(p, text + at, n - at < chunk ? n - at : chunk));
  CHECK_OK(m3_out_parser_finish(p));
  m3_out_parser_free(p);
}

static cJSON *weather_tools(void) {
  return cJSON_Parse(
      "[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"parameters\":{\"type\":"
      "\"object\",\"properties\":{\"location\":{\"type\":\"string\"},\"days\":{\"type\":"
      "\"integer\"}}}}}]");
}

static void test_forced_tool_choice(void) {
  cJSON *tools = weather_tools();
  cJSON *messages = cJSON_Parse("[{\"role\":\"user\",\"content\":\"weather?\"}]");
  srv_chat_setup setup = {.tools = tools, .tool_choice = SRV_TOOLS_AUTO};
  char *plain = NULL, *forced = NULL, *prefix = NULL, *none = NULL;
  bool in_reasoning = true;
  CHECK_OK(srv_render_chat(messages, &setup, &plain, &prefix, &in_reasoning));
  CHECK(prefix == NULL && !in_reasoning);
  setup.tool_choice = SRV_TOOLS_NAMED;
  setup.tool_name = "get_weather";
  CHECK_OK(srv_render_chat(messages, &setup, &forced, &prefix, &in_reasoning));
  const char *want_prefix = NS "<tool_call>\n" NS "<invoke name=\"get_weather\">";
  CHECK_STR(prefix, want_prefix);
  /* Adaptive prompt + closed reasoning + the begun call. */
  m3_sbuf want = {0};
  m3_sbuf_puts(&want, plain);
  m3_sbuf_puts(&want, "</mm:think>");
  m3_sbuf_puts(&want, want_prefix);
  CHECK_STR(forced, want.data);
  /* The model writes only the parameters; the parser reads the prefix first. */
  collected c;
  for (size_t chunk = 1; chunk < 12; chunk++) {
    run(&setup, in_reasoning, prefix,
        NS "<location>Rome" NS "</location>" NS "</invoke>\n" NS "</tool_call>", chunk, &c);
    CHECK_STR(str(&c.calls), "get_weather={\"location\":\"Rome\"}");
    CHECK_STR(str(&c.content), "");
    CHECK_EQ_INT(c.ends, 1);
    free_collected(&c);
  }
  /* required: the model writes the name too. */
  run(&setup, in_reasoning, NS "<tool_call>\n" NS "<invoke name=\"",
      "get_weather\">" NS "<days>2" NS "</days>" NS "</invoke>\n" NS "</tool_call>", 5, &c);
  CHECK_STR(str(&c.calls), "get_weather={\"days\":2}");
  free_collected(&c);
  /* Disabled thinking already closed the block: no second closer. */
  setup.thinking = M3_THINKING_DISABLED;
  setup.tool_choice = SRV_TOOLS_REQUIRED;
  free(prefix);
  CHECK_OK(srv_render_chat(messages, &setup, &none, &prefix, &in_reasoning));
  CHECK_STR(prefix, NS "<tool_call>\n" NS "<invoke name=\"");
  size_t n = strlen(none);
  CHECK(n > strlen(prefix) + 11 &&
        strncmp(none + n - strlen(prefix) - 11, "</mm:think>", 11) == 0 &&
        strncmp(none + n - strlen(prefix) - 22, "</mm:think>", 11) != 0);
  m3_sbuf_free(&want);
  free(plain);
  free(forced);
  free(none);
  free(prefix);
  cJSON_Delete(messages);
  cJSON_Delete(tools);
}

int main(void) {
  test_forced_tool_choice();
  return check_summary();
}
