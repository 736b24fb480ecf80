/* The NCCL unique-id rendezvous on loopback, one thread per node: every node receives node 0's
 * exact blob (IPv4 and IPv6), and mismatched settings, a duplicate rank, a peer that is not an
 * m3 node, a peer that closes mid-frame and an absent node 0 each fail with their named error.
 * Deadlines are short (the failures end at their deadline or sooner). */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include "check.h"
#include "engine/rendezvous.h"

enum { BLOB = 128, MAX_NODES = 4 };

typedef struct {
  m3_rendezvous_opts o;
  uint8_t blob[BLOB];
  m3_status st;
  char error[512];
  pthread_t thread;
} node;

static void *run_node(void *arg) {
  node *n = arg;
  n->st = m3_rendezvous(&n->o, n->blob, BLOB);
  snprintf(n->error, sizeof n->error, "%s", m3_last_error());
  return NULL;
}

static m3_rendezvous_opts opts(const char *addr, int nnodes, int rank) {
  return (m3_rendezvous_opts){.master_addr = addr, .nnodes = nnodes, .node_rank = rank,
                              .connect_timeout_ms = 1000, .wait_timeout_ms = 1000};
}

/* Node 0 listens on an ephemeral port of `host`; *addr gets "host:port" for the others. */
static m3_rendezvous_listener *listen_on(const char *host, int nnodes, char *addr, size_t cap) {
  char any[64];
  snprintf(any, sizeof any, "%s:0", host);
  m3_rendezvous_opts o = opts(any, nnodes, 0);
  m3_rendezvous_listener *l = NULL;
  int port = 0;
  CHECK_OK(m3_rendezvous_listen(&o, &l, &port));
  snprintf(addr, cap, "%s:%d", host, port);
  return l;
}

/* Starts nodes[0..n) (ranks and nnodes as given), serves them as node 0 with `want` nnodes, and
 * joins them; returns node 0's status (its message in err). */
static m3_status exchange(const char *host, int want, node *nodes, int n, const uint8_t *blob,
                          char *err, size_t cap) {
  char addr[96];
  m3_rendezvous_listener *l = listen_on(host, want, addr, sizeof addr);
  if (!l) return M3_ERR_IO;
  for (int i = 0; i < n; i++) {
    nodes[i].o.master_addr = addr;
    pthread_create(&nodes[i].thread, NULL, run_node, &nodes[i]);
  }
  m3_rendezvous_opts o = opts(addr, want, 0);
  m3_status st = m3_rendezvous_serve(l, &o, blob, BLOB);
  snprintf(err, cap, "%s", m3_last_error());
  for (int i = 0; i < n; i++) pthread_join(nodes[i].thread, NULL);
  return st;
}

static void fill(uint8_t *blob) {
  for (int i = 0; i < BLOB; i++) blob[i] = (uint8_t)(i * 37 + 11);
}

static void check_delivery(const char *host) {
  uint8_t blob[BLOB];
  fill(blob);
  node nodes[MAX_NODES - 1];
  for (int i = 0; i < MAX_NODES - 1; i++) nodes[i] = (node){.o = opts(NULL, MAX_NODES, i + 1)};
  char err[512];
  CHECK_EQ_INT(exchange(host, MAX_NODES, nodes, MAX_NODES - 1, blob, err, sizeof err), M3_OK);
  for (int i = 0; i < MAX_NODES - 1; i++) {
    CHECK_EQ_INT(nodes[i].st, M3_OK);
    CHECK(memcmp(nodes[i].blob, blob, BLOB) == 0);
  }
}

static void check_wrong_nnodes(void) {
  uint8_t blob[BLOB];
  fill(blob);
  node n = {.o = opts(NULL, 2, 1)};
  char err[512];
  CHECK_EQ_INT(exchange("127.0.0.1", 3, &n, 1, blob, err, sizeof err), M3_ERR_ARG);
  CHECK(strstr(err, "--nnodes 2 differs from node 0's --nnodes 3") != NULL);
  CHECK_EQ_INT(n.st, M3_ERR_ARG);
  CHECK(strstr(n.error, "node 0 refused this node: --nnodes 2 differs") != NULL);
}

