//! CPU reference forward of the Llama 3.2 Vision encoder (transformers' `MllamaVisionModel`) and of the
//! `multi_modal_projector`, f32 throughout.
//!
//! The order of operations follows transformers 5.24 (`modeling_mllama.py`), per image:
//! 1. each tile's patches through the patch-embedding convolution (no bias), plus the pre-tile embedding of the
//!    image's aspect ratio scaled by `tanh(pre_tile_gate)`;
//! 2. the class token in front of each tile's patches, then the position embedding scaled by `1 - tanh(gate)` and
//!    the aspect ratio's tile position embedding scaled by `tanh(gate)`;
//! 3. `layernorm_pre` (epsilon 1e-5), then each tile padded with zero tokens to a multiple of 8;
//! 4. the local encoder over all tiles of the image at once (`tiles * padded_patches` tokens), keeping the outputs
//!    of the layers in `intermediate_layers_indices`;
//! 5. `layernorm_post`, the post-tile embedding scaled by `tanh(post_tile_gate)`, and the gated global encoder;
//! 6. the padding tokens dropped and, per token, the final state concatenated with the intermediate states.
//!    transformers stacks those on a new last axis, so that part is interleaved: column `hidden + d * n + k` holds
//!    feature `d` of the `k`-th intermediate layer (`n` of them).
//!
//! # Attention mask
//! Both encoders use transformers' `_prepare_aspect_ratio_attention_mask`: a token is *flagged* when its tile is a
//! padding tile (`aspect_ratio_mask` 0) or it is a padding token. The additive mask of query `i` and key `j` is
//! `f32::MIN` when both are flagged and 0 otherwise. So real tokens attend to every token of the image (padding
//! tiles and padding tokens included), flagged tokens attend to the real ones only, and in an image whose tiles
//! are all padding every logit is `f32::MIN` and the softmax is uniform. This module adds that mask to the logits
//! exactly as transformers does rather than skipping keys, so all these cases agree.

use rayon::prelude::*;

use super::config::{MllamaConfig, MllamaVisionConfig, VISION_OUTER_LAYERNORM_EPS};
use super::weights::{LayerNormWeights, MllamaWeights, VisionLayerWeights, VisionWeights};
use crate::ops::cpu::linear::linear;
use crate::{Error, Result};

/// Query rows per attention block: bounds the score matrix to `ATTN_BLOCK * tokens` floats per head.
const ATTN_BLOCK: usize = 256;

/// Rows per rayon task in the row-wise kernels.
const ROWS_PER_TASK: usize = 4;

/// Floats of [`vision_forward`]'s output for `num_images` images:
/// `num_images * max_num_tiles * num_patches * vision_output_dim`.
pub fn vision_output_len(cfg: &MllamaVisionConfig, num_images: usize) -> usize {
    num_images * cfg.max_num_tiles * cfg.num_patches() * cfg.vision_output_dim
}

