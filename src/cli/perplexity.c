/* m3 perplexity: how well the model predicts a text, in independent chunks of --ctx tokens.
 *
 * ids = the text's tokens, nothing added (no BOS; added tokens spelled in the text match, as in
 * `m3 tokenize` and HF's encode(text, add_special_tokens=False)). Chunk k is ids[k*ctx, (k+1)*ctx)
 * (the last may be shorter; one of fewer than 2 tokens scores nothing and is dropped). Each chunk
 * starts from an empty KV cache, as a fresh sequence prefilled at once, and its position j
 * scores the next token: nll_j = -log_softmax(logits_j)[ids[j+1]] over the whole vocabulary,
 * summed in double over every chunk. Perplexity = exp(mean nll). --kv-dtype fp8 keeps the chunks'
 * cache in E4M3, so the figure shows what that cache costs. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/commands.h"
#include "cli/direct_model.h"
#include "cli/model_args.h"
#include "media/media.h"
#include "tok/tokenizer.h"

static const char usage[] =
    "usage: m3 perplexity [--model DIR] (--file F | --text S) [--ctx N] [--device cpu|cuda|cuda:N]\n"
    "                     [--threads N] " M3_CLI_KV_DTYPE_USAGE " [--json]\n"
    "  the model's perplexity on a text: its tokens (nothing added) cut into chunks of N\n"
    "  tokens (default 512), each run from an empty KV cache, every position scoring the next\n"
    "  token; prints exp(mean negative log-likelihood) over all scored tokens.\n"
    "  Without --model it uses " M3_CLI_DEFAULT_MODEL ".\n"
    "  --kv-dtype fp8  keep K, V and index keys as E4M3 (what the fp8 cache costs in accuracy)\n"
    "  --json  {\"tokens\": .., \"chunks\": .., \"mean_nll\": .., \"perplexity\": ..} instead of a line\n";

/* Texts larger than this are refused rather than read whole. */
#define MAX_TEXT_BYTES ((size_t)1 << 30)

typedef struct {
  const char *model, *file, *text, *device;
  long ctx, threads;
  int json;
  m3_kv_dtype kv_dtype;
} perplexity_args;

static m3_status parse_args(int argc, char **argv, perplexity_args *a, int *help) {
  *a = (perplexity_args){.device = "cpu", .ctx = 512};
  *help = 0;
  for (int i = 1; i < argc; i++) {
    const char *flag = argv[i];
    if (strcmp(flag, "--help") == 0 || strcmp(flag, "-h") == 0) {
      *help = 1;
      return M3_OK;
    }
    if (strcmp(flag, "--json") == 0) {
      a->json = 1;
      continue;
    }
    if (i + 1 >= argc) return m3_fail(M3_ERR_ARG, "%s: missing value (see --help)", flag);
    const char *value = argv[++i];
    m3_status st = M3_OK;
    if (strcmp(flag, "--model") == 0) a->model = value;
    else if (strcmp(flag, "--file") == 0) a->file = value;
    else if (strcmp(flag, "--text") == 0) a->text = value;
    else if (strcmp(flag, "--device") == 0) a->device = value;
    else if (strcmp(flag, "--ctx") == 0) st = m3_cli_parse_long(flag, value, 2, 1L << 24, &a->ctx);
    else if (strcmp(flag, "--threads") == 0) st = m3_cli_parse_long(flag, value, 0, 4096, &a->threads);
    else if (strcmp(flag, "--kv-dtype") == 0) st = m3_cli_parse_kv_dtype(value, &a->kv_dtype);
    else return m3_fail(M3_ERR_ARG, "unknown option '%s' (see --help)", flag);
    if (st != M3_OK) return st;
  }
  if (!a->file == !a->text) return m3_fail(M3_ERR_ARG, "give one of --file F and --text S (see --help)");
  return M3_OK;
}

/* The ids of the text of --text or --file through model_dir/tokenizer.json. */
static m3_status text_ids(const perplexity_args *a, m3_tok_ids *ids) {
  uint8_t *data = NULL;
  size_t len = a->text ? strlen(a->text) : 0;
  m3_status st = a->file ? m3_read_file(a->file, MAX_TEXT_BYTES, &data, &len) : M3_OK;
  if (st == M3_OK && len == 0)
    st = a->file ? m3_fail(M3_ERR_ARG, "--file %s: the file is empty", a->file)
                 : m3_fail(M3_ERR_ARG, "--text: the text is empty");
  char path[4200];
  m3_tokenizer *tok = NULL;
  if (st == M3_OK) {
    snprintf(path, sizeof path, "%s/tokenizer.json", a->model);
    st = m3_tok_load(path, &tok);
  }
  if (st == M3_OK) st = m3_tok_encode(tok, a->text ? a->text : (const char *)data, len, true, ids);
  if (st == M3_OK && ids->len < 2)
    st = m3_fail(M3_ERR_ARG, "%s: the text is %zu token(s); perplexity scores the tokens after "
                 "the first, so it needs at least 2", a->file ? a->file : "--text", ids->len);
  m3_tok_free(tok);
  free(data);
  return st;
}

