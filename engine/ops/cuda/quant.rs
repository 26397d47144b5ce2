//! CUDA 4-bit projections (`kernels/quant/*.cu`, families `w4a16`, `w4a8`, `act_quant`): the load-time weight
//! layout, the device-side [`CudaQuantLinear`], and checked wrappers of the kernels.
//!
//! - **W4A16** ([`w4a16_gemm`], m <= 64): int4 weights streamed once, dequantized in registers into the bf16
//!   tensor-core MMA, group scales applied in f32 after each group's MMAs (so the products are exact and the only
//!   roundings are f32 sums and the final bf16), split-K over 64-column chunks with a deterministic in-kernel
//!   reduction. For more rows the executor calls [`w4a16_dequant`] into a bf16 scratch and cuBLASLt: that path
//!   multiplies by the bf16-rounded weights `bf16(s * q)` (up to 2^-9 relative per weight), the decode path by the
//!   exact `s * q`. CPU twin: [`crate::ops::cpu::linear::linear`] over [`QuantMatrix::dequantize`].
//! - **W4A8** ([`w4a8_gemm`]): torchao 8da4w on the int8 tensor cores (`mma.sync m16n8k32 s8`): int8 per-token
//!   activations from [`act_quant`] (alone or fused into RMSNorm / residual add + RMSNorm / SiLU * up), s32 sums per
//!   group of 32, scaled in f32. CPU twin: [`crate::ops::cpu::quant::w4a8_linear`]; the integer parts agree exactly,
//!   the f32 scaling differs only in summation order (the activation zero point is removed once per output through
//!   a precomputed per-row constant instead of once per group).
//! - **Activation quantization** ([`act_quant`]): bit-identical to
//!   [`crate::quant::numerics::quantize_activations`] applied to the bf16 values the unfused kernel would write.
//!
//! # Layout
//! [`layout_w4a16`] / [`layout_w4a8`] reorder a [`QuantMatrix`] into tiles of 16 rows x 64 columns, 512 bytes,
//! lane-major, in the register order of the MMA fragments (documented in `kernels/quant/common.cuh`); scales (bf16
//! for W4A16, f32 for W4A8) and zero points follow the same tiles. `k` must be a multiple of 64 and the group a
//! multiple of 32 (a group of 64 or 128, as in GPTQ/AWQ checkpoints, is stored as 2 or 4 groups of 32 with the same
//! scale: exact). W4A16 scales are stored as bf16: this engine's scales are bf16 values already; the fp16 scales
//! of Hugging Face formats are rounded to bf16 (8 significant bits) on upload.
//!
//! # Resources (ptxas, CUDA 13.0, sm_90a; no spills, no stack frame)
//! `w4a16_kernel` (128 threads): 52-66 registers for m <= 8, 88-94 for m <= 32, 158 for m <= 64.
//! `w4a8_kernel` (256 threads): 176 / 205 registers (symmetric / zero points) and 40.7 KB shared memory for the
//! 128-token tile, 48-77 registers and 17.7-22.3 KB for the decode tiles. `act_quant_kernel`: 25-39 registers.
//!
//! In a build without CUDA the wrappers return `Error::Backend("built without CUDA ...")`; the host-side layout
//! functions and heuristics work everywhere.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, SyncOnDrop};
use half::bf16;

use crate::quant::{ActQuant, QuantLinear, QuantMatrix, Scheme};
use crate::{Error, Result};

/// The most rows of `x` [`w4a16_gemm`] takes (the executor uses dequantize + cuBLASLt above).
pub const MAX_DECODE_M: usize = 64;
/// Columns per tile of the layout (two groups of 32).
pub const TILE_K: usize = 64;
/// Rows per tile of the layout.
pub const TILE_N: usize = 16;
/// The group size the kernels work in.
pub const KERNEL_GROUP: usize = 32;
/// Largest `k` the kernels take.
const MAX_K: usize = 1 << 24;
/// Largest `n` the kernels take.
const MAX_N: usize = (i32::MAX as usize) - 128;
/// Most K splits the heuristics pick.
const MAX_SPLITS: usize = 32;
/// Rows of `n` per W4A16 block (4 warps x 16) and per W4A8 block.
const W4A16_BLOCK_N: usize = 64;
const W4A8_BLOCK_N: usize = 128;

/// True when the kernels take a matrix with `k` columns in groups of `group`: `k` a positive multiple of 64 (up to
/// 2^24) and `group` a positive multiple of 32 that divides `k`.
pub fn supports(k: usize, group: usize) -> bool {
    k > 0 && k % TILE_K == 0 && k <= MAX_K && group > 0 && group % KERNEL_GROUP == 0 && k % group == 0
}

/// Rows padded to a multiple of 16.
pub fn padded_n(n: usize) -> usize {
    n.div_ceil(TILE_N) * TILE_N
}

/// Nibble position (0..8) of column offset `i` (0..8) inside a W4A16 word: pairs of columns share the two 16-bit
/// halves (see `kernels/quant/common.cuh`).
fn nibble_w4a16(i: usize) -> usize {
    (i >> 1) + 4 * (i & 1)
}

/// Nibble position of column offset `i` inside a W4A8 word: columns 0..4 in the low nibbles of the four bytes,
/// 4..8 in the high nibbles.
fn nibble_w4a8(i: usize) -> usize {
    if i < 4 {
        2 * i
    } else {
        2 * (i - 4) + 1
    }
}

/// Checks that the kernels take `m` (shape, value ranges, buffer lengths).
fn check_matrix(m: &QuantMatrix) -> Result<()> {
    let fail = |msg: String| Err(Error::request(format!("quantized [{}, {}] matrix: {msg}", m.n, m.k)));
    if !supports(m.k, m.group) {
        return fail(format!(
            "the CUDA kernels need k a multiple of 64 (up to 2^24) and a group a multiple of 32 dividing k; \
             k is {}, group {}",
            m.k, m.group
        ));
    }
    if m.n > MAX_N {
        return fail(format!("n is {}, at most {MAX_N} is supported", m.n));
    }
    if m.q.len() != m.n * m.k {
        return fail(format!("q has {} values, expected {}", m.q.len(), m.n * m.k));
    }
    let groups = m.n * (m.k / m.group);
    if m.scales.len() != groups {
        return fail(format!("{} scales, expected {groups}", m.scales.len()));
    }
    if let Some(i) = m.q.iter().position(|q| !(-8..=7).contains(q)) {
        return fail(format!("q[{i}] = {} is outside the int4 range [-8, 7]", m.q[i]));
    }
    if let Some(i) = m.scales.iter().position(|s| !s.is_finite()) {
        return fail(format!("scale {i} is {}", m.scales[i]));
    }
    if let Some(z) = &m.zeros {
        if z.len() != groups {
            return fail(format!("{} zero points, expected {groups}", z.len()));
        }
        if let Some(i) = z.iter().position(|z| !(-8..=7).contains(z)) {
            return fail(format!("zero point {i} = {} is outside [-8, 7]", z[i]));
        }
    }
    Ok(())
}

