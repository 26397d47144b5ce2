//! Llama 3.2 Vision kernels on CUDA (`kernels/vision/`, the "vision" section of `kernels/llama32_kernels.h`):
//! patch extraction, the encoder's embeddings + `layernorm_pre`, LayerNorm with a gated residual, bias + GELU, the
//! encoder's output gather, the gated residual RMSNorm of the cross-attention text layers; and, re-exported from
//! [`super::gather_attention`], a generic gather attention (any head_dim that is a multiple of 8, optional additive
//! flag mask).
//!
//! Each has a CPU twin in [`crate::vision::cuda::twins`] (or reuses [`crate::vision::encoder`]); the GPU tests in
//! `tests/gpu/cuda_vision.rs` compare them. Every wrapper checks every length before it launches; kernels are
//! enqueued on `stream` and nothing waits.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::{Error, Result};

/// The widest row the row-wise vision kernels take (they stage a row in shared memory).
pub const MAX_ROW_WIDTH: usize = 16384;
pub use super::gather_attention::{gather_attention, GatherAttnIo, GatherAttnShape, MAX_GATHER_HEAD_DIM};

pub(super) fn fail<T>(op: &str, msg: String) -> Result<T> {
    Err(Error::Backend(format!("{op}: {msg}")))
}

pub(super) fn want_len(op: &str, name: &str, got: usize, want: usize) -> Result<()> {
    if got < want {
        return fail(op, format!("`{name}` has {got} elements, needs {want}"));
    }
    Ok(())
}

/// Geometry of [`im2col`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Im2colShape {
    /// Tiles (images x tiles per image).
    pub tiles: usize,
    /// Colour channels.
    pub channels: usize,
    /// Tile side in pixels.
    pub side: usize,
    /// Patch side in pixels (`side` is a multiple of it in the configs; extra pixels are ignored).
    pub patch: usize,
    /// Row length of the output, at least `channels * patch * patch` (the extra columns are zeros).
    pub k_pad: usize,
}

impl Im2colShape {
    /// Patches per tile.
    pub fn grid(&self) -> usize {
        let per_side = self.side / self.patch.max(1);
        per_side * per_side
    }
}

/// Patch extraction: `out[tile * grid + cell, (c * patch + ky) * patch + kx] = pixels[tile, c, ...]` (see the
/// header), so that `out @ W^T` is the patch-embedding convolution.
///
/// - `pixels`: `[tiles, channels, side, side]` f32; `out`: `[tiles * grid, k_pad]` bf16.
pub fn im2col(
    stream: &CudaStream,
    s: &Im2colShape,
    pixels: &impl DevicePtr<f32>,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    const OP: &str = "vision_im2col";
    super::ensure_built()?;
    if s.channels == 0 || s.patch == 0 || s.side < s.patch || s.k_pad < s.channels * s.patch * s.patch {
        return fail(OP, format!("bad geometry {s:?}"));
    }
    if s.side > i32::MAX as usize || s.k_pad > i32::MAX as usize || s.channels > 64 {
        return fail(OP, format!("geometry {s:?} out of range"));
    }
    want_len(OP, "pixels", pixels.len(), s.tiles * s.channels * s.side * s.side)?;
    want_len(OP, "out", out.len(), s.tiles * s.grid() * s.k_pad)?;
    super::check_same_device(OP, stream, &[("pixels", pixels.stream()), ("out", out.stream())])?;
    let (px, _px) = pixels.device_ptr(stream);
    let (o, _o) = out.device_ptr_mut(stream);
    imp::im2col(OP, stream, s, px, o)
}

/// The vision encoder's small weights as [`embed`] reads them (all f32 but `tile_position`).
pub struct EmbedWeights<'a, F: DevicePtr<f32>, B: DevicePtr<bf16>> {
    /// `[hidden]`.
    pub class_embedding: &'a F,
    /// `[num_patches, hidden]`: `(1 - tanh(gate)) * position_embedding`.
    pub position: &'a F,
    /// `[ar_rows, tiles * num_patches * hidden]` bf16.
    pub tile_position: &'a B,
    /// `layernorm_pre` weight `[hidden]`.
    pub ln_weight: &'a F,
    /// `layernorm_pre` bias `[hidden]`.
    pub ln_bias: &'a F,
    /// `tanh` of the gated positional embedding's gate.
    pub pos_gate: f32,
    /// LayerNorm epsilon.
    pub eps: f32,
}

