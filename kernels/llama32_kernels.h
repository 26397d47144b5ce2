/*
 * llama32_kernels.h: the C ABI of llama32's CUDA kernels.
 *
 * One `l32_<family>_params` struct and one launcher per kernel family. A launcher takes device pointers (never host
 * memory), returns an `l32_status`, never allocates, and checks `cudaGetLastError` after its launch. `stream` is a
 * `cudaStream_t` / `CUstream` passed as `void*`.
 *
 * This header is plain C with no CUDA types, so bindgen reads it without the CUDA headers
 * (build.rs turns it into OUT_DIR/kernels.rs). Shapes are written `[rows, hidden]`, row-major, strides in elements.
 */
#ifndef LLAMA32_KERNELS_H
#define LLAMA32_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** What a launcher returns. Anything but L32_OK means nothing was launched, or the launch failed. */
typedef enum l32_status {
    L32_OK = 0,
    /** A null pointer, a negative or zero size, a stride shorter than a row, a negative eps. */
    L32_INVALID_ARGUMENT = 1,
    /** Well formed, but outside what the family implements (dtype, size range). */
    L32_UNSUPPORTED = 2,
    /** The launch itself failed: `l32_last_cuda_error()` names the CUDA error. */
    L32_LAUNCH_FAILED = 3,
} l32_status;

/** Element type of a family's tensors; each family states the values it supports. */
typedef enum l32_dtype {
    L32_DTYPE_BF16 = 0,
    L32_DTYPE_F16 = 1,
    L32_DTYPE_F32 = 2,
} l32_dtype;

/**
 * The name of the CUDA error behind the last L32_LAUNCH_FAILED returned on this host thread
 * (e.g. "cudaErrorNoKernelImageForDevice: no kernel image is available for execution on the device"),
 * or "no error". The string is static.
 */
const char* l32_last_cuda_error(void);

/**
 * Programmatic dependent launch (Hopper, sm_90), process-wide, off by default: with `enabled` non-zero, later
 * launches let a kernel's CTAs start while the previous kernel in the stream finishes (its launch latency overlaps
 * that kernel's tail). Every kernel here waits for the previous grid (griddepcontrol.wait) before it touches
 * memory, so results do not change. Other devices keep ordinary launches (newer ones JIT PTX without the wait).
 */
void l32_set_programmatic_launch(int enabled);

/** 1 when l32_set_programmatic_launch switched programmatic dependent launch on, else 0. */
int l32_programmatic_launch(void);

/* ---------------------------------------------------------------------------------------------------------------- */
/* norm (kernels/norm.cu): Llama's RMSNorm, optionally fused with the residual add before it.                        */
/* ---------------------------------------------------------------------------------------------------------------- */

/**
 * For each row r < rows, with h = residual[r] + x[r] when `residual` is set and h = x[r] otherwise:
 *
 * - residual[r] = bf16(h)   (only when `residual` is set: updated in place)
 * - out[r] = bf16(weight * bf16(bf16(h) * rsqrt(mean(bf16(h)^2) + eps)))
 *
 * which is HF's `LlamaRMSNorm` after HF's bf16 residual add: the sum of squares is accumulated in fp32, the residual
 * stream is rounded to bf16, and the normalized row is rounded to bf16 before the weight multiply.
 * dtype: L32_DTYPE_BF16 only. `out` may alias `x`; nothing else may alias.
 */
typedef struct l32_norm_params {
    void* out;              /**< [rows, hidden] at row stride out_stride */
    const void* x;          /**< [rows, hidden] at row stride x_stride */
    void* residual;         /**< [rows, hidden] at row stride residual_stride, read and written; NULL: plain RMSNorm */
    const void* weight;     /**< [hidden] */
    int64_t rows;           /**< any count >= 0 (0 launches nothing), at most 2^31 - 1 */
    int64_t hidden;         /**< 1 ..= 2^30; a multiple of 8 with 16-byte aligned rows takes the vector path */
    int64_t x_stride;       /**< elements between rows of x, >= hidden */
    int64_t residual_stride; /**< elements between rows of residual, >= hidden (ignored without residual) */
    int64_t out_stride;     /**< elements between rows of out, >= hidden */
    float eps;              /**< >= 0, added to the mean square (Llama 3.2: 1e-5) */
    l32_dtype dtype;        /**< L32_DTYPE_BF16 */
} l32_norm_params;

/** Launches the norm family on `stream`. */
l32_status l32_norm(const l32_norm_params* params, void* stream);

/* ---------------------------------------------------------------------------------------------------------------- */
/* embedding gather (kernels/embedding.cu) */
/* BEGIN embedding */

/**
 * out[i, :] = table[ids[i], :] for each token i < tokens (a row gather, copied bit for bit).
 *
 * An id >= vocab never reads out of bounds: that output row is written with zeros and, when `bad_id` is set,
 * `*bad_id` is set to 1 (never cleared: the caller zeroes it first). The Rust side validates ids before they reach
 * the device; this is defence in depth. dtype: L32_DTYPE_BF16 only. Nothing may alias.
 */
typedef struct l32_embedding_params {
    void* out;              /**< [tokens, hidden], contiguous rows */
    const void* table;      /**< [vocab, hidden] bf16, or int8 when `scales` is set, contiguous rows */
    const void* scales;     /**< NULL for a bf16 table; else [vocab] bf16 per-row scales of an int8 table, whose
                                 rows are written as bf16(scales[id] * q[id, c]) (one exact f32 product, one rounding) */
    const uint32_t* ids;    /**< [tokens] */
    uint32_t* bad_id;       /**< [1], optional (NULL): set to 1 when some id is >= vocab */
    int64_t tokens;         /**< any count >= 0 (0 launches nothing), at most 2^31 - 1 */
    int64_t hidden;         /**< 1 ..= 2^30; a multiple of 8 with 16-byte aligned pointers takes the vector path */
    int64_t vocab;          /**< rows of the table, >= 1 */
    l32_dtype dtype;        /**< L32_DTYPE_BF16 */
} l32_embedding_params;

/** Launches the embedding family on `stream`. */
l32_status l32_embedding(const l32_embedding_params* params, void* stream);

/* END embedding */

/* ---------------------------------------------------------------------------------------------------------------- */
/* fused llama3 RoPE on q/k + paged KV-cache write (kernels/rope.cu) */
/* BEGIN rope */

/** `slot_mapping` value of a padding token (a padded CUDA-graph batch): its q is rotated, nothing is cached. */
#define L32_PAD_SLOT 0xFFFFFFFFu

/**
 * Fused QKV split + llama3 RoPE + paged KV-cache write. Each row t < tokens of `qkv` holds
 * [q (num_heads * head_dim) | k (num_kv_heads * head_dim) | v (num_kv_heads * head_dim)] at its start.
 * With h = head_dim / 2 and, for j < h, angle_j = float(positions[t]) * inv_freq[j] (an f32 product):
 *
 * - every q head x is rotated in place: (x[j], x[j+h]) <- (x[j] cos - x[j+h] sin, x[j+h] cos + x[j] sin),
 *   computed in f32 from the bf16 inputs and rounded to bf16 once (HF's `rotate_half` layout);
 * - every k head is rotated the same way and written to k_cache[slot_mapping[t]]; the v heads are copied to
 *   v_cache[slot_mapping[t]]. The k and v parts of `qkv` are only read.
 *
 * slot_mapping[t] == L32_PAD_SLOT writes no cache slot for token t. Any other slot >= num_slots writes nothing
 * either and, when `bad_slot` is set, sets `*bad_slot` to 1 (defence in depth: the caller zeroes the flag first).
 * Cache slots not named by slot_mapping are left untouched. dtype: L32_DTYPE_BF16 only. Nothing may alias.
 */
typedef struct l32_rope_params {
    void* qkv;                  /**< [tokens, qkv_stride]: q rotated in place, k and v read */
    void* k_cache;              /**< [num_slots, num_kv_heads, head_dim] (= [num_blocks, block_size, ...]) */
    void* v_cache;              /**< [num_slots, num_kv_heads, head_dim] */
    const uint32_t* positions;  /**< [tokens] */
    const uint32_t* slot_mapping; /**< [tokens]: < num_slots, or L32_PAD_SLOT */
    const float* inv_freq;      /**< [head_dim / 2], f32, llama3 scaling already applied */
    uint32_t* bad_slot;         /**< [1], optional (NULL): set to 1 when some slot is out of range */
    int64_t tokens;             /**< any count >= 0 (0 launches nothing), at most 2^31 - 1 */
    int64_t qkv_stride;         /**< elements between rows of qkv, >= (num_heads + 2 * num_kv_heads) * head_dim */
    int64_t num_slots;          /**< slots in each cache pool (num_blocks * block_size), >= 1 */
    int32_t num_heads;          /**< q heads, >= 1 */
    int32_t num_kv_heads;       /**< k and v heads, >= 1 */
    int32_t head_dim;           /**< even, 2 ..= 512; 64 and 128 have their own instantiations */
    l32_dtype dtype;            /**< L32_DTYPE_BF16 */
} l32_rope_params;

