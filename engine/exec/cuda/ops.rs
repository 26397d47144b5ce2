//! The CUDA backend's [`Ops`]: bf16 weights, a paged bf16 KV cache, pooled activations and persistent step
//! metadata, so that the same device addresses serve every step (what CUDA graph replay needs).

use std::ops::Range;
use std::sync::Arc;

use crate::exec::cuda::blas::Blas;
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;

use super::dense::{dense_linear, SKINNY_MAX_N};
use super::quant_bufs::QuantBuffers;
pub(crate) use super::quant_bufs::{DeviceLinear, DeviceTable, Int8Lm};
use crate::config::LlamaConfig;
use crate::exec::StepInput;
use crate::model::{LayerBufs, Linear, Norm, Ops};
use crate::ops::cpu::attention::PagedLayout;
use crate::ops::cuda as k;
use crate::tp::cuda::DeviceComm;
use crate::{Error, Result};

mod attention;
mod decode_stack;
mod norm_fusion;
mod tp_logits;
mod weights;

use self::weights::{check_dense, linear_weight, WeightRef};

pub(super) fn drv(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Backend(format!("{what}: {e}"))
}

/// A `[rows, cols]` bf16 activation on the device: a buffer of the pool, lent for one step.
pub struct CudaAct {
    rows: usize,
    cols: usize,
    slot: usize,
    buf: CudaSlice<bf16>,
}

impl CudaAct {
    /// The pool slot this buffer returns to.
    pub(crate) fn slot(&self) -> usize {
        self.slot
    }

    /// The first `rows * cols` elements.
    pub fn view(&self) -> cudarc::driver::CudaView<'_, bf16> {
        self.buf.slice(..self.rows * self.cols)
    }
}

pub(super) struct DeviceLayer {
    pub(super) attn_norm: CudaSlice<bf16>,
    pub(super) wqkv: DeviceLinear,
    pub(super) wo: DeviceLinear,
    pub(super) mlp_norm: CudaSlice<bf16>,
    pub(super) w_gate_up: DeviceLinear,
    pub(super) w_down: DeviceLinear,
}

/// Buffers and state of the quantized projections: the split-K workspace, the int8 activations, the bf16 scratch
/// of the large-m W4A16 path, and the fused activation quantization in flight.
#[derive(Default)]
pub(super) struct QuantState {
    /// Split-K workspace, int8 activations and the large-m W4A16 scratch.
    pub(super) bufs: QuantBuffers,
    /// Set by a norm or SiLU kernel that quantized its output straight into the int8 activations for the W4A8
    /// projection named here instead of writing its bf16 output buffer (pool slot): the next `linear` on that
    /// buffer consumes it.
    pending: Option<(usize, Linear)>,
    /// The last projection run (the SiLU kernel after `GateUp(l)` fuses for `Down(l)`).
    last_linear: Option<Linear>,
    /// Fuse the W4A8 activation quantization into the preceding norm / SiLU kernel (default on).
    pub(super) fuse: bool,
}

impl QuantState {
    /// Records that projection `w` runs now and hands over the int8 activations a preceding kernel left for it, if
    /// any: the bookkeeping every projection entry (`linear` and the fused ones) does first.
    fn start_projection(&mut self, w: Linear) -> Option<(usize, Linear)> {
        self.last_linear = Some(w);
        self.pending.take()
    }
}

/// Step metadata on the device, in buffers that grow but never move while they are big enough, so a captured
/// graph keeps reading the current step's values. `generation` changes whenever a buffer moves.
pub(super) struct MetaBufs {
    ids: CudaSlice<u32>,
    positions: CudaSlice<u32>,
    cu_seqlens: CudaSlice<u32>,
    block_tables: CudaSlice<u32>,
    slots: CudaSlice<u32>,
    logits_rows: CudaSlice<u32>,
}

/// The host-side sizes of the step in flight.
#[derive(Clone, Copy, Debug, Default)]
struct StepSizes {
    tokens: usize,
    seqs: usize,
    table_len: usize,
    max_blocks_per_seq: usize,
    max_query_len: usize,
    max_context_len: usize,
    decode: bool,
}

