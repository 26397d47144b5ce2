// kernels/attention/decode_paged.cu's device code: the split decode of one (KV split, kv head, sequence) and the
// merge of the splits (that file's comment describes them), shared with the persistent decode stack
// (kernels/decode_layers.cu), which runs the same code as a group of warps of a larger block: the same bits.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/attention.cuh"
#include "common/bf16.cuh"
#include "common/last_block.cuh"
#include "common/sync.cuh"
#include "llama32_kernels.h"

namespace l32 {
namespace decode_dev {

using namespace attn;

constexpr int kMaxGroup = 16;   // query heads per kv head: the 16 rows of one MMA tile
constexpr int kMaxSplits = 256;

// The warps of the split decode at head_dim D, as l32_paged_decode instantiates it: 64-token tiles at d64, 32-token
// tiles at d128 (DecodeTraits below; the registers bound the residency).
template <int D>
constexpr int kDecodeWarps = D == 64 ? 4 : 2;

// Every size derived from (head_dim, warps, stages), read by the kernel and the launcher alike. kStages: the K/V
// ring's depth (LLAMA32_DECODE_STAGES): 2 is the measured kernel (one tile in flight while one is used); 3 keeps two
// in flight (53 KB at d128, 51 KB at d64: four CTAs per SM, over the default 48 KB, so the launcher opts in).
template <int D, int kWarps, int kStages = 2>
struct DecodeTraits {
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kBlockN = 16 * kWarps;          // tokens per K/V tile, 16 per warp
    static constexpr int kTileElems = kBlockN * D;       // one K (or V) tile, bf16
    static constexpr int kQElems = kMaxGroup * D;        // the Q tile, bf16
    static constexpr int kSmemBytes = (kQElems + kStages * 2 * kTileElems) * 2;
    static_assert(kStages == 2 || kStages == 3, "two or three stages");
    static_assert(kStages > 2 || kSmemBytes <= 48 * 1024, "the measured kernel fits the default shared-memory limit");
    static_assert(kSmemBytes <= 99 * 1024, "fits every supported GPU's opt-in limit per block");
    // The warps' f32 accumulators reuse the K/V stages for the final merge.
    static_assert(kWarps * kMaxGroup * D * 4 <= kStages * 2 * kTileElems * 2, "merge scratch fits in the stages");
};

// Workspace layout for num_splits > 1: acc [seqs, heads, splits, D] f32, then (m, l) [seqs, heads, splits, 2] f32.
__host__ __device__ inline int64_t ws_acc_floats(int64_t seqs, int64_t heads, int64_t splits, int64_t d) {
    return seqs * heads * splits * d;
}

// Combines the splits of output (seq, head), dimension d, from the workspace `ws`, and writes it as bf16: the merge
// kernel's arithmetic, and with kL2 the fused merge's (the same operations in the same order, so the same bits),
// whose loads go to L2 (ld.global.cg): the other CTAs' partials were written there within this launch.
template <int D, bool kL2>
__device__ __forceinline__ void merge_split_output(const l32_paged_decode_params& p, const float* ws, int seq,
                                                   int head, int d) {
    const auto load = [](const float* a) {
        if constexpr (kL2) {
            return __ldcg(a);
        } else {
            return *a;
        }
    };
    const int64_t part0 = (static_cast<int64_t>(seq) * p.num_heads + head) * p.num_splits;
    const float* ml = ws + ws_acc_floats(p.num_seqs, p.num_heads, p.num_splits, D) + 2 * part0;
    const float* acc_in = ws + part0 * D + d;
    float m = -INFINITY;
    for (int k = 0; k < p.num_splits; ++k) m = fmaxf(m, load(ml + 2 * k));
    const float base = m == -INFINITY ? 0.f : m;
    float l = 0.f, acc = 0.f;
    for (int k = 0; k < p.num_splits; ++k) {
        const float f = exp2f(load(ml + 2 * k) - base);
        l = fmaf(load(ml + 2 * k + 1), f, l);
        acc = fmaf(load(acc_in + static_cast<int64_t>(k) * D), f, acc);
    }
    bf16* out = static_cast<bf16*>(p.out) + (static_cast<int64_t>(seq) * p.num_heads + head) * D;
    out[d] = __float2bfloat16_rn(l > 0.f ? acc / l : 0.f);
}

// The split decode of (split, kv_head, seq) by kWarps warps: tid in 0 .. 32 kWarps, smem_raw the dynamic shared
// memory of DecodeTraits (16-byte aligned), s_m and s_l the warps' softmax states (shared memory), `sync` the barrier of exactly those warps (CtaSync in the decode kernel,
// NamedSync in the persistent stack). kFused: with num_splits > 1 the last group of each (sequence, kv head) to
// finish merges its splits (p.fused_merge). kStages: see DecodeTraits; the same bits at either.
template <int D, int kWarps, bool kFused, int kStages, class Sync>
__device__ __forceinline__ void decode_split(const l32_paged_decode_params& p, int split, int kv_head, int seq,
                                             int tid, unsigned char* smem_raw, float (&s_m)[kWarps][kMaxGroup],
                                             float (&s_l)[kWarps][kMaxGroup], Sync sync) {
    using T = DecodeTraits<D, kWarps, kStages>;
    bf16* sq = reinterpret_cast<bf16*>(smem_raw);
    bf16* skv = sq + T::kQElems;  // stage s: K at skv + 2 s kTileElems, V right after it

    const int warp = tid / 32, lane = tid % 32;
    const int group = p.num_heads / p.num_kv_heads;
    const int ctx = static_cast<int>(p.positions[seq]) + 1;
    const int per_split = (ctx + p.num_splits - 1) / p.num_splits;
    const int chunk = (per_split + T::kBlockN - 1) / T::kBlockN * T::kBlockN;
    const int start = split * chunk;
    const int end = min(ctx, start + chunk);
    const int num_tiles = start < end ? (end - start + T::kBlockN - 1) / T::kBlockN : 0;

    const bf16* k_cache = static_cast<const bf16*>(p.k_cache);
    const bf16* v_cache = static_cast<const bf16*>(p.v_cache);
    const uint32_t* table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks_per_seq;
    const int64_t slot_stride = static_cast<int64_t>(p.num_kv_heads) * D;

    // Q rows 0..group-1 are heads kv_head * group + row of this sequence's token; the rest are zero-filled.
    const bf16* q = static_cast<const bf16*>(p.q) + static_cast<int64_t>(seq) * p.q_stride +
                    static_cast<int64_t>(kv_head) * group * D;
    for (int idx = tid; idx < kMaxGroup * D / 8; idx += T::kThreads) {
        const int row = idx / (D / 8), chunk8 = idx % (D / 8);
        const bool valid = row < group;
        cp_async16(sq + SwizzledTile<D>::offset(row, chunk8), valid ? q + row * D + chunk8 * 8 : q, valid);
    }
    // Tiles 0 .. kStages - 2, one commit group each (Q joins tile 0's).
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < num_tiles) {
            bf16* stage = skv + s * 2 * T::kTileElems;
            load_kv_tile<D, T::kBlockN, T::kThreads>(stage, stage + T::kTileElems, k_cache, v_cache, table,
                                                     start + s * T::kBlockN, end, p.block_size, slot_stride, kv_head);
        }
        cp_async_commit();
    }

