//! The decoder's forward pass over a begun step: self-attention and cross-attention layers, the gated residual
//! updates, the final norm and the logits rows, with the attention dispatch and the projection helpers.

use std::sync::Arc;

use crate::exec::cuda::blas::Blas;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use half::bf16;

use super::super::drv;
use super::{Acts, Layer, Meta, MllamaCudaExecutor, Sizes};
use crate::exec::cuda::dense::SKINNY_MAX_N;
use crate::exec::cuda::quant_bufs::{project, project_silu, DeviceLinear, DeviceTable, QuantBuffers};
use crate::exec::StepInput;
use crate::ops::cpu::attention::PagedLayout;
use crate::ops::cuda as k;
use crate::ops::cuda::vision as kv;
use crate::{Error, Result};

/// The calls [`MllamaCudaExecutor::set_ablation`] can leave out of the decoder's steps (see
/// `crate::model::profile` for the text recipe's): every norm kernel, each self-attention layer's QKV projection,
/// RoPE + cache write and attention, the output projections of both layer kinds, the MLP's two halves, the cross
/// layers' q projection (with its q_norm) and attention, and lm_head.
pub const VISION_ABLATABLE: [&str; 10] = [
    "add_rms_norm",
    "linear qkv",
    "rope+cache",
    "attention",
    "linear o",
    "linear gate_up+silu_mul",
    "linear down",
    "linear q",
    "cross attention",
    "linear lm_head",
];

/// Which kinds of call a step leaves out (all false: the full step).
#[derive(Clone, Copy, Debug, Default)]
struct Ablation {
    norm: bool,
    qkv: bool,
    rope: bool,
    attention: bool,
    o: bool,
    gate_up: bool,
    down: bool,
    cross_q: bool,
    cross_attention: bool,
    lm_head: bool,
}

impl Ablation {
    fn of(labels: &[&'static str]) -> Self {
        let has = |l: &str| labels.contains(&l);
        Ablation {
            norm: has("add_rms_norm"),
            qkv: has("linear qkv"),
            rope: has("rope+cache"),
            attention: has("attention"),
            o: has("linear o"),
            gate_up: has("linear gate_up+silu_mul"),
            down: has("linear down"),
            cross_q: has("linear q"),
            cross_attention: has("cross attention"),
            lm_head: has("linear lm_head"),
        }
    }
}

impl MllamaCudaExecutor {
    /// Leaves out every later step's calls under `labels` ([`VISION_ABLATABLE`]; empty: the full steps) and drops
    /// the graphs captured so far: a run's decode time without them, against a full run, is their marginal cost.
    /// The outputs are then meaningless. A tensor-parallel rank refuses a non-empty list.
    pub fn set_ablation(&mut self, labels: Vec<&'static str>) -> Result<()> {
        crate::model::profile::check_ablation(&labels, &VISION_ABLATABLE, "the vision decoder")?;
        if !labels.is_empty() && self.tp.is_some() {
            return Err(Error::request("--ablate: a tensor-parallel rank cannot leave calls out"));
        }
        self.ablate = labels;
        self.graphs.clear();
        Ok(())
    }

