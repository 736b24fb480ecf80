/* m3 bench model: decode and prefill speed of a whole model, against the copy bandwidth of the
 * same machine measured in the same run with the same threads.
 *
 * Decode is memory-bound: a token reads each weight it uses once (attention, indexer, norms,
 * router, its top-k experts, the shared expert, dense MLPs, lm_head, one embedding row), so the
 * figure to watch is those bytes per second as a fraction of the copy bandwidth. That holds only
 * for a model larger than the last-level cache; without --model, one is generated (tiny.h with
 * benchmark sizes) into a temporary folder and removed at the end. Prefill is compute-bound:
 * GFLOP/s counts 2 x the matmul parameters a token uses plus the attention's dot products.
 *
 * Phases, one KV cache:
 *   decode  at a short context: a 16-token prompt (untimed), then --decode tokens one by one
 *   prefill --prefill tokens from an empty cache, then on to --ctx, in steps of up to 256 tokens
 *   decode  --decode tokens at --ctx
 * Decode feeds back the argmax of each token's logits, as greedy generation does. */
#include <errno.h>
#include <fcntl.h>
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

static const char usage[] =
    "usage: m3 bench model [--model DIR] [--threads N] [--dtype bf16|mxfp8|f32] [--ctx N]\n"
    "                      [--prefill N] [--decode N] [--copy-mib N]\n"
    "  decode tokens/s and GB/s of weights read against the copy bandwidth (same run, same\n"
    "  threads), prefill tokens/s and GFLOP/s. Without --model it generates, into a temporary\n"
    "  folder, a model larger than the last-level cache in --dtype (default bf16):\n"
    "    m3 tiny DIR --layers " "FD,SM,SM,SM,SM,SM,SM,SM" " --hidden 1024 --heads 8 --kv-heads 2\n"
    "      --head-dim 128 --rotary-dim 64 --experts 64 --experts-per-token 4 --expert-width 512\n"
    "      --shared-width 512 --dense-width 2048 --index-dim 128 --block-size 128 --topk-blocks 16\n"
    "  (the same command writes it once for --model). Defaults: threads one per core, ctx 4096,\n"
    "  prefill 512, decode 32. The copy runs over 2 buffers of --copy-mib MiB (default 512;\n"
    "  keep them well above the last-level cache). M3_CPU_ISA picks the kernel set (avx512,\n"
    "  avx2, portable).\n";

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
  const char *model;
  long threads, ctx, prefill, decode, copy_mib;
  m3_tiny_dtype dtype;
} bench_args;

static m3_status parse_args(int argc, char **argv, bench_args *a, int *help) {
  *a = (bench_args){.ctx = 4096, .prefill = 512, .decode = 32, .copy_mib = 512, .dtype = M3_TINY_BF16};
  *help = 0;
  for (int i = 1; i < argc; i++) {
    const char *flag = argv[i];
    if (strcmp(flag, "--help") == 0 || strcmp(flag, "-h") == 0) {
      *help = 1;
      return M3_OK;
    }
    if (i + 1 >= argc) return m3_fail(M3_ERR_ARG, "%s: missing value (see --help)", flag);
    const char *value = argv[++i];
    m3_status st = M3_OK;
    if (strcmp(flag, "--model") == 0) a->model = value;
    else if (strcmp(flag, "--threads") == 0) st = m3_cli_parse_long(flag, value, 0, 4096, &a->threads);
    else if (strcmp(flag, "--ctx") == 0) st = m3_cli_parse_long(flag, value, 1, 1L << 20, &a->ctx);
    else if (strcmp(flag, "--prefill") == 0) st = m3_cli_parse_long(flag, value, 1, 1L << 20, &a->prefill);
    else if (strcmp(flag, "--decode") == 0) st = m3_cli_parse_long(flag, value, 1, 1L << 20, &a->decode);
    else if (strcmp(flag, "--copy-mib") == 0) st = m3_cli_parse_long(flag, value, 1, 1L << 16, &a->copy_mib);
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
} weight_counts;

static void count_weights(const m3_config *c, const m3_weights *w, weight_counts *n) {
  *n = (weight_counts){0};
  const int k = c->num_experts_per_tok;
  n->model_bytes = tensor_bytes(&w->embed) + tensor_bytes(&w->final_norm) +
                   (w->lm_head_tied ? 0 : tensor_bytes(&w->lm_head));
  n->model_params = tensor_params(&w->embed) + tensor_params(&w->final_norm) +
                    (w->lm_head_tied ? 0 : tensor_params(&w->lm_head));
  /* One embedding row, the final norm and the head. */
  n->decode_bytes = tensor_bytes(&w->embed) / (double)c->vocab_size + tensor_bytes(&w->final_norm) +
                    tensor_bytes(&w->lm_head);
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
        }
      }
    }
  }
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

