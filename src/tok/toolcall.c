/* toolcall.c: the streaming tool-call grammar (toolcall.h).
 *
 * Input accumulates in `buf`; run() consumes from its front only what the bytes seen so far
 * decide, so a tag split across chunks waits for the rest. With eof every decision is forced and
 * `buf` ends empty. */
#include "tok/toolcall.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tok/pyjson.h"
#include "tok/textscan.h"
#include "tok/toolargs.h"

#define NS "]<]minimax[>["
#define NS_LEN (sizeof NS - 1)
#define MAX_TAG 1024 /* a header or element name longer than this is not one */

enum { TEXT, BLOCK, HEADER, PARAMS, VALUE_START, VALUE_TEXT, VALUE_NESTED, ELIDED, SKIP_INVOKE };

struct m3_toolcall {
  bool m2;
  const char *block_open, *block_close, *invoke_open, *invoke_close;
  const cJSON *tools;
  char id_prefix[48];
  m3_out_fn fn;
  void *user;
  int state;
  m3_sbuf buf;          /* received, not yet consumed */
  m3_sbuf raw;          /* the current block's text while it holds no recognised call */
  bool block_has_call;
  bool drop_ws;         /* whitespace right after a block is not content */
  int n_calls;
  char id[80];
  m3_sbuf name;         /* current call */
  int n_params;
  m3_sbuf pname;        /* current parameter */
  const cJSON *pschema;
  bool streaming;       /* current value is a plain string, reported as it comes */
  bool value_started;   /* M2: first byte of the value seen (a leading newline is dropped) */
  bool pending_nl;      /* M2: a newline held back in case it is the value's last byte */
  m3_sbuf value;        /* buffered value text */
  size_t scan;          /* VALUE_NESTED: bytes of buf already scanned */
  int depth;
};

static void emit(m3_toolcall *tc, m3_out_kind kind, const char *s, size_t n) {
  if (n == 0 && (kind == M3_OUT_CONTENT || kind == M3_OUT_TOOL_ARGS)) return;
  m3_out_event ev = {.kind = kind, .index = tc->n_calls, .id = tc->id, .name = tc->name.data,
                     .text = s, .len = n};
  tc->fn(tc->user, &ev);
}

static void args(m3_toolcall *tc, const char *s) { emit(tc, M3_OUT_TOOL_ARGS, s, strlen(s)); }

static const char *bs(const m3_toolcall *tc) { return tc->buf.data ? tc->buf.data : ""; }

/* Drops n bytes of input; inside a block without a call they are kept for the raw fallback. */
static void consume(m3_toolcall *tc, size_t n) {
  if (tc->state != TEXT && !tc->block_has_call) m3_sbuf_put(&tc->raw, bs(tc), n);
  m3_sbuf_consume(&tc->buf, n);
}

static size_t leading_ws(const m3_toolcall *tc) {
  size_t i = 0;
  while (i < tc->buf.len && isspace((unsigned char)tc->buf.data[i])) i++;
  return i;
}

static void start_call(m3_toolcall *tc, const char *name, size_t n) {
  tc->name.len = 0;
  m3_sbuf_put(&tc->name, name, n);
  snprintf(tc->id, sizeof tc->id, "%s%d", tc->id_prefix, tc->n_calls);
  tc->block_has_call = true;
  m3_sbuf_free(&tc->raw);
  emit(tc, M3_OUT_TOOL_START, NULL, 0);
  args(tc, "{");
  tc->n_params = 0;
}

static void end_call(m3_toolcall *tc) {
  args(tc, "}");
  emit(tc, M3_OUT_TOOL_END, NULL, 0);
  tc->n_calls++;
  tc->state = BLOCK;
}

static void end_block(m3_toolcall *tc) {
  if (!tc->block_has_call) emit(tc, M3_OUT_CONTENT, tc->raw.data, tc->raw.len);
  m3_sbuf_free(&tc->raw);
  tc->state = TEXT;
  tc->drop_ws = true;
}

static void param_key(m3_toolcall *tc) {
  m3_sbuf k = {0};
  if (tc->n_params++) m3_sbuf_putc(&k, ',');
  m3_pyjson_string(&k, tc->pname.data, tc->pname.len);
  m3_sbuf_putc(&k, ':');
  emit(tc, M3_OUT_TOOL_ARGS, k.data, k.len);
  m3_sbuf_free(&k);
}

static void begin_param(m3_toolcall *tc, const char *name, size_t n) {
  tc->pname.len = 0;
  m3_sbuf_put(&tc->pname, name, n);
  tc->pschema = m3_tool_param_schema(tc->tools, tc->name.data, tc->pname.data ? tc->pname.data : "");
  tc->streaming = m3_arg_is_plain_string(tc->pschema);
  tc->value.len = 0;
  tc->value_started = tc->pending_nl = false;
}

