#include "engine/kvcache.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Per layer: the K, V and (sparse layers) IK pools of all pages, bytes_kv / bytes_ik per page. */
typedef struct {
  uint8_t *k, *v, *ik;
} kv_layer;

struct m3_kv_cache {
  m3_backend *be;
  int num_layers, nkv, hd, ihd, block_size;
  m3_kv_dtype dtype;
  size_t budget_bytes, page_bytes;
  kv_layer *layers;    /* [num_layers] */
  int num_pages;
  int32_t *refcount;   /* [num_pages] */
  int32_t *free_list;  /* stack of free page ids; free_list[num_free - 1] is handed out next */
  int num_free;
  size_t bytes_kv, bytes_ik; /* per page and layer: K (or V), IK */
  /* Prefix cache, per page: */
  uint32_t *gen;       /* bumped at each allocation, so a stale parent link never matches */
  uint8_t *cached;     /* published under its key */
  int32_t *parent;     /* key: cached page of the previous block (-1 for block 0) */
  uint32_t *parent_gen;/* key: that page's generation when this one was published */
  int32_t *tokens;     /* key: [num_pages, block_size] the page's tokens */
  uint64_t *hash;      /* hash of the key */
  int32_t *bucket_next;/* chain of the hash bucket */
  int32_t *bucket;     /* [num_buckets] first page of each bucket, -1 = empty */
  int num_buckets, num_cached;
  /* Unreferenced cached pages, oldest first: a doubly linked list over page ids. */
  int32_t *lru_prev, *lru_next;
  int32_t lru_head, lru_tail;
  int num_lru;
  m3_kv_copy_hook copy_hook; /* told of each page copy (the other ranks' storage copies too) */
  void *copy_user;
};

m3_status m3_kv_dtype_parse(const char *flag, const char *name, m3_kv_dtype *out) {
  if (strcmp(name, "f32") == 0) *out = M3_KV_F32;
  else if (strcmp(name, "fp8") == 0) *out = M3_KV_FP8;
  else return m3_fail(M3_ERR_ARG, "%s '%s': expected f32 or fp8", flag, name);
  return M3_OK;
}

const char *m3_kv_dtype_name(m3_kv_dtype dt) { return dt == M3_KV_FP8 ? "fp8" : "f32"; }

m3_status m3_kv_dtype_check(const m3_backend *be, m3_kv_dtype dt) {
  if (dt == M3_KV_FP8 && !be->ops->kv_fp8)
    return m3_fail(M3_ERR_UNSUPPORTED, "--kv-dtype fp8: not supported on the %s backend yet",
                   be->ops->name);
  return M3_OK;
}

static size_t page_bytes_kv(const m3_config *cfg, m3_kv_dtype dt) {
  return m3_kv_pool_page_bytes(dt, (size_t)cfg->num_kv_heads * (size_t)cfg->index_block_size,
                               (size_t)cfg->head_dim);
}

static size_t page_bytes_ik(const m3_config *cfg, m3_kv_dtype dt) {
  return m3_kv_pool_page_bytes(dt, (size_t)cfg->index_block_size, (size_t)cfg->index_head_dim);
}

size_t m3_kv_page_bytes(const m3_config *cfg, m3_kv_dtype dt) {
  size_t bytes = 0;
  for (int l = 0; l < cfg->num_layers; l++) {
    bytes += 2 * page_bytes_kv(cfg, dt);
    if (cfg->layer_attn[l] == M3_ATTN_SPARSE) bytes += page_bytes_ik(cfg, dt);
  }
  return bytes;
}

size_t m3_kv_bytes_for_tokens(const m3_config *cfg, m3_kv_dtype dt, int tokens) {
  size_t pages = tokens > 0 ? ((size_t)tokens + cfg->index_block_size - 1) / cfg->index_block_size : 1;
  return pages * m3_kv_page_bytes(cfg, dt);
}

static m3_status out_of_pages(const m3_kv_cache *c, long long needed) {
  return m3_fail(M3_ERR_LIMIT,
                 "KV cache budget of %zu bytes (%d pages of %d tokens, %zu bytes each) exhausted: "
                 "%lld more page(s) needed, %d free",
                 c->budget_bytes, c->num_pages, c->block_size, c->page_bytes, needed,
                 c->num_free + c->num_lru);
}

