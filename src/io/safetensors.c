/* safetensors.c: the safetensors reader (mmap, validated header, shard sets) and writer.
 *
 * One m3_safetensors holds every tensor of every shard in one array, a hash table over the names
 * (index + 1 per slot, 0 = empty, linear probing) and one read-only mapping per shard. The file
 * descriptor is closed right after mmap: the mapping keeps the pages, and a 100-shard checkpoint
 * must not hold 100 descriptors. */
#include "io/safetensors.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* The limit the reference implementation (safetensors' MAX_HEADER_SIZE) uses. */
#define ST_MAX_HEADER 100000000ull
/* JSON numbers are doubles: integers past 2^53 are not exact, so they cannot be trusted. */
#define ST_MAX_JSON_INT 9007199254740992.0
#define ST_INDEX_NAME "model.safetensors.index.json"
#define ST_SUFFIX ".safetensors"

typedef struct {
  void *addr; /* NULL for m3_st_parse, which maps nothing */
  size_t size;
  char *path;
} st_shard;

struct m3_safetensors {
  m3_st_tensor *tensors;
  int count, tensor_cap;
  uint32_t *slots; /* tensor index + 1; 0 = empty */
  size_t slot_cap; /* power of two, at least twice the tensor count */
  st_shard *shards;
  int shard_count, shard_cap;
  cJSON *metadata; /* __metadata__ of shard 0, detached from its header */
};

/* ---- the tensor table ---- */

static uint64_t name_hash(const char *s) {
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
  return h;
}

/* The slot holding `name`, or the empty slot where it would go. */
static size_t slot_of(const m3_safetensors *st, const char *name) {
  size_t mask = st->slot_cap - 1;
  size_t i = (size_t)name_hash(name) & mask;
  while (st->slots[i] && strcmp(st->tensors[st->slots[i] - 1].name, name) != 0) i = (i + 1) & mask;
  return i;
}

/* Makes room for `extra` more tensors in the array and the hash table. */
static m3_status reserve_tensors(m3_safetensors *st, const char *label, int extra) {
  if (extra > 0x3fffffff - st->count) return m3_fail(M3_ERR_LIMIT, "%s: too many tensors", label);
  int need = st->count + extra;
  if (need > st->tensor_cap) {
    m3_st_tensor *t = realloc(st->tensors, (size_t)need * sizeof *t);
    if (!t) return m3_fail(M3_ERR_NOMEM, "%s: out of memory for %d tensors", label, need);
    st->tensors = t;
    st->tensor_cap = need;
  }
  size_t cap = st->slot_cap ? st->slot_cap : 16;
  while (cap < 2 * (size_t)need) cap *= 2;
  if (cap == st->slot_cap) return M3_OK;
  uint32_t *slots = calloc(cap, sizeof *slots);
  if (!slots)
    return m3_fail(M3_ERR_NOMEM, "%s: out of memory for a %zu-slot tensor table", label, cap);
  free(st->slots);
  st->slots = slots;
  st->slot_cap = cap;
  for (int i = 0; i < st->count; i++) st->slots[slot_of(st, st->tensors[i].name)] = (uint32_t)i + 1;
  return M3_OK;
}

static m3_status add_shard(m3_safetensors *st, const char *path) {
  if (st->shard_count == st->shard_cap) {
    int cap = st->shard_cap ? 2 * st->shard_cap : 4;
    st_shard *s = realloc(st->shards, (size_t)cap * sizeof *s);
    if (!s) return m3_fail(M3_ERR_NOMEM, "%s: out of memory", path);
    st->shards = s;
    st->shard_cap = cap;
  }
  st_shard *s = &st->shards[st->shard_count];
  *s = (st_shard){.path = strdup(path)};
  if (!s->path) return m3_fail(M3_ERR_NOMEM, "%s: out of memory", path);
  st->shard_count++;
  return M3_OK;
}

/* ---- header validation ---- */

/* A JSON number that is an exact non-negative integer. */
static int json_uint(const cJSON *v, uint64_t *out) {
  if (!cJSON_IsNumber(v)) return 0;
  double d = v->valuedouble;
  if (!(d >= 0 && d <= ST_MAX_JSON_INT) || d != floor(d)) return 0;
  *out = (uint64_t)d;
  return 1;
}

/* Validates one header entry and fills *t (all but name, data and shard); `data_size` bounds the
 * offsets, *begin receives the first one. */
