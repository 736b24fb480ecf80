/* m3.h: the public C API of the m3 inference engine.
 *
 * One m3_engine owns the loaded model, its tokenizer, the paged KV cache and the scheduler. The
 * CLI and the HTTP server are clients of this header only (plus the text-level chat renderer and
 * output parsers in src/tok, which know nothing of tensors).
 *
 * Threading: m3_submit, m3_cancel, m3_engine_stats and the tokenizer calls may be called from any
 * thread at any time. The engine runs either in a background thread (m3_engine_start) or under
 * the caller's control (m3_engine_step, never both). Token callbacks run on the thread that runs
 * the engine; they must not block, and may call m3_cancel. */
#ifndef M3_H
#define M3_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "base/status.h"

typedef struct m3_engine m3_engine;

typedef struct {
  const char *model_dir;    /* NULL: the built-in model */
  const char *device;       /* "cpu" (default), "cuda" (GPU 0) or "cuda:N" */
  int threads;              /* CPU worker threads; 0 = one per core */
  size_t kv_memory_bytes;   /* KV-cache budget; 0 = a default sized from free memory */
  /* NULL, "" or "f32" = K, V and index keys in float32; "fp8" = E4M3 with a float32 scale per row
   * (about 4x the tokens in the same budget; backends without it refuse it). Others: M3_ERR_ARG. */
  const char *kv_dtype;
  int max_batch_tokens;     /* tokens per scheduler step (decode + prefill chunks); 0 = default */
  int max_running;          /* sequences decoded together; 0 = default */
  int prefix_cache;         /* 1 = share full pages of identical prompt prefixes */
  /* Progress while loading: called with (bytes done, bytes total); may be NULL. */
  void (*on_load_progress)(uint64_t done, uint64_t total, void *user);
  void *load_user;
  /* Speculative decoding: NULL or "" = off; "mtp" = the checkpoint's own MTP modules; "eagle3" =
   * an EAGLE3 draft in draft_dir. num_draft tokens are drafted per step (0 = 3, at most 16);
   * the output distribution is unchanged (greedy: the same tokens). Testing hook: "oracle"
   * drafts each request's m3_sampling_params.oracle_tokens (the CLI and server never pass it). */
  const char *speculative;
  const char *draft_dir;
  int num_draft;
  /* NULL or "" = weights as stored; "mxfp8" = convert the BF16/F16/F32 weights of the kinds the
   * published MXFP8 checkpoint quantizes to MXFP8 at load (round to nearest even, the OCP scale
   * rule), for users who only have the BF16 checkpoint. Other values are M3_ERR_ARG. */
  const char *quantize;
  /* Tensor x expert parallelism in this process (0 or 1: one rank): world = tp * ep ranks, rank
   * r = ep_rank * tp + tp_rank holding its share of the model (src/engine/parallel.h). With
   * device "cuda" or "cuda:K" the ranks take GPUs K..K+world-1 and sum over NCCL (a build with
   * NCCL); with "cpu" they are world CPU backends sharing `threads` and summing on the host, a
   * correctness mode (the same tokens as one rank, no faster). kv_memory_bytes is then per rank.
   * Not with speculative decoding yet (M3_ERR_ARG). Sizes the ranks do not divide are
   * M3_ERR_ARG naming --tp / --ep. */
  int tp, ep;
  /* Several nodes (processes, on one host or several) running the tp x ep world together: 0 or
   * 1 = one node. nnodes must divide the world; node n hosts the world / nnodes consecutive
   * ranks from n * world / nnodes, on GPUs K.. of its own device "cuda:K" (a CUDA build with
   * NCCL; other devices are M3_ERR_ARG). Node 0 (node_rank 0) is the engine (m3_engine_open)
   * and listens on master_addr (HOST[:PORT], engine/rendezvous.h) for the others, which run
   * m3_engine_follow with the same model, tp, ep, nnodes and quantize. */
  int nnodes, node_rank;
  const char *master_addr;
} m3_engine_options;

/* Fills `opts` with the defaults above. */
void m3_engine_options_init(m3_engine_options *opts);

m3_status m3_engine_open(const m3_engine_options *opts, m3_engine **out);
/* A node other than 0 (opts->node_rank >= 1 of opts->nnodes): loads its ranks' shares, joins
 * node 0 at opts->master_addr (waiting up to 10 minutes for it), runs every step node 0's engine
 * hands it until node 0 quits or closes the connection (M3_OK), or until the link to node 0
 * breaks (its error). KV storage takes node 0's page count and dtype. Blocks the caller. */
m3_status m3_engine_follow(const m3_engine_options *opts);
/* Cancels everything still running (callbacks see M3_FINISH_CANCELLED) and frees all. */
void m3_engine_close(m3_engine *e);

