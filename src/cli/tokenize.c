/* tokenize.c: `m3 tokenize`, `m3 detokenize` and `m3 bench tok`.
 *
 *   m3 tokenize   (--model DIR | --tokenizer FILE) (--text S | --file F) [--json]
 *   m3 detokenize (--model DIR | --tokenizer FILE) --ids 1,2,3 [--skip-special]
 *   m3 bench tok  (--model DIR | --tokenizer FILE) --file F [--repeat N] [--lines]
 *
 * tokenize prints the ids separated by spaces (or a JSON array); detokenize prints the text as
 * is, with no newline added; bench tok prints single-thread encode speed. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/bench.h"
#include "cli/commands.h"
#include "tok/tokenizer.h"

typedef struct {
  const char *model, *tokenizer, *text, *file, *ids;
  bool json, skip_special, lines;
  long repeat;
} tok_args;

static int usage_error(const char *cmd, const char *msg) {
  fprintf(stderr, "m3 %s: %s\n", cmd, msg);
  return 2;
}

/* Returns 0, or the exit code for a bad flag. */
static int parse_args(int argc, char **argv, tok_args *a) {
  *a = (tok_args){.repeat = 5};
  for (int i = 1; i < argc; i++) {
    const char *f = argv[i];
    const char **value = strcmp(f, "--model") == 0       ? &a->model
                         : strcmp(f, "--tokenizer") == 0 ? &a->tokenizer
                         : strcmp(f, "--text") == 0      ? &a->text
                         : strcmp(f, "--file") == 0      ? &a->file
                         : strcmp(f, "--ids") == 0       ? &a->ids
                                                         : NULL;
    if (value) {
      if (i + 1 == argc) return m3_cli_fail(argv[0], m3_fail(M3_ERR_ARG, "%s needs a value", f));
      *value = argv[++i];
    } else if (strcmp(f, "--repeat") == 0 && i + 1 < argc) {
      char *end;
      a->repeat = strtol(argv[++i], &end, 10);
      if (*end || a->repeat < 1) return m3_cli_fail(argv[0], m3_fail(M3_ERR_ARG, "--repeat: expected a positive count"));
    } else if (strcmp(f, "--json") == 0) {
      a->json = true;
    } else if (strcmp(f, "--skip-special") == 0) {
      a->skip_special = true;
    } else if (strcmp(f, "--lines") == 0) {
      a->lines = true;
    } else {
      return m3_cli_fail(argv[0], m3_fail(M3_ERR_ARG, "unknown option '%s'", f));
    }
  }
  if (!a->model == !a->tokenizer) return usage_error(argv[0], "give one of --model DIR or --tokenizer FILE");
  return 0;
}

static m3_status load_tokenizer(const tok_args *a, m3_tokenizer **tok) {
  if (a->tokenizer) return m3_tok_load(a->tokenizer, tok);
  size_t n = strlen(a->model) + sizeof "/tokenizer.json";
  char *path = malloc(n);
  if (!path) return m3_fail(M3_ERR_NOMEM, "tokenizer path");
  snprintf(path, n, "%s/tokenizer.json", a->model);
  m3_status s = m3_tok_load(path, tok);
  free(path);
  return s;
}

static m3_status read_file(const char *path, char **data, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return m3_fail(M3_ERR_IO, "%s: %s", path, strerror(errno));
  size_t cap = 1 << 16, n = 0;
  char *buf = malloc(cap);
  for (size_t got; buf && (got = fread(buf + n, 1, cap - n, f)) > 0;) {
    n += got;
    if (n == cap) {
      char *bigger = realloc(buf, cap *= 2);
      if (!bigger) free(buf);
      buf = bigger;
    }
  }
  bool failed = ferror(f);
  fclose(f);
  if (!buf) return m3_fail(M3_ERR_NOMEM, "%s: reading", path);
  if (failed) {
    free(buf);
    return m3_fail(M3_ERR_IO, "%s: read error", path);
  }
  *data = buf;
  *len = n;
  return M3_OK;
}

int m3_cmd_tokenize(int argc, char **argv) {
  tok_args a;
  int rc = parse_args(argc, argv, &a);
  if (rc) return rc;
  if (!a.text == !a.file) return usage_error(argv[0], "give one of --text S or --file F");
  m3_tokenizer *tok = NULL;
  char *data = NULL;
  size_t len = 0;
  m3_tok_ids ids = {0};
  m3_status s = load_tokenizer(&a, &tok);
  if (s == M3_OK && a.file) s = read_file(a.file, &data, &len);
  if (s == M3_OK) s = m3_tok_encode(tok, a.text ? a.text : data, a.text ? strlen(a.text) : len, true, &ids);
  if (s == M3_OK) {
    fputs(a.json ? "[" : "", stdout);
    for (size_t i = 0; i < ids.len; i++) printf("%s%d", i ? (a.json ? "," : " ") : "", ids.data[i]);
    fputs(a.json ? "]\n" : "\n", stdout);
  }
  m3_tok_ids_free(&ids);
  free(data);
  m3_tok_free(tok);
  return s == M3_OK ? 0 : m3_cli_fail(argv[0], s);
}

