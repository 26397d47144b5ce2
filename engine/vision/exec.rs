//! A batched CPU executor for Llama 3.2 Vision: the text decoder over the same flat, paged [`StepInput`] as the
//! text models, with each sequence's images registered once ([`MllamaCpuExecutor::add_images`]) and their
//! cross-attention K/V kept until released. This is the building block the serving engine will drive; the text
//! [`Executor::add_images`] registers a request's images and [`Executor::step_with_images`] runs steps with them.
//!
//! # Tensor parallelism
//! The decoder has the communication points of the text recipe ([`DecoderComm`]): an all-reduce after the
//! vocab-parallel embedding, after every attention output projection (self and cross) and after every `down_proj`,
//! and a gather of the vocab-parallel logits. [`MllamaCpuExecutor::new`] holds the whole model and uses
//! [`NoComm`] (nothing happens at those points); [`MllamaCpuExecutor::shard`] builds one rank of
//! [`crate::tp::vision::TpMllamaCpuExecutor`] from the rank's config and weights.

use std::collections::HashMap;
use std::ops::Range;

use super::config::MllamaConfig;
use super::pipeline::EncodedImages;
use super::text::{cross_attention_decoder_layer_reduced, cross_kv, mlp, CrossKv};
use super::tiles::{RowTiles, TileMap};
use super::weights::{MllamaWeights, TextLayerWeights};
use crate::config::LlamaConfig;
use crate::exec::{Executor, StepInput, StepOutput};
use crate::ops::cpu::attention::{paged_attention, write_kv, AttentionBatch, PagedLayout};
use crate::ops::cpu::embedding::embed;
use crate::ops::cpu::linear::linear;
use crate::ops::cpu::norm::{add_rms_norm, rms_norm};
use crate::ops::cpu::quant::linear_weight;
use crate::ops::cpu::rope::rope;
use crate::{Error, Result};

/// The images of one sequence in a step: the key they were registered under and the cross-attention mask rows
/// of the sequence's new tokens, `[new tokens, images * max_num_tiles]` (generated tokens repeat the prompt's last
/// row).
#[derive(Clone, Copy, Debug)]
pub struct SeqImages<'a> {
    /// Key given to [`MllamaCpuExecutor::add_images`].
    pub key: u64,
    /// Mask rows of the sequence's new tokens.
    pub mask: &'a [u8],
}

/// The communication points of the decoder for a tensor-parallel rank. The defaults do nothing, which is what an
/// executor holding the whole model needs.
pub trait DecoderComm {
    /// Replaces `x` (a `[rows, hidden]` partial result) by its sum over the ranks.
    fn all_reduce(&mut self, x: &mut [f32]) -> Result<()> {
        let _ = x;
        Ok(())
    }

    /// Assembles the full-vocabulary logits `[rows, vocab]` from this rank's `[rows, vocab / tp]` slice.
    fn gather_logits(&mut self, local: Vec<f32>, rows: usize) -> Result<Vec<f32>> {
        let _ = rows;
        Ok(local)
    }
}

/// No communication: the decoder holds the whole model.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoComm;

impl DecoderComm for NoComm {}

/// Which part of the full model's embedding table a decoder holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecoderShard {
    /// Rows of the full table held (`vocab_size + 8` rows in all); token ids outside embed as zeros, and the
    /// embedding is all-reduced, unless the range is the whole table.
    pub embed_rows: Range<usize>,
    /// Rows of the full table (`vocab_size + 8`): token ids are checked against it.
    pub full_embed_rows: usize,
}

/// The CPU executor of a Llama 3.2 Vision model (f32, paged self-attention K/V, cross K/V per image set).
pub struct MllamaCpuExecutor {
    cfg: MllamaConfig,
    shard: DecoderShard,
    w: MllamaWeights,
    layout: PagedLayout,
    num_blocks: usize,
    inv_freq: Vec<f32>,
    /// Per decoder layer: the paged K and V pools of a self-attention layer (empty for cross-attention layers).
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
    /// Registered image sets.
    images: HashMap<u64, CpuImageSet>,
    /// Most cross-attention tiles the registered sets may hold together (`None`: no limit), as a device pool has.
    cross_tile_limit: Option<usize>,
}

/// A registered image set: per decoder layer the cross K/V (`None` for self-attention layers), its tiles stored
/// in [`TileMap`] order (real tiles first, then the padding ones until [`Executor::trim_images`]).
struct CpuImageSet {
    kv: Vec<Option<CrossKv>>,
    map: TileMap,
}

