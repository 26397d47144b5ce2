// kernels/common/last_block.cuh: the "last block" pattern of the CUDA programming guide's reduction example, for
// the kernels where the blocks of a group write partial results and the last block to finish combines them in one
// launch: the split-K finish of the quantized GEMMs (quant::splitk_arrive) and the fused split merge of the paged
// decode attention.
#pragma once

#include "common/sync.cuh"

namespace l32 {

// Called by every thread of a block after it wrote its partials (plain stores). Returns true in every thread of
// the block whose arrival on counters[group] completes the group (the last of `arrivals`); that block may then read
// the group's partials (with __ldcg: they were written by other SMs, so L1 must not serve them). The last block
// resets the counter to 0 for the next launch (a CUDA graph replays with the same counters).
// The "block" is the threads that `sync` joins (sync.cuh); `leader` is true in exactly one of them.
template <class Sync>
__device__ __forceinline__ bool last_block_arrive(unsigned* counters, int group, int arrivals, bool leader,
                                                  Sync sync) {
    __shared__ bool last;
    __threadfence();  // this thread's partials are visible device-wide before the block's arrival is counted
    sync();
    if (leader) {
        const unsigned prev = atomicAdd(counters + group, 1u);
        last = prev == static_cast<unsigned>(arrivals - 1);
        if (last) counters[group] = 0;  // every block of the group has arrived: nobody else touches it this launch
    }
    sync();
    if (last) __threadfence();  // order the arrival before the reads of the other blocks' partials
    return last;
}

// The same for a whole thread block.
__device__ __forceinline__ bool last_block_arrive(unsigned* counters, int group, int arrivals) {
    return last_block_arrive(counters, group, arrivals, threadIdx.x == 0, CtaSync{});
}

}  // namespace l32
