/* status.h: how every m3 function reports failure.
 *
 * Library code never prints and never exits: it returns an m3_status and leaves one line in a
 * thread-local buffer that names the file, tensor or key at fault. The CLI prints that line and
 * exits 2 for bad input. */
#ifndef M3_BASE_STATUS_H
#define M3_BASE_STATUS_H

typedef enum {
  M3_OK = 0,
  M3_ERR_IO,          /* open/read/mmap/write failed, missing file or shard */
  M3_ERR_FORMAT,      /* malformed file: bad header, bad JSON, offsets out of range, unknown dtype */
  M3_ERR_CONFIG,      /* config.json is valid JSON but inconsistent or unsupported */
  M3_ERR_SHAPE,       /* a tensor's shape or dtype does not match what the config implies */
  M3_ERR_MISSING,     /* a required tensor or key is absent */
  M3_ERR_UNEXPECTED,  /* a tensor the model does not know */
  M3_ERR_NOMEM,       /* allocation failed */
  M3_ERR_ARG,         /* bad argument from the caller (CLI flag, API parameter) */
  M3_ERR_UNSUPPORTED, /* valid input that this build cannot handle (e.g. no CUDA) */
  M3_ERR_LIMIT,       /* a request over a configured limit (context, memory budget) */
} m3_status;

/* Record the error message (printf-style) and return `status`, so callers can write
 * `return m3_fail(M3_ERR_FORMAT, "%s: header length %llu past end of file", path, n);` */
m3_status m3_fail(m3_status status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prefix the current message with "context: " and return `status` unchanged; used when an error
 * travels up through a caller that knows more (e.g. which shard). */
m3_status m3_fail_context(m3_status status, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* The last message recorded on this thread ("" if none). */
const char *m3_last_error(void);
void m3_clear_error(void);

/* "ok", "io error", "format error", ... */
const char *m3_status_name(m3_status status);

#endif
