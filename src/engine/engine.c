/* engine.c: m3.h: opening the model, handing requests to the scheduler, and the loop thread. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/engine_internal.h"
#include "engine/ranks.h"
#include "io/tiny.h"

enum { DEFAULT_MAX_RUNNING = 64, MAX_TOP_LOGPROBS = 20 };

void m3_engine_options_init(m3_engine_options *o) {
  *o = (m3_engine_options){.device = "cpu", .prefix_cache = 1};
}

void m3_sampling_params_init(m3_sampling_params *p) {
  *p = (m3_sampling_params){.temperature = 1.0f, .top_p = 1.0f, .repetition_penalty = 1.0f,
                            .n = 1, .skip_special_tokens = 1};
}

/* A quarter of MemAvailable, and no more than max_running full contexts. */
static size_t default_kv_budget(const m3_config *cfg, m3_kv_dtype dt, int max_running) {
  size_t avail = 0;
  FILE *f = fopen("/proc/meminfo", "r");
  if (f) {
    char line[256];
    unsigned long long kb;
    while (fgets(line, sizeof line, f))
      if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) avail = (size_t)kb * 1024;
    fclose(f);
  }
  if (avail == 0) avail = (size_t)1 << 30;
  int context = cfg->max_position_embeddings > 0 && cfg->max_position_embeddings < INT32_MAX
                    ? (int)cfg->max_position_embeddings : 1 << 20;
  size_t want = m3_kv_bytes_for_tokens(cfg, dt, context);
  want = want > SIZE_MAX / (size_t)max_running ? SIZE_MAX : want * (size_t)max_running;
  size_t budget = avail / 4 < want ? avail / 4 : want;
  return budget < m3_kv_page_bytes(cfg, dt) ? m3_kv_page_bytes(cfg, dt) : budget;
}

static m3_status load_tokenizer(m3_engine *e, const char *dir) {
  char path[4096];
  if ((size_t)snprintf(path, sizeof path, "%s/tokenizer.json", dir) >= sizeof path)
    return m3_fail(M3_ERR_ARG, "model folder path too long: %s", dir);
  if (access(path, R_OK) != 0) return M3_OK; /* ids only */
  return m3_tok_load(path, &e->tok);
}

static void set_name(m3_engine *e, const char *dir, int builtin) {
  if (builtin) {
    snprintf(e->name, sizeof e->name, "m3-builtin");
    return;
  }
  size_t len = strlen(dir);
  while (len > 1 && dir[len - 1] == '/') len--;
  size_t start = len;
  while (start > 0 && dir[start - 1] != '/') start--;
  snprintf(e->name, sizeof e->name, "%.*s", (int)(len - start), dir + start);
}

static m3_status alloc_buffers(m3_engine *e) {
  /* A sequence verifying drafts takes one logits row per draft and one more. */
  const size_t rows = (size_t)e->max_running * (size_t)(1 + m3_spec_num_draft(e));
  e->logits = e->be->ops->alloc_host(e->be, rows * (size_t)e->vocab * sizeof *e->logits);
  e->greedy_ids = e->be->ops->alloc_host(e->be, rows * sizeof *e->greedy_ids);
  e->row_draws = calloc((size_t)e->max_running, sizeof *e->row_draws);
  e->batch = calloc((size_t)e->max_running, sizeof *e->batch);
  e->batch_seq = calloc((size_t)e->max_running, sizeof *e->batch_seq);
  e->batch_kv = calloc((size_t)e->max_running, sizeof *e->batch_kv);
  e->scratch_seqs = calloc((size_t)e->max_running, sizeof *e->scratch_seqs);
  e->scratch_reqs = calloc((size_t)e->max_running, sizeof *e->scratch_reqs);
  e->batch_pos = calloc((size_t)e->max_batch_tokens, sizeof *e->batch_pos);
  if (!e->logits || !e->greedy_ids || !e->row_draws || !e->batch || !e->batch_seq ||
      !e->batch_kv || !e->scratch_seqs || !e->scratch_reqs || !e->batch_pos)
    return m3_fail(M3_ERR_NOMEM, "engine: cannot allocate the batch buffers (%d sequences, "
                   "vocabulary %d)", e->max_running, e->vocab);
  return m3_sampler_scratch_init(&e->scratch, e->vocab);
}

