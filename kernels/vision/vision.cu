// kernels/vision/vision.cu: the elementwise and row-wise pieces of Llama 3.2 Vision on CUDA (the "vision" section of
// llama32_kernels.h): patch extraction, the embeddings + layernorm_pre, LayerNorm with a gated residual, bias +
// GELU, the output gather of the encoder, and the gated residual RMSNorm of the cross-attention text layers.
//
// Deliberately simple: grid-stride loops for the elementwise kernels, one block per row (256 threads, the row staged
// in dynamic shared memory as f32) for the row-wise ones. Statistics in f32; the CPU twins (engine/vision/encoder.rs,
// engine/vision/cuda/twins.rs) use f32 or f64. These are not on the critical path: the encoder's GEMMs and
// attention are.
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/reduce.cuh"
#include "common/status.cuh"
#include "llama32_kernels.h"

namespace l32 {
namespace {

constexpr int kRowThreads = 256;
constexpr int kMaxWidth = 16384;

__device__ __forceinline__ float ld_bf16(const void* base, int64_t i) {
    return __bfloat162float(static_cast<const bf16*>(base)[i]);
}

// Mean and 1 / sqrt(var + eps) of the `width` floats in shared memory (two passes, f32). Ends with a barrier.
__device__ __forceinline__ void row_stats(const float* row, int width, float eps, float& mean, float& inv) {
    float s = 0.f;
    for (int c = threadIdx.x; c < width; c += blockDim.x) s += row[c];
    mean = block_sum(s) / static_cast<float>(width);
    __syncthreads();  // block_sum's scratch is reused below
    float v = 0.f;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        const float d = row[c] - mean;
        v = fmaf(d, d, v);
    }
    const float var = block_sum(v) / static_cast<float>(width);
    inv = 1.f / sqrtf(var + eps);
    __syncthreads();
}

// ---- im2col ------------------------------------------------------------------------------------------------------

__global__ void im2col_kernel(const __grid_constant__ l32_vision_im2col_params p) {
    pdl_begin();
    const int per_side = p.side / p.patch;
    const int64_t grid_cells = static_cast<int64_t>(per_side) * per_side;
    const int pdim = p.channels * p.patch * p.patch;
    const int64_t total = p.tiles * grid_cells * p.k_pad;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t r = i / p.k_pad;
        const int col = static_cast<int>(i % p.k_pad);
        float v = 0.f;
        if (col < pdim) {
            const int64_t tile = r / grid_cells;
            const int cell = static_cast<int>(r % grid_cells);
            const int py = cell / per_side, px = cell % per_side;
            const int c = col / (p.patch * p.patch), ky = col / p.patch % p.patch, kx = col % p.patch;
            const int64_t src = ((tile * p.channels + c) * p.side + py * p.patch + ky) * p.side + px * p.patch + kx;
            v = p.pixels[src];
        }
        static_cast<bf16*>(p.out)[i] = __float2bfloat16_rn(v);
    }
}

// ---- embeddings + layernorm_pre ----------------------------------------------------------------------------------

__global__ void __launch_bounds__(kRowThreads) embed_kernel(const __grid_constant__ l32_vision_embed_params p) {
    pdl_begin();
    extern __shared__ float row[];
    const int64_t r = blockIdx.x;
    const int64_t it = r / p.padded;
    const int pos = static_cast<int>(r % p.padded);
    float* out = p.out + r * p.hidden;
    if (pos >= p.num_patches) {
        for (int c = threadIdx.x; c < p.hidden; c += blockDim.x) out[c] = 0.f;
        return;
    }
    const int64_t image = it / p.tiles;
    const int tile = static_cast<int>(it % p.tiles);
    const int64_t grid_cells = p.num_patches - 1;
    const uint32_t ar = p.ar_ids[image];
    const int64_t tile_pos = (static_cast<int64_t>(ar) * p.tiles * p.num_patches + static_cast<int64_t>(tile) *
                              p.num_patches + pos) * p.hidden;
    for (int c = threadIdx.x; c < p.hidden; c += blockDim.x) {
        float x;
        if (pos == 0) {
            x = p.class_embedding[c];
        } else {
            x = ld_bf16(p.conv, (it * grid_cells + pos - 1) * p.hidden + c) + p.pre_add[it * p.hidden + c];
        }
        x = (x + p.position[static_cast<int64_t>(pos) * p.hidden + c]) + p.pos_gate * ld_bf16(p.tile_position,
                                                                                              tile_pos + c);
        row[c] = x;
    }
    __syncthreads();
    float mean, inv;
    row_stats(row, p.hidden, p.eps, mean, inv);
    for (int c = threadIdx.x; c < p.hidden; c += blockDim.x) {
        out[c] = (row[c] - mean) * inv * p.ln_weight[c] + p.ln_bias[c];
    }
}

// ---- LayerNorm with gated residual -------------------------------------------------------------------------------

