/* The engine through m3.h on the built-in tiny model (4 layers incl. sparse MSA layers with
 * blocks of 4 tokens and top-3 selection, MoE): whatever the batching, each request gets the
 * tokens it gets alone.
 *   - ragged prompts submitted together and mid-flight vs one at a time (greedy and seeded);
 *   - prefix-cache hits vs misses; preempted-and-resumed vs undisturbed;
 *   - n samples sharing the prompt's pages vs the same seeds alone;
 *   - the batched model forward against per-sequence forwards: logits and MSA selections;
 *   - stop strings, stop ids, max_tokens, forced tokens, cancellation, usage. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "engine/kvcache.h"
#include "io/tiny.h"
#include "m3.h"
#include "model/model.h"

enum { NREQ = 10, MAXGEN = 12, MAXSAMPLES = 4 };

typedef struct {
  int32_t tokens[MAXSAMPLES][64];
  int n[MAXSAMPLES];
  m3_finish_reason finish[MAXSAMPLES];
  char text[MAXSAMPLES][512];
  size_t text_len[MAXSAMPLES];
  int events, cached, bad_usage;
} collected;

static void collect(const m3_token_event *ev, void *user) {
  collected *c = user;
  c->events++;
  if (ev->sample < 0 || ev->sample >= MAXSAMPLES) return;
  if (ev->token >= 0 && c->n[ev->sample] < 64) c->tokens[ev->sample][c->n[ev->sample]++] = ev->token;
  if (c->text_len[ev->sample] + ev->text_len < sizeof c->text[0]) {
    memcpy(c->text[ev->sample] + c->text_len[ev->sample], ev->text, ev->text_len);
    c->text_len[ev->sample] += ev->text_len;
  }
  if (ev->generated_tokens != c->n[ev->sample]) c->bad_usage++;
  c->cached = ev->cached_prompt_tokens;
  if (ev->finish != M3_FINISH_NONE) c->finish[ev->sample] = ev->finish;
}

static int32_t prompts[NREQ][48];
static int prompt_len[NREQ];

static void make_prompts(int vocab) {
  uint64_t x = 12345;
  for (int r = 0; r < NREQ; r++) {
    prompt_len[r] = 3 + (r * 11) % 40; /* ragged: 3 .. 42 tokens, up to 11 blocks */
    for (int i = 0; i < prompt_len[r]; i++) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      prompts[r][i] = (int32_t)((x >> 33) % (uint64_t)(vocab - 300)) + 256;
    }
  }
  /* Requests 6..9 share request 5's first 20 tokens (5 pages), for the prefix cache. */
  for (int r = 6; r < NREQ; r++) {
    if (prompt_len[r] < 24) prompt_len[r] = 24 + r;
    memcpy(prompts[r], prompts[5], 20 * sizeof(int32_t));
  }
}

static m3_engine *open_engine(int max_running, size_t kv_bytes, int prefix_cache) {
  m3_engine_options o;
  m3_engine_options_init(&o);
  o.threads = 1; /* tiny matrices: one thread beats two that synchronise */
  o.max_running = max_running;
  o.kv_memory_bytes = kv_bytes;
  o.prefix_cache = prefix_cache;
  o.max_batch_tokens = 64;
  m3_engine *e = NULL;
  CHECK_OK(m3_engine_open(&o, &e));
  return e;
}

static void params_for(int r, int seeded, m3_sampling_params *p) {
  m3_sampling_params_init(p);
  p->max_tokens = MAXGEN;
  p->ignore_eos = 1;
  if (seeded) {
    p->temperature = 0.9f;
    p->top_p = 0.95f;
    p->seed = 1000 + (uint64_t)r;
    p->has_seed = 1;
  } else {
    p->temperature = 0.0f;
  }
}

static void drain(m3_engine *e) {
  int active = 1;
  for (int guard = 0; active && guard < 100000; guard++) CHECK_OK(m3_engine_step(e, &active));
  CHECK_EQ_INT(active, 0);
}

/* Each request alone, start to finish. */
static void run_alone(m3_engine *e, int seeded, collected *out) {
  for (int r = 0; r < NREQ; r++) {
    m3_sampling_params p;
    params_for(r, seeded, &p);
    memset(&out[r], 0, sizeof out[r]);
    CHECK_OK(m3_submit(e, prompts[r], prompt_len[r], &p, collect, &out[r], NULL));
    drain(e);
  }
}

