//! Construction of an [`MllamaCudaExecutor`]: its options and the memory plan (weights, cross-attention pools,
//! activation and metadata buffers sized for the largest graph bucket, then the self-attention caches: a fixed
//! number of tokens, or what the device memory left under a utilization cap holds), a tensor-parallel rank's
//! construction, plus the accessors.
//!
//! # Tensor parallelism
//! A rank ([`MllamaCudaExecutor::new_rank`]; [`crate::tp::cuda_vision::TpMllamaCudaExecutor`] runs all the ranks
//! of a process) holds the shard [`crate::tp::load::load_mllama_rank_text`] reads, laid out as
//! [`crate::tp::plan::vision_split`] says. Its config is [`crate::tp::TpPlan::rank_config`] of the text config
//! (its query and KV heads, `intermediate_size / tp`) except `vocab_size`, which stays the model's: token ids are
//! checked against the whole `vocab_size + 8`-row embedding table and the rank returns full-vocabulary logits. Its
//! `lm_head` holds the `vocab / tp` rows of [`crate::tp::RankShard::vocab`], its embedding table `(vocab + 8) / tp`
//! rows when `tp` divides them (else the whole table). The decoder calls the rank's [`DeviceComm`] at the CPU
//! reference's points ([`crate::vision::exec::DecoderComm`]): an all-reduce after the embedding when it is split
//! (ids outside the rank's rows embed as zeros, so the sum is exact), after every `o_proj` (self- and
//! cross-attention; for cross-attention before the tanh gate, which the next norm applies) and after every
//! `down_proj` (for cross-attention layers before the gate and the row mask); after `lm_head` an all-gather of every
//! rank's `[rows, vocab / tp]` logits (rank-major) and one row gather that interleaves them into `[rows, vocab]`, as
//! the text ranks do. Every rank registers every image set and computes the cross K/V of its own KV heads from the
//! same (replicated) projected states.
//!
//! A rank runs every step eagerly, never through a CUDA graph: the host-staged collectives copy through host memory
//! and synchronize the stream, which a graph capture cannot contain, and the ranks must enqueue their collectives
//! in the same order, which eager steps give for free (NCCL's collectives could be captured: future work, as for
//! the text ranks).

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;

use super::super::{drv, open_stream, upload_bf16, upload_f32};
use super::{alloc, Acts, Layer, Meta, MllamaCudaExecutor};
use crate::config::LlamaConfig;
use crate::exec::cuda::graph_bucket;
use crate::exec::cuda::quant_bufs::{DeviceLinear, DeviceTable, QuantBuffers};
use crate::ops::cpu::attention::PagedLayout;
use crate::ops::cuda as k;
use crate::ops::cuda::vision as kv;
use crate::quant::Int8Table;
use crate::tp::cuda::DeviceComm;
use crate::tp::load::{MllamaRankSource, MllamaRankText};
use crate::tp::TpPlan;
use crate::vision::config::{MllamaConfig, EXTRA_EMBED_ROWS};
use crate::vision::weights::{MllamaWeights, TextLayerWeights, TextSource, TextWeights};
use crate::weights::LinearWeight;
use crate::{Error, Result};

