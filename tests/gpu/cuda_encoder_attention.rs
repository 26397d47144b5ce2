//! The vision encoder's tensor-core attention (`kernels/vision/encoder_attention.cu`) against its CPU twin, the
//! gather attention over one block per image: every built head width, sequences that are not a multiple of the
//! 64-row tiles, several images, transformers' flag mask (with an image whose rows are all flagged: a uniform
//! softmax), no mask, and a strided output whose gaps must keep their poison. The ignored bench times the 11B
//! encoder's shape (one 4-tile image: 6432 rows, 16 heads of 80).

use std::sync::Arc;

use cudarc::driver::CudaStream;
use half::bf16;
use llama32::ops::cuda::encoder_attention::{
    encoder_attention, encoder_attention_supports, EncoderAttnIo, EncoderAttnShape,
};
use llama32::ops::cuda::vision::GatherAttnShape;
use llama32::vision::cuda::twins;

use crate::common::{cuda_stream, download, to_f32, upload};
use crate::cuda_vision::{bf, randn, up_bf16};

const POISON: f32 = 1.0e30;

/// `n` normal values rounded to bf16, from `seed`.
fn bf16_values(seed: u64, n: usize) -> Vec<f32> {
    bf(&randn(seed, n, 1.0))
}

/// One case: `images` sequences of `seq` rows, fused qkv rows (q at 0, k at dim, v at 2 dim), output rows of
/// `dim + out_pad`. `flags`: the row flags, or None.
fn check_case(
    s: &Arc<CudaStream>,
    heads: usize,
    hd: usize,
    images: usize,
    seq: usize,
    flags: Option<Vec<u8>>,
    out_pad: usize,
) {
    let dim = heads * hd;
    let rows = images * seq;
    let out_stride = dim + out_pad;
    let qkv = bf16_values((heads * 1000 + hd * 10 + seq) as u64, rows * 3 * dim);
    let kv_len = rows * 3 * dim - 2 * dim;
    let shape = GatherAttnShape {
        num_heads: heads,
        num_kv_heads: heads,
        head_dim: hd,
        block_size: seq,
        max_blocks_per_seq: 1,
        q_stride: 3 * dim,
        out_stride,
        kv_stride: 3 * dim,
        scale: (hd as f32).powf(-0.5),
    };
    let seq_of: Vec<u32> = (0..rows).map(|r| (r / seq) as u32).collect();
    let positions = vec![(seq - 1) as u32; rows];
    let tables: Vec<u32> = (0..images as u32).collect();
    let mut want = vec![POISON; rows * out_stride];
    let f = flags.as_deref();
    twins::gather_attention(
        &shape,
        &qkv,
        &qkv[dim..dim + kv_len],
        &qkv[2 * dim..2 * dim + kv_len],
        &seq_of,
        &positions,
        &tables,
        f.map(|f| (f, f)),
        &mut want,
    );

    let d = up_bf16(s, &qkv);
    let (q, k, v) = (d.slice(..), d.slice(dim..), d.slice(2 * dim..));
    let fd = flags.as_ref().map(|f| upload(s, f));
    let io = EncoderAttnIo { q: &q, k: &k, v: &v, flags: fd.as_ref() };
    let es = EncoderAttnShape {
        num_seqs: images,
        seq_len: seq,
        num_heads: heads,
        head_dim: hd,
        q_stride: 3 * dim,
        kv_stride: 3 * dim,
        out_stride,
        scale: shape.scale,
    };
    let mut out = up_bf16(s, &vec![POISON; rows * out_stride]);
    encoder_attention(s, &es, &io, &mut out).unwrap();
    let got = to_f32(&download(s, &out));
    let name = format!("{images} x {seq} rows, {heads} x {hd}, flags {}, pad {out_pad}", flags.is_some());
    let mut worst = 0f32;
    for (r, (g_row, w_row)) in got.chunks(out_stride).zip(want.chunks(out_stride)).enumerate() {
        for (i, (&g, &w)) in g_row.iter().zip(w_row).enumerate().skip(dim) {
            assert_eq!(w, POISON, "{name}: the twin wrote row {r} element {i}, outside the heads");
            assert_eq!(
                g,
                bf16::from_f32(POISON).to_f32(),
                "{name}: row {r} element {i}, outside the heads, was written"
            );
        }
        // bf16 output and bf16 probabilities in P V: per (row, head), 2^-7 of the head's largest output plus 1e-3,
        // the paged attention kernels' rule (`cuda_attention::assert_close`). Outputs here are ~0.1, so an absolute
        // floor of 1e-2 would hide a dropped key tile.
        for (h, (gh, wh)) in g_row[..dim].chunks(hd).zip(w_row[..dim].chunks(hd)).enumerate() {
            let tol = wh.iter().fold(0f32, |m, x| m.max(x.abs())) / 128.0 + 1e-3;
            for (c, (&g, &w)) in gh.iter().zip(wh).enumerate() {
                let e = (g - w).abs() / tol;
                let e = if e.is_nan() { f32::INFINITY } else { e };
                assert!(e <= 1.0, "{name}: row {r} head {h} dim {c}: got {g} want {w} (tolerance {tol:e})");
                worst = worst.max(e);
            }
        }
    }
    eprintln!("{name}: worst error {worst:.3} of the tolerance");
}

