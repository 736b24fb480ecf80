/* cuda_internal.h: what the files of the CUDA backend share: the backend object, the weight view
 * kernels read, exact device decoders for every stored dtype, warp/block reductions and the
 * deterministic top-k key. Included by .cu files only. */
#ifndef M3_BACKEND_CUDA_CUDA_INTERNAL_H
#define M3_BACKEND_CUDA_CUDA_INTERNAL_H

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern "C" { /* the C headers of the rest of m3 */
#include "backend/backend.h"
}

/* A cuBLASLt algorithm chosen for one GEMM shape and operand alignment (lt_gemm in matmul.cu):
 * the heuristic query costs up to milliseconds of host time, and a prefill's MoE layer issues
 * hundreds of GEMMs of a few shapes. found = 0 remembers that cuBLASLt declined. */
typedef struct {
  int used, found;
  cudaDataType ab;
  uint64_t rows, K, ldy;
  int T;        /* the token count planned for: a power of two, or exact */
  int exact;    /* 1: planned for exactly T, after the power of two's algorithm was refused */
  int align;    /* the operands' common power-of-two alignment in bytes, <= 256 */
  cublasLtMatmulAlgo_t algo;
  /* found only: cuBLASLt's descriptors of this GEMM, made once with the plan (a create, set and
   * destroy of four of them per GEMM was host time a MoE prefill layer spends 384 times): the
   * matmul (TRANSA), A [rows, K], and B and C whose token columns each call sets to its T (cols:
   * what they hold now, 0 unknown). Plans are shared by the MoE lanes' streams but used from one
   * host thread only; cublasLtMatmul reads the descriptors when called, so a later call's T
   * cannot reach work already issued. Destroyed when the slot is reused and with the backend. */
  cublasLtMatmulDesc_t op;
  cublasLtMatrixLayout_t la, lb, lc;
  int cols;
} cuda_lt_plan;

enum { CUDA_LT_PLANS = 256 };

/* A side stream of the MoE prefill (moe.cu) and what a matmul on it uses instead of the backend's
 * own workspace and scratch, so that matmuls on different lanes can run at the same time. */
typedef struct {
  cudaStream_t stream;
  cudaEvent_t done;       /* recorded after the lane's last work of an op; `stream` waits on it */
  void *lt_workspace;     /* lt_workspace_bytes, as cuBLASLt plans assume */
  void *scratch;          /* grown through cuda_grow while no work of the lane is pending */
  size_t scratch_bytes;
} cuda_lane;

enum { CUDA_MAX_LANES = 16 };

/* What a kernel was allowed or found on this backend's device: its dynamic shared memory past the
 * default 48 KB (allowed per kernel and per device) and its blocks per SM at a size (an occupancy
 * query costs host time comparable to a decode launch). Kept per backend, not per process: each
 * backend has one device and one issuing thread, while a process may drive several GPUs. */
typedef struct {
  const void *kernel;
  size_t smem;
  int per_sm; /* 0: an allowance entry (smem = the largest allowed) */
} cuda_kernel_memo;

enum { CUDA_KERNEL_MEMOS = 64 };

typedef struct {
  m3_backend base;
  int device;
  int num_sms;
  int smem_optin;         /* shared memory a block may opt into, in bytes */
  cudaStream_t stream;
  cublasLtHandle_t lt;
  void *lt_workspace;
  size_t lt_workspace_bytes;
  cuda_lt_plan lt_plans[CUDA_LT_PLANS]; /* replaced round robin once full */
  int lt_plan_next;
  void *scratch;          /* grows on demand; one op at a time uses it (ops run in stream order) */
  size_t scratch_bytes;
  void *moe_scratch;      /* moe_experts' own, since the matmuls it issues use `scratch` */
  size_t moe_scratch_bytes;
  int moe_lanes;          /* M3_MOE_STREAMS at creation: lanes of the MoE prefill; 1: none, `stream` */
  cuda_lane lanes[CUDA_MAX_LANES]; /* the first moe_lanes when moe_lanes > 1 */
  cudaEvent_t moe_fork;   /* recorded on `stream` once the lanes' inputs are ready */
  int moe_grouped;        /* M3_MOE_GROUPED at creation: 1 the prefill of BF16 and MXFP8 experts as
                           * moe_grouped.cu's grouped GEMMs, 0 the chains on the lanes, -1 (unset)
                           * whichever was measured faster for the call (moe.cu grouped_wins) */
  int moe_grouped_tile;   /* M3_MOE_GROUPED_TILE at creation: their tile shape, one of moe_grouped.cu's
                           * MOE_GROUPED_TILES candidates; -1 (unset): chosen per dtype */
  cudaError_t error;      /* first failure since the last transfer, and the op it came from */
  const char *error_op;
  uint64_t memory_epoch;  /* bumped by cuda_grow whenever a buffer moves (ops.memory_epoch) */
  int capturing;          /* between graph_begin and graph_end: ops are recorded, not run */
  /* Read at creation, so that one device run can time both sides of a kernel change: */
  int gemv_old;           /* M3_CUDA_GEMV_OLD=1: one-token GEMVs take the kernels they took before
                           * warp_rows_dot (matmul.cu gemv_kernel; moe.cu moe_gemv_kernel or
                           * moe_mx_kernel) */
  int mx1_off;            /* M3_CUDA_MX1=0: one-token E4M3 matmuls take warp_rows_dot as before the
                           * mx1 kernels (weight_load.cuh) */
  cuda_kernel_memo memos[CUDA_KERNEL_MEMOS]; /* replaced round robin once full */
  int memo_next;
} cuda_backend;

