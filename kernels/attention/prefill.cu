// kernels/attention/prefill.cu: causal flash attention of variable-length query chunks over the paged KV cache
// (l32_paged_prefill_params in llama32_kernels.h). Covers fresh prefill, chunked prefill and prefix reuse: each
// query token attends to the cached positions 0..=its own position, read through its sequence's block table.
//
// Three tiers: the kernel, the launcher (shared-memory opt-in, grid), and the checked C entry.
//
// Tiles. One CTA of 4 warps per (query tile, sequence, kv head): grid (ceil(max_query_len * G / 64), num_seqs,
// num_kv_heads), G = num_heads / num_kv_heads. The GQA group is folded into the query rows: row r of a sequence's
// chunk is token r / G, head kv_head * G + r % G, so a 64-row tile holds 64 / G tokens times all G heads and each
// K/V tile is loaded once for the whole group. Warp w owns rows 16w..16w+15 and keeps its Q fragments in registers.
// The KV loop walks 64-position tiles from 0 to the tile's largest position: 16-byte cp.async into swizzled shared
// memory, two stages (tile t + 1 loads while tile t is used); S = Q K^T and O += P V on the tensor cores
// (mma.m16n8k16 bf16 -> f32, operands by ldmatrix, V transposed by ldmatrix.trans); online softmax in f32 with
// exp2. Causal tile skipping: no tile past the largest position in the CTA is touched, and only tiles that reach
// past the smallest position pay for the mask (each row's own position; rows may hold any positions).
// The output goes through shared memory (the Q tile) and leaves in 16-byte stores.
// CTAs run longest-first (the last query tile, with the most KV tiles, has blockIdx.x = 0).
//
// Shared memory: Q 64 x D + 2 stages x (K + V) 64 x D bf16: 40 KB (D = 64) or 80 KB (D = 128, opted in above 48 KB;
// two CTAs per H100 SM).
// ptxas (CUDA 13.0; sm_80 / sm_89 / sm_90a), 16 B static shared memory:
//   paged_prefill_kernel<64>:   128 / 128 / 128 registers (40 KB dynamic shared memory; 4 CTAs per SM). The launch
//     bound holds it there: with the eighteenth session's cheaper copies (load_kv_tile) ptxas took 130-135
//     otherwise, one CTA per SM less. No spills on sm_80 / sm_89; 8 bytes on sm_90a (where the wgmma kernel is
//     the default).
//   paged_prefill_kernel<128>:  199 / 199 / 207 registers, no spills (80 KB dynamic shared memory; 2 CTAs per SM)
//
// The Hopper path (wgmma, params.kernel = L32_PREFILL_WGMMA) is prefill_sm90.cu; this entry checks for both.
#include <climits>
#include <cmath>
#include <cstdint>

#include "attention/prefill_common.cuh"
#include "attention/prefill_sm90.cuh"
#include "common/attention.cuh"
#include "common/bf16.cuh"
#include "common/status.cuh"
#include "llama32_kernels.h"

