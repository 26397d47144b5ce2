// kernels/embedding.cu: the token-embedding gather, out[i, :] = table[ids[i], :] (l32_embedding_params in
// llama32_kernels.h).
//
// Three tiers: the kernel, the launcher that picks the vector width and block size, and the checked C entry.
//
// A pure copy: each output row is read once from the table and written once, bit for bit. Grid (column blocks,
// token groups): blockIdx.x covers a strip of the row's vectors, blockIdx.y walks tokens with a stride of gridDim.y
// (at most 65535), so any token count launches. Vector width W = 8 bf16 (one 16-byte LDG/STG) when hidden % 8 == 0
// and the table and out are 16-byte aligned, else 1. Worked examples at W = 8: hidden 2048 = 256 vectors: one
// 256-thread block per token; hidden 3072 = 384 vectors: 384 threads; hidden 8192 (90B) = 1024: two 512-thread blocks.
//
// An id >= vocab (the Rust side validates ids first; this is defence in depth) reads nothing: its row is zeroed and
// the optional flag is set.
//
// An int8 table (p.scales set: an int8-embeddings model keeps its table in int8 on the device, half the bytes) is
// gathered the same way, W int8 per load (8 bytes at W = 8), each written as bf16(scale * q): the f32 product is
// exact (a bf16 scale times an int8), so the row is bit for bit what a bf16 upload of the f32 table would give.
//
// Registers from ptxas (CUDA 13.0, sm_80 / sm_90a), no spills, no stack frame: W = 8: 18 / 18, W = 1: 16 / 18.
#include <algorithm>
#include <climits>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/status.cuh"
#include "llama32_kernels.h"

namespace l32 {
namespace {

// 512 threads at most, so a 4096-wide row (512 vectors) is one block.
constexpr int kMaxThreads = 512;
// gridDim.y limit; larger token counts loop.
constexpr int64_t kMaxGridY = 65535;

// Tier 1. grid = (ceil(hidden / W / blockDim.x), min(tokens, 65535)), block = a multiple of 32 threads.
// W int8 values, loaded together (8 bytes at W = 8).
template <int W>
struct alignas(W) I8Vec {
    int8_t v[W];
};

// Vector c of int8 row `row` (of `hidden` values) times `scale`, each product rounded to bf16.
template <int W>
__device__ __forceinline__ BF16Vec<W> int8_row_vec(const int8_t* table, int64_t row, int64_t hidden, int c,
                                                   float scale) {
    const I8Vec<W> q = reinterpret_cast<const I8Vec<W>*>(table + row * hidden)[c];
    BF16Vec<W> out;
#pragma unroll
    for (int i = 0; i < W; ++i) out.set(i, scale * static_cast<float>(q.v[i]));
    return out;
}

template <int W, bool kInt8>
__global__ void __launch_bounds__(kMaxThreads) embedding_kernel(const __grid_constant__ l32_embedding_params p) {
    pdl_begin();
    using Vec = BF16Vec<W>;
    const int n = static_cast<int>(p.hidden / W);
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n) return;
    for (int64_t t = blockIdx.y; t < p.tokens; t += gridDim.y) {
        const uint32_t id = p.ids[t];
        Vec* out = reinterpret_cast<Vec*>(static_cast<bf16*>(p.out) + t * p.hidden);
        if (id < static_cast<uint64_t>(p.vocab)) {
            if constexpr (kInt8) {
                const float scale = __bfloat162float(static_cast<const bf16*>(p.scales)[id]);
                store_vec(out + c, int8_row_vec<W>(static_cast<const int8_t*>(p.table), id, p.hidden, c, scale));
            } else {
                const Vec* row = reinterpret_cast<const Vec*>(static_cast<const bf16*>(p.table) + id * p.hidden);
                store_vec(out + c, load_vec(row + c));
            }
        } else {
            Vec zero;
#pragma unroll
            for (int i = 0; i < W; ++i) zero.set(i, 0.f);
            store_vec(out + c, zero);
            // Every writer stores the same 1: no atomic needed.
            if (p.bad_id != nullptr && c == 0) *p.bad_id = 1u;
        }
    }
}

int64_t round_up_32(int64_t v) { return (v + 31) / 32 * 32; }

// Tier 2: W = 8 when hidden % 8 == 0 and both row arrays are 16-byte aligned (see the file comment).
template <int W>
l32_status launch(const l32_embedding_params& p, cudaStream_t stream) {
    const int64_t n = p.hidden / W;
    const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, round_up_32(n)));
    const dim3 grid(static_cast<unsigned>((n + threads - 1) / threads),
                    static_cast<unsigned>(std::min(p.tokens, kMaxGridY)));
    if (p.scales != nullptr) {
        launch_kernel(embedding_kernel<W, true>, grid, threads, 0, stream, p);
    } else {
        launch_kernel(embedding_kernel<W, false>, grid, threads, 0, stream, p);
    }
    return check_launch();
}

}  // namespace
}  // namespace l32

// Tier 3: the checked entry.
extern "C" l32_status l32_embedding(const l32_embedding_params* params, void* stream) {
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_embedding_params& p = *params;
    if (p.dtype != L32_DTYPE_BF16) return L32_UNSUPPORTED;
    if (p.out == nullptr || p.table == nullptr || p.ids == nullptr) return L32_INVALID_ARGUMENT;
    if (p.tokens < 0 || p.hidden <= 0 || p.vocab <= 0) return L32_INVALID_ARGUMENT;
    // hidden <= 2^30 keeps the int column index clear of overflow; grid.x = hidden / 32 at most fits easily.
    if (p.tokens > INT_MAX || p.hidden > (int64_t{1} << 30)) return L32_UNSUPPORTED;
    if (p.tokens == 0) return L32_OK;
    const auto s = static_cast<cudaStream_t>(stream);
    // An int8 row of 8 values is 8 bytes.
    const bool vec8 = p.hidden % 8 == 0 && l32::is_aligned(p.out, 16) &&
                      l32::is_aligned(p.table, p.scales != nullptr ? 8 : 16);
    return vec8 ? l32::launch<8>(p, s) : l32::launch<1>(p, s);
}