/// Runs the vision encoder on `num_images` preprocessed images.
///
/// Inputs, as transformers' `MllamaImageProcessor` returns them with the batch folded into the images:
/// `pixel_values` `[num_images, max_num_tiles, num_channels, image_size, image_size]`, `aspect_ratio_ids`
/// `[num_images]` (0 ..= `max_aspect_ratio_id`, 0 meaning "no image") and `aspect_ratio_mask`
/// `[num_images, max_num_tiles]` (1 for a real tile, 0 for padding).
///
/// Returns `[num_images, max_num_tiles, num_patches, vision_output_dim]` (padding tokens removed, padding tiles
/// kept), transformers' `vision_model(...).last_hidden_state`. Errors name the input that does not fit `cfg` or
/// the weight that does not fit `cfg`.
pub fn vision_forward(
    w: &VisionWeights,
    cfg: &MllamaVisionConfig,
    pixel_values: &[f32],
    num_images: usize,
    aspect_ratio_ids: &[i64],
    aspect_ratio_mask: &[i64],
) -> Result<Vec<f32>> {
    check_config(cfg)?;
    check_weights(w, cfg)?;
    let tiles = cfg.max_num_tiles;
    let (side, channels) = (cfg.image_size, cfg.num_channels);
    let want = num_images * tiles * channels * side * side;
    if pixel_values.len() != want {
        return Err(Error::request(format!(
            "pixel_values has {} values, expected {want} = {num_images} images x {tiles} tiles x {channels} channels x \
             {side} x {side}",
            pixel_values.len()
        )));
    }
    if let Some(i) = pixel_values.iter().position(|v| !v.is_finite()) {
        return Err(Error::request(format!("pixel_values[{i}] is not finite ({})", pixel_values[i])));
    }
    if aspect_ratio_ids.len() != num_images {
        return Err(Error::request(format!(
            "aspect_ratio_ids has {} entries, expected one per image ({num_images})",
            aspect_ratio_ids.len()
        )));
    }
    let max_id = cfg.max_aspect_ratio_id();
    let mut ar_ids = Vec::with_capacity(num_images);
    for (i, &id) in aspect_ratio_ids.iter().enumerate() {
        match usize::try_from(id) {
            Ok(id) if id <= max_id => ar_ids.push(id),
            _ => {
                return Err(Error::request(format!(
                    "aspect_ratio_ids[{i}] = {id} is outside 0..={max_id} (the config's supported_aspect_ratios)"
                )))
            }
        }
    }
    if aspect_ratio_mask.len() != num_images * tiles {
        return Err(Error::request(format!(
            "aspect_ratio_mask has {} entries, expected {} = {num_images} images x {tiles} tiles",
            aspect_ratio_mask.len(),
            num_images * tiles
        )));
    }
    if let Some(i) = aspect_ratio_mask.iter().position(|&m| m != 0 && m != 1) {
        return Err(Error::request(format!(
            "aspect_ratio_mask[{}][{}] = {} (expected 0 or 1)",
            i / tiles,
            i % tiles,
            aspect_ratio_mask[i]
        )));
    }
    if num_images == 0 {
        return Ok(Vec::new());
    }

    let dim = cfg.hidden_size;
    let (np, padded) = (cfg.num_patches(), cfg.padded_patches());
    let seq = tiles * padded; // tokens per image in both encoders
    let rows = num_images * seq;

    // Steps 1-3: embeddings, layernorm_pre, padding.
    let mut h = embed(w, cfg, pixel_values, num_images, &ar_ids);
    // A token is flagged when its tile is padding or it is a padding token (see the module docs).
    let flagged: Vec<bool> = (0..rows)
        .map(|r| {
            let (image, tile, pos) = (r / seq, r % seq / padded, r % padded);
            aspect_ratio_mask[image * tiles + tile] == 0 || pos >= np
        })
        .collect();

    // Step 4: the local encoder, keeping the requested intermediate outputs.
    let n_inter = cfg.intermediate_layers_indices.len();
    let mut inter: Vec<Vec<f32>> = vec![Vec::new(); n_inter];
    for (l, lw) in w.layers.iter().enumerate() {
        encoder_layer(&mut h, lw, cfg, seq, &flagged);
        for (k, &idx) in cfg.intermediate_layers_indices.iter().enumerate() {
            if idx == l {
                inter[k] = h.clone();
            }
        }
    }

    // Step 5: layernorm_post, post-tile embedding, global encoder.
    let mut normed = vec![0.0f32; h.len()];
    layer_norm(&h, &w.layernorm_post, VISION_OUTER_LAYERNORM_EPS, dim, &mut normed);
    let mut h = normed;
    let post_gate = w.post_tile_gate.tanh();
    for (image, &ar) in ar_ids.iter().enumerate() {
        for tile in 0..tiles {
            let e = &w.post_tile_embedding[(ar * tiles + tile) * dim..][..dim];
            let scaled: Vec<f32> = e.iter().map(|&v| v * post_gate).collect();
            let start = (image * seq + tile * padded) * dim;
            for row in h[start..start + padded * dim].chunks_mut(dim) {
                for (x, &s) in row.iter_mut().zip(&scaled) {
                    *x += s;
                }
            }
        }
    }
    for lw in &w.global_layers {
        encoder_layer(&mut h, lw, cfg, seq, &flagged);
    }

    // Step 6: drop the padding tokens, concatenate the interleaved intermediate states.
    let out_dim = cfg.vision_output_dim;
    let mut out = vec![0.0f32; vision_output_len(cfg, num_images)];
    out.par_chunks_mut(out_dim).enumerate().for_each(|(t, o)| {
        let (image_tile, pos) = (t / np, t % np);
        let src = (image_tile * padded + pos) * dim;
        o[..dim].copy_from_slice(&h[src..src + dim]);
        for (k, states) in inter.iter().enumerate() {
            for d in 0..dim {
                o[dim + d * n_inter + k] = states[src + d];
            }
        }
    });
    Ok(out)
}

