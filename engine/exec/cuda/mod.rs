//! The CUDA executor: bf16 weights and a paged bf16 KV cache on one device, the kernels of `kernels/*.cu` and
//! cuBLASLt GEMMs, behind the same [`Executor`] trait and model recipe as the CPU reference.
//!
//! One stream, no host synchronization inside a step except reading the logits back. Decode steps run as CUDA
//! graphs captured per (batch bucket, KV split count): the batch is padded to a bucket (padding rows write no
//! cache slot), the step's metadata is copied into persistent device buffers, and the graph replays the whole
//! forward in one launch.

pub mod blas;
pub(crate) mod dense;
pub(crate) mod ops;
mod profile;
pub(crate) mod quant_bufs;
pub(crate) mod sample;

use std::collections::HashMap;
use std::sync::Arc;

use crate::exec::cuda::blas::Blas;
use cudarc::driver::{sys, CudaContext, CudaGraph, CudaSlice, CudaStream};
use half::bf16;

use self::ops::{drv, DeviceLayer, DeviceLinear, DeviceTable};
pub use self::ops::{CudaAct, CudaOps};
use crate::config::LlamaConfig;
use crate::exec::{Executor, SampleSeq, StepInput, StepOutput};
use crate::model::profile::{forward_skipping, OpClock, Profiled, StepProfile};
use crate::model::{forward, Dims, Ops};
use crate::ops::cpu::attention::PagedLayout;
use crate::ops::cuda as k;
use crate::weights::{FusedSpec, LinearWeight, ModelSpecs, ModelWeights, WeightSource};
use crate::{Error, Result};

/// How to size the executor.
#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// Device ordinal.
    pub device: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV capacity in tokens; `None` sizes the cache from free memory.
    pub kv_tokens: Option<usize>,
    /// Fraction of total device memory the engine may use (weights + cache + workspaces).
    pub gpu_memory_utilization: f32,
    /// Most tokens one step may carry (sizes the activation reserve).
    pub max_step_tokens: usize,
    /// Capture decode steps of up to this many sequences as CUDA graphs (0 turns graphs off).
    pub max_graph_batch: usize,
    /// Run projections of up to 16 rows with the skinny GEMM kernel instead of cuBLASLt.
    pub skinny_gemm: bool,
    /// Apply SiLU * up in the epilogue of the decode gate_up projection instead of a kernel of its own: the bf16
    /// skinny GEMM's, and the W4A16 decode kernels' (whose gate_up goes up with its gate and up rows paired) (on by
    /// default; the same bits; see [`CudaExecutor::set_fuse_swiglu`]).
    pub fuse_swiglu: bool,
    /// With the skinny GEMM, apply RoPE and the KV-cache write in the epilogue of the bf16 QKV projection instead
    /// of a kernel of their own (off by default until a device run measures it; the same bits; see
    /// [`CudaExecutor::set_fuse_rope`]).
    pub fuse_rope: bool,
    /// With the skinny GEMM, run residual add + RMSNorm in the prologue of the bf16 projection that reads it (QKV,
    /// gate_up) instead of a kernel of its own (off by default until a device run measures it; the same bits; see
    /// [`CudaExecutor::set_fuse_norm`]).
    pub fuse_norm: bool,
    /// Run decode steps of up to 8 sequences through the persistent decode stack: every decoder layer in one
    /// launch (`kernels/decode_layers.cu`; bf16 or symmetric W4A16 projections on one GPU; off by default until a
    /// device run measures it; see [`CudaExecutor::set_persistent_decode`]).
    pub persistent_decode: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            device: 0,
            block_size: 16,
            kv_tokens: None,
            gpu_memory_utilization: 0.9,
            max_step_tokens: 2048,
            max_graph_batch: 256,
            skinny_gemm: true,
            fuse_swiglu: true,
            fuse_rope: false,
            fuse_norm: false,
            persistent_decode: false,
        }
    }
}

/// The batch sizes decode graphs are captured for: 1, 2, 4, 8, then multiples of 16.
pub(crate) fn graph_bucket(seqs: usize) -> usize {
    if seqs <= 8 {
        seqs.next_power_of_two()
    } else {
        seqs.div_ceil(16) * 16
    }
}

struct DecodeGraph {
    /// `None`: this shape runs eagerly, because the driver could not capture the persistent decode stack's
    /// cooperative launch.
    graph: Option<CudaGraph>,
    generation: u64,
    /// The graph runs the layers through the persistent decode stack.
    stack: bool,
    /// The pool slot the graph writes its logits to.
    logits_slot: usize,
}

