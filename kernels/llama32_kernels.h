/*
 * llama32_kernels.h: the C ABI of llama32's CUDA kernels.
 *
 * One `l32_<family>_params` struct and one launcher per kernel family. A launcher takes device pointers (never host
 * memory), returns an `l32_status`, never allocates, and checks `cudaGetLastError` after its launch. `stream` is a
 * `cudaStream_t` / `CUstream` passed as `void*`.
 *
 * This header is plain C with no CUDA types, so bindgen reads it without the CUDA headers
 * (build.rs turns it into OUT_DIR/kernels.rs). Shapes are written `[rows, hidden]`, row-major, strides in elements.
 */
#ifndef LLAMA32_KERNELS_H
#define LLAMA32_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** What a launcher returns. Anything but L32_OK means nothing was launched, or the launch failed. */
typedef enum l32_status {
    L32_OK = 0,
    /** A null pointer, a negative or zero size, a stride shorter than a row, a negative eps. */
    L32_INVALID_ARGUMENT = 1,
    /** Well formed, but outside what the family implements (dtype, size range). */
    L32_UNSUPPORTED = 2,
    /** The launch itself failed: `l32_last_cuda_error()` names the CUDA error. */
    L32_LAUNCH_FAILED = 3,
} l32_status;

/** Element type of a family's tensors; each family states the values it supports. */
typedef enum l32_dtype {
    L32_DTYPE_BF16 = 0,
    L32_DTYPE_F16 = 1,
    L32_DTYPE_F32 = 2,
} l32_dtype;

/**
 * The name of the CUDA error behind the last L32_LAUNCH_FAILED returned on this host thread
 * (e.g. "cudaErrorNoKernelImageForDevice: no kernel image is available for execution on the device"),
 * or "no error". The string is static.
 */
const char* l32_last_cuda_error(void);

/* ---------------------------------------------------------------------------------------------------------------- */
/* norm (kernels/norm.cu): Llama's RMSNorm, optionally fused with the residual add before it.                        */
/* ---------------------------------------------------------------------------------------------------------------- */

/**
 * For each row r < rows, with h = residual[r] + x[r] when `residual` is set and h = x[r] otherwise:
 *
 * - residual[r] = bf16(h)   (only when `residual` is set: updated in place)
 * - out[r] = bf16(weight * bf16(bf16(h) * rsqrt(mean(bf16(h)^2) + eps)))
 *
 * which is HF's `LlamaRMSNorm` after HF's bf16 residual add: the sum of squares is accumulated in fp32, the residual
 * stream is rounded to bf16, and the normalized row is rounded to bf16 before the weight multiply.
 * dtype: L32_DTYPE_BF16 only. `out` may alias `x`; nothing else may alias.
 */
typedef struct l32_norm_params {
    void* out;              /**< [rows, hidden] at row stride out_stride */
    const void* x;          /**< [rows, hidden] at row stride x_stride */
    void* residual;         /**< [rows, hidden] at row stride residual_stride, read and written; NULL: plain RMSNorm */
    const void* weight;     /**< [hidden] */
    int64_t rows;           /**< any count >= 0 (0 launches nothing), at most 2^31 - 1 */
    int64_t hidden;         /**< 1 ..= 2^30; a multiple of 8 with 16-byte aligned rows takes the vector path */
    int64_t x_stride;       /**< elements between rows of x, >= hidden */
    int64_t residual_stride; /**< elements between rows of residual, >= hidden (ignored without residual) */
    int64_t out_stride;     /**< elements between rows of out, >= hidden */
    float eps;              /**< >= 0, added to the mean square (Llama 3.2: 1e-5) */
    l32_dtype dtype;        /**< L32_DTYPE_BF16 */
} l32_norm_params;

/** Launches the norm family on `stream`. */
l32_status l32_norm(const l32_norm_params* params, void* stream);

/* ---------------------------------------------------------------------------------------------------------------- */
/* embedding gather (kernels/embedding.cu) */
/* BEGIN embedding */
/* END embedding */

/* ---------------------------------------------------------------------------------------------------------------- */
/* fused llama3 RoPE on q/k + paged KV-cache write (kernels/rope.cu) */
/* BEGIN rope */
/* END rope */

/* ---------------------------------------------------------------------------------------------------------------- */
/* SiLU(gate) * up (kernels/activation.cu) */
/* BEGIN activation */
/* END activation */

/* ---------------------------------------------------------------------------------------------------------------- */
/* causal flash attention over the paged KV cache, prefill and split-KV decode (kernels/attention/) */
/* BEGIN attention */
/* END attention */

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* LLAMA32_KERNELS_H */
