/* select.c: the backend a device name asks for ("cpu", "cuda", "cuda:N"). Its own small library
 * (m3_backend) so that the CPU backend never depends on CUDA and a CPU-only build has no CUDA
 * symbols: the cuda names compile to a clear error there. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"

/* "cuda" -> 0, "cuda:N" -> N; -1 when the name is not of that form. */
static int cuda_index(const char *device) {
  if (strncmp(device, "cuda", 4) != 0) return -1;
  if (device[4] == '\0') return 0;
  if (device[4] != ':' || device[5] < '0' || device[5] > '9') return -1;
  char *end;
  errno = 0;
  long n = strtol(device + 5, &end, 10);
  return *end == '\0' && errno == 0 && n <= 1024 ? (int)n : -1;
}

m3_status m3_backend_create(const char *device, int threads, m3_backend **out) {
  *out = NULL;
  if (strcmp(device, "cpu") == 0) return m3_backend_cpu_create(threads, out);
  int gpu = cuda_index(device);
  if (gpu < 0) return m3_fail(M3_ERR_ARG, "device '%s': expected cpu, cuda or cuda:N", device);
#ifdef M3_HAVE_CUDA
  return m3_backend_cuda_create(gpu, out);
#else
  return m3_fail(M3_ERR_UNSUPPORTED, "device '%s': this build has no CUDA backend (configure with "
                 "-DM3_CUDA=ON where CUDA 13 is installed)", device);
#endif
}
