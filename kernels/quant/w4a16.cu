// kernels/quant/w4a16.cu: 4-bit group-wise weights x bf16 activations (l32_w4a16_params in llama32_kernels.h):
// the decode GEMM out[m, n] = x[m, k] @ dequant(w)[n, k]^T for m <= 64, and the dequantization of the same layout
// into a bf16 [n, k] matrix (the large-m path: dequantize once into a scratch buffer, then cuBLASLt). This file
// holds the direct decode kernel (L32_W4A16_DIRECT, and L32_W4A16_DIRECT_BATCHED: the same body under another launch
// bound) and the checked entry of all three; the pipelined one
// (L32_W4A16_PIPELINED) is kernels/quant/w4a16_pipelined.cu, the tiled one (L32_W4A16_TILED)
// kernels/quant/w4a16_tiled.cu.
//
// Three tiers per kernel: the kernel, the launcher that picks the template arguments, and the checked C entry.
// The weight layout is described in kernels/quant/common.cuh (tiles of 16 rows x 64 columns, 512 bytes, lane-major).
//
// Decode GEMM design (bandwidth bound on the weight: at m = 1 it is 4 FLOP per weight byte):
//   - A block is 4 warps; warp w owns the 16-row tile nt = 4 blockIdx.x + w for the K range of split blockIdx.y.
//     Per 64-column chunk each lane issues one 16-byte load of weights (ld.global.nc.L1::no_allocate, read once)
//     and one 8-byte load of its row pair's scales. Weights go straight to registers: the layout already is the
//     MMA fragment order, so there is nothing for shared memory (or cp.async) to reshuffle. The source issues a
//     set of kUnroll = 4 chunks' loads before their arithmetic, but ptxas places each chunk's loads next to its
//     use (SASS, sm_90a, CUDA 13.0: load, dequantize, MMA, then the next chunk's load), so a warp has about one
//     chunk in flight; at m = 1 that bounded the kernel to 0.5-0.6 of the copy rate (H200). With p.l2_prefetch each
//     set first asks L2 for the next set's weights, scales and zero points (prefetch.global.L2, 2 KB per warp).
//     Timed on an H100 (2026-11-27) that moved m = 1 by -4% to +12% and won up to 8% at m = 16 on the 1B shapes,
//     but cost 1.4-1.7x at m = 16 and 64 on the 90B matrices, so the engine asks for it by shape
//     (quant::w4a16_l2_prefetch_for; docs/quantization.md).
//   - Dequantization in registers: per 32-bit word (8 nibbles) three shifts, four LOP3 and four HSUB2.BF16 give the
//     four bf16x2 A-fragment registers of a group's two m16n8k16 MMAs (exact: the registers hold q - z, see
//     dequant_bf16x2). Until the fifteenth session ptxas emitted two LOP3 per register (mask, then XOR: one LOP3
//     takes one immediate), 8.75 LOP3 per word in the main loop; the PTX lop3 with the constants as operands makes
//     it one (SASS, sm_90a: 415 -> 340 instructions per loop of four chunks at m <= 8; not yet timed).
//   - Addresses: the weight, scale, zero-point and activation pointers walk the warp's chunks (w4a16_chunks takes
//     the set's own pointers), so every load is a constant offset from a base register; before, each chunk's
//     addresses were recomputed in 64 bits from its index (340 -> 284 instructions per loop at m <= 8, 981 -> 748
//     and 162 -> 120 registers at m <= 64; same loads, same bits). The activations are the B operand (8 tokens per MMA column tile; kMT = ceil(m / 8) tiles),
//     read from global memory through L1 (every warp of a split reads the same x columns), one 16-byte load per
//     group and token tile.
//   - Group scales are applied in fp32, after the MMA: each group's two MMAs accumulate into a zeroed f32 tile,
//     which is then added as acc += scale * tile (FFMA). The products x * (q - z) are exact in fp32, so the only
//     roundings are the f32 sums and the final bf16 rounding of each output. (Applying the scale in bf16 before
//     the MMA, as Marlin does in fp16, would round every weight s * (q - z) to 8 significant bits: up to 2^-9
//     relative error per weight. The price here is 4 FFMA per group and token tile, which the decode path hides
//     behind memory.)
//   - Split-K over the 64-column chunks (grid.y = splits, chosen by the Rust heuristic quant::w4a16_splits so
//     that every shape fills the SMs at m = 1): each split writes f32 partials, and the last block to finish a
//     64-row tile sums them in split order (deterministic, one launch, no atomics on data; see splitk_arrive).
//   - Rows past n: the layout pads n to a multiple of 16 with zero rows; those outputs are never written. Token
//     rows past m read the last valid row (the MMA's extra columns are discarded).
//   - Every output store of the four kernels goes through w4a16_emit_pair (w4a16_common.cuh) with the sums of a
//     tile's rows r and r + 8, which lane (g, t) holds together. With a paired layout (p.pair_half: SwiGLU's
//     gate_up, gate j and up j in one tile) it writes them at their matrix rows, or with p.silu silu(gate) * up
//     with the bits of l32_silu_mul, one launch and one [m, 2 inter] round trip less per layer.
//
// Bytes streamed per call: n_pad * k / 2 (int4) + n_pad * k / 16 (bf16 scale per 32) = 0.5625 n k, plus
// 2 m k (x, L1/L2 resident) and 2 m n (out) or 8 splits m n (f32 partials, L2 resident). Examples:
// 90B gate_up (n 57344, k 8192): 264 MB, 94 us at 2.8 TB/s; 11B gate_up (28672 x 4096): 66 MB, 24 us;
// 1B gate_up (16384 x 2048): 18.9 MB, 6.7 us, where a launch (2-4 us) is already a large share. At 2.8 TB/s the
// effective (int4 + scales) rate corresponds to 5.0 TB/s of bf16 weight, i.e. 3.6x cuBLAS bf16 at m <= 16.
//
// Dequantization kernel: one thread per (tile, chunk, lane) 16-byte load, writing 4 x 16 bytes of bf16
// s * (q - z), the f32 product rounded once to bf16. The large-m path therefore multiplies by bf16-rounded
// weights (up to 2^-9 relative error per weight), unlike the decode kernel: documented in engine/ops/cuda/quant.rs.
#include <algorithm>
#include <climits>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/status.cuh"
#include "llama32_kernels.h"
#include "quant/common.cuh"
#include "quant/w4a16_bulk.cuh"
#include "quant/w4a16_sm90.cuh"
#include "quant/w4a16_common.cuh"
#include "quant/w4a16_pipelined.cuh"
#include "quant/w4a16_tiled.cuh"