/// The CUDA backend's weights, cache, handles and kernels.
pub struct CudaOps {
    pub(super) cfg: LlamaConfig,
    pub(super) stream: Arc<CudaStream>,
    pub(super) blas: Blas,
    pub(super) embed: DeviceTable,
    pub(super) layers: Vec<DeviceLayer>,
    pub(super) final_norm: CudaSlice<bf16>,
    pub(super) lm_head: Option<DeviceTable>,
    pub(super) inv_freq: CudaSlice<f32>,
    pub(super) layout: PagedLayout,
    pub(super) num_blocks: usize,
    pub(super) k_cache: Vec<CudaSlice<bf16>>,
    pub(super) v_cache: Vec<CudaSlice<bf16>>,
    pub(super) workspace: CudaSlice<u8>,
    pub(super) num_sms: usize,
    pub(super) device_name: String,
    meta: Option<MetaBufs>,
    sizes: StepSizes,
    /// Activation buffers by the order the recipe asks for them; `None` while lent out.
    pool: Vec<Option<CudaSlice<bf16>>>,
    next_slot: usize,
    /// Bumped whenever a pooled or metadata buffer moves: graphs captured before are stale.
    pub(super) generation: u64,
    /// While capturing a graph, `begin_step` must not copy (the copies happen before each replay).
    pub(super) capturing: bool,
    /// Use `kernels/gemv.cu` for projections of up to 16 rows.
    pub(super) skinny_gemm: bool,
    /// With the skinny GEMM, apply SwiGLU in the epilogue of the bf16 gate_up projection (`gemv_gate_up_silu`)
    /// instead of a kernel of its own (the same bits).
    pub(super) fuse_swiglu: bool,
    /// With the skinny GEMM, apply RoPE and the KV-cache write in the epilogue of the bf16 QKV projection
    /// (`gemv_qkv_rope`) instead of a kernel of their own (the same bits).
    pub(super) fuse_rope: bool,
    /// With the skinny GEMM, defer residual add + RMSNorm into the prologue of the bf16 projection that reads it
    /// (`ops/norm_fusion.rs`; the same bits).
    pub(super) fuse_norm: bool,
    /// The fused norm's residual-update counter (one u32, zero between launches), allocated on first use.
    norm_counter: Option<CudaSlice<u32>>,
    /// A norm deferred into the next projection's prologue.
    pending_norm: Option<norm_fusion::PendingNorm>,
    /// Quantized projections' buffers and fused-quantization state.
    pub(super) quant: QuantState,
    /// The persistent decode stack's layer table and counters, while it is switched on
    /// ([`CudaOps::set_persistent_decode`]).
    stack: Option<decode_stack::DecodeStack>,
    /// Launches of the persistent decode stack so far (eager, or recorded into a graph).
    pub(super) stack_launches: u64,
    /// Set on a tensor-parallel rank: the communicator behind the [`Ops`] hooks and the rank's vocabulary slice.
    tp: Option<RankComm>,
}

/// A tensor-parallel rank's side of [`CudaOps`]: its communicator, the embedding rows it holds, and buffers of the
/// logits all-gather.
struct RankComm {
    comm: Box<dyn DeviceComm>,
    /// Token ids in this range embed from this rank's rows; the others embed as zeros.
    vocab: Range<usize>,
    /// The step's ids, shifted into the rank's rows (`u32::MAX`, which the kernel embeds as zeros, elsewhere).
    local_ids: Vec<u32>,
    /// Row order of the logits gather (see [`Ops::gather_logits`] below), for `gather_rows` logits rows.
    gather_rows: usize,
    gather_ids: Option<CudaSlice<u32>>,
}

/// The widest activation row the int8 buffers plan for: `cols` or any of the model's projection inputs.
fn act_width(cfg: &LlamaConfig, cols: usize) -> usize {
    cols.max(cfg.hidden_size).max(cfg.intermediate_size).max(cfg.q_dim())
}

fn check(what: &str, a: &CudaAct, rows: usize, cols: usize) -> Result<()> {
    if a.rows == rows && a.cols == cols && a.buf.len() >= rows * cols {
        Ok(())
    } else {
        Err(Error::Backend(format!("{what}: buffer is [{}, {}], expected [{rows}, {cols}]", a.rows, a.cols)))
    }
}

