// kernels/quant/w4a16_pipelined.cu: the pipelined W4A16 decode GEMM (l32_w4a16_params.kernel ==
// L32_W4A16_PIPELINED), the same product as the direct kernel in w4a16.cu over the same layout, organised so that
// the weight stream never waits on the arithmetic. Entered through l32_w4a16_gemm, which checks the parameters.
//
// Why (H200, 2026-11-27, bench/results/2026-11-27-h200-suite-quant-vision-tp.md): the direct kernel reached only
// 0.33-0.49 of the copy ceiling at m = 1 and 0.04-0.09 at m = 64 (0.46x cuBLAS bf16 on the 11B gate_up).
//   - m = 1: in the direct kernel's SASS each chunk's loads sit right before their arithmetic (ptxas schedules
//     them there, asm volatile notwithstanding), so a warp has about one chunk in flight and none between sets.
//     Here the loads of the next set are issued before the current set is computed (a register ping-pong, A/B),
//     and the SASS keeps them there (sm_90a), so every warp keeps one set in flight at all times.
//   - m > 8: every warp reads its own copy of the activations, 16 * m bytes per 64-column chunk per 16 weight rows:
//     at m = 64 that is 8 KB of x from L2 for 512 bytes of weights, 940 MB per 11B gate_up call, which is the
//     measured 175 us at L2 bandwidth. Here a block of 4 warps x 2 row tiles stages each x chunk once in shared
//     memory (cp.async, double-buffered) and each warp applies every x fragment to both of its row tiles: the L2
//     traffic for x drops 8x and the shared-memory reads 2x per weight byte (4x and 1x at m > 32, where a warp
//     keeps one row tile: see kRowTiles).
//
// Numerics: per row tile, group and token the two MMAs, the zeroed f32 tile and the FFMA into the accumulator run
// in the same order as in the direct kernel, over the same chunk ranges for a given split count, and the split-K
// finish is the same; so for the same `splits` both kernels give the same bits (the GPU test checks this).
//
// Two kernels:
//   - stream (m <= 8): 4 warps, one 16-row tile each (64 rows per block, as the direct kernel), activations read
//     through L1 (at most 8 token rows, which every block reads), weights double-buffered in registers, kUnroll
//     chunks per set;
//   - staged (8 < m <= 64): 4 warps, kRowTiles = 2 tiles each (128 rows per block; 1 tile and 64 rows at m > 32),
//     x staged per kStage chunks in shared memory with the 16-byte units of odd token rows XOR-swizzled by 4 (so
//     the eight lanes of a quarter warp, rows g and g + 1 of one tile, hit disjoint banks), weights
//     double-buffered in registers.
#include <algorithm>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/status.cuh"
#include "llama32_kernels.h"
#include "quant/common.cuh"
#include "quant/w4a16_common.cuh"
#include "quant/w4a16_pipelined.cuh"

namespace l32 {
namespace quant {
namespace {

constexpr int kWarps = 4;      // warps per block, both kernels
constexpr int kUnroll = 4;     // stream kernel: chunks per register set
constexpr int kStage = 2;      // staged kernel: chunks per shared-memory stage and register set
// Staged kernel: 16-row tiles per warp. 2, except 1 at m > 32: with 2 tiles x 8 token tiles the 64 f32
// accumulators and the independent MMA chains the compiler keeps in flight exceeded 255 registers and spilled.
template <int kMT>
constexpr int kRowTiles = kMT >= 8 ? 1 : 2;

// Chunk c of the tile whose lane-offset pointers are wq / sc / zr.
template <bool kZeros>
__device__ __forceinline__ void load_frag(Frag& f, const uint4* wq, const uint2* sc, const uint2* zr, int c) {
    f.w = ld_stream_16(wq + static_cast<int64_t>(c) * 32);
    f.s = ld_stream_8(sc + static_cast<int64_t>(c) * 8);
    if constexpr (kZeros) f.z = ld_stream_8(zr + static_cast<int64_t>(c) * 8);
}

// ---- stream kernel (m <= 8) ----------------------------------------------------------------------------------

// Loads the set's chunks (at the pointers: the set's first chunk) of which `left` remain in the warp's range (the
// others are left as they are and never used). Every address is a constant offset from the pointers.
template <bool kZeros>
__device__ __forceinline__ void load_set(Frag (&f)[kUnroll], const uint4* wq, const uint2* sc, const uint2* zr,
                                         int left) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        if (u < left) load_frag<kZeros>(f[u], wq, sc, zr, u);
    }
}

// The first `left` chunks of a loaded set, against token row xr at the set's first chunk (one 16-byte load per
// group).
template <bool kZeros>
__device__ __forceinline__ void compute_set(float (&acc)[1][4], const Frag (&f)[kUnroll], const uint4* xr, int left) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        if (u >= left) break;
#pragma unroll
        for (int jg = 0; jg < 2; ++jg) {
            const GroupA a = dequant_group<kZeros>(f[u], jg);
            const uint4 xb = ld_reuse_16(xr + u * 8 + jg * 4);
            group_mma(acc[0], a, xb);
        }
    }
}