/* -log_softmax(row[V])[target], in double. */
static double token_nll(const float *row, int V, int32_t target) {
  float max = row[0];
  for (int v = 1; v < V; v++) max = row[v] > max ? row[v] : max;
  double sum = 0.0;
  for (int v = 0; v < V; v++) sum += exp((double)row[v] - (double)max);
  return (double)max + log(sum) - (double)row[target];
}

/* Adds the nll of positions 0..n-2 of ids[n], fed from an empty KV cache, to *nll. The chunk is
 * fed one model step at a time (as m3_runner_feed cuts it anyway), so logits holds
 * m3_model_step_tokens rows, not n. */
static m3_status score_chunk(m3_cli_direct *d, const int32_t *ids, int n, float *logits,
                             double *nll) {
  const int V = m3_model_config(d->model)->vocab_size, step = m3_model_step_tokens(d->model);
  m3_kv_seq seq;
  m3_kv_seq_init(&seq);
  m3_status st = M3_OK;
  for (int p0 = 0; p0 < n && st == M3_OK; p0 += step) {
    const int piece = n - p0 < step ? n - p0 : step;
    st = m3_runner_feed(d->runner, &seq, ids + p0, piece, 0, logits, NULL);
    for (int j = p0; st == M3_OK && j < p0 + piece && j < n - 1; j++)
      *nll += token_nll(logits + (size_t)(j - p0) * (size_t)V, V, ids[j + 1]);
  }
  m3_kv_seq_release(m3_runner_cache(d->runner), &seq);
  return st;
}

int m3_cmd_perplexity(int argc, char **argv) {
  perplexity_args a;
  int help;
  m3_status st = parse_args(argc, argv, &a, &help);
  if (st != M3_OK) return m3_cli_fail("perplexity", st);
  if (help) {
    fputs(usage, stdout);
    return 0;
  }
  m3_cli_model_paths paths;
  m3_tok_ids ids = {0};
  m3_cli_direct d = {0};
  float *logits = NULL;
  if ((st = m3_cli_model_or_default(&a.model, NULL, &paths)) != M3_OK) goto done;
  if ((st = text_ids(&a, &ids)) != M3_OK) goto done;
  const int n = (int)ids.len, ctx = (int)a.ctx, longest = n < ctx ? n : ctx;
  if ((st = m3_cli_direct_open(a.model, a.device, (int)a.threads, 0, a.kv_dtype, longest, &d)) != M3_OK)
    goto done;
  const int V = m3_model_config(d.model)->vocab_size;
  for (int i = 0; i < n; i++)
    if (ids.data[i] >= V) {
      st = m3_fail(M3_ERR_ARG, "%s/tokenizer.json: token %d of the text is id %d, outside the "
                   "model's vocabulary 0..%d", a.model, i, ids.data[i], V - 1);
      goto done;
    }
  if (!(logits = malloc((size_t)m3_model_step_tokens(d.model) * (size_t)V * sizeof *logits))) {
    st = m3_fail(M3_ERR_NOMEM, "perplexity: cannot allocate the logits of one step");
    goto done;
  }
  double nll = 0.0;
  long long scored = 0;
  int chunks = 0;
  for (int start = 0; start < n; start += ctx) {
    const int len = n - start < ctx ? n - start : ctx;
    if (len < 2) continue;
    if ((st = score_chunk(&d, ids.data + start, len, logits, &nll)) != M3_OK) goto done;
    scored += len - 1;
    chunks++;
  }
  const double mean = nll / (double)scored;
  if (a.json)
    printf("{\"tokens\":%lld,\"chunks\":%d,\"mean_nll\":%.17g,\"perplexity\":%.17g}\n", scored,
           chunks, mean, exp(mean));
  else
    printf("perplexity %.4f (mean nll %.5f nats over %lld tokens in %d chunks of <= %d)\n",
           exp(mean), mean, scored, chunks, ctx);

done:
  free(logits);
  m3_cli_direct_close(&d);
  m3_tok_ids_free(&ids);
  return st == M3_OK ? 0 : m3_cli_fail("perplexity", st);
}
