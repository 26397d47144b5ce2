// kernels/grid_probe.cu: l32_grid_probe, the measurements a persistent per-step decode kernel needs before it is
// written (docs/architecture.md, "one persistent kernel per step"):
//   - BARRIER: the latency of a grid barrier among one block per SM of a cooperative launch, and a check of it: in
//     every phase each block writes a tag, and after the barrier reads its neighbour's; a wrong tag is counted;
//   - STREAM: the rate of a weight-like stream through a shared-memory ring (cp.async, kStages chunks of 16 KB per
//     block in flight), every byte folded so that the loads stay;
//   - STREAM_BARRIER: the same stream cut by `phases` grid barriers, with the ring's next chunks in flight while a
//     block waits at one: whether the stream continues across barriers, as a persistent step's must;
//   - BARRIER_ATOMIC: BARRIER with the barrier's earlier form (grid_barrier_atomic), for the comparison.
// It computes nothing a model uses, so it has no CPU twin; the GPU test checks the barrier's tags and the fold.
// The barrier is common/grid_barrier.cuh's GridBarrier (the persistent decode stack's): one red.release arrival per
// block on a counter whose top bit flips when the last block arrives, acquire polls, a trap instead of a hang.
#include <cstdint>

#include "common/grid_barrier.cuh"
#include "common/status.cuh"
#include "llama32_kernels.h"

namespace l32 {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = L32_GRID_PROBE_CHUNK;  // bytes per block per ring stage: 4 16-byte copies per thread
constexpr int kStages = 8;                    // 128 KB of ring per block: one block per SM
constexpr int kSmem = kStages * kChunk;
static_assert(kChunk == 4 * 16 * kThreads, "four 16-byte copies per thread per chunk");

__device__ __forceinline__ void copy16(void* smem, const void* gmem) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}

__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void wait_groups() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// The barrier under test: GridBarrier, or in BARRIER_ATOMIC its earlier form.
template <int kMode>
__device__ __forceinline__ void probe_barrier(GridBarrier& bar, unsigned* sync) {
    if constexpr (kMode == L32_GRID_PROBE_BARRIER_ATOMIC) {
        grid_barrier_atomic(sync);
    } else {
        bar.wait();
    }
}

// Tier 1. grid = one block per SM (cooperative), block = kThreads, dynamic shared memory kSmem for the stream modes.
template <int kMode>
__global__ void __launch_bounds__(kThreads, 1) grid_probe_kernel(const __grid_constant__ l32_grid_probe_params p) {
    pdl_begin();  // a cooperative launch is never programmatic, so this returns at once; every kernel has it
    const unsigned b = blockIdx.x, nb = gridDim.x;
    GridBarrier bar(p.sync);  // unused by STREAM and BARRIER_ATOMIC: one load of thread 0 at the start
    if constexpr (kMode == L32_GRID_PROBE_BARRIER || kMode == L32_GRID_PROBE_BARRIER_ATOMIC) {
        unsigned wrong = 0;
        for (int phase = 0; phase < p.phases; ++phase) {
            if (threadIdx.x == 0) p.tags[b] = static_cast<unsigned>(phase) * nb + b;
            probe_barrier<kMode>(bar, p.sync);
            if (threadIdx.x == 0) {
                const unsigned next = (b + 1) % nb;
                wrong += __ldcg(p.tags + next) != static_cast<unsigned>(phase) * nb + next;
            }
            probe_barrier<kMode>(bar, p.sync);  // no tag is overwritten before its reader has read it
        }
        if (threadIdx.x == 0) p.out[b] = wrong;
        return;
    } else {
        extern __shared__ __align__(16) unsigned char ring[];
        const auto* src = static_cast<const unsigned char*>(p.src);
        // This block's chunks: b, b + nb, b + 2 nb, ... of the buffer, so that all blocks sweep it together.
        const int64_t total = p.bytes / kChunk;
        const int64_t mine = (total - b + nb - 1) / nb;
        const int64_t fewest = total / nb;  // every block has at least this many: the barriers' positions
        auto issue = [&](int64_t i) {
            const unsigned char* from = src + (static_cast<int64_t>(b) + i * nb) * kChunk;
            unsigned char* to = ring + (i % kStages) * kChunk;
#pragma unroll
            for (int v = 0; v < 4; ++v) {
                const int at = (v * kThreads + threadIdx.x) * 16;
                copy16(to + at, from + at);
            }
        };
#pragma unroll
        for (int s = 0; s < kStages - 1; ++s) {
            if (s < mine) issue(s);
            commit();
        }
        unsigned fold = 0;
        int k = 1;  // the next barrier, after local chunk k * fewest / (phases + 1) - 1
        for (int64_t i = 0; i < mine; ++i) {
            wait_groups<kStages - 2>();  // chunk i has landed for this thread ...
            __syncthreads();             // ... and for every thread; the stage of chunk i - 1 is free
            if (i + kStages - 1 < mine) issue(i + kStages - 1);
            commit();
            // Each thread folds 64 bytes another warp copied, so the chunk must really be there.
            const auto* stage = reinterpret_cast<const uint4*>(ring + (i % kStages) * kChunk);
#pragma unroll
            for (int v = 0; v < 4; ++v) {
                const uint4 x = stage[v * kThreads + (threadIdx.x + 32) % kThreads];
                fold ^= x.x ^ x.y ^ x.z ^ x.w;
            }
            if constexpr (kMode == L32_GRID_PROBE_STREAM_BARRIER) {
                if (k <= p.phases && i + 1 == static_cast<int64_t>(k) * fewest / (p.phases + 1)) {
                    bar.wait();
                    ++k;
                }
            }
        }
        wait_groups<0>();
        fold = __reduce_xor_sync(0xffffffffu, fold);
        if (threadIdx.x % 32 == 0) atomicXor(p.out + b, fold);
    }
}

