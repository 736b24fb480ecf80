/* p2p.cu: one-shot all-reduces through peer access, alone and fused with the residual add and
 * the Gemma RMSNorm (p2p.h says how the ranks meet and why the calls replay from graphs). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/norm_row.cuh"
#include "backend/cuda/p2p.h"

enum {
  ROW_FLOATS = 16384,  /* a block's row or chunk: the widest row add_norm takes */
  ROW_QUADS = ROW_FLOATS / 4,
  MAX_BLOCKS = 128,    /* blocks of one launch (fewer where a GPU has fewer SMs) */
  LL_BLOCKS = 16,      /* launches of up to this many blocks push their parts (below) */
  SUM_THREADS = 512,
  SPIN_CHECK = 64,     /* flag polls between looks at the abort word and the clock */
};
static const size_t SUM_MAX_FLOATS = (size_t)16 << 20;
/* The words the host and the kernels share (mapped host memory). */
/* WORD_RANK ..: where a block gave up at the deadline (for the error message). */
enum {
  WORD_ABORT, WORD_FAILURE, WORD_RANK, WORD_PEER, WORD_BLOCK, WORD_EPOCH, WORD_SEEN,
  WORD_PEER_DONE, N_WORDS
};
enum { FAILURE_NONE, FAILURE_ABORTED, FAILURE_DEADLINE };

struct m3_p2p_group {
  int nranks, joined;
  int *words;                          /* mapped host memory [N_WORDS] */
  float *staging[M3_P2P_MAX_RANKS];    /* each rank's [2 slots][MAX_BLOCKS][ROW_FLOATS] */
  uint4 *inbox[M3_P2P_MAX_RANKS];      /* each rank's [2 slots][nranks][LL_BLOCKS][ROW_QUADS][2] */
  uint32_t *flags[M3_P2P_MAX_RANKS];   /* each rank's [MAX_BLOCKS][M3_P2P_MAX_RANKS], then sync */
  int devices[M3_P2P_MAX_RANKS], sms[M3_P2P_MAX_RANKS];
};

struct m3_p2p {
  m3_p2p_group *g;
  int rank, blocks; /* blocks: per launch, the same on every rank (set by connect) */
  int push_blocks;  /* launches of up to this many blocks push (LL_BLOCKS; 0 with M3_P2P_PUSH=0) */
  cuda_backend *cb;
  int *words_dev;
};

static const size_t SLOT_FLOATS = (size_t)MAX_BLOCKS * ROW_FLOATS;
static const size_t FLAG_WORDS = (size_t)MAX_BLOCKS * M3_P2P_MAX_RANKS;

/* What a launch knows of the group: every rank's staging and flags, its own sync words
 * ([0] the last finished launch's epoch, [1] blocks of the current launch done). */
struct p2p_view {
  float *staging[M3_P2P_MAX_RANKS];
  uint4 *inbox[M3_P2P_MAX_RANKS];
  uint32_t *flags[M3_P2P_MAX_RANKS];
  uint32_t *sync;
  volatile int *words;
  int nranks, me;
};

