//! The Llama 3.2 Vision encoder and projector on CUDA, the device twin of [`crate::vision::encoder`]'s
//! `vision_forward` and `project` (same inputs, same output layout).
//!
//! Per call: patches by `im2col` and one GEMM (the convolution), the embeddings with `layernorm_pre` into an f32
//! residual stream of `images * tiles * padded` rows, the local layers (LayerNorm -> fused qkv GEMM -> gather
//! attention with the aspect-ratio flag mask -> o GEMM -> gated residual + LayerNorm -> fc1 GEMM -> bias + GELU ->
//! fc2 GEMM, whose bias and gate are applied by the next LayerNorm kernel), `layernorm_post` with the post-tile
//! embedding, the gated global layers, and the output gather (padding dropped, intermediate states interleaved).
//! Workspaces are allocated per call (encoding is not captured in a graph).

use std::sync::Arc;

use crate::exec::cuda::blas::Blas;
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;

use super::{drv, gemm, upload_bf16, upload_f32};
use crate::ops::cuda::encoder_attention::{
    encoder_attention, encoder_attention_supports, EncoderAttnIo, EncoderAttnShape,
};
use crate::ops::cuda::vision as kv;
use crate::vision::config::{MllamaConfig, VISION_OUTER_LAYERNORM_EPS};
use crate::vision::weights::{LayerNormWeights, MllamaWeights, VisionLayerWeights};
use crate::{Error, Result};

struct DevNorm {
    weight: CudaSlice<f32>,
    bias: CudaSlice<f32>,
}

impl DevNorm {
    fn new(stream: &Arc<CudaStream>, n: &LayerNormWeights) -> Result<Self> {
        Ok(DevNorm { weight: upload_f32(stream, &n.weight)?, bias: upload_f32(stream, &n.bias)? })
    }
}

struct DevLayer {
    attn_norm: DevNorm,
    wqkv: CudaSlice<bf16>,
    wo: CudaSlice<bf16>,
    mlp_norm: DevNorm,
    fc1: CudaSlice<bf16>,
    fc1_bias: CudaSlice<f32>,
    fc2: CudaSlice<bf16>,
    fc2_bias: CudaSlice<f32>,
    /// tanh(gate_attn), or 1 for local layers.
    gate_attn: f32,
    /// tanh(gate_ffn), or 1 for local layers.
    gate_ffn: f32,
}

impl DevLayer {
    fn new(stream: &Arc<CudaStream>, l: &VisionLayerWeights) -> Result<Self> {
        Ok(DevLayer {
            attn_norm: DevNorm::new(stream, &l.attn_norm)?,
            wqkv: upload_bf16(stream, &l.wqkv)?,
            wo: upload_bf16(stream, &l.wo)?,
            mlp_norm: DevNorm::new(stream, &l.mlp_norm)?,
            fc1: upload_bf16(stream, &l.fc1)?,
            fc1_bias: upload_f32(stream, &l.fc1_bias)?,
            fc2: upload_bf16(stream, &l.fc2)?,
            fc2_bias: upload_f32(stream, &l.fc2_bias)?,
            gate_attn: l.gate_attn.map_or(1.0, f32::tanh),
            gate_ffn: l.gate_ffn.map_or(1.0, f32::tanh),
        })
    }
}

/// The vision encoder and projector on one device.
pub struct CudaVisionEncoder {
    cfg: MllamaConfig,
    stream: Arc<CudaStream>,
    blas: Blas,
    /// `[hidden, k_pad]`: the convolution with its columns padded to a multiple of 8.
    patch: CudaSlice<bf16>,
    k_pad: usize,
    class_embedding: CudaSlice<f32>,
    /// `(1 - tanh(gate)) * position_embedding`.
    position: CudaSlice<f32>,
    tile_position: CudaSlice<bf16>,
    pos_gate: f32,
    /// Host tables scaled by their gates: `[ar_rows, tiles * hidden]`.
    pre_tile: Vec<f32>,
    post_tile: Vec<f32>,
    ln_pre: DevNorm,
    ln_post: DevNorm,
    layers: Vec<DevLayer>,
    global_layers: Vec<DevLayer>,
    projector: CudaSlice<bf16>,
    projector_bias: CudaSlice<f32>,
}

