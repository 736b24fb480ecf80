/* engine_internal.h (internal to src/engine): the objects behind m3_engine.
 *
 * A request owns n samples; each sample is one sequence: its tokens (prompt + generated), its
 * KV pages and its output state. Sample 0 prefills the prompt; at the prompt's last token the
 * other samples fork from it, sharing its pages (copy-on-write where they diverge).
 *
 * Threads: `mu` guards only the hand-over lists (incoming, cancels), the active count and the
 * published stats. Everything else belongs to the thread that runs the engine, and callbacks run
 * there without the lock held, so they may call m3_submit or m3_cancel. */
#ifndef M3_ENGINE_INTERNAL_H
#define M3_ENGINE_INTERNAL_H

#include <pthread.h>
#include <stdint.h>

#include "engine/kvcache.h"
#include "engine/sampler.h"
#include "m3.h"
#include "model/model.h"
#include "tok/tokenizer.h"

typedef struct m3_request m3_request;

typedef struct {
  m3_request *req;
  int index;                 /* sample number */
  uint64_t order;            /* scheduling priority: earlier requests first */
  int32_t *tokens;           /* [cap] prompt, then generated */
  int n_tokens, cap;
  int n_computed;            /* leading tokens whose K/V are in kv */
  int n_generated;
  m3_kv_seq kv;
  m3_kv_view *views;         /* [num_layers] */
  uint64_t rng;
  m3_detok_stream detok;
  char *held;                /* decoded text not yet emitted: it may begin a stop string */
  size_t n_held, cap_held;
  int finished;
  struct m3_spec_seq *spec;  /* speculative decoding state (spec.c); NULL until drafted for */
} m3_seq;

struct m3_request {
  uint64_t id;
  m3_sampling_params p;      /* deep copy; the arrays below own its pointers */
  char **stop;
  int32_t *stop_ids, *bias_ids, *forced, *oracle;
  float *bias_values;
  int32_t *prompt;
  int n_prompt, n;           /* n: samples */
  struct m3_request_media *media; /* images/videos of the prompt (media.c); NULL if none */
  m3_token_callback cb;
  void *user;
  m3_seq **samples;          /* [n]; 1..n-1 stay NULL until sample 0 has its prompt computed */
  int n_finished;
  int forked;                /* samples 1..n-1 exist (or finished); always 1 when n == 1 */
  int admitted;              /* counted in the prefix-cache statistics */
  int cached_prompt_tokens;
  m3_request *next;          /* in the incoming list */
};

/* A growable array of sequences. */
typedef struct {
  m3_seq **at;
  int n, cap;
} m3_seq_list;

struct m3_engine {
  m3_backend *be;
  m3_model *model;
  m3_tokenizer *tok;         /* NULL when the folder has none */
  pthread_mutex_t tok_mu;    /* encoding mutates the tokenizer's cache */
  m3_kv_cache *cache;
  m3_model_info info;
  char name[256];
  int max_batch_tokens, max_running, prefix_cache, num_layers, vocab;

  /* Engine thread only. */
  m3_seq_list running, waiting;
  uint64_t next_order;
  int reserved_slots;        /* running places kept for samples that fork later */
  float *logits;             /* [rows, vocab], rows = max_running * (1 + drafts per step) */
  int32_t *greedy_ids;       /* [rows] each row's argmax, or the backend's draw from it, on a
                              * step that takes only those */
  m3_row_sampling *row_draws; /* [max_running] each row's draw, on a step the backend samples */
  m3_model_seq *batch;       /* [max_running] */
  m3_seq **batch_seq;        /* [max_running] */
  const m3_kv_seq **batch_kv; /* [max_running] each entry's pages (the other ranks read them) */
  int32_t *batch_pos;        /* [max_batch_tokens] */
  m3_seq **scratch_seqs;     /* [max_running] */
  m3_request **scratch_reqs; /* [max_running] */
  m3_sampler_scratch scratch;
  float top_lp[20];
  int32_t top_ids[20];
  m3_engine_stats counters;
  struct m3_spec *spec;      /* speculative decoding (spec.c); NULL when off */
  struct m3_ranks *ranks;    /* ranks 1.. of --tp x --ep (ranks.h); NULL with one rank */

  /* Guarded by mu. */
  pthread_mutex_t mu;
  pthread_cond_t work, idle;
  m3_request *incoming, *incoming_tail;
  uint64_t *cancels;
  int n_cancels, cap_cancels;
  int cancel_all;
  int active;                /* requests submitted and not finished */
  int accepting;
  uint64_t next_id, seed_state, counters_submitted;
  m3_engine_stats stats;
  pthread_t thread;
  int thread_running, quit;
};

