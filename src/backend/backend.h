/* backend.h: the op table every backend implements.
 *
 * The model code (src/model) states the math once as a sequence of these ops; a backend decides
 * only how each op runs. Activations are float32 row-major buffers allocated by the backend
 * (host memory on the CPU backend). Weights are m3_tensor views of any loaded dtype (F32, F16,
 * BF16, MXFP8, FP8 block); ops decode them on the fly and accumulate in float32.
 *
 * Backend memory: every array an op reads or writes (activations, ids, positions, block tables,
 * selections, routing outputs, biases, what an m3_kv_view points to) is memory from `alloc` of
 * the same backend, and every weight an op reads has been through `prepare_tensor` (or views
 * backend memory); the m3_kv_view, m3_msa_params and m3_tensor structs are host structs. On the CPU backend that is host memory; on the CUDA backend it is device memory, which
 * host code reads and writes only through to_host / to_device. Ops run in issue order; on the CUDA
 * backend they are asynchronous and their failures surface at the next to_host / to_device.
 *
 * Shapes in comments: T tokens, H hidden, nh query heads, nkv KV heads, hd head dim,
 * G = index heads (= nkv), ihd index head dim, E experts, k experts per token. */
#ifndef M3_BACKEND_BACKEND_H
#define M3_BACKEND_BACKEND_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "base/status.h"
#include "io/weights.h"

typedef struct m3_backend m3_backend;
/* A recorded run of ops that a backend replays with one launch (graph_begin below). */
typedef struct m3_graph m3_graph;

/* How the KV cache stores K, V and IK: float32, or fp8 (each row of one token, one KV head: hd
 * values, or of one token's index key: ihd values, as E4M3 bytes times one float32 scale per row,
 * scale = amax(row) / 448; a fourth of the bytes, so a KV budget holds about 4x the tokens). An
 * fp8 cache's K rows hold the keys rotated by m3_kv_rotate_key (kv_store, attention). */
typedef enum { M3_KV_F32 = 0, M3_KV_FP8 = 1 } m3_kv_dtype;

/* The block of the key rotation for rows of n values: the largest power of two dividing n, at
 * most M3_KV_KEY_BLOCK_MAX (a warp holds that many in 8 registers a lane; M3's heads are 128). */
enum { M3_KV_KEY_BLOCK_MAX = 256 };
static inline int m3_kv_key_block(int n) {
  const int b = n & -n;
  return b < M3_KV_KEY_BLOCK_MAX ? b : M3_KV_KEY_BLOCK_MAX;
}

/* x [n] in place: each block of B = m3_kv_key_block(n) values times the Sylvester-Hadamard
 * matrix H (entries +-1, not normalized; H H = B I), as float32 butterflies of span 1, 2, 4, ...,
 * B/2 in that order (a, b at i, i + span become a + b, a - b), which fixes the bits every backend
 * must produce. Why an fp8 cache stores H k rather than k: E4M3 keeps ~2.4% error relative to each
 * value, and trained keys put much of their weight on a few channels that the queries share, so
 * those channels' errors pass into the scores undamped; spread over the block by H, the errors
 * of a score average out (the trained built-in model: logits drift from the float32 cache,
 * median 0.029 -> 0.022, bench/RESULTS.md). */
static inline void m3_kv_rotate_key(float *x, int n) {
  const int b = m3_kv_key_block(n);
  for (int span = 1; span < b; span <<= 1)
    for (int i = 0; i < n; i++)
      if (!(i & span)) {
        const float lo = x[i], hi = x[i + span];
        x[i] = lo + hi;
        x[i + span] = lo - hi;
      }
}

/* Bytes one page of one pool (K, V or IK of one layer) takes: `rows` rows of `dim` values.
 *   f32: float32 [rows, dim].
 *   fp8: float32 scales [rows], then E4M3 bytes [rows, dim], padded to a multiple of 16 bytes so
 *        that every page (and so its scales) stays aligned.
 * A page's scales live in the page, so copying the page's bytes (copy-on-write) moves them too. */
static inline size_t m3_kv_pool_page_bytes(m3_kv_dtype dt, size_t rows, size_t dim) {
  if (dt == M3_KV_F32) return rows * dim * sizeof(float);
  return (rows * (sizeof(float) + dim) + 15) / 16 * 16;
}

