// Shared device pieces of the 4-bit GEMMs (kernels/quant/w4a16.cu, kernels/quant/w4a8.cu): the load-time weight
// layout they read, PTX wrappers for the tensor-core MMAs, cp.async and streaming loads, the int4 -> bf16 / int8
// register dequantization, and the deterministic split-K finish.
//
// ---- The reordered weight layout (written on the host by engine/ops/cuda/quant.rs) -------------------------------
// The [n, k] int4 matrix is cut into tiles of 16 rows x 64 columns (two groups of 32). n is padded to a multiple of
// 16 with zero rows (scale 0), k must be a multiple of 64. Tile (nt, c) (row tile nt, column chunk c, kc = k / 64
// chunks per row) is 512 bytes at byte offset (nt * kc + c) * 512: 32 lanes x 16 bytes, lane-major, so a warp
// reads a tile with one coalesced 16-byte load per lane. Lane L = 4 g + t (g = L / 4, t = L % 4) holds, as four
// 32-bit words:
//   .x: row 16 nt + g,     columns 64 c + 8 t + i       (group 2 c,     i = 0..7)
//   .y: row 16 nt + g + 8, columns 64 c + 8 t + i       (group 2 c)
//   .z: row 16 nt + g,     columns 64 c + 32 + 8 t + i  (group 2 c + 1)
//   .w: row 16 nt + g + 8, columns 64 c + 32 + 8 t + i  (group 2 c + 1)
// each value as a 4-bit two's complement nibble (q & 0xF). The nibble of column offset i inside a word depends on
// the MMA that consumes it:
//   W4A16 (bf16 m16n8k16): nibble (i >> 1) + 4 (i & 1), i.e. pairs (i, i + 1) sit in nibbles (p, p + 4), so one
//                          `(w >> 4p) & 0x000F000F` yields two bf16 halves of one A-fragment register;
//   W4A8  (s8 m16n8k32):   nibble 2 i for i < 4, 2 (i - 4) + 1 for i >= 4, so `(w << 4) & 0xF0F0F0F0` yields the
//                          four int8 (times 16) of columns 0..3 and `w & 0xF0F0F0F0` those of columns 4..7.
// Why 8 consecutive columns per lane: an MMA's k order is free as long as A and B agree. In a bf16 m16n8k16 the
// lane (g, t) holds k slots {2t, 2t+1, 2t+8, 2t+9}; mapping them to columns 8t..8t+3 for the group's first MMA and
// 8t+4..8t+7 for its second covers the group's 32 columns exactly once, and the B fragments of both MMAs are then
// one 16-byte load of x (columns 8t..8t+7 of a token). In an s8 m16n8k32 the lane holds k slots {4t..4t+3,
// 4t+16..4t+19}, mapped to columns 8t..8t+7: one group is one MMA and its B fragment is one 8-byte load of the int8
// activations.
//
// Scales (and zero points) use the same tiles: entry (nt, c, g) holds the four values of rows 16 nt + g and
// 16 nt + g + 8 for groups 2c and 2c+1, ordered (row g, group 2c), (row g, group 2c+1), (row g+8, group 2c),
// (row g+8, group 2c+1): 4 bf16 (W4A16) or 4 f32 (W4A8) per entry, 8 entries per tile.
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/last_block.cuh"
#include "common/smem.cuh"

