/* cuda_backend.cu: the CUDA backend object: creation on a GPU, device memory, host transfers,
 * weight upload, error recording and the op table. Every op runs on one stream in issue order
 * (the MoE prefill forks to side streams and joins them into it before it returns). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_ops.h"

enum { LT_WORKSPACE_BYTES = 32 << 20 };

static cuda_kernel_memo *memo_find(cuda_backend *cb, const void *kernel, size_t smem, int occupancy) {
  for (int i = 0; i < CUDA_KERNEL_MEMOS; i++) {
    cuda_kernel_memo *m = &cb->memos[i];
    if (m->kernel == kernel && (m->per_sm > 0) == occupancy && (!occupancy || m->smem == smem))
      return m;
  }
  return NULL;
}

static cuda_kernel_memo *memo_add(cuda_backend *cb) {
  cuda_kernel_memo *m = &cb->memos[cb->memo_next];
  cb->memo_next = (cb->memo_next + 1) % CUDA_KERNEL_MEMOS;
  return m;
}

void cuda_allow_smem(cuda_backend *cb, const void *kernel, size_t smem, const char *op) {
  if (smem <= 48 * 1024) return;
  cuda_kernel_memo *m = memo_find(cb, kernel, 0, 0);
  if (m && m->smem >= smem) return;
  cuda_note(cb, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
            op);
  if (!m) m = memo_add(cb);
  *m = (cuda_kernel_memo){kernel, smem, 0};
}

int cuda_blocks_per_sm(cuda_backend *cb, const void *kernel, int threads, size_t smem,
                       const char *op) {
  cuda_kernel_memo *m = memo_find(cb, kernel, smem, 1);
  if (m) return m->per_sm;
  int per_sm = 0;
  cuda_note(cb, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem), op);
  if (per_sm <= 0) per_sm = 1;
  *memo_add(cb) = (cuda_kernel_memo){kernel, smem, per_sm};
  return per_sm;
}

void cuda_note(cuda_backend *cb, cudaError_t e, const char *op) {
  if (e != cudaSuccess && cb->error == cudaSuccess) {
    cb->error = e;
    cb->error_op = op;
  }
}

void *cuda_grow(cuda_backend *cb, void **buf, size_t *have, size_t bytes, const char *op) {
  if (bytes <= *have) return *buf;
  /* A recording can neither wait for the stream nor keep an address that moves: refusing fails
   * the recording, and the caller issues the ops again directly, which grows the buffer. */
  if (cb->capturing) {
    cuda_note(cb, cudaErrorStreamCaptureUnsupported, op);
    return NULL;
  }
  /* Earlier ops may still read the old buffer. */
  cuda_note(cb, cudaStreamSynchronize(cb->stream), op);
  if (*buf) cudaFree(*buf);
  *buf = NULL;
  *have = 0;
  cb->memory_epoch++; /* graphs recorded with the old address must not run again */
  size_t grown = bytes + bytes / 2;
  cudaError_t e = cudaMalloc(buf, grown);
  if (e != cudaSuccess) {
    cuda_note(cb, e, op);
    *buf = NULL;
    return NULL;
  }
  *have = grown;
  return *buf;
}

void *cuda_scratch(cuda_backend *cb, size_t bytes, const char *op) {
  return cuda_grow(cb, &cb->scratch, &cb->scratch_bytes, bytes, op);
}

cuda_weight cuda_weight_of(const m3_tensor *t) {
  cuda_weight w;
  memset(&w, 0, sizeof w);
  w.data = (const uint8_t *)t->data;
  w.scale = (const uint8_t *)t->scale;
  switch (t->dtype) {
    case M3_DT_F32: w.type = CW_F32; break;
    case M3_DT_BF16: w.type = CW_BF16; break;
    case M3_DT_F16: w.type = CW_F16; break;
    case M3_DT_F8_E4M3: w.type = CW_E4M3; break;
    case M3_DT_F8_E5M2: w.type = CW_E5M2; break;
    default: w.type = CW_UNSUPPORTED; break; /* decodes as NaN, as on the CPU */
  }
  w.quant = t->quant;
  w.rows = t->rows;
  w.cols = t->cols;
  w.scale_cols = t->scale_cols;
  w.block_rows = t->block_rows > 0 ? t->block_rows : 1;
  w.block_cols = t->block_cols > 0 ? t->block_cols : 1;
  w.elem_bytes = (int)m3_dtype_size(t->dtype);
  return w;
}

