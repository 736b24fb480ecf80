/* Speculative decoding with the oracle drafter (speculative = "oracle", a test hook: a request's
 * drafts for generated token i are its oracle_tokens[i]) on the built-in tiny model, CPU.
 * Random-weight drafters are almost never right; here the test decides which drafts are, so the
 * verify step runs its rarer paths: several drafts accepted at once, a rejection inside a run of
 * drafts (the rejected tail's K/V and index keys rolled back while the head stays, across the
 * model's 4-token KV pages), batched sequences accepting different counts. Checked against greedy
 * decoding without speculation (the reference continuation R of each prompt):
 *   - the oracle given R, k = 1..4: the same tokens, every draft accepted, and exactly
 *     ceil((N - 1) / (k + 1)) decode steps after the prefill chunks (ceil(N / (k + 1)) steps
 *     from the last chunk on where drafting starts at the prompt's last token, see predict);
 *   - R corrupted at chosen positions (or cut short): the same tokens, and per verify step the
 *     tokens emitted (seen through the callbacks) are the drafts before the first wrong one plus
 *     one, which the test predicts from the greedy rule; the engine's drafted / accepted counters
 *     and step count match the prediction;
 *   - sequences of different prompt lengths and corruption patterns joining a running batch (some
 *     sharing prompt pages through the prefix cache): the same tokens and per-step counts;
 *   - three samples of one request (shared prompt pages, copy-on-write): each the same tokens
 *     and per-step counts;
 *   - temperature > 0 with fixed seeds: full-length outputs, the same ones twice, each step's
 *     tokens are accepted oracle drafts then one more (at most k + 1), their count less one adds
 *     up to the accepted counter, drafted >= accepted;
 *   - a prompt with an image verified with drafts publishes no pages: a text prompt of the same
 *     ids after it gets no prefix-cache hit and its fresh-engine continuation (regression: the
 *     verify step used to publish them);
 *   - after every run all KV pages are free (and, one request alone, after every step exactly the
 *     pages of its computed positions are held); oracle_tokens on an engine without the oracle,
 *     or with a bad token, are refused. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "io/tiny.h"
#include "m3.h"

enum { N_GEN = 25, MAX_PROMPT = 40, MAX_REQ = 6, BATCH_TOKENS = 16, PAGE_TOKENS = 4 };

static char model_dir[4096];
static int current_step; /* the test's step counter, which the callbacks record */

/* One sample's tokens and the step each arrived in. */
typedef struct {
  int32_t tok[N_GEN + 1];
  int step[N_GEN + 1];
  int n;
} trace;

static void record(const m3_token_event *ev, void *user) {
  trace *t = user;
  if (ev->token < 0 || t->n > N_GEN) return;
  t->tok[t->n] = ev->token;
  t->step[t->n++] = current_step;
}

static m3_engine *open_engine(const char *spec, int k, int max_running, int prefix_cache) {
  m3_engine_options o;
  m3_engine_options_init(&o);
  o.model_dir = model_dir;
  o.threads = 1;
  o.max_running = max_running;
  o.max_batch_tokens = BATCH_TOKENS;
  o.kv_memory_bytes = 4u << 20;
  o.prefix_cache = prefix_cache;
  o.speculative = spec;
  o.num_draft = k;
  m3_engine *e = NULL;
  CHECK_OK(m3_engine_open(&o, &e));
  return e;
}

/* Steps until idle; the number of steps taken. */
static int run_all(m3_engine *e) {
  int steps = 0;
  for (int active = 1; active; steps++) {
    current_step++;
    CHECK_OK(m3_engine_step(e, &active));
  }
  return steps;
}

/* Every page is back once nothing runs. */
static void check_pages_free(m3_engine *e) {
  m3_engine_stats st;
  m3_model_info info;
  m3_engine_stats_get(e, &st);
  m3_engine_model_info(e, &info);
  CHECK_EQ_INT(st.running + st.waiting, 0);
  CHECK_EQ_INT(st.kv_pages_used, 0);
  CHECK_EQ_INT(st.kv_pages_free, info.kv_pages_total);
}

