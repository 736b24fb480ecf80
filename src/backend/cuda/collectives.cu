/* collectives.cu: NCCL communicators and collectives on the CUDA backends' streams
 * (collectives.h). Blocking communicators: an issued collective returns once queued on the
 * stream; only m3_nccl_wait waits, and it never waits past its deadline. */
#include <nccl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/cuda/collectives.h"
#include "backend/cuda/cuda_internal.h"

static_assert(sizeof(ncclUniqueId) == M3_NCCL_ID_BYTES, "m3_nccl_id holds an ncclUniqueId");

/* m3_nccl_destroy's bound on the work still queued: far above a decode step's. */
enum { DESTROY_WAIT_MS = 10000 };
/* m3_nccl_wait polls without sleeping this long (a decode step's collective takes tens of
 * microseconds), then sleeps between polls so that a long wait does not take a core. */
enum { WAIT_SPIN_MS = 2, WAIT_SLEEP_US = 100 };

struct m3_nccl {
  ncclComm_t comm;     /* NULL once aborted; read and cleared atomically (comm_of, m3_nccl_abort) */
  cudaStream_t stream; /* the backend's: collectives run in order with its ops */
  int rank, nranks;
};

static pthread_once_t env_once = PTHREAD_ONCE_INIT;

static void disable_nvls(void) { setenv("NCCL_NVLS_ENABLE", "0", 0); }

/* NCCL reads its environment when it first initializes; pthread_once holds every other caller
 * until the variable is set, so no rank's NCCL call reads the environment while it changes. */
static void nccl_env(void) { pthread_once(&env_once, disable_nvls); }

/* One line: the operation, the rank, NCCL's error string and its last message (which names the
 * cause: a peer, a device, an argument). */
static m3_status nccl_fail(const m3_nccl *c, ncclComm_t comm, const char *op, ncclResult_t r) {
  const char *detail = ncclGetLastError(comm);
  m3_status st = r == ncclInvalidArgument || r == ncclInvalidUsage ? M3_ERR_ARG : M3_ERR_IO;
  return m3_fail(st, "nccl %s (rank %d of %d): %s%s%s", op, c->rank, c->nranks,
                 ncclGetErrorString(r), detail && *detail ? ": " : "", detail ? detail : "");
}

/* The communicator, or NULL once aborted. m3_nccl_abort may run on another thread than the rank's
 * (engine/ranks.c aborts every rank's when one fails mid-step), as NCCL's fault handling intends:
 * the pointer is taken once per call, and the abort clears it before it frees the communicator. */
static ncclComm_t comm_of(m3_nccl *c) { return __atomic_load_n(&c->comm, __ATOMIC_ACQUIRE); }

static m3_status aborted(const m3_nccl *c, const char *op) {
  return m3_fail(M3_ERR_ARG, "nccl %s (rank %d of %d): the communicator was aborted", op, c->rank,
                 c->nranks);
}

extern "C" m3_status m3_nccl_new_id(m3_nccl_id *id) {
  nccl_env();
  ncclUniqueId uid;
  ncclResult_t r = ncclGetUniqueId(&uid);
  if (r != ncclSuccess)
    return m3_fail(M3_ERR_IO, "nccl get_unique_id: %s: %s", ncclGetErrorString(r),
                   ncclGetLastError(NULL));
  memcpy(id->bytes, &uid, sizeof uid);
  return M3_OK;
}

extern "C" m3_status m3_nccl_init(const m3_nccl_id *id, int nranks, int rank, m3_backend *be,
                                  m3_nccl **out) {
  *out = NULL;
  if (nranks < 1 || rank < 0 || rank >= nranks)
    return m3_fail(M3_ERR_ARG, "nccl init: rank %d of %d is out of range", rank, nranks);
  if (!be || strcmp(be->ops->name, "cuda") != 0)
    return m3_fail(M3_ERR_ARG, "nccl init (rank %d of %d): backend '%s' is not a CUDA backend",
                   rank, nranks, be ? be->ops->name : "(none)");
  nccl_env();
  cuda_backend *cb = cuda_of(be);
  /* NCCL binds the communicator to the current device; the backend's ops need it current too. */
  cudaError_t e = cudaSetDevice(cb->device);
  if (e != cudaSuccess)
    return m3_fail(M3_ERR_IO, "nccl init (rank %d of %d): cudaSetDevice(%d): %s", rank, nranks,
                   cb->device, cudaGetErrorString(e));
  m3_nccl *c = (m3_nccl *)calloc(1, sizeof *c);
  if (!c) return m3_fail(M3_ERR_NOMEM, "nccl init: out of memory");
  c->stream = cb->stream;
  c->rank = rank;
  c->nranks = nranks;
  ncclUniqueId uid;
  memcpy(&uid, id->bytes, sizeof uid);
  ncclResult_t r = ncclCommInitRank(&c->comm, nranks, uid, rank);
  if (r != ncclSuccess) {
    m3_status st = nccl_fail(c, c->comm, "init", r);
    m3_nccl_abort(c); /* a communicator left half made is freed without waiting */
    free(c);
    return st;
  }
  *out = c;
  return M3_OK;
}

