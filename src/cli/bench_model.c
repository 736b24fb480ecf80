/* m3 bench model: decode and prefill speed of a whole model, against the copy bandwidth of the
 * same machine measured in the same run with the same threads (or on the same GPU).
 *
 * Decode is memory-bound: a token reads each weight it uses once (attention, indexer, norms,
 * router, its top-k experts, the shared expert, dense MLPs, lm_head, one embedding row), so the
 * figure to watch is those bytes per second as a fraction of the copy bandwidth. That holds only
 * for a model larger than the last-level cache; without --model, one is generated (tiny.h with
 * benchmark sizes) into a temporary folder and removed at the end. Prefill is compute-bound:
 * GFLOP/s counts 2 x the matmul parameters a token uses plus the attention's dot products.
 *
 * Phases, one KV cache:
 *   decode  at a short context: --batch sequences, each after its own 16-token prompt (untimed),
 *           --decode steps, each one forward of one token per sequence
 *   prefill --prefill tokens from an empty cache, then on to --ctx, in steps of up to 256 tokens
 *   decode  --decode steps at --ctx: that sequence and --batch - 1 forks of it
 * Decode feeds back the argmax of each token's logits, as greedy generation does, through the
 * engine's greedy forward (m3_model_forward_batch_argmax): on a GPU it picks on the device and
 * moves only the ids. (Moving every row to the host and scanning it there, a cost the engine does
 * not pay, made the MXFP8 benchmark-4 step at a vocabulary of 200064 1.676-1.684 ms on an H200
 * machine against 1.285-1.291.)
 *
 * The decode floor of a step is the weight bytes it must read over the copy bandwidth. At batch
 * B the tokens of an MoE layer choose E * (1 - (1 - k/E)^B) distinct experts on average when
 * routing is uniform (each expert is missed by all B tokens with probability (1 - k/E)^B), so
 * the floor counts that many experts' bytes: k at B = 1, nearly all E at large B. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/cpu/cpu.h"
#include "cli/bench.h"
#include "cli/commands.h"
#include "cli/model_args.h"
#include "engine/runner.h"
#include "io/tiny.h"
#include "io/weights.h"
#include "model/step_graph.h"

static const char usage[] =
    "usage: m3 bench model [--model DIR] [--device cpu|cuda|cuda:N] [--threads N]\n"
    "                      [--dtype bf16|mxfp8|f32] [--ctx N] [--prefill N] [--decode N]\n"
    "                      [--batch B] [--copy-mib N] [--profile] " M3_CLI_QUANTIZE_USAGE "\n"
    "                      " M3_CLI_KV_DTYPE_USAGE "\n"
    "  decode tokens/s and GB/s of weights read against the copy bandwidth (same run, same\n"
    "  threads; on a GPU a device-to-device copy), ms per step against the step's floor (its\n"
    "  weight bytes / copy bandwidth), prefill tokens/s and GFLOP/s. --batch B decodes B\n"
    "  sequences together, one token each per step (default 1); the floor then counts the\n"
    "  E*(1-(1-k/E)^B) distinct experts per MoE layer that uniform routing touches on average.\n"
    "  --device cuda (or cuda:N) runs on a GPU (default cpu). Without --model it generates, into\n"
    "  a temporary folder, a model larger than the last-level cache in --dtype (default bf16):\n"
    "    m3 tiny DIR --layers " "FD,SM,SM,SM,SM,SM,SM,SM" " --hidden 1024 --heads 8 --kv-heads 2\n"
    "      --head-dim 128 --rotary-dim 64 --experts 64 --experts-per-token 4 --expert-width 512\n"
    "      --shared-width 512 --dense-width 2048 --index-dim 128 --block-size 128 --topk-blocks 16\n"
    "  (the same command writes it once for --model). Defaults: threads one per core, ctx 4096,\n"
    "  prefill 512, decode 32. The copy runs over 2 buffers of --copy-mib MiB (default 512;\n"
    "  keep them well above the last-level cache). M3_CPU_ISA picks the kernel set (avx512,\n"
    "  avx2, portable). --profile prints after each phase where its time went, op by op (each op\n"
    "  waited for, so the phase itself runs slower than without it). --kv-dtype fp8 keeps the KV\n"
    "  cache as E4M3 with a scale per row (default f32); KV GB/s counts that dtype's bytes.\n";

/* The generated model: attention shaped like the full model's (head dim 128, index dim 128,
 * 128-token blocks, top 16), 64 experts so the whole model exceeds even a large last-level
 * cache in MXFP8, top 4 of them per token. */
