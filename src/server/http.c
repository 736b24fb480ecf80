/* http.c: libmicrohttpd daemon, routing, authentication, limits, SSE and draining (server.h).
 *
 * One thread per connection: a non-streaming request blocks its own thread until the engine
 * finishes it; a streaming one blocks in the response reader until the next tokens come. Both
 * poll the client's socket meanwhile, so a hang-up cancels the request within ~100 ms. */
#include <arpa/inet.h>
#include <microhttpd.h>
#include <netdb.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "server/srv.h"
#include "tok/tokenizer.h"

#define PUMP_MS 100 /* how often a waiting connection checks its client */

struct m3_server {
  struct MHD_Daemon *daemon;
  srv_ctx ctx;
  char *api_key;
  size_t max_body;
  int max_concurrent;
  int port;
  atomic_int in_flight; /* generation requests holding a slot */
  atomic_bool draining;
};

typedef struct {
  m3_server *srv;
  m3_sbuf body;
  bool too_large;
  bool holds_slot;
  srv_request req;
  srv_job *job;
} conn_state;

void m3_server_options_init(m3_server_options *opt) {
  *opt = (m3_server_options){.host = "127.0.0.1",
                             .port = 8000,
                             .max_body = 32u << 20,
                             .max_tokens_limit = 1 << 20,
                             .max_n = 16,
                             .max_concurrent = 1024,
                             /* rtp-llm's area bound (m3_vision_chat_spec.md §2.2) */
                             .max_image_pixels = 12845056,
                             .max_media_per_request = 16};
}

/* ---- responses ------------------------------------------------------------------------- */

static enum MHD_Result respond(struct MHD_Connection *c, m3_server *s, int status,
                               const char *type, char *text) {
  if (!text) return MHD_NO;
  struct MHD_Response *r = MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_FREE);
  if (!r) {
    free(text);
    return MHD_NO;
  }
  MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
  enum MHD_Result ok = MHD_queue_response(c, (unsigned)status, r);
  MHD_destroy_response(r);
  srv_metrics_http(s->ctx.metrics, status);
  return ok;
}

static enum MHD_Result respond_json(struct MHD_Connection *c, m3_server *s, int status, cJSON *body) {
  char *text = cJSON_PrintUnformatted(body);
  cJSON_Delete(body);
  return respond(c, s, status, "application/json", text);
}

static bool is_anthropic(const char *url) { return strcmp(url, "/v1/messages") == 0; }

static enum MHD_Result respond_error(struct MHD_Connection *c, m3_server *s, const char *url,
                                     const srv_error *e) {
  cJSON *body = is_anthropic(url) ? srv_anthropic_error(e) : srv_openai_error(e);
  return respond_json(c, s, e->status, body);
}

static enum MHD_Result fail(struct MHD_Connection *c, m3_server *s, const char *url, int status,
                            const char *msg) {
  srv_error e;
  srv_fail(&e, status, NULL, "%s", msg);
  return respond_error(c, s, url, &e);
}

/* ---- authentication -------------------------------------------------------------------- */

/* Compares in time independent of where the strings differ. */
static bool same_secret(const char *given, const char *key) {
  if (!given) return false;
  size_t n = strlen(key), m = strlen(given);
  unsigned char diff = (unsigned char)(n != m);
  for (size_t i = 0; i < n; i++) diff |= (unsigned char)(key[i] ^ given[i < m ? i : 0]);
  return diff == 0;
}

static bool authorized(m3_server *s, struct MHD_Connection *c) {
  if (!s->api_key) return true;
  const char *bearer = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
  if (bearer && strncmp(bearer, "Bearer ", 7) == 0 && same_secret(bearer + 7, s->api_key))
    return true;
  return same_secret(MHD_lookup_connection_value(c, MHD_HEADER_KIND, "x-api-key"), s->api_key);
}

/* ---- simple endpoints ------------------------------------------------------------------ */

static enum MHD_Result get_models(struct MHD_Connection *c, m3_server *s) {
  cJSON *root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "object", "list");
  cJSON *m = cJSON_CreateObject();
  cJSON_AddStringToObject(m, "id", s->ctx.model_name);
  cJSON_AddStringToObject(m, "object", "model");
  cJSON_AddNumberToObject(m, "created", (double)time(NULL));
  cJSON_AddStringToObject(m, "owned_by", "m3");
  cJSON_AddNumberToObject(m, "max_model_len", s->ctx.info.max_context);
  /* Anthropic's model list reads these. */
  cJSON_AddStringToObject(m, "type", "model");
  cJSON_AddStringToObject(m, "display_name", s->ctx.model_name);
  cJSON_AddStringToObject(m, "created_at", "1970-01-01T00:00:00Z");
  cJSON_AddItemToArray(cJSON_AddArrayToObject(root, "data"), m);
  cJSON_AddBoolToObject(root, "has_more", 0);
  return respond_json(c, s, 200, root);
}

