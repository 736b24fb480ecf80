/* tiny.c: writes the tiny checkpoint (see tiny.h).
 *
 * Sizes are small and pairwise different, so a swapped dimension fails a shape check instead of
 * passing silently: hidden 64, 8 query heads x 16, 2 KV heads, rotary 8, index 2 heads x 24,
 * routed experts 8 x 32 (top 2), shared expert 40, dense MLP 96, vision 2 layers x 48 (4 heads,
 * MLP 80), projector 72. The widths 40 and 96 are not multiples of 32, so MXFP8 rows end in a
 * short block. Weight scales are chosen so routing and block selection are far from uniform.
 * m3_tiny_options may override the text sizes (benchmarks want a model larger than the cache) and
 * widen the vocabulary past the tokenizer's; the vision tower keeps its sizes. */
#include "io/tiny.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/dtype.h"
#include "base/mxfp8.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "io/tiny_tokenizer.h"

/* Bump when the generated files change, so cached built-in models are regenerated. */
#define TINY_FORMAT_VERSION 1

enum { LAYERS_MAX = 64, NAME_CAP = 256, PATH_CAP = 4096 };

m3_tiny_options m3_tiny_default_options(void) {
  return (m3_tiny_options){.seed = 1, .dtype = M3_TINY_BF16, .layers = M3_TINY_DEFAULT_LAYERS};
}

/* ---- deterministic normal samples ---- */