/* KV-cache bytes (float32) the token at position p reads: K and V of the keys it attends to, and
 * the index keys of the whole context on sparse layers. */
static double kv_bytes(const m3_config *c, int64_t p) {
  double b = 0;
  for (int l = 0; l < c->num_layers; l++) {
    b += 8.0 * c->num_kv_heads * c->head_dim * attended_keys(c, l, p);
    if (c->layer_attn[l] == M3_ATTN_SPARSE) b += 4.0 * c->index_head_dim * (double)(p + 1);
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

static int32_t argmax(const float *x, int n) {
  int32_t best = 0;
  for (int i = 1; i < n; i++)
    if (x[i] > x[best]) best = i;
  return best;
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

/* Decodes n tokens one at a time, each the argmax of the previous one's logits. */
static m3_status decode(m3_runner *r, m3_kv_seq *seq, int vocab, int n, float *logits,
                        double *seconds) {
  int32_t id = random_id(vocab);
  double t0 = m3_bench_seconds();
  m3_status st = M3_OK;
  for (int i = 0; i < n && st == M3_OK; i++) {
    st = m3_runner_feed(r, seq, &id, 1, 1, logits, NULL);
    id = argmax(logits, vocab);
  }
  *seconds = m3_bench_seconds() - t0;
  return st;
}

typedef struct {
  const m3_config *cfg;
  weight_counts w;
  double copy_gbs;
} report;

static void print_header(void) {
  printf("\n%-8s %-13s %7s %8s %10s %11s %8s %9s %8s\n", "phase", "positions", "tokens",
         "seconds", "tokens/s", "weight GB/s", "of copy", "KV GB/s", "GFLOP/s");
}

static void print_decode(const report *rp, int64_t from, int n, double s) {
  double kv = 0;
  for (int64_t p = from; p < from + n; p++) kv += kv_bytes(rp->cfg, p);
  double gbs = rp->w.decode_bytes * n / s / 1e9;
  char range[32];
  snprintf(range, sizeof range, "%lld..%lld", (long long)from, (long long)(from + n));
  printf("%-8s %-13s %7d %8.3f %10.2f %11.2f %7.0f%% %9.2f %8s\n", "decode", range, n, s, n / s,
         gbs, 100.0 * gbs / rp->copy_gbs, kv / s / 1e9, "-");
}

static void print_prefill(const report *rp, int64_t from, int64_t to, double s) {
  double n = (double)(to - from);
  double flops = 2.0 * rp->w.token_params * n + attention_flops(rp->cfg, from, to);
  char range[32];
  snprintf(range, sizeof range, "%lld..%lld", (long long)from, (long long)to);
  printf("%-8s %-13s %7lld %8.3f %10.2f %11s %8s %9s %8.1f\n", "prefill", range,
         (long long)(to - from), s, n / s, "-", "-", "-", flops / s / 1e9);
}

static m3_status run_phases(m3_model *model, const bench_args *a, const report *rp) {
  const m3_config *c = rp->cfg;
  const int V = c->vocab_size, short_prompt = 16;
  int64_t longest = a->ctx > a->prefill ? a->ctx : a->prefill;
  int64_t tokens = (longest > short_prompt ? longest : short_prompt) + a->decode;
  if (tokens > INT32_MAX / 2) return m3_fail(M3_ERR_ARG, "--ctx %ld + --decode %ld: too long", a->ctx, a->decode);
  m3_runner *r = NULL;
  m3_status st = m3_runner_create(model, m3_kv_bytes_for_tokens(c, (int)tokens), &r);
  float *logits = malloc((size_t)V * sizeof *logits);
  if (st == M3_OK && !logits) st = m3_fail(M3_ERR_NOMEM, "bench: logits of %d", V);
  m3_kv_seq seq;
  m3_kv_seq_init(&seq);
  double s;
  print_header();
  if (st == M3_OK) st = feed_random(r, &seq, V, short_prompt, &s);
  if (st == M3_OK && (st = decode(r, &seq, V, (int)a->decode, logits, &s)) == M3_OK)
    print_decode(rp, short_prompt, (int)a->decode, s);
  if (r) m3_kv_seq_release(m3_runner_cache(r), &seq);
  if (st == M3_OK && (st = feed_random(r, &seq, V, (int)a->prefill, &s)) == M3_OK)
    print_prefill(rp, 0, a->prefill, s);
  if (st == M3_OK && a->ctx > a->prefill && (st = feed_random(r, &seq, V, (int)(a->ctx - a->prefill), &s)) == M3_OK)
    print_prefill(rp, a->prefill, a->ctx, s);
  if (st == M3_OK && (st = decode(r, &seq, V, (int)a->decode, logits, &s)) == M3_OK)
    print_decode(rp, seq.num_tokens - a->decode, (int)a->decode, s);
  if (r) m3_kv_seq_release(m3_runner_cache(r), &seq);
  m3_runner_free(r);
  free(logits);
  return st;
}

static void print_model(const char *dir, int generated, const m3_config *c, const weight_counts *w) {
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
  double llc = llc_bytes(&source);
  printf("  weights: %.1f MB (%.0f parameters); read per decode token: %.1f MB (%.0f parameters)\n",
         w->model_bytes / 1e6, w->model_params, w->decode_bytes / 1e6, w->decode_params);
  printf("  prefill: %.0f matmul parameters per token without lm_head\n", w->token_params);
  if (llc > 0)
    printf("  last-level cache: %.1f MiB (%s); weights %.1fx of it%s\n", llc / 1048576.0, source,
           w->model_bytes / llc,
           w->model_bytes < 2 * llc ? " -- WARNING: not clearly larger; decode may run from cache" : "");
  else
    printf("  last-level cache: unknown (no sysfs entry, no CPUID figure)\n");
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
  char generated[4096] = "";
  const char *dir = a.model;
  if (!dir) {
    double t0 = m3_bench_seconds();
    if ((st = generate_checkpoint(a.dtype, generated, sizeof generated)) != M3_OK)
      return m3_cli_fail(argv[0], st);
    dir = generated;
    fprintf(stderr, "generated the benchmark model in %.1f s\n", m3_bench_seconds() - t0);
  }
  m3_backend *be = NULL;
  m3_model *model = NULL;
  m3_safetensors *st_file = NULL;
  m3_weights w = {0};
  m3_threadpool *pool = NULL;
  if ((st = m3_backend_cpu_create((int)a.threads, &be)) != M3_OK) goto done;
  if ((st = m3_model_load(dir, be, &model)) != M3_OK) goto done;
  const m3_config *c = m3_model_config(model);
  /* A second binding of the same mapping, for the sizes and dtypes of what a token reads. */
  if ((st = m3_st_open_dir(dir, &st_file)) != M3_OK) goto done;
  if ((st = m3_weights_bind(c, st_file, &w)) != M3_OK) goto done;
  report rp = {.cfg = c};
  count_weights(c, &w, &rp.w);
  m3_model_prefault(model, NULL, NULL);

  int threads = m3_backend_cpu_threads(be);
  print_cpu_model();
  printf("kernels: %s, threads: %d\n", m3_cpu_isa_name(m3_backend_cpu_isa(be)), threads);
  print_model(dir, !a.model, c, &rp.w);
  if ((st = m3_threadpool_create(threads, &pool)) != M3_OK) goto done;
  const size_t copy_bytes = (size_t)a.copy_mib << 20;
  rp.copy_gbs = m3_bench_copy_bandwidth(pool, copy_bytes, 5);
  double read_gbs = m3_bench_read_bandwidth(pool, 2 * copy_bytes, 5);
  m3_threadpool_destroy(pool);
  if (rp.copy_gbs <= 0 || read_gbs <= 0) {
    st = m3_fail(M3_ERR_NOMEM, "bench: cannot allocate the copy buffers (2 x %ld MiB)", a.copy_mib);
    goto done;
  }
  printf("copy bandwidth, %d thread%s: %.2f GB/s (read + written, 2 x %ld MiB); read: %.2f GB/s\n",
         threads, threads > 1 ? "s" : "", rp.copy_gbs, a.copy_mib, read_gbs);
  st = run_phases(model, &a, &rp);

done:
  m3_weights_free(&w);
  if (st_file) m3_st_close(st_file);
  m3_model_free(model);
  if (be) be->ops->destroy(be);
  if (*generated) remove_checkpoint(generated);
  return st == M3_OK ? 0 : m3_cli_fail(argv[0], st);
}