namespace l32 {
namespace quant {
namespace {

constexpr int kWarps = 4;   // 16-row tiles per block (one per warp)
constexpr int kUnroll = 4;  // 64-column chunks loaded ahead per lane
constexpr int64_t kMaxK = int64_t{1} << 24;

// The kN chunks at the pointers (the warp's next chunks; `left` of its range remain, these included): first (when
// `prefetch`) the next kN chunks' weights, scales and zero points are asked of L2, then this set's loads are issued,
// then per chunk and group come the dequantization and the MMAs. `prefetch` is uniform across the grid (an ablation
// switch). The pointers are the set's own (the caller advances them by kN chunks), so every address below is a
// constant offset from them: no 64-bit index arithmetic per chunk.
template <int kMT, bool kZeros, int kN>
__device__ __forceinline__ void w4a16_chunks(float (&acc)[kMT][4], const uint4* wq, const uint2* sc, const uint2* zr,
                                             const uint4* const (&xr)[kMT], int left, bool prefetch) {
#pragma unroll
    for (int u = kN; u < 2 * kN; ++u) {
        if (prefetch && u < left) {
            prefetch_l2(wq + u * 32);
            prefetch_l2(sc + u * 8);
            if constexpr (kZeros) prefetch_l2(zr + u * 8);
        }
    }
    uint4 w[kN];
    uint2 s[kN], z[kN];
#pragma unroll
    for (int u = 0; u < kN; ++u) {
        w[u] = ld_stream_16(wq + u * 32);
        s[u] = ld_stream_8(sc + u * 8);
        if constexpr (kZeros) z[u] = ld_stream_8(zr + u * 8);
    }
#pragma unroll
    for (int u = 0; u < kN; ++u) {
#pragma unroll
        for (int jg = 0; jg < 2; ++jg) {
            const uint32_t wa = jg == 0 ? w[u].x : w[u].z;  // row g
            const uint32_t wb = jg == 0 ? w[u].y : w[u].w;  // row g + 8
            uint32_t bias_a = kSymmetricBias, bias_b = kSymmetricBias;
            if constexpr (kZeros) {
                bias_a = bf16_splat(z[u].x, jg == 1);
                bias_b = bf16_splat(z[u].y, jg == 1);
            }
            // Group jg's two MMAs: columns 8t..8t+3 (nibble pairs at bits 0 and 4), then 8t+4..8t+7 (8 and 12).
            const uint32_t a00 = dequant_bf16x2(wa, 0, bias_a), a01 = dequant_bf16x2(wb, 0, bias_b);
            const uint32_t a02 = dequant_bf16x2(wa, 4, bias_a), a03 = dequant_bf16x2(wb, 4, bias_b);
            const uint32_t a10 = dequant_bf16x2(wa, 8, bias_a), a11 = dequant_bf16x2(wb, 8, bias_b);
            const uint32_t a12 = dequant_bf16x2(wa, 12, bias_a), a13 = dequant_bf16x2(wb, 12, bias_b);
            const float s_a = bf16_half(s[u].x, jg == 1), s_b = bf16_half(s[u].y, jg == 1);
#pragma unroll
            for (int j = 0; j < kMT; ++j) {
                // Columns 8t..8t+7 of this group for token row g of tile j.
                const uint4 xb = ld_reuse_16(xr[j] + u * 8 + jg * 4);
                float tile[4];
                mma_bf16_zero(tile, a00, a01, a02, a03, xb.x, xb.y);
                mma_bf16(tile, a10, a11, a12, a13, xb.z, xb.w);
                acc[j][0] = fmaf(s_a, tile[0], acc[j][0]);
                acc[j][1] = fmaf(s_a, tile[1], acc[j][1]);
                acc[j][2] = fmaf(s_b, tile[2], acc[j][2]);
                acc[j][3] = fmaf(s_b, tile[3], acc[j][3]);
            }
        }
    }
}

// The kernel's body (w4a16_kernel and w4a16_batched_kernel below call it after pdl_begin(), with only
// w4a16_prewait's L2 hints before). kMT = ceil(m / 8) token tiles.
template <int kMT, bool kZeros>
__device__ __forceinline__ void w4a16_body(const l32_w4a16_params& p) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int m = static_cast<int>(p.m);
    const int ntiles = static_cast<int>((p.n + 15) / 16);
    const int64_t npad = int64_t{ntiles} * 16;
    const int kc = static_cast<int>(p.k / 64);
    const int nt = blockIdx.x * kWarps + warp;
    int c0, c1;
    split_range(kc, p.splits, blockIdx.y, c0, c1);

