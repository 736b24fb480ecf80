/* test_io_config: config.json parsing against the values of shared/spec/m3_text_spec.md §1 and
 * m3_vision_chat_spec.md §1 (the reference), both key spellings, defaults, every error class, and
 * the write -> parse round trip. Error cases edit one key of a small valid config through cJSON, so
 * each case differs from a config that parses in exactly the way it names. */
#include <cjson/cJSON.h>
#include <stdarg.h>
#include <stdlib.h>
#include <unistd.h>

#include "check.h"
#include "io/config.h"

static const char FULL_CONFIG[] = M3_SOURCE_DIR "/tests/data/m3_full/config.json";

/* 4 layers: 0 full/dense, 1-3 sparse/MoE; legacy spelling. */
static const char TINY[] =
    "{\"architectures\": [\"MiniMaxM3SparseForConditionalGeneration\"],"
    " \"model_type\": \"minimax_m3_vl\","
    " \"text_config\": {\"hidden_size\": 64, \"num_hidden_layers\": 4, \"num_attention_heads\": 4,"
    "  \"num_key_value_heads\": 2, \"head_dim\": 16, \"vocab_size\": 256, \"intermediate_size\": "
    "32,"
    "  \"dense_intermediate_size\": 96, \"num_local_experts\": 8, \"num_experts_per_tok\": 2,"
    "  \"rotary_dim\": 8, \"partial_rotary_factor\": 0.5, \"rope_theta\": 10000,"
    "  \"moe_layer_freq\": [0, 1, 1, 1],"
    "  \"sparse_attention_config\": {\"use_sparse_attention\": true,"
    "   \"sparse_attention_freq\": [0, 1, 1, 1], \"sparse_num_index_heads\": 2,"
    "   \"sparse_index_dim\": 16, \"sparse_block_size\": 4, \"sparse_topk_blocks\": 3,"
    "   \"sparse_local_block\": 1, \"sparse_init_block\": 1}}}";

static char *read_text(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *buf = malloc((size_t)n + 1);
  size_t got = buf ? fread(buf, 1, (size_t)n, f) : 0;
  fclose(f);
  if (!buf) return NULL;
  buf[got] = '\0';
  return buf;
}

/* The item at a dotted path, creating missing parent objects. */
static cJSON *parent_of(cJSON *root, const char *path, const char **leaf) {
  char part[128];
  const char *dot;
  cJSON *obj = root;
  while ((dot = strchr(path, '.')) != NULL) {
    snprintf(part, sizeof part, "%.*s", (int)(dot - path), path);
    cJSON *next = cJSON_GetObjectItemCaseSensitive(obj, part);
    if (!next) next = cJSON_AddObjectToObject(obj, part);
    obj = next;
    path = dot + 1;
  }
  *leaf = path;
  return obj;
}

/* Parses `base` after edits given as (dotted path, JSON value text or NULL to delete) pairs,
 * terminated by NULL. */
static m3_status parse_edited(const char *base, m3_config *out, ...) {
  cJSON *root = cJSON_Parse(base);
  va_list ap;
  va_start(ap, out);
  const char *path;
  while ((path = va_arg(ap, const char *)) != NULL) {
    const char *value = va_arg(ap, const char *), *leaf;
    cJSON *obj = parent_of(root, path, &leaf);
    cJSON_DeleteItemFromObjectCaseSensitive(obj, leaf);
    if (value) cJSON_AddItemToObject(obj, leaf, cJSON_Parse(value));
  }
  va_end(ap);
  char *text = cJSON_PrintUnformatted(root);
  m3_status s = m3_config_parse(text, strlen(text), "edited.json", out);
  cJSON_free(text);
  cJSON_Delete(root);
  return s;
}

static int count_kind(const uint8_t *kinds, int n, int kind) {
  int c = 0;
  for (int i = 0; i < n; i++) c += kinds[i] == kind;
  return c;
}

