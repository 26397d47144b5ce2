// Hopper (sm_90) tensor memory access: a tiled 2-D box copied from global to shared memory by the TMA unit, one
// instruction from one thread, completing on an mbarrier (expect_tx), with the host-side encoding of the tensor map
// that describes the global tensor. Used by the W4A8 TMA kernels (kernels/quant/w4a8_sm90_tma.cu).
//
// Host side. The encoder (cuTensorMapEncodeTiled) is a driver entry point; the library links the static CUDA
// runtime and no libcuda, so it is looked up once through the runtime (cudaGetDriverEntryPointByVersion) and
// cached. A tensor map is 128 opaque bytes, 128-byte aligned, passed to the kernel by value as a __grid_constant__
// parameter: a captured CUDA graph keeps it with the launch. Encoding is host-only arithmetic (no device call),
// so launchers encode per launch.
//
// Device side. The box lands in shared memory in row-major order of the box (dimension 0 fastest), or in the
// swizzled order the map names (64-byte swizzle: 16-byte chunk c of a 64-byte row r stored at chunk
// c ^ ((r / 2) % 4), the pattern of address bits 4-5 taken from bits 7-8, which wgmma's 64-byte swizzle mode reads
// back). Elements outside the tensor are written as zeros, and every byte of the box counts toward the mbarrier's
// transaction count, inside the tensor or not.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/smem.cuh"
#include "common/status.cuh"

namespace l32 {
namespace tma {

// The driver's cuTensorMapEncodeTiled, or nullptr where the driver has none (looked up once per process).
inline PFN_cuTensorMapEncodeTiled_v12000 encoder() {
    static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
        void* f = nullptr;
        cudaDriverEntryPointQueryResult found{};
        const cudaError_t err =
            cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found);
        if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
            (void)cudaGetLastError();  // leave no sticky error for the next launch check
            return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
        }
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
    }();
    return fn;
}

// A 2-D tensor map: `dim0` elements of `type` per row (contiguous), `dim1` rows `row_bytes` apart, boxes of
// `box0` x `box1` elements, zero fill outside, 256-byte L2 promotion. L32_UNSUPPORTED where the driver has no
// encoder; L32_LAUNCH_FAILED (cudaErrorInvalidValue remembered) where it refuses the map.
inline l32_status encode_2d(CUtensorMap* map, CUtensorMapDataType type, const void* base, uint64_t dim0,
                            uint64_t dim1, uint64_t row_bytes, uint32_t box0, uint32_t box1,
                            CUtensorMapSwizzle swizzle) {
    const PFN_cuTensorMapEncodeTiled_v12000 encode = encoder();
    if (encode == nullptr) return L32_UNSUPPORTED;
    const cuuint64_t dims[2] = {dim0, dim1};
    const cuuint64_t strides[1] = {row_bytes};
    const cuuint32_t box[2] = {box0, box1};
    const cuuint32_t elem_strides[2] = {1, 1};
    const CUresult r = encode(map, type, 2, const_cast<void*>(base), dims, strides, box, elem_strides,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r == CUDA_SUCCESS) return L32_OK;
    last_cuda_error = cudaErrorInvalidValue;
    return L32_LAUNCH_FAILED;
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

// Asks for the tensor map's 128 bytes ahead of the first copy that names it (one thread).
__device__ __forceinline__ void prefetch_map(const CUtensorMap* map) {
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Copies the box of `map` at element coordinates (x, y) (x along dimension 0) into shared memory at `dst` (128-byte
// aligned; 512-byte aligned under the 64-byte swizzle), completing `box bytes` of the transaction count of `bar`
// (which the issuing thread announced with mbar_arrive_expect). One thread issues it; it returns at once.
__device__ __forceinline__ void load_2d(void* dst, const CUtensorMap* map, int x, int y, uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
        "[%4];" ::"r"(smem_addr(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(smem_addr(bar))
        : "memory");
}

#endif

}  // namespace tma
}  // namespace l32
