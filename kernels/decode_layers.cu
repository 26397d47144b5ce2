// kernels/decode_layers.cu: the persistent decode stack (l32_decode_layers_params in llama32_kernels.h), every
// decoder layer of a decode step of up to 8 sequences in one launch, with bf16 projections (the gemv tiles below) or
// W4A16 ones (kernels/decode_layers_w4a16.cuh: the decode kernels' tiles at min(8, k / 64) K splits).
//
// Why: a 1B batch-1 step is ~130 dependent kernels, and each boundary exposes a ramp and a tail (the architecture
// doc's "one persistent kernel per step": about 20 us a layer over the roofline on an H100). Here one cooperative
// launch of one block per SM runs the 16 (or 28) layers, five phases each, separated by grid barriers
// (common/grid_barrier.cuh); before a block arrives at a barrier it asks L2 for the first bytes of its weight rows
// of the next projection, which no phase writes, so the weight stream need not stop at the barrier.
//
// Three tiers: the kernel, the launcher, the checked C entry.
//
// Phases of layer l (block b of B, 8 warps; "tiles" are those of kernels/gemv.cu, tile i taken by block i mod B):
//   1. every block computes rms_norm(x [+ delta]) of the m rows into shared memory (the gemv norm prologue; with
//      delta the last block through it writes x + delta back to x), then its qkv tiles with the RoPE + KV-write
//      epilogue (gemv rope_on);
//   2. the split-KV decode attention: item i = (split, kv head, sequence) taken by warps 0 .. kDecodeWarps - 1 of
//      block i mod B (decode_device.cuh, a named barrier among those warps), the splits merged by the group that
//      finishes last (fused merge); meanwhile the idle warps ask L2 for the block's first two gate_up tiles, so
//      that HBM keeps streaming weights while the attention reads the cache (o's first tile is asked for before);
//   3. o: the attention rows staged into shared memory, then the tiles, output into delta;
//   4. as 1 with the MLP norm and delta = o's output, then the gate_up tiles with the SwiGLU epilogue into act;
//   5. down: act staged, the tiles, output into delta.
// Every phase runs the multi-kernel step's device code with the parameters it would get (gemv at warps = 8), so the
// bits are those of that step. Profiling: with params.phase_times each block's thread 0 writes %globaltimer where
// each phase starts and ends (at the grid barriers), so the host can tell a phase's work from its wait.
// Activations written in this launch are read from L2 (ld.global.cg, cp.async.cg, __ldcg): L1 is not coherent
// across SMs. Weights and metadata, which nothing writes, go through the read-only path
// as in the gemv kernel.
//
// ptxas (CUDA 13.0; sm_80 / sm_89 / sm_90a), no spills, a 32-byte stack frame (sincosf's large-angle path, as in
// the gemv RoPE epilogue): bf16 decode_layers_kernel<64> 166 / 168 / 177 registers, 4688 B static shared memory;
// <128> 209 / 211 / 223 registers, 4432 B. W4A16: <64> 194 / 196 / 182, 8784 B; <128> 220 / 222 / 226, 8528 B.
// One 256-thread block per SM either way. Dynamic shared memory: the
// widest staged rows, 16 (k / 8 + 1) bytes a row (1B / 3B: the down input, 16 KB at m = 1, 131 KB at m = 8), or
// the decode attention's 34-36 KB.
#include <climits>
#include <cmath>
#include <cstdint>

#include "attention/decode_device.cuh"
#include "common/grid_barrier.cuh"
#include "common/status.cuh"
#include "common/sync.cuh"
#include "decode_layers_w4a16.cuh"
#include "gemv_device.cuh"
#include "llama32_kernels.h"

