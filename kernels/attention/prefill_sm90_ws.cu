// kernels/attention/prefill_sm90_ws.cu: the paged causal prefill of prefill_sm90.cu (same parameters, tiles,
// shared-memory layout and products) with warp specialization, for sm_90a. Launched by l32_paged_prefill when
// params.kernel is L32_PREFILL_WGMMA_WS (LLAMA32_PREFILL_KERNEL=wgmma-ws). First run on an H200 (2026-11-28): the
// wgmma kernel's bits, but 21% slower (216 against 274 TFLOP/s, d128, 4 x 4096 causal), so `auto` keeps wgmma.
//
// Why. prefill_sm90.cu reached 281 TFLOP/s at 4 x 4096, d128, causal on an H100 (cuDNN: 478). Nsight Compute found
// it neither memory- nor issue-bound: its two warpgroups meet at a block barrier every KV tile (every thread also
// issues the tile's cp.async), so both run Q K^T at the same time, then both run their softmax while the tensor
// cores idle, then both run P V. This kernel keeps the arithmetic and changes who waits for what
// (FlashAttention-3's scheme, written here from its description):
//   - A producer warpgroup (threads 0-127) copies Q and the K / V tiles with cp.async through the block table into
//     a ring of kStages stages. Per stage an mbarrier `full` (128 arrivals: the copy unit arrives for each producer
//     thread once its copies of the tile have landed, cp.async.mbarrier.arrive.noinc, so the producer never waits
//     for its own copies and keeps up to kStages tiles in flight; each consumer thread fences for the async proxy
//     after its wait) and an mbarrier `empty` (8 arrivals: lane 0 of each consumer warp once the tile's last
//     product has read it). No block-wide barrier after the start.
//   - Two consumer warpgroups (rows 0-63 and 64-127) take turns on the tensor cores: named barrier 1 + w is
//     consumer w's turn; it issues its products, then hands the turn over (bar.arrive on the other's), then waits
//     for its own results. So one consumer's softmax runs while the other's products run.
//   - Inside a consumer, the products of two tiles overlap its softmax: at tile t it issues S_t = Q K_t^T and
//     O += P_{t-1} V_{t-1} together, waits for S_t only, computes P_t's exponents (softmax_scores) while P V runs,
//     then waits for P V and rescales O by the new max's factor (rescale_rows) before packing P_t. The f32
//     operations per output are those of prefill_sm90.cu in the same order (O += P_{t-1} V_{t-1}, then O *= alpha_t),
//     so the two kernels should give the same bits; the GPU test asserts it.
//   - The producer's waits are bounded (mbar_wait_bounded): consumers out of step trap the launch instead of
//     hanging the GPU. (Bounded waits in the consumers cost them registers: spills and serialized wgmma, C7512.)
//   - setmaxnreg moves registers from the producer (72 each; at 40 or 56 its unrolled copy loop spilled) to the
//     consumers (216 each: S, O and P in registers, no spills).
// Shared memory as prefill_sm90.cu (Q 128 x D and 3 stages of K and V, 225 KB at D = 128), plus 48 bytes of
// mbarriers. One CTA of 384 threads per SM.
#include <climits>
#include <cstdint>

#include "attention/prefill_common.cuh"
#include "attention/prefill_sm90.cuh"
#include "attention/prefill_sm90_common.cuh"
#include "common/attention.cuh"
#include "common/bf16.cuh"
#include "common/launch.cuh"
#include "common/mbarrier.cuh"
#include "common/status.cuh"
#include "common/wgmma.cuh"

