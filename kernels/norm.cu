// kernels/norm.cu: RMSNorm and fused residual-add + RMSNorm over bf16 rows (l32_norm_params in llama32_kernels.h).
//
// Three tiers: the kernel, the launcher that turns a NormPlan into template arguments, and the checked C entry.
//
// One block per row. plan_norm() picks, per call:
//   - the vector width W: 8 bf16 (one 16-byte load) when hidden % 8 == 0 and every row start is 16-byte aligned,
//     else 1 (any hidden, any alignment);
//   - kVecs, the vectors each thread keeps in registers from the load to the write, the smallest of {1, 2, 4, 8} that
//     covers the row with at most kMaxThreads threads, so the row is read from memory once. Longer rows (hidden over
//     8 * 8 * 512 = 32768) and every W = 1 row are streamed twice instead (kVecs = 0); the second read mostly hits L2.
// Worked examples at W = 8: hidden 2048 = 256 vectors: kVecs 1, 256 threads. 3072: kVecs 1, 384 threads.
// 4096: kVecs 1, 512 threads. 8192: kVecs 2, 512 threads. 16384: kVecs 4, 512 threads. A row of hidden <= 256 is a
// single warp, whose reduction needs no shared memory, so block-per-row becomes warp-per-row there.
//
// Numerics follow HF: fp32 sum of squares, the residual stream rounded to bf16, the normalized row rounded to bf16
// before the weight multiply, then the product rounded to bf16.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/reduce.cuh"
#include "common/rmsnorm.cuh"
#include "common/status.cuh"
#include "llama32_kernels.h"

