//! CPU reference forward of the Llama 3.2 Vision text decoder (transformers 5.24's `MllamaTextModel` +
//! `lm_head`), f32 throughout, dense (one sequence, contiguous per-layer caches).
//!
//! # The decoder
//! Layers not listed in `cross_attention_layers` are ordinary Llama layers (RMSNorm, llama3 RoPE, GQA, SwiGLU).
//! A cross-attention layer ([`cross_attention_decoder_layer`]) computes
//!
//! ```text
//! h = rms_norm(x, input_layernorm)
//! q = q_norm(per head, h @ Wq^T)                          (no RoPE)
//! k = k_norm(per head, states @ Wk^T), v = states @ Wv^T  (once per image: cross_kv)
//! x += tanh(attn_gate) * (softmax(q k^T / sqrt(d) + mask) v) @ Wo^T
//! x += tanh(mlp_gate) * row_mask * mlp(rms_norm(x, post_attention_layernorm))
//! ```
//!
//! where `states` are the projected vision states, `[images * max_tiles * num_patches, hidden]` (padding tiles
//! included, as transformers runs them), in (image, tile, token) order.
//!
//! # The cross-attention mask
//! The processor's mask ([`CrossAttentionMask`]) is `[tokens, images, max_tiles]` of 0/1. transformers'
//! `_prepare_cross_attention_mask` repeats each (image, tile) entry over the tile's `num_patches` vision tokens and
//! turns it into an additive mask (0 where 1, the most negative f32 elsewhere), then derives the row mask
//! `full_text_row_masked_out_mask` (1 where the row has any 1) and multiplies the additive mask by it. So:
//!
//! * a row that sees some tile attends to exactly the vision tokens of the tiles it sees (the masked scores get
//!   weight exactly 0 in f32);
//! * a row that sees nothing (text before the first `<|image|>`) has its additive mask zeroed: its attention runs
//!   *unmasked* over every vision token, padding tiles included, and still reaches the residual; only its MLP half
//!   is zeroed by the row mask.
//!
//! Without a mask (`None`) every row attends to everything and no MLP row is zeroed (transformers with
//! `cross_attention_mask=None`). When a sequence has no images, the cross-attention layers are skipped entirely,
//! as transformers skips them when there are neither `cross_attention_states` nor cached ones.
//!
//! # Decoding
//! [`TextCache`] holds a sequence's self-attention K/V (dense, growing) and each cross-attention layer's image
//! K/V ([`CrossKv`], computed once per image by [`cross_kv`]); [`text_step`] runs any number of new tokens against
//! it. transformers' `generate` gives each generated token a copy of the last mask row
//! ([`CrossAttentionMask::extended`]). [`text_forward`] is one full-sequence step on a fresh cache.

use rayon::prelude::*;

use super::config::{MllamaConfig, MllamaTextConfig};
use super::weights::{CrossAttentionLayerWeights, TextLayerWeights, TextWeights};
use crate::ops::cpu::activation::silu_mul;
use crate::ops::cpu::attention::{paged_attention, AttentionBatch, PagedLayout};
use crate::ops::cpu::embedding::embed;
use crate::ops::cpu::linear::linear;
use crate::ops::cpu::norm::{add_rms_norm, rms_norm};
use crate::ops::cpu::quant::linear_weight;
use crate::ops::cpu::rope::rope;
use crate::weights::{LayerWeights, LinearWeight};
use crate::{Error, Result};

/// The processor's cross-attention mask of one sequence: `[tokens, num_images, max_tiles]` of 0/1, row-major.
/// Entry `(t, i, j)` is 1 when text token `t` may attend to tile `j` of image `i`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrossAttentionMask {
    tokens: usize,
    num_images: usize,
    max_tiles: usize,
    data: Vec<u8>,
}

impl CrossAttentionMask {
    /// A mask from its dense values (`tokens * num_images * max_tiles` entries, each 0 or 1).
    pub fn new(data: Vec<u8>, tokens: usize, num_images: usize, max_tiles: usize) -> Result<Self> {
        let want = tokens * num_images * max_tiles;
        if data.len() != want {
            return Err(Error::request(format!(
                "cross_attention_mask: {} values, expected tokens {tokens} x images {num_images} x tiles {max_tiles} = {want}",
                data.len()
            )));
        }
        if let Some(p) = data.iter().position(|&v| v > 1) {
            return Err(Error::request(format!("cross_attention_mask: value {} at index {p} is not 0 or 1", data[p])));
        }
        Ok(CrossAttentionMask { tokens, num_images, max_tiles, data })
    }

