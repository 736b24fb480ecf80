/* msa.c: MSA block selection (shared/spec/msa_spec.md §2-4, m3_text_spec.md §5.3).
 *
 * Two passes per chunk of tokens. Scores: the block max of dot(iq[t, g], IK[j]) over visible keys
 * of every candidate (non-forced) block; a work item is one token and a run of blocks, so a single
 * decode token at a long context still spreads its O(L) scan over all threads, and each index key
 * is read once for all G heads. Selection: forced blocks, then the best candidates (score
 * descending, lower id on ties, NaN last), written in ascending block order. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_internal.h"

enum {
  BLOCKS_PER_ITEM = 32,       /* candidate blocks scored by one work item */
  SCORE_BUDGET = 1 << 22,     /* floats of block scores held for one chunk of tokens */
};

typedef struct {
  const cpu_kernels *k;
  const float *iq;
  int G;
  const m3_kv_view *kv;
  const int32_t *pos;
  const m3_msa_params *p;
  int32_t *sel;
  int t0;            /* first token of this chunk */
  int nb_max;        /* blocks visible to the chunk's last-reaching token */
  int items_per_token;
  float *scores;     /* [chunk tokens][G][nb_max] */
  float *dots;       /* per worker: [G][block_size] token scores of one block */
  float *tiles;      /* fp8 cache, per worker: [block_size][ihd] one block's dequantized keys */
} msa_job;

/* Blocks visible to position p: those holding a key j <= p (and present in the table). */
static int visible_blocks(const msa_job *job, int32_t p) {
  int nb = p / job->kv->block_size + 1;
  return nb < job->kv->num_blocks ? nb : job->kv->num_blocks;
}

/* The blocks ranked by score, [*c0, *c1): visible and neither init nor local. Returns 0 when
 * every visible block is selected anyway. */
static int candidates(const msa_job *job, int nb, int *c0, int *c1) {
  if (nb <= job->p->topk) return 0;
  *c0 = job->p->init_blocks < nb ? job->p->init_blocks : nb;
  *c1 = nb - job->p->local_blocks > *c0 ? nb - job->p->local_blocks : *c0;
  return 1;
}

static void score_items(void *ctx, int64_t i0, int64_t i1, int worker) {
  const msa_job *job = ctx;
  const m3_kv_view *kv = job->kv;
  const int bs = kv->block_size, ihd = kv->ihd, G = job->G;
  float *dots = job->dots + (size_t)worker * G * bs;
  float *tile = job->tiles ? job->tiles + (size_t)worker * bs * ihd : NULL;
  for (int64_t item = i0; item < i1; item++) {
    int tc = (int)(item / job->items_per_token);
    int t = job->t0 + tc;
    int32_t p = job->pos[t];
    int c0, c1;
    if (p < 0 || !candidates(job, visible_blocks(job, p), &c0, &c1)) continue;
    int b0 = c0 + (int)(item % job->items_per_token) * BLOCKS_PER_ITEM;
    int b1 = b0 + BLOCKS_PER_ITEM < c1 ? b0 + BLOCKS_PER_ITEM : c1;
    const float *q = job->iq + (size_t)t * G * ihd;
    float *out = job->scores + (size_t)tc * G * job->nb_max;
    for (int b = b0; b < b1; b++) {
      int n = p - b * bs + 1 < bs ? p - b * bs + 1 : bs;
      const float *keys = cpu_kv_rows(job->k, kv, kv->ik, kv->block_table[b], bs, ihd, 0, n, tile);
      memset(dots, 0, (size_t)G * bs * sizeof(float));
      job->k->tile_gemm(keys, n, ihd, q, ihd, G, dots, bs); /* dots[g][j] = dot(iq[g], IK[j]) */
      for (int g = 0; g < G; g++) {
        float best = -INFINITY; /* NaN dots never win: NaN ranks as -inf */
        for (int j = 0; j < n; j++)
          if (dots[(size_t)g * bs + j] > best) best = dots[(size_t)g * bs + j];
        out[(size_t)g * job->nb_max + b] = best;
      }
    }
  }
}

