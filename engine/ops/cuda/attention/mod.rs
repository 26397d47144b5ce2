//! Causal attention over the paged KV cache on CUDA (`kernels/attention/`, families `paged_prefill` and
//! `paged_decode`), the twins of [`crate::ops::cpu::attention::paged_attention`].
//!
//! - [`paged_prefill`]: any mix of query chunks (fresh prefill, chunked prefill over an existing cache, prefix
//!   reuse, decode tokens): each token attends to positions `0..=position` of its sequence. Flash-attention on the
//!   tensor cores with the GQA group folded into the query rows, by mma.sync or, on Hopper, wgmma
//!   ([`PrefillKernel`]).
//! - [`paged_decode`]: one query token per sequence, fused GQA, split-KV with an f32 workspace
//!   ([`decode_num_splits`], [`decode_workspace_bytes`]).
//!
//! Numerics: bf16 inputs, scores, softmax and sums in f32, the probabilities rounded to bf16 for the `P * V`
//! product, the output rounded to bf16. Against the f32 twin on the same (bf16) inputs that is at most
//! `2^-8 * max|v|` from P plus one output rounding.
//!
//! The cache metadata (positions against block tables, block ids against the pool) is trusted here: the executor
//! validates it on the host (`StepInput::validate`) before any launch. Every buffer's length is checked.
//!
//! The switches and launch heuristics (prefill kernel, decode splits, merge and ring depth) live in `settings`,
//! re-exported here.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use super::switch::KernelSwitch;
pub use crate::ops::cpu::attention::PagedLayout;
use crate::{Error, Result};

/// The query operand: the first `num_heads * head_dim` elements of each row of the fused qkv activation.
#[derive(Clone, Copy, Debug)]
pub struct QueryRows<'a, Q> {
    /// `[tokens, stride]` bf16 (`stride` a multiple of 8, so rows stay 16-byte aligned).
    pub qkv: &'a Q,
    /// Elements between rows, `>= num_heads * head_dim`.
    pub stride: usize,
}

/// One layer's K and V pools and their geometry.
#[derive(Clone, Copy, Debug)]
pub struct KvPools<'a, C> {
    /// Heads, head dim (64 or 128) and block size.
    pub layout: PagedLayout,
    /// `[num_blocks, block_size, num_kv_heads, head_dim]` bf16.
    pub k: &'a C,
    /// Same shape as `k`.
    pub v: &'a C,
}

/// Device metadata of a decode step: token `s` is the one new token of sequence `s`.
#[derive(Clone, Copy, Debug)]
pub struct DecodeMeta<'a, M> {
    /// `[num_seqs]`: the token's position; the sequence's context is `positions[s] + 1` tokens.
    pub positions: &'a M,
    /// `[num_seqs, max_blocks_per_seq]` block tables.
    pub block_tables: &'a M,
    /// Row length of `block_tables`.
    pub max_blocks_per_seq: usize,
    /// KV splits per sequence, `1..=256`, from [`decode_num_splits`]; any value is correct for any context.
    pub num_splits: usize,
}

/// Device metadata of a prefill step (the layout of `StepInput`).
#[derive(Clone, Copy, Debug)]
pub struct PrefillMeta<'a, M> {
    /// `[tokens]`: token `i` attends to positions `0..=positions[i]` of its sequence.
    pub positions: &'a M,
    /// `[num_seqs + 1]`: sequence `s` owns tokens `cu_seqlens[s]..cu_seqlens[s + 1]`.
    pub cu_seqlens: &'a M,
    /// `[num_seqs, max_blocks_per_seq]` block tables.
    pub block_tables: &'a M,
    /// Row length of `block_tables`.
    pub max_blocks_per_seq: usize,
    /// At least the longest chunk `cu_seqlens[s + 1] - cu_seqlens[s]` (it sizes the grid; shorter chunks are fine,
    /// a longer one would leave rows unwritten).
    pub max_query_len: usize,
}

mod settings;
pub use settings::{
    compute_capability, decode_fused_merge, decode_num_splits, decode_split_positions, decode_stages,
    decode_workspace_bytes, decode_workspace_bytes_max, num_sms, set_decode_fused_merge, set_decode_stages,
    PrefillKernel, DECODE_COUNTER_BYTES, DECODE_MERGE_ENV, DECODE_SPLIT_ENV, DECODE_STAGES_ENV, MAX_DECODE_SPLITS,
};

