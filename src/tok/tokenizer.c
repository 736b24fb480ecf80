/* tokenizer.c: tokenizer.json -> struct m3_tokenizer, and the encode driver.
 *
 * Supported: model BPE (merges as "a b" strings or ["a","b"] pairs, ignore_merges, unk_token),
 * normalizer null or an empty Sequence, pre_tokenizer Split/ByteLevel/Sequence with ByteLevel
 * last, decoder ByteLevel. Anything else fails naming its key. The post_processor is ignored on
 * purpose: m3 never inserts special tokens on its own. */
#include <stdio.h>
#include <stdlib.h>

#include <cjson/cJSON.h>

#include "tok/tok_internal.h"

/* ---- GPT-2 byte <-> unicode mapping: printable bytes stand for themselves, the other 68 bytes
 * are moved to U+0100.. in byte order. ---- */

#define BYTE_CP_LIMIT 324 /* 256 + 68 */

typedef struct {
  int16_t byte_of_cp[BYTE_CP_LIMIT]; /* -1: not a byte-level code point */
} byte_map;

static void byte_map_init(byte_map *m) {
  for (int c = 0; c < BYTE_CP_LIMIT; c++) m->byte_of_cp[c] = -1;
  int next = 256;
  for (int b = 0; b < 256; b++) {
    bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
    m->byte_of_cp[printable ? b : next++] = (int16_t)b;
  }
}

/* Decodes a byte-level string to the bytes it stands for; returns false (dst untouched beyond
 * *n) when some character is not byte-level. dst needs strlen(s) bytes. */
static bool byte_level_decode(const byte_map *m, const char *s, size_t len, uint8_t *dst, size_t *n) {
  const uint8_t *p = (const uint8_t *)s;
  size_t k = 0;
  for (size_t i = 0; i < len;) {
    uint32_t c;
    if (p[i] < 0x80) c = p[i++];
    else if ((p[i] & 0xE0) == 0xC0 && i + 1 < len) {
      c = (uint32_t)(p[i] & 0x1F) << 6 | (p[i + 1] & 0x3F);
      i += 2;
    } else
      return false;
    if (c >= BYTE_CP_LIMIT || m->byte_of_cp[c] < 0) return false;
    dst[k++] = (uint8_t)m->byte_of_cp[c];
  }
  *n = k;
  return true;
}

/* ---- JSON helpers: every failure names the key ---- */

static m3_status want_bool(const cJSON *obj, const char *key, const char *path, bool dflt, bool *out) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
  if (!v || cJSON_IsNull(v)) return *out = dflt, M3_OK;
  if (!cJSON_IsBool(v)) return m3_fail(M3_ERR_FORMAT, "%s.%s: expected true or false", path, key);
  *out = cJSON_IsTrue(v);
  return M3_OK;
}

/* A string key's value, NULL when absent or null. */
static const char *opt_string(const cJSON *obj, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
  return cJSON_IsString(v) ? v->valuestring : NULL;
}

static const char *type_of(const cJSON *obj) {
  const char *t = opt_string(obj, "type");
  return t ? t : "(none)";
}

/* ---- model ---- */

static m3_status check_model_options(const cJSON *model, const char *name) {
  const char *type = opt_string(model, "type");
  if (!type || strcmp(type, "BPE") != 0)
    return m3_fail(M3_ERR_UNSUPPORTED, "%s: model.type '%s' is not supported (only BPE)", name,
                   type ? type : "(none)");
  const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(model, "dropout");
  if (dropout && !cJSON_IsNull(dropout) && !(cJSON_IsNumber(dropout) && dropout->valuedouble == 0))
    return m3_fail(M3_ERR_UNSUPPORTED, "%s: model.dropout is not supported", name);
  bool flag = false;
  m3_status s = want_bool(model, "byte_fallback", "model", false, &flag);
  if (s != M3_OK) return m3_fail_context(s, "%s", name);
  if (flag) return m3_fail(M3_ERR_UNSUPPORTED, "%s: model.byte_fallback true is not supported", name);
  const char *affix[] = {"continuing_subword_prefix", "end_of_word_suffix"};
  for (int i = 0; i < 2; i++) {
    const char *v = opt_string(model, affix[i]);
    if (v && *v) return m3_fail(M3_ERR_UNSUPPORTED, "%s: model.%s '%s' is not supported", name, affix[i], v);
  }
  if ((s = want_bool(model, "fuse_unk", "model", false, &flag)) != M3_OK) return m3_fail_context(s, "%s", name);
  if (flag && opt_string(model, "unk_token"))
    return m3_fail(M3_ERR_UNSUPPORTED, "%s: model.fuse_unk with an unk_token is not supported", name);
  return M3_OK;
}