/* One layer's cache of one sequence, in pages of block_size tokens (the MSA block). k, v and ik
 * are pools of pages, page p at byte p * m3_kv_pool_page_bytes(dtype, rows, dim) with
 *   K, V: rows = nkv * block_size, dim = hd;  row kvh * block_size + s   (K post norm+RoPE, V raw)
 *   IK:   rows = block_size, dim = ihd;       row s   (sparse layers only, else NULL;
 *                                                      post norm+RoPE)
 * for token slot s in [0, block_size). An f32 pool is float32 [pages, rows, dim]: K of (p, kvh, s)
 * at (float *)k + ((size_t)p * nkv * block_size + kvh * block_size + s) * hd.
 * block_table[b] is the page holding absolute positions [b*block_size, (b+1)*block_size).
 * Only a backend with kv_fp8 = 1 receives fp8 views. */
typedef struct {
  void *k, *v, *ik;
  const int32_t *block_table;
  int num_blocks;      /* entries in block_table that are valid */
  int block_size, nkv, hd, ihd;
  m3_kv_dtype dtype;
} m3_kv_view;

/* MSA selection parameters (config: index_topk_blocks, index_local_blocks, index_init_blocks). */
typedef struct {
  int topk, local_blocks, init_blocks;
} m3_msa_params;

/* The ops of the vision tower (m3_vision_chat_spec.md §4), a table of their own so that a backend
 * without them (vision = NULL) is refused cleanly. Shapes: N patches of one call, D width, nh
 * heads, hd head dim. Same memory rules as the main table. */
typedef struct {
  /* LayerNorm with affine over nrows rows of n: y = (x - mean) / sqrt(var + eps) * w + b, biased
   * variance, in float32.  w, b [n]; x and y may alias. */
  void (*layernorm)(m3_backend *be, const float *x, const m3_tensor *w, const m3_tensor *b,
                    float eps, int nrows, int n, float *y);
  /* x[t, :] += b for T rows of n.  b [n] */
  void (*add_bias)(m3_backend *be, float *x, const m3_tensor *b, int T, int n);
  /* Exact GELU in place: x = 0.5 x (1 + erf(x / sqrt 2)), computed as 0.5 x erfc(-x / sqrt 2). */
  void (*gelu)(m3_backend *be, float *x, size_t n);
  /* Axial 3-D RoPE in place over the first 3 * axis_dim dims of each head (spec §4.3):
   * inv_freq[j] = theta^(-2j / axis_dim), j < axis_dim / 2, in float32; angle i of token t is
   * pos[t, i / (axis_dim / 2)] * inv_freq[i % (axis_dim / 2)]; NeoX pairs (i, i + 3 * axis_dim / 2).
   * x [N, nheads, hd]; pos [N, 3] (t, y, x) int32. */
  void (*rope_3d)(m3_backend *be, float *x, const int32_t *pos, int N, int nheads, int hd,
                  int axis_dim, double theta);
  /* Non-causal attention of N tokens among themselves (one image or video segment):
   * out[t, h] = softmax_j(q[t, h] . k[j, h] / sqrt(hd)) v[j, h].  q, k, v, out [N, nh, hd] */
  void (*attention_full)(m3_backend *be, const float *q, const float *k, const float *v, int N,
                         int nh, int hd, float *out);
} m3_vision_ops;

/* The routed experts of one MoE layer as moe_experts reads them. gate, up, down point at E
 * prepared tensors each (w1 [I, H], w3 [I, H], w2 [H, I]; one dtype and shape within a layer).
 * shared_gate, shared_up, shared_down: the layer's shared expert ([S, H], [S, H], [H, S]), which
 * moe_experts then adds too, or NULL (none, or added by the caller: the tensor-parallel sum).
 * Under expert parallelism a rank holds the E experts [first, first + E) of the router's
 * numbering (first 0 otherwise): moe_experts runs the choices of those experts only, as local
 * expert id - first, and skips every other choice (another rank adds it); a negative id (no
 * expert at all: moe_route's out-of-memory marker) makes its token's row NaN.
 * prepare_experts fills `table` (whatever the backend keeps to reach expert e from device code,
 * NULL on the CPU); release_experts frees it. */
typedef struct {
  const m3_tensor *gate, *up, *down;
  const m3_tensor *shared_gate, *shared_up, *shared_down;
  int E, first;
  float alpha, beta, limit; /* SwiGLU-OAI (config swiglu_alpha, swiglu_beta, swiglu_limit) */
  void *table;
} m3_moe_experts;

