/* bpe.c: the BPE model: vocabulary map, merge-rank map, word-piece cache, merging.
 *
 * Merging follows HF's Word::merge_all: a min-heap of candidate pairs ordered by (rank, position)
 * pops the lowest-ranked pair, leftmost first; a popped pair whose symbols changed since it was
 * pushed is skipped. This is O(n log n) per word, which matters for long whitespace runs. */
#include <stdlib.h>

#include "tok/tok_internal.h"

/* Words longer than this are not cached (HF's limit is 256 characters). */
#define CACHE_MAX_WORD 256
#define CACHE_SLOTS (1u << 16)

bool tok_reserve(void **data, size_t *cap, size_t need, size_t elem) {
  if (need <= *cap) return true;
  size_t cap2 = *cap ? *cap : 64;
  while (cap2 < need) cap2 *= 2;
  void *p = realloc(*data, cap2 * elem);
  if (!p) return false;
  *data = p;
  *cap = cap2;
  return true;
}

static uint32_t pow2_at_least(size_t n) {
  uint32_t c = 16;
  while (c < n) c *= 2;
  return c;
}

/* ---- vocabulary map ---- */

bool tok_vocab_map_build(tok_vocab_map *m, const tok_strings *vocab, const bool *usable) {
  uint32_t cap = pow2_at_least(2 * (size_t)vocab->n + 1);
  m->slots = malloc(cap * sizeof *m->slots);
  if (!m->slots) return false;
  memset(m->slots, 0xFF, cap * sizeof *m->slots);
  m->mask = cap - 1;
  for (int32_t id = 0; id < vocab->n; id++) {
    if (!usable[id]) continue;
    uint32_t i = (uint32_t)tok_hash(vocab->bytes + vocab->off[id], vocab->off[id + 1] - vocab->off[id]) & m->mask;
    while (m->slots[i] >= 0) i = (i + 1) & m->mask;
    m->slots[i] = id;
  }
  return true;
}

int32_t tok_vocab_map_get(const tok_vocab_map *m, const tok_strings *vocab, const uint8_t *p, size_t n) {
  for (uint32_t i = (uint32_t)tok_hash(p, n) & m->mask;; i = (i + 1) & m->mask) {
    int32_t id = m->slots[i];
    if (id < 0) return -1;
    if (vocab->off[id + 1] - vocab->off[id] == n && memcmp(vocab->bytes + vocab->off[id], p, n) == 0)
      return id;
  }
}

/* ---- merge map ---- */

static inline uint32_t merge_slot(uint64_t key, uint32_t mask) {
  return (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & mask;
}

bool tok_merge_map_init(tok_merge_map *m, size_t n_merges) {
  uint32_t cap = pow2_at_least(2 * n_merges + 1);
  m->slots = malloc(cap * sizeof *m->slots);
  if (!m->slots) return false;
  for (uint32_t i = 0; i < cap; i++) m->slots[i].key = UINT64_MAX;
  m->mask = cap - 1;
  return true;
}

void tok_merge_map_put(tok_merge_map *m, int32_t left, int32_t right, uint32_t rank, int32_t merged) {
  uint64_t key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
  uint32_t i = merge_slot(key, m->mask);
  while (m->slots[i].key != UINT64_MAX && m->slots[i].key != key) i = (i + 1) & m->mask;
  m->slots[i] = (tok_merge){key, rank, merged};
}

static inline const tok_merge *merge_get(const tok_merge_map *m, int32_t left, int32_t right) {
  uint64_t key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
  for (uint32_t i = merge_slot(key, m->mask);; i = (i + 1) & m->mask) {
    if (m->slots[i].key == key) return &m->slots[i];
    if (m->slots[i].key == UINT64_MAX) return NULL;
  }
}

/* ---- word-piece cache ---- */

bool tok_cache_init(tok_cache *c) {
  memset(c, 0, sizeof *c);
  c->slots = calloc(CACHE_SLOTS, sizeof *c->slots);
  c->mask = CACHE_SLOTS - 1;
  return c->slots != NULL;
}

void tok_cache_free(tok_cache *c) {
  free(c->slots);
  free(c->keys);
  free(c->ids);
}

/* The slot holding `word`, or the empty slot where it would go. */
static tok_cache_slot *cache_find(tok_cache *c, uint64_t h, const uint8_t *word, size_t n) {
  for (uint32_t i = (uint32_t)h & c->mask;; i = (i + 1) & c->mask) {
    tok_cache_slot *s = &c->slots[i];
    if (s->key_len == 0) return s;
    if (s->hash == h && s->key_len == n && memcmp(c->keys + s->key_off, word, n) == 0) return s;
  }
}

/* Remembers word -> ids; when half full the cache starts over, which keeps probing short and
 * memory bounded without eviction bookkeeping. */
static void cache_put(tok_cache *c, uint64_t h, const uint8_t *word, size_t n, const int32_t *ids,
                      size_t n_ids) {
  if (c->used * 2 >= CACHE_SLOTS) {
    memset(c->slots, 0, CACHE_SLOTS * sizeof *c->slots);
    c->used = 0;
    c->keys_len = c->ids_len = 0;
  }
  if (!tok_reserve((void **)&c->keys, &c->keys_cap, c->keys_len + n, 1) ||
      !tok_reserve((void **)&c->ids, &c->ids_cap, c->ids_len + n_ids, sizeof(int32_t)))
    return; /* the cache is an optimisation: without memory, just don't remember */
  tok_cache_slot *s = cache_find(c, h, word, n);
  memcpy(c->keys + c->keys_len, word, n);
  memcpy(c->ids + c->ids_len, ids, n_ids * sizeof *ids);
  *s = (tok_cache_slot){h, (uint32_t)c->keys_len, (uint32_t)n, (uint32_t)c->ids_len, (uint32_t)n_ids};
  c->keys_len += n;
  c->ids_len += n_ids;
  c->used++;
}

/* ---- merging ---- */

static inline bool heap_less(const tok_heap_item *a, const tok_heap_item *b) {
  return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(tok_heap_item *h, size_t *n, tok_heap_item it) {
  size_t i = (*n)++;
  while (i > 0) {
    size_t parent = (i - 1) / 2;
    if (!heap_less(&it, &h[parent])) break;
    h[i] = h[parent];
    i = parent;
  }
  h[i] = it;
}

static tok_heap_item heap_pop(tok_heap_item *h, size_t *n) {
  tok_heap_item top = h[0], last = h[--(*n)];
  size_t i = 0;
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= *n) break;
    if (c + 1 < *n && heap_less(&h[c + 1], &h[c])) c++;
    if (!heap_less(&h[c], &last)) break;
    h[i] = h[c];
    i = c;
  }
  h[i] = last;
  return top;
}

