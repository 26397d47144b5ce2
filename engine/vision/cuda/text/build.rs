//! Construction of an [`MllamaCudaExecutor`]: its options and the memory plan (weights, self-attention caches,
//! cross-attention pools, activation and metadata buffers sized for the largest graph bucket), plus the accessors.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::CudaStream;

use super::super::{open_stream, upload_bf16, upload_f32};
use super::{alloc, Acts, Layer, Meta, MllamaCudaExecutor};
use crate::config::LlamaConfig;
use crate::exec::cuda::graph_bucket;
use crate::ops::cpu::attention::PagedLayout;
use crate::ops::cuda as k;
use crate::ops::cuda::vision as kv;
use crate::vision::config::{MllamaConfig, EXTRA_EMBED_ROWS};
use crate::vision::weights::{MllamaWeights, TextLayerWeights};
use crate::{Error, Result};

/// How to size an [`MllamaCudaExecutor`].
#[derive(Clone, Debug)]
pub struct MllamaCudaOptions {
    /// Device ordinal.
    pub device: usize,
    /// Tokens per self-attention KV block.
    pub block_size: usize,
    /// Self-attention KV capacity in tokens.
    pub kv_tokens: usize,
    /// Most tokens one step may carry (sizes the activation buffers).
    pub max_step_tokens: usize,
    /// Most logits rows one step may ask for.
    pub max_logits_rows: usize,
    /// Tiles of cross-attention K/V kept on the device at once (all registered image sets together; an image
    /// takes `max_num_tiles`).
    pub cross_tiles: usize,
    /// Run projections of up to 16 rows with the skinny GEMM kernel.
    pub skinny_gemm: bool,
    /// Capture decode steps of up to this many sequences as CUDA graphs, one per batch bucket (as the text
    /// executor's `--cuda-graph-max-batch`); 0 runs every step eagerly.
    pub max_graph_batch: usize,
}

