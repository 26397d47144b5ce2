// kernels/gemv.cu: the skinny GEMM of decode, out[m, n] = x[m, k] @ w[n, k]^T with m <= 16 (l32_gemv_params in
// llama32_kernels.h).
//
// Three tiers: the kernel, the launcher that picks the template arguments, and the checked C entry.
//
// Bandwidth bound on w: at m = 16 it is 16 FLOP per weight byte, far under the tensor cores' ratio, so the goal is
// to stream w once at the copy rate with enough bytes in flight, and to spend as few instructions per weight byte as
// possible. Design:
//   - A block owns a tile of kRows = 16 rows of w (16 output columns) and splits k over its `warps` warps (8 or 16).
//     Each lane streams 16-byte vectors of w (ld.global.nc.L1::no_allocate: read once, kept out of L1) from rows
//     g and g + 8 (g = lane / 4), kUnroll = 4 vector pairs per step, so 128 bytes of w per lane are in flight.
//   - x is read straight from global memory through L1 (ld.global.nc.L1::evict_last): every block reads all of x,
//     so it stays in L1/L2; a lane reads the 16-byte vector of x row g (and g + 8 when m > 8) at its w position.
//   - The dot products are tensor-core MMAs (mma.sync m16n8k16, bf16 in, f32 accumulate): A = the 16 w rows,
//     B = x^T (8 columns of x rows per MMA: one MMA tile for m <= 8, two for m <= 16). The MMA's k order is free as
//     long as A and B agree, so a lane's 16-byte vector (8 consecutive k) feeds two MMAs directly: elements 0-3 to
//     the first (fragment words a0/a2 and b0/b1), elements 4-7 to the second, with no shuffles or conversions.
//     Per 32 bytes of w a lane issues 2 loads of w, 1 (or 2) loads of x and 2 (or 4) MMAs; an f32 FMA loop would
//     need 8 conversions and 8 m FMAs per 16 bytes, which at m = 16 is most of an SM's FMA rate.
//   - Rows past n and x rows past m are clamped to the last valid row (loads stay in bounds, the extra MMA columns
//     and rows are discarded), so the main loop has no predicates; k is covered in steps of kUnroll * warps * 4
//     vectors, and only the last, partial step checks each vector against k / 8 and zeroes what lies past it.
//   - With silu_pairs, w is SwiGLU's gate_up projection [2 n, k] and the output is silu(gate) * up [m, n]: a
//     block takes 8 gate rows (MMA rows 0-7) and the 8 matching up rows (MMA rows 8-15), so a lane's two weight
//     rows are gate j and up j, and the final reduction holds both sums of an output in one thread. It rounds
//     each to bf16 (what the plain kernel writes) and applies l32_silu_mul's element function
//     (kernels/common/silu.cuh): the bits of gemv then silu_mul, with one kernel and one [m, 2 n] round trip
//     less, and one SiLU per output. Per element, an MMA's result depends only on its own row and column, and the
//     warp split of k is the same (the block count is ceil(2 n / 16) either way), so nothing else changes.
//     (An earlier version fused SwiGLU into the *down* projection's input instead: every block recomputed SiLU
//     over all of x, which made the kernel ALU-bound and slower than two kernels on an H200.)
//   - With rope_on, w is the fused qkv projection and the epilogue is l32_rope_kv_write's: a q or k block takes the
//     8 rotation pairs (j, j + head_dim / 2) of one head as its MMA rows 0-7 and 8-15, a v block 16 plain rows;
//     the reducing thread rounds both sums to bf16, computes the angle and sincosf as the RoPE kernel does and
//     rotates with its function (kernels/common/rope.cuh), then writes q into out and the rotated k and the v
//     into the token's cache slot. The k and v parts of out are not written (attention reads k and v from the
//     cache).
//   - With the norm prologue (p.norm.weight set; any epilogue mode), x is the residual stream and every block first
//     writes rms_norm(x [+ delta]) for all m rows into shared memory (norm_prologue: l32_norm's per-thread sums of
//     squares and reduction tree replayed by this block's warps, then its rounding, so the rows are bit for bit
//     what l32_norm writes); the main loop then reads x from there (ld.shared, rows padded by 16 bytes) instead of
//     global memory. With delta, the last block through the prologue (an atomic counter, reset by that block)
//     writes bf16(x + delta) back to x: every block has read x by then. One norm kernel and its [m, k] round trip
//     less per projection.
//   - The warps' partial tiles meet in shared memory and are summed in warp order (deterministic), then each
//     output is rounded to bf16 once.
// Worked examples on an H100 (132 SMs), via gemv::warps_per_block: n = 2048 is 128 tiles, 16 warps each (one block
// per SM, 64 KB of w in flight per SM; at k = 2048 each warp issues all its loads in one step); n = 3072 is 192 tiles
// of 8 warps (two blocks per SM fit, so all run at once); n = 128256 is 8016 tiles of 8 warps.
//
// Registers from ptxas (CUDA 13.0, sm_80 / sm_89 / sm_90a), no spills, no stack frame, either warp count:
// kTiles = 1: 114 / 114 / 116; kTiles = 2: 128 / 128 / 128 (the cap of two 256-thread blocks per SM); the
// silu_pairs variants the same. The rope_on variants: 118 / 128, with a 32-40-byte stack frame for sincosf's
// large-angle reduction and, at kTiles = 2, a 4-12-byte spill in the epilogue. With the norm prologue: 86-94
// (kTiles = 1) and 102-114 (kTiles = 2) registers, no spills, plus m (k + 8) * 2 bytes of dynamic shared memory
// (at most L32_GEMV_NORM_MAX_SMEM, 82 KB, so that with the 4-16 KB below it fits sm_89's 99 KB). ptxas unrolls
// the main loop twice and issues the next step's loads before this step's MMAs, so up to 16 w vectors (256 bytes)
// per lane are in flight. Shared memory: warps * kTiles * 8 * 16 * 4 bytes (4 to 16 KB). SASS (sm_90a): w loads are
// LDG.E.NA.128.CONSTANT, x loads LDG.E.EL.128.CONSTANT, the products HMMA.16816.F32.BF16.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>

