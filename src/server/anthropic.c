/* anthropic.c: /v1/messages (Anthropic Messages API): the request rewritten into the OpenAI
 * form the chat renderer reads, the response as content blocks (thinking, text, tool_use), and
 * the streaming events in Anthropic's order:
 *   message_start, (content_block_start, content_block_delta*, content_block_stop)*,
 *   message_delta (stop_reason, usage), message_stop. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/srv.h"

enum { BLOCK_THINKING, BLOCK_TEXT, BLOCK_TOOL_USE };

static const char *sb_str(const m3_sbuf *b) { return b->len ? b->data : ""; }

/* ---- requests -------------------------------------------------------------------------- */

/* Text of a string or of an array of {"type": "text", "text": ...} blocks, appended to b. */
static int block_text(const cJSON *v, const char *where, m3_sbuf *b, srv_error *e) {
  if (cJSON_IsString(v)) {
    m3_sbuf_puts(b, v->valuestring);
    return 0;
  }
  if (!cJSON_IsArray(v)) return srv_fail(e, 400, where, "%s must be a string or an array of text blocks", where);
  const cJSON *blk;
  cJSON_ArrayForEach(blk, v) {
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(blk, "type");
    const cJSON *text = cJSON_GetObjectItemCaseSensitive(blk, "text");
    if (!cJSON_IsString(type) || strcmp(type->valuestring, "text") != 0 || !cJSON_IsString(text))
      return srv_fail(e, 400, where, "%s: only text blocks are supported here", where);
    m3_sbuf_puts(b, text->valuestring);
  }
  return 0;
}

static void add_text_message(cJSON *out, const char *role, m3_sbuf *text) {
  cJSON *m = cJSON_CreateObject();
  cJSON_AddStringToObject(m, "role", role);
  cJSON_AddStringToObject(m, "content", sb_str(text));
  cJSON_AddItemToArray(out, m);
  text->len = 0;
}

/* The text gathered so far as a text part (OpenAI form); consumes it. */
static void add_text_part(cJSON *parts, m3_sbuf *text) {
  if (!text->len) return;
  cJSON *p = cJSON_CreateObject();
  cJSON_AddStringToObject(p, "type", "text");
  cJSON_AddStringToObject(p, "text", sb_str(text));
  cJSON_AddItemToArray(parts, p);
  text->len = 0;
}

/* The user message gathered so far: a string, or text and image parts once it holds an image.
 * Consumes both. */
static void add_user_message(cJSON *out, m3_sbuf *text, cJSON **parts) {
  if (!*parts) return add_text_message(out, "user", text);
  add_text_part(*parts, text);
  cJSON *m = cJSON_CreateObject();
  cJSON_AddStringToObject(m, "role", "user");
  cJSON_AddItemToObject(m, "content", *parts);
  cJSON_AddItemToArray(out, m);
  *parts = NULL;
}

/* An image block {"type": "image", "source": {"type": "base64", "media_type", "data"}} into the
 * request's images; a "url" source is refused as OpenAI's remote URLs are. */
static int convert_image(const srv_ctx *ctx, srv_request *r, const cJSON *blk, const char *label,
                         srv_error *e) {
  const cJSON *src = cJSON_GetObjectItemCaseSensitive(blk, "source");
  const cJSON *type = cJSON_GetObjectItemCaseSensitive(src, "type");
  const cJSON *url = cJSON_GetObjectItemCaseSensitive(src, "url");
  const cJSON *media_type = cJSON_GetObjectItemCaseSensitive(src, "media_type");
  const cJSON *data = cJSON_GetObjectItemCaseSensitive(src, "data");
  const char *t = cJSON_IsString(type) ? type->valuestring : "";
  if (strcmp(t, "url") == 0 && cJSON_IsString(url))
    return srv_media_add_url(ctx, r, url->valuestring, label, e);
  if (strcmp(t, "base64") != 0 || !cJSON_IsString(media_type) || !cJSON_IsString(data)) {
    snprintf(e->where, sizeof e->where, "%s", label);
    return srv_fail(e, 400, e->where, "%s: an image block needs a source {\"type\": \"base64\", "
                    "\"media_type\": ..., \"data\": ...}", label);
  }
  return srv_media_add(ctx, r, media_type->valuestring, strlen(media_type->valuestring),
                       data->valuestring, label, e);
}