namespace l32 {
namespace {

// 512 threads per block at most. Registers from ptxas (CUDA 13.0, sm_80 / sm_90a), no spills: kVecs = 1: 28 / 30,
// so 4 blocks (2048 threads) stay resident per SM; kVecs = 2 (hidden 8192): 31 / 47, 4 / 2 blocks;
// kVecs = 4: 32 / 48; kVecs = 8: 52 / 82, 1 block on sm_90a.
constexpr int kMaxThreads = kNormMaxThreads;

// Vector c of the row: x, or with the fused add bf16(residual + x), written back to the residual.
template <int W, bool kResidual>
__device__ __forceinline__ BF16Vec<W> load_input(const BF16Vec<W>* x, BF16Vec<W>* residual, int c) {
    BF16Vec<W> h = load_vec(x + c);
    if constexpr (kResidual) {
        h = add_round(load_vec(residual + c), h);
        store_vec(residual + c, h);
    }
    return h;
}

// bf16(w * bf16(h * inv)) (common/rmsnorm.cuh).
template <int W>
__device__ __forceinline__ BF16Vec<W> scale(const BF16Vec<W>& h, const BF16Vec<W>& w, float inv) {
    return norm_scale(h, w, inv);
}

// Tier 1. grid = rows, block = the plan's threads (a multiple of 32). See the file comment for W and kVecs.
template <int W, int kVecs, bool kResidual>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_kernel(const __grid_constant__ l32_norm_params p) {
    pdl_begin();
    using Vec = BF16Vec<W>;
    const int64_t row = blockIdx.x;
    const int n = static_cast<int>(p.hidden / W);
    const Vec* x = reinterpret_cast<const Vec*>(static_cast<const bf16*>(p.x) + row * p.x_stride);
    Vec* residual = nullptr;
    if constexpr (kResidual) residual = reinterpret_cast<Vec*>(static_cast<bf16*>(p.residual) + row * p.residual_stride);
    const Vec* weight = static_cast<const Vec*>(p.weight);
    Vec* out = reinterpret_cast<Vec*>(static_cast<bf16*>(p.out) + row * p.out_stride);
    const float inv_hidden = 1.f / static_cast<float>(p.hidden);

    float sum_sq = 0.f;
    if constexpr (kVecs > 0) {
        // For the Llama sizes (kVecs <= 2) the weight is loaded with the row, so its latency hides behind the
        // reduction's barrier. Longer rows load it after the barrier: early, kVecs = 8 spills on sm_90a.
        constexpr bool kEarlyWeight = kVecs <= 2;
        Vec h[kVecs], w[kVecs];
#pragma unroll
        for (int i = 0; i < kVecs; ++i) {
            const int c = threadIdx.x + i * blockDim.x;
            if (c < n) {
                h[i] = load_input<W, kResidual>(x, residual, c);
                if constexpr (kEarlyWeight) w[i] = load_vec(weight + c);
                sum_sq += sum_squares(h[i]);
            }
        }
        const float inv = rms_inv(block_sum(sum_sq), inv_hidden, p.eps);
#pragma unroll
        for (int i = 0; i < kVecs; ++i) {
            const int c = threadIdx.x + i * blockDim.x;
            if (c < n) store_vec(out + c, scale(h[i], kEarlyWeight ? w[i] : load_vec(weight + c), inv));
        }
    } else {
        for (int c = threadIdx.x; c < n; c += blockDim.x) sum_sq += sum_squares(load_input<W, kResidual>(x, residual, c));
        const float inv = rms_inv(block_sum(sum_sq), inv_hidden, p.eps);
        // Second pass: each thread re-reads the vectors it read (or, with the fused add, wrote) in the first.
        for (int c = threadIdx.x; c < n; c += blockDim.x) {
            Vec h;
            if constexpr (kResidual) {
                h = load_vec(residual + c);
            } else {
                h = load_vec(x + c);
            }
            store_vec(out + c, scale(h, load_vec(weight + c), inv));
        }
    }
}

// What plan_norm() chose for one call.
struct NormPlan {
    int width;    // bf16 per vector: 8 or 1
    int vecs;     // vectors per thread held in registers, in {1, 2, 4, 8}; 0: stream the row twice
    int threads;  // block size, a multiple of 32, at most kMaxThreads
};

int64_t round_up_32(int64_t v) { return (v + 31) / 32 * 32; }

// The one selector: the entry validates, this decides, the launcher follows it (see the file comment).
NormPlan plan_norm(const l32_norm_params& p) {
    const bool residual_ok = p.residual == nullptr || (p.residual_stride % 8 == 0 && is_aligned(p.residual, 16));
    const bool vec8 = p.hidden % 8 == 0 && p.x_stride % 8 == 0 && p.out_stride % 8 == 0 && is_aligned(p.x, 16) &&
                      is_aligned(p.out, 16) && is_aligned(p.weight, 16) && residual_ok;
    const int64_t n = vec8 ? p.hidden / 8 : p.hidden;
    if (vec8) {
        // The split the gemv's norm prologue reproduces (common/rmsnorm.cuh).
        const NormSplit split = norm_split_vec8(n);
        if (split.per_thread > 0) return {8, split.per_thread, split.threads};
    }
    return {vec8 ? 8 : 1, 0, static_cast<int>(std::min<int64_t>(kMaxThreads, round_up_32(n)))};
}

// Tier 2.
template <int W, int kVecs, bool kResidual>
l32_status launch(const l32_norm_params& p, int threads, cudaStream_t stream) {
    launch_kernel(rms_norm_kernel<W, kVecs, kResidual>, static_cast<unsigned>(p.rows), threads, 0, stream, p);
    return check_launch();
}

// The closed set of instantiations: W = 8 with kVecs in {0, 1, 2, 4, 8}, and W = 1 streamed.
template <bool kResidual>
l32_status dispatch(const l32_norm_params& p, const NormPlan& plan, cudaStream_t stream) {
    if (plan.width == 1) return launch<1, 0, kResidual>(p, plan.threads, stream);
    switch (plan.vecs) {
        case 0: return launch<8, 0, kResidual>(p, plan.threads, stream);
        case 1: return launch<8, 1, kResidual>(p, plan.threads, stream);
        case 2: return launch<8, 2, kResidual>(p, plan.threads, stream);
        case 4: return launch<8, 4, kResidual>(p, plan.threads, stream);
        case 8: return launch<8, 8, kResidual>(p, plan.threads, stream);
        default: return L32_UNSUPPORTED;
    }
}

}  // namespace
}  // namespace l32

// Tier 3: the checked entry.
extern "C" l32_status l32_norm(const l32_norm_params* params, void* stream) {
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_norm_params& p = *params;
    if (p.dtype != L32_DTYPE_BF16) return L32_UNSUPPORTED;
    if (p.out == nullptr || p.x == nullptr || p.weight == nullptr) return L32_INVALID_ARGUMENT;
    if (p.rows < 0 || p.hidden <= 0 || !(p.eps >= 0.f) || !std::isfinite(p.eps)) return L32_INVALID_ARGUMENT;
    if (p.x_stride < p.hidden || p.out_stride < p.hidden) return L32_INVALID_ARGUMENT;
    if (p.residual != nullptr && p.residual_stride < p.hidden) return L32_INVALID_ARGUMENT;
    // hidden <= 2^30 keeps the kernel's int column indices clear of overflow (c + blockDim.x < 2^31).
    if (p.rows > INT_MAX || p.hidden > (int64_t{1} << 30)) return L32_UNSUPPORTED;
    if (p.rows == 0) return L32_OK;
    const l32::NormPlan plan = l32::plan_norm(p);
    const auto s = static_cast<cudaStream_t>(stream);
    return p.residual != nullptr ? l32::dispatch<true>(p, plan, s) : l32::dispatch<false>(p, plan, s);
}
