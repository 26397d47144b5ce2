// The bulk-copy W4A16 decode GEMM (kernels/quant/w4a16_bulk.cu), launched by l32_w4a16_gemm in w4a16.cu after its
// checks when params.kernel is L32_W4A16_BULK.
#pragma once

#include <cuda_runtime.h>

#include "llama32_kernels.h"

namespace l32 {
namespace quant {

// True when the current device runs the bulk kernel: sm_90a SASS in this build and compute capability 9.x.
bool w4a16_bulk_available();

// Launches the bulk kernel for checked parameters (k a multiple of 64, splits 1..=65535); refuses m > 16, a device
// without it (L32_UNSUPPORTED) and missing workspace pointers (L32_INVALID_ARGUMENT).
l32_status launch_w4a16_bulk(const l32_w4a16_params& p, cudaStream_t stream);

}  // namespace quant
}  // namespace l32
