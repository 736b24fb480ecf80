/* m3 run: generate from a prompt (token ids, or text through the model's tokenizer) through the
 * public engine API, streaming tokens as they come, then prompt and generation speed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/commands.h"
#include "cli/model_args.h"
#include "m3.h"
#include "media/media.h"

/* What `m3 run` alone continues: the README's first command shows generation with no flags. */
#define DEFAULT_PROMPT "The quick brown fox"

static const char usage[] =
    "usage: m3 run [--model DIR] [--ids 1,2,3 | --prompt TEXT] [--max-tokens N]\n"
    "              [--temperature T] [--top-k K] [--top-p P] [--min-p P] [--seed S]\n"
    "              [--threads N] [--kv-memory MIB] [--device cpu|cuda|cuda:N]\n"
    "              [--image FILE]... [--video FILE]...\n"
    "              " M3_CLI_SPEC_USAGE "\n"
    "  generates up to N tokens (default 32; stops at the end-of-turn id), greedy at\n"
    "  temperature 0 (default). Streams the generated ids (--ids) or text (--prompt, encoded\n"
    "  as is with DIR/tokenizer.json, no chat template) as they come, then prompt and\n"
    "  generation speed on stderr. Without --ids or --prompt it continues the prompt\n"
    "  \"" DEFAULT_PROMPT "\". Without --model it runs\n"
    "  " M3_CLI_DEFAULT_MODEL ".\n" M3_CLI_DEFAULT_DRAFT_HELP
    "  --image / --video attach media (JPEG, PNG, WebP, GIF; videos through libavformat) for a\n"
    "  model with a vision tower: each takes the next ]<]image[>[ / ]<]video[>[ placeholder of\n"
    "  the prompt (placeholders are put in front when the prompt has none).\n" M3_CLI_NODES_HELP;

enum { MAX_MEDIA = 64 };

typedef struct {
  const char *model, *ids, *prompt, *device;
  long max_tokens, threads, seed, top_k, kv_mib;
  double temperature, top_p, min_p;
  m3_cli_spec spec;
  const char *media[MAX_MEDIA];
  int media_is_video[MAX_MEDIA], n_media;
} run_args;

static m3_status parse_args(int argc, char **argv, run_args *a, int *help) {
  *a = (run_args){.max_tokens = 32, .seed = 1, .top_p = 1.0};
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
    else if (strcmp(flag, "--ids") == 0) a->ids = value;
    else if (strcmp(flag, "--prompt") == 0) a->prompt = value;
    else if (strcmp(flag, "--device") == 0) a->device = value;
    else if (strcmp(flag, "--image") == 0 || strcmp(flag, "--video") == 0) {
      if (a->n_media == MAX_MEDIA) return m3_fail(M3_ERR_ARG, "%s: more than %d media files", flag, MAX_MEDIA);
      a->media_is_video[a->n_media] = flag[2] == 'v';
      a->media[a->n_media++] = value;
    }
    else if (strcmp(flag, "--max-tokens") == 0) st = m3_cli_parse_long(flag, value, 0, 1L << 24, &a->max_tokens);
    else if (strcmp(flag, "--threads") == 0) st = m3_cli_parse_long(flag, value, 0, 4096, &a->threads);
    else if (strcmp(flag, "--seed") == 0) st = m3_cli_parse_long(flag, value, 0, 0x7fffffffL, &a->seed);
    else if (strcmp(flag, "--top-k") == 0) st = m3_cli_parse_long(flag, value, 0, 1L << 30, &a->top_k);
    else if (strcmp(flag, "--kv-memory") == 0) st = m3_cli_parse_long(flag, value, 1, 1L << 30, &a->kv_mib);
    else if (strcmp(flag, "--temperature") == 0) st = m3_cli_parse_unit(flag, value, 100.0, &a->temperature);
    else if (strcmp(flag, "--top-p") == 0) st = m3_cli_parse_unit(flag, value, 1.0, &a->top_p);
    else if (strcmp(flag, "--min-p") == 0) st = m3_cli_parse_unit(flag, value, 1.0, &a->min_p);
    else if (!m3_cli_spec_flag(flag, value, &a->spec, &st))
      return m3_fail(M3_ERR_ARG, "unknown option '%s' (see --help)", flag);
    if (st != M3_OK) return st;
  }
  if (a->ids && a->prompt) return m3_fail(M3_ERR_ARG, "give one of --ids and --prompt, not both");
  if (!a->ids && !a->prompt) a->prompt = DEFAULT_PROMPT;
  if (a->top_p <= 0.0) return m3_fail(M3_ERR_ARG, "--top-p must be > 0");
  return M3_OK;
}

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct {
  int print_ids, count;
  double first_token_at;
  m3_finish_reason finish;
  char error[256];
} stream;

