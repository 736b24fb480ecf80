/* test_io_safetensors: the safetensors reader against hand-built bytes, the writer against
 * hand-built expected bytes, every class of bad header, and shard-set folders. Files go under
 * st_test.tmp/ in the working directory (the build's tests folder). */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "io/safetensors.h"

#define TMP "st_test.tmp"

/* Creates `dir` if needed and deletes the files in it (left from an earlier run). */
static void fresh_dir(const char *dir) {
  mkdir(dir, 0755);
  DIR *d = opendir(dir);
  if (!d) return;
  char path[512];
  for (struct dirent *de; (de = readdir(d));) {
    snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
    struct stat sb;
    if (stat(path, &sb) == 0 && S_ISREG(sb.st_mode)) unlink(path);
  }
  closedir(d);
}

static void put_file(const char *path, const void *p, size_t n) {
  FILE *f = fopen(path, "wb");
  CHECK(f != NULL);
  if (!f) return;
  CHECK_EQ_INT(fwrite(p, 1, n, f), n);
  CHECK_EQ_INT(fclose(f), 0);
}

/* u64 little-endian `header_len`, the header text, then `data`: the format built by hand. */
static size_t build_st(uint8_t *out, uint64_t header_len, const char *header, const void *data,
                       size_t n) {
  for (int i = 0; i < 8; i++) out[i] = (uint8_t)(header_len >> (8 * i));
  memcpy(out + 8, header, strlen(header));
  if (n) memcpy(out + 8 + strlen(header), data, n);
  return 8 + strlen(header) + n;
}

static void put_st(const char *path, const char *header, const void *data, size_t n) {
  uint8_t buf[4096];
  put_file(path, buf, build_st(buf, strlen(header), header, data, n));
}

static uint8_t *slurp(const char *path, size_t *n) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  *n = (size_t)ftell(f);
  fseek(f, 0, SEEK_SET);
  uint8_t *p = malloc(*n + 1);
  if (fread(p, 1, *n, f) != *n) *n = 0;
  fclose(f);
  return p;
}

static int ends_with(const char *s, const char *suffix) {
  size_t a = s ? strlen(s) : 0, b = strlen(suffix);
  return a >= b && strcmp(s + a - b, suffix) == 0;
}

static int same_shape(const m3_st_tensor *t, int ndim, const int64_t *shape) {
  if (!t || t->ndim != ndim) return 0;
  for (int d = 0; d < ndim; d++)
    if (t->shape[d] != shape[d]) return 0;
  return 1;
}