/// Checks the config and options, opens the device and creates the one stream and the cuBLASLt handle.
fn open_device(cfg: &LlamaConfig, opts: &CudaOptions) -> Result<(Arc<CudaStream>, Blas, String)> {
    k::probe()?;
    if !matches!(cfg.head_dim, 64 | 128) || cfg.gqa_group() > 16 {
        return Err(Error::request(format!(
            "the CUDA attention kernels take head_dim 64 or 128 and at most 16 query heads per kv head; \
             this model has head_dim {} and {} (use --device cpu)",
            cfg.head_dim,
            cfg.gqa_group()
        )));
    }
    if opts.block_size == 0 {
        return Err(Error::request("--block-size must be positive"));
    }
    if !(0.05..=1.0).contains(&opts.gpu_memory_utilization) {
        return Err(Error::request(format!(
            "--gpu-memory-utilization must be in [0.05, 1], got {}",
            opts.gpu_memory_utilization
        )));
    }
    let ctx = CudaContext::new(opts.device).map_err(drv("open CUDA device"))?;
    // One stream orders everything, so cudarc's per-buffer events are not needed, and they would break capture.
    // SAFETY: called before any buffer exists; all work below goes to the single stream created next.
    unsafe { ctx.disable_event_tracking() };
    let device_name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
    // Graphs cannot be captured on the legacy default stream.
    let stream = ctx.new_stream().map_err(drv("create stream"))?;
    let blas = blas::Blas::new(&stream)?;
    Ok((stream, blas, device_name))
}

/// SM count for the split heuristics.
fn num_sms_for_plan(stream: &CudaStream) -> Result<usize> {
    k::attention::num_sms(stream)
}

/// Bytes the quantized projections need besides their weights, for steps of up to `t` tokens: the int8
/// activations (with scales and zero points), the largest split-K workspace, and the bf16 scratch of the
/// prefill-sized W4A16 path (a chunk of the largest W4A16 projection). 0 for an unquantized model.
fn quant_reserve(cfg: &LlamaConfig, layers: &[DeviceLayer], t: usize, sms: usize) -> usize {
    let (mut any_w4a8, mut partials, mut counters, mut scratch) = (false, 0, 0, 0);
    for l in layers {
        for w in [&l.wqkv, &l.wo, &l.w_gate_up, &l.w_down] {
            if let DeviceLinear::Quant(q) = w {
                let (p, c) = k::quant::workspace_bound(q.is_w4a8(), t, q.n(), q.k(), sms);
                partials = partials.max(p);
                counters = counters.max(c);
                if q.is_w4a8() {
                    any_w4a8 = true;
                } else if k::quant::takes_large_path(t) {
                    scratch = scratch.max(2 * k::quant::w4a16_chunk_rows(q.n(), q.k()) * q.k());
                }
            }
        }
    }
    let width = cfg.hidden_size.max(cfg.intermediate_size).max(cfg.q_dim());
    let acts = if any_w4a8 { t.next_power_of_two() * (width + 8) } else { 0 };
    acts + 4 * (partials + counters) + scratch
}

/// Device bytes in use now, the cap `opts.gpu_memory_utilization` puts on the device of `stream`, and its total.
fn memory_in_use(stream: &Arc<CudaStream>, opts: &CudaOptions) -> Result<(usize, usize, usize)> {
    stream.synchronize().map_err(drv("synchronize"))?;
    stream.context().bind_to_thread().map_err(drv("bind device"))?;
    let (free, total) = cudarc::driver::result::mem_get_info().map_err(drv("query device memory"))?;
    Ok((total - free, (total as f64 * opts.gpu_memory_utilization as f64) as usize, total))
}

/// Logits rows the memory plan reserves room for ([`act_reserve`]): a step's rows are among its tokens.
pub(crate) fn planned_logits_rows(opts: &CudaOptions) -> usize {
    opts.max_step_tokens.min(1024)
}

/// Bytes kept free for activations and workspaces of steps of up to `opts.max_step_tokens` tokens.
fn act_reserve(cfg: &LlamaConfig, opts: &CudaOptions, layers: &[DeviceLayer], stream: &CudaStream) -> Result<usize> {
    let t = opts.max_step_tokens;
    Ok(2 * t * (4 * cfg.hidden_size + cfg.q_dim() + 2 * cfg.kv_dim() + 3 * cfg.intermediate_size)
        + 2 * planned_logits_rows(opts) * cfg.vocab_size
        + quant_reserve(cfg, layers, t, num_sms_for_plan(stream)?)
        + (256 << 20))
}

