/* The tiny checkpoint: it binds, its three dtypes hold the same underlying weights (f32 rounds to
 * the bf16 file exactly; MXFP8 decodes to within E4M3 precision of it), the weight scales are the
 * documented ones, the tokenizer follows the byte-level BPE conventions, the built-in model
 * is the default tiny checkpoint, parallel generation writes the bytes the sequential writer
 * did, and the vocabulary and text-only options reach the files. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/dtype.h"
#include "check.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "io/tiny.h"
#include "io/weights.h"

typedef struct {
  m3_config cfg;
  m3_safetensors *st;
  m3_weights w;
} loaded;

static int load(const char *dir, loaded *l) {
  char path[512];
  snprintf(path, sizeof path, "%s/config.json", dir);
  memset(l, 0, sizeof *l);
  if (m3_config_load(path, &l->cfg) != M3_OK) return 0;
  if (m3_st_open_dir(dir, &l->st) != M3_OK) return 0;
  return m3_weights_bind(&l->cfg, l->st, &l->w) == M3_OK;
}

static void unload(loaded *l) {
  m3_weights_free(&l->w);
  m3_st_close(l->st);
  m3_config_free(&l->cfg);
}

static char *read_text(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *s = malloc((size_t)n + 1);
  if (s && fread(s, 1, (size_t)n, f) != (size_t)n) n = 0;
  if (s) s[n] = 0;
  fclose(f);
  return s;
}

/* Largest |a - b| relative to max(|b|, floor) over a whole tensor. */
static double max_rel_diff(const m3_tensor *a, const m3_tensor *b, double floor_abs) {
  float *ra = malloc((size_t)a->cols * sizeof *ra), *rb = malloc((size_t)b->cols * sizeof *rb);
  double worst = 0;
  for (int64_t r = 0; r < a->rows; r++) {
    m3_tensor_row_f32(a, r, ra);
    m3_tensor_row_f32(b, r, rb);
    for (int64_t c = 0; c < a->cols; c++) {
      double d = fabs((double)ra[c] - rb[c]) / fmax(fabs((double)rb[c]), floor_abs);
      if (d > worst) worst = d;
    }
  }
  free(ra);
  free(rb);
  return worst;
}

static void moments(const m3_tensor *t, double *mean, double *std) {
  float *row = malloc((size_t)t->cols * sizeof *row);
  double s = 0, s2 = 0, n = (double)(t->rows * t->cols);
  for (int64_t r = 0; r < t->rows; r++) {
    m3_tensor_row_f32(t, r, row);
    for (int64_t c = 0; c < t->cols; c++) {
      s += row[c];
      s2 += (double)row[c] * row[c];
    }
  }
  free(row);
  *mean = s / n;
  *std = sqrt(s2 / n - *mean * *mean);
}

