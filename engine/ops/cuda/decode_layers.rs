//! The persistent decode stack on CUDA (`kernels/decode_layers.cu`, family `decode_layers`): every decoder layer
//! of a decode step of up to [`MAX_M`] sequences in one cooperative launch of one block per SM, its phases
//! separated by grid barriers. The projections are bf16 or W4A16 ([`StackWeights`]).
//!
//! Each phase runs the device code of the multi-kernel step with the parameters that step gives it: the gemv family
//! at 8 warps per tile with its norm prologue, RoPE + KV-write and SwiGLU epilogues, and the paged decode with the
//! fused split merge. So the results are bit for bit those of that step run with 8-warp gemv tiles
//! ([`super::gemv::with_warps`]); its CPU twin is the CPU model's layer loop ([`crate::model::forward`]). With W4A16
//! projections (`kernels/decode_layers_w4a16.cuh`) each runs the W4A16 decode kernels' tiles at `min(8, k / 64)` K
//! splits, so the bits are those of the step with [`super::quant::with_w4a16_splits`]`(8)`.
//!
//! The layers' weights and caches are named once, in a [`LayerTable`] in device memory; each launch takes the step's
//! buffers, metadata and a [`StackScratch`].

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::model::LayerBufs;
use crate::ops::cpu::attention::PagedLayout;
use crate::{Error, Result};

mod phases;
pub use phases::{PhaseTime, StackPhases, PHASES, PHASE_NAMES};

/// The most decode sequences one launch takes (one MMA column tile of the gemv).
pub const MAX_M: usize = 8;
/// The most KV splits per sequence (as the paged decode).
const MAX_SPLITS: usize = super::attention::MAX_DECODE_SPLITS;
/// The most query heads per kv head (the paged decode's).
const MAX_GROUP: usize = super::attention::MAX_DECODE_GROUP;
/// The longest hidden row (the gemv norm prologue's).
const MAX_HIDDEN: usize = super::gemv::NORM_MAX_K;

/// The model's sizes as the stack needs them.
#[derive(Clone, Copy, Debug)]
pub struct StackShape {
    /// Heads, head_dim and cache block size.
    pub layout: PagedLayout,
    /// Hidden size (a multiple of 8).
    pub hidden: usize,
    /// MLP intermediate size (a multiple of 8).
    pub inter: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Slots in each layer's cache pool (blocks times block size).
    pub num_slots: usize,
}

impl StackShape {
    /// Width of the fused qkv row.
    fn qkv(&self) -> usize {
        (self.layout.num_heads + 2 * self.layout.num_kv_heads) * self.layout.head_dim
    }

    /// Width of the attention output row.
    fn q_dim(&self) -> usize {
        self.layout.num_heads * self.layout.head_dim
    }

    /// Why the stack cannot run this shape, if it cannot.
    fn unsupported(&self) -> Option<String> {
        let l = &self.layout;
        if !matches!(l.head_dim, 64 | 128) {
            return Some(format!("head_dim {} (64 or 128 only)", l.head_dim));
        }
        if l.num_kv_heads == 0
            || !l.num_heads.is_multiple_of(l.num_kv_heads)
            || l.num_heads / l.num_kv_heads > MAX_GROUP
        {
            return Some(format!("{} query heads over {} kv heads", l.num_heads, l.num_kv_heads));
        }
        if self.hidden == 0 || !self.hidden.is_multiple_of(8) || self.hidden > MAX_HIDDEN {
            return Some(format!("hidden size {} (a multiple of 8 up to {MAX_HIDDEN})", self.hidden));
        }
        if self.inter == 0 || !self.inter.is_multiple_of(8) || self.inter > i32::MAX as usize / 4 {
            return Some(format!("intermediate size {} (a multiple of 8)", self.inter));
        }
        if l.block_size == 0 || self.num_slots == 0 || self.num_slots > super::rope::PAD_SLOT as usize {
            return Some(format!("{} cache slots of block size {}", self.num_slots, l.block_size));
        }
        if !(self.eps >= 0.0 && self.eps.is_finite()) {
            return Some(format!("RMSNorm epsilon {}", self.eps));
        }
        None
    }
}

