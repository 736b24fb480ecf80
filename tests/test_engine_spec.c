/* Speculative decoding on the built-in tiny model (random weights, so drafts are mostly wrong):
 *   - the MTP and EAGLE3 drafter forwards (catch-up rows, then one chained row) against the
 *     PyTorch reference written from the specs (tools/make_spec_fixtures.py ->
 *     tests/fixtures/spec/drafters.safetensors);
 *   - greedy generation with speculation (MTP with 1, 3 and 7 drafts, EAGLE3 with 3) gives the
 *     same tokens as without, for ragged prompts batched together with prefill chunks, the
 *     prefix cache and short max_tokens, and the acceptance counters add up;
 *   - with temperature > 0, the first three generated tokens (the second and third go through
 *     verification and rejection sampling) follow the exact distribution the sampler defines,
 *     computed from the model's logits: chi-square goodness of fit of the first token, the pairs
 *     and the triples at a false-alarm rate of 1e-3 each (fixed seeds, so the run is
 *     deterministic), with the same statistic required to reject a wrong distribution. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "engine/kvcache.h"
#include "engine/runner.h"
#include "engine/sampler.h"
#include "io/safetensors.h"
#include "io/tiny.h"
#include "io/tiny_draft.h"
#include "m3.h"
#include "model/draft.h"
#include "model/model.h"

static char model_dir[4096], draft_dir[4096];

/* ---- drafter forwards against the PyTorch reference ---- */

static const m3_st_tensor *fixture(const m3_safetensors *st, const char *name) {
  const m3_st_tensor *t = m3_st_find(st, name);
  CHECK(t != NULL);
  return t;
}

static double max_abs(const float *a, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; i++) m = fabs(a[i]) > m ? fabs(a[i]) : m;
  return m;
}

/* Catch-up over rows 0..T-1 with the fixture's hidden states, then the chained row T, as
 * spec.c runs them; outputs and logits compared with the reference. */
static void check_drafter(m3_model *model, m3_drafter *d, const m3_safetensors *fx, const char *kind) {
  char name[64];
  snprintf(name, sizeof name, "%s.ids", kind);
  const m3_st_tensor *ids_t = fixture(fx, name);
  snprintf(name, sizeof name, "%s.hidden", kind);
  const m3_st_tensor *hid_t = fixture(fx, name);
  snprintf(name, sizeof name, "%s.out", kind);
  const m3_st_tensor *out_t = fixture(fx, name);
  snprintf(name, sizeof name, "%s.logits", kind);
  const m3_st_tensor *log_t = fixture(fx, name);
  const int T = (int)hid_t->shape[0], H = m3_drafter_hidden_size(d), V = m3_drafter_vocab(d);
  CHECK_EQ_INT((int)log_t->shape[1], V);
  const int32_t *ids = ids_t->data;

  const m3_config *dc = m3_drafter_cache_config(d);
  m3_kv_cache *cache = NULL;
  CHECK_OK(m3_kv_cache_create(dc, m3_model_backend(model), M3_KV_F32,
                              m3_kv_bytes_for_tokens(dc, M3_KV_F32, T + 1), &cache));
  m3_kv_seq seq;
  m3_kv_seq_init(&seq);
  CHECK_OK(m3_kv_seq_extend(cache, &seq, T + 1));
  m3_kv_view *views = calloc((size_t)dc->num_layers, sizeof *views);
  m3_kv_seq_views(cache, &seq, views);
  int32_t *pos = malloc((size_t)(T + 1) * sizeof *pos);
  for (int t = 0; t <= T; t++) pos[t] = t;
  float *out = malloc((size_t)(T + 1) * H * sizeof *out), *logits = malloc((size_t)(T + 1) * V * sizeof *logits);
  /* The reference feeds ids[t] as x_{p+1} at position t. */
  int32_t draft = -1;
  const m3_draft_seq catch_up = {views, ids, pos, T, hid_t->data, out, logits, &draft};
  CHECK_OK(m3_drafter_forward(d, &catch_up, 1, 0));
  const m3_draft_seq chained = {views, ids + T, pos + T, 1, out + (size_t)(T - 1) * H,
                                out + (size_t)T * H, logits + (size_t)T * V, NULL};
  CHECK_OK(m3_drafter_forward(d, &chained, 1, 1));
  CHECK(draft >= 0 && draft < m3_model_config(model)->vocab_size);

  const float *ref_out = out_t->data, *ref_log = log_t->data;
  const double out_scale = max_abs(ref_out, (size_t)(T + 1) * H), log_scale = max_abs(ref_log, (size_t)(T + 1) * V);
  double worst_out = 0, worst_log = 0;
  for (size_t i = 0; i < (size_t)(T + 1) * H; i++)
    worst_out = fmax(worst_out, fabs(out[i] - ref_out[i]) / out_scale);
  for (size_t i = 0; i < (size_t)(T + 1) * V; i++)
    worst_log = fmax(worst_log, fabs(logits[i] - ref_log[i]) / log_scale);
  printf("%s drafter vs PyTorch: max |out| error %.2e, max |logit| error %.2e (relative to the "
         "largest value)\n", kind, worst_out, worst_log);
  CHECK(worst_out < 2e-4);
  CHECK(worst_log < 2e-4);
  free(out);
  free(logits);
  free(pos);
  free(views);
  m3_kv_seq_release(cache, &seq);
  m3_kv_cache_free(cache);
}

