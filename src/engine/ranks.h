/* ranks.h: the tensor- and expert-parallel ranks of one process, or of one node of several
 * (issue 11, engine/parallel.h says what each rank holds), driven by the engine's thread.
 *
 * Rank r = ep_rank * tp + tp_rank of world = tp * ep. Rank 0 is the engine's own backend and model,
 * so that with one rank the engine is exactly what it always was. Ranks 1..world-1 each own a
 * backend, their share of the model (model/shard.c), KV storage and a thread that runs what the
 * engine thread posts to it; every backend op of a rank runs on that rank's thread (a CUDA backend
 * works on the GPU current on the calling thread).
 *
 * KV cache: the page bookkeeping (allocation, reference counts, prefix cache, block tables) is
 * rank 0's m3_kv_cache alone. Every other rank holds storage of the same page count in its
 * narrowed config (its KV heads only) and reads the same block tables: each forward hands it the
 * batch's tables (uploaded to its device on a device backend), and each page copy rank 0's cache
 * makes (copy-on-write, its only page copy) is replayed on every rank before the forward after it.
 *
 * A step: the engine thread posts the batch, runs rank 0's forward (with the logits), and waits
 * for the others, which run the same forward without returning logits (every rank computes the
 * same hidden state; with lm_head split over the vocabulary each still computes its slice for
 * rank 0's gather, or on a greedy step only its slice's best candidate per row, with a replicated
 * one they skip the head). All ranks run the same forwards in the same order, so their
 * all-reduces pair up:
 *   cpu   world CPU backends, the worker threads split between them, summing on the host between
 *         barriers (a correctness mode that CI runs: every rank's math, no speed-up);
 *   cuda  "cuda:K": rank r on GPU K + r, summing through NCCL: one world communicator, and one per
 *         TP group when tp > 1 and ep > 1 (a build without NCCL refuses world > 1); where the
 *         GPUs reach each other's memory and the sums span the world (tp or ep alone, one node),
 *         the sums of up to 64 MB go peer to peer instead, fused with the residual add and norm
 *         after them (backend/cuda/p2p.h; M3_P2P=0: NCCL alone), and every rank then records
 *         and replays its decode steps as CUDA graphs.
 * The step's status is the first failure of any rank; a failing rank releases the others (the
 * host barriers; the peer-to-peer calls, then the NCCL communicators, aborted), so the step ends.
 *
 * Several nodes (--nnodes N, CUDA with NCCL only): node n hosts the world / N consecutive ranks
 * from n * world / N, its local rank i on GPU K + i of its own "cuda:K". Node 0 is the engine as
 * above (its rank 0 the engine's model). Each other node runs m3_ranks_follow: all its ranks on
 * threads, its main thread the link to node 0 (engine/node_link.h). Set-up: the rendezvous
 * carries the layout, node 0's KV page count and dtype and the NCCL ids; each node answers
 * whether it accepts them, node 0 tells them all to go on, and every rank of every node makes the
 * communicators (global rank, global world) and its storage; each node reports its set-up. A
 * step: node 0's link thread sends every node the step (batch, block tables, page copies) as
 * node 0's ranks run theirs, then waits up to M3_NODE_STEP_TIMEOUT_MS for each node's answer,
 * which comes when the node's ranks are done. Failures: a node's failed answer, its silence past
 * the deadline or its closed link fails node 0's step naming the node and aborts node 0's
 * communicators (as a failing rank does); a failure on node 0 sends ABORT to the nodes still
 * running the step, which abort theirs (ranks that wait in a collective for a peer that will
 * never join would otherwise hang). Closing the engine sends QUIT; a node also ends when node 0
 * closes the link between steps. */
#ifndef M3_ENGINE_RANKS_H
#define M3_ENGINE_RANKS_H

#include <stddef.h>

#include "base/status.h"
#include "engine/kvcache.h"
#include "m3.h"
#include "model/model.h"

typedef struct m3_ranks m3_ranks;

/* tp and ep of the options as sizes (0 counts as 1). */
void m3_ranks_layout(const m3_engine_options *o, int *tp, int *ep);

/* For world > 1, before anything loads: the layout against the config in model_dir
 * (m3_parallel_plan: sizes the ranks do not divide are M3_ERR_ARG naming --tp / --ep), and the
 * options that do not combine with several ranks yet (speculative decoding; a CUDA build without
 * NCCL), refused naming the flags; with nnodes > 1 (also for world 1) the node layout: nnodes
 * dividing the world, a CUDA device, a build with NCCL, master_addr and node_rank < nnodes. */
m3_status m3_ranks_check(const char *model_dir, const m3_engine_options *o);

/* Before the first backend of the process is made: where the ranks will sum peer to peer
 * (backend/cuda/p2p.h), has CUDA load every kernel when a GPU's context is made (unless
 * CUDA_MODULE_LOADING is set already): a kernel loaded at its first launch waits for the
 * context's running kernels, and a rank's peer-to-peer call spins until its peers' calls run;
 * ~1.5 s more per start on an H200, against a possible stall of the step. */
void m3_ranks_before_backends(const m3_engine_options *o);

/* CPU workers each rank's backend gets: `threads` (0 = one per core) split over world ranks. */
int m3_ranks_threads(int threads, int world);

/* Starts the threads of ranks 1..world-1 of o's layout: each creates its backend (the device of
 * rank r, see above) and loads its share of model_dir with `load` (its tp/ep fields set per rank),
 * alongside the caller, which loads rank 0. Failures surface in m3_ranks_connect. */
m3_status m3_ranks_start(const char *model_dir, const m3_engine_options *o,
                         const m3_model_load_options *load, m3_ranks **out);

/* After rank 0's model and KV cache exist: waits for the other ranks' loads, connects the ranks
 * (host barriers, or NCCL communicators made on each rank's thread, rank 0's on the caller's),
 * gives each rank storage of cache0's page count, and hooks rank 0's model (all-reduce) and cache
 * (page copies) up to the others. */
m3_status m3_ranks_connect(m3_ranks *r, m3_model *model0, m3_kv_cache *cache0);

/* A node other than 0 (o->node_rank >= 1): starts and loads this node's ranks (all on threads),
 * joins node 0, then runs node 0's steps until it quits or closes the link (M3_OK) or the link
 * breaks (its error); frees everything before returning. */
m3_status m3_ranks_follow(const char *model_dir, const m3_engine_options *o,
                          const m3_model_load_options *load);

/* Stops and frees the ranks (waits for a load still running); NULL is ignored. */
void m3_ranks_free(m3_ranks *r);

/* One step on every rank: the batch (host structs; entry i's pages are kv[i]'s block table in
 * rank 0's cache) goes to ranks 1..world-1, which run it without logits, while run0(user) runs
 * rank 0's forward on the calling thread. argmax: run0 runs m3_model_forward_batch_argmax, and so
 * do the other ranks (else m3_model_forward_batch), so that a split head's all-reduces pair up.
 * Returns when every rank is done: the first failure. */
m3_status m3_ranks_run(m3_ranks *r, const m3_model_seq *batch, const m3_kv_seq *const *kv, int n,
                       int argmax, m3_status (*run0)(void *user), void *user);

#endif