static uint64_t splitmix64(uint64_t *state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* Each tensor has its own stream, keyed by seed and name, so adding a tensor never shifts the
 * values of the others. */
static uint64_t stream_for(uint64_t seed, const char *name) {
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (; *name; name++) h = (h ^ (uint8_t)*name) * 1099511628211ull;
  uint64_t state = seed ^ h;
  return splitmix64(&state);
}

/* Box-Muller from two 53-bit uniforms; u1 in (0, 1] keeps the log finite. Values [first,
 * first + n) of the stream: pair p (values 2p, 2p + 1) takes draws 2p and 2p + 1, and splitmix64's
 * state after c draws is state + c * increment, so any range is computed without the ones before
 * it and a tensor is generated in pieces that match drawing it whole. */
static void fill_normal(float *out, int64_t first, int64_t n, uint64_t state, float mean, float std) {
  const double two_pi = 6.283185307179586;
  for (int64_t p = first / 2; 2 * p < first + n; p++) {
    uint64_t s = state + (uint64_t)(2 * p) * 0x9e3779b97f4a7c15ull;
    double u1 = (double)((splitmix64(&s) >> 11) + 1) * 0x1p-53;
    double u2 = (double)(splitmix64(&s) >> 11) * 0x1p-53;
    double r = sqrt(-2.0 * log(u1));
    int64_t i = 2 * p - first; /* -1 when the range starts at the pair's second value */
    if (i >= 0) out[i] = (float)(mean + std * r * cos(two_pi * u2));
    if (i + 1 < n) out[i + 1] = (float)(mean + std * r * sin(two_pi * u2));
  }
}

/* ---- the layer plan ---- */

static m3_status parse_plan(const char *plan, m3_config *cfg) {
  int n = 0;
  for (const char *p = plan;; p += 3) {
    if (n == LAYERS_MAX)
      return m3_fail(M3_ERR_ARG, "layer plan '%s': more than %d layers", plan, LAYERS_MAX);
    int attn = p[0] == 'F' ? M3_ATTN_FULL : p[0] == 'S' ? M3_ATTN_SPARSE : -1;
    int mlp = p[0] ? (p[1] == 'D' ? M3_MLP_DENSE : p[1] == 'M' ? M3_MLP_MOE : -1) : -1;
    if (attn < 0 || mlp < 0 || (p[2] != ',' && p[2] != 0))
      return m3_fail(M3_ERR_ARG,
                     "layer plan '%s': entry %d is not one of FD, FM, SD, SM (F/S full/sparse "
                     "attention, D/M dense MLP/MoE, comma-separated)",
                     plan, n + 1);
    cfg->layer_attn[n] = (uint8_t)attn;
    cfg->layer_mlp[n] = (uint8_t)mlp;
    n++;
    if (p[2] == 0) break;
  }
  cfg->num_layers = n;
  return M3_OK;
}

/* ---- config ---- */

/* The vocabulary is the tokenizer's: its BPE tokens, then M3's added tokens. */
static void set_vocab(m3_config *c, int bpe_size) {
  int first_special = bpe_size;
  c->vocab_size = bpe_size + M3_SPECIAL_COUNT;
  c->bos_token_id = first_special + (200034 - M3_SPECIAL_ID_BASE); /* ]~!b[ */
  c->eos_token_id = first_special + (200020 - M3_SPECIAL_ID_BASE); /* [e~[ */
  c->image_token_id = first_special + (200025 - M3_SPECIAL_ID_BASE);
  c->video_token_id = first_special + (200026 - M3_SPECIAL_ID_BASE);
}

static void fill_config(m3_config *c, m3_tiny_dtype dtype) {
  c->hidden_size = 64;
  c->num_heads = 8;
  c->num_kv_heads = 2;
  c->head_dim = 16;
  c->max_position_embeddings = 4096;
  c->rms_norm_eps = 1e-6f;
  c->rope_theta = 10000.0; /* fast enough rotation to matter within a few hundred positions */
  c->rotary_dim = 8;
  c->swiglu_alpha = 1.702f;
  c->swiglu_beta = 1.0f;
  c->swiglu_limit = 7.0f;
  c->intermediate_size = 32;
  c->shared_intermediate_size = 40;
  c->dense_intermediate_size = 96;
  c->num_experts = 8;
  c->num_experts_per_tok = 2;
  c->num_shared_experts = 1;
  c->routed_scaling_factor = 2.0f;
  c->use_routing_bias = 1;
  c->tie_word_embeddings = 0;
  c->num_mtp_modules = 1;

  c->index_num_heads = c->num_kv_heads;
  c->index_head_dim = 24;
  c->index_block_size = 4;
  c->index_topk_blocks = 3;
  c->index_local_blocks = 1;
  c->index_init_blocks = 0;

  c->is_vl = 1;
  snprintf(c->architecture, sizeof c->architecture, "MiniMaxM3SparseForConditionalGeneration");
  c->projector_hidden_size = 72;
  c->vision = (m3_vision_config){
      .present = 1,
      .hidden_size = 48,
      .num_heads = 4,
      .num_layers = 2,
      .intermediate_size = 80,
      .num_channels = 3,
      .patch_size = 14,
      .temporal_patch_size = 2,
      .spatial_merge_size = 2,
      .layer_norm_eps = 1e-5f,
      .rope_theta = 10000.0,
      .segment_max_frames = 4,
  };
  if (dtype == M3_TINY_MXFP8) {
    c->quant.present = 1;
    c->quant.method = M3_QUANT_MXFP8;
    snprintf(c->quant.method_name, sizeof c->quant.method_name, "mxfp8");
    c->quant.block_rows = 1;
    c->quant.block_cols = 32;
    snprintf(c->quant.activation_scheme, sizeof c->quant.activation_scheme, "dynamic");
  }
}

/* The options' nonzero sizes replace the defaults in c; then the sizes must fit together as the
 * model requires (model.c check_supported, config.c). */
static m3_status apply_sizes(m3_config *c, const m3_tiny_options *o) {
  const struct {
    const char *flag;
    int value;
    int *field;
  } sizes[] = {
      {"--hidden", o->hidden, &c->hidden_size},
      {"--heads", o->heads, &c->num_heads},
      {"--kv-heads", o->kv_heads, &c->num_kv_heads},
      {"--head-dim", o->head_dim, &c->head_dim},
      {"--rotary-dim", o->rotary_dim, &c->rotary_dim},
      {"--experts", o->experts, &c->num_experts},
      {"--experts-per-token", o->experts_per_token, &c->num_experts_per_tok},
      {"--expert-width", o->expert_width, &c->intermediate_size},
      {"--shared-width", o->shared_width, &c->shared_intermediate_size},
      {"--dense-width", o->dense_width, &c->dense_intermediate_size},
      {"--index-dim", o->index_dim, &c->index_head_dim},
      {"--block-size", o->block_size, &c->index_block_size},
      {"--topk-blocks", o->topk_blocks, &c->index_topk_blocks},
  };
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
    if (sizes[i].value < 0 || sizes[i].value > 65536)
      return m3_fail(M3_ERR_ARG, "%s %d is outside 1..65536 (0 keeps the default)",
                     sizes[i].flag, sizes[i].value);
    if (sizes[i].value) *sizes[i].field = sizes[i].value;
  }
  c->index_num_heads = c->num_kv_heads; /* one index head per KV group (msa_spec.md §4) */
  if (c->num_heads % c->num_kv_heads != 0)
    return m3_fail(M3_ERR_ARG, "--heads %d is not a multiple of --kv-heads %d", c->num_heads,
                   c->num_kv_heads);
  if (c->rotary_dim % 2 != 0 || c->rotary_dim > c->head_dim || c->rotary_dim > c->index_head_dim)
    return m3_fail(M3_ERR_ARG, "--rotary-dim %d must be even and at most --head-dim %d and "
                   "--index-dim %d", c->rotary_dim, c->head_dim, c->index_head_dim);
  if (c->num_experts_per_tok > c->num_experts)
    return m3_fail(M3_ERR_ARG, "--experts-per-token %d exceeds --experts %d",
                   c->num_experts_per_tok, c->num_experts);
  return M3_OK;
}

/* ---- tensors ---- */

#define TRY(expr)                       \
  do {                                  \
    m3_status try_s_ = (expr);          \
    if (try_s_ != M3_OK) return try_s_; \
  } while (0)


/* How a tensor is stored: in the checkpoint's dtype, always F32 (router, its bias, the patch
 * embedding, as in the official BF16 release), or as a linear weight that the MXFP8 release
 * quantizes (spec §9.3: attention q/k/v/o, dense MLP, routed and shared experts). */
typedef enum { STORE_MODEL, STORE_F32, STORE_QUANTIZABLE } store_kind;

