// kernels/quant/w4a8_sm90_products.cuh: what the Hopper W4A8 kernels share (w4a8_sm90.cu, the cp.async ones;
// w4a8_sm90_tma.cu, the TMA-fed ones): the tile traits, the block's span of tokens, weight tiles and chunks, the
// cp.async copy plans, the consumer warps' products (Products, the same f32 operations in every kernel), and the
// launch over the grid of tiles. The design and the numerics are described in w4a8_sm90.cu's file comment.
#pragma once

#include <climits>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/launch.cuh"
#include "common/status.cuh"
#include "common/wgmma.cuh"
#include "llama32_kernels.h"
#include "quant/common.cuh"
#include "quant/w4a8_common.cuh"

namespace l32 {
namespace quant {
namespace {

template <int kWG, int kBN, int kStages, bool kOverlap, bool kRow, bool kTma = false>
struct W4A8WgmmaTraits {
    static_assert(kBN == 64 || kBN == 128, "64 or 128 tokens per block");
    static constexpr int kTokens = kBN;             // tokens per block (the grid's x tiles)
    static constexpr int kThreads = kWG * 128;
    static constexpr int kTiles = kWG * 4;          // weight row tiles of 16 per block
    static constexpr int kHalves = kOverlap ? 2 : 1;  // wgmma products per group: token halves in flight in turn
    static constexpr int kHN = kBN / kHalves;       // tokens per wgmma
    static_assert(kHN == 32 || kHN == 64 || kHN == 128, "a wgmma n32, n64 or n128 per product");
    static constexpr int kActBytes = 2 * kBN * 32;  // both groups of a chunk, kBN tokens x 32 bytes each
    static constexpr int kWBytes = kTiles * 512;
    static constexpr int kSBytes = kTiles * 128;    // one chunk's scale entries: 8 of 4 f32 per tile
    // A stage: activations, weights, and the scale entries of its chunk and of the next one (whose first scales
    // close the chunk's last coefficient).
    static constexpr int kStageBytes = kActBytes + kWBytes + 2 * kSBytes;
    // kTma (the TMA kernels): the same bytes per stage, laid out as the three tensor-map boxes write them (see
    // w4a8_wgmma_tma_kernel), every stage on a 1024-byte boundary (the dynamic shared memory is aligned by hand).
    static_assert(!kTma || (kRow && !kOverlap), "the TMA kernels run the row kernel's serial products");
    static_assert(!kTma || kStageBytes % 1024 == 0, "every stage 1024-byte aligned");
    static constexpr int kAlign = kTma ? 1024 : 0;
    static constexpr int kSmemBytes = kStages * kStageBytes + kAlign;
    static_assert(kSmemBytes <= 227 * 1024, "the sm_90 opt-in limit per CTA");
    // Chunks loaded ahead of the one computed: every product of a chunk is waited for within its iteration, so the
    // stage refilled after the next barrier (the previous chunk's) is free.
    static constexpr int kAhead = kStages - 1;
    static_assert(kAhead >= 2, "at least two chunks in flight");
    static constexpr int kMinBlocks = kBN == 64 ? 2 : 1;
    static constexpr int kSegChunks = 4;  // 8 groups per segment (see the file comment)
    static_assert(kSegChunks * 2 * (32 * 128 * 128) <= (1 << 22), "a segment keeps D in [2^23, 2^24]");
};

// Byte offset, in a stage's activations, of column word cw (0..7) of token r of group j (see the file comment).
template <int kBN>
__device__ __forceinline__ int act_offset(int j, int r, int cw) {
    return j * (kBN * 32) + (r / 8) * 256 + (cw & 1) * 128 + (r % 8) * 16 + (cw >> 1) * 4;
}

// kRow: byte offset, in a stage's activations, of the 16 bytes of K half h (columns 16 h .. 16 h + 15, natural
// order) of token r of group j.
template <int kBN>
__device__ __forceinline__ int act_row_offset(int j, int r, int h) {
    return j * (kBN * 32) + (r / 8) * 256 + h * 128 + (r % 8) * 16;
}

// The activation copy of piece i (0 .. kBN * 4 - 1) of a chunk in natural k order (kRow): lane (piece, rr) =
// (i % 32 / 8, i % 8) of copy warp i / 32 takes the 16 bytes `piece` (group piece / 2, K half piece % 2) of token
// 8 (i / 32) + rr, so each 8 lanes fill one 128-byte core matrix and a warp reads 8 rows x 64 contiguous bytes.
template <int kBN>
__device__ __forceinline__ void row_piece(int i, int& r, int& piece, int& dst) {
    const int lane_i = i % 32;
    piece = lane_i / 8;
    r = (i / 32) * 8 + lane_i % 8;
    dst = act_row_offset<kBN>(piece / 2, r, piece % 2);
}

// What a block of either kernel below covers: tokens m0 .. m0 + kTokens of m, weight row tiles nt0 .. nt0 + kTiles
// of ntiles (npad rows padded to whole tiles), and the 64-column chunks [c0, c1) of kc that its split takes.
template <class T>
struct BlockSpan {
    int m, ntiles, kc, m0, nt0, c0, c1;
    int64_t npad;