/// The device outputs of [`CudaVisionEncoder::encode`].
pub struct CudaEncoded {
    /// `[images * tiles * num_patches, vision_output_dim]` bf16: `vision_forward`'s output.
    pub vision: CudaSlice<bf16>,
    /// `[images * tiles * num_patches, text hidden]` bf16: the projector's output (`cross_attention_states`).
    pub states: CudaSlice<bf16>,
}

/// Pending fc2 output of the last layer: applied by the next LayerNorm kernel (`h += gate * (delta + bias)`).
#[derive(Clone, Copy)]
struct Pending<'a> {
    bias: &'a CudaSlice<f32>,
    gate: f32,
}

/// The per-call buffers.
struct Work {
    h: CudaSlice<f32>,
    xb: CudaSlice<bf16>,
    qkv: CudaSlice<bf16>,
    attn: CudaSlice<bf16>,
    delta: CudaSlice<bf16>,
    mid: CudaSlice<bf16>,
    flags: CudaSlice<u8>,
    seq_of_query: CudaSlice<u32>,
    positions: CudaSlice<u32>,
    tables: CudaSlice<u32>,
}

impl CudaVisionEncoder {
    /// Uploads the vision weights and the projector of `w` (bf16 matrices, f32 norms, biases and embeddings) to
    /// the device of `stream`.
    pub fn new(cfg: &MllamaConfig, w: &MllamaWeights, stream: Arc<CudaStream>) -> Result<Self> {
        let v = &cfg.vision;
        let vw = &w.vision;
        // Validates every length against the config (the CPU forward's own check, run on an empty batch).
        crate::vision::encoder::vision_forward(vw, v, &[], 0, &[], &[])?;
        let (dim, pdim) = (v.hidden_size, v.patch_dim());
        if w.projector.len() != cfg.text.base.hidden_size * v.vision_output_dim
            || w.projector_bias.len() != cfg.text.base.hidden_size
        {
            return Err(Error::weights("<mllama>", "multi_modal_projector does not match the config"));
        }
        if !v.head_dim().is_multiple_of(8) || v.head_dim() > kv::MAX_GATHER_HEAD_DIM {
            return Err(Error::request(format!(
                "the CUDA vision encoder takes a head_dim that is a multiple of 8 up to {}; this model has {}",
                kv::MAX_GATHER_HEAD_DIM,
                v.head_dim()
            )));
        }
        if dim > kv::MAX_ROW_WIDTH {
            return Err(Error::request(format!("vision hidden_size {dim} exceeds {}", kv::MAX_ROW_WIDTH)));
        }
        let k_pad = pdim.div_ceil(8) * 8;
        let mut patch = vec![0.0f32; dim * k_pad];
        for (row, src) in patch.chunks_mut(k_pad).zip(vw.patch_embedding.chunks(pdim)) {
            row[..pdim].copy_from_slice(src);
        }
        let one_minus = 1.0 - vw.position_gate.tanh();
        let position: Vec<f32> = vw.position_embedding.iter().map(|&x| one_minus * x).collect();
        let (pre_gate, post_gate) = (vw.pre_tile_gate.tanh(), vw.post_tile_gate.tanh());
        let layers = vw.layers.iter().map(|l| DevLayer::new(&stream, l)).collect::<Result<Vec<_>>>()?;
        let global_layers = vw.global_layers.iter().map(|l| DevLayer::new(&stream, l)).collect::<Result<Vec<_>>>()?;
        let blas = Blas::new(&stream)?;
        Ok(CudaVisionEncoder {
            cfg: cfg.clone(),
            blas,
            patch: upload_bf16(&stream, &patch)?,
            k_pad,
            class_embedding: upload_f32(&stream, &vw.class_embedding)?,
            position: upload_f32(&stream, &position)?,
            tile_position: upload_bf16(&stream, &vw.tile_position_embedding)?,
            pos_gate: vw.position_gate.tanh(),
            pre_tile: vw.pre_tile_embedding.iter().map(|&x| x * pre_gate).collect(),
            post_tile: vw.post_tile_embedding.iter().map(|&x| x * post_gate).collect(),
            ln_pre: DevNorm::new(&stream, &vw.layernorm_pre)?,
            ln_post: DevNorm::new(&stream, &vw.layernorm_post)?,
            layers,
            global_layers,
            projector: upload_bf16(&stream, &w.projector)?,
            projector_bias: upload_f32(&stream, &w.projector_bias)?,
            stream,
        })
    }

