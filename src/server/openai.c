/* openai.c: /v1/chat/completions and /v1/completions (OpenAI wire format): request fields,
 * response bodies, SSE chunks (one per engine token, vLLM style), and the error shape. */
#include <stdlib.h>
#include <string.h>

#include "server/srv.h"

static const char *sb_str(const m3_sbuf *b) { return b->len ? b->data : ""; }

/* ---- requests -------------------------------------------------------------------------- */

static int parse_thinking(const cJSON *body, srv_request *r, srv_error *e) {
  const cJSON *kw = cJSON_GetObjectItemCaseSensitive(body, "chat_template_kwargs");
  const cJSON *top = cJSON_GetObjectItemCaseSensitive(body, "thinking");
  const char *mode = NULL;
  if (kw && !cJSON_IsNull(kw)) {
    if (!cJSON_IsObject(kw))
      return srv_fail(e, 400, "chat_template_kwargs", "'chat_template_kwargs' must be an object");
    if (srv_get_string(kw, "thinking_mode", &mode, e)) return -1;
    bool enable = false;
    const cJSON *en = cJSON_GetObjectItemCaseSensitive(kw, "enable_thinking");
    if (srv_get_bool(kw, "enable_thinking", &enable, e)) return -1;
    if (!mode && cJSON_IsBool(en)) mode = enable ? "enabled" : "disabled";
  }
  /* The MiniMax API's form: "thinking": {"type": "enabled"|"disabled"|"adaptive"}. */
  if (!mode && top && !cJSON_IsNull(top)) {
    if (!cJSON_IsObject(top) || srv_get_string(top, "type", &mode, e))
      return srv_fail(e, 400, "thinking", "'thinking' must be an object with a string 'type'");
  }
  if (!mode || strcmp(mode, "adaptive") == 0) r->chat.thinking = M3_THINKING_ADAPTIVE;
  else if (strcmp(mode, "enabled") == 0) r->chat.thinking = M3_THINKING_ENABLED;
  else if (strcmp(mode, "disabled") == 0) r->chat.thinking = M3_THINKING_DISABLED;
  else
    return srv_fail(e, 400, "chat_template_kwargs",
                    "thinking mode '%s': expected enabled, disabled or adaptive", mode);
  return 0;
}

static bool has_tool(const cJSON *tools, const char *name) {
  const cJSON *t;
  cJSON_ArrayForEach(t, tools) {
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(t, "function");
    const cJSON *n = cJSON_GetObjectItemCaseSensitive(f, "name");
    if (cJSON_IsString(n) && strcmp(n->valuestring, name) == 0) return true;
  }
  return false;
}

static int parse_tools(const cJSON *body, srv_request *r, srv_error *e) {
  const cJSON *tools = cJSON_GetObjectItemCaseSensitive(body, "tools");
  if (tools && !cJSON_IsNull(tools)) {
    if (!cJSON_IsArray(tools)) return srv_fail(e, 400, "tools", "'tools' must be an array");
    int i = 0;
    const cJSON *t;
    cJSON_ArrayForEach(t, tools) {
      const cJSON *f = cJSON_GetObjectItemCaseSensitive(t, "function");
      const cJSON *n = cJSON_GetObjectItemCaseSensitive(f, "name");
      if (!cJSON_IsObject(f) || !cJSON_IsString(n))
        return srv_fail(e, 400, "tools", "tools[%d] must be {\"type\": \"function\", "
                        "\"function\": {\"name\": ...}}", i);
      i++;
    }
    r->chat.tools = tools;
  }
  const cJSON *choice = cJSON_GetObjectItemCaseSensitive(body, "tool_choice");
  r->chat.tool_choice = SRV_TOOLS_AUTO;
  if (!choice || cJSON_IsNull(choice)) return 0;
  if (cJSON_IsString(choice)) {
    const char *c = choice->valuestring;
    if (strcmp(c, "none") == 0) r->chat.tool_choice = SRV_TOOLS_NONE;
    else if (strcmp(c, "auto") == 0) r->chat.tool_choice = SRV_TOOLS_AUTO;
    else if (strcmp(c, "required") == 0) r->chat.tool_choice = SRV_TOOLS_REQUIRED;
    else return srv_fail(e, 400, "tool_choice", "tool_choice '%s': expected none, auto or required", c);
  } else {
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(choice, "function");
    const cJSON *n = cJSON_GetObjectItemCaseSensitive(f, "name");
    if (!cJSON_IsString(n))
      return srv_fail(e, 400, "tool_choice", "'tool_choice' must be a string or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}");
    r->chat.tool_choice = SRV_TOOLS_NAMED;
    r->chat.tool_name = n->valuestring;
  }
  if (r->chat.tool_choice >= SRV_TOOLS_REQUIRED && !r->chat.tools)
    return srv_fail(e, 400, "tool_choice", "tool_choice requires 'tools'");
  if (r->chat.tool_choice == SRV_TOOLS_NAMED && !has_tool(r->chat.tools, r->chat.tool_name))
    return srv_fail(e, 400, "tool_choice", "tool_choice names '%s', which is not in 'tools'",
                    r->chat.tool_name);
  return 0;
}