/* Fills tok->vocab (bytes per id) and tok->in_vocab; `usable` marks byte-level entries. */
static m3_status load_vocab(m3_tokenizer *tok, const byte_map *bm, const cJSON *vocab, int32_t n_ids,
                            bool *usable, const char *name) {
  tok_strings *v = &tok->vocab;
  v->n = n_ids;
  v->off = calloc((size_t)n_ids + 1, sizeof *v->off);
  tok->in_vocab = calloc((size_t)n_ids, sizeof *tok->in_vocab);
  size_t total = 0;
  if (!v->off || !tok->in_vocab) return m3_fail(M3_ERR_NOMEM, "%s: model.vocab", name);
  const cJSON *e;
  cJSON_ArrayForEach(e, vocab) total += strlen(e->string);
  if (!(v->bytes = malloc(total + 1))) return m3_fail(M3_ERR_NOMEM, "%s: model.vocab", name);
  /* Lengths first (bytes of id i go to off[i+1]), then a prefix sum, then the bytes. */
  uint8_t *tmp = malloc(total + 1);
  if (!tmp) return m3_fail(M3_ERR_NOMEM, "%s: model.vocab", name);
  cJSON_ArrayForEach(e, vocab) {
    int32_t id = (int32_t)e->valuedouble;
    size_t len = strlen(e->string), n;
    if (tok->in_vocab[id]) continue;
    tok->in_vocab[id] = true;
    usable[id] = byte_level_decode(bm, e->string, len, tmp, &n);
    v->off[id + 1] = (uint32_t)(usable[id] ? n : len);
  }
  for (int32_t i = 0; i < n_ids; i++) v->off[i + 1] += v->off[i];
  memset(tok->in_vocab, 0, (size_t)n_ids);
  cJSON_ArrayForEach(e, vocab) {
    int32_t id = (int32_t)e->valuedouble;
    size_t len = strlen(e->string), n;
    if (tok->in_vocab[id]) continue;
    tok->in_vocab[id] = true;
    if (usable[id]) byte_level_decode(bm, e->string, len, v->bytes + v->off[id], &n);
    else memcpy(v->bytes + v->off[id], e->string, len);
  }
  free(tmp);
  return M3_OK;
}

/* Resolves one merge side to an id; -2 when it is not byte-level text (such a merge can never
 * apply to byte-level input, so it is skipped), -1 when it is not in the vocabulary. */
static int32_t merge_side(const m3_tokenizer *tok, const byte_map *bm, const char *s, size_t len,
                          uint8_t *buf, size_t *n) {
  if (!byte_level_decode(bm, s, len, buf, n)) return -2;
  return tok_vocab_map_get(&tok->vocab_map, &tok->vocab, buf, *n);
}