    /// The stream everything runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The configuration.
    pub fn config(&self) -> &MllamaConfig {
        &self.cfg
    }

    /// Runs the encoder and the projector on `num_images` preprocessed images (the inputs of
    /// [`crate::vision::encoder::vision_forward`], checked the same way). Enqueued on the stream; the outputs are
    /// ready when the stream is.
    pub fn encode(
        &self,
        pixel_values: &[f32],
        num_images: usize,
        aspect_ratio_ids: &[i64],
        aspect_ratio_mask: &[i64],
    ) -> Result<CudaEncoded> {
        let v = &self.cfg.vision;
        let (tiles, side, ch, dim) = (v.max_num_tiles, v.image_size, v.num_channels, v.hidden_size);
        let (np, padded) = (v.num_patches(), v.padded_patches());
        let want = num_images * tiles * ch * side * side;
        if pixel_values.len() != want {
            return Err(Error::request(format!(
                "pixel_values has {} values, expected {want} = {num_images} images x {tiles} tiles x {ch} channels x \
                 {side} x {side}",
                pixel_values.len()
            )));
        }
        if let Some(i) = pixel_values.iter().position(|x| !x.is_finite()) {
            return Err(Error::request(format!("pixel_values[{i}] is not finite ({})", pixel_values[i])));
        }
        let max_id = v.max_aspect_ratio_id();
        if aspect_ratio_ids.len() != num_images {
            return Err(Error::request(format!(
                "aspect_ratio_ids has {} entries, expected one per image ({num_images})",
                aspect_ratio_ids.len()
            )));
        }
        let mut ar = Vec::with_capacity(num_images);
        for (i, &id) in aspect_ratio_ids.iter().enumerate() {
            match usize::try_from(id) {
                Ok(id) if id <= max_id => ar.push(id),
                _ => {
                    return Err(Error::request(format!(
                        "aspect_ratio_ids[{i}] = {id} is outside 0..={max_id} (the config's supported_aspect_ratios)"
                    )))
                }
            }
        }
        if aspect_ratio_mask.len() != num_images * tiles || aspect_ratio_mask.iter().any(|&m| m != 0 && m != 1) {
            return Err(Error::request(format!(
                "aspect_ratio_mask must hold {} values of 0 or 1 ({num_images} images x {tiles} tiles)",
                num_images * tiles
            )));
        }
        if num_images == 0 {
            return Err(Error::request("encode: no images"));
        }
        let s = &self.stream;
        let n_tiles = num_images * tiles;
        let seq = tiles * padded;
        let rows = num_images * seq;
        let grid = np - 1;

        // Patches and the convolution.
        let shape = kv::Im2colShape { tiles: n_tiles, channels: ch, side, patch: v.patch_size, k_pad: self.k_pad };
        let px = s.clone_htod(pixel_values).map_err(drv("upload pixels"))?;
        let mut patches = s.alloc_zeros::<bf16>(n_tiles * grid * self.k_pad).map_err(drv("allocate patches"))?;
        kv::im2col(s, &shape, &px, &mut patches)?;
        drop(px);
        let mut conv = s.alloc_zeros::<bf16>(n_tiles * grid * dim).map_err(drv("allocate conv"))?;
        gemm(&self.blas, &patches.slice(..), &self.patch.slice(..), (n_tiles * grid, self.k_pad, dim), &mut conv)?;
        drop(patches);

        // Embeddings + layernorm_pre.
        let mut pre_add = Vec::with_capacity(n_tiles * dim);
        let mut post_add = Vec::with_capacity(n_tiles * dim);
        for &a in &ar {
            pre_add.extend_from_slice(&self.pre_tile[a * tiles * dim..][..tiles * dim]);
            post_add.extend_from_slice(&self.post_tile[a * tiles * dim..][..tiles * dim]);
        }
        let pre_add = s.clone_htod(&pre_add).map_err(drv("upload pre-tile embedding"))?;
        let post_add = s.clone_htod(&post_add).map_err(drv("upload post-tile embedding"))?;
        let ar_u32: Vec<u32> = ar.iter().map(|&a| a as u32).collect();
        let ar_dev = s.clone_htod(&ar_u32).map_err(drv("upload aspect ratio ids"))?;
        let alloc_f = |n: usize| s.alloc_zeros::<f32>(n).map_err(drv("allocate vision workspace"));
        let alloc_b = |n: usize| s.alloc_zeros::<bf16>(n).map_err(drv("allocate vision workspace"));
        let flags: Vec<u8> = (0..rows)
            .map(|r| {
                let (image, tile, pos) = (r / seq, r % seq / padded, r % padded);
                u8::from(aspect_ratio_mask[image * tiles + tile] == 0 || pos >= np)
            })
            .collect();
        let seq_of: Vec<u32> = (0..rows).map(|r| (r / seq) as u32).collect();
        let up = drv("upload attention metadata");
        let mut w = Work {
            h: alloc_f(rows * dim)?,
            xb: alloc_b(rows * dim)?,
            qkv: alloc_b(rows * 3 * dim)?,
            attn: alloc_b(rows * dim)?,
            delta: alloc_b(rows * dim)?,
            mid: alloc_b(rows * v.intermediate_size)?,
            flags: s.clone_htod(&flags).map_err(&up)?,
            seq_of_query: s.clone_htod(&seq_of).map_err(&up)?,
            positions: s.clone_htod(&vec![(seq - 1) as u32; rows]).map_err(&up)?,
            tables: s.clone_htod(&(0..num_images as u32).collect::<Vec<u32>>()).map_err(&up)?,
        };
        let es =
            kv::EmbedShape { images: num_images, tiles, num_patches: np, padded, hidden: dim, ar_rows: max_id + 1 };
        let ew = kv::EmbedWeights {
            class_embedding: &self.class_embedding,
            position: &self.position,
            tile_position: &self.tile_position,
            ln_weight: &self.ln_pre.weight,
            ln_bias: &self.ln_pre.bias,
            pos_gate: self.pos_gate,
            eps: VISION_OUTER_LAYERNORM_EPS,
        };
        kv::embed(s, &es, &ew, &conv, &pre_add, &ar_dev, &mut w.h)?;
        drop(conv);

        // Local layers, keeping the intermediate states.
        let n_inter = v.intermediate_layers_indices.len();
        let mut inter = alloc_f((n_inter * rows * dim).max(1))?;
        let mut pending: Option<Pending<'_>> = None;
        for (l, layer) in self.layers.iter().enumerate() {
            self.layer(layer, &mut w, &mut pending, rows, seq)?;
            for (k, &idx) in v.intermediate_layers_indices.iter().enumerate() {
                if idx == l {
                    self.apply_pending(&mut w, &mut pending, rows)?;
                    s.memcpy_dtod(&w.h, &mut inter.slice_mut(k * rows * dim..(k + 1) * rows * dim))
                        .map_err(drv("copy intermediate state"))?;
                }
            }
        }

        // layernorm_post (with the last pending residual), the post-tile embedding, the global layers.
        {
            let a = kv::LayerNormArgs {
                rows,
                width: dim,
                gate: pending.map_or(1.0, |p| p.gate),
                eps: VISION_OUTER_LAYERNORM_EPS,
                rows_per_group: padded,
            };
            let io = kv::LayerNormIo {
                delta: pending.map(|_| &w.delta as &dyn kv::DeviceBf16),
                delta_bias: pending.map(|p| p.bias as &dyn kv::DeviceF32),
                out_f32_is_residual: true,
                post_add: Some(&post_add),
                norm: Some((&self.ln_post.weight, &self.ln_post.bias)),
                ..Default::default()
            };
            kv::layer_norm(s, &a, &mut w.h, io)?;
            pending = None;
        }
        for layer in &self.global_layers {
            self.layer(layer, &mut w, &mut pending, rows, seq)?;
        }
        self.apply_pending(&mut w, &mut pending, rows)?;

        // Output without padding, then the projector.
        let vdim = v.vision_output_dim;
        let out_rows = n_tiles * np;
        let mut vision = alloc_b(out_rows * vdim)?;
        let gs = kv::GatherShape { tiles_total: n_tiles, num_patches: np, padded, hidden: dim, n_inter };
        kv::gather_output(s, &gs, &w.h, &inter, &mut vision)?;
        drop(w);
        drop(inter);
        let hidden = self.cfg.text.base.hidden_size;
        let mut states = alloc_b(out_rows * hidden)?;
        gemm(&self.blas, &vision.slice(..), &self.projector.slice(..), (out_rows, vdim, hidden), &mut states)?;
        kv::bias_act(s, &mut states, &self.projector_bias, out_rows, kv::BiasAct::None)?;
        Ok(CudaEncoded { vision, states })
    }

