// kernels/attention/prefill_sm90.cu: the paged causal prefill of prefill.cu (same parameters, same attention,
// same GQA folding and causal tile skipping) on Hopper's warpgroup MMA, for sm_90a. Launched by l32_paged_prefill
// when params.kernel is L32_PREFILL_WGMMA.
//
// Why: the mma.sync kernel feeds every tensor-core instruction through ldmatrix into registers; at 16 rows per warp
// each K/V fragment serves one MMA, so shared-memory bandwidth caps it (171 TFLOP/s at 4 x 4096, d128, on an H100
// against cuDNN's 559). wgmma reads Q, K and V straight from shared memory, a 64 x 128 x 16 product per
// instruction per warpgroup, with no register traffic for the operands.
//
// Tiles. One CTA of 2 warpgroups (256 threads) per (128 folded query rows, sequence, kv head); warpgroup w owns rows
// 64w..64w+63. The KV loop walks 128-position tiles from 0 to the CTA's largest position, three stages of K and V
// in shared memory, loaded by every thread with 16-byte cp.async through the block table two tiles ahead (one
// barrier per tile; the copies are issued right after Q K^T, so their block-table reads wait behind the product).
// Per tile and warpgroup:
//   S (64 x 128, f32 in registers) = Q K^T: D / 16 wgmma m64n128k16, A = Q and B = K both K-major in shared memory;
//   mask (only on tiles that cross some row's own position), online softmax in f32 with exp2 (common/attention.cuh,
//   the same code as the mma.sync kernel: the accumulator layout is mma.m16n8k16's per warp);
//   P rounded to bf16 into A fragments (registers);
//   O (64 x D, f32 in registers) += P V: 128 / 16 wgmma m64nDk16 with A from registers and B = V MN-major
//   ("transposed") in shared memory, so V needs no transposed copy.
// Each product is committed and waited for before its result is read; the two warpgroups (and their softmax and
// tensor-core phases) overlap only as the warp schedulers interleave them. The warp-specialized form with a
// producer and ping-pong consumers is prefill_sm90_ws.cu (the default on Hopper since 2026-11-28). A third form,
// this kernel with FlashAttention-3's overlap inside each warpgroup (S_t and P_{t-1} V_{t-1} issued together, tile
// t's exponents computed while the second ran, and a second barrier per tile before the next copies), was removed
// after an H200 timed it behind this one (343 / 264 TFLOP/s at d128 / d64 against 365 / 274; ws 438 / 328).
// The output goes through this warpgroup's own Q rows in shared memory and leaves in 16-byte stores.
//
// Shared memory: 1024-byte-aligned (the swizzle atoms), Q 128 x D + 3 stages x (K + V) 128 x D bf16:
// 224 KB + 1 KB of alignment slack (D = 128, just under sm_90's 227 KB) or 112 KB + 1 KB (D = 64); one CTA per SM
// either way (registers).
#include <climits>
#include <cstdint>

#include "attention/prefill_common.cuh"
#include "attention/prefill_sm90.cuh"
#include "attention/prefill_sm90_common.cuh"
#include "common/attention.cuh"
#include "common/bf16.cuh"
#include "common/launch.cuh"
#include "common/status.cuh"
#include "common/wgmma.cuh"

