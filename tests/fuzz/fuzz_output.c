/* fuzz_output: the model-output parser (reasoning split, then tool calls) on arbitrary text fed
 * whole, in two pieces cut at a position taken from the input, and one byte at a time. The
 * header says any chunking gives the same result: the assembled messages (content, reasoning,
 * each call's id, name and arguments) and the success of feeding must be identical, else abort.
 * Input: byte 0 picks the options (format, starting in reasoning, parsing tools, typed tools),
 * byte 1 the cut, the rest is the text. */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "tok/output.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* One tool whose parameters cover each type the argument typing distinguishes. */
static const char tools_json[] =
    "[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":{\"type\":\"object\","
    "\"properties\":{\"s\":{\"type\":\"string\"},\"n\":{\"type\":\"integer\"},"
    "\"x\":{\"type\":\"number\"},\"b\":{\"type\":\"boolean\"},"
    "\"o\":{\"type\":\"object\",\"properties\":{\"k\":{\"type\":\"integer\"}}},"
    "\"a\":{\"type\":\"array\",\"items\":{\"type\":\"string\"}},"
    "\"u\":{\"type\":[\"number\",\"null\"]},\"e\":{\"enum\":[\"p\",1,true]}}}}}]";
static cJSON *tools;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  tools = cJSON_Parse(tools_json);
  if (!tools) abort();
  return 0;
}

typedef struct {
  m3_out_result msg;
  bool ok;
} run_result;

/* Feeds text in pieces of `step` bytes, except that the first piece is `first` bytes. */
static run_result run(const m3_out_options *opt, const char *text, size_t len, size_t first,
                      size_t step) {
  run_result r = {.ok = true};
  m3_out_parser *p;
  if (m3_out_parser_new(opt, m3_out_collect, &r.msg, &p) != M3_OK) abort();
  size_t at = 0, piece = first;
  while (at < len && r.ok) {
    if (piece > len - at) piece = len - at;
    r.ok = m3_out_parser_feed(p, text + at, piece) == M3_OK;
    at += piece;
    piece = step;
  }
  if (r.ok) r.ok = m3_out_parser_finish(p) == M3_OK;
  if (r.msg.failed) abort(); /* out of memory on inputs of a few KiB: a leak or a runaway */
  m3_out_parser_free(p);
  return r;
}

static bool same_buf(const m3_sbuf *a, const m3_sbuf *b) {
  return a->len == b->len && (a->len == 0 || memcmp(a->data, b->data, a->len) == 0);
}

static void check_same(const run_result *a, const run_result *b) {
  if (a->ok != b->ok) abort();
  if (!a->ok) return;
  if (!same_buf(&a->msg.content, &b->msg.content) ||
      !same_buf(&a->msg.reasoning, &b->msg.reasoning) || a->msg.n_calls != b->msg.n_calls)
    abort();
  for (int i = 0; i < a->msg.n_calls; i++) {
    const struct m3_out_call *x = &a->msg.calls[i], *y = &b->msg.calls[i];
    if (strcmp(x->id, y->id) != 0 || !same_buf(&x->name, &y->name) ||
        !same_buf(&x->arguments, &y->arguments))
      abort();
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 2) return 0;
  m3_out_options opt = {
      .format = data[0] & 1 ? M3_CHAT_FORMAT_M2 : M3_CHAT_FORMAT_M3,
      .starts_in_reasoning = data[0] & 2,
      .parse_tools = data[0] & 4,
      .tools = data[0] & 8 ? tools : NULL,
  };
  const char *text = (const char *)data + 2;
  size_t len = size - 2;
  size_t cut = len * data[1] / 255;
  run_result whole = run(&opt, text, len, len, len);
  run_result split = run(&opt, text, len, cut, len);
  run_result bytes = run(&opt, text, len, 1, 1);
  check_same(&whole, &split);
  check_same(&whole, &bytes);
  m3_out_result_free(&whole.msg);
  m3_out_result_free(&split.msg);
  m3_out_result_free(&bytes.msg);
  return 0;
}