    /// [`encode`](Self::encode) with both outputs copied to the host as f32: `(vision_forward output, projected
    /// states)`.
    pub fn encode_host(
        &self,
        pixel_values: &[f32],
        num_images: usize,
        aspect_ratio_ids: &[i64],
        aspect_ratio_mask: &[i64],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let e = self.encode(pixel_values, num_images, aspect_ratio_ids, aspect_ratio_mask)?;
        let v = self.stream.clone_dtoh(&e.vision).map_err(drv("read vision output"))?;
        let st = self.stream.clone_dtoh(&e.states).map_err(drv("read projected states"))?;
        Ok((v.into_iter().map(f32::from).collect(), st.into_iter().map(f32::from).collect()))
    }

    /// Applies a pending residual (`h += gate * (delta + bias)`) without normalizing.
    fn apply_pending(&self, w: &mut Work, pending: &mut Option<Pending<'_>>, rows: usize) -> Result<()> {
        let Some(p) = pending.take() else { return Ok(()) };
        let dim = self.cfg.vision.hidden_size;
        let a = kv::LayerNormArgs { rows, width: dim, gate: p.gate, eps: self.cfg.vision.norm_eps, rows_per_group: 1 };
        let io = kv::LayerNormIo { delta: Some(&w.delta), delta_bias: Some(p.bias), ..Default::default() };
        kv::layer_norm(&self.stream, &a, &mut w.h, io)
    }

