//! Llama 3.2 Vision on CUDA: each kernel of `kernels/vision/` against its CPU twin (random inputs, poisoned outputs,
//! odd sizes), the CUDA encoder and projector against the CPU reference on the golden checkpoints, end-to-end
//! logits and greedy ids of the golden cases through `MllamaCudaExecutor`, a mixed batch of a text-only and a vision
//! sequence, and decode through CUDA graphs against eager decode. Skipped without a CUDA device. The ignored benches
//! time the encoder (4 tiles, 11B shapes) and 11B batch-1 decode with one 4-tile image, on random weights.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use half::bf16;
use llama32::exec::generate::{build_step, LogitsWanted, SeqChunk};
use llama32::exec::Executor;
use llama32::kv::BlockAllocator;
use llama32::npy;
use llama32::ops::cuda::vision as kv;
use llama32::sampling::argmax;
use llama32::vision::cuda::encoder::CudaVisionEncoder;
use llama32::vision::cuda::text::{MllamaCudaExecutor, MllamaCudaOptions};
use llama32::vision::cuda::twins;
use llama32::vision::encoder::{project, vision_forward};
use llama32::vision::exec::{MllamaCpuExecutor, SeqImages};
use llama32::vision::pipeline::{EncodedImages, MllamaModel};
use llama32::vision::weights::LayerNormWeights;

use crate::common::{cuda_stream, download, max_rel, normal, rng, to_f32, upload};

const CASES: [&str; 3] = ["mllama-noresize", "mllama-resize", "mllama-two-images"];
/// Poison for outputs: a kernel that skips an element leaves it visible.
const POISON: f32 = 1.0e30;

/// `n` normal values times `scale` from `seed`.
pub(crate) fn randn(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut r = rng(seed);
    (0..n).map(|_| normal(&mut r) * scale).collect()
}

