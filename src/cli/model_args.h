/* model_args.h: option values shared by the commands that run the model (logits, run, chat). */
#ifndef M3_CLI_MODEL_ARGS_H
#define M3_CLI_MODEL_ARGS_H

#include <stdint.h>

#include "backend/backend.h"
#include "base/status.h"

/* "1,2,3" -> ids (malloc'd, caller frees), at least one. A malformed entry is M3_ERR_ARG naming it. */
m3_status m3_cli_parse_ids(const char *list, int32_t **ids, int *n);
/* Every id in [0, vocab); otherwise M3_ERR_ARG naming the first id outside. */
m3_status m3_cli_check_ids(const int32_t *ids, int n, int vocab);
/* A decimal integer in [min, max] for option `flag`. */
m3_status m3_cli_parse_long(const char *flag, const char *value, long min, long max, long *out);
/* A number in [0, max] for option `flag`. */
m3_status m3_cli_parse_unit(const char *flag, const char *value, double max, double *out);
/* Weight-loading progress on stderr, for m3_engine_options.on_load_progress. */
void m3_cli_load_progress(uint64_t done, uint64_t total, void *user);
/* The backend for --device (cpu, cuda, cuda:N) with --threads CPU workers (0 = one per core). */
m3_status m3_cli_open_backend(const char *device, int threads, m3_backend **out);

#endif