/* What a tensor becomes on disk once its kind meets the checkpoint dtype. */
typedef enum { OUT_F32, OUT_BF16, OUT_MXFP8 } out_format;

/* One tensor to generate: N(mean, std^2) values of `stream`, seen as rows x cols (a vector is
 * one row; the 5-D patch embedding is rows of its input size); data (and scale, for MXFP8) are
 * its entries in the writer. */
typedef struct {
  out_format format;
  int64_t rows, cols;
  uint64_t stream;
  float mean, std;
  int data, scale;
} tensor_job;

/* The tensors are planned first (names, shapes, dtypes into a writer without data) and written
 * afterwards, in parallel, at the offsets the writer's layout gives. */
typedef struct {
  m3_st_writer *w;
  uint64_t seed;
  m3_tiny_dtype dtype;
  const m3_config *cfg;
  const char *prefix; /* "language_model." in the VL layout, "" in the text-only one */
  const char *path;   /* model.safetensors, for messages */
  tensor_job *jobs;
  int count, cap;
} tensor_writer;

static m3_status add_job(tensor_writer *tw, const char *name, const tensor_job *job) {
  if (tw->count == tw->cap) {
    int cap = tw->cap ? 2 * tw->cap : 256;
    tensor_job *j = realloc(tw->jobs, (size_t)cap * sizeof *j);
    if (!j) return m3_fail(M3_ERR_NOMEM, "%s: tensor %s", tw->path, name);
    tw->jobs = j;
    tw->cap = cap;
  }
  tw->jobs[tw->count++] = *job;
  return M3_OK;
}

/* Plans N(mean, std^2) values for `name` in the dtype its kind calls for. */
static m3_status put(tensor_writer *tw, store_kind kind, const char *name, int ndim,
                     const int64_t *shape, float mean, float std) {
  tensor_job job = {.rows = ndim > 1 ? shape[0] : 1, .cols = 1, .stream = stream_for(tw->seed, name),
                    .mean = mean, .std = std, .scale = -1};
  for (int d = ndim > 1 ? 1 : 0; d < ndim; d++) job.cols *= shape[d];
  job.format = kind == STORE_F32 || tw->dtype == M3_TINY_F32 ? OUT_F32
               : kind == STORE_QUANTIZABLE && tw->dtype == M3_TINY_MXFP8 ? OUT_MXFP8
                                                                          : OUT_BF16;
  job.data = m3_st_writer_count(tw->w);
  static const m3_dtype stored[] = {[OUT_F32] = M3_DT_F32, [OUT_BF16] = M3_DT_BF16,
                                    [OUT_MXFP8] = M3_DT_F8_E4M3};
  TRY(m3_st_writer_add(tw->w, name, stored[job.format], ndim, shape, NULL));
  if (job.format == OUT_MXFP8) {
    char scale_name[NAME_CAP + 16];
    snprintf(scale_name, sizeof scale_name, "%s_scale_inv", name);
    int64_t scale_shape[2] = {job.rows, (job.cols + M3_MXFP8_BLOCK - 1) / M3_MXFP8_BLOCK};
    job.scale = m3_st_writer_count(tw->w);
    TRY(m3_st_writer_add(tw->w, scale_name, M3_DT_U8, 2, scale_shape, NULL));
  }
  return add_job(tw, name, &job);
}

/* Tensor names are `base` (ending with '.') + `sub`. */
static m3_status tensor_name(char name[NAME_CAP], const char *base, const char *sub) {
  if (snprintf(name, NAME_CAP, "%s%s", base, sub) >= NAME_CAP)
    return m3_fail(M3_ERR_ARG, "tensor name %s%s longer than %d bytes", base, sub, NAME_CAP - 1);
  return M3_OK;
}

static m3_status put_vec(tensor_writer *tw, store_kind kind, const char *base, const char *sub,
                         int64_t n, float mean, float std) {
  char name[NAME_CAP];
  m3_status st = tensor_name(name, base, sub);
  if (st != M3_OK) return st;
  int64_t shape[1] = {n};
  return put(tw, kind, name, 1, shape, mean, std);
}

/* A linear weight [rows, cols] with std gain / sqrt(fan_in). */
static m3_status put_mat(tensor_writer *tw, store_kind kind, const char *base, const char *sub,
                         int64_t rows, int64_t cols, float gain) {
  char name[NAME_CAP];
  m3_status st = tensor_name(name, base, sub);
  if (st != M3_OK) return st;
  int64_t shape[2] = {rows, cols};
  return put(tw, kind, name, 2, shape, 0.0f, gain / sqrtf((float)cols));
}

/* Gemma norms scale by (1 + w): weights near 0 with a little noise. */
static const float NORM_STD = 0.1f;
/* Linear gains: 1.5 keeps activations lively through a few layers; the router and indexer get
 * more so expert and block scores spread out instead of tying. */
static const float LINEAR_GAIN = 1.5f, ROUTER_GAIN = 3.0f, INDEX_GAIN = 3.0f;

