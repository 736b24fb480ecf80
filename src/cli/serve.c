/* m3 serve: the OpenAI- and Anthropic-compatible HTTP server (src/server) over one engine.
 *
 * SIGTERM or SIGINT: stop accepting, let requests in flight finish for --grace seconds, cancel
 * the rest, exit 0. */
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/commands.h"
#include "cli/model_args.h"
#include "m3.h"
#include "server/server.h"

static const char usage[] =
    "usage: m3 serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--api-key K]\n"
    "                [--max-body BYTES] [--max-tokens-limit N] [--max-n N]\n"
    "                [--max-concurrent N] [--served-model-name NAME] [--device cpu|cuda[:N]]\n"
    "                [--threads N]\n"
    "                [--kv-memory MIB] [--max-running N] [--no-prefix-cache] [--grace SECONDS]\n"
    "                [--max-image-pixels N] [--max-media-per-request N]\n"
    "                [--allow-remote-media] [--remote-media-timeout-ms MS]\n"
    "                [--test-hooks] " M3_CLI_SPEC_USAGE "\n"
    "  serves /v1/chat/completions, /v1/completions, /v1/messages, /v1/models, /tokenize,\n"
    "  /detokenize, /health and /metrics. Binds 127.0.0.1 unless --host says otherwise;\n"
    "  --port 0 picks a free port. Prints \"listening on http://HOST:PORT\" once ready.\n"
    "  --api-key K        require K as \"Authorization: Bearer K\" or \"x-api-key: K\"\n"
    "  --max-body BYTES   larger request bodies get 413 (default 33554432)\n"
    "  --max-tokens-limit N, --max-n N, --max-concurrent N: larger max_tokens or n get 400,\n"
    "                     more generation requests in flight get 429 (defaults 1048576, 16, 1024)\n"
    "  --max-image-pixels N, --max-media-per-request N: chat images (base64 data: URLs,\n"
    "                     Anthropic base64 sources) larger than N decoded pixels, or more than N\n"
    "                     in a request, get 400 (defaults 12845056, 16)\n"
    "  --allow-remote-media  fetch http(s) image URLs (OpenAI image_url, Anthropic url sources;\n"
    "                     refused with 400 by default): up to 3 redirects, --max-body bytes\n"
    "                     for all images of a request, 4 downloads at once. The server then\n"
    "                     requests any URL a client names, internal addresses included\n"
    "  --remote-media-timeout-ms MS  time allowed for one image download (default 10000)\n"
    "  --grace SECONDS    on SIGTERM, how long requests in flight may finish (default 30)\n"
    "  --test-hooks       honour the request field m3_test_forced_text (tests only)\n"
    "  Without --model it serves " M3_CLI_DEFAULT_MODEL ".\n" M3_CLI_DEFAULT_DRAFT_HELP
    M3_CLI_NODES_HELP;

typedef struct {
  m3_cli_model_paths paths;
  m3_server_options server;
  m3_engine_options engine;
  m3_cli_spec spec;
  long grace_s;
  bool allow_remote_media;
  long remote_media_timeout_ms;
} serve_args;

