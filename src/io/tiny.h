/* tiny.h: a small deterministic random checkpoint in the official MiniMax-M3 VL layout.
 *
 * `m3 tiny` and the tests use it to exercise every code path (full and sparse attention, dense
 * MLP and MoE layers, MTP, vision tower, MXFP8) without the 427B model. The folder holds
 *   config.json        the VL wrapper config (m3_config_write)
 *   model.safetensors  every tensor under its official name (shared/spec/m3_text_spec.md §9,
 *                      m3_vision_chat_spec.md §5), one MTP module, a 2-layer vision tower
 *   tokenizer.json     a byte-level BPE trained on a built-in text, M3's added tokens after it
 * Same options give the same bytes on every machine: weights come from an integer PRNG seeded
 * per tensor name, and Box-Muller is done here, not by rand(). */
#ifndef M3_IO_TINY_H
#define M3_IO_TINY_H

#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

typedef enum { M3_TINY_BF16 = 0, M3_TINY_F32, M3_TINY_MXFP8 } m3_tiny_dtype;

/* Each entry is <attention><mlp>: F full / S sparse (MSA) attention, D dense MLP / M MoE. */
#define M3_TINY_DEFAULT_LAYERS "FD,FM,SD,SM"

typedef struct {
  uint64_t seed;
  m3_tiny_dtype dtype;
  const char *layers; /* comma-separated plan, e.g. "FD,SM,SM"; NULL = M3_TINY_DEFAULT_LAYERS */
  /* Sizes, 0 = the default (tiny.c's header), each at most 65536; larger models for
   * benchmarks. Errors name them as `m3 tiny` spells its flags (--hidden, --kv-heads, ...). */
  int hidden;            /* --hidden: hidden_size */
  int heads, kv_heads;   /* --heads, --kv-heads: query and KV heads (also the index heads) */
  int head_dim;          /* --head-dim */
  int rotary_dim;        /* --rotary-dim: rotated width, even, <= head_dim and index_dim */
  int experts;           /* --experts: routed experts */
  int experts_per_token; /* --experts-per-token: top-k, <= experts */
  int expert_width;      /* --expert-width: routed expert intermediate size */
  int shared_width;      /* --shared-width: shared expert intermediate size */
  int dense_width;       /* --dense-width: dense MLP intermediate size */
  int index_dim;         /* --index-dim: MSA index head dim */
  int block_size;        /* --block-size: MSA block (and KV page) tokens */
  int topk_blocks;       /* --topk-blocks: MSA blocks each query attends to */
} m3_tiny_options;

/* seed 1, bf16, the default plan and sizes. */
m3_tiny_options m3_tiny_default_options(void);

/* Creates `dir` (and missing parents) and writes the three files into it. A bad plan is
 * M3_ERR_ARG naming the entry; sizes out of range or inconsistent (heads not a multiple of
 * kv_heads, ...) are M3_ERR_ARG naming the options. */
m3_status m3_tiny_write(const char *dir, const m3_tiny_options *opt);

/* The built-in model: the default tiny checkpoint, generated on first use into
 * $M3_CACHE, else $XDG_CACHE_HOME/m3, else ~/.cache/m3, in a folder whose name carries the
 * format version. It is written to a temporary folder and renamed into place, so concurrent
 * first uses are safe. Writes the folder path into out. */
m3_status m3_builtin_model_dir(char *out, size_t cap);

#endif
