/* config.c: config.json -> struct m3_config and back (contract in config.h).
 *
 * Every setting is read through a `keyref` (a key inside a JSON object whose dotted path is known),
 * so each error names the key at fault. A setting with several spellings (legacy
 * `sparse_attention_config.*` vs flat `index_*`, top-level vs `rope_parameters`, ...) is read from
 * all of them; spellings that are present must agree. Defaults are those of the transformers 5.17
 * config class (shared/spec/m3_text_spec.md §1), except where the spec or m3 decides otherwise
 * (noted at the key). */
#include "io/config.h"

#include <cjson/cJSON.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The per-layer tables are sized from num_hidden_layers before any array is seen; the bound keeps
 * a corrupt count in a tiny file from becoming a huge allocation. */
enum { MAX_LAYERS = 65536 };
/* config.json is a few kB; anything this large is not one. */
enum { MAX_CONFIG_BYTES = 64 << 20 };

static const char ARCH_VL[] = "MiniMaxM3SparseForConditionalGeneration";
static const char ARCH_TEXT[] = "MiniMaxM3SparseForCausalLM";
static const char TYPE_VL[] = "minimax_m3_vl";
static const char TYPE_TEXT[] = "minimax_m3_vl_text";

/* ------------------------------------------------------------------------------------------ */
/* Reading keys                                                                               */

/* A JSON object (NULL when absent) and its dotted path in the file ("" for the root). */
typedef struct {
  const cJSON *obj;
  char path[96];
} scope;

/* One spelling of a setting. key == NULL means "no such spelling". */
typedef struct {
  const scope *in;
  const char *key;
} keyref;

static const keyref NO_KEY = {NULL, NULL};

static keyref at(const scope *in, const char *key) {
  keyref r = {in, key};
  return r;
}

/* Truncation is harmless here: the name only ends up in an error message. */
static const char *key_name(keyref r, char *buf, size_t n) {
  if (snprintf(buf, n, "%s%s%s", r.in->path, r.in->path[0] ? "." : "", r.key) < 0) buf[0] = '\0';
  return buf;
}

/* The item, or NULL when the key is absent or JSON null (transformers treats null as unset). */
static const cJSON *lookup(keyref r) {
  if (!r.key || !r.in || !r.in->obj) return NULL;
  const cJSON *item = cJSON_GetObjectItemCaseSensitive(r.in->obj, r.key);
  return cJSON_IsNull(item) ? NULL : item;
}

static m3_status type_error(const char *label, keyref r, const char *want) {
  char name[160];
  return m3_fail(M3_ERR_CONFIG, "%s: %s: expected %s", label, key_name(r, name, sizeof name), want);
}

static m3_status key_error(const char *label, keyref r, const char *what) {
  char name[160];
  return m3_fail(M3_ERR_CONFIG, "%s: %s %s", label, key_name(r, name, sizeof name), what);
}

/* A child object of `parent`; out->obj is NULL when the key is absent. */
static m3_status child(const char *label, const scope *parent, const char *key, scope *out) {
  keyref r = at(parent, key);
  const cJSON *item = lookup(r);
  if (item && !cJSON_IsObject(item)) return type_error(label, r, "an object");
  out->obj = item;
  key_name(r, out->path, sizeof out->path);
  return M3_OK;
}

static m3_status get_str(const char *label, keyref r, const char **out) {
  const cJSON *item = lookup(r);
  *out = NULL;
  if (!item) return M3_OK;
  if (!cJSON_IsString(item)) return type_error(label, r, "a string");
  *out = item->valuestring;
  return M3_OK;
}

typedef enum { AS_INT, AS_REAL, AS_BOOL } num_kind;

/* Integers ride in doubles; beyond 2^53 they are no longer exact. */
static const double MAX_EXACT_INT = 9007199254740992.0;

static m3_status read_num(const char *label, keyref r, num_kind kind, double *v, int *found) {
  const cJSON *item = lookup(r);
  *found = item != NULL;
  if (!item) return M3_OK;
  if (kind == AS_BOOL && cJSON_IsBool(item)) {
    *v = cJSON_IsTrue(item);
    return M3_OK;
  }
  double d = cJSON_IsNumber(item) ? item->valuedouble : NAN;
  switch (kind) {
    case AS_INT:
      if (!(fabs(d) <= MAX_EXACT_INT) || d != floor(d)) return type_error(label, r, "an integer");
      break;
    case AS_REAL:
      if (!isfinite(d)) return type_error(label, r, "a number");
      break;
    case AS_BOOL:
      if (d != 0 && d != 1) return type_error(label, r, "true or false");
      break;
  }
  *v = d;
  return M3_OK;
}

/* A setting spelled up to three ways (unused slots NO_KEY). *v keeps its value (the default)
 * when no spelling is present; present spellings must agree. */
static m3_status get_num(const char *label, num_kind kind, keyref a, keyref b, keyref c, double *v,
                         int *found) {
  const keyref refs[3] = {a, b, c};
  int first = -1;
  double value = 0;
  for (int i = 0; i < 3; i++) {
    double x = 0;
    int present;
    m3_status s = read_num(label, refs[i], kind, &x, &present);
    if (s != M3_OK) return s;
    if (!present) continue;
    if (first < 0) {
      first = i;
      value = x;
    } else if (x != value) {
      char n1[160], n2[160];
      return m3_fail(M3_ERR_CONFIG, "%s: %s (%.17g) and %s (%.17g) disagree", label,
                     key_name(refs[first], n1, sizeof n1), value, key_name(refs[i], n2, sizeof n2),
                     x);
    }
  }
  if (first >= 0) *v = value;
  if (found) *found = first >= 0;
  return M3_OK;
}

static m3_status get_int(const char *label, keyref a, keyref b, int *out, int *found) {
  double v = *out;
  int present = 0;
  m3_status s = get_num(label, AS_INT, a, b, NO_KEY, &v, &present);
  if (found) *found = present;
  if (s != M3_OK) return s;
  if (v < INT_MIN || v > INT_MAX) return key_error(label, lookup(a) ? a : b, "is out of range");
  *out = (int)v;
  return M3_OK;
}

static m3_status get_float(const char *label, keyref a, keyref b, float *out) {
  double v = *out;
  m3_status s = get_num(label, AS_REAL, a, b, NO_KEY, &v, NULL);
  if (s != M3_OK) return s;
  if (fabs(v) > FLT_MAX) return key_error(label, lookup(a) ? a : b, "is out of range");
  *out = (float)v;
  return M3_OK;
}

static m3_status get_double(const char *label, keyref a, keyref b, double *out) {
  return get_num(label, AS_REAL, a, b, NO_KEY, out, NULL);
}

static m3_status get_bool(const char *label, keyref a, keyref b, int *out) {
  double v = *out;
  m3_status s = get_num(label, AS_BOOL, a, b, NO_KEY, &v, NULL);
  *out = v != 0;
  return s;
}