static void test_round_trip(void) {
  const char *path = TMP "/round.safetensors";
  const float bf_vals[6] = {1.5f,     -2.25f,      0.0f,
                            65536.0f, -0.0078125f, 3.0f}; /* all exact in bf16 */
  uint16_t bf[6];
  for (int i = 0; i < 6; i++) bf[i] = m3_f32_to_bf16(bf_vals[i]);
  const uint8_t e4m3[4] = {0x38, 0xb8, 0x7e, 0x01}; /* 1, -1, 448, 2^-9 */
  const uint8_t u8[6] = {0, 1, 2, 253, 254, 255};
  const int64_t i64[2] = {-5, (int64_t)1 << 40};
  const float scalar = 3.25f;
  const int64_t s_bf[2] = {2, 3}, s_e4[1] = {4}, s_u8[3] = {3, 1, 2}, s_i64[1] = {2},
                s_empty[2] = {0, 4};

  m3_st_writer *w = m3_st_writer_new();
  CHECK(w != NULL);
  CHECK_OK(m3_st_writer_add(w, "w.bf16", M3_DT_BF16, 2, s_bf, bf));
  CHECK_OK(m3_st_writer_add(w, "w.e4m3", M3_DT_F8_E4M3, 1, s_e4, e4m3));
  CHECK_OK(m3_st_writer_add(w, "idx.u8", M3_DT_U8, 3, s_u8, u8));
  CHECK_OK(m3_st_writer_add(w, "big.i64", M3_DT_I64, 1, s_i64, i64));
  CHECK_OK(m3_st_writer_add(w, "scalar", M3_DT_F32, 0, NULL, &scalar));
  CHECK_OK(m3_st_writer_add(w, "empty", M3_DT_F32, 2, s_empty, NULL));
  CHECK_OK(m3_st_writer_set_metadata(w, "format", "np"));
  CHECK_OK(m3_st_writer_set_metadata(w, "format", "pt")); /* replaces */
  CHECK_OK(m3_st_writer_write(w, path));
  m3_st_writer_free(w);

  m3_safetensors *st = NULL;
  CHECK_OK(m3_st_open_file(path, &st));
  if (!st) return;
  CHECK_EQ_INT(m3_st_count(st), 6);
  CHECK_EQ_INT(m3_st_shard_count(st), 1);
  CHECK_STR(m3_st_shard_path(st, 0), path);
  CHECK_STR(m3_st_metadata(st, "format"), "pt");
  CHECK(m3_st_metadata(st, "absent") == NULL);
  CHECK(m3_st_find(st, "absent") == NULL);
  CHECK(m3_st_at(st, 6) == NULL);

  const m3_st_tensor *t = m3_st_find(st, "w.bf16");
  CHECK(t && t->dtype == M3_DT_BF16 && same_shape(t, 2, s_bf) && t->nbytes == 12);
  if (t)
    for (int i = 0; i < 6; i++)
      CHECK_EQ_INT(m3_bf16_to_f32(((const uint16_t *)t->data)[i]), bf_vals[i]);
  t = m3_st_find(st, "w.e4m3");
  CHECK(t && t->dtype == M3_DT_F8_E4M3 && same_shape(t, 1, s_e4) && t->nbytes == 4);
  if (t) {
    const uint8_t *v = t->data;
    CHECK_NEAR(m3_e4m3_to_f32(v[0]), 1.0, 0);
    CHECK_NEAR(m3_e4m3_to_f32(v[1]), -1.0, 0);
    CHECK_NEAR(m3_e4m3_to_f32(v[2]), 448.0, 0);
    CHECK_NEAR(m3_e4m3_to_f32(v[3]), 1.0 / 512, 0);
  }
  t = m3_st_find(st, "idx.u8");
  CHECK(t && t->dtype == M3_DT_U8 && same_shape(t, 3, s_u8) && t->nbytes == 6);
  if (t) CHECK(memcmp(t->data, u8, 6) == 0);
  t = m3_st_find(st, "big.i64");
  CHECK(t && t->dtype == M3_DT_I64 && same_shape(t, 1, s_i64) && t->nbytes == 16);
  if (t) {
    int64_t v[2];
    memcpy(v, t->data, 16);
    CHECK_EQ_INT(v[0], -5);
    CHECK_EQ_INT(v[1], 1099511627776LL);
  }
  t = m3_st_find(st, "scalar");
  CHECK(t && t->dtype == M3_DT_F32 && t->ndim == 0 && t->nbytes == 4);
  if (t) {
    float v;
    memcpy(&v, t->data, 4);
    CHECK_NEAR(v, 3.25, 0);
  }
  t = m3_st_find(st, "empty");
  CHECK(t && t->dtype == M3_DT_F32 && same_shape(t, 2, s_empty) && t->nbytes == 0);
  /* m3_st_at walks every tensor once, find agrees with it, and the writer's layout keeps every
   * tensor aligned to its element size in the mapping. */
  for (int i = 0; i < m3_st_count(st); i++) {
    const m3_st_tensor *ti = m3_st_at(st, i);
    CHECK(m3_st_find(st, ti->name) == ti);
    CHECK_EQ_INT((uintptr_t)ti->data % m3_dtype_size(ti->dtype), 0);
  }
  m3_st_close(st);

  /* The header on disk: length a multiple of 8, keys in name order. */
  size_t n = 0;
  uint8_t *raw = slurp(path, &n);
  CHECK(raw && n > 8);
  if (!raw) return;
  uint64_t hl = 0;
  for (int i = 7; i >= 0; i--) hl = (hl << 8) | raw[i];
  CHECK_EQ_INT(hl % 8, 0);
  raw[8 + hl] = 0;
  const char *h = (const char *)raw + 8;
  const char *order[6] = {"\"big.i64\"", "\"empty\"",  "\"idx.u8\"",
                          "\"scalar\"",  "\"w.bf16\"", "\"w.e4m3\""};
  for (int i = 1; i < 6; i++)
    CHECK(strstr(h, order[i - 1]) && strstr(h, order[i - 1]) < strstr(h, order[i]));
  free(raw);
}