static uint8_t *alloc_pool(m3_backend *be, int pages, size_t page_bytes) {
  return be->ops->alloc(be, (size_t)pages * page_bytes);
}

static m3_status check_config(const m3_config *cfg, m3_backend *be, m3_kv_dtype dt) {
  if (cfg->index_block_size <= 0 || cfg->num_kv_heads <= 0 || cfg->head_dim <= 0)
    return m3_fail(M3_ERR_CONFIG, "KV cache: block size %d, kv heads %d, head dim %d must be > 0",
                   cfg->index_block_size, cfg->num_kv_heads, cfg->head_dim);
  return m3_kv_dtype_check(be, dt);
}

/* A cache of exactly `pages` pages (1..INT32_MAX); budget_bytes only names the budget in
 * messages. */
static m3_status create_pages(const m3_config *cfg, m3_backend *be, m3_kv_dtype dt, size_t pages,
                              size_t budget_bytes, m3_kv_cache **out) {
  const size_t page_bytes = m3_kv_page_bytes(cfg, dt);
  m3_kv_cache *c = calloc(1, sizeof *c);
  if (!c) return m3_fail(M3_ERR_NOMEM, "KV cache: out of memory");
  c->be = be;
  c->num_layers = cfg->num_layers;
  c->nkv = cfg->num_kv_heads;
  c->hd = cfg->head_dim;
  c->ihd = cfg->index_head_dim;
  c->block_size = cfg->index_block_size;
  c->dtype = dt;
  c->budget_bytes = budget_bytes;
  c->page_bytes = page_bytes;
  c->num_pages = (int)pages;
  c->layers = calloc((size_t)c->num_layers, sizeof *c->layers);
  c->refcount = calloc(pages, sizeof *c->refcount);
  c->free_list = malloc(pages * sizeof *c->free_list);
  c->bytes_kv = page_bytes_kv(cfg, dt);
  c->bytes_ik = page_bytes_ik(cfg, dt);
  c->num_buckets = 1;
  while (c->num_buckets < c->num_pages && c->num_buckets < (1 << 30)) c->num_buckets *= 2;
  c->gen = calloc(pages, sizeof *c->gen);
  c->cached = calloc(pages, sizeof *c->cached);
  c->parent = calloc(pages, sizeof *c->parent);
  c->parent_gen = calloc(pages, sizeof *c->parent_gen);
  c->tokens = calloc(pages * (size_t)c->block_size, sizeof *c->tokens);
  c->hash = calloc(pages, sizeof *c->hash);
  c->bucket_next = calloc(pages, sizeof *c->bucket_next);
  c->bucket = malloc((size_t)c->num_buckets * sizeof *c->bucket);
  c->lru_prev = calloc(pages, sizeof *c->lru_prev);
  c->lru_next = calloc(pages, sizeof *c->lru_next);
  if (!c->layers || !c->refcount || !c->free_list || !c->gen || !c->cached || !c->parent ||
      !c->parent_gen || !c->tokens || !c->hash || !c->bucket_next || !c->bucket || !c->lru_prev ||
      !c->lru_next)
    goto nomem;
  for (int b = 0; b < c->num_buckets; b++) c->bucket[b] = -1;
  c->lru_head = c->lru_tail = -1;
  for (int l = 0; l < c->num_layers; l++) {
    kv_layer *L = &c->layers[l];
    L->k = alloc_pool(be, c->num_pages, c->bytes_kv);
    L->v = alloc_pool(be, c->num_pages, c->bytes_kv);
    if (!L->k || !L->v) goto nomem;
    if (cfg->layer_attn[l] == M3_ATTN_SPARSE) {
      L->ik = alloc_pool(be, c->num_pages, c->bytes_ik);
      if (!L->ik) goto nomem;
    }
  }
  /* Lowest page ids first, so a fresh cache fills memory front to back. */
  for (int i = 0; i < c->num_pages; i++) c->free_list[i] = c->num_pages - 1 - i;
  c->num_free = c->num_pages;
  *out = c;
  return M3_OK;

nomem:
  m3_kv_cache_free(c);
  return m3_fail(M3_ERR_NOMEM, "KV cache: cannot allocate %zu pages (budget %zu bytes)", pages,
                 budget_bytes);
}

