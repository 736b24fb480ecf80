/* eagle3.c: the EAGLE3 drafter (vLLM llama_eagle3: Eagle3LlamaForCausalLM, one decoder layer):
 *
 *   e    = embed_tokens[x_{p+1}]  (the draft's own table, else the target's)      [T, H]
 *   r    = catch-up: fc([aux_0; aux_1; aux_2])  (target states, 3 * target H wide)  [T, H]
 *          chained: the previous step's output
 *   norm_before_residual ? r = hidden_norm(r), h = r : h = hidden_norm(r)
 *   z    = [input_layernorm(e) ; h]                                               [T, 2H]
 *   q, k, v = z Wq^T, z Wk^T, z Wv^T; RoPE (NeoX, whole head) on q, k; causal attention over
 *          the draft's own K/V cache; r += o_proj(attention)
 *   out  = r + MLP(post_attention_layernorm(r))   SiLU-gated                       [T, H]
 * and draft.c applies `norm` and the lm_head (the draft's own over draft_vocab_size, else the
 * target's), mapping draft id i to target id i + d2t[i].
 * Llama's RMSNorm scales by w; the backend's by (1 + w): the norms are held as w - 1 (float32).
 * Tensor names as vLLM loads them: with or without a leading "model.", "midlayer." for
 * "layers.0."; t2d is not needed. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/safetensors.h"
#include "model/draft_internal.h"

typedef struct {
  m3_drafter base;
  m3_safetensors *st;
  int nh, nkv, hd, I;
  float eps;
  double rope_theta;
  int norm_before_residual;
  m3_tensor fc, q_proj, k_proj, v_proj, o_proj, gate, up, down, embed, lm_head;
  m3_tensor input_norm, hidden_norm, post_norm, final_norm; /* w - 1, float32, backend memory */
  const m3_tensor *embed_table;
  float *e, *r, *h, *z, *q, *k, *v, *att, *tmp, *g, *u; /* step buffers */
} eagle3_drafter;

static m3_status body(m3_drafter *d, const m3_segment *segs, int n_segs, int T, int step) {
  eagle3_drafter *g = (eagle3_drafter *)d;
  m3_backend *be = d->be;
  const int H = d->H;
  const size_t TH = (size_t)T * H;
  be->ops->embed(be, g->embed_table, d->ids, T, g->e);
  if (step == 0) be->ops->matmul(be, &g->fc, d->hin, T, g->r);
  else be->ops->copy(be, g->r, d->hin, TH * sizeof(float));
  be->ops->rmsnorm(be, g->r, &g->hidden_norm, g->eps, T, H, g->h);
  if (g->norm_before_residual) be->ops->copy(be, g->r, g->h, TH * sizeof(float));
  be->ops->rmsnorm(be, g->e, &g->input_norm, g->eps, T, H, g->e);
  m3_drafter_concat(be, g->e, g->h, T, H, g->z);

  const m3_matmul_out qkv[] = {{&g->q_proj, g->q}, {&g->k_proj, g->k}, {&g->v_proj, g->v}};
  be->ops->matmul_set(be, g->z, T, qkv, 3);
  be->ops->rope(be, g->q, d->pos, T, g->nh, g->hd, g->hd, g->rope_theta);
  be->ops->rope(be, g->k, d->pos, T, g->nkv, g->hd, g->hd, g->rope_theta);
  const size_t qw = (size_t)g->nh * g->hd, kvw = (size_t)g->nkv * g->hd;
  for (int i = 0; i < n_segs; i++) {
    const size_t r0 = (size_t)segs[i].first;
    be->ops->kv_store(be, &segs[i].kv[0], d->pos + r0, segs[i].T, g->k + r0 * kvw,
                      g->v + r0 * kvw, NULL);
    be->ops->attention(be, g->q + r0 * qw, g->nh, &segs[i].kv[0], d->pos + r0, segs[i].T, NULL,
                       0, g->att + r0 * qw);
  }
  be->ops->matmul(be, &g->o_proj, g->att, T, g->tmp);
  be->ops->add_rmsnorm(be, g->r, g->tmp, &g->post_norm, g->eps, T, H, g->h);
  const m3_matmul_out gate_up[] = {{&g->gate, g->g}, {&g->up, g->u}};
  be->ops->matmul_set(be, g->h, T, gate_up, 2);
  /* SiLU(gate) * up is SwiGLU-OAI with alpha 1, beta 0 and no clamp. */
  be->ops->swiglu_oai(be, g->g, g->u, (size_t)T * g->I, 1.0f, 0.0f, INFINITY, g->g);
  be->ops->matmul(be, &g->down, g->g, T, g->tmp);
  be->ops->add(be, g->r, g->tmp, TH);
  be->ops->copy(be, d->out, g->r, TH * sizeof(float));
  return M3_OK;
}