namespace l32 {
namespace {

using namespace gemv_dev;
using decode_dev::DecodeTraits;
using decode_dev::kMaxGroup;
using decode_dev::kMaxSplits;

constexpr int kWarps = 8;  // the gemv tiles' k split, and the block
constexpr int kThreads = 32 * kWarps;

// The decode attention's instantiation per head_dim, as l32_paged_decode picks it (two K/V stages).
template <int D>
struct StackTraits {
    static constexpr int kDecodeWarps = decode_dev::kDecodeWarps<D>;
    using Decode = DecodeTraits<D, kDecodeWarps, 2>;
};

// Bytes of m staged rows of k bf16 (stride 16 (k / 8 + 1): the gemv kernel's padded layout).
__host__ __device__ inline int64_t rows_smem(int64_t m, int64_t k) { return m * 16 * (k / 8 + 1); }

// Row i of x [m, k] into shared memory at xs + i * stride, from L2 (other blocks wrote x in this launch).
__device__ __forceinline__ void stage_rows(const bf16* x, int m, int kv, unsigned char* xs, int stride) {
    const auto* src = reinterpret_cast<const uint4*>(x);
    for (int idx = threadIdx.x; idx < m * kv; idx += kThreads) {
        const int r = idx / kv, c = idx % kv;
        *reinterpret_cast<uint4*>(xs + r * stride + 16 * c) = __ldcg(src + static_cast<int64_t>(r) * kv + c);
    }
    __syncthreads();
}

// Asks L2 for the first `max_bytes` (at most; 16-byte multiples) of each of the 16 weight rows of tile `tile`, one
// bulk prefetch per row from threads first .. first + 15 (sm_90; nothing elsewhere). Weights are never written, so
// this may run ahead of any barrier.
template <int kMode>
__device__ __forceinline__ void prefetch_tile(const l32_gemv_params& gp, int64_t tile, int64_t tiles,
                                              int64_t max_bytes, int first = 0) {
    const int i = static_cast<int>(threadIdx.x) - first;
    if (i < 0 || i >= 16 || tile >= tiles) return;
    const BlockRows br = block_rows<kMode>(gp, i % 8, tile);
    const int64_t r = i < 8 ? br.r0 : br.r1;
    const auto bytes = static_cast<uint32_t>(min(gp.k * 2, max_bytes));
    prefetch_l2_bulk(static_cast<const bf16*>(gp.w) + r * gp.k, bytes);
}

// This block's first tile of the next projection: the first 8 KB of each row, asked for before the barrier ahead of
// it so that they stream in while the block waits.
template <int kMode>
__device__ __forceinline__ void prefetch_first_tile(const l32_gemv_params& gp, int64_t tiles) {
    prefetch_tile<kMode>(gp, blockIdx.x, tiles, 8192);
}

// Tiles of a projection whose x rows are in shared memory at xs (row stride `stride`): tile blockIdx.x, then every
// gridDim.x-th, each exactly as the gemv kernel's block `tile` computes it. While a tile runs, the next one's rows
// (up to 16 KB each) are asked of L2, so that the stream goes on through the tile's reduction and epilogue (the
// gemv kernel has two blocks per SM for that; this kernel has one).
template <int kMode>
__device__ __forceinline__ void run_tiles(const l32_gemv_params& gp, int64_t tiles, unsigned char* xs, int stride,
                                          float (&partial)[kWarps][8][kRows]) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int m = static_cast<int>(gp.m), kv = static_cast<int>(gp.k / 8);
    XRows<1> xrows;
    const int row = min(g, m - 1);
    xrows.xr[0] = nullptr;  // not read: x comes from shared memory
    xrows.xs[0] = smem_addr(xs) + static_cast<uint32_t>(row * stride);
    const auto* w = static_cast<const bf16*>(gp.w);
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        prefetch_tile<kMode>(gp, tile + gridDim.x, tiles, 16384);
        const BlockRows br = block_rows<kMode>(gp, g, tile);
        const auto* w0 = reinterpret_cast<const uint4*>(w + br.r0 * gp.k);
        const auto* w1 = reinterpret_cast<const uint4*>(w + br.r1 * gp.k);
        gemv_tile<1, kWarps, kMode, true>(gp, br, w0, w1, xrows, partial, m, kv, warp, g, t, tile);
        __syncthreads();  // the epilogue has read `partial`, which the next tile overwrites
    }
}