static enum MHD_Result get_metrics(struct MHD_Connection *c, m3_server *s) {
  m3_sbuf out = {0};
  srv_metrics_render(s->ctx.metrics, s->ctx.engine, atomic_load(&s->in_flight), &out);
  if (out.failed) {
    m3_sbuf_free(&out);
    return MHD_NO;
  }
  return respond(c, s, 200, "text/plain; version=0.0.4", out.data ? out.data : strdup(""));
}

/* {"prompt": text | ids} or {"messages": [...], "tools": ..., "chat_template_kwargs": ...}. */
static enum MHD_Result post_tokenize(struct MHD_Connection *c, m3_server *s, const char *url,
                                     cJSON *body) {
  srv_request req = {0};
  srv_error e = {0};
  bool chat = cJSON_GetObjectItemCaseSensitive(body, "messages") != NULL;
  int32_t *ids = NULL;
  int n = 0;
  char *prefix = NULL;
  bool in_reasoning;
  if (srv_openai_parse(&s->ctx, chat ? SRV_EP_CHAT : SRV_EP_COMPLETIONS, body, &req, &e) ||
      srv_prompt_ids(&s->ctx, &req, &ids, &n, &prefix, &in_reasoning, &e)) {
    srv_request_free(&req);
    return respond_error(c, s, url, &e);
  }
  cJSON *root = cJSON_CreateObject();
  cJSON_AddNumberToObject(root, "count", n);
  cJSON_AddNumberToObject(root, "max_model_len", s->ctx.info.max_context);
  cJSON *tokens = cJSON_AddArrayToObject(root, "tokens");
  for (int i = 0; i < n; i++) cJSON_AddItemToArray(tokens, cJSON_CreateNumber(ids[i]));
  free(ids);
  free(prefix);
  srv_request_free(&req);
  return respond_json(c, s, 200, root);
}

static enum MHD_Result post_detokenize(struct MHD_Connection *c, m3_server *s, const char *url,
                                       cJSON *body) {
  int32_t *ids = NULL;
  int n = 0;
  enum MHD_Result ok;
  srv_error e;
  if (srv_parse_token_ids(body, s->ctx.info.vocab_size, &ids, &n, &e)) {
    ok = respond_error(c, s, url, &e);
  } else {
    char *text = NULL;
    size_t len;
    if (m3_detokenize(s->ctx.engine, ids, n, 0, &text, &len) != M3_OK) {
      srv_fail(&e, 400, "tokens", "%s", m3_last_error());
      ok = respond_error(c, s, url, &e);
    } else {
      cJSON *root = cJSON_CreateObject();
      cJSON_AddStringToObject(root, "prompt", text);
      free(text);
      ok = respond_json(c, s, 200, root);
    }
  }
  free(ids);
  cJSON_Delete(body);
  return ok;
}

/* ---- generation ------------------------------------------------------------------------ */

static ssize_t sse_reader(void *cls, uint64_t pos, char *buf, size_t max) {
  (void)pos;
  srv_job *j = ((conn_state *)cls)->job;
  for (;;) {
    if (j->sse.failed) return MHD_CONTENT_READER_END_WITH_ERROR;
    if (j->sse.len) {
      size_t n = j->sse.len < max ? j->sse.len : max;
      memcpy(buf, j->sse.data, n);
      m3_sbuf_consume(&j->sse, n);
      return (ssize_t)n;
    }
    if (j->ended) return MHD_CONTENT_READER_END_OF_STREAM;
    if (srv_job_pump(j, PUMP_MS) < 0) return MHD_CONTENT_READER_END_WITH_ERROR;
  }
}