static void destroy(m3_drafter *d) {
  eagle3_drafter *g = (eagle3_drafter *)d;
  m3_backend *be = d->be;
  m3_tensor *prepared[] = {&g->fc, &g->q_proj, &g->k_proj, &g->v_proj, &g->o_proj, &g->gate,
                           &g->up, &g->down, &g->embed, &g->lm_head};
  for (size_t i = 0; i < sizeof prepared / sizeof prepared[0]; i++)
    if (m3_tensor_present(prepared[i]) && prepared[i]->name) be->ops->release_tensor(be, prepared[i]);
  m3_tensor *norms[] = {&g->input_norm, &g->hidden_norm, &g->post_norm, &g->final_norm};
  for (int i = 0; i < 4; i++)
    if (norms[i]->data) be->ops->free(be, (void *)norms[i]->data);
  float *bufs[] = {g->e, g->r, g->h, g->z, g->q, g->k, g->v, g->att, g->tmp, g->g, g->u};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    if (bufs[i]) be->ops->free(be, bufs[i]);
  m3_drafter_free_base(d);
  if (g->st) m3_st_close(g->st);
  free(g);
}

static const m3_drafter_ops eagle3_ops = {body, destroy};

/* ---- config.json ---- */

static m3_status get_int(const cJSON *root, const char *key, int def, int *out, const char *path) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
  if (!v || cJSON_IsNull(v)) {
    if (def < 0) return m3_fail(M3_ERR_CONFIG, "%s: missing key '%s'", path, key);
    *out = def;
    return M3_OK;
  }
  if (!cJSON_IsNumber(v) || v->valuedouble != (double)(int)v->valuedouble || v->valuedouble < 1)
    return m3_fail(M3_ERR_CONFIG, "%s: '%s' must be a positive integer", path, key);
  *out = (int)v->valuedouble;
  return M3_OK;
}

static m3_status get_num(const cJSON *root, const char *key, double def, double *out,
                         const char *path) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
  if (!v || cJSON_IsNull(v)) {
    *out = def;
    return M3_OK;
  }
  if (!cJSON_IsNumber(v) || !(v->valuedouble > 0))
    return m3_fail(M3_ERR_CONFIG, "%s: '%s' must be a positive number", path, key);
  *out = v->valuedouble;
  return M3_OK;
}

/* eagle_config.eagle_aux_hidden_state_layer_ids (or top level), else vLLM's default for the
 * target: (2, L / 2, L - 3). Each id is the residual stream entering that target layer. */
