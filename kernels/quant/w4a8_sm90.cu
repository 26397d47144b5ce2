// kernels/quant/w4a8_sm90.cu: the W4A8 GEMM of w4a8.cu (same parameters, same torchao 8da4w result up to f32
// rounding) on Hopper's warpgroup MMA, for sm_90a, symmetric weights only. Launched by l32_w4a8_gemm when
// params.kernel is L32_W4A8_WGMMA, L32_W4A8_WGMMA_SERIAL, L32_W4A8_WGMMA_ROW or L32_W4A8_WGMMA_WS (the row
// kernel's products, warp-specialized: see w4a8_wgmma_ws_kernel). What the kernels share (traits, copy plans,
// Products) is quant/w4a8_sm90_products.cuh; the TMA-fed kernels (L32_W4A8_WGMMA_TMA, L32_W4A8_WGMMA_WS_TMA) are
// w4a8_sm90_tma.cu, which launch_w4a8_wgmma below calls.
//
// Why. With group 32 every k32 MMA output carries its own weight scale, so each group costs every output an f32
// step after the tensor cores. w4a8.cu pays two ALU ops per output and group (FADD of the biased MMA accumulator,
// then FFMA) plus the mma.sync issue and fragment loads: 0.3x cuBLAS bf16 on the 11B / 90B shapes (H200,
// 2026-11-27). An SM's int8 tensor cores do 4096 multiply-adds a cycle, i.e. 128 (output, group) pairs a cycle,
// and its FP32 pipes 128 lane-ops: at two ops per pair the ALU caps the kernel at half the int8 peak. This kernel
// spends one FFMA per pair and feeds the tensor cores with wgmma (A, the weights, from registers; B, the
// activations, from shared memory), which frees the issue slots mma.sync and its fragment loads took.
//   Measured (H100, 2026-11-28, bench/results/2026-11-28-h100-gate-wgmma.md): bit-equal to its twin, but 0.24-0.50x
// cuBLAS bf16 at m >= 256 (the mma kernel: 0.33-0.69x); faster than mma only at m = 64 (1B decode, batch 64). The
// count there put the loss in issue slots: each chunk's copy loops (runtime trip counts, 4-byte copies) cost more
// instructions than the FFMAs. Since then the copy loops have compile-time trip counts (straight-line SASS; the
// per-thread copy addresses computed once per chunk), and kRow below moves the k permutation off the copies.
//
// One FFMA per group: a telescoped sum over a running biased accumulator. Each wgmma adds its group's exact s32
// sum s_g onto the accumulator registers D, which start at the bits of B = 1.5 * 2^23 (kI2fBias). While
// B + sum stays in [2^23, 2^24], whose float ulp is 1, the bits of D read as a float are exactly D_g = B + s_a + ...
// + s_g (the trick of exact_i2f, with the integer add done by the tensor core). Over a segment of groups a..b,
//   sum_g sw_g s_g = sum_g sw_g (D_g - D_{g-1}) = sum_{g<b} (sw_g - sw_{g+1}) D_g + sw_b D_b - sw_a B,
// so each group is one FFMA of the bias-free float of D by a coefficient computed once per (row, group), and each
// segment adds the constant -sw_a B first. The sum never leaves the binade: |s_g| <= 32 * 128 * 128 = 2^19 (int8
// activations times 16 q, see the scale note below), so a segment of 8 groups (kSegChunks = 4 chunks of 64 columns)
// moves D by at most 2^22; D restarts at B with every segment (one MOV per output per segment).
// Cost and accuracy: (8 FFMA + 1 MOV + 1 FFMA) per output per 8 groups instead of 16 ops. Each FFMA rounds a value
// of magnitude ~sw * 2^24 (the transient terms), so it adds up to about sw' = sw / 16 of absolute error per group,
// where the exact kernel adds ~2^-24 of the term; against a group term sw' * 16 |sum x q| that is ~1e-4 relative
// at worst, and the CPU twin (engine/ops/cpu/w4a8_segmented.rs, these f32 operations in this order, which the GPU
// tests match bit for bit) measured an RMS error of 1.0e-5 of the RMS output against torchao's numerics.
//
// Scales: the device scales hold sw / 16 and the weights enter the MMA as 16 q (one LOP3 per 4 values, see
// common.cuh), as in w4a8.cu.
//
// Tiles. A block of kWG warpgroups (kWG * 128 threads) owns 64 kWG weight rows (warp w owns row tile w: warp w % 4 of
// warpgroup w / 4 holds rows 16 (w % 4).. of that warpgroup's 64-row A) and kBN tokens, over the 64-column chunks
// of split blockIdx.z. grid = (ceil(m / kBN), ceil(n_pad / 128), splits): the m tiles of a weight tile run next to
// each other, so each weight byte is read from DRAM about once. Per chunk, a kStages-deep cp.async ring holds:
//   - the activations of both groups, kBN rows x 32 bytes each, in wgmma's K-major core-matrix layout without
//     swizzle (8 tokens x 16 bytes per 128-byte core matrix; LBO 128 between the two K halves, SBO 256 between
//     8-token groups). The MMA's k order follows the weight layout's A fragments (k slots 4t..4t+3 are columns
//     8t..8t+3, slots 16+4t.. are 8t+4..8t+7), so column word cw (4 bytes) of a token goes to K half cw & 1,
//     word cw >> 1 of its 16-byte row: 4-byte cp.async copies do that permutation on the way in;
//   - the block's weight tiles (512 bytes each, already in fragment order) and their scale entries, with those of
//     the next chunk (whose first scales close this chunk's last coefficient).
// kRow (L32_W4A8_WGMMA_ROW; `auto` from 256 rows, with 64-token tiles, as measured on an H200): the activations in natural k order instead, 16-byte copies
// (two per thread and chunk at 128-token tiles instead of eight 4-byte ones, whose index arithmetic dominated the
// loop), and the permutation moves to the A side: lane t of a quad takes slots 4t.. from the word of quad lane t / 2
// and slots 16 + 4t.. from that of lane 2 + t / 2 (low nibbles for even t, high for odd), i.e. two 16-byte weight
// loads from shared memory instead of one. The integer sums are the same, so are the bits.
// Per chunk and warp: one 16-byte weight load and two scale entries from shared memory, then per group the
// product from the A fragment in registers and its FFMAs: with kOverlap (L32_W4A8_WGMMA) two m64n(kBN/2)k32 wgmma
// over the token halves, one half's FFMAs running while the other half computes (see the kernel); without it
// (L32_W4A8_WGMMA_SERIAL) one m64n(kBN)k32, waited for. The warpgroups also overlap as the warp schedulers
// interleave them (one warpgroup's FFMAs during the other's wgmma).
//   Split-K: f32 partials and the deterministic finish of w4a8.cu (w4a8_common.cuh); segments restart with each
// split's first chunk.
//
// Registers from ptxas: see engine/ops/cuda/quant/mod.rs (module docs).
#include <climits>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/mbarrier.cuh"
#include "common/status.cuh"
#include "common/tma.cuh"
#include "common/wgmma.cuh"
#include "llama32_kernels.h"
#include "quant/common.cuh"
#include "quant/w4a8_common.cuh"
#include "quant/w4a8_sm90.cuh"
#include "quant/w4a8_sm90_products.cuh"

