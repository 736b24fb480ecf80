/* p2p.h: all-reduces among the GPUs of one process through peer access (issue 11), for the
 * sizes of a decode step, where NCCL's per-call cost dominates (10.8 us for one 6144-float row
 * on 2 x H200, against a few us here), and fused with what follows them in the model: the
 * residual add and the next Gemma RMSNorm, one kernel instead of an all-reduce and an
 * add_rmsnorm.
 *
 * One-shot, by one of two protocols; either way every rank sums the ranks' parts in rank order
 * and gets the same bits (for two ranks the bits of NCCL's sum, a + b being b + a). Block b of a
 * launch handles row b (a norm needs the whole row) or chunk b, and meets only block b of the
 * peers, so there is no grid-wide barrier; launches stay within the SMs so that every block of a
 * launch is resident.
 *   push (launches of up to 16 blocks: decode steps): each rank writes its part into every
 *     peer's inbox as lines that carry the call's epoch beside the values, and reads the peers'
 *     parts from its own inbox once their lines show the epoch: no fence, no flag, no read
 *     across the link (p2p.cu says why a line arrives whole).
 *   staging (larger launches): each rank copies its part into its own staging buffer, tells
 *     every peer so through a flag it writes into the peer's memory, waits for the peers' flags,
 *     then reads every peer's staging: half the bytes of push on the link.
 * M3_P2P_PUSH=0 takes staging for every launch (to compare the two).
 *
 * Calls carry no host state: a launch's epoch (1, 2, ... per group, the same on every rank since
 * every rank makes the same calls) lives in device memory and the last block of a launch
 * advances it. So the calls record into CUDA graphs and replay, and one rank may record a step
 * while another runs it op by op. Staging alternates between two slots by epoch parity: a rank in
 * launch e has passed launch e - 1's barrier, so every peer has finished launch e - 2, the last
 * reader of the slot e overwrites.
 *
 * Failures: a peer that never arrives (its thread failed before the call) would leave the kernel
 * spinning; m3_p2p_abort (any thread) makes every spinning block give up, and a block also gives
 * up after M3_P2P_DEADLINE_S. Either way the results of that call are wrong and the group is
 * dead: m3_p2p_check reports it, and later calls fail. Not reentrant per rank: one thread issues a
 * rank's calls, on its backend's stream, in the same order on every rank. */
#ifndef M3_BACKEND_CUDA_P2P_H
#define M3_BACKEND_CUDA_P2P_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "backend/backend.h"
#include "base/status.h"

enum { M3_P2P_MAX_RANKS = 8, M3_P2P_DEADLINE_S = 10 };

typedef struct m3_p2p_group m3_p2p_group;
typedef struct m3_p2p m3_p2p;

/* The shared state of nranks ranks (engine thread). */
m3_status m3_p2p_group_create(int nranks, m3_p2p_group **out);
/* After every rank left (NULL is ignored). */
void m3_p2p_group_free(m3_p2p_group *g);

/* Rank `rank` on CUDA backend be, from the thread that issues be's ops: allocates its staging,
 * inbox and flags (16 MB + 4 MB per rank of the group) on be's GPU and publishes them. */
m3_status m3_p2p_join(m3_p2p_group *g, int rank, m3_backend *be, m3_p2p **out);
/* Once every rank has joined: enables peer access from this rank's GPU to every other rank's.
 * M3_ERR_UNSUPPORTED naming the pair when one GPU cannot reach the other. */
m3_status m3_p2p_connect(m3_p2p *p);
/* Frees the rank's buffers, on its thread, when no call of the group runs (NULL is ignored). */
void m3_p2p_leave(m3_p2p *p);

/* Whether a call of this size runs here (the same answer on every rank): add_norm of rows x cols
 * (cols up to 16384), a sum of n floats (up to 16M: beyond, a ring such as NCCL's moves fewer
 * bytes per rank than one-shot's every-rank-reads-every-part). */
int m3_p2p_fits_add_norm(const m3_p2p *p, int rows, int cols);
int m3_p2p_fits_sum(const m3_p2p *p, size_t n);

/* buf[0, n) = its sum over the ranks, in place. */
m3_status m3_p2p_all_reduce_sum(m3_p2p *p, float *buf, size_t n);
/* x [rows, cols] += the sum over the ranks of part [rows, cols]; then, when norm is not NULL,
 * out [rows, cols] = GemmaRMSNorm(x, norm, eps), bit for bit the backend's add_rmsnorm of x and
 * the summed part. part is only read. */
m3_status m3_p2p_add_norm(m3_p2p *p, const float *part, float *x, const m3_tensor *norm,
                          float eps, int rows, int cols, float *out);

/* Makes every rank's spinning blocks give up and fails later calls; any thread. */
void m3_p2p_abort(m3_p2p_group *g);
/* M3_OK, or why the group's calls stopped (aborted, a peer past the deadline): read once the
 * calls issued so far have finished (after the step's stream work). */
m3_status m3_p2p_check(const m3_p2p_group *g);

#ifdef __cplusplus
}
#endif

#endif