__device__ __forceinline__ uint64_t now_ns(void) {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void store_release(uint32_t *p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t load_acquire(const uint32_t *p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

/* Whether a spinning thread should stop: the group was aborted, or some thread already gave up
 * at the deadline (its peers' waits then end at once instead of each taking the deadline). */
__device__ __forceinline__ int group_stopped(const p2p_view &a) {
  return a.words[WORD_ABORT] || a.words[WORD_FAILURE] != FAILURE_NONE;
}

/* Whether a wait that started at `start` has taken longer than M3_P2P_DEADLINE_S. */
__device__ __forceinline__ int past_deadline(uint64_t start) {
  return now_ns() - start > (uint64_t)M3_P2P_DEADLINE_S * 1000000000ull;
}

/* A wait past the deadline: where it was (for m3_p2p_check's message), then the failure. */
__device__ void report_deadline(const p2p_view &a, int peer, int b, uint32_t e, uint32_t seen) {
  a.words[WORD_RANK] = a.me;
  a.words[WORD_PEER] = peer;
  a.words[WORD_BLOCK] = b;
  a.words[WORD_EPOCH] = (int)e;
  a.words[WORD_SEEN] = (int)seen;
  a.words[WORD_PEER_DONE] = (int)load_acquire(a.flags[peer] + FLAG_WORDS);
  __threadfence_system();
  a.words[WORD_FAILURE] = FAILURE_DEADLINE;
}

/* Thread 0 of block b: tells every peer that this rank's part of block b at epoch e is in its
 * staging, then waits until every peer said the same. 0 when it gave up (aborted, deadline). */
__device__ int meet_peers(const p2p_view &a, int b, uint32_t e) {
  __threadfence_system(); /* the block's staging writes (ordered before by the barrier) first */
  for (int r = 0; r < a.nranks; r++)
    if (r != a.me) store_release(a.flags[r] + (size_t)b * M3_P2P_MAX_RANKS + a.me, e);
  const uint64_t start = now_ns();
  for (int r = 0; r < a.nranks; r++) {
    if (r == a.me) continue;
    const uint32_t *flag = a.flags[a.me] + (size_t)b * M3_P2P_MAX_RANKS + r;
    for (unsigned i = 1; (int32_t)(load_acquire(flag) - e) < 0; i++) {
      if (i % SPIN_CHECK) continue;
      if (group_stopped(a)) return 0;
      if (past_deadline(start)) {
        report_deadline(a, r, b, e, load_acquire(flag));
        return 0;
      }
    }
  }
  return 1;
}

/* Columns [c, c + 4) of a peer's staging row, fetched again from its memory (not from a cache
 * line of two launches ago: the slots alternate). */
__device__ __forceinline__ void load_peer_quad(const float *row, int64_t c, int n, int vec, float v[4]) {
  if (vec) {
    const float4 f = __ldcv((const float4 *)(row + c));
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
  } else {
    for (int i = 0; i < 4; i++) v[i] = c + i < n ? __ldcv(row + c + i) : 0.0f;
  }
}

/* ---- the push protocol (launches of up to LL_BLOCKS blocks) ----
 * The barrier above costs a system-scope fence, a flag's trip to the peer and then a read of the
 * peer's staging across the link: about 9 us a call on 2 x H200, most of a batch-1 step's
 * collective time. Pushing instead, each rank writes its part straight into every peer's inbox
 * as 16-byte lines of two values and two copies of the epoch ({v0, e, v1, e}, NCCL's "LL"
 * layout): a line arrives whole, so a reader that sees the epoch in both flag words of a line
 * has its values, with no fence, no flag and no read across the link. Twice the bytes, which
 * small calls do not notice. A quad of 4 columns is two lines; the inbox of rank q holds, per
 * epoch parity, sender, block and quad, those two lines. The slot argument of p2p.h holds for
 * the inboxes: a sender writes launch e + 2 only after its peers pushed launch e + 1, which each
 * did after finishing launch e, its last read of that slot. */
__device__ __forceinline__ uint4 *inbox_quad(const p2p_view &a, int owner, int sender, int b,
                                             uint32_t e, int64_t q) {
  const size_t line = ((((size_t)(e & 1) * a.nranks + sender) * LL_BLOCKS + b) * ROW_QUADS + q) * 2;
  return a.inbox[owner] + line;
}

__device__ __forceinline__ void push_line(uint4 *p, float v0, float v1, uint32_t e) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p),
               "r"(__float_as_uint(v0)), "r"(e), "r"(__float_as_uint(v1)), "r"(e)
               : "memory");
}

__device__ __forceinline__ uint4 peek_line(const uint4 *p) {
  uint4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}

__device__ __forceinline__ int lines_at(const uint4 &l0, const uint4 &l1, uint32_t e) {
  return l0.y == e && l0.w == e && l1.y == e && l1.w == e;
}

/* Quad q of block b that `sender` pushed to this rank at epoch e, waited for; zeros when the
 * wait gave up (the call's results are then wrong and m3_p2p_check says why). */
