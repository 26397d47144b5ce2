// kernels/rope.cu: fused QKV split + llama3 RoPE + paged KV-cache write (l32_rope_params in llama32_kernels.h).
//
// Three tiers: the kernel, the launcher that picks the instantiation and block size, and the checked C entry.
//
// One block per token. The block first computes the token's cos/sin table (head_dim / 2 angles) into shared memory,
// once for all its heads, then its threads walk one flat task list:
//   - rotation tasks: W pairs (x[j..j+W], x[j+h..j+h+W]) of one head, for the num_heads q heads (written back in
//     place) and the num_kv_heads k heads (written to k_cache[slot]); the k heads follow the q heads in the row, so
//     both read from row + head * head_dim;
//   - copy tasks: W values of the v part, which is contiguous both in the row and in the cache slot
//     ([num_kv_heads * head_dim]), so it is a flat vector copy.
// A padding token (slot L32_PAD_SLOT) or an out-of-range slot has rotation tasks for its q heads only.
//
// Vector width W = 8 bf16 (16-byte loads and stores) when head_dim / 2 % 8 == 0, qkv_stride % 8 == 0 and the three
// bf16 pointers are 16-byte aligned, else 1. head_dim 64 and 128 are compile-time (kHalf 32 / 64: the task index
// divisions become shifts); other even head_dims up to 512 take the runtime-kHalf instantiations.
// Worked examples at W = 8: 1B (32 q / 8 kv heads, head_dim 64): 40 heads * 4 rotation tasks + 8 * 64 / 8 copy
// tasks = 224 tasks, 224 threads. 3B (24 / 8, head_dim 128): 32 * 8 + 128 = 384 tasks, 384 threads. 90B (64 / 8,
// 128): 72 * 8 + 128 = 704 tasks, 512 threads (two rounds for some).
// Registers from ptxas (CUDA 13.0, sm_80 / sm_90a), no spills, no stack frame: 28-32 in every instantiation;
// shared memory 256 / 512 / 2048 bytes (head_dim 64 / 128 / generic).
//
// Numerics: angle = float(position) * inv_freq[j], the f32 product transformers computes, then sincosf (the precise
// one, not __sinf: angles reach 1.3e5 rad at 128K context, where __sinf's error is unbounded in practice; sincosf
// takes its Payne-Hanek path above 105615 rad). The rotation is computed in f32 from the bf16
// inputs (kernels/common/rope.cuh, uncontracted products and sums, shared with the skinny GEMM's RoPE epilogue)
// and rounded to bf16 once. (HF rounds cos/sin to bf16 and rounds q * cos, rotate_half(q) * sin and their
// sum in bf16, so it may differ from this result by a few bf16 roundings.)
#include <algorithm>
#include <climits>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/rope.cuh"
#include "common/status.cuh"
#include "llama32_kernels.h"

