/* kvcache.h: a pool of KV pages shared by every sequence, and per-sequence block tables.
 *
 * A page holds block_size tokens (= the MSA block, config index_block_size) of EVERY layer:
 *   layer l, page p:  K  [nkv, block_size, hd]   post norm + RoPE
 *                     V  [nkv, block_size, hd]   raw
 *                     IK [block_size, ihd]       sparse layers only, post norm + RoPE
 * stored as float32 or fp8 (E4M3 rows with a float32 scale each; the dtype is chosen at creation)
 * in one backend allocation per layer and kind, page-major, which is the layout m3_kv_view and
 * m3_kv_pool_page_bytes (backend.h) describe: an fp8 page holds its rows' scales, then their
 * bytes, so a page copy moves both. A sequence is a growable block table: block b (absolute
 * positions [b*block_size, (b+1)*block_size)) lives in page block_table[b].
 *
 * Pages come from a free list and carry reference counts, so sequences share pages by retaining
 * them (n samples forked from one prompt, prefix caching); a page returns to the free list when
 * its last reference is released. Capacity is fixed at creation from a byte budget.
 *
 * Prefix caching: a full page whose K/V were computed can be published under its token prefix,
 * keyed by (the cached page of the previous block, that page's generation, the page's tokens), so
 * a key names the whole prefix exactly, with no hash collision possible. A later sequence with the
 * same prefix retains those pages instead of computing them. A published page whose last reference
 * goes is not freed but kept in an LRU list, and evicted (oldest first) only when the free list
 * is empty. A sequence about to write into a page that another sequence also holds copies it
 * first (copy-on-write); that happens at the first page where forked samples diverge.
 * Not thread-safe: one scheduler owns the cache. */
#ifndef M3_ENGINE_KVCACHE_H
#define M3_ENGINE_KVCACHE_H

#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"
#include "base/status.h"
#include "io/config.h"

typedef struct m3_kv_cache m3_kv_cache;

/* One sequence's view of the pool. Zero-initialise (or m3_kv_seq_init) before first use. */
typedef struct {
  int32_t *block_table; /* [cap_blocks] page ids; the first num_blocks are valid */
  int32_t *table_dev;   /* device backends: a copy of block_table in backend memory, which the
                         * ops read; kept current by every call below; NULL on the CPU */
  int num_blocks, cap_blocks;
  int num_tokens;       /* positions [0, num_tokens) have pages */
} m3_kv_seq;

/* "f32" or "fp8" (the --kv-dtype values); anything else is M3_ERR_ARG naming `flag`. */
m3_status m3_kv_dtype_parse(const char *flag, const char *name, m3_kv_dtype *out);
const char *m3_kv_dtype_name(m3_kv_dtype dt);
/* M3_ERR_UNSUPPORTED naming the backend when `be` cannot hold a cache of dt (fp8 without
 * kv_fp8), so that callers can refuse it before loading weights; m3_kv_cache_create checks too. */
m3_status m3_kv_dtype_check(const m3_backend *be, m3_kv_dtype dt);

/* Bytes one page takes over all layers of cfg. */
size_t m3_kv_page_bytes(const m3_config *cfg, m3_kv_dtype dt);
/* The budget that holds exactly one sequence of `tokens` tokens (at least one page). */
size_t m3_kv_bytes_for_tokens(const m3_config *cfg, m3_kv_dtype dt, int tokens);

/* A pool of floor(budget_bytes / m3_kv_page_bytes(cfg, dt)) pages allocated through `be`.
 * A budget below one page is M3_ERR_LIMIT; fp8 on a backend without kv_fp8 is
 * M3_ERR_UNSUPPORTED naming the backend. `be` must outlive the cache. */
m3_status m3_kv_cache_create(const m3_config *cfg, m3_backend *be, m3_kv_dtype dt,
                             size_t budget_bytes, m3_kv_cache **out);
void m3_kv_cache_free(m3_kv_cache *c);

/* Storage mirroring another cache's pages (a tensor-parallel rank's share of every page,
 * engine/ranks.h): exactly `pages` pages for cfg (the rank's narrowed config: fewer KV heads per
 * page). Its page ids are those of the cache whose block tables index it; its own allocator,
 * reference counts and prefix cache stay unused. */
m3_status m3_kv_cache_create_pages(const m3_config *cfg, m3_backend *be, m3_kv_dtype dt, int pages,
                                   m3_kv_cache **out);