static m3_sampling_params greedy_params(void) {
  m3_sampling_params p;
  m3_sampling_params_init(&p);
  p.temperature = 0;
  p.ignore_eos = 1;
  p.max_tokens = N_GEN;
  return p;
}

static int32_t prompts[MAX_REQ][MAX_PROMPT];
static const int prompt_len[MAX_REQ] = {3, 9, 17, 30, 40, 22};
static trace ref[MAX_REQ];
static int vocab;

/* R for every prompt: greedy without speculation, one request at a time. */
static void make_reference(void) {
  uint64_t x = 12345;
  for (int r = 0; r < MAX_REQ; r++)
    for (int i = 0; i < prompt_len[r]; i++) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      prompts[r][i] = (int32_t)((x >> 33) % 400) + 20;
    }
  /* Request 5 shares request 4's first 16 tokens (4 full pages) for the prefix cache. */
  memcpy(prompts[5], prompts[4], 16 * sizeof(int32_t));
  m3_engine *e = open_engine(NULL, 0, 1, 0);
  m3_model_info info;
  m3_engine_model_info(e, &info);
  vocab = info.vocab_size;
  CHECK_EQ_INT(info.kv_page_tokens, PAGE_TOKENS); /* rollbacks below cross page boundaries */
  const m3_sampling_params p = greedy_params();
  for (int r = 0; r < MAX_REQ; r++) {
    memset(&ref[r], 0, sizeof ref[r]);
    CHECK_OK(m3_submit(e, prompts[r], prompt_len[r], &p, record, &ref[r], NULL));
    run_all(e);
    CHECK_EQ_INT(ref[r].n, N_GEN);
  }
  check_pages_free(e);
  m3_engine_close(e);
}

/* Which generated positions the oracle gets wrong. Only ALL_WRONG misses generated token 0, so
 * the first step's group tells whether drafting began before it (see predict). */
typedef enum { EXACT, EVERY_5TH, EVERY_3RD, ALL_WRONG, EARLY_WRONG, SCATTERED, CUT_SHORT } pattern;

static int wrong_at(pattern pt, int i) {
  switch (pt) {
  case EVERY_5TH: return i % 5 == 4;
  case EVERY_3RD: return i % 3 == 2;
  case ALL_WRONG: return 1;
  case EARLY_WRONG: return i >= 1 && i <= 3;
  case SCATTERED: return ((unsigned)i * 2654435761u >> 7) % 7 < 2;
  default: return 0;
  }
}

/* The oracle list for R under a pattern; returns its length. */
static int make_oracle(const trace *R, pattern pt, int32_t *oracle) {
  for (int i = 0; i < N_GEN; i++)
    oracle[i] = wrong_at(pt, i) ? (R->tok[i] + 1) % vocab : R->tok[i];
  return pt == CUT_SHORT ? N_GEN / 2 : N_GEN;
}

/* The greedy rule, step by step: after g tokens a sequence gets
 * k' = min(k, N - g - 1, oracle entries left) drafts; the ones before the first wrong draft are
 * accepted and one token more is emitted (the replacement, or the bonus token). Drafts are made
 * after a step for the sequences in it, once only their last token is left to compute, so
 * drafting starts (g0) at g = 1 after a prefill step that samples the first token, at g = 0 when a
 * prefill chunk stopped one token short of the end (the drafts then follow the prompt's last
 * token, as a drafter's would), at g = 2 for samples forked from sample 0 (the step that forked
 * them did not compute them); each token before g0 comes alone. */
typedef struct {
  int emitted[N_GEN]; /* tokens per step that emits any, the prefill's first token included */
  int n_steps;
  int drafted, accepted;
} plan;