static void on_token(const m3_token_event *ev, void *user) {
  stream *s = user;
  if (ev->token >= 0) {
    if (s->count++ == 0) s->first_token_at = now_seconds();
    if (s->print_ids) printf("%s%d", s->count > 1 ? "," : "", ev->token);
  }
  if (!s->print_ids) fwrite(ev->text, 1, ev->text_len, stdout);
  fflush(stdout);
  if (ev->finish != M3_FINISH_NONE) {
    s->finish = ev->finish;
    if (ev->error) snprintf(s->error, sizeof s->error, "%s", ev->error);
  }
}

/* Loads the media files, puts one placeholder per item in front of a prompt that has none, and
 * expands the placeholders (m3_media_expand). On success *ids is replaced by the expanded prompt
 * and media[] holds the items. */
static m3_status attach_media(m3_engine *e, const run_args *a, m3_media **media, int32_t **ids,
                              int *n) {
  int32_t image_id = -1, video_id = -1;
  m3_status st = M3_OK;
  for (int i = 0; i < a->n_media && st == M3_OK; i++) {
    if (a->media_is_video[i]) {
      st = m3_media_video(e, a->media[i], &media[i]);
    } else {
      uint8_t *data = NULL;
      size_t len = 0;
      st = m3_read_file(a->media[i], (size_t)256 << 20, &data, &len);
      if (st == M3_OK) st = m3_media_image(e, data, len, a->media[i], &media[i]);
      free(data);
    }
  }
  const char *marks[2] = {"]<]image[>[", "]<]video[>["};
  int32_t *mark_ids[2] = {&image_id, &video_id};
  for (int k = 0; k < 2 && st == M3_OK; k++) {
    int32_t *one = NULL;
    int count = 0;
    st = m3_tokenize(e, marks[k], strlen(marks[k]), 1, &one, &count);
    if (st == M3_OK && count == 1) *mark_ids[k] = one[0];
    free(one);
  }
  if (st != M3_OK) return st;
  int have = 0;
  for (int i = 0; i < *n; i++) have += (*ids)[i] == image_id || (*ids)[i] == video_id;
  if (have == 0) {
    int32_t *with = malloc((size_t)(*n + a->n_media) * sizeof *with);
    if (!with) return m3_fail(M3_ERR_NOMEM, "run: prompt");
    for (int i = 0; i < a->n_media; i++) with[i] = a->media_is_video[i] ? video_id : image_id;
    memcpy(with + a->n_media, *ids, (size_t)*n * sizeof *with);
    free(*ids);
    *ids = with;
    *n += a->n_media;
  }
  int32_t *expanded = NULL;
  int n_expanded = 0;
  if ((st = m3_media_expand(e, *ids, *n, media, a->n_media, &expanded, &n_expanded)) != M3_OK)
    return st;
  free(*ids);
  *ids = expanded;
  *n = n_expanded;
  return M3_OK;
}