    __device__ __forceinline__ explicit BlockSpan(const l32_w4a8_params& p) {
        m = static_cast<int>(p.m);
        ntiles = static_cast<int>((p.n + 15) / 16);
        npad = int64_t{ntiles} * 16;
        kc = static_cast<int>(p.k / 64);
        m0 = blockIdx.x * T::kTokens;
        nt0 = blockIdx.y * T::kTiles;
        split_range(kc, p.splits, blockIdx.z, c0, c1);
    }

    // After every thread of the block stored its sums: with several splits, the split-K finish of the block's tile
    // (w4a8_splitk_finish, every thread); with one, nothing.
    __device__ __forceinline__ void splitk_finish(const l32_w4a8_params& p) const {
        if (p.splits == 1) return;
        w4a8_splitk_finish(p, blockIdx.y * gridDim.x + blockIdx.x, m0, T::kTokens, int64_t{nt0} * 16, T::kTiles * 16,
                           npad);
    }
};

// One copying thread's share of a chunk's weights and scales, planned once (both kernels below copy the same
// stage layout): the block's kTiles weight tiles are kTiles * 32 pieces of 16 bytes, piece i to byte 16 i of the
// stage's weights; its 2 kTiles * 8 scale entries (this chunk's, then the next one's, for s_next) go to byte 16 e
// of the stage's scales. Copier `i` of kCopiers takes pieces i, i + kCopiers, ... and scale entry i when
// i < 2 kTiles * 8. Chunk c adds c * 512 (weights) and c * 128 (scales) bytes to the sources; tiles past n and
// chunks past k are zero-filled.
template <class T, int kCopiers>
struct ChunkCopies {
    static constexpr int kPieces = T::kTiles * 32 / kCopiers;
    static_assert(kPieces * kCopiers == T::kTiles * 32, "whole rounds of weight pieces");
    const uint8_t* w_src[kPieces];
    bool w_ok[kPieces];
    const uint8_t* s_src;
    bool s_ok;
    int s_next;

    __device__ __forceinline__ ChunkCopies(const l32_w4a8_params& p, unsigned i, int nt0, int ntiles, int kc) {
        const auto* wq = static_cast<const uint8_t*>(p.qweight);
        const auto* sc = reinterpret_cast<const uint8_t*>(p.scales);
#pragma unroll
        for (int j = 0; j < kPieces; ++j) {
            const unsigned piece = i + j * kCopiers;
            const int w_nt = nt0 + static_cast<int>(piece) / 32;
            w_ok[j] = w_nt < ntiles;
            w_src[j] = wq + (int64_t{w_ok[j] ? w_nt : 0} * kc * 32 + piece % 32) * 16;
        }
        s_next = static_cast<int>(i) / (T::kTiles * 8);
        const unsigned s_e = i % (T::kTiles * 8);
        const int s_nt = nt0 + s_e / 8;
        s_ok = s_nt < ntiles;
        s_src = sc + ((int64_t{s_ok ? s_nt : 0} * kc + s_next) * 8 + s_e % 8) * 16;
    }