/// The most sequences (up to [`MAX_M`]) whose staged rows fit `smem` bytes of shared memory per block, as
/// `kernels/decode_layers.cu` sizes them: 16 (k / 8 + 1) bytes per row of the widest input, or the decode
/// attention's tiles, plus up to 12 KB of the kernel's static shared memory (ptxas, sm_90a: 4.4-4.7 KB bf16,
/// 8.5-8.8 KB W4A16).
fn max_sequences(shape: &StackShape, smem: usize) -> usize {
    const STATIC: usize = 12 * 1024;
    let widest = shape.hidden.max(shape.q_dim()).max(shape.inter);
    let decode = if shape.layout.head_dim == 64 { 34_816 } else { 36_864 };
    (1..=MAX_M).rev().find(|&m| (m * 16 * (widest / 8 + 1)).max(decode) + STATIC <= smem).unwrap_or(0)
}

/// True when the stack runs `m` decode sequences of a model of this shape with projections of this format.
pub fn supports(shape: &StackShape, format: WeightFormat, m: usize) -> bool {
    (1..=MAX_M).contains(&m) && shape.unsupported().is_none() && shape.unsupported_for(format).is_none()
}

impl StackShape {
    /// Why projections of `format` cannot run at this shape, if they cannot: W4A16 needs every input width (hidden,
    /// q_dim, inter) a multiple of the layout's 64-column chunk.
    fn unsupported_for(&self, format: WeightFormat) -> Option<String> {
        let widths = [("hidden size", self.hidden), ("q_dim", self.q_dim()), ("intermediate size", self.inter)];
        match format {
            WeightFormat::Bf16 => None,
            WeightFormat::W4A16 => widths
                .iter()
                .find(|(_, w)| w % super::quant::TILE_K != 0)
                .map(|(what, w)| format!("{what} {w} (W4A16 needs multiples of {})", super::quant::TILE_K)),
        }
    }
}

/// The projections' format of a [`LayerTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// bf16 `[n, k]` matrices.
    Bf16,
    /// W4A16 in the decode kernels' layout, symmetric, gate_up paired.
    W4A16,
}

/// One layer's projections: all bf16, or all W4A16.
pub enum StackWeights<'a> {
    /// bf16 `[n, k]`: qkv `[qkv, hidden]`, o `[hidden, q_dim]`, gate_up `[2 inter, hidden]` (gate rows first), down
    /// `[hidden, inter]`.
    Bf16 {
        /// Fused q, k, v projection.
        qkv: &'a CudaSlice<bf16>,
        /// Output projection.
        o: &'a CudaSlice<bf16>,
        /// Fused gate and up projection.
        gate_up: &'a CudaSlice<bf16>,
        /// Down projection.
        down: &'a CudaSlice<bf16>,
    },
    /// W4A16 (the same shapes), symmetric (no zero points), gate_up uploaded with its rows paired
    /// ([`super::quant::CudaQuantLinear::upload_swiglu`]).
    W4A16 {
        /// Fused q, k, v projection.
        qkv: &'a super::quant::CudaQuantLinear,
        /// Output projection.
        o: &'a super::quant::CudaQuantLinear,
        /// Fused gate and up projection, paired.
        gate_up: &'a super::quant::CudaQuantLinear,
        /// Down projection.
        down: &'a super::quant::CudaQuantLinear,
    },
}

impl StackWeights<'_> {
    /// The format.
    pub fn format(&self) -> WeightFormat {
        match self {
            StackWeights::Bf16 { .. } => WeightFormat::Bf16,
            StackWeights::W4A16 { .. } => WeightFormat::W4A16,
        }
    }
}

/// One layer's device tensors, in the layouts of the gemv / W4A16 and paged-decode calls.
pub struct StackLayer<'a> {
    /// `[hidden]` input RMSNorm weight.
    pub attn_norm: &'a CudaSlice<bf16>,
    /// `[hidden]` post-attention RMSNorm weight.
    pub mlp_norm: &'a CudaSlice<bf16>,
    /// The four projections.
    pub weights: StackWeights<'a>,
    /// `[num_slots, num_kv_heads, head_dim]` key cache pool.
    pub k_cache: &'a CudaSlice<bf16>,
    /// The value cache pool, the same shape.
    pub v_cache: &'a CudaSlice<bf16>,
}

/// The layers' device pointers in device memory (an array of `l32_decode_layer_weights`), with the shape they were
/// checked against.
pub struct LayerTable {
    #[cfg_attr(not(llama32_cuda), allow(dead_code))]
    buf: CudaSlice<u64>,
    layers: usize,
    shape: StackShape,
    format: WeightFormat,
    max_m: usize,
}