    /// A mask from the processor's int64 values (as saved in `cross_attention_mask.npy`, batch dimension dropped).
    pub fn from_i64(data: &[i64], tokens: usize, num_images: usize, max_tiles: usize) -> Result<Self> {
        let mut bytes = Vec::with_capacity(data.len());
        for (p, &v) in data.iter().enumerate() {
            match v {
                0 | 1 => bytes.push(v as u8),
                _ => return Err(Error::request(format!("cross_attention_mask: value {v} at index {p} is not 0 or 1"))),
            }
        }
        Self::new(bytes, tokens, num_images, max_tiles)
    }

    /// The mask transformers' `MllamaProcessor` builds for `input_ids` (`get_cross_attention_token_mask` +
    /// `convert_sparse_cross_attention_mask_to_dense`): image `i` belongs to the `i`-th `image_token` and is seen
    /// by the tokens from it up to (not including) the next image token, or to the end for the last one; a run of
    /// consecutive image tokens shares the range of the run's last token. Only the first `num_tiles[i]` tiles of
    /// each image are marked. `num_tiles` has one entry per image token, each in `1..=max_tiles`.
    pub fn from_image_tokens(
        input_ids: &[u32],
        image_token: u32,
        num_tiles: &[usize],
        max_tiles: usize,
    ) -> Result<Self> {
        let locs: Vec<usize> =
            input_ids.iter().enumerate().filter(|(_, &id)| id == image_token).map(|(i, _)| i).collect();
        if locs.len() != num_tiles.len() {
            return Err(Error::request(format!(
                "cross_attention_mask: {} image token(s) (id {image_token}) in the input ids but {} image(s)",
                locs.len(),
                num_tiles.len()
            )));
        }
        if let Some((i, &n)) = num_tiles.iter().enumerate().find(|(_, &n)| n == 0 || n > max_tiles) {
            return Err(Error::request(format!(
                "cross_attention_mask: image {i} has {n} tiles, expected 1..={max_tiles}"
            )));
        }
        let len = input_ids.len();
        // [start, end) per image; consecutive image tokens take the end of the token after them.
        let mut ranges: Vec<(usize, usize)> =
            locs.iter().enumerate().map(|(k, &s)| (s, *locs.get(k + 1).unwrap_or(&len))).collect();
        let mut next_end = len;
        for r in ranges.iter_mut().rev() {
            if r.0 + 1 == r.1 {
                r.1 = next_end;
            }
            next_end = r.1;
        }
        let (images, row) = (num_tiles.len(), num_tiles.len() * max_tiles);
        let mut data = vec![0u8; len * row];
        for (i, (&(start, end), &tiles)) in ranges.iter().zip(num_tiles).enumerate() {
            for t in start..end {
                data[t * row + i * max_tiles..][..tiles].fill(1);
            }
        }
        Self::new(data, len, images, max_tiles)
    }

    /// Text tokens (rows).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Images.
    pub fn num_images(&self) -> usize {
        self.num_images
    }

    /// Tiles per image.
    pub fn max_tiles(&self) -> usize {
        self.max_tiles
    }

    /// Entries per row (`num_images * max_tiles`).
    pub fn row_len(&self) -> usize {
        self.num_images * self.max_tiles
    }

    /// All values, `[tokens, num_images, max_tiles]`.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Row `t` (`num_images * max_tiles` values). Panics if `t >= tokens`.
    pub fn row(&self, t: usize) -> &[u8] {
        &self.data[t * self.row_len()..][..self.row_len()]
    }

    /// Rows `start..end` as one slice. Panics if the range is out of bounds.
    pub fn rows(&self, start: usize, end: usize) -> &[u8] {
        &self.data[start * self.row_len()..end * self.row_len()]
    }

    /// The mask for `tokens` rows: rows beyond the current ones repeat the last row, as transformers' `generate`
    /// extends it for generated tokens (`_update_model_kwargs_for_generation`). Fewer rows than now, or extending
    /// an empty mask, is an error.
    pub fn extended(&self, tokens: usize) -> Result<Self> {
        if tokens < self.tokens {
            return Err(Error::request(format!(
                "cross_attention_mask: cannot extend {} rows to {tokens}",
                self.tokens
            )));
        }
        if self.tokens == 0 && tokens > 0 {
            return Err(Error::request("cross_attention_mask: cannot extend a mask without rows"));
        }
        let mut data = self.data.clone();
        for _ in self.tokens..tokens {
            data.extend_from_slice(self.row(self.tokens - 1));
        }
        Self::new(data, tokens, self.num_images, self.max_tiles)
    }
}