static m3_status aux_layers(const cJSON *root, int L, m3_drafter *d, const char *path) {
  const cJSON *ec = cJSON_GetObjectItemCaseSensitive(root, "eagle_config");
  const cJSON *ids = ec ? cJSON_GetObjectItemCaseSensitive(ec, "eagle_aux_hidden_state_layer_ids") : NULL;
  if (!ids) ids = cJSON_GetObjectItemCaseSensitive(root, "eagle_aux_hidden_state_layer_ids");
  const cJSON *use = ec ? cJSON_GetObjectItemCaseSensitive(ec, "use_aux_hidden_state") : NULL;
  if (use && !cJSON_IsTrue(use))
    return m3_fail(M3_ERR_UNSUPPORTED, "%s: eagle_config.use_aux_hidden_state false (EAGLE1-style "
                   "drafts) is not supported", path);
  int n = ids ? cJSON_GetArraySize(ids) : 3;
  if (ids && (!cJSON_IsArray(ids) || n < 1))
    return m3_fail(M3_ERR_CONFIG, "%s: eagle_aux_hidden_state_layer_ids must be a non-empty list", path);
  d->target_layers = malloc((size_t)n * sizeof *d->target_layers);
  if (!d->target_layers) return m3_fail(M3_ERR_NOMEM, "EAGLE3: layer list");
  d->n_target_layers = n;
  for (int i = 0; i < n; i++) {
    if (!ids) {
      d->target_layers[i] = i == 0 ? 2 : i == 1 ? L / 2 : L - 3;
      continue;
    }
    const cJSON *v = cJSON_GetArrayItem(ids, i);
    if (!cJSON_IsNumber(v) || v->valuedouble != (double)(int)v->valuedouble ||
        v->valuedouble < 0 || v->valuedouble >= L)
      return m3_fail(M3_ERR_CONFIG, "%s: eagle_aux_hidden_state_layer_ids[%d] is not a target "
                     "layer in 0..%d", path, i, L - 1);
    d->target_layers[i] = (int)v->valuedouble;
  }
  return M3_OK;
}

static m3_status parse_config(eagle3_drafter *g, const char *dir, const m3_config *tc) {
  char path[4096];
  snprintf(path, sizeof path, "%s/config.json", dir);
  FILE *f = fopen(path, "rb");
  if (!f) return m3_fail(M3_ERR_IO, "%s: cannot open", path);
  char *text = NULL;
  long len = -1;
  if (fseek(f, 0, SEEK_END) == 0 && (len = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0 &&
      (text = malloc((size_t)len + 1)) && fread(text, 1, (size_t)len, f) != (size_t)len)
    len = -1;
  fclose(f);
  if (!text || len < 0) {
    free(text);
    return m3_fail(M3_ERR_IO, "%s: cannot read", path);
  }
  cJSON *root = cJSON_ParseWithLength(text, (size_t)len);
  free(text);
  if (!cJSON_IsObject(root)) {
    cJSON_Delete(root);
    return m3_fail(M3_ERR_CONFIG, "%s: not a JSON object", path);
  }
  m3_drafter *d = &g->base;
  int layers = 0, vocab = 0, target_hidden = 0;
  double eps = 0, theta = 0;
  m3_status st = get_int(root, "hidden_size", -1, &d->H, path);
  if (st == M3_OK) st = get_int(root, "num_attention_heads", -1, &g->nh, path);
  if (st == M3_OK) st = get_int(root, "num_key_value_heads", g->nh, &g->nkv, path);
  if (st == M3_OK) st = get_int(root, "head_dim", d->H / g->nh, &g->hd, path);
  if (st == M3_OK) st = get_int(root, "intermediate_size", -1, &g->I, path);
  if (st == M3_OK) st = get_int(root, "num_hidden_layers", 1, &layers, path);
  if (st == M3_OK) st = get_int(root, "vocab_size", tc->vocab_size, &vocab, path);
  if (st == M3_OK) st = get_int(root, "draft_vocab_size", vocab, &d->vocab, path);
  if (st == M3_OK) st = get_int(root, "target_hidden_size", d->H, &target_hidden, path);
  if (st == M3_OK) st = get_num(root, "rms_norm_eps", 1e-6, &eps, path);
  if (st == M3_OK) st = get_num(root, "rope_theta", 10000.0, &theta, path);
  if (st == M3_OK) st = aux_layers(root, tc->num_layers, d, path);
  const cJSON *act = cJSON_GetObjectItemCaseSensitive(root, "hidden_act");
  const cJSON *scaling = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
  g->norm_before_residual = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "norm_before_residual"));
  if (st == M3_OK && layers != 1)
    st = m3_fail(M3_ERR_UNSUPPORTED, "%s: num_hidden_layers %d (m3 runs one-layer drafts)", path, layers);
  else if (st == M3_OK && vocab != tc->vocab_size)
    st = m3_fail(M3_ERR_CONFIG, "%s: vocab_size %d differs from the target's %d", path, vocab,
                 tc->vocab_size);
  else if (st == M3_OK && d->vocab > vocab)
    st = m3_fail(M3_ERR_CONFIG, "%s: draft_vocab_size %d exceeds vocab_size %d", path, d->vocab, vocab);
  else if (st == M3_OK && target_hidden != tc->hidden_size)
    st = m3_fail(M3_ERR_CONFIG, "%s: target_hidden_size %d differs from the target's %d", path,
                 target_hidden, tc->hidden_size);
  else if (st == M3_OK && act && !(cJSON_IsString(act) && strcmp(act->valuestring, "silu") == 0))
    st = m3_fail(M3_ERR_UNSUPPORTED, "%s: hidden_act must be \"silu\"", path);
  else if (st == M3_OK && scaling && !cJSON_IsNull(scaling))
    st = m3_fail(M3_ERR_UNSUPPORTED, "%s: rope_scaling is not supported (null only)", path);
  else if (st == M3_OK && g->hd % 2 != 0)
    st = m3_fail(M3_ERR_CONFIG, "%s: head_dim %d must be even", path, g->hd);
  else if (st == M3_OK && g->nh % g->nkv != 0)
    st = m3_fail(M3_ERR_CONFIG, "%s: num_attention_heads %d is not a multiple of "
                 "num_key_value_heads %d", path, g->nh, g->nkv);
  cJSON_Delete(root);
  g->eps = (float)eps;
  g->rope_theta = theta;
  d->head_eps = (float)eps;
  d->in_width = d->n_target_layers * tc->hidden_size;
  return st;
}

