// kernels/quant/w4a16_bulk.cu: the bulk-copy W4A16 decode GEMM (l32_w4a16_params.kernel == L32_W4A16_BULK), the
// same product as the direct kernel in w4a16.cu over the same layout, for m <= 16 on sm_90 (Hopper). Entered
// through l32_w4a16_gemm, which checks the parameters.
//
// Why (H100, 2026-11-27, bench/results/2026-11-27-h100-targets-prefill-w4a16.md): at m = 1 the direct and
// pipelined kernels streamed the 11B / 90B matrices at 0.53-0.76 of the copy ceiling. Nsight Compute called them
// latency-bound: 23-55% of DRAM bandwidth, 12-20 cycles between issues, 42% occupancy on 11B gate_up, where the whole
// grid (6.8 blocks per SM) is resident at once. A warp kept one or two 512-byte chunks in flight; Little's law at
// ~1 us of loaded latency and 2.9 TB/s asks for about 22 KB in flight per SM, and the grid had 7-13 KB. Two fixes:
//   - Bytes in flight no longer depend on registers or on how ptxas orders loads. Each warp owns a ring of kStages
//     slots of kUnits chunks in shared memory, and its lane 0 fills each slot with one TMA bulk copy per operand
//     (cp.async.bulk, global -> shared, completing on the slot's mbarrier). The weights of consecutive chunks of a
//     tile are contiguous in the layout, and so are consecutive tiles, so a warp's whole range of the matrix is one
//     contiguous byte range and a slot is one copy of up to 2 KB (plus 256 bytes of scales). With kStages = 4 a warp
//     keeps 6-8 KB in flight; 16 warps per SM keep ~110 KB. The copies carry an L2 evict-first hint (the weights are
//     read once per step; the activations and partials should stay).
//   - Work is balanced to the chunk ("stream-K"). The grid is persistent (`splits` blocks, about 4 per SM, all
//     resident), and the matrix is one sequence of units (tile nt, chunk c) -> nt * kc + c; warp w of W takes the
//     units [U w / W, U (w + 1) / W), so warps differ by at most one chunk. A warp walks its range in order and
//     flushes an accumulator each time it leaves a tile: a tile it covered whole is written as bf16 at once; a
//     part of a tile (only a warp's first and last tile can be partial) is written as f32 partials to slot 2 w
//     (first tile) or 2 w + 1 (last tile), and the warp that completes the tile's arrivals sums the partials of
//     the tile's warps in warp order and writes bf16 (deterministic: the order never depends on who arrives last).
//
// Measured (H100, 2026-11-27, eighth session, bench/results/2026-11-27-h100-w4a16-bulk.md): the ring alone, without
// arithmetic (bulk_variant bit 0), streams 90B gate_up at 2941 GB/s, the copy ceiling; so the limit was never the
// bytes in flight but the arithmetic per chunk. With it, 90B gate_up at m = 1 runs at 2531 GB/s (104.4 us; direct
// 116.0) and 90B down at 2279 GB/s (58.0 us; pipelined 61.0), once a full slot inside one tile is computed without
// a branch between its chunks (the first version, with a tile test after each chunk, took 120 us). On the 11B and
// 1B matrices the fixed costs (a ring fill before any arithmetic, a partial sum for most tiles) lose to the direct
// kernel, so W4A16Kernel::for_shape takes this kernel only for the largest matrices.
//
// Numerics: per tile and group the two MMAs, the zeroed f32 tile and the FFMA into the accumulator are the direct
// kernel's (dequant_group / group_mma), in chunk order inside each warp's part of a tile; the parts are summed in
// f32 in warp order. So the bits equal the direct kernel's wherever one warp covers a whole tile, and otherwise
// differ only in where the f32 sum of a tile's chunks is cut; a given grid gives the same bits on every run.
//
// Workspace: partials 2 W 16 m f32 (W = 4 * splits warps), counters one per 16-row tile (zeroed; every launch
// leaves them zeroed). Shared memory: 9.3 KB per warp (10.3 KB with zero points), 37-41 KB per block.
#include <algorithm>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/launch.cuh"
#include "common/mbarrier.cuh"
#include "common/status.cuh"
#include "llama32_kernels.h"
#include "quant/common.cuh"
#include "quant/w4a16_bulk.cuh"
#include "quant/w4a16_common.cuh"

