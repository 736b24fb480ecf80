/* fuzz_config: m3_config_parse on arbitrary bytes taken as a config.json. A failure must leave the
 * struct empty and name the source; a success must satisfy the invariants the model code relies on
 * (sizes positive, heads grouped evenly, rotary width even and within the head, one entry per
 * layer in each layer map). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "io/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  m3_config c;
  if (m3_config_parse((const char *)data, size, "fuzz", &c) != M3_OK) {
    if (c.layer_attn || c.layer_mlp || strncmp(m3_last_error(), "fuzz: ", 6) != 0) abort();
    return 0;
  }
  if (c.num_layers <= 0 || c.hidden_size <= 0 || c.head_dim <= 0 || c.num_kv_heads <= 0 ||
      c.num_heads % c.num_kv_heads != 0 || c.rotary_dim <= 0 || c.rotary_dim % 2 != 0 ||
      c.rotary_dim > c.head_dim || c.num_experts_per_tok > c.num_experts ||
      c.index_topk_blocks < c.index_local_blocks + c.index_init_blocks)
    abort();
  /* Reading the last entry of each map lets ASan catch a short allocation. */
  for (int i = 0; i<c.num_layers; i += c.num_layers - 1> 0 ? c.num_layers - 1 : 1)
    if (c.layer_attn[i] > M3_ATTN_SPARSE || c.layer_mlp[i] > M3_MLP_MOE) abort();
  m3_config_free(&c);
  return 0;
}
