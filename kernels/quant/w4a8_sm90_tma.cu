// kernels/quant/w4a8_sm90_tma.cu: the Hopper W4A8 kernels fed by the TMA unit (L32_W4A8_WGMMA_TMA and
// L32_W4A8_WGMMA_WS_TMA; twenty-first session, not yet run on a GPU): the products of w4a8_sm90.cu's row and ws
// kernels (w4a8_sm90_products.cuh, the same bits), each chunk's stage copied as three tensor-map boxes
// (common/tma.cuh) by one thread. launch_w4a8_wgmma (w4a8_sm90.cu) sends them here when their boxes fit the
// tensors, else to the cp.async kernels. docs/quantization.md ("The TMA kernels") gives the layout and the count.
#include <cstdint>

#include "common/mbarrier.cuh"
#include "common/tma.cuh"
#include "quant/w4a8_sm90.cuh"
#include "quant/w4a8_sm90_products.cuh"

namespace l32 {
namespace quant {
namespace {

// The three tensor maps of the TMA kernels (encoded per launch by w4a8_maps): each chunk's stage is three boxes.
//   - act: xq as k bytes x m rows (uint8), boxes of 64 columns x kBN tokens, 64-byte swizzle: chunk c's activations
//     of tokens m0 .. m0 + kBN as kBN rows of 64 bytes in 8-row atoms of 512 bytes, which wgmma reads through a
//     64-byte-swizzle descriptor (group j at byte 32 j of each row). Tokens past m are zeros.
//   - weights: each 16-row tile's chunks as one row of kc x 512 bytes (uint32 elements), boxes of one chunk (128
//     elements) x kTiles tiles: the stage's weights as the other kernels copy them (tile t at byte 512 t). Tiles
//     past the last are zeros.
//   - scales: each tile's scale entries as one row of kc x 128 bytes, boxes of two chunks (64 elements) x kTiles
//     tiles: per tile, chunk c's 128 bytes then chunk c + 1's (zeros past the last chunk), 256 bytes a tile.
struct W4A8Maps {  // each map 128-byte aligned (CUtensorMap's own alignment)
    CUtensorMap act;
    CUtensorMap weights;
    CUtensorMap scales;
};

#if L32_WGMMA_AVAILABLE
// One thread's start of a TMA kernel: the maps asked for ahead of their first use, and the `full` barriers (one
// arrival each: the issuing thread's expect_tx; then the boxes' bytes) and `empty` barriers (`empty_count`
// arrivals; none when `empty` is null) initialized and fenced for the TMA unit. The block barrier that follows
// publishes them.
template <int kStages>
__device__ __forceinline__ void tma_ring_init(const W4A8Maps& maps, uint64_t* full, uint64_t* empty,
                                              unsigned empty_count) {
    tma::prefetch_map(&maps.act);
    tma::prefetch_map(&maps.weights);
    tma::prefetch_map(&maps.scales);
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
        sync90::mbar_init(&full[s], 1);
        if (empty != nullptr) sync90::mbar_init(&empty[s], empty_count);
    }
    sync90::mbar_init_fence();
}

// The first 1024-byte boundary in the dynamic shared memory (the TMA kernels ask for 1024 bytes more; the arithmetic
// of the other swizzled-tile kernels' own alignment, prefill90::Smem and w4a16_wgmma_kernel).
__device__ __forceinline__ uint8_t* align_1024(uint8_t* raw) {
    const uint32_t a = smem_addr(raw);
    return raw + (((a + 1023u) & ~1023u) - a);
}

// The consumers' side of a TMA kernel's ring: the stage and phase parity of the next chunk, the wgmma descriptor
// of stage 0's activations (64-byte swizzle, SBO 512) and the shared address of its `full` barrier, computed once
// (opaque to ptxas, which would rebuild them in every chunk). A stage's descriptor is stage 0's stepped by its offset
// (wgmma::desc_plus).
template <class T, int kStages>
struct TmaRing {
    uint64_t desc_base;
    uint32_t full_base;
    int stage = 0;
    unsigned phase = 0;

    __device__ __forceinline__ TmaRing(uint8_t* smem, uint64_t* full)
        : desc_base(wgmma::desc_sw64(smem_addr(smem), 16, 512)), full_base(smem_addr(full)) {
        static_assert(kStages * T::kStageBytes + 1024 <= 227 * 1024, "stage offsets within the shared window");
        asm volatile("" : "+l"(desc_base), "+r"(full_base));
    }

