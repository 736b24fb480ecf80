/* gen.c: one generation request from prompt to finished samples (srv.h).
 *
 * The engine thread only copies each token event into the job's queue (its callbacks must not
 * block); the connection thread drains the queue, runs the output parsers and the API hooks,
 * and watches the client's socket so that a hang-up cancels the request. */
#define _GNU_SOURCE /* POLLRDHUP: the peer closed its end */
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "server/srv.h"

static atomic_uint_fast64_t next_serial = 1;

static void on_engine_event(const m3_token_event *ev, void *user) {
  srv_job *j = user;
  if (ev->sample < 0 || ev->sample >= j->n) return;
  srv_raw *r = calloc(1, sizeof *r);
  char *text = ev->text_len ? malloc(ev->text_len) : NULL;
  char *error = ev->error ? strdup(ev->error) : NULL;
  if (!r || (ev->text_len && !text)) {
    /* Out of memory on the engine thread: the sample cannot go on, but its end must still
     * reach the job, so its reserved record carries it. */
    free(r);
    free(text);
    free(error);
    m3_cancel(j->ctx->engine, ev->request_id);
    if (ev->finish == M3_FINISH_NONE) return;
    r = &j->reserve[ev->sample];
    *r = (srv_raw){.sample = ev->sample, .token = -1, .finish = M3_FINISH_ERROR,
                   .prompt_tokens = ev->prompt_tokens, .generated_tokens = ev->generated_tokens};
  } else {
    if (text) memcpy(text, ev->text, ev->text_len);
    int n_top = ev->n_top < 0 ? 0 : ev->n_top > 20 ? 20 : ev->n_top;
    *r = (srv_raw){.sample = ev->sample, .token = ev->token, .text = text, .len = ev->text_len,
                   .logprob = ev->logprob, .n_top = n_top, .finish = ev->finish, .error = error,
                   .prompt_tokens = ev->prompt_tokens, .cached_tokens = ev->cached_prompt_tokens,
                   .generated_tokens = ev->generated_tokens};
    if (n_top) {
      memcpy(r->top_ids, ev->top_ids, sizeof r->top_ids[0] * (size_t)n_top);
      memcpy(r->top_logprobs, ev->top_logprobs, sizeof r->top_logprobs[0] * (size_t)n_top);
    }
  }
  pthread_mutex_lock(&j->mu);
  if (j->tail) j->tail->next = r;
  else j->head = r;
  j->tail = r;
  pthread_cond_signal(&j->cv);
  pthread_mutex_unlock(&j->mu);
}

static void free_raw(srv_job *j, srv_raw *r) {
  if (r >= j->reserve && r < j->reserve + j->n) return;
  free(r->text);
  free(r->error);
  free(r);
}

char *srv_token_text(const srv_job *j, int32_t id) {
  char *text = NULL;
  size_t len;
  if (m3_detokenize(j->ctx->engine, &id, 1, 0, &text, &len) != M3_OK) return strdup("");
  return text;
}

/* Parser events of one sample: kept for the final body, and handed to the API's stream hook. */
static void on_output(void *user, const m3_out_event *ev) {
  srv_sample *s = user;
  m3_out_collect(&s->msg, ev);
  s->job->ops->out(s->job, s, s->index, ev);
}

/* Model text of one sample into the parser (or, for plain completions, straight out). */
static m3_status feed(srv_sample *s, const char *text, size_t len) {
  if (s->parser) return m3_out_parser_feed(s->parser, text, len);
  m3_out_event ev = {.kind = M3_OUT_CONTENT, .text = text, .len = len};
  on_output(s, &ev);
  return M3_OK;
}

/* Which stop string ended the sample: the engine withheld it, so it starts the part of the
 * decoded tokens that was never released as text. */
static void find_stop_hit(srv_job *j, srv_sample *s) {
  const m3_sampling_params *p = &j->req->params;
  if (p->n_stop == 0 || s->n_ids == 0 || s->ids[s->n_ids - 1] == j->ctx->info.eos_token_id)
    return;
  char *full = NULL;
  size_t len = 0;
  if (m3_detokenize(j->ctx->engine, s->ids, s->n_ids, 0, &full, &len) != M3_OK) return;
  const char *rest = len >= s->text_len ? full + s->text_len : "";
  const char *best = NULL;
  for (int i = 0; i < p->n_stop; i++) {
    const char *at = strstr(rest, p->stop[i]);
    if (at && (!best || at < best)) {
      best = at;
      s->stop_hit = p->stop[i];
    }
  }
  free(full);
}