static void check_same(const m3_config *a, const m3_config *b) {
#define SAME(f) CHECK_EQ_INT(a->f, b->f)
#define SAME_REAL(f) CHECK_NEAR(a->f, b->f, 0)
  SAME(hidden_size);
  SAME(num_layers);
  SAME(num_heads);
  SAME(num_kv_heads);
  SAME(head_dim);
  SAME(vocab_size);
  SAME(max_position_embeddings);
  SAME_REAL(rms_norm_eps);
  SAME_REAL(rope_theta);
  SAME(rotary_dim);
  SAME_REAL(swiglu_alpha);
  SAME_REAL(swiglu_beta);
  SAME_REAL(swiglu_limit);
  SAME(intermediate_size);
  SAME(shared_intermediate_size);
  SAME(dense_intermediate_size);
  SAME(num_experts);
  SAME(num_experts_per_tok);
  SAME(num_shared_experts);
  SAME_REAL(routed_scaling_factor);
  SAME(use_routing_bias);
  SAME(tie_word_embeddings);
  SAME(num_mtp_modules);
  SAME(bos_token_id);
  SAME(eos_token_id);
  SAME(index_num_heads);
  SAME(index_head_dim);
  SAME(index_block_size);
  SAME(index_topk_blocks);
  SAME(index_local_blocks);
  SAME(index_init_blocks);
  SAME(is_vl);
  SAME(image_token_id);
  SAME(video_token_id);
  SAME(projector_hidden_size);
  CHECK_STR(a->architecture, b->architecture);
  CHECK(a->num_layers == b->num_layers && a->layer_attn && b->layer_attn &&
        memcmp(a->layer_attn, b->layer_attn, (size_t)a->num_layers) == 0);
  CHECK(a->num_layers == b->num_layers && a->layer_mlp && b->layer_mlp &&
        memcmp(a->layer_mlp, b->layer_mlp, (size_t)a->num_layers) == 0);
  SAME(vision.present);
  SAME(vision.hidden_size);
  SAME(vision.num_heads);
  SAME(vision.num_layers);
  SAME(vision.intermediate_size);
  SAME(vision.num_channels);
  SAME(vision.patch_size);
  SAME(vision.temporal_patch_size);
  SAME(vision.spatial_merge_size);
  SAME_REAL(vision.layer_norm_eps);
  SAME_REAL(vision.rope_theta);
  SAME(vision.segment_max_frames);
  SAME(quant.present);
  SAME(quant.method);
  SAME(quant.block_rows);
  SAME(quant.block_cols);
  CHECK_STR(a->quant.method_name, b->quant.method_name);
  CHECK_STR(a->quant.activation_scheme, b->quant.activation_scheme);
#undef SAME
#undef SAME_REAL
}

/* Every value below is read off the spec tables, not off the parser. */
static void test_full_config(m3_config *c) {
  CHECK_OK(m3_config_load(FULL_CONFIG, c));
  CHECK_EQ_INT(c->is_vl, 1);
  CHECK_STR(c->architecture, "MiniMaxM3SparseForConditionalGeneration");
  CHECK_EQ_INT(c->hidden_size, 6144);
  CHECK_EQ_INT(c->num_layers, 60);
  CHECK_EQ_INT(c->num_heads, 64);
  CHECK_EQ_INT(c->num_kv_heads, 4);
  CHECK_EQ_INT(c->head_dim, 128);
  CHECK_EQ_INT(c->vocab_size, 200064);
  CHECK_EQ_INT(c->max_position_embeddings, 1048576);
  CHECK_NEAR(c->rms_norm_eps, 1e-6, 1e-12);
  CHECK_NEAR(c->rope_theta, 5e6, 0);
  CHECK_EQ_INT(c->rotary_dim, 64);
  CHECK_NEAR(c->swiglu_alpha, 1.702, 1e-6);
  CHECK_NEAR(c->swiglu_beta, 1.0, 0);
  CHECK_NEAR(c->swiglu_limit, 7.0, 0);
  CHECK_EQ_INT(c->intermediate_size, 3072);
  CHECK_EQ_INT(c->shared_intermediate_size, 3072);
  CHECK_EQ_INT(c->dense_intermediate_size, 12288);
  CHECK_EQ_INT(c->num_experts, 128);
  CHECK_EQ_INT(c->num_experts_per_tok, 4);
  CHECK_EQ_INT(c->num_shared_experts, 1);
  CHECK_NEAR(c->routed_scaling_factor, 2.0, 0);
  CHECK_EQ_INT(c->use_routing_bias, 1);
  CHECK_EQ_INT(c->tie_word_embeddings, 0);
  CHECK_EQ_INT(c->num_mtp_modules, 7);
  CHECK_EQ_INT(c->bos_token_id, 200034);
  CHECK_EQ_INT(c->eos_token_id, 200020);
  CHECK_EQ_INT(c->index_num_heads, 4);
  CHECK_EQ_INT(c->index_head_dim, 128);
  CHECK_EQ_INT(c->index_block_size, 128);
  CHECK_EQ_INT(c->index_topk_blocks, 16);
  CHECK_EQ_INT(c->index_local_blocks, 1);
  CHECK_EQ_INT(c->index_init_blocks, 0);
  if (c->layer_attn && c->layer_mlp) {
    for (int i = 0; i < 3; i++) {
      CHECK_EQ_INT(c->layer_attn[i], M3_ATTN_FULL);
      CHECK_EQ_INT(c->layer_mlp[i], M3_MLP_DENSE);
    }
    CHECK_EQ_INT(count_kind(c->layer_attn + 3, 57, M3_ATTN_SPARSE), 57);
    CHECK_EQ_INT(count_kind(c->layer_mlp + 3, 57, M3_MLP_MOE), 57);
  }
  CHECK_EQ_INT(c->image_token_id, 200025);
  CHECK_EQ_INT(c->video_token_id, 200026);
  CHECK_EQ_INT(c->projector_hidden_size, 6144);
  CHECK_EQ_INT(c->vision.present, 1);
  CHECK_EQ_INT(c->vision.hidden_size, 1280);
  CHECK_EQ_INT(c->vision.num_heads, 16);
  CHECK_EQ_INT(c->vision.num_layers, 32);
  CHECK_EQ_INT(c->vision.intermediate_size, 5120);
  CHECK_EQ_INT(c->vision.num_channels, 3);
  CHECK_EQ_INT(c->vision.patch_size, 14);
  CHECK_EQ_INT(c->vision.temporal_patch_size, 2);
  CHECK_EQ_INT(c->vision.spatial_merge_size, 2);
  CHECK_NEAR(c->vision.layer_norm_eps, 1e-5, 1e-11);
  CHECK_NEAR(c->vision.rope_theta, 10000.0, 0);
  CHECK_EQ_INT(c->vision.segment_max_frames, 4);
  CHECK_EQ_INT(c->quant.present, 0);
}