static void push_pair(const tok_merge_map *merges, tok_heap_item *heap, size_t *n_heap,
                      const tok_symbol *syms, int32_t pos) {
  const tok_merge *m = merge_get(merges, syms[pos].id, syms[syms[pos].next].id);
  if (m) heap_push(heap, n_heap, (tok_heap_item){m->rank, pos, m->merged});
}

static bool append_ids(m3_tok_ids *out, const int32_t *ids, size_t n) {
  if (!tok_reserve((void **)&out->data, &out->cap, out->len + n, sizeof(int32_t))) return false;
  memcpy(out->data + out->len, ids, n * sizeof *ids);
  out->len += n;
  return true;
}

m3_status tok_bpe_word(m3_tokenizer *tok, const uint8_t *word, size_t n, m3_tok_ids *out) {
  uint64_t h = 0;
  if (n <= CACHE_MAX_WORD) {
    h = tok_hash(word, n);
    const tok_cache_slot *s = cache_find(&tok->cache, h, word, n);
    if (s->key_len) {
      if (!append_ids(out, tok->cache.ids + s->ids_off, s->n_ids)) return m3_fail(M3_ERR_NOMEM, "encode");
      return M3_OK;
    }
  }
  if (tok->ignore_merges) {
    int32_t id = tok_vocab_map_get(&tok->vocab_map, &tok->vocab, word, n);
    if (id >= 0) return append_ids(out, &id, 1) ? M3_OK : m3_fail(M3_ERR_NOMEM, "encode");
  }
  if (!tok_reserve((void **)&tok->syms, &tok->syms_cap, n, sizeof(tok_symbol)) ||
      !tok_reserve((void **)&tok->heap, &tok->heap_cap, 3 * n + 1, sizeof(tok_heap_item)))
    return m3_fail(M3_ERR_NOMEM, "encode: word of %zu bytes", n);

  /* One symbol per byte; a byte missing from the vocabulary becomes unk_token, or is dropped
   * when there is none (HF does the same). */
  tok_symbol *syms = tok->syms;
  int32_t ns = 0;
  for (size_t i = 0; i < n; i++) {
    int32_t id = tok->byte_id[word[i]];
    if (id < 0 && (id = tok->unk_id) < 0) continue;
    syms[ns] = (tok_symbol){id, ns - 1, ns + 1, 1};
    ns++;
  }
  if (ns == 0) return M3_OK;
  syms[ns - 1].next = -1;

  tok_heap_item *heap = tok->heap;
  size_t n_heap = 0;
  for (int32_t i = 0; i + 1 < ns; i++) push_pair(&tok->merges, heap, &n_heap, syms, i);
  while (n_heap > 0) {
    tok_heap_item top = heap_pop(heap, &n_heap);
    tok_symbol *left = &syms[top.pos];
    if (left->len == 0 || left->next < 0) continue;
    int32_t rpos = left->next;
    const tok_merge *m = merge_get(&tok->merges, left->id, syms[rpos].id);
    if (!m || m->merged != top.merged) continue; /* the pair changed since it was pushed */
    left->id = top.merged;
    left->len += syms[rpos].len;
    left->next = syms[rpos].next;
    syms[rpos].len = 0;
    if (left->next >= 0) syms[left->next].prev = top.pos;
    if (left->prev >= 0) push_pair(&tok->merges, heap, &n_heap, syms, left->prev);
    if (left->next >= 0) push_pair(&tok->merges, heap, &n_heap, syms, top.pos);
  }

  size_t first = out->len;
  if (!tok_reserve((void **)&out->data, &out->cap, out->len + (size_t)ns, sizeof(int32_t)))
    return m3_fail(M3_ERR_NOMEM, "encode");
  for (int32_t i = 0; i >= 0; i = syms[i].next) out->data[out->len++] = syms[i].id;
  if (n <= CACHE_MAX_WORD) cache_put(&tok->cache, h, word, n, out->data + first, out->len - first);
  return M3_OK;
}
