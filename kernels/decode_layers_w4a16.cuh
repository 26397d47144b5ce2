// kernels/decode_layers_w4a16.cuh: the W4A16 projections of the persistent decode stack (kernels/decode_layers.cu
// with L32_DECODE_WEIGHTS_W4A16): the tiles of kernels/quant/w4a16.cu's layout (16 rows x 64 columns of int4 and
// their bf16 group scales), run by one block of the stack at a time, with the x rows in shared memory.
//
// A work item is one 16-row tile (o, down, the v rows of qkv, gate_up in its paired layout: gate rows 8 t .. 8 t + 7
// and the matching up rows), or for the q and k rows of qkv two tiles, rows j0 .. j0 + 15 and half + j0 ..
// half + j0 + 15 of one head (half = head_dim / 2, j0 a multiple of 16), which hold 16 whole RoPE rotation pairs:
// the RoPE + KV-write epilogue then runs in the block, as the gemv's does (its rope_write_pair).
//
// Each warp w of the block takes split w of S = min(8, k / 64) K splits (split_range, as the decode kernels cut
// them); its chunks run through the decode kernels' per-group arithmetic (quant::dequant_group, quant::group_mma,
// the direct kernel's order), and the S partial sums of each output are added in split order from 0, as
// w4a16_finish_split adds them (one split: the sum itself). So an output has the bits of l32_w4a16_gemm (direct,
// pipelined or tiled) at S splits, and of the RoPE / SwiGLU kernels after it.
//
// Symmetric weights only (no zero points): the quantizer's format. Every item's weights and scales are contiguous
// in the layout (a tile is k / 64 chunks of 512 bytes), so the L2 prefetch of a coming item is one bulk prefetch
// per 16 KB piece.
#pragma once

#include <cstdint>

#include "common/launch.cuh"
#include "common/silu.cuh"
#include "common/smem.cuh"
#include "gemv_device.cuh"
#include "llama32_kernels.h"
#include "quant/common.cuh"
#include "quant/w4a16_common.cuh"

