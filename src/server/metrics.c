/* metrics.c: Prometheus text exposition (GET /metrics): request and token counters, latency
 * histograms measured by the server, and the engine's gauges and counters. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "server/srv.h"

#define MAX_BUCKETS 20

typedef struct {
  const double *bounds; /* upper bounds, ascending; +Inf is implicit */
  int n_bounds;
  uint64_t counts[MAX_BUCKETS + 1]; /* per bucket, not cumulative */
  double sum;
  uint64_t count;
} histogram;

static const double ttft_bounds[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                                     0.75,  1.0,   2.5,  5.0,  7.5,  10,   20,   40,  80};
static const double token_bounds[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1,
                                      0.15,   0.2,   0.3,    0.4,   0.5,  0.75,  1.0,  2.5,   5.0};
static const double e2e_bounds[] = {0.01, 0.05, 0.1, 0.3, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600};

#define N_OF(a) ((int)(sizeof(a) / sizeof((a)[0])))

struct srv_metrics {
  pthread_mutex_t mu;
  uint64_t http[3];     /* responses 2xx, 4xx, 5xx */
  uint64_t finished[5]; /* by m3_finish_reason */
  uint64_t prompt_tokens, generated_tokens;
  histogram ttft, tpot, itl, e2e;
};

srv_metrics *srv_metrics_new(void) {
  srv_metrics *m = calloc(1, sizeof *m);
  if (!m) return NULL;
  pthread_mutex_init(&m->mu, NULL);
  m->ttft = (histogram){.bounds = ttft_bounds, .n_bounds = N_OF(ttft_bounds)};
  m->tpot = (histogram){.bounds = token_bounds, .n_bounds = N_OF(token_bounds)};
  m->itl = (histogram){.bounds = token_bounds, .n_bounds = N_OF(token_bounds)};
  m->e2e = (histogram){.bounds = e2e_bounds, .n_bounds = N_OF(e2e_bounds)};
  return m;
}

void srv_metrics_free(srv_metrics *m) {
  if (!m) return;
  pthread_mutex_destroy(&m->mu);
  free(m);
}

static void observe(histogram *h, double v) {
  int b = 0;
  while (b < h->n_bounds && v > h->bounds[b]) b++;
  h->counts[b]++;
  h->sum += v;
  h->count++;
}

void srv_metrics_http(srv_metrics *m, int status) {
  pthread_mutex_lock(&m->mu);
  m->http[status >= 500 ? 2 : status >= 400 ? 1 : 0]++;
  pthread_mutex_unlock(&m->mu);
}

void srv_metrics_itl(srv_metrics *m, double seconds) {
  pthread_mutex_lock(&m->mu);
  observe(&m->itl, seconds);
  pthread_mutex_unlock(&m->mu);
}

void srv_metrics_request(srv_metrics *m, m3_finish_reason reason, int prompt_tokens,
                         int generated_tokens, double ttft, double e2e) {
  pthread_mutex_lock(&m->mu);
  if (reason >= 0 && reason < 5) m->finished[reason]++;
  m->prompt_tokens += (uint64_t)prompt_tokens;
  m->generated_tokens += (uint64_t)generated_tokens;
  if (ttft >= 0) {
    observe(&m->ttft, ttft);
    if (generated_tokens > 1) observe(&m->tpot, (e2e - ttft) / (generated_tokens - 1));
  }
  observe(&m->e2e, e2e);
  pthread_mutex_unlock(&m->mu);
}