/* The writer's exact bytes: keys sorted by name, data by element size then name, space padding. */
static void test_writer_bytes(void) {
  const char *path = TMP "/exact.safetensors";
  const float b[2] = {1.0f, 2.0f};
  const uint8_t a[3] = {7, 8, 9}, c[1] = {5};
  const int64_t sb[1] = {2}, sa[1] = {3}, sc[1] = {1};
  m3_st_writer *w = m3_st_writer_new();
  CHECK_OK(m3_st_writer_set_metadata(w, "k", "v\"q"));
  CHECK_OK(m3_st_writer_add(w, "c", M3_DT_U8, 1, sc, c));
  CHECK_OK(m3_st_writer_add(w, "a", M3_DT_U8, 1, sa, a));
  CHECK_OK(m3_st_writer_add(w, "b", M3_DT_F32, 1, sb, b));
  CHECK_OK(m3_st_writer_write(w, path));
  m3_st_writer_free(w);

  const char *header =
      "{\"__metadata__\":{\"k\":\"v\\\"q\"},"
      "\"a\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[8,11]},"
      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
      "\"c\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[11,12]}}";
  char padded[256];
  size_t hl = strlen(header);
  memcpy(padded, header, hl);
  while (hl % 8) padded[hl++] = ' ';
  padded[hl] = 0;
  const uint8_t data[12] = {0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0x40, 7, 8, 9, 5};
  uint8_t expect[512];
  size_t en = build_st(expect, hl, padded, data, sizeof data);
  size_t n = 0;
  uint8_t *got = slurp(path, &n);
  CHECK_EQ_INT(n, en);
  CHECK(got && n == en && memcmp(got, expect, en) == 0);
  free(got);
}

/* A file built by hand (unpadded header with trailing spaces, metadata in the middle) read both
 * from disk and from memory. */
static void test_hand_built(void) {
  const char *path = TMP "/hand.safetensors";
  const char *header =
      "{\"x\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]},"
      "\"__metadata__\":{\"format\":\"pt\"},"
      "\"y\":{\"dtype\":\"I32\",\"shape\":[],\"data_offsets\":[4,8]},"
      "\"z\":{\"dtype\":\"BF16\",\"shape\":[0],\"data_offsets\":[8,8]},"
      "\"z2\":{\"dtype\":\"U8\",\"shape\":[1,0],\"data_offsets\":[2,2]}}   ";
  const uint8_t data[8] = {0x00, 0x3c, 0x00, 0xc0, 0xf9, 0xff, 0xff, 0xff}; /* f16 1, -2; i32 -7 */
  uint8_t buf[1024];
  size_t n = build_st(buf, strlen(header), header, data, sizeof data);
  put_file(path, buf, n);

  m3_safetensors *st = NULL;
  CHECK_OK(m3_st_open_file(path, &st));
  if (st) {
    CHECK_EQ_INT(m3_st_count(st), 4);
    CHECK_STR(m3_st_metadata(st, "format"), "pt");
    const m3_st_tensor *x = m3_st_find(st, "x"), *y = m3_st_find(st, "y");
    CHECK(x && x->dtype == M3_DT_F16 && x->ndim == 1 && x->shape[0] == 2 && x->nbytes == 4);
    CHECK(y && y->dtype == M3_DT_I32 && y->ndim == 0 && y->nbytes == 4);
    if (x && y) {
      uint16_t xv[2]; /* the header is not padded, so the data is not 2-byte aligned */
      memcpy(xv, x->data, 4);
      CHECK_NEAR(m3_f16_to_f32(xv[0]), 1.0, 0);
      CHECK_NEAR(m3_f16_to_f32(xv[1]), -2.0, 0);
      int32_t yv;
      memcpy(&yv, y->data, 4);
      CHECK_EQ_INT(yv, -7);
    }
    const m3_st_tensor *z = m3_st_find(st, "z");
    CHECK(z && z->nbytes == 0 && z->ndim == 1 && z->shape[0] == 0);
    m3_st_close(st);
  }

  CHECK_OK(m3_st_parse("mem", buf, n, &st));
  if (st) {
    const uint8_t *data_start = buf + 8 + strlen(header);
    CHECK(m3_st_find(st, "x")->data == data_start);
    CHECK(m3_st_find(st, "y")->data == data_start + 4);
    CHECK_STR(m3_st_shard_path(st, 0), "mem");
    m3_st_close(st);
  }
  CHECK_FAILS_WITH(m3_st_parse("mem", buf, 7, &st), M3_ERR_FORMAT, "mem: file is 7 bytes");
  CHECK(st == NULL);
}