namespace l32 {
namespace quant {

// 16 bytes of a weight that is read exactly once: bypass L1 so the activations keep it.
__device__ __forceinline__ uint4 ld_stream_16(const void* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

// 8 bytes (scales) read once per warp tile: no L1 allocation either.
__device__ __forceinline__ uint2 ld_stream_8(const void* p) {
    uint2 r;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    return r;
}

// 16 bytes of the activations, which every block of the same K range reads again: keep them in L1.
__device__ __forceinline__ uint4 ld_reuse_16(const void* p) {
    uint4 r;
    asm("ld.global.nc.L1::evict_last.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

// d = A (16 x 16 bf16, row-major) * B (16 x 8 bf16, col-major) + c, f32 accumulate (sm_80+). Fragment layout: see
// kernels/common/attention.cuh.
__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// d = A * B + 0: mma_bf16 into a zeroed tile without zeroing registers first (ptxas passes RZ as C; the same bits).
__device__ __forceinline__ void mma_bf16_zero(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                              uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %10, %10, %10};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(0.f));
}

// The bit pattern of the float 1.5 * 2^23 (see exact_i2f).
constexpr int kI2fBias = 0x4B400000;

// d = c + A (16 x 32 s8, row-major) * B (32 x 8 s8, col-major), s32 accumulate from c in every element (sm_80+).
// Lane (g, t): a0 = A[g][4t..4t+3], a1 = A[g+8][4t..4t+3], a2 = A[g][4t+16..4t+19], a3 = A[g+8][4t+16..4t+19]
// (byte j = column +j), b0 = B[4t..4t+3][g], b1 = B[4t+16..4t+19][g], d = D[g][2t], D[g][2t+1], D[g+8][2t],
// D[g+8][2t+1]. Exact: every product and partial sum is an integer far inside s32 (no saturation is requested or
// needed). With c = kI2fBias the tensor core does exact_i2f's integer add: see biased_i2f.
__device__ __forceinline__ void mma_s8(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                       uint32_t b1, int c = 0) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %10, %10, %10};"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(c));
}

// Two bf16 values, exactly q_lo - z and q_hi - z, from the nibbles at bits s and s + 16 of w (W4A16 order above).
// (w >> s) & 0x000F000F keeps the two nibbles q & 0xF; XOR 0x4308 turns each half into the bf16 bit pattern of
// 128 + (q + 8) (0x4300 is 128.0, whose ulp is 1, and nibble ^ 8 = q + 8 for a 4-bit two's complement q); the
// bf16 subtraction of `bias` = 136 + z (a bf16 pair) leaves q - z, an integer in [-15, 15]: every step is exact.
// The mask and the XOR are one LOP3 with a three-input table: written as C++, ptxas emits two (a LOP3 takes one
// immediate, and it keeps both constants as immediates), so the operation is spelled out in PTX with the constants
// as operands, which ptxas keeps in registers across the loop (fifteenth session: 8.75 -> 4 LOP3 per weight word in
// the direct kernel's loop, the same results bit for bit).
__device__ __forceinline__ uint32_t and_xor(uint32_t a, uint32_t mask, uint32_t x) {
    uint32_t d;
    // Table of (a & b) ^ c for a = 0xF0, b = 0xCC, c = 0xAA: (0xF0 & 0xCC) ^ 0xAA = 0x6A.
    asm("lop3.b32 %0, %1, %2, %3, 0x6a;" : "=r"(d) : "r"(a), "r"(mask), "r"(x));
    return d;
}

// kOneLop = false keeps the C++ form (two LOP3 with immediates, no register for a constant): for the bulk kernel,
// which sits at its 128-register cap at m <= 16 and spilled 28 bytes with the one-LOP3 form.
template <bool kOneLop = true>
__device__ __forceinline__ uint32_t dequant_bf16x2(uint32_t w, int s, uint32_t bias) {
    const uint32_t biased =
        kOneLop ? and_xor(w >> s, 0x000F000Fu, 0x43084308u) : ((w >> s) & 0x000F000Fu) ^ 0x43084308u;
    __nv_bfloat162 v, b;
    memcpy(&v, &biased, 4);
    memcpy(&b, &bias, 4);
    const __nv_bfloat162 r = __hsub2(v, b);
    uint32_t out;
    memcpy(&out, &r, 4);
    return out;
}

// The bf16 pair a * b (each half rounded once to nearest even, as the f32 product of two bf16 rounded to bf16).
__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
    __nv_bfloat162 x, y;
    memcpy(&x, &a, 4);
    memcpy(&y, &b, 4);
    const __nv_bfloat162 r = __hmul2(x, y);
    uint32_t out;
    memcpy(&out, &r, 4);
    return out;
}

// The bf16 pair (136 + z, 136 + z): the dequantization bias of a symmetric group (z = 0) is 0x43084308.
constexpr uint32_t kSymmetricBias = 0x43084308u;