#include "common/status.cuh"
#include "gemv_device.cuh"
#include "llama32_kernels.h"

namespace l32 {
namespace {

using namespace gemv_dev;

constexpr int64_t kMaxK = int64_t{1} << 24;

// Tier 1. grid = ceil(n / kRows) (kSilu: ceil(n / 8); kRope: n / 16), block = kWarps * 32. kTiles = ceil(m / 8)
// MMA column tiles of x rows. In kSilu and kRope pair blocks, MMA rows 0-7 and 8-15 are the two halves of each
// output's pair, so an output's two sums meet in one thread of the final reduction (see BlockRows).
// With 8 warps two blocks fit per SM (at most 128 registers), with 16 warps one.
// kNorm: the norm prologue (l32_gemv_norm) stages the normalized x rows in dynamic shared memory first.
// kWhole (l32_set_gemv_prefetch_whole; a template argument, so the default kernels keep their code): before waiting
// for the previous kernel, ask L2 for the block's whole weight rows (one bulk prefetch per row, sm_90) instead of
// each lane's first step.
template <int kTiles, int kWarps, int kMode, bool kNorm, bool kWhole = false>
__global__ void __launch_bounds__(kWarps * 32, 16 / kWarps) gemv_kernel(const __grid_constant__ l32_gemv_params p) {
    __shared__ float partial[kWarps][kTiles * 8][kRows];
    extern __shared__ __align__(16) unsigned char x_norm[];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int m = static_cast<int>(p.m);
    const int kv = static_cast<int>(p.k / 8);

    // Rows past n (last tile) and x rows past m read the last valid row; their results are never written.
    const BlockRows br = block_rows<kMode>(p, g, blockIdx.x);
    const auto* w = static_cast<const bf16*>(p.w);
    const auto* w0 = reinterpret_cast<const uint4*>(w + br.r0 * p.k);
    const auto* w1 = reinterpret_cast<const uint4*>(w + br.r1 * p.k);
    // The weights of this lane's first step into L2 (or, with prefetch_whole, the block's 16 rows whole: lanes
    // t = 0 of warp 0 hold rows g and g + 8), then wait for the previous kernel (which writes x): under PDL the
    // first weight bytes stream while that kernel finishes (see kernels/common/launch.cuh).
    if constexpr (kWhole) {
        if (warp == 0 && t == 0) {
            prefetch_l2_bulk(w0, static_cast<uint32_t>(p.k * 2));
            prefetch_l2_bulk(w1, static_cast<uint32_t>(p.k * 2));
        }
    } else {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int v = (u * kWarps + warp) * 4 + t;
            if (v < kv) {
                prefetch_l2(w0 + v);
                prefetch_l2(w1 + v);
            }
        }
    }
    pdl_begin();
    // Normalized rows in shared memory: kv + 1 vectors per row, so the 8 rows a warp reads at one position start in
    // different banks.
    const int xs_stride = 16 * (kv + 1);
    if constexpr (kNorm) norm_prologue<kWarps>(p, x_norm, xs_stride, m, kv);
    XRows<kTiles> xrows;
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
        const int row = std::min(g + 8 * j, m - 1);
        xrows.xr[j] = reinterpret_cast<const uint4*>(static_cast<const bf16*>(p.x) + static_cast<int64_t>(row) * p.k);
        xrows.xs[j] = smem_addr(x_norm) + static_cast<uint32_t>(row * xs_stride);
    }