static m3_status parse_args(int argc, char **argv, serve_args *a, int *help) {
  m3_server_options_init(&a->server);
  m3_engine_options_init(&a->engine);
  a->spec = (m3_cli_spec){0};
  a->grace_s = 30;
  a->allow_remote_media = false;
  a->remote_media_timeout_ms = 10000;
  *help = 0;
  for (int i = 1; i < argc; i++) {
    const char *flag = argv[i];
    if (strcmp(flag, "--help") == 0 || strcmp(flag, "-h") == 0) {
      *help = 1;
      return M3_OK;
    }
    if (strcmp(flag, "--test-hooks") == 0) {
      a->server.test_hooks = 1;
      continue;
    }
    if (strcmp(flag, "--no-prefix-cache") == 0) {
      a->engine.prefix_cache = 0;
      continue;
    }
    if (strcmp(flag, "--allow-remote-media") == 0) {
      a->allow_remote_media = true;
      continue;
    }
    if (i + 1 >= argc) return m3_fail(M3_ERR_ARG, "%s: missing value (see --help)", flag);
    const char *value = argv[++i];
    long v = 0;
    m3_status st = M3_OK;
    if (strcmp(flag, "--model") == 0) a->engine.model_dir = value;
    else if (strcmp(flag, "--host") == 0) a->server.host = value;
    else if (strcmp(flag, "--api-key") == 0) a->server.api_key = value;
    else if (strcmp(flag, "--served-model-name") == 0) a->server.served_model_name = value;
    else if (strcmp(flag, "--port") == 0 && (st = m3_cli_parse_long(flag, value, 0, 65535, &v)) == M3_OK)
      a->server.port = (int)v;
    else if (strcmp(flag, "--max-body") == 0 && (st = m3_cli_parse_long(flag, value, 1, 1L << 40, &v)) == M3_OK)
      a->server.max_body = (size_t)v;
    else if (strcmp(flag, "--max-tokens-limit") == 0 && (st = m3_cli_parse_long(flag, value, 1, 1L << 30, &v)) == M3_OK)
      a->server.max_tokens_limit = (int)v;
    else if (strcmp(flag, "--max-n") == 0 && (st = m3_cli_parse_long(flag, value, 1, 1024, &v)) == M3_OK)
      a->server.max_n = (int)v;
    else if (strcmp(flag, "--max-concurrent") == 0 && (st = m3_cli_parse_long(flag, value, 1, 100000, &v)) == M3_OK)
      a->server.max_concurrent = (int)v;
    else if (strcmp(flag, "--max-image-pixels") == 0 && (st = m3_cli_parse_long(flag, value, 1, 1L << 40, &v)) == M3_OK)
      a->server.max_image_pixels = v;
    else if (strcmp(flag, "--max-media-per-request") == 0 && (st = m3_cli_parse_long(flag, value, 0, 4096, &v)) == M3_OK)
      a->server.max_media_per_request = (int)v;
    else if (strcmp(flag, "--threads") == 0 && (st = m3_cli_parse_long(flag, value, 0, 4096, &v)) == M3_OK)
      a->engine.threads = (int)v;
    else if (strcmp(flag, "--device") == 0)
      a->engine.device = value;
    else if (strcmp(flag, "--kv-memory") == 0 && (st = m3_cli_parse_long(flag, value, 1, 1L << 30, &v)) == M3_OK)
      a->engine.kv_memory_bytes = (size_t)v << 20;
    else if (strcmp(flag, "--max-running") == 0 && (st = m3_cli_parse_long(flag, value, 1, 1 << 20, &v)) == M3_OK)
      a->engine.max_running = (int)v;
    else if (strcmp(flag, "--grace") == 0 && (st = m3_cli_parse_long(flag, value, 0, 86400, &v)) == M3_OK)
      a->grace_s = v;
    else if (strcmp(flag, "--remote-media-timeout-ms") == 0 && (st = m3_cli_parse_long(flag, value, 1, 600000, &v)) == M3_OK)
      a->remote_media_timeout_ms = v;
    else if (st == M3_OK && !m3_cli_spec_flag(flag, value, &a->spec, &st))
      return m3_fail(M3_ERR_ARG, "unknown option '%s' (see --help)", flag);
    if (st != M3_OK) return st;
  }
  m3_status st = m3_cli_model_or_default(&a->engine.model_dir, &a->spec, &a->paths);
  if (st != M3_OK || (st = m3_cli_parallel_gate(&a->spec, a->engine.model_dir)) != M3_OK)
    return st;
  m3_cli_spec_apply(&a->spec, &a->engine);
  a->server.remote_media_timeout_ms = a->allow_remote_media ? (int)a->remote_media_timeout_ms : 0;
  return M3_OK;
}

int m3_cmd_serve(int argc, char **argv) {
  serve_args a;
  int help;
  m3_status st = parse_args(argc, argv, &a, &help);
  if (st != M3_OK) return m3_cli_fail("serve", st);
  if (help) {
    fputs(usage, stdout);
    return 0;
  }
  /* A node that follows node 0 serves no HTTP: node 0's server hands it the steps. */
  if (a.spec.node_rank > 0) return m3_cli_follow("serve", &a.engine);
  /* Blocked before any thread starts, so every thread inherits the mask and only sigwait below
   * sees them; SIGPIPE from a vanished client must not kill the server. */
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, NULL);
  signal(SIGPIPE, SIG_IGN);

  m3_engine *engine = NULL;
  m3_server *server = NULL;
  if ((st = m3_engine_open(&a.engine, &engine)) != M3_OK) return m3_cli_fail("serve", st);
  if ((st = m3_engine_start(engine)) != M3_OK ||
      (st = m3_server_start(engine, &a.server, &server)) != M3_OK) {
    m3_engine_close(engine);
    return m3_cli_fail("serve", st);
  }
  m3_model_info info;
  m3_engine_model_info(engine, &info);
  printf("m3 serve: model %s, context %d tokens, %d KV pages of %d tokens (%s)\n", info.name,
         info.max_context, info.kv_pages_total, info.kv_page_tokens, info.kv_dtype);
  bool v6 = strchr(a.server.host, ':') != NULL; /* an IPv6 literal goes in brackets in a URL */
  printf("listening on http://%s%s%s:%d\n", v6 ? "[" : "", a.server.host, v6 ? "]" : "",
         m3_server_port(server));
  fflush(stdout);

  int sig = 0;
  sigwait(&stop, &sig);
  fprintf(stderr, "m3 serve: %s, draining for up to %ld s\n", sig == SIGTERM ? "SIGTERM" : "SIGINT",
          a.grace_s);
  int left = m3_server_drain(server, (int)(a.grace_s * 1000));
  if (left > 0) fprintf(stderr, "m3 serve: cancelling %d requests still running\n", left);
  m3_engine_stop(engine, 0);
  /* The cancelled requests still write their last bytes (a final chunk, or a 503). */
  m3_server_drain(server, 2000);
  m3_server_free(server);
  m3_engine_close(engine);
  return 0;
}