// grid = (ceil(n_tiles / kWarps), splits), block = kWarps * 32.
template <bool kZeros>
__global__ void __launch_bounds__(kWarps * 32) w4a16_stream_kernel(const __grid_constant__ l32_w4a16_params p) {
    const W4A16Launch l = w4a16_launch(p);
    const int nt = blockIdx.x * kWarps + l.warp;
    const W4A16Tile tile = w4a16_tile<kZeros>(p, l, min(nt, l.ntiles - 1));
    // This warp's first two chunk sets into L2 before waiting for the previous kernel (which writes x): weights are
    // never written by a kernel of the step (see kernels/common/launch.cuh).
    if (nt < l.ntiles) w4a16_prefetch(tile.wq, l.c0, l.c1, 2 * kUnroll);
    pdl_begin();

    float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
    if (nt < l.ntiles) {
        // Token g of the (single) token tile; rows past m repeat the last row (their outputs are discarded).
        const int row = min(l.g, l.m - 1);
        const bf16* xrow = static_cast<const bf16*>(p.x) + static_cast<int64_t>(row) * p.k;
        const int c0 = l.c0, c1 = l.c1;
        // Pointers at chunk c of the loop below (a chunk is 32 uint4 of weights, 8 uint2 of scales and zero points,
        // 8 uint4 of the activation row), advanced by two sets per iteration.
        const uint4* wq = tile.wq + c0 * 32;
        const uint2* sc = tile.sc + c0 * 8;
        const uint2* zr = nullptr;
        if constexpr (kZeros) zr = tile.zr + c0 * 8;
        const auto* xr = reinterpret_cast<const uint4*>(xrow) + l.t + c0 * 8;
        constexpr int kZs = kZeros ? kUnroll * 8 : 0;  // zero-point offset of the next set (none without them)
        Frag fa[kUnroll], fb[kUnroll];
        load_set<kZeros>(fa, wq, sc, zr, c1 - c0);
        for (int c = c0; c < c1; c += 2 * kUnroll) {
            // Set B in flight while set A is computed, then the next set A while B is.
            load_set<kZeros>(fb, wq + kUnroll * 32, sc + kUnroll * 8, zr + kZs, c1 - c - kUnroll);
            compute_set<kZeros>(acc, fa, xr, c1 - c);
            load_set<kZeros>(fa, wq + 2 * kUnroll * 32, sc + 2 * kUnroll * 8, zr + 2 * kZs, c1 - c - 2 * kUnroll);
            compute_set<kZeros>(acc, fb, xr + kUnroll * 8, c1 - c - kUnroll);
            wq += 2 * kUnroll * 32;
            sc += 2 * kUnroll * 8;
            if constexpr (kZeros) zr += 2 * kUnroll * 8;
            xr += 2 * kUnroll * 8;
        }
        w4a16_store_tile<1>(p, l, acc, nt);
    }
    if (p.splits > 1) w4a16_finish_split(p, l.m, l.npad, kWarps * 16);
}

// ---- staged kernel (8 < m <= 64) -----------------------------------------------------------------------------

// Shared memory of the staged kernel: two stages of kStage chunks of up to kTok token rows x 8 units of 16 bytes.
template <int kMT>
struct StagedSmem {
    static constexpr int kTok = 8 * kMT;
    uint4 x[2][kStage][kTok][8];
};

