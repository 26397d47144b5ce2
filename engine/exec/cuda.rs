//! The CUDA executor: bf16 weights and paged bf16 KV cache on one device, the kernels of `kernels/*.cu` and
//! cuBLASLt GEMMs, behind the same [`Executor`] trait and [`Ops`] recipe as the CPU reference.
//!
//! One stream; no host synchronization inside a step except reading the logits back.

use std::sync::Arc;

use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::config::LlamaConfig;
use crate::exec::{Executor, StepInput, StepOutput};
use crate::model::{forward, Dims, Linear, Norm, Ops};
use crate::ops::cpu::attention::PagedLayout;
use crate::ops::cuda as k;
use crate::weights::{FusedSpec, ModelSpecs, WeightSource};
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
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions { device: 0, block_size: 16, kv_tokens: None, gpu_memory_utilization: 0.9, max_step_tokens: 2048 }
    }
}

fn drv(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Backend(format!("{what}: {e}"))
}

/// A `[rows, cols]` bf16 activation on the device.
pub struct CudaAct {
    rows: usize,
    cols: usize,
    buf: CudaSlice<bf16>,
}

struct DeviceLayer {
    attn_norm: CudaSlice<bf16>,
    wqkv: CudaSlice<bf16>,
    wo: CudaSlice<bf16>,
    mlp_norm: CudaSlice<bf16>,
    w_gate_up: CudaSlice<bf16>,
    w_down: CudaSlice<bf16>,
}

struct StepMeta {
    ids: CudaSlice<u32>,
    positions: CudaSlice<u32>,
    cu_seqlens: CudaSlice<u32>,
    block_tables: CudaSlice<u32>,
    slots: CudaSlice<u32>,
    logits_rows: CudaSlice<u32>,
    max_blocks_per_seq: usize,
    max_query_len: usize,
    max_context_len: usize,
    decode: bool,
}

/// The CUDA backend's weights, cache, handles and kernels.
pub struct CudaOps {
    cfg: LlamaConfig,
    stream: Arc<CudaStream>,
    blas: CudaBlasLT,
    embed: CudaSlice<bf16>,
    layers: Vec<DeviceLayer>,
    final_norm: CudaSlice<bf16>,
    lm_head: Option<CudaSlice<bf16>>,
    inv_freq: CudaSlice<f32>,
    layout: PagedLayout,
    num_blocks: usize,
    k_cache: Vec<CudaSlice<bf16>>,
    v_cache: Vec<CudaSlice<bf16>>,
    workspace: CudaSlice<u8>,
    num_sms: usize,
    meta: Option<StepMeta>,
    device_name: String,
}

fn check(what: &str, a: &CudaAct, rows: usize, cols: usize) -> Result<()> {
    if a.rows == rows && a.cols == cols && a.buf.len() >= rows * cols {
        Ok(())
    } else {
        Err(Error::Backend(format!("{what}: buffer is [{}, {}], expected [{rows}, {cols}]", a.rows, a.cols)))
    }
}

impl CudaOps {
    fn norm_weight(&self, n: Norm) -> &CudaSlice<bf16> {
        match n {
            Norm::Attn(l) => &self.layers[l].attn_norm,
            Norm::Mlp(l) => &self.layers[l].mlp_norm,
            Norm::Final => &self.final_norm,
        }
    }

    fn linear_weight(&self, w: Linear) -> (&CudaSlice<bf16>, usize) {
        let c = &self.cfg;
        match w {
            Linear::Qkv(l) => (&self.layers[l].wqkv, c.q_dim() + 2 * c.kv_dim()),
            Linear::O(l) => (&self.layers[l].wo, c.hidden_size),
            Linear::GateUp(l) => (&self.layers[l].w_gate_up, 2 * c.intermediate_size),
            Linear::Down(l) => (&self.layers[l].w_down, c.hidden_size),
            Linear::LmHead => (self.lm_head.as_ref().unwrap_or(&self.embed), c.vocab_size),
        }
    }
}