/** Launches the rope family (l32_rope_kv_write) on `stream`. */
l32_status l32_rope_kv_write(const l32_rope_params* params, void* stream);

/* END rope */

/* ---------------------------------------------------------------------------------------------------------------- */
/* SiLU(gate) * up (kernels/activation.cu) */
/* BEGIN activation */

/**
 * SwiGLU: out[r, j] = bf16(silu(gate_up[r, j]) * gate_up[r, inter + j]) for r < rows, j < inter, computed in f32
 * from the bf16 inputs and rounded once (HF rounds silu to bf16 before the bf16 multiply: two roundings).
 * dtype: L32_DTYPE_BF16 only. Nothing may alias.
 */
typedef struct l32_activation_params {
    void* out;              /**< [rows, inter], contiguous rows */
    const void* gate_up;    /**< [rows, 2 * inter], contiguous rows: [gate | up] */
    int64_t rows;           /**< any count >= 0 (0 launches nothing), at most 2^31 - 1 */
    int64_t inter;          /**< 1 ..= 2^30; a multiple of 8 with 16-byte aligned pointers takes the vector path */
    l32_dtype dtype;        /**< L32_DTYPE_BF16 */
} l32_activation_params;

/** Launches the activation family (l32_silu_mul) on `stream`. */
l32_status l32_silu_mul(const l32_activation_params* params, void* stream);

/* END activation */

/* ---------------------------------------------------------------------------------------------------------------- */
/* causal flash attention over the paged KV cache, prefill and split-KV decode (kernels/attention/) */
/* BEGIN attention */

/**
 * Causal GQA attention of new query tokens over the paged KV cache, the twin of the CPU `paged_attention`:
 * query token i, head h attends to the cached positions 0..=positions[i] of its sequence through kv head
 * h / (num_heads / num_kv_heads), softmax scaled by `scale`, scores and sums in fp32, P rounded to bf16 for the
 * P * V product, output rounded to bf16. Position p of sequence s lives in cache slot
 * block_tables[s * max_blocks_per_seq + p / block_size] * block_size + p % block_size.
 *
 * Shared layout fields of both entries below:
 * - k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim] bf16, 16-byte aligned.
 * - q: [num_tokens, q_stride] bf16 (the fused qkv rows); the query of token i, head h is the head_dim elements at
 *   q + i * q_stride + h * head_dim. q and q_stride must keep rows 16-byte aligned (q_stride % 8 == 0).
 * - out: [num_tokens, num_heads * head_dim] bf16, 16-byte aligned.
 * - head_dim in {64, 128}; num_heads a multiple of num_kv_heads; block_size >= 1; dtype L32_DTYPE_BF16.
 * Metadata (positions, tables, block ids) is trusted: the host validates it before the launch.
 */

/** One decode token per sequence (token s belongs to sequence s), split-KV with an f32 workspace. */
typedef struct l32_paged_decode_params {
    void* out;                    /**< [num_seqs, num_heads * head_dim] bf16 */
    const void* q;                /**< [num_seqs, q_stride] bf16 */
    const void* k_cache;          /**< [num_blocks, block_size, num_kv_heads, head_dim] bf16 */
    const void* v_cache;          /**< same shape as k_cache */
    const uint32_t* positions;    /**< [num_seqs]: context length of sequence s is positions[s] + 1 */
    const uint32_t* block_tables; /**< [num_seqs, max_blocks_per_seq] */
    void* workspace;              /**< num_splits > 1: f32 acc [num_seqs, num_heads, num_splits, head_dim] then
                                       (max, sum) [num_seqs, num_heads, num_splits, 2], 16-byte aligned, so
                                       4 * num_seqs * num_heads * num_splits * (head_dim + 2) bytes;
                                       ignored (may be NULL) when num_splits == 1 */
    uint32_t* merge_counters;     /**< fused_merge with num_splits > 1: [num_seqs, num_kv_heads] u32, zeroed before
                                       the first launch (every launch leaves them zeroed), apart from the workspace
                                       above; else ignored (may be NULL) */
    int64_t num_seqs;             /**< >= 0 (0 launches nothing), at most 65535 */
    int64_t q_stride;             /**< elements between q rows, >= num_heads * head_dim, a multiple of 8 */
    int64_t max_blocks_per_seq;   /**< row length of block_tables, >= 1 */
    int32_t num_heads;            /**< query heads; num_heads / num_kv_heads in 1..=16 */
    int32_t num_kv_heads;         /**< >= 1 */
    int32_t head_dim;             /**< 64 or 128 */
    int32_t block_size;           /**< tokens per cache block, >= 1 */
    int32_t num_splits;           /**< KV splits per sequence, 1..=256 (chosen by the caller from the context) */
    float scale;                  /**< softmax scale, 1 / sqrt(head_dim) for Llama */
    int32_t fused_merge;          /**< num_splits > 1: nonzero merges the splits in the last CTA of each (sequence,
                                       kv head) to finish (an atomic counter in the workspace) instead of a second
                                       kernel; the same bits */
    int32_t stages;               /**< the K/V ring's depth: 0 or 2 (the default: one tile in flight while one is
                                       used) or 3 (two in flight, over 48 KB of shared memory per CTA); the same
                                       bits */
    l32_dtype dtype;              /**< L32_DTYPE_BF16 */
} l32_paged_decode_params;

/** Launches the paged decode (and, with num_splits > 1, its split merge) on `stream`. */
l32_status l32_paged_decode(const l32_paged_decode_params* params, void* stream);

/** Which paged prefill kernel runs (the same attention; the bits may differ by f32 summation order). */
typedef enum l32_prefill_kernel {
    /** mma.sync m16n8k16 with ldmatrix operands, 64-row CTAs of 4 warps: every target (sm_80, sm_89, sm_90a). */
    L32_PREFILL_MMA = 0,
    /** Hopper warpgroup MMA (wgmma) with both operands of Q K^T and V read from 128-byte-swizzled shared memory,
     * 128-row CTAs of 2 warpgroups, 128-position KV tiles: sm_90a only (L32_UNSUPPORTED on any other device). */
    L32_PREFILL_WGMMA = 1,
    /** L32_PREFILL_WGMMA's tiles and products with warp specialization: a producer warpgroup copies K / V into an
     * mbarrier ring and two consumer warpgroups take turns on the tensor cores; sm_90a only. */
    L32_PREFILL_WGMMA_WS = 2,
} l32_prefill_kernel;

/** Variable-length query chunks (prefill, chunked prefill, prefix reuse, or decode tokens) over the paged cache. */
typedef struct l32_paged_prefill_params {
    void* out;                    /**< [num_tokens, num_heads * head_dim] bf16 */
    const void* q;                /**< [num_tokens, q_stride] bf16 */
    const void* k_cache;          /**< [num_blocks, block_size, num_kv_heads, head_dim] bf16 */
    const void* v_cache;          /**< same shape as k_cache */
    const uint32_t* positions;    /**< [num_tokens]: token i attends to positions 0..=positions[i] */
    const uint32_t* cu_seqlens;   /**< [num_seqs + 1]: sequence s owns tokens cu_seqlens[s]..cu_seqlens[s + 1] */
    const uint32_t* block_tables; /**< [num_seqs, max_blocks_per_seq] */
    int64_t num_tokens;           /**< >= 0 (0 launches nothing) */
    int64_t num_seqs;             /**< 1..=65535 */
    int64_t q_stride;             /**< elements between q rows, >= num_heads * head_dim, a multiple of 8 */
    int64_t max_blocks_per_seq;   /**< row length of block_tables, >= 1 */
    int64_t max_query_len;        /**< >= the longest chunk cu_seqlens[s + 1] - cu_seqlens[s] (sizes the grid) */
    int32_t num_heads;            /**< query heads, a multiple of num_kv_heads */
    int32_t num_kv_heads;         /**< >= 1, at most 65535 */
    int32_t head_dim;             /**< 64 or 128 */
    int32_t block_size;           /**< tokens per cache block, >= 1 */
    float scale;                  /**< softmax scale, 1 / sqrt(head_dim) for Llama */
    l32_dtype dtype;              /**< L32_DTYPE_BF16 */
    l32_prefill_kernel kernel;    /**< which kernel (0, L32_PREFILL_MMA, runs everywhere) */
} l32_paged_prefill_params;

/** Launches the paged prefill on `stream`. */
l32_status l32_paged_prefill(const l32_paged_prefill_params* params, void* stream);

/**
 * 1 when L32_PREFILL_WGMMA can run on the current device: this library holds sm_90a SASS and the device has compute
 * capability 9.x; else 0.
 */
int l32_prefill_wgmma_available(void);

/* END attention */

/* ---------------------------------------------------------------------------------------------------------------- */
/* next-token selection over logits rows: greedy argmax and full sampling (kernels/sampling.cu) */
/* BEGIN sampling */