/* How sample_rows draws one row (engine/sampler.h, steps 3-7 without logit bias or penalties). */
typedef struct {
  float temperature; /* <= 0: the argmax, `unit` unused */
  float top_p;       /* >= 1 or <= 0: off */
  float min_p;       /* <= 0: off */
  int32_t top_k;     /* <= 0 or >= the finite tokens: off */
  double unit;       /* the draw's PRNG value in [0, 1) (m3_sampler_next_unit) */
} m3_row_sampling;

/* What kv_store_rope takes of T tokens: the attention branches' projections and the Gemma norm
 * weights of their heads. */
typedef struct {
  float *q, *iq;           /* queries [T, nh, hd], index queries [T, niq, ihd]; either may be NULL */
  const float *k, *v, *ik; /* [T, nkv, hd], [T, nkv, hd], [T, ihd] or NULL */
  const m3_tensor *q_norm, *iq_norm, *k_norm, *ik_norm; /* [hd], [ihd], [hd], [ihd]; NULL with their rows */
  int nh, niq;
  float eps;
  int rot;
  double theta;
} m3_attention_rows;

/* One output of matmul_set: y [T, w->rows]. */
typedef struct {
  const m3_tensor *w;
  float *y;
} m3_matmul_out;
enum { M3_MATMUL_SET_MAX = 8 };

