/* fuzz_tokenizer: the byte-level BPE tokenizer of tests/fixtures/tok/tiny.json (no normalizer, so
 * encode then decode must give back the text exactly) on arbitrary bytes.
 *   As text: valid UTF-8 (checked here independently) encodes, with special tokens matched and
 *   not, to known ids that decode to the same bytes; anything else fails with M3_ERR_ARG.
 *   As ids (two bytes each, some out of range): streaming decode hands out only valid UTF-8 and
 *   its pieces concatenate to the one-shot decode.
 * M3_FUZZ_TOKENIZER overrides the tokenizer file. */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tok/tokenizer.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static m3_tokenizer *tok;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  const char *path = getenv("M3_FUZZ_TOKENIZER");
  if (m3_tok_load(path ? path : M3_SOURCE_DIR "/tests/fixtures/tok/tiny.json", &tok) != M3_OK)
    abort();
  return 0;
}

/* RFC 3629: shortest form, no surrogates, nothing above U+10FFFF. */
static bool utf8_valid(const uint8_t *p, size_t n) {
  size_t i = 0;
  while (i < n) {
    uint8_t c = p[i];
    size_t k;
    uint32_t cp;
    if (c < 0x80) { i++; continue; }
    if (c >= 0xC2 && c <= 0xDF) { k = 1; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { k = 2; cp = c & 0x0F; }
    else if (c >= 0xF0 && c <= 0xF4) { k = 3; cp = c & 0x07; }
    else return false;
    if (i + k >= n) return false;
    for (size_t j = 1; j <= k; j++) {
      if ((p[i + j] & 0xC0) != 0x80) return false;
      cp = cp << 6 | (p[i + j] & 0x3F);
    }
    if ((k == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
        (k == 3 && (cp < 0x10000 || cp > 0x10FFFF)))
      return false;
    i += k + 1;
  }
  return true;
}

static void check_text(const uint8_t *data, size_t size, bool special) {
  bool valid = utf8_valid(data, size);
  m3_tok_ids ids = {0};
  m3_status st = m3_tok_encode(tok, (const char *)data, size, special, &ids);
  if (!valid) {
    if (st != M3_ERR_ARG) abort();
    m3_tok_ids_free(&ids);
    return;
  }
  if (st != M3_OK) abort();
  int32_t n_ids = m3_tok_n_ids(tok);
  for (size_t i = 0; i < ids.len; i++)
    if (ids.data[i] < 0 || ids.data[i] >= n_ids) abort();
  m3_tok_text text = {0};
  if (m3_tok_decode(tok, ids.data, ids.len, false, &text) != M3_OK || text.len != size ||
      (size && memcmp(text.data, data, size) != 0))
    abort();
  m3_tok_text_free(&text);
  m3_tok_ids_free(&ids);
}

static void check_stream(const uint8_t *data, size_t size) {
  if (size == 0) return;
  bool skip_special = data[0] & 1;
  size_t n = (size - 1) / 2;
  int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
  if (!ids) return;
  /* A few ids past either end of the vocabulary: decode must drop them. */
  int32_t span = m3_tok_n_ids(tok) + 8;
  for (size_t i = 0; i < n; i++)
    ids[i] = (int32_t)((data[1 + 2 * i] | data[2 + 2 * i] << 8) % span) - 4;
  m3_tok_text whole = {0}, streamed = {0};
  if (m3_tok_decode(tok, ids, n, skip_special, &whole) != M3_OK) abort();
  m3_detok_stream s;
  m3_detok_stream_init(&s, tok, skip_special);
  const char *piece;
  size_t len;
  for (size_t i = 0; i <= n; i++) {
    m3_status st = i < n ? m3_detok_stream_push(&s, ids[i], &piece, &len)
                         : m3_detok_stream_finish(&s, &piece, &len);
    if (st != M3_OK || !utf8_valid((const uint8_t *)piece, len)) abort();
    streamed.data = realloc(streamed.data, streamed.len + len + 1);
    if (!streamed.data) abort();
    if (len) memcpy(streamed.data + streamed.len, piece, len);
    streamed.len += len;
  }
  if (streamed.len != whole.len || (whole.len && memcmp(streamed.data, whole.data, whole.len)))
    abort();
  if (!utf8_valid((const uint8_t *)whole.data, whole.len)) abort();
  m3_detok_stream_free(&s);
  free(streamed.data);
  m3_tok_text_free(&whole);
  free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  check_text(data, size, false);
  check_text(data, size, true);
  check_stream(data, size);
  return 0;
}
