/* detok.c: ids -> text. Each id's bytes were ByteLevel-decoded at load, so decoding concatenates
 * bytes and then repairs invalid UTF-8 the way Rust's String::from_utf8_lossy does (HF's decoder
 * ends with it): each maximal prefix of a valid sequence that is cut short, and each byte that
 * cannot start one, becomes U+FFFD. Streaming applies the same rule but holds back a trailing
 * sequence that later bytes may still complete. */
#include <stdlib.h>

#include "tok/tok_internal.h"

void m3_tok_ids_free(m3_tok_ids *ids) {
  free(ids->data);
  *ids = (m3_tok_ids){0};
}

void m3_tok_text_free(m3_tok_text *text) {
  free(text->data);
  *text = (m3_tok_text){0};
}

/* Length of the valid sequence at p[0..n) (0 if p[0] cannot start one), or, when the sequence is
 * valid so far but cut off by n or by a bad continuation, the negated length of that prefix. */
static long utf8_seq(const uint8_t *p, size_t n) {
  uint8_t b = p[0];
  if (b < 0x80) return 1;
  size_t need;
  uint8_t lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
  if (b >= 0xC2 && b <= 0xDF) need = 2;
  else if (b >= 0xE0 && b <= 0xEF) {
    need = 3;
    if (b == 0xE0) lo = 0xA0;
    if (b == 0xED) hi = 0x9F;
  } else if (b >= 0xF0 && b <= 0xF4) {
    need = 4;
    if (b == 0xF0) lo = 0x90;
    if (b == 0xF4) hi = 0x8F;
  } else
    return 0;
  for (size_t i = 1; i < need; i++) {
    if (i >= n) return -(long)i;
    uint8_t c = p[i];
    if (i == 1 ? (c < lo || c > hi) : (c < 0x80 || c > 0xBF)) return -(long)i;
  }
  return (long)need;
}

bool m3_utf8_valid(const uint8_t *p, size_t n) {
  for (size_t i = 0; i < n;) {
    if (p[i] < 0x80) {
      i++;
      continue;
    }
    long l = utf8_seq(p + i, n - i);
    if (l <= 0) return false;
    i += (size_t)l;
  }
  return true;
}

static bool text_append(m3_tok_text *out, const void *p, size_t n) {
  if (!tok_reserve((void **)&out->data, &out->cap, out->len + n + 1, 1)) return false;
  if (n) memcpy(out->data + out->len, p, n);
  out->len += n;
  out->data[out->len] = 0;
  return true;
}

size_t tok_utf8_lossy(m3_tok_text *out, const uint8_t *bytes, size_t n, bool final) {
  static const uint8_t replacement[3] = {0xEF, 0xBF, 0xBD};
  size_t i = 0, valid_from = 0;
  while (i < n) {
    long l = utf8_seq(bytes + i, n - i);
    if (l > 0) {
      i += (size_t)l;
      continue;
    }
    bool cut_by_end = l < 0 && i + (size_t)(-l) == n;
    if (cut_by_end && !final) break;
    if (!text_append(out, bytes + valid_from, i - valid_from) || !text_append(out, replacement, 3))
      return (size_t)-1;
    i += l == 0 ? 1 : (size_t)(-l);
    valid_from = i;
  }
  /* Nothing decoded yet leaves bytes NULL, and NULL + 0 is undefined: offset only a real run. */
  if (!text_append(out, i > valid_from ? bytes + valid_from : NULL, i - valid_from))
    return (size_t)-1;
  return i;
}

/* The bytes an id decodes to, or NULL when the id is dropped. */
static const uint8_t *id_bytes(const m3_tokenizer *tok, int32_t id, bool skip_special, size_t *n) {
  if (id < 0 || id >= tok->n_ids) return NULL;
  if (skip_special && m3_tok_is_special(tok, id)) return NULL;
  *n = tok->dec.off[id + 1] - tok->dec.off[id];
  if (*n == 0 && !tok->in_vocab[id] && tok->added_of_id[id] < 0) return NULL;
  return tok->dec.bytes + tok->dec.off[id];
}

m3_status m3_tok_decode(const m3_tokenizer *tok, const int32_t *ids, size_t n, bool skip_special,
                        m3_tok_text *out) {
  m3_tok_text raw = {0};
  for (size_t i = 0; i < n; i++) {
    size_t len;
    const uint8_t *p = id_bytes(tok, ids[i], skip_special, &len);
    if (p && !text_append(&raw, p, len)) {
      m3_tok_text_free(&raw);
      return m3_fail(M3_ERR_NOMEM, "decode");
    }
  }
  size_t done = tok_utf8_lossy(out, (const uint8_t *)raw.data, raw.len, true);
  m3_tok_text_free(&raw);
  return done == (size_t)-1 ? m3_fail(M3_ERR_NOMEM, "decode") : M3_OK;
}

void m3_detok_stream_init(m3_detok_stream *s, const m3_tokenizer *tok, bool skip_special) {
  *s = (m3_detok_stream){.tok = tok, .skip_special = skip_special};
}

void m3_detok_stream_free(m3_detok_stream *s) { m3_tok_text_free(&s->out); }

/* Decodes held bytes + p[0..n) into s->out, holding back an incomplete tail unless final. */
static m3_status stream_emit(m3_detok_stream *s, const uint8_t *p, size_t n, bool final,
                             const char **text, size_t *len) {
  s->out.len = 0;
  size_t done = 0; /* bytes of p already decoded */
  if (s->n_held > 0) {
    /* The held tail (at most 3 bytes) needs at most 3 more to settle: decode it joined with the
     * first new bytes, then the rest straight from p. */
    uint8_t joined[8];
    size_t nj = s->n_held, take = n < 4 ? n : 4;
    memcpy(joined, s->held, nj);
    memcpy(joined + nj, p, take);
    size_t used = tok_utf8_lossy(&s->out, joined, nj + take, final && take == n);
    if (used == (size_t)-1) return m3_fail(M3_ERR_NOMEM, "detokenize");
    if (used < nj) { /* still incomplete, so take == n: hold everything */
      memcpy(s->held, joined, nj + take);
      s->n_held = nj + take;
      done = n;
    } else {
      done = used - nj;
      s->n_held = 0;
    }
  }
  if (done < n || s->n_held == 0) {
    size_t used = tok_utf8_lossy(&s->out, p + done, n - done, final);
    if (used == (size_t)-1) return m3_fail(M3_ERR_NOMEM, "detokenize");
    s->n_held = n - done - used;
    memcpy(s->held, p + done + used, s->n_held);
  }
  if (!s->out.data && !text_append(&s->out, "", 0)) return m3_fail(M3_ERR_NOMEM, "detokenize");
  *text = s->out.data;
  *len = s->out.len;
  return M3_OK;
}

m3_status m3_detok_stream_push(m3_detok_stream *s, int32_t id, const char **text, size_t *len) {
  size_t n = 0;
  const uint8_t *p = id_bytes(s->tok, id, s->skip_special, &n);
  return stream_emit(s, p ? p : (const uint8_t *)"", p ? n : 0, false, text, len);
}

m3_status m3_detok_stream_finish(m3_detok_stream *s, const char **text, size_t *len) {
  return stream_emit(s, (const uint8_t *)"", 0, true, text, len);
}