/**
 * Greedy selection: out_ids[r] = the index of the largest logit of row r (the CPU twin `crate::sampling::argmax`):
 * the lowest index wins ties (-0 ties with +0), NaN never wins (+inf does), an all-NaN row gives 0.
 * dtype: L32_DTYPE_BF16 only.
 */
typedef struct l32_argmax_params {
    uint32_t* out_ids;      /**< [rows] */
    const void* logits;     /**< [rows, vocab], contiguous rows */
    int64_t rows;           /**< any count >= 0 (0 launches nothing), at most 2^31 - 1 */
    int64_t vocab;          /**< 1 ..= 2^30; a multiple of 8 with 16-byte aligned logits takes the vector path */
    l32_dtype dtype;        /**< L32_DTYPE_BF16 */
} l32_argmax_params;

/** Launches the greedy argmax (sampling family) on `stream`. */
l32_status l32_argmax(const l32_argmax_params* params, void* stream);

/**
 * One row's sampling parameters: the fields of `crate::sampling::SamplingParams` plus ln(min_p), which the host
 * computes so the min-p cut uses the very same f64 as the CPU twin. Layout: 40 bytes, 8-byte aligned, no padding.
 */
typedef struct l32_sample_row {
    float temperature;          /**< < 1e-5: greedy (argmax of the penalized row; the uniform is not used) */
    float top_p;                /**< (0, 1]; 1 turns it off */
    float min_p;                /**< [0, 1]; 0 turns it off */
    float repetition_penalty;   /**< > 0; 1 turns it off */
    float frequency_penalty;    /**< subtracted count times from every token generated count >= 1 times */
    float presence_penalty;     /**< subtracted once from every token generated at least once */
    int32_t top_k;              /**< 0 (or >= the number of candidates) turns it off */
    int32_t reserved;           /**< 0 */
    double ln_min_p;            /**< ln(min_p) in f64 when min_p > 0 (ignored otherwise) */
} l32_sample_row;

/**
 * Full sampling, the twin of `crate::sampling::Sampler::sample` for one row each (module docs of crate::sampling):
 * penalties, greedy (temperature < 1e-5), then with T the temperature and m the largest penalized logit: min-p,
 * top-k (ties by lower id), top-p (descending logit, ties by lower id), and the inverse-CDF draw over the kept tokens
 * in ascending id order with the row's uniform u in [0, 1).
 *
 * Penalties and logit bias are a per-row sorted list (CSR): the entries of row r are j in penalty_offsets[r] ..
 * penalty_offsets[r + 1]; penalty_ids[j] is a token seen in the prompt or the output, or a token with a bias
 * (strictly increasing within a row; ids >= vocab are ignored), penalty_counts[j] its number of occurrences in the
 * output (0: prompt only), with bit 31 (L32_PENALTY_UNSEEN) set for a token listed only for its bias. Per listed
 * token, in this order (each an f32 operation): l += penalty_bias[j] (when penalty_bias is not NULL and the bias is
 * not zero); the repetition
 * penalty unless L32_PENALTY_UNSEEN; with a count >= 1 the frequency and presence penalties. A row's list is used
 * when the row has a penalty on or penalty_bias is not NULL. penalty_offsets NULL: no penalties and no bias anywhere.
 *
 * Numerics: penalties, min-p, top-k and the comparisons that decide the kept set are exact (f32 as on the CPU, and
 * min-p's f64 test turned into an exact f32 threshold); the weights exp((l - m) / T) of top-p and of the draw are f32
 * (relative error about 1e-7 * |(l - m) / T|) summed in f64, where the CPU uses f64 throughout: the chosen id can
 * differ from the CPU's only when u, or top_p, lies within about 1e-6 of a cumulative-probability boundary.
 * dtype: L32_DTYPE_BF16 only. Nothing may alias out_ids.
 */
/** Set in a penalty_counts entry whose token is listed only for its logit bias (no repetition penalty). */
#define L32_PENALTY_UNSEEN 0x80000000u

typedef struct l32_sample_params {
    uint32_t* out_ids;                  /**< [rows] */
    const void* logits;                 /**< [rows, vocab], contiguous rows */
    const l32_sample_row* row_params;   /**< [rows] */
    const double* uniforms;             /**< [rows], each in [0, 1) (unused by greedy rows) */
    const uint32_t* penalty_offsets;    /**< [rows + 1], non-decreasing, <= penalty_len; or NULL */
    const uint32_t* penalty_ids;        /**< [penalty_len] */
    const uint32_t* penalty_counts;     /**< [penalty_len], bit 31: L32_PENALTY_UNSEEN */
    const float* penalty_bias;          /**< [penalty_len] logit bias per entry (0 for none), or NULL: no bias */
    int64_t penalty_len;                /**< entries in penalty_ids / penalty_counts, 0 ..= 2^32 - 1 */
    int64_t rows;                       /**< any count >= 0 (0 launches nothing), at most 2^31 - 1 */
    int64_t vocab;                      /**< 1 ..= 2^19; a multiple of 8 with 16-byte aligned logits is faster */
    l32_dtype dtype;                    /**< L32_DTYPE_BF16 */
} l32_sample_params;

/** Launches full sampling (sampling family) on `stream`. */
l32_status l32_sample(const l32_sample_params* params, void* stream);

/* END sampling */

/* ---------------------------------------------------------------------------------------------------------------- */
/* token masks and log-probabilities over logits rows (kernels/logprobs.cu) */
/* BEGIN logprobs */

/**
 * Token masks (structured outputs), in place: for each j < masks, every logit v of row rows[j] whose bit is clear in
 * mask j (bit v % 32 of bits[j * words + v / 32]) becomes -inf; logits whose bit is set keep their value. The twin of
 * `crate::sampling::TokenMask::apply`. dtype: L32_DTYPE_BF16 only.
 */
typedef struct l32_mask_params {
    void* logits;           /**< [*, vocab], contiguous rows, written in place */
    const uint32_t* rows;   /**< [masks]: the row each mask applies to (no row twice) */
    const uint32_t* bits;   /**< [masks, words] */
    int64_t total_rows;     /**< rows in `logits`: a mask naming a row at or past it is skipped */
    int64_t masks;          /**< any count >= 0 (0 launches nothing), at most 65535 */
    int64_t vocab;          /**< 1 ..= 2^30 */
    int64_t words;          /**< words per mask, >= ceil(vocab / 32) */
    l32_dtype dtype;        /**< L32_DTYPE_BF16 */
} l32_mask_params;

/** Launches the token masks (logprobs family) on `stream`. */
l32_status l32_mask_logits(const l32_mask_params* params, void* stream);

/** The most alternatives l32_token_logprobs returns per entry. */
#define L32_MAX_TOP_LOGPROBS 64

/**
 * Log-probabilities under the softmax of logits rows (the twin of `crate::sampling::token_logprob`): entry j scores
 * token ids[j] under row rows[j]. NaN logits take no part; with M the largest other logit, the log-sum-exp is
 * M + ln(sum exp(l - M)) (expf terms, f64 sums), or M itself when M is infinite.
 *   - out_logprob[j] = (f32)((f64)l[id] - lse), -inf for an id >= vocab or a NaN logit;
 *   - out_rank[j] = the number of logits >= l[id] (ties share the worse rank), 1 + the number of non-NaN logits for
 *     an id >= vocab or a NaN logit;
 *   - out_top_ids / out_top_logprobs [j, 0..top): the `top` largest logits, largest first, ties lower id first (-0
 *     ties with +0), with their log-probabilities; past the row's non-NaN logits the id is 0xFFFFFFFF.
 * dtype: L32_DTYPE_BF16 only.
 */
typedef struct l32_logprob_params {
    float* out_logprob;         /**< [n] */
    uint32_t* out_rank;         /**< [n] */
    uint32_t* out_top_ids;      /**< [n, top]; may be null when top is 0 */
    float* out_top_logprobs;    /**< [n, top]; may be null when top is 0 */
    const void* logits;         /**< [*, vocab], contiguous rows */
    const uint32_t* rows;       /**< [n]: each entry's row */
    const uint32_t* ids;        /**< [n]: each entry's token (any value) */
    const int32_t* entry_top;   /**< [n]: each entry's alternatives, at most `top` (its later slots get the
                                     placeholder); null: `top` for every entry */
    int64_t total_rows;         /**< rows in `logits`: an entry naming a row at or past it gets a NaN logprob,
                                     rank 0 and placeholders */
    int64_t n;                  /**< any count >= 0 (0 launches nothing), at most 2^31 - 1 */
    int64_t vocab;              /**< 1 ..= 2^30 */
    int32_t top;                /**< 0 ..= L32_MAX_TOP_LOGPROBS: the stride of the alternatives' outputs */
    l32_dtype dtype;            /**< L32_DTYPE_BF16 */
} l32_logprob_params;

/** Launches the scoring (logprobs family) on `stream`. */
l32_status l32_token_logprobs(const l32_logprob_params* params, void* stream);

/* END logprobs */

/* ---------------------------------------------------------------------------------------------------------------- */
/* skinny GEMM for decode: out = x @ w^T with few rows of x (kernels/gemv.cu) */
/* BEGIN gemv */

