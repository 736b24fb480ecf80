/* test_engine_ranks_head: which head a step of several ranks runs (engine/ranks.h) when lm_head is
 * split over the vocabulary (the committed fixtures' 320 ids over 2 and 4 ranks): an all-greedy
 * step exchanges only each row's best candidate (m3_model_forward_batch_argmax on every rank),
 * any other step gathers whole logits rows. Against the same engine with one rank, through m3.h:
 *   greedy     greedy requests and a request of forced tokens batched together (argmax steps):
 *              the same tokens;
 *   logprobs   a greedy request asking for its logprob and top 3 alone, and batched with a plain
 *              greedy one: its steps must gather rows (an argmax step hands the sampler no row to
 *              take log-probabilities from): the same tokens, logprobs within 1e-4, the same top
 *              ids;
 *   sampled    a seeded request at temperature 0.8 (no sample_rows on the CPU: the host sampler
 *              reads the gathered rows), batched with a greedy one: the same tokens.
 * Layouts: tp 2 on a fixture without MoE layers, tp 2 x ep 2 on one with them. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "m3.h"

enum { GEN = 6, TOP = 3, MAX_REQ = 3 };

typedef struct {
  int32_t tokens[GEN];
  float logprob[GEN];
  int32_t top[GEN][TOP];
  int n, n_top, finished;
} collected;

static void collect(const m3_token_event *ev, void *user) {
  collected *c = user;
  if (ev->finish != M3_FINISH_NONE) c->finished = 1;
  if (ev->token < 0 || c->n >= GEN) return;
  c->tokens[c->n] = ev->token;
  c->logprob[c->n] = ev->logprob;
  c->n_top = ev->n_top;
  for (int j = 0; j < ev->n_top && j < TOP; j++) c->top[c->n][j] = ev->top_ids[j];
  c->n++;
}

static const char *fixture(const char *name) {
  static char path[4096];
  snprintf(path, sizeof path, "%s/tests/fixtures/text/%s", M3_SOURCE_DIR, name);
  return path;
}

typedef enum { GREEDY, FORCED, LOGPROBS, SAMPLED } kind;

static const int32_t forced[GEN] = {17, 3, 250, 3, 99, 1};

static void submit(m3_engine *e, kind k, int r, collected *out) {
  static const int32_t prompts[MAX_REQ][7] = {
      {12, 40, 7, 301, 88, 5, 19}, {200, 3, 3, 64, 9, 150, 42}, {77, 1, 260, 31, 8, 190, 2}};
  m3_sampling_params p;
  m3_sampling_params_init(&p);
  p.temperature = k == SAMPLED ? 0.8f : 0.0f;
  p.has_seed = 1;
  p.seed = 7;
  p.max_tokens = GEN;
  p.ignore_eos = 1;
  p.logprobs = k == LOGPROBS;
  p.top_logprobs = k == LOGPROBS ? TOP : 0;
  if (k == FORCED) {
    p.forced_tokens = forced;
    p.n_forced_tokens = GEN;
  }
  memset(out, 0, sizeof *out);
  CHECK_OK(m3_submit(e, prompts[r], 7, &p, collect, out, NULL));
}

/* The requests of `kinds` submitted together, stepped until done. */
static void run(const char *name, int tp, int ep, const kind *kinds, int n, collected *out) {
  m3_engine_options o;
  m3_engine_options_init(&o);
  o.model_dir = fixture(name);
  o.threads = 1;
  o.max_running = 4;
  o.kv_memory_bytes = 1 << 20;
  o.tp = tp;
  o.ep = ep;
  m3_engine *e = NULL;
  CHECK_OK(m3_engine_open(&o, &e));
  if (!e) return;
  for (int r = 0; r < n; r++) submit(e, kinds[r], r, &out[r]);
  int active = 1;
  for (int guard = 0; active && guard < 100; guard++) CHECK_OK(m3_engine_step(e, &active));
  CHECK_EQ_INT(active, 0);
  m3_engine_close(e);
}

static void check_case(const char *name, int tp, int ep, const char *what, const kind *kinds,
                       int n) {
  collected want[MAX_REQ], got[MAX_REQ];
  run(name, 1, 1, kinds, n, want);
  run(name, tp, ep, kinds, n, got);
  double worst = 0;
  int differ = 0;
  for (int r = 0; r < n; r++) {
    CHECK_EQ_INT(got[r].n, GEN);
    CHECK(got[r].finished);
    differ += memcmp(got[r].tokens, want[r].tokens, sizeof got[r].tokens) != 0;
    if (kinds[r] == FORCED) CHECK(memcmp(got[r].tokens, forced, sizeof forced) == 0);
    if (kinds[r] != LOGPROBS) continue;
    CHECK_EQ_INT(got[r].n_top, TOP);
    for (int i = 0; i < GEN; i++) {
      const double d = fabs((double)got[r].logprob[i] - want[r].logprob[i]);
      worst = d > worst ? d : worst;
      CHECK(got[r].logprob[i] < 0.0f && d <= 1e-4);
      CHECK(memcmp(got[r].top[i], want[r].top[i], sizeof got[r].top[i]) == 0);
    }
  }
  CHECK_EQ_INT(differ, 0);
  printf("%-22s tp %d x ep %d, %-28s %d of %d requests differ from one rank; worst logprob "
         "difference %.2e\n", name, tp, ep, what, differ, n, worst);
}

static void check_layout(const char *name, int tp, int ep) {
  static const kind greedy[] = {GREEDY, FORCED, GREEDY};
  static const kind logprobs[] = {LOGPROBS};
  static const kind mixed[] = {GREEDY, LOGPROBS};
  static const kind sampled[] = {SAMPLED, GREEDY};
  check_case(name, tp, ep, "greedy and forced:", greedy, 3);
  check_case(name, tp, ep, "logprobs alone:", logprobs, 1);
  check_case(name, tp, ep, "greedy with logprobs:", mixed, 2);
  check_case(name, tp, ep, "sampled with greedy:", sampled, 2);
}

int main(void) {
  check_layout("full_dense_gqa2_f32", 2, 1);
  check_layout("mixed_bf16", 2, 2);
  return check_summary();
}
