/* m3 inspect [--model DIR] [--json] [--ctx N] [--quantize mxfp8]: what a checkpoint is and what it costs to run.
 *
 * Parameter counts come from config arithmetic (so a config-only folder of the 427B model can be
 * described); when the folder has weights they are bound by name and shape (m3_weights_bind) and
 * the elements of the bound tensors must equal the arithmetic total, which checks both.
 * Active parameters are what one token's forward pass multiplies with, except embeddings,
 * lm_head and vision: attention, indexer, norms, router, the top-k routed and the shared experts,
 * dense MLPs, the final norm. MTP modules (a draft model) count in the total only. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/commands.h"
#include "cli/model_args.h"
#include "engine/parallel.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "io/quantize.h"
#include "io/weights.h"

enum { PATH_CAP = 4096, DEFAULT_CTX_CAP = 131072 };

/* ---- parameter arithmetic ---- */

/* How a tensor is stored when a config-only folder's bytes are estimated: the BF16 release keeps
 * the router weight and bias in F32 and the vision patch embedding in F32; the quantized releases
 * quantize the linears of attention (q/k/v/o), dense MLPs and experts (spec §9.2, §9.3). */
typedef enum { ROLE_PLAIN, ROLE_F32, ROLE_QUANTIZABLE } tensor_role;

typedef struct {
  const m3_quant_config *quant; /* how ROLE_QUANTIZABLE tensors are estimated */
  int64_t params;
  int64_t bytes[M3_DT_COUNT];   /* estimated storage */
} ledger;

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

static void add(ledger *l, tensor_role role, int64_t rows, int64_t cols, int64_t times) {
  int64_t n = rows * cols * times;
  l->params += n;
  m3_quant_method q = l->quant ? l->quant->method : M3_QUANT_NONE;
  if (role == ROLE_F32) {
    l->bytes[M3_DT_F32] += 4 * n;
  } else if (role == ROLE_QUANTIZABLE && q == M3_QUANT_MXFP8) {
    l->bytes[M3_DT_F8_E4M3] += n;
    l->bytes[M3_DT_U8] += rows * ceil_div(cols, 32) * times;
  } else if (role == ROLE_QUANTIZABLE && q == M3_QUANT_FP8_BLOCK) {
    int br = l->quant->block_rows > 0 ? l->quant->block_rows : 128;
    int bc = l->quant->block_cols > 0 ? l->quant->block_cols : 128;
    l->bytes[M3_DT_F8_E4M3] += n;
    l->bytes[M3_DT_F32] += 4 * ceil_div(rows, br) * ceil_div(cols, bc) * times;
  } else {
    l->bytes[M3_DT_BF16] += 2 * n;
  }
}

static void add_attention(ledger *l, const m3_config *c, int sparse) {
  int64_t H = c->hidden_size, hd = c->head_dim, qw = (int64_t)c->num_heads * hd;
  int64_t kvw = (int64_t)c->num_kv_heads * hd, ihd = c->index_head_dim;
  add(l, ROLE_PLAIN, 2, H, 1);                 /* input and post-attention norms */
  add(l, ROLE_QUANTIZABLE, qw, H, 1);          /* q_proj */
  add(l, ROLE_QUANTIZABLE, kvw, H, 2);         /* k_proj, v_proj */
  add(l, ROLE_QUANTIZABLE, H, qw, 1);          /* o_proj */
  add(l, ROLE_PLAIN, 2, hd, 1);                /* q_norm, k_norm */
  if (!sparse) return;
  add(l, ROLE_PLAIN, (int64_t)c->index_num_heads * ihd, H, 1); /* index_q_proj */
  add(l, ROLE_PLAIN, ihd, H, 1);                               /* index_k_proj */
  add(l, ROLE_PLAIN, 2, ihd, 1);                               /* index q/k norms */
}