extern "C" m3_status m3_nccl_group_begin(void) {
  ncclResult_t r = ncclGroupStart();
  if (r != ncclSuccess)
    return m3_fail(M3_ERR_IO, "nccl group_begin: %s", ncclGetErrorString(r));
  return M3_OK;
}

extern "C" m3_status m3_nccl_group_end(void) {
  ncclResult_t r = ncclGroupEnd();
  if (r != ncclSuccess) {
    const char *detail = ncclGetLastError(NULL);
    return m3_fail(r == ncclInvalidArgument || r == ncclInvalidUsage ? M3_ERR_ARG : M3_ERR_IO,
                   "nccl group_end: %s%s%s", ncclGetErrorString(r), detail && *detail ? ": " : "",
                   detail ? detail : "");
  }
  return M3_OK;
}

extern "C" m3_status m3_nccl_all_reduce_sum(m3_nccl *c, float *buf, size_t n) {
  ncclComm_t comm = comm_of(c);
  if (!comm) return aborted(c, "all_reduce_sum");
  ncclResult_t r = ncclAllReduce(buf, buf, n, ncclFloat32, ncclSum, comm, c->stream);
  return r == ncclSuccess ? M3_OK : nccl_fail(c, comm, "all_reduce_sum", r);
}

extern "C" m3_status m3_nccl_all_gather(m3_nccl *c, const void *part, void *all,
                                        size_t part_bytes) {
  ncclComm_t comm = comm_of(c);
  if (!comm) return aborted(c, "all_gather");
  ncclResult_t r = ncclAllGather(part, all, part_bytes, ncclUint8, comm, c->stream);
  return r == ncclSuccess ? M3_OK : nccl_fail(c, comm, "all_gather", r);
}

extern "C" m3_status m3_nccl_broadcast(m3_nccl *c, void *buf, size_t bytes, int root) {
  ncclComm_t comm = comm_of(c);
  if (!comm) return aborted(c, "broadcast");
  if (root < 0 || root >= c->nranks)
    return m3_fail(M3_ERR_ARG, "nccl broadcast (rank %d of %d): root %d is out of range", c->rank,
                   c->nranks, root);
  ncclResult_t r = ncclBroadcast(buf, buf, bytes, ncclUint8, root, comm, c->stream);
  return r == ncclSuccess ? M3_OK : nccl_fail(c, comm, "broadcast", r);
}

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

extern "C" m3_status m3_nccl_wait(m3_nccl *c, int timeout_ms) {
  if (!comm_of(c)) return aborted(c, "wait");
  if (timeout_ms <= 0)
    return m3_fail(M3_ERR_ARG, "nccl wait (rank %d of %d): timeout %d ms must be positive",
                   c->rank, c->nranks, timeout_ms);
  const double start = now_ms();
  for (;;) {
    /* NCCL's own failure first: a collective whose peer failed may never finish on the stream. */
    ncclComm_t comm = comm_of(c);
    if (!comm) return aborted(c, "wait"); /* by another thread meanwhile */
    ncclResult_t async = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(comm, &async);
    if (r == ncclSuccess) r = async == ncclInProgress ? ncclSuccess : async;
    if (r != ncclSuccess) {
      m3_status st = nccl_fail(c, comm, "wait", r);
      m3_nccl_abort(c);
      return st;
    }
    cudaError_t q = cudaStreamQuery(c->stream);
    if (q == cudaSuccess) return M3_OK;
    double waited = now_ms() - start;
    if (q != cudaErrorNotReady || waited > timeout_ms) {
      m3_status st =
          q != cudaErrorNotReady
              ? m3_fail(M3_ERR_IO, "nccl wait (rank %d of %d): the stream failed: %s", c->rank,
                        c->nranks, cudaGetErrorString(q))
              : m3_fail(M3_ERR_IO, "nccl wait (rank %d of %d): not done after %d ms (a rank that "
                        "never issued its part of a collective?); aborted", c->rank, c->nranks,
                        timeout_ms);
      cudaGetLastError(); /* reported here, not by the backend's next launch check */
      m3_nccl_abort(c);
      return st;
    }
    if (waited > WAIT_SPIN_MS) {
      struct timespec nap = {0, WAIT_SLEEP_US * 1000};
      nanosleep(&nap, NULL);
    }
  }
}

extern "C" void m3_nccl_abort(m3_nccl *c) {
  if (!c) return;
  ncclComm_t comm = __atomic_exchange_n(&c->comm, (ncclComm_t)NULL, __ATOMIC_ACQ_REL);
  if (comm) ncclCommAbort(comm);
}

extern "C" void m3_nccl_destroy(m3_nccl *c) {
  if (!c) return;
  /* ncclCommDestroy waits for the communicator's work: only once it is known to have finished
   * (a failed wait has aborted it instead). */
  if (comm_of(c) && m3_nccl_wait(c, DESTROY_WAIT_MS) == M3_OK) ncclCommDestroy(c->comm);
  free(c);
}
