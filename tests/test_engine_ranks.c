/* test_engine_ranks: one process driving tp x ep ranks (engine/ranks.h) on CPU backends with the
 * host all-reduce, through m3.h, against the same engine with one rank.
 *   tokens    the same scenario on both engines: two requests submitted together (one with n = 2
 *             greedy samples, whose shared partial prompt page is copied on write when the first
 *             sample decodes: every rank must copy it), two more joining while those decode (one
 *             sharing two whole pages of the first prompt: a prefix-cache hit; prefills chunked by
 *             a small step budget). Every sample's greedy tokens, finish reason and cached prompt
 *             tokens must equal the one-rank engine's; the hit must be there. Layouts: tp 2, ep 2
 *             and tp 2 x ep 2 on committed fixtures whose sizes divide (tp 2 alone on one without
 *             MoE layers), tp 4 on a fixture with 2 KV heads (each KV head on two ranks).
 *   loop      the same requests on the engine's loop thread (m3_engine_start), tp 2 x ep 2 against
 *             one rank.
 *   failure   rank 1's third forward fails (M3_RANKS_FAIL, injected before it issues anything, so
 *             rank 0 blocks in the all-reduce it never joins): the step ends (no hang), every
 *             request of it finishes with an error naming rank 1, and the next requests decode
 *             the one-rank engine's tokens (nothing left corrupt or blocked).
 *   refusals  sizes the ranks do not divide (named --tp / --ep with the size), --ep without MoE
 *             layers, speculative decoding with several ranks, negative sizes, a CUDA device in a
 *             build without CUDA. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "m3.h"

enum { NREQ = 4, GEN = 8, MAX_SAMPLES = 2, MAX_PROMPT = 24 };

typedef struct {
  int32_t tokens[MAX_SAMPLES][GEN];
  int n[MAX_SAMPLES];
  m3_finish_reason finish[MAX_SAMPLES];
  int cached;
  char error[256];
} collected;

static void collect(const m3_token_event *ev, void *user) {
  collected *c = user;
  if (ev->sample < 0 || ev->sample >= MAX_SAMPLES) return;
  if (ev->token >= 0 && c->n[ev->sample] < GEN)
    c->tokens[ev->sample][c->n[ev->sample]++] = ev->token;
  if (ev->finish != M3_FINISH_NONE) c->finish[ev->sample] = ev->finish;
  if (ev->finish == M3_FINISH_ERROR && ev->error)
    snprintf(c->error, sizeof c->error, "%s", ev->error);
  c->cached = ev->cached_prompt_tokens;
}

static const char *fixture(const char *name) {
  static char path[4096];
  snprintf(path, sizeof path, "%s/tests/fixtures/text/%s", M3_SOURCE_DIR, name);
  return path;
}

static m3_engine_options options(const char *dir, int tp, int ep) {
  m3_engine_options o;
  m3_engine_options_init(&o);
  o.model_dir = dir;
  o.threads = 1;
  o.max_running = 4;
  o.max_batch_tokens = 16; /* the 19-token prompt prefills in two chunks */
  o.kv_memory_bytes = 1 << 20;
  o.prefix_cache = 1;
  o.tp = tp;
  o.ep = ep;
  return o;
}

static int32_t prompts[NREQ][MAX_PROMPT];
static const int prompt_len[NREQ] = {11, 6, 19, 5};

/* Ids in [1, vocab); request 2 begins with request 0's first 8 tokens (two pages of 4). */
static void make_prompts(int vocab) {
  uint64_t x = 2024;
  for (int r = 0; r < NREQ; r++)
    for (int i = 0; i < prompt_len[r]; i++) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      prompts[r][i] = 1 + (int32_t)((x >> 33) % (uint64_t)(vocab - 1));
    }
  memcpy(prompts[2], prompts[0], 8 * sizeof(int32_t));
}

static void submit(m3_engine *e, int r, collected *out) {
  m3_sampling_params p;
  m3_sampling_params_init(&p);
  p.temperature = 0.0f;
  p.max_tokens = GEN;
  p.ignore_eos = 1;
  p.n = r == 0 ? 2 : 1;
  memset(&out[r], 0, sizeof out[r]);
  CHECK_OK(m3_submit(e, prompts[r], prompt_len[r], &p, collect, &out[r], NULL));
}

