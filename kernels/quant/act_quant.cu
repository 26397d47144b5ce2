// kernels/quant/act_quant.cu: per-token asymmetric int8 quantization of bf16 activation rows (torchao's
// per_token_dynamic_quant, the W4A8 input), alone or fused into the kernel that produces the row
// (l32_act_quant_params in llama32_kernels.h): RMSNorm, residual add + RMSNorm, and SiLU(gate) * up.
//
// Three tiers: the kernel, the launcher that sizes the block, and the checked C entry.
//
// One block per row, W = 8 bf16 per vector (hidden % 8 == 0, 16-byte aligned rows). Each pass walks the row's
// vectors c = threadIdx.x, threadIdx.x + blockDim.x, ...:
//   A. (norms only) the residual add (written back) and the sum of squares -> inv = rsqrt(mean + eps);
//   B. the row's values v (the bf16 output the unfused kernel would write), their min and max (and, when `out` is
//      set, the bf16 row itself: for tests and for callers that also need it);
//   C. the values again, quantized to int8.
// Passes B and C recompute v from the (L1/L2 resident) inputs instead of keeping the row in shared memory, so any
// row length works with static resources. The block size is norm.cu's plan (the fewest threads that cover the row
// with 1, 2, 4 or 8 vectors each, at most 512), so pass A sums the squares in the same order as l32_norm and the
// fused norm's bf16 values are bit for bit those of l32_norm; the SiLU product is activation.cu's expression.
//
// Quantization, exactly the CPU twin `quant::numerics::quantize_activations` applied to the bf16 values v (every
// f32 operation rounded once, no contraction into FMA):
//   lo = min(min(v), 0), hi = max(max(v), 0), scale = max((hi - lo) / 255, 2^-23),
//   zp = clamp(-128 - rint(lo / scale), -128, 127), q = clamp(rint(v * (1 / scale)) + zp, -128, 127).
// min and max are exact whatever the reduction order, so q, scale and zp are bit-identical to the CPU twin's.
//
// Registers from ptxas: see engine/ops/cuda/quant.rs.
#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/reduce.cuh"
#include "common/status.cuh"
#include "llama32_kernels.h"

namespace l32 {
namespace {

constexpr int kMaxThreads = 512;

using Vec = BF16Vec<8>;

// Block-wide min and max (every thread gets both). Blocks are a multiple of 32 threads, at most 1024.
__device__ __forceinline__ void block_min_max(float& lo, float& hi) {
    __shared__ float s_lo[32], s_hi[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        lo = fminf(lo, __shfl_xor_sync(kFullWarp, lo, o));
        hi = fmaxf(hi, __shfl_xor_sync(kFullWarp, hi, o));
    }
    if (blockDim.x == 32) return;
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) {
        s_lo[warp] = lo;
        s_hi[warp] = hi;
    }
    __syncthreads();
    lo = lane < blockDim.x / 32 ? s_lo[lane] : 0.f;  // 0 is neutral: both start from 0 (lo <= 0 <= hi)
    hi = lane < blockDim.x / 32 ? s_hi[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        lo = fminf(lo, __shfl_xor_sync(kFullWarp, lo, o));
        hi = fmaxf(hi, __shfl_xor_sync(kFullWarp, hi, o));
    }
}

// silu(g) * u in f32, activation.cu's expression.
__device__ __forceinline__ float silu_mul_f32(float g, float u) { return g / (1.f + expf(-g)) * u; }

// Tier 1. grid = rows, block = the plan's threads.
template <int kOp>
__global__ void __launch_bounds__(kMaxThreads) act_quant_kernel(const __grid_constant__ l32_act_quant_params p) {
    pdl_begin();
    constexpr bool kNorm = kOp == L32_ACT_QUANT_RMS_NORM || kOp == L32_ACT_QUANT_ADD_RMS_NORM;
    constexpr bool kResidual = kOp == L32_ACT_QUANT_ADD_RMS_NORM;
    constexpr bool kSilu = kOp == L32_ACT_QUANT_SILU_MUL;
    const int64_t row = blockIdx.x;
    const int n = static_cast<int>(p.hidden / 8);
    const int64_t in_stride = kSilu ? 2 * p.hidden : p.hidden;
    const Vec* x = reinterpret_cast<const Vec*>(static_cast<const bf16*>(p.x) + row * in_stride);
    Vec* residual = nullptr;
    if constexpr (kResidual) residual = reinterpret_cast<Vec*>(static_cast<bf16*>(p.residual) + row * p.hidden);
    const Vec* weight = static_cast<const Vec*>(p.weight);

    float inv = 0.f;
    if constexpr (kNorm) {
        float sum_sq = 0.f;
        for (int c = threadIdx.x; c < n; c += blockDim.x) {
            Vec h = load_vec(x + c);
            if constexpr (kResidual) {
                h = add_round(load_vec(residual + c), h);
                store_vec(residual + c, h);
            }
            sum_sq += sum_squares(h);
        }
        inv = rsqrtf(block_sum(sum_sq) * (1.f / static_cast<float>(p.hidden)) + p.eps);
    }
    // The row's bf16 values at vector c.
    auto value = [&](int c) {
        Vec v;
        if constexpr (kNorm) {
            const Vec h = load_vec((kResidual ? residual : x) + c);
            const Vec w = load_vec(weight + c);
#pragma unroll
            for (int i = 0; i < 8; ++i) v.set(i, w.get(i) * __bfloat162float(__float2bfloat16_rn(h.get(i) * inv)));
        } else if constexpr (kSilu) {
            const Vec g = load_vec(x + c);
            const Vec u = load_vec(x + n + c);
#pragma unroll
            for (int i = 0; i < 8; ++i) v.set(i, silu_mul_f32(g.get(i), u.get(i)));
        } else {
            v = load_vec(x + c);
        }
        return v;
    };

    float lo = 0.f, hi = 0.f;
    Vec* out = p.out == nullptr ? nullptr : reinterpret_cast<Vec*>(static_cast<bf16*>(p.out) + row * p.hidden);
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        const Vec v = value(c);
        if (out != nullptr) store_vec(out + c, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            lo = fminf(lo, v.get(i));
            hi = fmaxf(hi, v.get(i));
        }
    }
    block_min_max(lo, hi);
    const float scale = fmaxf(__fdiv_rn(__fsub_rn(hi, lo), 255.f), FLT_EPSILON);
    const float zp = fminf(fmaxf(__fsub_rn(-128.f, rintf(__fdiv_rn(lo, scale))), -128.f), 127.f);
    const float inv_scale = __fdiv_rn(1.f, scale);
    auto* q = reinterpret_cast<uint2*>(p.q + row * p.hidden);
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        const Vec v = value(c);
        uint32_t packed[2] = {0u, 0u};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float r = __fadd_rn(rintf(__fmul_rn(v.get(i), inv_scale)), zp);
            const int qi = static_cast<int>(fminf(fmaxf(r, -128.f), 127.f));
            packed[i / 4] |= (static_cast<uint32_t>(qi) & 0xFFu) << (8 * (i % 4));
        }
        q[c] = make_uint2(packed[0], packed[1]);
    }
    if (threadIdx.x == 0) {
        p.scales[row] = scale;
        p.zeros[row] = static_cast<int32_t>(zp);
    }
}