/// Applies `multi_modal_projector` (a linear layer with bias) to [`vision_forward`]'s output.
///
/// Returns `[num_images * max_num_tiles, num_patches, text hidden_size]`, the `cross_attention_states` that
/// transformers feeds to the text model's cross-attention layers.
pub fn project(w: &MllamaWeights, cfg: &MllamaConfig, vision_out: &[f32]) -> Result<Vec<f32>> {
    let (vdim, hidden) = (cfg.vision.vision_output_dim, cfg.text.base.hidden_size);
    let per_tile = cfg.vision.num_patches() * vdim;
    if per_tile == 0 || !vision_out.len().is_multiple_of(per_tile) {
        return Err(Error::request(format!(
            "vision output has {} values, not a whole number of tiles of {} patches x {vdim} (vision_output_dim)",
            vision_out.len(),
            cfg.vision.num_patches()
        )));
    }
    check_len("multi_modal_projector.weight", w.projector.len(), hidden * vdim)?;
    check_len("multi_modal_projector.bias", w.projector_bias.len(), hidden)?;
    let rows = vision_out.len() / vdim;
    let mut out = vec![0.0f32; rows * hidden];
    linear(vision_out, &w.projector, rows, vdim, hidden, &mut out);
    add_bias(&mut out, &w.projector_bias);
    Ok(out)
}

/// Exact GELU, `x / 2 * (1 + erf(x / sqrt(2)))` (transformers' `"gelu"`), evaluated in f64.
pub fn gelu(x: f32) -> f32 {
    let x = x as f64;
    let z = x * std::f64::consts::FRAC_1_SQRT_2;
    // 1 + erf(z) = erfc(-z); for negative inputs this keeps full relative precision in the tail.
    (0.5 * x * erfc(-z)) as f32
}

/// The error function, to about 1e-14 relative in f64.
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < ERF_SERIES_LIMIT { erf_series(a) } else { 1.0 - erfc_fraction(a) };
    r.copysign(x)
}

/// The complementary error function `1 - erf(x)`, accurate relative to its own value in both tails.
pub fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    let tail = if a < ERF_SERIES_LIMIT { 1.0 - erf_series(a) } else { erfc_fraction(a) };
    if x >= 0.0 {
        tail
    } else {
        2.0 - tail
    }
}

/// Below this the Maclaurin series of erf is used, above it the continued fraction of erfc.
const ERF_SERIES_LIMIT: f64 = 2.5;

/// `erf(a)` for `0 <= a < ERF_SERIES_LIMIT` from its Maclaurin series
/// `2/sqrt(pi) * sum_n (-1)^n a^(2n+1) / (n! (2n+1))`.
fn erf_series(a: f64) -> f64 {
    let a2 = a * a;
    let mut term = a; // (-1)^n a^(2n+1) / n!
    let mut sum = a;
    for n in 1..200 {
        term *= -a2 / n as f64;
        let add = term / (2 * n + 1) as f64;
        sum += add;
        if add.abs() <= 1e-17 * sum.abs() {
            break;
        }
    }
    sum * std::f64::consts::FRAC_2_SQRT_PI
}

