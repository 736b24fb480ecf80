/* Sampling transforms on fixed logits: the empirical distribution of 200,000 draws matches the
 * distribution each transform defines (computed here from the definitions), by a chi-square test
 * at a false-alarm rate of 1e-6 (fixed seeds, so the outcome is deterministic); excluded tokens
 * are never drawn; greedy is the argmax; a seed reproduces its draws. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "engine/sampler.h"

enum { V = 8, DRAWS = 200000 };
static const float LOGITS[V] = {1.0f, 2.0f, 0.5f, -1.0f, 3.0f, 2.0f, 0.0f, -0.5f};

/* Upper 1e-6 quantiles of the chi-square distribution, df = 1..7. */
static const double CHI2_1E6[8] = {0, 23.928, 27.631, 30.665, 33.377, 35.888, 38.258, 40.522};

/* softmax(l / t) restricted to keep[], in want[]. */
static void softmax_keep(const double *l, double t, const int *keep, double *want) {
  double total = 0;
  for (int i = 0; i < V; i++) total += keep[i] ? exp(l[i] / t) : 0;
  for (int i = 0; i < V; i++) want[i] = keep[i] ? exp(l[i] / t) / total : 0;
}

static void check_draws(const char *what, const m3_sampling_params *p, const m3_sample_history *h,
                        const double *want) {
  m3_sampler_scratch s;
  CHECK_OK(m3_sampler_scratch_init(&s, V));
  long count[V] = {0};
  uint64_t rng = m3_sampler_seed(42, 0);
  for (int i = 0; i < DRAWS; i++) {
    int32_t t = m3_sampler_sample(p, &rng, LOGITS, h, &s);
    CHECK(t >= 0 && t < V);
    if (t >= 0 && t < V) count[t]++;
  }
  double chi2 = 0;
  int df = -1, never_bad = 0;
  for (int i = 0; i < V; i++) {
    if (want[i] == 0) {
      never_bad += count[i] != 0;
      continue;
    }
    double e = want[i] * DRAWS;
    chi2 += (count[i] - e) * (count[i] - e) / e;
    df++;
  }
  printf("%-34s chi2 %7.3f, df %d, critical %.3f\n", what, chi2, df, CHI2_1E6[df > 0 ? df : 1]);
  CHECK_EQ_INT(never_bad, 0);
  CHECK(df >= 1 && chi2 < CHI2_1E6[df]);
  m3_sampler_scratch_free(&s);
}

static void base(m3_sampling_params *p) {
  m3_sampling_params_init(p);
  p->temperature = 1.0f;
}

