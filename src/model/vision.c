/* vision.c: the vision tower, projector and 2x2 patch merger (m3_vision_chat_spec.md §4), and the
 * splice of their output into a step's embeddings (§4.8).
 *
 * Per segment (an image, or at most vision_segment_max_frames temporal patches of a video), with
 * N patches, D tower width, P projector width, H text hidden:
 *   X = LN_pre(pixels . W_pe^T)                                   [N, D]
 *   32x: X += out(attn(rope3d(q(LN1 X)), rope3d(k(LN1 X)), v(LN1 X)))
 *        X += fc2(gelu(fc1(LN2 X)))
 *   Y = lin2(gelu(lin1 X))                                        [N, H]   projector
 *   Z = merge2(gelu(merge1(Y viewed [N/4, 4H])))                  [N/4, H] patch merger
 * Every row of the computation except attention is independent, so each segment runs through the
 * whole tower on its own. */
#include <stdlib.h>
#include <string.h>

#include "model/layers.h"
#include "model/vision.h"

int m3_model_vision_tokens(const m3_model *m, const m3_vision_input *in) {
  const int merge = m->cfg.vision.spatial_merge_size;
  return in->grid_t * in->grid_h * in->grid_w / (merge * merge);
}

/* Per-axis rotary width (spec §4.3, vLLM/sglang): the largest even width with three axes fitting
 * in the head's rotated half pairs; 26 for head_dim 80. */
static int rope_axis_dim(int head_dim) { return 2 * ((2 * (head_dim / 2) / 3) / 2); }

/* Activations of one segment of N patches, in backend memory. */
typedef struct {
  float *pix, *x, *h, *q, *k, *v, *att, *o, *mlp, *proj, *merged, *out;
  int32_t *pos;
} tower_bufs;

static void free_bufs(m3_backend *be, tower_bufs *b) {
  void *all[] = {b->pix, b->x, b->h, b->q, b->k, b->v, b->att, b->o, b->mlp, b->proj, b->merged,
                 b->out, b->pos};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
    if (all[i]) be->ops->free(be, all[i]);
}

static m3_status alloc_bufs(m3_model *m, int N, tower_bufs *b) {
  const m3_vision_config *vc = &m->cfg.vision;
  const m3_vision_weights *w = &m->w.vision;
  const size_t n = (size_t)N, D = (size_t)vc->hidden_size, I = (size_t)vc->intermediate_size;
  const size_t P = (size_t)w->proj1_w.rows, H = (size_t)m->cfg.hidden_size;
  const size_t row_len = (size_t)w->patch_embed.cols, merge = (size_t)vc->spatial_merge_size;
  const size_t wide = P > H ? P : H, groups = n / (merge * merge);
  struct {
    void **p;
    size_t bytes;
  } want[] = {
      {(void **)&b->pix, n * row_len * 4}, {(void **)&b->x, n * D * 4},
      {(void **)&b->h, n * D * 4},         {(void **)&b->q, n * D * 4},
      {(void **)&b->k, n * D * 4},         {(void **)&b->v, n * D * 4},
      {(void **)&b->att, n * D * 4},       {(void **)&b->o, n * D * 4},
      {(void **)&b->mlp, n * (I > wide ? I : wide) * 4},
      {(void **)&b->proj, n * H * 4},      {(void **)&b->merged, groups * P * 4},
      {(void **)&b->out, groups * H * 4},  {(void **)&b->pos, n * 3 * 4},
  };
  for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
    if (!(*want[i].p = m->be->ops->alloc(m->be, want[i].bytes)))
      return m3_fail(M3_ERR_NOMEM, "vision: %zu bytes of activations for %d patches", want[i].bytes,
                     N);
  return M3_OK;
}

/* y = x . W^T + b */
static void linear(m3_backend *be, const m3_tensor *w, const m3_tensor *bias, const float *x, int T,
                   float *y) {
  be->ops->matmul(be, w, x, T, y);
  be->ops->vision->add_bias(be, y, bias, T, (int)w->rows);
}