static int parse_prompt(const cJSON *body, int vocab, srv_request *r, srv_error *e) {
  const cJSON *p = cJSON_GetObjectItemCaseSensitive(body, "prompt");
  if (cJSON_IsArray(p) && cJSON_GetArraySize(p) == 1 && cJSON_IsString(p->child)) p = p->child;
  if (cJSON_IsString(p)) {
    r->prompt = p;
    return 0;
  }
  if (!cJSON_IsArray(p) || cJSON_GetArraySize(p) == 0)
    return srv_fail(e, 400, "prompt", "'prompt' must be a string or an array of token ids");
  int i = 0;
  const cJSON *t;
  cJSON_ArrayForEach(t, p) {
    /* Range first: converting a double outside int32 to an integer is undefined. */
    if (!cJSON_IsNumber(t) || t->valuedouble < 0 || t->valuedouble >= vocab ||
        t->valuedouble != (double)(int32_t)t->valuedouble)
      return srv_fail(e, 400, "prompt", "prompt[%d] is not a token id in 0..%d (one prompt per "
                      "request)", i, vocab - 1);
    i++;
  }
  r->prompt = p;
  return 0;
}

int srv_openai_parse(const srv_ctx *ctx, srv_endpoint ep, cJSON *body, srv_request *r,
                     srv_error *e) {
  r->endpoint = ep;
  r->body = body;
  m3_sampling_params_init(&r->params);
  r->params.temperature = 1.0f;
  const char *max_key =
      cJSON_GetObjectItemCaseSensitive(body, "max_completion_tokens") ? "max_completion_tokens"
                                                                       : "max_tokens";
  if (srv_parse_common(ctx, r, max_key, false, e)) return -1;
  int n = 1;
  if (srv_get_int(body, "n", 1, ctx->limits.max_n, &n, e)) return -1;
  r->params.n = n;
  if (srv_get_bool(body, "stream", &r->stream, e)) return -1;
  const cJSON *so = cJSON_GetObjectItemCaseSensitive(body, "stream_options");
  if (so && !cJSON_IsNull(so) && !cJSON_IsObject(so))
    return srv_fail(e, 400, "stream_options", "'stream_options' must be an object");
  if (srv_get_bool(so, "include_usage", &r->include_usage, e)) return -1;
  if (srv_get_strings(body, "stop", 16, &r->stop, &r->params.n_stop, e)) return -1;
  r->params.stop = r->stop;
  if (ep == SRV_EP_CHAT) {
    r->params.skip_special_tokens = 0; /* the reasoning and tool-call parsers read the markers */
    r->messages = cJSON_GetObjectItemCaseSensitive(body, "messages");
    if (!cJSON_IsArray(r->messages) || cJSON_GetArraySize(r->messages) == 0)
      return srv_fail(e, 400, "messages", "'messages' must be a non-empty array");
    bool logprobs = false;
    int top = 0;
    if (srv_get_bool(body, "logprobs", &logprobs, e) ||
        srv_get_int(body, "top_logprobs", 0, 20, &top, e))
      return -1;
    r->logprobs = logprobs;
    r->params.logprobs = logprobs;
    r->params.top_logprobs = logprobs ? top : 0;
    return parse_thinking(body, r, e) || parse_tools(body, r, e) || srv_media_collect(ctx, r, e)
               ? -1
               : 0;
  }
  int top = -1;
  bool echo = false;
  if (srv_get_int(body, "logprobs", 0, 20, &top, e) || srv_get_bool(body, "echo", &echo, e))
    return -1;
  if (echo) return srv_fail(e, 400, "echo", "'echo' is not supported");
  const cJSON *suffix = cJSON_GetObjectItemCaseSensitive(body, "suffix");
  if (suffix && !cJSON_IsNull(suffix)) return srv_fail(e, 400, "suffix", "'suffix' is not supported");
  int best_of = n;
  if (srv_get_int(body, "best_of", 1, 1L << 20, &best_of, e)) return -1;
  if (best_of != n) return srv_fail(e, 400, "best_of", "'best_of' other than n is not supported");
  r->logprobs = top;
  r->params.logprobs = top >= 0;
  r->params.top_logprobs = top > 0 ? top : 0;
  return parse_prompt(body, ctx->info.vocab_size, r, e);
}