static void test_transforms(void) {
  const m3_sample_history none = {0};
  double l[V], want[V];
  int all[V];
  for (int i = 0; i < V; i++) l[i] = LOGITS[i], all[i] = 1;
  m3_sampling_params p;

  base(&p);
  p.temperature = 0.7f;
  softmax_keep(l, 0.7, all, want);
  check_draws("temperature 0.7", &p, &none, want);

  /* top_k 3: ids 4 (3.0), then 1 and 5 (2.0 each). */
  base(&p);
  p.top_k = 3;
  int k3[V] = {0, 1, 0, 0, 1, 1, 0, 0};
  softmax_keep(l, 1.0, k3, want);
  check_draws("top_k 3", &p, &none, want);

  /* top_p 0.8: the smallest most-likely-first set reaching 0.8 (from the full softmax). */
  base(&p);
  p.top_p = 0.8f;
  double full[V];
  softmax_keep(l, 1.0, all, full);
  int order[V] = {4, 1, 5, 0, 2, 6, 7, 3}, kp[V] = {0};
  double acc = 0;
  for (int j = 0; j < V && acc < 0.8; j++) acc += full[order[j]], kp[order[j]] = 1;
  softmax_keep(l, 1.0, kp, want);
  check_draws("top_p 0.8", &p, &none, want);

  /* min_p 0.2: p >= 0.2 * p(id 4). */
  base(&p);
  p.min_p = 0.2f;
  int km[V];
  for (int i = 0; i < V; i++) km[i] = full[i] >= 0.2 * full[4];
  softmax_keep(l, 1.0, km, want);
  check_draws("min_p 0.2", &p, &none, want);

  /* Penalties and bias: repetition 1.5 over prompt {1, 3} and generated {0, 0, 6}; presence 0.5
   * and frequency 0.25 over the generated ones; +2 on id 7; banned id 2. */
  base(&p);
  p.repetition_penalty = 1.5f;
  p.presence_penalty = 0.5f;
  p.frequency_penalty = 0.25f;
  int32_t bias_ids[2] = {7, 2};
  float bias_values[2] = {2.0f, -INFINITY};
  p.logit_bias_ids = bias_ids;
  p.logit_bias_values = bias_values;
  p.n_logit_bias = 2;
  const int32_t prompt[2] = {1, 3}, gen[3] = {0, 0, 6};
  const m3_sample_history h = {prompt, 2, gen, 3};
  double pl[V];
  int kb[V];
  for (int i = 0; i < V; i++) pl[i] = LOGITS[i], kb[i] = i != 2;
  pl[7] += 2.0;
  const int seen[] = {1, 3, 0, 6};
  for (int j = 0; j < 4; j++) {
    int t = seen[j];
    pl[t] = pl[t] > 0 ? pl[t] / 1.5 : pl[t] * 1.5;
  }
  pl[0] -= 0.5 + 2 * 0.25;
  pl[6] -= 0.5 + 0.25;
  softmax_keep(pl, 1.0, kb, want);
  check_draws("penalties + logit_bias", &p, &h, want);

  /* Combined: temperature 1.3, top_k 5, top_p 0.9, min_p 0.1, in that order. */
  base(&p);
  p.temperature = 1.3f;
  p.top_k = 5;
  p.top_p = 0.9f;
  p.min_p = 0.1f;
  int kc[V] = {0};
  for (int j = 0; j < 5; j++) kc[order[j]] = 1;
  double t5[V];
  softmax_keep(l, 1.3, kc, t5);
  int kcp[V] = {0};
  acc = 0;
  for (int j = 0; j < 5 && acc < 0.9; j++) acc += t5[order[j]], kcp[order[j]] = 1;
  double tp[V];
  softmax_keep(l, 1.3, kcp, tp);
  int kcm[V];
  for (int i = 0; i < V; i++) kcm[i] = kcp[i] && tp[i] >= 0.1 * tp[4];
  softmax_keep(l, 1.3, kcm, want);
  check_draws("temp 1.3 + top_k 5 + top_p 0.9 + min_p 0.1", &p, &none, want);
}

static void test_greedy_and_seeds(void) {
  m3_sampler_scratch s;
  CHECK_OK(m3_sampler_scratch_init(&s, V));
  const m3_sample_history none = {0};
  m3_sampling_params p;
  m3_sampling_params_init(&p);
  p.temperature = 0.0f;
  uint64_t rng = 1, before = rng;
  CHECK_EQ_INT(m3_sampler_sample(&p, &rng, LOGITS, &none, &s), 4);
  CHECK(rng == before); /* greedy draws nothing */
  int32_t id = 3;
  float big = 10.0f;
  p.logit_bias_ids = &id;
  p.logit_bias_values = &big;
  p.n_logit_bias = 1;
  CHECK_EQ_INT(m3_sampler_sample(&p, &rng, LOGITS, &none, &s), 3);

  base(&p);
  int32_t a[100], b[100], c[100];
  uint64_t ra = m3_sampler_seed(7, 0), rb = m3_sampler_seed(7, 0), rc = m3_sampler_seed(7, 1);
  for (int i = 0; i < 100; i++) {
    a[i] = m3_sampler_sample(&p, &ra, LOGITS, &none, &s);
    b[i] = m3_sampler_sample(&p, &rb, LOGITS, &none, &s);
    c[i] = m3_sampler_sample(&p, &rc, LOGITS, &none, &s);
  }
  CHECK(memcmp(a, b, sizeof a) == 0);
  CHECK(memcmp(a, c, sizeof a) != 0);

  /* Log-probabilities: log-softmax of the raw logits, top ones most likely first. */
  int32_t top[3];
  float top_lp[3];
  float lp = m3_sampler_logprobs(LOGITS, V, 0, 3, top, top_lp);
  double z = 0;
  for (int i = 0; i < V; i++) z += exp(LOGITS[i]);
  CHECK_NEAR(lp, 1.0 - log(z), 1e-5);
  CHECK_EQ_INT(top[0], 4);
  CHECK_EQ_INT(top[1], 1);
  CHECK_EQ_INT(top[2], 5);
  CHECK_NEAR(top_lp[2], 2.0 - log(z), 1e-5);
  m3_sampler_scratch_free(&s);
}

/* The reference for m3_sampler_candidates: sort every candidate (most likely first, ties to
 * the lower id), then cut by top_k, top_p and min_p exactly as sampler.h defines them. */
