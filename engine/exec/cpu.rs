//! The CPU reference executor: f32 weights, a paged f32 KV cache and the kernels of [`crate::ops::cpu`].

use crate::config::LlamaConfig;
use crate::exec::{Executor, StepInput, StepOutput};
use crate::model::profile::{forward_skipping, HostClock, OpClock, Profiled, StepProfile};
use crate::model::{forward, Dims, Linear, Norm, Ops};
use crate::ops::cpu::attention::{AttentionBatch, PagedLayout};
use crate::ops::cpu::quant::PreparedW4A8;
use crate::ops::cpu::{activation, attention, embedding, linear, norm, rope};
use crate::quant::ActQuant;
use crate::weights::{LinearWeight, ModelWeights};
use crate::{Error, Result};

/// A row-major `[rows, cols]` f32 activation buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuAct {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows * cols` values.
    pub data: Vec<f32>,
}

/// The CPU backend's kernels, weights and KV cache.
pub struct CpuOps {
    cfg: LlamaConfig,
    weights: ModelWeights,
    inv_freq: Vec<f32>,
    layout: PagedLayout,
    num_blocks: usize,
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
    seq_of_token: Vec<u32>,
    /// W4A8 projections, prepared once: `[layer * 4 + slot]` for slots qkv, o, gate_up, down.
    w4a8: Vec<Option<PreparedW4A8>>,
}

/// The W4A8 projections of `weights`, prepared for the int8 kernel (`None` for dense and W4A16 projections).
fn prepare_w4a8(weights: &ModelWeights) -> Vec<Option<PreparedW4A8>> {
    use rayon::prelude::*;
    let all: Vec<&LinearWeight> =
        weights.layers.iter().flat_map(|l| [&l.wqkv, &l.wo, &l.w_gate_up, &l.w_down]).collect();
    all.par_iter()
        .map(|w| match &w.quant {
            Some(q) if q.scheme.act == ActQuant::Int8PerToken => Some(PreparedW4A8::new(q.clone())),
            _ => None,
        })
        .collect()
}

fn shape_err(what: &str, a: &CpuAct, rows: usize, cols: usize) -> Error {
    Error::Backend(format!("{what}: buffer is [{}, {}], expected [{rows}, {cols}]", a.rows, a.cols))
}

fn check(what: &str, a: &CpuAct, rows: usize, cols: usize) -> Result<()> {
    if a.rows == rows && a.cols == cols && a.data.len() == rows * cols {
        Ok(())
    } else {
        Err(shape_err(what, a, rows, cols))
    }
}