static m3_status put_layer(tensor_writer *tw, const char *base, int sparse, int moe) {
  const m3_config *c = tw->cfg;
  int64_t H = c->hidden_size, hd = c->head_dim, qw = (int64_t)c->num_heads * hd;
  int64_t kvw = (int64_t)c->num_kv_heads * hd, ihd = c->index_head_dim;
  TRY(put_vec(tw, STORE_MODEL, base, "input_layernorm.weight", H, 0.0f, NORM_STD));
  TRY(put_vec(tw, STORE_MODEL, base, "post_attention_layernorm.weight", H, 0.0f, NORM_STD));
  TRY(put_mat(tw, STORE_QUANTIZABLE, base, "self_attn.q_proj.weight", qw, H, LINEAR_GAIN));
  TRY(put_mat(tw, STORE_QUANTIZABLE, base, "self_attn.k_proj.weight", kvw, H, LINEAR_GAIN));
  TRY(put_mat(tw, STORE_QUANTIZABLE, base, "self_attn.v_proj.weight", kvw, H, LINEAR_GAIN));
  TRY(put_mat(tw, STORE_QUANTIZABLE, base, "self_attn.o_proj.weight", H, qw, LINEAR_GAIN));
  TRY(put_vec(tw, STORE_MODEL, base, "self_attn.q_norm.weight", hd, 0.0f, NORM_STD));
  TRY(put_vec(tw, STORE_MODEL, base, "self_attn.k_norm.weight", hd, 0.0f, NORM_STD));
  if (sparse) {
    /* Not quantized: NeMo's MXFP8 export keeps the indexer in BF16 (spec §9.3 notes the doubt). */
    TRY(put_mat(tw, STORE_MODEL, base, "self_attn.index_q_proj.weight", (int64_t)c->index_num_heads * ihd, H, INDEX_GAIN));
    TRY(put_mat(tw, STORE_MODEL, base, "self_attn.index_k_proj.weight", ihd, H, INDEX_GAIN));
    TRY(put_vec(tw, STORE_MODEL, base, "self_attn.index_q_norm.weight", ihd, 0.0f, NORM_STD));
    TRY(put_vec(tw, STORE_MODEL, base, "self_attn.index_k_norm.weight", ihd, 0.0f, NORM_STD));
  }
  if (!moe) {
    int64_t D = c->dense_intermediate_size;
    TRY(put_mat(tw, STORE_QUANTIZABLE, base, "mlp.gate_proj.weight", D, H, LINEAR_GAIN));
    TRY(put_mat(tw, STORE_QUANTIZABLE, base, "mlp.up_proj.weight", D, H, LINEAR_GAIN));
    TRY(put_mat(tw, STORE_QUANTIZABLE, base, "mlp.down_proj.weight", H, D, LINEAR_GAIN));
    return M3_OK;
  }
  int64_t E = c->num_experts, I = c->intermediate_size, S = c->shared_intermediate_size;
  TRY(put_mat(tw, STORE_F32, base, "block_sparse_moe.gate.weight", E, H, ROUTER_GAIN));
  TRY(put_vec(tw, STORE_F32, base, "block_sparse_moe.e_score_correction_bias", E, 0.0f, 0.05f));
  for (int64_t e = 0; e < E; e++) {
    char sub[96];
    snprintf(sub, sizeof sub, "block_sparse_moe.experts.%lld.w1.weight", (long long)e);
    TRY(put_mat(tw, STORE_QUANTIZABLE, base, sub, I, H, LINEAR_GAIN));
    snprintf(sub, sizeof sub, "block_sparse_moe.experts.%lld.w2.weight", (long long)e);
    TRY(put_mat(tw, STORE_QUANTIZABLE, base, sub, H, I, LINEAR_GAIN));
    snprintf(sub, sizeof sub, "block_sparse_moe.experts.%lld.w3.weight", (long long)e);
    TRY(put_mat(tw, STORE_QUANTIZABLE, base, sub, I, H, LINEAR_GAIN));
  }
  TRY(put_mat(tw, STORE_QUANTIZABLE, base, "block_sparse_moe.shared_experts.gate_proj.weight", S, H, LINEAR_GAIN));
  TRY(put_mat(tw, STORE_QUANTIZABLE, base, "block_sparse_moe.shared_experts.up_proj.weight", S, H, LINEAR_GAIN));
  TRY(put_mat(tw, STORE_QUANTIZABLE, base, "block_sparse_moe.shared_experts.down_proj.weight", H, S, LINEAR_GAIN));
  return M3_OK;
}

