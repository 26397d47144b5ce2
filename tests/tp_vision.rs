//! Tensor parallelism for Llama 3.2 Vision on the CPU reference ([`TpMllamaCpuExecutor`]), `llama32 logits
//! --tensor-parallel N --image ...`, and `llama32 batch --tensor-parallel N` (the serving engine over the
//! tensor-parallel executors); the CUDA ranks' command line without a CUDA device (tests/gpu/cuda_tp_vision.rs runs
//! them on a device).
//!
//! The golden vision checkpoints run at tp = 2 and 4, and mllama-resize (8 query / 2 KV heads) also at tp = 8; tp = 4
//! and 8 replicate KV heads over ranks, as does every tp > 1 of mllama-two-images (one KV head). A tp that does not
//! divide the heads fails naming the field. A random checkpoint with 8 query / 2 KV heads and two cross-attention
//! layers, written to a temporary directory, runs at tp = 2, 4 and 8 as well.
//!
//! Tolerance: max |logit(tp) - logit(tp = 1)| <= 1e-5 x max |logit(tp = 1)| over every step. The ranks sum
//! row-parallel partial products in another order than one GEMM does, so bit equality is not expected; 1e-5 is
//! about 100 f32 ulps of the largest logit, while a wrong head, a missing all-reduce or a misplaced vocabulary or
//! embedding slice changes logits by tens of percent (the last test checks the comparison can fail).

mod common;
use common::max_rel_diff;

use std::path::{Path, PathBuf};
use std::process::Command;

use llama32::exec::generate::{build_step, LogitsWanted, SeqChunk};
use llama32::exec::Executor;
use llama32::kv::BlockAllocator;
use llama32::sampling::argmax;
use llama32::tp::vision::TpMllamaCpuExecutor;
use llama32::vision::exec::{MllamaCpuExecutor, SeqImages};
use llama32::vision::pipeline::{EncodedImages, MllamaModel};
use llama32::weights::{Checkpoint, DType};
use serde_json::json;

const REL_TOL: f32 = 1e-5;
const BLOCK: usize = 4;
const DECODE_STEPS: usize = 4;
const KV_TOKENS: usize = 256;
const IMAGES: u64 = 11;

/// A model with its prompt and encoded images.
struct Case {
    model: MllamaModel,
    ids: Vec<u32>,
    images: EncodedImages,
}

impl Case {
    fn load(dir: &Path, ids: Vec<u32>, images: &[(String, Vec<u8>)]) -> Case {
        let model = MllamaModel::load(dir).unwrap();
        let images = model.encode(images).unwrap();
        Case { model, ids, images }
    }

    fn golden(name: &str) -> Case {
        let g = common::mllama_golden(name);
        Case::load(&g.dir, g.input_ids, &g.images)
    }

    fn reference(&self) -> MllamaCpuExecutor {
        let w = MllamaModel::load(&self.model.dir).unwrap().weights;
        MllamaCpuExecutor::new(self.model.cfg.clone(), w, KV_TOKENS, BLOCK).unwrap()
    }

    fn tp(&self, tp: usize) -> llama32::Result<TpMllamaCpuExecutor> {
        let ckpt = Checkpoint::open(&self.model.dir).unwrap();
        TpMllamaCpuExecutor::new(self.model.cfg.clone(), &ckpt, tp, KV_TOKENS, BLOCK)
    }

    /// A text-only prompt whose ids are spread over the vocabulary, so every rank's embedding rows are used.
    fn text_prompt(&self) -> Vec<u32> {
        let vocab = self.model.cfg.text.base.vocab_size;
        (0..9).map(|i| ((i * 97 + 5) % vocab) as u32).collect()
    }
}

