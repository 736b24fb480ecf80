/* node_link.h: what node 0 and the other nodes of a multi-node engine say to each other (issue 11;
 * engine/ranks.h says what each node runs).
 *
 * Set-up rides on the rendezvous (engine/rendezvous.h): its blob is a header followed by the
 * NCCL ids, little-endian u32s,
 *   magic "M3NH" | version | tp | ep | nnodes | KV pages | KV dtype | quantize_mxfp8 |
 *   hidden | layers | vocab | ids                         (12 x u32), then ids x 128 bytes,
 * padded to M3_NODE_BLOB_BYTES whatever the layout, so that a node of another --tp / --ep still
 * reads it and refuses it by name. Node 0's cache chose the page count and dtype: the other nodes
 * size their storage from them; hidden, layers and vocab catch another --model.
 *
 * Then the rendezvous connection stays open as the step channel, a stream of frames
 *   magic "M3NL" | version | kind | payload length          (3 x u32, u64; little-endian)
 * and the payload, whose length is checked against the kind's limit before anything is
 * allocated. The kinds:
 *   FORWARD  node 0 -> node: one step (m3_node_step), payload
 *              step u64 | hidden | sequences | page copies | argmax          (4 x u32)
 *              per sequence: T | n_logits | media rows | table blocks     (4 x u32)
 *              per sequence: ids[T] i32 | pos[T] i32 | media [rows, hidden] f32
 *              every sequence's block table, one after another (i32) | copies (from, to) i32
 *            Media rows are those the step can splice, rebased: rows media_first ..
 *            min(n_media, media_first + T) of the sequence's, sent with media_first 0 (the k-th
 *            placeholder of the step takes row k either way: model.h m3_model_seq).
 *   STATUS   node -> node 0: step u64 | status u32 | message length u32 | message. After the
 *            rendezvous (step 0, the header accepted or refused), after the set-up (step 0) and
 *            after each FORWARD (its step), when the node's ranks are done.
 *   ABORT    node 0 -> node: the same payload as STATUS: node 0's step failed, the node must
 *            abort its communicators (its ranks may wait in a collective for node 0's, which
 *            will never come). An ABORT of a step the node already answered is ignored.
 *   QUIT     node 0 -> node, no payload: the engine closes; the node exits.
 * A malformed frame is M3_ERR_FORMAT naming the frame, the peer and the field; a short read, a
 * closed connection or a deadline is M3_ERR_IO naming the same. */
#ifndef M3_ENGINE_NODE_LINK_H
#define M3_ENGINE_NODE_LINK_H

#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"
#include "base/status.h"
#include "engine/parallel.h"
#include "model/model.h"

enum {
  M3_NODE_ID_BYTES = 128,                     /* one ncclUniqueId (collectives.h) */
  M3_NODE_MAX_IDS = 1 + M3_PARALLEL_MAX_RANKS, /* the world's, then one per TP group */
  M3_NODE_HEADER_BYTES = 48,
  M3_NODE_BLOB_BYTES = M3_NODE_HEADER_BYTES + M3_NODE_MAX_IDS * M3_NODE_ID_BYTES,
  M3_NODE_FRAME_HEADER_BYTES = 20,
  M3_NODE_MAX_SEQS = 1 << 16,
  M3_NODE_MAX_MESSAGE = 1024,
  /* Node 0 waits this long for the other nodes to join (they load their weights meanwhile), and
   * they for node 0's answer. */
  M3_NODE_JOIN_TIMEOUT_MS = 600000,
  /* Node 0 waits this long for a node's answer to a step (or its set-up); then the step fails
   * naming the node and the communicators are aborted. */
  M3_NODE_STEP_TIMEOUT_MS = 300000,
};
/* The largest FORWARD payload: 8192 tokens with a media row each at hidden 6144 take 201 MB. */
#define M3_NODE_MAX_FRAME ((uint64_t)1 << 30)

