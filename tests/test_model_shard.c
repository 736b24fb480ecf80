/* test_model_shard: tensor x expert parallel loading (model/shard.c) and the all-reduce hook on
 * the CPU. A layout is tp x ep ranks; world rank r is (tp_rank r % tp, ep_rank r / tp).
 *   slices       every sharded tensor of a rank equals, decoded to float32 bit for bit, its
 *                rows / columns of the whole model's tensor (ranges computed here from the
 *                whole config: heads and the dense MLP by tp_rank, the routed experts
 *                [ep_rank E/ep, +E/ep) each by tp_rank, the shared expert by world rank); the
 *                other EP groups' experts absent; replicated tensors unchanged; the rank's config
 *                narrowed, num_experts still the router's E;
 *   forwards     the world's ranks (one CPU backend and one thread each; the hook sums the buffers
 *                of the call's group, TP: the tp ranks of the caller's EP group, WORLD: every
 *                rank, on the host between two barriers, and counts the calls of each group, all
 *                ranks naming the same group) run a prompt at once and greedy decode steps:
 *                logits within 1e-5 relative L2 of the whole model per position, identical on
 *                every rank, and the same greedy continuation; TP per layer (attention, dense
 *                MLP) and WORLD per MoE layer. tp 2 on the committed text fixtures whose sizes
 *                divide by 2 and on random models written here (BF16 and MXFP8, widths of whole
 *                32-column blocks per rank; and BF16 without shared experts, whose MoE sums start
 *                from zeros); tp 4 on a fixture with 2 KV heads covers the replicated KV heads;
 *                ep 2 (tp 1) and tp 2 x ep 2 on the fixtures with MoE layers and on the random
 *                models (a wrong group, a rank running another group's experts or a shared expert
 *                counted per EP group would move the logits by far more than 1e-5);
 *   refusals     a size tp, ep or the world does not divide names the config key; ep on a model
 *                without MoE layers; an MXFP8 column split inside a 32-column scale block names
 *                the tensor; a rank outside the layout. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "check.h"
#include "lockstep.h"
#include "model/model.h"
#include "io/tiny.h"
#include "io/weights.h"

enum { MAX_RANKS = LOCKSTEP_MAX_RANKS, PROMPT = 11, DECODE = 4, MAX_POS = PROMPT + DECODE };

static const char *fixture(const char *name) {
  static char path[4096];
  snprintf(path, sizeof path, "%s/tests/fixtures/text/%s", M3_SOURCE_DIR, name);
  return path;
}

/* A tp x ep layout. */
typedef struct {
  int tp, ep;
} layout;

static m3_status load_with(const char *dir, m3_model_load_options opts, m3_backend **be,
                           m3_model **m) {
  *m = NULL;
  m3_status st = m3_backend_cpu_create(1, be);
  if (st != M3_OK) return st;
  st = m3_model_load_with(dir, *be, &opts, m);
  if (st != M3_OK) {
    (*be)->ops->destroy(*be);
    *be = NULL;
  }
  return st;
}

/* World rank `rank` of lay. */
static m3_status load(const char *dir, layout lay, int rank, m3_backend **be, m3_model **m) {
  m3_model_load_options opts = {.tp_size = lay.tp, .tp_rank = rank % lay.tp, .ep_size = lay.ep,
                                .ep_rank = rank / lay.tp};
  return load_with(dir, opts, be, m);
}

static void unload(m3_backend *be, m3_model *m) {
  m3_model_free(m);
  if (be) be->ops->destroy(be);
}

/* ---- slices ---- */