/// `erfc(a)` for `a >= ERF_SERIES_LIMIT` from Laplace's continued fraction
/// `exp(-a^2)/sqrt(pi) / (a + (1/2)/(a + 1/(a + (3/2)/(a + ...))))`, evaluated from the tail.
fn erfc_fraction(a: f64) -> f64 {
    if a > 27.0 {
        return 0.0; // exp(-a^2) underflows
    }
    let mut f = a;
    for n in (1..=120).rev() {
        f = a + (n as f64 * 0.5) / f;
    }
    (-a * a).exp() / (f * std::f64::consts::PI.sqrt())
}

/// LayerNorm with bias over rows of `width`: `(x - mean) / sqrt(var + eps) * weight + bias` (biased variance,
/// statistics in f64).
pub fn layer_norm(x: &[f32], w: &LayerNormWeights, eps: f32, width: usize, out: &mut [f32]) {
    out.par_chunks_mut(width * ROWS_PER_TASK).zip(x.par_chunks(width * ROWS_PER_TASK)).for_each(|(o, xi)| {
        for (orow, xrow) in o.chunks_mut(width).zip(xi.chunks(width)) {
            let n = xrow.len() as f64;
            let mean = xrow.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = xrow.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for (((o, &v), &g), &b) in orow.iter_mut().zip(xrow).zip(&w.weight).zip(&w.bias) {
                *o = ((v as f64 - mean) * inv) as f32 * g + b;
            }
        }
    });
}

/// Steps 1-3 of the forward: `[num_images * tiles * padded_patches, hidden]` after `layernorm_pre`, padding rows 0.
fn embed(
    w: &VisionWeights,
    cfg: &MllamaVisionConfig,
    pixel_values: &[f32],
    num_images: usize,
    ar_ids: &[usize],
) -> Vec<f32> {
    let (dim, tiles, side, ps) = (cfg.hidden_size, cfg.max_num_tiles, cfg.image_size, cfg.patch_size);
    let (per_side, pdim) = (cfg.patches_per_side(), cfg.patch_dim());
    let (np, padded) = (cfg.num_patches(), cfg.padded_patches());
    let n_tiles = num_images * tiles;
    let grid = per_side * per_side;

    // The convolution as a product: each patch flattened in (channel, row, column) order.
    let mut patches = vec![0.0f32; n_tiles * grid * pdim];
    patches.par_chunks_mut(pdim).enumerate().for_each(|(r, p)| {
        let (tile, cell) = (r / grid, r % grid);
        let (py, px) = (cell / per_side, cell % per_side);
        let tile_px = &pixel_values[tile * cfg.num_channels * side * side..];
        for c in 0..cfg.num_channels {
            for ky in 0..ps {
                let src = c * side * side + (py * ps + ky) * side + px * ps;
                p[(c * ps + ky) * ps..][..ps].copy_from_slice(&tile_px[src..src + ps]);
            }
        }
    });
    let mut conv = vec![0.0f32; n_tiles * grid * dim];
    linear(&patches, &w.patch_embedding, n_tiles * grid, pdim, dim, &mut conv);
    drop(patches);

    let pre_gate = w.pre_tile_gate.tanh();
    let pos_gate = w.position_gate.tanh();
    let one_minus = 1.0 - pos_gate;
    // `(1 - tanh(gate)) * embedding`, as transformers scales the whole table first.
    let pos: Vec<f32> = w.position_embedding.iter().map(|&v| one_minus * v).collect();
    let mut tokens = vec![0.0f32; n_tiles * np * dim];
    tokens.par_chunks_mut(np * dim).enumerate().for_each(|(t, tok)| {
        let (image, tile) = (t / tiles, t % tiles);
        let ar = ar_ids[image];
        let pre = &w.pre_tile_embedding[(ar * tiles + tile) * dim..][..dim];
        let tile_pos = &w.tile_position_embedding[(ar * tiles + tile) * np * dim..][..np * dim];
        for (p, row) in tok.chunks_mut(dim).enumerate() {
            if p == 0 {
                row.copy_from_slice(&w.class_embedding);
            } else {
                let c = &conv[(t * grid + p - 1) * dim..][..dim];
                for ((x, &cv), &e) in row.iter_mut().zip(c).zip(pre) {
                    *x = cv + e * pre_gate;
                }
            }
            for ((x, &pe), &te) in row.iter_mut().zip(&pos[p * dim..]).zip(&tile_pos[p * dim..]) {
                *x = (*x + pe) + pos_gate * te;
            }
        }
    });
    drop(conv);

    let mut normed = vec![0.0f32; tokens.len()];
    layer_norm(&tokens, &w.layernorm_pre, VISION_OUTER_LAYERNORM_EPS, dim, &mut normed);
    let mut h = vec![0.0f32; n_tiles * padded * dim];
    for (t, src) in normed.chunks(np * dim).enumerate() {
        h[t * padded * dim..][..np * dim].copy_from_slice(src);
    }
    h
}

