//! Twin tests of the int8 embedding / lm_head tables on CUDA (`kernels/embedding.cu` with scales,
//! `kernels/quant/table_int8.cu`, wrappers in `ops::cuda::quant::table`) against their CPU twins, on fresh random
//! tables with every output poisoned before each launch, an end-to-end check of a golden model with int8 tables,
//! and the lm_head throughput bench. The bounds are those of `cuda_quant` (`within_gemm_bound`).
//!
//! Without a CUDA build or a device, each test prints "skipped: no CUDA device" and returns.

use half::bf16;
use llama32::ops::cpu::linear::linear;
use llama32::ops::cuda::embedding;
use llama32::ops::cuda::quant::{dequant_rows, gemv_int8, CudaInt8Table};
use llama32::quant::{Int8Table, Scheme};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::{cuda_stream as stream, download, to_f32, upload};
use crate::cuda_quant::{bench_stream, random_rows, row_rms, same_bits, within_gemm_bound, SEED};

/// A random int8 table (per-row bf16 scales spread over two decades) and its exact f32 dequantization.
fn random_int8_table(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Int8Table {
    let q: Vec<i8> = (0..rows * cols).map(|_| rng.random_range(-128i32..=127) as i8).collect();
    let scales = (0..rows).map(|_| bf16::from_f32(10f32.powf(rng.random_range(-4.0f32..-2.0))).to_f32()).collect();
    Int8Table { rows, cols, q, scales }
}

/// `embed_int8` writes bit for bit what `embed` gathers from the bf16 rounding of the dequantized table (the CUDA
/// path of a bf16-uploaded int8 checkpoint), on the vector path (cols a multiple of 8) and the scalar one, with
/// repeated ids; `dequant_rows` is the same gather over a range of rows.
#[test]
fn embed_int8_equals_embed_of_the_rounded_table() {
    let Some(stream) = stream() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 5);
    for (rows, cols) in [(37, 8), (300, 2048), (41, 12), (5, 1)] {
        let t = random_int8_table(&mut rng, rows, cols);
        let dev = CudaInt8Table::upload(&stream, &t, "table").unwrap();
        let rounded: Vec<bf16> = t.dequantize().iter().map(|&v| bf16::from_f32(v)).collect();
        let table_bf16 = upload(&stream, &rounded);
        let ids: Vec<u32> = (0..23).map(|i| ((i * 7 + 3) % rows) as u32).chain([0, (rows - 1) as u32, 0]).collect();
        let ids_d = upload(&stream, &ids);
        let mut a = upload(&stream, &vec![bf16::NAN; ids.len() * cols]);
        let mut b = upload(&stream, &vec![bf16::NAN; ids.len() * cols]);
        embedding::embed_int8(&stream, dev.parts(), cols, &ids_d, &mut a).unwrap();
        embedding::embed(&stream, &table_bf16, cols, &ids_d, &mut b).unwrap();
        assert!(same_bits(&download(&stream, &a), &download(&stream, &b)), "embed_int8 [{rows}, {cols}]");
        let (r0, r1) = (rows / 3, rows);
        let mut d = upload(&stream, &vec![bf16::NAN; rows * cols]);
        dequant_rows(&stream, &dev, r0..r1, &mut d).unwrap();
        let d = download(&stream, &d);
        assert!(same_bits(&d[..(r1 - r0) * cols], &rounded[r0 * cols..r1 * cols]), "dequant_rows [{rows}, {cols}]");
        assert!(d[(r1 - r0) * cols..].iter().all(|v| v.is_nan()), "dequant_rows wrote past its rows");
    }
    // Bad operands are named.
    let t = random_int8_table(&mut rng, 4, 16);
    let dev = CudaInt8Table::upload(&stream, &t, "table").unwrap();
    let ids = upload(&stream, &[0u32, 1]);
    let mut out = upload(&stream, &[bf16::NAN; 30]);
    let e = embedding::embed_int8(&stream, dev.parts(), 16, &ids, &mut out).unwrap_err().to_string();
    assert!(e.contains("`out`"), "{e}");
    let e = dequant_rows(&stream, &dev, 3..5, &mut out).unwrap_err().to_string();
    assert!(e.contains("rows 3..5"), "{e}");
    let bad = Int8Table { scales: vec![1.0, 0.1, 1.0, 1.0], ..t };
    let e = CudaInt8Table::upload(&stream, &bad, "lm_head").err().unwrap().to_string();
    assert!(e.contains("lm_head") && e.contains("row 1"), "{e}");
}