/// Pointers per layer in the table (the fields of `l32_decode_layer_weights`, in order).
const TABLE_FIELDS: usize = 12;

/// A device slice's address on `stream`, checked to be on its device and 16-byte aligned, with at least `need`
/// elements. Errors name layer `l`'s field.
fn field_ptr<T>(stream: &Arc<CudaStream>, l: usize, name: &str, slice: &CudaSlice<T>, need: usize) -> Result<u64> {
    const OP: &str = "decode_layers table";
    super::check_same_device(OP, stream, &[(name, slice.stream())])?;
    if slice.len() < need {
        return Err(Error::Backend(format!("{OP}: layer {l} `{name}` has {} elements, needs {need}", slice.len())));
    }
    let (ptr, _guard) = slice.device_ptr(stream);
    if ptr % 16 != 0 {
        return Err(Error::Backend(format!("{OP}: layer {l} `{name}` at {ptr:#x} is not 16-byte aligned")));
    }
    Ok(ptr)
}

/// The addresses of a W4A16 projection `[n, k]` (its int4 tiles, then its scales) of layer `l`, checked: W4A16,
/// symmetric, the shape, and for gate_up (`paired`) the paired layout.
fn w4a16_ptrs(
    stream: &Arc<CudaStream>,
    l: usize,
    name: &str,
    q: &super::quant::CudaQuantLinear,
    (n, k, paired): (usize, usize, bool),
) -> Result<(u64, u64)> {
    const OP: &str = "decode_layers table";
    let fail = |why: &str| Err(Error::Backend(format!("{OP}: layer {l} `{name}` {why}")));
    if q.is_w4a8() {
        return fail("is W4A8; the stack takes bf16 or W4A16 projections");
    }
    if q.has_zeros() {
        return fail("has zero points; the stack takes symmetric W4A16 weights");
    }
    if q.n() != n || q.k() != k {
        return fail(&format!("is [{}, {}], expected [{n}, {k}]", q.n(), q.k()));
    }
    if paired && !q.swiglu_paired() {
        return fail("was not uploaded with its gate and up rows paired");
    }
    let (qweight, scales) = q.w4a16_parts();
    let tiles = super::quant::padded_n(n) / 16 * (k / super::quant::TILE_K);
    let w = field_ptr(stream, l, name, qweight, tiles * 512)?;
    let s = field_ptr(stream, l, name, scales, tiles * 64)?;
    Ok((w, s))
}

