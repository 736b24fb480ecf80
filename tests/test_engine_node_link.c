/* The multi-node step channel (engine/node_link.h): the rendezvous header and every frame kind
 * round-trip over a socket pair with every field compared against what was sent (several
 * sequences, media rows cut to the step, an empty table, page copies, an empty step); truncated
 * frames at several cut points, a bad magic, version or kind, oversized lengths and counts,
 * pages out of range, media of another width, trailing bytes and a silent peer fail naming the
 * frame and field; and the rendezvous variant that keeps its connection carries the header and
 * ids, then a FORWARD and its STATUS, then QUIT (node 0 here, one node on a thread). The engine
 * refuses node layouts that cannot run (before loading anything), naming the flags. */
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include "check.h"
#include "engine/node_link.h"
#include "engine/rendezvous.h"
#include "m3.h"

enum { HIDDEN = 8, PAGES = 16, FIELDS = 44 }; /* FIELDS: frame header + FORWARD's fixed fields */

static void pair(int fd[2]) {
  CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, fd) == 0);
  for (int i = 0; i < 2; i++) fcntl(fd[i], F_SETFL, fcntl(fd[i], F_GETFL) | O_NONBLOCK);
}

static int64_t soon(void) { return m3_net_now_ms() + 2000; }

typedef struct {
  int fd;
  const uint8_t *bytes;
  size_t n;
  int close_after;
  pthread_t thread;
} writer;

/* Writes n bytes (a frame, or a cut one) on its own thread, since a frame may not fit the
 * socket's buffer; then closes its end when asked. */
static void *write_bytes(void *arg) {
  writer *w = arg;
  CHECK_OK(m3_net_write(w->fd, w->bytes, w->n, soon(), "the test", "bytes"));
  if (w->close_after) close(w->fd);
  return NULL;
}

/* Sends bytes[0, n) from fd[0] (closing it after when close_after) and receives on fd[1]. */
static m3_status exchange(const uint8_t *bytes, size_t n, int close_after, m3_node_inbox *in,
                          m3_node_kind *kind, int *closed) {
  int fd[2];
  pair(fd);
  writer w = {.fd = fd[0], .bytes = bytes, .n = n, .close_after = close_after};
  pthread_create(&w.thread, NULL, write_bytes, &w);
  m3_status st = m3_node_recv(fd[1], in, kind, soon(), "node 1", closed);
  pthread_join(w.thread, NULL);
  if (!close_after) close(fd[0]);
  close(fd[1]);
  return st;
}

/* A step of three sequences: a prefill chunk, a decode token with an empty table, a chunk with
 * media rows 3..5 of 6 (its T of 4 takes 3), and two page copies. */
typedef struct {
  int32_t ids[3][5], pos[3][5], tables[5];
  size_t at[3];
  int blocks[3];
  float media[6 * HIDDEN];
  m3_model_seq seqs[3];
  m3_page_copy copies[2];
  m3_node_step step;
} sample;

static void make_sample(sample *s) {
  const int T[3] = {5, 1, 4};
  for (int i = 0; i < 3; i++)
    for (int t = 0; t < T[i]; t++) {
      s->ids[i][t] = 1000 * i + 7 * t + 3;
      s->pos[i][t] = 40 * i + t;
    }
  for (int k = 0; k < 6 * HIDDEN; k++) s->media[k] = 0.25f * (float)k - 3.0f;
  const int32_t tables[5] = {4, 9, 2, 15, 0};
  memcpy(s->tables, tables, sizeof tables);
  s->at[0] = 0, s->at[1] = 3, s->at[2] = 3;
  s->blocks[0] = 3, s->blocks[1] = 0, s->blocks[2] = 2;
  for (int i = 0; i < 3; i++)
    s->seqs[i] = (m3_model_seq){.ids = s->ids[i], .pos = s->pos[i], .T = T[i],
                                .n_logits = i == 0 ? 2 : 1};
  s->seqs[2].media = s->media;
  s->seqs[2].n_media = 6;
  s->seqs[2].media_first = 3;
  s->copies[0] = (m3_page_copy){1, 5};
  s->copies[1] = (m3_page_copy){15, 0};
  s->step = (m3_node_step){.step = 0x1234567890ull, .seqs = s->seqs, .n = 3, .argmax = 1,
                           .tables = s->tables, .table_at = s->at, .table_blocks = s->blocks,
                           .copies = s->copies, .n_copies = 2};
}

