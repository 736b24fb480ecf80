/* model_args.h: option values shared by the commands that run the model (logits, run, chat). */
#ifndef M3_CLI_MODEL_ARGS_H
#define M3_CLI_MODEL_ARGS_H

#include <stdint.h>

#include "backend/backend.h"
#include "base/status.h"
#include "m3.h"

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
/* --quantize VALUE: "mxfp8" (convert the BF16 weights at load, m3_engine_options.quantize);
 * anything else is M3_ERR_ARG. */
m3_status m3_cli_parse_quantize(const char *value, const char **out);
#define M3_CLI_QUANTIZE_USAGE "[--quantize mxfp8]"
/* --kv-dtype VALUE: "f32" or "fp8" (the KV cache's dtype, backend.h m3_kv_dtype); anything else
 * is M3_ERR_ARG naming the option. */
m3_status m3_cli_parse_kv_dtype(const char *value, m3_kv_dtype *out);
#define M3_CLI_KV_DTYPE_USAGE "[--kv-dtype f32|fp8]"
/* Engine flags run, chat and serve share: speculative decoding (--speculative mtp|eagle3,
 * --draft DIR, --num-draft N), --quantize mxfp8 and --kv-dtype f32|fp8. */
typedef struct {
  const char *kind, *draft;
  int num_draft;
  const char *quantize, *kv_dtype;
  /* Multi-GPU layout (issue 11): 0 = not given (one GPU, one node). */
  int tp, ep, nnodes, node_rank;
  const char *master_addr;
} m3_cli_spec;
#define M3_CLI_PARALLEL_USAGE \
  "[--tp N] [--ep N] [--nnodes N --node-rank R --master-addr HOST[:PORT]]"
/* --help's words on several nodes. */
#define M3_CLI_NODES_HELP \
  "  --nnodes N --node-rank R --master-addr HOST[:PORT]: N processes (on one host or several) run\n" \
  "  one engine of --tp x --ep ranks, world / N per node on GPUs K.. of its --device cuda:K.\n" \
  "  Node 0 listens on PORT (default 29500) and does the work; the others (the same --model,\n" \
  "  --tp, --ep, --nnodes, their own --device and --node-rank) follow it and exit when it does.\n"
#define M3_CLI_SPEC_USAGE \
  "[--speculative mtp|eagle3] [--draft DIR] [--num-draft N] " M3_CLI_QUANTIZE_USAGE \
  " " M3_CLI_KV_DTYPE_USAGE " " M3_CLI_PARALLEL_USAGE
/* Returns 1 when `flag` is one of them (*st gets the parse result), else 0. */
int m3_cli_spec_flag(const char *flag, const char *value, m3_cli_spec *spec, m3_status *st);
void m3_cli_spec_apply(const m3_cli_spec *spec, m3_engine_options *o);
/* How --help names the default model and its draft (m3_cli_model_or_default). */
#define M3_CLI_DEFAULT_MODEL "the default model ($M3_MODEL_DIR, else models/m3-small)"
#define M3_CLI_DEFAULT_DRAFT_HELP \
  "  --speculative eagle3 on the default model drafts with models/m3-small-eagle3 unless --draft\n" \
  "  names another.\n"
/* The folders a command loads when --model or --draft are not given. */
typedef struct {
  char model[4096], draft[4096];
} m3_cli_model_paths;
/* *model is --model's value or NULL; NULL becomes the default model (io/default_model.h),
 * written into paths->model. With the default model and spec->kind "eagle3" but no --draft,
 * spec->draft becomes the draft folder next to the model (M3_DEFAULT_DRAFT_NAME), written into
 * paths->draft. spec may be NULL (commands without speculative decoding). */
m3_status m3_cli_model_or_default(const char **model, m3_cli_spec *spec, m3_cli_model_paths *paths);
/* Before the engine opens: with --tp/--ep above 1 prints the layout plan of model_dir on stdout
 * (a layout its sizes do not divide is M3_ERR_ARG naming the flag). Also checks --node-rank and
 * --master-addr against --nnodes (the engine checks the rest: m3_engine_options.nnodes).
 * m3_cli_spec_apply passes --tp/--ep/--nnodes/--node-rank/--master-addr on. */
m3_status m3_cli_parallel_gate(const m3_cli_spec *spec, const char *model_dir);
/* A command run with --node-rank R >= 1: prints that it follows node 0, then runs o's ranks of
 * this node for node 0 (m3_engine_follow) until node 0 quits; the command's exit status. */
int m3_cli_follow(const char *cmd, const m3_engine_options *o);
/* The layout plan of model_dir's config for tp x ep, printed on stdout. */
m3_status m3_cli_print_plan(const char *model_dir, int tp, int ep);
/* The backend for --device (cpu, cuda, cuda:N) with --threads CPU workers (0 = one per core). */
m3_status m3_cli_open_backend(const char *device, int threads, m3_backend **out);

#endif
