// The Hopper W4A8 GEMM (kernels/quant/w4a8_sm90.cu), launched by l32_w4a8_gemm in w4a8.cu after its checks when
// params.kernel is one of the Hopper kernels (L32_W4A8_WGMMA ...), and the TMA-fed ones (w4a8_sm90_tma.cu).
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

// True when every tensor-map box of the TMA kernels fits inside its tensor: at least tile_m tokens, 8 weight tiles
// (n > 112) and two 64-column chunks (the scales box spans two). The encoder accepts larger boxes, but other
// projects report that copies through them fault (pytorch/helion#2555).
bool w4a8_tma_boxes_fit(const l32_w4a8_params& p);

// Launches a TMA kernel (p.kernel L32_W4A8_WGMMA_TMA or L32_W4A8_WGMMA_WS_TMA; kernels/quant/w4a8_sm90_tma.cu) for
// parameters that launch_w4a8_wgmma checked and whose boxes fit.
l32_status launch_w4a8_wgmma_tma(const l32_w4a8_params& p, cudaStream_t stream);

}  // namespace quant
}  // namespace l32