/* User turn: text and image blocks become one user message (a string when there is no image);
 * each tool_result becomes a tool message, in the order given. */
static int convert_user(const srv_ctx *ctx, srv_request *r, const cJSON *content, int i,
                        cJSON *out, srv_error *e) {
  /* In e: the error's param must outlive this call. */
  char *where = e->where;
  snprintf(where, sizeof e->where, "messages[%d].content", i);
  m3_sbuf text = {0};
  cJSON *parts = NULL; /* non-NULL once the message holds an image */
  int rc = 0;
  bool pending = false;
  int k = 0;
  const cJSON *blk;
  cJSON_ArrayForEach(blk, content) {
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(blk, "type");
    const char *t = cJSON_IsString(type) ? type->valuestring : "";
    char label[64];
    snprintf(label, sizeof label, "messages[%d].content[%d]", i, k++);
    if (strcmp(t, "image") == 0) {
      if ((rc = convert_image(ctx, r, blk, label, e))) break;
      if (!parts) parts = cJSON_CreateArray();
      add_text_part(parts, &text);
      pending = true;
      cJSON *img = cJSON_CreateObject();
      cJSON_AddStringToObject(img, "type", "image");
      cJSON_AddItemToArray(parts, img);
    } else if (strcmp(t, "text") == 0) {
      const cJSON *s = cJSON_GetObjectItemCaseSensitive(blk, "text");
      if (!cJSON_IsString(s)) {
        rc = srv_fail(e, 400, where, "%s: a text block needs a string 'text'", where);
        break;
      }
      m3_sbuf_puts(&text, s->valuestring);
      pending = true;
    } else if (strcmp(t, "tool_result") == 0) {
      if (pending) add_user_message(out, &text, &parts);
      pending = false;
      const cJSON *id = cJSON_GetObjectItemCaseSensitive(blk, "tool_use_id");
      const cJSON *c = cJSON_GetObjectItemCaseSensitive(blk, "content");
      m3_sbuf result = {0};
      if (!cJSON_IsString(id)) rc = srv_fail(e, 400, where, "%s: tool_result needs 'tool_use_id'", where);
      else if (c && block_text(c, where, &result, e)) rc = -1;
      if (rc == 0) {
        cJSON *m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "role", "tool");
        cJSON_AddStringToObject(m, "tool_call_id", id->valuestring);
        cJSON_AddStringToObject(m, "content", sb_str(&result));
        cJSON_AddItemToArray(out, m);
      }
      m3_sbuf_free(&result);
      if (rc) break;
    } else {
      rc = srv_fail(e, 400, where, "%s: block type '%s' is not supported in a user turn", where, t);
      break;
    }
  }
  if (rc == 0 && pending) add_user_message(out, &text, &parts);
  cJSON_Delete(parts);
  m3_sbuf_free(&text);
  return rc;
}

