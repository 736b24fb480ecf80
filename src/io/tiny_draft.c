/* tiny_draft.c: the tiny EAGLE3 draft (tiny_draft.h). Shapes for target hidden H, vocab V:
 *   fc [H, 3H]; layers.0: input_layernorm, hidden_norm, post_attention_layernorm [H] (Llama
 *   norms, about 1); self_attn q [4*16, 2H], k/v [2*16, 2H], o [H, 64]; mlp gate/up [96, H],
 *   down [H, 96]; norm [H]; lm_head [V/2, H]; d2t int64 [V/2] sending draft id i to 2i + 1. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "io/safetensors.h"
#include "io/tiny_draft.h"

enum { HEADS = 4, KV_HEADS = 2, HEAD_DIM = 16, WIDTH = 96 };

static uint64_t splitmix64(uint64_t *state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* rows x cols floats: center + uniform in [-scale, scale), from a stream named by the tensor. */
static m3_status put(m3_st_writer *w, uint64_t seed, const char *name, int64_t rows, int64_t cols,
                     float center, float scale) {
  uint64_t state = seed;
  for (const char *c = name; *c; c++) state = (state ^ (uint8_t)*c) * 0x100000001b3ull;
  const size_t n = (size_t)rows * (size_t)cols;
  float *x = malloc(n * sizeof *x);
  if (!x) return m3_fail(M3_ERR_NOMEM, "tiny draft: %s", name);
  for (size_t i = 0; i < n; i++)
    x[i] = center + scale * (float)((double)(splitmix64(&state) >> 11) * 0x1p-52 - 1.0);
  const int64_t shape[2] = {rows, cols};
  m3_status st = rows == 1 ? m3_st_writer_add(w, name, M3_DT_F32, 1, shape + 1, x)
                           : m3_st_writer_add(w, name, M3_DT_F32, 2, shape, x);
  free(x);
  return st;
}

static m3_status write_config(const char *path, const m3_config *t) {
  FILE *f = fopen(path, "w");
  if (!f) return m3_fail(M3_ERR_IO, "%s: cannot create (%s)", path, strerror(errno));
  const int L = t->num_layers;
  fprintf(f,
          "{\n  \"architectures\": [\"LlamaForCausalLMEagle3\"],\n  \"model_type\": \"llama\",\n"
          "  \"hidden_size\": %d,\n  \"num_attention_heads\": %d,\n  \"num_key_value_heads\": %d,\n"
          "  \"head_dim\": %d,\n  \"intermediate_size\": %d,\n  \"num_hidden_layers\": 1,\n"
          "  \"hidden_act\": \"silu\",\n  \"rms_norm_eps\": 1e-06,\n  \"rope_theta\": 10000.0,\n"
          "  \"rope_scaling\": null,\n  \"tie_word_embeddings\": false,\n  \"vocab_size\": %d,\n"
          "  \"draft_vocab_size\": %d,\n  \"target_hidden_size\": %d,\n"
          "  \"eagle_config\": {\"eagle_aux_hidden_state_layer_ids\": [1, %d, %d], "
          "\"use_aux_hidden_state\": true}\n}\n",
          t->hidden_size, HEADS, KV_HEADS, HEAD_DIM, WIDTH, t->vocab_size, t->vocab_size / 2,
          t->hidden_size, L / 2, L - 1);
  return fclose(f) == 0 ? M3_OK : m3_fail(M3_ERR_IO, "%s: write failed", path);
}

m3_status m3_tiny_eagle3_write(const char *dir, const m3_config *t, uint64_t seed) {
  if (t->num_layers < 4)
    return m3_fail(M3_ERR_ARG, "tiny draft: the target has %d layers; three distinct auxiliary "
                   "layers need 4", t->num_layers);
  if (mkdir(dir, 0777) != 0 && errno != EEXIST)
    return m3_fail(M3_ERR_IO, "%s: cannot create (%s)", dir, strerror(errno));
  char path[4096];
  snprintf(path, sizeof path, "%s/config.json", dir);
  m3_status st = write_config(path, t);
  if (st != M3_OK) return st;
  const int64_t H = t->hidden_size, V = t->vocab_size / 2, qw = HEADS * HEAD_DIM,
                kvw = KV_HEADS * HEAD_DIM;
  const float in2 = 1.0f / sqrtf((float)(2 * H)), in1 = 1.0f / sqrtf((float)H);
  m3_st_writer *w = m3_st_writer_new();
  if (!w) return m3_fail(M3_ERR_NOMEM, "tiny draft: writer");
  const struct {
    const char *name;
    int64_t rows, cols;
    float center, scale;
  } tensors[] = {
      {"fc.weight", H, 3 * H, 0.0f, 1.0f / sqrtf((float)(3 * H))},
      {"layers.0.input_layernorm.weight", 1, H, 1.0f, 0.2f},
      {"layers.0.hidden_norm.weight", 1, H, 1.0f, 0.2f},
      {"layers.0.post_attention_layernorm.weight", 1, H, 1.0f, 0.2f},
      {"layers.0.self_attn.q_proj.weight", qw, 2 * H, 0.0f, in2},
      {"layers.0.self_attn.k_proj.weight", kvw, 2 * H, 0.0f, in2},
      {"layers.0.self_attn.v_proj.weight", kvw, 2 * H, 0.0f, in2},
      {"layers.0.self_attn.o_proj.weight", H, qw, 0.0f, 1.0f / sqrtf((float)qw)},
      {"layers.0.mlp.gate_proj.weight", WIDTH, H, 0.0f, in1},
      {"layers.0.mlp.up_proj.weight", WIDTH, H, 0.0f, in1},
      {"layers.0.mlp.down_proj.weight", H, WIDTH, 0.0f, 1.0f / sqrtf((float)WIDTH)},
      {"norm.weight", 1, H, 1.0f, 0.2f},
      {"lm_head.weight", V, H, 0.0f, 2.0f * in1},
  };
  for (size_t i = 0; i < sizeof tensors / sizeof tensors[0] && st == M3_OK; i++)
    st = put(w, seed, tensors[i].name, tensors[i].rows, tensors[i].cols, tensors[i].center,
             tensors[i].scale);
  int64_t *d2t = st == M3_OK ? malloc((size_t)V * sizeof *d2t) : NULL;
  if (st == M3_OK && !d2t) st = m3_fail(M3_ERR_NOMEM, "tiny draft: d2t");
  if (st == M3_OK) {
    for (int64_t i = 0; i < V; i++) d2t[i] = i + 1; /* draft id i is target id 2i + 1 */
    st = m3_st_writer_add(w, "d2t", M3_DT_I64, 1, &V, d2t);
  }
  free(d2t);
  snprintf(path, sizeof path, "%s/model.safetensors", dir);
  if (st == M3_OK) st = m3_st_writer_write(w, path);
  m3_st_writer_free(w);
  return st;
}
