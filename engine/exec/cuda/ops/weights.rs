//! The projection weights of [`CudaOps`](super::CudaOps) by role: which buffer a [`Linear`] names, bf16 or int4,
//! and its output width.

use cudarc::driver::CudaSlice;
use half::bf16;

use super::{DeviceLayer, DeviceLinear, DeviceTable, Int8Lm};
use crate::config::LlamaConfig;
use crate::model::Linear;
use crate::ops::cuda as k;
use crate::{Error, Result};

/// The weight of projection `w` and its output width.
pub(super) fn linear_weight<'a>(
    cfg: &LlamaConfig,
    layers: &'a [DeviceLayer],
    lm_head: &'a DeviceTable,
    w: Linear,
) -> (WeightRef<'a>, usize) {
    let c = cfg;
    let dense_or_quant = |d: &'a DeviceLinear| match d {
        DeviceLinear::Dense(s) => WeightRef::Dense(s),
        DeviceLinear::Quant(q) => WeightRef::Quant(q.as_ref()),
    };
    match w {
        Linear::Qkv(l) => (dense_or_quant(&layers[l].wqkv), c.q_dim() + 2 * c.kv_dim()),
        Linear::O(l) => (dense_or_quant(&layers[l].wo), c.hidden_size),
        Linear::GateUp(l) => (dense_or_quant(&layers[l].w_gate_up), 2 * c.intermediate_size),
        Linear::Down(l) => (dense_or_quant(&layers[l].w_down), c.hidden_size),
        Linear::LmHead => match lm_head {
            DeviceTable::Bf16(s) => (WeightRef::Dense(s), c.vocab_size),
            DeviceTable::Int8(t) => (WeightRef::Int8(t.as_ref()), c.vocab_size),
        },
    }
}

/// Checks that projection `w`'s bf16 weight holds `n x kdim` values.
pub(super) fn check_dense(w: Linear, weight: &CudaSlice<bf16>, n: usize, kdim: usize) -> Result<()> {
    if weight.len() != n * kdim {
        return Err(Error::Backend(format!(
            "linear {w:?}: weight has {} elements, expected {n} x {kdim}",
            weight.len()
        )));
    }
    Ok(())
}

/// A projection's weight, borrowed.
pub(super) enum WeightRef<'a> {
    Dense(&'a CudaSlice<bf16>),
    Quant(&'a k::quant::CudaQuantLinear),
    /// An int8 `lm_head` (int8-embeddings models).
    Int8(&'a Int8Lm),
}

impl WeightRef<'_> {
    /// Device bytes of the weight (for int4: weights, scales, zero points and row constants).
    pub(super) fn device_bytes(&self) -> usize {
        match self {
            WeightRef::Dense(s) => s.len() * 2,
            WeightRef::Quant(q) => q.device_bytes(),
            WeightRef::Int8(t) => t.table_bytes(),
        }
    }
}