/* `experts`: how many routed experts to count (all of them, or the top-k a token uses). */
static void add_mlp(ledger *l, const m3_config *c, int moe, int64_t experts) {
  int64_t H = c->hidden_size;
  if (!moe) {
    add(l, ROLE_QUANTIZABLE, c->dense_intermediate_size, H, 2); /* gate, up */
    add(l, ROLE_QUANTIZABLE, H, c->dense_intermediate_size, 1); /* down */
    return;
  }
  int64_t I = c->intermediate_size, S = c->shared_intermediate_size;
  add(l, ROLE_F32, c->num_experts, H, 1);      /* router */
  if (c->use_routing_bias) add(l, ROLE_F32, 1, c->num_experts, 1);
  add(l, ROLE_QUANTIZABLE, I, H, 2 * experts); /* w1, w3 */
  add(l, ROLE_QUANTIZABLE, H, I, experts);     /* w2 */
  if (c->num_shared_experts > 0) {
    add(l, ROLE_QUANTIZABLE, S, H, 2);
    add(l, ROLE_QUANTIZABLE, H, S, 1);
  }
}

static void add_layers(ledger *l, const m3_config *c, int active) {
  for (int i = 0; i < c->num_layers; i++) {
    int moe = c->layer_mlp[i] == M3_MLP_MOE;
    add_attention(l, c, c->layer_attn[i] == M3_ATTN_SPARSE);
    add_mlp(l, c, moe, active ? c->num_experts_per_tok : c->num_experts);
  }
  add(l, ROLE_PLAIN, 1, c->hidden_size, 1); /* final norm */
}

/* One MTP module: enorm, hnorm, eh_proj [H, 2H] (BF16 in the MTP release), final norm, and a
 * sparse-attention MoE layer (spec §8.1). */
static void add_mtp(ledger *l, const m3_config *c) {
  int64_t H = c->hidden_size;
  add(l, ROLE_PLAIN, 3, H, 1);
  add(l, ROLE_PLAIN, H, 2 * H, 1);
  add_attention(l, c, 1);
  add_mlp(l, c, 1, c->num_experts);
}

static void add_vision_tower(ledger *l, const m3_config *c) {
  const m3_vision_config *v = &c->vision;
  int64_t D = v->hidden_size, F = v->intermediate_size;
  int64_t patch_in = (int64_t)v->num_channels * v->temporal_patch_size * v->patch_size * v->patch_size;
  add(l, ROLE_F32, D, patch_in, 1);             /* Conv3d patch embedding, no bias */
  add(l, ROLE_PLAIN, 2, D, 1);                  /* pre-LayerNorm */
  int64_t per_layer_vectors = 4 * D + 4 * D + F + D; /* 2 LayerNorms, q/k/v/out biases, fc biases */
  add(l, ROLE_PLAIN, D, D, 4 * (int64_t)v->num_layers);
  add(l, ROLE_PLAIN, F, D, 2 * (int64_t)v->num_layers); /* fc1 [F, D], fc2 [D, F] */
  add(l, ROLE_PLAIN, 1, per_layer_vectors, v->num_layers);
}

/* multi_modal_projector D -> P -> H and patch_merge_mlp 4H -> P -> H, with biases. */
static void add_projector(ledger *l, const m3_config *c) {
  int64_t D = c->vision.hidden_size, P = c->projector_hidden_size, H = c->hidden_size;
  int64_t merge = (int64_t)c->vision.spatial_merge_size * c->vision.spatial_merge_size;
  add(l, ROLE_PLAIN, P, D + 1, 1);
  add(l, ROLE_PLAIN, H, P + 1, 1);
  add(l, ROLE_PLAIN, P, merge * H + 1, 1);
  add(l, ROLE_PLAIN, H, P + 1, 1);
}

/* ---- what the checkpoint holds ---- */

typedef struct {
  int64_t elements;
  int by_quant[3]; /* m3_weight_quant */
} bound_count;

static void visit(bound_count *b, const m3_tensor *t) {
  if (!m3_tensor_present(t)) return;
  b->elements += t->rows * t->cols;
  b->by_quant[t->quant]++;
}

static void visit_layer(bound_count *b, const m3_layer_weights *l, int num_experts) {
  const m3_tensor *fixed[] = {
      &l->input_norm,   &l->post_attn_norm, &l->q_proj,       &l->k_proj,       &l->v_proj,
      &l->o_proj,       &l->q_norm,         &l->k_norm,       &l->index_q_proj, &l->index_k_proj,
      &l->index_q_norm, &l->index_k_norm,   &l->mlp_gate,     &l->mlp_up,       &l->mlp_down,
      &l->router,       &l->router_bias,    &l->shared_gate,  &l->shared_up,    &l->shared_down,
  };
  for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++) visit(b, fixed[i]);
  if (!l->expert_gate) return;
  for (int e = 0; e < num_experts; e++) {
    visit(b, &l->expert_gate[e]);
    visit(b, &l->expert_up[e]);
    visit(b, &l->expert_down[e]);
  }
}

