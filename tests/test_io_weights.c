/* test_io_weights: m3_weights_bind over small checkpoints written here with the safetensors
 * writer, in every accepted naming variant, with MXFP8 and FP8-block rows decoded against values
 * computed in this file from the format definitions, and every error naming its tensor. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "io/weights.h"

/* Text: H 40 (two MXFP8 blocks of 32, the second short), 2 heads x 4, 1 KV head, 1 index head.
 * Layer 0 full attention + dense MLP, layer 1 sparse attention + MoE (2 experts, 1 shared).
 * Vision: D 4, 1 layer, 3 channels, patch 2, temporal 2, merge 2, projector width 6. */
enum {
  H = 40,
  NH = 2,
  NKV = 1,
  HD = 4,
  VOCAB = 16,
  I = 4,
  SI = 4,
  DI = 6,
  E = 2,
  NIH = 1,
  IHD = 4
};
enum { VD = 4, VI = 8, VC = 3, VP = 2, VT = 2, VM = 2, P = 6 };

/* ---- config ---- */

typedef struct {
  int vl; /* VL wrapper with a vision_config, else a bare text config */
  int tie;
  const char *quant; /* a quantization_config object, or NULL */
} config_opts;

static m3_status make_config(const config_opts *o, m3_config *cfg) {
  char text[2048], json[4096];
  snprintf(
      text, sizeof text,
      "\"hidden_size\": %d, \"num_hidden_layers\": 2, \"num_attention_heads\": %d,"
      " \"num_key_value_heads\": %d, \"head_dim\": %d, \"vocab_size\": %d,"
      " \"max_position_embeddings\": 1024, \"rms_norm_eps\": 1e-6, \"rope_theta\": 5000000,"
      " \"rotary_dim\": 2, \"partial_rotary_factor\": 0.5, \"hidden_act\": \"swigluoai\","
      " \"swiglu_alpha\": 1.702, \"swiglu_beta\": 1.0, \"swiglu_limit\": 7.0,"
      " \"use_qk_norm\": true, \"qk_norm_type\": \"per_head\", \"use_gemma_norm\": true,"
      " \"intermediate_size\": %d, \"shared_intermediate_size\": %d, \"dense_intermediate_size\": "
      "%d,"
      " \"num_local_experts\": %d, \"num_experts_per_tok\": 1, \"n_shared_experts\": 1,"
      " \"scoring_func\": \"sigmoid\", \"use_routing_bias\": true, \"routed_scaling_factor\": 2.0,"
      " \"num_mtp_modules\": 1, \"tie_word_embeddings\": %s, \"bos_token_id\": 1, "
      "\"eos_token_id\": 2,"
      " \"moe_layer_freq\": [0, 1],"
      " \"sparse_attention_config\": {\"use_sparse_attention\": true, \"sparse_attention_freq\": "
      "[0, 1],"
      " \"sparse_num_index_heads\": %d, \"sparse_index_dim\": %d, \"sparse_block_size\": 128,"
      " \"sparse_topk_blocks\": 16, \"sparse_local_block\": 1, \"sparse_init_block\": 0,"
      " \"sparse_score_type\": \"max\", \"sparse_disable_index_value\": [0, 1]}",
      H, NH, NKV, HD, VOCAB, I, SI, DI, E, o->tie ? "true" : "false", NIH, IHD);
  char quant[512] = "";
  if (o->quant) snprintf(quant, sizeof quant, ", \"quantization_config\": %s", o->quant);
  if (o->vl) {
    snprintf(json, sizeof json,
             "{\"architectures\": [\"MiniMaxM3SparseForConditionalGeneration\"], \"model_type\": "
             "\"minimax_m3_vl\","
             " \"image_token_index\": 10, \"video_token_index\": 11, \"projector_hidden_size\": %d,"
             " \"tie_word_embeddings\": %s%s,"
             " \"text_config\": {\"model_type\": \"minimax_m3_vl_text\", %s},"
             " \"vision_config\": {\"model_type\": \"clip_vision_model\", \"hidden_size\": %d,"
             " \"num_attention_heads\": 2, \"num_hidden_layers\": 1, \"intermediate_size\": %d,"
             " \"num_channels\": %d, \"patch_size\": %d, \"temporal_patch_size\": %d,"
             " \"spatial_merge_size\": %d, \"layer_norm_eps\": 1e-5, \"rope_theta\": 10000.0,"
             " \"vision_segment_max_frames\": 4, \"img_token_compression_config\":"
             " {\"image_token_compression_method\": \"patch_merge\", \"spatial_merge_size\": %d,"
             " \"temporal_patch_size\": %d}}}",
             P, o->tie ? "true" : "false", quant, text, VD, VI, VC, VP, VT, VM, VM, VT);
  } else {
    snprintf(json, sizeof json,
             "{\"architectures\": [\"MiniMaxM3SparseForCausalLM\"], \"model_type\": "
             "\"minimax_m3_vl_text\", %s%s}",
             text, quant);
  }
  return m3_config_parse(json, strlen(json), "test config.json", cfg);
}

/* ---- checkpoint plan: names, dtypes, shapes; data generated from the name ---- */

typedef struct {
  char name[192];
  m3_dtype dt;
  int ndim;
  int64_t shape[5];
  int removed;
} entry;

typedef struct {
  entry e[256];
  int n;
} plan;

