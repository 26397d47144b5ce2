// kernels/quant/w4a8_sm90.cu: the W4A8 GEMM of w4a8.cu (same parameters, same torchao 8da4w result up to f32
// rounding) on Hopper's warpgroup MMA, for sm_90a, symmetric weights only. Launched by l32_w4a8_gemm when
// params.kernel is L32_W4A8_WGMMA, L32_W4A8_WGMMA_SERIAL, L32_W4A8_WGMMA_ROW or L32_W4A8_WGMMA_WS (the row
// kernel's products, warp-specialized: see w4a8_wgmma_ws_kernel).
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

// The three tensor maps of the TMA kernels (encoded per launch by w4a8_maps): each chunk's stage is three boxes.
//   - act: xq as k bytes x m rows (uint8), boxes of 64 columns x kBN tokens, 64-byte swizzle: chunk c's activations
//     of tokens m0 .. m0 + kBN as kBN rows of 64 bytes in 8-row atoms of 512 bytes, which wgmma reads through a
//     64-byte-swizzle descriptor (group j at byte 32 j of each row). Tokens past m are zeros.
//   - weights: each 16-row tile's chunks as one row of kc x 512 bytes (uint32 elements), boxes of one chunk (128
//     elements) x kTiles tiles: the stage's weights as the other kernels copy them (tile t at byte 512 t). Tiles
//     past the last are zeros.
//   - scales: each tile's scale entries as one row of kc x 128 bytes, boxes of two chunks (64 elements) x kTiles
//     tiles: per tile, chunk c's 128 bytes then chunk c + 1's (zeros past the last chunk), 256 bytes a tile.
struct W4A8Maps {  // each map 128-byte aligned (CUtensorMap's own alignment)
    CUtensorMap act;
    CUtensorMap weights;
    CUtensorMap scales;
};

#if L32_WGMMA_AVAILABLE
// One thread's start of a TMA kernel: the maps asked for ahead of their first use, and the `full` barriers (one
// arrival each: the issuing thread's expect_tx; then the boxes' bytes) and `empty` barriers (`empty_count`
// arrivals; none when `empty` is null) initialized and fenced for the TMA unit. The block barrier that follows
// publishes them.
template <int kStages>
__device__ __forceinline__ void tma_ring_init(const W4A8Maps& maps, uint64_t* full, uint64_t* empty,
                                              unsigned empty_count) {
    tma::prefetch_map(&maps.act);
    tma::prefetch_map(&maps.weights);
    tma::prefetch_map(&maps.scales);
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
        sync90::mbar_init(&full[s], 1);
        if (empty != nullptr) sync90::mbar_init(&empty[s], empty_count);
    }
    sync90::mbar_init_fence();
}

// The first 1024-byte boundary in the dynamic shared memory (the TMA kernels ask for 1024 bytes more; the arithmetic
// of the other swizzled-tile kernels' own alignment, prefill90::Smem and w4a16_wgmma_kernel).
__device__ __forceinline__ uint8_t* align_1024(uint8_t* raw) {
    const uint32_t a = smem_addr(raw);
    return raw + (((a + 1023u) & ~1023u) - a);
}

// The consumers' side of a TMA kernel's ring: the stage and phase parity of the next chunk, the wgmma descriptor
// of stage 0's activations (64-byte swizzle, SBO 512) and the shared address of its `full` barrier, computed once
// (opaque to ptxas, which would rebuild them in every chunk). A stage's descriptor is stage 0's stepped by its offset
// (wgmma::desc_plus).
template <class T, int kStages>
struct TmaRing {
    uint64_t desc_base;
    uint32_t full_base;
    int stage = 0;
    unsigned phase = 0;

    __device__ __forceinline__ TmaRing(uint8_t* smem, uint64_t* full)
        : desc_base(wgmma::desc_sw64(smem_addr(smem), 16, 512)), full_base(smem_addr(full)) {
        static_assert(kStages * T::kStageBytes + 1024 <= 227 * 1024, "stage offsets within the shared window");
        asm volatile("" : "+l"(desc_base), "+r"(full_base));
    }

    // Waits for the next chunk (the rel-th of the split; `last`: its last) to land and runs its products; returns
    // the stage it read, and moves on by one.
    template <class Prod>
    __device__ __forceinline__ int consume(Prod& prod, uint8_t* smem, const typename Prod::Lane& lo, int tile,
                                           int lane, int rel, bool last) {
        sync90::mbar_wait_bounded_at(full_base + stage * 8, phase);
        const int off = stage * T::kStageBytes;
        prod.chunk_at(smem + off, wgmma::desc_plus(desc_base, off), lo, tile, lane, rel, last);
        const int done = stage;
        if (++stage == kStages) {
            stage = 0;
            phase ^= 1;
        }
        return done;
    }
};

