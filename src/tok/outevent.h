/* outevent.h: what the output parsers report while the model's text streams in.
 *
 * Concatenating the `text` of all CONTENT events gives the message content, of all REASONING
 * events the reasoning, and of the TOOL_ARGS events of one index the arguments JSON of that call.
 * A call is announced by TOOL_START (index, id, name) before any of its arguments and closed by
 * TOOL_END. The pointers are valid only during the callback. */
#ifndef M3_TOK_OUTEVENT_H
#define M3_TOK_OUTEVENT_H

#include <stddef.h>

typedef enum {
  M3_OUT_CONTENT,
  M3_OUT_REASONING,
  M3_OUT_TOOL_START,
  M3_OUT_TOOL_ARGS,
  M3_OUT_TOOL_END,
} m3_out_kind;

typedef struct {
  m3_out_kind kind;
  int index;                  /* tool events: 0, 1, ... in order of the calls */
  const char *id, *name;      /* TOOL_START */
  const char *text;           /* CONTENT, REASONING, TOOL_ARGS */
  size_t len;
} m3_out_event;

typedef void (*m3_out_fn)(void *user, const m3_out_event *ev);

#endif