/// Whether a mask row sees any tile (transformers' `full_text_row_masked_out_mask` is 1 for it). A row that sees
/// nothing attends unmasked over all vision tokens and has its cross-attention MLP output zeroed.
pub fn row_sees_image(row: &[u8]) -> bool {
    row.contains(&1)
}

/// One cross-attention layer's keys and values over a sequence's vision tokens: `[tokens, kv_dim]` each, keys
/// already normalized by `k_norm`. Tokens come in blocks of `tokens_per_tile` (one per (image, tile)).
#[derive(Clone, Debug, PartialEq)]
pub struct CrossKv {
    k: Vec<f32>,
    v: Vec<f32>,
    kv_dim: usize,
    tokens_per_tile: usize,
}

impl CrossKv {
    /// Vision tokens.
    pub fn tokens(&self) -> usize {
        self.k.len() / self.kv_dim
    }

    /// (image, tile) blocks: the length of a cross-attention mask row over these tokens.
    pub fn tiles(&self) -> usize {
        self.tokens() / self.tokens_per_tile
    }

    /// Vision tokens per tile.
    pub fn tokens_per_tile(&self) -> usize {
        self.tokens_per_tile
    }

    /// Normalized keys `[tokens, kv_dim]`.
    pub fn k(&self) -> &[f32] {
        &self.k
    }

    /// Values `[tokens, kv_dim]`.
    pub fn v(&self) -> &[f32] {
        &self.v
    }

    /// Keeps the first `tiles` (image, tile) blocks and frees the rest.
    pub fn truncate_tiles(&mut self, tiles: usize) {
        let n = tiles * self.tokens_per_tile * self.kv_dim;
        self.k.truncate(n);
        self.v.truncate(n);
        self.k.shrink_to_fit();
        self.v.shrink_to_fit();
    }

    /// Appends `other`'s tokens (a later image) after these.
    pub fn append(&mut self, other: &CrossKv) -> Result<()> {
        if other.kv_dim != self.kv_dim || other.tokens_per_tile != self.tokens_per_tile {
            return Err(Error::request(format!(
                "cross K/V: cannot append kv_dim {} / {} tokens per tile to kv_dim {} / {}",
                other.kv_dim, other.tokens_per_tile, self.kv_dim, self.tokens_per_tile
            )));
        }
        self.k.extend_from_slice(&other.k);
        self.v.extend_from_slice(&other.v);
        Ok(())
    }
}

/// Keys and values of one cross-attention layer for projected vision states `[rows, hidden]` (one image's
/// `max_tiles * num_patches` rows, or several images one after another): `k = k_norm(states @ Wk^T)` per head,
/// `v = states @ Wv^T`. Rows are independent, so per-image results concatenated ([`CrossKv::append`]) equal the
/// result over all images at once.
pub fn cross_kv(
    layer: &CrossAttentionLayerWeights,
    cfg: &MllamaTextConfig,
    states: &[f32],
    tokens_per_tile: usize,
) -> Result<CrossKv> {
    let c = &cfg.base;
    let (hidden, kv_dim) = (c.hidden_size, c.kv_dim());
    if tokens_per_tile == 0 {
        return Err(Error::request("cross_attention_states: tokens per tile must be positive"));
    }
    if states.is_empty() || !states.len().is_multiple_of(tokens_per_tile * hidden) {
        return Err(Error::request(format!(
            "cross_attention_states: {} values is not a positive multiple of tokens per tile {tokens_per_tile} x hidden {hidden}",
            states.len()
        )));
    }
    let rows = states.len() / hidden;
    let mut kv = vec![0.0f32; rows * 2 * kv_dim];
    linear_weight(states, &layer.wkv, rows, hidden, 2 * kv_dim, &mut kv);
    let mut k = Vec::with_capacity(rows * kv_dim);
    let mut v = Vec::with_capacity(rows * kv_dim);
    for r in kv.chunks(2 * kv_dim) {
        k.extend_from_slice(&r[..kv_dim]);
        v.extend_from_slice(&r[kv_dim..]);
    }
    let raw = k.clone();
    rms_norm(&raw, &layer.k_norm, c.rms_norm_eps, c.head_dim, &mut k);
    Ok(CrossKv { k, v, kv_dim, tokens_per_tile })
}