static void sample_failed(srv_sample *s, const char *why) {
  if (s->finish != M3_FINISH_NONE) return;
  if (!s->error) s->error = strdup(why);
}

static void process(srv_job *j, const srv_raw *r) {
  if (r->sample < 0 || r->sample >= j->n) return;
  srv_sample *s = &j->samples[r->sample];
  if (s->finish != M3_FINISH_NONE) return;
  if (r->prompt_tokens) j->prompt_tokens = r->prompt_tokens;
  j->cached_tokens = r->cached_tokens;
  if (r->token >= 0) {
    if (s->n_ids == s->cap_ids) {
      int cap = s->cap_ids ? 2 * s->cap_ids : 64;
      int32_t *ids = realloc(s->ids, sizeof *ids * (size_t)cap);
      if (!ids) return sample_failed(s, "out of memory");
      s->ids = ids;
      s->cap_ids = cap;
    }
    s->ids[s->n_ids++] = r->token;
    double now = srv_now();
    if (s->t_first == 0) s->t_first = now;
    else srv_metrics_itl(j->ctx->metrics, now - s->t_prev);
    s->t_prev = now;
    j->ops->token(j, s, r->sample, r);
  }
  if (r->len) {
    s->text_len += r->len;
    if (feed(s, r->text, r->len) != M3_OK) sample_failed(s, m3_last_error());
  }
  if (r->finish != M3_FINISH_NONE) {
    if (s->parser && m3_out_parser_finish(s->parser) != M3_OK) sample_failed(s, m3_last_error());
    if (s->msg.failed) sample_failed(s, "out of memory");
  }
  j->ops->flush(j, s, r->sample);
  if (r->finish == M3_FINISH_NONE) return;
  s->finish = r->finish;
  if (r->error && !s->error) s->error = strdup(r->error);
  if (s->error && s->finish != M3_FINISH_CANCELLED) s->finish = M3_FINISH_ERROR;
  if (s->finish == M3_FINISH_STOP) find_stop_hit(j, s);
  j->completion_tokens += r->generated_tokens;
  j->running--;
  j->ops->finish(j, s, r->sample);
}

static void end_job(srv_job *j) {
  j->ended = true;
  if (!j->cancelled) j->ops->end(j);
  const srv_sample *s0 = &j->samples[0];
  double ttft = s0->t_first ? s0->t_first - j->t_arrival : -1;
  srv_metrics_request(j->ctx->metrics, s0->finish, j->prompt_tokens, j->completion_tokens, ttft,
                      srv_now() - j->t_arrival);
}

/* Takes every queued event, waiting up to wait_ms for the first. */
static srv_raw *take_events(srv_job *j, int wait_ms) {
  pthread_mutex_lock(&j->mu);
  if (!j->head && wait_ms > 0) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_nsec += (long)wait_ms * 1000000L;
    until.tv_sec += until.tv_nsec / 1000000000L;
    until.tv_nsec %= 1000000000L;
    pthread_cond_timedwait(&j->cv, &j->mu, &until);
  }
  srv_raw *list = j->head;
  j->head = j->tail = NULL;
  pthread_mutex_unlock(&j->mu);
  return list;
}

static void run_events(srv_job *j, srv_raw *list) {
  while (list) {
    srv_raw *next = list->next;
    process(j, list);
    free_raw(j, list);
    list = next;
  }
  if (j->running == 0 && !j->ended) end_job(j);
}

/* The peer closed its end (or the socket failed). Requests are complete before generation
 * starts, so readable data here can only be a pipelined next request, which is no hang-up. */
static bool client_gone(int fd) {
  if (fd < 0) return false;
  struct pollfd p = {.fd = fd, .events = POLLRDHUP};
  return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL));
}

int srv_job_pump(srv_job *j, int wait_ms) {
  run_events(j, take_events(j, wait_ms));
  if (j->ended || !client_gone(j->fd)) return 0;
  j->cancelled = true;
  m3_cancel(j->ctx->engine, j->request_id);
  return -1;
}

