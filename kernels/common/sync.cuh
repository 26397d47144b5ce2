// kernels/common/sync.cuh: the barrier a block-level device function waits at, as a type. Functions such as the
// paged decode's split (attention/decode_device.cuh) run either as a whole kernel's block (CtaSync:
// __syncthreads) or as a group of warps inside a larger block of the persistent decode stack (NamedSync: a named
// barrier of that group's threads only), with the same code in between.
#pragma once

namespace l32 {

// Every thread of the block.
struct CtaSync {
    __device__ __forceinline__ void operator()() const { __syncthreads(); }
};

// Named barrier `id` (1 ..= 15; 0 is __syncthreads') among `threads` threads (a multiple of 32), the warps of one
// group. Each of the group's warps must reach it; the block's other warps do not take part.
struct NamedSync {
    int id;
    int threads;
    __device__ __forceinline__ void operator()() const {
        asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
    }
};

}  // namespace l32