// Exact int -> float for |v| < 2^22 in two full-rate ALU ops (I2F runs at a quarter of the FP32 rate): adding v to
// the bit pattern of 1.5 * 2^23 gives the float 1.5 * 2^23 + v exactly (its ulp is 1), and subtracting
// 1.5 * 2^23 leaves v.
__device__ __forceinline__ float exact_i2f(int v) {
    return __int_as_float(v + kI2fBias) - 12582912.0f;
}

// exact_i2f(v) for b = v + kI2fBias already added (by an MMA accumulating from kI2fBias): one full-rate op, the
// same float.
__device__ __forceinline__ float biased_i2f(int b) {
    return __int_as_float(b) - 12582912.0f;
}


// 16-byte global -> shared copy bypassing L1; with `valid` false nothing is read and the bytes are zero-filled.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const int src_size = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_size)
                 : "memory");
}

// N-byte global -> shared copy through L1 (cp.async takes 4 or 8 bytes only with .ca; 16-byte copies use
// cp_async16): with `valid` false nothing is read and the bytes are zero-filled. For layouts that move 4-byte words
// apart (the wgmma activations) and for 8-byte entries that are only 8-byte aligned.
template <int N>
__device__ __forceinline__ void cp_async_ca(void* smem, const void* gmem, bool valid) {
    static_assert(N == 4 || N == 8, "cp.async.ca copies 4, 8 or 16 bytes; use cp_async16 for 16");
    const int src_size = valid ? N : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_addr(smem)), "l"(gmem), "n"(N),
                 "r"(src_size)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// One thread's share of a block's 16-byte row copies, the same for every k chunk but for the chunk's column offset,
// planned once before the chunk loop (the wgmma kernels' natural-order activations). Copy i = threadIdx.x +
// it * threads (it < kCopies) reads 16 bytes at byte 16 piece of row m0 + r (zero-filled past row m) and writes
// them at byte `dst` of a stage; `place(i, r, piece, dst)` sets the three for copy i.
template <int kCopies>
struct RowCopies {
    const uint8_t* src[kCopies];
    int dst[kCopies];
    bool ok[kCopies];

    // `base`: row 0 of the matrix; `row_bytes`: its row pitch.
    template <class Place>
    __device__ __forceinline__ RowCopies(const uint8_t* base, int64_t row_bytes, int m0, int m, int threads,
                                         Place place) {
#pragma unroll
        for (int it = 0; it < kCopies; ++it) {
            int r, piece;
            place(static_cast<int>(threadIdx.x) + it * threads, r, piece, dst[it]);
            const int tok = m0 + r;
            ok[it] = tok < m;
            src[it] = base + int64_t{ok[it] ? tok : 0} * row_bytes + piece * 16;
        }
    }

    // Issues the copies of the chunk at byte `offset` of each row into `stage`.
    __device__ __forceinline__ void issue(uint8_t* stage, int64_t offset) const {
#pragma unroll
        for (int it = 0; it < kCopies; ++it) cp_async16(stage + dst[it], src[it] + offset, ok[it]);
    }
};

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// The [begin, end) column chunks of split s of `splits` over `chunks` (balanced: sizes differ by at most one).
__device__ __forceinline__ void split_range(int chunks, int splits, int s, int& begin, int& end) {
    begin = static_cast<int>(static_cast<int64_t>(chunks) * s / splits);
    end = static_cast<int>(static_cast<int64_t>(chunks) * (s + 1) / splits);
}

// Deterministic split-K, part 1: called by every thread of a block after it wrote its f32 partials (plain stores)
// for tile `tile`. Returns true in every thread of the block whose arrival completes the tile (the last of
// `splits`; last_block_arrive, which also resets the counter); that block then sums the partials of all splits in
// split order (read with __ldcg). The order of the sum never depends on which block arrives last, so the result has
// the same bits on every run.
__device__ __forceinline__ bool splitk_arrive(unsigned* counters, int tile, int splits) {
    return last_block_arrive(counters, tile, splits);
}

}  // namespace quant
}  // namespace l32
