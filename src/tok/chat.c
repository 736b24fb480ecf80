/* chat.c: conversation -> prompt text, byte-exact with the M3 and M2 chat templates (chat.h). */
#include "tok/chat.h"

#include <stdlib.h>
#include <string.h>

#include "tok/pyjson.h"

#define NS "]<]minimax[>["

static const char M3_IDENTITY[] =
    "Your model version is MiniMax-M3, developed by MiniMax. Knowledge cutoff: January 2026. "
    "Founded in early 2022, MiniMax is a global AI foundation model company committed to "
    "advancing the frontiers of AI towards AGI.";

static const char M3_THINKING_BASE[] =
    "\n\n<thinking_instructions>\n"
    "You have a thinking capability that allows you to reason step by step before responding. "
    "When thinking is enabled, wrap your reasoning in <mm:think></mm:think> tags before your "
    "response. When thinking is disabled, begin your response directly after the </mm:think> "
    "prefix. When thinking is adaptive, decide on your own whether to think for the current "
    "turn.\n";

static const char *const M3_MODE_LINE[] = {
    [M3_THINKING_ADAPTIVE] = "Current thinking mode: adaptive. You are encouraged to think for "
                             "complex decision-making, multi-step reasoning, or when analyzing "
                             "function/tool results.\n",
    [M3_THINKING_ENABLED] = "Current thinking mode: enabled. You MUST think step by step before "
                            "every response, including after receiving function/tool results.\n",
    [M3_THINKING_DISABLED] = "Current thinking mode: disabled. Do not output any thinking "
                             "process.\n",
};

static const char DEFAULT_DEVELOPER[] = "You are a helpful assistant.";

static const char TOOLS_HEAD[] =
    "\n\n# Tools\nYou may call one or more tools to assist with the user query.\n"
    "Here are the tools available in JSONSchema format:\n\n<tools>\n";

static const char M3_TOOLS_TAIL[] =
    "</tools>\n\nTo call tools, wrap all invocations in a single " NS "<tool_call>" NS
    "</tool_call> block. Parameter values containing nested objects or arrays are recursively "
    "expanded into XML elements. Example:\n\n" NS "<tool_call>\n"
    NS "<invoke name=\"tool-name-1\">" NS "<param-1>value-1" NS "</param-1>" NS "<param-2>"
    NS "<item>" NS "<key-a>val-a" NS "</key-a>" NS "<key-b>val-b" NS "</key-b>" NS "</item>"
    NS "</param-2>" NS "</invoke>\n"
    NS "<invoke name=\"tool-name-2\">" NS "<param-1>value-1" NS "</param-1>" NS "</invoke>\n"
    NS "</tool_call>";

static const char M2_TOOLS_TAIL[] =
    "</tools>\n\nWhen making tool calls, use XML format to invoke tools and pass parameters:\n"
    "\n<minimax:tool_call>\n<invoke name=\"tool-name-1\">\n"
    "<parameter name=\"param-key-1\">param-value-1</parameter>\n"
    "<parameter name=\"param-key-2\">param-value-2</parameter>\n...\n</invoke>\n"
    "</minimax:tool_call>";

/* Jinja truthiness of message.content: a non-empty string or a non-empty list. */
static bool has_content(const m3_chat_message *m) {
  return m->n_parts > 0 || (m->content && m->content[0]);
}

/* The templates' visible_text(): text parts concatenated; M3 turns images and videos into their
 * placeholder tokens, M2's macro skips them. */
static void visible_text(m3_sbuf *b, const m3_chat_message *m, bool media) {
  if (m->n_parts == 0) {
    if (m->content) m3_sbuf_puts(b, m->content);
    return;
  }
  for (size_t i = 0; i < m->n_parts; i++) {
    const m3_chat_part *p = &m->parts[i];
    if (p->kind == M3_PART_TEXT) {
      m3_sbuf_puts(b, p->text ? p->text : "");
    } else if (media) {
      m3_sbuf_puts(b, p->kind == M3_PART_IMAGE ? "]<]image[>[" : "]<]video[>[");
    }
  }
}