/// `gemv_int8` against `linear` over the dequantized table in f32, with the bound of `check_w4a16` (one bf16
/// rounding, and summation slack), twice for determinism, on odd shapes and the 1B lm_head's k; it writes nothing
/// past `[m, n]`, and refuses what it does not take.
#[test]
fn gemv_int8_matches_cpu() {
    let Some(stream) = stream() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 6);
    for (n, k) in [(1, 16), (17, 48), (1001, 128), (40, 2048), (4099, 2048)] {
        let t = random_int8_table(&mut rng, n, k);
        let w32 = t.dequantize();
        let w_rms = row_rms(&w32, k);
        let dev = CudaInt8Table::upload(&stream, &t, "table").unwrap();
        for m in [1, 2, 5, 8, 9, 16] {
            let what = format!("gemv_int8 m {m} n {n} k {k}");
            let x = random_rows(&mut rng, m, k, (-1.0, 1.0), false);
            let x32 = to_f32(&x);
            let x_rms = row_rms(&x32, k);
            let mut want = vec![f32::NAN; m * n];
            linear(&x32, &w32, m, k, n, &mut want);
            let x_d = upload(&stream, &x);
            let run = || {
                let mut out = upload(&stream, &vec![bf16::NAN; m * n + 64]);
                gemv_int8(&stream, &x_d, &dev, m, &mut out).unwrap_or_else(|e| panic!("{what}: {e}"));
                download(&stream, &out)
            };
            let got = run();
            assert!(got[m * n..].iter().all(|v| v.is_nan()), "{what}: wrote past m x n");
            let worst = within_gemm_bound(&got, &want, (m, n, k), (&x_rms, &w_rms), &what);
            assert!(same_bits(&run(), &got), "{what}: a second run gave different bits");
            eprintln!("{what}: worst error {worst:.3} of the tolerance");
        }
    }
    let t = random_int8_table(&mut rng, 8, 32);
    let dev = CudaInt8Table::upload(&stream, &t, "table").unwrap();
    let x = upload(&stream, &vec![bf16::ONE; 17 * 32]);
    let mut out = upload(&stream, &vec![bf16::NAN; 17 * 8]);
    for (m, what) in [(0, "m is 0"), (17, "m is 17")] {
        let e = gemv_int8(&stream, &x, &dev, m, &mut out).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    }
    let e = gemv_int8(&stream, &x.slice(..31), &dev, 1, &mut out).unwrap_err().to_string();
    assert!(e.contains("`x`"), "{e}");
}