static enum MHD_Result generate(struct MHD_Connection *c, m3_server *s, conn_state *st,
                                const char *url, srv_endpoint ep, cJSON *body) {
  srv_error e = {0};
  int rc = ep == SRV_EP_MESSAGES ? srv_anthropic_parse(&s->ctx, body, &st->req, &e)
                                 : srv_openai_parse(&s->ctx, ep, body, &st->req, &e);
  if (rc) return respond_error(c, s, url, &e);
  if (atomic_fetch_add(&s->in_flight, 1) >= s->max_concurrent) {
    atomic_fetch_sub(&s->in_flight, 1);
    srv_fail(&e, 429, NULL, "too many concurrent requests (limit %d)", s->max_concurrent);
    return respond_error(c, s, url, &e);
  }
  st->holds_slot = true;
  const union MHD_ConnectionInfo *info = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
  const srv_api_ops *ops = ep == SRV_EP_CHAT          ? &srv_openai_chat_ops
                           : ep == SRV_EP_COMPLETIONS ? &srv_openai_completion_ops
                                                      : &srv_anthropic_ops;
  if (srv_job_start(&s->ctx, &st->req, ops, info ? info->connect_fd : -1, &st->job, &e))
    return respond_error(c, s, url, &e);
  srv_job *j = st->job;
  if (st->req.stream) {
    struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024,
                                                               sse_reader, st, NULL);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    enum MHD_Result ok = MHD_queue_response(c, MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    srv_metrics_http(s->ctx.metrics, 200);
    return ok;
  }
  while (!j->ended)
    if (srv_job_pump(j, PUMP_MS) < 0) return MHD_NO; /* the client left: close, nothing to send */
  const srv_sample *s0 = &j->samples[0];
  if (s0->finish == M3_FINISH_ERROR || s0->finish == M3_FINISH_CANCELLED) {
    srv_fail(&e, s0->finish == M3_FINISH_ERROR ? 500 : 503, NULL, "%s",
             s0->error ? s0->error : "the request was cancelled (server shutting down)");
    return respond_error(c, s, url, &e);
  }
  return respond_json(c, s, 200, j->ops->response(j));
}

/* ---- routing --------------------------------------------------------------------------- */

typedef enum { R_HEALTH, R_METRICS, R_MODELS, R_TOKENIZE, R_DETOKENIZE, R_CHAT, R_COMPLETIONS,
               R_MESSAGES, R_NONE } route_id;

static const struct {
  const char *path, *method;
} routes[] = {{"/health", "GET"},       {"/metrics", "GET"},    {"/v1/models", "GET"},
              {"/tokenize", "POST"},    {"/detokenize", "POST"}, {"/v1/chat/completions", "POST"},
              {"/v1/completions", "POST"}, {"/v1/messages", "POST"}};

static route_id find_route(const char *url) {
  for (int i = 0; i < R_NONE; i++)
    if (strcmp(url, routes[i].path) == 0) return (route_id)i;
  return R_NONE;
}

static enum MHD_Result dispatch(struct MHD_Connection *c, m3_server *s, conn_state *st,
                                const char *url, const char *method) {
  route_id r = find_route(url);
  if (r == R_NONE) return fail(c, s, url, 404, "no such endpoint");
  if (strcmp(method, routes[r].method) != 0) return fail(c, s, url, 405, "method not allowed");
  if (r == R_HEALTH) return respond(c, s, 200, "application/json", strdup("{\"status\":\"ok\"}"));
  if (!authorized(s, c)) return fail(c, s, url, 401, "invalid or missing API key");
  if (atomic_load(&s->draining)) return fail(c, s, url, 503, "the server is shutting down");
  if (r == R_METRICS) return get_metrics(c, s);
  if (r == R_MODELS) return get_models(c, s);
  if (st->too_large) {
    char msg[96];
    snprintf(msg, sizeof msg, "the request body is over the limit of %zu bytes", s->max_body);
    return fail(c, s, url, 413, msg);
  }
  /* JSON text is UTF-8 (RFC 8259 §8.1); other bytes would be echoed into error messages and
   * prompts as text no client can decode. */
  if (!m3_utf8_valid((const uint8_t *)st->body.data, st->body.len))
    return fail(c, s, url, 400, "the request body is not valid UTF-8");
  const char *end = NULL;
  cJSON *body = cJSON_ParseWithLengthOpts(st->body.data ? st->body.data : "", st->body.len, &end, 0);
  if (!cJSON_IsObject(body)) {
    char msg[160];
    if (body) snprintf(msg, sizeof msg, "the request body must be a JSON object");
    else snprintf(msg, sizeof msg, "malformed JSON in the request body at byte %zu",
                  end ? (size_t)(end - (st->body.data ? st->body.data : "")) : (size_t)0);
    cJSON_Delete(body);
    return fail(c, s, url, 400, msg);
  }
  if (r == R_TOKENIZE) return post_tokenize(c, s, url, body);
  if (r == R_DETOKENIZE) return post_detokenize(c, s, url, body);
  srv_endpoint ep = r == R_CHAT ? SRV_EP_CHAT : r == R_COMPLETIONS ? SRV_EP_COMPLETIONS : SRV_EP_MESSAGES;
  return generate(c, s, st, url, ep, body);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls) {
  (void)version;
  m3_server *s = cls;
  conn_state *st = *con_cls;
  if (!st) {
    if (!(st = calloc(1, sizeof *st))) return MHD_NO;
    st->srv = s;
    *con_cls = st;
    /* An announced oversize body is refused before it is read: the reply goes out at once and
     * libmicrohttpd closes the connection instead of reading (up to 2^64 bytes of) the body. */
    const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (cl && strtoull(cl, NULL, 10) > s->max_body) {
      st->too_large = true;
      return dispatch(c, s, st, url, method);
    }
    return MHD_YES;
  }
  if (*upload_size) {
    if (!st->too_large && st->body.len + *upload_size > s->max_body) {
      st->too_large = true;
      m3_sbuf_free(&st->body);
    }
    if (!st->too_large) m3_sbuf_put(&st->body, upload, *upload_size);
    *upload_size = 0;
    return MHD_YES;
  }
  if (st->body.failed) return fail(c, s, url, 500, "out of memory");
  return dispatch(c, s, st, url, method);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
  (void)c, (void)toe;
  m3_server *s = cls;
  conn_state *st = *con_cls;
  if (!st) return;
  srv_job_free(st->job); /* cancels a request whose client went away */
  srv_request_free(&st->req);
  m3_sbuf_free(&st->body);
  if (st->holds_slot) atomic_fetch_sub(&s->in_flight, 1);
  free(st);
  *con_cls = NULL;
}