    /// Attention of the q rows (`q`, stride `q_stride`) over a paged pool: the tensor-core kernels when the head
    /// shape allows, else the generic gather kernel. `cross` picks the cross-attention metadata.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        stream: &Arc<CudaStream>,
        this: (&Meta, &Sizes, bool),
        layout: &PagedLayout,
        (q, q_stride): (&CudaView<'_, bf16>, usize),
        (kc, vc): (&CudaSlice<bf16>, &CudaSlice<bf16>),
        workspace: &mut CudaSlice<u8>,
        out: &mut CudaViewMut<'_, bf16>,
        cross: bool,
    ) -> Result<()> {
        let (m, sz, fast) = this;
        let t = sz.tokens;
        let (positions, cu, tables, seq_of, seqs, width, max_q, num_splits) = if cross {
            (&m.x_positions, &m.x_cu, &m.x_tables, &m.x_seq_of_token, sz.runs, sz.x_width, sz.x_max_query, sz.x_splits)
        } else {
            (&m.positions, &m.cu_seqlens, &m.block_tables, &m.seq_of_token, sz.seqs, sz.width, sz.max_query, sz.splits)
        };
        let positions = positions.slice(..t);
        let tables = tables.slice(..seqs * width);
        if fast {
            let qr = k::attention::QueryRows { qkv: q, stride: q_stride };
            let pools = k::attention::KvPools { layout: *layout, k: kc, v: vc };
            if seqs == t {
                let dm = k::attention::DecodeMeta {
                    positions: &positions,
                    block_tables: &tables,
                    max_blocks_per_seq: width,
                    num_splits,
                };
                return k::attention::paged_decode(stream, &qr, &pools, &dm, workspace, out);
            }
            let cu = cu.slice(..seqs + 1);
            let pm = k::attention::PrefillMeta {
                positions: &positions,
                cu_seqlens: &cu,
                block_tables: &tables,
                max_blocks_per_seq: width,
                max_query_len: max_q,
            };
            return k::attention::paged_prefill(stream, &qr, &pools, &pm, out);
        }
        let shape = kv::GatherAttnShape {
            num_heads: layout.num_heads,
            num_kv_heads: layout.num_kv_heads,
            head_dim: layout.head_dim,
            block_size: layout.block_size,
            max_blocks_per_seq: width,
            q_stride,
            out_stride: layout.num_heads * layout.head_dim,
            kv_stride: layout.num_kv_heads * layout.head_dim,
            scale: 1.0 / (layout.head_dim as f32).sqrt(),
        };
        let seq_of = seq_of.slice(..t);
        let (kv_k, kv_v) = (kc.slice(..), vc.slice(..));
        let io = kv::GatherAttnIo::<_, _, CudaSlice<u8>> {
            q,
            k: &kv_k,
            v: &kv_v,
            seq_of_query: &seq_of,
            positions: &positions,
            block_tables: &tables,
            flags: None,
        };
        kv::gather_attention(stream, &shape, &io, out)
    }

