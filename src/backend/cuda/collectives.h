/* collectives.h: NCCL collectives between the CUDA backends of several GPUs (issue 11), the layer
 * the tensor- and expert-parallel model runs on (engine/parallel.h says which collectives).
 *
 * One m3_nccl is one rank: one CUDA backend (one GPU) in a communicator of nranks. The engine's
 * model is one thread per GPU: each rank's calls come from its own thread and run on its
 * backend's stream, in issue order with that backend's ops (a matmul, then the all-reduce of its
 * output, then the next op, with no host wait between). A thread that drives several ranks
 * brackets their calls with m3_nccl_group_begin / m3_nccl_group_end, which issues them together
 * (NCCL would otherwise wait inside the first rank's call for the others).
 *
 * Set-up: one rank makes an id (m3_nccl_new_id); every rank of the communicator gets it (the
 * threads of one process share it; other nodes receive it through engine/rendezvous.h, whose blob
 * is id.bytes) and calls m3_nccl_init. Init blocks until all nranks ranks have called it, so make
 * everything that can fail first (the backends) and start the init only when every rank can.
 *
 * m3_nccl_new_id and m3_nccl_init set NCCL_NVLS_ENABLE=0 in the environment first, once per
 * process, unless it is set: NVLink multicast (NVLS) must stay off on the H200 machines.
 *
 * Failures are m3_status with one line naming the operation, the rank and NCCL's error string.
 * A collective fails immediately only on what NCCL checks when it is issued; a failure while it
 * runs (a peer that died, a network error) surfaces in m3_nccl_wait. After any failure call
 * m3_nccl_abort on every rank (never waits); m3_nccl_destroy waits a bounded time and aborts
 * instead when the communicator does not go quiet. Built with NCCL only (M3_HAVE_NCCL). */
#ifndef M3_BACKEND_CUDA_COLLECTIVES_H
#define M3_BACKEND_CUDA_COLLECTIVES_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" { /* the C headers of the rest of m3, as in cuda_internal.h */
#endif

#include "backend/backend.h"
#include "base/status.h"

/* ncclUniqueId's size: an opaque blob that says where rank 0's bootstrap listens. */
enum { M3_NCCL_ID_BYTES = 128 };

typedef struct {
  uint8_t bytes[M3_NCCL_ID_BYTES];
} m3_nccl_id;

typedef struct m3_nccl m3_nccl;

/* A new communicator's id (on one rank of it: node 0's main thread). */
m3_status m3_nccl_new_id(m3_nccl_id *id);

/* Rank `rank` of `nranks` on backend `be` (a CUDA backend: m3_backend_cuda_create), from the
 * thread that issues that backend's ops; makes the backend's GPU current on that thread. Blocks
 * until every rank has called it (inside a group: until m3_nccl_group_end). */
m3_status m3_nccl_init(const m3_nccl_id *id, int nranks, int rank, m3_backend *be, m3_nccl **out);

/* Issue the calls between them as one (a thread driving several ranks: the init or a collective
 * of every rank). Groups nest; the outermost end issues them and reports their failures. */
m3_status m3_nccl_group_begin(void);
m3_status m3_nccl_group_end(void);

/* buf[0, n) = the sum over the ranks of their buf[0, n), float32, in place, on every rank.
 * buf: backend memory of this rank's backend. */
m3_status m3_nccl_all_reduce_sum(m3_nccl *c, float *buf, size_t n);

/* all[r * part_bytes, +part_bytes) = rank r's part, on every rank. all [nranks * part_bytes];
 * part may be all + rank * part_bytes (in place). */
m3_status m3_nccl_all_gather(m3_nccl *c, const void *part, void *all, size_t part_bytes);

/* buf[0, bytes) = rank root's buf, on every rank, in place. */
m3_status m3_nccl_broadcast(m3_nccl *c, void *buf, size_t bytes, int root);

/* Waits until every collective and op issued on this rank's stream has finished, up to
 * timeout_ms (> 0). A failure of a collective while it ran, a CUDA failure of the stream, or the
 * deadline (a peer that never issued its part) aborts the communicator and is an error. */
m3_status m3_nccl_wait(m3_nccl *c, int timeout_ms);

/* Stops this rank's running collectives and frees the communicator without waiting for the other
 * ranks; later calls on c fail. Any thread may call it, also while the rank's own thread waits
 * on its stream (a peer that failed mid-step: the abort ends the collective it waits for). Then
 * m3_nccl_destroy(c) frees c itself. */
void m3_nccl_abort(m3_nccl *c);

/* Frees c (NULL is ignored), before its backend is destroyed. A communicator that does not
 * finish its work within a few seconds is aborted instead of waited for. */
void m3_nccl_destroy(m3_nccl *c);

#ifdef __cplusplus
}
#endif

#endif