__global__ void __launch_bounds__(kRowThreads) layer_norm_kernel(const __grid_constant__ l32_vision_layer_norm_params p) {
    pdl_begin();
    extern __shared__ float row[];
    const int64_t r = blockIdx.x;
    float* res = p.residual + r * p.width;
    for (int c = threadIdx.x; c < p.width; c += blockDim.x) {
        float h = res[c];
        if (p.delta != nullptr) {
            float d = ld_bf16(p.delta, r * p.width + c);
            if (p.delta_bias != nullptr) d += p.delta_bias[c];
            h += p.gate * d;
            res[c] = h;
        }
        row[c] = h;
    }
    if (p.out == nullptr && p.out_f32 == nullptr) return;
    __syncthreads();
    float mean, inv;
    row_stats(row, p.width, p.eps, mean, inv);
    const float* add = p.post_add != nullptr ? p.post_add + (r / p.rows_per_group) * p.width : nullptr;
    for (int c = threadIdx.x; c < p.width; c += blockDim.x) {
        const float y = (row[c] - mean) * inv * p.weight[c] + p.bias[c];
        if (p.out != nullptr) static_cast<bf16*>(p.out)[r * p.width + c] = __float2bfloat16_rn(y);
        if (p.out_f32 != nullptr) p.out_f32[r * p.width + c] = add != nullptr ? y + add[c] : y;
    }
}

// ---- bias + activation -------------------------------------------------------------------------------------------

__global__ void bias_act_kernel(const __grid_constant__ l32_bias_act_params p) {
    pdl_begin();
    const int64_t total = p.rows * p.cols;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        float x = ld_bf16(p.x, i) + p.bias[i % p.cols];
        if (p.act == L32_BIAS_ACT_GELU) x = 0.5f * x * erfcf(-x * 0.70710678118654752f);
        static_cast<bf16*>(p.out)[i] = __float2bfloat16_rn(x);
    }
}

// ---- output gather -----------------------------------------------------------------------------------------------

__global__ void gather_kernel(const __grid_constant__ l32_vision_gather_params p) {
    pdl_begin();
    const int64_t width = static_cast<int64_t>(p.hidden) * (1 + p.n_inter);
    const int64_t rows_out = p.tiles_total * p.num_patches;
    const int64_t rows_in = p.tiles_total * p.padded;
    const int64_t total = rows_out * width;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t t = i / width;
        const int64_t col = i % width;
        const int64_t src = (t / p.num_patches) * p.padded + t % p.num_patches;
        float v;
        if (col < p.hidden) {
            v = p.final_state[src * p.hidden + col];
        } else {
            const int64_t c2 = col - p.hidden;
            const int64_t d = c2 / p.n_inter, k = c2 % p.n_inter;
            v = p.inter[(k * rows_in + src) * p.hidden + d];
        }
        static_cast<bf16*>(p.out)[i] = __float2bfloat16_rn(v);
    }
}

// ---- gated residual RMSNorm (text cross-attention layers) --------------------------------------------------------

__global__ void __launch_bounds__(kRowThreads) gated_rms_norm_kernel(const __grid_constant__ l32_gated_rms_norm_params p) {
    pdl_begin();
    extern __shared__ float row[];
    const int64_t r = blockIdx.x;
    bf16* res = static_cast<bf16*>(p.residual) + r * p.hidden;
    const float g = p.gate * (p.row_scale != nullptr ? p.row_scale[r] : 1.f);
    float ss = 0.f;
    for (int c = threadIdx.x; c < p.hidden; c += blockDim.x) {
        const float d = __bfloat162float(__float2bfloat16_rn(g * ld_bf16(p.delta, r * p.hidden + c)));
        const float h = __bfloat162float(__float2bfloat16_rn(__bfloat162float(res[c]) + d));
        res[c] = __float2bfloat16_rn(h);
        row[c] = h;
        ss = fmaf(h, h, ss);
    }
    if (p.out == nullptr) return;
    const float total = block_sum(ss);
    const float inv = rsqrtf(total / static_cast<float>(p.hidden) + p.eps);
    bf16* out = static_cast<bf16*>(p.out) + r * p.hidden;
    const bf16* w = static_cast<const bf16*>(p.weight);
    for (int c = threadIdx.x; c < p.hidden; c += blockDim.x) {
        const float n = __bfloat162float(__float2bfloat16_rn(row[c] * inv));
        out[c] = __float2bfloat16_rn(__bfloat162float(w[c]) * n);
    }
}

// Blocks for a grid-stride loop over `total` elements.
unsigned elementwise_blocks(int64_t total) {
    const int64_t blocks = (total + 255) / 256;
    return static_cast<unsigned>(blocks < 65535 * 16 ? blocks : 65535 * 16);
}

}  // namespace
}  // namespace l32

extern "C" l32_status l32_vision_im2col(const l32_vision_im2col_params* params, void* stream) {
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_vision_im2col_params& p = *params;
    if (p.out == nullptr || p.pixels == nullptr || p.tiles < 0 || p.channels < 1 || p.patch < 1 ||
        p.side < p.patch || p.k_pad < p.channels * p.patch * p.patch) {
        return L32_INVALID_ARGUMENT;
    }
    const int64_t per_side = p.side / p.patch;
    const int64_t total = p.tiles * per_side * per_side * p.k_pad;
    if (total == 0) return L32_OK;
    l32::launch_kernel(l32::im2col_kernel, l32::elementwise_blocks(total), 256, 0, static_cast<cudaStream_t>(stream),
                       p);
    return l32::check_launch();
}