/* ------------------------------------------------------------------------------------------ */
/* Text backbone scalars                                                                      */

typedef struct {
  const char *key;
  size_t offset; /* of an int in m3_config */
} required_int;

static const required_int REQUIRED_INTS[] = {
    {"hidden_size", offsetof(m3_config, hidden_size)},
    {"num_hidden_layers", offsetof(m3_config, num_layers)},
    {"num_attention_heads", offsetof(m3_config, num_heads)},
    {"num_key_value_heads", offsetof(m3_config, num_kv_heads)},
    {"vocab_size", offsetof(m3_config, vocab_size)},
    {"intermediate_size", offsetof(m3_config, intermediate_size)},
};

/* An int key with its default: `offset` is into whichever struct the table fills (m3_config
 * here, m3_vision_config for VISION_INTS). */
typedef struct {
  const char *key;
  size_t offset;
  int fallback;
} optional_int;

static const optional_int OPTIONAL_INTS[] = {
    {"num_local_experts", offsetof(m3_config, num_experts), 128},
    {"num_experts_per_tok", offsetof(m3_config, num_experts_per_tok), 4},
    {"n_shared_experts", offsetof(m3_config, num_shared_experts), 1},
    {"num_mtp_modules", offsetof(m3_config, num_mtp_modules), 0},
    {"bos_token_id", offsetof(m3_config, bos_token_id), 200034},
};

typedef struct {
  const char *key;
  size_t offset; /* of a float in m3_config */
  float fallback;
} optional_float;

static const optional_float OPTIONAL_FLOATS[] = {
    {"rms_norm_eps", offsetof(m3_config, rms_norm_eps), 1e-6f},
    {"swiglu_alpha", offsetof(m3_config, swiglu_alpha), 1.702f},
    {"swiglu_beta", offsetof(m3_config, swiglu_beta), 1.0f},
    {"swiglu_limit", offsetof(m3_config, swiglu_limit), 7.0f},
    {"routed_scaling_factor", offsetof(m3_config, routed_scaling_factor), 2.0f},
};

/* Switches for variants of the architecture that m3 does not implement: each must be absent or
 * hold M3's value, otherwise the model would load and silently compute something else. */
typedef struct {
  const char *key;
  int required_value;
} fixed_bool;

static const fixed_bool FIXED_BOOLS[] = {
    {"use_qk_norm", 1},
    {"use_gemma_norm", 1},
    {"attention_output_gate", 0},
    {"attention_bias", 0},
};

typedef struct {
  const char *key;
  const char *required_value;
} fixed_str;

static const fixed_str FIXED_STRS[] = {
    {"scoring_func", "sigmoid"},
    {"qk_norm_type", "per_head"},
};

static int *int_field(m3_config *cfg, size_t offset) {
  return (int *)((char *)cfg + offset);
}

static m3_status parse_fixed_keys(const char *label, const scope *text) {
  m3_status s;
  for (size_t i = 0; i < sizeof FIXED_BOOLS / sizeof FIXED_BOOLS[0]; i++) {
    int v = FIXED_BOOLS[i].required_value;
    keyref r = at(text, FIXED_BOOLS[i].key);
    if ((s = get_bool(label, r, NO_KEY, &v)) != M3_OK) return s;
    if (v != FIXED_BOOLS[i].required_value)
      return key_error(label, r, v ? "= true is not supported" : "= false is not supported");
  }
  for (size_t i = 0; i < sizeof FIXED_STRS / sizeof FIXED_STRS[0]; i++) {
    const char *v;
    keyref r = at(text, FIXED_STRS[i].key);
    if ((s = get_str(label, r, &v)) != M3_OK) return s;
    if (v && strcmp(v, FIXED_STRS[i].required_value) != 0) {
      char name[160];
      return m3_fail(M3_ERR_CONFIG, "%s: %s \"%s\" is not supported (only \"%s\")", label,
                     key_name(r, name, sizeof name), v, FIXED_STRS[i].required_value);
    }
  }
  return M3_OK;
}

/* eos_token_id may be a list in transformers configs; the first id is the model's own. */
static m3_status parse_eos(const char *label, const scope *text, int *eos) {
  keyref r = at(text, "eos_token_id");
  const cJSON *item = lookup(r);
  if (cJSON_IsArray(item)) {
    const cJSON *first = cJSON_GetArrayItem(item, 0);
    if (!cJSON_IsNumber(first) || first->valuedouble != floor(first->valuedouble) ||
        fabs(first->valuedouble) > INT_MAX)
      return type_error(label, r, "an integer or a list of integers");
    *eos = (int)first->valuedouble;
    return M3_OK;
  }
  *eos = 200020;
  return get_int(label, r, NO_KEY, eos, NULL);
}

static m3_status parse_text_scalars(const char *label, const scope *text, const scope *root,
                                    m3_config *cfg) {
  m3_status s;
  for (size_t i = 0; i < sizeof REQUIRED_INTS / sizeof REQUIRED_INTS[0]; i++) {
    int found;
    keyref r = at(text, REQUIRED_INTS[i].key);
    if ((s = get_int(label, r, NO_KEY, int_field(cfg, REQUIRED_INTS[i].offset), &found)) != M3_OK)
      return s;
    if (!found) return key_error(label, r, "is missing");
  }
  for (size_t i = 0; i < sizeof OPTIONAL_INTS / sizeof OPTIONAL_INTS[0]; i++) {
    int *field = int_field(cfg, OPTIONAL_INTS[i].offset);
    *field = OPTIONAL_INTS[i].fallback;
    if ((s = get_int(label, at(text, OPTIONAL_INTS[i].key), NO_KEY, field, NULL)) != M3_OK)
      return s;
  }
  for (size_t i = 0; i < sizeof OPTIONAL_FLOATS / sizeof OPTIONAL_FLOATS[0]; i++) {
    float *field = (float *)((char *)cfg + OPTIONAL_FLOATS[i].offset);
    *field = OPTIONAL_FLOATS[i].fallback;
    if ((s = get_float(label, at(text, OPTIONAL_FLOATS[i].key), NO_KEY, field)) != M3_OK) return s;
  }
  if ((s = parse_eos(label, text, &cfg->eos_token_id)) != M3_OK) return s;
  if ((s = parse_fixed_keys(label, text)) != M3_OK) return s;

  /* transformers' class default is 524288; the released model says 1048576 explicitly. */
  double max_pos = 524288;
  if ((s = get_num(label, AS_INT, at(text, "max_position_embeddings"), NO_KEY, NO_KEY, &max_pos,
                   NULL)) != M3_OK)
    return s;
  cfg->max_position_embeddings = (int64_t)max_pos;

  cfg->head_dim = cfg->num_heads > 0 ? cfg->hidden_size / cfg->num_heads : 0;
  if ((s = get_int(label, at(text, "head_dim"), NO_KEY, &cfg->head_dim, NULL)) != M3_OK) return s;

  /* Defaults are those of the reference config class (transformers 5.17): the full-size widths. */
  cfg->dense_intermediate_size = 12288;
  if ((s = get_int(label, at(text, "dense_intermediate_size"), NO_KEY,
                   &cfg->dense_intermediate_size, NULL)) != M3_OK)
    return s;

  cfg->use_routing_bias = 1;
  if ((s = get_bool(label, at(text, "use_routing_bias"), NO_KEY, &cfg->use_routing_bias)) != M3_OK)
    return s;
  /* Either level may tie the embeddings (transformers ORs them). */
  int tie_text = 0, tie_root = 0;
  if ((s = get_bool(label, at(text, "tie_word_embeddings"), NO_KEY, &tie_text)) != M3_OK) return s;
  if (root->obj != text->obj &&
      (s = get_bool(label, at(root, "tie_word_embeddings"), NO_KEY, &tie_root)) != M3_OK)
    return s;
  cfg->tie_word_embeddings = tie_text || tie_root;
  return M3_OK;
}