void srv_job_free(srv_job *j) {
  if (!j) return;
  if (j->running > 0) {
    j->cancelled = true;
    m3_cancel(j->ctx->engine, j->request_id);
    while (!j->ended) run_events(j, take_events(j, 100));
  }
  run_events(j, take_events(j, 0));
  for (int i = 0; i < j->n; i++) {
    srv_sample *s = &j->samples[i];
    m3_out_parser_free(s->parser);
    m3_out_result_free(&s->msg);
    free(s->ids);
    cJSON_Delete(s->logprobs);
    cJSON_Delete(s->delta_calls);
    m3_sbuf_free(&s->delta_content);
    m3_sbuf_free(&s->delta_reasoning);
    free(s->error);
  }
  free(j->samples);
  free(j->reserve);
  m3_sbuf_free(&j->sse);
  pthread_mutex_destroy(&j->mu);
  pthread_cond_destroy(&j->cv);
  free(j);
}

/* Each image's placeholder in the rendered prompt becomes its run of image ids. */
static int expand_media(srv_ctx *ctx, srv_request *req, int32_t **ids, int *n, srv_error *e) {
  if (req->n_media == 0) return 0;
  if (srv_media_load(ctx, req, e)) return -1;
  int32_t *expanded = NULL;
  int n_expanded = 0;
  if (m3_media_expand(ctx->engine, *ids, *n, req->loaded, req->n_media, &expanded, &n_expanded) !=
      M3_OK)
    return srv_fail(e, 400, "messages", "%s", m3_last_error());
  free(*ids);
  *ids = expanded;
  *n = n_expanded;
  return 0;
}

int srv_prompt_ids(srv_ctx *ctx, srv_request *req, int32_t **ids, int *n, char **tool_prefix,
                   bool *in_reasoning, srv_error *e) {
  *tool_prefix = NULL;
  *in_reasoning = false;
  const char *text = NULL;
  char *rendered = NULL;
  if (req->endpoint != SRV_EP_COMPLETIONS) {
    if (srv_render_chat(req->messages, &req->chat, &rendered, tool_prefix, in_reasoning) != M3_OK)
      return srv_fail(e, 400, "messages", "%s", m3_last_error());
    text = rendered;
  } else if (cJSON_IsString(req->prompt)) {
    text = req->prompt->valuestring;
  } else {
    int count = cJSON_GetArraySize(req->prompt);
    *ids = malloc(sizeof **ids * (size_t)(count ? count : 1));
    if (!*ids) return srv_fail(e, 500, NULL, "out of memory");
    for (int i = 0; i < count; i++)
      (*ids)[i] = (int32_t)cJSON_GetArrayItem(req->prompt, i)->valuedouble;
    *n = count;
    return 0;
  }
  m3_status st = m3_tokenize(ctx->engine, text, strlen(text), 1, ids, n);
  free(rendered);
  if (st != M3_OK) return srv_fail(e, 400, "prompt", "%s", m3_last_error());
  if (expand_media(ctx, req, ids, n, e) == 0) return 0;
  /* Failed calls hand nothing back. */
  free(*ids);
  free(*tool_prefix);
  *ids = NULL;
  *tool_prefix = NULL;
  return -1;
}

static int check_length(const srv_ctx *ctx, const srv_request *req, int n_prompt, srv_error *e) {
  int ctx_len = ctx->info.max_context;
  const char *param = req->endpoint == SRV_EP_COMPLETIONS ? "prompt" : "messages";
  if (n_prompt == 0) return srv_fail(e, 400, param, "the prompt is empty");
  if (n_prompt >= ctx_len)
    return srv_fail(e, 400, param,
                    "This model's maximum context length is %d tokens; the prompt is %d tokens",
                    ctx_len, n_prompt);
  int max = req->params.max_tokens;
  if (max > 0 && (long)n_prompt + max > ctx_len)
    return srv_fail(e, 400, "max_tokens",
                    "This model's maximum context length is %d tokens; the prompt (%d tokens) "
                    "plus max_tokens (%d) exceeds it",
                    ctx_len, n_prompt, max);
  return 0;
}

