/* test_tok_parse.c: streaming reasoning and tool-call parsing (spec §8, §9.2). Each case states
 * the expected content, reasoning and calls written out by hand from the spec's rules; then the
 * same text is fed split in two at every byte position, and one byte at a time, and the
 * assembled result must equal the whole-input result. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "tok/output.h"

#define NS "]<]minimax[>["

static const char TOOLS[] =
    "[{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"parameters\": {\"type\": "
    "\"object\", \"properties\": {\"location\": {\"type\": \"string\"}, \"days\": {\"type\": "
    "\"integer\"}}}}},"
    " {\"type\": \"function\", \"function\": {\"name\": \"search\", \"parameters\": {\"type\": "
    "\"object\", \"properties\": {\"filters\": {\"type\": \"object\", \"properties\": {\"site\": "
    "{\"type\": \"string\"}, \"year\": {\"type\": \"number\"}}}, \"tags\": {\"type\": \"array\", "
    "\"items\": {\"type\": \"string\"}}, \"exact\": {\"type\": \"boolean\"}}}}},"
    " {\"type\": \"function\", \"function\": {\"name\": \"t\", \"parameters\": {\"properties\": {"
    "\"i\": {\"type\": \"integer\"}, \"n\": {\"type\": \"number\"}, \"b\": {\"type\": \"boolean\"},"
    " \"o\": {\"type\": \"object\"}, \"a\": {\"type\": \"array\"}, \"nl\": {\"type\": [\"string\", "
    "\"null\"]}, \"s\": {\"type\": \"string\"}, \"e\": {\"enum\": [1, 2]}, \"any\": {\"anyOf\": "
    "[{\"type\": \"integer\"}, {\"type\": \"string\"}]}}}}}]";

typedef struct {
  const char *name;
  m3_chat_format format;
  bool in_reasoning, tools;
  const char *input;
  const char *want; /* serialised result, see describe() */
} parse_case;