/* The shared-expert MLP is one block n_shared_experts times as wide as one shared expert
 * (transformers builds it that way). */
static m3_status parse_shared_width(const char *label, const scope *text, m3_config *cfg) {
  int per_shared = 3072; /* the reference config class's default */
  keyref r = at(text, "shared_intermediate_size");
  m3_status s = get_int(label, r, NO_KEY, &per_shared, NULL);
  if (s != M3_OK) return s;
  if (cfg->num_shared_experts < 0)
    return key_error(label, at(text, "n_shared_experts"), "must not be negative");
  if (cfg->num_shared_experts > 0 && per_shared <= 0)
    return key_error(label, r, "must be positive");
  if (cfg->num_shared_experts > 0 && per_shared > INT_MAX / cfg->num_shared_experts)
    return key_error(label, r, "is out of range");
  cfg->shared_intermediate_size = per_shared * cfg->num_shared_experts;
  return M3_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* RoPE (spec §3.2)                                                                           */

static m3_status check_rope_type(const char *label, const scope *rope) {
  static const char *const type_keys[] = {"rope_type", "type"};
  for (size_t i = 0; i < 2; i++) {
    const char *type;
    keyref r = at(rope, type_keys[i]);
    m3_status s = get_str(label, r, &type);
    if (s != M3_OK) return s;
    if (type && strcmp(type, "default") != 0) {
      char name[160];
      return m3_fail(M3_ERR_CONFIG, "%s: %s \"%s\": unsupported RoPE scaling (only \"default\")",
                     label, key_name(r, name, sizeof name), type);
    }
  }
  return M3_OK;
}

static m3_status parse_rope(const char *label, const scope *text, m3_config *cfg) {
  scope rope, scaling;
  m3_status s;
  if ((s = child(label, text, "rope_parameters", &rope)) != M3_OK) return s;
  if ((s = child(label, text, "rope_scaling", &scaling)) != M3_OK) return s;
  if ((s = check_rope_type(label, &rope)) != M3_OK) return s;
  if ((s = check_rope_type(label, &scaling)) != M3_OK) return s;

  cfg->rope_theta = 5e6;
  if ((s = get_double(label, at(text, "rope_theta"), at(&rope, "rope_theta"), &cfg->rope_theta)) !=
      M3_OK)
    return s;
  if (!(cfg->rope_theta > 0)) return key_error(label, at(text, "rope_theta"), "must be positive");

  /* Width: rotary_dim, else head_dim * partial_rotary_factor, else head_dim. transformers reads
   * only the factor, so when both are given they must describe the same width. */
  int rotary_dim = 0, has_rotary_dim;
  double factor = 1.0;
  int has_factor;
  keyref factor_key = at(text, "partial_rotary_factor");
  if ((s = get_int(label, at(text, "rotary_dim"), NO_KEY, &rotary_dim, &has_rotary_dim)) != M3_OK)
    return s;
  if ((s = get_num(label, AS_REAL, factor_key, at(&rope, "partial_rotary_factor"), NO_KEY, &factor,
                   &has_factor)) != M3_OK)
    return s;
  int factor_width = cfg->head_dim;
  if (has_factor) {
    if (!(factor > 0 && factor <= 1)) return key_error(label, factor_key, "must be in (0, 1]");
    double w = factor * cfg->head_dim;
    factor_width = (int)lround(w);
    if (fabs(w - factor_width) > 1e-6)
      return m3_fail(M3_ERR_CONFIG,
                     "%s: partial_rotary_factor %g x head_dim %d is not a whole number of channels",
                     label, factor, cfg->head_dim);
  }
  if (has_rotary_dim && has_factor && rotary_dim != factor_width)
    return m3_fail(M3_ERR_CONFIG,
                   "%s: rotary_dim %d and partial_rotary_factor %g (x head_dim %d = %d) disagree",
                   label, rotary_dim, factor, cfg->head_dim, factor_width);
  cfg->rotary_dim = has_rotary_dim ? rotary_dim : factor_width;
  if (cfg->rotary_dim <= 0 || cfg->rotary_dim % 2 != 0 || cfg->rotary_dim > cfg->head_dim)
    return m3_fail(M3_ERR_CONFIG,
                   "%s: rotary width %d (rotary_dim / partial_rotary_factor) must be even and in "
                   "(0, head_dim %d]",
                   label, cfg->rotary_dim, cfg->head_dim);
  return M3_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Layer maps and MiniMax Sparse Attention settings                                           */

typedef struct {
  const char *name;
  uint8_t kind;
} kind_name;

static const kind_name ATTN_NAMES[] = {
    {"full_attention", M3_ATTN_FULL},
    {"minimax_m3_sparse", M3_ATTN_SPARSE},
    {"sparse_attention", M3_ATTN_SPARSE},
    {"sparse", M3_ATTN_SPARSE},
    {NULL, 0},
};

static const kind_name MLP_NAMES[] = {
    {"dense", M3_MLP_DENSE},
    {"sparse", M3_MLP_MOE},
    {NULL, 0},
};

static m3_status check_length(const char *label, keyref r, const cJSON *array, int n) {
  if (!cJSON_IsArray(array)) return type_error(label, r, "a list");
  int len = cJSON_GetArraySize(array);
  if (len == n) return M3_OK;
  char name[160];
  return m3_fail(M3_ERR_CONFIG, "%s: %s has %d entries but num_hidden_layers is %d", label,
                 key_name(r, name, sizeof name), len, n);
}

/* The legacy spelling: one 0/1 (or bool) per layer, nonzero = sparse/MoE. */
static m3_status read_flags(const char *label, keyref r, int n, uint8_t *out, int *found) {
  const cJSON *array = lookup(r);
  *found = array != NULL;
  if (!array) return M3_OK;
  m3_status s = check_length(label, r, array, n);
  if (s != M3_OK) return s;
  int i = 0;
  const cJSON *item;
  cJSON_ArrayForEach(item, array) {
    int flag = cJSON_IsTrue(item) || (cJSON_IsNumber(item) && item->valuedouble == 1);
    int zero = cJSON_IsFalse(item) || (cJSON_IsNumber(item) && item->valuedouble == 0);
    if (!flag && !zero) {
      char name[160];
      return m3_fail(M3_ERR_CONFIG, "%s: %s[%d]: expected 0 or 1", label,
                     key_name(r, name, sizeof name), i);
    }
    out[i++] = (uint8_t)flag;
  }
  return M3_OK;
}

/* The newer spelling: one name per layer. */
static m3_status read_names(const char *label, keyref r, const kind_name *names, int n,
                            uint8_t *out, int *found) {
  const cJSON *array = lookup(r);
  *found = array != NULL;
  if (!array) return M3_OK;
  m3_status s = check_length(label, r, array, n);
  if (s != M3_OK) return s;
  int i = 0;
  const cJSON *item;
  cJSON_ArrayForEach(item, array) {
    if (!cJSON_IsString(item)) return type_error(label, r, "a list of strings");
    const kind_name *k = names;
    while (k->name && strcmp(item->valuestring, k->name) != 0) k++;
    if (!k->name) {
      char name[160];
      return m3_fail(M3_ERR_CONFIG, "%s: %s[%d]: unknown layer type \"%s\"", label,
                     key_name(r, name, sizeof name), i, item->valuestring);
    }
    out[i++] = k->kind;
  }
  return M3_OK;
}

/* Fills out[n] from whichever spelling is present (both must agree), else with `fallback`. */
static m3_status resolve_layers(const char *label, keyref legacy, keyref named,
                                const kind_name *names, int n, uint8_t fallback, uint8_t *out) {
  uint8_t *from_names = malloc((size_t)n);
  if (!from_names) return m3_fail(M3_ERR_NOMEM, "%s: out of memory for the layer map", label);
  int has_legacy, has_named;
  m3_status s = read_flags(label, legacy, n, out, &has_legacy);
  if (s == M3_OK) s = read_names(label, named, names, n, from_names, &has_named);
  if (s == M3_OK && has_legacy && has_named && memcmp(out, from_names, (size_t)n) != 0) {
    int i = 0;
    while (out[i] == from_names[i]) i++;
    char n1[160], n2[160];
    s = m3_fail(M3_ERR_CONFIG, "%s: %s and %s disagree at layer %d", label,
                key_name(legacy, n1, sizeof n1), key_name(named, n2, sizeof n2), i);
  }
  if (s == M3_OK && !has_legacy) {
    if (has_named)
      memcpy(out, from_names, (size_t)n);
    else
      memset(out, fallback, (size_t)n);
  }
  free(from_names);
  return s;
}

typedef struct {
  const char *legacy; /* in sparse_attention_config */
  const char *flat;   /* in the text config */
  size_t offset;      /* of an int in m3_config */
  int fallback;
  int min;
} index_key;

static const index_key INDEX_KEYS[] = {
    {"sparse_num_index_heads", "index_n_heads", offsetof(m3_config, index_num_heads), 4, 1},
    {"sparse_index_dim", "index_head_dim", offsetof(m3_config, index_head_dim), 128, 1},
    {"sparse_block_size", "index_block_size", offsetof(m3_config, index_block_size), 128, 1},
    {"sparse_topk_blocks", "index_topk_blocks", offsetof(m3_config, index_topk_blocks), 16, 1},
    {"sparse_local_block", "index_local_blocks", offsetof(m3_config, index_local_blocks), 1, 0},
    {"sparse_init_block", "index_init_blocks", offsetof(m3_config, index_init_blocks), 0, 0},
};

/* Every sparse layer must be score-only (no index value/output projection), as in M3. */
static m3_status check_index_value(const char *label, const scope *sparse, const m3_config *cfg) {
  keyref r = at(sparse, "sparse_disable_index_value");
  const cJSON *item = lookup(r);
  if (!item) return M3_OK;
  int n = cfg->num_layers;
  uint8_t *disabled = malloc((size_t)n);
  if (!disabled) return m3_fail(M3_ERR_NOMEM, "%s: out of memory for the layer map", label);
  m3_status s = M3_OK;
  if (cJSON_IsArray(item)) {
    int found;
    s = read_flags(label, r, n, disabled, &found);
  } else {
    int all = 1;
    s = get_bool(label, r, NO_KEY, &all);
    memset(disabled, all, (size_t)n);
  }
  for (int i = 0; s == M3_OK && i < n; i++)
    if (cfg->layer_attn[i] == M3_ATTN_SPARSE && !disabled[i]) {
      char name[160];
      s = m3_fail(M3_ERR_CONFIG, "%s: %s: layer %d has an index value projection (not supported)",
                  label, key_name(r, name, sizeof name), i);
    }
  free(disabled);
  return s;
}

static m3_status parse_sparse(const char *label, const scope *text, m3_config *cfg) {
  scope sparse;
  m3_status s;
  if ((s = child(label, text, "sparse_attention_config", &sparse)) != M3_OK) return s;
  for (size_t i = 0; i < sizeof INDEX_KEYS / sizeof INDEX_KEYS[0]; i++) {
    int *field = int_field(cfg, INDEX_KEYS[i].offset);
    *field = INDEX_KEYS[i].fallback;
    if ((s = get_int(label, at(&sparse, INDEX_KEYS[i].legacy), at(text, INDEX_KEYS[i].flat), field,
                     NULL)) != M3_OK)
      return s;
    if (*field < INDEX_KEYS[i].min)
      return m3_fail(M3_ERR_CONFIG, "%s: %s / %s is %d, must be at least %d", label,
                     INDEX_KEYS[i].flat, INDEX_KEYS[i].legacy, *field, INDEX_KEYS[i].min);
  }
  const char *score_type;
  keyref score_key = at(&sparse, "sparse_score_type");
  if ((s = get_str(label, score_key, &score_type)) != M3_OK) return s;
  if (score_type && strcmp(score_type, "max") != 0)
    return key_error(label, score_key, "is not supported (only \"max\" block pooling)");

  int n = cfg->num_layers;
  cfg->layer_attn = malloc((size_t)n);
  cfg->layer_mlp = malloc((size_t)n);
  if (!cfg->layer_attn || !cfg->layer_mlp)
    return m3_fail(M3_ERR_NOMEM, "%s: out of memory for the layer map", label);
  /* Neither spelling: transformers makes every layer full attention and every MLP an MoE. */
  if ((s = resolve_layers(label, at(&sparse, "sparse_attention_freq"), at(text, "layer_types"),
                          ATTN_NAMES, n, M3_ATTN_FULL, cfg->layer_attn)) != M3_OK)
    return s;
  if ((s = resolve_layers(label, at(text, "moe_layer_freq"), at(text, "mlp_layer_types"), MLP_NAMES,
                          n, M3_MLP_MOE, cfg->layer_mlp)) != M3_OK)
    return s;

  int use_sparse = 1;
  keyref use_key = at(&sparse, "use_sparse_attention");
  if ((s = get_bool(label, use_key, NO_KEY, &use_sparse)) != M3_OK) return s;
  if (!use_sparse && memchr(cfg->layer_attn, M3_ATTN_SPARSE, (size_t)n))
    return m3_fail(M3_ERR_CONFIG,
                   "%s: %s.use_sparse_attention is false but sparse_attention_freq / layer_types "
                   "mark sparse layers",
                   label, sparse.path);
  return check_index_value(label, &sparse, cfg);
}

/* ------------------------------------------------------------------------------------------ */
/* quantization_config and vision_config                                                      */

static m3_status parse_quant(const char *label, const scope *q, m3_quant_config *out) {
  m3_status s;
  const char *method, *scheme;
  keyref method_key = at(q, "quant_method");
  if ((s = get_str(label, method_key, &method)) != M3_OK) return s;
  if (!method) return key_error(label, method_key, "is missing");
  if ((s = get_str(label, at(q, "activation_scheme"), &scheme)) != M3_OK) return s;
  out->present = 1;
  snprintf(out->method_name, sizeof out->method_name, "%s", method);
  snprintf(out->activation_scheme, sizeof out->activation_scheme, "%s", scheme ? scheme : "");

  keyref block_key = at(q, "weight_block_size");
  const cJSON *block = lookup(block_key);
  if (block) {
    const cJSON *r = cJSON_GetArrayItem(block, 0), *c = cJSON_GetArrayItem(block, 1);
    if (!cJSON_IsArray(block) || cJSON_GetArraySize(block) != 2 || !cJSON_IsNumber(r) ||
        !cJSON_IsNumber(c) || r->valuedouble != floor(r->valuedouble) ||
        c->valuedouble != floor(c->valuedouble) || !(r->valuedouble >= 1) ||
        !(c->valuedouble >= 1) || r->valuedouble > INT_MAX || c->valuedouble > INT_MAX)
      return type_error(label, block_key, "[rows, cols] of positive integers");
    out->block_rows = (int)r->valuedouble;
    out->block_cols = (int)c->valuedouble;
  }

  if (strcmp(method, "mxfp8") == 0) {
    out->method = M3_QUANT_MXFP8;
    if (!block) {
      out->block_rows = 1;
      out->block_cols = 32;
    } else if (out->block_rows != 1 || out->block_cols != 32) {
      return key_error(label, block_key, "must be [1, 32] for mxfp8");
    }
  } else if (strcmp(method, "fp8") == 0) {
    out->method = block ? M3_QUANT_FP8_BLOCK : M3_QUANT_FP8;
  } else if (strcmp(method, "compressed-tensors") == 0) {
    /* llm-compressor's FP8 schemes (FP8-dynamic: per-channel weights) save "float-quantized";
     * its other formats (pack-quantized int4, ...) store tensors m3 does not read. */
    const char *format;
    keyref format_key = at(q, "format");
    if ((s = get_str(label, format_key, &format)) != M3_OK) return s;
    out->method = format && strcmp(format, "float-quantized") == 0 ? M3_QUANT_FP8 : M3_QUANT_OTHER;
  } else {
    out->method = M3_QUANT_OTHER;
  }
  return M3_OK;
}

static const optional_int VISION_INTS[] = {
    {"hidden_size", offsetof(m3_vision_config, hidden_size), 1280},
    {"num_attention_heads", offsetof(m3_vision_config, num_heads), 16},
    {"num_hidden_layers", offsetof(m3_vision_config, num_layers), 32},
    {"intermediate_size", offsetof(m3_vision_config, intermediate_size), 5120},
    {"num_channels", offsetof(m3_vision_config, num_channels), 3},
    {"patch_size", offsetof(m3_vision_config, patch_size), 14},
    {"vision_segment_max_frames", offsetof(m3_vision_config, segment_max_frames), 4},
};

static m3_status parse_vision(const char *label, const scope *root, const scope *vision,
                              m3_vision_config *out) {
  m3_status s;
  out->present = 1;
  for (size_t i = 0; i < sizeof VISION_INTS / sizeof VISION_INTS[0]; i++) {
    int *field = (int *)((char *)out + VISION_INTS[i].offset);
    *field = VISION_INTS[i].fallback;
    keyref r = at(vision, VISION_INTS[i].key);
    if ((s = get_int(label, r, NO_KEY, field, NULL)) != M3_OK) return s;
    if (*field <= 0) return key_error(label, r, "must be positive");
  }
  if (out->hidden_size % out->num_heads != 0)
    return m3_fail(M3_ERR_CONFIG,
                   "%s: %s.hidden_size %d is not divisible by num_attention_heads %d", label,
                   vision->path, out->hidden_size, out->num_heads);
  out->layer_norm_eps = 1e-5f;
  if ((s = get_float(label, at(vision, "layer_norm_eps"), NO_KEY, &out->layer_norm_eps)) != M3_OK)
    return s;
  if (!(out->layer_norm_eps > 0))
    return key_error(label, at(vision, "layer_norm_eps"), "must be positive");
  scope rope;
  if ((s = child(label, vision, "rope_parameters", &rope)) != M3_OK) return s;
  out->rope_theta = 10000.0;
  if ((s = get_double(label, at(vision, "rope_theta"), at(&rope, "rope_theta"),
                      &out->rope_theta)) != M3_OK)
    return s;
  if (!(out->rope_theta > 0)) return key_error(label, at(vision, "rope_theta"), "must be positive");

  /* Patch grouping: flat keys (transformers) or img_token_compression_config, inside
   * vision_config or at the top level (the released config carries both copies). */
  scope inner, outer;
  if ((s = child(label, vision, "img_token_compression_config", &inner)) != M3_OK) return s;
  if ((s = child(label, root, "img_token_compression_config", &outer)) != M3_OK) return s;
  static const char *const grouping_keys[] = {"temporal_patch_size", "spatial_merge_size"};
  int *grouping[] = {&out->temporal_patch_size, &out->spatial_merge_size};
  for (int i = 0; i < 2; i++) {
    double v = 2;
    const char *key = grouping_keys[i];
    if ((s = get_num(label, AS_INT, at(vision, key), at(&inner, key), at(&outer, key), &v, NULL)) !=
        M3_OK)
      return s;
    if (!(v >= 1 && v <= INT_MAX)) return key_error(label, at(vision, key), "must be positive");
    *grouping[i] = (int)v;
  }
  return M3_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Layout (VL wrapper or bare text config) and consistency                                    */

static int has_architecture(const cJSON *archs, const char *name) {
  const cJSON *a;
  cJSON_ArrayForEach(a, archs) {
    if (cJSON_IsString(a) && strcmp(a->valuestring, name) == 0) return 1;
  }
  return 0;
}

/* Decides the layout and fills `text` with the object holding the text settings. */
static m3_status parse_layout(const char *label, const scope *root, scope *text, m3_config *cfg) {
  m3_status s;
  const char *model_type;
  keyref type_key = at(root, "model_type"), arch_key = at(root, "architectures");
  if ((s = get_str(label, type_key, &model_type)) != M3_OK) return s;
  const cJSON *archs = lookup(arch_key);
  if (archs && !cJSON_IsArray(archs)) return type_error(label, arch_key, "a list of strings");
  const cJSON *arch0 = cJSON_GetArrayItem(archs, 0);
  if (arch0 && !cJSON_IsString(arch0)) return type_error(label, arch_key, "a list of strings");

  if ((s = child(label, root, "text_config", text)) != M3_OK) return s;
  cfg->is_vl = text->obj != NULL;
  const char *want_type = cfg->is_vl ? TYPE_VL : TYPE_TEXT;
  const char *want_arch = cfg->is_vl ? ARCH_VL : ARCH_TEXT;
  int type_ok = model_type && strcmp(model_type, want_type) == 0;
  if (model_type && !type_ok) {
    if (strcmp(model_type, TYPE_VL) == 0)
      return key_error(label, at(root, "text_config"), "is missing");
    return m3_fail(M3_ERR_CONFIG, "%s: model_type \"%s\" is not MiniMax-M3 (expected \"%s\")",
                   label, model_type, want_type);
  }
  if (!type_ok && !has_architecture(archs, want_arch))
    return m3_fail(M3_ERR_CONFIG,
                   "%s: not a MiniMax-M3 config: neither model_type \"%s\" nor architectures "
                   "[\"%s\"]",
                   label, want_type, want_arch);
  snprintf(cfg->architecture, sizeof cfg->architecture, "%s",
           arch0 ? arch0->valuestring : want_arch);
  if (!cfg->is_vl) {
    *text = *root;
    cfg->image_token_id = cfg->video_token_id = -1;
    return M3_OK;
  }

  cfg->image_token_id = 200025;
  cfg->video_token_id = 200026;
  cfg->projector_hidden_size = 6144;
  if ((s = get_int(label, at(root, "image_token_index"), at(root, "image_token_id"),
                   &cfg->image_token_id, NULL)) != M3_OK ||
      (s = get_int(label, at(root, "video_token_index"), at(root, "video_token_id"),
                   &cfg->video_token_id, NULL)) != M3_OK ||
      (s = get_int(label, at(root, "projector_hidden_size"), NO_KEY, &cfg->projector_hidden_size,
                   NULL)) != M3_OK)
    return s;
  if (cfg->projector_hidden_size <= 0)
    return key_error(label, at(root, "projector_hidden_size"), "must be positive");
  scope vision;
  if ((s = child(label, root, "vision_config", &vision)) != M3_OK) return s;
  return vision.obj ? parse_vision(label, root, &vision, &cfg->vision) : M3_OK;
}

/* quantization_config sits at the top level; some re-saved configs put it in text_config. */
static m3_status parse_quant_location(const char *label, const scope *root, const scope *text,
                                      m3_config *cfg) {
  scope outer, inner;
  m3_status s;
  if ((s = child(label, root, "quantization_config", &outer)) != M3_OK) return s;
  inner.obj = NULL;
  if (text->obj != root->obj && (s = child(label, text, "quantization_config", &inner)) != M3_OK)
    return s;
  if (outer.obj && inner.obj && !cJSON_Compare(outer.obj, inner.obj, 1))
    return m3_fail(M3_ERR_CONFIG, "%s: quantization_config and %s disagree", label, inner.path);
  const scope *q = outer.obj ? &outer : inner.obj ? &inner : NULL;
  return q ? parse_quant(label, q, &cfg->quant) : M3_OK;
}

static m3_status positive(const char *label, const scope *text, const char *key, int64_t v) {
  return v > 0 ? M3_OK : key_error(label, at(text, key), "must be positive");
}

/* Sizes first: everything after (RoPE width, layer maps) is derived from them. */
static m3_status validate_sizes(const char *label, const scope *text, const m3_config *c) {
  const struct {
    const char *key;
    int64_t value;
  } sizes[] = {
      {"hidden_size", c->hidden_size},
      {"num_hidden_layers", c->num_layers},
      {"num_attention_heads", c->num_heads},
      {"num_key_value_heads", c->num_kv_heads},
      {"head_dim", c->head_dim},
      {"vocab_size", c->vocab_size},
      {"intermediate_size", c->intermediate_size},
      {"dense_intermediate_size", c->dense_intermediate_size},
      {"num_local_experts", c->num_experts},
      {"num_experts_per_tok", c->num_experts_per_tok},
      {"max_position_embeddings", c->max_position_embeddings},
  };
  m3_status s;
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
    if ((s = positive(label, text, sizes[i].key, sizes[i].value)) != M3_OK) return s;
  if (c->num_layers > MAX_LAYERS)
    return key_error(label, at(text, "num_hidden_layers"), "is implausibly large");
  if (!(c->rms_norm_eps > 0)) return key_error(label, at(text, "rms_norm_eps"), "must be positive");
  if (c->num_mtp_modules < 0)
    return key_error(label, at(text, "num_mtp_modules"), "must not be negative");
  if (c->num_heads % c->num_kv_heads != 0)
    return m3_fail(M3_ERR_CONFIG,
                   "%s: num_attention_heads %d is not divisible by num_key_value_heads %d", label,
                   c->num_heads, c->num_kv_heads);
  if (c->num_experts_per_tok > c->num_experts)
    return m3_fail(M3_ERR_CONFIG, "%s: num_experts_per_tok %d exceeds num_local_experts %d", label,
                   c->num_experts_per_tok, c->num_experts);
  return M3_OK;
}

static m3_status validate_sparse(const char *label, const m3_config *c) {
  if (c->index_topk_blocks < c->index_local_blocks + c->index_init_blocks)
    return m3_fail(M3_ERR_CONFIG,
                   "%s: index_topk_blocks %d is less than index_local_blocks %d + "
                   "index_init_blocks %d (the forced blocks are part of the top-k)",
                   label, c->index_topk_blocks, c->index_local_blocks, c->index_init_blocks);
  if (!memchr(c->layer_attn, M3_ATTN_SPARSE, (size_t)c->num_layers)) return M3_OK;
  /* One index query head per KV group (vLLM asserts it; the selection is per group). */
  if (c->index_num_heads != c->num_kv_heads)
    return m3_fail(M3_ERR_CONFIG,
                   "%s: index_n_heads %d must equal num_key_value_heads %d on sparse layers", label,
                   c->index_num_heads, c->num_kv_heads);
  /* The indexer uses the same rotation table as attention, on its first rotary_dim channels. */
  if (c->rotary_dim > c->index_head_dim)
    return m3_fail(M3_ERR_CONFIG, "%s: rotary_dim %d exceeds index_head_dim %d", label,
                   c->rotary_dim, c->index_head_dim);
  return M3_OK;
}

static m3_status parse_root(const char *label, const cJSON *json, m3_config *cfg) {
  scope root = {json, ""}, text;
  m3_status s;
  if ((s = parse_layout(label, &root, &text, cfg)) != M3_OK) return s;
  if ((s = parse_text_scalars(label, &text, &root, cfg)) != M3_OK) return s;
  if ((s = validate_sizes(label, &text, cfg)) != M3_OK) return s;
  if ((s = parse_shared_width(label, &text, cfg)) != M3_OK) return s;
  if ((s = parse_rope(label, &text, cfg)) != M3_OK) return s;
  if ((s = parse_sparse(label, &text, cfg)) != M3_OK) return s;
  if ((s = validate_sparse(label, cfg)) != M3_OK) return s;
  return parse_quant_location(label, &root, &text, cfg);
}

m3_status m3_config_parse(const char *json, size_t len, const char *label, m3_config *out) {
  memset(out, 0, sizeof *out);
  if (!label) label = "config.json";
  const char *end = NULL;
  cJSON *doc = cJSON_ParseWithLengthOpts(json, len, &end, 0);
  if (!doc) {
    size_t at_byte = end && end >= json && end <= json + len ? (size_t)(end - json) : len;
    return m3_fail(M3_ERR_FORMAT, "%s: invalid JSON near byte %zu", label, at_byte);
  }
  m3_status s = M3_OK;
  while (end < json + len && (*end == ' ' || *end == '\t' || *end == '\n' || *end == '\r')) end++;
  if (end < json + len)
    s = m3_fail(M3_ERR_FORMAT, "%s: unexpected data after the JSON value at byte %zu", label,
                (size_t)(end - json));
  else if (!cJSON_IsObject(doc))
    s = m3_fail(M3_ERR_FORMAT, "%s: top level is not a JSON object", label);
  else
    s = parse_root(label, doc, out);
  cJSON_Delete(doc);
  if (s != M3_OK) m3_config_free(out);
  return s;
}

m3_status m3_config_load(const char *path, m3_config *out) {
  memset(out, 0, sizeof *out);
  FILE *f = fopen(path, "rb");
  if (!f) return m3_fail(M3_ERR_IO, "%s: cannot open config", path);
  long size = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : -1;
  if (size < 0 || fseek(f, 0, SEEK_SET) != 0) {
    fclose(f);
    return m3_fail(M3_ERR_IO, "%s: cannot determine the file size", path);
  }
  if (size > MAX_CONFIG_BYTES) {
    fclose(f);
    return m3_fail(M3_ERR_FORMAT, "%s: %ld bytes, too large for a config.json", path, size);
  }
  char *buf = malloc((size_t)size + 1);
  if (!buf) {
    fclose(f);
    return m3_fail(M3_ERR_NOMEM, "%s: out of memory reading config", path);
  }
  size_t n = fread(buf, 1, (size_t)size, f);
  fclose(f);
  m3_status s = n == (size_t)size ? m3_config_parse(buf, n, path, out)
                                  : m3_fail(M3_ERR_IO, "%s: read error", path);
  free(buf);
  return s;
}

void m3_config_free(m3_config *cfg) {
  free(cfg->layer_attn);
  free(cfg->layer_mlp);
  memset(cfg, 0, sizeof *cfg);
}

/* ------------------------------------------------------------------------------------------ */
/* Writing                                                                                    */

/* Collects allocation failures so the builders below stay straight-line. */
typedef struct {
  int failed;
} writer;

static cJSON *check(writer *w, cJSON *item) {
  if (!item) w->failed = 1;
  return item;
}

static void put_int(writer *w, cJSON *obj, const char *key, double v) {
  check(w, cJSON_AddNumberToObject(obj, key, v));
}

static void put_bool(writer *w, cJSON *obj, const char *key, int v) {
  check(w, cJSON_AddBoolToObject(obj, key, v));
}

static void put_str(writer *w, cJSON *obj, const char *key, const char *v) {
  check(w, cJSON_AddStringToObject(obj, key, v));
}

/* Reals are written in the shortest form that reads back to the same value, always with a '.'
 * or an exponent so that transformers' typed config fields see a float, not an int. */
static void put_real(writer *w, cJSON *obj, const char *key, double v, int single) {
  char buf[40];
  for (int digits = 1; digits <= 17; digits++) {
    snprintf(buf, sizeof buf - 2, "%.*g", digits, v);
    double back = strtod(buf, NULL);
    if (single ? (float)back == (float)v : back == v) break;
  }
  if (!strpbrk(buf, ".e")) strcat(buf, ".0");
  check(w, cJSON_AddRawToObject(obj, key, buf));
}

static void put_int_array(writer *w, cJSON *obj, const char *key, const int *v, int n) {
  cJSON *array = check(w, cJSON_AddArrayToObject(obj, key));
  for (int i = 0; array && i < n; i++)
    if (!cJSON_AddItemToArray(array, check(w, cJSON_CreateNumber(v[i])))) w->failed = 1;
}

/* One name per layer: names[kind]. */
static void put_layer_names(writer *w, cJSON *obj, const char *key, const uint8_t *kinds, int n,
                            const char *const names[2]) {
  cJSON *array = check(w, cJSON_AddArrayToObject(obj, key));
  for (int i = 0; array && i < n; i++)
    if (!cJSON_AddItemToArray(array, check(w, cJSON_CreateString(names[kinds[i] != 0]))))
      w->failed = 1;
}

static void write_text(writer *w, cJSON *t, const m3_config *c) {
  static const char *const attn_names[2] = {"full_attention", "minimax_m3_sparse"};
  static const char *const mlp_names[2] = {"dense", "sparse"};
  put_int(w, t, "hidden_size", c->hidden_size);
  put_int(w, t, "num_hidden_layers", c->num_layers);
  put_int(w, t, "num_attention_heads", c->num_heads);
  put_int(w, t, "num_key_value_heads", c->num_kv_heads);
  put_int(w, t, "head_dim", c->head_dim);
  put_int(w, t, "vocab_size", c->vocab_size);
  put_int(w, t, "max_position_embeddings", (double)c->max_position_embeddings);
  put_real(w, t, "rms_norm_eps", c->rms_norm_eps, 1);
  put_bool(w, t, "use_gemma_norm", 1);
  put_bool(w, t, "use_qk_norm", 1);
  put_str(w, t, "qk_norm_type", "per_head");
  put_bool(w, t, "attention_output_gate", 0);
  put_bool(w, t, "attention_bias", 0);

  /* transformers 5.17 reads the width from partial_rotary_factor; rotary_dim says it for m3 and
   * for vLLM. Both are written and agree. */
  put_int(w, t, "rotary_dim", c->rotary_dim);
  cJSON *rope = check(w, cJSON_AddObjectToObject(t, "rope_parameters"));
  put_str(w, rope, "rope_type", "default");
  put_real(w, rope, "rope_theta", c->rope_theta, 0);
  put_real(w, rope, "partial_rotary_factor", (double)c->rotary_dim / c->head_dim, 0);

  put_str(w, t, "hidden_act", "swigluoai");
  put_real(w, t, "swiglu_alpha", c->swiglu_alpha, 1);
  put_real(w, t, "swiglu_beta", c->swiglu_beta, 1);
  put_real(w, t, "swiglu_limit", c->swiglu_limit, 1);
  put_int(w, t, "intermediate_size", c->intermediate_size);
  put_int(w, t, "dense_intermediate_size", c->dense_intermediate_size);
  /* Per shared expert (transformers multiplies it by n_shared_experts). */
  put_int(w, t, "shared_intermediate_size",
          c->num_shared_experts > 0 ? c->shared_intermediate_size / c->num_shared_experts : 0);
  put_int(w, t, "n_shared_experts", c->num_shared_experts);
  put_int(w, t, "num_local_experts", c->num_experts);
  put_int(w, t, "num_experts_per_tok", c->num_experts_per_tok);
  put_str(w, t, "scoring_func", "sigmoid");
  put_bool(w, t, "use_routing_bias", c->use_routing_bias);
  put_real(w, t, "routed_scaling_factor", c->routed_scaling_factor, 1);
  put_layer_names(w, t, "mlp_layer_types", c->layer_mlp, c->num_layers, mlp_names);
  put_layer_names(w, t, "layer_types", c->layer_attn, c->num_layers, attn_names);

  put_int(w, t, "index_n_heads", c->index_num_heads);
  put_int(w, t, "index_head_dim", c->index_head_dim);
  put_int(w, t, "index_block_size", c->index_block_size);
  put_int(w, t, "index_topk_blocks", c->index_topk_blocks);
  put_int(w, t, "index_local_blocks", c->index_local_blocks);
  put_int(w, t, "index_init_blocks", c->index_init_blocks);

  put_int(w, t, "num_mtp_modules", c->num_mtp_modules);
  put_bool(w, t, "tie_word_embeddings", c->tie_word_embeddings);
  put_int(w, t, "bos_token_id", c->bos_token_id);
  put_int(w, t, "eos_token_id", c->eos_token_id);
}

static void write_vision(writer *w, cJSON *v, const m3_vision_config *c) {
  put_int(w, v, "hidden_size", c->hidden_size);
  put_int(w, v, "num_attention_heads", c->num_heads);
  put_int(w, v, "num_hidden_layers", c->num_layers);
  put_int(w, v, "intermediate_size", c->intermediate_size);
  put_str(w, v, "hidden_act", "gelu");
  put_real(w, v, "layer_norm_eps", c->layer_norm_eps, 1);
  put_int(w, v, "num_channels", c->num_channels);
  put_int(w, v, "patch_size", c->patch_size);
  put_int(w, v, "temporal_patch_size", c->temporal_patch_size);
  put_int(w, v, "spatial_merge_size", c->spatial_merge_size);
  put_real(w, v, "rope_theta", c->rope_theta, 0);
  put_int(w, v, "vision_segment_max_frames", c->segment_max_frames);
  cJSON *icc = check(w, cJSON_AddObjectToObject(v, "img_token_compression_config"));
  put_str(w, icc, "image_token_compression_method", "patch_merge");
  put_int(w, icc, "temporal_patch_size", c->temporal_patch_size);
  put_int(w, icc, "spatial_merge_size", c->spatial_merge_size);
}

static void write_quant(writer *w, cJSON *q, const m3_quant_config *c) {
  put_str(w, q, "quant_method", c->method_name);
  if (c->activation_scheme[0]) put_str(w, q, "activation_scheme", c->activation_scheme);
  if (c->block_rows > 0) {
    const int block[2] = {c->block_rows, c->block_cols};
    put_int_array(w, q, "weight_block_size", block, 2);
  }
}

static void write_root(writer *w, cJSON *root, const m3_config *c) {
  const char *arch = c->architecture[0] ? c->architecture : c->is_vl ? ARCH_VL : ARCH_TEXT;
  cJSON *archs = check(w, cJSON_AddArrayToObject(root, "architectures"));
  if (archs && !cJSON_AddItemToArray(archs, check(w, cJSON_CreateString(arch)))) w->failed = 1;
  if (!c->is_vl) {
    put_str(w, root, "model_type", TYPE_TEXT);
    write_text(w, root, c);
  } else {
    put_str(w, root, "model_type", TYPE_VL);
    put_int(w, root, "image_token_index", c->image_token_id);
    put_int(w, root, "video_token_index", c->video_token_id);
    put_int(w, root, "projector_hidden_size", c->projector_hidden_size);
    put_bool(w, root, "tie_word_embeddings", c->tie_word_embeddings);
    cJSON *text = check(w, cJSON_AddObjectToObject(root, "text_config"));
    put_str(w, text, "model_type", TYPE_TEXT);
    write_text(w, text, c);
    if (c->vision.present)
      write_vision(w, check(w, cJSON_AddObjectToObject(root, "vision_config")), &c->vision);
  }
  if (c->quant.present)
    write_quant(w, check(w, cJSON_AddObjectToObject(root, "quantization_config")), &c->quant);
}

m3_status m3_config_write(const m3_config *cfg, const char *path) {
  writer w = {0};
  cJSON *root = check(&w, cJSON_CreateObject());
  if (root) write_root(&w, root, cfg);
  char *text = w.failed ? NULL : cJSON_Print(root);
  cJSON_Delete(root);
  if (!text) return m3_fail(M3_ERR_NOMEM, "%s: out of memory building config.json", path);
  FILE *f = fopen(path, "wb");
  if (!f) {
    cJSON_free(text);
    return m3_fail(M3_ERR_IO, "%s: cannot create", path);
  }
  size_t n = strlen(text);
  int ok = fwrite(text, 1, n, f) == n && fputc('\n', f) != EOF;
  ok = (fclose(f) == 0) && ok;
  cJSON_free(text);
  return ok ? M3_OK : m3_fail(M3_ERR_IO, "%s: write failed", path);
}
