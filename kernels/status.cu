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