m3_status m3_engine_open(const m3_engine_options *opts, m3_engine **out) {
  *out = NULL;
  m3_engine_options o;
  m3_engine_options_init(&o);
  if (opts) o = *opts;
  if (o.max_batch_tokens < 0 || o.max_running < 0 || o.threads < 0 || o.tp < 0 || o.ep < 0)
    return m3_fail(M3_ERR_ARG, "engine options: max_batch_tokens %d, max_running %d, threads %d, "
                   "tp %d, ep %d must be >= 0", o.max_batch_tokens, o.max_running, o.threads, o.tp,
                   o.ep);
  if (o.nnodes > 1 && o.node_rank != 0)
    return m3_fail(M3_ERR_ARG, "engine options: node_rank %d of %d nodes: the engine is node 0, "
                   "the others follow it (m3_engine_follow)", o.node_rank, o.nnodes);
  int tp, ep;
  m3_ranks_layout(&o, &tp, &ep);
  m3_engine *e = calloc(1, sizeof *e);
  if (!e) return m3_fail(M3_ERR_NOMEM, "engine: out of memory");
  pthread_mutex_init(&e->mu, NULL);
  pthread_mutex_init(&e->tok_mu, NULL);
  pthread_cond_init(&e->work, NULL);
  pthread_cond_init(&e->idle, NULL);
  e->accepting = 1;
  e->next_id = 1;
  e->seed_state = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);

  char dir[4096];
  m3_status st = M3_OK;
  const m3_config *cfg;
  if (o.model_dir) snprintf(dir, sizeof dir, "%s", o.model_dir);
  else if ((st = m3_builtin_model_dir(dir, sizeof dir)) != M3_OK) goto fail;
  /* Several ranks: refused combinations before anything loads; each rank's CPU workers a share. */
  const int threads = tp * ep > 1 ? m3_ranks_threads(o.threads, tp * ep) : o.threads;
  if ((tp * ep > 1 || o.nnodes > 1) && (st = m3_ranks_check(dir, &o)) != M3_OK) goto fail;
  if (tp * ep > 1) m3_ranks_before_backends(&o);
  if ((st = m3_backend_create(o.device ? o.device : "cpu", threads, &e->be)) != M3_OK) {
    if (tp * ep > 1)
      st = m3_fail_context(st, "--tp %d --ep %d: rank 0 of %d on %s", tp, ep, tp * ep,
                           o.device ? o.device : "cpu");
    goto fail;
  }
  if (o.quantize && o.quantize[0] && strcmp(o.quantize, "mxfp8") != 0) {
    st = m3_fail(M3_ERR_ARG, "engine options: quantize '%s' (expected mxfp8)", o.quantize);
    goto fail;
  }
  /* Checked before the weights load: a refused cache dtype fails at once. */
  m3_kv_dtype kv_dtype = M3_KV_F32;
  if (o.kv_dtype && o.kv_dtype[0] &&
      ((st = m3_kv_dtype_parse("engine options: kv_dtype", o.kv_dtype, &kv_dtype)) != M3_OK ||
       (st = m3_kv_dtype_check(e->be, kv_dtype)) != M3_OK))
    goto fail;
  const m3_model_load_options load = {.quantize_mxfp8 = o.quantize && o.quantize[0],
                                      .threads = threads, .progress = o.on_load_progress,
                                      .user = o.load_user, .tp_size = tp, .ep_size = ep};
  /* The other ranks load their shares alongside rank 0's (the slow part of opening). */
  if (tp * ep > 1 && (st = m3_ranks_start(dir, &o, &load, &e->ranks)) != M3_OK) goto fail;
  if ((st = m3_model_load_with(dir, e->be, &load, &e->model)) != M3_OK) goto fail;
  if ((st = load_tokenizer(e, dir)) != M3_OK) goto fail;
  m3_model_prefault(e->model, o.on_load_progress, o.load_user);
  cfg = m3_model_config(e->model);
  e->num_layers = cfg->num_layers;
  e->vocab = cfg->vocab_size;
  e->prefix_cache = o.prefix_cache != 0;
  e->max_running = o.max_running ? o.max_running : DEFAULT_MAX_RUNNING;
  e->max_batch_tokens = o.max_batch_tokens ? o.max_batch_tokens : m3_model_step_tokens(e->model);
  size_t budget = o.kv_memory_bytes ? o.kv_memory_bytes
                                     : default_kv_budget(cfg, kv_dtype, e->max_running);
  if ((st = m3_kv_cache_create(cfg, e->be, kv_dtype, budget, &e->cache)) != M3_OK) goto fail;
  if (e->ranks && (st = m3_ranks_connect(e->ranks, e->model, e->cache)) != M3_OK) goto fail;
  if ((st = m3_spec_open(e, &o)) != M3_OK) goto fail;
  if ((st = alloc_buffers(e)) != M3_OK) goto fail;

  set_name(e, dir, o.model_dir == NULL);
  const int page = m3_kv_cache_block_size(e->cache), pages = m3_kv_cache_num_pages(e->cache);
  long long fits = (long long)page * pages;
  long long max_pos = cfg->max_position_embeddings > 0 ? cfg->max_position_embeddings : fits;
  e->info = (m3_model_info){
      .name = e->name,
      .vocab_size = cfg->vocab_size,
      .max_context = (int)(max_pos < fits ? max_pos : fits),
      .eos_token_id = cfg->eos_token_id,
      .chat_format = M3_CHAT_M3,
      .kv_pages_total = pages,
      .kv_page_tokens = page,
      .kv_dtype = m3_kv_dtype_name(kv_dtype),
  };
  e->counters.kv_pages_free = pages;
  e->stats = e->counters;
  *out = e;
  return M3_OK;

