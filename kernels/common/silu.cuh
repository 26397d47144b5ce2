// SwiGLU's element function, shared by the SiLU * up kernel (kernels/activation.cu) and the skinny GEMM that
// applies it to its input on the fly (kernels/gemv.cu), so that both give the same bits.
#pragma once

namespace l32 {

// silu(g) * u in f32. expf, not __expf: the accurate one costs nothing in a memory-bound kernel. For g below about
// -88, expf(-g) is +inf and the quotient is -0, the limit. The add, divide and multiply are the round-to-nearest
// intrinsics, which the compiler never contracts into an FMA with their neighbours, so every kernel that inlines
// this gets the same bits whatever code surrounds it.
__device__ __forceinline__ float silu_mul_f32(float g, float u) {
    return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.f, expf(-g))), u);
}

}  // namespace l32
