// Kernel launches with optional programmatic dependent launch (PDL, sm_90+), shared by every launcher.
//
// With PDL on (l32_set_programmatic_launch), a kernel is launched with the attribute
// cudaLaunchAttributeProgrammaticStreamSerialization: the GPU may start its CTAs as soon as every CTA of the
// previous kernel in the stream has started and executed griddepcontrol.launch_dependents, instead of after that
// kernel has finished. Its launch latency and CTA ramp then overlap the previous kernel's tail; in a decode step of
// ~150 small kernels that latency is a large share of the step. Correctness rests on pdl_begin(), the first
// statement of every kernel of this library: griddepcontrol.wait blocks until the previous grid has completed and
// its memory operations are visible, before the kernel reads or writes any global memory. (The weight-streaming
// kernels first ask L2 for their first weights, which no kernel of a step writes: the gemv and the direct, pipelined
// and tiled W4A16 ones; the bulk and large-m W4A16 and the W4A8 mma kernels copy their first weight stages into
// shared memory.) So results are bit for bit those of ordinary launches. A kernel from another library (cuBLASLt)
// before or after ours is serialized as usual, and devices other than sm_90 (Hopper) get ordinary launches (see
// programmatic_launch_applies).
#pragma once

#include <cuda_runtime.h>

#include <atomic>

namespace l32 {

// The process-wide switch behind l32_set_programmatic_launch (kernels/status.cu), off by default.
inline std::atomic<int> programmatic_launch_flag{0};

// Waits until the previous grid in the stream has completed and its writes are visible (returns at once when the
// kernel was launched without PDL; nothing below sm_90). No global memory that an earlier kernel may write may be
// touched before it.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel in the stream launch its CTAs once every CTA of this one has called it (or exited).
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// First statement of every kernel that has nothing to do before its inputs are ready: pdl_wait(), then
// pdl_trigger().
__device__ __forceinline__ void pdl_begin() {
    pdl_wait();
    pdl_trigger();
}

// Asks for the 128-byte line holding `p` in L2, without waiting. The weight-streaming kernels issue it for their
// first weights before pdl_wait(): weights are written once at load time, never by a kernel of the step, so under
// PDL their first bytes arrive while the previous kernel finishes.
__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Asks L2 for `bytes` (a multiple of 16) from the 16-byte-aligned global address `p`, in one instruction, without
// waiting (sm_90's cp.async.bulk.prefetch; nothing below sm_90).
__device__ __forceinline__ void prefetch_l2_bulk(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#else
    (void)p;
    (void)bytes;
#endif
}

// True when the current device has compute capability 9.x (Hopper: H100, H200, GH200), i.e. runs this library's
// sm_90a SASS, where the wgmma kernels exist (cached per device ordinal).
inline bool device_runs_sm90a() {
    static std::atomic<signed char> capable[64] = {};
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return false;
    signed char c = capable[device].load(std::memory_order_relaxed);
    if (c == 0) {
        int major = 0;
        c = (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major == 9)
                ? 1
                : -1;
        capable[device].store(c, std::memory_order_relaxed);
    }
    return c > 0;
}

// True when PDL is switched on and the current device runs this library's sm_90a SASS, i.e. compute capability 9.x
// (cached per device ordinal). Not on newer GPUs: they JIT the compute_80 PTX, which has no griddepcontrol.wait
// (it is compiled for sm_90 and up only), so their kernels would not wait for the previous one.
inline bool programmatic_launch_applies() {
    return programmatic_launch_flag.load(std::memory_order_relaxed) != 0 && device_runs_sm90a();
}

// A params struct's `prewait` request (weight loads before the kernel waits for the previous one) where it can pay:
// under PDL only, where the previous kernel may still be running; without PDL the early loads could only make the
// first wait cover more. The checked entries apply it once, for every kernel behind them.
inline int32_t prewait_under_pdl(int32_t requested) {
    return requested != 0 && programmatic_launch_applies() ? 1 : 0;
}

// kernel<<<grid, block, smem, stream>>>(args...), with PDL when programmatic_launch_applies(). A launch error is
// left for check_launch() (cudaGetLastError reports it either way).
template <typename... KernelArgs, typename... Args>
inline void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          const Args&... args) {
    if (!programmatic_launch_applies()) {
        kernel<<<grid, block, smem, stream>>>(args...);
        return;
    }
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    (void)cudaLaunchKernelEx(&cfg, kernel, args...);
}

}  // namespace l32
