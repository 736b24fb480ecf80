/* rendezvous.c: the NCCL unique-id exchange over TCP (rendezvous.h describes the protocol).
 *
 * Every socket is non-blocking and every wait is a poll() bounded by the caller's deadline, so
 * neither an absent node 0 nor a silent peer can hang a launch; sends use MSG_NOSIGNAL so a peer
 * that went away is an error, not a SIGPIPE. */
#include "engine/rendezvous.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum {
  MAGIC = 0x4d335256, /* "M3RV" */
  VERSION = 1,
  HELLO_BYTES = 20,   /* magic, version, nnodes, node rank, blob length */
  ANSWER_BYTES = 16,  /* magic, version, status, payload length */
  MESSAGE_MAX = 512,  /* a refusal's text */
  RETRY_MS = 50,      /* between connection attempts while node 0 is not up yet */
};

struct m3_rendezvous_listener {
  int fd;
};

int64_t m3_net_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* poll()'s timeout until the deadline: -1 (none) for a negative deadline. */
static int left_ms(int64_t deadline) {
  if (deadline < 0) return -1;
  int64_t left = deadline - m3_net_now_ms();
  return left > 0 ? (int)left : 0;
}

static void put_u32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)(v >> 24);
  p[1] = (uint8_t)(v >> 16);
  p[2] = (uint8_t)(v >> 8);
  p[3] = (uint8_t)v;
}