static void scenario(m3_engine *e, collected *out) {
  int active = 1;
  submit(e, 0, out);
  submit(e, 1, out);
  /* Both prompts computed and request 0's whole pages published. */
  for (int i = 0; i < 2; i++) CHECK_OK(m3_engine_step(e, &active));
  submit(e, 2, out);
  submit(e, 3, out);
  for (int guard = 0; active && guard < 1000; guard++) CHECK_OK(m3_engine_step(e, &active));
  CHECK_EQ_INT(active, 0);
}

static void check_layout(const char *name, int tp, int ep, const collected *want) {
  m3_engine_options o = options(fixture(name), tp, ep);
  m3_engine *e = NULL;
  CHECK_OK(m3_engine_open(&o, &e));
  if (!e) return;
  static collected got[NREQ];
  scenario(e, got);
  int differ = 0;
  for (int r = 0; r < NREQ; r++) {
    const int samples = r == 0 ? 2 : 1;
    for (int s = 0; s < samples; s++) {
      CHECK_EQ_INT(got[r].n[s], GEN);
      CHECK_EQ_INT((int)got[r].finish[s], (int)M3_FINISH_LENGTH);
      differ += memcmp(got[r].tokens[s], want[r].tokens[s], sizeof got[r].tokens[s]) != 0;
    }
    CHECK_EQ_INT(got[r].cached, want[r].cached);
  }
  CHECK_EQ_INT(differ, 0);
  printf("%-26s tp %d x ep %d: %d of %d samples differ from one rank; request 2 cached %d\n",
         name, tp, ep, differ, NREQ + 1, got[2].cached);
  m3_engine_close(e);
}

static void check_fixture(const char *name, const int (*layouts)[2], int n_layouts) {
  m3_engine_options o = options(fixture(name), 0, 0);
  m3_engine *e = NULL;
  CHECK_OK(m3_engine_open(&o, &e));
  if (!e) return;
  m3_model_info info;
  m3_engine_model_info(e, &info);
  make_prompts(info.vocab_size);
  static collected want[NREQ];
  scenario(e, want);
  m3_engine_close(e);
  /* The scenario holds what it is meant to: two greedy samples alike, a prefix-cache hit. */
  CHECK(memcmp(want[0].tokens[0], want[0].tokens[1], sizeof want[0].tokens[0]) == 0);
  CHECK_EQ_INT(want[2].cached, 8);
  for (int i = 0; i < n_layouts; i++) check_layout(name, layouts[i][0], layouts[i][1], want);
}

/* The ranks driven from the engine's loop thread (m3_engine_start), not the thread that opened
 * them: the four requests queued before the start, so both engines batch them alike. */
static void run_loop(m3_engine *e, collected *out) {
  for (int r = 0; r < NREQ; r++) submit(e, r, out);
  CHECK_OK(m3_engine_start(e));
  m3_engine_stop(e, 60000); /* returns once the requests are done */
}

static void check_loop_thread(const char *name, int tp, int ep) {
  static collected want[NREQ], got[NREQ];
  m3_engine *e = NULL;
  for (int world = 0; world < 2; world++) {
    m3_engine_options o = world ? options(fixture(name), tp, ep) : options(fixture(name), 0, 0);
    CHECK_OK(m3_engine_open(&o, &e));
    if (!e) return;
    m3_model_info info;
    m3_engine_model_info(e, &info);
    make_prompts(info.vocab_size);
    run_loop(e, world ? got : want);
    m3_engine_close(e);
  }
  int differ = 0;
  for (int r = 0; r < NREQ; r++)
    for (int s = 0; s < (r == 0 ? 2 : 1); s++) {
      CHECK_EQ_INT(got[r].n[s], GEN);
      differ += memcmp(got[r].tokens[s], want[r].tokens[s], sizeof got[r].tokens[s]) != 0;
    }
  CHECK_EQ_INT(differ, 0);
  printf("%-26s tp %d x ep %d on the loop thread: %d of %d samples differ\n", name, tp, ep, differ,
         NREQ + 1);
}

/* Runs requests r0..r1 to their end on e. */
static void run_requests(m3_engine *e, int r0, int r1, collected *out) {
  for (int r = r0; r <= r1; r++) submit(e, r, out);
  int active = 1;
  for (int guard = 0; active && guard < 1000; guard++) CHECK_OK(m3_engine_step(e, &active));
  CHECK_EQ_INT(active, 0);
}

