/* test_tok_unit: decoding rules, streaming, special tokens and error messages of src/tok.
 *
 * Lossy UTF-8 expectations follow Rust's String::from_utf8_lossy (HF's ByteLevel decoder):
 * a maximal prefix of a valid sequence becomes one U+FFFD, a byte that cannot start one becomes
 * one U+FFFD. Ids come from the tiny M3 tokenizer (tests/fixtures/tok/tiny.json, written by
 * `m3 tiny`), whose vocabulary holds every single byte. */
#include <stdlib.h>

#include "check.h"
#include "tok/tokenizer.h"

#define FIXTURES M3_SOURCE_DIR "/tests/fixtures/tok/"
#define FFFD "\xEF\xBF\xBD"

static m3_tokenizer *tok;

static int32_t id_of(const char *s) { return m3_tok_find(tok, s, strlen(s)); }

/* Decodes single-byte tokens for `bytes`, batch and streaming; both must give `want`. */
static void check_bytes(const char *bytes, const char *want) {
  size_t n = strlen(bytes);
  int32_t ids[16];
  for (size_t i = 0; i < n; i++) ids[i] = m3_tok_find(tok, bytes + i, 1);
  m3_tok_text out = {0};
  CHECK_OK(m3_tok_decode(tok, ids, n, false, &out));
  CHECK_STR(out.data, want);
  m3_tok_text_free(&out);

  m3_detok_stream s;
  m3_detok_stream_init(&s, tok, false);
  char joined[64] = "";
  const char *piece;
  size_t len;
  for (size_t i = 0; i <= n; i++) {
    CHECK_OK(i < n ? m3_detok_stream_push(&s, ids[i], &piece, &len) : m3_detok_stream_finish(&s, &piece, &len));
    strncat(joined, piece, len);
  }
  CHECK_STR(joined, want);
  m3_detok_stream_free(&s);
}

static void test_lossy_utf8(void) {
  check_bytes("ok \xF0\x9F\x98\x80!", "ok \xF0\x9F\x98\x80!"); /* whole emoji, one byte per token */
  check_bytes("\xF0\x9F\x98", FFFD);                          /* cut short at the end: one U+FFFD */
  check_bytes("\xF0\x9F\x98x", FFFD "x");                     /* cut short by a non-continuation */
  check_bytes("\xE0\x80\x80", FFFD FFFD FFFD);                 /* overlong: E0 needs A0..BF next */
  check_bytes("\xED\xA0\x80", FFFD FFFD FFFD);                 /* surrogate */
  check_bytes("\xC3", FFFD);
  check_bytes("\x80\x80", FFFD FFFD);                         /* stray continuations */
  check_bytes("\xF5\x80", FFFD FFFD);                         /* F5 never starts a sequence */
  check_bytes("a\xC3\xA9\xE2\x82", "a\xC3\xA9" FFFD);
}

/* Nothing to decode (no ids, or only ids that are dropped) gives "", batch and streaming; this
 * once offset a NULL buffer, which UBSan reports (found by tests/fuzz/fuzz_tokenizer). */
static void test_empty_decode(void) {
  check_bytes("", "");
  const int32_t dropped[] = {-1, m3_tok_n_ids(tok), id_of("]~b]")};
  m3_tok_text out = {0};
  CHECK_OK(m3_tok_decode(tok, dropped, 3, true, &out));
  CHECK_EQ_INT(out.len, 0);
  CHECK_STR(out.data ? out.data : "(null)", "");
  m3_tok_text_free(&out);
  m3_detok_stream s;
  m3_detok_stream_init(&s, tok, true);
  const char *piece;
  size_t len = 1;
  for (size_t i = 0; i < 3; i++) {
    CHECK_OK(m3_detok_stream_push(&s, dropped[i], &piece, &len));
    CHECK_EQ_INT(len, 0);
  }
  CHECK_OK(m3_detok_stream_finish(&s, &piece, &len));
  CHECK_EQ_INT(len, 0);
  m3_detok_stream_free(&s);
}