impl MllamaCpuExecutor {
    /// An executor whose self-attention pool holds `max_tokens` tokens (rounded up to whole blocks).
    pub fn new(cfg: MllamaConfig, w: MllamaWeights, max_tokens: usize, block_size: usize) -> Result<Self> {
        let rows = cfg.text.embed_rows();
        Self::shard(cfg, w, max_tokens, block_size, DecoderShard { embed_rows: 0..rows, full_embed_rows: rows })
    }

    /// One tensor-parallel rank: `cfg` is the rank's config (its query and KV heads, MLP width and `vocab_size / tp`,
    /// everything else the model's), `w` the rank's text weights in that config's shapes (its embedding rows as
    /// `shard` says), and the self-attention pool holds `max_tokens` tokens of the rank's KV heads. Steps run through
    /// [`run_with`](Self::run_with) with the rank's communicator.
    pub fn shard(
        cfg: MllamaConfig,
        w: MllamaWeights,
        max_tokens: usize,
        block_size: usize,
        shard: DecoderShard,
    ) -> Result<Self> {
        let hidden = cfg.text.base.hidden_size;
        if shard.embed_rows.end > shard.full_embed_rows || w.text.embed.len() != shard.embed_rows.len() * hidden {
            return Err(Error::weights(
                "<mllama text weights>",
                format!(
                    "embedding holds {} values, expected rows {:?} of {} x hidden {hidden}",
                    w.text.embed.len(),
                    shard.embed_rows,
                    shard.full_embed_rows
                ),
            ));
        }
        if block_size == 0 || max_tokens == 0 {
            return Err(Error::request("KV cache: block size and capacity must be positive"));
        }
        let t = &cfg.text.base;
        let layout = PagedLayout {
            num_heads: t.num_attention_heads,
            num_kv_heads: t.num_key_value_heads,
            head_dim: t.head_dim,
            block_size,
        };
        let num_blocks = max_tokens.div_ceil(block_size);
        let pool = num_blocks * block_size * layout.slot_len();
        let mut k_cache = Vec::new();
        let mut v_cache = Vec::new();
        for l in &w.text.layers {
            let n = if matches!(l, TextLayerWeights::SelfAttention(_)) { pool } else { 0 };
            k_cache.push(vec![0.0; n]);
            v_cache.push(vec![0.0; n]);
        }
        let inv_freq = t.rope.inv_freq(t.head_dim);
        Ok(MllamaCpuExecutor {
            cfg,
            shard,
            w,
            layout,
            num_blocks,
            inv_freq,
            k_cache,
            v_cache,
            images: HashMap::new(),
            cross_tile_limit: None,
        })
    }

    /// The vision model's configuration (a rank's own for a tensor-parallel rank).
    pub fn mllama_config(&self) -> &MllamaConfig {
        &self.cfg
    }

    /// The embedding rows this decoder holds.
    pub fn decoder_shard(&self) -> &DecoderShard {
        &self.shard
    }

    /// Computes and keeps every cross-attention layer's K/V of `images` under `key` (replacing an earlier set with
    /// that key), real tiles first (see [`TileMap`]).
    fn register(&mut self, key: u64, images: &EncodedImages) -> Result<()> {
        let (tpt, hidden) = (self.cfg.vision.num_patches(), self.cfg.text.base.hidden_size);
        let map = TileMap::new(&images.num_tiles, self.cfg.vision.max_num_tiles)?;
        let tile_len = tpt * hidden;
        if images.states.len() != map.columns() * tile_len {
            return Err(Error::request(format!(
                "add_images: states hold {} values, expected {} images x {} tiles x {tpt} tokens x {hidden}",
                images.states.len(),
                images.len(),
                self.cfg.vision.max_num_tiles
            )));
        }
        if !self.fits(Some(key), &images.num_tiles)? {
            return Err(Error::request(format!(
                "add_images: {} tiles do not fit in the cross-attention pool ({} of {} free)",
                map.columns(),
                self.cross_tile_limit.unwrap_or(0).saturating_sub(self.held_cross_tiles()),
                self.cross_tile_limit.unwrap_or(0)
            )));
        }
        let mut states = Vec::with_capacity(images.states.len());
        for col in map.storage_order() {
            states.extend_from_slice(&images.states[col * tile_len..(col + 1) * tile_len]);
        }
        let mut kv = Vec::with_capacity(self.w.text.layers.len());
        for l in &self.w.text.layers {
            kv.push(match l {
                TextLayerWeights::CrossAttention(cl) => Some(cross_kv(cl, &self.cfg.text, &states, tpt)?),
                TextLayerWeights::SelfAttention(_) => None,
            });
        }
        self.images.insert(key, CpuImageSet { kv, map });
        Ok(())
    }