    // Waits for the next chunk (the rel-th of the split; `last`: its last) to land and runs its products; returns
    // the stage it read, and moves on by one.
    template <class Prod>
    __device__ __forceinline__ int consume(Prod& prod, uint8_t* smem, const typename Prod::Lane& lo, int tile,
                                           int lane, int rel, bool last) {
        sync90::mbar_wait_bounded_at(full_base + stage * 8, phase);
        const int off = stage * T::kStageBytes;
        prod.chunk_at(smem + off, wgmma::desc_plus(desc_base, off), lo, tile, lane, rel, last);
        const int done = stage;
        if (++stage == kStages) {
            stage = 0;
            phase ^= 1;
        }
        return done;
    }
};

// Issues the three boxes of chunk c (the rel-th of the split) into stage rel % kStages, completing on its `full`
// barrier (one thread).
template <class T, int kStages>
__device__ __forceinline__ void tma_issue_chunk(const W4A8Maps& maps, uint8_t* smem, uint64_t* full, int rel, int c,
                                                int m0, int nt0) {
    const int stage = rel % kStages;
    uint8_t* st = smem + stage * T::kStageBytes;
    sync90::mbar_arrive_expect(&full[stage], T::kStageBytes);
    tma::load_2d(st, &maps.act, c * 64, m0, &full[stage]);
    tma::load_2d(st + T::kActBytes, &maps.weights, c * 128, nt0, &full[stage]);
    tma::load_2d(st + T::kActBytes + T::kWBytes, &maps.scales, c * 32, nt0, &full[stage]);
}
#endif

// Tier 1 (L32_W4A8_WGMMA_TMA). The row kernel's products (serial, natural-order activations: the same bits) fed by
// the TMA unit: thread 0 issues each chunk's three boxes (W4A8Maps) into a kStages-deep ring, each stage completing
// on its mbarrier `full`, and every thread waits there instead of issuing its share of ~1,000 cp.async per chunk.
// The row kernel is bound by issue slots; by the SASS (twenty-first session) its copies (address arithmetic,
// zero-fill predicates, the stage index) and the per-chunk offset and descriptor arithmetic, which this kernel keeps
// in registers, take ~60 of its ~210 instructions per chunk and warp (docs/quantization.md).
// The block barrier per chunk stays: after it, every warp is done with the previous chunk, whose stage thread 0
// then refills. Grid, tiles, split-K and the store as the row kernel; 256 threads.
template <int kBN, int kStages>
__global__ void __launch_bounds__(256, W4A8WgmmaTraits<2, kBN, kStages, false, true, true>::kMinBlocks)
    w4a8_wgmma_tma_kernel(const __grid_constant__ l32_w4a8_params p, const __grid_constant__ W4A8Maps maps) {
#if L32_WGMMA_AVAILABLE
    using T = W4A8WgmmaTraits<2, kBN, kStages, false, true, true>;
    pdl_begin();
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    __shared__ uint64_t full[kStages];
    uint8_t* smem = align_1024(smem_raw);

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const BlockSpan<T> span(p);
    const int chunks = span.c1 - span.c0;
    if (threadIdx.x == 0) tma_ring_init<kStages>(maps, full, nullptr, 0);
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int rel = 0; rel < T::kAhead && rel < chunks; ++rel) {
            tma_issue_chunk<T, kStages>(maps, smem, full, rel, span.c0 + rel, span.m0, span.nt0);
        }
    }
    using Prod = Products<2, kBN, kStages, false, true, true>;
    Prod prod;
    const typename Prod::Lane lane_off = Prod::lane_offsets(warp, lane);
    TmaRing<T, kStages> ring(smem, full);
#pragma unroll 1
    for (int rel = 0; rel < chunks; ++rel) {
        if (rel > 0) __syncthreads();  // every warp is done with chunk rel - 1, whose stage is refilled next
        if (threadIdx.x == 0 && rel + T::kAhead < chunks) {
            const int ahead = rel + T::kAhead;
            tma_issue_chunk<T, kStages>(maps, smem, full, ahead, span.c0 + ahead, span.m0, span.nt0);
        }
        ring.consume(prod, smem, lane_off, warp, lane, rel, rel + 1 == chunks);
    }
    prod.store(p, span.npad, span.nt0, warp, span.m0, lane);
    span.splitk_finish(p);
#else
    (void)p;
    (void)maps;
    __trap();  // only sm_90a runs this kernel; the launcher refuses every other device
#endif
}

