// kernels/quant/w4a16_tiled.cu: the tiled W4A16 decode GEMM (l32_w4a16_params.kernel == L32_W4A16_TILED), the
// same product as the direct kernel in w4a16.cu over the same layout, for batches of 9 to 64 rows. Entered through
// l32_w4a16_gemm, which checks the parameters.
//
// Why (H200, 2026-11-27, bench/results/2026-11-27-h200-pdl-w4a16-defaults.md): at m = 64 both earlier kernels ran
// at 0.22-0.46x cuBLASLt bf16 (90B gate_up: 546 us direct, 487 us pipelined, against 223 us in bf16), and at
// m = 16 the pipelined kernel lost up to 2.3x to the direct one. Counting per warp and 64-column chunk at m = 64
// (8 token tiles): the direct kernel reads 8 KB of x through L1 for one 16-row tile (512 bytes of int4), in 16
// loads that each touch 8 lines, so an SM spends about 128 L1 cycles per warp-chunk on x, about 220 us for the 90B
// gate_up; the pipelined kernel stages x in shared memory but, at m > 32, keeps one row tile per warp (two spilled,
// because the weights ride in a register ring) and syncs the block every two chunks.
//
// Design: a block is 4 warps x kRT = 2 row tiles (128 rows). Per stage of kS chunks, all 128 threads copy, with
// cp.async and nothing in registers,
//   - x: kS chunks x 8 kMT token rows x 128 bytes (16-byte units of odd rows XOR-swizzled by 4, as in the staged
//     pipelined kernel, so a quarter warp's reads hit disjoint banks);
//   - the weights: kS chunks x 8 tiles x 512 bytes (the layout's lane-major 16-byte slots, so a warp's read of one
//     tile's chunk is 512 contiguous bytes), and the tiles' scales (and biases): 64 bytes per tile and chunk,
//     copied 8 bytes at a time (the scales are only 8-byte aligned).
// Two stage buffers by default: stage s + 1 is in flight while stage s is computed (p.tiled_stages = 3 or 4 keeps
// two or three in flight; see the kernel's ring and docs/quantization.md). With the weights out of registers, each
// warp keeps both row tiles at every m: an x fragment read from shared memory feeds 4 MMAs (2 per row tile), and
// the accumulators are kRT x kMT x 4 = 64 registers at m = 64.
//
// Numerics: per row tile, group and token the two MMAs, the zeroed f32 tile and the FFMA into the accumulator run
// in the direct kernel's order over the same chunk ranges for a given split count, and the split-K finish is the
// same, so for the same `splits` it gives the direct kernel's bits (the GPU test checks this).
//
// Shared memory per block (two buffers; kS = 4 chunks per stage at m <= 32, 2 at m > 32), with biases: 48 KB (exactly 48 KiB, plus 16 static bytes) at
// m <= 8, 57 KB at m <= 16, 74 KB at m <= 32, 53 KB at m <= 64 (2 x (16 KB x + 8 KB w + 1 KB s + 1 KB z)); the
// launcher raises the dynamic limit above 48 KB (allow_dynamic_smem). All fit sm_89's 99 KB per block. A ring of
// 3 or 4 buffers takes 1.5 or 2 times as much (up to 148 KB at 16 < m <= 32 with biases).
#include <algorithm>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/status.cuh"
#include "llama32_kernels.h"
#include "quant/common.cuh"
#include "quant/w4a16_common.cuh"
#include "quant/w4a16_tiled.cuh"