// Position of 16-byte unit `unit` (0..7: columns 8 unit .. 8 unit + 7 of the chunk) of token row r in a stage.
__device__ __forceinline__ int swizzled_unit(int r, int unit) { return unit ^ ((r & 1) << 2); }

// Stages chunks cbase .. cbase + kStage - 1 of x (those below c1; token rows past m are zero-filled) into buffer
// `buf` with cp.async, and commits one group (empty when every chunk is past c1, which keeps the group count
// uniform for the waits).
template <int kMT>
__device__ __forceinline__ void stage_x(StagedSmem<kMT>& sm, int buf, const bf16* x, int64_t k, int m, int cbase,
                                        int c1) {
    constexpr int kTok = StagedSmem<kMT>::kTok;
    constexpr int kUnits = kStage * kTok * 8;
    static_assert(kUnits % (kWarps * 32) == 0, "every thread copies the same number of units");
    if (cbase < c1) {
#pragma unroll
        for (int it = 0; it < kUnits / (kWarps * 32); ++it) {
            const int i = it * kWarps * 32 + static_cast<int>(threadIdx.x);
            const int u = i / (kTok * 8), r = (i / 8) % kTok, unit = i % 8;
            const int c = cbase + u;
            if (c >= c1) continue;  // never read: compute_staged stops at c1
            const bool valid = r < m;
            const bf16* src = x + (valid ? static_cast<int64_t>(r) * k + static_cast<int64_t>(c) * 64 + unit * 8 : 0);
            cp_async16(&sm.x[buf][u][r][swizzled_unit(r, unit)], src, valid);
        }
    }
    cp_async_commit();
}

// Loads chunks c .. c + kStage - 1 below c1 of the warp's kRT row tiles.
template <int kRT, bool kZeros>
__device__ __forceinline__ void load_stage_w(Frag (&f)[kStage][kRT], const uint4* const (&wq)[kRT],
                                             const uint2* const (&sc)[kRT], const uint2* const (&zr)[kRT], int c,
                                             int c1) {
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
        if (c + u >= c1) continue;
#pragma unroll
        for (int rt = 0; rt < kRT; ++rt) load_frag<kZeros>(f[u][rt], wq[rt], sc[rt], zr[rt], c + u);
    }
}

// The chunks c .. c + kStage - 1 below c1 of stage buffer `buf` against the warp's row tiles.
template <int kMT, bool kZeros>
__device__ __forceinline__ void compute_staged(float (&acc)[kRowTiles<kMT>][kMT][4], const StagedSmem<kMT>& sm,
                                               int buf, const Frag (&f)[kStage][kRowTiles<kMT>], int c, int c1, int g,
                                               int t) {
    constexpr int kRT = kRowTiles<kMT>;
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
        if (c + u >= c1) break;
#pragma unroll
        for (int jg = 0; jg < 2; ++jg) {
            GroupA a[kRT];
#pragma unroll
            for (int rt = 0; rt < kRT; ++rt) a[rt] = dequant_group<kZeros>(f[u][rt], jg);
#pragma unroll
            for (int j = 0; j < kMT; ++j) {
                const int r = 8 * j + g;
                const uint4 xb = sm.x[buf][u][r][swizzled_unit(r, 4 * jg + t)];
#pragma unroll
                for (int rt = 0; rt < kRT; ++rt) group_mma(acc[rt][j], a[rt], xb);
            }
        }
    }
}