impl CpuOps {
    /// The kernels over `weights` (for `cfg`, which may describe one tensor-parallel rank's shard) with a KV pool
    /// of `num_blocks` blocks of `block_size` tokens.
    pub fn new(cfg: LlamaConfig, weights: ModelWeights, num_blocks: usize, block_size: usize) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 {
            return Err(Error::request("the KV cache needs at least one block of at least one token"));
        }
        let layout = PagedLayout {
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            block_size,
        };
        let layers = cfg.num_hidden_layers;
        // The f32 K and V pools of every layer, refused with both sizes where they cannot fit the host (a huge
        // --batch or --kv-tokens used to abort in the allocator).
        let pool = num_blocks
            .checked_mul(block_size)
            .and_then(|t| t.checked_mul(layout.slot_len()))
            .filter(|&p| p.checked_mul(8 * layers).is_some())
            .ok_or_else(|| {
                Error::request(format!("a KV cache of {num_blocks} blocks of {block_size} tokens is too large"))
            })?;
        if let Some((need, avail)) = crate::weights::host_shortfall((pool * 8 * layers) as u64) {
            return Err(Error::request(format!(
                "the KV cache of {} tokens ({num_blocks} blocks of {block_size}) needs {need:.1} GiB of host memory in \
                 f32, but only {avail:.1} GiB is available: ask for fewer tokens (--kv-tokens, or a smaller --batch or \
                 prompt)",
                num_blocks * block_size
            )));
        }
        let inv_freq = cfg.rope.inv_freq(cfg.head_dim);
        for (l, lw) in weights.layers.iter().enumerate() {
            let shapes = [
                ("wqkv", &lw.wqkv, cfg.q_dim() + 2 * cfg.kv_dim(), cfg.hidden_size),
                ("wo", &lw.wo, cfg.hidden_size, cfg.q_dim()),
                ("w_gate_up", &lw.w_gate_up, 2 * cfg.intermediate_size, cfg.hidden_size),
                ("w_down", &lw.w_down, cfg.hidden_size, cfg.intermediate_size),
            ];
            for (name, w, n, k) in shapes {
                if let Some(q) = &w.quant {
                    let m = &q.matrix;
                    let groups = m.k.checked_div(m.group).unwrap_or(0);
                    let ok = m.n == n
                        && m.k == k
                        && m.group > 0
                        && k % m.group == 0
                        && m.q.len() == n * k
                        && m.scales.len() == n * groups
                        && m.zeros.as_ref().is_none_or(|z| z.len() == n * groups);
                    if !ok {
                        return Err(Error::Backend(format!(
                            "layer {l} {name}: quantized matrix [{}, {}] group {} does not match [{n}, {k}]",
                            m.n, m.k, m.group
                        )));
                    }
                }
            }
        }
        let w4a8 = prepare_w4a8(&weights);
        Ok(CpuOps {
            w4a8,
            inv_freq,
            layout,
            num_blocks,
            k_cache: zeroed_pools(layers, pool, "K")?,
            v_cache: zeroed_pools(layers, pool, "V")?,
            seq_of_token: Vec::new(),
            weights,
            cfg,
        })
    }

    /// The config the kernels were built for.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// KV blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Tokens per KV block.
    pub fn block_size(&self) -> usize {
        self.layout.block_size
    }

    fn norm_weight(&self, n: Norm) -> &[f32] {
        match n {
            Norm::Attn(l) => &self.weights.layers[l].attn_norm,
            Norm::Mlp(l) => &self.weights.layers[l].mlp_norm,
            Norm::Final => &self.weights.final_norm,
        }
    }

    fn w4a8_weight(&self, w: Linear) -> Option<&PreparedW4A8> {
        let slot = match w {
            Linear::Qkv(l) => l * 4,
            Linear::O(l) => l * 4 + 1,
            Linear::GateUp(l) => l * 4 + 2,
            Linear::Down(l) => l * 4 + 3,
            Linear::LmHead => return None,
        };
        self.w4a8.get(slot)?.as_ref()
    }

    fn linear_weight(&self, w: Linear) -> (&[f32], usize) {
        let c = &self.cfg;
        match w {
            Linear::Qkv(l) => (&self.weights.layers[l].wqkv, c.q_dim() + 2 * c.kv_dim()),
            Linear::O(l) => (&self.weights.layers[l].wo, c.hidden_size),
            Linear::GateUp(l) => (&self.weights.layers[l].w_gate_up, 2 * c.intermediate_size),
            Linear::Down(l) => (&self.weights.layers[l].w_down, c.hidden_size),
            Linear::LmHead => (self.weights.lm_head(), c.vocab_size),
        }
    }
}

impl Ops for CpuOps {
    type Act = CpuAct;

    fn begin_step(&mut self, step: &StepInput) -> Result<()> {
        self.seq_of_token = step.seq_of_token();
        Ok(())
    }

    fn alloc(&mut self, rows: usize, cols: usize) -> Result<CpuAct> {
        Ok(CpuAct { rows, cols, data: vec![0.0; rows * cols] })
    }

    fn release(&mut self, _act: CpuAct) {}

