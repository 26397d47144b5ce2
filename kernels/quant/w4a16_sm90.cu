// kernels/quant/w4a16_sm90.cu: the W4A16 GEMM for many rows of x (prefill) on Hopper's warpgroup MMA, for sm_90a:
// out = x @ bf16(s * (q - z))^T with the weights dequantized in registers, the product of what the large-m path
// of engine/ops/cuda/quant (l32_w4a16_dequant into a bf16 scratch, then cuBLASLt) computes, without the scratch.
// Launched by l32_w4a16_gemm when params.kernel is L32_W4A16_WGMMA or L32_W4A16_WGMMA_ROW.
//
// Why. The dequantize-then-cuBLASLt path writes and reads a bf16 copy of each weight chunk on top of cuBLAS's own
// traffic, so it can only be slower than cuBLAS bf16 (issue 6 asks for no slower). Here each weight byte is read
// once as int4 (a quarter of bf16's bytes) and dequantized in registers straight into wgmma's A operand: one
// dequant_bf16x2 and one bf16 multiply by the group scale per two weights, per block of 128 tokens.
//
// Numerics: each weight is bf16(s * (q - z)), rounded once, exactly as l32_w4a16_dequant writes it; the products
// accumulate in f32 over all of k in wgmma's order (no per-group epilogue: the scale is in the weight), and each
// output is rounded to bf16 once. So the result differs from the dequantize + cuBLASLt path only in the order of
// the f32 sums. Outputs go through w4a16_emit_pair: matrix row order for a paired layout, or silu(gate) * up.
//
// Tiles. A block of 2 warpgroups (256 threads) owns 128 weight rows (warp w owns row tile w: warp w % 4 of
// warpgroup w / 4 holds A rows 16 (w % 4)..) and kBN tokens; grid = (ceil(m / kBN), ceil(n_pad / 128)), the m
// tiles of a weight tile next to each other. Per 64-column chunk a kStages-deep cp.async ring holds the block's 8
// weight tiles (4 KB, fragment order), their scale (and zero-point) entries, and the kBN x 64 activations as a
// 128-byte-swizzled K-major tile (common/wgmma.cuh) whose k order follows the weight layout's A fragments: for the
// bf16 m16n8k16 fragments of quant/common.cuh, k16 step 2j + q/2 of the chunk (group j, the group's MMA q / 2)
// takes column words 4 t' + q (2 bf16 each, t' = 0..3, q = 0..3) of group j, at slot word t' + 4 (q % 2). So each
// 4-byte column word is copied to its slot with a 4-byte cp.async. Per chunk each warpgroup issues 4 wgmma
// m64n(kBN)k16 with A from registers (this chunk's dequantized fragments) and B by descriptor, commits them and
// waits for them (see the loop for why not later); the two warpgroups overlap each other.
//   kRow (L32_W4A16_WGMMA_ROW; 2.0-2.9x the kRow = false kernel on an H200, 2026-11-28): the activations in natural k order, 16-byte copies (8 per
// token row: four per thread and chunk at 128-token tiles instead of sixteen 4-byte ones), and the permutation on
// the A side: step 2 jg + st takes pair t of the words of quad lanes 2 st (registers r) and 2 st + 1 (registers
// r + 2), i.e. four 4-byte weight loads per (group, row) from shared memory instead of one. Same products, but
// each k16 step holds 16 consecutive columns instead of spread ones, and wgmma rounds each step's sum into the f32
// accumulator: other bits than kRow = false (seen on an H200, 2026-11-28), within the summation-order bound.
//
//   Split-K (grid.z = splits; fifteenth session, not yet run on a GPU): each split takes its share of the 64-column
// chunks (split_range), writes f32 partials, and the block whose arrival completes its (token tile, row block) sums
// the splits in split order and writes through w4a16_emit_pair (w4a16_finish_rows, as the decode kernels finish).
// For few blocks: at 64 tokens on 11B's down projection the grid is 32 blocks on 132 SMs without it.
//
//   Prewait (p.prewait, under PDL; twentieth session, not yet run on a GPU): the first two stages' weights, scales
// and zero points are copied before the wait for the previous kernel (stage_weights_sm90), the activations after
// it; the same copies and bits.
//
// Registers from ptxas: see engine/ops/cuda/quant/mod.rs (module docs).
#include <climits>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/status.cuh"
#include "common/wgmma.cuh"
#include "llama32_kernels.h"
#include "quant/common.cuh"
#include "quant/w4a16_common.cuh"
#include "quant/w4a16_sm90.cuh"

