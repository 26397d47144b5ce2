// The output side shared by the W4A8 kernels (kernels/quant/w4a8.cu, kernels/quant/w4a8_sm90.cu): the finish of one
// output from its f32 sum of scaled group terms, and the deterministic split-K sum over a block's tile.
#pragma once

#include <cstdint>

#include "common/bf16.cuh"
#include "llama32_kernels.h"
#include "quant/common.cuh"

namespace l32 {
namespace quant {

// out[tok, row] = bf16(x_scales[tok] * (v - x_zeros[tok] * row_corr[row])), v the f32 sum of the output's scaled
// group terms (see l32_w4a8_params): the activation zero point removed once per output.
__device__ __forceinline__ void w4a8_finish(const l32_w4a8_params& p, float v, int tok, int64_t row) {
    const float centered = fmaf(-static_cast<float>(p.x_zeros[tok]), p.row_corr[row], v);
    static_cast<bf16*>(p.out)[tok * p.n + row] = __float2bfloat16_rn(p.x_scales[tok] * centered);
}

// Split-K, part 2, called by every thread of the block after it stored its f32 partials at
// p.partials[(split * m + tok) * npad + row]: the block whose arrival completes tile `tile` (splitk_arrive) sums
// the partials of the tokens [m0, m0 + bm) and rows [row0, row0 + bn) over the splits in split order, from 0, and
// finishes them.
__device__ __forceinline__ void w4a8_splitk_finish(const l32_w4a8_params& p, int tile, int m0, int bm, int64_t row0,
                                                   int bn, int64_t npad) {
    if (!splitk_arrive(p.counters, tile, p.splits)) return;
    const int m = static_cast<int>(p.m);
    for (int i = threadIdx.x; i < bm * bn; i += blockDim.x) {
        const int tok = m0 + i / bn;
        const int64_t row = row0 + i % bn;
        if (tok >= m || row >= p.n) continue;
        float v = 0.f;
        for (int sp = 0; sp < p.splits; ++sp) v += __ldcg(p.partials + (int64_t{sp} * m + tok) * npad + row);
        w4a8_finish(p, v, tok, row);
    }
}

}  // namespace quant
}  // namespace l32