static void put_layer_names(cJSON *obj, const char *key, const char *first3, const char *rest) {
  cJSON *a = cJSON_AddArrayToObject(obj, key);
  for (int i = 0; i < 60; i++) cJSON_AddItemToArray(a, cJSON_CreateString(i < 3 ? first3 : rest));
}

/* The same model as re-saved by transformers: flat index_* keys, layer_types / mlp_layer_types,
 * rope_parameters, image_token_id spellings, quantization_config inside text_config. */
static void test_new_spelling(const m3_config *legacy) {
  char *text = read_text(FULL_CONFIG);
  CHECK(text != NULL);
  if (!text) return;
  cJSON *root = cJSON_Parse(text);
  free(text);
  cJSON *t = cJSON_GetObjectItemCaseSensitive(root, "text_config");
  static const char *const drop[] = {
      "sparse_attention_config", "moe_layer_freq", "rope_theta", "rotary_dim",
      "partial_rotary_factor",   "model_type"};
  for (size_t i = 0; i < sizeof drop / sizeof drop[0]; i++)
    cJSON_DeleteItemFromObjectCaseSensitive(t, drop[i]);
  cJSON_AddStringToObject(t, "model_type", "minimax_m3_vl_text");
  cJSON_AddNumberToObject(t, "index_n_heads", 4);
  cJSON_AddNumberToObject(t, "index_head_dim", 128);
  cJSON_AddNumberToObject(t, "index_block_size", 128);
  cJSON_AddNumberToObject(t, "index_topk_blocks", 16);
  cJSON_AddNumberToObject(t, "index_local_blocks", 1);
  put_layer_names(t, "layer_types", "full_attention", "minimax_m3_sparse");
  put_layer_names(t, "mlp_layer_types", "dense", "sparse");
  cJSON *rope = cJSON_AddObjectToObject(t, "rope_parameters");
  cJSON_AddStringToObject(rope, "rope_type", "default");
  cJSON_AddNumberToObject(rope, "rope_theta", 5e6);
  cJSON_AddNumberToObject(rope, "partial_rotary_factor", 0.5);
  cJSON_DeleteItemFromObjectCaseSensitive(root, "image_token_index");
  cJSON_DeleteItemFromObjectCaseSensitive(root, "video_token_index");
  cJSON_AddNumberToObject(root, "image_token_id", 200025);
  cJSON_AddNumberToObject(root, "video_token_id", 200026);
  char *json = cJSON_PrintUnformatted(root);
  m3_config c;
  CHECK_OK(m3_config_parse(json, strlen(json), "new.json", &c));
  check_same(legacy, &c);
  m3_config_free(&c);

  /* Other accepted layer-type names and the quantization block inside text_config. */
  cJSON *q = cJSON_AddObjectToObject(t, "quantization_config");
  cJSON_AddStringToObject(q, "quant_method", "mxfp8");
  cJSON_AddStringToObject(q, "activation_scheme", "dynamic");
  cJSON_DeleteItemFromObjectCaseSensitive(t, "layer_types");
  put_layer_names(t, "layer_types", "full_attention", "sparse_attention");
  cJSON_free(json);
  json = cJSON_PrintUnformatted(root);
  CHECK_OK(m3_config_parse(json, strlen(json), "new.json", &c));
  CHECK_EQ_INT(c.layer_attn ? count_kind(c.layer_attn, 60, M3_ATTN_SPARSE) : -1, 57);
  CHECK_EQ_INT(c.quant.present, 1);
  CHECK_EQ_INT(c.quant.method, M3_QUANT_MXFP8);
  CHECK_STR(c.quant.method_name, "mxfp8");
  CHECK_STR(c.quant.activation_scheme, "dynamic");
  CHECK_EQ_INT(c.quant.block_rows, 1);
  CHECK_EQ_INT(c.quant.block_cols, 32);
  m3_config_free(&c);
  cJSON_free(json);
  cJSON_Delete(root);
}