static m3_tiny_options bench_checkpoint(m3_tiny_dtype dtype) {
  m3_tiny_options o = m3_tiny_default_options();
  o.dtype = dtype;
  o.layers = "FD,SM,SM,SM,SM,SM,SM,SM";
  o.hidden = 1024, o.heads = 8, o.kv_heads = 2, o.head_dim = 128, o.rotary_dim = 64;
  o.experts = 64, o.experts_per_token = 4, o.expert_width = 512, o.shared_width = 512;
  o.dense_width = 2048, o.index_dim = 128, o.block_size = 128, o.topk_blocks = 16;
  return o;
}

typedef struct {
  const char *model, *device, *quantize;
  long threads, ctx, prefill, decode, batch, copy_mib;
  m3_tiny_dtype dtype;
  m3_kv_dtype kv_dtype;
  int profile;
} bench_args;

static m3_status parse_args(int argc, char **argv, bench_args *a, int *help) {
  *a = (bench_args){.device = "cpu", .ctx = 4096, .prefill = 512, .decode = 32, .batch = 1,
                    .copy_mib = 512, .dtype = M3_TINY_BF16};
  *help = 0;
  for (int i = 1; i < argc; i++) {
    const char *flag = argv[i];
    if (strcmp(flag, "--help") == 0 || strcmp(flag, "-h") == 0) {
      *help = 1;
      return M3_OK;
    }
    if (strcmp(flag, "--profile") == 0) {
      a->profile = 1;
      continue;
    }
    if (i + 1 >= argc) return m3_fail(M3_ERR_ARG, "%s: missing value (see --help)", flag);
    const char *value = argv[++i];
    m3_status st = M3_OK;
    if (strcmp(flag, "--model") == 0) a->model = value;
    else if (strcmp(flag, "--device") == 0) a->device = value;
    else if (strcmp(flag, "--batch") == 0) st = m3_cli_parse_long(flag, value, 1, M3_MODEL_STEP_TOKENS, &a->batch);
    else if (strcmp(flag, "--threads") == 0) st = m3_cli_parse_long(flag, value, 0, 4096, &a->threads);
    else if (strcmp(flag, "--ctx") == 0) st = m3_cli_parse_long(flag, value, 1, 1L << 20, &a->ctx);
    else if (strcmp(flag, "--prefill") == 0) st = m3_cli_parse_long(flag, value, 1, 1L << 20, &a->prefill);
    else if (strcmp(flag, "--decode") == 0) st = m3_cli_parse_long(flag, value, 1, 1L << 20, &a->decode);
    else if (strcmp(flag, "--copy-mib") == 0) st = m3_cli_parse_long(flag, value, 1, 1L << 16, &a->copy_mib);
    else if (strcmp(flag, "--quantize") == 0) st = m3_cli_parse_quantize(value, &a->quantize);
    else if (strcmp(flag, "--kv-dtype") == 0) st = m3_cli_parse_kv_dtype(value, &a->kv_dtype);
    else if (strcmp(flag, "--dtype") == 0) {
      if (strcmp(value, "bf16") == 0) a->dtype = M3_TINY_BF16;
      else if (strcmp(value, "mxfp8") == 0) a->dtype = M3_TINY_MXFP8;
      else if (strcmp(value, "f32") == 0) a->dtype = M3_TINY_F32;
      else st = m3_fail(M3_ERR_ARG, "--dtype '%s': expected bf16, mxfp8 or f32", value);
    } else return m3_fail(M3_ERR_ARG, "unknown option '%s' (see --help)", flag);
    if (st != M3_OK) return st;
  }
  return M3_OK;
}

/* ---- the generated checkpoint ---- */

static const char *const checkpoint_files[] = {"config.json", "model.safetensors", "tokenizer.json"};

static void remove_checkpoint(const char *dir) {
  char path[4096];
  for (size_t i = 0; i < sizeof checkpoint_files / sizeof checkpoint_files[0]; i++)
    if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, checkpoint_files[i]) < sizeof path)
      unlink(path);
  rmdir(dir);
}

/* Writes the benchmark model into a new folder under $TMPDIR (else /tmp), flushed to disk so
 * that writeback does not run during the measurement. */
static m3_status generate_checkpoint(m3_tiny_dtype dtype, char *dir, size_t cap) {
  const char *tmp = getenv("TMPDIR");
  if ((size_t)snprintf(dir, cap, "%s/m3-bench-XXXXXX", tmp && *tmp ? tmp : "/tmp") >= cap)
    return m3_fail(M3_ERR_ARG, "TMPDIR '%s': path too long", tmp);
  if (!mkdtemp(dir)) return m3_fail(M3_ERR_IO, "%s: cannot create folder: %s", dir, strerror(errno));
  m3_tiny_options o = bench_checkpoint(dtype);
  m3_status st = m3_tiny_write(dir, &o);
  char path[4096];
  snprintf(path, sizeof path, "%s/model.safetensors", dir);
  int fd = st == M3_OK ? open(path, O_RDONLY) : -1;
  if (fd >= 0) {
    fsync(fd);
    close(fd);
  }
  if (st != M3_OK) remove_checkpoint(dir);
  return st;
}

