/* cpu.h: choosing the SIMD kernel set of the CPU backend.
 *
 * m3_backend_cpu_create picks the best set this CPU supports (AVX-512, else AVX2+FMA+F16C, else
 * portable C), unless the environment variable M3_CPU_ISA names one ("avx512", "avx2",
 * "portable"). Tests and benchmarks create one backend per set to compare them.
 *
 * A backend runs one op at a time (its thread pool is not re-entrant): threads that issue ops
 * concurrently need a backend each. */
#ifndef M3_BACKEND_CPU_CPU_H
#define M3_BACKEND_CPU_CPU_H

#include "backend/backend.h"

typedef enum {
  M3_CPU_ISA_PORTABLE,
  M3_CPU_ISA_AVX2, /* AVX2 + FMA + F16C */
  M3_CPU_ISA_AVX512, /* AVX-512 F + BW + VL */
  M3_CPU_ISA_COUNT
} m3_cpu_isa;

const char *m3_cpu_isa_name(m3_cpu_isa isa);
/* 1 when this CPU (and this build) can run the kernel set. */
int m3_cpu_isa_supported(m3_cpu_isa isa);
/* Like m3_backend_cpu_create with a fixed kernel set; M3_ERR_UNSUPPORTED if the CPU lacks it. */
m3_status m3_backend_cpu_create_isa(int threads, m3_cpu_isa isa, m3_backend **out);
/* The kernel set and thread count of a CPU backend. */
m3_cpu_isa m3_backend_cpu_isa(const m3_backend *be);
int m3_backend_cpu_threads(const m3_backend *be);

#endif