/* A bare text config (the text_config object at the top level) gives the same text model. */
static void test_bare_text(const m3_config *vl) {
  char *text = read_text(FULL_CONFIG);
  CHECK(text != NULL);
  if (!text) return;
  cJSON *root = cJSON_Parse(text);
  free(text);
  cJSON *t = cJSON_DetachItemFromObjectCaseSensitive(root, "text_config");
  cJSON_DeleteItemFromObjectCaseSensitive(t, "model_type");
  cJSON_AddStringToObject(t, "model_type", "minimax_m3_vl_text");
  char *json = cJSON_PrintUnformatted(t);
  m3_config c;
  CHECK_OK(m3_config_parse(json, strlen(json), "bare.json", &c));
  CHECK_EQ_INT(c.is_vl, 0);
  CHECK_EQ_INT(c.vision.present, 0);
  CHECK_STR(c.architecture, "MiniMaxM3SparseForCausalLM");
  CHECK_EQ_INT(c.hidden_size, vl->hidden_size);
  CHECK_EQ_INT(c.rotary_dim, vl->rotary_dim);
  CHECK_EQ_INT(c.index_topk_blocks, vl->index_topk_blocks);
  CHECK(c.layer_attn && memcmp(c.layer_attn, vl->layer_attn, 60) == 0);
  CHECK(c.layer_mlp && memcmp(c.layer_mlp, vl->layer_mlp, 60) == 0);
  m3_config_free(&c);
  cJSON_free(json);

  /* Recognised by the CausalLM architecture alone. */
  cJSON_DeleteItemFromObjectCaseSensitive(t, "model_type");
  cJSON *archs = cJSON_AddArrayToObject(t, "architectures");
  cJSON_AddItemToArray(archs, cJSON_CreateString("MiniMaxM3SparseForCausalLM"));
  json = cJSON_PrintUnformatted(t);
  CHECK_OK(m3_config_parse(json, strlen(json), "bare.json", &c));
  CHECK_EQ_INT(c.is_vl, 0);
  m3_config_free(&c);
  cJSON_free(json);
  cJSON_Delete(t);
  cJSON_Delete(root);
}

