// The tiled W4A16 decode GEMM (kernels/quant/w4a16_tiled.cu), launched by l32_w4a16_gemm in w4a16.cu after its
// checks when params.kernel is L32_W4A16_TILED.
#pragma once

#include <cuda_runtime.h>

#include "llama32_kernels.h"

namespace l32 {
namespace quant {

// Launches the tiled kernel for checked parameters (m in 1..=64, k a multiple of 64, splits valid).
l32_status launch_w4a16_tiled(const l32_w4a16_params& p, cudaStream_t stream);

}  // namespace quant
}  // namespace l32
