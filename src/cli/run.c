/* m3 run: generate from a prompt (token ids, or text through the model's tokenizer.json) and
 * report prompt and generation speed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/commands.h"
#include "cli/model_args.h"
#include "engine/runner.h"
#include "engine/sampler.h"
#include "io/tiny.h"
#include "tok/tokenizer.h"

static const char usage[] =
    "usage: m3 run [--model DIR] (--ids 1,2,3 | --prompt TEXT) [--max-tokens N]\n"
    "              [--temperature T] [--seed S] [--threads N]\n"
    "  generates up to N tokens (default 32; stops at the end-of-sequence id), greedy at\n"
    "  temperature 0 (default). Prints the generated ids (--ids) or text (--prompt, encoded\n"
    "  as is with DIR/tokenizer.json, no chat template), then prompt and generation speed on\n"
    "  stderr. Without --model it runs the built-in tiny model.\n";

typedef struct {
  const char *model, *ids, *prompt;
  long max_tokens, threads, seed;
  double temperature;
} run_args;

static m3_status parse_temperature(const char *value, double *out) {
  char *end;
  double t = strtod(value, &end);
  if (end == value || *end != '\0' || !(t >= 0.0 && t <= 100.0))
    return m3_fail(M3_ERR_ARG, "--temperature '%s': expected a number in 0..100", value);
  *out = t;
  return M3_OK;
}

static m3_status parse_args(int argc, char **argv, run_args *a, int *help) {
  *a = (run_args){.max_tokens = 32, .seed = 1};
  *help = 0;
  for (int i = 1; i < argc; i++) {
    const char *flag = argv[i];
    if (strcmp(flag, "--help") == 0 || strcmp(flag, "-h") == 0) {
      *help = 1;
      return M3_OK;
    }
    if (i + 1 >= argc) return m3_fail(M3_ERR_ARG, "%s: missing value (see --help)", flag);
    const char *value = argv[++i];
    m3_status st = M3_OK;
    if (strcmp(flag, "--model") == 0) a->model = value;
    else if (strcmp(flag, "--ids") == 0) a->ids = value;
    else if (strcmp(flag, "--prompt") == 0) a->prompt = value;
    else if (strcmp(flag, "--max-tokens") == 0) st = m3_cli_parse_long(flag, value, 0, 1L << 24, &a->max_tokens);
    else if (strcmp(flag, "--threads") == 0) st = m3_cli_parse_long(flag, value, 0, 4096, &a->threads);
    else if (strcmp(flag, "--seed") == 0) st = m3_cli_parse_long(flag, value, 0, 0x7fffffffL, &a->seed);
    else if (strcmp(flag, "--temperature") == 0) st = parse_temperature(value, &a->temperature);
    else return m3_fail(M3_ERR_ARG, "unknown option '%s' (see --help)", flag);
    if (st != M3_OK) return st;
  }
  if (!a->ids == !a->prompt) return m3_fail(M3_ERR_ARG, "give exactly one of --ids and --prompt");
  return M3_OK;
}

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ids of the prompt text under DIR/tokenizer.json; the tokenizer stays open for the output. */
static m3_status encode_prompt(const char *dir, const char *prompt, m3_tokenizer **tok,
                               int32_t **ids, int *n) {
  char path[4096];
  if ((size_t)snprintf(path, sizeof path, "%s/tokenizer.json", dir) >= sizeof path)
    return m3_fail(M3_ERR_ARG, "model folder path too long: %s", dir);
  m3_status st = m3_tok_load(path, tok);
  if (st != M3_OK) return st;
  m3_tok_ids out = {0};
  if ((st = m3_tok_encode(*tok, prompt, strlen(prompt), &out)) != M3_OK) {
    m3_tok_ids_free(&out);
    return st;
  }
  if (out.len == 0) {
    m3_tok_ids_free(&out);
    return m3_fail(M3_ERR_ARG, "--prompt: the text encodes to no tokens");
  }
  *ids = out.data;
  *n = (int)out.len;
  return M3_OK;
}

/* Writes each generated token as it arrives: text through the streaming decoder when there is
 * a tokenizer, else comma-separated ids. */
typedef struct {
  m3_detok_stream *detok; /* NULL: print ids */
  int count;
} token_printer;

static m3_status print_token(token_printer *p, int32_t id) {
  m3_status st = M3_OK;
  if (p->detok) {
    const char *text;
    size_t len;
    if ((st = m3_detok_stream_push(p->detok, id, &text, &len)) == M3_OK) fwrite(text, 1, len, stdout);
  } else {
    printf("%s%d", p->count ? "," : "", id);
  }
  p->count++;
  fflush(stdout);
  return st;
}