typedef struct {
  const char *name;
  void (*destroy)(m3_backend *be);

  void *(*alloc)(m3_backend *be, size_t bytes); /* zeroed; NULL on failure */
  void (*free)(m3_backend *be, void *p);
  /* Host memory that to_host and to_device move fastest (CUDA: page-locked, about 4x the rate
   * of malloc'd memory for a step's logits on an H200 machine; CPU: malloc). Not zeroed; NULL
   * on failure. For the buffers every step fills, such as logits. */
  void *(*alloc_host)(m3_backend *be, size_t bytes);
  void (*free_host)(m3_backend *be, void *p);

  /* Copies between host memory and backend memory. to_host waits for every op issued before it.
   * Either reports a failure of any earlier op (CUDA: the CUDA error string). */
  m3_status (*to_device)(m3_backend *be, void *dst, const void *src, size_t bytes);
  m3_status (*to_host)(m3_backend *be, void *dst, const void *src, size_t bytes);
  /* dst = src within backend memory (the KV cache's copy-on-write of a page), in issue order. */
  m3_status (*copy)(m3_backend *be, void *dst, const void *src, size_t bytes);
  /* bytes of backend memory at dst = 0, in issue order (a recorded step may hold it). */
  m3_status (*zero)(m3_backend *be, void *dst, size_t bytes);

  /* 1 when backend memory is not host memory (CUDA). 0 (CPU) lets host code read and write backend
   * memory in place, so callers keep no host mirrors and skip the transfers between them. */
  int device_memory;
  /* 1 when kv_store, msa_select and attention take fp8 KV views (m3_kv_dtype); a KV cache of that
   * dtype cannot be created on a backend with 0. */
  int kv_fp8;

  /* Makes a weight readable by the ops, once, at model load: the CUDA backend uploads data (and
   * scale) in their stored dtype and points t->data / t->scale at the device copies; the CPU
   * backend reads the host mapping and changes nothing. release_tensor frees what prepare_tensor
   * made (t is unusable afterwards). A tensor shared by two m3_tensor copies (tied lm_head) is
   * prepared and released once. */
  m3_status (*prepare_tensor)(m3_backend *be, m3_tensor *t);
  void (*release_tensor)(m3_backend *be, m3_tensor *t);

  /* out[t, :] = table row ids[t] decoded to float32.  ids [T], out [T, cols] */
  void (*embed)(m3_backend *be, const m3_tensor *table, const int32_t *ids, int T, float *out);

  /* y[T, W.rows] = x[T, W.cols] . W^T, float32 accumulation. */
  void (*matmul)(m3_backend *be, const m3_tensor *w, const float *x, int T, float *y);

  /* For each of the n (1..M3_MATMUL_SET_MAX) outputs: out[i].y = x . out[i].w^T, as matmul
   * computes it (the same values up to float32 summation order); every w has the same cols
   * (x [T, cols]); no y overlaps x or another y. One pass where the backend can (CUDA, one token:
   * a single launch over the rows of all weights of one decoding kind), so that the short
   * projections of a decode step (k, v, the index branch, the router) stop costing a launch each. */
  void (*matmul_set)(m3_backend *be, const float *x, int T, const m3_matmul_out *out, int n);

  /* Gemma RMSNorm over nrows rows of n: y = x / sqrt(mean(x^2) + eps) * (1 + w).  w [n].
   * x and y may alias. */
  void (*rmsnorm)(m3_backend *be, const float *x, const m3_tensor *w, float eps, int nrows, int n,
                  float *y);

  /* Partial NeoX RoPE in place. x [T, nheads, hd]; the first `rot` dims of each head rotate,
   * pairs (i, i + rot/2), inv_freq[i] = theta^(-2i/rot), angle = pos[t] * inv_freq[i] computed
   * in float32 as the reference does. */
  void (*rope)(m3_backend *be, float *x, const int32_t *pos, int T, int nheads, int hd, int rot,
               double theta);

  /* rmsnorm of every head vector followed by rope, in place, in one pass (the q, k and index
   * branches before attention): the same results as
   *   rmsnorm(x, w, eps, T * nheads, hd, x); rope(x, pos, T, nheads, hd, rot, theta)
   * x [T, nheads, hd]; w [hd]. */
  void (*rmsnorm_rope)(m3_backend *be, float *x, const m3_tensor *w, float eps,
                       const int32_t *pos, int T, int nheads, int hd, int rot, double theta);

  /* SwiGLU-OAI: g = min(gate, limit); u = clamp(up, -limit, limit);
   * out = g * sigmoid(alpha * g) * (u + beta).  gate, up, out [n]; out may alias gate. */
  void (*swiglu_oai)(m3_backend *be, const float *gate, const float *up, size_t n, float alpha,
                     float beta, float limit, float *out);

  /* x += y over n elements. */
  void (*add)(m3_backend *be, float *x, const float *y, size_t n);

  /* The residual add of a sub-block and the Gemma RMSNorm of the next one in one pass over the
   * rows: the same results as
   *   add(x, y, nrows * n); rmsnorm(x, w, eps, nrows, n, out)
   * x [nrows, n] (the residual stream, updated in place); y, out [nrows, n]; w [n]. out overlaps
   * neither x nor y. */
  void (*add_rmsnorm)(m3_backend *be, float *x, const float *y, const m3_tensor *w, float eps,
                      int nrows, int n, float *out);

  /* out_host[r] = the index of the largest of logits[r, 0..vocab), ties to the lower index: the
   * greedy pick of engine/sampler.c, NaN included (a NaN never wins, except at index 0, where that
   * scan starts and stays). logits [nrows, vocab] backend memory; out_host [nrows] host memory.
   * Waits for every op issued before it and reports their failures, as to_host does: greedy
   * decoding then moves nrows ids to the host instead of nrows * vocab logits. */
  m3_status (*argmax_rows)(m3_backend *be, const float *logits, int nrows, int vocab,
                           int32_t *out_host);

  /* argmax_rows of a slice of each row, columns [first, first + cols) of the whole row, as a
   * candidate for the whole row's pick (the vocabulary-split head: ranks exchange these instead of
   * their logits). pairs[r] = (score, first + i) as two floats: i the entry argmax_rows' order puts
   * first, score its value with NaN as -inf (a NaN never wins), except a NaN at whole-row index 0
   * (first + i == 0) as +inf (the scan starts and stays there). In that order (larger score, then
   * lower index) a row's best candidate over its slices is argmax_rows of the whole row
   * (m3_model_head_pick). logits [nrows, cols], pairs [nrows, 2] backend memory; first + cols
   * at most 2^24 (indices exact as float). In issue order, no host wait (a recorded step may
   * hold it). */
  void (*argmax_pairs)(m3_backend *be, const float *logits, int nrows, int cols, int first,
                       float *pairs);

  /* Sampling on the backend, or NULL (the CPU backend: the engine's sampler reads its rows where
   * they are). out_host[r] = m3_sampler_sample_unit(rows[r] as m3_sampling_params, rows[r].unit,
   * logits[r, 0..vocab)) with no logit bias and no penalties, for rows of finite or -inf logits;
   * up to summation order: where unit * total lands within rounding of a boundary between two
   * candidates' cumulative weights (or top_p * total of a top_p cut), the neighbour may be picked.
   * Temperature <= 0 (or no finite logit): the argmax as argmax_rows picks it. logits
   * [nrows, vocab] backend memory; rows, out_host [nrows] host memory. Waits and reports as
   * argmax_rows does. */
  m3_status (*sample_rows)(m3_backend *be, const float *logits, int nrows, int vocab,
                           const m3_row_sampling *rows, int32_t *out_host);

  /* Writes T new tokens (positions pos[t]) into the pages of kv.  k, v [T, nkv, hd];
   * ik [T, ihd] or NULL. An fp8 cache gets each K row rotated (m3_kv_rotate_key), then each row
   * of K, V and IK quantized: scale = amax / 448 (a row of zeros: scale 0, bytes 0; a row with a
   * NaN or infinity: scale NaN, bytes 0, so it reads back NaN), bytes = E4M3(value / scale)
   * rounded to nearest even, saturating at +-448. */
  void (*kv_store)(m3_backend *be, const m3_kv_view *kv, const int32_t *pos, int T, const float *k,
                   const float *v, const float *ik);

  /* The attention branches' per-head Gemma RMSNorm and partial NeoX RoPE fused with the store
   * of the keys: of r (m3_attention_rows), q, iq and the cache get what
   *   rmsnorm_rope(q, q_norm, eps, pos, T, nh, hd, rot, theta);     (when q is not NULL)
   *   rmsnorm_rope(iq, iq_norm, eps, pos, T, niq, ihd, rot, theta); (when iq is not NULL)
   *   rmsnorm_rope(k, k_norm, eps, pos, T, nkv, hd, rot, theta);
   *   rmsnorm_rope(ik, ik_norm, eps, pos, T, 1, ihd, rot, theta);   (when ik is not NULL)
   *   kv_store(kv, pos, T, k, v, ik)
   * leave, bit for bit, without the normed keys making a round trip through memory; on a device,
   * a decode step's few rows of all five take one launch. k and ik hold unspecified values
   * afterwards (a backend may norm them in place). Each of q, iq and ik is NULL together with
   * its norm (ik: full-attention layers); q and iq are normed whatever their positions, padding
   * (pos < 0) included, as rmsnorm_rope norms every row. */
  void (*kv_store_rope)(m3_backend *be, const m3_kv_view *kv, const int32_t *pos, int T, const m3_attention_rows *r);

  /* msa_select and attention read an fp8 cache as the float32 values E4M3(byte) * scale; attention
   * scores an fp8 cache's rotated keys against each query rotated the same way and times 1 / B
   * (m3_kv_rotate_key: an exact power of two), which gives dot(q, k) up to rounding.
   *
   * MSA block selection (shared/spec/msa_spec.md): for each token t (absolute position pos[t]) and
   * index head g: block scores = max over visible keys j <= pos[t] of dot(iq[t, g], IK[j]);
   * forced init/local blocks; top `topk` by score, ties to the lower block id.
   * iq [T, G, ihd]; sel [T, G, topk] gets block ids, -1 padded when fewer blocks are visible.
   * Order of valid ids: ascending block id. */
  void (*msa_select)(m3_backend *be, const float *iq, int G, const m3_kv_view *kv,
                     const int32_t *pos, int T, const m3_msa_params *p, int32_t *sel);

  /* Causal GQA attention of T query tokens against the cache (which already holds them).
   * q [T, nh, hd]; out [T, nh, hd]; scale = 1/sqrt(hd). Query head h uses KV head h / (nh/nkv).
   * sel NULL: all keys j <= pos[t]. Otherwise only keys in blocks sel[t, kvh, 0..topk) (-1 ends the
   * list) with j <= pos[t]. */
  void (*attention)(m3_backend *be, const float *q, int nh, const m3_kv_view *kv,
                    const int32_t *pos, int T, const int32_t *sel, int topk, float *out);

  /* MoE routing from fp32 router logits [T, E]: s = sigmoid(logits); choice = s + bias (bias may
   * be NULL); top-k of choice (ties to the lower expert id); weights = s[idx] / sum s[idx] *
   * scaling.  ids [T, k], weights [T, k]. */
  void (*moe_route)(m3_backend *be, const float *logits, const float *bias, int T, int E, int k,
                    float scaling, int32_t *ids, float *weights);

  /* Once per MoE layer at model load, after prepare_tensor of its expert tensors; release before
   * the tensors are released. */
  m3_status (*prepare_experts)(m3_backend *be, m3_moe_experts *ex);
  void (*release_experts)(m3_backend *be, m3_moe_experts *ex);

  /* The routed experts of T tokens, added onto the residual stream in choice order, then the
   * shared expert (when ex has one), unscaled:
   *   for j in 0..k: x[t, :] += weights[t, j] * down_e(SwiGLU_OAI(gate_e h[t], up_e h[t])),
   *   e = ids[t, j]
   *   x[t, :] += shared_down(SwiGLU_OAI(shared_gate h[t], shared_up h[t]))
   * (each sum rounded as the separate add after the routed sum would round it). Each expert
   * reads its weights once per call however many tokens chose it (the bytes a decode step must
   * read); no host synchronization on the CUDA backend at decode sizes.
   * h [T, H]; ids, weights [T, k] (moe_route's outputs); x [T, H]. */
  void (*moe_experts)(m3_backend *be, const m3_moe_experts *ex, const float *h, int T,
                      const int32_t *ids, const float *weights, int k, float *x);

  /* The vision tower's ops, or NULL when this backend cannot run the tower. */
  const m3_vision_ops *vision;

  /* Recorded runs of ops (CUDA graphs), or all NULL (the CPU backend): a decode step issues a few
   * hundred small ops, whose host-side launch costs rival their GPU time.
   * graph_begin: the ops issued next are recorded, not run, until graph_end. Only ops that neither
   * wait for the host (to_host, argmax_rows, moe_experts beyond decode sizes) nor allocate or
   * free memory (alloc, free, to_device) may be recorded.
   * graph_end: stops recording and makes *g launchable: a new graph when *g is NULL, else *g
   * updated in place to the new recording (re-made when the update is refused). A recording that
   * failed (a forbidden call, or an op that noted an error while recorded) is an error status and
   * leaves no pending error behind, so the caller can issue the same ops again directly; *g is
   * then freed and NULL. graph_begin fails, recording nothing, when an earlier op's failure is
   * pending (it surfaces at the next transfer).
   * graph_launch: runs *g's ops in issue order after the ops before it. A graph reads its ops'
   * arguments as they were when recorded (sizes, pointers, the kv views' fields) and the contents
   * of memory as they are when it runs.
   * graph_free: frees g (NULL is ignored); launches already issued still complete.
   * memory_epoch: a count the backend bumps whenever it replaces internal memory that ops use
   * (scratch grown on demand): a recording bakes those addresses in, so a graph recorded at another
   * epoch must not be launched. */
  m3_status (*graph_begin)(m3_backend *be);
  m3_status (*graph_end)(m3_backend *be, m3_graph **g);
  m3_status (*graph_launch)(m3_backend *be, m3_graph *g);
  void (*graph_free)(m3_backend *be, m3_graph *g);
  uint64_t (*memory_epoch)(m3_backend *be);

  /* Makes the calling thread's later ops go to this backend's device: for a thread other than the
   * one that created the backend (the engine's loop thread), since a CUDA thread issues to its
   * current GPU. NULL where every thread reaches the backend alike (the CPU). */
  m3_status (*bind_thread)(m3_backend *be);
} m3_backend_ops;

