/* request.c: typed reads of request fields, and the sampling fields both APIs share. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "server/srv.h"

int srv_fail(srv_error *e, int status, const char *param, const char *fmt, ...) {
  e->status = status;
  e->param = param;
  e->code = NULL;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(e->message, sizeof e->message, fmt, ap);
  va_end(ap);
  return -1;
}

int srv_parse_token_ids(const cJSON *body, int vocab_size, int32_t **ids, int *n, srv_error *e) {
  const cJSON *tokens = cJSON_GetObjectItemCaseSensitive(body, "tokens");
  *ids = NULL;
  *n = 0;
  if (!cJSON_IsArray(tokens)) return srv_fail(e, 400, "tokens", "'tokens' must be an array of token ids");
  const int count = cJSON_GetArraySize(tokens);
  int32_t *out = malloc(sizeof *out * (size_t)(count ? count : 1));
  if (!out) return srv_fail(e, 400, "tokens", "%d token ids do not fit in memory", count);
  int i = 0;
  for (const cJSON *t = tokens->child; t; t = t->next, i++)
    if (!cJSON_IsNumber(t) || !(t->valuedouble >= 0) || t->valuedouble >= vocab_size ||
        t->valuedouble != (double)(int32_t)t->valuedouble) {
      free(out);
      return srv_fail(e, 400, "tokens", "tokens[%d] is not a token id in 0..%d", i, vocab_size - 1);
    } else {
      out[i] = (int32_t)t->valuedouble;
    }
  *ids = out;
  *n = count;
  return 0;
}

double srv_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void srv_request_free(srv_request *r) {
  cJSON_Delete(r->body);
  cJSON_Delete(r->converted);
  free(r->stop);
  free(r->stop_ids);
  free(r->bias_ids);
  free(r->bias_values);
  free(r->forced_ids);
  srv_media_free(r);
  *r = (srv_request){0};
}

/* The field, or NULL when absent or JSON null. */
static const cJSON *field(const cJSON *o, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
  return cJSON_IsNull(v) ? NULL : v;
}

int srv_get_bool(const cJSON *o, const char *key, bool *out, srv_error *e) {
  const cJSON *v = field(o, key);
  if (!v) return 0;
  if (!cJSON_IsBool(v)) return srv_fail(e, 400, key, "'%s' must be a boolean", key);
  *out = cJSON_IsTrue(v);
  return 0;
}

int srv_get_int(const cJSON *o, const char *key, long lo, long hi, int *out, srv_error *e) {
  const cJSON *v = field(o, key);
  if (!v) return 0;
  double d = cJSON_IsNumber(v) ? v->valuedouble : NAN;
  if (!(d == floor(d))) return srv_fail(e, 400, key, "'%s' must be an integer", key);
  if (d < (double)lo || d > (double)hi)
    return srv_fail(e, 400, key, "'%s' is %.0f; allowed: %ld..%ld", key, d, lo, hi);
  *out = (int)d;
  return 0;
}

int srv_get_float(const cJSON *o, const char *key, double lo, double hi, float *out, srv_error *e) {
  const cJSON *v = field(o, key);
  if (!v) return 0;
  if (!cJSON_IsNumber(v)) return srv_fail(e, 400, key, "'%s' must be a number", key);
  if (!(v->valuedouble >= lo && v->valuedouble <= hi))
    return srv_fail(e, 400, key, "'%s' is %g; allowed: %g..%g", key, v->valuedouble, lo, hi);
  *out = (float)v->valuedouble;
  return 0;
}

int srv_get_string(const cJSON *o, const char *key, const char **out, srv_error *e) {
  const cJSON *v = field(o, key);
  if (!v) return 0;
  if (!cJSON_IsString(v)) return srv_fail(e, 400, key, "'%s' must be a string", key);
  *out = v->valuestring;
  return 0;
}

int srv_get_strings(const cJSON *o, const char *key, int max, const char ***out, int *n,
                    srv_error *e) {
  const cJSON *v = field(o, key);
  if (!v) return 0;
  int count = cJSON_IsString(v) ? 1 : cJSON_IsArray(v) ? cJSON_GetArraySize(v) : -1;
  if (count < 0) return srv_fail(e, 400, key, "'%s' must be a string or an array of strings", key);
  if (count > max) return srv_fail(e, 400, key, "'%s' has %d entries; at most %d", key, count, max);
  const char **list = calloc((size_t)count + 1, sizeof *list);
  if (!list) return srv_fail(e, 500, NULL, "out of memory");
  const cJSON *it = v;
  for (int i = 0; i < count; i++) {
    if (cJSON_IsArray(v)) it = cJSON_GetArrayItem(v, i);
    if (!cJSON_IsString(it) || !it->valuestring[0]) {
      free(list);
      return srv_fail(e, 400, key, "'%s'[%d] must be a non-empty string", key, i);
    }
    list[i] = it->valuestring;
  }
  *out = list;
  *n = count;
  return 0;
}

