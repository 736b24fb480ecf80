#include "engine/kvcache.h"

#include <stdint.h>
#include <stdlib.h>

/* Per layer: the K, V and (sparse layers) IK pools of all pages. */
typedef struct {
  float *k, *v, *ik;
} kv_layer;

struct m3_kv_cache {
  m3_backend *be;
  int num_layers, nkv, hd, ihd, block_size;
  size_t budget_bytes, page_bytes;
  kv_layer *layers;    /* [num_layers] */
  int num_pages;
  int32_t *refcount;   /* [num_pages] */
  int32_t *free_list;  /* stack of free page ids; free_list[num_free - 1] is handed out next */
  int num_free;
};

static size_t page_floats_kv(const m3_config *cfg) {
  return (size_t)cfg->num_kv_heads * (size_t)cfg->index_block_size * (size_t)cfg->head_dim;
}

static size_t page_floats_ik(const m3_config *cfg) {
  return (size_t)cfg->index_block_size * (size_t)cfg->index_head_dim;
}

size_t m3_kv_page_bytes(const m3_config *cfg) {
  size_t floats = 0;
  for (int l = 0; l < cfg->num_layers; l++) {
    floats += 2 * page_floats_kv(cfg);
    if (cfg->layer_attn[l] == M3_ATTN_SPARSE) floats += page_floats_ik(cfg);
  }
  return floats * sizeof(float);
}

size_t m3_kv_bytes_for_tokens(const m3_config *cfg, int tokens) {
  size_t pages = tokens > 0 ? ((size_t)tokens + cfg->index_block_size - 1) / cfg->index_block_size : 1;
  return pages * m3_kv_page_bytes(cfg);
}

static m3_status out_of_pages(const m3_kv_cache *c, long long needed) {
  return m3_fail(M3_ERR_LIMIT,
                 "KV cache budget of %zu bytes (%d pages of %d tokens, %zu bytes each) exhausted: "
                 "%lld more page(s) needed, %d free",
                 c->budget_bytes, c->num_pages, c->block_size, c->page_bytes, needed, c->num_free);
}

static float *alloc_pool(m3_backend *be, int pages, size_t page_floats) {
  return be->ops->alloc(be, (size_t)pages * page_floats * sizeof(float));
}