static void test_drafters(void) {
  m3_backend *be = NULL;
  m3_model *model = NULL;
  m3_safetensors *fx = NULL;
  CHECK_OK(m3_backend_cpu_create(1, &be));
  CHECK_OK(m3_model_load(model_dir, be, &model));
  CHECK_OK(m3_st_open_file(M3_SOURCE_DIR "/tests/fixtures/spec/drafters.safetensors", &fx));
  m3_drafter *d = NULL;
  CHECK_OK(m3_drafter_mtp_create(model, &d));
  check_drafter(model, d, fx, "mtp");
  m3_drafter_free(d);
  CHECK_OK(m3_drafter_eagle3_load(draft_dir, model, &d));
  check_drafter(model, d, fx, "eagle3");
  m3_drafter_free(d);
  m3_st_close(fx);
  m3_model_free(model);
  be->ops->destroy(be);
}

/* ---- greedy identity through the engine ---- */

enum { NREQ = 8, MAXGEN = 24 };

typedef struct {
  int32_t tokens[8][64];
  int n[8];
} collected;

static void collect(const m3_token_event *ev, void *user) {
  collected *c = user;
  if (ev->token >= 0 && ev->sample < 8 && c->n[ev->sample] < 64)
    c->tokens[ev->sample][c->n[ev->sample]++] = ev->token;
}

static m3_engine *open_engine(const char *spec, int k, int max_running) {
  m3_engine_options o;
  m3_engine_options_init(&o);
  o.model_dir = model_dir;
  o.threads = 1;
  o.max_running = max_running;
  o.max_batch_tokens = 48;
  o.kv_memory_bytes = 4u << 20;
  o.speculative = spec;
  o.draft_dir = draft_dir;
  o.num_draft = k;
  m3_engine *e = NULL;
  CHECK_OK(m3_engine_open(&o, &e));
  return e;
}

static void run_all(m3_engine *e) {
  for (int active = 1; active;) CHECK_OK(m3_engine_step(e, &active));
}

