#include "base/status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

enum { M3_ERROR_CAP = 1024 };
static _Thread_local char error_message[M3_ERROR_CAP];

m3_status m3_fail(m3_status status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(error_message, sizeof error_message, fmt, ap);
  va_end(ap);
  return status;
}

m3_status m3_fail_context(m3_status status, const char *fmt, ...) {
  /* prefix + ": " + previous message, cut to the buffer size. */
  char combined[2 * M3_ERROR_CAP + 2];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(combined, M3_ERROR_CAP, fmt, ap);
  va_end(ap);
  size_t used = n < 0 ? 0 : (size_t)n < M3_ERROR_CAP ? (size_t)n : M3_ERROR_CAP - 1;
  memcpy(combined + used, ": ", 2);
  size_t prev = strlen(error_message);
  memcpy(combined + used + 2, error_message, prev + 1);
  size_t total = used + 2 + prev;
  if (total >= M3_ERROR_CAP) total = M3_ERROR_CAP - 1;
  memcpy(error_message, combined, total);
  error_message[total] = '\0';
  return status;
}

const char *m3_last_error(void) { return error_message; }

void m3_clear_error(void) { error_message[0] = '\0'; }

const char *m3_status_name(m3_status status) {
  switch (status) {
    case M3_OK: return "ok";
    case M3_ERR_IO: return "io error";
    case M3_ERR_FORMAT: return "format error";
    case M3_ERR_CONFIG: return "config error";
    case M3_ERR_SHAPE: return "shape error";
    case M3_ERR_MISSING: return "missing";
    case M3_ERR_UNEXPECTED: return "unexpected";
    case M3_ERR_NOMEM: return "out of memory";
    case M3_ERR_ARG: return "bad argument";
    case M3_ERR_UNSUPPORTED: return "unsupported";
    case M3_ERR_LIMIT: return "over limit";
  }
  return "unknown status";
}