namespace l32 {
namespace quant {
namespace {

constexpr int kWarps = 4;    // warps per block, each with its own ring
constexpr int kStages = 4;   // ring slots per warp
constexpr int kUnits = 4;    // 64-column chunks per slot (2 KB of weights)
[[maybe_unused]] constexpr int kWBytes = 512; // weight bytes per chunk (one 16-row tile x 64 columns)
[[maybe_unused]] constexpr int kSBytes = 64;  // scale (and zero point) bytes per chunk

// One warp's ring: kStages slots of kUnits chunks of weights, scales (and zero points), one mbarrier per slot.
template <bool kZeros>
struct alignas(128) WarpRing {
    uint4 w[kStages][kUnits * 32];
    uint2 s[kStages][kUnits * 8];
    uint2 z[kZeros ? kStages : 1][kZeros ? kUnits * 8 : 2];
    uint64_t bar[kStages];
};

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900  // the host pass parses it; no SASS below sm_90
using sync90::mbar_arrive_expect;
using sync90::mbar_init;
using sync90::mbar_init_fence;
using sync90::mbar_wait;

// Orders this thread's earlier generic-proxy accesses to shared memory before its later async-proxy ones (a slot's
// refill after its last reads).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// An L2 policy that evicts these lines first.
__device__ __forceinline__ uint64_t evict_first_policy() {
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    return policy;
}

// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global `src` to shared `dst`, completing as
// transaction bytes on `bar`; with `hint`, under the L2 cache policy `policy`.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, uint64_t* bar, uint64_t policy,
                                          bool hint) {
    if (hint) {
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
            ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(policy)
            : "memory");
    } else {
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar))
                     : "memory");
    }
}

// The stream-K partition: U units over W <= U warps, warp w taking [U w / W, U (w + 1) / W) (never empty).
struct Partition {
    int64_t units, warps, kc;
    __device__ __forceinline__ int64_t begin(int64_t w) const { return units * w / warps; }
    // The warp whose range holds unit u: the largest w with begin(w) <= u.
    __device__ __forceinline__ int64_t owner(int64_t u) const { return ((u + 1) * warps + units - 1) / units - 1; }
};

// The tile's warps, first..last, and where each one's part is: warp w's part of tile t is in slot 2 w when t is
// w's first tile, else (t is its last tile) in slot 2 w + 1. Every warp after `first` starts inside t, so t is
// its first tile; `first` may have started in an earlier tile.
struct TileParts {
    int64_t first, last;
    bool first_starts_here;
    __device__ __forceinline__ TileParts(const Partition& part, int64_t tile) {
        first = part.owner(tile * part.kc);
        last = part.owner((tile + 1) * part.kc - 1);
        first_starts_here = part.begin(first) >= tile * part.kc;
    }
    __device__ __forceinline__ int64_t slot(int64_t w) const {
        return w == first && !first_starts_here ? 2 * w + 1 : 2 * w;
    }
};

// Writes the accumulators of tile `tile` through w4a16_emit_pair (lane (g, t): rows g, g + 8, tokens 8 j + 2 t
// (+1)).
template <int kMT>
__device__ __forceinline__ void store_out(const l32_w4a16_params& p, const float (&acc)[kMT][4], int64_t tile, int g,
                                          int t) {
    const int m = static_cast<int>(p.m);
#pragma unroll
    for (int j = 0; j < kMT; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int tok = 8 * j + 2 * t + e;
            if (tok < m) w4a16_emit_pair(p, tok, tile * 16 + g, acc[j][e], acc[j][e + 2]);
        }
    }
}

// Leaves tile `tile` after covering its units [sb, se): a whole tile is written at once; a part goes to this warp's
// partial slot, and the warp whose arrival completes the tile sums every part in warp order.
template <int kMT>
__device__ __forceinline__ void flush_tile(const l32_w4a16_params& p, const Partition& part, const float (&acc)[kMT][4],
                                           int64_t wid, int64_t tile, int64_t sb, int64_t se, int lane) {
    const int g = lane / 4, t = lane % 4;
    if (sb == tile * part.kc && se == (tile + 1) * part.kc) {
        store_out<kMT>(p, acc, tile, g, t);
        return;
    }
    const int m = static_cast<int>(p.m);
    const TileParts parts(part, tile);
    float* slot = p.partials + parts.slot(wid) * 16 * m;
#pragma unroll
    for (int j = 0; j < kMT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int tok = 8 * j + 2 * t + (e & 1);
            if (tok < m) slot[tok * 16 + g + (e >= 2 ? 8 : 0)] = acc[j][e];
        }
    }
    const auto count = static_cast<unsigned>(parts.last - parts.first + 1);
    __threadfence();  // this lane's partials are visible device-wide before the warp's arrival is counted
    __syncwarp();
    unsigned done = 0;
    if (lane == 0) {
        const unsigned prev = atomicAdd(p.counters + tile, 1u);
        done = prev + 1 == count ? 1u : 0u;
        if (done != 0) p.counters[tile] = 0;  // every part has arrived: nobody else touches it in this launch
    }
    done = __shfl_sync(0xffffffffu, done, 0);
    if (done == 0) return;
    __threadfence();  // order the arrival before the reads of the other warps' partials
    for (int i = lane; i < 8 * m; i += 32) {
        const int tok = i / 8, r = i % 8;
        const int64_t row = tile * 16 + r;
        if (row >= p.n) continue;
        float lo = 0.f, hi = 0.f;
        for (int64_t w = parts.first; w <= parts.last; ++w) {
            const float* part = p.partials + (parts.slot(w) * m + tok) * 16 + r;
            lo += __ldcg(part);
            hi += __ldcg(part + 8);
        }
        w4a16_emit_pair(p, tok, row, lo, hi);
    }
}

