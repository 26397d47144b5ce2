// kernels/vision/encoder_attention.cu: the vision encoder's self-attention on the tensor cores
// (l32_encoder_attention_params in llama32_kernels.h). Each sequence (one image: all its tiles' patches, padded) is
// a contiguous run of seq_len rows; every row attends to every row of its own sequence (non-causal), with
// transformers' additive flag mask: -FLT_MAX where both the query's and the key's flag are set (padding patches and
// padding tiles), so a flagged query sees only unflagged keys, or all keys uniformly when its sequence has none.
//
// This replaces the CUDA-core gather attention (kernels/vision/attention.cu) for head_dim 16/32/64/80/128: the 11B
// and 90B encoders have 16 heads of 80 over 4 x 1608 rows per 4-tile image, 0.2 TFLOP of attention per layer.
//
// Tiles. One CTA of 4 warps per (64-query tile, head, sequence); warp w owns query rows 16w..16w+15 and keeps its Q
// fragments in registers. The KV loop walks 64-key tiles: 16-byte cp.async into padded shared-memory rows
// (attn::PaddedTile: a pitch of D + 8 elements, conflict-free for ldmatrix at any D that is a multiple of 16), two
// stages (tile t + 1 loads while tile t is used); S = Q K^T and O += P V on the tensor cores (mma.m16n8k16 bf16 ->
// f32, operands by ldmatrix, V transposed by ldmatrix.trans, the helpers of common/attention.cuh); online softmax in
// f32 with exp2. Scores are scaled (by scale * log2 e) before masking, so a masked score is exactly -FLT_MAX: a row
// whose keys are all masked gets exp2(0) = 1 for each, the uniform softmax of the reference, and a row with any
// unmasked key gives its masked keys exp2(-FLT_MAX - m) = 0. Keys past seq_len are -inf (zero weight).
// The keys' flags of a tile are staged in shared memory beside it.
//
// Shared memory: Q 64 x (D + 8) + 2 stages x (K + V) 64 x (D + 8) bf16 + 128 flag bytes: 55 KB at D = 80, 85 KB at
// D = 128 (opted in above 48 KB).
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>

#include "common/attention.cuh"
#include "common/bf16.cuh"
#include "common/status.cuh"
#include "llama32_kernels.h"