/* Assistant turn: text -> content, thinking -> reasoning_content, tool_use -> tool_calls. */
static int convert_assistant(const cJSON *content, int i, cJSON *out, srv_error *e) {
  /* In e: the error's param must outlive this call. */
  char *where = e->where;
  snprintf(where, sizeof e->where, "messages[%d].content", i);
  m3_sbuf text = {0}, reasoning = {0};
  cJSON *m = cJSON_CreateObject(), *calls = cJSON_CreateArray();
  int rc = 0;
  const cJSON *blk;
  cJSON_ArrayForEach(blk, content) {
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(blk, "type");
    const char *t = cJSON_IsString(type) ? type->valuestring : "";
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(blk, strcmp(t, "thinking") == 0 ? "thinking" : "text");
    if (strcmp(t, "text") == 0 || strcmp(t, "thinking") == 0) {
      if (!cJSON_IsString(s)) {
        rc = srv_fail(e, 400, where, "%s: a %s block needs a string '%s'", where, t, s ? s->string : t);
        break;
      }
      m3_sbuf_puts(t[1] == 'e' ? &text : &reasoning, s->valuestring);
    } else if (strcmp(t, "tool_use") == 0) {
      const cJSON *id = cJSON_GetObjectItemCaseSensitive(blk, "id");
      const cJSON *name = cJSON_GetObjectItemCaseSensitive(blk, "name");
      const cJSON *input = cJSON_GetObjectItemCaseSensitive(blk, "input");
      if (!cJSON_IsString(id) || !cJSON_IsString(name) || !cJSON_IsObject(input)) {
        rc = srv_fail(e, 400, where, "%s: tool_use needs string 'id', 'name' and object 'input'", where);
        break;
      }
      cJSON *call = cJSON_CreateObject();
      cJSON_AddStringToObject(call, "id", id->valuestring);
      cJSON_AddStringToObject(call, "type", "function");
      cJSON *f = cJSON_AddObjectToObject(call, "function");
      cJSON_AddStringToObject(f, "name", name->valuestring);
      char *args = cJSON_PrintUnformatted(input);
      cJSON_AddStringToObject(f, "arguments", args ? args : "{}");
      free(args);
      cJSON_AddItemToArray(calls, call);
    } else if (strcmp(t, "redacted_thinking") != 0) {
      rc = srv_fail(e, 400, where, "%s: block type '%s' is not supported in an assistant turn", where, t);
      break;
    }
  }
  if (rc == 0) {
    cJSON_AddStringToObject(m, "role", "assistant");
    cJSON_AddStringToObject(m, "content", sb_str(&text));
    if (reasoning.len) cJSON_AddStringToObject(m, "reasoning_content", sb_str(&reasoning));
    if (cJSON_GetArraySize(calls)) cJSON_AddItemToObject(m, "tool_calls", calls);
    else cJSON_Delete(calls);
    cJSON_AddItemToArray(out, m);
  } else {
    cJSON_Delete(calls);
    cJSON_Delete(m);
  }
  m3_sbuf_free(&text);
  m3_sbuf_free(&reasoning);
  return rc;
}

static int convert_messages(const srv_ctx *ctx, srv_request *r, const cJSON *body, cJSON *out,
                            srv_error *e) {
  const cJSON *system = cJSON_GetObjectItemCaseSensitive(body, "system");
  if (system && !cJSON_IsNull(system)) {
    m3_sbuf text = {0};
    int rc = block_text(system, "system", &text, e);
    if (rc == 0) add_text_message(out, "system", &text);
    m3_sbuf_free(&text);
    if (rc) return -1;
  }
  const cJSON *messages = cJSON_GetObjectItemCaseSensitive(body, "messages");
  if (!cJSON_IsArray(messages) || cJSON_GetArraySize(messages) == 0)
    return srv_fail(e, 400, "messages", "'messages' must be a non-empty array");
  int i = 0;
  const cJSON *m;
  cJSON_ArrayForEach(m, messages) {
    const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
    bool user = cJSON_IsString(role) && strcmp(role->valuestring, "user") == 0;
    bool assistant = cJSON_IsString(role) && strcmp(role->valuestring, "assistant") == 0;
    if (!user && !assistant)
      return srv_fail(e, 400, "messages", "messages[%d].role must be 'user' or 'assistant'", i);
    if (cJSON_IsString(content)) {
      cJSON *copy = cJSON_CreateObject();
      cJSON_AddStringToObject(copy, "role", role->valuestring);
      cJSON_AddStringToObject(copy, "content", content->valuestring);
      cJSON_AddItemToArray(out, copy);
    } else if (!cJSON_IsArray(content)) {
      return srv_fail(e, 400, "messages", "messages[%d].content must be a string or an array", i);
    } else if (user ? convert_user(ctx, r, content, i, out, e)
                    : convert_assistant(content, i, out, e)) {
      return -1;
    }
    i++;
  }
  return 0;
}

