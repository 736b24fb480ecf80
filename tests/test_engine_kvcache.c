/* KV page pool: page accounting, block tables, the budget limit, and that views address pages
 * exactly as backend.h lays them out (checked by storing through the backend's kv_store). */
#include <stdint.h>
#include <stdlib.h>

#include "check.h"
#include "engine/kvcache.h"

enum { LAYERS = 3, NKV = 2, HD = 4, IHD = 3, BLOCK = 4 };

static m3_config small_config(uint8_t *attn) {
  m3_config c = {0};
  c.num_layers = LAYERS;
  c.num_kv_heads = NKV;
  c.head_dim = HD;
  c.index_head_dim = IHD;
  c.index_block_size = BLOCK;
  attn[0] = M3_ATTN_FULL;
  attn[1] = M3_ATTN_SPARSE;
  attn[2] = M3_ATTN_SPARSE;
  c.layer_attn = attn;
  return c;
}

/* Per page: 3 layers of K and V (2 heads x 4 tokens x 4 dims each) + 2 sparse layers of index
 * keys (4 tokens x 3 dims), float32. */
static const size_t PAGE_BYTES = (3 * 2 * (2 * 4 * 4) + 2 * (4 * 3)) * 4;

static void test_budget(m3_backend *be, const m3_config *cfg) {
  CHECK_EQ_INT(m3_kv_page_bytes(cfg, M3_KV_F32), PAGE_BYTES);
  CHECK_EQ_INT(m3_kv_bytes_for_tokens(cfg, M3_KV_F32, 9), 3 * PAGE_BYTES);
  CHECK_EQ_INT(m3_kv_bytes_for_tokens(cfg, M3_KV_F32, 0), PAGE_BYTES);
  m3_kv_cache *c = NULL;
  CHECK_FAILS_WITH(m3_kv_cache_create(cfg, be, M3_KV_F32, PAGE_BYTES - 1, &c), M3_ERR_LIMIT,
                   "budget");
  CHECK(c == NULL);
}

static void test_pages_and_tables(m3_backend *be, const m3_config *cfg) {
  m3_kv_cache *c = NULL;
  CHECK_OK(m3_kv_cache_create(cfg, be, M3_KV_F32, 5 * PAGE_BYTES + 100, &c));
  if (!c) return;
  CHECK_EQ_INT(m3_kv_cache_num_pages(c), 5);
  CHECK_EQ_INT(m3_kv_cache_free_pages(c), 5);
  CHECK_EQ_INT(m3_kv_cache_block_size(c), BLOCK);

  m3_kv_seq a, b;
  m3_kv_seq_init(&a);
  m3_kv_seq_init(&b);
  CHECK_OK(m3_kv_seq_extend(c, &a, 1));
  CHECK_EQ_INT(a.num_blocks, 1);
  CHECK_EQ_INT(a.block_table[0], 0); /* a fresh pool hands out page 0 first */
  CHECK_OK(m3_kv_seq_extend(c, &a, 3)); /* fills block 0: no new page */
  CHECK_EQ_INT(a.num_blocks, 1);
  CHECK_EQ_INT(a.num_tokens, 4);
  CHECK_OK(m3_kv_seq_extend(c, &b, 9)); /* 3 blocks */
  CHECK_EQ_INT(b.num_blocks, 3);
  CHECK_OK(m3_kv_seq_extend(c, &a, 1));
  CHECK_EQ_INT(a.num_blocks, 2);
  CHECK_EQ_INT(m3_kv_cache_free_pages(c), 0);
  CHECK(a.block_table[1] != a.block_table[0]);
  for (int i = 0; i < b.num_blocks; i++) {
    CHECK(b.block_table[i] != a.block_table[0] && b.block_table[i] != a.block_table[1]);
    CHECK_EQ_INT(m3_kv_page_refcount(c, b.block_table[i]), 1);
  }

  /* Out of pages: an error naming the budget, and the sequence is unchanged. */
  CHECK_FAILS_WITH(m3_kv_seq_extend(c, &a, 4), M3_ERR_LIMIT, "budget");
  CHECK_EQ_INT(a.num_tokens, 5);
  CHECK_EQ_INT(a.num_blocks, 2);
  CHECK_OK(m3_kv_seq_extend(c, &a, 3)); /* still inside block 1 */
  CHECK_FAILS_WITH(m3_kv_seq_extend(c, &a, -1), M3_ERR_ARG, "extend");

  /* A shared page survives the release of one holder. */
  int32_t shared = b.block_table[0];
  m3_kv_page_retain(c, shared);
  CHECK_EQ_INT(m3_kv_page_refcount(c, shared), 2);
  m3_kv_seq_release(c, &b);
  CHECK_EQ_INT(b.num_blocks, 0);
  CHECK(b.block_table == NULL);
  CHECK_EQ_INT(m3_kv_cache_free_pages(c), 2);
  CHECK_EQ_INT(m3_kv_page_refcount(c, shared), 1);
  m3_kv_page_release(c, shared);
  CHECK_EQ_INT(m3_kv_cache_free_pages(c), 3);

  /* Truncation gives back whole pages only. */
  m3_kv_seq_truncate(c, &a, 5);
  CHECK_EQ_INT(a.num_blocks, 2);
  CHECK_EQ_INT(m3_kv_cache_free_pages(c), 3);
  m3_kv_seq_truncate(c, &a, 4);
  CHECK_EQ_INT(a.num_blocks, 1);
  CHECK_EQ_INT(a.num_tokens, 4);
  CHECK_EQ_INT(m3_kv_cache_free_pages(c), 4);

  m3_kv_seq_release(c, &a);
  CHECK_EQ_INT(m3_kv_cache_free_pages(c), 5);
  m3_kv_cache_free(c);
}