namespace l32 {
namespace {

using namespace attn;

template <int D>
struct EncTraits {
    using Tile = PaddedTile<D>;
    static constexpr int kWarps = 4;
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kBlockM = 16 * kWarps;  // query rows per CTA
    static constexpr int kBlockN = 64;           // keys per tile
    static constexpr int kStages = 2;
    static constexpr int kTileElems = kBlockN * Tile::kPitch;
    static constexpr int kQElems = kBlockM * Tile::kPitch;
    static constexpr int kFlagBytes = kStages * kBlockN;
    static constexpr int kSmemBytes = (kQElems + kStages * 2 * kTileElems) * 2 + kFlagBytes;
    static_assert(kBlockM * Tile::kChunks % kThreads == 0, "every thread copies the same number of chunks");
};

// Rows [row0, row0 + 64) of one head of a strided bf16 matrix into a padded tile; rows at or past `rows` are
// zero-filled.
template <int D>
__device__ __forceinline__ void load_rows(bf16* tile, const bf16* base, int64_t stride, int row0, int rows) {
    using T = EncTraits<D>;
#pragma unroll
    for (int i = 0; i < T::kBlockN * T::Tile::kChunks / T::kThreads; ++i) {
        const int idx = static_cast<int>(threadIdx.x) + i * T::kThreads;
        const int row = idx / T::Tile::kChunks, chunk = idx % T::Tile::kChunks;
        const bool valid = row0 + row < rows;
        const bf16* src = valid ? base + static_cast<int64_t>(row0 + row) * stride + chunk * 8 : base;
        cp_async16(tile + T::Tile::offset(row, chunk), src, valid);
    }
}

template <int D>
__global__ void __launch_bounds__(128) encoder_attention_kernel(const __grid_constant__ l32_encoder_attention_params p) {
    pdl_begin();
    using T = EncTraits<D>;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* sq = reinterpret_cast<bf16*>(smem_raw);
    bf16* skv = sq + T::kQElems;  // stage s: K at skv + 2 s kTileElems, V right after it
    uint8_t* sflag = reinterpret_cast<uint8_t*>(skv + T::kStages * 2 * T::kTileElems);

    const int m0 = static_cast<int>(blockIdx.x) * T::kBlockM;
    const int head = blockIdx.y;
    const int64_t seq_row0 = static_cast<int64_t>(blockIdx.z) * p.seq_len;
    const int n = p.seq_len;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const uint8_t* flags = p.flags == nullptr ? nullptr : p.flags + seq_row0;

    const bf16* q = static_cast<const bf16*>(p.q) + seq_row0 * p.q_stride + static_cast<int64_t>(head) * D;
    const bf16* k = static_cast<const bf16*>(p.k) + seq_row0 * p.kv_stride + static_cast<int64_t>(head) * D;
    const bf16* v = static_cast<const bf16*>(p.v) + seq_row0 * p.kv_stride + static_cast<int64_t>(head) * D;

    // Tile 0 and the Q tile in one cp.async group, with tile 0's key flags.
    load_rows<D>(sq, q, p.q_stride, m0, n);
    load_rows<D>(skv, k, p.kv_stride, 0, n);
    load_rows<D>(skv + T::kTileElems, v, p.kv_stride, 0, n);
    cp_async_commit();
    if (flags != nullptr && tid < T::kBlockN) sflag[tid] = tid < n ? flags[tid] : 0;

    const int g = lane / 4, tq = lane % 4;
    bool q_flag[2] = {false, false};
    if (flags != nullptr) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = m0 + warp * 16 + g + 8 * h;
            q_flag[h] = r < n && flags[r] != 0;
        }
    }

    const float scale_log2 = p.scale * 1.4426950408889634f;
    float o[D / 8][4];
#pragma unroll
    for (int d = 0; d < D / 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    RowState st;
    uint32_t qf[D / 16][4];

    const int num_tiles = (n + T::kBlockN - 1) / T::kBlockN;
    for (int t = 0; t < num_tiles; ++t) {
        const int n0 = t * T::kBlockN;
        if (t + 1 < num_tiles) {
            const int stage = (t + 1) % T::kStages;
            bf16* next = skv + stage * 2 * T::kTileElems;
            load_rows<D>(next, k, p.kv_stride, n0 + T::kBlockN, n);
            load_rows<D>(next + T::kTileElems, v, p.kv_stride, n0 + T::kBlockN, n);
            cp_async_commit();
            if (flags != nullptr && tid < T::kBlockN) {
                const int key = n0 + T::kBlockN + tid;
                sflag[stage * T::kBlockN + tid] = key < n ? flags[key] : 0;
            }
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (t == 0) load_a_fragments<D, typename T::Tile>(qf, sq, warp * 16);
        const bf16* sk = skv + (t % T::kStages) * 2 * T::kTileElems;
        const bf16* sv = sk + T::kTileElems;
        const uint8_t* kflag = sflag + (t % T::kStages) * T::kBlockN;

        float s[T::kBlockN / 8][4];
        qk_scores<D, T::kBlockN / 8, typename T::Tile>(s, qf, sk, 0);
#pragma unroll
        for (int j = 0; j < T::kBlockN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int kc = j * 8 + 2 * tq + e;  // key within the tile
                const bool in_range = n0 + kc < n;
                const bool k_flag = flags != nullptr && kflag[kc] != 0;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    float x = s[j][2 * h + e] * scale_log2;
                    if (q_flag[h] && k_flag) x = -FLT_MAX;
                    s[j][2 * h + e] = in_range ? x : -INFINITY;
                }
            }
        }
        // Scores are already in log2 units: a scale of 1 keeps them (and -FLT_MAX) exact.
        online_softmax<T::kBlockN / 8, D / 8>(s, o, st, 1.f);
        pv_accumulate<D, T::kBlockN / 8, typename T::Tile>(o, s, sv, 0);
        __syncthreads();  // the next iteration's load overwrites this stage
    }
    finish_row_sums(st);