static m3_status load_merges(m3_tokenizer *tok, const byte_map *bm, const cJSON *merges, const char *name) {
  if (!cJSON_IsArray(merges)) return m3_fail(M3_ERR_FORMAT, "%s: model.merges: expected an array", name);
  int n_merges = cJSON_GetArraySize(merges);
  if (!tok_merge_map_init(&tok->merges, (size_t)n_merges)) return m3_fail(M3_ERR_NOMEM, "%s: model.merges", name);
  uint8_t *buf = NULL;
  size_t buf_cap = 0;
  uint32_t rank = 0;
  const cJSON *m;
  m3_status status = M3_OK;
  cJSON_ArrayForEach(m, merges) {
    const char *a, *b;
    size_t la, lb;
    if (cJSON_IsString(m)) {
      a = m->valuestring;
      const char *sp = strchr(a, ' ');
      if (!sp || strchr(sp + 1, ' ')) {
        status = m3_fail(M3_ERR_FORMAT, "%s: model.merges[%u] '%s': expected two tokens separated by one space", name, rank, a);
        break;
      }
      la = (size_t)(sp - a);
      b = sp + 1;
      lb = strlen(b);
    } else if (cJSON_IsArray(m) && cJSON_GetArraySize(m) == 2 && cJSON_IsString(m->child) &&
               cJSON_IsString(m->child->next)) {
      a = m->child->valuestring;
      b = m->child->next->valuestring;
      la = strlen(a);
      lb = strlen(b);
    } else {
      status = m3_fail(M3_ERR_FORMAT, "%s: model.merges[%u]: expected \"a b\" or [\"a\", \"b\"]", name, rank);
      break;
    }
    if (!tok_reserve((void **)&buf, &buf_cap, la + lb + 1, 1)) {
      status = m3_fail(M3_ERR_NOMEM, "%s: model.merges", name);
      break;
    }
    size_t na = 0, nb = 0;
    int32_t left = merge_side(tok, bm, a, la, buf, &na);
    int32_t right = left == -2 ? -2 : merge_side(tok, bm, b, lb, buf + na, &nb);
    int32_t merged = left >= 0 && right >= 0 ? tok_vocab_map_get(&tok->vocab_map, &tok->vocab, buf, na + nb) : -1;
    if (left != -2 && right != -2 && (left < 0 || right < 0 || merged < 0)) {
      status = m3_fail(M3_ERR_FORMAT, "%s: model.merges[%u] '%.*s' '%.*s': %s not in model.vocab", name,
                       rank, (int)la, a, (int)lb, b, left < 0 || right < 0 ? "a side is" : "the merged token is");
      break;
    }
    if (left >= 0 && right >= 0) tok_merge_map_put(&tok->merges, left, right, rank, merged);
    rank++;
  }
  free(buf);
  return status;
}

/* ---- added tokens ---- */

static m3_status load_added(m3_tokenizer *tok, const cJSON *list, const char *name) {
  if (!list || cJSON_IsNull(list)) return M3_OK;
  if (!cJSON_IsArray(list)) return m3_fail(M3_ERR_FORMAT, "%s: added_tokens: expected an array", name);
  int n = cJSON_GetArraySize(list);
  size_t total = 0;
  const cJSON *e;
  int i = 0;
  cJSON_ArrayForEach(e, list) {
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
    const char *content = opt_string(e, "content");
    if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble >= INT32_MAX || !content)
      return m3_fail(M3_ERR_FORMAT, "%s: added_tokens[%d]: needs a non-negative id and a content string", name, i);
    total += strlen(content);
    i++;
  }
  tok->added = calloc((size_t)n + 1, sizeof *tok->added);
  tok->added_text = malloc(total + 1);
  if (!tok->added || !tok->added_text) return m3_fail(M3_ERR_NOMEM, "%s: added_tokens", name);
  size_t off = 0;
  i = 0;
  cJSON_ArrayForEach(e, list) {
    tok_added *a = &tok->added[i];
    const char *content = opt_string(e, "content");
    a->id = (int32_t)cJSON_GetObjectItemCaseSensitive(e, "id")->valuedouble;
    a->off = (uint32_t)off;
    a->len = (uint32_t)strlen(content);
    memcpy(tok->added_text + off, content, a->len);
    off += a->len;
    char path[48];
    snprintf(path, sizeof path, "added_tokens[%d]", i);
    m3_status s;
    if ((s = want_bool(e, "special", path, false, &a->special)) != M3_OK ||
        (s = want_bool(e, "lstrip", path, false, &a->lstrip)) != M3_OK ||
        (s = want_bool(e, "rstrip", path, false, &a->rstrip)) != M3_OK ||
        (s = want_bool(e, "single_word", path, false, &a->single_word)) != M3_OK ||
        (s = want_bool(e, "normalized", path, !a->special, &a->normalized)) != M3_OK)
      return m3_fail_context(s, "%s", name);
    i++;
  }
  tok->n_added = n;
  return M3_OK;
}

