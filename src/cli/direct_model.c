#include "cli/direct_model.h"

#include "cli/model_args.h"

m3_status m3_cli_direct_open(const char *model_dir, const char *device, int threads,
                             int quantize_mxfp8, m3_kv_dtype kv, int max_tokens, m3_cli_direct *d) {
  *d = (m3_cli_direct){0};
  m3_status st = m3_cli_open_backend(device, threads, &d->be);
  if (st == M3_OK) st = m3_kv_dtype_check(d->be, kv);
  const m3_model_load_options load = {.quantize_mxfp8 = quantize_mxfp8, .threads = threads};
  if (st == M3_OK) st = m3_model_load_with(model_dir, d->be, &load, &d->model);
  if (st == M3_OK) {
    const m3_config *cfg = m3_model_config(d->model);
    st = m3_runner_create(d->model, kv, m3_kv_bytes_for_tokens(cfg, kv, max_tokens), &d->runner);
  }
  if (st != M3_OK) m3_cli_direct_close(d);
  return st;
}

void m3_cli_direct_close(m3_cli_direct *d) {
  m3_runner_free(d->runner);
  m3_model_free(d->model);
  if (d->be) d->be->ops->destroy(d->be);
  *d = (m3_cli_direct){0};
}