static plan predict(const trace *R, const int32_t *oracle, int n_oracle, int k, int g0) {
  plan pl = {.n_steps = 0};
  for (int g = 0; g < g0; g++) pl.emitted[pl.n_steps++] = 1;
  for (int g = g0; g < N_GEN;) {
    int kk = k;
    if (N_GEN - g - 1 < kk) kk = N_GEN - g - 1;
    if (n_oracle - g < kk) kk = n_oracle - g > 0 ? n_oracle - g : 0;
    int a = 0;
    while (a < kk && oracle[g + a] == R->tok[g + a]) a++;
    pl.drafted += kk;
    pl.accepted += a;
    pl.emitted[pl.n_steps++] = a + 1;
    g += a + 1;
  }
  return pl;
}

/* The output is R, and the tokens came in the predicted groups, step by step. */
static void check_trace(const trace *got, const trace *R, const plan *pl) {
  CHECK_EQ_INT(got->n, N_GEN);
  CHECK(memcmp(got->tok, R->tok, N_GEN * sizeof(int32_t)) == 0);
  int groups = 0, ok = 1;
  for (int i = 0; i < got->n;) {
    int j = i;
    while (j < got->n && got->step[j] == got->step[i]) j++;
    ok &= groups < pl->n_steps && pl->emitted[groups] == j - i;
    groups++;
    i = j;
  }
  CHECK_EQ_INT(groups, pl->n_steps);
  CHECK(ok);
}

static int ceil_div(int a, int b) { return (a + b - 1) / b; }

/* One request at a time, so the engine's counters and steps are that request's alone. */
static void run_single(int k, int r, pattern pt) {
  static int32_t oracle[N_GEN];
  const int n_oracle = make_oracle(&ref[r], pt, oracle);
  /* Chunks of BATCH_TOKENS: one token left after a chunk when the length is 1 past a multiple. */
  const int g0 = prompt_len[r] > BATCH_TOKENS && prompt_len[r] % BATCH_TOKENS == 1 ? 0 : 1;
  const plan pl = predict(&ref[r], oracle, n_oracle, k, g0);
  m3_engine *e = open_engine("oracle", k, 2, 0);
  m3_sampling_params p = greedy_params();
  p.oracle_tokens = oracle;
  p.n_oracle_tokens = n_oracle;
  trace got = {0};
  CHECK_OK(m3_submit(e, prompts[r], prompt_len[r], &p, record, &got, NULL));
  /* After each step the sequence holds pages for exactly its computed positions: the prefill
   * chunks so far, then all tokens but the newest, so a rejected tail's pages went back. */
  m3_engine_stats st;
  int steps = 0, pages_ok = 1;
  for (int active = 1; active;) {
    current_step++;
    CHECK_OK(m3_engine_step(e, &active));
    steps++;
    m3_engine_stats_get(e, &st);
    const int computed = got.n ? prompt_len[r] + got.n - 1 : steps * BATCH_TOKENS;
    pages_ok &= st.kv_pages_used == (active ? ceil_div(computed, PAGE_TOKENS) : 0);
  }
  CHECK(pages_ok);
  check_trace(&got, &ref[r], &pl);
  CHECK_EQ_INT(st.spec_draft_tokens, pl.drafted);
  CHECK_EQ_INT(st.spec_accepted_tokens, pl.accepted);
  /* Prefill chunks (the last one emits the first group), then one step per group. */
  const int prefill = ceil_div(prompt_len[r], BATCH_TOKENS);
  CHECK_EQ_INT(st.steps, prefill + pl.n_steps - 1);
  CHECK_EQ_INT(steps, (int)st.steps);
  if (pt == EXACT) {
    CHECK_EQ_INT(st.spec_accepted_tokens, st.spec_draft_tokens);
    CHECK_EQ_INT(st.steps, g0 ? prefill + ceil_div(N_GEN - 1, k + 1)
                              : prefill - 1 + ceil_div(N_GEN, k + 1));
  }
  check_pages_free(e);
  m3_engine_close(e);
}

static void test_single(void) {
  const pattern patterns[] = {EXACT,       EVERY_5TH, EVERY_3RD, ALL_WRONG,
                              EARLY_WRONG, SCATTERED, CUT_SHORT};
  for (int k = 1; k <= 4; k++)
    for (int r = 0; r < 4; r++) run_single(k, r, EXACT);
  for (size_t i = 1; i < sizeof patterns / sizeof patterns[0]; i++)
    for (int k = 2; k <= 4; k += 2) run_single(k, (int)i % 4, patterns[i]);
}