/* Half submitted at once, the rest one per step while the first ones decode. */
static void run_batched(m3_engine *e, int seeded, collected *out) {
  int next = 0, active = 1;
  for (; next < NREQ / 2; next++) {
    m3_sampling_params p;
    params_for(next, seeded, &p);
    memset(&out[next], 0, sizeof out[next]);
    CHECK_OK(m3_submit(e, prompts[next], prompt_len[next], &p, collect, &out[next], NULL));
  }
  for (int guard = 0; (active || next < NREQ) && guard < 100000; guard++) {
    if (next < NREQ && guard % 2 == 1) {
      m3_sampling_params p;
      params_for(next, seeded, &p);
      memset(&out[next], 0, sizeof out[next]);
      CHECK_OK(m3_submit(e, prompts[next], prompt_len[next], &p, collect, &out[next], NULL));
      next++;
    }
    CHECK_OK(m3_engine_step(e, &active));
  }
}

static int same_tokens(const collected *a, const collected *b, int samples) {
  for (int s = 0; s < samples; s++)
    if (a->n[s] != b->n[s] || memcmp(a->tokens[s], b->tokens[s], (size_t)a->n[s] * 4) != 0 ||
        a->finish[s] != b->finish[s])
      return 0;
  return 1;
}

static void compare_runs(const char *what, const collected *want, const collected *got) {
  int diff = 0;
  for (int r = 0; r < NREQ; r++) {
    CHECK_EQ_INT(want[r].n[0], MAXGEN);
    CHECK_EQ_INT(got[r].bad_usage, 0);
    if (!same_tokens(&want[r], &got[r], 1)) {
      diff++;
      fprintf(stderr, "%s: request %d differs\n", what, r);
    }
  }
  printf("%-40s %d of %d requests differ\n", what, diff, NREQ);
  CHECK_EQ_INT(diff, 0);
}

static void test_batching(void) {
  static collected alone[NREQ], batched[NREQ];
  for (int seeded = 0; seeded < 2; seeded++) {
    m3_engine *e = open_engine(64, 0, 0);
    if (!e) return;
    m3_model_info info;
    m3_engine_model_info(e, &info);
    make_prompts(info.vocab_size);
    run_alone(e, seeded, alone);
    run_batched(e, seeded, batched);
    compare_runs(seeded ? "seeded: batched vs alone" : "greedy: batched vs alone", alone, batched);

    /* Prefix cache on: requests 6..9 hit request 5's pages. */
    m3_engine *pc = open_engine(64, 0, 1);
    if (pc) {
      run_batched(pc, seeded, batched);
      compare_runs("prefix cache vs none", alone, batched);
      run_alone(pc, seeded, batched); /* everything is cached now */
      compare_runs("prefix cache (warm) vs none", alone, batched);
      CHECK(batched[7].cached >= 20 && batched[7].cached % 4 == 0);
      m3_engine_stats st;
      m3_engine_stats_get(pc, &st);
      printf("prefix cache: %llu of %llu prompt tokens hit\n",
             (unsigned long long)st.prefix_cache_hit_tokens,
             (unsigned long long)st.prefix_cache_query_tokens);
      CHECK(st.prefix_cache_hit_tokens > 0);
      m3_engine_close(pc);
    }
    m3_engine_close(e);
  }
}

/* Page bytes of the tiny model, from a one-page engine. */
static size_t tiny_page_bytes(void) {
  char dir[4096];
  CHECK_OK(m3_builtin_model_dir(dir, sizeof dir));
  char path[4200];
  snprintf(path, sizeof path, "%s/config.json", dir);
  m3_config cfg;
  if (m3_config_load(path, &cfg) != M3_OK) return 0;
  size_t bytes = m3_kv_page_bytes(&cfg, M3_KV_F32);
  m3_config_free(&cfg);
  return bytes;
}