/// Bytes of one KV block over all layers (K and V, bf16).
fn block_bytes(cfg: &LlamaConfig, opts: &CudaOptions) -> usize {
    opts.block_size * cfg.kv_dim() * 2 * 2 * cfg.num_hidden_layers
}

/// Weights uploaded to a device, not yet joined to a KV cache: the device handles, then the embedding, layers,
/// final norm and lm_head.
#[allow(clippy::type_complexity)]
pub(crate) struct Uploaded {
    dev: (Arc<CudaStream>, Blas, String),
    weights: (DeviceTable, Vec<DeviceLayer>, CudaSlice<bf16>, Option<DeviceTable>),
}

/// Converts and uploads one fused tensor.
fn upload(
    stream: &Arc<CudaStream>,
    src: &WeightSource<'_>,
    spec: &FusedSpec,
    tick: &(dyn Fn(u64) + Sync),
) -> Result<CudaSlice<bf16>> {
    let host: Vec<bf16> = src.read_f32(spec, tick)?.into_iter().map(bf16::from_f32).collect();
    stream.clone_htod(&host).map_err(drv("upload weights"))
}

/// The CUDA executor.
pub struct CudaExecutor {
    ops: CudaOps,
    max_graph_batch: usize,
    max_blocks_per_seq: usize,
    /// Decode graphs by (batch bucket, KV splits, block-table width).
    graphs: HashMap<(usize, usize, usize), DecodeGraph>,
    /// Picks ids on the device ([`Executor::step_greedy`], [`Executor::step_sample`], [`Executor::step_scored`]).
    sampler: sample::DeviceSampler,
    /// The step profiler's events, made on the first [`Executor::profile_step`].
    clock: Option<profile::EventClock>,
    /// The calls [`Executor::set_ablation`] leaves out (graphs are captured without them).
    ablate: Vec<&'static str>,
    /// Steps whose layers ran through the persistent decode stack ([`Executor::fused_decode_steps`]).
    stack_steps: u64,
    /// Logits rows a step may ask for within the memory plan's reserve ([`act_reserve`]).
    planned_logits_rows: usize,
}

impl CudaExecutor {
    /// Opens device `opts.device`, uploads the weights as bf16 and sizes the paged KV cache.
    pub fn new(
        cfg: LlamaConfig,
        src: WeightSource<'_>,
        opts: &CudaOptions,
        tick: &(dyn Fn(u64) + Sync),
    ) -> Result<Self> {
        let (stream, blas, device_name) = open_device(&cfg, opts)?;
        let specs = ModelSpecs::of(&cfg);
        let up = |s: &FusedSpec| upload(&stream, &src, s, tick);
        let mut layers = Vec::with_capacity(specs.layers.len());
        for l in &specs.layers {
            layers.push(DeviceLayer {
                attn_norm: up(&l.attn_norm)?,
                wqkv: DeviceLinear::Dense(up(&l.wqkv)?),
                wo: DeviceLinear::Dense(up(&l.wo)?),
                mlp_norm: up(&l.mlp_norm)?,
                w_gate_up: DeviceLinear::Dense(up(&l.w_gate_up)?),
                w_down: DeviceLinear::Dense(up(&l.w_down)?),
            });
        }
        let embed = DeviceTable::Bf16(up(&specs.embed)?);
        let final_norm = up(&specs.final_norm)?;
        let lm_head = specs.lm_head.as_ref().map(up).transpose()?.map(DeviceTable::Bf16);
        Self::assemble(cfg, opts, (stream, blas, device_name), (embed, layers, final_norm, lm_head))
    }

    /// Opens device `opts.device` and uploads CPU-side weights: a projection whose [`LinearWeight::quant`] is set
    /// goes up in the 4-bit kernels' layout (W4A16 or W4A8, by its scheme), every other tensor as bf16. This is how
    /// a quantized checkpoint, or weights quantized at load time, run on CUDA; unquantized weights give the same
    /// executor as [`CudaExecutor::new`].
    pub fn from_weights(cfg: LlamaConfig, weights: &ModelWeights, opts: &CudaOptions) -> Result<Self> {
        let up = Self::upload_weights(&cfg, weights, opts)?;
        Self::assemble(cfg, opts, up.dev, up.weights)
    }