/// The cross-attention block of a layer before its gate: `o_proj(attention(q_norm(h @ Wq^T), kv))` for
/// normalized text rows `h` `[rows, hidden]`, returned as `[rows, hidden]`. `mask` is `[rows, kv.tiles()]`
/// (see the module docs for rows that see nothing); `None` attends to everything.
pub fn cross_attention(
    layer: &CrossAttentionLayerWeights,
    cfg: &MllamaTextConfig,
    h: &[f32],
    kv: &CrossKv,
    mask: Option<&[u8]>,
) -> Result<Vec<f32>> {
    let c = &cfg.base;
    let (hidden, q_dim, head_dim) = (c.hidden_size, c.q_dim(), c.head_dim);
    let (heads, group) = (c.num_attention_heads, c.gqa_group());
    if !h.len().is_multiple_of(hidden) {
        return Err(Error::request(format!(
            "cross attention: {} input values is not a multiple of hidden {hidden}",
            h.len()
        )));
    }
    let rows = h.len() / hidden;
    let tiles = kv.tiles();
    if let Some(m) = mask {
        if m.len() != rows * tiles {
            return Err(Error::request(format!(
                "cross attention: mask has {} values, expected {rows} rows x {tiles} (image, tile) blocks",
                m.len()
            )));
        }
    }
    if kv.kv_dim != c.kv_dim() {
        return Err(Error::request(format!(
            "cross attention: K/V width {} but the model has {}",
            kv.kv_dim,
            c.kv_dim()
        )));
    }
    let mut q = vec![0.0f32; rows * q_dim];
    linear_weight(h, &layer.wq, rows, hidden, q_dim, &mut q);
    let raw = q.clone();
    rms_norm(&raw, &layer.q_norm, c.rms_norm_eps, head_dim, &mut q);

    let (n, tpt, kv_dim) = (kv.tokens(), kv.tokens_per_tile, kv.kv_dim);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut attn = vec![0.0f32; rows * q_dim];
    attn.par_chunks_mut(head_dim).enumerate().for_each(|(task, o)| {
        let (i, hd) = (task / heads, task % heads);
        let qv = &q[i * q_dim + hd * head_dim..][..head_dim];
        let koff = (hd / group) * head_dim;
        // Rows that see no tile keep no mask at all (transformers multiplies their additive mask by 0).
        let row = mask.map(|m| &m[i * tiles..(i + 1) * tiles]).filter(|r| row_sees_image(r));
        let allowed = |j: usize| row.is_none_or(|r| r[j / tpt] == 1);
        let mut scores = vec![f32::NEG_INFINITY; n];
        for (j, s) in scores.iter_mut().enumerate() {
            if allowed(j) {
                let kr = &kv.k[j * kv_dim + koff..][..head_dim];
                *s = qv.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale;
            }
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for s in scores.iter_mut() {
            *s = if *s == f32::NEG_INFINITY { 0.0 } else { (*s - max).exp() };
            sum += *s;
        }
        o.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            if p != 0.0 {
                let vr = &kv.v[j * kv_dim + koff..][..head_dim];
                for (acc, &x) in o.iter_mut().zip(vr) {
                    *acc += p * x;
                }
            }
        }
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|x| *x *= inv);
    });
    let mut out = vec![0.0f32; rows * hidden];
    linear_weight(&attn, &layer.wo, rows, q_dim, hidden, &mut out);
    Ok(out)
}

/// `down(silu(h @ Wgate^T) * (h @ Wup^T))` for `[rows, hidden]` input.
pub(crate) fn mlp(cfg: &MllamaTextConfig, w_gate_up: &LinearWeight, w_down: &LinearWeight, h: &[f32]) -> Vec<f32> {
    let (hidden, inter) = (cfg.base.hidden_size, cfg.base.intermediate_size);
    let rows = h.len() / hidden;
    let mut gate_up = vec![0.0f32; rows * 2 * inter];
    linear_weight(h, w_gate_up, rows, hidden, 2 * inter, &mut gate_up);
    let mut act = vec![0.0f32; rows * inter];
    silu_mul(&gate_up, inter, &mut act);
    let mut out = vec![0.0f32; rows * hidden];
    linear_weight(&act, w_down, rows, inter, hidden, &mut out);
    out
}

/// One gated cross-attention decoder layer applied in place to the residual stream `x` `[rows, hidden]`
/// (transformers' `MllamaCrossAttentionDecoderLayer`); `mask` as in [`cross_attention`].
pub fn cross_attention_decoder_layer(
    layer: &CrossAttentionLayerWeights,
    cfg: &MllamaTextConfig,
    x: &mut [f32],
    kv: &CrossKv,
    mask: Option<&[u8]>,
) -> Result<()> {
    cross_attention_decoder_layer_reduced(layer, cfg, x, kv, mask, &mut |_| Ok(()))
}