static int convert_tools(const cJSON *body, cJSON *out, srv_request *r, srv_error *e) {
  const cJSON *tools = cJSON_GetObjectItemCaseSensitive(body, "tools");
  if (tools && !cJSON_IsNull(tools)) {
    if (!cJSON_IsArray(tools)) return srv_fail(e, 400, "tools", "'tools' must be an array");
    int i = 0;
    const cJSON *t;
    cJSON_ArrayForEach(t, tools) {
      const cJSON *name = cJSON_GetObjectItemCaseSensitive(t, "name");
      const cJSON *desc = cJSON_GetObjectItemCaseSensitive(t, "description");
      const cJSON *schema = cJSON_GetObjectItemCaseSensitive(t, "input_schema");
      if (!cJSON_IsString(name) || !cJSON_IsObject(schema))
        return srv_fail(e, 400, "tools", "tools[%d] needs a string 'name' and an object 'input_schema'", i);
      cJSON *tool = cJSON_CreateObject();
      cJSON_AddStringToObject(tool, "type", "function");
      cJSON *f = cJSON_AddObjectToObject(tool, "function");
      cJSON_AddStringToObject(f, "name", name->valuestring);
      if (cJSON_IsString(desc)) cJSON_AddStringToObject(f, "description", desc->valuestring);
      cJSON_AddItemToObject(f, "parameters", cJSON_Duplicate(schema, 1));
      cJSON_AddItemToArray(out, tool);
      i++;
    }
    if (i) r->chat.tools = out;
  }
  const cJSON *choice = cJSON_GetObjectItemCaseSensitive(body, "tool_choice");
  r->chat.tool_choice = SRV_TOOLS_AUTO;
  if (!choice || cJSON_IsNull(choice)) return 0;
  const cJSON *type = cJSON_GetObjectItemCaseSensitive(choice, "type");
  const char *t = cJSON_IsString(type) ? type->valuestring : "";
  if (strcmp(t, "auto") == 0) r->chat.tool_choice = SRV_TOOLS_AUTO;
  else if (strcmp(t, "none") == 0) r->chat.tool_choice = SRV_TOOLS_NONE;
  else if (strcmp(t, "any") == 0) r->chat.tool_choice = SRV_TOOLS_REQUIRED;
  else if (strcmp(t, "tool") == 0) {
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(choice, "name");
    if (!cJSON_IsString(name)) return srv_fail(e, 400, "tool_choice", "tool_choice of type 'tool' needs a 'name'");
    r->chat.tool_choice = SRV_TOOLS_NAMED;
    r->chat.tool_name = name->valuestring;
    bool found = false;
    const cJSON *tool;
    cJSON_ArrayForEach(tool, out) {
      const cJSON *n = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(tool, "function"), "name");
      found |= strcmp(n->valuestring, name->valuestring) == 0;
    }
    if (!found) return srv_fail(e, 400, "tool_choice", "tool_choice names '%s', which is not in 'tools'", name->valuestring);
  } else {
    return srv_fail(e, 400, "tool_choice", "tool_choice.type must be auto, any, tool or none");
  }
  if (r->chat.tool_choice >= SRV_TOOLS_REQUIRED && !r->chat.tools)
    return srv_fail(e, 400, "tool_choice", "tool_choice requires 'tools'");
  return 0;
}