/// Runs the same steps through `reference` (tp = 1) and `exec`: one mixed prefill step (a text-only prompt and the
/// vision prompt with its images, every row's logits), then `DECODE_STEPS` decode steps of both sequences fed the
/// reference's greedy picks (the vision one with the prompt's last mask row). Returns the worst relative difference.
fn compare(c: &Case, reference: &mut MllamaCpuExecutor, exec: &mut TpMllamaCpuExecutor, label: &str) -> f32 {
    reference.add_images(IMAGES, &c.images).unwrap();
    exec.add_images(IMAGES, &c.images).unwrap();
    let text = c.text_prompt();
    let mask = c.model.mask(&c.ids, &c.images).unwrap();
    let last_row = mask.row(c.ids.len() - 1).to_vec();
    let mut alloc = BlockAllocator::new(reference.num_blocks(), BLOCK);
    let tables = common::interleaved_tables(&mut alloc, [text.len() + DECODE_STEPS, c.ids.len() + DECODE_STEPS]);
    let step = common::two_seq_step([&text, &c.ids], [0, 0], &tables, LogitsWanted::All, BLOCK);
    let images = [None, Some(SeqImages { key: IMAGES, mask: mask.data() })];
    let want = reference.step_with_images(&step, &images).unwrap().logits;
    let per_rank = exec.step_all_ranks(&step, &images).unwrap();
    for (r, l) in per_rank.iter().enumerate() {
        assert!(l.iter().zip(&per_rank[0]).all(|(a, b)| a.to_bits() == b.to_bits()), "{label}: rank {r} differs");
    }
    let mut worst = max_rel_diff(&per_rank[0], &want);
    let vocab = c.model.cfg.text.base.vocab_size;
    let pick = |logits: &[f32], row: usize| argmax(&logits[row * vocab..(row + 1) * vocab]);
    let mut next = [pick(&want, text.len() - 1), pick(&want, text.len() + c.ids.len() - 1)];
    let mut pos = [text.len(), c.ids.len()];
    for _ in 0..DECODE_STEPS {
        let step = common::two_seq_step([&[next[0]], &[next[1]]], pos, &tables, LogitsWanted::Last, BLOCK);
        let images = [None, Some(SeqImages { key: IMAGES, mask: &last_row })];
        let want = reference.step_with_images(&step, &images).unwrap().logits;
        let got = exec.step_with_images(&step, &images).unwrap().logits;
        worst = worst.max(max_rel_diff(&got, &want));
        next = [pick(&want, 0), pick(&want, 1)];
        pos = [pos[0] + 1, pos[1] + 1];
    }
    assert!(worst <= REL_TOL, "{label}: max |diff| / max|logit| = {worst:.2e} exceeds {REL_TOL:.0e}");
    eprintln!("{label}: max |diff| / max|logit| = {worst:.2e} (mixed prefill + {DECODE_STEPS} decode steps)");
    assert!(reference.remove_images(IMAGES) && exec.remove_images(IMAGES));
    assert_eq!(exec.num_image_sets(), 0);
    worst
}

#[test]
fn golden_vision_checkpoints_match_tp1_at_tp_2_4_8() {
    // (case, query heads, KV heads, tps): tp = 8 divides only mllama-resize's 8 heads; mllama-two-images has one KV
    // head, replicated on every rank.
    let cases: [(&str, usize, usize, &[usize]); 3] =
        [("mllama-noresize", 4, 2, &[2, 4]), ("mllama-resize", 8, 2, &[2, 4, 8]), ("mllama-two-images", 4, 1, &[2, 4])];
    let mut runs = 0;
    for (name, heads, kv, tps) in cases {
        let c = Case::golden(name);
        let t = &c.model.cfg.text.base;
        assert_eq!((t.num_attention_heads, t.num_key_value_heads), (heads, kv), "{name}");
        let mut reference = c.reference();
        // tp = 1 through the tensor-parallel executor is the plain executor, bit for bit.
        let mut one = c.tp(1).unwrap();
        assert_eq!(compare(&c, &mut reference, &mut one, &format!("{name} tp=1")), 0.0);
        for &tp in tps {
            let mut exec = c.tp(tp).unwrap();
            assert_eq!(exec.tp(), tp);
            let rank_cfg = &exec.rank(tp - 1).unwrap().mllama_config().text.base;
            assert_eq!(rank_cfg.num_attention_heads, heads / tp);
            assert_eq!(rank_cfg.num_key_value_heads, 1.max(kv / tp));
            // 264 embedding rows split evenly: the last rank holds the image token's row (256).
            let rows = exec.rank(tp - 1).unwrap().decoder_shard().embed_rows.clone();
            assert_eq!(rows, 264 - 264 / tp..264);
            compare(&c, &mut reference, &mut exec, &format!("{name} tp={tp}"));
            runs += 1;
        }
    }
    assert_eq!(runs, 7);
}