/* ---- shared pieces --------------------------------------------------------------------- */

cJSON *srv_openai_error(const srv_error *e) {
  const char *type = e->status == 401   ? "authentication_error"
                     : e->status == 429 ? "rate_limit_error"
                     : e->status >= 500 ? "server_error"
                                        : "invalid_request_error";
  cJSON *root = cJSON_CreateObject(), *err = cJSON_AddObjectToObject(root, "error");
  cJSON_AddStringToObject(err, "message", e->message);
  cJSON_AddStringToObject(err, "type", type);
  if (e->param) cJSON_AddStringToObject(err, "param", e->param);
  else cJSON_AddNullToObject(err, "param");
  if (e->code) cJSON_AddStringToObject(err, "code", e->code);
  else cJSON_AddNullToObject(err, "code");
  return root;
}

static cJSON *usage(const srv_job *j) {
  cJSON *u = cJSON_CreateObject();
  cJSON_AddNumberToObject(u, "prompt_tokens", j->prompt_tokens);
  cJSON_AddNumberToObject(u, "completion_tokens", j->completion_tokens);
  cJSON_AddNumberToObject(u, "total_tokens", j->prompt_tokens + j->completion_tokens);
  cJSON *d = cJSON_AddObjectToObject(u, "prompt_tokens_details");
  cJSON_AddNumberToObject(d, "cached_tokens", j->cached_tokens);
  return u;
}

static cJSON *envelope(const srv_job *j, const char *object) {
  cJSON *c = cJSON_CreateObject();
  cJSON_AddStringToObject(c, "id", j->id);
  cJSON_AddStringToObject(c, "object", object);
  cJSON_AddNumberToObject(c, "created", (double)j->created);
  cJSON_AddStringToObject(c, "model", j->ctx->model_name);
  return c;
}

static void add_finish(cJSON *choice, const srv_sample *s) {
  const char *f = srv_openai_finish(s);
  if (f) cJSON_AddStringToObject(choice, "finish_reason", f);
  else cJSON_AddNullToObject(choice, "finish_reason");
}

/* A streamed chunk holding one choice; `usage: null` when the client asked for usage. */
static void send_chunk(srv_job *j, const char *object, cJSON *choice) {
  cJSON *c = envelope(j, object);
  cJSON_AddItemToArray(cJSON_AddArrayToObject(c, "choices"), choice);
  if (j->req->include_usage) cJSON_AddNullToObject(c, "usage");
  srv_sse(&j->sse, NULL, c);
  cJSON_Delete(c);
}

static void send_error(srv_job *j, const srv_sample *s) {
  srv_error e;
  srv_fail(&e, 500, NULL, "%s", s->error ? s->error : "generation failed");
  cJSON *body = srv_openai_error(&e);
  srv_sse(&j->sse, NULL, body);
  cJSON_Delete(body);
}

static void end_stream(srv_job *j, const char *object) {
  if (!j->req->stream) return;
  if (j->req->include_usage) {
    cJSON *c = envelope(j, object);
    cJSON_AddArrayToObject(c, "choices");
    cJSON_AddItemToObject(c, "usage", usage(j));
    srv_sse(&j->sse, NULL, c);
    cJSON_Delete(c);
  }
  m3_sbuf_puts(&j->sse, "data: [DONE]\n\n");
}