    gemv_tile<kTiles, kWarps, kMode, kNorm>(p, br, w0, w1, xrows, partial, m, kv, warp, g, t, blockIdx.x);
}

// The switch behind l32_set_gemv_prefetch_whole, off by default.
std::atomic<int> gemv_prefetch_whole_flag{0};

// Bytes of the norm prologue's normalized rows: m rows of k + 8 bf16.
int64_t norm_smem_bytes(const l32_gemv_params& p) { return p.m * (p.k + 8) * 2; }

// Tier 2.
template <int kTiles, int kWarps, int kMode, bool kNorm>
l32_status launch_mode(const l32_gemv_params& p, unsigned grid, cudaStream_t stream) {
    // The whole-row prefetch (an sm_90 instruction) applies to the kernels without the norm prologue; elsewhere the
    // first-step prefetch stays.
    const bool whole =
        !kNorm && gemv_prefetch_whole_flag.load(std::memory_order_relaxed) != 0 && device_runs_sm90a();
    const auto kernel = whole ? gemv_kernel<kTiles, kWarps, kMode, kNorm, !kNorm> : gemv_kernel<kTiles, kWarps, kMode, kNorm>;
    const size_t smem = kNorm ? static_cast<size_t>(norm_smem_bytes(p)) : 0;
    if (const l32_status s = allow_dynamic_smem(kernel, smem); s != L32_OK) return s;
    launch_kernel(kernel, grid, kWarps * 32, smem, stream, p);
    return check_launch();
}

template <int kTiles, int kWarps, bool kNorm>
l32_status launch(const l32_gemv_params& p, cudaStream_t stream) {
    static_assert(kTiles * 8 * kRows <= kWarps * 32, "one thread per output of the block");
    if (p.silu_pairs != 0) {
        const auto grid = static_cast<unsigned>((p.n + kRows / 2 - 1) / (kRows / 2));
        return launch_mode<kTiles, kWarps, kSilu, kNorm>(p, grid, stream);
    }
    if (p.rope_on != 0) return launch_mode<kTiles, kWarps, kRope, kNorm>(p, static_cast<unsigned>(p.n / kRows), stream);
    return launch_mode<kTiles, kWarps, kPlain, kNorm>(p, static_cast<unsigned>((p.n + kRows - 1) / kRows), stream);
}