static const float *ref_keys;
static int ref_rank(const void *a, const void *b) {
  int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
  if (ref_keys[x] != ref_keys[y]) return ref_keys[x] > ref_keys[y] ? -1 : 1;
  return (x > y) - (x < y);
}

static int ref_candidates(const m3_sampling_params *p, const float *l, int vocab, int32_t *ids,
                          double *prob, double *total) {
  int32_t best = 0;
  for (int i = 1; i < vocab; i++)
    if (l[i] > l[best]) best = i;
  const double inv_t = 1.0 / p->temperature, max = l[best];
  int n = 0;
  double all = 0.0; /* every candidate's weight, in id order */
  for (int i = 0; i < vocab; i++)
    if (l[i] > -INFINITY) {
      ids[n++] = i;
      all += exp(((double)l[i] - max) * inv_t);
    }
  const int by_k = p->top_k > 0 && p->top_k < n, by_p = p->top_p < 1.0f;
  if (by_k || by_p) {
    ref_keys = l;
    qsort(ids, (size_t)n, sizeof *ids, ref_rank);
  }
  if (by_k) n = p->top_k;
  *total = 0.0;
  for (int i = 0; i < n; i++) *total += prob[i] = exp(((double)l[ids[i]] - max) * inv_t);
  if (by_p) {
    double want = (double)p->top_p * (by_k ? *total : all), acc = 0.0;
    int keep = 0;
    while (keep < n && acc < want) acc += prob[keep++];
    n = keep;
    *total = acc;
  }
  if (p->min_p > 0.0f) {
    int kept = 0;
    *total = 0.0;
    for (int i = 0; i < n; i++)
      if (prob[i] >= (double)p->min_p) {
        ids[kept] = ids[i];
        *total += prob[kept++] = prob[i];
      }
    n = kept;
  }
  return n;
}


/* Sampling parameters of the filter grids below: temperature, top_k, top_p, min_p 0.05 or none. */
static m3_sampling_params filter_params(float temperature, int top_k, float top_p, int min_p) {
  m3_sampling_params p;
  m3_sampling_params_init(&p);
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.min_p = min_p ? 0.05f : 0.0f;
  return p;
}

/* The first largest of l[0..n). */
static int32_t row_argmax(const float *l, int n) {
  int32_t best = 0;
  for (int i = 1; i < n; i++)
    if (l[i] > l[best]) best = i;
  return best;
}
/* Partial selection (top_k heap, top_p buckets) against the full sort, on random logits: wide,
 * narrow, quantised to a few values (many ties), flat (all tied), with banned tokens. The kept
 * ids, their order and their weights must be identical, so every draw is. */
static void test_selection_matches_full_sort(void) {
  enum { RV = 3000 };
  static float l[RV];
  static int32_t ref_ids[RV];
  static double ref_prob[RV];
  m3_sampler_scratch s;
  CHECK_OK(m3_sampler_scratch_init(&s, RV));
  uint64_t rng = m3_sampler_seed(99, 0);
  const int top_ks[] = {0, 1, 2, 40, 1000, RV - 1, RV + 5};
  const float top_ps[] = {1.0f, 1e-6f, 0.1f, 0.5f, 0.9f, 0.999f, 0.999999f};
  const float temps[] = {0.25f, 1.0f, 3.0f};
  int cases = 0, mismatches = 0;
  for (int shape = 0; shape < 5; shape++) {
    for (int i = 0; i < RV; i++) {
      double u = (double)(m3_sampler_seed(rng, i) >> 11) * 0x1.0p-53;
      switch (shape) {
        case 0: l[i] = (float)(60.0 * u - 50.0); break;          /* wide: beyond every bucket */
        case 1: l[i] = (float)(4.0 * u); break;                  /* narrow */
        case 2: l[i] = (float)(int)(8.0 * u) * 0.5f; break;      /* 8 values: ties everywhere */
        case 3: l[i] = 1.5f; break;                              /* flat */
        default: l[i] = u < 0.3 ? -INFINITY : (float)(20.0 * u); /* banned tokens */
      }
    }
    rng++;
    for (size_t a = 0; a < sizeof top_ks / sizeof *top_ks; a++)
      for (size_t b = 0; b < sizeof top_ps / sizeof *top_ps; b++)
        for (size_t c = 0; c < sizeof temps / sizeof *temps; c++)
          for (int mp = 0; mp < 2; mp++) {
            const m3_sampling_params p = filter_params(temps[c], top_ks[a], top_ps[b], mp);
            double want_total, got_total;
            int want_n = ref_candidates(&p, l, RV, ref_ids, ref_prob, &want_total);
            memcpy(s.work, l, sizeof l);
            int got_n = m3_sampler_candidates(&p, &s, row_argmax(l, RV), &got_total);
            int same = got_n == want_n && got_total == want_total &&
                       memcmp(s.ids, ref_ids, (size_t)want_n * sizeof *ref_ids) == 0 &&
                       memcmp(s.prob, ref_prob, (size_t)want_n * sizeof *ref_prob) == 0;
            if (!same && mismatches++ < 5)
              printf("mismatch: shape %d top_k %d top_p %g T %g min_p %g: n %d vs %d\n", shape,
                     p.top_k, p.top_p, p.temperature, p.min_p, got_n, want_n);
            cases++;
          }
  }
  printf("selection vs full sort: %d cases, %d mismatches\n", cases, mismatches);
  CHECK_EQ_INT(mismatches, 0);
  m3_sampler_scratch_free(&s);
}

