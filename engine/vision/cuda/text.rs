//! The Llama 3.2 Vision text decoder on CUDA: [`MllamaCudaExecutor`], the device twin of
//! [`crate::vision::exec::MllamaCpuExecutor`] (same [`Executor`] contract: `add_images` / `remove_images` /
//! `step_with_images`, text-only steps through `step`).
//!
//! # Layers
//! Self-attention layers are the text models' kernels: RMSNorm (fused residual add), cuBLASLt or the skinny GEMM,
//! fused RoPE + paged KV write, paged prefill/decode attention (head_dim 64/128; other head dims take the generic
//! gather attention), SwiGLU. A cross-attention layer runs `q_norm(h Wq^T)`, attention over the image set's
//! cross K/V, `o_proj`, then [`crate::ops::cuda::vision::gated_rms_norm`] applies `tanh(attn_gate)` (times a per-row
//! scale) and the next norm; the MLP's `tanh(mlp_gate)` and row mask are applied the same way by the next layer's
//! norm.
//!
//! # Cross K/V
//! Each cross layer has one pool `[1 + cross_tiles, num_patches, kv_heads, head_dim]`: block 0 is all zeros, and an
//! image set registered by [`Executor::add_images`] gets a contiguous range of blocks, one per tile of each image
//! (padding tiles included: rows that see no image attend over every tile, as transformers does), computed once
//! (`k = k_norm(states Wk^T)`, `v = states Wv^T`) and kept until [`Executor::remove_images`]. A step turns each
//! token's mask row into a block table over the pool: the tiles it sees (or every tile of its set when it sees
//! none); consecutive tokens of a sequence with the same row share a table ("runs"), so the cross attention is one
//! paged prefill (or decode) call over runs. Tokens of sequences without images point at the zero block with a row
//! scale of 0, so they leave the residual unchanged, as transformers skips the layer for them. A step without any
//! image skips the cross layers entirely.
//!
//! # CUDA graphs
//! Decode steps (one token and one logits row per sequence) of up to `max_graph_batch` sequences replay a CUDA
//! graph captured per (batch bucket, self-attention KV splits, block-table width), with the text executor's buckets
//! and padding ([`crate::exec::cuda::CudaExecutor`]). Every pointer the forward reads is a persistent buffer, and
//! image sets are reached only through the per-token cross tables, which are inputs of the graph uploaded before
//! each replay: a graph step always runs the cross layers (text-only and padding rows see the zero block with a row
//! scale of 0), with tables `cross_tiles` wide and a cross split count fixed per bucket, so one graph serves
//! text-only, vision and mixed steps alike. A metadata buffer that grows bumps a generation and the graphs
//! captured before it are recaptured. Prefill and chunked steps run eagerly. Replay equals the eager step bit for
//! bit where the split counts agree (always on the generic attention kernel; on the tensor-core kernels, contexts
//! short enough for one split) and the projections are row-independent (the skinny GEMM, up to 16 rows).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublaslt::CudaBlasLT;
use cudarc::driver::{sys, CudaGraph, CudaSlice, CudaStream, CudaView, CudaViewMut};
use half::bf16;

use super::{drv, gemm, open_stream, upload_bf16, upload_f32};
use crate::config::LlamaConfig;
use crate::exec::cuda::{graph_bucket, CudaExecutor};
use crate::exec::{Executor, StepInput, StepOutput};
use crate::ops::cpu::attention::PagedLayout;
use crate::ops::cuda as k;
use crate::ops::cuda::vision as kv;
use crate::vision::config::{MllamaConfig, EXTRA_EMBED_ROWS};
use crate::vision::exec::SeqImages;
use crate::vision::pipeline::EncodedImages;
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

#[allow(clippy::large_enum_variant)] // a few per model, never moved after loading
enum Layer {
    SelfAttn {
        attn_norm: CudaSlice<bf16>,
        wqkv: CudaSlice<bf16>,
        wo: CudaSlice<bf16>,
        mlp_norm: CudaSlice<bf16>,
        w_gate_up: CudaSlice<bf16>,
        w_down: CudaSlice<bf16>,
        k_cache: CudaSlice<bf16>,
        v_cache: CudaSlice<bf16>,
    },
    Cross {
        attn_norm: CudaSlice<bf16>,
        wq: CudaSlice<bf16>,
        wk: CudaSlice<bf16>,
        wv: CudaSlice<bf16>,
        wo: CudaSlice<bf16>,
        q_norm: CudaSlice<bf16>,
        k_norm: CudaSlice<bf16>,
        attn_gate: f32,
        mlp_norm: CudaSlice<bf16>,
        w_gate_up: CudaSlice<bf16>,
        w_down: CudaSlice<bf16>,
        mlp_gate: f32,
        k_pool: CudaSlice<bf16>,
        v_pool: CudaSlice<bf16>,
    },
}

