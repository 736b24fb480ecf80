/* textscan.h: literal matching over a buffer that may end in the middle of a tag, shared by
 * the streaming output parsers. */
#ifndef M3_TOK_TEXTSCAN_H
#define M3_TOK_TEXTSCAN_H

#include <stddef.h>

/* 1: s starts with lit; 0: s (all n bytes) is a proper prefix of lit, more input may decide;
 * -1: neither. */
int m3_lit_at(const char *s, size_t n, const char *lit);
/* m3_lit_at for a literal of l bytes that may hold NUL (built from generated text). */
int m3_bytes_at(const char *s, size_t n, const char *lit, size_t l);
/* First occurrence of lit in s[0..n), or NULL. */
const char *m3_find(const char *s, size_t n, const char *lit);
/* How many leading bytes of s can be reported now: all but the longest tail of s that is a
 * proper prefix of lit (that tail may still become lit). */
size_t m3_safe_len(const char *s, size_t n, const char *lit);

#endif