static m3_status put_text(tensor_writer *tw) {
  const m3_config *c = tw->cfg;
  int64_t H = c->hidden_size, V = c->vocab_size;
  char model[32], mtp[64], base[NAME_CAP]; /* the prefix is one of two short constants */
  snprintf(model, sizeof model, "%smodel.", tw->prefix);
  TRY(put_mat(tw, STORE_MODEL, model, "embed_tokens.weight", V, H, sqrtf((float)H))); /* std 1 */
  TRY(put_vec(tw, STORE_MODEL, model, "norm.weight", H, 0.0f, NORM_STD));
  TRY(put_mat(tw, STORE_MODEL, tw->prefix, "lm_head.weight", V, H, LINEAR_GAIN));
  for (int i = 0; i < c->num_layers; i++) {
    snprintf(base, sizeof base, "%slayers.%d.", model, i);
    TRY(put_layer(tw, base, c->layer_attn[i] == M3_ATTN_SPARSE, c->layer_mlp[i] == M3_MLP_MOE));
  }
  if (c->num_mtp_modules == 0) return M3_OK;
  /* One MTP module (the layout of the released MTP weights, spec §8.2); eh_proj stays BF16 as in
   * RTP's reading of that release. */
  snprintf(mtp, sizeof mtp, "%smtp.layers.0.", model);
  TRY(put_vec(tw, STORE_MODEL, mtp, "enorm.weight", H, 0.0f, NORM_STD));
  TRY(put_vec(tw, STORE_MODEL, mtp, "hnorm.weight", H, 0.0f, NORM_STD));
  TRY(put_mat(tw, STORE_MODEL, mtp, "eh_proj.weight", H, 2 * H, LINEAR_GAIN));
  TRY(put_vec(tw, STORE_MODEL, mtp, "final_layernorm.weight", H, 0.0f, NORM_STD));
  snprintf(base, sizeof base, "%stransformer_layer.", mtp);
  return put_layer(tw, base, 1, 1);
}

/* A linear with bias, as the vision tower and projectors have (nn.Linear). */
static m3_status put_linear_bias(tensor_writer *tw, const char *base, int64_t out, int64_t in) {
  TRY(put_mat(tw, STORE_MODEL, base, "weight", out, in, LINEAR_GAIN));
  return put_vec(tw, STORE_MODEL, base, "bias", out, 0.0f, 0.02f);
}

/* nn.LayerNorm: weight near 1 (not Gemma's 1 + w), bias near 0. */
static m3_status put_layer_norm(tensor_writer *tw, const char *base) {
  TRY(put_vec(tw, STORE_MODEL, base, "weight", tw->cfg->vision.hidden_size, 1.0f, NORM_STD));
  return put_vec(tw, STORE_MODEL, base, "bias", tw->cfg->vision.hidden_size, 0.0f, 0.02f);
}

static m3_status put_vision(tensor_writer *tw) {
  const m3_config *c = tw->cfg;
  const m3_vision_config *v = &c->vision;
  int64_t D = v->hidden_size, P = c->projector_hidden_size, H = c->hidden_size;
  int64_t merge = (int64_t)v->spatial_merge_size * v->spatial_merge_size;
  const char *tower = "vision_tower.vision_model.";
  /* Conv3d weight [D, C, tp, p, p], F32 on disk in the official release. */
  int64_t patch_shape[5] = {D, v->num_channels, v->temporal_patch_size, v->patch_size, v->patch_size};
  int64_t patch_in = patch_shape[1] * patch_shape[2] * patch_shape[3] * patch_shape[4];
  char name[NAME_CAP];
  snprintf(name, sizeof name, "%sembeddings.patch_embedding.weight", tower);
  TRY(put(tw, STORE_F32, name, 5, patch_shape, 0.0f, LINEAR_GAIN / sqrtf((float)patch_in)));
  snprintf(name, sizeof name, "%spre_layrnorm.", tower); /* sic: the real tensor name */
  TRY(put_layer_norm(tw, name));
  for (int i = 0; i < v->num_layers; i++) {
    static const char *const parts[] = {"self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.",
                                        "self_attn.out_proj."};
    for (size_t k = 0; k < sizeof parts / sizeof parts[0]; k++) {
      snprintf(name, sizeof name, "%sencoder.layers.%d.%s", tower, i, parts[k]);
      TRY(put_linear_bias(tw, name, D, D));
    }
    snprintf(name, sizeof name, "%sencoder.layers.%d.layer_norm1.", tower, i);
    TRY(put_layer_norm(tw, name));
    snprintf(name, sizeof name, "%sencoder.layers.%d.layer_norm2.", tower, i);
    TRY(put_layer_norm(tw, name));
    snprintf(name, sizeof name, "%sencoder.layers.%d.mlp.fc1.", tower, i);
    TRY(put_linear_bias(tw, name, v->intermediate_size, D));
    snprintf(name, sizeof name, "%sencoder.layers.%d.mlp.fc2.", tower, i);
    TRY(put_linear_bias(tw, name, D, v->intermediate_size));
  }
  /* Projector D -> P -> H, then the merger over 2x2 groups 4H -> P -> H (vision spec §4.7). */
  TRY(put_linear_bias(tw, "multi_modal_projector.linear_1.", P, D));
  TRY(put_linear_bias(tw, "multi_modal_projector.linear_2.", H, P));
  TRY(put_linear_bias(tw, "patch_merge_mlp.linear_1.", P, merge * H));
  return put_linear_bias(tw, "patch_merge_mlp.linear_2.", H, P);
}

/* ---- files ---- */