m3_status m3_kv_cache_create(const m3_config *cfg, m3_backend *be, m3_kv_dtype dt,
                             size_t budget_bytes, m3_kv_cache **out) {
  *out = NULL;
  m3_status st = check_config(cfg, be, dt);
  if (st != M3_OK) return st;
  size_t page_bytes = m3_kv_page_bytes(cfg, dt);
  size_t pages = page_bytes ? budget_bytes / page_bytes : 0;
  if (pages == 0)
    return m3_fail(M3_ERR_LIMIT, "KV cache budget of %zu bytes is below one page (%zu bytes for %d "
                   "tokens over %d layers)", budget_bytes, page_bytes, cfg->index_block_size,
                   cfg->num_layers);
  if (pages > INT32_MAX) pages = INT32_MAX;
  return create_pages(cfg, be, dt, pages, budget_bytes, out);
}

m3_status m3_kv_cache_create_pages(const m3_config *cfg, m3_backend *be, m3_kv_dtype dt, int pages,
                                   m3_kv_cache **out) {
  *out = NULL;
  m3_status st = check_config(cfg, be, dt);
  if (st != M3_OK) return st;
  if (pages < 1) return m3_fail(M3_ERR_ARG, "KV cache: %d pages", pages);
  return create_pages(cfg, be, dt, (size_t)pages, (size_t)pages * m3_kv_page_bytes(cfg, dt), out);
}

void m3_kv_cache_free(m3_kv_cache *c) {
  if (!c) return;
  if (c->layers) {
    for (int l = 0; l < c->num_layers; l++) {
      kv_layer *L = &c->layers[l];
      if (L->k) c->be->ops->free(c->be, L->k);
      if (L->v) c->be->ops->free(c->be, L->v);
      if (L->ik) c->be->ops->free(c->be, L->ik);
    }
  }
  free(c->layers);
  free(c->refcount);
  free(c->free_list);
  free(c->gen);
  free(c->cached);
  free(c->parent);
  free(c->parent_gen);
  free(c->tokens);
  free(c->hash);
  free(c->bucket_next);
  free(c->bucket);
  free(c->lru_prev);
  free(c->lru_next);
  free(c);
}

m3_kv_dtype m3_kv_cache_dtype(const m3_kv_cache *c) { return c->dtype; }
int m3_kv_cache_block_size(const m3_kv_cache *c) { return c->block_size; }
int m3_kv_cache_num_pages(const m3_kv_cache *c) { return c->num_pages; }
int m3_kv_cache_free_pages(const m3_kv_cache *c) { return c->num_free + c->num_lru; }
int m3_kv_cache_cached_pages(const m3_kv_cache *c) { return c->num_cached; }
int m3_kv_page_refcount(const m3_kv_cache *c, int32_t page) { return c->refcount[page]; }

static void lru_remove(m3_kv_cache *c, int32_t p) {
  if (c->lru_prev[p] >= 0) c->lru_next[c->lru_prev[p]] = c->lru_next[p];
  else c->lru_head = c->lru_next[p];
  if (c->lru_next[p] >= 0) c->lru_prev[c->lru_next[p]] = c->lru_prev[p];
  else c->lru_tail = c->lru_prev[p];
  c->num_lru--;
}

static void lru_push(m3_kv_cache *c, int32_t p) {
  c->lru_prev[p] = c->lru_tail;
  c->lru_next[p] = -1;
  if (c->lru_tail >= 0) c->lru_next[c->lru_tail] = p;
  else c->lru_head = p;
  c->lru_tail = p;
  c->num_lru++;
}

/* splitmix64's finaliser folded over the key's words. */
static uint64_t mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
  h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
  return h ^ (h >> 31);
}

static uint64_t key_hash(const m3_kv_cache *c, int32_t parent, uint32_t parent_gen,
                         const int32_t *tokens) {
  uint64_t h = mix(mix(0, (uint64_t)(uint32_t)parent), parent_gen);
  for (int i = 0; i < c->block_size; i++) h = mix(h, (uint32_t)tokens[i]);
  return h;
}

