//! CPU twins of the vision kernels in [`crate::ops::cuda::vision`], f32, with the same arguments (host slices for
//! device buffers). The GPU tests run both on the same inputs. LayerNorm and GELU reuse
//! [`crate::vision::encoder::layer_norm`] and [`crate::vision::encoder::gelu`].

use crate::ops::cuda::vision::{BiasAct, EmbedShape, GatherAttnShape, GatherShape, Im2colShape};
use crate::vision::encoder::{gelu, layer_norm};
use crate::vision::weights::LayerNormWeights;

/// Twin of [`crate::ops::cuda::vision::im2col`]: `[tiles * grid, k_pad]`.
pub fn im2col(s: &Im2colShape, pixels: &[f32]) -> Vec<f32> {
    let per_side = s.side / s.patch;
    let grid = per_side * per_side;
    let pdim = s.channels * s.patch * s.patch;
    let mut out = vec![0.0f32; s.tiles * grid * s.k_pad];
    for (r, row) in out.chunks_mut(s.k_pad).enumerate() {
        let (tile, cell) = (r / grid, r % grid);
        let (py, px) = (cell / per_side, cell % per_side);
        for (col, o) in row[..pdim].iter_mut().enumerate() {
            let (c, ky, kx) = (col / (s.patch * s.patch), col / s.patch % s.patch, col % s.patch);
            *o = pixels[((tile * s.channels + c) * s.side + py * s.patch + ky) * s.side + px * s.patch + kx];
        }
    }
    out
}

/// Twin of [`crate::ops::cuda::vision::embed`]: `[images * tiles * padded, hidden]`. `tile_position` is the
/// bf16 table widened to f32.
#[allow(clippy::too_many_arguments)]
pub fn embed(
    s: &EmbedShape,
    conv: &[f32],
    class_embedding: &[f32],
    pre_add: &[f32],
    position: &[f32],
    tile_position: &[f32],
    ar_ids: &[u32],
    ln: &LayerNormWeights,
    pos_gate: f32,
    eps: f32,
) -> Vec<f32> {
    let h = s.hidden;
    let grid = s.num_patches - 1;
    let mut tokens = vec![0.0f32; s.images * s.tiles * s.num_patches * h];
    for (t, row) in tokens.chunks_mut(h).enumerate() {
        let (it, p) = (t / s.num_patches, t % s.num_patches);
        let (image, tile) = (it / s.tiles, it % s.tiles);
        let ar = ar_ids[image] as usize;
        let tp = &tile_position[((ar * s.tiles + tile) * s.num_patches + p) * h..][..h];
        for c in 0..h {
            let x = if p == 0 { class_embedding[c] } else { conv[(it * grid + p - 1) * h + c] + pre_add[it * h + c] };
            row[c] = (x + position[p * h + c]) + pos_gate * tp[c];
        }
    }
    let mut normed = vec![0.0f32; tokens.len()];
    layer_norm(&tokens, ln, eps, h, &mut normed);
    let mut out = vec![0.0f32; s.images * s.tiles * s.padded * h];
    for (it, src) in normed.chunks(s.num_patches * h).enumerate() {
        out[it * s.padded * h..][..src.len()].copy_from_slice(src);
    }
    out
}

/// A gated residual delta: `(delta, optional bias, gate)`.
pub type GatedDelta<'a> = (&'a [f32], Option<&'a [f32]>, f32);

/// Twin of [`crate::ops::cuda::vision::layer_norm`]: updates `residual` (when `delta` is given) and returns the
/// normalized rows (plus `post_add[r / rows_per_group]` when given).
pub fn layer_norm_residual(
    residual: &mut [f32],
    delta: Option<GatedDelta<'_>>,
    ln: &LayerNormWeights,
    eps: f32,
    post_add: Option<(&[f32], usize)>,
) -> Vec<f32> {
    let w = ln.weight.len();
    if let Some((d, bias, gate)) = delta {
        for (row, drow) in residual.chunks_mut(w).zip(d.chunks(w)) {
            for c in 0..w {
                let dv = drow[c] + bias.map_or(0.0, |b| b[c]);
                row[c] += gate * dv;
            }
        }
    }
    let mut out = vec![0.0f32; residual.len()];
    layer_norm(residual, ln, eps, w, &mut out);
    if let Some((add, per)) = post_add {
        for (r, row) in out.chunks_mut(w).enumerate() {
            for (o, a) in row.iter_mut().zip(&add[(r / per) * w..][..w]) {
                *o += a;
            }
        }
    }
    out
}