/* Writes `header` + `data_len` zero bytes as TMP/bad_<tag>.safetensors and expects failure. */
static void expect_bad(const char *tag, const char *header, size_t data_len, const char *needle) {
  char path[256], full_needle[512];
  snprintf(path, sizeof path, TMP "/bad_%s.safetensors", tag);
  static const uint8_t zeros[64];
  put_st(path, header, zeros, data_len);
  snprintf(full_needle, sizeof full_needle, "bad_%s.safetensors: %s", tag, needle);
  m3_safetensors *st = (m3_safetensors *)&st; /* must be reset to NULL on failure */
  CHECK_FAILS_WITH(m3_st_open_file(path, &st), M3_ERR_FORMAT, full_needle);
  CHECK(st == NULL);
}

#define E(dtype, shape, b, e) \
  "{\"dtype\":\"" dtype "\",\"shape\":" shape ",\"data_offsets\":[" #b "," #e "]}"

static void test_bad_headers(void) {
  m3_safetensors *st = NULL;
  uint8_t buf[64] = {0};
  put_file(TMP "/bad_short.safetensors", buf, 5);
  CHECK_FAILS_WITH(m3_st_open_file(TMP "/bad_short.safetensors", &st), M3_ERR_FORMAT,
                   "bad_short.safetensors: file is 5 bytes");
  put_file(TMP "/bad_past.safetensors", buf, build_st(buf, 1000, "{}", NULL, 0));
  CHECK_FAILS_WITH(m3_st_open_file(TMP "/bad_past.safetensors", &st), M3_ERR_FORMAT,
                   "bad_past.safetensors: header length 1000 past the end");
  put_file(TMP "/bad_huge.safetensors", buf, build_st(buf, 200000000, "{}", NULL, 0));
  CHECK_FAILS_WITH(m3_st_open_file(TMP "/bad_huge.safetensors", &st), M3_ERR_FORMAT,
                   "bad_huge.safetensors: header length 200000000 over the 100 MB limit");
  CHECK_FAILS_WITH(m3_st_open_file(TMP "/absent.safetensors", &st), M3_ERR_IO,
                   "absent.safetensors: cannot open");

  expect_bad("json", "{\"x\":", 0, "header is not valid JSON");
  expect_bad("array", "[1,2]", 0, "header is not a JSON object");
  expect_bad("trail", "{}x", 0, "header has bytes after the JSON object");
  expect_bad("entry", "{\"x\":5}", 0, "tensor 'x': entry is not an object");
  expect_bad("nodtype", "{\"x\":{\"shape\":[1],\"data_offsets\":[0,1]}}", 1,
             "tensor 'x': missing \"dtype\"");
  expect_bad("dtype", "{\"x\":" E("F12", "[1]", 0, 1) "}", 1, "tensor 'x': unknown dtype 'F12'");
  expect_bad("noshape", "{\"x\":{\"dtype\":\"U8\",\"data_offsets\":[0,1]}}", 1,
             "tensor 'x': missing \"shape\"");
  expect_bad("frac", "{\"x\":" E("U8", "[1.5]", 0, 1) "}", 1,
             "tensor 'x': shape[0] is not a non-negative");
  expect_bad("neg", "{\"x\":" E("U8", "[1,-1]", 0, 1) "}", 1,
             "tensor 'x': shape[1] is not a non-negative");
  expect_bad("strdim", "{\"x\":" E("U8", "[\"1\"]", 0, 1) "}", 1, "tensor 'x': shape[0] is not");
  expect_bad("dims", "{\"x\":" E("U8", "[1,1,1,1,1,1,1,1,1]", 0, 1) "}", 1,
             "tensor 'x': 9 dimensions");
  expect_bad("numel", "{\"x\":" E("U8", "[4294967296,4294967296,2]", 0, 1) "}", 1,
             "tensor 'x': element count overflows");
  expect_bad("bytes", "{\"x\":" E("F64", "[2147483648,2147483648]", 0, 1) "}", 1,
             "tensor 'x': byte size overflows");
  expect_bad("off1", "{\"x\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0]}}", 1,
             "tensor 'x': \"data_offsets\" is not two");
  expect_bad("off3", "{\"x\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1,2]}}", 1,
             "tensor 'x': \"data_offsets\" is not two");
  expect_bad("offneg", "{\"x\":" E("U8", "[0]", -1, -1) "}", 1,
             "tensor 'x': \"data_offsets\" is not two");
  expect_bad("offstr", "{\"x\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[\"0\",1]}}", 1,
             "tensor 'x': \"data_offsets\" is not two");
  expect_bad("nooff", "{\"x\":{\"dtype\":\"U8\",\"shape\":[1]}}", 1,
             "tensor 'x': \"data_offsets\" is not two");
  expect_bad("order", "{\"x\":" E("U8", "[0]", 4, 0) "}", 4,
             "tensor 'x': data_offsets [4, 0] end before begin");
  expect_bad("size", "{\"x\":" E("F32", "[2]", 0, 4) "}", 4,
             "tensor 'x': data_offsets span 4 bytes, F32 shape needs 8");
  expect_bad("range", "{\"x\":" E("F32", "[1]", 0, 4) "}", 2,
             "tensor 'x': data_offsets end 4 past the 2-byte");
  expect_bad("overlap", "{\"a\":" E("U8", "[4]", 0, 4) ",\"b\":" E("U8", "[4]", 2, 6) "}", 6,
             "tensors 'a' and 'b' overlap");
  expect_bad("overlap2", "{\"b\":" E("U8", "[2]", 4, 6) ",\"a\":" E("U8", "[6]", 0, 6) "}", 6,
             "tensors 'a' and 'b' overlap");
  expect_bad("dup", "{\"a\":" E("U8", "[1]", 0, 1) ",\"a\":" E("U8", "[1]", 1, 2) "}", 2,
             "tensor 'a' appears twice");
  expect_bad("meta", "{\"__metadata__\":5}", 0, "__metadata__ is not an object");
  expect_bad("metaval", "{\"__metadata__\":{\"k\":1}}", 0, "__metadata__ key 'k' is not a string");
  expect_bad("meta2", "{\"__metadata__\":{},\"__metadata__\":{}}", 0, "__metadata__ appears twice");

  /* Empty tensors occupy no bytes: at any offset, even inside another tensor, they are valid. */
  put_st(TMP "/ok_empty.safetensors",
         "{\"a\":" E("U8", "[4]", 0, 4) ",\"e\":" E("F32", "[0]", 2, 2) ",\"f\":" E("F32", "[3,0]",
                                                                                    4, 4) "}",
         buf, 4);
  CHECK_OK(m3_st_open_file(TMP "/ok_empty.safetensors", &st));
  if (st) CHECK_EQ_INT(m3_st_count(st), 3);
  m3_st_close(st);
}

