//! Llama 3.2 Vision on CUDA: the vision encoder and projector ([`encoder::CudaVisionEncoder`]) and the text decoder
//! with cross-attention layers ([`text::MllamaCudaExecutor`]), bf16 weights and activations with f32 accumulation.
//!
//! # Kernels
//! GEMMs go through cuBLASLt (and the skinny `gemv` kernel for decode rows); the vision-specific kernels are in
//! `kernels/vision/` ([`crate::ops::cuda::vision`]) with CPU twins in [`twins`]. Text self-attention reuses the
//! paged prefill/decode kernels of the text models (head_dim 64 or 128) or, for other head dims, the generic
//! gather attention. Cross-attention uses the same kernels over a second paged pool per cross layer whose blocks
//! are whole tiles (`block_size = num_patches`): a row's block table lists the tiles it may see, so the
//! processor's cross-attention mask becomes block tables and a masked tile costs nothing.
//!
//! # Numerics
//! The vision encoder keeps its residual stream in f32 (transformers' bf16 model rounds it to bf16), with
//! LayerNorm statistics in f32, GEMM inputs and outputs in bf16; the text decoder follows the text models' bf16
//! numerics (HF's rounding points). Attention on the generic kernel is f32 throughout.

pub mod encoder;
pub mod text;
pub mod twins;

use crate::exec::cuda::blas::Blas;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::{Error, Result};

pub(crate) fn drv(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Backend(format!("{what}: {e}"))
}

/// Uploads f32 values as bf16.
pub(crate) fn upload_bf16(stream: &std::sync::Arc<CudaStream>, v: &[f32]) -> Result<CudaSlice<bf16>> {
    let host: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
    stream.clone_htod(&host).map_err(drv("upload weights"))
}

/// Uploads f32 values.
pub(crate) fn upload_f32(stream: &std::sync::Arc<CudaStream>, v: &[f32]) -> Result<CudaSlice<f32>> {
    stream.clone_htod(v).map_err(drv("upload weights"))
}

/// `out[rows, n] = x[rows, k] @ w[n, k]^T` through cuBLASLt (bf16 in and out, f32 accumulation): the text
/// executor's GEMM.
pub(crate) fn gemm<I: DevicePtr<bf16>>(
    blas: &Blas,
    x: &I,
    w: &I,
    (rows, kdim, n): (usize, usize, usize),
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    blas.gemm(x, w, rows, kdim, n, out)
}

/// Opens device `ordinal` with one non-default stream and cuBLASLt on it (cudarc's event tracking off: one stream
/// orders everything, which CUDA graph capture needs).
pub(crate) fn open_stream(ordinal: usize) -> Result<(std::sync::Arc<CudaStream>, Blas)> {
    crate::ops::cuda::probe()?;
    let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(drv("open CUDA device"))?;
    // SAFETY: called before any buffer of this context exists; all work goes to the single stream below.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().map_err(drv("create stream"))?;
    let blas = Blas::new(&stream)?;
    Ok((stream, blas))
}