/* Builds the two tries: special tokens first, then the others (HF's pattern order). */
static m3_status build_tries(m3_tokenizer *tok, const char *name) {
  tok_trie_init(&tok->trie_raw);
  tok_trie_init(&tok->trie_norm);
  bool any_single_word = false;
  for (int pass = 0; pass < 2; pass++)
    for (int32_t i = 0; i < tok->n_added; i++) {
      const tok_added *a = &tok->added[i];
      if (a->special != (pass == 0) || a->len == 0) continue;
      any_single_word |= a->single_word;
      m3_status s = tok_trie_add(a->normalized ? &tok->trie_norm : &tok->trie_raw,
                                 tok->added_text + a->off, a->len, i);
      if (s != M3_OK) return m3_fail_context(s, "%s", name);
    }
  if (any_single_word) {
    /* Rust regex's Unicode \w, which HF uses to test single_word boundaries. */
    static const char word[] = "[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\x{200C}\\x{200D}]";
    tok_step st = {0};
    m3_status s = tok_step_compile(&st, word, sizeof word - 1, false, "single_word");
    if (s != M3_OK) return m3_fail_context(s, "%s", name);
    tok->word_char = st.re;
  }
  return M3_OK;
}

/* ---- normalizer, pre-tokenizer, decoder ---- */

static m3_status check_normalizer(const cJSON *n, const char *path, const char *name) {
  if (!n || cJSON_IsNull(n)) return M3_OK;
  if (strcmp(type_of(n), "Sequence") == 0) {
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "normalizers"), *e;
    int i = 0;
    cJSON_ArrayForEach(e, list) {
      char sub[96];
      snprintf(sub, sizeof sub, "%s.normalizers[%d]", path, i++);
      m3_status s = check_normalizer(e, sub, name);
      if (s != M3_OK) return s;
    }
    return M3_OK;
  }
  return m3_fail(M3_ERR_UNSUPPORTED, "%s: %s.type '%s' is not supported (only null or an empty Sequence)",
                 name, path, type_of(n));
}

static m3_status add_step(m3_tokenizer *tok, const cJSON *p, const char *path, const char *name) {
  const char *type = type_of(p);
  if (strcmp(type, "Sequence") == 0) {
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers"), *e;
    if (!cJSON_IsArray(list)) return m3_fail(M3_ERR_FORMAT, "%s: %s.pretokenizers: expected an array", name, path);
    int i = 0;
    cJSON_ArrayForEach(e, list) {
      char sub[96];
      snprintf(sub, sizeof sub, "%s.pretokenizers[%d]", path, i++);
      m3_status s = add_step(tok, e, sub, name);
      if (s != M3_OK) return s;
    }
    return M3_OK;
  }
  if (tok->n_steps == TOK_MAX_STEPS)
    return m3_fail(M3_ERR_UNSUPPORTED, "%s: %s: more than %d pre-tokenizer steps", name, path, TOK_MAX_STEPS);
  if (tok->n_steps > 0 && tok->steps[tok->n_steps - 1].byte_level)
    return m3_fail(M3_ERR_UNSUPPORTED, "%s: %s: a step after ByteLevel is not supported", name, path);
  tok_step *st = &tok->steps[tok->n_steps++];
  m3_status s;
  if (strcmp(type, "ByteLevel") == 0) {
    bool use_regex = true;
    st->byte_level = true;
    if ((s = want_bool(p, "add_prefix_space", path, true, &st->add_prefix_space)) != M3_OK ||
        (s = want_bool(p, "use_regex", path, true, &use_regex)) != M3_OK)
      return m3_fail_context(s, "%s", name);
    return use_regex ? tok_step_compile(st, tok_gpt2_pattern, strlen(tok_gpt2_pattern), false, path) : M3_OK;
  }
  if (strcmp(type, "Split") != 0)
    return m3_fail(M3_ERR_UNSUPPORTED, "%s: %s.type '%s' is not supported (Split, ByteLevel, Sequence)", name, path, type);
  static const char *behaviors[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
  const char *behavior = opt_string(p, "behavior");
  int b = 0;
  while (b < 5 && !(behavior && strcmp(behavior, behaviors[b]) == 0)) b++;
  if (b == 5)
    return m3_fail(M3_ERR_UNSUPPORTED, "%s: %s.behavior '%s' is not supported", name, path, behavior ? behavior : "(none)");
  st->behavior = (tok_split_behavior)b;
  if ((s = want_bool(p, "invert", path, false, &st->invert)) != M3_OK) return m3_fail_context(s, "%s", name);
  const cJSON *pattern = cJSON_GetObjectItemCaseSensitive(p, "pattern");
  const char *regex = opt_string(pattern, "Regex"), *literal = opt_string(pattern, "String");
  if (!regex && !literal)
    return m3_fail(M3_ERR_FORMAT, "%s: %s.pattern: expected {\"Regex\": ...} or {\"String\": ...}", name, path);
  if (literal && !*literal) return m3_fail(M3_ERR_UNSUPPORTED, "%s: %s.pattern: empty String", name, path);
  char key[112];
  snprintf(key, sizeof key, "%s.pattern", path);
  const char *text = regex ? regex : literal;
  /* cJSON strings are NUL-terminated; a pattern with an embedded NUL is cut there. */
  if ((s = tok_step_compile(st, text, strlen(text), !regex, key)) != M3_OK) return m3_fail_context(s, "%s", name);
  return M3_OK;
}

static m3_status load_pre_tokenizer(m3_tokenizer *tok, const cJSON *p, const char *name) {
  if (p && !cJSON_IsNull(p)) {
    m3_status s = add_step(tok, p, "pre_tokenizer", name);
    if (s != M3_OK) return s;
  }
  if (tok->n_steps == 0 || !tok->steps[tok->n_steps - 1].byte_level)
    return m3_fail(M3_ERR_UNSUPPORTED, "%s: pre_tokenizer: no ByteLevel step; only byte-level BPE is supported", name);
  return M3_OK;
}

/* ---- assembly ---- */

static int32_t count_ids(const cJSON *vocab, const cJSON *added, const char *name, m3_status *status) {
  double max_id = -1;
  const cJSON *e;
  cJSON_ArrayForEach(e, vocab) {
    if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= (1 << 30) || e->valuedouble != (int32_t)e->valuedouble) {
      *status = m3_fail(M3_ERR_FORMAT, "%s: model.vocab['%s']: expected an id in [0, 2^30)", name, e->string);
      return -1;
    }
    if (e->valuedouble > max_id) max_id = e->valuedouble;
  }
  cJSON_ArrayForEach(e, added) {
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
    if (cJSON_IsNumber(id) && id->valuedouble < (1 << 30) && id->valuedouble > max_id) max_id = id->valuedouble;
  }
  *status = M3_OK;
  return (int32_t)max_id + 1;
}