static void visit_vision(bound_count *b, const m3_vision_weights *v, int num_layers) {
  const m3_tensor *fixed[] = {&v->patch_embed, &v->pre_ln_w, &v->pre_ln_b, &v->proj1_w,
                              &v->proj1_b,     &v->proj2_w,  &v->proj2_b,  &v->merge1_w,
                              &v->merge1_b,    &v->merge2_w, &v->merge2_b};
  for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++) visit(b, fixed[i]);
  for (int i = 0; i < num_layers; i++) {
    const m3_vision_layer_weights *l = &v->layers[i];
    const m3_tensor *t[] = {&l->ln1_w, &l->ln1_b, &l->ln2_w, &l->ln2_b, &l->q_w,   &l->q_b,
                            &l->k_w,   &l->k_b,   &l->v_w,   &l->v_b,   &l->out_w, &l->out_b,
                            &l->fc1_w, &l->fc1_b, &l->fc2_w, &l->fc2_b};
    for (size_t k = 0; k < sizeof t / sizeof t[0]; k++) visit(b, t[k]);
  }
}

static bound_count count_bound(const m3_config *c, const m3_weights *w) {
  bound_count b = {0};
  visit(&b, &w->embed);
  visit(&b, &w->final_norm);
  if (!w->lm_head_tied) visit(&b, &w->lm_head);
  for (int i = 0; i < c->num_layers; i++) visit_layer(&b, &w->layers[i], c->num_experts);
  for (int i = 0; i < w->num_mtp; i++) {
    const m3_mtp_weights *m = &w->mtp[i];
    visit(&b, &m->enorm);
    visit(&b, &m->hnorm);
    visit(&b, &m->eh_proj);
    visit(&b, &m->final_norm);
    visit_layer(&b, &m->layer, c->num_experts);
  }
  if (w->vision.present) visit_vision(&b, &w->vision, c->vision.num_layers);
  return b;
}

/* ---- the report ---- */

typedef struct {
  const char *dir;
  const m3_config *cfg;
  int has_weights;
  int quantize; /* --quantize mxfp8: bytes and counts as the model has them once loaded */
  int num_mtp, has_vision, tied;
  ledger text, mtp, vision, projector, active;
  int64_t total, active_with_embeddings;
  int64_t bytes[M3_DT_COUNT]; /* from the checkpoint, or the estimate */
  int64_t weight_bytes;
  int64_t kv_per_token, ctx, memory;
  bound_count bound;
} report;

/* --quantize mxfp8 on a checkpoint without quantization: its linears estimated as MXFP8. */
static const m3_quant_config MXFP8_AT_LOAD = {.present = 1, .method = M3_QUANT_MXFP8,
                                              .method_name = "mxfp8", .block_rows = 1,
                                              .block_cols = 32};

/* What --quantize mxfp8 does to the bound weights' bytes: each plain linear it converts leaves
 * its dtype's count for E4M3 data and e8m0 scales. */
static void add_conversion(report *r, const m3_config *c, m3_weights *w) {
  int64_t n = m3_weights_mxfp8_targets(c, w, NULL);
  m3_tensor **targets = malloc((size_t)(n ? n : 1) * sizeof *targets);
  if (!targets) return;
  m3_weights_mxfp8_targets(c, w, targets);
  for (int64_t i = 0; i < n; i++) {
    const m3_tensor *t = targets[i];
    r->bytes[t->dtype] -= t->rows * t->cols * (int64_t)m3_dtype_size(t->dtype);
    r->bytes[M3_DT_F8_E4M3] += t->rows * t->cols;
    r->bytes[M3_DT_U8] += t->rows * ceil_div(t->cols, 32);
    r->bound.by_quant[M3_WQ_NONE]--;
    r->bound.by_quant[M3_WQ_MXFP8]++;
  }
  free(targets);
}

