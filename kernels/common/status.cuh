// Host-side status helpers shared by every launcher: the last CUDA error per host thread, and the launch check.
#pragma once

#include <cuda_runtime.h>

#include "common/launch.cuh"
#include "llama32_kernels.h"

namespace l32 {

// The error behind the last L32_LAUNCH_FAILED on this host thread; read by l32_last_cuda_error() (kernels/status.cu).
inline thread_local cudaError_t last_cuda_error = cudaSuccess;

// Call right after a launch: turns a launch error (bad configuration, no kernel image for this device, a sticky
// error from an earlier kernel) into L32_LAUNCH_FAILED and remembers which error it was.
inline l32_status check_launch() {
    const cudaError_t err = cudaGetLastError();
    if (err == cudaSuccess) return L32_OK;
    last_cuda_error = err;
    return L32_LAUNCH_FAILED;
}

// Call before launching `kernel` with `bytes` of dynamic shared memory: above `limit` (48 KB, the default cap;
// less where the kernel's static shared memory adds to it) the kernel must be opted in, per device and cheaply, so on
// every launch. A refusal becomes L32_LAUNCH_FAILED with its error remembered, as in check_launch.
template <class Kernel>
inline l32_status allow_dynamic_smem(Kernel kernel, size_t bytes, size_t limit = 48 * 1024) {
    if (bytes <= limit) return L32_OK;
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err == cudaSuccess) return L32_OK;
    last_cuda_error = err;
    return L32_LAUNCH_FAILED;
}

}  // namespace l32