/* ---- what a token reads and computes ---- */

static double tensor_bytes(const m3_tensor *t) {
  if (!m3_tensor_present(t)) return 0;
  double scale_size = t->quant == M3_WQ_MXFP8 ? 1 : 4;
  return (double)t->rows * (double)t->cols * (double)m3_dtype_size(t->dtype) +
         (t->scale ? (double)t->scale_rows * (double)t->scale_cols * scale_size : 0);
}

static double tensor_params(const m3_tensor *t) {
  return m3_tensor_present(t) ? (double)t->rows * (double)t->cols : 0;
}

typedef struct {
  double model_bytes, model_params;   /* every text-model weight the forward may read (no MTP,
                                       * no vision) */
  double decode_bytes, decode_params; /* what one decode token reads: its k experts, not all */
  double token_params;  /* matmul parameters one token multiplies with, without lm_head */
  double expert_bytes;  /* one routed expert's bytes, summed over the MoE layers */
  double embed_row_bytes;
} weight_counts;

static void count_weights(const m3_config *c, const m3_weights *w, weight_counts *n) {
  *n = (weight_counts){0};
  const int k = c->num_experts_per_tok;
  n->model_bytes = tensor_bytes(&w->embed) + tensor_bytes(&w->final_norm) +
                   (w->lm_head_tied ? 0 : tensor_bytes(&w->lm_head));
  n->model_params = tensor_params(&w->embed) + tensor_params(&w->final_norm) +
                    (w->lm_head_tied ? 0 : tensor_params(&w->lm_head));
  /* One embedding row, the final norm and the head. */
  n->embed_row_bytes = tensor_bytes(&w->embed) / (double)c->vocab_size;
  n->decode_bytes = n->embed_row_bytes + tensor_bytes(&w->final_norm) + tensor_bytes(&w->lm_head);
  n->decode_params = (double)c->hidden_size + tensor_params(&w->final_norm) + tensor_params(&w->lm_head);
  for (int l = 0; l < c->num_layers; l++) {
    const m3_layer_weights *L = &w->layers[l];
    const m3_tensor *always[] = {&L->input_norm,   &L->post_attn_norm, &L->q_proj,       &L->k_proj,
                                 &L->v_proj,       &L->o_proj,         &L->q_norm,       &L->k_norm,
                                 &L->index_q_proj, &L->index_k_proj,   &L->index_q_norm, &L->index_k_norm,
                                 &L->mlp_gate,     &L->mlp_up,         &L->mlp_down,     &L->router,
                                 &L->router_bias,  &L->shared_gate,    &L->shared_up,    &L->shared_down};
    for (size_t i = 0; i < sizeof always / sizeof always[0]; i++) {
      double b = tensor_bytes(always[i]), p = tensor_params(always[i]);
      n->model_bytes += b, n->model_params += p;
      n->decode_bytes += b, n->decode_params += p;
      if (always[i]->rows > 1) n->token_params += p; /* matrices, not norms and biases */
    }
    if (c->layer_mlp[l] != M3_MLP_MOE || !L->expert_gate) continue;
    for (int e = 0; e < c->num_experts; e++) {
      const m3_tensor *expert[] = {&L->expert_gate[e], &L->expert_up[e], &L->expert_down[e]};
      for (int i = 0; i < 3; i++) {
        double b = tensor_bytes(expert[i]), p = tensor_params(expert[i]);
        n->model_bytes += b, n->model_params += p;
        /* Experts of one layer share shape and dtype: expert 0 stands for the k chosen. */
        if (e == 0) {
          n->decode_bytes += k * b, n->decode_params += k * p;
          n->token_params += k * p;
          n->expert_bytes += b;
        }
      }
    }
  }
}

/* Routed experts of one MoE layer that a step of B tokens reads, expected under uniform routing. */
static double distinct_experts(const m3_config *c, int B) {
  const double E = c->num_experts, k = c->num_experts_per_tok;
  return E > 0 ? E * (1.0 - pow(1.0 - k / E, B)) : 0;
}

/* Weight bytes a decode step of B tokens reads: everything a single token reads, its k experts
 * replaced by the expected distinct ones, plus B - 1 more embedding rows. */
static double step_bytes(const m3_config *c, const weight_counts *w, int B) {
  return w->decode_bytes + (distinct_experts(c, B) - c->num_experts_per_tok) * w->expert_bytes +
         (B - 1) * w->embed_row_bytes;
}