static void test_table_growth(m3_backend *be, const m3_config *cfg) {
  m3_kv_cache *c = NULL;
  CHECK_OK(m3_kv_cache_create(cfg, be, M3_KV_F32, 40 * PAGE_BYTES, &c));
  if (!c) return;
  m3_kv_seq s;
  m3_kv_seq_init(&s);
  for (int i = 0; i < 30 * BLOCK; i++) CHECK_OK(m3_kv_seq_extend(c, &s, 1));
  CHECK_EQ_INT(s.num_blocks, 30);
  CHECK(s.cap_blocks >= 30);
  int seen[40] = {0};
  for (int i = 0; i < s.num_blocks; i++) seen[s.block_table[i]]++;
  int distinct = 0;
  for (int i = 0; i < 40; i++) distinct += seen[i] == 1;
  CHECK_EQ_INT(distinct, 30);
  CHECK_EQ_INT(m3_kv_cache_free_pages(c), 10);
  m3_kv_seq_release(c, &s);
  m3_kv_cache_free(c);
}

static void test_views(m3_backend *be, const m3_config *cfg) {
  m3_kv_cache *c = NULL;
  CHECK_OK(m3_kv_cache_create(cfg, be, M3_KV_F32, 4 * PAGE_BYTES, &c));
  if (!c) return;
  /* Interleave two sequences so a's second block is page 2, not page 1. */
  m3_kv_seq a, b;
  m3_kv_seq_init(&a);
  m3_kv_seq_init(&b);
  CHECK_OK(m3_kv_seq_extend(c, &a, BLOCK));
  CHECK_OK(m3_kv_seq_extend(c, &b, 1));
  CHECK_OK(m3_kv_seq_extend(c, &a, 2));
  CHECK_EQ_INT(a.block_table[0], 0);
  CHECK_EQ_INT(b.block_table[0], 1);
  CHECK_EQ_INT(a.block_table[1], 2);

  m3_kv_view views[LAYERS];
  m3_kv_seq_views(c, &a, views);
  CHECK(views[0].ik == NULL);
  CHECK(views[1].ik != NULL && views[2].ik != NULL);
  CHECK(views[0].k != views[1].k && views[0].k != views[0].v);
  for (int l = 0; l < LAYERS; l++) {
    CHECK(views[l].block_table == a.block_table);
    CHECK_EQ_INT(views[l].num_blocks, 2);
    CHECK_EQ_INT(views[l].block_size, BLOCK);
    CHECK_EQ_INT(views[l].nkv, NKV);
    CHECK_EQ_INT(views[l].hd, HD);
    CHECK_EQ_INT(views[l].ihd, IHD);
  }

  /* Position 5 of a = block 1, slot 1 -> page 2. */
  float k[NKV * HD], v[NKV * HD], ik[IHD];
  for (int i = 0; i < NKV * HD; i++) k[i] = 100.0f + i, v[i] = 200.0f + i;
  for (int i = 0; i < IHD; i++) ik[i] = 300.0f + i;
  int32_t pos = 5;
  be->ops->kv_store(be, &views[1], &pos, 1, k, v, ik);
  const int page = 2, slot = 1;
  for (int h = 0; h < NKV; h++)
    for (int d = 0; d < HD; d++) {
      size_t at = (((size_t)page * NKV + h) * BLOCK + slot) * HD + d;
      CHECK_EQ_INT(((float *)views[1].k)[at], 100 + h * HD + d);
      CHECK_EQ_INT(((float *)views[1].v)[at], 200 + h * HD + d);
      CHECK_EQ_INT(((float *)views[0].k)[at], 0); /* other layers untouched */
    }
  for (int d = 0; d < IHD; d++)
    CHECK_EQ_INT(((float *)views[1].ik)[((size_t)page * BLOCK + slot) * IHD + d], 300 + d);

  m3_kv_seq_release(c, &a);
  m3_kv_seq_release(c, &b);
  m3_kv_cache_free(c);
}

int main(void) {
  uint8_t attn[LAYERS];
  m3_config cfg = small_config(attn);
  m3_backend *be = NULL;
  CHECK_OK(m3_backend_cpu_create(1, &be));
  if (!be) return check_summary();
  test_budget(be, &cfg);
  test_pages_and_tables(be, &cfg);
  test_table_growth(be, &cfg);
  test_views(be, &cfg);
  be->ops->destroy(be);
  return check_summary();
}
