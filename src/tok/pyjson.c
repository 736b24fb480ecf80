/* pyjson.c: growable string and Python-compatible JSON text (see pyjson.h). */
#include "tok/pyjson.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void m3_sbuf_put(m3_sbuf *b, const char *s, size_t n) {
  if (b->failed) return;
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + n + 1) cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p) {
      b->failed = true;
      return;
    }
    b->data = p;
    b->cap = cap;
  }
  if (n) memcpy(b->data + b->len, s, n);
  b->len += n;
  b->data[b->len] = 0;
}

void m3_sbuf_puts(m3_sbuf *b, const char *s) { m3_sbuf_put(b, s, strlen(s)); }
void m3_sbuf_putc(m3_sbuf *b, char c) { m3_sbuf_put(b, &c, 1); }

void m3_sbuf_free(m3_sbuf *b) {
  free(b->data);
  *b = (m3_sbuf){0};
}

void m3_sbuf_consume(m3_sbuf *b, size_t n) {
  if (n >= b->len) {
    b->len = 0;
  } else {
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
  }
  if (b->data) b->data[b->len] = 0;
}

void m3_pyjson_string_body(m3_sbuf *b, const char *s, size_t n) {
  size_t run = 0; /* bytes copied verbatim are appended in runs */
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    const char *esc = NULL;
    char u[8];
    switch (c) {
      case '"': esc = "\\\""; break;
      case '\\': esc = "\\\\"; break;
      case '\n': esc = "\\n"; break;
      case '\r': esc = "\\r"; break;
      case '\t': esc = "\\t"; break;
      case '\b': esc = "\\b"; break;
      case '\f': esc = "\\f"; break;
      default:
        if (c < 0x20) {
          snprintf(u, sizeof u, "\\u%04x", c);
          esc = u;
        }
    }
    if (!esc) continue;
    m3_sbuf_put(b, s + run, i - run);
    m3_sbuf_puts(b, esc);
    run = i + 1;
  }
  m3_sbuf_put(b, s + run, n - run);
}

void m3_pyjson_string(m3_sbuf *b, const char *s, size_t n) {
  m3_sbuf_putc(b, '"');
  m3_pyjson_string_body(b, s, n);
  m3_sbuf_putc(b, '"');
}

void m3_py_float(m3_sbuf *b, double x) {
  /* Shortest %.*e that reads back as x gives Python's digits; Python then prints them in
   * positional form for exponents -4..15 and in scientific form otherwise. */
  char e[40];
  for (int prec = 0; prec < 17; prec++) {
    snprintf(e, sizeof e, "%.*e", prec, x);
    if (strtod(e, NULL) == x) break;
  }
  char digits[24];
  size_t nd = 0;
  const char *p = e;
  bool neg = *p == '-';
  if (neg) p++;
  for (; *p && *p != 'e'; p++)
    if (*p != '.') digits[nd++] = *p;
  int exp = atoi(p + 1);
  while (nd > 1 && digits[nd - 1] == '0') nd--;
  if (neg) m3_sbuf_putc(b, '-');
  if (exp >= -4 && exp < 16) {
    if (exp < 0) {
      m3_sbuf_puts(b, "0.");
      for (int i = -1; i > exp; i--) m3_sbuf_putc(b, '0');
      m3_sbuf_put(b, digits, nd);
    } else {
      for (int i = 0; i <= exp; i++) m3_sbuf_putc(b, (size_t)i < nd ? digits[i] : '0');
      m3_sbuf_putc(b, '.');
      if ((size_t)exp + 1 < nd) {
        m3_sbuf_put(b, digits + exp + 1, nd - (size_t)exp - 1);
      } else {
        m3_sbuf_putc(b, '0');
      }
    }
    return;
  }
  m3_sbuf_putc(b, digits[0]);
  if (nd > 1) {
    m3_sbuf_putc(b, '.');
    m3_sbuf_put(b, digits + 1, nd - 1);
  }
  char ex[16];
  snprintf(ex, sizeof ex, "e%c%02d", exp < 0 ? '-' : '+', abs(exp));
  m3_sbuf_puts(b, ex);
}

void m3_py_number(m3_sbuf *b, double x) {
  if (x == floor(x) && fabs(x) <= 9007199254740992.0) {
    char s[32];
    snprintf(s, sizeof s, "%.0f", x);
    m3_sbuf_puts(b, strcmp(s, "-0") == 0 ? "0" : s);
  } else if (isfinite(x)) {
    m3_py_float(b, x);
  } else {
    m3_sbuf_puts(b, isnan(x) ? "NaN" : x > 0 ? "Infinity" : "-Infinity");
  }
}

void m3_pyjson_dump(m3_sbuf *b, const cJSON *v, bool compact) {
  const char *comma = compact ? "," : ", ", *colon = compact ? ":" : ": ";
  if (cJSON_IsNull(v)) {
    m3_sbuf_puts(b, "null");
  } else if (cJSON_IsTrue(v)) {
    m3_sbuf_puts(b, "true");
  } else if (cJSON_IsFalse(v)) {
    m3_sbuf_puts(b, "false");
  } else if (cJSON_IsNumber(v)) {
    m3_py_number(b, v->valuedouble);
  } else if (cJSON_IsString(v)) {
    m3_pyjson_string(b, v->valuestring, strlen(v->valuestring));
  } else if (cJSON_IsArray(v) || cJSON_IsObject(v)) {
    bool obj = cJSON_IsObject(v);
    m3_sbuf_putc(b, obj ? '{' : '[');
    for (const cJSON *c = v->child; c; c = c->next) {
      if (c != v->child) m3_sbuf_puts(b, comma);
      if (obj) {
        m3_pyjson_string(b, c->string, strlen(c->string));
        m3_sbuf_puts(b, colon);
      }
      m3_pyjson_dump(b, c, compact);
    }
    m3_sbuf_putc(b, obj ? '}' : ']');
  } else if (cJSON_IsRaw(v)) {
    m3_sbuf_puts(b, v->valuestring);
  }
}