/* Token text as a string and as its UTF-8 bytes (chat logprobs carry both). */
static cJSON *token_entry(const srv_job *j, int32_t id, float logprob) {
  char *text = srv_token_text(j, id);
  cJSON *t = cJSON_CreateObject();
  cJSON_AddStringToObject(t, "token", text);
  cJSON_AddNumberToObject(t, "logprob", logprob);
  cJSON *bytes = cJSON_AddArrayToObject(t, "bytes");
  for (const unsigned char *p = (const unsigned char *)text; *p; p++)
    cJSON_AddItemToArray(bytes, cJSON_CreateNumber(*p));
  free(text);
  return t;
}

/* ---- chat completions ------------------------------------------------------------------ */

static void chat_token(srv_job *j, srv_sample *s, int index, const srv_raw *ev) {
  (void)index;
  if (!j->req->logprobs) return;
  if (!s->logprobs) s->logprobs = cJSON_CreateArray();
  cJSON *t = token_entry(j, ev->token, ev->logprob);
  cJSON *tops = cJSON_AddArrayToObject(t, "top_logprobs");
  for (int k = 0; k < ev->n_top; k++)
    cJSON_AddItemToArray(tops, token_entry(j, ev->top_ids[k], ev->top_logprobs[k]));
  cJSON_AddItemToArray(s->logprobs, t);
}

static void chat_out(srv_job *j, srv_sample *s, int index, const m3_out_event *ev) {
  (void)index;
  if (!j->req->stream) return;
  if (ev->kind == M3_OUT_CONTENT) m3_sbuf_put(&s->delta_content, ev->text, ev->len);
  if (ev->kind == M3_OUT_REASONING) m3_sbuf_put(&s->delta_reasoning, ev->text, ev->len);
  if (ev->kind != M3_OUT_TOOL_START && ev->kind != M3_OUT_TOOL_ARGS) return;
  if (!s->delta_calls) s->delta_calls = cJSON_CreateArray();
  cJSON *last = cJSON_GetArrayItem(s->delta_calls, cJSON_GetArraySize(s->delta_calls) - 1);
  cJSON *last_index = cJSON_GetObjectItemCaseSensitive(last, "index");
  if (ev->kind == M3_OUT_TOOL_START || !last || last_index->valueint != ev->index) {
    last = cJSON_CreateObject();
    cJSON_AddNumberToObject(last, "index", ev->index);
    if (ev->kind == M3_OUT_TOOL_START) {
      cJSON_AddStringToObject(last, "id", ev->id);
      cJSON_AddStringToObject(last, "type", "function");
    }
    cJSON *f = cJSON_AddObjectToObject(last, "function");
    if (ev->kind == M3_OUT_TOOL_START) cJSON_AddStringToObject(f, "name", ev->name);
    cJSON_AddStringToObject(f, "arguments", "");
    cJSON_AddItemToArray(s->delta_calls, last);
  }
  if (ev->kind == M3_OUT_TOOL_ARGS) {
    cJSON *args = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(last, "function"), "arguments");
    m3_sbuf joined = {0};
    m3_sbuf_puts(&joined, args->valuestring);
    m3_sbuf_put(&joined, ev->text, ev->len);
    cJSON_SetValuestring(args, sb_str(&joined));
    m3_sbuf_free(&joined);
  }
}

static cJSON *chat_logprobs(const srv_sample *s, int from) {
  if (!s->logprobs) return cJSON_CreateNull();
  cJSON *lp = cJSON_CreateObject(), *content = cJSON_AddArrayToObject(lp, "content");
  for (int i = from; i < cJSON_GetArraySize(s->logprobs); i++)
    cJSON_AddItemToArray(content, cJSON_Duplicate(cJSON_GetArrayItem(s->logprobs, i), 1));
  return lp;
}

/* One chunk with everything this token produced: role on the first, then content, reasoning,
 * tool-call pieces and the token's logprobs. */