fail:
  m3_engine_close(e);
  return st;
}

m3_status m3_engine_follow(const m3_engine_options *opts) {
  const m3_engine_options o = *opts;
  if (o.nnodes < 2 || o.node_rank < 1 || o.node_rank >= o.nnodes || o.threads < 0)
    return m3_fail(M3_ERR_ARG, "engine options: node_rank %d of %d nodes (threads %d): a node "
                   "that follows node 0 is 1..nnodes-1", o.node_rank, o.nnodes, o.threads);
  if (o.quantize && o.quantize[0] && strcmp(o.quantize, "mxfp8") != 0)
    return m3_fail(M3_ERR_ARG, "engine options: quantize '%s' (expected mxfp8)", o.quantize);
  char dir[4096];
  m3_status st = M3_OK;
  if (o.model_dir) snprintf(dir, sizeof dir, "%s", o.model_dir);
  else if ((st = m3_builtin_model_dir(dir, sizeof dir)) != M3_OK) return st;
  if ((st = m3_ranks_check(dir, &o)) != M3_OK) return st;
  int tp, ep;
  m3_ranks_layout(&o, &tp, &ep);
  const m3_model_load_options load = {.quantize_mxfp8 = o.quantize && o.quantize[0],
                                      .threads = m3_ranks_threads(o.threads, tp * ep),
                                      .tp_size = tp, .ep_size = ep};
  return m3_ranks_follow(dir, &o, &load);
}