typedef struct {
  int tp, ep, nnodes;
  int pages;
  m3_kv_dtype kv_dtype;
  int quantize_mxfp8;
  int hidden, layers, vocab;
  int n_ids;
  uint8_t ids[M3_NODE_MAX_IDS][M3_NODE_ID_BYTES];
} m3_node_header;

void m3_node_header_encode(const m3_node_header *h, uint8_t blob[M3_NODE_BLOB_BYTES]);
/* Bad magic or version, n_ids above M3_NODE_MAX_IDS, an unknown KV dtype: M3_ERR_FORMAT. */
m3_status m3_node_header_decode(const uint8_t blob[M3_NODE_BLOB_BYTES], m3_node_header *h);

typedef enum { M3_NODE_FORWARD = 1, M3_NODE_STATUS, M3_NODE_ABORT, M3_NODE_QUIT } m3_node_kind;

typedef struct {
  int32_t from, to;
} m3_page_copy;

/* One step as node 0's ranks hand it to the others (ranks.c). The arrays are the ranks' own
 * (node 0) or point into the received frame (the others), which their ranks read. */
typedef struct {
  uint64_t step;
  const m3_model_seq *seqs; /* [n]: T, ids, pos, n_logits, media (kv and capture are not sent) */
  int n;
  int argmax;               /* rank 0 hands over greedy ids (ranks.c: the head's all-reduce) */
  int32_t *tables;          /* every entry's block table, one after another */
  size_t *table_at;         /* [n] where entry i's starts */
  int *table_blocks;        /* [n] its length */
  m3_page_copy *copies;
  int n_copies;
} m3_node_step;

/* A growing byte buffer: an encoded frame, or a received payload. */
typedef struct {
  uint8_t *bytes;
  size_t len, cap;
} m3_node_buf;

/* Frames into `out` (header included), replacing what it held. hidden: the media rows' width. */
m3_status m3_node_encode_forward(m3_node_buf *out, const m3_node_step *s, int hidden);
/* STATUS or ABORT: st M3_OK, or the failure and its message (cut to M3_NODE_MAX_MESSAGE). */
m3_status m3_node_encode_status(m3_node_buf *out, m3_node_kind kind, uint64_t step, m3_status st,
                                const char *message);
m3_status m3_node_encode_quit(m3_node_buf *out);

/* Sends an encoded frame before the deadline (rendezvous.h's clock; negative: none). */
m3_status m3_node_send(int fd, const m3_node_buf *frame, int64_t deadline, const char *peer);

/* What a node receives, reused from frame to frame: the payload, decoded in place, and the
 * arrays a FORWARD's m3_node_step points into. */
typedef struct {
  m3_node_buf payload;
  m3_model_seq *seqs;
  size_t *table_at;
  int *table_blocks;
  int cap;
} m3_node_inbox;

void m3_node_inbox_free(m3_node_inbox *in);

/* Reads one frame before the deadline (negative: none for its start; a frame begun then ends
 * within M3_NODE_STEP_TIMEOUT_MS). A peer that closes the connection
 * between frames sets *closed (M3_ERR_IO); a frame cut short, a bad magic, version or kind, a
 * length over the kind's limit fail naming the frame. */
m3_status m3_node_recv(int fd, m3_node_inbox *in, m3_node_kind *kind, int64_t deadline,
                       const char *peer, int *closed);

/* The FORWARD payload in `in` as a step whose arrays point into `in` (valid until the next
 * m3_node_recv). Every count is checked against the bytes left before it is used; table entries
 * and copies must name pages in [0, pages), n_logits and media rows be <= T, media rows be
 * `hidden` wide, and nothing may follow the copies. */
m3_status m3_node_decode_forward(m3_node_inbox *in, int pages, int hidden, const char *peer,
                                 m3_node_step *out);
/* A STATUS or ABORT payload: the step, the status and its message (NUL-terminated, cut to cap). */
m3_status m3_node_decode_status(const m3_node_inbox *in, m3_node_kind kind, const char *peer,
                                uint64_t *step, m3_status *st, char *message, size_t cap);

/* "FORWARD", "STATUS", ... */
const char *m3_node_kind_name(m3_node_kind kind);

#endif