static void check_forward_round_trip(void) {
  sample s;
  make_sample(&s);
  m3_node_buf frame = {0};
  CHECK_OK(m3_node_encode_forward(&frame, &s.step, HIDDEN));
  m3_node_inbox in = {0};
  m3_node_kind kind = M3_NODE_QUIT;
  int closed = 1;
  CHECK_OK(exchange(frame.bytes, frame.len, 0, &in, &kind, &closed));
  CHECK_EQ_INT(closed, 0);
  CHECK_EQ_INT(kind, M3_NODE_FORWARD);
  m3_node_step got;
  CHECK_OK(m3_node_decode_forward(&in, PAGES, HIDDEN, "node 0", &got));
  CHECK(got.step == 0x1234567890ull);
  CHECK_EQ_INT(got.n, 3);
  CHECK_EQ_INT(got.argmax, 1);
  for (int i = 0; i < 3 && got.n == 3; i++) {
    const m3_model_seq *a = &s.seqs[i], *b = &got.seqs[i];
    CHECK_EQ_INT(b->T, a->T);
    CHECK_EQ_INT(b->n_logits, a->n_logits);
    CHECK(memcmp(b->ids, a->ids, (size_t)a->T * 4) == 0);
    CHECK(memcmp(b->pos, a->pos, (size_t)a->T * 4) == 0);
    CHECK(b->kv == NULL && b->capture == NULL && b->media_first == 0);
    CHECK_EQ_INT(got.table_blocks[i], s.blocks[i]);
    CHECK(memcmp(got.tables + got.table_at[i], s.tables + s.at[i], (size_t)s.blocks[i] * 4) == 0);
  }
  CHECK(got.seqs[0].media == NULL && got.seqs[1].media == NULL);
  /* The step's rows 3..5, rebased to 0. */
  CHECK_EQ_INT(got.seqs[2].n_media, 3);
  CHECK(got.seqs[2].media && memcmp(got.seqs[2].media, s.media + 3 * HIDDEN, 3 * HIDDEN * 4) == 0);
  CHECK_EQ_INT(got.n_copies, 2);
  CHECK(got.copies[0].from == 1 && got.copies[0].to == 5 && got.copies[1].from == 15 &&
        got.copies[1].to == 0);

  /* A later chunk that takes fewer rows than it has tokens left: rows media_first..n_media. */
  s.seqs[2].media_first = 5;
  CHECK_OK(m3_node_encode_forward(&frame, &s.step, HIDDEN));
  CHECK_OK(exchange(frame.bytes, frame.len, 0, &in, &kind, &closed));
  CHECK_OK(m3_node_decode_forward(&in, PAGES, HIDDEN, "node 0", &got));
  CHECK_EQ_INT(got.seqs[2].n_media, 1);
  CHECK(memcmp(got.seqs[2].media, s.media + 5 * HIDDEN, HIDDEN * 4) == 0);

  /* An empty step: no sequences, no copies. */
  const m3_node_step empty = {.step = 7};
  CHECK_OK(m3_node_encode_forward(&frame, &empty, HIDDEN));
  CHECK_OK(exchange(frame.bytes, frame.len, 0, &in, &kind, &closed));
  CHECK_OK(m3_node_decode_forward(&in, PAGES, HIDDEN, "node 0", &got));
  CHECK(got.step == 7 && got.n == 0 && got.n_copies == 0 && got.argmax == 0);
  m3_node_inbox_free(&in);
  free(frame.bytes);
}

