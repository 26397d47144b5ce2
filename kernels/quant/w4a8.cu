// kernels/quant/w4a8.cu: 4-bit group-wise weights x int8 per-token activations on the int8 tensor cores
// (l32_w4a8_params in llama32_kernels.h), torchao's 8da4w:
//
//   out[m, n] = bf16( sx[m] * ( sum_g sw[n, g] * sum_{k in g} xq[m, k] * (q[n, k] - zw[n, g])
//                               - zx[m] * corr[n] ) ),     corr[n] = sum_g sw[n, g] * sum_{k in g} (q[n, k] - zw[n, g])
//
// which is sx * sum_g sw * sum_k (xq - zx) (q - zw) regrouped: the activation zero point is removed once per output
// through the per-row constant corr (precomputed at load time in f64) instead of once per group.
//
// Three tiers: the kernel, the launcher that picks the template arguments, and the checked C entry.
// Weight layout: kernels/quant/common.cuh (W4A8 nibble order). Design:
//   - Block = 8 warps, a tile of BN = 128 weight rows (8 row tiles of 16) x BM tokens, over the 64-column chunks of
//     split blockIdx.z. Two shapes (tile_m): 128 tokens for prefill (warps 2 x 4, each 64 rows x 32 tokens:
//     16 MMAs per group), and 8 / 16 / 32 tokens for decode-sized m (warps 8 x 1, each 16 rows x tile_m tokens).
//   - A 3-stage cp.async ring per chunk: the block's 8 weight tiles (4 KB, already in fragment order), their scales
//     (1 KB f32) and zero points (256 B), and BM x 64 int8 activations. Activation rows are 64 bytes; each 32-byte
//     half (one group) is swapped with the other on rows r with (r >> 1) & 1 set, which makes the 8-byte fragment
//     reads of a half-warp (4 rows x 32 bytes) hit 32 distinct banks.
//   - Per group, one m16n8k32 s8 MMA per (row tile, token tile) accumulates exactly in s32 from zero; the weights are
//     the A operand, sign-extended from nibbles in registers: symmetric weights as 16 q via one LOP3 per 4 values
//     ((w << 4) & 0xF0F0F0F0 and w & 0xF0F0F0F0; the device scales hold sw / 16, exact), weights with zero points
//     as q - zw through a bytewise biased subtraction (see expand_zeros). Then acc += scale * float(s32) in f32,
//     with exact_i2f's exact int -> float conversion (|s32| < 2^20 here). In the prefill tile the MMA does its
//     integer add: it accumulates from 0x4B400000, the bits of 1.5 * 2^23, so one FADD leaves the float of s32
//     (biased_i2f).
//   - Split-K as in w4a16.cu: f32 partials, the last block of a tile sums them in split order and finishes.
// For large m this is bound by the per-group epilogue, not the MMAs: each m16n8k32 MMA (4096 multiply-adds, a
// couple of cycles of an SM's int8 tensor cores) leaves 4 s32 per lane that must be converted and scaled (2 ALU ops
// each in the prefill tile, FADD and FFMA: 256 lane-ops per MMA per warp), because with group 32 every k32 MMA output carries its own
// scale. On Hopper, w4a8_sm90.cu (L32_W4A8_WGMMA) feeds the tensor cores with wgmma and spends one FFMA per
// output and group instead of two.
//
// Registers from ptxas: see engine/ops/cuda/quant.rs (module docs).
#include <algorithm>
#include <climits>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/status.cuh"
#include "llama32_kernels.h"
#include "quant/common.cuh"
#include "quant/w4a8_common.cuh"
#include "quant/w4a8_sm90.cuh"

