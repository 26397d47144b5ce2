// kernels/common/grid_barrier.cuh: a barrier among all blocks of a grid whose blocks are all resident at once (a
// cooperative launch of at most the occupancy's blocks): the grid probe (grid_probe.cu) and the persistent decode
// stack (decode_layers.cu).
//
// Thread 0 of each block reads the generation, arrives on the count (after a fence that publishes the block's
// writes, gathered by __syncthreads), and the last arrival resets the count and bumps the generation; the others
// poll the generation with acquire loads. Every launch leaves the count at 0, so a CUDA graph can replay it. A poll
// that never sees the generation move (a block not resident, which a cooperative launch rules out) traps after
// 2^26 tries instead of hanging the GPU.
#pragma once

#include <cuda_runtime.h>

#include "common/status.cuh"

namespace l32 {

constexpr unsigned kGridSpinLimit = 1u << 26;

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Every block of the grid waits here until all have arrived; their global writes before it are visible to every
// block after it (read them with __ldcg: L1 is not coherent). sync[0]: arrivals, sync[1]: generation.
__device__ __forceinline__ void grid_barrier(unsigned* sync) {
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned gen = ld_acquire(sync + 1);
        __threadfence();
        if (atomicAdd(sync, 1u) == gridDim.x - 1) {
            atomicExch(sync, 0u);  // nobody arrives at the next barrier before it sees the generation move
            __threadfence();
            atomicAdd(sync + 1, 1u);
        } else {
            for (unsigned tries = 0; ld_acquire(sync + 1) == gen; ++tries) {
                if (tries == kGridSpinLimit) __trap();
            }
        }
        __threadfence();
    }
    __syncthreads();
}

// Blocks of a cooperative launch of `kernel` with one block per SM: the SM count of the current device, or 0 where
// one block of `threads` threads and `smem` bytes of dynamic shared memory cannot be resident on an SM.
template <class Kernel>
int one_block_per_sm(Kernel kernel, int threads, size_t smem) {
    int device = 0, sms = 0, per_sm = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
    if (allow_dynamic_smem(kernel, smem) != L32_OK) return 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem) != cudaSuccess) return 0;
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