/* part == rows [r0, +part.rows) x cols [c0, +part.cols) of whole, decoded, bit for bit. */
static int same_slice(const m3_tensor *whole, const m3_tensor *part, int64_t r0, int64_t rows,
                      int64_t c0, int64_t cols) {
  if (!m3_tensor_present(whole)) return !m3_tensor_present(part);
  if (part->rows != rows || part->cols != cols) {
    fprintf(stderr, "%s: %lld x %lld, expected %lld x %lld\n", whole->name,
            (long long)part->rows, (long long)part->cols, (long long)rows, (long long)cols);
    return 0;
  }
  float *a = malloc((size_t)whole->cols * sizeof *a), *b = malloc((size_t)cols * sizeof *b);
  int ok = a && b;
  for (int64_t r = 0; ok && r < rows; r++) {
    m3_tensor_row_f32(whole, r0 + r, a);
    m3_tensor_row_f32(part, r, b);
    ok = memcmp(a + c0, b, (size_t)cols * sizeof *b) == 0;
    if (!ok) fprintf(stderr, "%s: row %lld differs\n", whole->name, (long long)(r0 + r));
  }
  free(a);
  free(b);
  return ok;
}

static int same_rows(const m3_tensor *whole, const m3_tensor *part, int64_t r0, int64_t n) {
  return same_slice(whole, part, r0, n, 0, whole->cols);
}

static int same_cols(const m3_tensor *whole, const m3_tensor *part, int64_t c0, int64_t n) {
  return same_slice(whole, part, 0, whole->rows, c0, n);
}

static int same_tensor(const m3_tensor *whole, const m3_tensor *part) {
  return same_slice(whole, part, 0, whole->rows, 0, whole->cols);
}

static void check_rank_slices(const m3_model *whole, const m3_model *part, layout lay, int rank) {
  const m3_config *c = m3_model_config(whole), *pc = m3_model_config(part);
  const m3_weights *w = m3_model_weights(whole), *pw = m3_model_weights(part);
  const int tp = lay.tp, world = lay.tp * lay.ep, tr = rank % tp, er = rank / tp;
  const int hd = c->head_dim, ihd = c->index_head_dim, nq = c->num_heads / tp;
  const int group = c->num_heads / c->num_kv_heads; /* query heads per KV head */
  const int nkv = c->num_kv_heads >= tp ? c->num_kv_heads / tp : 1;
  const int kv0 = tr * nq / group; /* the KV head of the rank's first query head */
  const int dn = c->dense_intermediate_size / tp, en = c->intermediate_size / tp;
  const int sn = c->shared_intermediate_size / world;
  const int held = c->num_experts / lay.ep, e0 = er * held;
  CHECK_EQ_INT(pc->num_heads, nq);
  CHECK_EQ_INT(pc->num_kv_heads, nkv);
  CHECK_EQ_INT(pc->hidden_size, c->hidden_size);
  CHECK_EQ_INT(pc->head_dim, hd);
  CHECK_EQ_INT(pc->intermediate_size, en);
  CHECK_EQ_INT(pc->dense_intermediate_size, dn);
  CHECK_EQ_INT(pc->shared_intermediate_size, sn);
  CHECK_EQ_INT(pc->num_experts, c->num_experts);
  CHECK(same_tensor(&w->embed, &pw->embed));
  /* lm_head: the world rank's slice of the vocabulary (tied or not) where the world divides it
   * (the fixtures' 320), else whole (the 571 of make_model's models) */
  const int split = c->vocab_size % world == 0;
  const int64_t vs = split ? c->vocab_size / world : c->vocab_size;
  CHECK_EQ_INT(m3_model_head_slices(part), split ? world : 1);
  CHECK(same_rows(&w->lm_head, &pw->lm_head, split ? (int64_t)rank * vs : 0, vs));
  CHECK(same_tensor(&w->final_norm, &pw->final_norm));
  for (int l = 0; l < c->num_layers; l++) {
    const m3_layer_weights *L = &w->layers[l], *P = &pw->layers[l];
    CHECK(same_rows(&L->q_proj, &P->q_proj, (int64_t)tr * nq * hd, (int64_t)nq * hd));
    CHECK(same_cols(&L->o_proj, &P->o_proj, (int64_t)tr * nq * hd, (int64_t)nq * hd));
    CHECK(same_rows(&L->k_proj, &P->k_proj, (int64_t)kv0 * hd, (int64_t)nkv * hd));
    CHECK(same_rows(&L->v_proj, &P->v_proj, (int64_t)kv0 * hd, (int64_t)nkv * hd));
    if (m3_tensor_present(&L->index_q_proj))
      CHECK(same_rows(&L->index_q_proj, &P->index_q_proj, (int64_t)kv0 * ihd, (int64_t)nkv * ihd));
    const m3_tensor *replicated[][2] = {
        {&L->input_norm, &P->input_norm}, {&L->post_attn_norm, &P->post_attn_norm},
        {&L->q_norm, &P->q_norm},         {&L->k_norm, &P->k_norm},
        {&L->index_k_proj, &P->index_k_proj}, {&L->router, &P->router},
        {&L->router_bias, &P->router_bias}};
    for (size_t i = 0; i < sizeof replicated / sizeof replicated[0]; i++)
      CHECK(same_tensor(replicated[i][0], replicated[i][1]));
    if (m3_tensor_present(&L->mlp_gate)) {
      CHECK(same_rows(&L->mlp_gate, &P->mlp_gate, (int64_t)tr * dn, dn));
      CHECK(same_rows(&L->mlp_up, &P->mlp_up, (int64_t)tr * dn, dn));
      CHECK(same_cols(&L->mlp_down, &P->mlp_down, (int64_t)tr * dn, dn));
    }
    if (m3_tensor_present(&L->shared_gate)) {
      CHECK(same_rows(&L->shared_gate, &P->shared_gate, (int64_t)rank * sn, sn));
      CHECK(same_rows(&L->shared_up, &P->shared_up, (int64_t)rank * sn, sn));
      CHECK(same_cols(&L->shared_down, &P->shared_down, (int64_t)rank * sn, sn));
    }
    for (int e = 0; L->expert_gate && e < c->num_experts; e++) {
      if (e < e0 || e >= e0 + held) { /* another EP group's: not bound here */
        CHECK(!m3_tensor_present(&P->expert_gate[e]) && !m3_tensor_present(&P->expert_up[e]) &&
              !m3_tensor_present(&P->expert_down[e]));
        continue;
      }
      CHECK(same_rows(&L->expert_gate[e], &P->expert_gate[e], (int64_t)tr * en, en));
      CHECK(same_rows(&L->expert_up[e], &P->expert_up[e], (int64_t)tr * en, en));
      CHECK(same_cols(&L->expert_down[e], &P->expert_down[e], (int64_t)tr * en, en));
    }
  }
  CHECK_EQ_INT(pw->num_mtp, 0);
}