static void write_shard(const char *path, const char *const *names, int n, const char *format) {
  m3_st_writer *w = m3_st_writer_new();
  for (int i = 0; i < n; i++) {
    const int64_t shape[1] = {2};
    const uint8_t v[2] = {(uint8_t)names[i][0], (uint8_t)i};
    CHECK_OK(m3_st_writer_add(w, names[i], M3_DT_U8, 1, shape, v));
  }
  if (format) CHECK_OK(m3_st_writer_set_metadata(w, "format", format));
  CHECK_OK(m3_st_writer_write(w, path));
  m3_st_writer_free(w);
}

static void put_text(const char *path, const char *text) { put_file(path, text, strlen(text)); }

#define S1 "model-00001-of-00002.safetensors"
#define S2 "model-00002-of-00002.safetensors"
#define IDX TMP "/sharded/model.safetensors.index.json"

static void test_sharded(void) {
  const char *dir = TMP "/sharded";
  fresh_dir(dir);
  const char *s1[2] = {"a", "b"}, *s2[1] = {"c"}, *dup[1] = {"a"};
  write_shard(TMP "/sharded/" S1, s1, 2, "pt");
  write_shard(TMP "/sharded/" S2, s2, 1, "other");
  write_shard(TMP "/sharded/dup.safetensors", dup, 1, NULL);
  put_text(TMP "/sharded/config.json", "{}");

  put_text(IDX, "{\"metadata\":{\"total_size\":6},\"weight_map\":{\"c\":\"" S2 "\",\"a\":\"" S1
                "\",\"b\":\"" S1 "\"}}");
  m3_safetensors *st = NULL;
  CHECK_OK(m3_st_open_dir(dir, &st));
  if (st) {
    CHECK_EQ_INT(m3_st_count(st), 3);
    CHECK_EQ_INT(m3_st_shard_count(st), 2);
    CHECK(ends_with(m3_st_shard_path(st, 0), "/" S1));
    CHECK(ends_with(m3_st_shard_path(st, 1), "/" S2));
    CHECK_STR(m3_st_metadata(st, "format"), "pt");
    const m3_st_tensor *c = m3_st_find(st, "c"), *b = m3_st_find(st, "b");
    CHECK(c && c->shard == 1 && ((const uint8_t *)c->data)[0] == 'c' &&
          ((const uint8_t *)c->data)[1] == 0);
    CHECK(b && b->shard == 0 && ((const uint8_t *)b->data)[0] == 'b' &&
          ((const uint8_t *)b->data)[1] == 1);
    m3_st_close(st);
  }

  put_text(IDX, "{\"weight_map\":{\"a\":\"" S1 "\",\"b\":\"" S1 "\",\"c\":\"" S2
                "\",\"d\":\"model-00003.safetensors\"}}");
  CHECK_FAILS_WITH(m3_st_open_dir(dir, &st), M3_ERR_IO, "model-00003.safetensors: cannot open");
  put_text(IDX, "{\"weight_map\":{\"a\":\"" S1 "\",\"b\":\"" S1 "\",\"c\":\"" S1 "\"}}");
  CHECK_FAILS_WITH(m3_st_open_dir(dir, &st), M3_ERR_FORMAT,
                   "model.safetensors.index.json: tensor 'c' is not in its shard " S1);
  put_text(IDX, "{\"weight_map\":{\"a\":\"" S1 "\",\"b\":\"" S2 "\",\"c\":\"" S2 "\"}}");
  CHECK_FAILS_WITH(m3_st_open_dir(dir, &st), M3_ERR_FORMAT,
                   "tensor 'b' is in shard " S1 ", not in " S2);
  put_text(IDX, "{\"weight_map\":{\"a\":\"" S1 "\",\"c\":\"" S2 "\"}}");
  CHECK_FAILS_WITH(m3_st_open_dir(dir, &st), M3_ERR_FORMAT,
                   "tensor 'b' of shard " S1 " is not in weight_map");
  put_text(IDX, "{\"weight_map\":{\"a\":\"dup.safetensors\",\"b\":\"" S1 "\"}}");
  CHECK_FAILS_WITH(m3_st_open_dir(dir, &st), M3_ERR_FORMAT, "tensor 'a' is in both");
  put_text(IDX, "{\"weight_map\":{\"a\":\"../sharded/" S1 "\"}}");
  CHECK_FAILS_WITH(m3_st_open_dir(dir, &st), M3_ERR_FORMAT,
                   "tensor 'a': shard name '../sharded/" S1 "'");
  put_text(IDX, "{\"weight_map\":{\"a\":\"..x.safetensors\"}}");
  CHECK_FAILS_WITH(m3_st_open_dir(dir, &st), M3_ERR_FORMAT,
                   "shard name '..x.safetensors' is not a plain");
  put_text(IDX, "{\"weight_map\":{\"a\":\"sub/" S1 "\"}}");
  CHECK_FAILS_WITH(m3_st_open_dir(dir, &st), M3_ERR_FORMAT,
                   "shard name 'sub/" S1 "' is not a plain");
  put_text(IDX, "{\"weight_map\":{\"a\":1}}");
  CHECK_FAILS_WITH(m3_st_open_dir(dir, &st), M3_ERR_FORMAT, "weight_map entry 'a' is not a string");
  put_text(IDX, "{\"weight_map\":[]}");
  CHECK_FAILS_WITH(m3_st_open_dir(dir, &st), M3_ERR_FORMAT, "index.json: no \"weight_map\" object");
  put_text(IDX, "{\"weight_map\":{}}");
  CHECK_FAILS_WITH(m3_st_open_dir(dir, &st), M3_ERR_FORMAT, "index.json: weight_map is empty");
  put_text(IDX, "{\"weight_map\":");
  CHECK_FAILS_WITH(m3_st_open_dir(dir, &st), M3_ERR_FORMAT, "index.json: not valid JSON");
  CHECK(st == NULL);
}

