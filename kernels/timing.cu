// kernels/timing.cu: l32_busy_wait, a kernel that only keeps its stream busy for a given time.
//
// The step profiler (engine/model/profile.rs, `llama32 bench --profile`) launches it before a profiled step: while
// the device waits, the host issues the whole step with CUDA events between its calls, so the step's kernels then
// run back to back and each event pair times device work rather than host launch latency. It reads and writes no
// memory, so it has no CPU twin; `cuda_kernels::busy_wait_keeps_the_stream_busy` checks its duration with events.
//
// One warp of one block polls the 64-bit %globaltimer (nanoseconds), sleeping between polls.
#include <cstdint>

#include "common/status.cuh"
#include "llama32_kernels.h"

namespace l32 {
namespace {

__device__ __forceinline__ uint64_t global_timer_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Tier 1. grid = 1, block = 32.
__global__ void busy_wait_kernel(uint64_t nanoseconds) {
    pdl_begin();
    const uint64_t start = global_timer_ns();
    while (global_timer_ns() - start < nanoseconds) __nanosleep(2000);
}

}  // namespace
}  // namespace l32

// Tier 3: the checked entry (there is no choice for a tier 2 to make).
extern "C" l32_status l32_busy_wait(uint64_t nanoseconds, void* stream) {
    if (nanoseconds > L32_BUSY_WAIT_MAX_NS) return L32_INVALID_ARGUMENT;
    l32::launch_kernel(l32::busy_wait_kernel, dim3(1), dim3(32), 0, static_cast<cudaStream_t>(stream), nanoseconds);
    return l32::check_launch();
}
