/* m3 logits: the model's float32 logits for every position of an id sequence, written raw so
 * they can be compared against a reference (tests/fixtures/text). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/commands.h"
#include "cli/direct_model.h"
#include "cli/model_args.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "m3 logits writes host floats as little-endian"
#endif

static const char usage[] =
    "usage: m3 logits --model DIR --ids 1,2,3 --out FILE [--chunk N] [--device cpu]\n"
    "                 [--threads N] [--blocks-out FILE] " M3_CLI_QUANTIZE_USAGE "\n"
    "                 " M3_CLI_KV_DTYPE_USAGE "\n"
    "  writes float32 LE logits [n_ids, vocab] to FILE\n"
    "  --chunk N        feed the ids N at a time through the KV cache (1 = token-by-token decode;\n"
    "                   default: as many as one step takes)\n"
    "  --blocks-out F   also write the MSA block selections, int32 LE\n"
    "                   [sparse layers, n_ids, index heads, topk], ids ascending, -1 padded\n"
    "  --quantize mxfp8 convert the BF16 weights to MXFP8 at load\n"
    "  --kv-dtype fp8   keep K, V and index keys as E4M3 with a float32 scale per row\n"
    "                   (default f32)\n";

static m3_status write_file(const char *path, const void *data, size_t bytes) {
  FILE *f = fopen(path, "wb");
  if (!f) return m3_fail(M3_ERR_IO, "%s: cannot open for writing", path);
  size_t wrote = fwrite(data, 1, bytes, f);
  if (fclose(f) != 0 || wrote != bytes) return m3_fail(M3_ERR_IO, "%s: write failed", path);
  return M3_OK;
}

typedef struct {
  const char *model, *ids, *out, *blocks_out, *device, *quantize;
  long chunk, threads;
  m3_kv_dtype kv_dtype;
} logits_args;

static m3_status parse_args(int argc, char **argv, logits_args *a, int *help) {
  *a = (logits_args){.device = "cpu"};
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
    else if (strcmp(flag, "--out") == 0) a->out = value;
    else if (strcmp(flag, "--blocks-out") == 0) a->blocks_out = value;
    else if (strcmp(flag, "--device") == 0) a->device = value;
    else if (strcmp(flag, "--chunk") == 0) st = m3_cli_parse_long(flag, value, 1, 1L << 30, &a->chunk);
    else if (strcmp(flag, "--threads") == 0) st = m3_cli_parse_long(flag, value, 0, 4096, &a->threads);
    else if (strcmp(flag, "--quantize") == 0) st = m3_cli_parse_quantize(value, &a->quantize);
    else if (strcmp(flag, "--kv-dtype") == 0) st = m3_cli_parse_kv_dtype(value, &a->kv_dtype);
    else return m3_fail(M3_ERR_ARG, "unknown option '%s' (see --help)", flag);
    if (st != M3_OK) return st;
  }
  if (!a->model || !a->ids || !a->out)
    return m3_fail(M3_ERR_ARG, "--model, --ids and --out are required (see --help)");
  return M3_OK;
}

int m3_cmd_logits(int argc, char **argv) {
  logits_args a;
  int help;
  m3_status st = parse_args(argc, argv, &a, &help);
  if (st != M3_OK) return m3_cli_fail("logits", st);
  if (help) {
    fputs(usage, stdout);
    return 0;
  }

  int32_t *ids = NULL, *blocks = NULL;
  float *logits = NULL;
  int n = 0;
  m3_cli_direct d = {0};
  m3_kv_seq seq;
  m3_kv_seq_init(&seq);
  if ((st = m3_cli_parse_ids(a.ids, &ids, &n)) != M3_OK) goto done;
  if ((st = m3_cli_direct_open(a.model, a.device, (int)a.threads, a.quantize != NULL, a.kv_dtype,
                               n, &d)) != M3_OK)
    goto done;
  const m3_config *cfg = m3_model_config(d.model);
  if ((st = m3_cli_check_ids(ids, n, cfg->vocab_size)) != M3_OK) goto done;

  const size_t logits_bytes = (size_t)n * (size_t)cfg->vocab_size * sizeof *logits;
  const size_t blocks_bytes = (size_t)m3_model_num_sparse_layers(d.model) * (size_t)n *
                              (size_t)cfg->index_num_heads * (size_t)cfg->index_topk_blocks *
                              sizeof *blocks;
  logits = malloc(logits_bytes);
  blocks = a.blocks_out ? malloc(blocks_bytes ? blocks_bytes : 1) : NULL;
  if (!logits || (a.blocks_out && !blocks)) {
    st = m3_fail(M3_ERR_NOMEM, "cannot allocate %zu bytes of logits", logits_bytes);
    goto done;
  }
  m3_selection_capture capture = {blocks, n, 0};
  st = m3_runner_feed(d.runner, &seq, ids, n, (int)a.chunk, logits, blocks ? &capture : NULL);
  if (st != M3_OK) goto done;
  if ((st = write_file(a.out, logits, logits_bytes)) != M3_OK) goto done;
  if (blocks) st = write_file(a.blocks_out, blocks, blocks_bytes);

done:
  if (d.runner) m3_kv_seq_release(m3_runner_cache(d.runner), &seq);
  m3_cli_direct_close(&d);
  free(ids);
  free(logits);
  free(blocks);
  return st == M3_OK ? 0 : m3_cli_fail("logits", st);
}