extern "C" l32_status l32_vision_embed(const l32_vision_embed_params* params, void* stream) {
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_vision_embed_params& p = *params;
    if (p.out == nullptr || p.conv == nullptr || p.class_embedding == nullptr || p.pre_add == nullptr ||
        p.position == nullptr || p.tile_position == nullptr || p.ar_ids == nullptr || p.ln_weight == nullptr ||
        p.ln_bias == nullptr) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.images < 0 || p.tiles < 1 || p.num_patches < 2 || p.padded < p.num_patches || p.hidden < 1 ||
        p.ar_rows < 1 || !(p.eps >= 0.f)) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.hidden > l32::kMaxWidth) return L32_UNSUPPORTED;
    const int64_t rows = p.images * p.tiles * p.padded;
    if (rows > INT_MAX) return L32_UNSUPPORTED;
    if (rows == 0) return L32_OK;
    const size_t smem = static_cast<size_t>(p.hidden) * sizeof(float);
    if (const l32_status s = l32::allow_dynamic_smem(l32::embed_kernel, smem); s != L32_OK) return s;
    l32::launch_kernel(l32::embed_kernel, static_cast<unsigned>(rows), l32::kRowThreads, smem,
                       static_cast<cudaStream_t>(stream), p);
    return l32::check_launch();
}

extern "C" l32_status l32_vision_layer_norm(const l32_vision_layer_norm_params* params, void* stream) {
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_vision_layer_norm_params& p = *params;
    const bool normed = p.out != nullptr || p.out_f32 != nullptr;
    if (p.residual == nullptr || (normed && (p.weight == nullptr || p.bias == nullptr)) || p.rows < 0 ||
        p.rows_per_group < 1 || p.width < 1 || !(p.eps >= 0.f)) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.width > l32::kMaxWidth || p.rows > INT_MAX) return L32_UNSUPPORTED;
    if (p.rows == 0) return L32_OK;
    const size_t smem = static_cast<size_t>(p.width) * sizeof(float);
    if (const l32_status s = l32::allow_dynamic_smem(l32::layer_norm_kernel, smem); s != L32_OK) return s;
    l32::launch_kernel(l32::layer_norm_kernel, static_cast<unsigned>(p.rows), l32::kRowThreads, smem,
                       static_cast<cudaStream_t>(stream), p);
    return l32::check_launch();
}

extern "C" l32_status l32_bias_act(const l32_bias_act_params* params, void* stream) {
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_bias_act_params& p = *params;
    if (p.out == nullptr || p.x == nullptr || p.bias == nullptr || p.rows < 0 || p.cols < 1) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.act != L32_BIAS_ACT_NONE && p.act != L32_BIAS_ACT_GELU) return L32_UNSUPPORTED;
    const int64_t total = p.rows * p.cols;
    if (total == 0) return L32_OK;
    l32::launch_kernel(l32::bias_act_kernel, l32::elementwise_blocks(total), 256, 0, static_cast<cudaStream_t>(stream),
                       p);
    return l32::check_launch();
}

extern "C" l32_status l32_vision_gather(const l32_vision_gather_params* params, void* stream) {
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_vision_gather_params& p = *params;
    if (p.out == nullptr || p.final_state == nullptr || (p.n_inter > 0 && p.inter == nullptr) ||
        p.tiles_total < 0 || p.num_patches < 1 || p.padded < p.num_patches || p.hidden < 1 || p.n_inter < 0) {
        return L32_INVALID_ARGUMENT;
    }
    const int64_t total = p.tiles_total * p.num_patches * p.hidden * (1 + p.n_inter);
    if (total == 0) return L32_OK;
    l32::launch_kernel(l32::gather_kernel, l32::elementwise_blocks(total), 256, 0, static_cast<cudaStream_t>(stream),
                       p);
    return l32::check_launch();
}

extern "C" l32_status l32_gated_rms_norm(const l32_gated_rms_norm_params* params, void* stream) {
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_gated_rms_norm_params& p = *params;
    if (p.residual == nullptr || p.delta == nullptr || (p.out != nullptr && p.weight == nullptr) || p.rows < 0 ||
        p.hidden < 1 || !(p.eps >= 0.f)) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.hidden > l32::kMaxWidth || p.rows > INT_MAX) return L32_UNSUPPORTED;
    if (p.rows == 0) return L32_OK;
    const size_t smem = static_cast<size_t>(p.hidden) * sizeof(float);
    if (const l32_status s = l32::allow_dynamic_smem(l32::gated_rms_norm_kernel, smem); s != L32_OK) return s;
    l32::launch_kernel(l32::gated_rms_norm_kernel, static_cast<unsigned>(p.rows), l32::kRowThreads, smem,
                       static_cast<cudaStream_t>(stream), p);
    return l32::check_launch();
}