impl LayerTable {
    /// Checks every layer's tensors against `shape` and uploads their addresses.
    ///
    /// # Safety
    /// The table holds raw device addresses: every slice must stay allocated, unmoved, for as long as the table is
    /// launched with, and the caches must not be used by other work running at the same time as a launch.
    pub unsafe fn new(stream: &Arc<CudaStream>, shape: StackShape, layers: &[StackLayer<'_>]) -> Result<Self> {
        const OP: &str = "decode_layers table";
        if let Some(why) = shape.unsupported() {
            return Err(Error::Backend(format!("{OP}: unsupported model shape: {why}")));
        }
        if layers.is_empty() || layers.len() > i32::MAX as usize {
            return Err(Error::Backend(format!("{OP}: {} layers", layers.len())));
        }
        let format = layers[0].weights.format();
        if let Some(why) = shape.unsupported_for(format) {
            return Err(Error::Backend(format!("{OP}: unsupported model shape: {why}")));
        }
        let (h, i, qkv, q) = (shape.hidden, shape.inter, shape.qkv(), shape.q_dim());
        let slots = shape.num_slots * shape.layout.num_kv_heads * shape.layout.head_dim;
        let mut words = Vec::with_capacity(layers.len() * TABLE_FIELDS);
        for (l, layer) in layers.iter().enumerate() {
            if layer.weights.format() != format {
                return Err(Error::Backend(format!(
                    "{OP}: layer {l} has {:?} projections, layer 0 {format:?}; the stack takes one format",
                    layer.weights.format()
                )));
            }
            // Fields in l32_decode_layer_weights' order: attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down,
            // k_cache, v_cache, then the four W4A16 scale pointers (0 for bf16).
            let attn_norm = field_ptr(stream, l, "attn_norm", layer.attn_norm, h)?;
            let mlp_norm = field_ptr(stream, l, "mlp_norm", layer.mlp_norm, h)?;
            let (w, s) = match &layer.weights {
                StackWeights::Bf16 { qkv: wqkv, o, gate_up, down } => (
                    [
                        field_ptr(stream, l, "wqkv", wqkv, qkv * h)?,
                        field_ptr(stream, l, "wo", o, h * q)?,
                        field_ptr(stream, l, "w_gate_up", gate_up, 2 * i * h)?,
                        field_ptr(stream, l, "w_down", down, h * i)?,
                    ],
                    [0; 4],
                ),
                StackWeights::W4A16 { qkv: wqkv, o, gate_up, down } => {
                    let parts = [
                        w4a16_ptrs(stream, l, "wqkv", wqkv, (qkv, h, false))?,
                        w4a16_ptrs(stream, l, "wo", o, (h, q, false))?,
                        w4a16_ptrs(stream, l, "w_gate_up", gate_up, (2 * i, h, true))?,
                        w4a16_ptrs(stream, l, "w_down", down, (h, i, false))?,
                    ];
                    (parts.map(|p| p.0), parts.map(|p| p.1))
                }
            };
            let k_cache = field_ptr(stream, l, "k_cache", layer.k_cache, slots)?;
            let v_cache = field_ptr(stream, l, "v_cache", layer.v_cache, slots)?;
            words.extend([attn_norm, w[0], w[1], mlp_norm, w[2], w[3], k_cache, v_cache]);
            words.extend(s);
        }
        use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN;
        let smem = stream
            .context()
            .attribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(|e| Error::Backend(format!("{OP}: querying the shared memory per block: {e}")))?;
        let max_m = max_sequences(&shape, smem.max(0) as usize);
        if max_m == 0 {
            return Err(Error::Backend(format!("{OP}: {smem} bytes of shared memory per block are too few")));
        }
        let mut buf = stream.alloc_zeros::<u64>(words.len()).map_err(|e| Error::Backend(format!("{OP}: {e}")))?;
        stream.memcpy_htod(&words, &mut buf).map_err(|e| Error::Backend(format!("{OP}: upload: {e}")))?;
        Ok(LayerTable { buf, layers: layers.len(), shape, format, max_m })
    }

    /// The projections' format.
    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// The most sequences one launch takes on this device (its shared memory per block bounds the staged rows).
    pub fn max_m(&self) -> usize {
        self.max_m
    }

    /// Decoder layers in the table.
    pub fn num_layers(&self) -> usize {
        self.layers
    }

    /// The shape the table was checked against.
    pub fn shape(&self) -> &StackShape {
        &self.shape
    }
}

/// The stack's own device state: the grid barrier's counter, the norm prologue's counter and the split merge's
/// counters, zeroed once; every launch leaves them fit for the next (so a CUDA graph can replay it). With timing
/// on ([`enable_timing`](Self::enable_timing)), also the phase timestamps of the last launch.
pub struct StackScratch {
    #[cfg_attr(not(llama32_cuda), allow(dead_code))]
    counters: CudaSlice<u32>,
    timer: Option<PhaseTimer>,
}

/// Room for one launch's phase timestamps: `[layers][PHASES][blocks][start, end]`, in ns.
struct PhaseTimer {
    buf: CudaSlice<u64>,
    layers: usize,
    blocks: usize,
}

impl StackScratch {
    /// Counters for up to [`MAX_M`] sequences of `num_kv_heads` kv heads.
    pub fn new(stream: &Arc<CudaStream>, num_kv_heads: usize) -> Result<Self> {
        let counters = stream
            .alloc_zeros::<u32>(3 + MAX_M * num_kv_heads)
            .map_err(|e| Error::Backend(format!("decode_layers scratch: {e}")))?;
        Ok(StackScratch { counters, timer: None })
    }

    fn words(&self) -> usize {
        self.counters.len()
    }

    /// Has later launches time their phases (profiling; [`phase_times`](Self::phase_times)): room for `layers`
    /// layers on a grid of `blocks` blocks (the device's SMs: the stack runs one block per SM). A launch on another
    /// grid writes nothing. A CUDA graph captured before keeps its launch untimed.
    pub fn enable_timing(&mut self, stream: &Arc<CudaStream>, layers: usize, blocks: usize) -> Result<()> {
        if layers == 0 || blocks == 0 || blocks > i32::MAX as usize {
            return Err(Error::Backend(format!("decode_layers timing: {layers} layers of {blocks} blocks")));
        }
        let words = layers * PHASES * blocks * 2;
        let buf = stream.alloc_zeros::<u64>(words).map_err(|e| Error::Backend(format!("decode_layers timing: {e}")))?;
        self.timer = Some(PhaseTimer { buf, layers, blocks });
        Ok(())
    }