/**
 * out[i, j] = bf16(sum_c x[i, c] * w[j, c]) for i < m, j < n: a Linear layer (w in PyTorch's [out, in] layout) at
 * decode batch sizes, bandwidth bound on the weight. Products of the bf16 inputs are summed in f32 (tensor-core MMA,
 * a fixed order: no atomics, the same bits on every run), then rounded to bf16 once.
 * dtype: L32_DTYPE_BF16 only. `out` must not overlap `x` or `w` (both are read through the non-coherent cache).
 */
/**
 * The RMSNorm prologue of l32_gemv: the product takes rms_norm(x) (or, with delta, rms_norm(x + delta)) instead of
 * x, bit for bit what l32_norm writes for the same rows, normalized into shared memory by every block. With delta,
 * x is the residual stream and is updated to bf16(x + delta) as l32_norm's fused add does: the last block to finish
 * its prologue (a counter) writes it, after every block has read x.
 */
typedef struct l32_gemv_norm {
    const void* weight;  /**< [k] bf16 norm weight, 16-byte aligned; NULL: no prologue (x is taken as it is) */
    const void* delta;   /**< [m, k] bf16, 16-byte aligned, or NULL (no residual add; x is not written) */
    uint32_t* counter;   /**< with delta: one u32, zero before the launch; the launch leaves it zero */
    float eps;           /**< the norm's epsilon, >= 0 */
} l32_gemv_norm;

typedef struct l32_gemv_params {
    void* out;              /**< [m, n], contiguous rows */
    const void* x;          /**< [m, k], contiguous rows, 16-byte aligned (with norm.delta also written) */
    const void* w;          /**< [n, k], contiguous rows, 16-byte aligned */
    int64_t m;              /**< 1 ..= 16 */
    int64_t k;              /**< a multiple of 8, 8 ..= 2^24 */
    int64_t n;              /**< any count >= 0 (0 launches nothing), at most 2^31 - 1 */
    int32_t warps;          /**< warps per block, which split k: 8 or 16 (the Rust heuristic gemv::warps_per_block) */
    /**
     * 0: w is [n, k] and out = x @ w^T. 1: w is SwiGLU's gate_up [2 n, k] (gate rows 0..n, up rows n..2n, n at
     * most 2^30 - 1) and out[i, j] = bf16(silu(g) * u) with g, u the bf16 outputs the plain kernel would write
     * for gate row j and up row j: bit for bit l32_silu_mul after l32_gemv, in one kernel.
     */
    int32_t silu_pairs;
    /**
     * 0: no RoPE. 1: w is the fused qkv projection [(num_heads + 2 num_kv_heads) head_dim, k] (n that width,
     * head_dim a multiple of 16, up to 512) and the epilogue is l32_rope_kv_write's, bit for bit: the q heads of
     * out are written rotated, the rotated k heads and the v heads go to cache slot rope.slot_mapping[i] (not for
     * L32_PAD_SLOT), and the k and v parts of out are left unwritten. rope.qkv, rope.tokens (= m) and
     * rope.qkv_stride (= n) are not read. Exclusive with silu_pairs.
     */
    int32_t rope_on;
    l32_rope_params rope;   /**< with rope_on: positions, slots, inv_freq, caches and heads of l32_rope_kv_write */
    l32_dtype dtype;        /**< L32_DTYPE_BF16 */
    /**
     * Optional RMSNorm prologue (norm.weight non-NULL), with any epilogue mode: k at most 32768 (l32_norm's
     * in-register rows) and m * (k + 8) * 2 bytes of shared memory at most L32_GEMV_NORM_MAX_SMEM.
     */
    l32_gemv_norm norm;
} l32_gemv_params;

/**
 * The most shared memory the gemv's norm prologue may stage its normalized rows in, in bytes: the sm_86 / sm_89
 * per-block opt-in limit (99 KB) less the kernel's own static shared memory (at most 16464 bytes, 2 tiles of 16 warps).
 */
#define L32_GEMV_NORM_MAX_SMEM (82 * 1024)

/** Launches the skinny GEMM (gemv family) on `stream`. */
l32_status l32_gemv(const l32_gemv_params* params, void* stream);

/**
 * Process-wide, off by default: with `enabled` non-zero, each gemv block asks L2 for its whole weight rows (one
 * bulk prefetch per row, sm_90 only) before it waits for the previous kernel, instead of each lane's first step
 * (not with the norm prologue, which keeps the first-step prefetch).
 * Under programmatic dependent launch that moves more of a small projection's weights in while the kernel before
 * it finishes. The same results either way.
 */
void l32_set_gemv_prefetch_whole(int enabled);

/** 1 when l32_set_gemv_prefetch_whole switched the whole-row prefetch on, else 0. */
int l32_gemv_prefetch_whole(void);

/* END gemv */

/* ---------------------------------------------------------------------------------------------------------------- */
/* 4-bit group-wise quantized projections: W4A16 and W4A8, and int8 activation quantization (kernels/quant/) */
/* BEGIN quant */

/*
 * Quantized weights are reordered once at load time (engine/ops/cuda/quant.rs; the layout is documented in
 * kernels/quant/common.cuh): `n` is padded to n_pad = 16 * ceil(n / 16) rows, `k` must be a multiple of 64, and
 *   qweight: n_pad / 16 * k / 64 tiles of 512 bytes (int4 nibbles in the scheme's fragment order), 16-byte aligned;
 *   scales:  the same tiles, 8 entries of 4 values each (bf16 for W4A16, f32 for W4A8);
 *   zeros:   optional, the same tiles (W4A16: the bf16 bias 136 + z per value; W4A8: the byte 8 + z per value).
 * Split-K (splits > 1) needs `partials` (f32, splits * m * n_pad values) and `counters` (one u32 per output tile:
 * W4A16 ceil(n_pad / 64) (128 for TILED and PIPELINED with 8 < m <= 32), W4A16 WGMMA(_ROW) and W4A8
 * ceil(n_pad / 128) * ceil(m / tile_m)), zeroed once by the caller; every launch
 * leaves them zeroed again, so a CUDA graph can replay it. The result never depends on the split count's
 * arrival order (the splits are summed in split order). Nothing may alias `out`.
 */

/**
 * Which W4A16 decode kernel runs. DIRECT, PIPELINED and TILED compute the same product and give the same bits for
 * the same `splits`; BULK gives the same bits wherever one of its warps covers a whole 16-row tile.
 */
typedef enum l32_w4a16_kernel {
    /** One 16-row tile per warp, activations read by every warp, each chunk set loaded then computed. */
    L32_W4A16_DIRECT = 0,
    /**
     * The next chunks' weights in flight while the current ones are computed; for m > 8, blocks that stage the
     * activations once in shared memory, with two 16-row tiles per warp (128-row blocks) for m <= 32.
     */
    L32_W4A16_PIPELINED = 1,
    /**
     * For batches: 128-row blocks (two 16-row tiles per warp at every m) whose activations and weights are both
     * staged in shared memory with cp.async, double-buffered, so one activation fragment feeds both row tiles.
     */
    L32_W4A16_TILED = 2,
    /**
     * m <= 16 on compute capability 9.x only (l32_w4a16_bulk_available): `splits` persistent blocks whose warps
     * each take an equal share of the (tile, chunk) sequence and stream it through a shared-memory ring filled by
     * TMA bulk copies. Needs partials (2 * 4 * splits * 16 * m f32) and counters (one per 16-row tile) always, and
     * 16-byte aligned scales and zero points.
     */
    L32_W4A16_BULK = 3,
    /**
     * Any m (prefill), compute capability 9.x only (l32_w4a16_wgmma_available): warpgroup MMA over tile_m tokens by
     * 128 weight rows per block, the weights dequantized in registers to bf16(s * (q - z)) as l32_w4a16_dequant
     * writes them, f32 accumulation over all of k (so its sums are those of dequantize + a bf16 GEMM, in another
     * order). With splits > 1 each split sums its share of the 64-column chunks into f32 partials, and the last
     * split of each (token tile, 128-row block) to finish sums them in split order.
     */
    L32_W4A16_WGMMA = 4,
    /**
     * L32_W4A16_WGMMA with the activations copied in natural k order (16-byte copies) and the weights' A fragments
     * composed from the quad's words instead: the same bits, an eighth of the activation copies.
     */
    L32_W4A16_WGMMA_ROW = 5,
    /**
     * L32_W4A16_DIRECT (the same code, so the same bits) compiled for at most 128 registers at m <= 8 and 168 at
     * 9-16 rows, where ptxas then issues a warp's four chunk loads before their MMAs instead of one chunk at a time;
     * DIRECT itself above 16 rows.
     */
    L32_W4A16_DIRECT_BATCHED = 6,
} l32_w4a16_kernel;