static void test_unindexed(void) {
  m3_safetensors *st = NULL;
  const char *x[1] = {"x"}, *y[1] = {"y"};

  fresh_dir(TMP "/plain");
  write_shard(TMP "/plain/b.safetensors", y, 1, "second");
  write_shard(TMP "/plain/a.safetensors", x, 1, "first");
  put_text(TMP "/plain/config.json", "{}");
  CHECK_OK(m3_st_open_dir(TMP "/plain/", &st));
  if (st) {
    CHECK_EQ_INT(m3_st_shard_count(st), 2);
    CHECK_STR(m3_st_shard_path(st, 0), TMP "/plain/a.safetensors");
    CHECK_STR(m3_st_metadata(st, "format"), "first");
    CHECK(m3_st_find(st, "x") && m3_st_find(st, "x")->shard == 0);
    CHECK(m3_st_find(st, "y") && m3_st_find(st, "y")->shard == 1);
    m3_st_close(st);
  }

  /* model.safetensors wins over any other file. */
  fresh_dir(TMP "/single");
  write_shard(TMP "/single/model.safetensors", x, 1, NULL);
  write_shard(TMP "/single/extra.safetensors", y, 1, NULL);
  CHECK_OK(m3_st_open_dir(TMP "/single", &st));
  if (st) {
    CHECK_EQ_INT(m3_st_shard_count(st), 1);
    CHECK(m3_st_find(st, "x") && !m3_st_find(st, "y"));
    m3_st_close(st);
  }

  fresh_dir(TMP "/twice");
  write_shard(TMP "/twice/a.safetensors", x, 1, NULL);
  write_shard(TMP "/twice/b.safetensors", x, 1, NULL);
  CHECK_FAILS_WITH(m3_st_open_dir(TMP "/twice", &st), M3_ERR_FORMAT,
                   "tensor 'x' is in both " TMP "/twice/a.safetensors and " TMP
                   "/twice/b.safetensors");

  fresh_dir(TMP "/config_only");
  put_text(TMP "/config_only/config.json", "{}");
  CHECK_FAILS_WITH(m3_st_open_dir(TMP "/config_only", &st), M3_ERR_MISSING, "config_only: no ");
  CHECK_FAILS_WITH(m3_st_open_dir(TMP "/no_such_dir", &st), M3_ERR_IO,
                   "no_such_dir: cannot open folder");
  CHECK(st == NULL);
}

