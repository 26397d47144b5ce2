//! The RMSNorm prologue fusion of [`CudaOps`] (`--fused-norm`): at decode, `add_rms_norm` launches nothing and the
//! bf16 projection that reads its output (QKV after the attention norm, gate_up after the MLP norm) normalizes its
//! input rows itself, in the skinny GEMM's prologue ([`k::gemv::NormPrologue`]), with the same bits. That is one
//! kernel and one `[rows, hidden]` round trip less per norm, two per layer.
//!
//! The recipe calls the consuming projection right after the norm. Any other operation while a norm is deferred is
//! an error (it would read a buffer the norm has not written), never a silently wrong result.

use super::*;

/// A norm deferred into the prologue of the projection `target`, whose input is the activation in pool slot `slot`
/// (the norm's `out`, left unwritten).
pub(super) struct PendingNorm {
    slot: usize,
    target: Linear,
    prologue: k::gemv::NormPrologue,
}

impl CudaOps {
    /// The projection the output of norm `n` over `rows` rows feeds, when that projection runs on the skinny GEMM
    /// and its prologue can take the norm: the fusion is on, the weight is bf16, and the rows fit the prologue.
    fn norm_gemv_target(&self, n: Norm, rows: usize) -> Option<Linear> {
        if !self.fuse_norm || !self.skinny_gemm {
            return None;
        }
        let target = match n {
            Norm::Attn(l) if l < self.layers.len() => Linear::Qkv(l),
            Norm::Mlp(l) if l < self.layers.len() => Linear::GateUp(l),
            _ => return None,
        };
        let lm_head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let (weight, cols) = linear_weight(&self.cfg, &self.layers, lm_head, target);
        let hidden = self.cfg.hidden_size;
        let dense = matches!(weight, WeightRef::Dense(_));
        (dense && cols <= SKINNY_MAX_N && k::gemv::NormPrologue::fits(rows, hidden)).then_some(target)
    }

    /// `residual += delta; out = rms_norm(residual)` deferred into the next projection's prologue, when
    /// [`norm_gemv_target`](Self::norm_gemv_target) allows it; false (nothing done) otherwise.
    pub(super) fn defer_add_rms_norm(
        &mut self,
        residual: &mut CudaAct,
        delta: &CudaAct,
        n: Norm,
        out: &CudaAct,
    ) -> Result<bool> {
        let rows = residual.rows;
        let Some(target) = self.norm_gemv_target(n, rows) else {
            return Ok(false);
        };
        if self.norm_counter.is_none() {
            if self.capturing {
                return Ok(false);
            }
            self.norm_counter = Some(self.stream.alloc_zeros::<u32>(1).map_err(drv("allocate the norm counter"))?);
            self.generation += 1;
        }
        let h = self.cfg.hidden_size;
        let len = rows * h;
        let weight = match n {
            Norm::Attn(l) => &self.layers[l].attn_norm,
            Norm::Mlp(l) => &self.layers[l].mlp_norm,
            Norm::Final => &self.final_norm,
        };
        let counter = self.norm_counter.as_mut().ok_or_else(|| Error::Backend("norm counter missing".into()))?;
        // SAFETY: `residual` and `delta` are the recipe's activations, lent until the end of the step; the weight
        // and the counter live as long as the executor. The prologue is consumed by the very next operation, the
        // projection reading `out` (`take_norm`), and every other operation refuses to run while it is pending
        // (`no_pending_norm`), so nothing else touches these buffers before that launch.
        let prologue = unsafe {
            k::gemv::NormPrologue::new(
                &self.stream,
                &mut residual.buf.slice_mut(..len),
                Some(&delta.buf.slice(..len)),
                weight,
                Some(counter),
                self.cfg.rms_norm_eps,
                (rows, h),
            )?
        };
        self.pending_norm = Some(PendingNorm { slot: out.slot, target, prologue });
        Ok(true)
    }

    /// An error when a norm is deferred: `op` must not run before the projection that takes it.
    pub(super) fn no_pending_norm(&self, op: &str) -> Result<()> {
        match &self.pending_norm {
            None => Ok(()),
            Some(p) => Err(Error::Backend(format!(
                "{op}: a norm deferred into {:?} is still pending (its output was never written)",
                p.target
            ))),
        }
    }
}

/// The deferred norm (`pending`, taken) that the projection `w` of input `x` must take, if any. An error when a norm
/// is pending for another projection or input. A free function over the one field, so that callers may hold other
/// borrows of the executor.
pub(super) fn take_norm(
    pending: &mut Option<PendingNorm>,
    x: &CudaAct,
    w: Linear,
) -> Result<Option<k::gemv::NormPrologue>> {
    match pending.take() {
        None => Ok(None),
        Some(p) if p.slot == x.slot && p.target == w => Ok(Some(p.prologue)),
        Some(p) => Err(Error::Backend(format!(
            "linear {w:?}: a norm deferred into {:?} is still pending (its output was never written)",
            p.target
        ))),
    }
}