static void test_dtypes_agree(const char *root) {
  char d_bf16[512], d_f32[512], d_mx[512];
  snprintf(d_bf16, sizeof d_bf16, "%s/bf16", root);
  snprintf(d_f32, sizeof d_f32, "%s/f32", root);
  snprintf(d_mx, sizeof d_mx, "%s/mxfp8", root);
  m3_tiny_options opt = m3_tiny_default_options();
  CHECK_OK(m3_tiny_write(d_bf16, &opt));
  opt.dtype = M3_TINY_F32;
  CHECK_OK(m3_tiny_write(d_f32, &opt));
  opt.dtype = M3_TINY_MXFP8;
  CHECK_OK(m3_tiny_write(d_mx, &opt));

  loaded b, f, m;
  int ok_b = load(d_bf16, &b), ok_f = load(d_f32, &f), ok_m = load(d_mx, &m);
  CHECK(ok_b && ok_f && ok_m);
  if (!(ok_b && ok_f && ok_m)) {
    fprintf(stderr, "load: %s\n", m3_last_error());
    return;
  }
  /* Default plan FD,FM,SD,SM; one MTP module; the vision tower. */
  CHECK_EQ_INT(b.cfg.num_layers, 4);
  CHECK_EQ_INT(b.cfg.layer_attn[2], M3_ATTN_SPARSE);
  CHECK_EQ_INT(b.cfg.layer_mlp[1], M3_MLP_MOE);
  CHECK_EQ_INT(b.w.num_mtp, 1);
  CHECK(b.w.vision.present);
  CHECK_EQ_INT(b.w.num_quantized, 0);
  CHECK(m.w.num_quantized > 0);
  CHECK_EQ_INT(m.cfg.quant.method, M3_QUANT_MXFP8);

  const m3_layer_weights *lb = &b.w.layers[3], *lf = &f.w.layers[3], *lm = &m.w.layers[3];
  CHECK_EQ_INT(lb->q_proj.dtype, M3_DT_BF16);
  CHECK_EQ_INT(lf->q_proj.dtype, M3_DT_F32);
  CHECK_EQ_INT(lm->q_proj.quant, M3_WQ_MXFP8);
  CHECK_EQ_INT(lm->expert_down[5].quant, M3_WQ_MXFP8);
  CHECK_EQ_INT(lm->index_q_proj.quant, M3_WQ_NONE);
  CHECK_EQ_INT(lb->router.dtype, M3_DT_F32);
  CHECK_EQ_INT(lb->router_bias.dtype, M3_DT_F32);
  CHECK_EQ_INT(b.w.vision.patch_embed.dtype, M3_DT_F32);

  /* f32 values round to exactly the bf16 file's values. */
  const m3_tensor *pairs_f[] = {&lf->q_proj, &lf->expert_up[2], &f.w.embed, &f.w.mtp[0].eh_proj};
  const m3_tensor *pairs_b[] = {&lb->q_proj, &lb->expert_up[2], &b.w.embed, &b.w.mtp[0].eh_proj};
  for (int i = 0; i < 4; i++) {
    float *rf = malloc((size_t)pairs_f[i]->cols * sizeof *rf), *rb = malloc((size_t)pairs_b[i]->cols * sizeof *rb);
    int same = 1;
    for (int64_t r = 0; r < pairs_f[i]->rows; r++) {
      m3_tensor_row_f32(pairs_f[i], r, rf);
      m3_tensor_row_f32(pairs_b[i], r, rb);
      for (int64_t c = 0; c < pairs_f[i]->cols; c++) same &= m3_bf16_to_f32(m3_f32_to_bf16(rf[c])) == rb[c];
    }
    CHECK(same);
    free(rf);
    free(rb);
  }
  /* MXFP8 decodes to the bf16 values within E4M3's 3 mantissa bits (half a step: 2^-4
   * relative), except a block maximum whose scaled value passed 448 and saturated (< 1/8
   * relative); values far below their block's maximum fall to E4M3 subnormals, hence the floor.
   * A wrong scale exponent is off by a factor 2 and fails. */
  CHECK(max_rel_diff(&lm->q_proj, &lb->q_proj, 0.02) <= 0.125);
  CHECK(max_rel_diff(&lm->shared_down, &lb->shared_down, 0.02) <= 0.125); /* 40 columns: a short block */
  CHECK(max_rel_diff(&m.w.layers[0].mlp_down, &b.w.layers[0].mlp_down, 0.02) <= 0.125);

  /* Scales as documented in tiny.c: linears 1.5/sqrt(fan_in), router 3/sqrt(H), embeddings 1,
   * Gemma norms near 0. */
  double mean, std;
  moments(&lf->q_proj, &mean, &std);
  CHECK_NEAR(std, 1.5 / 8.0, 0.02);
  CHECK_NEAR(mean, 0.0, 0.01);
  moments(&lf->router, &mean, &std);
  CHECK_NEAR(std, 3.0 / 8.0, 0.06);
  moments(&f.w.embed, &mean, &std);
  CHECK_NEAR(std, 1.0, 0.05);
  moments(&lf->input_norm, &mean, &std);
  CHECK_NEAR(mean, 0.0, 0.05);
  CHECK(std > 0.03 && std < 0.2);
  unload(&b);
  unload(&f);
  unload(&m);
}

