/* nodes.c: the ranks of several nodes (ranks.h), the links between the nodes: node 0's link
 * thread, which hands every step to the other nodes and takes their answers, and a follower's
 * loop, which runs node 0's steps on its own ranks (node_link.h: what the frames hold). */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/node_link.h"
#include "engine/ranks_internal.h"
#include "engine/rendezvous.h"

/* ---- node 0 ---- */

static int64_t after_ms(int ms) { return m3_net_now_ms() + ms; }

static m3_rendezvous_opts node_opts(const m3_ranks *r) {
  return (m3_rendezvous_opts){.master_addr = r->master_addr, .nnodes = r->nnodes,
                              .node_rank = r->node_rank,
                              .connect_timeout_ms = M3_NODE_JOIN_TIMEOUT_MS,
                              .wait_timeout_ms = M3_NODE_JOIN_TIMEOUT_MS};
}

/* The links' table, the wake pipe and, on node 0, the listener the other nodes connect to while
 * every node loads its weights (so a port already taken fails before the load). */
m3_status m3_nodes_open(m3_ranks *r) {
  r->links = malloc((size_t)r->nnodes * sizeof *r->links);
  if (!r->links) return m3_fail(M3_ERR_NOMEM, "ranks: %d node links", r->nnodes);
  for (int n = 0; n < r->nnodes; n++) r->links[n] = -1;
  if (pipe(r->wake) != 0) {
    r->wake[0] = r->wake[1] = -1;
    return m3_fail(M3_ERR_IO, "ranks: pipe: %s", strerror(errno));
  }
  for (int i = 0; i < 2; i++) {
    fcntl(r->wake[i], F_SETFL, fcntl(r->wake[i], F_GETFL) | O_NONBLOCK);
    fcntl(r->wake[i], F_SETFD, FD_CLOEXEC);
  }
  if (r->node_rank > 0) return M3_OK;
  const m3_rendezvous_opts o = node_opts(r);
  int port;
  return m3_rendezvous_listen(&o, &r->listener, &port);
}

static void drain_wake(m3_ranks *r) {
  char b[64];
  while (read(r->wake[0], b, sizeof b) > 0) {
  }
}

static int step_failed(m3_ranks *r) {
  pthread_mutex_lock(&r->mu);
  const int failed = r->failed != M3_OK;
  pthread_mutex_unlock(&r->mu);
  return failed;
}

/* The frame in r->out to node n (links[n]), errors naming it. */
static m3_status send_out(m3_ranks *r, int n, int64_t deadline) {
  char peer[32];
  snprintf(peer, sizeof peer, "node %d", n);
  return m3_node_send(r->links[n], &r->out, deadline, peer);
}

static m3_status send_status(m3_ranks *r, int n, m3_node_kind kind, uint64_t step, m3_status st,
                             const char *message, int64_t deadline) {
  m3_status s = m3_node_encode_status(&r->out, kind, step, st, message);
  return s == M3_OK ? send_out(r, n, deadline) : s;
}

/* Node n's STATUS of `step` (links[n]): its status, with its message after "node n: ". */
static m3_status take_status(m3_ranks *r, int n, uint64_t step, int64_t deadline) {
  char peer[32], message[M3_NODE_MAX_MESSAGE + 1];
  snprintf(peer, sizeof peer, "node %d", n);
  m3_node_kind kind;
  int closed;
  m3_status st = m3_node_recv(r->links[n], &r->in, &kind, deadline, peer, &closed);
  if (st == M3_OK && kind != M3_NODE_STATUS)
    st = m3_fail(M3_ERR_FORMAT, "%s sent a %s frame where its STATUS of step %llu was due", peer,
                 m3_node_kind_name(kind), (unsigned long long)step);
  uint64_t got = 0;
  m3_status code = M3_OK;
  if (st == M3_OK)
    st = m3_node_decode_status(&r->in, kind, peer, &got, &code, message, sizeof message);
  if (st == M3_OK && got != step)
    st = m3_fail(M3_ERR_FORMAT, "%s answered step %llu where step %llu was due", peer,
                 (unsigned long long)got, (unsigned long long)step);
  if (st == M3_OK && code != M3_OK) st = m3_fail(code, "%s: %s", peer, message);
  return st;
}

#ifdef M3_HAVE_NCCL
_Static_assert(sizeof(m3_nccl_id) == M3_NODE_ID_BYTES, "an NCCL id is a node header id");
#endif

