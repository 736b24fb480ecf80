/* A property test: 10,000 random events (submit with random prompts sharing prefixes, n samples
 * and limits; cancel of live, finished or unknown ids; engine steps) on a KV cache small enough
 * to force preemption. Afterwards every sample of every request has finished exactly once, and
 * every page is free (cached pages count as free: they are evictable). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "engine/kvcache.h"
#include "io/tiny.h"
#include "m3.h"

enum { EVENTS = 10000, MAX_REQ = 4000 };

typedef struct {
  int n, finishes, tokens_after_finish, bad_sample;
  int finished[3];
} tracked;

static tracked reqs[MAX_REQ];

static void on_event(const m3_token_event *ev, void *user) {
  tracked *t = user;
  if (ev->sample < 0 || ev->sample >= t->n) {
    t->bad_sample++;
    return;
  }
  if (t->finished[ev->sample]) t->tokens_after_finish++;
  if (ev->finish != M3_FINISH_NONE) {
    t->finished[ev->sample] = 1;
    t->finishes++;
  }
}

static uint64_t rng = 99;
static int rnd(int n) {
  rng = rng * 6364136223846793005ull + 1442695040888963407ull;
  return (int)((rng >> 33) % (uint64_t)n);
}

static size_t tiny_page_bytes(void) {
  char dir[4096], path[4200];
  CHECK_OK(m3_builtin_model_dir(dir, sizeof dir));
  snprintf(path, sizeof path, "%s/config.json", dir);
  m3_config cfg;
  if (m3_config_load(path, &cfg) != M3_OK) return 0;
  size_t bytes = m3_kv_page_bytes(&cfg, M3_KV_F32);
  m3_config_free(&cfg);
  return bytes;
}

int main(void) {
  setenv("M3_CACHE", "m3_cache", 1);
  m3_engine_options o;
  m3_engine_options_init(&o);
  o.threads = 1; /* tiny matrices: one thread is faster than two that synchronise */
  o.max_running = 16;
  o.max_batch_tokens = 16;
  o.kv_memory_bytes = 1;
  m3_engine *e = NULL;
  CHECK_FAILS_WITH(m3_engine_open(&o, &e), M3_ERR_LIMIT, "below one page");
  o.kv_memory_bytes = 16 * tiny_page_bytes(); /* 16 pages of 4 tokens: forces preemption */
  CHECK_OK(m3_engine_open(&o, &e));
  if (!e) return check_summary();
  m3_model_info info;
  m3_engine_model_info(e, &info);
  CHECK_EQ_INT(info.kv_pages_total, 16);

  const int32_t base[8] = {300, 301, 302, 303, 304, 305, 306, 307};
  int n_req = 0, steps = 0, rejected = 0;
  uint64_t ids[MAX_REQ];
  for (int ev = 0; ev < EVENTS; ev++) {
    int kind = rnd(10);
    if (kind < 2 && n_req < MAX_REQ) {
      int32_t prompt[40];
      int len = 1 + rnd(20);
      for (int i = 0; i < len; i++) prompt[i] = i < 8 && rnd(4) ? base[i] : 256 + rnd(200);
      m3_sampling_params p;
      m3_sampling_params_init(&p);
      p.temperature = rnd(2) ? 0.0f : 0.8f;
      p.max_tokens = 1 + rnd(4);
      p.n = 1 + rnd(3);
      p.seed = (uint64_t)ev;
      p.has_seed = rnd(2);
      int32_t stop_id = 256 + rnd(200);
      if (rnd(4) == 0) {
        p.stop_token_ids = &stop_id;
        p.n_stop_token_ids = 1;
      }
      tracked *t = &reqs[n_req];
      t->n = p.n;
      if (m3_submit(e, prompt, len, &p, on_event, t, &ids[n_req]) == M3_OK) n_req++;
      else rejected++;
    } else if (kind < 5 && n_req > 0) {
      m3_cancel(e, rnd(5) ? ids[rnd(n_req)] : 1000000 + (uint64_t)ev);
    } else {
      int active;
      CHECK_OK(m3_engine_step(e, &active));
      steps++;
    }
  }
  int active = 1;
  for (int guard = 0; active && guard < 100000; guard++) CHECK_OK(m3_engine_step(e, &active));
  CHECK_EQ_INT(active, 0);
  int bad = 0;
  for (int r = 0; r < n_req; r++)
    bad += reqs[r].finishes != reqs[r].n || reqs[r].tokens_after_finish || reqs[r].bad_sample;
  m3_engine_stats st;
  m3_engine_stats_get(e, &st);
  printf("%d requests, %d rejected, %d steps, %llu preemptions, prefix hits %llu of %llu "
         "tokens; requests with a wrong event count: %d; pages used %d of %d\n", n_req,
         rejected, steps, (unsigned long long)st.preemptions,
         (unsigned long long)st.prefix_cache_hit_tokens,
         (unsigned long long)st.prefix_cache_query_tokens, bad, st.kv_pages_used,
         st.kv_pages_used + st.kv_pages_free);
  CHECK_EQ_INT(bad, 0);
  CHECK_EQ_INT(rejected, 0);
  CHECK(st.preemptions > 0);
  CHECK_EQ_INT(st.kv_pages_used, 0);
  CHECK_EQ_INT(st.kv_pages_free, 16);
  CHECK_EQ_INT(st.running + st.waiting, 0);
  m3_engine_close(e);
  return check_summary();
}