/* Attention work of the token at position p (attending to p + 1 keys), summed over layers:
 * keys attended, to count the dot products and KV bytes. A sparse layer attends to its top-k
 * blocks once the context exceeds them (counted full, except the partly filled local block). */
static double attended_keys(const m3_config *c, int l, int64_t p) {
  const int64_t bs = c->index_block_size, all = p + 1;
  if (c->layer_attn[l] != M3_ATTN_SPARSE || all <= (int64_t)c->index_topk_blocks * bs) return (double)all;
  return (double)((c->index_topk_blocks - 1) * bs + p % bs + 1);
}

/* FLOPs of attention for positions [from, to): QK^T and PV (4 per head dim per key) plus the
 * sparse layers' index scores (2 per index dim per key and index head). */
static double attention_flops(const m3_config *c, int64_t from, int64_t to) {
  double f = 0;
  for (int64_t p = from; p < to; p++)
    for (int l = 0; l < c->num_layers; l++) {
      f += 4.0 * c->num_heads * c->head_dim * attended_keys(c, l, p);
      if (c->layer_attn[l] == M3_ATTN_SPARSE)
        f += 2.0 * c->index_num_heads * c->index_head_dim * (double)(p + 1);
    }
  return f;
}

/* KV-cache bytes the token at position p reads: K and V of the keys it attends to, and the index
 * keys of the whole context on sparse layers; a row of dim values is 4 * dim bytes in float32,
 * dim + 4 in fp8 (its bytes and scale). */
static double kv_bytes(const m3_config *c, m3_kv_dtype dt, int64_t p) {
  const double kv_row = dt == M3_KV_FP8 ? c->head_dim + 4.0 : 4.0 * c->head_dim;
  const double ik_row = dt == M3_KV_FP8 ? c->index_head_dim + 4.0 : 4.0 * c->index_head_dim;
  double b = 0;
  for (int l = 0; l < c->num_layers; l++) {
    b += 2.0 * c->num_kv_heads * kv_row * attended_keys(c, l, p);
    if (c->layer_attn[l] == M3_ATTN_SPARSE) b += ik_row * (double)(p + 1);
  }
  return b;
}

/* ---- the machine ---- */

/* The last-level cache in bytes and where the figure came from: sysfs, else the C library
 * (CPUID), else 0. */
static double llc_bytes(const char **source) {
  long best = 0;
  for (int i = 0; i < 8; i++) {
    char path[128], text[64];
    snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", i);
    FILE *f = fopen(path, "r");
    if (!f) continue;
    long kib = 0;
    char unit = 0;
    if (fgets(text, sizeof text, f) && sscanf(text, "%ld%c", &kib, &unit) >= 1) {
      long bytes = unit == 'M' ? kib << 20 : kib << 10;
      if (bytes > best) best = bytes;
    }
    fclose(f);
  }
  *source = "sysfs";
  if (best > 0) return (double)best;
#ifdef _SC_LEVEL3_CACHE_SIZE
  best = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (best <= 0) best = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
  *source = "CPUID via sysconf; no sysfs cache entries";
  return best > 0 ? (double)best : 0;
}

static void print_cpu_model(void) {
  FILE *f = fopen("/proc/cpuinfo", "r");
  char line[256];
  while (f && fgets(line, sizeof line, f)) {
    if (strncmp(line, "model name", 10) != 0) continue;
    const char *v = strchr(line, ':');
    printf("cpu: %s", v ? v + 2 : line);
    break;
  }
  if (f) fclose(f);
}

/* ---- the phases ---- */

static uint64_t id_state = 0x9e3779b97f4a7c15ull;
static int32_t random_id(int vocab) {
  id_state = id_state * 6364136223846793005ull + 1442695040888963407ull;
  return (int32_t)((id_state >> 33) % (uint64_t)vocab);
}

/* Feeds n random ids through the cache, `chunk` per forward, no logits; the seconds it took. */
static m3_status feed_random(m3_runner *r, m3_kv_seq *seq, int vocab, int n, double *seconds) {
  int32_t *ids = malloc((size_t)n * sizeof *ids);
  if (!ids) return m3_fail(M3_ERR_NOMEM, "bench: %d prompt ids", n);
  for (int i = 0; i < n; i++) ids[i] = random_id(vocab);
  double t0 = m3_bench_seconds();
  m3_status st = m3_runner_feed(r, seq, ids, n, 0, NULL, NULL);
  *seconds = m3_bench_seconds() - t0;
  free(ids);
  return st;
}