/// One encoder layer over `[images * seq, hidden]` in place: pre-LayerNorm attention and MLP, each residual
/// branch scaled by the tanh of its gate in global layers.
fn encoder_layer(h: &mut [f32], lw: &VisionLayerWeights, cfg: &MllamaVisionConfig, seq: usize, flagged: &[bool]) {
    let (dim, inter) = (cfg.hidden_size, cfg.intermediate_size);
    let rows = h.len() / dim;
    let mut x = vec![0.0f32; h.len()];

    layer_norm(h, &lw.attn_norm, cfg.norm_eps, dim, &mut x);
    let mut qkv = vec![0.0f32; rows * 3 * dim];
    linear(&x, &lw.wqkv, rows, dim, 3 * dim, &mut qkv);
    let attn = attention(&qkv, cfg, seq, flagged);
    drop(qkv);
    linear(&attn, &lw.wo, rows, dim, dim, &mut x);
    add_residual(h, &x, lw.gate_attn.map(f32::tanh));

    let mut y = vec![0.0f32; h.len()];
    layer_norm(h, &lw.mlp_norm, cfg.norm_eps, dim, &mut y);
    let mut mid = vec![0.0f32; rows * inter];
    linear(&y, &lw.fc1, rows, dim, inter, &mut mid);
    mid.par_chunks_mut(inter).for_each(|row| {
        for (v, &b) in row.iter_mut().zip(&lw.fc1_bias) {
            *v = gelu(*v + b);
        }
    });
    linear(&mid, &lw.fc2, rows, inter, dim, &mut y);
    add_bias(&mut y, &lw.fc2_bias);
    add_residual(h, &y, lw.gate_ffn.map(f32::tanh));
}

/// `h += gate * x` (or `h += x` without a gate), rounding the product first as transformers does.
fn add_residual(h: &mut [f32], x: &[f32], gate: Option<f32>) {
    match gate {
        Some(g) => h.par_iter_mut().zip(x).for_each(|(a, &b)| *a += g * b),
        None => h.par_iter_mut().zip(x).for_each(|(a, &b)| *a += b),
    }
}

/// Adds `bias` to every row of `x`.
fn add_bias(x: &mut [f32], bias: &[f32]) {
    x.par_chunks_mut(bias.len()).for_each(|row| {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    });
}

