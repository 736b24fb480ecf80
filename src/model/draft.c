/* draft.c: the drafter interface (draft.h) over a kind's body.
 *
 * A forward runs the ragged batch in steps of at most M3_MODEL_STEP_TOKENS rows, as the target
 * does; per step:
 *   ids, pos, hin  <- the segments' rows                              [T], [T], [T, width]
 *   out            <- body (kind)                                      [T, H]
 *   hidden_out     <- out rows                                         (chained states)
 *   logits         <- lm_head(GemmaRMSNorm(out[rows], head_norm))      only the rows asked for
 *   draft          <- argmax of a sequence's last row, through d2t */
#include <stdlib.h>
#include <string.h>

#include "model/draft_internal.h"

void m3_drafter_free(m3_drafter *d) {
  if (d) d->ops->destroy(d);
}

const int *m3_drafter_target_layers(const m3_drafter *d, int *n) {
  *n = d->n_target_layers;
  return d->target_layers;
}
const m3_config *m3_drafter_cache_config(const m3_drafter *d) { return &d->cache_cfg; }
int m3_drafter_hidden_size(const m3_drafter *d) { return d->H; }
int m3_drafter_vocab(const m3_drafter *d) { return d->vocab; }

m3_status m3_drafter_cache_layers(m3_drafter *d, int n, m3_attn_kind attn, m3_mlp_kind mlp) {
  d->cache_cfg = *m3_model_config(d->target);
  d->cache_cfg.num_layers = n;
  d->cache_cfg.layer_attn = malloc((size_t)n);
  d->cache_cfg.layer_mlp = malloc((size_t)n);
  if (!d->cache_cfg.layer_attn || !d->cache_cfg.layer_mlp)
    return m3_fail(M3_ERR_NOMEM, "drafter: cache layout of %d layers", n);
  memset(d->cache_cfg.layer_attn, attn, (size_t)n);
  memset(d->cache_cfg.layer_mlp, mlp, (size_t)n);
  return M3_OK;
}

void m3_drafter_concat(m3_backend *be, const float *a, const float *b, int T, int H, float *dst) {
  const size_t row = (size_t)H * sizeof(float);
  for (int t = 0; t < T; t++) {
    be->ops->copy(be, dst + (size_t)t * 2 * H, a + (size_t)t * H, row);
    be->ops->copy(be, dst + (size_t)t * 2 * H + H, b + (size_t)t * H, row);
  }
}

m3_status m3_drafter_alloc_steps(m3_drafter *d) {
  m3_backend *be = d->be;
  const size_t S = M3_MODEL_STEP_TOKENS, H = (size_t)d->H;
  const size_t win = (size_t)(d->in_width > d->H ? d->in_width : d->H);
  d->ids = be->ops->alloc(be, S * 4);
  d->pos = be->ops->alloc(be, S * 4);
  d->rows = be->ops->alloc(be, S * 4);
  d->hin = be->ops->alloc(be, S * win * 4);
  d->out = be->ops->alloc(be, S * H * 4);
  d->head_in = be->ops->alloc(be, S * H * 4);
  d->segs = malloc(S * sizeof *d->segs);
  if (be->ops->device_memory) {
    d->h_ids = malloc(S * 4);
    d->h_pos = malloc(S * 4);
    d->h_rows = malloc(S * 4);
  } else {
    d->h_ids = d->ids;
    d->h_pos = d->pos;
    d->h_rows = d->rows;
  }
  if (!d->ids || !d->pos || !d->rows || !d->hin || !d->out || !d->head_in || !d->segs ||
      !d->h_ids || !d->h_pos || !d->h_rows)
    return m3_fail(M3_ERR_NOMEM, "drafter: step buffers (%zu rows of %zu)", S, win);
  return M3_OK;
}

void m3_drafter_free_base(m3_drafter *d) {
  m3_backend *be = d->be;
  if (be && be->ops->device_memory) {
    free(d->h_ids);
    free(d->h_pos);
    free(d->h_rows);
    if (d->h_logits) be->ops->free_host(be, d->h_logits);
  }
  void *bufs[] = {d->ids, d->pos, d->rows, d->hin, d->out, d->head_in, d->logits};
  for (size_t i = 0; be && i < sizeof bufs / sizeof bufs[0]; i++)
    if (bufs[i]) be->ops->free(be, bufs[i]);
  free(d->segs);
  free(d->target_layers);
  free(d->d2t);
  free(d->cache_cfg.layer_attn);
  free(d->cache_cfg.layer_mlp);
}

static m3_status grow_logits(m3_drafter *d, int rows) {
  if (rows <= d->logits_cap) return M3_OK;
  m3_backend *be = d->be;
  if (d->logits) be->ops->free(be, d->logits);
  if (be->ops->device_memory && d->h_logits) be->ops->free_host(be, d->h_logits);
  const size_t bytes = (size_t)rows * (size_t)d->vocab * sizeof(float);
  d->logits = be->ops->alloc(be, bytes);
  d->h_logits = be->ops->device_memory ? be->ops->alloc_host(be, bytes) : d->logits;
  d->logits_cap = d->logits && d->h_logits ? rows : 0;
  return d->logits_cap ? M3_OK : m3_fail(M3_ERR_NOMEM, "drafter: logits of %d rows", rows);
}