// The gemv parameters of one projection (m rows, warps = 8), as the multi-kernel step passes them.
__device__ __forceinline__ l32_gemv_params gemv_params(const l32_decode_layers_params& p, void* out, const void* x,
                                                       const void* w, int64_t k, int64_t n) {
    l32_gemv_params g = {};
    g.out = out;
    g.x = x;
    g.w = w;
    g.m = p.m;
    g.k = k;
    g.n = n;
    g.warps = kWarps;
    g.dtype = L32_DTYPE_BF16;
    return g;
}

// The norm prologue's fields: weight, and with `residual` the delta added to x (counter: the stack's).
__device__ __forceinline__ void set_norm(l32_gemv_params& g, const l32_decode_layers_params& p, const void* weight,
                                         bool residual) {
    g.norm.weight = weight;
    g.norm.delta = residual ? p.delta : nullptr;
    g.norm.counter = p.counters + 2;
    g.norm.eps = p.eps;
}

// Layer L's qkv projection with the norm prologue (with `residual`, after the residual add) and the RoPE + KV-write
// epilogue (D: head_dim).
template <int D>
__device__ __forceinline__ l32_gemv_params qkv_params(const l32_decode_layers_params& p,
                                                      const l32_decode_layer_weights& L, bool residual) {
    const int64_t n = int64_t{p.num_heads + 2 * p.num_kv_heads} * D;
    l32_gemv_params g = gemv_params(p, p.qkv, p.x, L.wqkv, p.hidden, n);
    set_norm(g, p, L.attn_norm, residual);
    g.rope_on = 1;
    g.rope.k_cache = L.k_cache;
    g.rope.v_cache = L.v_cache;
    g.rope.positions = p.positions;
    g.rope.slot_mapping = p.slot_mapping;
    g.rope.inv_freq = p.inv_freq;
    g.rope.bad_slot = nullptr;
    g.rope.num_slots = p.num_slots;
    g.rope.num_heads = p.num_heads;
    g.rope.num_kv_heads = p.num_kv_heads;
    g.rope.head_dim = D;
    return g;
}