namespace l32 {
namespace quant {
namespace {

constexpr int kWarps = 4;              // warps per block
constexpr int kRT = 2;                 // 16-row tiles per warp
constexpr int kTS = kWarps * kRT;      // row tiles per block (128 rows)
constexpr int kThreads = kWarps * 32;  // threads per block

// Chunks per stage: 4, except 2 at m > 32, where x takes 8 KB per chunk.
template <int kMT>
constexpr int kStageChunks = kMT >= 8 ? 2 : 4;

// Offsets (in 16-byte units) of the parts of one stage buffer, and its size.
template <int kMT, bool kZeros>
struct TiledSmem {
    static constexpr int kS = kStageChunks<kMT>;
    static constexpr int kTok = 8 * kMT;
    static constexpr int kX = kS * kTok * 8;   // x: [kS][kTok][8 units]
    static constexpr int kW = kS * kTS * 32;   // weights: [kS][kTS][32 lanes]
    static constexpr int kSc = kS * kTS * 4;   // scales: [kS][kTS][8 x 8 bytes]
    static constexpr int kZ = kZeros ? kSc : 0;  // biases, as the scales
    static constexpr int kUnits = kX + kW + kSc + kZ;
    // A ring of kStages buffers (two, the measured default; three or four with LLAMA32_W4A16_TILED_STAGES).
    template <int kStages>
    static constexpr size_t kBytes = size_t{kStages} * kUnits * 16;
};

// Position of 16-byte unit `unit` (0..7: columns 8 unit .. 8 unit + 7 of a chunk) of token row r.
__device__ __forceinline__ int swizzled(int r, int unit) { return unit ^ ((r & 1) << 2); }

// What every thread of a block needs to stage: x and the block's first tile (tiles past the last one read the
// last tile; their outputs are discarded).
struct TiledSource {
    const bf16* x;
    const uint4* wq;   // qweight
    const uint2* sc;   // scales
    const uint2* zr;   // zeros or nullptr
    int64_t k;
    int m, kc, tile0, ntiles;
};

// Stages chunks cbase .. cbase + kS - 1 (those below c1) into buffer `buf` and commits one cp.async group (empty
// when every chunk is past c1, which keeps the group count uniform for the waits). Token rows past m are
// zero-filled.
template <int kMT, bool kZeros>
__device__ __forceinline__ void stage(uint4* smem, int buf, const TiledSource& src, int cbase, int c1) {
    using S = TiledSmem<kMT, kZeros>;
    uint4* base = smem + buf * S::kUnits;
    if (cbase < c1) {
        const int tid = static_cast<int>(threadIdx.x);
        static_assert(S::kX % kThreads == 0 && S::kW % kThreads == 0, "every thread copies as many units");
#pragma unroll
        for (int it = 0; it < S::kX / kThreads; ++it) {
            const int i = it * kThreads + tid;
            const int u = i / (S::kTok * 8), r = (i / 8) % S::kTok, unit = i % 8;
            const int c = cbase + u;
            if (c >= c1) continue;  // never read: the compute stops at c1
            const bool valid = r < src.m;
            const int64_t at = static_cast<int64_t>(r) * src.k + static_cast<int64_t>(c) * 64 + unit * 8;
            const bf16* from = src.x + (valid ? at : 0);
            cp_async16(base + (u * S::kTok + r) * 8 + swizzled(r, unit), from, valid);
        }
#pragma unroll
        for (int it = 0; it < S::kW / kThreads; ++it) {
            const int i = it * kThreads + tid;
            const int u = i / (kTS * 32), ts = (i / 32) % kTS, lane = i % 32;
            const int c = cbase + u;
            if (c >= c1) continue;
            const int64_t nt = min(src.tile0 + ts, src.ntiles - 1);
            cp_async16(base + S::kX + i, src.wq + (nt * src.kc + c) * 32 + lane, true);
        }
        // Scales (and biases): kS x kTS x 8 entries of 8 bytes each.
        constexpr int kEntries = S::kS * kTS * 8;
        auto* sc_dst = reinterpret_cast<uint2*>(base + S::kX + S::kW);
        for (int i = tid; i < kEntries; i += kThreads) {
            const int u = i / (kTS * 8), ts = (i / 8) % kTS, e = i % 8;
            const int c = cbase + u;
            if (c >= c1) continue;
            const int64_t nt = min(src.tile0 + ts, src.ntiles - 1);
            const int64_t at = (nt * src.kc + c) * 8 + e;
            cp_async_ca<8>(sc_dst + i, src.sc + at, true);
            if constexpr (kZeros) cp_async_ca<8>(sc_dst + kEntries + i, src.zr + at, true);
        }
    }
    cp_async_commit();
}

// The chunks c .. c + kS - 1 below c1 of buffer `buf` against the warp's two row tiles.
template <int kMT, bool kZeros>
__device__ __forceinline__ void compute(float (&acc)[kRT][kMT][4], const uint4* smem, int buf, int c, int c1,
                                        int warp, int lane) {
    using S = TiledSmem<kMT, kZeros>;
    const uint4* base = smem + buf * S::kUnits;
    const auto* sc = reinterpret_cast<const uint2*>(base + S::kX + S::kW);
    constexpr int kEntries = S::kS * kTS * 8;
    const int g = lane / 4, t = lane % 4;
    // Neither this loop nor the group loop is unrolled: one group's fragments at a time keeps every variant (sm_80,
    // sm_89, sm_90a) without spills.
#pragma unroll 1
    for (int u = 0; u < S::kS; ++u) {
        if (c + u >= c1) break;
        Frag f[kRT];
#pragma unroll
        for (int rt = 0; rt < kRT; ++rt) {
            const int ts = warp * kRT + rt;
            f[rt].w = base[S::kX + (u * kTS + ts) * 32 + lane];
            f[rt].s = sc[(u * kTS + ts) * 8 + g];
            if constexpr (kZeros) f[rt].z = sc[kEntries + (u * kTS + ts) * 8 + g];
        }
#pragma unroll 1
        for (int jg = 0; jg < 2; ++jg) {
            GroupA a[kRT];
#pragma unroll
            for (int rt = 0; rt < kRT; ++rt) a[rt] = dequant_group<kZeros>(f[rt], jg);
#pragma unroll
            for (int j = 0; j < kMT; ++j) {
                const int r = 8 * j + g;
                const uint4 xb = base[(u * S::kTok + r) * 8 + swizzled(r, 4 * jg + t)];
#pragma unroll
                for (int rt = 0; rt < kRT; ++rt) group_mma(acc[rt][j], a[rt], xb);
            }
        }
    }
}

// grid = (ceil(n_tiles / kTS), splits), block = kThreads, dynamic shared memory TiledSmem::kBytes<kStages>.
template <int kMT, bool kZeros, int kStages>
__global__ void __launch_bounds__(kThreads, 1) w4a16_tiled_kernel(const __grid_constant__ l32_w4a16_params p) {
    static_assert(kStages >= 2 && kStages <= 4, "a ring of two to four stage buffers");
    extern __shared__ uint4 smem[];
    using S = TiledSmem<kMT, kZeros>;
    constexpr int kS = S::kS;
    const W4A16Launch l = w4a16_launch(p);
    const int c0 = l.c0, c1 = l.c1;
    const int tile0 = blockIdx.x * kTS;
    // The lane's slots of this warp's tiles for the first two stages into L2 before waiting for the previous
    // kernel (which writes x): weights are never written by a kernel of the step (see kernels/common/launch.cuh).
#pragma unroll
    for (int rt = 0; rt < kRT; ++rt) {
        const W4A16Tile tile = w4a16_tile<kZeros>(p, l, min(tile0 + l.warp * kRT + rt, l.ntiles - 1));
        w4a16_prefetch(tile.wq, c0, c1, kStages * kS);
    }
    pdl_begin();
    TiledSource src;
    src.x = static_cast<const bf16*>(p.x);
    src.wq = static_cast<const uint4*>(p.qweight);
    src.sc = static_cast<const uint2*>(p.scales);
    src.zr = static_cast<const uint2*>(p.zeros);
    src.k = p.k;
    src.m = l.m;
    src.kc = l.kc;
    src.tile0 = tile0;
    src.ntiles = l.ntiles;

    float acc[kRT][kMT][4];
#pragma unroll
    for (int rt = 0; rt < kRT; ++rt) {
#pragma unroll
        for (int j = 0; j < kMT; ++j) acc[rt][j][0] = acc[rt][j][1] = acc[rt][j][2] = acc[rt][j][3] = 0.f;
    }

    if constexpr (kStages == 2) {
        // While one buffer is computed the other is in flight; each is refilled only after the __syncthreads that
        // follows its last use.
        stage<kMT, kZeros>(smem, 0, src, c0, c1);
        for (int c = c0; c < c1; c += 2 * kS) {
            stage<kMT, kZeros>(smem, 1, src, c + kS, c1);
            cp_async_wait<1>();
            __syncthreads();
            compute<kMT, kZeros>(acc, smem, 0, c, c1, l.warp, l.lane);
            __syncthreads();
            stage<kMT, kZeros>(smem, 0, src, c + 2 * kS, c1);
            cp_async_wait<1>();
            __syncthreads();
            compute<kMT, kZeros>(acc, smem, 1, c + kS, c1, l.warp, l.lane);
            __syncthreads();
        }
    } else {
        // A ring: kStages - 1 stages in flight while one is computed. Every stage() commits one cp.async group
        // (empty past c1), so before the wait of the stage starting at chunk c = c0 + i kS, kStages - 1 + i groups
        // are committed and cp_async_wait<kStages - 2> leaves stage i landed (for this thread's copies; the
        // barrier then for everyone's). The same barrier also ends every warp's compute of the previous stage, whose
        // buffer the refill that follows it takes: one barrier per stage.
#pragma unroll
        for (int s = 0; s < kStages - 1; ++s) stage<kMT, kZeros>(smem, s, src, c0 + s * kS, c1);
        int buf = 0;
        for (int c = c0; c < c1; c += kS) {
            cp_async_wait<kStages - 2>();
            __syncthreads();
            const int refill = buf == 0 ? kStages - 1 : buf - 1;
            stage<kMT, kZeros>(smem, refill, src, c + (kStages - 1) * kS, c1);
            compute<kMT, kZeros>(acc, smem, buf, c, c1, l.warp, l.lane);
            buf = buf == kStages - 1 ? 0 : buf + 1;
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int rt = 0; rt < kRT; ++rt) {
        const int nt = tile0 + l.warp * kRT + rt;
        if (nt < l.ntiles) w4a16_store_tile<kMT>(p, l, acc[rt], nt);
    }
    if (p.splits > 1) w4a16_finish_split(p, l.m, l.npad, kTS * 16);
}

template <int kMT, bool kZeros, int kStages>
l32_status launch_tiled_stages(const l32_w4a16_params& p, cudaStream_t stream) {
    constexpr size_t kBytes = TiledSmem<kMT, kZeros>::template kBytes<kStages>;
    const auto kernel = w4a16_tiled_kernel<kMT, kZeros, kStages>;
    const l32_status allowed = allow_dynamic_smem(kernel, kBytes);
    if (allowed != L32_OK) return allowed;
    const int64_t ntiles = (p.n + 15) / 16;
    const dim3 grid(static_cast<unsigned>((ntiles + kTS - 1) / kTS), static_cast<unsigned>(p.splits));
    launch_kernel(kernel, grid, kThreads, kBytes, stream, p);
    return check_launch();
}

// p.tiled_stages (0: two) lowered to the deepest ring that fits the device's shared memory per block (sm_89 takes
// 99 KB: four stages at m <= 8, three at 8 < m <= 16 and at m > 32, two at 16 < m <= 32). The stage count changes
// no bit.
template <int kMT, bool kZeros>
l32_status launch_tiled_as(const l32_w4a16_params& p, cudaStream_t stream) {
    using S = TiledSmem<kMT, kZeros>;
    int stages = p.tiled_stages == 0 ? 2 : p.tiled_stages;
    if (stages > 2) {
        int device = 0, optin = 0;
        cudaError_t err = cudaGetDevice(&device);
        if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
        if (err != cudaSuccess) {
            last_cuda_error = err;
            return L32_LAUNCH_FAILED;
        }
        // 1 KB kept for the kernel's static shared memory (16 bytes; the split-K finish flag).
        while (stages > 2 && static_cast<size_t>(stages) * S::kUnits * 16 + 1024 > static_cast<size_t>(optin)) {
            --stages;
        }
    }
    switch (stages) {
        case 4: return launch_tiled_stages<kMT, kZeros, 4>(p, stream);
        case 3: return launch_tiled_stages<kMT, kZeros, 3>(p, stream);
        default: return launch_tiled_stages<kMT, kZeros, 2>(p, stream);
    }
}

template <int kMT>
l32_status launch_tiled(const l32_w4a16_params& p, cudaStream_t stream) {
    return p.zeros != nullptr ? launch_tiled_as<kMT, true>(p, stream) : launch_tiled_as<kMT, false>(p, stream);
}

}  // namespace

l32_status launch_w4a16_tiled(const l32_w4a16_params& p, cudaStream_t stream) {
    if (p.m <= 8) return launch_tiled<1>(p, stream);
    if (p.m <= 16) return launch_tiled<2>(p, stream);
    if (p.m <= 32) return launch_tiled<4>(p, stream);
    return launch_tiled<8>(p, stream);
}

}  // namespace quant
}  // namespace l32