/* B sequences decoding together: n steps, each one forward of one token per sequence, the
 * token the argmax of that sequence's previous logits. logits [B, vocab]: where the forward may
 * keep them (m3_model_forward_batch_argmax); next [B] the picks. */
typedef struct {
  m3_model *model;
  m3_kv_cache *cache;
  m3_kv_seq *seqs; /* [B] */
  int B;
  m3_kv_view *views;  /* [B, num_layers] */
  m3_model_seq *segs; /* [B] */
  int32_t *ids, *pos, *next; /* [B] */
  float *logits;      /* [B, vocab] */
} decode_batch;

static m3_status decode(decode_batch *d, int n, double *seconds) {
  const m3_config *c = m3_model_config(d->model);
  const int V = c->vocab_size, L = c->num_layers;
  for (int b = 0; b < d->B; b++) d->ids[b] = random_id(V);
  double t0 = m3_bench_seconds();
  m3_status st = M3_OK;
  for (int i = 0; i < n && st == M3_OK; i++) {
    for (int b = 0; b < d->B && st == M3_OK; b++) {
      if ((st = m3_kv_seq_extend(d->cache, &d->seqs[b], 1)) != M3_OK) break;
      d->pos[b] = d->seqs[b].num_tokens - 1;
      m3_kv_seq_views(d->cache, &d->seqs[b], d->views + (size_t)b * L);
      d->segs[b] = (m3_model_seq){.kv = d->views + (size_t)b * L, .ids = d->ids + b,
                                  .pos = d->pos + b, .T = 1, .n_logits = 1};
    }
    if (st == M3_OK) st = m3_model_forward_batch_argmax(d->model, d->segs, d->B, d->logits, d->next, NULL);
    if (st == M3_OK) memcpy(d->ids, d->next, (size_t)d->B * sizeof *d->ids);
  }
  *seconds = m3_bench_seconds() - t0;
  return st;
}

typedef struct {
  const m3_config *cfg;
  weight_counts w;
  double copy_gbs;
  int batch;
  m3_kv_dtype kv_dtype;
  m3_backend *profile; /* the profiling wrapper (--profile), else NULL */
} report;

static void print_header(void) {
  printf("\n%-8s %-13s %7s %8s %10s %11s %8s %9s %8s %9s %8s\n", "phase", "positions", "tokens",
         "seconds", "tokens/s", "weight GB/s", "of copy", "KV GB/s", "GFLOP/s", "ms/step", "x floor");
}

/* n steps of rp->batch sequences at positions [from, from + n) each. */
static void print_decode(const report *rp, int64_t from, int n, double s) {
  const int B = rp->batch;
  double kv = 0;
  for (int64_t p = from; p < from + n; p++) kv += B * kv_bytes(rp->cfg, rp->kv_dtype, p);
  double bytes = step_bytes(rp->cfg, &rp->w, B), gbs = bytes * n / s / 1e9;
  double floor_ms = bytes / (rp->copy_gbs * 1e9) * 1e3, ms = s / n * 1e3;
  char range[32];
  snprintf(range, sizeof range, "%lld..%lld", (long long)from, (long long)(from + n));
  printf("%-8s %-13s %7d %8.3f %10.2f %11.2f %7.0f%% %9.2f %8s %9.3f %8.2f\n", "decode", range,
         n * B, s, n * B / s, gbs, 100.0 * gbs / rp->copy_gbs, kv / s / 1e9, "-", ms, ms / floor_ms);
}

/* How the decode steps since `before` ran: replayed as recorded CUDA graphs, or op by op. */
static void print_graphs(m3_model *model, const m3_step_graph_stats *before) {
  const m3_step_graph_stats now = m3_model_graph_stats(model);
  if (!now.enabled) {
    printf("  cuda graphs: off (backend without graphs, --profile or M3_CUDA_GRAPHS=0)\n");
    return;
  }
  printf("  cuda graphs: on; steps recorded %llu, replayed %llu, direct %llu, not graphable %llu\n",
         (unsigned long long)(now.recorded - before->recorded),
         (unsigned long long)(now.replayed - before->replayed),
         (unsigned long long)(now.direct - before->direct),
         (unsigned long long)(now.skipped - before->skipped));
}

static void print_prefill(const report *rp, int64_t from, int64_t to, double s) {
  double n = (double)(to - from);
  double flops = 2.0 * rp->w.token_params * n + attention_flops(rp->cfg, from, to);
  char range[32];
  snprintf(range, sizeof range, "%lld..%lld", (long long)from, (long long)to);
  printf("%-8s %-13s %7lld %8.3f %10.2f %11s %8s %9s %8.1f %9s %8s\n", "prefill", range,
         (long long)(to - from), s, n / s, "-", "-", "-", flops / s / 1e9, "-", "-");
}