/* The communicators' ids into the header and out of it: the world's, then one per TP group. */
static void put_ids(const m3_ranks *r, m3_node_header *h) {
#ifdef M3_HAVE_NCCL
  h->n_ids = 1 + (r->tp > 1 && r->ep > 1 ? r->ep : 0);
  memcpy(h->ids[0], r->world_id.bytes, M3_NODE_ID_BYTES);
  for (int e = 1; e < h->n_ids; e++) memcpy(h->ids[e], r->tp_ids[e - 1].bytes, M3_NODE_ID_BYTES);
#else
  (void)r;
  h->n_ids = 0; /* check_nodes refused several nodes */
#endif
}

static void take_ids(m3_ranks *r, const m3_node_header *h) {
#ifdef M3_HAVE_NCCL
  memcpy(r->world_id.bytes, h->ids[0], M3_NODE_ID_BYTES);
  for (int e = 1; e < h->n_ids; e++) memcpy(r->tp_ids[e - 1].bytes, h->ids[e], M3_NODE_ID_BYTES);
#else
  (void)r;
  (void)h;
#endif
}

static void *link_main(void *arg);

/* Node 0, its ranks loaded and its cache made: hands every node the header and the ids, takes
 * each node's verdict on them, tells every node to go on (the communicators' init waits for
 * all of them: no node may start it while another refuses), and starts the link thread. */
m3_status m3_nodes_meet(m3_ranks *r) {
  const m3_config *c = m3_model_config(r->ranks[0].model);
  m3_node_header *h = calloc(1, sizeof *h);
  uint8_t *blob = malloc(M3_NODE_BLOB_BYTES);
  m3_status st = h && blob ? M3_OK : m3_fail(M3_ERR_NOMEM, "ranks: the node header");
  if (st == M3_OK) {
    *h = (m3_node_header){.tp = r->tp, .ep = r->ep, .nnodes = r->nnodes, .pages = r->pages,
                          .kv_dtype = r->kv_dtype, .quantize_mxfp8 = r->quantize_mxfp8,
                          .hidden = c->hidden_size, .layers = c->num_layers,
                          .vocab = c->vocab_size};
    put_ids(r, h);
    m3_node_header_encode(h, blob);
    const m3_rendezvous_opts o = node_opts(r);
    st = m3_rendezvous_serve_keep(r->listener, &o, blob, M3_NODE_BLOB_BYTES, r->links);
    r->listener = NULL; /* closed by the exchange */
  }
  free(h);
  free(blob);
  const int64_t deadline = after_ms(M3_NODE_STEP_TIMEOUT_MS);
  for (int n = 1; n < r->nnodes && st == M3_OK; n++) st = take_status(r, n, 0, deadline);
  for (int n = 1; n < r->nnodes && st == M3_OK; n++)
    st = send_status(r, n, M3_NODE_STATUS, 0, M3_OK, NULL, deadline);
  if (st != M3_OK) return st;
  pthread_mutex_lock(&r->mu);
  r->link_seen = r->generation;
  r->workers++;
  pthread_mutex_unlock(&r->mu);
  const int rc = pthread_create(&r->link_thread, NULL, link_main, r);
  if (rc != 0) {
    r->workers--;
    return m3_fail(M3_ERR_IO, "ranks: cannot start the thread of the node links (%s)",
                   strerror(rc));
  }
  r->link_started = 1;
  return M3_OK;
}

/* Node 0's step failed: the nodes still due to answer abort theirs (best effort: a node that is
 * gone shows in its answer). */
static void abort_nodes(m3_ranks *r, uint64_t step, const uint8_t *due, int64_t deadline) {
  char why[sizeof r->failure];
  pthread_mutex_lock(&r->mu);
  snprintf(why, sizeof why, "%s", r->failure);
  pthread_mutex_unlock(&r->mu);
  for (int n = 1; n < r->nnodes; n++)
    if (due[n]) (void)send_status(r, n, M3_NODE_ABORT, step, M3_ERR_IO, why, deadline);
}

/* Node 0's link thread, for one job: a step goes to every node (FORWARD), then every node's
 * answer (the step's, or the set-up's) comes back before the deadline. Meanwhile a failure of
 * node 0's own ranks has the nodes still busy abort their step; a node's failure, silence past
 * the deadline or a broken link is the step's failure, which aborts node 0's communicators
 * (fail_step) so that its ranks stop waiting for that node's part. */