static void emit_value(m3_toolcall *tc, cJSON *v) {
  param_key(tc);
  m3_sbuf j = {0};
  if (v) m3_pyjson_dump(&j, v, true);
  emit(tc, M3_OUT_TOOL_ARGS, j.data ? j.data : "null", j.data ? j.len : 4);
  m3_sbuf_free(&j);
  cJSON_Delete(v);
}

/* Part of a text value: streamed as JSON string characters, or buffered. M2 values lose one
 * leading and one trailing newline, so a final newline is held until more text follows. */
static void value_chunk(m3_toolcall *tc, const char *s, size_t n) {
  if (tc->m2 && !tc->value_started && n) {
    tc->value_started = true;
    if (*s == '\n') s++, n--;
  }
  if (n == 0) return;
  m3_sbuf piece = {0};
  if (tc->pending_nl) m3_sbuf_putc(&piece, '\n');
  tc->pending_nl = tc->m2 && s[n - 1] == '\n';
  m3_sbuf_put(&piece, s, n - (tc->pending_nl ? 1 : 0));
  if (tc->streaming) {
    m3_sbuf esc = {0};
    m3_pyjson_string_body(&esc, piece.data ? piece.data : "", piece.len);
    emit(tc, M3_OUT_TOOL_ARGS, esc.data, esc.len);
    m3_sbuf_free(&esc);
  } else {
    m3_sbuf_put(&tc->value, piece.data ? piece.data : "", piece.len);
  }
  m3_sbuf_free(&piece);
}

static void finish_value(m3_toolcall *tc) {
  if (tc->streaming) {
    args(tc, "\"");
  } else {
    emit_value(tc, m3_arg_from_text(tc->value.data ? tc->value.data : "", tc->value.len, tc->pschema));
  }
  tc->state = PARAMS;
}

/* name="x" | name='x' | name=x inside an invoke header. */
static bool header_name(const char *s, size_t n, const char **name, size_t *len) {
  const char *e = s + n, *p = m3_find(s, n, "name");
  if (!p) return false;
  p += 4;
  while (p < e && isspace((unsigned char)*p)) p++;
  if (p == e || *p++ != '=') return false;
  while (p < e && isspace((unsigned char)*p)) p++;
  const char *q;
  if (p < e && (*p == '"' || *p == '\'')) {
    q = memchr(p + 1, *p, (size_t)(e - p - 1));
    if (!q) return false;
    p++;
  } else {
    for (q = p; q < e && !isspace((unsigned char)*q) && *q != '/'; q++) {}
  }
  *name = p;
  *len = (size_t)(q - p);
  return *len > 0;
}

static bool text_state(m3_toolcall *tc, bool eof) {
  if (tc->drop_ws) {
    m3_sbuf_consume(&tc->buf, leading_ws(tc));
    if (tc->buf.len == 0) return false;
    tc->drop_ws = false;
  }
  const char *s = bs(tc), *at = m3_find(s, tc->buf.len, tc->block_open);
  size_t take = at ? (size_t)(at - s) : eof ? tc->buf.len : m3_safe_len(s, tc->buf.len, tc->block_open);
  size_t keep = take;
  if (at || !eof)
    while (keep > 0 && isspace((unsigned char)s[keep - 1])) keep--;
  emit(tc, M3_OUT_CONTENT, s, keep);
  m3_sbuf_consume(&tc->buf, at ? take : keep);
  if (!at) return false;
  tc->block_has_call = false;
  tc->state = BLOCK;
  consume(tc, strlen(tc->block_open));
  return true;
}

static bool block_state(m3_toolcall *tc, bool eof) {
  consume(tc, leading_ws(tc));
  const char *s = bs(tc);
  size_t n = tc->buf.len;
  if (n == 0) return false;
  int close = m3_lit_at(s, n, tc->block_close), inv = m3_lit_at(s, n, tc->invoke_open);
  int bare = tc->m2 ? -1 : m3_lit_at(s, n, NS "invoke");
  if (close == 1) {
    consume(tc, strlen(tc->block_close));
    end_block(tc);
  } else if (inv == 1 || bare == 1) {
    consume(tc, inv == 1 ? strlen(tc->invoke_open) : strlen(NS "invoke"));
    tc->state = HEADER;
  } else if (!eof && (close == 0 || inv == 0 || bare == 0)) {
    return false;
  } else {
    /* Junk between invokes: skip to the next byte that could start a marker. */
    const char *next = memchr(s + 1, tc->block_close[0], n - 1);
    consume(tc, next ? (size_t)(next - s) : n);
  }
  return true;
}