    /// Stops timing later launches and frees the timestamps.
    pub fn disable_timing(&mut self) {
        self.timer = None;
    }

    /// True while launches time their phases.
    pub fn timing(&self) -> bool {
        self.timer.is_some()
    }

    /// The phases of the last timed launch (waits for `stream`); `None` when timing is off. An error when no launch
    /// since timing was turned on has written every timestamp (none ran, or on another grid); the timestamps are
    /// zeroed only then, so they are the last complete launch's.
    pub fn phase_times(&self, stream: &Arc<CudaStream>) -> Result<Option<StackPhases>> {
        let Some(t) = &self.timer else {
            return Ok(None);
        };
        let raw = stream.clone_dtoh(&t.buf).map_err(|e| Error::Backend(format!("decode_layers timing: {e}")))?;
        StackPhases::from_raw(&raw, t.layers, t.blocks).map(Some)
    }
}

/// The step's metadata on the device, as the paged decode and the RoPE epilogue read it.
pub struct StackMeta<'a, U, F> {
    /// `[m]` positions (context length minus one).
    pub positions: &'a U,
    /// `[m]` cache slots of the new tokens.
    pub slot_mapping: &'a U,
    /// `[head_dim / 2]` RoPE inverse frequencies.
    pub inv_freq: &'a F,
    /// `[m, max_blocks_per_seq]` block tables.
    pub block_tables: &'a U,
    /// Row length of the block tables.
    pub max_blocks_per_seq: usize,
    /// KV splits per sequence (as [`super::attention::decode_num_splits`] picks them).
    pub num_splits: usize,
}