// Tier 1. grid = one block per SM (cooperative), kThreads threads, smem_bytes (below) of dynamic shared
// memory. D: head_dim; kW4: W4A16 projections (decode_layers_w4a16.cuh) instead of bf16 gemv tiles.
template <int D, bool kW4>
__global__ void __launch_bounds__(kThreads, 1) decode_layers_kernel(const __grid_constant__ l32_decode_layers_params p) {
    pdl_begin();  // a cooperative launch is never programmatic: returns at once
    using S = StackTraits<D>;
    extern __shared__ __align__(16) unsigned char smem[];
    // bf16: the gemv tile's warp partials (partial[0]); W4A16: an item's split partials, two tiles.
    __shared__ float partial[kW4 ? 2 : 1][kWarps][8][kRows];
    __shared__ float s_m[S::kDecodeWarps][kMaxGroup], s_l[S::kDecodeWarps][kMaxGroup];
    GridBarrier barrier(p.counters);
    // Profiling (p.phase_times): this block's [start, end] of phase ph of layer l, or nullptr when not timed.
    // Only a grid of exactly timing_blocks blocks writes: the host reads the layout with that stride.
    const bool timed = p.phase_times != nullptr && static_cast<int>(gridDim.x) == p.timing_blocks;
    const auto slot = [&](int l, int ph) -> uint64_t* {
        if (!timed) return nullptr;
        const int64_t phase = static_cast<int64_t>(l) * L32_DECODE_LAYERS_PHASES + ph;
        return p.phase_times + (phase * gridDim.x + blockIdx.x) * 2;
    };
    // The grid barrier after phase ph of layer l: the block's arrival ends that phase, its departure starts the next.
    const auto barrier_after = [&](int l, int ph) {
        uint64_t* const end = slot(l, ph);
        uint64_t* const next = ph + 1 < L32_DECODE_LAYERS_PHASES ? slot(l, ph + 1) : slot(l + 1, 0);
        barrier.wait(end == nullptr ? nullptr : end + 1, next);
    };
    if (timed && threadIdx.x == 0) *slot(0, 0) = global_ns();
    const int m = p.m;
    const int64_t hidden = p.hidden, inter = p.inter;
    const int64_t q_dim = int64_t{p.num_heads} * D, qkv_n = int64_t{p.num_heads + 2 * p.num_kv_heads} * D;
    const int hidden_stride = static_cast<int>(16 * (hidden / 8 + 1));

    for (int l = 0; l < p.num_layers; ++l) {
        const l32_decode_layer_weights& L = p.layers[l];
        // kW4: the layer's projections (unused by the bf16 instantiation).
        const stack_w4::Proj w4_qkv = stack_w4::proj(L.wqkv, L.s_qkv, qkv_n, hidden);
        const stack_w4::Proj w4_o = stack_w4::proj(L.wo, L.s_o, hidden, q_dim);
        const stack_w4::Proj w4_gate_up = stack_w4::proj(L.w_gate_up, L.s_gate_up, 2 * inter, hidden);
        const stack_w4::Proj w4_down = stack_w4::proj(L.w_down, L.s_down, hidden, inter);

        // 1. norm (+ residual), qkv, RoPE, KV write.
        const l32_gemv_params qkv = qkv_params<D>(p, L, l > 0);
        norm_prologue<kWarps, true>(qkv, smem, hidden_stride, m, static_cast<int>(hidden / 8));
        const l32_gemv_params o = gemv_params(p, p.delta, p.attn, L.wo, q_dim, hidden);
        if constexpr (kW4) {
            stack_w4::run_items<kRope>(w4_qkv, smem, hidden_stride, m, static_cast<bf16*>(p.qkv), qkv.rope, partial);
            stack_w4::prefetch_block_item<kPlain>(w4_o, qkv.rope);
        } else {
            run_tiles<kRope>(qkv, qkv_n / kRows, smem, hidden_stride, partial[0]);
            prefetch_first_tile<kPlain>(o, (hidden + kRows - 1) / kRows);
        }
        barrier_after(l, 0);

        // 2. attention. The warps it leaves idle ask L2 for this block's first two gate_up tiles meanwhile (o's
        // first tile is already asked for: the weight stream goes on while attention reads the cache).
        l32_gemv_params gate_up = gemv_params(p, p.act, p.x, L.w_gate_up, hidden, inter);
        set_norm(gate_up, p, L.mlp_norm, true);
        gate_up.silu_pairs = 1;
        const int64_t gate_up_tiles = (inter + kRows / 2 - 1) / (kRows / 2);
        constexpr int kIdle = 32 * S::kDecodeWarps;  // the first thread the attention leaves idle
        if constexpr (kW4) {
            stack_w4::prefetch_block_item<kSilu>(w4_gate_up, qkv.rope, 0, kIdle);
            stack_w4::prefetch_block_item<kSilu>(w4_gate_up, qkv.rope, 1, kIdle + 16);
        } else {
            prefetch_tile<kSilu>(gate_up, blockIdx.x, gate_up_tiles, 16384, kIdle);
            prefetch_tile<kSilu>(gate_up, blockIdx.x + gridDim.x, gate_up_tiles, 16384, kIdle + 16);
        }
        if (threadIdx.x < 32 * S::kDecodeWarps) {
            l32_paged_decode_params a = {};
            a.out = p.attn;
            a.q = p.qkv;
            a.k_cache = L.k_cache;
            a.v_cache = L.v_cache;
            a.positions = p.positions;
            a.block_tables = p.block_tables;
            a.workspace = p.workspace;
            a.merge_counters = p.counters + 3;
            a.num_seqs = m;
            a.q_stride = qkv_n;
            a.max_blocks_per_seq = p.max_blocks_per_seq;
            a.num_heads = p.num_heads;
            a.num_kv_heads = p.num_kv_heads;
            a.head_dim = D;
            a.block_size = p.block_size;
            a.num_splits = p.num_splits;
            a.scale = p.scale;
            a.fused_merge = 1;
            a.dtype = L32_DTYPE_BF16;
            const NamedSync group{1, 32 * S::kDecodeWarps};
            const int items = p.num_splits * p.num_kv_heads * m;
            for (int item = blockIdx.x; item < items; item += gridDim.x) {
                const int split = item % p.num_splits, rest = item / p.num_splits;
                decode_dev::decode_split<D, S::kDecodeWarps, true, 2>(a, split, rest % p.num_kv_heads,
                                                                      rest / p.num_kv_heads, threadIdx.x, smem, s_m,
                                                                      s_l, group);
                group();  // the next item's copies overwrite what this one's merge reads
            }
        }
        barrier_after(l, 1);

        // 3. o.
        const int q_stride = static_cast<int>(16 * (q_dim / 8 + 1));
        stage_rows(static_cast<const bf16*>(p.attn), m, static_cast<int>(q_dim / 8), smem, q_stride);
        if constexpr (kW4) {
            stack_w4::run_items<kPlain>(w4_o, smem, q_stride, m, static_cast<bf16*>(p.delta), qkv.rope, partial);
        } else {
            run_tiles<kPlain>(o, (hidden + kRows - 1) / kRows, smem, q_stride, partial[0]);
        }
        barrier_after(l, 2);

        // 4. norm + residual, gate_up, SwiGLU.
        norm_prologue<kWarps, true>(gate_up, smem, hidden_stride, m, static_cast<int>(hidden / 8));
        const l32_gemv_params down = gemv_params(p, p.delta, p.act, L.w_down, inter, hidden);
        if constexpr (kW4) {
            stack_w4::run_items<kSilu>(w4_gate_up, smem, hidden_stride, m, static_cast<bf16*>(p.act), qkv.rope,
                                       partial);
            stack_w4::prefetch_block_item<kPlain>(w4_down, qkv.rope);
        } else {
            run_tiles<kSilu>(gate_up, gate_up_tiles, smem, hidden_stride, partial[0]);
            prefetch_first_tile<kPlain>(down, (hidden + kRows - 1) / kRows);
        }
        barrier_after(l, 3);

        // 5. down.
        const int inter_stride = static_cast<int>(16 * (inter / 8 + 1));
        stage_rows(static_cast<const bf16*>(p.act), m, static_cast<int>(inter / 8), smem, inter_stride);
        if constexpr (kW4) {
            stack_w4::run_items<kPlain>(w4_down, smem, inter_stride, m, static_cast<bf16*>(p.delta), qkv.rope,
                                        partial);
        } else {
            run_tiles<kPlain>(down, (hidden + kRows - 1) / kRows, smem, inter_stride, partial[0]);
        }
        if (l + 1 < p.num_layers) {
            const l32_decode_layer_weights& next = p.layers[l + 1];
            if constexpr (kW4) {
                stack_w4::prefetch_block_item<kRope>(stack_w4::proj(next.wqkv, next.s_qkv, qkv_n, hidden), qkv.rope);
            } else {
                prefetch_first_tile<kRope>(qkv_params<D>(p, next, true), qkv_n / kRows);
            }
            barrier_after(l, 4);
        }
    }
    if (timed) {
        __syncthreads();  // every thread is through the last phase
        if (threadIdx.x == 0) slot(p.num_layers - 1, L32_DECODE_LAYERS_PHASES - 1)[1] = global_ns();
    }
}