__device__ void pulled_quad(const p2p_view &a, int sender, int b, uint32_t e, int64_t q, float v[4]) {
  const uint4 *p = inbox_quad(a, a.me, sender, b, e, q);
  uint4 l0 = peek_line(p), l1 = peek_line(p + 1);
  if (!lines_at(l0, l1, e)) {
    const uint64_t start = now_ns();
    for (unsigned i = 1;; i++) {
      l0 = peek_line(p), l1 = peek_line(p + 1);
      if (lines_at(l0, l1, e)) break;
      if (i % SPIN_CHECK) continue;
      if (!group_stopped(a) && past_deadline(start))
        report_deadline(a, sender, b, e, l0.y);
      if (group_stopped(a)) {
        v[0] = v[1] = v[2] = v[3] = 0.0f;
        return;
      }
    }
  }
  v[0] = __uint_as_float(l0.x), v[1] = __uint_as_float(l0.z);
  v[2] = __uint_as_float(l1.x), v[3] = __uint_as_float(l1.z);
}

/* The sum over the ranks, in rank order, of columns [c, c + 4) of the block's row: this rank's
 * from its own part, the others' from their staging at `off` (PUSH 0) or from this rank's inbox
 * (PUSH 1). `a` points at the kernel's __grid_constant__ parameter (no per-thread copy of the
 * pointer tables). */
template <int PUSH>
struct p2p_addend {
  static const bool add = true;
  const p2p_view *a;
  size_t off;
  const float *mine;
  int n, vec, b;
  uint32_t e;
  __device__ void load(int64_t c, float s[4]) const {
    float v[M3_P2P_MAX_RANKS][4];
#pragma unroll
    for (int r = 0; r < M3_P2P_MAX_RANKS; r++) {
      if (r >= a->nranks) break;
      if (r == a->me) load_quad(mine, c, n, vec, v[r]);
      else if (PUSH) pulled_quad(*a, r, b, e, c / 4, v[r]);
      else load_peer_quad(a->staging[r] + off, c, n, vec, v[r]);
    }
    for (int i = 0; i < 4; i++) s[i] = v[0][i];
#pragma unroll
    for (int r = 1; r < M3_P2P_MAX_RANKS; r++) {
      if (r >= a->nranks) break;
      for (int i = 0; i < 4; i++) s[i] = s[i] + v[r][i];
    }
  }
};

enum { MODE_SUM, MODE_ADD, MODE_ADD_NORM };

/* Block b: row b of part (MODE_SUM: chunk b of ROW_FLOATS floats, the last one ragged, of n) to the
 * peers (PUSH 0: into this rank's staging, then the meeting; PUSH 1: into their inboxes), then the
 * mode's output from the summed row:
 *   MODE_SUM      part row = the sum (in place)
 *   MODE_ADD      x row += the sum
 *   MODE_ADD_NORM x row += the sum, out row = GemmaRMSNorm(x row) (norm_row, as add_rmsnorm). */