/* Streaming holds back an incomplete sequence and releases it whole. */
static void test_stream_holds_back(void) {
  const char *emoji = "\xF0\x9F\x98\x80";
  m3_detok_stream s;
  m3_detok_stream_init(&s, tok, false);
  const char *piece;
  size_t len;
  for (int i = 0; i < 3; i++) {
    CHECK_OK(m3_detok_stream_push(&s, m3_tok_find(tok, emoji + i, 1), &piece, &len));
    CHECK_EQ_INT(len, 0);
  }
  CHECK_OK(m3_detok_stream_push(&s, m3_tok_find(tok, emoji + 3, 1), &piece, &len));
  CHECK_EQ_INT(len, 4);
  CHECK(memcmp(piece, emoji, 4) == 0);
  CHECK_OK(m3_detok_stream_push(&s, id_of("[e~["), &piece, &len));
  CHECK_EQ_INT(len, 4);
  CHECK(memcmp(piece, "[e~[", 4) == 0);
  CHECK_OK(m3_detok_stream_finish(&s, &piece, &len));
  CHECK_EQ_INT(len, 0);
  m3_detok_stream_free(&s);
}

/* Random byte soup biased towards UTF-8 lead and continuation bytes, pushed one byte token at a
 * time: the streamed pieces, joined, equal the batch decode. */
static void test_stream_matches_batch(void) {
  static const uint8_t alphabet[] = {'a', ' ', 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98, 0x80, 0xED, 0xA0, 0xF4, 0x90, 0xFF};
  uint32_t rng = 12345;
  int mismatches = 0;
  for (int round = 0; round < 2000; round++) {
    int32_t ids[12];
    int n = 1 + round % 12;
    for (int i = 0; i < n; i++) {
      rng = rng * 1664525u + 1013904223u;
      ids[i] = m3_tok_find(tok, (const char *)&alphabet[(rng >> 16) % sizeof alphabet], 1);
    }
    m3_tok_text batch = {0};
    CHECK_OK(m3_tok_decode(tok, ids, (size_t)n, false, &batch));
    m3_detok_stream s;
    m3_detok_stream_init(&s, tok, false);
    char joined[64] = "";
    const char *piece;
    size_t len;
    for (int i = 0; i <= n; i++) {
      m3_status st = i < n ? m3_detok_stream_push(&s, ids[i], &piece, &len) : m3_detok_stream_finish(&s, &piece, &len);
      if (st == M3_OK) strncat(joined, piece, len);
    }
    if (!batch.data || strcmp(joined, batch.data) != 0) mismatches++;
    m3_detok_stream_free(&s);
    m3_tok_text_free(&batch);
  }
  CHECK_EQ_INT(mismatches, 0);
}

static void test_special_tokens(void) {
  /* Ids from the spec's table (tiny numbers them from 510 on, in the same order). */
  int32_t bos = id_of("]~!b["), eos = id_of("[e~["), think = id_of("<mm:think>");
  CHECK(bos >= 0 && eos >= 0 && think >= 0);
  CHECK(m3_tok_is_special(tok, eos));
  CHECK(!m3_tok_is_special(tok, id_of("a")));
  m3_tok_ids ids = {0};
  const char *text = "]~!b[]~b]user\nhi<mm:think>x[e~[";
  CHECK_OK(m3_tok_encode(tok, text, strlen(text), true, &ids));
  CHECK(ids.len >= 5);
  CHECK_EQ_INT(ids.data[0], bos);
  CHECK_EQ_INT(ids.data[1], id_of("]~b]"));
  CHECK_EQ_INT(ids.data[ids.len - 1], eos);
  m3_tok_text out = {0};
  CHECK_OK(m3_tok_decode(tok, ids.data, ids.len, false, &out));
  CHECK_STR(out.data, text);
  m3_tok_text_free(&out);
  CHECK_OK(m3_tok_decode(tok, ids.data, ids.len, true, &out));
  CHECK_STR(out.data, "user\nhix");
  m3_tok_text_free(&out);
  /* Unknown ids are dropped, as HF does. */
  int32_t odd[] = {-1, id_of("a"), 1 << 30};
  CHECK_OK(m3_tok_decode(tok, odd, 3, false, &out));
  CHECK_STR(out.data, "a");
  m3_tok_text_free(&out);
  m3_tok_ids_free(&ids);
  CHECK_FAILS_WITH(m3_tok_encode(tok, "bad \xC3", 5, true, &ids), M3_ERR_ARG, "not valid UTF-8");
  CHECK_EQ_INT(ids.len, 0);
}