/* The cached page under the key, or -1. */
static int32_t lookup(const m3_kv_cache *c, int32_t parent, const int32_t *tokens) {
  uint32_t pgen = parent >= 0 ? c->gen[parent] : 0;
  uint64_t h = key_hash(c, parent, pgen, tokens);
  for (int32_t p = c->bucket[h & (uint64_t)(c->num_buckets - 1)]; p >= 0; p = c->bucket_next[p])
    if (c->hash[p] == h && c->parent[p] == parent && c->parent_gen[p] == pgen &&
        memcmp(&c->tokens[(size_t)p * c->block_size], tokens,
               (size_t)c->block_size * sizeof *tokens) == 0)
      return p;
  return -1;
}

static void uncache(m3_kv_cache *c, int32_t p) {
  int32_t *link = &c->bucket[c->hash[p] & (uint64_t)(c->num_buckets - 1)];
  while (*link != p) link = &c->bucket_next[*link];
  *link = c->bucket_next[p];
  c->cached[p] = 0;
  c->num_cached--;
}

m3_status m3_kv_page_alloc(m3_kv_cache *c, int32_t *page) {
  int32_t p;
  if (c->num_free > 0) {
    p = c->free_list[--c->num_free];
  } else if (c->num_lru > 0) {
    p = c->lru_head;
    lru_remove(c, p);
    uncache(c, p);
  } else {
    return out_of_pages(c, 1);
  }
  c->refcount[p] = 1;
  c->gen[p]++;
  *page = p;
  return M3_OK;
}

void m3_kv_page_retain(m3_kv_cache *c, int32_t page) {
  if (c->refcount[page]++ == 0) lru_remove(c, page);
}

void m3_kv_page_release(m3_kv_cache *c, int32_t page) {
  if (--c->refcount[page] > 0) return;
  if (c->cached[page]) lru_push(c, page);
  else c->free_list[c->num_free++] = page;
}

void m3_kv_cache_set_copy_hook(m3_kv_cache *c, m3_kv_copy_hook fn, void *user) {
  c->copy_hook = fn;
  c->copy_user = user;
}

/* The copy-on-write of a shared page: the pages' contents, then the hook, so that storage
 * mirroring this cache's pages gets the same copy. */
static m3_status copy_page(m3_kv_cache *c, int32_t from, int32_t to) {
  m3_status st = m3_kv_cache_copy_page(c, from, to);
  if (st == M3_OK && c->copy_hook) st = c->copy_hook(c->copy_user, from, to);
  return st;
}

m3_status m3_kv_cache_copy_page(m3_kv_cache *c, int32_t from, int32_t to) {
  m3_backend *be = c->be;
  m3_status st = M3_OK;
  const size_t kv = c->bytes_kv, ik = c->bytes_ik;
  for (int l = 0; l < c->num_layers && st == M3_OK; l++) {
    kv_layer *L = &c->layers[l];
    st = be->ops->copy(be, L->k + (size_t)to * kv, L->k + (size_t)from * kv, kv);
    if (st == M3_OK) st = be->ops->copy(be, L->v + (size_t)to * kv, L->v + (size_t)from * kv, kv);
    if (st == M3_OK && L->ik)
      st = be->ops->copy(be, L->ik + (size_t)to * ik, L->ik + (size_t)from * ik, ik);
  }
  return st;
}

/* Device backends read block tables from backend memory, so each sequence keeps a copy there
 * (table_dev, cap_blocks entries); on the CPU the ops read block_table itself. */
static int mirrored(const m3_kv_cache *c) { return c->be->ops->device_memory; }

/* Uploads entries [from, to) of the block table to its backend copy. */
static m3_status sync_table(m3_kv_cache *c, m3_kv_seq *seq, int from, int to) {
  if (!mirrored(c) || to <= from) return M3_OK;
  return c->be->ops->to_device(c->be, seq->table_dev + from, seq->block_table + from,
                               (size_t)(to - from) * sizeof(int32_t));
}

/* Grows the block table to cap entries, keeping its entries. The backend copy is a new allocation
 * then, so the caller uploads the whole table afterwards. */