#endif

// Lane `lane`'s fragment of chunk `u` of ring slot `slot`: its 16 bytes of weights, its row pair's scales (and
// biases).
template <bool kZeros>
__device__ __forceinline__ Frag slot_frag(const WarpRing<kZeros>& ring, int slot, int u, int lane) {
    Frag f;
    f.w = ring.w[slot][u * 32 + lane];
    f.s = ring.s[slot][u * 8 + lane / 4];
    if constexpr (kZeros) f.z = ring.z[slot][u * 8 + lane / 4];
    return f;
}

// acc += one 64-column chunk (column chunk `chunk` of the tile) of fragment f against the token rows xr, group by
// group in the direct kernel's order.
template <int kMT, bool kZeros>
__device__ __forceinline__ void chunk_mma(float (&acc)[kMT][4], const Frag& f, const uint4* const (&xr)[kMT],
                                          int64_t chunk) {
#pragma unroll
    for (int jg = 0; jg < 2; ++jg) {
        const GroupA a = dequant_group<kZeros, false>(f, jg);  // the two-LOP3 form: see dequant_bf16x2
#pragma unroll
        for (int j = 0; j < kMT; ++j) group_mma(acc[j], a, ld_reuse_16(xr[j] + chunk * 8 + jg * 4));
    }
}