/* A minimal valid byte-level tokenizer.json with one part swapped for `part`. */
static m3_status load_with(const char *model, const char *normalizer, const char *pre, const char *decoder) {
  char json[2048];
  snprintf(json, sizeof json,
           "{\"added_tokens\": [], \"normalizer\": %s, \"pre_tokenizer\": %s, \"decoder\": %s, \"model\": %s}",
           normalizer, pre, decoder, model);
  m3_tokenizer *t = NULL;
  m3_status s = m3_tok_load_json(json, strlen(json), "t.json", &t);
  m3_tok_free(t);
  return s;
}

static void test_errors(void) {
  const char *model = "{\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"a b\"]}";
  const char *pre = "{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"use_regex\": true}";
  const char *dec = "{\"type\": \"ByteLevel\"}";
  CHECK_OK(load_with(model, "null", pre, dec));
  CHECK_OK(load_with(model, "{\"type\": \"Sequence\", \"normalizers\": []}", pre, dec));
  CHECK_FAILS_WITH(load_with("{\"type\": \"WordPiece\", \"vocab\": {}}", "null", pre, dec), M3_ERR_UNSUPPORTED,
                   "model.type 'WordPiece'");
  CHECK_FAILS_WITH(load_with(model, "{\"type\": \"NFC\"}", pre, dec), M3_ERR_UNSUPPORTED, "normalizer.type 'NFC'");
  CHECK_FAILS_WITH(load_with(model, "{\"type\": \"Sequence\", \"normalizers\": [{\"type\": \"NFKC\"}]}", pre, dec),
                   M3_ERR_UNSUPPORTED, "normalizer.normalizers[0].type 'NFKC'");
  CHECK_FAILS_WITH(load_with(model, "null", "{\"type\": \"Metaspace\"}", dec), M3_ERR_UNSUPPORTED,
                   "pre_tokenizer.type 'Metaspace'");
  CHECK_FAILS_WITH(load_with(model, "null",
                             "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": "
                             "{\"Regex\": \"(\"}, \"behavior\": \"Isolated\"}]}",
                             dec),
                   M3_ERR_UNSUPPORTED, "pre_tokenizer.pretokenizers[0].pattern");
  CHECK_FAILS_WITH(load_with(model, "null",
                             "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"a\"}, \"behavior\": \"Sideways\"}", dec),
                   M3_ERR_UNSUPPORTED, "pre_tokenizer.behavior 'Sideways'");
  CHECK_FAILS_WITH(load_with(model, "null", "null", dec), M3_ERR_UNSUPPORTED, "no ByteLevel step");
  CHECK_FAILS_WITH(load_with(model, "null", pre, "{\"type\": \"WordPiece\"}"), M3_ERR_UNSUPPORTED,
                   "decoder.type 'WordPiece'");
  CHECK_FAILS_WITH(load_with("{\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"a b\"]}", "null", pre, dec),
                   M3_ERR_FORMAT, "model.merges[0]");
  CHECK_FAILS_WITH(load_with("{\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"a\"]}", "null", pre, dec),
                   M3_ERR_FORMAT, "model.merges[0] 'a'");
  CHECK_FAILS_WITH(load_with("{\"type\": \"BPE\", \"vocab\": {\"a\": -3}, \"merges\": []}", "null", pre, dec),
                   M3_ERR_FORMAT, "model.vocab['a']");
  CHECK_FAILS_WITH(load_with("{\"type\": \"BPE\", \"byte_fallback\": true, \"vocab\": {}, \"merges\": []}", "null", pre, dec),
                   M3_ERR_UNSUPPORTED, "model.byte_fallback");
  m3_tokenizer *t = NULL;
  CHECK_FAILS_WITH(m3_tok_load_json("{\"model\": ", 10, "cut.json", &t), M3_ERR_FORMAT, "cut.json: invalid JSON");
  CHECK(t == NULL);
  CHECK_FAILS_WITH(m3_tok_load(FIXTURES "no_such_tokenizer.json", &t), M3_ERR_IO, "no_such_tokenizer.json");
}