static void check_status_round_trip(void) {
  m3_node_buf frame = {0};
  m3_node_inbox in = {0};
  m3_node_kind kind;
  int closed;
  uint64_t step;
  m3_status code;
  char msg[64];
  CHECK_OK(m3_node_encode_status(&frame, M3_NODE_STATUS, 42, M3_OK, "ignored when ok"));
  CHECK_OK(exchange(frame.bytes, frame.len, 0, &in, &kind, &closed));
  CHECK_EQ_INT(kind, M3_NODE_STATUS);
  CHECK_OK(m3_node_decode_status(&in, kind, "node 1", &step, &code, msg, sizeof msg));
  CHECK(step == 42 && code == M3_OK && msg[0] == '\0');
  CHECK_OK(m3_node_encode_status(&frame, M3_NODE_ABORT, 9, M3_ERR_NOMEM, "rank 3: out of memory"));
  CHECK_OK(exchange(frame.bytes, frame.len, 0, &in, &kind, &closed));
  CHECK_EQ_INT(kind, M3_NODE_ABORT);
  CHECK_OK(m3_node_decode_status(&in, kind, "node 0", &step, &code, msg, sizeof msg));
  CHECK(step == 9 && code == M3_ERR_NOMEM);
  CHECK_STR(msg, "rank 3: out of memory");
  /* A message longer than the caller's room is cut, NUL-terminated. */
  char small[8];
  CHECK_OK(m3_node_decode_status(&in, kind, "node 0", &step, &code, small, sizeof small));
  CHECK_STR(small, "rank 3:");
  CHECK_OK(m3_node_encode_quit(&frame));
  CHECK_EQ_INT((int)frame.len, M3_NODE_FRAME_HEADER_BYTES);
  CHECK_OK(exchange(frame.bytes, frame.len, 0, &in, &kind, &closed));
  CHECK_EQ_INT(kind, M3_NODE_QUIT);
  m3_node_inbox_free(&in);
  free(frame.bytes);
}

static void put32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* Receiving `bytes` must fail with `want` and a message holding `needle`. */
static void check_recv_fails(const uint8_t *bytes, size_t n, int close_after, m3_status want,
                             const char *needle) {
  m3_node_inbox in = {0};
  m3_node_kind kind;
  int closed;
  CHECK_FAILS_WITH(exchange(bytes, n, close_after, &in, &kind, &closed), want, needle);
  CHECK_EQ_INT(closed, 0);
  m3_node_inbox_free(&in);
}

static void check_bad_frames(void) {
  sample s;
  make_sample(&s);
  m3_node_buf frame = {0};
  CHECK_OK(m3_node_encode_forward(&frame, &s.step, HIDDEN));
  /* Cut inside the header, at its end, inside the fixed fields, one byte short. */
  const size_t cuts[4] = {5, M3_NODE_FRAME_HEADER_BYTES, FIELDS - 3, frame.len - 1};
  const char *where[4] = {"after 5 of 20 bytes of a frame header",
                          "after 0 of", "after 21 of", "bytes of a FORWARD payload"};
  for (int i = 0; i < 4; i++) check_recv_fails(frame.bytes, cuts[i], 1, M3_ERR_IO, where[i]);
  char want[96];
  snprintf(want, sizeof want, "after %zu of %zu bytes of a FORWARD payload",
           frame.len - 1 - M3_NODE_FRAME_HEADER_BYTES, frame.len - M3_NODE_FRAME_HEADER_BYTES);
  check_recv_fails(frame.bytes, frame.len - 1, 1, M3_ERR_IO, want);

  /* Closed between frames: not an error in the frame, the peer is gone. */
  int fd[2];
  pair(fd);
  close(fd[0]);
  m3_node_inbox in = {0};
  m3_node_kind kind;
  int closed = 0;
  CHECK_FAILS_WITH(m3_node_recv(fd[1], &in, &kind, soon(), "node 0", &closed), M3_ERR_IO,
                   "node 0 closed the connection");
  CHECK_EQ_INT(closed, 1);
  close(fd[1]);
  /* A silent peer: the deadline. */
  pair(fd);
  CHECK_FAILS_WITH(m3_node_recv(fd[1], &in, &kind, m3_net_now_ms() + 50, "node 2", &closed),
                   M3_ERR_IO, "node 2 sent no frame before the deadline");
  close(fd[0]);
  close(fd[1]);

  uint8_t h[M3_NODE_FRAME_HEADER_BYTES];
  memcpy(h, frame.bytes, sizeof h);
  h[0] ^= 0xff;
  check_recv_fails(h, sizeof h, 0, M3_ERR_FORMAT, "frame from node 1: magic 0x4c4e33b2");
  memcpy(h, frame.bytes, sizeof h);
  put32(h + 4, 2);
  check_recv_fails(h, sizeof h, 0, M3_ERR_FORMAT, "version 2 (expected");
  memcpy(h, frame.bytes, sizeof h);
  put32(h + 8, 9);
  check_recv_fails(h, sizeof h, 0, M3_ERR_FORMAT, "frame from node 1: unknown kind 9");
  /* Lengths over the kind's limit are refused before anything is allocated. */
  memcpy(h, frame.bytes, sizeof h);
  put32(h + 12, 0);
  put32(h + 16, 1); /* 2^32 bytes */
  check_recv_fails(h, sizeof h, 0, M3_ERR_FORMAT,
                   "FORWARD frame from node 1: payload length 4294967296 above its limit of 1073741824");
  put32(h + 8, M3_NODE_STATUS);
  put32(h + 12, 5000);
  put32(h + 16, 0);
  check_recv_fails(h, sizeof h, 0, M3_ERR_FORMAT, "STATUS frame from node 1: payload length 5000");
  put32(h + 8, M3_NODE_QUIT);
  put32(h + 12, 1);
  check_recv_fails(h, sizeof h, 0, M3_ERR_FORMAT, "QUIT frame from node 1: payload length 1 above its limit of 0");
  m3_node_inbox_free(&in);
  free(frame.bytes);
}

