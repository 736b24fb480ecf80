/* fuzz_safetensors: m3_st_parse on arbitrary bytes taken as a whole file. A header that parses
 * must describe tensors that lie inside the input and that m3_st_find returns by name. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "io/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  m3_safetensors *st = NULL;
  if (m3_st_parse("fuzz", data, size, &st) != M3_OK) {
    if (st || strncmp(m3_last_error(), "fuzz: ", 6) != 0) abort();
    return 0;
  }
  volatile uint8_t sink = 0;
  for (int i = 0; i < m3_st_count(st); i++) {
    const m3_st_tensor *t = m3_st_at(st, i);
    if (m3_st_find(st, t->name) != t || t->nbytes % m3_dtype_size(t->dtype) != 0) abort();
    /* Touching the first and last byte lets ASan catch a view outside the input. */
    if (t->nbytes)
      sink ^= ((const uint8_t *)t->data)[0] ^ ((const uint8_t *)t->data)[t->nbytes - 1];
  }
  (void)m3_st_metadata(st, "format");
  (void)sink;
  m3_st_close(st);
  return 0;
}
