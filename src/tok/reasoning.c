/* reasoning.c: the reasoning/content split state machine (reasoning.h). */
#include "tok/reasoning.h"

#include <string.h>

#include "tok/textscan.h"

enum { AT_START, AT_START_IN_REASONING, IN_REASONING, IN_CONTENT };

void m3_reasoning_init(m3_reasoning *r, m3_chat_format format, bool starts_in_reasoning,
                       m3_out_fn fn, void *user) {
  *r = (m3_reasoning){0};
  bool m2 = format == M3_CHAT_FORMAT_M2;
  r->open = m2 ? "<think>" : "<mm:think>";
  r->close = m2 ? "</think>" : "</mm:think>";
  r->state = starts_in_reasoning ? AT_START_IN_REASONING : AT_START;
  r->fn = fn;
  r->user = user;
}

static void report(m3_reasoning *r, bool reasoning, size_t n) {
  if (n == 0) return;
  m3_out_event ev = {.kind = reasoning ? M3_OUT_REASONING : M3_OUT_CONTENT, .text = r->hold.data,
                     .len = n};
  r->fn(r->user, &ev);
  m3_sbuf_consume(&r->hold, n);
}

/* Consumes as much of `hold` as can be decided; with `eof` everything is decided. */
static void run(m3_reasoning *r, bool eof) {
  for (;;) {
    const char *s = r->hold.data ? r->hold.data : "";
    size_t n = r->hold.len;
    if (r->state == AT_START || r->state == AT_START_IN_REASONING) {
      int o = m3_lit_at(s, n, r->open), c = r->state == AT_START ? m3_lit_at(s, n, r->close) : -1;
      if (!eof && (o == 0 || c == 0)) return; /* still a prefix of a tag */
      if (o == 1) {
        m3_sbuf_consume(&r->hold, strlen(r->open));
        r->state = IN_REASONING;
      } else if (c == 1) {
        m3_sbuf_consume(&r->hold, strlen(r->close));
        r->state = IN_CONTENT;
      } else {
        r->state = r->state == AT_START ? IN_CONTENT : IN_REASONING;
      }
      continue;
    }
    bool reasoning = r->state == IN_REASONING;
    const char *tag = reasoning ? r->close : r->open;
    const char *at = m3_find(s, n, tag);
    if (!at) {
      report(r, reasoning, eof ? n : m3_safe_len(s, n, tag));
      return;
    }
    report(r, reasoning, (size_t)(at - s));
    m3_sbuf_consume(&r->hold, strlen(tag));
    r->state = reasoning ? IN_CONTENT : IN_REASONING;
  }
}

m3_status m3_reasoning_feed(m3_reasoning *r, const char *text, size_t len) {
  m3_sbuf_put(&r->hold, text, len);
  if (r->hold.failed) return m3_fail(M3_ERR_NOMEM, "reasoning parser: out of memory");
  run(r, false);
  return M3_OK;
}

m3_status m3_reasoning_finish(m3_reasoning *r) {
  run(r, true);
  return M3_OK;
}

void m3_reasoning_free(m3_reasoning *r) { m3_sbuf_free(&r->hold); }