namespace l32 {
namespace quant {
namespace {

constexpr int kThreads = 256;
constexpr int kBN = 128;              // weight rows per block
constexpr int kStages = 3;            // cp.async ring depth
constexpr int kTilesN = kBN / 16;     // 8 weight row tiles per block
constexpr int kABytes = kTilesN * 512;      // weights per stage
constexpr int kSBytes = kTilesN * 8 * 16;   // scales per stage (f32 x 4 per lane group)
constexpr int kZBytes = kTilesN * 8 * 4;    // zero points per stage (u8 x 4 per lane group)
constexpr int64_t kMaxK = int64_t{1} << 24;

// int8 A-fragment registers of q - zw from one weight word with zero points: byte j of `lo` is column j (nibble
// 2 j), of `hi` column 4 + j (nibble 2 j + 1). (nibble ^ 8) | 0x80 = 0x80 + (q + 8); subtracting c = 8 + zw per
// byte (c in [0, 15]) never borrows across bytes, and XOR 0x80 turns 0x80 + (q - zw) into the int8 q - zw.
__device__ __forceinline__ void expand_zeros(uint32_t w, uint32_t c4, uint32_t& lo, uint32_t& hi) {
    lo = (((w & 0x0F0F0F0Fu) ^ 0x88888888u) - c4) ^ 0x80808080u;
    hi = ((((w >> 4) & 0x0F0F0F0Fu) ^ 0x88888888u) - c4) ^ 0x80808080u;
}

// Byte offset of 16-byte chunk `ch` (0..3) of activation row `r` in a stage (see the file comment).
__device__ __forceinline__ int b_offset(int r, int ch) {
    const int seg = (ch >> 1) ^ ((r >> 1) & 1);
    return r * 64 + seg * 32 + (ch & 1) * 16;
}

// The weights, scales and zero points of chunk c of the block's 8 weight row tiles (from nt0) into stage s, one
// 16-byte cp.async per thread (not committed); tiles past n are zero-filled. Weights only: w4a8_kernel may issue it
// before it waits for the previous kernel (p.prewait).
template <bool kZeros>
__device__ __forceinline__ void stage_weights(uint8_t* s, const l32_w4a8_params& p, int nt0, int ntiles, int kc,
                                              int c) {
    const auto* wq = static_cast<const uint8_t*>(p.qweight);
    const auto* sc = reinterpret_cast<const uint8_t*>(p.scales);
    {
        const int i = threadIdx.x;  // 256 threads x 16 bytes = the 8 weight tiles
        const int nt = nt0 + i / 32;
        const bool ok = nt < ntiles;
        const int64_t src = ((int64_t{ok ? nt : 0} * kc + c) * 32 + i % 32) * 16;
        cp_async16(s + i * 16, wq + src, ok);
    }
    if (threadIdx.x < kSBytes / 16) {  // 64 x 16 bytes: tile i / 8, lane group i % 8
        const int i = threadIdx.x;
        const int nt = nt0 + i / 8;
        const bool ok = nt < ntiles;
        const int64_t src = ((int64_t{ok ? nt : 0} * kc + c) * 8 + i % 8) * 16;
        cp_async16(s + kABytes + i * 16, sc + src, ok);
    }
    if constexpr (kZeros) {
        if (threadIdx.x >= 64 && threadIdx.x < 64 + kZBytes / 16) {  // 16 x 16 bytes: tile i / 2, half i % 2
            const auto* zr = static_cast<const uint8_t*>(p.zeros);
            const int i = threadIdx.x - 64;
            const int nt = nt0 + i / 2;
            const bool ok = nt < ntiles;
            const int64_t src = (int64_t{ok ? nt : 0} * kc + c) * 32 + (i % 2) * 16;
            cp_async16(s + kABytes + kSBytes + i * 16, zr + src, ok);
        }
    }
}

// Tier 1. grid = (ceil(n_pad / 128), ceil(m / BM), splits), block = 256; BM = kWarpsM * kWM * 8.
template <int kWarpsN, int kWarpsM, int kWN, int kWM, bool kZeros>
__global__ void __launch_bounds__(kThreads) w4a8_kernel(const __grid_constant__ l32_w4a8_params p) {
    static_assert(kWarpsN * kWarpsM * 32 == kThreads, "8 warps");
    static_assert(kWarpsN * kWN == kTilesN, "the warps cover the block's 8 weight row tiles");
    // The prefill tile (several warps along m), whose per-group epilogue bounds it, takes the biased MMA.
    constexpr bool kBiasedMma = kWarpsM > 1;
    constexpr int kBM = kWarpsM * kWM * 8;
    constexpr int kBBytes = kBM * 64;
    constexpr int kStageBytes = kABytes + kSBytes + kZBytes + kBBytes;
    __shared__ __align__(16) uint8_t smem[kStages][kStageBytes];

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int wn = warp % kWarpsN, wm = warp / kWarpsN;
    const int m = static_cast<int>(p.m);
    const int ntiles = static_cast<int>((p.n + 15) / 16);
    const int64_t npad = int64_t{ntiles} * 16;
    const int kc = static_cast<int>(p.k / 64);
    const int nt0 = blockIdx.x * kTilesN;  // first weight row tile of the block
    const int m0 = blockIdx.y * kBM;       // first token of the block
    int c0, c1;
    split_range(kc, p.splits, blockIdx.z, c0, c1);

    float acc[kWN][kWM][4];
#pragma unroll
    for (int i = 0; i < kWN; ++i) {
#pragma unroll
        for (int j = 0; j < kWM; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;
    }

    // The first stages. With p.prewait their weights, scales and zero points are copied before the wait for the
    // previous kernel, which writes xq (never the weights: kernels/common/launch.cuh), so under PDL they arrive while
    // it finishes. They join the first commit group, which the loop's first wait on the copies covers either way;
    // the copies and the bits are the same.
    const bool early = p.prewait != 0;
    if (early) {
#pragma unroll
        for (int s = 0; s < kStages - 1; ++s) {
            if (c0 + s < c1) stage_weights<kZeros>(smem[s], p, nt0, ntiles, kc, c0 + s);
        }
    }
    pdl_begin();
    const auto* xq = reinterpret_cast<const uint8_t*>(p.xq);
    // Copies chunk c into stage `stage`: its weights, scales and zero points (stage_weights), then its activations.
    // Token rows past m are zero-filled.
    auto load_stage = [&](int stage, int c, bool weights) {
        uint8_t* s = smem[stage];
        if (weights) stage_weights<kZeros>(s, p, nt0, ntiles, kc, c);
        for (int i = threadIdx.x; i < kBM * 4; i += kThreads) {
            const int r = i / 4, ch = i % 4;
            const int tok = m0 + r;
            const bool ok = tok < m;
            const int64_t src = int64_t{ok ? tok : 0} * p.k + int64_t{c} * 64 + ch * 16;
            cp_async16(s + kABytes + kSBytes + kZBytes + b_offset(r, ch), xq + src, ok);
        }
    };
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (c0 + s < c1) load_stage(s, c0 + s, !early);
        cp_async_commit();
    }
    for (int c = c0; c < c1; ++c) {
        cp_async_wait<kStages - 2>();
        __syncthreads();  // chunk c is in its stage for every thread; the stage refilled below is no longer read
        const int next = c + kStages - 1;
        if (next < c1) load_stage((next - c0) % kStages, next, true);
        cp_async_commit();

        const uint8_t* s = smem[(c - c0) % kStages];
        uint4 a[kWN];
        float4 sv[kWN];
        uint32_t zv[kWN];
#pragma unroll
        for (int i = 0; i < kWN; ++i) {
            const int tile = wn * kWN + i;
            a[i] = *reinterpret_cast<const uint4*>(s + tile * 512 + lane * 16);
            sv[i] = *reinterpret_cast<const float4*>(s + kABytes + (tile * 8 + g) * 16);
            if constexpr (kZeros) zv[i] = *reinterpret_cast<const uint32_t*>(s + kABytes + kSBytes + (tile * 8 + g) * 4);
        }
        const uint8_t* sb = s + kABytes + kSBytes + kZBytes;
#pragma unroll
        for (int jg = 0; jg < 2; ++jg) {
            uint32_t a0[kWN], a1[kWN], a2[kWN], a3[kWN];
            float s_a[kWN], s_b[kWN];
#pragma unroll
            for (int i = 0; i < kWN; ++i) {
                const uint32_t wa = jg == 0 ? a[i].x : a[i].z;  // row g
                const uint32_t wb = jg == 0 ? a[i].y : a[i].w;  // row g + 8
                if constexpr (kZeros) {
                    const uint32_t ca = ((zv[i] >> (8 * jg)) & 0xFFu) * 0x01010101u;
                    const uint32_t cb = ((zv[i] >> (16 + 8 * jg)) & 0xFFu) * 0x01010101u;
                    expand_zeros(wa, ca, a0[i], a2[i]);
                    expand_zeros(wb, cb, a1[i], a3[i]);
                } else {
                    a0[i] = (wa << 4) & 0xF0F0F0F0u;
                    a2[i] = wa & 0xF0F0F0F0u;
                    a1[i] = (wb << 4) & 0xF0F0F0F0u;
                    a3[i] = wb & 0xF0F0F0F0u;
                }
                s_a[i] = jg == 0 ? sv[i].x : sv[i].y;
                s_b[i] = jg == 0 ? sv[i].z : sv[i].w;
            }
#pragma unroll
            for (int j = 0; j < kWM; ++j) {
                const int r = (wm * kWM + j) * 8 + g;  // token row of the block
                const uint2 b = *reinterpret_cast<const uint2*>(sb + r * 64 + ((jg ^ ((r >> 1) & 1)) * 32) + 8 * t);
#pragma unroll
                for (int i = 0; i < kWN; ++i) {
                    // In the prefill tile the MMA accumulates from kI2fBias, so each partial leaves it as
                    // 1.5 * 2^23 + s32 in float bits: one FADD and one FFMA per partial (exact_i2f's integer add
                    // is done by the tensor core). The decode tiles, bound by memory, keep exact_i2f: ptxas
                    // spills 16 bytes in some of them when the bias takes a register.
                    int d[4];
                    float f[4];
                    if constexpr (kBiasedMma) {
                        mma_s8(d, a0[i], a1[i], a2[i], a3[i], b.x, b.y, kI2fBias);
#pragma unroll
                        for (int e = 0; e < 4; ++e) f[e] = biased_i2f(d[e]);
                    } else {
                        mma_s8(d, a0[i], a1[i], a2[i], a3[i], b.x, b.y);
#pragma unroll
                        for (int e = 0; e < 4; ++e) f[e] = exact_i2f(d[e]);
                    }
                    acc[i][j][0] = fmaf(s_a[i], f[0], acc[i][j][0]);
                    acc[i][j][1] = fmaf(s_a[i], f[1], acc[i][j][1]);
                    acc[i][j][2] = fmaf(s_b[i], f[2], acc[i][j][2]);
                    acc[i][j][3] = fmaf(s_b[i], f[3], acc[i][j][3]);
                }
            }
        }
    }
    cp_async_wait<0>();

    // acc[i][j][e]: weight row 16 (nt0 + wn kWN + i) + g (+8 for e >= 2), token m0 + 8 (wm kWM + j) + 2t (+1, odd e).
    if (p.splits == 1) {
#pragma unroll
        for (int i = 0; i < kWN; ++i) {
#pragma unroll
            for (int j = 0; j < kWM; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int64_t row = int64_t{nt0 + wn * kWN + i} * 16 + g + (e >= 2 ? 8 : 0);
                    const int tok = m0 + (wm * kWM + j) * 8 + 2 * t + (e & 1);
                    if (tok < m && row < p.n) w4a8_finish(p, acc[i][j][e], tok, row);
                }
            }
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < kWN; ++i) {
#pragma unroll
        for (int j = 0; j < kWM; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int64_t row = int64_t{nt0 + wn * kWN + i} * 16 + g + (e >= 2 ? 8 : 0);
                const int tok = m0 + (wm * kWM + j) * 8 + 2 * t + (e & 1);
                if (tok < m && row < npad) p.partials[(int64_t{blockIdx.z} * m + tok) * npad + row] = acc[i][j][e];
            }
        }
    }
    w4a8_splitk_finish(p, blockIdx.y * gridDim.x + blockIdx.x, m0, kBM, int64_t{nt0} * 16, kBN, npad);
}

// Tier 2.
template <int kWarpsN, int kWarpsM, int kWN, int kWM>
l32_status launch(const l32_w4a8_params& p, cudaStream_t stream) {
    constexpr int kBM = kWarpsM * kWM * 8;
    const int64_t ntiles = (p.n + 15) / 16;
    const dim3 grid(static_cast<unsigned>((ntiles + kTilesN - 1) / kTilesN), static_cast<unsigned>((p.m + kBM - 1) / kBM),
                    static_cast<unsigned>(p.splits));
    if (p.zeros != nullptr) {
        launch_kernel(w4a8_kernel<kWarpsN, kWarpsM, kWN, kWM, true>, grid, kThreads, 0, stream, p);
    } else {
        launch_kernel(w4a8_kernel<kWarpsN, kWarpsM, kWN, kWM, false>, grid, kThreads, 0, stream, p);
    }
    return check_launch();
}

}  // namespace
}  // namespace quant
}  // namespace l32