    // Issues copier i's copies of chunk c (of kc) into `stage`.
    __device__ __forceinline__ void issue(uint8_t* stage, unsigned i, int c, int kc) const {
#pragma unroll
        for (int j = 0; j < kPieces; ++j) {
            cp_async16(stage + T::kActBytes + (i + j * kCopiers) * 16, w_src[j] + int64_t{c} * 512, w_ok[j]);
        }
        if (i < 2 * T::kTiles * 8) {
            const bool ok = s_ok && c + s_next < kc;
            cp_async16(stage + T::kActBytes + T::kWBytes + i * 16, s_src + (ok ? int64_t{c} * 128 : 0), ok);
        }
    }
};

#if L32_WGMMA_AVAILABLE
// One consumer warp's products and f32 sums over the chunks of its split (what the kernels below share): warp
// `tile` of the block (warp tile % 4 of warpgroup tile / 4) owns weight row tile `tile`, with every token of the
// block's kBN. chunk() runs one chunk from its stage in shared memory; store() writes the sums out (finished at one
// split, f32 partials otherwise).
template <int kWG, int kBN, int kStages, bool kOverlap, bool kRow, bool kTma = false>
struct Products {
    using T = W4A8WgmmaTraits<kWG, kBN, kStages, kOverlap, kRow, kTma>;
    static constexpr int kH = T::kHalves;
    static constexpr int NT = T::kHN / 8;        // accumulator column tiles of 8 tokens per half
    static constexpr float kBias = 12582912.0f;  // 1.5 * 2^23, the float whose bits are kI2fBias

    int d[kH][NT][4];
    float acc[kH][NT][4];
    float pend_lo = 0.f, pend_hi = 0.f;  // overlap: the coefficients of the half still in flight

    __device__ __forceinline__ Products() {
#pragma unroll
        for (int h = 0; h < kH; ++h) {
#pragma unroll
            for (int j = 0; j < NT; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[h][j][e] = 0.f;
            }
        }
    }

    // acc[h] += c * float(d[h]) for every output of token half h: c_lo for row g, c_hi for row g + 8.
    __device__ __forceinline__ void scale_add(int h, float c_lo, float c_hi) {
        wgmma::fence_operands(d[h]);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc[h][j][e] = fmaf(e < 2 ? c_lo : c_hi, __int_as_float(d[h][j][e]), acc[h][j][e]);
            }
        }
    }

    // kTma: warp `tile`'s lane `lane`'s byte offsets in a stage (its scale entries, its first weight word) and its
    // nibble shift, computed once before the chunk loop and kept in registers (ptxas otherwise recomputes them from
    // the thread index in every chunk: ~30 instructions a chunk in a kernel bound by issue slots).
    struct Lane {
        int s_off = 0, w_off = 0, shift = 0;
    };
    __device__ __forceinline__ static Lane lane_offsets(int tile, int lane) {
        static_assert(kTma, "the other kernels compute their offsets per chunk");
        const int g = lane / 4, t = lane % 4;
        Lane l;
        l.s_off = T::kActBytes + T::kWBytes + tile * 256 + g * 16;
        l.w_off = T::kActBytes + tile * 512 + (lane & ~3) * 16 + (t >> 1) * 16;
        l.shift = (t & 1) ? 0 : 4;
        asm volatile("" : "+r"(l.s_off), "+r"(l.w_off), "+r"(l.shift));  // opaque: not recomputed later
        return l;
    }

    // The products of one chunk (the rel-th of the split; `last`: the split's last) from its stage `s`.
    __device__ __forceinline__ void chunk(const uint8_t* s, int tile, int lane, int rel, bool last) {
        chunk_at(s, uint64_t{0}, Lane{}, tile, lane, rel, last);
    }

