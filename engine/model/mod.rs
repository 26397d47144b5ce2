//! The Llama decoder, written once over the [`Ops`] trait. Backends supply the kernels and own the weights,
//! activations and KV cache; this module only says in which order things happen.
//!
//! ```text
//! x = embed(ids)
//! for each layer l:
//!     h = rms_norm(x (+= previous delta), attn_norm[l])
//!     qkv = h @ Wqkv[l]^T ; rope(q, k) ; cache[slots] = k, v
//!     delta = attention(q, cache) @ Wo[l]^T
//!     h = rms_norm(x += delta, mlp_norm[l])
//!     delta = (silu(h @ Wgate^T) * (h @ Wup^T)) @ Wdown^T
//! logits = rms_norm(x += delta, final_norm)[logits_rows] @ lm_head^T   (rows gathered first unless all, in order)
//! ```

pub mod profile;

use crate::exec::StepInput;
use crate::Result;

/// A weight matrix of the model, named by role so each backend can keep its own layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Linear {
    /// Fused q, k and v projections of a layer.
    Qkv(usize),
    /// Attention output projection of a layer.
    O(usize),
    /// Fused gate and up projections of a layer.
    GateUp(usize),
    /// Down projection of a layer.
    Down(usize),
    /// Output projection to the vocabulary.
    LmHead,
}

/// An RMSNorm weight of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    /// `input_layernorm` of a layer.
    Attn(usize),
    /// `post_attention_layernorm` of a layer.
    Mlp(usize),
    /// The final `model.norm`.
    Final,
}

/// The kernels a backend provides. Activations are `[rows, cols]` buffers of the backend's own type.
pub trait Ops {
    /// An activation buffer.
    type Act;