struct m3_backend {
  const m3_backend_ops *ops;
};

/* The portable CPU backend (SIMD kernels chosen at run time, a thread pool of `threads` workers;
 * 0 = one per core). */
m3_status m3_backend_cpu_create(int threads, m3_backend **out);

#ifdef M3_HAVE_CUDA
/* The CUDA backend on GPU `device` (src/backend/cuda). M3_ERR_UNSUPPORTED, naming the CUDA error,
 * when there is no such GPU or no driver. */
m3_status m3_backend_cuda_create(int device, m3_backend **out);
#endif

/* Wraps `inner` (which it then owns and destroys) so that each op is waited for and its time added
 * to a row per (op, weight name with layer numbers folded): where a phase's time goes, for
 * `m3 bench model --profile` (src/backend/profile.c). The waits serialize the ops; the rows say
 * which op dominates, not how long the phase takes unwrapped. */
m3_status m3_backend_profile_create(m3_backend *inner, m3_backend **out);
/* Prints the rows gathered since the last report, largest first, under `title`, and clears them. */
void m3_backend_profile_report(m3_backend *be, const char *title, FILE *f);
void m3_backend_profile_clear(m3_backend *be);

/* The backend a device name asks for: "cpu" (with `threads` workers, 0 = one per core), "cuda"
 * (GPU 0) or "cuda:N". M3_ERR_ARG for any other name; M3_ERR_UNSUPPORTED for cuda in a build
 * without the CUDA backend (src/backend/select.c). */
m3_status m3_backend_create(const char *device, int threads, m3_backend **out);

#endif
