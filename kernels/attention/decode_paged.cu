// kernels/attention/decode_paged.cu: fused-GQA split-KV decode over the paged KV cache (l32_paged_decode_params in
// llama32_kernels.h), plus the merge of the splits.
//
// Three tiers: the kernels, the launcher that picks the instantiation, and the checked C entry.
//
// Decode kernel. One CTA per (KV split, kv head, sequence): grid (num_splits, num_kv_heads, num_seqs), kWarps warps.
// The CTA owns every query head of its kv head (the GQA group, G <= 16), so each K/V tile is read from memory once
// for the whole group: Q is a 16-row A operand (rows >= G are zeros) and the scores come from the tensor cores
// (mma.m16n8k16 bf16 -> f32). The CTA walks its split's positions in tiles of kBlockN = 16 * kWarps tokens, copied
// with 16-byte cp.async into swizzled shared memory, two stages deep (tile t + 1 loads while tile t is used);
// warp w takes tokens 16w..16w+15 of every tile and keeps its own online-softmax state (m, l, 16 x D accumulators).
// At the end the warps' states are merged through shared memory; with one split the result is normalized and
// written to `out`, otherwise (m, l, unnormalized acc) go to the workspace in f32 and merge_splits_kernel combines
// them: grid (num_heads, num_seqs), head_dim threads. With p.fused_merge (LLAMA32_DECODE_MERGE=fused; bit-equal but
// slower on an H200, 2026-11-28: 0.995 against 0.967 ms a 1B batch-1 step) there is no second kernel: each CTA fences its partials and counts itself on its (sequence, kv head)'s
// counter in p.merge_counters; the CTA that completes the count resets it and merges the group's heads with the merge
// kernel's arithmetic in its order (merge_split_output), so the bits are the same. It saves the merge launch, which
// matters where splitting short contexts at small batch might pay (LLAMA32_DECODE_SPLIT_POSITIONS).
//
// Split policy: the caller picks num_splits (ops::cuda::attention::decode_num_splits: enough CTAs for about two
// per SM, at least 256 positions per split). Each sequence cuts its own context into num_splits chunks of
// ceil(ctx / num_splits) positions rounded up to a tile, so any context length is correct for any num_splits (a
// captured CUDA graph replays with new lengths); splits past the end of a short context write an empty state.
//
// Instantiations: head_dim 64 with 4 warps (64-token tiles), head_dim 128 with 2 warps (32-token tiles); 34 and
// 36 KB of dynamic shared memory per CTA. Registers then bound the residency on an H100 SM: 5 CTAs (d64; 4 at the
// 116 registers sm_90a took before the eighteenth session) or 6 CTAs (d128), so batch 64 x 8 kv heads = 512 CTAs
// fits in one wave of 132 SMs either way.
// ptxas (CUDA 13.0; sm_80 / sm_89 / sm_90a), no spills, 0-byte stack frames:
//   paged_decode_kernel<64, 4>:   93 / 93 / 96 registers, 34816 B dynamic + 512 B static shared memory
//   paged_decode_kernel<128, 2>:  159 / 159 / 163 registers, 36864 B dynamic + 256 B static shared memory
//   merge_splits_kernel<64|128>:  32 / 39 / 32 registers
//   the fused-merge instances (kFused) take the registers of their merge-kernel twins, plus 16 B of static shared memory
#include <climits>
#include <cmath>
#include <cstdint>

#include "attention/decode_device.cuh"
#include "common/status.cuh"
#include "llama32_kernels.h"

