/* The engine's loop thread (m3_engine_start) against several client threads that submit
 * one-token requests, cancel some and read the stats, all at once: every request finishes exactly
 * once, its events carry the id m3_submit returned, and every page is free afterwards.
 * Under ThreadSanitizer (scripts/test.sh --tsan) this is the regression test for m3_submit
 * reading its request after handing it to the loop thread, which may already have freed it. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "m3.h"

enum { CLIENTS = 3, PER_CLIENT = 100 };

typedef struct {
  uint64_t id;          /* what m3_submit returned */
  uint64_t event_id;    /* what its events carried */
  int finishes, wrong_ids;
} tracked;

static tracked reqs[CLIENTS][PER_CLIENT];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static m3_engine *engine;

static void on_event(const m3_token_event *ev, void *user) {
  tracked *t = user;
  pthread_mutex_lock(&mu);
  if (t->event_id && t->event_id != ev->request_id) t->wrong_ids++;
  t->event_id = ev->request_id;
  if (ev->finish != M3_FINISH_NONE) t->finishes++;
  pthread_mutex_unlock(&mu);
}

/* Returns the number of failed submits. */
static void *client(void *arg) {
  const int c = (int)(intptr_t)arg;
  intptr_t failures = 0;
  for (int i = 0; i < PER_CLIENT; i++) {
    const int32_t prompt[3] = {300 + c, 301 + i % 50, 302};
    m3_sampling_params p;
    m3_sampling_params_init(&p);
    p.temperature = 0.0f;
    p.max_tokens = 1 + i % 2;
    uint64_t id = 0;
    failures += m3_submit(engine, prompt, 3, &p, on_event, &reqs[c][i], &id) != M3_OK;
    reqs[c][i].id = id; /* the callback never reads it */
    /* No lock meets the loop thread meanwhile, so whatever m3_submit touched after its hand-over
     * is unordered with the loop thread freeing the finished request: ThreadSanitizer sees it. */
    nanosleep(&(struct timespec){0, 5 * 1000000L}, NULL);
    if (i % 7 == 3) m3_cancel(engine, id);        /* live or already finished */
    if (i % 11 == 5) m3_cancel(engine, id + 1000); /* unknown */
    m3_engine_stats stats;
    m3_engine_stats_get(engine, &stats);
  }
  return (void *)failures;
}

int main(void) {
  setenv("M3_CACHE", "m3_cache", 1);
  m3_engine_options o;
  m3_engine_options_init(&o);
  o.threads = 1;
  o.max_running = 8;
  o.kv_memory_bytes = 1 << 20;
  CHECK_OK(m3_engine_open(&o, &engine));
  if (!engine) return check_summary();
  CHECK_OK(m3_engine_start(engine));
  pthread_t threads[CLIENTS];
  for (int c = 0; c < CLIENTS; c++)
    CHECK_EQ_INT(pthread_create(&threads[c], NULL, client, (void *)(intptr_t)c), 0);
  intptr_t submit_failures = 0;
  for (int c = 0; c < CLIENTS; c++) {
    void *failures = NULL;
    pthread_join(threads[c], &failures);
    submit_failures += (intptr_t)failures;
  }
  m3_engine_stop(engine, 60000); /* lets every request finish, then joins the loop thread */

  int bad_finish = 0, bad_id = 0;
  for (int c = 0; c < CLIENTS; c++)
    for (int i = 0; i < PER_CLIENT; i++) {
      const tracked *t = &reqs[c][i];
      bad_finish += t->finishes != 1;
      bad_id += t->id == 0 || t->event_id != t->id || t->wrong_ids;
    }
  m3_engine_stats st;
  m3_engine_stats_get(engine, &st);
  printf("%d requests from %d threads: %d submit failures, %d without exactly one finish, %d with "
         "a wrong id; pages used %d\n", CLIENTS * PER_CLIENT, CLIENTS, (int)submit_failures, bad_finish,
         bad_id, st.kv_pages_used);
  CHECK_EQ_INT((int)submit_failures, 0);
  CHECK_EQ_INT(bad_finish, 0);
  CHECK_EQ_INT(bad_id, 0);
  CHECK_EQ_INT((int)st.requests_total, CLIENTS * PER_CLIENT);
  CHECK_EQ_INT(st.kv_pages_used, 0);
  CHECK_EQ_INT(st.running + st.waiting, 0);
  m3_engine_close(engine);
  return check_summary();
}