void m3_engine_close(m3_engine *e) {
  if (!e) return;
  m3_engine_stop(e, 0);
  pthread_mutex_lock(&e->mu);
  e->cancel_all = 1;
  pthread_mutex_unlock(&e->mu);
  if (e->cache) m3_sched_step(e); /* hands over what is left and cancels it all */
  free(e->running.at);
  free(e->waiting.at);
  free(e->cancels);
  if (e->logits) e->be->ops->free_host(e->be, e->logits);
  if (e->greedy_ids) e->be->ops->free_host(e->be, e->greedy_ids);
  free(e->row_draws);
  free(e->batch);
  free(e->batch_seq);
  free(e->batch_kv);
  free(e->scratch_seqs);
  free(e->scratch_reqs);
  free(e->batch_pos);
  m3_sampler_scratch_free(&e->scratch);
  m3_spec_close(e);
  m3_ranks_free(e->ranks);
  m3_kv_cache_free(e->cache);
  m3_tok_free(e->tok);
  m3_model_free(e->model);
  if (e->be) e->be->ops->destroy(e->be);
  pthread_mutex_destroy(&e->mu);
  pthread_mutex_destroy(&e->tok_mu);
  pthread_cond_destroy(&e->work);
  pthread_cond_destroy(&e->idle);
  free(e);
}

void m3_engine_model_info(const m3_engine *e, m3_model_info *out) { *out = e->info; }

m3_status m3_tokenize(const m3_engine *e, const char *text, size_t len, int special,
                      int32_t **ids, int *n_ids) {
  *ids = NULL;
  *n_ids = 0;
  if (!e->tok) return m3_fail(M3_ERR_UNSUPPORTED, "model %s has no tokenizer.json", e->name);
  m3_tok_ids out = {0};
  m3_engine *me = (m3_engine *)e; /* the lock and the tokenizer's cache are not logical state */
  pthread_mutex_lock(&me->tok_mu);
  m3_status st = m3_tok_encode(me->tok, text, len, special != 0, &out);
  pthread_mutex_unlock(&me->tok_mu);
  if (st != M3_OK) {
    m3_tok_ids_free(&out);
    return st;
  }
  if (out.len > INT32_MAX) {
    m3_tok_ids_free(&out);
    return m3_fail(M3_ERR_LIMIT, "tokenize: %zu tokens", out.len);
  }
  *ids = out.data ? out.data : malloc(sizeof(int32_t));
  *n_ids = (int)out.len;
  return *ids ? M3_OK : m3_fail(M3_ERR_NOMEM, "tokenize: out of memory");
}

m3_status m3_detokenize(const m3_engine *e, const int32_t *ids, int n_ids, int skip_special,
                        char **text, size_t *len) {
  *text = NULL;
  *len = 0;
  if (!e->tok) return m3_fail(M3_ERR_UNSUPPORTED, "model %s has no tokenizer.json", e->name);
  m3_tok_text out = {0};
  m3_status st = m3_tok_decode(e->tok, ids, n_ids > 0 ? (size_t)n_ids : 0, skip_special != 0, &out);
  if (st == M3_OK && !out.data && !(out.data = malloc(1)))
    st = m3_fail(M3_ERR_NOMEM, "detokenize: out of memory");
  if (st != M3_OK) {
    m3_tok_text_free(&out);
    return st;
  }
  out.data[out.len] = '\0';
  *text = out.data;
  *len = out.len;
  return M3_OK;
}