/* scheduler.c: one step (takes hand-overs, schedules, runs the batch, emits tokens). */
m3_status m3_sched_step(m3_engine *e);
/* Finishes every sample of every request the engine holds with M3_FINISH_CANCELLED. */
void m3_sched_cancel_all(m3_engine *e);

/* output.c: a sample's token, its text, stop conditions and the callback. */
m3_status m3_seq_create(m3_engine *e, m3_request *r, int index, m3_seq **out);
void m3_seq_free(m3_engine *e, m3_seq *s);
/* Appends `token` (sampled from `logits`) and reports it; returns 1 when the sample finished.
 * logits is read only for log-probabilities: NULL when the request asks for none. */
int m3_seq_emit(m3_engine *e, m3_seq *s, int32_t token, const float *logits);
/* Reports a finish without a token (cancel, error) for sample `index` of r (s may be NULL for a
 * sample not forked yet). */
void m3_seq_emit_end(m3_engine *e, m3_request *r, m3_seq *s, int index, m3_finish_reason why,
                     const char *error);
/* After a sample finished: frees it, and the request once all its samples are done. */
void m3_seq_retire(m3_engine *e, m3_seq *s);
/* Frees a request and the copies it owns. */
void m3_request_free(m3_request *r);
/* Counts one more finished sample of r; frees r (and counts it inactive) after the last. */
void m3_request_sample_done(m3_engine *e, m3_request *r);

/* spec.c: speculative decoding inside the scheduler's step.
 *   schedule: m3_spec_take_drafts puts a decoding sequence's drafts after its last token, and
 *             the batch entry verifies [last token, drafts] (m3_spec_batch_add gives it the
 *             buffer for its target hidden states);
 *   after the forward: m3_spec_verify accepts or rejects them and emits the tokens;
 *   then m3_spec_propose runs the drafter over the newly computed positions and drafts anew. */
m3_status m3_spec_open(m3_engine *e, const m3_engine_options *o);
void m3_spec_close(m3_engine *e);
/* Whether the drafter is the oracle test hook (drafts from m3_sampling_params.oracle_tokens). */
int m3_spec_oracle(const m3_engine *e);
/* Drafts per step (0 when speculation is off): the logits rows a sequence may need, minus one. */
int m3_spec_num_draft(const m3_engine *e);
/* For a sequence about to compute `take` tokens: how many drafts (<= room) now follow its last
 * token in s->tokens, to be verified in this step; 0 when none. */
int m3_spec_take_drafts(m3_engine *e, m3_seq *s, int take, int room);
/* Batch entry k starts at row `row` of the step's tokens. */
void m3_spec_batch_add(m3_engine *e, int k, int row);
/* The step's per-entry hidden buffers for m3_model_forward_batch_hidden. */
float *const *m3_spec_batch_hidden(m3_engine *e);
/* Verifies the n drafts of s from its n + 1 logits rows, emits the tokens; 1 when s retired. */
int m3_spec_verify(m3_engine *e, m3_seq *s, const float *logits, int n);
/* After the step's tokens are out: drafts for batch entries 0..n-1 whose e->batch_seq[k] is not
 * NULL (from the drafter, or the oracle's lists). */
void m3_spec_propose(m3_engine *e, int n);
void m3_spec_seq_free(m3_engine *e, m3_seq *s);

/* engine.c: m3_submit, handing the request `media` (may be NULL); on failure the caller keeps it. */
m3_status m3_submit_with(m3_engine *e, const int32_t *prompt, int n_prompt,
                         struct m3_request_media *media, const m3_sampling_params *params,
                         m3_token_callback cb, void *user, uint64_t *request_id);

/* media.c: a request's images and videos. */
typedef struct m3_request_media m3_request_media;
void m3_request_media_free(m3_request_media *rm);
/* Runs the vision tower over the request's items once (later calls do nothing). */
m3_status m3_request_media_encode(m3_engine *e, m3_request *r);
/* Points a prefill batch entry of s at the request's vision rows. */
void m3_request_media_batch(const m3_engine *e, const m3_seq *s, m3_model_seq *entry);

int m3_seq_list_push(m3_seq_list *l, m3_seq *s);
/* Returns whether s was in the list. */
int m3_seq_list_remove(m3_seq_list *l, m3_seq *s);

#endif
