/* The cache of recorded decode steps (src/model/step_graph.c) on the CPU: which host-side values
 * make a step's signature, the LRU order, and when a step runs directly, is recorded or replayed,
 * against a fake backend whose graph ops count what they are asked to do. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "model/step_graph.h"

enum { LAYERS = 3, SEGS = 2 };

/* ---- signatures ---- */

static int32_t tables[SEGS][8];
static float pools[SEGS][3][4];

static void make_views(m3_kv_view kv[SEGS][LAYERS], m3_segment segs[SEGS]) {
  for (int i = 0; i < SEGS; i++) {
    for (int l = 0; l < LAYERS; l++)
      kv[i][l] = (m3_kv_view){.k = pools[i][0], .v = pools[i][1], .ik = l == 1 ? pools[i][2] : NULL,
                              .block_table = tables[i], .num_blocks = 3 + i, .block_size = 4,
                              .nkv = 2, .hd = 16, .ihd = l == 1 ? 16 : 0, .dtype = M3_KV_F32};
    segs[i] = (m3_segment){.kv = kv[i], .first = i, .T = 1, .seq = i, .offset = 0};
  }
}

static float logits_a[2], logits_b[2]; /* two places the head may write */

/* Builds the signature of (epoch, T, segs, rows [2], head) into c and returns a copy. */
static uint64_t *signature(m3_step_graphs *c, uint64_t epoch, int T, const m3_segment *segs,
                           const int32_t *rows, const float *head, size_t *len) {
  CHECK_OK(m3_step_sig_build(c, epoch, T, segs, SEGS, LAYERS, rows, 2, head));
  *len = c->len;
  uint64_t *copy = malloc(c->len * sizeof *copy);
  memcpy(copy, c->sig, c->len * sizeof *copy);
  return copy;
}

static int same(const uint64_t *a, size_t na, const uint64_t *b, size_t nb) {
  return na == nb && memcmp(a, b, na * sizeof *a) == 0;
}

static void test_signature(void) {
  m3_step_graphs c = {0};
  m3_kv_view kv[SEGS][LAYERS];
  m3_segment segs[SEGS];
  const int32_t rows[2] = {0, 1}, other_rows[2] = {1, 0};
  make_views(kv, segs);
  size_t n0, n;
  uint64_t *base = signature(&c, 7, 2, segs, rows, logits_a, &n0);
  CHECK_EQ_INT(n0, 5 + 2 + SEGS * (2 + LAYERS * 10));
  CHECK(base[0] == 7 && base[1] == 2 && base[2] == SEGS && base[3] == 2);
  CHECK(base[4] == (uint64_t)(uintptr_t)logits_a && base[5] == 0 && base[6] == 1);
  /* segment 1, layer 1: first, T, then the views of layers 0 and 1 */
  const uint64_t *view = base + 7 + (2 + LAYERS * 10) + 2 + 10;
  CHECK(view[0] == (uint64_t)(uintptr_t)pools[1][0] && view[2] == (uint64_t)(uintptr_t)pools[1][2]);
  CHECK(view[3] == (uint64_t)(uintptr_t)tables[1] && view[4] == 4 && view[5] == 4);

  uint64_t *again = signature(&c, 7, 2, segs, rows, logits_a, &n);
  CHECK(same(base, n0, again, n));
  free(again);

  static const char *const changes[] = {"num_blocks", "block_table", "k pool", "dtype"};
  for (size_t i = 0; i < sizeof changes / sizeof changes[0]; i++) {
    m3_kv_view *v = &kv[1][2];
    const m3_kv_view keep = *v;
    if (i == 0) v->num_blocks++;
    if (i == 1) v->block_table = tables[0];
    if (i == 2) v->k = pools[0][0];
    if (i == 3) v->dtype = M3_KV_FP8;
    uint64_t *changed = signature(&c, 7, 2, segs, rows, logits_a, &n);
    if (same(base, n0, changed, n)) fprintf(stderr, "a change of %s kept the signature\n", changes[i]);
    CHECK(!same(base, n0, changed, n));
    free(changed);
    *v = keep;
  }
  uint64_t *epoch = signature(&c, 8, 2, segs, rows, logits_a, &n);
  CHECK(!same(base, n0, epoch, n));
  free(epoch);
  uint64_t *tokens = signature(&c, 7, 3, segs, rows, logits_a, &n);
  CHECK(!same(base, n0, tokens, n));
  free(tokens);
  uint64_t *picked = signature(&c, 7, 2, segs, other_rows, logits_a, &n);
  CHECK(!same(base, n0, picked, n));
  free(picked);
  segs[1].first = 2;
  uint64_t *moved = signature(&c, 7, 2, segs, rows, logits_a, &n);
  CHECK(!same(base, n0, moved, n));
  free(moved);
  segs[1].first = 1;
  uint64_t *elsewhere = signature(&c, 7, 2, segs, rows, logits_b, &n);
  CHECK(!same(base, n0, elsewhere, n));
  free(elsewhere);
  free(base);
  m3_step_graphs_clear(&c, NULL);
}