    const float scale_log2 = p.scale * 1.4426950408889634f;
    float o[D / 8][4];
#pragma unroll
    for (int d = 0; d < D / 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    RowState st;
    uint32_t qf[D / 16][4];

    for (int t = 0; t < num_tiles; ++t) {
        const int n0 = start + t * T::kBlockN;
        if constexpr (kStages == 2) {
            // The measured kernel's loop (two stages: one tile in flight while one is used).
            if (t + 1 < num_tiles) {
                bf16* next = skv + ((t + 1) % kStages) * 2 * T::kTileElems;
                load_kv_tile<D, T::kBlockN, T::kThreads>(next, next + T::kTileElems, k_cache, v_cache, table,
                                                         n0 + T::kBlockN, end, p.block_size, slot_stride, kv_head);
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
        } else {
            // Tile t + kStages - 1 goes into the stage tile t - 1 used (freed by the barrier at the end of the last
            // iteration); one commit group per iteration, empty past the last tile, so that waiting for all but
            // the newest kStages - 1 groups means tile t has landed.
            const int ahead = t + kStages - 1;
            if (ahead < num_tiles) {
                bf16* next = skv + (ahead % kStages) * 2 * T::kTileElems;
                load_kv_tile<D, T::kBlockN, T::kThreads>(next, next + T::kTileElems, k_cache, v_cache, table,
                                                         start + ahead * T::kBlockN, end, p.block_size, slot_stride,
                                                         kv_head);
            }
            cp_async_commit();
            cp_async_wait<kStages - 1>();
        }
        sync();
        if (t == 0) load_a_fragments<D>(qf, sq, 0);
        const bf16* sk = skv + (t % kStages) * 2 * T::kTileElems;
        const bf16* sv = sk + T::kTileElems;

        float s[2][4];
        qk_scores<D, 2>(s, qf, sk, warp * 16);
        if (n0 + T::kBlockN > end) {
            // Past the split's end (the tile's tail): masked; the zero-filled rows must not count.
#pragma unroll
            for (int j = 0; j < 2; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    if (n0 + warp * 16 + j * 8 + 2 * (lane % 4) + e >= end) s[j][e] = s[j][2 + e] = -INFINITY;
                }
            }
        }
        online_softmax<2, D / 8>(s, o, st, scale_log2);
        pv_accumulate<D, 2>(o, s, sv, warp * 16);
        sync();  // the next iteration's load overwrites this stage
    }
    cp_async_wait<0>();
    sync();
    finish_row_sums(st);

    // Merge the warps: each writes its state, then every (row < group, dim) output is combined by one thread.
    float* so = reinterpret_cast<float*>(skv);  // [kWarps][kMaxGroup][D]
    const int g = lane / 4, tq = lane % 4;
#pragma unroll
    for (int d = 0; d < D / 8; ++d) {
        float* r0 = so + (warp * kMaxGroup + g) * D + d * 8 + 2 * tq;
        r0[0] = o[d][0];
        r0[1] = o[d][1];
        r0[8 * D] = o[d][2];
        r0[8 * D + 1] = o[d][3];
    }
    if (tq == 0) {
        s_m[warp][g] = st.m[0];
        s_m[warp][g + 8] = st.m[1];
        s_l[warp][g] = st.l[0];
        s_l[warp][g + 8] = st.l[1];
    }
    sync();

    const int64_t head0 = static_cast<int64_t>(kv_head) * group;
    for (int idx = tid; idx < group * D; idx += T::kThreads) {
        const int row = idx / D, d = idx % D;
        float m = -INFINITY;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) m = fmaxf(m, s_m[w][row]);
        const float base = m == -INFINITY ? 0.f : m;
        float l = 0.f, acc = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
            const float f = exp2f(s_m[w][row] - base);
            l = fmaf(s_l[w][row], f, l);
            acc = fmaf(so[(w * kMaxGroup + row) * D + d], f, acc);
        }
        const int64_t head = head0 + row;
        if (p.num_splits == 1) {
            bf16* out = static_cast<bf16*>(p.out) + (static_cast<int64_t>(seq) * p.num_heads + head) * D;
            out[d] = __float2bfloat16_rn(l > 0.f ? acc / l : 0.f);
        } else {
            const int64_t part = (static_cast<int64_t>(seq) * p.num_heads + head) * p.num_splits + split;
            float* ws = static_cast<float*>(p.workspace);
            ws[part * D + d] = acc;
            if (d == 0) {
                float* ml = ws + ws_acc_floats(p.num_seqs, p.num_heads, p.num_splits, D);
                ml[2 * part] = m;
                ml[2 * part + 1] = l;
            }
        }
    }
    if constexpr (kFused) {
        if (p.num_splits > 1) {
            // The CTA whose arrival completes its (sequence, kv head) merges the group (and has reset the counter).
            // At most DECODE_COUNTER_BYTES / 4 (sequence, kv head) pairs take the fused merge: the index fits an int.
            if (last_block_arrive(p.merge_counters, seq * p.num_kv_heads + kv_head, p.num_splits, tid == 0, sync)) {
                const float* ws = static_cast<const float*>(p.workspace);
                for (int idx = tid; idx < group * D; idx += T::kThreads) {
                    merge_split_output<D, true>(p, ws, seq, static_cast<int>(head0) + idx / D, idx % D);
                }
            }
        }
    }
}

}  // namespace decode_dev
}  // namespace l32