static inline cuda_backend *cuda_of(m3_backend *be) { return (cuda_backend *)be; }

/* Allows `kernel` `smem` bytes of dynamic shared memory on cb's device when that passes the
 * default 48 KB (once per kernel and size on this backend). */
void cuda_allow_smem(cuda_backend *cb, const void *kernel, size_t smem, const char *op);
/* Blocks of `kernel` at `threads` threads and `smem` bytes that one SM of cb's device holds
 * (at least 1; queried once per kernel and size on this backend). */
int cuda_blocks_per_sm(cuda_backend *cb, const void *kernel, int threads, size_t smem,
                       const char *op);

/* Records the first failure (ops return void; to_host / to_device report it). */
void cuda_note(cuda_backend *cb, cudaError_t e, const char *op);
/* The pending failure as an m3_status naming `what` and the CUDA error; clears it. */
m3_status cuda_take_error(cuda_backend *cb, const char *what);
/* Records a launch failure of `op`, if any. */
static inline void cuda_launched(cuda_backend *cb, const char *op) {
  cuda_note(cb, cudaGetLastError(), op);
}

/* Programmatic dependent launch. Every kernel of this backend starts with dev_pdl_enter and is
 * launched by dev_launch, which lets it start while the kernel before it on the stream is still
 * running (in a recorded graph, a programmatic edge): its blocks are placed as soon as every
 * block of the one before has started, and wait in dev_pdl_enter until that grid has finished
 * and its writes are visible. What it saves is the gap between two dependent kernels (the
 * launch, and the ramp of the next grid onto the SMs), which a decode step of a few dozen
 * kernels of a few microseconds each pays at every boundary. Since each kernel waits for the one
 * before, which waited for its own predecessor, every earlier write is visible too.
 * M3_CUDA_PDL=0 launches as before, for comparison. */

/* Whether launches ask for it: M3_CUDA_PDL, read once (a function-local static is initialized
 * once even when the backends of several GPUs launch from their own threads). */
static inline int cuda_pdl_on(void) {
  static const int on = [] {
    const char *v = getenv("M3_CUDA_PDL");
    return v == NULL || strcmp(v, "0") != 0;
  }();
  return on;
}

/* Waits until the kernel before this one on the stream has finished and its writes are visible
 * (returns at once when it already has, or when launched without the attribute). */
__device__ __forceinline__ void dev_pdl_wait(void) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/* Lets the kernel after this one be placed once every block of this one has come here. */
__device__ __forceinline__ void dev_pdl_trigger(void) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void dev_pdl_enter(void) {
  dev_pdl_wait();
  dev_pdl_trigger();
}

/* The arguments take the kernel's parameter types at the call (dev_param_of: not deduced), as
 * they do in a triple-chevron launch (NULL becomes a pointer, an int a size_t). */
template <typename T> struct dev_param_of {
  typedef T type;
};

template <typename... P>
static inline void dev_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                              typename dev_param_of<P>::type... args) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = cuda_pdl_on() ? 1 : 0;
  cudaLaunchKernelEx(&cfg, kernel, args...);
}

/* At least `bytes` of device scratch, valid until the next call; NULL (and noted) on failure,
 * and while a graph is recorded when it would have to grow. */
