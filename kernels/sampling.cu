// kernels/sampling.cu: next-token selection over bf16 logits rows (l32_argmax_params / l32_sample_params in
// llama32_kernels.h), the twins of crate::sampling::argmax and crate::sampling::Sampler::sample.
//
// Three tiers per entry: the kernels, the launchers that pick the vector width, and the checked C entries.
//
// argmax (the greedy hot path): one CTA of 1024 threads per row; each thread streams 4 x 16-byte vectors per step
// (64 KB in flight per SM) with evict-first loads, reduces the 32 values with packed bf16 max (NaN-ignoring) and only
// when that maximum beats its running best looks for its first occurrence; then one u64 block max over
// (ordered value key << 32 | ~index), so the lowest index wins ties. A 128256-entry row is 16032 vectors: 16 per
// thread.
//
// sample: one CTA of 512 threads per row, every pass over the row reading it from L2 (16 MB for 64 rows of Llama 3's
// vocabulary stays resident on an H100). The pipeline, in the CPU twin's order:
//   0. logit bias and penalties: the row's sorted (id, count, bias) list becomes a bitmap in shared memory (vocab / 8
//      bytes); an element whose bit is set gets its biased and penalized value from the list by binary search,
//      everything else is read as is;
//   A. one pass: the argmax of the penalized row (greedy rows, and rows with nothing finite, stop here);
//   B. one pass: count, weight sum and smallest value of the min-p survivors, with min-p's f64 test
//      (l - m) / T >= ln(min_p) turned into an exact f32 threshold by bisection over the f32 values (no pass);
//   C. with top-k or top-p on: a few passes bisect a value cut c (c <= every finally kept logit, at most kCap
//      survivors above it) and one ordered pass compacts those survivors into shared memory in id order; the
//      selection below then runs on that compacted set. When no such cut exists (k > kCap, a flat nucleus), it
//      runs on the whole row instead (exact, but some 30 to 60 passes);
//   D. selection, on either source: top-k by bisection over the ordered f32 keys (block-wide counts) plus an ordered
//      id scan for the ties at the k-th value; top-p the same way with weight sums; then the draw: an ordered scan in
//      id order (block-wide f64 prefix sums) for the first kept token whose running weight exceeds u * Z.
// Without top-k and top-p a sampled row costs passes A, B and half of one ordered scan on average.
//
// Numerics: see l32_sample_params. Kept-set decisions compare f32 values exactly as the CPU does; weights are
// exp2f((l - m) * (log2(e) / T)) in f32, summed in f32 over at most 32 elements and in f64 beyond.
//
// Registers from ptxas (CUDA 13.0, sm_80 / sm_89 / sm_90a), no spills: argmax W = 8: 29 / 29 / 28, W = 1: 32;
// sample W = 8: 76 / 80 / 100 (one 512-thread CTA per SM), W = 1: 64 / 66 / 72; sample keeps a 64-byte stack frame
// for the out-of-line penalty and bias lookup (called only for listed tokens). argmax's loop is 4 LDG.E.EF.128, 8 three-input
// VHMNMX.BF16_V2 and one FMNMX per 32 logits.
#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>

#include "common/bf16.cuh"
#include "common/block_scan.cuh"
#include "common/status.cuh"
#include "llama32_kernels.h"

