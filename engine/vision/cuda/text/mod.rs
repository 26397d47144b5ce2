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
//! image set registered by [`Executor::add_images`] gets blocks from a free list, one per tile of each image,
//! computed once (`k = k_norm(states Wk^T)`, `v = states Wv^T`) and kept until [`Executor::remove_images`]. The
//! real tiles come first and the padding tiles after them ([`TileMap`]): rows that see no image (the prompt
//! tokens before its first `<|image|>`) attend over every tile, padding included, as transformers does, but once
//! those rows have run [`Executor::trim_images`] frees the padding tiles and the set keeps only its real tiles. A step turns each
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
//!
//! [`Executor`]: crate::exec::Executor
//! [`Executor::add_images`]: crate::exec::Executor::add_images
//! [`Executor::remove_images`]: crate::exec::Executor::remove_images
//! [`Executor::trim_images`]: crate::exec::Executor::trim_images

mod build;
mod executor;
mod forward;
mod graph;
mod images;
mod step;

pub use build::MllamaCudaOptions;
pub use forward::VISION_ABLATABLE;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::exec::cuda::blas::Blas;
use cudarc::driver::{CudaGraph, CudaSlice, CudaStream};
use half::bf16;

use super::drv;
use crate::config::LlamaConfig;
use crate::exec::cuda::quant_bufs::{DeviceLinear, DeviceTable, QuantBuffers};
use crate::ops::cpu::attention::PagedLayout;
use crate::vision::config::MllamaConfig;
use crate::vision::tiles::TileMap;
use crate::Result;

#[allow(clippy::large_enum_variant)] // a few per model, never moved after loading
enum Layer {
    SelfAttn {
        attn_norm: CudaSlice<bf16>,
        wqkv: DeviceLinear,
        wo: DeviceLinear,
        mlp_norm: CudaSlice<bf16>,
        w_gate_up: DeviceLinear,
        w_down: DeviceLinear,
        k_cache: CudaSlice<bf16>,
        v_cache: CudaSlice<bf16>,
    },
    Cross {
        attn_norm: CudaSlice<bf16>,
        wq: DeviceLinear,
        wk: DeviceLinear,
        wv: DeviceLinear,
        wo: DeviceLinear,
        q_norm: CudaSlice<bf16>,
        k_norm: CudaSlice<bf16>,
        attn_gate: f32,
        mlp_norm: CudaSlice<bf16>,
        w_gate_up: DeviceLinear,
        w_down: DeviceLinear,
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
    /// The norm prologue's residual-update counter (one u32, zero between launches).
    norm_counter: CudaSlice<u32>,
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

/// A registered image set: the cross-pool block of each stored tile (`blocks[slot]`, `map.held()` of them), the
/// tiles in [`TileMap`] order (real tiles first, so trimming the padding ones frees the last blocks).
#[derive(Clone, Debug)]
struct ImageSet {
    blocks: Vec<u32>,
    map: TileMap,
}

/// The CUDA executor of a Llama 3.2 Vision model's text decoder (bf16 weights, paged bf16 self-attention K/V, cross
/// K/V per registered image set).
pub struct MllamaCudaExecutor {
    cfg: MllamaConfig,
    ids_cfg: LlamaConfig,
    stream: Arc<CudaStream>,
    blas: Blas,
    embed: DeviceTable,
    layers: Vec<Layer>,
    final_norm: CudaSlice<bf16>,
    lm_head: DeviceTable,
    inv_freq: CudaSlice<f32>,
    layout: PagedLayout,
    cross_layout: PagedLayout,
    num_blocks: usize,
    cross_tiles: usize,
    sets: HashMap<u64, ImageSet>,
    /// Cross-pool blocks no set holds (block 0, the zero block, is never free).
    free_tiles: BTreeSet<u32>,
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
    /// Buffers of the quantized projections (split-K workspace, int8 activations, W4A16 scratch).
    qbufs: QuantBuffers,
    /// Set while a decode graph is captured: buffers must not grow then.
    capturing: bool,
    /// A tensor-parallel rank's communicator, the embedding and `lm_head` rows it holds and the buffers of the
    /// vocab-parallel embedding and logits gather ([`MllamaCudaExecutor::new_rank`]); None: the whole model.
    tp: Option<build::RankTp>,
    /// The calls [`MllamaCudaExecutor::set_ablation`] leaves out.
    ablate: Vec<&'static str>,
    /// Picks ids from the logits on the device (greedy, sampled and scored steps).
    sampler: crate::exec::cuda::sample::DeviceSampler,
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