static void encoder_layer(m3_model *m, const m3_vision_layer_weights *L, tower_bufs *b, int N) {
  const m3_vision_config *vc = &m->cfg.vision;
  m3_backend *be = m->be;
  const m3_vision_ops *vo = be->ops->vision;
  const int D = vc->hidden_size, nh = vc->num_heads, hd = D / nh;
  const size_t nD = (size_t)N * D;
  vo->layernorm(be, b->x, &L->ln1_w, &L->ln1_b, vc->layer_norm_eps, N, D, b->h);
  linear(be, &L->q_w, &L->q_b, b->h, N, b->q);
  linear(be, &L->k_w, &L->k_b, b->h, N, b->k);
  linear(be, &L->v_w, &L->v_b, b->h, N, b->v);
  vo->rope_3d(be, b->q, b->pos, N, nh, hd, rope_axis_dim(hd), vc->rope_theta);
  vo->rope_3d(be, b->k, b->pos, N, nh, hd, rope_axis_dim(hd), vc->rope_theta);
  vo->attention_full(be, b->q, b->k, b->v, N, nh, hd, b->att);
  linear(be, &L->out_w, &L->out_b, b->att, N, b->o);
  be->ops->add(be, b->x, b->o, nD);
  vo->layernorm(be, b->x, &L->ln2_w, &L->ln2_b, vc->layer_norm_eps, N, D, b->h);
  linear(be, &L->fc1_w, &L->fc1_b, b->h, N, b->mlp);
  vo->gelu(be, b->mlp, (size_t)N * vc->intermediate_size);
  linear(be, &L->fc2_w, &L->fc2_b, b->mlp, N, b->o);
  be->ops->add(be, b->x, b->o, nD);
}

/* (t, y, x) of each patch row in merge-window order (spec §2.5), t counted within the segment. */
static void fill_positions(int seg_t, int gh, int gw, int merge, int32_t *pos) {
  for (int t = 0; t < seg_t; t++)
    for (int bh = 0; bh < gh / merge; bh++)
      for (int bw = 0; bw < gw / merge; bw++)
        for (int dy = 0; dy < merge; dy++)
          for (int dx = 0; dx < merge; dx++) {
            *pos++ = t;
            *pos++ = bh * merge + dy;
            *pos++ = bw * merge + dx;
          }
}

/* One segment: pixels [N, row_len] host -> out [N / merge^2, H] host. */
static m3_status encode_segment(m3_model *m, const float *pixels, int seg_t, int gh, int gw,
                                float *out) {
  const m3_vision_config *vc = &m->cfg.vision;
  const m3_vision_weights *w = &m->w.vision;
  m3_backend *be = m->be;
  const m3_vision_ops *vo = be->ops->vision;
  const int merge = vc->spatial_merge_size, N = seg_t * gh * gw, groups = N / (merge * merge);
  const int D = vc->hidden_size, H = m->cfg.hidden_size;
  tower_bufs b = {0};
  int32_t *pos = malloc((size_t)N * 3 * sizeof *pos);
  m3_status st = pos ? alloc_bufs(m, N, &b) : m3_fail(M3_ERR_NOMEM, "vision: %d positions", N);
  if (st == M3_OK) {
    fill_positions(seg_t, gh, gw, merge, pos);
    st = be->ops->to_device(be, b.pos, pos, (size_t)N * 3 * sizeof *pos);
  }
  if (st == M3_OK)
    st = be->ops->to_device(be, b.pix, pixels, (size_t)N * (size_t)w->patch_embed.cols * sizeof(float));
  if (st == M3_OK) {
    /* The Conv3d with kernel = stride over one flattened window is a matmul (spec §4.1). */
    be->ops->matmul(be, &w->patch_embed, b.pix, N, b.h);
    vo->layernorm(be, b.h, &w->pre_ln_w, &w->pre_ln_b, vc->layer_norm_eps, N, D, b.x);
    for (int l = 0; l < vc->num_layers; l++) encoder_layer(m, &w->layers[l], &b, N);
    linear(be, &w->proj1_w, &w->proj1_b, b.x, N, b.mlp);
    vo->gelu(be, b.mlp, (size_t)N * w->proj1_w.rows);
    linear(be, &w->proj2_w, &w->proj2_b, b.mlp, N, b.proj);
    /* Rows 4g..4g+3 are merge window g: [N, H] read as [N/4, 4H] is the concatenation. */
    linear(be, &w->merge1_w, &w->merge1_b, b.proj, groups, b.merged);
    vo->gelu(be, b.merged, (size_t)groups * w->merge1_w.rows);
    linear(be, &w->merge2_w, &w->merge2_b, b.merged, groups, b.out);
    st = be->ops->to_host(be, out, b.out, (size_t)groups * H * sizeof(float));
  }
  free_bufs(be, &b);
  free(pos);
  return st;
}