impl CudaOps {
    /// Assembles the ops from uploaded weights and cache; buffers for activations and metadata come on first use.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        cfg: LlamaConfig,
        stream: Arc<CudaStream>,
        blas: Blas,
        weights: (DeviceTable, Vec<DeviceLayer>, CudaSlice<bf16>, Option<DeviceTable>),
        inv_freq: CudaSlice<f32>,
        layout: PagedLayout,
        cache: (usize, Vec<CudaSlice<bf16>>, Vec<CudaSlice<bf16>>),
        workspace: CudaSlice<u8>,
        num_sms: usize,
        device_name: String,
    ) -> Self {
        let (embed, layers, final_norm, lm_head) = weights;
        let (num_blocks, k_cache, v_cache) = cache;
        CudaOps {
            cfg,
            stream,
            blas,
            embed,
            layers,
            final_norm,
            lm_head,
            inv_freq,
            layout,
            num_blocks,
            k_cache,
            v_cache,
            workspace,
            num_sms,
            device_name,
            meta: None,
            sizes: StepSizes::default(),
            pool: Vec::new(),
            next_slot: 0,
            generation: 0,
            capturing: false,
            skinny_gemm: true,
            fuse_swiglu: true,
            fuse_rope: false,
            fuse_norm: false,
            norm_counter: None,
            pending_norm: None,
            quant: QuantState { fuse: true, ..QuantState::default() },
            stack: None,
            stack_launches: 0,
            tp: None,
        }
    }

    /// Makes these kernels one rank of a tensor-parallel group: they must hold the rank's shard (built from
    /// [`crate::tp::TpPlan::rank_config`] and [`crate::tp::load_rank_weights`]), `vocab` is the rank's slice of the
    /// vocabulary, and `comm` implements the [`Ops::all_reduce`] and [`Ops::gather_logits`] hooks. Without this
    /// call (a single-GPU executor) both hooks do nothing.
    pub fn set_tensor_parallel(&mut self, comm: Box<dyn DeviceComm>, vocab: Range<usize>) {
        // The persistent decode stack runs whole layers, without the all-reduces.
        self.stack = None;
        self.tp = Some(RankComm { comm, vocab, local_ids: Vec::new(), gather_rows: 0, gather_ids: None });
    }

    /// The rank's communicator, when [`set_tensor_parallel`](Self::set_tensor_parallel) was called.
    pub fn device_comm(&self) -> Option<&dyn DeviceComm> {
        self.tp.as_ref().map(|t| t.comm.as_ref())
    }

    /// The stream all of this executor's work is ordered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The config the kernels run with (a rank's config under tensor parallelism).
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Physical KV blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// The decode split count this step's attention will use (part of a decode graph's key).
    pub(super) fn decode_splits(&self, seqs: usize, max_context_len: usize) -> usize {
        k::attention::decode_num_splits(&self.layout, seqs, max_context_len, self.num_sms)
    }

    /// Copies `src` into `dst`, growing it (and bumping the generation) when it is too small.
    fn put(stream: &Arc<CudaStream>, dst: &mut CudaSlice<u32>, src: &[u32], generation: &mut u64) -> Result<()> {
        if dst.len() < src.len() {
            *dst = stream.alloc_zeros::<u32>(src.len().next_power_of_two()).map_err(drv("grow step metadata"))?;
            *generation += 1;
        }
        if !src.is_empty() {
            stream.memcpy_htod(src, &mut dst.slice_mut(..src.len())).map_err(drv("upload step metadata"))?;
        }
        Ok(())
    }

    /// The pooled buffer of `slot`, when it is not lent out.
    pub(crate) fn pooled(&self, slot: usize) -> Option<&CudaSlice<bf16>> {
        self.pool.get(slot).and_then(Option::as_ref)
    }

    /// [`pooled`](Self::pooled), writable (token masks are applied to the logits in place).
    pub(crate) fn pooled_mut(&mut self, slot: usize) -> Option<&mut CudaSlice<bf16>> {
        self.pool.get_mut(slot).and_then(Option::as_mut)
    }

    fn meta(&self) -> Result<&MetaBufs> {
        self.meta.as_ref().ok_or_else(|| Error::Backend("no step in progress".into()))
    }

    fn norm_weight(&self, n: Norm) -> &CudaSlice<bf16> {
        match n {
            Norm::Attn(l) => &self.layers[l].attn_norm,
            Norm::Mlp(l) => &self.layers[l].mlp_norm,
            Norm::Final => &self.final_norm,
        }
    }

    /// The W4A8 projection that consumes the output of `norm` when its activation quantization is fused into the
    /// norm kernel, if any.
    fn fused_norm_target(&self, norm: Norm, hidden: usize) -> Option<Linear> {
        if !self.quant.fuse || !hidden.is_multiple_of(8) {
            return None;
        }
        let (l, lin) = match norm {
            Norm::Attn(l) => (l, Linear::Qkv(l)),
            Norm::Mlp(l) => (l, Linear::GateUp(l)),
            Norm::Final => return None,
        };
        let layer = self.layers.get(l)?;
        let w = if matches!(lin, Linear::Qkv(_)) { &layer.wqkv } else { &layer.w_gate_up };
        w.w4a8().filter(|q| q.k() == hidden).map(|_| lin)
    }

    /// Makes sure the int8 activation buffers hold `rows` x `cols` (allocating outside graph capture only).
    fn ensure_acts(&mut self, rows: usize, cols: usize) -> Result<()> {
        let width = act_width(&self.cfg, cols);
        if self.quant.bufs.ensure_acts(&self.stream, rows, cols, width, self.capturing)? {
            self.generation += 1;
        }
        Ok(())
    }
}