static m3_status check_seq(const m3_drafter *d, const m3_draft_seq *q, int i) {
  const int V = m3_model_config(d->target)->vocab_size;
  if (q->T < 0) return m3_fail(M3_ERR_ARG, "drafter: sequence %d has %d tokens", i, q->T);
  for (int t = 0; t < q->T; t++) {
    if (q->ids[t] < 0 || q->ids[t] >= V)
      return m3_fail(M3_ERR_ARG, "drafter: token id %d (sequence %d, at %d) outside the "
                     "vocabulary of %d", q->ids[t], i, t, V);
    for (int l = 0; l < d->cache_cfg.num_layers; l++)
      if (q->pos[t] < 0 || q->pos[t] / q->kv[l].block_size >= q->kv[l].num_blocks)
        return m3_fail(M3_ERR_ARG, "drafter: position %d (sequence %d, at %d) has no cache page",
                       q->pos[t], i, t);
  }
  return M3_OK;
}

static int32_t argmax(const float *l, int n) {
  int32_t best = 0;
  for (int i = 1; i < n; i++)
    if (l[i] > l[best]) best = i;
  return best;
}

/* The head over the step's rows that want logits: a sequence's every row when it asks for
 * logits, else its last row when it asks for a draft. */
static m3_status head(m3_drafter *d, const m3_draft_seq *seqs, int n_segs) {
  m3_backend *be = d->be;
  int n = 0;
  for (int i = 0; i < n_segs; i++) {
    const m3_segment *g = &d->segs[i];
    const m3_draft_seq *q = &seqs[g->seq];
    for (int j = 0; j < g->T; j++)
      if (q->logits || (q->draft && g->offset + j == q->T - 1)) d->h_rows[n++] = g->first + j;
  }
  if (n == 0) return M3_OK;
  m3_status st = grow_logits(d, n);
  if (st == M3_OK && d->h_rows != d->rows)
    st = be->ops->to_device(be, d->rows, d->h_rows, (size_t)n * sizeof(int32_t));
  if (st != M3_OK) return st;
  const m3_tensor out_rows = {.name = "drafter output", .data = d->out, .dtype = M3_DT_F32,
                              .rows = M3_MODEL_STEP_TOKENS, .cols = d->H, .quant = M3_WQ_NONE};
  be->ops->embed(be, &out_rows, d->rows, n, d->head_in);
  be->ops->rmsnorm(be, d->head_in, d->head_norm, d->head_eps, n, d->H, d->head_in);
  be->ops->matmul(be, d->lm_head, d->head_in, n, d->logits);
  const size_t V = (size_t)d->vocab;
  if (d->h_logits != d->logits &&
      (st = be->ops->to_host(be, d->h_logits, d->logits, (size_t)n * V * sizeof(float))) != M3_OK)
    return st;
  int r = 0;
  for (int i = 0; i < n_segs; i++) {
    const m3_segment *g = &d->segs[i];
    const m3_draft_seq *q = &seqs[g->seq];
    for (int j = 0; j < g->T; j++) {
      const int last = g->offset + j == q->T - 1;
      if (!q->logits && !(q->draft && last)) continue;
      const float *row = d->h_logits + (size_t)r++ * V;
      if (q->logits) memcpy(q->logits + (size_t)(g->offset + j) * V, row, V * sizeof(float));
      if (q->draft && last) {
        int32_t id = argmax(row, d->vocab);
        *q->draft = d->d2t ? d->d2t[id] : id;
      }
    }
  }
  return M3_OK;
}

m3_status m3_drafter_forward(m3_drafter *d, const m3_draft_seq *seqs, int n, int step) {
  m3_backend *be = d->be;
  m3_status st = M3_OK;
  for (int i = 0; i < n && st == M3_OK; i++) st = check_seq(d, &seqs[i], i);
  if (st != M3_OK) return st;
  const size_t width = (size_t)(step == 0 ? d->in_width : d->H), H = (size_t)d->H;
  for (int i = 0, off = 0; i < n;) {
    int T = 0, n_segs = 0;
    while (i < n && T < M3_MODEL_STEP_TOKENS) {
      const m3_draft_seq *q = &seqs[i];
      int take = q->T - off < M3_MODEL_STEP_TOKENS - T ? q->T - off : M3_MODEL_STEP_TOKENS - T;
      if (take > 0) {
        d->segs[n_segs++] = (m3_segment){q->kv, T, take, i, off};
        memcpy(d->h_ids + T, q->ids + off, (size_t)take * sizeof(int32_t));
        memcpy(d->h_pos + T, q->pos + off, (size_t)take * sizeof(int32_t));
        st = be->ops->to_device(be, d->hin + (size_t)T * width, q->hidden + (size_t)off * width,
                                (size_t)take * width * sizeof(float));
        if (st != M3_OK) return st;
        T += take;
        off += take;
      }
      if (off == q->T) {
        i++;
        off = 0;
      }
    }
    if (T == 0) break;
    if (d->h_ids != d->ids) {
      st = be->ops->to_device(be, d->ids, d->h_ids, (size_t)T * sizeof(int32_t));
      if (st == M3_OK) st = be->ops->to_device(be, d->pos, d->h_pos, (size_t)T * sizeof(int32_t));
      if (st != M3_OK) return st;
    }
    if ((st = d->ops->body(d, d->segs, n_segs, T, step)) != M3_OK) return st;
    for (int s = 0; s < n_segs && st == M3_OK; s++) {
      const m3_segment *g = &d->segs[s];
      float *hout = seqs[g->seq].hidden_out;
      if (hout)
        st = be->ops->to_host(be, hout + (size_t)g->offset * H, d->out + (size_t)g->first * H,
                              (size_t)g->T * H * sizeof(float));
    }
    if (st == M3_OK) st = head(d, seqs, n_segs);
    if (st != M3_OK) return st;
  }
  return M3_OK;
}