/// Runs every layer of the table over one decode step of `m` sequences (token s of sequence s), with the recipe's
/// buffers `io` (`m` rows each; see [`LayerBufs`] for what x and delta hold before and after). Enqueued on
/// `stream`; returns without waiting. Errors name the operand at fault.
pub fn decode_layers<X, U, F, W>(
    stream: &Arc<CudaStream>,
    table: &LayerTable,
    m: usize,
    io: LayerBufs<'_, X>,
    meta: &StackMeta<'_, U, F>,
    workspace: &mut W,
    scratch: &mut StackScratch,
) -> Result<()>
where
    X: DevicePtrMut<bf16>,
    U: DevicePtr<u32>,
    F: DevicePtr<f32>,
    W: DevicePtrMut<u8>,
{
    const OP: &str = "decode_layers";
    super::ensure_built()?;
    let s = table.shape;
    let fail = |msg: String| Err(Error::Backend(format!("{OP}: {msg}")));
    if !(1..=MAX_M).contains(&m) {
        return fail(format!("{m} sequences, 1..={MAX_M} are supported"));
    }
    if meta.num_splits == 0 || meta.num_splits > MAX_SPLITS {
        return fail(format!("num_splits is {}, must be in 1..={MAX_SPLITS}", meta.num_splits));
    }
    if meta.max_blocks_per_seq == 0 {
        return fail("max_blocks_per_seq is 0".into());
    }
    let acts = [
        ("x", io.x.len(), s.hidden),
        ("delta", io.delta.len(), s.hidden),
        ("qkv", io.qkv.len(), s.qkv()),
        ("attn", io.attn.len(), s.q_dim()),
        ("act", io.act.len(), s.inter),
    ];
    for (name, have, width) in acts {
        if have < m * width {
            return fail(format!("`{name}` has {have} elements, needs {m} x {width}"));
        }
    }
    for (name, have, need) in [
        ("positions", meta.positions.len(), m),
        ("slot_mapping", meta.slot_mapping.len(), m),
        ("inv_freq", meta.inv_freq.len(), s.layout.head_dim / 2),
        ("block_tables", meta.block_tables.len(), m * meta.max_blocks_per_seq),
    ] {
        if have < need {
            return fail(format!("`{name}` has {have} entries, needs {need}"));
        }
    }
    let ws_need = super::attention::decode_workspace_bytes(&s.layout, m, meta.num_splits);
    if workspace.len() < ws_need {
        return fail(format!("`workspace` has {} bytes, {} splits need {ws_need}", workspace.len(), meta.num_splits));
    }
    if scratch.words() < 3 + m * s.layout.num_kv_heads {
        return fail(format!("the scratch holds counters for fewer than {m} sequences"));
    }
    let operands = [
        ("table", table.buf.stream()),
        ("x", io.x.stream()),
        ("delta", io.delta.stream()),
        ("qkv", io.qkv.stream()),
        ("attn", io.attn.stream()),
        ("act", io.act.stream()),
        ("positions", meta.positions.stream()),
        ("slot_mapping", meta.slot_mapping.stream()),
        ("inv_freq", meta.inv_freq.stream()),
        ("block_tables", meta.block_tables.stream()),
        ("workspace", workspace.stream()),
        ("scratch", scratch.counters.stream()),
    ];
    super::check_same_device(OP, stream, &operands)?;
    // The guards are held until after the launch.
    let (layers, _t) = table.buf.device_ptr(stream);
    let (x, _x) = io.x.device_ptr_mut(stream);
    let (delta, _d) = io.delta.device_ptr_mut(stream);
    let (qkv, _q) = io.qkv.device_ptr_mut(stream);
    let (attn, _a) = io.attn.device_ptr_mut(stream);
    let (act, _c) = io.act.device_ptr_mut(stream);
    let (positions, _p) = meta.positions.device_ptr(stream);
    let (slots, _s) = meta.slot_mapping.device_ptr(stream);
    let (inv_freq, _f) = meta.inv_freq.device_ptr(stream);
    let (tables, _b) = meta.block_tables.device_ptr(stream);
    let (ws, _w) = workspace.device_ptr_mut(stream);
    let (counters, _k) = scratch.counters.device_ptr_mut(stream);
    let (times, timing_blocks, _tg) = match scratch.timer.as_mut() {
        Some(t) if t.layers == table.layers => {
            super::check_same_device(OP, stream, &[("phase times", t.buf.stream())])?;
            let (ptr, guard) = t.buf.device_ptr_mut(stream);
            (ptr, t.blocks, Some(guard))
        }
        Some(t) => {
            return fail(format!("phase timing has room for {} layers, the table has {}", t.layers, table.layers))
        }
        None => (0, 0, None),
    };
    for (name, ptr) in [("x", x), ("delta", delta), ("qkv", qkv), ("attn", attn), ("act", act), ("workspace", ws)] {
        if ptr % 16 != 0 {
            return fail(format!("`{name}` at {ptr:#x} is not 16-byte aligned"));
        }
    }
    let ptrs = StackPtrs {
        layers,
        x,
        delta,
        qkv,
        attn,
        act,
        positions,
        slots,
        inv_freq,
        tables,
        ws,
        counters,
        times,
        timing_blocks,
    };
    launch(OP, stream, table, m, meta, &ptrs)
}

/// The device addresses of one checked launch.
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
struct StackPtrs {
    layers: u64,
    x: u64,
    delta: u64,
    qkv: u64,
    attn: u64,
    act: u64,
    positions: u64,
    slots: u64,
    inv_freq: u64,
    tables: u64,
    ws: u64,
    counters: u64,
    /// Phase timestamps, or 0 when not timed.
    times: u64,
    timing_blocks: usize,
}