static void step_nodes(m3_ranks *r, uint64_t step, int forward) {
  uint8_t due[M3_PARALLEL_MAX_RANKS] = {0};
  char why[sizeof r->failure];
  const int64_t deadline = after_ms(M3_NODE_STEP_TIMEOUT_MS);
  if (forward) {
    const m3_node_step s = {.step = step, .seqs = r->batch, .n = r->n, .argmax = r->argmax,
                            .tables = r->tables, .table_at = r->table_at,
                            .table_blocks = r->table_blocks, .copies = r->copies,
                            .n_copies = r->n_copies};
    const m3_status st = m3_node_encode_forward(&r->out, &s, r->hidden);
    if (st != M3_OK) {
      m3_ranks_fail_step(r, st, m3_last_error());
      return;
    }
  }
  for (int n = 1; n < r->nnodes; n++) {
    m3_status st = forward ? send_out(r, n, deadline) : M3_OK;
    if (st != M3_OK) m3_ranks_fail_step(r, st, m3_last_error());
    due[n] = st == M3_OK;
  }
  for (int aborted = 0;;) {
    struct pollfd p[1 + M3_PARALLEL_MAX_RANKS] = {{.fd = r->wake[0], .events = POLLIN}};
    int node[1 + M3_PARALLEL_MAX_RANKS], np = 1;
    for (int n = 1; n < r->nnodes; n++)
      if (due[n]) {
        node[np] = n;
        p[np++] = (struct pollfd){.fd = r->links[n], .events = POLLIN};
      }
    if (np == 1) return;
    if (forward && !aborted && step_failed(r)) {
      abort_nodes(r, step, due, deadline);
      aborted = 1;
    }
    const int64_t left = deadline - m3_net_now_ms();
    const int ready = left > 0 ? poll(p, (nfds_t)np, (int)left) : 0;
    if (ready == 0) {
      snprintf(why, sizeof why, "node %d did not answer step %llu within %d s", node[1],
               (unsigned long long)step, M3_NODE_STEP_TIMEOUT_MS / 1000);
      m3_ranks_fail_step(r, M3_ERR_IO, why);
      if (forward && !aborted) abort_nodes(r, step, due, after_ms(1000));
      return;
    }
    if (ready < 0 && errno != EINTR) {
      snprintf(why, sizeof why, "node links: poll: %s", strerror(errno));
      m3_ranks_fail_step(r, M3_ERR_IO, why);
      return;
    }
    if (p[0].revents) drain_wake(r);
    for (int i = 1; i < np; i++) {
      if (!p[i].revents) continue;
      const m3_status st = take_status(r, node[i], step, deadline);
      if (st != M3_OK) m3_ranks_fail_step(r, st, m3_last_error());
      due[node[i]] = 0;
    }
  }
}

static void *link_main(void *arg) {
  m3_ranks *r = arg;
  for (job_kind kind; (kind = m3_ranks_take_job(r, &r->link_seen)) != JOB_QUIT; m3_ranks_job_done(r))
    if (kind == JOB_FORWARD || kind == JOB_SETUP) step_nodes(r, kind == JOB_FORWARD ? r->step : 0,
                                                              kind == JOB_FORWARD);
  if (m3_node_encode_quit(&r->out) == M3_OK)
    for (int n = 1; n < r->nnodes; n++) (void)send_out(r, n, after_ms(5000));
  return NULL;
}

void m3_nodes_close(m3_ranks *r) {
  if (r->link_started) pthread_join(r->link_thread, NULL);
  for (int n = 0; r->links && n < r->nnodes; n++)
    if (r->links[n] >= 0) close(r->links[n]);
  for (int i = 0; i < 2; i++)
    if (r->wake[i] >= 0) close(r->wake[i]);
  m3_rendezvous_listener_free(r->listener);
  free(r->links);
  free(r->out.bytes);
  m3_node_inbox_free(&r->in);
  m3_node_inbox_free(&r->mid);
}

/* ---- a node other than 0 ---- */