impl Default for MllamaCudaOptions {
    fn default() -> Self {
        MllamaCudaOptions {
            device: 0,
            block_size: 16,
            kv_tokens: 8192,
            max_step_tokens: 2048,
            max_logits_rows: 256,
            cross_tiles: 64,
            skinny_gemm: true,
            max_graph_batch: 256,
        }
    }
}
impl MllamaCudaExecutor {
    /// Uploads the text weights of `w` (bf16) and sizes the caches. `w.vision` may be empty.
    pub fn new(cfg: MllamaConfig, w: &MllamaWeights, opts: &MllamaCudaOptions) -> Result<Self> {
        let t = cfg.text.base.clone();
        if opts.block_size == 0 || opts.kv_tokens == 0 || opts.max_step_tokens == 0 || opts.max_logits_rows == 0 {
            return Err(Error::request("block size, KV tokens, step tokens and logits rows must be positive"));
        }
        if t.head_dim % 8 != 0 || t.head_dim > kv::MAX_GATHER_HEAD_DIM {
            return Err(Error::request(format!(
                "the CUDA text path takes a head_dim that is a multiple of 8 up to {}; this model has {}",
                kv::MAX_GATHER_HEAD_DIM,
                t.head_dim
            )));
        }
        // Checks every text weight against the config (the CPU cache's check).
        crate::vision::text::TextCache::new(&w.text, &cfg.text)?;
        let (stream, blas) = open_stream(opts.device)?;
        let s = &stream;
        let (q_dim, kv_dim, hidden, inter) = (t.q_dim(), t.kv_dim(), t.hidden_size, t.intermediate_size);
        let layout = PagedLayout {
            num_heads: t.num_attention_heads,
            num_kv_heads: t.num_key_value_heads,
            head_dim: t.head_dim,
            block_size: opts.block_size,
        };
        let tpt = cfg.vision.num_patches();
        let cross_layout = PagedLayout { block_size: tpt, ..layout };
        let num_blocks = opts.kv_tokens.div_ceil(opts.block_size);
        let pool = num_blocks * opts.block_size * kv_dim;
        let cross_pool = (1 + opts.cross_tiles) * tpt * kv_dim;
        let mut layers = Vec::with_capacity(w.text.layers.len());
        for l in &w.text.layers {
            layers.push(match l {
                TextLayerWeights::SelfAttention(lw) => Layer::SelfAttn {
                    attn_norm: upload_bf16(s, &lw.attn_norm)?,
                    wqkv: upload_bf16(s, &lw.wqkv)?,
                    wo: upload_bf16(s, &lw.wo)?,
                    mlp_norm: upload_bf16(s, &lw.mlp_norm)?,
                    w_gate_up: upload_bf16(s, &lw.w_gate_up)?,
                    w_down: upload_bf16(s, &lw.w_down)?,
                    k_cache: alloc(s, pool)?,
                    v_cache: alloc(s, pool)?,
                },
                TextLayerWeights::CrossAttention(cw) => Layer::Cross {
                    attn_norm: upload_bf16(s, &cw.attn_norm)?,
                    wq: upload_bf16(s, &cw.wq)?,
                    wk: upload_bf16(s, &cw.wkv[..kv_dim * hidden])?,
                    wv: upload_bf16(s, &cw.wkv[kv_dim * hidden..])?,
                    wo: upload_bf16(s, &cw.wo)?,
                    q_norm: upload_bf16(s, &cw.q_norm)?,
                    k_norm: upload_bf16(s, &cw.k_norm)?,
                    attn_gate: cw.attn_gate.tanh(),
                    mlp_norm: upload_bf16(s, &cw.mlp_norm)?,
                    w_gate_up: upload_bf16(s, &cw.w_gate_up)?,
                    w_down: upload_bf16(s, &cw.w_down)?,
                    mlp_gate: cw.mlp_gate.tanh(),
                    k_pool: alloc(s, cross_pool)?,
                    v_pool: alloc(s, cross_pool)?,
                },
            });
        }
        let num_sms = k::attention::num_sms(s)?;
        // A graph step is padded to its bucket: the buffers hold the largest bucket graphs are used for.
        let graph_seqs = opts.max_graph_batch.min(opts.max_step_tokens).min(opts.max_logits_rows);
        let rows_cap = if graph_seqs == 0 { 0 } else { graph_bucket(graph_seqs) };
        let tmax = opts.max_step_tokens.max(rows_cap);
        let logits_cap = opts.max_logits_rows.max(rows_cap);
        let max_ctx = t.max_position_embeddings;
        let ws = k::attention::decode_workspace_bytes_max(&layout, tmax.min(1024), max_ctx, num_sms).max(
            k::attention::decode_workspace_bytes_max(
                &cross_layout,
                tmax.min(1024),
                (1 + opts.cross_tiles) * tpt,
                num_sms,
            ),
        );
        let acts = Acts {
            x: alloc(s, tmax * hidden)?,
            h: alloc(s, tmax * hidden)?,
            delta: alloc(s, tmax * hidden)?,
            qkv: alloc(s, tmax * (q_dim + 2 * kv_dim))?,
            attn: alloc(s, tmax * q_dim)?,
            q: alloc(s, tmax * q_dim)?,
            gate_up: alloc(s, tmax * 2 * inter)?,
            act: alloc(s, tmax * inter)?,
            hr: alloc(s, logits_cap * hidden)?,
            logits: alloc(s, logits_cap * t.vocab_size)?,
            workspace: alloc(s, ws)?,
        };
        let meta = Meta {
            ids: alloc(s, 1)?,
            positions: alloc(s, 1)?,
            cu_seqlens: alloc(s, 2)?,
            block_tables: alloc(s, 1)?,
            slots: alloc(s, 1)?,
            seq_of_token: alloc(s, 1)?,
            logits_rows: alloc(s, 1)?,
            x_positions: alloc(s, 1)?,
            x_cu: alloc(s, 2)?,
            x_tables: alloc(s, 1)?,
            x_seq_of_token: alloc(s, 1)?,
            attn_scale: alloc(s, 1)?,
            mlp_scale: alloc(s, 1)?,
        };
        let fast_attn = matches!(t.head_dim, 64 | 128) && t.gqa_group() <= 16;
        let ids_cfg = LlamaConfig { vocab_size: t.vocab_size + EXTRA_EMBED_ROWS, ..t.clone() };
        Ok(MllamaCudaExecutor {
            embed: upload_bf16(s, &w.text.embed)?,
            final_norm: upload_bf16(s, &w.text.final_norm)?,
            lm_head: upload_bf16(s, &w.text.lm_head)?,
            inv_freq: upload_f32(s, &t.rope.inv_freq(t.head_dim))?,
            cfg,
            ids_cfg,
            blas,
            layers,
            layout,
            cross_layout,
            num_blocks,
            cross_tiles: opts.cross_tiles,
            sets: HashMap::new(),
            acts,
            meta,
            opts: opts.clone(),
            num_sms,
            fast_attn,
            rows_cap,
            max_blocks_per_seq: max_ctx.div_ceil(opts.block_size).min(num_blocks),
            graphs: HashMap::new(),
            generation: 0,
            graph_counts: (0, 0),
            stream,
        })
    }

    /// The vision model's configuration.
    pub fn mllama_config(&self) -> &MllamaConfig {
        &self.cfg
    }

    /// The stream everything runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}
