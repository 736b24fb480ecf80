/* tok_internal.h: the tokenizer's parts, shared by the files of src/tok (not a public header).
 *
 *   tokenizer.c  tokenizer.json -> struct m3_tokenizer; encode driver
 *   added.c      added tokens: leftmost-longest trie match with lstrip/rstrip/single_word
 *   pretok.c     pre-tokenizer steps: Split (PCRE2) and ByteLevel
 *   bpe.c        vocabulary map, merge-rank map, word-piece cache, BPE merging
 *   detok.c      ByteLevel decoding, lossy UTF-8, streaming
 *
 * All text inside is raw bytes: the GPT-2 byte<->unicode mapping is undone once at load, so
 * vocabulary entries, merges and words are compared as the bytes they stand for. */
#ifndef M3_TOK_INTERNAL_H
#define M3_TOK_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "tok/tokenizer.h"

/* ---- growable scratch: amortised doubling, so the hot loop never mallocs per token ---- */
bool tok_reserve(void **data, size_t *cap, size_t need, size_t elem);

/* 64-bit hash of a short byte string (word pieces, vocabulary entries). */
static inline uint64_t tok_hash(const uint8_t *p, size_t n) {
  const uint64_t k = 0x9E3779B97F4A7C15ull;
  uint64_t h = 0x243F6A8885A308D3ull ^ (n * k);
  while (n >= 8) {
    uint64_t w;
    memcpy(&w, p, 8);
    h = (h ^ w) * k;
    h ^= h >> 31;
    p += 8;
    n -= 8;
  }
  uint64_t w = 0;
  memcpy(&w, p, n);
  h = (h ^ w) * k;
  h ^= h >> 29;
  return h * k;
}

/* ---- bytes of tokens ---- */
typedef struct {
  uint8_t *bytes;
  uint32_t *off; /* [n + 1]: entry i is bytes[off[i] .. off[i+1]) */
  int32_t n;
} tok_strings;

/* ---- vocabulary map: raw bytes -> model id (open addressing over ids, keys live in strings) ---- */
typedef struct {
  int32_t *slots; /* -1 empty */
  uint32_t mask;
} tok_vocab_map;

/* ---- merge map: (left id, right id) -> (rank, merged id) ---- */
typedef struct {
  uint64_t key; /* left << 32 | right; UINT64_MAX empty */
  uint32_t rank;
  int32_t merged;
} tok_merge;

typedef struct {
  tok_merge *slots;
  uint32_t mask;
} tok_merge_map;

/* ---- word-piece cache: pre-tokenized word bytes -> ids ---- */
typedef struct {
  uint64_t hash;
  uint32_t key_off, key_len, ids_off, n_ids; /* key_len 0: empty slot */
} tok_cache_slot;

typedef struct {
  tok_cache_slot *slots;
  uint32_t mask, used;
  uint8_t *keys;
  size_t keys_len, keys_cap;
  int32_t *ids;
  size_t ids_len, ids_cap;
} tok_cache;

/* ---- BPE scratch for one word ---- */
typedef struct {
  int32_t id, prev, next; /* prev/next: neighbouring live symbols, -1 at the ends */
  uint32_t len;           /* 0 once merged into its left neighbour */
} tok_symbol;

typedef struct {
  uint32_t rank;
  int32_t pos, merged;
} tok_heap_item;

/* ---- added tokens ---- */
typedef struct {
  int32_t id;
  uint32_t off, len; /* content bytes in tok->added_text */
  bool special, lstrip, rstrip, single_word, normalized;
} tok_added;

/* A piece of text after cutting out added tokens: token >= 0 is an index into tok->added. */
typedef struct {
  uint32_t start, end;
  int32_t token;
} tok_piece;

typedef struct {
  int32_t child, sibling; /* first child; next node with the same parent; -1 none */
  int32_t token;          /* index into tok->added ending here, -1 none */
  uint8_t byte;
} tok_trie_node;

/* One matching set (HF keeps two: tokens matched on raw text, then those marked normalized). */
typedef struct {
  tok_trie_node *nodes;
  int32_t n_nodes, cap_nodes;
  int32_t root[256]; /* first node for each leading byte, -1 none */
} tok_trie;