/* m3_sampler_sample_unit (what a backend's sample_rows must match) against the reference
 * candidates and a draw restated here (the first whose cumulative weight exceeds unit * total, else
 * the last), at units 0, just below 1 and random; and m3_sampler_sample is sample_unit with the
 * value m3_sampler_next_unit gives, advancing the PRNG as that one call does (none when greedy). */
static void test_unit_draws(void) {
  enum { RV = 700 };
  static float l[RV];
  static int32_t ref_ids[RV];
  static double ref_prob[RV];
  m3_sampler_scratch s;
  CHECK_OK(m3_sampler_scratch_init(&s, RV));
  const m3_sample_history none = {0};
  uint64_t rng = m3_sampler_seed(7, 3);
  const int top_ks[] = {0, 1, 5, 50, RV};
  const float top_ps[] = {0.1f, 0.9f, 1.0f};
  const float temps[] = {0.0f, 0.3f, 1.0f, 2.0f};
  int cases = 0, mismatches = 0, stream_breaks = 0;
  for (int shape = 0; shape < 3; shape++) {
    for (int i = 0; i < RV; i++) {
      double u = m3_sampler_next_unit(&rng);
      l[i] = shape == 0   ? (float)(12.0 * u - 6.0)
             : shape == 1 ? (float)(int)(6.0 * u) /* ties */
                          : (u < 0.2 ? -INFINITY : (float)(30.0 * u));
    }
    for (size_t a = 0; a < sizeof top_ks / sizeof *top_ks; a++)
      for (size_t b = 0; b < sizeof top_ps / sizeof *top_ps; b++)
        for (size_t c = 0; c < sizeof temps / sizeof *temps; c++)
          for (int mp = 0; mp < 2; mp++)
            for (int draw = 0; draw < 4; draw++) {
              const m3_sampling_params p = filter_params(temps[c], top_ks[a], top_ps[b], mp);
              const double unit = draw == 0 ? 0.0 : draw == 1 ? 1.0 - 0x1.0p-53 : m3_sampler_next_unit(&rng);
              int32_t want = row_argmax(l, RV);
              if (p.temperature > 0.0f) {
                double total, acc = 0.0;
                int n = ref_candidates(&p, l, RV, ref_ids, ref_prob, &total);
                want = ref_ids[n - 1];
                for (int i = 0; i < n; i++)
                  if (unit * total < (acc += ref_prob[i])) {
                    want = ref_ids[i];
                    break;
                  }
              }
              mismatches += m3_sampler_sample_unit(&p, unit, l, &none, &s) != want;
              uint64_t by_sample = rng, by_unit = rng;
              const int32_t sampled = m3_sampler_sample(&p, &by_sample, l, &none, &s);
              const int32_t drawn = p.temperature > 0.0f
                                        ? m3_sampler_sample_unit(&p, m3_sampler_next_unit(&by_unit),
                                                                 l, &none, &s)
                                        : m3_sampler_sample_unit(&p, 0.5, l, &none, &s);
              stream_breaks += sampled != drawn || by_sample != by_unit;
              cases++;
            }
  }
  printf("unit draws: %d cases, %d mismatches, %d PRNG stream breaks\n", cases, mismatches,
         stream_breaks);
  CHECK_EQ_INT(mismatches, 0);
  CHECK_EQ_INT(stream_breaks, 0);
  m3_sampler_scratch_free(&s);
}

int main(void) {
  test_transforms();
  test_greedy_and_seeds();
  test_selection_matches_full_sort();
  test_unit_draws();
  return check_summary();
}