template <int MODE, int PUSH>
__global__ void __launch_bounds__(512)
    p2p_kernel(const __grid_constant__ p2p_view a, float *part, float *x, cuda_weight w, int gain, float eps, int cols,
               size_t n, int vec, float *out) {
  /* No early start for the kernel after this one: its blocks would wait on this grid while
   * holding SM room that the other ranks' blocks of this call may need (ranks sharing a GPU),
   * and this grid's blocks wait for those. */
  dev_pdl_wait();
  __shared__ uint32_t epoch;
  __shared__ int met;
  const int b = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
  if (tid == 0) epoch = *(volatile uint32_t *)&a.sync[0] + 1;
  __syncthreads();
  const uint32_t e = epoch;
  const size_t row = (size_t)b * (MODE == MODE_SUM ? ROW_FLOATS : cols);
  const int len = MODE != MODE_SUM ? cols : n - row < ROW_FLOATS ? (int)(n - row) : ROW_FLOATS;
  const int v = vec && len % 4 == 0;
  const size_t off = (size_t)(e & 1) * SLOT_FLOATS + (size_t)b * ROW_FLOATS;
  float *mine = part + row, *stage = a.staging[a.me] + off;
  const int64_t nq = ((int64_t)len + 3) / 4;
  for (int64_t q = tid; q < nq; q += nt) {
    float f[4];
    load_quad(mine, 4 * q, len, v, f);
    if constexpr (PUSH) {
      for (int r = 0; r < a.nranks; r++) {
        if (r == a.me) continue;
        uint4 *line = inbox_quad(a, r, a.me, b, e, q);
        push_line(line, f[0], f[1], e);
        push_line(line + 1, f[2], f[3], e);
      }
    } else {
      store_quad(stage, 4 * q, len, v, f);
    }
  }
  if (!PUSH) {
    __syncthreads();
    if (tid == 0) met = meet_peers(a, b, e);
    __syncthreads();
  }
  if (PUSH || met) {
    const p2p_addend<PUSH> sum = {&a, off, mine, len, v, b, e};
    if (MODE == MODE_ADD_NORM) {
      norm_row(x + row, sum, w, gain, eps, len, v, out + row);
    } else {
      for (int64_t q = tid; q < nq; q += nt) {
        float s[4];
        sum.load(4 * q, s);
        if (MODE == MODE_ADD) {
          float y[4];
          load_quad(x + row, 4 * q, len, v, y);
          for (int i = 0; i < 4; i++) s[i] = y[i] + s[i];
        }
        /* MODE_SUM writes the quads it read, after reading them: mine is its own row */
        store_quad(MODE == MODE_SUM ? mine : x + row, 4 * q, len, v, s);
      }
    }
  }
  /* The last block done advances the epoch: every block read it before any block finished. */
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    if (atomicAdd(&a.sync[1], 1u) == gridDim.x - 1) {
      a.sync[1] = 0;
      a.sync[0] = e;
    }
  }
}

/* ---- host side ---- */

static m3_status cuda_failure(const char *what, int rank, cudaError_t e) {
  return m3_fail(M3_ERR_IO, "p2p %s (rank %d): %s", what, rank, cudaGetErrorString(e));
}

extern "C" m3_status m3_p2p_group_create(int nranks, m3_p2p_group **out) {
  *out = NULL;
  if (nranks < 2 || nranks > M3_P2P_MAX_RANKS)
    return m3_fail(M3_ERR_ARG, "p2p: %d ranks (expected 2..%d)", nranks, M3_P2P_MAX_RANKS);
  m3_p2p_group *g = (m3_p2p_group *)calloc(1, sizeof *g);
  if (!g) return m3_fail(M3_ERR_NOMEM, "p2p: out of memory");
  g->nranks = nranks;
  cudaError_t e = cudaHostAlloc((void **)&g->words, N_WORDS * sizeof(int),
                                cudaHostAllocMapped | cudaHostAllocPortable);
  if (e != cudaSuccess) {
    free(g);
    return m3_fail(M3_ERR_NOMEM, "p2p: mapped host words: %s", cudaGetErrorString(e));
  }
  memset(g->words, 0, N_WORDS * sizeof(int));
  *out = g;
  return M3_OK;
}

extern "C" void m3_p2p_group_free(m3_p2p_group *g) {
  if (!g) return;
  cudaFreeHost(g->words);
  free(g);
}

/* A rank's inbox: [2 slots][nranks senders][LL_BLOCKS][ROW_QUADS] quads of two 16-byte lines
 * (4 MB a rank of the group). */
static size_t inbox_bytes_of(const m3_p2p_group *g) {
  return (size_t)2 * (size_t)g->nranks * LL_BLOCKS * ROW_QUADS * 2 * sizeof(uint4);
}

