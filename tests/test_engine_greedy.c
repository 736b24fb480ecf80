/* Greedy decoding through the backend's argmax_rows (the scheduler's fast path, which moves one id
 * per logits row to the host instead of the row) picks the sampler's tokens:
 *   - argmax_rows (the CPU backend, and through the profile wrapper) against m3_sampler_sample at
 *     temperature 0 and against a reference written here, on random rows with exact ties, -inf,
 *     +inf, -0 against +0 and NaN (also at index 0, where the sampler's scan keeps it);
 *   - m3_model_forward_batch_argmax against m3_model_forward_batch + the sampler on the built-in
 *     tiny model, on the CPU backend and on one claiming device memory (the device path: logits in
 *     backend memory, only the ids moved);
 *   - the engine: greedy requests (batched, n = 2, forced tokens) give the same tokens as the same
 *     requests asking for log-probabilities, which keep the sampler path; a logit bias or a
 *     penalty still changes the tokens (those requests never take the fast path). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "mirror_backend.h"
#include "engine/kvcache.h"
#include "engine/sampler.h"
#include "io/tiny.h"
#include "m3.h"
#include "model/model.h"
#include "random.h"

/* The greedy rule restated: NaN at index 0 wins; otherwise the lowest index of the largest
 * non-NaN value (index 0 is then not NaN, so there is one). */
static int32_t reference_argmax(const float *l, int n) {
  if (isnan(l[0])) return 0;
  float max = l[0];
  for (int i = 1; i < n; i++)
    if (!isnan(l[i]) && l[i] > max) max = l[i];
  for (int i = 0; i < n; i++)
    if (l[i] == max) return i;
  return -1;
}

/* Small integers (many exact ties), sprinkled with -inf, +inf, NaN and signed zeros; some rows
 * all -inf, all NaN, or NaN first. */
static void random_row(float *l, int n, int kind) {
  for (int i = 0; i < n; i++) {
    uint32_t u = rnd() % 100;
    l[i] = u < 10 ? -INFINITY : u < 14 ? NAN : u < 16 ? -0.0f : u < 18 ? 0.0f
         : (float)((int)(rnd() % 7) - 3);
    if (kind == 1) l[i] = -INFINITY;
    if (kind == 2) l[i] = NAN;
    if (kind == 3 && rnd() % 50 == 0) l[i] = INFINITY;
    if (kind == 4) l[i] = rnd() % 2 ? -0.0f : 0.0f;
  }
  if (kind == 5) l[0] = NAN;
  if (kind == 6) { /* +inf after a NaN at 0: the scan still keeps index 0 */
    l[n - 1] = INFINITY;
    l[0] = NAN;
  }
}

static void test_argmax_rows(m3_backend *be) {
  static const int vocabs[] = {1, 2, 31, 257, 5000};
  m3_sampler_scratch scratch;
  m3_sampling_params p;
  m3_sampling_params_init(&p);
  p.temperature = 0.0f;
  const m3_sample_history h = {0};
  enum { ROWS = 70 };
  int bad_sampler = 0, bad_reference = 0;
  for (size_t v = 0; v < sizeof vocabs / sizeof vocabs[0]; v++) {
    const int V = vocabs[v];
    CHECK_OK(m3_sampler_scratch_init(&scratch, V));
    float *logits = be->ops->alloc(be, (size_t)ROWS * V * sizeof(float));
    int32_t ids[ROWS];
    for (int r = 0; r < ROWS; r++) random_row(logits + (size_t)r * V, V, r % 10);
    for (int r = 0; r < ROWS; r++) ids[r] = -7;
    CHECK_OK(be->ops->argmax_rows(be, logits, ROWS, V, ids));
    for (int r = 0; r < ROWS; r++) {
      const float *row = logits + (size_t)r * V;
      uint64_t rng = 1;
      bad_sampler += ids[r] != m3_sampler_sample(&p, &rng, row, &h, &scratch);
      bad_reference += ids[r] != reference_argmax(row, V);
    }
    be->ops->free(be, logits);
    m3_sampler_scratch_free(&scratch);
  }
  CHECK_EQ_INT(bad_sampler, 0);
  CHECK_EQ_INT(bad_reference, 0);
}


/* Three sequences in one forward: two prefills asking for all their rows, one for its last: the
 * ids of m3_model_forward_batch_argmax are the sampler's greedy picks from the rows. */