/* ---- LRU ---- */

/* A one-segment signature told apart by T. */
static void sig_of(m3_step_graphs *c, int T) {
  static m3_kv_view kv[LAYERS];
  const m3_segment seg = {.kv = kv, .first = 0, .T = T};
  CHECK_OK(m3_step_sig_build(c, 1, T, &seg, 1, LAYERS, NULL, 0, NULL));
}

static void test_lru(void) {
  m3_step_graphs c = {0};
  for (int T = 1; T <= M3_STEP_GRAPHS; T++) {
    sig_of(&c, T);
    CHECK(m3_step_graphs_find(&c) == NULL);
    CHECK(m3_step_graphs_insert(&c) != NULL);
  }
  for (int T = 1; T <= M3_STEP_GRAPHS; T++) {
    sig_of(&c, T);
    CHECK(m3_step_graphs_find(&c) != NULL);
  }
  /* Used order now 1..8; touch 1 and 2 again: 3 is the least recently used. */
  sig_of(&c, 1);
  CHECK(m3_step_graphs_find(&c) != NULL);
  sig_of(&c, 2);
  m3_step_graph *two = m3_step_graphs_find(&c);
  sig_of(&c, 100);
  m3_step_graph *fresh = m3_step_graphs_insert(&c);
  CHECK(fresh != NULL && fresh != two && fresh->state == M3_STEP_SEEN);
  sig_of(&c, 3);
  CHECK(m3_step_graphs_find(&c) == NULL);
  sig_of(&c, 100);
  CHECK(m3_step_graphs_find(&c) == fresh);
  /* Next out: 4, then 5. */
  sig_of(&c, 101);
  m3_step_graphs_insert(&c);
  sig_of(&c, 4);
  CHECK(m3_step_graphs_find(&c) == NULL);
  sig_of(&c, 5);
  CHECK(m3_step_graphs_find(&c) != NULL);
  sig_of(&c, 1);
  CHECK(m3_step_graphs_find(&c) != NULL);
  m3_step_graphs_clear(&c, NULL);
}

/* ---- the policy, against a fake backend ---- */

struct m3_graph {
  int id;
};

typedef struct {
  m3_backend base;
  m3_backend_ops ops;
  int capturing;
  uint64_t epoch;
  int fail_end, begins, ends, updates, launches, live, next_id;
  int last_launched;
} fake_backend;

static fake_backend *fake_of(m3_backend *be) { return (fake_backend *)be; }

static m3_status fake_begin(m3_backend *be) {
  fake_of(be)->capturing = 1;
  fake_of(be)->begins++;
  return M3_OK;
}

static m3_status fake_end(m3_backend *be, m3_graph **g) {
  fake_backend *f = fake_of(be);
  f->capturing = 0;
  f->ends++;
  if (f->fail_end) {
    if (*g) f->live--;
    free(*g);
    *g = NULL;
    return m3_fail(M3_ERR_IO, "fake: recording failed");
  }
  if (*g) {
    f->updates++;
  } else {
    *g = malloc(sizeof **g);
    f->live++;
  }
  (*g)->id = ++f->next_id;
  return M3_OK;
}

static m3_status fake_launch(m3_backend *be, m3_graph *g) {
  fake_of(be)->launches++;
  fake_of(be)->last_launched = g->id;
  return M3_OK;
}

static void fake_free(m3_backend *be, m3_graph *g) {
  if (g) fake_of(be)->live--;
  free(g);
}