/* Enough tensors over two shards to grow the hash table several times. */
static void test_many(void) {
  enum { N = 3000 };
  fresh_dir(TMP "/many");
  m3_st_writer *w[2] = {m3_st_writer_new(), m3_st_writer_new()};
  char name[32];
  for (int i = 0; i < N; i++) {
    const int64_t shape[1] = {1};
    int32_t v = i * 7;
    snprintf(name, sizeof name, "layers.%d.w", i);
    CHECK_OK(m3_st_writer_add(w[i % 2], name, M3_DT_I32, 1, shape, &v));
  }
  CHECK_OK(m3_st_writer_write(w[0], TMP "/many/p0.safetensors"));
  CHECK_OK(m3_st_writer_write(w[1], TMP "/many/p1.safetensors"));
  m3_st_writer_free(w[0]);
  m3_st_writer_free(w[1]);
  m3_safetensors *st = NULL;
  CHECK_OK(m3_st_open_dir(TMP "/many", &st));
  if (!st) return;
  CHECK_EQ_INT(m3_st_count(st), N);
  int bad = 0;
  for (int i = 0; i < N; i++) {
    snprintf(name, sizeof name, "layers.%d.w", i);
    const m3_st_tensor *t = m3_st_find(st, name);
    int32_t v = -1;
    if (t) memcpy(&v, t->data, 4);
    bad += !t || v != i * 7 || t->shard != i % 2 || strcmp(t->name, name) != 0;
  }
  CHECK_EQ_INT(bad, 0);
  m3_st_close(st);
}

