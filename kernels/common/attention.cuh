// Shared device pieces of the attention kernels (kernels/attention/*.cu): named PTX wrappers for cp.async, ldmatrix
// and the bf16 tensor-core MMA, the swizzled shared-memory tile layout, the paged K/V tile loader, and the
// online-softmax step over one warp's m16 x n score fragments.
//
// Fragment layout of mma.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"), with g = lane / 4, t = lane % 4:
//   A (16 x 16, row-major)  4 x b32: {row g, k 2t..2t+1}, {row g+8, k 2t..}, {row g, k 2t+8..}, {row g+8, k 2t+8..}
//   B (16 x 8, "col")        2 x b32: {k 2t..2t+1, col g}, {k 2t+8..2t+9, col g}
//   C (16 x 8, f32)          4 x f32: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/smem.cuh"

namespace l32 {
namespace attn {

// ---- named PTX wrappers ------------------------------------------------------------------------------------------

using ::l32::smem_addr;  // common/smem.cuh: what cp.async and ldmatrix take

// 16-byte global -> shared copy that bypasses L1 (.cg: K/V tiles are read once per CTA). With `valid` false nothing
// is read and the 16 shared bytes are zero-filled (src-size 0), so tiles past the end of a range hold zeros, never
// stale data: 0 * garbage could be NaN.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const int src_size = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_size)
                 : "memory");
}

// Closes the group of cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N committed groups are still in flight (N = 1: the newest may still be loading).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices from shared memory; lanes 8i..8i+7 give the row addresses of matrix i. Each lane receives
// row lane/4, columns 2*(lane%4)..+1 of every matrix: the A and B fragments of the MMA below.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(smem)));
}

// ldmatrix_x4, transposed: each lane receives rows 2*(lane%4)..+1, column lane/4. Turns V rows ([token][dim]) into
// the "col" B fragment of P * V without a transposed copy.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(smem)));
}

// d += a * b on the tensor cores: 16x16 bf16 times 16x8 bf16, f32 accumulate (sm_80+, also the sm_90a fallback).
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as packed bf16 (lo in the low half): one b32 of an A fragment.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &v, sizeof r);
    return r;
}

// ---- shared-memory tiles -----------------------------------------------------------------------------------------

// A [rows][D] bf16 tile in shared memory, stored in 16-byte chunks whose index is XOR-swizzled with the row
// (chunk ^ row % 8). ldmatrix reads one chunk column of 8 consecutive rows, and cp.async writes consecutive chunks
// of a row: both touch 8 distinct 16-byte bank groups, so neither conflicts.
template <int D>
struct SwizzledTile {
    static_assert(D % 64 == 0, "rows of at least 8 chunks: the swizzle permutes the low 3 bits of the chunk");
    static constexpr int kChunks = D / 8;
    // Element offset of chunk `chunk` (8 bf16) of row `row`.
    __device__ __forceinline__ static int offset(int row, int chunk) { return row * D + ((chunk ^ (row & 7)) << 3); }
};

// A [rows][D] bf16 tile whose rows are padded to D + 8 elements: any D that is a multiple of 16 (the MMA's k). The
// row pitch is an odd number of 16-byte chunks, so the 8 rows one ldmatrix reads (same chunk column) fall in 8
// distinct bank groups; no swizzle is needed. Costs 8 / D more shared memory than SwizzledTile.
template <int D>
struct PaddedTile {
    static_assert(D % 16 == 0, "rows of whole k16 MMA steps");
    static constexpr int kPitch = D + 8;
    static constexpr int kChunks = D / 8;
    // Element offset of chunk `chunk` (8 bf16) of row `row`.
    __device__ __forceinline__ static int offset(int row, int chunk) { return row * kPitch + (chunk << 3); }
};