m3_status m3_kv_cache_create(const m3_config *cfg, m3_backend *be, size_t budget_bytes,
                             m3_kv_cache **out) {
  *out = NULL;
  if (cfg->index_block_size <= 0 || cfg->num_kv_heads <= 0 || cfg->head_dim <= 0)
    return m3_fail(M3_ERR_CONFIG, "KV cache: block size %d, kv heads %d, head dim %d must be > 0",
                   cfg->index_block_size, cfg->num_kv_heads, cfg->head_dim);
  size_t page_bytes = m3_kv_page_bytes(cfg);
  size_t pages = page_bytes ? budget_bytes / page_bytes : 0;
  if (pages == 0)
    return m3_fail(M3_ERR_LIMIT, "KV cache budget of %zu bytes is below one page (%zu bytes for %d "
                   "tokens over %d layers)", budget_bytes, page_bytes, cfg->index_block_size,
                   cfg->num_layers);
  if (pages > INT32_MAX) pages = INT32_MAX;

  m3_kv_cache *c = calloc(1, sizeof *c);
  if (!c) return m3_fail(M3_ERR_NOMEM, "KV cache: out of memory");
  c->be = be;
  c->num_layers = cfg->num_layers;
  c->nkv = cfg->num_kv_heads;
  c->hd = cfg->head_dim;
  c->ihd = cfg->index_head_dim;
  c->block_size = cfg->index_block_size;
  c->budget_bytes = budget_bytes;
  c->page_bytes = page_bytes;
  c->num_pages = (int)pages;
  c->layers = calloc((size_t)c->num_layers, sizeof *c->layers);
  c->refcount = calloc(pages, sizeof *c->refcount);
  c->free_list = malloc(pages * sizeof *c->free_list);
  if (!c->layers || !c->refcount || !c->free_list) goto nomem;
  for (int l = 0; l < c->num_layers; l++) {
    kv_layer *L = &c->layers[l];
    L->k = alloc_pool(be, c->num_pages, page_floats_kv(cfg));
    L->v = alloc_pool(be, c->num_pages, page_floats_kv(cfg));
    if (!L->k || !L->v) goto nomem;
    if (cfg->layer_attn[l] == M3_ATTN_SPARSE) {
      L->ik = alloc_pool(be, c->num_pages, page_floats_ik(cfg));
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
  free(c);
}

int m3_kv_cache_block_size(const m3_kv_cache *c) { return c->block_size; }
int m3_kv_cache_num_pages(const m3_kv_cache *c) { return c->num_pages; }
int m3_kv_cache_free_pages(const m3_kv_cache *c) { return c->num_free; }
int m3_kv_page_refcount(const m3_kv_cache *c, int32_t page) { return c->refcount[page]; }

m3_status m3_kv_page_alloc(m3_kv_cache *c, int32_t *page) {
  if (c->num_free == 0) return out_of_pages(c, 1);
  *page = c->free_list[--c->num_free];
  c->refcount[*page] = 1;
  return M3_OK;
}

void m3_kv_page_retain(m3_kv_cache *c, int32_t page) { c->refcount[page]++; }

void m3_kv_page_release(m3_kv_cache *c, int32_t page) {
  if (--c->refcount[page] == 0) c->free_list[c->num_free++] = page;
}

void m3_kv_seq_init(m3_kv_seq *seq) {
  seq->block_table = NULL;
  seq->num_blocks = seq->cap_blocks = seq->num_tokens = 0;
}

m3_status m3_kv_seq_extend(m3_kv_cache *c, m3_kv_seq *seq, int n) {
  if (n < 0 || (long long)seq->num_tokens + n > INT32_MAX)
    return m3_fail(M3_ERR_ARG, "KV cache: cannot extend a sequence of %d tokens by %d",
                   seq->num_tokens, n);
  int tokens = seq->num_tokens + n;
  int blocks = (int)(((long long)tokens + c->block_size - 1) / c->block_size);
  int more = blocks - seq->num_blocks;
  if (more > c->num_free) return out_of_pages(c, more);
  if (blocks > seq->cap_blocks) {
    int cap = seq->cap_blocks ? seq->cap_blocks : 4;
    while (cap < blocks) cap = cap > INT32_MAX / 2 ? blocks : cap * 2;
    int32_t *table = realloc(seq->block_table, (size_t)cap * sizeof *table);
    if (!table) return m3_fail(M3_ERR_NOMEM, "KV cache: block table of %d entries", cap);
    seq->block_table = table;
    seq->cap_blocks = cap;
  }
  /* Cannot fail: enough pages were checked above. */
  for (int b = seq->num_blocks; b < blocks; b++) m3_kv_page_alloc(c, &seq->block_table[b]);
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
  m3_kv_seq_init(seq);
}

void m3_kv_seq_view(const m3_kv_cache *c, const m3_kv_seq *seq, int layer, m3_kv_view *out) {
  const kv_layer *L = &c->layers[layer];
  out->k = L->k;
  out->v = L->v;
  out->ik = L->ik;
  out->block_table = seq->block_table;
  out->num_blocks = seq->num_blocks;
  out->block_size = c->block_size;
  out->nkv = c->nkv;
  out->hd = c->hd;
  out->ihd = c->ihd;
}

void m3_kv_seq_views(const m3_kv_cache *c, const m3_kv_seq *seq, m3_kv_view *views) {
  for (int l = 0; l < c->num_layers; l++) m3_kv_seq_view(c, seq, l, &views[l]);
}
