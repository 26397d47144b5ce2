// bf16 vectors: N packed bf16 values moved as one load/store, converted to fp32 for math.
#pragma once

#include <cuda_bf16.h>
#include <cstdint>
#include <cstring>

namespace l32 {

using bf16 = __nv_bfloat16;

// N bf16 values aligned to their own size, so N = 8 compiles to one 16-byte ld/st.global.v4 and N = 1 to a plain
// 2-byte access. Callers guarantee the alignment (the launcher checks pointers and strides before picking N = 8).
template <int N>
struct alignas(2 * N) BF16Vec {
    static_assert(N == 1 || N == 2 || N == 4 || N == 8, "BF16Vec: N must be 1, 2, 4 or 8");
    bf16 v[N];

    __device__ __forceinline__ float get(int i) const { return __bfloat162float(v[i]); }
    __device__ __forceinline__ void set(int i, float f) { v[i] = __float2bfloat16_rn(f); }
};

// The register type of N packed bf16: what one load or store instruction moves.
template <int N> struct PackedBits;
template <> struct PackedBits<8> { using type = uint4; };
template <> struct PackedBits<4> { using type = uint2; };
template <> struct PackedBits<2> { using type = unsigned int; };
template <> struct PackedBits<1> { using type = unsigned short; };

// One N * 2-byte load (LDG.E.128 for N = 8). Dereferencing a BF16Vec* directly is not enough: passed on by
// reference, the compiler may read the lanes one by one (eight LDG.E.U16).
template <int N>
__device__ __forceinline__ BF16Vec<N> load_vec(const BF16Vec<N>* p) {
    using Bits = typename PackedBits<N>::type;
    static_assert(sizeof(Bits) == sizeof(BF16Vec<N>), "PackedBits must match BF16Vec");
    const Bits bits = *reinterpret_cast<const Bits*>(p);
    BF16Vec<N> r;
    memcpy(&r, &bits, sizeof r);
    return r;
}

// One N * 2-byte store (STG.E.128 for N = 8).
template <int N>
__device__ __forceinline__ void store_vec(BF16Vec<N>* p, const BF16Vec<N>& v) {
    using Bits = typename PackedBits<N>::type;
    Bits bits;
    memcpy(&bits, &v, sizeof bits);
    *reinterpret_cast<Bits*>(p) = bits;
}

// Sum of squares of the N lanes, in fp32.
template <int N>
__device__ __forceinline__ float sum_squares(const BF16Vec<N>& a) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const float f = a.get(i);
        s = fmaf(f, f, s);
    }
    return s;
}

// bf16(a + b) lane by lane, added in fp32: how a bf16 residual stream accumulates (torch's bf16 add).
template <int N>
__device__ __forceinline__ BF16Vec<N> add_round(const BF16Vec<N>& a, const BF16Vec<N>& b) {
    BF16Vec<N> r;
#pragma unroll
    for (int i = 0; i < N; ++i) r.set(i, a.get(i) + b.get(i));
    return r;
}

// True when p is aligned to `bytes` (a power of two).
__host__ __device__ __forceinline__ bool is_aligned(const void* p, uintptr_t bytes) {
    return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

}  // namespace l32
