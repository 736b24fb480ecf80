/* output.c: reasoning split, then tool calls (output.h). */
#include "tok/output.h"

#include <stdlib.h>
#include <string.h>

#include "tok/reasoning.h"
#include "tok/toolcall.h"

struct m3_out_parser {
  m3_reasoning reasoning;
  m3_toolcall *tools; /* NULL when tool calls are not parsed */
  m3_out_fn fn;
  void *user;
  m3_status status; /* first failure of the tool-call parser inside a callback */
};

/* Reasoning-split events: reasoning goes out, content goes on to the tool-call parser. */
static void from_reasoning(void *user, const m3_out_event *ev) {
  m3_out_parser *p = user;
  if (ev->kind == M3_OUT_CONTENT && p->tools) {
    m3_status st = m3_toolcall_feed(p->tools, ev->text, ev->len);
    if (st && !p->status) p->status = st;
  } else {
    p->fn(p->user, ev);
  }
}

m3_status m3_out_parser_new(const m3_out_options *opt, m3_out_fn fn, void *user,
                            m3_out_parser **out) {
  m3_out_parser *p = calloc(1, sizeof *p);
  if (!p) return m3_fail(M3_ERR_NOMEM, "output parser: out of memory");
  p->fn = fn;
  p->user = user;
  m3_reasoning_init(&p->reasoning, opt->format, opt->starts_in_reasoning, from_reasoning, p);
  if (opt->parse_tools) {
    m3_status st = m3_toolcall_new(opt->format, opt->tools, opt->id_prefix, fn, user, &p->tools);
    if (st) {
      free(p);
      return st;
    }
  }
  *out = p;
  return M3_OK;
}

m3_status m3_out_parser_feed(m3_out_parser *p, const char *text, size_t len) {
  m3_status st = m3_reasoning_feed(&p->reasoning, text, len);
  return st ? st : p->status;
}

m3_status m3_out_parser_finish(m3_out_parser *p) {
  m3_status st = m3_reasoning_finish(&p->reasoning);
  if (!st) st = p->status;
  if (!st && p->tools) st = m3_toolcall_finish(p->tools);
  return st;
}

int m3_out_parser_tool_calls(const m3_out_parser *p) {
  return p->tools ? m3_toolcall_count(p->tools) : 0;
}

void m3_out_parser_free(m3_out_parser *p) {
  if (!p) return;
  m3_reasoning_free(&p->reasoning);
  m3_toolcall_free(p->tools);
  free(p);
}

void m3_out_collect(void *result, const m3_out_event *ev) {
  m3_out_result *r = result;
  switch (ev->kind) {
    case M3_OUT_CONTENT: m3_sbuf_put(&r->content, ev->text, ev->len); break;
    case M3_OUT_REASONING: m3_sbuf_put(&r->reasoning, ev->text, ev->len); break;
    case M3_OUT_TOOL_START: {
      struct m3_out_call *calls = realloc(r->calls, (size_t)(r->n_calls + 1) * sizeof *calls);
      if (!calls) {
        r->failed = true;
        return;
      }
      r->calls = calls;
      calls[r->n_calls] = (struct m3_out_call){.id = strdup(ev->id)};
      m3_sbuf_puts(&calls[r->n_calls].name, ev->name);
      r->n_calls++;
      break;
    }
    case M3_OUT_TOOL_ARGS:
      if (ev->index < r->n_calls) m3_sbuf_put(&r->calls[ev->index].arguments, ev->text, ev->len);
      break;
    case M3_OUT_TOOL_END: break;
  }
}

void m3_out_result_free(m3_out_result *r) {
  m3_sbuf_free(&r->content);
  m3_sbuf_free(&r->reasoning);
  for (int i = 0; i < r->n_calls; i++) {
    free(r->calls[i].id);
    m3_sbuf_free(&r->calls[i].name);
    m3_sbuf_free(&r->calls[i].arguments);
  }
  free(r->calls);
  *r = (m3_out_result){0};
}