/// How to size an [`MllamaCudaExecutor`].
#[derive(Clone, Debug)]
pub struct MllamaCudaOptions {
    /// Device ordinal.
    pub device: usize,
    /// Tokens per self-attention KV block.
    pub block_size: usize,
    /// Self-attention KV capacity in tokens: exactly this many (rounded up to whole blocks) when
    /// `gpu_memory_utilization` is None, else the least the memory plan must find room for.
    pub kv_tokens: usize,
    /// Size the self-attention KV cache from device memory: everything left under this fraction of the device's
    /// total once the weights, the cross-attention pools and the activation buffers are allocated, less a reserve
    /// for what is allocated later (image staging, the vision encoder's workspaces, kernel modules). None: exactly
    /// `kv_tokens`.
    pub gpu_memory_utilization: Option<f32>,
    /// Most tokens one step may carry (sizes the activation buffers).
    pub max_step_tokens: usize,
    /// Most logits rows one step may ask for.
    pub max_logits_rows: usize,
    /// Tiles of cross-attention K/V kept on the device at once (all registered image sets together; an image
    /// takes `max_num_tiles`).
    pub cross_tiles: usize,
    /// Run projections of up to 16 rows with the skinny GEMM kernel.
    pub skinny_gemm: bool,
    /// Apply SiLU * up in the epilogue of the decode gate_up projection: the bf16 skinny GEMM's, and the W4A16
    /// decode kernels' (the same bits).
    pub fuse_swiglu: bool,
    /// With the skinny GEMM, run the self-attention layers' residual add + RMSNorm in the prologue of the bf16 QKV
    /// and gate_up projections (the same bits; off by default until a device run measures it).
    pub fuse_norm: bool,
    /// Capture decode steps of up to this many sequences as CUDA graphs, one per batch bucket (as the text
    /// executor's `--cuda-graph-max-batch`); 0 runs every step eagerly. A tensor-parallel rank always runs eagerly.
    pub max_graph_batch: usize,
}

impl Default for MllamaCudaOptions {
    fn default() -> Self {
        MllamaCudaOptions {
            device: 0,
            block_size: 16,
            kv_tokens: 8192,
            gpu_memory_utilization: None,
            max_step_tokens: 2048,
            max_logits_rows: 256,
            cross_tiles: 64,
            skinny_gemm: true,
            fuse_swiglu: true,
            fuse_norm: false,
            max_graph_batch: 256,
        }
    }
}

/// A tensor-parallel rank's side of an [`MllamaCudaExecutor`].
pub(super) struct RankTp {
    /// This rank and the group size.
    pub(super) rank: usize,
    pub(super) world: usize,
    /// The collectives (set once every rank of the group is loaded).
    pub(super) comm: Option<Box<dyn DeviceComm>>,
    /// Rows of the full `vocab_size + 8`-row embedding table held; when they are not the whole table, ids outside
    /// them embed as zeros and the embedding is all-reduced.
    pub(super) embed_rows: Range<usize>,
    /// Whether `embed_rows` is a part of the table (then the embedding is all-reduced).
    pub(super) split_embed: bool,
    /// Rows of `lm_head` held: this rank's slice of the vocabulary.
    pub(super) vocab: Range<usize>,
    /// The step's ids shifted into `embed_rows` (`u32::MAX`, which the embedding kernel turns into a zero row,
    /// elsewhere), on the host and on the device.
    pub(super) host_ids: Vec<u32>,
    pub(super) ids: CudaSlice<u32>,
    /// `[rows, vocab / tp]` logits of this rank, and `[tp * rows, vocab / tp]` gathered from every rank.
    pub(super) local_logits: CudaSlice<bf16>,
    pub(super) gathered: CudaSlice<bf16>,
    /// Row order interleaving the gathered logits into `[rows, vocab]`, built for `order_rows` rows.
    pub(super) order: Option<CudaSlice<u32>>,
    pub(super) order_rows: usize,
}

/// The shard a rank is built from.
struct RankSpec {
    rank: usize,
    world: usize,
    embed_rows: Range<usize>,
    vocab: Range<usize>,
}

/// Checks the options against the text config.
fn check_options(t: &LlamaConfig, opts: &MllamaCudaOptions) -> Result<()> {
    if opts.block_size == 0 || opts.kv_tokens == 0 || opts.max_step_tokens == 0 || opts.max_logits_rows == 0 {
        return Err(Error::request("block size, KV tokens, step tokens and logits rows must be positive"));
    }
    if let Some(u) = opts.gpu_memory_utilization {
        if !(0.05..=1.0).contains(&u) {
            return Err(Error::request(format!("--gpu-memory-utilization must be in [0.05, 1], got {u}")));
        }
    }
    if !t.head_dim.is_multiple_of(8) || t.head_dim > kv::MAX_GATHER_HEAD_DIM {
        return Err(Error::request(format!(
            "the CUDA text path takes a head_dim that is a multiple of 8 up to {}; this model has {}",
            kv::MAX_GATHER_HEAD_DIM,
            t.head_dim
        )));
    }
    Ok(())
}