/* Node 0's header against this node's own layout and model. */
static m3_status check_header(const m3_ranks *r, const m3_node_header *h) {
  const m3_config *c = m3_model_config(r->ranks[0].model);
  const int ids = 1 + (r->tp > 1 && r->ep > 1 ? r->ep : 0);
  if (h->tp != r->tp || h->ep != r->ep || h->nnodes != r->nnodes)
    return m3_fail(M3_ERR_ARG, "node %d has --tp %d --ep %d --nnodes %d, node 0 --tp %d --ep %d "
                   "--nnodes %d: every node takes the same layout", r->node_rank, r->tp, r->ep,
                   r->nnodes, h->tp, h->ep, h->nnodes);
  if (h->quantize_mxfp8 != r->quantize_mxfp8)
    return m3_fail(M3_ERR_ARG, "--quantize mxfp8 on node %d only: every node loads the weights "
                   "alike", r->quantize_mxfp8 ? r->node_rank : 0);
  if (h->hidden != c->hidden_size || h->layers != c->num_layers || h->vocab != c->vocab_size)
    return m3_fail(M3_ERR_ARG, "node %d's model (hidden %d, %d layers, vocabulary %d) is not "
                   "node 0's (hidden %d, %d layers, vocabulary %d): every node takes the same "
                   "--model", r->node_rank, c->hidden_size, c->num_layers, c->vocab_size,
                   h->hidden, h->layers, h->vocab);
  if (h->n_ids != ids || h->pages < 1)
    return m3_fail(M3_ERR_FORMAT, "node header: %d ids (expected %d), %d KV pages", h->n_ids, ids,
                   h->pages);
  return M3_OK;
}

/* The rendezvous (its connection kept as the link to node 0), this node's verdict on the header,
 * node 0's go, the set-up (communicators, then KV storage of node 0's page count) and its
 * outcome, told to node 0. */
static m3_status join_node0(m3_ranks *r) {
  m3_node_header *h = malloc(sizeof *h);
  uint8_t *blob = malloc(M3_NODE_BLOB_BYTES);
  const m3_rendezvous_opts o = node_opts(r);
  m3_status st = h && blob ? m3_rendezvous_join(&o, blob, M3_NODE_BLOB_BYTES, &r->links[0])
                           : m3_fail(M3_ERR_NOMEM, "ranks: the node header");
  if (st == M3_OK) st = m3_node_header_decode(blob, h);
  if (st == M3_OK) {
    const m3_status verdict = check_header(r, h);
    char why[M3_NODE_MAX_MESSAGE];
    snprintf(why, sizeof why, "%s", m3_last_error());
    st = send_status(r, 0, M3_NODE_STATUS, 0, verdict, why, after_ms(M3_NODE_STEP_TIMEOUT_MS));
    if (verdict != M3_OK) st = m3_fail(verdict, "%s", why);
  }
  if (st == M3_OK) st = take_status(r, 0, 0, after_ms(M3_NODE_STEP_TIMEOUT_MS));
  if (st == M3_OK) {
    take_ids(r, h);
    r->pages = h->pages;
    r->kv_dtype = h->kv_dtype;
    r->hidden = h->hidden;
    m3_ranks_post(r, JOB_SETUP);
    const m3_status set_up = m3_ranks_wait(r);
    char why[M3_NODE_MAX_MESSAGE];
    snprintf(why, sizeof why, "%s", m3_last_error());
    st = send_status(r, 0, M3_NODE_STATUS, 0, set_up, why, after_ms(M3_NODE_STEP_TIMEOUT_MS));
    if (set_up != M3_OK) st = m3_fail(set_up, "%s", why);
  }
  free(h);
  free(blob);
  return st;
}

/* While this node's ranks run a step: an ABORT of the step from node 0 aborts them too (they may
 * wait in a collective for node 0's part); a link that breaks does the same. Returns 1 when the
 * link broke (the node then stops following). */
