/* m3 bench engine: the serving core under load. For concurrency c in 1, 2, 4, ... 64, c
 * requests (random prompts, fixed lengths, greedy, end-of-turn ignored) are submitted at once and
 * run to completion; then a shared-prefix workload measures the prefix cache. Prints throughput,
 * per-request latency, hit rate and the scheduler's own time per step. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/bench.h"
#include "cli/commands.h"
#include "cli/model_args.h"
#include "m3.h"

static const char usage[] =
    "usage: m3 bench engine [--model DIR] [--threads N] [--prompt-tokens P] [--gen-tokens G]\n"
    "                       [--max-concurrency C] " M3_CLI_QUANTIZE_USAGE "\n"
    "  defaults: the built-in model, P = 64, G = 32, C = 64.\n";

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct {
  double submitted, first, done;
} timing;

static void on_token(const m3_token_event *ev, void *user) {
  timing *t = user;
  double now = now_seconds();
  if (ev->token >= 0 && t->first == 0) t->first = now;
  if (ev->finish != M3_FINISH_NONE) t->done = now;
}

static int by_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Submits c requests, steps until done; prompts share their first `shared` tokens. */
static m3_status run_load(m3_engine *e, int c, int P, int G, int shared, uint64_t salt,
                          timing *t, double *wall) {
  m3_model_info info;
  m3_engine_model_info(e, &info);
  int32_t *prompt = malloc((size_t)P * sizeof *prompt);
  if (!prompt) return m3_fail(M3_ERR_NOMEM, "bench: out of memory");
  m3_sampling_params p;
  m3_sampling_params_init(&p);
  p.temperature = 0.0f;
  p.max_tokens = G;
  p.ignore_eos = 1;
  uint64_t x = salt;
  double t0 = now_seconds();
  m3_status st = M3_OK;
  for (int r = 0; r < c && st == M3_OK; r++) {
    for (int i = 0; i < P; i++) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      prompt[i] = i < shared ? (int32_t)(7 + i) % info.vocab_size
                             : (int32_t)((x >> 33) % (uint64_t)info.vocab_size);
    }
    t[r] = (timing){.submitted = now_seconds()};
    st = m3_submit(e, prompt, P, &p, on_token, &t[r], NULL);
  }
  free(prompt);
  for (int active = 1; st == M3_OK && active;) st = m3_engine_step(e, &active);
  *wall = now_seconds() - t0;
  return st;
}

int m3_bench_engine(int argc, char **argv) {
  const char *model = NULL, *quantize = NULL;
  long threads = 0, P = 64, G = 32, C = 64;
  m3_status st = M3_OK;
  for (int i = 1; i < argc && st == M3_OK; i++) {
    if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      fputs(usage, stdout);
      return 0;
    }
    if (i + 1 >= argc) st = m3_fail(M3_ERR_ARG, "%s: missing value (see --help)", argv[i]);
    else if (strcmp(argv[i], "--model") == 0) model = argv[++i];
    else if (strcmp(argv[i], "--threads") == 0) st = m3_cli_parse_long(argv[i], argv[i + 1], 0, 4096, &threads), i++;
    else if (strcmp(argv[i], "--prompt-tokens") == 0) st = m3_cli_parse_long(argv[i], argv[i + 1], 1, 1 << 20, &P), i++;
    else if (strcmp(argv[i], "--gen-tokens") == 0) st = m3_cli_parse_long(argv[i], argv[i + 1], 1, 1 << 20, &G), i++;
    else if (strcmp(argv[i], "--quantize") == 0) st = m3_cli_parse_quantize(argv[++i], &quantize);
    else if (strcmp(argv[i], "--max-concurrency") == 0) st = m3_cli_parse_long(argv[i], argv[i + 1], 1, 4096, &C), i++;
    else st = m3_fail(M3_ERR_ARG, "unknown option '%s' (see --help)", argv[i]);
  }
  if (st != M3_OK) return m3_cli_fail("bench engine", st);

  m3_engine_options o;
  m3_engine_options_init(&o);
  o.model_dir = model;
  o.threads = (int)threads;
  o.max_running = (int)C;
  o.prefix_cache = 0;
  o.quantize = quantize;
  m3_engine *e = NULL;
  timing *t = calloc((size_t)C, sizeof *t);
  double *lat = calloc((size_t)C, sizeof *lat);
  if (!t || !lat) st = m3_fail(M3_ERR_NOMEM, "bench: out of memory");
  if (st == M3_OK) st = m3_engine_open(&o, &e);
  if (st == M3_OK) {
    printf("prompt %ld tokens, %ld generated per request, greedy\n", P, G);
    printf("%5s %12s %12s %10s %10s %10s %14s\n", "conc", "gen tok/s", "total tok/s",
           "ttft p50", "lat p50", "lat p95", "sched us/step");
  }
  for (long c = 1; st == M3_OK && c <= C; c *= 2) {
    m3_engine_stats before, after;
    m3_engine_stats_get(e, &before);
    double wall;
    if ((st = run_load(e, (int)c, (int)P, (int)G, 0, (uint64_t)c, t, &wall)) != M3_OK) break;
    m3_engine_stats_get(e, &after);
    double ttft[4096];
    for (long r = 0; r < c; r++) {
      lat[r] = t[r].done - t[r].submitted;
      ttft[r] = t[r].first - t[r].submitted;
    }
    qsort(lat, (size_t)c, sizeof *lat, by_double);
    qsort(ttft, (size_t)c, sizeof *ttft, by_double);
    double steps = (double)(after.steps - before.steps);
    double sched = after.schedule_seconds_total - before.schedule_seconds_total;
    printf("%5ld %12.1f %12.1f %9.1fms %9.1fms %9.1fms %14.1f\n", c, (double)(c * G) / wall,
           (double)(c * (P + G)) / wall, 1e3 * ttft[c / 2], 1e3 * lat[c / 2],
           1e3 * lat[(c * 95) / 100 < c ? (c * 95) / 100 : c - 1], 1e6 * sched / steps);
  }
  m3_engine_close(e);
  e = NULL;
  /* Shared prefix: 16 requests whose prompts share their first 3/4. */
  o.prefix_cache = 1;
  if (st == M3_OK) st = m3_engine_open(&o, &e);
  if (st == M3_OK) {
    double wall;
    int c = C < 16 ? (int)C : 16;
    st = run_load(e, c, (int)P, (int)G, (int)(3 * P / 4), 99, t, &wall);
    m3_engine_stats s;
    m3_engine_stats_get(e, &s);
    if (st == M3_OK)
      printf("shared prefix (%d requests, %ld of %ld prompt tokens shared): prefix cache hit "
             "%llu of %llu prompt tokens (%.1f%%), %.2f s\n", c, 3 * P / 4, P,
             (unsigned long long)s.prefix_cache_hit_tokens,
             (unsigned long long)s.prefix_cache_query_tokens,
             100.0 * (double)s.prefix_cache_hit_tokens / (double)s.prefix_cache_query_tokens, wall);
  }
  m3_engine_close(e);
  free(t);
  free(lat);
  return st == M3_OK ? 0 : m3_cli_fail("bench engine", st);
}