void *cuda_scratch(cuda_backend *cb, size_t bytes, const char *op);
/* The same for *buf of *have bytes (cuda_scratch is this on cb->scratch). */
void *cuda_grow(cuda_backend *cb, void **buf, size_t *have, size_t bytes, const char *op);

/* ---- weights as kernels read them ---- */

typedef enum { CW_F32, CW_BF16, CW_F16, CW_E4M3, CW_E5M2, CW_UNSUPPORTED } cuda_wtype;

typedef struct {
  const uint8_t *data;   /* [rows, cols] elements of `type` */
  const uint8_t *scale;  /* MXFP8: e8m0 [rows, scale_cols]; FP8 block: f32 [.., scale_cols] */
  cuda_wtype type;
  m3_weight_quant quant;
  int64_t rows, cols, scale_cols;
  int block_rows, block_cols;
  int elem_bytes;
} cuda_weight;

cuda_weight cuda_weight_of(const m3_tensor *t);

__device__ __forceinline__ float dev_bf16(uint16_t h) { return __uint_as_float((uint32_t)h << 16); }

/* IEEE half -> float, exactly (subnormals included). */
__device__ __forceinline__ float dev_f16(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023;
  if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    float v = (float)m * 5.9604644775390625e-8f; /* m * 2^-24, exact */
    return sign ? -v : v;
  }
  return __uint_as_float(sign | ((e + 112) << 23) | (m << 13));
}

/* OCP E4M3 ("fn"): bias 7, no infinities, S.1111.111 is NaN. */
__device__ __forceinline__ float dev_e4m3(uint8_t b) {
  uint32_t sign = (uint32_t)(b & 0x80) << 24, e = (b >> 3) & 15, m = b & 7;
  if (e == 15 && m == 7) return __uint_as_float(0x7fc00000u);
  if (e == 0) {
    float v = (float)m * 0.001953125f; /* m * 2^-9, exact */
    return sign ? -v : v;
  }
  return __uint_as_float(sign | ((e + 120) << 23) | (m << 20));
}

__device__ __forceinline__ float dev_e5m2(uint8_t b) { return dev_f16((uint16_t)((uint16_t)b << 8)); }

/* E8M0: 2^(v-127); 0 is 2^-127 (a float32 subnormal); 0xFF is NaN. */
__device__ __forceinline__ float dev_e8m0(uint8_t v) {
  if (v == 0xff) return __uint_as_float(0x7fc00000u);
  if (v == 0) return __uint_as_float(0x00400000u);
  return __uint_as_float((uint32_t)v << 23);
}

/* The stored element at flat index i, decoded, before any scale. */
__device__ __forceinline__ float dev_elem(const cuda_weight &w, size_t i) {
  switch (w.type) {
    case CW_F32: return ((const float *)w.data)[i];
    case CW_BF16: return dev_bf16(((const uint16_t *)w.data)[i]);
    case CW_F16: return dev_f16(((const uint16_t *)w.data)[i]);
    case CW_E4M3: return dev_e4m3(w.data[i]);
    case CW_E5M2: return dev_e5m2(w.data[i]);
    default: return __uint_as_float(0x7fc00000u);
  }
}

/* W[r, c] with its quantization scale applied, as the CPU's row decoder computes it. */
__device__ __forceinline__ float dev_w(const cuda_weight &w, int64_t r, int64_t c) {
  float v = dev_elem(w, (size_t)r * (size_t)w.cols + (size_t)c);
  if (w.quant == M3_WQ_MXFP8) return v * dev_e8m0(w.scale[(size_t)r * w.scale_cols + c / 32]);
  if (w.quant == M3_WQ_FP8_BLOCK)
    return v * ((const float *)w.scale)[(size_t)(r / w.block_rows) * w.scale_cols + c / w.block_cols];
  return v;
}

/* SwiGLU-OAI of one gate and up value, as the CPU computes it (backend.h). */
__device__ __forceinline__ float dev_swiglu_oai(float gate, float up, float alpha, float beta,
                                                float limit) {
  float g = fminf(gate, limit);
  float u = fminf(fmaxf(up, -limit), limit);
  float glu = __fmul_rn(g, 1.0f / (1.0f + expf(-__fmul_rn(g, alpha))));
  return __fmul_rn(u + beta, glu);
}

/* d += A B for one mma.sync m16n8k16 tile in the PTX ISA's fragment order (a[0..3], b0, b1;
 * float32 d): F16 operands, or BF16. */