static void test_preemption(void) {
  static collected alone[NREQ], squeezed[NREQ];
  size_t page = tiny_page_bytes();
  for (int seeded = 0; seeded < 2; seeded++) {
    m3_engine *e = open_engine(64, 0, 0);
    if (!e) return;
    run_alone(e, seeded, alone);
    m3_engine_close(e);
    for (int pc = 0; pc < 2; pc++) {
      e = open_engine(64, 16 * page, pc);
      if (!e) return;
      run_batched(e, seeded, squeezed);
      m3_engine_stats st;
      m3_engine_stats_get(e, &st);
      printf("16 pages, prefix cache %d: %llu preemptions\n", pc,
             (unsigned long long)st.preemptions);
      CHECK(st.preemptions > 0);
      compare_runs(pc ? "preempted (prefix cache) vs alone" : "preempted vs alone", alone, squeezed);
      CHECK_EQ_INT(st.kv_pages_used, 0);
      m3_engine_close(e);
    }
  }
}

/* n samples share the prompt's pages; sample i must equal a lone request seeded for sample i.
 * Alone, n = 1 with seed s gives sample 0 of seed s, so compare sample 0 directly and the others
 * against n-sample runs under different batching. */
static void test_n_samples(void) {
  m3_engine *e = open_engine(64, 0, 1);
  if (!e) return;
  collected lone, both[2];
  m3_sampling_params p;
  params_for(3, 1, &p);
  memset(&lone, 0, sizeof lone);
  CHECK_OK(m3_submit(e, prompts[3], prompt_len[3], &p, collect, &lone, NULL));
  drain(e);
  p.n = 3;
  memset(both, 0, sizeof both);
  CHECK_OK(m3_submit(e, prompts[3], prompt_len[3], &p, collect, &both[0], NULL));
  drain(e);
  CHECK_OK(m3_submit(e, prompts[3], prompt_len[3], &p, collect, &both[1], NULL));
  m3_sampling_params q;
  params_for(4, 1, &q);
  collected other;
  memset(&other, 0, sizeof other);
  CHECK_OK(m3_submit(e, prompts[4], prompt_len[4], &q, collect, &other, NULL));
  drain(e);
  CHECK(same_tokens(&lone, &both[0], 1));
  CHECK(same_tokens(&both[0], &both[1], 3));
  CHECK(both[0].n[1] == MAXGEN && both[0].n[2] == MAXGEN);
  CHECK(memcmp(both[0].tokens[0], both[0].tokens[1], MAXGEN * 4) != 0 ||
        memcmp(both[0].tokens[1], both[0].tokens[2], MAXGEN * 4) != 0);
  m3_engine_stats st;
  m3_engine_stats_get(e, &st);
  CHECK_EQ_INT(st.kv_pages_used, 0);
  m3_engine_close(e);
}

/* Forced tokens through the text path: a stop string spanning token boundaries ends the output
 * right before it; a stop token id ends it without its text; cancellation frees the pages. */