/// Geometry of [`embed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbedShape {
    /// Images.
    pub images: usize,
    /// Tiles per image (`max_num_tiles`).
    pub tiles: usize,
    /// Tokens per tile, class token included.
    pub num_patches: usize,
    /// Tokens per tile after padding to a multiple of 8.
    pub padded: usize,
    /// Encoder width.
    pub hidden: usize,
    /// Rows of the aspect-ratio tables (`max_aspect_ratio_id + 1`).
    pub ar_rows: usize,
}

/// Embeddings + `layernorm_pre` into the padded f32 residual stream (padding rows zero); see the header.
///
/// - `conv`: `[images * tiles * (num_patches - 1), hidden]` bf16 (the patch GEMM); `pre_add`:
///   `[images * tiles, hidden]` f32; `ar_ids`: `[images]`, each `< ar_rows` (checked by the caller on the host);
///   `out`: `[images * tiles * padded, hidden]` f32.
#[allow(clippy::too_many_arguments)]
pub fn embed<F: DevicePtr<f32>, B: DevicePtr<bf16>>(
    stream: &CudaStream,
    s: &EmbedShape,
    w: &EmbedWeights<'_, F, B>,
    conv: &impl DevicePtr<bf16>,
    pre_add: &impl DevicePtr<f32>,
    ar_ids: &impl DevicePtr<u32>,
    out: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    const OP: &str = "vision_embed";
    super::ensure_built()?;
    if s.tiles == 0 || s.num_patches < 2 || s.padded < s.num_patches || s.hidden == 0 || s.ar_rows == 0 {
        return fail(OP, format!("bad geometry {s:?}"));
    }
    if s.hidden > MAX_ROW_WIDTH || s.images * s.tiles * s.padded > i32::MAX as usize {
        return fail(OP, format!("geometry {s:?} out of range"));
    }
    if !(w.eps.is_finite() && w.eps >= 0.0 && w.pos_gate.is_finite()) {
        return fail(OP, format!("eps {} / gate {} invalid", w.eps, w.pos_gate));
    }
    let (h, it) = (s.hidden, s.images * s.tiles);
    want_len(OP, "conv", conv.len(), it * (s.num_patches - 1) * h)?;
    want_len(OP, "pre_add", pre_add.len(), it * h)?;
    want_len(OP, "ar_ids", ar_ids.len(), s.images)?;
    want_len(OP, "out", out.len(), it * s.padded * h)?;
    want_len(OP, "class_embedding", w.class_embedding.len(), h)?;
    want_len(OP, "position", w.position.len(), s.num_patches * h)?;
    want_len(OP, "tile_position", w.tile_position.len(), s.ar_rows * s.tiles * s.num_patches * h)?;
    want_len(OP, "ln_weight", w.ln_weight.len(), h)?;
    want_len(OP, "ln_bias", w.ln_bias.len(), h)?;
    let operands = [
        ("conv", conv.stream()),
        ("pre_add", pre_add.stream()),
        ("ar_ids", ar_ids.stream()),
        ("out", out.stream()),
        ("class_embedding", w.class_embedding.stream()),
        ("position", w.position.stream()),
        ("tile_position", w.tile_position.stream()),
        ("ln_weight", w.ln_weight.stream()),
        ("ln_bias", w.ln_bias.stream()),
    ];
    super::check_same_device(OP, stream, &operands)?;
    let (conv, _a) = conv.device_ptr(stream);
    let (pre_add, _b) = pre_add.device_ptr(stream);
    let (ar_ids, _c) = ar_ids.device_ptr(stream);
    let (out, _d) = out.device_ptr_mut(stream);
    let (cls, _e) = w.class_embedding.device_ptr(stream);
    let (pos, _f) = w.position.device_ptr(stream);
    let (tpos, _g) = w.tile_position.device_ptr(stream);
    let (lw, _h) = w.ln_weight.device_ptr(stream);
    let (lb, _i) = w.ln_bias.device_ptr(stream);
    let ptrs = [out, conv, cls, pre_add, pos, tpos, ar_ids, lw, lb];
    imp::embed(OP, stream, s, ptrs, w.pos_gate, w.eps)
}

/// What [`layer_norm`] does besides the norm.
#[derive(Clone, Copy, Debug)]
pub struct LayerNormArgs {
    /// Rows of the residual stream.
    pub rows: usize,
    /// Row width.
    pub width: usize,
    /// Scale of the residual delta (1 for an ungated residual).
    pub gate: f32,
    /// LayerNorm epsilon.
    pub eps: f32,
    /// Rows per `post_add` row.
    pub rows_per_group: usize,
}