namespace l32 {
namespace {

constexpr uint32_t kNoId = 0xFFFFFFFFu;
constexpr float kGreedyEps = 1e-5f;  // crate::sampling::GREEDY_TEMPERATURE_EPS
constexpr double kLog2e = 1.4426950408889634;

// ---- shared pieces -------------------------------------------------------------------------------------------------

// Order-preserving map of a non-NaN float to u32: a < b <=> key(a) < key(b) (with -0 just below +0).
__device__ __forceinline__ uint32_t float_key(float x) {
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_float(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

// The argmax order as one u64: larger value first, then lower id; NaN is 0 (never wins), -0 ties with +0.
__device__ __forceinline__ uint64_t argmax_key(float x, uint32_t id) {
    if (x != x) return 0;
    return (static_cast<uint64_t>(float_key(x == 0.f ? 0.f : x)) << 32) | (kNoId - id);
}

// The id of a block-reduced argmax_key; 0 when every value was NaN (the CPU's answer for an all-NaN row).
__device__ __forceinline__ uint32_t argmax_id(uint64_t k) { return k == 0 ? 0u : kNoId - static_cast<uint32_t>(k); }

// 16-byte load with the evict-first hint: argmax reads each logit exactly once.
__device__ __forceinline__ uint4 load_streaming(const uint4* p) { return __ldcs(p); }

__device__ __forceinline__ __nv_bfloat162 as_bf162(uint32_t bits) {
    __nv_bfloat162 r;
    memcpy(&r, &bits, sizeof r);
    return r;
}

// ---- argmax --------------------------------------------------------------------------------------------------------

constexpr int kArgmaxThreads = 1024;
constexpr int kArgmaxUnroll = 4;

// One thread's running best: value and id (kNoId: nothing non-NaN seen yet). Ids arrive in increasing order, so a
// strict > keeps the lowest id among equal values.
struct Best {
    float v = -INFINITY;
    uint32_t id = kNoId;
    __device__ __forceinline__ void offer(float x, uint32_t i) {
        if (x > v || (id == kNoId && x == x)) {
            v = x;
            id = i;
        }
    }
};

// Tier 1. grid = rows, block = kArgmaxThreads.
template <int W>
__global__ void __launch_bounds__(kArgmaxThreads) argmax_kernel(const __grid_constant__ l32_argmax_params p) {
    pdl_begin();
    const int64_t row = blockIdx.x;
    const int n = static_cast<int>(p.vocab / W);
    const bf16* base = static_cast<const bf16*>(p.logits) + row * p.vocab;
    Best best;
    int c = threadIdx.x;
    if constexpr (W == 8) {
        const uint4* x = reinterpret_cast<const uint4*>(base);
        constexpr int kStep = kArgmaxUnroll * kArgmaxThreads;
        for (; c + (kArgmaxUnroll - 1) * kArgmaxThreads < n; c += kStep) {
            uint4 v[kArgmaxUnroll];
#pragma unroll
            for (int u = 0; u < kArgmaxUnroll; ++u) v[u] = load_streaming(x + c + u * kArgmaxThreads);
            // __hmax2 returns the other operand when one is NaN, so g is NaN only if all 32 values are.
            __nv_bfloat162 m = as_bf162(v[0].x);
#pragma unroll
            for (int u = 0; u < kArgmaxUnroll; ++u) {
                if (u > 0) m = __hmax2(m, as_bf162(v[u].x));
                m = __hmax2(m, as_bf162(v[u].y));
                m = __hmax2(m, as_bf162(v[u].z));
                m = __hmax2(m, as_bf162(v[u].w));
            }
            const float g = fmaxf(__low2float(m), __high2float(m));
            if (g > best.v || (best.id == kNoId && g == g)) {
                // Rare after the first steps: the first element equal to g (-0 == +0) is the new best.
                bool done = false;
#pragma unroll
                for (int u = 0; u < kArgmaxUnroll; ++u) {
                    BF16Vec<8> b;
                    memcpy(&b, &v[u], sizeof b);
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        if (!done && b.get(i) == g) {
                            best.v = g;
                            best.id = static_cast<uint32_t>((c + u * kArgmaxThreads) * 8 + i);
                            done = true;
                        }
                    }
                }
            }
        }
        for (; c < n; c += kArgmaxThreads) {
            const uint4 raw = load_streaming(x + c);
            BF16Vec<8> b;
            memcpy(&b, &raw, sizeof b);
#pragma unroll
            for (int i = 0; i < 8; ++i) best.offer(b.get(i), static_cast<uint32_t>(c * 8 + i));
        }
    } else {
        for (; c < n; c += kArgmaxThreads) best.offer(__bfloat162float(base[c]), static_cast<uint32_t>(c));
    }
    const uint64_t k = block_max_u64(best.id == kNoId ? 0 : argmax_key(best.v, best.id));
    if (threadIdx.x == 0) p.out_ids[row] = argmax_id(k);
}

// Tier 2.
template <int W>
l32_status launch_argmax(const l32_argmax_params& p, cudaStream_t stream) {
    launch_kernel(argmax_kernel<W>, static_cast<unsigned>(p.rows), kArgmaxThreads, 0, stream, p);
    return check_launch();
}

// ---- sample: the row as a source of (value, id) ---------------------------------------------------------------------

constexpr int kThreads = 512;
constexpr int kCap = 4096;       // compacted candidates kept in shared memory (8 bytes each)
constexpr int kCutIters = 12;    // passes spent looking for the compaction cut before falling back to the row

// +inf counts as FLT_MAX (the CPU's `l.min(f32::MAX)`); NaN and -inf stay, and every filter below drops them.
__device__ __forceinline__ float clamp_inf(float x) { return x > FLT_MAX ? FLT_MAX : x; }

// Sources of (value, id): `slots` slots, each one or more elements in increasing id order, ids increasing with the
// slot index. load(s) fetches slot s (the loads of several slots can be in flight together), and visit(s, data, f)
// calls f(value, id) for its elements. Values are the penalized logits, not clamped.

// The penalized logits row in global memory, slot s = the W bf16 at ids s * W ...
template <int W>
struct RowSource {
    using Data = BF16Vec<W>;
    const BF16Vec<W>* x;
    int slots;
    const uint32_t* bitmap;      // shared memory, a bit per id with penalties; nullptr: no penalties in this row
    const uint32_t* pen_ids;     // this row's sorted list
    const uint32_t* pen_counts;
    const float* pen_bias;       // this row's biases, or nullptr
    int pen_n;
    float rep, freq, pres;

    // Exactly Sampler::apply_penalties in f32, with no contraction into FMAs: the bias, then the repetition penalty
    // (not for a token listed only for its bias), then the frequency and presence penalties.
    __device__ __noinline__ float penalize(uint32_t id, float l) const {
        int lo = 0, hi = pen_n;
        while (lo < hi) {
            const int mid = (lo + hi) / 2;
            if (pen_ids[mid] < id) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        const bool found = lo < pen_n && pen_ids[lo] == id;
        const uint32_t raw = found ? pen_counts[lo] : 0u;
        const uint32_t count = raw & ~L32_PENALTY_UNSEEN;
        // A zero bias is no bias (adding +0 would turn -0 into +0), here and on the CPU.
        const float bias = found && pen_bias != nullptr ? pen_bias[lo] : 0.f;
        if (bias != 0.f) l = __fadd_rn(l, bias);
        if ((raw & L32_PENALTY_UNSEEN) == 0u) l = l > 0.f ? __fdiv_rn(l, rep) : __fmul_rn(l, rep);
        if (count > 0) {
            l = __fsub_rn(l, __fmul_rn(freq, __uint2float_rn(count)));
            l = __fsub_rn(l, pres);
        }
        return l;
    }

    __device__ __forceinline__ Data load(int s) const { return load_vec(x + s); }

    template <class F>
    __device__ __forceinline__ void visit(int s, const Data& v, F&& f) const {
        const uint32_t id0 = static_cast<uint32_t>(s) * W;
        const uint32_t bits = bitmap != nullptr ? bitmap[id0 / 32] >> (id0 % 32) : 0u;
#pragma unroll
        for (int i = 0; i < W; ++i) {
            float l = v.get(i);
            if ((bits >> i) & 1u) l = penalize(id0 + i, l);
            f(l, id0 + i);
        }
    }
};

// The compacted candidates in shared memory, in increasing id order; one element per slot.
struct CandSource {
    using Data = int;
    const float* v;
    const uint32_t* id;
    int slots;
    __device__ __forceinline__ Data load(int s) const { return s; }
    template <class F>
    __device__ __forceinline__ void visit(int, const Data& s, F&& f) const {
        f(v[s], id[s]);
    }
};

// Slots each thread has in flight: strided (coalesced) in for_each, contiguous in the ordered scans.
constexpr int kUnroll = 4;

// Every element of the source, kUnroll slots per thread at a time, strided by kThreads: f(value, id) per element,
// then flush() after each batch of slots (at most kUnroll * W elements).
template <class Src, class F, class Flush>
__device__ __forceinline__ void for_each(const Src& src, F&& f, Flush&& flush) {
    for (int s0 = threadIdx.x; s0 < src.slots; s0 += kUnroll * kThreads) {
        typename Src::Data d[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (s0 + u * kThreads < src.slots) d[u] = src.load(s0 + u * kThreads);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (s0 + u * kThreads < src.slots) src.visit(s0 + u * kThreads, d[u], f);
        }
        flush();
    }
}

// Unnormalized weight exp((x - m) / T) = 2^((x - m) * log2(e) / T), in f32; x <= m.
struct Temp {
    float mc;  // the largest logit, clamped to FLT_MAX
    float k2;  // log2(e) / T
    __device__ __forceinline__ float weight(float x) const { return exp2f((x - mc) * k2); }
};

// Block-wide count (a) and, with kMass, weight sum (b) of the elements whose clamped value passes pred(x, id).
// Weights are summed in f32 over one batch (<= 32 elements), batches in f64.
template <bool kMass, class Src, class P>
__device__ Sum2 count_mass(const Src& src, const Temp& t, P&& pred) {
    double count = 0.0, mass = 0.0;
    int c = 0;
    float m = 0.f;
    for_each(
        src,
        [&](float x, uint32_t id) {
            x = clamp_inf(x);
            if (pred(x, id)) {
                ++c;
                if constexpr (kMass) m += t.weight(x);
            }
        },
        [&] {
            count += c;
            mass += m;
            c = 0;
            m = 0.f;
        });
    return block_sum2(count, mass);
}

// The largest id whose clamped value passes pred (0 when none does).
template <class Src, class P>
__device__ uint32_t max_id(const Src& src, P&& pred) {
    uint64_t best = 0;
    for_each(
        src,
        [&](float x, uint32_t id) {
            if (pred(clamp_inf(x), id)) best = best > id + 1ull ? best : id + 1ull;
        },
        [] {});
    best = block_max_u64(best);
    return best == 0 ? 0u : static_cast<uint32_t>(best - 1);
}

// Walks the source in increasing id order with a running sum, starting at `running`, of w(x, id) >= 0 (f32, of the
// clamped x) and returns the first id at which the sum reaches `target` (> target when strict, >= otherwise); kNoId
// when the whole source does not. Tiles of kUnroll * kThreads slots, each thread kUnroll contiguous ones, go through
// a block-wide f64 prefix sum; the first thread whose prefix reaches the target walks its own slots again (from
// registers) in f64. Should rounding make that walk fall short, its last element of positive weight is the answer.
template <class Src, class Wf>
__device__ uint32_t first_reaching(const Src& src, Wf&& w, double running, double target, bool strict) {
    __shared__ uint32_t found;
    const auto reach = [&](double acc) { return strict ? acc > target : acc >= target; };
    for (int base = 0; base < src.slots; base += kUnroll * kThreads) {
        const int s0 = base + static_cast<int>(threadIdx.x) * kUnroll;
        typename Src::Data d[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (s0 + u < src.slots) d[u] = src.load(s0 + u);
        }
        double local = 0.0;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (s0 + u < src.slots) {
                float ws = 0.f;
                src.visit(s0 + u, d[u], [&](float x, uint32_t id) { ws += w(clamp_inf(x), id); });
                local += ws;
            }
        }
        double total;
        const double incl = block_inclusive_scan(local, total);
        const int first = block_first(local > 0.0 && reach(running + incl));
        if (first >= 0) {
            if (static_cast<int>(threadIdx.x) == first) {
                double acc = running + (incl - local);
                uint32_t pick = kNoId, last = kNoId;
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    if (s0 + u < src.slots) {
                        src.visit(s0 + u, d[u], [&](float x, uint32_t id) {
                            const float wi = w(clamp_inf(x), id);
                            if (wi > 0.f) {
                                acc += wi;
                                last = id;
                                if (pick == kNoId && reach(acc)) pick = id;
                            }
                        });
                    }
                }
                found = pick != kNoId ? pick : last;
            }
            __syncthreads();
            const uint32_t r = found;
            __syncthreads();
            return r;
        }
        running += total;
    }
    return kNoId;
}

// A cut in the (descending value, ascending id) order: keeps x > v, and x == v with id <= id_max.
struct Cut {
    float v = -FLT_MAX;
    uint32_t id_max = kNoId;
    bool on = false;
    __device__ __forceinline__ bool keeps(float x, uint32_t id) const {
        return !on || x > v || (x == v && id <= id_max);
    }
};

// What the selection needs besides the source.
struct Selection {
    Temp temp;
    float thr0;      // min-p threshold: keep0 is x >= thr0 (drops NaN and -inf too)
    float lo_bound;  // a value <= every candidate the bisections need (thr0, or the compaction cut)
    int top_k;
    bool topk;       // top-k cuts (0 < k < number of min-p survivors)
    bool topp;       // top_p < 1
    float top_p;
    double z0;       // weight sum of all min-p survivors of the row
    double u;
};

// Steps D of the file comment on one source; returns the drawn id.
template <class Src>
__device__ uint32_t select_and_draw(const Src& src, const Selection& s) {
    const Temp& t = s.temp;
    const float thr0 = s.thr0;
    Cut ck, cp;
    if (s.topk) {
        // The k-th largest value: the largest key with at least k survivors at or above it.
        uint32_t lo = float_key(s.lo_bound), hi = float_key(t.mc) + 1;
        while (hi - lo > 1) {
            const uint32_t mid = lo + (hi - lo) / 2;
            const double c =
                count_mass<false>(src, t, [&](float x, uint32_t) { return x >= thr0 && float_key(x) >= mid; }).a;
            if (c >= s.top_k) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        ck.v = key_float(lo);
        const float v = ck.v;
        const double gt = count_mass<false>(src, t, [&](float x, uint32_t) { return x >= thr0 && x > v; }).a;
        // The ties at v fill the remaining k - gt places, lowest ids first.
        ck.id_max = first_reaching(
            src, [&](float x, uint32_t) { return x >= thr0 && x == v ? 1.f : 0.f; }, gt, s.top_k, false);
        ck.on = true;
    }
    const auto keep1 = [&](float x, uint32_t id) { return x >= thr0 && ck.keeps(x, id); };
    if (s.topp) {
        const double z1 = s.topk ? count_mass<true>(src, t, keep1).b : s.z0;
        const double target = static_cast<double>(s.top_p) * z1;
        // The value of the token where the descending walk reaches target: the largest key whose mass at or above
        // it reaches the target.
        uint32_t lo = float_key(s.lo_bound), hi = float_key(t.mc) + 1;
        while (hi - lo > 1) {
            const uint32_t mid = lo + (hi - lo) / 2;
            const double m =
                count_mass<true>(src, t, [&](float x, uint32_t id) { return keep1(x, id) && float_key(x) >= mid; }).b;
            if (m >= target) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        cp.v = key_float(lo);
        const float v = cp.v;
        const double above = count_mass<true>(src, t, [&](float x, uint32_t id) { return keep1(x, id) && x > v; }).b;
        cp.id_max = first_reaching(
            src, [&](float x, uint32_t id) { return keep1(x, id) && x == v ? t.weight(x) : 0.f; },
            above, target, false);
        cp.on = true;
    }
    const auto keep2 = [&](float x, uint32_t id) { return keep1(x, id) && cp.keeps(x, id); };
    const double z2 = (s.topk || s.topp) ? count_mass<true>(src, t, keep2).b : s.z0;
    const uint32_t id = first_reaching(
        src, [&](float x, uint32_t i) { return keep2(x, i) ? t.weight(x) : 0.f; }, 0.0,
        s.u * z2, true);
    // Only reachable through rounding (u * Z at the very top): the last kept token, as on the CPU.
    return id != kNoId ? id : max_id(src, keep2);
}

// The smallest f32 x >= -FLT_MAX with ((double)x - (double)mc) / t >= ln_min_p (the CPU's min-p test, which is
// monotone in x), found by bisection over the ordered keys: x >= threshold is then exactly that test.
__device__ float minp_threshold(float mc, double t, double ln_min_p) {
    const auto keep = [&](uint32_t k) {
        return (static_cast<double>(key_float(k)) - static_cast<double>(mc)) / t >= ln_min_p;
    };
    uint32_t lo = float_key(-FLT_MAX), hi = float_key(mc);
    if (keep(lo)) return -FLT_MAX;
    while (hi - lo > 1) {
        const uint32_t mid = lo + (hi - lo) / 2;
        if (keep(mid)) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    return key_float(hi);
}

// Step C: a value cut c in (lo, m) with at most kCap survivors at or above it that still holds every token the
// filters can keep: at least k of them (top-k), or at least top_p of the weight (top-p alone). Value bisection, at
// most kCutIters passes; false when none is found.
template <class Src>
__device__ bool find_cut(const Src& src, const Selection& s, float lo, float& cut) {
    float hi = s.temp.mc;
    const double target = static_cast<double>(s.top_p) * s.z0;
    for (int it = 0; it < kCutIters; ++it) {
        const float mid = 0.5f * lo + 0.5f * hi;
        if (!(mid > lo && mid < hi)) break;
        const auto above = [&](float x, uint32_t) { return x >= mid; };
        const Sum2 c = s.topk ? count_mass<false>(src, s.temp, above) : count_mass<true>(src, s.temp, above);
        const bool enough = s.topk ? c.a >= s.top_k : c.b >= target;
        if (!enough) {
            hi = mid;
        } else if (c.a > kCap) {
            lo = mid;
        } else {
            cut = mid;
            return true;
        }
    }
    return false;
}

// Copies the elements with clamped value >= thr into cv / cid in increasing id order (at most kCap of them, which
// the caller has counted); returns how many. Same tiling as first_reaching, with an exclusive count prefix.
template <class Src>
__device__ int compact(const Src& src, float thr, float* cv, uint32_t* cid) {
    int running = 0;
    for (int base = 0; base < src.slots; base += kUnroll * kThreads) {
        const int s0 = base + static_cast<int>(threadIdx.x) * kUnroll;
        typename Src::Data d[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (s0 + u < src.slots) d[u] = src.load(s0 + u);
        }
        int c = 0;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (s0 + u < src.slots) src.visit(s0 + u, d[u], [&](float x, uint32_t) { c += clamp_inf(x) >= thr; });
        }
        double total;
        const double incl = block_inclusive_scan(c, total);
        int pos = running + static_cast<int>(incl) - c;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (c > 0 && s0 + u < src.slots) {
                src.visit(s0 + u, d[u], [&](float x, uint32_t id) {
                    x = clamp_inf(x);
                    if (x >= thr) {
                        if (pos < kCap) {
                            cv[pos] = x;
                            cid[pos] = id;
                        }
                        ++pos;
                    }
                });
            }
        }
        running += static_cast<int>(total);
    }
    __syncthreads();
    return running < kCap ? running : kCap;
}

// Tier 1. grid = rows, block = kThreads, dynamic shared memory = sample_smem_bytes().
template <int W>
__global__ void __launch_bounds__(kThreads, 1) sample_kernel(const __grid_constant__ l32_sample_params p) {
    pdl_begin();
    extern __shared__ __align__(16) unsigned char smem[];
    const int64_t row = blockIdx.x;
    const l32_sample_row r = p.row_params[row];
    const int vocab = static_cast<int>(p.vocab);
    const int words = p.penalty_offsets != nullptr ? (vocab + 31) / 32 : 0;
    uint32_t* bitmap = reinterpret_cast<uint32_t*>(smem);
    float* cv = reinterpret_cast<float*>(smem + static_cast<size_t>(words) * 4);
    uint32_t* cid = reinterpret_cast<uint32_t*>(cv + kCap);

    RowSource<W> src{reinterpret_cast<const BF16Vec<W>*>(static_cast<const bf16*>(p.logits) + row * p.vocab),
                     vocab / W, nullptr, nullptr, nullptr, nullptr, 0, r.repetition_penalty, r.frequency_penalty,
                     r.presence_penalty};
    // Step 0: logit bias and penalties (the offsets are clamped into the list: defence in depth).
    if (p.penalty_offsets != nullptr) {
        const uint64_t len = static_cast<uint64_t>(p.penalty_len);
        const uint64_t hi = std::min<uint64_t>(p.penalty_offsets[row + 1], len);
        const uint64_t lo = std::min<uint64_t>(p.penalty_offsets[row], hi);
        const bool active = hi > lo && (p.penalty_bias != nullptr || r.repetition_penalty != 1.f ||
                                        r.frequency_penalty != 0.f || r.presence_penalty != 0.f);
        if (active) {
            for (int i = threadIdx.x; i < words; i += kThreads) bitmap[i] = 0;
            __syncthreads();
            for (uint64_t j = lo + threadIdx.x; j < hi; j += kThreads) {
                const uint32_t id = p.penalty_ids[j];
                if (id < static_cast<uint32_t>(vocab)) atomicOr(bitmap + id / 32, 1u << (id % 32));
            }
            __syncthreads();
            src.bitmap = bitmap;
            src.pen_ids = p.penalty_ids + lo;
            src.pen_counts = p.penalty_counts + lo;
            src.pen_bias = p.penalty_bias != nullptr ? p.penalty_bias + lo : nullptr;
            src.pen_n = static_cast<int>(hi - lo);
        }
    }

    // Pass A: the argmax of the penalized row.
    uint64_t best = 0;
    for_each(
        src,
        [&](float x, uint32_t id) {
            const uint64_t k = argmax_key(x, id);
            best = k > best ? k : best;
        },
        [] {});
    best = block_max_u64(best);
    const float m = best != 0 ? key_float(static_cast<uint32_t>(best >> 32)) : -INFINITY;
    if (r.temperature < kGreedyEps || m == -INFINITY) {
        // Greedy, or nothing can be sampled (every logit NaN or -inf): the CPU falls back to the argmax too.
        if (threadIdx.x == 0) p.out_ids[row] = argmax_id(best);
        return;
    }

    Selection sel;
    sel.temp.mc = fminf(m, FLT_MAX);
    const double t = r.temperature;
    sel.temp.k2 = static_cast<float>(kLog2e / t);
    sel.thr0 = r.min_p > 0.f ? minp_threshold(sel.temp.mc, t, r.ln_min_p) : -FLT_MAX;
    sel.lo_bound = sel.thr0;
    sel.top_p = r.top_p;
    sel.u = p.uniforms[row];

    // Pass B: the min-p survivors.
    const float thr0 = sel.thr0;
    double n0 = 0.0, z0 = 0.0;
    float low = INFINITY;
    int c = 0;
    float z = 0.f;
    for_each(
        src,
        [&](float x, uint32_t) {
            x = clamp_inf(x);
            if (x >= thr0) {
                ++c;
                z += sel.temp.weight(x);
                low = fminf(low, x);
            }
        },
        [&] {
            n0 += c;
            z0 += z;
            c = 0;
            z = 0.f;
        });
    const Sum2 b = block_sum2(n0, z0);
    low = block_min(low);
    sel.z0 = b.b;
    sel.top_k = r.top_k;
    sel.topk = r.top_k > 0 && static_cast<double>(r.top_k) < b.a;
    sel.topp = r.top_p < 1.f;

    uint32_t id;
    if (sel.topk || sel.topp) {
        // Step C.
        float cut = thr0;
        bool compacted = b.a <= kCap;
        if (!compacted) compacted = find_cut(src, sel, fmaxf(thr0, low), cut);
        if (compacted) {
            const int n = compact(src, cut, cv, cid);
            sel.lo_bound = cut;
            id = select_and_draw(CandSource{cv, cid, n}, sel);
        } else {
            id = select_and_draw(src, sel);
        }
    } else {
        id = select_and_draw(src, sel);
    }
    if (threadIdx.x == 0) p.out_ids[row] = id;
}

// Dynamic shared memory of one sample CTA: the penalty bitmap (only with penalties) and the candidate buffer.
size_t sample_smem_bytes(const l32_sample_params& p) {
    const size_t words = p.penalty_offsets != nullptr ? static_cast<size_t>((p.vocab + 31) / 32) : 0;
    return words * 4 + static_cast<size_t>(kCap) * 8;
}

// Tier 2. Raises the dynamic shared-memory limit when the bitmap and the helpers' static buffers (under 2 KB) push
// the CTA over the default 48 KB (with penalties, from vocab ~110000 on); at the 2^19 vocabulary limit the CTA
// needs 97 KB, within every supported GPU's 99 KB.
template <int W>
l32_status launch_sample(const l32_sample_params& p, cudaStream_t stream) {
    const size_t smem = sample_smem_bytes(p);
    if (const l32_status s = allow_dynamic_smem(sample_kernel<W>, smem); s != L32_OK) return s;
    launch_kernel(sample_kernel<W>, static_cast<unsigned>(p.rows), kThreads, smem, stream, p);
    return check_launch();
}

}  // namespace
}  // namespace l32

// Tier 3: the checked entries.
extern "C" l32_status l32_argmax(const l32_argmax_params* params, void* stream) {
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_argmax_params& p = *params;
    if (p.dtype != L32_DTYPE_BF16) return L32_UNSUPPORTED;
    if (p.out_ids == nullptr || p.logits == nullptr) return L32_INVALID_ARGUMENT;
    if (p.rows < 0 || p.vocab <= 0) return L32_INVALID_ARGUMENT;
    // vocab <= 2^30 keeps ids and the int vector indices clear of overflow.
    if (p.rows > INT_MAX || p.vocab > (int64_t{1} << 30)) return L32_UNSUPPORTED;
    if (p.rows == 0) return L32_OK;
    const auto s = static_cast<cudaStream_t>(stream);
    const bool vec8 = p.vocab % 8 == 0 && l32::is_aligned(p.logits, 16);
    return vec8 ? l32::launch_argmax<8>(p, s) : l32::launch_argmax<1>(p, s);
}

extern "C" l32_status l32_sample(const l32_sample_params* params, void* stream) {
    if (params == nullptr) return L32_INVALID_ARGUMENT;
    const l32_sample_params& p = *params;
    if (p.dtype != L32_DTYPE_BF16) return L32_UNSUPPORTED;
    if (p.out_ids == nullptr || p.logits == nullptr || p.row_params == nullptr || p.uniforms == nullptr) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.rows < 0 || p.vocab <= 0 || p.penalty_len < 0) return L32_INVALID_ARGUMENT;
    if (p.penalty_offsets != nullptr && p.penalty_len > 0 && (p.penalty_ids == nullptr || p.penalty_counts == nullptr)) {
        return L32_INVALID_ARGUMENT;
    }
    if (p.penalty_bias != nullptr && p.penalty_offsets == nullptr) return L32_INVALID_ARGUMENT;
    // vocab <= 2^19 bounds the bitmap (64 KB) plus the candidates (32 KB) by 96 KB of shared memory.
    if (p.rows > INT_MAX || p.vocab > (int64_t{1} << 19) || p.penalty_len > int64_t{UINT32_MAX}) {
        return L32_UNSUPPORTED;
    }
    if (p.rows == 0) return L32_OK;
    const auto s = static_cast<cudaStream_t>(stream);
    const bool vec8 = p.vocab % 8 == 0 && l32::is_aligned(p.logits, 16);
    return vec8 ? l32::launch_sample<8>(p, s) : l32::launch_sample<1>(p, s);
}