/* Decoding the sample's frame with bytes changed at `at` (a u32 set to v; at < 0: none) and
 * `extra` bytes appended must fail naming `needle`. */
static void check_decode_fails(long at, uint32_t v, size_t extra, int hidden, const char *needle) {
  sample s;
  make_sample(&s);
  m3_node_buf frame = {0};
  CHECK_OK(m3_node_encode_forward(&frame, &s.step, HIDDEN));
  const size_t len = frame.len - M3_NODE_FRAME_HEADER_BYTES + extra;
  m3_node_inbox in = {.payload = {.bytes = calloc(1, len), .len = len, .cap = len}};
  memcpy(in.payload.bytes, frame.bytes + M3_NODE_FRAME_HEADER_BYTES, len - extra);
  if (at >= 0) put32(in.payload.bytes + at - M3_NODE_FRAME_HEADER_BYTES, v);
  m3_node_step got;
  CHECK_FAILS_WITH(m3_node_decode_forward(&in, PAGES, hidden, "node 0", &got), M3_ERR_FORMAT, needle);
  m3_node_inbox_free(&in);
  free(frame.bytes);
}

static void check_bad_steps(void) {
  check_decode_fails(-1, 0, 0, HIDDEN * 2, "media rows of width 8, this node's model has hidden size 16");
  check_decode_fails(-1, 0, 4, HIDDEN, "FORWARD frame from node 0: 4 bytes after the page copies");
  check_decode_fails(FIELDS - 12, 1u << 20, 0, HIDDEN, "1048576 sequences, at most 65536");
  check_decode_fails(FIELDS - 12, 1000, 0, HIDDEN, "the sequence fields of 1000 x 16 bytes");
  check_decode_fails(FIELDS - 4, 2, 0, HIDDEN, "argmax flag 2");
  check_decode_fails(FIELDS + 4, 6, 0, HIDDEN, "sequence 0 has T 5, n_logits 6");
  check_decode_fails(FIELDS, 0x7fffffff, 0, HIDDEN, "ids of 2147483647 x 4 bytes");
  check_decode_fails(FIELDS + 16 + 12, 1u << 30, 0, HIDDEN, "block tables of");
  check_decode_fails(FIELDS - 8, 3, 0, HIDDEN, "page copies of 3 x 8 bytes");
  /* The last two i32s are copy 1 (15, 0): page 16 is outside PAGES. */
  sample s;
  make_sample(&s);
  s.tables[1] = PAGES;
  m3_node_buf frame = {0};
  CHECK_OK(m3_node_encode_forward(&frame, &s.step, HIDDEN));
  m3_node_inbox in = {0};
  m3_node_kind kind;
  int closed;
  CHECK_OK(exchange(frame.bytes, frame.len, 0, &in, &kind, &closed));
  m3_node_step got;
  CHECK_FAILS_WITH(m3_node_decode_forward(&in, PAGES, HIDDEN, "node 0", &got), M3_ERR_FORMAT,
                   "block table entry 1 is page 16, outside the 16 pages");
  make_sample(&s);
  s.copies[1].to = -1;
  CHECK_OK(m3_node_encode_forward(&frame, &s.step, HIDDEN));
  CHECK_OK(exchange(frame.bytes, frame.len, 0, &in, &kind, &closed));
  CHECK_FAILS_WITH(m3_node_decode_forward(&in, PAGES, HIDDEN, "node 0", &got), M3_ERR_FORMAT,
                   "page copy entry 3 is page -1");
  m3_node_inbox_free(&in);
  free(frame.bytes);
}