    fn embed(&mut self, ids: &[u32], out: &mut CpuAct) -> Result<()> {
        check("embed", out, ids.len(), self.cfg.hidden_size)?;
        embedding::embed(&self.weights.embed, self.cfg.hidden_size, ids, &mut out.data);
        Ok(())
    }

    fn rms_norm(&mut self, x: &CpuAct, n: Norm, out: &mut CpuAct) -> Result<()> {
        let h = self.cfg.hidden_size;
        check("rms_norm x", x, x.rows, h)?;
        check("rms_norm out", out, x.rows, h)?;
        norm::rms_norm(&x.data, self.norm_weight(n), self.cfg.rms_norm_eps, h, &mut out.data);
        Ok(())
    }

    fn add_rms_norm(&mut self, residual: &mut CpuAct, delta: &CpuAct, n: Norm, out: &mut CpuAct) -> Result<()> {
        let h = self.cfg.hidden_size;
        check("add_rms_norm residual", residual, residual.rows, h)?;
        check("add_rms_norm delta", delta, residual.rows, h)?;
        check("add_rms_norm out", out, residual.rows, h)?;
        norm::add_rms_norm(
            &mut residual.data,
            &delta.data,
            self.norm_weight(n),
            self.cfg.rms_norm_eps,
            h,
            &mut out.data,
        );
        Ok(())
    }

    fn linear(&mut self, x: &CpuAct, w: Linear, out: &mut CpuAct) -> Result<()> {
        let (weight, n) = self.linear_weight(w);
        let k = weight.len() / n.max(1);
        check("linear x", x, x.rows, k)?;
        check("linear out", out, x.rows, n)?;
        // W4A8: int8 activations x int4 weights. W4A16 (and unquantized weights): the f32 GEMM over `dense`,
        // which holds the exactly dequantized values: that product is the W4A16 reference.
        match self.w4a8_weight(w) {
            Some(p) => p.forward(&x.data, x.rows, &mut out.data),
            None => linear::linear(&x.data, weight, x.rows, k, n, &mut out.data),
        }
        Ok(())
    }

    fn rope_and_cache(&mut self, layer: usize, qkv: &mut CpuAct, step: &StepInput) -> Result<()> {
        let c = &self.cfg;
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        check("rope qkv", qkv, step.num_tokens(), q_dim + 2 * kv_dim)?;
        let stride = qkv.cols;
        // q and k are rotated as one block of heads: k's heads follow q's in each row.
        rope::rope(
            &mut qkv.data,
            stride,
            c.num_attention_heads + c.num_key_value_heads,
            c.head_dim,
            &step.positions,
            &self.inv_freq,
        );
        let (kc, vc) = (&mut self.k_cache[layer], &mut self.v_cache[layer]);
        attention::write_kv(
            &self.layout,
            &qkv.data[q_dim..],
            &qkv.data[q_dim + kv_dim..],
            stride,
            &step.slot_mapping,
            kc,
            vc,
        );
        Ok(())
    }

    fn attention(&mut self, layer: usize, qkv: &CpuAct, step: &StepInput, out: &mut CpuAct) -> Result<()> {
        let q_dim = self.cfg.q_dim();
        check("attention out", out, step.num_tokens(), q_dim)?;
        let batch = AttentionBatch {
            seq_of_token: &self.seq_of_token,
            positions: &step.positions,
            block_tables: &step.block_tables,
            max_blocks_per_seq: step.max_blocks_per_seq,
        };
        attention::paged_attention(
            &self.layout,
            &qkv.data,
            qkv.cols,
            &batch,
            &self.k_cache[layer],
            &self.v_cache[layer],
            &mut out.data,
        );
        Ok(())
    }

    fn silu_mul(&mut self, gate_up: &CpuAct, out: &mut CpuAct) -> Result<()> {
        let inter = self.cfg.intermediate_size;
        check("silu_mul in", gate_up, gate_up.rows, 2 * inter)?;
        check("silu_mul out", out, gate_up.rows, inter)?;
        activation::silu_mul(&gate_up.data, inter, &mut out.data);
        Ok(())
    }

