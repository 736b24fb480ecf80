/* m3 bench <what> [options]: one entry point for the benchmarks, each in its own file (bench.h).
 * Benchmarks print figures; none is a pass/fail test. */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "cli/bench.h"
#include "cli/commands.h"

typedef struct {
  const char *name;
  int (*run)(int argc, char **argv);
  const char *summary;
} bench_part;

static const bench_part parts[] = {
    {"ops", m3_bench_ops, "CPU kernels: copy bandwidth, GEMV GB/s and GEMM GFLOP/s per dtype"},
    {"model", m3_bench_model, "whole model: decode tokens/s and GB/s against copy, prefill"},
    {"engine", m3_bench_engine, "batched serving: throughput, latency, prefix cache"},
    {"tok", m3_bench_tok, "single-thread tokenizer speed on a file"},
    {"spec", m3_bench_spec, "speculative decoding: verify k drafts, drafter steps"},
    {"accept", m3_bench_accept, "speculative decoding: acceptance on real text, greedy identity"},
    {"serve", NULL, "the HTTP server under load: how to run bench/serve_bench.mjs"},
};

double m3_bench_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void bench_usage(FILE *f) {
  fprintf(f, "usage: m3 bench <what> [options]\n\n");
  for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
    fprintf(f, "  %-8s %s\n", parts[i].name, parts[i].summary);
  fprintf(f, "\n`m3 bench <what> --help` describes its options.\n");
}

/* The server load generator is a Node script: it must run beside a server, not inside m3. */
static void serve_howto(void) {
  printf("m3 bench serve: run the server, then the load generator beside it:\n"
         "  m3 serve --model DIR --port 8000 &\n"
         "  node bench/serve_bench.mjs --url http://127.0.0.1:8000 [--num-prompts 64]\n"
         "       [--max-concurrency 8] [--request-rate inf] [--input-len 128] [--output-len 64]\n"
         "       [--endpoint completions|chat]\n"
         "It prints request and token throughput, TTFT, TPOT and ITL (mean, median, p99).\n");
}

int m3_cmd_bench(int argc, char **argv) {
  if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
    bench_usage(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
    if (strcmp(argv[1], parts[i].name) != 0) continue;
    if (!parts[i].run) {
      serve_howto();
      return 0;
    }
    /* The part names itself "bench <what>" in its messages. */
    static char name[32];
    snprintf(name, sizeof name, "bench %s", parts[i].name);
    argv[1] = name;
    return parts[i].run(argc - 1, argv + 1);
  }
  fprintf(stderr, "m3 bench: unknown benchmark '%s'\n", argv[1]);
  bench_usage(stderr);
  return 2;
}