static void test_writer_errors(void) {
  m3_st_writer *w = m3_st_writer_new();
  const int64_t shape[1] = {1}, negative[1] = {-1};
  const uint8_t v = 1;
  CHECK_OK(m3_st_writer_add(w, "a", M3_DT_U8, 1, shape, &v));
  CHECK_OK(m3_st_writer_add(w, "a", M3_DT_U8, 1, shape, &v));
  CHECK_FAILS_WITH(m3_st_writer_write(w, TMP "/dupw.safetensors"), M3_ERR_ARG,
                   "tensor 'a' added twice");
  CHECK(access(TMP "/dupw.safetensors", F_OK) != 0);
  CHECK_FAILS_WITH(m3_st_writer_add(w, "n", M3_DT_U8, 1, negative, &v), M3_ERR_ARG,
                   "tensor 'n': shape[0] = -1");
  CHECK_FAILS_WITH(m3_st_writer_add(w, "d", M3_DT_U8, 9, shape, &v), M3_ERR_ARG,
                   "tensor 'd': 9 dimensions");
  CHECK_FAILS_WITH(m3_st_writer_add(w, "__metadata__", M3_DT_U8, 1, shape, &v), M3_ERR_ARG,
                   "invalid tensor name");
  m3_st_writer_free(w);
  w = m3_st_writer_new();
  CHECK_FAILS_WITH(m3_st_writer_write(w, TMP "/no_such_dir/x.safetensors"), M3_ERR_IO,
                   "cannot create");
  m3_st_writer_free(w);
}

int main(void) {
  fresh_dir(TMP);
  test_round_trip();
  test_writer_bytes();
  test_hand_built();
  test_bad_headers();
  test_sharded();
  test_unindexed();
  test_many();
  test_writer_errors();
  return check_summary();
}