    /// The first half of [`from_weights`](Self::from_weights): opens device `opts.device` and uploads `weights`
    /// (checked against `cfg`), without sizing the cache. Tensor-parallel ranks sharing a device upload all their
    /// shards first and then size their caches together ([`fit_blocks`](Self::fit_blocks)).
    pub(crate) fn upload_weights(cfg: &LlamaConfig, weights: &ModelWeights, opts: &CudaOptions) -> Result<Uploaded> {
        let (stream, blas, device_name) = open_device(cfg, opts)?;
        let specs = ModelSpecs::of(cfg);
        if weights.layers.len() != specs.layers.len() {
            return Err(Error::Backend(format!(
                "weights have {} layers, the config {}",
                weights.layers.len(),
                specs.layers.len()
            )));
        }
        let dense = |what: &str, v: &[f32], spec: &FusedSpec| -> Result<CudaSlice<bf16>> {
            if v.len() != spec.numel {
                return Err(Error::Backend(format!("{what}: {} values, expected {}", v.len(), spec.numel)));
            }
            let host: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            stream.clone_htod(&host).map_err(drv("upload weights"))
        };
        let linear =
            |what: &str, w: &LinearWeight, spec: &FusedSpec| DeviceLinear::upload(&stream, what, w, spec.numel);
        let gate_up =
            |what: &str, w: &LinearWeight, spec: &FusedSpec| DeviceLinear::upload_gate_up(&stream, what, w, spec.numel);
        let mut layers = Vec::with_capacity(specs.layers.len());
        for (i, (l, w)) in specs.layers.iter().zip(&weights.layers).enumerate() {
            layers.push(DeviceLayer {
                attn_norm: dense(&format!("layer {i} attn_norm"), &w.attn_norm, &l.attn_norm)?,
                wqkv: linear(&format!("layer {i} qkv"), &w.wqkv, &l.wqkv)?,
                wo: linear(&format!("layer {i} o_proj"), &w.wo, &l.wo)?,
                mlp_norm: dense(&format!("layer {i} mlp_norm"), &w.mlp_norm, &l.mlp_norm)?,
                w_gate_up: gate_up(&format!("layer {i} gate_up"), &w.w_gate_up, &l.w_gate_up)?,
                w_down: linear(&format!("layer {i} down_proj"), &w.w_down, &l.w_down)?,
            });
        }
        // The tables go up in int8 when the weights hold them so (an int8-embeddings model).
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let table = |what: &str, values: &[f32], int8| DeviceTable::upload(&stream, what, (values, int8), (v, h));
        let embed = table("embed_tokens", &weights.embed, weights.embed_int8.as_ref())?;
        let final_norm = dense("norm", &weights.final_norm, &specs.final_norm)?;
        let lm_head = match (&specs.lm_head, &weights.lm_head) {
            (Some(_), Some(values)) => Some(table("lm_head", values, weights.lm_head_int8.as_ref())?),
            (None, None) => None,
            _ => return Err(Error::Backend("lm_head: tied in one of the config and the weights only".into())),
        };
        Ok(Uploaded { dev: (stream, blas, device_name), weights: (embed, layers, final_norm, lm_head) })
    }

    /// KV blocks that fit on the device of `up` when `share` executors of config `cfg` (all uploaded already, `up`
    /// among them) split what is left under the utilization cap equally, each keeping its activation reserve.
    pub(crate) fn fit_blocks(cfg: &LlamaConfig, opts: &CudaOptions, up: &Uploaded, share: usize) -> Result<usize> {
        let stream = &up.dev.0;
        let (used, cap, _) = memory_in_use(stream, opts)?;
        let reserve = act_reserve(cfg, opts, &up.weights.1, stream)?;
        let share = share.max(1);
        Ok(cap.saturating_sub(used + share * reserve) / (share * block_bytes(cfg, opts)))
    }

    /// Sizes the cache of uploaded weights (`opts.kv_tokens` must be set, as from [`fit_blocks`](Self::fit_blocks))
    /// and returns the bare kernels: a tensor-parallel rank runs [`forward`] on them itself (eagerly).
    pub(crate) fn rank_ops(cfg: LlamaConfig, opts: &CudaOptions, up: Uploaded) -> Result<CudaOps> {
        if opts.kv_tokens.is_none() {
            return Err(Error::Backend("a tensor-parallel rank needs an explicit KV capacity".into()));
        }
        Ok(Self::assemble(cfg, opts, up.dev, up.weights)?.ops)
    }

    /// Turns the fusion of the W4A8 activation quantization into the preceding RMSNorm / SiLU kernel on or off
    /// (on by default; off runs a separate quantization kernel on the bf16 activation, with the same result).
    pub fn set_fuse_act_quant(&mut self, on: bool) {
        self.ops.quant.fuse = on;
        self.graphs.clear();
    }

    /// Turns the RoPE + KV-write fusion into the bf16 QKV projection's skinny GEMM on or off
    /// ([`CudaOptions::fuse_rope`]; off runs the GEMM and then the RoPE kernel, with the same bits).
    pub fn set_fuse_rope(&mut self, on: bool) {
        self.ops.fuse_rope = on;
        self.graphs.clear();
    }

