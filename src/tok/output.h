/* output.h: the one object a server feeds the model's decoded text to. Reasoning is split off
 * first (reasoning.h); the content that remains goes through the tool-call parser (toolcall.h),
 * so a tool-call block inside reasoning stays reasoning. Also a collector that assembles the
 * events into the final message (the non-streaming response). */
#ifndef M3_TOK_OUTPUT_H
#define M3_TOK_OUTPUT_H

#include <stdbool.h>
#include <stddef.h>

#include <cjson/cJSON.h>

#include "base/status.h"
#include "tok/chat.h"
#include "tok/outevent.h"
#include "tok/pyjson.h"

typedef struct {
  m3_chat_format format;
  bool starts_in_reasoning; /* m3_chat_prompt_opens_reasoning() of the prompt's options */
  bool parse_tools;         /* false: tool-call markup stays content */
  const cJSON *tools;       /* the request's tools (types the arguments) */
  const char *id_prefix;    /* tool-call ids; NULL = "call_" */
} m3_out_options;

typedef struct m3_out_parser m3_out_parser;

m3_status m3_out_parser_new(const m3_out_options *opt, m3_out_fn fn, void *user,
                            m3_out_parser **out);
/* Any chunking (one token's text at a time, one byte at a time) gives the same result. */
m3_status m3_out_parser_feed(m3_out_parser *p, const char *text, size_t len);
m3_status m3_out_parser_finish(m3_out_parser *p);
int m3_out_parser_tool_calls(const m3_out_parser *p);
void m3_out_parser_free(m3_out_parser *p);

/* The assembled message. Zero-initialise, pass m3_out_collect as the event callback with the
 * result as `user`, free with m3_out_result_free. */
typedef struct {
  m3_sbuf content, reasoning;
  struct m3_out_call {
    char *id;
    m3_sbuf name, arguments;
  } *calls;
  int n_calls;
  bool failed; /* out of memory while collecting */
} m3_out_result;

void m3_out_collect(void *result, const m3_out_event *ev);
void m3_out_result_free(m3_out_result *r);

#endif