static void tool_definitions(m3_sbuf *b, const cJSON *tools, const char *tail) {
  m3_sbuf_puts(b, TOOLS_HEAD);
  for (const cJSON *t = tools->child; t; t = t->next) {
    const cJSON *fn = cJSON_GetObjectItemCaseSensitive(t, "function");
    m3_sbuf_puts(b, "<tool>");
    m3_pyjson_dump(b, fn ? fn : t, false);
    m3_sbuf_puts(b, "</tool>\n");
  }
  m3_sbuf_puts(b, tail);
}

/* Python's s.strip('\n') as a [*start, *end) window. */
static void strip_newlines(const char **s, const char **e) {
  while (*s < *e && **s == '\n') (*s)++;
  while (*e > *s && (*e)[-1] == '\n') (*e)--;
}

static const char *last_occurrence(const char *s, const char *e, const char *needle) {
  size_t n = strlen(needle);
  const char *found = NULL;
  for (const char *p = s; p + n <= e; p++)
    if (memcmp(p, needle, n) == 0) found = p;
  return found;
}

/* Both templates: without reasoning_content, reasoning = the text before the first closer (after
 * the last opener in it), content = the text after the last closer; both stripped of newlines.
 * `text` holds the visible content; on return `reasoning` and `content` hold the split. */
static void split_reasoning(const m3_chat_message *m, const char *text, const char *open,
                            const char *close, m3_sbuf *reasoning, m3_sbuf *content) {
  const char *first = strstr(text, close);
  if (m->reasoning || !first) {
    if (m->reasoning) m3_sbuf_puts(reasoning, m->reasoning);
    m3_sbuf_puts(content, text);
    return;
  }
  const char *rs = text, *re = first;
  strip_newlines(&rs, &re);
  const char *op = last_occurrence(rs, re, open);
  if (op) rs = op + strlen(open);
  strip_newlines(&rs, &re);
  m3_sbuf_put(reasoning, rs, (size_t)(re - rs));
  const char *cs = last_occurrence(text, text + strlen(text), close) + strlen(close);
  const char *ce = text + strlen(text);
  strip_newlines(&cs, &ce);
  m3_sbuf_put(content, cs, (size_t)(ce - cs));
}

/* The M3 template's to_xml(): objects and arrays become namespaced elements (null members
 * dropped, null items empty), booleans true/false, numbers as Python prints them. */
static void to_xml(m3_sbuf *b, const cJSON *v) {
  if (cJSON_IsObject(v)) {
    for (const cJSON *c = v->child; c; c = c->next) {
      if (cJSON_IsNull(c)) continue;
      m3_sbuf_puts(b, NS "<");
      m3_sbuf_puts(b, c->string);
      m3_sbuf_putc(b, '>');
      to_xml(b, c);
      m3_sbuf_puts(b, NS "</");
      m3_sbuf_puts(b, c->string);
      m3_sbuf_putc(b, '>');
    }
  } else if (cJSON_IsArray(v)) {
    for (const cJSON *c = v->child; c; c = c->next) {
      m3_sbuf_puts(b, NS "<item>");
      to_xml(b, c);
      m3_sbuf_puts(b, NS "</item>");
    }
  } else if (cJSON_IsString(v)) {
    m3_sbuf_puts(b, v->valuestring);
  } else if (!cJSON_IsNull(v)) {
    m3_pyjson_dump(b, v, false);
  }
}

static m3_status parse_arguments(const m3_chat_tool_call *c, size_t i, cJSON **out) {
  if (!c->name) return m3_fail(M3_ERR_ARG, "messages[%zu]: tool call without a name", i);
  *out = cJSON_Parse(c->arguments ? c->arguments : "{}");
  if (!*out) return m3_fail(M3_ERR_ARG, "messages[%zu]: tool call %s: arguments are not JSON", i, c->name);
  return M3_OK;
}