/// Non-causal multi-head attention within each image (`seq` tokens), with transformers' aspect-ratio mask (see
/// the module docs). `qkv` rows are `[q; k; v]`; returns `[rows, hidden]`.
fn attention(qkv: &[f32], cfg: &MllamaVisionConfig, seq: usize, flagged: &[bool]) -> Vec<f32> {
    let (dim, heads, hd) = (cfg.hidden_size, cfg.attention_heads, cfg.head_dim());
    let rows = qkv.len() / (3 * dim);
    let scale = (hd as f32).powf(-0.5);
    let mut out = vec![0.0f32; rows * dim];
    let mut q = vec![0.0f32; seq * hd];
    let mut k = vec![0.0f32; seq * hd];
    let mut vt = vec![0.0f32; hd * seq];
    let mut scores = vec![0.0f32; ATTN_BLOCK.min(seq) * seq];
    let mut ctx = vec![0.0f32; ATTN_BLOCK.min(seq) * hd];
    for image in 0..rows / seq {
        let base = image * seq;
        let flags = &flagged[base..base + seq];
        for head in 0..heads {
            for t in 0..seq {
                let row = &qkv[(base + t) * 3 * dim..][..3 * dim];
                q[t * hd..][..hd].copy_from_slice(&row[head * hd..][..hd]);
                k[t * hd..][..hd].copy_from_slice(&row[dim + head * hd..][..hd]);
                for d in 0..hd {
                    vt[d * seq + t] = row[2 * dim + head * hd + d];
                }
            }
            for start in (0..seq).step_by(ATTN_BLOCK) {
                let n = ATTN_BLOCK.min(seq - start);
                let s = &mut scores[..n * seq];
                linear(&q[start * hd..(start + n) * hd], &k, n, hd, seq, s);
                s.par_chunks_mut(seq).enumerate().for_each(|(i, row)| {
                    let masked_row = flags[start + i];
                    let mut max = f32::NEG_INFINITY;
                    for (v, &fk) in row.iter_mut().zip(flags) {
                        let m = if masked_row && fk { f32::MIN } else { 0.0 };
                        *v = *v * scale + m;
                        max = max.max(*v);
                    }
                    let mut sum = 0.0f32;
                    for v in row.iter_mut() {
                        *v = (*v - max).exp();
                        sum += *v;
                    }
                    let inv = 1.0 / sum;
                    for v in row.iter_mut() {
                        *v *= inv;
                    }
                });
                let c = &mut ctx[..n * hd];
                linear(s, &vt, n, seq, hd, c);
                for i in 0..n {
                    out[(base + start + i) * dim + head * hd..][..hd].copy_from_slice(&c[i * hd..][..hd]);
                }
            }
        }
    }
    out
}

fn check_len(name: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::weights("<vision weights>", format!("`{name}` has {got} values, expected {want}")));
    }
    Ok(())
}

/// The config invariants the forward relies on (the parser enforces them; a hand-built config may not).
fn check_config(cfg: &MllamaVisionConfig) -> Result<()> {
    let bad = |field: &str, msg: String| Err(Error::config("<vision config>", format!("vision_config.{field}"), msg));
    if cfg.hidden_size == 0 || cfg.attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.attention_heads) {
        return bad(
            "attention_heads",
            format!("{} heads must divide hidden_size {} (both non-zero)", cfg.attention_heads, cfg.hidden_size),
        );
    }
    if cfg.patch_size == 0 || cfg.patches_per_side() == 0 {
        return bad("patch_size", format!("{} does not fit image_size {}", cfg.patch_size, cfg.image_size));
    }
    if cfg.max_num_tiles == 0 || cfg.num_channels == 0 || cfg.intermediate_size == 0 {
        return bad("max_num_tiles", "max_num_tiles, num_channels and intermediate_size must be non-zero".into());
    }
    if let Some(&i) = cfg.intermediate_layers_indices.iter().find(|&&i| i >= cfg.num_hidden_layers) {
        return bad(
            "intermediate_layers_indices",
            format!("layer {i} does not exist (num_hidden_layers = {})", cfg.num_hidden_layers),
        );
    }
    let want = cfg.hidden_size * (1 + cfg.intermediate_layers_indices.len());
    if cfg.vision_output_dim != want {
        return bad(
            "vision_output_dim",
            format!("{} != hidden_size x (1 + intermediate layers) = {want}", cfg.vision_output_dim),
        );
    }
    Ok(())
}

