/* spec.c: speculative decoding in the continuous-batching step (m3_text_spec.md §8.3, §8.4).
 *
 * Per decoding sequence with drafts d1..dk (its last token x_m not yet computed):
 *   verify     the target runs [x_m, d1..dk] at positions m..m+k in the same batched forward as
 *              everything else (each row with its own MSA selection and causal horizon) and
 *              returns k + 1 logits rows. Row i is sampled as a normal step would be, through
 *              m3_sampler_verify: d_{i+1} is accepted while it is what row i gives (greedy) or
 *              passes the rejection test (temperature > 0); the first rejection emits the
 *              replacement, all k accepted emit a bonus token from row k. The target cache is
 *              truncated to the accepted positions (K, V and index keys of rejected ones are
 *              dropped with the pages past the end and overwritten in kept pages).
 *   catch-up   the drafter runs over every position p the target computed in this step whose
 *              next token is known, with the target's hidden states at p (captured by the same
 *              forward) and x_{p+1}: this warms the drafter's cache over the prompt (chunk by
 *              chunk) and over each round's accepted tokens, and its last row proposes d1.
 *   chain      d2..dk from the drafter alone, each at the next position with the previous
 *              draft and the drafter's own previous output.
 * Sequences without drafts (prefill, forced tokens, a budget too small) decode as usual in the
 * same batch. Positions the drafter never saw (prefix-cache hits, forked samples) stay holes in
 * its cache: drafts get worse there, outputs do not change.
 * The oracle (a test hook) replaces catch-up and chain only: its drafts for generated token i are
 * the request's oracle_tokens[i], and they are scheduled, verified and rolled back by the same
 * code as a drafter's, so tests decide exactly which drafts are right. */
#include <stdlib.h>
#include <string.h>

#include "engine/engine_internal.h"
#include "model/draft.h"

enum { DEFAULT_DRAFTS = 3, MAX_DRAFTS = 16 };

typedef struct m3_spec_seq {
  m3_kv_seq kv;            /* drafter cache pages */
  m3_kv_view *views;       /* [drafter cache layers] */
  int done;                /* the drafter cache holds positions [0, done) */
  float *state;            /* [Hd] the drafter's output at its latest row, to chain from */
  int32_t drafts[MAX_DRAFTS];
  int n_drafts, drafts_for; /* valid while the sequence has drafts_for tokens */
} m3_spec_seq;

typedef struct m3_spec {
  int oracle;              /* drafts from the requests' oracle_tokens; no drafter, no buffers */
  m3_drafter *d;
  m3_kv_cache *cache;      /* the drafter's own pages */
  int k, width, Hd, layers;
  float *hidden;           /* [max_batch_tokens, width] the step's target hidden states */
  float **batch_hidden;    /* [max_running] entry k's rows in `hidden` */
  int *entry_row;          /* [max_running] */
  m3_draft_seq *dseqs;     /* [max_running] */
  m3_seq **owner;          /* [max_running] */
  int32_t *pos;            /* [max_batch_tokens + max_running] drafter positions */
  float *hout;             /* [max_batch_tokens, Hd] catch-up outputs */
  int32_t *first_draft;    /* [max_running] */
} m3_spec;