// Loads positions [n0, n0 + ROWS) of one sequence's K and V (kv head `kv_head`) into swizzled tiles (layout Tile,
// with a static offset(row, chunk) and kChunks), through the block table; rows at positions >= n_end are
// zero-filled (they read table entry 0, which every sequence's table row has, and copy nothing from slot 0).
// Threads 0..THREADS-1 call it; thread tid copies chunk column tid % kChunks of rows tid / kChunks + j kStep.
//   k_cache, v_cache [num_blocks, block_size, num_kv_heads, D]; table [max_blocks_per_seq] of this sequence;
//   slots (block * block_size + offset) and num_kv_heads * D * 2 bytes fit 32 bits.
// What a copied row costs matters: the prefill kernels pay it in the same instruction stream as their products.
// The first form spent about 90 instructions a row (a runtime division and remainder by block_size, 64-bit
// products, a branch): 730 per thread and tile in prefill_sm90.cu at d128 (SASS, sm_90a). Here the thread's rows,
// kStep positions apart, step through the table with one division per call, and a row's K address is one
// 32 x 32 -> 64-bit multiply-add and one add per cache, with no branch: about 300 per thread and tile there.
// All of a thread's table reads come before its first copy: each cp.async asm is a compiler memory barrier, so a
// read placed between two copies (one loop over rows, as before) could not move above the earlier ones, and each
// tile waited for its reads one after another (four dependent rounds at d128) instead of once.
template <int D, int ROWS, int THREADS, class Tile = SwizzledTile<D>>
__device__ __forceinline__ void load_kv_tile(bf16* sk, bf16* sv, const bf16* k_cache, const bf16* v_cache,
                                             const uint32_t* table, int n0, int n_end, int block_size,
                                             int64_t slot_stride, int kv_head) {
    constexpr int kChunks = Tile::kChunks;
    static_assert(THREADS % kChunks == 0, "a thread keeps one chunk column");
    static_assert(ROWS % (THREADS / kChunks) == 0, "every thread copies the same number of rows");
    constexpr int kStep = THREADS / kChunks;  // rows between a thread's copies
    constexpr int kPer = ROWS / kStep;        // rows per thread
    const int tid = static_cast<int>(threadIdx.x);
    const int row0 = tid / kChunks, chunk = tid % kChunks;
    // Byte offsets: a slot's chunk is one 32 x 32 -> 64-bit multiply-add from the thread's column (kv head and
    // chunk), then one 64-bit add to each cache's base.
    const uint32_t col_bytes = static_cast<uint32_t>(kv_head * D + chunk * 8) * 2;
    const uint32_t slot_bytes = static_cast<uint32_t>(slot_stride) * 2;  // num_kv_heads * D bf16
    // Position n0 + row0 + j kStep = q block_size + r, stepped from j = 0 (one division each).
    int q = (n0 + row0) / block_size;
    int r = n0 + row0 - q * block_size;
    const int dq = kStep / block_size, dr = kStep - dq * block_size;
    // The reads; the remainders are stepped again below rather than kept (fewer live registers: the mma.sync
    // prefill at d64 stays at 128, its four CTAs per SM).
    uint32_t block[kPer];
    const int r0 = r;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
        const bool valid = n0 + row0 + i * kStep < n_end;
        block[i] = __ldg(table + (valid ? static_cast<uint32_t>(q) : 0u));
        q += dq;
        r += dr;
        if (r >= block_size) {
            r -= block_size;
            ++q;
        }
    }
    r = r0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
        const int row = row0 + i * kStep;
        const bool valid = n0 + row < n_end;
        // Rows past the context copy nothing from slot 0's chunk (a valid address).
        const uint32_t slot = valid ? block[i] * static_cast<uint32_t>(block_size) + static_cast<uint32_t>(r) : 0u;
        const uint64_t off = static_cast<uint64_t>(slot) * slot_bytes + col_bytes;
        const int dst = Tile::offset(row, chunk);
        cp_async16(sk + dst, reinterpret_cast<const char*>(k_cache) + off, valid);
        cp_async16(sv + dst, reinterpret_cast<const char*>(v_cache) + off, valid);
        r += dr;
        if (r >= block_size) r -= block_size;
    }
}

// ---- one warp's flash-attention step -----------------------------------------------------------------------------

// The A fragments of 16 rows x D of a swizzled tile (rows row0..row0+15): kept in registers for the whole KV loop.
// Tile is the shared-memory layout (SwizzledTile<D> or PaddedTile<D>), likewise below.
template <int D, class Tile = SwizzledTile<D>>
__device__ __forceinline__ void load_a_fragments(uint32_t (&a)[D / 16][4], const bf16* tile, int row0) {
    const int lane = threadIdx.x % 32;
    const int row = row0 + (lane % 8) + ((lane / 8) % 2) * 8;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) ldmatrix_x4(a[ks], tile + Tile::offset(row, 2 * ks + lane / 16));
}

// s[j] (16 x 8 each, NT = number of 8-token column tiles) = Q (16 x D, A fragments) * K^T for tokens
// tok0 .. tok0 + 8 * NT - 1 of the K tile.
template <int D, int NT, class Tile = SwizzledTile<D>>
__device__ __forceinline__ void qk_scores(float (&s)[NT][4], const uint32_t (&q)[D / 16][4], const bf16* sk,
                                          int tok0) {
    static_assert(NT % 2 == 0, "column tiles come in pairs (one ldmatrix_x4 each)");
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            uint32_t b[4];
            const int tok = tok0 + np * 16 + (lane % 8) + (lane / 16) * 8;
            ldmatrix_x4(b, sk + Tile::offset(tok, 2 * ks + (lane / 8) % 2));
            mma_bf16_16816(s[2 * np], q[ks], b[0], b[1]);
            mma_bf16_16816(s[2 * np + 1], q[ks], b[2], b[3]);
        }
    }
}