/// Every weight length against `cfg`, so the kernels' shape assertions cannot fire.
fn check_weights(w: &VisionWeights, cfg: &MllamaVisionConfig) -> Result<()> {
    let (dim, inter, tiles, np) = (cfg.hidden_size, cfg.intermediate_size, cfg.max_num_tiles, cfg.num_patches());
    let ar_rows = cfg.max_aspect_ratio_id() + 1;
    let pv = "vision_model";
    check_len(&format!("{pv}.patch_embedding.weight"), w.patch_embedding.len(), dim * cfg.patch_dim())?;
    check_len(&format!("{pv}.class_embedding"), w.class_embedding.len(), dim)?;
    check_len(&format!("{pv}.gated_positional_embedding.embedding"), w.position_embedding.len(), np * dim)?;
    check_len(
        &format!("{pv}.gated_positional_embedding.tile_embedding.weight"),
        w.tile_position_embedding.len(),
        ar_rows * tiles * np * dim,
    )?;
    for (which, table) in [("pre", &w.pre_tile_embedding), ("post", &w.post_tile_embedding)] {
        let name = format!("{pv}.{which}_tile_positional_embedding.embedding.weight");
        check_len(&name, table.len(), ar_rows * tiles * dim)?;
    }
    let norm = |name: &str, n: &LayerNormWeights| -> Result<()> {
        check_len(&format!("{name}.weight"), n.weight.len(), dim)?;
        check_len(&format!("{name}.bias"), n.bias.len(), dim)
    };
    norm(&format!("{pv}.layernorm_pre"), &w.layernorm_pre)?;
    norm(&format!("{pv}.layernorm_post"), &w.layernorm_post)?;
    for (encoder, layers, n, gated) in [
        ("transformer", &w.layers, cfg.num_hidden_layers, false),
        ("global_transformer", &w.global_layers, cfg.num_global_layers, true),
    ] {
        if layers.len() != n {
            return Err(Error::weights(
                "<vision weights>",
                format!("{pv}.{encoder} has {} layers, the config says {n}", layers.len()),
            ));
        }
        for (l, lw) in layers.iter().enumerate() {
            let p = format!("{pv}.{encoder}.layers.{l}");
            norm(&format!("{p}.input_layernorm"), &lw.attn_norm)?;
            norm(&format!("{p}.post_attention_layernorm"), &lw.mlp_norm)?;
            check_len(&format!("{p}.self_attn.qkv (fused)"), lw.wqkv.len(), 3 * dim * dim)?;
            check_len(&format!("{p}.self_attn.o_proj.weight"), lw.wo.len(), dim * dim)?;
            check_len(&format!("{p}.mlp.fc1.weight"), lw.fc1.len(), inter * dim)?;
            check_len(&format!("{p}.mlp.fc1.bias"), lw.fc1_bias.len(), inter)?;
            check_len(&format!("{p}.mlp.fc2.weight"), lw.fc2.len(), dim * inter)?;
            check_len(&format!("{p}.mlp.fc2.bias"), lw.fc2_bias.len(), dim)?;
            if lw.gate_attn.is_some() != gated || lw.gate_ffn.is_some() != gated {
                let what = if gated { "needs" } else { "must not have" };
                return Err(Error::weights("<vision weights>", format!("{p} {what} gate_attn and gate_ffn")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        // Reference values from Python's math.erf / math.erfc.
        let cases = [
            (0.0, 0.0),
            (0.1, 0.1124629160182849),
            (0.5, 0.5204998778130465),
            (1.0, 0.8427007929497149),
            (2.0, 0.9953222650189527),
            (2.4999, 0.9995928300996666),
            (2.5, 0.999593047982555),
            (3.0, 0.9999779095030014),
        ];
        for (x, want) in cases {
            assert!((erf(x) - want).abs() <= 1e-14, "erf({x}) = {} != {want}", erf(x));
            assert!((erf(-x) + want).abs() <= 1e-14, "erf(-{x})");
        }
        for (x, want) in [(2.5, 4.069520174449589e-4), (3.0, 2.2090496998585438e-5), (5.0, 1.5374597944280351e-12)] {
            assert!(((erfc(x) - want) / want).abs() <= 1e-12, "erfc({x}) = {} != {want}", erfc(x));
        }
        assert_eq!(erfc(30.0), 0.0);
        assert_eq!(erfc(-30.0), 2.0);
    }

    #[test]
    fn gelu_values() {
        assert_eq!(gelu(0.0), 0.0);
        // gelu(1) = 0.5 * (1 + erf(1/sqrt 2)) = 0.8413447460685429
        assert!((gelu(1.0) - 0.841_344_8).abs() < 1e-7);
        assert!((gelu(-1.0) + 0.158_655_26).abs() < 1e-7);
        assert_eq!(gelu(50.0), 50.0);
        assert_eq!(gelu(-50.0), 0.0);
    }
}