m3_status cuda_take_error(cuda_backend *cb, const char *what) {
  if (cb->error == cudaSuccess) return M3_OK;
  cudaError_t e = cb->error;
  cb->error = cudaSuccess;
  return m3_fail(M3_ERR_IO, "cuda %s (first failure in %s): %s", what, cb->error_op,
                 cudaGetErrorString(e));
}

static void cuda_destroy(m3_backend *be) {
  if (!be) return;
  cuda_backend *cb = cuda_of(be);
  cudaSetDevice(cb->device);
  if (cb->stream) cudaStreamSynchronize(cb->stream);
  cuda_moe_lanes_destroy(cb);
  if (cb->scratch) cudaFree(cb->scratch);
  if (cb->moe_scratch) cudaFree(cb->moe_scratch);
  if (cb->lt_workspace) cudaFree(cb->lt_workspace);
  cuda_lt_plans_release(cb);
  if (cb->lt) cublasLtDestroy(cb->lt);
  if (cb->stream) cudaStreamDestroy(cb->stream);
  free(cb);
}

static void *cuda_alloc(m3_backend *be, size_t bytes) {
  cuda_backend *cb = cuda_of(be);
  void *p = NULL;
  if (cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess) {
    cudaGetLastError(); /* an allocation failure is reported by the NULL, not by later ops */
    return NULL;
  }
  if (cudaMemsetAsync(p, 0, bytes ? bytes : 1, cb->stream) != cudaSuccess) {
    cudaFree(p);
    return NULL;
  }
  return p;
}

static void *cuda_alloc_host(m3_backend *be, size_t bytes) {
  (void)be;
  void *p = NULL;
  if (cudaMallocHost(&p, bytes ? bytes : 1) != cudaSuccess) {
    cudaGetLastError(); /* reported by the NULL */
    return NULL;
  }
  return p;
}

static void cuda_free_host(m3_backend *be, void *p) {
  (void)be;
  if (p) cudaFreeHost(p);
}

static void cuda_free(m3_backend *be, void *p) {
  cuda_backend *cb = cuda_of(be);
  cuda_note(cb, cudaStreamSynchronize(cb->stream), "free"); /* queued ops may still use p */
  cudaFree(p);
}

static m3_status cuda_to_device(m3_backend *be, void *dst, const void *src, size_t bytes) {
  cuda_backend *cb = cuda_of(be);
  cuda_note(cb, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cb->stream), "to_device");
  return cuda_take_error(cb, "to_device");
}

static m3_status cuda_to_host(m3_backend *be, void *dst, const void *src, size_t bytes) {
  cuda_backend *cb = cuda_of(be);
  cuda_note(cb, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cb->stream), "to_host");
  cuda_note(cb, cudaStreamSynchronize(cb->stream), "to_host");
  return cuda_take_error(cb, "to_host");
}

static m3_status cuda_copy(m3_backend *be, void *dst, const void *src, size_t bytes) {
  cuda_backend *cb = cuda_of(be);
  cuda_note(cb, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cb->stream), "copy");
  return M3_OK; /* asynchronous like every op: a failure surfaces at the next transfer */
}

static m3_status cuda_zero(m3_backend *be, void *dst, size_t bytes) {
  cuda_backend *cb = cuda_of(be);
  cuda_note(cb, cudaMemsetAsync(dst, 0, bytes, cb->stream), "zero");
  return M3_OK; /* as copy */
}

