/* server.h: the HTTP API (OpenAI- and Anthropic-compatible) over a running m3_engine.
 *
 * Endpoints: POST /v1/chat/completions, /v1/completions, /v1/messages, /tokenize, /detokenize;
 * GET /v1/models, /health, /metrics. One thread per connection (libmicrohttpd); generation runs
 * on the engine's own loop thread, which hands tokens to the connection threads. */
#ifndef M3_SERVER_SERVER_H
#define M3_SERVER_SERVER_H

#include <stddef.h>

#include "m3.h"

typedef struct {
  const char *host;              /* address to bind; NULL = 127.0.0.1 */
  int port;                      /* 0 = any free port (see m3_server_port) */
  const char *api_key;           /* NULL = no authentication */
  size_t max_body;               /* request bodies above this get 413 */
  int max_tokens_limit;          /* max_tokens above this get 400 */
  int max_n;                     /* n above this gets 400 */
  int max_concurrent;            /* generation requests in flight above this get 429 */
  const char *served_model_name; /* NULL = the engine's model name */
  int test_hooks;                /* 1: honour the m3_test_forced_text request field */
  long long max_image_pixels;    /* larger images (decoded width x height) get 400 */
  int max_media_per_request;     /* more images in one request get 400 */
  int remote_media_timeout_ms;   /* 0: http(s) image URLs get 400; else they are fetched, each
                                    within this time and max_body bytes */
} m3_server_options;

void m3_server_options_init(m3_server_options *opt);

typedef struct m3_server m3_server;

/* Starts listening. The engine must already run its loop (m3_engine_start) and outlive the
 * server. */
m3_status m3_server_start(m3_engine *e, const m3_server_options *opt, m3_server **out);
/* The bound port (the chosen one when options.port was 0). */
int m3_server_port(const m3_server *s);
/* Stops accepting connections and new requests, then waits up to grace_ms for the requests in
 * flight. Returns the number still running (the caller then stops the engine, which cancels
 * them, before m3_server_free). */
int m3_server_drain(m3_server *s, int grace_ms);
/* Closes every connection and frees the server. */
void m3_server_free(m3_server *s);

#endif