    fn weight_bytes(&self, w: Linear) -> usize {
        std::mem::size_of_val(self.linear_weight(w).0)
    }

    fn gather_rows(&mut self, x: &CpuAct, rows: &[u32], out: &mut CpuAct) -> Result<()> {
        check("gather_rows out", out, rows.len(), x.cols)?;
        for (dst, &r) in out.data.chunks_mut(x.cols.max(1)).zip(rows) {
            let r = r as usize;
            if r >= x.rows {
                return Err(Error::Backend(format!("gather_rows: row {r} of {}", x.rows)));
            }
            dst.copy_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(())
    }
}

/// The CPU reference executor.
pub struct CpuExecutor {
    ops: CpuOps,
    /// The calls [`Executor::set_ablation`] leaves out.
    ablate: Vec<&'static str>,
}

/// `layers` zeroed f32 pools of `pool` values each, or an error where the host refuses the memory (an address-space
/// limit, `ulimit -v`, which `MemAvailable` does not show) instead of an abort in the allocator. Each pool is
/// probed with a fallible reservation first, then allocated zeroed, which leaves its pages untouched until used.
fn zeroed_pools(layers: usize, pool: usize, what: &str) -> Result<Vec<Vec<f32>>> {
    (0..layers)
        .map(|l| {
            let mut probe: Vec<f32> = Vec::new();
            probe.try_reserve_exact(pool).map_err(|_| {
                Error::request(format!(
                    "the {what} cache of layer {l} ({:.2} GiB of f32) cannot be allocated: ask for fewer KV tokens \
                     (--kv-tokens, or a smaller --batch or prompt)",
                    pool as f64 * 4.0 / (1u64 << 30) as f64
                ))
            })?;
            drop(probe);
            Ok(vec![0.0; pool])
        })
        .collect()
}

impl CpuExecutor {
    /// An executor over `weights` with a KV pool of `num_blocks` blocks of `block_size` tokens.
    pub fn new(cfg: LlamaConfig, weights: ModelWeights, num_blocks: usize, block_size: usize) -> Result<Self> {
        Ok(CpuExecutor { ops: CpuOps::new(cfg, weights, num_blocks, block_size)?, ablate: Vec::new() })
    }

    /// An executor whose pool holds `max_tokens` tokens (rounded up to whole blocks).
    pub fn with_capacity(
        cfg: LlamaConfig,
        weights: ModelWeights,
        max_tokens: usize,
        block_size: usize,
    ) -> Result<Self> {
        Self::new(cfg, weights, max_tokens.div_ceil(block_size.max(1)).max(1), block_size)
    }
}

impl Executor for CpuExecutor {
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
        let logits = forward_skipping(&mut self.ops, &self.ablate, dims, input)?;
        Ok(StepOutput { logits: logits.data })
    }

    fn set_ablation(&mut self, labels: Vec<&'static str>) -> Result<()> {
        crate::model::profile::check_ablation(&labels, &crate::model::profile::ABLATABLE, "the CPU executor")?;
        self.ablate = labels;
        Ok(())
    }

    fn profile_step(&mut self, input: &StepInput, profile: &mut StepProfile) -> Result<StepOutput> {
        input.validate(&self.ops.cfg, self.ops.num_blocks, self.ops.layout.block_size)?;
        let dims = Dims::of(&self.ops.cfg);
        let mut clock = HostClock::default();
        let t0 = std::time::Instant::now();
        let mut profiled = Profiled::new(&mut self.ops, &mut clock).skipping(&self.ablate);
        let logits = forward(&mut profiled, dims, input)?;
        let weight_bytes = profiled.take_weight_bytes();
        let host = t0.elapsed().as_secs_f64();
        let (calls, total) = clock.finish()?;
        profile.add_step(&calls, &weight_bytes, total, host);
        Ok(StepOutput { logits: logits.data })
    }
}