static uint32_t get_u32(const uint8_t *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static int set_nonblocking(int fd) {
  int flags = fcntl(fd, F_GETFL, 0);
  return flags < 0 ? -1 : fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

/* Waits until fd is ready for `events` or the deadline; 1 ready, 0 timed out, -1 error. */
static int wait_fd(int fd, short events, int64_t deadline) {
  for (;;) {
    struct pollfd p = {.fd = fd, .events = events};
    int n = poll(&p, 1, left_ms(deadline));
    if (n >= 0) return n;
    if (errno != EINTR) return -1;
  }
}

m3_status m3_net_read(int fd, void *buf, size_t n, int64_t deadline, const char *peer,
                      const char *what) {
  uint8_t *bytes = buf;
  size_t got = 0;
  while (got < n) {
    int ready = wait_fd(fd, POLLIN, deadline);
    if (ready == 0)
      return m3_fail(M3_ERR_IO, "%s sent %zu of %zu bytes of %s before the deadline", peer, got,
                     n, what);
    ssize_t r = ready < 0 ? -1 : recv(fd, bytes + got, n - got, 0);
    if (r == 0)
      return m3_fail(M3_ERR_IO, "%s closed the connection after %zu of %zu bytes of %s", peer,
                     got, n, what);
    if (r < 0 && errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK)
      return m3_fail(M3_ERR_IO, "reading %s from %s: %s", what, peer, strerror(errno));
    if (r > 0) got += (size_t)r;
  }
  return M3_OK;
}

m3_status m3_net_write(int fd, const void *buf, size_t n, int64_t deadline, const char *peer,
                       const char *what) {
  const uint8_t *bytes = buf;
  size_t sent = 0;
  while (sent < n) {
    if (wait_fd(fd, POLLOUT, deadline) <= 0)
      return m3_fail(M3_ERR_IO, "sending %s to %s timed out", what, peer);
    ssize_t w = send(fd, bytes + sent, n - sent, MSG_NOSIGNAL);
    if (w < 0 && errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK)
      return m3_fail(M3_ERR_IO, "sending %s to %s: %s", what, peer, strerror(errno));
    if (w > 0) sent += (size_t)w;
  }
  return M3_OK;
}

static m3_status read_full(int fd, uint8_t *buf, size_t n, int64_t deadline, const char *peer,
                           const char *what) {
  m3_status st = m3_net_read(fd, buf, n, deadline, peer, what);
  return st == M3_OK ? st : m3_fail_context(st, "rendezvous");
}

static m3_status write_full(int fd, const uint8_t *buf, size_t n, int64_t deadline,
                            const char *peer, const char *what) {
  m3_status st = m3_net_write(fd, buf, n, deadline, peer, what);
  return st == M3_OK ? st : m3_fail_context(st, "rendezvous");
}

m3_status m3_rendezvous_parse_addr(const char *s, char *host, size_t cap, int *port) {
  const char *h = s, *colon = NULL;
  size_t hlen;
  if (s[0] == '[') {
    const char *close = strchr(s, ']');
    if (!close || (close[1] != '\0' && close[1] != ':'))
      return m3_fail(M3_ERR_ARG, "--master-addr '%s': expected [IPV6]:PORT", s);
    h = s + 1;
    hlen = (size_t)(close - h);
    colon = close[1] == ':' ? close + 1 : NULL;
  } else {
    colon = strchr(s, ':');
    if (colon && strchr(colon + 1, ':')) colon = NULL; /* a bare IPv6 address, no port */
    hlen = colon ? (size_t)(colon - s) : strlen(s);
  }
  if (hlen == 0 || hlen >= cap)
    return m3_fail(M3_ERR_ARG, "--master-addr '%s': expected HOST[:PORT] with a host of 1..%zu "
                   "characters", s, cap - 1);
  long p = M3_RENDEZVOUS_PORT;
  if (colon) {
    char *end;
    errno = 0;
    p = strtol(colon + 1, &end, 10);
    if (end == colon + 1 || *end != '\0' || errno || p < 0 || p > 65535)
      return m3_fail(M3_ERR_ARG, "--master-addr '%s': port '%s' is not in 0..65535", s, colon + 1);
  }
  memcpy(host, h, hlen);
  host[hlen] = '\0';
  *port = (int)p;
  return M3_OK;
}

static m3_status check_opts(const m3_rendezvous_opts *o, size_t len) {
  if (o->nnodes < 1 || o->nnodes > M3_RENDEZVOUS_MAX_NODES)
    return m3_fail(M3_ERR_ARG, "--nnodes %d: expected 1..%d", o->nnodes, M3_RENDEZVOUS_MAX_NODES);
  if (o->node_rank < 0 || o->node_rank >= o->nnodes)
    return m3_fail(M3_ERR_ARG, "--node-rank %d: expected 0..%d (--nnodes %d)", o->node_rank,
                   o->nnodes - 1, o->nnodes);
  if (len == 0 || len > M3_RENDEZVOUS_MAX_BLOB)
    return m3_fail(M3_ERR_ARG, "rendezvous: id length %zu is not in 1..%d", len,
                   M3_RENDEZVOUS_MAX_BLOB);
  return M3_OK;
}

static m3_status resolve(const char *host, int port, int passive, struct addrinfo **out) {
  char service[8];
  snprintf(service, sizeof service, "%d", port);
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                           .ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0)};
  int rc = getaddrinfo(host, service, &hints, out);
  if (rc != 0)
    return m3_fail(M3_ERR_IO, "--master-addr %s: %s", host ? host : "(any)", gai_strerror(rc));
  return M3_OK;
}

/* Binds PORT on every local address: the IPv6 wildcard with IPv4 mapped in where the host has
 * IPv6, else the IPv4 one, so nodes reach node 0 whatever address --master-addr names. */
static int bind_any(const struct addrinfo *ai, int family) {
  for (; ai; ai = ai->ai_next) {
    if (ai->ai_family != family) continue;
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) continue;
    int one = 1, zero = 0;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, M3_RENDEZVOUS_MAX_NODES) == 0 &&
        set_nonblocking(fd) == 0)
      return fd;
    close(fd);
  }
  return -1;
}

