// The cross-warp reduction of the skinny GEMMs (kernels/gemv.cu, kernels/quant/table_int8.cu): every warp of a block
// holds kTiles m16n8 accumulator tiles over its share of k; they meet in shared memory, and each output is summed
// over the block's warps in warp order (deterministic).
#pragma once

namespace l32 {

// Stores a warp's tiles: partial[warp][x row][MMA row], where D[row][col] of tile j is MMA row `row` against x row
// 8 j + col, and lane (g, t) holds D[g][2t, 2t + 1] (acc[j][0..1]) and D[g + 8][2t, 2t + 1] (acc[j][2..3]).
template <int kTiles, int kWarps, int kRows>
__device__ __forceinline__ void store_warp_tiles(float (&partial)[kWarps][kTiles * 8][kRows],
                                                 const float (&acc)[kTiles][4], int warp, int g, int t) {
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
        partial[warp][8 * j + 2 * t][g] = acc[j][0];
        partial[warp][8 * j + 2 * t + 1][g] = acc[j][1];
        partial[warp][8 * j + 2 * t][g + 8] = acc[j][2];
        partial[warp][8 * j + 2 * t + 1][g + 8] = acc[j][3];
    }
}

// The output of x row i and MMA row c, summed over the warps in warp order (after a barrier past the stores).
template <int kTiles, int kWarps, int kRows>
__device__ __forceinline__ float warp_order_sum(const float (&partial)[kWarps][kTiles * 8][kRows], int i, int c) {
    float s = 0.f;
#pragma unroll
    for (int q = 0; q < kWarps; ++q) s += partial[q][i][c];
    return s;
}

}  // namespace l32