    /// Bounds the cross-attention tiles all registered sets may hold together (`None`: no limit), the way a
    /// device's cross-attention pool is bounded, so that the engine's waiting for room can be tested on the CPU.
    pub fn limit_cross_tiles(&mut self, tiles: Option<usize>) {
        self.cross_tile_limit = tiles;
    }

    /// Whether images of `num_tiles` tiles fit beside the registered sets other than `key` (which they would
    /// replace).
    fn fits(&self, key: Option<u64>, num_tiles: &[usize]) -> Result<bool> {
        let Some(limit) = self.cross_tile_limit else { return Ok(true) };
        let need = num_tiles.len() * self.cfg.vision.max_num_tiles;
        if need > limit {
            return Err(Error::request(format!(
                "images of {need} tiles (padding tiles included) exceed the cross-attention pool of {limit} tiles"
            )));
        }
        let others: usize = self.images.iter().filter(|(&k, _)| Some(k) != key).map(|(_, s)| s.map.held()).sum();
        Ok(others + need <= limit)
    }

    /// Frees the padding tiles' K/V of set `key` (see [`Executor::trim_images`]).
    fn trim(&mut self, key: u64) -> bool {
        let Some(set) = self.images.get_mut(&key) else { return false };
        set.map.trim();
        let real = set.map.real();
        set.kv.iter_mut().flatten().for_each(|kv| kv.truncate_tiles(real));
        true
    }

    /// Cross-attention tiles held by the registered image sets (per cross layer; each tile is `num_patches` K and
    /// V rows).
    pub fn held_cross_tiles(&self) -> usize {
        self.images.values().map(|s| s.map.held()).sum()
    }

    /// Number of registered image sets.
    pub fn num_image_sets(&self) -> usize {
        self.images.len()
    }