    /// Turns the residual add + RMSNorm fusion into the prologue of the bf16 QKV and gate_up projections' skinny GEMM
    /// on or off ([`CudaOptions::fuse_norm`]; off runs the norm kernel first, with the same bits).
    pub fn set_fuse_norm(&mut self, on: bool) {
        self.ops.fuse_norm = on;
        self.graphs.clear();
    }

    /// Switches the persistent decode stack on or off ([`CudaOptions::persistent_decode`]): on, decode steps of up to
    /// 8 sequences run every decoder layer in one cooperative launch, with the bits of the layers one by one at
    /// 8-warp gemv tiles ([`k::gemv::with_warps`]) or, for W4A16 projections, at 8 K splits
    /// ([`k::quant::with_w4a16_splits`]). Fails, naming the cause, for W4A8 projections, W4A16 ones with zero
    /// points, a mix of formats, or under tensor parallelism.
    pub fn set_persistent_decode(&mut self, on: bool) -> Result<()> {
        self.ops.set_persistent_decode(on)?;
        self.graphs.clear();
        Ok(())
    }

    /// Turns the SwiGLU fusion into the decode gate_up projection (bf16 skinny GEMM or W4A16) on or off
    /// ([`CudaOptions::fuse_swiglu`]; off runs the projection and then the SiLU * up kernel, with the same bits).
    pub fn set_fuse_swiglu(&mut self, on: bool) {
        self.ops.fuse_swiglu = on;
        self.graphs.clear();
    }

    /// Device bytes of the projection weights (bf16 or quantized), the embedding, norms and lm_head.
    pub fn weight_bytes(&self) -> usize {
        let o = &self.ops;
        let layers: usize = o
            .layers
            .iter()
            .map(|l| {
                2 * (l.attn_norm.len() + l.mlp_norm.len())
                    + l.wqkv.device_bytes()
                    + l.wo.device_bytes()
                    + l.w_gate_up.device_bytes()
                    + l.w_down.device_bytes()
            })
            .sum();
        layers + o.embed.device_bytes() + 2 * o.final_norm.len() + o.lm_head.as_ref().map_or(0, |h| h.device_bytes())
    }