/* ---- forwards ---- */

static int argmax(const float *row, int n) {
  int best = 0;
  for (int i = 1; i < n; i++)
    if (row[i] > row[best]) best = i;
  return best;
}

/* The prompt at once, then DECODE greedy single-token steps: logits [MAX_POS, V] (the prompt's
 * rows, then each step's), tokens [DECODE] the greedy continuation. */
typedef struct {
  m3_model *m;
  float *logits;
  int32_t tokens[DECODE];
  m3_status st;
} run;

static void *run_sequence(void *arg) {
  run *r = arg;
  const int V = m3_model_config(r->m)->vocab_size;
  lockstep_cache kc = {0};
  int32_t ids[PROMPT], pos[PROMPT];
  for (int t = 0; t < PROMPT; t++) {
    ids[t] = (int32_t)((t * 37 + 11) % V);
    pos[t] = t;
  }
  r->st = lockstep_cache_make(r->m, MAX_POS, &kc);
  if (r->st == M3_OK) r->st = m3_model_forward(r->m, kc.views, ids, pos, PROMPT, r->logits, NULL);
  int32_t next = r->st == M3_OK ? argmax(r->logits + (size_t)(PROMPT - 1) * V, V) : 0;
  for (int i = 0; i < DECODE && r->st == M3_OK; i++) {
    const int32_t p = PROMPT + i;
    r->tokens[i] = next;
    float *row = r->logits + (size_t)p * V;
    r->st = m3_model_forward(r->m, kc.views, &next, &p, 1, row, NULL);
    next = argmax(row, V);
  }
  lockstep_cache_free(r->m, &kc);
  return NULL;
}

static double rel_l2(const float *got, const float *want, int n) {
  double num = 0, den = 0;
  for (int i = 0; i < n; i++) {
    num += ((double)got[i] - want[i]) * ((double)got[i] - want[i]);
    den += (double)want[i] * want[i];
  }
  return sqrt(num / (den > 0 ? den : 1));
}