/// The most query heads per kv head the decode kernel takes (one 16-row MMA tile).
pub(crate) const MAX_DECODE_GROUP: usize = 16;

/// Paged decode: for each sequence `s`, its one query token (q row `s`, position `positions[s]`) attends to
/// positions `0..=positions[s]`; `out[s]` is `[num_heads * head_dim]`.
///
/// - `q`: `[num_seqs, stride]`; `kv`: the layer's pools; `meta`: positions and block tables of `num_seqs` sequences.
/// - `workspace`: at least [`decode_workspace_bytes`] bytes (any length with one split), 16-byte aligned.
/// - `out`: `[num_seqs, num_heads * head_dim]`, written.
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
pub fn paged_decode<Q, C, M, W, O>(
    stream: &CudaStream,
    q: &QueryRows<'_, Q>,
    kv: &KvPools<'_, C>,
    meta: &DecodeMeta<'_, M>,
    workspace: &mut W,
    out: &mut O,
) -> Result<()>
where
    Q: DevicePtr<bf16>,
    C: DevicePtr<bf16>,
    M: DevicePtr<u32>,
    W: DevicePtrMut<u8>,
    O: DevicePtrMut<bf16>,
{
    const OP: &str = "paged_decode";
    super::ensure_built()?;
    let num_seqs = meta.positions.len();
    let lens = Lens::of(num_seqs, q, kv, (meta.block_tables.len(), meta.max_blocks_per_seq), out.len());
    check_common(OP, &kv.layout, &lens, num_seqs)?;
    let fail = |msg: String| Err(Error::Backend(format!("{OP}: {msg}")));
    let group = kv.layout.num_heads / kv.layout.num_kv_heads;
    if group > MAX_DECODE_GROUP {
        return fail(format!("{group} query heads per kv head, at most {MAX_DECODE_GROUP} are supported"));
    }
    if num_seqs > 65535 {
        return fail(format!("{num_seqs} sequences, at most 65535 are supported"));
    }
    if meta.num_splits == 0 || meta.num_splits > MAX_DECODE_SPLITS {
        return fail(format!("num_splits is {}, must be in 1..={MAX_DECODE_SPLITS}", meta.num_splits));
    }
    let need = decode_workspace_bytes(&kv.layout, num_seqs, meta.num_splits);
    if workspace.len() < need {
        return fail(format!(
            "`workspace` has {} bytes, {} splits of {num_seqs} sequences need {need}",
            workspace.len(),
            meta.num_splits
        ));
    }
    let operands = [
        ("q", q.qkv.stream()),
        ("k", kv.k.stream()),
        ("v", kv.v.stream()),
        ("positions", meta.positions.stream()),
        ("block_tables", meta.block_tables.stream()),
        ("workspace", workspace.stream()),
        ("out", out.stream()),
    ];
    super::check_same_device(OP, stream, &operands)?;
    if num_seqs == 0 {
        return Ok(());
    }
    let (qp, _q) = q.qkv.device_ptr(stream);
    let (kp, _k) = kv.k.device_ptr(stream);
    let (vp, _v) = kv.v.device_ptr(stream);
    let (pos, _pos) = meta.positions.device_ptr(stream);
    let (tables, _tables) = meta.block_tables.device_ptr(stream);
    // The fused merge's counters: the last DECODE_COUNTER_BYTES of the workspace, 4-byte aligned down (with more
    // than one split the workspace holds at least `need`, which counts them).
    let fused =
        meta.num_splits > 1 && decode_fused_merge()? && num_seqs * kv.layout.num_kv_heads <= DECODE_COUNTER_BYTES / 4;
    let counters_at = (workspace.len() - if fused { DECODE_COUNTER_BYTES } else { 0 }) as u64;
    let (ws, _ws) = workspace.device_ptr_mut(stream);
    let (op, _out) = out.device_ptr_mut(stream);
    let merge_counters = if fused { (ws + counters_at) & !3 } else { 0 };
    let (out, workspace) = (op, ws);
    let ptrs = Ptrs {
        out,
        q: qp,
        k: kp,
        v: vp,
        positions: pos,
        block_tables: tables,
        workspace,
        merge_counters,
        ..Ptrs::default()
    };
    let sizes = Sizes {
        tokens: num_seqs,
        seqs: num_seqs,
        q_stride: q.stride,
        max_blocks_per_seq: meta.max_blocks_per_seq,
        extra: meta.num_splits,
        stages: decode_stages()?,
    };
    launch_decode(OP, stream, &kv.layout, &ptrs, &sizes)
}