#[test]
fn tensor_parallel_prefill_matches_transformers() {
    // The vision sequence's prefill at tp = 2 against transformers' logits (as tests/vision_exec.rs checks tp = 1).
    let c = Case::golden("mllama-two-images");
    let want = llama32::npy::read_f32(&c.model.dir.join("logits.npy")).unwrap().data;
    let mut exec = c.tp(2).unwrap();
    exec.add_images(1, &c.images).unwrap();
    let mask = c.model.mask(&c.ids, &c.images).unwrap();
    let table: Vec<u32> = (0..c.ids.len().div_ceil(BLOCK) as u32).collect();
    let chunk = SeqChunk { tokens: &c.ids, start_pos: 0, block_table: &table, logits: LogitsWanted::All };
    let step = build_step(&[chunk], BLOCK).unwrap();
    let got = exec.step_with_images(&step, &[Some(SeqImages { key: 1, mask: mask.data() })]).unwrap().logits;
    let e = max_rel_diff(&got, &want);
    assert!(e <= 1e-4, "tp=2 vs transformers: {e:.2e}");
}

#[test]
fn a_tp_that_does_not_divide_the_heads_names_the_field() {
    let c = Case::golden("mllama-noresize"); // 4 heads, 2 KV heads
    for tp in [3, 8] {
        let e = c.tp(tp).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("num_attention_heads"), "tp {tp}: {e}");
    }
    let e = c.tp(0).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("at least 1"), "{e}");
}

/// A random Llama 3.2 Vision checkpoint with 8 query / 2 KV heads (head_dim 16), the golden cases' vision encoder
/// shape, and f32 weights drawn with a fixed seed, in a fresh temporary directory.
fn random_vision_dir(tag: &str) -> PathBuf {
    common::random_gqa4_vision_dir("mllama-noresize", &format!("tp-vision-{tag}"), (128, 192), 3)
}

#[test]
fn random_eight_head_vision_model_matches_tp1_at_tp_2_4_8() {
    let dir = random_vision_dir("eight");
    let g = common::mllama_golden("mllama-two-images");
    let c = Case::load(&dir, g.input_ids.clone(), &g.images);
    let mut reference = c.reference();
    for tp in [2, 4, 8] {
        let mut exec = c.tp(tp).unwrap();
        let rank = &exec.rank(0).unwrap().mllama_config().text.base;
        assert_eq!((rank.num_attention_heads, rank.num_key_value_heads), (8 / tp, 1.max(2 / tp)));
        compare(&c, &mut reference, &mut exec, &format!("random 8-head tp={tp}"));
    }
    // A changed model differs: the comparison can fail.
    let ckpt = Checkpoint::open(&dir).unwrap();
    let mut exec = TpMllamaCpuExecutor::new(c.model.cfg.clone(), &ckpt, 2, KV_TOKENS, BLOCK).unwrap();
    let mut w = MllamaModel::load(&dir).unwrap().weights;
    // Scale one cross-attention layer's o_proj in the reference only: the comparison must notice.
    if let llama32::vision::weights::TextLayerWeights::CrossAttention(x) = &mut w.text.layers[1] {
        x.wo.dense.iter_mut().for_each(|v| *v *= 1.5);
    }
    let mut perturbed = MllamaCpuExecutor::new(c.model.cfg.clone(), w, KV_TOKENS, BLOCK).unwrap();
    perturbed.add_images(1, &c.images).unwrap();
    exec.add_images(1, &c.images).unwrap();
    let mask = c.model.mask(&c.ids, &c.images).unwrap();
    let table: Vec<u32> = (0..c.ids.len().div_ceil(BLOCK) as u32).collect();
    let chunk = SeqChunk { tokens: &c.ids, start_pos: 0, block_table: &table, logits: LogitsWanted::All };
    let step = build_step(&[chunk], BLOCK).unwrap();
    let im = [Some(SeqImages { key: 1, mask: mask.data() })];
    let a = perturbed.step_with_images(&step, &im).unwrap().logits;
    let b = exec.step_with_images(&step, &im).unwrap().logits;
    assert!(max_rel_diff(&b, &a) > 1e-3, "a changed cross-attention layer must show in the logits");
    std::fs::remove_dir_all(&dir).ok();
}

fn run_cli(sub: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_llama32")).arg(sub).args(args).output().unwrap()
}

