//! A batched CPU executor for Llama 3.2 Vision: the text decoder over the same flat, paged [`StepInput`] as the
//! text models, with each sequence's images registered once ([`MllamaCpuExecutor::add_images`]) and their
//! cross-attention K/V kept until released. This is the building block the serving engine will drive; the text
//! [`Executor::add_images`] registers a request's images and [`Executor::step_with_images`] runs steps with them.

use std::collections::HashMap;

use super::config::{MllamaConfig, EXTRA_EMBED_ROWS};
use super::pipeline::EncodedImages;
use super::text::{cross_attention_decoder_layer, cross_kv, mlp, CrossKv};
use super::weights::{MllamaWeights, TextLayerWeights};
use crate::config::LlamaConfig;
use crate::exec::{Executor, StepInput, StepOutput};
use crate::ops::cpu::attention::{paged_attention, write_kv, AttentionBatch, PagedLayout};
use crate::ops::cpu::embedding::embed;
use crate::ops::cpu::linear::linear;
use crate::ops::cpu::norm::{add_rms_norm, rms_norm};
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

/// The CPU executor of a Llama 3.2 Vision model (f32, paged self-attention K/V, cross K/V per image set).
pub struct MllamaCpuExecutor {
    cfg: MllamaConfig,
    w: MllamaWeights,
    layout: PagedLayout,
    num_blocks: usize,
    inv_freq: Vec<f32>,
    /// Per decoder layer: the paged K and V pools of a self-attention layer (empty for cross-attention layers).
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
    /// Registered image sets: per decoder layer, the cross K/V (`None` for self-attention layers), and the number
    /// of images.
    images: HashMap<u64, (Vec<Option<CrossKv>>, usize)>,
}

impl MllamaCpuExecutor {
    /// An executor whose self-attention pool holds `max_tokens` tokens (rounded up to whole blocks).
    pub fn new(cfg: MllamaConfig, w: MllamaWeights, max_tokens: usize, block_size: usize) -> Result<Self> {
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
        Ok(MllamaCpuExecutor { cfg, w, layout, num_blocks, inv_freq, k_cache, v_cache, images: HashMap::new() })
    }

    /// The vision model's configuration.
    pub fn mllama_config(&self) -> &MllamaConfig {
        &self.cfg
    }

    /// Computes and keeps every cross-attention layer's K/V of `images` under `key` (replacing an earlier set with
    /// that key).
    fn register(&mut self, key: u64, images: &EncodedImages) -> Result<()> {
        if images.is_empty() {
            return Err(Error::request("add_images: no images"));
        }
        let tpt = self.cfg.vision.num_patches();
        let mut per_layer = Vec::with_capacity(self.w.text.layers.len());
        for l in &self.w.text.layers {
            per_layer.push(match l {
                TextLayerWeights::CrossAttention(cl) => Some(cross_kv(cl, &self.cfg.text, &images.states, tpt)?),
                TextLayerWeights::SelfAttention(_) => None,
            });
        }
        let want = images.len() * self.cfg.vision.max_num_tiles;
        if let Some(kv) = per_layer.iter().flatten().next() {
            if kv.tiles() != want {
                return Err(Error::request(format!(
                    "add_images: states hold {} tiles, expected {} images x {} tiles",
                    kv.tiles(),
                    images.len(),
                    self.cfg.vision.max_num_tiles
                )));
            }
        }
        self.images.insert(key, (per_layer, images.len()));
        Ok(())
    }

    /// Number of registered image sets.
    pub fn num_image_sets(&self) -> usize {
        self.images.len()
    }

    /// Runs one step. `images` is empty (no sequence has images) or has one entry per sequence of `input`.
    fn run(&mut self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<StepOutput> {
        let t = self.cfg.text.base.clone();
        // Token ids may use the embedding's extra rows (the image token is `vocab_size`).
        let ids_cfg = LlamaConfig { vocab_size: t.vocab_size + EXTRA_EMBED_ROWS, ..t.clone() };
        input.validate(&ids_cfg, self.num_blocks, self.layout.block_size)?;
        let seqs = input.num_seqs();
        if !images.is_empty() && images.len() != seqs {
            return Err(Error::request(format!("step: {} image entries for {seqs} sequences", images.len())));
        }
        let row_len = |n: usize| n * self.cfg.vision.max_num_tiles;
        for (s, im) in images.iter().enumerate() {
            let Some(im) = im else { continue };
            let (_, n) = self.images.get(&im.key).ok_or_else(|| {
                Error::request(format!("step: sequence {s} uses image set {} which is not registered", im.key))
            })?;
            let tokens = (input.cu_seqlens[s + 1] - input.cu_seqlens[s]) as usize;
            if im.mask.len() != tokens * row_len(*n) {
                return Err(Error::request(format!(
                    "step: sequence {s} has {} mask values for {tokens} tokens x {} tiles",
                    im.mask.len(),
                    row_len(*n)
                )));
            }
            if im.mask.iter().any(|&v| v > 1) {
                return Err(Error::request(format!("step: sequence {s}'s cross-attention mask is not 0/1")));
            }
        }
        let (hidden, q_dim, kv_dim, eps) = (t.hidden_size, t.q_dim(), t.kv_dim(), t.rms_norm_eps);
        let stride = q_dim + 2 * kv_dim;
        let n = input.num_tokens();
        let seq_of_token = input.seq_of_token();
        let mut x = vec![0.0f32; n * hidden];
        embed(&self.w.text.embed, hidden, &input.token_ids, &mut x);
        let mut h = vec![0.0f32; n * hidden];
        for (l, layer) in self.w.text.layers.iter().enumerate() {
            match layer {
                TextLayerWeights::SelfAttention(lw) => {
                    rms_norm(&x, &lw.attn_norm, eps, hidden, &mut h);
                    let mut qkv = vec![0.0f32; n * stride];
                    linear(&h, &lw.wqkv, n, hidden, stride, &mut qkv);
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
                    linear(&attn, &lw.wo, n, q_dim, hidden, &mut o);
                    add_rms_norm(&mut x, &o, &lw.mlp_norm, eps, hidden, &mut h);
                    let m = mlp(&self.cfg.text, &lw.w_gate_up, &lw.w_down, &h);
                    x.iter_mut().zip(&m).for_each(|(xv, &mv)| *xv += mv);
                }
                TextLayerWeights::CrossAttention(cw) => {
                    // Sequences without images skip the layer, as transformers does without vision states.
                    for (s, im) in images.iter().enumerate() {
                        let Some(im) = im else { continue };
                        let (sets, _) = &self.images[&im.key];
                        let Some(kv) = sets[l].as_ref() else {
                            return Err(Error::Backend(format!("image set {} lacks layer {l}", im.key)));
                        };
                        let (a, b) = (input.cu_seqlens[s] as usize, input.cu_seqlens[s + 1] as usize);
                        cross_attention_decoder_layer(
                            cw,
                            &self.cfg.text,
                            &mut x[a * hidden..b * hidden],
                            kv,
                            Some(im.mask),
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

    fn step_with_images(&mut self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<StepOutput> {
        self.run(input, images)
    }
}
