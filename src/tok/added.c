/* added.c: cutting added tokens out of the text before pre-tokenization.
 *
 * HF matches added tokens with an Aho-Corasick automaton in LeftmostLongest mode: scanning left
 * to right, the first position where any token starts wins, and among tokens starting there the
 * longest. A byte trie with a 256-entry root gives the same answer; since almost no byte starts
 * an added token, the scan costs one table lookup per byte. */
#include <stdlib.h>

#include "tok/tok_internal.h"

void tok_trie_init(tok_trie *t) {
  memset(t, 0, sizeof *t);
  for (int b = 0; b < 256; b++) t->root[b] = -1;
}

void tok_trie_free(tok_trie *t) { free(t->nodes); }

static int32_t trie_new_node(tok_trie *t, uint8_t byte) {
  if (t->n_nodes == t->cap_nodes) {
    int32_t cap = t->cap_nodes ? 2 * t->cap_nodes : 256;
    tok_trie_node *nodes = realloc(t->nodes, (size_t)cap * sizeof *nodes);
    if (!nodes) return -1;
    t->nodes = nodes;
    t->cap_nodes = cap;
  }
  t->nodes[t->n_nodes] = (tok_trie_node){.child = -1, .sibling = -1, .token = -1, .byte = byte};
  return t->n_nodes++;
}

m3_status tok_trie_add(tok_trie *t, const uint8_t *s, size_t n, int32_t token) {
  if (t->root[s[0]] < 0 && (t->root[s[0]] = trie_new_node(t, s[0])) < 0)
    return m3_fail(M3_ERR_NOMEM, "added-token trie");
  int32_t node = t->root[s[0]];
  for (size_t i = 1; i < n; i++) {
    int32_t c = t->nodes[node].child;
    while (c >= 0 && t->nodes[c].byte != s[i]) c = t->nodes[c].sibling;
    if (c < 0) {
      if ((c = trie_new_node(t, s[i])) < 0) return m3_fail(M3_ERR_NOMEM, "added-token trie");
      t->nodes[c].sibling = t->nodes[node].child;
      t->nodes[node].child = c;
    }
    node = c;
  }
  /* A repeated content keeps its first token, like the automaton's lowest pattern index. */
  if (t->nodes[node].token < 0) t->nodes[node].token = token;
  return M3_OK;
}

/* Longest token starting at text[p]; returns its index (and *end) or -1. */
static int32_t trie_longest_at(const tok_trie *t, const uint8_t *text, size_t p, size_t n,
                               size_t *end) {
  int32_t node = t->root[text[p]], best = -1;
  for (size_t q = p; node >= 0;) {
    if (t->nodes[node].token >= 0) {
      best = t->nodes[node].token;
      *end = q + 1;
    }
    if (++q == n) break;
    int32_t c = t->nodes[node].child;
    while (c >= 0 && t->nodes[c].byte != text[q]) c = t->nodes[c].sibling;
    node = c;
  }
  return best;
}

/* Unicode White_Space, which Rust's regex `\s` (used by HF for lstrip/rstrip) matches. */
static bool is_white_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

/* Decodes the (valid) UTF-8 character at p; returns its length. */
static size_t utf8_char(const uint8_t *p, uint32_t *c) {
  if (p[0] < 0x80) return *c = p[0], 1;
  if (p[0] < 0xE0) return *c = (uint32_t)(p[0] & 0x1F) << 6 | (p[1] & 0x3F), 2;
  if (p[0] < 0xF0) return *c = (uint32_t)(p[0] & 0x0F) << 12 | (uint32_t)(p[1] & 0x3F) << 6 | (p[2] & 0x3F), 3;
  *c = (uint32_t)(p[0] & 0x07) << 18 | (uint32_t)(p[1] & 0x3F) << 12 | (uint32_t)(p[2] & 0x3F) << 6 |
       (p[3] & 0x3F);
  return 4;
}

/* Start of the character that ends just before text[p] (p > 0). */
static size_t utf8_prev(const uint8_t *text, size_t p) {
  do p--;
  while (p > 0 && (text[p] & 0xC0) == 0x80);
  return p;
}

static bool is_word_char_at(const m3_tokenizer *tok, const uint8_t *text, size_t p) {
  uint32_t c;
  size_t len = utf8_char(text + p, &c);
  return pcre2_match(tok->word_char, text + p, len, 0, PCRE2_ANCHORED | PCRE2_NO_UTF_CHECK, tok->md,
                     NULL) >= 0;
}

static bool push_piece(m3_tokenizer *tok, int level, size_t *count, size_t start, size_t end,
                       int32_t token) {
  if (!tok_reserve((void **)&tok->pieces[level], &tok->pieces_cap[level], *count + 1,
                   sizeof(tok_piece)))
    return false;
  tok->pieces[level][(*count)++] = (tok_piece){(uint32_t)start, (uint32_t)end, token};
  return true;
}

m3_status tok_added_split(m3_tokenizer *tok, int level, size_t off, size_t len, bool special,
                          size_t *n_pieces) {
  const tok_trie *t = level == 0 ? &tok->trie_raw : &tok->trie_norm;
  size_t count = 0, done = 0; /* done: end of the last emitted piece, relative to off */
  for (size_t p = 0; p < len;) {
    const uint8_t *text = tok->work + off; /* re-read: nothing here grows work */
    size_t end = 0;
    int32_t k = t->root[text[p]] < 0 ? -1 : trie_longest_at(t, text, p, len, &end);
    if (k < 0) {
      p++;
      continue;
    }
    const tok_added *a = &tok->added[k];
    size_t start = p, stop = end;
    if (a->special && !special) {
      p = end; /* HF drops the match and its automaton resumes after it */
      continue;
    }
    if (a->single_word) {
      bool left_ok = start == 0 || !is_word_char_at(tok, text, utf8_prev(text, start));
      bool right_ok = stop == len || !is_word_char_at(tok, text, stop);
      if (!left_ok || !right_ok) {
        p = end; /* the automaton resumes after the discarded match */
        continue;
      }
    }
    if (a->lstrip) {
      size_t s = start;
      uint32_t c;
      while (s > 0) {
        size_t q = utf8_prev(text, s);
        utf8_char(text + q, &c);
        if (!is_white_space(c)) break;
        s = q;
      }
      start = s > done ? s : done;
    }
    if (a->rstrip) {
      uint32_t c;
      while (stop < len) {
        size_t l = utf8_char(text + stop, &c);
        if (!is_white_space(c)) break;
        stop += l;
      }
    }
    if (done < start && !push_piece(tok, level, &count, off + done, off + start, -1))
      return m3_fail(M3_ERR_NOMEM, "added-token split");
    if (!push_piece(tok, level, &count, off + start, off + stop, k))
      return m3_fail(M3_ERR_NOMEM, "added-token split");
    done = stop;
    p = end;
  }
  if (done < len && !push_piece(tok, level, &count, off + done, off + len, -1))
    return m3_fail(M3_ERR_NOMEM, "added-token split");
  *n_pieces = count;
  return M3_OK;
}