/**
 * W4A16 decode GEMM: out[i, j] = bf16(sum_g s[j, g] * sum_{c in g} x[i, c] * (q[j, c] - z[j, g])) for i < m, j < n:
 * products exact in f32 (tensor-core MMA of bf16 x and the exact integers q - z), each group's sum scaled in f32,
 * one bf16 rounding per output. dtype: L32_DTYPE_BF16 only.
 */
typedef struct l32_w4a16_params {
    void* out;              /**< [m, n] bf16, contiguous rows */
    const void* x;          /**< [m, k] bf16, contiguous rows, 16-byte aligned */
    const void* qweight;    /**< reordered int4 tiles (W4A16 order), 16-byte aligned */
    const void* scales;     /**< reordered bf16 scales, 8-byte aligned */
    const void* zeros;      /**< reordered bf16 biases 136 + z, 8-byte aligned; NULL for symmetric weights */
    float* partials;        /**< split-K workspace, splits * m * n_pad f32 (NULL when splits == 1) */
    uint32_t* counters;     /**< split-K tile counters (see above), zeroed (NULL when splits == 1) */
    int64_t m;              /**< 1 ..= 64; WGMMA(_ROW): 1 ..= 2^30 */
    int64_t n;              /**< any count >= 0 (0 launches nothing), below 2^31 - 64 */
    int64_t k;              /**< a multiple of 64, 64 ..= 2^24 */
    int32_t splits;         /**< K splits, 1 ..= k / 64 (the Rust heuristic quant::w4a16_splits); BULK: blocks, 1 ..= 65535 */
    l32_w4a16_kernel kernel; /**< which kernel; split-K tiles are 64 rows, 128 for TILED and for PIPELINED with 8 < m <= 32 */
    int32_t l2_prefetch;    /**< DIRECT only: nonzero asks L2 for the next chunk set while loading this one (same bits) */
    int32_t bulk_variant;   /**< BULK only, for measurements (0 normally): bit 0 streams the weights without arithmetic
                                 and writes nothing; bit 1 drops the copies' L2 evict-first hint (same bits) */
    int64_t pair_half;      /**< 0, or the layout is paired (SwiGLU's gate_up): n == 2 pair_half, pair_half a multiple
                                 of 8, and 16-row tile t holds matrix rows 8 t .. 8 t + 7 (its rows 0-7) and
                                 pair_half + 8 t .. (rows 8-15); the plain output is still in matrix row order */
    int32_t silu;           /**< with pair_half: out is [m, pair_half] = bf16(silu(bf16 gate) * bf16 up), the bits of
                                 the plain output followed by l32_silu_mul */
    int32_t tile_m;         /**< WGMMA(_ROW) only: tokens per block, 64 or 128 */
    int32_t tiled_stages;   /**< TILED only: stage buffers in its cp.async ring, 2 ..= 4 (0 means 2), lowered to what
                                 fits the device's shared memory per block; the same bits at every depth */
    int32_t prewait;        /**< DIRECT(_BATCHED) and WGMMA(_ROW): nonzero reads the first weights before waiting for
                                 the previous kernel under PDL (DIRECT: L2 hints for each warp's first two chunk sets;
                                 WGMMA: the first two stages' weight copies); ignored without PDL; the same bits */
    l32_dtype dtype;        /**< L32_DTYPE_BF16 */
} l32_w4a16_params;

/** Launches the W4A16 decode GEMM on `stream`. */
l32_status l32_w4a16_gemm(const l32_w4a16_params* params, void* stream);

/** 1 when the current device runs L32_W4A16_BULK (built with sm_90a SASS, compute capability 9.x), else 0. */
int l32_w4a16_bulk_available(void);

/** 1 when the current device runs L32_W4A16_WGMMA(_ROW) (built with sm_90a SASS, compute capability 9.x), else 0. */
int l32_w4a16_wgmma_available(void);

/** Dequantizes a W4A16 layout into out[j, c] = bf16(s[j, g] * (q[j, c] - z[j, g])) (one f32 product, one rounding). */
typedef struct l32_w4a16_dequant_params {
    void* out;              /**< [n, k] bf16, contiguous rows, 16-byte aligned */
    const void* qweight;    /**< as in l32_w4a16_params */
    const void* scales;     /**< as in l32_w4a16_params */
    const void* zeros;      /**< as in l32_w4a16_params, or NULL */
    int64_t n;              /**< >= 0, below 2^31 - 64 */
    int64_t k;              /**< a multiple of 64, 64 ..= 2^24 */
    int64_t pair_half;      /**< as in l32_w4a16_params: out is in matrix row order either way */
    l32_dtype dtype;        /**< L32_DTYPE_BF16 */
} l32_w4a16_dequant_params;

/** Launches the W4A16 dequantization on `stream`. */
l32_status l32_w4a16_dequant(const l32_w4a16_dequant_params* params, void* stream);

/** The W4A8 GEMM kernels (l32_w4a8_params.kernel). */
typedef enum l32_w4a8_kernel {
    /** mma.sync m16n8k32 s8 (sm_80+): tile_m 8, 16, 32 or 128; weights with or without zero points. */
    L32_W4A8_MMA = 0,
    /**
     * Hopper warpgroup MMA (wgmma m64nNk32 s8, sm_90a only, see l32_w4a8_wgmma_available): tile_m 64 or 128 tokens
     * by 128 weight rows per block, symmetric weights only (zeros NULL); each group's product is two wgmma over the
     * token halves, whose scaling overlaps the other half's product. Its f32 accumulation of the per-group
     * integer sums is segmented (kernels/quant/w4a8_sm90.cu), so its bits differ from L32_W4A8_MMA's by f32
     * rounding; the CPU twin of those bits is llama32::ops::cpu::quant::w4a8_segmented.
     */
    L32_W4A8_WGMMA = 1,
    /**
     * L32_W4A8_WGMMA with each product waited for before its scaling (no overlap of the FFMAs with the next
     * product): the same bits, kept to measure what the overlap buys.
     */
    L32_W4A8_WGMMA_SERIAL = 2,
    /**
     * L32_W4A8_WGMMA_SERIAL with the activations copied in natural k order (16-byte copies) and the weights' A
     * fragments composed from the quad's words instead: the same bits, a quarter of the activation copies.
     */
    L32_W4A8_WGMMA_ROW = 3,
    /**
     * L32_W4A8_WGMMA_ROW's products, warp-specialized: a producer warpgroup fills an mbarrier ring and two consumer
     * warpgroups compute without a block barrier per chunk; the same bits.
     */
    L32_W4A8_WGMMA_WS = 4,
    /**
     * L32_W4A8_WGMMA_ROW's products fed by the TMA unit: one thread issues each chunk's activations, weights and
     * scales as three tensor-map boxes completing on an mbarrier, instead of every thread's cp.async; the same bits.
     */
    L32_W4A8_WGMMA_TMA = 5,
    /** L32_W4A8_WGMMA_WS with L32_W4A8_WGMMA_TMA's copies (one producer thread); the same bits. */
    L32_W4A8_WGMMA_WS_TMA = 6,
} l32_w4a8_kernel;

/**
 * W4A8 GEMM (torchao 8da4w) on the int8 tensor cores, with xq, x_scales, x_zeros from l32_act_quant:
 * out[i, j] = bf16(x_scales[i] * (sum_g sw[j, g] * sum_{c in g} xq[i, c] * (q[j, c] - zw[j, g])
 *                                 - x_zeros[i] * row_corr[j])),
 * the per-group integer sums exact in s32, scaled and summed in f32. The device scales hold sw / 16 for symmetric
 * weights (the kernel multiplies 16 q) and sw with zero points. dtype: L32_DTYPE_BF16 (the output) only.
 */
typedef struct l32_w4a8_params {
    void* out;              /**< [m, n] bf16, contiguous rows */
    const int8_t* xq;       /**< [m, k] int8, contiguous rows, 16-byte aligned */
    const float* x_scales;  /**< [m] */
    const int32_t* x_zeros; /**< [m] */
    const void* qweight;    /**< reordered int4 tiles (W4A8 order), 16-byte aligned */
    const float* scales;    /**< reordered f32 scales (see above), 16-byte aligned */
    const uint8_t* zeros;   /**< reordered bytes 8 + zw, 16-byte aligned; NULL for symmetric weights */
    const float* row_corr;  /**< [n_pad]: sum_g sw[j, g] * sum_{c in g} (q[j, c] - zw[j, g]) */
    float* partials;        /**< split-K workspace, splits * m * n_pad f32 (NULL when splits == 1) */
    uint32_t* counters;     /**< split-K tile counters, ceil(n_pad / 128) * ceil(m / tile_m), zeroed */
    int64_t m;              /**< >= 0 (0 launches nothing), below 2^30 */
    int64_t n;              /**< >= 0 (0 launches nothing), below 2^31 - 128 */
    int64_t k;              /**< a multiple of 64, 64 ..= 2^24 */
    int32_t splits;         /**< K splits, 1 ..= k / 64 */
    int32_t tile_m;         /**< tokens per block: 8, 16, 32 (decode) or 128 (prefill); 64 or 128 for the WGMMA ones */
    l32_w4a8_kernel kernel; /**< which kernel */
    int32_t prewait;        /**< MMA only: nonzero issues the copies of the first stages' weights, scales and zero
                                 points before waiting for the previous kernel (which writes xq) under PDL; ignored
                                 without PDL; the same bits */
    l32_dtype dtype;        /**< L32_DTYPE_BF16 */
} l32_w4a8_params;