static void check_layout(const char *dir, const char *name, layout lay) {
  const int world = lay.tp * lay.ep;
  m3_backend *be = NULL, *bes[MAX_RANKS] = {0};
  m3_model *whole = NULL, *parts[MAX_RANKS] = {0};
  CHECK_OK(load(dir, (layout){1, 1}, 0, &be, &whole));
  for (int r = 0; r < world; r++) CHECK_OK(load(dir, lay, r, &bes[r], &parts[r]));
  if (!whole || !parts[world - 1]) goto done;
  for (int r = 0; r < world; r++) check_rank_slices(whole, parts[r], lay, r);

  const m3_config *c = m3_model_config(whole);
  const int V = c->vocab_size;
  int moe_layers = 0, dense_layers = 0;
  for (int l = 0; l < c->num_layers; l++) {
    moe_layers += c->layer_mlp[l] == M3_MLP_MOE;
    dense_layers += c->layer_mlp[l] == M3_MLP_DENSE;
  }
  const size_t logits_n = (size_t)MAX_POS * V;
  run ref = {.m = whole, .logits = malloc(logits_n * sizeof(float))};
  run runs[MAX_RANKS];
  lockstep_group g = {.tp = lay.tp, .world = world};
  lockstep_rank users[MAX_RANKS];
  pthread_t threads[MAX_RANKS];
  pthread_barrier_init(&g.barrier, NULL, (unsigned)world);
  run_sequence(&ref);
  CHECK_OK(ref.st);
  for (int r = 0; r < world; r++) {
    runs[r] = (run){.m = parts[r], .logits = malloc(logits_n * sizeof(float))};
    users[r] = (lockstep_rank){&g, r};
    CHECK_OK(m3_model_set_all_reduce(parts[r], lockstep_all_reduce, &users[r], 0));
  }
  for (int r = 0; r < world; r++) pthread_create(&threads[r], NULL, run_sequence, &runs[r]);
  for (int r = 0; r < world; r++) pthread_join(threads[r], NULL);
  /* Per layer in each of the 1 + DECODE forwards: attention and a dense MLP over the TP group,
   * an MoE layer over the world; then the split head's gather over the world. */
  CHECK_EQ_INT(g.calls[M3_REDUCE_TP], (c->num_layers + dense_layers) * (1 + DECODE));
  CHECK_EQ_INT(g.calls[M3_REDUCE_WORLD], (moe_layers + (V % world == 0)) * (1 + DECODE));
  CHECK_EQ_INT(g.mismatched, 0);
  double worst = 0;
  for (int r = 0; r < world; r++) {
    CHECK_OK(runs[r].st);
    CHECK(memcmp(runs[r].logits, runs[0].logits, logits_n * sizeof(float)) == 0);
    CHECK(memcmp(runs[r].tokens, ref.tokens, sizeof ref.tokens) == 0);
  }
  for (int p = 0; p < MAX_POS && ref.logits && runs[0].logits; p++) {
    const float *want = ref.logits + (size_t)p * V, *got = runs[0].logits + (size_t)p * V;
    double e = rel_l2(got, want, V);
    if (e > worst) worst = e;
    CHECK(e <= 1e-5);
    CHECK_EQ_INT(argmax(got, V), argmax(want, V));
  }
  printf("%-28s tp %d ep %d: %d positions, worst relative L2 %.2e, greedy %d %d %d %d\n", name,
         lay.tp, lay.ep, MAX_POS, worst, ref.tokens[0], ref.tokens[1], ref.tokens[2],
         ref.tokens[3]);
  pthread_barrier_destroy(&g.barrier);
  free(ref.logits);
  for (int r = 0; r < world; r++) free(runs[r].logits);
done:
  unload(be, whole);
  for (int r = 0; r < world; r++) unload(bes[r], parts[r]);
}

