// Device pieces of the W4A16 decode kernels (kernels/quant/w4a16.cu, w4a16_pipelined.cu, w4a16_tiled.cu,
// w4a16_bulk.cu): the output store every kernel writes through (w4a16_emit_pair, with the paired layout's row map),
// bf16 halves of the layout's packed scale and bias words and the deterministic split-K finish of a block of rows,
// and the launch coordinates, tile pointers and tile store (the pipelined kernels).
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/launch.cuh"
#include "common/silu.cuh"
#include "llama32_kernels.h"
#include "quant/common.cuh"

namespace l32 {
namespace quant {

// f32 of the bf16 in the low (hi = false) or high half of a 32-bit word.
__device__ __forceinline__ float bf16_half(uint32_t w, bool hi) {
    return __uint_as_float(hi ? (w & 0xFFFF0000u) : (w << 16));
}

// The bf16 pair (v, v) from the bf16 in the low or high half of w.
__device__ __forceinline__ uint32_t bf16_splat(uint32_t w, bool hi) {
    const uint32_t h = hi ? (w >> 16) : (w & 0xFFFFu);
    return h | (h << 16);
}

// The matrix row that layout row `row` holds: itself, or in a paired layout (p.pair_half, SwiGLU's gate_up) gate
// row 8 t + r for rows r = 0..7 of 16-row tile t, and up row pair_half + 8 t + r - 8 for rows 8..15.
__device__ __forceinline__ int64_t w4a16_matrix_row(int64_t row, int64_t pair_half) {
    if (pair_half == 0) return row;
    const int64_t j = row / 16 * 8 + row % 8;
    return row % 16 < 8 ? j : pair_half + j;
}

// Every W4A16 kernel writes its outputs through this: the f32 sums `lo` of layout row `row` (a row of a tile's
// first half, row % 16 < 8) and `hi` of row + 8, token `tok`. Each is rounded to bf16 and stored at its matrix row
// (rows past n are not stored); with p.silu (a paired layout: lo is gate j, hi is up j) the output is instead
// silu(gate) * up at column j of the [m, pair_half] output, computed from the two bf16 values as l32_silu_mul
// does, so the bits are those of the plain output followed by that kernel.
__device__ __forceinline__ void w4a16_emit_pair(const l32_w4a16_params& p, int tok, int64_t row, float lo, float hi) {
    auto* out = static_cast<bf16*>(p.out);
    // Matrix rows of the pair: row and row + 8, or in a paired layout gate j and up pair_half + j.
    const int64_t lo_row = w4a16_matrix_row(row, p.pair_half), hi_row = w4a16_matrix_row(row + 8, p.pair_half);
    if (p.silu != 0) {
        const float gate = __bfloat162float(__float2bfloat16_rn(lo)), up = __bfloat162float(__float2bfloat16_rn(hi));
        out[tok * p.pair_half + lo_row] = __float2bfloat16_rn(silu_mul_f32(gate, up));
        return;
    }
    if (lo_row < p.n) out[tok * p.n + lo_row] = __float2bfloat16_rn(lo);
    if (hi_row < p.n) out[tok * p.n + hi_row] = __float2bfloat16_rn(hi);
}

// The direct kernel (w4a16.cu) keeps its own copies of the three pieces below on purpose: routing it through them
// changed its ptxas register counts. The H200 run of 2026-11-27 found each of the direct and pipelined kernels
// faster on some shapes (W4A16Kernel::for_shape picks per shape), so both stay.
//
// What a W4A16 decode kernel derives from its launch: the thread's lane coordinates (g = lane / 4,
// t = lane % 4), the token count, the 16-row tile count and padded row count, the 64-column chunks per row, and
// the chunk range [c0, c1) of this block's split (blockIdx.y).
struct W4A16Launch {
    int lane, warp, g, t, m, ntiles, kc, c0, c1;
    int64_t npad;
};

__device__ __forceinline__ W4A16Launch w4a16_launch(const l32_w4a16_params& p) {
    W4A16Launch l;
    l.lane = threadIdx.x % 32;
    l.warp = threadIdx.x / 32;
    l.g = l.lane / 4;
    l.t = l.lane % 4;
    l.m = static_cast<int>(p.m);
    l.ntiles = static_cast<int>((p.n + 15) / 16);
    l.npad = int64_t{l.ntiles} * 16;
    l.kc = static_cast<int>(p.k / 64);
    split_range(l.kc, p.splits, blockIdx.y, l.c0, l.c1);
    return l;
}

// The lane's pointers into 16-row tile `nt`: its 16-byte weight slot of chunk 0, and its row pair's scale (and
// bias) entry; chunk c is 32 (weights) and 8 (scales, biases) elements further.
struct W4A16Tile {
    const uint4* wq;
    const uint2* sc;
    const uint2* zr;  // nullptr without zero points
};

template <bool kZeros>
__device__ __forceinline__ W4A16Tile w4a16_tile(const l32_w4a16_params& p, const W4A16Launch& l, int64_t nt) {
    W4A16Tile tile;
    tile.wq = static_cast<const uint4*>(p.qweight) + nt * l.kc * 32 + l.lane;
    tile.sc = static_cast<const uint2*>(p.scales) + nt * l.kc * 8 + l.g;
    tile.zr = kZeros ? static_cast<const uint2*>(p.zeros) + nt * l.kc * 8 + l.g : nullptr;
    return tile;
}

// Asks L2 for the lane's weight slots of the first `chunks` chunks of [c0, c1) of a tile (whose chunk-0 slot is
// wq), before the kernel waits for the previous one (see kernels/common/launch.cuh).
__device__ __forceinline__ void w4a16_prefetch(const uint4* wq, int c0, int c1, int chunks) {
    for (int c = c0; c < min(c1, c0 + chunks); ++c) prefetch_l2(wq + static_cast<int64_t>(c) * 32);
}

// Writes one row tile's accumulators acc[j][e] (layout row 16 nt + g (+8 for e >= 2), token 8 j + 2 t (+1 for odd
// e)): through w4a16_emit_pair when there is one split, else f32 to this split's partials (every row of the tile,
// padding included, so that the finish may read a pair whole).
template <int kMT>
__device__ __forceinline__ void w4a16_store_tile(const l32_w4a16_params& p, const W4A16Launch& l,
                                                 const float (&acc)[kMT][4], int nt) {
#pragma unroll
    for (int j = 0; j < kMT; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int64_t row = int64_t{nt} * 16 + l.g;
            const int tok = 8 * j + 2 * l.t + e;
            if (tok >= l.m) continue;
            if (p.splits == 1) {
                w4a16_emit_pair(p, tok, row, acc[j][e], acc[j][e + 2]);
            } else {
                float* part = p.partials + (int64_t{blockIdx.y} * l.m + tok) * l.npad + row;
                part[0] = acc[j][e];
                part[8] = acc[j][e + 2];
            }
        }
    }
}

// Split-K finish of layout rows [row0, row0 + block_rows) (block_rows a multiple of 16) for tokens [m0, m0 + bm) of
// m, whose blocks count their arrivals on counter `tile` (every thread of the block calls it after writing its f32
// partials at p.partials[(split * m + tok) * npad + row]): the last split to arrive sums all splits in split order,
// row pair by row pair (rows r and r + 8 of a tile), and writes them through w4a16_emit_pair.
__device__ __forceinline__ void w4a16_finish_rows(const l32_w4a16_params& p, int m, int64_t npad, int tile, int m0,
                                                  int bm, int64_t row0, int block_rows) {
    if (!splitk_arrive(p.counters, tile, p.splits)) return;
    const int pairs = block_rows / 2;
    for (int i = threadIdx.x; i < bm * pairs; i += blockDim.x) {
        const int tok = m0 + i / pairs, q = i % pairs;
        const int64_t row = row0 + q / 8 * 16 + q % 8;
        if (row >= p.n) continue;
        float lo = 0.f, hi = 0.f;
        for (int sp = 0; sp < p.splits; ++sp) {
            const float* part = p.partials + (int64_t{sp} * m + tok) * npad + row;
            lo += __ldcg(part);
            hi += __ldcg(part + 8);
        }
        w4a16_emit_pair(p, tok, row, lo, hi);
    }
}

// Split-K finish of the decode kernels: w4a16_finish_rows for the block of `block_rows` layout rows blockIdx.x
// covers, every token (counter blockIdx.x). Kept written out: through w4a16_finish_rows the same sums compile to
// other SASS for the measured decode kernels (w4a16.cu's, checked with cuobjdump), which this keeps as measured.
__device__ __forceinline__ void w4a16_finish_split(const l32_w4a16_params& p, int m, int64_t npad, int block_rows) {
    if (!splitk_arrive(p.counters, blockIdx.x, p.splits)) return;
    const int pairs = block_rows / 2;
    for (int i = threadIdx.x; i < m * pairs; i += blockDim.x) {
        const int tok = i / pairs, q = i % pairs;
        const int64_t row = int64_t{blockIdx.x} * block_rows + q / 8 * 16 + q % 8;
        if (row >= p.n) continue;
        float lo = 0.f, hi = 0.f;
        for (int sp = 0; sp < p.splits; ++sp) {
            const float* part = p.partials + (int64_t{sp} * m + tok) * npad + row;
            lo += __ldcg(part);
            hi += __ldcg(part + 8);
        }
        w4a16_emit_pair(p, tok, row, lo, hi);
    }
}

// ---- pieces of the pipelined and tiled kernels' inner loop (w4a16_pipelined.cu, w4a16_tiled.cu) ----

// One lane's share of one 64-column chunk of one row tile: 16 bytes of nibbles, its row pair's scales (and biases).
struct Frag {
    uint4 w;
    uint2 s;
    uint2 z;
};

// The A fragments of one group (two MMAs) and the f32 scales of the lane's two rows.
struct GroupA {
    uint32_t a[8];
    float s_lo, s_hi;
};

// Group jg (0: columns 0..31 of the chunk, 1: 32..63) of a fragment, dequantized into MMA A registers (kOneLop: see
// dequant_bf16x2; the same values either way).
template <bool kZeros, bool kOneLop = true>
__device__ __forceinline__ GroupA dequant_group(const Frag& f, int jg) {
    const uint32_t wa = jg == 0 ? f.w.x : f.w.z;  // row g
    const uint32_t wb = jg == 0 ? f.w.y : f.w.w;  // row g + 8
    uint32_t bias_a = kSymmetricBias, bias_b = kSymmetricBias;
    if constexpr (kZeros) {
        bias_a = bf16_splat(f.z.x, jg == 1);
        bias_b = bf16_splat(f.z.y, jg == 1);
    }
    GroupA r;
    // First MMA: columns 8t..8t+3 (nibble pairs at bits 0 and 4); second: 8t+4..8t+7 (bits 8 and 12).
    r.a[0] = dequant_bf16x2<kOneLop>(wa, 0, bias_a);
    r.a[1] = dequant_bf16x2<kOneLop>(wb, 0, bias_b);
    r.a[2] = dequant_bf16x2<kOneLop>(wa, 4, bias_a);
    r.a[3] = dequant_bf16x2<kOneLop>(wb, 4, bias_b);
    r.a[4] = dequant_bf16x2<kOneLop>(wa, 8, bias_a);
    r.a[5] = dequant_bf16x2<kOneLop>(wb, 8, bias_b);
    r.a[6] = dequant_bf16x2<kOneLop>(wa, 12, bias_a);
    r.a[7] = dequant_bf16x2<kOneLop>(wb, 12, bias_b);
    r.s_lo = bf16_half(f.s.x, jg == 1);
    r.s_hi = bf16_half(f.s.y, jg == 1);
    return r;
}

// acc += scale * (the group's two MMAs over the B fragment xb), in the direct kernel's order.
__device__ __forceinline__ void group_mma(float (&acc)[4], const GroupA& a, const uint4& xb) {
    float tile[4];
    mma_bf16_zero(tile, a.a[0], a.a[1], a.a[2], a.a[3], xb.x, xb.y);
    mma_bf16(tile, a.a[4], a.a[5], a.a[6], a.a[7], xb.z, xb.w);
    acc[0] = fmaf(a.s_lo, tile[0], acc[0]);
    acc[1] = fmaf(a.s_lo, tile[1], acc[1]);
    acc[2] = fmaf(a.s_hi, tile[2], acc[2]);
    acc[3] = fmaf(a.s_hi, tile[3], acc[3]);
}

}  // namespace quant
}  // namespace l32