/// Activations, `max_step_tokens` rows each (logits: `max_logits_rows`), or a larger graph bucket's.
struct Acts {
    x: CudaSlice<bf16>,
    h: CudaSlice<bf16>,
    delta: CudaSlice<bf16>,
    qkv: CudaSlice<bf16>,
    attn: CudaSlice<bf16>,
    q: CudaSlice<bf16>,
    gate_up: CudaSlice<bf16>,
    act: CudaSlice<bf16>,
    hr: CudaSlice<bf16>,
    logits: CudaSlice<bf16>,
    workspace: CudaSlice<u8>,
}

/// Step metadata on the device.
struct Meta {
    ids: CudaSlice<u32>,
    positions: CudaSlice<u32>,
    cu_seqlens: CudaSlice<u32>,
    block_tables: CudaSlice<u32>,
    slots: CudaSlice<u32>,
    seq_of_token: CudaSlice<u32>,
    logits_rows: CudaSlice<u32>,
    x_positions: CudaSlice<u32>,
    x_cu: CudaSlice<u32>,
    x_tables: CudaSlice<u32>,
    x_seq_of_token: CudaSlice<u32>,
    attn_scale: CudaSlice<f32>,
    mlp_scale: CudaSlice<f32>,
}

/// Host sizes of the step in flight.
#[derive(Clone, Copy, Default)]
struct Sizes {
    tokens: usize,
    seqs: usize,
    width: usize,
    max_query: usize,
    max_ctx: usize,
    cross: bool,
    runs: usize,
    x_width: usize,
    x_max_query: usize,
    x_max_ctx: usize,
    /// KV splits of a decode step's self-attention and cross-attention (tensor-core kernels only).
    splits: usize,
    x_splits: usize,
}

/// A registered image set: its block range in the cross pools.
#[derive(Clone, Copy, Debug)]
struct ImageSet {
    start: usize,
    images: usize,
}

/// The CUDA executor of a Llama 3.2 Vision model's text decoder (bf16 weights, paged bf16 self-attention K/V, cross
/// K/V per registered image set).
pub struct MllamaCudaExecutor {
    cfg: MllamaConfig,
    ids_cfg: LlamaConfig,
    stream: Arc<CudaStream>,
    blas: CudaBlasLT,
    embed: CudaSlice<bf16>,
    layers: Vec<Layer>,
    final_norm: CudaSlice<bf16>,
    lm_head: CudaSlice<bf16>,
    inv_freq: CudaSlice<f32>,
    layout: PagedLayout,
    cross_layout: PagedLayout,
    num_blocks: usize,
    cross_tiles: usize,
    sets: HashMap<u64, ImageSet>,
    acts: Acts,
    meta: Meta,
    opts: MllamaCudaOptions,
    num_sms: usize,
    /// head_dim 64/128 with at most 16 query heads per kv head: the tensor-core attention kernels.
    fast_attn: bool,
    /// Rows the activation and logits buffers hold (at least the options' limits, rounded up to a graph bucket).
    rows_cap: usize,
    /// Widest self-attention block table a decode graph is captured for.
    max_blocks_per_seq: usize,
    /// Decode graphs by (batch bucket, self-attention KV splits, block-table width).
    graphs: HashMap<(usize, usize, usize), DecodeGraph>,
    /// Bumped whenever a metadata buffer moves: graphs captured before are stale.
    generation: u64,
    /// Graphs captured and replayed so far.
    graph_counts: (u64, u64),
}

/// A captured decode step and the buffer generation its pointers belong to.
struct DecodeGraph {
    graph: CudaGraph,
    generation: u64,
}

fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    s: &Arc<CudaStream>,
    n: usize,
) -> Result<CudaSlice<T>> {
    s.alloc_zeros::<T>(n.max(1)).map_err(drv("allocate executor buffers"))
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

    /// Number of registered image sets.
    pub fn num_image_sets(&self) -> usize {
        self.sets.len()
    }

    /// Cross-pool tiles not taken by a registered image set.
    pub fn free_cross_tiles(&self) -> usize {
        let used: usize = self.sets.values().map(|s| s.images * self.cfg.vision.max_num_tiles).sum();
        self.cross_tiles - used
    }

    /// The first free range of `n` blocks in `1..=cross_tiles`.
    fn find_range(&self, n: usize) -> Option<usize> {
        let tiles = self.cfg.vision.max_num_tiles;
        let mut taken: Vec<(usize, usize)> =
            self.sets.values().map(|s| (s.start, s.start + s.images * tiles)).collect();
        taken.sort_unstable();
        let mut start = 1;
        for (a, b) in taken {
            if a >= start + n {
                break;
            }
            start = start.max(b);
        }
        (start + n <= 1 + self.cross_tiles).then_some(start)
    }

    /// Registers projected states already on the device (`[images * max_num_tiles * num_patches, hidden]` bf16,
    /// e.g. [`super::encoder::CudaEncoded::states`]) under `key`, replacing an earlier set with that key.
    pub fn add_images_device(&mut self, key: u64, states: &CudaView<'_, bf16>, images: usize) -> Result<()> {
        let t = &self.cfg.text.base;
        let (tiles, tpt) = (self.cfg.vision.max_num_tiles, self.cfg.vision.num_patches());
        let (hidden, kv_dim) = (t.hidden_size, t.kv_dim());
        if images == 0 {
            return Err(Error::request("add_images: no images"));
        }
        let rows = images * tiles * tpt;
        if states.len() != rows * hidden {
            return Err(Error::request(format!(
                "add_images: states hold {} values, expected {images} images x {tiles} tiles x {tpt} tokens x {hidden}",
                states.len()
            )));
        }
        self.sets.remove(&key);
        let start = self.find_range(images * tiles).ok_or_else(|| {
            Error::request(format!(
                "add_images: {} tiles do not fit in the cross-attention pool ({} of {} free, or fragmented)",
                images * tiles,
                self.free_cross_tiles(),
                self.cross_tiles
            ))
        })?;
        let (off, len) = (start * tpt * kv_dim, rows * kv_dim);
        let mut tmp = alloc::<bf16>(&self.stream, len)?;
        for layer in &mut self.layers {
            let Layer::Cross { wk, wv, k_norm, k_pool, v_pool, .. } = layer else { continue };
            gemm(&self.blas, states, &wk.slice(..), (rows, hidden, kv_dim), &mut tmp)?;
            k::norm::rms_norm(
                &self.stream,
                &tmp,
                k_norm,
                t.rms_norm_eps,
                t.head_dim,
                &mut k_pool.slice_mut(off..off + len),
            )?;
            gemm(&self.blas, states, &wv.slice(..), (rows, hidden, kv_dim), &mut v_pool.slice_mut(off..off + len))?;
        }
        self.stream.synchronize().map_err(drv("compute cross-attention K/V"))?;
        self.sets.insert(key, ImageSet { start, images });
        Ok(())
    }

    /// Uploads `src` into `dst`, growing it (and bumping `generation`: captured graphs read the old address) when
    /// it is too small.
    fn put<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        stream: &Arc<CudaStream>,
        dst: &mut CudaSlice<T>,
        src: &[T],
        generation: &mut u64,
    ) -> Result<()> {
        if dst.len() < src.len() {
            *dst = alloc(stream, src.len().next_power_of_two())?;
            *generation += 1;
        }
        if !src.is_empty() {
            stream.memcpy_htod(src, &mut dst.slice_mut(..src.len())).map_err(drv("upload step metadata"))?;
        }
        Ok(())
    }

    /// Validates a step against the executor's limits and its image references against the registered sets.
    fn check(&self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<()> {
        input.validate(&self.ids_cfg, self.num_blocks, self.layout.block_size)?;
        let seqs = input.num_seqs();
        let tokens = input.num_tokens();
        if tokens > self.opts.max_step_tokens {
            return Err(Error::request(format!(
                "step of {tokens} tokens exceeds max_step_tokens {}",
                self.opts.max_step_tokens
            )));
        }
        if input.logits_rows.len() > self.opts.max_logits_rows {
            return Err(Error::request(format!(
                "step asks for {} logits rows, at most {} are supported",
                input.logits_rows.len(),
                self.opts.max_logits_rows
            )));
        }
        if !images.is_empty() && images.len() != seqs {
            return Err(Error::request(format!("step: {} image entries for {seqs} sequences", images.len())));
        }
        let tiles = self.cfg.vision.max_num_tiles;
        for (s, im) in images.iter().enumerate() {
            let Some(im) = im else { continue };
            let set = self.sets.get(&im.key).ok_or_else(|| {
                Error::request(format!("step: sequence {s} uses image set {} which is not registered", im.key))
            })?;
            let n = (input.cu_seqlens[s + 1] - input.cu_seqlens[s]) as usize;
            if im.mask.len() != n * set.images * tiles {
                return Err(Error::request(format!(
                    "step: sequence {s} has {} mask values for {n} tokens x {} tiles",
                    im.mask.len(),
                    set.images * tiles
                )));
            }
            if im.mask.iter().any(|&v| v > 1) {
                return Err(Error::request(format!("step: sequence {s}'s cross-attention mask is not 0/1")));
            }
        }
        Ok(())
    }

    /// Uploads the metadata of a checked step. `graph` (a padded decode step about to run through a graph) fixes
    /// what the graph bakes in: the cross layers run even when no sequence has images, the cross tables are
    /// `cross_tiles` wide, and the split counts are the given (self, cross) ones.
    fn begin(
        &mut self,
        input: &StepInput,
        images: &[Option<SeqImages<'_>>],
        graph: Option<(usize, usize)>,
    ) -> Result<Sizes> {
        let (seqs, tokens) = (input.num_seqs(), input.num_tokens());
        let (tiles, tpt) = (self.cfg.vision.max_num_tiles, self.cfg.vision.num_patches());
        let lens: Vec<usize> = input.cu_seqlens.windows(2).map(|w| (w[1] - w[0]) as usize).collect();
        let mut sz = Sizes {
            tokens,
            seqs,
            width: input.max_blocks_per_seq,
            max_query: lens.iter().copied().max().unwrap_or(0),
            max_ctx: input.positions.iter().map(|&p| p as usize + 1).max().unwrap_or(0),
            cross: graph.is_some() || images.iter().any(Option::is_some),
            ..Sizes::default()
        };
        sz.splits = match graph {
            Some((splits, _)) => splits,
            None => k::attention::decode_num_splits(&self.layout, tokens, sz.max_ctx, self.num_sms),
        };
        let s = self.stream.clone();
        let (m, gen) = (&mut self.meta, &mut self.generation);
        Self::put(&s, &mut m.ids, &input.token_ids, gen)?;
        Self::put(&s, &mut m.positions, &input.positions, gen)?;
        Self::put(&s, &mut m.cu_seqlens, &input.cu_seqlens, gen)?;
        Self::put(&s, &mut m.block_tables, &input.block_tables, gen)?;
        Self::put(&s, &mut m.slots, &input.slot_mapping, gen)?;
        Self::put(&s, &mut m.seq_of_token, &input.seq_of_token(), gen)?;
        Self::put(&s, &mut m.logits_rows, &input.logits_rows, gen)?;
        if !sz.cross {
            return Ok(sz);
        }
        // Per token: the blocks it sees (runs of equal lists within a sequence share a table row).
        let mut runs: Vec<Vec<u32>> = Vec::new();
        let mut cu = vec![0u32];
        let (mut x_pos, mut x_seq, mut a_scale, mut m_scale) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (si, &n) in lens.iter().enumerate() {
            let im = images.get(si).copied().flatten();
            for tk in 0..n {
                let (list, attn, mlp) = match im {
                    None => (vec![0u32], 0.0, 0.0),
                    Some(im) => {
                        let set =
                            self.sets.get(&im.key).copied().ok_or_else(|| {
                                Error::request(format!("step: image set {} is not registered", im.key))
                            })?;
                        let row_len = set.images * tiles;
                        let row = &im.mask[tk * row_len..(tk + 1) * row_len];
                        let seen: Vec<u32> =
                            (0..row_len).filter(|&j| row[j] == 1).map(|j| (set.start + j) as u32).collect();
                        if seen.is_empty() {
                            ((0..row_len).map(|j| (set.start + j) as u32).collect(), 1.0, 0.0)
                        } else {
                            (seen, 1.0, 1.0)
                        }
                    }
                };
                let ctx = if im.is_none() { 1 } else { list.len() * tpt };
                let new_run = tk == 0 || runs.last() != Some(&list);
                if new_run {
                    runs.push(list);
                    cu.push(*cu.last().unwrap_or(&0));
                }
                if let Some(c) = cu.last_mut() {
                    *c += 1;
                }
                x_pos.push((ctx - 1) as u32);
                x_seq.push((runs.len() - 1) as u32);
                a_scale.push(attn);
                m_scale.push(mlp);
            }
        }
        let width = match graph {
            // Every list fits: a set never holds more than the pool's tiles.
            Some(_) => self.cross_tiles.max(1),
            None => runs.iter().map(Vec::len).max().unwrap_or(1).max(1),
        };
        let mut tables = vec![0u32; runs.len() * width];
        for (r, list) in runs.iter().enumerate() {
            tables[r * width..][..list.len()].copy_from_slice(list);
        }
        sz.runs = runs.len();
        sz.x_width = width;
        sz.x_max_query = cu.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(1);
        sz.x_max_ctx = x_pos.iter().map(|&p| p as usize + 1).max().unwrap_or(1);
        sz.x_splits = match graph {
            Some((_, x_splits)) => x_splits,
            None => k::attention::decode_num_splits(&self.cross_layout, sz.runs, sz.x_max_ctx, self.num_sms),
        };
        Self::put(&s, &mut m.x_positions, &x_pos, gen)?;
        Self::put(&s, &mut m.x_cu, &cu, gen)?;
        Self::put(&s, &mut m.x_tables, &tables, gen)?;
        Self::put(&s, &mut m.x_seq_of_token, &x_seq, gen)?;
        Self::put(&s, &mut m.attn_scale, &a_scale, gen)?;
        Self::put(&s, &mut m.mlp_scale, &m_scale, gen)?;
        Ok(sz)
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
    fn forward(&mut self, sz: Sizes, logits_rows: usize) -> Result<()> {
        let c = self.cfg.text.base.clone();
        let (hidden, q_dim, kv_dim, inter, eps) =
            (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size, c.rms_norm_eps);
        let qkv_w = q_dim + 2 * kv_dim;
        let t = sz.tokens;
        let s = self.stream.clone();
        let a = &mut self.acts;
        let m = &self.meta;
        k::embedding::embed(&s, &self.embed, hidden, &m.ids.slice(..t), &mut a.x.slice_mut(..t * hidden))?;
        // The residual update still to apply before the next norm: none, plain add, or gated (gate, scale buffer).
        enum Pending {
            None,
            Plain,
            Gated(f32, bool),
        }
        let mut pending = Pending::None;
        let norm = |a: &mut Acts, pending: &Pending, weight: &CudaSlice<bf16>| -> Result<()> {
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
        for layer in self.layers.iter_mut() {
            match layer {
                Layer::SelfAttn { attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down, k_cache, v_cache } => {
                    norm(a, &pending, attn_norm)?;
                    let lin = |x: &CudaView<'_, bf16>, w: &CudaSlice<bf16>, dims, out: &mut CudaViewMut<'_, bf16>| {
                        linear_with(&s, &self.blas, self.opts.skinny_gemm, x, w, dims, out)
                    };
                    lin(&a.h.slice(..t * hidden), wqkv, (t, hidden, qkv_w), &mut a.qkv.slice_mut(..t * qkv_w))?;
                    let shape = k::rope::RopeKvShape { layout: self.layout, qkv_stride: qkv_w };
                    rope_write(&s, &shape, &mut a.qkv.slice_mut(..t * qkv_w), m, t, &self.inv_freq, k_cache, v_cache)?;
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
                    lin(&a.attn.slice(..t * q_dim), wo, (t, q_dim, hidden), &mut a.delta.slice_mut(..t * hidden))?;
                    norm(a, &Pending::Plain, mlp_norm)?;
                    lin(
                        &a.h.slice(..t * hidden),
                        w_gate_up,
                        (t, hidden, 2 * inter),
                        &mut a.gate_up.slice_mut(..t * 2 * inter),
                    )?;
                    k::activation::silu_mul(
                        &s,
                        &a.gate_up.slice(..t * 2 * inter),
                        inter,
                        &mut a.act.slice_mut(..t * inter),
                    )?;
                    lin(&a.act.slice(..t * inter), w_down, (t, inter, hidden), &mut a.delta.slice_mut(..t * hidden))?;
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
                    let lin = |x: &CudaView<'_, bf16>, w: &CudaSlice<bf16>, dims, out: &mut CudaViewMut<'_, bf16>| {
                        linear_with(&s, &self.blas, self.opts.skinny_gemm, x, w, dims, out)
                    };
                    norm(a, &pending, attn_norm)?;
                    lin(&a.h.slice(..t * hidden), wq, (t, hidden, q_dim), &mut a.attn.slice_mut(..t * q_dim))?;
                    k::norm::rms_norm(
                        &s,
                        &a.attn.slice(..t * q_dim),
                        q_norm,
                        eps,
                        c.head_dim,
                        &mut a.q.slice_mut(..t * q_dim),
                    )?;
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
                    lin(&a.attn.slice(..t * q_dim), wo, (t, q_dim, hidden), &mut a.delta.slice_mut(..t * hidden))?;
                    norm(a, &Pending::Gated(*attn_gate, false), mlp_norm)?;
                    lin(
                        &a.h.slice(..t * hidden),
                        w_gate_up,
                        (t, hidden, 2 * inter),
                        &mut a.gate_up.slice_mut(..t * 2 * inter),
                    )?;
                    k::activation::silu_mul(
                        &s,
                        &a.gate_up.slice(..t * 2 * inter),
                        inter,
                        &mut a.act.slice_mut(..t * inter),
                    )?;
                    lin(&a.act.slice(..t * inter), w_down, (t, inter, hidden), &mut a.delta.slice_mut(..t * hidden))?;
                    pending = Pending::Gated(*mlp_gate, true);
                }
            }
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
            let vocab = c.vocab_size;
            linear_with(
                &s,
                &self.blas,
                self.opts.skinny_gemm,
                &a.hr.slice(..logits_rows * hidden),
                &self.lm_head,
                (logits_rows, hidden, vocab),
                &mut a.logits.slice_mut(..logits_rows * vocab),
            )?;
        }
        Ok(())
    }

    /// Graphs captured and replayed so far, as `(captures, replays)`.
    pub fn graph_counts(&self) -> (u64, u64) {
        self.graph_counts
    }

    /// Sets the most sequences a decode step may have to run as a CUDA graph (0: every step eagerly), up to the
    /// rows the executor's buffers were sized for at construction; drops the graphs captured so far.
    pub fn set_max_graph_batch(&mut self, max: usize) {
        self.opts.max_graph_batch = max;
        self.graphs.clear();
    }

    /// Whether a checked step runs through a decode graph: one token and one logits row per sequence, in order,
    /// few enough sequences, and a block table no wider than graphs are captured for.
    fn graph_eligible(&self, input: &StepInput) -> bool {
        let seqs = input.num_seqs();
        seqs > 0
            && seqs <= self.opts.max_graph_batch
            && graph_bucket(seqs) <= self.rows_cap
            && input.cu_seqlens.windows(2).all(|w| w[1] == w[0] + 1)
            && input.logits_rows.len() == seqs
            && input.logits_rows.iter().enumerate().all(|(i, &r)| r as usize == i)
            && input.max_blocks_per_seq <= self.max_blocks_per_seq
    }

    /// Runs a checked decode step through its batch bucket's graph, capturing it first when there is none or the
    /// buffers it reads have moved. The step is padded to the bucket (padding rows write no cache slot and see the
    /// zero cross block), its metadata and cross-attention tables uploaded into the buffers the graph reads, and
    /// the graph replayed: the same graph serves steps with and without images. The logits of the real rows come
    /// first in `acts.logits`.
    fn step_graph(&mut self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<()> {
        let seqs = input.num_seqs();
        let bucket = graph_bucket(seqs);
        // Table width rounds up to a power of two so that few graphs cover all context lengths.
        let width = input.max_blocks_per_seq.next_power_of_two().min(self.max_blocks_per_seq);
        let padded = CudaExecutor::padded_decode(input, bucket, width);
        let mut padded_images: Vec<Option<SeqImages<'_>>> = images.to_vec();
        padded_images.resize(bucket, None);
        // Split counts are part of the graph: the self-attention's from this step's context (a key component, as
        // in the text executor), the cross-attention's from the largest context an image set can give, so that
        // text-only and vision steps share the graph (any split count is correct for any context).
        let (splits, x_splits) = if self.fast_attn {
            let max_ctx = input.positions.iter().map(|&p| p as usize + 1).max().unwrap_or(1);
            let x_ctx = (self.cross_tiles * self.cfg.vision.num_patches()).max(1);
            (
                k::attention::decode_num_splits(&self.layout, bucket, max_ctx, self.num_sms),
                k::attention::decode_num_splits(&self.cross_layout, bucket, x_ctx, self.num_sms),
            )
        } else {
            (1, 1)
        };
        let key = (bucket, splits, width);
        let sz = self.begin(&padded, &padded_images, Some((splits, x_splits)))?;
        let stale = self.graphs.get(&key).is_none_or(|g| g.generation != self.generation);
        if stale {
            self.graphs.remove(&key);
            // An eager run first (module loading and cuBLASLt's choices happen outside the capture); its cache
            // writes are the ones the replay repeats.
            self.forward(sz, bucket)?;
            let generation = self.generation;
            let stream = self.stream.clone();
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(drv("begin graph capture"))?;
            let captured = self.forward(sz, bucket);
            let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).map_err(drv("end graph capture"))?;
            captured?;
            let graph = graph.ok_or_else(|| Error::Backend("graph capture produced no graph".into()))?;
            if self.generation != generation {
                return Err(Error::Backend("buffers moved during graph capture".into()));
            }
            self.graphs.insert(key, DecodeGraph { graph, generation });
            self.graph_counts.0 += 1;
        }
        let g = self.graphs.get(&key).ok_or_else(|| Error::Backend("decode graph missing".into()))?;
        g.graph.launch().map_err(drv("launch decode graph"))?;
        self.graph_counts.1 += 1;
        Ok(())
    }

    fn run(&mut self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<StepOutput> {
        self.check(input, images)?;
        let rows = input.logits_rows.len();
        if self.graph_eligible(input) {
            self.step_graph(input, images)?;
        } else {
            let sz = self.begin(input, images, None)?;
            self.forward(sz, rows)?;
        }
        let n = rows * self.cfg.text.base.vocab_size;
        if n == 0 {
            return Ok(StepOutput::default());
        }
        let host = self.stream.clone_dtoh(&self.acts.logits.slice(..n)).map_err(drv("read logits"))?;
        Ok(StepOutput { logits: host.into_iter().map(f32::from).collect() })
    }
}

impl Executor for MllamaCudaExecutor {
    fn config(&self) -> &LlamaConfig {
        &self.cfg.text.base
    }

    fn block_size(&self) -> usize {
        self.layout.block_size
    }

    fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn step(&mut self, input: &StepInput) -> Result<StepOutput> {
        self.run(input, &[])
    }

    fn add_images(&mut self, key: u64, images: &EncodedImages) -> Result<()> {
        let want = images.len() * self.cfg.vision_tokens_per_image() * self.cfg.text.base.hidden_size;
        if images.is_empty() || images.states.len() != want {
            return Err(Error::request(format!(
                "add_images: {} state values for {} image(s), expected {want}",
                images.states.len(),
                images.len()
            )));
        }
        let states = upload_bf16(&self.stream, &images.states)?;
        self.add_images_device(key, &states.slice(..), images.len())
    }

    fn remove_images(&mut self, key: u64) -> bool {
        self.sets.remove(&key).is_some()
    }

    fn step_with_images(&mut self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<StepOutput> {
        self.run(input, images)
    }
}

/// Projections: the skinny kernel for decode-sized batches, cuBLASLt otherwise.
fn linear_with(
    s: &Arc<CudaStream>,
    blas: &CudaBlasLT,
    skinny: bool,
    x: &CudaView<'_, bf16>,
    w: &CudaSlice<bf16>,
    (rows, kdim, n): (usize, usize, usize),
    out: &mut CudaViewMut<'_, bf16>,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    crate::exec::cuda::ops::dense_linear(s, blas, skinny, x, &w.slice(..), (rows, kdim, n), out)
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