static m3_status m3_tool_calls(m3_sbuf *b, const m3_chat_message *m, size_t i) {
  m3_sbuf_puts(b, NS "<tool_call>\n");
  for (size_t k = 0; k < m->n_tool_calls; k++) {
    cJSON *args;
    m3_status st = parse_arguments(&m->tool_calls[k], i, &args);
    if (st) return st;
    if (!cJSON_IsObject(args)) {
      cJSON_Delete(args);
      return m3_fail(M3_ERR_ARG, "messages[%zu]: tool call %s: arguments are not a JSON object",
                     i, m->tool_calls[k].name);
    }
    m3_sbuf_puts(b, NS "<invoke name=\"");
    m3_sbuf_puts(b, m->tool_calls[k].name);
    m3_sbuf_puts(b, "\">");
    to_xml(b, args);
    m3_sbuf_puts(b, NS "</invoke>\n");
    cJSON_Delete(args);
  }
  m3_sbuf_puts(b, NS "</tool_call>");
  return M3_OK;
}

static m3_status m2_tool_calls(m3_sbuf *b, const m3_chat_message *m, size_t i) {
  m3_sbuf_puts(b, "\n<minimax:tool_call>\n");
  for (size_t k = 0; k < m->n_tool_calls; k++) {
    cJSON *args;
    m3_status st = parse_arguments(&m->tool_calls[k], i, &args);
    if (st) return st;
    m3_sbuf_puts(b, "<invoke name=\"");
    m3_sbuf_puts(b, m->tool_calls[k].name);
    m3_sbuf_puts(b, "\">\n");
    /* The template skips arguments that are not a mapping, and prints nulls (unlike M3). */
    for (const cJSON *c = cJSON_IsObject(args) ? args->child : NULL; c; c = c->next) {
      m3_sbuf_puts(b, "<parameter name=\"");
      m3_sbuf_puts(b, c->string);
      m3_sbuf_puts(b, "\">");
      if (cJSON_IsString(c)) {
        m3_sbuf_puts(b, c->valuestring);
      } else {
        m3_pyjson_dump(b, c, false);
      }
      m3_sbuf_puts(b, "</parameter>\n");
    }
    m3_sbuf_puts(b, "</invoke>\n");
    cJSON_Delete(args);
  }
  /* The newline after the block is an artefact of the template's layout; it is in the prompt. */
  m3_sbuf_puts(b, "</minimax:tool_call>\n");
  return M3_OK;
}

/* A run of consecutive tool results is one "]~b]tool" turn. M3 wraps each result's whole content
 * in one <response>; M2 wraps each part of a list content in its own, with a newline before the
 * closer. */
static void tool_result(m3_sbuf *b, const m3_chat_message *msgs, size_t n, size_t start, size_t i,
                        bool m3) {
  const m3_chat_message *m = &msgs[i];
  if (i == start || msgs[i - 1].role != M3_ROLE_TOOL) m3_sbuf_puts(b, "]~b]tool");
  if (m3 || m->n_parts == 0) {
    m3_sbuf_puts(b, "\n<response>");
    visible_text(b, m, true);
    m3_sbuf_puts(b, "</response>");
  } else {
    for (size_t k = 0; k < m->n_parts; k++) {
      if (m->parts[k].kind != M3_PART_TEXT) continue;
      m3_sbuf_puts(b, "\n<response>");
      m3_sbuf_puts(b, m->parts[k].text ? m->parts[k].text : "");
      m3_sbuf_puts(b, "\n</response>");
    }
  }
  if (i + 1 == n || msgs[i + 1].role != M3_ROLE_TOOL) m3_sbuf_puts(b, "[e~[\n");
}