template <int F16>
__device__ __forceinline__ void dev_mma16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  if (F16)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* 2^e for e in [-126, 127], where it is a normal float: its bits alone. */
__device__ __forceinline__ float dev_pow2(int e) { return __int_as_float((127 + e) << 23); }

/* x * 2^n as ldexpf gives it (the exact product, rounded once): one multiplication where 2^n is
 * a normal float (ldexpf's range steps take a dozen instructions), else ldexpf. */
__device__ __forceinline__ float dev_ldexp(float x, int n) {
  return n >= -126 && n <= 127 ? x * dev_pow2(n) : ldexpf(x, n);
}

/* The largest magnitude of four values (a NaN among them does not count). */
__device__ __forceinline__ float dev_amax4(float4 v) {
  return fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
}

/* The exponent e that brings a largest magnitude m to [2^14, 2^15), where f16 keeps 11
 * significant bits of every value that matters next to it: 0 for m zero, infinite or NaN; at
 * most 126, so that 2^e and 2^-e are normal floats (m below 2^-112 then stays below 2^14). */
__device__ __forceinline__ int dev_f16_exp(float m) {
  return m > 0.0f && isfinite(m) ? min(141 - (int)((__float_as_uint(m) >> 23) & 0xffu), 126) : 0;
}

/* Four 8x8 matrices of 16-bit values: lanes 8i .. 8i + 7 give the row addresses of matrix i,
 * which lands in r[i]; lane 4g + q receives row g, elements 2q and 2q + 1 of each. */
