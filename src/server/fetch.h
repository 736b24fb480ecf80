/* fetch.h: downloading an http(s) image URL for `m3 serve --allow-remote-media` (libcurl).
 *
 * Runs on the calling connection thread, never the engine's: a slow image server delays only the
 * request that named it. At most SRV_FETCH_MAX_AT_ONCE downloads run at once in the process, so
 * the memory they buffer stays below that many times max_bytes. */
#ifndef M3_SERVER_FETCH_H
#define M3_SERVER_FETCH_H

#include <stddef.h>
#include <stdint.h>

enum { SRV_FETCH_MAX_AT_ONCE = 4, SRV_FETCH_MAX_REDIRECTS = 3 };

/* GETs `url` (http or https, also after redirects, at most SRV_FETCH_MAX_REDIRECTS of them) into
 * *bytes (malloc'd, *len bytes). The whole transfer gets timeout_ms, and a body over max_bytes is
 * cut off as soon as it passes the limit. Returns 0, or the HTTP status the API should answer
 * with (400: the URL's fault, such as a non-2xx status, a timeout or a body too large; 503: no
 * download slot freed within timeout_ms) after writing the cause into why[why_size]. */
int srv_fetch(const char *url, size_t max_bytes, int timeout_ms, uint8_t **bytes, size_t *len,
              char *why, size_t why_size);

#endif