static m3_status render_m3(m3_sbuf *b, const m3_chat_message *msgs, size_t n,
                           const m3_chat_options *opt) {
  const m3_chat_message *root = NULL, *dev = NULL;
  size_t start = 0;
  if (n > 0 && msgs[0].role == M3_ROLE_ROOT) root = &msgs[start++];
  if (start < n && (msgs[start].role == M3_ROLE_SYSTEM || msgs[start].role == M3_ROLE_DEVELOPER))
    dev = &msgs[start++];

  m3_sbuf_puts(b, "]~!b[]~b]system\n");
  if (root && has_content(root)) {
    visible_text(b, root, true);
  } else {
    m3_sbuf_puts(b, M3_IDENTITY);
  }
  m3_sbuf_puts(b, M3_THINKING_BASE);
  m3_sbuf_puts(b, M3_MODE_LINE[opt->thinking]);
  m3_sbuf_puts(b, "</thinking_instructions>[e~[\n]~b]developer\n");
  if (dev && has_content(dev)) {
    visible_text(b, dev, true);
  } else {
    m3_sbuf_puts(b, DEFAULT_DEVELOPER);
  }
  if (opt->tools && cJSON_GetArraySize(opt->tools) > 0) tool_definitions(b, opt->tools, M3_TOOLS_TAIL);
  m3_sbuf_puts(b, "[e~[\n");

  bool last_had_calls = false;
  for (size_t i = start; i < n; i++) {
    const m3_chat_message *m = &msgs[i];
    if (m->role == M3_ROLE_ASSISTANT) {
      m3_sbuf text = {0}, reasoning = {0}, content = {0};
      visible_text(&text, m, true);
      split_reasoning(m, text.data ? text.data : "", "<mm:think>", "</mm:think>", &reasoning,
                      &content);
      m3_sbuf_puts(b, "]~b]ai\n");
      if (reasoning.len) {
        m3_sbuf_puts(b, "<mm:think>");
        m3_sbuf_put(b, reasoning.data, reasoning.len);
        m3_sbuf_puts(b, "</mm:think>");
      } else {
        m3_sbuf_puts(b, "</mm:think>");
      }
      if (content.len) m3_sbuf_put(b, content.data, content.len);
      m3_status st = M3_OK;
      if (m->n_tool_calls) st = m3_tool_calls(b, m, i);
      m3_sbuf_free(&text);
      m3_sbuf_free(&reasoning);
      m3_sbuf_free(&content);
      if (st) return st;
      last_had_calls = m->n_tool_calls > 0;
      m3_sbuf_puts(b, "[e~[\n");
    } else if (m->role == M3_ROLE_TOOL) {
      if (!last_had_calls)
        return m3_fail(M3_ERR_ARG, "messages[%zu]: tool result without a preceding assistant tool call", i);
      tool_result(b, msgs, n, start, i, true);
    } else if (m->role == M3_ROLE_USER) {
      m3_sbuf_puts(b, "]~b]user\n");
      visible_text(b, m, true);
      m3_sbuf_puts(b, "[e~[\n");
    }
  }
  if (opt->add_generation_prompt) {
    m3_sbuf_puts(b, "]~b]ai\n");
    if (opt->thinking == M3_THINKING_ENABLED) m3_sbuf_puts(b, "<mm:think>");
    if (opt->thinking == M3_THINKING_DISABLED) m3_sbuf_puts(b, "</mm:think>");
  }
  return M3_OK;
}