/// An upper bound of the device bytes one image's encoding allocates in
/// [`crate::vision::cuda::encoder::CudaVisionEncoder::encode`] (the encoder runs on the first device of a
/// tensor-parallel group, and on the decoder's device at tp = 1): the f32 residual and the bf16 input, q/k/v,
/// attention output and delta of every padded token (16 bytes per hidden value), the MLP's bf16 middle, the f32
/// intermediate states kept for the output, then the bf16 encoder output and projected states.
fn encoder_workspace_bytes(cfg: &MllamaConfig) -> usize {
    let v = &cfg.vision;
    let rows = v.max_num_tiles * v.padded_patches();
    let out_rows = v.max_num_tiles * v.num_patches();
    let n_inter = v.intermediate_layers_indices.len();
    rows * (16 * v.hidden_size + 2 * v.intermediate_size + 4 * n_inter * v.hidden_size)
        + out_rows * 2 * (v.vision_output_dim + cfg.text.base.hidden_size)
}

/// A table in f32 with its int8 form, when it has one.
type TableIn<'a> = (Cow<'a, [f32]>, Option<Cow<'a, Int8Table>>);

/// The text weights an executor uploads: whole on the host, or read one layer at a time.
trait TextIn {
    fn num_layers(&self) -> usize;
    fn layer(&self, i: usize) -> Result<Cow<'_, TextLayerWeights>>;
    fn embed(&self) -> Result<TableIn<'_>>;
    fn final_norm(&self) -> Result<Cow<'_, [f32]>>;
    fn lm_head(&self) -> Result<TableIn<'_>>;
}

fn owned_table((values, int8): (Vec<f32>, Option<Int8Table>)) -> TableIn<'static> {
    (Cow::Owned(values), int8.map(Cow::Owned))
}

impl TextIn for TextWeights {
    fn num_layers(&self) -> usize {
        self.layers.len()
    }
    fn layer(&self, i: usize) -> Result<Cow<'_, TextLayerWeights>> {
        self.layers.get(i).map(Cow::Borrowed).ok_or_else(|| Error::request(format!("text layer {i} is missing")))
    }
    fn embed(&self) -> Result<TableIn<'_>> {
        Ok((Cow::Borrowed(&self.embed), self.embed_int8.as_ref().map(Cow::Borrowed)))
    }
    fn final_norm(&self) -> Result<Cow<'_, [f32]>> {
        Ok(Cow::Borrowed(&self.final_norm))
    }
    fn lm_head(&self) -> Result<TableIn<'_>> {
        Ok((Cow::Borrowed(&self.lm_head), self.lm_head_int8.as_ref().map(Cow::Borrowed)))
    }
}

impl TextIn for MllamaRankSource<'_> {
    fn num_layers(&self) -> usize {
        MllamaRankSource::num_layers(self)
    }
    fn layer(&self, i: usize) -> Result<Cow<'_, TextLayerWeights>> {
        MllamaRankSource::layer(self, i).map(Cow::Owned)
    }
    fn embed(&self) -> Result<TableIn<'_>> {
        self.embed_table().map(owned_table)
    }
    fn final_norm(&self) -> Result<Cow<'_, [f32]>> {
        MllamaRankSource::final_norm(self).map(Cow::Owned)
    }
    fn lm_head(&self) -> Result<TableIn<'_>> {
        self.lm_head_table().map(owned_table)
    }
}