/** Launches the W4A8 GEMM on `stream`. */
l32_status l32_w4a8_gemm(const l32_w4a8_params* params, void* stream);

/** 1 when the current device runs L32_W4A8_WGMMA(_SERIAL) (built with sm_90a SASS, compute capability 9.x), else 0. */
int l32_w4a8_wgmma_available(void);

/** What l32_act_quant computes before quantizing a row. */
typedef enum l32_act_quant_op {
    /** The bf16 rows of x as they are. */
    L32_ACT_QUANT_ROWS = 0,
    /** l32_norm of x (no residual). */
    L32_ACT_QUANT_RMS_NORM = 1,
    /** l32_norm of x with the residual add (residual updated in place). */
    L32_ACT_QUANT_ADD_RMS_NORM = 2,
    /** l32_silu_mul of x = gate_up [rows, 2 * hidden]. */
    L32_ACT_QUANT_SILU_MUL = 3,
} l32_act_quant_op;

/**
 * Per-token asymmetric int8 quantization of bf16 rows (torchao per_token_dynamic_quant), fused with the kernel that
 * produces them: for each row r the bf16 values v (bit for bit what l32_norm / l32_silu_mul would write), then
 * lo = min(min(v), 0), hi = max(max(v), 0), scales[r] = max((hi - lo) / 255, 2^-23),
 * zeros[r] = clamp(-128 - rint(lo / scales[r]), -128, 127), q[r, c] = clamp(rint(v[c] * (1 / scales[r])) + zeros[r],
 * -128, 127), every f32 operation rounded once: the CPU twin quant::numerics::quantize_activations, bit for bit.
 * hidden % 8 == 0 and 16-byte aligned bf16 rows (8-byte aligned q). Nothing may alias.
 */
typedef struct l32_act_quant_params {
    int8_t* q;              /**< [rows, hidden] int8, contiguous rows */
    float* scales;          /**< [rows] */
    int32_t* zeros;         /**< [rows] */
    void* out;              /**< optional [rows, hidden] bf16: also write the values v (NULL: not written) */
    const void* x;          /**< [rows, hidden] bf16; SILU_MUL: [rows, 2 * hidden] = [gate | up] */
    void* residual;         /**< ADD_RMS_NORM: [rows, hidden] bf16, read and written; otherwise ignored */
    const void* weight;     /**< RMS_NORM / ADD_RMS_NORM: [hidden] bf16; otherwise ignored */
    int64_t rows;           /**< any count >= 0 (0 launches nothing), at most 2^31 - 1 */
    int64_t hidden;         /**< a multiple of 8, 8 ..= 2^30 */
    float eps;              /**< norms: >= 0 */
    l32_act_quant_op op;    /**< what the row is */
    l32_dtype dtype;        /**< L32_DTYPE_BF16 */
} l32_act_quant_params;

/** Launches the activation quantization (act_quant family) on `stream`. */
l32_status l32_act_quant(const l32_act_quant_params* params, void* stream);

/**
 * The skinny GEMM of decode over an int8 table (the token embedding or lm_head of an int8-embeddings model, Meta's
 * 8-bit per-channel option): out[i, j] = bf16(scales[j] * sum_c x[i, c] * q[j, c]) for i < m, j < n, the products
 * exact in f32 (tensor-core MMA of bf16 x and the int8 values, which bf16 holds exactly), one f32 scaling and one
 * bf16 rounding per output. dtype: L32_DTYPE_BF16 (x and out) only. Nothing may alias.
 */
typedef struct l32_gemv_int8_params {
    void* out;              /**< [m, n] bf16, contiguous rows */
    const void* x;          /**< [m, k] bf16, contiguous rows, 16-byte aligned */
    const int8_t* q;        /**< [n, k] int8, contiguous rows, 16-byte aligned */
    const void* scales;     /**< [n] bf16 */
    int64_t m;              /**< 1 ..= 16 */
    int64_t n;              /**< any count >= 0 (0 launches nothing), at most 2^31 - 1 */
    int64_t k;              /**< a multiple of 16, 16 ..= 2^24 */
    int32_t warps;          /**< warps per block: 8 or 16 (the Rust heuristic gemv::warps_per_block) */
    l32_dtype dtype;        /**< L32_DTYPE_BF16 */
} l32_gemv_int8_params;

/** Launches the int8-table skinny GEMM on `stream`. */
l32_status l32_gemv_int8(const l32_gemv_int8_params* params, void* stream);

/* END quant */


/* ---------------------------------------------------------------------------------------------------------------- */
/* Llama 3.2 Vision: encoder pieces, gated residual norm, and a generic gather attention (kernels/vision/)            */
/* BEGIN vision */

/**
 * Patch extraction for the patch-embedding convolution as a GEMM (the twin of engine/vision/cuda/twins.rs im2col):
 * out[tile * grid + py * per_side + px, (c * patch + ky) * patch + kx] = bf16(pixels[tile, c, py * patch + ky,
 * px * patch + kx]) with per_side = side / patch, grid = per_side^2; columns channels * patch^2 .. k_pad - 1 are 0.
 */
typedef struct l32_vision_im2col_params {
    void* out;              /**< [tiles * grid, k_pad] bf16 */
    const float* pixels;    /**< [tiles, channels, side, side] f32 */
    int64_t tiles;          /**< >= 0 (0 launches nothing) */
    int32_t channels;       /**< >= 1 */
    int32_t side;           /**< image (tile) side in pixels, >= patch */
    int32_t patch;          /**< patch side, >= 1 */
    int32_t k_pad;          /**< row length of out, >= channels * patch * patch */
} l32_vision_im2col_params;

/** Launches the patch extraction on `stream`. */
l32_status l32_vision_im2col(const l32_vision_im2col_params* params, void* stream);

/**
 * The embeddings of the vision encoder and layernorm_pre (steps 1-3 of engine/vision/encoder.rs), one row per token
 * of the padded layout: row r = (it * padded + p) with it = image * tiles + tile. For p >= num_patches the row is 0.
 * Otherwise, in f32: x = (p == 0 ? class_embedding : conv[it * (num_patches - 1) + p - 1] + pre_add[it]);
 * x = (x + position[p]) + pos_gate * tile_position[ar_ids[image], (tile * num_patches + p)];
 * out[r] = (x - mean) / sqrt(var + eps) * ln_weight + ln_bias (biased variance).
 */
typedef struct l32_vision_embed_params {
    float* out;                 /**< [images * tiles * padded, hidden] f32 */
    const void* conv;           /**< [images * tiles * (num_patches - 1), hidden] bf16: the patch GEMM */
    const float* class_embedding; /**< [hidden] */
    const float* pre_add;       /**< [images * tiles, hidden]: pre-tile embedding of the image's ratio x tanh(gate) */
    const float* position;      /**< [num_patches, hidden]: (1 - tanh(gate)) x position embedding */
    const void* tile_position;  /**< [ar_rows, tiles * num_patches * hidden] bf16 */
    const uint32_t* ar_ids;     /**< [images], each < ar_rows */
    const float* ln_weight;     /**< [hidden] */
    const float* ln_bias;       /**< [hidden] */
    int64_t images;             /**< >= 0 (0 launches nothing) */
    int32_t tiles;              /**< tiles per image, >= 1 */
    int32_t num_patches;        /**< tokens per tile (class token included), >= 2 */
    int32_t padded;             /**< >= num_patches */
    int32_t hidden;             /**< 1 ..= 16384 */
    int32_t ar_rows;            /**< rows of tile_position */
    float pos_gate;             /**< tanh of the gated positional embedding's gate */
    float eps;                  /**< >= 0 */
} l32_vision_embed_params;

/** Launches the vision embedding on `stream`. */
l32_status l32_vision_embed(const l32_vision_embed_params* params, void* stream);

/**
 * LayerNorm with bias over f32 rows, with an optional gated residual add first and an optional per-group add after:
 * with delta set, residual[r] += gate * (delta[r] + delta_bias) (f32, written back); then
 * y = (residual[r] - mean) / sqrt(var + eps) * weight + bias (biased variance, f32 statistics);
 * out[r] = bf16(y) when out is set; out_f32[r] = y + post_add[r / rows_per_group] when out_f32 is set (post_add
 * optional). out_f32 may alias residual; nothing else may alias.
 */