/* Every layer's K, V (and IK) of page `from` into page `to`, in backend memory (an fp8 page's
 * scales are part of its bytes). */
m3_status m3_kv_cache_copy_page(m3_kv_cache *c, int32_t from, int32_t to);
/* Called after the cache copied page `from` into page `to` (copy-on-write in m3_kv_seq_extend,
 * the only place page contents are copied), so that mirroring storage copies the same page; a
 * failure fails that extend, which leaves the sequence unchanged. */
typedef m3_status (*m3_kv_copy_hook)(void *user, int32_t from, int32_t to);
void m3_kv_cache_set_copy_hook(m3_kv_cache *c, m3_kv_copy_hook fn, void *user);

m3_kv_dtype m3_kv_cache_dtype(const m3_kv_cache *c);
int m3_kv_cache_block_size(const m3_kv_cache *c);
int m3_kv_cache_num_pages(const m3_kv_cache *c);
/* Pages an allocation can take: free ones plus unreferenced cached ones (evictable). */
int m3_kv_cache_free_pages(const m3_kv_cache *c);
/* Pages published in the prefix cache (referenced or not). */
int m3_kv_cache_cached_pages(const m3_kv_cache *c);
int m3_kv_page_refcount(const m3_kv_cache *c, int32_t page);

/* Takes a page off the free list (else evicts the least recently used unreferenced cached page)
 * with one reference; M3_ERR_LIMIT (naming the budget) when none is left. */
m3_status m3_kv_page_alloc(m3_kv_cache *c, int32_t *page);
void m3_kv_page_retain(m3_kv_cache *c, int32_t page);
/* Drops one reference; the page is free again when none remain. */
void m3_kv_page_release(m3_kv_cache *c, int32_t page);

void m3_kv_seq_init(m3_kv_seq *seq);
/* Gives positions [num_tokens, num_tokens + n) pages and advances num_tokens by n. A partly
 * written last page that is shared is copied first, and one that is published is withdrawn from
 * the prefix cache, since those positions will be written. On failure (out of pages:
 * M3_ERR_LIMIT naming the budget) the sequence is unchanged. */
m3_status m3_kv_seq_extend(m3_kv_cache *c, m3_kv_seq *seq, int n);
/* Shrinks the sequence to its first n tokens (n <= num_tokens), releasing pages no longer
 * needed; the kept pages' contents stay (rolling back rejected draft tokens, failed chunks). */
void m3_kv_seq_truncate(m3_kv_cache *c, m3_kv_seq *seq, int n);
/* Releases every page of the sequence and frees its block table; seq is empty afterwards. */
void m3_kv_seq_release(m3_kv_cache *c, m3_kv_seq *seq);
/* dst (empty) becomes a copy of src's block table, sharing every page. */
m3_status m3_kv_seq_fork(m3_kv_cache *c, const m3_kv_seq *src, m3_kv_seq *dst);

/* For an empty sequence about to hold tokens[n]: retains the cached pages of the longest run of
 * whole leading pages of tokens published before, appends them and returns the number of
 * tokens they cover (a multiple of the block size, at most n). */
int m3_kv_seq_match_prefix(m3_kv_cache *c, m3_kv_seq *seq, const int32_t *tokens, int n);
/* Publishes the sequence's full pages among its first n tokens (tokens[n], whose K/V are
 * computed) that are not cached yet. A page whose prefix is already cached under another page
 * stays private. */
void m3_kv_seq_publish(m3_kv_cache *c, const m3_kv_seq *seq, const int32_t *tokens, int n);

/* The cache of (sequence, layer) as the backend ops read and write it (block_table in backend
 * memory). Valid until the sequence's block table next grows. */
void m3_kv_seq_view(const m3_kv_cache *c, const m3_kv_seq *seq, int layer, m3_kv_view *out);
/* All layers at once: views [num_layers]. */
void m3_kv_seq_views(const m3_kv_cache *c, const m3_kv_seq *seq, m3_kv_view *views);
/* All layers of c's pools under a block table of num_blocks entries in c's backend memory, which
 * need not be a sequence of c (mirroring storage reads the block tables of another cache). */
void m3_kv_cache_table_views(const m3_kv_cache *c, const int32_t *table, int num_blocks,
                             m3_kv_view *views);

#endif
