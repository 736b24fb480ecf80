/* pyjson.h: a growable byte string, and JSON text written the way Python writes it.
 *
 * The chat templates serialise tool schemas with Python's json.dumps (ensure_ascii=False, the
 * default ", " / ": " separators) and print argument numbers with Python's str(); the tool-call
 * parser writes compact JSON. Both need the same escaping and the same shortest round-trip float
 * repr, so they live here once.
 *
 * Limitation: cJSON keeps numbers as doubles, so a float written with an integral value ("1.0")
 * comes back out as an integer ("1"); Python would keep "1.0". */
#ifndef M3_TOK_PYJSON_H
#define M3_TOK_PYJSON_H

#include <stdbool.h>
#include <stddef.h>

#include <cjson/cJSON.h>

/* Zero-initialise. An allocation failure sets `failed` and turns later appends into no-ops, so
 * a long chain of appends is checked once at the end. `data` is always NUL-terminated once
 * anything was appended. */
typedef struct {
  char *data;
  size_t len, cap;
  bool failed;
} m3_sbuf;

void m3_sbuf_put(m3_sbuf *b, const char *s, size_t n);
void m3_sbuf_puts(m3_sbuf *b, const char *s);
void m3_sbuf_putc(m3_sbuf *b, char c);
void m3_sbuf_free(m3_sbuf *b);
/* Drops the first n bytes. */
void m3_sbuf_consume(m3_sbuf *b, size_t n);

/* `s` as a JSON string literal, quotes included: only ", \, and control characters are
 * escaped (\n \r \t \b \f, others \u00XX); every other byte is copied as is. */
void m3_pyjson_string(m3_sbuf *b, const char *s, size_t n);
/* The characters of such a literal without the quotes (for streaming a string piecewise). */
void m3_pyjson_string_body(m3_sbuf *b, const char *s, size_t n);
/* Python's repr(float) for finite x: shortest digits that round-trip, "1e-07", "2.5", "1e+16". */
void m3_py_float(m3_sbuf *b, double x);
/* A cJSON number as Python would print it: integral values within 2^53 as integers. */
void m3_py_number(m3_sbuf *b, double x);
/* json.dumps(v, ensure_ascii=False); with `compact` the separators are "," and ":". */
void m3_pyjson_dump(m3_sbuf *b, const cJSON *v, bool compact);

#endif