typedef struct l32_vision_layer_norm_params {
    float* residual;            /**< [rows, width] f32 */
    const void* delta;          /**< [rows, width] bf16, or NULL */
    const float* delta_bias;    /**< [width], or NULL */
    void* out;                  /**< [rows, width] bf16, or NULL */
    float* out_f32;             /**< [rows, width] f32, or NULL */
    const float* post_add;      /**< [rows / rows_per_group, width] f32, or NULL */
    const float* weight;        /**< [width] (read only when out or out_f32 is set) */
    const float* bias;          /**< [width] */
    int64_t rows;               /**< >= 0 (0 launches nothing), at most 2^31 - 1 */
    int64_t rows_per_group;     /**< >= 1 */
    int32_t width;              /**< 1 ..= 16384 */
    float gate;                 /**< scale of delta (1 for an ungated residual) */
    float eps;                  /**< >= 0 */
} l32_vision_layer_norm_params;

/** Launches the LayerNorm on `stream`. */
l32_status l32_vision_layer_norm(const l32_vision_layer_norm_params* params, void* stream);

/** Activation of l32_bias_act. */
typedef enum l32_bias_act_kind {
    /** y = x + bias. */
    L32_BIAS_ACT_NONE = 0,
    /** y = gelu(x + bias), the exact erf GELU (transformers' "gelu"). */
    L32_BIAS_ACT_GELU = 1,
} l32_bias_act_kind;

/** out[r, c] = bf16(act(float(x[r, c]) + bias[c])). out may alias x. */
typedef struct l32_bias_act_params {
    void* out;                  /**< [rows, cols] bf16 */
    const void* x;              /**< [rows, cols] bf16 */
    const float* bias;          /**< [cols] */
    int64_t rows;               /**< >= 0 (0 launches nothing) */
    int64_t cols;               /**< >= 1 */
    l32_bias_act_kind act;
} l32_bias_act_params;

/** Launches the bias + activation on `stream`. */
l32_status l32_bias_act(const l32_bias_act_params* params, void* stream);

/**
 * The vision encoder's output (step 6 of engine/vision/encoder.rs): padding tokens dropped, the final state and the
 * interleaved intermediate states concatenated. For t < tiles_total * num_patches, with src = (t / num_patches) *
 * padded + t % num_patches: out[t, d] = bf16(final_state[src, d]) for d < hidden, and
 * out[t, hidden + d * n_inter + k] = bf16(inter[k, src, d]).
 */
typedef struct l32_vision_gather_params {
    void* out;                  /**< [tiles_total * num_patches, hidden * (1 + n_inter)] bf16 */
    const float* final_state;   /**< [tiles_total * padded, hidden] */
    const float* inter;         /**< [n_inter, tiles_total * padded, hidden] (NULL when n_inter == 0) */
    int64_t tiles_total;        /**< >= 0 (0 launches nothing) */
    int32_t num_patches;        /**< >= 1 */
    int32_t padded;             /**< >= num_patches */
    int32_t hidden;             /**< >= 1 */
    int32_t n_inter;            /**< >= 0 */
} l32_vision_gather_params;

/** Launches the output gather on `stream`. */
l32_status l32_vision_gather(const l32_vision_gather_params* params, void* stream);

/**
 * A gated residual add + RMSNorm over bf16 rows (the cross-attention layers' tanh gates):
 * residual[r] = bf16(residual[r] + bf16(gate * row_scale[r] * delta[r])) (row_scale NULL: 1), then, when out is
 * set, out[r] = bf16(weight * bf16(h * rsqrt(mean(h^2) + eps))) with h the new residual row (l32_norm's numerics).
 * Nothing may alias.
 */
typedef struct l32_gated_rms_norm_params {
    void* residual;             /**< [rows, hidden] bf16, read and written */
    const void* delta;          /**< [rows, hidden] bf16 */
    const float* row_scale;     /**< [rows], or NULL */
    void* out;                  /**< [rows, hidden] bf16, or NULL */
    const void* weight;         /**< [hidden] bf16 (read only when out is set) */
    int64_t rows;               /**< >= 0 (0 launches nothing), at most 2^31 - 1 */
    int32_t hidden;             /**< 1 ..= 16384 */
    float gate;
    float eps;                  /**< >= 0 */
} l32_gated_rms_norm_params;

/** Launches the gated residual RMSNorm on `stream`. */
l32_status l32_gated_rms_norm(const l32_gated_rms_norm_params* params, void* stream);

/**
 * Generic attention over gathered keys, any head_dim that is a multiple of 8 up to 256 (one warp per query token and
 * head, f32 throughout, CUDA cores): query i (head h, kv head g = h / (num_heads / num_kv_heads), sequence
 * s = seq_of_query[i]) attends to keys j = 0 ..= positions[i]; key j lives in slot
 * block_tables[s * max_blocks_per_seq + j / block_size] * block_size + j % block_size, its K at
 * k + slot * kv_stride + g * head_dim and its V likewise. Score = (q . k) * scale, plus -FLT_MAX where
 * query_flags[i] and key_flags[slot] are both non-zero (transformers' additive aspect-ratio mask; both flag arrays
 * set or both NULL); a slot >= num_slots is skipped. Softmax and P * V in f32, output rounded to bf16 once.
 * Serves the vision encoder (non-causal: positions = sequence length - 1) and any text attention whose head_dim the
 * tensor-core kernels do not take.
 */
typedef struct l32_gather_attention_params {
    void* out;                  /**< [tokens, out_stride] bf16: head h at h * head_dim */
    const void* q;              /**< [tokens, q_stride] bf16 */
    const void* k;              /**< slots at kv_stride, 16-byte aligned */
    const void* v;              /**< slots at kv_stride, 16-byte aligned */
    const uint32_t* seq_of_query; /**< [tokens] */
    const uint32_t* positions;  /**< [tokens] */
    const uint32_t* block_tables; /**< [seqs, max_blocks_per_seq] */
    const uint8_t* key_flags;   /**< [num_slots], or NULL */
    const uint8_t* query_flags; /**< [tokens], or NULL */
    int64_t tokens;             /**< >= 0 (0 launches nothing), at most 2^31 / num_heads */
    int64_t q_stride;           /**< a multiple of 8, >= num_heads * head_dim */
    int64_t out_stride;         /**< >= num_heads * head_dim */
    int64_t kv_stride;          /**< a multiple of 8, >= num_kv_heads * head_dim */
    int64_t num_slots;          /**< slots addressable in k and v */
    int64_t max_blocks_per_seq; /**< >= 1 */
    int32_t num_heads;          /**< a multiple of num_kv_heads */
    int32_t num_kv_heads;       /**< >= 1 */
    int32_t head_dim;           /**< a multiple of 8, 8 ..= 256 */
    int32_t block_size;         /**< >= 1 */
    float scale;                /**< softmax scale */
} l32_gather_attention_params;

/** Launches the gather attention on `stream`. */
l32_status l32_gather_attention(const l32_gather_attention_params* params, void* stream);

/**
 * The vision encoder's self-attention on the tensor cores (kernels/vision/encoder_attention.cu): num_seqs
 * sequences of seq_len consecutive rows each; every row attends to all rows of its sequence (non-causal), with
 * -FLT_MAX added where both the query's and the key's flag are set (transformers' mask; flags may be NULL).
 * num_kv_heads == num_heads. Row r of sequence s: q at (s * seq_len + r) * q_stride + head * head_dim, k and v at
 * ... * kv_stride, out at ... * out_stride.
 */
typedef struct l32_encoder_attention_params {
    void* out;            /**< [num_seqs * seq_len, out_stride] bf16, 4-byte aligned; out_stride even */
    const void* q;        /**< bf16, 16-byte aligned */
    const void* k;        /**< bf16, 16-byte aligned */
    const void* v;        /**< bf16, 16-byte aligned */
    const uint8_t* flags; /**< [num_seqs * seq_len], or NULL */
    int64_t q_stride;     /**< a multiple of 8, >= num_heads * head_dim */
    int64_t kv_stride;    /**< a multiple of 8, >= num_heads * head_dim */
    int64_t out_stride;   /**< >= num_heads * head_dim */
    int64_t num_seqs;     /**< 0 ..= 65535 (0 launches nothing) */
    int32_t seq_len;      /**< >= 1 */
    int32_t num_heads;    /**< 1 ..= 65535 */
    int32_t head_dim;     /**< one that l32_encoder_attention_supports */
    float scale;          /**< softmax scale */
} l32_encoder_attention_params;

/** 1 when l32_encoder_attention is built for `head_dim` (16, 32, 64, 80, 128), else 0. */
int32_t l32_encoder_attention_supports(int32_t head_dim);

/** Launches the encoder attention on `stream`. */
l32_status l32_encoder_attention(const l32_encoder_attention_params* params, void* stream);

/* END vision */

/* ---------------------------------------------------------------------------------------------------------------- */
/* persistent decode stack (kernels/decode_layers.cu): every decoder layer of a decode step in one launch */
/* BEGIN decode_layers */

/** The most decode tokens (sequences) l32_decode_layers takes: one MMA column tile of the skinny GEMM. */
#define L32_DECODE_LAYERS_MAX_M 8

/** The projections' format in l32_decode_layers. */
typedef enum l32_decode_weights {
    /** bf16 [n, k] matrices (the l32_gemv calls). */
    L32_DECODE_WEIGHTS_BF16 = 0,
    /** W4A16 in l32_w4a16_params' layout, symmetric (no zero points), gate_up paired (pair_half = inter). */
    L32_DECODE_WEIGHTS_W4A16 = 1,
} l32_decode_weights;