/* Validates params and deep-copies them (the caller's arrays need not outlive m3_submit). */
static m3_status copy_params(const m3_engine *e, const m3_sampling_params *p, m3_request *r) {
  const int V = e->vocab;
  if (!(p->temperature >= 0.0f && isfinite(p->temperature)) || p->top_k < 0 ||
      !(p->top_p > 0.0f && p->top_p <= 1.0f) || !(p->min_p >= 0.0f && p->min_p <= 1.0f) ||
      !(p->repetition_penalty > 0.0f && isfinite(p->repetition_penalty)) ||
      !isfinite(p->presence_penalty) || !isfinite(p->frequency_penalty))
    return m3_fail(M3_ERR_ARG, "sampling: temperature %g (>= 0), top_k %d (>= 0), top_p %g "
                   "(0..1], min_p %g [0..1], repetition_penalty %g (> 0) out of range",
                   p->temperature, p->top_k, p->top_p, p->min_p, p->repetition_penalty);
  if (p->max_tokens < 0 || p->n_stop < 0 || p->n_stop_token_ids < 0 || p->n_logit_bias < 0 ||
      p->n_forced_tokens < 0 || p->n_oracle_tokens < 0 || p->top_logprobs < 0 ||
      p->top_logprobs > MAX_TOP_LOGPROBS)
    return m3_fail(M3_ERR_ARG, "sampling: negative count, or top_logprobs %d outside 0..%d",
                   p->top_logprobs, MAX_TOP_LOGPROBS);
  int n = p->n > 0 ? p->n : 1;
  if (n > e->max_running)
    return m3_fail(M3_ERR_ARG, "sampling: n = %d exceeds the engine's %d running sequences", n,
                   e->max_running);
  if ((p->n_stop && !p->stop) || (p->n_stop_token_ids && !p->stop_token_ids) ||
      (p->n_logit_bias && (!p->logit_bias_ids || !p->logit_bias_values)) ||
      (p->forced_tokens && p->n_forced_tokens == 0) ||
      (p->n_oracle_tokens && !p->oracle_tokens) || (p->oracle_tokens && p->n_oracle_tokens == 0))
    return m3_fail(M3_ERR_ARG, "sampling: a count without its array");
  if (p->oracle_tokens && !m3_spec_oracle(e))
    return m3_fail(M3_ERR_ARG, "sampling: oracle_tokens need an engine opened with speculative "
                   "oracle (a test hook)");
  for (int i = 0; i < p->n_logit_bias; i++)
    if (p->logit_bias_ids[i] < 0 || p->logit_bias_ids[i] >= V || isnan(p->logit_bias_values[i]))
      return m3_fail(M3_ERR_ARG, "sampling: logit_bias entry %d (id %d) outside the vocabulary "
                     "0..%d or NaN", i, p->logit_bias_ids[i], V - 1);
  for (int i = 0; i < p->n_forced_tokens; i++)
    if (p->forced_tokens[i] < 0 || p->forced_tokens[i] >= V)
      return m3_fail(M3_ERR_ARG, "sampling: forced token %d (entry %d) outside the vocabulary",
                     p->forced_tokens[i], i);
  for (int i = 0; i < p->n_oracle_tokens; i++)
    if (p->oracle_tokens[i] < 0 || p->oracle_tokens[i] >= V)
      return m3_fail(M3_ERR_ARG, "sampling: oracle token %d (entry %d) outside the vocabulary",
                     p->oracle_tokens[i], i);
  for (int i = 0; i < p->n_stop; i++)
    if (!p->stop[i] || !p->stop[i][0])
      return m3_fail(M3_ERR_ARG, "sampling: stop string %d is empty", i);

  r->p = *p;
  r->n = r->p.n = n;
  r->stop = calloc((size_t)p->n_stop + 1, sizeof *r->stop);
  r->stop_ids = malloc(((size_t)p->n_stop_token_ids + 1) * sizeof *r->stop_ids);
  r->bias_ids = malloc(((size_t)p->n_logit_bias + 1) * sizeof *r->bias_ids);
  r->bias_values = malloc(((size_t)p->n_logit_bias + 1) * sizeof *r->bias_values);
  r->forced = malloc(((size_t)p->n_forced_tokens + 1) * sizeof *r->forced);
  r->oracle = malloc(((size_t)p->n_oracle_tokens + 1) * sizeof *r->oracle);
  if (!r->stop || !r->stop_ids || !r->bias_ids || !r->bias_values || !r->forced || !r->oracle)
    return m3_fail(M3_ERR_NOMEM, "submit: out of memory");
  r->p.n_stop = 0;
  for (int i = 0; i < p->n_stop; i++, r->p.n_stop++)
    if (!(r->stop[i] = strdup(p->stop[i]))) return m3_fail(M3_ERR_NOMEM, "submit: out of memory");
  if (p->n_stop_token_ids)
    memcpy(r->stop_ids, p->stop_token_ids, (size_t)p->n_stop_token_ids * sizeof *r->stop_ids);
  if (p->n_logit_bias) {
    memcpy(r->bias_ids, p->logit_bias_ids, (size_t)p->n_logit_bias * sizeof *r->bias_ids);
    memcpy(r->bias_values, p->logit_bias_values, (size_t)p->n_logit_bias * sizeof *r->bias_values);
  }
  if (p->n_forced_tokens)
    memcpy(r->forced, p->forced_tokens, (size_t)p->n_forced_tokens * sizeof *r->forced);
  if (p->n_oracle_tokens)
    memcpy(r->oracle, p->oracle_tokens, (size_t)p->n_oracle_tokens * sizeof *r->oracle);
  r->p.stop = (const char *const *)r->stop;
  r->p.stop_token_ids = r->stop_ids;
  r->p.logit_bias_ids = r->bias_ids;
  r->p.logit_bias_values = r->bias_values;
  r->p.forced_tokens = p->forced_tokens ? r->forced : NULL;
  r->p.oracle_tokens = p->oracle_tokens ? r->oracle : NULL;
  return M3_OK;
}

