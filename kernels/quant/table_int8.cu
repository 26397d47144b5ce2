// kernels/quant/table_int8.cu: the skinny GEMM of decode over an int8 table, out[m, n] = bf16(scales[j] *
// (x[m, k] @ q[n, k]^T)) for m <= 16 (l32_gemv_int8_params in llama32_kernels.h): the lm_head of a model whose
// embedding and lm_head are int8 per row (Meta's 8-bit per-channel option, `--embeddings int8`).
//
// Three tiers: the kernel, the launcher that picks the template arguments, and the checked C entry.
//
// Why: the bf16 lm_head is the largest single read of a small model's decode step (1B: 525 MB of the 1.07 GB a
// W4A16 step reads, docs/quantization.md); kept in int8 it is half that, and the table takes half the memory.
//
// Design, the bf16 skinny GEMM's (kernels/gemv.cu) with int8 weights:
//   - A block owns 16 table rows (16 output columns) and splits k over its 8 or 16 warps. Lane (g, t) streams
//     16-byte vectors (16 int8 of consecutive k) of rows g and g + 8, kUnroll vectors per row per step, read once
//     (ld.global.nc.L1::no_allocate); the x vectors of the same 16 k (two 16-byte loads per x row tile) go through
//     L1, since every block reads all of x.
//   - Each int8 becomes an exact bf16 (bf16 holds every integer of magnitude <= 256) in registers: the bytes are
//     biased to u = q + 128, placed under the exponent of 2^23 (one PRMT gives the f32 2^23 + u), 2^23 + 128 is
//     subtracted (exact), and two such floats are packed into a bf16x2 (exact). About 11 instructions per 4 int8.
//   - A 16-byte vector (16 k) feeds four m16n8k16 MMAs (bf16 in, f32 accumulate): the MMA's k order is free as long
//     as A and B agree, and a lane's A (its two rows) and B (its x rows) both hold the same 16 k, so MMA i takes
//     k 4i..4i+3 of each lane's vector (fragment words a0/a1 and a2/a3 = k pairs (4i, 4i+1) and (4i+2, 4i+3), b0/b1
//     the matching x words).
//   - Rows past n and x rows past m are clamped to the last valid row (loads stay in bounds; the extra results are
//     discarded), so the main loop has no predicates but the last, partial step's bound on k.
//   - The warps' partial sums meet in shared memory and are summed in warp order (deterministic); the thread of
//     each output then multiplies by its row's scale in f32 and rounds to bf16 once.
// Numerics against the CPU twin (the f32 GEMM over the dequantized table, scale * q exact in f32): the same exact
// products, summed in another order, and the scale applied once per output instead of per weight.
//
// Registers from ptxas (CUDA 13.0, sm_90a), no spills, no stack frame: 88 (m <= 8) and 108 (m <= 16), either warp
// count, so two 256-thread blocks fit per SM; kUnroll = 4 keeps 128 bytes of table per lane in flight, as gemv.cu.
//
// Bytes per call: n k (int8) + 2 n (scales) + 2 m k (x) + 2 m n (out). 1B lm_head (n 128256, k 2048): 263 MB, 88 us
// at 3 TB/s, against 525 MB for the bf16 table.
#include <algorithm>
#include <climits>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/launch.cuh"
#include "common/status.cuh"
#include "common/warp_tiles.cuh"
#include "llama32_kernels.h"
#include "quant/common.cuh"

namespace l32 {
namespace quant {
namespace {

constexpr int kRows = 16;    // table rows (output columns) per block: the M of one MMA
constexpr int kUnroll = 4;   // 16-byte vectors per row per lane per step
constexpr int64_t kMaxK = int64_t{1} << 24;

// Two exact bf16 values (the low and high 16 bits) of the int8 bytes `lo_byte` and `lo_byte + 1` of w.
__device__ __forceinline__ uint32_t int8_pair_bf16x2(uint32_t biased, int lo_byte) {
    constexpr float kMagic = 8388736.f;  // 2^23 + 128: the f32 whose mantissa holds a biased byte u, minus 128
    const float a = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7440 + lo_byte)) - kMagic;
    const float b = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7440 + lo_byte + 1)) - kMagic;
    // |a|, |b| <= 128 are integers: their f32 and bf16 forms are equal, so the packing rounds nothing.
    const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&v);
}

// The 16 int8 of a vector as 8 bf16x2 words: word p holds k 2p (low half) and 2p + 1.
__device__ __forceinline__ void int8x16_to_bf16(const uint4& v, uint32_t (&out)[8]) {
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t biased = words[i] ^ 0x80808080u;  // q + 128 in every byte
        out[2 * i] = int8_pair_bf16x2(biased, 0);
        out[2 * i + 1] = int8_pair_bf16x2(biased, 2);
    }
}

// One step of a lane: kUnroll vectors at positions base + (u * kWarps + warp) * 4 + t of its two rows and the
// matching x vectors of its kTiles x rows, loaded first, then four MMAs per vector and x tile. kTail: the step runs
// past kv (k / 16 vectors per row), so each vector is checked and zeroed past the end.
template <int kTiles, int kWarps, bool kTail>
__device__ __forceinline__ void int8_step(float (&acc)[kTiles][4], const uint4* w0, const uint4* w1,
                                          const uint4* const (&xr)[kTiles], int base, int kv, int warp, int t) {
    uint4 a0[kUnroll], a1[kUnroll], b[kUnroll][kTiles][2];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        const int v = base + (u * kWarps + warp) * 4 + t;
        if (!kTail || v < kv) {
            a0[u] = ld_stream_16(w0 + v);
            a1[u] = ld_stream_16(w1 + v);
#pragma unroll
            for (int j = 0; j < kTiles; ++j) {
                b[u][j][0] = ld_reuse_16(xr[j] + 2 * v);
                b[u][j][1] = ld_reuse_16(xr[j] + 2 * v + 1);
            }
        } else {
            a0[u] = a1[u] = make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int j = 0; j < kTiles; ++j) b[u][j][0] = b[u][j][1] = make_uint4(0, 0, 0, 0);
        }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        uint32_t r0[8], r1[8];
        int8x16_to_bf16(a0[u], r0);
        int8x16_to_bf16(a1[u], r1);
