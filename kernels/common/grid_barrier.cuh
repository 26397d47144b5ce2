// kernels/common/grid_barrier.cuh: a barrier among all blocks of a grid whose blocks are all resident at once (a
// cooperative launch of at most the occupancy's blocks): the grid probe (grid_probe.cu) and the persistent decode
// stack (decode_layers.cu).
//
// Thread 0 of each block arrives on a counter whose top bit flips when the last block arrives (grid_barrier below)
// and polls it with acquire loads. A poll that never sees the flip (a block not resident, which a cooperative launch
// rules out) traps after 2^26 tries instead of hanging the GPU.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/status.cuh"

namespace l32 {

constexpr unsigned kGridSpinLimit = 1u << 26;

// The GPU's global nanosecond timer (%globaltimer: one clock for every SM, unlike clock64), for profiling.
__device__ __forceinline__ uint64_t global_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Every block of the grid waits here until all have arrived; their global writes before it are visible to every
// block after it (read them from L2: ld.global.cg, __ldcg or cp.async.cg; L1 is not coherent across SMs).
// sync[0] counts arrivals: block 0 adds 2^31 - (blocks - 1) and every other block 1, so one barrier's arrivals sum
// to 2^31 exactly: the top bit flips when the last block arrives, and the low bits are zero again. Each block waits
// (acquire loads) until the top bit differs from what it saw at its own arrival, which cannot happen before every
// block has arrived, and cannot flip back before the waiter itself arrives at the next barrier. Nothing is reset, so
// any launch may start where the last one left the word (a CUDA graph replays it). One atomic and one poll on the
// critical path, the scheme of cooperative groups' grid sync. sync[1] is not used.
// Profiling: `arrive` and `depart`, when not null, get thread 0's global_ns() once every thread of the block has
// arrived and once the barrier has opened for it.
__device__ __forceinline__ void grid_barrier(unsigned* sync, uint64_t* arrive = nullptr, uint64_t* depart = nullptr) {
    __syncthreads();
    if (threadIdx.x == 0) {
        if (arrive != nullptr) *arrive = global_ns();
        const unsigned add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
        __threadfence();  // this block's writes (gathered by __syncthreads) are visible before its arrival counts
        const unsigned seen = atomicAdd(sync, add);
        for (unsigned tries = 0; ((ld_acquire(sync) ^ seen) & 0x80000000u) == 0; ++tries) {
            if (tries == kGridSpinLimit) __trap();
        }
        __threadfence();
        if (depart != nullptr) *depart = global_ns();
    }
    __syncthreads();
}

// Blocks of a cooperative launch of `kernel` with one block per SM: the SM count of the current device, or 0 where
// one block of `threads` threads and `smem` bytes of dynamic shared memory cannot be resident on an SM. A failed
// query's error is taken off the runtime's last-error slot, so that the caller's refusal (L32_UNSUPPORTED) is the
// only report of it and the next launch's check_launch() does not blame that launch.
template <class Kernel>
int one_block_per_sm(Kernel kernel, int threads, size_t smem) {
    int device = 0, sms = 0, per_sm = 0;
    const bool ok = cudaGetDevice(&device) == cudaSuccess &&
                    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess &&
                    allow_dynamic_smem(kernel, smem) == L32_OK &&
                    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem) == cudaSuccess;
    if (!ok) {
        (void)cudaGetLastError();
        return 0;
    }
    return per_sm >= 1 ? sms : 0;
}

// Launches `kernel(params)` cooperatively (every block resident at once, or the launch fails) with `blocks` blocks:
// the cooperative attribute of cudaLaunchKernelEx, which is what cudaLaunchCooperativeKernel sets and which a CUDA
// graph keeps on a captured kernel node ("valid for graph nodes, launches"). A launch error is left for
// check_launch().
template <class Params>
void launch_cooperative(void (*kernel)(Params), int blocks, int threads, size_t smem, cudaStream_t stream,
                        const Params& params) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(blocks));
    cfg.blockDim = dim3(static_cast<unsigned>(threads));
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    (void)cudaLaunchKernelEx(&cfg, kernel, params);
}

}  // namespace l32
