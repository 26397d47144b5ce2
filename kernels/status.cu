// l32_last_cuda_error: the only launcher-independent entry of the C ABI (see llama32_kernels.h).
#include <cstdio>

#include "common/status.cuh"

extern "C" const char* l32_last_cuda_error(void) {
    // One static buffer per host thread, so the pointer stays valid until this thread's next call.
    static thread_local char message[256];
    const cudaError_t err = l32::last_cuda_error;
    if (err == cudaSuccess) return "no error";
    std::snprintf(message, sizeof message, "%s: %s", cudaGetErrorName(err), cudaGetErrorString(err));
    return message;
}

extern "C" void l32_set_programmatic_launch(int enabled) {
    l32::programmatic_launch_flag.store(enabled != 0 ? 1 : 0, std::memory_order_relaxed);
}

extern "C" int l32_programmatic_launch(void) { return l32::programmatic_launch_flag.load(std::memory_order_relaxed); }