namespace l32 {
namespace quant {
namespace {

// Tier 1. grid = (ceil(m / kBN), ceil(n_pad / (64 kWG)), splits), block = kWG * 128, dynamic shared memory
// kSmemBytes. kOverlap: each group's product is two wgmma over the token halves, and the FFMAs of one half run
// while the tensor cores compute the other (the next wgmma is issued before the previous one's results are
// scaled); without it each product is waited for before its FFMAs. Both do the same f32 operations in the same
// order per output, so they give the same bits.
template <int kWG, int kBN, int kStages, bool kOverlap, bool kRow>
__global__ void __launch_bounds__(kWG * 128, W4A8WgmmaTraits<kWG, kBN, kStages, kOverlap, kRow>::kMinBlocks)
    w4a8_wgmma_kernel(const __grid_constant__ l32_w4a8_params p) {
#if L32_WGMMA_AVAILABLE
    using T = W4A8WgmmaTraits<kWG, kBN, kStages, kOverlap, kRow>;
    pdl_begin();
    extern __shared__ __align__(128) uint8_t smem[];

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const BlockSpan<T> span(p);
    const int m = span.m, ntiles = span.ntiles, kc = span.kc, m0 = span.m0, nt0 = span.nt0, c0 = span.c0, c1 = span.c1;
    const int64_t npad = span.npad;

    const auto* xq = reinterpret_cast<const uint8_t*>(p.xq);

    // kRow: each thread's activation copies, the same in every chunk but for the chunk's 64-byte column offset
    // (computed once: source row, shared-memory offset in a stage, and whether the token exists). A warp copies 8
    // tokens x 64 bytes, lane (piece, rr) = (lane / 8, lane % 8) the 16 bytes `piece` (group piece / 2, K half
    // piece % 2) of token 8 q + rr: each 8 lanes fill one 128-byte core matrix (conflict-free), the warp reads 8
    // rows x 64 contiguous bytes.
    static_assert(!kRow || kBN * 4 % T::kThreads == 0, "whole copy rounds");
    const RowCopies<kRow ? kBN * 4 / T::kThreads : 1> row_copies(xq, p.k, m0, m, T::kThreads, row_piece<kBN>);

    // Each thread's weight copy (one 16-byte piece of the block's tiles) and scale copy (threads below 2 kTiles 8).
    static_assert(T::kTiles * 32 == T::kThreads, "one weight copy per thread");
    static_assert(2 * T::kTiles * 8 <= T::kThreads, "one scale copy per thread at most");
    const ChunkCopies<T, T::kThreads> chunk_copies(p, threadIdx.x, nt0, ntiles, kc);

    // Copies chunk c into stage `stage`. Token rows past m, weight tiles past n and chunks past k are zero-filled.
    auto load_stage = [&](int stage, int c) {
        uint8_t* s = smem + stage * T::kStageBytes;
        if constexpr (kRow) {
            row_copies.issue(s, int64_t{c} * 64);  // natural k order, 16 bytes per copy (see above)
        } else {
            // Activations, 4 bytes per copy: a warp fills one 128-byte core matrix (8 tokens x K half h of group
            // j), lane (rr, wd) = (lane / 4, lane % 4) token 8 q + rr, word wd of its row there, i.e. column word
            // 2 wd + h. So the 32 lanes write 32 distinct banks; their global reads (every other word of 8 rows)
            // take two instructions per 32-byte sector, the second from L1.
            static_assert(kBN * 16 % T::kThreads == 0, "whole copy rounds");
#pragma unroll
            for (int it = 0; it < kBN * 16 / T::kThreads; ++it) {
                const int i = threadIdx.x + it * T::kThreads;
                const int lane_i = i % 32, q = i / 32;
                const int j = (q % 4) / 2, h = q % 2, r = (q / 4) * 8 + lane_i / 4, cw = 2 * (lane_i % 4) + h;
                const int tok = m0 + r;
                const bool ok = tok < m;
                const int64_t src = int64_t{ok ? tok : 0} * p.k + int64_t{c} * 64 + (j * 8 + cw) * 4;
                cp_async_ca<4>(s + act_offset<kBN>(j, r, cw), xq + src, ok);
            }
        }
        chunk_copies.issue(s, threadIdx.x, c, kc);
    };

    Products<kWG, kBN, kStages, kOverlap, kRow> prod;
#pragma unroll
    for (int s = 0; s < T::kAhead; ++s) {
        if (c0 + s < c1) load_stage(s, c0 + s);
        cp_async_commit();
    }
#pragma unroll 1
    for (int c = c0; c < c1; ++c) {
        cp_async_wait<T::kAhead - 1>();  // chunk c has landed for this thread ...
        wgmma::fence_proxy_async_shared();
        __syncthreads();  // ... and for every thread; no product reads the stage refilled below any more
        const int next = c + T::kAhead;
        if (next < c1) load_stage((next - c0) % kStages, next);
        cp_async_commit();
        prod.chunk(smem + ((c - c0) % kStages) * T::kStageBytes, warp, lane, c - c0, c + 1 == c1);
    }
    cp_async_wait<0>();
    prod.store(p, npad, nt0, warp, m0, lane);
    span.splitk_finish(p);
#else
    (void)p;
    __trap();  // only sm_90a runs this kernel; the launcher refuses every other device
#endif
}

// Tier 1, warp-specialized (L32_W4A8_WGMMA_WS; `auto` for 33-255 rows, as measured on an H200). The products of the row kernel
// (Products<2, kBN, kStages, false, true>: serial, natural-order activations, the same bits), with the copies
// taken off the consumers and the block barrier taken out of the chunk loop:
//   - threads 0-127 (a producer warpgroup) copy each chunk's activations, weights and scales into a ring of
//     kStages stages; per stage an mbarrier `full` (128 arrivals: each producer thread once its copies of the
//     chunk have landed and are fenced for the async proxy, kLag chunks after issuing them) and an mbarrier
//     `empty` (8 arrivals: lane 0 of each consumer warp once the chunk's products are done);
//   - threads 128-383 (two consumer warpgroups, warp 4 + w owning weight row tile w) wait for a stage, run its
//     products and release it. Nothing else ties the two consumers together, so one's FFMAs can run while the
//     other's wgmma does: in the block-barrier kernels both do the same phase at the same time.
// One block of 384 threads per SM (the consumers need ~164 registers); grid as the other kernels. Split-K: every
// thread (the producer's too) reaches the finish, whose block barriers count all 384.
template <int kBN, int kStages>
__global__ void __launch_bounds__(384, 1) w4a8_wgmma_ws_kernel(const __grid_constant__ l32_w4a8_params p) {
#if L32_WGMMA_AVAILABLE
    using T = W4A8WgmmaTraits<2, kBN, kStages, false, true>;
    constexpr int kProducers = 128;
    constexpr int kLag = 2;  // chunks a producer thread keeps in flight before it signals the oldest
    static_assert(kLag < kStages, "a chunk is signalled before the producer waits for its stage to come back");
    pdl_begin();
    extern __shared__ __align__(128) uint8_t smem[];
    __shared__ uint64_t full[kStages], empty[kStages];

    const BlockSpan<T> span(p);
    const int m = span.m, ntiles = span.ntiles, kc = span.kc, m0 = span.m0, nt0 = span.nt0, c0 = span.c0, c1 = span.c1;
    const int64_t npad = span.npad;
    if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < kStages; ++s) {
            sync90::mbar_init(&full[s], kProducers);
            sync90::mbar_init(&empty[s], T::kTiles);
        }
    }
    __syncthreads();