/* ---- weights ---- */

/* The tensor `stem` under the names vLLM accepts; M3_ERR_MISSING (silently) when absent. */
static const m3_st_tensor *find(const m3_safetensors *st, const char *stem) {
  char name[256];
  const char *alts[2] = {"", "model."};
  for (int a = 0; a < 2; a++) {
    snprintf(name, sizeof name, "%s%s", alts[a], stem);
    const m3_st_tensor *t = m3_st_find(st, name);
    if (t) return t;
    if (strncmp(stem, "layers.0.", 9) == 0) {
      snprintf(name, sizeof name, "%smidlayer.%s", alts[a], stem + 9);
      if ((t = m3_st_find(st, name))) return t;
    }
  }
  return NULL;
}

static m3_status bind(eagle3_drafter *g, m3_tensor *out, const char *stem, int64_t rows,
                      int64_t cols, int required) {
  const m3_st_tensor *t = find(g->st, stem);
  if (!t) return required ? m3_fail(M3_ERR_MISSING, "EAGLE3 draft: tensor %s missing", stem) : M3_OK;
  if (t->dtype != M3_DT_F32 && t->dtype != M3_DT_BF16 && t->dtype != M3_DT_F16)
    return m3_fail(M3_ERR_SHAPE, "%s: dtype must be F32, BF16 or F16", t->name);
  int64_t r = t->ndim == 1 ? 1 : t->shape[0], c = t->ndim == 1 ? t->shape[0] : t->shape[1];
  if (t->ndim < 1 || t->ndim > 2 || r != rows || c != cols)
    return m3_fail(M3_ERR_SHAPE, "%s: shape must be [%lld, %lld]", t->name, (long long)rows,
                   (long long)cols);
  *out = (m3_tensor){.name = t->name, .data = t->data, .dtype = t->dtype, .rows = rows,
                     .cols = cols, .quant = M3_WQ_NONE};
  return g->base.be->ops->prepare_tensor(g->base.be, out);
}