static m3_status render_m2(m3_sbuf *b, const m3_chat_message *msgs, size_t n,
                           const m3_chat_options *opt) {
  const m3_chat_message *sys = NULL;
  size_t start = 0, last_user = 0;
  bool any_user = false;
  if (n > 0 && msgs[0].role == M3_ROLE_SYSTEM) sys = &msgs[start++];
  for (size_t i = start; i < n; i++)
    if (msgs[i].role == M3_ROLE_USER) last_user = i, any_user = true;

  m3_sbuf_puts(b, "]~!b[]~b]system\n");
  if (sys && has_content(sys)) {
    visible_text(b, sys, false);
  } else {
    m3_sbuf_puts(b, DEFAULT_DEVELOPER);
  }
  if (opt->tools && cJSON_GetArraySize(opt->tools) > 0) tool_definitions(b, opt->tools, M2_TOOLS_TAIL);
  m3_sbuf_puts(b, "[e~[\n");

  bool last_had_calls = false;
  for (size_t i = start; i < n; i++) {
    const m3_chat_message *m = &msgs[i];
    if (m->role == M3_ROLE_ASSISTANT) {
      m3_sbuf text = {0}, reasoning = {0}, content = {0};
      visible_text(&text, m, false);
      split_reasoning(m, text.data ? text.data : "", "<think>", "</think>", &reasoning, &content);
      m3_sbuf_puts(b, "]~b]ai\n");
      /* Interleaved thinking: only the turns after the last user message keep their reasoning. */
      if (reasoning.len && (!any_user || i > last_user)) {
        m3_sbuf_puts(b, "<think>\n");
        m3_sbuf_put(b, reasoning.data, reasoning.len);
        m3_sbuf_puts(b, "\n</think>\n\n");
      }
      if (content.len) m3_sbuf_put(b, content.data, content.len);
      m3_status st = M3_OK;
      if (m->n_tool_calls) st = m2_tool_calls(b, m, i);
      m3_sbuf_free(&text);
      m3_sbuf_free(&reasoning);
      m3_sbuf_free(&content);
      if (st) return st;
      last_had_calls = m->n_tool_calls > 0;
      m3_sbuf_puts(b, "[e~[\n");
    } else if (m->role == M3_ROLE_TOOL) {
      if (!last_had_calls)
        return m3_fail(M3_ERR_ARG, "messages[%zu]: tool result without a preceding assistant tool call", i);
      tool_result(b, msgs, n, start, i, false);
    } else if (m->role == M3_ROLE_USER) {
      m3_sbuf_puts(b, "]~b]user\n");
      visible_text(b, m, false);
      m3_sbuf_puts(b, "[e~[\n");
    }
  }
  if (opt->add_generation_prompt) m3_sbuf_puts(b, "]~b]ai\n<think>\n");
  return M3_OK;
}

m3_status m3_chat_render(const m3_chat_message *msgs, size_t n, const m3_chat_options *opt,
                         char **out, size_t *out_len) {
  m3_sbuf b = {0};
  m3_status st = opt->format == M3_CHAT_FORMAT_M2 ? render_m2(&b, msgs, n, opt)
                                                  : render_m3(&b, msgs, n, opt);
  if (st == M3_OK && b.failed) st = m3_fail(M3_ERR_NOMEM, "chat render: out of memory");
  if (st) {
    m3_sbuf_free(&b);
    return st;
  }
  if (!b.data) m3_sbuf_put(&b, "", 0);
  *out = b.data;
  if (out_len) *out_len = b.len;
  return M3_OK;
}

bool m3_chat_prompt_opens_reasoning(const m3_chat_options *opt) {
  return opt->format == M3_CHAT_FORMAT_M2 || opt->thinking == M3_THINKING_ENABLED;
}

static m3_status parse_role(const cJSON *m, size_t i, m3_chat_role *role) {
  static const char *const names[] = {
      [M3_ROLE_ROOT] = "root", [M3_ROLE_SYSTEM] = "system", [M3_ROLE_DEVELOPER] = "developer",
      [M3_ROLE_USER] = "user", [M3_ROLE_ASSISTANT] = "assistant", [M3_ROLE_TOOL] = "tool"};
  const char *s = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "role"));
  for (size_t r = 0; s && r < sizeof names / sizeof names[0]; r++)
    if (strcmp(s, names[r]) == 0) {
      *role = (m3_chat_role)r;
      return M3_OK;
    }
  return m3_fail(M3_ERR_FORMAT, "messages[%zu].role: %s is not a known role", i, s ? s : "missing");
}

