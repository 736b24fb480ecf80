/* ranks_internal.h (src/engine): what ranks.c (the ranks of one node: their jobs and
 * collectives) and nodes.c (the links between nodes) share: the ranks' state and the hand-over of
 * a job to the workers (the ranks' threads and node 0's link thread). */
#ifndef M3_ENGINE_RANKS_INTERNAL_H
#define M3_ENGINE_RANKS_INTERNAL_H

#include <pthread.h>
#include <stdint.h>

#include "engine/node_link.h"
#include "engine/parallel.h"
#include "engine/ranks.h"
#include "engine/rendezvous.h"

#ifdef M3_HAVE_NCCL
#include "backend/cuda/collectives.h"
#include "backend/cuda/p2p.h"
#endif

/* The host all-reduce of one group (the world, or one TP group): members post their buffers,
 * meet at a barrier, each sums its share of the indices over the members in member order (so
 * every member ends with the same bits), and they meet again. `aborted` releases every waiter
 * when a rank's forward failed, since its peers would otherwise wait for it forever. */
typedef struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int size, arrived, aborted;
  uint64_t phase;
  float *bufs[M3_PARALLEL_MAX_RANKS];
} host_group;

typedef enum { JOB_LOAD, JOB_SETUP, JOB_P2P_JOIN, JOB_P2P_CONNECT, JOB_P2P_LEAVE, JOB_FORWARD,
               JOB_FINISH, JOB_QUIT } job_kind;

typedef struct {
  m3_ranks *all;
  int index, tp_rank, ep_rank; /* in the world of every node */
  int local;               /* on this node: it runs on GPU first_gpu + local */
  m3_backend *be;
  m3_model *model;
  m3_kv_cache *store;      /* ranks >= 1: storage mirroring rank 0's pages */
  host_group *world_group, *tp_group; /* CPU ranks */
#ifdef M3_HAVE_NCCL
  m3_nccl *world_comm, *tp_comm; /* tp_comm: own communicator when tp > 1 and ep > 1 */
  m3_p2p *p2p;             /* the world's peer-to-peer all-reduce, when the ranks have one */
#endif
  m3_kv_view *views;       /* [cap_seqs * layers] */
  m3_model_seq *seqs;      /* [cap_seqs] */
  int cap_seqs;
  int32_t *tables_dev;     /* device backends: the step's block tables */
  size_t cap_tables;
  uint64_t seen;           /* the last job taken */
  int forwards;            /* forwards run, for the injected failure */
  pthread_t thread;
  int started;
} rank;

struct m3_ranks {
  int tp, ep, world, on_device;
  /* This node hosts ranks [node_rank * local, +local) of the world; ranks[i] is local rank i. */
  int nnodes, node_rank, local;
  int first_thread;        /* 1 on node 0, whose rank 0 is the engine's; 0 on the others */
  int workers;             /* threads a job waits for: the ranks' and node 0's link thread */
  char dir[4096];
  m3_model_load_options load;
  int first_gpu, threads;
  int fail_rank, fail_forward; /* M3_RANKS_FAIL (inject_failure); fail_forward 0: none */
  rank ranks[M3_PARALLEL_MAX_RANKS];
  host_group *groups;      /* CPU: [1 + ep] the world, then TP group e */
#ifdef M3_HAVE_NCCL
  m3_nccl_id world_id, tp_ids[M3_PARALLEL_MAX_RANKS];
  m3_p2p_group *p2p;       /* NULL: every all-reduce through NCCL */
  int p2p_graphs;          /* every all-reduce of a recordable step goes peer to peer */
#endif
  /* The job the engine thread posted, guarded by mu (written before the post, read after it). */
  pthread_mutex_t mu;
  pthread_cond_t go, done;
  job_kind kind;
  uint64_t generation;
  int pending;             /* ranks 1.. yet to finish the job */
  m3_status failed;        /* the job's first failure, in time */
  char failure[600];
  char aborted[600];       /* NCCL: why every communicator was aborted (then every step fails) */
  int pages;               /* JOB_SETUP */
  m3_kv_dtype kv_dtype;
  const m3_model_seq *batch; /* JOB_FORWARD */
  int n;
  int argmax;              /* the step hands over greedy ids (m3_model_forward_batch_argmax) */
  int32_t *tables;         /* [total blocks] the batch's block tables, one after another */
  size_t cap_tables;
  size_t *table_at;        /* [cap_n] where entry i's table starts in `tables` */
  int *table_blocks;       /* [cap_n] its length */
  int cap_n;
  m3_page_copy *copies;    /* rank 0's page copies since the last forward, in order */
  int n_copies, cap_copies;
  /* Several nodes (node_link.h): node 0's links[n] is its socket to node n, a follower's
   * links[0] its socket to node 0. The thread that watches them (node 0's link thread, a
   * follower's main thread) sleeps in poll(); `wake` (a pipe) wakes it when a rank fails or the
   * job ends. */
  const char *master_addr;
  int quantize_mxfp8;
  m3_rendezvous_listener *listener; /* node 0, until the nodes joined */
  int *links;
  int wake[2];
  pthread_t link_thread;
  int link_started;
  uint64_t link_seen;
  uint64_t step;           /* FORWARD frames sent (node 0) or received */
  int hidden;              /* the model's width: the media rows of a step */
  m3_node_buf out;
  m3_node_inbox in;
  m3_node_inbox mid;       /* a follower: what node 0 sends while a step runs (ABORT) */
};

/* ---- the jobs (ranks.c) ---- */

/* Records the job's first failure (`why`, naming the rank or node) and releases whoever may wait
 * for it (ranks.c says how). */
void m3_ranks_fail_step(m3_ranks *r, m3_status st, const char *why);
/* Hands the workers a job (its data written before). */
void m3_ranks_post(m3_ranks *r, job_kind kind);
/* A worker waits for the job after the one it took last (*seen); a worker finished its job. */
job_kind m3_ranks_take_job(m3_ranks *r, uint64_t *seen);
void m3_ranks_job_done(m3_ranks *r);
/* Waits until the workers finished the job: its first failure (m3_ranks_wait with the failure's
 * message on this thread). */
m3_status m3_ranks_wait_done(m3_ranks *r);
m3_status m3_ranks_wait(m3_ranks *r);

/* ---- the other nodes (nodes.c) ---- */

/* The links' table, the wake pipe and, on node 0, the listener the other nodes connect to. */
m3_status m3_nodes_open(m3_ranks *r);
/* Node 0, its ranks loaded and its cache made: the rendezvous with every node and the link
 * thread's start. */
m3_status m3_nodes_meet(m3_ranks *r);
/* Joins the link thread (which has sent QUIT) and closes the links. */
void m3_nodes_close(m3_ranks *r);

#endif