m3_status m3_model_encode_vision(m3_model *m, const m3_vision_input *in, float *out) {
  const m3_vision_config *vc = &m->cfg.vision;
  if (!m->w.vision.present)
    return m3_fail(M3_ERR_UNSUPPORTED, "model: the checkpoint has no vision tower");
  if (!m->be->ops->vision)
    return m3_fail(M3_ERR_UNSUPPORTED, "vision on %s: the backend has no vision-tower ops",
                   m->be->ops->name);
  const int merge = vc->spatial_merge_size;
  if (in->grid_t <= 0 || in->grid_h <= 0 || in->grid_w <= 0 || in->grid_h % merge != 0 ||
      in->grid_w % merge != 0)
    return m3_fail(M3_ERR_ARG, "vision: grid %dx%dx%d (height and width must be positive "
                   "multiples of %d)", in->grid_t, in->grid_h, in->grid_w, merge);
  const int seg_max = vc->segment_max_frames > 0 ? vc->segment_max_frames : in->grid_t;
  const size_t patch_floats = (size_t)in->grid_h * in->grid_w * (size_t)m->w.vision.patch_embed.cols;
  const size_t tokens_per_t = (size_t)in->grid_h * in->grid_w / (size_t)(merge * merge);
  m3_status st = M3_OK;
  for (int t0 = 0; t0 < in->grid_t && st == M3_OK; t0 += seg_max) {
    int seg_t = in->grid_t - t0 < seg_max ? in->grid_t - t0 : seg_max;
    st = encode_segment(m, in->pixels + (size_t)t0 * patch_floats, seg_t, in->grid_h, in->grid_w,
                        out + (size_t)t0 * tokens_per_t * m->cfg.hidden_size);
  }
  return st;
}

static int is_placeholder(const m3_config *c, int32_t id) {
  return id == c->image_token_id || id == c->video_token_id;
}

m3_status m3_vision_splice(m3_model *m, const m3_segment *segs, int n_segs,
                           const m3_model_seq *seqs) {
  const m3_config *c = &m->cfg;
  const size_t H = (size_t)c->hidden_size;
  m3_status st = M3_OK;
  for (int i = 0; i < n_segs && st == M3_OK; i++) {
    const m3_model_seq *q = &seqs[segs[i].seq];
    if (!q->media) continue;
    /* Placeholders of the sequence's earlier steps took the rows before this segment's. */
    int row = q->media_first;
    for (int j = 0; j < segs[i].offset; j++) row += is_placeholder(c, q->ids[j]);
    for (int j = 0; j < segs[i].T && st == M3_OK; j++) {
      if (!is_placeholder(c, q->ids[segs[i].offset + j])) continue;
      if (row < q->n_media)
        st = m->be->ops->to_device(m->be, m->s.x + (size_t)(segs[i].first + j) * H,
                                   q->media + (size_t)row * H, H * sizeof(float));
      row++;
    }
  }
  return st;
}
