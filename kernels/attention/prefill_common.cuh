// The parts the two paged prefill kernels share (prefill.cu on mma.sync, prefill_sm90.cu on wgmma): the CTA's
// share of a sequence's chunk with the GQA group folded into the rows, the Q tile load with the rows' position
// range, each thread's row positions, the causal mask of a score tile, the epilogue, and the launcher. Both kernels
// keep mma.m16n8k16's C layout per warp (16 rows: g and g + 8 per thread), so every piece works on a warp's 16
// rows. (prefill.cu uses only the launcher: see its Tier 1 comment.)
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>

#include "common/attention.cuh"
#include "common/bf16.cuh"
#include "common/launch.cuh"
#include "common/status.cuh"
#include "llama32_kernels.h"

namespace l32 {
namespace prefill {

using attn::RowState;

// The CTA's share of one sequence's query chunk: folded rows m0.. of `rows` (row r is token r / group, query head
// kv_head * group + r % group). CTAs run longest-first: the last row tile, with the most KV tiles, has
// blockIdx.x = 0.
struct ChunkTile {
    int64_t tok_begin;  // the chunk's first token in the step
    int rows;           // tokens x group
    int m0;             // this CTA's first row
    int group;          // query heads per kv head
};

template <int BLOCK_M>
__device__ __forceinline__ ChunkTile chunk_tile(const l32_paged_prefill_params& p) {
    ChunkTile c;
    c.group = p.num_heads / p.num_kv_heads;
    c.tok_begin = p.cu_seqlens[blockIdx.y];
    c.rows = static_cast<int>(p.cu_seqlens[blockIdx.y + 1] - c.tok_begin) * c.group;
    c.m0 = static_cast<int>(gridDim.x - 1 - blockIdx.x) * BLOCK_M;
    return c;
}

// Issues the cp.async of the CTA's BLOCK_M Q rows into sq (layout Tile; rows past the chunk zero-filled; not
// committed) by threads 0..THREADS-1 and returns the smallest and largest position of its rows (x, y). Every thread
// of the CTA (CTA_THREADS of them, THREADS or more) calls it (tid = threadIdx.x); it ends with a barrier.
template <int D, int BLOCK_M, int THREADS, class Tile, int CTA_THREADS = THREADS>
__device__ __forceinline__ int2 load_query_tile(const l32_paged_prefill_params& p, const ChunkTile& c, int kv_head,
                                                bf16* sq, int tid) {
    __shared__ int s_pos_min, s_pos_max;
    const uint32_t* positions = p.positions + c.tok_begin;
    if (tid == 0) {
        s_pos_min = INT_MAX;
        s_pos_max = -1;
    }
    __syncthreads();
    if (tid < BLOCK_M && c.m0 + tid < c.rows) {
        const int pos = static_cast<int>(positions[(c.m0 + tid) / c.group]);
        atomicMin(&s_pos_min, pos);
        atomicMax(&s_pos_max, pos);
    }
    const bf16* q =
        static_cast<const bf16*>(p.q) + c.tok_begin * p.q_stride + static_cast<int64_t>(kv_head) * c.group * D;
#pragma unroll
    for (int i = 0; i < BLOCK_M * D / 8 / THREADS; ++i) {
        if constexpr (CTA_THREADS > THREADS) {
            if (tid >= THREADS) break;
        }
        const int idx = tid + i * THREADS;
        const int row = idx / (D / 8), chunk8 = idx % (D / 8);
        const int r = c.m0 + row;
        const bool valid = r < c.rows;
        const bf16* src = valid ? q + (r / c.group) * p.q_stride + (r % c.group) * D + chunk8 * 8 : q;
        attn::cp_async16(sq + Tile::offset(row, chunk8), src, valid);
    }
    __syncthreads();
    return make_int2(s_pos_min, s_pos_max);
}

// The positions of this thread's two rows (g = lane / 4 and g + 8) of the warp's 16 rows starting at CTA row
// warp_row0; padding rows take pos_max.
__device__ __forceinline__ void row_positions(int (&row_pos)[2], const l32_paged_prefill_params& p,
                                              const ChunkTile& c, int warp_row0, int lane, int pos_max) {
    const int g = lane / 4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = c.m0 + warp_row0 + g + 8 * h;
        row_pos[h] = r < c.rows ? static_cast<int>(p.positions[c.tok_begin + r / c.group]) : pos_max;
    }
}

// Masks the scores of key positions n0.. (NT column tiles of 8) past each row's own position with -inf; tq is the
// thread's lane % 4 (its columns 2 tq, 2 tq + 1 of each tile).
template <int NT>
__device__ __forceinline__ void mask_causal(float (&s)[NT][4], int n0, const int (&row_pos)[2], int tq) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int key = n0 + j * 8 + 2 * tq + e;
            if (key > row_pos[0]) s[j][e] = -INFINITY;
            if (key > row_pos[1]) s[j][2 + e] = -INFINITY;
        }
    }
}