/* Only the required keys: everything else takes the transformers 5.17 defaults (spec §1). */
static void test_defaults(void) {
  static const char minimal[] =
      "{\"model_type\": \"minimax_m3_vl\", \"text_config\": {\"hidden_size\": 64,"
      " \"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"num_key_value_heads\": 2,"
      " \"vocab_size\": 100, \"intermediate_size\": 24}}";
  m3_config c;
  CHECK_OK(m3_config_parse(minimal, strlen(minimal), "minimal.json", &c));
  CHECK_STR(c.architecture, "MiniMaxM3SparseForConditionalGeneration");
  CHECK_EQ_INT(c.head_dim, 16);   /* hidden / heads */
  CHECK_EQ_INT(c.rotary_dim, 16); /* no factor, no rotary_dim: whole head */
  CHECK_NEAR(c.rope_theta, 5e6, 0);
  CHECK_EQ_INT(c.max_position_embeddings, 524288);
  CHECK_NEAR(c.rms_norm_eps, 1e-6, 1e-12);
  CHECK_NEAR(c.swiglu_alpha, 1.702, 1e-6);
  CHECK_NEAR(c.swiglu_beta, 1.0, 0);
  CHECK_NEAR(c.swiglu_limit, 7.0, 0);
  CHECK_NEAR(c.routed_scaling_factor, 2.0, 0);
  CHECK_EQ_INT(c.num_experts, 128);
  CHECK_EQ_INT(c.num_experts_per_tok, 4);
  CHECK_EQ_INT(c.num_shared_experts, 1);
  CHECK_EQ_INT(c.shared_intermediate_size, 3072); /* reference class defaults */
  CHECK_EQ_INT(c.dense_intermediate_size, 12288);
  CHECK_EQ_INT(c.use_routing_bias, 1);
  CHECK_EQ_INT(c.tie_word_embeddings, 0);
  CHECK_EQ_INT(c.num_mtp_modules, 0);
  CHECK_EQ_INT(c.bos_token_id, 200034);
  CHECK_EQ_INT(c.eos_token_id, 200020);
  CHECK_EQ_INT(c.index_num_heads, 4);
  CHECK_EQ_INT(c.index_head_dim, 128);
  CHECK_EQ_INT(c.index_block_size, 128);
  CHECK_EQ_INT(c.index_topk_blocks, 16);
  CHECK_EQ_INT(c.index_local_blocks, 1);
  CHECK_EQ_INT(c.index_init_blocks, 0);
  /* Neither spelling of the layer maps: all full attention, all MoE. */
  CHECK(c.layer_attn && c.layer_attn[0] == M3_ATTN_FULL && c.layer_attn[1] == M3_ATTN_FULL);
  CHECK(c.layer_mlp && c.layer_mlp[0] == M3_MLP_MOE && c.layer_mlp[1] == M3_MLP_MOE);
  CHECK_EQ_INT(c.image_token_id, 200025);
  CHECK_EQ_INT(c.video_token_id, 200026);
  CHECK_EQ_INT(c.projector_hidden_size, 6144);
  CHECK_EQ_INT(c.vision.present, 0);
  CHECK_EQ_INT(c.quant.present, 0);
  m3_config_free(&c);

  /* The tiny config: n_shared_experts scales the shared width; rotary from the factor alone. */
  CHECK_OK(parse_edited(TINY, &c, "text_config.n_shared_experts", "2",
                        "text_config.shared_intermediate_size", "16", "text_config.rotary_dim",
                        NULL, NULL));
  CHECK_EQ_INT(c.shared_intermediate_size, 32);
  CHECK_EQ_INT(c.rotary_dim, 8);
  CHECK_EQ_INT(c.index_init_blocks, 1);
  m3_config_free(&c);

  /* A vision_config with no keys takes the vision spec §1.2 values; grouping from the top level. */
  CHECK_OK(parse_edited(TINY, &c, "vision_config", "{}", "img_token_compression_config",
                        "{\"temporal_patch_size\": 3, \"spatial_merge_size\": 4}", NULL));
  CHECK_EQ_INT(c.vision.present, 1);
  CHECK_EQ_INT(c.vision.hidden_size, 1280);
  CHECK_EQ_INT(c.vision.num_heads, 16);
  CHECK_EQ_INT(c.vision.num_layers, 32);
  CHECK_EQ_INT(c.vision.patch_size, 14);
  CHECK_EQ_INT(c.vision.segment_max_frames, 4);
  CHECK_EQ_INT(c.vision.temporal_patch_size, 3);
  CHECK_EQ_INT(c.vision.spatial_merge_size, 4);
  m3_config_free(&c);

  /* Index heads differ from KV heads, but no layer is sparse: accepted. */
  CHECK_OK(parse_edited(TINY, &c, "text_config.sparse_attention_config.sparse_attention_freq",
                        "[0, 0, 0, 0]",
                        "text_config.sparse_attention_config.sparse_num_index_heads", "1", NULL));
  m3_config_free(&c);
}

static void test_quant(void) {
  m3_config c;
  CHECK_OK(parse_edited(TINY, &c, "quantization_config",
                        "{\"quant_method\": \"fp8\", \"weight_block_size\": [128, 128],"
                        " \"activation_scheme\": \"dynamic\"}",
                        NULL));
  CHECK_EQ_INT(c.quant.method, M3_QUANT_FP8_BLOCK);
  CHECK_EQ_INT(c.quant.block_rows, 128);
  CHECK_EQ_INT(c.quant.block_cols, 128);
  m3_config_free(&c);
  CHECK_OK(parse_edited(TINY, &c, "quantization_config",
                        "{\"quant_method\": \"compressed-tensors\"}", NULL));
  CHECK_EQ_INT(c.quant.method, M3_QUANT_OTHER);
  CHECK_STR(c.quant.method_name, "compressed-tensors");
  m3_config_free(&c);
}

#define FAILS(status, needle, ...)                                                \
  do {                                                                            \
    m3_config c_;                                                                 \
    CHECK_FAILS_WITH(parse_edited(TINY, &c_, __VA_ARGS__, NULL), status, needle); \
    CHECK(c_.layer_attn == NULL && c_.layer_mlp == NULL);                         \
  } while (0)

/* Both keys must be named when two spellings disagree. */
#define FAILS_NAMING_BOTH(key1, key2, ...)        \
  do {                                            \
    FAILS(M3_ERR_CONFIG, key1, __VA_ARGS__);      \
    CHECK(strstr(m3_last_error(), key2) != NULL); \
  } while (0)