static void greedy(const char *spec, int k, collected *out) {
  m3_engine *e = open_engine(spec, k, 4);
  uint64_t x = 99;
  static int32_t prompts[NREQ][40];
  for (int r = 0; r < NREQ; r++) {
    int len = 2 + (r * 13) % 37;
    for (int i = 0; i < len; i++) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      prompts[r][i] = (int32_t)((x >> 33) % 400) + 20;
    }
    if (r >= 5) memcpy(prompts[r], prompts[4], 8 * sizeof(int32_t)); /* shared prefix pages */
    m3_sampling_params p;
    m3_sampling_params_init(&p);
    p.temperature = 0;
    p.ignore_eos = 1;
    p.max_tokens = r == 3 ? 1 : r == 6 ? 2 : MAXGEN;
    CHECK_OK(m3_submit(e, prompts[r], len, &p, collect, &out[r], NULL));
  }
  run_all(e);
  m3_engine_stats st;
  m3_engine_stats_get(e, &st);
  if (spec) {
    printf("greedy %s k=%d: %llu drafted, %llu accepted (%.1f%%), %llu steps\n", spec, k,
           (unsigned long long)st.spec_draft_tokens, (unsigned long long)st.spec_accepted_tokens,
           st.spec_draft_tokens ? 100.0 * (double)st.spec_accepted_tokens / (double)st.spec_draft_tokens : 0.0,
           (unsigned long long)st.steps);
    CHECK(st.spec_draft_tokens > 0);
    CHECK(st.spec_accepted_tokens <= st.spec_draft_tokens);
  } else {
    CHECK(st.spec_draft_tokens == 0);
  }
  m3_engine_close(e);
}

static void test_greedy_identity(void) {
  static collected base[NREQ], spec[NREQ];
  memset(base, 0, sizeof base);
  greedy(NULL, 0, base);
  const struct {
    const char *kind;
    int k;
  } runs[] = {{"mtp", 1}, {"mtp", 3}, {"mtp", 7}, {"eagle3", 3}};
  for (size_t i = 0; i < sizeof runs / sizeof runs[0]; i++) {
    memset(spec, 0, sizeof spec);
    greedy(runs[i].kind, runs[i].k, spec);
    for (int r = 0; r < NREQ; r++) {
      CHECK_EQ_INT(spec[r].n[0], base[r].n[0]);
      CHECK(memcmp(spec[r].tokens[0], base[r].tokens[0], (size_t)base[r].n[0] * sizeof(int32_t)) == 0);
    }
  }
}

/* ---- the rejection test alone, where drafts are often right ---- */

/* m3_sampler_verify with a fixed draft on synthetic logits: whatever the draft (likely, unlikely,
 * filtered out), the emitted token follows the sampler's distribution p (chi-square, alpha 1e-3),
 * the draft is accepted at rate p(draft), and greedy returns the argmax. */
static double critical(int df);

static void test_verify_sampler(void) {
  enum { V = 12, DRAWS = 40000 };
  float logits[V];
  for (int i = 0; i < V; i++) logits[i] = (float)((i * 7) % V) * 0.35f - 1.0f;
  m3_sampler_scratch s;
  CHECK_OK(m3_sampler_scratch_init(&s, V));
  m3_sampling_params p;
  m3_sampling_params_init(&p);
  p.temperature = 0.9f;
  p.top_k = 8;
  const m3_sample_history h = {NULL, 0, NULL, 0};
  /* p from the sampler's own candidate weights. */
  memcpy(s.work, logits, sizeof logits);
  int32_t best = 0;
  for (int i = 1; i < V; i++)
    if (logits[i] > logits[best]) best = i;
  double total, prob[V] = {0};
  int n = m3_sampler_candidates(&p, &s, best, &total);
  for (int i = 0; i < n; i++) prob[s.ids[i]] = s.prob[i] / total;
  int32_t worst = 0;
  for (int i = 1; i < V; i++)
    if (logits[i] < logits[worst]) worst = i;
  const int32_t drafts[3] = {best, s.ids[n - 1], worst}; /* worst is outside the top 8 */
  for (int d = 0; d < 3; d++) {
    double count[V] = {0}, accepted = 0;
    uint64_t rng = m3_sampler_seed(77, d);
    for (int k = 0; k < DRAWS; k++) {
      int32_t t = m3_sampler_verify(&p, &rng, logits, &h, &s, drafts[d]);
      count[t]++;
      accepted += t == drafts[d];
    }
    double stat = 0;
    int cells = 0;
    for (int i = 0; i < V; i++) {
      if (prob[i] == 0) {
        CHECK(count[i] == 0);
        continue;
      }
      stat += (count[i] - DRAWS * prob[i]) * (count[i] - DRAWS * prob[i]) / (DRAWS * prob[i]);
      cells++;
    }
    printf("verify, draft p = %.3f: chi2 %.1f, df %d, critical %.1f\n", prob[drafts[d]], stat,
           cells - 1, critical(cells - 1));
    CHECK(stat < critical(cells - 1));
    CHECK_NEAR(accepted / DRAWS, prob[drafts[d]], 0.01);
  }
  p.temperature = 0;
  uint64_t rng = 1;
  CHECK_EQ_INT(m3_sampler_verify(&p, &rng, logits, &h, &s, best), best);
  CHECK_EQ_INT(m3_sampler_verify(&p, &rng, logits, &h, &s, worst), best);
  m3_sampler_scratch_free(&s);
}