__device__ __forceinline__ void dev_ldmatrix_x4(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

/* 16 bytes global -> shared, bypassing L1; bytes = 0 reads nothing and writes zeros. */
__device__ __forceinline__ void dev_cp_async16(uint32_t dst, const void *src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void dev_cp_async_commit(void) {
  asm volatile("cp.async.commit_group;" ::: "memory");
}

/* Waits until at most N of this thread's committed groups are pending. */
template <int N>
__device__ __forceinline__ void dev_cp_async_wait(void) {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

/* ---- shared-memory barriers (mbarrier, sm_90) and bulk copies ---- */
__device__ __forceinline__ uint32_t smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(uint64_t *bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

/* After a thread's mbar_init calls, before the block's barrier: the copy engine sees them. */
__device__ __forceinline__ void mbar_init_fence(void) {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

/* Until the phase of parity `parity` of bar has completed. */
__device__ __forceinline__ void mbar_wait(uint64_t *bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile("{ .reg .pred p;\n"
                 "  mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 "  selp.u32 %0, 1, 0, p; }"
                 : "=r"(done)
                 : "r"(smem_addr(bar)), "r"(parity)
                 : "memory");
  } while (!done);
}

__device__ __forceinline__ void mbar_arrive(uint64_t *bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_expect_bytes(uint64_t *bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

/* Named barrier 1 of the first THREADS threads of the block (a multiple of 32): the warps that
 * share work behind a producer warp meet there without it. */
template <int THREADS>
__device__ __forceinline__ void dev_bar_sync_first(void) {
  asm volatile("bar.sync 1, %0;" ::"n"(THREADS) : "memory");
}

/* bytes (a multiple of 16, both ends 16-byte aligned) from global src to shared dst by the copy
 * engine, counted on bar when they land. */
__device__ __forceinline__ void dev_bulk_copy(void *dst, const void *src, uint32_t bytes, uint64_t *bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}

/* ---- the MoE prefill as grouped GEMMs (moe_grouped.cu) ---- */

/* The candidate tile shapes of the grouped GEMMs (moe_grouped.cu GG_TILES; gg_tile the default). */
enum { MOE_GROUPED_TILES = 10 };

/* 1 when the grouped GEMMs with cb's tile shape can run these experts at n = T * k rows with h as
 * input: BF16 or MXFP8 weights (gate and down of one form; MXFP8 with a finite SwiGLU clamp) with
 * H and I multiples of the shape's K tile (32 or 64), every expert 16-byte aligned (`wide`, the
 * caller's check over all experts), h 16-byte aligned, k choices a token (1..64), and n small
 * enough for the grid's upper bound of m-tiles. */
int cuda_moe_grouped_fits(const cuda_backend *cb, const m3_moe_experts *ex, int wide, const float *h, int n, int k);

/* 1 when these experts' grouped GEMMs take a wgmma tile (cb's M3_MOE_GROUPED_TILE, else the
 * per-shape default), 0 for mma.sync: what decides whether BF16 experts beat the lanes. */
int cuda_moe_grouped_on_wgmma(const cuda_backend *cb, const m3_moe_experts *ex);

/* The routed experts of a prefill without a host synchronization, from the slots grouped by
 * expert (expert e owns sorted positions [start[e], start[e + 1]), pos_of [n] the position of
 * each slot t*k + j, negative for none here; k <= 64): xy [n, H] = BF16(h[t]) at token t's
 * positions; act [n, I] = BF16(SwiGLU-OAI(xy gate_e^T, xy up_e^T)); y [n, H] = act down_e^T
 * (float32), rows past start[E] untouched. MXFP8 experts hold xy and act in f16 instead, each
 * row of xy times 2^row_exp [n] (moe_grouped.cu). h_bf16: NULL, or [T, H] for BF16(h) as well
 * (what cuda_to_bf16 writes). w: the device table [3 * E] (gate experts, then up, then down);
 * tile_start: scratch [E + 1]. On cb->stream. */
void cuda_moe_grouped(cuda_backend *cb, const m3_moe_experts *ex, const cuda_weight *w, const int32_t *start,
                      const int32_t *pos_of, int n, int k, const float *h, __nv_bfloat16 *h_bf16, int32_t *tile_start,
                      void *xy, int32_t *row_exp, void *act, float *y);

/* ---- reductions ---- */

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

/* Sum (MAX: largest) over the block (blockDim.x a multiple of 32, <= 1024); every thread gets it. */
template <bool MAX> __device__ __forceinline__ float block_reduce(float v) {
  __shared__ float part[32];
  __shared__ float total;
  v = MAX ? warp_max(v) : warp_sum(v);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    float s = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : MAX ? -INFINITY : 0.0f;
    s = MAX ? warp_max(s) : warp_sum(s);
    if (threadIdx.x == 0) total = s;
  }
  __syncthreads();
  return total;
}

__device__ __forceinline__ float block_sum(float v) { return block_reduce<false>(v); }
__device__ __forceinline__ float block_max(float v) { return block_reduce<true>(v); }

/* ---- deterministic top-k ----
 * A score maps to an unsigned key whose order is the score order, with NaN as -inf and -0 as +0;
 * key 0 (below every score) marks a taken entry. (key << 32 | ~index) then orders by score and, on
 * ties, by the lower index: the CPU's cpu_topk order. */
__device__ __forceinline__ uint32_t score_key(float f) {
  if (isnan(f)) f = -INFINITY;
  if (f == 0.0f) f = 0.0f;
  uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ uint64_t rank_key(uint32_t key, int index) {
  return ((uint64_t)key << 32) | (uint32_t)~(uint32_t)index;
}

__device__ __forceinline__ uint64_t warp_max_u64(uint64_t v) {
  for (int o = 16; o > 0; o >>= 1) {
    uint64_t other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  return v;
}

/* Writes to out[0..k) the indices of the k largest keys[0..n) (best first, ties to the lower index),
 * marking them taken in keys (shared memory). All threads of the block call it; k <= n. Each round
 * is one block max of per-thread bests; only the thread that owned the winner rescans its share. */
static __device__ __forceinline__ void block_topk(uint32_t *keys, int n, int k, int32_t *out) {
  __shared__ uint64_t warp_best[32];
  __shared__ uint64_t winner;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nt = blockDim.x;
  uint64_t best = 0; /* below every rank key: threads with no entries never win */
  for (int i = tid; i < n; i += nt) {
    uint64_t r = rank_key(keys[i], i);
    best = r > best ? r : best;
  }
  for (int round = 0; round < k; round++) {
    uint64_t m = warp_max_u64(best);
    if (lane == 0) warp_best[warp] = m;
    __syncthreads();
    if (warp == 0) {
      uint64_t v = lane < (nt >> 5) ? warp_best[lane] : 0;
      v = warp_max_u64(v);
      if (lane == 0) winner = v;
    }
    __syncthreads();
    int idx = (int)~(uint32_t)(winner & 0xffffffffu);
    if (tid == 0) out[round] = idx;
    if (idx % nt == tid) {
      keys[idx] = 0;
      best = 0;
      for (int i = tid; i < n; i += nt) {
        uint64_t r = rank_key(keys[i], i);
        best = r > best ? r : best;
      }
    }
  }
  __syncthreads();
}

#endif