static void compute(report *r, const m3_safetensors *st, m3_weights *w) {
  const m3_config *c = r->cfg;
  const m3_quant_config *q = r->quantize && !c->quant.present ? &MXFP8_AT_LOAD : &c->quant;
  r->text = (ledger){.quant = q};
  int64_t H = c->hidden_size, V = c->vocab_size;
  add(&r->text, ROLE_PLAIN, V, H, r->tied ? 1 : 2); /* embeddings (+ untied lm_head) */
  add_layers(&r->text, c, 0);
  r->mtp = (ledger){.quant = q};
  for (int i = 0; i < r->num_mtp; i++) add_mtp(&r->mtp, c);
  r->vision = (ledger){.quant = q};
  r->projector = (ledger){.quant = q};
  if (r->has_vision) {
    add_vision_tower(&r->vision, c);
    add_projector(&r->projector, c);
  }
  r->active = (ledger){.quant = q};
  add_layers(&r->active, c, 1);
  r->total = r->text.params + r->mtp.params + r->vision.params + r->projector.params;
  /* A token reads one embedding row and all of lm_head. */
  r->active_with_embeddings = r->active.params + H + V * H;

  const ledger *parts[] = {&r->text, &r->mtp, &r->vision, &r->projector};
  for (int d = 0; d < M3_DT_COUNT; d++) {
    r->bytes[d] = 0;
    if (!st)
      for (size_t p = 0; p < sizeof parts / sizeof parts[0]; p++) r->bytes[d] += parts[p]->bytes[d];
  }
  for (int i = 0; st && i < m3_st_count(st); i++) r->bytes[m3_st_at(st, i)->dtype] += (int64_t)m3_st_at(st, i)->nbytes;
  if (st && r->quantize) add_conversion(r, c, w);
  r->weight_bytes = 0;
  for (int d = 0; d < M3_DT_COUNT; d++) r->weight_bytes += r->bytes[d];

  /* bf16 K and V per KV head; sparse layers also cache one index key (spec §5, msa_spec). */
  r->kv_per_token = 0;
  for (int i = 0; i < c->num_layers; i++)
    r->kv_per_token += 2 * (int64_t)c->num_kv_heads * c->head_dim * 2 +
                       (c->layer_attn[i] == M3_ATTN_SPARSE ? (int64_t)c->index_head_dim * 2 : 0);
  r->memory = r->weight_bytes + r->kv_per_token * r->ctx;
}

static const char *attn_name(int a) { return a == M3_ATTN_SPARSE ? "sparse" : "full"; }
static const char *mlp_name(int m) { return m == M3_MLP_MOE ? "moe" : "dense"; }

static const char *quant_name(const report *r) {
  if (r->quantize && !r->cfg->quant.present) return "mxfp8 (--quantize, converted at load)";
  return r->cfg->quant.present ? r->cfg->quant.method_name : "none";
}

/* 1234567 -> "1,234,567" */
static const char *grouped(int64_t v, char buf[32]) {
  char digits[24];
  int n = snprintf(digits, sizeof digits, "%lld", (long long)(v < 0 ? -v : v));
  char *o = buf;
  if (v < 0) *o++ = '-';
  for (int i = 0; i < n; i++) {
    if (i > 0 && (n - i) % 3 == 0) *o++ = ',';
    *o++ = digits[i];
  }
  *o = 0;
  return buf;
}

/* 23504087424 -> "23.50B"; small models get M or K. */
static const char *short_count(int64_t v, char buf[32]) {
  double d = (double)v;
  if (d >= 1e9) snprintf(buf, 32, "%.2fB", d / 1e9);
  else if (d >= 1e6) snprintf(buf, 32, "%.2fM", d / 1e6);
  else snprintf(buf, 32, "%.1fK", d / 1e3);
  return buf;
}

static const char *short_bytes(int64_t v, char buf[32]) {
  double d = (double)v;
  if (d >= 1024.0 * 1024 * 1024) snprintf(buf, 32, "%.2f GiB", d / (1024.0 * 1024 * 1024));
  else if (d >= 1024.0 * 1024) snprintf(buf, 32, "%.2f MiB", d / (1024.0 * 1024));
  else snprintf(buf, 32, "%.1f KiB", d / 1024.0);
  return buf;
}