int round_up_32(int64_t v) { return static_cast<int>((v + 31) / 32 * 32); }

// norm.cu's plan for the 8-wide path: the fewest threads that cover n vectors with 1, 2, 4 or 8 each.
int plan_threads(int64_t n) {
    for (int vecs : {1, 2, 4, 8}) {
        if (n <= int64_t{vecs} * kMaxThreads) return round_up_32((n + vecs - 1) / vecs);
    }
    return kMaxThreads;
}

// Tier 2.
template <int kOp>
l32_status launch(const l32_act_quant_params& p, cudaStream_t stream) {
    launch_kernel(act_quant_kernel<kOp>, static_cast<unsigned>(p.rows), plan_threads(p.hidden / 8), 0, stream, p);
    return check_launch();
}

}  // namespace
}  // namespace l32

// Tier 3: the checked entry.
extern "C" l32_status l32_act_quant(const l32_act_quant_params* params, void* stream) {
    using namespace l32;
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_act_quant_params& p = *params;
    if (p.dtype != L32_DTYPE_BF16) return L32_UNSUPPORTED;
    if (p.q == nullptr || p.scales == nullptr || p.zeros == nullptr || p.x == nullptr) return L32_INVALID_ARGUMENT;
    if (p.rows < 0 || p.hidden <= 0) return L32_INVALID_ARGUMENT;
    const bool norm = p.op == L32_ACT_QUANT_RMS_NORM || p.op == L32_ACT_QUANT_ADD_RMS_NORM;
    if (norm && (p.weight == nullptr || !(p.eps >= 0.f) || !std::isfinite(p.eps))) return L32_INVALID_ARGUMENT;
    if (p.op == L32_ACT_QUANT_ADD_RMS_NORM && p.residual == nullptr) return L32_INVALID_ARGUMENT;
    if (p.op != L32_ACT_QUANT_ROWS && !norm && p.op != L32_ACT_QUANT_SILU_MUL) return L32_INVALID_ARGUMENT;
    if (p.rows > INT_MAX || p.hidden > (int64_t{1} << 30) || p.hidden % 8 != 0) return L32_UNSUPPORTED;
    if (!is_aligned(p.x, 16) || !is_aligned(p.q, 8)) return L32_UNSUPPORTED;
    if (p.out != nullptr && !is_aligned(p.out, 16)) return L32_UNSUPPORTED;
    if (norm && !is_aligned(p.weight, 16)) return L32_UNSUPPORTED;
    if (p.residual != nullptr && !is_aligned(p.residual, 16)) return L32_UNSUPPORTED;
    if (p.rows == 0) return L32_OK;
    const auto s = static_cast<cudaStream_t>(stream);
    switch (p.op) {
        case L32_ACT_QUANT_RMS_NORM: return launch<L32_ACT_QUANT_RMS_NORM>(p, s);
        case L32_ACT_QUANT_ADD_RMS_NORM: return launch<L32_ACT_QUANT_ADD_RMS_NORM>(p, s);
        case L32_ACT_QUANT_SILU_MUL: return launch<L32_ACT_QUANT_SILU_MUL>(p, s);
        default: return launch<L32_ACT_QUANT_ROWS>(p, s);
    }
}