static void test_errors(void) {
  /* Shapes and counts. */
  FAILS(M3_ERR_CONFIG, "num_key_value_heads", "text_config.num_attention_heads", "3");
  FAILS(M3_ERR_CONFIG, "index_n_heads",
        "text_config.sparse_attention_config.sparse_num_index_heads", "1");
  FAILS(M3_ERR_CONFIG, "text_config.moe_layer_freq", "text_config.moe_layer_freq", "[0, 1, 1]");
  FAILS(M3_ERR_CONFIG, "sparse_attention_freq",
        "text_config.sparse_attention_config.sparse_attention_freq", "[0, 1, 1, 1, 1]");
  FAILS(M3_ERR_CONFIG, "text_config.layer_types", "text_config.layer_types",
        "[\"full_attention\", \"minimax_m3_sparse\"]");
  FAILS(M3_ERR_CONFIG, "text_config.layer_types", "text_config.layer_types",
        "[\"full_attention\", \"linear_attention\", \"sparse\", \"sparse\"]");
  FAILS(M3_ERR_CONFIG, "text_config.mlp_layer_types", "text_config.moe_layer_freq", NULL,
        "text_config.mlp_layer_types", "[\"dense\", \"moe\", \"sparse\", \"sparse\"]");
  FAILS(M3_ERR_CONFIG, "moe_layer_freq", "text_config.moe_layer_freq", "[0, 2, 1, 1]");
  FAILS(M3_ERR_CONFIG, "text_config.hidden_size", "text_config.hidden_size", "0");
  FAILS(M3_ERR_CONFIG, "text_config.intermediate_size", "text_config.intermediate_size", "-32");
  FAILS(M3_ERR_CONFIG, "text_config.vocab_size", "text_config.vocab_size", "0");
  FAILS(M3_ERR_CONFIG, "text_config.head_dim", "text_config.head_dim", "0");
  FAILS(M3_ERR_CONFIG, "num_hidden_layers", "text_config.num_hidden_layers", "100000000");
  FAILS(M3_ERR_CONFIG, "num_experts_per_tok", "text_config.num_experts_per_tok", "9");
  FAILS(M3_ERR_CONFIG, "text_config.n_shared_experts", "text_config.n_shared_experts", "-1");

  /* RoPE width and scaling. */
  FAILS(M3_ERR_CONFIG, "rotary_dim", "text_config.rotary_dim", "7",
        "text_config.partial_rotary_factor", NULL);
  FAILS(M3_ERR_CONFIG, "rotary_dim", "text_config.rotary_dim", "32",
        "text_config.partial_rotary_factor", NULL);
  FAILS_NAMING_BOTH("rotary_dim", "partial_rotary_factor", "text_config.rotary_dim", "4");
  FAILS_NAMING_BOTH("text_config.partial_rotary_factor", "rope_parameters.partial_rotary_factor",
                    "text_config.rope_parameters", "{\"partial_rotary_factor\": 0.25}");
  FAILS(M3_ERR_CONFIG, "partial_rotary_factor", "text_config.partial_rotary_factor", "0.3");
  FAILS(M3_ERR_CONFIG, "text_config.rope_parameters.rope_type", "text_config.rope_parameters",
        "{\"rope_type\": \"yarn\", \"factor\": 4}");
  FAILS(M3_ERR_CONFIG, "text_config.rope_scaling.type", "text_config.rope_scaling",
        "{\"type\": \"linear\"}");
  FAILS_NAMING_BOTH("text_config.rope_theta", "text_config.rope_parameters.rope_theta",
                    "text_config.rope_parameters", "{\"rope_theta\": 20000}");
  FAILS(M3_ERR_CONFIG, "rotary_dim", "text_config.head_dim", "32", "text_config.rotary_dim", "24",
        "text_config.partial_rotary_factor", "0.75"); /* 24 > index_head_dim 16 */

  /* Sparse attention settings. */
  FAILS(M3_ERR_CONFIG, "index_block_size", "text_config.sparse_attention_config.sparse_block_size",
        "0");
  FAILS(M3_ERR_CONFIG, "index_block_size", "text_config.sparse_attention_config.sparse_block_size",
        NULL, "text_config.index_block_size", "-128");
  FAILS(M3_ERR_CONFIG, "index_topk_blocks",
        "text_config.sparse_attention_config.sparse_topk_blocks", "1");
  FAILS(M3_ERR_CONFIG, "index_local_blocks",
        "text_config.sparse_attention_config.sparse_local_block", "-1");
  FAILS_NAMING_BOTH("sparse_num_index_heads", "index_n_heads", "text_config.index_n_heads", "4");
  FAILS_NAMING_BOTH("sparse_attention_freq", "layer_types", "text_config.layer_types",
                    "[\"full_attention\", \"full_attention\", \"sparse\", \"sparse\"]");
  FAILS_NAMING_BOTH("moe_layer_freq", "mlp_layer_types", "text_config.mlp_layer_types",
                    "[\"dense\", \"sparse\", \"sparse\", \"dense\"]");
  FAILS_NAMING_BOTH("image_token_index", "image_token_id", "image_token_index", "5",
                    "image_token_id", "6");
  FAILS(M3_ERR_CONFIG, "use_sparse_attention",
        "text_config.sparse_attention_config.use_sparse_attention", "false");
  FAILS(M3_ERR_CONFIG, "sparse_disable_index_value",
        "text_config.sparse_attention_config.sparse_disable_index_value", "[1, 1, 0, 1]");
  FAILS(M3_ERR_CONFIG, "sparse_score_type", "text_config.sparse_attention_config.sparse_score_type",
        "\"sum\"");

  /* Unsupported variants. */
  FAILS(M3_ERR_CONFIG, "scoring_func", "text_config.scoring_func", "\"softmax\"");
  FAILS(M3_ERR_CONFIG, "qk_norm_type", "text_config.qk_norm_type", "\"per_layer\"");
  FAILS(M3_ERR_CONFIG, "attention_output_gate", "text_config.attention_output_gate", "true");
  FAILS(M3_ERR_CONFIG, "model_type", "model_type", "\"llava\"");
  FAILS(M3_ERR_CONFIG, "text_config", "text_config", NULL);

  /* Wrong JSON types and missing keys. */
  FAILS(M3_ERR_CONFIG, "text_config.hidden_size", "text_config.hidden_size", "\"x\"");
  FAILS(M3_ERR_CONFIG, "text_config.num_hidden_layers", "text_config.num_hidden_layers", "4.5");
  FAILS(M3_ERR_CONFIG, "text_config.use_routing_bias", "text_config.use_routing_bias", "\"yes\"");
  FAILS(M3_ERR_CONFIG, "text_config.rms_norm_eps", "text_config.rms_norm_eps", "[1e-6]");
  FAILS(M3_ERR_CONFIG, "text_config.swiglu_limit", "text_config.swiglu_limit", "1e300");
  FAILS(M3_ERR_CONFIG, "text_config.sparse_attention_config", "text_config.sparse_attention_config",
        "3");
  FAILS(M3_ERR_CONFIG, "text_config", "text_config", "[]");
  FAILS(M3_ERR_CONFIG, "architectures", "architectures",
        "\"MiniMaxM3SparseForConditionalGeneration\"");
  FAILS(M3_ERR_CONFIG, "text_config.eos_token_id", "text_config.eos_token_id", "[\"a\"]");
  FAILS(M3_ERR_CONFIG, "text_config.vocab_size", "text_config.vocab_size", NULL);
  FAILS(M3_ERR_CONFIG, "text_config.hidden_size", "text_config.hidden_size", NULL);
  FAILS(M3_ERR_CONFIG, "text_config.num_key_value_heads", "text_config.num_key_value_heads", NULL);

  /* quantization_config and vision_config. */
  FAILS(M3_ERR_CONFIG, "quantization_config.quant_method", "quantization_config",
        "{\"activation_scheme\": \"dynamic\"}");
  FAILS(M3_ERR_CONFIG, "quantization_config.weight_block_size", "quantization_config",
        "{\"quant_method\": \"mxfp8\", \"weight_block_size\": [128, 128]}");
  FAILS(M3_ERR_CONFIG, "quantization_config.weight_block_size", "quantization_config",
        "{\"quant_method\": \"fp8\", \"weight_block_size\": [128]}");
  FAILS_NAMING_BOTH("quantization_config", "text_config.quantization_config", "quantization_config",
                    "{\"quant_method\": \"fp8\"}", "text_config.quantization_config",
                    "{\"quant_method\": \"mxfp8\"}");
  FAILS(M3_ERR_CONFIG, "vision_config.hidden_size", "vision_config", "{\"hidden_size\": 1000}");
  FAILS(M3_ERR_CONFIG, "vision_config.patch_size", "vision_config", "{\"patch_size\": 0}");
  FAILS_NAMING_BOTH("vision_config.temporal_patch_size",
                    "vision_config.img_token_compression_config.temporal_patch_size",
                    "vision_config",
                    "{\"temporal_patch_size\": 2, \"img_token_compression_config\":"
                    " {\"temporal_patch_size\": 3}}");
}

