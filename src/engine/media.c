/* media.c: m3.h's images and videos: pre-processing for the loaded model's vision tower, the
 * placeholder expansion of a prompt (m3_vision_chat_spec.md §2.6, §3.4), and requests that carry
 * media: the tower runs on the engine thread when the request is admitted, and its rows replace
 * the placeholder embeddings while the prompt is prefilled. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine_internal.h"
#include "media/media.h"

struct m3_media {
  m3_patches p;
  int merge; /* spatial merge size of the model it was made for */
};

/* What a request keeps: copies of its items' pixels until the tower has run, then the rows. */
struct m3_request_media {
  m3_vision_input *items;  /* [n_items], pixels owned */
  int n_items;
  float *rows;             /* [n_rows, hidden] once encoded, else NULL */
  int n_rows;
};

static m3_status vision_geometry(const m3_engine *e, int video, m3_media_geometry *g) {
  const m3_config *c = m3_model_config(e->model);
  if (!c->vision.present)
    return m3_fail(M3_ERR_UNSUPPORTED, "%s has no vision tower: images and videos are not "
                   "accepted", e->name);
  const int p = c->vision.patch_size, tp = c->vision.temporal_patch_size;
  const int merge = c->vision.spatial_merge_size;
  *g = video ? m3_media_video_geometry(p, tp, merge) : m3_media_image_geometry(p, tp, merge);
  return M3_OK;
}

static m3_status wrap(m3_patches *p, const m3_media_geometry *g, m3_media **out) {
  if (!(*out = malloc(sizeof **out))) {
    m3_patches_free(p);
    return m3_fail(M3_ERR_NOMEM, "media: out of memory");
  }
  (*out)->p = *p;
  (*out)->merge = g->merge_size;
  return M3_OK;
}

m3_status m3_media_image(const m3_engine *e, const void *data, size_t len, const char *label,
                         m3_media **out) {
  *out = NULL;
  m3_media_geometry g;
  m3_patches p;
  m3_status st = vision_geometry(e, 0, &g);
  if (st == M3_OK) st = m3_image_preprocess(data, len, label, &g, &p);
  return st == M3_OK ? wrap(&p, &g, out) : st;
}

m3_status m3_media_video(const m3_engine *e, const char *path, m3_media **out) {
  *out = NULL;
  m3_media_geometry g;
  m3_patches p;
  /* vLLM's defaults: one frame per second, at most 768 frames (spec §1.3). */
  m3_status st = vision_geometry(e, 1, &g);
  if (st == M3_OK) st = m3_video_preprocess(path, 1.0, 768, &g, &p);
  return st == M3_OK ? wrap(&p, &g, out) : st;
}

void m3_media_free(m3_media *m) {
  if (!m) return;
  m3_patches_free(&m->p);
  free(m);
}

int m3_media_tokens(const m3_media *m) { return m3_patches_tokens(&m->p, m->merge); }

/* The single id `text` tokenizes to (a special marker), or a failure naming it. */
static m3_status marker_id(const m3_engine *e, const char *text, int32_t *id) {
  int32_t *ids = NULL;
  int n = 0;
  m3_status st = m3_tokenize(e, text, strlen(text), 1, &ids, &n);
  if (st == M3_OK && n != 1)
    st = m3_fail(M3_ERR_UNSUPPORTED, "media: the tokenizer has no single token for %s", text);
  if (st == M3_OK) *id = ids[0];
  free(ids);
  return st;
}

typedef struct {
  int32_t *at;
  int n, cap;
} id_buf;

static m3_status push(id_buf *b, const int32_t *ids, int n) {
  if (b->n + n > b->cap) {
    int cap = (b->n + n) * 2;
    int32_t *grown = realloc(b->at, (size_t)cap * sizeof *grown);
    if (!grown) return m3_fail(M3_ERR_NOMEM, "media: prompt of %d ids", b->n + n);
    b->at = grown;
    b->cap = cap;
  }
  memcpy(b->at + b->n, ids, (size_t)n * sizeof *ids);
  b->n += n;
  return M3_OK;
}

static m3_status push_run(id_buf *b, int32_t start, int32_t id, int count, int32_t end) {
  m3_status st = push(b, &start, 1);
  for (int i = 0; i < count && st == M3_OK; i++) st = push(b, &id, 1);
  return st == M3_OK ? push(b, &end, 1) : st;
}

/* Video, per temporal patch: "]<]<t> seconds[>[" as text, then the marked run (spec §3.4). */
static m3_status push_video(const m3_engine *e, id_buf *b, const m3_media *m, int32_t start,
                            int32_t id, int32_t end) {
  const m3_patches *p = &m->p;
  const int per_t = m3_media_tokens(m) / p->grid_t;
  m3_status st = M3_OK;
  for (int k = 0; k < p->grid_t && st == M3_OK; k++) {
    char text[64];
    snprintf(text, sizeof text, "]<]%.1f seconds[>[", p->timestamps ? p->timestamps[k] : 0.0);
    int32_t *ids = NULL;
    int n = 0;
    if ((st = m3_tokenize(e, text, strlen(text), 0, &ids, &n)) == M3_OK) st = push(b, ids, n);
    free(ids);
    if (st == M3_OK) st = push_run(b, start, id, per_t, end);
  }
  return st;
}

