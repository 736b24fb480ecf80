/* scheduler.c: continuous batching.
 *
 * Each step fills a token budget (max_batch_tokens) in priority order (earlier requests first):
 *   1. running sequences: one decode token each, or the next chunk of a prompt being prefilled
 *      (chunked prefill: a long prompt takes several steps and never stalls the decodes);
 *   2. waiting sequences, admitted while the budget, the running limit and the free pages last
 *      (a prompt is admitted only when pages for all of it are free, so prefills seldom stall).
 * When a running sequence needs a page and none is left, the lowest-priority running sequence is
 * preempted: its pages are released and it waits to be recomputed from its tokens (with prefix
 * caching, the pages it published usually come straight back). Sampling happens only once per
 * position, so recomputing never changes a sample's draws.
 * Then one batched forward runs everything scheduled, and each sequence whose step reached its
 * last token samples the next one. When every such row would only be read for its argmax (greedy
 * decoding), the forward hands over the argmax ids instead of the rows: on a GPU, 4 bytes a row
 * cross to the host instead of the vocabulary's 4 bytes a logit. When some rows are plain draws
 * (temperature > 0, nothing else read from the row) and the backend samples (sample_rows), it
 * draws those with the value each sequence's PRNG gives the host sampler, so a request's tokens
 * do not depend on which side drew them. With several ranks (--tp/--ep, ranks.h) each runs the
 * same forward on its share of the model and rank 0's gives the rows; on an argmax step with
 * lm_head split over the vocabulary, no row is gathered at all: the ranks exchange each row's
 * best candidate of their slices (model.h m3_model_forward_batch_argmax). */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/engine_internal.h"
#include "engine/ranks.h"

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Finishes every unfinished sample of r with `why`. */
static void finish_request(m3_engine *e, m3_request *r, m3_finish_reason why, const char *error) {
  /* The request is freed as its last sample finishes: stop there. */
  for (int i = 0, left = r->n - r->n_finished; left > 0; i++) {
    m3_seq *s = r->samples[i];
    if (!s && (r->forked || i == 0)) continue; /* already finished */
    left--;
    m3_seq_emit_end(e, r, s, i, why, error);
    if (s) m3_seq_retire(e, s);
    else m3_request_sample_done(e, r);
  }
}

static m3_request *find_request(const m3_engine *e, uint64_t id) {
  const m3_seq_list *lists[2] = {&e->running, &e->waiting};
  for (int l = 0; l < 2; l++)
    for (int i = 0; i < lists[l]->n; i++)
      if (lists[l]->at[i]->req->id == id) return lists[l]->at[i]->req;
  return NULL;
}

/* New requests join the waiting list; cancellations take effect. */
static void take_handover(m3_engine *e) {
  pthread_mutex_lock(&e->mu);
  m3_request *incoming = e->incoming;
  e->incoming = e->incoming_tail = NULL;
  int n_cancels = e->n_cancels, cancel_all = e->cancel_all;
  uint64_t *cancels = e->cancels;
  e->cancels = NULL;
  e->n_cancels = e->cap_cancels = 0;
  pthread_mutex_unlock(&e->mu);

  while (incoming) {
    m3_request *r = incoming;
    incoming = r->next;
    m3_seq *s = NULL;
    if (m3_seq_create(e, r, 0, &s) != M3_OK || !m3_seq_list_push(&e->waiting, s)) {
      if (s) m3_seq_free(e, s);
      finish_request(e, r, M3_FINISH_ERROR, "out of memory for the request");
      continue;
    }
    s->order = e->next_order++;
    r->samples[0] = s;
  }
  for (int i = 0; i < n_cancels; i++) {
    m3_request *r = find_request(e, cancels[i]);
    if (r) finish_request(e, r, M3_FINISH_CANCELLED, NULL);
  }
  free(cancels);
  if (cancel_all) m3_sched_cancel_all(e);
}

void m3_sched_cancel_all(m3_engine *e) {
  while (e->running.n > 0) finish_request(e, e->running.at[0]->req, M3_FINISH_CANCELLED, NULL);
  while (e->waiting.n > 0) finish_request(e, e->waiting.at[0]->req, M3_FINISH_CANCELLED, NULL);
}

static void preempt(m3_engine *e, m3_seq *s) {
  if (!s->req->forked) e->reserved_slots -= s->req->n - 1;
  m3_kv_seq_release(e->cache, &s->kv);
  s->n_computed = 0;
  m3_seq_list_remove(&e->running, s);
  m3_seq_list_push(&e->waiting, s); /* cannot fail: it held a place in running */
  e->counters.preemptions++;
}

typedef struct {
  int n, tokens;
} batch_fill;