namespace l32 {
namespace {

using namespace attn;

// Every size derived from head_dim, read by the kernel and the launcher alike.
// ptxas (CUDA 13.0, sm_90a), no spills, 0-byte stack frames, 16 B static shared memory:
//   paged_prefill_wgmma_kernel<64>:  157 registers (113 KB dynamic shared memory; one CTA per SM)
//   paged_prefill_wgmma_kernel<128>: 201 registers (225 KB dynamic shared memory; one CTA per SM)
template <int D>
struct HopperPrefillTraits : prefill90::Tiles<D> {
    static constexpr int kWarpGroups = 2;
    static constexpr int kThreads = 128 * kWarpGroups;
    static_assert(prefill90::Tiles<D>::kBlockM == 64 * kWarpGroups, "64 folded query rows per warpgroup");
    static_assert(prefill90::Tiles<D>::kSmemBytes + 16 <= 227 * 1024,
                  "the sm_90 opt-in limit per CTA (with the 16 static bytes)");
};

// Tier 1. See the file comment.
template <int D>
__global__ void __launch_bounds__(256, 1)
    paged_prefill_wgmma_kernel(const __grid_constant__ l32_paged_prefill_params p) {
#if L32_WGMMA_AVAILABLE
    pdl_begin();
    using T = HopperPrefillTraits<D>;
    using QTile = typename T::QTile;
    using KVTile = typename T::KVTile;
    constexpr int NT = T::NT;  // 8-position column tiles of S
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const prefill90::Smem<D> sm(smem_raw);
    bf16* sq = sm.sq;
    bf16* skv = sm.skv;  // stage s: K at skv + 2 s KVTile::kElems, V right after it

    const int seq = blockIdx.y, kv_head = blockIdx.z;
    const int tid = threadIdx.x, wg = tid / 128, warp = (tid / 32) % 4, lane = tid % 32, tq = lane % 4;
    const prefill::ChunkTile c = prefill::chunk_tile<T::kBlockM>(p);
    if (c.m0 >= c.rows) return;  // uniform over the CTA: this sequence's chunk is shorter than the grid

    // Q rows into sq (in flight), and the positions they span.
    const int2 range = prefill::load_query_tile<D, T::kBlockM, T::kThreads, QTile>(p, c, kv_head, sq, tid);
    const int pos_min = range.x, pos_max = range.y;
    const int n_end = pos_max + 1;
    const int num_tiles = (n_end + T::kBlockN - 1) / T::kBlockN;

    const bf16* k_cache = static_cast<const bf16*>(p.k_cache);
    const bf16* v_cache = static_cast<const bf16*>(p.v_cache);
    const uint32_t* table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks_per_seq;
    const int64_t slot_stride = static_cast<int64_t>(p.num_kv_heads) * D;
    // Commit groups: Q with KV tile 0, then one group per later tile t (empty past the last tile), committed two
    // iterations ahead, so that at iteration t only tile t + 1's group may still be in flight.
    load_kv_tile<D, T::kBlockN, T::kThreads, KVTile>(skv, skv + KVTile::kElems, k_cache, v_cache, table, 0, n_end,
                                                     p.block_size, slot_stride, kv_head);
    cp_async_commit();
    if (num_tiles > 1) {
        bf16* next = skv + 2 * KVTile::kElems;
        load_kv_tile<D, T::kBlockN, T::kThreads, KVTile>(next, next + KVTile::kElems, k_cache, v_cache, table,
                                                         T::kBlockN, n_end, p.block_size, slot_stride, kv_head);
    }
    cp_async_commit();

    // This thread's two rows (g and g + 8 of its warp's 16 within its warpgroup's 64) and their positions.
    const int warp_row0 = wg * 64 + warp * 16;  // within the CTA tile
    int row_pos[2];
    prefill::row_positions(row_pos, p, c, warp_row0, lane, pos_max);

    const float scale_log2 = p.scale * 1.4426950408889634f;
    float o[D / 8][4];
    float s[NT][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    RowState st;
    // This warpgroup's 64 Q rows: column block b at sq + b * 128 rows * 128 bytes, rows 64 wg.. at 64 wg * 128 bytes.
    const uint32_t q_addr = sm.sq_addr + wg * 64 * 128;

    for (int t = 0; t < num_tiles; ++t) {
        const int n0 = t * T::kBlockN;
        cp_async_wait<1>();                 // this thread's part of tile t has landed
        wgmma::fence_proxy_async_shared();  // ... and is visible to the proxy wgmma reads through
        __syncthreads();                    // every part of tile t; every thread is done with tile t - 1's stage
        const int stage = t % T::kStages;

        // S = Q K^T. fence_operands pins the last iteration's reads of s (P's packing) above the fence, as the PTX
        // ISA asks of registers an asynchronous wgmma writes; the compiler could otherwise sink them below it.
        wgmma::fence_operands(s);
        wgmma::fence();
        prefill90::issue_qk<D>(s, q_addr, sm.k_addr(stage));
        wgmma::commit();
        // While the tensor cores run Q K^T: tile t + 2 into the stage tile t - 1 used (free since the barrier). Its
        // block-table reads are dependent loads (an L2 round trip before the first copy can issue); issued here
        // rather than before the product, that wait overlaps it instead of delaying it.
        if (t + 2 < num_tiles) {
            bf16* next = skv + ((t + 2) % T::kStages) * 2 * KVTile::kElems;
            load_kv_tile<D, T::kBlockN, T::kThreads, KVTile>(next, next + KVTile::kElems, k_cache, v_cache, table,
                                                             n0 + 2 * T::kBlockN, n_end, p.block_size, slot_stride,
                                                             kv_head);
        }
        cp_async_commit();
        wgmma::wait<0>();
        wgmma::fence_operands(s);

        // Only tiles the causal boundary crosses for some row pay for the mask.
        if (n0 + T::kBlockN - 1 > pos_min) prefill::mask_causal(s, n0, row_pos, tq);
        online_softmax<NT, D / 8>(s, o, st, scale_log2);

        // O += P V.
        uint32_t pa[NT / 2][4];
        prefill90::pack_p<NT>(pa, s);
        // o was rescaled and pa written by ordinary instructions: pinned above the fence that orders them before
        // the asynchronous products.
        wgmma::fence_operands(o);
        wgmma::fence_operands(pa);
        wgmma::fence();
        prefill90::issue_pv<D>(o, pa, sm.v_addr(stage));
        wgmma::commit();
        wgmma::wait<0>();
        wgmma::fence_operands(o);
        wgmma::fence_operands(pa);  // the A registers stay allocated until the products that read them are done
    }
    finish_row_sums(st);

    // Epilogue through this warp's own Q rows (only this warpgroup's products read them, all complete).
    prefill::store_rows<D, QTile>(p, c, kv_head, o, st, sq, warp_row0, lane);
#else
    (void)p;
    __trap();  // only sm_90a runs this kernel; the launcher refuses every other device
#endif
}

// Tier 2.
template <int D>
l32_status launch(const l32_paged_prefill_params& p, cudaStream_t stream) {
    using T = HopperPrefillTraits<D>;
    return prefill::launch<T::kBlockM, T::kThreads, T::kSmemBytes>(paged_prefill_wgmma_kernel<D>, p, stream);
}

}  // namespace

// Built without sm_90a SASS (LLAMA32_CUDA_ARCHS without 90a, see build.rs) the kernel body would only trap, so the
// launcher refuses (L32_UNSUPPORTED), as it does on devices other than compute capability 9.x.
bool prefill_wgmma_available() {
#ifndef L32_SASS_SM90A
    return false;
#else
    return device_runs_sm90a();
#endif
}

l32_status launch_paged_prefill_wgmma(const l32_paged_prefill_params& p, cudaStream_t stream) {
    if (!prefill_wgmma_available()) return L32_UNSUPPORTED;
    return p.head_dim == 64 ? launch<64>(p, stream) : launch<128>(p, stream);
}

}  // namespace l32

extern "C" int l32_prefill_wgmma_available(void) { return l32::prefill_wgmma_available() ? 1 : 0; }