/// Paged prefill: each query token `i` (q row `i`, of the sequence whose `cu_seqlens` range holds it) attends to
/// positions `0..=positions[i]` of its sequence; `out[i]` is `[num_heads * head_dim]`.
///
/// - `q`: `[tokens, stride]`; `kv`: the layer's pools (the step's own K/V already written); `meta`: the step's
///   positions, `cu_seqlens`, block tables and longest chunk.
/// - `out`: `[tokens, num_heads * head_dim]`, written.
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault. Runs
/// [`PrefillKernel::configured`]; with [`paged_prefill_with`] the caller picks the kernel.
pub fn paged_prefill<Q, C, M, O>(
    stream: &CudaStream,
    q: &QueryRows<'_, Q>,
    kv: &KvPools<'_, C>,
    meta: &PrefillMeta<'_, M>,
    out: &mut O,
) -> Result<()>
where
    Q: DevicePtr<bf16>,
    C: DevicePtr<bf16>,
    M: DevicePtr<u32>,
    O: DevicePtrMut<bf16>,
{
    paged_prefill_with(stream, PrefillKernel::configured(stream)?, q, kv, meta, out)
}

/// [`paged_prefill`] with the kernel chosen by the caller. A Hopper kernel ([`PrefillKernel::Wgmma`] and its
/// forms) on a device other than compute capability 9.x is an error, before any launch.
pub fn paged_prefill_with<Q, C, M, O>(
    stream: &CudaStream,
    kernel: PrefillKernel,
    q: &QueryRows<'_, Q>,
    kv: &KvPools<'_, C>,
    meta: &PrefillMeta<'_, M>,
    out: &mut O,
) -> Result<()>
where
    Q: DevicePtr<bf16>,
    C: DevicePtr<bf16>,
    M: DevicePtr<u32>,
    O: DevicePtrMut<bf16>,
{
    const OP: &str = "paged_prefill";
    super::ensure_built()?;
    let tokens = meta.positions.len();
    let fail = |msg: String| Err(Error::Backend(format!("{OP}: {msg}")));
    let Some(seqs) = meta.cu_seqlens.len().checked_sub(1).filter(|&s| s > 0) else {
        return fail(format!("`cu_seqlens` has {} entries, needs num_seqs + 1 >= 2", meta.cu_seqlens.len()));
    };
    let lens = Lens::of(tokens, q, kv, (meta.block_tables.len(), meta.max_blocks_per_seq), out.len());
    check_common(OP, &kv.layout, &lens, seqs)?;
    if seqs > 65535 || tokens > i32::MAX as usize {
        return fail(format!("{seqs} sequences / {tokens} tokens: at most 65535 / 2^31-1 are supported"));
    }
    let group = kv.layout.num_heads / kv.layout.num_kv_heads;
    if tokens > 0 && (meta.max_query_len == 0 || meta.max_query_len > tokens) {
        return fail(format!("max_query_len is {}, must be in 1..={tokens} (the step's tokens)", meta.max_query_len));
    }
    if meta.max_query_len.saturating_mul(group) > (i32::MAX / 2) as usize {
        return fail(format!("max_query_len {} x {group} heads per kv head is too many rows", meta.max_query_len));
    }
    let operands = [
        ("q", q.qkv.stream()),
        ("k", kv.k.stream()),
        ("v", kv.v.stream()),
        ("positions", meta.positions.stream()),
        ("cu_seqlens", meta.cu_seqlens.stream()),
        ("block_tables", meta.block_tables.stream()),
        ("out", out.stream()),
    ];
    super::check_same_device(OP, stream, &operands)?;
    if !kernel.supported(stream)? {
        let (major, minor) = compute_capability(stream)?;
        return fail(format!(
            "the {} kernel needs a compute capability 9.x GPU (Hopper) and kernels built with sm_90a SASS \
             (LLAMA32_CUDA_ARCHS with 90a); this device is {major}.{minor}",
            kernel.name()
        ));
    }
    if tokens == 0 {
        return Ok(());
    }
    let (qp, _q) = q.qkv.device_ptr(stream);
    let (kp, _k) = kv.k.device_ptr(stream);
    let (vp, _v) = kv.v.device_ptr(stream);
    let (pos, _pos) = meta.positions.device_ptr(stream);
    let (cu, _cu) = meta.cu_seqlens.device_ptr(stream);
    let (tables, _tables) = meta.block_tables.device_ptr(stream);
    let (op, _out) = out.device_ptr_mut(stream);
    let ptrs =
        Ptrs { out: op, q: qp, k: kp, v: vp, positions: pos, cu_seqlens: cu, block_tables: tables, ..Ptrs::default() };
    let sizes = Sizes {
        tokens,
        seqs,
        q_stride: q.stride,
        max_blocks_per_seq: meta.max_blocks_per_seq,
        extra: meta.max_query_len,
        stages: 0,
    };
    launch_prefill(OP, stream, kernel, &kv.layout, &ptrs, &sizes)
}