static void check_refusals(void) {
  m3_backend *be = NULL;
  m3_model *m = NULL;
  /* 4 query heads over 3 ranks. */
  CHECK_FAILS_WITH(load(fixture("mixed_bf16"), (layout){3, 1}, 0, &be, &m), M3_ERR_CONFIG,
                   "num_attention_heads");
  /* 16 query heads over 3 ranks. */
  CHECK_FAILS_WITH(load(fixture("gqa8_local2_tied_f32"), (layout){3, 1}, 2, &be, &m), M3_ERR_CONFIG,
                   "num_attention_heads");
  /* The routed experts' down_proj [64, 32] split at 16 columns: inside a 32-column MXFP8 block. */
  CHECK_FAILS_WITH(load(fixture("mxfp8"), (layout){2, 1}, 1, &be, &m), M3_ERR_SHAPE,
                   "32-column scale blocks");
  /* The shared expert [32 wide] over ep 2: its down_proj split at 16 columns. */
  CHECK_FAILS_WITH(load(fixture("mxfp8"), (layout){1, 2}, 1, &be, &m), M3_ERR_SHAPE,
                   "32-column scale blocks");
  /* 6 experts over 4 EP groups. */
  CHECK_FAILS_WITH(load(fixture("mixed_bf16"), (layout){1, 4}, 3, &be, &m), M3_ERR_CONFIG,
                   "num_local_experts 6");
  /* 6 experts over 3 EP groups divide, the 32-wide shared expert over 3 ranks does not. */
  CHECK_FAILS_WITH(load(fixture("mixed_bf16"), (layout){1, 3}, 0, &be, &m), M3_ERR_CONFIG,
                   "shared_intermediate_size 32");
  /* Only dense MLPs: no experts to split. */
  CHECK_FAILS_WITH(load(fixture("full_dense_gqa2_f32"), (layout){1, 2}, 0, &be, &m),
                   M3_ERR_CONFIG, "mlp_layer_types");
  m3_model_load_options tp_rank = {.tp_size = 2, .tp_rank = 2}, ep_rank = {.tp_size = 2,
                                   .ep_size = 2, .ep_rank = -1};
  CHECK_FAILS_WITH(load_with(fixture("mixed_bf16"), tp_rank, &be, &m), M3_ERR_ARG,
                   "tensor-parallel rank 2 of 2");
  CHECK_FAILS_WITH(load_with(fixture("mixed_bf16"), ep_rank, &be, &m), M3_ERR_ARG,
                   "expert-parallel rank -1 of 2");
}