// Tier 1 (L32_W4A8_WGMMA_WS_TMA). The ws kernel with the TMA kernel's copies: warp 0 of the producer warpgroup
// waits for a stage's `empty` (8 arrivals: lane 0 of each consumer warp once the chunk's products are done) and its
// lane 0 issues the chunk's three boxes onto the stage's `full`; the rest of that warpgroup only joins the split-K
// finish. The consumers as in w4a8_wgmma_ws_kernel (the same bits), with bounded waits (a ring out of step traps
// instead of hanging: this kernel has not run on a GPU yet). 384 threads, one block per SM.
template <int kBN, int kStages>
__global__ void __launch_bounds__(384, 1)
    w4a8_wgmma_ws_tma_kernel(const __grid_constant__ l32_w4a8_params p, const __grid_constant__ W4A8Maps maps) {
#if L32_WGMMA_AVAILABLE
    using T = W4A8WgmmaTraits<2, kBN, kStages, false, true, true>;
    constexpr int kProducers = 128;
    pdl_begin();
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    __shared__ uint64_t full[kStages], empty[kStages];
    uint8_t* smem = align_1024(smem_raw);

    const BlockSpan<T> span(p);
    const int chunks = span.c1 - span.c0;
    if (threadIdx.x == 0) tma_ring_init<kStages>(maps, full, empty, T::kTiles);
    __syncthreads();

    if (threadIdx.x < 32) {
        // Warp 0 waits for each stage to come back; its lane 0 issues the boxes (the warp stays converged).
        for (int rel = 0; rel < chunks; ++rel) {
            const int stage = rel % kStages;
            if (rel >= kStages) sync90::mbar_wait_bounded(&empty[stage], (rel / kStages - 1) & 1);
            if (threadIdx.x == 0) tma_issue_chunk<T, kStages>(maps, smem, full, rel, span.c0 + rel, span.m0, span.nt0);
            __syncwarp();
        }
    } else if (threadIdx.x >= kProducers) {
        const int tile = static_cast<int>(threadIdx.x) / 32 - kProducers / 32, lane = threadIdx.x % 32;
        using Prod = Products<2, kBN, kStages, false, true, true>;
        Prod prod;
        const typename Prod::Lane lane_off = Prod::lane_offsets(tile, lane);
        TmaRing<T, kStages> ring(smem, full);
#pragma unroll 1
        for (int rel = 0; rel < chunks; ++rel) {
            const int stage = ring.consume(prod, smem, lane_off, tile, lane, rel, rel + 1 == chunks);
            __syncwarp();
            if (lane == 0) sync90::mbar_arrive(&empty[stage]);
        }
        prod.store(p, span.npad, span.nt0, tile, span.m0, lane);
    }
    span.splitk_finish(p);
#else
    (void)p;
    (void)maps;
    __trap();  // only sm_90a runs this kernel; the launcher refuses every other device
#endif
}

// The TMA kernels' maps for `p` with kBN-token boxes (see W4A8Maps).
template <int kBN, int kTiles>
l32_status w4a8_maps(const l32_w4a8_params& p, W4A8Maps& maps) {
    const auto k = static_cast<uint64_t>(p.k), kc = k / 64, ntiles = static_cast<uint64_t>((p.n + 15) / 16);
    l32_status s = tma::encode_2d(&maps.act, CU_TENSOR_MAP_DATA_TYPE_UINT8, p.xq, k, static_cast<uint64_t>(p.m), k,
                                  64, kBN, CU_TENSOR_MAP_SWIZZLE_64B);
    if (s == L32_OK) {
        s = tma::encode_2d(&maps.weights, CU_TENSOR_MAP_DATA_TYPE_UINT32, p.qweight, kc * 128, ntiles, kc * 512, 128,
                           kTiles, CU_TENSOR_MAP_SWIZZLE_NONE);
    }
    if (s == L32_OK) {
        s = tma::encode_2d(&maps.scales, CU_TENSOR_MAP_DATA_TYPE_UINT32, p.scales, kc * 32, ntiles, kc * 128, 64,
                           kTiles, CU_TENSOR_MAP_SWIZZLE_NONE);
    }
    return s;
}
// The TMA kernels: the ws one (384 threads) or the block-barrier one (256), for parameters whose boxes fit their
// tensors (w4a8_tma_boxes_fit).
template <int kBN, int kStages, bool kWs>
l32_status launch_tma(const l32_w4a8_params& p, cudaStream_t stream) {
    using T = W4A8WgmmaTraits<2, kBN, kStages, false, true, true>;
    W4A8Maps maps;
    const l32_status s = w4a8_maps<kBN, T::kTiles>(p, maps);
    if (s != L32_OK) return s;
    if constexpr (kWs) {
        static_assert(T::kThreads + 128 == 384 && T::kMinBlocks >= 1, "the ws kernel's block (w4a8_sm90.cu)");
        return launch_tiles<T>(w4a8_wgmma_ws_tma_kernel<kBN, kStages>, 384, p, stream, maps);
    } else {
        return launch_tiles<T>(w4a8_wgmma_tma_kernel<kBN, kStages>, T::kThreads, p, stream, maps);
    }
}

}  // namespace

bool w4a8_tma_boxes_fit(const l32_w4a8_params& p) {
    constexpr int kTiles = W4A8WgmmaTraits<2, 64, 6, false, true, true>::kTiles;
    return p.m >= p.tile_m && (p.n + 15) / 16 >= kTiles && p.k >= 128;
}

l32_status launch_w4a8_wgmma_tma(const l32_w4a8_params& p, cudaStream_t stream) {
    if (p.kernel == L32_W4A8_WGMMA_TMA) {
        return p.tile_m == 64 ? launch_tma<64, 6, false>(p, stream) : launch_tma<128, 6, false>(p, stream);
    }
    return p.tile_m == 64 ? launch_tma<64, 8, true>(p, stream) : launch_tma<128, 6, true>(p, stream);
}

}  // namespace quant
}  // namespace l32