/* Two nodes claim rank 1: whichever comes second is refused, and the first then sees node 0
 * close without an answer. */
static void check_duplicate_rank(void) {
  uint8_t blob[BLOB];
  fill(blob);
  node nodes[2] = {{.o = opts(NULL, 3, 1)}, {.o = opts(NULL, 3, 1)}};
  char err[512];
  CHECK_EQ_INT(exchange("127.0.0.1", 3, nodes, 2, blob, err, sizeof err), M3_ERR_ARG);
  CHECK(strstr(err, "--node-rank 1 is already taken") != NULL);
  int refused = 0, closed = 0;
  for (int i = 0; i < 2; i++) {
    refused += nodes[i].st == M3_ERR_ARG && strstr(nodes[i].error, "already taken") != NULL;
    closed += nodes[i].st == M3_ERR_IO && strstr(nodes[i].error, "closed the connection") != NULL;
  }
  CHECK_EQ_INT(refused, 1);
  CHECK_EQ_INT(closed, 1);
}

static int connect_loopback(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

typedef struct {
  int port;
  const uint8_t *bytes;
  size_t n;
  pthread_t thread;
} raw_peer;

/* A peer that is not a well-behaved m3 node: sends `n` bytes to node 0, then closes. */
static void *raw_send(void *arg) {
  raw_peer *r = arg;
  int fd = connect_loopback(r->port);
  if (fd >= 0) {
    CHECK_EQ_INT(send(fd, r->bytes, r->n, MSG_NOSIGNAL), (long long)r->n);
    close(fd);
  }
  return NULL;
}

/* Node 0 facing a raw peer that sends `bytes`: its error must contain `needle`. */
static void check_bad_peer(const uint8_t *bytes, size_t n, m3_status want, const char *needle) {
  char addr[96];
  m3_rendezvous_listener *l = listen_on("127.0.0.1", 2, addr, sizeof addr);
  if (!l) return;
  raw_peer r = {.port = atoi(strrchr(addr, ':') + 1), .bytes = bytes, .n = n};
  pthread_create(&r.thread, NULL, raw_send, &r);
  uint8_t blob[BLOB];
  fill(blob);
  m3_rendezvous_opts o = opts(addr, 2, 0);
  CHECK_FAILS_WITH(m3_rendezvous_serve(l, &o, blob, BLOB), want, needle);
  pthread_join(r.thread, NULL);
}

typedef struct {
  int fd;
  const uint8_t *bytes;
  size_t n;
  pthread_t thread;
} fake_master;

/* A node 0 that reads the hello, answers `n` bytes and closes. */
static void *fake_serve(void *arg) {
  fake_master *m = arg;
  int c = accept(m->fd, NULL, NULL);
  if (c >= 0) {
    uint8_t hello[20];
    CHECK_EQ_INT(recv(c, hello, sizeof hello, MSG_WAITALL), 20);
    CHECK_EQ_INT(send(c, m->bytes, m->n, MSG_NOSIGNAL), (long long)m->n);
    close(c);
  }
  return NULL;
}

/* A node facing a fake node 0 that answers `bytes`: its error must contain `needle`. */
static void check_bad_master(const uint8_t *bytes, size_t n, m3_status want, const char *needle) {
  fake_master m = {.fd = socket(AF_INET, SOCK_STREAM, 0), .bytes = bytes, .n = n};
  struct sockaddr_in sa = {.sin_family = AF_INET};
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t sl = sizeof sa;
  CHECK(bind(m.fd, (struct sockaddr *)&sa, sizeof sa) == 0 && listen(m.fd, 1) == 0 &&
        getsockname(m.fd, (struct sockaddr *)&sa, &sl) == 0);
  char addr[64];
  snprintf(addr, sizeof addr, "127.0.0.1:%d", ntohs(sa.sin_port));
  pthread_create(&m.thread, NULL, fake_serve, &m);
  m3_rendezvous_opts o = opts(addr, 2, 1);
  uint8_t blob[BLOB];
  CHECK_FAILS_WITH(m3_rendezvous(&o, blob, BLOB), want, needle);
  pthread_join(m.thread, NULL);
  close(m.fd);
}

/* A port nobody listens on: one the kernel gave and took back. */
static void check_no_master(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET};
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t sl = sizeof sa;
  CHECK(bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0 &&
        getsockname(fd, (struct sockaddr *)&sa, &sl) == 0);
  close(fd);
  char addr[64];
  snprintf(addr, sizeof addr, "127.0.0.1:%d", ntohs(sa.sin_port));
  m3_rendezvous_opts o = opts(addr, 2, 1);
  o.connect_timeout_ms = 200;
  uint8_t blob[BLOB];
  CHECK_FAILS_WITH(m3_rendezvous(&o, blob, BLOB), M3_ERR_IO, "node 0 did not answer within 200 ms");
}