namespace l32 {
namespace {

using namespace attn;

// Every size derived from head_dim, read by the kernel and the launcher alike.
template <int D>
struct PrefillTraits {
    static constexpr int kWarps = 4;
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kBlockM = 16 * kWarps;  // folded query rows per CTA
    static constexpr int kBlockN = 64;           // KV positions per tile
    static constexpr int kStages = 2;
    static constexpr int kQElems = kBlockM * D;
    static constexpr int kTileElems = kBlockN * D;
    static constexpr int kSmemBytes = (kQElems + kStages * 2 * kTileElems) * 2;
    static_assert(kSmemBytes <= 100 * 1024, "two CTAs per SM on sm_80 and sm_90");
};

// Tier 1. See the file comment. (prefill_sm90.cu takes its query side and epilogue from prefill_common.cuh; this
// kernel keeps its own copy: through those helpers ptxas gave it 131-134 registers instead of 128 at d64, one CTA
// per SM less.)
template <int D>
__global__ void __launch_bounds__(128, D == 64 ? 4 : 2)
    paged_prefill_kernel(const __grid_constant__ l32_paged_prefill_params p) {
    pdl_begin();
    using T = PrefillTraits<D>;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ int s_pos_min, s_pos_max;
    bf16* sq = reinterpret_cast<bf16*>(smem_raw);
    bf16* skv = sq + T::kQElems;  // stage s: K at skv + 2 s kTileElems, V right after it

    const int seq = blockIdx.y, kv_head = blockIdx.z;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int group = p.num_heads / p.num_kv_heads;
    const int64_t tok_begin = p.cu_seqlens[seq];
    const int rows = static_cast<int>(p.cu_seqlens[seq + 1] - tok_begin) * group;
    const int m0 = static_cast<int>(gridDim.x - 1 - blockIdx.x) * T::kBlockM;
    if (m0 >= rows) return;  // uniform over the CTA: this sequence's chunk is shorter than the grid

    const uint32_t* positions = p.positions + tok_begin;
    if (tid == 0) {
        s_pos_min = INT_MAX;
        s_pos_max = -1;
    }
    __syncthreads();
    if (tid < T::kBlockM && m0 + tid < rows) {
        const int pos = static_cast<int>(positions[(m0 + tid) / group]);
        atomicMin(&s_pos_min, pos);
        atomicMax(&s_pos_max, pos);
    }

    // Q rows: token r / group, head kv_head * group + r % group; rows past the chunk are zero-filled.
    const bf16* q = static_cast<const bf16*>(p.q) + tok_begin * p.q_stride + static_cast<int64_t>(kv_head) * group * D;
#pragma unroll
    for (int i = 0; i < T::kQElems / 8 / T::kThreads; ++i) {
        const int idx = tid + i * T::kThreads;
        const int row = idx / (D / 8), chunk8 = idx % (D / 8);
        const int r = m0 + row;
        const bool valid = r < rows;
        const bf16* src = valid ? q + (r / group) * p.q_stride + (r % group) * D + chunk8 * 8 : q;
        cp_async16(sq + SwizzledTile<D>::offset(row, chunk8), src, valid);
    }
    __syncthreads();
    const int pos_min = s_pos_min, pos_max = s_pos_max;
    const int n_end = pos_max + 1;
    const int num_tiles = (n_end + T::kBlockN - 1) / T::kBlockN;

    const bf16* k_cache = static_cast<const bf16*>(p.k_cache);
    const bf16* v_cache = static_cast<const bf16*>(p.v_cache);
    const uint32_t* table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks_per_seq;
    const int64_t slot_stride = static_cast<int64_t>(p.num_kv_heads) * D;
    load_kv_tile<D, T::kBlockN, T::kThreads>(skv, skv + T::kTileElems, k_cache, v_cache, table, 0, n_end,
                                             p.block_size, slot_stride, kv_head);
    cp_async_commit();

    // This thread's two rows (g and g + 8 of its warp's 16) and their positions; padding rows take pos_max.
    const int g = lane / 4, tq = lane % 4;
    int row_pos[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = m0 + warp * 16 + g + 8 * h;
        row_pos[h] = r < rows ? static_cast<int>(positions[r / group]) : pos_max;
    }

    const float scale_log2 = p.scale * 1.4426950408889634f;
    float o[D / 8][4];
#pragma unroll
    for (int d = 0; d < D / 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    RowState st;
    uint32_t qf[D / 16][4];

    for (int t = 0; t < num_tiles; ++t) {
        const int n0 = t * T::kBlockN;
        if (t + 1 < num_tiles) {
            bf16* next = skv + ((t + 1) % T::kStages) * 2 * T::kTileElems;
            load_kv_tile<D, T::kBlockN, T::kThreads>(next, next + T::kTileElems, k_cache, v_cache, table,
                                                     n0 + T::kBlockN, n_end, p.block_size, slot_stride, kv_head);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (t == 0) load_a_fragments<D>(qf, sq, warp * 16);
        const bf16* sk = skv + (t % T::kStages) * 2 * T::kTileElems;
        const bf16* sv = sk + T::kTileElems;

        float s[T::kBlockN / 8][4];
        qk_scores<D, T::kBlockN / 8>(s, qf, sk, 0);
        if (n0 + T::kBlockN - 1 > pos_min) {
            // The causal boundary crosses this tile for some row: mask key positions past each row's own.
#pragma unroll
            for (int j = 0; j < T::kBlockN / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int key = n0 + j * 8 + 2 * tq + e;
                    if (key > row_pos[0]) s[j][e] = -INFINITY;
                    if (key > row_pos[1]) s[j][2 + e] = -INFINITY;
                }
            }
        }
        online_softmax<T::kBlockN / 8, D / 8>(s, o, st, scale_log2);
        pv_accumulate<D, T::kBlockN / 8>(o, s, sv, 0);
        __syncthreads();  // the next iteration's load overwrites this stage
    }
    finish_row_sums(st);

    // Epilogue: normalize, round to bf16 into this warp's own Q rows (read only by this warp, long done), then
    // 16-byte stores of whole rows.
    const float inv[2] = {st.l[0] > 0.f ? 1.f / st.l[0] : 0.f, st.l[1] > 0.f ? 1.f / st.l[1] : 0.f};
#pragma unroll
    for (int d = 0; d < D / 8; ++d) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = warp * 16 + g + 8 * h;
            *reinterpret_cast<uint32_t*>(sq + SwizzledTile<D>::offset(row, d) + 2 * tq) =
                pack_bf16x2(o[d][2 * h] * inv[h], o[d][2 * h + 1] * inv[h]);
        }
    }
    __syncwarp();
    bf16* out = static_cast<bf16*>(p.out) + tok_begin * p.num_heads * D + static_cast<int64_t>(kv_head) * group * D;
#pragma unroll
    for (int i = 0; i < 16 * (D / 8) / 32; ++i) {
        const int idx = lane + 32 * i;
        const int row = warp * 16 + idx / (D / 8), chunk8 = idx % (D / 8);
        const int r = m0 + row;
        if (r < rows) {
            const BF16Vec<8>* src = reinterpret_cast<const BF16Vec<8>*>(sq + SwizzledTile<D>::offset(row, chunk8));
            BF16Vec<8>* dst = reinterpret_cast<BF16Vec<8>*>(out + static_cast<int64_t>(r / group) * p.num_heads * D +
                                                            (r % group) * D + chunk8 * 8);
            store_vec(dst, load_vec(src));
        }
    }
}

// Tier 2.
template <int D>
l32_status launch(const l32_paged_prefill_params& p, cudaStream_t stream) {
    using T = PrefillTraits<D>;
    return prefill::launch<T::kBlockM, T::kThreads, T::kSmemBytes>(paged_prefill_kernel<D>, p, stream);
}

}  // namespace
}  // namespace l32