/// [`cross_attention_decoder_layer`] for a tensor-parallel rank holding a shard of the layer (`cfg` is the rank's
/// config: its heads and MLP width): `reduce` sums a `[rows, hidden]` partial result over the ranks in place, and
/// is called on the `o_proj` output and on the `down_proj` output, before each gate is applied. With a no-op
/// `reduce` this is exactly [`cross_attention_decoder_layer`].
pub fn cross_attention_decoder_layer_reduced(
    layer: &CrossAttentionLayerWeights,
    cfg: &MllamaTextConfig,
    x: &mut [f32],
    kv: &CrossKv,
    mask: Option<&[u8]>,
    reduce: &mut dyn FnMut(&mut [f32]) -> Result<()>,
) -> Result<()> {
    let (hidden, eps) = (cfg.base.hidden_size, cfg.base.rms_norm_eps);
    let mut h = vec![0.0f32; x.len()];
    rms_norm(x, &layer.attn_norm, eps, hidden, &mut h);
    let mut attn = cross_attention(layer, cfg, &h, kv, mask)?;
    reduce(&mut attn)?;
    let gate = layer.attn_gate.tanh();
    for (xv, &a) in x.iter_mut().zip(&attn) {
        *xv += gate * a;
    }
    rms_norm(x, &layer.mlp_norm, eps, hidden, &mut h);
    let mut m = mlp(cfg, &layer.w_gate_up, &layer.w_down, &h);
    reduce(&mut m)?;
    let gate = layer.mlp_gate.tanh();
    let tiles = kv.tiles();
    for (i, (xr, mr)) in x.chunks_mut(hidden).zip(m.chunks(hidden)).enumerate() {
        let keep = mask.is_none_or(|m| row_sees_image(&m[i * tiles..(i + 1) * tiles]));
        let row_mask = if keep { 1.0 } else { 0.0 };
        for (xv, &mv) in xr.iter_mut().zip(mr) {
            *xv += gate * (row_mask * mv);
        }
    }
    Ok(())
}

/// One Llama self-attention decoder layer applied in place to `x` `[rows, hidden]` for tokens at positions
/// `start..start + rows`, whose RoPE-rotated keys and values are appended to the dense caches `k_cache` /
/// `v_cache` (`[start, kv_dim]` on entry, so the rows attend causally to everything cached before them).
#[allow(clippy::too_many_arguments)]
pub fn self_attention_decoder_layer(
    layer: &LayerWeights,
    cfg: &MllamaTextConfig,
    inv_freq: &[f32],
    x: &mut [f32],
    start: usize,
    k_cache: &mut Vec<f32>,
    v_cache: &mut Vec<f32>,
) -> Result<()> {
    let c = &cfg.base;
    let (hidden, q_dim, kv_dim, eps) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.rms_norm_eps);
    let rows = x.len() / hidden;
    if k_cache.len() != start * kv_dim || v_cache.len() != start * kv_dim {
        return Err(Error::request(format!(
            "self attention: caches hold {} / {} values, expected {start} tokens x {kv_dim}",
            k_cache.len(),
            v_cache.len()
        )));
    }
    let stride = q_dim + 2 * kv_dim;
    let mut h = vec![0.0f32; x.len()];
    rms_norm(x, &layer.attn_norm, eps, hidden, &mut h);
    let mut qkv = vec![0.0f32; rows * stride];
    linear_weight(&h, &layer.wqkv, rows, hidden, stride, &mut qkv);
    let positions: Vec<u32> = (start..start + rows).map(|p| p as u32).collect();
    // k's heads follow q's in each row, so both rotate as one block of heads.
    rope(&mut qkv, stride, c.num_attention_heads + c.num_key_value_heads, c.head_dim, &positions, inv_freq);
    for r in qkv.chunks(stride) {
        k_cache.extend_from_slice(&r[q_dim..q_dim + kv_dim]);
        v_cache.extend_from_slice(&r[q_dim + kv_dim..]);
    }
    // The dense cache is one block holding the whole sequence.
    let layout = PagedLayout {
        num_heads: c.num_attention_heads,
        num_kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        block_size: start + rows,
    };
    let seq_of_token = vec![0u32; rows];
    let batch = AttentionBatch {
        seq_of_token: &seq_of_token,
        positions: &positions,
        block_tables: &[0],
        max_blocks_per_seq: 1,
    };
    let mut attn = vec![0.0f32; rows * q_dim];
    paged_attention(&layout, &qkv, stride, &batch, k_cache, v_cache, &mut attn);
    let mut o = vec![0.0f32; rows * hidden];
    linear_weight(&attn, &layer.wo, rows, q_dim, hidden, &mut o);
    add_rms_norm(x, &o, &layer.mlp_norm, eps, hidden, &mut h);
    let m = mlp(cfg, &layer.w_gate_up, &layer.w_down, &h);
    for (xv, &mv) in x.iter_mut().zip(&m) {
        *xv += mv;
    }
    Ok(())
}

