// Device pieces both W4A16 decode kernels share (kernels/quant/w4a16.cu, kernels/quant/w4a16_pipelined.cu): bf16
// halves of the layout's packed scale and bias words, and the deterministic split-K finish of a block of rows.
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

#include "common/bf16.cuh"
#include "llama32_kernels.h"
#include "quant/common.cuh"

namespace l32 {
namespace quant {

// f32 of the bf16 in the low (hi = false) or high half of a 32-bit word.
__device__ __forceinline__ float bf16_half(uint32_t w, bool hi) {
    return __uint_as_float(hi ? (w & 0xFFFF0000u) : (w << 16));
}

// The bf16 pair (v, v) from the bf16 in the low or high half of w.
__device__ __forceinline__ uint32_t bf16_splat(uint32_t w, bool hi) {
    const uint32_t h = hi ? (w >> 16) : (w & 0xFFFFu);
    return h | (h << 16);
}

// Split-K finish of the block of `block_rows` output rows blockIdx.x covers (every thread of the block calls it
// after writing its f32 partials): the last split to arrive sums all splits in split order and writes bf16.
__device__ __forceinline__ void w4a16_finish_split(const l32_w4a16_params& p, int m, int64_t npad, int block_rows) {
    if (!splitk_arrive(p.counters, blockIdx.x, p.splits)) return;
    auto* out = static_cast<bf16*>(p.out);
    for (int i = threadIdx.x; i < m * block_rows; i += blockDim.x) {
        const int tok = i / block_rows;
        const int64_t row = int64_t{blockIdx.x} * block_rows + i % block_rows;
        if (row >= p.n) continue;
        float s = 0.f;
        for (int sp = 0; sp < p.splits; ++sp) s += __ldcg(p.partials + (int64_t{sp} * m + tok) * npad + row);
        out[tok * p.n + row] = __float2bfloat16_rn(s);
    }
}

}  // namespace quant
}  // namespace l32