/* Continuous batching: three requests start, three more join two steps later; each its own
 * corruption. Decodes are scheduled before prefill chunks and four of them with their drafts fit
 * the step, so every sequence gets its k' drafts at every step, as the prediction assumes. Where
 * the chunks fall depends on what shares the step, so each request's trace must be the plan that
 * starts drafting at g = 0 or the one at g = 1, told apart by its first group (1 token or more). */
static void test_batch(void) {
  enum { K = 3 };
  static const pattern pt[MAX_REQ] = {EVERY_5TH, EXACT,       SCATTERED,
                                      EVERY_3RD, EARLY_WRONG, CUT_SHORT};
  static int32_t oracle[MAX_REQ][N_GEN];
  static trace got[MAX_REQ];
  plan pl[MAX_REQ], early[MAX_REQ];
  int drafted = 0, accepted = 0, n_early = 0;
  m3_engine *e = open_engine("oracle", K, 4, 1);
  memset(got, 0, sizeof got);
  for (int r = 0; r < MAX_REQ; r++) {
    const int n_oracle = make_oracle(&ref[r], pt[r], oracle[r]);
    pl[r] = predict(&ref[r], oracle[r], n_oracle, K, 1);
    early[r] = predict(&ref[r], oracle[r], n_oracle, K, 0);
    m3_sampling_params p = greedy_params();
    p.oracle_tokens = oracle[r];
    p.n_oracle_tokens = n_oracle;
    CHECK_OK(m3_submit(e, prompts[r], prompt_len[r], &p, record, &got[r], NULL));
    if (r == 2)
      for (int i = 0, active; i < 2; i++) {
        current_step++;
        CHECK_OK(m3_engine_step(e, &active));
      }
  }
  run_all(e);
  for (int r = 0; r < MAX_REQ; r++) {
    const int first_group = got[r].n > 1 && got[r].step[1] == got[r].step[0] ? 2 : 1;
    const plan *want = first_group > 1 ? &early[r] : &pl[r];
    n_early += first_group > 1;
    check_trace(&got[r], &ref[r], want);
    drafted += want->drafted;
    accepted += want->accepted;
  }
  m3_engine_stats st;
  m3_engine_stats_get(e, &st);
  printf("batch, k=%d: %llu drafted, %llu accepted, %llu steps, prefix cache hits %llu tokens, "
         "%d drafted before their first token\n", K, (unsigned long long)st.spec_draft_tokens,
         (unsigned long long)st.spec_accepted_tokens,
         (unsigned long long)st.steps, (unsigned long long)st.prefix_cache_hit_tokens, n_early);
  CHECK_EQ_INT(st.preemptions, 0);
  CHECK_EQ_INT(st.spec_draft_tokens, drafted);
  CHECK_EQ_INT(st.spec_accepted_tokens, accepted);
  check_pages_free(e);
  m3_engine_close(e);
}

static void record_sample(const m3_token_event *ev, void *user) {
  trace *t = user;
  record(ev, &t[ev->sample]);
}

/* n = 3 samples of one request share the prompt's pages (copy-on-write where they diverge), then
 * each verifies and rolls back on its own: each is R, in the groups of its plan (sample 0 drafts
 * from g = 1, the forked ones from g = 2). */
static void test_samples(void) {
  enum { K = 3, N = 3 };
  static int32_t oracle[N_GEN];
  static trace got[N];
  memset(got, 0, sizeof got);
  const int n_oracle = make_oracle(&ref[1], EVERY_5TH, oracle);
  const plan first = predict(&ref[1], oracle, n_oracle, K, 1);
  const plan forked = predict(&ref[1], oracle, n_oracle, K, 2);
  m3_engine *e = open_engine("oracle", K, 4, 1);
  m3_sampling_params p = greedy_params();
  p.n = N;
  p.oracle_tokens = oracle;
  p.n_oracle_tokens = n_oracle;
  CHECK_OK(m3_submit(e, prompts[1], prompt_len[1], &p, record_sample, got, NULL));
  run_all(e);
  for (int i = 0; i < N; i++) check_trace(&got[i], &ref[1], i ? &forked : &first);
  m3_engine_stats st;
  m3_engine_stats_get(e, &st);
  CHECK_EQ_INT(st.spec_draft_tokens, first.drafted + (N - 1) * forked.drafted);
  CHECK_EQ_INT(st.spec_accepted_tokens, first.accepted + (N - 1) * forked.accepted);
  check_pages_free(e);
  m3_engine_close(e);
}