    /// Sizes the cache and workspaces around uploaded weights.
    #[allow(clippy::type_complexity)]
    fn assemble(
        cfg: LlamaConfig,
        opts: &CudaOptions,
        (stream, blas, device_name): (Arc<CudaStream>, Blas, String),
        (embed, layers, final_norm, lm_head): (DeviceTable, Vec<DeviceLayer>, CudaSlice<bf16>, Option<DeviceTable>),
    ) -> Result<Self> {
        let inv_freq = stream.clone_htod(&cfg.rope.inv_freq(cfg.head_dim)).map_err(drv("upload inv_freq"))?;
        let layout = PagedLayout {
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            block_size: opts.block_size,
        };
        // Memory plan: what is left under the utilization cap, after an activation reserve, goes to the cache.
        let (used, cap, total) = memory_in_use(&stream, opts)?;
        let act_reserve = act_reserve(&cfg, opts, &layers, &stream)?;
        let fit_blocks = cap.saturating_sub(used + act_reserve) / block_bytes(&cfg, opts);
        let num_blocks = match opts.kv_tokens {
            Some(tokens) => {
                let want = tokens.div_ceil(opts.block_size).max(1);
                if want > fit_blocks {
                    return Err(Error::request(format!(
                        "--kv-tokens {tokens} needs {want} blocks but only {fit_blocks} fit under \
                         --gpu-memory-utilization {}",
                        opts.gpu_memory_utilization
                    )));
                }
                want
            }
            None if fit_blocks == 0 => {
                return Err(Error::request(format!(
                    "no room for a KV cache: weights use {:.2} GiB of {:.2} GiB with --gpu-memory-utilization {}",
                    used as f64 / (1u64 << 30) as f64,
                    total as f64 / (1u64 << 30) as f64,
                    opts.gpu_memory_utilization
                )))
            }
            None => fit_blocks,
        };
        let pool = num_blocks * opts.block_size * layout.slot_len();
        let mut k_cache = Vec::with_capacity(cfg.num_hidden_layers);
        let mut v_cache = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            k_cache.push(stream.alloc_zeros::<bf16>(pool).map_err(drv("allocate K cache"))?);
            v_cache.push(stream.alloc_zeros::<bf16>(pool).map_err(drv("allocate V cache"))?);
        }
        let num_sms = k::attention::num_sms(&stream)?;
        let ws_bytes = k::attention::decode_workspace_bytes_max(
            &layout,
            opts.max_step_tokens,
            cfg.max_position_embeddings,
            num_sms,
        );
        let workspace = stream.alloc_zeros::<u8>(ws_bytes.max(1)).map_err(drv("allocate attention workspace"))?;
        let max_blocks_per_seq = cfg.max_position_embeddings.div_ceil(opts.block_size).min(num_blocks);
        let mut ops = CudaOps::new(
            cfg,
            stream,
            blas,
            (embed, layers, final_norm, lm_head),
            inv_freq,
            layout,
            (num_blocks, k_cache, v_cache),
            workspace,
            num_sms,
            device_name,
        );
        ops.skinny_gemm = opts.skinny_gemm;
        ops.fuse_swiglu = opts.fuse_swiglu;
        ops.fuse_rope = opts.fuse_rope;
        ops.fuse_norm = opts.fuse_norm;
        ops.set_persistent_decode(opts.persistent_decode)?;
        let sampler = sample::DeviceSampler::new(&ops.stream)?;
        Ok(CudaExecutor {
            ops,
            max_graph_batch: opts.max_graph_batch,
            max_blocks_per_seq,
            graphs: HashMap::new(),
            sampler,
            clock: None,
            ablate: Vec::new(),
            stack_steps: 0,
            planned_logits_rows: planned_logits_rows(opts),
        })
    }

    /// The device's name.
    pub fn device_name(&self) -> &str {
        &self.ops.device_name
    }

    /// A decode step as a padded, fixed-shape step: `bucket` rows, block tables `width` wide, padding rows at
    /// position 0 writing no cache slot.
    pub(crate) fn padded_decode(input: &StepInput, bucket: usize, width: usize) -> StepInput {
        let seqs = input.num_seqs();
        let mut p = StepInput {
            token_ids: input.token_ids.clone(),
            positions: input.positions.clone(),
            cu_seqlens: (0..=bucket as u32).collect(),
            block_tables: vec![0; bucket * width],
            max_blocks_per_seq: width,
            slot_mapping: input.slot_mapping.clone(),
            logits_rows: (0..bucket as u32).collect(),
        };
        for s in 0..seqs {
            let row = &input.block_tables[s * input.max_blocks_per_seq..][..input.max_blocks_per_seq.min(width)];
            p.block_tables[s * width..][..row.len()].copy_from_slice(row);
        }
        p.token_ids.resize(bucket, 0);
        p.positions.resize(bucket, 0);
        p.slot_mapping.resize(bucket, k::rope::PAD_SLOT);
        p
    }

    /// Runs a decode step through a captured graph (capturing it first if needed); returns the pool slot holding
    /// the logits (the real rows first).
    fn step_graph(&mut self, input: &StepInput) -> Result<usize> {
        let padded = self.graph_input(input);
        let (bucket, width) = (padded.num_seqs(), padded.max_blocks_per_seq);
        let max_ctx = input.positions.iter().map(|&p| p as usize + 1).max().unwrap_or(1);
        let key = (bucket, self.ops.decode_splits(bucket, max_ctx), width);
        let dims = Dims::of(&self.ops.cfg);
        // Copy this step's metadata into the persistent buffers the graph reads.
        self.ops.begin_step(&padded)?;
        let stale = self.graphs.get(&key).is_none_or(|g| g.generation != self.ops.generation);
        if stale {
            self.graphs.remove(&key);
            // An eager run sizes every pooled buffer, so capture allocates nothing.
            let logits = forward_skipping(&mut self.ops, &self.ablate, dims, &padded)?;
            self.ops.release(logits);
            let generation = self.ops.generation;
            let stream = self.ops.stream.clone();
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(drv("begin graph capture"))?;
            self.ops.capturing = true;
            let launches = self.ops.stack_launches;
            let captured = forward_skipping(&mut self.ops, &self.ablate, dims, &padded);
            let stack = self.ops.stack_launches > launches;
            self.ops.capturing = false;
            let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
            if self.ops.stack_enabled() && (captured.is_err() || ended.is_err()) {
                // The driver could not capture the persistent decode stack's cooperative launch: this shape's
                // decode steps run eagerly (the stack is one launch, so a graph would gain little). An error of
                // the step itself comes back from the eager run.
                if let Ok(logits) = captured {
                    self.ops.release(logits);
                }
                let entry = DecodeGraph { graph: None, generation: self.ops.generation, stack: true, logits_slot: 0 };
                self.graphs.insert(key, entry);
                return self.eager_step(dims, &padded);
            }
            let graph = ended.map_err(drv("end graph capture"))?;
            let logits = captured?;
            let logits_slot = logits.slot();
            self.ops.release(logits);
            let graph = graph.ok_or_else(|| Error::Backend("graph capture produced no graph".into()))?;
            if self.ops.generation != generation {
                return Err(Error::Backend("buffers moved during graph capture".into()));
            }
            self.graphs.insert(key, DecodeGraph { graph: Some(graph), generation, stack, logits_slot });
        }
        let g = self.graphs.get(&key).ok_or_else(|| Error::Backend("decode graph missing".into()))?;
        let Some(graph) = g.graph.as_ref() else {
            return self.eager_step(dims, &padded);
        };
        graph.launch().map_err(drv("launch decode graph"))?;
        self.stack_steps += u64::from(g.stack);
        Ok(g.logits_slot)
    }

    /// Runs `step` eagerly; returns the pool slot holding its logits.
    fn eager_step(&mut self, dims: Dims, step: &StepInput) -> Result<usize> {
        let launches = self.ops.stack_launches;
        let logits = forward_skipping(&mut self.ops, &self.ablate, dims, step)?;
        self.stack_steps += u64::from(self.ops.stack_launches > launches);
        let slot = logits.slot();
        self.ops.release(logits);
        Ok(slot)
    }

    /// The padded, fixed-shape step a CUDA graph runs for the plain decode step `input`: the batch rounded up to
    /// its bucket, the block tables to a power-of-two width (so that few graphs cover all context lengths).
    fn graph_input(&self, input: &StepInput) -> StepInput {
        let width = input.max_blocks_per_seq.next_power_of_two().min(self.max_blocks_per_seq);
        Self::padded_decode(input, graph_bucket(input.num_seqs()), width)
    }

    /// Whether the validated step `input` runs as a CUDA graph: a plain decode step (one new token per sequence,
    /// the logits of every row in order) within the graph limits.
    fn runs_as_graph(&self, input: &StepInput) -> bool {
        let seqs = input.num_seqs();
        let plain_decode = input.num_tokens() == seqs
            && input.logits_rows.len() == seqs
            && input.logits_rows.iter().enumerate().all(|(i, &r)| r as usize == i);
        plain_decode && seqs <= self.max_graph_batch && input.max_blocks_per_seq <= self.max_blocks_per_seq
    }

    /// Validates and runs a step (graph replay for plain decode steps, eager otherwise); returns the pool slot
    /// whose buffer holds the `[logits_rows, vocab]` logits until the next step.
    fn run(&mut self, input: &StepInput) -> Result<usize> {
        input.validate(&self.ops.cfg, self.ops.num_blocks, self.ops.layout.block_size)?;
        if self.runs_as_graph(input) {
            return self.step_graph(input);
        }
        self.eager_step(Dims::of(&self.ops.cfg), input)
    }

    fn logits_buffer(&self, slot: usize) -> Result<&CudaSlice<bf16>> {
        self.ops.pooled(slot).ok_or_else(|| Error::Backend("logits buffer missing".into()))
    }

    /// The logits of `input`'s rows from pool slot `slot` (the padded rows of a graph step come after them), as f32.
    fn read_logits(&self, input: &StepInput, slot: usize) -> Result<StepOutput> {
        let n = input.logits_rows.len() * self.ops.cfg.vocab_size;
        if n == 0 {
            return Ok(StepOutput::default());
        }
        let buf = self.logits_buffer(slot)?;
        let host = self.ops.stream.clone_dtoh(&buf.slice(..n)).map_err(drv("read logits"))?;
        Ok(StepOutput { logits: host.into_iter().map(f32::from).collect() })
    }
}

