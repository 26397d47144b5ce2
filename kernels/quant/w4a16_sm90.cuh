// The Hopper W4A16 GEMM for many rows (kernels/quant/w4a16_sm90.cu), launched by l32_w4a16_gemm in w4a16.cu after
// its checks when params.kernel is L32_W4A16_WGMMA.
#pragma once

#include <cuda_runtime.h>

#include "llama32_kernels.h"

namespace l32 {
namespace quant {

// True when the current device runs the wgmma W4A16 kernel: sm_90a SASS in this build and compute capability 9.x.
bool w4a16_wgmma_available();

// Launches the wgmma kernel for checked parameters (k a multiple of 64); refuses splits other than 1, tile_m other
// than 64 or 128, and a device without it (L32_UNSUPPORTED).
l32_status launch_w4a16_wgmma(const l32_w4a16_params& p, cudaStream_t stream);

}  // namespace quant
}  // namespace l32