static void test_tokenizer(const char *root) {
  char path[600];
  snprintf(path, sizeof path, "%s/bf16/tokenizer.json", root);
  char *text = read_text(path);
  cJSON *tj = text ? cJSON_Parse(text) : NULL;
  CHECK(tj != NULL);
  if (!tj) {
    free(text);
    return;
  }
  const cJSON *model = cJSON_GetObjectItemCaseSensitive(tj, "model");
  const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
  const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
  CHECK_STR(cJSON_GetObjectItemCaseSensitive(model, "type")->valuestring, "BPE");
  /* GPT-2 byte mapping: '!' is itself, space is U+0120 'Ġ', byte 0 is U+0100 'Ā', newline 'Ċ'. */
  CHECK_EQ_INT(cJSON_GetObjectItemCaseSensitive(vocab, "!")->valueint, 33);
  CHECK_EQ_INT(cJSON_GetObjectItemCaseSensitive(vocab, "\xc4\xa0")->valueint, 32);
  CHECK_EQ_INT(cJSON_GetObjectItemCaseSensitive(vocab, "\xc4\x80")->valueint, 0);
  CHECK_EQ_INT(cJSON_GetObjectItemCaseSensitive(vocab, "\xc4\x8a")->valueint, 10);
  int n_vocab = cJSON_GetArraySize(vocab), n_merges = cJSON_GetArraySize(merges);
  CHECK(n_merges >= 200);
  CHECK(n_vocab > 256 && n_vocab <= 256 + n_merges); /* two merges may spell one token */
  /* Each merge joins two vocabulary tokens into a vocabulary token. */
  int merges_ok = 1;
  for (const cJSON *m = merges->child; m; m = m->next) {
    char left[256], joined[256];
    const char *sp = strchr(m->valuestring, ' ');
    if (!sp || sp - m->valuestring >= (long)sizeof left) {
      merges_ok = 0;
      continue;
    }
    memcpy(left, m->valuestring, (size_t)(sp - m->valuestring));
    left[sp - m->valuestring] = 0;
    snprintf(joined, sizeof joined, "%s%s", left, sp + 1);
    merges_ok &= cJSON_GetObjectItemCaseSensitive(vocab, left) && cJSON_GetObjectItemCaseSensitive(vocab, sp + 1) &&
                 cJSON_GetObjectItemCaseSensitive(vocab, joined);
  }
  CHECK(merges_ok);
  /* Nothing but single bytes exists before the first merge. */
  char first[64];
  snprintf(first, sizeof first, "%s", merges->child->valuestring);
  char *sp1 = strchr(first, ' ');
  CHECK(sp1 != NULL);
  if (sp1) {
    *sp1 = 0;
    const cJSON *l = cJSON_GetObjectItemCaseSensitive(vocab, first), *r = cJSON_GetObjectItemCaseSensitive(vocab, sp1 + 1);
    CHECK(l && r && l->valueint < 256 && r->valueint < 256);
  }

  /* Added tokens follow the BPE vocabulary in M3's order; config ids point at the right ones. */
  const cJSON *added = cJSON_GetObjectItemCaseSensitive(tj, "added_tokens");
  CHECK_EQ_INT(cJSON_GetArraySize(added), 61);
  const cJSON *bos = cJSON_GetArrayItem(added, 34), *eos = cJSON_GetArrayItem(added, 20);
  const cJSON *img = cJSON_GetArrayItem(added, 25), *think = cJSON_GetArrayItem(added, 59);
  CHECK_STR(cJSON_GetObjectItemCaseSensitive(bos, "content")->valuestring, "]~!b[");
  CHECK_STR(cJSON_GetObjectItemCaseSensitive(eos, "content")->valuestring, "[e~[");
  CHECK_STR(cJSON_GetObjectItemCaseSensitive(img, "content")->valuestring, "]<]image[>[");
  CHECK_STR(cJSON_GetObjectItemCaseSensitive(think, "content")->valuestring, "<mm:think>");
  CHECK_EQ_INT(cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(added, 0), "id")->valueint, n_vocab);

  m3_config cfg;
  snprintf(path, sizeof path, "%s/bf16/config.json", root);
  CHECK_OK(m3_config_load(path, &cfg));
  CHECK_EQ_INT(cfg.bos_token_id, cJSON_GetObjectItemCaseSensitive(bos, "id")->valueint);
  CHECK_EQ_INT(cfg.eos_token_id, cJSON_GetObjectItemCaseSensitive(eos, "id")->valueint);
  CHECK_EQ_INT(cfg.image_token_id, cJSON_GetObjectItemCaseSensitive(img, "id")->valueint);
  CHECK_EQ_INT(cfg.vocab_size, n_vocab + 61);
  m3_config_free(&cfg);
  cJSON_Delete(tj);
  free(text);
}

