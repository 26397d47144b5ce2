// Block-wide reductions and scans beyond reduce.cuh's block_sum: u64 max, paired f64 sums, an inclusive f64 scan and
// "first thread whose flag is set". For 1-D blocks whose size is a multiple of 32 (at most 1024 threads).
//
// Every helper ends with a __syncthreads(), so its static shared buffer may be reused by the next call without an
// extra barrier in the caller; every thread of the block must call it (no divergent calls).
#pragma once

#include <climits>
#include <cstdint>

#include "common/reduce.cuh"

namespace l32 {

// Every thread ends with the block's largest v.
__device__ __forceinline__ uint64_t block_max_u64(uint64_t v) {
    __shared__ uint64_t partial[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const uint64_t w = __shfl_xor_sync(kFullWarp, v, o);
        v = w > v ? w : v;
    }
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < blockDim.x / 32 ? partial[lane] : 0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const uint64_t w = __shfl_xor_sync(kFullWarp, v, o);
        v = w > v ? w : v;
    }
    __syncthreads();
    return v;
}

// Two f64 block sums at once; every thread ends with both totals, summed in the same fixed order on every thread
// (so two calls over the same values give the same bits).
struct Sum2 {
    double a;
    double b;
};

__device__ __forceinline__ Sum2 block_sum2(double a, double b) {
    __shared__ double pa[32], pb[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_xor_sync(kFullWarp, a, o);
        b += __shfl_xor_sync(kFullWarp, b, o);
    }
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) {
        pa[warp] = a;
        pb[warp] = b;
    }
    __syncthreads();
    a = lane < blockDim.x / 32 ? pa[lane] : 0.0;
    b = lane < blockDim.x / 32 ? pb[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_xor_sync(kFullWarp, a, o);
        b += __shfl_xor_sync(kFullWarp, b, o);
    }
    __syncthreads();
    return {a, b};
}

// Every thread ends with the block's smallest v.
__device__ __forceinline__ float block_min(float v) {
    __shared__ float partial[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(kFullWarp, v, o));
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < blockDim.x / 32 ? partial[lane] : INFINITY;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(kFullWarp, v, o));
    __syncthreads();
    return v;
}

// Inclusive scan in thread order: returns v(0) + ... + v(threadIdx.x); `total` receives the block's sum.
// Kogge-Stone within each warp, then over the warp totals.
__device__ __forceinline__ double block_inclusive_scan(double v, double& total) {
    __shared__ double partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const double y = __shfl_up_sync(kFullWarp, v, o);
        if (lane >= o) v += y;
    }
    if (lane == 31) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double t = lane < warps ? partial[lane] : 0.0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const double y = __shfl_up_sync(kFullWarp, t, o);
            if (lane >= o) t += y;
        }
        if (lane < warps) partial[lane] = t;
    }
    __syncthreads();
    total = partial[warps - 1];
    const double offset = warp > 0 ? partial[warp - 1] : 0.0;
    __syncthreads();
    return offset + v;
}

// The lowest threadIdx.x whose `flag` is true, or -1 when none is.
__device__ __forceinline__ int block_first(bool flag) {
    __shared__ int first;
    if (threadIdx.x == 0) first = INT_MAX;
    __syncthreads();
    if (flag) atomicMin(&first, static_cast<int>(threadIdx.x));
    __syncthreads();
    const int r = first;
    __syncthreads();
    return r == INT_MAX ? -1 : r;
}

}  // namespace l32