/// Per-layer state of one sequence.
#[derive(Clone, Debug)]
enum LayerCache {
    /// Rotated keys and values of every token so far, `[len, kv_dim]` each.
    SelfAttention { k: Vec<f32>, v: Vec<f32> },
    /// The images' K/V; `None` while the sequence has no image (the layer is skipped).
    CrossAttention(Option<CrossKv>),
}

/// Everything one sequence carries between [`text_step`] calls: the self-attention K/V of the tokens so far and
/// each cross-attention layer's image K/V.
#[derive(Clone, Debug)]
pub struct TextCache {
    layers: Vec<LayerCache>,
    len: usize,
    num_images: usize,
    inv_freq: Vec<f32>,
}

impl TextCache {
    /// An empty cache without images (cross-attention layers are skipped until [`add_image`](Self::add_image)).
    /// Fails if `w` does not have `cfg`'s shapes.
    pub fn new(w: &TextWeights, cfg: &MllamaTextConfig) -> Result<Self> {
        check_weights(w, cfg)?;
        let layers = w
            .layers
            .iter()
            .map(|l| match l {
                TextLayerWeights::SelfAttention(_) => LayerCache::SelfAttention { k: Vec::new(), v: Vec::new() },
                TextLayerWeights::CrossAttention(_) => LayerCache::CrossAttention(None),
            })
            .collect();
        let inv_freq = cfg.base.rope.inv_freq(cfg.base.head_dim);
        Ok(TextCache { layers, len: 0, num_images: 0, inv_freq })
    }

    /// Adds one image's projected vision states, `[max_num_tiles * num_patches, hidden]` (the image's slice of the
    /// projector output, padding tiles included): computes every cross-attention layer's K/V for it ([`cross_kv`])
    /// and appends them after the earlier images'.
    pub fn add_image(&mut self, w: &TextWeights, cfg: &MllamaConfig, image_states: &[f32]) -> Result<()> {
        let want = cfg.vision_tokens_per_image() * cfg.text.base.hidden_size;
        if image_states.len() != want {
            return Err(Error::request(format!(
                "cross_attention_states: image {} has {} values, expected max_num_tiles {} x num_patches {} x hidden {} = {want}",
                self.num_images,
                image_states.len(),
                cfg.vision.max_num_tiles,
                cfg.vision.num_patches(),
                cfg.text.base.hidden_size
            )));
        }
        let tpt = cfg.vision.num_patches();
        let new: Vec<Option<CrossKv>> = w
            .layers
            .par_iter()
            .map(|l| match l {
                TextLayerWeights::CrossAttention(cl) => cross_kv(cl, &cfg.text, image_states, tpt).map(Some),
                TextLayerWeights::SelfAttention(_) => Ok(None),
            })
            .collect::<Result<_>>()?;
        for (slot, kv) in self.layers.iter_mut().zip(new) {
            if let (LayerCache::CrossAttention(cur), Some(kv)) = (slot, kv) {
                match cur {
                    Some(c) => c.append(&kv)?,
                    None => *cur = Some(kv),
                }
            }
        }
        self.num_images += 1;
        Ok(())
    }

    /// Text tokens processed so far (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no text token has been processed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Images added.
    pub fn num_images(&self) -> usize {
        self.num_images
    }

    /// The K/V of cross-attention layer `layer`, if it is one and the sequence has images.
    pub fn cross_kv(&self, layer: usize) -> Option<&CrossKv> {
        match self.layers.get(layer) {
            Some(LayerCache::CrossAttention(kv)) => kv.as_ref(),
            _ => None,
        }
    }
}