impl Ops for CudaOps {
    type Act = CudaAct;

    fn begin_step(&mut self, step: &StepInput) -> Result<()> {
        self.next_slot = 0;
        self.pending_norm = None;
        self.quant.pending = None;
        self.quant.last_linear = None;
        self.sizes = StepSizes {
            tokens: step.num_tokens(),
            seqs: step.num_seqs(),
            table_len: step.block_tables.len(),
            max_blocks_per_seq: step.max_blocks_per_seq,
            max_query_len: step.cu_seqlens.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0),
            max_context_len: step.positions.iter().map(|&p| p as usize + 1).max().unwrap_or(0),
            decode: step.cu_seqlens.windows(2).all(|w| w[1] - w[0] == 1),
        };
        if self.capturing {
            return Ok(());
        }
        if self.meta.is_none() {
            let z = |n: usize| self.stream.alloc_zeros::<u32>(n).map_err(drv("allocate step metadata"));
            self.meta = Some(MetaBufs {
                ids: z(1)?,
                positions: z(1)?,
                cu_seqlens: z(2)?,
                block_tables: z(1)?,
                slots: z(1)?,
                logits_rows: z(1)?,
            });
            self.generation += 1;
        }
        let (stream, gen) = (&self.stream, &mut self.generation);
        let m = self.meta.as_mut().ok_or_else(|| Error::Backend("step metadata missing".into()))?;
        match self.tp.as_mut() {
            None => Self::put(stream, &mut m.ids, &step.token_ids, gen)?,
            Some(tp) => {
                // Vocab-parallel embedding: ids of this rank's rows shift to them; any other id becomes u32::MAX,
                // which the embedding kernel turns into a zero row. The all-reduce after it sums one non-zero
                // row per token, so it is exact.
                let (v0, range) = (tp.vocab.start as u32, &tp.vocab);
                tp.local_ids.clear();
                tp.local_ids.extend(step.token_ids.iter().map(|&id| {
                    if range.contains(&(id as usize)) {
                        id - v0
                    } else {
                        u32::MAX
                    }
                }));
                Self::put(stream, &mut m.ids, &tp.local_ids, gen)?;
            }
        }
        Self::put(stream, &mut m.positions, &step.positions, gen)?;
        Self::put(stream, &mut m.cu_seqlens, &step.cu_seqlens, gen)?;
        Self::put(stream, &mut m.block_tables, &step.block_tables, gen)?;
        Self::put(stream, &mut m.slots, &step.slot_mapping, gen)?;
        Self::put(stream, &mut m.logits_rows, &step.logits_rows, gen)?;
        Ok(())
    }

    fn alloc(&mut self, rows: usize, cols: usize) -> Result<CudaAct> {
        let slot = self.next_slot;
        self.next_slot += 1;
        if self.pool.len() <= slot {
            self.pool.resize_with(slot + 1, || None);
        }
        let need = (rows * cols).max(1);
        let buf = match self.pool[slot].take() {
            Some(b) if b.len() >= need => b,
            _ => {
                if self.capturing {
                    return Err(Error::Backend("activation pool grew during graph capture".into()));
                }
                self.generation += 1;
                // SAFETY: bf16 has no invalid bit patterns, and the recipe writes every buffer before reading it.
                unsafe { self.stream.alloc::<bf16>(need) }.map_err(drv("allocate activation"))?
            }
        };
        Ok(CudaAct { rows, cols, slot, buf })
    }

    fn release(&mut self, act: CudaAct) {
        if let Some(p) = self.pool.get_mut(act.slot) {
            *p = Some(act.buf);
        }
    }

    fn embed(&mut self, _ids: &[u32], out: &mut CudaAct) -> Result<()> {
        self.no_pending_norm("embed")?;
        let (h, t) = (self.cfg.hidden_size, self.sizes.tokens);
        check("embed", out, t, h)?;
        let ids = self.meta()?.ids.slice(..t);
        self.embed.embed(&self.stream, h, &ids, &mut out.buf.slice_mut(..t * h))
    }

    fn rms_norm(&mut self, x: &CudaAct, n: Norm, out: &mut CudaAct) -> Result<()> {
        self.no_pending_norm("rms_norm")?;
        let h = self.cfg.hidden_size;
        check("rms_norm out", out, x.rows, h)?;
        let len = x.rows * h;
        if let Some(target) = self.fused_norm_target(n, h) {
            // W4A8 next: quantize the normalized rows straight into the int8 buffers; `out` is not written.
            self.ensure_acts(x.rows, h)?;
            let acts = self.quant.bufs.acts.as_mut().ok_or_else(|| Error::Backend("int8 buffers missing".into()))?;
            let weight = match n {
                Norm::Attn(l) => &self.layers[l].attn_norm,
                Norm::Mlp(l) => &self.layers[l].mlp_norm,
                Norm::Final => &self.final_norm,
            };
            let src = k::quant::ActSource::RmsNorm {
                x: x.buf.slice(..len),
                weight: weight.slice(..),
                eps: self.cfg.rms_norm_eps,
            };
            k::quant::act_quant(&self.stream, src, x.rows, h, acts, None)?;
            self.quant.pending = Some((out.slot, target));
            return Ok(());
        }
        k::norm::rms_norm(
            &self.stream,
            &x.buf.slice(..len),
            self.norm_weight(n),
            self.cfg.rms_norm_eps,
            h,
            &mut out.buf.slice_mut(..len),
        )
    }

    fn add_rms_norm(&mut self, residual: &mut CudaAct, delta: &CudaAct, n: Norm, out: &mut CudaAct) -> Result<()> {
        self.no_pending_norm("add_rms_norm")?;
        let h = self.cfg.hidden_size;
        check("add_rms_norm delta", delta, residual.rows, h)?;
        check("add_rms_norm out", out, residual.rows, h)?;
        let len = residual.rows * h;
        if let Some(target) = self.fused_norm_target(n, h) {
            // W4A8 next: residual add + norm + int8 quantization in one kernel; `out` is not written.
            self.ensure_acts(residual.rows, h)?;
            let acts = self.quant.bufs.acts.as_mut().ok_or_else(|| Error::Backend("int8 buffers missing".into()))?;
            let weight = match n {
                Norm::Attn(l) => &self.layers[l].attn_norm,
                Norm::Mlp(l) => &self.layers[l].mlp_norm,
                Norm::Final => &self.final_norm,
            };
            let src = k::quant::ActSource::AddRmsNorm {
                residual: residual.buf.slice_mut(..len),
                delta: delta.buf.slice(..len),
                weight: weight.slice(..),
                eps: self.cfg.rms_norm_eps,
            };
            k::quant::act_quant(&self.stream, src, residual.rows, h, acts, None)?;
            self.quant.pending = Some((out.slot, target));
            return Ok(());
        }
        if self.defer_add_rms_norm(residual, delta, n, out)? {
            return Ok(());
        }
        k::norm::add_rms_norm(
            &self.stream,
            &mut residual.buf.slice_mut(..len),
            &delta.buf.slice(..len),
            self.norm_weight(n),
            self.cfg.rms_norm_eps,
            h,
            &mut out.buf.slice_mut(..len),
        )
    }

    fn linear(&mut self, x: &CudaAct, w: Linear, out: &mut CudaAct) -> Result<()> {
        let norm = norm_fusion::take_norm(&mut self.pending_norm, x, w)?;
        if w == Linear::LmHead {
            // An int8 lm_head (or tied int8 embedding): the int8 skinny GEMM, or chunks through cuBLASLt.
            let table = match self.lm_head.as_mut() {
                Some(t) => t,
                None => &mut self.embed,
            };
            if let DeviceTable::Int8(t) = table {
                if norm.is_some() {
                    return Err(Error::Backend("linear LmHead: a norm was deferred into the int8 lm_head".into()));
                }
                self.quant.start_projection(w);
                check("linear out", out, x.rows, t.rows())?;
                if x.cols != t.cols() {
                    return Err(Error::Backend(format!(
                        "linear LmHead: input rows have {} columns, the int8 table {}",
                        x.cols,
                        t.cols()
                    )));
                }
                let xv = x.buf.slice(..x.rows * x.cols);
                let n = t.rows();
                return t.product(&self.stream, &self.blas, (&xv, x.rows), &mut out.buf.slice_mut(..x.rows * n));
            }
        }
        let pending = self.quant.start_projection(w);
        let lm_head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let (weight, n) = linear_weight(&self.cfg, &self.layers, lm_head, w);
        let kdim = x.cols;
        check("linear out", out, x.rows, n)?;
        let fused = match pending {
            Some((slot, target)) if slot == x.slot => {
                if target != w {
                    return Err(Error::Backend(format!(
                        "linear {w:?}: its input was quantized for {target:?} and never written as bf16"
                    )));
                }
                true
            }
            _ => false,
        };
        let q = match weight {
            WeightRef::Dense(weight) if norm.is_some() => {
                // A deferred norm: norm_gemv_target admitted this projection for the skinny GEMM.
                check_dense(w, weight, n, kdim)?;
                let norm = norm.as_ref().ok_or_else(|| Error::Backend("norm prologue missing".into()))?;
                return k::gemv::gemv(&self.stream, norm, weight, x.rows, kdim, n, &mut out.buf);
            }
            WeightRef::Dense(weight) => {
                check_dense(w, weight, n, kdim)?;
                return dense_linear(
                    &self.stream,
                    &self.blas,
                    self.skinny_gemm,
                    &x.buf,
                    weight,
                    (x.rows, kdim, n),
                    &mut out.buf,
                );
            }
            WeightRef::Quant(_) if norm.is_some() => {
                return Err(Error::Backend(format!("linear {w:?}: a norm was deferred into a quantized projection")));
            }
            WeightRef::Quant(q) => q,
            WeightRef::Int8(_) => return Err(Error::Backend(format!("linear {w:?}: an int8 table out of place"))),
        };
        if q.n() != n || q.k() != kdim {
            return Err(Error::Backend(format!(
                "linear {w:?}: quantized weight is [{}, {}], expected [{n}, {kdim}]",
                q.n(),
                q.k()
            )));
        }
        let rows = x.rows;
        if rows == 0 {
            return Ok(());
        }
        let width = act_width(&self.cfg, kdim);
        if self.quant.bufs.prepare(&self.stream, q, rows, (self.num_sms, fused, width, self.capturing))? {
            self.generation += 1;
        }
        let xv = x.buf.slice(..rows * kdim);
        let out = &mut out.buf.slice_mut(..rows * n);
        self.quant.bufs.project(&self.stream, (&self.blas, self.num_sms), q, (&xv, rows, fused), out)
    }

    fn rope_and_cache(&mut self, layer: usize, qkv: &mut CudaAct, _step: &StepInput) -> Result<()> {
        self.no_pending_norm("rope_and_cache")?;
        let t = self.sizes.tokens;
        let meta = self.meta.as_ref().ok_or_else(|| Error::Backend("no step in progress".into()))?;
        let shape = k::rope::RopeKvShape { layout: self.layout, qkv_stride: qkv.cols };
        let len = qkv.rows * qkv.cols;
        let (kc, vc) = (&mut self.k_cache[layer], &mut self.v_cache[layer]);
        k::rope::rope_kv_write(
            &self.stream,
            &shape,
            &mut qkv.buf.slice_mut(..len),
            &meta.positions.slice(..t),
            &meta.slots.slice(..t),
            &self.inv_freq,
            k::rope::KvCacheMut { k: kc, v: vc },
        )
    }

    fn attention(&mut self, layer: usize, qkv: &CudaAct, _step: &StepInput, out: &mut CudaAct) -> Result<()> {
        self.run_attention(layer, qkv, out)
    }

    fn silu_mul(&mut self, gate_up: &CudaAct, out: &mut CudaAct) -> Result<()> {
        self.no_pending_norm("silu_mul")?;
        let inter = self.cfg.intermediate_size;
        check("silu_mul out", out, gate_up.rows, inter)?;
        let rows = gate_up.rows;
        // After GateUp(l), when Down(l) is W4A8: SiLU * up and the int8 quantization in one kernel.
        let fuse_for = match self.quant.last_linear {
            Some(Linear::GateUp(l)) if self.quant.fuse && inter.is_multiple_of(8) => {
                self.layers.get(l).and_then(|layer| layer.w_down.w4a8()).filter(|q| q.k() == inter).map(|_| l)
            }
            _ => None,
        };
        if let Some(l) = fuse_for {
            self.ensure_acts(rows, inter)?;
            let acts = self.quant.bufs.acts.as_mut().ok_or_else(|| Error::Backend("int8 buffers missing".into()))?;
            let src = k::quant::ActSource::SiluMul(gate_up.buf.slice(..rows * 2 * inter));
            k::quant::act_quant(&self.stream, src, rows, inter, acts, None)?;
            self.quant.pending = Some((out.slot, Linear::Down(l)));
            return Ok(());
        }
        k::activation::silu_mul(
            &self.stream,
            &gate_up.buf.slice(..rows * 2 * inter),
            inter,
            &mut out.buf.slice_mut(..rows * inter),
        )
    }

    fn linear_rope_cache(
        &mut self,
        x: &CudaAct,
        w: Linear,
        layer: usize,
        qkv: &mut CudaAct,
        step: &StepInput,
    ) -> Result<()> {
        // A bf16 QKV projection on the skinny GEMM applies RoPE and writes the cache in its epilogue
        // (gemv_qkv_rope); everything else takes the two calls.
        let (weight, n) = linear_weight(&self.cfg, &self.layers, self.lm_head.as_ref().unwrap_or(&self.embed), w);
        let (rows, kdim, t) = (x.rows, x.cols, self.sizes.tokens);
        let fusable = self.fuse_rope
            && self.skinny_gemm
            && rows == t
            && qkv.cols == n
            && self.layout.head_dim.is_multiple_of(16)
            && n <= SKINNY_MAX_N
            && k::gemv::supports(rows, kdim);
        match weight {
            WeightRef::Dense(weight) if fusable => {
                check("linear_rope_cache qkv", qkv, rows, n)?;
                check_dense(w, weight, n, kdim)?;
                self.quant.start_projection(w);
                let norm = norm_fusion::take_norm(&mut self.pending_norm, x, w)?;
                let meta = self.meta.as_ref().ok_or_else(|| Error::Backend("no step in progress".into()))?;
                let shape = k::rope::RopeKvShape { layout: self.layout, qkv_stride: n };
                let (kc, vc) = (&mut self.k_cache[layer], &mut self.v_cache[layer]);
                let meta_args = (&meta.positions.slice(..t), &meta.slots.slice(..t), &self.inv_freq);
                let cache = k::rope::KvCacheMut { k: kc, v: vc };
                let out = &mut qkv.buf.slice_mut(..rows * n);
                match norm {
                    Some(p) => {
                        k::gemv::gemv_qkv_rope(&self.stream, &p, weight, (rows, kdim), &shape, out, meta_args, cache)
                    }
                    None => {
                        let xv = x.buf.slice(..rows * kdim);
                        k::gemv::gemv_qkv_rope(&self.stream, &xv, weight, (rows, kdim), &shape, out, meta_args, cache)
                    }
                }
            }
            _ => {
                self.linear(x, w, qkv)?;
                self.rope_and_cache(layer, qkv, step)
            }
        }
    }

    fn linear_silu_mul(&mut self, x: &CudaAct, w: Linear, gate_up: &mut CudaAct, out: &mut CudaAct) -> Result<()> {
        // A bf16 gate_up on the skinny GEMM applies SwiGLU in its epilogue (gemv_gate_up_silu), and so does a W4A16
        // gate_up at decode sizes (uploaded with its gate and up rows paired, w4a16_gemm_silu) or on a Hopper
        // large-m kernel (w4a16_gemm_large); everything else
        // (W4A8, which fuses SwiGLU into the down projection's int8 quantization, or cuBLASLt batches) takes the
        // two calls.
        let (weight, n) = linear_weight(&self.cfg, &self.layers, self.lm_head.as_ref().unwrap_or(&self.embed), w);
        let (rows, kdim, inter) = (x.rows, x.cols, n / 2);
        let fusable = self.fuse_swiglu
            && self.skinny_gemm
            && n == 2 * inter
            && out.cols == inter
            && k::gemv::supports(rows, kdim);
        let quant_fused = match (&weight, w) {
            (WeightRef::Quant(q), Linear::GateUp(l))
                if self.fuse_swiglu
                    && out.cols == inter
                    && q.n() == n
                    && q.k() == kdim
                    && QuantBuffers::silu_fusable(q, rows)
                    && self.layers.get(l).is_some_and(|layer| layer.w_down.w4a8().is_none()) =>
            {
                Some(*q)
            }
            _ => None,
        };
        if let Some(q) = quant_fused {
            check("linear_silu_mul out", out, rows, inter)?;
            if norm_fusion::take_norm(&mut self.pending_norm, x, w)?.is_some() {
                return Err(Error::Backend(format!("linear {w:?}: a norm was deferred into a quantized projection")));
            }
            self.quant.start_projection(w);
            let width = act_width(&self.cfg, kdim);
            if self.quant.bufs.prepare(&self.stream, q, rows, (self.num_sms, false, width, self.capturing))? {
                self.generation += 1;
            }
            let xv = x.buf.slice(..rows * kdim);
            return self.quant.bufs.project_silu(&self.stream, (q, self.num_sms), (&xv, rows), &mut out.buf);
        }
        match weight {
            WeightRef::Dense(weight) if fusable => {
                check("linear_silu_mul out", out, rows, inter)?;
                check_dense(w, weight, n, kdim)?;
                self.quant.start_projection(w);
                match norm_fusion::take_norm(&mut self.pending_norm, x, w)? {
                    Some(p) => k::gemv::gemv_gate_up_silu(&self.stream, &p, weight, rows, kdim, inter, &mut out.buf),
                    None => k::gemv::gemv_gate_up_silu(&self.stream, &x.buf, weight, rows, kdim, inter, &mut out.buf),
                }
            }
            _ => {
                self.linear(x, w, gate_up)?;
                self.silu_mul(gate_up, out)
            }
        }
    }

    fn weight_bytes(&self, w: Linear) -> usize {
        let lm_head = self.lm_head.as_ref().unwrap_or(&self.embed);
        linear_weight(&self.cfg, &self.layers, lm_head, w).0.device_bytes()
    }

    fn decoder_layers(&mut self, bufs: LayerBufs<'_, CudaAct>, _step: &StepInput) -> Result<bool> {
        self.run_decode_stack(bufs)
    }

    fn gather_rows(&mut self, x: &CudaAct, rows: &[u32], out: &mut CudaAct) -> Result<()> {
        self.no_pending_norm("gather_rows")?;
        check("gather_rows out", out, rows.len(), x.cols)?;
        if rows.is_empty() {
            return Ok(());
        }
        // A row gather is an embedding lookup with `x` as the table.
        let n = rows.len() * x.cols;
        let ids = self.meta()?.logits_rows.slice(..rows.len());
        k::embedding::embed(&self.stream, &x.view(), x.cols, &ids, &mut out.buf.slice_mut(..n))
    }

    /// Tensor parallelism: the rank's communicator sums `x` over the group (nothing on a single GPU).
    fn all_reduce(&mut self, x: &mut CudaAct) -> Result<()> {
        self.no_pending_norm("all_reduce")?;
        let Some(tp) = self.tp.as_ref() else {
            return Ok(());
        };
        let n = x.rows * x.cols;
        if n == 0 {
            return Ok(());
        }
        tp.comm.all_reduce_sum_bf16(&self.stream, &mut x.buf.slice_mut(..n))
    }

    /// Tensor parallelism: all-gathers every rank's `[rows, vocab / tp]` logits and interleaves them into
    /// `[rows, vocab]` (a bit-exact copy; ops/tp_logits.rs).
    fn gather_logits(&mut self, local: CudaAct) -> Result<CudaAct> {
        self.tp_gather_logits(local)
    }
}
