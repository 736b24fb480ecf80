/* pretok.c: pre-tokenizer steps, applied depth-first to each piece of text.
 *
 * Split: HF lists the regex matches of a piece (Oniguruma's find_iter, which skips an empty match
 * right where the previous match ended), fills the gaps with non-match spans, flips them when
 * `invert`, then merges or drops spans per the behavior, and drops empty pieces. PCRE2 with UTF
 * and UCP gives the same Unicode classes (\s includes U+0085) for the patterns these files use.
 * ByteLevel: optionally prepends a space to each piece, optionally splits it with the GPT-2 regex;
 * the byte->unicode mapping itself is a no-op here because words stay raw bytes. */
#include <stdlib.h>

#include "tok/tok_internal.h"

const char tok_gpt2_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

m3_status tok_step_compile(tok_step *st, const char *pattern, size_t len, bool literal, const char *key) {
  int err;
  PCRE2_SIZE at;
  uint32_t opts = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
  st->re = pcre2_compile((PCRE2_SPTR)pattern, len, opts, &err, &at, NULL);
  if (!st->re) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    return m3_fail(M3_ERR_UNSUPPORTED, "%s: regex not supported at offset %zu: %s", key, (size_t)at,
                   (const char *)msg);
  }
  /* Without JIT (e.g. no executable memory) pcre2_match falls back to the interpreter. */
  pcre2_jit_compile(st->re, PCRE2_JIT_COMPLETE);
  return M3_OK;
}

static size_t utf8_len(uint8_t lead) { return lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4; }

static bool push_span(tok_step *st, size_t *n, size_t start, size_t end, bool match) {
  if (!tok_reserve((void **)&st->spans, &st->spans_cap, *n + 1, sizeof(tok_span))) return false;
  st->spans[(*n)++] = (tok_span){(uint32_t)start, (uint32_t)end, match};
  return true;
}

/* Spans covering subject[0..len): regex matches and the gaps between them. */
static m3_status find_spans(m3_tokenizer *tok, tok_step *st, const uint8_t *subject, size_t len,
                            size_t *n_spans) {
  size_t n = 0, prev = 0, search = 0;
  long last_match = -1;
  while (search <= len) {
    int rc = pcre2_match(st->re, subject, len, search, PCRE2_NO_UTF_CHECK, tok->md, NULL);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof msg);
      return m3_fail(M3_ERR_LIMIT, "pre_tokenizer regex: %s", (const char *)msg);
    }
    const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(tok->md);
    size_t s = ov[0], e = ov[1];
    if (s == e && last_match == (long)e) {
      search += search < len ? utf8_len(subject[search]) : 1;
      continue;
    }
    search = e;
    last_match = (long)e;
    if (s != prev && !push_span(st, &n, prev, s, false)) return m3_fail(M3_ERR_NOMEM, "pre-tokenize");
    if (!push_span(st, &n, s, e, true)) return m3_fail(M3_ERR_NOMEM, "pre-tokenize");
    prev = e;
  }
  if (prev != len && !push_span(st, &n, prev, len, false)) return m3_fail(M3_ERR_NOMEM, "pre-tokenize");
  *n_spans = n;
  return M3_OK;
}

/* Applies the split behavior in place; afterwards span.match means "drop this piece". Returns the
 * index of the first resulting span (MergedWithNext builds its result at the end). */
static size_t apply_behavior(tok_span *sp, size_t *n, tok_split_behavior behavior, bool invert) {
  if (invert)
    for (size_t i = 0; i < *n; i++) sp[i].match = !sp[i].match;
  size_t out = 0;
  bool prev = false;
  switch (behavior) {
    case SPLIT_ISOLATED:
      for (size_t i = 0; i < *n; i++) sp[i].match = false;
      return 0;
    case SPLIT_REMOVED: return 0;
    case SPLIT_MERGED_PREV:
      for (size_t i = 0; i < *n; i++) {
        tok_span s = sp[i];
        if (s.match && !prev && out > 0) sp[out - 1].end = s.end;
        else sp[out++] = (tok_span){s.start, s.end, false};
        prev = s.match;
      }
      *n = out;
      return 0;
    case SPLIT_CONTIGUOUS:
      for (size_t i = 0; i < *n; i++) {
        tok_span s = sp[i];
        if (s.match == prev && out > 0) sp[out - 1].end = s.end;
        else sp[out++] = (tok_span){s.start, s.end, false};
        prev = s.match;
      }
      *n = out;
      return 0;
    case SPLIT_MERGED_NEXT: {
      size_t w = *n;
      for (size_t i = *n; i-- > 0;) {
        tok_span s = sp[i];
        if (s.match && !prev && w < *n) sp[w].start = s.start;
        else sp[--w] = (tok_span){s.start, s.end, false};
        prev = s.match;
      }
      return w;
    }
  }
  return 0;
}

m3_status tok_pretokenize(m3_tokenizer *tok, int k, size_t off, size_t len, m3_tok_ids *out) {
  if (k == tok->n_steps) return tok_bpe_word(tok, tok->work + off, len, out);
  tok_step *st = &tok->steps[k];
  if (st->byte_level) {
    if (st->add_prefix_space && tok->work[off] != ' ') {
      if (!tok_reserve((void **)&tok->work, &tok->work_cap, tok->work_len + len + 1, 1))
        return m3_fail(M3_ERR_NOMEM, "pre-tokenize");
      tok->work[tok->work_len] = ' ';
      memcpy(tok->work + tok->work_len + 1, tok->work + off, len);
      off = tok->work_len;
      len += 1;
      tok->work_len += len;
    }
    if (!st->re) return tok_pretokenize(tok, k + 1, off, len, out);
  }
  size_t n;
  m3_status s = find_spans(tok, st, tok->work + off, len, &n);
  if (s != M3_OK) return s;
  size_t first = apply_behavior(st->spans, &n, st->byte_level ? SPLIT_ISOLATED : st->behavior,
                                !st->byte_level && st->invert);
  for (size_t i = first; i < n; i++) {
    tok_span sp = st->spans[i];
    if (sp.match || sp.end == sp.start) continue;
    if ((s = tok_pretokenize(tok, k + 1, off + sp.start, sp.end - sp.start, out)) != M3_OK) return s;
  }
  return M3_OK;
}