// The epilogue of a warp's 16 rows (CTA rows warp_row0..): o normalized by the row sums (finished), rounded to
// bf16 into those rows of sq (layout Tile; nothing else may still read them), then 16-byte stores of whole rows.
// `lane` is threadIdx.x % 32.
template <int D, class Tile>
__device__ __forceinline__ void store_rows(const l32_paged_prefill_params& p, const ChunkTile& c, int kv_head,
                                           const float (&o)[D / 8][4], const RowState& st, bf16* sq,
                                           int warp_row0, int lane) {
    const int g = lane / 4, tq = lane % 4;
    const float inv[2] = {st.l[0] > 0.f ? 1.f / st.l[0] : 0.f, st.l[1] > 0.f ? 1.f / st.l[1] : 0.f};
#pragma unroll
    for (int d = 0; d < D / 8; ++d) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            *reinterpret_cast<uint32_t*>(sq + Tile::offset(warp_row0 + g + 8 * h, d) + 2 * tq) =
                attn::pack_bf16x2(o[d][2 * h] * inv[h], o[d][2 * h + 1] * inv[h]);
        }
    }
    __syncwarp();
    bf16* out =
        static_cast<bf16*>(p.out) + c.tok_begin * p.num_heads * D + static_cast<int64_t>(kv_head) * c.group * D;
#pragma unroll
    for (int i = 0; i < 16 * (D / 8) / 32; ++i) {
        const int idx = lane + 32 * i;
        const int row = warp_row0 + idx / (D / 8), chunk8 = idx % (D / 8);
        const int r = c.m0 + row;
        if (r < c.rows) {
            const BF16Vec<8>* src = reinterpret_cast<const BF16Vec<8>*>(sq + Tile::offset(row, chunk8));
            BF16Vec<8>* dst = reinterpret_cast<BF16Vec<8>*>(out + static_cast<int64_t>(r / c.group) * p.num_heads * D +
                                                            (r % c.group) * D + chunk8 * 8);
            store_vec(dst, load_vec(src));
        }
    }
}

// Tier 2 of both kernels: the shared-memory opt-in, then the grid of (row tiles of BLOCK_M folded rows of the
// longest chunk, sequences, kv heads) with THREADS threads and SMEM bytes of dynamic shared memory.
template <int BLOCK_M, int THREADS, int SMEM>
l32_status launch(void (*kernel)(l32_paged_prefill_params), const l32_paged_prefill_params& p, cudaStream_t stream) {
    if (const l32_status s = allow_dynamic_smem(kernel, SMEM); s != L32_OK) return s;
    const int64_t group = p.num_heads / p.num_kv_heads;
    const int64_t m_tiles = (p.max_query_len * group + BLOCK_M - 1) / BLOCK_M;
    const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(p.num_seqs),
                    static_cast<unsigned>(p.num_kv_heads));
    launch_kernel(kernel, grid, THREADS, SMEM, stream, p);
    return check_launch();
}

}  // namespace prefill
}  // namespace l32