template <int kMT>
__device__ __forceinline__ void zero_acc(float (&acc)[kMT][4]) {
#pragma unroll
    for (int j = 0; j < kMT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// grid = splits persistent blocks (the launcher caps them so every warp has a chunk where the matrix has enough),
// block = kWarps * 32. kMT = ceil(m / 8) token tiles (1 or 2).
template <int kMT, bool kZeros>
__global__ void __launch_bounds__(kWarps * 32, 4) w4a16_bulk_kernel(const __grid_constant__ l32_w4a16_params p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900  // the host pass parses it; no SASS below sm_90
    __shared__ WarpRing<kZeros> rings[kWarps];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int m = static_cast<int>(p.m);
    Partition part;
    part.kc = p.k / 64;
    part.units = (p.n + 15) / 16 * part.kc;
    part.warps = min(int64_t{gridDim.x} * kWarps, part.units);  // warps past it (fewer than 4 chunks) sit out
    const int64_t wid = int64_t{blockIdx.x} * kWarps + warp;
    const bool works = wid < part.warps;
    const int64_t u0 = works ? part.begin(wid) : 0, u1 = works ? part.begin(wid + 1) : 0;
    const int64_t stages = (u1 - u0 + kUnits - 1) / kUnits;
    WarpRing<kZeros>& ring = rings[warp];
    const bool probe = (p.bulk_variant & 1) != 0, hint = (p.bulk_variant & 2) == 0;
    const uint64_t policy = hint ? evict_first_policy() : 0;

    // Lane 0 fills slot `stage % kStages` with the chunks [u0 + kUnits stage, ...) of this warp's range.
    auto fill = [&](int64_t stage) {
        const int slot = static_cast<int>(stage % kStages);
        const int64_t ub = u0 + stage * kUnits;
        const auto cnt = static_cast<unsigned>(min(int64_t{kUnits}, u1 - ub));
        mbar_arrive_expect(&ring.bar[slot], cnt * (kWBytes + kSBytes * (kZeros ? 2 : 1)));
        bulk_copy(ring.w[slot], static_cast<const uint4*>(p.qweight) + ub * 32, cnt * kWBytes, &ring.bar[slot], policy,
                  hint);
        bulk_copy(ring.s[slot], static_cast<const uint2*>(p.scales) + ub * 8, cnt * kSBytes, &ring.bar[slot], policy,
                  hint);
        if constexpr (kZeros) {
            bulk_copy(ring.z[slot], static_cast<const uint2*>(p.zeros) + ub * 8, cnt * kSBytes, &ring.bar[slot],
                      policy, hint);
        }
    };
    if (lane == 0) {
        for (int s = 0; s < kStages; ++s) mbar_init(&ring.bar[s], 1);
        mbar_init_fence();
        // The first slots before waiting for the previous kernel: no kernel of a step writes weights (see
        // kernels/common/launch.cuh), so under PDL they stream in while the previous kernel finishes.
        for (int64_t s = 0; s < min(int64_t{kStages}, stages); ++s) fill(s);
    }
    __syncwarp();
    pdl_begin();

    // Token rows 8 j + g of the token tiles; rows past m repeat the last row (their outputs are discarded).
    const uint4* xr[kMT];
#pragma unroll
    for (int j = 0; j < kMT; ++j) {
        const int row = min(8 * j + g, m - 1);
        xr[j] = reinterpret_cast<const uint4*>(static_cast<const bf16*>(p.x) + static_cast<int64_t>(row) * p.k) + t;
    }
    float acc[kMT][4];
    zero_acc<kMT>(acc);
    int64_t tile = u0 / part.kc, chunk = u0 % part.kc, seg = u0;
    for (int64_t stage = 0; stage < stages; ++stage) {
        const int slot = static_cast<int>(stage % kStages);
        mbar_wait(&ring.bar[slot], static_cast<unsigned>((stage / kStages) & 1));
        const int64_t ub = u0 + stage * kUnits;
        const int cnt = static_cast<int>(min(int64_t{kUnits}, u1 - ub));
        if (probe) {  // measurement only: the copy path alone
            __syncwarp();
            if (lane == 0 && stage + kStages < stages) fill(stage + kStages);
            continue;
        }
        if (cnt == kUnits && chunk + kUnits < part.kc) {
            // The common case: a full slot inside one tile, which it does not finish. No branch between its chunks,
            // so their fragment and activation loads, dequantizations and MMAs interleave (only the FFMAs into
            // acc keep their order).
            Frag f[kUnits];
#pragma unroll
            for (int u = 0; u < kUnits; ++u) f[u] = slot_frag<kZeros>(ring, slot, u, lane);
#pragma unroll
            for (int u = 0; u < kUnits; ++u) chunk_mma<kMT, kZeros>(acc, f[u], xr, chunk + u);
            chunk += kUnits;
        } else {
#pragma unroll
            for (int u = 0; u < kUnits; ++u) {
                if (u >= cnt) break;
                chunk_mma<kMT, kZeros>(acc, slot_frag<kZeros>(ring, slot, u, lane), xr, chunk);
                if (++chunk == part.kc) {
                    flush_tile<kMT>(p, part, acc, wid, tile, seg, ub + u + 1, lane);
                    zero_acc<kMT>(acc);
                    ++tile;
                    chunk = 0;
                    seg = ub + u + 1;
                }
            }
        }
        __syncwarp();  // every lane has read the slot (its values feed the MMAs above)
        if (lane == 0 && stage + kStages < stages) {
            fence_proxy_async();
            fill(stage + kStages);
        }
    }
    if (seg < u1 && !probe) flush_tile<kMT>(p, part, acc, wid, tile, seg, u1, lane);  // the last tile, when partial
#endif
}

template <int kMT>
l32_status launch(const l32_w4a16_params& p, cudaStream_t stream, unsigned blocks) {
    if (p.zeros != nullptr) {
        launch_kernel(w4a16_bulk_kernel<kMT, true>, dim3(blocks), kWarps * 32, 0, stream, p);
    } else {
        launch_kernel(w4a16_bulk_kernel<kMT, false>, dim3(blocks), kWarps * 32, 0, stream, p);
    }
    return check_launch();
}

}  // namespace

bool w4a16_bulk_available() {
#ifndef L32_SASS_SM90A
    return false;
#else
    return device_runs_sm90a();
#endif
}

l32_status launch_w4a16_bulk(const l32_w4a16_params& p, cudaStream_t stream) {
    if (!w4a16_bulk_available()) return L32_UNSUPPORTED;
    if (p.m > 16) return L32_UNSUPPORTED;
    if (p.partials == nullptr || p.counters == nullptr) return L32_INVALID_ARGUMENT;
    if (!is_aligned(p.scales, 16) || (p.zeros != nullptr && !is_aligned(p.zeros, 16))) return L32_UNSUPPORTED;
    // At most one warp per chunk, so that every warp has a non-empty range where the matrix has 4 chunks or more.
    const int64_t units = (p.n + 15) / 16 * (p.k / 64);
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(p.splits, units / kWarps));
    return p.m <= 8 ? launch<1>(p, stream, static_cast<unsigned>(blocks))
                    : launch<2>(p, stream, static_cast<unsigned>(blocks));
}

}  // namespace quant
}  // namespace l32

extern "C" int l32_w4a16_bulk_available(void) { return l32::quant::w4a16_bulk_available() ? 1 : 0; }
