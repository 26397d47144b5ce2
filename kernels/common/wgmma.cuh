// Hopper (sm_90a) warpgroup MMA: named PTX wrappers for wgmma.mma_async and its fences, the shared-memory matrix
// descriptor, and the 128-byte-swizzled tile layout both operands use. Only kernels compiled for sm_90a may call
// the wrappers; on any other target they trap (the launchers never pick such a kernel there).
//
// Layouts (PTX ISA, "Asynchronous Warpgroup Level Matrix Shared Memory Layout"; sizes for bf16):
// - A warpgroup is 4 consecutive warps (128 threads). An m64nNk16 wgmma multiplies a 64 x 16 A by a 16 x N B into
//   a 64 x N f32 accumulator held as N / 2 floats per thread: warp w of the group holds rows 16w..16w+15, in the
//   layout of mma.m16n8k16's C fragment repeated over the N / 8 column tiles. With g = lane / 4, t = lane % 4:
//   d[j][0..1] = (row 16w + g, cols 8j + 2t, +1), d[j][2..3] = (row 16w + g + 8, same cols).
// - An A operand from registers uses mma.m16n8k16's A fragment layout per warp (4 x b32 per thread, see
//   common/attention.cuh), so two accumulator column tiles of f32 become one A fragment after rounding to bf16.
// - Shared-memory operands: the 128-byte swizzle atom is 8 rows of 128 bytes (64 bf16), 1024 bytes, with the
//   16-byte chunk c of row r stored at chunk c ^ (r % 8). The hardware applies the swizzle to address bits 4-6
//   from bits 7-9, so every atom must start at a multiple of 1024 bytes. Sw128Tile below stores a [ROWS][D] tile
//   as D / 64 column blocks of ROWS x 64, each a stack of ROWS / 8 atoms.
//   - K-major operand (the contraction dimension contiguous: Q as A, K as B of S = Q K^T): the descriptor's
//     stride byte offset (SBO) is 1024 (from one 8-row atom to the next); the leading byte offset is unused (1).
//     One k16 step is 32 bytes of a 128-byte row, so step s of a column block starts 32 s bytes later (the swizzle
//     is applied after that offset is added, as in CUTLASS's descriptor iterator).
//   - MN-major operand (the output dimension contiguous: V as B of O = P V, "transposed" B): atoms are 8 K rows of
//     64 N elements; SBO is the distance between 8-row K groups (1024) and LBO the distance between 64-element N
//     blocks (ROWS * 128 bytes, one column block of Sw128Tile).
#pragma once

#include <cstdint>

#include "common/attention.cuh"

namespace l32 {
namespace wgmma {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define L32_WGMMA_AVAILABLE 1
#else
#define L32_WGMMA_AVAILABLE 0
#endif

// A [ROWS][D] bf16 tile as D / 64 column blocks of [ROWS][64], 128-byte swizzled (see the file comment). The tile
// must start at a multiple of 1024 bytes.
template <int D, int ROWS>
struct Sw128Tile {
    static_assert(D % 64 == 0, "whole 128-byte rows per column block");
    static_assert(ROWS % 8 == 0, "whole 8-row swizzle atoms");
    static constexpr int kChunks = D / 8;
    static constexpr int kElems = ROWS * D;
    static constexpr int kBlockBytes = ROWS * 128;  // one column block: the MN-major LBO
    // Element offset of the 16-byte chunk `chunk` (8 bf16, 0 <= chunk < D / 8) of row `row`.
    __device__ __forceinline__ static int offset(int row, int chunk) {
        return (chunk >> 3) * ROWS * 64 + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
    }
};

// The 64-bit shared-memory matrix descriptor: start address, leading and stride byte offsets (each in 16-byte
// units, 14 bits), base offset 0 (atoms aligned to their swizzle pattern), and the swizzle mode in bits 62-63
// (0 none, 1 128-byte, 2 64-byte). The named forms below build it.
__device__ __forceinline__ uint64_t desc(uint32_t smem_byte_addr, uint32_t lbo_bytes, uint32_t sbo_bytes,
                                         uint64_t mode) {
    return static_cast<uint64_t>((smem_byte_addr >> 4) & 0x3FFF) |
           (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFF) << 16) |
           (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFF) << 32) | (mode << 62);
}

// The descriptor of a 128-byte-swizzled operand (atoms 1024-byte aligned).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t smem_byte_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    return desc(smem_byte_addr, lbo_bytes, sbo_bytes, 1);
}

