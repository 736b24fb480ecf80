/* lockstep.h: the ranks of a tensor / expert parallel model run in lockstep on CPU backends, one
 * thread each (test_model_shard, test_model_head_argmax): a host all-reduce hook over the world's
 * threads and one sequence's KV cache per rank.
 *
 * The all-reduce: each rank posts its buffer, group and size; after a world barrier the rank at
 * index i of its group's n members sums indices [i/n, (i+1)/n) of the buffer over the members (in
 * rank order) into every member's buffer. TP: the tp ranks of the caller's EP group; WORLD: every
 * rank. Every rank makes every call, so one world barrier pairs them. Rank 0 counts the calls per
 * group, the calls whose ranks named different groups or sizes, and logs the world calls' sizes. */
#ifndef M3_TESTS_LOCKSTEP_H
#define M3_TESTS_LOCKSTEP_H

#include <pthread.h>
#include <stdlib.h>

#include "model/model.h"

enum { LOCKSTEP_MAX_RANKS = 4, LOCKSTEP_MAX_CALLS = 64 };

typedef struct {
  pthread_barrier_t barrier;
  float *bufs[LOCKSTEP_MAX_RANKS];
  m3_reduce_group groups[LOCKSTEP_MAX_RANKS];
  size_t sizes[LOCKSTEP_MAX_RANKS];
  int tp, world;
  int calls[2];   /* per m3_reduce_group */
  int mismatched; /* calls whose ranks named different groups or sizes */
  size_t world_calls[LOCKSTEP_MAX_CALLS]; /* the first LOCKSTEP_MAX_CALLS world calls' sizes */
  int n_world_calls;
} lockstep_group;

/* A rank's hook user. */
typedef struct {
  lockstep_group *g;
  int rank;
} lockstep_rank;

static inline m3_status lockstep_all_reduce(void *user, m3_reduce_group group, float *buf,
                                            size_t n) {
  lockstep_rank *u = user;
  lockstep_group *g = u->g;
  g->bufs[u->rank] = buf;
  g->groups[u->rank] = group;
  g->sizes[u->rank] = n;
  pthread_barrier_wait(&g->barrier);
  const int tp_group = group == M3_REDUCE_TP;
  const int members = tp_group ? g->tp : g->world;
  const int base = tp_group ? u->rank / g->tp * g->tp : 0; /* the group's first world rank */
  const size_t at = (size_t)(u->rank - base);
  for (size_t i = n * at / (size_t)members; i < n * (at + 1) / (size_t)members; i++) {
    float sum = 0;
    for (int k = 0; k < members; k++) sum += g->bufs[base + k][i];
    for (int k = 0; k < members; k++) g->bufs[base + k][i] = sum;
  }
  if (u->rank == 0) {
    g->calls[group == M3_REDUCE_WORLD]++;
    for (int r = 0; r < g->world; r++) g->mismatched += g->groups[r] != group || g->sizes[r] != n;
    if (!tp_group && g->n_world_calls < LOCKSTEP_MAX_CALLS) g->world_calls[g->n_world_calls++] = n;
  }
  pthread_barrier_wait(&g->barrier);
  return M3_OK;
}

/* One sequence's cache on the model's backend: max_pos positions in consecutive pages, float32. */
typedef struct {
  m3_kv_view *views; /* [layers] */
  int32_t *table;
  int layers;
} lockstep_cache;

static inline m3_status lockstep_cache_make(m3_model *m, int max_pos, lockstep_cache *kc) {
  const m3_config *c = m3_model_config(m);
  m3_backend *be = m3_model_backend(m);
  const int bs = c->index_block_size, pages = (max_pos + bs - 1) / bs;
  kc->layers = c->num_layers;
  kc->views = calloc((size_t)c->num_layers, sizeof *kc->views);
  kc->table = malloc((size_t)pages * sizeof *kc->table);
  if (!kc->views || !kc->table) return M3_ERR_NOMEM;
  for (int p = 0; p < pages; p++) kc->table[p] = p;
  const size_t kv_bytes = (size_t)pages * c->num_kv_heads * bs * c->head_dim * sizeof(float);
  for (int l = 0; l < c->num_layers; l++) {
    m3_kv_view *v = &kc->views[l];
    *v = (m3_kv_view){.block_table = kc->table, .num_blocks = pages, .block_size = bs,
                      .nkv = c->num_kv_heads, .hd = c->head_dim, .ihd = c->index_head_dim,
                      .dtype = M3_KV_F32};
    v->k = be->ops->alloc(be, kv_bytes);
    v->v = be->ops->alloc(be, kv_bytes);
    if (c->layer_attn[l] == M3_ATTN_SPARSE)
      v->ik = be->ops->alloc(be, (size_t)pages * bs * c->index_head_dim * sizeof(float));
    if (!v->k || !v->v || (c->layer_attn[l] == M3_ATTN_SPARSE && !v->ik)) return M3_ERR_NOMEM;
  }
  return M3_OK;
}

static inline void lockstep_cache_free(m3_model *m, lockstep_cache *kc) {
  m3_backend *be = m3_model_backend(m);
  for (int l = 0; kc->views && l < kc->layers; l++) {
    void *p[] = {kc->views[l].k, kc->views[l].v, kc->views[l].ik};
    for (int i = 0; i < 3; i++)
      if (p[i]) be->ops->free(be, p[i]);
  }
  free(kc->views);
  free(kc->table);
}

#endif