/// The scale and zero point of row `r`, column `c` (0 for the padding rows `r >= n`).
fn group_params(m: &QuantMatrix, r: usize, c: usize) -> (f32, i8) {
    if r >= m.n {
        return (0.0, 0);
    }
    let gi = r * (m.k / m.group) + c / m.group;
    (m.scales[gi], m.zeros.as_ref().map_or(0, |z| z[gi]))
}

/// The 512-byte tiles of `m` with the given nibble order.
fn pack_tiles(m: &QuantMatrix, nibble: fn(usize) -> usize) -> Vec<u8> {
    let (n_pad, k) = (padded_n(m.n), m.k);
    let kc = k / TILE_K;
    let mut out = vec![0u8; n_pad / TILE_N * kc * 512];
    for (tile, chunk) in out.chunks_exact_mut(512).enumerate() {
        let (nt, c) = (tile / kc, tile % kc);
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            for word in 0..4 {
                let row = nt * TILE_N + g + 8 * (word & 1);
                let col0 = c * TILE_K + 32 * (word >> 1) + 8 * t;
                let mut w = 0u32;
                if row < m.n {
                    for i in 0..8 {
                        let q = m.q[row * k + col0 + i] as u8 & 0xF;
                        w |= u32::from(q) << (4 * nibble(i));
                    }
                }
                chunk[lane * 16 + word * 4..][..4].copy_from_slice(&w.to_le_bytes());
            }
        }
    }
    out
}

/// The per-tile entries of a per-(row, group-of-32) quantity: for tile (nt, c) and lane group g, the values of
/// (row g, group 2c), (row g, group 2c+1), (row g+8, group 2c), (row g+8, group 2c+1).
fn pack_entries<T: Copy>(m: &QuantMatrix, value: impl Fn(usize, usize) -> T) -> Vec<T> {
    let kc = m.k / TILE_K;
    let tiles = padded_n(m.n) / TILE_N * kc;
    let mut out = Vec::with_capacity(tiles * 32);
    for tile in 0..tiles {
        let (nt, c) = (tile / kc, tile % kc);
        for g in 0..8 {
            for e in 0..4 {
                let row = nt * TILE_N + g + 8 * (e >> 1);
                let col = c * TILE_K + 32 * (e & 1);
                out.push(value(row, col));
            }
        }
    }
    out
}

/// A W4A16 matrix in the kernels' layout, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostW4A16 {
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// The int4 tiles.
    pub qweight: Vec<u8>,
    /// The bf16 scales, per tile entry.
    pub scales: Vec<bf16>,
    /// The bf16 biases `136 + z`, per tile entry; `None` for symmetric weights.
    pub zeros: Option<Vec<bf16>>,
}

/// Reorders `m` for the W4A16 kernels (see the module docs). Errors name what the kernels cannot take.
pub fn layout_w4a16(m: &QuantMatrix) -> Result<HostW4A16> {
    check_matrix(m)?;
    let scales = pack_entries(m, |r, c| bf16::from_f32(group_params(m, r, c).0));
    let zeros =
        m.zeros.as_ref().map(|_| pack_entries(m, |r, c| bf16::from_f32(136.0 + group_params(m, r, c).1 as f32)));
    Ok(HostW4A16 { n: m.n, k: m.k, qweight: pack_tiles(m, nibble_w4a16), scales, zeros })
}

/// A W4A8 matrix in the kernels' layout, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostW4A8 {
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// The int4 tiles.
    pub qweight: Vec<u8>,
    /// The f32 scales per tile entry: `s / 16` for symmetric weights (the kernel multiplies `16 q`), `s` otherwise.
    pub scales: Vec<f32>,
    /// The bytes `8 + z` per tile entry; `None` for symmetric weights.
    pub zeros: Option<Vec<u8>>,
    /// `[n_pad]`: `sum_g s[r, g] * sum_{c in g} (q[r, c] - z[r, g])`, summed in f64, rounded once.
    pub row_corr: Vec<f32>,
}

/// Reorders `m` for the W4A8 kernels (see the module docs). Errors name what the kernels cannot take.
pub fn layout_w4a8(m: &QuantMatrix) -> Result<HostW4A8> {
    check_matrix(m)?;
    let div = if m.zeros.is_some() { 1.0 } else { 16.0 };
    let scales = pack_entries(m, |r, c| group_params(m, r, c).0 / div);
    let zeros = m.zeros.as_ref().map(|_| pack_entries(m, |r, c| (8 + group_params(m, r, c).1) as u8));
    let mut row_corr = vec![0.0f32; padded_n(m.n)];
    let groups = m.k / m.group;
    for (r, corr) in row_corr.iter_mut().enumerate().take(m.n) {
        let mut acc = 0.0f64;
        for gi in 0..groups {
            let (s, z) = group_params(m, r, gi * m.group);
            let sum: i64 = m.q[r * m.k + gi * m.group..][..m.group].iter().map(|&q| i64::from(q) - i64::from(z)).sum();
            acc += f64::from(s) * sum as f64;
        }
        *corr = acc as f32;
    }
    Ok(HostW4A8 { n: m.n, k: m.k, qweight: pack_tiles(m, nibble_w4a8), scales, zeros, row_corr })
}