static void sort_ascending(int32_t *v, int n) {
  for (int i = 1; i < n; i++)
    for (int j = i; j > 0 && v[j - 1] > v[j]; j--) {
      int32_t tmp = v[j];
      v[j] = v[j - 1];
      v[j - 1] = tmp;
    }
}

static void select_tokens(void *ctx, int64_t i0, int64_t i1, int worker) {
  (void)worker;
  const msa_job *job = ctx;
  const int topk = job->p->topk, G = job->G;
  for (int64_t tc = i0; tc < i1; tc++) {
    int t = job->t0 + (int)tc;
    int32_t p = job->pos[t];
    int nb = p < 0 ? 0 : visible_blocks(job, p);
    for (int g = 0; g < G; g++) {
      int32_t *out = job->sel + ((size_t)t * G + g) * topk;
      int n = 0, c0, c1;
      if (nb > 0 && candidates(job, nb, &c0, &c1)) {
        /* Forced blocks: init, then local (vLLM scores them 1e30 and 1e29), which only matters
         * when they alone exceed topk. */
        for (int b = 0; b < c0 && n < topk; b++) out[n++] = b;
        for (int b = c1; b < nb && n < topk; b++) out[n++] = b;
        int want = topk - n < c1 - c0 ? topk - n : c1 - c0;
        if (want > 0) {
          const float *s = job->scores + ((size_t)tc * G + g) * job->nb_max;
          cpu_topk(s + c0, c1 - c0, want, out + n);
          for (int i = 0; i < want; i++) out[n + i] += c0;
          n += want;
        }
        sort_ascending(out, n);
      } else {
        for (int b = 0; b < nb && n < topk; b++) out[n++] = b;
      }
      for (; n < topk; n++) out[n] = -1;
    }
  }
}

void cpu_msa_select(m3_backend *be, const float *iq, int G, const m3_kv_view *kv,
                    const int32_t *pos, int T, const m3_msa_params *p, int32_t *sel) {
  cpu_backend *cb = cpu_of(be);
  msa_job job = {cb->k, iq, G, kv, pos, p, sel, 0, 0, 0, NULL, NULL, NULL};
  int nb_all = 1;
  for (int t = 0; t < T; t++)
    if (pos[t] >= 0 && visible_blocks(&job, pos[t]) > nb_all) nb_all = visible_blocks(&job, pos[t]);
  int chunk = SCORE_BUDGET / (G * nb_all);
  if (chunk < 1) chunk = 1;
  if (chunk > T) chunk = T;
  job.scores = malloc((size_t)chunk * G * nb_all * sizeof(float));
  const size_t workers = (size_t)m3_threadpool_size(cb->pool);
  job.dots = malloc(workers * G * kv->block_size * sizeof(float));
  if (kv->dtype == M3_KV_FP8)
    job.tiles = malloc(workers * kv->block_size * kv->ihd * sizeof(float));
  if (!job.scores || !job.dots || (kv->dtype == M3_KV_FP8 && !job.tiles)) {
    free(job.scores);
    free(job.dots);
    free(job.tiles);
    /* Out of memory in an op that cannot fail: an empty, visibly invalid selection. */
    for (size_t i = 0; i < (size_t)T * G * p->topk; i++) sel[i] = -1;
    return;
  }
  for (int t0 = 0; t0 < T; t0 += chunk) {
    int tn = T - t0 < chunk ? T - t0 : chunk;
    job.t0 = t0;
    job.nb_max = nb_all;
    job.items_per_token = (nb_all + BLOCKS_PER_ITEM - 1) / BLOCKS_PER_ITEM;
    m3_parallel_for(cb->pool, (int64_t)tn * job.items_per_token, 1, score_items, &job);
    m3_parallel_for(cb->pool, tn, 0, select_tokens, &job);
  }
  free(job.scores);
  free(job.dots);
  free(job.tiles);
}
