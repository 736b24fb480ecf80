/* textscan.c: see textscan.h. */
#include "tok/textscan.h"

#include <string.h>

int m3_bytes_at(const char *s, size_t n, const char *lit, size_t l) {
  if (n >= l) return memcmp(s, lit, l) == 0 ? 1 : -1;
  return memcmp(s, lit, n) == 0 ? 0 : -1;
}

int m3_lit_at(const char *s, size_t n, const char *lit) {
  return m3_bytes_at(s, n, lit, strlen(lit));
}

const char *m3_find(const char *s, size_t n, const char *lit) {
  size_t l = strlen(lit);
  for (size_t i = 0; i + l <= n; i++)
    if (s[i] == lit[0] && memcmp(s + i, lit, l) == 0) return s + i;
  return NULL;
}

size_t m3_safe_len(const char *s, size_t n, const char *lit) {
  size_t l = strlen(lit);
  for (size_t k = l - 1 < n ? l - 1 : n; k > 0; k--)
    if (memcmp(s + n - k, lit, k) == 0) return n - k;
  return n;
}