/* `drafts` speculative tokens follow the `take` tokens (spec.c): each gets logits to verify. */
static void add_to_batch(m3_engine *e, batch_fill *b, m3_seq *s, int take, int drafts) {
  int32_t *pos = e->batch_pos + b->tokens;
  for (int j = 0; j < take + drafts; j++) pos[j] = s->n_computed + j;
  m3_kv_seq_views(e->cache, &s->kv, s->views);
  e->batch[b->n] = (m3_model_seq){.kv = s->views, .ids = s->tokens + s->n_computed, .pos = pos,
                                  .T = take + drafts,
                                  .n_logits = drafts ? take + drafts
                                                     : s->n_computed + take == s->n_tokens};
  m3_request_media_batch(e, s, &e->batch[b->n]);
  if (e->spec) m3_spec_batch_add(e, b->n, b->tokens);
  e->batch_kv[b->n] = &s->kv;
  e->batch_seq[b->n++] = s;
  b->tokens += take + drafts;
}

static int min_int(int a, int b) { return a < b ? a : b; }

static void schedule_running(m3_engine *e, batch_fill *b) {
  for (int i = 0; i < e->running.n && b->tokens < e->max_batch_tokens && b->n < e->max_running;
       i++) {
    m3_seq *s = e->running.at[i];
    int take = min_int(s->n_tokens - s->n_computed, e->max_batch_tokens - b->tokens);
    int drafts = e->spec ? m3_spec_take_drafts(e, s, take, e->max_batch_tokens - b->tokens - take) : 0;
    if (drafts && m3_kv_seq_extend(e->cache, &s->kv, take + drafts) != M3_OK) drafts = 0;
    int preempted_self = 0;
    while (!drafts && m3_kv_seq_extend(e->cache, &s->kv, take) != M3_OK) {
      /* The last running sequence has the lowest priority and is not scheduled yet. */
      m3_seq *victim = e->running.at[e->running.n - 1];
      preempt(e, victim);
      if (victim == s) {
        preempted_self = 1;
        break;
      }
    }
    if (preempted_self) break;
    add_to_batch(e, b, s, take, drafts);
  }
}

static int pages_for(const m3_engine *e, int tokens) {
  return (tokens + e->info.kv_page_tokens - 1) / e->info.kv_page_tokens;
}

static void admit_waiting(m3_engine *e, batch_fill *b) {
  while (e->waiting.n > 0 && b->tokens < e->max_batch_tokens) {
    m3_seq *s = e->waiting.at[0];
    m3_request *r = s->req;
    if (m3_request_media_encode(e, r) != M3_OK) {
      finish_request(e, r, M3_FINISH_ERROR, m3_last_error());
      continue;
    }
    int slots = r->forked ? 1 : r->n; /* room for the samples that fork from it */
    if (e->running.n + e->reserved_slots + slots > e->max_running) break;
    /* Placeholder ids say nothing of the pictures behind them: no prefix sharing with media. */
    if (e->prefix_cache && !r->media)
      s->n_computed = m3_kv_seq_match_prefix(e->cache, &s->kv, s->tokens, s->n_tokens - 1);
    if (pages_for(e, s->n_tokens) - s->kv.num_blocks > m3_kv_cache_free_pages(e->cache)) {
      m3_kv_seq_release(e->cache, &s->kv);
      s->n_computed = 0;
      break;
    }
    if (!r->admitted) {
      r->admitted = 1;
      r->cached_prompt_tokens = s->n_computed;
      e->counters.prefix_cache_hit_tokens += (uint64_t)s->n_computed;
      e->counters.prefix_cache_query_tokens += (uint64_t)r->n_prompt;
      e->counters.prompt_tokens_total += (uint64_t)r->n_prompt;
    }
    int take = min_int(s->n_tokens - s->n_computed, e->max_batch_tokens - b->tokens);
    m3_kv_seq_extend(e->cache, &s->kv, take); /* the pages were checked above */
    m3_seq_list_remove(&e->waiting, s);
    m3_seq_list_push(&e->running, s); /* cannot fail: running.n < max_running <= its capacity */
    e->reserved_slots += slots - 1;
    add_to_batch(e, b, s, take, 0);
  }
}

/* Sample 0 has computed its prompt: the other samples start from its pages. */
static void fork_samples(m3_engine *e, m3_seq *s0) {
  m3_request *r = s0->req;
  r->forked = 1;
  e->reserved_slots -= r->n - 1;
  for (int i = 1; i < r->n; i++) {
    m3_seq *s = NULL;
    if (m3_seq_create(e, r, i, &s) == M3_OK &&
        m3_kv_seq_fork(e->cache, &s0->kv, &s->kv) == M3_OK && m3_seq_list_push(&e->running, s)) {
      s->order = s0->order;
      s->n_computed = s0->n_computed;
      r->samples[i] = s;
      continue;
    }
    if (s) m3_seq_free(e, s);
    m3_seq_emit_end(e, r, NULL, i, M3_FINISH_ERROR, "out of memory for a sample");
    m3_request_sample_done(e, r);
  }
}