namespace l32 {
namespace {

using namespace attn;

template <int D>
struct WsPrefillTraits : prefill90::Tiles<D> {
    static constexpr int kConsumers = 2;                     // warpgroups that compute, 64 query rows each
    static constexpr int kThreads = 128 * (kConsumers + 1);  // and the producer warpgroup
    static_assert(prefill90::Tiles<D>::kBlockM == 64 * kConsumers, "64 folded query rows per consumer");
    static constexpr int kConsumerWarps = 4 * kConsumers;   // arrivals on a stage's `empty`
    static constexpr int kTurnThreads = 256;                 // a turn barrier: one consumer waits, the other arrives
    static_assert(kConsumers == 2 && kTurnThreads == 2 * 128, "the turns are a ping-pong of two warpgroups");
    static_assert(kConsumerWarps * 32 == 128 * kConsumers, "every consumer warp releases a stage");
    static_assert(prefill90::Tiles<D>::kSmemBytes + 64 <= 227 * 1024,
                  "the sm_90 opt-in limit per CTA (with the static barriers)");
    // Registers: 384 threads at one CTA per SM start with 168 each (65536 / 384, rounded down to 8); the
    // warpgroups' budgets after setmaxnreg must add up to 3 x 168.
    static constexpr int kEntryRegs = 168;
    static constexpr int kProducerRegs = 72;
    static constexpr int kConsumerRegs = 216;
    static_assert(kProducerRegs + kConsumers * kConsumerRegs == (kConsumers + 1) * kEntryRegs, "register budget");
};

// Tier 1. grid as prefill_sm90.cu (row tiles of 128 folded rows, sequences, kv heads), block = 384 threads.
template <int D>
__global__ void __launch_bounds__(384, 1)
    paged_prefill_wgmma_ws_kernel(const __grid_constant__ l32_paged_prefill_params p) {
#if L32_WGMMA_AVAILABLE
    pdl_begin();
    using T = WsPrefillTraits<D>;
    using QTile = typename T::QTile;
    using KVTile = typename T::KVTile;
    constexpr int NT = T::NT;  // 8-position column tiles of S
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ uint64_t full[T::kStages], empty[T::kStages];
    const prefill90::Smem<D> sm(smem_raw);
    bf16* sq = sm.sq;

    const int seq = blockIdx.y, kv_head = blockIdx.z;
    const int tid = threadIdx.x, wg = tid / 128;
    const prefill::ChunkTile c = prefill::chunk_tile<T::kBlockM>(p);
    if (c.m0 >= c.rows) return;  // uniform over the CTA: this sequence's chunk is shorter than the grid
    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < T::kStages; ++s) {
            sync90::mbar_init(&full[s], 128);
            sync90::mbar_init(&empty[s], T::kConsumerWarps);
        }
    }
    // Q rows into sq, copied by the producer warpgroup (threads 0-127; in flight, joining tile 0's group), and the
    // positions they span. It ends with a block barrier, which also publishes the mbarriers' initialization.
    const int2 range = prefill::load_query_tile<D, T::kBlockM, 128, QTile, T::kThreads>(p, c, kv_head, sq, tid);
    const int pos_min = range.x, pos_max = range.y;
    const int n_end = pos_max + 1;
    const int num_tiles = (n_end + T::kBlockN - 1) / T::kBlockN;

    if (wg == 0) {
        // The producer: tile t into stage t % kStages once the consumers released the tile kStages before it. Its
        // `full` phase completes when every producer thread's copies so far (the tile's, and for tile 0 Q's) have
        // landed: the copy unit arrives for the thread (noinc), so nothing here waits for a copy and up to kStages
        // tiles are in flight. (The first form waited for tile t - 1 to land before issuing tile t: one tile in
        // flight, and the producer's issue serialized behind each tile's latency.)
        sync90::regs_dealloc<T::kProducerRegs>();
        const bf16* k_cache = static_cast<const bf16*>(p.k_cache);
        const bf16* v_cache = static_cast<const bf16*>(p.v_cache);
        const uint32_t* table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks_per_seq;
        const int64_t slot_stride = static_cast<int64_t>(p.num_kv_heads) * D;
        for (int t = 0; t < num_tiles; ++t) {
            const int stage = t % T::kStages;
            if (t >= T::kStages) sync90::mbar_wait_bounded(&empty[stage], (t / T::kStages - 1) & 1);
            bf16* sk = sm.skv + stage * 2 * KVTile::kElems;
            load_kv_tile<D, T::kBlockN, 128, KVTile>(sk, sk + KVTile::kElems, k_cache, v_cache, table,
                                                        t * T::kBlockN, n_end, p.block_size, slot_stride, kv_head);
            sync90::cp_async_arrive_noinc(&full[stage]);
        }
        // Nothing is left to issue; the copies in flight complete (and arrive) before this warpgroup leaves.
        cp_async_commit();
        cp_async_wait<0>();
        return;
    }

    sync90::regs_alloc<T::kConsumerRegs>();
    const int cw = wg - 1;  // consumer 0 or 1: rows 64 cw .. 64 cw + 63
    const int warp = (tid / 32) % 4, lane = tid % 32, tq = lane % 4;
    const int warp_row0 = cw * 64 + warp * 16;
    int row_pos[2];
    prefill::row_positions(row_pos, p, c, warp_row0, lane, pos_max);
    const unsigned my_turn = 1 + cw, other_turn = 2 - cw;  // named barrier ids (0 is __syncthreads's)

    const float scale_log2 = p.scale * 1.4426950408889634f;
    float o[D / 8][4];
    float s[NT][4];
    uint32_t pa[NT / 2][4];  // P of the previous tile, packed (by tile 0's softmax before any product reads it)
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    RowState st;
    const uint32_t q_addr = sm.sq_addr + cw * 64 * 128;