/* --profile: the op table of the phase just printed, then a clean slate for the next. */
static void profile_phase(const report *rp, const char *phase) {
  if (rp->profile) m3_backend_profile_report(rp->profile, phase, stdout);
}
static void profile_clear(const report *rp) {
  if (rp->profile) m3_backend_profile_clear(rp->profile);
}

static void release_all(m3_kv_cache *cache, m3_kv_seq *seqs, int n) {
  for (int b = 0; b < n; b++) m3_kv_seq_release(cache, &seqs[b]);
}

enum { WARM_STEPS = 2 };

static m3_status run_phases(m3_model *model, const bench_args *a, const report *rp) {
  const m3_config *c = rp->cfg;
  const int V = c->vocab_size, B = (int)a->batch, short_prompt = 16;
  int64_t longest = a->ctx > a->prefill ? a->ctx : a->prefill;
  const int steps = (int)a->decode + WARM_STEPS;
  int64_t tokens = (longest > short_prompt ? longest : short_prompt) + steps;
  if (tokens > INT32_MAX / 2) return m3_fail(M3_ERR_ARG, "--ctx %ld + --decode %ld: too long", a->ctx, a->decode);
  /* The long sequence, B short ones, and per fork at --ctx the pages its decode adds plus the
   * copy of the shared last page. */
  const m3_kv_dtype dt = a->kv_dtype;
  size_t budget = m3_kv_bytes_for_tokens(c, dt, (int)tokens) +
                  (size_t)B * (m3_kv_bytes_for_tokens(c, dt, short_prompt + steps) +
                               m3_kv_bytes_for_tokens(c, dt, steps + c->index_block_size));
  m3_runner *r = NULL;
  m3_status st = m3_runner_create(model, dt, budget, &r);
  m3_kv_cache *cache = r ? m3_runner_cache(r) : NULL;
  decode_batch d = {.model = model, .cache = cache, .B = B,
                    .seqs = calloc((size_t)B, sizeof *d.seqs),
                    .views = calloc((size_t)B * (size_t)c->num_layers, sizeof *d.views),
                    .segs = calloc((size_t)B, sizeof *d.segs),
                    .ids = calloc((size_t)B, sizeof *d.ids), .pos = calloc((size_t)B, sizeof *d.pos),
                    .next = calloc((size_t)B, sizeof *d.next),
                    .logits = m3_model_backend(model)->ops->alloc_host(
                        m3_model_backend(model), (size_t)B * (size_t)V * sizeof *d.logits)};
  if (st == M3_OK && (!d.seqs || !d.views || !d.segs || !d.ids || !d.pos || !d.next || !d.logits))
    st = m3_fail(M3_ERR_NOMEM, "bench: logits of %d x %d", B, V);
  double s;
  print_header();
  /* Untimed first runs of each phase: a backend's first calls load kernels and choose GEMM
   * algorithms (the CUDA backend loads modules lazily and asks cuBLASLt once per shape), costs a
   * server pays once, not per step. */
  for (int b = 0; b < B && st == M3_OK; b++) st = feed_random(r, &d.seqs[b], V, short_prompt, &s);
  if (st == M3_OK) st = decode(&d, WARM_STEPS, &s);
  profile_clear(rp);
  m3_step_graph_stats graphs = m3_model_graph_stats(model);
  if (st == M3_OK && (st = decode(&d, (int)a->decode, &s)) == M3_OK) {
    print_decode(rp, short_prompt + WARM_STEPS, (int)a->decode, s);
    print_graphs(model, &graphs);
    profile_phase(rp, "the decode at the short prompt");
  }
  if (cache) release_all(cache, d.seqs, B);
  m3_kv_seq *seq = d.seqs; /* the long sequence, and the first of the batch at --ctx */
  if (st == M3_OK) st = feed_random(r, seq, V, (int)a->prefill, &s);
  if (cache) m3_kv_seq_release(cache, seq);
  profile_clear(rp);
  if (st == M3_OK && (st = feed_random(r, seq, V, (int)a->prefill, &s)) == M3_OK) {
    print_prefill(rp, 0, a->prefill, s);
    profile_phase(rp, "the prefill");
  }
  if (st == M3_OK && a->ctx > a->prefill && (st = feed_random(r, seq, V, (int)(a->ctx - a->prefill), &s)) == M3_OK) {
    print_prefill(rp, a->prefill, a->ctx, s);
    profile_phase(rp, "the prefill up to --ctx");
  }
  for (int b = 1; b < B && st == M3_OK; b++) st = m3_kv_seq_fork(cache, seq, &d.seqs[b]);
  if (st == M3_OK) st = decode(&d, WARM_STEPS, &s);
  int64_t at = seq->num_tokens;
  profile_clear(rp);
  graphs = m3_model_graph_stats(model);
  if (st == M3_OK && (st = decode(&d, (int)a->decode, &s)) == M3_OK) {
    print_decode(rp, at, (int)a->decode, s);
    print_graphs(model, &graphs);
    profile_phase(rp, "the decode at --ctx");
  }
  if (cache) release_all(cache, d.seqs, B);
  m3_runner_free(r);
  free(d.seqs);
  free(d.views);
  free(d.segs);
  free(d.ids);
  free(d.pos);
  free(d.next);
  if (d.logits) m3_model_backend(model)->ops->free_host(m3_model_backend(model), d.logits);
  return st;
}

