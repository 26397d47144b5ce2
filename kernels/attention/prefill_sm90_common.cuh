// The pieces the two Hopper paged prefills share (prefill_sm90.cu, and its warp-specialized form
// prefill_sm90_ws.cu): the shared-memory layout of Q and the K / V stages, and the products of one 64-row
// warpgroup on it (S = Q K^T from two K-major descriptors, O += P V with P from registers and V as an MN-major
// "transposed" B), plus the packing of P into A fragments. Each kernel decides when to issue, commit and wait.
#pragma once

#include <cstdint>

#include "common/attention.cuh"
#include "common/bf16.cuh"
#include "common/wgmma.cuh"

namespace l32 {
namespace prefill90 {

// The layout both kernels use: 128 folded query rows (two consumer warpgroups of 64), 128-position KV tiles,
// three stages of K and V (two tiles in flight while one is used), every tile 128-byte swizzled.
template <int D>
struct Tiles {
    static constexpr int kBlockM = 128;  // folded query rows per CTA
    static constexpr int kBlockN = 128;  // KV positions per tile
    static constexpr int kStages = 3;
    static constexpr int NT = kBlockN / 8;  // 8-position column tiles of S
    using QTile = wgmma::Sw128Tile<D, kBlockM>;
    using KVTile = wgmma::Sw128Tile<D, kBlockN>;
    static constexpr int kAlign = 1024;  // the 128-byte swizzle atom
    static constexpr int kSmemBytes = (QTile::kElems + kStages * 2 * KVTile::kElems) * 2 + kAlign;
    static_assert((QTile::kElems * 2) % kAlign == 0 && (KVTile::kElems * 2) % kAlign == 0, "aligned tiles");
};

// Where the tiles lie in the dynamic shared memory `smem_raw`: Q at the first 1024-byte boundary, then stage s's K
// at skv + 2 s KVTile::kElems and its V right after it; the same as 32-bit shared-state-space addresses.
template <int D>
struct Smem {
    bf16* sq;
    bf16* skv;
    uint32_t sq_addr;
    uint32_t skv_addr;

    __device__ __forceinline__ explicit Smem(unsigned char* smem_raw) {
        using T = Tiles<D>;
        const uint32_t raw_addr = attn::smem_addr(smem_raw);
        const uint32_t base_addr = (raw_addr + T::kAlign - 1) & ~static_cast<uint32_t>(T::kAlign - 1);
        sq = reinterpret_cast<bf16*>(smem_raw + (base_addr - raw_addr));
        skv = sq + T::QTile::kElems;
        sq_addr = base_addr;
        skv_addr = base_addr + T::QTile::kElems * 2;
    }
    // Byte addresses of stage `stage`'s K and V tiles.
    __device__ __forceinline__ uint32_t k_addr(int stage) const {
        return skv_addr + stage * 2 * Tiles<D>::KVTile::kElems * 2;
    }
    __device__ __forceinline__ uint32_t v_addr(int stage) const {
        return k_addr(stage) + Tiles<D>::KVTile::kElems * 2;
    }
};

#if L32_WGMMA_AVAILABLE
// Descriptor of a 128-byte-swizzled K-major operand (Q as A, K as B): SBO 1024 (8-row atoms), LBO unused.
__device__ __forceinline__ uint64_t k_major_desc(uint32_t addr) { return wgmma::desc_sw128(addr, 16, 1024); }

// Issues S = Q K^T over D in k16 steps (not committed): step ks is column block ks / 4, 32-byte offset ks % 4
// within its rows. q_addr: this warpgroup's 64 Q rows (column block b at + b * 128 rows * 128 bytes).
template <int D>
__device__ __forceinline__ void issue_qk(float (&s)[Tiles<D>::NT][4], uint32_t q_addr, uint32_t k_addr) {
    using T = Tiles<D>;
    const uint64_t qd = k_major_desc(q_addr), kd = k_major_desc(k_addr);  // steps by wgmma::desc_plus: 24 a tile
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        const uint32_t qo = (ks / 4) * T::QTile::kBlockBytes + (ks % 4) * 32;
        const uint32_t ko = (ks / 4) * T::KVTile::kBlockBytes + (ks % 4) * 32;
        wgmma::mma_ss<T::kBlockN>(s, wgmma::desc_plus(qd, qo), wgmma::desc_plus(kd, ko), ks > 0);
    }
}

// Issues O += P V over the tile's positions in k16 steps (not committed): step kk is rows 16 kk.. of V (16 * 128
// bytes each).
template <int D>
__device__ __forceinline__ void issue_pv(float (&o)[D / 8][4], const uint32_t (&pa)[Tiles<D>::NT / 2][4],
                                         uint32_t v_addr) {
    using T = Tiles<D>;
    const uint64_t vd = wgmma::desc_sw128(v_addr, T::KVTile::kBlockBytes, 1024);
#pragma unroll
    for (int kk = 0; kk < T::NT / 2; ++kk) {
        wgmma::mma_rs_bt<D>(o, pa[kk], wgmma::desc_plus(vd, kk * 16 * 128));
    }
}
#endif

// P (the softmax numerators in the S accumulators) rounded to bf16 as the A fragments of P V: two accumulator
// column tiles make one fragment.
template <int NT>
__device__ __forceinline__ void pack_p(uint32_t (&pa)[NT / 2][4], const float (&s)[NT][4]) {
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
        pa[kk][0] = attn::pack_bf16x2(s[2 * kk][0], s[2 * kk][1]);
        pa[kk][1] = attn::pack_bf16x2(s[2 * kk][2], s[2 * kk][3]);
        pa[kk][2] = attn::pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[kk][3] = attn::pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
}

}  // namespace prefill90
}  // namespace l32