// 2^x on the SFU alone (ex2.approx.ftz.f32: one MUFU.EX2). exp2f compiles to the same MUFU.EX2 plus a compare and
// two predicated multiplies that carry results below 2^-126 into the denormal range; here those flush to +0. For x
// >= -126 the bits are exp2f's. The softmax's exponents are <= 0 against a row sum >= 1, so a flushed term (under
// 2^-126) changes no f32 sum and no bf16 P; what it saves is three of the eight or so instructions per score
// (prefill_sm90.cu at d128: 192 of 729 in the softmax, per thread and tile).
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// The running softmax state of the two rows (g and g + 8) a thread holds: max in log2 units (scores times
// scale * log2(e)), and this thread's part of the row sum (the quad's four parts are added at the end).
struct RowState {
    float m[2] = {-INFINITY, -INFINITY};
    float l[2] = {0.f, 0.f};
};

// o's two rows (g: elements 0-1 of each column tile, g + 8: 2-3) times their factors (softmax_scores). A factor of
// exactly 1 (the row's max held: exp2 of 0) changes no bit, so a warp whose rows all kept their max skips the
// multiplies (64 per thread and tile at D = 128; most tiles once the running max has settled). The vote needs the
// whole warp, which every caller has.
template <int DT>
__device__ __forceinline__ void rescale_rows(float (&o)[DT][4], const float (&alpha)[2]) {
    if (!__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) return;
#pragma unroll
    for (int d = 0; d < DT; ++d) {
        o[d][0] *= alpha[0];
        o[d][1] *= alpha[0];
        o[d][2] *= alpha[1];
        o[d][3] *= alpha[1];
    }
}

// The scores' half of the online-softmax update of one tile, for a thread's two rows (g and g + 8): s (raw q.k,
// masked entries already -inf) becomes P = exp2(s * scale_log2 - m) in place, l is rescaled to the new max, and each
// row's factor for o (exp2 of old max minus new) goes to alpha for rescale_rows, now (online_softmax) or once an
// asynchronous product still writing o is done (the same f32 operations per element). A row that has seen only
// -inf so far keeps m = -inf and contributes zeros (its base is taken as 0, so no -inf - -inf).
template <int NT>
__device__ __forceinline__ void softmax_scores(float (&s)[NT][4], RowState& st, float scale_log2, float (&alpha)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(st.m[r], mx * scale_log2);
        const float base = m_new == -INFINITY ? 0.f : m_new;
        alpha[r] = exp2_ftz(st.m[r] - base);
        st.m[r] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            s[j][2 * r] = exp2_ftz(fmaf(s[j][2 * r], scale_log2, -base));
            s[j][2 * r + 1] = exp2_ftz(fmaf(s[j][2 * r + 1], scale_log2, -base));
            sum += s[j][2 * r] + s[j][2 * r + 1];
        }
        st.l[r] = st.l[r] * alpha[r] + sum;
    }
}

// The online-softmax update with the scores of one tile, o rescaled at once. Every caller runs it with whole warps
// (the rescale votes across the warp).
template <int NT, int DT>
__device__ __forceinline__ void online_softmax(float (&s)[NT][4], float (&o)[DT][4], RowState& st, float scale_log2) {
    float alpha[2];
    softmax_scores(s, st, scale_log2, alpha);
    rescale_rows(o, alpha);
}

// o (16 x D as D/8 column tiles) += P (16 x 8 * NT, from online_softmax, rounded to bf16) * V for tokens
// tok0 .. tok0 + 8 * NT - 1 of the V tile.
template <int D, int NT, class Tile = SwizzledTile<D>>
__device__ __forceinline__ void pv_accumulate(float (&o)[D / 8][4], const float (&p)[NT][4], const bf16* sv,
                                              int tok0) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
        const uint32_t a[4] = {pack_bf16x2(p[2 * kk][0], p[2 * kk][1]), pack_bf16x2(p[2 * kk][2], p[2 * kk][3]),
                               pack_bf16x2(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                               pack_bf16x2(p[2 * kk + 1][2], p[2 * kk + 1][3])};
        const int tok = tok0 + kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, sv + Tile::offset(tok, 2 * dp + lane / 16));
            mma_bf16_16816(o[2 * dp], a, b[0], b[1]);
            mma_bf16_16816(o[2 * dp + 1], a, b[2], b[3]);
        }
    }
}

// Adds the four quad lanes' parts of each row sum: afterwards every lane of the quad holds the full sums.
__device__ __forceinline__ void finish_row_sums(RowState& st) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        st.l[r] += __shfl_xor_sync(0xffffffffu, st.l[r], 1);
        st.l[r] += __shfl_xor_sync(0xffffffffu, st.l[r], 2);
    }
}

}  // namespace attn
}  // namespace l32