/* ---- lifecycle ------------------------------------------------------------------------- */

m3_status m3_server_start(m3_engine *e, const m3_server_options *opt, m3_server **out) {
  const char *host = opt->host ? opt->host : "127.0.0.1";
  if (opt->port < 0 || opt->port > 65535) return m3_fail(M3_ERR_ARG, "--port %d: expected 0..65535", opt->port);
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai = NULL;
  char port[16];
  snprintf(port, sizeof port, "%d", opt->port);
  if (getaddrinfo(host, port, &hints, &ai) != 0 || !ai)
    return m3_fail(M3_ERR_ARG, "--host '%s': not an address this machine can bind", host);
  m3_server *s = calloc(1, sizeof *s);
  if (!s) {
    freeaddrinfo(ai);
    return m3_fail(M3_ERR_NOMEM, "server: out of memory");
  }
  s->ctx.engine = e;
  m3_engine_model_info(e, &s->ctx.info);
  s->ctx.model_name = opt->served_model_name ? opt->served_model_name : s->ctx.info.name;
  s->ctx.limits = (srv_limits){.max_tokens = opt->max_tokens_limit, .max_n = opt->max_n,
                               .test_hooks = opt->test_hooks != 0,
                               .max_image_pixels = opt->max_image_pixels,
                               .max_media = opt->max_media_per_request,
                               .fetch_timeout_ms = opt->remote_media_timeout_ms,
                               .fetch_max_bytes = opt->max_body};
  s->ctx.metrics = srv_metrics_new();
  s->api_key = opt->api_key ? strdup(opt->api_key) : NULL;
  s->max_body = opt->max_body;
  s->max_concurrent = opt->max_concurrent;
  unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL |
                   MHD_USE_ITC | (ai->ai_family == AF_INET6 ? MHD_USE_IPv6 : 0);
  /* Every connection is a thread: allow the concurrent generations plus idle keep-alives. */
  unsigned limit = (unsigned)opt->max_concurrent * 2 + 64;
  if (s->ctx.metrics && (!opt->api_key || s->api_key))
    s->daemon = MHD_start_daemon(flags, (uint16_t)opt->port, NULL, NULL, on_request, s,
                                 MHD_OPTION_SOCK_ADDR, ai->ai_addr, MHD_OPTION_NOTIFY_COMPLETED,
                                 on_completed, s, MHD_OPTION_CONNECTION_TIMEOUT, 600u,
                                 MHD_OPTION_CONNECTION_LIMIT, limit, MHD_OPTION_END);
  freeaddrinfo(ai);
  if (!s->daemon) {
    m3_server_free(s);
    return m3_fail(M3_ERR_IO, "cannot listen on %s port %d (in use, or not allowed)", host, opt->port);
  }
  const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->daemon, MHD_DAEMON_INFO_BIND_PORT);
  s->port = di ? di->port : opt->port;
  *out = s;
  return M3_OK;
}

int m3_server_port(const m3_server *s) { return s->port; }

int m3_server_drain(m3_server *s, int grace_ms) {
  atomic_store(&s->draining, true);
  MHD_socket fd = MHD_quiesce_daemon(s->daemon);
  if (fd != MHD_INVALID_SOCKET) close(fd);
  double until = srv_now() + grace_ms / 1000.0;
  while (atomic_load(&s->in_flight) > 0 && srv_now() < until) {
    struct timespec ts = {0, 10 * 1000000L};
    nanosleep(&ts, NULL);
  }
  return atomic_load(&s->in_flight);
}

void m3_server_free(m3_server *s) {
  if (!s) return;
  if (s->daemon) MHD_stop_daemon(s->daemon);
  srv_metrics_free(s->ctx.metrics);
  free(s->api_key);
  free(s);
}