/* "1,2,3" (spaces allowed) -> ids. */
static m3_status parse_ids(const char *s, m3_tok_ids *ids) {
  for (const char *p = s; *p;) {
    while (*p == ' ' || *p == ',') p++;
    if (!*p) break;
    char *end;
    errno = 0;
    long v = strtol(p, &end, 10);
    if (end == p || errno || v < 0 || v > INT32_MAX) return m3_fail(M3_ERR_ARG, "--ids: bad id at '%.16s'", p);
    if (ids->len == ids->cap) {
      size_t cap = ids->cap ? 2 * ids->cap : 64;
      int32_t *d = realloc(ids->data, cap * sizeof *d);
      if (!d) return m3_fail(M3_ERR_NOMEM, "--ids");
      ids->data = d;
      ids->cap = cap;
    }
    ids->data[ids->len++] = (int32_t)v;
    p = end;
  }
  return M3_OK;
}

int m3_cmd_detokenize(int argc, char **argv) {
  tok_args a;
  int rc = parse_args(argc, argv, &a);
  if (rc) return rc;
  if (!a.ids) return usage_error(argv[0], "--ids 1,2,3 is required");
  m3_tokenizer *tok = NULL;
  m3_tok_ids ids = {0};
  m3_tok_text text = {0};
  m3_status s = parse_ids(a.ids, &ids);
  if (s == M3_OK) s = load_tokenizer(&a, &tok);
  if (s == M3_OK) s = m3_tok_decode(tok, ids.data, ids.len, a.skip_special, &text);
  if (s == M3_OK) fwrite(text.data, 1, text.len, stdout);
  m3_tok_text_free(&text);
  m3_tok_ids_free(&ids);
  m3_tok_free(tok);
  return s == M3_OK ? 0 : m3_cli_fail(argv[0], s);
}

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Encodes the file once (whole, or line by line with --lines); returns the token count. */
static m3_status encode_once(m3_tokenizer *tok, const char *data, size_t len, bool lines, m3_tok_ids *ids,
                             size_t *n_tokens) {
  *n_tokens = 0;
  for (size_t at = 0; at < len || (at == 0 && len == 0);) {
    size_t n = len - at;
    if (lines) {
      const char *nl = memchr(data + at, '\n', len - at);
      if (nl) n = (size_t)(nl - (data + at)) + 1;
    }
    ids->len = 0;
    m3_status s = m3_tok_encode(tok, data + at, n, true, ids);
    if (s != M3_OK) return s;
    *n_tokens += ids->len;
    at += n;
    if (n == 0) break;
  }
  return M3_OK;
}

int m3_bench_tok(int argc, char **argv) {
  if (argc == 2 && strcmp(argv[1], "--help") == 0) {
    printf("usage: m3 bench tok (--model DIR | --tokenizer FILE) --file F [--repeat N] [--lines]\n"
           "  single-thread encode speed of F (whole, or line by line), first pass and best of N\n");
    return 0;
  }
  tok_args a;
  int rc = parse_args(argc, argv, &a);
  if (rc) return rc;
  if (!a.file) return usage_error(argv[0], "--file F is required");
  m3_tokenizer *tok = NULL;
  char *data = NULL;
  size_t len = 0, n_tokens = 0;
  m3_tok_ids ids = {0};
  double t0 = now_s();
  m3_status s = load_tokenizer(&a, &tok);
  double t_load = now_s() - t0, first = 0, best = 1e30;
  if (s == M3_OK) s = read_file(a.file, &data, &len);
  for (long r = 0; s == M3_OK && r < a.repeat; r++) {
    t0 = now_s();
    s = encode_once(tok, data, len, a.lines, &ids, &n_tokens);
    double t = now_s() - t0;
    if (r == 0) first = t;
    if (t < best) best = t;
  }
  if (s == M3_OK) {
    double mb = (double)len / 1e6;
    printf("file %s: %zu bytes, %zu tokens, %s\n", a.file, len, n_tokens, a.lines ? "line by line" : "whole");
    printf("load %.3f s\n", t_load);
    printf("first pass (cold cache): %.2f MB/s, %.0f tokens/s\n", mb / first, (double)n_tokens / first);
    printf("best of %ld: %.2f MB/s, %.0f tokens/s\n", a.repeat, mb / best, (double)n_tokens / best);
  }
  m3_tok_ids_free(&ids);
  free(data);
  m3_tok_free(tok);
  return s == M3_OK ? 0 : m3_cli_fail(argv[0], s);
}
