#include "engine/runner.h"

#include <stdlib.h>

struct m3_runner {
  m3_model *model;
  m3_kv_cache *cache;
  m3_kv_view *views; /* [num_layers], rebuilt per chunk: the block table may move as it grows */
  int32_t *pos;      /* [m3_model_step_tokens] positions of the chunk (host memory, as the
                      * model's forward takes them) */
};

m3_status m3_runner_create(m3_model *model, m3_kv_dtype dt, size_t kv_budget_bytes,
                           m3_runner **out) {
  *out = NULL;
  const m3_config *cfg = m3_model_config(model);
  m3_runner *r = calloc(1, sizeof *r);
  if (!r) return m3_fail(M3_ERR_NOMEM, "runner: out of memory");
  r->model = model;
  m3_status st = m3_kv_cache_create(cfg, m3_model_backend(model), dt, kv_budget_bytes,
                                    &r->cache);
  if (st != M3_OK) {
    free(r);
    return st;
  }
  r->views = calloc((size_t)cfg->num_layers, sizeof *r->views);
  r->pos = malloc((size_t)m3_model_step_tokens(model) * sizeof *r->pos);
  if (!r->views || !r->pos) {
    m3_runner_free(r);
    return m3_fail(M3_ERR_NOMEM, "runner: out of memory");
  }
  *out = r;
  return M3_OK;
}

void m3_runner_free(m3_runner *r) {
  if (!r) return;
  free(r->pos);
  free(r->views);
  m3_kv_cache_free(r->cache);
  free(r);
}

m3_kv_cache *m3_runner_cache(m3_runner *r) { return r->cache; }

m3_status m3_runner_feed(m3_runner *r, m3_kv_seq *seq, const int32_t *ids, int T, int chunk,
                         float *logits, const m3_selection_capture *capture) {
  const int step = m3_model_step_tokens(r->model);
  if (chunk <= 0 || chunk > step) chunk = step;
  const size_t V = (size_t)m3_model_config(r->model)->vocab_size;
  for (int t0 = 0; t0 < T; t0 += chunk) {
    int n = T - t0 < chunk ? T - t0 : chunk;
    int start = seq->num_tokens;
    m3_status st = m3_kv_seq_extend(r->cache, seq, n);
    if (st != M3_OK) return st;
    for (int i = 0; i < n; i++) r->pos[i] = start + i;
    m3_kv_seq_views(r->cache, seq, r->views);
    m3_selection_capture part;
    if (capture) part = (m3_selection_capture){capture->blocks, capture->n_tokens, capture->first + t0};
    st = m3_model_forward(r->model, r->views, ids + t0, r->pos, n,
                          logits ? logits + (size_t)t0 * V : NULL, capture ? &part : NULL);
    if (st != M3_OK) {
      /* The chunk never ran: give its positions back. */
      m3_kv_seq_truncate(r->cache, seq, start);
      return st;
    }
  }
  /* Without logits nothing came back to the host: wait, so that the call's status (and the time a
   * caller measures around it) covers the device's work. */
  return logits ? M3_OK : m3_model_finish(r->model);
}
