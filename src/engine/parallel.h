/* parallel.h: how the text model is laid out over the GPUs of one host (issue 11).
 *
 * A TP x EP layout has world = tp * ep ranks; rank r has tp_rank = r % tp and ep_rank = r / tp,
 * so the tp ranks of one TP group are neighbours. What each rank holds:
 *   attention   q_proj rows / o_proj columns of nh / tp query heads; the KV heads those query
 *               heads read (GQA groups never straddle ranks): nkv / tp of them, or, when
 *               tp > nkv (tp % nkv == 0), one KV head replicated on tp / nkv ranks; the index q
 *               heads of its KV groups (one index head per KV group, msa_spec.md §4) with
 *               index_k_proj replicated, so each rank selects the MSA blocks of its own groups.
 *               Attention is replicated across the EP groups.
 *   dense MLP   gate/up rows and down columns of intermediate / tp (column then row split, one
 *               all-reduce); replicated across the EP groups.
 *   MoE         experts [ep_rank * E / ep, +E / ep), each split inside by tp (intermediate / tp);
 *               the shared expert split like the dense MLP but over all world ranks, so the one
 *               all-reduce that combines the routed experts also sums it exactly once; the router
 *               is replicated, so every rank routes every token identically and the routing
 *               exchange is that combine all-reduce (activations are replicated, no all-to-all).
 *   vocabulary  embedding replicated (every rank embeds its tokens alone); lm_head rows
 *               [r V / world, +V / world) on world rank r when the world divides V (model/shard.c),
 *               else replicated. A greedy step's ranks exchange each row's best (score, id) of
 *               their slice through one world all-reduce (zeros outside its own part); any other
 *               step gathers the logits slices that way and rank 0 samples the whole rows. The split saves
 *               V x H x (world - 1) / world per rank (1.2 GB at M3 width in BF16, world 2) and
 *               as much of every decode step's reads.
 *   norms       replicated. The vision tower and MTP modules are not in the plan (replicated).
 * Element counts are parameters (not bytes): the printer shows BF16 bytes (2 per parameter). */
#ifndef M3_ENGINE_PARALLEL_H
#define M3_ENGINE_PARALLEL_H

#include <stdint.h>
#include <stdio.h>

#include "base/status.h"
#include "io/config.h"

enum { M3_PARALLEL_MAX_RANKS = 64 };

typedef struct {
  int begin, end; /* [begin, end) */
} m3_range;

/* Parameters one rank holds for one layer of each kind (and once for the vocabulary). */
typedef struct {
  int64_t attn_full, attn_sparse; /* a full / a sparse (MSA) attention block, with its norms */
  int64_t dense_mlp, moe;         /* a dense MLP / an MoE block (router, routed, shared) */
  int64_t embed, lm_head;         /* lm_head 0 when tied to the embedding */
  int64_t final_norm;
  int64_t total;                  /* over every layer of the config */
} m3_rank_params;

typedef struct {
  int rank, tp_rank, ep_rank;
  m3_range q_heads;     /* query heads: q_proj rows / o_proj columns in units of head_dim */
  m3_range kv_heads;    /* KV heads held (one when replicated) */
  m3_range index_heads; /* index q heads: the KV groups of kv_heads */
  m3_range dense_cols;  /* dense MLP intermediate columns */
  m3_range experts;     /* routed experts held */
  m3_range expert_cols; /* intermediate columns of each held expert */
  m3_range shared_cols; /* shared expert intermediate columns */
  m3_range vocab;       /* embedding and lm_head rows */
  m3_rank_params params;
} m3_rank_plan;

typedef enum { M3_GROUP_TP, M3_GROUP_WORLD } m3_group;

/* One collective of a decode step. */
typedef struct {
  const char *what;        /* "all-reduce after o_proj", ... */
  m3_group group;          /* over the ranks of a TP group or over all ranks */
  int ranks;               /* how many ranks take part */
  int per_step;            /* how many times one forward pass runs it (e.g. once per layer) */
  int64_t bytes_per_token; /* payload per decode token, per call (float32 activations) */
} m3_collective;

enum { M3_PARALLEL_MAX_COLLECTIVES = 8 };

typedef struct {
  int tp, ep, world;
  int kv_replicas; /* ranks holding each KV head: 1, or tp / nkv when tp > nkv */
  int full_layers, sparse_layers, dense_layers, moe_layers;
  m3_rank_plan ranks[M3_PARALLEL_MAX_RANKS];
  m3_collective collectives[M3_PARALLEL_MAX_COLLECTIVES];
  int n_collectives;
} m3_plan;

/* The plan for `tp` x `ep` ranks. A layout the model's sizes do not divide is M3_ERR_ARG naming
 * the option (--tp / --ep) and the size at fault. */
m3_status m3_parallel_plan(const m3_config *cfg, int tp, int ep, m3_plan *out);

/* The start-up report: one line per rank (heads, KV heads, experts, vocabulary rows, parameters
 * per layer kind) and the collectives of one decode step with their bytes per token. */
void m3_parallel_plan_print(const m3_plan *plan, FILE *f);

#endif
