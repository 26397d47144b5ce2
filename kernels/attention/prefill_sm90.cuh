// The Hopper paged prefills (kernels/attention/prefill_sm90.cu and its warp-specialized form prefill_sm90_ws.cu),
// launched by l32_paged_prefill in prefill.cu after its checks when params.kernel is L32_PREFILL_WGMMA or
// L32_PREFILL_WGMMA_WS.
#pragma once

#include <cuda_runtime.h>

#include "llama32_kernels.h"

namespace l32 {

// Launches the wgmma prefill (params.kernel L32_PREFILL_WGMMA) for checked parameters (head_dim 64 or 128, at least
// one token); L32_UNSUPPORTED when the current device is not compute capability 9.x.
l32_status launch_paged_prefill_wgmma(const l32_paged_prefill_params& p, cudaStream_t stream);

// The warp-specialized wgmma prefill, as launch_paged_prefill_wgmma.
l32_status launch_paged_prefill_wgmma_ws(const l32_paged_prefill_params& p, cudaStream_t stream);

// True when the wgmma kernels can run here: built with sm_90a SASS, on a compute capability 9.x device.
bool prefill_wgmma_available();

}  // namespace l32