/* ---- the sampled distribution ---- */

enum { CANDS = 4, RUNNING = 32, N_TOTAL = 1200, GEN = 6 };
static const int32_t prompt[] = {31, 7, 250, 19, 88, 140, 5, 61, 300, 12};
#define TEMPERATURE 1.5f

/* The sampler's distribution after `prefix` (prompt + generated): candidate ids and
 * probabilities, most likely first. */
static void exact_next(m3_runner *runner, const int32_t *prefix, int n, const m3_sampling_params *p,
                       m3_sampler_scratch *s, int32_t *ids, double *prob, int vocab) {
  float *logits = malloc((size_t)n * vocab * sizeof *logits);
  m3_kv_seq seq;
  m3_kv_seq_init(&seq);
  CHECK_OK(m3_runner_feed(runner, &seq, prefix, n, 0, logits, NULL));
  m3_kv_seq_release(m3_runner_cache(runner), &seq);
  memcpy(s->work, logits + (size_t)(n - 1) * vocab, (size_t)vocab * sizeof(float));
  int32_t best = 0;
  for (int i = 1; i < vocab; i++)
    if (s->work[i] > s->work[best]) best = i;
  double total;
  CHECK_EQ_INT(m3_sampler_candidates(p, s, best, &total), CANDS);
  for (int i = 0; i < CANDS; i++) {
    ids[i] = s->ids[i];
    prob[i] = s->prob[i] / total;
  }
  free(logits);
}

/* Triple probabilities p[a][b][c] over the candidate indices, and their ids. */
typedef struct {
  int32_t id1[CANDS], id2[CANDS][CANDS], id3[CANDS][CANDS][CANDS];
  double p[CANDS][CANDS][CANDS];
} triples;

static void exact_triples(const m3_sampling_params *p, triples *x) {
  m3_backend *be = NULL;
  m3_model *model = NULL;
  m3_runner *runner = NULL;
  m3_sampler_scratch s;
  CHECK_OK(m3_backend_cpu_create(1, &be));
  CHECK_OK(m3_model_load(model_dir, be, &model));
  const int V = m3_model_config(model)->vocab_size, n = (int)(sizeof prompt / sizeof prompt[0]);
  CHECK_OK(m3_runner_create(model, M3_KV_F32,
                            m3_kv_bytes_for_tokens(m3_model_config(model), M3_KV_F32, 16), &runner));
  CHECK_OK(m3_sampler_scratch_init(&s, V));
  int32_t prefix[16];
  memcpy(prefix, prompt, sizeof prompt);
  double p1[CANDS], p2[CANDS], p3[CANDS];
  exact_next(runner, prefix, n, p, &s, x->id1, p1, V);
  for (int a = 0; a < CANDS; a++) {
    prefix[n] = x->id1[a];
    exact_next(runner, prefix, n + 1, p, &s, x->id2[a], p2, V);
    for (int b = 0; b < CANDS; b++) {
      prefix[n + 1] = x->id2[a][b];
      exact_next(runner, prefix, n + 2, p, &s, x->id3[a][b], p3, V);
      for (int c = 0; c < CANDS; c++) x->p[a][b][c] = p1[a] * p2[b] * p3[c];
    }
  }
  m3_sampler_scratch_free(&s);
  m3_runner_free(runner);
  m3_model_free(model);
  be->ops->destroy(be);
}

