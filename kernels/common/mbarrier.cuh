// Hopper (sm_90) synchronization for warp-specialized kernels: named PTX wrappers for the shared-memory mbarrier
// (producer / consumer rings: kernels/quant/w4a16_bulk.cu, kernels/attention/prefill_sm90_ws.cu), the CTA's named
// barriers (bar.sync / bar.arrive with an id and a thread count: one warpgroup hands a turn to another), and
// setmaxnreg (a warpgroup gives registers back or takes more). The host pass parses the bodies; no SASS below sm_90
// includes them.
#pragma once

#include <cstdint>

#include "common/smem.cuh"

namespace l32 {
namespace sync90 {

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

// Initializes `bar` to expect `count` arrivals per phase (one thread, before the barrier that publishes it).
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

// Makes the initialized barriers visible to the async proxy (the TMA unit) before the first copy names them.
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }

// Arrives once on `bar` (release: this thread's earlier shared-memory accesses happen before the phase completes
// for any thread that waits on it).
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Arrives once on `bar` when every cp.async this thread has issued so far has landed (the copy unit arrives; the
// thread goes on at once). `bar`'s count includes this arrival (.noinc). Its phase completing does not make the
// bytes visible to the async proxy: a thread that waits on it and then lets wgmma read them fences first
// (fence.proxy.async.shared::cta, after the wait).
__device__ __forceinline__ void cp_async_arrive_noinc(uint64_t* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Arrives once on `bar` (its count is 1) and tells it `bytes` more will be delivered by copies before it completes.
__device__ __forceinline__ void mbar_arrive_expect(uint64_t* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}

// One try_wait (which may suspend the thread for a while): true once the phase of the barrier at shared address
// `bar_addr` with parity `parity` has completed (acquire).
__device__ __forceinline__ bool mbar_try_wait_at(uint32_t bar_addr, unsigned parity) {
    unsigned done;
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(bar_addr), "r"(parity)
        : "memory");
    return done != 0;
}

// mbar_try_wait_at on `bar`.
__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, unsigned parity) {
    return mbar_try_wait_at(smem_addr(bar), parity);
}

// Spins until the phase of `bar` with parity `parity` has completed (acquire).
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
    while (!mbar_try_wait(bar, parity)) {
    }
}

// mbar_wait (on the barrier at shared address `bar_addr`) that traps after 2^26 failed tries (each may suspend the
// thread for a while: seconds in all) instead of hanging the GPU when a ring is out of step (for kernels not yet
// proven on a device).
__device__ __forceinline__ void mbar_wait_bounded_at(uint32_t bar_addr, unsigned parity) {
    for (unsigned tries = 0; !mbar_try_wait_at(bar_addr, parity); ++tries) {
        if (tries == (1u << 26)) __trap();
    }
}

// mbar_wait_bounded_at on `bar`.
__device__ __forceinline__ void mbar_wait_bounded(uint64_t* bar, unsigned parity) {
    mbar_wait_bounded_at(smem_addr(bar), parity);
}

// Named barrier `id` (1..15; 0 is __syncthreads's) of `threads` threads: waits until that many have arrived
// (counting this warp's), as bar.sync does.
__device__ __forceinline__ void named_sync(unsigned id, unsigned threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Arrives on named barrier `id` of `threads` threads without waiting.
__device__ __forceinline__ void named_arrive(unsigned id, unsigned threads) {
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// This warpgroup's register budget per thread lowered / raised to N (a multiple of 8 in 24..256; every warp of the
// warpgroup executes it). Effective only in a kernel whose entry register count is known (__launch_bounds__ with a
// minimum of blocks), and the warpgroups' budgets must add up to what the block was launched with.
template <int N>
__device__ __forceinline__ void regs_dealloc() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void regs_alloc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N));
}

#endif

}  // namespace sync90
}  // namespace l32