// One block per SM when the kernel fits there once with its shared memory, else 0.
template <int kMode>
int probe_blocks(size_t smem) {
    return one_block_per_sm(grid_probe_kernel<kMode>, kThreads, smem);
}

// Tier 2: a cooperative launch (every block resident, or the launch fails) of one block per SM.
template <int kMode>
l32_status launch(const l32_grid_probe_params& p, cudaStream_t stream) {
    constexpr bool kStream = kMode == L32_GRID_PROBE_STREAM || kMode == L32_GRID_PROBE_STREAM_BARRIER;
    const size_t smem = kStream ? kSmem : 0;
    const int blocks = probe_blocks<kMode>(smem);
    if (blocks == 0) return L32_UNSUPPORTED;
    if (kStream && p.bytes / kChunk < int64_t{blocks} * (p.phases + 1)) {
        return L32_INVALID_ARGUMENT;  // a chunk per block and barrier interval, at least
    }
    launch_cooperative(grid_probe_kernel<kMode>, blocks, kThreads, smem, stream, p);
    return check_launch();
}

}  // namespace
}  // namespace l32

// Tier 3: the checked entries.
extern "C" int32_t l32_grid_probe_blocks(void) { return l32::probe_blocks<L32_GRID_PROBE_STREAM>(l32::kSmem); }

extern "C" l32_status l32_grid_probe(const l32_grid_probe_params* params, void* stream) {
    using namespace l32;
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_grid_probe_params& p = *params;
    if (p.sync == nullptr || p.out == nullptr || p.phases < 0 || p.phases > L32_GRID_PROBE_MAX_PHASES) {
        return L32_INVALID_ARGUMENT;
    }
    const auto s = static_cast<cudaStream_t>(stream);
    switch (p.mode) {
        case L32_GRID_PROBE_BARRIER:
        case L32_GRID_PROBE_BARRIER_ATOMIC:
            if (p.tags == nullptr) return L32_INVALID_ARGUMENT;
            return p.mode == L32_GRID_PROBE_BARRIER ? launch<L32_GRID_PROBE_BARRIER>(p, s)
                                                    : launch<L32_GRID_PROBE_BARRIER_ATOMIC>(p, s);
        case L32_GRID_PROBE_STREAM:
        case L32_GRID_PROBE_STREAM_BARRIER:
            if (p.src == nullptr || p.bytes <= 0 || p.bytes % L32_GRID_PROBE_CHUNK != 0) return L32_INVALID_ARGUMENT;
            if (reinterpret_cast<uintptr_t>(p.src) % 16 != 0) return L32_UNSUPPORTED;
            return p.mode == L32_GRID_PROBE_STREAM ? launch<L32_GRID_PROBE_STREAM>(p, s)
                                                   : launch<L32_GRID_PROBE_STREAM_BARRIER>(p, s);
        default:
            return L32_INVALID_ARGUMENT;
    }
}