static m3_node_header sample_header(void) {
  m3_node_header h = {.tp = 2, .ep = 4, .nnodes = 2, .pages = 1234, .kv_dtype = M3_KV_FP8,
                      .quantize_mxfp8 = 1, .hidden = 6144, .layers = 62, .vocab = 200064,
                      .n_ids = 5};
  for (int i = 0; i < h.n_ids; i++)
    for (int b = 0; b < M3_NODE_ID_BYTES; b++) h.ids[i][b] = (uint8_t)(31 * i + 7 * b + 1);
  return h;
}

static void check_header(void) {
  static uint8_t blob[M3_NODE_BLOB_BYTES];
  static m3_node_header got;
  m3_node_header h = sample_header();
  m3_node_header_encode(&h, blob);
  CHECK_OK(m3_node_header_decode(blob, &got));
  CHECK(got.tp == 2 && got.ep == 4 && got.nnodes == 2 && got.pages == 1234 &&
        got.kv_dtype == M3_KV_FP8 && got.quantize_mxfp8 == 1 && got.hidden == 6144 &&
        got.layers == 62 && got.vocab == 200064 && got.n_ids == 5);
  CHECK(memcmp(got.ids, h.ids, 5 * M3_NODE_ID_BYTES) == 0);
  blob[4] = 9;
  CHECK_FAILS_WITH(m3_node_header_decode(blob, &got), M3_ERR_FORMAT, "version 9");
  m3_node_header_encode(&h, blob);
  put32(blob + 44, M3_NODE_MAX_IDS + 1);
  CHECK_FAILS_WITH(m3_node_header_decode(blob, &got), M3_ERR_FORMAT, "66 ids, at most 65");
  m3_node_header_encode(&h, blob);
  put32(blob + 24, 7);
  CHECK_FAILS_WITH(m3_node_header_decode(blob, &got), M3_ERR_FORMAT, "KV dtype 7");
}

/* ---- the rendezvous that keeps its connection, then the channel over it ---- */

typedef struct {
  char addr[64];
  m3_node_header got;
  uint8_t blob[M3_NODE_BLOB_BYTES];
  int steps, quit;
  pthread_t thread;
} follower;

/* Node 1: joins, accepts the header, answers one FORWARD with a failure, stops at QUIT. */
static void *follow(void *arg) {
  follower *f = arg;
  const m3_rendezvous_opts o = {.master_addr = f->addr, .nnodes = 2, .node_rank = 1,
                                .connect_timeout_ms = 2000, .wait_timeout_ms = 2000};
  int fd = -1;
  CHECK_OK(m3_rendezvous_join(&o, f->blob, sizeof f->blob, &fd));
  if (fd < 0) return NULL;
  CHECK_OK(m3_node_header_decode(f->blob, &f->got));
  m3_node_buf out = {0};
  m3_node_inbox in = {0};
  CHECK_OK(m3_node_encode_status(&out, M3_NODE_STATUS, 0, M3_OK, NULL));
  CHECK_OK(m3_node_send(fd, &out, soon(), "node 0"));
  for (;;) {
    m3_node_kind kind;
    int closed;
    if (m3_node_recv(fd, &in, &kind, soon(), "node 0", &closed) != M3_OK) break;
    if (kind == M3_NODE_QUIT) {
      f->quit = 1;
      break;
    }
    m3_node_step s;
    CHECK_EQ_INT(kind, M3_NODE_FORWARD);
    CHECK_OK(m3_node_decode_forward(&in, PAGES, HIDDEN, "node 0", &s));
    f->steps += s.n == 3 && s.seqs[0].ids[4] == 31;
    CHECK_OK(m3_node_encode_status(&out, M3_NODE_STATUS, s.step, M3_ERR_IO, "rank 3: boom"));
    CHECK_OK(m3_node_send(fd, &out, soon(), "node 0"));
  }
  m3_node_inbox_free(&in);
  free(out.bytes);
  close(fd);
  return NULL;
}