static void test_plan_errors(const char *root) {
  char dir[600];
  snprintf(dir, sizeof dir, "%s/bad", root);
  m3_tiny_options opt = m3_tiny_default_options();
  opt.layers = "FD,,SM";
  CHECK_FAILS_WITH(m3_tiny_write(dir, &opt), M3_ERR_ARG, "entry 2");
  opt.layers = "FDM";
  CHECK_FAILS_WITH(m3_tiny_write(dir, &opt), M3_ERR_ARG, "entry 1");
  opt.layers = "";
  CHECK_FAILS_WITH(m3_tiny_write(dir, &opt), M3_ERR_ARG, "entry 1");
  CHECK(access(dir, F_OK) != 0); /* nothing written for a bad plan */
}

/* Size overrides reach the config and every tensor shape (the binder checks shapes against the
 * config, so loading at all is part of the check); inconsistent sizes fail naming the options,
 * before anything is written. */
static void test_sizes(const char *root) {
  char dir[600];
  snprintf(dir, sizeof dir, "%s/sized", root);
  m3_tiny_options opt = m3_tiny_default_options();
  opt.dtype = M3_TINY_MXFP8;
  opt.layers = "FD,SM";
  opt.hidden = 48, opt.heads = 6, opt.kv_heads = 3, opt.head_dim = 12, opt.rotary_dim = 4;
  opt.experts = 5, opt.experts_per_token = 3, opt.expert_width = 20, opt.shared_width = 36;
  opt.dense_width = 44, opt.index_dim = 10, opt.block_size = 8, opt.topk_blocks = 2;
  CHECK_OK(m3_tiny_write(dir, &opt));
  loaded l;
  int ok = load(dir, &l);
  CHECK(ok);
  if (ok) {
    const m3_config *c = &l.cfg;
    CHECK_EQ_INT(c->hidden_size, 48);
    CHECK_EQ_INT(c->num_heads, 6);
    CHECK_EQ_INT(c->num_kv_heads, 3);
    CHECK_EQ_INT(c->index_num_heads, 3);
    CHECK_EQ_INT(c->head_dim, 12);
    CHECK_EQ_INT(c->rotary_dim, 4);
    CHECK_EQ_INT(c->num_experts, 5);
    CHECK_EQ_INT(c->num_experts_per_tok, 3);
    CHECK_EQ_INT(c->intermediate_size, 20);
    CHECK_EQ_INT(c->shared_intermediate_size, 36);
    CHECK_EQ_INT(c->dense_intermediate_size, 44);
    CHECK_EQ_INT(c->index_head_dim, 10);
    CHECK_EQ_INT(c->index_block_size, 8);
    CHECK_EQ_INT(c->index_topk_blocks, 2);
    const m3_layer_weights *L = &l.w.layers[1];
    CHECK_EQ_INT((int)L->q_proj.rows, 72);
    CHECK_EQ_INT((int)L->q_proj.cols, 48);
    CHECK_EQ_INT((int)L->index_q_proj.rows, 30);
    CHECK_EQ_INT((int)L->expert_down[4].rows, 48);
    CHECK_EQ_INT((int)L->expert_down[4].cols, 20);
    CHECK_EQ_INT((int)L->shared_gate.rows, 36);
    CHECK_EQ_INT((int)l.w.layers[0].mlp_up.rows, 44);
    CHECK_EQ_INT((int)l.w.embed.cols, 48);
    unload(&l);
  }

  snprintf(dir, sizeof dir, "%s/badsize", root);
  opt = m3_tiny_default_options();
  opt.heads = 6, opt.kv_heads = 4;
  CHECK_FAILS_WITH(m3_tiny_write(dir, &opt), M3_ERR_ARG, "--heads 6 is not a multiple of --kv-heads 4");
  opt = m3_tiny_default_options();
  opt.head_dim = 6; /* below the default rotated width 8 */
  CHECK_FAILS_WITH(m3_tiny_write(dir, &opt), M3_ERR_ARG, "--rotary-dim 8");
  opt = m3_tiny_default_options();
  opt.rotary_dim = 5;
  CHECK_FAILS_WITH(m3_tiny_write(dir, &opt), M3_ERR_ARG, "--rotary-dim 5");
  opt = m3_tiny_default_options();
  opt.experts = 1; /* below the default top-2 */
  CHECK_FAILS_WITH(m3_tiny_write(dir, &opt), M3_ERR_ARG, "--experts-per-token 2 exceeds --experts 1");
  opt = m3_tiny_default_options();
  opt.experts_per_token = 9;
  CHECK_FAILS_WITH(m3_tiny_write(dir, &opt), M3_ERR_ARG, "--experts-per-token 9 exceeds --experts 8");
  opt = m3_tiny_default_options();
  opt.block_size = -1;
  CHECK_FAILS_WITH(m3_tiny_write(dir, &opt), M3_ERR_ARG, "--block-size -1");
  opt = m3_tiny_default_options();
  opt.hidden = 65537;
  CHECK_FAILS_WITH(m3_tiny_write(dir, &opt), M3_ERR_ARG, "--hidden 65537");
  CHECK(access(dir, F_OK) != 0); /* nothing written for bad sizes */
}

