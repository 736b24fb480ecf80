/* direct_model.h: a model loaded for forwards outside the engine, for the commands that want
 * every position's logits (m3 logits, m3 perplexity): the backend, the weights and a runner
 * (engine/runner.h) with its KV cache. */
#ifndef M3_CLI_DIRECT_MODEL_H
#define M3_CLI_DIRECT_MODEL_H

#include "backend/backend.h"
#include "base/status.h"
#include "engine/runner.h"

typedef struct {
  m3_backend *be;
  m3_model *model;
  m3_runner *runner;
} m3_cli_direct;

/* Opens `device` (cpu, cuda, cuda:N) with `threads` CPU workers (0 = one per core), loads
 * model_dir (BF16 linears converted to MXFP8 with quantize_mxfp8) and makes a runner whose KV
 * cache of dtype `kv` holds max_tokens tokens. On failure *d holds nothing to close. */
m3_status m3_cli_direct_open(const char *model_dir, const char *device, int threads,
                             int quantize_mxfp8, m3_kv_dtype kv, int max_tokens, m3_cli_direct *d);
/* Frees what m3_cli_direct_open made; a zeroed *d is fine. */
void m3_cli_direct_close(m3_cli_direct *d);

#endif
