/* tp_ranks.h: the multi-GPU harness that tests/gpu/test_tp.c and tests/gpu/bench_tp.c share
 * (issue 11): one thread and one CUDA backend per GPU (rank r on GPU r), one NCCL communicator
 * over every rank (and a peer-to-peer all-reduce group, backend/cuda/p2p.h, where the GPUs reach
 * each other's memory), and the layouts of the text model they run (engine/parallel.h: world rank =
 * ep_rank * tp + tp_rank; a TP group is the ranks of one ep_rank):
 *   1 x 1  the whole model on rank 0's GPU (the other ranks sit the job out);
 *   tp x 1 TP over every rank (the TP group is the world: both groups use the one communicator);
 *   1 x ep EP over every rank (TP groups of one rank: a TP all-reduce returns at once).
 * Layouts with TP groups smaller than the world would need communicators of their own and are
 * refused.
 *
 * The main thread hands one job to every rank thread at once (tp_run) and waits for all of them
 * up to a deadline. Failures are of two kinds:
 *   - before a collective (a load the layout does not divide, an allocation): every rank reports
 *     its status through tp_agree, so the ranks skip the case together and nobody is left waiting;
 *   - after a collective was issued (tp_must): a peer may already be blocked in its part of it, or
 *     in a transfer queued behind it, which no other thread can interrupt. The rank aborts its
 *     communicator and the process ends with a FATAL line naming the rank and what failed; the
 *     exit frees every GPU. A job past its deadline ends the process the same way (FATAL naming
 *     the job), so no hang outlives its deadline.
 * Not thread-safe beyond that: one main thread calls tp_start, tp_run and tp_stop. */
#ifndef M3_TESTS_GPU_TP_RANKS_H
#define M3_TESTS_GPU_TP_RANKS_H

#include <stdint.h>

#include "backend/backend.h"
#include "backend/cuda/collectives.h"
#include "backend/cuda/p2p.h"
#include "engine/kvcache.h"
#include "model/model.h"

enum { TP_MAX_RANKS = 8, TP_WAIT_MS = 60000 };

typedef struct {
  const char *name; /* "1 GPU", "TP2", "EP2" */
  int tp, ep;       /* tp * ep ranks: 1, or every rank of the harness */
} tp_layout;

/* What a rank's all-reduce hook sums over. */
typedef struct {
  m3_nccl *group[2]; /* [m3_reduce_group]: the communicator, or NULL for a group of one rank */
  m3_p2p *p2p;       /* sums what fits peer to peer (and fuses the add + norm), or NULL */
  int reduce;        /* 0: return without summing (a step's cost without its collectives) */
  /* [m3_reduce_group] calls and floats since zeroed, counted when the model calls the hook: a
   * replayed CUDA graph runs its recorded collectives without calling it. */
  uint64_t calls[2], floats[2];
} tp_hook;

typedef struct {
  int rank, nranks; /* world rank = the GPU index */
  m3_backend *be;
  m3_nccl *comm;    /* over every rank of the harness; NULL with one */
  m3_p2p *p2p;      /* likewise, or NULL where the GPUs have no peer access */
  tp_hook hook;     /* of the one model attached on this rank (tp_attach) */
} tp_rank;

typedef void (*tp_job)(tp_rank *r, void *arg);

/* Starts n rank threads (n <= GPUs), each creating its CUDA backend, then the communicator over
 * them. A failure (printed, naming the rank) leaves nothing running. */
m3_status tp_start(int n);
/* Runs job(rank, arg) on every rank's thread and returns when all have returned. A job still
 * running after timeout_s seconds ends the process (FATAL naming `what`). */
void tp_run(const char *what, int timeout_s, tp_job job, void *arg);
/* Frees the communicators and backends and joins the threads. */
void tp_stop(void);

/* ---- inside a job ---- */

int tp_layout_ranks(const tp_layout *L);
int tp_in_layout(const tp_rank *r, const tp_layout *L);

/* Waits until every rank of L has called it (nothing in a one-rank layout). Every rank of L must
 * call it the same number of times. */
void tp_sync(const tp_layout *L);

typedef struct {
  int rank;       /* the first rank of L whose status was not M3_OK */
  m3_status status;
  char message[512];
} tp_failure;

/* Every rank of L: 1 when st is M3_OK on every rank of L, else 0 and *why (if not NULL) the
 * first failing rank, its status and message. A barrier: call it where all ranks of L do. */
int tp_agree(const tp_rank *r, const tp_layout *L, m3_status st, tp_failure *why);

/* After a collective was issued: st != M3_OK aborts the rank's communicator and ends the process
 * with "FATAL: rank R: what: message". */
void tp_must(const tp_rank *r, m3_status st, const char *what);

/* Rank r's share of the model in dir for L (the whole model for 1 x 1). */
m3_status tp_load(const tp_rank *r, const tp_layout *L, const char *dir, m3_model **out);

/* Makes m's forwards call the rank's hook over L's groups (its counters zeroed): reduce 1 sums
 * through NCCL, 0 leaves every buffer as it is; flags as m3_model_set_all_reduce's. */
m3_status tp_attach(tp_rank *r, const tp_layout *L, m3_model *m, int reduce, unsigned flags);
/* tp_attach with reduce 1, the sums that fit going peer to peer and the fused add + norm hook set
 * (as the engine's ranks run them); M3_ERR_UNSUPPORTED without a p2p group. */
m3_status tp_attach_p2p(tp_rank *r, const tp_layout *L, m3_model *m, unsigned flags);

/* Waits for everything issued on the rank's stream, collectives included, up to TP_WAIT_MS (a
 * peer that never issued its part fails it); M3_OK at once without a communicator. */
m3_status tp_wait(tp_rank *r);

/* ---- sequences ---- */

/* n sequences of one model, each with pages of its own in one float32 KV cache sized from the
 * model's config (a rank's narrowed one). */
typedef struct {
  m3_model *m;
  m3_kv_cache *cache;
  int n, max_T;
  m3_kv_seq *seqs;    /* [n] */
  m3_kv_view *views;  /* [n, num_layers] */
  m3_model_seq *segs; /* [n] */
  int32_t *pos;       /* [n, max_T] */
} tp_batch;

/* Room for n sequences of up to tokens_each tokens, forwards of up to max_T tokens each. */
m3_status tp_batch_open(m3_model *m, int n, int tokens_each, int max_T, tp_batch *b);
/* One forward: sequence i takes ids[i * T, +T) at its next positions. greedy NULL: logits
 * [n * n_logits, V] (host) gets the last n_logits rows of each (NULL with n_logits 0); else
 * greedy [n * n_logits] gets their argmax (m3_model_forward_batch_argmax, logits its buffer). */
m3_status tp_batch_forward(tp_batch *b, const int32_t *ids, int T, int n_logits, float *logits,
                           int32_t *greedy);
/* Releases every sequence's pages (the cache stays). */
void tp_batch_reset(tp_batch *b);
void tp_batch_close(tp_batch *b);

/* prompt[P] at once (logits of every position), then `steps` greedy single-token steps, each
 * feeding the argmax of the previous row: logits [P + steps, V], tokens [steps] the fed ids. */
m3_status tp_greedy(m3_model *m, const int32_t *prompt, int P, int steps, float *logits,
                    int32_t *tokens);

/* The first maximum (ties to the lower id, as the sampler's argmax). */
int tp_argmax(const float *row, int n);
double tp_now_s(void);

#endif
