/* output.c: what happens to a sample's tokens once they are drawn: the text they release, stop
 * strings matched across token boundaries, finish conditions, and the callback. */
#include <stdlib.h>
#include <string.h>

#include "engine/engine_internal.h"

int m3_seq_list_push(m3_seq_list *l, m3_seq *s) {
  if (l->n == l->cap) {
    int cap = l->cap ? 2 * l->cap : 16;
    m3_seq **at = realloc(l->at, (size_t)cap * sizeof *at);
    if (!at) return 0;
    l->at = at;
    l->cap = cap;
  }
  /* Keep priority order: earlier requests first, a request's samples by index. */
  int i = l->n;
  while (i > 0 && (l->at[i - 1]->order > s->order ||
                   (l->at[i - 1]->order == s->order && l->at[i - 1]->index > s->index))) {
    l->at[i] = l->at[i - 1];
    i--;
  }
  l->at[i] = s;
  l->n++;
  return 1;
}

int m3_seq_list_remove(m3_seq_list *l, m3_seq *s) {
  for (int i = 0; i < l->n; i++)
    if (l->at[i] == s) {
      memmove(&l->at[i], &l->at[i + 1], (size_t)(l->n - i - 1) * sizeof *l->at);
      l->n--;
      return 1;
    }
  return 0;
}

m3_status m3_seq_create(m3_engine *e, m3_request *r, int index, m3_seq **out) {
  m3_seq *s = calloc(1, sizeof *s);
  if (!s) return m3_fail(M3_ERR_NOMEM, "engine: out of memory for a sequence");
  s->req = r;
  s->index = index;
  s->cap = r->n_prompt + 16;
  s->tokens = malloc((size_t)s->cap * sizeof *s->tokens);
  s->views = calloc((size_t)e->num_layers, sizeof *s->views);
  if (!s->tokens || !s->views) {
    free(s->tokens);
    free(s->views);
    free(s);
    return m3_fail(M3_ERR_NOMEM, "engine: out of memory for a sequence");
  }
  memcpy(s->tokens, r->prompt, (size_t)r->n_prompt * sizeof *s->tokens);
  s->n_tokens = r->n_prompt;
  s->rng = m3_sampler_seed(r->p.seed, index);
  m3_kv_seq_init(&s->kv);
  if (e->tok) m3_detok_stream_init(&s->detok, e->tok, r->p.skip_special_tokens != 0);
  *out = s;
  return M3_OK;
}

void m3_seq_free(m3_engine *e, m3_seq *s) {
  m3_spec_seq_free(e, s);
  m3_kv_seq_release(e->cache, &s->kv);
  if (e->tok) m3_detok_stream_free(&s->detok);
  free(s->tokens);
  free(s->views);
  free(s->held);
  free(s);
}

static int append_held(m3_seq *s, const char *text, size_t len) {
  if (len == 0) return 1;
  if (s->n_held + len > s->cap_held) {
    size_t cap = s->cap_held ? s->cap_held : 64;
    while (cap < s->n_held + len) cap *= 2;
    char *held = realloc(s->held, cap);
    if (!held) return 0;
    s->held = held;
    s->cap_held = cap;
  }
  memcpy(s->held + s->n_held, text, len);
  s->n_held += len;
  return 1;
}

/* Where the earliest stop string starts in the held text, or -1. */
static long find_stop(const m3_request *r, const m3_seq *s) {
  for (size_t at = 0; at < s->n_held; at++)
    for (int i = 0; i < r->p.n_stop; i++) {
      size_t n = strlen(r->stop[i]);
      if (n <= s->n_held - at && memcmp(s->held + at, r->stop[i], n) == 0) return (long)at;
    }
  return -1;
}

/* Bytes of held text that can go out: all but the longest suffix that starts a stop string. */
static size_t releasable(const m3_request *r, const m3_seq *s) {
  size_t keep = 0;
  for (int i = 0; i < r->p.n_stop; i++) {
    size_t n = strlen(r->stop[i]);
    for (size_t k = n - 1 < s->n_held ? n - 1 : s->n_held; k > keep; k--)
      if (memcmp(s->held + s->n_held - k, r->stop[i], k) == 0) {
        keep = k;
        break;
      }
  }
  return s->n_held - keep;
}

static void fill_usage(const m3_request *r, const m3_seq *s, m3_token_event *ev) {
  ev->request_id = r->id;
  ev->prompt_tokens = r->n_prompt;
  ev->cached_prompt_tokens = r->cached_prompt_tokens;
  ev->generated_tokens = s ? s->n_generated : 0;
}