    /// Runs the decoder over a begun step; the logits are in `acts.logits` (`[logits_rows, vocab]`).
    pub(super) fn forward(&mut self, sz: Sizes, logits_rows: usize) -> Result<()> {
        let c = self.cfg.text.base.clone();
        let (hidden, q_dim, kv_dim, inter, eps) =
            (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size, c.rms_norm_eps);
        let qkv_w = q_dim + 2 * kv_dim;
        let t = sz.tokens;
        let s = self.stream.clone();
        let a = &mut self.acts;
        let m = &self.meta;
        // A tensor-parallel rank's collectives; none for the whole model.
        let rank = self.tp.as_ref();
        let comm = match rank {
            Some(r) => Some(r.comm.as_deref().ok_or_else(|| no_comm(r.rank))?),
            None => None,
        };
        let reduce = |buf: &mut CudaSlice<bf16>, n: usize| -> Result<()> {
            match comm {
                Some(c) => c.all_reduce_sum_bf16(&s, &mut buf.slice_mut(..n)),
                None => Ok(()),
            }
        };
        match rank {
            // Vocab-parallel: the ids staged by `stage_rank_ids` (other ranks' ids embed as zeros), then the sum.
            Some(r) if r.split_embed => {
                self.embed.embed(&s, hidden, &r.ids.slice(..t), &mut a.x.slice_mut(..t * hidden))?;
                reduce(&mut a.x, t * hidden)?;
            }
            _ => self.embed.embed(&s, hidden, &m.ids.slice(..t), &mut a.x.slice_mut(..t * hidden))?,
        }
        // The residual update still to apply before the next norm: none, plain add, or gated (gate, scale buffer).
        enum Pending {
            None,
            Plain,
            Gated(f32, bool),
        }
        let mut pending = Pending::None;
        let ab = Ablation::of(&self.ablate);
        let norm = |a: &mut Acts, pending: &Pending, weight: &CudaSlice<bf16>| -> Result<()> {
            if ab.norm {
                return Ok(());
            }
            let (x, d, h) = (&mut a.x, &a.delta, &mut a.h);
            match *pending {
                Pending::None => {
                    k::norm::rms_norm(&s, &x.slice(..t * hidden), weight, eps, hidden, &mut h.slice_mut(..t * hidden))
                }
                Pending::Plain => k::norm::add_rms_norm(
                    &s,
                    &mut x.slice_mut(..t * hidden),
                    &d.slice(..t * hidden),
                    weight,
                    eps,
                    hidden,
                    &mut h.slice_mut(..t * hidden),
                ),
                Pending::Gated(gate, mlp) => {
                    // The gated residual update, then the plain norm kernel: a row whose scale is 0 keeps its
                    // residual and gets exactly the norm it gets when the cross layer is skipped (the fused
                    // gated norm would sum its squares in another order), so a decode graph that always runs the
                    // cross layers gives text-only rows the eager (skipping) result bit for bit.
                    let scale = if mlp { m.mlp_scale.slice(..t) } else { m.attn_scale.slice(..t) };
                    kv::gated_rms_norm::<_, _, _, CudaSlice<bf16>, CudaSlice<bf16>>(
                        &s,
                        &mut x.slice_mut(..t * hidden),
                        &d.slice(..t * hidden),
                        Some(&scale),
                        gate,
                        eps,
                        hidden,
                        None,
                    )?;
                    k::norm::rms_norm(&s, &x.slice(..t * hidden), weight, eps, hidden, &mut h.slice_mut(..t * hidden))
                }
            }
        };
        let this = (&self.meta, &sz, self.fast_attn);
        // Projections: bf16 through the skinny kernel or cuBLASLt, quantized ones through their kernels (whose
        // buffers may grow outside graph capture; a move makes the captured graphs stale).
        let mut moved = false;
        let (blas, qbufs) = (&self.blas, &mut self.qbufs);
        let mode = (self.opts.skinny_gemm, self.num_sms, self.capturing);
        // With `silu`, `w` is the [gate; up] projection and `out` gets SiLU * up (`project_silu`).
        let mut lin = |x: &CudaView<'_, bf16>,
                       w: &DeviceLinear,
                       dims: (usize, usize, usize),
                       out: &mut CudaViewMut<'_, bf16>,
                       silu: bool| {
            if dims.2 > 0 {
                let io = (x, dims.0, dims.1, dims.2);
                moved |= if silu {
                    project_silu(&s, (mode.1, mode.2), (w, &mut *qbufs), io, out)?
                } else {
                    project(&s, blas, mode, (w, &mut *qbufs), io, out)?
                };
            }
            Ok::<(), Error>(())
        };
        // The MLP over the normalized rows `a.h` (gate_up, SiLU * up, down into `a.delta`), summed over the ranks. A
        // bf16 gate_up on the skinny GEMM applies SiLU * up in its epilogue (same bits, one launch less).
        type Lin<'l> =
            dyn FnMut(&CudaView<'_, bf16>, &DeviceLinear, Dims, &mut CudaViewMut<'_, bf16>, bool) -> Result<()> + 'l;
        let fuse_silu = self.opts.skinny_gemm && self.opts.fuse_swiglu && k::gemv::supports(t, hidden);
        let fuse_silu_quant = self.opts.fuse_swiglu;
        // The self-attention layers' norms in the prologue of their bf16 QKV and gate_up skinny GEMMs (`--fused-norm`).
        let fuse_norm = self.opts.skinny_gemm && self.opts.fuse_norm && k::gemv::NormPrologue::fits(t, hidden);
        // The norm prologue over the residual `a.x` (with the residual add of `a.delta` when `add`).
        let prologue = |a: &mut Acts, add: bool, weight: &CudaSlice<bf16>| -> Result<k::gemv::NormPrologue> {
            let delta = a.delta.slice(..t * hidden);
            // SAFETY: the prologue is consumed by the next launch on this stream (the projection right below each
            // call); the buffers belong to this executor and nothing else touches them in between.
            unsafe {
                k::gemv::NormPrologue::new(
                    &s,
                    &mut a.x.slice_mut(..t * hidden),
                    add.then_some(&delta),
                    weight,
                    Some(&mut a.norm_counter),
                    eps,
                    (t, hidden),
                )
            }
        };
        // The MLP over the normalized rows `a.h`, or with `pro` over the rows its prologue normalizes (gate_up,
        // SiLU * up, down into `a.delta`), summed over the ranks.
        let mlp = |a: &mut Acts,
                   lin: &mut Lin<'_>,
                   (w_gate_up, w_down): (&DeviceLinear, &DeviceLinear),
                   pro: Option<k::gemv::NormPrologue>|
         -> Result<()> {
            let (h, gu, act) = (t * hidden, t * 2 * inter, t * inter);
            match (w_gate_up, pro) {
                _ if ab.gate_up => {}
                (DeviceLinear::Dense(wgu), Some(p)) if fuse_silu => {
                    k::gemv::gemv_gate_up_silu(&s, &p, wgu, t, hidden, inter, &mut a.act.slice_mut(..act))?;
                }
                (_, Some(_)) => return Err(Error::Backend("a norm prologue needs the fused bf16 gate_up".into())),
                (DeviceLinear::Dense(wgu), None) if fuse_silu => {
                    let x = a.h.slice(..h);
                    k::gemv::gemv_gate_up_silu(&s, &x, wgu, t, hidden, inter, &mut a.act.slice_mut(..act))?;
                }
                // A W4A16 gate_up uploaded with its rows paired applies SiLU * up as its kernel writes (same bits).
                (DeviceLinear::Quant(q), None) if fuse_silu_quant && QuantBuffers::silu_fusable(q, t) => {
                    lin(&a.h.slice(..h), w_gate_up, (t, hidden, 2 * inter), &mut a.act.slice_mut(..act), true)?;
                }
                _ => {
                    lin(&a.h.slice(..h), w_gate_up, (t, hidden, 2 * inter), &mut a.gate_up.slice_mut(..gu), false)?;
                    k::activation::silu_mul(&s, &a.gate_up.slice(..gu), inter, &mut a.act.slice_mut(..act))?;
                }
            }
            if !ab.down {
                lin(&a.act.slice(..act), w_down, (t, inter, hidden), &mut a.delta.slice_mut(..h), false)?;
            }
            reduce(&mut a.delta, h)
        };
        for layer in self.layers.iter_mut() {
            match layer {
                Layer::SelfAttn { attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down, k_cache, v_cache } => {
                    // The attention norm in the QKV projection's prologue (not after a gated cross layer, whose
                    // update the norm kernel applies), else the norm kernel and the projection.
                    match (&*wqkv, &pending) {
                        _ if ab.qkv => norm(a, &pending, attn_norm)?,
                        (DeviceLinear::Dense(w), Pending::None | Pending::Plain)
                            if fuse_norm && qkv_w <= SKINNY_MAX_N =>
                        {
                            let pro = prologue(a, matches!(pending, Pending::Plain), attn_norm)?;
                            k::gemv::gemv(&s, &pro, w, t, hidden, qkv_w, &mut a.qkv.slice_mut(..t * qkv_w))?;
                        }
                        _ => {
                            norm(a, &pending, attn_norm)?;
                            let qkv = &mut a.qkv.slice_mut(..t * qkv_w);
                            lin(&a.h.slice(..t * hidden), wqkv, (t, hidden, qkv_w), qkv, false)?;
                        }
                    }
                    let shape = k::rope::RopeKvShape { layout: self.layout, qkv_stride: qkv_w };
                    if !ab.rope {
                        let qkv = &mut a.qkv.slice_mut(..t * qkv_w);
                        rope_write(&s, &shape, qkv, m, t, &self.inv_freq, k_cache, v_cache)?;
                    }
                    if !ab.attention {
                        Self::attend(
                            &s,
                            this,
                            &self.layout,
                            (&a.qkv.slice(..t * qkv_w), qkv_w),
                            (k_cache, v_cache),
                            &mut a.workspace,
                            &mut a.attn.slice_mut(..t * q_dim),
                            false,
                        )?;
                    }
                    if !ab.o {
                        let delta = &mut a.delta.slice_mut(..t * hidden);
                        lin(&a.attn.slice(..t * q_dim), wo, (t, q_dim, hidden), delta, false)?;
                    }
                    reduce(&mut a.delta, t * hidden)?;
                    if fuse_norm && fuse_silu && matches!(w_gate_up, DeviceLinear::Dense(_)) {
                        let pro = prologue(a, true, mlp_norm)?;
                        mlp(a, &mut lin, (w_gate_up, w_down), Some(pro))?;
                    } else {
                        norm(a, &Pending::Plain, mlp_norm)?;
                        mlp(a, &mut lin, (w_gate_up, w_down), None)?;
                    }
                    pending = Pending::Plain;
                }
                Layer::Cross { .. } if !sz.cross => {}
                Layer::Cross {
                    attn_norm,
                    wq,
                    wo,
                    q_norm,
                    attn_gate,
                    mlp_norm,
                    w_gate_up,
                    w_down,
                    mlp_gate,
                    k_pool,
                    v_pool,
                    ..
                } => {
                    norm(a, &pending, attn_norm)?;
                    if !ab.cross_q {
                        lin(
                            &a.h.slice(..t * hidden),
                            wq,
                            (t, hidden, q_dim),
                            &mut a.attn.slice_mut(..t * q_dim),
                            false,
                        )?;
                        k::norm::rms_norm(
                            &s,
                            &a.attn.slice(..t * q_dim),
                            q_norm,
                            eps,
                            c.head_dim,
                            &mut a.q.slice_mut(..t * q_dim),
                        )?;
                    }
                    if !ab.cross_attention {
                        Self::attend(
                            &s,
                            this,
                            &self.cross_layout,
                            (&a.q.slice(..t * q_dim), q_dim),
                            (k_pool, v_pool),
                            &mut a.workspace,
                            &mut a.attn.slice_mut(..t * q_dim),
                            true,
                        )?;
                    }
                    if !ab.o {
                        let delta = &mut a.delta.slice_mut(..t * hidden);
                        lin(&a.attn.slice(..t * q_dim), wo, (t, q_dim, hidden), delta, false)?;
                    }
                    // Summed before the gate (and the row scale), which the next norm applies.
                    reduce(&mut a.delta, t * hidden)?;
                    norm(a, &Pending::Gated(*attn_gate, false), mlp_norm)?;
                    // Summed before the gate and the row mask, which the next norm applies.
                    mlp(a, &mut lin, (w_gate_up, w_down), None)?;
                    pending = Pending::Gated(*mlp_gate, true);
                }
            }
        }
        if moved {
            self.generation += 1;
        }
        // Final norm over every row (it applies the last pending residual), then the logits rows.
        norm(a, &pending, &self.final_norm)?;
        if logits_rows > 0 {
            k::embedding::embed(
                &s,
                &a.h.slice(..t * hidden),
                hidden,
                &m.logits_rows.slice(..logits_rows),
                &mut a.hr.slice_mut(..logits_rows * hidden),
            )?;
            let hr = a.hr.slice(..logits_rows * hidden);
            let Some(tp) = self.tp.as_mut() else {
                if ab.lm_head {
                    return Ok(());
                }
                let vocab = c.vocab_size;
                let out = &mut a.logits.slice_mut(..logits_rows * vocab);
                return lm_head_with(
                    &s,
                    &self.blas,
                    self.opts.skinny_gemm,
                    &hr,
                    &mut self.lm_head,
                    (logits_rows, hidden, vocab),
                    out,
                );
            };
            // Vocab-parallel lm_head: this rank's `[rows, vocab / tp]`, all-gathered rank-major, then interleaved.
            let (vl, world) = (tp.vocab.len(), tp.world);
            let n = logits_rows * vl;
            let dims = (logits_rows, hidden, vl);
            lm_head_with(
                &s,
                &self.blas,
                self.opts.skinny_gemm,
                &hr,
                &mut self.lm_head,
                dims,
                &mut tp.local_logits.slice_mut(..n),
            )?;
            let comm = tp.comm.as_deref().ok_or_else(|| no_comm(tp.rank))?;
            let local = tp.local_logits.slice(..n);
            if world == 1 || logits_rows == 1 {
                // One rank, or one row: rank-major is already `[rows, vocab]`.
                return comm.all_gather_bf16(&s, &local, &mut a.logits.slice_mut(..world * n));
            }
            comm.all_gather_bf16(&s, &local, &mut tp.gathered.slice_mut(..world * n))?;
            // Output row `i * world + r` of the `[rows * world, vocab / tp]` view is gathered row `r * rows + i`.
            let len = logits_rows * world;
            if tp.order_rows != logits_rows || tp.order.is_none() {
                let order: Vec<u32> = (0..len).map(|j| ((j % world) * logits_rows + j / world) as u32).collect();
                tp.order = Some(s.clone_htod(&order).map_err(drv("upload logits gather order"))?);
                tp.order_rows = logits_rows;
            }
            let order = tp.order.as_ref().ok_or_else(|| Error::Backend("logits gather order missing".into()))?;
            k::embedding::embed(
                &s,
                &tp.gathered.slice(..world * n),
                vl,
                &order.slice(..len),
                &mut a.logits.slice_mut(..len * vl),
            )?;
        }
        Ok(())
    }