m3_status m3_spec_open(m3_engine *e, const m3_engine_options *o) {
  if (!o->speculative || !o->speculative[0]) return M3_OK;
  const int mtp = strcmp(o->speculative, "mtp") == 0, eagle3 = strcmp(o->speculative, "eagle3") == 0;
  const int oracle = strcmp(o->speculative, "oracle") == 0;
  if (!mtp && !eagle3 && !oracle)
    return m3_fail(M3_ERR_ARG, "speculative '%s': expected mtp or eagle3", o->speculative);
  if (eagle3 && (!o->draft_dir || !o->draft_dir[0]))
    return m3_fail(M3_ERR_ARG, "speculative eagle3 needs a draft folder (--draft DIR)");
  if (o->num_draft < 0 || o->num_draft > MAX_DRAFTS)
    return m3_fail(M3_ERR_ARG, "num_draft %d outside 1..%d", o->num_draft, MAX_DRAFTS);
  m3_spec *sp = calloc(1, sizeof *sp);
  if (!sp) return m3_fail(M3_ERR_NOMEM, "speculative decoding: out of memory");
  e->spec = sp;
  sp->k = o->num_draft ? o->num_draft : DEFAULT_DRAFTS;
  sp->oracle = oracle;
  if (oracle) return M3_OK;
  m3_status st = mtp ? m3_drafter_mtp_create(e->model, &sp->d)
                     : m3_drafter_eagle3_load(o->draft_dir, e->model, &sp->d);
  if (st != M3_OK) return st;
  int n_layers;
  const int *layers = m3_drafter_target_layers(sp->d, &n_layers);
  if ((st = m3_model_set_hidden_layers(e->model, layers, n_layers)) != M3_OK) return st;
  sp->width = m3_model_hidden_width(e->model);
  sp->Hd = m3_drafter_hidden_size(sp->d);
  const m3_config *dc = m3_drafter_cache_config(sp->d);
  sp->layers = dc->num_layers;
  /* Room for every page the target cache can hold, plus each sequence's drafted tail. */
  const size_t pages = (size_t)m3_kv_cache_num_pages(e->cache) + 2 * (size_t)e->max_running + 2;
  /* The drafter's cache stays float32 under --kv-dtype fp8: it is small, and its precision only
   * moves the acceptance rate. */
  if ((st = m3_kv_cache_create(dc, e->be, M3_KV_F32, pages * m3_kv_page_bytes(dc, M3_KV_F32),
                               &sp->cache)) != M3_OK)
    return st;
  const size_t R = (size_t)e->max_running, B = (size_t)e->max_batch_tokens;
  sp->hidden = malloc(B * (size_t)sp->width * sizeof(float));
  sp->batch_hidden = calloc(R, sizeof *sp->batch_hidden);
  sp->entry_row = calloc(R, sizeof *sp->entry_row);
  sp->dseqs = calloc(R, sizeof *sp->dseqs);
  sp->owner = calloc(R, sizeof *sp->owner);
  sp->pos = malloc((B + R) * sizeof *sp->pos);
  sp->hout = malloc(B * (size_t)sp->Hd * sizeof(float));
  sp->first_draft = malloc(R * sizeof *sp->first_draft);
  if (!sp->hidden || !sp->batch_hidden || !sp->entry_row || !sp->dseqs || !sp->owner ||
      !sp->pos || !sp->hout || !sp->first_draft)
    return m3_fail(M3_ERR_NOMEM, "speculative decoding: step buffers");
  return M3_OK;
}

void m3_spec_close(m3_engine *e) {
  m3_spec *sp = e->spec;
  if (!sp) return;
  m3_kv_cache_free(sp->cache);
  m3_drafter_free(sp->d);
  free(sp->hidden);
  free(sp->batch_hidden);
  free(sp->entry_row);
  free(sp->dseqs);
  free(sp->owner);
  free(sp->pos);
  free(sp->hout);
  free(sp->first_draft);
  free(sp);
  e->spec = NULL;
}

int m3_spec_num_draft(const m3_engine *e) { return e->spec ? e->spec->k : 0; }

int m3_spec_oracle(const m3_engine *e) { return e->spec && e->spec->oracle; }

void m3_spec_seq_free(m3_engine *e, m3_seq *s) {
  m3_spec_seq *q = s->spec;
  if (!q) return;
  if (e->spec->cache) m3_kv_seq_release(e->spec->cache, &q->kv);
  free(q->views);
  free(q->state);
  free(q);
  s->spec = NULL;
}

static m3_spec_seq *seq_state(m3_engine *e, m3_seq *s) {
  if (s->spec) return s->spec;
  m3_spec_seq *q = calloc(1, sizeof *q);
  if (!q) return NULL;
  m3_kv_seq_init(&q->kv);
  s->spec = q;
  if (e->spec->oracle) return q;
  q->views = calloc((size_t)e->spec->layers, sizeof *q->views);
  q->state = malloc((size_t)e->spec->Hd * sizeof *q->state);
  if (!q->views || !q->state) {
    s->spec = NULL;
    free(q->views);
    free(q->state);
    free(q);
    return NULL;
  }
  return q;
}

/* Drafts worth making for s now: it decodes next, and they fit the request's limits (each
 * verification emits up to one token more than it drafts). */
static int draft_limit(const m3_engine *e, const m3_seq *s) {
  const m3_request *r = s->req;
  if (s->finished || r->p.forced_tokens || !r->forked || s->n_computed != s->n_tokens - 1) return 0;
  int k = e->spec->k;
  if (r->p.max_tokens > 0 && r->p.max_tokens - s->n_generated - 1 < k)
    k = r->p.max_tokens - s->n_generated - 1;
  if (e->info.max_context - s->n_tokens < k) k = e->info.max_context - s->n_tokens;
  return k > 0 ? k : 0;
}