static int parse_logit_bias(const cJSON *body, int vocab, srv_request *r, srv_error *e) {
  const cJSON *v = field(body, "logit_bias");
  if (!v) return 0;
  if (!cJSON_IsObject(v)) return srv_fail(e, 400, "logit_bias", "'logit_bias' must be an object");
  int n = cJSON_GetArraySize(v);
  r->bias_ids = malloc(sizeof *r->bias_ids * (size_t)(n ? n : 1));
  r->bias_values = malloc(sizeof *r->bias_values * (size_t)(n ? n : 1));
  if (!r->bias_ids || !r->bias_values) return srv_fail(e, 500, NULL, "out of memory");
  int i = 0;
  for (const cJSON *it = v->child; it; it = it->next, i++) {
    char *end;
    long id = strtol(it->string, &end, 10);
    if (!*it->string || *end || id < 0 || id >= vocab)
      return srv_fail(e, 400, "logit_bias", "logit_bias key '%s' is not a token id in 0..%d",
                      it->string, vocab - 1);
    if (!cJSON_IsNumber(it) || !(it->valuedouble >= -100 && it->valuedouble <= 100))
      return srv_fail(e, 400, "logit_bias", "logit_bias['%s'] must be a number in -100..100",
                      it->string);
    r->bias_ids[i] = (int32_t)id;
    r->bias_values[i] = (float)it->valuedouble;
  }
  r->params.logit_bias_ids = r->bias_ids;
  r->params.logit_bias_values = r->bias_values;
  r->params.n_logit_bias = n;
  return 0;
}

static int parse_stop_ids(const cJSON *body, int vocab, srv_request *r, srv_error *e) {
  const cJSON *v = field(body, "stop_token_ids");
  if (!v) return 0;
  if (!cJSON_IsArray(v)) return srv_fail(e, 400, "stop_token_ids", "'stop_token_ids' must be an array");
  int n = cJSON_GetArraySize(v);
  r->stop_ids = malloc(sizeof *r->stop_ids * (size_t)(n ? n : 1));
  if (!r->stop_ids) return srv_fail(e, 500, NULL, "out of memory");
  for (int i = 0; i < n; i++) {
    const cJSON *it = cJSON_GetArrayItem(v, i);
    if (!cJSON_IsNumber(it) || it->valuedouble != floor(it->valuedouble) || it->valuedouble < 0 ||
        it->valuedouble >= vocab)
      return srv_fail(e, 400, "stop_token_ids", "stop_token_ids[%d] is not a token id in 0..%d",
                      i, vocab - 1);
    r->stop_ids[i] = (int32_t)it->valuedouble;
  }
  r->params.stop_token_ids = r->stop_ids;
  r->params.n_stop_token_ids = n;
  return 0;
}

static int parse_seed(const cJSON *body, srv_request *r, srv_error *e) {
  const cJSON *v = field(body, "seed");
  if (!v) return 0;
  if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) ||
      fabs(v->valuedouble) > 9.2e18)
    return srv_fail(e, 400, "seed", "'seed' must be an integer");
  r->params.seed = (uint64_t)(int64_t)v->valuedouble;
  r->params.has_seed = 1;
  return 0;
}

int srv_parse_common(const srv_ctx *ctx, srv_request *r, const char *max_key, bool required,
                     srv_error *e) {
  const cJSON *b = r->body;
  m3_sampling_params *p = &r->params;
  r->chat.format = ctx->info.chat_format == M3_CHAT_M2 ? M3_CHAT_FORMAT_M2 : M3_CHAT_FORMAT_M3;
  const char *model = NULL;
  if (srv_get_string(b, "model", &model, e)) return -1;
  if (model && strcmp(model, ctx->model_name) != 0) {
    srv_fail(e, 404, "model", "The model '%s' does not exist; this server serves '%s'", model,
             ctx->model_name);
    e->code = "model_not_found";
    return -1;
  }
  int top_k = 0;
  if (srv_get_float(b, "temperature", 0, 2, &p->temperature, e) ||
      srv_get_float(b, "top_p", 1e-9, 1, &p->top_p, e) ||
      srv_get_int(b, "top_k", -1, ctx->info.vocab_size, &top_k, e) ||
      srv_get_float(b, "min_p", 0, 1, &p->min_p, e) ||
      srv_get_float(b, "repetition_penalty", 1e-3, 100, &p->repetition_penalty, e) ||
      srv_get_float(b, "presence_penalty", -2, 2, &p->presence_penalty, e) ||
      srv_get_float(b, "frequency_penalty", -2, 2, &p->frequency_penalty, e) ||
      parse_seed(b, r, e) || parse_logit_bias(b, ctx->info.vocab_size, r, e) ||
      parse_stop_ids(b, ctx->info.vocab_size, r, e))
    return -1;
  p->top_k = top_k < 0 ? 0 : top_k;
  bool ignore_eos = false;
  if (srv_get_bool(b, "ignore_eos", &ignore_eos, e)) return -1;
  p->ignore_eos = ignore_eos;
  const cJSON *max = field(b, max_key);
  if (!max && required) return srv_fail(e, 400, max_key, "'%s' is required", max_key);
  int max_tokens = 0;
  if (srv_get_int(b, max_key, 1, 1L << 30, &max_tokens, e)) return -1;
  if (max_tokens > ctx->limits.max_tokens)
    return srv_fail(e, 400, max_key, "'%s' is %d; this server allows at most %d", max_key,
                    max_tokens, ctx->limits.max_tokens);
  p->max_tokens = max_tokens;
  if (srv_get_string(b, "m3_test_forced_text", &r->forced_text, e)) return -1;
  if (r->forced_text && !ctx->limits.test_hooks)
    return srv_fail(e, 400, "m3_test_forced_text",
                    "'m3_test_forced_text' is honoured only by a server run with --test-hooks");
  return 0;
}

void srv_sse(m3_sbuf *out, const char *event, const cJSON *data) {
  char *text = cJSON_PrintUnformatted(data);
  if (!text) {
    out->failed = true;
    return;
  }
  if (event) {
    m3_sbuf_puts(out, "event: ");
    m3_sbuf_puts(out, event);
    m3_sbuf_putc(out, '\n');
  }
  m3_sbuf_puts(out, "data: ");
  m3_sbuf_puts(out, text);
  m3_sbuf_puts(out, "\n\n");
  free(text);
}