    /// A tensor-parallel rank whose embedding is split: uploads the step's ids shifted into the rank's rows
    /// (`u32::MAX`, which the embedding kernel turns into a zero row, for every other id), which the forward embeds
    /// instead of the step's ids. Nothing to do for the whole model or a replicated embedding. Runs before the
    /// step is checked: a step too large for the buffer is left to the check to refuse.
    pub(super) fn stage_rank_ids(&mut self, input: &StepInput) -> Result<()> {
        let Some(tp) = self.tp.as_mut() else {
            return Ok(());
        };
        if tp.comm.is_none() {
            return Err(no_comm(tp.rank));
        }
        let n = input.token_ids.len();
        if !tp.split_embed || n == 0 || n > tp.ids.len() {
            return Ok(());
        }
        let (start, rows) = (tp.embed_rows.start, &tp.embed_rows);
        tp.host_ids.clear();
        tp.host_ids.extend(input.token_ids.iter().map(|&id| {
            if rows.contains(&(id as usize)) {
                id - start as u32
            } else {
                u32::MAX
            }
        }));
        self.stream.memcpy_htod(&tp.host_ids, &mut tp.ids.slice_mut(..n)).map_err(drv("upload rank token ids"))
    }
}

/// `(rows, k, n)` of a projection.
type Dims = (usize, usize, usize);

fn no_comm(rank: usize) -> Error {
    Error::Backend(format!("tensor-parallel rank {rank} has no communicator yet"))
}

/// Projections: the skinny kernel for decode-sized batches, cuBLASLt otherwise.
fn linear_with(
    s: &Arc<CudaStream>,
    blas: &Blas,
    skinny: bool,
    x: &CudaView<'_, bf16>,
    w: &CudaSlice<bf16>,
    (rows, kdim, n): (usize, usize, usize),
    out: &mut CudaViewMut<'_, bf16>,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    crate::exec::cuda::dense::dense_linear(s, blas, skinny, x, &w.slice(..), (rows, kdim, n), out)
}

/// The `lm_head` product `out[rows, n] = x[rows, k] @ table^T`: a bf16 table as [`linear_with`], an int8 one through
/// its int8 skinny GEMM or chunks through cuBLASLt (`Int8Lm::product`).
fn lm_head_with(
    s: &Arc<CudaStream>,
    blas: &Blas,
    skinny: bool,
    x: &CudaView<'_, bf16>,
    table: &mut DeviceTable,
    (rows, kdim, n): (usize, usize, usize),
    out: &mut CudaViewMut<'_, bf16>,
) -> Result<()> {
    match table {
        DeviceTable::Bf16(w) => linear_with(s, blas, skinny, x, w, (rows, kdim, n), out),
        DeviceTable::Int8(t) if (t.rows(), t.cols()) == (n, kdim) => t.product(s, blas, (x, rows), out),
        DeviceTable::Int8(t) => Err(Error::Backend(format!(
            "lm_head: the int8 table is [{}, {}], expected [{n}, {kdim}]",
            t.rows(),
            t.cols()
        ))),
    }
}

/// RoPE on q and k of the fused rows and the K/V write into the layer's cache slots.
#[allow(clippy::too_many_arguments)]
fn rope_write(
    s: &Arc<CudaStream>,
    shape: &k::rope::RopeKvShape,
    qkv: &mut CudaViewMut<'_, bf16>,
    m: &Meta,
    t: usize,
    inv_freq: &CudaSlice<f32>,
    k_cache: &mut CudaSlice<bf16>,
    v_cache: &mut CudaSlice<bf16>,
) -> Result<()> {
    k::rope::rope_kv_write(
        s,
        shape,
        qkv,
        &m.positions.slice(..t),
        &m.slots.slice(..t),
        inv_freq,
        k::rope::KvCacheMut { k: k_cache, v: v_cache },
    )
}
