// kernels/gemv_device.cuh: the device code of the skinny GEMM (kernels/gemv.cu, whose file comment describes the
// design), shared with the persistent decode stack (kernels/decode_layers.cu), which runs the same tiles, prologue
// and epilogues inside one launch: the same code, so the same bits.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/reduce.cuh"
#include "common/rmsnorm.cuh"
#include "common/rope.cuh"
#include "common/silu.cuh"
#include "common/smem.cuh"
#include "common/warp_tiles.cuh"
#include "llama32_kernels.h"

namespace l32 {
namespace gemv_dev {

constexpr int kRows = 16;    // w rows (output columns) per block: the M of one MMA
constexpr int kUnroll = 4;   // 16-byte vector pairs of w per lane per step

// 16 bytes of a weight that is read exactly once: bypass L1 so x keeps it.
__device__ __forceinline__ uint4 ld_stream_16(const uint4* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

// 16 bytes of x, which every block reads again: keep it in L1.
__device__ __forceinline__ uint4 ld_reuse_16(const uint4* p) {
    uint4 r;
    asm("ld.global.nc.L1::evict_last.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

// d += A (16 x 16, row-major, bf16) * B (16 x 8, column-major, bf16) in f32 (sm_80+). Fragments: lane (g, t) =
// (lane / 4, lane % 4) holds A[g][2t, 2t+1] (a0), A[g+8][2t, 2t+1] (a1), A[g][2t+8, 2t+9] (a2), A[g+8][2t+8, 2t+9]
// (a3), B[2t, 2t+1][g] (b0), B[2t+8, 2t+9][g] (b1), D[g][2t, 2t+1] (d0, d1), D[g+8][2t, 2t+1] (d2, d3).
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// 16 bytes of shared memory at a shared-state-space byte address.
__device__ __forceinline__ uint4 ld_shared_16(uint32_t addr) {
    uint4 r;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(addr));
    return r;
}

// Where a lane's x rows come from: global memory (xr, through L1), or with the norm prologue the normalized rows in
// shared memory (xs: byte addresses of the rows' vector 0).
template <int kTiles>
struct XRows {
    const uint4* xr[kTiles];
    uint32_t xs[kTiles];
};

// One step of a lane: kUnroll vectors at positions base + (u * kWarps + warp) * 4 + t of its two w rows and its
// kTiles x rows, loaded first (all in flight together), then two MMAs per vector and x tile. kTail: the step runs
// past kv (k / 8 vectors per row), so each vector is checked and zeroed past the end. kSmemX: x from shared memory.
template <int kTiles, int kWarps, bool kTail, bool kSmemX>
__device__ __forceinline__ void gemv_step(float (&acc)[kTiles][4], const uint4* w0, const uint4* w1,
                                          const XRows<kTiles>& x, int base, int kv, int warp, int t) {
    uint4 a0[kUnroll], a1[kUnroll], b[kUnroll][kTiles];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        const int v = base + (u * kWarps + warp) * 4 + t;
        if (!kTail || v < kv) {
            a0[u] = ld_stream_16(w0 + v);
            a1[u] = ld_stream_16(w1 + v);
#pragma unroll
            for (int j = 0; j < kTiles; ++j) {
                b[u][j] = kSmemX ? ld_shared_16(x.xs[j] + 16u * static_cast<uint32_t>(v)) : ld_reuse_16(x.xr[j] + v);
            }
        } else {
            a0[u] = a1[u] = make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int j = 0; j < kTiles; ++j) b[u][j] = make_uint4(0, 0, 0, 0);
        }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int j = 0; j < kTiles; ++j) {
            mma_bf16_16816(acc[j], a0[u].x, a1[u].x, a0[u].y, a1[u].y, b[u][j].x, b[u][j].y);
            mma_bf16_16816(acc[j], a0[u].z, a1[u].z, a0[u].w, a1[u].w, b[u][j].z, b[u][j].w);
        }
    }
}

// Epilogue modes of the kernel.
enum Mode : int {
    kPlain = 0,  // out = x @ w^T
    kSilu = 1,   // p.silu_pairs: w is gate_up [2 n, k], out = silu(gate) * up [m, n]
    kRope = 2,   // p.rope_on: w is the fused qkv projection, RoPE + KV-cache write in the epilogue
};

// The two w rows a block's MMA rows g and g + 8 read, and what its outputs are. kPlain: rows n0 + g and
// n0 + g + 8 (n0 = 16 b). kSilu: gate row n0 + g and up row n + n0 + g (n0 = 8 b). kRope: the first
// (num_heads + num_kv_heads) * head_dim / 16 blocks take 8 rotation pairs of one q or k head, rows
// head * head_dim + j0 + g and that + head_dim / 2 (j0 a multiple of 8 below head_dim / 2); the rest take 16
// consecutive v rows, as kPlain.
struct BlockRows {
    int64_t r0, r1;
    int64_t n0;   // kPlain / kSilu / v blocks: the first output column
    int head;     // kRope pair blocks: the head (q heads first, then k), else -1
    int j0;       // kRope pair blocks: the first pair index within the head
};

template <int kMode>
__device__ __forceinline__ BlockRows block_rows(const l32_gemv_params& p, int g, int64_t blk) {
    BlockRows b;
    b.head = -1;
    b.j0 = 0;
    if constexpr (kMode == kSilu) {
        b.n0 = blk * (kRows / 2);
        b.r0 = std::min(b.n0 + g, p.n - 1);
        b.r1 = p.n + b.r0;
    } else if constexpr (kMode == kRope) {
        const int d = p.rope.head_dim, half = d / 2;
        const int64_t pair_blocks = int64_t{p.rope.num_heads + p.rope.num_kv_heads} * (half / 8);
        if (blk < pair_blocks) {
            b.head = static_cast<int>(blk / (half / 8));
            b.j0 = static_cast<int>(blk % (half / 8)) * 8;
            b.n0 = int64_t{b.head} * d + b.j0;
            b.r0 = b.n0 + g;
            b.r1 = b.r0 + half;
        } else {
            b.n0 = int64_t{p.rope.num_heads + p.rope.num_kv_heads} * d + (blk - pair_blocks) * kRows;
            b.r0 = b.n0 + g;
            b.r1 = b.r0 + 8;
        }
    } else {
        b.n0 = blk * kRows;
        b.r0 = std::min(b.n0 + g, p.n - 1);
        b.r1 = std::min(b.n0 + g + 8, p.n - 1);
    }
    return b;
}

// 8 bf16 from global memory: plainly, or with kCg from L2 (ld.global.cg), for data that other blocks of the same
// launch wrote (the persistent decode stack's residual rows: L1 is not coherent across SMs).
template <bool kCg>
__device__ __forceinline__ BF16Vec<8> load_vec_l2(const BF16Vec<8>* p) {
    if constexpr (kCg) {
        const uint4 bits = __ldcg(reinterpret_cast<const uint4*>(p));
        BF16Vec<8> r;
        memcpy(&r, &bits, sizeof r);
        return r;
    } else {
        return load_vec(p);
    }
}

// The norm prologue (l32_gemv_norm): rows 0..m-1 of rms_norm(x [+ delta]) into shared memory at xs (row stride
// `stride` bytes), with l32_norm's bits. l32_norm runs one block of split.threads threads per row, thread t
// summing the squares of vectors t + i * threads (i in order, from 0) before block_sum's two butterflies; here warp
// w plays l32_norm's warps w, w + kWarps, ..., so every partial sum and the tree are the same. The row (x + delta
// rounded) is read from global memory once, into xs, and normalized there in place. Then, with delta, the last
// block to get here writes bf16(x + delta) back to x (every block has read x by then). kCg: x and delta are read
// from L2 (load_vec_l2).
template <int kWarps, bool kCg = false>
__device__ __forceinline__ void norm_prologue(const l32_gemv_params& p, unsigned char* xs, int stride, int m,
                                              int kv) {
    using Vec = BF16Vec<8>;
    const auto ld = [](const Vec* a) { return load_vec_l2<kCg>(a); };
    __shared__ float s_warp_sums[kNormMaxThreads / 32];
    __shared__ int s_last;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const NormSplit split = norm_split_vec8(kv);
    const int split_warps = split.threads / 32;
    const Vec* weight = static_cast<const Vec*>(p.norm.weight);
    const float inv_hidden = 1.f / static_cast<float>(p.k);
    for (int r = 0; r < m; ++r) {
        const Vec* x = reinterpret_cast<const Vec*>(static_cast<const bf16*>(p.x) + static_cast<int64_t>(r) * p.k);
        const Vec* delta = p.norm.delta == nullptr
                               ? nullptr
                               : reinterpret_cast<const Vec*>(static_cast<const bf16*>(p.norm.delta) +
                                                              static_cast<int64_t>(r) * p.k);
        const auto input = [&](int c) {
            return delta == nullptr ? ld(x + c) : add_round(ld(x + c), ld(delta + c));
        };
        Vec* row = reinterpret_cast<Vec*>(xs + static_cast<int64_t>(r) * stride);
        // The split covers every vector once: each is read from global memory here, kept in shared memory.
        for (int sw = warp; sw < split_warps; sw += kWarps) {
            const int st = sw * 32 + lane;
            float sum_sq = 0.f;
            for (int i = 0; i < split.per_thread; ++i) {
                const int c = st + i * split.threads;
                if (c < kv) {
                    const Vec h = input(c);
                    store_vec(row + c, h);
                    sum_sq += sum_squares(h);
                }
            }
            sum_sq = warp_sum(sum_sq);
            if (lane == 0) s_warp_sums[sw] = sum_sq;
        }
        __syncthreads();  // also: every vector of the row is in shared memory
        const float inv = rms_inv(warp_sum(lane < split_warps ? s_warp_sums[lane] : 0.f), inv_hidden, p.norm.eps);
        for (int c = threadIdx.x; c < kv; c += blockDim.x) {
            store_vec(row + c, norm_scale(load_vec(row + c), load_vec(weight + c), inv));
        }
        __syncthreads();  // s_warp_sums is reused by the next row; the last row's xs is complete
    }
    if (p.norm.delta == nullptr) return;
    if (threadIdx.x == 0) {
        // Every read of x by this block is done (its values were used above, before the barrier).
        __threadfence();
        s_last = atomicAdd(p.norm.counter, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!s_last) return;
    for (int r = 0; r < m; ++r) {
        const int64_t row = static_cast<int64_t>(r) * p.k;
        Vec* x = reinterpret_cast<Vec*>(const_cast<bf16*>(static_cast<const bf16*>(p.x)) + row);
        const Vec* delta = reinterpret_cast<const Vec*>(static_cast<const bf16*>(p.norm.delta) + row);
        for (int c = threadIdx.x; c < kv; c += blockDim.x) {
            store_vec(x + c, add_round(ld(x + c), ld(delta + c)));
        }
    }
    if (threadIdx.x == 0) *p.norm.counter = 0u;  // for the next launch (a CUDA graph replays this one)
}

// The RoPE + KV-write epilogue of one rotation pair (l32_rope_kv_write's arithmetic, so its bits): pair
// (j, j + head_dim / 2) of q or k head `head` (q heads first) of token i, whose unrotated bf16 values are a and b,
// rotated by the token's position; q goes to row i of out (width n), k to the token's cache slot (slot_base: its
// first element in the pool; nothing where the token is not cached).
__device__ __forceinline__ void rope_write_pair(const l32_rope_params& r, bf16* out, int64_t n, int i, int head,
                                                int j, float a, float b, int64_t slot_base, bool cached) {
    const int d = r.head_dim, half = d / 2;
    float sn, cs;
    sincosf(__fmul_rn(static_cast<float>(r.positions[i]), r.inv_freq[j]), &sn, &cs);
    float o1, o2;
    rope_rotate(a, b, cs, sn, o1, o2);
    if (head < r.num_heads) {
        bf16* q = out + static_cast<int64_t>(i) * n + int64_t{head} * d + j;
        q[0] = __float2bfloat16_rn(o1);
        q[half] = __float2bfloat16_rn(o2);
    } else if (cached) {
        bf16* kc = static_cast<bf16*>(r.k_cache) + slot_base + int64_t{head - r.num_heads} * d + j;
        kc[0] = __float2bfloat16_rn(o1);
        kc[half] = __float2bfloat16_rn(o2);
    }
}

// One block's tile of the product once x is ready: the main loop over k (kSmemX: x rows from shared memory), the
// warps' partial tiles summed in warp order, and the mode's epilogue (see the kernel in gemv.cu). br, w0 and w1 are
// the tile's rows (block_rows of tile `blk`); the block is kWarps * 32 threads; `partial` is free on entry and read
// by the epilogue until this returns.
template <int kTiles, int kWarps, int kMode, bool kSmemX>
__device__ __forceinline__ void gemv_tile(const l32_gemv_params& p, const BlockRows& br, const uint4* w0,
                                          const uint4* w1, const XRows<kTiles>& xrows,
                                          float (&partial)[kWarps][kTiles * 8][kRows], int m, int kv, int warp, int g,
                                          int t, int64_t blk) {
    float acc[kTiles][4];
#pragma unroll
    for (int j = 0; j < kTiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    constexpr int kStep = kUnroll * kWarps * 4;
    int base = 0;
    for (; base + kStep <= kv; base += kStep) {
        gemv_step<kTiles, kWarps, false, kSmemX>(acc, w0, w1, xrows, base, kv, warp, t);
    }
    if (base < kv) gemv_step<kTiles, kWarps, true, kSmemX>(acc, w0, w1, xrows, base, kv, warp, t);

    store_warp_tiles<kTiles, kWarps, kRows>(partial, acc, warp, g, t);
    __syncthreads();
    // kTiles * 8 * kRows <= 256 outputs, at most one per thread. Each sum runs in warp order and is rounded to
    // bf16 as the plain kernel writes it; the paired modes then apply their element function.
    const int i = threadIdx.x / kRows, c = threadIdx.x % kRows;
    if (i >= m) return;
    const auto sum = [&](int col) {
        return __float2bfloat16_rn(warp_order_sum<kTiles, kWarps, kRows>(partial, i, col));
    };
    auto* out = static_cast<bf16*>(p.out);
    if constexpr (kMode == kSilu) {
        // Gate (MMA row c) and up (row c + 8), then SwiGLU's element function as l32_silu_mul computes it.
        if (c >= kRows / 2 || br.n0 + c >= p.n) return;
        const float gate = __bfloat162float(sum(c)), up = __bfloat162float(sum(c + kRows / 2));
        out[static_cast<int64_t>(i) * p.n + br.n0 + c] = __float2bfloat16_rn(silu_mul_f32(gate, up));
    } else if constexpr (kMode == kRope) {
        const l32_rope_params& r = p.rope;
        const int d = r.head_dim;
        const uint32_t slot = r.slot_mapping[i];
        const bool cached = slot < static_cast<uint64_t>(r.num_slots);
        if (!cached && slot != L32_PAD_SLOT && r.bad_slot != nullptr && c == 0 && blk == 0) *r.bad_slot = 1u;
        const int64_t slot_base = cached ? static_cast<int64_t>(slot) * r.num_kv_heads * d : 0;
        if (br.head < 0) {
            // v: 16 consecutive values of the v part, straight to the cache slot.
            if (!cached) return;
            const int64_t vi = br.n0 + c - int64_t{r.num_heads + r.num_kv_heads} * d;
            static_cast<bf16*>(r.v_cache)[slot_base + vi] = sum(c);
            return;
        }
        // q or k: pair (j0 + c, j0 + c + half) of head br.head.
        if (c >= kRows / 2) return;
        rope_write_pair(r, out, p.n, i, br.head, br.j0 + c, __bfloat162float(sum(c)),
                        __bfloat162float(sum(c + kRows / 2)), slot_base, cached);
    } else {
        if (br.n0 + c >= p.n) return;
        out[static_cast<int64_t>(i) * p.n + br.n0 + c] = sum(c);
    }
}

}  // namespace gemv_dev
}  // namespace l32