extern "C" m3_status m3_p2p_join(m3_p2p_group *g, int rank, m3_backend *be, m3_p2p **out) {
  *out = NULL;
  if (rank < 0 || rank >= g->nranks)
    return m3_fail(M3_ERR_ARG, "p2p join: rank %d of %d is out of range", rank, g->nranks);
  if (!be || strcmp(be->ops->name, "cuda") != 0)
    return m3_fail(M3_ERR_ARG, "p2p join (rank %d): backend '%s' is not a CUDA backend", rank,
                   be ? be->ops->name : "(none)");
  cuda_backend *cb = cuda_of(be);
  cudaError_t e = cudaSetDevice(cb->device);
  if (e != cudaSuccess) return cuda_failure("join", rank, e);
  m3_p2p *p = (m3_p2p *)calloc(1, sizeof *p);
  if (!p) return m3_fail(M3_ERR_NOMEM, "p2p join: out of memory");
  p->g = g;
  p->rank = rank;
  p->cb = cb;
  float *staging = NULL;
  uint32_t *flags = NULL;
  uint4 *inbox = NULL;
  const size_t flag_bytes = (FLAG_WORDS + 2) * sizeof(uint32_t);
  const size_t staging_bytes = 2 * SLOT_FLOATS * sizeof(float), inbox_bytes = inbox_bytes_of(g);
  if ((e = cudaMalloc((void **)&staging, staging_bytes)) == cudaSuccess &&
      (e = cudaMalloc((void **)&inbox, inbox_bytes)) == cudaSuccess &&
      (e = cudaMemset(inbox, 0, inbox_bytes)) == cudaSuccess &&
      (e = cudaMalloc((void **)&flags, flag_bytes)) == cudaSuccess &&
      (e = cudaMemset(flags, 0, flag_bytes)) == cudaSuccess &&
      (e = cudaHostGetDevicePointer((void **)&p->words_dev, g->words, 0)) == cudaSuccess)
    e = cudaDeviceSynchronize(); /* the zeroed flags and inbox before any peer can write them */
  if (e != cudaSuccess) {
    cudaFree(staging);
    cudaFree(inbox);
    cudaFree(flags);
    free(p);
    return m3_fail(M3_ERR_NOMEM, "p2p join (rank %d): %.1f MB of staging and inbox on GPU %d: %s",
                   rank, (double)(staging_bytes + inbox_bytes) / 1e6, cb->device,
                   cudaGetErrorString(e));
  }
  g->staging[rank] = staging;
  g->inbox[rank] = inbox;
  g->flags[rank] = flags;
  g->devices[rank] = cb->device;
  g->sms[rank] = cb->num_sms;
  __atomic_add_fetch(&g->joined, 1, __ATOMIC_RELEASE);
  *out = p;
  return M3_OK;
}

extern "C" m3_status m3_p2p_connect(m3_p2p *p) {
  m3_p2p_group *g = p->g;
  if (__atomic_load_n(&g->joined, __ATOMIC_ACQUIRE) != g->nranks)
    return m3_fail(M3_ERR_ARG, "p2p connect (rank %d): %d of %d ranks joined", p->rank, g->joined,
                   g->nranks);
  const int me = g->devices[p->rank];
  cudaError_t e = cudaSetDevice(me);
  if (e != cudaSuccess) return cuda_failure("connect", p->rank, e);
  /* Every block of a launch spins until its peers' match it, so all of a launch's blocks must
   * be resident at once, also where several ranks share a GPU (a test on one GPU): a block of
   * up to 512 threads at ~100 registers takes a whole SM. */
  int blocks = MAX_BLOCKS;
  for (int r = 0; r < g->nranks; r++) {
    int sharing = 0;
    for (int q = 0; q < g->nranks; q++) sharing += g->devices[q] == g->devices[r];
    if (g->sms[r] / sharing < blocks) blocks = g->sms[r] / sharing;
    const int other = g->devices[r];
    if (other == me) continue;
    int can = 0;
    if ((e = cudaDeviceCanAccessPeer(&can, me, other)) != cudaSuccess)
      return cuda_failure("connect", p->rank, e);
    if (!can)
      return m3_fail(M3_ERR_UNSUPPORTED, "p2p connect: GPU %d cannot access GPU %d's memory "
                     "(no peer access between them)", me, other);
    e = cudaDeviceEnablePeerAccess(other, 0);
    if (e == cudaErrorPeerAccessAlreadyEnabled) (void)cudaGetLastError();
    else if (e != cudaSuccess) return cuda_failure("connect", p->rank, e);
  }
  if (blocks < 1)
    return m3_fail(M3_ERR_UNSUPPORTED, "p2p connect: %d ranks on GPU %d leave no SM per rank",
                   g->nranks, me);
  /* Loads the kernels now: CUDA loads a kernel lazily at its first launch, and loading waits for
   * the kernels running in the context, a peer's call spinning for this one among them where
   * ranks share a GPU (a deadlock until the deadline, seen with 2 ranks on one H200). */
  const void *kernels[] = {
      (const void *)p2p_kernel<MODE_SUM, 0>,      (const void *)p2p_kernel<MODE_ADD, 0>,
      (const void *)p2p_kernel<MODE_ADD_NORM, 0>, (const void *)p2p_kernel<MODE_SUM, 1>,
      (const void *)p2p_kernel<MODE_ADD, 1>,      (const void *)p2p_kernel<MODE_ADD_NORM, 1>};
  for (size_t k = 0; k < sizeof kernels / sizeof kernels[0]; k++) {
    cudaFuncAttributes attr;
    if ((e = cudaFuncGetAttributes(&attr, kernels[k])) != cudaSuccess)
      return cuda_failure("connect", p->rank, e);
  }
  p->blocks = blocks;
  /* M3_P2P_PUSH=0: every launch meets through staging (to time the two protocols in one run);
   * every rank reads the same environment, so they agree. */
  const char *push = getenv("M3_P2P_PUSH");
  p->push_blocks = push && strcmp(push, "0") == 0 ? 0 : LL_BLOCKS < blocks ? LL_BLOCKS : blocks;
  return M3_OK;
}