template <bool kNorm>
l32_status dispatch(const l32_gemv_params& p, cudaStream_t stream) {
    const bool two = p.m > 8;
    if (p.warps == 16) return two ? launch<2, 16, kNorm>(p, stream) : launch<1, 16, kNorm>(p, stream);
    return two ? launch<2, 8, kNorm>(p, stream) : launch<1, 8, kNorm>(p, stream);
}

}  // namespace
}  // namespace l32

extern "C" void l32_set_gemv_prefetch_whole(int enabled) {
    l32::gemv_prefetch_whole_flag.store(enabled != 0 ? 1 : 0, std::memory_order_relaxed);
}

extern "C" int l32_gemv_prefetch_whole(void) { return l32::gemv_prefetch_whole_flag.load(std::memory_order_relaxed); }

// Tier 3: the checked entry.
extern "C" l32_status l32_gemv(const l32_gemv_params* params, void* stream) {
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_gemv_params& p = *params;
    if (p.dtype != L32_DTYPE_BF16) return L32_UNSUPPORTED;
    if (p.out == nullptr || p.x == nullptr || p.w == nullptr) return L32_INVALID_ARGUMENT;
    if (p.m <= 0 || p.k <= 0 || p.n < 0) return L32_INVALID_ARGUMENT;
    if (p.m > 16 || p.k % 8 != 0 || p.k > l32::kMaxK || p.n > INT_MAX / (p.silu_pairs != 0 ? 2 : 1)) {
        return L32_UNSUPPORTED;
    }
    if (!l32::is_aligned(p.x, 16) || !l32::is_aligned(p.w, 16)) return L32_UNSUPPORTED;
    if (p.warps != 8 && p.warps != 16) return L32_UNSUPPORTED;
    if (p.rope_on != 0) {
        // The fused QKV projection: head_dim / 2 a multiple of 8 (so the pair blocks and the v blocks tile the
        // row), and the row exactly the q, k and v heads.
        const l32_rope_params& r = p.rope;
        if (p.silu_pairs != 0) return L32_INVALID_ARGUMENT;
        if (r.k_cache == nullptr || r.v_cache == nullptr || r.positions == nullptr || r.slot_mapping == nullptr ||
            r.inv_freq == nullptr || r.num_heads <= 0 || r.num_kv_heads <= 0 || r.num_slots <= 0) {
            return L32_INVALID_ARGUMENT;
        }
        if (r.head_dim <= 0 || r.head_dim % 16 != 0 || r.head_dim > 512) return L32_UNSUPPORTED;
        if (p.n != (int64_t{r.num_heads} + 2 * int64_t{r.num_kv_heads}) * r.head_dim) return L32_INVALID_ARGUMENT;
        if (r.num_slots > int64_t{L32_PAD_SLOT}) return L32_UNSUPPORTED;
    }
    const l32_gemv_norm& nm = p.norm;
    const bool norm = nm.weight != nullptr;
    if (norm) {
        if (!(nm.eps >= 0.f) || !std::isfinite(nm.eps) || (nm.delta != nullptr && nm.counter == nullptr)) {
            return L32_INVALID_ARGUMENT;
        }
        if (!l32::is_aligned(nm.weight, 16) || (nm.delta != nullptr && !l32::is_aligned(nm.delta, 16))) {
            return L32_UNSUPPORTED;
        }
        // l32_norm's in-register rows (k / 8 <= 8 * 512 vectors) and the shared-memory budget.
        if (p.k > 8 * 8 * l32::kNormMaxThreads || l32::norm_smem_bytes(p) > L32_GEMV_NORM_MAX_SMEM) {
            return L32_UNSUPPORTED;
        }
    } else if (nm.delta != nullptr) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.n == 0) return L32_OK;
    const auto s = static_cast<cudaStream_t>(stream);
    return norm ? l32::dispatch<true>(p, s) : l32::dispatch<false>(p, s);
}