namespace l32 {
namespace {

constexpr int kMaxThreads = 512;
// The largest head_dim / 2 the shared cos/sin table holds (head_dim 512).
constexpr int kMaxHalf = 256;

// W consecutive f32 from shared memory: two LDS.128 for W = 8 (the index is a multiple of 8, the table 16-byte
// aligned), one LDS for W = 1.
template <int W>
__device__ __forceinline__ void load_f32(const float* p, float (&out)[W]) {
    if constexpr (W % 4 == 0) {
#pragma unroll
        for (int i = 0; i < W; i += 4) {
            const float4 v = *reinterpret_cast<const float4*>(p + i);
            out[i] = v.x;
            out[i + 1] = v.y;
            out[i + 2] = v.z;
            out[i + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < W; ++i) out[i] = p[i];
    }
}

// Rotates the W pairs (src[0..W], src[h..h+W]) by the angles whose cos/sin start at cs/sn, in f32, and stores the
// bf16 results at (dst[0..W], dst[h..h+W]). dst may be src (the q heads, in place).
template <int W>
__device__ __forceinline__ void rotate(const bf16* src, bf16* dst, int h, const float* cs, const float* sn) {
    using Vec = BF16Vec<W>;
    const Vec x1 = load_vec(reinterpret_cast<const Vec*>(src));
    const Vec x2 = load_vec(reinterpret_cast<const Vec*>(src + h));
    float c[W], s[W];
    load_f32<W>(cs, c);
    load_f32<W>(sn, s);
    Vec o1, o2;
#pragma unroll
    for (int i = 0; i < W; ++i) {
        float r1, r2;
        rope_rotate(x1.get(i), x2.get(i), c[i], s[i], r1, r2);
        o1.set(i, r1);
        o2.set(i, r2);
    }
    store_vec(reinterpret_cast<Vec*>(dst), o1);
    store_vec(reinterpret_cast<Vec*>(dst + h), o2);
}

// Tier 1. grid = tokens, block = the launcher's threads (a multiple of 32). kHalf = head_dim / 2, or 0: read it
// from the params.
template <int W, int kHalf>
__global__ void __launch_bounds__(kMaxThreads) rope_kv_write_kernel(const __grid_constant__ l32_rope_params p) {
    pdl_begin();
    using Vec = BF16Vec<W>;
    __shared__ __align__(16) float cos_s[kHalf > 0 ? kHalf : kMaxHalf];
    __shared__ __align__(16) float sin_s[kHalf > 0 ? kHalf : kMaxHalf];

    const int64_t t = blockIdx.x;
    const int half = kHalf > 0 ? kHalf : p.head_dim / 2;
    const int d = 2 * half;
    const float pos = static_cast<float>(p.positions[t]);
    for (int j = threadIdx.x; j < half; j += blockDim.x) sincosf(__fmul_rn(pos, p.inv_freq[j]), &sin_s[j], &cos_s[j]);

    const uint32_t slot = p.slot_mapping[t];
    const bool cached = slot < static_cast<uint64_t>(p.num_slots);
    if (!cached && slot != L32_PAD_SLOT && p.bad_slot != nullptr && threadIdx.x == 0) *p.bad_slot = 1u;
    __syncthreads();

    bf16* row = static_cast<bf16*>(p.qkv) + t * p.qkv_stride;
    const int64_t slot_offset = cached ? static_cast<int64_t>(slot) * p.num_kv_heads * d : 0;
    bf16* k_slot = static_cast<bf16*>(p.k_cache) + slot_offset;
    bf16* v_slot = static_cast<bf16*>(p.v_cache) + slot_offset;
    const int vecs_per_half = half / W;
    const int rot_tasks = (p.num_heads + (cached ? p.num_kv_heads : 0)) * vecs_per_half;
    const int tasks = rot_tasks + (cached ? p.num_kv_heads * d / W : 0);
    const bf16* v_src = row + (p.num_heads + p.num_kv_heads) * d;

    for (int task = threadIdx.x; task < tasks; task += blockDim.x) {
        if (task < rot_tasks) {
            const int head = task / vecs_per_half;
            const int j = task % vecs_per_half * W;
            bf16* dst = head < p.num_heads ? row + head * d : k_slot + (head - p.num_heads) * d;
            rotate<W>(row + head * d + j, dst + j, half, cos_s + j, sin_s + j);
        } else {
            const int i = (task - rot_tasks) * W;
            store_vec(reinterpret_cast<Vec*>(v_slot + i), load_vec(reinterpret_cast<const Vec*>(v_src + i)));
        }
    }
}

int64_t round_up_32(int64_t v) { return (v + 31) / 32 * 32; }

// Tier 2: enough threads for one round of tasks at the most heads a token can have (the kv heads cached).
template <int W, int kHalf>
l32_status launch(const l32_rope_params& p, cudaStream_t stream) {
    const int64_t half = p.head_dim / 2;
    const int64_t tasks = (p.num_heads + p.num_kv_heads) * (half / W) + p.num_kv_heads * (2 * half / W);
    const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, round_up_32(tasks)));
    launch_kernel(rope_kv_write_kernel<W, kHalf>, static_cast<unsigned>(p.tokens), threads, 0, stream, p);
    return check_launch();
}

// The closed set of instantiations: W = 8 at head_dim 64, 128 or any head_dim / 2 % 8 == 0; W = 1 for the rest.
l32_status dispatch(const l32_rope_params& p, cudaStream_t stream) {
    const int half = p.head_dim / 2;
    const bool vec8 = half % 8 == 0 && p.qkv_stride % 8 == 0 && is_aligned(p.qkv, 16) && is_aligned(p.k_cache, 16) &&
                      is_aligned(p.v_cache, 16);
    if (!vec8) return launch<1, 0>(p, stream);
    switch (half) {
        case 32: return launch<8, 32>(p, stream);
        case 64: return launch<8, 64>(p, stream);
        default: return launch<8, 0>(p, stream);
    }
}

}  // namespace
}  // namespace l32

// Tier 3: the checked entry.
extern "C" l32_status l32_rope_kv_write(const l32_rope_params* params, void* stream) {
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_rope_params& p = *params;
    if (p.dtype != L32_DTYPE_BF16) return L32_UNSUPPORTED;
    if (p.qkv == nullptr || p.k_cache == nullptr || p.v_cache == nullptr || p.positions == nullptr ||
        p.slot_mapping == nullptr || p.inv_freq == nullptr) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.tokens < 0 || p.num_slots <= 0 || p.num_heads <= 0 || p.num_kv_heads <= 0) return L32_INVALID_ARGUMENT;
    if (p.head_dim <= 0 || p.head_dim % 2 != 0) return L32_INVALID_ARGUMENT;
    const int64_t row = (int64_t{p.num_heads} + 2 * int64_t{p.num_kv_heads}) * p.head_dim;
    if (p.qkv_stride < row) return L32_INVALID_ARGUMENT;
    // The shared cos/sin table holds head_dim / 2 <= 256; a row of at most 2^30 keeps the int task indices clear of
    // overflow; L32_PAD_SLOT must never name a real slot.
    if (p.head_dim > 2 * l32::kMaxHalf || row > (int64_t{1} << 30) || p.tokens > INT_MAX) return L32_UNSUPPORTED;
    if (p.num_slots > int64_t{L32_PAD_SLOT}) return L32_UNSUPPORTED;
    if (p.tokens == 0) return L32_OK;
    return l32::dispatch(p, static_cast<cudaStream_t>(stream));
}