/// A [`TextSource`] with a progress callback `(layers done, layers)`.
struct Progress<'a, 'b>(&'a TextSource<'b>, &'a dyn Fn(usize, usize));

impl TextIn for Progress<'_, '_> {
    fn num_layers(&self) -> usize {
        self.0.num_layers()
    }
    fn layer(&self, i: usize) -> Result<Cow<'_, TextLayerWeights>> {
        let l = self.0.layer(i)?;
        (self.1)(i + 1, self.0.num_layers());
        Ok(Cow::Owned(l))
    }
    fn embed(&self) -> Result<TableIn<'_>> {
        self.0.embed_table().map(owned_table)
    }
    fn final_norm(&self) -> Result<Cow<'_, [f32]>> {
        self.0.final_norm().map(Cow::Owned)
    }
    fn lm_head(&self) -> Result<TableIn<'_>> {
        self.0.lm_head_table().map(owned_table)
    }
}

/// What the device holds when an executor's KV cache is sized from memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KvFit {
    /// Self-attention KV blocks that fit.
    pub blocks: usize,
    /// Device bytes in use and in total.
    pub used: usize,
    pub total: usize,
}

impl MllamaCudaExecutor {
    /// Uploads the text weights of `w` and sizes the caches. `w.vision` may be empty. Quantized projections
    /// ([`crate::weights::LinearWeight::quant`]) run on the W4A16 / W4A8 kernels, the rest in bf16.
    pub fn new(cfg: MllamaConfig, w: &MllamaWeights, opts: &MllamaCudaOptions) -> Result<Self> {
        check_options(&cfg.text.base, opts)?;
        // Checks every text weight against the config (the CPU cache's check).
        crate::vision::text::TextCache::new(&w.text, &cfg.text)?;
        let mut ex = Self::upload(cfg, &w.text, opts, None)?;
        let blocks = ex.kv_blocks(1)?;
        ex.alloc_kv(blocks)?;
        Ok(ex)
    }

    /// [`new`](Self::new) reading the weights one layer at a time from `src` (a checkpoint, quantized or not, or
    /// random weights, see [`TextSource`]): each layer is read, uploaded and dropped before the next, so the host
    /// never holds more than one layer (what 90B Vision in 4 bits on one GPU needs). `on_layer(i, n)` reports
    /// progress.
    pub fn from_source(
        cfg: MllamaConfig,
        src: &TextSource<'_>,
        opts: &MllamaCudaOptions,
        on_layer: &dyn Fn(usize, usize),
    ) -> Result<Self> {
        check_options(&cfg.text.base, opts)?;
        let mut ex = Self::upload(cfg, &Progress(src, on_layer), opts, None)?;
        let blocks = ex.kv_blocks(1)?;
        ex.alloc_kv(blocks)?;
        Ok(ex)
    }

    /// Rank `rank` of the tensor-parallel plan `plan` (of `cfg.text.base`, the full model's text config) with its
    /// own process-wide share of the device (one rank per GPU): uploads the rank's `shard` (from
    /// [`crate::tp::load::load_mllama_rank_text`]), sizes its caches and joins it to `comm`, the rank's side of a
    /// group of `plan.tp()` ranks. Every rank of the group must then make the same calls with the same steps and
    /// image sets; each returns the full-vocabulary logits (see the module docs of `build.rs`).
    pub fn new_rank(
        cfg: &MllamaConfig,
        plan: &TpPlan,
        rank: usize,
        shard: &MllamaRankText,
        opts: &MllamaCudaOptions,
        comm: Box<dyn DeviceComm>,
    ) -> Result<Self> {
        let mut ex = Self::upload_rank(cfg, plan, rank, shard, opts)?;
        ex.set_comm(comm)?;
        let blocks = ex.kv_blocks(1)?;
        ex.alloc_kv(blocks)?;
        Ok(ex)
    }

