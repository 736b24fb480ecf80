/* sampler.h: picking the next token from a row of logits under m3_sampling_params.
 *
 * The transforms, in this order (the order Hugging Face's logits warpers apply them):
 *   1. logit_bias: l[id] += bias                        (-inf bans a token)
 *   2. repetition_penalty r over prompt and generated tokens: l > 0 ? l / r : l * r
 *      presence_penalty a, frequency_penalty f over generated tokens (OpenAI):
 *      l[id] -= a * (count[id] > 0) + f * count[id]
 *   3. temperature 0: argmax (ties to the lower id); the filters below never drop the argmax, so
 *      they are skipped. Otherwise p = softmax(l / temperature) and:
 *   4. top_k: keep the k most likely (ties to the lower id)
 *   5. top_p: keep the smallest most-likely-first prefix whose probability reaches top_p
 *      (of the weight left by top_k; without top_k, of all candidates summed in id order)
 *   6. min_p: keep tokens with p >= min_p * max p
 *   7. draw from what is kept, renormalised, with the request's PRNG.
 * Each draw consumes exactly one PRNG value, so a sample's tokens depend only on its seed and its
 * logits, never on what else is in the batch. */
#ifndef M3_ENGINE_SAMPLER_H
#define M3_ENGINE_SAMPLER_H

#include <stdint.h>

#include "m3.h"

/* Work arrays of one vocabulary size, reused across calls (one per engine thread). */
typedef struct {
  int vocab;
  float *work;    /* [vocab] transformed logits */
  int32_t *ids;   /* [vocab] candidates */
  double *prob;   /* [vocab] their weights */
  uint8_t *seen;  /* [vocab] penalty marks, all zero between calls */
} m3_sampler_scratch;

m3_status m3_sampler_scratch_init(m3_sampler_scratch *s, int vocab);
void m3_sampler_scratch_free(m3_sampler_scratch *s);

/* The tokens penalties look at. */
typedef struct {
  const int32_t *prompt;
  int n_prompt;
  const int32_t *generated;
  int n_generated;
} m3_sample_history;

/* A PRNG state for sample `index` of a request seeded with `seed`. */
uint64_t m3_sampler_seed(uint64_t seed, int index);

/* The tokens a draw chooses from, steps 4-6: s->work holds the logits after steps 1-2, `best`
 * is their argmax (finite), temperature > 0. Fills s->ids[0..n) and their weights
 * exp((l - max) / T) in s->prob[0..n), in draw order: most likely first (ties to the lower id)
 * when top_k or top_p filtered, else id order. Returns n; *total gets the sum of the weights. */
int m3_sampler_candidates(const m3_sampling_params *p, m3_sampler_scratch *s, int32_t best,
                          double *total);

/* logits [vocab] (not modified); advances *rng by one draw unless greedy. */
int32_t m3_sampler_sample(const m3_sampling_params *p, uint64_t *rng, const float *logits,
                          const m3_sample_history *h, m3_sampler_scratch *s);

/* The PRNG value a draw takes: uniform in [0, 1) with 53 random bits; advances *state by one. */
double m3_sampler_next_unit(uint64_t *state);

/* The token m3_sampler_sample returns when its draw takes the value `unit` (from
 * m3_sampler_next_unit): the draw picks the first candidate, in draw order, whose cumulative
 * weight exceeds unit * total. A device backend's sample_rows draws the same way, so the engine
 * takes each row's unit from the sequence's PRNG before the step and the tokens do not depend on
 * which side sampled them. A draw happens unless temperature <= 0 or every token is banned. */
int32_t m3_sampler_sample_unit(const m3_sampling_params *p, double unit, const float *logits,
                               const m3_sample_history *h, m3_sampler_scratch *s);

/* Speculative verification at one position (m3_text_spec.md §8.4) for a greedy drafter, whose
 * draft distribution q is one-hot on `draft` (-1: no draft here, a plain draw). Greedy
 * (temperature 0): the argmax. Otherwise, with p the distribution m3_sampler_sample draws from
 * (same transforms and filters), accepts the draft with probability min(1, p(draft) / q(draft))
 * = p(draft), else draws from max(0, p - q) renormalised, which is p without the draft. The
 * token emitted is then distributed exactly as p. Returns it: == draft iff accepted. Uses one
 * PRNG value, two on a rejection. */
int32_t m3_sampler_verify(const m3_sampling_params *p, uint64_t *rng, const float *logits,
                          const m3_sample_history *h, m3_sampler_scratch *s, int32_t draft);

/* The model's own log-probabilities (log-softmax of the raw logits): of `token`, and the n_top
 * largest (ties to the lower id) into top_ids/top_lp [n_top], most likely first. */
float m3_sampler_logprobs(const float *logits, int vocab, int32_t token, int n_top,
                          int32_t *top_ids, float *top_lp);

#endif