static void test_model_argmax(int mirrored) {
  char dir[4096];
  CHECK_OK(m3_builtin_model_dir(dir, sizeof dir));
  m3_backend *be = open_backend(mirrored);
  m3_model *m = NULL;
  if (be) CHECK_OK(m3_model_load(dir, be, &m));
  if (!m) {
    if (be) be->ops->destroy(be);
    return;
  }
  const m3_config *cfg = m3_model_config(m);
  const int V = cfg->vocab_size, L = cfg->num_layers;
  enum { NS = 3, MAXT = 20 };
  const int T[NS] = {17, 5, 20}, n_logits[NS] = {17, 5, 1};
  int rows = 0;
  for (int i = 0; i < NS; i++) rows += n_logits[i];
  m3_kv_cache *cache = NULL;
  CHECK_OK(m3_kv_cache_create(cfg, be, M3_KV_F32, 2 * NS * m3_kv_bytes_for_tokens(cfg, M3_KV_F32, MAXT),
                              &cache));
  m3_kv_seq seqs[2][NS];
  m3_kv_view *views = calloc((size_t)2 * NS * L, sizeof *views);
  int32_t ids[NS][MAXT], pos[NS][MAXT];
  for (int i = 0; i < NS; i++)
    for (int t = 0; t < T[i]; t++) ids[i][t] = (int32_t)(rnd() % (uint32_t)V), pos[i][t] = t;
  float *logits[2] = {calloc((size_t)rows * V, sizeof(float)), calloc((size_t)rows * V, sizeof(float))};
  int32_t *greedy = calloc((size_t)rows, sizeof *greedy);
  m3_model_seq batch[2][NS];
  for (int k = 0; k < 2; k++)
    for (int i = 0; i < NS; i++) {
      m3_kv_seq_init(&seqs[k][i]);
      CHECK_OK(m3_kv_seq_extend(cache, &seqs[k][i], T[i]));
      m3_kv_seq_views(cache, &seqs[k][i], &views[(k * NS + i) * L]);
      batch[k][i] = (m3_model_seq){.kv = &views[(k * NS + i) * L], .ids = ids[i], .pos = pos[i],
                                   .T = T[i], .n_logits = n_logits[i]};
    }
  CHECK_OK(m3_model_forward_batch(m, batch[0], NS, logits[0]));
  CHECK_OK(m3_model_forward_batch_argmax(m, batch[1], NS, logits[1], greedy, NULL));
  m3_sampler_scratch scratch;
  CHECK_OK(m3_sampler_scratch_init(&scratch, V));
  m3_sampling_params p;
  m3_sampling_params_init(&p);
  p.temperature = 0.0f;
  const m3_sample_history h = {0};
  int bad = 0;
  for (int r = 0; r < rows; r++) {
    uint64_t rng = 1;
    bad += greedy[r] != m3_sampler_sample(&p, &rng, logits[0] + (size_t)r * V, &h, &scratch);
  }
  CHECK_EQ_INT(bad, 0);
  m3_sampler_scratch_free(&scratch);
  for (int k = 0; k < 2; k++)
    for (int i = 0; i < NS; i++) m3_kv_seq_release(cache, &seqs[k][i]);
  m3_kv_cache_free(cache);
  free(views), free(logits[0]), free(logits[1]), free(greedy);
  m3_model_free(m);
  be->ops->destroy(be);
}

/* ---- the engine ---- */

enum { NREQ = 4, MAXGEN = 10, SAMPLES = 2 };

typedef struct {
  int32_t tokens[SAMPLES][MAXGEN];
  int n[SAMPLES];
} collected;

static void collect(const m3_token_event *ev, void *user) {
  collected *c = user;
  if (ev->token < 0 || ev->sample < 0 || ev->sample >= SAMPLES || c->n[ev->sample] >= MAXGEN) return;
  c->tokens[ev->sample][c->n[ev->sample]++] = ev->token;
}

static int32_t prompts[NREQ][24];
static const int prompt_len[NREQ] = {5, 19, 11, 24};
static const int32_t forced[MAXGEN] = {300, 301, 302, 303, 304, 305, 306, 307, 308, 309};

typedef enum { PLAIN, LOGPROBS } mode;

/* Request r: greedy; request 2 with two samples, request 3 with forced tokens; LOGPROBS asks for
 * the top log-probability, which needs whole rows. */
static void params_for(int r, mode md, m3_sampling_params *p) {
  m3_sampling_params_init(p);
  p->temperature = 0.0f;
  p->max_tokens = MAXGEN;
  p->ignore_eos = 1;
  if (r == 2) p->n = SAMPLES;
  if (r == 3) p->forced_tokens = forced, p->n_forced_tokens = MAXGEN;
  if (md == LOGPROBS) p->top_logprobs = 1;
}

