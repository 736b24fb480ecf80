/* tokenizer.h: byte-level BPE from a Hugging Face tokenizer.json, byte-exact with HF `tokenizers`.
 *
 * Encode: added tokens are cut out first (leftmost, longest), the rest goes through the
 * pre-tokenizer steps (Split by regex, ByteLevel) and BPE by merge rank. Special tokens are
 * never added automatically: the chat format writes them itself. Decode: the ByteLevel decoder,
 * with invalid UTF-8 replaced by U+FFFD exactly as Rust's from_utf8_lossy does.
 *
 * A tokenizer keeps a cache of word pieces and scratch buffers, so encode mutates it: use one
 * tokenizer per thread, or serialize calls. Decoding only reads it. */
#ifndef M3_TOK_TOKENIZER_H
#define M3_TOK_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

typedef struct m3_tokenizer m3_tokenizer;

/* Growable outputs; zero-initialise, append with the calls below, release with *_free. */
typedef struct {
  int32_t *data;
  size_t len, cap;
} m3_tok_ids;

typedef struct {
  char *data;
  size_t len, cap;
} m3_tok_text;

void m3_tok_ids_free(m3_tok_ids *ids);
void m3_tok_text_free(m3_tok_text *text);

/* Loads tokenizer.json at `path`. Unsupported features fail with M3_ERR_UNSUPPORTED and a
 * message naming the key (e.g. "model.type", "pre_tokenizer.pretokenizers[1].type"). */
m3_status m3_tok_load(const char *path, m3_tokenizer **out);
/* Same from JSON text in memory; `name` stands for the file in error messages. */
m3_status m3_tok_load_json(const char *json, size_t len, const char *name, m3_tokenizer **out);
void m3_tok_free(m3_tokenizer *tok);

/* Appends the ids of `text` (must be valid UTF-8, else M3_ERR_ARG) to `out`. With `special`
 * false, added tokens marked special are not cut out but encoded as the plain text they spell
 * (HF's `encode_special_tokens = True`, transformers' split_special_tokens): text from a user
 * can then never forge the chat format's markers. Non-special added tokens match either way. */
m3_status m3_tok_encode(m3_tokenizer *tok, const char *text, size_t len, bool special,
                        m3_tok_ids *out);

/* Appends the decoded text of `ids` to `out`. Ids the tokenizer does not know are dropped, as HF
 * does; with `skip_special`, added tokens marked special are dropped too. */
m3_status m3_tok_decode(const m3_tokenizer *tok, const int32_t *ids, size_t n, bool skip_special,
                        m3_tok_text *out);

/* One more than the largest id (model vocabulary and added tokens). */
int32_t m3_tok_n_ids(const m3_tokenizer *tok);
/* The id of a token given by its text (an added token's content, or a vocabulary entry's bytes);
 * -1 if none. */
int32_t m3_tok_find(const m3_tokenizer *tok, const char *text, size_t len);
bool m3_tok_is_special(const m3_tokenizer *tok, int32_t id);

/* Whether p[0..n) is well-formed UTF-8 (no overlong forms, surrogates or code points past
 * U+10FFFF): the check encode applies to text, shared with whoever receives text (the server). */
bool m3_utf8_valid(const uint8_t *p, size_t n);

/* Streaming decode: push ids one at a time; each push returns the bytes that are now complete
 * UTF-8 (possibly none), holding back a trailing incomplete sequence. The concatenation of every
 * push and the final flush equals m3_tok_decode of all the ids. */
typedef struct {
  const m3_tokenizer *tok;
  bool skip_special;
  uint8_t held[4]; /* bytes of an incomplete trailing UTF-8 sequence */
  size_t n_held;
  m3_tok_text out; /* what the last call returned */
} m3_detok_stream;

void m3_detok_stream_init(m3_detok_stream *s, const m3_tokenizer *tok, bool skip_special);
/* `*text`/`*len` stay valid until the next call on `s`. */
m3_status m3_detok_stream_push(m3_detok_stream *s, int32_t id, const char **text, size_t *len);
/* Ends the stream: a held incomplete sequence becomes U+FFFD. */
m3_status m3_detok_stream_finish(m3_detok_stream *s, const char **text, size_t *len);
void m3_detok_stream_free(m3_detok_stream *s);

#endif