m3_status m3_rendezvous_listen(const m3_rendezvous_opts *o, m3_rendezvous_listener **out, int *port) {
  *out = NULL;
  char host[256];
  int p;
  m3_status st = m3_rendezvous_parse_addr(o->master_addr, host, sizeof host, &p);
  struct addrinfo *ai = NULL;
  if (st == M3_OK) st = resolve(NULL, p, 1, &ai);
  if (st != M3_OK) return st;
  int fd = bind_any(ai, AF_INET6);
  if (fd < 0) fd = bind_any(ai, AF_INET);
  int err = errno;
  freeaddrinfo(ai);
  if (fd < 0)
    return m3_fail(M3_ERR_IO, "--master-addr %s: cannot listen on port %d: %s", o->master_addr, p,
                   strerror(err));
  struct sockaddr_storage sa;
  socklen_t sl = sizeof sa;
  m3_rendezvous_listener *l = malloc(sizeof *l);
  if (!l || getsockname(fd, (struct sockaddr *)&sa, &sl) != 0) {
    close(fd);
    free(l);
    return m3_fail(M3_ERR_NOMEM, "rendezvous: listener for %s", o->master_addr);
  }
  l->fd = fd;
  *port = ntohs(sa.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&sa)->sin6_port
                                         : ((struct sockaddr_in *)&sa)->sin_port);
  *out = l;
  return M3_OK;
}

