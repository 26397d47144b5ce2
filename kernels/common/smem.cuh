// The shared-state-space address of a pointer into shared memory, which cp.async, ldmatrix, mbarrier and wgmma
// descriptors take (one definition for every kernel family).
#pragma once

#include <cstdint>

namespace l32 {

// 32-bit shared-state-space address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

}  // namespace l32