/// Twin of [`crate::ops::cuda::vision::bias_act`] (in place over `[rows, bias.len()]`).
pub fn bias_act(x: &mut [f32], bias: &[f32], act: BiasAct) {
    for row in x.chunks_mut(bias.len()) {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v = match act {
                BiasAct::None => *v + b,
                BiasAct::Gelu => gelu(*v + b),
            };
        }
    }
}

/// Twin of [`crate::ops::cuda::vision::gather_output`].
pub fn gather_output(s: &GatherShape, final_state: &[f32], inter: &[f32]) -> Vec<f32> {
    let width = s.hidden * (1 + s.n_inter);
    let rows_in = s.tiles_total * s.padded;
    let mut out = vec![0.0f32; s.tiles_total * s.num_patches * width];
    for (t, o) in out.chunks_mut(width).enumerate() {
        let src = (t / s.num_patches) * s.padded + t % s.num_patches;
        o[..s.hidden].copy_from_slice(&final_state[src * s.hidden..][..s.hidden]);
        for k in 0..s.n_inter {
            for d in 0..s.hidden {
                o[s.hidden + d * s.n_inter + k] = inter[(k * rows_in + src) * s.hidden + d];
            }
        }
    }
    out
}

/// Twin of [`crate::ops::cuda::vision::gated_rms_norm`] in f32 (no bf16 rounding): `residual += gate * scale *
/// delta`, returns `rms_norm(residual) * weight`.
pub fn gated_rms_norm(
    residual: &mut [f32],
    delta: &[f32],
    row_scale: Option<&[f32]>,
    gate: f32,
    weight: &[f32],
    eps: f32,
) -> Vec<f32> {
    let h = weight.len();
    let mut out = vec![0.0f32; residual.len()];
    for (r, ((row, d), o)) in residual.chunks_mut(h).zip(delta.chunks(h)).zip(out.chunks_mut(h)).enumerate() {
        let g = gate * row_scale.map_or(1.0, |s| s[r]);
        for (x, &dv) in row.iter_mut().zip(d) {
            *x += g * dv;
        }
        let ms = row.iter().map(|&v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &x), &w) in o.iter_mut().zip(row.iter()).zip(weight) {
            *o = w * (x * inv);
        }
    }
    out
}

/// Twin of [`crate::ops::cuda::vision::gather_attention`]: `out` rows `[tokens, out_stride]` (only each query's
/// heads are written). `flags` is `(query_flags, key_flags)`.
#[allow(clippy::too_many_arguments)]
pub fn gather_attention(
    s: &GatherAttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seq_of_query: &[u32],
    positions: &[u32],
    block_tables: &[u32],
    flags: Option<(&[u8], &[u8])>,
    out: &mut [f32],
) {
    let hd = s.head_dim;
    let group = s.num_heads / s.num_kv_heads;
    let slots = (k.len() + s.kv_stride - s.num_kv_heads * hd) / s.kv_stride;
    for (i, (&seq, &pos)) in seq_of_query.iter().zip(positions).enumerate() {
        let table = &block_tables[seq as usize * s.max_blocks_per_seq..][..s.max_blocks_per_seq];
        let ctx = pos as usize + 1;
        let keys: Vec<usize> = (0..ctx)
            .map(|j| table[j / s.block_size] as usize * s.block_size + j % s.block_size)
            .filter(|&slot| slot < slots)
            .collect();
        for h in 0..s.num_heads {
            let g = h / group;
            let qv = &q[i * s.q_stride + h * hd..][..hd];
            let q_flag = flags.is_some_and(|(qf, _)| qf[i] != 0);
            let scores: Vec<f32> = keys
                .iter()
                .map(|&slot| {
                    let kr = &k[slot * s.kv_stride + g * hd..][..hd];
                    let mut sc = qv.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * s.scale;
                    if q_flag && flags.is_some_and(|(_, kf)| kf[slot] != 0) {
                        sc += f32::MIN;
                    }
                    sc
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let p: Vec<f32> = scores.iter().map(|&x| (x - max).exp()).collect();
            let sum: f32 = p.iter().sum();
            let o = &mut out[i * s.out_stride + h * hd..][..hd];
            o.fill(0.0);
            for (&slot, &pj) in keys.iter().zip(&p) {
                let vr = &v[slot * s.kv_stride + g * hd..][..hd];
                for (x, &vv) in o.iter_mut().zip(vr) {
                    *x += pj / sum * vv;
                }
            }
        }
    }
}