/* A Llama norm weight w as the Gemma-form w - 1 in float32 backend memory. */
static m3_status bind_norm(eagle3_drafter *g, m3_tensor *out, const char *stem) {
  m3_tensor raw;
  const int H = g->base.H;
  const m3_st_tensor *t = find(g->st, stem);
  if (!t) return m3_fail(M3_ERR_MISSING, "EAGLE3 draft: tensor %s missing", stem);
  if (t->dtype != M3_DT_F32 && t->dtype != M3_DT_BF16 && t->dtype != M3_DT_F16)
    return m3_fail(M3_ERR_SHAPE, "%s: dtype must be F32, BF16 or F16", t->name);
  if (t->ndim != 1 || t->shape[0] != H)
    return m3_fail(M3_ERR_SHAPE, "%s: shape must be [%d]", t->name, H);
  raw = (m3_tensor){.name = t->name, .data = t->data, .dtype = t->dtype, .rows = 1, .cols = H};
  float *host = malloc((size_t)H * sizeof(float));
  m3_backend *be = g->base.be;
  float *dev = be->ops->alloc(be, (size_t)H * sizeof(float));
  m3_status st = host && dev ? M3_OK : m3_fail(M3_ERR_NOMEM, "EAGLE3: norm %s", stem);
  if (st == M3_OK) {
    m3_tensor_row_f32(&raw, 0, host);
    for (int i = 0; i < H; i++) host[i] -= 1.0f;
    st = be->ops->to_device(be, dev, host, (size_t)H * sizeof(float));
  }
  free(host);
  if (st != M3_OK) {
    if (dev) be->ops->free(be, dev);
    return st;
  }
  *out = (m3_tensor){.name = t->name, .data = dev, .dtype = M3_DT_F32, .rows = 1, .cols = H};
  return M3_OK;
}

/* d2t [draft_vocab] int64 offsets: target id = draft id + d2t[draft id]. */
static m3_status bind_d2t(eagle3_drafter *g, int target_vocab) {
  m3_drafter *d = &g->base;
  const m3_st_tensor *t = m3_st_find(g->st, "d2t");
  if (!t) {
    if (d->vocab == target_vocab) return M3_OK;
    return m3_fail(M3_ERR_MISSING, "EAGLE3 draft: draft_vocab_size %d < vocab_size %d needs the "
                   "d2t tensor", d->vocab, target_vocab);
  }
  if (t->dtype != M3_DT_I64 || t->ndim != 1 || t->shape[0] != d->vocab)
    return m3_fail(M3_ERR_SHAPE, "d2t: must be I64 [%d]", d->vocab);
  if (!(d->d2t = malloc((size_t)d->vocab * sizeof *d->d2t)))
    return m3_fail(M3_ERR_NOMEM, "EAGLE3: d2t");
  for (int i = 0; i < d->vocab; i++) {
    int64_t off;
    memcpy(&off, (const uint8_t *)t->data + (size_t)i * 8, 8);
    if (off < -(int64_t)i || i + off >= target_vocab)
      return m3_fail(M3_ERR_SHAPE, "d2t[%d] = %lld maps outside the vocabulary of %d", i,
                     (long long)off, target_vocab);
    d->d2t[i] = (int32_t)(i + off);
  }
  return M3_OK;
}