    /// Prepares per-step state (uploads metadata, sizes workspaces) before the layers run.
    fn begin_step(&mut self, step: &StepInput) -> Result<()>;
    /// A `[rows, cols]` buffer; its contents are unspecified (the recipe writes every buffer before reading it).
    /// The recipe asks for buffers in the same order every step, so a backend may hand out pooled buffers.
    fn alloc(&mut self, rows: usize, cols: usize) -> Result<Self::Act>;
    /// Gives a buffer from [`alloc`](Ops::alloc) back when the step no longer needs it.
    fn release(&mut self, act: Self::Act);
    /// Gathers embedding rows for the step's tokens into `out`.
    fn embed(&mut self, ids: &[u32], out: &mut Self::Act) -> Result<()>;
    /// `out = rms_norm(x)`.
    fn rms_norm(&mut self, x: &Self::Act, norm: Norm, out: &mut Self::Act) -> Result<()>;
    /// `residual += delta; out = rms_norm(residual)`.
    fn add_rms_norm(
        &mut self,
        residual: &mut Self::Act,
        delta: &Self::Act,
        norm: Norm,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// `out = x @ W^T`.
    fn linear(&mut self, x: &Self::Act, w: Linear, out: &mut Self::Act) -> Result<()>;
    /// Applies RoPE to q and k inside the fused `qkv` rows and writes k, v into layer `layer`'s cache slots.
    fn rope_and_cache(&mut self, layer: usize, qkv: &mut Self::Act, step: &StepInput) -> Result<()>;
    /// Causal attention of the q part of `qkv` over layer `layer`'s cache into `out` `[tokens, q_dim]`.
    fn attention(&mut self, layer: usize, qkv: &Self::Act, step: &StepInput, out: &mut Self::Act) -> Result<()>;
    /// `out = silu(gate) * up` over fused `[rows, 2 * inter]` input.
    fn silu_mul(&mut self, gate_up: &Self::Act, out: &mut Self::Act) -> Result<()>;
    /// `qkv = x @ W^T` for the fused QKV projection `w`, then [`rope_and_cache`](Self::rope_and_cache). A backend
    /// may do both in one kernel; the q part of `qkv` and the cache must then be what the two calls give (the k
    /// and v parts of `qkv` are not read afterwards, and may be left unwritten).
    fn linear_rope_cache(
        &mut self,
        x: &Self::Act,
        w: Linear,
        layer: usize,
        qkv: &mut Self::Act,
        step: &StepInput,
    ) -> Result<()> {
        self.linear(x, w, qkv)?;
        self.rope_and_cache(layer, qkv, step)
    }
    /// `out = silu_mul(x @ W^T)` for SwiGLU's fused gate_up projection `w`, with `gate_up` as the `[rows,
    /// 2 * inter]` buffer between the two. A backend may do both in one kernel and leave `gate_up` unwritten; the
    /// result must be what the two calls give.
    fn linear_silu_mul(
        &mut self,
        x: &Self::Act,
        w: Linear,
        gate_up: &mut Self::Act,
        out: &mut Self::Act,
    ) -> Result<()> {
        self.linear(x, w, gate_up)?;
        self.silu_mul(gate_up, out)
    }
    /// Bytes of projection `w`'s weight as this backend keeps it, which one call of `w` reads: the step
    /// profiler's bandwidth figure ([`profile`]). 0 when the backend does not say.
    fn weight_bytes(&self, w: Linear) -> usize {
        let _ = w;
        0
    }
    /// `out[i] = x[rows[i]]`.
    fn gather_rows(&mut self, x: &Self::Act, rows: &[u32], out: &mut Self::Act) -> Result<()>;

    /// Tensor parallelism: sums `x` over all ranks in place, so every rank holds the same total. The recipe calls
    /// it after the (vocab-parallel) embedding and after each row-parallel projection (`o`, `down`). A backend that
    /// runs the whole model keeps this default, which does nothing.
    fn all_reduce(&mut self, x: &mut Self::Act) -> Result<()> {
        let _ = x;
        Ok(())
    }

    /// Tensor parallelism: turns this rank's vocabulary slice of the logits, `[rows, vocab / tp]`, into the full
    /// `[rows, vocab]` (rank 0's slice first). A backend that runs the whole model keeps this default, which returns
    /// `local` unchanged.
    fn gather_logits(&mut self, local: Self::Act) -> Result<Self::Act> {
        Ok(local)
    }

    /// Runs every decoder layer of `step` at once, where the backend has such a path and the step qualifies (the
    /// CUDA backend's persistent decode stack). Afterwards `bufs.x` must hold the residual stream before the last
    /// layer's down projection and `bufs.delta` that projection's output, as after the recipe's loop, and the cache
    /// what the loop writes. Returns `false`, having done nothing, where it does not apply: the recipe then runs the
    /// layers one by one. The default never applies.
    fn decoder_layers(&mut self, bufs: LayerBufs<'_, Self::Act>, step: &StepInput) -> Result<bool> {
        let _ = (bufs, step);
        Ok(false)
    }
}

/// The recipe's activation buffers lent to [`Ops::decoder_layers`], `[tokens, width]` each.
pub struct LayerBufs<'a, A> {
    /// `[tokens, hidden]`: the embedding rows on entry, the residual stream on return.
    pub x: &'a mut A,
    /// `[tokens, hidden]`: the last layer's down projection on return.
    pub delta: &'a mut A,
    /// `[tokens, qkv]` scratch.
    pub qkv: &'a mut A,
    /// `[tokens, q_dim]` scratch.
    pub attn: &'a mut A,
    /// `[tokens, inter]` scratch.
    pub act: &'a mut A,
}

/// Widths the recipe needs from the config. For a tensor-parallel rank, take them from the rank's config
/// ([`crate::tp::TpPlan::rank_config`]): `qkv`, `q`, `inter` and `vocab` are then the rank's slices.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    /// Residual width.
    pub hidden: usize,
    /// q_dim + 2 * kv_dim.
    pub qkv: usize,
    /// q_dim.
    pub q: usize,
    /// MLP inner width.
    pub inter: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Decoder layers.
    pub layers: usize,
}