extern "C" void m3_p2p_leave(m3_p2p *p) {
  if (!p) return;
  cudaSetDevice(p->cb->device);
  cudaFree(p->g->staging[p->rank]);
  cudaFree(p->g->inbox[p->rank]);
  cudaFree(p->g->flags[p->rank]);
  p->g->staging[p->rank] = NULL;
  p->g->inbox[p->rank] = NULL;
  p->g->flags[p->rank] = NULL;
  free(p);
}

/* (Sizes only, the same before and after connect: the engine decides on graphs in between.) */
extern "C" int m3_p2p_fits_add_norm(const m3_p2p *p, int rows, int cols) {
  return p && rows > 0 && cols > 0 && cols <= ROW_FLOATS &&
         (size_t)rows * (size_t)cols <= SUM_MAX_FLOATS;
}

extern "C" int m3_p2p_fits_sum(const m3_p2p *p, size_t n) {
  return p && n > 0 && n <= SUM_MAX_FLOATS;
}

static volatile int *words(const m3_p2p_group *g) { return (volatile int *)g->words; }

extern "C" void m3_p2p_abort(m3_p2p_group *g) {
  if (!g) return;
  if (words(g)[WORD_FAILURE] == FAILURE_NONE) words(g)[WORD_FAILURE] = FAILURE_ABORTED;
  words(g)[WORD_ABORT] = 1;
}

extern "C" m3_status m3_p2p_check(const m3_p2p_group *g) {
  switch (words(g)[WORD_FAILURE]) {
  case FAILURE_NONE: return M3_OK;
  case FAILURE_ABORTED:
    return m3_fail(M3_ERR_IO, "p2p all-reduce: aborted after a rank failed");
  default:
    return m3_fail(M3_ERR_IO, "p2p all-reduce: rank %d waited %d s for rank %d (block %d of the "
                   "call at epoch %d; its flag said %d, its last finished call %d)",
                   words(g)[WORD_RANK], M3_P2P_DEADLINE_S, words(g)[WORD_PEER],
                   words(g)[WORD_BLOCK], words(g)[WORD_EPOCH], words(g)[WORD_SEEN],
                   words(g)[WORD_PEER_DONE]);
  }
}

static p2p_view view_of(const m3_p2p *p) {
  p2p_view a;
  memset(&a, 0, sizeof a);
  for (int r = 0; r < p->g->nranks; r++) {
    a.staging[r] = p->g->staging[r];
    a.inbox[r] = p->g->inbox[r];
    a.flags[r] = p->g->flags[r];
  }
  a.sync = p->g->flags[p->rank] + FLAG_WORDS;
  a.words = p->words_dev;
  a.nranks = p->g->nranks;
  a.me = p->rank;
  return a;
}