#[test]
fn encoder_attention_matches_cpu() {
    let Some(s) = cuda_stream() else { return };
    for hd in [16, 32, 64, 80, 128] {
        assert!(encoder_attention_supports(hd), "head_dim {hd} should be built");
    }
    // Flags as the encoder sets them: the padding patches of each tile (here the last 3 of every 34 rows) and whole
    // padding tiles (the last image is all padding: its rows see a uniform softmax).
    let tile_flags = |images: usize, seq: usize, all_last: bool| -> Vec<u8> {
        (0..images * seq).map(|r| u8::from(r % 34 >= 31 || (all_last && r / seq == images - 1))).collect()
    };
    check_case(&s, 2, 16, 3, 40, Some(tile_flags(3, 40, true)), 0);
    check_case(&s, 16, 80, 2, 136, Some(tile_flags(2, 136, false)), 0);
    check_case(&s, 4, 32, 1, 64, None, 0);
    check_case(&s, 3, 64, 2, 100, Some(tile_flags(2, 100, false)), 8);
    check_case(&s, 2, 128, 1, 200, Some(tile_flags(1, 200, true)), 2);
    check_case(&s, 5, 80, 1, 520, Some((0..520).map(|r| u8::from(r >= 390 || r % 130 >= 127)).collect()), 0);
    check_case(&s, 1, 80, 4, 1, None, 0);
}

#[test]
fn encoder_attention_rejects_bad_shapes() {
    let Some(s) = cuda_stream() else { return };
    assert!(!encoder_attention_supports(8) && !encoder_attention_supports(96) && !encoder_attention_supports(0));
    let buf = up_bf16(&s, &vec![0.0; 4 * 3 * 64]);
    let mut out = up_bf16(&s, &vec![0.0; 4 * 64]);
    let view = buf.slice(..);
    let io: EncoderAttnIo<'_, _, cudarc::driver::CudaSlice<u8>> =
        EncoderAttnIo { q: &view, k: &view, v: &view, flags: None };
    let good = EncoderAttnShape {
        num_seqs: 2,
        seq_len: 2,
        num_heads: 4,
        head_dim: 16,
        q_stride: 192,
        kv_stride: 192,
        out_stride: 64,
        scale: 0.25,
    };
    encoder_attention(&s, &good, &io, &mut out).unwrap();
    for (what, bad) in [
        ("head_dim 8", EncoderAttnShape { head_dim: 8, num_heads: 8, ..good }),
        ("q stride below the heads", EncoderAttnShape { q_stride: 56, ..good }),
        ("misaligned kv stride", EncoderAttnShape { kv_stride: 191, ..good }),
        ("too many rows for q", EncoderAttnShape { num_seqs: 3, ..good }),
        ("zero scale", EncoderAttnShape { scale: 0.0, ..good }),
        ("empty sequences", EncoderAttnShape { seq_len: 0, ..good }),
    ] {
        assert!(encoder_attention(&s, &bad, &io, &mut out).is_err(), "{what} should be rejected");
    }
    let few = upload(&s, &[0u8; 3]);
    let io = EncoderAttnIo { q: &view, k: &view, v: &view, flags: Some(&few) };
    assert!(encoder_attention(&s, &good, &io, &mut out).is_err(), "3 flags for 4 rows should be rejected");
}

/// The 11B / 90B encoder's attention for one 4-tile image: 4 x 1608 rows, 16 heads of 80, fused qkv rows of 3840.
#[test]
#[ignore = "benchmark: encoder attention at the 11B shapes (run by scripts/gpu-suite.sh)"]
fn bench_encoder_attention_11b() {
    let Some(s) = cuda_stream() else { return };
    let (heads, hd, seq) = (16usize, 80usize, 4 * 1608usize);
    let dim = heads * hd;
    let qkv = up_bf16(&s, &bf16_values(3, seq * 3 * dim));
    let flags = upload(&s, &(0..seq).map(|r| u8::from(r % 1608 >= 1601)).collect::<Vec<_>>());
    let (q, k, v) = (qkv.slice(..), qkv.slice(dim..), qkv.slice(2 * dim..));
    let io = EncoderAttnIo { q: &q, k: &k, v: &v, flags: Some(&flags) };
    let shape = EncoderAttnShape {
        num_seqs: 1,
        seq_len: seq,
        num_heads: heads,
        head_dim: hd,
        q_stride: 3 * dim,
        kv_stride: 3 * dim,
        out_stride: dim,
        scale: (hd as f32).powf(-0.5),
    };
    let mut out = up_bf16(&s, &vec![0.0; seq * dim]);
    for _ in 0..3 {
        encoder_attention(&s, &shape, &io, &mut out).unwrap();
    }
    let mut times = Vec::new();
    for _ in 0..10 {
        let start = s.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        for _ in 0..5 {
            encoder_attention(&s, &shape, &io, &mut out).unwrap();
        }
        let end = s.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        times.push(start.elapsed_ms(&end).unwrap() as f64 / 5.0 * 1e-3);
    }
    times.sort_by(f64::total_cmp);
    let t = times[times.len() / 2];
    let flops = 4.0 * (seq * seq * heads * hd) as f64;
    eprintln!("encoder_attention 11b 1 x {seq} rows 16 x 80: {:8.1} us {:6.1} TFLOP/s", t * 1e6, flops / t / 1e12);
}