static void test_stops_and_cancel(void) {
  m3_engine *e = open_engine(64, 0, 1);
  if (!e) return;
  const char *text = "hello world. STOP here and more";
  int32_t *ids = NULL;
  int n = 0;
  CHECK_OK(m3_tokenize(e, text, strlen(text), 1, &ids, &n));
  CHECK(n > 4);
  m3_sampling_params p;
  m3_sampling_params_init(&p);
  p.forced_tokens = ids;
  p.n_forced_tokens = n;
  const char *stop[] = {"zzz", "ld. ST"};
  p.stop = stop;
  p.n_stop = 2;
  collected c;
  memset(&c, 0, sizeof c);
  CHECK_OK(m3_submit(e, prompts[0], prompt_len[0], &p, collect, &c, NULL));
  drain(e);
  CHECK_EQ_INT(c.finish[0], M3_FINISH_STOP);
  CHECK_EQ_INT(c.text_len[0], strlen("hello wor"));
  CHECK(memcmp(c.text[0], "hello wor", 9) == 0);

  /* No stop string: the whole text comes out, then LENGTH after the last forced token. */
  p.n_stop = 0;
  memset(&c, 0, sizeof c);
  CHECK_OK(m3_submit(e, prompts[1], prompt_len[1], &p, collect, &c, NULL));
  drain(e);
  CHECK_EQ_INT(c.finish[0], M3_FINISH_LENGTH);
  CHECK_EQ_INT(c.n[0], n);
  CHECK_EQ_INT(c.text_len[0], strlen(text));
  CHECK(memcmp(c.text[0], text, strlen(text)) == 0);

  /* The third token is a stop id: two tokens of text, then STOP carrying the third. */
  p.stop_token_ids = &ids[2];
  p.n_stop_token_ids = 1;
  memset(&c, 0, sizeof c);
  CHECK_OK(m3_submit(e, prompts[1], prompt_len[1], &p, collect, &c, NULL));
  drain(e);
  CHECK_EQ_INT(c.finish[0], M3_FINISH_STOP);
  CHECK_EQ_INT(c.n[0], 3);
  char *two = NULL;
  size_t two_len = 0;
  CHECK_OK(m3_detokenize(e, ids, 2, 1, &two, &two_len));
  CHECK(two && c.text_len[0] == two_len && memcmp(c.text[0], two, two_len) == 0);
  free(two);
  free(ids);

  /* Cancel mid-flight: one CANCELLED event per sample, all pages back. */
  m3_sampling_params q;
  params_for(2, 1, &q);
  q.n = 2;
  q.max_tokens = 0;
  uint64_t id = 0;
  memset(&c, 0, sizeof c);
  CHECK_OK(m3_submit(e, prompts[2], prompt_len[2], &q, collect, &c, &id));
  int active;
  for (int i = 0; i < 6; i++) CHECK_OK(m3_engine_step(e, &active));
  CHECK_EQ_INT(active, 1);
  m3_cancel(e, id);
  m3_cancel(e, id + 100); /* unknown: ignored */
  CHECK_OK(m3_engine_step(e, &active));
  CHECK_EQ_INT(active, 0);
  CHECK_EQ_INT(c.finish[0], M3_FINISH_CANCELLED);
  CHECK_EQ_INT(c.finish[1], M3_FINISH_CANCELLED);
  m3_engine_stats st;
  m3_engine_stats_get(e, &st);
  CHECK_EQ_INT(st.kv_pages_used, 0);

  /* Bad input never reaches a callback. */
  int32_t bad = 1 << 30;
  CHECK_FAILS_WITH(m3_submit(e, &bad, 1, NULL, collect, &c, NULL), M3_ERR_ARG, "vocabulary");
  q.top_p = 0.0f;
  CHECK_FAILS_WITH(m3_submit(e, prompts[0], 3, &q, collect, &c, NULL), M3_ERR_ARG, "top_p");
  m3_engine_close(e);
}

/* The batched forward itself: three ragged sequences in one call give each sequence's logits
 * and MSA selections as three separate calls do. Prefill rows run through the same GEMM path
 * either way (bit-identical); a decode step batched (T = 3) vs alone (T = 1: the GEMV path) is
 * compared with a tolerance. */