/* FNV-1a 64 of a file's bytes, 0 when unreadable. */
static uint64_t file_digest(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) return 0;
  uint64_t h = 1469598103934665603ull;
  for (int c; (c = fgetc(f)) != EOF;) h = (h ^ (uint8_t)c) * 1099511628211ull;
  fclose(f);
  return h;
}

/* Generation is split into pieces of rows written by several threads; the bytes are those the
 * sequential writer (before the split) wrote: digests of its files. The second set has rows of 65
 * values, so pieces start in the middle of a Box-Muller pair, and MXFP8 rows ending in a short
 * block. */
static void test_same_bytes(const char *root) {
  char dir[600], path[700];
  snprintf(dir, sizeof dir, "%s/digest", root);
  snprintf(path, sizeof path, "%s/model.safetensors", dir);
  m3_tiny_options opt = m3_tiny_default_options();
  CHECK_OK(m3_tiny_write(dir, &opt));
  CHECK(file_digest(path) == 0xf6214365a5267976ull);
  opt.dtype = M3_TINY_MXFP8;
  opt.layers = "FD,SM";
  opt.hidden = 65, opt.dense_width = 20000;
  for (int threads = 1; threads <= 4; threads += 3) {
    opt.threads = threads;
    CHECK_OK(m3_tiny_write(dir, &opt));
    uint64_t d = file_digest(path);
    if (d != 0xa2506fef55fc540cull) fprintf(stderr, "threads %d: digest %016llx\n", threads, (unsigned long long)d);
    CHECK(d == 0xa2506fef55fc540cull);
  }
}

static int has_tensor_containing(const m3_safetensors *st, const char *part) {
  for (int i = 0; i < m3_st_count(st); i++)
    if (strstr(m3_st_at(st, i)->name, part)) return 1;
  return 0;
}

/* --vocab widens embedding and lm_head past the tokenizer (beyond 65536 too); --no-mtp and
 * --no-vision leave out those tensors and the result still binds: text-only is the bare
 * MiniMaxM3SparseForCausalLM layout, names without the language_model. prefix. */