    float acc[kMT][4];
#pragma unroll
    for (int j = 0; j < kMT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    if (nt < ntiles) {
        const auto* wq = static_cast<const uint4*>(p.qweight) + static_cast<int64_t>(nt) * kc * 32 + lane;
        const auto* sc = static_cast<const uint2*>(p.scales) + static_cast<int64_t>(nt) * kc * 8 + g;
        const uint2* zr = nullptr;
        if constexpr (kZeros) zr = static_cast<const uint2*>(p.zeros) + static_cast<int64_t>(nt) * kc * 8 + g;
        const uint4* xr[kMT];
#pragma unroll
        for (int j = 0; j < kMT; ++j) {
            const int row = min(8 * j + g, m - 1);
            xr[j] = reinterpret_cast<const uint4*>(static_cast<const bf16*>(p.x) + static_cast<int64_t>(row) * p.k) + t;
        }
        const bool prefetch = p.l2_prefetch != 0;
        // The pointers walk the warp's chunks: chunk c of the tile is 32 uint4 of weights, 8 uint2 of scales (and
        // zero points) and 8 uint4 of each activation row further on.
        auto advance = [&](int chunks) {
            wq += chunks * 32;
            sc += chunks * 8;
            if constexpr (kZeros) zr += chunks * 8;
#pragma unroll
            for (int j = 0; j < kMT; ++j) xr[j] += chunks * 8;
        };
        advance(c0);
        int c = c0;
        for (; c + kUnroll <= c1; c += kUnroll) {
            w4a16_chunks<kMT, kZeros, kUnroll>(acc, wq, sc, zr, xr, c1 - c, prefetch);
            advance(kUnroll);
        }
        for (; c < c1; ++c) {
            w4a16_chunks<kMT, kZeros, 1>(acc, wq, sc, zr, xr, c1 - c, prefetch);
            advance(1);
        }
    }

    // acc[j][e]: layout row 16 nt + g (+8 for e >= 2), token 8 j + 2 t (+1 for odd e).
    const int64_t row = int64_t{nt} * 16 + g;
    if (p.splits == 1) {
        if (nt >= ntiles) return;
#pragma unroll
        for (int j = 0; j < kMT; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int tok = 8 * j + 2 * t + e;
                if (tok < m) w4a16_emit_pair(p, tok, row, acc[j][e], acc[j][e + 2]);
            }
        }
        return;
    }
    if (nt < ntiles) {
#pragma unroll
        for (int j = 0; j < kMT; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int tok = 8 * j + 2 * t + e;
                if (tok >= m) continue;
                float* part = p.partials + (int64_t{blockIdx.y} * m + tok) * npad + row;
                part[0] = acc[j][e];
                part[8] = acc[j][e + 2];
            }
        }
    }
    w4a16_finish_split(p, m, npad, kWarps * 16);
}

// Before the kernel waits for the previous one (p.prewait): asks L2 for the warp's first 2 kUnroll chunks, the
// loads of its first two chunk sets, i.e. 4 KB of weights (chunk c of row tile nt is the 512 contiguous bytes at
// (nt kc + c) 512, so the set is one contiguous run: a 128-byte line per lane) and their 512 bytes of scales (and of
// zero points). No kernel of a step writes weights (kernels/common/launch.cuh), so under PDL these bytes stream in
// while the previous kernel finishes, as the gemv, pipelined, tiled and bulk kernels' first bytes do. Only a hint:
// the loads after the wait are those of w4a16_body either way, so are the bits.
template <bool kZeros>
__device__ __forceinline__ void w4a16_prewait(const l32_w4a16_params& p) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int ntiles = static_cast<int>((p.n + 15) / 16);
    const int nt = blockIdx.x * kWarps + warp;
    if (nt >= ntiles) return;
    const int kc = static_cast<int>(p.k / 64);
    int c0, c1;
    split_range(kc, p.splits, blockIdx.y, c0, c1);
    const int chunks = min(c1 - c0, 2 * kUnroll);
    if (chunks <= 0) return;
    const int64_t first = int64_t{nt} * kc + c0;  // the set's first chunk in the layout's chunk order
    const auto* wq = static_cast<const uint8_t*>(p.qweight) + first * 512;
    if (lane < chunks * 4) prefetch_l2(wq + lane * 128);  // chunks * 512 bytes (line-aligned in device allocations)
    // Scales (and zero points): 64 bytes a chunk, contiguous, not line-aligned: lines at 128-byte steps from the
    // first byte, and the line of the last byte.
    const int bytes = chunks * 64;
    const int lines = (bytes + 127) / 128;
    if (lane <= lines) {
        const int64_t off = first * 64 + (lane < lines ? lane * 128 : bytes - 1);
        prefetch_l2(static_cast<const uint8_t*>(p.scales) + off);
        if constexpr (kZeros) prefetch_l2(static_cast<const uint8_t*>(p.zeros) + off);
    }
}