// Issues the three boxes of chunk c (the rel-th of the split) into stage rel % kStages, completing on its `full`
// barrier (one thread).
template <class T, int kStages>
__device__ __forceinline__ void tma_issue_chunk(const W4A8Maps& maps, uint8_t* smem, uint64_t* full, int rel, int c,
                                                int m0, int nt0) {
    const int stage = rel % kStages;
    uint8_t* st = smem + stage * T::kStageBytes;
    sync90::mbar_arrive_expect(&full[stage], T::kStageBytes);
    tma::load_2d(st, &maps.act, c * 64, m0, &full[stage]);
    tma::load_2d(st + T::kActBytes, &maps.weights, c * 128, nt0, &full[stage]);
    tma::load_2d(st + T::kActBytes + T::kWBytes, &maps.scales, c * 32, nt0, &full[stage]);
}
#endif

// Tier 1 (L32_W4A8_WGMMA_TMA). The row kernel's products (serial, natural-order activations: the same bits) fed by
// the TMA unit: thread 0 issues each chunk's three boxes (W4A8Maps) into a kStages-deep ring, each stage completing
// on its mbarrier `full`, and every thread waits there instead of issuing its share of ~1,000 cp.async per chunk.
// The row kernel is bound by issue slots; by the SASS (twenty-first session) its copies (address arithmetic,
// zero-fill predicates, the stage index) and the per-chunk offset and descriptor arithmetic, which this kernel keeps
// in registers, take ~60 of its ~210 instructions per chunk and warp (docs/quantization.md).
// The block barrier per chunk stays: after it, every warp is done with the previous chunk, whose stage thread 0
// then refills. Grid, tiles, split-K and the store as the row kernel; 256 threads.
template <int kBN, int kStages>
__global__ void __launch_bounds__(256, W4A8WgmmaTraits<2, kBN, kStages, false, true, true>::kMinBlocks)
    w4a8_wgmma_tma_kernel(const __grid_constant__ l32_w4a8_params p, const __grid_constant__ W4A8Maps maps) {
#if L32_WGMMA_AVAILABLE
    using T = W4A8WgmmaTraits<2, kBN, kStages, false, true, true>;
    pdl_begin();
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    __shared__ uint64_t full[kStages];
    uint8_t* smem = align_1024(smem_raw);

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const BlockSpan<T> span(p);
    const int chunks = span.c1 - span.c0;
    if (threadIdx.x == 0) tma_ring_init<kStages>(maps, full, nullptr, 0);
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int rel = 0; rel < T::kAhead && rel < chunks; ++rel) {
            tma_issue_chunk<T, kStages>(maps, smem, full, rel, span.c0 + rel, span.m0, span.nt0);
        }
    }
    using Prod = Products<2, kBN, kStages, false, true, true>;
    Prod prod;
    const typename Prod::Lane lane_off = Prod::lane_offsets(warp, lane);
    TmaRing<T, kStages> ring(smem, full);
#pragma unroll 1
    for (int rel = 0; rel < chunks; ++rel) {
        if (rel > 0) __syncthreads();  // every warp is done with chunk rel - 1, whose stage is refilled next
        if (threadIdx.x == 0 && rel + T::kAhead < chunks) {
            const int ahead = rel + T::kAhead;
            tma_issue_chunk<T, kStages>(maps, smem, full, ahead, span.c0 + ahead, span.m0, span.nt0);
        }
        ring.consume(prod, smem, lane_off, warp, lane, rel, rel + 1 == chunks);
    }
    prod.store(p, span.npad, span.nt0, warp, span.m0, lane);
    span.splitk_finish(p);
#else
    (void)p;
    (void)maps;
    __trap();  // only sm_90a runs this kernel; the launcher refuses every other device
#endif
}