m3_status m3_media_expand(const m3_engine *e, const int32_t *ids, int n, m3_media *const *media,
                          int n_media, int32_t **out, int *n_out) {
  *out = NULL;
  *n_out = 0;
  const m3_config *c = m3_model_config(e->model);
  int32_t start = 0, end = 0;
  m3_status st = marker_id(e, "]<]start of image[>[", &start);
  if (st == M3_OK) st = marker_id(e, "]<]end of image[>[", &end);
  if (st != M3_OK) return st;
  id_buf b = {0};
  int k = 0;
  for (int i = 0; i < n && st == M3_OK; i++) {
    const int image = ids[i] == c->image_token_id, video = ids[i] == c->video_token_id;
    if (!image && !video) {
      st = push(&b, &ids[i], 1);
      continue;
    }
    if (k >= n_media) {
      st = m3_fail(M3_ERR_ARG, "media: the prompt has more image/video placeholders than the %d "
                   "items given", n_media);
    } else if (media[k]->p.is_video != video) {
      st = m3_fail(M3_ERR_ARG, "media: placeholder %d is an %s, item %d a%s", k,
                   video ? "video" : "image", k, media[k]->p.is_video ? " video" : "n image");
    } else {
      st = video ? push_video(e, &b, media[k], start, ids[i], end)
                 : push_run(&b, start, ids[i], m3_media_tokens(media[k]), end);
      k++;
    }
  }
  if (st == M3_OK && k != n_media)
    st = m3_fail(M3_ERR_ARG, "media: %d items given but the prompt has %d placeholders", n_media, k);
  if (st != M3_OK) {
    free(b.at);
    return st;
  }
  *out = b.at;
  *n_out = b.n;
  return M3_OK;
}

void m3_request_media_free(m3_request_media *rm) {
  if (!rm) return;
  for (int i = 0; i < rm->n_items; i++) free((void *)rm->items[i].pixels);
  free(rm->items);
  free(rm->rows);
  free(rm);
}

m3_status m3_submit_media(m3_engine *e, const int32_t *prompt, int n_prompt,
                          m3_media *const *media, int n_media, const m3_sampling_params *params,
                          m3_token_callback cb, void *user, uint64_t *request_id) {
  if (request_id) *request_id = 0;
  if (n_media <= 0) return m3_submit(e, prompt, n_prompt, params, cb, user, request_id);
  const m3_config *c = m3_model_config(e->model);
  int placeholders = 0, rows = 0;
  for (int i = 0; prompt && i < n_prompt; i++)
    placeholders += prompt[i] == c->image_token_id || prompt[i] == c->video_token_id;
  for (int i = 0; i < n_media; i++) rows += m3_media_tokens(media[i]);
  if (placeholders != rows)
    return m3_fail(M3_ERR_ARG, "submit: the prompt has %d image/video placeholder ids, the %d "
                   "items need %d (expand it with m3_media_expand)", placeholders, n_media, rows);
  m3_request_media *rm = calloc(1, sizeof *rm);
  if (rm) rm->items = calloc((size_t)n_media, sizeof *rm->items);
  m3_status st = rm && rm->items ? M3_OK : m3_fail(M3_ERR_NOMEM, "submit: media");
  for (int i = 0; i < n_media && st == M3_OK; i++, rm->n_items++) {
    const m3_patches *p = &media[i]->p;
    const size_t bytes = (size_t)p->rows * p->row_len * sizeof(float);
    float *copy = malloc(bytes);
    if (!copy) {
      st = m3_fail(M3_ERR_NOMEM, "submit: %zu bytes of pixels", bytes);
      break;
    }
    memcpy(copy, p->pixels, bytes);
    rm->items[i] = (m3_vision_input){copy, p->grid_t, p->grid_h, p->grid_w};
  }
  rm = st == M3_OK ? rm : (m3_request_media_free(rm), NULL);
  if (st == M3_OK) rm->n_rows = rows;
  if (st == M3_OK && (st = m3_submit_with(e, prompt, n_prompt, rm, params, cb, user, request_id)) != M3_OK)
    m3_request_media_free(rm);
  return st;
}

m3_status m3_request_media_encode(m3_engine *e, m3_request *r) {
  m3_request_media *rm = r->media;
  if (!rm || rm->rows) return M3_OK;
  const size_t H = (size_t)m3_model_config(e->model)->hidden_size;
  float *rows = malloc((size_t)rm->n_rows * H * sizeof *rows);
  if (!rows) return m3_fail(M3_ERR_NOMEM, "vision: %d embedding rows", rm->n_rows);
  m3_status st = M3_OK;
  for (int i = 0, at = 0; i < rm->n_items && st == M3_OK; i++) {
    st = m3_model_encode_vision(e->model, &rm->items[i], rows + (size_t)at * H);
    at += m3_model_vision_tokens(e->model, &rm->items[i]);
  }
  if (st != M3_OK) {
    free(rows);
    return st;
  }
  /* The pixels are not needed again: a preempted request recomputes from the rows. */
  for (int i = 0; i < rm->n_items; i++) {
    free((void *)rm->items[i].pixels);
    rm->items[i].pixels = NULL;
  }
  rm->rows = rows;
  return M3_OK;
}

void m3_request_media_batch(const m3_engine *e, const m3_seq *s, m3_model_seq *entry) {
  const m3_request_media *rm = s->req->media;
  if (!rm || !rm->rows || s->n_computed >= s->req->n_prompt) return;
  const m3_config *c = m3_model_config(e->model);
  int before = 0;
  for (int i = 0; i < s->n_computed; i++)
    before += s->tokens[i] == c->image_token_id || s->tokens[i] == c->video_token_id;
  entry->media = rm->rows;
  entry->n_media = rm->n_rows;
  entry->media_first = before;
}