    /// One encoder layer; leaves its fc2 output in `w.delta` and the residual add pending.
    fn layer<'a>(
        &self,
        l: &'a DevLayer,
        w: &mut Work,
        pending: &mut Option<Pending<'a>>,
        rows: usize,
        seq: usize,
    ) -> Result<()> {
        let v = &self.cfg.vision;
        let (dim, inter, s) = (v.hidden_size, v.intermediate_size, &self.stream);
        let eps = v.norm_eps;
        // input_layernorm, with the previous layer's residual.
        let p = pending.take();
        let a = kv::LayerNormArgs { rows, width: dim, gate: p.map_or(1.0, |p| p.gate), eps, rows_per_group: 1 };
        let io = kv::LayerNormIo {
            delta: p.map(|_| &w.delta as &dyn kv::DeviceBf16),
            delta_bias: p.map(|p| p.bias as &dyn kv::DeviceF32),
            out: Some(&mut w.xb),
            norm: Some((&l.attn_norm.weight, &l.attn_norm.bias)),
            ..Default::default()
        };
        kv::layer_norm(s, &a, &mut w.h, io)?;
        gemm(&self.blas, &w.xb.slice(..), &l.wqkv.slice(..), (rows, dim, 3 * dim), &mut w.qkv)?;
        let hd = v.head_dim();
        if encoder_attention_supports(hd) {
            // The tensor-core kernel: each image's `seq` rows attend to one another.
            let shape = EncoderAttnShape {
                num_seqs: rows / seq,
                seq_len: seq,
                num_heads: v.attention_heads,
                head_dim: hd,
                q_stride: 3 * dim,
                kv_stride: 3 * dim,
                out_stride: dim,
                scale: (hd as f32).powf(-0.5),
            };
            let (q, k, vv) = (w.qkv.slice(..), w.qkv.slice(dim..), w.qkv.slice(2 * dim..));
            let io = EncoderAttnIo { q: &q, k: &k, v: &vv, flags: Some(&w.flags) };
            encoder_attention(s, &shape, &io, &mut w.attn)?;
        } else {
            self.gather_attention(w, rows, seq)?;
        }
        gemm(&self.blas, &w.attn.slice(..), &l.wo.slice(..), (rows, dim, dim), &mut w.delta)?;
        // post_attention_layernorm, with the gated attention residual.
        let a = kv::LayerNormArgs { rows, width: dim, gate: l.gate_attn, eps, rows_per_group: 1 };
        let io = kv::LayerNormIo {
            delta: Some(&w.delta),
            out: Some(&mut w.xb),
            norm: Some((&l.mlp_norm.weight, &l.mlp_norm.bias)),
            ..Default::default()
        };
        kv::layer_norm(s, &a, &mut w.h, io)?;
        gemm(&self.blas, &w.xb.slice(..), &l.fc1.slice(..), (rows, dim, inter), &mut w.mid)?;
        kv::bias_act(s, &mut w.mid, &l.fc1_bias, rows, kv::BiasAct::Gelu)?;
        gemm(&self.blas, &w.mid.slice(..), &l.fc2.slice(..), (rows, inter, dim), &mut w.delta)?;
        *pending = Some(Pending { bias: &l.fc2_bias, gate: l.gate_ffn });
        Ok(())
    }

    /// The CUDA-core attention over one block per image, for head widths the tensor-core kernel is not built for.
    fn gather_attention(&self, w: &mut Work, rows: usize, seq: usize) -> Result<()> {
        let v = &self.cfg.vision;
        let (dim, s) = (v.hidden_size, &self.stream);
        let hd = v.head_dim();
        let shape = kv::GatherAttnShape {
            num_heads: v.attention_heads,
            num_kv_heads: v.attention_heads,
            head_dim: hd,
            block_size: seq,
            max_blocks_per_seq: 1,
            q_stride: 3 * dim,
            out_stride: dim,
            kv_stride: 3 * dim,
            scale: (hd as f32).powf(-0.5),
        };
        let q = w.qkv.slice(..);
        let k = w.qkv.slice(dim..);
        let vv = w.qkv.slice(2 * dim..);
        // K and V views must have the same length: trim both to the last slot's end.
        let kv_len = rows * 3 * dim - 2 * dim;
        let (k, vv) = (k.slice(..kv_len), vv.slice(..kv_len));
        let io = kv::GatherAttnIo {
            q: &q,
            k: &k,
            v: &vv,
            seq_of_query: &w.seq_of_query,
            positions: &w.positions,
            block_tables: &w.tables,
            flags: Some((&w.flags, &w.flags)),
        };
        kv::gather_attention(s, &shape, &io, &mut w.attn)
    }
}