    /// The first half of [`new_rank`](Self::new_rank): uploads the shard, without a KV cache (sized next with
    /// [`kv_blocks`](Self::kv_blocks) and [`alloc_kv`](Self::alloc_kv), once every rank sharing the device has
    /// uploaded its shard) or a communicator ([`set_comm`](Self::set_comm)). Graphs are off.
    pub(crate) fn upload_rank(
        cfg: &MllamaConfig,
        plan: &TpPlan,
        rank: usize,
        shard: &MllamaRankText,
        opts: &MllamaCudaOptions,
    ) -> Result<Self> {
        Self::upload_rank_parts(cfg, plan, rank, (&shard.text, shard.embed_rows.clone()), opts)
    }

    /// [`upload_rank`](Self::upload_rank) reading the rank's shard one layer at a time from `src`, so the host
    /// holds one layer's slices at a time instead of the whole shard.
    pub(crate) fn upload_rank_source(
        cfg: &MllamaConfig,
        plan: &TpPlan,
        rank: usize,
        src: &MllamaRankSource<'_>,
        opts: &MllamaCudaOptions,
    ) -> Result<Self> {
        Self::upload_rank_parts(cfg, plan, rank, (src, src.embed_rows()?), opts)
    }

    fn upload_rank_parts(
        cfg: &MllamaConfig,
        plan: &TpPlan,
        rank: usize,
        (w, embed_rows): (&dyn TextIn, Range<usize>),
        opts: &MllamaCudaOptions,
    ) -> Result<Self> {
        let full = &cfg.text.base;
        if plan.config().hidden_size != full.hidden_size
            || plan.config().num_attention_heads != full.num_attention_heads
            || plan.config().vocab_size != full.vocab_size
        {
            return Err(Error::request("tensor parallelism: the plan is not the vision model's text config's"));
        }
        let r = plan.rank(rank)?;
        let mut rank_cfg = cfg.clone();
        rank_cfg.text.base = LlamaConfig { vocab_size: full.vocab_size, ..plan.rank_config() };
        check_options(&rank_cfg.text.base, opts)?;
        let spec = RankSpec { rank, world: plan.tp(), embed_rows, vocab: r.vocab };
        let opts = MllamaCudaOptions { max_graph_batch: 0, ..opts.clone() };
        Self::upload(rank_cfg, w, &opts, Some(spec))
    }

