#include "engine/sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

m3_status m3_sampler_scratch_init(m3_sampler_scratch *s, int vocab) {
  s->vocab = vocab;
  s->work = malloc((size_t)vocab * sizeof *s->work);
  s->ids = malloc((size_t)vocab * sizeof *s->ids);
  s->prob = malloc((size_t)vocab * sizeof *s->prob);
  s->seen = calloc((size_t)vocab, 1);
  if (!s->work || !s->ids || !s->prob || !s->seen) {
    m3_sampler_scratch_free(s);
    return m3_fail(M3_ERR_NOMEM, "sampler: scratch for a vocabulary of %d", vocab);
  }
  return M3_OK;
}

void m3_sampler_scratch_free(m3_sampler_scratch *s) {
  free(s->work);
  free(s->ids);
  free(s->prob);
  free(s->seen);
  *s = (m3_sampler_scratch){0};
}

/* splitmix64 (Steele, Lea, Flood 2014): one add and a mixing function per draw. */
static uint64_t next_u64(uint64_t *state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t m3_sampler_seed(uint64_t seed, int index) {
  uint64_t s = seed ^ ((uint64_t)(uint32_t)index * 0xd1b54a32d192ed03ull);
  return next_u64(&s);
}

/* Uniform in [0, 1) with 53 random bits. */
double m3_sampler_next_unit(uint64_t *state) { return (double)(next_u64(state) >> 11) * 0x1.0p-53; }

enum { SEEN_ANY = 1, SEEN_GENERATED = 2 };

static void apply_penalties(const m3_sampling_params *p, const m3_sample_history *h,
                            m3_sampler_scratch *s) {
  float *l = s->work;
  const int rep = p->repetition_penalty != 1.0f;
  const int pres = p->presence_penalty != 0.0f, freq = p->frequency_penalty != 0.0f;
  if (!rep && !pres && !freq) return;
  for (int i = 0; i < h->n_prompt; i++) s->seen[h->prompt[i]] |= SEEN_ANY;
  for (int i = 0; i < h->n_generated; i++) s->seen[h->generated[i]] |= SEEN_ANY;
  /* One pass over the marked ids applies the once-per-token penalties, then clears the marks. */
  const int32_t *lists[2] = {h->prompt, h->generated};
  const int lens[2] = {h->n_prompt, h->n_generated};
  for (int g = 0; g < 2; g++)
    for (int i = 0; i < lens[g]; i++) {
      int32_t t = lists[g][i];
      if (!(s->seen[t] & SEEN_ANY)) continue;
      if (rep) l[t] = l[t] > 0 ? l[t] / p->repetition_penalty : l[t] * p->repetition_penalty;
      s->seen[t] = 0;
    }
  if (freq)
    for (int i = 0; i < h->n_generated; i++) l[h->generated[i]] -= p->frequency_penalty;
  if (pres) {
    for (int i = 0; i < h->n_generated; i++) {
      int32_t t = h->generated[i];
      if (!(s->seen[t] & SEEN_GENERATED)) l[t] -= p->presence_penalty;
      s->seen[t] |= SEEN_GENERATED;
    }
    for (int i = 0; i < h->n_generated; i++) s->seen[h->generated[i]] = 0;
  }
}

static int32_t argmax(const float *l, int vocab) {
  int32_t best = 0;
  for (int i = 1; i < vocab; i++)
    if (l[i] > l[best]) best = i;
  return best;
}

/* Most likely first, ties to the lower id: a total order, so the result never depends on the
 * selection's or the sort's own tie handling. */
static inline int ranks_before(const float *l, int32_t x, int32_t y) {
  return l[x] > l[y] || (l[x] == l[y] && x < y);
}

static _Thread_local const float *sort_keys; /* qsort's comparator takes no context */
static int by_rank(const void *a, const void *b) {
  int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
  return ranks_before(sort_keys, x, y) ? -1 : ranks_before(sort_keys, y, x);
}

static void sort_ids(const float *l, int32_t *ids, int n) {
  sort_keys = l;
  qsort(ids, (size_t)n, sizeof *ids, by_rank);
}

/* Restores the heap ids[0..n) below `at`; the root is the candidate that ranks last. */
static void sift_down(const float *l, int32_t *ids, int n, int at) {
  for (;;) {
    int worst = at, c = 2 * at + 1;
    if (c < n && ranks_before(l, ids[worst], ids[c])) worst = c;
    if (c + 1 < n && ranks_before(l, ids[worst], ids[c + 1])) worst = c + 1;
    if (worst == at) return;
    int32_t t = ids[at];
    ids[at] = ids[worst];
    ids[worst] = t;
    at = worst;
  }
}

/* ids[0..k) := the k best of ids[0..n), best first: a heap of the k best so far, O(n log k),
 * where nearly every candidate costs one comparison with the heap's root. */
static void select_top_k(const float *l, int32_t *ids, int n, int k) {
  for (int i = k / 2 - 1; i >= 0; i--) sift_down(l, ids, k, i);
  for (int i = k; i < n; i++)
    if (ranks_before(l, ids[i], ids[0])) {
      ids[0] = ids[i];
      sift_down(l, ids, k, 0);
    }
  for (int m = k - 1; m > 0; m--) { /* heap sort: the last-ranked goes to the back */
    int32_t t = ids[0];
    ids[0] = ids[m];
    ids[m] = t;
    sift_down(l, ids, m, 0);
  }
}

/* top_p finds its threshold in buckets of the scaled logit distance from the maximum,
 * z = (max - l) / T: bucket masses locate the bucket where the cumulative weight reaches the
 * target, and only the candidates up to that bucket are sorted. A bucket is monotone in the
 * logit, so those candidates are exactly the head of the full sorted order. */
enum { NUCLEUS_BUCKETS = 256 };
#define NUCLEUS_SPAN 32.0 /* z covered by the buckets; weights beyond e^-32 share the last one */

static int nucleus_bucket(double z) {
  double b = z * (NUCLEUS_BUCKETS / NUCLEUS_SPAN);
  return b < NUCLEUS_BUCKETS - 1 ? (int)b : NUCLEUS_BUCKETS - 1; /* NaN lands in the last too */
}

/* Puts the candidates of buckets <= last first in ids[0..n), sorted; returns how many. */
static int gather_sorted(const float *l, int32_t *ids, int n, double max, double inv_t, int last) {
  int m = 0;
  for (int i = 0; i < n; i++)
    if (nucleus_bucket((max - (double)l[ids[i]]) * inv_t) <= last) {
      int32_t t = ids[m];
      ids[m++] = ids[i];
      ids[i] = t;
    }
  sort_ids(l, ids, m);
  return m;
}

/* Weights exp((l - max) / T) of ids[0..n) into prob; returns their sum. They never overflow, and
 * double sums over a 200k vocab stay exact enough that the last token is reachable. */
static double weigh(const float *l, const int32_t *ids, double *prob, int n, double max,
                    double inv_t) {
  double total = 0.0;
  for (int i = 0; i < n; i++) total += prob[i] = exp(((double)l[ids[i]] - max) * inv_t);
  return total;
}

/* Length of the shortest prefix of the sorted ids whose weight reaches `want`; *acc its weight. */
static int nucleus_prefix(const double *prob, int n, double want, double *acc) {
  int keep = 0;
  *acc = 0.0;
  while (keep < n && *acc < want) *acc += prob[keep++];
  return keep;
}

int m3_sampler_candidates(const m3_sampling_params *p, m3_sampler_scratch *s, int32_t best,
                          double *total) {
  const int V = s->vocab;
  const float *l = s->work;
  int32_t *ids = s->ids;
  double *prob = s->prob;
  const double inv_t = 1.0 / p->temperature, max = l[best];
  const int top_p = p->top_p > 0.0f && p->top_p < 1.0f;

  /* Candidates: every token not banned, in id order. */
  int n = 0;
  for (int i = 0; i < V; i++)
    if (l[i] > -INFINITY) ids[n++] = i;
  if (p->top_k > 0 && p->top_k < n) {
    select_top_k(l, ids, n, p->top_k);
    n = p->top_k;
    *total = weigh(l, ids, prob, n, max, inv_t);
    if (top_p) n = nucleus_prefix(prob, n, (double)p->top_p * *total, total);
  } else if (top_p) {
    /* The target is top_p of the weight of all candidates, summed in id order. */
    double mass[NUCLEUS_BUCKETS] = {0}, all = 0.0;
    for (int i = 0; i < n; i++) {
      double z = (max - (double)l[ids[i]]) * inv_t, w = exp(-z);
      all += w;
      mass[nucleus_bucket(z)] += w;
    }
    const double want = (double)p->top_p * all;
    int last = 0;
    for (double cum = mass[0]; last < NUCLEUS_BUCKETS - 1 && cum < want;) cum += mass[++last];
    /* Summed in another order, the sorted head may fall short of the target by a rounding:
     * then every candidate is sorted, as a full sort would. */
    for (;; last = NUCLEUS_BUCKETS - 1) {
      int m = gather_sorted(l, ids, n, max, inv_t, last);
      weigh(l, ids, prob, m, max, inv_t);
      int keep = nucleus_prefix(prob, m, want, total);
      if (*total >= want || m == n) {
        n = keep;
        break;
      }
    }
  } else {
    *total = weigh(l, ids, prob, n, max, inv_t);
  }
  if (p->min_p > 0.0f) {
    /* The most likely token has weight exactly 1 (its exp(0)). */
    const double floor_w = (double)p->min_p;
    int kept = 0;
    *total = 0.0;
    for (int i = 0; i < n; i++)
      if (prob[i] >= floor_w) {
        ids[kept] = ids[i];
        *total += prob[kept++] = prob[i];
      }
    n = kept;
  }
  return n;
}

/* Steps 1-2 into s->work; returns the argmax. */
static int32_t transform(const m3_sampling_params *p, const float *logits,
                         const m3_sample_history *h, m3_sampler_scratch *s) {
  float *l = s->work;
  memcpy(l, logits, (size_t)s->vocab * sizeof *l);
  for (int i = 0; i < p->n_logit_bias; i++) l[p->logit_bias_ids[i]] += p->logit_bias_values[i];
  apply_penalties(p, h, s);
  return argmax(l, s->vocab);
}

/* Draws with the unit value `unit` from the n candidates in s->ids / s->prob (weights summing to
 * total), skipping index `skip` (-1: none). */
static int32_t draw(m3_sampler_scratch *s, double unit, int n, double total, int skip) {
  double u = unit * total, acc = 0.0;
  int last = -1;
  for (int i = 0; i < n; i++) {
    if (i == skip) continue;
    acc += s->prob[i];
    last = i;
    if (u < acc) return s->ids[i];
  }
  /* Rounding left u at the very top of the range (or skipped the only candidate). */
  return last >= 0 ? s->ids[last] : s->ids[skip];
}

/* Whether a draw happens: temperature > 0 and some token is not banned. */
static int draws(const m3_sampling_params *p, const m3_sampler_scratch *s, int32_t best) {
  return p->temperature > 0.0f && s->work[best] > -INFINITY;
}

/* m3_sampler_sample with its draw's unit value taken from *rng, or `unit` when rng is NULL. */
static int32_t sample(const m3_sampling_params *p, uint64_t *rng, double unit, const float *logits,
                      const m3_sample_history *h, m3_sampler_scratch *s) {
  int32_t best = transform(p, logits, h, s);
  if (!draws(p, s, best)) return best;
  double total;
  int n = m3_sampler_candidates(p, s, best, &total);
  return draw(s, rng ? m3_sampler_next_unit(rng) : unit, n, total, -1);
}

int32_t m3_sampler_sample(const m3_sampling_params *p, uint64_t *rng, const float *logits,
                          const m3_sample_history *h, m3_sampler_scratch *s) {
  return sample(p, rng, 0.0, logits, h, s);
}

int32_t m3_sampler_sample_unit(const m3_sampling_params *p, double unit, const float *logits,
                               const m3_sample_history *h, m3_sampler_scratch *s) {
  return sample(p, NULL, unit, logits, h, s);
}

int32_t m3_sampler_verify(const m3_sampling_params *p, uint64_t *rng, const float *logits,
                          const m3_sample_history *h, m3_sampler_scratch *s, int32_t draft) {
  int32_t best = transform(p, logits, h, s);
  if (!draws(p, s, best)) return best;
  double total;
  int n = m3_sampler_candidates(p, s, best, &total);
  if (draft < 0) return draw(s, m3_sampler_next_unit(rng), n, total, -1);
  int at = -1;
  for (int i = 0; i < n && at < 0; i++)
    if (s->ids[i] == draft) at = i;
  const double w = at >= 0 ? s->prob[at] : 0.0;
  if (m3_sampler_next_unit(rng) * total < w) return draft;
  /* Rejected, so the draft was not the only candidate: the rest has weight. */
  return draw(s, m3_sampler_next_unit(rng), n, total - w, at);
}

float m3_sampler_logprobs(const float *logits, int vocab, int32_t token, int n_top,
                          int32_t *top_ids, float *top_lp) {
  const double max = logits[argmax(logits, vocab)];
  double sum = 0.0;
  for (int i = 0; i < vocab; i++) sum += exp((double)logits[i] - max);
  const double lse = max + log(sum);
  /* Insertion into a short sorted list: n_top is at most 20. */
  int have = 0;
  for (int i = 0; i < vocab && n_top > 0; i++) {
    if (have == n_top && !(logits[i] > logits[top_ids[have - 1]])) continue;
    int j = have < n_top ? have++ : have - 1;
    while (j > 0 && logits[i] > logits[top_ids[j - 1]]) {
      top_ids[j] = top_ids[j - 1];
      j--;
    }
    top_ids[j] = i;
  }
  for (int j = 0; j < have; j++) top_lp[j] = (float)((double)logits[top_ids[j]] - lse);
  return (float)((double)logits[token] - lse);
}