    // Epilogue: normalize and store each thread's bf16 pairs straight to the strided output rows.
    const float inv[2] = {st.l[0] > 0.f ? 1.f / st.l[0] : 0.f, st.l[1] > 0.f ? 1.f / st.l[1] : 0.f};
    bf16* out = static_cast<bf16*>(p.out) + seq_row0 * p.out_stride + static_cast<int64_t>(head) * D;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = m0 + warp * 16 + g + 8 * h;
        if (r >= n) continue;
        bf16* row = out + static_cast<int64_t>(r) * p.out_stride;
#pragma unroll
        for (int d = 0; d < D / 8; ++d) {
            *reinterpret_cast<uint32_t*>(row + d * 8 + 2 * tq) = pack_bf16x2(o[d][2 * h] * inv[h], o[d][2 * h + 1] * inv[h]);
        }
    }
}

template <int D>
l32_status launch(const l32_encoder_attention_params& p, cudaStream_t stream) {
    using T = EncTraits<D>;
    if (const l32_status s = allow_dynamic_smem(encoder_attention_kernel<D>, T::kSmemBytes); s != L32_OK) return s;
    const dim3 grid(static_cast<unsigned>((p.seq_len + T::kBlockM - 1) / T::kBlockM),
                    static_cast<unsigned>(p.num_heads), static_cast<unsigned>(p.num_seqs));
    launch_kernel(encoder_attention_kernel<D>, grid, T::kThreads, T::kSmemBytes, stream, p);
    return check_launch();
}

}  // namespace
}  // namespace l32

extern "C" int32_t l32_encoder_attention_supports(int32_t head_dim) {
    return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 80 || head_dim == 128;
}

extern "C" l32_status l32_encoder_attention(const l32_encoder_attention_params* params, void* stream) {
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_encoder_attention_params& p = *params;
    if (p.out == nullptr || p.q == nullptr || p.k == nullptr || p.v == nullptr) return L32_INVALID_ARGUMENT;
    if (p.num_seqs < 0 || p.seq_len < 1 || p.num_heads < 1 || !(p.scale > 0.f) || !std::isfinite(p.scale)) {
        return L32_INVALID_ARGUMENT;
    }
    if (!l32_encoder_attention_supports(p.head_dim)) return L32_UNSUPPORTED;
    const int64_t width = int64_t{p.num_heads} * p.head_dim;
    if (p.q_stride < width || p.kv_stride < width || p.out_stride < width) return L32_INVALID_ARGUMENT;
    if (p.num_seqs > 65535 || p.num_heads > 65535 || p.seq_len > INT_MAX - 64) return L32_UNSUPPORTED;
    if (p.q_stride % 8 != 0 || p.kv_stride % 8 != 0 || p.out_stride % 2 != 0 || !l32::is_aligned(p.q, 16) ||
        !l32::is_aligned(p.k, 16) || !l32::is_aligned(p.v, 16) || !l32::is_aligned(p.out, 4)) {
        return L32_UNSUPPORTED;
    }
    if (p.num_seqs == 0) return L32_OK;
    const auto s = static_cast<cudaStream_t>(stream);
    switch (p.head_dim) {
        case 16: return l32::launch<16>(p, s);
        case 32: return l32::launch<32>(p, s);
        case 64: return l32::launch<64>(p, s);
        case 80: return l32::launch<80>(p, s);
        default: return l32::launch<128>(p, s);
    }
}