static int watch_step(m3_ranks *r) {
  int broken = 0;
  char why[sizeof r->failure], message[M3_NODE_MAX_MESSAGE + 1];
  for (;;) {
    pthread_mutex_lock(&r->mu);
    const int done = r->pending == 0;
    pthread_mutex_unlock(&r->mu);
    if (done) return broken;
    struct pollfd p[2] = {{.fd = r->wake[0], .events = POLLIN},
                          {.fd = broken ? -1 : r->links[0], .events = POLLIN}};
    if (poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      snprintf(why, sizeof why, "link to node 0: poll: %s", strerror(errno));
      m3_ranks_fail_step(r, M3_ERR_IO, why);
      m3_ranks_wait_done(r); /* the ranks were released by the failure */
      return 1;
    }
    if (p[0].revents) drain_wake(r);
    if (!p[1].revents) continue;
    m3_node_kind kind = M3_NODE_QUIT;
    int closed;
    uint64_t step = 0;
    m3_status code = M3_ERR_IO;
    m3_status st = m3_node_recv(r->links[0], &r->mid, &kind, after_ms(M3_NODE_STEP_TIMEOUT_MS),
                                "node 0", &closed);
    if (st == M3_OK && kind == M3_NODE_ABORT)
      st = m3_node_decode_status(&r->mid, kind, "node 0", &step, &code, message, sizeof message);
    if (st == M3_OK && kind != M3_NODE_ABORT)
      st = m3_fail(M3_ERR_FORMAT, "node 0 sent a %s frame during step %llu",
                   m3_node_kind_name(kind), (unsigned long long)r->step);
    if (st != M3_OK) {
      snprintf(why, sizeof why, "link to node 0, step %llu: %s", (unsigned long long)r->step,
               m3_last_error());
      m3_ranks_fail_step(r, st, why);
      broken = 1;
    } else if (step == r->step) {
      snprintf(why, sizeof why, "node 0 aborted step %llu: %.500s", (unsigned long long)step,
               message);
      m3_ranks_fail_step(r, code != M3_OK ? code : M3_ERR_IO, why);
    }
  }
}

/* One FORWARD: this node's ranks run it as node 0's ranks 1.. run theirs (their arrays point
 * into the frame), then node 0 hears how it went. A failed step is answered and the node goes
 * on (node 0 has aborted the communicators: later steps fail there first); a frame that does not
 * decode or a broken link ends the following. */
static m3_status follow_step(m3_ranks *r) {
  char why[M3_NODE_MAX_MESSAGE];
  m3_node_step s;
  m3_status st = m3_node_decode_forward(&r->in, r->pages, r->hidden, "node 0", &s);
  if (st != M3_OK) {
    snprintf(why, sizeof why, "%s", m3_last_error());
    (void)send_status(r, 0, M3_NODE_STATUS, r->step + 1, st, why, after_ms(1000));
    return m3_fail(st, "%s", why);
  }
  r->step = s.step;
  r->batch = s.seqs;
  r->n = s.n;
  r->argmax = s.argmax;
  r->tables = s.tables;
  r->table_at = s.table_at;
  r->table_blocks = s.table_blocks;
  r->copies = s.copies;
  r->n_copies = s.n_copies;
  m3_ranks_post(r, JOB_FORWARD);
  const int broken = watch_step(r);
  st = m3_ranks_wait(r);
  snprintf(why, sizeof why, "%s", m3_last_error());
  /* The arrays belong to the inbox, not to the ranks (m3_ranks_free frees the ranks'). */
  r->batch = NULL;
  r->tables = NULL;
  r->table_at = NULL;
  r->table_blocks = NULL;
  r->copies = NULL;
  r->n_copies = 0;
  if (broken) return m3_fail(st, "%s", why);
  return send_status(r, 0, M3_NODE_STATUS, r->step, st, why, after_ms(M3_NODE_STEP_TIMEOUT_MS));
}

m3_status m3_ranks_follow(const char *model_dir, const m3_engine_options *o,
                          const m3_model_load_options *load) {
  m3_ranks *r = NULL;
  m3_status st = m3_ranks_start(model_dir, o, load, &r);
  if (st == M3_OK) st = m3_ranks_wait(r);
  if (st == M3_OK) st = join_node0(r);
  while (st == M3_OK) {
    m3_node_kind kind = M3_NODE_QUIT;
    int closed;
    st = m3_node_recv(r->links[0], &r->in, &kind, -1, "node 0", &closed);
    if (closed || (st == M3_OK && kind == M3_NODE_QUIT)) {
      st = M3_OK;
      break;
    }
    if (st == M3_OK && kind == M3_NODE_FORWARD) st = follow_step(r);
    else if (st == M3_OK && kind != M3_NODE_ABORT) /* an ABORT of a step already answered */
      st = m3_fail(M3_ERR_FORMAT, "node 0 sent a %s frame between steps", m3_node_kind_name(kind));
  }
  m3_ranks_free(r);
  return st;
}