static void print_model(const char *dir, int generated, int on_cpu, const m3_config *c,
                        const weight_counts *w) {
  int moe = 0, sparse = 0;
  for (int l = 0; l < c->num_layers; l++) {
    moe += c->layer_mlp[l] == M3_MLP_MOE;
    sparse += c->layer_attn[l] == M3_ATTN_SPARSE;
  }
  printf("model: %s%s\n", generated ? "generated in " : "", dir);
  printf("  hidden %d, %d layers (%d sparse, %d MoE), %d heads x %d / %d KV, index %d, block %d "
         "top %d, %d experts top %d x %d, shared %d, dense %d, vocab %d\n",
         c->hidden_size, c->num_layers, sparse, moe, c->num_heads, c->head_dim, c->num_kv_heads,
         c->index_head_dim, c->index_block_size, c->index_topk_blocks, c->num_experts,
         c->num_experts_per_tok, c->intermediate_size, c->shared_intermediate_size,
         c->dense_intermediate_size, c->vocab_size);
  const char *source;
  double llc = on_cpu ? llc_bytes(&source) : 0;
  printf("  weights: %.1f MB (%.0f parameters); read per decode token: %.1f MB (%.0f parameters)\n",
         w->model_bytes / 1e6, w->model_params, w->decode_bytes / 1e6, w->decode_params);
  printf("  prefill: %.0f matmul parameters per token without lm_head\n", w->token_params);
  if (!on_cpu) return;
  if (llc > 0)
    printf("  last-level cache: %.1f MiB (%s); weights %.1fx of it%s\n", llc / 1048576.0, source,
           w->model_bytes / llc,
           w->model_bytes < 2 * llc ? " -- WARNING: not clearly larger; decode may run from cache" : "");
  else
    printf("  last-level cache: unknown (no sysfs entry, no CPUID figure)\n");
}

/* Copy bandwidth of backend memory (read + written), GB/s: the best of `reps` timings of 8
 * copies between two buffers of `bytes`, each timing ended by a to_host of a few bytes, which
 * waits for the copies; 0 when the buffers cannot be had. */
static double device_copy_bandwidth(m3_backend *be, size_t bytes, int reps) {
  const int copies = 8;
  void *x = be->ops->alloc(be, bytes), *y = be->ops->alloc(be, bytes);
  double best = 0;
  uint8_t probe[8];
  for (int r = 0; x && y && r <= reps; r++) { /* r = 0 warms up */
    double t0 = m3_bench_seconds();
    m3_status st = M3_OK;
    for (int i = 0; i < copies && st == M3_OK; i++)
      st = i % 2 ? be->ops->copy(be, x, y, bytes) : be->ops->copy(be, y, x, bytes);
    if (st == M3_OK) st = be->ops->to_host(be, probe, y, sizeof probe);
    double s = m3_bench_seconds() - t0;
    if (st != M3_OK) {
      best = 0;
      break;
    }
    if (r > 0 && 2.0 * copies * (double)bytes / s / 1e9 > best) best = 2.0 * copies * (double)bytes / s / 1e9;
  }
  if (x) be->ops->free(be, x);
  if (y) be->ops->free(be, y);
  return best;
}

/* The copy bandwidth of the machine the model runs on, printed: CPU threads (copy and read)
 * or the device. */