static void test_bad_files(void) {
  m3_config c;
  static const char truncated[] = "{\"model_type\": \"minimax_m3_vl\", \"text_config\": {";
  CHECK_FAILS_WITH(m3_config_parse(truncated, strlen(truncated), "cut.json", &c), M3_ERR_FORMAT,
                   "cut.json: invalid JSON near byte");
  static const char garbage[] = "{\"a\": 1} trailing";
  CHECK_FAILS_WITH(m3_config_parse(garbage, strlen(garbage), "tail.json", &c), M3_ERR_FORMAT,
                   "tail.json");
  CHECK_FAILS_WITH(m3_config_parse("[1, 2]", 6, "list.json", &c), M3_ERR_FORMAT, "list.json");
  CHECK_FAILS_WITH(m3_config_parse("", 0, "empty.json", &c), M3_ERR_FORMAT, "empty.json");
  /* Not NUL-terminated: the parser must stop at len. */
  CHECK_FAILS_WITH(m3_config_parse("{\"a\": 1}xyz", 5, "short.json", &c), M3_ERR_FORMAT,
                   "short.json");
  CHECK_FAILS_WITH(m3_config_load("/nonexistent/m3/config.json", &c), M3_ERR_IO,
                   "/nonexistent/m3/config.json");
}

/* Writes c to a fresh temporary file, reads it back, and returns the file's text. */
static char *round_trip(const m3_config *c) {
  char path[] = "/tmp/m3_test_config_XXXXXX";
  int fd = mkstemp(path);
  CHECK(fd >= 0);
  if (fd < 0) return NULL;
  close(fd);
  CHECK_OK(m3_config_write(c, path));
  m3_config back;
  CHECK_OK(m3_config_load(path, &back));
  check_same(c, &back);
  m3_config_free(&back);
  char *text = read_text(path);
  unlink(path);
  return text;
}