static m3_status make_dirs(const char *dir) {
  char path[PATH_CAP];
  if (snprintf(path, sizeof path, "%s", dir) >= (int)sizeof path)
    return m3_fail(M3_ERR_ARG, "%s: path too long", dir);
  for (char *p = path + 1;; p++) {
    if (*p != '/' && *p != 0) continue;
    char saved = *p;
    *p = 0;
    if (mkdir(path, 0755) != 0 && errno != EEXIST)
      return m3_fail(M3_ERR_IO, "%s: cannot create folder: %s", path, strerror(errno));
    *p = saved;
    if (saved == 0) break;
  }
  struct stat sb;
  if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode)) return m3_fail(M3_ERR_IO, "%s: not a folder", dir);
  return M3_OK;
}

static m3_status join(char *out, const char *dir, const char *file) {
  if (snprintf(out, PATH_CAP, "%s/%s", dir, file) >= PATH_CAP)
    return m3_fail(M3_ERR_ARG, "%s: path too long", dir);
  return M3_OK;
}

/* ---- writing the planned tensors ---- */

/* Values per piece of work: a few MB of float32 per thread, and enough pieces that the
 * embedding and lm_head of a large vocabulary spread over every thread. */
enum { PIECE_VALUES = 1 << 20 };

typedef struct {
  int job;
  int64_t row, rows;
} piece;

typedef struct {
  const tensor_job *jobs;
  const piece *pieces;
  int count;
  const uint64_t *offsets; /* file offset of each writer tensor */
  int fd;
  atomic_int next;
  atomic_int failed;  /* 0, else the errno of the first failure (ENOMEM: a buffer) */
} write_work;

static int pwrite_all(int fd, const void *p, size_t n, uint64_t at) {
  const uint8_t *q = p;
  while (n) {
    ssize_t k = pwrite(fd, q, n, (off_t)at);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return k < 0 ? errno : EIO;
    q += k, n -= (size_t)k, at += (uint64_t)k;
  }
  return 0;
}

/* Draws the piece's values and writes them (and MXFP8 scales) where its rows go; x, out are the
 * thread's buffers of PIECE_VALUES or one row, whichever is larger. */
static int write_piece(const write_work *ww, const piece *pc, float *x, uint8_t *out) {
  const tensor_job *j = &ww->jobs[pc->job];
  int64_t n = pc->rows * j->cols, first = pc->row * j->cols;
  fill_normal(x, first, n, j->stream, j->mean, j->std);
  if (j->format == OUT_F32)
    return pwrite_all(ww->fd, x, (size_t)n * 4, ww->offsets[j->data] + (uint64_t)first * 4);
  /* The MXFP8 release was quantized from the BF16 weights, so quantize the bf16 values. */
  uint16_t *h = (uint16_t *)out;
  for (int64_t i = 0; i < n; i++) h[i] = m3_f32_to_bf16(x[i]);
  if (j->format == OUT_BF16)
    return pwrite_all(ww->fd, h, (size_t)n * 2, ww->offsets[j->data] + (uint64_t)first * 2);
  for (int64_t i = 0; i < n; i++) x[i] = m3_bf16_to_f32(h[i]);
  const int64_t scale_cols = (j->cols + M3_MXFP8_BLOCK - 1) / M3_MXFP8_BLOCK;
  uint8_t *q = out, *sc = out + n;
  for (int64_t r = 0; r < pc->rows; r++)
    m3_mxfp8_quantize_row(x + r * j->cols, j->cols, q + r * j->cols, sc + r * scale_cols);
  int err = pwrite_all(ww->fd, q, (size_t)n, ww->offsets[j->data] + (uint64_t)first);
  return err ? err : pwrite_all(ww->fd, sc, (size_t)(pc->rows * scale_cols),
                                ww->offsets[j->scale] + (uint64_t)(pc->row * scale_cols));
}

static void *write_worker(void *arg) {
  write_work *ww = arg;
  float *x = NULL;
  uint8_t *out = NULL;
  size_t cap = 0; /* values the buffers hold */
  for (int i; !atomic_load(&ww->failed) && (i = atomic_fetch_add(&ww->next, 1)) < ww->count;) {
    const piece *pc = &ww->pieces[i];
    size_t n = (size_t)(pc->rows * ww->jobs[pc->job].cols);
    if (n > cap) {
      free(x);
      free(out);
      /* out: bf16 values, or E4M3 values then e8m0 scales (at most one per value) */
      x = malloc(n * sizeof *x), out = malloc(2 * n), cap = n;
    }
    int err = !x || !out ? ENOMEM : write_piece(ww, pc, x, out);
    int none = 0;
    if (err) atomic_compare_exchange_strong(&ww->failed, &none, err);
  }
  free(x);
  free(out);
  return NULL;
}

/* Splits every job into pieces of whole rows (MXFP8 quantizes rows) of about PIECE_VALUES. */
static piece *split_jobs(const tensor_writer *tw, int *count) {
  int64_t total = 0;
  for (int i = 0; i < tw->count; i++) {
    int64_t per = tw->jobs[i].cols >= PIECE_VALUES ? 1 : PIECE_VALUES / tw->jobs[i].cols;
    total += (tw->jobs[i].rows + per - 1) / per;
  }
  piece *p = total < INT32_MAX ? malloc((size_t)(total + 1) * sizeof *p) : NULL;
  if (!p) return NULL;
  int k = 0;
  for (int i = 0; i < tw->count; i++) {
    const tensor_job *j = &tw->jobs[i];
    int64_t per = j->cols >= PIECE_VALUES ? 1 : PIECE_VALUES / j->cols;
    for (int64_t r = 0; r < j->rows; r += per)
      p[k++] = (piece){.job = i, .row = r, .rows = j->rows - r < per ? j->rows - r : per};
  }
  *count = k;
  return p;
}