/* Same values as m3_chat_format in tok/chat.h (M3_CHAT_FORMAT_M3, M3_CHAT_FORMAT_M2); a distinct
 * name so a file can include both headers. */
typedef enum { M3_CHAT_M3 = 0, M3_CHAT_M2 = 1 } m3_model_chat_format;

typedef struct {
  const char *name;          /* the model folder's base name, or "m3-builtin" */
  int vocab_size;
  int max_context;           /* max_position_embeddings, capped by what the KV budget holds */
  int32_t eos_token_id;      /* end of turn ([e~[ for M3) */
  m3_model_chat_format chat_format;
  int kv_pages_total;
  int kv_page_tokens;
  const char *kv_dtype;      /* "f32" or "fp8" */
} m3_model_info;

void m3_engine_model_info(const m3_engine *e, m3_model_info *out);

/* Tokenizer of the loaded model. *ids is malloc'd (caller frees). special = 1 lets the text's
 * special tokens match as tokens (prompt rendering); 0 encodes them as the plain text they spell
 * (HF's encode_special_tokens; non-special added tokens match either way). */
m3_status m3_tokenize(const m3_engine *e, const char *text, size_t len, int special,
                      int32_t **ids, int *n_ids);
/* *text is malloc'd and NUL-terminated. */
m3_status m3_detokenize(const m3_engine *e, const int32_t *ids, int n_ids, int skip_special,
                        char **text, size_t *len);

typedef struct {
  float temperature;          /* 0 = greedy */
  int top_k;                  /* 0 = off */
  float top_p;                /* 1 = off */
  float min_p;                /* 0 = off */
  float repetition_penalty;   /* 1 = off (divides positive logits, multiplies negative ones) */
  float presence_penalty;     /* 0 = off (OpenAI semantics over generated tokens) */
  float frequency_penalty;    /* 0 = off */
  const int32_t *logit_bias_ids; /* n_logit_bias pairs added to the logits */
  const float *logit_bias_values;
  int n_logit_bias;
  uint64_t seed;              /* same seed, same output, whatever else is batched */
  int has_seed;               /* 0: a seed is drawn per request */
  int max_tokens;             /* generated tokens per sample; 0 = until the context is full */
  const char *const *stop;    /* stop strings, matched across token boundaries, not emitted */
  int n_stop;
  const int32_t *stop_token_ids;
  int n_stop_token_ids;
  int ignore_eos;             /* 1: the end-of-turn token does not stop */
  int logprobs;               /* 1: report the sampled token's log-probability */
  int top_logprobs;           /* report this many most likely tokens (0..20) */
  int n;                      /* samples sharing the prompt's pages; 0 or 1 = one */
  int skip_special_tokens;    /* 1 (default): special tokens release no text. Chat clients that
                               * parse reasoning and tool calls set 0: the markers (<mm:think>,
                               * ]<]minimax[>[, ...) are special tokens and the parsers need them */
  /* Testing hook: when non-NULL the sampler emits these tokens in order (then stops) instead of
   * drawing; everything else (stop strings, callbacks, usage) runs as usual. */
  const int32_t *forced_tokens;
  int n_forced_tokens;
  /* Testing hook, for an engine opened with speculative = "oracle" only (M3_ERR_ARG otherwise):
   * the drafts for generated token i are oracle_tokens[i] (none past the end), verified as any
   * drafter's, so tests choose which drafts are right. */
  const int32_t *oracle_tokens;
  int n_oracle_tokens;
} m3_sampling_params;

void m3_sampling_params_init(m3_sampling_params *p);

typedef enum {
  M3_FINISH_NONE = 0,   /* not finished */
  M3_FINISH_STOP,       /* end-of-turn token, stop string or stop token id */
  M3_FINISH_LENGTH,     /* max_tokens or the context limit */
  M3_FINISH_CANCELLED,  /* m3_cancel or engine close */
  M3_FINISH_ERROR,      /* the request failed (message in m3_token_event.error) */
} m3_finish_reason;

typedef struct {
  uint64_t request_id;
  int sample;                 /* 0 .. n-1 */
  int32_t token;              /* -1 on a finish event that carries no token */
  const char *text;           /* UTF-8 text released by this token (may be empty: held back for
                               * an incomplete character or a possible stop string) */
  size_t text_len;
  float logprob;              /* when requested */
  int n_top;
  const int32_t *top_ids;     /* n_top entries, most likely first */
  const float *top_logprobs;
  m3_finish_reason finish;    /* != NONE on the sample's last event */
  const char *error;          /* with M3_FINISH_ERROR */
  int prompt_tokens;          /* usage, filled on every event */
  int cached_prompt_tokens;   /* prompt tokens served from the prefix cache */
  int generated_tokens;       /* this sample's tokens so far */
} m3_token_event;