static void check_addresses(void) {
  char host[64];
  int port;
  CHECK_OK(m3_rendezvous_parse_addr("node0", host, sizeof host, &port));
  CHECK_STR(host, "node0");
  CHECK_EQ_INT(port, M3_RENDEZVOUS_PORT);
  CHECK_OK(m3_rendezvous_parse_addr("10.0.0.1:1234", host, sizeof host, &port));
  CHECK_STR(host, "10.0.0.1");
  CHECK_EQ_INT(port, 1234);
  CHECK_OK(m3_rendezvous_parse_addr("[fe80::1]:80", host, sizeof host, &port));
  CHECK_STR(host, "fe80::1");
  CHECK_EQ_INT(port, 80);
  CHECK_OK(m3_rendezvous_parse_addr("::1", host, sizeof host, &port));
  CHECK_STR(host, "::1");
  CHECK_EQ_INT(port, M3_RENDEZVOUS_PORT);
  CHECK_FAILS_WITH(m3_rendezvous_parse_addr("h:99999", host, sizeof host, &port), M3_ERR_ARG, "--master-addr 'h:99999'");
  CHECK_FAILS_WITH(m3_rendezvous_parse_addr("[::1", host, sizeof host, &port), M3_ERR_ARG, "expected [IPV6]:PORT");
  CHECK_FAILS_WITH(m3_rendezvous_parse_addr(":80", host, sizeof host, &port), M3_ERR_ARG, "--master-addr ':80'");
  m3_rendezvous_opts o = opts("127.0.0.1", 2, 2);
  uint8_t blob[BLOB];
  CHECK_FAILS_WITH(m3_rendezvous(&o, blob, BLOB), M3_ERR_ARG, "--node-rank 2: expected 0..1");
}

int main(void) {
  check_addresses();
  check_delivery("127.0.0.1");
  /* IPv6 loopback where the machine has it (node 0 listens dual-stack either way). */
  int v6 = socket(AF_INET6, SOCK_STREAM, 0);
  struct sockaddr_in6 s6 = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
  int has_v6 = v6 >= 0 && bind(v6, (struct sockaddr *)&s6, sizeof s6) == 0;
  if (v6 >= 0) close(v6);
  if (has_v6) check_delivery("[::1]");
  else fprintf(stderr, "no IPv6 loopback here: IPv6 delivery not checked\n");
  check_wrong_nnodes();
  check_duplicate_rank();

  uint8_t garbage[20] = "GET / HTTP/1.0\r\n\r\n";
  check_bad_peer(garbage, sizeof garbage, M3_ERR_FORMAT, "is not an m3 node (magic 0x47455420)");
  uint8_t partial[7] = {0x4d, 0x33, 0x52, 0x56, 0, 0, 0};
  check_bad_peer(partial, sizeof partial, M3_ERR_IO, "closed the connection after 7 of 20 bytes of its hello");
  check_bad_master(garbage, 16, M3_ERR_FORMAT, "is not an m3 node 0 (magic 0x47455420");
  check_bad_master(partial, sizeof partial, M3_ERR_IO, "node 0 closed the connection after 7 of 16 bytes of its answer");
  check_no_master();
  return check_summary();
}