static void print_layer_runs(const m3_config *c) {
  for (int i = 0; i < c->num_layers;) {
    int j = i;
    while (j + 1 < c->num_layers && c->layer_attn[j + 1] == c->layer_attn[i] && c->layer_mlp[j + 1] == c->layer_mlp[i]) j++;
    printf("%s", i ? "; " : "");
    if (j > i) printf("%d-%d ", i, j);
    else printf("%d ", i);
    printf("%s + %s", c->layer_attn[i] == M3_ATTN_SPARSE ? "sparse (MSA)" : "full attention",
           c->layer_mlp[i] == M3_MLP_MOE ? "MoE" : "dense MLP");
    i = j + 1;
  }
  printf("\n");
}

static void print_text(const report *r) {
  const m3_config *c = r->cfg;
  char a[32], b[32], d[32];
  printf("model         %s (%s)\n", r->dir, r->has_weights ? "config + weights" : "config only");
  printf("architecture  %s\n", c->architecture[0] ? c->architecture : "(not given)");
  printf("layers        %d: ", c->num_layers);
  print_layer_runs(c);
  printf("text          hidden %d, %d heads x %d (%d KV heads), vocab %s\n", c->hidden_size,
         c->num_heads, c->head_dim, c->num_kv_heads, grouped(c->vocab_size, a));
  if (c->num_experts > 0)
    printf("experts       %d routed (top %d) x %d wide, %d shared x %d wide\n", c->num_experts,
           c->num_experts_per_tok, c->intermediate_size, c->num_shared_experts, c->shared_intermediate_size);
  printf("MTP modules   %d counted (config says %d%s)\n", r->num_mtp, c->num_mtp_modules,
         r->has_weights ? "" : "; a config-only folder counts none");
  if (r->has_vision)
    printf("vision        %d layers x %d, projector %d\n", c->vision.num_layers, c->vision.hidden_size,
           c->projector_hidden_size);
  printf("parameters    total %s (text %s", grouped(r->total, a), grouped(r->text.params, b));
  if (r->num_mtp) printf(", MTP %s", grouped(r->mtp.params, a));
  if (r->has_vision) printf(", vision %s, projector %s", grouped(r->vision.params, a), grouped(r->projector.params, d));
  printf(")\n");
  printf("              active per token %s (%s; without embeddings and lm_head)\n",
         grouped(r->active.params, a), short_count(r->active.params, b));
  printf("              active with lm_head + one embedding row %s (%s)\n",
         grouped(r->active_with_embeddings, a), short_count(r->active_with_embeddings, b));
  if (r->has_weights)
    printf("              bound tensors hold %s elements = the arithmetic total\n", grouped(r->bound.elements, a));
  printf("weights       %s bytes (%s)%s:", grouped(r->weight_bytes, a), short_bytes(r->weight_bytes, d),
         r->has_weights ? "" : " estimated from the config");
  for (int dt = 0; dt < M3_DT_COUNT; dt++)
    if (r->bytes[dt]) printf(" %s %s", m3_dtype_name((m3_dtype)dt), grouped(r->bytes[dt], b));
  printf("\n");
  printf("KV cache      %s bytes per token (bf16 K, V and index keys)\n", grouped(r->kv_per_token, a));
  printf("memory        %s bytes (%s) for a %s-token context: weights + KV cache\n",
         grouped(r->memory, a), short_bytes(r->memory, d), grouped(r->ctx, b));
  printf("quantization  %s", quant_name(r));
  if (c->quant.present)
    printf(" (block %dx%d, activations %s)", c->quant.block_rows, c->quant.block_cols,
           c->quant.activation_scheme[0] ? c->quant.activation_scheme : "unspecified");
  if (r->has_weights)
    printf("; %d quantized tensors (MXFP8 %d, FP8 block %d)", r->bound.by_quant[M3_WQ_MXFP8] + r->bound.by_quant[M3_WQ_FP8_BLOCK],
           r->bound.by_quant[M3_WQ_MXFP8], r->bound.by_quant[M3_WQ_FP8_BLOCK]);
  printf("\n");
}