/* Temperature > 0: rejection sampling against the oracle's drafts (source's tokens, every fifth
 * wrong in odd requests), four sequences batched. Whatever is drawn, the tokens of a step are its
 * accepted drafts then one token more, so all but the last of each group are the oracle's, and
 * the groups' sizes less one add up to the accepted count. */
static void sample_batch(const trace *source, trace *got, m3_engine_stats *st) {
  enum { K = 4 };
  static int32_t oracle[4][N_GEN];
  m3_engine *e = open_engine("oracle", K, 4, 1);
  for (int r = 0; r < 4; r++) {
    m3_sampling_params p = greedy_params();
    p.temperature = 0.7f;
    p.top_k = 2;
    p.seed = 40 + (uint64_t)r;
    p.has_seed = 1;
    p.oracle_tokens = oracle[r];
    p.n_oracle_tokens = make_oracle(&source[r], r % 2 ? EVERY_5TH : EXACT, oracle[r]);
    memset(&got[r], 0, sizeof got[r]);
    CHECK_OK(m3_submit(e, prompts[r], prompt_len[r], &p, record, &got[r], NULL));
  }
  run_all(e);
  m3_engine_stats_get(e, st);
  check_pages_free(e);
  m3_engine_close(e);
  int accepted = 0, drafts_kept = 1;
  for (int r = 0; r < 4; r++) {
    CHECK_EQ_INT(got[r].n, N_GEN);
    for (int i = 0, j; i < got[r].n; i = j) {
      for (j = i; j < got[r].n && got[r].step[j] == got[r].step[i];) j++;
      CHECK(j - i <= K + 1);
      accepted += j - i - 1;
      for (int t = i; t < j - 1; t++) drafts_kept &= got[r].tok[t] == oracle[r][t];
    }
  }
  CHECK(drafts_kept);
  CHECK_EQ_INT(st->spec_accepted_tokens, accepted);
  CHECK(st->spec_accepted_tokens <= st->spec_draft_tokens);
}

/* The oracle from greedy R (the drafts go wrong once a draw leaves R), then from the first run's
 * own draws (right far more often), twice: the same seeds give the same tokens. */
static void test_sampling(void) {
  static trace a[4], b[4], c[4];
  m3_engine_stats sa, sb, sc;
  sample_batch(ref, a, &sa);
  sample_batch(a, b, &sb);
  sample_batch(a, c, &sc);
  printf("sampling, k=4: oracle from R %llu drafted, %llu accepted; from the first draws %llu "
         "drafted, %llu accepted\n", (unsigned long long)sa.spec_draft_tokens,
         (unsigned long long)sa.spec_accepted_tokens, (unsigned long long)sb.spec_draft_tokens,
         (unsigned long long)sb.spec_accepted_tokens);
  CHECK(sa.spec_draft_tokens > 0);
  CHECK(sb.spec_accepted_tokens > 0);
  CHECK_EQ_INT(sb.spec_draft_tokens, sc.spec_draft_tokens);
  CHECK_EQ_INT(sb.spec_accepted_tokens, sc.spec_accepted_tokens);
  for (int r = 0; r < 4; r++) CHECK(memcmp(b[r].tok, c[r].tok, sizeof b[r].tok) == 0);
}

/* A prompt with an image must not publish its pages for prefix sharing (its placeholder ids say
 * nothing of the picture), also when its verify steps, not plain decodes, extend the cache. A
 * text prompt with the very same ids (the placeholders then mean their plain embeddings) after
 * it gets no cache hit and the continuation a fresh engine gives. */