// Tier 1. grid = (ceil(n_tiles / kWarps), splits), block = kWarps * 32.
template <int kMT, bool kZeros>
__global__ void __launch_bounds__(kWarps * 32) w4a16_kernel(const __grid_constant__ l32_w4a16_params p) {
    if (p.prewait != 0) w4a16_prewait<kZeros>(p);
    pdl_begin();
    w4a16_body<kMT, kZeros>(p);
}

// L32_W4A16_DIRECT_BATCHED at m <= 16: the same body (so the same bits) under a launch bound of 4 blocks per SM at
// m <= 8 (at most 128 registers) and 3 at 9-16 rows (at most 168). That bound changes how ptxas schedules the chunk
// set (CUDA 13.0, sm_90a, cuobjdump): the plain kernel places each chunk's weight load next to its MMAs (48
// registers at m <= 8, about one chunk in flight per warp); this one issues the set's four 16-byte weight loads and
// their activation and scale loads before the first MMA (92 registers at m <= 8, 98 with zero points; 134 at 9-16
// rows; no spills; with w4a16_prewait in front since the twentieth session 90 / 109 and 134 / 144, the same 16 loads
// ahead of the 16 MMAs at m <= 8). Above 16 rows (and at 9-16 under a 4-block bound) ptxas spills, so those take
// w4a16_kernel.
template <int kMT, bool kZeros>
__global__ void __launch_bounds__(kWarps * 32, kMT == 1 ? 4 : 3)
    w4a16_batched_kernel(const __grid_constant__ l32_w4a16_params p) {
    if (p.prewait != 0) w4a16_prewait<kZeros>(p);
    pdl_begin();
    w4a16_body<kMT, kZeros>(p);
}