int m3_spec_take_drafts(m3_engine *e, m3_seq *s, int take, int room) {
  m3_spec_seq *q = s->spec;
  if (!e->spec || !q || take != 1 || s->n_computed != s->n_tokens - 1 ||
      q->drafts_for != s->n_tokens || q->n_drafts == 0)
    return 0;
  int n = q->n_drafts < room ? q->n_drafts : room;
  if (n <= 0) return 0;
  if (s->n_tokens + n > s->cap) {
    int32_t *tokens = realloc(s->tokens, (size_t)(s->n_tokens + n) * 2 * sizeof *tokens);
    if (!tokens) return 0;
    s->tokens = tokens;
    s->cap = (s->n_tokens + n) * 2;
  }
  memcpy(s->tokens + s->n_tokens, q->drafts, (size_t)n * sizeof *q->drafts);
  q->n_drafts = 0;
  return n;
}

void m3_spec_batch_add(m3_engine *e, int k, int row) {
  m3_spec *sp = e->spec;
  if (sp->oracle) return;
  sp->batch_hidden[k] = sp->hidden + (size_t)row * sp->width;
  sp->entry_row[k] = row;
}

float *const *m3_spec_batch_hidden(m3_engine *e) {
  return e->spec && !e->spec->oracle ? e->spec->batch_hidden : NULL;
}

int m3_spec_verify(m3_engine *e, m3_seq *s, const float *logits, int n) {
  m3_request *r = s->req;
  int32_t drafts[MAX_DRAFTS];
  memcpy(drafts, s->tokens + s->n_computed + 1, (size_t)n * sizeof *drafts);
  e->counters.spec_draft_tokens += (uint64_t)n;
  e->counters.spec_rounds++;
  for (int i = 0; i <= n; i++) {
    const float *row = logits + (size_t)i * (size_t)e->vocab;
    const m3_sample_history h = {s->tokens, r->n_prompt, s->tokens + r->n_prompt, s->n_generated};
    const int32_t draft = i < n ? drafts[i] : -1;
    const int32_t token = m3_sampler_verify(&r->p, &s->rng, row, &h, &e->scratch, draft);
    const int accepted = i < n && token == draft;
    e->counters.spec_accepted_tokens += (uint64_t)accepted;
    if (m3_seq_emit(e, s, token, row)) {
      m3_seq_retire(e, s);
      return 1;
    }
    if (!accepted) break;
  }
  /* Positions up to the last accepted draft hold the right keys; the newest token has none.
   * Pages of a prompt with media are never published (its placeholder ids do not name the
   * pictures), as after a plain decode. */
  s->n_computed = s->n_tokens - 1;
  m3_kv_seq_truncate(e->cache, &s->kv, s->n_computed);
  if (e->prefix_cache && !r->media) m3_kv_seq_publish(e->cache, &s->kv, s->tokens, s->n_computed);
  return 0;
}

/* Pages for drafter positions [0, end), dropping any past `keep` (stale chained rows). */
static int fit_drafter_cache(m3_spec *sp, m3_spec_seq *q, int keep, int end) {
  if (q->kv.num_tokens > keep) m3_kv_seq_truncate(sp->cache, &q->kv, keep);
  if (q->kv.num_tokens < end && m3_kv_seq_extend(sp->cache, &q->kv, end - q->kv.num_tokens) != M3_OK) {
    m3_kv_seq_release(sp->cache, &q->kv);
    q->done = 0;
    return 0;
  }
  m3_kv_seq_views(sp->cache, &q->kv, q->views);
  return 1;
}

/* The catch-up rows of batch entry k into dseqs[*n]: positions [lo, hi) of the target's rows
 * [p0, p0 + T) whose next token is known and that the drafter has not seen. */