static uint64_t fake_epoch(m3_backend *be) { return fake_of(be)->epoch; }

/* The ops of a step: counts its direct runs and recordings; grows the scratch when asked. */
typedef struct {
  int direct, recorded, grow;
} region_log;

static m3_status region(m3_model *m, void *ctx) {
  region_log *log = ctx;
  fake_backend *f = fake_of(m->be);
  if (f->capturing) log->recorded++;
  else log->direct++;
  if (log->grow && !f->capturing) {
    f->epoch++;
    log->grow = 0;
  }
  return M3_OK;
}

/* One step of signature T at the backend's epoch. */
static void run_step(m3_step_graphs *c, m3_model *m, int T, region_log *log) {
  static m3_kv_view kv[LAYERS];
  const m3_segment seg = {.kv = kv, .first = 0, .T = T};
  CHECK_OK(m3_step_sig_build(c, m->be->ops->memory_epoch(m->be), T, &seg, 1, LAYERS, NULL, 0,
                             NULL));
  CHECK_OK(m3_step_graphs_run(c, m, region, log));
}

static void test_policy(void) {
  fake_backend f;
  memset(&f, 0, sizeof f);
  f.ops.graph_begin = fake_begin;
  f.ops.graph_end = fake_end;
  f.ops.graph_launch = fake_launch;
  f.ops.graph_free = fake_free;
  f.ops.memory_epoch = fake_epoch;
  f.base.ops = &f.ops;
  f.epoch = 5;
  m3_model *m = calloc(1, sizeof *m);
  m->be = &f.base;
  m3_step_graphs c = {0};
  region_log log = {0};

  /* First sight: direct, and it grows the scratch; the second sight (at the new epoch) records
   * and launches; the third replays without issuing any op. */
  log.grow = 1;
  run_step(&c, m, 1, &log);
  CHECK(log.direct == 1 && log.recorded == 0 && f.begins == 0 && f.launches == 0);
  CHECK(f.epoch == 6);
  run_step(&c, m, 1, &log);
  CHECK(log.direct == 1 && log.recorded == 1 && f.begins == 1 && f.ends == 1 && f.launches == 1);
  const int recorded_id = f.last_launched;
  run_step(&c, m, 1, &log);
  run_step(&c, m, 1, &log);
  CHECK(log.direct == 1 && log.recorded == 1 && f.launches == 3 && f.last_launched == recorded_id);
  CHECK(c.stats.direct == 1 && c.stats.recorded == 1 && c.stats.replayed == 2);

  /* Scratch moved elsewhere: the recording is never launched again; the step runs directly once
   * at the new epoch, then is recorded anew. */
  f.epoch++;
  run_step(&c, m, 1, &log);
  CHECK(log.direct == 2 && f.launches == 3);
  run_step(&c, m, 1, &log);
  CHECK(log.recorded == 2 && f.launches == 4 && f.last_launched != recorded_id);

  /* A recording that fails: the step runs directly right after, and that signature is never
   * recorded again. */
  f.fail_end = 1;
  run_step(&c, m, 2, &log);
  run_step(&c, m, 2, &log);
  CHECK(log.recorded == 3 && log.direct == 4 && f.begins == 3);
  f.fail_end = 0;
  run_step(&c, m, 2, &log);
  CHECK(log.recorded == 3 && log.direct == 5 && f.begins == 3 && f.launches == 4);

  /* With every slot taken, a new signature takes the least recently used one, whose recording
   * graph_end then updates in place instead of making a new graph. */
  for (int T = 3; T < 3 + M3_STEP_GRAPHS; T++) {
    run_step(&c, m, T, &log);
    run_step(&c, m, T, &log);
  }
  const int live = f.live, updates = f.updates;
  CHECK(updates > 0);
  run_step(&c, m, 50, &log);
  run_step(&c, m, 50, &log);
  CHECK(f.updates == updates + 1 && f.live == live);
  run_step(&c, m, 50, &log);
  CHECK(c.stats.replayed == 3);

  m3_step_graphs_clear(&c, m->be);
  CHECK_EQ_INT(f.live, 0);
  free(m);
}

int main(void) {
  test_signature();
  test_lru();
  test_policy();
  return check_summary();
}