static bool header_state(m3_toolcall *tc, bool eof) {
  const char *s = bs(tc), *gt = memchr(s, '>', tc->buf.len), *name;
  size_t len;
  if (!gt) {
    if (!eof && tc->buf.len <= MAX_TAG) return false;
    tc->state = BLOCK; /* not a header: the junk skipper takes it */
    return true;
  }
  bool named = header_name(s, (size_t)(gt - s), &name, &len);
  if (!named) {
    consume(tc, (size_t)(gt - s) + 1);
    tc->state = SKIP_INVOKE;
    return true;
  }
  m3_sbuf nm = {0};
  m3_sbuf_put(&nm, name, len);
  consume(tc, (size_t)(gt - s) + 1);
  start_call(tc, nm.data, nm.len);
  m3_sbuf_free(&nm);
  tc->state = PARAMS;
  return true;
}

static bool params_state_m3(m3_toolcall *tc, bool eof) {
  consume(tc, leading_ws(tc));
  const char *s = bs(tc);
  size_t n = tc->buf.len;
  if (n == 0) return false;
  int ic = m3_lit_at(s, n, tc->invoke_close), bc = m3_lit_at(s, n, tc->block_close);
  if (ic == 1) {
    consume(tc, strlen(tc->invoke_close));
    end_call(tc);
    return true;
  }
  if (bc == 1) {
    end_call(tc); /* </invoke> missing; the block state consumes the closer */
    return true;
  }
  if (!eof && (ic == 0 || bc == 0)) return false;
  int closer = m3_lit_at(s, n, NS "</"), open = m3_lit_at(s, n, NS "<"), ns = m3_lit_at(s, n, NS);
  if (closer == 1) {
    end_call(tc); /* a stray closing tag: the call ends, the block skips it */
    return true;
  }
  if (open == 1) {
    const char *name = s + NS_LEN + 1, *gt = memchr(name, '>', n - NS_LEN - 1);
    if (!gt && !eof && n <= MAX_TAG) return false;
    if (!gt || gt == name || memchr(name, '<', (size_t)(gt - name)) ||
        m3_find(name, (size_t)(gt - name), NS)) {
      end_call(tc);
      return true;
    }
    begin_param(tc, name, (size_t)(gt - name));
    consume(tc, (size_t)(gt - s) + 1);
    tc->state = VALUE_START;
    return true;
  }
  if (ns == 1) { /* namespace token, then no "<": the parameter opener was elided */
    consume(tc, NS_LEN);
    tc->state = ELIDED;
    return true;
  }
  if (!eof && (closer == 0 || open == 0 || ns == 0)) return false;
  end_call(tc); /* text where a parameter should start */
  return true;
}

static bool params_state_m2(m3_toolcall *tc, bool eof) {
  consume(tc, leading_ws(tc));
  const char *s = bs(tc);
  size_t n = tc->buf.len;
  if (n == 0) return false;
  int ic = m3_lit_at(s, n, tc->invoke_close), bc = m3_lit_at(s, n, tc->block_close);
  int p = m3_lit_at(s, n, "<parameter");
  if (ic == 1) {
    consume(tc, strlen(tc->invoke_close));
    end_call(tc);
    return true;
  }
  if (bc == 1) {
    end_call(tc);
    return true;
  }
  if (p == 1) {
    const char *gt = memchr(s, '>', n), *name;
    size_t len;
    if (!gt && !eof && n <= MAX_TAG) return false;
    if (!gt || !header_name(s, (size_t)(gt - s), &name, &len)) {
      end_call(tc);
      return true;
    }
    begin_param(tc, name, len);
    consume(tc, (size_t)(gt - s) + 1);
    tc->state = VALUE_TEXT;
    if (tc->streaming) {
      param_key(tc);
      args(tc, "\"");
    }
    return true;
  }
  if (!eof && (ic == 0 || bc == 0 || p == 0)) return false;
  end_call(tc);
  return true;
}

static bool value_start_state(m3_toolcall *tc, bool eof) {
  const char *s = bs(tc);
  size_t n = tc->buf.len;
  int open = m3_lit_at(s, n, NS "<"), closer = m3_lit_at(s, n, NS "</");
  if (!eof && (open == 0 || closer == 0)) return false;
  if (open == 1 && closer != 1) {
    tc->state = VALUE_NESTED;
    tc->scan = 0;
    tc->depth = 0;
    return true;
  }
  tc->state = VALUE_TEXT;
  if (tc->streaming) {
    param_key(tc);
    args(tc, "\"");
  }
  return true;
}