static m3_status print_json(const report *r) {
  const m3_config *c = r->cfg;
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "model", r->dir);
  cJSON_AddBoolToObject(o, "weights_present", r->has_weights);
  cJSON_AddStringToObject(o, "architecture", c->architecture);
  cJSON_AddNumberToObject(o, "num_layers", c->num_layers);
  cJSON *layers = cJSON_AddArrayToObject(o, "layers");
  for (int i = 0; i < c->num_layers; i++) {
    cJSON *l = cJSON_CreateObject();
    cJSON_AddStringToObject(l, "attention", attn_name(c->layer_attn[i]));
    cJSON_AddStringToObject(l, "mlp", mlp_name(c->layer_mlp[i]));
    cJSON_AddItemToArray(layers, l);
  }
  cJSON_AddNumberToObject(o, "num_mtp_modules", r->num_mtp);
  cJSON_AddBoolToObject(o, "vision", r->has_vision);
  cJSON_AddNumberToObject(o, "params_total", (double)r->total);
  cJSON_AddNumberToObject(o, "params_text", (double)r->text.params);
  cJSON_AddNumberToObject(o, "params_mtp", (double)r->mtp.params);
  cJSON_AddNumberToObject(o, "params_vision", (double)r->vision.params);
  cJSON_AddNumberToObject(o, "params_projector", (double)r->projector.params);
  cJSON_AddNumberToObject(o, "params_active", (double)r->active.params);
  cJSON_AddNumberToObject(o, "params_active_with_embeddings", (double)r->active_with_embeddings);
  if (r->has_weights) cJSON_AddNumberToObject(o, "bound_elements", (double)r->bound.elements);
  cJSON *bytes = cJSON_AddObjectToObject(o, "bytes_by_dtype");
  for (int dt = 0; dt < M3_DT_COUNT; dt++)
    if (r->bytes[dt]) cJSON_AddNumberToObject(bytes, m3_dtype_name((m3_dtype)dt), (double)r->bytes[dt]);
  cJSON_AddBoolToObject(o, "bytes_estimated", !r->has_weights);
  cJSON_AddNumberToObject(o, "weight_bytes", (double)r->weight_bytes);
  cJSON_AddNumberToObject(o, "kv_bytes_per_token", (double)r->kv_per_token);
  cJSON_AddNumberToObject(o, "ctx", (double)r->ctx);
  cJSON_AddNumberToObject(o, "memory_bytes", (double)r->memory);
  cJSON *q = cJSON_AddObjectToObject(o, "quantization");
  cJSON_AddStringToObject(q, "method", quant_name(r));
  if (r->has_weights) {
    cJSON_AddNumberToObject(q, "quantized_tensors", r->bound.by_quant[M3_WQ_MXFP8] + r->bound.by_quant[M3_WQ_FP8_BLOCK]);
    cJSON *by = cJSON_AddObjectToObject(q, "by_format");
    cJSON_AddNumberToObject(by, "mxfp8", r->bound.by_quant[M3_WQ_MXFP8]);
    cJSON_AddNumberToObject(by, "fp8_block", r->bound.by_quant[M3_WQ_FP8_BLOCK]);
  } else {
    cJSON_AddNullToObject(q, "quantized_tensors");
  }
  char *text = cJSON_Print(o);
  cJSON_Delete(o);
  if (!text) return m3_fail(M3_ERR_NOMEM, "inspect: out of memory printing JSON");
  printf("%s\n", text);
  free(text);
  return M3_OK;
}

/* ---- the command ---- */

static void inspect_usage(FILE *f) {
  fprintf(f,
          "usage: m3 inspect [--model DIR] [--json] [--ctx N] [--quantize mxfp8] [--tp N] [--ep N]\n"
          "  describes a checkpoint folder (config.json, with or without weights): layer kinds,\n"
          "  parameters (total and active per token), bytes by dtype, KV cache per token, the\n"
          "  memory needed for N tokens of context, and the quantization found\n"
          "  --model DIR  the folder (default: " M3_CLI_DEFAULT_MODEL ")\n"
          "  --json       one JSON object instead of text\n"
          "  --ctx N      context length for the memory figure (default: max_position_embeddings,\n"
          "               at most %d)\n"
          "  --quantize mxfp8  bytes as `--quantize mxfp8` loads the model (BF16 linears as MXFP8)\n"
          "  --tp N, --ep N    then the multi-GPU layout plan for N-way tensor / expert parallel\n"
          "                    (what each GPU holds and the collectives of a decode step)\n",
          DEFAULT_CTX_CAP);
}

static m3_status parse_ctx(const char *s, int64_t *out) {
  char *end;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (!*s || *end || errno || v < 1 || v > (1ll << 40))
    return m3_fail(M3_ERR_ARG, "--ctx '%s': expected a token count in 1..2^40", s);
  *out = v;
  return M3_OK;
}