/// Element counts of one call's operands.
struct Lens {
    tokens: usize,
    q: usize,
    q_stride: usize,
    k: usize,
    v: usize,
    positions: usize,
    block_tables: usize,
    max_blocks_per_seq: usize,
    out: usize,
}

impl Lens {
    /// The lengths of a call over `tokens` query rows (one position each) with block tables of
    /// `block_tables` entries, rows of `max_blocks_per_seq`, and an output of `out` elements.
    fn of<Q: DevicePtr<bf16>, C: DevicePtr<bf16>>(
        tokens: usize,
        q: &QueryRows<'_, Q>,
        kv: &KvPools<'_, C>,
        (block_tables, max_blocks_per_seq): (usize, usize),
        out: usize,
    ) -> Self {
        Lens {
            tokens,
            q: q.qkv.len(),
            q_stride: q.stride,
            k: kv.k.len(),
            v: kv.v.len(),
            positions: tokens,
            block_tables,
            max_blocks_per_seq,
            out,
        }
    }
}

/// Checks the layout and every length shared by both entries, for `seqs` sequences.
fn check_common(op: &str, layout: &PagedLayout, l: &Lens, seqs: usize) -> Result<()> {
    let fail = |msg: String| Err(Error::Backend(format!("{op}: {msg}")));
    let PagedLayout { num_heads, num_kv_heads, head_dim, block_size } = *layout;
    if head_dim != 64 && head_dim != 128 {
        return fail(format!("head_dim {head_dim} is unsupported (64 or 128)"));
    }
    if num_kv_heads == 0 || num_heads == 0 || num_heads % num_kv_heads != 0 {
        return fail(format!("num_heads {num_heads} must be a positive multiple of num_kv_heads {num_kv_heads}"));
    }
    if num_heads > 65535 || num_kv_heads > 65535 {
        return fail(format!("{num_heads} heads / {num_kv_heads} kv heads: at most 65535 are supported"));
    }
    if block_size == 0 || block_size > i32::MAX as usize {
        return fail(format!("block_size is {block_size}, must be in 1..=2^31-1"));
    }
    let row = num_heads * head_dim;
    if l.q_stride < row || !l.q_stride.is_multiple_of(8) {
        return fail(format!("q stride {} must be >= num_heads * head_dim = {row} and a multiple of 8", l.q_stride));
    }
    if l.tokens > 0 && l.q < (l.tokens - 1) * l.q_stride + row {
        return fail(format!("`q` has {} elements, {} rows of stride {} need more", l.q, l.tokens, l.q_stride));
    }
    if l.positions != l.tokens {
        return fail(format!("`positions` has {} entries, expected {}", l.positions, l.tokens));
    }
    if l.out != l.tokens * row {
        return fail(format!("`out` has {} elements, expected {} tokens x {row}", l.out, l.tokens));
    }
    let block = block_size * num_kv_heads * head_dim;
    if l.k == 0 || !l.k.is_multiple_of(block) {
        return fail(format!("`k` has {} elements, not a positive multiple of one block ({block})", l.k));
    }
    if l.v != l.k {
        return fail(format!("`v` has {} elements, `k` has {}", l.v, l.k));
    }
    if l.max_blocks_per_seq == 0 || l.block_tables != seqs * l.max_blocks_per_seq {
        return fail(format!(
            "`block_tables` has {} entries, expected {seqs} sequences x max_blocks_per_seq {} (>= 1)",
            l.block_tables, l.max_blocks_per_seq
        ));
    }
    Ok(())
}