static void line(m3_sbuf *out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void line(m3_sbuf *out, const char *fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (n > 0) m3_sbuf_put(out, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
}

static void metric(m3_sbuf *out, const char *name, const char *type, const char *help, double v) {
  line(out, "# HELP %s %s\n# TYPE %s %s\n%s %.17g\n", name, help, name, type, name, v);
}

static void render_histogram(m3_sbuf *out, const char *name, const char *help, const histogram *h) {
  line(out, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
  uint64_t cum = 0;
  for (int b = 0; b < h->n_bounds; b++) {
    cum += h->counts[b];
    line(out, "%s_bucket{le=\"%g\"} %llu\n", name, h->bounds[b], (unsigned long long)cum);
  }
  line(out, "%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)h->count);
  line(out, "%s_sum %.17g\n%s_count %llu\n", name, h->sum, name, (unsigned long long)h->count);
}

void srv_metrics_render(srv_metrics *m, m3_engine *e, int in_flight, m3_sbuf *out) {
  m3_engine_stats st;
  m3_engine_stats_get(e, &st);
  pthread_mutex_lock(&m->mu);
  static const char *const classes[] = {"2xx", "4xx", "5xx"};
  line(out, "# HELP m3_http_responses_total HTTP responses by status class.\n"
            "# TYPE m3_http_responses_total counter\n");
  for (int i = 0; i < 3; i++)
    line(out, "m3_http_responses_total{class=\"%s\"} %llu\n", classes[i],
         (unsigned long long)m->http[i]);
  static const char *const reasons[] = {"none", "stop", "length", "cancelled", "error"};
  line(out, "# HELP m3_requests_finished_total Generation requests by how sample 0 ended.\n"
            "# TYPE m3_requests_finished_total counter\n");
  for (int i = 1; i < 5; i++)
    line(out, "m3_requests_finished_total{reason=\"%s\"} %llu\n", reasons[i],
         (unsigned long long)m->finished[i]);
  metric(out, "m3_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
         (double)m->prompt_tokens);
  metric(out, "m3_generation_tokens_total", "counter", "Generated tokens of finished requests.",
         (double)m->generated_tokens);
  render_histogram(out, "m3_time_to_first_token_seconds", "Arrival to first token.", &m->ttft);
  render_histogram(out, "m3_time_per_output_token_seconds", "Mean gap per request after the first token.", &m->tpot);
  render_histogram(out, "m3_inter_token_latency_seconds", "Gap between consecutive tokens.", &m->itl);
  render_histogram(out, "m3_e2e_request_latency_seconds", "Arrival to last token.", &m->e2e);
  pthread_mutex_unlock(&m->mu);
  metric(out, "m3_http_requests_in_flight", "gauge", "Generation requests being served.", in_flight);
  metric(out, "m3_num_requests_running", "gauge", "Sequences in the running batch.", st.running);
  metric(out, "m3_num_requests_waiting", "gauge", "Requests queued for the batch.", st.waiting);
  metric(out, "m3_kv_pages_used", "gauge", "KV-cache pages held.", st.kv_pages_used);
  metric(out, "m3_kv_pages_free", "gauge", "KV-cache pages free.", st.kv_pages_free);
  metric(out, "m3_engine_requests_total", "counter", "Requests the engine accepted.", (double)st.requests_total);
  metric(out, "m3_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
         (double)st.prefix_cache_hit_tokens);
  metric(out, "m3_prefix_cache_query_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.",
         (double)st.prefix_cache_query_tokens);
  metric(out, "m3_preemptions_total", "counter", "Sequences preempted for KV space.", (double)st.preemptions);
  metric(out, "m3_engine_steps_total", "counter", "Scheduler steps.", (double)st.steps);
  metric(out, "m3_engine_step_seconds_total", "counter", "Time in forward passes.", st.step_seconds_total);
  metric(out, "m3_engine_graph_steps_replayed_total", "counter",
         "Forward steps replayed from recorded CUDA graphs.", (double)st.graph_steps_replayed);
  metric(out, "m3_spec_decode_draft_tokens_total", "counter", "Speculative draft tokens.",
         (double)st.spec_draft_tokens);
  metric(out, "m3_spec_decode_accepted_tokens_total", "counter", "Speculative tokens accepted.",
         (double)st.spec_accepted_tokens);
  metric(out, "m3_spec_decode_num_drafts_total", "counter",
         "Speculative verifications (rounds); mean acceptance length = 1 + accepted / rounds.",
         (double)st.spec_rounds);
}
