/* node_link.c: the frames of the step channel and the rendezvous header (node_link.h says what
 * they hold).
 *
 * Every field is little-endian and 4 bytes (the step 8) and the payload of a frame starts on its
 * own allocation, so every i32 and f32 array of a received FORWARD is 4-byte aligned and is
 * decoded in place: the step's arrays point into the payload, no copy. */
#include "engine/node_link.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "engine/rendezvous.h"

enum {
  HEADER_MAGIC = 0x484e334d, /* "M3NH" read as a little-endian u32 */
  FRAME_MAGIC = 0x4c4e334d,  /* "M3NL" */
  VERSION = 1,
  FORWARD_FIXED = 24,        /* step, hidden, sequences, copies, argmax */
  SEQ_FIELDS = 16,           /* T, n_logits, media rows, table blocks */
  STATUS_FIXED = 16,         /* step, status, message length */
};

static void put32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64(const uint8_t *p) {
  return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

const char *m3_node_kind_name(m3_node_kind kind) {
  switch (kind) {
    case M3_NODE_FORWARD: return "FORWARD";
    case M3_NODE_STATUS: return "STATUS";
    case M3_NODE_ABORT: return "ABORT";
    case M3_NODE_QUIT: return "QUIT";
  }
  return "unknown";
}

/* ---- the rendezvous header ---- */

void m3_node_header_encode(const m3_node_header *h, uint8_t blob[M3_NODE_BLOB_BYTES]) {
  memset(blob, 0, M3_NODE_BLOB_BYTES);
  const uint32_t f[12] = {HEADER_MAGIC, VERSION, (uint32_t)h->tp, (uint32_t)h->ep,
                          (uint32_t)h->nnodes, (uint32_t)h->pages, (uint32_t)h->kv_dtype,
                          (uint32_t)h->quantize_mxfp8, (uint32_t)h->hidden, (uint32_t)h->layers,
                          (uint32_t)h->vocab, (uint32_t)h->n_ids};
  for (int i = 0; i < 12; i++) put32(blob + 4 * i, f[i]);
  memcpy(blob + M3_NODE_HEADER_BYTES, h->ids, (size_t)h->n_ids * M3_NODE_ID_BYTES);
}

m3_status m3_node_header_decode(const uint8_t blob[M3_NODE_BLOB_BYTES], m3_node_header *h) {
  uint32_t f[12];
  for (int i = 0; i < 12; i++) f[i] = get32(blob + 4 * i);
  if (f[0] != HEADER_MAGIC || f[1] != VERSION)
    return m3_fail(M3_ERR_FORMAT, "node header: magic 0x%08x version %u (expected 0x%08x "
                   "version %d)", f[0], f[1], HEADER_MAGIC, VERSION);
  for (int i = 2; i < 12; i++)
    if (f[i] > INT32_MAX)
      return m3_fail(M3_ERR_FORMAT, "node header: field %d is %u, above %d", i, f[i], INT32_MAX);
  if (f[11] > M3_NODE_MAX_IDS)
    return m3_fail(M3_ERR_FORMAT, "node header: %u ids, at most %d", f[11], M3_NODE_MAX_IDS);
  if (f[6] != M3_KV_F32 && f[6] != M3_KV_FP8)
    return m3_fail(M3_ERR_FORMAT, "node header: KV dtype %u is neither f32 nor fp8", f[6]);
  *h = (m3_node_header){.tp = (int)f[2], .ep = (int)f[3], .nnodes = (int)f[4], .pages = (int)f[5],
                        .kv_dtype = (m3_kv_dtype)f[6], .quantize_mxfp8 = (int)f[7],
                        .hidden = (int)f[8], .layers = (int)f[9], .vocab = (int)f[10],
                        .n_ids = (int)f[11]};
  memcpy(h->ids, blob + M3_NODE_HEADER_BYTES, (size_t)h->n_ids * M3_NODE_ID_BYTES);
  return M3_OK;
}

/* ---- encoding ---- */

static m3_status reserve(m3_node_buf *b, size_t n) {
  if (n <= b->cap) return M3_OK;
  uint8_t *bytes = realloc(b->bytes, n);
  if (!bytes) return m3_fail(M3_ERR_NOMEM, "node link: a frame of %zu bytes", n);
  b->bytes = bytes;
  b->cap = n;
  return M3_OK;
}

/* Starts a frame of `kind` whose payload takes `payload` bytes; *at is where it goes. */
static m3_status begin_frame(m3_node_buf *b, m3_node_kind kind, size_t payload, uint8_t **at) {
  if (payload > M3_NODE_MAX_FRAME)
    return m3_fail(M3_ERR_LIMIT, "node link: a %s frame of %zu bytes, above the limit of %llu",
                   m3_node_kind_name(kind), payload, (unsigned long long)M3_NODE_MAX_FRAME);
  m3_status st = reserve(b, M3_NODE_FRAME_HEADER_BYTES + payload);
  if (st != M3_OK) return st;
  put32(b->bytes, FRAME_MAGIC);
  put32(b->bytes + 4, VERSION);
  put32(b->bytes + 8, (uint32_t)kind);
  put64(b->bytes + 12, payload);
  b->len = M3_NODE_FRAME_HEADER_BYTES + payload;
  *at = b->bytes + M3_NODE_FRAME_HEADER_BYTES;
  return M3_OK;
}

/* The media rows sequence s sends: those its T tokens can take (node_link.h). */
static int media_rows(const m3_model_seq *s) {
  if (!s->media || s->n_media <= s->media_first) return 0;
  const int left = s->n_media - s->media_first;
  return left < s->T ? left : s->T;
}

static uint8_t *put_ints(uint8_t *p, const int32_t *v, size_t n) {
  for (size_t i = 0; i < n; i++, p += 4) put32(p, (uint32_t)v[i]);
  return p;
}

m3_status m3_node_encode_forward(m3_node_buf *out, const m3_node_step *s, int hidden) {
  size_t bytes = FORWARD_FIXED + (size_t)s->n * SEQ_FIELDS + (size_t)s->n_copies * 8;
  for (int i = 0; i < s->n; i++)
    bytes += (size_t)s->seqs[i].T * 8 + (size_t)media_rows(&s->seqs[i]) * (size_t)hidden * 4 +
             (size_t)s->table_blocks[i] * 4;
  uint8_t *p;
  m3_status st = begin_frame(out, M3_NODE_FORWARD, bytes, &p);
  if (st != M3_OK) return st;
  put64(p, s->step);
  put32(p + 8, (uint32_t)hidden);
  put32(p + 12, (uint32_t)s->n);
  put32(p + 16, (uint32_t)s->n_copies);
  put32(p + 20, (uint32_t)(s->argmax != 0));
  p += FORWARD_FIXED;
  for (int i = 0; i < s->n; i++, p += SEQ_FIELDS) {
    const m3_model_seq *q = &s->seqs[i];
    const uint32_t f[4] = {(uint32_t)q->T, (uint32_t)q->n_logits, (uint32_t)media_rows(q),
                           (uint32_t)s->table_blocks[i]};
    for (int j = 0; j < 4; j++) put32(p + 4 * j, f[j]);
  }
  for (int i = 0; i < s->n; i++) {
    const m3_model_seq *q = &s->seqs[i];
    p = put_ints(p, q->ids, (size_t)q->T);
    p = put_ints(p, q->pos, (size_t)q->T);
    const size_t floats = (size_t)media_rows(q) * (size_t)hidden;
    const float *media = floats ? q->media + (size_t)q->media_first * (size_t)hidden : NULL;
    for (size_t k = 0; k < floats; k++, p += 4) {
      uint32_t bits;
      memcpy(&bits, &media[k], 4);
      put32(p, bits);
    }
  }
  for (int i = 0; i < s->n; i++)
    if (s->table_blocks[i] > 0) p = put_ints(p, s->tables + s->table_at[i], (size_t)s->table_blocks[i]);
  for (int i = 0; i < s->n_copies; i++, p += 8) {
    put32(p, (uint32_t)s->copies[i].from);
    put32(p + 4, (uint32_t)s->copies[i].to);
  }
  return M3_OK;
}

m3_status m3_node_encode_status(m3_node_buf *out, m3_node_kind kind, uint64_t step, m3_status st,
                                const char *message) {
  const size_t len = st == M3_OK || !message ? 0 : strnlen(message, M3_NODE_MAX_MESSAGE);
  uint8_t *p;
  m3_status s = begin_frame(out, kind, STATUS_FIXED + len, &p);
  if (s != M3_OK) return s;
  put64(p, step);
  put32(p + 8, (uint32_t)st);
  put32(p + 12, (uint32_t)len);
  if (len) memcpy(p + STATUS_FIXED, message, len);
  return M3_OK;
}

m3_status m3_node_encode_quit(m3_node_buf *out) {
  uint8_t *p;
  return begin_frame(out, M3_NODE_QUIT, 0, &p);
}

m3_status m3_node_send(int fd, const m3_node_buf *frame, int64_t deadline, const char *peer) {
  const m3_node_kind kind = (m3_node_kind)get32(frame->bytes + 8);
  char what[32];
  snprintf(what, sizeof what, "a %s frame", m3_node_kind_name(kind));
  return m3_net_write(fd, frame->bytes, frame->len, deadline, peer, what);
}

/* ---- receiving ---- */

void m3_node_inbox_free(m3_node_inbox *in) {
  free(in->payload.bytes);
  free(in->seqs);
  free(in->table_at);
  free(in->table_blocks);
  *in = (m3_node_inbox){0};
}

/* 1 when the peer closed the connection before another frame began, 0 when bytes wait, -1 with
 * the error recorded when the deadline passed first or the socket failed. */
static int closed_between_frames(int fd, int64_t deadline, const char *peer) {
  for (;;) {
    const int64_t left = deadline < 0 ? -1 : deadline - m3_net_now_ms();
    struct pollfd p = {.fd = fd, .events = POLLIN};
    const int n = poll(&p, 1, left < 0 ? -1 : (int)left);
    if (n == 0) {
      m3_fail(M3_ERR_IO, "%s sent no frame before the deadline", peer);
      return -1;
    }
    uint8_t b;
    const ssize_t r = n > 0 ? recv(fd, &b, 1, MSG_PEEK) : -1;
    if (r >= 0) return r == 0;
    if (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK) {
      m3_fail(M3_ERR_IO, "reading a frame from %s: %s", peer, strerror(errno));
      return -1;
    }
  }
}

static uint64_t payload_limit(m3_node_kind kind) {
  switch (kind) {
    case M3_NODE_FORWARD: return M3_NODE_MAX_FRAME;
    case M3_NODE_STATUS:
    case M3_NODE_ABORT: return STATUS_FIXED + M3_NODE_MAX_MESSAGE;
    case M3_NODE_QUIT: return 0;
  }
  return 0;
}

m3_status m3_node_recv(int fd, m3_node_inbox *in, m3_node_kind *kind, int64_t deadline,
                       const char *peer, int *closed) {
  *closed = 0;
  const int gone = closed_between_frames(fd, deadline, peer);
  if (gone < 0) return M3_ERR_IO;
  if (gone) {
    *closed = 1;
    return m3_fail(M3_ERR_IO, "%s closed the connection", peer);
  }
  /* A frame begun is finished within a step's time, even where the next frame may take hours. */
  const int64_t rest = deadline >= 0 ? deadline : m3_net_now_ms() + M3_NODE_STEP_TIMEOUT_MS;
  uint8_t h[M3_NODE_FRAME_HEADER_BYTES];
  m3_status st = m3_net_read(fd, h, sizeof h, rest, peer, "a frame header");
  if (st != M3_OK) return st;
  const uint32_t magic = get32(h), version = get32(h + 4), k = get32(h + 8);
  const uint64_t len = get64(h + 12);
  if (magic != FRAME_MAGIC || version != VERSION)
    return m3_fail(M3_ERR_FORMAT, "frame from %s: magic 0x%08x version %u (expected 0x%08x "
                   "version %d)", peer, magic, version, FRAME_MAGIC, VERSION);
  if (k < M3_NODE_FORWARD || k > M3_NODE_QUIT)
    return m3_fail(M3_ERR_FORMAT, "frame from %s: unknown kind %u", peer, k);
  *kind = (m3_node_kind)k;
  const char *name = m3_node_kind_name(*kind);
  if (len > payload_limit(*kind))
    return m3_fail(M3_ERR_FORMAT, "%s frame from %s: payload length %llu above its limit of %llu",
                   name, peer, (unsigned long long)len, (unsigned long long)payload_limit(*kind));
  /* At least one byte, so that an empty payload still has an address. */
  if ((st = reserve(&in->payload, len ? (size_t)len : 1)) != M3_OK) return st;
  char what[40];
  snprintf(what, sizeof what, "a %s payload", name);
  in->payload.len = (size_t)len;
  return m3_net_read(fd, in->payload.bytes, (size_t)len, rest, peer, what);
}

/* A cursor over a payload; every take checks the bytes left first. */
typedef struct {
  uint8_t *p;
  size_t left;
  const char *peer;
} cursor;

static m3_status take(cursor *c, size_t count, size_t size, const char *field, uint8_t **out) {
  if (count > c->left / size)
    return m3_fail(M3_ERR_FORMAT, "FORWARD frame from %s: %s of %zu x %zu bytes, only %zu left",
                   c->peer, field, count, size, c->left);
  *out = c->p;
  c->p += count * size;
  c->left -= count * size;
  return M3_OK;
}

/* n little-endian 4-byte values at p, as host i32s in place. */
static int32_t *ints_in_place(uint8_t *p, size_t n) {
  for (size_t i = 0; i < n; i++) {
    const int32_t v = (int32_t)get32(p + 4 * i);
    memcpy(p + 4 * i, &v, 4);
  }
  return (int32_t *)(void *)p;
}

static float *floats_in_place(uint8_t *p, size_t n) {
  for (size_t i = 0; i < n; i++) {
    const uint32_t bits = get32(p + 4 * i);
    float v;
    memcpy(&v, &bits, 4);
    memcpy(p + 4 * i, &v, 4);
  }
  return (float *)(void *)p;
}

static m3_status grow_inbox(m3_node_inbox *in, int n) {
  if (n <= in->cap) return M3_OK;
  m3_model_seq *seqs = realloc(in->seqs, (size_t)n * sizeof *seqs);
  if (seqs) in->seqs = seqs;
  size_t *at = realloc(in->table_at, (size_t)n * sizeof *at);
  if (at) in->table_at = at;
  int *blocks = realloc(in->table_blocks, (size_t)n * sizeof *blocks);
  if (blocks) in->table_blocks = blocks;
  if (!seqs || !at || !blocks) return m3_fail(M3_ERR_NOMEM, "node link: %d sequences", n);
  in->cap = n;
  return M3_OK;
}

/* Every entry of v[n] in [0, pages). */
static m3_status check_pages(const int32_t *v, size_t n, int pages, const char *peer,
                             const char *what) {
  for (size_t i = 0; i < n; i++)
    if (v[i] < 0 || v[i] >= pages)
      return m3_fail(M3_ERR_FORMAT, "FORWARD frame from %s: %s entry %zu is page %d, outside the "
                     "%d pages", peer, what, i, v[i], pages);
  return M3_OK;
}

m3_status m3_node_decode_forward(m3_node_inbox *in, int pages, int hidden, const char *peer,
                                 m3_node_step *out) {
  cursor c = {in->payload.bytes, in->payload.len, peer};
  uint8_t *fixed = NULL, *fields = NULL;
  m3_status st = take(&c, 1, FORWARD_FIXED, "the step fields", &fixed);
  if (st != M3_OK) return st;
  const uint32_t sent_hidden = get32(fixed + 8), n = get32(fixed + 12), copies = get32(fixed + 16);
  const uint32_t argmax = get32(fixed + 20);
  if (argmax > 1)
    return m3_fail(M3_ERR_FORMAT, "FORWARD frame from %s: argmax flag %u (expected 0 or 1)", peer,
                   argmax);
  if (n > M3_NODE_MAX_SEQS)
    return m3_fail(M3_ERR_FORMAT, "FORWARD frame from %s: %u sequences, at most %d", peer, n,
                   M3_NODE_MAX_SEQS);
  if ((st = take(&c, n, SEQ_FIELDS, "the sequence fields", &fields)) != M3_OK ||
      (st = grow_inbox(in, (int)n)) != M3_OK)
    return st;
  size_t blocks = 0;
  for (uint32_t i = 0; i < n; i++) {
    const uint8_t *f = fields + (size_t)i * SEQ_FIELDS;
    const uint32_t T = get32(f), n_logits = get32(f + 4), rows = get32(f + 8);
    const uint32_t table = get32(f + 12);
    if (T > INT32_MAX || n_logits > T || rows > T || table > INT32_MAX)
      return m3_fail(M3_ERR_FORMAT, "FORWARD frame from %s: sequence %u has T %u, n_logits %u, "
                     "media rows %u (at most T), table blocks %u", peer, i, T, n_logits, rows,
                     table);
    if (rows > 0 && (int64_t)sent_hidden != hidden)
      return m3_fail(M3_ERR_FORMAT, "FORWARD frame from %s: media rows of width %u, this node's "
                     "model has hidden size %d", peer, sent_hidden, hidden);
    uint8_t *ids = NULL, *pos = NULL, *media = NULL;
    if ((st = take(&c, T, 4, "ids", &ids)) != M3_OK || (st = take(&c, T, 4, "pos", &pos)) != M3_OK ||
        (st = take(&c, (size_t)rows * (rows ? (size_t)hidden : 0), 4, "media rows", &media)) != M3_OK)
      return st;
    in->seqs[i] = (m3_model_seq){.ids = ints_in_place(ids, T), .pos = ints_in_place(pos, T),
                                 .T = (int)T, .n_logits = (int)n_logits,
                                 .media = rows ? floats_in_place(media, (size_t)rows * (size_t)hidden)
                                               : NULL,
                                 .n_media = (int)rows};
    in->table_at[i] = blocks;
    in->table_blocks[i] = (int)table;
    blocks += table;
  }
  uint8_t *tables = NULL, *pairs = NULL;
  if ((st = take(&c, blocks, 4, "block tables", &tables)) != M3_OK ||
      (st = take(&c, copies, 8, "page copies", &pairs)) != M3_OK)
    return st;
  if (c.left)
    return m3_fail(M3_ERR_FORMAT, "FORWARD frame from %s: %zu bytes after the page copies", peer,
                   c.left);
  int32_t *t = ints_in_place(tables, blocks), *cp = ints_in_place(pairs, 2 * (size_t)copies);
  if ((st = check_pages(t, blocks, pages, peer, "block table")) != M3_OK ||
      (st = check_pages(cp, 2 * (size_t)copies, pages, peer, "page copy")) != M3_OK)
    return st;
  *out = (m3_node_step){.step = get64(fixed), .seqs = in->seqs, .n = (int)n, .argmax = (int)argmax,
                        .tables = t, .table_at = in->table_at, .table_blocks = in->table_blocks,
                        .copies = (m3_page_copy *)(void *)cp, .n_copies = (int)copies};
  return M3_OK;
}

m3_status m3_node_decode_status(const m3_node_inbox *in, m3_node_kind kind, const char *peer,
                                uint64_t *step, m3_status *st, char *message, size_t cap) {
  const uint8_t *p = in->payload.bytes;
  const size_t len = in->payload.len;
  const uint32_t code = len >= STATUS_FIXED ? get32(p + 8) : 0;
  const uint32_t n = len >= STATUS_FIXED ? get32(p + 12) : 0;
  if (len < STATUS_FIXED || n != len - STATUS_FIXED || code > M3_ERR_LIMIT)
    return m3_fail(M3_ERR_FORMAT, "%s frame from %s: %zu bytes with status %u and a message of "
                   "%u bytes", m3_node_kind_name(kind), peer, len, code, n);
  *step = get64(p);
  *st = (m3_status)code;
  const size_t m = n < cap ? n : cap - 1;
  memcpy(message, p + STATUS_FIXED, m);
  message[m] = '\0';
  return M3_OK;
}
