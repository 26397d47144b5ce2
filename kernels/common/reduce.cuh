// Warp and block sums over fp32, for blocks whose size is a multiple of 32 (at most 1024 threads).
#pragma once

namespace l32 {

constexpr unsigned kFullWarp = 0xffffffffu;

// Butterfly sum: every lane ends with the total of the warp, summed in the same order on every lane.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullWarp, v, offset);
    return v;
}

// Every thread of a 1-D block ends with the block total. A one-warp block needs no shared memory and no barrier.
// Each warp reduces the per-warp partials itself, so there is no broadcast and only one __syncthreads; in exchange
// the static `partial` buffer is reused: a kernel that calls block_sum twice must __syncthreads() between the calls.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    v = warp_sum(v);
    if (blockDim.x == 32) return v;
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < blockDim.x / 32 ? partial[lane] : 0.f;
    return warp_sum(v);
}

}  // namespace l32