static void test_vocab_and_layouts(const char *root) {
  char dir[600];
  snprintf(dir, sizeof dir, "%s/text_only", root);
  m3_tiny_options opt = m3_tiny_default_options();
  opt.vocab = 1000, opt.no_mtp = 1, opt.no_vision = 1;
  CHECK_OK(m3_tiny_write(dir, &opt));
  loaded l;
  int ok = load(dir, &l);
  CHECK(ok);
  if (ok) {
    CHECK_EQ_INT(l.cfg.vocab_size, 1000);
    CHECK_EQ_INT(l.cfg.is_vl, 0);
    CHECK_STR(l.cfg.architecture, "MiniMaxM3SparseForCausalLM");
    CHECK_EQ_INT(l.cfg.num_mtp_modules, 0);
    CHECK_EQ_INT(l.w.num_mtp, 0);
    CHECK(!l.w.vision.present);
    CHECK_EQ_INT((int)l.w.embed.rows, 1000);
    CHECK_EQ_INT((int)l.w.lm_head.rows, 1000);
    CHECK(m3_st_find(l.st, "model.embed_tokens.weight") != NULL);
    CHECK(!has_tensor_containing(l.st, "language_model."));
    CHECK(!has_tensor_containing(l.st, "mtp."));
    CHECK(!has_tensor_containing(l.st, "vision"));
    CHECK(!has_tensor_containing(l.st, "patch_merge"));
    unload(&l);
  }

  snprintf(dir, sizeof dir, "%s/wide_vocab", root);
  opt = m3_tiny_default_options();
  opt.vocab = 70000, opt.no_mtp = 1;
  CHECK_OK(m3_tiny_write(dir, &opt));
  ok = load(dir, &l);
  CHECK(ok);
  if (ok) {
    CHECK_EQ_INT(l.cfg.vocab_size, 70000);
    CHECK_EQ_INT(l.cfg.is_vl, 1);
    CHECK(l.w.vision.present);
    CHECK_EQ_INT(l.w.num_mtp, 0);
    CHECK(!has_tensor_containing(l.st, "mtp."));
    CHECK_EQ_INT((int)l.w.embed.rows, 70000);
    CHECK_EQ_INT((int)l.w.lm_head.rows, 70000);
    double mean, std;
    moments(&l.w.embed, &mean, &std);
    CHECK_NEAR(std, 1.0, 0.01);
    unload(&l);
  }

  snprintf(dir, sizeof dir, "%s/bad_vocab", root);
  opt = m3_tiny_default_options();
  opt.vocab = 10;
  CHECK_FAILS_WITH(m3_tiny_write(dir, &opt), M3_ERR_ARG, "--vocab 10 is below the tokenizer's");
  opt.vocab = M3_TINY_VOCAB_MAX + 1;
  CHECK_FAILS_WITH(m3_tiny_write(dir, &opt), M3_ERR_ARG, "--vocab 262145");
}

static void test_builtin(const char *root) {
  char cache[600], out[1024], expect[1200];
  snprintf(cache, sizeof cache, "%s/cache", root);
  setenv("M3_CACHE", cache, 1);
  CHECK_OK(m3_builtin_model_dir(out, sizeof out));
  snprintf(expect, sizeof expect, "%s/tiny-v1", cache);
  CHECK_STR(out, expect);
  char *a = NULL, *b = NULL, pa[1200], pb[1200];
  snprintf(pa, sizeof pa, "%s/config.json", out);
  snprintf(pb, sizeof pb, "%s/bf16/config.json", root);
  a = read_text(pa);
  b = read_text(pb);
  CHECK(a && b && strcmp(a, b) == 0);
  free(a);
  free(b);
  CHECK_OK(m3_builtin_model_dir(out, sizeof out)); /* second use: already there */
  char tiny_buf[8];
  CHECK_FAILS_WITH(m3_builtin_model_dir(tiny_buf, sizeof tiny_buf), M3_ERR_ARG, "buffer");
}

int main(void) {
  char root[] = "/tmp/m3_test_tiny_XXXXXX";
  if (!mkdtemp(root)) return 1;
  test_dtypes_agree(root);
  test_tokenizer(root);
  test_plan_errors(root);
  test_sizes(root);
  test_same_bytes(root);
  test_vocab_and_layouts(root);
  test_builtin(root);
  char cmd[600];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", root);
  return check_summary();
}