static void check_failing_rank(const char *name, int tp, int ep) {
  static collected want[NREQ], got[NREQ];
  m3_engine *e = NULL;
  for (int world = 0; world < 2; world++) {
    /* Forwards 1 and 2 prefill requests 0 and 1 (two chunks of the 11 + 6 tokens); the third is
     * their first decode step. */
    if (world) setenv("M3_RANKS_FAIL", "1:3", 1);
    m3_engine_options o = world ? options(fixture(name), tp, ep) : options(fixture(name), 0, 0);
    m3_status st = m3_engine_open(&o, &e);
    unsetenv("M3_RANKS_FAIL");
    CHECK_OK(st);
    if (!e) return;
    m3_model_info info;
    m3_engine_model_info(e, &info);
    make_prompts(info.vocab_size);
    collected *out = world ? got : want;
    run_requests(e, 0, 1, out);
    run_requests(e, 3, 3, out);
    m3_engine_close(e);
  }
  for (int r = 0; r < 2; r++) {
    CHECK_EQ_INT((int)got[r].finish[0], (int)M3_FINISH_ERROR);
    CHECK(strstr(got[r].error, "rank 1: failure injected at its forward 3") != NULL);
  }
  CHECK_EQ_INT((int)got[3].finish[0], (int)M3_FINISH_LENGTH);
  CHECK_EQ_INT(got[3].n[0], GEN);
  CHECK(memcmp(got[3].tokens[0], want[3].tokens[0], sizeof got[3].tokens[0]) == 0);
  printf("%-26s tp %d x ep %d, rank 1 failing: requests of the step: '%s'; the next request "
         "decodes as one rank: %s\n", name, tp, ep, got[0].error,
         memcmp(got[3].tokens[0], want[3].tokens[0], sizeof got[3].tokens[0]) ? "NO" : "yes");
}

static void check_refusal(const char *name, int tp, int ep, const char *speculative,
                          const char *device, m3_status status, const char *needle) {
  m3_engine_options o = options(fixture(name), tp, ep);
  o.speculative = speculative;
  if (device) o.device = device;
  m3_engine *e = NULL;
  CHECK_FAILS_WITH(m3_engine_open(&o, &e), status, needle);
  CHECK(e == NULL);
  m3_engine_close(e);
}

int main(void) {
  static const int tp_ep[][2] = {{2, 1}, {1, 2}, {2, 2}};
  static const int tp2[][2] = {{2, 1}};
  static const int tp4[][2] = {{4, 1}};
  check_fixture("full_dense_gqa2_f32", tp2, 1); /* no MoE layer: no expert parallelism */
  check_fixture("mixed_bf16", tp_ep, 3);
  check_fixture("mixed_gqa4_rot_half_f32", tp_ep, 3);
  check_fixture("gqa8_local2_tied_f32", tp4, 1);
  check_loop_thread("mixed_bf16", 2, 2);
  check_failing_rank("mixed_bf16", 2, 2);

  check_refusal("mixed_bf16", 3, 1, NULL, NULL, M3_ERR_ARG,
                "--tp 3: num_attention_heads 4 is not divisible by 3");
  check_refusal("full_dense_gqa2_f32", 8, 1, NULL, NULL, M3_ERR_ARG,
                "--tp 8: num_attention_heads 4 is not divisible by 8");
  check_refusal("full_dense_gqa2_f32", 1, 2, NULL, NULL, M3_ERR_CONFIG,
                "has no MoE layer whose experts the expert-parallel size 2 could split");
  check_refusal("mixed_bf16", 1, 4, NULL, NULL, M3_ERR_ARG,
                "--ep 4: num_local_experts 6 is not divisible by 4");
  check_refusal("mixed_bf16", 2, 1, "oracle", NULL, M3_ERR_ARG,
                "--speculative oracle with --tp 2 --ep 1: speculative decoding does not run over "
                "several ranks yet");
  check_refusal("mixed_bf16", -1, 1, NULL, NULL, M3_ERR_ARG, "tp -1, ep 1 must be >= 0");
#ifndef M3_HAVE_CUDA
  check_refusal("mixed_bf16", 2, 1, NULL, "cuda:1", M3_ERR_UNSUPPORTED, "no CUDA backend");
#endif
  return check_summary();
}