static const parse_case CASES[] = {
    {"enabled: reasoning up to the closer", M3_CHAT_FORMAT_M3, true, true,
     "step 1</mm:think>The answer", "C:The answer|R:step 1|"},
    {"adaptive: model opens reasoning", M3_CHAT_FORMAT_M3, false, true,
     "<mm:think>plan</mm:think>Hi", "C:Hi|R:plan|"},
    {"adaptive: leading bare closer swallowed once", M3_CHAT_FORMAT_M3, false, true,
     "</mm:think>Hello</mm:think>!", "C:Hello</mm:think>!|R:|"},
    {"enabled: repeated opener at start", M3_CHAT_FORMAT_M3, true, true,
     "<mm:think>x</mm:think>y", "C:y|R:x|"},
    {"enabled: truncated inside reasoning", M3_CHAT_FORMAT_M3, true, true, "still <mm:th",
     "C:|R:still <mm:th|"},
    {"reasoning again later in content", M3_CHAT_FORMAT_M3, false, true,
     "a<mm:think>b</mm:think>c", "C:ac|R:b|"},
    {"near-miss tags stay text", M3_CHAT_FORMAT_M3, false, true, "<mm:thin> </mm:thinker",
     "C:<mm:thin> </mm:thinker|R:|"},
    {"one call, text before", M3_CHAT_FORMAT_M3, false, true,
     "</mm:think>Let me check. " NS "<tool_call>\n" NS "<invoke name=\"get_weather\">" NS
     "<location>Paris" NS "</location>" NS "<days>3" NS "</days>" NS "</invoke>\n" NS "</tool_call>",
     "C:Let me check.|R:|T:call_0 get_weather {\"location\":\"Paris\",\"days\":3}|"},
    {"two invokes, text after, second block", M3_CHAT_FORMAT_M3, false, true,
     "Before\n" NS "<tool_call>\n" NS "<invoke name=\"get_weather\">" NS "<location>A" NS
     "</location>" NS "</invoke>\n" NS "<invoke name=\"get_weather\">" NS "<location>B" NS
     "</location>" NS "</invoke>\n" NS "</tool_call>\nBetween " NS "<tool_call>" NS
     "<invoke name=\"search\">" NS "</invoke>" NS "</tool_call>  ",
     "C:BeforeBetween|R:|T:call_0 get_weather {\"location\":\"A\"}|T:call_1 get_weather "
     "{\"location\":\"B\"}|T:call_2 search {}|"},
    {"nested object, array, boolean by schema", M3_CHAT_FORMAT_M3, false, true,
     NS "<tool_call>" NS "<invoke name=\"search\">" NS "<filters>" NS "<site>x.com" NS "</site>"
     NS "<year>2024" NS "</year>" NS "</filters>" NS "<tags>" NS "<item>a" NS "</item>" NS
     "<item>b" NS "</item>" NS "</tags>" NS "<exact>True" NS "</exact>" NS "</invoke>" NS
     "</tool_call>",
     "C:|R:|T:call_0 search {\"filters\":{\"site\":\"x.com\",\"year\":2024},\"tags\":[\"a\","
     "\"b\"],\"exact\":true}|"},
    {"no schema: strings, repeated children collect", M3_CHAT_FORMAT_M3, false, true,
     NS "<tool_call>" NS "<invoke name=\"other\">" NS "<p>" NS "<k>1" NS "</k>" NS "<k>2" NS
     "</k>" NS "</p>" NS "<q>7" NS "</q>" NS "</invoke>" NS "</tool_call>",
     "C:|R:|T:call_0 other {\"p\":{\"k\":[\"1\",\"2\"]},\"q\":\"7\"}|"},
    {"elided first parameter opener", M3_CHAT_FORMAT_M3, false, true,
     NS "<tool_call>\n" NS "<invoke name=\"get_weather\">" NS "Paris" NS "</location>" NS
     "<days>2" NS "</days>" NS "</invoke>\n" NS "</tool_call>",
     "C:|R:|T:call_0 get_weather {\"location\":\"Paris\",\"days\":2}|"},
    {"block without a call is content", M3_CHAT_FORMAT_M3, false, true,
     "Hi " NS "<tool_call> garbage " NS "</tool_call> bye",
     "C:Hi" NS "<tool_call> garbage " NS "</tool_call>bye|R:|"},
    {"nameless invoke skipped, next one kept", M3_CHAT_FORMAT_M3, false, true,
     NS "<tool_call>" NS "<invoke foo>" NS "<a>1" NS "</a>" NS "</invoke>" NS
     "<invoke name=\"ping\">" NS "</invoke>" NS "</tool_call>",
     "C:|R:|T:call_0 ping {}|"},
    {"text at a parameter boundary ends the call only", M3_CHAT_FORMAT_M3, false, true,
     NS "<tool_call>" NS "<invoke name=\"a\">oops " NS "</invoke>" NS "<invoke name=\"b\">" NS
     "<x>1" NS "</x>" NS "</invoke>" NS "</tool_call>Done",
     "C:Done|R:|T:call_0 a {}|T:call_1 b {\"x\":\"1\"}|"},
    {"truncated inside a string value", M3_CHAT_FORMAT_M3, false, true,
     NS "<tool_call>" NS "<invoke name=\"get_weather\">" NS "<location>Par",
     "C:|R:|T:call_0 get_weather {\"location\":\"Par\"}|"},
    {"truncated inside a typed value", M3_CHAT_FORMAT_M3, false, true,
     NS "<tool_call>" NS "<invoke name=\"get_weather\">" NS "<days>1",
     "C:|R:|T:call_0 get_weather {\"days\":1}|"},
    {"quoted, bare and <-less invoke headers", M3_CHAT_FORMAT_M3, false, true,
     NS "<tool_call>" NS "invoke name='ping'>" NS "</invoke>" NS "<invoke name=pong>" NS
     "</invoke>" NS "</tool_call>",
     "C:|R:|T:call_0 ping {}|T:call_1 pong {}|"},
    {"namespace token in plain text", M3_CHAT_FORMAT_M3, false, true, "a " NS " b " NS "<tool",
     "C:a " NS " b " NS "<tool|R:|"},
    {"coercions by schema", M3_CHAT_FORMAT_M3, false, true,
     NS "<tool_call>" NS "<invoke name=\"t\">" NS "<i> 42 " NS "</i>" NS "<n>2.50" NS "</n>" NS
     "<b>yes" NS "</b>" NS "<o>{\"k\": [1, 2]}" NS "</o>" NS "<a>" NS "</a>" NS "<nl>NULL" NS
     "</nl>" NS "<s>null" NS "</s>" NS "<e>2" NS "</e>" NS "<any>x1" NS "</any>" NS "<i>4.5" NS
     "</i>" NS "</invoke>" NS "</tool_call>",
     "C:|R:|T:call_0 t {\"i\":42,\"n\":2.5,\"b\":true,\"o\":{\"k\":[1,2]},\"a\":[],\"nl\":null,"
     "\"s\":\"null\",\"e\":2,\"any\":\"x1\",\"i\":\"4.5\"}|"},
    {"string escaping", M3_CHAT_FORMAT_M3, false, true,
     NS "<tool_call>" NS "<invoke name=\"get_weather\">" NS "<location>Saint \"D\"\n\xc3\x8ele\\"
     NS "</location>" NS "</invoke>" NS "</tool_call>",
     "C:|R:|T:call_0 get_weather {\"location\":\"Saint \\\"D\\\"\\n\xc3\x8ele\\\\\"}|"},
    {"tool markup inside reasoning stays reasoning", M3_CHAT_FORMAT_M3, true, true,
     "x " NS "<tool_call>" NS "<invoke name=\"a\">" NS "</invoke></mm:think>done",
     "C:done|R:x " NS "<tool_call>" NS "<invoke name=\"a\">" NS "</invoke>|"},
    {"M2: reasoning then XML call", M3_CHAT_FORMAT_M2, true, true,
     "plan\n</think>\n\nOK <minimax:tool_call>\n<invoke name=\"get_weather\">\n"
     "<parameter name=\"location\">\nParis\n</parameter>\n<parameter name=\"days\">3</parameter>\n"
     "</invoke>\n</minimax:tool_call>",
     "C:\n\nOK|R:plan\n|T:call_0 get_weather {\"location\":\"Paris\",\"days\":3}|"},
    {"M2: closers inside a value, missing </parameter>", M3_CHAT_FORMAT_M2, true, true,
     "</think><minimax:tool_call><invoke name=\"get_weather\"><parameter name=\"location\">a</div>"
     "b</parameter><parameter name=\"x\">1\n\n</invoke><invoke name=\"ping\"></invoke>"
     "</minimax:tool_call>",
     "C:|R:|T:call_0 get_weather {\"location\":\"a</div>b\",\"x\":\"1\\n\"}|T:call_1 ping {}|"},
    {"element tag whose '>' lies inside a namespace token", M3_CHAT_FORMAT_M3, false, true,
     NS "<tool_call>" NS "<invoke name=\"a\">" NS "<p>" NS "<" NS,
     "C:|R:|T:call_0 a {\"p\":{\"]<]minimax[\":\"[\"}}|"},
    {"tool parsing off", M3_CHAT_FORMAT_M3, false, false,
     NS "<tool_call>" NS "<invoke name=\"a\">" NS "</invoke>" NS "</tool_call>",
     "C:" NS "<tool_call>" NS "<invoke name=\"a\">" NS "</invoke>" NS "</tool_call>|R:|"},
};