static m3_status measure_copy(m3_backend *be, const bench_args *a, double *copy_gbs) {
  const size_t copy_bytes = (size_t)a->copy_mib << 20;
  if (be->ops->device_memory) {
    *copy_gbs = device_copy_bandwidth(be, copy_bytes, 5);
    if (*copy_gbs <= 0)
      return m3_fail(M3_ERR_NOMEM, "bench: device copy of 2 x %ld MiB failed: %s", a->copy_mib,
                     m3_last_error());
    printf("copy bandwidth, %s: %.2f GB/s (read + written, 2 x %ld MiB, device to device)\n",
           be->ops->name, *copy_gbs, a->copy_mib);
    return M3_OK;
  }
  int threads = m3_backend_cpu_threads(be);
  m3_threadpool *pool = NULL;
  m3_status st = m3_threadpool_create(threads, &pool);
  if (st != M3_OK) return st;
  *copy_gbs = m3_bench_copy_bandwidth(pool, copy_bytes, 5);
  double read_gbs = m3_bench_read_bandwidth(pool, 2 * copy_bytes, 5);
  m3_threadpool_destroy(pool);
  if (*copy_gbs <= 0 || read_gbs <= 0)
    return m3_fail(M3_ERR_NOMEM, "bench: cannot allocate the copy buffers (2 x %ld MiB)", a->copy_mib);
  printf("copy bandwidth, %d thread%s: %.2f GB/s (read + written, 2 x %ld MiB); read: %.2f GB/s\n",
         threads, threads > 1 ? "s" : "", *copy_gbs, a->copy_mib, read_gbs);
  return M3_OK;
}

static void print_floor(const report *rp) {
  const m3_config *c = rp->cfg;
  double bytes = step_bytes(c, &rp->w, rp->batch);
  printf("step floor, batch %d: %.1f MB of weights per decode step / copy bandwidth = %.6f ms", rp->batch,
         bytes / 1e6, bytes / (rp->copy_gbs * 1e9) * 1e3);
  if (rp->w.expert_bytes > 0)
    printf(" (routed experts: %.2f distinct of %d per MoE layer, E*(1-(1-k/E)^B) expected under "
           "uniform routing; one expert of every MoE layer: %.2f MB)",
           distinct_experts(c, rp->batch), c->num_experts, rp->w.expert_bytes / 1e6);
  printf("\n");
}

int m3_bench_model(int argc, char **argv) {
  bench_args a;
  int help;
  m3_status st = parse_args(argc, argv, &a, &help);
  if (st != M3_OK) return m3_cli_fail(argv[0], st);
  if (help) {
    fputs(usage, stdout);
    return 0;
  }
  m3_backend *be = NULL, *raw = NULL;
  /* The device first: a build or machine without it fails before a model is generated. */
  if ((st = m3_cli_open_backend(a.device, (int)a.threads, &raw)) != M3_OK) return m3_cli_fail(argv[0], st);
  if ((st = m3_kv_dtype_check(raw, a.kv_dtype)) != M3_OK) {
    raw->ops->destroy(raw);
    return m3_cli_fail(argv[0], st);
  }
  be = raw; /* raw: the backend itself, for its own queries (CPU threads, ISA) */
  if (a.profile && (st = m3_backend_profile_create(raw, &be)) != M3_OK) {
    raw->ops->destroy(raw);
    return m3_cli_fail(argv[0], st);
  }
  char generated[4096] = "";
  const char *dir = a.model;
  if (!dir) {
    double t0 = m3_bench_seconds();
    if ((st = generate_checkpoint(a.dtype, generated, sizeof generated)) != M3_OK) {
      be->ops->destroy(be);
      return m3_cli_fail(argv[0], st);
    }
    dir = generated;
    fprintf(stderr, "generated the benchmark model in %.1f s\n", m3_bench_seconds() - t0);
  }
  const int on_cpu = !be->ops->device_memory;
  m3_model *model = NULL;
  const m3_model_load_options load = {.quantize_mxfp8 = a.quantize != NULL, .threads = (int)a.threads};
  if ((st = m3_model_load_with(dir, be, &load, &model)) != M3_OK) goto done;
  const m3_config *c = m3_model_config(model);
  report rp = {.cfg = c, .batch = (int)a.batch, .kv_dtype = a.kv_dtype,
               .profile = a.profile ? be : NULL};
  count_weights(c, m3_model_weights(model), &rp.w);
  /* On a device the weights were uploaded at load; the host mapping is not read again. */
  if (on_cpu) {
    m3_model_prefault(model, NULL, NULL);
    print_cpu_model();
    printf("kernels: %s, threads: %d\n", m3_cpu_isa_name(m3_backend_cpu_isa(raw)), m3_backend_cpu_threads(raw));
  } else {
    printf("device: %s (%s)\n", a.device, be->ops->name);
  }
  print_model(dir, !a.model, on_cpu, c, &rp.w);
  printf("KV cache: %s\n", m3_kv_dtype_name(a.kv_dtype));
  if ((st = measure_copy(raw, &a, &rp.copy_gbs)) != M3_OK) goto done;
  print_floor(&rp);
  st = run_phases(model, &a, &rp);

done:
  m3_model_free(model);
  be->ops->destroy(be);
  if (*generated) remove_checkpoint(generated);
  return st == M3_OK ? 0 : m3_cli_fail(argv[0], st);
}