static m3_status parse_entry(const char *label, const cJSON *e, size_t data_size, m3_st_tensor *t,
                             uint64_t *begin) {
  const char *name = e->string;
  if (!cJSON_IsObject(e))
    return m3_fail(M3_ERR_FORMAT, "%s: tensor '%s': entry is not an object", label, name);

  const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(e, "dtype");
  if (!cJSON_IsString(dtype))
    return m3_fail(M3_ERR_FORMAT, "%s: tensor '%s': missing \"dtype\" string", label, name);
  if (m3_dtype_parse(dtype->valuestring, &t->dtype) != 0)
    return m3_fail(M3_ERR_FORMAT, "%s: tensor '%s': unknown dtype '%s'", label, name,
                   dtype->valuestring);

  const cJSON *shape = cJSON_GetObjectItemCaseSensitive(e, "shape");
  if (!cJSON_IsArray(shape))
    return m3_fail(M3_ERR_FORMAT, "%s: tensor '%s': missing \"shape\" list", label, name);
  int ndim = cJSON_GetArraySize(shape);
  if (ndim > M3_MAX_DIMS)
    return m3_fail(M3_ERR_FORMAT, "%s: tensor '%s': %d dimensions, at most %d supported", label,
                   name, ndim, M3_MAX_DIMS);
  /* numel overflows if any partial product does, as in the reference implementation. */
  uint64_t numel = 1;
  int d = 0;
  for (const cJSON *dim = shape->child; dim; dim = dim->next, d++) {
    uint64_t n;
    if (!json_uint(dim, &n))
      return m3_fail(M3_ERR_FORMAT, "%s: tensor '%s': shape[%d] is not a non-negative integer",
                     label, name, d);
    if (n != 0 && numel > UINT64_MAX / n)
      return m3_fail(M3_ERR_FORMAT, "%s: tensor '%s': element count overflows", label, name);
    numel *= n;
    t->shape[d] = (int64_t)n;
  }
  t->ndim = ndim;
  size_t esize = m3_dtype_size(t->dtype);
  if (numel > UINT64_MAX / esize)
    return m3_fail(M3_ERR_FORMAT, "%s: tensor '%s': byte size overflows", label, name);
  uint64_t nbytes = numel * esize;

  const cJSON *offsets = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
  uint64_t b, end;
  if (!cJSON_IsArray(offsets) || cJSON_GetArraySize(offsets) != 2 ||
      !json_uint(offsets->child, &b) || !json_uint(offsets->child->next, &end))
    return m3_fail(M3_ERR_FORMAT,
                   "%s: tensor '%s': \"data_offsets\" is not two non-negative integers", label,
                   name);
  if (b > end)
    return m3_fail(M3_ERR_FORMAT, "%s: tensor '%s': data_offsets [%llu, %llu] end before begin",
                   label, name, (unsigned long long)b, (unsigned long long)end);
  if (end - b != nbytes)
    return m3_fail(
        M3_ERR_FORMAT, "%s: tensor '%s': data_offsets span %llu bytes, %s shape needs %llu", label,
        name, (unsigned long long)(end - b), m3_dtype_name(t->dtype), (unsigned long long)nbytes);
  if (end > data_size)
    return m3_fail(M3_ERR_FORMAT,
                   "%s: tensor '%s': data_offsets end %llu past the %zu-byte data section", label,
                   name, (unsigned long long)end, data_size);
  t->nbytes = (size_t)nbytes;
  *begin = b;
  return M3_OK;
}

static m3_status parse_metadata(const char *label, const cJSON *m) {
  if (!cJSON_IsObject(m)) return m3_fail(M3_ERR_FORMAT, "%s: __metadata__ is not an object", label);
  for (const cJSON *v = m->child; v; v = v->next)
    if (!cJSON_IsString(v))
      return m3_fail(M3_ERR_FORMAT, "%s: __metadata__ key '%s' is not a string", label, v->string);
  return M3_OK;
}

static int cmp_by_offset(const void *a, const void *b) {
  const m3_st_tensor *x = *(const m3_st_tensor *const *)a, *y = *(const m3_st_tensor *const *)b;
  const uint8_t *px = x->data, *py = y->data;
  return px < py ? -1 : px > py;
}

/* Tensors [first, count) all come from one file: sorted by start, each non-empty one must begin at
 * or after the end of the previous non-empty one (empty tensors occupy no bytes). */
static m3_status check_overlaps(const char *label, const m3_safetensors *st, int first) {
  int n = st->count - first;
  if (n < 2) return M3_OK;
  const m3_st_tensor **order = malloc((size_t)n * sizeof *order);
  if (!order) return m3_fail(M3_ERR_NOMEM, "%s: out of memory", label);
  for (int i = 0; i < n; i++) order[i] = &st->tensors[first + i];
  qsort(order, (size_t)n, sizeof *order, cmp_by_offset);
  m3_status s = M3_OK;
  const m3_st_tensor *prev = NULL;
  for (int i = 0; i < n && s == M3_OK; i++) {
    const m3_st_tensor *t = order[i];
    if (t->nbytes == 0) continue;
    if (prev && (const uint8_t *)t->data < (const uint8_t *)prev->data + prev->nbytes)
      s = m3_fail(M3_ERR_FORMAT, "%s: tensors '%s' and '%s' overlap", label, prev->name, t->name);
    prev = t;
  }
  free(order);
  return s;
}