/// Optional operands of [`layer_norm`], as device pointers taken by the caller's wrappers. Use
/// [`LayerNormIo::default`] and set what the call needs.
#[derive(Default)]
pub struct LayerNormIo<'a> {
    /// `[rows, width]` bf16 delta: `residual += gate * (delta + delta_bias)` first.
    pub delta: Option<&'a dyn DeviceBf16>,
    /// `[width]` f32 added to the delta.
    pub delta_bias: Option<&'a dyn DeviceF32>,
    /// `[rows, width]` bf16 normalized output.
    pub out: Option<&'a mut dyn DeviceBf16Mut>,
    /// `[rows, width]` f32 normalized output (may be the residual itself: pass `out_f32_is_residual`).
    pub out_f32: Option<&'a mut dyn DeviceF32Mut>,
    /// Write the f32 output over the residual (in place).
    pub out_f32_is_residual: bool,
    /// `[rows / rows_per_group, width]` f32 added to the f32 output.
    pub post_add: Option<&'a dyn DeviceF32>,
    /// LayerNorm weight and bias `[width]` (needed when any output is written).
    pub norm: Option<(&'a dyn DeviceF32, &'a dyn DeviceF32)>,
}

/// A read-only bf16 device buffer (object-safe view of [`DevicePtr`]).
pub trait DeviceBf16 {
    /// Elements.
    fn n(&self) -> usize;
    /// The pointer, valid on `stream`.
    fn ptr(&self, stream: &CudaStream) -> u64;
    /// Its stream (for the device check).
    fn owner(&self) -> &std::sync::Arc<CudaStream>;
}
/// A read-only f32 device buffer.
pub trait DeviceF32 {
    /// Elements.
    fn n(&self) -> usize;
    /// The pointer, valid on `stream`.
    fn ptr(&self, stream: &CudaStream) -> u64;
    /// Its stream.
    fn owner(&self) -> &std::sync::Arc<CudaStream>;
}
/// A writable bf16 device buffer.
pub trait DeviceBf16Mut {
    /// Elements.
    fn n(&self) -> usize;
    /// The pointer, valid on `stream`.
    fn ptr_mut(&mut self, stream: &CudaStream) -> u64;
    /// Its stream.
    fn owner(&self) -> &std::sync::Arc<CudaStream>;
}
/// A writable f32 device buffer.
pub trait DeviceF32Mut {
    /// Elements.
    fn n(&self) -> usize;
    /// The pointer, valid on `stream`.
    fn ptr_mut(&mut self, stream: &CudaStream) -> u64;
    /// Its stream.
    fn owner(&self) -> &std::sync::Arc<CudaStream>;
}