/* The bytes each id decodes to: an added token's content (ByteLevel-decoded when all of it is
 * byte-level text, else as is: HF's decoder does the same per token), or the vocabulary entry. */
static m3_status build_decode_table(m3_tokenizer *tok, const byte_map *bm, const char *name) {
  int32_t n = tok->n_ids;
  tok->dec.n = n;
  tok->dec.off = calloc((size_t)n + 1, sizeof *tok->dec.off);
  tok->added_of_id = malloc((size_t)n * sizeof *tok->added_of_id);
  size_t total = tok->vocab.off[tok->vocab.n];
  for (int32_t i = 0; i < tok->n_added; i++) total += tok->added[i].len;
  tok->dec.bytes = malloc(total + 1);
  if (!tok->dec.off || !tok->added_of_id || !tok->dec.bytes) return m3_fail(M3_ERR_NOMEM, "%s: decode table", name);
  for (int32_t id = 0; id < n; id++) tok->added_of_id[id] = -1;
  for (int32_t i = 0; i < tok->n_added; i++) tok->added_of_id[tok->added[i].id] = i;
  uint32_t off = 0;
  for (int32_t id = 0; id < n; id++) {
    tok->dec.off[id] = off;
    uint8_t *dst = tok->dec.bytes + off;
    size_t len = 0;
    int32_t a = tok->added_of_id[id];
    if (a >= 0) {
      const char *s = (const char *)tok->added_text + tok->added[a].off;
      if (!byte_level_decode(bm, s, tok->added[a].len, dst, &len)) memcpy(dst, s, len = tok->added[a].len);
    } else if (id < tok->vocab.n && tok->in_vocab[id]) {
      len = tok->vocab.off[id + 1] - tok->vocab.off[id];
      memcpy(dst, tok->vocab.bytes + tok->vocab.off[id], len);
    }
    off += (uint32_t)len;
  }
  tok->dec.off[n] = off;
  return M3_OK;
}