static m3_status bind_all(eagle3_drafter *g, m3_model *target) {
  m3_drafter *d = &g->base;
  const m3_config *tc = m3_model_config(target);
  const int64_t H = d->H, qw = (int64_t)g->nh * g->hd, kvw = (int64_t)g->nkv * g->hd;
  m3_status st = M3_OK;
  if ((st = bind(g, &g->fc, "fc.weight", H, d->in_width, 1)) != M3_OK ||
      (st = bind(g, &g->q_proj, "layers.0.self_attn.q_proj.weight", qw, 2 * H, 1)) != M3_OK ||
      (st = bind(g, &g->k_proj, "layers.0.self_attn.k_proj.weight", kvw, 2 * H, 1)) != M3_OK ||
      (st = bind(g, &g->v_proj, "layers.0.self_attn.v_proj.weight", kvw, 2 * H, 1)) != M3_OK ||
      (st = bind(g, &g->o_proj, "layers.0.self_attn.o_proj.weight", H, qw, 1)) != M3_OK ||
      (st = bind(g, &g->gate, "layers.0.mlp.gate_proj.weight", g->I, H, 1)) != M3_OK ||
      (st = bind(g, &g->up, "layers.0.mlp.up_proj.weight", g->I, H, 1)) != M3_OK ||
      (st = bind(g, &g->down, "layers.0.mlp.down_proj.weight", H, g->I, 1)) != M3_OK ||
      (st = bind_norm(g, &g->input_norm, "layers.0.input_layernorm.weight")) != M3_OK ||
      (st = bind_norm(g, &g->hidden_norm, "layers.0.hidden_norm.weight")) != M3_OK ||
      (st = bind_norm(g, &g->post_norm, "layers.0.post_attention_layernorm.weight")) != M3_OK ||
      (st = bind_norm(g, &g->final_norm, "norm.weight")) != M3_OK ||
      (st = bind(g, &g->embed, "embed_tokens.weight", tc->vocab_size, H, 0)) != M3_OK ||
      (st = bind(g, &g->lm_head, "lm_head.weight", d->vocab, H, 0)) != M3_OK ||
      (st = bind_d2t(g, tc->vocab_size)) != M3_OK)
    return st;
  /* Without its own tables the draft shares the target's (the published M3 draft does). */
  if ((!m3_tensor_present(&g->embed) || !m3_tensor_present(&g->lm_head)) && H != tc->hidden_size)
    return m3_fail(M3_ERR_SHAPE, "EAGLE3 draft: hidden_size %lld differs from the target's %d, "
                   "so it needs its own embed_tokens and lm_head", (long long)H, tc->hidden_size);
  if (!m3_tensor_present(&g->lm_head) && d->vocab != tc->vocab_size)
    return m3_fail(M3_ERR_MISSING, "EAGLE3 draft: lm_head.weight missing with draft_vocab_size "
                   "%d (the target's head covers %d)", d->vocab, tc->vocab_size);
  g->embed_table = m3_tensor_present(&g->embed) ? &g->embed : &target->w.embed;
  d->lm_head = m3_tensor_present(&g->lm_head) ? &g->lm_head : &target->w.lm_head;
  d->head_norm = &g->final_norm;
  return M3_OK;
}

static m3_status alloc_body(eagle3_drafter *g) {
  m3_backend *be = g->base.be;
  const size_t S = M3_MODEL_STEP_TOKENS, H = (size_t)g->base.H;
  const size_t qw = (size_t)g->nh * g->hd, kvw = (size_t)g->nkv * g->hd, I = (size_t)g->I;
  struct {
    float **p;
    size_t floats;
  } bufs[] = {{&g->e, S * H},   {&g->r, S * H},    {&g->h, S * H},   {&g->z, S * 2 * H},
              {&g->q, S * qw},  {&g->k, S * kvw},  {&g->v, S * kvw}, {&g->att, S * qw},
              {&g->tmp, S * H}, {&g->g, S * I},    {&g->u, S * I}};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    if (!(*bufs[i].p = be->ops->alloc(be, bufs[i].floats * sizeof(float))))
      return m3_fail(M3_ERR_NOMEM, "EAGLE3: step buffers");
  return M3_OK;
}

m3_status m3_drafter_eagle3_load(const char *dir, m3_model *target, m3_drafter **out) {
  *out = NULL;
  eagle3_drafter *g = calloc(1, sizeof *g);
  if (!g) return m3_fail(M3_ERR_NOMEM, "EAGLE3: out of memory");
  m3_drafter *d = &g->base;
  d->ops = &eagle3_ops;
  d->be = m3_model_backend(target);
  d->target = target;
  const m3_config *tc = m3_model_config(target);
  m3_status st = parse_config(g, dir, tc);
  if (st == M3_OK) st = m3_st_open_dir(dir, &g->st);
  if (st == M3_OK) st = bind_all(g, target);
  if (st == M3_OK) st = m3_drafter_cache_layers(d, 1, M3_ATTN_FULL, M3_MLP_DENSE);
  if (st == M3_OK) {
    d->cache_cfg.num_heads = g->nh;
    d->cache_cfg.num_kv_heads = g->nkv;
    d->cache_cfg.head_dim = g->hd;
    st = m3_drafter_alloc_steps(d);
  }
  if (st == M3_OK) st = alloc_body(g);
  if (st != M3_OK) {
    destroy(d);
    return st;
  }
  *out = d;
  return M3_OK;
}