/// An int8-embeddings model on CUDA: the tables stay int8 on the device (embedding gather, the int8 skinny GEMM for
/// the lm_head at decode, chunks through cuBLASLt at prefill), the logits stay close to the CPU reference over the
/// same (dequantized) tables, and the device holds fewer weight bytes than with the tables uploaded as bf16.
#[test]
fn int8_tables_on_cuda_match_cpu() {
    use llama32::config::LlamaConfig;
    use llama32::exec::cpu::CpuExecutor;
    use llama32::exec::cuda::{CudaExecutor, CudaOptions};
    use llama32::exec::generate::score;
    use llama32::weights::{Checkpoint, ModelWeights};
    if let Err(e) = llama32::ops::cuda::probe() {
        eprintln!("skipped: no CUDA device ({e})");
        return;
    }
    for name in ["cuda-d64-gqa4", "cuda-d128-gqa3"] {
        let dir = crate::common::golden_dir(name);
        let mut cfg = LlamaConfig::from_model_dir(&dir).unwrap();
        cfg.merge_generation_config(&dir).unwrap();
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let ids: Vec<u32> =
            reference["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let budget = |k: &str| 2.0 * reference[k].as_f64().unwrap() as f32;
        let mut w = ModelWeights::load(&Checkpoint::open(&dir).unwrap(), &cfg, &|_| {}).unwrap();
        w.quantize_in_place(Scheme::W4A16_G32).unwrap();
        let bf16_tables = w.clone();
        w.quantize_tables_int8().unwrap();
        let mut cpu = CpuExecutor::with_capacity(cfg.clone(), w.clone(), 1024, 16).unwrap();
        let want = score(&mut cpu, &ids, 512).unwrap();
        let opts = CudaOptions { kv_tokens: Some(1024), max_step_tokens: 512, ..Default::default() };
        let mut cuda = CudaExecutor::from_weights(cfg.clone(), &w, &opts).unwrap();
        for chunk in [512usize, 7, 1] {
            let got = score(&mut cuda, &ids, chunk).unwrap();
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(got.iter().all(|x| x.is_finite()), "{name} chunk {chunk}: non-finite logits");
            let max = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
            let (bmax, _) = (budget("hf_bf16_max_rel_err"), budget("hf_bf16_mean_rel_err"));
            eprintln!("{name} int8 tables chunk {chunk}: max rel {max:.2e} (budget {bmax:.2e})");
            assert!(max <= bmax, "{name} chunk {chunk}: logits too far from the CPU reference");
        }
        let plain = CudaExecutor::from_weights(cfg.clone(), &bf16_tables, &opts).unwrap();
        let tables = (1 + usize::from(w.lm_head.is_some())) * cfg.vocab_size * cfg.hidden_size;
        eprintln!("{name}: weight bytes {} with int8 tables, {} with bf16", cuda.weight_bytes(), plain.weight_bytes());
        assert!(cuda.weight_bytes() < plain.weight_bytes(), "{name}: the int8 tables take fewer bytes");
        assert!(plain.weight_bytes() - cuda.weight_bytes() <= tables, "{name}: at most the tables' bf16 half saved");
    }
}

/// The int8 lm_head (`gemv_int8`) at m = 1 and 16 on the 1B, 3B and 90B lm_head shapes (vocabulary 128256), beside
/// the bf16 skinny GEMM over the same table in bf16, in the same process: GPU time per call from CUDA graphs of 20
/// calls (as `quant_throughput`; both tables are far larger than L2). GB/s count the table's bytes (int8 + scales,
/// or bf16).
#[test]
#[ignore]
fn int8_lm_head_throughput() {
    use crate::cuda_gemv::time_graph;
    let Some(stream) = bench_stream() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 10);
    for (name, n, k) in
        [("1b lm_head", 128_256usize, 2048usize), ("3b lm_head", 128_256, 3072), ("90b lm_head", 128_256, 8192)]
    {
        // Timing values: hashed int8 and one scale (the values do not change the timing).
        let q: Vec<i8> = (0..n * k).map(|i| ((i * 2_654_435_761usize) >> 9) as i8).collect();
        let t = Int8Table { rows: n, cols: k, q, scales: vec![0.01; n] };
        let dev = CudaInt8Table::upload(&stream, &t, name).unwrap();
        drop(t);
        let mut dense = stream.alloc_zeros::<bf16>(n * k).expect("alloc");
        dequant_rows(&stream, &dev, 0..n, &mut dense).unwrap();
        for m in [1usize, 16] {
            let x = upload(&stream, &random_rows(&mut rng, m, k, (-1.0, 0.0), false));
            let mut out = stream.alloc_zeros::<bf16>(m * n).expect("alloc");
            let ours = time_graph(&stream, &mut |_| gemv_int8(&stream, &x, &dev, m, &mut out).unwrap());
            let theirs = time_graph(&stream, &mut |_| {
                llama32::ops::cuda::gemv::gemv(&stream, &x, &dense, m, k, n, &mut out).unwrap();
            });
            let bytes = (n * k + 2 * n) as f64;
            eprintln!(
                "int8 lm_head {name:<12} m {m:>2} k {k:>5} n {n}: {:8.2} us {:6.0} GB/s | bf16 gemv {:8.2} us {:6.0} GB/s | {:.2}x",
                ours * 1e6,
                bytes / ours / 1e9,
                theirs * 1e6,
                2.0 * (n * k) as f64 / theirs / 1e9,
                theirs / ours
            );
        }
    }
}
