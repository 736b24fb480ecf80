/* srv.h: what the server's files share: the parsed request, the generation job that turns
 * engine tokens into API events, the two API formatters, metrics and JSON field readers.
 *
 * Data flow of one generation request:
 *   http.c   body -> cJSON -> openai.c / anthropic.c parse -> srv_request
 *   gen.c    prompt (prompt.c) -> tokens -> m3_submit; the engine thread queues raw token
 *            events; the connection thread drains them through the output parser into
 *            per-sample content / reasoning / tool calls and the API's stream hooks (SSE)
 *   openai.c / anthropic.c  the final JSON body, or SSE chunks as events arrive */
#ifndef M3_SERVER_SRV_H
#define M3_SERVER_SRV_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "m3.h"
#include "server/server.h"
#include "tok/chat.h"
#include "tok/output.h"
#include "tok/pyjson.h"

/* ---- errors ---------------------------------------------------------------------------- */

/* One failed request: HTTP status, offending parameter (may be NULL), message. Each API writes
 * it in its own shape (srv_openai_error, srv_anthropic_error). */
typedef struct {
  int status;
  const char *param;
  const char *code; /* OpenAI "code" (e.g. "model_not_found"); may be NULL */
  char message[480];
  char where[64];   /* storage for a param built at run time ("messages[1].content[2]") */
} srv_error;

