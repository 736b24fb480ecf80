/* fuzz_node_link: what a node reads from another (engine/node_link.h), from arbitrary bytes: the
 * rendezvous header blob, and frames received from a socket and decoded (FORWARD into a step whose
 * arrays are then read end to end, so that ASan sees any that point past the payload; STATUS and
 * ABORT into their message). Every outcome is a status; a crash, a leak or an out-of-bounds read
 * is a finding. Input: byte 0 even: the rest is a frame stream (frames read until one fails);
 * odd: the rest is a header blob (zero-padded). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "engine/node_link.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

enum { PAGES = 64, HIDDEN = 16, MAX_STREAM = 32768 };

/* Reads every element a decoded step points at; the sum only keeps the reads. */
static volatile uint64_t sink;

static void touch_step(const m3_node_step *s) {
  uint64_t sum = s->step;
  for (int i = 0; i < s->n; i++) {
    const m3_model_seq *q = &s->seqs[i];
    for (int t = 0; t < q->T; t++) sum += (uint32_t)q->ids[t] + (uint32_t)q->pos[t];
    for (int m = 0; q->media && m < q->n_media; m++)
      for (int c = 0; c < HIDDEN; c++) sum += (uint64_t)(q->media[(size_t)m * HIDDEN + c] != 0);
    for (int b = 0; b < s->table_blocks[i]; b++) sum += (uint32_t)s->tables[s->table_at[i] + b];
  }
  for (int c = 0; c < s->n_copies; c++) sum += (uint32_t)s->copies[c].from + (uint32_t)s->copies[c].to;
  sink = sum;
}

static void read_frames(const uint8_t *data, size_t size) {
  int fds[2];
  if (size > MAX_STREAM || socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) return;
  /* The whole stream is in the socket before the first read: the reads never wait. */
  if (write(fds[1], data, size) != (ssize_t)size) {
    close(fds[0]);
    close(fds[1]);
    return;
  }
  shutdown(fds[1], SHUT_WR);
  m3_node_inbox in = {0};
  for (;;) {
    m3_node_kind kind;
    int closed = 0;
    if (m3_node_recv(fds[0], &in, &kind, -1, "fuzz", &closed) != M3_OK) break;
    if (kind == M3_NODE_FORWARD) {
      m3_node_step s;
      if (m3_node_decode_forward(&in, PAGES, HIDDEN, "fuzz", &s) != M3_OK) break;
      touch_step(&s);
    } else if (kind == M3_NODE_STATUS || kind == M3_NODE_ABORT) {
      uint64_t step;
      m3_status st;
      char message[64];
      if (m3_node_decode_status(&in, kind, "fuzz", &step, &st, message, sizeof message) != M3_OK)
        break;
      if (strlen(message) >= sizeof message) abort(); /* always terminated within cap */
    }
  }
  m3_node_inbox_free(&in);
  close(fds[0]);
  close(fds[1]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  if (data[0] & 1) {
    static uint8_t blob[M3_NODE_BLOB_BYTES];
    memset(blob, 0, sizeof blob);
    memcpy(blob, data + 1, size - 1 < sizeof blob ? size - 1 : sizeof blob);
    m3_node_header h;
    if (m3_node_header_decode(blob, &h) == M3_OK && (h.n_ids < 0 || h.n_ids > M3_NODE_MAX_IDS))
      abort();
  } else {
    read_frames(data + 1, size - 1);
  }
  return 0;
}