static int parse_thinking(const cJSON *body, srv_request *r, srv_error *e) {
  const cJSON *th = cJSON_GetObjectItemCaseSensitive(body, "thinking");
  r->chat.thinking = M3_THINKING_ADAPTIVE;
  if (!th || cJSON_IsNull(th)) return 0;
  const cJSON *type = cJSON_GetObjectItemCaseSensitive(th, "type");
  const char *t = cJSON_IsString(type) ? type->valuestring : "";
  if (strcmp(t, "enabled") == 0) r->chat.thinking = M3_THINKING_ENABLED;
  else if (strcmp(t, "disabled") == 0) r->chat.thinking = M3_THINKING_DISABLED;
  else if (strcmp(t, "adaptive") != 0)
    return srv_fail(e, 400, "thinking", "thinking.type must be enabled, disabled or adaptive");
  return 0;
}

int srv_anthropic_parse(const srv_ctx *ctx, cJSON *body, srv_request *r, srv_error *e) {
  r->endpoint = SRV_EP_MESSAGES;
  r->body = body;
  m3_sampling_params_init(&r->params);
  r->params.temperature = 1.0f;
  r->params.skip_special_tokens = 0; /* the reasoning and tool-call parsers read the markers */
  if (!cJSON_IsObject(body)) return srv_fail(e, 400, NULL, "the request body must be a JSON object");
  if (srv_parse_common(ctx, r, "max_tokens", true, e)) return -1;
  if (srv_get_bool(body, "stream", &r->stream, e)) return -1;
  if (srv_get_strings(body, "stop_sequences", 16, &r->stop, &r->params.n_stop, e)) return -1;
  r->params.stop = r->stop;
  r->logprobs = -1;
  r->converted = cJSON_CreateObject();
  cJSON *messages = cJSON_AddArrayToObject(r->converted, "messages");
  cJSON *tools = cJSON_AddArrayToObject(r->converted, "tools");
  if (!messages || !tools) return srv_fail(e, 500, NULL, "out of memory");
  r->messages = messages;
  if (convert_messages(ctx, r, body, messages, e) || convert_tools(body, tools, r, e)) return -1;
  return parse_thinking(body, r, e);
}

/* ---- responses ------------------------------------------------------------------------- */

cJSON *srv_anthropic_error(const srv_error *e) {
  const char *type = e->status == 401   ? "authentication_error"
                     : e->status == 403 ? "permission_error"
                     : e->status == 404 ? "not_found_error"
                     : e->status == 413 ? "request_too_large"
                     : e->status == 429 ? "rate_limit_error"
                     : e->status == 503 ? "overloaded_error"
                     : e->status >= 500 ? "api_error"
                                        : "invalid_request_error";
  cJSON *root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "type", "error");
  cJSON *err = cJSON_AddObjectToObject(root, "error");
  cJSON_AddStringToObject(err, "type", type);
  cJSON_AddStringToObject(err, "message", e->message);
  return root;
}

static const char *stop_reason(const srv_sample *s) {
  if (s->finish == M3_FINISH_LENGTH) return "max_tokens";
  if (s->msg.n_calls > 0) return "tool_use";
  if (s->stop_hit) return "stop_sequence";
  return "end_turn";
}

static void add_stop(cJSON *o, const srv_sample *s) {
  cJSON_AddStringToObject(o, "stop_reason", stop_reason(s));
  if (s->stop_hit) cJSON_AddStringToObject(o, "stop_sequence", s->stop_hit);
  else cJSON_AddNullToObject(o, "stop_sequence");
}

static cJSON *usage(const srv_job *j) {
  cJSON *u = cJSON_CreateObject();
  cJSON_AddNumberToObject(u, "input_tokens", j->prompt_tokens);
  cJSON_AddNumberToObject(u, "output_tokens", j->completion_tokens);
  cJSON_AddNumberToObject(u, "cache_read_input_tokens", j->cached_tokens);
  return u;
}

/* An event's data object; "type" repeats the event name, as Anthropic sends it. */
static cJSON *ev_new(const char *type) {
  cJSON *d = cJSON_CreateObject();
  cJSON_AddStringToObject(d, "type", type);
  return d;
}