static bool value_text_state(m3_toolcall *tc, bool eof) {
  const char *s = bs(tc);
  size_t n = tc->buf.len;
  if (tc->m2) {
    static const char *const ends[] = {"</parameter>", "</invoke>", "</minimax:tool_call>"};
    const char *at = NULL;
    int which = -1;
    size_t safe = n;
    for (int k = 0; k < 3; k++) {
      const char *a = m3_find(s, n, ends[k]);
      if (a && (!at || a < at)) at = a, which = k;
      size_t sl = m3_safe_len(s, n, ends[k]);
      if (sl < safe) safe = sl;
    }
    size_t take = at ? (size_t)(at - s) : eof ? n : safe;
    value_chunk(tc, s, take);
    consume(tc, take + (which == 0 ? strlen(ends[0]) : 0));
    if (at || eof) finish_value(tc);
    return at != NULL;
  }
  const char *at = m3_find(s, n, NS);
  size_t take = at ? (size_t)(at - s) : eof ? n : m3_safe_len(s, n, NS);
  value_chunk(tc, s, take);
  consume(tc, take);
  if (!at) {
    if (eof) finish_value(tc);
    return false;
  }
  /* The value ends at the first namespace token: its own closer, or whatever tag comes. The
   * name is generated bytes and may hold NUL, so the closer is matched by its length. */
  m3_sbuf close = {0};
  m3_sbuf_puts(&close, NS "</");
  m3_sbuf_put(&close, tc->pname.data, tc->pname.len);
  m3_sbuf_putc(&close, '>');
  int c = m3_bytes_at(bs(tc), tc->buf.len, close.data, close.len);
  m3_sbuf_free(&close);
  if (c == 0 && !eof) return false;
  if (c == 1) consume(tc, NS_LEN + 3 + tc->pname.len);
  finish_value(tc);
  return true;
}

/* Element body: scans namespace tags, counting depth, until a closer at depth 0. */
static bool value_nested_state(m3_toolcall *tc, bool eof) {
  for (;;) {
    const char *s = bs(tc);
    size_t n = tc->buf.len, end, skip = 0;
    const char *at = m3_find(s + tc->scan, n - tc->scan, NS);
    const char *gt = at ? memchr(at + NS_LEN, '>', (size_t)(s + n - at - NS_LEN)) : NULL;
    if (!at || !gt) {
      if (!eof) {
        /* Only bytes after `scan` may start a token: a tail that looks like one but lies
         * before it ended a tag already counted (its '>' was inside a namespace token). */
        tc->scan = at ? (size_t)(at - s) : tc->scan + m3_safe_len(s + tc->scan, n - tc->scan, NS);
        return false;
      }
      end = at ? (size_t)(at - s) : n;
    } else if (at[NS_LEN] != '<') {
      tc->scan = (size_t)(at - s) + NS_LEN;
      continue;
    } else {
      tc->scan = (size_t)(gt - s) + 1;
      if (at[NS_LEN + 1] != '/') {
        tc->depth++;
        continue;
      }
      if (tc->depth-- > 0) continue;
      /* A closer at depth 0 ends the value: its own (consumed) or the invoke's/block's. */
      const char *tag = at + NS_LEN + 2;
      size_t tl = (size_t)(gt - tag);
      end = (size_t)(at - s);
      if (tl == tc->pname.len && memcmp(tag, tc->pname.data, tl) == 0) skip = (size_t)(gt - at) + 1;
    }
    emit_value(tc, m3_arg_from_elements(s, end, NS, tc->pschema));
    consume(tc, end + skip);
    tc->state = PARAMS;
    return true;
  }
}

/* Text right after an invoke header or a parameter, with no opener: a value whose name only its
 * closing tag tells. */
static bool elided_state(m3_toolcall *tc, bool eof) {
  const char *s = bs(tc);
  size_t n = tc->buf.len;
  const char *at = m3_find(s, n, NS);
  if (!at) {
    if (!eof) return false;
    consume(tc, n);
    tc->state = PARAMS;
    return true;
  }
  size_t rest = (size_t)(s + n - at);
  int closer = m3_lit_at(at, rest, NS "</");
  const char *gt = closer == 1 ? memchr(at + NS_LEN + 2, '>', rest - NS_LEN - 2) : NULL;
  if (!eof && (closer == 0 || (closer == 1 && !gt && rest <= MAX_TAG))) return false;
  const char *name = at + NS_LEN + 2;
  size_t len = gt ? (size_t)(gt - name) : 0;
  bool structural = (len == 6 && memcmp(name, "invoke", 6) == 0) ||
                    (len == 9 && memcmp(name, "tool_call", 9) == 0);
  if (!gt || len == 0 || structural) {
    consume(tc, (size_t)(at - s)); /* nothing names the text: drop it */
    tc->state = PARAMS;
    return true;
  }
  begin_param(tc, name, len);
  emit_value(tc, m3_arg_from_text(s, (size_t)(at - s), tc->pschema));
  consume(tc, (size_t)(gt - s) + 1);
  tc->state = PARAMS;
  return true;
}