namespace l32 {
namespace stack_w4 {

constexpr int kWarps = 8;    // the stack's block: one K split per warp
constexpr int kUnroll = 4;   // chunks whose loads are issued together, as the direct kernel
constexpr int kPiece = 16384;  // bytes per bulk L2 prefetch

// One W4A16 projection: the layout's nibble tiles and scales, its matrix rows n (2 pair_half for a paired gate_up)
// and 64-column chunks per row.
struct Proj {
    const uint4* qweight;
    const uint2* scales;
    int64_t n;
    int kc;
};

__device__ __forceinline__ Proj proj(const void* qweight, const void* scales, int64_t n, int64_t k) {
    return Proj{static_cast<const uint4*>(qweight), static_cast<const uint2*>(scales), n, static_cast<int>(k / 64)};
}

// 16-row tiles of a projection.
__device__ __forceinline__ int64_t tiles_of(const Proj& w) { return (w.n + 15) / 16; }

// The K splits of the stack's W4A16 tiles.
__device__ __forceinline__ int splits_of(const Proj& w) { return min(kWarps, w.kc); }

// A work item: one tile, or (head >= 0) the two tiles of 16 rotation pairs of q / k head `head`, pairs j0 ..
// j0 + 15.
struct Item {
    int64_t nt[2];
    int tiles;
    int head;
    int j0;
};

// Items of the qkv projection: (num_heads + num_kv_heads) * head_dim / 32 pair items, then the v tiles.
__device__ __forceinline__ int64_t qkv_pair_items(const l32_rope_params& r) {
    return int64_t{r.num_heads + r.num_kv_heads} * (r.head_dim / 32);
}

__device__ __forceinline__ int64_t qkv_items(const l32_rope_params& r) {
    return qkv_pair_items(r) + int64_t{r.num_kv_heads} * r.head_dim / 16;
}

template <int kMode>
__device__ __forceinline__ Item item_of(const l32_rope_params& r, int64_t i) {
    Item it;
    it.head = -1;
    it.j0 = 0;
    it.tiles = 1;
    it.nt[0] = it.nt[1] = i;
    if constexpr (kMode == gemv_dev::kRope) {
        const int d = r.head_dim, per_head = d / 32;
        const int64_t pairs = qkv_pair_items(r);
        if (i < pairs) {
            it.head = static_cast<int>(i / per_head);
            it.j0 = static_cast<int>(i % per_head) * 16;
            it.nt[0] = (int64_t{it.head} * d + it.j0) / 16;
            it.nt[1] = it.nt[0] + d / 32;
            it.tiles = 2;
        } else {
            it.nt[0] = it.nt[1] = int64_t{r.num_heads + r.num_kv_heads} * d / 16 + (i - pairs);
        }
    }
    return it;
}

// Asks L2 for item `it`'s weights and scales (at most max_bytes of each tile's weights), one bulk prefetch per
// 16 KB piece from threads first, first + 1, ... (sm_90; nothing elsewhere). Weights are never written, so this may
// run ahead of any barrier.
__device__ __forceinline__ void prefetch_item(const Proj& w, const Item& it, int64_t max_bytes, int first = 0) {
    const int64_t tile_bytes = min(int64_t{w.kc} * 512, max_bytes);
    const int pieces = static_cast<int>((tile_bytes + kPiece - 1) / kPiece);
    const int i = static_cast<int>(threadIdx.x) - first;
    if (i < 0 || i >= it.tiles * (pieces + 1)) return;
    const int tile = i / (pieces + 1), piece = i % (pieces + 1);
    const int64_t nt = tile == 0 ? it.nt[0] : it.nt[1];  // not it.nt[tile]: that indexes local memory
    if (piece == pieces) {
        prefetch_l2_bulk(w.scales + nt * w.kc * 8, static_cast<uint32_t>(int64_t{w.kc} * 64));
        return;
    }
    const int64_t off = int64_t{piece} * kPiece;
    prefetch_l2_bulk(reinterpret_cast<const unsigned char*>(w.qweight + nt * w.kc * 32) + off,
                     static_cast<uint32_t>(min(int64_t{kPiece}, tile_bytes - off)));
}

// kN chunks of kT tiles at the lane's pointers (advanced by the caller): the loads first, then per chunk and group
// the dequantization and the MMAs against the x fragment from shared memory (xa: the byte address of the lane's
// first x vector of the first chunk), as the direct kernel orders them.
template <int kT, int kN>
__device__ __forceinline__ void chunks(float (&acc)[kT][4], const uint4* const (&wq)[kT], const uint2* const (&sc)[kT],
                                       uint32_t xa) {
    quant::Frag f[kN][kT];
#pragma unroll
    for (int u = 0; u < kN; ++u) {
#pragma unroll
        for (int i = 0; i < kT; ++i) {
            f[u][i].w = quant::ld_stream_16(wq[i] + u * 32);
            f[u][i].s = quant::ld_stream_8(sc[i] + u * 8);
            f[u][i].z = make_uint2(0, 0);  // symmetric: not read
        }
    }
#pragma unroll
    for (int u = 0; u < kN; ++u) {
#pragma unroll
        for (int jg = 0; jg < 2; ++jg) {
            const uint4 xb = gemv_dev::ld_shared_16(xa + static_cast<uint32_t>(u * 128 + jg * 64));
#pragma unroll
            for (int i = 0; i < kT; ++i) quant::group_mma(acc[i], quant::dequant_group<false>(f[u][i], jg), xb);
        }
    }
}

// The warp's split of item `it` (kT = it.tiles): its f32 sums into part[tile][warp][token][row]. x: the m rows in
// shared memory (row stride `stride` bytes, the gemv's padded layout).
template <int kT>
__device__ __forceinline__ void item_splits(const Proj& w, const Item& it, const unsigned char* xs, int stride, int m,
                                            float (&part)[2][kWarps][8][16]) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int splits = splits_of(w);
    if (warp >= splits) return;
    int c0, c1;
    quant::split_range(w.kc, splits, warp, c0, c1);
    float acc[kT][4];
    const uint4* wq[kT];
    const uint2* sc[kT];
#pragma unroll
    for (int i = 0; i < kT; ++i) {
        acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
        wq[i] = w.qweight + (it.nt[i] * w.kc + c0) * 32 + lane;
        sc[i] = w.scales + (it.nt[i] * w.kc + c0) * 8 + g;
    }
    // Token row g of the MMA's column tile (rows past m read the last row; their outputs are dropped).
    uint32_t xa = smem_addr(xs) + static_cast<uint32_t>(min(g, m - 1) * stride + 16 * t + c0 * 128);
    // The pointers walk the warp's chunks: a chunk is 32 uint4 of weights, 8 uint2 of scales, 128 bytes of x.
    auto advance = [&](int n) {
#pragma unroll
        for (int i = 0; i < kT; ++i) {
            wq[i] += n * 32;
            sc[i] += n * 8;
        }
        xa += n * 128;
    };
    int c = c0;
    for (; c + kUnroll <= c1; c += kUnroll) {
        chunks<kT, kUnroll>(acc, wq, sc, xa);
        advance(kUnroll);
    }
    // The rest (k / 64 / splits is rarely a multiple of 4: 3B's 48 chunks are 6 a warp) two, then one at a time.
    if (c + 2 <= c1) {
        chunks<kT, 2>(acc, wq, sc, xa);
        advance(2);
        c += 2;
    }
    if (c < c1) chunks<kT, 1>(acc, wq, sc, xa);
    // acc[i][e]: row g (+8 for e >= 2), token 2 t (+1 for odd e).
#pragma unroll
    for (int i = 0; i < kT; ++i) {
        part[i][warp][2 * t][g] = acc[i][0];
        part[i][warp][2 * t + 1][g] = acc[i][1];
        part[i][warp][2 * t][g + 8] = acc[i][2];
        part[i][warp][2 * t + 1][g + 8] = acc[i][3];
    }
}

// Output (tile `tile`, token tok, row r) of an item: the splits' sums in split order, as w4a16_finish_split adds
// them (from 0; one split: its sum).
__device__ __forceinline__ float split_sum(const float (&part)[2][kWarps][8][16], int splits, int tile, int tok,
                                           int r) {
    if (splits == 1) return part[tile][0][tok][r];
    float s = 0.f;
    for (int sp = 0; sp < splits; ++sp) s += part[tile][sp][tok][r];
    return s;
}

// One item of a projection whose x rows are in shared memory, with the mode's epilogue (gemv_dev::Mode): kPlain
// writes out [m, n]; kSilu (a paired gate_up, n = 2 inter) writes silu(gate) * up into out [m, n / 2]; kRope (qkv)
// rotates q into out [m, n] and writes k and v to the cache slots (r: the rope fields of the stack's qkv gemv
// parameters). `part` is free on entry and until the caller's next __syncthreads after return.
template <int kMode>
__device__ __forceinline__ void run_item(const Proj& w, const Item& it, const unsigned char* xs, int stride, int m,
                                         bf16* out, const l32_rope_params& r, float (&part)[2][kWarps][8][16]) {
    if (it.tiles == 2) {
        item_splits<2>(w, it, xs, stride, m, part);
    } else {
        item_splits<1>(w, it, xs, stride, m, part);
    }
    __syncthreads();
    const int splits = splits_of(w);
    const int tok = threadIdx.x / 16, c = threadIdx.x % 16;  // 256 threads: every (token, row) of a tile
    if (tok >= m) return;
    const auto bf = [&](int tile, int row) { return __float2bfloat16_rn(split_sum(part, splits, tile, tok, row)); };
    if constexpr (kMode == gemv_dev::kSilu) {
        // Layout rows c and c + 8 of tile nt: gate and up of column 8 nt + c.
        if (c >= 8) return;
        const float gate = __bfloat162float(bf(0, c)), up = __bfloat162float(bf(0, c + 8));
        const int64_t half = w.n / 2, col = it.nt[0] * 8 + c;
        if (col < half) out[tok * half + col] = __float2bfloat16_rn(silu_mul_f32(gate, up));
    } else if constexpr (kMode == gemv_dev::kRope) {
        const int d = r.head_dim;
        const uint32_t slot = r.slot_mapping[tok];
        const bool cached = slot < static_cast<uint64_t>(r.num_slots);
        const int64_t slot_base = cached ? static_cast<int64_t>(slot) * r.num_kv_heads * d : 0;
        if (it.head < 0) {
            if (!cached) return;
            const int64_t vi = it.nt[0] * 16 + c - int64_t{r.num_heads + r.num_kv_heads} * d;
            static_cast<bf16*>(r.v_cache)[slot_base + vi] = bf(0, c);
            return;
        }
        gemv_dev::rope_write_pair(r, out, w.n, tok, it.head, it.j0 + c, __bfloat162float(bf(0, c)),
                                  __bfloat162float(bf(1, c)), slot_base, cached);
    } else {
        const int64_t row = it.nt[0] * 16 + c;
        if (row < w.n) out[tok * w.n + row] = bf(0, c);
    }
}

// Items of a projection in the given mode.
template <int kMode>
__device__ __forceinline__ int64_t items_of(const Proj& w, const l32_rope_params& r) {
    if constexpr (kMode == gemv_dev::kRope) {
        return qkv_items(r);
    } else {
        return tiles_of(w);
    }
}

// The block's items of a projection (item blockIdx.x, then every gridDim.x-th), the weights of the two after the
// one that runs asked of L2 (an item is 18-37 KB at the 1B widths: two ahead keep ~5 MB in flight over 132 SMs,
// about what the copy rate times the memory latency needs; the first item was asked for before the barrier).
template <int kMode>
__device__ __forceinline__ void run_items(const Proj& w, const unsigned char* xs, int stride, int m, bf16* out,
                                          const l32_rope_params& r, float (&part)[2][kWarps][8][16]) {
    const int64_t items = items_of<kMode>(w, r);
    for (int64_t i = blockIdx.x; i < items; i += gridDim.x) {
        if (i == blockIdx.x && i + gridDim.x < items) {
            prefetch_item(w, item_of<kMode>(r, i + gridDim.x), int64_t{1} << 20);
        }
        if (i + 2 * int64_t{gridDim.x} < items) {
            prefetch_item(w, item_of<kMode>(r, i + 2 * int64_t{gridDim.x}), int64_t{1} << 20, 32);
        }
        run_item<kMode>(w, item_of<kMode>(r, i), xs, stride, m, out, r, part);
        __syncthreads();  // the epilogue has read `part`, which the next item overwrites
    }
}

// This block's item `which` (0: its first, 1: its second) of a projection, asked of L2 ahead of the barrier before
// it (up to 32 KB of each tile's weights), from threads first, first + 1, ... (at most 2 (32 KB / 16 KB + 1)).
template <int kMode>
__device__ __forceinline__ void prefetch_block_item(const Proj& w, const l32_rope_params& r, int which = 0,
                                                    int first = 0) {
    const int64_t i = blockIdx.x + int64_t{which} * gridDim.x;
    if (i < items_of<kMode>(w, r)) prefetch_item(w, item_of<kMode>(r, i), 32768, first);
}

}  // namespace stack_w4
}  // namespace l32