static void chat_flush(srv_job *j, srv_sample *s, int index) {
  if (!j->req->stream) return;
  int n_lp = s->logprobs ? cJSON_GetArraySize(s->logprobs) : 0;
  bool any = s->delta_content.len || s->delta_reasoning.len || s->delta_calls || n_lp > s->lp_sent;
  if (!any && s->began) return;
  cJSON *choice = cJSON_CreateObject();
  cJSON_AddNumberToObject(choice, "index", index);
  cJSON *delta = cJSON_AddObjectToObject(choice, "delta");
  if (!s->began) {
    cJSON_AddStringToObject(delta, "role", "assistant");
    if (!s->delta_content.len) cJSON_AddStringToObject(delta, "content", "");
    s->began = true;
  }
  if (s->delta_content.len) cJSON_AddStringToObject(delta, "content", sb_str(&s->delta_content));
  if (s->delta_reasoning.len)
    cJSON_AddStringToObject(delta, "reasoning_content", sb_str(&s->delta_reasoning));
  if (s->delta_calls) cJSON_AddItemToObject(delta, "tool_calls", s->delta_calls);
  s->delta_calls = NULL;
  s->delta_content.len = s->delta_reasoning.len = 0;
  cJSON_AddItemToObject(choice, "logprobs", n_lp > s->lp_sent ? chat_logprobs(s, s->lp_sent)
                                                               : cJSON_CreateNull());
  s->lp_sent = n_lp;
  cJSON_AddNullToObject(choice, "finish_reason");
  send_chunk(j, "chat.completion.chunk", choice);
}

static void chat_finish(srv_job *j, srv_sample *s, int index) {
  if (!j->req->stream || j->cancelled) return;
  if (s->finish == M3_FINISH_ERROR) send_error(j, s);
  cJSON *choice = cJSON_CreateObject();
  cJSON_AddNumberToObject(choice, "index", index);
  cJSON_AddObjectToObject(choice, "delta");
  cJSON_AddNullToObject(choice, "logprobs");
  add_finish(choice, s);
  send_chunk(j, "chat.completion.chunk", choice);
}

static void chat_end(srv_job *j) { end_stream(j, "chat.completion.chunk"); }

static cJSON *chat_response(srv_job *j) {
  cJSON *c = envelope(j, "chat.completion");
  cJSON *choices = cJSON_AddArrayToObject(c, "choices");
  for (int i = 0; i < j->n; i++) {
    const srv_sample *s = &j->samples[i];
    cJSON *choice = cJSON_CreateObject();
    cJSON_AddNumberToObject(choice, "index", i);
    cJSON *msg = cJSON_AddObjectToObject(choice, "message");
    cJSON_AddStringToObject(msg, "role", "assistant");
    const m3_out_result *r = &s->msg;
    if (r->n_calls && !r->content.len) cJSON_AddNullToObject(msg, "content");
    else cJSON_AddStringToObject(msg, "content", sb_str(&r->content));
    if (r->reasoning.len) cJSON_AddStringToObject(msg, "reasoning_content", sb_str(&r->reasoning));
    if (r->n_calls) {
      cJSON *calls = cJSON_AddArrayToObject(msg, "tool_calls");
      for (int k = 0; k < r->n_calls; k++) {
        cJSON *call = cJSON_CreateObject();
        cJSON_AddStringToObject(call, "id", r->calls[k].id);
        cJSON_AddStringToObject(call, "type", "function");
        cJSON *f = cJSON_AddObjectToObject(call, "function");
        cJSON_AddStringToObject(f, "name", sb_str(&r->calls[k].name));
        cJSON_AddStringToObject(f, "arguments", sb_str(&r->calls[k].arguments));
        cJSON_AddItemToArray(calls, call);
      }
    }
    cJSON_AddItemToObject(choice, "logprobs", chat_logprobs(s, 0));
    add_finish(choice, s);
    cJSON_AddItemToArray(choices, choice);
  }
  cJSON_AddItemToObject(c, "usage", usage(j));
  return c;
}

const srv_api_ops srv_openai_chat_ops = {chat_token, chat_out, chat_flush, chat_finish, chat_end,
                                         chat_response};

/* ---- completions ----------------------------------------------------------------------- */