/* Validates the header of the file at `base` (file_size bytes) and appends its tensors to st as
 * shard `shard`. */
static m3_status parse_shard(m3_safetensors *st, int shard, const char *label, const uint8_t *base,
                             size_t file_size) {
  if (file_size < 8)
    return m3_fail(M3_ERR_FORMAT, "%s: file is %zu bytes, shorter than the 8-byte header length",
                   label, file_size);
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--) n = (n << 8) | base[i];
  if (n > ST_MAX_HEADER)
    return m3_fail(M3_ERR_FORMAT, "%s: header length %llu over the 100 MB limit", label,
                   (unsigned long long)n);
  if (n > file_size - 8)
    return m3_fail(M3_ERR_FORMAT, "%s: header length %llu past the end of the %zu-byte file", label,
                   (unsigned long long)n, file_size);
  const char *json = (const char *)base + 8;
  const char *json_end = NULL;
  cJSON *root = cJSON_ParseWithLengthOpts(json, (size_t)n, &json_end, 0);
  if (!root) return m3_fail(M3_ERR_FORMAT, "%s: header is not valid JSON", label);
  /* Writers pad the header with spaces; anything else after the object is corruption. */
  for (const char *p = json_end; p < json + n; p++) {
    if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
      cJSON_Delete(root);
      return m3_fail(M3_ERR_FORMAT, "%s: header has bytes after the JSON object", label);
    }
  }
  if (!cJSON_IsObject(root)) {
    cJSON_Delete(root);
    return m3_fail(M3_ERR_FORMAT, "%s: header is not a JSON object", label);
  }

  const uint8_t *data = base + 8 + n;
  size_t data_size = file_size - 8 - (size_t)n;
  int first = st->count;
  const cJSON *metadata = NULL;
  m3_status s = reserve_tensors(st, label, cJSON_GetArraySize(root));
  for (const cJSON *e = root->child; e && s == M3_OK; e = e->next) {
    if (strcmp(e->string, "__metadata__") == 0) {
      if (metadata)
        s = m3_fail(M3_ERR_FORMAT, "%s: __metadata__ appears twice", label);
      else
        s = parse_metadata(label, e);
      metadata = e;
      continue;
    }
    m3_st_tensor t = {.shard = shard};
    uint64_t begin = 0;
    s = parse_entry(label, e, data_size, &t, &begin);
    if (s != M3_OK) break;
    size_t slot = slot_of(st, e->string);
    if (st->slots[slot]) {
      const m3_st_tensor *other = &st->tensors[st->slots[slot] - 1];
      if (other->shard == shard)
        s = m3_fail(M3_ERR_FORMAT, "%s: tensor '%s' appears twice", label, e->string);
      else
        s = m3_fail(M3_ERR_FORMAT, "tensor '%s' is in both %s and %s", e->string,
                    st->shards[other->shard].path, label);
      break;
    }
    t.data = data + begin;
    t.name = strdup(e->string);
    if (!t.name) {
      s = m3_fail(M3_ERR_NOMEM, "%s: out of memory", label);
      break;
    }
    st->tensors[st->count] = t;
    st->slots[slot] = (uint32_t)++st->count;
  }
  if (s == M3_OK) s = check_overlaps(label, st, first);
  if (s == M3_OK && shard == 0 && metadata)
    st->metadata = cJSON_DetachItemViaPointer(root, (cJSON *)metadata);
  cJSON_Delete(root);
  return s;
}

/* ---- opening ---- */

static m3_safetensors *st_new(const char *what) {
  m3_safetensors *st = calloc(1, sizeof *st);
  if (!st) m3_fail(M3_ERR_NOMEM, "%s: out of memory", what);
  return st;
}

m3_status m3_st_parse(const char *label, const uint8_t *base, size_t file_size,
                      m3_safetensors **out) {
  *out = NULL;
  m3_safetensors *st = st_new(label);
  if (!st) return M3_ERR_NOMEM;
  m3_status s = add_shard(st, label);
  if (s == M3_OK) s = parse_shard(st, 0, label, base, file_size);
  if (s != M3_OK) {
    m3_st_close(st);
    return s;
  }
  *out = st;
  return M3_OK;
}