static void test_media_not_published(void) {
  m3_engine *e = open_engine("oracle", 3, 2, 1);
  FILE *f = fopen(M3_SOURCE_DIR "/tests/fixtures/vision/media/pattern.png", "rb");
  CHECK(f != NULL);
  if (!f) return;
  static uint8_t png[1 << 16];
  const size_t bytes = fread(png, 1, sizeof png, f);
  fclose(f);
  m3_media *image = NULL;
  CHECK_OK(m3_media_image(e, png, bytes, "pattern.png", &image));
  int32_t *marker = NULL, *ids = NULL;
  int n_marker = 0, n_ids = 0;
  CHECK_OK(m3_tokenize(e, "]<]image[>[", 11, 1, &marker, &n_marker));
  CHECK_EQ_INT(n_marker, 1);
  int32_t text[12];
  memcpy(text, prompts[3], 5 * sizeof(int32_t));
  text[5] = marker[0];
  memcpy(text + 6, prompts[3] + 5, 6 * sizeof(int32_t));
  CHECK_OK(m3_media_expand(e, text, 12, &image, 1, &ids, &n_ids));
  CHECK(n_ids >= 16); /* several full pages hold image rows */

  m3_engine *plain = open_engine(NULL, 0, 1, 0);
  const m3_sampling_params p = greedy_params();
  trace want = {0}, with_image = {0}, got = {0};
  CHECK_OK(m3_submit(plain, ids, n_ids, &p, record, &want, NULL));
  run_all(plain);
  m3_engine_close(plain);

  m3_sampling_params q = p;
  q.oracle_tokens = want.tok; /* right often enough to verify several drafts per step */
  q.n_oracle_tokens = N_GEN;
  CHECK_OK(m3_submit_media(e, ids, n_ids, &image, 1, &q, record, &with_image, NULL));
  run_all(e);
  CHECK_EQ_INT(with_image.n, N_GEN);
  m3_engine_stats before, after;
  m3_engine_stats_get(e, &before);
  CHECK(before.spec_draft_tokens > 0);
  CHECK_OK(m3_submit(e, ids, n_ids, &q, record, &got, NULL));
  run_all(e);
  m3_engine_stats_get(e, &after);
  CHECK_EQ_INT(after.prefix_cache_hit_tokens, before.prefix_cache_hit_tokens);
  CHECK_EQ_INT(got.n, N_GEN);
  CHECK(memcmp(got.tok, want.tok, sizeof got.tok) == 0);
  check_pages_free(e);
  m3_media_free(image);
  free(marker);
  free(ids);
  m3_engine_close(e);
}

static void test_refused(void) {
  static const int32_t oracle[2] = {30, 31};
  m3_sampling_params p = greedy_params();
  p.oracle_tokens = oracle;
  p.n_oracle_tokens = 2;
  trace t = {0};
  m3_engine *e = open_engine(NULL, 0, 1, 0);
  CHECK_FAILS_WITH(m3_submit(e, prompts[0], 3, &p, record, &t, NULL), M3_ERR_ARG, "oracle");
  m3_engine_close(e);
  e = open_engine("oracle", 2, 1, 0);
  const int32_t bad[2] = {30, -1};
  p.oracle_tokens = bad;
  CHECK_FAILS_WITH(m3_submit(e, prompts[0], 3, &p, record, &t, NULL), M3_ERR_ARG, "oracle token");
  p.oracle_tokens = NULL;
  CHECK_FAILS_WITH(m3_submit(e, prompts[0], 3, &p, record, &t, NULL), M3_ERR_ARG, "count without");
  m3_engine_close(e);
  CHECK_EQ_INT(t.n, 0);
}

int main(void) {
  CHECK_OK(m3_builtin_model_dir(model_dir, sizeof model_dir));
  make_reference();
  test_single();
  test_batch();
  test_samples();
  test_sampling();
  test_media_not_published();
  test_refused();
  return check_summary();
}