// Tier 2.
template <int kMT>
l32_status launch_gemm(const l32_w4a16_params& p, cudaStream_t stream) {
    const int64_t ntiles = (p.n + 15) / 16;
    const dim3 grid(static_cast<unsigned>((ntiles + kWarps - 1) / kWarps), static_cast<unsigned>(p.splits));
    const bool zeros = p.zeros != nullptr;
    void (*kernel)(l32_w4a16_params) = zeros ? w4a16_kernel<kMT, true> : w4a16_kernel<kMT, false>;
    if constexpr (kMT <= 2) {
        if (p.kernel == L32_W4A16_DIRECT_BATCHED) {
            kernel = zeros ? w4a16_batched_kernel<kMT, true> : w4a16_batched_kernel<kMT, false>;
        }
    }
    launch_kernel(kernel, grid, kWarps * 32, 0, stream, p);
    return check_launch();
}

// Dequantization: thread i handles lane i % 32 of chunk (i / 32) of the flattened (tile, chunk) sequence.
template <bool kZeros>
__global__ void __launch_bounds__(256) w4a16_dequant_kernel(const __grid_constant__ l32_w4a16_dequant_params p) {
    pdl_begin();
    const int64_t kc = p.k / 64;
    const int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
    const int64_t total = (p.n + 15) / 16 * kc * 32;
    if (i >= total) return;
    const int lane = static_cast<int>(i % 32);
    const int64_t tile_chunk = i / 32;
    const int64_t nt = tile_chunk / kc, c = tile_chunk % kc;
    const int g = lane / 4, t = lane % 4;
    const uint4 w = static_cast<const uint4*>(p.qweight)[i];
    const uint2 s = static_cast<const uint2*>(p.scales)[tile_chunk * 8 + g];
    uint2 z = make_uint2(kSymmetricBias, kSymmetricBias);
    if constexpr (kZeros) z = static_cast<const uint2*>(p.zeros)[tile_chunk * 8 + g];
    auto* out = static_cast<bf16*>(p.out);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int64_t layout_row = nt * 16 + g + 8 * r;
        if (layout_row >= p.n) continue;
        const int64_t row = w4a16_matrix_row(layout_row, p.pair_half);
#pragma unroll
        for (int jg = 0; jg < 2; ++jg) {
            const uint32_t word = r == 0 ? (jg == 0 ? w.x : w.z) : (jg == 0 ? w.y : w.w);
            const uint32_t sw = r == 0 ? s.x : s.y;
            const uint32_t zw = r == 0 ? z.x : z.y;
            const uint32_t bias = kZeros ? bf16_splat(zw, jg == 1) : kSymmetricBias;
            const float scale = bf16_half(sw, jg == 1);
            BF16Vec<8> v;
#pragma unroll
            for (int pair = 0; pair < 4; ++pair) {
                const uint32_t qz = dequant_bf16x2(word, 4 * pair, bias);  // columns 2 pair, 2 pair + 1
                v.set(2 * pair, scale * bf16_half(qz, false));
                v.set(2 * pair + 1, scale * bf16_half(qz, true));
            }
            const int64_t col = c * 64 + jg * 32 + 8 * t;
            store_vec(reinterpret_cast<BF16Vec<8>*>(out + row * p.k + col), v);
        }
    }
}

}  // namespace
}  // namespace quant
}  // namespace l32