// Tier 1 (L32_W4A8_WGMMA_WS_TMA). The ws kernel with the TMA kernel's copies: warp 0 of the producer warpgroup
// waits for a stage's `empty` (8 arrivals: lane 0 of each consumer warp once the chunk's products are done) and its
// lane 0 issues the chunk's three boxes onto the stage's `full`; the rest of that warpgroup only joins the split-K
// finish. The consumers as in w4a8_wgmma_ws_kernel (the same bits), with bounded waits (a ring out of step traps
// instead of hanging: this kernel has not run on a GPU yet). 384 threads, one block per SM.
template <int kBN, int kStages>
__global__ void __launch_bounds__(384, 1)
    w4a8_wgmma_ws_tma_kernel(const __grid_constant__ l32_w4a8_params p, const __grid_constant__ W4A8Maps maps) {
#if L32_WGMMA_AVAILABLE
    using T = W4A8WgmmaTraits<2, kBN, kStages, false, true, true>;
    constexpr int kProducers = 128;
    pdl_begin();
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    __shared__ uint64_t full[kStages], empty[kStages];
    uint8_t* smem = align_1024(smem_raw);

    const BlockSpan<T> span(p);
    const int chunks = span.c1 - span.c0;
    if (threadIdx.x == 0) tma_ring_init<kStages>(maps, full, empty, T::kTiles);
    __syncthreads();

    if (threadIdx.x < 32) {
        // Warp 0 waits for each stage to come back; its lane 0 issues the boxes (the warp stays converged).
        for (int rel = 0; rel < chunks; ++rel) {
            const int stage = rel % kStages;
            if (rel >= kStages) sync90::mbar_wait_bounded(&empty[stage], (rel / kStages - 1) & 1);
            if (threadIdx.x == 0) tma_issue_chunk<T, kStages>(maps, smem, full, rel, span.c0 + rel, span.m0, span.nt0);
            __syncwarp();
        }
    } else if (threadIdx.x >= kProducers) {
        const int tile = static_cast<int>(threadIdx.x) / 32 - kProducers / 32, lane = threadIdx.x % 32;
        using Prod = Products<2, kBN, kStages, false, true, true>;
        Prod prod;
        const typename Prod::Lane lane_off = Prod::lane_offsets(tile, lane);
        TmaRing<T, kStages> ring(smem, full);
#pragma unroll 1
        for (int rel = 0; rel < chunks; ++rel) {
            const int stage = ring.consume(prod, smem, lane_off, tile, lane, rel, rel + 1 == chunks);
            __syncwarp();
            if (lane == 0) sync90::mbar_arrive(&empty[stage]);
        }
        prod.store(p, span.npad, span.nt0, tile, span.m0, lane);
    }
    span.splitk_finish(p);
#else
    (void)p;
    (void)maps;
    __trap();  // only sm_90a runs this kernel; the launcher refuses every other device
#endif
}

// The TMA kernels' maps for `p` with kBN-token boxes (see W4A8Maps).
template <int kBN, int kTiles>
l32_status w4a8_maps(const l32_w4a8_params& p, W4A8Maps& maps) {
    const auto k = static_cast<uint64_t>(p.k), kc = k / 64, ntiles = static_cast<uint64_t>((p.n + 15) / 16);
    l32_status s = tma::encode_2d(&maps.act, CU_TENSOR_MAP_DATA_TYPE_UINT8, p.xq, k, static_cast<uint64_t>(p.m), k,
                                  64, kBN, CU_TENSOR_MAP_SWIZZLE_64B);
    if (s == L32_OK) {
        s = tma::encode_2d(&maps.weights, CU_TENSOR_MAP_DATA_TYPE_UINT32, p.qweight, kc * 128, ntiles, kc * 512, 128,
                           kTiles, CU_TENSOR_MAP_SWIZZLE_NONE);
    }
    if (s == L32_OK) {
        s = tma::encode_2d(&maps.scales, CU_TENSOR_MAP_DATA_TYPE_UINT32, p.scales, kc * 32, ntiles, kc * 128, 64,
                           kTiles, CU_TENSOR_MAP_SWIZZLE_NONE);
    }
    return s;
}

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

// The TMA kernels: the ws one (384 threads) or the block-barrier one (256). Where a box would be larger than its
// whole tensor (fewer than kBN tokens, fewer than kTiles weight tiles, or a single chunk, whose scales box spans
// two), the cp.async kernel with the same products runs instead (the same bits): the encoder accepts such boxes,
// but other projects report that copies through them fault, and the zero fill they would rely on is what the
// partial boxes at a tensor's edge, which every larger shape has, already exercise.
template <int kBN, int kStages, bool kWs>
l32_status launch_tma(const l32_w4a8_params& p, cudaStream_t stream) {
    using T = W4A8WgmmaTraits<2, kBN, kStages, false, true, true>;
    if (p.m < kBN || (p.n + 15) / 16 < T::kTiles || p.k < 128) {
        if constexpr (kWs) {
            return launch_ws<kBN, kStages>(p, stream);
        } else {
            return launch<2, kBN, kStages, false, true>(p, stream);
        }
    }
    W4A8Maps maps;
    const l32_status s = w4a8_maps<kBN, T::kTiles>(p, maps);
    if (s != L32_OK) return s;
    if constexpr (kWs) {
        static_assert(T::kThreads + 128 == 384 && T::kMinBlocks >= 1, "the ws kernel's block, as in launch_ws");
        return launch_tiles<T>(w4a8_wgmma_ws_tma_kernel<kBN, kStages>, 384, p, stream, maps);
    } else {
        return launch_tiles<T>(w4a8_wgmma_tma_kernel<kBN, kStages>, T::kThreads, p, stream, maps);
    }
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
    if (p.kernel == L32_W4A8_WGMMA_WS) return p.tile_m == 64 ? launch_ws<64, 8>(p, stream) : launch_ws<128, 6>(p, stream);
    if (p.kernel == L32_W4A8_WGMMA_TMA) {
        return p.tile_m == 64 ? launch_tma<64, 6, false>(p, stream) : launch_tma<128, 6, false>(p, stream);
    }
    if (p.kernel == L32_W4A8_WGMMA_WS_TMA) {
        return p.tile_m == 64 ? launch_tma<64, 8, true>(p, stream) : launch_tma<128, 6, true>(p, stream);
    }
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
