/* reasoning.h: splits streamed model output into reasoning and content (spec §8.1, §9.2).
 *
 * Tags: M3 <mm:think>…</mm:think>, M2 <think>…</think>. The rules, applied while streaming:
 *  - A turn that starts outside reasoning (M3 adaptive/disabled) may open with a bare closer:
 *    it is swallowed once. An opener at the start enters reasoning.
 *  - A turn that starts inside reasoning (the prompt opened it: M3 enabled, M2) is reasoning up
 *    to the first closer; an opener repeated at its very start is swallowed.
 *  - Later, an opener in content starts reasoning again; a closer in content without an opener
 *    stays visible as content.
 * Partial tags at the end of a chunk are held back until the next chunk decides them, so any
 * chunking of the same text gives the same events (concatenated). */
#ifndef M3_TOK_REASONING_H
#define M3_TOK_REASONING_H

#include <stdbool.h>
#include <stddef.h>

#include "base/status.h"
#include "tok/chat.h"
#include "tok/outevent.h"
#include "tok/pyjson.h"

typedef struct {
  const char *open, *close;
  int state;
  m3_sbuf hold; /* received, not yet reported */
  m3_out_fn fn;
  void *user;
} m3_reasoning;

/* `starts_in_reasoning`: see m3_chat_prompt_opens_reasoning(). Events go to fn(user, ev). */
void m3_reasoning_init(m3_reasoning *r, m3_chat_format format, bool starts_in_reasoning,
                       m3_out_fn fn, void *user);
m3_status m3_reasoning_feed(m3_reasoning *r, const char *text, size_t len);
/* End of output: reports whatever was held back. */
m3_status m3_reasoning_finish(m3_reasoning *r);
void m3_reasoning_free(m3_reasoning *r);

#endif