static int index_of(const int32_t *ids, int32_t id) {
  for (int i = 0; i < CANDS; i++)
    if (ids[i] == id) return i;
  return -1;
}

/* Chi-square statistic of counts against n * prob over `cells`, merging cells expected below 5
 * into one; *df gets the degrees of freedom. */
static double chi_square(const double *count, const double *prob, int cells, int *df) {
  double stat = 0, rest_c = 0, rest_e = 0;
  int used = 0;
  for (int i = 0; i < cells; i++) {
    double want = N_TOTAL * prob[i];
    if (want < 5) {
      rest_c += count[i];
      rest_e += want;
      continue;
    }
    stat += (count[i] - want) * (count[i] - want) / want;
    used++;
  }
  if (rest_e > 0) {
    stat += (rest_c - rest_e) * (rest_c - rest_e) / rest_e;
    used++;
  }
  *df = used - 1;
  return stat;
}

/* The 0.999 quantile of chi-square with df degrees of freedom (Wilson-Hilferty). */
static double critical(int df) {
  const double z = 3.0902, a = 2.0 / (9.0 * df);
  return df * pow(1.0 - a + z * sqrt(a), 3.0);
}

typedef struct {
  int32_t tok[3];
  int n;
} sampled;

static void collect_sampled(const m3_token_event *ev, void *user) {
  sampled *c = user;
  if (ev->token >= 0 && c->n < 3) c->tok[c->n++] = ev->token;
}

/* Cell counts of first tokens, pairs, triples from N_TOTAL requests of GEN tokens (each one its
 * own sequence, so every one drafts: up to 3 drafts after its first token). */
static void sample_counts(const char *spec, const m3_sampling_params *p, const triples *x,
                          double c1[CANDS], double c2[CANDS * CANDS], double c3[CANDS * CANDS * CANDS]) {
  m3_engine *e = open_engine(spec, 3, RUNNING);
  static sampled out[N_TOTAL];
  memset(out, 0, sizeof out);
  for (int r = 0; r < N_TOTAL; r++) {
    m3_sampling_params q = *p;
    q.seed = 1000 + (uint64_t)r;
    CHECK_OK(m3_submit(e, prompt, (int)(sizeof prompt / sizeof prompt[0]), &q, collect_sampled, &out[r], NULL));
  }
  run_all(e);
  m3_engine_stats st;
  m3_engine_stats_get(e, &st);
  if (spec) {
    printf("sampling %s k=3: %llu drafted, %llu accepted (%.1f%%)\n", spec,
           (unsigned long long)st.spec_draft_tokens, (unsigned long long)st.spec_accepted_tokens,
           100.0 * (double)st.spec_accepted_tokens / (double)(st.spec_draft_tokens + !st.spec_draft_tokens));
    CHECK(st.spec_draft_tokens >= N_TOTAL);
    CHECK(st.spec_accepted_tokens < st.spec_draft_tokens);
  }
  m3_engine_close(e);
  memset(c1, 0, CANDS * sizeof *c1);
  memset(c2, 0, CANDS * CANDS * sizeof *c2);
  memset(c3, 0, CANDS * CANDS * CANDS * sizeof *c3);
  for (int r = 0; r < N_TOTAL; r++) {
    CHECK_EQ_INT(out[r].n, 3);
    int a = index_of(x->id1, out[r].tok[0]);
    int b = a >= 0 ? index_of(x->id2[a], out[r].tok[1]) : -1;
    int c = b >= 0 ? index_of(x->id3[a][b], out[r].tok[2]) : -1;
    CHECK(a >= 0 && b >= 0 && c >= 0); /* only candidates the filters keep are drawn */
    if (c < 0) continue;
    c1[a]++;
    c2[a * CANDS + b]++;
    c3[(a * CANDS + b) * CANDS + c]++;
  }
}

