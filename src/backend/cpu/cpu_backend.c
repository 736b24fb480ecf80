/* cpu_backend.c: the CPU backend object: op table, creation, kernel-set choice, allocation. */
#if defined(__x86_64__)
#include <cpuid.h>
#endif
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_internal.h"
#include "backend/cpu/vision_ops.h"

static void cpu_destroy(m3_backend *be) {
  if (!be) return;
  m3_threadpool_destroy(cpu_of(be)->pool);
  free(be);
}

static void *cpu_alloc(m3_backend *be, size_t bytes) {
  (void)be;
  return calloc(1, bytes ? bytes : 1);
}

static void cpu_free(m3_backend *be, void *p) {
  (void)be;
  free(p);
}

static void *cpu_alloc_host(m3_backend *be, size_t bytes) {
  (void)be;
  return malloc(bytes ? bytes : 1);
}

/* Backend memory is host memory: transfers are copies and weights are read where they are mapped. */
static m3_status cpu_copy(m3_backend *be, void *dst, const void *src, size_t bytes) {
  (void)be;
  memcpy(dst, src, bytes);
  return M3_OK;
}

static m3_status cpu_zero(m3_backend *be, void *dst, size_t bytes) {
  (void)be;
  memset(dst, 0, bytes);
  return M3_OK;
}

static m3_status cpu_prepare_tensor(m3_backend *be, m3_tensor *t) {
  (void)be, (void)t;
  return M3_OK;
}

static void cpu_release_tensor(m3_backend *be, m3_tensor *t) { (void)be, (void)t; }

/* One matmul after another: each already spreads its rows over every thread, so a set has
 * nothing to gain from one pass (and its results stay those of matmul, bit for bit). */
static void cpu_matmul_set(m3_backend *be, const float *x, int T, const m3_matmul_out *out, int n) {
  for (int i = 0; i < n; i++) cpu_matmul(be, out[i].w, x, T, out[i].y);
}

/* Host code reaches every expert through the m3_moe_experts arrays themselves. */
static m3_status cpu_prepare_experts(m3_backend *be, m3_moe_experts *ex) {
  (void)be, (void)ex;
  return M3_OK;
}

static void cpu_release_experts(m3_backend *be, m3_moe_experts *ex) { (void)be, (void)ex; }

static const m3_backend_ops cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .alloc_host = cpu_alloc_host,
    .free_host = cpu_free,
    .to_device = cpu_copy,
    .copy = cpu_copy,
    .zero = cpu_zero,
    .to_host = cpu_copy,
    .kv_fp8 = 1,
    .prepare_tensor = cpu_prepare_tensor,
    .release_tensor = cpu_release_tensor,
    .embed = cpu_embed,
    .matmul = cpu_matmul,
    .matmul_set = cpu_matmul_set,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .rmsnorm_rope = cpu_rmsnorm_rope,
    .swiglu_oai = cpu_swiglu_oai,
    .add = cpu_add,
    .add_rmsnorm = cpu_add_rmsnorm,
    .argmax_rows = cpu_argmax_rows,
    .argmax_pairs = cpu_argmax_pairs,
    .kv_store = cpu_kv_store,
    .kv_store_rope = cpu_kv_store_rope,
    .msa_select = cpu_msa_select,
    .attention = cpu_attention,
    .moe_route = cpu_moe_route,
    .prepare_experts = cpu_prepare_experts,
    .release_experts = cpu_release_experts,
    .moe_experts = cpu_moe_experts,
    .vision = &cpu_vision_ops,
};

static const char *const isa_names[M3_CPU_ISA_COUNT] = {
    [M3_CPU_ISA_PORTABLE] = "portable", [M3_CPU_ISA_AVX2] = "avx2", [M3_CPU_ISA_AVX512] = "avx512"};

const char *m3_cpu_isa_name(m3_cpu_isa isa) {
  return (unsigned)isa < M3_CPU_ISA_COUNT ? isa_names[isa] : "?";
}

#if defined(__x86_64__)
/* CPUID leaf 1, ECX bit 29. Read directly: clang 14's __builtin_cpu_supports has no "f16c". */
static int has_f16c(void) {
  unsigned a, b, c, d;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0;
}
#endif

int m3_cpu_isa_supported(m3_cpu_isa isa) {
  switch (isa) {
    case M3_CPU_ISA_PORTABLE: return 1;
#if defined(__x86_64__)
    case M3_CPU_ISA_AVX2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
    case M3_CPU_ISA_AVX512:
      __builtin_cpu_init();
      return m3_cpu_isa_supported(M3_CPU_ISA_AVX2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#endif
    default: return 0;
  }
}

static const cpu_kernels *kernels_for(m3_cpu_isa isa) {
  switch (isa) {
#if defined(__x86_64__)
    case M3_CPU_ISA_AVX2: return &cpu_kernels_avx2;
    case M3_CPU_ISA_AVX512: return &cpu_kernels_avx512;
#endif
    default: return &cpu_kernels_portable;
  }
}

m3_status m3_backend_cpu_create_isa(int threads, m3_cpu_isa isa, m3_backend **out) {
  *out = NULL;
  if (!m3_cpu_isa_supported(isa))
    return m3_fail(M3_ERR_UNSUPPORTED, "cpu backend: this CPU or build lacks the %s kernels",
                   m3_cpu_isa_name(isa));
  cpu_init_tables();
  cpu_backend *cb = calloc(1, sizeof *cb);
  if (!cb) return m3_fail(M3_ERR_NOMEM, "cpu backend: out of memory");
  m3_status st = m3_threadpool_create(threads, &cb->pool);
  if (st != M3_OK) {
    free(cb);
    return st;
  }
  cb->base.ops = &cpu_ops;
  cb->isa = isa;
  cb->k = kernels_for(isa);
  *out = &cb->base;
  return M3_OK;
}

m3_status m3_backend_cpu_create(int threads, m3_backend **out) {
  const char *env = getenv("M3_CPU_ISA");
  if (env && *env) {
    for (int i = 0; i < M3_CPU_ISA_COUNT; i++)
      if (strcmp(env, isa_names[i]) == 0) return m3_backend_cpu_create_isa(threads, i, out);
    *out = NULL;
    return m3_fail(M3_ERR_ARG, "M3_CPU_ISA=%s: expected avx512, avx2 or portable", env);
  }
  m3_cpu_isa best = M3_CPU_ISA_PORTABLE;
  for (int i = 0; i < M3_CPU_ISA_COUNT; i++)
    if (m3_cpu_isa_supported(i)) best = i;
  return m3_backend_cpu_create_isa(threads, best, out);
}

m3_cpu_isa m3_backend_cpu_isa(const m3_backend *be) { return ((const cpu_backend *)be)->isa; }

int m3_backend_cpu_threads(const m3_backend *be) {
  return m3_threadpool_size(((const cpu_backend *)be)->pool);
}