/// Values rounded to bf16 (what a bf16 device buffer holds), as f32.
pub(crate) fn bf(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

/// `v` rounded to bf16 on the device of `s`.
pub(crate) fn up_bf16(s: &Arc<CudaStream>, v: &[f32]) -> cudarc::driver::CudaSlice<bf16> {
    upload(s, &v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>())
}

/// Max |a - b| / (atol + rtol |b|) over the elements: at most 1 passes.
fn check_close(name: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let mut worst = (0.0f32, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let r = (g - w).abs() / (atol + rtol * w.abs());
        let r = if r.is_nan() { f32::INFINITY } else { r };
        if r > worst.0 {
            worst = (r, i);
        }
    }
    let i = worst.1;
    assert!(worst.0 <= 1.0, "{name}: element {i}: got {} want {} (ratio {})", got[i], want[i], worst.0);
}

#[test]
fn im2col_matches_cpu() {
    let Some(s) = cuda_stream() else { return };
    for (tiles, ch, side, patch, k_pad) in [(3, 3, 28, 14, 592), (1, 2, 30, 7, 104), (2, 3, 13, 3, 27)] {
        let shape = kv::Im2colShape { tiles, channels: ch, side, patch, k_pad };
        let px = randn(1, tiles * ch * side * side, 1.0);
        let want = bf(&twins::im2col(&shape, &px));
        let mut out = up_bf16(&s, &vec![POISON; want.len()]);
        kv::im2col(&s, &shape, &upload(&s, &px), &mut out).unwrap();
        assert_eq!(to_f32(&download(&s, &out)), want, "im2col {shape:?}");
    }
}

#[test]
fn embed_matches_cpu() {
    let Some(s) = cuda_stream() else { return };
    for (images, tiles, np, padded, hidden) in [(2, 4, 5, 8, 32), (1, 2, 17, 24, 40), (1, 1, 9, 16, 1280)] {
        let ar_rows = 9;
        let shape = kv::EmbedShape { images, tiles, num_patches: np, padded, hidden, ar_rows };
        let it = images * tiles;
        let conv = bf(&randn(2, it * (np - 1) * hidden, 1.0));
        let cls = randn(3, hidden, 1.0);
        let pre = randn(4, it * hidden, 0.5);
        let pos = randn(5, np * hidden, 0.5);
        let tpos = bf(&randn(6, ar_rows * tiles * np * hidden, 0.5));
        let ar: Vec<u32> = (0..images as u32).map(|i| (i * 5 + 3) % ar_rows as u32).collect();
        let ln = LayerNormWeights { weight: randn(7, hidden, 1.0), bias: randn(8, hidden, 0.2) };
        let want = twins::embed(&shape, &conv, &cls, &pre, &pos, &tpos, &ar, &ln, 0.7, 1e-5);
        let (cls_d, pos_d, tpos_d) = (upload(&s, &cls), upload(&s, &pos), up_bf16(&s, &tpos));
        let (lw, lb) = (upload(&s, &ln.weight), upload(&s, &ln.bias));
        let w = kv::EmbedWeights {
            class_embedding: &cls_d,
            position: &pos_d,
            tile_position: &tpos_d,
            ln_weight: &lw,
            ln_bias: &lb,
            pos_gate: 0.7,
            eps: 1e-5,
        };
        let mut out = upload(&s, &vec![POISON; want.len()]);
        kv::embed(&s, &shape, &w, &up_bf16(&s, &conv), &upload(&s, &pre), &upload(&s, &ar), &mut out).unwrap();
        check_close(&format!("embed {shape:?}"), &download(&s, &out), &want, 1e-4, 1e-4);
    }
}

#[test]
fn layer_norm_matches_cpu() {
    let Some(s) = cuda_stream() else { return };
    for (rows, width) in [(7, 32), (33, 1280), (3, 1000), (2, 5)] {
        let res = randn(10, rows * width, 2.0);
        let delta = bf(&randn(11, rows * width, 1.0));
        let bias = randn(12, width, 0.3);
        let ln = LayerNormWeights { weight: randn(13, width, 1.0), bias: randn(14, width, 0.3) };
        let per = 4;
        let post = randn(15, rows.div_ceil(per) * width, 0.5);
        let a = kv::LayerNormArgs { rows, width, gate: 0.6, eps: 1e-5, rows_per_group: per };
        // Gated residual with bias, bf16 output and f32 output with post_add.
        let mut want_res = res.clone();
        let want_f32 =
            twins::layer_norm_residual(&mut want_res, Some((&delta, Some(&bias), 0.6)), &ln, 1e-5, Some((&post, per)));
        let want_plain: Vec<f32> = {
            let mut r = want_res.clone();
            twins::layer_norm_residual(&mut r, None, &ln, 1e-5, None)
        };
        let mut r = upload(&s, &res);
        let d = up_bf16(&s, &delta);
        let (b, pa) = (upload(&s, &bias), upload(&s, &post));
        let (nw, nb) = (upload(&s, &ln.weight), upload(&s, &ln.bias));
        let mut out = up_bf16(&s, &vec![POISON; rows * width]);
        let mut out_f = upload(&s, &vec![POISON; rows * width]);
        let io = kv::LayerNormIo {
            delta: Some(&d),
            delta_bias: Some(&b),
            out: Some(&mut out),
            out_f32: Some(&mut out_f),
            post_add: Some(&pa),
            norm: Some((&nw, &nb)),
            ..Default::default()
        };
        kv::layer_norm(&s, &a, &mut r, io).unwrap();
        let name = format!("layer_norm rows {rows} width {width}");
        check_close(&format!("{name} residual"), &download(&s, &r), &want_res, 1e-5, 1e-5);
        check_close(&format!("{name} f32"), &download(&s, &out_f), &want_f32, 1e-4, 1e-4);
        check_close(&format!("{name} bf16"), &to_f32(&download(&s, &out)), &want_plain, 1e-3, 8e-3);
        // In place over the residual, no delta.
        let io = kv::LayerNormIo { out_f32_is_residual: true, norm: Some((&nw, &nb)), ..Default::default() };
        kv::layer_norm(&s, &a, &mut r, io).unwrap();
        check_close(&format!("{name} in place"), &download(&s, &r), &want_plain, 1e-4, 1e-4);
    }
}

#[test]
fn bias_act_matches_cpu() {
    let Some(s) = cuda_stream() else { return };
    for (rows, cols) in [(5, 48), (17, 5120), (3, 7)] {
        let x = bf(&randn(20, rows * cols, 3.0));
        let bias = randn(21, cols, 1.0);
        for act in [kv::BiasAct::Gelu, kv::BiasAct::None] {
            let mut want = x.clone();
            twins::bias_act(&mut want, &bias, act);
            let mut d = up_bf16(&s, &x);
            kv::bias_act(&s, &mut d, &upload(&s, &bias), rows, act).unwrap();
            check_close(&format!("bias_act {act:?} {rows}x{cols}"), &to_f32(&download(&s, &d)), &want, 1e-6, 4e-3);
        }
    }
}

#[test]
fn gather_output_matches_cpu() {
    let Some(s) = cuda_stream() else { return };
    for (tiles_total, np, padded, hidden, n_inter) in [(8, 5, 8, 32, 1), (4, 17, 24, 16, 5), (2, 3, 8, 8, 0)] {
        let g = kv::GatherShape { tiles_total, num_patches: np, padded, hidden, n_inter };
        let rows = tiles_total * padded;
        let fin = randn(30, rows * hidden, 1.0);
        let inter = randn(31, (n_inter * rows * hidden).max(1), 1.0);
        let want = bf(&twins::gather_output(&g, &fin, &inter));
        let mut out = up_bf16(&s, &vec![POISON; want.len()]);
        kv::gather_output(&s, &g, &upload(&s, &fin), &upload(&s, &inter), &mut out).unwrap();
        assert_eq!(to_f32(&download(&s, &out)), want, "gather {g:?}");
    }
}

#[test]
fn gated_rms_norm_matches_cpu() {
    let Some(s) = cuda_stream() else { return };
    for (rows, hidden) in [(6, 64), (19, 4096), (3, 40)] {
        let res = bf(&randn(40, rows * hidden, 1.0));
        let delta = bf(&randn(41, rows * hidden, 1.0));
        let scale: Vec<f32> = (0..rows).map(|r| (r % 3) as f32 * 0.5).collect();
        let w = bf(&randn(42, hidden, 1.0));
        let mut want_res = res.clone();
        let want = twins::gated_rms_norm(&mut want_res, &delta, Some(&scale), 0.4, &w, 1e-5);
        let mut r = up_bf16(&s, &res);
        let mut out = up_bf16(&s, &vec![POISON; rows * hidden]);
        let (d, sc, wd) = (up_bf16(&s, &delta), upload(&s, &scale), up_bf16(&s, &w));
        kv::gated_rms_norm(&s, &mut r, &d, Some(&sc), 0.4, 1e-5, hidden, Some((&wd, &mut out))).unwrap();
        let name = format!("gated_rms_norm {rows}x{hidden}");
        // The residual is rounded twice (the product, the sum), the output twice more.
        check_close(&format!("{name} residual"), &to_f32(&download(&s, &r)), &want_res, 1e-2, 1e-2);
        check_close(&format!("{name} out"), &to_f32(&download(&s, &out)), &want, 2e-2, 2e-2);
        // Rows with scale 0 keep their residual bit for bit.
        let got = to_f32(&download(&s, &r));
        for row in (0..rows).step_by(3) {
            assert_eq!(
                got[row * hidden..(row + 1) * hidden],
                res[row * hidden..(row + 1) * hidden],
                "{name} row {row}"
            );
        }
    }
}

/// One gather-attention case on both backends.
#[allow(clippy::too_many_arguments)]
fn run_gather_attention(
    s: &Arc<CudaStream>,
    shape: &kv::GatherAttnShape,
    tokens: usize,
    slots: usize,
    seq_of: &[u32],
    positions: &[u32],
    tables: &[u32],
    flags: Option<(&[u8], &[u8])>,
    seed: u64,
) {
    let q = bf(&randn(seed, tokens * shape.q_stride, 1.0));
    let k = bf(&randn(seed + 1, slots * shape.kv_stride, 1.0));
    let v = bf(&randn(seed + 2, slots * shape.kv_stride, 1.0));
    let mut want = vec![POISON; tokens * shape.out_stride];
    twins::gather_attention(shape, &q, &k, &v, seq_of, positions, tables, flags, &mut want);
    let (qd, kd, vd) = (up_bf16(s, &q), up_bf16(s, &k), up_bf16(s, &v));
    let (sq, pos, bt) = (upload(s, seq_of), upload(s, positions), upload(s, tables));
    let fl = flags.map(|(qf, kf)| (upload(s, qf), upload(s, kf)));
    let (qv, kvv, vv) = (qd.slice(..), kd.slice(..), vd.slice(..));
    let io = kv::GatherAttnIo {
        q: &qv,
        k: &kvv,
        v: &vv,
        seq_of_query: &sq,
        positions: &pos,
        block_tables: &bt,
        flags: fl.as_ref().map(|(a, b)| (a, b)),
    };
    let mut out = up_bf16(s, &vec![POISON; tokens * shape.out_stride]);
    kv::gather_attention(s, shape, &io, &mut out).unwrap();
    let got = to_f32(&download(s, &out));
    // Only the heads are written: the rest of a row keeps the poison on both sides. The kernel works in f32 like
    // the twin, so after the bf16 store the two differ by at most one bf16 ulp (2^-7 of the value).
    check_close(&format!("gather_attention {shape:?}"), &got, &bf(&want), 1e-4, 1.0 / 128.0);
}

#[test]
fn gather_attention_matches_cpu() {
    let Some(s) = cuda_stream() else { return };
    // Vision layout: fused qkv rows, one block per image, non-causal, flag mask (with an all-flagged image).
    for (heads, hd, images, seq) in [(2, 16, 2, 40), (16, 80, 1, 136), (3, 8, 3, 24)] {
        let dim = heads * hd;
        let rows = images * seq;
        let shape = kv::GatherAttnShape {
            num_heads: heads,
            num_kv_heads: heads,
            head_dim: hd,
            block_size: seq,
            max_blocks_per_seq: 1,
            q_stride: 3 * dim,
            out_stride: dim,
            kv_stride: 3 * dim,
            scale: (hd as f32).powf(-0.5),
        };
        let flags: Vec<u8> = (0..rows).map(|r| u8::from(r / seq == 2 || r % 8 >= 5)).collect();
        let seq_of: Vec<u32> = (0..rows).map(|r| (r / seq) as u32).collect();
        let positions = vec![(seq - 1) as u32; rows];
        let tables: Vec<u32> = (0..images as u32).collect();
        // The fused layout: q at 0, k at dim, v at 2 dim of each row; the twin takes separate k/v buffers, so
        // build them as strided views of one array on both sides.
        let q = bf(&randn(50, rows * 3 * dim, 1.0));
        let k = q[dim..].to_vec();
        let v = q[2 * dim..].to_vec();
        let mut want = vec![POISON; rows * dim];
        let kv_len = rows * 3 * dim - 2 * dim;
        twins::gather_attention(
            &shape,
            &q,
            &k[..kv_len],
            &v[..kv_len],
            &seq_of,
            &positions,
            &tables,
            Some((&flags, &flags)),
            &mut want,
        );
        let qd = up_bf16(&s, &q);
        let (qv, kvv, vv) = (qd.slice(..), qd.slice(dim..dim + kv_len), qd.slice(2 * dim..));
        let (sq, pos, bt, fl) = (upload(&s, &seq_of), upload(&s, &positions), upload(&s, &tables), upload(&s, &flags));
        let io = kv::GatherAttnIo {
            q: &qv,
            k: &kvv,
            v: &vv,
            seq_of_query: &sq,
            positions: &pos,
            block_tables: &bt,
            flags: Some((&fl, &fl)),
        };
        let mut out = up_bf16(&s, &vec![POISON; rows * dim]);
        kv::gather_attention(&s, &shape, &io, &mut out).unwrap();
        let got = to_f32(&download(&s, &out));
        check_close(&format!("vision attention {heads}x{hd}"), &got, &bf(&want), 1e-4, 1.0 / 128.0);
    }
    // Paged causal text layout with GQA, odd block size and head_dim 8 and 128.
    for (heads, kvh, hd, bs) in [(8, 2, 8, 5), (4, 4, 128, 3), (6, 2, 24, 16)] {
        // Positions reach 29: each table covers 30 tokens.
        let max_blocks = 30usize.div_ceil(bs);
        let shape = kv::GatherAttnShape {
            num_heads: heads,
            num_kv_heads: kvh,
            head_dim: hd,
            block_size: bs,
            max_blocks_per_seq: max_blocks,
            q_stride: (heads + 2 * kvh) * hd,
            out_stride: heads * hd + 8,
            kv_stride: kvh * hd,
            scale: 0.3,
        };
        let slots = 20 * bs;
        let seq_of = [0u32, 0, 0, 1, 1, 2];
        let positions = [0u32, 7, 13, 2, 29, 11];
        // Scattered block ids among the 20 blocks of the cache (7 is coprime to 20).
        let tables: Vec<u32> = (0..3 * max_blocks as u32).map(|i| (i * 7 + 3) % 20).collect();
        run_gather_attention(&s, &shape, 6, slots, &seq_of, &positions, &tables, None, 60 + hd as u64);
    }
}

/// The golden case's inputs and CPU reference outputs of the encoder.
struct EncCase {
    model: MllamaModel,
    pixels: Vec<f32>,
    ids: Vec<i64>,
    mask: Vec<i64>,
    images: usize,
}

fn enc_case(name: &str) -> EncCase {
    let g = crate::common::mllama_golden(name);
    let model = MllamaModel::load(&g.dir).unwrap();
    let pixels = npy::read_f32(&g.dir.join("pixel_values.npy")).unwrap().data;
    let ids = npy::read_i64(&g.dir.join("aspect_ratio_ids.npy")).unwrap().data;
    let mask = npy::read_i64(&g.dir.join("aspect_ratio_mask.npy")).unwrap().data;
    EncCase { images: ids.len(), model, pixels, ids, mask }
}

#[test]
fn cuda_encoder_matches_cpu_on_goldens() {
    let Some(s) = cuda_stream() else { return };
    for name in CASES {
        let c = enc_case(name);
        let (cfg, w) = (&c.model.cfg, &c.model.weights);
        let enc = CudaVisionEncoder::new(cfg, w, s.clone()).unwrap();
        let (vis, states) = enc.encode_host(&c.pixels, c.images, &c.ids, &c.mask).unwrap();
        let want_vis = vision_forward(&w.vision, &cfg.vision, &c.pixels, c.images, &c.ids, &c.mask).unwrap();
        let want_states = project(w, cfg, &want_vis).unwrap();
        let (ev, es) = (max_rel(&vis, &want_vis), max_rel(&states, &want_states));
        eprintln!("{name}: vision output max rel {ev:.2e}, projector {es:.2e}");
        // bf16 weights, GEMM inputs and outputs over a few layers: a few bf16 ulps of the largest value.
        assert!(ev <= 3e-2, "{name}: vision output differs by {ev:.2e}");
        assert!(es <= 3e-2, "{name}: projected states differ by {es:.2e}");
        // transformers' own float32 output too.
        let hf = npy::read_f32(&c.model.dir.join("vision_output.npy")).unwrap().data;
        assert!(max_rel(&vis, &hf) <= 3e-2, "{name}: vs transformers");
        // Flipping the aspect-ratio mask of a padding tile or the ratio id must change the output (not a no-op).
        let mut ids2 = c.ids.clone();
        ids2[0] = if ids2[0] == 1 { 2 } else { 1 };
        let (vis2, _) = enc.encode_host(&c.pixels, c.images, &ids2, &c.mask).unwrap();
        assert!(max_rel(&vis2, &want_vis) > 1e-2, "{name}: the aspect ratio id has no effect");
    }
}

/// The CLI / server path: `MllamaModel::encode_cuda` and `ImageEncoder::use_cuda` (image bytes in, projected
/// states out, the preprocessing on the CPU) against the CPU reference `encode` on the golden images.
#[test]
fn cuda_image_encoder_path_matches_cpu() {
    let Some(s) = cuda_stream() else { return };
    let ordinal = s.context().ordinal();
    for name in CASES {
        let g = crate::common::mllama_golden(name);
        let model = MllamaModel::load(&g.dir).unwrap();
        let want = model.encode(&g.images).unwrap();
        let got = model.encode_cuda(&g.images, ordinal).unwrap();
        assert_eq!(got.num_tiles, want.num_tiles, "{name}: tiles");
        let e = max_rel(&got.states, &want.states);
        eprintln!("{name}: encode_cuda vs CPU encode max rel {e:.2e}");
        assert!(e <= 3e-2, "{name}: encode_cuda differs by {e:.2e}");
        let (mut encoder, _) = model.split();
        encoder.use_cuda(ordinal).unwrap();
        assert!(encoder.on_cuda());
        let served = encoder.encode(&g.images).unwrap();
        // Images one at a time here, together in encode_cuda: other GEMM shapes, so bf16 roundings may differ.
        let d = max_rel(&served.states, &want.states);
        assert!(d <= 3e-2, "{name}: ImageEncoder on CUDA differs from the CPU by {d:.2e}");
        // A second request with the same image bytes is served from the encoder cache.
        let again = encoder.encode(&g.images).unwrap();
        assert_eq!(again.states, served.states);
        assert_eq!(encoder.cache_stats().0 as usize, g.images.len(), "{name}: cache hits");
    }
}

#[test]
fn cuda_encoder_rejects_bad_inputs() {
    let Some(s) = cuda_stream() else { return };
    let c = enc_case("mllama-resize");
    let enc = CudaVisionEncoder::new(&c.model.cfg, &c.model.weights, s).unwrap();
    assert!(enc.encode(&c.pixels[1..], c.images, &c.ids, &c.mask).is_err());
    assert!(enc.encode(&c.pixels, c.images, &[99], &c.mask).is_err());
    assert!(enc.encode(&c.pixels, c.images, &c.ids, &vec![2; c.mask.len()]).is_err());
    let mut nan = c.pixels.clone();
    nan[3] = f32::NAN;
    assert!(enc.encode(&nan, c.images, &c.ids, &c.mask).is_err());
}

struct TextCase {
    model: MllamaModel,
    ids: Vec<u32>,
    images: EncodedImages,
    logits: Vec<f32>,
    greedy: Vec<u32>,
    budget: f32,
}

fn text_case(name: &str) -> TextCase {
    let g = crate::common::mllama_golden(name);
    let model = MllamaModel::load(&g.dir).unwrap();
    let images = model.encode(&g.images).unwrap();
    let logits = npy::read_f32(&g.dir.join("logits.npy")).unwrap().data;
    // The bound, or transformers' own bf16 error with slack if that is larger.
    let hf = g.reference["hf_bf16_max_rel_err"].as_f64().unwrap_or(0.0) as f32;
    TextCase { ids: g.input_ids, greedy: g.greedy_ids, model, images, logits, budget: (2e-2f32).max(1.25 * hf) }
}

fn cuda_exec(c: &TextCase, block_size: usize) -> MllamaCudaExecutor {
    let opts = MllamaCudaOptions {
        block_size,
        kv_tokens: 512,
        max_step_tokens: 256,
        max_logits_rows: 64,
        cross_tiles: 16,
        ..Default::default()
    };
    MllamaCudaExecutor::new(c.model.cfg.clone(), &c.model.weights, &opts).unwrap()
}

/// `set_ablation` on the vision decoder: leaving out the cross-attention changes an image prompt's logits, an
/// empty list restores them bit for bit, and a label the decoder does not know (or a text-only one) is refused by
/// name.
#[test]
fn cuda_mllama_ablation_leaves_calls_out_and_restores() {
    if cuda_stream().is_none() {
        return;
    }
    let c = text_case(CASES[0]);
    let mut ex = cuda_exec(&c, 4);
    ex.add_images(7, &c.images).unwrap();
    let mask = c.model.mask(&c.ids, &c.images).unwrap();
    let row = mask.row_len();
    let mut alloc = BlockAllocator::new(ex.num_blocks(), ex.block_size());
    let mut table = Vec::new();
    alloc.ensure(&mut table, c.ids.len()).unwrap();
    let run = |ex: &mut MllamaCudaExecutor| {
        crate::common::chunked_prefill_with_images(ex, &c.ids, &table, (7, mask.data(), row), 5)
    };
    let full = run(&mut ex);
    ex.set_ablation(vec!["cross attention"]).unwrap();
    let ablated = run(&mut ex);
    assert!(full.iter().zip(&ablated).any(|(a, b)| a.to_bits() != b.to_bits()), "no change without cross attention");
    ex.set_ablation(Vec::new()).unwrap();
    let back = run(&mut ex);
    assert!(full.iter().zip(&back).all(|(a, b)| a.to_bits() == b.to_bits()), "the full step did not come back");
    let e = ex.set_ablation(vec!["linear gate_up"]).unwrap_err().to_string();
    assert!(e.contains("--ablate") && e.contains("\"linear gate_up\"") && e.contains("cross attention"), "{e}");
}

#[test]
fn cuda_mllama_logits_and_greedy_match_transformers() {
    if cuda_stream().is_none() {
        return;
    }
    for name in CASES {
        let c = text_case(name);
        let mut ex = cuda_exec(&c, 4);
        ex.add_images(7, &c.images).unwrap();
        let mask = c.model.mask(&c.ids, &c.images).unwrap();
        let row = mask.row_len();
        let vocab = c.model.cfg.text.base.vocab_size;
        let mut alloc = BlockAllocator::new(ex.num_blocks(), ex.block_size());
        let mut table = Vec::new();
        alloc.ensure(&mut table, c.ids.len() + c.greedy.len()).unwrap();
        // Chunked prefill (5 tokens) with every row's logits.
        let logits = crate::common::chunked_prefill_with_images(&mut ex, &c.ids, &table, (7, mask.data(), row), 5);
        let e = max_rel(&logits, &c.logits);
        eprintln!("{name}: CUDA logits max rel {e:.2e} (budget {:.2e})", c.budget);
        assert!(e <= c.budget, "{name}: logits differ by {e:.2e}");
        // Greedy decode with teacher forcing on transformers' ids; each pick must match where the margin is clear.
        let last = mask.row(c.ids.len() - 1).to_vec();
        let mut next = argmax(&logits[logits.len() - vocab..]);
        assert_eq!(next, c.greedy[0], "{name}: first greedy id");
        for (i, pos) in (c.ids.len()..c.ids.len() + c.greedy.len() - 1).enumerate() {
            let chunk =
                SeqChunk { tokens: &[c.greedy[i]], start_pos: pos, block_table: &table, logits: LogitsWanted::Last };
            let step = build_step(&[chunk], ex.block_size()).unwrap();
            let out = ex.step_with_images(&step, &[Some(SeqImages { key: 7, mask: &last })]).unwrap();
            next = argmax(&out.logits);
            assert_eq!(next, c.greedy[i + 1], "{name}: greedy id {}", i + 1);
        }
        assert!(ex.remove_images(7));
        assert!(!ex.remove_images(7));
    }
}

#[test]
fn cuda_mixed_batch_matches_cpu_executor() {
    if cuda_stream().is_none() {
        return;
    }
    let c = text_case("mllama-two-images");
    let mask = c.model.mask(&c.ids, &c.images).unwrap();
    let text: Vec<u32> = c.ids.iter().copied().filter(|&t| t != c.model.cfg.image_token_index).collect();
    let vocab = c.model.cfg.text.base.vocab_size;
    let w = MllamaModel::load(&c.model.dir).unwrap().weights;
    let mut cpu = MllamaCpuExecutor::new(c.model.cfg.clone(), w, 512, 8).unwrap();
    let mut gpu = cuda_exec(&c, 8);
    let mut results = Vec::new();
    let execs: [&mut dyn Executor; 2] = [&mut cpu, &mut gpu];
    for ex in execs {
        ex.add_images(1, &c.images).unwrap();
        let mut alloc = BlockAllocator::new(ex.num_blocks(), ex.block_size());
        let [tb, ta] = crate::common::interleaved_tables(&mut alloc, [text.len() + 2, c.ids.len() + 2]);
        let chunks = [
            SeqChunk { tokens: &text, start_pos: 0, block_table: &tb, logits: LogitsWanted::Last },
            SeqChunk { tokens: &c.ids, start_pos: 0, block_table: &ta, logits: LogitsWanted::Last },
        ];
        let step = build_step(&chunks, ex.block_size()).unwrap();
        let mut out =
            ex.step_with_images(&step, &[None, Some(SeqImages { key: 1, mask: mask.data() })]).unwrap().logits;
        // A decode step of both (the vision one repeats its last mask row), then a text-only step of the first.
        let (a, b) = (argmax(&out[..vocab]), argmax(&out[vocab..]));
        let last = mask.row(c.ids.len() - 1).to_vec();
        let chunks = [
            SeqChunk { tokens: &[a], start_pos: text.len(), block_table: &tb, logits: LogitsWanted::Last },
            SeqChunk { tokens: &[b], start_pos: c.ids.len(), block_table: &ta, logits: LogitsWanted::Last },
        ];
        let step = build_step(&chunks, ex.block_size()).unwrap();
        out.extend(ex.step_with_images(&step, &[None, Some(SeqImages { key: 1, mask: &last })]).unwrap().logits);
        let chunks = [SeqChunk {
            tokens: &[argmax(&out[2 * vocab..3 * vocab])],
            start_pos: text.len() + 1,
            block_table: &tb,
            logits: LogitsWanted::Last,
        }];
        out.extend(ex.step(&build_step(&chunks, ex.block_size()).unwrap()).unwrap().logits);
        results.push(out);
    }
    let e = max_rel(&results[1], &results[0]);
    eprintln!("mixed batch: CUDA vs CPU max rel {e:.2e}");
    assert!(e <= c.budget, "mixed batch differs by {e:.2e}");
    for (r, (g, w)) in results[1].chunks(vocab).zip(results[0].chunks(vocab)).enumerate() {
        assert_eq!(argmax(g), argmax(w), "mixed batch row {r}: argmax");
    }
}

/// The vision executor's device picking: a step with images (a text-only sequence, masked, and an image prompt with
/// every row scored by its next prompt token, the image tokens among them) through `step_scored` on the device
/// against `host_step_scored` on the same executor and step (the same picks, ranks and alternatives, close
/// log-probabilities), then greedy and sampled decode steps against the argmax and the CPU sampler of the logits.
#[test]
fn cuda_mllama_scored_step_matches_host() {
    use llama32::exec::scored::ScoreRow;
    use llama32::exec::SampleSeq;
    use llama32::sampling::{Sampler, SamplingParams, TokenMask};
    if cuda_stream().is_none() {
        return;
    }
    let c = text_case("mllama-two-images");
    let mask = c.model.mask(&c.ids, &c.images).unwrap();
    let text: Vec<u32> = c.ids.iter().copied().filter(|&t| t != c.model.cfg.image_token_index).collect();
    let vocab = c.model.cfg.text.base.vocab_size;
    let mut ex = cuda_exec(&c, 8);
    ex.add_images(1, &c.images).unwrap();
    let mut alloc = BlockAllocator::new(ex.num_blocks(), ex.block_size());
    let [tb, ta] = crate::common::interleaved_tables(&mut alloc, [text.len() + 2, c.ids.len() + 2]);
    // Row 0: the text-only sequence's last; rows 1..=n: the image prompt's every row (its last sampled).
    let chunks = [
        SeqChunk { tokens: &text, start_pos: 0, block_table: &tb, logits: LogitsWanted::Last },
        SeqChunk { tokens: &c.ids, start_pos: 0, block_table: &ta, logits: LogitsWanted::All },
    ];
    let step = build_step(&chunks, ex.block_size()).unwrap();
    let images = [None, Some(SeqImages { key: 1, mask: mask.data() })];
    let n = c.ids.len();
    let sample_rows = [0, n];
    let mut allowed = TokenMask::new(vocab);
    (1..vocab as u32).step_by(3).for_each(|t| allowed.allow(t));
    let masks = vec![Some(allowed.clone()), None];
    let mut scores: Vec<ScoreRow> =
        (0..n - 1).map(|i| ScoreRow { row: 1 + i, id: Some(c.ids[i + 1]), top: 3 }).collect();
    scores.push(ScoreRow { row: 0, id: None, top: 4 });
    scores.push(ScoreRow { row: n, id: None, top: 0 });
    // A penalty on the second sequence: its lists are a window at index 1 (rows 0 and n are two runs).
    let params = [
        SamplingParams { temperature: 0.9, seed: Some(11), ..SamplingParams::default() },
        SamplingParams { repetition_penalty: 1.2, ..SamplingParams::greedy() },
    ];
    let prompts: [&[u32]; 2] = [&text, &c.ids];
    let scored = crate::scored::Scored {
        images: &images,
        params: &params,
        prompts: &prompts,
        sample_rows: &sample_rows,
        masks: &masks,
        scores: &scores,
    };
    let (dev_ids, _) = scored.check("mllama-two-images", &mut ex, &step);
    assert!(allowed.allows(dev_ids[0]), "pick {} outside its mask", dev_ids[0]);
    // A decode step of the text-only sequence, three times over the same cache slots: its logits, then greedy and
    // sampled picks on the device against the argmax and the CPU sampler of those logits.
    let chunk = SeqChunk { tokens: &[dev_ids[0]], start_pos: text.len(), block_table: &tb, logits: LogitsWanted::Last };
    let decode = build_step(&[chunk], ex.block_size()).unwrap();
    let logits = ex.step(&decode).unwrap().logits;
    assert_eq!(ex.step_greedy(&decode).unwrap(), vec![argmax(&logits)], "greedy");
    let p = SamplingParams { temperature: 1.0, top_p: 0.9, seed: Some(5), ..SamplingParams::default() };
    let mut on_device = Sampler::new(&p, &text);
    let seq = SampleSeq { params: &p, sampler: &mut on_device, prompt: &text, output: &[] };
    let picked = ex.step_sample(&decode, &mut [seq]).unwrap();
    assert_eq!(picked, vec![Sampler::new(&p, &text).sample(&logits)], "sampled");
    eprintln!("vision scored step on the device matches the host ({} entries, picks {dev_ids:?})", scores.len());
}

/// Decode steps replayed from CUDA graphs equal the eager steps bit for bit: a batch of two vision sequences (on
/// two image sets) and a text-only one (bucket 4, one padding row), then the text-only and one vision sequence
/// (bucket 2), then the text-only one alone and the vision one alone (both bucket 1: the same graph must serve a
/// step without images and one with). The golden case's head_dim 16 takes the generic attention (no KV splits) and
/// every projection the skinny GEMM, whose rows are independent, so padding cannot change a real row.
#[test]
fn cuda_mllama_graph_decode_equals_eager() {
    if cuda_stream().is_none() {
        return;
    }
    let c = text_case("mllama-two-images");
    let mask = c.model.mask(&c.ids, &c.images).unwrap();
    let last = mask.row(c.ids.len() - 1).to_vec();
    let text: Vec<u32> = c.ids.iter().copied().filter(|&t| t != c.model.cfg.image_token_index).collect();
    let prompts: [&[u32]; 3] = [&c.ids, &text, &c.ids];
    // Sequence 0 sees image set 1, sequence 2 set 2 (the same images at another place in the pool), 1 none.
    let keys = [Some(1u64), None, Some(2u64)];
    let stages: [&[usize]; 4] = [&[0, 1, 2], &[0, 1], &[1], &[0]];
    let rounds = 3;
    let mut results = Vec::new();
    for graphs in [0, 256] {
        let opts = MllamaCudaOptions {
            block_size: 8,
            kv_tokens: 512,
            max_step_tokens: 256,
            max_logits_rows: 64,
            cross_tiles: 16,
            max_graph_batch: graphs,
            ..Default::default()
        };
        let mut ex = MllamaCudaExecutor::new(c.model.cfg.clone(), &c.model.weights, &opts).unwrap();
        ex.add_images(1, &c.images).unwrap();
        ex.add_images(2, &c.images).unwrap();
        let mut alloc = BlockAllocator::new(ex.num_blocks(), ex.block_size());
        // Equal table lengths keep the block-table width (part of a graph's key) the same in every step.
        let capacity = c.ids.len() + stages.len() * rounds + 1;
        let mut tables: Vec<Vec<u32>> = vec![Vec::new(); 3];
        for t in tables.iter_mut() {
            alloc.ensure(t, capacity).unwrap();
        }
        let mut logits = Vec::new();
        for s in 0..3 {
            let chunk =
                SeqChunk { tokens: prompts[s], start_pos: 0, block_table: &tables[s], logits: LogitsWanted::Last };
            let step = build_step(&[chunk], ex.block_size()).unwrap();
            let im = keys[s].map(|key| SeqImages { key, mask: mask.data() });
            logits.extend(ex.step_with_images(&step, &[im]).unwrap().logits);
        }
        let mut pos: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let mut decode_steps = 0u64;
        for (stage, active) in stages.iter().enumerate() {
            for round in 0..rounds {
                // Distinct tokens per sequence and round, so that no two rows compute the same thing.
                let toks: Vec<u32> =
                    active.iter().map(|&s| text[(7 * s + 3 * (stage * rounds + round)) % text.len()]).collect();
                let chunks: Vec<SeqChunk<'_>> = active
                    .iter()
                    .zip(&toks)
                    .map(|(&s, tok)| SeqChunk {
                        tokens: std::slice::from_ref(tok),
                        start_pos: pos[s],
                        block_table: &tables[s],
                        logits: LogitsWanted::Last,
                    })
                    .collect();
                let step = build_step(&chunks, ex.block_size()).unwrap();
                let images: Vec<Option<SeqImages<'_>>> =
                    active.iter().map(|&s| keys[s].map(|key| SeqImages { key, mask: &last })).collect();
                let out = if images.iter().all(Option::is_none) {
                    ex.step(&step).unwrap()
                } else {
                    ex.step_with_images(&step, &images).unwrap()
                };
                logits.extend(out.logits);
                for &s in active.iter() {
                    pos[s] += 1;
                }
                decode_steps += 1;
            }
        }
        let (captures, replays) = ex.graph_counts();
        if graphs == 0 {
            assert_eq!((captures, replays), (0, 0), "graphs off: every step eager");
        } else {
            // Buckets 4, 2 and 1: the vision-only stage reuses the bucket-1 graph the text-only stage captured.
            assert_eq!(captures, 3, "one graph per batch bucket");
            assert_eq!(replays, decode_steps, "every decode step replays a graph");
        }
        results.push(logits);
    }
    let vocab = c.model.cfg.text.base.vocab_size;
    assert_eq!(results[0].len(), results[1].len());
    for (r, (g, e)) in results[1].chunks(vocab).zip(results[0].chunks(vocab)).enumerate() {
        let diff = g.iter().zip(e).position(|(a, b)| a.to_bits() != b.to_bits());
        if let Some(i) = diff {
            panic!("logits row {r}, column {i}: graph {} vs eager {}", g[i], e[i]);
        }
    }
}

#[test]
fn cuda_executor_rejects_bad_image_references() {
    if cuda_stream().is_none() {
        return;
    }
    let c = text_case("mllama-resize");
    let mut ex = cuda_exec(&c, 4);
    let mut table = Vec::new();
    BlockAllocator::new(ex.num_blocks(), ex.block_size()).ensure(&mut table, c.ids.len()).unwrap();
    let step = build_step(
        &[SeqChunk { tokens: &c.ids, start_pos: 0, block_table: &table, logits: LogitsWanted::Last }],
        ex.block_size(),
    )
    .unwrap();
    let mask = c.model.mask(&c.ids, &c.images).unwrap();
    // Not registered, then a mask of the wrong length.
    assert!(ex.step_with_images(&step, &[Some(SeqImages { key: 3, mask: mask.data() })]).is_err());
    ex.add_images(3, &c.images).unwrap();
    assert!(ex.step_with_images(&step, &[Some(SeqImages { key: 3, mask: &mask.data()[1..] })]).is_err());
    // Too many images for the pool.
    let many = EncodedImages { states: c.images.states.repeat(5), num_tiles: c.images.num_tiles.repeat(5) };
    assert!(ex.add_images(4, &many).is_err(), "16 tiles already hold 4; 20 more do not fit");
}

/// The 11B vision config with random weights (only the vision part is generated for the encoder bench).
fn bench_11b() -> llama32::vision::config::MllamaConfig {
    llama32::vision::config::MllamaPreset::Vision11B.config()
}

#[test]
#[ignore = "benchmark: 11B vision encoder, one 4-tile image (run by scripts/gpu-suite.sh)"]
fn bench_vision_encoder_11b() {
    let Some(s) = cuda_stream() else { return };
    let mut cfg = bench_11b();
    // Only the vision weights and the projector are needed: a one-layer text model keeps generation cheap.
    cfg.text.base.num_hidden_layers = 1;
    cfg.text.cross_attention_layers = vec![0];
    let w = llama32::vision::weights::MllamaWeights::random(&cfg, 1).unwrap();
    let enc = CudaVisionEncoder::new(&cfg, &w, s.clone()).unwrap();
    let v = &cfg.vision;
    let px = randn(5, v.max_num_tiles * v.num_channels * v.image_size * v.image_size, 1.0);
    let (ids, mask) = ([6i64], vec![1i64; v.max_num_tiles]);
    let _ = enc.encode(&px, 1, &ids, &mask).unwrap();
    s.synchronize().unwrap();
    let mut times = Vec::new();
    for _ in 0..3 {
        let t0 = std::time::Instant::now();
        let _out = enc.encode(&px, 1, &ids, &mask).unwrap();
        s.synchronize().unwrap();
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!("BENCH vision_encoder_11b_4tiles_ms {:.2}", times[1]);
}

#[test]
#[ignore = "benchmark: 11B decode with 4-tile images, batch 1 and 16 (run by scripts/gpu-suite.sh)"]
fn bench_mllama_11b_decode() {
    if cuda_stream().is_none() {
        return;
    }
    let cfg = bench_11b();
    let w = llama32::vision::weights::MllamaWeights::random(&cfg, 1).unwrap();
    // Room for 16 sequences of 128 + 80 tokens and 16 four-tile images.
    let opts = MllamaCudaOptions {
        kv_tokens: 16 * 208,
        max_step_tokens: 512,
        max_logits_rows: 16,
        cross_tiles: 16 * 4,
        ..Default::default()
    };
    let mut ex = MllamaCudaExecutor::new(cfg.clone(), &w, &opts).unwrap();
    crate::cuda_vision_quant::bench_decode(&mut ex, &cfg, "11b");
    // The same with the norm prologue fusion (off by default), on the same weights: its A/B.
    ex.set_fuse_norm(true);
    crate::cuda_vision_quant::bench_decode(&mut ex, &cfg, "11b_fused_norm");
}