static m3_status inspect(const char *dir, int64_t ctx, int json, int quantize) {
  char path[PATH_CAP];
  if (snprintf(path, sizeof path, "%s/config.json", dir) >= (int)sizeof path)
    return m3_fail(M3_ERR_ARG, "%s: path too long", dir);
  m3_config cfg;
  m3_status st = m3_config_load(path, &cfg);
  if (st != M3_OK) return st;

  report r = {.dir = dir, .cfg = &cfg, .quantize = quantize, .tied = cfg.tie_word_embeddings, .has_vision = cfg.vision.present};
  r.ctx = ctx > 0 ? ctx : (cfg.max_position_embeddings < DEFAULT_CTX_CAP ? cfg.max_position_embeddings : DEFAULT_CTX_CAP);
  m3_safetensors *sf = NULL;
  m3_weights w = {0};
  st = m3_st_open_dir(dir, &sf);
  if (st == M3_ERR_MISSING) {
    st = M3_OK; /* a config-only folder: arithmetic only */
  } else if (st == M3_OK) {
    st = m3_weights_bind(&cfg, sf, &w);
    if (st != M3_OK) m3_fail_context(st, "%s", dir);
    if (st == M3_OK) {
      r.has_weights = 1;
      r.num_mtp = w.num_mtp;
      r.has_vision = w.vision.present;
      r.tied = w.lm_head_tied;
      r.bound = count_bound(&cfg, &w);
    }
  }
  if (st == M3_OK) {
    compute(&r, r.has_weights ? sf : NULL, &w);
    if (r.has_weights && r.bound.elements != r.total)
      st = m3_fail(M3_ERR_SHAPE, "%s: the bound tensors hold %lld elements but the config implies %lld",
                   dir, (long long)r.bound.elements, (long long)r.total);
  }
  if (st == M3_OK) {
    if (json) st = print_json(&r);
    else print_text(&r);
  }
  m3_weights_free(&w);
  m3_st_close(sf);
  m3_config_free(&cfg);
  return st;
}

int m3_cmd_inspect(int argc, char **argv) {
  const char *dir = NULL;
  int json = 0;
  int64_t ctx = 0;
  const char *quantize = NULL;
  long tp = 0, ep = 0;
  m3_status st = M3_OK;
  for (int i = 1; i < argc && st == M3_OK; i++) {
    const char *a = argv[i];
    if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
      inspect_usage(stdout);
      return 0;
    }
    if ((strcmp(a, "--model") == 0 || strcmp(a, "--ctx") == 0 || strcmp(a, "--quantize") == 0 ||
         strcmp(a, "--tp") == 0 || strcmp(a, "--ep") == 0) &&
        i + 1 >= argc) st = m3_fail(M3_ERR_ARG, "%s needs a value", a);
    else if (strcmp(a, "--model") == 0) dir = argv[++i];
    else if (strcmp(a, "--ctx") == 0) st = parse_ctx(argv[++i], &ctx);
    else if (strcmp(a, "--json") == 0) json = 1;
    else if (strcmp(a, "--quantize") == 0) st = m3_cli_parse_quantize(argv[++i], &quantize);
    else if (strcmp(a, "--tp") == 0) st = m3_cli_parse_long(a, argv[++i], 1, M3_PARALLEL_MAX_RANKS, &tp);
    else if (strcmp(a, "--ep") == 0) st = m3_cli_parse_long(a, argv[++i], 1, M3_PARALLEL_MAX_RANKS, &ep);
    else st = m3_fail(M3_ERR_ARG, "unknown argument '%s' (see m3 inspect --help)", a);
  }
  m3_cli_model_paths paths;
  if (st == M3_OK) st = m3_cli_model_or_default(&dir, NULL, &paths);
  if (st == M3_OK && json && (tp || ep)) st = m3_fail(M3_ERR_ARG, "--tp/--ep: not with --json");
  if (st == M3_OK) st = inspect(dir, ctx, json, quantize != NULL);
  if (st == M3_OK && (tp || ep)) st = m3_cli_print_plan(dir, (int)tp, (int)ep);
  return st == M3_OK ? 0 : m3_cli_fail("inspect", st);
}
