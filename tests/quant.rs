//! The 4-bit quantizer: numerics bit-exact with torchao (tests/golden/quant-torchao), the Hugging Face int4
//! formats (tests/golden/quant-hf), and `llama32 quantize` end to end on golden text and vision checkpoints.

use std::path::{Path, PathBuf};
use std::process::Command;

use llama32::npy;
use llama32::quant::format::{
    quantize_checkpoint, read_linear, read_table_f32, read_table_int8, EmbeddingQuant, QuantFormat, QuantizationConfig,
    QuantizeOptions,
};
use llama32::quant::numerics::{quantize_activations, quantize_matrix, quantize_rows_int8};
use llama32::quant::{ActQuant, Scheme};
use llama32::weights::safetensors::{serialize, DType};
use llama32::weights::{Checkpoint, SafeTensorsFile};

mod common;

fn golden(name: &str) -> PathBuf {
    common::golden_dir(name)
}

fn f32s(dir: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let a = npy::read_f32(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    (a.shape, a.data)
}

fn ints(dir: &Path, name: &str) -> Vec<i64> {
    npy::read_i64(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}")).data
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("llama32-quant-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn int4_weights_match_torchao_bit_for_bit() {
    let d = golden("quant-torchao");
    for case in ["w_edge", "w_rand", "linear_w"] {
        let (shape, w) = f32s(&d, &format!("{case}.npy"));
        let (n, k) = (shape[0], shape[1]);
        let m = quantize_matrix(&w, n, k, 32).unwrap();
        let want_q = ints(&d, &format!("{case}_q.npy"));
        let (_, want_s) = f32s(&d, &format!("{case}_scales.npy"));
        assert_eq!(bits(&m.scales), bits(&want_s), "{case}: scales");
        let got_q: Vec<i64> = m.q.iter().map(|&q| q as i64).collect();
        let bad = got_q.iter().zip(&want_q).filter(|(a, b)| a != b).count();
        assert_eq!(bad, 0, "{case}: {bad} int4 values differ from torchao");
        assert!(m.zeros.is_none());
    }
    // The bf16-reciprocal variant (scales_precision=bf16) really is different, so the comparison above can tell.
    let q16 = ints(&d, "w_rand_q_bf16scales.npy");
    let (shape, w) = f32s(&d, "w_rand.npy");
    let m = quantize_matrix(&w, shape[0], shape[1], 32).unwrap();
    assert!(m.q.iter().zip(&q16).any(|(&a, &b)| a as i64 != b));
}

#[test]
fn int8_rows_match_torchao_bit_for_bit() {
    let d = golden("quant-torchao");
    let (shape, w) = f32s(&d, "emb.npy");
    let (q, s) = quantize_rows_int8(&w, shape[0], shape[1]).unwrap();
    let (_, want_s) = f32s(&d, "emb_scales.npy");
    assert_eq!(bits(&s), bits(&want_s));
    let want_q = ints(&d, "emb_q.npy");
    assert_eq!(q.iter().map(|&v| v as i64).collect::<Vec<_>>(), want_q);
}

#[test]
fn activations_match_torchao_bit_for_bit() {
    let d = golden("quant-torchao");
    let (shape, x) = f32s(&d, "act_x.npy");
    let (rows, k) = (shape[0], shape[1]);
    let (mut q, mut s, mut z) = (vec![0i8; rows * k], vec![0f32; rows], vec![0i32; rows]);
    quantize_activations(&x, rows, k, &mut q, &mut s, &mut z);
    let (_, want_s) = f32s(&d, "act_scales.npy");
    assert_eq!(bits(&s), bits(&want_s), "scales");
    assert_eq!(z.iter().map(|&v| v as i64).collect::<Vec<_>>(), ints(&d, "act_zeros.npy"), "zero points");
    let want_q = ints(&d, "act_q.npy");
    for r in 0..rows {
        let got: Vec<i64> = q[r * k..(r + 1) * k].iter().map(|&v| v as i64).collect();
        assert_eq!(got, want_q[r * k..(r + 1) * k], "row {r}");
    }
}

/// The linear goldens agree with our numerics: the W4A16 output is x times the dequantized weight, and the
/// W4A8 output is the int8 x int4 product (exact in integers) scaled per token and per group.
#[test]
fn linear_goldens_follow_from_the_numerics() {
    let d = golden("quant-torchao");
    let (xs, x) = f32s(&d, "linear_x.npy");
    let (ws, w) = f32s(&d, "linear_w.npy");
    let (rows, k, n) = (xs[0], xs[1], ws[0]);
    let m = quantize_matrix(&w, n, k, 32).unwrap();
    let dq = m.dequantize();
    let (_, w4a16) = f32s(&d, "linear_w4a16_out.npy");
    let (_, w4a8) = f32s(&d, "linear_w4a8_out.npy");
    let (mut qx, mut sx, mut zx) = (vec![0i8; rows * k], vec![0f32; rows], vec![0i32; rows]);
    quantize_activations(&x, rows, k, &mut qx, &mut sx, &mut zx);
    let mut worst = (0.0f64, 0.0f64);
    for r in 0..rows {
        for c in 0..n {
            let mut a16 = 0.0f64;
            let mut a8 = 0.0f64;
            for g in 0..k / 32 {
                let mut acc = 0i32;
                for j in g * 32..(g + 1) * 32 {
                    a16 += x[r * k + j] as f64 * dq[c * k + j] as f64;
                    acc += (qx[r * k + j] as i32 - zx[r]) * m.q[c * k + j] as i32;
                }
                a8 += acc as f64 * sx[r] as f64 * m.scales[c * (k / 32) + g] as f64;
            }
            worst.0 = worst.0.max((a16 - w4a16[r * n + c] as f64).abs());
            worst.1 = worst.1.max((a8 - w4a8[r * n + c] as f64).abs());
        }
    }
    assert!(worst.0 < 1e-5 && worst.1 < 1e-5, "max |ours - torchao|: w4a16 {}, w4a8 {}", worst.0, worst.1);
    // W4A8 is not W4A16: the activation quantization is visible.
    let diff = w4a8.iter().zip(&w4a16).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(diff > 1e-4, "w4a8 and w4a16 outputs are identical ({diff})");
}

#[test]
fn hf_int4_formats_unpack_to_the_packed_integers() {
    let root = golden("quant-hf");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    assert_eq!(dirs.len(), 12, "{dirs:?}");
    for dir in dirs {
        let tag = dir.file_name().unwrap().to_string_lossy().into_owned();
        let cfg_path = dir.join("config.json");
        let root: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        let qcfg = QuantizationConfig::from_config_json(&root, &cfg_path).unwrap().expect("quantized");
        assert_eq!(qcfg.scheme.act, ActQuant::None, "{tag}");
        let want_fmt = match &qcfg.format {
            QuantFormat::Gptq { .. } => "gptq",
            QuantFormat::Awq => "awq",
            QuantFormat::CompressedTensors { .. } => "ct",
            QuantFormat::Llama32 => "llama32",
        };
        assert!(tag.starts_with(want_fmt), "{tag}: {qcfg:?}");
        assert!(tag.ends_with(&format!("-g{}", qcfg.scheme.group)), "{tag}");
        let (qshape, _) = f32s(&dir, "scales.npy");
        let want_q = ints(&dir, "q.npy");
        let n = qshape[0];
        let k = want_q.len() / n;
        let ckpt = Checkpoint::open(&dir).unwrap();
        let lin = read_linear(&ckpt, "model.layers.0.self_attn.q_proj", &qcfg, n, k).unwrap();
        let m = &lin.matrix;
        assert_eq!(m.q.iter().map(|&v| v as i64).collect::<Vec<_>>(), want_q, "{tag}: q");
        let (_, want_s) = f32s(&dir, "scales.npy");
        assert_eq!(bits(&m.scales), bits(&want_s), "{tag}: scales");
        match dir.join("zeros.npy").exists() {
            true => {
                let want_z = ints(&dir, "zeros.npy");
                let got: Vec<i64> = m.zeros.as_ref().expect("zeros").iter().map(|&v| v as i64).collect();
                assert_eq!(got, want_z, "{tag}: zeros");
            }
            false => assert!(m.zeros.is_none(), "{tag}: symmetric format with zero points"),
        }
    }
}

/// Rewrites `src`'s model.safetensors into a scratch directory after `edit`.
fn edited(src: &Path, tag: &str, edit: impl Fn(&mut Vec<(String, DType, Vec<usize>, Vec<u8>)>)) -> PathBuf {
    let dir = scratch(tag);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let file = SafeTensorsFile::open(&src.join("model.safetensors")).unwrap();
    let mut t: Vec<(String, DType, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .keys()
        .map(|n| {
            let v = file.get(n).unwrap();
            (n.clone(), v.dtype, v.shape.to_vec(), v.bytes.to_vec())
        })
        .collect();
    edit(&mut t);
    let refs: Vec<(&str, DType, &[usize], &[u8])> =
        t.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice())).collect();
    std::fs::write(dir.join("model.safetensors"), serialize(&refs)).unwrap();
    dir
}

fn read_err(dir: &Path, n: usize, k: usize) -> String {
    let cfg_path = dir.join("config.json");
    let root: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let qcfg = QuantizationConfig::from_config_json(&root, &cfg_path).unwrap().unwrap();
    let ckpt = Checkpoint::open(dir).unwrap();
    read_linear(&ckpt, "model.layers.0.self_attn.q_proj", &qcfg, n, k).unwrap_err().to_string()
}

#[test]
fn hf_bad_tensors_are_refused_by_name() {
    let src = golden("quant-hf").join("gptq-v1-asym-g32");
    // An act-order permutation in g_idx.
    let dir = edited(&src, "gidx", |t| {
        let g = t.iter_mut().find(|x| x.0.ends_with(".g_idx")).unwrap();
        g.3[..4].copy_from_slice(&1i32.to_le_bytes());
    });
    let e = read_err(&dir, 16, 64);
    assert!(e.contains("g_idx") && e.contains("act-order"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
    // A wrong shape.
    let e = read_err(&src, 16, 128);
    assert!(e.contains("model.layers.0.self_attn.q_proj.qweight") && e.contains("expected [16, 16]"), "{e}");
    // A missing tensor.
    let dir = edited(&src, "nozeros", |t| t.retain(|x| !x.0.ends_with(".qzeros")));
    let e = read_err(&dir, 16, 64);
    assert!(e.contains("missing tensor `model.layers.0.self_attn.q_proj.qzeros`"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
    // Unpacked compressed-tensors zero points outside int4's range.
    let ct = golden("quant-hf").join("ct-asym-g32");
    for (tag, dtype, value) in [("ctzp8", DType::I8, 100i32), ("ctzp32", DType::I32, 8)] {
        let dir = edited(&ct, tag, |t| {
            let z = t.iter_mut().find(|x| x.0.ends_with(".weight_zero_point")).unwrap();
            let mut vals = [0i32; 32];
            vals[5] = value;
            z.3 = match dtype {
                DType::I8 => vals.iter().map(|&v| v as i8 as u8).collect(),
                _ => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
            };
            (z.1, z.2) = (dtype, vec![16, 2]);
        });
        let e = read_err(&dir, 16, 64);
        assert!(e.contains("weight_zero_point") && e.contains(&format!("zero point {value} at [2, 1]")), "{tag}: {e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// `quantize` checks its source as the loaders do: a checkpoint they would refuse is not quantized.
#[test]
fn quantize_refuses_a_source_that_does_not_match_its_config() {
    let src = golden("tied-gqa4");
    let dir = edited(&src, "q-src-transposed", |t| {
        let k = t.iter_mut().find(|x| x.0 == "model.layers.0.self_attn.k_proj.weight").unwrap();
        k.2.reverse();
    });
    let out = scratch("q-src-out");
    let o = run_quantize(&["--model", dir.to_str().unwrap(), "--scheme", "w4a16-g32", "--out", out.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("model.layers.0.self_attn.k_proj.weight") && e.contains("[128, 32]"),
        "{e}"
    );
    assert!(!out.join("model.safetensors").exists(), "nothing is written");
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&out).ok();
}

fn run_quantize(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_llama32")).arg("quantize").args(args).output().expect("run llama32 quantize")
}

fn qcfg_of(dir: &Path) -> QuantizationConfig {
    let p = dir.join("config.json");
    let root: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    QuantizationConfig::from_config_json(&root, &p).unwrap().expect("a quantization_config")
}

/// Checks every quantized projection of `out` against `quantize_matrix` of the bf16 source, and the error bound;
/// returns how many were checked.
fn check_projections(src: &Path, out: &Path, is_proj: impl Fn(&str) -> bool) -> usize {
    let qcfg = qcfg_of(out);
    let (s, o) = (Checkpoint::open(src).unwrap(), Checkpoint::open(out).unwrap());
    let mut count = 0;
    for name in s.names().filter(|n| is_proj(n)) {
        let (view, _) = s.get(name).unwrap();
        let (n, k) = (view.shape[0], view.shape[1]);
        let w = view.to_f32();
        let lin = read_linear(&o, name, &qcfg, n, k).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(lin.scheme, qcfg.scheme);
        let want = quantize_matrix(&w, n, k, qcfg.scheme.group).unwrap();
        assert_eq!(lin.matrix, want, "{name}");
        let dq = lin.matrix.dequantize();
        for (i, (&a, &b)) in w.iter().zip(&dq).enumerate() {
            let s = lin.matrix.scales[i / k * (k / 32) + (i % k) / 32];
            let clamped = lin.matrix.q[i] == 7 && a > 7.0 * s;
            let bound = if clamped { 0.55 * s } else { (0.5 + 1e-5) * s };
            assert!((a - b).abs() <= bound, "{name}[{i}]: w {a}, dequantized {b}, scale {s}");
        }
        assert!(o.get(name).is_none(), "{name} is still stored unquantized");
        count += 1;
    }
    count
}

fn text_proj(name: &str) -> bool {
    name.starts_with("model.layers.") && (name.contains("_proj.weight"))
}

#[test]
fn cli_quantizes_a_sharded_text_checkpoint() {
    let src = golden("untied-gqa2-sharded");
    let out = scratch("text");
    let o = run_quantize(&["--model", src.to_str().unwrap(), "--scheme", "w4a8-g32", "--out", out.to_str().unwrap()]);
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("21 projections") && stdout.contains("bytes"), "summary: {stdout}");
    let qcfg = qcfg_of(&out);
    assert_eq!(qcfg.scheme, Scheme::W4A8_G32);
    assert_eq!(qcfg.format, QuantFormat::Llama32);
    assert_eq!(qcfg.embeddings, EmbeddingQuant::Bf16);
    assert_eq!(check_projections(&src, &out, text_proj), 3 * 7);
    // Everything else is copied byte for byte.
    let (s, q) = (Checkpoint::open(&src).unwrap(), Checkpoint::open(&out).unwrap());
    for name in s.names().filter(|n| !text_proj(n)) {
        assert_eq!(s.get(name).unwrap().0.bytes, q.get(name).unwrap().0.bytes, "{name}");
    }
    assert!(out.join("generation_config.json").exists());
    assert!(q.total_bytes() < s.total_bytes());
    // The output is refused as input, and a non-empty output directory needs --force.
    let again = scratch("text-again");
    let o =
        run_quantize(&["--model", out.to_str().unwrap(), "--scheme", "w4a16-g32", "--out", again.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("already quantized"), "{e}");
    let o = run_quantize(&["--model", src.to_str().unwrap(), "--scheme", "w4a16-g32", "--out", out.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("not empty") && e.contains("--force"), "{e}");
    let o = run_quantize(&[
        "--model",
        src.to_str().unwrap(),
        "--scheme",
        "w4a16-g32",
        "--out",
        out.to_str().unwrap(),
        "--force",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(qcfg_of(&out).scheme, Scheme::W4A16_G32);
    let o = run_quantize(&["--model", src.to_str().unwrap(), "--scheme", "w4a4-g32", "--out", again.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown quantization scheme"));
    std::fs::remove_dir_all(&out).ok();
    std::fs::remove_dir_all(&again).ok();
}

/// A Hugging Face cache snapshot links every file to a blob, and some checkpoints keep their tokenizer only as
/// `original/tokenizer.model`: the quantized copy must still have its tokenizer and configs.
#[cfg(unix)]
#[test]
fn quantize_copies_linked_files_and_the_original_tokenizer() {
    let golden_dir = golden("tied-gqa4");
    let src = scratch("linked-src");
    let out = scratch("linked-out");
    std::fs::create_dir_all(src.join("original")).unwrap();
    for entry in std::fs::read_dir(&golden_dir).unwrap() {
        let path = entry.unwrap().path();
        let target = std::fs::canonicalize(&path).unwrap();
        std::os::unix::fs::symlink(target, src.join(path.file_name().unwrap())).unwrap();
    }
    let tiktoken = b"IQ== 0\nIg== 1\n";
    std::fs::write(src.join("original/tokenizer.model"), tiktoken).unwrap();
    std::fs::write(src.join("original/consolidated.00.pth"), b"not copied").unwrap();
    // A link to a blob that is gone is left out, not the end of the run.
    std::os::unix::fs::symlink("/nonexistent/blob", src.join("README.md")).unwrap();
    let report = quantize_checkpoint(&src, &out, Scheme::W4A16_G32, &QuantizeOptions::default(), &|_, _| {}).unwrap();
    for f in ["config.json", "generation_config.json", "original/tokenizer.model"] {
        assert!(out.join(f).is_file(), "{f} missing from the output ({report:?})");
    }
    assert!(report.files_copied.contains(&"generation_config.json".to_string()), "{report:?}");
    assert!(!out.join("original/consolidated.00.pth").exists());
    assert_eq!(report.broken_links, vec!["README.md".to_string()]);
    assert_eq!(std::fs::read(out.join("original/tokenizer.model")).unwrap(), tiktoken);
    assert_eq!(qcfg_of(&out).scheme, Scheme::W4A16_G32);
    std::fs::remove_dir_all(&src).ok();
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn int8_embeddings_and_sharded_output() {
    let src = golden("tied-gqa4");
    let out = scratch("int8");
    let opts = QuantizeOptions { embeddings: EmbeddingQuant::Int8, force: false, max_shard_bytes: 64 << 10 };
    let last = std::cell::Cell::new((0, 0));
    let report = quantize_checkpoint(&src, &out, Scheme::W4A16_G32, &opts, &|d, t| last.set((d, t))).unwrap();
    assert!(report.shards > 1, "{report:?}");
    assert_eq!((report.tensors_int4, report.tensors_int8), (14, 1));
    assert_eq!(last.get().0, last.get().1);
    assert!(out.join("model.safetensors.index.json").exists());
    assert_eq!(check_projections(&src, &out, text_proj), 14);
    let s = Checkpoint::open(&src).unwrap();
    let (view, _) = s.get("model.embed_tokens.weight").unwrap();
    let (n, k) = (view.shape[0], view.shape[1]);
    let (q, sc) = quantize_rows_int8(&view.to_f32(), n, k).unwrap();
    let want: Vec<f32> = q.iter().enumerate().map(|(i, &v)| v as f32 * sc[i / k]).collect();
    let o = Checkpoint::open(&out).unwrap();
    assert!(o.get("model.embed_tokens.weight").is_none());
    let got = read_table_f32(&o, "model.embed_tokens.weight", n, k).unwrap();
    assert_eq!(bits(&got), bits(&want));
    // An unquantized table reads back as itself.
    let plain = read_table_f32(&s, "model.embed_tokens.weight", n, k).unwrap();
    assert_eq!(bits(&plain), bits(&view.to_f32()));
    assert_ne!(bits(&plain), bits(&got));
    assert_eq!(qcfg_of(&out).embeddings, EmbeddingQuant::Int8);
    std::fs::remove_dir_all(&out).ok();
}

/// An int8-embeddings checkpoint keeps its tables' int8 form through `ModelWeights::load_quantized` (for the CUDA
/// executor), the f32 tables being exactly their dequantization, and `quantize_tables_int8` on the bf16 checkpoint's
/// weights (the `--random-weights` path of such a config) gives the same int8 values and scales, tied or untied.
#[test]
fn int8_tables_load_as_int8_and_equal_load_time_quantization() {
    use llama32::config::LlamaConfig;
    use llama32::weights::ModelWeights;
    for case in ["tied-gqa4", "untied-gqa2-sharded"] {
        let src = golden(case);
        let out = scratch(&format!("int8-tables-{case}"));
        let opts = QuantizeOptions { embeddings: EmbeddingQuant::Int8, ..Default::default() };
        quantize_checkpoint(&src, &out, Scheme::W4A16_G32, &opts, &|_, _| {}).unwrap();
        let cfg = LlamaConfig::from_model_dir(&src).unwrap();
        let ckpt = Checkpoint::open(&out).unwrap();
        let loaded = ModelWeights::load_quantized(&ckpt, &cfg, &qcfg_of(&out), &|_| {}).unwrap();
        let e = loaded.embed_int8.as_ref().expect("the embedding loads as int8");
        assert_eq!(bits(&loaded.embed), bits(&e.dequantize()), "{case}: embed is its int8 form's dequantization");
        let (n, k) = (cfg.vocab_size, cfg.hidden_size);
        let read = read_table_int8(&ckpt, "model.embed_tokens.weight", n, k).unwrap().unwrap();
        assert_eq!(&read, e);
        assert_eq!(loaded.lm_head.is_some(), loaded.lm_head_int8.is_some(), "{case}: an untied lm_head is int8 too");
        assert_eq!(loaded.lm_head_int8(), loaded.lm_head_int8.as_ref().or(loaded.embed_int8.as_ref()));
        if let (Some(h), Some(hq)) = (&loaded.lm_head, &loaded.lm_head_int8) {
            assert_eq!(bits(h), bits(&hq.dequantize()), "{case}: lm_head is its int8 form's dequantization");
        }
        let mut w = ModelWeights::load(&Checkpoint::open(&src).unwrap(), &cfg, &|_| {}).unwrap();
        w.quantize_tables_int8().unwrap();
        assert_eq!(w.embed_int8, loaded.embed_int8, "{case}: embedding");
        assert_eq!(w.lm_head_int8, loaded.lm_head_int8, "{case}: lm_head");
        assert_eq!(bits(&w.embed), bits(&loaded.embed));
        // Quantizing again leaves int8 tables alone; rounding to bf16 drops them (no longer their dequantization).
        let before = w.embed.clone();
        w.quantize_tables_int8().unwrap();
        assert_eq!(bits(&w.embed), bits(&before));
        w.round_to_bf16();
        assert!(w.embed_int8.is_none() && w.lm_head_int8.is_none());
        // An unquantized table has no int8 form.
        let plain = Checkpoint::open(&src).unwrap();
        assert!(read_table_int8(&plain, "model.embed_tokens.weight", n, k).unwrap().is_none());
        std::fs::remove_dir_all(&out).ok();
    }
}

#[test]
fn cli_quantizes_an_mllama_checkpoint() {
    let src = golden("mllama-noresize");
    let out = scratch("mllama");
    let o = run_quantize(&["--model", src.to_str().unwrap(), "--scheme", "w4a16-g32", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lm_proj = |n: &str| {
        let lm = n.starts_with("language_model.model.layers.") || n.starts_with("model.language_model.layers.");
        lm && ["self_attn.", "cross_attn.", "mlp."].iter().any(|p| n.contains(p)) && n.ends_with("_proj.weight")
    };
    let s = Checkpoint::open(&src).unwrap();
    let cross = s.names().filter(|n| lm_proj(n) && n.contains("cross_attn.")).count();
    assert_eq!(cross, 4, "the golden has one cross-attention layer");
    let expected = s.names().filter(|n| lm_proj(n)).count();
    assert_eq!(check_projections(&src, &out, lm_proj), expected);
    // The vision tower, the projector, the embeddings, lm_head and the norms are copied byte for byte.
    let q = Checkpoint::open(&out).unwrap();
    let mut copied = 0;
    for name in s.names().filter(|n| !lm_proj(n)) {
        assert_eq!(s.get(name).unwrap().0.bytes, q.get(name).unwrap().0.bytes, "{name}");
        copied += name.contains("vision_model.") as usize;
    }
    assert!(copied > 10);
    assert!(out.join("generation_config.json").exists());
    std::fs::remove_dir_all(&out).ok();
}