impl Executor for CudaExecutor {
    fn config(&self) -> &LlamaConfig {
        &self.ops.cfg
    }

    fn block_size(&self) -> usize {
        self.ops.layout.block_size
    }

    fn num_blocks(&self) -> usize {
        self.ops.num_blocks
    }

    fn max_logits_rows(&self) -> Option<usize> {
        Some(self.planned_logits_rows)
    }

    fn step(&mut self, input: &StepInput) -> Result<StepOutput> {
        let slot = self.run(input)?;
        self.read_logits(input, slot)
    }

    fn fused_decode_steps(&self) -> u64 {
        self.stack_steps
    }

    fn set_fused_decode_timing(&mut self, on: bool) -> Result<()> {
        self.ops.set_stack_timing(on)
    }

    fn fused_decode_phases(&self) -> Result<Option<crate::ops::cuda::decode_layers::StackPhases>> {
        self.ops.stack_phases()
    }

    fn set_ablation(&mut self, labels: Vec<&'static str>) -> Result<()> {
        crate::model::profile::check_ablation(&labels, &crate::model::profile::ABLATABLE, "the CUDA executor")?;
        if labels != self.ablate {
            // The captured graphs hold the old calls.
            self.graphs.clear();
            self.ablate = labels;
        }
        Ok(())
    }

