/* step_graph.h (internal to src/model): decode steps recorded once as a backend graph (CUDA
 * graphs) and then replayed with one launch instead of a few hundred op launches from the host.
 *
 * A recording bakes in every argument the ops were issued with: sizes, pointers, the fields of
 * the cache views. What changes from step to step without changing those (token ids, positions,
 * the rows that want logits, block table contents, the cache's contents) lives in backend memory
 * that the kernels read when they run. So a step's signature is every host-side value the issued
 * ops depend on besides the model's own constants, as words:
 *   [0] the backend's memory epoch (its scratch addresses)   [1] T   [2] n_segs   [3] n_rows
 *   [4] where the head writes (the model's logits buffer on a device backend)
 *   [5 .. 5 + n_rows)  the step rows that want logits (hs.rows)
 *   per segment: first, T, then per layer its view: k, v, ik, block_table, num_blocks,
 *                block_size, nkv, hd, ihd, dtype
 * and two steps with equal signatures issue the same ops with the same arguments. A small LRU
 * keeps the last M3_STEP_GRAPHS signatures: the first time a signature is seen its step runs
 * directly (growing any backend scratch it needs, which moves the epoch), the second time it is
 * recorded and launched, later times replayed. */
#ifndef M3_MODEL_STEP_GRAPH_H
#define M3_MODEL_STEP_GRAPH_H

#include <stddef.h>
#include <stdint.h>

#include "model/layers.h"

enum { M3_STEP_GRAPHS = 8 };

/* Steps of up to this many tokens are graphed (decode, small batches, speculative verification):
 * larger ones are launch-bound no more, and moe_experts waits for the host beyond it. */
enum { M3_STEP_GRAPH_MAX_T = M3_MODEL_GRAPH_MAX_TOKENS };

typedef enum {
  M3_STEP_SEEN,   /* ran directly once at this epoch; recorded the next time */
  M3_STEP_READY,  /* graph holds the recording */
  M3_STEP_FAILED, /* recording or launching failed: always run directly */
} m3_step_state;

typedef struct {
  uint64_t *sig; /* [len] the signature, owned */
  size_t len, cap;
  uint64_t hash;
  m3_step_state state;
  m3_graph *graph; /* READY: launchable; SEEN: NULL or a stale graph that recording updates */
  uint64_t used;   /* LRU clock of the last use; 0: an empty slot */
} m3_step_graph;

struct m3_step_graphs {
  m3_step_graph slot[M3_STEP_GRAPHS];
  uint64_t *sig; /* [len] the current step's signature */
  size_t len, cap;
  uint64_t hash;
  uint64_t clock;
  m3_step_graph_stats stats;
};
typedef struct m3_step_graphs m3_step_graphs;

/* The current step's signature into c->sig. rows [n_rows]; segs[i].kv [num_layers]; head_out
 * the head's output (NULL when it does not run). */
m3_status m3_step_sig_build(m3_step_graphs *c, uint64_t epoch, int T, const m3_segment *segs,
                            int n_segs, int num_layers, const int32_t *rows, int n_rows,
                            const float *head_out);

/* The slot holding the current signature (marked used), or NULL. */
m3_step_graph *m3_step_graphs_find(m3_step_graphs *c);

/* The current signature into the least recently used slot (an empty one first), state SEEN; its
 * graph, recorded for another signature, is kept for graph_end to update. NULL when out of
 * memory. */
m3_step_graph *m3_step_graphs_insert(m3_step_graphs *c);

/* Sets a slot's epoch (a direct run that grew the backend's scratch). */
void m3_step_graph_set_epoch(m3_step_graph *g, uint64_t epoch);

/* The ops of one step from the embedding on, issued on m's backend; ctx is the caller's. */
typedef m3_status (*m3_step_region)(m3_model *m, void *ctx);

/* Issues region(m, ctx) for the step whose signature m3_step_sig_build just built: replays its
 * graph, records it (the second time), or runs it directly (the first time, or when a recording
 * or launch failed: that signature then always runs directly). m->be has the graph ops. */
m3_status m3_step_graphs_run(m3_step_graphs *c, m3_model *m, m3_step_region region, void *ctx);

/* Frees every graph and signature; c is empty afterwards but for its counts (stats). */
void m3_step_graphs_clear(m3_step_graphs *c, m3_backend *be);


#endif