static int thread_count(int requested, int pieces) {
  long n = requested > 0 ? requested : sysconf(_SC_NPROCESSORS_ONLN);
  if (n < 1) n = 1;
  if (n > 256) n = 256;
  return n < pieces ? (int)n : pieces > 0 ? pieces : 1;
}

/* Runs the pieces on `threads` threads (the calling one among them) into fd. */
static m3_status run_pieces(write_work *ww, int threads, const char *tmp) {
  pthread_t tid[256];
  int started = 0;
  for (; started < threads - 1; started++)
    if (pthread_create(&tid[started], NULL, write_worker, ww) != 0) break;
  write_worker(ww);
  for (int i = 0; i < started; i++) pthread_join(tid[i], NULL);
  int err = atomic_load(&ww->failed);
  if (err == ENOMEM) return m3_fail(M3_ERR_NOMEM, "%s: out of memory generating tensors", tmp);
  if (err) return m3_fail(M3_ERR_IO, "%s: write failed: %s", tmp, strerror(err));
  return M3_OK;
}

/* The file as m3_st_writer_write would write it from the same tensors, filled in place. */
static m3_status write_planned(const tensor_writer *tw, int threads) {
  const int n = m3_st_writer_count(tw->w);
  uint64_t *offsets = malloc(((size_t)n + 1) * sizeof *offsets);
  uint8_t *head = NULL;
  size_t head_len = 0;
  int count = 0;
  piece *pieces = split_jobs(tw, &count);
  char tmp[PATH_CAP + 8];
  snprintf(tmp, sizeof tmp, "%s.tmp", tw->path);
  m3_status st = !offsets || !pieces ? m3_fail(M3_ERR_NOMEM, "%s: planning %d tensors", tw->path, n)
                                     : m3_st_writer_layout(tw->w, tw->path, &head, &head_len, offsets);
  uint64_t size = head_len;
  for (int i = 0; st == M3_OK && i < tw->count; i++) {
    const tensor_job *j = &tw->jobs[i];
    uint64_t scale_bytes = j->scale < 0 ? 0 : (uint64_t)(j->rows * ((j->cols + M3_MXFP8_BLOCK - 1) / M3_MXFP8_BLOCK));
    size += (uint64_t)(j->rows * j->cols) * (j->format == OUT_F32 ? 4 : j->format == OUT_BF16 ? 2 : 1) + scale_bytes;
  }
  int fd = st == M3_OK ? open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644) : -1;
  if (st == M3_OK && fd < 0) st = m3_fail(M3_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
  int err = 0;
  if (st == M3_OK && ((err = pwrite_all(fd, head, head_len, 0)) || ftruncate(fd, (off_t)size) != 0))
    st = m3_fail(M3_ERR_IO, "%s: write failed: %s", tmp, strerror(err ? err : errno));
  if (st == M3_OK) {
    write_work ww = {.jobs = tw->jobs, .pieces = pieces, .count = count, .offsets = offsets, .fd = fd};
    st = run_pieces(&ww, thread_count(threads, count), tmp);
  }
  if (fd >= 0 && close(fd) != 0 && st == M3_OK)
    st = m3_fail(M3_ERR_IO, "%s: close failed: %s", tmp, strerror(errno));
  if (st == M3_OK && rename(tmp, tw->path) != 0)
    st = m3_fail(M3_ERR_IO, "%s: cannot rename to %s: %s", tmp, tw->path, strerror(errno));
  if (st != M3_OK && fd >= 0) unlink(tmp);
  free(pieces);
  free(head);
  free(offsets);
  return st;
}

static m3_status write_weights(const char *dir, const m3_config *cfg, const m3_tiny_options *opt) {
  char path[PATH_CAP];
  TRY(join(path, dir, "model.safetensors"));
  tensor_writer tw = {.w = m3_st_writer_new(), .seed = opt->seed, .dtype = opt->dtype, .cfg = cfg,
                      .prefix = cfg->is_vl ? "language_model." : "", .path = path};
  if (!tw.w) return m3_fail(M3_ERR_NOMEM, "%s: writer", path);
  m3_status st = m3_st_writer_set_metadata(tw.w, "format", "pt");
  if (st == M3_OK) st = put_text(&tw);
  if (st == M3_OK && cfg->vision.present) st = put_vision(&tw);
  if (st == M3_OK) st = write_planned(&tw, opt->threads);
  m3_st_writer_free(tw.w);
  free(tw.jobs);
  return st;
}

/* --no-vision: the bare text config of MiniMaxM3SparseForCausalLM (config.c reads it as such). */
static void drop_vision(m3_config *c) {
  c->is_vl = 0;
  snprintf(c->architecture, sizeof c->architecture, "MiniMaxM3SparseForCausalLM");
  c->vision = (m3_vision_config){0};
  c->projector_hidden_size = 0;
  c->image_token_id = c->video_token_id = -1;
}