// Dynamic shared memory of one block: the widest staged rows, or the decode attention's tiles.
template <int D>
int64_t smem_bytes(const l32_decode_layers_params& p) {
    const int64_t q_dim = int64_t{p.num_heads} * D;
    const int64_t rows = rows_smem(p.m, std::max<int64_t>({p.hidden, q_dim, p.inter}));
    return std::max<int64_t>(rows, StackTraits<D>::Decode::kSmemBytes);
}

// Tier 2: a cooperative launch (every block resident, or the launch fails) of one block per SM.
template <int D, bool kW4>
l32_status launch(const l32_decode_layers_params& p, cudaStream_t stream) {
    const auto smem = static_cast<size_t>(smem_bytes<D>(p));
    const int blocks = one_block_per_sm(decode_layers_kernel<D, kW4>, kThreads, smem);
    if (blocks == 0) return L32_UNSUPPORTED;
    launch_cooperative(decode_layers_kernel<D, kW4>, blocks, kThreads, smem, stream, p);
    return check_launch();
}

template <int D>
l32_status launch(const l32_decode_layers_params& p, cudaStream_t stream) {
    return p.weights == L32_DECODE_WEIGHTS_W4A16 ? launch<D, true>(p, stream) : launch<D, false>(p, stream);
}

// The sizes the kernel takes (pointers aside).
bool supported(const l32_decode_layers_params& p) {
    if (p.dtype != L32_DTYPE_BF16 || (p.head_dim != 64 && p.head_dim != 128)) return false;
    if (p.weights != L32_DECODE_WEIGHTS_BF16 && p.weights != L32_DECODE_WEIGHTS_W4A16) return false;
    const int64_t q_dim = int64_t{p.num_heads} * p.head_dim;
    // The W4A16 layout's 64-column chunks of every input width.
    if (p.weights == L32_DECODE_WEIGHTS_W4A16 && (p.hidden % 64 != 0 || q_dim % 64 != 0 || p.inter % 64 != 0)) {
        return false;
    }
    if (p.m < 1 || p.m > L32_DECODE_LAYERS_MAX_M || p.num_layers < 1) return false;
    if (p.hidden <= 0 || p.hidden % 8 != 0 || p.inter <= 0 || p.inter % 8 != 0) return false;
    if (p.num_heads <= 0 || p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0) return false;
    if (p.num_heads / p.num_kv_heads > kMaxGroup || p.num_splits < 1 || p.num_splits > kMaxSplits) return false;
    // The norm's in-register rows (l32_norm: 8 vectors of 8 per thread of at most kNormMaxThreads).
    if (p.hidden > 8 * 8 * kNormMaxThreads) return false;
    if (q_dim > INT_MAX / 4 || p.inter > INT_MAX / 4 || p.block_size < 1 || p.max_blocks_per_seq < 1) return false;
    return p.num_slots >= 1 && p.num_slots <= int64_t{L32_PAD_SLOT};
}

}  // namespace
}  // namespace l32