/// Device pointers of one checked call (0 where the entry takes none: the default).
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
#[derive(Default)]
struct Ptrs {
    out: u64,
    q: u64,
    k: u64,
    v: u64,
    positions: u64,
    cu_seqlens: u64,
    block_tables: u64,
    workspace: u64,
    /// Decode: the fused merge's counters (0: the merge kernel).
    merge_counters: u64,
}

/// Sizes of one checked call; `extra` is num_splits (decode) or max_query_len (prefill); `stages` the decode ring's
/// depth (0 for prefill).
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
struct Sizes {
    tokens: usize,
    seqs: usize,
    q_stride: usize,
    max_blocks_per_seq: usize,
    extra: usize,
    stages: usize,
}

/// `1 / sqrt(head_dim)`, the scale of [`crate::ops::cpu::attention::paged_attention`].
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
pub(crate) fn softmax_scale(layout: &PagedLayout) -> f32 {
    1.0 / (layout.head_dim as f32).sqrt()
}

#[cfg(llama32_cuda)]
fn launch_decode(op: &str, stream: &CudaStream, layout: &PagedLayout, p: &Ptrs, s: &Sizes) -> Result<()> {
    use super::ffi;
    use std::ffi::c_void;
    // Every count was bounded by the checks: heads and sequences <= 65535, splits <= 256, block_size < 2^31.
    let params = ffi::l32_paged_decode_params {
        out: p.out as *mut c_void,
        q: p.q as *const c_void,
        k_cache: p.k as *const c_void,
        v_cache: p.v as *const c_void,
        positions: p.positions as *const u32,
        block_tables: p.block_tables as *const u32,
        workspace: if s.extra > 1 { p.workspace as *mut c_void } else { std::ptr::null_mut() },
        merge_counters: p.merge_counters as *mut u32,
        num_seqs: s.seqs as i64,
        q_stride: s.q_stride as i64,
        max_blocks_per_seq: s.max_blocks_per_seq as i64,
        num_heads: layout.num_heads as i32,
        num_kv_heads: layout.num_kv_heads as i32,
        head_dim: layout.head_dim as i32,
        block_size: layout.block_size as i32,
        num_splits: s.extra as i32,
        scale: softmax_scale(layout),
        fused_merge: i32::from(p.merge_counters != 0),
        stages: s.stages as i32,
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
    };
    let raw = super::raw_stream(op, stream)?;
    // SAFETY: every pointer comes from a live device slice on this stream's device whose length was checked against
    // the sizes above (the merge counters lie in the workspace's last DECODE_COUNTER_BYTES, past the partials); the
    // callers hold the slices' stream guards until after this launch.
    let status = unsafe { ffi::l32_paged_decode(&params, raw) };
    super::check_launch(op, stream, status, || describe(op, layout, s))
}

#[cfg(llama32_cuda)]
fn launch_prefill(
    op: &str,
    stream: &CudaStream,
    kernel: PrefillKernel,
    layout: &PagedLayout,
    p: &Ptrs,
    s: &Sizes,
) -> Result<()> {
    use super::ffi;
    use std::ffi::c_void;
    let params = ffi::l32_paged_prefill_params {
        out: p.out as *mut c_void,
        q: p.q as *const c_void,
        k_cache: p.k as *const c_void,
        v_cache: p.v as *const c_void,
        positions: p.positions as *const u32,
        cu_seqlens: p.cu_seqlens as *const u32,
        block_tables: p.block_tables as *const u32,
        num_tokens: s.tokens as i64,
        num_seqs: s.seqs as i64,
        q_stride: s.q_stride as i64,
        max_blocks_per_seq: s.max_blocks_per_seq as i64,
        max_query_len: s.extra as i64,
        num_heads: layout.num_heads as i32,
        num_kv_heads: layout.num_kv_heads as i32,
        head_dim: layout.head_dim as i32,
        block_size: layout.block_size as i32,
        scale: softmax_scale(layout),
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
        kernel: match kernel {
            PrefillKernel::Mma => ffi::l32_prefill_kernel::L32_PREFILL_MMA,
            PrefillKernel::Wgmma => ffi::l32_prefill_kernel::L32_PREFILL_WGMMA,
            PrefillKernel::WgmmaWs => ffi::l32_prefill_kernel::L32_PREFILL_WGMMA_WS,
        },
    };
    let raw = super::raw_stream(op, stream)?;
    // SAFETY: as in launch_decode.
    let status = unsafe { ffi::l32_paged_prefill(&params, raw) };
    super::check_launch(op, stream, status, || format!("{} [{} kernel]", describe(op, layout, s), kernel.name()))
}