#[cfg(llama32_cuda)]
fn launch<U, F>(
    op: &str,
    stream: &CudaStream,
    table: &LayerTable,
    m: usize,
    meta: &StackMeta<'_, U, F>,
    p: &StackPtrs,
) -> Result<()> {
    use super::ffi;
    use std::ffi::c_void;
    let s = table.shape;
    let l = &s.layout;
    // All fit their C types: StackShape::unsupported bounds the sizes, m <= 8, num_splits <= 256.
    let params = ffi::l32_decode_layers_params {
        layers: p.layers as *const ffi::l32_decode_layer_weights,
        x: p.x as *mut c_void,
        delta: p.delta as *mut c_void,
        qkv: p.qkv as *mut c_void,
        attn: p.attn as *mut c_void,
        act: p.act as *mut c_void,
        positions: p.positions as *const u32,
        slot_mapping: p.slots as *const u32,
        inv_freq: p.inv_freq as *const f32,
        block_tables: p.tables as *const u32,
        workspace: if meta.num_splits > 1 { p.ws as *mut c_void } else { std::ptr::null_mut() },
        counters: p.counters as *mut u32,
        num_slots: s.num_slots as i64,
        max_blocks_per_seq: meta.max_blocks_per_seq as i64,
        num_layers: table.layers as i32,
        m: m as i32,
        hidden: s.hidden as i32,
        inter: s.inter as i32,
        num_heads: l.num_heads as i32,
        num_kv_heads: l.num_kv_heads as i32,
        head_dim: l.head_dim as i32,
        block_size: l.block_size as i32,
        num_splits: meta.num_splits as i32,
        eps: s.eps,
        scale: super::attention::softmax_scale(l),
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
        weights: match table.format {
            WeightFormat::Bf16 => ffi::l32_decode_weights::L32_DECODE_WEIGHTS_BF16,
            WeightFormat::W4A16 => ffi::l32_decode_weights::L32_DECODE_WEIGHTS_W4A16,
        },
        phase_times: p.times as *mut u64,
        // StackScratch::enable_timing bounds it by i32::MAX.
        timing_blocks: p.timing_blocks as i32,
    };
    let raw = super::raw_stream(op, stream)?;
    // SAFETY: the table's addresses are live (LayerTable::new's contract) and were checked against the shape; the
    // step's buffers, metadata, workspace and counters are live slices on this stream's device whose lengths
    // decode_layers checked for m sequences, their guards held until after this launch. Metadata values
    // (positions, slots, tables) are the executor's validated step.
    let status = unsafe { ffi::l32_decode_layers(&params, raw) };
    super::check_launch(op, stream, status, || {
        format!("{op} ({} layers, m {m}, {} splits)", table.layers, meta.num_splits)
    })
}

#[cfg(not(llama32_cuda))]
fn launch<U, F>(
    _op: &str,
    _stream: &CudaStream,
    _table: &LayerTable,
    _m: usize,
    _meta: &StackMeta<'_, U, F>,
    _p: &StackPtrs,
) -> Result<()> {
    super::ensure_built()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape_1b() -> StackShape {
        StackShape {
            layout: PagedLayout { num_heads: 32, num_kv_heads: 8, head_dim: 64, block_size: 16 },
            hidden: 2048,
            inter: 8192,
            eps: 1e-5,
            num_slots: 1 << 20,
        }
    }

    #[test]
    fn takes_the_llama_text_shapes_up_to_eight_sequences() {
        let one_b = shape_1b();
        let three_b = StackShape {
            layout: PagedLayout { num_heads: 24, num_kv_heads: 8, head_dim: 128, block_size: 16 },
            hidden: 3072,
            ..one_b
        };
        for s in [one_b, three_b] {
            for f in [WeightFormat::Bf16, WeightFormat::W4A16] {
                assert!((1..=8).all(|m| supports(&s, f, m)));
                assert!(!supports(&s, f, 0) && !supports(&s, f, 9));
            }
            // Staged rows of 8192: all eight on an H100 (227 KB per block), five on an sm_89 (99 KB).
            assert_eq!(max_sequences(&s, 227 * 1024), 8);
            assert_eq!(max_sequences(&s, 99 * 1024), 5);
            assert_eq!(max_sequences(&s, 40 * 1024), 0);
        }
    }

    #[test]
    fn refuses_what_the_kernel_cannot_run_and_says_why() {
        let base = shape_1b();
        let bad = [
            StackShape { layout: PagedLayout { head_dim: 96, ..base.layout }, ..base },
            StackShape { layout: PagedLayout { num_heads: 30, ..base.layout }, ..base },
            StackShape { layout: PagedLayout { num_heads: 136, ..base.layout }, ..base },
            StackShape { hidden: 2047, ..base },
            StackShape { inter: 0, ..base },
            StackShape { num_slots: 0, ..base },
            StackShape { eps: f32::NAN, ..base },
        ];
        for s in bad {
            assert!(!supports(&s, WeightFormat::Bf16, 1), "{s:?}");
            assert!(s.unsupported().is_some_and(|why| !why.is_empty()));
        }
        // W4A16 reads 64-column chunks of every input width; bf16 takes multiples of 8.
        let narrow = StackShape { hidden: 2056, ..base };
        assert!(supports(&narrow, WeightFormat::Bf16, 1));
        assert!(!supports(&narrow, WeightFormat::W4A16, 1));
        assert!(narrow.unsupported_for(WeightFormat::W4A16).is_some_and(|why| why.contains("hidden size 2056")));
        let narrow_inter = StackShape { inter: 8200, ..base };
        assert!(narrow_inter.unsupported_for(WeightFormat::W4A16).is_some_and(|why| why.contains("intermediate")));
    }
}