    /// Opens the device and uploads everything but the self-attention caches (one-value placeholders until
    /// [`alloc_kv`](Self::alloc_kv)). Every tensor's size is checked against `cfg` (a rank's: its embedding and
    /// `lm_head` rows as `rank` says).
    fn upload(cfg: MllamaConfig, w: &dyn TextIn, opts: &MllamaCudaOptions, rank: Option<RankSpec>) -> Result<Self> {
        let t = cfg.text.base.clone();
        let (q_dim, kv_dim, hidden, inter) = (t.q_dim(), t.kv_dim(), t.hidden_size, t.intermediate_size);
        let full_embed_rows = cfg.text.embed_rows();
        let (embed_rows, lm_rows) = match &rank {
            Some(r) => (r.embed_rows.len(), r.vocab.len()),
            None => (full_embed_rows, t.vocab_size),
        };
        if w.num_layers() != t.num_hidden_layers {
            return Err(Error::weights(
                "<mllama text weights>",
                format!("{} layers, expected {}", w.num_layers(), t.num_hidden_layers),
            ));
        }
        let (stream, blas) = open_stream(opts.device)?;
        let s = &stream;
        let check = |what: &str, v: &[f32], want: usize| -> Result<()> {
            if v.len() != want {
                return Err(Error::weights(
                    "<mllama text weights>",
                    format!("{what} has {} values, expected {want}", v.len()),
                ));
            }
            Ok(())
        };
        // Uploads one tensor after checking its size.
        let up = |what: &str, v: &[f32], want: usize| -> Result<CudaSlice<bf16>> {
            check(what, v, want)?;
            upload_bf16(s, v)
        };
        // A table in int8 on the device when it comes with its int8 form, else bf16.
        let table = |what: &str, (values, int8): TableIn<'_>, rows: usize| -> Result<DeviceTable> {
            check(what, &values, rows * hidden)?;
            DeviceTable::upload(s, what, (&values, int8.as_deref()), (rows, hidden))
        };
        let layout = PagedLayout {
            num_heads: t.num_attention_heads,
            num_kv_heads: t.num_key_value_heads,
            head_dim: t.head_dim,
            block_size: opts.block_size,
        };
        let tpt = cfg.vision.num_patches();
        let cross_layout = PagedLayout { block_size: tpt, ..layout };
        let cross_pool = (1 + opts.cross_tiles) * tpt * kv_dim;
        let mut layers = Vec::with_capacity(t.num_hidden_layers);
        for i in 0..t.num_hidden_layers {
            let cross = cfg.text.is_cross_attention_layer(i);
            let p = |x: &str| format!("layer {i} {x}");
            let lin = |x: &str, w: &LinearWeight, numel: usize| DeviceLinear::upload(s, &p(x), w, numel);
            let gate_up = |x: &str, w: &LinearWeight, numel: usize| DeviceLinear::upload_gate_up(s, &p(x), w, numel);
            let l = w.layer(i)?;
            layers.push(match &*l {
                TextLayerWeights::SelfAttention(lw) if !cross => Layer::SelfAttn {
                    attn_norm: up(&p("attn_norm"), &lw.attn_norm, hidden)?,
                    wqkv: lin("wqkv", &lw.wqkv, (q_dim + 2 * kv_dim) * hidden)?,
                    wo: lin("wo", &lw.wo, hidden * q_dim)?,
                    mlp_norm: up(&p("mlp_norm"), &lw.mlp_norm, hidden)?,
                    w_gate_up: gate_up("w_gate_up", &lw.w_gate_up, 2 * inter * hidden)?,
                    w_down: lin("w_down", &lw.w_down, hidden * inter)?,
                    k_cache: alloc(s, 1)?,
                    v_cache: alloc(s, 1)?,
                },
                TextLayerWeights::CrossAttention(cw) if cross => {
                    if cw.wkv.numel() != 2 * kv_dim * hidden {
                        return Err(Error::weights(
                            "<mllama text weights>",
                            format!("{} has {} values, expected {}", p("wkv"), cw.wkv.numel(), 2 * kv_dim * hidden),
                        ));
                    }
                    let (wk, wv) = cw.wkv.split_rows(kv_dim, hidden)?;
                    Layer::Cross {
                        attn_norm: up(&p("attn_norm"), &cw.attn_norm, hidden)?,
                        wq: lin("wq", &cw.wq, q_dim * hidden)?,
                        wk: lin("wk", &wk, kv_dim * hidden)?,
                        wv: lin("wv", &wv, kv_dim * hidden)?,
                        wo: lin("wo", &cw.wo, hidden * q_dim)?,
                        q_norm: up(&p("q_norm"), &cw.q_norm, t.head_dim)?,
                        k_norm: up(&p("k_norm"), &cw.k_norm, t.head_dim)?,
                        attn_gate: cw.attn_gate.tanh(),
                        mlp_norm: up(&p("mlp_norm"), &cw.mlp_norm, hidden)?,
                        w_gate_up: gate_up("w_gate_up", &cw.w_gate_up, 2 * inter * hidden)?,
                        w_down: lin("w_down", &cw.w_down, hidden * inter)?,
                        mlp_gate: cw.mlp_gate.tanh(),
                        k_pool: alloc(s, cross_pool)?,
                        v_pool: alloc(s, cross_pool)?,
                    }
                }
                _ => {
                    return Err(Error::weights(
                        "<mllama text weights>",
                        format!(
                            "layer {i} is a {} layer, the config says {}",
                            if cross { "self-attention" } else { "cross-attention" },
                            if cross { "cross-attention" } else { "self-attention" }
                        ),
                    ))
                }
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
            norm_counter: s
                .alloc_zeros::<u32>(1)
                .map_err(|e| Error::Backend(format!("allocate the norm counter: {e}")))?,
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
        let tp = match rank {
            None => None,
            Some(r) => Some(RankTp {
                rank: r.rank,
                world: r.world,
                comm: None,
                split_embed: r.embed_rows != (0..full_embed_rows),
                embed_rows: r.embed_rows,
                vocab: r.vocab.clone(),
                host_ids: Vec::new(),
                ids: alloc(s, tmax)?,
                local_logits: alloc(s, logits_cap * r.vocab.len())?,
                gathered: alloc(s, if r.world > 1 { r.world * logits_cap * r.vocab.len() } else { 1 })?,
                order: None,
                order_rows: 0,
            }),
        };
        let fast_attn = matches!(t.head_dim, 64 | 128) && t.gqa_group() <= 16;
        let ids_cfg = LlamaConfig { vocab_size: t.vocab_size + EXTRA_EMBED_ROWS, ..t.clone() };
        Ok(MllamaCudaExecutor {
            embed: table("embed", w.embed()?, embed_rows)?,
            final_norm: up("final_norm", &w.final_norm()?, hidden)?,
            lm_head: table("lm_head", w.lm_head()?, lm_rows)?,
            inv_freq: upload_f32(s, &t.rope.inv_freq(t.head_dim))?,
            cfg,
            ids_cfg,
            blas,
            layers,
            layout,
            cross_layout,
            num_blocks: 0,
            cross_tiles: opts.cross_tiles,
            sets: HashMap::new(),
            free_tiles: (1..=opts.cross_tiles as u32).collect(),
            acts,
            meta,
            opts: opts.clone(),
            num_sms,
            fast_attn,
            rows_cap,
            max_blocks_per_seq: 0,
            graphs: HashMap::new(),
            generation: 0,
            graph_counts: (0, 0),
            qbufs: QuantBuffers::default(),
            capturing: false,
            tp,
            ablate: Vec::new(),
            sampler: crate::exec::cuda::sample::DeviceSampler::new(&stream)?,
            stream,
        })
    }

    /// Device bytes of one self-attention KV block over every self-attention layer (K and V, bf16).
    fn kv_block_bytes(&self) -> usize {
        let self_layers = self.layers.iter().filter(|l| matches!(l, Layer::SelfAttn { .. })).count();
        self.layout.block_size * self.cfg.text.base.kv_dim() * 2 * 2 * self_layers.max(1)
    }

    /// Device bytes the memory plan keeps free for what is allocated after construction: the staging of the
    /// largest image set the cross pools take (its projected states and one layer's K or V), one image's
    /// vision-encoder workspaces, and 256 MiB for kernel modules, cuBLASLt and step metadata.
    fn reserve_bytes(&self) -> usize {
        let t = &self.cfg.text.base;
        let staging = self.cross_tiles * self.cfg.vision.num_patches() * (t.hidden_size + t.kv_dim()) * 2;
        staging + encoder_workspace_bytes(&self.cfg) + (256 << 20)
    }

    /// Self-attention KV blocks that fit on this executor's device under `utilization` when `share` executors
    /// (all uploaded already, this one among them) split what is left equally, each keeping its reserve.
    pub(crate) fn fit_kv(&self, utilization: f32, share: usize) -> Result<KvFit> {
        self.stream.synchronize().map_err(drv("synchronize"))?;
        self.stream.context().bind_to_thread().map_err(drv("bind device"))?;
        let (free, total) = cudarc::driver::result::mem_get_info().map_err(drv("query device memory"))?;
        let used = total.saturating_sub(free);
        let cap = (total as f64 * utilization as f64) as usize;
        let share = share.max(1);
        let blocks = cap.saturating_sub(used + share * self.reserve_bytes()) / (share * self.kv_block_bytes());
        Ok(KvFit { blocks, used, total })
    }

    /// The self-attention KV blocks this executor gets when `share` executors split its device: the options'
    /// `kv_tokens` in whole blocks, or (with `gpu_memory_utilization`) what [`fit_kv`](Self::fit_kv) finds, which
    /// must hold `kv_tokens`.
    pub(crate) fn kv_blocks(&self, share: usize) -> Result<usize> {
        let o = &self.opts;
        let want = o.kv_tokens.div_ceil(o.block_size).max(1);
        let Some(u) = o.gpu_memory_utilization else {
            return Ok(want);
        };
        let fit = self.fit_kv(u, share)?;
        if fit.blocks < want {
            let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
            return Err(Error::request(format!(
                "no room for a KV cache of {} tokens on cuda:{}: {} tokens fit under --gpu-memory-utilization {u} \
                 ({:.2} GiB of {:.2} GiB in use after the weights{})",
                o.kv_tokens,
                o.device,
                fit.blocks * o.block_size,
                gib(fit.used),
                gib(fit.total),
                if share > 1 { format!(", shared by {share} ranks") } else { String::new() }
            )));
        }
        Ok(fit.blocks)
    }

    /// Allocates the self-attention caches: `blocks` blocks of `block_size` tokens in every self-attention layer.
    pub(crate) fn alloc_kv(&mut self, blocks: usize) -> Result<()> {
        if blocks == 0 {
            return Err(Error::request("the self-attention KV cache needs at least one block"));
        }
        let pool = blocks * self.layout.block_size * self.cfg.text.base.kv_dim();
        for layer in &mut self.layers {
            if let Layer::SelfAttn { k_cache, v_cache, .. } = layer {
                // Free the old caches before allocating the new ones.
                *k_cache = alloc(&self.stream, 1)?;
                *v_cache = alloc(&self.stream, 1)?;
                *k_cache = alloc(&self.stream, pool)?;
                *v_cache = alloc(&self.stream, pool)?;
            }
        }
        self.num_blocks = blocks;
        self.max_blocks_per_seq =
            self.cfg.text.base.max_position_embeddings.div_ceil(self.layout.block_size).min(blocks);
        self.graphs.clear();
        self.generation += 1;
        Ok(())
    }

    /// Joins a rank built by [`upload_rank`](Self::upload_rank) to its group: `comm` must be this rank's side of a
    /// group of the plan's size.
    pub(crate) fn set_comm(&mut self, comm: Box<dyn DeviceComm>) -> Result<()> {
        let tp = self.tp.as_mut().ok_or_else(|| Error::Backend("set_comm: not a tensor-parallel rank".into()))?;
        if comm.rank() != tp.rank || comm.world() != tp.world {
            return Err(Error::Backend(format!(
                "communicator is rank {} of {}, expected rank {} of {}",
                comm.rank(),
                comm.world(),
                tp.rank,
                tp.world
            )));
        }
        tp.comm = Some(comm);
        Ok(())
    }

    /// The rank's communicator (None: not a tensor-parallel rank, or not joined yet).
    pub fn device_comm(&self) -> Option<&dyn DeviceComm> {
        self.tp.as_ref().and_then(|t| t.comm.as_deref())
    }

    /// `(rank, world)` of a tensor-parallel rank; None for the whole model.
    pub fn tensor_parallel_rank(&self) -> Option<(usize, usize)> {
        self.tp.as_ref().map(|t| (t.rank, t.world))
    }

    /// The rows of the full `vocab_size + 8`-row embedding table this executor holds.
    pub fn embed_rows(&self) -> Range<usize> {
        match &self.tp {
            Some(t) => t.embed_rows.clone(),
            None => 0..self.cfg.text.embed_rows(),
        }
    }

    /// The vision model's configuration (a rank's: its heads, KV heads and MLP width, the model's vocabulary).
    pub fn mllama_config(&self) -> &MllamaConfig {
        &self.cfg
    }

    /// The stream everything runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}