/* Legacy logprobs: parallel arrays tokens / token_logprobs / top_logprobs / text_offset. */
static void completion_token(srv_job *j, srv_sample *s, int index, const srv_raw *ev) {
  (void)index;
  if (j->req->logprobs < 0) return;
  if (!s->logprobs) {
    s->logprobs = cJSON_CreateObject();
    cJSON_AddArrayToObject(s->logprobs, "tokens");
    cJSON_AddArrayToObject(s->logprobs, "token_logprobs");
    cJSON_AddArrayToObject(s->logprobs, "top_logprobs");
    cJSON_AddArrayToObject(s->logprobs, "text_offset");
  }
  char *text = srv_token_text(j, ev->token);
  cJSON_AddItemToArray(cJSON_GetObjectItem(s->logprobs, "tokens"), cJSON_CreateString(text));
  free(text);
  cJSON_AddItemToArray(cJSON_GetObjectItem(s->logprobs, "token_logprobs"),
                       cJSON_CreateNumber(ev->logprob));
  cJSON *tops = cJSON_CreateObject();
  for (int k = 0; k < ev->n_top; k++) {
    char *t = srv_token_text(j, ev->top_ids[k]);
    if (!cJSON_GetObjectItemCaseSensitive(tops, t)) cJSON_AddNumberToObject(tops, t, ev->top_logprobs[k]);
    free(t);
  }
  cJSON_AddItemToArray(cJSON_GetObjectItem(s->logprobs, "top_logprobs"), tops);
  cJSON_AddItemToArray(cJSON_GetObjectItem(s->logprobs, "text_offset"),
                       cJSON_CreateNumber((double)s->text_len));
}

static void completion_out(srv_job *j, srv_sample *s, int index, const m3_out_event *ev) {
  (void)index;
  if (j->req->stream && ev->kind == M3_OUT_CONTENT) m3_sbuf_put(&s->delta_content, ev->text, ev->len);
}

/* The entries from `from` on, in the legacy shape. */
static cJSON *completion_logprobs(const srv_sample *s, int from) {
  if (!s->logprobs) return cJSON_CreateNull();
  cJSON *lp = cJSON_CreateObject();
  for (const cJSON *arr = s->logprobs->child; arr; arr = arr->next) {
    cJSON *part = cJSON_AddArrayToObject(lp, arr->string);
    for (int i = from; i < cJSON_GetArraySize(arr); i++)
      cJSON_AddItemToArray(part, cJSON_Duplicate(cJSON_GetArrayItem(arr, i), 1));
  }
  return lp;
}

static int completion_lp_count(const srv_sample *s) {
  return s->logprobs ? cJSON_GetArraySize(cJSON_GetObjectItem(s->logprobs, "tokens")) : 0;
}

static void completion_flush(srv_job *j, srv_sample *s, int index) {
  if (!j->req->stream) return;
  int n_lp = completion_lp_count(s);
  if (!s->delta_content.len && n_lp == s->lp_sent) return;
  cJSON *choice = cJSON_CreateObject();
  cJSON_AddNumberToObject(choice, "index", index);
  cJSON_AddStringToObject(choice, "text", sb_str(&s->delta_content));
  s->delta_content.len = 0;
  cJSON_AddItemToObject(choice, "logprobs", n_lp > s->lp_sent ? completion_logprobs(s, s->lp_sent)
                                                               : cJSON_CreateNull());
  s->lp_sent = n_lp;
  cJSON_AddNullToObject(choice, "finish_reason");
  send_chunk(j, "text_completion", choice);
}

static void completion_finish(srv_job *j, srv_sample *s, int index) {
  if (!j->req->stream || j->cancelled) return;
  if (s->finish == M3_FINISH_ERROR) send_error(j, s);
  cJSON *choice = cJSON_CreateObject();
  cJSON_AddNumberToObject(choice, "index", index);
  cJSON_AddStringToObject(choice, "text", "");
  cJSON_AddNullToObject(choice, "logprobs");
  add_finish(choice, s);
  send_chunk(j, "text_completion", choice);
}

static void completion_end(srv_job *j) { end_stream(j, "text_completion"); }

static cJSON *completion_response(srv_job *j) {
  cJSON *c = envelope(j, "text_completion");
  cJSON *choices = cJSON_AddArrayToObject(c, "choices");
  for (int i = 0; i < j->n; i++) {
    const srv_sample *s = &j->samples[i];
    cJSON *choice = cJSON_CreateObject();
    cJSON_AddNumberToObject(choice, "index", i);
    cJSON_AddStringToObject(choice, "text", sb_str(&s->msg.content));
    cJSON_AddItemToObject(choice, "logprobs", completion_logprobs(s, 0));
    add_finish(choice, s);
    cJSON_AddItemToArray(choices, choice);
  }
  cJSON_AddItemToObject(c, "usage", usage(j));
  return c;
}

const srv_api_ops srv_openai_completion_ops = {completion_token, completion_out, completion_flush,
                                               completion_finish, completion_end,
                                               completion_response};