static void check_kept_connection(void) {
  const m3_rendezvous_opts any = {.master_addr = "127.0.0.1:0", .nnodes = 2, .node_rank = 0,
                                  .connect_timeout_ms = 2000, .wait_timeout_ms = 2000};
  m3_rendezvous_listener *l = NULL;
  int port = 0;
  CHECK_OK(m3_rendezvous_listen(&any, &l, &port));
  if (!l) return;
  static follower f;
  snprintf(f.addr, sizeof f.addr, "127.0.0.1:%d", port);
  pthread_create(&f.thread, NULL, follow, &f);
  static uint8_t blob[M3_NODE_BLOB_BYTES];
  m3_node_header h = sample_header();
  m3_node_header_encode(&h, blob);
  int fds[2] = {7, 7};
  CHECK_OK(m3_rendezvous_serve_keep(l, &any, blob, sizeof blob, fds));
  CHECK_EQ_INT(fds[0], -1);
  m3_node_inbox in = {0};
  m3_node_buf out = {0};
  m3_node_kind kind;
  int closed;
  uint64_t step;
  m3_status code;
  char msg[64];
  CHECK_OK(m3_node_recv(fds[1], &in, &kind, soon(), "node 1", &closed));
  CHECK_OK(m3_node_decode_status(&in, kind, "node 1", &step, &code, msg, sizeof msg));
  CHECK(kind == M3_NODE_STATUS && step == 0 && code == M3_OK);
  sample s;
  make_sample(&s);
  s.ids[0][4] = 31;
  CHECK_OK(m3_node_encode_forward(&out, &s.step, HIDDEN));
  CHECK_OK(m3_node_send(fds[1], &out, soon(), "node 1"));
  CHECK_OK(m3_node_recv(fds[1], &in, &kind, soon(), "node 1", &closed));
  CHECK_OK(m3_node_decode_status(&in, kind, "node 1", &step, &code, msg, sizeof msg));
  CHECK(step == s.step.step && code == M3_ERR_IO);
  CHECK_STR(msg, "rank 3: boom");
  CHECK_OK(m3_node_encode_quit(&out));
  CHECK_OK(m3_node_send(fds[1], &out, soon(), "node 1"));
  pthread_join(f.thread, NULL);
  CHECK(memcmp(f.blob, blob, sizeof blob) == 0);
  CHECK(f.got.pages == 1234 && f.got.n_ids == 5 && memcmp(f.got.ids, h.ids, sizeof h.ids) == 0);
  CHECK_EQ_INT(f.steps, 1);
  CHECK_EQ_INT(f.quit, 1);
  close(fds[1]);
  m3_node_inbox_free(&in);
  free(out.bytes);
}

static void check_engine_refusals(void) {
  m3_engine_options o;
  m3_engine_options_init(&o);
  o.model_dir = M3_SOURCE_DIR "/tests/data/m3_full";
  o.tp = 2;
  o.nnodes = 2;
  o.node_rank = 1;
  o.master_addr = "127.0.0.1:1";
  m3_engine *e = NULL;
  CHECK_FAILS_WITH(m3_engine_open(&o, &e), M3_ERR_ARG, "node_rank 1 of 2 nodes: the engine is node 0");
  CHECK(e == NULL);
  CHECK_FAILS_WITH(m3_engine_follow(&o), M3_ERR_ARG, "--nnodes 2 needs --device cuda");
  o.node_rank = 0;
  CHECK_FAILS_WITH(m3_engine_open(&o, &e), M3_ERR_ARG, "--nnodes 2 needs --device cuda");
  CHECK_FAILS_WITH(m3_engine_follow(&o), M3_ERR_ARG, "a node that follows node 0 is 1..nnodes-1");
  o.nnodes = 3;
  o.node_rank = 2;
  o.device = "cuda:0";
  CHECK_FAILS_WITH(m3_engine_follow(&o), M3_ERR_ARG, "--nnodes 3 does not divide the 2 ranks of --tp 2 x --ep 1");
  o.master_addr = NULL;
  CHECK_FAILS_WITH(m3_engine_follow(&o), M3_ERR_ARG, "--nnodes 3: needs --master-addr");
}

int main(void) {
  check_engine_refusals();
  check_header();
  check_forward_round_trip();
  check_status_round_trip();
  check_bad_frames();
  check_bad_steps();
  check_kept_connection();
  return check_summary();
}