static void add_catch_up(m3_engine *e, int k, int *n, int *rows) {
  m3_spec *sp = e->spec;
  m3_seq *s = e->batch_seq[k];
  if (s->req->p.forced_tokens) return;
  m3_spec_seq *q = seq_state(e, s);
  if (!q) return;
  const int p0 = e->batch[k].pos[0], T = e->batch[k].T;
  const int lo = q->done > p0 ? q->done : p0;
  const int hi = p0 + T < s->n_computed ? p0 + T : s->n_computed;
  q->n_drafts = 0;
  if (lo >= hi || !fit_drafter_cache(sp, q, lo, hi)) return;
  for (int p = lo; p < hi; p++) sp->pos[*rows + p - lo] = p;
  sp->dseqs[*n] = (m3_draft_seq){
      .kv = q->views, .ids = s->tokens + lo + 1, .pos = sp->pos + *rows, .T = hi - lo,
      .hidden = sp->hidden + (size_t)(sp->entry_row[k] + lo - p0) * sp->width,
      .hidden_out = sp->hout + (size_t)*rows * sp->Hd,
      .draft = draft_limit(e, s) > 0 ? &sp->first_draft[*n] : NULL};
  sp->owner[(*n)++] = s;
  *rows += hi - lo;
}

/* A failed drafter forward costs the drafts, never the request: the drafter cache restarts. */
static void drop_drafter_state(m3_engine *e, int n) {
  for (int i = 0; i < n; i++) {
    m3_spec_seq *q = e->spec->owner[i]->spec;
    m3_kv_seq_release(e->spec->cache, &q->kv);
    q->done = 0;
    q->n_drafts = 0;
  }
}

/* The oracle's drafts: the request's list from the next generated token on, as many as a drafter
 * would make. */
static void propose_oracle(m3_engine *e, int n_entries) {
  for (int k = 0; k < n_entries; k++) {
    m3_seq *s = e->batch_seq[k];
    if (!s) continue;
    m3_spec_seq *q = seq_state(e, s);
    if (!q) continue;
    const m3_sampling_params *p = &s->req->p;
    const int left = p->oracle_tokens ? p->n_oracle_tokens - s->n_generated : 0;
    const int limit = draft_limit(e, s) < left ? draft_limit(e, s) : left;
    for (q->n_drafts = 0; q->n_drafts < limit; q->n_drafts++)
      q->drafts[q->n_drafts] = p->oracle_tokens[s->n_generated + q->n_drafts];
    q->drafts_for = s->n_tokens;
  }
}

void m3_spec_propose(m3_engine *e, int n_entries) {
  m3_spec *sp = e->spec;
  if (sp->oracle) {
    propose_oracle(e, n_entries);
    return;
  }
  int n = 0, rows = 0;
  for (int k = 0; k < n_entries; k++)
    if (e->batch_seq[k]) add_catch_up(e, k, &n, &rows);
  if (n == 0) return;
  if (m3_drafter_forward(sp->d, sp->dseqs, n, 0) != M3_OK) {
    drop_drafter_state(e, n);
    return;
  }
  int chained = 0;
  for (int i = 0; i < n; i++) {
    m3_seq *s = sp->owner[i];
    m3_spec_seq *q = s->spec;
    const m3_draft_seq *ds = &sp->dseqs[i];
    q->done = ds->pos[ds->T - 1] + 1;
    memcpy(q->state, ds->hidden_out + (size_t)(ds->T - 1) * sp->Hd, (size_t)sp->Hd * sizeof(float));
    if (!ds->draft) continue;
    q->drafts[0] = *ds->draft;
    q->n_drafts = 1;
    q->drafts_for = s->n_tokens;
    sp->owner[chained++] = s;
  }
  /* Drafts 2..k: one drafter row per sequence and step, at the position after the last. */
  for (int step = 1; chained > 0; step++) {
    int m = 0;
    for (int i = 0; i < chained; i++) {
      m3_seq *s = sp->owner[i];
      m3_spec_seq *q = s->spec;
      if (q->n_drafts != step || step >= draft_limit(e, s)) continue;
      const int p = q->done - 1 + step;
      if (!fit_drafter_cache(sp, q, p, p + 1)) {
        q->n_drafts = 0;
        continue;
      }
      sp->pos[m] = p;
      sp->dseqs[m] = (m3_draft_seq){.kv = q->views, .ids = &q->drafts[step - 1],
                                    .pos = &sp->pos[m], .T = 1, .hidden = q->state,
                                    .hidden_out = q->state, .draft = &q->drafts[step]};
      sp->owner[m++] = s;
    }
    if (m == 0) break;
    if (m3_drafter_forward(sp->d, sp->dseqs, m, step) != M3_OK) {
      drop_drafter_state(e, m);
      break;
    }
    for (int i = 0; i < m; i++) sp->owner[i]->spec->n_drafts++;
    chained = m;
  }
}