static m3_status upload(cuda_backend *cb, const m3_tensor *t, const void *src, size_t bytes,
                        void **dst) {
  *dst = NULL;
  cudaError_t e = cudaMalloc(dst, bytes ? bytes : 1);
  if (e == cudaSuccess)
    e = cudaMemcpyAsync(*dst, src, bytes, cudaMemcpyHostToDevice, cb->stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(cb->stream);
  if (e != cudaSuccess) {
    if (*dst) cudaFree(*dst);
    *dst = NULL;
    return m3_fail(e == cudaErrorMemoryAllocation ? M3_ERR_NOMEM : M3_ERR_IO,
                   "%s: cannot upload %zu bytes to the GPU: %s", t->name ? t->name : "tensor",
                   bytes, cudaGetErrorString(e));
  }
  return M3_OK;
}

static m3_status cuda_prepare_tensor(m3_backend *be, m3_tensor *t) {
  cuda_backend *cb = cuda_of(be);
  if (!m3_tensor_present(t)) return M3_OK;
  size_t bytes = (size_t)t->rows * (size_t)t->cols * m3_dtype_size(t->dtype);
  size_t scale_bytes = 0;
  if (t->quant == M3_WQ_MXFP8) scale_bytes = (size_t)t->scale_rows * (size_t)t->scale_cols;
  if (t->quant == M3_WQ_FP8_BLOCK) scale_bytes = (size_t)t->scale_rows * (size_t)t->scale_cols * 4;
  void *data, *scale = NULL;
  m3_status st = upload(cb, t, t->data, bytes, &data);
  if (st != M3_OK) return st;
  if (scale_bytes && (st = upload(cb, t, t->scale, scale_bytes, &scale)) != M3_OK) {
    cudaFree(data);
    return st;
  }
  t->data = data;
  t->scale = scale;
  return M3_OK;
}

static void cuda_release_tensor(m3_backend *be, m3_tensor *t) {
  cuda_backend *cb = cuda_of(be);
  cuda_note(cb, cudaStreamSynchronize(cb->stream), "release_tensor");
  if (t->data) cudaFree((void *)t->data);
  if (t->scale) cudaFree((void *)t->scale);
  t->data = NULL;
  t->scale = NULL;
}

/* ---- recorded decode steps (CUDA graphs) ---- */

struct m3_graph {
  cudaGraphExec_t exec;
};

static m3_status cuda_graph_begin(m3_backend *be) {
  cuda_backend *cb = cuda_of(be);
  if (cb->error != cudaSuccess) /* left pending: it surfaces at the next transfer */
    return m3_fail(M3_ERR_IO, "cuda graph: not recording after a failure in %s: %s", cb->error_op,
                   cudaGetErrorString(cb->error));
  /* Thread-local mode: a call of this thread that is unsafe while recording (a synchronization,
   * an allocation) fails the recording, which the caller then runs directly, instead of running
   * outside the graph unnoticed as relaxed mode lets it; unlike global mode, other threads (the
   * backends of other GPUs in a parallel engine) keep allocating freely meanwhile. */
  cudaError_t e = cudaStreamBeginCapture(cb->stream, cudaStreamCaptureModeThreadLocal);
  if (e != cudaSuccess) {
    cudaGetLastError(); /* reported here, not by the next op's launch check */
    return m3_fail(M3_ERR_IO, "cuda graph: cudaStreamBeginCapture: %s", cudaGetErrorString(e));
  }
  cb->capturing = 1;
  return M3_OK;
}

static m3_status cuda_graph_end(m3_backend *be, m3_graph **g) {
  cuda_backend *cb = cuda_of(be);
  cudaGraph_t graph = NULL;
  cudaError_t e = cudaStreamEndCapture(cb->stream, &graph);
  cb->capturing = 0;
  cudaGetLastError();
  /* graph_begin saw no pending failure: whatever is pending now came from the recording, and
   * the direct run the caller falls back to notes it again if it is real. */
  const char *at = cb->error != cudaSuccess ? cb->error_op : "cudaStreamEndCapture";
  if (cb->error != cudaSuccess) e = cb->error;
  cb->error = cudaSuccess;
  m3_graph *out = *g;
  if (e == cudaSuccess && graph && out) {
    /* Same topology (a decode step with other cache views): new parameters in place, far cheaper
     * than instantiating. The documentation does not promise that a launch still in flight keeps
     * the old ones: wait for it (a step's logits transfer has usually waited already). */
    cuda_note(cb, cudaStreamSynchronize(cb->stream), "graph_end (update)");
    cudaGraphExecUpdateResultInfo info;
    if (cudaGraphExecUpdate(out->exec, graph, &info) != cudaSuccess) {
      cudaGetLastError();
      cudaGraphExecDestroy(out->exec); /* an in-flight launch completes first */
      out->exec = NULL;
    }
  }
  if (e == cudaSuccess && graph && !out && !(out = (m3_graph *)calloc(1, sizeof *out)))
    e = cudaErrorMemoryAllocation;
  if (e == cudaSuccess && graph && !out->exec) {
    e = cudaGraphInstantiate(&out->exec, graph, 0);
    if (e != cudaSuccess) {
      cudaGetLastError();
      out->exec = NULL;
      at = "cudaGraphInstantiate";
    }
  }
  if (graph) cudaGraphDestroy(graph); /* the executable graph does not need it */
  if (e == cudaSuccess && !graph) e = cudaErrorStreamCaptureInvalidated;
  if (e != cudaSuccess) {
    if (out && out->exec) cudaGraphExecDestroy(out->exec);
    free(out);
    *g = NULL;
    return m3_fail(M3_ERR_IO, "cuda graph: recording failed in %s: %s", at, cudaGetErrorString(e));
  }
  *g = out;
  return M3_OK;
}

static m3_status cuda_graph_launch(m3_backend *be, m3_graph *g) {
  cuda_backend *cb = cuda_of(be);
  cudaError_t e = cudaGraphLaunch(g->exec, cb->stream);
  if (e != cudaSuccess) {
    cudaGetLastError(); /* reported here: the caller can still run the ops directly */
    return m3_fail(M3_ERR_IO, "cuda graph: cudaGraphLaunch: %s", cudaGetErrorString(e));
  }
  return M3_OK;
}

static void cuda_graph_free(m3_backend *be, m3_graph *g) {
  (void)be;
  if (!g) return;
  if (g->exec) cudaGraphExecDestroy(g->exec);
  free(g);
}

static uint64_t cuda_memory_epoch(m3_backend *be) { return cuda_of(be)->memory_epoch; }

static m3_status cuda_bind_thread(m3_backend *be) {
  const int device = cuda_of(be)->device;
  const cudaError_t e = cudaSetDevice(device);
  return e == cudaSuccess ? M3_OK
                          : m3_fail(M3_ERR_IO, "cuda:%d: cudaSetDevice: %s", device, cudaGetErrorString(e));
}

static m3_backend_ops make_ops(void) {
  m3_backend_ops ops;
  memset(&ops, 0, sizeof ops);
  ops.name = "cuda";
  ops.destroy = cuda_destroy;
  ops.alloc = cuda_alloc;
  ops.free = cuda_free;
  ops.alloc_host = cuda_alloc_host;
  ops.free_host = cuda_free_host;
  ops.to_device = cuda_to_device;
  ops.to_host = cuda_to_host;
  ops.copy = cuda_copy;
  ops.zero = cuda_zero;
  ops.device_memory = 1;
  ops.kv_fp8 = 1;
  ops.prepare_tensor = cuda_prepare_tensor;
  ops.release_tensor = cuda_release_tensor;
  ops.embed = cuda_embed;
  ops.matmul = cuda_matmul;
  ops.matmul_set = cuda_matmul_set;
  ops.rmsnorm = cuda_rmsnorm;
  ops.rope = cuda_rope;
  ops.rmsnorm_rope = cuda_rmsnorm_rope;
  ops.swiglu_oai = cuda_swiglu_oai;
  ops.add = cuda_add;
  ops.add_rmsnorm = cuda_add_rmsnorm;
  ops.argmax_rows = cuda_argmax_rows;
  ops.argmax_pairs = cuda_argmax_pairs;
  ops.sample_rows = cuda_sample_rows;
  ops.kv_store = cuda_kv_store;
  ops.kv_store_rope = cuda_kv_store_rope;
  ops.msa_select = cuda_msa_select;
  ops.attention = cuda_attention;
  ops.moe_route = cuda_moe_route;
  ops.prepare_experts = cuda_prepare_experts;
  ops.release_experts = cuda_release_experts;
  ops.moe_experts = cuda_moe_experts;
  ops.vision = &cuda_vision_ops;
  ops.graph_begin = cuda_graph_begin;
  ops.graph_end = cuda_graph_end;
  ops.graph_launch = cuda_graph_launch;
  ops.graph_free = cuda_graph_free;
  ops.memory_epoch = cuda_memory_epoch;
  ops.bind_thread = cuda_bind_thread;
  return ops;
}

static const m3_backend_ops cuda_ops = make_ops();

extern "C" m3_status m3_backend_cuda_create(int device, m3_backend **out) {
  *out = NULL;
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return m3_fail(M3_ERR_UNSUPPORTED, "cuda: no usable GPU (cudaGetDeviceCount: %s)",
                   cudaGetErrorString(e));
  }
  if (device < 0 || device >= count)
    return m3_fail(M3_ERR_UNSUPPORTED, "cuda:%d: this machine has %d GPU(s)", device, count);
  cudaDeviceProp prop;
  if ((e = cudaSetDevice(device)) != cudaSuccess ||
      (e = cudaGetDeviceProperties(&prop, device)) != cudaSuccess)
    return m3_fail(M3_ERR_UNSUPPORTED, "cuda:%d: %s", device, cudaGetErrorString(e));
  if (prop.major < 9)
    return m3_fail(M3_ERR_UNSUPPORTED, "cuda:%d: %s has compute capability %d.%d; this build "
                   "targets sm_90a (Hopper)", device, prop.name, prop.major, prop.minor);
  cuda_backend *cb = (cuda_backend *)calloc(1, sizeof *cb);
  if (!cb) return m3_fail(M3_ERR_NOMEM, "cuda backend: out of memory");
  cb->base.ops = &cuda_ops;
  cb->device = device;
  cb->num_sms = prop.multiProcessorCount;
  cb->smem_optin = (int)prop.sharedMemPerBlockOptin;
  const char *gemv_old = getenv("M3_CUDA_GEMV_OLD"), *mx1 = getenv("M3_CUDA_MX1");
  cb->gemv_old = gemv_old && strcmp(gemv_old, "1") == 0;
  cb->mx1_off = mx1 && strcmp(mx1, "0") == 0;
  cb->lt_workspace_bytes = LT_WORKSPACE_BYTES;
  const char *step = "cudaStreamCreate";
  e = cudaStreamCreateWithFlags(&cb->stream, cudaStreamNonBlocking);
  if (e == cudaSuccess) {
    step = "cudaMalloc (cuBLASLt workspace)";
    e = cudaMalloc(&cb->lt_workspace, cb->lt_workspace_bytes);
  }
  if (e != cudaSuccess) {
    cuda_destroy(&cb->base);
    return m3_fail(M3_ERR_UNSUPPORTED, "cuda:%d: %s: %s", device, step, cudaGetErrorString(e));
  }
  cublasStatus_t bs = cublasLtCreate(&cb->lt);
  if (bs != CUBLAS_STATUS_SUCCESS) {
    cb->lt = NULL;
    cuda_destroy(&cb->base);
    return m3_fail(M3_ERR_UNSUPPORTED, "cuda:%d: cublasLtCreate: %s", device,
                   cublasLtGetStatusString(bs));
  }
  m3_status st = cuda_moe_lanes_create(cb);
  if (st != M3_OK) {
    cuda_destroy(&cb->base);
    return st;
  }
  *out = &cb->base;
  return M3_OK;
}