    // chunk() given, for kTma, the descriptor of the stage's activations `act_desc` (group 0; the TMA kernels
    // derive it from stage 0's by one add) and this thread's offsets `lo` too (the others ignore both).
    __device__ __forceinline__ void chunk_at(const uint8_t* s, uint64_t act_desc, const Lane& lo, int tile, int lane,
                                             int rel, bool last) {
        const int g = lane / 4, t = lane % 4;
        // Scale entries of chunks c and c + 1: (row g, group 2c), (row g, 2c + 1), (row g + 8, 2c), (row g + 8,
        // 2c + 1). kTma: the tile's 128 bytes of chunk c, then its 128 of chunk c + 1; else chunk c's of every tile,
        // then chunk c + 1's.
        float4 sv, sn;
        if constexpr (kTma) {
            sv = *reinterpret_cast<const float4*>(s + lo.s_off);
            sn = *reinterpret_cast<const float4*>(s + lo.s_off + 128);
        } else {
            sv = *reinterpret_cast<const float4*>(s + T::kActBytes + T::kWBytes + (tile * 8 + g) * 16);
            sn = *reinterpret_cast<const float4*>(s + T::kActBytes + T::kWBytes + T::kSBytes + (tile * 8 + g) * 16);
        }
        const bool seg_start = rel % T::kSegChunks == 0;
        const bool seg_end = rel % T::kSegChunks == T::kSegChunks - 1 || last;
        // Both groups' A fragments (16 q as int8; row g from .x / .z, row g + 8 from .y / .w of a lane's 16 bytes),
        // kept in registers until the chunk's last product is done: a product reads its A registers while it runs.
        // A lane's word holds columns 8t..8t+3 in its low nibbles and 8t+4..8t+7 in its high ones.
        constexpr uint32_t kHi = 0xF0F0F0F0u;
        uint32_t a[2][4];
        if constexpr (kRow) {
            // Natural k order (slot s is column s): slots 4t..4t+3 are columns 4t.. of quad lane t / 2, slots
            // 16 + 4t.. those of quad lane 2 + t / 2, in its low nibbles for even t, high nibbles for odd t.
            uint4 w_lo, w_hi;
            int sh;
            if constexpr (kTma) {
                w_lo = *reinterpret_cast<const uint4*>(s + lo.w_off);
                w_hi = *reinterpret_cast<const uint4*>(s + lo.w_off + 32);
                sh = lo.shift;
            } else {
                const uint8_t* wt = s + T::kActBytes + tile * 512 + (lane & ~3) * 16;
                w_lo = *reinterpret_cast<const uint4*>(wt + (t >> 1) * 16);
                w_hi = *reinterpret_cast<const uint4*>(wt + (2 + (t >> 1)) * 16);
                sh = (t & 1) ? 0 : 4;
            }
            a[0][0] = (w_lo.x << sh) & kHi;
            a[0][1] = (w_lo.y << sh) & kHi;
            a[0][2] = (w_hi.x << sh) & kHi;
            a[0][3] = (w_hi.y << sh) & kHi;
            a[1][0] = (w_lo.z << sh) & kHi;
            a[1][1] = (w_lo.w << sh) & kHi;
            a[1][2] = (w_hi.z << sh) & kHi;
            a[1][3] = (w_hi.w << sh) & kHi;
        } else {
            // The activations' k order follows the lane's own word: slot 4t + i is column 8t + i, slot
            // 16 + 4t + i is column 8t + 4 + i.
            const uint4 wv = *reinterpret_cast<const uint4*>(s + T::kActBytes + tile * 512 + lane * 16);
            a[0][0] = (wv.x << 4) & kHi;
            a[0][1] = (wv.y << 4) & kHi;
            a[0][2] = wv.x & kHi;
            a[0][3] = wv.y & kHi;
            a[1][0] = (wv.z << 4) & kHi;
            a[1][1] = (wv.w << 4) & kHi;
            a[1][2] = wv.z & kHi;
            a[1][3] = wv.w & kHi;
        }
#pragma unroll
        for (int jg = 0; jg < 2; ++jg) {
            // The group's coefficients: sw_g - sw_{g+1} inside the segment, sw_b at its end.
            float c_lo, c_hi;
            if (jg == 0) {
                c_lo = sv.x - sv.y;
                c_hi = sv.z - sv.w;
            } else if (seg_end) {
                c_lo = sv.y;
                c_hi = sv.w;
            } else {
                c_lo = sv.y - sn.x;
                c_hi = sv.w - sn.z;
            }
#pragma unroll
            for (int h = 0; h < kH; ++h) {
                if (seg_start && jg == 0) {
                    // A segment starts: D back at the bias, and the segment's constant -sw_a B (each half's last
                    // FFMAs of the previous segment are done: they precede this half's next product).
#pragma unroll
                    for (int j = 0; j < NT; ++j) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            d[h][j][e] = kI2fBias;
                            acc[h][j][e] = fmaf(e < 2 ? -sv.x : -sv.z, kBias, acc[h][j][e]);
                        }
                    }
                }
                // B: kTma, the 64-byte-swizzled token rows (8-row atoms 512 bytes apart) from group jg's 32 bytes;
                // else the core matrices of group jg, half h.
                uint64_t desc_b;
                if constexpr (kTma) {
                    desc_b = wgmma::desc_plus(act_desc, jg * 32);
                } else {
                    const uint32_t b_addr = smem_addr(s + jg * (kBN * 32) + h * (T::kHN / 8) * 256);
                    desc_b = wgmma::desc_interleave(b_addr, 128, 256);
                }
                wgmma::fence_operands(d[h]);
                wgmma::fence_operands(a[jg]);
                wgmma::fence();
                wgmma::mma_rs_s8<T::kHN>(d[h], a[jg], desc_b);
                wgmma::commit();
                if constexpr (!kOverlap) {
                    wgmma::wait<0>();
                    scale_add(h, c_lo, c_hi);
                } else if (h == 1) {
                    // Half 0 of this group is done while half 1 computes.
                    wgmma::wait<1>();
                    scale_add(0, c_lo, c_hi);
                    pend_lo = c_lo;
                    pend_hi = c_hi;
                } else if (jg == 1) {
                    // Half 1 of the chunk's first group is done while half 0 of its second computes.
                    wgmma::wait<1>();
                    scale_add(1, pend_lo, pend_hi);
                }
            }
        }
        if constexpr (kOverlap) {
            // The chunk's last half, not overlapped: a product still in flight across the loop's back edge (or a
            // data-dependent wait) makes ptxas serialize every wgmma of the kernel (C7514).
            wgmma::wait<0>();
            scale_add(1, pend_lo, pend_hi);
        }
        wgmma::fence_operands(a[0]);  // every product of the chunk is done: the A registers may be reused
        wgmma::fence_operands(a[1]);
    }

    // The sums out: finished at one split, else this split's f32 partials (the split-K finish follows).
    __device__ __forceinline__ void store(const l32_w4a8_params& p, int64_t npad, int nt0, int tile, int m0,
                                          int lane) const {
        const int g = lane / 4, t = lane % 4;
        const int m = static_cast<int>(p.m);
        // acc[h][j][e]: weight row 16 (nt0 + tile) + g (+8 for e >= 2), token m0 + kHN h + 8 j + 2 t (+1 for odd e).
        // One split: finished here; several: f32 partials, then the split-K finish.
        const int64_t row_lo = int64_t{nt0 + tile} * 16 + g;
#pragma unroll
        for (int h = 0; h < kH; ++h) {
#pragma unroll
            for (int j = 0; j < NT; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int64_t row = row_lo + (e >= 2 ? 8 : 0);
                    const int tok = m0 + T::kHN * h + 8 * j + 2 * t + (e & 1);
                    if (tok >= m) continue;
                    if (p.splits == 1) {
                        if (row < p.n) w4a8_finish(p, acc[h][j][e], tok, row);
                    } else if (row < npad) {
                        p.partials[(int64_t{blockIdx.z} * m + tok) * npad + row] = acc[h][j][e];
                    }
                }
            }
        }
    }
};
#endif

// Tier 2. `kernel` over the grid of T's tiles (token tiles, weight row blocks, splits) with `threads` threads.
template <class T, class... Extra>
l32_status launch_tiles(void (*kernel)(l32_w4a8_params, Extra...), int threads, const l32_w4a8_params& p,
                        cudaStream_t stream, const Extra&... extra) {
    const int64_t ntiles = (p.n + 15) / 16;
    const dim3 grid(static_cast<unsigned>((p.m + T::kTokens - 1) / T::kTokens),
                    static_cast<unsigned>((ntiles + T::kTiles - 1) / T::kTiles), static_cast<unsigned>(p.splits));
    const l32_status smem = allow_dynamic_smem(kernel, T::kSmemBytes);
    if (smem != L32_OK) return smem;
    launch_kernel(kernel, grid, threads, T::kSmemBytes, stream, p, extra...);
    return check_launch();
}

}  // namespace
}  // namespace quant
}  // namespace l32