static m3_status print_end(token_printer *p) {
  m3_status st = M3_OK;
  if (p->detok) {
    const char *text;
    size_t len;
    if ((st = m3_detok_stream_finish(p->detok, &text, &len)) == M3_OK) fwrite(text, 1, len, stdout);
  }
  printf("\n");
  fflush(stdout);
  return st;
}

/* Prefill all but the last prompt token without the head, then the last one with it: the
 * logits that pick the first generated token. */
static m3_status prefill(m3_runner *r, m3_kv_seq *seq, const int32_t *ids, int n, float *logits) {
  m3_status st = m3_runner_feed(r, seq, ids, n - 1, 0, NULL, NULL);
  if (st != M3_OK) return st;
  return m3_runner_feed(r, seq, ids + n - 1, 1, 1, logits, NULL);
}

int m3_cmd_run(int argc, char **argv) {
  run_args a;
  int help;
  m3_status st = parse_args(argc, argv, &a, &help);
  if (st != M3_OK) return m3_cli_fail("run", st);
  if (help) {
    fputs(usage, stdout);
    return 0;
  }

  char builtin[4096];
  int32_t *ids = NULL;
  float *logits = NULL;
  int n = 0;
  m3_backend *be = NULL;
  m3_model *model = NULL;
  m3_runner *runner = NULL;
  m3_tokenizer *tok = NULL;
  m3_detok_stream detok;
  token_printer printer = {NULL, 0};
  m3_kv_seq seq;
  m3_kv_seq_init(&seq);
  if (!a.model) {
    if ((st = m3_builtin_model_dir(builtin, sizeof builtin)) != M3_OK) goto done;
    a.model = builtin;
  }
  if (a.prompt) {
    if ((st = encode_prompt(a.model, a.prompt, &tok, &ids, &n)) != M3_OK) goto done;
    m3_detok_stream_init(&detok, tok, true);
    printer.detok = &detok;
  } else if ((st = m3_cli_parse_ids(a.ids, &ids, &n)) != M3_OK) {
    goto done;
  }
  if ((st = m3_cli_open_backend("cpu", (int)a.threads, &be)) != M3_OK) goto done;
  if ((st = m3_model_load(a.model, be, &model)) != M3_OK) goto done;
  const m3_config *cfg = m3_model_config(model);
  if ((st = m3_cli_check_ids(ids, n, cfg->vocab_size)) != M3_OK) goto done;
  const size_t budget = m3_kv_bytes_for_tokens(cfg, n + (int)a.max_tokens);
  if ((st = m3_runner_create(model, budget, &runner)) != M3_OK) goto done;
  logits = malloc((size_t)cfg->vocab_size * sizeof *logits);
  if (!logits) {
    st = m3_fail(M3_ERR_NOMEM, "cannot allocate the logits row");
    goto done;
  }

  double t0 = now_seconds();
  if ((st = prefill(runner, &seq, ids, n, logits)) != M3_OK) goto done;
  double t1 = now_seconds();

  m3_sampler sampler;
  m3_sampler_init(&sampler, (float)a.temperature, (uint64_t)a.seed);
  int generated = 0, decoded = 0;
  while (generated < a.max_tokens) {
    int32_t next = m3_sampler_sample(&sampler, logits, cfg->vocab_size);
    if ((st = print_token(&printer, next)) != M3_OK) goto done;
    generated++;
    if (next == cfg->eos_token_id || generated == a.max_tokens) break;
    if ((st = m3_runner_feed(runner, &seq, &next, 1, 1, logits, NULL)) != M3_OK) goto done;
    decoded++;
  }
  double t2 = now_seconds();
  if ((st = print_end(&printer)) != M3_OK) goto done;
  fprintf(stderr, "prompt: %d tokens in %.3f s (%.2f tokens/s); generation: %d tokens in %.3f s "
          "(%.2f tokens/s)\n", n, t1 - t0, n / (t1 - t0), decoded, t2 - t1,
          decoded ? decoded / (t2 - t1) : 0.0);

done:
  if (runner) m3_kv_seq_release(m3_runner_cache(runner), &seq);
  m3_runner_free(runner);
  m3_model_free(model);
  if (be) be->ops->destroy(be);
  if (printer.detok) m3_detok_stream_free(printer.detok);
  m3_tok_free(tok);
  free(ids);
  free(logits);
  return st == M3_OK ? 0 : m3_cli_fail("run", st);
}