namespace l32 {
namespace quant {
namespace {

template <int kBN, int kStages>
struct W4A16WgmmaTraits {
    static_assert(kBN == 64 || kBN == 128, "wgmma n64 or n128");
    static constexpr int kThreads = 256;
    static constexpr int kTiles = 8;                          // weight row tiles of 16 per block
    using XTile = wgmma::Sw128Tile<64, kBN>;                  // one chunk of activations, 128-byte rows
    static constexpr int kXBytes = XTile::kElems * 2;         // kBN x 128 bytes (a multiple of 1024)
    static constexpr int kWBytes = kTiles * 512;
    static constexpr int kSBytes = kTiles * 8 * 8;            // 8 entries of 4 bf16 per tile (scales)
    static constexpr int kZBytes = kTiles * 8 * 8;            // ... and of the biases 136 + z (zero points)
    static constexpr int kStageBytes = kXBytes + kWBytes + kSBytes + kZBytes;
    static_assert(kStageBytes % 1024 == 0, "every stage's activations start on a swizzle atom");
    static constexpr int kAlign = 1024;
    static constexpr int kSmemBytes = kStages * kStageBytes + kAlign;
    static_assert(kSmemBytes <= 227 * 1024, "the sm_90 opt-in limit per CTA");
    static constexpr int kMinBlocks = 2;  // two blocks (four warpgroups) per SM: shared memory and registers fit
    static_assert(2 * kSmemBytes <= 228 * 1024, "two blocks per SM");
    static_assert(kStages >= 3, "at least two chunks in flight");
};

// The weights, scales and zero points of chunk c of the block's 8 weight row tiles (from nt0) into the stage at s,
// one 16-byte weight copy per thread and 8-byte scale (and zero-point) copies (not committed); tiles past n are
// zero-filled. Weights only: w4a16_wgmma_kernel may issue it before it waits for the previous kernel (p.prewait).
template <class T, bool kZeros>
__device__ __forceinline__ void stage_weights_sm90(unsigned char* s, const l32_w4a16_params& p, int nt0, int ntiles,
                                                   int kc, int c) {
    static_assert(T::kTiles * 32 == T::kThreads, "one weight copy per thread");
    const auto* wq = static_cast<const uint8_t*>(p.qweight);
    {
        const int i = threadIdx.x;
        const int nt = nt0 + i / 32;
        const bool ok = nt < ntiles;
        const int64_t src = ((int64_t{ok ? nt : 0} * kc + c) * 32 + i % 32) * 16;
        cp_async16(s + T::kXBytes + i * 16, wq + src, ok);
    }
    if (threadIdx.x < T::kTiles * 8) {  // 64 entries of 8 bytes (the scales are only 8-byte aligned)
        const auto* sc = static_cast<const uint8_t*>(p.scales);
        const int i = threadIdx.x;
        const int nt = nt0 + i / 8;
        const bool ok = nt < ntiles;
        const int64_t src = ((int64_t{ok ? nt : 0} * kc + c) * 8 + i % 8) * 8;
        cp_async_ca<8>(s + T::kXBytes + T::kWBytes + i * 8, sc + src, ok);
        if constexpr (kZeros) {
            const auto* zr = static_cast<const uint8_t*>(p.zeros);
            cp_async_ca<8>(s + T::kXBytes + T::kWBytes + T::kSBytes + i * 8, zr + src, ok);
        }
    }
}

// Tier 1. grid = (ceil(m / kBN), ceil(n_pad / 128), splits), block = 256, dynamic shared memory kSmemBytes.
template <int kBN, int kStages, bool kZeros, bool kRow>
__global__ void __launch_bounds__(256, W4A16WgmmaTraits<kBN, kStages>::kMinBlocks)
    w4a16_wgmma_kernel(const __grid_constant__ l32_w4a16_params p) {
#if L32_WGMMA_AVAILABLE
    using T = W4A16WgmmaTraits<kBN, kStages>;
    using XTile = typename T::XTile;
    constexpr int NT = kBN / 8;  // accumulator column tiles of 8 tokens
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const uint32_t raw_addr = smem_addr(smem_raw);
    const uint32_t base_addr = (raw_addr + T::kAlign - 1) & ~static_cast<uint32_t>(T::kAlign - 1);
    unsigned char* smem = smem_raw + (base_addr - raw_addr);

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int m = static_cast<int>(p.m);
    const int ntiles = static_cast<int>((p.n + 15) / 16);
    const int kc = static_cast<int>(p.k / 64);
    const int m0 = blockIdx.x * kBN;
    const int nt0 = blockIdx.y * T::kTiles;
    int c0 = 0, c1 = kc;  // this split's chunks
    split_range(kc, p.splits, blockIdx.z, c0, c1);
    const int nchunks = c1 - c0;

    // The first two stages. With p.prewait their weights, scales and zero points are copied before the wait for the
    // previous kernel, which writes x (never the weights: kernels/common/launch.cuh), so under PDL they arrive while
    // it finishes. They join the first commit group, which the loop's first wait on the copies covers either way
    // (two stages, not all kStages - 1, so that this wait covers little more than before); the copies and the bits
    // are the same.
    constexpr int kEarly = 2;
    static_assert(kEarly <= kStages - 1, "early stages are among the first ones");
    const bool early = p.prewait != 0;
    if (early) {
#pragma unroll
        for (int s = 0; s < kEarly; ++s) {
            if (s < nchunks) stage_weights_sm90<T, kZeros>(smem + s * T::kStageBytes, p, nt0, ntiles, kc, c0 + s);
        }
    }
    pdl_begin();
    const auto* x = static_cast<const uint8_t*>(p.x);

    // kRow: each thread's activation copies, the same in every chunk but for the chunk's 128-byte column offset
    // (computed once). Natural k order (k16 step ks at bytes 32 ks of the row before the swizzle), 16 bytes per
    // copy: 8 lanes copy one token's 128 bytes into one swizzled 128-byte row (conflict-free).
    static_assert(!kRow || kBN * 8 % T::kThreads == 0, "whole copy rounds");
    const RowCopies<kRow ? kBN * 8 / T::kThreads : 1> row_copies(
        x, p.k * 2, m0, m, T::kThreads, [](int i, int& r, int& piece, int& dst) {
            r = i / 8;
            piece = i % 8;
            dst = XTile::offset(r, piece) * 2;
        });

    // Copies chunk c into stage `stage`: its activations, then (with `weights`) its weights, scales and zero points
    // (stage_weights_sm90). Token rows past m are zero-filled.
    auto load_stage = [&](int stage, int c, bool weights) {
        unsigned char* s = smem + stage * T::kStageBytes;
        if constexpr (kRow) {
            row_copies.issue(s, int64_t{c} * 128);
        } else {
            // Activations: column word cw (0..31, 2 bf16) of token r goes to k16 step 2 (cw / 16) + (cw % 4) / 2,
            // slot word (cw % 16) / 4 + 4 (cw % 2), i.e. byte 32 step + 4 slot of the row before the swizzle. A
            // warp copies one token's 32 words: 128 bytes read, 32 distinct banks written.
            // (A runtime loop: unrolled, its hoisted address arithmetic spills at 128-token tiles.)
            for (int i = threadIdx.x; i < kBN * 32; i += T::kThreads) {
                const int r = i / 32, cw = i % 32;
                const int tok = m0 + r;
                const bool ok = tok < m;
                const int step = 2 * (cw / 16) + (cw % 4) / 2, slot = (cw % 16) / 4 + 4 * (cw % 2);
                const int byte = 32 * step + 4 * slot;  // within the 128-byte row
                const int elem = XTile::offset(r, byte / 16) + (byte % 16) / 2;
                const int64_t src = (int64_t{ok ? tok : 0} * p.k + int64_t{c} * 64) * 2 + cw * 4;
                cp_async_ca<4>(s + elem * 2, x + src, ok);
            }
        }
        if (weights) stage_weights_sm90<T, kZeros>(s, p, nt0, ntiles, kc, c);
    };

    float d[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) d[j][0] = d[j][1] = d[j][2] = d[j][3] = 0.f;
    // Local chunk i is chunk c0 + i of the matrix, in stage i % kStages.
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < nchunks) load_stage(s, c0 + s, !early || s >= kEarly);
        cp_async_commit();
    }
#pragma unroll 1
    for (int c = 0; c < nchunks; ++c) {
        cp_async_wait<kStages - 2>();  // chunk c has landed for this thread ...
        wgmma::fence_proxy_async_shared();
        __syncthreads();  // ... and for every thread; chunk c - 1's products are done (waited in its iteration)
        const int next = c + kStages - 1;
        if (next < nchunks) load_stage(next % kStages, c0 + next, true);
        cp_async_commit();

        const unsigned char* s = smem + (c % kStages) * T::kStageBytes;
        const uint2 sv = *reinterpret_cast<const uint2*>(s + T::kXBytes + T::kWBytes + (warp * 8 + g) * 8);
        uint2 zv = make_uint2(kSymmetricBias, kSymmetricBias);
        if constexpr (kZeros) {
            zv = *reinterpret_cast<const uint2*>(s + T::kXBytes + T::kWBytes + T::kSBytes + (warp * 8 + g) * 8);
        }
        // A fragments of the chunk's 4 k16 steps. A lane's word (row g from .x / .z, row g + 8 from .y / .w of its
        // 16 bytes, group jg = 0 / 1) holds columns 8t + 2 pair, + 1 of the group as pair `pair` (the W4A16 order of
        // quant/common.cuh).
        uint32_t a[4][4];
        const unsigned char* wt = s + T::kXBytes + warp * 512;
#pragma unroll
        for (int jg = 0; jg < 2; ++jg) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const uint32_t bias = kZeros ? bf16_splat(r == 0 ? zv.x : zv.y, jg == 1) : kSymmetricBias;
                const uint32_t scale2 = bf16_splat(r == 0 ? sv.x : sv.y, jg == 1);
                if constexpr (kRow) {
                    // Natural k order: step 2 jg + st takes columns 16 st + 2t, + 1 (registers r) and
                    // 16 st + 8 + 2t, + 1 (registers r + 2), pair t of quad lanes 2 st and 2 st + 1.
#pragma unroll
                    for (int u = 0; u < 4; ++u) {
                        const uint32_t word =
                            *reinterpret_cast<const uint32_t*>(wt + ((lane & ~3) + u) * 16 + (2 * jg + r) * 4);
                        a[2 * jg + u / 2][r + 2 * (u % 2)] = bf16x2_mul(dequant_bf16x2(word, 4 * t, bias), scale2);
                    }
                } else {
                    // Step 2 jg + pair / 2 takes the lane's own pair `pair`: register r + 2 (pair % 2).
                    const uint32_t word = *reinterpret_cast<const uint32_t*>(wt + lane * 16 + (2 * jg + r) * 4);
#pragma unroll
                    for (int pair = 0; pair < 4; ++pair) {
                        a[2 * jg + pair / 2][r + 2 * (pair % 2)] =
                            bf16x2_mul(dequant_bf16x2(word, 4 * pair, bias), scale2);
                    }
                }
            }
        }
        // The chunk's products are waited for before the next chunk's fragments are written: defining a product's
        // input registers while any product is in flight makes ptxas serialize every wgmma (C7513). The two
        // warpgroups overlap one another's dequantization and products instead.
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) wgmma::fence_operands(a[ks]);
        wgmma::fence_operands(d);
        wgmma::fence();
        const uint32_t x_addr = base_addr + (c % kStages) * T::kStageBytes;
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
            wgmma::mma_rs<kBN>(d, a[ks], wgmma::desc_sw128(x_addr + ks * 32, 16, 1024), c > 0 || ks > 0);
        }
        wgmma::commit();
        wgmma::wait<0>();
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) wgmma::fence_operands(a[ks]);
    }
    wgmma::wait<0>();
    wgmma::fence_operands(d);
    cp_async_wait<0>();

    // d[j][e]: layout row 16 (nt0 + warp) + g (+8 for e >= 2), token m0 + 8 j + 2 t (+1 for odd e). A tile past
    // the matrix (zero-filled) stores nothing: in a paired layout its rows would map onto real columns.
    const int64_t npad = int64_t{ntiles} * 16;
    const int64_t row = int64_t{nt0 + warp} * 16 + g;
    if (nt0 + warp < ntiles) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int tok = m0 + 8 * j + 2 * t + e;
                if (tok >= m) continue;
                if (p.splits == 1) {
                    w4a16_emit_pair(p, tok, row, d[j][e], d[j][e + 2]);
                } else {
                    float* part = p.partials + (int64_t{blockIdx.z} * m + tok) * npad + row;
                    part[0] = d[j][e];
                    part[8] = d[j][e + 2];
                }
            }
        }
    }
    // Split-K: the block that completes the (token tile, row block) sums its splits in split order and writes.
    if (p.splits > 1) {
        const int tile = static_cast<int>(blockIdx.y * gridDim.x + blockIdx.x);
        w4a16_finish_rows(p, m, npad, tile, m0, min(kBN, m - m0), int64_t{nt0} * 16, 16 * T::kTiles);
    }