    // S = Q K_t^T and O += P V_t, each committed as one group.
    auto issue_s = [&](int t) {
        prefill90::issue_qk<D>(s, q_addr, sm.k_addr(t % T::kStages));
        wgmma::commit();
    };
    auto issue_pv = [&](int t) {
        prefill90::issue_pv<D>(o, pa, sm.v_addr(t % T::kStages));
        wgmma::commit();
    };
    // The mask of tile t where the causal boundary crosses it for some row.
    auto mask = [&](int t) {
        const int n0 = t * T::kBlockN;
        if (n0 + T::kBlockN - 1 > pos_min) prefill::mask_causal(s, n0, row_pos, tq);
    };
    // This warp is done reading tile t's stage (every product that reads it has completed).
    auto release = [&](int t) {
        __syncwarp();
        if (lane == 0) sync90::mbar_arrive(&empty[t % T::kStages]);
    };

    // Consumer 0 takes the first turn. Each consumer has num_tiles + 1 turns; every turn but consumer 1's last
    // hands the next one over, so each turn barrier sees as many arrivals as waits.
    if (cw == 1) sync90::named_arrive(1, T::kTurnThreads);

    // Tile 0: S alone, then the whole softmax (O is zero, nothing in flight).
    sync90::mbar_wait(&full[0], 0);
    wgmma::fence_proxy_async_shared();  // the copies' bytes (generic proxy) before wgmma's reads (async proxy)
    sync90::named_sync(my_turn, T::kTurnThreads);
    wgmma::fence_operands(s);
    wgmma::fence();
    issue_s(0);
    sync90::named_arrive(other_turn, T::kTurnThreads);
    wgmma::wait<0>();
    wgmma::fence_operands(s);
    mask(0);
    online_softmax<NT, D / 8>(s, o, st, scale_log2);
    prefill90::pack_p<NT>(pa, s);

    for (int t = 1; t < num_tiles; ++t) {
        sync90::mbar_wait(&full[t % T::kStages], (t / T::kStages) & 1);
        wgmma::fence_proxy_async_shared();
        sync90::named_sync(my_turn, T::kTurnThreads);
        // s was read (packed into pa), o rescaled and pa written by ordinary instructions: pinned above the fence.
        wgmma::fence_operands(s);
        wgmma::fence_operands(o);
        wgmma::fence_operands(pa);
        wgmma::fence();
        issue_s(t);
        issue_pv(t - 1);
        sync90::named_arrive(other_turn, T::kTurnThreads);
        wgmma::wait<1>();  // S_t is done; P_{t-1} V_{t-1} may still run
        wgmma::fence_operands(s);
        mask(t);
        float alpha[2];
        softmax_scores(s, st, scale_log2, alpha);  // o and pa are in flight
        wgmma::wait<0>();
        wgmma::fence_operands(o);
        wgmma::fence_operands(pa);
        release(t - 1);
        rescale_rows(o, alpha);
        prefill90::pack_p<NT>(pa, s);
    }

    // The last tile's P V.
    sync90::named_sync(my_turn, T::kTurnThreads);
    wgmma::fence_operands(o);
    wgmma::fence_operands(pa);
    wgmma::fence();
    issue_pv(num_tiles - 1);
    if (cw == 0) sync90::named_arrive(other_turn, T::kTurnThreads);
    wgmma::wait<0>();
    wgmma::fence_operands(o);
    wgmma::fence_operands(pa);
    finish_row_sums(st);

    // Epilogue through this warp's own Q rows (only this warpgroup's products read them, all complete).
    prefill::store_rows<D, QTile>(p, c, kv_head, o, st, sq, warp_row0, lane);
#else
    (void)p;
    __trap();  // only sm_90a runs this kernel; the launcher refuses every other device
#endif
}

}  // namespace

l32_status launch_paged_prefill_wgmma_ws(const l32_paged_prefill_params& p, cudaStream_t stream) {
    if (!prefill_wgmma_available()) return L32_UNSUPPORTED;
    if (p.head_dim == 64) {
        using T = WsPrefillTraits<64>;
        return prefill::launch<T::kBlockM, T::kThreads, T::kSmemBytes>(paged_prefill_wgmma_ws_kernel<64>, p, stream);
    }
    using T = WsPrefillTraits<128>;
    return prefill::launch<T::kBlockM, T::kThreads, T::kSmemBytes>(paged_prefill_wgmma_ws_kernel<128>, p, stream);
}

}  // namespace l32