static void test_round_trip(const m3_config *full) {
  /* The written file uses the spellings transformers 5.17 reads. */
  char *text = round_trip(full);
  CHECK(text != NULL);
  if (text) {
    cJSON *root = cJSON_Parse(text);
    cJSON *t = cJSON_GetObjectItemCaseSensitive(root, "text_config");
    CHECK_STR(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(root, "model_type")),
              "minimax_m3_vl");
    CHECK_STR(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(t, "model_type")),
              "minimax_m3_vl_text");
    CHECK(cJSON_GetObjectItemCaseSensitive(t, "sparse_attention_config") == NULL);
    CHECK(cJSON_GetObjectItemCaseSensitive(t, "moe_layer_freq") == NULL);
    CHECK_STR(cJSON_GetStringValue(
                  cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(t, "layer_types"), 3)),
              "minimax_m3_sparse");
    CHECK_STR(cJSON_GetStringValue(
                  cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(t, "mlp_layer_types"), 2)),
              "dense");
    cJSON *rope = cJSON_GetObjectItemCaseSensitive(t, "rope_parameters");
    CHECK_NEAR(
        cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(rope, "partial_rotary_factor")), 0.5,
        0);
    CHECK_STR(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(rope, "rope_type")), "default");
    CHECK_EQ_INT(cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(t, "index_topk_blocks")),
                 16);
    /* Float-typed fields carry a '.' so transformers' strict typing sees floats. */
    CHECK(strstr(text, "\"routed_scaling_factor\":\t2.0") != NULL);
    CHECK(strstr(text, "\"rms_norm_eps\":\t1e-06") != NULL);
    cJSON_Delete(root);
    free(text);
  }

  /* Odd values everywhere: quantized, several shared experts, vision present, MoE/dense mixed. */
  m3_config c;
  CHECK_OK(parse_edited(
      TINY, &c, "text_config.n_shared_experts", "2", "text_config.rms_norm_eps", "1e-5",
      "text_config.swiglu_limit", "6.5", "text_config.swiglu_alpha", "1.25",
      "text_config.routed_scaling_factor", "2.5", "text_config.tie_word_embeddings", "true",
      "text_config.max_position_embeddings", "4096", "text_config.rope_theta", "123456.75",
      "text_config.eos_token_id", "[7, 8]", "text_config.num_mtp_modules", "1", "vision_config",
      "{\"hidden_size\": 48, \"num_attention_heads\": 4,"
      " \"num_hidden_layers\": 2, \"intermediate_size\": 96, \"patch_size\": 4,"
      " \"layer_norm_eps\": 1e-6, \"rope_theta\": 100.5}",
      "quantization_config",
      "{\"quant_method\": \"fp8\", \"weight_block_size\": [64, 32],"
      " \"activation_scheme\": \"static\"}",
      NULL));
  CHECK_EQ_INT(c.eos_token_id, 7);
  free(round_trip(&c));
  m3_config_free(&c);

  /* A bare text config stays bare. */
  static const char bare[] =
      "{\"model_type\": \"minimax_m3_vl_text\", \"hidden_size\": 32, \"num_hidden_layers\": 1,"
      " \"num_attention_heads\": 2, \"num_key_value_heads\": 1, \"vocab_size\": 10,"
      " \"intermediate_size\": 8, \"n_shared_experts\": 0, \"moe_layer_freq\": [1]}";
  CHECK_OK(m3_config_parse(bare, strlen(bare), "bare.json", &c));
  CHECK_EQ_INT(c.shared_intermediate_size, 0);
  free(round_trip(&c));
  m3_config_free(&c);
}

int main(void) {
  m3_config full;
  test_full_config(&full);
  test_new_spelling(&full);
  test_bare_text(&full);
  test_defaults();
  test_quant();
  test_errors();
  test_bad_files();
  test_round_trip(&full);
  m3_config_free(&full);
  return check_summary();
}