// The descriptor of a 64-byte-swizzled K-major operand: atoms of 8 rows x 64 bytes (512 bytes, each 512-byte
// aligned, as TMA's 64-byte swizzle writes them), `sbo_bytes` from one 8-row atom to the next; the leading byte
// offset is unused. A k step inside the 64-byte row starts that many bytes later, as with desc_sw128.
__device__ __forceinline__ uint64_t desc_sw64(uint32_t smem_byte_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    return desc(smem_byte_addr, lbo_bytes, sbo_bytes, 2);
}

// The descriptor of a shared-memory operand without swizzle ("interleave" mode 0): core matrices of 8 rows x 16
// bytes, each 128 contiguous bytes; `lbo_bytes` apart along K (the contraction dimension), `sbo_bytes` apart along
// M or N (from one 8-row group to the next). Each core matrix must be 16-byte aligned.
__device__ __forceinline__ uint64_t desc_interleave(uint32_t smem_byte_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    return desc(smem_byte_addr, lbo_bytes, sbo_bytes, 0);
}

// The descriptor of the operand `off` bytes (a multiple of 16) after the one `base` describes, with the same
// offsets and mode: `base`'s low half plus off / 16 in its start-address field, the high half as it is. Shared
// addresses stay below 2^18, so the 14-bit field never carries into the LBO. One 32-bit add of a constant instead
// of a rebuild from the address (~5 uniform instructions), for kernels that step through a tile.
__device__ __forceinline__ uint64_t desc_plus(uint64_t base, uint32_t off) {
    const uint32_t lo = static_cast<uint32_t>(base) + (off >> 4);
    return (base & 0xFFFFFFFF00000000ull) | lo;
}

// Orders this thread's earlier register writes (accumulators, A fragments) before the wgmma that follows.
__device__ __forceinline__ void fence() {
#if L32_WGMMA_AVAILABLE
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// Closes the group of wgmma issued since the last commit.
__device__ __forceinline__ void commit() {
#if L32_WGMMA_AVAILABLE
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Waits until at most N committed wgmma groups are pending.
template <int N>
__device__ __forceinline__ void wait() {
#if L32_WGMMA_AVAILABLE
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Makes this thread's generic-proxy shared-memory writes (st.shared, cp.async after its wait) visible to the async
// proxy that wgmma reads through. Each writer calls it before the barrier that precedes the wgmma.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if L32_WGMMA_AVAILABLE
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// An empty asm that claims to read and write every accumulator register: code the compiler would otherwise move
// across an asynchronous wgmma (it cannot see that the registers are in flight until wait()) stays on its side.
template <int NT>
__device__ __forceinline__ void fence_operands(float (&d)[NT][4]) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
    }
}

// The same for A fragments in registers: they stay allocated (not reused for other values) until this point.
template <int NT>
__device__ __forceinline__ void fence_operands(uint32_t (&a)[NT][4]) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[j][e])::"memory");
    }
}

// The same for integer accumulators.
template <int NT>
__device__ __forceinline__ void fence_operands(int (&d)[NT][4]) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(d[j][e])::"memory");
    }
}

// The same for one A fragment.
__device__ __forceinline__ void fence_operands(uint32_t (&a)[4]) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[e])::"memory");
}

#define L32_ACC4(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define L32_ACC8TILES(b)                                                                                  \
    L32_ACC4(b + 0), L32_ACC4(b + 1), L32_ACC4(b + 2), L32_ACC4(b + 3), L32_ACC4(b + 4), L32_ACC4(b + 5), \
        L32_ACC4(b + 6), L32_ACC4(b + 7)

// d (64 x N, f32) = (accumulate ? d : 0) + A (64 x 16, K-major shared memory) * B (16 x N, K-major shared
// memory: N rows of 16 contiguous k), both by descriptor.
template <int N>
__device__ __forceinline__ void mma_ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b, bool accumulate);

template <>
__device__ __forceinline__ void mma_ss<64>(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
#if L32_WGMMA_AVAILABLE
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, "
        "%10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, "
        "%28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : L32_ACC8TILES(0)
        : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
#else
    (void)d, (void)desc_a, (void)desc_b, (void)accumulate;
    __trap();
#endif
}

template <>
__device__ __forceinline__ void mma_ss<128>(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
#if L32_WGMMA_AVAILABLE
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, "
        "%9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, "
        "%28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "
        "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : L32_ACC8TILES(0), L32_ACC8TILES(8)
        : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
#else
    (void)d, (void)desc_a, (void)desc_b, (void)accumulate;
    __trap();
#endif
}

