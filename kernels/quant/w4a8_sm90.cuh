// The Hopper W4A8 GEMM (kernels/quant/w4a8_sm90.cu), launched by l32_w4a8_gemm in w4a8.cu after its checks when
// params.kernel is L32_W4A8_WGMMA or L32_W4A8_WGMMA_SERIAL.
#pragma once

#include <cuda_runtime.h>

#include "llama32_kernels.h"

namespace l32 {
namespace quant {

// True when the current device runs the wgmma kernel: sm_90a SASS in this build and compute capability 9.x.
bool w4a8_wgmma_available();

// Launches the wgmma kernel for checked parameters (k a multiple of 64, splits 1..=k / 64, tile_m 64 or 128, no
// zero points); refuses a device without it (L32_UNSUPPORTED).
l32_status launch_w4a8_wgmma(const l32_w4a8_params& p, cudaStream_t stream);

}  // namespace quant
}  // namespace l32