    if (threadIdx.x < kProducers) {
        const auto* xq = reinterpret_cast<const uint8_t*>(p.xq);
        // The producer's copies, planned once as in the other kernels: kBN * 4 activation pieces, two weight pieces
        // and one scale entry per producer thread.
        static_assert(kBN * 4 % kProducers == 0 && T::kTiles * 32 == 2 * kProducers, "whole copy rounds");
        static_assert(2 * T::kTiles * 8 == kProducers, "one scale entry per producer thread");
        const RowCopies<kBN * 4 / kProducers> row_copies(xq, p.k, m0, m, kProducers, row_piece<kBN>);
        const ChunkCopies<T, kProducers> chunk_copies(p, threadIdx.x, nt0, ntiles, kc);
        for (int c = c0; c < c1; ++c) {
            const int rel = c - c0, stage = rel % kStages;
            if (rel >= kStages) sync90::mbar_wait_bounded(&empty[stage], (rel / kStages - 1) & 1);
            uint8_t* st = smem + stage * T::kStageBytes;
            row_copies.issue(st, int64_t{c} * 64);
            chunk_copies.issue(st, threadIdx.x, c, kc);
            cp_async_commit();
            if (rel >= kLag) {
                cp_async_wait<kLag>();  // chunk rel - kLag has landed for this thread ...
                wgmma::fence_proxy_async_shared();  // ... and is visible to the proxy wgmma reads through
                sync90::mbar_arrive(&full[(rel - kLag) % kStages]);
            }
        }
        cp_async_wait<0>();
        wgmma::fence_proxy_async_shared();
        for (int rel = c1 - c0 - kLag < 0 ? 0 : c1 - c0 - kLag; rel < c1 - c0; ++rel) {
            sync90::mbar_arrive(&full[rel % kStages]);
        }
    } else {
        const int tile = static_cast<int>(threadIdx.x) / 32 - kProducers / 32, lane = threadIdx.x % 32;
        Products<2, kBN, kStages, false, true> prod;
#pragma unroll 1
        for (int c = c0; c < c1; ++c) {
            const int rel = c - c0, stage = rel % kStages;
            sync90::mbar_wait(&full[stage], (rel / kStages) & 1);
            prod.chunk(smem + stage * T::kStageBytes, tile, lane, rel, c + 1 == c1);
            __syncwarp();
            if (lane == 0) sync90::mbar_arrive(&empty[stage]);
        }
        prod.store(p, npad, nt0, tile, m0, lane);
    }
    span.splitk_finish(p);
#else
    (void)p;
    __trap();  // only sm_90a runs this kernel; the launcher refuses every other device
#endif
}

template <int kWG, int kBN, int kStages, bool kOverlap, bool kRow = false>
l32_status launch(const l32_w4a8_params& p, cudaStream_t stream) {
    using T = W4A8WgmmaTraits<kWG, kBN, kStages, kOverlap, kRow>;
    return launch_tiles<T>(w4a8_wgmma_kernel<kWG, kBN, kStages, kOverlap, kRow>, T::kThreads, p, stream);
}

template <int kBN, int kStages>
l32_status launch_ws(const l32_w4a8_params& p, cudaStream_t stream) {
    using T = W4A8WgmmaTraits<2, kBN, kStages, false, true>;
    static_assert(T::kThreads + 128 == 384 && T::kMinBlocks >= 1,
                  "the consumers are the row kernel's block, beside a producer warpgroup (one block per SM)");
    return launch_tiles<T>(w4a8_wgmma_ws_kernel<kBN, kStages>, 384, p, stream);
}

}  // namespace