namespace l32 {
namespace {

using namespace decode_dev;

// Tier 1a: the split decode of CTA (split, kv head, sequence) = blockIdx (decode_device.cuh). kFused: with
// num_splits > 1 the last CTA of each (sequence, kv head) to finish merges its group's splits (p.fused_merge).
// kStages: see DecodeTraits; the same bits at either.
template <int D, int kWarps, bool kFused, int kStages>
__global__ void __launch_bounds__(32 * kWarps) paged_decode_kernel(const __grid_constant__ l32_paged_decode_params p) {
    pdl_begin();
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ float s_m[kWarps][kMaxGroup], s_l[kWarps][kMaxGroup];
    decode_split<D, kWarps, kFused, kStages>(p, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, smem_raw, s_m, s_l,
                                             CtaSync{});
}

// Tier 1b: combines the splits of one (head, sequence): grid (num_heads, num_seqs), D threads, one per dimension.
template <int D>
__global__ void __launch_bounds__(D) merge_splits_kernel(const __grid_constant__ l32_paged_decode_params p) {
    pdl_begin();
    const int head = blockIdx.x, seq = blockIdx.y, d = threadIdx.x;
    merge_split_output<D, false>(p, static_cast<const float*>(p.workspace), seq, head, d);
}

// Tier 2.
template <int D, int kWarps, int kStages>
l32_status launch(const l32_paged_decode_params& p, cudaStream_t stream) {
    using T = DecodeTraits<D, kWarps, kStages>;
    const dim3 grid(static_cast<unsigned>(p.num_splits), static_cast<unsigned>(p.num_kv_heads),
                    static_cast<unsigned>(p.num_seqs));
    const bool fused = p.fused_merge != 0 && p.num_splits > 1;
    const auto kernel =
        fused ? paged_decode_kernel<D, kWarps, true, kStages> : paged_decode_kernel<D, kWarps, false, kStages>;
    if constexpr (kStages > 2) {
        if (const l32_status s = allow_dynamic_smem(kernel, T::kSmemBytes); s != L32_OK) return s;
    }
    launch_kernel(kernel, grid, T::kThreads, T::kSmemBytes, stream, p);
    if (fused) return check_launch();
    l32_status status = check_launch();
    if (status != L32_OK || p.num_splits == 1) return status;
    const dim3 merge_grid(static_cast<unsigned>(p.num_heads), static_cast<unsigned>(p.num_seqs));
    launch_kernel(merge_splits_kernel<D>, merge_grid, D, 0, stream, p);
    return check_launch();
}

}  // namespace
}  // namespace l32

// Tier 3: the checked entry.
extern "C" l32_status l32_paged_decode(const l32_paged_decode_params* params, void* stream) {
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_paged_decode_params& p = *params;
    if (p.dtype != L32_DTYPE_BF16) return L32_UNSUPPORTED;
    if (p.out == nullptr || p.q == nullptr || p.k_cache == nullptr || p.v_cache == nullptr ||
        p.positions == nullptr || p.block_tables == nullptr) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.num_seqs < 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 || p.block_size <= 0 ||
        p.max_blocks_per_seq <= 0 || p.num_splits <= 0 || !(p.scale > 0.f) || !std::isfinite(p.scale)) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.num_heads % p.num_kv_heads != 0 || p.q_stride < int64_t{p.num_heads} * p.head_dim) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.head_dim != 64 && p.head_dim != 128) return L32_UNSUPPORTED;
    if (p.num_heads / p.num_kv_heads > l32::kMaxGroup || p.num_splits > l32::kMaxSplits) return L32_UNSUPPORTED;
    if (p.num_seqs > 65535 || p.num_kv_heads > 65535 || p.num_heads > 65535) return L32_UNSUPPORTED;
    if (p.q_stride % 8 != 0 || !l32::is_aligned(p.q, 16) || !l32::is_aligned(p.out, 16) ||
        !l32::is_aligned(p.k_cache, 16) || !l32::is_aligned(p.v_cache, 16)) {
        return L32_UNSUPPORTED;
    }
    if (p.num_splits > 1 && (p.workspace == nullptr || !l32::is_aligned(p.workspace, 16))) return L32_INVALID_ARGUMENT;
    const bool fused = p.fused_merge != 0 && p.num_splits > 1;
    if (fused && (p.merge_counters == nullptr || !l32::is_aligned(p.merge_counters, 4))) return L32_INVALID_ARGUMENT;
    if (p.stages != 0 && p.stages != 2 && p.stages != 3) return L32_INVALID_ARGUMENT;
    if (p.num_seqs == 0) return L32_OK;
    const auto s = static_cast<cudaStream_t>(stream);
    using l32::kDecodeWarps;
    if (p.stages == 3) {
        return p.head_dim == 64 ? l32::launch<64, kDecodeWarps<64>, 3>(p, s)
                                : l32::launch<128, kDecodeWarps<128>, 3>(p, s);
    }
    return p.head_dim == 64 ? l32::launch<64, kDecodeWarps<64>, 2>(p, s) : l32::launch<128, kDecodeWarps<128>, 2>(p, s);
}