/* "C:content|R:reasoning|T:id name arguments|..." */
static char *describe(const m3_out_result *r) {
  m3_sbuf b = {0};
  m3_sbuf_puts(&b, "C:");
  m3_sbuf_put(&b, r->content.data ? r->content.data : "", r->content.len);
  m3_sbuf_puts(&b, "|R:");
  m3_sbuf_put(&b, r->reasoning.data ? r->reasoning.data : "", r->reasoning.len);
  m3_sbuf_puts(&b, "|");
  for (int i = 0; i < r->n_calls; i++) {
    m3_sbuf_puts(&b, "T:");
    m3_sbuf_puts(&b, r->calls[i].id);
    m3_sbuf_puts(&b, " ");
    m3_sbuf_puts(&b, r->calls[i].name.data);
    m3_sbuf_puts(&b, " ");
    m3_sbuf_put(&b, r->calls[i].arguments.data ? r->calls[i].arguments.data : "", r->calls[i].arguments.len);
    m3_sbuf_puts(&b, "|");
  }
  return b.data;
}

/* Parses the len bytes of `input` fed in pieces that start at the given cut points (or byte by
 * byte when bytewise), returning the description of the result. */
static char *parse(const parse_case *c, size_t len, const cJSON *tools, const size_t *cuts,
                   size_t n_cuts, bool bytewise) {
  m3_out_options opt = {.format = c->format, .starts_in_reasoning = c->in_reasoning,
                        .parse_tools = c->tools, .tools = tools};
  m3_out_result res = {0};
  m3_out_parser *p;
  CHECK_OK(m3_out_parser_new(&opt, m3_out_collect, &res, &p));
  size_t at = 0;
  for (size_t k = 0; k <= n_cuts && !bytewise; k++) {
    size_t end = k < n_cuts ? cuts[k] : len;
    CHECK_OK(m3_out_parser_feed(p, c->input + at, end - at));
    at = end;
  }
  for (size_t i = 0; bytewise && i < len; i++) CHECK_OK(m3_out_parser_feed(p, c->input + i, 1));
  CHECK_OK(m3_out_parser_finish(p));
  for (int i = 0; i < res.n_calls; i++) {
    cJSON *a = cJSON_Parse(res.calls[i].arguments.data); /* every arguments text is JSON */
    CHECK(cJSON_IsObject(a));
    cJSON_Delete(a);
  }
  char *d = describe(&res);
  m3_out_result_free(&res);
  m3_out_parser_free(p);
  return d;
}

