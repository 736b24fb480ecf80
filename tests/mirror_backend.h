/* mirror_backend.h: a CPU backend that claims device memory, for the tests of the paths a GPU
 * backend takes (logits kept in backend memory, only what is asked for handed over). The CPU ops
 * find their state through `be` itself, so swapping the table they are reached by changes nothing
 * else. Include after check.h. */
#ifndef M3_TESTS_MIRROR_BACKEND_H
#define M3_TESTS_MIRROR_BACKEND_H

#include "backend/backend.h"

static m3_backend_ops mirrored_ops;

/* The CPU backend with 2 threads; mirrored: the same claiming device memory. */
static m3_backend *open_backend(int mirrored) {
  m3_backend *be = NULL;
  CHECK_OK(m3_backend_cpu_create(2, &be));
  if (be && mirrored) {
    mirrored_ops = *be->ops;
    mirrored_ops.device_memory = 1;
    be->ops = &mirrored_ops;
  }
  return be;
}

#endif