#else
    (void)p;
    __trap();  // only sm_90a runs this kernel; the launcher refuses every other device
#endif
}

// Tier 2.
template <int kBN, int kStages, bool kRow>
l32_status launch(const l32_w4a16_params& p, cudaStream_t stream) {
    using T = W4A16WgmmaTraits<kBN, kStages>;
    const int64_t ntiles = (p.n + 15) / 16;
    const dim3 grid(static_cast<unsigned>((p.m + kBN - 1) / kBN),
                    static_cast<unsigned>((ntiles + T::kTiles - 1) / T::kTiles), static_cast<unsigned>(p.splits));
    const auto kernel = p.zeros != nullptr ? w4a16_wgmma_kernel<kBN, kStages, true, kRow>
                                           : w4a16_wgmma_kernel<kBN, kStages, false, kRow>;
    const l32_status smem = allow_dynamic_smem(kernel, T::kSmemBytes);
    if (smem != L32_OK) return smem;
    launch_kernel(kernel, grid, T::kThreads, T::kSmemBytes, stream, p);
    return check_launch();
}

}  // namespace

bool w4a16_wgmma_available() {
#ifndef L32_SASS_SM90A
    return false;
#else
    return device_runs_sm90a();
#endif
}

l32_status launch_w4a16_wgmma(const l32_w4a16_params& p, cudaStream_t stream) {
    if (!w4a16_wgmma_available()) return L32_UNSUPPORTED;
    if (p.tile_m != 64 && p.tile_m != 128) return L32_UNSUPPORTED;
    if ((p.n + 127) / 128 > 65535 || (p.m + p.tile_m - 1) / p.tile_m > INT_MAX) return L32_UNSUPPORTED;
    // Split-K: one counter per (token tile, row block), an int index.
    if (p.splits > 1 && (p.m + p.tile_m - 1) / p.tile_m * ((p.n + 127) / 128) > INT_MAX) return L32_UNSUPPORTED;
    if (p.kernel == L32_W4A16_WGMMA_ROW) {
        return p.tile_m == 64 ? launch<64, 6, true>(p, stream) : launch<128, 5, true>(p, stream);
    }
    return p.tile_m == 64 ? launch<64, 6, false>(p, stream) : launch<128, 5, false>(p, stream);
}

}  // namespace quant
}  // namespace l32

extern "C" int l32_w4a16_wgmma_available(void) { return l32::quant::w4a16_wgmma_available() ? 1 : 0; }