static m3_engine *open_engine(void) {
  m3_engine_options o;
  m3_engine_options_init(&o);
  o.threads = 1;
  o.max_running = 8;
  o.max_batch_tokens = 64;
  o.kv_memory_bytes = 8u << 20;
  m3_engine *e = NULL;
  CHECK_OK(m3_engine_open(&o, &e));
  return e;
}

static void drain(m3_engine *e) {
  int active = 1;
  for (int guard = 0; active && guard < 10000; guard++) CHECK_OK(m3_engine_step(e, &active));
  CHECK_EQ_INT(active, 0);
}

/* All requests submitted together, so that steps hold several sequences' rows. */
static void run_all(m3_engine *e, mode md, collected *out) {
  for (int r = 0; r < NREQ; r++) {
    m3_sampling_params p;
    params_for(r, md, &p);
    memset(&out[r], 0, sizeof out[r]);
    CHECK_OK(m3_submit(e, prompts[r], prompt_len[r], &p, collect, &out[r], NULL));
  }
  drain(e);
}

static collected run_one(m3_engine *e, const m3_sampling_params *p) {
  collected c;
  memset(&c, 0, sizeof c);
  CHECK_OK(m3_submit(e, prompts[0], prompt_len[0], p, collect, &c, NULL));
  drain(e);
  return c;
}

static void test_engine(void) {
  m3_engine *e = open_engine();
  if (!e) return;
  m3_model_info info;
  m3_engine_model_info(e, &info);
  for (int r = 0; r < NREQ; r++)
    for (int i = 0; i < prompt_len[r]; i++)
      prompts[r][i] = 256 + (int32_t)(rnd() % (uint32_t)(info.vocab_size - 300));

  collected fast[NREQ], slow[NREQ];
  run_all(e, PLAIN, fast);
  run_all(e, LOGPROBS, slow);
  for (int r = 0; r < NREQ; r++) {
    const int samples = r == 2 ? SAMPLES : 1;
    for (int s = 0; s < samples; s++) {
      CHECK_EQ_INT(fast[r].n[s], MAXGEN);
      CHECK_EQ_INT(slow[r].n[s], MAXGEN);
      CHECK(memcmp(fast[r].tokens[s], slow[r].tokens[s], sizeof fast[r].tokens[s]) == 0);
    }
  }
  CHECK(memcmp(fast[3].tokens[0], forced, sizeof forced) == 0);
  CHECK(memcmp(fast[2].tokens[0], fast[2].tokens[1], sizeof fast[2].tokens[0]) == 0);

  /* Banning the greedy first token moves it; a presence penalty past any logit range makes every
   * generated token new. Neither can come from the plain argmax. */
  m3_sampling_params p;
  params_for(0, PLAIN, &p);
  const int32_t ban_id = fast[0].tokens[0][0];
  const float ban_value = -INFINITY;
  p.logit_bias_ids = &ban_id;
  p.logit_bias_values = &ban_value;
  p.n_logit_bias = 1;
  collected banned = run_one(e, &p);
  CHECK(banned.n[0] == MAXGEN && banned.tokens[0][0] != ban_id);
  for (int i = 0; i < banned.n[0]; i++) CHECK(banned.tokens[0][i] != ban_id);

  params_for(0, PLAIN, &p);
  p.presence_penalty = 1e30f;
  collected fresh = run_one(e, &p);
  int repeats = 0;
  for (int i = 0; i < fresh.n[0]; i++)
    for (int j = 0; j < i; j++) repeats += fresh.tokens[0][i] == fresh.tokens[0][j];
  CHECK_EQ_INT(fresh.n[0], MAXGEN);
  CHECK_EQ_INT(repeats, 0);
  m3_engine_close(e);
}

int main(void) {
  m3_backend *cpu = NULL;
  CHECK_OK(m3_backend_cpu_create(2, &cpu));
  if (cpu) test_argmax_rows(cpu);
  m3_backend *prof = NULL;
  if (cpu) CHECK_OK(m3_backend_profile_create(cpu, &prof)); /* takes cpu over */
  if (prof) {
    test_argmax_rows(prof);
    prof->ops->destroy(prof);
  }
  test_model_argmax(0);
  test_model_argmax(1);
  test_engine();
  return check_summary();
}