/* An invoke without a name: everything up to its closer (or the block's) is dropped. */
static bool skip_invoke_state(m3_toolcall *tc, bool eof) {
  const char *s = bs(tc);
  size_t n = tc->buf.len;
  const char *ic = m3_find(s, n, tc->invoke_close), *bc = m3_find(s, n, tc->block_close);
  if (ic && (!bc || ic < bc)) {
    consume(tc, (size_t)(ic - s) + strlen(tc->invoke_close));
  } else if (bc) {
    consume(tc, (size_t)(bc - s));
  } else {
    size_t a = m3_safe_len(s, n, tc->invoke_close), b = m3_safe_len(s, n, tc->block_close);
    consume(tc, eof ? n : a < b ? a : b);
    if (!eof) return false;
  }
  tc->state = BLOCK;
  return true;
}

static void run(m3_toolcall *tc, bool eof) {
  for (bool more = true; more;) {
    switch (tc->state) {
      case TEXT: more = text_state(tc, eof); break;
      case BLOCK: more = block_state(tc, eof); break;
      case HEADER: more = header_state(tc, eof); break;
      case PARAMS: more = tc->m2 ? params_state_m2(tc, eof) : params_state_m3(tc, eof); break;
      case VALUE_START: more = value_start_state(tc, eof); break;
      case VALUE_TEXT: more = value_text_state(tc, eof); break;
      case VALUE_NESTED: more = value_nested_state(tc, eof); break;
      case ELIDED: more = elided_state(tc, eof); break;
      default: more = skip_invoke_state(tc, eof); break;
    }
  }
}

m3_status m3_toolcall_new(m3_chat_format format, const cJSON *tools, const char *id_prefix,
                          m3_out_fn fn, void *user, m3_toolcall **out) {
  m3_toolcall *tc = calloc(1, sizeof *tc);
  if (!tc) return m3_fail(M3_ERR_NOMEM, "tool-call parser: out of memory");
  tc->m2 = format == M3_CHAT_FORMAT_M2;
  tc->block_open = tc->m2 ? "<minimax:tool_call>" : NS "<tool_call>";
  tc->block_close = tc->m2 ? "</minimax:tool_call>" : NS "</tool_call>";
  tc->invoke_open = tc->m2 ? "<invoke" : NS "<invoke";
  tc->invoke_close = tc->m2 ? "</invoke>" : NS "</invoke>";
  tc->tools = tools;
  snprintf(tc->id_prefix, sizeof tc->id_prefix, "%s", id_prefix ? id_prefix : "call_");
  tc->fn = fn;
  tc->user = user;
  *out = tc;
  return M3_OK;
}

static m3_status check_memory(m3_toolcall *tc) {
  if (tc->buf.failed || tc->raw.failed || tc->name.failed || tc->pname.failed || tc->value.failed)
    return m3_fail(M3_ERR_NOMEM, "tool-call parser: out of memory");
  return M3_OK;
}

m3_status m3_toolcall_feed(m3_toolcall *tc, const char *text, size_t len) {
  m3_sbuf_put(&tc->buf, text, len);
  m3_status st = check_memory(tc);
  if (st) return st;
  run(tc, false);
  return check_memory(tc);
}

m3_status m3_toolcall_finish(m3_toolcall *tc) {
  run(tc, true);
  switch (tc->state) {
    case TEXT: break;
    case BLOCK:
    case HEADER:
    case SKIP_INVOKE:
      end_block(tc);
      break;
    default: /* output ended inside a call: close it */
      end_call(tc);
      end_block(tc);
  }
  return check_memory(tc);
}

int m3_toolcall_count(const m3_toolcall *tc) { return tc->n_calls; }

void m3_toolcall_free(m3_toolcall *tc) {
  if (!tc) return;
  m3_sbuf_free(&tc->buf);
  m3_sbuf_free(&tc->raw);
  m3_sbuf_free(&tc->name);
  m3_sbuf_free(&tc->pname);
  m3_sbuf_free(&tc->value);
  free(tc);
}
