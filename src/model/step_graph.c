/* step_graph.c: the cache of recorded decode steps (step_graph.h). */
#include <stdlib.h>
#include <string.h>

#include "model/step_graph.h"

enum { SIG_HEADER = 5, SIG_PER_SEGMENT = 2, SIG_PER_VIEW = 10 };

/* FNV-1a a word at a time (a batch of 64 sequences on 62 layers signs 40k words each step): a
 * cheap first test before comparing whole signatures. */
static uint64_t sig_hash(const uint64_t *w, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; i++) h = (h ^ w[i] ^ (w[i] >> 32)) * 0x100000001b3ull;
  return h;
}

static m3_status reserve(uint64_t **w, size_t *cap, size_t n) {
  if (n <= *cap) return M3_OK;
  uint64_t *grown = realloc(*w, n * sizeof *grown);
  if (!grown) return m3_fail(M3_ERR_NOMEM, "model: step signature of %zu words", n);
  *w = grown;
  *cap = n;
  return M3_OK;
}

static uint64_t word_of(const void *p) { return (uint64_t)(uintptr_t)p; }

m3_status m3_step_sig_build(m3_step_graphs *c, uint64_t epoch, int T, const m3_segment *segs,
                            int n_segs, int num_layers, const int32_t *rows, int n_rows,
                            const float *head_out) {
  const size_t n = SIG_HEADER + (size_t)n_rows +
                   (size_t)n_segs * (SIG_PER_SEGMENT + (size_t)num_layers * SIG_PER_VIEW);
  m3_status st = reserve(&c->sig, &c->cap, n);
  if (st != M3_OK) return st;
  uint64_t *w = c->sig;
  *w++ = epoch;
  *w++ = (uint64_t)T;
  *w++ = (uint64_t)n_segs;
  *w++ = (uint64_t)n_rows;
  *w++ = word_of(head_out);
  for (int r = 0; r < n_rows; r++) *w++ = (uint64_t)rows[r];
  for (int i = 0; i < n_segs; i++) {
    *w++ = (uint64_t)segs[i].first;
    *w++ = (uint64_t)segs[i].T;
    for (int l = 0; l < num_layers; l++) {
      const m3_kv_view *kv = &segs[i].kv[l];
      *w++ = word_of(kv->k);
      *w++ = word_of(kv->v);
      *w++ = word_of(kv->ik);
      *w++ = word_of(kv->block_table);
      *w++ = (uint64_t)kv->num_blocks;
      *w++ = (uint64_t)kv->block_size;
      *w++ = (uint64_t)kv->nkv;
      *w++ = (uint64_t)kv->hd;
      *w++ = (uint64_t)kv->ihd;
      *w++ = (uint64_t)kv->dtype;
    }
  }
  c->len = n;
  c->hash = sig_hash(c->sig, n);
  return M3_OK;
}

m3_step_graph *m3_step_graphs_find(m3_step_graphs *c) {
  for (int i = 0; i < M3_STEP_GRAPHS; i++) {
    m3_step_graph *g = &c->slot[i];
    if (g->used && g->hash == c->hash && g->len == c->len &&
        memcmp(g->sig, c->sig, c->len * sizeof *c->sig) == 0) {
      g->used = ++c->clock;
      return g;
    }
  }
  return NULL;
}

m3_step_graph *m3_step_graphs_insert(m3_step_graphs *c) {
  m3_step_graph *victim = &c->slot[0];
  for (int i = 1; i < M3_STEP_GRAPHS; i++)
    if (c->slot[i].used < victim->used) victim = &c->slot[i];
  if (reserve(&victim->sig, &victim->cap, c->len) != M3_OK) return NULL;
  memcpy(victim->sig, c->sig, c->len * sizeof *c->sig);
  victim->len = c->len;
  victim->hash = c->hash;
  victim->state = M3_STEP_SEEN;
  victim->used = ++c->clock;
  return victim;
}

void m3_step_graph_set_epoch(m3_step_graph *g, uint64_t epoch) {
  g->sig[0] = epoch;
  g->hash = sig_hash(g->sig, g->len);
}

/* The second sight of a signature: records region into g's graph and launches it. */
static m3_status record(m3_step_graphs *c, m3_step_graph *g, m3_model *m, m3_step_region region,
                        void *ctx, int *done) {
  m3_backend *be = m->be;
  *done = 0;
  if (be->ops->graph_begin(be) != M3_OK) return M3_OK;
  m3_status st = region(m, ctx);
  m3_status end = be->ops->graph_end(be, &g->graph);
  if (st != M3_OK) return st;
  if (end != M3_OK || be->ops->graph_launch(be, g->graph) != M3_OK) return M3_OK;
  g->state = M3_STEP_READY;
  c->stats.recorded++;
  *done = 1;
  return M3_OK;
}

m3_status m3_step_graphs_run(m3_step_graphs *c, m3_model *m, m3_step_region region, void *ctx) {
  m3_backend *be = m->be;
  m3_step_graph *g = m3_step_graphs_find(c);
  if (g && g->state == M3_STEP_READY) {
    if (be->ops->graph_launch(be, g->graph) == M3_OK) {
      c->stats.replayed++;
      return M3_OK;
    }
    g->state = M3_STEP_FAILED;
  } else if (g && g->state == M3_STEP_SEEN) {
    int done;
    m3_status st = record(c, g, m, region, ctx, &done);
    if (st != M3_OK || done) return st;
    g->state = M3_STEP_FAILED; /* the failure is not an error of the step: run it directly */
  } else if (!g) {
    g = m3_step_graphs_insert(c);
  }
  m3_status st = region(m, ctx);
  c->stats.direct++;
  /* A first sight records next time at the epoch this run left (it may have grown scratch). */
  if (g && g->state == M3_STEP_SEEN) m3_step_graph_set_epoch(g, be->ops->memory_epoch(be));
  return st;
}

void m3_step_graphs_clear(m3_step_graphs *c, m3_backend *be) {
  for (int i = 0; i < M3_STEP_GRAPHS; i++) {
    if (c->slot[i].graph) be->ops->graph_free(be, c->slot[i].graph);
    free(c->slot[i].sig);
  }
  free(c->sig);
  const m3_step_graph_stats stats = c->stats; /* the model's counts run on across a clear */
  memset(c, 0, sizeof *c);
  c->stats = stats;
}

m3_step_graph_stats m3_model_graph_stats(const m3_model *m) {
  if (!m->graphs) return (m3_step_graph_stats){0};
  m3_step_graph_stats s = m->graphs->stats;
  s.enabled = 1;
  return s;
}
