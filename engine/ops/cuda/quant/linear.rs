//! [`CudaQuantLinear`]: a quantized projection laid out for its scheme and uploaded to the device.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;

use super::{layout_w4a16, layout_w4a16_paired, layout_w4a8};
use crate::quant::{ActQuant, QuantLinear, Scheme};
use crate::{Error, Result};

fn bytes_of_bf16(v: &[bf16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
}

fn bytes_of_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A quantized projection on the device, in the kernels' layout for its scheme.
pub struct CudaQuantLinear {
    scheme: Scheme,
    pub(super) n: usize,
    pub(super) k: usize,
    has_zeros: bool,
    pub(super) qweight: CudaSlice<u8>,
    /// bf16 (W4A16) or f32 (W4A8) entries, as bytes.
    pub(super) scales: CudaSlice<u8>,
    pub(super) zeros: Option<CudaSlice<u8>>,
    /// W4A8 only.
    pub(super) row_corr: Option<CudaSlice<f32>>,
    /// W4A16 with SwiGLU's rows paired ([`layout_w4a16_paired`]): `n / 2`; else 0.
    pub(super) pair_half: usize,
}

impl CudaQuantLinear {
    /// Reorders `w` for its scheme and uploads it on `stream`.
    pub fn upload(stream: &Arc<CudaStream>, w: &QuantLinear) -> Result<Self> {
        Self::upload_with(stream, w, false)
    }

    /// [`upload`](Self::upload) for SwiGLU's fused `[gate; up]` projection: a W4A16 weight whose half `n / 2` is a
    /// multiple of 8 goes up with its rows paired ([`layout_w4a16_paired`]), so that
    /// [`w4a16_gemm_silu`](super::w4a16_gemm_silu) can apply SiLU * up as it writes; any other weight goes up as
    /// [`upload`](Self::upload) does. Either way the plain product is the same matrix.
    pub fn upload_swiglu(stream: &Arc<CudaStream>, w: &QuantLinear) -> Result<Self> {
        Self::upload_with(stream, w, true)
    }

    fn upload_with(stream: &Arc<CudaStream>, w: &QuantLinear, swiglu: bool) -> Result<Self> {
        let up_err = |e: cudarc::driver::DriverError| Error::Backend(format!("upload quantized weights: {e}"));
        let m = &w.matrix;
        match w.scheme.act {
            ActQuant::None => {
                let paired = swiglu && m.n.is_multiple_of(16) && m.n > 0;
                let h = if paired { layout_w4a16_paired(m)? } else { layout_w4a16(m)? };
                Ok(CudaQuantLinear {
                    scheme: w.scheme,
                    n: m.n,
                    k: m.k,
                    pair_half: if paired { m.n / 2 } else { 0 },
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
                    pair_half: 0,
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

    /// True for a W4A16 `[gate; up]` weight uploaded with its rows paired
    /// ([`upload_swiglu`](Self::upload_swiglu)): [`w4a16_gemm_silu`](super::w4a16_gemm_silu) takes it.
    pub fn swiglu_paired(&self) -> bool {
        self.pair_half > 0
    }

    /// True when the weights have zero points (asymmetric Hugging Face formats).
    pub fn has_zeros(&self) -> bool {
        self.has_zeros
    }

    /// The W4A16 layout's int4 tiles and bf16 scales (as bytes), for kernels outside this module that read the
    /// layout (the persistent decode stack). For W4A8 the scales are f32.
    pub fn w4a16_parts(&self) -> (&CudaSlice<u8>, &CudaSlice<u8>) {
        (&self.qweight, &self.scales)
    }

    /// Device bytes held (weights, scales, zero points, row constants).
    pub fn device_bytes(&self) -> usize {
        self.qweight.len()
            + self.scales.len()
            + self.zeros.as_ref().map_or(0, |z| z.len())
            + self.row_corr.as_ref().map_or(0, |r| r.len() * 4)
    }
}