    fn profile_step(&mut self, input: &StepInput, profile: &mut StepProfile) -> Result<StepOutput> {
        input.validate(&self.ops.cfg, self.ops.num_blocks, self.ops.layout.block_size)?;
        let step = if self.runs_as_graph(input) { self.graph_input(input) } else { input.clone() };
        let dims = Dims::of(&self.ops.cfg);
        let stream = self.ops.stream.clone();
        let mut clock = self.clock.take().unwrap_or_else(|| profile::EventClock::new(stream.clone()));
        // The device waits while the host issues the step, so the step's kernels then run back to back.
        let timed = k::timing::busy_wait(&stream, clock.head_start()).and_then(|()| {
            let t0 = std::time::Instant::now();
            let mut profiled = Profiled::new(&mut self.ops, &mut clock).skipping(&self.ablate);
            let logits = forward(&mut profiled, dims, &step)?;
            let weight_bytes = profiled.take_weight_bytes();
            let host = t0.elapsed();
            let slot = logits.slot();
            self.ops.release(logits);
            Ok((slot, host, weight_bytes, clock.finish()?))
        });
        clock.reset();
        let result = timed.map(|(slot, host, weight_bytes, (calls, total))| {
            if clock.adapt(host) {
                profile.late_steps += 1;
            }
            profile.add_step(&calls, &weight_bytes, total, host.as_secs_f64());
            slot
        });
        self.clock = Some(clock);
        self.read_logits(input, result?)
    }

    fn step_greedy(&mut self, input: &StepInput) -> Result<Vec<u32>> {
        let slot = self.run(input)?;
        let (rows, vocab) = (input.logits_rows.len(), self.ops.cfg.vocab_size);
        let buf = self.ops.pooled(slot).ok_or_else(|| Error::Backend("logits buffer missing".into()))?;
        // The logits stay on the device: one id per row comes back.
        self.sampler.greedy(&self.ops.stream, buf, rows, vocab)
    }

    fn step_sample(&mut self, input: &StepInput, seqs: &mut [SampleSeq<'_>]) -> Result<Vec<u32>> {
        let (rows, vocab) = (input.logits_rows.len(), self.ops.cfg.vocab_size);
        if seqs.len() != rows {
            return Err(Error::request(format!("step_sample: {} sequences for {rows} logits rows", seqs.len())));
        }
        if rows == 0 || vocab > k::sampling::MAX_SAMPLE_VOCAB {
            // Nothing to pick, or a vocabulary the kernel does not take: the host path.
            let out = self.step(input)?;
            return Ok(seqs.iter_mut().zip(out.logits.chunks(vocab)).map(|(r, l)| r.sampler.sample(l)).collect());
        }
        let slot = self.run(input)?;
        let buf = self.ops.pooled(slot).ok_or_else(|| Error::Backend("logits buffer missing".into()))?;
        let rows: Vec<usize> = (0..rows).collect();
        self.sampler.sample(&self.ops.stream, buf, vocab, &rows, seqs)
    }

    fn step_scored(
        &mut self,
        input: &StepInput,
        images: &[Option<crate::vision::exec::SeqImages<'_>>],
        seqs: &mut [SampleSeq<'_>],
        sample_rows: &[usize],
        masks: crate::exec::scored::MaskSource<'_>,
        scores: &[crate::exec::scored::ScoreRow],
    ) -> Result<(Vec<u32>, Vec<crate::sampling::TokenLogprob>)> {
        let (total, vocab) = (input.logits_rows.len(), self.ops.cfg.vocab_size);
        if images.iter().any(Option::is_some)
            || !sample::scores_on_device(vocab, total, seqs.len(), sample_rows, scores)?
        {
            return crate::exec::scored::host_step_scored(self, input, images, seqs, sample_rows, masks, scores);
        }
        let slot = self.run(input)?;
        // The forward is issued, not finished: the masks are computed while the device runs it.
        let masks = &masks();
        let stream = self.ops.stream.clone();
        let buf = self.ops.pooled_mut(slot).ok_or_else(|| Error::Backend("logits buffer missing".into()))?;
        self.sampler.scored(&stream, buf, total, vocab, seqs, sample_rows, masks, scores)
    }
}