static void peer_name(const struct sockaddr_storage *sa, socklen_t sl, char *out, size_t cap) {
  char h[64], s[8];
  if (getnameinfo((const struct sockaddr *)sa, sl, h, sizeof h, s, sizeof s,
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    snprintf(out, cap, "a node");
  else
    snprintf(out, cap, "the node at %s port %s", h, s);
}

/* The answer frame: status 0 with the blob, or a refusal with its message. */
static m3_status answer(int fd, uint32_t status, const uint8_t *payload, size_t n, int64_t deadline,
                        const char *peer) {
  uint8_t frame[ANSWER_BYTES + M3_RENDEZVOUS_MAX_BLOB];
  put_u32(frame, MAGIC);
  put_u32(frame + 4, VERSION);
  put_u32(frame + 8, status);
  put_u32(frame + 12, (uint32_t)n);
  memcpy(frame + ANSWER_BYTES, payload, n);
  return write_full(fd, frame, ANSWER_BYTES + n, deadline, peer, "the answer");
}

/* Records the refusal as this thread's error, tells the node why (best effort: it may be gone)
 * and returns M3_ERR_ARG. */
static m3_status refuse(int fd, int64_t deadline, const char *peer, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static m3_status refuse(int fd, int64_t deadline, const char *peer, const char *fmt, ...) {
  char why[MESSAGE_MAX];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, sizeof why, fmt, ap);
  va_end(ap);
  answer(fd, 1, (const uint8_t *)why, strlen(why), deadline, peer);
  return m3_fail(M3_ERR_ARG, "rendezvous: %s: %s", peer, why);
}

/* Reads one node's hello from fd and checks it against node 0's settings; on success the node's
 * rank, free until now, is returned in *rank. */
static m3_status take_hello(int fd, const char *peer, const m3_rendezvous_opts *o, size_t len,
                            const int *conn, int64_t deadline, int *rank) {
  uint8_t h[HELLO_BYTES];
  m3_status st = read_full(fd, h, sizeof h, deadline, peer, "its hello");
  if (st != M3_OK) return st;
  uint32_t magic = get_u32(h), version = get_u32(h + 4), nnodes = get_u32(h + 8);
  uint32_t r = get_u32(h + 12), blob = get_u32(h + 16);
  if (magic != MAGIC)
    return m3_fail(M3_ERR_FORMAT, "rendezvous: %s is not an m3 node (magic 0x%08x)", peer, magic);
  if (version != VERSION)
    return refuse(fd, deadline, peer, "protocol version %u, node 0 speaks %d", version, VERSION);
  if (nnodes != (uint32_t)o->nnodes)
    return refuse(fd, deadline, peer, "--nnodes %u differs from node 0's --nnodes %d", nnodes,
                  o->nnodes);
  if (r == 0 || r >= nnodes)
    return refuse(fd, deadline, peer, "--node-rank %u: expected 1..%d", r, o->nnodes - 1);
  if (conn[r] >= 0)
    return refuse(fd, deadline, peer, "--node-rank %u is already taken by another node", r);
  if (blob != len)
    return refuse(fd, deadline, peer, "id length %u differs from node 0's %zu", blob, len);
  *rank = (int)r;
  return M3_OK;
}

void m3_rendezvous_listener_free(m3_rendezvous_listener *l) {
  if (!l) return;
  close(l->fd);
  free(l);
}

/* Node 0: keep NULL closes every connection after the answers, else keep[r] takes node r's. */
static m3_status serve(m3_rendezvous_listener *l, const m3_rendezvous_opts *o, const uint8_t *blob,
                       size_t len, int *keep) {
  int64_t deadline = m3_net_now_ms() + o->wait_timeout_ms;
  m3_status st = check_opts(o, len);
  int *conn = st == M3_OK ? malloc((size_t)o->nnodes * sizeof *conn) : NULL;
  if (st == M3_OK && !conn) st = m3_fail(M3_ERR_NOMEM, "rendezvous: %d nodes", o->nnodes);
  for (int i = 0; conn && i < o->nnodes; i++) conn[i] = -1;
  char peer[96];
  for (int joined = 1; st == M3_OK && joined < o->nnodes;) {
    if (wait_fd(l->fd, POLLIN, deadline) <= 0) {
      st = m3_fail(M3_ERR_IO, "rendezvous: %d of %d nodes joined within %d ms (--nnodes %d)",
                   joined, o->nnodes, o->wait_timeout_ms, o->nnodes);
      break;
    }
    struct sockaddr_storage sa;
    socklen_t sl = sizeof sa;
    int fd = accept(l->fd, (struct sockaddr *)&sa, &sl);
    if (fd < 0) continue; /* the peer gave up before we took it: wait for the next */
    if (set_nonblocking(fd) != 0) {
      close(fd);
      continue;
    }
    peer_name(&sa, sl, peer, sizeof peer);
    int rank = 0;
    st = take_hello(fd, peer, o, len, conn, deadline, &rank);
    if (st != M3_OK) {
      close(fd);
      break;
    }
    conn[rank] = fd;
    joined++;
  }
  for (int r = 1; st == M3_OK && r < o->nnodes; r++)
    st = answer(conn[r], 0, blob, len, deadline, "a node");
  for (int r = 0; keep && conn && r < o->nnodes; r++) keep[r] = st == M3_OK ? conn[r] : -1;
  for (int r = 1; conn && r < o->nnodes && !(keep && st == M3_OK); r++)
    if (conn[r] >= 0) close(conn[r]);
  free(conn);
  m3_rendezvous_listener_free(l);
  return st;
}

m3_status m3_rendezvous_serve(m3_rendezvous_listener *l, const m3_rendezvous_opts *o,
                              const uint8_t *blob, size_t len) {
  return serve(l, o, blob, len, NULL);
}

m3_status m3_rendezvous_serve_keep(m3_rendezvous_listener *l, const m3_rendezvous_opts *o,
                                   const uint8_t *blob, size_t len, int *fds) {
  return serve(l, o, blob, len, fds);
}

/* One connection attempt to one address, bounded by the deadline: the fd, or -1 with errno. */
static int try_connect(const struct addrinfo *ai, int64_t deadline) {
  int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
  if (fd < 0) return -1;
  if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) return fd;
  if (errno == EINPROGRESS && wait_fd(fd, POLLOUT, deadline) > 0) {
    int err = 0;
    socklen_t el = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) == 0 && err == 0) return fd;
    errno = err;
  } else if (errno == EINPROGRESS) {
    errno = ETIMEDOUT;
  }
  int saved = errno;
  close(fd);
  errno = saved;
  return -1;
}