// With cudarc's event tracking off (as the executors run it) the guards of device_ptr do nothing, so handing out
// the raw address is safe for work on the same stream.
macro_rules! impl_dev {
    ($tr:ident, $t:ty, $($ty:ty),*) => {$(
        impl $tr for $ty {
            fn n(&self) -> usize { <$ty as cudarc::driver::DeviceSlice<$t>>::len(self) }
            fn ptr(&self, stream: &CudaStream) -> u64 { self.device_ptr(stream).0 }
            fn owner(&self) -> &std::sync::Arc<CudaStream> { <$ty as cudarc::driver::DeviceSlice<$t>>::stream(self) }
        }
    )*};
}
macro_rules! impl_dev_mut {
    ($tr:ident, $t:ty, $($ty:ty),*) => {$(
        impl $tr for $ty {
            fn n(&self) -> usize { <$ty as cudarc::driver::DeviceSlice<$t>>::len(self) }
            fn ptr_mut(&mut self, stream: &CudaStream) -> u64 { self.device_ptr_mut(stream).0 }
            fn owner(&self) -> &std::sync::Arc<CudaStream> { <$ty as cudarc::driver::DeviceSlice<$t>>::stream(self) }
        }
    )*};
}
impl_dev!(DeviceBf16, bf16, cudarc::driver::CudaSlice<bf16>, cudarc::driver::CudaView<'_, bf16>);
impl_dev!(DeviceF32, f32, cudarc::driver::CudaSlice<f32>, cudarc::driver::CudaView<'_, f32>);
impl_dev_mut!(DeviceBf16Mut, bf16, cudarc::driver::CudaSlice<bf16>, cudarc::driver::CudaViewMut<'_, bf16>);
impl_dev_mut!(DeviceF32Mut, f32, cudarc::driver::CudaSlice<f32>, cudarc::driver::CudaViewMut<'_, f32>);

/// LayerNorm with bias over the f32 residual stream, with an optional gated residual add before it and an
/// optional per-group add after it (see the header and [`LayerNormIo`]).
pub fn layer_norm(
    stream: &CudaStream,
    a: &LayerNormArgs,
    residual: &mut impl DevicePtrMut<f32>,
    io: LayerNormIo<'_>,
) -> Result<()> {
    const OP: &str = "vision_layer_norm";
    super::ensure_built()?;
    let (rows, w) = (a.rows, a.width);
    if w == 0 || w > MAX_ROW_WIDTH || rows > i32::MAX as usize || a.rows_per_group == 0 {
        return fail(OP, format!("rows {rows} / width {w} / rows_per_group {} out of range", a.rows_per_group));
    }
    if !(a.eps.is_finite() && a.eps >= 0.0 && a.gate.is_finite()) {
        return fail(OP, format!("eps {} / gate {} invalid", a.eps, a.gate));
    }
    let n = rows * w;
    want_len(OP, "residual", residual.len(), n)?;
    let ord = stream.context().ordinal();
    let same = |name: &str, s: &std::sync::Arc<CudaStream>| -> Result<()> {
        if s.context().ordinal() != ord {
            return fail(OP, format!("`{name}` is on another device"));
        }
        Ok(())
    };
    same("residual", residual.stream())?;
    let mut ptrs = [0u64; 8]; // residual, delta, delta_bias, out, out_f32, post_add, weight, bias
    if let Some(d) = io.delta {
        want_len(OP, "delta", d.n(), n)?;
        same("delta", d.owner())?;
        ptrs[1] = d.ptr(stream);
    }
    if let Some(b) = io.delta_bias {
        if io.delta.is_none() {
            return fail(OP, "`delta_bias` without `delta`".into());
        }
        want_len(OP, "delta_bias", b.n(), w)?;
        same("delta_bias", b.owner())?;
        ptrs[2] = b.ptr(stream);
    }
    let writes = io.out.is_some() || io.out_f32.is_some() || io.out_f32_is_residual;
    if let Some(o) = io.out {
        want_len(OP, "out", o.n(), n)?;
        same("out", o.owner())?;
        ptrs[3] = o.ptr_mut(stream);
    }
    if io.out_f32.is_some() && io.out_f32_is_residual {
        return fail(OP, "`out_f32` given and `out_f32_is_residual` set".into());
    }
    if let Some(o) = io.out_f32 {
        want_len(OP, "out_f32", o.n(), n)?;
        same("out_f32", o.owner())?;
        ptrs[4] = o.ptr_mut(stream);
    }
    if let Some(pa) = io.post_add {
        if !(io.out_f32_is_residual || ptrs[4] != 0) {
            return fail(OP, "`post_add` without an f32 output".into());
        }
        want_len(OP, "post_add", pa.n(), rows.div_ceil(a.rows_per_group) * w)?;
        same("post_add", pa.owner())?;
        ptrs[5] = pa.ptr(stream);
    }
    if writes {
        let Some((nw, nb)) = io.norm else { return fail(OP, "a normalized output needs the norm weights".into()) };
        want_len(OP, "weight", nw.n(), w)?;
        want_len(OP, "bias", nb.n(), w)?;
        same("weight", nw.owner())?;
        same("bias", nb.owner())?;
        ptrs[6] = nw.ptr(stream);
        ptrs[7] = nb.ptr(stream);
    }
    let (r, _r) = residual.device_ptr_mut(stream);
    ptrs[0] = r;
    if io.out_f32_is_residual {
        ptrs[4] = r;
    }
    imp::layer_norm(OP, stream, a, ptrs)
}

/// Activation of [`bias_act`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiasAct {
    /// `x + bias`.
    None,
    /// The exact (erf) GELU of `x + bias`.
    Gelu,
}

/// `x[r, c] = act(x[r, c] + bias[c])` in place over `[rows, cols]` bf16 (f32 math, one rounding).
pub fn bias_act(
    stream: &CudaStream,
    x: &mut impl DevicePtrMut<bf16>,
    bias: &impl DevicePtr<f32>,
    rows: usize,
    act: BiasAct,
) -> Result<()> {
    const OP: &str = "bias_act";
    super::ensure_built()?;
    let cols = bias.len();
    if cols == 0 {
        return fail(OP, "`bias` is empty".into());
    }
    want_len(OP, "x", x.len(), rows * cols)?;
    super::check_same_device(OP, stream, &[("x", x.stream()), ("bias", bias.stream())])?;
    let (b, _b) = bias.device_ptr(stream);
    let (xp, _x) = x.device_ptr_mut(stream);
    imp::bias_act(OP, stream, xp, b, rows, cols, act)
}

/// Geometry of [`gather_output`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatherShape {
    /// Tiles of all images.
    pub tiles_total: usize,
    /// Tokens per tile.
    pub num_patches: usize,
    /// Padded tokens per tile.
    pub padded: usize,
    /// Encoder width.
    pub hidden: usize,
    /// Intermediate layers kept.
    pub n_inter: usize,
}

/// The encoder output without padding tokens, the final state then the interleaved intermediate states (see the
/// header). `final_state`: `[tiles_total * padded, hidden]`; `inter`: `[n_inter, tiles_total * padded, hidden]`;
/// `out`: `[tiles_total * num_patches, hidden * (1 + n_inter)]` bf16.
pub fn gather_output(
    stream: &CudaStream,
    s: &GatherShape,
    final_state: &impl DevicePtr<f32>,
    inter: &impl DevicePtr<f32>,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    const OP: &str = "vision_gather";
    super::ensure_built()?;
    if s.num_patches == 0 || s.padded < s.num_patches || s.hidden == 0 || s.n_inter > 64 {
        return fail(OP, format!("bad geometry {s:?}"));
    }
    let rows_in = s.tiles_total * s.padded;
    want_len(OP, "final_state", final_state.len(), rows_in * s.hidden)?;
    want_len(OP, "inter", inter.len(), s.n_inter * rows_in * s.hidden)?;
    want_len(OP, "out", out.len(), s.tiles_total * s.num_patches * s.hidden * (1 + s.n_inter))?;
    let operands = [("final_state", final_state.stream()), ("inter", inter.stream()), ("out", out.stream())];
    super::check_same_device(OP, stream, &operands)?;
    let (f, _f) = final_state.device_ptr(stream);
    let (i, _i) = inter.device_ptr(stream);
    let (o, _o) = out.device_ptr_mut(stream);
    imp::gather(OP, stream, s, o, f, if s.n_inter > 0 { i } else { 0 })
}

/// Gated residual add + RMSNorm over bf16 rows: `residual = bf16(residual + bf16(gate * row_scale * delta))`, then
/// (with `out`) `out = rms_norm(residual) * weight` with the numerics of [`crate::ops::cuda::norm`].
///
/// - `residual`, `delta`: `[rows, hidden]`; `row_scale`: `[rows]` f32 or `None` (1); `norm`: the weight `[hidden]`
///   and the output `[rows, hidden]`, or `None` to only update the residual.
#[allow(clippy::too_many_arguments)]
pub fn gated_rms_norm<R, D, S, W, O>(
    stream: &CudaStream,
    residual: &mut R,
    delta: &D,
    row_scale: Option<&S>,
    gate: f32,
    eps: f32,
    hidden: usize,
    norm: Option<(&W, &mut O)>,
) -> Result<()>
where
    R: DevicePtrMut<bf16>,
    D: DevicePtr<bf16>,
    S: DevicePtr<f32>,
    W: DevicePtr<bf16>,
    O: DevicePtrMut<bf16>,
{
    const OP: &str = "gated_rms_norm";
    super::ensure_built()?;
    if hidden == 0 || hidden > MAX_ROW_WIDTH || residual.len() % hidden != 0 {
        return fail(OP, format!("hidden {hidden} does not fit `residual` ({} elements)", residual.len()));
    }
    if !(eps.is_finite() && eps >= 0.0 && gate.is_finite()) {
        return fail(OP, format!("eps {eps} / gate {gate} invalid"));
    }
    let rows = residual.len() / hidden;
    if rows > i32::MAX as usize {
        return fail(OP, format!("{rows} rows"));
    }
    want_len(OP, "delta", delta.len(), rows * hidden)?;
    super::check_same_device(OP, stream, &[("residual", residual.stream()), ("delta", delta.stream())])?;
    let mut scale_ptr = 0;
    let _gs;
    if let Some(s) = row_scale {
        want_len(OP, "row_scale", s.len(), rows)?;
        super::check_same_device(OP, stream, &[("row_scale", s.stream())])?;
        let (p, g) = s.device_ptr(stream);
        scale_ptr = p;
        _gs = g;
    }
    let (mut out_ptr, mut w_ptr) = (0, 0);
    let (_gw, _go);
    if let Some((w, o)) = norm {
        want_len(OP, "weight", w.len(), hidden)?;
        want_len(OP, "out", o.len(), rows * hidden)?;
        super::check_same_device(OP, stream, &[("weight", w.stream()), ("out", o.stream())])?;
        let (p, g) = w.device_ptr(stream);
        w_ptr = p;
        _gw = g;
        let (p, g) = o.device_ptr_mut(stream);
        out_ptr = p;
        _go = g;
    }
    let (d, _d) = delta.device_ptr(stream);
    let (r, _r) = residual.device_ptr_mut(stream);
    imp::gated_rms_norm(OP, stream, [r, d, scale_ptr, out_ptr, w_ptr], rows, hidden, gate, eps)
}

#[cfg(llama32_cuda)]
mod imp {
    use std::ffi::c_void;

    use cudarc::driver::CudaStream;

    use super::super::ffi;
    use super::{BiasAct, EmbedShape, GatherShape, Im2colShape, LayerNormArgs};
    use crate::Result;

    pub(super) fn im2col(op: &str, stream: &CudaStream, s: &Im2colShape, px: u64, out: u64) -> Result<()> {
        let params = ffi::l32_vision_im2col_params {
            out: out as *mut c_void,
            pixels: px as *const f32,
            tiles: s.tiles as i64,
            channels: s.channels as i32,
            side: s.side as i32,
            patch: s.patch as i32,
            k_pad: s.k_pad as i32,
        };
        let raw = super::super::raw_stream(op, stream)?;
        // SAFETY: both pointers come from live device buffers whose lengths the wrapper checked.
        let status = unsafe { ffi::l32_vision_im2col(&params, raw) };
        super::super::check_launch(op, stream, status, || format!("{op} ({s:?})"))
    }

    pub(super) fn embed(op: &str, stream: &CudaStream, s: &EmbedShape, p: [u64; 9], gate: f32, eps: f32) -> Result<()> {
        let [out, conv, cls, pre_add, pos, tpos, ar_ids, lw, lb] = p;
        let params = ffi::l32_vision_embed_params {
            out: out as *mut f32,
            conv: conv as *const c_void,
            class_embedding: cls as *const f32,
            pre_add: pre_add as *const f32,
            position: pos as *const f32,
            tile_position: tpos as *const c_void,
            ar_ids: ar_ids as *const u32,
            ln_weight: lw as *const f32,
            ln_bias: lb as *const f32,
            images: s.images as i64,
            tiles: s.tiles as i32,
            num_patches: s.num_patches as i32,
            padded: s.padded as i32,
            hidden: s.hidden as i32,
            ar_rows: s.ar_rows as i32,
            pos_gate: gate,
            eps,
        };
        let raw = super::super::raw_stream(op, stream)?;
        // SAFETY: every pointer comes from a live device buffer whose length the wrapper checked.
        let status = unsafe { ffi::l32_vision_embed(&params, raw) };
        super::super::check_launch(op, stream, status, || format!("{op} ({s:?})"))
    }

    pub(super) fn layer_norm(op: &str, stream: &CudaStream, a: &LayerNormArgs, p: [u64; 8]) -> Result<()> {
        let [residual, delta, delta_bias, out, out_f32, post_add, weight, bias] = p;
        let params = ffi::l32_vision_layer_norm_params {
            residual: residual as *mut f32,
            delta: delta as *const c_void,
            delta_bias: delta_bias as *const f32,
            out: out as *mut c_void,
            out_f32: out_f32 as *mut f32,
            post_add: post_add as *const f32,
            weight: weight as *const f32,
            bias: bias as *const f32,
            rows: a.rows as i64,
            rows_per_group: a.rows_per_group as i64,
            width: a.width as i32,
            gate: a.gate,
            eps: a.eps,
        };
        let raw = super::super::raw_stream(op, stream)?;
        // SAFETY: every non-null pointer comes from a live device buffer whose length the wrapper checked.
        let status = unsafe { ffi::l32_vision_layer_norm(&params, raw) };
        super::super::check_launch(op, stream, status, || format!("{op} (rows {}, width {})", a.rows, a.width))
    }

    pub(super) fn bias_act(
        op: &str,
        stream: &CudaStream,
        x: u64,
        bias: u64,
        rows: usize,
        cols: usize,
        act: BiasAct,
    ) -> Result<()> {
        let params = ffi::l32_bias_act_params {
            out: x as *mut c_void,
            x: x as *const c_void,
            bias: bias as *const f32,
            rows: rows as i64,
            cols: cols as i64,
            act: match act {
                BiasAct::None => ffi::l32_bias_act_kind::L32_BIAS_ACT_NONE,
                BiasAct::Gelu => ffi::l32_bias_act_kind::L32_BIAS_ACT_GELU,
            },
        };
        let raw = super::super::raw_stream(op, stream)?;
        // SAFETY: both pointers come from live device buffers whose lengths the wrapper checked.
        let status = unsafe { ffi::l32_bias_act(&params, raw) };
        super::super::check_launch(op, stream, status, || format!("{op} (rows {rows}, cols {cols})"))
    }

    pub(super) fn gather(op: &str, stream: &CudaStream, s: &GatherShape, out: u64, f: u64, i: u64) -> Result<()> {
        let params = ffi::l32_vision_gather_params {
            out: out as *mut c_void,
            final_state: f as *const f32,
            inter: i as *const f32,
            tiles_total: s.tiles_total as i64,
            num_patches: s.num_patches as i32,
            padded: s.padded as i32,
            hidden: s.hidden as i32,
            n_inter: s.n_inter as i32,
        };
        let raw = super::super::raw_stream(op, stream)?;
        // SAFETY: every pointer comes from a live device buffer whose length the wrapper checked.
        let status = unsafe { ffi::l32_vision_gather(&params, raw) };
        super::super::check_launch(op, stream, status, || format!("{op} ({s:?})"))
    }

    pub(super) fn gated_rms_norm(
        op: &str,
        stream: &CudaStream,
        p: [u64; 5],
        rows: usize,
        hidden: usize,
        gate: f32,
        eps: f32,
    ) -> Result<()> {
        let [residual, delta, scale, out, weight] = p;
        let params = ffi::l32_gated_rms_norm_params {
            residual: residual as *mut c_void,
            delta: delta as *const c_void,
            row_scale: scale as *const f32,
            out: out as *mut c_void,
            weight: weight as *const c_void,
            rows: rows as i64,
            hidden: hidden as i32,
            gate,
            eps,
        };
        let raw = super::super::raw_stream(op, stream)?;
        // SAFETY: every non-null pointer comes from a live device buffer whose length the wrapper checked.
        let status = unsafe { ffi::l32_gated_rms_norm(&params, raw) };
        super::super::check_launch(op, stream, status, || format!("{op} (rows {rows}, hidden {hidden})"))
    }
}

#[cfg(not(llama32_cuda))]
mod imp {
    use cudarc::driver::CudaStream;

    use super::{BiasAct, EmbedShape, GatherShape, Im2colShape, LayerNormArgs};
    use crate::Result;

    pub(super) fn im2col(_: &str, _: &CudaStream, _: &Im2colShape, _: u64, _: u64) -> Result<()> {
        super::super::ensure_built()
    }
    pub(super) fn embed(_: &str, _: &CudaStream, _: &EmbedShape, _: [u64; 9], _: f32, _: f32) -> Result<()> {
        super::super::ensure_built()
    }
    pub(super) fn layer_norm(_: &str, _: &CudaStream, _: &LayerNormArgs, _: [u64; 8]) -> Result<()> {
        super::super::ensure_built()
    }
    pub(super) fn bias_act(_: &str, _: &CudaStream, _: u64, _: u64, _: usize, _: usize, _: BiasAct) -> Result<()> {
        super::super::ensure_built()
    }
    pub(super) fn gather(_: &str, _: &CudaStream, _: &GatherShape, _: u64, _: u64, _: u64) -> Result<()> {
        super::super::ensure_built()
    }
    pub(super) fn gated_rms_norm(
        _: &str,
        _: &CudaStream,
        _: [u64; 5],
        _: usize,
        _: usize,
        _: f32,
        _: f32,
    ) -> Result<()> {
        super::super::ensure_built()
    }
}