typedef void (*m3_token_callback)(const m3_token_event *ev, void *user);

/* Queues a request. The prompt is copied. Over-long prompts, bad params, or an engine that is
 * shutting down return an error (M3_ERR_LIMIT / M3_ERR_ARG) and no callback ever runs. */
m3_status m3_submit(m3_engine *e, const int32_t *prompt, int n_prompt,
                    const m3_sampling_params *params, m3_token_callback cb, void *user,
                    uint64_t *request_id);

/* Images and videos for a model with a vision tower (m3_vision_chat_spec.md §2-§3). An m3_media
 * is one item decoded and cut into the tower's patches for the loaded model; it is independent of
 * any request (submit copies what it needs). */
typedef struct m3_media m3_media;

/* An image file held in memory (JPEG, PNG, WebP, GIF first frame; EXIF orientation applied, alpha
 * composited onto white, resized to at most 451,584 pixels). `label` names it in errors.
 * Undecodable bytes: M3_ERR_FORMAT or M3_ERR_UNSUPPORTED; a model without a vision tower:
 * M3_ERR_UNSUPPORTED. */
m3_status m3_media_image(const m3_engine *e, const void *data, size_t len, const char *label,
                         m3_media **out);
/* A video file, decoded with libavformat, one frame per second (at most 768). */
m3_status m3_media_video(const m3_engine *e, const char *path, m3_media **out);
void m3_media_free(m3_media *m);
/* Placeholder ids the item takes in the prompt. */
int m3_media_tokens(const m3_media *m);

/* Expands a tokenized prompt holding one image id (]<]image[>[) or video id (]<]video[>[) per item,
 * in order: an image becomes ]<]start of image[>[ + m3_media_tokens x image id + ]<]end of image[>[;
 * a video, per temporal patch, the text "]<]T seconds[>[" then the same run of video ids (spec
 * §2.6, §3.4). Needs the model's tokenizer. *out is malloc'd. Counts or kinds that do not match
 * the items are M3_ERR_ARG. */
m3_status m3_media_expand(const m3_engine *e, const int32_t *ids, int n, m3_media *const *media,
                          int n_media, int32_t **out, int *n_out);

/* m3_submit with images/videos: the prompt is already expanded (m3_media_expand), and holds
 * exactly the placeholder ids the items need. The vision tower runs on the engine's thread when
 * the request is admitted; its rows replace the placeholders' embeddings. Such prompts do not take
 * part in prefix caching. n_media = 0 is m3_submit. */
m3_status m3_submit_media(m3_engine *e, const int32_t *prompt, int n_prompt,
                          m3_media *const *media, int n_media, const m3_sampling_params *params,
                          m3_token_callback cb, void *user, uint64_t *request_id);

/* Stops a request; its pages are freed before the next step and its callback receives one
 * M3_FINISH_CANCELLED event per unfinished sample. Unknown or finished ids are ignored. */
void m3_cancel(m3_engine *e, uint64_t request_id);

/* Runs one scheduler step (a batched forward over decode tokens and prefill chunks). Sets
 * *active to the number of requests still running or waiting. */
m3_status m3_engine_step(m3_engine *e, int *active);

/* Background loop: a thread that steps while there is work and sleeps otherwise. */
m3_status m3_engine_start(m3_engine *e);
/* Stops accepting (m3_submit returns M3_ERR_LIMIT), waits up to grace_ms for running requests,
 * cancels the rest, and joins the loop thread. */
void m3_engine_stop(m3_engine *e, int grace_ms);

typedef struct {
  int running, waiting;
  int kv_pages_used, kv_pages_free;
  uint64_t requests_total, prompt_tokens_total, generated_tokens_total;
  uint64_t prefix_cache_hit_tokens, prefix_cache_query_tokens;
  uint64_t preemptions;
  uint64_t steps;
  double step_seconds_total;  /* time inside forward passes */
  double schedule_seconds_total; /* time spent scheduling, outside forward passes */
  /* Speculative decoding: draft tokens verified, of them accepted, and verifications (rounds);
   * the mean acceptance length (tokens a round emits) is 1 + accepted / rounds. */
  uint64_t spec_draft_tokens, spec_accepted_tokens, spec_rounds;
  /* Forward steps (rank 0's) issued as one launch of a recorded CUDA graph, and recorded then;
   * zero on the CPU. */
  uint64_t graph_steps_replayed, graph_steps_recorded;
} m3_engine_stats;

void m3_engine_stats_get(m3_engine *e, m3_engine_stats *out);

#ifdef __cplusplus
}
#endif

#endif