fn bytes_of_bf16(v: &[bf16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
}

fn bytes_of_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A quantized projection on the device, in the kernels' layout for its scheme.
pub struct CudaQuantLinear {
    scheme: Scheme,
    n: usize,
    k: usize,
    has_zeros: bool,
    qweight: CudaSlice<u8>,
    /// bf16 (W4A16) or f32 (W4A8) entries, as bytes.
    scales: CudaSlice<u8>,
    zeros: Option<CudaSlice<u8>>,
    /// W4A8 only.
    row_corr: Option<CudaSlice<f32>>,
}

impl CudaQuantLinear {
    /// Reorders `w` for its scheme and uploads it on `stream`.
    pub fn upload(stream: &Arc<CudaStream>, w: &QuantLinear) -> Result<Self> {
        let up_err = |e: cudarc::driver::DriverError| Error::Backend(format!("upload quantized weights: {e}"));
        let m = &w.matrix;
        match w.scheme.act {
            ActQuant::None => {
                let h = layout_w4a16(m)?;
                Ok(CudaQuantLinear {
                    scheme: w.scheme,
                    n: m.n,
                    k: m.k,
                    has_zeros: h.zeros.is_some(),
                    qweight: stream.clone_htod(&h.qweight).map_err(up_err)?,
                    scales: stream.clone_htod(&bytes_of_bf16(&h.scales)).map_err(up_err)?,
                    zeros: h.zeros.map(|z| stream.clone_htod(&bytes_of_bf16(&z))).transpose().map_err(up_err)?,
                    row_corr: None,
                })
            }
            ActQuant::Int8PerToken => {
                let h = layout_w4a8(m)?;
                Ok(CudaQuantLinear {
                    scheme: w.scheme,
                    n: m.n,
                    k: m.k,
                    has_zeros: h.zeros.is_some(),
                    qweight: stream.clone_htod(&h.qweight).map_err(up_err)?,
                    scales: stream.clone_htod(&bytes_of_f32(&h.scales)).map_err(up_err)?,
                    zeros: h.zeros.map(|z| stream.clone_htod(&z)).transpose().map_err(up_err)?,
                    row_corr: Some(stream.clone_htod(&h.row_corr).map_err(up_err)?),
                })
            }
        }
    }

    /// The scheme (group size and activation mode) it was quantized with.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// True for W4A8 (int8 activations).
    pub fn is_w4a8(&self) -> bool {
        self.scheme.act == ActQuant::Int8PerToken
    }

    /// True when the weights have zero points (asymmetric Hugging Face formats).
    pub fn has_zeros(&self) -> bool {
        self.has_zeros
    }

    /// Device bytes held (weights, scales, zero points, row constants).
    pub fn device_bytes(&self) -> usize {
        self.qweight.len()
            + self.scales.len()
            + self.zeros.as_ref().map_or(0, |z| z.len())
            + self.row_corr.as_ref().map_or(0, |r| r.len() * 4)
    }
}

/// The split-K workspace: f32 partials and per-tile arrival counters (zeroed once; every launch leaves them zeroed).
pub struct SplitKWorkspace {
    partials: CudaSlice<f32>,
    counters: CudaSlice<u32>,
    sms: usize,
}

impl SplitKWorkspace {
    /// A workspace of `partials` f32 values and `counters` counters, for a device with `sms` multiprocessors.
    pub fn new(stream: &Arc<CudaStream>, partials: usize, counters: usize, sms: usize) -> Result<Self> {
        let err = |e: cudarc::driver::DriverError| Error::Backend(format!("allocate split-K workspace: {e}"));
        Ok(SplitKWorkspace {
            partials: stream.alloc_zeros::<f32>(partials.max(1)).map_err(err)?,
            counters: stream.alloc_zeros::<u32>(counters.max(1)).map_err(err)?,
            sms: sms.max(1),
        })
    }

    /// The SM count the split heuristics use.
    pub fn sms(&self) -> usize {
        self.sms
    }

    /// `(partials, counters)` it holds.
    pub fn capacity(&self) -> (usize, usize) {
        (self.partials.len(), self.counters.len())
    }

    /// True when the workspace holds `need = (partials, counters)`.
    pub fn holds(&self, need: (usize, usize)) -> bool {
        self.partials.len() >= need.0 && self.counters.len() >= need.1
    }
}

/// K splits of the W4A16 decode kernel for `n` x `k` on `sms` SMs: enough 128-thread blocks for about 4 per SM,
/// with at least two 64-column chunks per split. 1B (132 SMs): qkv 11, o 16, gate_up 3, down 17; 11B gate_up 2;
/// 90B gate_up 1, down 5.
pub fn w4a16_splits(n: usize, k: usize, sms: usize) -> usize {
    let blocks = padded_n(n).div_ceil(W4A16_BLOCK_N).max(1);
    let chunks = (k / TILE_K).max(1);
    let cap = (chunks / 2).clamp(1, MAX_SPLITS);
    (4 * sms).div_ceil(blocks).clamp(1, cap)
}

/// `(partials, counters)` the W4A16 decode kernel needs at `m` rows.
pub fn w4a16_workspace(m: usize, n: usize, k: usize, sms: usize) -> (usize, usize) {
    let splits = w4a16_splits(n, k, sms);
    if splits == 1 {
        return (0, 0);
    }
    (splits * m * padded_n(n), padded_n(n).div_ceil(W4A16_BLOCK_N))
}

/// The W4A8 launch shape: tokens per block and K splits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct W4A8Plan {
    /// Tokens per block: 8, 16, 32 (decode tiles) or 128.
    pub tile_m: usize,
    /// K splits.
    pub splits: usize,
}

/// The W4A8 launch shape for `m` x `n` x `k` on `sms` SMs: the smallest token tile that covers m <= 32, else 128;
/// K splits only while the grid is smaller than the SM count (about two 256-thread blocks per SM then), with at
/// least two 64-column chunks per split.
pub fn w4a8_plan(m: usize, n: usize, k: usize, sms: usize) -> W4A8Plan {
    let tile_m = match m {
        0..=8 => 8,
        9..=16 => 16,
        17..=32 => 32,
        _ => 128,
    };
    let blocks = padded_n(n).div_ceil(W4A8_BLOCK_N).max(1) * m.div_ceil(tile_m).max(1);
    let chunks = (k / TILE_K).max(1);
    let cap = (chunks / 2).clamp(1, MAX_SPLITS);
    let splits = if blocks >= sms { 1 } else { (2 * sms).div_ceil(blocks).clamp(1, cap) };
    W4A8Plan { tile_m, splits }
}

/// `(partials, counters)` the W4A8 kernel needs at `m` rows.
pub fn w4a8_workspace(m: usize, n: usize, k: usize, sms: usize) -> (usize, usize) {
    let plan = w4a8_plan(m, n, k, sms);
    if plan.splits == 1 {
        return (0, 0);
    }
    (plan.splits * m * padded_n(n), padded_n(n).div_ceil(W4A8_BLOCK_N) * m.div_ceil(plan.tile_m))
}

/// The largest `(partials, counters)` either kernel needs for a `n` x `k` projection at up to `max_m` rows
/// (the W4A16 decode kernel at up to 64 rows, W4A8 at any row count up to `max_m`).
pub fn workspace_bound(w4a8: bool, max_m: usize, n: usize, k: usize, sms: usize) -> (usize, usize) {
    let mut need = (0, 0);
    let mut take = |(p, c): (usize, usize)| need = (need.0.max(p), need.1.max(c));
    if !w4a8 {
        take(w4a16_workspace(max_m.min(MAX_DECODE_M), n, k, sms));
        return need;
    }
    // Splits depend on m only through ceil(m / tile_m): the largest m of each tile count bounds the need.
    for m in 1..=max_m.min(32) {
        take(w4a8_workspace(m, n, k, sms));
    }
    let mut m = 128;
    while m < max_m + 128 {
        take(w4a8_workspace(m.min(max_m.max(1)), n, k, sms));
        m += 128;
    }
    need
}

/// Int8 activations with their per-row scales and zero points, the output of [`act_quant`] and the input of
/// [`w4a8_gemm`]. Rows are `k` long and contiguous; the buffers hold up to `rows` rows of up to `k` columns.
pub struct QuantActs {
    /// `[rows, k]` int8.
    pub q: CudaSlice<i8>,
    /// `[rows]` f32 scales.
    pub scales: CudaSlice<f32>,
    /// `[rows]` i32 zero points.
    pub zeros: CudaSlice<i32>,
}