static m3_status parse_part(const cJSON *p, size_t i, m3_chat_part *out) {
  const char *type = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(p, "type"));
  if (type && strcmp(type, "text") == 0) {
    const char *text = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(p, "text"));
    if (!text) return m3_fail(M3_ERR_FORMAT, "messages[%zu].content: text part without text", i);
    *out = (m3_chat_part){M3_PART_TEXT, text};
  } else if (type && (strcmp(type, "image") == 0 || strcmp(type, "image_url") == 0)) {
    *out = (m3_chat_part){M3_PART_IMAGE, NULL};
  } else if (type && (strcmp(type, "video") == 0 || strcmp(type, "video_url") == 0)) {
    *out = (m3_chat_part){M3_PART_VIDEO, NULL};
  } else {
    return m3_fail(M3_ERR_FORMAT, "messages[%zu].content: part type %s is not supported", i,
                   type ? type : "missing");
  }
  return M3_OK;
}

static m3_status parse_call(const cJSON *c, size_t i, m3_chat_tool_call *out) {
  const cJSON *fn = cJSON_GetObjectItemCaseSensitive(c, "function");
  out->id = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "id"));
  out->name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(fn, "name"));
  out->arguments = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(fn, "arguments"));
  if (!out->name || !out->arguments)
    return m3_fail(M3_ERR_FORMAT, "messages[%zu].tool_calls: function.name and function.arguments (JSON text) are required", i);
  return M3_OK;
}

m3_status m3_chat_from_json(const cJSON *messages, m3_chat *out) {
  *out = (m3_chat){0};
  if (!cJSON_IsArray(messages)) return m3_fail(M3_ERR_FORMAT, "messages: not an array");
  size_t n = (size_t)cJSON_GetArraySize(messages), n_parts = 0, n_calls = 0;
  for (const cJSON *m = messages->child; m; m = m->next) {
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
    if (cJSON_IsArray(content)) n_parts += (size_t)cJSON_GetArraySize(content);
    const cJSON *calls = cJSON_GetObjectItemCaseSensitive(m, "tool_calls");
    if (cJSON_IsArray(calls)) n_calls += (size_t)cJSON_GetArraySize(calls);
  }
  out->msgs = calloc(n ? n : 1, sizeof *out->msgs);
  out->parts = calloc(n_parts ? n_parts : 1, sizeof *out->parts);
  out->calls = calloc(n_calls ? n_calls : 1, sizeof *out->calls);
  if (!out->msgs || !out->parts || !out->calls) {
    m3_chat_free(out);
    return m3_fail(M3_ERR_NOMEM, "messages: out of memory");
  }
  m3_chat_part *part = out->parts;
  m3_chat_tool_call *call = out->calls;
  m3_status st = M3_OK;
  size_t i = 0;
  for (const cJSON *m = messages->child; m && !st; m = m->next, i++) {
    m3_chat_message *msg = &out->msgs[i];
    if ((st = parse_role(m, i, &msg->role))) break;
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
    if (cJSON_IsString(content)) {
      msg->content = content->valuestring;
    } else if (cJSON_IsArray(content)) {
      msg->parts = part;
      for (const cJSON *p = content->child; p && !st; p = p->next) st = parse_part(p, i, part++);
      msg->n_parts = (size_t)(part - msg->parts);
    } else if (content && !cJSON_IsNull(content)) {
      st = m3_fail(M3_ERR_FORMAT, "messages[%zu].content: not a string, list or null", i);
    }
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(m, "reasoning_content");
    if (!r) r = cJSON_GetObjectItemCaseSensitive(m, "reasoning");
    msg->reasoning = cJSON_GetStringValue(r);
    const cJSON *calls = cJSON_GetObjectItemCaseSensitive(m, "tool_calls");
    if (cJSON_IsArray(calls)) {
      msg->tool_calls = call;
      for (const cJSON *c = calls->child; c && !st; c = c->next) st = parse_call(c, i, call++);
      msg->n_tool_calls = (size_t)(call - msg->tool_calls);
    }
    msg->tool_call_id = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "tool_call_id"));
  }
  if (st) {
    m3_chat_free(out);
    return st;
  }
  out->n = n;
  return M3_OK;
}

void m3_chat_free(m3_chat *chat) {
  free(chat->msgs);
  free(chat->parts);
  free(chat->calls);
  *chat = (m3_chat){0};
}