    /// Runs one step. `images` is empty (no sequence has images) or has one entry per sequence of `input`.
    fn run(&mut self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<StepOutput> {
        self.run_with(input, images, &mut NoComm)
    }

    /// Runs one step with `comm` at the communication points (see the module docs); `images` as in
    /// [`Executor::step_with_images`]. Every rank of a group must run the same step.
    pub fn run_with(
        &mut self,
        input: &StepInput,
        images: &[Option<SeqImages<'_>>],
        comm: &mut dyn DecoderComm,
    ) -> Result<StepOutput> {
        let t = self.cfg.text.base.clone();
        // Token ids may use the embedding's extra rows (the image token is `vocab_size`).
        let ids_cfg = LlamaConfig { vocab_size: self.shard.full_embed_rows, ..t.clone() };
        input.validate(&ids_cfg, self.num_blocks, self.layout.block_size)?;
        let seqs = input.num_seqs();
        if !images.is_empty() && images.len() != seqs {
            return Err(Error::request(format!("step: {} image entries for {seqs} sequences", images.len())));
        }
        // Per sequence with images: its mask rows over the set's stored tiles (a row that sees no image stays all
        // zeros: it attends over every stored tile).
        let mut masks: Vec<Option<Vec<u8>>> = vec![None; images.len()];
        for (s, im) in images.iter().enumerate() {
            let Some(im) = im else { continue };
            let set = self.images.get(&im.key).ok_or_else(|| {
                Error::request(format!("step: sequence {s} uses image set {} which is not registered", im.key))
            })?;
            let tokens = (input.cu_seqlens[s + 1] - input.cu_seqlens[s]) as usize;
            let cols = set.map.columns();
            if im.mask.len() != tokens * cols {
                return Err(Error::request(format!(
                    "step: sequence {s} has {} mask values for {tokens} tokens x {cols} tiles",
                    im.mask.len(),
                )));
            }
            if im.mask.iter().any(|&v| v > 1) {
                return Err(Error::request(format!("step: sequence {s}'s cross-attention mask is not 0/1")));
            }
            let held = set.map.held();
            let mut m = vec![0u8; tokens * held];
            for (i, row) in im.mask.chunks(cols).enumerate() {
                let what = || format!("step: sequence {s} token {i} (image set {})", im.key);
                if let RowTiles::Sees(slots) = set.map.row(row, &what)? {
                    slots.into_iter().for_each(|j| m[i * held + j] = 1);
                }
            }
            masks[s] = Some(m);
        }
        let (hidden, q_dim, kv_dim, eps) = (t.hidden_size, t.q_dim(), t.kv_dim(), t.rms_norm_eps);
        let stride = q_dim + 2 * kv_dim;
        let n = input.num_tokens();
        let seq_of_token = input.seq_of_token();
        let mut x = vec![0.0f32; n * hidden];
        let held = &self.shard.embed_rows;
        if held.start == 0 && held.end == self.shard.full_embed_rows {
            embed(&self.w.text.embed, hidden, &input.token_ids, &mut x);
        } else {
            // Vocab-parallel: this rank's rows embed here, every other id as zeros; the sum over ranks is exact.
            let local: Vec<u32> = input
                .token_ids
                .iter()
                .map(|&id| if held.contains(&(id as usize)) { id - held.start as u32 } else { 0 })
                .collect();
            embed(&self.w.text.embed, hidden, &local, &mut x);
            for (xr, &id) in x.chunks_mut(hidden).zip(&input.token_ids) {
                if !held.contains(&(id as usize)) {
                    xr.fill(0.0);
                }
            }
            comm.all_reduce(&mut x)?;
        }
        let mut h = vec![0.0f32; n * hidden];
        for (l, layer) in self.w.text.layers.iter().enumerate() {
            match layer {
                TextLayerWeights::SelfAttention(lw) => {
                    rms_norm(&x, &lw.attn_norm, eps, hidden, &mut h);
                    let mut qkv = vec![0.0f32; n * stride];
                    linear_weight(&h, &lw.wqkv, n, hidden, stride, &mut qkv);
                    // k's heads follow q's in each row, so both rotate as one block of heads.
                    let heads = t.num_attention_heads + t.num_key_value_heads;
                    rope(&mut qkv, stride, heads, t.head_dim, &input.positions, &self.inv_freq);
                    write_kv(
                        &self.layout,
                        &qkv[q_dim..],
                        &qkv[q_dim + kv_dim..],
                        stride,
                        &input.slot_mapping,
                        &mut self.k_cache[l],
                        &mut self.v_cache[l],
                    );
                    let batch = AttentionBatch {
                        seq_of_token: &seq_of_token,
                        positions: &input.positions,
                        block_tables: &input.block_tables,
                        max_blocks_per_seq: input.max_blocks_per_seq,
                    };
                    let mut attn = vec![0.0f32; n * q_dim];
                    paged_attention(&self.layout, &qkv, stride, &batch, &self.k_cache[l], &self.v_cache[l], &mut attn);
                    let mut o = vec![0.0f32; n * hidden];
                    linear_weight(&attn, &lw.wo, n, q_dim, hidden, &mut o);
                    comm.all_reduce(&mut o)?;
                    add_rms_norm(&mut x, &o, &lw.mlp_norm, eps, hidden, &mut h);
                    let mut m = mlp(&self.cfg.text, &lw.w_gate_up, &lw.w_down, &h);
                    comm.all_reduce(&mut m)?;
                    x.iter_mut().zip(&m).for_each(|(xv, &mv)| *xv += mv);
                }
                TextLayerWeights::CrossAttention(cw) => {
                    // Sequences without images skip the layer, as transformers does without vision states.
                    for (s, im) in images.iter().enumerate() {
                        let (Some(im), Some(mask)) = (im, &masks[s]) else { continue };
                        let Some(kv) = self.images[&im.key].kv[l].as_ref() else {
                            return Err(Error::Backend(format!("image set {} lacks layer {l}", im.key)));
                        };
                        let (a, b) = (input.cu_seqlens[s] as usize, input.cu_seqlens[s + 1] as usize);
                        cross_attention_decoder_layer_reduced(
                            cw,
                            &self.cfg.text,
                            &mut x[a * hidden..b * hidden],
                            kv,
                            Some(mask),
                            &mut |part| comm.all_reduce(part),
                        )?;
                    }
                }
            }
        }
        let rows = input.logits_rows.len();
        let mut xr = vec![0.0f32; rows * hidden];
        for (i, &r) in input.logits_rows.iter().enumerate() {
            xr[i * hidden..(i + 1) * hidden].copy_from_slice(&x[r as usize * hidden..(r as usize + 1) * hidden]);
        }
        let mut hr = vec![0.0f32; rows * hidden];
        rms_norm(&xr, &self.w.text.final_norm, eps, hidden, &mut hr);
        let mut logits = vec![0.0f32; rows * t.vocab_size];
        linear(&hr, &self.w.text.lm_head, rows, hidden, t.vocab_size, &mut logits);
        let logits = comm.gather_logits(logits, rows)?;
        Ok(StepOutput { logits })
    }
}

impl Executor for MllamaCpuExecutor {
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
        self.register(key, images)
    }

    fn remove_images(&mut self, key: u64) -> bool {
        self.images.remove(&key).is_some()
    }

    fn trim_images(&mut self, key: u64) -> Result<bool> {
        Ok(self.trim(key))
    }

    fn images_fit(&self, num_tiles: &[usize]) -> Result<bool> {
        self.fits(None, num_tiles)
    }

    fn step_with_images(&mut self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<StepOutput> {
        self.run(input, images)
    }
}