int m3_cmd_run(int argc, char **argv) {
  run_args a;
  int help;
  m3_status st = parse_args(argc, argv, &a, &help);
  if (st != M3_OK) return m3_cli_fail("run", st);
  if (help) {
    fputs(usage, stdout);
    return 0;
  }
  m3_cli_model_paths paths;
  if ((st = m3_cli_model_or_default(&a.model, &a.spec, &paths)) != M3_OK ||
      (st = m3_cli_parallel_gate(&a.spec, a.model)) != M3_OK)
    return m3_cli_fail("run", st);
  int32_t *ids = NULL;
  int n = 0;
  m3_engine *e = NULL;
  m3_media *media[MAX_MEDIA] = {0};
  if (a.ids && (st = m3_cli_parse_ids(a.ids, &ids, &n)) != M3_OK) return m3_cli_fail("run", st);

  m3_engine_options o;
  m3_engine_options_init(&o);
  o.model_dir = a.model;
  o.threads = (int)a.threads;
  if (a.device) o.device = a.device;
  o.max_running = 1;
  o.kv_memory_bytes = (size_t)a.kv_mib << 20;
  m3_cli_spec_apply(&a.spec, &o);
  if (a.spec.node_rank > 0) { /* a node that follows node 0: no prompt of its own */
    free(ids);
    return m3_cli_follow("run", &o);
  }
  if (isatty(STDERR_FILENO)) o.on_load_progress = m3_cli_load_progress;
  stream out = {.print_ids = a.ids != NULL};
  if ((st = m3_engine_open(&o, &e)) != M3_OK) goto done;
  m3_model_info info;
  m3_engine_model_info(e, &info);
  if (a.prompt) {
    st = m3_tokenize(e, a.prompt, strlen(a.prompt), 0, &ids, &n);
    if (st == M3_ERR_UNSUPPORTED) st = m3_fail(M3_ERR_ARG, "--prompt: %s has no tokenizer.json; use --ids", a.model);
    if (st != M3_OK) goto done;
    if (n == 0) {
      st = m3_fail(M3_ERR_ARG, "--prompt: the text encodes to no tokens");
      goto done;
    }
  } else if ((st = m3_cli_check_ids(ids, n, info.vocab_size)) != M3_OK) {
    goto done;
  }

  m3_sampling_params p;
  m3_sampling_params_init(&p);
  p.temperature = (float)a.temperature;
  p.top_k = (int)a.top_k;
  p.top_p = (float)a.top_p;
  p.min_p = (float)a.min_p;
  p.seed = (uint64_t)a.seed;
  p.has_seed = 1;
  p.max_tokens = (int)a.max_tokens;
  if (a.max_tokens == 0) goto done; /* nothing to generate */
  double t0 = now_seconds();
  if (a.n_media && (st = attach_media(e, &a, media, &ids, &n)) != M3_OK) goto done;
  if ((st = m3_submit_media(e, ids, n, media, a.n_media, &p, on_token, &out, NULL)) != M3_OK)
    goto done;
  for (int active = 1; active;)
    if ((st = m3_engine_step(e, &active)) != M3_OK) goto done;
  double t1 = now_seconds();
  printf("\n");
  if (out.finish == M3_FINISH_ERROR) {
    st = m3_fail(M3_ERR_IO, "generation failed: %s", out.error);
    goto done;
  }
  /* Prompt speed up to the first token; generation speed over the tokens after it. */
  double prompt_s = out.count ? out.first_token_at - t0 : t1 - t0, gen_s = t1 - out.first_token_at;
  int decoded = out.count > 1 ? out.count - 1 : 0;
  fprintf(stderr, "prompt: %d tokens in %.3f s (%.2f tokens/s); generation: %d tokens in %.3f s "
          "(%.2f tokens/s)\n", n, prompt_s, n / prompt_s, decoded, decoded ? gen_s : 0.0,
          decoded ? decoded / gen_s : 0.0);
  m3_engine_stats stats;
  m3_engine_stats_get(e, &stats);
  if (stats.graph_steps_recorded || stats.graph_steps_replayed)
    fprintf(stderr, "steps from CUDA graphs: %llu recorded, %llu replayed\n",
            (unsigned long long)stats.graph_steps_recorded,
            (unsigned long long)stats.graph_steps_replayed);

done:
  for (int i = 0; i < a.n_media; i++) m3_media_free(media[i]);
  m3_engine_close(e);
  free(ids);
  return st == M3_OK ? 0 : m3_cli_fail("run", st);
}