/**
 * One decoder layer's weights and KV-cache pools (the shapes of the l32_gemv / l32_w4a16_gemm and l32_paged_decode
 * calls). With L32_DECODE_WEIGHTS_W4A16 each projection pointer is its layout's int4 tiles (`qweight`) and the
 * matching `s_*` its bf16 scales; with bf16 weights the `s_*` are unused.
 */
typedef struct l32_decode_layer_weights {
    const void* attn_norm;  /**< [hidden] */
    const void* wqkv;       /**< [(num_heads + 2 num_kv_heads) head_dim, hidden]: q rows, then k, then v */
    const void* wo;         /**< [hidden, num_heads head_dim] */
    const void* mlp_norm;   /**< [hidden] */
    const void* w_gate_up;  /**< [2 inter, hidden]: gate rows, then up rows (W4A16: paired) */
    const void* w_down;     /**< [hidden, inter] */
    void* k_cache;          /**< [num_slots, num_kv_heads, head_dim] */
    void* v_cache;          /**< the same shape */
    const void* s_qkv;      /**< W4A16: wqkv's scales */
    const void* s_o;        /**< W4A16: wo's scales */
    const void* s_gate_up;  /**< W4A16: w_gate_up's scales */
    const void* s_down;     /**< W4A16: w_down's scales */
} l32_decode_layer_weights;

/**
 * The decoder layers of one decode step (token s belongs to sequence s), in one cooperative launch of one block
 * per SM whose phases are separated by grid barriers. Per layer: [RMSNorm (+ residual add), qkv, RoPE, KV write],
 * [split-KV attention, splits merged by the last block of each (sequence, kv head)], [o], [RMSNorm + residual add,
 * gate_up, SwiGLU], [down]. Every phase runs the device code of the multi-kernel step (l32_gemv with the norm
 * prologue, rope_on and silu_pairs at warps = 8, l32_paged_decode with fused_merge), so the results are bit for bit
 * those of that sequence of launches. With W4A16 weights the projections are l32_w4a16_gemm's tiles at
 * min(8, k / 64) K splits (the SwiGLU fused as with silu, RoPE and the KV write as l32_rope_kv_write after it), the
 * norms l32_norm's: again the bits of that sequence of launches.
 *
 * On entry x holds the embedding rows; on return x holds the residual stream before the last layer's down
 * projection and `delta` that projection's output (the final add + RMSNorm follows, as after the layers of the
 * multi-kernel step). qkv, attn and act are scratch. Metadata is trusted: the host validates it.
 */
typedef struct l32_decode_layers_params {
    const l32_decode_layer_weights* layers; /**< [num_layers] in device memory */
    void* x;                      /**< [m, hidden] bf16: in the embedding rows, out the residual (see above) */
    void* delta;                  /**< [m, hidden] bf16: out the last down projection */
    void* qkv;                    /**< [m, (num_heads + 2 num_kv_heads) head_dim] bf16 scratch */
    void* attn;                   /**< [m, num_heads head_dim] bf16 scratch */
    void* act;                    /**< [m, inter] bf16 scratch */
    const uint32_t* positions;    /**< [m] */
    const uint32_t* slot_mapping; /**< [m]: < num_slots, or L32_PAD_SLOT */
    const float* inv_freq;        /**< [head_dim / 2] */
    const uint32_t* block_tables; /**< [m, max_blocks_per_seq] */
    void* workspace;              /**< num_splits > 1: l32_paged_decode's split workspace for m sequences */
    uint32_t* counters;           /**< 3 + m num_kv_heads u32 (the grid barrier's two, the norm prologue's, the
                                       split merge's), zeroed before the first launch; every launch leaves them fit
                                       for the next (the barrier's top bit may stay set), so a graph may replay it */
    int64_t num_slots;            /**< slots per cache pool */
    int64_t max_blocks_per_seq;   /**< >= 1 */
    int32_t num_layers;           /**< >= 1 */
    int32_t m;                    /**< 1 ..= L32_DECODE_LAYERS_MAX_M */
    int32_t hidden;               /**< a multiple of 8 */
    int32_t inter;                /**< a multiple of 8 */
    int32_t num_heads;            /**< a multiple of num_kv_heads, at most 16 per kv head */
    int32_t num_kv_heads;         /**< >= 1 */
    int32_t head_dim;             /**< 64 or 128 */
    int32_t block_size;           /**< >= 1 */
    int32_t num_splits;           /**< 1 ..= 256 */
    float eps;                    /**< RMSNorm epsilon, >= 0 */
    float scale;                  /**< softmax scale */
    l32_dtype dtype;              /**< L32_DTYPE_BF16 */
    l32_decode_weights weights;   /**< the projections' format; W4A16 needs hidden, q_dim and inter % 64 == 0 */
    uint64_t* phase_times;        /**< NULL, or (profiling) [num_layers][L32_DECODE_LAYERS_PHASES][timing_blocks][2]:
                                       block b's %globaltimer (ns) where a phase starts (the kernel's start, or its
                                       departure from the grid barrier before) and ends (its arrival at the barrier
                                       after, or the kernel's end), taken by thread 0 once the block's threads are
                                       through the phase. Written only when the grid has timing_blocks blocks */
    int32_t timing_blocks;        /**< blocks phase_times holds room for: the SM count (one block per SM) */
} l32_decode_layers_params;

/** Phases per layer of l32_decode_layers (norm + qkv, attention, o, norm + gate_up, down). */
#define L32_DECODE_LAYERS_PHASES 5

/** Launches the decode stack on `stream` (cooperative: L32_UNSUPPORTED where a block per SM cannot be resident). */
l32_status l32_decode_layers(const l32_decode_layers_params* params, void* stream);

/* END decode_layers */

/* ---------------------------------------------------------------------------------------------------------------- */
/* busy wait (kernels/timing.cu): a head start for the host when profiling a step */

/** The longest wait l32_busy_wait takes: one second. */
#define L32_BUSY_WAIT_MAX_NS 1000000000ull

/** Launches one warp that returns after `nanoseconds` of device time (at most L32_BUSY_WAIT_MAX_NS) on `stream`. */
l32_status l32_busy_wait(uint64_t nanoseconds, void* stream);

/* ---------------------------------------------------------------------------------------------------------------- */
/* grid probe (kernels/grid_probe.cu): grid-barrier latency and a stream across barriers, for a persistent step */

/** Bytes per block per ring stage of the stream modes: `bytes` is a multiple of it. */
#define L32_GRID_PROBE_CHUNK 16384
/** The most phases (barriers) one launch takes. */
#define L32_GRID_PROBE_MAX_PHASES (1 << 20)

/** What l32_grid_probe measures. */
typedef enum l32_grid_probe_mode {
    /** `phases` phases of two grid barriers; `out[b]` counts the neighbour tags block b read wrong (0 if sound). */
    L32_GRID_PROBE_BARRIER = 0,
    /** Every block streams its share of `src` through a shared-memory ring; `out[b]` ^= its fold of the bytes. */
    L32_GRID_PROBE_STREAM = 1,
    /** STREAM with `phases` grid barriers spread over it, the ring's next chunks in flight across each. */
    L32_GRID_PROBE_STREAM_BARRIER = 2,
    /** BARRIER with the grid barrier's earlier form (an atomicAdd arrival), for the comparison. */
    L32_GRID_PROBE_BARRIER_ATOMIC = 3,
} l32_grid_probe_mode;

/** One probe launch: a cooperative launch of one block per SM (l32_grid_probe_blocks blocks). */
typedef struct l32_grid_probe_params {
    const void* src;   /**< stream modes: `bytes` to read, 16-byte aligned; unused (may be NULL) for BARRIER */
    int64_t bytes;     /**< stream modes: a multiple of L32_GRID_PROBE_CHUNK, at least blocks * (phases + 1) chunks */
    uint32_t* sync;    /**< two u32, zeroed before the first launch (the grid barrier's counter, and one unused);
                            every launch leaves them fit for the next, so a graph may replay it */
    uint32_t* tags;    /**< BARRIER(_ATOMIC): one u32 per block */
    uint32_t* out;     /**< one u32 per block, zeroed by the caller (see the modes) */
    int32_t phases;    /**< BARRIER(_ATOMIC): phases; STREAM_BARRIER: barriers; 0 ..= L32_GRID_PROBE_MAX_PHASES */
    int32_t mode;      /**< an l32_grid_probe_mode */
} l32_grid_probe_params;

/** The blocks one probe launch takes on the current device (one per SM), or 0 where it cannot run. */
int32_t l32_grid_probe_blocks(void);

/** Launches the probe on `stream` (L32_UNSUPPORTED where a block per SM cannot be resident). */
l32_status l32_grid_probe(const l32_grid_probe_params* params, void* stream);

/* END timing */

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* LLAMA32_KERNELS_H */
