/* fetch.c: http(s) image URLs through libcurl (fetch.h). Built without libcurl (CMake found none,
 * as on machines that only serve text), every fetch fails with a 400 saying so. */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/fetch.h"

#ifdef M3_REMOTE_MEDIA

#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <time.h>

/* A slow server must not be able to hold the TCP connect for the whole transfer budget. */
#define CONNECT_TIMEOUT_MS 5000

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_ready = CURLE_FAILED_INIT;

/* curl_global_init is not safe to race with other threads' first curl_easy_init. */
static void init_curl(void) { curl_ready = curl_global_init(CURL_GLOBAL_DEFAULT); }

/* Download slots shared by every connection thread. */
static pthread_mutex_t slots_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t slots_cv = PTHREAD_COND_INITIALIZER;
static int slots_busy;

/* Waits up to timeout_ms for a free slot; false when none freed. */
static bool take_slot(int timeout_ms) {
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until); /* the clock pthread_cond_timedwait measures by default */
  until.tv_sec += timeout_ms / 1000;
  until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
  if (until.tv_nsec >= 1000000000L) {
    until.tv_sec++;
    until.tv_nsec -= 1000000000L;
  }
  pthread_mutex_lock(&slots_mu);
  int rc = 0;
  while (slots_busy >= SRV_FETCH_MAX_AT_ONCE && rc != ETIMEDOUT)
    rc = pthread_cond_timedwait(&slots_cv, &slots_mu, &until);
  const bool got = slots_busy < SRV_FETCH_MAX_AT_ONCE;
  if (got) slots_busy++;
  pthread_mutex_unlock(&slots_mu);
  return got;
}

static void give_slot(void) {
  pthread_mutex_lock(&slots_mu);
  slots_busy--;
  pthread_cond_signal(&slots_cv);
  pthread_mutex_unlock(&slots_mu);
}

typedef struct {
  CURL *curl;
  uint8_t *data;
  size_t len, cap, max;
  bool too_large;  /* the body passed max */
  bool bad_status; /* the final answer was not 2xx */
  bool no_memory;
} download;

/* libcurl's write callback: keeps the body of a 2xx answer up to d->max bytes. Returning less
 * than it was given aborts the transfer (CURLE_WRITE_ERROR), so nothing past the limit, and
 * nothing of an error page, is ever buffered. Bodies of followed redirects never get here. */
static size_t on_body(char *chunk, size_t size, size_t count, void *user) {
  download *d = user;
  const size_t n = size * count;
  long status = 0;
  curl_easy_getinfo(d->curl, CURLINFO_RESPONSE_CODE, &status);
  if (status < 200 || status > 299) {
    d->bad_status = true;
    return 0;
  }
  if (n > d->max - d->len) {
    d->too_large = true;
    return 0;
  }
  if (d->len + n > d->cap) {
    size_t cap = d->cap ? d->cap * 2 : 64 * 1024;
    if (cap < d->len + n) cap = d->len + n;
    if (cap > d->max) cap = d->max;
    uint8_t *grown = realloc(d->data, cap);
    if (!grown) {
      d->no_memory = true;
      return 0;
    }
    d->data = grown;
    d->cap = cap;
  }
  memcpy(d->data + d->len, chunk, n);
  d->len += n;
  return n;
}

/* One transfer with every limit set; fills *d and returns libcurl's result. */
static CURLcode transfer(const char *url, int timeout_ms, download *d, char *curl_error) {
  CURL *c = d->curl;
  curl_easy_setopt(c, CURLOPT_URL, url);
  curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(c, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 1L);
  curl_easy_setopt(c, CURLOPT_MAXREDIRS, (long)SRV_FETCH_MAX_REDIRECTS);
  curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long)timeout_ms);
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS,
                   (long)(timeout_ms < CONNECT_TIMEOUT_MS ? timeout_ms : CONNECT_TIMEOUT_MS));
  /* Signals (the default resolver's timeout) would hit an arbitrary thread of the server. */
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  /* A Content-Length over the limit fails before any byte arrives (0 means no limit here;
   * on_body still refuses every byte then). */
  curl_easy_setopt(c, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)d->max);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, d);
  curl_easy_setopt(c, CURLOPT_ERRORBUFFER, curl_error);
  curl_easy_setopt(c, CURLOPT_USERAGENT, "m3");
  return curl_easy_perform(c);
}

int srv_fetch(const char *url, size_t max_bytes, int timeout_ms, uint8_t **bytes, size_t *len,
              char *why, size_t why_size) {
  *bytes = NULL;
  *len = 0;
  pthread_once(&curl_once, init_curl);
  if (curl_ready != CURLE_OK) {
    snprintf(why, why_size, "libcurl failed to start: %s", curl_easy_strerror(curl_ready));
    return 400;
  }
  if (!take_slot(timeout_ms)) {
    snprintf(why, why_size, "the server is busy with %d other image downloads; retry later",
             SRV_FETCH_MAX_AT_ONCE);
    return 503;
  }
  download d = {.curl = curl_easy_init(), .max = max_bytes};
  char curl_error[CURL_ERROR_SIZE] = "";
  const CURLcode rc = d.curl ? transfer(url, timeout_ms, &d, curl_error) : CURLE_OUT_OF_MEMORY;
  long status = 0;
  if (d.curl) curl_easy_getinfo(d.curl, CURLINFO_RESPONSE_CODE, &status);
  if (d.too_large || rc == CURLE_FILESIZE_EXCEEDED)
    snprintf(why, why_size, "larger than the %zu bytes left for this request's images "
             "(--max-body)", max_bytes);
  else if (d.bad_status || (rc == CURLE_OK && (status < 200 || status > 299)))
    snprintf(why, why_size, "HTTP status %ld", status);
  else if (rc == CURLE_OPERATION_TIMEDOUT)
    snprintf(why, why_size, "timed out after %d ms", timeout_ms);
  else if (rc == CURLE_TOO_MANY_REDIRECTS)
    snprintf(why, why_size, "more than %d redirects", SRV_FETCH_MAX_REDIRECTS);
  else if (rc == CURLE_UNSUPPORTED_PROTOCOL)
    snprintf(why, why_size, "only http and https URLs are fetched, also as redirect targets");
  else if (d.no_memory || rc == CURLE_OUT_OF_MEMORY)
    snprintf(why, why_size, "out of memory");
  else if (rc != CURLE_OK)
    snprintf(why, why_size, "%s", curl_error[0] ? curl_error : curl_easy_strerror(rc));
  else if (d.len == 0)
    snprintf(why, why_size, "the answer has an empty body");
  const bool ok = rc == CURLE_OK && !d.bad_status && status >= 200 && status <= 299 && d.len > 0;
  curl_easy_cleanup(d.curl);
  give_slot();
  if (!ok) {
    free(d.data);
    return 400;
  }
  *bytes = d.data;
  *len = d.len;
  return 0;
}

#else

int srv_fetch(const char *url, size_t max_bytes, int timeout_ms, uint8_t **bytes, size_t *len,
              char *why, size_t why_size) {
  (void)url, (void)max_bytes, (void)timeout_ms;
  *bytes = NULL;
  *len = 0;
  snprintf(why, why_size, "this m3 was built without libcurl, so it cannot fetch URLs");
  return 400;
}

#endif
