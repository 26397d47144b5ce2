// kernels/logprobs.cu: token masks and log-probabilities over bf16 logits rows (l32_mask_params /
// l32_logprob_params in llama32_kernels.h), the twins of crate::sampling::TokenMask::apply and
// crate::sampling::token_logprob. They keep structured outputs and logprobs on the device: a step copies back a
// few numbers per scored row instead of every row's logits.
//
// mask: one thread per 32-token mask word; a word with every bit set (most of a permissive grammar's vocabulary) is
// one load and nothing else, and each clear bit writes its logit's -inf.
//
// token_logprobs: one CTA of 512 threads per entry, every pass reading the row from L2 (a 128256-token row is 256 KB):
//   1. one pass: each thread's online maximum and f64 sum of expf(l - max) over its logits (NaN and -inf add
//      nothing), then the block's maximum M and sum S: lse = M + ln S (M when M is infinite);
//   2. one pass: the rank, the count of logits >= the scored token's;
//   3. one pass per alternative the entry wants: the largest (value, -id) key strictly below the previous
//      alternative's, so the alternatives come out largest first, ties lower id first, without sorting or shared
//      candidate buffers.
// That is top + 2 passes; the CPU twin's single-pass selection suits a core, this one suits a CTA. Scoring runs only
// for rows that want logprobs, after the step's sampling.
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/block_scan.cuh"
#include "common/launch.cuh"
#include "common/status.cuh"
#include "llama32_kernels.h"

namespace l32 {
namespace {

constexpr uint32_t kNoId = 0xFFFFFFFFu;
constexpr int kMaskThreads = 256;
constexpr int kThreads = 512;

// Order-preserving map of a non-NaN float to u32 (a < b <=> key(a) < key(b)).
__device__ __forceinline__ uint32_t float_key(float x) {
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The alternatives' order as one u64: larger value first, then lower id; NaN is 0 (never picked), -0 ties with +0.
// Every non-NaN key is above 0 (float_key(-inf) is 0x007FFFFF).
__device__ __forceinline__ uint64_t order_key(float x, uint32_t id) {
    if (x != x) return 0;
    return (static_cast<uint64_t>(float_key(x == 0.f ? 0.f : x)) << 32) | (kNoId - id);
}

// grid = (ceil(words / kMaskThreads), masks), block = kMaskThreads.
__global__ void __launch_bounds__(kMaskThreads) mask_kernel(const __grid_constant__ l32_mask_params p) {
    pdl_begin();
    const int64_t w = static_cast<int64_t>(blockIdx.x) * kMaskThreads + threadIdx.x;
    const int64_t first = w * 32;
    if (first >= p.vocab) return;
    const int64_t j = blockIdx.y;
    if (static_cast<int64_t>(p.rows[j]) >= p.total_rows) return;
    const uint32_t word = p.bits[j * p.words + w];
    if (word == 0xFFFFFFFFu) return;
    bf16* row = static_cast<bf16*>(p.logits) + static_cast<int64_t>(p.rows[j]) * p.vocab;
    const int n = static_cast<int>(p.vocab - first < 32 ? p.vocab - first : 32);
    const bf16 neg_inf = __float2bfloat16(-INFINITY);
    for (int i = 0; i < n; ++i) {
        if (((word >> i) & 1u) == 0) row[first + i] = neg_inf;
    }
}

// The largest of each thread's floats (NaN never; -inf when all are NaN or -inf).
__device__ __forceinline__ float block_max(float v) { return -block_min(-v); }

// grid = n, block = kThreads.
__global__ void __launch_bounds__(kThreads) logprob_kernel(const __grid_constant__ l32_logprob_params p) {
    pdl_begin();
    const int64_t j = blockIdx.x;
    const int top = p.entry_top != nullptr ? min(max(p.entry_top[j], 0), p.top) : p.top;
    if (static_cast<int64_t>(p.rows[j]) >= p.total_rows) {
        // A row outside the buffer (a caller's bug): marked, never read.
        if (threadIdx.x == 0) {
            p.out_logprob[j] = NAN;
            p.out_rank[j] = 0;
            for (int r = 0; r < p.top; ++r) {
                p.out_top_ids[j * p.top + r] = kNoId;
                p.out_top_logprobs[j * p.top + r] = -INFINITY;
            }
        }
        return;
    }
    const bf16* row = static_cast<const bf16*>(p.logits) + static_cast<int64_t>(p.rows[j]) * p.vocab;
    const int64_t vocab = p.vocab;

    // Pass 1: online maximum and sum, and the count of non-NaN logits.
    float m = -INFINITY;
    double s = 0.0;
    double finite = 0.0;
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
        const float x = __bfloat162float(row[i]);
        if (x != x) continue;
        finite += 1.0;
        if (x == -INFINITY) continue;
        if (x > m) {
            s = (m == -INFINITY ? 0.0 : s * static_cast<double>(expf(m - x))) + 1.0;
            m = x;
        } else {
            s += static_cast<double>(expf(x - m));
        }
    }
    const float big = block_max(m);
    // Each thread's sum relative to the block maximum (threads whose maximum is -inf add nothing; with an infinite
    // block maximum the sum is not used).
    const double scaled = m == -INFINITY || !isfinite(big) ? 0.0 : s * exp(static_cast<double>(m) - big);
    const Sum2 totals = block_sum2(scaled, finite);
    const double lse = isfinite(big) ? static_cast<double>(big) + log(totals.a) : static_cast<double>(big);
    const double non_nan = totals.b;

    // Pass 2: the rank of the scored token.
    const uint32_t id = p.ids[j];
    const float v = id < vocab ? __bfloat162float(row[id]) : NAN;
    double at_least = 0.0;
    if (v == v) {
        for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
            at_least += __bfloat162float(row[i]) >= v ? 1.0 : 0.0;
        }
    }
    const Sum2 counted = block_sum2(at_least, 0.0);
    if (threadIdx.x == 0) {
        p.out_rank[j] = static_cast<uint32_t>(v == v ? counted.a : 1.0 + non_nan);
        p.out_logprob[j] = v == v ? static_cast<float>(static_cast<double>(v) - lse) : -INFINITY;
    }