// grid = (ceil(n_tiles / (kWarps * kRowTiles)), splits), block = kWarps * 32. kMT = ceil(m / 8) in {2, 4, 8}.
template <int kMT, bool kZeros>
__global__ void __launch_bounds__(kWarps * 32) w4a16_staged_kernel(const __grid_constant__ l32_w4a16_params p) {
    __shared__ StagedSmem<kMT> sm;
    const W4A16Launch l = w4a16_launch(p);
    const int g = l.g, t = l.t, m = l.m, c0 = l.c0, c1 = l.c1;
    constexpr int kRT = kRowTiles<kMT>;
    const int tile0 = (blockIdx.x * kWarps + l.warp) * kRT;

    // Tiles past the last one (only in the last block) read the last tile's weights; their outputs are discarded.
    const uint4* wq[kRT];
    const uint2* sc[kRT];
    const uint2* zr[kRT];
#pragma unroll
    for (int rt = 0; rt < kRT; ++rt) {
        const W4A16Tile tile = w4a16_tile<kZeros>(p, l, min(tile0 + rt, l.ntiles - 1));
        wq[rt] = tile.wq;
        sc[rt] = tile.sc;
        zr[rt] = tile.zr;
    }
    // The first two stages' weights into L2 before waiting for the previous kernel (which writes x).
#pragma unroll
    for (int rt = 0; rt < kRT; ++rt) w4a16_prefetch(wq[rt], c0, c1, 2 * kStage);
    pdl_begin();
    const auto* x = static_cast<const bf16*>(p.x);

    float acc[kRT][kMT][4];
#pragma unroll
    for (int rt = 0; rt < kRT; ++rt) {
#pragma unroll
        for (int j = 0; j < kMT; ++j) acc[rt][j][0] = acc[rt][j][1] = acc[rt][j][2] = acc[rt][j][3] = 0.f;
    }

    // Two shared-memory buffers and two register sets: while stage s is computed, stage s + 1 is in flight. Each
    // buffer is refilled only after the __syncthreads that follows its last use.
    constexpr int kS = kStage;
    Frag fa[kS][kRT], fb[kS][kRT];
    stage_x<kMT>(sm, 0, x, p.k, m, c0, c1);
    load_stage_w<kRT, kZeros>(fa, wq, sc, zr, c0, c1);
    for (int c = c0; c < c1; c += 2 * kS) {
        stage_x<kMT>(sm, 1, x, p.k, m, c + kS, c1);
        load_stage_w<kRT, kZeros>(fb, wq, sc, zr, c + kS, c1);
        cp_async_wait<1>();
        __syncthreads();
        compute_staged<kMT, kZeros>(acc, sm, 0, fa, c, c1, g, t);
        __syncthreads();
        stage_x<kMT>(sm, 0, x, p.k, m, c + 2 * kS, c1);
        load_stage_w<kRT, kZeros>(fa, wq, sc, zr, c + 2 * kS, c1);
        cp_async_wait<1>();
        __syncthreads();
        compute_staged<kMT, kZeros>(acc, sm, 1, fb, c + kS, c1, g, t);
        __syncthreads();
    }
    cp_async_wait<0>();

#pragma unroll
    for (int rt = 0; rt < kRT; ++rt) {
        if (tile0 + rt < l.ntiles) w4a16_store_tile<kMT>(p, l, acc[rt], tile0 + rt);
    }
    if (p.splits > 1) w4a16_finish_split(p, m, l.npad, kWarps * kRT * 16);
}

template <int kMT>
l32_status launch_staged(const l32_w4a16_params& p, cudaStream_t stream) {
    const int64_t ntiles = (p.n + 15) / 16;
    constexpr int kTilesPerBlock = kWarps * kRowTiles<kMT>;
    const dim3 grid(static_cast<unsigned>((ntiles + kTilesPerBlock - 1) / kTilesPerBlock),
                    static_cast<unsigned>(p.splits));
    if (p.zeros != nullptr) {
        launch_kernel(w4a16_staged_kernel<kMT, true>, grid, kWarps * 32, 0, stream, p);
    } else {
        launch_kernel(w4a16_staged_kernel<kMT, false>, grid, kWarps * 32, 0, stream, p);
    }
    return check_launch();
}

}  // namespace

l32_status launch_w4a16_pipelined(const l32_w4a16_params& p, cudaStream_t stream) {
    if (p.m <= 8) {
        const int64_t ntiles = (p.n + 15) / 16;
        const dim3 grid(static_cast<unsigned>((ntiles + kWarps - 1) / kWarps), static_cast<unsigned>(p.splits));
        if (p.zeros != nullptr) {
            launch_kernel(w4a16_stream_kernel<true>, grid, kWarps * 32, 0, stream, p);
        } else {
            launch_kernel(w4a16_stream_kernel<false>, grid, kWarps * 32, 0, stream, p);
        }
        return check_launch();
    }
    if (p.m <= 16) return launch_staged<2>(p, stream);
    if (p.m <= 32) return launch_staged<4>(p, stream);
    return launch_staged<8>(p, stream);
}

}  // namespace quant
}  // namespace l32