/// `out[rows, n] = x[rows, k] @ w[n, k]^T` in bf16 with f32 accumulation (column-major view: `out^T = w x^T`).
fn gemm<I: DevicePtr<bf16>>(
    blas: &CudaBlasLT,
    x: &I,
    w: &I,
    rows: usize,
    kdim: usize,
    n: usize,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    if x.len() < rows * kdim || w.len() < n * kdim || out.len() < rows * n {
        return Err(Error::Backend(format!("gemm: buffers too small for [{rows}, {kdim}] x [{n}, {kdim}]^T")));
    }
    let cfg = MatmulConfig {
        transa: true,
        transb: false,
        transc: false,
        m: n as u64,
        n: rows as u64,
        k: kdim as u64,
        alpha: 1.0,
        lda: kdim as i64,
        ldb: kdim as i64,
        beta: 0.0,
        ldc: n as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    // SAFETY: the three buffers were checked above to hold the elements the layouts address.
    unsafe { blas.matmul(cfg, w, x, out, None, None) }.map_err(|e| Error::Backend(format!("cuBLASLt matmul: {e:?}")))
}

impl Ops for CudaOps {
    type Act = CudaAct;

    fn begin_step(&mut self, step: &StepInput) -> Result<()> {
        let s = &self.stream;
        let up = |v: &[u32]| s.clone_htod(v).map_err(drv("upload step metadata"));
        let decode = step.cu_seqlens.windows(2).all(|w| w[1] - w[0] == 1);
        let max_query_len = step.cu_seqlens.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
        let max_context_len = step.positions.iter().map(|&p| p as usize + 1).max().unwrap_or(0);
        self.meta = Some(StepMeta {
            ids: up(&step.token_ids)?,
            positions: up(&step.positions)?,
            cu_seqlens: up(&step.cu_seqlens)?,
            block_tables: up(&step.block_tables)?,
            slots: up(&step.slot_mapping)?,
            logits_rows: up(if step.logits_rows.is_empty() { &[0] } else { &step.logits_rows })?,
            max_blocks_per_seq: step.max_blocks_per_seq,
            max_query_len,
            max_context_len,
            decode,
        });
        Ok(())
    }

    fn alloc(&mut self, rows: usize, cols: usize) -> Result<CudaAct> {
        let buf = self.stream.alloc_zeros::<bf16>((rows * cols).max(1)).map_err(drv("allocate activation"))?;
        Ok(CudaAct { rows, cols, buf })
    }

    fn embed(&mut self, _ids: &[u32], out: &mut CudaAct) -> Result<()> {
        let h = self.cfg.hidden_size;
        let meta = self.meta.as_ref().ok_or_else(|| Error::Backend("no step in progress".into()))?;
        check("embed", out, meta.ids.len(), h)?;
        k::embedding::embed(&self.stream, &self.embed, h, &meta.ids, &mut out.buf.slice_mut(..meta.ids.len() * h))
    }

    fn rms_norm(&mut self, x: &CudaAct, n: Norm, out: &mut CudaAct) -> Result<()> {
        let h = self.cfg.hidden_size;
        check("rms_norm out", out, x.rows, h)?;
        let len = x.rows * h;
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
        let h = self.cfg.hidden_size;
        check("add_rms_norm delta", delta, residual.rows, h)?;
        check("add_rms_norm out", out, residual.rows, h)?;
        let len = residual.rows * h;
        let w = match n {
            Norm::Attn(l) => &self.layers[l].attn_norm,
            Norm::Mlp(l) => &self.layers[l].mlp_norm,
            Norm::Final => &self.final_norm,
        };
        k::norm::add_rms_norm(
            &self.stream,
            &mut residual.buf.slice_mut(..len),
            &delta.buf.slice(..len),
            w,
            self.cfg.rms_norm_eps,
            h,
            &mut out.buf.slice_mut(..len),
        )
    }

    fn linear(&mut self, x: &CudaAct, w: Linear, out: &mut CudaAct) -> Result<()> {
        let (weight, n) = self.linear_weight(w);
        let kdim = x.cols;
        check("linear out", out, x.rows, n)?;
        if weight.len() != n * kdim {
            return Err(Error::Backend(format!(
                "linear {w:?}: weight has {} elements, expected {n} x {kdim}",
                weight.len()
            )));
        }
        gemm(&self.blas, &x.buf, weight, x.rows, kdim, n, &mut out.buf)
    }

    fn rope_and_cache(&mut self, layer: usize, qkv: &mut CudaAct, _step: &StepInput) -> Result<()> {
        let meta = self.meta.as_ref().ok_or_else(|| Error::Backend("no step in progress".into()))?;
        let shape = k::rope::RopeKvShape { layout: self.layout, qkv_stride: qkv.cols };
        let len = qkv.rows * qkv.cols;
        let (kc, vc) = (&mut self.k_cache[layer], &mut self.v_cache[layer]);
        k::rope::rope_kv_write(
            &self.stream,
            &shape,
            &mut qkv.buf.slice_mut(..len),
            &meta.positions,
            &meta.slots,
            &self.inv_freq,
            k::rope::KvCacheMut { k: kc, v: vc },
        )
    }

    fn attention(&mut self, layer: usize, qkv: &CudaAct, _step: &StepInput, out: &mut CudaAct) -> Result<()> {
        let meta = self.meta.as_ref().ok_or_else(|| Error::Backend("no step in progress".into()))?;
        let q_dim = self.cfg.q_dim();
        check("attention out", out, qkv.rows, q_dim)?;
        let q = k::attention::QueryRows { qkv: &qkv.buf.slice(..qkv.rows * qkv.cols), stride: qkv.cols };
        let kv = k::attention::KvPools { layout: self.layout, k: &self.k_cache[layer], v: &self.v_cache[layer] };
        let out = &mut out.buf.slice_mut(..qkv.rows * q_dim);
        if meta.decode {
            let num_splits =
                k::attention::decode_num_splits(&self.layout, qkv.rows, meta.max_context_len, self.num_sms);
            let dm = k::attention::DecodeMeta {
                positions: &meta.positions,
                block_tables: &meta.block_tables,
                max_blocks_per_seq: meta.max_blocks_per_seq,
                num_splits,
            };
            k::attention::paged_decode(&self.stream, &q, &kv, &dm, &mut self.workspace, out)
        } else {
            let pm = k::attention::PrefillMeta {
                positions: &meta.positions,
                cu_seqlens: &meta.cu_seqlens,
                block_tables: &meta.block_tables,
                max_blocks_per_seq: meta.max_blocks_per_seq,
                max_query_len: meta.max_query_len,
            };
            k::attention::paged_prefill(&self.stream, &q, &kv, &pm, out)
        }
    }

    fn silu_mul(&mut self, gate_up: &CudaAct, out: &mut CudaAct) -> Result<()> {
        let inter = self.cfg.intermediate_size;
        check("silu_mul out", out, gate_up.rows, inter)?;
        let rows = gate_up.rows;
        k::activation::silu_mul(
            &self.stream,
            &gate_up.buf.slice(..rows * 2 * inter),
            inter,
            &mut out.buf.slice_mut(..rows * inter),
        )
    }

    fn gather_rows(&mut self, x: &CudaAct, rows: &[u32], out: &mut CudaAct) -> Result<()> {
        check("gather_rows out", out, rows.len(), x.cols)?;
        if rows.is_empty() {
            return Ok(());
        }
        // A row gather is an embedding lookup with `x` as the table.
        let meta = self.meta.as_ref().ok_or_else(|| Error::Backend("no step in progress".into()))?;
        let n = rows.len() * x.cols;
        k::embedding::embed(
            &self.stream,
            &x.buf.slice(..x.rows * x.cols),
            x.cols,
            &meta.logits_rows.slice(..rows.len()),
            &mut out.buf.slice_mut(..n),
        )
    }
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
}

impl CudaExecutor {
    /// Opens device `opts.device`, uploads the weights as bf16 and sizes the paged KV cache.
    pub fn new(
        cfg: LlamaConfig,
        src: WeightSource<'_>,
        opts: &CudaOptions,
        tick: &(dyn Fn(u64) + Sync),
    ) -> Result<Self> {
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
        let device_name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let stream = ctx.default_stream();
        let blas = CudaBlasLT::new(stream.clone()).map_err(|e| Error::Backend(format!("cuBLASLt: {e:?}")))?;
        let specs = ModelSpecs::of(&cfg);
        let up = |s: &FusedSpec| upload(&stream, &src, s, tick);
        let mut layers = Vec::with_capacity(specs.layers.len());
        for l in &specs.layers {
            layers.push(DeviceLayer {
                attn_norm: up(&l.attn_norm)?,
                wqkv: up(&l.wqkv)?,
                wo: up(&l.wo)?,
                mlp_norm: up(&l.mlp_norm)?,
                w_gate_up: up(&l.w_gate_up)?,
                w_down: up(&l.w_down)?,
            });
        }
        let embed = up(&specs.embed)?;
        let final_norm = up(&specs.final_norm)?;
        let lm_head = specs.lm_head.as_ref().map(up).transpose()?;
        let inv_freq = stream.clone_htod(&cfg.rope.inv_freq(cfg.head_dim)).map_err(drv("upload inv_freq"))?;
        let layout = PagedLayout {
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            block_size: opts.block_size,
        };
        // Memory plan: what is left under the utilization cap, after an activation reserve, goes to the cache.
        stream.synchronize().map_err(drv("synchronize"))?;
        let (free, total) = cudarc::driver::result::mem_get_info().map_err(drv("query device memory"))?;
        let used = total - free;
        let cap = (total as f64 * opts.gpu_memory_utilization as f64) as usize;
        let t = opts.max_step_tokens;
        let act_reserve = 2 * t * (4 * cfg.hidden_size + cfg.q_dim() + 2 * cfg.kv_dim() + 3 * cfg.intermediate_size)
            + 2 * t.min(1024) * cfg.vocab_size
            + (256 << 20);
        let block_bytes = opts.block_size * layout.slot_len() * 2 * 2 * cfg.num_hidden_layers;
        let fit_blocks = cap.saturating_sub(used + act_reserve) / block_bytes;
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
        Ok(CudaExecutor {
            ops: CudaOps {
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
                meta: None,
                device_name,
            },
        })
    }

    /// The device's name.
    pub fn device_name(&self) -> &str {
        &self.ops.device_name
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

    fn step(&mut self, input: &StepInput) -> Result<StepOutput> {
        input.validate(&self.ops.cfg, self.ops.num_blocks, self.ops.layout.block_size)?;
        let dims = Dims::of(&self.ops.cfg);
        let logits = forward(&mut self.ops, dims, input)?;
        self.ops.meta = None;
        let n = input.logits_rows.len() * dims.vocab;
        if n == 0 {
            return Ok(StepOutput::default());
        }
        let host = self.ops.stream.clone_dtoh(&logits.buf.slice(..n)).map_err(drv("read logits"))?;
        Ok(StepOutput { logits: host.into_iter().map(f32::from).collect() })
    }
}