/* Drafts batch entry k verifies (spec.c), 0 when none. */
static int entry_drafts(const m3_engine *e, int k) {
  const m3_seq *s = e->batch_seq[k];
  return e->batch[k].T - (s->n_tokens - s->n_computed);
}

/* Whether the sampler reads a request's rows as the model gives them: no logit bias, no penalties,
 * no log-probabilities reported. */
static int raw_rows(const m3_sampling_params *p) {
  return !p->logprobs && p->top_logprobs <= 0 && p->n_logit_bias <= 0 &&
         p->repetition_penalty == 1.0f && p->presence_penalty == 0.0f &&
         p->frequency_penalty == 0.0f;
}

/* Whether a request's logits rows are read only for their argmax: each token is forced, or is the
 * sampler's greedy pick from the row unchanged (m3_sampler_sample then returns the argmax of the
 * row itself and draws nothing), and no log-probabilities are reported. */
static int argmax_only(const m3_sampling_params *p) {
  if (p->logprobs || p->top_logprobs > 0) return 0;
  return p->forced_tokens || (p->temperature <= 0.0f && raw_rows(p));
}

/* Whether the backend's sample_rows draws a request's tokens as the sampler would: a plain draw
 * (temperature > 0) from the row unchanged, nothing else read from it. */
static int backend_samplable(const m3_sampling_params *p) {
  return !p->forced_tokens && p->temperature > 0.0f && raw_rows(p);
}

/* What the step's forward hands over of its logits rows. */
typedef enum { HAND_ROWS, HAND_ARGMAX, HAND_DRAWS } handover;

/* HAND_ARGMAX (argmax_rows) when every entry that gets rows is argmax_only and verifies no drafts
 * (m3_spec_verify reads whole rows, and its rejection draws need the distribution); HAND_DRAWS
 * (sample_rows) when besides such entries there are backend_samplable ones, the backend samples,
 * and no row is a prompt's that n samples draw from (fork_samples: those keep the host sampler,
 * which draws from one row n times); else HAND_ROWS. */
static handover step_handover(const m3_engine *e, const batch_fill *b) {
  int draws = 0;
  for (int k = 0; k < b->n; k++) {
    if (!e->batch[k].n_logits) continue;
    const m3_request *r = e->batch_seq[k]->req;
    if (entry_drafts(e, k) > 0) return HAND_ROWS;
    if (argmax_only(&r->p)) continue;
    if (!e->be->ops->sample_rows || !backend_samplable(&r->p) || (!r->forked && r->n > 1))
      return HAND_ROWS;
    draws = 1;
  }
  return draws ? HAND_DRAWS : HAND_ARGMAX;
}

/* e->row_draws for a HAND_DRAWS step, row by row: each plain draw takes its sequence's next PRNG
 * value now, the one m3_sampler_sample would take after the step; argmax_only rows get the argmax
 * (temperature 0) and take none. */
static void fill_row_draws(m3_engine *e, const batch_fill *b) {
  int row = 0;
  for (int k = 0; k < b->n; k++) {
    if (!e->batch[k].n_logits) continue;
    m3_seq *s = e->batch_seq[k];
    const m3_sampling_params *p = &s->req->p;
    e->row_draws[row++] =
        argmax_only(p) ? (m3_row_sampling){.temperature = 0.0f}
                       : (m3_row_sampling){.temperature = p->temperature, .top_p = p->top_p,
                                           .min_p = p->min_p, .top_k = p->top_k,
                                           .unit = m3_sampler_next_unit(&s->rng)};
  }
}

/* Returns 1 when s finished (and is freed). The token comes from the logits row, or on a step
 * that hands over ids (logits NULL) is *picked, the backend's argmax of or draw from that row. */
static int sample_next(m3_engine *e, m3_seq *s, const float *logits, const int32_t *picked) {
  m3_request *r = s->req;
  const m3_sampling_params *p = &r->p;
  int32_t token;
  if (p->forced_tokens) {
    token = p->forced_tokens[s->n_generated];
  } else if (!logits) {
    token = *picked;
  } else {
    const m3_sample_history h = {s->tokens, r->n_prompt, s->tokens + r->n_prompt, s->n_generated};
    token = m3_sampler_sample(p, &s->rng, logits, &h, &e->scratch);
  }
  if (!m3_seq_emit(e, s, token, logits)) return 0;
  m3_seq_retire(e, s);
  return 1;
}

/* Rows of the step in batch order: e->logits, or on a step that hands over ids (`greedy`) each
 * row's argmax or draw alone in e->greedy_ids. */