/* ---- pre-tokenizer steps ---- */
typedef enum { SPLIT_REMOVED, SPLIT_ISOLATED, SPLIT_MERGED_PREV, SPLIT_MERGED_NEXT, SPLIT_CONTIGUOUS } tok_split_behavior;

typedef struct {
  uint32_t start, end;
  bool match;
} tok_span;

typedef struct {
  bool byte_level;            /* ByteLevel step, else Split */
  bool add_prefix_space;      /* ByteLevel */
  pcre2_code *re;             /* Split's pattern, or ByteLevel's GPT-2 regex when use_regex */
  tok_split_behavior behavior;
  bool invert;
  tok_span *spans; /* scratch for this step */
  size_t spans_cap;
} tok_step;

#define TOK_MAX_STEPS 8

struct m3_tokenizer {
  /* model vocabulary (raw bytes per id; an entry that is not byte-level text keeps its UTF-8) */
  tok_strings vocab;
  bool *in_vocab;       /* [n_ids] id has a model vocabulary entry */
  tok_vocab_map vocab_map;
  int32_t byte_id[256]; /* id of each single byte, -1 if the vocabulary lacks it */
  int32_t unk_id;       /* -1 none */
  bool ignore_merges;
  tok_merge_map merges;

  /* added tokens */
  tok_added *added;
  int32_t n_added;
  uint8_t *added_text;
  int32_t *added_of_id; /* [n_ids] index into added, -1 none */
  tok_trie trie_raw, trie_norm;
  pcre2_code *word_char; /* \w as Rust's regex defines it, for single_word */

  /* decoding: bytes each id decodes to (added content or ByteLevel-decoded vocabulary entry) */
  tok_strings dec;
  int32_t n_ids;

  tok_step steps[TOK_MAX_STEPS];
  int n_steps;
  pcre2_match_data *md;

  /* encode scratch */
  uint8_t *work; /* the text being encoded, plus prefix-space copies of pieces */
  size_t work_len, work_cap;
  tok_piece *pieces[2]; /* one list per trie level */
  size_t pieces_cap[2];
  tok_symbol *syms;
  size_t syms_cap;
  tok_heap_item *heap;
  size_t heap_cap;
  tok_cache cache;
};

/* bpe.c */
bool tok_vocab_map_build(tok_vocab_map *m, const tok_strings *vocab, const bool *usable);
int32_t tok_vocab_map_get(const tok_vocab_map *m, const tok_strings *vocab, const uint8_t *p, size_t n);
bool tok_merge_map_init(tok_merge_map *m, size_t n_merges);
/* Inserts or overwrites (a later duplicate merge replaces the earlier, as in HF). */
void tok_merge_map_put(tok_merge_map *m, int32_t left, int32_t right, uint32_t rank, int32_t merged);
bool tok_cache_init(tok_cache *c);
void tok_cache_free(tok_cache *c);
/* Appends the ids of one pre-tokenized word. */
m3_status tok_bpe_word(m3_tokenizer *tok, const uint8_t *word, size_t n, m3_tok_ids *out);

/* added.c */
m3_status tok_trie_add(tok_trie *t, const uint8_t *s, size_t n, int32_t token);
void tok_trie_init(tok_trie *t);
void tok_trie_free(tok_trie *t);
/* Cuts work[off .. off+len) into tok->pieces[level] using trie `level` (0 raw, 1 normalized),
 * with HF's lstrip/rstrip/single_word rules; *n_pieces gets the count. Without `special`, a
 * match of a special token is skipped like a failed single_word match (m3_tok_encode). */
m3_status tok_added_split(m3_tokenizer *tok, int level, size_t off, size_t len, bool special,
                          size_t *n_pieces);

/* pretok.c */
m3_status tok_step_compile(tok_step *st, const char *pattern, size_t len, bool literal, const char *key);
/* Pre-tokenizes work[off .. off+len) from step `k` on, BPE-encoding each final word. */
m3_status tok_pretokenize(m3_tokenizer *tok, int k, size_t off, size_t len, m3_tok_ids *out);
extern const char tok_gpt2_pattern[];

/* detok.c */
/* Appends the lossy UTF-8 of bytes[0..n) to out; when !final an incomplete trailing sequence is
 * not consumed. Returns the number of bytes consumed, or (size_t)-1 on allocation failure. */
size_t tok_utf8_lossy(m3_tok_text *out, const uint8_t *bytes, size_t n, bool final);

#endif