#[test]
fn cli_vision_logits_with_tensor_parallel_match_tp1() {
    let g = common::mllama_golden("mllama-two-images");
    let model = g.dir.to_str().unwrap();
    let tmp = std::env::temp_dir().join(format!("llama32-tp-vision-cli-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let ids: Vec<String> = g.input_ids.iter().map(u32::to_string).collect();
    let ids = ids.join(",");
    let img: Vec<String> = g.images.iter().map(|(f, _)| g.dir.join(f).display().to_string()).collect();
    let npy = |tp: usize| tmp.join(format!("tp{tp}.npy"));
    let run = |tp: usize| {
        let (out, tp_s) = (npy(tp), tp.to_string());
        let mut args = vec![
            "--model",
            model,
            "--ids",
            &ids,
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
            "--block-size",
            "4",
        ];
        args.extend(["--tensor-parallel", &tp_s]);
        for i in &img {
            args.extend(["--image", i.as_str()]);
        }
        run_cli("logits", &args)
    };
    let mut outs = Vec::new();
    for tp in [1, 2, 4] {
        let o = run(tp);
        assert!(o.status.success(), "tp {tp}: {}", String::from_utf8_lossy(&o.stderr));
        outs.push(llama32::npy::read_f32(&npy(tp)).unwrap());
    }
    let want = llama32::npy::read_f32(&g.dir.join("logits.npy")).unwrap();
    assert!(max_rel_diff(&outs[0].data, &want.data) <= 1e-4, "tp=1 CLI vs transformers");
    for (k, a) in outs.iter().enumerate().skip(1) {
        assert_eq!(a.shape, vec![g.input_ids.len(), 256]);
        let d = max_rel_diff(&a.data, &outs[0].data);
        assert!(d <= REL_TOL, "cli tp {}: {d:.2e}", 1 << k);
        eprintln!("cli vision tp={}: max |diff| / max|logit| = {d:.2e}", 1 << k);
    }
    let o = run(8);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("num_attention_heads"), "{err}");
    std::fs::remove_dir_all(&tmp).ok();
}

/// The tiny text model of `common::tiny_model_dir` with a checkpoint: seeded random bf16 weights with unit layer
/// norms and a final norm of 20 (peaked next-token distributions, as `common::tiny_engine` makes them).
fn tiny_text_checkpoint(tag: &str) -> Option<PathBuf> {
    let dir = common::tiny_model_dir(tag)?;
    let cfg = llama32::config::LlamaConfig::from_model_dir(&dir).unwrap();
    let tensors = llama32::weights::expected_tensors(&cfg);
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: usize = shape.iter().product();
            let vals = if name == "model.norm.weight" {
                vec![20.0; n]
            } else if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                llama32::weights::random_values(n, 7, k as u64)
            };
            let bytes = vals.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
            (name.clone(), shape.clone(), bytes)
        })
        .collect();
    let refs: Vec<(&str, DType, &[usize], &[u8])> =
        data.iter().map(|(n, s, b)| (n.as_str(), DType::BF16, s.as_slice(), b.as_slice())).collect();
    std::fs::write(dir.join("model.safetensors"), llama32::weights::safetensors::serialize(&refs)).unwrap();
    Some(dir)
}