impl QuantActs {
    /// Buffers for `rows` rows of up to `k` columns.
    pub fn new(stream: &Arc<CudaStream>, rows: usize, k: usize) -> Result<Self> {
        let err = |e: cudarc::driver::DriverError| Error::Backend(format!("allocate int8 activations: {e}"));
        Ok(QuantActs {
            q: stream.alloc_zeros::<i8>((rows * k).max(1)).map_err(err)?,
            scales: stream.alloc_zeros::<f32>(rows.max(1)).map_err(err)?,
            zeros: stream.alloc_zeros::<i32>(rows.max(1)).map_err(err)?,
        })
    }

    /// True when the buffers hold `rows` rows of `k` columns.
    pub fn holds(&self, rows: usize, k: usize) -> bool {
        self.q.len() >= rows * k && self.scales.len() >= rows && self.zeros.len() >= rows
    }
}

/// What [`act_quant`] quantizes: a row as it is, or the output of the kernel it is fused into.
pub enum ActSource<'a> {
    /// `[rows, hidden]` bf16 rows.
    Rows(CudaView<'a, bf16>),
    /// `rms_norm(x)` with `weight` `[hidden]` (the values of [`super::norm::rms_norm`]).
    RmsNorm {
        /// `[rows, hidden]`.
        x: CudaView<'a, bf16>,
        /// `[hidden]`.
        weight: CudaView<'a, bf16>,
        /// `>= 0`.
        eps: f32,
    },
    /// `residual += delta; rms_norm(residual)` (the values of [`super::norm::add_rms_norm`]; `residual` updated).
    AddRmsNorm {
        /// `[rows, hidden]`, read and written.
        residual: CudaViewMut<'a, bf16>,
        /// `[rows, hidden]`.
        delta: CudaView<'a, bf16>,
        /// `[hidden]`.
        weight: CudaView<'a, bf16>,
        /// `>= 0`.
        eps: f32,
    },
    /// `silu(gate) * up` of a fused `[rows, 2 * hidden]` input (the values of [`super::activation::silu_mul`]).
    SiluMul(CudaView<'a, bf16>),
}

/// Quantizes `rows` rows of `hidden` values from `src` into `acts` (per-token asymmetric int8, torchao numerics;
/// bit-identical to `quantize_activations` on the bf16 values). When `out` is given, the bf16 values are also
/// written there (`[rows, hidden]`). `hidden` must be a multiple of 8.
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
pub fn act_quant(
    stream: &CudaStream,
    src: ActSource<'_>,
    rows: usize,
    hidden: usize,
    acts: &mut QuantActs,
    out: Option<&mut CudaViewMut<'_, bf16>>,
) -> Result<()> {
    const OP: &str = "act_quant";
    super::ensure_built()?;
    let fail = |msg: String| Err(Error::Backend(format!("{OP}: {msg}")));
    if hidden == 0 || hidden % 8 != 0 || hidden > 1 << 30 {
        return fail(format!("hidden is {hidden}, must be a positive multiple of 8 up to 2^30"));
    }
    if rows > i32::MAX as usize {
        return fail(format!("{rows} rows, at most 2^31-1 are supported"));
    }
    if !acts.holds(rows, hidden) {
        return fail(format!("the int8 buffers hold fewer than {rows} rows x {hidden}"));
    }
    let len = rows * hidden;
    let need = |name: &str, have: usize, want: usize| {
        if have >= want {
            Ok(())
        } else {
            fail(format!("`{name}` has {have} elements, needs at least {want}"))
        }
    };
    if let Some(o) = &out {
        need("out", o.len(), len)?;
    }
    let (op, eps) = match &src {
        ActSource::Rows(x) => {
            need("x", x.len(), len)?;
            (0, 0.0)
        }
        ActSource::RmsNorm { x, weight, eps } => {
            need("x", x.len(), len)?;
            need("weight", weight.len(), hidden)?;
            (1, *eps)
        }
        ActSource::AddRmsNorm { residual, delta, weight, eps } => {
            need("residual", residual.len(), len)?;
            need("delta", delta.len(), len)?;
            need("weight", weight.len(), hidden)?;
            (2, *eps)
        }
        ActSource::SiluMul(gate_up) => {
            need("gate_up", gate_up.len(), 2 * len)?;
            (3, 0.0)
        }
    };
    if !(eps >= 0.0 && eps.is_finite()) {
        return fail(format!("eps is {eps}, must be finite and >= 0"));
    }
    let mut src = src;
    let (q, _q) = acts.q.device_ptr_mut(stream);
    let (scales, _s) = acts.scales.device_ptr_mut(stream);
    let (zeros, _z) = acts.zeros.device_ptr_mut(stream);
    let out_ptr = out.map(|o| o.device_ptr_mut(stream));
    // The stream guards of the inputs, held until after the launch.
    let mut guards: Vec<SyncOnDrop<'_>> = Vec::with_capacity(3);
    let mut take = |(p, g)| {
        guards.push(g);
        p
    };
    let (x, residual, weight) = match &mut src {
        ActSource::Rows(x) => (take(x.device_ptr(stream)), 0, 0),
        ActSource::RmsNorm { x, weight, .. } => (take(x.device_ptr(stream)), 0, take(weight.device_ptr(stream))),
        ActSource::AddRmsNorm { residual, delta, weight, .. } => {
            (take(delta.device_ptr(stream)), take(residual.device_ptr_mut(stream)), take(weight.device_ptr(stream)))
        }
        ActSource::SiluMul(gate_up) => (take(gate_up.device_ptr(stream)), 0, 0),
    };
    let l = ActQuantLaunch {
        q,
        scales,
        zeros,
        out: out_ptr.as_ref().map_or(0, |(p, _)| *p),
        x,
        residual,
        weight,
        rows,
        hidden,
        eps,
        op,
    };
    launch_act_quant(OP, stream, &l)
}

/// `out[m, n] = x[m, k] @ dequant(w)^T` for a W4A16 `w` and `m` in `1..=64` (see the module docs), using `ws` for
/// split-K. `x` and `w` must be on `stream`'s device; `out` must not overlap `x`.
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
pub fn w4a16_gemm(
    stream: &CudaStream,
    x: &impl DevicePtr<bf16>,
    w: &CudaQuantLinear,
    m: usize,
    ws: &mut SplitKWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    const OP: &str = "w4a16_gemm";
    super::ensure_built()?;
    let fail = |msg: String| Err(Error::Backend(format!("{OP}: {msg}")));
    if w.is_w4a8() {
        return fail("the weight is W4A8 (use w4a8_gemm)".into());
    }
    let (n, k) = (w.n, w.k);
    if !(1..=MAX_DECODE_M).contains(&m) {
        return fail(format!("m is {m}, must be in 1..={MAX_DECODE_M} (dequantize + GEMM above)"));
    }
    if x.len() < m * k {
        return fail(format!("`x` has {} elements, needs at least {m} x {k}", x.len()));
    }
    if out.len() < m * n {
        return fail(format!("`out` has {} elements, needs at least {m} x {n}", out.len()));
    }
    super::check_same_device(OP, stream, &[("x", x.stream()), ("out", out.stream()), ("w", w.qweight.stream())])?;
    if n == 0 {
        return Ok(());
    }
    let splits = w4a16_splits(n, k, ws.sms);
    let need = w4a16_workspace(m, n, k, ws.sms);
    if !ws.holds(need) {
        return fail(format!("the split-K workspace holds fewer than {} partials / {} counters", need.0, need.1));
    }
    let (xp, _x) = x.device_ptr(stream);
    if xp % 16 != 0 {
        return fail(format!("`x` starts at {xp:#x}, not 16-byte aligned"));
    }
    let (qweight, _q) = w.qweight.device_ptr(stream);
    let (scales, _s) = w.scales.device_ptr(stream);
    let zeros = w.zeros.as_ref().map(|z| z.device_ptr(stream));
    let (partials, _p) = ws.partials.device_ptr_mut(stream);
    let (counters, _c) = ws.counters.device_ptr_mut(stream);
    let (outp, _o) = out.device_ptr_mut(stream);
    let l = GemmLaunch {
        out: outp,
        x: xp,
        x_scales: 0,
        x_zeros: 0,
        qweight,
        scales,
        zeros: zeros.as_ref().map_or(0, |(p, _)| *p),
        row_corr: 0,
        partials,
        counters,
        m,
        n,
        k,
        splits,
        tile_m: 0,
    };
    launch_w4a16(OP, stream, &l)
}

/// `out[n, k] = bf16(s * (q - z))`: the W4A16 weight dequantized (for the large-m path through cuBLASLt).
///
/// Enqueued on `stream`; returns without waiting.
pub fn w4a16_dequant(stream: &CudaStream, w: &CudaQuantLinear, out: &mut impl DevicePtrMut<bf16>) -> Result<()> {
    const OP: &str = "w4a16_dequant";
    super::ensure_built()?;
    if w.is_w4a8() {
        return Err(Error::Backend(format!("{OP}: the weight is W4A8")));
    }
    if out.len() < w.n * w.k {
        return Err(Error::Backend(format!(
            "{OP}: `out` has {} elements, needs at least {} x {}",
            out.len(),
            w.n,
            w.k
        )));
    }
    super::check_same_device(OP, stream, &[("out", out.stream()), ("w", w.qweight.stream())])?;
    let (qweight, _q) = w.qweight.device_ptr(stream);
    let (scales, _s) = w.scales.device_ptr(stream);
    let zeros = w.zeros.as_ref().map(|z| z.device_ptr(stream));
    let (outp, _o) = out.device_ptr_mut(stream);
    if outp % 16 != 0 {
        return Err(Error::Backend(format!("{OP}: `out` starts at {outp:#x}, not 16-byte aligned")));
    }
    let l = GemmLaunch {
        out: outp,
        x: 0,
        x_scales: 0,
        x_zeros: 0,
        qweight,
        scales,
        zeros: zeros.as_ref().map_or(0, |(p, _)| *p),
        row_corr: 0,
        partials: 0,
        counters: 0,
        m: 0,
        n: w.n,
        k: w.k,
        splits: 1,
        tile_m: 0,
    };
    launch_dequant(OP, stream, &l)
}

/// `out[m, n]` = the W4A8 product of the int8 rows in `acts` (from [`act_quant`]) and `w` (see the module docs),
/// using `ws` for split-K.
///
/// Enqueued on `stream`; returns without waiting. Errors name the operand at fault.
pub fn w4a8_gemm(
    stream: &CudaStream,
    acts: &QuantActs,
    w: &CudaQuantLinear,
    m: usize,
    ws: &mut SplitKWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    const OP: &str = "w4a8_gemm";
    super::ensure_built()?;
    let fail = |msg: String| Err(Error::Backend(format!("{OP}: {msg}")));
    if !w.is_w4a8() {
        return fail("the weight is W4A16 (use w4a16_gemm)".into());
    }
    let (n, k) = (w.n, w.k);
    if m > (1 << 30) - 1 {
        return fail(format!("m is {m}, at most 2^30 - 1"));
    }
    if !acts.holds(m, k) {
        return fail(format!("the int8 activations hold fewer than {m} rows x {k}"));
    }
    if out.len() < m * n {
        return fail(format!("`out` has {} elements, needs at least {m} x {n}", out.len()));
    }
    super::check_same_device(
        OP,
        stream,
        &[("acts", acts.q.stream()), ("out", out.stream()), ("w", w.qweight.stream())],
    )?;
    if n == 0 || m == 0 {
        return Ok(());
    }
    let plan = w4a8_plan(m, n, k, ws.sms);
    let need = w4a8_workspace(m, n, k, ws.sms);
    if !ws.holds(need) {
        return fail(format!("the split-K workspace holds fewer than {} partials / {} counters", need.0, need.1));
    }
    let row_corr = w.row_corr.as_ref().ok_or_else(|| Error::Backend(format!("{OP}: no row constants")))?;
    let (xq, _x) = acts.q.device_ptr(stream);
    let (x_scales, _xs) = acts.scales.device_ptr(stream);
    let (x_zeros, _xz) = acts.zeros.device_ptr(stream);
    let (qweight, _q) = w.qweight.device_ptr(stream);
    let (scales, _s) = w.scales.device_ptr(stream);
    let zeros = w.zeros.as_ref().map(|z| z.device_ptr(stream));
    let (row_corr, _r) = row_corr.device_ptr(stream);
    let (partials, _p) = ws.partials.device_ptr_mut(stream);
    let (counters, _c) = ws.counters.device_ptr_mut(stream);
    let (outp, _o) = out.device_ptr_mut(stream);
    let l = GemmLaunch {
        out: outp,
        x: xq,
        x_scales,
        x_zeros,
        qweight,
        scales,
        zeros: zeros.as_ref().map_or(0, |(p, _)| *p),
        row_corr,
        partials,
        counters,
        m,
        n,
        k,
        splits: plan.splits,
        tile_m: plan.tile_m,
    };
    launch_w4a8(OP, stream, &l)
}

/// One checked GEMM or dequantization call, as device pointers (0 = NULL) and sizes.
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
struct GemmLaunch {
    out: u64,
    x: u64,
    x_scales: u64,
    x_zeros: u64,
    qweight: u64,
    scales: u64,
    zeros: u64,
    row_corr: u64,
    partials: u64,
    counters: u64,
    m: usize,
    n: usize,
    k: usize,
    splits: usize,
    tile_m: usize,
}

/// One checked activation quantization call (op: 0 rows, 1 rms_norm, 2 add_rms_norm, 3 silu_mul).
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
struct ActQuantLaunch {
    q: u64,
    scales: u64,
    zeros: u64,
    out: u64,
    x: u64,
    residual: u64,
    weight: u64,
    rows: usize,
    hidden: usize,
    eps: f32,
    op: u32,
}

#[cfg(llama32_cuda)]
fn ptr<T>(p: u64) -> *mut T {
    p as *mut T
}

#[cfg(llama32_cuda)]
fn launch_w4a16(op: &str, stream: &CudaStream, l: &GemmLaunch) -> Result<()> {
    use super::ffi;
    // All fit: m <= 64, n < 2^31 - 128, k <= 2^24, splits <= 32 (checked by the callers and the heuristics).
    let params = ffi::l32_w4a16_params {
        out: ptr(l.out),
        x: ptr(l.x),
        qweight: ptr(l.qweight),
        scales: ptr(l.scales),
        zeros: ptr(l.zeros),
        partials: ptr(l.partials),
        counters: ptr(l.counters),
        m: l.m as i64,
        n: l.n as i64,
        k: l.k as i64,
        splits: l.splits as i32,
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
    };
    let raw = super::raw_stream(op, stream)?;
    // SAFETY: every pointer comes from a live device allocation on this stream's device, sized by the caller's
    // checks (x: m x k, out: m x n, the layout buffers of a CudaQuantLinear of n x k, the workspace by
    // w4a16_workspace); the guards are held until after the launch.
    let status = unsafe { ffi::l32_w4a16_gemm(&params, raw) };
    super::check_launch(op, stream, status, || format!("{op} (m {}, n {}, k {}, splits {})", l.m, l.n, l.k, l.splits))
}

#[cfg(llama32_cuda)]
fn launch_dequant(op: &str, stream: &CudaStream, l: &GemmLaunch) -> Result<()> {
    use super::ffi;
    let params = ffi::l32_w4a16_dequant_params {
        out: ptr(l.out),
        qweight: ptr(l.qweight),
        scales: ptr(l.scales),
        zeros: ptr(l.zeros),
        n: l.n as i64,
        k: l.k as i64,
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
    };
    let raw = super::raw_stream(op, stream)?;
    // SAFETY: as in launch_w4a16; out holds n x k.
    let status = unsafe { ffi::l32_w4a16_dequant(&params, raw) };
    super::check_launch(op, stream, status, || format!("{op} (n {}, k {})", l.n, l.k))
}

#[cfg(llama32_cuda)]
fn launch_w4a8(op: &str, stream: &CudaStream, l: &GemmLaunch) -> Result<()> {
    use super::ffi;
    let params = ffi::l32_w4a8_params {
        out: ptr(l.out),
        xq: ptr(l.x),
        x_scales: ptr(l.x_scales),
        x_zeros: ptr(l.x_zeros),
        qweight: ptr(l.qweight),
        scales: ptr(l.scales),
        zeros: ptr(l.zeros),
        row_corr: ptr(l.row_corr),
        partials: ptr(l.partials),
        counters: ptr(l.counters),
        m: l.m as i64,
        n: l.n as i64,
        k: l.k as i64,
        splits: l.splits as i32,
        tile_m: l.tile_m as i32,
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
    };
    let raw = super::raw_stream(op, stream)?;
    // SAFETY: as in launch_w4a16; the int8 buffers hold m x k, the workspace w4a8_workspace(m, n, k).
    let status = unsafe { ffi::l32_w4a8_gemm(&params, raw) };
    super::check_launch(op, stream, status, || {
        format!("{op} (m {}, n {}, k {}, tile_m {}, splits {})", l.m, l.n, l.k, l.tile_m, l.splits)
    })
}

#[cfg(llama32_cuda)]
fn launch_act_quant(op: &str, stream: &CudaStream, l: &ActQuantLaunch) -> Result<()> {
    use super::ffi;
    let params = ffi::l32_act_quant_params {
        q: ptr(l.q),
        scales: ptr(l.scales),
        zeros: ptr(l.zeros),
        out: ptr(l.out),
        x: ptr(l.x),
        residual: ptr(l.residual),
        weight: ptr(l.weight),
        rows: l.rows as i64,
        hidden: l.hidden as i64,
        eps: l.eps,
        op: ffi::l32_act_quant_op(l.op),
        dtype: ffi::l32_dtype::L32_DTYPE_BF16,
    };
    let raw = super::raw_stream(op, stream)?;
    // SAFETY: act_quant checked every operand's length against rows x hidden (gate_up: 2x, weight: hidden) and
    // the int8 buffers' capacity; the guards are held until after the launch.
    let status = unsafe { ffi::l32_act_quant(&params, raw) };
    super::check_launch(op, stream, status, || format!("{op} (op {}, rows {}, hidden {})", l.op, l.rows, l.hidden))
}

#[cfg(not(llama32_cuda))]
fn launch_w4a16(_op: &str, _stream: &CudaStream, _l: &GemmLaunch) -> Result<()> {
    super::ensure_built()
}

#[cfg(not(llama32_cuda))]
fn launch_dequant(_op: &str, _stream: &CudaStream, _l: &GemmLaunch) -> Result<()> {
    super::ensure_built()
}

#[cfg(not(llama32_cuda))]
fn launch_w4a8(_op: &str, _stream: &CudaStream, _l: &GemmLaunch) -> Result<()> {
    super::ensure_built()
}

#[cfg(not(llama32_cuda))]
fn launch_act_quant(_op: &str, _stream: &CudaStream, _l: &ActQuantLaunch) -> Result<()> {
    super::ensure_built()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random-ish matrix with every int4 value, and scales / zeros that differ per group.
    fn matrix(n: usize, k: usize, group: usize, zeros: bool) -> QuantMatrix {
        let q: Vec<i8> = (0..n * k).map(|i| ((i * 7 + i / 13) % 16) as i8 - 8).collect();
        let g = n * (k / group);
        let scales: Vec<f32> = (0..g).map(|i| bf16::from_f32(0.01 * (1 + i % 5) as f32).to_f32()).collect();
        let zeros = zeros.then(|| (0..g).map(|i| (i % 16) as i8 - 8).collect());
        QuantMatrix { n, k, group, q, scales, zeros }
    }

    /// The inverse of the layout, written from the lane's point of view (kernels/quant/common.cuh): the value of
    /// (row, col) is in tile (row / 16, col / 64), lane 4 g + t with g = row % 8, t = (col % 32) / 8, word
    /// (row % 16 >= 8) + 2 ((col % 64) >= 32), nibble of i = col % 8.
    fn unpack(tiles: &[u8], n: usize, k: usize, nibble: fn(usize) -> usize) -> Vec<i8> {
        let kc = k / 64;
        let mut q = vec![0i8; n * k];
        for row in 0..n {
            for col in 0..k {
                let tile = (row / 16) * kc + col / 64;
                let lane = 4 * (row % 8) + (col % 32) / 8;
                let word = usize::from(row % 16 >= 8) + 2 * usize::from(col % 64 >= 32);
                let at = tile * 512 + lane * 16 + word * 4;
                let w = u32::from_le_bytes(tiles[at..at + 4].try_into().unwrap());
                let nib = (w >> (4 * nibble(col % 8))) & 0xF;
                q[row * k + col] = ((nib as i8) << 4) >> 4;
            }
        }
        q
    }

    /// Emulates, on the host, one warp of the kernels on one tile: each lane builds its MMA fragments from the
    /// packed words with the kernels' bit operations, the fragments are placed into the A / B matrices where the
    /// PTX fragment layout says they go, and D = A B must equal the group's dot products computed directly. This
    /// checks the layout, the nibble orders, the dequantization bit tricks and the B-fragment column mapping of
    /// both kernels without a GPU.
    #[test]
    #[allow(clippy::needless_range_loop)] // fragment coordinates read clearer as indices
    fn emulated_mma_fragments_compute_the_group_dot_products() {
        let (n, k) = (16, 64);
        for zeros in [false, true] {
            let m = matrix(n, k, 32, zeros);
            let zero = |r: usize, grp: usize| m.zeros.as_ref().map_or(0i32, |z| i32::from(z[r * 2 + grp]));
            // Activations: 8 tokens; bf16-exact small integers for W4A16, int8 for W4A8.
            let x: Vec<i32> = (0..8 * k).map(|i| ((i * 37 + 11) % 255) as i32 - 127).collect();
            let h = layout_w4a16(&m).unwrap();
            let e = layout_w4a8(&m).unwrap();
            for jg in 0..2 {
                let want = |r: usize, tok: usize| -> i64 {
                    (0..32)
                        .map(|i| {
                            let c = jg * 32 + i;
                            (i64::from(m.q[r * k + c]) - i64::from(zero(r, jg))) * i64::from(x[tok * k + c])
                        })
                        .sum()
                };
                // W4A16: two m16n8k16 MMAs per group into one accumulator.
                let mut d = [[0f64; 8]; 16];
                for mma in 0..2 {
                    let (mut a, mut b) = ([[0f64; 16]; 16], [[0f64; 8]; 16]);
                    for lane in 0..32 {
                        let (g, t) = (lane / 4, lane % 4);
                        let word =
                            |wi: usize| u32::from_le_bytes(h.qweight[lane * 16 + wi * 4..][..4].try_into().unwrap());
                        let (wa, wb) = (word(2 * jg), word(2 * jg + 1));
                        let bias = |r: usize| 136.0 + zero(r, jg) as f64;
                        let deq = |w: u32, s: u32, r: usize| {
                            let v = ((w >> s) & 0x000F_000F) ^ 0x4308_4308;
                            let lo = f32::from_bits((v & 0xFFFF) << 16) as f64 - bias(r);
                            let hi = f32::from_bits(v & 0xFFFF_0000) as f64 - bias(r);
                            (lo, hi)
                        };
                        let s0 = 8 * mma as u32;
                        let regs = [deq(wa, s0, g), deq(wb, s0, g + 8), deq(wa, s0 + 4, g), deq(wb, s0 + 4, g + 8)];
                        // a0: A[g][2t..], a1: A[g+8][2t..], a2: A[g][2t+8..], a3: A[g+8][2t+8..].
                        for (ri, (row, col)) in
                            [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)].into_iter().enumerate()
                        {
                            a[row][col] = regs[ri].0;
                            a[row][col + 1] = regs[ri].1;
                        }
                        // xb = x[token g][32 jg + 8t .. + 8]; MMA0 b0 = (0, 1), b1 = (2, 3); MMA1 b0 = (4, 5), b1 = (6, 7).
                        let xb = |i: usize| x[g * k + jg * 32 + 8 * t + i] as f64;
                        let base = 4 * mma;
                        b[2 * t][g] = xb(base);
                        b[2 * t + 1][g] = xb(base + 1);
                        b[2 * t + 8][g] = xb(base + 2);
                        b[2 * t + 9][g] = xb(base + 3);
                    }
                    for (r, dr) in d.iter_mut().enumerate() {
                        for (tok, v) in dr.iter_mut().enumerate() {
                            *v += (0..16).map(|s| a[r][s] * b[s][tok]).sum::<f64>();
                        }
                    }
                }
                for (r, dr) in d.iter().enumerate() {
                    for (tok, &v) in dr.iter().enumerate() {
                        assert_eq!(v as i64, want(r, tok), "w4a16 zeros {zeros} group {jg} row {r} token {tok}");
                    }
                }
                // W4A8: one m16n8k32 s8 MMA per group.
                let (mut a, mut b) = ([[0i64; 32]; 16], [[0i64; 8]; 32]);
                for lane in 0..32 {
                    let (g, t) = (lane / 4, lane % 4);
                    let word = |wi: usize| u32::from_le_bytes(e.qweight[lane * 16 + wi * 4..][..4].try_into().unwrap());
                    let (wa, wb) = (word(2 * jg), word(2 * jg + 1));
                    let expand = |w: u32, r: usize| -> (u32, u32) {
                        if zeros {
                            let c4 = (8 + zero(r, jg)) as u32 * 0x0101_0101;
                            let lo = (((w & 0x0F0F_0F0F) ^ 0x8888_8888).wrapping_sub(c4)) ^ 0x8080_8080;
                            let hi = ((((w >> 4) & 0x0F0F_0F0F) ^ 0x8888_8888).wrapping_sub(c4)) ^ 0x8080_8080;
                            (lo, hi)
                        } else {
                            ((w << 4) & 0xF0F0_F0F0, w & 0xF0F0_F0F0)
                        }
                    };
                    let ((a0, a2), (a1, a3)) = (expand(wa, g), expand(wb, g + 8));
                    let byte = |v: u32, j: usize| i64::from((v >> (8 * j)) as u8 as i8);
                    for j in 0..4 {
                        a[g][4 * t + j] = byte(a0, j);
                        a[g + 8][4 * t + j] = byte(a1, j);
                        a[g][4 * t + 16 + j] = byte(a2, j);
                        a[g + 8][4 * t + 16 + j] = byte(a3, j);
                        // The 8-byte load of x[token g][32 jg + 8t ..]: b0 = bytes 0..4, b1 = bytes 4..8.
                        b[4 * t + j][g] = i64::from(x[g * k + jg * 32 + 8 * t + j]);
                        b[4 * t + 16 + j][g] = i64::from(x[g * k + jg * 32 + 8 * t + 4 + j]);
                    }
                }
                let unit = if zeros { 1 } else { 16 };
                for r in 0..16 {
                    for tok in 0..8 {
                        let v: i64 = (0..32).map(|s| a[r][s] * b[s][tok]).sum();
                        assert_eq!(v, unit * want(r, tok), "w4a8 zeros {zeros} group {jg} row {r} token {tok}");
                    }
                }
            }
        }
    }

    #[test]
    fn nibble_orders_are_permutations() {
        for f in [nibble_w4a16 as fn(usize) -> usize, nibble_w4a8] {
            let mut seen: Vec<usize> = (0..8).map(f).collect();
            seen.sort();
            assert_eq!(seen, (0..8).collect::<Vec<_>>());
        }
        // W4A16: columns (0, 1) in nibbles (0, 4), the halves of one bf16x2 register.
        assert_eq!((0..8).map(nibble_w4a16).collect::<Vec<_>>(), [0, 4, 1, 5, 2, 6, 3, 7]);
        assert_eq!((0..8).map(nibble_w4a8).collect::<Vec<_>>(), [0, 2, 4, 6, 1, 3, 5, 7]);
    }

    #[test]
    fn tiles_round_trip_every_value() {
        for (n, k) in [(16, 64), (17, 128), (33, 192), (5, 64)] {
            let m = matrix(n, k, 32, false);
            let a = layout_w4a16(&m).unwrap();
            assert_eq!(a.qweight.len(), padded_n(n) / 16 * k / 64 * 512);
            assert_eq!(unpack(&a.qweight, n, k, nibble_w4a16), m.q, "w4a16 {n}x{k}");
            let b = layout_w4a8(&m).unwrap();
            assert_eq!(unpack(&b.qweight, n, k, nibble_w4a8), m.q, "w4a8 {n}x{k}");
        }
    }

    #[test]
    fn scale_entries_follow_the_lane_order() {
        let (n, k) = (20, 128);
        let m = matrix(n, k, 32, true);
        let a = layout_w4a16(&m).unwrap();
        let b = layout_w4a8(&m).unwrap();
        let kc = k / 64;
        for row in 0..padded_n(n) {
            for grp in 0..k / 32 {
                // Entry (tile, g), value e = 2 (row % 16 >= 8) + (group % 2).
                let idx = (((row / 16) * kc + grp / 2) * 8 + row % 8) * 4 + 2 * usize::from(row % 16 >= 8) + grp % 2;
                let (s, z) = if row < n {
                    (m.scales[row * (k / 32) + grp], m.zeros.as_ref().unwrap()[row * (k / 32) + grp])
                } else {
                    (0.0, 0)
                };
                assert_eq!(a.scales[idx].to_f32(), s, "row {row} group {grp}");
                assert_eq!(a.zeros.as_ref().unwrap()[idx].to_f32(), 136.0 + z as f32);
                assert_eq!(b.scales[idx], s, "zero points: the W4A8 scale is not divided by 16");
                assert_eq!(b.zeros.as_ref().unwrap()[idx], (8 + z) as u8);
            }
        }
        let sym = layout_w4a8(&matrix(n, k, 32, false)).unwrap();
        assert_eq!(sym.scales[0], m.scales[0] / 16.0);
        assert!(sym.zeros.is_none());
    }

    #[test]
    fn row_constants_sum_scaled_group_sums() {
        let (n, k) = (3, 128);
        let m = matrix(n, k, 64, true);
        let b = layout_w4a8(&m).unwrap();
        for r in 0..n {
            let mut want = 0.0f64;
            for c in 0..k {
                let gi = r * 2 + c / 64;
                want += m.scales[gi] as f64 * (m.q[r * k + c] as f64 - m.zeros.as_ref().unwrap()[gi] as f64);
            }
            assert!((b.row_corr[r] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0), "row {r}");
        }
        assert_eq!(b.row_corr[n..], vec![0.0; padded_n(n) - n]);
    }

    #[test]
    fn groups_of_64_become_pairs_of_32() {
        let m = matrix(16, 128, 64, false);
        let a = layout_w4a16(&m).unwrap();
        // Row 0: groups 0, 1 of the 64-group matrix -> 32-groups 0, 1 (= scale 0) and 2, 3 (= scale 1).
        assert_eq!(a.scales[0].to_f32(), m.scales[0]);
        assert_eq!(a.scales[1].to_f32(), m.scales[0]);
        assert_eq!(a.scales[32].to_f32(), m.scales[1]);
    }

    #[test]
    fn rejects_what_the_kernels_cannot_take() {
        let mut m = matrix(4, 96, 32, false);
        assert!(layout_w4a16(&m).unwrap_err().to_string().contains("multiple of 64"));
        m = matrix(4, 128, 16, false);
        assert!(layout_w4a8(&m).unwrap_err().to_string().contains("group"));
        m = matrix(4, 128, 32, false);
        m.q[5] = 9;
        assert!(layout_w4a16(&m).unwrap_err().to_string().contains("q[5]"));
        m = matrix(4, 128, 32, false);
        m.scales.pop();
        assert!(layout_w4a16(&m).unwrap_err().to_string().contains("scales"));
        assert!(supports(2048, 32) && supports(8192, 128) && !supports(2048, 48) && !supports(2080, 32));
    }

    #[test]
    fn split_heuristics_fill_an_h100() {
        let sms = 132;
        assert_eq!(w4a16_splits(3072, 2048, sms), 11);
        assert_eq!(w4a16_splits(2048, 2048, sms), 16);
        assert_eq!(w4a16_splits(16384, 2048, sms), 3);
        assert_eq!(w4a16_splits(57344, 8192, sms), 1);
        assert_eq!(w4a16_splits(8192, 28672, sms), 5);
        assert_eq!(w4a16_splits(40, 64, sms), 1);
        for (n, k) in [(3072, 2048), (2048, 8192), (57344, 8192), (17, 64)] {
            let s = w4a16_splits(n, k, sms);
            assert!(s >= 1 && s <= (k / 64).max(1), "{n}x{k}: {s}");
        }
        assert_eq!(w4a8_plan(1, 3072, 2048, sms), W4A8Plan { tile_m: 8, splits: 11 });
        assert_eq!(w4a8_plan(20, 2048, 2048, sms).tile_m, 32);
        assert_eq!(w4a8_plan(1024, 57344, 8192, sms), W4A8Plan { tile_m: 128, splits: 1 });
        assert_eq!(w4a8_plan(256, 6144, 4096, sms), W4A8Plan { tile_m: 128, splits: 3 });
    }

    #[test]
    fn workspace_bound_covers_every_row_count() {
        let sms = 132;
        for (n, k) in [(3072, 2048), (2048, 8192), (6144, 4096), (40, 128)] {
            let bound = workspace_bound(true, 700, n, k, sms);
            for m in 1..=700 {
                let need = w4a8_workspace(m, n, k, sms);
                assert!(need.0 <= bound.0 && need.1 <= bound.1, "w4a8 {n}x{k} m {m}");
            }
            let bound = workspace_bound(false, 700, n, k, sms);
            for m in 1..=MAX_DECODE_M {
                let need = w4a16_workspace(m, n, k, sms);
                assert!(need.0 <= bound.0 && need.1 <= bound.1, "w4a16 {n}x{k} m {m}");
            }
        }
    }
}
