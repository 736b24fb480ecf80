/* rendezvous.h: hands node 0's NCCL unique id to every other node over TCP (issue 11's
 * multi-node launch: --nnodes N --node-rank R --master-addr HOST[:PORT]).
 *
 * The id is an opaque blob of a length the caller gives (ncclUniqueId is 128 bytes); this module
 * knows nothing of NCCL. Node 0 listens on PORT of every local address; each other node
 * connects (retrying until its deadline, since node 0 may start later) and sends a hello
 *   magic "M3RV" | version | nnodes | node rank | blob length     (5 x u32, big-endian)
 * Node 0 waits until all nnodes - 1 ranks have said hello, then answers each with
 *   magic | version | status | message/blob length | blob or message
 * status 0 carries the blob; a refusal (different nnodes, duplicate or out-of-range rank, other
 * blob length, wrong version) carries one line naming it, which the node reports as its error,
 * and node 0 fails with the same line. A peer that is not an m3 node (wrong magic) or that
 * closes mid-frame fails the rendezvous on node 0; the other nodes then see node 0 close. */
#ifndef M3_ENGINE_RENDEZVOUS_H
#define M3_ENGINE_RENDEZVOUS_H

#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

enum { M3_RENDEZVOUS_PORT = 29500, M3_RENDEZVOUS_MAX_NODES = 1024, M3_RENDEZVOUS_MAX_BLOB = 16384 };

typedef struct {
  const char *master_addr; /* HOST[:PORT] or [V6ADDR][:PORT] (m3_rendezvous_parse_addr) */
  int nnodes, node_rank;   /* node_rank in [0, nnodes) */
  int connect_timeout_ms;  /* node > 0: retry connecting to node 0 for this long */
  int wait_timeout_ms;     /* node 0: wait this long for every hello; node > 0: for the answer */
} m3_rendezvous_opts;

/* Node 0 sends blob[0, len) to every other node; the others receive it into blob. */
m3_status m3_rendezvous(const m3_rendezvous_opts *o, uint8_t *blob, size_t len);

/* Node 0 in two steps, so that a caller may listen on port 0 and learn the port chosen:
 * listen binds PORT of master_addr on all local addresses; serve waits for the nodes, answers
 * them and closes the listener in every case. */
typedef struct m3_rendezvous_listener m3_rendezvous_listener;
m3_status m3_rendezvous_listen(const m3_rendezvous_opts *o, m3_rendezvous_listener **out, int *port);
m3_status m3_rendezvous_serve(m3_rendezvous_listener *l, const m3_rendezvous_opts *o,
                              const uint8_t *blob, size_t len);

/* The variants that keep the connections open after the exchange, as the step channel of the
 * multi-node engine (engine/node_link.h). Node 0: on success fds[r] is node r's socket for r in
 * 1..nnodes-1 and fds[0] = -1 (fds [nnodes], the caller closes them); on failure every connection
 * is closed. A node > 0: *fd is its socket to node 0 on success, -1 otherwise. The sockets are
 * non-blocking. */
m3_status m3_rendezvous_serve_keep(m3_rendezvous_listener *l, const m3_rendezvous_opts *o,
                                   const uint8_t *blob, size_t len, int *fds);
m3_status m3_rendezvous_join(const m3_rendezvous_opts *o, uint8_t *blob, size_t len, int *fd);

/* Closes a listener that will not serve (node 0 failed before the exchange); NULL is ignored. */
void m3_rendezvous_listener_free(m3_rendezvous_listener *l);

/* Socket I/O the step channel shares: exactly n bytes on a non-blocking socket before `deadline`
 * (m3_net_now_ms's clock; negative: no deadline). Failures are M3_ERR_IO naming `peer` and
 * `what`: a deadline passed, the connection closed after some of the bytes, a socket error. Sends
 * never raise SIGPIPE. */
int64_t m3_net_now_ms(void);
m3_status m3_net_read(int fd, void *buf, size_t n, int64_t deadline, const char *peer,
                      const char *what);
m3_status m3_net_write(int fd, const void *buf, size_t n, int64_t deadline, const char *peer,
                       const char *what);

/* "host", "host:port", "[v6]:port", "[v6]" or a bare IPv6 address -> host and port
 * (M3_RENDEZVOUS_PORT when absent; 0..65535). Errors name --master-addr. */
m3_status m3_rendezvous_parse_addr(const char *s, char *host, size_t cap, int *port);

#endif