static m3_status usable(const m3_p2p *p, const char *op) {
  if (words(p->g)[WORD_FAILURE] != FAILURE_NONE) return m3_p2p_check(p->g);
  if (p->blocks <= 0) return m3_fail(M3_ERR_ARG, "p2p %s (rank %d): not connected", op, p->rank);
  return M3_OK;
}

static int aligned16(const void *q) { return (uintptr_t)q % 16 == 0; }

/* One launch of `blocks` blocks: pushed where that few fit the inboxes, else met through staging
 * (the same choice on every rank: the sizes are the same). */
template <int MODE>
static void launch(const m3_p2p *p, const p2p_view &a, unsigned blocks, int threads, float *part,
                   float *x, cuda_weight w, int gain, float eps, int cols, size_t n, int vec,
                   float *out) {
  if ((int)blocks <= p->push_blocks)
    dev_launch(p2p_kernel<MODE, 1>, blocks, threads, 0, p->cb->stream, a, part, x, w, gain, eps, cols, n, vec, out);
  else dev_launch(p2p_kernel<MODE, 0>, blocks, threads, 0, p->cb->stream, a, part, x, w, gain, eps, cols, n, vec, out);
}

extern "C" m3_status m3_p2p_all_reduce_sum(m3_p2p *p, float *buf, size_t n) {
  m3_status st = usable(p, "all_reduce_sum");
  if (st != M3_OK || n == 0) return st;
  if (!m3_p2p_fits_sum(p, n))
    return m3_fail(M3_ERR_ARG, "p2p all_reduce_sum (rank %d): %zu floats (at most %zu)", p->rank,
                   n, SUM_MAX_FLOATS);
  const p2p_view a = view_of(p);
  const size_t piece = (size_t)p->blocks * ROW_FLOATS;
  for (size_t at = 0; at < n; at += piece) {
    const size_t len = n - at < piece ? n - at : piece;
    const unsigned blocks = (unsigned)((len + ROW_FLOATS - 1) / ROW_FLOATS);
    launch<MODE_SUM>(p, a, blocks, SUM_THREADS, buf + at, NULL, cuda_weight{}, 0, 0.0f, ROW_FLOATS,
                     len, aligned16(buf), NULL);
  }
  cuda_launched(p->cb, "p2p all_reduce_sum");
  return M3_OK;
}

extern "C" m3_status m3_p2p_add_norm(m3_p2p *p, const float *part, float *x, const m3_tensor *norm,
                                     float eps, int rows, int cols, float *out) {
  m3_status st = usable(p, "add_norm");
  if (st != M3_OK || rows <= 0) return st;
  if (!m3_p2p_fits_add_norm(p, rows, cols))
    return m3_fail(M3_ERR_ARG, "p2p add_norm (rank %d): %d x %d (rows up to %d wide, %zu floats)",
                   p->rank, rows, cols, ROW_FLOATS, SUM_MAX_FLOATS);
  const p2p_view a = view_of(p);
  const int vec = cols % 4 == 0 && aligned16(part) && aligned16(x) && (!norm || aligned16(out));
  /* part is only read: its staging copy is the kernel's; the cast is for the shared signature */
  float *in = (float *)part;
  for (int r0 = 0; r0 < rows; r0 += p->blocks) {
    const int nb = rows - r0 < p->blocks ? rows - r0 : p->blocks;
    const size_t at = (size_t)r0 * cols;
    if (norm)
      launch<MODE_ADD_NORM>(p, a, (unsigned)nb, norm_threads(cols), in + at, x + at,
                            cuda_weight_of(norm), gain_kind(norm, cols), eps, cols, 0, vec, out + at);
    else
      launch<MODE_ADD>(p, a, (unsigned)nb, SUM_THREADS, in + at, x + at, cuda_weight{}, 0, 0.0f,
                       cols, 0, vec, NULL);
  }
  cuda_launched(p->cb, "p2p add_norm");
  return M3_OK;
}