// Tier 3: the checked entry.
extern "C" l32_status l32_decode_layers(const l32_decode_layers_params* params, void* stream) {
    using namespace l32;
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_decode_layers_params& p = *params;
    if (p.layers == nullptr || p.x == nullptr || p.delta == nullptr || p.qkv == nullptr || p.attn == nullptr ||
        p.act == nullptr || p.positions == nullptr || p.slot_mapping == nullptr || p.inv_freq == nullptr ||
        p.block_tables == nullptr || p.counters == nullptr) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.num_splits > 1 && p.workspace == nullptr) return L32_INVALID_ARGUMENT;
    if (p.phase_times != nullptr && p.timing_blocks < 1) return L32_INVALID_ARGUMENT;
    if (!(p.eps >= 0.f) || !std::isfinite(p.eps) || !(p.scale > 0.f) || !std::isfinite(p.scale)) {
        return L32_INVALID_ARGUMENT;
    }
    if (!supported(p)) return L32_UNSUPPORTED;
    const void* const rows[] = {p.x, p.delta, p.qkv, p.attn, p.act, p.workspace};
    for (const void* a : rows) {
        if (!is_aligned(a, 16)) return L32_UNSUPPORTED;
    }
    const auto s = static_cast<cudaStream_t>(stream);
    return p.head_dim == 64 ? launch<64>(p, s) : launch<128>(p, s);
}