static int new_job(srv_ctx *ctx, srv_request *req, const srv_api_ops *ops, int fd,
                   bool in_reasoning, const char *tool_prefix, srv_job **out, srv_error *e) {
  static const char *const id_prefixes[] = {"chatcmpl-", "cmpl-", "msg_"};
  int n = req->params.n > 1 ? req->params.n : 1;
  srv_job *j = calloc(1, sizeof *j);
  srv_sample *samples = calloc((size_t)n, sizeof *samples);
  srv_raw *reserve = calloc((size_t)n, sizeof *reserve);
  if (!j || !samples || !reserve) {
    free(j);
    free(samples);
    free(reserve);
    return srv_fail(e, 500, NULL, "out of memory");
  }
  unsigned long long serial = atomic_fetch_add(&next_serial, 1);
  *j = (srv_job){.ctx = ctx, .req = req, .ops = ops, .fd = fd, .t_arrival = srv_now(),
                 .created = (long)time(NULL), .n = n, .samples = samples, .reserve = reserve,
                 .running = n};
  snprintf(j->id, sizeof j->id, "%s%08lx%08llx", id_prefixes[req->endpoint],
           (unsigned long)j->created, serial);
  pthread_mutex_init(&j->mu, NULL);
  pthread_cond_init(&j->cv, NULL);
  *out = j;
  for (int i = 0; i < n; i++) {
    srv_sample *s = &samples[i];
    *s = (srv_sample){.job = j, .index = i, .block = -1, .block_kind = -1};
    /* Call ids unique per server run: the serial, then the sample. */
    char id_prefix[48];
    snprintf(id_prefix, sizeof id_prefix, "%s%llx_%d_",
             req->endpoint == SRV_EP_MESSAGES ? "toolu_" : "call_", serial, i);
    if (req->endpoint == SRV_EP_COMPLETIONS) continue;
    const srv_chat_setup *chat = &req->chat;
    m3_out_options opt = {.format = chat->format, .starts_in_reasoning = in_reasoning,
                          .parse_tools = chat->tools && cJSON_GetArraySize(chat->tools) > 0 &&
                                         chat->tool_choice != SRV_TOOLS_NONE,
                          .tools = chat->tools, .id_prefix = id_prefix};
    /* The begun tool call of a forced tool_choice is model output the prompt already holds. */
    if (m3_out_parser_new(&opt, on_output, s, &s->parser) != M3_OK ||
        (tool_prefix && m3_out_parser_feed(s->parser, tool_prefix, strlen(tool_prefix)) != M3_OK))
      return srv_fail(e, 500, NULL, "%s", m3_last_error());
  }
  return 0;
}

int srv_job_start(srv_ctx *ctx, srv_request *req, const srv_api_ops *ops, int fd, srv_job **out,
                  srv_error *e) {
  *out = NULL;
  int32_t *ids = NULL;
  int n_ids = 0;
  char *tool_prefix = NULL;
  bool in_reasoning = false;
  srv_job *j = NULL;
  int rc = srv_prompt_ids(ctx, req, &ids, &n_ids, &tool_prefix, &in_reasoning, e);
  if (rc == 0) rc = check_length(ctx, req, n_ids, e);
  if (rc == 0 && req->forced_text) {
    /* The engine may keep pointers into params for the request's life: the ids live in req. */
    if (m3_tokenize(ctx->engine, req->forced_text, strlen(req->forced_text), 1, &req->forced_ids,
                    &req->params.n_forced_tokens) != M3_OK)
      rc = srv_fail(e, 400, "m3_test_forced_text", "%s", m3_last_error());
    req->params.forced_tokens = req->forced_ids;
  }
  if (rc == 0) rc = new_job(ctx, req, ops, fd, in_reasoning, tool_prefix, &j, e);
  if (rc == 0) {
    m3_status st = m3_submit_media(ctx->engine, ids, n_ids, req->loaded, req->n_media,
                                   &req->params, on_engine_event, j, &j->request_id);
    if (st == M3_ERR_LIMIT) rc = srv_fail(e, 503, NULL, "%s", m3_last_error());
    else if (st != M3_OK) rc = srv_fail(e, 400, NULL, "%s", m3_last_error());
  }
  free(ids);
  free(tool_prefix);
  if (rc != 0) {
    if (j) {
      /* Never submitted: no engine event will come. */
      j->running = 0;
      j->ended = true;
    }
    srv_job_free(j);
    return -1;
  }
  *out = j;
  return 0;
}
const char *srv_openai_finish(const srv_sample *s) {
  switch (s->finish) {
    case M3_FINISH_STOP: return s->msg.n_calls > 0 ? "tool_calls" : "stop";
    case M3_FINISH_LENGTH: return "length";
    case M3_FINISH_CANCELLED: return "abort";
    case M3_FINISH_ERROR: return "error";
    case M3_FINISH_NONE: break;
  }
  return NULL;
}