#[test]
fn batch_with_tensor_parallel_2_answers_like_tp1() {
    let Some(dir) = tiny_text_checkpoint("batch") else { return };
    let input = dir.join("requests.jsonl");
    let reqs = [
        json!({"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
               "body": {"model": "tiny", "messages": [{"role": "user", "content": "Name three colors."}],
                        "max_tokens": 12, "temperature": 0}}),
        json!({"custom_id": "text", "method": "POST", "url": "/v1/completions",
               "body": {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 10, "temperature": 0}}),
    ];
    let lines: Vec<String> = reqs.iter().map(|r| r.to_string()).collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let run = |tp: &str| {
        let out = dir.join(format!("out-tp{tp}.jsonl"));
        let o = run_cli(
            "batch",
            &[
                "--model",
                dir.to_str().unwrap(),
                "--served-model-name",
                "tiny",
                "--input",
                input.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
                "--no-progress",
                "--kv-tokens",
                "1024",
                "--tensor-parallel",
                tp,
            ],
        );
        assert!(o.status.success(), "tp {tp}: {}", String::from_utf8_lossy(&o.stderr));
        if tp != "1" {
            let log = String::from_utf8_lossy(&o.stderr);
            assert!(log.contains(&format!("as {tp} tensor-parallel CPU ranks")), "{log}");
        }
        let text = std::fs::read_to_string(&out).unwrap();
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let body = &v["response"]["body"];
                assert!(v["error"].is_null(), "tp {tp}: {v}");
                let c = &body["choices"][0];
                let text = if c.get("message").is_some() { c["message"]["content"].clone() } else { c["text"].clone() };
                json!({"id": v["custom_id"], "text": text, "finish": c["finish_reason"], "usage": body["usage"]})
            })
            .collect::<Vec<_>>()
    };
    let one = run("1");
    let two = run("2");
    assert_eq!(one.len(), 2);
    assert!(one.iter().all(|r| r["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0), "{one:?}");
    assert_eq!(one, two, "tp=2 must answer a greedy request exactly as tp=1");
    // --tensor-parallel on CUDA without a usable device: a clear error, not a panic (tests/gpu/cuda_tp.rs runs the
    // CUDA ranks on a device).
    if llama32::ops::cuda::probe().is_ok() {
        eprintln!("skipped: the no-device error of --tensor-parallel on CUDA (a device is present here)");
        std::fs::remove_dir_all(&dir).ok();
        return;
    }
    let o = run_cli(
        "batch",
        &[
            "--model",
            dir.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            dir.join("cuda.jsonl").to_str().unwrap(),
            "--device",
            "cuda",
            "--tensor-parallel",
            "2",
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no usable CUDA device for --tensor-parallel 2"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn vision_tensor_parallel_on_cuda_without_a_device_fails_clearly() {
    if llama32::ops::cuda::probe().is_ok() {
        eprintln!("skipped: a CUDA device is present (tests/gpu/cuda_tp_vision.rs runs the CUDA ranks)");
        return;
    }
    let g = common::mllama_golden("mllama-resize");
    let model = g.dir.to_str().unwrap();
    let tmp = std::env::temp_dir().join(format!("llama32-tp-vision-cuda-none-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let out = tmp.join("tp.npy");
    let image = g.dir.join(&g.images[0].0);
    let logits = |extra: &[&str]| {
        let mut args = vec!["--model", model, "--ids", "0,256,5,6", "--out", out.to_str().unwrap()];
        args.extend(["--image", image.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let o = run_cli("logits", &args);
        assert!(!o.status.success(), "{extra:?} succeeded without a CUDA device");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    for extra in [&["--device", "cuda"][..], &["--device", "cuda", "--devices", "0"], &["--device", "cuda:1"]] {
        let mut args = extra.to_vec();
        args.extend(["--tensor-parallel", "2"]);
        let e = logits(&args);
        assert!(e.contains("no usable CUDA device for --tensor-parallel 2"), "{extra:?}: {e}");
        assert!(e.contains(&format!("--device {}", extra[1])) && !e.contains("panicked"), "{extra:?}: {e}");
    }
    assert!(!out.exists());
    // Refused before any device is touched: a degree that does not divide the 8 heads, W4A8, and a W4A16 split
    // whose down_proj share (96 / 2 = 48 columns) is not a multiple of the group.
    let e = logits(&["--device", "cuda", "--tensor-parallel", "3"]);
    assert!(e.contains("num_attention_heads"), "{e}");
    let e = logits(&["--device", "cuda", "--tensor-parallel", "2", "--quantize", "w4a8-g32"]);
    assert!(e.contains("does not support w4a8-g32"), "{e}");
    let e = logits(&["--device", "cuda", "--tensor-parallel", "2", "--quantize", "w4a16-g32"]);
    assert!(e.contains("down_proj") && e.contains("quantization group"), "{e}");
    // batch (and serve) place the ranks before loading anything: the same error.
    let input = tmp.join("in.jsonl");
    std::fs::write(&input, "").unwrap();
    let output = tmp.join("out.jsonl");
    let args = [
        "--model",
        model,
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--no-progress",
        "--device",
        "cuda",
        "--tensor-parallel",
        "2",
    ];
    let o = run_cli("batch", &args);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("no usable CUDA device for --tensor-parallel 2"), "{e}");
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn vision_multi_node_is_checked_and_fails_clearly_without_a_device() {
    let g = common::mllama_golden("mllama-resize");
    let model = g.dir.to_str().unwrap();
    let tmp = std::env::temp_dir().join(format!("llama32-tp-vision-multinode-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let input = tmp.join("in.jsonl");
    std::fs::write(&input, "").unwrap();
    let output = tmp.join("out.jsonl");
    let files = ["--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()];
    // `cmd` on a 2-node run of `tp` ranks in all, as node `rank`, with `extra` flags; the stderr of its failure.
    let fail = |cmd: &str, tp: &str, rank: &str, extra: &[&str]| {
        let mut args = vec!["--model", model, "--device", "cuda", "--tensor-parallel", tp, "--nnodes", "2"];
        args.extend(["--node-rank", rank, "--master-addr", "127.0.0.1", "--master-port", "29741"]);
        if cmd == "batch" && rank == "0" {
            args.extend(files);
        }
        args.extend_from_slice(extra);
        let t0 = std::time::Instant::now();
        let o = run_cli(cmd, &args);
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success() && e.contains("error: ") && !e.contains("panicked"), "{cmd} {args:?}: {e}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(60), "{cmd} {args:?} took {:?}", t0.elapsed());
        e
    };
    // Refused before any device on every node: a degree that does not divide the 8 heads, a W4A8 run.
    for rank in ["0", "1"] {
        let e = fail("batch", "6", rank, &[]);
        assert!(e.contains("num_attention_heads"), "{e}");
        let e = fail("batch", "4", rank, &["--quantize", "w4a8-g32"]);
        assert!(e.contains("does not support") && e.contains("w4a8-g32"), "{e}");
    }
    let e = fail("serve", "4", "0", &["--devices", "0,0"]);
    assert!(e.contains("--devices") && e.contains("would share cuda:0"), "{e}");
    if llama32::ops::cuda::probe().is_ok() {
        eprintln!("skipped: a CUDA device is present (a multi-node run needs several machines)");
        std::fs::remove_dir_all(&tmp).ok();
        return;
    }
    // A valid 2-node run (4 ranks, 2 per node) on a machine without CUDA: node 0 and a follower (without
    // --input) fail at once, before any rendezvous or image encoder load.
    for rank in ["0", "1"] {
        for cmd in ["batch", "serve"] {
            let e = fail(cmd, "4", rank, &[]);
            assert!(e.contains("no usable CUDA device for --tensor-parallel 4 over --nnodes 2"), "{cmd} {rank}: {e}");
        }
    }
    assert!(!output.exists());
    std::fs::remove_dir_all(&tmp).ok();
}

/// A tiny Llama 3.2 Vision checkpoint (the golden mllama-two-images shapes, 4 query / 1 KV head) with the real 128K
/// vocabulary, tokenizer and vision chat template, as tests/vision_server.rs builds it, plus random weights.
fn tiny_vision_checkpoint(tag: &str) -> Option<PathBuf> {
    let data = common::data_dir()?;
    let dir = std::env::temp_dir().join(format!("llama32-tp-vision-serve-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let golden = common::golden_dir("mllama-two-images");
    let text = std::fs::read_to_string(golden.join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["image_token_index"] = json!(128256);
    cfg["text_config"]["vocab_size"] = json!(128256);
    cfg["text_config"]["bos_token_id"] = json!(128000);
    cfg["text_config"]["eos_token_id"] = json!([128001, 128008, 128009]);
    cfg["text_config"]["pad_token_id"] = json!(128004);
    cfg["text_config"]["max_position_embeddings"] = json!(1024);
    common::write_random_vision_checkpoint(&dir, &cfg, 3);
    std::fs::copy(data.join("tokenizer.model"), dir.join("tokenizer.model")).unwrap();
    let path = data.join("Llama-3.2-11B-Vision-Instruct/chat_template.reconstructed.json");
    let template: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tc = json!({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                    "chat_template": template["chat_template"]});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    Some(dir)
}

#[test]
fn vision_batch_with_tensor_parallel_2_answers_like_tp1() {
    use base64::Engine as _;
    let Some(dir) = tiny_vision_checkpoint("batch") else { return };
    let golden = common::golden_dir("mllama-two-images");
    let url = |f: &str| {
        let bytes = std::fs::read(golden.join(f)).unwrap();
        format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
    };
    let ask = |id: &str, content: serde_json::Value| {
        json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
               "body": {"model": "tiny-vision", "messages": [{"role": "user", "content": content}],
                        "max_tokens": 6, "temperature": 0, "ignore_eos": true}})
    };
    let reqs = [
        ask(
            "two-images",
            json!([{"type": "image_url", "image_url": {"url": url("image0.png")}},
                   {"type": "text", "text": "Compare"},
                   {"type": "image_url", "image_url": {"url": url("image1.png")}},
                   {"type": "text", "text": "with this."}]),
        ),
        ask("text-only", json!([{"type": "text", "text": "Describe a sunset."}])),
    ];
    let input = dir.join("requests.jsonl");
    let lines: Vec<String> = reqs.iter().map(|r| r.to_string()).collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let run = |tp: &str| {
        let out = dir.join(format!("out-tp{tp}.jsonl"));
        let args = [
            "--model",
            dir.to_str().unwrap(),
            "--served-model-name",
            "tiny-vision",
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--no-progress",
            "--kv-tokens",
            "2048",
            "--tensor-parallel",
            tp,
        ];
        let o = run_cli("batch", &args);
        let log = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "tp {tp}: {log}");
        if tp != "1" {
            assert!(log.contains(&format!("as {tp} tensor-parallel CPU ranks")), "{log}");
        }
        let text = std::fs::read_to_string(&out).unwrap();
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert!(v["error"].is_null(), "tp {tp}: {v}");
                let body = &v["response"]["body"];
                json!({"id": v["custom_id"], "text": body["choices"][0]["message"]["content"],
                       "usage": body["usage"]})
            })
            .collect::<Vec<_>>()
    };
    let one = run("1");
    assert_eq!(one.len(), 2);
    assert!(one.iter().all(|r| r["usage"]["completion_tokens"] == 6), "{one:?}");
    assert_ne!(one[0]["usage"]["prompt_tokens"], one[1]["usage"]["prompt_tokens"]);
    assert_eq!(one, run("2"), "tp=2 must answer greedy image requests exactly as tp=1");
    std::fs::remove_dir_all(&dir).ok();
}

/// W4A16 Llama 3.2 Vision as tensor-parallel CPU ranks against tp = 1 quantized: a checkpoint written by
/// `quantize_checkpoint` (each projection read whole and sliced per rank) and `--quantize` at load (each rank
/// quantizes its own slices); every rank bit-identical, within f32 re-association of tp = 1. A degree whose
/// row-parallel share is not a multiple of the group, and W4A8, are refused naming the tensor or the scheme.
#[test]
fn w4a16_vision_ranks_match_tp1_quantized() {
    use llama32::quant::format::{quantize_checkpoint, QuantizeOptions};
    use llama32::quant::Scheme;
    let scheme = Scheme::W4A16_G32;
    for name in ["mllama-noresize", "mllama-two-images"] {
        let g = common::mllama_golden(name);
        // A quantized checkpoint.
        let out = std::env::temp_dir().join(format!("llama32-tp-vision-q-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        quantize_checkpoint(&g.dir, &out, scheme, &QuantizeOptions::default(), &|_, _| {}).unwrap();
        let c = Case::load(&out, g.input_ids.clone(), &g.images);
        let mut reference = c.reference();
        let mut exec = c.tp(2).unwrap();
        let e = compare(&c, &mut reference, &mut exec, &format!("{name} quantized checkpoint tp=2"));
        assert!(e <= REL_TOL, "{name}: quantized checkpoint at tp 2 differs by {e:.2e}");
        // --quantize at load.
        let base = Case::golden(name);
        let w = MllamaModel::load_with(&g.dir, Some(scheme)).unwrap().weights;
        let mut reference = MllamaCpuExecutor::new(base.model.cfg.clone(), w, KV_TOKENS, BLOCK).unwrap();
        let ckpt = Checkpoint::open(&g.dir).unwrap();
        let cfg = base.model.cfg.clone();
        let mut exec = TpMllamaCpuExecutor::new_quantized(cfg, &ckpt, 2, (KV_TOKENS, BLOCK), Some(scheme)).unwrap();
        let e2 = compare(&base, &mut reference, &mut exec, &format!("{name} --quantize tp=2"));
        assert!(e2 <= REL_TOL, "{name}: --quantize at tp 2 differs by {e2:.2e}");
        eprintln!("{name}: W4A16 tp 2 vs tp 1: checkpoint {e:.2e}, at load {e2:.2e}");
        let _ = std::fs::remove_dir_all(&out);
    }
    let g = common::mllama_golden("mllama-resize");
    let ckpt = Checkpoint::open(&g.dir).unwrap();
    let cfg = MllamaModel::load(&g.dir).unwrap().cfg;
    let e = TpMllamaCpuExecutor::new_quantized(cfg.clone(), &ckpt, 2, (KV_TOKENS, BLOCK), Some(Scheme::W4A16_G32))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("down_proj") && e.contains("quantization group"), "{e}");
    let e = TpMllamaCpuExecutor::new_quantized(cfg, &ckpt, 2, (KV_TOKENS, BLOCK), Some(Scheme::W4A8_G32))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("w4a8-g32"), "{e}");
}

/// An int8-embeddings W4A16 vision checkpoint as tensor-parallel ranks: each rank's `MllamaRankSource` keeps its
/// rows of the tables in int8 (slices of the whole model's int8 tables, the f32 rows their dequantization), and the
/// CPU ranks match tp = 1. The bf16 checkpoint read with `--quantize w4a16-g32 --embeddings int8` ([`AtLoad`])
/// gives the same rows, on every rank and whole, and its ranks match tp = 1 too.
#[test]
fn int8_table_vision_ranks_hold_their_int8_rows() {
    use llama32::quant::format::{quantize_checkpoint, EmbeddingQuant, QuantizeOptions};
    use llama32::quant::{AtLoad, Scheme};
    let at_load = AtLoad { scheme: Some(Scheme::W4A16_G32), tables_int8: true };
    use llama32::tp::load::MllamaRankSource;
    use llama32::tp::TpPlan;
    let name = "mllama-two-images";
    let g = common::mllama_golden(name);
    let out = std::env::temp_dir().join(format!("llama32-tp-vision-int8-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let opts = QuantizeOptions { embeddings: EmbeddingQuant::Int8, ..Default::default() };
    quantize_checkpoint(&g.dir, &out, Scheme::W4A16_G32, &opts, &|_, _| {}).unwrap();
    let c = Case::load(&out, g.input_ids.clone(), &g.images);
    let whole = &c.model.weights.text;
    let (e, h) = (whole.embed_int8.as_ref().unwrap(), whole.lm_head_int8.as_ref().unwrap());
    let ckpt = Checkpoint::open(&out).unwrap();
    let plan = TpPlan::new(&c.model.cfg.text.base, 2).unwrap();
    for rank in 0..2 {
        let src = MllamaRankSource::new(&c.model.cfg, &plan, rank, &ckpt).unwrap();
        let (ev, eq) = src.embed_table().unwrap();
        let want = e.slice_rows(src.embed_rows().unwrap(), "embed").unwrap();
        assert_eq!(eq.as_ref(), Some(&want), "rank {rank}: embedding rows");
        assert_eq!(ev, want.dequantize());
        let (_, hq) = src.lm_head_table().unwrap();
        let want = h.slice_rows(plan.rank(rank).unwrap().vocab, "lm_head").unwrap();
        assert_eq!(hq.as_ref(), Some(&want), "rank {rank}: lm_head rows");
        let bf16 = Checkpoint::open(&g.dir).unwrap();
        let at = MllamaRankSource::new_with(&c.model.cfg, &plan, rank, &bf16, at_load, true).unwrap();
        assert_eq!(at.embed_table().unwrap().1, eq, "rank {rank}: embedding rows quantized at load");
        assert_eq!(at.lm_head_table().unwrap().1, hq, "rank {rank}: lm_head rows quantized at load");
    }
    // Whole, on the CPU reference: the same tables.
    let loaded = MllamaModel::load_with(&g.dir, at_load).unwrap();
    assert_eq!(loaded.weights.text.embed_int8.as_ref(), Some(e));
    assert_eq!(loaded.weights.text.lm_head_int8.as_ref(), Some(h));
    assert_eq!(loaded.weights.text.lm_head, h.dequantize());
    let mut reference = c.reference();
    let mut exec = c.tp(2).unwrap();
    let err = compare(&c, &mut reference, &mut exec, &format!("{name} int8 tables tp=2"));
    assert!(err <= REL_TOL, "{name}: int8 tables at tp 2 differ by {err:.2e}");
    let bf16 = Checkpoint::open(&g.dir).unwrap();
    let mut exec =
        TpMllamaCpuExecutor::new_quantized(c.model.cfg.clone(), &bf16, 2, (KV_TOKENS, BLOCK), at_load).unwrap();
    let err = compare(&c, &mut reference, &mut exec, &format!("{name} at-load int8 tables tp=2"));
    assert!(err <= REL_TOL, "{name}: int8 tables quantized at load at tp 2 differ by {err:.2e}");
    let _ = std::fs::remove_dir_all(&out);
}