static char *read_all(const char *path, long *len) {
  FILE *f = fopen(path, "rb");
  char *buf = NULL;
  if (f && fseek(f, 0, SEEK_END) == 0 && (*len = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0 &&
      (buf = malloc((size_t)*len + 1)) && fread(buf, 1, (size_t)*len, f) == (size_t)*len) {
    buf[*len] = 0;
  } else {
    free(buf);
    buf = NULL;
  }
  if (f) fclose(f);
  return buf;
}

/* Makes the model in dir one without shared experts: n_shared_experts 0 in config.json, and the
 * shared experts' entries dropped from the safetensors header (their bytes stay, unreferenced).
 * Its MoE layers then take the routed experts' sum from zeros under tensor parallelism. */
static int drop_shared_experts(const char *dir) {
  char path[4096];
  long len = 0;
  snprintf(path, sizeof path, "%s/config.json", dir);
  char *text = read_all(path, &len);
  cJSON *cfg = text ? cJSON_Parse(text) : NULL;
  cJSON *tc = cJSON_GetObjectItem(cfg, "text_config");
  if (!tc) tc = cfg;
  int ok = tc && cJSON_ReplaceItemInObject(tc, "n_shared_experts", cJSON_CreateNumber(0));
  char *out = ok ? cJSON_PrintUnformatted(cfg) : NULL;
  FILE *f = out ? fopen(path, "wb") : NULL;
  ok = f && fputs(out, f) >= 0;
  if (f) ok &= fclose(f) == 0;
  free(out);
  free(text);
  cJSON_Delete(cfg);

  snprintf(path, sizeof path, "%s/model.safetensors", dir);
  char *st = ok ? read_all(path, &len) : NULL;
  uint64_t hlen = 0;
  if (st && len >= 8) memcpy(&hlen, st, 8); /* little-endian, as on every machine m3 runs on */
  ok = st && hlen <= (uint64_t)len - 8;
  char *json = ok ? strndup(st + 8, (size_t)hlen) : NULL;
  cJSON *header = json ? cJSON_Parse(json) : NULL;
  ok = header != NULL;
  for (cJSON *e = header ? header->child : NULL, *next; e; e = next) {
    next = e->next;
    if (strstr(e->string, "shared_experts")) cJSON_Delete(cJSON_DetachItemViaPointer(header, e));
  }
  char *h = ok ? cJSON_PrintUnformatted(header) : NULL;
  f = h ? fopen(path, "wb") : NULL;
  if (f) {
    uint64_t n = (strlen(h) + 7) / 8 * 8; /* the data starts 8-byte aligned */
    ok = fwrite(&n, 8, 1, f) == 1 && fputs(h, f) >= 0;
    for (size_t i = strlen(h); ok && i < n; i++) ok = fputc(' ', f) != EOF;
    ok = ok && fwrite(st + 8 + hlen, 1, (size_t)(len - 8 - (long)hlen), f) == (size_t)(len - 8 - (long)hlen);
    ok &= fclose(f) == 0;
  } else {
    ok = 0;
  }
  free(h);
  cJSON_Delete(header);
  free(json);
  free(st);
  return ok;
}

/* A random model whose widths split into whole 32-column blocks (MXFP8) over tp 2 (experts, dense
 * MLP) and the 4 ranks of tp 2 x ep 2 (the 128-wide shared expert). */
static void check_tiny(m3_tiny_dtype dtype, int shared, const char *name) {
  char dir[] = "/tmp/m3-shard-XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  m3_tiny_options o = m3_tiny_default_options();
  o.dtype = dtype;
  o.layers = "FD,SM,FM";
  o.hidden = 64;
  o.heads = 4;
  o.kv_heads = 2;
  o.head_dim = 16;
  o.expert_width = o.dense_width = 64;
  o.shared_width = 128;
  o.no_vision = o.no_mtp = 1;
  o.threads = 1;
  CHECK_OK(m3_tiny_write(dir, &o));
  if (!shared) CHECK(drop_shared_experts(dir));
  static const layout layouts[] = {{2, 1}, {1, 2}, {2, 2}};
  for (size_t i = 0; i < sizeof layouts / sizeof layouts[0]; i++)
    check_layout(dir, name, layouts[i]);
  static const char *const files[] = {"config.json", "model.safetensors", "tokenizer.json"};
  for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
    char path[64];
    snprintf(path, sizeof path, "%s/%s", dir, files[i]);
    unlink(path);
  }
  rmdir(dir);
}

int main(void) {
  static const char *const tp2[] = {"full_dense_gqa2_f32", "gqa8_local2_tied_f32",
                                    "long_sparse_gqa4_f32", "mixed_bf16",
                                    "mixed_gqa4_rot_half_f32", "vl_inspect_f32"};
  for (size_t i = 0; i < sizeof tp2 / sizeof tp2[0]; i++)
    check_layout(fixture(tp2[i]), tp2[i], (layout){2, 1});
  /* 16 query heads, 2 KV heads over 4 ranks: each KV head on two ranks. */
  check_layout(fixture("gqa8_local2_tied_f32"), "gqa8_local2_tied_f32", (layout){4, 1});
  /* The fixtures with MoE layers (4 or 6 experts) over 2 EP groups of 1 and of 2 ranks. */
  for (size_t i = 1; i < sizeof tp2 / sizeof tp2[0]; i++) {
    check_layout(fixture(tp2[i]), tp2[i], (layout){1, 2});
    check_layout(fixture(tp2[i]), tp2[i], (layout){2, 2});
  }
  check_tiny(M3_TINY_MXFP8, 1, "tiny FD,SM,FM mxfp8");
  check_tiny(M3_TINY_BF16, 1, "tiny FD,SM,FM bf16");
  check_tiny(M3_TINY_BF16, 0, "tiny bf16, no shared expert");
  check_refusals();
  return check_summary();
}