#pragma unroll
        for (int j = 0; j < kTiles; ++j) {
            const uint32_t x[8] = {b[u][j][0].x, b[u][j][0].y, b[u][j][0].z, b[u][j][0].w,
                                   b[u][j][1].x, b[u][j][1].y, b[u][j][1].z, b[u][j][1].w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                mma_bf16(acc[j], r0[2 * i], r1[2 * i], r0[2 * i + 1], r1[2 * i + 1], x[2 * i], x[2 * i + 1]);
            }
        }
    }
}

// Tier 1. grid = ceil(n / 16), block = kWarps * 32. kTiles = ceil(m / 8) MMA column tiles of x rows.
template <int kTiles, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, 16 / kWarps) gemv_int8_kernel(const __grid_constant__ l32_gemv_int8_params p) {
    __shared__ float partial[kWarps][kTiles * 8][kRows];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int m = static_cast<int>(p.m);
    const int kv = static_cast<int>(p.k / 16);
    const int64_t n0 = int64_t{blockIdx.x} * kRows;
    const int64_t r0 = std::min(n0 + g, p.n - 1), r1 = std::min(n0 + g + 8, p.n - 1);
    const auto* w0 = reinterpret_cast<const uint4*>(p.q + r0 * p.k);
    const auto* w1 = reinterpret_cast<const uint4*>(p.q + r1 * p.k);
    // The lane's first table bytes into L2 before waiting for the kernel that writes x (kernels/common/launch.cuh).
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        const int v = (u * kWarps + warp) * 4 + t;
        if (v < kv) {
            prefetch_l2(w0 + v);
            prefetch_l2(w1 + v);
        }
    }
    pdl_begin();
    const uint4* xr[kTiles];
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
        const int row = std::min(g + 8 * j, m - 1);
        xr[j] = reinterpret_cast<const uint4*>(static_cast<const bf16*>(p.x) + static_cast<int64_t>(row) * p.k);
    }
    float acc[kTiles][4];
#pragma unroll
    for (int j = 0; j < kTiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    constexpr int kStep = kUnroll * kWarps * 4;
    int base = 0;
    for (; base + kStep <= kv; base += kStep) int8_step<kTiles, kWarps, false>(acc, w0, w1, xr, base, kv, warp, t);
    if (base < kv) int8_step<kTiles, kWarps, true>(acc, w0, w1, xr, base, kv, warp, t);

    store_warp_tiles<kTiles, kWarps, kRows>(partial, acc, warp, g, t);
    __syncthreads();
    // kTiles * 8 * kRows <= 256 outputs, at most one per thread, each summed in warp order.
    const int i = threadIdx.x / kRows, c = threadIdx.x % kRows;
    if (i >= m || n0 + c >= p.n) return;
    const float s = warp_order_sum<kTiles, kWarps, kRows>(partial, i, c);
    const float scale = __bfloat162float(static_cast<const bf16*>(p.scales)[n0 + c]);
    static_cast<bf16*>(p.out)[static_cast<int64_t>(i) * p.n + n0 + c] = __float2bfloat16_rn(scale * s);
}

// Tier 2.
template <int kTiles, int kWarps>
l32_status launch(const l32_gemv_int8_params& p, cudaStream_t stream) {
    static_assert(kTiles * 8 * kRows <= kWarps * 32, "one thread per output of the block");
    const auto grid = static_cast<unsigned>((p.n + kRows - 1) / kRows);
    launch_kernel(gemv_int8_kernel<kTiles, kWarps>, grid, kWarps * 32, 0, stream, p);
    return check_launch();
}

}  // namespace
}  // namespace quant
}  // namespace l32

// Tier 3: the checked entry.
extern "C" l32_status l32_gemv_int8(const l32_gemv_int8_params* params, void* stream) {
    using namespace l32;
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_gemv_int8_params& p = *params;
    if (p.dtype != L32_DTYPE_BF16) return L32_UNSUPPORTED;
    if (p.out == nullptr || p.x == nullptr || p.q == nullptr || p.scales == nullptr) return L32_INVALID_ARGUMENT;
    if (p.m <= 0 || p.k <= 0 || p.n < 0) return L32_INVALID_ARGUMENT;
    if (p.m > 16 || p.k % 16 != 0 || p.k > quant::kMaxK || p.n > INT_MAX) return L32_UNSUPPORTED;
    if (!is_aligned(p.x, 16) || !is_aligned(p.q, 16)) return L32_UNSUPPORTED;
    if (p.warps != 8 && p.warps != 16) return L32_UNSUPPORTED;
    if (p.n == 0) return L32_OK;
    const auto s = static_cast<cudaStream_t>(stream);
    const bool two = p.m > 8;
    if (p.warps == 16) return two ? quant::launch<2, 16>(p, s) : quant::launch<1, 16>(p, s);
    return two ? quant::launch<2, 8>(p, s) : quant::launch<1, 8>(p, s);
}
