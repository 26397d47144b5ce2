// kernels/vision/attention.cu: generic attention over gathered keys (l32_gather_attention_params in
// llama32_kernels.h), f32 on the CUDA cores, any head_dim that is a multiple of 8 up to 256.
//
// One warp per (query token, head); 4 warps per block. The query row is staged in the warp's shared memory as f32.
// Keys are walked in chunks of 32: lane l scores key j0 + l (a dot product over head_dim with 16-byte loads), the
// warp updates its online-softmax state (max and sum in f32, shared by all lanes), then every lane accumulates
// head dims lane, lane + 32, ... over the chunk's keys, broadcasting each probability with a shuffle. No tensor
// cores: this kernel is the reference-grade path for the vision encoder (head_dim 80) and for text models whose
// head_dim the tensor-core kernels do not take; the paged prefill/decode kernels serve head_dim 64 and 128.
//
// The mask is transformers' additive one: -FLT_MAX added where both the query's and the key's flag are set, so a
// flagged query whose keys are all flagged gets a uniform softmax, as in the f32 reference.
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

constexpr int kWarps = 4;
constexpr int kMaxHeadDim = 256;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullWarp, v, offset));
    return v;
}

// C = ceil(head_dim / 32): the head dims each lane accumulates.
template <int C>
__global__ void __launch_bounds__(32 * kWarps) gather_attention_kernel(const __grid_constant__ l32_gather_attention_params p) {
    pdl_begin();
    __shared__ float sq[kWarps][kMaxHeadDim];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t task = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
    if (task >= p.tokens * p.num_heads) return;  // whole warps only: no block-wide barrier below
    const int64_t i = task / p.num_heads;
    const int h = static_cast<int>(task % p.num_heads);
    const int D = p.head_dim;
    const int g = h / (p.num_heads / p.num_kv_heads);

    const bf16* q = static_cast<const bf16*>(p.q) + i * p.q_stride + static_cast<int64_t>(h) * D;
    for (int d = lane; d < D; d += 32) sq[warp][d] = __bfloat162float(q[d]);
    __syncwarp();

    const uint32_t seq = p.seq_of_query[i];
    const int64_t ctx = static_cast<int64_t>(p.positions[i]) + 1;
    const uint32_t* table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks_per_seq;
    const bool q_flag = p.query_flags != nullptr && p.query_flags[i] != 0;
    const bf16* kbase = static_cast<const bf16*>(p.k) + static_cast<int64_t>(g) * D;
    const bf16* vbase = static_cast<const bf16*>(p.v) + static_cast<int64_t>(g) * D;

    float m = -INFINITY, l = 0.f;
    float acc[C];
#pragma unroll
    for (int c = 0; c < C; ++c) acc[c] = 0.f;

    for (int64_t j0 = 0; j0 < ctx; j0 += 32) {
        const int64_t j = j0 + lane;
        int64_t slot = -1;
        float s = -INFINITY;
        if (j < ctx) {
            const int64_t blk = j / p.block_size;
            const int64_t cand = static_cast<int64_t>(table[blk]) * p.block_size + j % p.block_size;
            if (cand < p.num_slots) {
                slot = cand;
                const BF16Vec<8>* kr = reinterpret_cast<const BF16Vec<8>*>(kbase + slot * p.kv_stride);
                float dot = 0.f;
                for (int c8 = 0; c8 < D / 8; ++c8) {
                    const BF16Vec<8> kv = load_vec(kr + c8);
#pragma unroll
                    for (int e = 0; e < 8; ++e) dot = fmaf(sq[warp][c8 * 8 + e], kv.get(e), dot);
                }
                s = dot * p.scale;
                if (q_flag && p.key_flags[slot] != 0) s += -FLT_MAX;
            }
        }
        const float cm = warp_max(s);
        if (cm == -INFINITY) continue;  // every key of the chunk skipped (out-of-range slots): uniform over the warp
        const float mn = fmaxf(m, cm);
        const float alpha = m == -INFINITY ? 0.f : expf(m - mn);
        const float prob = slot >= 0 ? expf(s - mn) : 0.f;
        l = l * alpha + warp_sum(prob);
#pragma unroll
        for (int c = 0; c < C; ++c) acc[c] *= alpha;
        m = mn;
        const int n = static_cast<int>(ctx - j0 < 32 ? ctx - j0 : 32);
        for (int t = 0; t < n; ++t) {
            const float pt = __shfl_sync(kFullWarp, prob, t);
            const int64_t st = __shfl_sync(kFullWarp, slot, t);
            if (st < 0) continue;  // uniform: every lane got the same st
            const bf16* vr = vbase + st * p.kv_stride;
#pragma unroll
            for (int c = 0; c < C; ++c) {
                const int d = lane + 32 * c;
                if (d < D) acc[c] = fmaf(pt, __bfloat162float(vr[d]), acc[c]);
            }
        }
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    bf16* out = static_cast<bf16*>(p.out) + i * p.out_stride + static_cast<int64_t>(h) * D;
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int d = lane + 32 * c;
        if (d < D) out[d] = __float2bfloat16_rn(acc[c] * inv);
    }
}

template <int C>
l32_status launch(const l32_gather_attention_params& p, cudaStream_t stream) {
    const int64_t tasks = p.tokens * p.num_heads;
    const int64_t blocks = (tasks + kWarps - 1) / kWarps;
    launch_kernel(gather_attention_kernel<C>, static_cast<unsigned>(blocks), 32 * kWarps, 0, stream, p);
    return check_launch();
}

}  // namespace
}  // namespace l32

extern "C" l32_status l32_gather_attention(const l32_gather_attention_params* params, void* stream) {
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_gather_attention_params& p = *params;
    if (p.out == nullptr || p.q == nullptr || p.k == nullptr || p.v == nullptr || p.seq_of_query == nullptr ||
        p.positions == nullptr || p.block_tables == nullptr || ((p.key_flags == nullptr) != (p.query_flags == nullptr))) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.tokens < 0 || p.num_heads < 1 || p.num_kv_heads < 1 || p.num_heads % p.num_kv_heads != 0 ||
        p.block_size < 1 || p.max_blocks_per_seq < 1 || p.num_slots < 0 || !(p.scale > 0.f) ||
        !std::isfinite(p.scale)) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.head_dim < 8 || p.head_dim > l32::kMaxHeadDim || p.head_dim % 8 != 0) return L32_UNSUPPORTED;
    if (p.q_stride < int64_t{p.num_heads} * p.head_dim || p.out_stride < int64_t{p.num_heads} * p.head_dim ||
        p.kv_stride < int64_t{p.num_kv_heads} * p.head_dim) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.kv_stride % 8 != 0 || !l32::is_aligned(p.k, 16) || !l32::is_aligned(p.v, 16)) return L32_UNSUPPORTED;
    if (p.tokens * p.num_heads > int64_t{INT_MAX}) return L32_UNSUPPORTED;
    if (p.tokens == 0) return L32_OK;
    const auto s = static_cast<cudaStream_t>(stream);
    const int chunks = (p.head_dim + 31) / 32;
    switch (chunks) {
        case 1: return l32::launch<1>(p, s);
        case 2: return l32::launch<2>(p, s);
        case 3: return l32::launch<3>(p, s);
        case 4: return l32::launch<4>(p, s);
        default: return l32::launch<8>(p, s);
    }
}