impl Dims {
    /// Widths of `cfg`.
    pub fn of(cfg: &crate::config::LlamaConfig) -> Self {
        Dims {
            hidden: cfg.hidden_size,
            qkv: cfg.q_dim() + 2 * cfg.kv_dim(),
            q: cfg.q_dim(),
            inter: cfg.intermediate_size,
            vocab: cfg.vocab_size,
            layers: cfg.num_hidden_layers,
        }
    }
}

/// Runs the decoder over one step and returns the logits of `step.logits_rows` as `[rows, vocab]`.
/// The step must already be validated.
///
/// Under tensor parallelism every rank runs this same recipe over its shard; the communication points are the
/// [`Ops::all_reduce`] calls (after the embedding, `o` and `down`) and [`Ops::gather_logits`] at the end, which
/// return the full vocabulary even though `d.vocab` is the rank's slice.
pub fn forward<O: Ops>(ops: &mut O, d: Dims, step: &StepInput) -> Result<O::Act> {
    ops.begin_step(step)?;
    let t = step.num_tokens();
    let mut x = ops.alloc(t, d.hidden)?;
    let mut h = ops.alloc(t, d.hidden)?;
    let mut delta = ops.alloc(t, d.hidden)?;
    let mut qkv = ops.alloc(t, d.qkv)?;
    let mut attn = ops.alloc(t, d.q)?;
    let mut gate_up = ops.alloc(t, 2 * d.inter)?;
    let mut act = ops.alloc(t, d.inter)?;
    if d.layers == 0 {
        return Err(crate::Error::Backend("a model needs at least one decoder layer".into()));
    }
    ops.embed(&step.token_ids, &mut x)?;
    ops.all_reduce(&mut x)?;
    let bufs = LayerBufs { x: &mut x, delta: &mut delta, qkv: &mut qkv, attn: &mut attn, act: &mut act };
    let layers = if ops.decoder_layers(bufs, step)? { 0 } else { d.layers };
    for l in 0..layers {
        if l == 0 {
            ops.rms_norm(&x, Norm::Attn(0), &mut h)?;
        } else {
            ops.add_rms_norm(&mut x, &delta, Norm::Attn(l), &mut h)?;
        }
        ops.linear_rope_cache(&h, Linear::Qkv(l), l, &mut qkv, step)?;
        ops.attention(l, &qkv, step, &mut attn)?;
        ops.linear(&attn, Linear::O(l), &mut delta)?;
        ops.all_reduce(&mut delta)?;
        ops.add_rms_norm(&mut x, &delta, Norm::Mlp(l), &mut h)?;
        ops.linear_silu_mul(&h, Linear::GateUp(l), &mut gate_up, &mut act)?;
        ops.linear(&act, Linear::Down(l), &mut delta)?;
        ops.all_reduce(&mut delta)?;
    }
    let rows = step.logits_rows.len();
    // xr and dr are asked for even when unused, so that every step asks for buffers in the same order.
    let mut xr = ops.alloc(rows, d.hidden)?;
    let mut dr = ops.alloc(rows, d.hidden)?;
    let mut hr = ops.alloc(rows, d.hidden)?;
    if rows == t && step.logits_rows.iter().enumerate().all(|(i, &r)| r as usize == i) {
        // Every row in order (a decode step): the gathers would copy x and delta whole.
        ops.add_rms_norm(&mut x, &delta, Norm::Final, &mut hr)?;
    } else {
        ops.gather_rows(&x, &step.logits_rows, &mut xr)?;
        ops.gather_rows(&delta, &step.logits_rows, &mut dr)?;
        ops.add_rms_norm(&mut xr, &dr, Norm::Final, &mut hr)?;
    }
    let mut logits = ops.alloc(rows, d.vocab)?;
    ops.linear(&hr, Linear::LmHead, &mut logits)?;
    let logits = ops.gather_logits(logits)?;
    for a in [x, h, delta, qkv, attn, gate_up, act, xr, dr, hr] {
        ops.release(a);
    }
    Ok(logits)
}