static void ev_send(srv_job *j, cJSON *d) {
  srv_sse(&j->sse, cJSON_GetObjectItem(d, "type")->valuestring, d);
  cJSON_Delete(d);
}

static void begin(srv_job *j, srv_sample *s) {
  if (s->began) return;
  s->began = true;
  cJSON *d = ev_new("message_start"), *m = cJSON_AddObjectToObject(d, "message");
  cJSON_AddStringToObject(m, "id", j->id);
  cJSON_AddStringToObject(m, "type", "message");
  cJSON_AddStringToObject(m, "role", "assistant");
  cJSON_AddStringToObject(m, "model", j->ctx->model_name);
  cJSON_AddArrayToObject(m, "content");
  cJSON_AddNullToObject(m, "stop_reason");
  cJSON_AddNullToObject(m, "stop_sequence");
  cJSON *u = cJSON_AddObjectToObject(m, "usage");
  cJSON_AddNumberToObject(u, "input_tokens", j->prompt_tokens);
  cJSON_AddNumberToObject(u, "output_tokens", 0);
  ev_send(j, d);
}

static void close_block(srv_job *j, srv_sample *s) {
  if (s->block_kind < 0) return;
  cJSON *d = ev_new("content_block_stop");
  cJSON_AddNumberToObject(d, "index", s->block);
  ev_send(j, d);
  s->block_kind = -1;
}

static void open_block(srv_job *j, srv_sample *s, int kind, const m3_out_event *ev) {
  close_block(j, s);
  s->block++;
  s->block_kind = kind;
  cJSON *d = ev_new("content_block_start"), *b = cJSON_CreateObject();
  cJSON_AddNumberToObject(d, "index", s->block);
  if (kind == BLOCK_THINKING) {
    cJSON_AddStringToObject(b, "type", "thinking");
    cJSON_AddStringToObject(b, "thinking", "");
    cJSON_AddStringToObject(b, "signature", "");
  } else if (kind == BLOCK_TEXT) {
    cJSON_AddStringToObject(b, "type", "text");
    cJSON_AddStringToObject(b, "text", "");
  } else {
    cJSON_AddStringToObject(b, "type", "tool_use");
    cJSON_AddStringToObject(b, "id", ev->id);
    cJSON_AddStringToObject(b, "name", ev->name);
    cJSON_AddObjectToObject(b, "input");
  }
  cJSON_AddItemToObject(d, "content_block", b);
  ev_send(j, d);
}

static void delta(srv_job *j, srv_sample *s, const char *type, const char *key,
                  const m3_out_event *ev) {
  m3_sbuf text = {0};
  m3_sbuf_put(&text, ev->text, ev->len);
  cJSON *d = ev_new("content_block_delta"), *dl = cJSON_CreateObject();
  cJSON_AddNumberToObject(d, "index", s->block);
  cJSON_AddStringToObject(dl, "type", type);
  cJSON_AddStringToObject(dl, key, sb_str(&text));
  cJSON_AddItemToObject(d, "delta", dl);
  ev_send(j, d);
  m3_sbuf_free(&text);
}

static void messages_token(srv_job *j, srv_sample *s, int index, const srv_raw *ev) {
  (void)j, (void)s, (void)index, (void)ev;
}

static void messages_out(srv_job *j, srv_sample *s, int index, const m3_out_event *ev) {
  (void)index;
  if (!j->req->stream) return;
  begin(j, s);
  switch (ev->kind) {
    case M3_OUT_REASONING:
      if (s->block_kind != BLOCK_THINKING) open_block(j, s, BLOCK_THINKING, ev);
      delta(j, s, "thinking_delta", "thinking", ev);
      break;
    case M3_OUT_CONTENT:
      if (s->block_kind != BLOCK_TEXT) open_block(j, s, BLOCK_TEXT, ev);
      delta(j, s, "text_delta", "text", ev);
      break;
    case M3_OUT_TOOL_START: open_block(j, s, BLOCK_TOOL_USE, ev); break;
    case M3_OUT_TOOL_ARGS:
      if (s->block_kind == BLOCK_TOOL_USE) delta(j, s, "input_json_delta", "partial_json", ev);
      break;
    case M3_OUT_TOOL_END: close_block(j, s); break;
  }
}