// Tier 3: the checked entries.
extern "C" l32_status l32_w4a16_gemm(const l32_w4a16_params* params, void* stream) {
    using namespace l32;
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_w4a16_params& p = *params;
    if (p.dtype != L32_DTYPE_BF16) return L32_UNSUPPORTED;
    if (p.kernel != L32_W4A16_DIRECT && p.kernel != L32_W4A16_PIPELINED && p.kernel != L32_W4A16_TILED &&
        p.kernel != L32_W4A16_BULK && p.kernel != L32_W4A16_WGMMA && p.kernel != L32_W4A16_WGMMA_ROW &&
        p.kernel != L32_W4A16_DIRECT_BATCHED) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.out == nullptr || p.x == nullptr || p.qweight == nullptr || p.scales == nullptr) return L32_INVALID_ARGUMENT;
    if (p.m <= 0 || p.k <= 0 || p.n < 0 || p.splits < 1) return L32_INVALID_ARGUMENT;
    const bool large = p.kernel == L32_W4A16_WGMMA || p.kernel == L32_W4A16_WGMMA_ROW;
    const int64_t max_m = large ? int64_t{1} << 30 : 64;
    if (p.m > max_m || p.k % 64 != 0 || p.k > quant::kMaxK || p.n > INT_MAX - 64) return L32_UNSUPPORTED;
    if ((p.kernel != L32_W4A16_BULK && p.splits > p.k / 64) || p.splits > 65535) return L32_UNSUPPORTED;
    if (p.splits > 1 && (p.partials == nullptr || p.counters == nullptr)) return L32_INVALID_ARGUMENT;
    if (p.pair_half < 0 || (p.pair_half > 0 && (p.pair_half % 8 != 0 || p.n != 2 * p.pair_half))) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.silu != 0 && p.pair_half == 0) return L32_INVALID_ARGUMENT;
    if (p.tiled_stages != 0 && (p.tiled_stages < 2 || p.tiled_stages > 4)) return L32_INVALID_ARGUMENT;
    if (!is_aligned(p.x, 16) || !is_aligned(p.qweight, 16) || !is_aligned(p.scales, 8)) return L32_UNSUPPORTED;
    if (p.zeros != nullptr && !is_aligned(p.zeros, 8)) return L32_UNSUPPORTED;
    if (p.n == 0) return L32_OK;
    const auto s = static_cast<cudaStream_t>(stream);
    if (p.kernel == L32_W4A16_PIPELINED) return quant::launch_w4a16_pipelined(p, s);
    if (p.kernel == L32_W4A16_TILED) return quant::launch_w4a16_tiled(p, s);
    if (p.kernel == L32_W4A16_BULK) return quant::launch_w4a16_bulk(p, s);
    l32_w4a16_params q = p;  // the direct and large-m kernels read prewait
    q.prewait = prewait_under_pdl(p.prewait);
    if (large) return quant::launch_w4a16_wgmma(q, s);
    if (q.m <= 8) return quant::launch_gemm<1>(q, s);
    if (q.m <= 16) return quant::launch_gemm<2>(q, s);
    if (q.m <= 32) return quant::launch_gemm<4>(q, s);
    return quant::launch_gemm<8>(q, s);
}

extern "C" l32_status l32_w4a16_dequant(const l32_w4a16_dequant_params* params, void* stream) {
    using namespace l32;
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_w4a16_dequant_params& p = *params;
    if (p.dtype != L32_DTYPE_BF16) return L32_UNSUPPORTED;
    if (p.out == nullptr || p.qweight == nullptr || p.scales == nullptr) return L32_INVALID_ARGUMENT;
    if (p.k <= 0 || p.n < 0) return L32_INVALID_ARGUMENT;
    if (p.k % 64 != 0 || p.k > quant::kMaxK || p.n > INT_MAX - 64) return L32_UNSUPPORTED;
    if (p.pair_half < 0 || (p.pair_half > 0 && (p.pair_half % 8 != 0 || p.n != 2 * p.pair_half))) {
        return L32_INVALID_ARGUMENT;
    }
    if (!is_aligned(p.out, 16) || !is_aligned(p.qweight, 16) || !is_aligned(p.scales, 8)) return L32_UNSUPPORTED;
    if (p.zeros != nullptr && !is_aligned(p.zeros, 8)) return L32_UNSUPPORTED;
    if (p.n == 0) return L32_OK;
    const int64_t threads = (p.n + 15) / 16 * (p.k / 64) * 32;
    const auto grid = static_cast<unsigned>((threads + 255) / 256);
    const auto s = static_cast<cudaStream_t>(stream);
    if (p.zeros != nullptr) {
        launch_kernel(quant::w4a16_dequant_kernel<true>, grid, 256, 0, s, p);
    } else {
        launch_kernel(quant::w4a16_dequant_kernel<false>, grid, 256, 0, s, p);
    }
    return l32::check_launch();
}