// Built without sm_90a SASS (LLAMA32_CUDA_ARCHS without 90a, see build.rs) the kernel body would only trap, so the
// launcher refuses (L32_UNSUPPORTED), as it does on devices other than compute capability 9.x.
bool w4a8_wgmma_available() {
#ifndef L32_SASS_SM90A
    return false;
#else
    if (!device_runs_sm90a()) return false;
    // Looks the tensor-map encoder up here, once, so that the first TMA launch does not do it inside a graph
    // capture.
    (void)tma::encoder();
    return true;
#endif
}

l32_status launch_w4a8_wgmma(const l32_w4a8_params& p, cudaStream_t stream) {
    if (!w4a8_wgmma_available()) return L32_UNSUPPORTED;
    if (p.zeros != nullptr || (p.tile_m != 64 && p.tile_m != 128)) return L32_UNSUPPORTED;
    if ((p.m + p.tile_m - 1) / p.tile_m > INT_MAX) return L32_UNSUPPORTED;
    if (p.kernel == L32_W4A8_WGMMA_TMA || p.kernel == L32_W4A8_WGMMA_WS_TMA) {
        if (w4a8_tma_boxes_fit(p)) return launch_w4a8_wgmma_tma(p, stream);
        // A box would be larger than its whole tensor: the cp.async kernel with the same products (the same bits).
        l32_w4a8_params q = p;
        q.kernel = p.kernel == L32_W4A8_WGMMA_TMA ? L32_W4A8_WGMMA_ROW : L32_W4A8_WGMMA_WS;
        return launch_w4a8_wgmma(q, stream);
    }
    if (p.kernel == L32_W4A8_WGMMA_WS) return p.tile_m == 64 ? launch_ws<64, 8>(p, stream) : launch_ws<128, 6>(p, stream);
    if (p.kernel == L32_W4A8_WGMMA_ROW) {
        return p.tile_m == 64 ? launch<2, 64, 6, false, true>(p, stream) : launch<2, 128, 6, false, true>(p, stream);
    }
    if (p.kernel == L32_W4A8_WGMMA_SERIAL) {
        return p.tile_m == 64 ? launch<2, 64, 6, false>(p, stream) : launch<2, 128, 6, false>(p, stream);
    }
    return p.tile_m == 64 ? launch<2, 64, 6, true>(p, stream) : launch<2, 128, 8, true>(p, stream);
}

}  // namespace quant
}  // namespace l32

extern "C" int l32_w4a8_wgmma_available(void) { return l32::quant::w4a8_wgmma_available() ? 1 : 0; }
