// The row arithmetic of RMSNorm (HF's numerics), shared by kernels/norm.cu and the gemv's norm prologue
// (kernels/gemv.cu), which must give the same bits: the same per-thread sums of squares, the same reduction tree,
// the same rounding of the normalized row.
#pragma once

#include <cstdint>

#include "common/bf16.cuh"

namespace l32 {

// The most threads of an l32_norm block.
constexpr int kNormMaxThreads = 512;

// How l32_norm splits a row of `vecs` 16-byte vectors (8 bf16 each): `per_thread` vectors per thread (the smallest
// of 1, 2, 4, 8 that covers the row with at most kNormMaxThreads threads; thread t holds vectors t + i * threads)
// and `threads` (a multiple of 32). per_thread = 0: the row is longer than 8 * kNormMaxThreads vectors and is
// streamed twice (threads = kNormMaxThreads).
struct NormSplit {
    int per_thread;
    int threads;
};

__host__ __device__ inline NormSplit norm_split_vec8(int64_t vecs) {
    for (int per = 1; per <= 8; per *= 2) {
        if (vecs <= int64_t{per} * kNormMaxThreads) {
            return {per, static_cast<int>(((vecs + per - 1) / per + 31) / 32 * 32)};
        }
    }
    return {0, kNormMaxThreads};
}

// 1 / rms of a row from its sum of squares: rsqrt(sum / hidden + eps), with one explicit rounding of the fma.
__device__ __forceinline__ float rms_inv(float sum_sq, float inv_hidden, float eps) {
    return rsqrtf(__fmaf_rn(sum_sq, inv_hidden, eps));
}

// bf16(w * bf16(h * inv)): the two roundings of HF's `weight * hidden.to(bf16)`.
template <int W>
__device__ __forceinline__ BF16Vec<W> norm_scale(const BF16Vec<W>& h, const BF16Vec<W>& w, float inv) {
    BF16Vec<W> r;
#pragma unroll
    for (int i = 0; i < W; ++i) r.set(i, w.get(i) * __bfloat162float(__float2bfloat16_rn(h.get(i) * inv)));
    return r;
}

}  // namespace l32