static m3_status grow_table(m3_kv_cache *c, m3_kv_seq *seq, int cap) {
  int32_t *dev = NULL;
  if (mirrored(c) && !(dev = c->be->ops->alloc(c->be, (size_t)cap * sizeof *dev)))
    return m3_fail(M3_ERR_NOMEM, "KV cache: block table of %d entries in backend memory", cap);
  int32_t *table = realloc(seq->block_table, (size_t)cap * sizeof *table);
  if (!table) {
    if (dev) c->be->ops->free(c->be, dev);
    return m3_fail(M3_ERR_NOMEM, "KV cache: block table of %d entries", cap);
  }
  seq->block_table = table;
  seq->cap_blocks = cap;
  if (dev) {
    if (seq->table_dev) c->be->ops->free(c->be, seq->table_dev);
    seq->table_dev = dev;
  }
  return M3_OK;
}

void m3_kv_seq_init(m3_kv_seq *seq) {
  seq->block_table = seq->table_dev = NULL;
  seq->num_blocks = seq->cap_blocks = seq->num_tokens = 0;
}

m3_status m3_kv_seq_extend(m3_kv_cache *c, m3_kv_seq *seq, int n) {
  if (n < 0 || (long long)seq->num_tokens + n > INT32_MAX)
    return m3_fail(M3_ERR_ARG, "KV cache: cannot extend a sequence of %d tokens by %d",
                   seq->num_tokens, n);
  int tokens = seq->num_tokens + n;
  int blocks = (int)(((long long)tokens + c->block_size - 1) / c->block_size);
  int more = blocks - seq->num_blocks;
  /* The block holding position num_tokens, if it has a page already, gets written. */
  int written = seq->num_tokens / c->block_size;
  int32_t shared = n > 0 && written < seq->num_blocks ? seq->block_table[written] : -1;
  if (shared >= 0 && c->refcount[shared] == 1) {
    if (c->cached[shared]) uncache(c, shared);
    shared = -1;
  }
  if (more + (shared >= 0) > m3_kv_cache_free_pages(c)) return out_of_pages(c, more + (shared >= 0));
  /* The first entry whose page changes: the backend copy of the table is updated from there. */
  int changed = shared >= 0 ? written : seq->num_blocks;
  if (blocks > seq->cap_blocks) {
    int cap = seq->cap_blocks ? seq->cap_blocks : 4;
    while (cap < blocks) cap = cap > INT32_MAX / 2 ? blocks : cap * 2;
    m3_status st = grow_table(c, seq, cap);
    if (st != M3_OK) return st;
    changed = 0;
  }
  /* Page allocation cannot fail: enough pages were checked above. */
  m3_status st = M3_OK;
  if (shared >= 0) {
    m3_kv_page_alloc(c, &seq->block_table[written]);
    st = copy_page(c, shared, seq->block_table[written]);
  }
  for (int b = seq->num_blocks; b < blocks; b++) m3_kv_page_alloc(c, &seq->block_table[b]);
  if (st == M3_OK) st = sync_table(c, seq, changed, blocks);
  if (st != M3_OK) {
    /* The backend failed: take back what was handed out so the sequence is unchanged. */
    for (int b = seq->num_blocks; b < blocks; b++) m3_kv_page_release(c, seq->block_table[b]);
    if (shared >= 0) {
      m3_kv_page_release(c, seq->block_table[written]);
      seq->block_table[written] = shared;
    }
    return st;
  }
  if (shared >= 0) m3_kv_page_release(c, shared);
  seq->num_blocks = blocks;
  seq->num_tokens = tokens;
  return M3_OK;
}

void m3_kv_seq_truncate(m3_kv_cache *c, m3_kv_seq *seq, int n) {
  if (n < 0 || n >= seq->num_tokens) return;
  int blocks = (n + c->block_size - 1) / c->block_size;
  for (int b = blocks; b < seq->num_blocks; b++) m3_kv_page_release(c, seq->block_table[b]);
  seq->num_blocks = blocks;
  seq->num_tokens = n;
}

void m3_kv_seq_release(m3_kv_cache *c, m3_kv_seq *seq) {
  for (int b = 0; b < seq->num_blocks; b++) m3_kv_page_release(c, seq->block_table[b]);
  free(seq->block_table);
  if (seq->table_dev) c->be->ops->free(c->be, seq->table_dev);
  m3_kv_seq_init(seq);
}