#[cfg(llama32_cuda)]
fn describe(op: &str, l: &PagedLayout, s: &Sizes) -> String {
    format!(
        "{op} (tokens {}, seqs {}, heads {}/{}, head_dim {}, block_size {})",
        s.tokens, s.seqs, l.num_heads, l.num_kv_heads, l.head_dim, l.block_size
    )
}

#[cfg(not(llama32_cuda))]
fn launch_decode(_op: &str, _stream: &CudaStream, _layout: &PagedLayout, _p: &Ptrs, _s: &Sizes) -> Result<()> {
    super::ensure_built()
}

#[cfg(not(llama32_cuda))]
fn launch_prefill(
    _op: &str,
    _stream: &CudaStream,
    _kernel: PrefillKernel,
    _layout: &PagedLayout,
    _p: &Ptrs,
    _s: &Sizes,
) -> Result<()> {
    super::ensure_built()
}

#[cfg(test)]
mod tests {
    use super::*;

    const L1B: PagedLayout = PagedLayout { num_heads: 32, num_kv_heads: 8, head_dim: 64, block_size: 16 };

    fn lens() -> Lens {
        // 3 tokens of 1B, q stride 3072 (the fused qkv row), 10 blocks, 2 sequences x 4 blocks.
        Lens {
            tokens: 3,
            q: 3 * 3072,
            q_stride: 3072,
            k: 10 * 16 * 512,
            v: 10 * 16 * 512,
            positions: 3,
            block_tables: 8,
            max_blocks_per_seq: 4,
            out: 3 * 2048,
        }
    }

    fn err(layout: PagedLayout, l: Lens) -> String {
        check_common("op", &layout, &l, 2).unwrap_err().to_string()
    }

    #[test]
    fn accepts_matching_shapes() {
        check_common("op", &L1B, &lens(), 2).unwrap();
        // The last q row may end right after its query part.
        check_common("op", &L1B, &Lens { q: 2 * 3072 + 2048, ..lens() }, 2).unwrap();
        check_common("op", &L1B, &Lens { tokens: 0, positions: 0, out: 0, q: 0, ..lens() }, 2).unwrap();
    }

    #[test]
    fn rejects_each_bad_operand_by_name() {
        assert!(err(PagedLayout { head_dim: 96, ..L1B }, lens()).contains("head_dim 96"));
        assert!(err(PagedLayout { num_kv_heads: 5, ..L1B }, lens()).contains("multiple of num_kv_heads"));
        assert!(err(PagedLayout { block_size: 0, ..L1B }, lens()).contains("block_size"));
        assert!(err(L1B, Lens { q_stride: 3071, ..lens() }).contains("q stride"));
        assert!(err(L1B, Lens { q_stride: 1024, ..lens() }).contains("q stride"));
        assert!(err(L1B, Lens { q: 3 * 3072 - 1025, ..lens() }).contains("`q`"));
        assert!(err(L1B, Lens { positions: 2, ..lens() }).contains("`positions`"));
        assert!(err(L1B, Lens { out: 3 * 2048 + 1, ..lens() }).contains("`out`"));
        assert!(err(L1B, Lens { k: 10 * 16 * 512 + 8, ..lens() }).contains("`k`"));
        assert!(err(L1B, Lens { k: 0, v: 0, ..lens() }).contains("`k`"));
        assert!(err(L1B, Lens { v: 9 * 16 * 512, ..lens() }).contains("`v`"));
        assert!(err(L1B, Lens { block_tables: 7, ..lens() }).contains("`block_tables`"));
        assert!(err(L1B, Lens { max_blocks_per_seq: 0, block_tables: 0, ..lens() }).contains("`block_tables`"));
    }
}