static entry *plan_add(plan *p, m3_dtype dt, int ndim, const int64_t *shape, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static entry *plan_add(plan *p, m3_dtype dt, int ndim, const int64_t *shape, const char *fmt, ...) {
  entry *x = &p->e[p->n++];
  memset(x, 0, sizeof *x);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(x->name, sizeof x->name, fmt, ap);
  va_end(ap);
  x->dt = dt;
  x->ndim = ndim;
  memcpy(x->shape, shape, (size_t)ndim * sizeof *shape);
  return x;
}

#define VEC(n) \
  1, (const int64_t[]) { n }
#define MAT(r, c) \
  2, (const int64_t[]) { r, c }

static entry *plan_find(plan *p, const char *name) {
  for (int i = 0; i < p->n; i++)
    if (!p->e[i].removed && strcmp(p->e[i].name, name) == 0) return &p->e[i];
  fprintf(stderr, "test bug: no tensor %s in the plan\n", name);
  abort();
}

typedef struct {
  const char *prefix;  /* "language_model." or "" */
  int dense_in_moe;    /* dense MLP spelled block_sparse_moe.{gate,up,down}_proj */
  int bias_under_gate; /* block_sparse_moe.gate.e_score_correction_bias */
  int lm_head;
  int mtp; /* MTP modules */
  int vision;
  int vision_moe_fc; /* vision MLP spelled block_sparse_moe.fc{1,2} */
} layout;

static void add_attention(plan *p, const char *base, int sparse) {
  plan_add(p, M3_DT_BF16, VEC(H), "%sinput_layernorm.weight", base);
  plan_add(p, M3_DT_BF16, VEC(H), "%spost_attention_layernorm.weight", base);
  plan_add(p, M3_DT_BF16, MAT(NH * HD, H), "%sself_attn.q_proj.weight", base);
  plan_add(p, M3_DT_BF16, MAT(NKV * HD, H), "%sself_attn.k_proj.weight", base);
  plan_add(p, M3_DT_BF16, MAT(NKV * HD, H), "%sself_attn.v_proj.weight", base);
  plan_add(p, M3_DT_BF16, MAT(H, NH * HD), "%sself_attn.o_proj.weight", base);
  plan_add(p, M3_DT_BF16, VEC(HD), "%sself_attn.q_norm.weight", base);
  plan_add(p, M3_DT_BF16, VEC(HD), "%sself_attn.k_norm.weight", base);
  if (!sparse) return;
  plan_add(p, M3_DT_BF16, MAT(NIH * IHD, H), "%sself_attn.index_q_proj.weight", base);
  plan_add(p, M3_DT_BF16, MAT(IHD, H), "%sself_attn.index_k_proj.weight", base);
  plan_add(p, M3_DT_BF16, VEC(IHD), "%sself_attn.index_q_norm.weight", base);
  plan_add(p, M3_DT_BF16, VEC(IHD), "%sself_attn.index_k_norm.weight", base);
}

static void add_moe(plan *p, const char *base, const layout *l) {
  plan_add(p, M3_DT_F32, MAT(E, H), "%sblock_sparse_moe.gate.weight", base);
  plan_add(p, M3_DT_F32, VEC(E), "%sblock_sparse_moe.%se_score_correction_bias", base,
           l->bias_under_gate ? "gate." : "");
  for (int e = 0; e < E; e++) {
    plan_add(p, M3_DT_BF16, MAT(I, H), "%sblock_sparse_moe.experts.%d.w1.weight", base, e);
    plan_add(p, M3_DT_BF16, MAT(H, I), "%sblock_sparse_moe.experts.%d.w2.weight", base, e);
    plan_add(p, M3_DT_BF16, MAT(I, H), "%sblock_sparse_moe.experts.%d.w3.weight", base, e);
  }
  plan_add(p, M3_DT_BF16, MAT(SI, H), "%sblock_sparse_moe.shared_experts.gate_proj.weight", base);
  plan_add(p, M3_DT_BF16, MAT(SI, H), "%sblock_sparse_moe.shared_experts.up_proj.weight", base);
  plan_add(p, M3_DT_BF16, MAT(H, SI), "%sblock_sparse_moe.shared_experts.down_proj.weight", base);
}

static void add_vision(plan *p, const layout *l) {
  const char *t = "vision_tower.vision_model.";
  plan_add(p, M3_DT_F32, 5, (const int64_t[]){VD, VC, VT, VP, VP},
           "%sembeddings.patch_embedding.weight", t);
  plan_add(p, M3_DT_BF16, VEC(VD), "%spre_layrnorm.weight", t);
  plan_add(p, M3_DT_BF16, VEC(VD), "%spre_layrnorm.bias", t);
  const char *base = "vision_tower.vision_model.encoder.layers.0.";
  const char *mlp = l->vision_moe_fc ? "block_sparse_moe" : "mlp";
  for (int n = 1; n <= 2; n++) {
    plan_add(p, M3_DT_BF16, VEC(VD), "%slayer_norm%d.weight", base, n);
    plan_add(p, M3_DT_BF16, VEC(VD), "%slayer_norm%d.bias", base, n);
  }
  static const char *const proj[] = {"q", "k", "v", "out"};
  for (int i = 0; i < 4; i++) {
    plan_add(p, M3_DT_BF16, MAT(VD, VD), "%sself_attn.%s_proj.weight", base, proj[i]);
    plan_add(p, M3_DT_BF16, VEC(VD), "%sself_attn.%s_proj.bias", base, proj[i]);
  }
  plan_add(p, M3_DT_BF16, MAT(VI, VD), "%s%s.fc1.weight", base, mlp);
  plan_add(p, M3_DT_BF16, VEC(VI), "%s%s.fc1.bias", base, mlp);
  plan_add(p, M3_DT_BF16, MAT(VD, VI), "%s%s.fc2.weight", base, mlp);
  plan_add(p, M3_DT_BF16, VEC(VD), "%s%s.fc2.bias", base, mlp);
  plan_add(p, M3_DT_BF16, MAT(P, VD), "multi_modal_projector.linear_1.weight");
  plan_add(p, M3_DT_BF16, VEC(P), "multi_modal_projector.linear_1.bias");
  plan_add(p, M3_DT_BF16, MAT(H, P), "multi_modal_projector.linear_2.weight");
  plan_add(p, M3_DT_BF16, VEC(H), "multi_modal_projector.linear_2.bias");
  plan_add(p, M3_DT_BF16, MAT(P, VM * VM * H), "patch_merge_mlp.linear_1.weight");
  plan_add(p, M3_DT_BF16, VEC(P), "patch_merge_mlp.linear_1.bias");
  plan_add(p, M3_DT_BF16, MAT(H, P), "patch_merge_mlp.linear_2.weight");
  plan_add(p, M3_DT_BF16, VEC(H), "patch_merge_mlp.linear_2.bias");
}

static void build(plan *p, const layout *l) {
  p->n = 0;
  const char *px = l->prefix;
  char base[128];
  plan_add(p, M3_DT_BF16, MAT(VOCAB, H), "%smodel.embed_tokens.weight", px);
  plan_add(p, M3_DT_BF16, VEC(H), "%smodel.norm.weight", px);
  if (l->lm_head) plan_add(p, M3_DT_BF16, MAT(VOCAB, H), "%slm_head.weight", px);
  snprintf(base, sizeof base, "%smodel.layers.0.", px);
  add_attention(p, base, 0);
  const char *dense = l->dense_in_moe ? "block_sparse_moe" : "mlp";
  plan_add(p, M3_DT_BF16, MAT(DI, H), "%s%s.gate_proj.weight", base, dense);
  plan_add(p, M3_DT_BF16, MAT(DI, H), "%s%s.up_proj.weight", base, dense);
  plan_add(p, M3_DT_BF16, MAT(H, DI), "%s%s.down_proj.weight", base, dense);
  snprintf(base, sizeof base, "%smodel.layers.1.", px);
  add_attention(p, base, 1);
  add_moe(p, base, l);
  for (int m = 0; m < l->mtp; m++) {
    snprintf(base, sizeof base, "%smodel.mtp.layers.%d.", px, m);
    plan_add(p, M3_DT_BF16, VEC(H), "%senorm.weight", base);
    plan_add(p, M3_DT_BF16, VEC(H), "%shnorm.weight", base);
    plan_add(p, M3_DT_BF16, MAT(H, 2 * H), "%seh_proj.weight", base);
    plan_add(p, M3_DT_BF16, VEC(H), "%sfinal_layernorm.weight", base);
    snprintf(base, sizeof base, "%smodel.mtp.layers.%d.transformer_layer.", px, m);
    add_attention(p, base, 1);
    add_moe(p, base, l);
  }
  if (l->vision) add_vision(p, l);
}

/* The official VL layout (spec §9.1): prefixed, mlp.*, bias at block level, lm_head, one MTP. */
static const layout official = {.prefix = "language_model.", .lm_head = 1, .mtp = 1, .vision = 1};

/* Deterministic bytes of a tensor: a hash of its name and the byte index. */
static uint8_t gen_byte(const char *name, size_t i) {
  uint64_t h = 1469598103934665603ull;
  for (const char *s = name; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
  h ^= (uint64_t)i * 0x9e3779b97f4a7c15ull;
  h ^= h >> 29;
  h *= 0xbf58476d1ce4e5b9ull;
  return (uint8_t)(h >> 40);
}

/* Element k of tensor `name`, as the writer stores it (little-endian) and as the test expects
 * it: finite bf16 near [-4, 4], e4m3 without the NaN code, e8m0 scales 2^-17..2^12, f32 scales
 * in [0.25, 4). */
static uint16_t gen_bf16(const char *name, size_t k) {
  uint16_t exp = (uint16_t)(124 + gen_byte(name, 2 * k) % 6);
  return (uint16_t)((gen_byte(name, 2 * k + 1) & 0x80u) << 8 | exp << 7 |
                    (gen_byte(name, 2 * k + 1) & 0x7fu));
}
static uint8_t gen_e4m3(const char *name, size_t k) {
  uint8_t v = gen_byte(name, k);
  return (v & 0x7f) == 0x7f ? (uint8_t)(v ^ 1) : v;
}
static uint8_t gen_e8m0(const char *name, size_t k) {
  return (uint8_t)(110 + gen_byte(name, k) % 30);
}
static float gen_scale_f32(const char *name, size_t k) {
  return 0.25f + (float)(gen_byte(name, k) % 240) / 64.0f;
}
static float gen_f32(const char *name, size_t k) {
  return (float)(gen_byte(name, k) % 200) / 50.0f - 2.0f;
}

static m3_status write_plan(const plan *p, const char *path) {
  m3_st_writer *w = m3_st_writer_new();
  m3_status s = w ? M3_OK : M3_ERR_NOMEM;
  for (int i = 0; i < p->n && s == M3_OK; i++) {
    const entry *x = &p->e[i];
    if (x->removed) continue;
    size_t n = 1;
    for (int d = 0; d < x->ndim; d++) n *= (size_t)x->shape[d];
    uint8_t *data = calloc(n * 8 + 1, 1);
    for (size_t k = 0; k < n; k++) {
      switch (x->dt) {
        case M3_DT_BF16: {
          uint16_t h = gen_bf16(x->name, k);
          memcpy(data + 2 * k, &h, 2);
          break;
        }
        case M3_DT_F32: {
          int is_scale = strstr(x->name, "_scale") != NULL; /* _scale_inv and _scale */
          float f = is_scale ? gen_scale_f32(x->name, k) : gen_f32(x->name, k);
          memcpy(data + 4 * k, &f, 4);
          break;
        }
        case M3_DT_F8_E4M3: data[k] = gen_e4m3(x->name, k); break;
        case M3_DT_U8: data[k] = gen_e8m0(x->name, k); break;
        default: memset(data + k * m3_dtype_size(x->dt), 0x11, m3_dtype_size(x->dt)); break;
      }
    }
    s = m3_st_writer_add(w, x->name, x->dt, x->ndim, x->shape, data);
    free(data);
  }
  if (s == M3_OK) s = m3_st_writer_write(w, path);
  m3_st_writer_free(w);
  return s;
}

/* Makes `name` F8_E4M3 and adds its scale: MXFP8 (U8 [N, ceil(K/32)]) when br == 0, else FP8
 * block (F32 [ceil(N/br), ceil(K/bc)]). */
static void quantize(plan *p, const char *name, int br, int bc) {
  entry *x = plan_find(p, name);
  x->dt = M3_DT_F8_E4M3;
  int64_t n = x->shape[0], k = x->shape[1];
  if (br == 0)
    plan_add(p, M3_DT_U8, MAT(n, (k + 31) / 32), "%s_scale_inv", name);
  else
    plan_add(p, M3_DT_F32, MAT((n + br - 1) / br, (k + bc - 1) / bc), "%s_scale_inv", name);
}

/* Makes `name` F8_E4M3 with a per-channel (or per-tensor) `<name>_scale` of dtype dt and the
 * given shape. */
static void quantize_channel(plan *p, const char *name, m3_dtype dt, int ndim, const int64_t *shape) {
  plan_find(p, name)->dt = M3_DT_F8_E4M3;
  plan_add(p, dt, ndim, shape, "%s_scale", name);
}

/* ---- running a case ---- */

static char tmp_dir[64];
static char st_path[128];
static m3_config cfg;
static m3_safetensors *st;
static m3_weights w;

static void release(void) {
  m3_weights_free(&w);
  if (st) m3_st_close(st);
  st = NULL;
  m3_config_free(&cfg);
  memset(&cfg, 0, sizeof cfg);
}

/* Writes the plan, parses the config, opens the file and binds: returns the bind status (setup
 * failures are reported as test failures and return M3_ERR_IO). Call release() afterwards. */
static m3_status bind_case(const plan *p, const config_opts *co) {
  m3_status s = write_plan(p, st_path);
  CHECK_OK(s);
  if (s != M3_OK) return M3_ERR_IO;
  s = make_config(co, &cfg);
  CHECK_OK(s);
  if (s != M3_OK) return M3_ERR_IO;
  s = m3_st_open_file(st_path, &st);
  CHECK_OK(s);
  if (s != M3_OK) return M3_ERR_IO;
  m3_clear_error();
  return m3_weights_bind(&cfg, st, &w);
}

/* For the cases that must bind: reports a failure and tells the caller to stop looking. */
static int bind_ok(const plan *p, const config_opts *co) {
  m3_status s = bind_case(p, co);
  CHECK_OK(s);
  if (s != M3_OK) release();
  return s == M3_OK;
}

static const config_opts vl = {.vl = 1};

/* The tensor is the one the checkpoint holds under `name`, viewed in place. */
static void check_view(const m3_tensor *t, const char *name) {
  const m3_st_tensor *x = m3_st_find(st, name);
  CHECK(x != NULL);
  CHECK_STR(t->name, name);
  CHECK(x && t->data == x->data);
}

/* ---- independent decoders (format definitions, ldexp) ---- */

static double ref_e4m3(uint8_t v) {
  int exp = (v >> 3) & 15, man = v & 7;
  double mag = exp == 0 ? ldexp(man, -9) : ldexp(8 + man, exp - 10);
  return (v & 0x80) ? -mag : mag;
}

static double ref_bf16(uint16_t h) {
  int exp = (h >> 7) & 0xff, man = h & 0x7f; /* gen_bf16 makes normal numbers only */
  double mag = ldexp(128 + man, exp - 134);
  return (h & 0x8000) ? -mag : mag;
}

/* ---- cases ---- */

static void test_official_layout(void) {
  plan p;
  build(&p, &official);
  if (!bind_ok(&p, &vl)) return;
  CHECK_STR(w.prefix, "language_model.");
  check_view(&w.embed, "language_model.model.embed_tokens.weight");
  check_view(&w.final_norm, "language_model.model.norm.weight");
  check_view(&w.lm_head, "language_model.lm_head.weight");
  CHECK_EQ_INT(w.lm_head_tied, 0);
  CHECK(w.lm_head.data != w.embed.data);
  CHECK_EQ_INT(w.embed.rows, VOCAB);
  CHECK_EQ_INT(w.embed.cols, H);
  CHECK_EQ_INT(w.final_norm.rows, 1);
  CHECK_EQ_INT(w.final_norm.cols, H);

  const m3_layer_weights *l0 = &w.layers[0], *l1 = &w.layers[1];
  check_view(&l0->mlp_gate, "language_model.model.layers.0.mlp.gate_proj.weight");
  check_view(&l0->mlp_up, "language_model.model.layers.0.mlp.up_proj.weight");
  check_view(&l0->mlp_down, "language_model.model.layers.0.mlp.down_proj.weight");
  CHECK_EQ_INT(l0->mlp_down.rows, H);
  CHECK_EQ_INT(l0->mlp_down.cols, DI);
  CHECK(!m3_tensor_present(&l0->index_q_proj) && !m3_tensor_present(&l0->router));
  CHECK(l0->expert_gate == NULL);
  check_view(&l0->q_norm, "language_model.model.layers.0.self_attn.q_norm.weight");
  check_view(&l1->index_k_proj, "language_model.model.layers.1.self_attn.index_k_proj.weight");
  CHECK_EQ_INT(l1->index_k_proj.rows, IHD);
  check_view(&l1->index_q_norm, "language_model.model.layers.1.self_attn.index_q_norm.weight");
  check_view(&l1->router, "language_model.model.layers.1.block_sparse_moe.gate.weight");
  CHECK_EQ_INT(l1->router.dtype, M3_DT_F32);
  check_view(&l1->router_bias,
             "language_model.model.layers.1.block_sparse_moe.e_score_correction_bias");
  /* w1 = gate, w3 = up, w2 = down (spec §6). */
  check_view(&l1->expert_gate[1],
             "language_model.model.layers.1.block_sparse_moe.experts.1.w1.weight");
  check_view(&l1->expert_up[1],
             "language_model.model.layers.1.block_sparse_moe.experts.1.w3.weight");
  check_view(&l1->expert_down[0],
             "language_model.model.layers.1.block_sparse_moe.experts.0.w2.weight");
  CHECK_EQ_INT(l1->expert_down[0].rows, H);
  CHECK_EQ_INT(l1->expert_down[0].cols, I);
  check_view(&l1->shared_down,
             "language_model.model.layers.1.block_sparse_moe.shared_experts.down_proj.weight");
  CHECK(!m3_tensor_present(&l1->mlp_gate));

  CHECK_EQ_INT(w.num_mtp, 1);
  if (w.num_mtp == 1) {
    check_view(&w.mtp[0].eh_proj, "language_model.model.mtp.layers.0.eh_proj.weight");
    CHECK_EQ_INT(w.mtp[0].eh_proj.cols, 2 * H);
    check_view(&w.mtp[0].final_norm, "language_model.model.mtp.layers.0.final_layernorm.weight");
    check_view(&w.mtp[0].layer.index_k_norm,
               "language_model.model.mtp.layers.0.transformer_layer.self_attn.index_k_norm.weight");
    check_view(
        &w.mtp[0].layer.expert_up[0],
        "language_model.model.mtp.layers.0.transformer_layer.block_sparse_moe.experts.0.w3.weight");
  }

  CHECK_EQ_INT(w.vision.present, 1);
  check_view(&w.vision.patch_embed, "vision_tower.vision_model.embeddings.patch_embedding.weight");
  CHECK_EQ_INT(w.vision.patch_embed.rows, VD);
  CHECK_EQ_INT(w.vision.patch_embed.cols, VC * VT * VP * VP);
  check_view(&w.vision.pre_ln_b, "vision_tower.vision_model.pre_layrnorm.bias");
  if (w.vision.layers) {
    check_view(&w.vision.layers[0].out_b,
               "vision_tower.vision_model.encoder.layers.0.self_attn.out_proj.bias");
    check_view(&w.vision.layers[0].fc1_w,
               "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight");
    check_view(&w.vision.layers[0].fc2_b,
               "vision_tower.vision_model.encoder.layers.0.mlp.fc2.bias");
  }
  check_view(&w.vision.proj2_w, "multi_modal_projector.linear_2.weight");
  CHECK_EQ_INT(w.vision.proj2_w.rows, H);
  CHECK_EQ_INT(w.vision.proj2_w.cols, P);
  check_view(&w.vision.merge1_w, "patch_merge_mlp.linear_1.weight");
  CHECK_EQ_INT(w.vision.merge1_w.cols, VM * VM * H);
  CHECK_EQ_INT(w.num_quantized, 0);

  /* Plain rows decode to the stored values: bf16 row 3 of the embedding, f32 router row 1. */
  float row[H];
  m3_tensor_row_f32(&w.embed, 3, row);
  int bad = 0;
  for (int c = 0; c < H; c++)
    if (row[c] != (float)ref_bf16(gen_bf16("language_model.model.embed_tokens.weight", 3 * H + c)))
      bad++;
  CHECK_EQ_INT(bad, 0);
  m3_tensor_row_f32(&l1->router, 1, row);
  bad = 0;
  for (int c = 0; c < H; c++)
    if (row[c] != gen_f32("language_model.model.layers.1.block_sparse_moe.gate.weight", H + c))
      bad++;
  CHECK_EQ_INT(bad, 0);
  release();
}

static void test_resaved_layout(void) {
  /* transformers 5.17 re-save spellings, no prefix, bias under the gate, no lm_head, no MTP. */
  layout l = {
      .prefix = "", .dense_in_moe = 1, .bias_under_gate = 1, .vision = 1, .vision_moe_fc = 1};
  plan p;
  build(&p, &l);
  if (!bind_ok(&p, &vl)) return;
  CHECK_STR(w.prefix, "");
  check_view(&w.embed, "model.embed_tokens.weight");
  check_view(&w.layers[0].mlp_up, "model.layers.0.block_sparse_moe.up_proj.weight");
  check_view(&w.layers[1].router_bias,
             "model.layers.1.block_sparse_moe.gate.e_score_correction_bias");
  CHECK(w.vision.layers != NULL);
  if (w.vision.layers)
    check_view(&w.vision.layers[0].fc2_w,
               "vision_tower.vision_model.encoder.layers.0.block_sparse_moe.fc2.weight");
  /* No lm_head in the file: the embedding serves as the head. */
  CHECK_EQ_INT(w.lm_head_tied, 1);
  CHECK(w.lm_head.data == w.embed.data);
  CHECK_EQ_INT(w.num_mtp, 0);
  CHECK(w.mtp == NULL);
  release();
}

static void test_tied_and_text_only(void) {
  plan p;
  /* A tying config uses the embedding even though the file has an lm_head (as transformers'
   * tie_weights does); the lm_head is accepted, not reported. */
  build(&p, &official);
  config_opts tied = {.vl = 1, .tie = 1};
  if (!bind_ok(&p, &tied)) return;
  CHECK_EQ_INT(w.lm_head_tied, 1);
  CHECK(w.lm_head.data == w.embed.data);
  release();

  /* Text-only config, text-only checkpoint. */
  layout text = {.prefix = "", .lm_head = 1};
  build(&p, &text);
  config_opts bare = {0};
  if (!bind_ok(&p, &bare)) return;
  CHECK_EQ_INT(w.vision.present, 0);
  CHECK_EQ_INT(w.num_mtp, 0);
  release();

  /* VL config over a checkpoint without vision tensors: text binds, vision stays absent. */
  if (!bind_ok(&p, &vl)) return;
  CHECK_EQ_INT(w.vision.present, 0);
  release();

  /* Text-only config with vision tensors: they are not part of the model. */
  text.vision = 1;
  build(&p, &text);
  CHECK_FAILS_WITH(bind_case(&p, &bare), M3_ERR_UNEXPECTED, "unexpected tensor ");
  const char *msg = m3_last_error();
  CHECK(strstr(msg, "tensor vision_tower.") || strstr(msg, "tensor multi_modal_projector.") ||
        strstr(msg, "tensor patch_merge_mlp."));
  release();
}

/* Every row of t equals the e4m3 bytes of `name` times their scale, computed here. */
static int count_bad_rows(const m3_tensor *t, const char *name, int br, int bc) {
  char scale_name[256];
  snprintf(scale_name, sizeof scale_name, "%s_scale_inv", name);
  int64_t scale_cols = br == 0 ? (t->cols + 31) / 32 : (t->cols + bc - 1) / bc;
  float *row = malloc((size_t)t->cols * sizeof *row);
  int bad = 0;
  for (int64_t r = 0; r < t->rows; r++) {
    m3_tensor_row_f32(t, r, row);
    for (int64_t c = 0; c < t->cols; c++) {
      double q = ref_e4m3(gen_e4m3(name, (size_t)(r * t->cols + c)));
      float want;
      if (br == 0) {
        want = (float)ldexp(q, gen_e8m0(scale_name, (size_t)(r * scale_cols + c / 32)) - 127);
      } else {
        float s = gen_scale_f32(scale_name, (size_t)((r / br) * scale_cols + c / bc));
        want = (float)q * s; /* the f32 product, as a dequantizing GEMM forms it */
      }
      if (row[c] != want && bad++ == 0)
        fprintf(stderr, "%s[%lld][%lld]: %.9g vs %.9g\n", name, (long long)r, (long long)c, row[c],
                want);
    }
  }
  free(row);
  return bad;
}

static void test_mxfp8(void) {
  plan p;
  build(&p, &official);
  const char *q = "language_model.model.layers.1.self_attn.q_proj.weight";
  const char *down = "language_model.model.layers.1.block_sparse_moe.experts.1.w2.weight";
  const char *eh = "language_model.model.mtp.layers.0.eh_proj.weight";
  quantize(&p, q, 0, 0);
  quantize(&p, down, 0, 0);
  quantize(&p, eh, 0, 0);
  config_opts mx = {.vl = 1,
                    .quant =
                        "{\"quant_method\": \"mxfp8\", \"activation_scheme\": \"dynamic\","
                        " \"weight_block_size\": [1, 32]}"};
  if (!bind_ok(&p, &mx)) return;
  CHECK_EQ_INT(w.num_quantized, 3);
  const m3_tensor *tq = &w.layers[1].q_proj;
  CHECK_EQ_INT(tq->quant, M3_WQ_MXFP8);
  CHECK_EQ_INT(tq->dtype, M3_DT_F8_E4M3);
  CHECK_EQ_INT(tq->block_rows, 1);
  CHECK_EQ_INT(tq->block_cols, 32);
  CHECK_EQ_INT(tq->scale_rows, NH * HD);
  CHECK_EQ_INT(tq->scale_cols, 2); /* 40 columns: a full block and a short one */
  CHECK(tq->scale ==
        m3_st_find(st, "language_model.model.layers.1.self_attn.q_proj.weight_scale_inv")->data);
  CHECK_EQ_INT(count_bad_rows(tq, q, 0, 0), 0);
  CHECK_EQ_INT(count_bad_rows(&w.layers[1].expert_down[1], down, 0, 0), 0);
  CHECK_EQ_INT(w.num_mtp, 1);
  if (w.num_mtp == 1) CHECK_EQ_INT(count_bad_rows(&w.mtp[0].eh_proj, eh, 0, 0), 0);
  CHECK_EQ_INT(w.layers[1].k_proj.quant, M3_WQ_NONE); /* decided per tensor */
  release();
}

static void test_fp8_block(void) {
  /* weight_block_size from the config: 4x16 blocks over [8, 40] -> scale [2, 3]. */
  plan p;
  build(&p, &official);
  const char *q = "language_model.model.layers.0.self_attn.q_proj.weight";
  const char *o = "language_model.model.layers.0.self_attn.o_proj.weight";
  quantize(&p, q, 4, 16);
  quantize(&p, o, 4, 16);
  config_opts fp8 = {.vl = 1,
                     .quant =
                         "{\"quant_method\": \"fp8\", \"activation_scheme\": \"dynamic\","
                         " \"weight_block_size\": [4, 16]}"};
  if (!bind_ok(&p, &fp8)) return;
  CHECK_EQ_INT(w.num_quantized, 2);
  CHECK_EQ_INT(w.layers[0].q_proj.quant, M3_WQ_FP8_BLOCK);
  CHECK_EQ_INT(w.layers[0].q_proj.block_rows, 4);
  CHECK_EQ_INT(w.layers[0].q_proj.block_cols, 16);
  CHECK_EQ_INT(w.layers[0].q_proj.scale_rows, 2);
  CHECK_EQ_INT(w.layers[0].q_proj.scale_cols, 3);
  CHECK_EQ_INT(count_bad_rows(&w.layers[0].q_proj, q, 4, 16), 0);
  CHECK_EQ_INT(count_bad_rows(&w.layers[0].o_proj, o, 4, 16), 0);
  release();

  /* Without a quantization_config the blocks are 128x128: one scale for the whole matrix. */
  build(&p, &official);
  quantize(&p, q, 128, 128);
  if (!bind_ok(&p, &vl)) return;
  CHECK_EQ_INT(w.layers[0].q_proj.block_rows, 128);
  CHECK_EQ_INT(w.layers[0].q_proj.scale_rows, 1);
  CHECK_EQ_INT(count_bad_rows(&w.layers[0].q_proj, q, 128, 128), 0);
  release();

  /* A scale shaped for other blocks than the config's. */
  build(&p, &official);
  quantize(&p, q, 128, 128);
  CHECK_FAILS_WITH(bind_case(&p, &fp8), M3_ERR_SHAPE,
                   "self_attn.q_proj.weight_scale_inv: shape [1, 1], expected [2, 3]");
  release();
}

/* Every row of t equals the e4m3 bytes of `name` times the scale of its row (scale element r, or
 * element 0 when per_tensor) decoded here from `<name>_scale` of dtype dt. */
static int count_bad_channel_rows(const m3_tensor *t, const char *name, m3_dtype dt,
                                  int per_tensor) {
  char scale_name[256];
  snprintf(scale_name, sizeof scale_name, "%s_scale", name);
  float *row = malloc((size_t)t->cols * sizeof *row);
  int bad = 0;
  for (int64_t r = 0; r < t->rows; r++) {
    m3_tensor_row_f32(t, r, row);
    size_t k = per_tensor ? 0 : (size_t)r;
    float s = dt == M3_DT_F32 ? gen_scale_f32(scale_name, k) : (float)ref_bf16(gen_bf16(scale_name, k));
    for (int64_t c = 0; c < t->cols; c++) {
      float want = (float)ref_e4m3(gen_e4m3(name, (size_t)(r * t->cols + c))) * s;
      if (row[c] != want && bad++ == 0)
        fprintf(stderr, "%s[%lld][%lld]: %.9g vs %.9g\n", name, (long long)r, (long long)c, row[c],
                want);
    }
  }
  free(row);
  return bad;
}

/* Per-channel FP8 (compressed-tensors FP8-dynamic: `weight_scale` [N, 1] in the model's dtype)
 * and per-tensor FP8 (`weight_scale` [1]) run as FP8 blocks one row (or the whole matrix) tall and
 * a power of two >= the row wide. */
static void test_fp8_channel(void) {
  plan p;
  build(&p, &official);
  const char *q = "language_model.model.layers.0.self_attn.q_proj.weight";
  const char *o = "language_model.model.layers.0.self_attn.o_proj.weight";
  const char *k = "language_model.model.layers.0.self_attn.k_proj.weight";
  const char *down = "language_model.model.layers.1.block_sparse_moe.experts.1.w2.weight";
  quantize_channel(&p, q, M3_DT_F32, MAT(NH * HD, 1));
  quantize_channel(&p, o, M3_DT_BF16, MAT(H, 1));
  quantize_channel(&p, k, M3_DT_F32, VEC(1));
  quantize_channel(&p, down, M3_DT_BF16, VEC(H));
  config_opts ct = {.vl = 1,
                    .quant =
                        "{\"quant_method\": \"compressed-tensors\", \"format\": \"float-quantized\","
                        " \"config_groups\": {\"group_0\": {\"targets\": [\"Linear\"], \"weights\":"
                        " {\"num_bits\": 8, \"type\": \"float\", \"strategy\": \"channel\"}}}}"};
  if (!bind_ok(&p, &ct)) return;
  CHECK_EQ_INT(cfg.quant.method, M3_QUANT_FP8);
  CHECK_EQ_INT(w.num_quantized, 4);
  const m3_tensor *tq = &w.layers[0].q_proj;
  CHECK_EQ_INT(tq->quant, M3_WQ_FP8_BLOCK);
  CHECK_EQ_INT(tq->block_rows, 1);
  CHECK_EQ_INT(tq->block_cols, 64); /* 40 columns: the next power of two, at least 32 */
  CHECK_EQ_INT(tq->scale_rows, NH * HD);
  CHECK_EQ_INT(tq->scale_cols, 1);
  CHECK(tq->scale == m3_st_find(st, "language_model.model.layers.0.self_attn.q_proj.weight_scale")->data);
  CHECK_EQ_INT(count_bad_channel_rows(tq, q, M3_DT_F32, 0), 0);
  CHECK_EQ_INT(count_bad_channel_rows(&w.layers[0].o_proj, o, M3_DT_BF16, 0), 0);
  CHECK_EQ_INT(w.layers[0].k_proj.block_rows, NKV * HD);
  CHECK_EQ_INT(count_bad_channel_rows(&w.layers[0].k_proj, k, M3_DT_F32, 1), 0);
  CHECK_EQ_INT(count_bad_channel_rows(&w.layers[1].expert_down[1], down, M3_DT_BF16, 0), 0);
  release();

  /* Without a quantization_config, and with quant_method fp8 without blocks: the same. */
  config_opts fp8 = {.vl = 1, .quant = "{\"quant_method\": \"fp8\", \"activation_scheme\": \"dynamic\"}"};
  const config_opts *plain[] = {&vl, &fp8};
  for (int i = 0; i < 2; i++) {
    build(&p, &official);
    quantize_channel(&p, q, M3_DT_F32, MAT(NH * HD, 1));
    if (!bind_ok(&p, plain[i])) return;
    CHECK_EQ_INT(count_bad_channel_rows(&w.layers[0].q_proj, q, M3_DT_F32, 0), 0);
    release();
  }

  /* Scale shapes that fit no layout, a scale dtype that is not a float, two scales. */
  build(&p, &official);
  quantize_channel(&p, q, M3_DT_F32, MAT(NH * HD, 2));
  CHECK_FAILS_WITH(bind_case(&p, &ct), M3_ERR_SHAPE,
                   "self_attn.q_proj.weight_scale: shape [8, 2], expected [8, 1] or [8]");
  release();
  build(&p, &official);
  quantize_channel(&p, o, M3_DT_BF16, VEC(H - 1));
  CHECK_FAILS_WITH(bind_case(&p, &ct), M3_ERR_SHAPE, "self_attn.o_proj.weight_scale: shape [39]");
  release();
  build(&p, &official);
  quantize_channel(&p, q, M3_DT_F32, MAT(1, NH * HD));
  CHECK_FAILS_WITH(bind_case(&p, &ct), M3_ERR_SHAPE, "self_attn.q_proj.weight_scale: shape [1, 8]");
  release();
  build(&p, &official);
  quantize_channel(&p, q, M3_DT_U8, MAT(NH * HD, 1));
  CHECK_FAILS_WITH(bind_case(&p, &ct), M3_ERR_SHAPE, "self_attn.q_proj.weight_scale: dtype U8");
  release();
  build(&p, &official);
  quantize(&p, q, 0, 0);
  plan_add(&p, M3_DT_F32, MAT(NH * HD, 1), "%s_scale", q);
  CHECK_FAILS_WITH(bind_case(&p, &ct), M3_ERR_UNEXPECTED, "q_proj.weight: has both");
  release();

  /* compressed-tensors in another format (int4 pack-quantized) is refused up front. */
  build(&p, &official);
  config_opts packed = {.vl = 1, .quant = "{\"quant_method\": \"compressed-tensors\", \"format\": \"pack-quantized\"}"};
  CHECK_FAILS_WITH(bind_case(&p, &packed), M3_ERR_UNSUPPORTED, "compressed-tensors");
  release();
}

/* A header one byte longer than the writer makes it (legal JSON padding) shifts every tensor off
 * its element alignment: binding must refuse it by name rather than read misaligned data. */
static void test_misaligned(void) {
  plan p;
  build(&p, &official);
  CHECK_OK(write_plan(&p, st_path));
  FILE *f = fopen(st_path, "rb");
  CHECK(f != NULL);
  if (!f) return;
  fseek(f, 0, SEEK_END);
  long size = ftell(f);
  rewind(f);
  uint8_t *bytes = malloc((size_t)size);
  CHECK(bytes && fread(bytes, 1, (size_t)size, f) == (size_t)size);
  fclose(f);
  if (!bytes) return;
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--) n = n << 8 | bytes[i];
  uint64_t n1 = n + 1;
  uint8_t len[8];
  for (int i = 0; i < 8; i++) len[i] = (uint8_t)(n1 >> (8 * i));
  f = fopen(st_path, "wb");
  CHECK(f != NULL);
  if (f) {
    fwrite(len, 1, 8, f);
    fwrite(bytes + 8, 1, (size_t)n, f);
    fputc(' ', f);
    fwrite(bytes + 8 + n, 1, (size_t)size - 8 - (size_t)n, f);
    fclose(f);
  }
  free(bytes);
  CHECK_OK(make_config(&vl, &cfg));
  CHECK_OK(m3_st_open_file(st_path, &st));
  if (st) CHECK_FAILS_WITH(m3_weights_bind(&cfg, st, &w), M3_ERR_FORMAT, "not aligned");
  release();
}

static void test_errors(void) {
  plan p;
  const char *L0 = "language_model.model.layers.0.";
  const char *L1 = "language_model.model.layers.1.";
  char name[192];

  /* Missing: named in full. */
  build(&p, &official);
  snprintf(name, sizeof name, "%sself_attn.index_k_norm.weight", L1);
  plan_find(&p, name)->removed = 1;
  CHECK_FAILS_WITH(bind_case(&p, &vl), M3_ERR_MISSING, name);
  release();

  build(&p, &official);
  plan_find(&p, "language_model.model.layers.1.block_sparse_moe.e_score_correction_bias")->removed =
      1;
  CHECK_FAILS_WITH(
      bind_case(&p, &vl), M3_ERR_MISSING,
      "missing tensor language_model.model.layers.1.block_sparse_moe.e_score_correction_bias");
  release();

  build(&p, &official);
  plan_find(&p, "patch_merge_mlp.linear_2.bias")->removed = 1;
  CHECK_FAILS_WITH(bind_case(&p, &vl), M3_ERR_MISSING, "patch_merge_mlp.linear_2.bias");
  release();

  /* Unexpected: an indexer on a full-attention layer, an unknown name, both MLP spellings. */
  build(&p, &official);
  plan_add(&p, M3_DT_BF16, MAT(NIH * IHD, H), "%sself_attn.index_q_proj.weight", L0);
  snprintf(name, sizeof name, "%sself_attn.index_q_proj.weight", L0);
  CHECK_FAILS_WITH(bind_case(&p, &vl), M3_ERR_UNEXPECTED, name);
  release();

  build(&p, &official);
  plan_add(&p, M3_DT_BF16, VEC(H), "language_model.model.layers.1.self_attn.sinks");
  CHECK_FAILS_WITH(bind_case(&p, &vl), M3_ERR_UNEXPECTED,
                   "language_model.model.layers.1.self_attn.sinks");
  release();

  build(&p, &official);
  plan_add(&p, M3_DT_BF16, MAT(DI, H), "%sblock_sparse_moe.gate_proj.weight", L0);
  CHECK_FAILS_WITH(bind_case(&p, &vl), M3_ERR_UNEXPECTED,
                   "layers.0.block_sparse_moe.gate_proj.weight");
  release();

  /* A prefix mix: the unprefixed embedding is not the model's. */
  build(&p, &official);
  plan_add(&p, M3_DT_BF16, MAT(VOCAB, H), "model.embed_tokens.weight");
  CHECK_FAILS_WITH(bind_case(&p, &vl), M3_ERR_UNEXPECTED, "tensor model.embed_tokens.weight");
  release();

  /* An MTP module with a gap: module 1 has only one tensor. */
  build(&p, &official);
  plan_add(&p, M3_DT_BF16, VEC(H), "language_model.model.mtp.layers.1.enorm.weight");
  CHECK_FAILS_WITH(bind_case(&p, &vl), M3_ERR_MISSING,
                   "language_model.model.mtp.layers.1.hnorm.weight");
  release();

  /* Wrong shape: tensor, found and expected shapes. */
  build(&p, &official);
  snprintf(name, sizeof name, "%sself_attn.q_proj.weight", L1);
  plan_find(&p, name)->shape[1] = H - 1;
  CHECK_FAILS_WITH(
      bind_case(&p, &vl), M3_ERR_SHAPE,
      "language_model.model.layers.1.self_attn.q_proj.weight: shape [8, 39], expected [8, 40]");
  release();

  build(&p, &official);
  entry *pe = plan_find(&p, "vision_tower.vision_model.embeddings.patch_embedding.weight");
  pe->ndim = 2;
  pe->shape[1] = VC * VT * VP * VP;
  CHECK_FAILS_WITH(bind_case(&p, &vl), M3_ERR_SHAPE,
                   "patch_embedding.weight: shape [4, 24], expected [4, 3, 2, 2, 2]");
  release();

  /* Wrong dtype. */
  build(&p, &official);
  snprintf(name, sizeof name, "%spost_attention_layernorm.weight", L0);
  plan_find(&p, name)->dt = M3_DT_I32;
  CHECK_FAILS_WITH(bind_case(&p, &vl), M3_ERR_SHAPE, "post_attention_layernorm.weight: dtype I32");
  release();

  /* F8 without its scale. */
  build(&p, &official);
  snprintf(name, sizeof name, "%sself_attn.v_proj.weight", L1);
  plan_find(&p, name)->dt = M3_DT_F8_E4M3;
  CHECK_FAILS_WITH(bind_case(&p, &vl), M3_ERR_MISSING, name);
  release();

  /* MXFP8 scale of the wrong shape, and of the wrong dtype. */
  build(&p, &official);
  snprintf(name, sizeof name, "%sself_attn.v_proj.weight", L1);
  quantize(&p, name, 0, 0);
  plan_find(&p, "language_model.model.layers.1.self_attn.v_proj.weight_scale_inv")->shape[1] = 1;
  CHECK_FAILS_WITH(bind_case(&p, &vl), M3_ERR_SHAPE,
                   "v_proj.weight_scale_inv: shape [4, 1], expected [4, 2]");
  release();

  build(&p, &official);
  quantize(&p, name, 0, 0);
  plan_find(&p, "language_model.model.layers.1.self_attn.v_proj.weight_scale_inv")->dt = M3_DT_F16;
  CHECK_FAILS_WITH(bind_case(&p, &vl), M3_ERR_SHAPE, "v_proj.weight_scale_inv: dtype F16");
  release();

  /* A scale next to a bf16 weight. */
  build(&p, &official);
  quantize(&p, name, 0, 0);
  plan_find(&p, name)->dt = M3_DT_BF16;
  CHECK_FAILS_WITH(bind_case(&p, &vl), M3_ERR_SHAPE, name);
  release();

  /* An orphan scale (its weight is not part of the model) is reported, not silently skipped. */
  build(&p, &official);
  plan_add(&p, M3_DT_U8, MAT(4, 2),
           "language_model.model.layers.1.self_attn.index_v_proj.weight_scale_inv");
  CHECK_FAILS_WITH(bind_case(&p, &vl), M3_ERR_UNEXPECTED, "index_v_proj.weight_scale_inv");
  release();

  /* An unknown quant_method is rejected by name. */
  build(&p, &official);
  config_opts awq = {.vl = 1, .quant = "{\"quant_method\": \"awq\", \"bits\": 4}"};
  CHECK_FAILS_WITH(bind_case(&p, &awq), M3_ERR_UNSUPPORTED, "awq");
  release();
}

int main(void) {
  snprintf(tmp_dir, sizeof tmp_dir, "/tmp/m3_test_weights_XXXXXX");
  if (!mkdtemp(tmp_dir)) {
    perror("mkdtemp");
    return 1;
  }
  snprintf(st_path, sizeof st_path, "%s/model.safetensors", tmp_dir);
  test_official_layout();
  test_resaved_layout();
  test_tied_and_text_only();
  test_mxfp8();
  test_fp8_block();
  test_fp8_channel();
  test_errors();
  test_misaligned();
  unlink(st_path);
  rmdir(tmp_dir);
  return check_summary();
}