    // Passes 3..: the alternatives, each the largest key below the previous one.
    uint64_t prev = ~uint64_t{0};
    for (int r = 0; r < p.top; ++r) {
        uint64_t best = 0;
        // Past the entry's own count the slots get the placeholder (r and top are the same on every thread).
        if (prev != 0 && r < top) {
            for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
                const uint64_t k = order_key(__bfloat162float(row[i]), static_cast<uint32_t>(i));
                if (k < prev && k > best) best = k;
            }
        }
        best = block_max_u64(best);
        if (threadIdx.x == 0) {
            const int64_t o = j * p.top + r;
            if (best == 0) {
                p.out_top_ids[o] = kNoId;
                p.out_top_logprobs[o] = -INFINITY;
            } else {
                // The logit itself (the key folds -0 into +0), so that the sign of a zero result is the CPU's.
                const uint32_t id = kNoId - static_cast<uint32_t>(best);
                const float x = __bfloat162float(row[id]);
                p.out_top_ids[o] = id;
                p.out_top_logprobs[o] = static_cast<float>(static_cast<double>(x) - lse);
            }
        }
        prev = best;
    }
}

}  // namespace
}  // namespace l32

extern "C" l32_status l32_mask_logits(const l32_mask_params* params, void* stream) {
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_mask_params& p = *params;
    if (p.dtype != L32_DTYPE_BF16) return L32_UNSUPPORTED;
    if (p.masks < 0 || p.vocab <= 0 || p.total_rows < 0 || p.words < (p.vocab + 31) / 32) return L32_INVALID_ARGUMENT;
    if (p.masks > 0 && (p.logits == nullptr || p.rows == nullptr || p.bits == nullptr)) return L32_INVALID_ARGUMENT;
    if (p.masks > 65535 || p.vocab > (int64_t{1} << 30)) return L32_UNSUPPORTED;
    if (p.masks == 0) return L32_OK;
    const int64_t words = (p.vocab + 31) / 32;
    const dim3 grid(static_cast<unsigned>((words + l32::kMaskThreads - 1) / l32::kMaskThreads),
                    static_cast<unsigned>(p.masks));
    l32::launch_kernel(l32::mask_kernel, grid, l32::kMaskThreads, 0, static_cast<cudaStream_t>(stream), p);
    return l32::check_launch();
}

extern "C" l32_status l32_token_logprobs(const l32_logprob_params* params, void* stream) {
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_logprob_params& p = *params;
    if (p.dtype != L32_DTYPE_BF16) return L32_UNSUPPORTED;
    if (p.n < 0 || p.vocab <= 0 || p.top < 0 || p.total_rows < 0) return L32_INVALID_ARGUMENT;
    if (p.n > 0 && (p.out_logprob == nullptr || p.out_rank == nullptr || p.logits == nullptr || p.rows == nullptr ||
                    p.ids == nullptr)) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.n > 0 && p.top > 0 && (p.out_top_ids == nullptr || p.out_top_logprobs == nullptr)) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.n > INT_MAX || p.vocab > (int64_t{1} << 30) || p.top > L32_MAX_TOP_LOGPROBS) return L32_UNSUPPORTED;
    if (p.n == 0) return L32_OK;
    l32::launch_kernel(l32::logprob_kernel, static_cast<unsigned>(p.n), l32::kThreads, 0,
                       static_cast<cudaStream_t>(stream), p);
    return l32::check_launch();
}
