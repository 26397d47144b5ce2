// Host-side status helpers shared by every launcher: the last CUDA error per host thread, and the launch check.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

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

// Call before launching `kernel` with `bytes` of dynamic shared memory. A block may use 48 KB of shared memory,
// static and dynamic together, unless its kernel is opted in to more (per device, up to the device's opt-in limit).
// So when the kernel's static shared memory plus `bytes` exceeds 48 KB, this raises the kernel's dynamic limit to
// `bytes`, or keeps the higher limit an earlier launch set (a captured graph may still launch with it): it never
// lowers it. Checked on every launch (two cheap runtime calls above 48 KB, one below). A refusal becomes
// L32_LAUNCH_FAILED with its error remembered, as in check_launch.
template <class Kernel>
inline l32_status allow_dynamic_smem(Kernel kernel, size_t bytes) {
    if (bytes == 0) return L32_OK;
    cudaFuncAttributes attr{};
    cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
    if (err == cudaSuccess) {
        if (bytes + attr.sharedSizeBytes <= 48 * 1024) return L32_OK;
        const size_t raised = std::max(bytes, static_cast<size_t>(std::max(attr.maxDynamicSharedSizeBytes, 0)));
        err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(raised));
    }
    if (err == cudaSuccess) return L32_OK;
    last_cuda_error = err;
    return L32_LAUNCH_FAILED;
}

}  // namespace l32