static m3_status connect_master(const m3_rendezvous_opts *o, int *out) {
  char host[256];
  int port;
  m3_status st = m3_rendezvous_parse_addr(o->master_addr, host, sizeof host, &port);
  struct addrinfo *ai = NULL;
  if (st == M3_OK) st = resolve(host, port, 0, &ai);
  if (st != M3_OK) return st;
  int64_t deadline = m3_net_now_ms() + o->connect_timeout_ms;
  int fd = -1, err = ETIMEDOUT;
  for (;;) {
    for (const struct addrinfo *a = ai; a && fd < 0; a = a->ai_next) {
      fd = try_connect(a, deadline);
      if (fd < 0) err = errno;
    }
    if (fd >= 0 || left_ms(deadline) == 0) break;
    int pause = left_ms(deadline) < RETRY_MS ? left_ms(deadline) : RETRY_MS;
    nanosleep(&(struct timespec){.tv_nsec = (long)pause * 1000000}, NULL);
  }
  freeaddrinfo(ai);
  if (fd < 0)
    return m3_fail(M3_ERR_IO, "--master-addr %s: node 0 did not answer within %d ms (%s)",
                   o->master_addr, o->connect_timeout_ms, strerror(err));
  *out = fd;
  return M3_OK;
}

/* A node > 0: hello, then node 0's answer; keep NULL closes the connection, else *keep takes it. */
static m3_status join(const m3_rendezvous_opts *o, uint8_t *blob, size_t len, int *keep) {
  int fd = -1;
  m3_status st = connect_master(o, &fd);
  if (st != M3_OK) return st;
  int64_t deadline = m3_net_now_ms() + o->wait_timeout_ms;
  const char *peer = "node 0";
  uint8_t h[HELLO_BYTES];
  put_u32(h, MAGIC);
  put_u32(h + 4, VERSION);
  put_u32(h + 8, (uint32_t)o->nnodes);
  put_u32(h + 12, (uint32_t)o->node_rank);
  put_u32(h + 16, (uint32_t)len);
  uint8_t a[ANSWER_BYTES] = {0};
  st = write_full(fd, h, sizeof h, deadline, peer, "the hello");
  if (st == M3_OK) st = read_full(fd, a, sizeof a, deadline, peer, "its answer");
  uint32_t status = get_u32(a + 8), n = get_u32(a + 12);
  if (st == M3_OK && (get_u32(a) != MAGIC || get_u32(a + 4) != VERSION))
    st = m3_fail(M3_ERR_FORMAT, "rendezvous: --master-addr %s is not an m3 node 0 (magic 0x%08x, "
                 "version %u)", o->master_addr, get_u32(a), get_u32(a + 4));
  if (st == M3_OK && status != 0) {
    char why[MESSAGE_MAX + 1];
    size_t m = n < MESSAGE_MAX ? n : MESSAGE_MAX;
    st = read_full(fd, (uint8_t *)why, m, deadline, peer, "its refusal");
    why[st == M3_OK ? m : 0] = '\0';
    if (st == M3_OK) st = m3_fail(M3_ERR_ARG, "rendezvous: node 0 refused this node: %s", why);
  }
  if (st == M3_OK && n != len)
    st = m3_fail(M3_ERR_FORMAT, "rendezvous: node 0 sent an id of %u bytes, expected %zu", n, len);
  if (st == M3_OK) st = read_full(fd, blob, len, deadline, peer, "the id");
  if (keep && st == M3_OK) *keep = fd;
  else close(fd);
  return st;
}

m3_status m3_rendezvous(const m3_rendezvous_opts *o, uint8_t *blob, size_t len) {
  m3_status st = check_opts(o, len);
  if (st != M3_OK || o->nnodes == 1) return st;
  if (o->node_rank > 0) return join(o, blob, len, NULL);
  m3_rendezvous_listener *l;
  int port;
  if ((st = m3_rendezvous_listen(o, &l, &port)) != M3_OK) return st;
  return m3_rendezvous_serve(l, o, blob, len);
}

m3_status m3_rendezvous_join(const m3_rendezvous_opts *o, uint8_t *blob, size_t len, int *fd) {
  *fd = -1;
  m3_status st = check_opts(o, len);
  if (st == M3_OK && o->node_rank == 0)
    st = m3_fail(M3_ERR_ARG, "rendezvous: node 0 serves, it does not join");
  return st == M3_OK ? join(o, blob, len, fd) : st;
}