/* Maps `path` and appends its tensors to st as a new shard. */
static m3_status load_shard(m3_safetensors *st, const char *path) {
  m3_status s = add_shard(st, path);
  if (s != M3_OK) return s;
  int shard = st->shard_count - 1;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return m3_fail(M3_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
  struct stat sb;
  if (fstat(fd, &sb) != 0)
    s = m3_fail(M3_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
  else if (!S_ISREG(sb.st_mode))
    s = m3_fail(M3_ERR_IO, "%s: not a regular file", path);
  else if (sb.st_size < 8)
    s = m3_fail(M3_ERR_FORMAT, "%s: file is %lld bytes, shorter than the 8-byte header length",
                path, (long long)sb.st_size);
  if (s == M3_OK) {
    void *addr = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (addr == MAP_FAILED) {
      s = m3_fail(M3_ERR_IO, "%s: cannot mmap: %s", path, strerror(errno));
    } else {
      st->shards[shard].addr = addr;
      st->shards[shard].size = (size_t)sb.st_size;
    }
  }
  close(fd);
  if (s != M3_OK) return s;
  return parse_shard(st, shard, path, st->shards[shard].addr, st->shards[shard].size);
}

m3_status m3_st_open_file(const char *path, m3_safetensors **out) {
  *out = NULL;
  m3_safetensors *st = st_new(path);
  if (!st) return M3_ERR_NOMEM;
  m3_status s = load_shard(st, path);
  if (s != M3_OK) {
    m3_st_close(st);
    return s;
  }
  *out = st;
  return M3_OK;
}

static char *join_path(const char *dir, const char *name) {
  size_t dl = strlen(dir), nl = strlen(name);
  int slash = dl > 0 && dir[dl - 1] != '/';
  char *p = malloc(dl + (size_t)slash + nl + 1);
  if (!p) return NULL;
  memcpy(p, dir, dl);
  if (slash) p[dl] = '/';
  memcpy(p + dl + slash, name, nl + 1);
  return p;
}

static m3_status load_shard_in(m3_safetensors *st, const char *dir, const char *name) {
  char *path = join_path(dir, name);
  if (!path) return m3_fail(M3_ERR_NOMEM, "%s: out of memory", dir);
  m3_status s = load_shard(st, path);
  free(path);
  return s;
}

/* Reads a whole (small) file into a NUL-terminated buffer. */
static m3_status read_text_file(const char *path, char **out, size_t *len) {
  *out = NULL;
  FILE *f = fopen(path, "rb");
  if (!f) return m3_fail(M3_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
  m3_status s = M3_OK;
  long size = -1;
  if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0)
    s = m3_fail(M3_ERR_IO, "%s: cannot read: %s", path, strerror(errno));
  else if ((unsigned long long)size > ST_MAX_HEADER)
    s = m3_fail(M3_ERR_FORMAT, "%s: %ld bytes, over the 100 MB limit", path, size);
  char *buf = s == M3_OK ? malloc((size_t)size + 1) : NULL;
  if (s == M3_OK && !buf) s = m3_fail(M3_ERR_NOMEM, "%s: out of memory", path);
  if (s == M3_OK && fread(buf, 1, (size_t)size, f) != (size_t)size)
    s = m3_fail(M3_ERR_IO, "%s: short read", path);
  fclose(f);
  if (s != M3_OK) {
    free(buf);
    return s;
  }
  buf[size] = '\0';
  *out = buf;
  *len = (size_t)size;
  return M3_OK;
}

static int cmp_str_ptr(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Shard names come from a file we do not trust: they must stay inside the folder. */
static int shard_name_ok(const char *name) {
  return name[0] != '\0' && !strchr(name, '/') && !strstr(name, "..");
}

/* Checks every weight_map entry against where the tensor really is, and that every tensor loaded
 * is in the map. `shard_names` is sorted and shard i of st was loaded from shard_names[i]. */
static m3_status check_index(const m3_safetensors *st, const char *index_path, const cJSON *map,
                             const char **shard_names, int shard_count) {
  char *listed = calloc((size_t)st->count + 1, 1);
  if (!listed) return m3_fail(M3_ERR_NOMEM, "%s: out of memory", index_path);
  m3_status s = M3_OK;
  for (const cJSON *e = map->child; e && s == M3_OK; e = e->next) {
    const char *want = e->valuestring;
    const m3_st_tensor *t = m3_st_find(st, e->string);
    if (!t) {
      s = m3_fail(M3_ERR_FORMAT, "%s: tensor '%s' is not in its shard %s", index_path, e->string,
                  want);
      break;
    }
    const char **found =
        bsearch(&want, shard_names, (size_t)shard_count, sizeof *shard_names, cmp_str_ptr);
    if (!found || found - shard_names != t->shard)
      s = m3_fail(M3_ERR_FORMAT, "%s: tensor '%s' is in shard %s, not in %s as the index says",
                  index_path, e->string, shard_names[t->shard], want);
    listed[t - st->tensors] = 1;
  }
  for (int i = 0; i < st->count && s == M3_OK; i++)
    if (!listed[i])
      s = m3_fail(M3_ERR_FORMAT, "%s: tensor '%s' of shard %s is not in weight_map", index_path,
                  st->tensors[i].name, shard_names[st->tensors[i].shard]);
  free(listed);
  return s;
}

/* Loads the shards named by the index (sorted, each once) and checks the index against them. */
static m3_status open_indexed(m3_safetensors *st, const char *dir, const char *index_path) {
  char *text = NULL;
  size_t len = 0;
  m3_status s = read_text_file(index_path, &text, &len);
  if (s != M3_OK) return s;
  cJSON *root = cJSON_ParseWithLength(text, len);
  free(text);
  if (!root) return m3_fail(M3_ERR_FORMAT, "%s: not valid JSON", index_path);
  const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
  int n = cJSON_GetArraySize(map);
  const char **names = NULL;
  if (!cJSON_IsObject(map))
    s = m3_fail(M3_ERR_FORMAT, "%s: no \"weight_map\" object", index_path);
  else if (!(names = malloc(((size_t)n + 1) * sizeof *names)))
    s = m3_fail(M3_ERR_NOMEM, "%s: out of memory", index_path);
  int i = 0;
  for (const cJSON *e = s == M3_OK ? map->child : NULL; e && s == M3_OK; e = e->next) {
    if (!cJSON_IsString(e))
      s = m3_fail(M3_ERR_FORMAT, "%s: weight_map entry '%s' is not a string", index_path,
                  e->string);
    else if (!shard_name_ok(e->valuestring))
      s = m3_fail(M3_ERR_FORMAT, "%s: tensor '%s': shard name '%s' is not a plain file name",
                  index_path, e->string, e->valuestring);
    else
      names[i++] = e->valuestring;
  }
  int shards = 0;
  if (s == M3_OK) {
    qsort(names, (size_t)i, sizeof *names, cmp_str_ptr);
    for (int k = 0; k < i; k++)
      if (shards == 0 || strcmp(names[shards - 1], names[k]) != 0) names[shards++] = names[k];
    if (shards == 0) s = m3_fail(M3_ERR_FORMAT, "%s: weight_map is empty", index_path);
  }
  for (int k = 0; k < shards && s == M3_OK; k++) s = load_shard_in(st, dir, names[k]);
  if (s == M3_OK) s = check_index(st, index_path, map, names, shards);
  free(names);
  cJSON_Delete(root);
  return s;
}

/* No index: model.safetensors alone, else every *.safetensors in name order. */
static m3_status open_listed(m3_safetensors *st, const char *dir) {
  char *single = join_path(dir, "model.safetensors");
  if (!single) return m3_fail(M3_ERR_NOMEM, "%s: out of memory", dir);
  int has_single = access(single, F_OK) == 0;
  free(single);
  if (has_single) return load_shard_in(st, dir, "model.safetensors");

  DIR *d = opendir(dir);
  if (!d) return m3_fail(M3_ERR_IO, "%s: cannot open folder: %s", dir, strerror(errno));
  char **names = NULL;
  int n = 0, cap = 0;
  m3_status s = M3_OK;
  for (struct dirent *de; s == M3_OK && (de = readdir(d));) {
    size_t len = strlen(de->d_name);
    if (len <= strlen(ST_SUFFIX) || strcmp(de->d_name + len - strlen(ST_SUFFIX), ST_SUFFIX) != 0)
      continue;
    if (n == cap) {
      cap = cap ? 2 * cap : 8;
      char **grown = realloc(names, (size_t)cap * sizeof *grown);
      if (!grown) {
        s = m3_fail(M3_ERR_NOMEM, "%s: out of memory", dir);
        break;
      }
      names = grown;
    }
    if (!(names[n] = strdup(de->d_name)))
      s = m3_fail(M3_ERR_NOMEM, "%s: out of memory", dir);
    else
      n++;
  }
  closedir(d);
  if (s == M3_OK && n == 0)
    s = m3_fail(M3_ERR_MISSING, "%s: no " ST_INDEX_NAME ", model.safetensors or *.safetensors",
                dir);
  if (s == M3_OK) qsort(names, (size_t)n, sizeof *names, cmp_str_ptr);
  for (int i = 0; i < n && s == M3_OK; i++) s = load_shard_in(st, dir, names[i]);
  for (int i = 0; i < n; i++) free(names[i]);
  free(names);
  return s;
}

m3_status m3_st_open_dir(const char *dir, m3_safetensors **out) {
  *out = NULL;
  struct stat sb;
  if (stat(dir, &sb) != 0)
    return m3_fail(M3_ERR_IO, "%s: cannot open folder: %s", dir, strerror(errno));
  if (!S_ISDIR(sb.st_mode)) return m3_fail(M3_ERR_IO, "%s: not a folder", dir);
  m3_safetensors *st = st_new(dir);
  if (!st) return M3_ERR_NOMEM;
  char *index_path = join_path(dir, ST_INDEX_NAME);
  m3_status s;
  if (!index_path)
    s = m3_fail(M3_ERR_NOMEM, "%s: out of memory", dir);
  else if (access(index_path, F_OK) == 0)
    s = open_indexed(st, dir, index_path);
  else
    s = open_listed(st, dir);
  free(index_path);
  if (s != M3_OK) {
    m3_st_close(st);
    return s;
  }
  *out = st;
  return M3_OK;
}

void m3_st_close(m3_safetensors *st) {
  if (!st) return;
  for (int i = 0; i < st->count; i++) free((char *)st->tensors[i].name);
  for (int i = 0; i < st->shard_count; i++) {
    if (st->shards[i].addr) munmap(st->shards[i].addr, st->shards[i].size);
    free(st->shards[i].path);
  }
  cJSON_Delete(st->metadata);
  free(st->tensors);
  free(st->slots);
  free(st->shards);
  free(st);
}

/* ---- queries ---- */

int m3_st_count(const m3_safetensors *st) { return st->count; }

const m3_st_tensor *m3_st_at(const m3_safetensors *st, int i) {
  return i >= 0 && i < st->count ? &st->tensors[i] : NULL;
}

const m3_st_tensor *m3_st_find(const m3_safetensors *st, const char *name) {
  if (st->count == 0) return NULL;
  uint32_t v = st->slots[slot_of(st, name)];
  return v ? &st->tensors[v - 1] : NULL;
}

int m3_st_shard_count(const m3_safetensors *st) { return st->shard_count; }

const char *m3_st_shard_path(const m3_safetensors *st, int shard) {
  return shard >= 0 && shard < st->shard_count ? st->shards[shard].path : NULL;
}

const char *m3_st_metadata(const m3_safetensors *st, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(st->metadata, key);
  return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* ---- writer ---- */

typedef struct {
  char *name;
  m3_dtype dtype;
  int ndim;
  int64_t shape[M3_MAX_DIMS];
  void *data;
  size_t nbytes;
} writer_tensor;

struct m3_st_writer {
  writer_tensor *tensors;
  int count, cap;
  char **meta_keys, **meta_values;
  int meta_count, meta_cap;
};

m3_st_writer *m3_st_writer_new(void) { return calloc(1, sizeof(m3_st_writer)); }

void m3_st_writer_free(m3_st_writer *w) {
  if (!w) return;
  for (int i = 0; i < w->count; i++) {
    free(w->tensors[i].name);
    free(w->tensors[i].data);
  }
  for (int i = 0; i < w->meta_count; i++) {
    free(w->meta_keys[i]);
    free(w->meta_values[i]);
  }
  free(w->tensors);
  free(w->meta_keys);
  free(w->meta_values);
  free(w);
}

m3_status m3_st_writer_add(m3_st_writer *w, const char *name, m3_dtype dtype, int ndim,
                           const int64_t *shape, const void *data) {
  if (!name || strcmp(name, "__metadata__") == 0)
    return m3_fail(M3_ERR_ARG, "safetensors writer: invalid tensor name '%s'",
                   name ? name : "(null)");
  if ((unsigned)dtype >= M3_DT_COUNT)
    return m3_fail(M3_ERR_ARG, "safetensors writer: tensor '%s': invalid dtype %d", name,
                   (int)dtype);
  if (ndim < 0 || ndim > M3_MAX_DIMS)
    return m3_fail(M3_ERR_ARG, "safetensors writer: tensor '%s': %d dimensions", name, ndim);
  size_t nbytes = m3_dtype_size(dtype);
  for (int d = 0; d < ndim; d++) {
    if (shape[d] < 0 || (double)shape[d] > ST_MAX_JSON_INT)
      return m3_fail(M3_ERR_ARG, "safetensors writer: tensor '%s': shape[%d] = %lld", name, d,
                     (long long)shape[d]);
    if (shape[d] != 0 && nbytes > SIZE_MAX / (uint64_t)shape[d])
      return m3_fail(M3_ERR_ARG, "safetensors writer: tensor '%s': size overflows", name);
    nbytes *= (size_t)shape[d];
  }
  if (w->count == w->cap) {
    int cap = w->cap ? 2 * w->cap : 16;
    writer_tensor *t = realloc(w->tensors, (size_t)cap * sizeof *t);
    if (!t) return m3_fail(M3_ERR_NOMEM, "safetensors writer: out of memory");
    w->tensors = t;
    w->cap = cap;
  }
  writer_tensor t = {.dtype = dtype, .ndim = ndim, .nbytes = nbytes, .name = strdup(name)};
  if (ndim) memcpy(t.shape, shape, (size_t)ndim * sizeof *shape);
  t.data = data ? malloc(nbytes ? nbytes : 1) : NULL;
  if (!t.name || (data && !t.data)) {
    free(t.name);
    free(t.data);
    return m3_fail(M3_ERR_NOMEM, "safetensors writer: tensor '%s': out of memory", name);
  }
  if (data && nbytes) memcpy(t.data, data, nbytes);
  w->tensors[w->count++] = t;
  return M3_OK;
}

m3_status m3_st_writer_set_metadata(m3_st_writer *w, const char *key, const char *value) {
  char *v = strdup(value);
  if (!v) return m3_fail(M3_ERR_NOMEM, "safetensors writer: out of memory");
  for (int i = 0; i < w->meta_count; i++) {
    if (strcmp(w->meta_keys[i], key) == 0) {
      free(w->meta_values[i]);
      w->meta_values[i] = v;
      return M3_OK;
    }
  }
  if (w->meta_count == w->meta_cap) {
    int cap = w->meta_cap ? 2 * w->meta_cap : 4;
    char **k = realloc(w->meta_keys, (size_t)cap * sizeof *k);
    if (k) w->meta_keys = k;
    char **vs = k ? realloc(w->meta_values, (size_t)cap * sizeof *vs) : NULL;
    if (vs) w->meta_values = vs;
    if (!k || !vs) {
      free(v);
      return m3_fail(M3_ERR_NOMEM, "safetensors writer: out of memory");
    }
    w->meta_cap = cap;
  }
  w->meta_keys[w->meta_count] = strdup(key);
  if (!w->meta_keys[w->meta_count]) {
    free(v);
    return m3_fail(M3_ERR_NOMEM, "safetensors writer: out of memory");
  }
  w->meta_values[w->meta_count++] = v;
  return M3_OK;
}

/* The header text grows in one buffer; `failed` records an allocation failure once. */
typedef struct {
  char *p;
  size_t len, cap;
  int failed;
} text_buf;

static void tb_put(text_buf *b, const char *s, size_t n) {
  if (b->failed) return;
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
      b->failed = 1;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
}

static void tb_printf(text_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tb_printf(text_buf *b, const char *fmt, ...) {
  char tmp[128];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  tb_put(b, tmp, (size_t)n);
}

static void tb_json_string(text_buf *b, const char *s) {
  tb_put(b, "\"", 1);
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') {
      char esc[2] = {'\\', (char)c};
      tb_put(b, esc, 2);
    } else if (c < 0x20) {
      tb_printf(b, "\\u%04x", c);
    } else {
      tb_put(b, s, 1);
    }
  }
  tb_put(b, "\"", 1);
}

static int cmp_writer_name(const void *a, const void *b) {
  return strcmp((*(const writer_tensor *const *)a)->name, (*(const writer_tensor *const *)b)->name);
}

/* Data layout: element size descending, then name. Element sizes are powers of two, so every
 * tensor starts at a multiple of its own element size, and with the 8-aligned data section its
 * data is aligned in the mapping (the same order the reference writer uses). */
static int cmp_writer_layout(const void *a, const void *b) {
  size_t sa = m3_dtype_size((*(const writer_tensor *const *)a)->dtype);
  size_t sb = m3_dtype_size((*(const writer_tensor *const *)b)->dtype);
  return sa != sb ? (sa < sb ? 1 : -1) : cmp_writer_name(a, b);
}

/* {"__metadata__":{...},"a":{"dtype":..,"shape":[..],"data_offsets":[b,e]},...} padded with spaces
 * to a multiple of 8. `order` is the tensors sorted by name; offsets[i] is where tensor i (add
 * order) starts in the data section. */
static void build_header(const m3_st_writer *w, const writer_tensor **order,
                         const uint64_t *offsets, text_buf *b) {
  tb_put(b, "{", 1);
  int first = 1;
  if (w->meta_count) {
    tb_put(b, "\"__metadata__\":{", 16);
    for (int i = 0; i < w->meta_count; i++) {
      if (i) tb_put(b, ",", 1);
      tb_json_string(b, w->meta_keys[i]);
      tb_put(b, ":", 1);
      tb_json_string(b, w->meta_values[i]);
    }
    tb_put(b, "}", 1);
    first = 0;
  }
  for (int k = 0; k < w->count; k++) {
    const writer_tensor *t = order[k];
    uint64_t begin = offsets[t - w->tensors];
    if (!first) tb_put(b, ",", 1);
    first = 0;
    tb_json_string(b, t->name);
    tb_printf(b, ":{\"dtype\":\"%s\",\"shape\":[", m3_dtype_name(t->dtype));
    for (int d = 0; d < t->ndim; d++) tb_printf(b, d ? ",%lld" : "%lld", (long long)t->shape[d]);
    tb_printf(b, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)begin,
              (unsigned long long)(begin + t->nbytes));
  }
  tb_put(b, "}", 1);
  while (!b->failed && b->len % 8) tb_put(b, " ", 1);
}

static m3_status write_all(int fd, const char *path, const void *p, size_t n) {
  const uint8_t *q = p;
  while (n) {
    ssize_t k = write(fd, q, n);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0)
      return m3_fail(M3_ERR_IO, "%s: write failed: %s", path,
                     k < 0 ? strerror(errno) : "no progress");
    q += k;
    n -= (size_t)k;
  }
  return M3_OK;
}

/* Writes header and data to `tmp`, then renames it over `path`, so a reader never sees a torn
 * file. */
static m3_status write_file(const m3_st_writer *w, const writer_tensor **layout,
                            const text_buf *header, const char *tmp, const char *path) {
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return m3_fail(M3_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
  uint8_t len_le[8];
  for (int i = 0; i < 8; i++) len_le[i] = (uint8_t)((uint64_t)header->len >> (8 * i));
  m3_status s = write_all(fd, tmp, len_le, 8);
  if (s == M3_OK) s = write_all(fd, tmp, header->p, header->len);
  for (int i = 0; i < w->count && s == M3_OK; i++)
    s = write_all(fd, tmp, layout[i]->data, layout[i]->nbytes);
  if (close(fd) != 0 && s == M3_OK)
    s = m3_fail(M3_ERR_IO, "%s: close failed: %s", tmp, strerror(errno));
  if (s == M3_OK && rename(tmp, path) != 0)
    s = m3_fail(M3_ERR_IO, "%s: cannot rename to %s: %s", tmp, path, strerror(errno));
  if (s != M3_OK) unlink(tmp);
  return s;
}

/* The sorted views, data offsets (add order, relative to the data section) and header of w. */
typedef struct {
  const writer_tensor **order, **layout;
  uint64_t *offsets;
  text_buf header;
} writer_plan;

static void plan_free(writer_plan *p) {
  free(p->header.p);
  free(p->offsets);
  free(p->layout);
  free(p->order);
}

static m3_status plan_file(const m3_st_writer *w, const char *path, writer_plan *p) {
  *p = (writer_plan){0};
  p->order = malloc(((size_t)w->count + 1) * sizeof *p->order);
  p->layout = malloc(((size_t)w->count + 1) * sizeof *p->layout);
  p->offsets = malloc(((size_t)w->count + 1) * sizeof *p->offsets);
  if (!p->order || !p->layout || !p->offsets) return m3_fail(M3_ERR_NOMEM, "%s: out of memory", path);
  for (int i = 0; i < w->count; i++) p->order[i] = p->layout[i] = &w->tensors[i];
  qsort(p->order, (size_t)w->count, sizeof *p->order, cmp_writer_name);
  qsort(p->layout, (size_t)w->count, sizeof *p->layout, cmp_writer_layout);
  uint64_t at = 0;
  for (int i = 0; i < w->count; i++) {
    p->offsets[p->layout[i] - w->tensors] = at;
    at += p->layout[i]->nbytes;
  }
  for (int k = 1; k < w->count; k++)
    if (strcmp(p->order[k - 1]->name, p->order[k]->name) == 0)
      return m3_fail(M3_ERR_ARG, "%s: tensor '%s' added twice", path, p->order[k]->name);
  build_header(w, p->order, p->offsets, &p->header);
  if (p->header.failed) return m3_fail(M3_ERR_NOMEM, "%s: out of memory for the header", path);
  return M3_OK;
}

m3_status m3_st_writer_write(m3_st_writer *w, const char *path) {
  for (int i = 0; i < w->count; i++)
    if (!w->tensors[i].data && w->tensors[i].nbytes)
      return m3_fail(M3_ERR_ARG, "safetensors writer: tensor '%s': no data", w->tensors[i].name);
  size_t plen = strlen(path);
  char *tmp = malloc(plen + 5);
  writer_plan plan;
  m3_status s = plan_file(w, path, &plan);
  if (s == M3_OK && !tmp) s = m3_fail(M3_ERR_NOMEM, "%s: out of memory", path);
  if (s == M3_OK) {
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    s = write_file(w, plan.layout, &plan.header, tmp, path);
  }
  plan_free(&plan);
  free(tmp);
  return s;
}

int m3_st_writer_count(const m3_st_writer *w) { return w->count; }

m3_status m3_st_writer_layout(const m3_st_writer *w, const char *path, uint8_t **head,
                              size_t *head_len, uint64_t *offsets) {
  *head = NULL;
  writer_plan plan;
  m3_status s = plan_file(w, path, &plan);
  uint8_t *h = s == M3_OK ? malloc(8 + plan.header.len) : NULL;
  if (s == M3_OK && !h) s = m3_fail(M3_ERR_NOMEM, "%s: out of memory for the header", path);
  if (s == M3_OK) {
    for (int i = 0; i < 8; i++) h[i] = (uint8_t)((uint64_t)plan.header.len >> (8 * i));
    memcpy(h + 8, plan.header.p, plan.header.len);
    for (int i = 0; i < w->count; i++) offsets[i] = 8 + plan.header.len + plan.offsets[i];
    *head = h;
    *head_len = 8 + plan.header.len;
  }
  plan_free(&plan);
  return s;
}