static m3_status build(m3_tokenizer *tok, const cJSON *root, const char *name) {
  byte_map bm;
  byte_map_init(&bm);
  const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
  if (!cJSON_IsObject(model)) return m3_fail(M3_ERR_MISSING, "%s: model: missing", name);
  m3_status s = check_model_options(model, name);
  if (s != M3_OK) return s;
  if ((s = check_normalizer(cJSON_GetObjectItemCaseSensitive(root, "normalizer"), "normalizer", name)) != M3_OK)
    return s;
  const cJSON *decoder = cJSON_GetObjectItemCaseSensitive(root, "decoder");
  if (strcmp(type_of(decoder), "ByteLevel") != 0)
    return m3_fail(M3_ERR_UNSUPPORTED, "%s: decoder.type '%s' is not supported (only ByteLevel)", name, type_of(decoder));

  const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
  const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
  if (!cJSON_IsObject(vocab)) return m3_fail(M3_ERR_MISSING, "%s: model.vocab: expected an object", name);
  tok->n_ids = count_ids(vocab, added, name, &s);
  if (s != M3_OK) return s;
  int32_t n_vocab = 0;
  const cJSON *e;
  cJSON_ArrayForEach(e, vocab) if ((int32_t)e->valuedouble + 1 > n_vocab) n_vocab = (int32_t)e->valuedouble + 1;
  bool *usable = calloc((size_t)n_vocab + 1, sizeof *usable);
  if (!usable) return m3_fail(M3_ERR_NOMEM, "%s: model.vocab", name);
  s = load_vocab(tok, &bm, vocab, n_vocab, usable, name);
  if (s == M3_OK && !tok_vocab_map_build(&tok->vocab_map, &tok->vocab, usable))
    s = m3_fail(M3_ERR_NOMEM, "%s: model.vocab", name);
  free(usable);
  if (s != M3_OK) return s;
  for (int b = 0; b < 256; b++) {
    uint8_t byte = (uint8_t)b;
    tok->byte_id[b] = tok_vocab_map_get(&tok->vocab_map, &tok->vocab, &byte, 1);
  }
  if ((s = want_bool(model, "ignore_merges", "model", false, &tok->ignore_merges)) != M3_OK)
    return m3_fail_context(s, "%s", name);
  if ((s = load_merges(tok, &bm, cJSON_GetObjectItemCaseSensitive(model, "merges"), name)) != M3_OK) return s;
  if ((s = load_added(tok, added, name)) != M3_OK) return s;
  tok->unk_id = -1;
  const char *unk = opt_string(model, "unk_token");
  if (unk && (tok->unk_id = m3_tok_find(tok, unk, strlen(unk))) < 0)
    return m3_fail(M3_ERR_FORMAT, "%s: model.unk_token '%s' is not in the vocabulary", name, unk);
  if ((s = build_tries(tok, name)) != M3_OK) return s;
  if ((s = build_decode_table(tok, &bm, name)) != M3_OK) return s;
  if ((s = load_pre_tokenizer(tok, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), name)) != M3_OK)
    return s;
  tok->md = pcre2_match_data_create(1, NULL);
  if (!tok->md || !tok_cache_init(&tok->cache)) return m3_fail(M3_ERR_NOMEM, "%s: tokenizer", name);
  return M3_OK;
}

m3_status m3_tok_load_json(const char *json, size_t len, const char *name, m3_tokenizer **out) {
  *out = NULL;
  cJSON *root = cJSON_ParseWithLength(json, len);
  if (!root) {
    const char *at = cJSON_GetErrorPtr();
    return m3_fail(M3_ERR_FORMAT, "%s: invalid JSON near byte %td", name, at ? at - json : (ptrdiff_t)0);
  }
  m3_tokenizer *tok = calloc(1, sizeof *tok);
  m3_status s = tok ? build(tok, root, name) : m3_fail(M3_ERR_NOMEM, "%s: tokenizer", name);
  cJSON_Delete(root);
  if (s != M3_OK) {
    m3_tok_free(tok);
    return s;
  }
  *out = tok;
  return M3_OK;
}