static int is_stop_token(const m3_engine *e, const m3_request *r, int32_t token) {
  if (token == e->info.eos_token_id && !r->p.ignore_eos) return 1;
  for (int i = 0; i < r->p.n_stop_token_ids; i++)
    if (r->stop_ids[i] == token) return 1;
  return 0;
}

int m3_seq_emit(m3_engine *e, m3_seq *s, int32_t token, const float *logits) {
  m3_request *r = s->req;
  const m3_sampling_params *p = &r->p;
  if (s->n_tokens == s->cap) {
    int cap = 2 * s->cap;
    int32_t *tokens = realloc(s->tokens, (size_t)cap * sizeof *tokens);
    if (!tokens) {
      m3_seq_emit_end(e, r, s, s->index, M3_FINISH_ERROR, "out of memory for the sequence");
      return 1;
    }
    s->tokens = tokens;
    s->cap = cap;
  }
  s->tokens[s->n_tokens++] = token;
  s->n_generated++;
  e->counters.generated_tokens_total++;

  m3_token_event ev = {.sample = s->index, .token = token};
  if (p->logprobs || p->top_logprobs > 0) {
    ev.logprob = m3_sampler_logprobs(logits, e->vocab, token, p->top_logprobs, e->top_ids, e->top_lp);
    ev.n_top = p->top_logprobs;
    ev.top_ids = e->top_ids;
    ev.top_logprobs = e->top_lp;
  }
  m3_finish_reason finish = M3_FINISH_NONE;
  size_t out_len = 0;
  int stop_string = 0;
  if (is_stop_token(e, r, token)) {
    finish = M3_FINISH_STOP; /* its text is not part of the output */
  } else if (e->tok) {
    const char *text;
    size_t len;
    if (m3_detok_stream_push(&s->detok, token, &text, &len) == M3_OK) append_held(s, text, len);
    long stop_at = find_stop(r, s);
    if (stop_at >= 0) {
      finish = M3_FINISH_STOP;
      stop_string = 1;
      out_len = (size_t)stop_at;
    }
  }
  if (finish == M3_FINISH_NONE &&
      ((p->forced_tokens && s->n_generated >= p->n_forced_tokens) ||
       (p->max_tokens > 0 && s->n_generated >= p->max_tokens) ||
       s->n_tokens >= e->info.max_context))
    finish = M3_FINISH_LENGTH;
  if (finish == M3_FINISH_NONE) {
    out_len = releasable(r, s);
  } else if (!stop_string) {
    /* Finished without a stop string: what was held back for one is output after all. */
    const char *text;
    size_t len;
    if (e->tok && m3_detok_stream_finish(&s->detok, &text, &len) == M3_OK) append_held(s, text, len);
    out_len = s->n_held;
  }
  ev.text = s->held ? s->held : "";
  ev.text_len = out_len;
  ev.finish = finish;
  fill_usage(r, s, &ev);
  r->cb(&ev, r->user);
  if (finish != M3_FINISH_NONE) {
    s->finished = 1;
    s->n_held = 0;
  } else if (out_len > 0) {
    memmove(s->held, s->held + out_len, s->n_held - out_len);
    s->n_held -= out_len;
  }
  return finish != M3_FINISH_NONE;
}

void m3_seq_emit_end(m3_engine *e, m3_request *r, m3_seq *s, int index, m3_finish_reason why,
                     const char *error) {
  (void)e;
  m3_token_event ev = {.sample = index, .token = -1, .text = "", .finish = why, .error = error};
  fill_usage(r, s, &ev);
  r->cb(&ev, r->user);
  if (s) s->finished = 1;
}

void m3_request_free(m3_request *r) {
  for (int i = 0; r->stop && i < r->p.n_stop; i++) free(r->stop[i]);
  free(r->stop);
  free(r->stop_ids);
  free(r->bias_ids);
  free(r->bias_values);
  free(r->forced);
  free(r->oracle);
  free(r->prompt);
  free(r->samples);
  m3_request_media_free(r->media);
  free(r);
}

void m3_request_sample_done(m3_engine *e, m3_request *r) {
  if (++r->n_finished < r->n) return;
  m3_request_free(r);
  pthread_mutex_lock(&e->mu);
  e->active--;
  pthread_cond_broadcast(&e->idle);
  pthread_mutex_unlock(&e->mu);
}

void m3_seq_retire(m3_engine *e, m3_seq *s) {
  m3_request *r = s->req;
  if (m3_seq_list_remove(&e->running, s) && !r->forked) e->reserved_slots -= r->n - 1;
  m3_seq_list_remove(&e->waiting, s);
  r->samples[s->index] = NULL;
  m3_seq_free(e, s);
  m3_request_sample_done(e, r);
}