/* Fills e and returns -1, so parsers can `return srv_fail(e, 400, "n", "...")`. */
int srv_fail(srv_error *e, int status, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* ---- limits and context ---------------------------------------------------------------- */

typedef struct {
  int max_tokens;  /* --max-tokens-limit */
  int max_n;       /* --max-n */
  bool test_hooks; /* --test-hooks */
  int64_t max_image_pixels; /* --max-image-pixels: decoded width x height of one image */
  int max_media;   /* --max-media-per-request */
  int fetch_timeout_ms;   /* --allow-remote-media: 0 = http(s) image URLs are refused */
  size_t fetch_max_bytes; /* --max-body: the bytes all images of one request may have, as the
                             body bounds inline ones */
} srv_limits;

typedef struct srv_metrics srv_metrics;

typedef struct {
  m3_engine *engine;
  m3_model_info info;
  const char *model_name; /* what /v1/models lists and responses echo */
  srv_limits limits;
  srv_metrics *metrics;
} srv_ctx;

/* ---- requests -------------------------------------------------------------------------- */

typedef enum { SRV_TOOLS_AUTO, SRV_TOOLS_NONE, SRV_TOOLS_REQUIRED, SRV_TOOLS_NAMED } srv_tool_choice;

typedef struct {
  m3_chat_format format;
  m3_thinking_mode thinking;
  const cJSON *tools;          /* OpenAI-form tools array; NULL = none */
  srv_tool_choice tool_choice;
  const char *tool_name;       /* SRV_TOOLS_NAMED */
} srv_chat_setup;

/* Renders `messages` (OpenAI form) with the generation prompt into *text (malloc'd). With
 * tool_choice required/named the assistant turn is begun for the model: reasoning closed and a
 * tool-call block opened (up to the name, or with the named invoke), and *tool_prefix (malloc'd,
 * else NULL) receives that begun text, which the output parser must read first. *in_reasoning
 * tells whether the model starts inside its reasoning block. Bad conversations fail with
 * M3_ERR_FORMAT or M3_ERR_ARG naming messages[i]. */
m3_status srv_render_chat(const cJSON *messages, const srv_chat_setup *setup, char **text,
                          char **tool_prefix, bool *in_reasoning);

typedef enum { SRV_EP_CHAT, SRV_EP_COMPLETIONS, SRV_EP_MESSAGES } srv_endpoint;

/* One image of a chat request: the decoded base64 bytes, checked decodable and within limits. */
typedef struct {
  uint8_t *bytes;
  size_t len;
  char label[64]; /* the content part it came from, for errors: "messages[1].content[2]" */
} srv_media_item;

typedef struct {
  srv_endpoint endpoint;
  cJSON *body;             /* the parsed request (owned) */
  cJSON *converted;        /* Anthropic messages/tools rewritten in OpenAI form (owned) */
  const cJSON *messages;   /* chat: OpenAI-form messages */
  const cJSON *prompt;     /* completions: a string, or an array of token ids */
  srv_chat_setup chat;     /* tools (OpenAI form), tool_choice, thinking */
  bool stream, include_usage;
  int logprobs;            /* chat: 0/1; completions: the number of top tokens (or -1 = off) */
  m3_sampling_params params;
  /* Storage behind the pointers in params. */
  const char **stop;
  int32_t *stop_ids, *bias_ids;
  float *bias_values;
  const char *forced_text; /* m3_test_forced_text (test hooks only) */
  int32_t *forced_ids;
  /* Images in the order their placeholders appear in the rendered prompt. */
  srv_media_item *media;
  int n_media;
  m3_media **loaded;       /* [n_media] once srv_media_load ran, else NULL */
} srv_request;

void srv_request_free(srv_request *r);

/* The body of POST /detokenize: {"tokens": [id, ...]} with every id in 0..vocab_size-1. *ids
 * (malloc'd, at least one element) and *n on success; 400 naming the bad entry otherwise. */
int srv_parse_token_ids(const cJSON *body, int vocab_size, int32_t **ids, int *n, srv_error *e);

/* JSON field readers: absent or null leaves *out untouched and returns 0; a value of the wrong
 * type or out of range fills e (400, param = key) and returns -1. */
int srv_get_bool(const cJSON *o, const char *key, bool *out, srv_error *e);
int srv_get_int(const cJSON *o, const char *key, long lo, long hi, int *out, srv_error *e);
int srv_get_float(const cJSON *o, const char *key, double lo, double hi, float *out, srv_error *e);
int srv_get_string(const cJSON *o, const char *key, const char **out, srv_error *e);
/* A string or an array of strings (stop sequences), at most `max` of them. */
int srv_get_strings(const cJSON *o, const char *key, int max, const char ***out, int *n,
                    srv_error *e);

/* The sampling fields both APIs share (temperature, top_p, top_k, min_p, seed, penalties,
 * logit_bias, stop_token_ids, ignore_eos, the test hook), the model name check, and
 * max_tokens (`max_key`: required when `required`). */
int srv_parse_common(const srv_ctx *ctx, srv_request *r, const char *max_key, bool required,
                     srv_error *e);

int srv_openai_parse(const srv_ctx *ctx, srv_endpoint ep, cJSON *body, srv_request *r,
                     srv_error *e);
int srv_anthropic_parse(const srv_ctx *ctx, cJSON *body, srv_request *r, srv_error *e);

/* ---- images ----------------------------------------------------------------------------- */

/* Strict RFC 4648 base64 (padded, canonical, no whitespace). *out malloc'd. -1 when invalid. */
int srv_base64_decode(const char *text, size_t len, uint8_t **out, size_t *out_len);
/* Adds one image given as base64 `data` of `media_type` (the first type_len bytes: image/jpeg,
 * png, webp or gif). Fails with a 400 naming `label` (the content part) when the type is not an
 * image type, the base64 is invalid, the image does not decode or exceeds max_image_pixels, and
 * naming "messages" past max_media. */
int srv_media_add(const srv_ctx *ctx, srv_request *r, const char *media_type, size_t type_len,
                  const char *data, const char *label, srv_error *e);
/* An OpenAI image_url (or an Anthropic url source): a base64 data: URL, or an http(s) URL that is
 * fetched on this (the connection's) thread when limits.fetch_timeout_ms > 0 and refused with a
 * 400 naming --allow-remote-media otherwise. */
int srv_media_add_url(const srv_ctx *ctx, srv_request *r, const char *url, const char *label,
                      srv_error *e);
/* Every image_url part of r->messages (OpenAI form), in order; video parts are refused. */
int srv_media_collect(const srv_ctx *ctx, srv_request *r, srv_error *e);
/* Pre-processes the images for the engine's model into r->loaded (needs the engine). */
int srv_media_load(srv_ctx *ctx, srv_request *r, srv_error *e);
/* Frees r's images (srv_request_free calls it). */
void srv_media_free(srv_request *r);

/* ---- the generation job ---------------------------------------------------------------- */

typedef struct srv_raw srv_raw; /* one engine event, copied off the engine thread */

typedef struct srv_job srv_job;

typedef struct {
  srv_job *job;
  int index;
  m3_out_parser *parser;    /* NULL for plain completions: all text is content */
  m3_out_result msg;        /* content, reasoning and tool calls so far */
  size_t text_len;          /* bytes of model text released so far */
  int32_t *ids;             /* generated tokens */
  int n_ids, cap_ids;
  cJSON *logprobs;          /* in the API's shape; NULL unless requested */
  m3_finish_reason finish;  /* NONE while running */
  char *error;              /* M3_FINISH_ERROR */
  const char *stop_hit;     /* the stop string that ended the sample, if one did */
  double t_first, t_prev;   /* first and latest token (seconds, monotonic) */
  /* Formatter state while streaming. */
  bool began;
  int block, block_kind;    /* Anthropic: open content block index and kind (-1 = none) */
  m3_sbuf delta_content, delta_reasoning; /* OpenAI: this token's pieces, sent as one chunk */
  cJSON *delta_calls;
  int lp_sent;               /* logprob entries already streamed */
} srv_sample;

/* The API side of a job. token/out/flush/finish/end run in both modes (stream hooks write SSE
 * into job->sse only when job->req->stream); response builds the non-streaming body. */
typedef struct {
  void (*token)(srv_job *j, srv_sample *s, int index, const srv_raw *ev);
  void (*out)(srv_job *j, srv_sample *s, int index, const m3_out_event *ev);
  void (*flush)(srv_job *j, srv_sample *s, int index);
  void (*finish)(srv_job *j, srv_sample *s, int index);
  void (*end)(srv_job *j);
  cJSON *(*response)(srv_job *j);
} srv_api_ops;

struct srv_raw {
  srv_raw *next;
  int sample;
  int32_t token;
  char *text;
  size_t len;
  float logprob;
  int n_top;
  int32_t top_ids[20];
  float top_logprobs[20];
  m3_finish_reason finish;
  char *error;
  int prompt_tokens, cached_tokens, generated_tokens;
};

struct srv_job {
  srv_ctx *ctx;
  srv_request *req;
  const srv_api_ops *ops;
  char id[48];              /* "chatcmpl-…", "cmpl-…", "msg_…" */
  long created;
  uint64_t request_id;
  int fd;                   /* the client's socket, watched for a hang-up; -1 = none */
  double t_arrival;
  int n;                    /* samples */
  srv_sample *samples;
  int running;              /* samples without a finish event yet */
  int prompt_tokens, cached_tokens, completion_tokens;
  bool ended;               /* every sample finished and `end` ran */
  bool cancelled;
  m3_sbuf sse;              /* streamed bytes not yet handed to the socket */
  /* Engine thread -> connection thread. */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  srv_raw *head, *tail;
  srv_raw *reserve;         /* one per sample: carries its finish when malloc fails */
};

/* The prompt's token ids (*ids malloc'd): the rendered conversation, or the completion prompt
 * (text or ids). For chat, *tool_prefix (malloc'd or NULL) and *in_reasoning as in
 * srv_render_chat. */
int srv_prompt_ids(srv_ctx *ctx, srv_request *req, int32_t **ids, int *n, char **tool_prefix,
                   bool *in_reasoning, srv_error *e);
/* Renders, tokenizes and submits. On failure fills e (the API's status) and returns -1;
 * *out stays NULL. */
int srv_job_start(srv_ctx *ctx, srv_request *req, const srv_api_ops *ops, int fd,
                  srv_job **out, srv_error *e);
/* Waits up to wait_ms for engine events and runs them through the parsers and hooks. Returns
 * 0, or -1 when the client hung up (the request is then cancelled). */
int srv_job_pump(srv_job *j, int wait_ms);
/* Cancels what still runs, waits for the engine to let go, frees. */
void srv_job_free(srv_job *j);
/* A token's text (malloc'd; "" on failure). */
char *srv_token_text(const srv_job *j, int32_t id);
/* "stop", "length", "tool_calls", ... for OpenAI. */
const char *srv_openai_finish(const srv_sample *s);

extern const srv_api_ops srv_openai_chat_ops, srv_openai_completion_ops, srv_anthropic_ops;

/* Writes one SSE event (`event` may be NULL) with `data` printed compactly. */
void srv_sse(m3_sbuf *out, const char *event, const cJSON *data);

/* ---- error bodies ---------------------------------------------------------------------- */

cJSON *srv_openai_error(const srv_error *e);
cJSON *srv_anthropic_error(const srv_error *e);

/* ---- metrics --------------------------------------------------------------------------- */

srv_metrics *srv_metrics_new(void);
void srv_metrics_free(srv_metrics *m);
void srv_metrics_http(srv_metrics *m, int status);
void srv_metrics_itl(srv_metrics *m, double seconds);
/* A finished generation request. ttft < 0 when no token came. */
void srv_metrics_request(srv_metrics *m, m3_finish_reason reason, int prompt_tokens,
                         int generated_tokens, double ttft, double e2e);
/* Prometheus text exposition of the server's and the engine's figures. */
void srv_metrics_render(srv_metrics *m, m3_engine *e, int in_flight, m3_sbuf *out);

double srv_now(void);

#endif