m3_status m3_tok_load(const char *path, m3_tokenizer **out) {
  *out = NULL;
  FILE *f = fopen(path, "rb");
  if (!f) return m3_fail(M3_ERR_IO, "%s: cannot open", path);
  char *buf = NULL;
  long size = -1;
  if (fseek(f, 0, SEEK_END) == 0 && (size = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0 &&
      (buf = malloc((size_t)size + 1)) && fread(buf, 1, (size_t)size, f) != (size_t)size)
    size = -1;
  fclose(f);
  if (!buf || size < 0) {
    free(buf);
    return m3_fail(size < 0 ? M3_ERR_IO : M3_ERR_NOMEM, "%s: cannot read", path);
  }
  m3_status s = m3_tok_load_json(buf, (size_t)size, path, out);
  free(buf);
  return s;
}

void m3_tok_free(m3_tokenizer *tok) {
  if (!tok) return;
  free(tok->vocab.bytes);
  free(tok->vocab.off);
  free(tok->in_vocab);
  free(tok->vocab_map.slots);
  free(tok->merges.slots);
  free(tok->added);
  free(tok->added_text);
  free(tok->added_of_id);
  tok_trie_free(&tok->trie_raw);
  tok_trie_free(&tok->trie_norm);
  pcre2_code_free(tok->word_char);
  free(tok->dec.bytes);
  free(tok->dec.off);
  for (int i = 0; i < tok->n_steps; i++) {
    pcre2_code_free(tok->steps[i].re);
    free(tok->steps[i].spans);
  }
  pcre2_match_data_free(tok->md);
  free(tok->work);
  free(tok->pieces[0]);
  free(tok->pieces[1]);
  free(tok->syms);
  free(tok->heap);
  tok_cache_free(&tok->cache);
  free(tok);
}

/* ---- queries ---- */

int32_t m3_tok_n_ids(const m3_tokenizer *tok) { return tok->n_ids; }

bool m3_tok_is_special(const m3_tokenizer *tok, int32_t id) {
  return id >= 0 && id < tok->n_ids && tok->added_of_id && tok->added_of_id[id] >= 0 &&
         tok->added[tok->added_of_id[id]].special;
}

int32_t m3_tok_find(const m3_tokenizer *tok, const char *text, size_t len) {
  for (int32_t i = 0; i < tok->n_added; i++)
    if (tok->added[i].len == len && memcmp(tok->added_text + tok->added[i].off, text, len) == 0)
      return tok->added[i].id;
  return tok_vocab_map_get(&tok->vocab_map, &tok->vocab, (const uint8_t *)text, len);
}

/* ---- encode ---- */

/* Level 0 cuts out added tokens matched on the raw text, level 1 those marked normalized (the
 * same text here, since the only normalizers accepted change nothing), level 2 pre-tokenizes. */
static m3_status encode_level(m3_tokenizer *tok, int level, size_t off, size_t len, bool special,
                              m3_tok_ids *out) {
  if (level == 2) return tok_pretokenize(tok, 0, off, len, out);
  const tok_trie *t = level == 0 ? &tok->trie_raw : &tok->trie_norm;
  if (t->n_nodes == 0) return encode_level(tok, level + 1, off, len, special, out);
  size_t n;
  m3_status s = tok_added_split(tok, level, off, len, special, &n);
  for (size_t i = 0; s == M3_OK && i < n; i++) {
    tok_piece p = tok->pieces[level][i];
    if (p.token < 0) {
      s = encode_level(tok, level + 1, p.start, p.end - p.start, special, out);
    } else if (tok_reserve((void **)&out->data, &out->cap, out->len + 1, sizeof(int32_t))) {
      out->data[out->len++] = tok->added[p.token].id;
    } else {
      s = m3_fail(M3_ERR_NOMEM, "encode");
    }
  }
  return s;
}

m3_status m3_tok_encode(m3_tokenizer *tok, const char *text, size_t len, bool special,
                        m3_tok_ids *out) {
  if (len > UINT32_MAX / 4) return m3_fail(M3_ERR_LIMIT, "encode: text of %zu bytes is too long", len);
  if (!m3_utf8_valid((const uint8_t *)text, len)) return m3_fail(M3_ERR_ARG, "encode: text is not valid UTF-8");
  if (len == 0) return M3_OK;
  if (!tok_reserve((void **)&tok->work, &tok->work_cap, len, 1)) return m3_fail(M3_ERR_NOMEM, "encode");
  memcpy(tok->work, text, len);
  tok->work_len = len;
  return encode_level(tok, 0, 0, len, special, out);
}