/// Checks that `w` has the shapes of `cfg` (layer kinds in the right places included).
fn check_weights(w: &TextWeights, cfg: &MllamaTextConfig) -> Result<()> {
    let c = &cfg.base;
    let (h, q, kv, i, d) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size, c.head_dim);
    let mut bad: Vec<String> = Vec::new();
    fn expect(bad: &mut Vec<String>, name: String, got: usize, want: usize) {
        if got != want {
            bad.push(format!("{name} has {got} values, expected {want}"));
        }
    }
    expect(&mut bad, "embed".into(), w.embed.len(), cfg.embed_rows() * h);
    expect(&mut bad, "final_norm".into(), w.final_norm.len(), h);
    expect(&mut bad, "lm_head".into(), w.lm_head.len(), c.vocab_size * h);
    if w.layers.len() != c.num_hidden_layers {
        bad.push(format!("{} layers, expected {}", w.layers.len(), c.num_hidden_layers));
    }
    for (l, layer) in w.layers.iter().enumerate() {
        match layer {
            TextLayerWeights::SelfAttention(s) => {
                if cfg.is_cross_attention_layer(l) {
                    bad.push(format!("layer {l} is a self-attention layer, expected cross-attention"));
                }
                expect(&mut bad, format!("layer {l} attn_norm"), s.attn_norm.len(), h);
                expect(&mut bad, format!("layer {l} wqkv"), s.wqkv.len(), (q + 2 * kv) * h);
                expect(&mut bad, format!("layer {l} wo"), s.wo.len(), h * q);
                expect(&mut bad, format!("layer {l} mlp_norm"), s.mlp_norm.len(), h);
                expect(&mut bad, format!("layer {l} w_gate_up"), s.w_gate_up.len(), 2 * i * h);
                expect(&mut bad, format!("layer {l} w_down"), s.w_down.len(), h * i);
            }
            TextLayerWeights::CrossAttention(x) => {
                if !cfg.is_cross_attention_layer(l) {
                    bad.push(format!("layer {l} is a cross-attention layer, expected self-attention"));
                }
                expect(&mut bad, format!("layer {l} attn_norm"), x.attn_norm.len(), h);
                expect(&mut bad, format!("layer {l} wq"), x.wq.len(), q * h);
                expect(&mut bad, format!("layer {l} wkv"), x.wkv.len(), 2 * kv * h);
                expect(&mut bad, format!("layer {l} wo"), x.wo.len(), h * q);
                expect(&mut bad, format!("layer {l} q_norm"), x.q_norm.len(), d);
                expect(&mut bad, format!("layer {l} k_norm"), x.k_norm.len(), d);
                expect(&mut bad, format!("layer {l} mlp_norm"), x.mlp_norm.len(), h);
                expect(&mut bad, format!("layer {l} w_gate_up"), x.w_gate_up.len(), 2 * i * h);
                expect(&mut bad, format!("layer {l} w_down"), x.w_down.len(), h * i);
            }
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Error::weights("<mllama text weights>", format!("weights do not match the config: {}", bad.join("; "))))
    }
}