m3_status m3_submit(m3_engine *e, const int32_t *prompt, int n_prompt,
                    const m3_sampling_params *params, m3_token_callback cb, void *user,
                    uint64_t *request_id) {
  return m3_submit_with(e, prompt, n_prompt, NULL, params, cb, user, request_id);
}

m3_status m3_submit_with(m3_engine *e, const int32_t *prompt, int n_prompt,
                         m3_request_media *media, const m3_sampling_params *params,
                         m3_token_callback cb, void *user, uint64_t *request_id) {
  if (request_id) *request_id = 0;
  if (!cb) return m3_fail(M3_ERR_ARG, "submit: no callback");
  if (n_prompt < 1 || !prompt) return m3_fail(M3_ERR_ARG, "submit: empty prompt");
  if (n_prompt >= e->info.max_context)
    return m3_fail(M3_ERR_LIMIT, "submit: prompt of %d tokens leaves no room in the context of "
                   "%d tokens", n_prompt, e->info.max_context);
  for (int i = 0; i < n_prompt; i++)
    if (prompt[i] < 0 || prompt[i] >= e->vocab)
      return m3_fail(M3_ERR_ARG, "submit: prompt token %d (at %d) is outside the vocabulary "
                     "0..%d", prompt[i], i, e->vocab - 1);
  m3_sampling_params defaults;
  m3_sampling_params_init(&defaults);
  m3_request *r = calloc(1, sizeof *r);
  if (!r) return m3_fail(M3_ERR_NOMEM, "submit: out of memory");
  m3_status st = copy_params(e, params ? params : &defaults, r);
  if (st == M3_OK) {
    r->prompt = malloc((size_t)n_prompt * sizeof *r->prompt);
    r->samples = calloc((size_t)r->n, sizeof *r->samples);
    if (!r->prompt || !r->samples) st = m3_fail(M3_ERR_NOMEM, "submit: out of memory");
  }
  if (st != M3_OK) {
    m3_request_free(r);
    return st;
  }
  memcpy(r->prompt, prompt, (size_t)n_prompt * sizeof *r->prompt);
  r->n_prompt = n_prompt;
  r->forked = r->n == 1;
  r->cb = cb;
  r->user = user;

  pthread_mutex_lock(&e->mu);
  if (!e->accepting) {
    pthread_mutex_unlock(&e->mu);
    m3_request_free(r);
    return m3_fail(M3_ERR_LIMIT, "submit: the engine is shutting down");
  }
  const uint64_t id = r->id = e->next_id++;
  r->media = media;
  if (!r->p.has_seed) {
    /* splitmix64 step over the engine's state: distinct seeds per request. */
    uint64_t z = (e->seed_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    r->p.seed = z ^ (z >> 27);
  }
  if (e->incoming_tail) e->incoming_tail->next = r;
  else e->incoming = r;
  e->incoming_tail = r;
  e->active++;
  e->counters_submitted++;
  pthread_cond_signal(&e->work);
  pthread_mutex_unlock(&e->mu);
  /* From here r belongs to the engine thread, which may have finished and freed it already. */
  if (request_id) *request_id = id;
  return M3_OK;
}

void m3_cancel(m3_engine *e, uint64_t request_id) {
  pthread_mutex_lock(&e->mu);
  if (e->n_cancels == e->cap_cancels) {
    int cap = e->cap_cancels ? 2 * e->cap_cancels : 16;
    uint64_t *ids = realloc(e->cancels, (size_t)cap * sizeof *ids);
    if (!ids) { /* keep the request running rather than lose track of the list */
      pthread_mutex_unlock(&e->mu);
      return;
    }
    e->cancels = ids;
    e->cap_cancels = cap;
  }
  e->cancels[e->n_cancels++] = request_id;
  pthread_cond_signal(&e->work);
  pthread_mutex_unlock(&e->mu);
}

m3_status m3_engine_step(m3_engine *e, int *active) {
  m3_status st = m3_sched_step(e);
  if (active) {
    pthread_mutex_lock(&e->mu);
    *active = e->active;
    pthread_mutex_unlock(&e->mu);
  }
  return st;
}

static void *loop(void *arg) {
  m3_engine *e = arg;
  /* This thread issues rank 0's ops: onto its GPU (--device cuda:K). A failure leaves the thread
   * on another GPU, where those ops fail and finish the requests with the CUDA error. */
  if (e->be->ops->bind_thread) (void)e->be->ops->bind_thread(e->be);
  for (;;) {
    pthread_mutex_lock(&e->mu);
    while (!e->quit && e->active == 0 && e->n_cancels == 0 && !e->cancel_all)
      pthread_cond_wait(&e->work, &e->mu);
    int quit = e->quit;
    pthread_mutex_unlock(&e->mu);
    m3_sched_step(e);
    if (quit) return NULL;
  }
}

m3_status m3_engine_start(m3_engine *e) {
  pthread_mutex_lock(&e->mu);
  int running = e->thread_running;
  e->thread_running = 1;
  e->quit = 0;
  pthread_mutex_unlock(&e->mu);
  if (running) return m3_fail(M3_ERR_ARG, "engine: the loop thread is already running");
  int rc = pthread_create(&e->thread, NULL, loop, e);
  if (rc != 0) {
    pthread_mutex_lock(&e->mu);
    e->thread_running = 0;
    pthread_mutex_unlock(&e->mu);
    return m3_fail(M3_ERR_IO, "engine: cannot start the loop thread (%s)", strerror(rc));
  }
  return M3_OK;
}

void m3_engine_stop(m3_engine *e, int grace_ms) {
  pthread_mutex_lock(&e->mu);
  e->accepting = 0;
  if (!e->thread_running) {
    pthread_mutex_unlock(&e->mu);
    return;
  }
  struct timespec deadline;
  clock_gettime(CLOCK_REALTIME, &deadline);
  long long ns = deadline.tv_nsec + (long long)(grace_ms > 0 ? grace_ms : 0) * 1000000;
  deadline.tv_sec += (time_t)(ns / 1000000000);
  deadline.tv_nsec = (long)(ns % 1000000000);
  while (e->active > 0 && pthread_cond_timedwait(&e->idle, &e->mu, &deadline) != ETIMEDOUT) {
  }
  e->cancel_all = 1;
  e->quit = 1;
  pthread_cond_signal(&e->work);
  pthread_mutex_unlock(&e->mu);
  pthread_join(e->thread, NULL);
  pthread_mutex_lock(&e->mu);
  e->thread_running = 0;
  e->cancel_all = 0;
  pthread_mutex_unlock(&e->mu);
}

void m3_engine_stats_get(m3_engine *e, m3_engine_stats *out) {
  pthread_mutex_lock(&e->mu);
  *out = e->stats;
  out->requests_total = e->counters_submitted;
  pthread_mutex_unlock(&e->mu);
}
