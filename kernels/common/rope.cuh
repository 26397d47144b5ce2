// RoPE's rotation of one pair, shared by the RoPE + KV-write kernel (kernels/rope.cu) and the skinny GEMM that
// applies it in its epilogue (kernels/gemv.cu), so that both give the same bits.
#pragma once

namespace l32 {

// (a, b) rotated by the angle whose cosine and sine are c and s: o1 = a c - b s, o2 = b c + a s, in f32. The
// products and sums are the round-to-nearest intrinsics, which the compiler never contracts into an FMA with
// their neighbours, so every kernel that inlines this gets the same bits whatever code surrounds it.
__device__ __forceinline__ void rope_rotate(float a, float b, float c, float s, float& o1, float& o2) {
    o1 = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    o2 = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

}  // namespace l32