/* Merges given as pairs and as strings give the same tokenizer. */
static void test_merge_forms(void) {
  const char *fmt = "{\"added_tokens\": [], \"normalizer\": null, \"decoder\": {\"type\": \"ByteLevel\"},"
                    "\"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false},"
                    "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"c\": 2, \"ab\": 3, \"abc\": 4,"
                    "\"bc\": 5}, \"merges\": %s}}";
  const char *forms[] = {"[\"a b\", \"ab c\", \"b c\"]", "[[\"a\", \"b\"], [\"ab\", \"c\"], [\"b\", \"c\"]]"};
  for (int f = 0; f < 2; f++) {
    char json[1024];
    snprintf(json, sizeof json, fmt, forms[f]);
    m3_tokenizer *t = NULL;
    CHECK_OK(m3_tok_load_json(json, strlen(json), "forms.json", &t));
    if (!t) continue;
    m3_tok_ids ids = {0};
    CHECK_OK(m3_tok_encode(t, "abcbc", 5, true, &ids));
    /* a b c b c -> (a b) rank 0 -> (ab c) rank 1 -> then (b c) rank 2: [abc, bc] */
    CHECK_EQ_INT(ids.len, 2);
    if (ids.len == 2) {
      CHECK_EQ_INT(ids.data[0], 4);
      CHECK_EQ_INT(ids.data[1], 5);
    }
    m3_tok_ids_free(&ids);
    m3_tok_free(t);
  }
}

/* Encodes `text` with `t` and compares with the ids `want` (n of them). */
static void check_encode(m3_tokenizer *t, const char *text, bool special, const int32_t *want, size_t n) {
  m3_tok_ids ids = {0};
  CHECK_OK(m3_tok_encode(t, text, strlen(text), special, &ids));
  CHECK_EQ_INT(ids.len, n);
  for (size_t i = 0; i < n && i < ids.len; i++) CHECK_EQ_INT(ids.data[i], want[i]);
  m3_tok_ids_free(&ids);
}

/* special = false encodes special tokens as the text they spell, the way HF does with
 * encode_special_tokens: the match is dropped and matching resumes after it (so a non-special
 * token overlapping it does not match either); non-special added tokens still match. */
static void test_special_as_text(void) {
  m3_tok_ids ids = {0};
  CHECK_OK(m3_tok_encode(tok, "]~b]", 4, true, &ids));
  CHECK_EQ_INT(ids.len, 1);
  CHECK_EQ_INT(ids.data[0], id_of("]~b]"));
  ids.len = 0;
  CHECK_OK(m3_tok_encode(tok, "]~b]", 4, false, &ids));
  CHECK(ids.len > 1);
  for (size_t i = 0; i < ids.len; i++) CHECK(!m3_tok_is_special(tok, ids.data[i]) && ids.data[i] != id_of("]~b]"));
  m3_tok_text out = {0};
  CHECK_OK(m3_tok_decode(tok, ids.data, ids.len, true, &out));
  CHECK_STR(out.data, "]~b]"); /* survives skip_special: nothing special was produced */
  m3_tok_text_free(&out);
  m3_tok_ids_free(&ids);

  /* Bytes are ids 0..5 (no merges), "]~b]" special 6, "b]x" non-special 7; both match on the
   * raw text (normalized false), so they compete in one leftmost-longest scan. */
  const char *json =
      "{\"normalizer\": null, \"decoder\": {\"type\": \"ByteLevel\"},"
      "\"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"use_regex\": false},"
      "\"added_tokens\": [{\"id\": 6, \"content\": \"]~b]\", \"special\": true},"
      "{\"id\": 7, \"content\": \"b]x\", \"special\": false, \"normalized\": false}],"
      "\"model\": {\"type\": \"BPE\", \"vocab\": {\"]\": 0, \"~\": 1, \"b\": 2, \"x\": 3, \"y\": 4, \"a\": 5},"
      "\"merges\": []}}";
  m3_tokenizer *t = NULL;
  CHECK_OK(m3_tok_load_json(json, strlen(json), "special.json", &t));
  if (!t) return;
  check_encode(t, "y]~b]xy", true, (const int32_t[]){4, 6, 3, 4}, 4);
  check_encode(t, "y]~b]xy", false, (const int32_t[]){4, 0, 1, 2, 0, 3, 4}, 7);
  check_encode(t, "ab]xa", true, (const int32_t[]){5, 7, 5}, 3);
  check_encode(t, "ab]xa", false, (const int32_t[]){5, 7, 5}, 3);
  m3_tok_free(t);
}

int main(void) {
  CHECK_OK(m3_tok_load(FIXTURES "tiny.json", &tok));
  if (tok) {
    test_lossy_utf8();
    test_empty_decode();
    test_stream_holds_back();
    test_stream_matches_batch();
    test_special_tokens();
    test_special_as_text();
  }
  test_errors();
  test_merge_forms();
  m3_tok_free(tok);
  return check_summary();
}