m3_status m3_tiny_write(const char *dir, const m3_tiny_options *opt) {
  if (opt->dtype != M3_TINY_BF16 && opt->dtype != M3_TINY_F32 && opt->dtype != M3_TINY_MXFP8)
    return m3_fail(M3_ERR_ARG, "tiny: unknown dtype %d", (int)opt->dtype);
  if (opt->vocab < 0 || opt->vocab > M3_TINY_VOCAB_MAX)
    return m3_fail(M3_ERR_ARG, "--vocab %d is outside 1..%d (0 keeps the tokenizer's)", opt->vocab,
                   M3_TINY_VOCAB_MAX);
  /* Everything the options decide is checked before anything is written (the vocabulary's
   * lower bound, the tokenizer's size, right after the tokenizer). */
  uint8_t attn[LAYERS_MAX], mlp[LAYERS_MAX];
  m3_config cfg = {.layer_attn = attn, .layer_mlp = mlp};
  TRY(parse_plan(opt->layers ? opt->layers : M3_TINY_DEFAULT_LAYERS, &cfg));
  fill_config(&cfg, opt->dtype);
  TRY(apply_sizes(&cfg, opt));
  if (opt->no_mtp) cfg.num_mtp_modules = 0;
  TRY(make_dirs(dir));

  char path[PATH_CAP];
  int bpe_size;
  TRY(join(path, dir, "tokenizer.json"));
  TRY(m3_tiny_tokenizer_write(path, &bpe_size));
  set_vocab(&cfg, bpe_size);
  if (opt->vocab && opt->vocab < cfg.vocab_size) {
    unlink(path);
    return m3_fail(M3_ERR_ARG, "--vocab %d is below the tokenizer's %d tokens", opt->vocab,
                   cfg.vocab_size);
  }
  if (opt->vocab) cfg.vocab_size = opt->vocab;
  if (opt->no_vision) drop_vision(&cfg);
  TRY(join(path, dir, "config.json"));
  TRY(m3_config_write(&cfg, path));
  return write_weights(dir, &cfg, opt);
}

/* ---- the built-in model ---- */

static m3_status cache_root(char *out) {
  const char *m3_cache = getenv("M3_CACHE"), *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
  int n;
  if (m3_cache && *m3_cache) n = snprintf(out, PATH_CAP, "%s", m3_cache);
  else if (xdg && *xdg) n = snprintf(out, PATH_CAP, "%s/m3", xdg);
  else if (home && *home) n = snprintf(out, PATH_CAP, "%s/.cache/m3", home);
  else return m3_fail(M3_ERR_IO, "built-in model: no cache folder (set M3_CACHE, XDG_CACHE_HOME or HOME)");
  if (n >= PATH_CAP) return m3_fail(M3_ERR_ARG, "built-in model: cache path too long");
  return M3_OK;
}

static void remove_partial_model(const char *dir) {
  static const char *const files[] = {"config.json", "model.safetensors", "tokenizer.json"};
  char path[PATH_CAP];
  for (size_t i = 0; i < sizeof files / sizeof files[0]; i++)
    if (join(path, dir, files[i]) == M3_OK) unlink(path);
  rmdir(dir);
}

m3_status m3_builtin_model_dir(char *out, size_t cap) {
  char root[PATH_CAP], final_dir[PATH_CAP], tmp[PATH_CAP], probe[PATH_CAP];
  TRY(cache_root(root));
  char leaf[64];
  snprintf(leaf, sizeof leaf, "tiny-v%d", TINY_FORMAT_VERSION);
  TRY(join(final_dir, root, leaf));
  if (strlen(final_dir) + 1 > cap) return m3_fail(M3_ERR_ARG, "%s: path longer than the caller's buffer", final_dir);

  /* The folder appears only by rename of a complete one, so its existence means it is complete. */
  TRY(join(probe, final_dir, "config.json"));
  if (access(probe, F_OK) != 0) {
    TRY(make_dirs(root));
    if (snprintf(tmp, sizeof tmp, "%s.tmp-XXXXXX", final_dir) >= (int)sizeof tmp)
      return m3_fail(M3_ERR_ARG, "%s: path too long", final_dir);
    if (!mkdtemp(tmp)) return m3_fail(M3_ERR_IO, "%s: cannot create folder: %s", tmp, strerror(errno));
    m3_tiny_options opt = m3_tiny_default_options();
    m3_status st = m3_tiny_write(tmp, &opt);
    if (st != M3_OK) {
      remove_partial_model(tmp);
      return m3_fail_context(st, "built-in model");
    }
    if (rename(tmp, final_dir) != 0) {
      int err = errno;
      remove_partial_model(tmp);
      /* Another process renamed its copy first: use that one. */
      if (access(probe, F_OK) != 0)
        return m3_fail(M3_ERR_IO, "%s: cannot move into place: %s", final_dir, strerror(err));
    }
  }
  snprintf(out, cap, "%s", final_dir);
  return M3_OK;
}