/* Returns the number of the three tests (first token, pairs, triples) the counts fail. */
static int fails(const double *c1, const double *c2, const double *c3, const triples *x, int verbose,
                 const char *label) {
  double p1[CANDS] = {0}, p2[CANDS * CANDS] = {0}, p3[CANDS * CANDS * CANDS];
  for (int a = 0; a < CANDS; a++)
    for (int b = 0; b < CANDS; b++)
      for (int c = 0; c < CANDS; c++) {
        p1[a] += x->p[a][b][c];
        p2[a * CANDS + b] += x->p[a][b][c];
        p3[(a * CANDS + b) * CANDS + c] = x->p[a][b][c];
      }
  const double *counts[3] = {c1, c2, c3}, *probs[3] = {p1, p2, p3};
  const int cells[3] = {CANDS, CANDS * CANDS, CANDS * CANDS * CANDS};
  const char *names[3] = {"first token", "pairs", "triples"};
  int failed = 0;
  for (int i = 0; i < 3; i++) {
    int df;
    double stat = chi_square(counts[i], probs[i], cells[i], &df);
    failed += stat > critical(df);
    if (verbose)
      printf("  %s %s: chi2 %.1f, df %d, critical (alpha 1e-3) %.1f\n", label, names[i], stat, df,
             critical(df));
  }
  return failed;
}

static void test_distribution(void) {
  m3_sampling_params p;
  m3_sampling_params_init(&p);
  p.temperature = TEMPERATURE;
  p.top_k = CANDS;
  p.max_tokens = GEN;
  p.ignore_eos = 1;
  p.has_seed = 1;
  static triples exact, wrong;
  exact_triples(&p, &exact);
  m3_sampling_params q = p;
  q.temperature = 0.5f; /* a different distribution over the same candidates */
  exact_triples(&q, &wrong);
  static double c1[CANDS], c2[CANDS * CANDS], c3[CANDS * CANDS * CANDS];
  const char *specs[3] = {NULL, "mtp", "eagle3"};
  for (int i = 0; i < 3; i++) {
    sample_counts(specs[i], &p, &exact, c1, c2, c3);
    const char *label = specs[i] ? specs[i] : "no speculation";
    CHECK_EQ_INT(fails(c1, c2, c3, &exact, 1, label), 0);
    /* Power: the pairs and triples of these counts reject the temperature-0.5 distribution. */
    CHECK(fails(c1, c2, c3, &wrong, 0, label) >= 2);
  }
}

/* The test's own copy of the built-in target (default options), not the user's cache: a cache
 * written by an older m3 (the folder name keeps its format version, not its sizes) would not
 * match the fixture. */
int main(void) {
  snprintf(model_dir, sizeof model_dir, "/tmp/m3-test-spec-target-%d", (int)getpid());
  const m3_tiny_options opt = m3_tiny_default_options();
  CHECK_OK(m3_tiny_write(model_dir, &opt));
  snprintf(draft_dir, sizeof draft_dir, "/tmp/m3-test-spec-draft-%d", (int)getpid());
  m3_config cfg;
  char path[4200];
  snprintf(path, sizeof path, "%s/config.json", model_dir);
  CHECK_OK(m3_config_load(path, &cfg));
  CHECK_OK(m3_tiny_eagle3_write(draft_dir, &cfg, 1));
  m3_config_free(&cfg);
  test_drafters();
  test_greedy_identity();
  test_verify_sampler();
  test_distribution();
  static const char *const files[] = {"config.json", "model.safetensors", "tokenizer.json"};
  const char *const dirs[] = {draft_dir, model_dir};
  for (int d = 0; d < 2; d++) {
    for (int f = 0; f < 3; f++) {
      snprintf(path, sizeof path, "%s/%s", dirs[d], files[f]);
      unlink(path);
    }
    rmdir(dirs[d]);
  }
  return check_summary();
}