// Tier 3: the checked entry.
extern "C" l32_status l32_paged_prefill(const l32_paged_prefill_params* params, void* stream) {
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_paged_prefill_params& p = *params;
    if (p.dtype != L32_DTYPE_BF16) return L32_UNSUPPORTED;
    if (p.out == nullptr || p.q == nullptr || p.k_cache == nullptr || p.v_cache == nullptr ||
        p.positions == nullptr || p.cu_seqlens == nullptr || p.block_tables == nullptr) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.num_tokens < 0 || p.num_seqs <= 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 || p.block_size <= 0 ||
        p.max_blocks_per_seq <= 0 || p.max_query_len <= 0 || (p.num_tokens > 0 && p.max_query_len > p.num_tokens) ||
        !(p.scale > 0.f) || !std::isfinite(p.scale)) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.num_heads % p.num_kv_heads != 0 || p.q_stride < int64_t{p.num_heads} * p.head_dim) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.head_dim != 64 && p.head_dim != 128) return L32_UNSUPPORTED;
    // Folded rows (max_query_len * group) and token indices stay in int; grid y and z stay in range.
    if (p.num_seqs > 65535 || p.num_kv_heads > 65535 || p.num_tokens > INT_MAX ||
        p.max_query_len * (p.num_heads / p.num_kv_heads) > INT_MAX / 2) {
        return L32_UNSUPPORTED;
    }
    if (p.q_stride % 8 != 0 || !l32::is_aligned(p.q, 16) || !l32::is_aligned(p.out, 16) ||
        !l32::is_aligned(p.k_cache, 16) || !l32::is_aligned(p.v_cache, 16)) {
        return L32_UNSUPPORTED;
    }
    if (p.kernel != L32_PREFILL_MMA && p.kernel != L32_PREFILL_WGMMA && p.kernel != L32_PREFILL_WGMMA_WS) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.num_tokens == 0) return L32_OK;
    const auto s = static_cast<cudaStream_t>(stream);
    if (p.kernel == L32_PREFILL_WGMMA) return l32::launch_paged_prefill_wgmma(p, s);
    if (p.kernel == L32_PREFILL_WGMMA_WS) return l32::launch_paged_prefill_wgmma_ws(p, s);
    return p.head_dim == 64 ? l32::launch<64>(p, s) : l32::launch<128>(p, s);
}