m3_status m3_kv_seq_fork(m3_kv_cache *c, const m3_kv_seq *src, m3_kv_seq *dst) {
  m3_kv_seq_init(dst);
  if (src->num_blocks == 0) return M3_OK;
  m3_status st = grow_table(c, dst, src->num_blocks);
  if (st != M3_OK) return st;
  memcpy(dst->block_table, src->block_table, (size_t)src->num_blocks * sizeof *dst->block_table);
  if ((st = sync_table(c, dst, 0, src->num_blocks)) != M3_OK) {
    m3_kv_seq_release(c, dst); /* holds no page yet: frees the tables alone */
    return st;
  }
  for (int b = 0; b < src->num_blocks; b++) m3_kv_page_retain(c, src->block_table[b]);
  dst->num_blocks = src->num_blocks;
  dst->num_tokens = src->num_tokens;
  return M3_OK;
}

int m3_kv_seq_match_prefix(m3_kv_cache *c, m3_kv_seq *seq, const int32_t *tokens, int n) {
  if (seq->num_blocks != 0) return 0;
  int32_t parent = -1;
  int blocks = 0;
  while ((blocks + 1) * c->block_size <= n) {
    int32_t p = lookup(c, parent, tokens + (size_t)blocks * c->block_size);
    if (p < 0) break;
    /* A shorter match is still a correct one. */
    if (blocks == seq->cap_blocks && grow_table(c, seq, blocks ? blocks * 2 : 4) != M3_OK) break;
    m3_kv_page_retain(c, p);
    seq->block_table[blocks++] = p;
    parent = p;
  }
  if (sync_table(c, seq, 0, blocks) != M3_OK) {
    for (int b = 0; b < blocks; b++) m3_kv_page_release(c, seq->block_table[b]);
    blocks = 0;
  }
  seq->num_blocks = blocks;
  seq->num_tokens = blocks * c->block_size;
  return seq->num_tokens;
}

void m3_kv_seq_publish(m3_kv_cache *c, const m3_kv_seq *seq, const int32_t *tokens, int n) {
  /* parent: the cached page that stands for the prefix so far (ours, or an equal one). */
  int32_t parent = -1;
  for (int b = 0; (b + 1) * c->block_size <= n && b < seq->num_blocks; b++) {
    int32_t p = seq->block_table[b];
    const int32_t *toks = tokens + (size_t)b * c->block_size;
    if (!c->cached[p]) {
      int32_t existing = lookup(c, parent, toks);
      if (existing >= 0) {
        parent = existing;
        continue;
      }
      c->cached[p] = 1;
      c->num_cached++;
      c->parent[p] = parent;
      c->parent_gen[p] = parent >= 0 ? c->gen[parent] : 0;
      memcpy(&c->tokens[(size_t)p * c->block_size], toks, (size_t)c->block_size * sizeof *toks);
      c->hash[p] = key_hash(c, parent, c->parent_gen[p], toks);
      int32_t *head = &c->bucket[c->hash[p] & (uint64_t)(c->num_buckets - 1)];
      c->bucket_next[p] = *head;
      *head = p;
    }
    parent = p;
  }
}

static void table_view(const m3_kv_cache *c, const int32_t *table, int num_blocks, int layer,
                       m3_kv_view *out) {
  const kv_layer *L = &c->layers[layer];
  *out = (m3_kv_view){.k = L->k, .v = L->v, .ik = L->ik, .block_table = table,
                      .num_blocks = num_blocks, .block_size = c->block_size, .nkv = c->nkv,
                      .hd = c->hd, .ihd = c->ihd, .dtype = c->dtype};
}

void m3_kv_seq_view(const m3_kv_cache *c, const m3_kv_seq *seq, int layer, m3_kv_view *out) {
  table_view(c, mirrored(c) ? seq->table_dev : seq->block_table, seq->num_blocks, layer, out);
}

void m3_kv_seq_views(const m3_kv_cache *c, const m3_kv_seq *seq, m3_kv_view *views) {
  for (int l = 0; l < c->num_layers; l++) m3_kv_seq_view(c, seq, l, &views[l]);
}

void m3_kv_cache_table_views(const m3_kv_cache *c, const int32_t *table, int num_blocks,
                             m3_kv_view *views) {
  for (int l = 0; l < c->num_layers; l++) table_view(c, table, num_blocks, l, &views[l]);
}