static void test_model_batch(void) {
  char dir[4096];
  CHECK_OK(m3_builtin_model_dir(dir, sizeof dir));
  m3_backend *be = NULL;
  CHECK_OK(m3_backend_cpu_create(2, &be));
  m3_model *m = NULL;
  CHECK_OK(m3_model_load(dir, be, &m));
  if (!m) return;
  const m3_config *cfg = m3_model_config(m);
  const int V = cfg->vocab_size, L = cfg->num_layers, S = m3_model_num_sparse_layers(m);
  make_prompts(V);
  const int sel_row = cfg->index_num_heads * cfg->index_topk_blocks;
  enum { NS = 3 };
  const int T[NS] = {41, 13, 27};
  m3_kv_cache *cache = NULL;
  CHECK_OK(m3_kv_cache_create(cfg, be, M3_KV_F32,
                              2 * NS * m3_kv_bytes_for_tokens(cfg, M3_KV_F32, 48), &cache));
  m3_kv_seq seqs[2][NS];
  m3_kv_view *views = calloc((size_t)2 * NS * L, sizeof *views);
  float *logits[2];
  int32_t *sel[2], pos[NS][48];
  size_t total = 0;
  for (int i = 0; i < NS; i++) total += (size_t)T[i];
  for (int k = 0; k < 2; k++) {
    logits[k] = calloc(total * (size_t)V, sizeof(float));
    sel[k] = calloc((size_t)S * total * (size_t)sel_row + 1, sizeof(int32_t));
  }
  for (int i = 0; i < NS; i++)
    for (int t = 0; t < T[i]; t++) pos[i][t] = t;
  m3_model_seq batch[NS];
  m3_selection_capture caps[2][NS];
  for (int k = 0; k < 2; k++) {
    size_t row = 0;
    for (int i = 0; i < NS; i++) {
      m3_kv_seq_init(&seqs[k][i]);
      CHECK_OK(m3_kv_seq_extend(cache, &seqs[k][i], T[i]));
      m3_kv_seq_views(cache, &seqs[k][i], &views[(k * NS + i) * L]);
      /* Each sequence's selections in its own region: [S, T_i, G, K] at row offset. */
      caps[k][i] = (m3_selection_capture){sel[k] + (size_t)S * row * sel_row, T[i], 0};
      batch[i] = (m3_model_seq){.kv = &views[(k * NS + i) * L], .ids = prompts[i], .pos = pos[i],
                                .T = T[i], .n_logits = T[i], .capture = &caps[k][i]};
      if (k == 0) CHECK_OK(m3_model_forward_batch(m, &batch[i], 1, logits[0] + row * V));
      row += (size_t)T[i];
    }
    if (k == 1) CHECK_OK(m3_model_forward_batch(m, batch, NS, logits[1]));
  }
  /* Bit-identical except where a matmul's row count crosses 1 (an expert that gets one token
   * alone but several in the batch takes the GEMV path in one and the GEMM path in the other). */
  double prefill_diff = 0;
  size_t identical = 0;
  for (size_t j = 0; j < total * (size_t)V; j++) {
    double d = fabs((double)logits[0][j] - logits[1][j]);
    identical += d == 0;
    if (!(d <= prefill_diff)) prefill_diff = d;
  }
  printf("prefill batched vs alone: max |logit diff| %.3g, %.4f%% of logits bit-identical\n",
         prefill_diff, 100.0 * (double)identical / (double)(total * (size_t)V));
  CHECK(prefill_diff < 1e-3);
  CHECK(memcmp(sel[0], sel[1], (size_t)S * total * sel_row * sizeof(int32_t)) == 0);
  /* Real selection: the last token of the 41-token sequence sees 11 blocks and keeps topk. */
  const int32_t *last = sel[0] + (size_t)(T[0] - 1) * sel_row;
  CHECK_EQ_INT(last[cfg->index_topk_blocks - 1], (T[0] - 1) / cfg->index_block_size);

  /* One decode token per sequence: alone (T = 1 each) vs batched (one step of 3 rows). */
  int32_t next[NS], npos[NS];
  for (int k = 0; k < 2; k++)
    for (int i = 0; i < NS; i++) {
      next[i] = prompts[i][0];
      npos[i] = T[i];
      CHECK_OK(m3_kv_seq_extend(cache, &seqs[k][i], 1));
      m3_kv_seq_views(cache, &seqs[k][i], &views[(k * NS + i) * L]);
    }
  for (int i = 0; i < NS; i++) {
    batch[i] = (m3_model_seq){.kv = &views[i * L], .ids = &next[i], .pos = &npos[i], .T = 1,
                              .n_logits = 1};
    CHECK_OK(m3_model_forward_batch(m, &batch[i], 1, logits[0] + (size_t)i * V));
    batch[i].kv = &views[(NS + i) * L];
  }
  CHECK_OK(m3_model_forward_batch(m, batch, NS, logits[1]));
  double worst = 0;
  int argmax_diff = 0;
  for (int i = 0; i < NS; i++) {
    const float *a = logits[0] + (size_t)i * V, *b = logits[1] + (size_t)i * V;
    int aa = 0, ab = 0;
    for (int v = 0; v < V; v++) {
      double d = fabs((double)a[v] - b[v]);
      if (!(d <= worst)) worst = d;
      if (a[v] > a[aa]) aa = v;
      if (b[v] > b[ab]) ab = v;
    }
    argmax_diff += aa != ab;
  }
  printf("decode batched vs alone: max |logit diff| %.3g, argmax mismatches %d\n", worst,
         argmax_diff);
  CHECK(worst < 1e-3);
  CHECK_EQ_INT(argmax_diff, 0);
  for (int k = 0; k < 2; k++) {
    for (int i = 0; i < NS; i++) m3_kv_seq_release(cache, &seqs[k][i]);
    free(logits[k]);
    free(sel[k]);
  }
  CHECK_EQ_INT(m3_kv_cache_free_pages(cache), m3_kv_cache_num_pages(cache));
  free(views);
  m3_kv_cache_free(cache);
  m3_model_free(m);
  be->ops->destroy(be);
}

int main(void) {
  setenv("M3_CACHE", "m3_cache", 1); /* the built-in model goes under the test's folder */
  test_batching();
  test_preemption();
  test_n_samples();
  test_stops_and_cancel();
  test_model_batch();
  return check_summary();
}