// Tier 3: the checked entry.
extern "C" l32_status l32_w4a8_gemm(const l32_w4a8_params* params, void* stream) {
    using namespace l32;
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_w4a8_params& p = *params;
    if (p.dtype != L32_DTYPE_BF16) return L32_UNSUPPORTED;
    if (p.out == nullptr || p.xq == nullptr || p.x_scales == nullptr || p.x_zeros == nullptr || p.qweight == nullptr ||
        p.scales == nullptr || p.row_corr == nullptr) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.m < 0 || p.k <= 0 || p.n < 0 || p.splits < 1) return L32_INVALID_ARGUMENT;
    if (p.m > INT_MAX / 2 || p.k % 64 != 0 || p.k > quant::kMaxK || p.n > INT_MAX - 128) return L32_UNSUPPORTED;
    if (p.splits > p.k / 64 || p.splits > 65535) return L32_UNSUPPORTED;
    if (p.kernel != L32_W4A8_MMA && p.kernel != L32_W4A8_WGMMA && p.kernel != L32_W4A8_WGMMA_SERIAL &&
        p.kernel != L32_W4A8_WGMMA_ROW && p.kernel != L32_W4A8_WGMMA_WS && p.kernel != L32_W4A8_WGMMA_TMA &&
        p.kernel != L32_W4A8_WGMMA_WS_TMA) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.kernel != L32_W4A8_MMA) {
        // Grid (m tiles, 128-row blocks, splits): the blocks along y are limited to 65535.
        if (p.tile_m != 64 && p.tile_m != 128) return L32_UNSUPPORTED;
        if ((p.n + 127) / 128 > 65535 || p.zeros != nullptr) return L32_UNSUPPORTED;
    } else {
        if (p.tile_m != 8 && p.tile_m != 16 && p.tile_m != 32 && p.tile_m != 128) return L32_UNSUPPORTED;
        if ((p.m + p.tile_m - 1) / p.tile_m > 65535) return L32_UNSUPPORTED;
    }
    if (p.splits > 1 && (p.partials == nullptr || p.counters == nullptr)) return L32_INVALID_ARGUMENT;
    if (!is_aligned(p.xq, 16) || !is_aligned(p.qweight, 16) || !is_aligned(p.scales, 16)) return L32_UNSUPPORTED;
    if (p.zeros != nullptr && !is_aligned(p.zeros, 16)) return L32_UNSUPPORTED;
    if (p.m == 0 || p.n == 0) return L32_OK;
    const auto s = static_cast<cudaStream_t>(stream);
    if (p.kernel != L32_W4A8_MMA) return quant::launch_w4a8_wgmma(p, s);
    l32_w4a8_params q = p;  // the mma kernel reads prewait
    q.prewait = prewait_under_pdl(p.prewait);
    switch (q.tile_m) {
        case 8: return quant::launch<8, 1, 1, 1>(q, s);
        case 16: return quant::launch<8, 1, 1, 2>(q, s);
        case 32: return quant::launch<8, 1, 1, 4>(q, s);
        default: return quant::launch<2, 4, 4, 4>(q, s);
    }
}