/// Runs `ids` (the sequence's next tokens, at positions `cache.len()..`) through the decoder, updates `cache`
/// and returns their logits `[ids.len(), vocab_size]`.
///
/// `mask` holds the tokens' cross-attention mask rows, `[ids.len(), images * max_tiles]` (for generated tokens,
/// copies of the prompt's last row); `None` lets every token attend to every vision token. Without images in the
/// cache, the cross-attention layers are skipped and `mask` must be `None` or empty.
pub fn text_step(
    w: &TextWeights,
    cfg: &MllamaTextConfig,
    cache: &mut TextCache,
    ids: &[u32],
    mask: Option<&[u8]>,
) -> Result<Vec<f32>> {
    let c = &cfg.base;
    let hidden = c.hidden_size;
    if ids.is_empty() {
        return Err(Error::request("input_ids: no tokens"));
    }
    if cache.layers.len() != w.layers.len() {
        return Err(Error::request("text cache: built for another model"));
    }
    let rows = cfg.embed_rows();
    if let Some((p, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= rows) {
        return Err(Error::request(format!(
            "input_ids[{p}] = {id} is out of range (embedding table has {rows} rows: vocab_size {} + 8)",
            c.vocab_size
        )));
    }
    let start = cache.len;
    if start + ids.len() > c.max_position_embeddings {
        return Err(Error::request(format!(
            "sequence of {} tokens exceeds max_position_embeddings {}",
            start + ids.len(),
            c.max_position_embeddings
        )));
    }
    if let Some(m) = mask {
        let tiles = cache.layers.iter().find_map(|l| match l {
            LayerCache::CrossAttention(Some(kv)) => Some(kv.tiles()),
            _ => None,
        });
        let per_row = tiles.unwrap_or(0);
        if m.len() != ids.len() * per_row {
            return Err(Error::request(format!(
                "cross_attention_mask: {} values for {} tokens, expected {} per token ({} image(s) in the cache)",
                m.len(),
                ids.len(),
                per_row,
                cache.num_images
            )));
        }
        if let Some(p) = m.iter().position(|&v| v > 1) {
            return Err(Error::request(format!("cross_attention_mask: value {} at index {p} is not 0 or 1", m[p])));
        }
    }
    let mut x = vec![0.0f32; ids.len() * hidden];
    embed(&w.embed, hidden, ids, &mut x);
    for (layer, slot) in w.layers.iter().zip(cache.layers.iter_mut()) {
        match (layer, slot) {
            (TextLayerWeights::SelfAttention(lw), LayerCache::SelfAttention { k, v }) => {
                self_attention_decoder_layer(lw, cfg, &cache.inv_freq, &mut x, start, k, v)?
            }
            (TextLayerWeights::CrossAttention(cw), LayerCache::CrossAttention(Some(kv))) => {
                cross_attention_decoder_layer(cw, cfg, &mut x, kv, mask)?
            }
            (TextLayerWeights::CrossAttention(_), LayerCache::CrossAttention(None)) => {}
            _ => return Err(Error::request("text cache: layer kinds do not match the weights")),
        }
    }
    cache.len += ids.len();
    let mut h = vec![0.0f32; x.len()];
    rms_norm(&x, &w.final_norm, c.rms_norm_eps, hidden, &mut h);
    let mut logits = vec![0.0f32; ids.len() * c.vocab_size];
    linear(&h, &w.lm_head, ids.len(), hidden, c.vocab_size, &mut logits);
    Ok(logits)
}

/// Logits `[input_ids.len(), vocab_size]` of a whole sequence in one pass, as transformers'
/// `MllamaForConditionalGeneration` computes them from `cross_attention_states` (the projector output,
/// `[images * max_num_tiles, num_patches, hidden]` flattened) and the processor's `cross_attention_mask`.
///
/// Without states the cross-attention layers are skipped (a mask, if given, must then have no images). With
/// states, the mask (if given) must have one row per token, `cfg.vision.max_num_tiles` tiles and as many images
/// as the states hold.
pub fn text_forward(
    w: &TextWeights,
    cfg: &MllamaConfig,
    input_ids: &[u32],
    cross_attention_states: Option<&[f32]>,
    cross_attention_mask: Option<&CrossAttentionMask>,
) -> Result<Vec<f32>> {
    let mut cache = TextCache::new(w, &cfg.text)?;
    if let Some(m) = cross_attention_mask {
        if m.tokens() != input_ids.len() {
            return Err(Error::request(format!(
                "cross_attention_mask has {} rows but there are {} input ids",
                m.tokens(),
                input_ids.len()
            )));
        }
        if m.num_images() > 0 && m.max_tiles() != cfg.vision.max_num_tiles {
            return Err(Error::request(format!(
                "cross_attention_mask has {} tiles per image, expected vision_config.max_num_tiles {}",
                m.max_tiles(),
                cfg.vision.max_num_tiles
            )));
        }
    }
    let per_image = cfg.vision_tokens_per_image() * cfg.text.base.hidden_size;
    match cross_attention_states {
        None => {
            if let Some(m) = cross_attention_mask.filter(|m| m.num_images() > 0) {
                return Err(Error::request(format!(
                    "cross_attention_mask covers {} image(s) but no cross_attention_states were given",
                    m.num_images()
                )));
            }
            text_step(w, &cfg.text, &mut cache, input_ids, None)
        }
        Some(states) => {
            if states.is_empty() || states.len() % per_image != 0 {
                return Err(Error::request(format!(
                    "cross_attention_states: {} values is not a positive multiple of one image's {per_image} \
                     (max_num_tiles {} x num_patches {} x hidden {})",
                    states.len(),
                    cfg.vision.max_num_tiles,
                    cfg.vision.num_patches(),
                    cfg.text.base.hidden_size
                )));
            }
            let images = states.len() / per_image;
            if let Some(m) = cross_attention_mask {
                if m.num_images() != images {
                    return Err(Error::request(format!(
                        "cross_attention_mask covers {} image(s) but cross_attention_states hold {images}",
                        m.num_images()
                    )));
                }
            }
            for image in states.chunks(per_image) {
                cache.add_image(w, cfg, image)?;
            }
            text_step(w, &cfg.text, &mut cache, input_ids, cross_attention_mask.map(|m| m.data()))
        }
    }
}