static void after_forward(m3_engine *e, const batch_fill *b, int greedy) {
  size_t row = 0;
  for (int k = 0; k < b->n; k++) {
    m3_seq *s = e->batch_seq[k];
    const int drafts = entry_drafts(e, k);
    const float *logits = greedy ? NULL : e->logits + row * (size_t)e->vocab;
    const int32_t *picked = greedy ? e->greedy_ids + row : NULL;
    if (drafts > 0) {
      if (m3_spec_verify(e, s, logits, drafts)) e->batch_seq[k] = NULL;
      row += (size_t)drafts + 1;
      continue;
    }
    s->n_computed += e->batch[k].T;
    if (e->prefix_cache && !s->req->media)
      m3_kv_seq_publish(e->cache, &s->kv, s->tokens, s->n_computed);
    if (!e->batch[k].n_logits) continue;
    m3_request *r = s->req;
    if (!r->forked) {
      fork_samples(e, s);
      /* Every sample draws its first token from the prompt's logits. The request is freed
       * when its last sample finishes, so take the list first. */
      int n = 0;
      for (int i = 0; i < r->n; i++)
        if (r->samples[i]) e->scratch_seqs[n++] = r->samples[i];
      for (int i = 0; i < n; i++)
        if (sample_next(e, e->scratch_seqs[i], logits, picked) && e->scratch_seqs[i] == s)
          e->batch_seq[k] = NULL;
    } else if (sample_next(e, s, logits, picked)) {
      e->batch_seq[k] = NULL;
    }
    row++;
  }
}

static void publish_stats(m3_engine *e) {
  pthread_mutex_lock(&e->mu);
  e->stats = e->counters;
  e->stats.running = e->running.n;
  e->stats.waiting = e->waiting.n;
  for (const m3_request *r = e->incoming; r; r = r->next) e->stats.waiting++;
  e->stats.kv_pages_free = m3_kv_cache_free_pages(e->cache);
  e->stats.kv_pages_used = m3_kv_cache_num_pages(e->cache) - e->stats.kv_pages_free;
  const m3_step_graph_stats graphs = m3_model_graph_stats(e->model);
  e->stats.graph_steps_replayed = graphs.replayed;
  e->stats.graph_steps_recorded = graphs.recorded;
  pthread_mutex_unlock(&e->mu);
}

typedef struct {
  m3_engine *e;
  const batch_fill *b;
  handover how;
} step_forward;

/* The step's forward on the engine's own model (rank 0 when there are several: the other ranks
 * run theirs alongside, ranks.h). */
static m3_status forward_rank0(void *arg) {
  const step_forward *f = arg;
  m3_engine *e = f->e;
  float *const *hidden = m3_spec_batch_hidden(e);
  if (f->how == HAND_DRAWS) {
    fill_row_draws(e, f->b);
    return m3_model_forward_batch_sample(e->model, e->batch, f->b->n, e->logits, e->row_draws,
                                         e->greedy_ids, hidden);
  }
  if (f->how == HAND_ARGMAX)
    return m3_model_forward_batch_argmax(e->model, e->batch, f->b->n, e->logits, e->greedy_ids,
                                         hidden);
  return m3_model_forward_batch_hidden(e->model, e->batch, f->b->n, e->logits, hidden);
}

m3_status m3_sched_step(m3_engine *e) {
  double t0 = now_seconds();
  take_handover(e);
  batch_fill b = {0, 0};
  schedule_running(e, &b);
  admit_waiting(e, &b);
  double t1 = now_seconds(), t2 = t1;
  if (b.n > 0) {
    const handover how = step_handover(e, &b);
    step_forward f = {e, &b, how};
    const m3_status st =
        e->ranks ? m3_ranks_run(e->ranks, e->batch, e->batch_kv, b.n, how == HAND_ARGMAX,
                                forward_rank0, &f)
                 : forward_rank0(&f);
    t2 = now_seconds();
    if (st != M3_OK) {
      /* A request may own several sequences of the batch: collect each once, then finish. */
      int n = 0;
      for (int k = 0; k < b.n; k++) {
        m3_request *r = e->batch_seq[k]->req;
        int seen = 0;
        for (int j = 0; j < n; j++) seen |= e->scratch_reqs[j] == r;
        if (!seen) e->scratch_reqs[n++] = r;
      }
      for (int j = 0; j < n; j++) finish_request(e, e->scratch_reqs[j], M3_FINISH_ERROR, m3_last_error());
    } else {
      after_forward(e, &b, how != HAND_ROWS);
      if (e->spec) {
        double t_draft = now_seconds();
        m3_spec_propose(e, b.n);
        t2 += now_seconds() - t_draft; /* drafting counts as forward time */
      }
    }
    e->counters.steps++;
  }
  double t3 = now_seconds();
  e->counters.step_seconds_total += t2 - t1;
  e->counters.schedule_seconds_total += (t1 - t0) + (t3 - t2);
  publish_stats(e);
  return M3_OK;
}