// d (64 x N, f32) = (accumulate ? d : 0) + A (64 x 16 bf16, this warp's 16 rows as an mma.m16n8k16 A fragment)
// * B (16 x N, K-major shared memory by descriptor: N rows of 16 contiguous k).
template <int N>
__device__ __forceinline__ void mma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate);

template <>
__device__ __forceinline__ void mma_rs<64>(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b,
                                           bool accumulate) {
#if L32_WGMMA_AVAILABLE
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, "
        "%10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, "
        "%28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
        : L32_ACC8TILES(0)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(static_cast<int>(accumulate)));
#else
    (void)d, (void)a, (void)desc_b, (void)accumulate;
    __trap();
#endif
}

template <>
__device__ __forceinline__ void mma_rs<128>(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc_b,
                                            bool accumulate) {
#if L32_WGMMA_AVAILABLE
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, "
        "%9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, "
        "%28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "
        "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
        : L32_ACC8TILES(0), L32_ACC8TILES(8)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(static_cast<int>(accumulate)));
#else
    (void)d, (void)a, (void)desc_b, (void)accumulate;
    __trap();
#endif
}

// d (64 x N, f32) += A (64 x 16 bf16, this warp's 16 rows as an mma.m16n8k16 A fragment) * B (16 x N, MN-major
// shared memory: 16 rows of N contiguous elements, by descriptor; the "transposed" B).
template <int N>
__device__ __forceinline__ void mma_rs_bt(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b);

template <>
__device__ __forceinline__ void mma_rs_bt<64>(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b) {
#if L32_WGMMA_AVAILABLE
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, "
        "%10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, "
        "%28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : L32_ACC8TILES(0)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#else
    (void)d, (void)a, (void)desc_b;
    __trap();
#endif
}

template <>
__device__ __forceinline__ void mma_rs_bt<128>(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc_b) {
#if L32_WGMMA_AVAILABLE
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, "
        "%9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, "
        "%28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "
        "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : L32_ACC8TILES(0), L32_ACC8TILES(8)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#else
    (void)d, (void)a, (void)desc_b;
    __trap();
#endif
}

#undef L32_ACC8TILES
#undef L32_ACC4

#define L32_IACC4(j) "+r"(d[j][0]), "+r"(d[j][1]), "+r"(d[j][2]), "+r"(d[j][3])
#define L32_IACC8TILES(b)                                                                                     \
    L32_IACC4(b + 0), L32_IACC4(b + 1), L32_IACC4(b + 2), L32_IACC4(b + 3), L32_IACC4(b + 4), L32_IACC4(b + 5), \
        L32_IACC4(b + 6), L32_IACC4(b + 7)

// d (64 x N, s32) += A (64 x 32 s8, this warp's 16 rows as an mma.m16n8k32 A fragment: a0 = A[g][4t..4t+3],
// a1 = A[g+8][4t..4t+3], a2 = A[g][4t+16..4t+19], a3 = A[g+8][4t+16..4t+19], byte j = column + j) * B (32 x N s8,
// K-major shared memory by descriptor: N rows of 32 k). Exact integer accumulation onto d (scale-d = 1); d's layout
// is the f32 accumulator's (see the file comment).
template <int N>
__device__ __forceinline__ void mma_rs_s8(int (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b);

template <>
__device__ __forceinline__ void mma_rs_s8<32>(int (&d)[4][4], const uint32_t (&a)[4], uint64_t desc_b) {
#if L32_WGMMA_AVAILABLE
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, "
        "%10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p;\n}\n"
        : L32_IACC4(0), L32_IACC4(1), L32_IACC4(2), L32_IACC4(3)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#else
    (void)d, (void)a, (void)desc_b;
    __trap();
#endif
}

template <>
__device__ __forceinline__ void mma_rs_s8<64>(int (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b) {
#if L32_WGMMA_AVAILABLE
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, "
        "%10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, "
        "%28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p;\n}\n"
        : L32_IACC8TILES(0)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#else
    (void)d, (void)a, (void)desc_b;
    __trap();
#endif
}

template <>
__device__ __forceinline__ void mma_rs_s8<128>(int (&d)[16][4], const uint32_t (&a)[4], uint64_t desc_b) {
#if L32_WGMMA_AVAILABLE
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, "
        "%9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, "
        "%28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "
        "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p;\n}\n"
        : L32_IACC8TILES(0), L32_IACC8TILES(8)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#else
    (void)d, (void)a, (void)desc_b;
    __trap();
#endif
}

#undef L32_IACC8TILES
#undef L32_IACC4

}  // namespace wgmma
}  // namespace l32
