/* Sampling by the backend (sample_rows, the scheduler's path that moves one id per logits row to
 * the host instead of the row) gives a request exactly the tokens of the host sampler.
 *
 * The CPU backend has no sample_rows; the engine here gets one that draws each row with
 * m3_sampler_sample_unit from the unit the scheduler handed over. The built-in tiny model's
 * requests (top_k, top_p, min_p, temperatures, two samples of one prompt, greedy ones batched with
 * them) then give the same tokens, seed for seed, as on the plain CPU backend, where the host
 * sampler draws each unit from the sequence's PRNG itself: the scheduler took the same PRNG values
 * in the same order. The counts of rows drawn show the path is taken for plain draws and kept off
 * for requests whose rows the host must read (log-probabilities, logit bias, penalties). */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "check.h"
#include "engine/engine_internal.h"
#include "engine/sampler.h"
#include "m3.h"
#include "random.h"

enum { NREQ = 5, MAXGEN = 12, SAMPLES = 2 };

static m3_sampler_scratch row_scratch;
static int drawn_rows, argmax_rows_seen;

/* sample_rows on the host, as the op's contract defines it. */
static m3_status host_sample_rows(m3_backend *be, const float *logits, int nrows, int vocab,
                                  const m3_row_sampling *rows, int32_t *out_host) {
  (void)be;
  if (row_scratch.vocab != vocab) {
    m3_sampler_scratch_free(&row_scratch);
    m3_status st = m3_sampler_scratch_init(&row_scratch, vocab);
    if (st != M3_OK) return st;
  }
  const m3_sample_history none = {0};
  for (int r = 0; r < nrows; r++) {
    m3_sampling_params p;
    m3_sampling_params_init(&p);
    p.temperature = rows[r].temperature;
    p.top_k = rows[r].top_k;
    p.top_p = rows[r].top_p;
    p.min_p = rows[r].min_p;
    out_host[r] = m3_sampler_sample_unit(&p, rows[r].unit, logits + (size_t)r * (size_t)vocab,
                                         &none, &row_scratch);
    if (p.temperature > 0.0f) drawn_rows++;
    else argmax_rows_seen++;
  }
  return M3_OK;
}

typedef struct {
  int32_t tokens[SAMPLES][MAXGEN];
  int n[SAMPLES];
} collected;

static void collect(const m3_token_event *ev, void *user) {
  collected *c = user;
  if (ev->token < 0 || ev->sample < 0 || ev->sample >= SAMPLES || c->n[ev->sample] >= MAXGEN) return;
  c->tokens[ev->sample][c->n[ev->sample]++] = ev->token;
}

static int32_t prompts[NREQ][20];
static const int prompt_len[NREQ] = {6, 17, 9, 20, 4};

typedef enum { PLAIN, LOGPROBS, BIAS, PENALTY } mode;

/* Request r: 0 top_k, 1 top_p + min_p, 2 two samples, 3 greedy, 4 a hot top_p with top_k;
 * the other modes add what makes the host read the rows, to every sampling request. */
static void params_for(int r, mode md, m3_sampling_params *p) {
  static const int32_t bias_id = 300;
  static const float bias_value = 0.5f;
  m3_sampling_params_init(p);
  p->max_tokens = MAXGEN;
  p->ignore_eos = 1;
  p->has_seed = 1;
  p->seed = 1000 + (uint64_t)r;
  switch (r) {
    case 0: p->temperature = 0.9f, p->top_k = 40; break;
    case 1: p->temperature = 1.3f, p->top_p = 0.9f, p->min_p = 0.05f; break;
    case 2: p->temperature = 0.7f, p->n = SAMPLES; break;
    case 3: p->temperature = 0.0f; break;
    default: p->temperature = 2.0f, p->top_p = 0.999f, p->top_k = 5000; break;
  }
  if (r == 3) return;
  if (md == LOGPROBS) p->logprobs = 1;
  if (md == BIAS) p->logit_bias_ids = &bias_id, p->logit_bias_values = &bias_value, p->n_logit_bias = 1;
  if (md == PENALTY) p->repetition_penalty = 1.1f;
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

static void run_all(m3_engine *e, mode md, collected *out) {
  for (int r = 0; r < NREQ; r++) {
    m3_sampling_params p;
    params_for(r, md, &p);
    memset(&out[r], 0, sizeof out[r]);
    CHECK_OK(m3_submit(e, prompts[r], prompt_len[r], &p, collect, &out[r], NULL));
  }
  int active = 1;
  for (int guard = 0; active && guard < 10000; guard++) CHECK_OK(m3_engine_step(e, &active));
  CHECK_EQ_INT(active, 0);
}

static int same_tokens(const collected *a, const collected *b) {
  int same = 1;
  for (int r = 0; r < NREQ; r++)
    for (int s = 0; s < (r == 2 ? SAMPLES : 1); s++) {
      CHECK_EQ_INT(a[r].n[s], MAXGEN);
      same &= a[r].n[s] == b[r].n[s] &&
              memcmp(a[r].tokens[s], b[r].tokens[s], sizeof a[r].tokens[s]) == 0;
    }
  return same;
}

int main(void) {
  m3_engine *e = open_engine();
  if (!e) return check_summary();
  m3_model_info info;
  m3_engine_model_info(e, &info);
  for (int r = 0; r < NREQ; r++)
    for (int i = 0; i < prompt_len[r]; i++)
      prompts[r][i] = 256 + (int32_t)(rnd() % (uint32_t)(info.vocab_size - 300));

  const m3_backend_ops *host_ops = e->be->ops;
  CHECK(host_ops->sample_rows == NULL);
  static m3_backend_ops drawing_ops;
  drawing_ops = *host_ops;
  drawing_ops.sample_rows = host_sample_rows;

  collected host[NREQ], backend[NREQ], other[NREQ];
  run_all(e, PLAIN, host);
  CHECK_EQ_INT(drawn_rows, 0);

  e->be->ops = &drawing_ops;
  run_all(e, PLAIN, backend);
  printf("backend path: %d rows drawn, %d argmax rows\n", drawn_rows, argmax_rows_seen);
  CHECK(same_tokens(host, backend));
  /* The prompts (56 tokens) fit the first step, whose rows include the one the two samples of
   * request 2 both draw from: the host draws that step. Every later step goes to the backend:
   * 5 sampling sequences and the greedy one, MAXGEN - 1 tokens each. */
  CHECK_EQ_INT(drawn_rows, (NREQ - 1 + SAMPLES - 1) * (MAXGEN - 1));
  CHECK_EQ_INT(argmax_rows_seen, MAXGEN - 1);
  /* The seeds matter: the samples of request 2 differ somewhere. */
  CHECK(memcmp(backend[2].tokens[0], backend[2].tokens[1], sizeof backend[2].tokens[0]) != 0);

  /* Rows the host must read keep the host path (and give the host's tokens). */
  const mode host_modes[] = {LOGPROBS, BIAS, PENALTY};
  for (int m = 0; m < 3; m++) {
    e->be->ops = host_ops;
    run_all(e, host_modes[m], host);
    e->be->ops = &drawing_ops;
    drawn_rows = 0;
    run_all(e, host_modes[m], other);
    CHECK_EQ_INT(drawn_rows, 0);
    CHECK(same_tokens(host, other));
  }
  e->be->ops = host_ops;
  m3_engine_close(e);
  m3_sampler_scratch_free(&row_scratch);
  return check_summary();
}
