// kernels/activation.cu: SwiGLU, out[r, j] = silu(gate_up[r, j]) * gate_up[r, inter + j]
// (l32_activation_params in llama32_kernels.h).
//
// Three tiers: the kernel, the launcher that picks the vector width and grid, and the checked C entry.
//
// Memory bound: each input element is read once, each output written once (3 * 2 bytes per output). Grid (column
// blocks, row groups): blockIdx.x covers a strip of the row's vectors, blockIdx.y walks rows with a stride of
// gridDim.y (at most 65535), so no thread divides by a runtime size. Vector width W = 8 bf16 (one 16-byte load of
// gate, one of up, one 16-byte store) when inter % 8 == 0 and both pointers are 16-byte aligned, else 1.
// Worked examples at W = 8, 256 threads: 1B/3B inter 8192 = 1024 vectors: 4 blocks per row; 11B inter 14336:
// 7 blocks; 90B 28672: 14 blocks. A decode step (rows = batch) is a handful of blocks: latency bound either way.
//
// Numerics: silu and the product in f32 from the bf16 inputs, rounded to bf16 once. HF computes
// `act_fn(gate_proj(x)) * up_proj(x)` in bf16: silu is rounded to bf16, then the bf16 product is rounded again, so
// HF's result may differ from this one by one more bf16 rounding; this kernel is the closer of the two to the exact
// value.
//
// Registers from ptxas (CUDA 13.0, sm_80 / sm_90a), no spills, no stack frame: W = 8: 30 / 32, W = 1: 23 / 25.
#include <algorithm>
#include <climits>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/silu.cuh"
#include "common/status.cuh"
#include "llama32_kernels.h"

namespace l32 {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

// Tier 1. grid = (ceil(inter / W / kThreads), min(rows, 65535)), block = kThreads.
template <int W>
__global__ void __launch_bounds__(kThreads) silu_mul_kernel(const __grid_constant__ l32_activation_params p) {
    pdl_begin();
    using Vec = BF16Vec<W>;
    const int n = static_cast<int>(p.inter / W);
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n) return;
    for (int64_t r = blockIdx.y; r < p.rows; r += gridDim.y) {
        const Vec* gate = reinterpret_cast<const Vec*>(static_cast<const bf16*>(p.gate_up) + r * 2 * p.inter);
        Vec* out = reinterpret_cast<Vec*>(static_cast<bf16*>(p.out) + r * p.inter);
        const Vec g = load_vec(gate + c);
        const Vec u = load_vec(gate + n + c);
        Vec o;
#pragma unroll
        for (int i = 0; i < W; ++i) o.set(i, silu_mul_f32(g.get(i), u.get(i)));
        store_vec(out + c, o);
    }
}

// Tier 2.
template <int W>
l32_status launch(const l32_activation_params& p, cudaStream_t stream) {
    const int64_t n = p.inter / W;
    const dim3 grid(static_cast<unsigned>((n + kThreads - 1) / kThreads),
                    static_cast<unsigned>(std::min(p.rows, kMaxGridY)));
    launch_kernel(silu_mul_kernel<W>, grid, kThreads, 0, stream, p);
    return check_launch();
}

}  // namespace
}  // namespace l32

// Tier 3: the checked entry.
extern "C" l32_status l32_silu_mul(const l32_activation_params* params, void* stream) {
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_activation_params& p = *params;
    if (p.dtype != L32_DTYPE_BF16) return L32_UNSUPPORTED;
    if (p.out == nullptr || p.gate_up == nullptr) return L32_INVALID_ARGUMENT;
    if (p.rows < 0 || p.inter <= 0) return L32_INVALID_ARGUMENT;
    // inter <= 2^30 keeps the int vector index (c + n < 2^31) clear of overflow.
    if (p.rows > INT_MAX || p.inter > (int64_t{1} << 30)) return L32_UNSUPPORTED;
    if (p.rows == 0) return L32_OK;
    const auto s = static_cast<cudaStream_t>(stream);
    // The up half starts inter elements after the gate: a multiple of 8 keeps it 16-byte aligned too.
    const bool vec8 = p.inter % 8 == 0 && l32::is_aligned(p.out, 16) && l32::is_aligned(p.gate_up, 16);
    return vec8 ? l32::launch<8>(p, s) : l32::launch<1>(p, s);
}