/* The whole-input result must be c->want, and every split and byte-wise feed must agree. */
static void check_case(const parse_case *c, size_t len, const cJSON *tools) {
  char *whole = parse(c, len, tools, NULL, 0, false);
  if (strcmp(whole, c->want) != 0) fprintf(stderr, "case \"%s\"\n", c->name);
  CHECK_STR(whole, c->want);
  int mismatches = 0;
  for (size_t cut = 0; cut <= len; cut++) {
    char *two = parse(c, len, tools, &cut, 1, false);
    if (strcmp(two, whole) != 0 && mismatches++ == 0)
      fprintf(stderr, "case \"%s\" split at %zu:\n  %s\n  %s\n", c->name, cut, two, whole);
    free(two);
  }
  CHECK_EQ_INT(mismatches, 0);
  char *bytes = parse(c, len, tools, NULL, 0, true);
  if (strcmp(bytes, whole) != 0) fprintf(stderr, "case \"%s\" byte by byte\n", c->name);
  CHECK_STR(bytes, whole);
  free(bytes);
  free(whole);
}

static void test_cases(void) {
  cJSON *tools = cJSON_Parse(TOOLS);
  CHECK(tools != NULL);
  for (size_t i = 0; i < sizeof CASES / sizeof CASES[0]; i++)
    check_case(&CASES[i], strlen(CASES[i].input), tools);
  cJSON_Delete(tools);
}

/* Generated text may hold NUL, which the cases above cannot: a parameter named by one NUL byte,
 * then a closer that agrees with its own only up to that NUL, so it is not the value's closer. */
static void test_nul_in_name(void) {
  static const char input[] =
      NS "<tool_call>" NS "<invoke name=\"a\">" NS "<\0>" NS "</" NS "<=>";
  const parse_case c = {"parameter name holding NUL", M3_CHAT_FORMAT_M3, false, true, input,
                        "C:|R:|T:call_0 a {\"\\u0000\":\"\"}|"};
  check_case(&c, sizeof input - 1, NULL);
}

/* Argument deltas arrive as the value is generated, not only at the end of the call. */
typedef struct {
  m3_out_result res;
  int starts, ends, arg_events;
} stream_log;

static void log_event(void *user, const m3_out_event *ev) {
  stream_log *l = user;
  l->starts += ev->kind == M3_OUT_TOOL_START;
  l->ends += ev->kind == M3_OUT_TOOL_END;
  l->arg_events += ev->kind == M3_OUT_TOOL_ARGS;
  m3_out_collect(&l->res, ev);
}

static void test_incremental(void) {
  cJSON *tools = cJSON_Parse(TOOLS);
  m3_out_options opt = {.format = M3_CHAT_FORMAT_M3, .parse_tools = true, .tools = tools,
                        .id_prefix = "call_req7_"};
  stream_log l = {0};
  m3_out_parser *p;
  CHECK_OK(m3_out_parser_new(&opt, log_event, &l, &p));
  const char *head = "Sure." NS "<tool_call>\n" NS "<invoke name=\"get_weather\">";
  CHECK_OK(m3_out_parser_feed(p, head, strlen(head)));
  CHECK_EQ_INT(l.starts, 1); /* announced as soon as the header is complete */
  CHECK_STR(l.res.calls[0].id, "call_req7_0");
  CHECK_STR(l.res.content.data, "Sure.");
  CHECK_OK(m3_out_parser_feed(p, NS "<location>Par", strlen(NS "<location>Par")));
  CHECK_STR(l.res.calls[0].arguments.data, "{\"location\":\"Par"); /* streamed string */
  CHECK_OK(m3_out_parser_feed(p, "is" NS "</loc", strlen("is" NS "</loc")));
  CHECK_STR(l.res.calls[0].arguments.data, "{\"location\":\"Paris");
  CHECK_OK(m3_out_parser_feed(p, "ation>" NS "<days>1", strlen("ation>" NS "<days>1")));
  CHECK_STR(l.res.calls[0].arguments.data, "{\"location\":\"Paris\"");
  CHECK_OK(m3_out_parser_feed(p, "0" NS "</days>", strlen("0" NS "</days>")));
  CHECK_STR(l.res.calls[0].arguments.data, "{\"location\":\"Paris\",\"days\":10");
  CHECK_EQ_INT(l.ends, 0);
  CHECK_OK(m3_out_parser_feed(p, NS "</invoke>", strlen(NS "</invoke>")));
  CHECK_EQ_INT(l.ends, 1);
  CHECK_OK(m3_out_parser_finish(p));
  CHECK_EQ_INT(m3_out_parser_tool_calls(p), 1);
  CHECK(l.arg_events >= 5);
  m3_out_parser_free(p);
  m3_out_result_free(&l.res);
  cJSON_Delete(tools);
}

int main(void) {
  test_cases();
  test_nul_in_name();
  test_incremental();
  return check_summary();
}