static void messages_flush(srv_job *j, srv_sample *s, int index) {
  (void)index;
  if (j->req->stream) begin(j, s);
}

static void messages_finish(srv_job *j, srv_sample *s, int index) {
  (void)index;
  if (!j->req->stream || j->cancelled) return;
  close_block(j, s);
  /* A turn cut short has no stop_reason: an error event ends the stream, of the type the
   * non-streamed request would get (500; 503 when the server cancelled it as it shut down). */
  srv_error e;
  if (s->finish == M3_FINISH_ERROR)
    srv_fail(&e, 500, NULL, "%s", s->error ? s->error : "generation failed");
  else if (s->finish == M3_FINISH_CANCELLED)
    srv_fail(&e, 503, NULL, "the request was cancelled (server shutting down)");
  else return;
  ev_send(j, srv_anthropic_error(&e));
}

static void messages_end(srv_job *j) {
  const srv_sample *s = &j->samples[0];
  if (!j->req->stream || s->finish == M3_FINISH_ERROR || s->finish == M3_FINISH_CANCELLED) return;
  cJSON *d = ev_new("message_delta"), *dl = cJSON_AddObjectToObject(d, "delta");
  add_stop(dl, s);
  cJSON *u = cJSON_AddObjectToObject(d, "usage");
  cJSON_AddNumberToObject(u, "input_tokens", j->prompt_tokens);
  cJSON_AddNumberToObject(u, "output_tokens", j->completion_tokens);
  ev_send(j, d);
  ev_send(j, ev_new("message_stop"));
}

static cJSON *messages_response(srv_job *j) {
  const srv_sample *s = &j->samples[0];
  const m3_out_result *r = &s->msg;
  cJSON *m = cJSON_CreateObject();
  cJSON_AddStringToObject(m, "id", j->id);
  cJSON_AddStringToObject(m, "type", "message");
  cJSON_AddStringToObject(m, "role", "assistant");
  cJSON_AddStringToObject(m, "model", j->ctx->model_name);
  cJSON *content = cJSON_AddArrayToObject(m, "content");
  if (r->reasoning.len) {
    cJSON *b = cJSON_CreateObject();
    cJSON_AddStringToObject(b, "type", "thinking");
    cJSON_AddStringToObject(b, "thinking", sb_str(&r->reasoning));
    cJSON_AddStringToObject(b, "signature", "");
    cJSON_AddItemToArray(content, b);
  }
  if (r->content.len || (!r->reasoning.len && !r->n_calls)) {
    cJSON *b = cJSON_CreateObject();
    cJSON_AddStringToObject(b, "type", "text");
    cJSON_AddStringToObject(b, "text", sb_str(&r->content));
    cJSON_AddItemToArray(content, b);
  }
  for (int k = 0; k < r->n_calls; k++) {
    cJSON *b = cJSON_CreateObject();
    cJSON_AddStringToObject(b, "type", "tool_use");
    cJSON_AddStringToObject(b, "id", r->calls[k].id);
    cJSON_AddStringToObject(b, "name", sb_str(&r->calls[k].name));
    cJSON *input = cJSON_Parse(sb_str(&r->calls[k].arguments));
    cJSON_AddItemToObject(b, "input", cJSON_IsObject(input) ? input : cJSON_CreateObject());
    if (!cJSON_IsObject(input)) cJSON_Delete(input);
    cJSON_AddItemToArray(content, b);
  }
  add_stop(m, s);
  cJSON_AddItemToObject(m, "usage", usage(j));
  return m;
}

const srv_api_ops srv_anthropic_ops = {messages_token, messages_out, messages_flush,
                                       messages_finish, messages_end, messages_response};
