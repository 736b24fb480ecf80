/* safetensors.h: reading (mmap) and writing the safetensors format, single files and shard sets.
 *
 * File layout: u64 little-endian header length N, N bytes of JSON
 *   {"__metadata__": {...}, "name": {"dtype": "BF16", "shape": [r, c], "data_offsets": [b, e]}, ...}
 * then the data section; offsets are relative to the start of the data section.
 *
 * Validation on open (each failure names the file and, where there is one, the tensor):
 *   header length within the file and <= 100 MB; JSON object; known dtype; shape a list of
 *   non-negative integers; end - begin == product(shape) * dtype size (overflow-checked);
 *   [begin, end) inside the data section; no two tensors overlapping; duplicate names rejected.
 * Tensors are views into the mapping: nothing is copied. */
#ifndef M3_IO_SAFETENSORS_H
#define M3_IO_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "base/dtype.h"
#include "base/status.h"

#define M3_MAX_DIMS 8

typedef struct {
  const char *name;               /* owned by the m3_safetensors */
  m3_dtype dtype;
  int ndim;
  int64_t shape[M3_MAX_DIMS];
  const void *data;               /* inside the mmap of its shard */
  size_t nbytes;
  int shard;                      /* index into m3_safetensors.shard_paths */
} m3_st_tensor;

typedef struct m3_safetensors m3_safetensors;

/* One .safetensors file. */
m3_status m3_st_open_file(const char *path, m3_safetensors **out);

/* A checkpoint folder: model.safetensors.index.json when present (every shard it names must exist
 * and every tensor must be in the shard the index says), else model.safetensors, else every
 * *.safetensors in the folder (sorted). A folder without any returns M3_ERR_MISSING with a message
 * naming the folder; callers that accept config-only folders test for that status. */
m3_status m3_st_open_dir(const char *dir, m3_safetensors **out);

/* Parses a header already in memory (the fuzz target and tests use this). `file_size` is the size
 * of the whole file the header came from (8 + header + data). On success the returned object
 * does not own any mapping; tensor data pointers are computed relative to `base`. */
m3_status m3_st_parse(const char *label, const uint8_t *base, size_t file_size, m3_safetensors **out);

void m3_st_close(m3_safetensors *st);

int m3_st_count(const m3_safetensors *st);
const m3_st_tensor *m3_st_at(const m3_safetensors *st, int i);
/* O(1) average (hash table). NULL when absent. */
const m3_st_tensor *m3_st_find(const m3_safetensors *st, const char *name);
int m3_st_shard_count(const m3_safetensors *st);
const char *m3_st_shard_path(const m3_safetensors *st, int shard);
/* Value of a string entry of __metadata__ in the first shard, or NULL. */
const char *m3_st_metadata(const m3_safetensors *st, const char *key);

/* Writer: collects tensors (the data is copied at add time) and writes one file with the header
 * keys sorted by name, data ordered by element size (largest first) then name so that every
 * tensor is aligned to its element size, 8-byte aligned header padding with spaces, as the
 * Python writer does. */
typedef struct m3_st_writer m3_st_writer;
m3_st_writer *m3_st_writer_new(void);
m3_status m3_st_writer_add(m3_st_writer *w, const char *name, m3_dtype dtype, int ndim,
                           const int64_t *shape, const void *data);
m3_status m3_st_writer_set_metadata(m3_st_writer *w, const char *key, const char *value);
m3_status m3_st_writer_write(m3_st_writer *w, const char *path);
void m3_st_writer_free(m3_st_writer *w);

/* Files too large to hold in memory: tensors added with data NULL only reserve their place
 * (m3_st_writer_write refuses them). m3_st_writer_layout gives the bytes that start the file
 * m3_st_writer_write would write (the 8-byte length, the header; malloc'd, caller frees) and
 * the file offset of every tensor's data, in add order (offsets[m3_st_writer_count]); the caller
 * writes the data there itself, e.g. from several threads with pwrite. */
int m3_st_writer_count(const m3_st_writer *w);
m3_status m3_st_writer_layout(const m3_st_writer *w, const char *path, uint8_t **head,
                              size_t *head_len, uint64_t *offsets);

#endif
