//! Tensor parallelism on the CPU reference: tp = 2, 4 and 8 in-process ranks give the logits of tp = 1 within f32
//! rounding, over a prefill step of two sequences and several decode steps with paged KV, for the golden text
//! checkpoints and a random model with 8 query / 2 KV heads (tp = 8 replicates each KV head on 4 ranks).
//!
//! Tolerance: max |logit(tp) - logit(tp = 1)| <= 1e-5 x max |logit(tp = 1)| in every step. The ranks sum
//! row-parallel partial products in a different order than one GEMM does, so bit equality is not expected; the
//! tolerance is about 100 f32 ulps of the largest logit, far below any real error (a wrong KV head, a missing
//! all-reduce or a misplaced vocabulary slice changes logits by tens of percent).

use std::path::{Path, PathBuf};
use std::process::Command;

use llama32::config::LlamaConfig;
use llama32::exec::cpu::CpuExecutor;
use llama32::exec::generate::{build_step, LogitsWanted, SeqChunk};
use llama32::exec::Executor;
use llama32::kv::BlockAllocator;
use llama32::quant::format::{quantize_checkpoint, QuantizeOptions};
use llama32::quant::Scheme;
use llama32::sampling::argmax;
use llama32::tp::load::checkpoint_quantization;
use llama32::tp::TpCpuExecutor;
use llama32::weights::{Checkpoint, ModelWeights, WeightSource};

mod common;
use common::max_rel_diff;

const REL_TOL: f32 = 1e-5;
const BLOCK: usize = 4;
const DECODE_STEPS: usize = 4;

/// Runs the same steps through `reference` (tp = 1) and `tp` and returns the worst relative difference over the
/// steps: one prefill step of two prompts (all logits), then `DECODE_STEPS` decode steps of both sequences, each
/// fed the reference's greedy pick.
fn compare_steps(reference: &mut dyn Executor, tp: &mut TpCpuExecutor, prompts: [&[u32]; 2], name: &str) -> f32 {
    let mut alloc = BlockAllocator::new(reference.num_blocks(), BLOCK);
    let mut tables = [Vec::new(), Vec::new()];
    let total = |p: &[u32]| p.len() + DECODE_STEPS;
    // The second prompt's blocks first, so the two tables interleave in the pool.
    alloc.ensure(&mut tables[1], total(prompts[1])).unwrap();
    alloc.ensure(&mut tables[0], total(prompts[0])).unwrap();
    let chunks = [0, 1].map(|s| SeqChunk {
        tokens: prompts[s],
        start_pos: 0,
        block_table: &tables[s],
        logits: LogitsWanted::All,
    });
    let step = build_step(&chunks, BLOCK).unwrap();
    let want = reference.step(&step).unwrap().logits;
    let per_rank = tp.step_all_ranks(&step).unwrap();
    for (r, l) in per_rank.iter().enumerate() {
        assert!(l.iter().zip(&per_rank[0]).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}: rank {r} differs");
    }
    let mut worst = max_rel_diff(&per_rank[0], &want);
    let vocab = reference.config().vocab_size;
    let last = |logits: &[f32], row: usize| argmax(&logits[row * vocab..(row + 1) * vocab]);
    let mut next = [last(&want, prompts[0].len() - 1), last(&want, prompts[0].len() + prompts[1].len() - 1)];
    let mut pos = [prompts[0].len(), prompts[1].len()];
    for _ in 0..DECODE_STEPS {
        let toks = [[next[0]], [next[1]]];
        let chunks = [0, 1].map(|s| SeqChunk {
            tokens: &toks[s],
            start_pos: pos[s],
            block_table: &tables[s],
            logits: LogitsWanted::Last,
        });
        let step = build_step(&chunks, BLOCK).unwrap();
        let want = reference.step(&step).unwrap().logits;
        let got = tp.step(&step).unwrap().logits;
        worst = worst.max(max_rel_diff(&got, &want));
        next = [last(&want, 0), last(&want, 1)];
        pos = [pos[0] + 1, pos[1] + 1];
    }
    assert!(worst <= REL_TOL, "{name}: max |diff| / max|logit| = {worst:.2e} exceeds {REL_TOL:.0e}");
    eprintln!("{name}: max |diff| / max|logit| = {worst:.2e} (prefill + {DECODE_STEPS} decode steps)");
    worst
}

fn golden_config(dir: &Path) -> LlamaConfig {
    let mut cfg = LlamaConfig::from_model_dir(dir).unwrap();
    cfg.merge_generation_config(dir).unwrap();
    cfg
}

fn prompts(vocab: usize) -> (Vec<u32>, Vec<u32>) {
    // Ids spread over the whole vocabulary, so every rank's embedding slice is used.
    let p1: Vec<u32> = (0..11).map(|i| ((i * 97 + 5) % vocab) as u32).collect();
    let p2: Vec<u32> = (0..6).map(|i| ((i * 53 + vocab / 2 + 1) % vocab) as u32).collect();
    (p1, p2)
}

#[test]
fn golden_checkpoints_match_tp1_at_tp_2_4_8() {
    let cases: [(&str, &[usize]); 5] = [
        ("tied-gqa4", &[2, 4, 8]),
        ("untied-gqa2-sharded", &[2, 4]),
        ("gqa3-f16", &[2]),
        ("mha-f32-norope-scaling", &[2, 4]),
        ("cuda-d64-gqa4", &[2, 4]),
    ];
    let mut runs = 0;
    for (name, tps) in cases {
        let dir = common::golden_dir(name);
        let cfg = golden_config(&dir);
        let ckpt = Checkpoint::open(&dir).unwrap();
        let w = ModelWeights::load(&ckpt, &cfg, &|_| {}).unwrap();
        let mut reference = CpuExecutor::with_capacity(cfg.clone(), w, 64, BLOCK).unwrap();
        let (p1, p2) = prompts(cfg.vocab_size);
        for &tp in tps {
            let mut exec =
                TpCpuExecutor::with_capacity(cfg.clone(), WeightSource::Checkpoint(&ckpt), tp, 64, BLOCK).unwrap();
            assert_eq!(exec.tp(), tp);
            compare_steps(&mut reference, &mut exec, [&p1, &p2], &format!("{name} tp={tp}"));
            runs += 1;
        }
    }
    assert_eq!(runs, 10);
}

/// `dir` quantized by `llama32 quantize`'s library function into a fresh temporary directory.
fn quantized_copy(dir: &Path, scheme: Scheme, tag: &str) -> PathBuf {
    let out = std::env::temp_dir().join(format!("llama32-tp-quant-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    quantize_checkpoint(dir, &out, scheme, &QuantizeOptions::default(), &|_, _| {}).unwrap();
    out
}

/// W4A16 text models as tensor-parallel CPU ranks against tp = 1 quantized: a checkpoint written by
/// `quantize_checkpoint` (read whole and sliced per rank) and `--quantize` at load (each rank quantizes its own
/// slices), at tp 2 and 4; every rank bit-identical, within 1e-5 of the largest logit. A degree whose row-parallel
/// K share is not a multiple of the group is refused naming the tensor.
#[test]
fn quantized_golden_checkpoints_match_tp1_quantized() {
    // (checkpoint, degrees that run, (degree refused, the tensor named)).
    type Case<'a> = (&'a str, &'a [usize], &'a [(usize, &'a str)]);
    let cases: [Case; 2] =
        [("tied-gqa4", &[2, 4], &[(8, "self_attn.o_proj")]), ("untied-gqa2-sharded", &[2], &[(4, "mlp.down_proj")])];
    let scheme = Scheme::W4A16_G32;
    let mut runs = 0;
    for (name, tps, refused) in cases {
        let dir = common::golden_dir(name);
        let cfg = golden_config(&dir);
        let ckpt = Checkpoint::open(&dir).unwrap();
        let (p1, p2) = prompts(cfg.vocab_size);
        let dense = ModelWeights::load(&ckpt, &cfg, &|_| {}).unwrap();
        let mut plain = CpuExecutor::with_capacity(cfg.clone(), dense.clone(), 64, BLOCK).unwrap();
        // --quantize at load time.
        let mut w = dense;
        w.quantize_in_place(scheme).unwrap();
        let mut reference = CpuExecutor::with_capacity(cfg.clone(), w, 64, BLOCK).unwrap();
        let src = WeightSource::Checkpoint(&ckpt);
        let mut one = TpCpuExecutor::with_capacity_quantized(cfg.clone(), src, 1, Some(scheme), 64, BLOCK).unwrap();
        assert_eq!(compare_steps(&mut reference, &mut one, [&p1, &p2], &format!("{name} w4a16 tp=1")), 0.0);
        let mut first_step = Vec::new();
        for &tp in tps {
            let mut exec =
                TpCpuExecutor::with_capacity_quantized(cfg.clone(), src, tp, Some(scheme), 64, BLOCK).unwrap();
            assert_eq!(exec.quant_scheme(), Some(scheme));
            compare_steps(&mut reference, &mut exec, [&p1, &p2], &format!("{name} --quantize w4a16 tp={tp}"));
            runs += 1;
        }
        // The ranks really run int4 weights: far from the unquantized model.
        let mut exec = TpCpuExecutor::with_capacity_quantized(cfg.clone(), src, 2, Some(scheme), 64, BLOCK).unwrap();
        let step = build_step(
            &[SeqChunk { tokens: &p1, start_pos: 0, block_table: &[0, 1, 2], logits: LogitsWanted::All }],
            BLOCK,
        )
        .unwrap();
        let q = exec.step(&step).unwrap().logits;
        let d = max_rel_diff(&q, &plain.step(&step).unwrap().logits);
        assert!(d > 1e-4, "{name}: quantized tp=2 is {d:.2e} from bf16");
        first_step.push(q);
        for &(tp, tensor) in refused {
            let e = TpCpuExecutor::with_capacity_quantized(cfg.clone(), src, tp, Some(scheme), 64, BLOCK)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(tensor) && e.contains(&format!("tp = {tp}")) && e.contains("group 32"), "{e}");
        }

        // A checkpoint written quantized: detected from its config.json, read whole and sliced per rank.
        let qdir = quantized_copy(&dir, scheme, name);
        let qckpt = Checkpoint::open(&qdir).unwrap();
        let qcfg = checkpoint_quantization(&qckpt).unwrap().unwrap();
        let w = ModelWeights::load_quantized(&qckpt, &cfg, &qcfg, &|_| {}).unwrap();
        let mut reference = CpuExecutor::with_capacity(cfg.clone(), w, 64, BLOCK).unwrap();
        let qsrc = WeightSource::Checkpoint(&qckpt);
        for &tp in tps {
            let mut exec = TpCpuExecutor::with_capacity(cfg.clone(), qsrc, tp, 64, BLOCK).unwrap();
            assert_eq!(exec.quant_scheme(), Some(scheme));
            compare_steps(&mut reference, &mut exec, [&p1, &p2], &format!("{name} quantized checkpoint tp={tp}"));
            runs += 1;
        }
        // The same int4 weights as quantizing at load: the same logits, bit for bit.
        let mut exec = TpCpuExecutor::with_capacity(cfg.clone(), qsrc, 2, 64, BLOCK).unwrap();
        let q = exec.step(&step).unwrap().logits;
        assert!(q.iter().zip(&first_step[0]).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}: checkpoint vs at load");
        for &(tp, tensor) in refused {
            let e = TpCpuExecutor::with_capacity(cfg.clone(), qsrc, tp, 64, BLOCK).err().map(|e| e.to_string());
            assert!(e.as_deref().is_some_and(|e| e.contains(tensor)), "{e:?}");
        }
        // The ranks check the checkpoint as the whole-model loader does: with one layer fewer in the config, the
        // last layer's tensors are named instead of being left out of a truncated model.
        let fewer = LlamaConfig { num_hidden_layers: cfg.num_hidden_layers - 1, ..cfg.clone() };
        let e = TpCpuExecutor::with_capacity(fewer, qsrc, 2, 64, BLOCK).err().map(|e| e.to_string());
        let last = format!("unexpected tensor `model.layers.{}.", cfg.num_hidden_layers - 1);
        assert!(e.as_deref().is_some_and(|e| e.contains(&last)), "{e:?}");
        // Quantizing an already quantized checkpoint again is refused.
        let e = TpCpuExecutor::with_capacity_quantized(cfg.clone(), qsrc, 2, Some(scheme), 64, BLOCK).err();
        assert!(e.is_some_and(|e| e.to_string().contains("already quantized")));
        std::fs::remove_dir_all(&qdir).ok();
    }
    assert_eq!(runs, 6);
}

/// An int8-embeddings W4A16 checkpoint as tensor-parallel ranks: each rank keeps its vocabulary slice of the tables
/// in int8 (the rows of the whole model's int8 tables, the f32 rows their dequantization), and the ranks' logits
/// match tp = 1 on the same checkpoint. The bf16 checkpoint quantized at load (`--quantize w4a16-g32 --embeddings
/// int8`, [`AtLoad`]) gives every rank the same int8 rows, and its ranks match that tp = 1 reference too.
#[test]
fn int8_table_ranks_hold_their_int8_rows() {
    use llama32::quant::format::EmbeddingQuant;
    use llama32::quant::AtLoad;
    use llama32::tp::load::{load_rank_weights, load_rank_weights_at, RankQuant};
    use llama32::tp::TpPlan;
    let at_load = AtLoad { scheme: Some(Scheme::W4A16_G32), tables_int8: true };
    for (name, tp) in [("tied-gqa4", 2), ("untied-gqa2-sharded", 2)] {
        let dir = common::golden_dir(name);
        let cfg = golden_config(&dir);
        let out = std::env::temp_dir().join(format!("llama32-tp-int8-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let opts = QuantizeOptions { embeddings: EmbeddingQuant::Int8, ..Default::default() };
        quantize_checkpoint(&dir, &out, Scheme::W4A16_G32, &opts, &|_, _| {}).unwrap();
        let ckpt = Checkpoint::open(&out).unwrap();
        let bf16 = Checkpoint::open(&dir).unwrap();
        let qcfg = checkpoint_quantization(&ckpt).unwrap().unwrap();
        let whole = ModelWeights::load_quantized(&ckpt, &cfg, &qcfg, &|_| {}).unwrap();
        let plan = TpPlan::new(&cfg, tp).unwrap();
        for rank in 0..tp {
            let w = load_rank_weights(&plan, rank, WeightSource::Checkpoint(&ckpt)).unwrap();
            let vocab = plan.rank(rank).unwrap().vocab;
            let want = whole.embed_int8.as_ref().unwrap().slice_rows(vocab.clone(), "embed").unwrap();
            assert_eq!(w.embed_int8.as_ref(), Some(&want), "{name} rank {rank}: embed rows");
            assert_eq!(w.embed, want.dequantize(), "{name} rank {rank}");
            if let Some(h) = whole.lm_head_int8.as_ref() {
                assert_eq!(w.lm_head_int8, Some(h.slice_rows(vocab, "lm_head").unwrap()), "{name} rank {rank}");
            } else {
                assert!(w.lm_head.is_none() && w.lm_head_int8.is_none());
            }
            // The same rows from the bf16 checkpoint, quantized by the rank as it reads them.
            let src = WeightSource::Checkpoint(&bf16);
            let quant = RankQuant::resolve(&src, at_load.scheme).unwrap();
            let mine = load_rank_weights_at(&plan, rank, src, (quant.as_ref(), true), true).unwrap();
            assert_eq!(mine.embed_int8, w.embed_int8, "{name} rank {rank}: embed rows quantized at load");
            assert_eq!(mine.lm_head_int8, w.lm_head_int8, "{name} rank {rank}: lm_head rows quantized at load");
            assert_eq!(mine.embed, w.embed, "{name} rank {rank}");
        }
        let (p1, p2) = prompts(cfg.vocab_size);
        let mut reference = CpuExecutor::with_capacity(cfg.clone(), whole, 64, BLOCK).unwrap();
        let mut ranks =
            TpCpuExecutor::with_capacity(cfg.clone(), WeightSource::Checkpoint(&ckpt), tp, 64, BLOCK).unwrap();
        compare_steps(&mut reference, &mut ranks, [&p1, &p2], &format!("{name} int8 tables tp={tp}"));
        let mut at_load_ranks = TpCpuExecutor::with_capacity_quantized(
            cfg.clone(),
            WeightSource::Checkpoint(&bf16),
            tp,
            at_load,
            64,
            BLOCK,
        )
        .unwrap();
        compare_steps(&mut reference, &mut at_load_ranks, [&p1, &p2], &format!("{name} at-load int8 tables tp={tp}"));
        std::fs::remove_dir_all(&out).ok();
    }
}

#[test]
fn w4a8_with_tensor_parallelism_is_refused_naming_the_scheme() {
    let dir = common::golden_dir("tied-gqa4");
    let cfg = golden_config(&dir);
    let ckpt = Checkpoint::open(&dir).unwrap();
    let src = WeightSource::Checkpoint(&ckpt);
    let e = TpCpuExecutor::with_capacity_quantized(cfg.clone(), src, 2, Some(Scheme::W4A8_G32), 16, BLOCK).err();
    let e = e.map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("w4a8-g32") && e.contains("row-parallel"), "{e}");
    // A W4A8 checkpoint too; at tp = 1 it loads (the single-device numerics).
    let qdir = quantized_copy(&dir, Scheme::W4A8_G32, "w4a8");
    let qckpt = Checkpoint::open(&qdir).unwrap();
    let e = TpCpuExecutor::with_capacity(cfg.clone(), WeightSource::Checkpoint(&qckpt), 2, 16, BLOCK).err();
    assert!(e.is_some_and(|e| e.to_string().contains("w4a8-g32")));
    let one = TpCpuExecutor::with_capacity(cfg, WeightSource::Checkpoint(&qckpt), 1, 16, BLOCK).unwrap();
    assert_eq!(one.quant_scheme(), Some(Scheme::W4A8_G32));
    std::fs::remove_dir_all(&qdir).ok();
}

fn random_config() -> LlamaConfig {
    let mut cfg = llama32::config::Preset::Llama32_1B.config();
    cfg.vocab_size = 512;
    cfg.hidden_size = 128;
    cfg.intermediate_size = 192;
    cfg.num_hidden_layers = 3;
    cfg.num_attention_heads = 8;
    cfg.num_key_value_heads = 2;
    cfg.head_dim = 16;
    cfg.max_position_embeddings = 4096;
    cfg.tie_word_embeddings = false;
    cfg
}

/// Writes `cfg` as a Hugging Face config.json into a fresh temporary directory.
fn write_config_dir(cfg: &LlamaConfig, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llama32-tp-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&json).unwrap()).unwrap();
    dir
}

#[test]
fn random_model_with_kv_replication_matches_tp1() {
    let dir = write_config_dir(&random_config(), "random");
    let cfg = LlamaConfig::from_model_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let seed = 7;
    let w = ModelWeights::random(&cfg, seed).unwrap();
    let mut reference = CpuExecutor::with_capacity(cfg.clone(), w, 64, BLOCK).unwrap();
    let (p1, p2) = prompts(cfg.vocab_size);
    // tp = 1 through the tensor-parallel executor is the plain executor, bit for bit.
    let mut one = TpCpuExecutor::with_capacity(cfg.clone(), WeightSource::Random(seed), 1, 64, BLOCK).unwrap();
    assert_eq!(compare_steps(&mut reference, &mut one, [&p1, &p2], "random tp=1"), 0.0);
    for tp in [2, 4, 8] {
        let mut exec = TpCpuExecutor::with_capacity(cfg.clone(), WeightSource::Random(seed), tp, 64, BLOCK).unwrap();
        assert_eq!(exec.rank_config().num_key_value_heads, 1.max(2 / tp));
        compare_steps(&mut reference, &mut exec, [&p1, &p2], &format!("random tp={tp}"));
    }
    // A different seed is a different model: the comparison can fail.
    let mut other = TpCpuExecutor::with_capacity(cfg.clone(), WeightSource::Random(seed + 1), 2, 64, BLOCK).unwrap();
    let step = build_step(
        &[SeqChunk { tokens: &p1, start_pos: 0, block_table: &[0, 1, 2], logits: LogitsWanted::All }],
        BLOCK,
    )
    .unwrap();
    let a = reference.step(&step).unwrap().logits;
    let b = other.step(&step).unwrap().logits;
    assert!(max_rel_diff(&b, &a) > 1e-2);
}

#[test]
fn a_tp_that_does_not_divide_the_model_names_the_field() {
    let dir = common::golden_dir("cuda-d128-gqa3"); // 3 heads, 1 KV head, vocab 320
    let cfg = golden_config(&dir);
    let ckpt = Checkpoint::open(&dir).unwrap();
    let err = |tp| {
        TpCpuExecutor::with_capacity(cfg.clone(), WeightSource::Checkpoint(&ckpt), tp, 16, BLOCK)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(err(2).contains("num_attention_heads"), "{}", err(2));
    assert!(err(3).contains("vocab_size"), "{}", err(3));
    assert!(err(0).contains("at least 1"), "{}", err(0));
    let mut cfg = random_config();
    cfg.num_attention_heads = 12;
    cfg.num_key_value_heads = 4;
    let e = TpCpuExecutor::with_capacity(cfg.clone(), WeightSource::Random(0), 6, 16, BLOCK).err().unwrap();
    assert!(e.to_string().contains("num_key_value_heads"), "{e}");
    cfg.num_attention_heads = 8;
    cfg.num_key_value_heads = 2;
    cfg.intermediate_size = 100;
    let e = TpCpuExecutor::with_capacity(cfg, WeightSource::Random(0), 8, 16, BLOCK).err().unwrap();
    assert!(e.to_string().contains("intermediate_size"), "{e}");
}

fn run_logits(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_llama32")).arg("logits").args(args).output().unwrap()
}

#[test]
fn cli_logits_with_tensor_parallel_match_tp1() {
    let dir = common::golden_dir("tied-gqa4");
    let model = dir.to_str().unwrap();
    let tmp = std::env::temp_dir().join(format!("llama32-tp-cli-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let ids = "1,17,300,42,511,256,3,99,128";
    let npy = |tp: usize| tmp.join(format!("tp{tp}.npy"));
    let mut outs = Vec::new();
    for tp in [1, 2, 4, 8] {
        let out = npy(tp);
        let tp_s = tp.to_string();
        let o = run_logits(&[
            "--model",
            model,
            "--ids",
            ids,
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
            "--tensor-parallel",
            &tp_s,
            "--block-size",
            "4",
        ]);
        assert!(o.status.success(), "tp {tp}: {}", String::from_utf8_lossy(&o.stderr));
        outs.push(llama32::npy::read_f32(&out).unwrap());
    }
    for (k, a) in outs.iter().enumerate().skip(1) {
        assert_eq!(a.shape, outs[0].shape);
        assert_eq!(a.shape, vec![9, 512]);
        let d = max_rel_diff(&a.data, &outs[0].data);
        assert!(d <= REL_TOL, "tp {}: {d:.2e}", 1 << k);
        eprintln!("cli tp={}: max |diff| / max|logit| = {d:.2e}", 1 << k);
    }
    let o = run_logits(&["--model", model, "--ids", ids, "--out", npy(3).to_str().unwrap(), "--tensor-parallel", "3"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("num_attention_heads"), "{err}");
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn cli_logits_quantized_with_tensor_parallel_match_tp1() {
    let dir = common::golden_dir("tied-gqa4");
    let model = dir.to_str().unwrap();
    let tmp = std::env::temp_dir().join(format!("llama32-tp-cli-quant-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let ids = "1,17,300,42,511,256,3,99,128";
    let logits = |model: &str, tp: usize, extra: &[&str]| {
        let out = tmp.join(format!("tp{tp}.npy"));
        let tp_s = tp.to_string();
        let mut args = vec!["--model", model, "--ids", ids, "--out", out.to_str().unwrap(), "--device", "cpu"];
        args.extend(["--tensor-parallel", &tp_s, "--block-size", "4"]);
        args.extend_from_slice(extra);
        let o = run_logits(&args);
        assert!(o.status.success(), "tp {tp} {extra:?}: {}", String::from_utf8_lossy(&o.stderr));
        llama32::npy::read_f32(&out).unwrap().data
    };
    let q = ["--quantize", "w4a16-g32"];
    let one = logits(model, 1, &q);
    let plain = logits(model, 1, &[]);
    assert!(max_rel_diff(&one, &plain) > 1e-4, "--quantize changes the logits");
    for tp in [2, 4] {
        let d = max_rel_diff(&logits(model, tp, &q), &one);
        assert!(d <= REL_TOL, "--quantize tp {tp}: {d:.2e}");
        eprintln!("cli --quantize w4a16-g32 tp={tp}: max |diff| / max|logit| = {d:.2e}");
    }
    // A quantized checkpoint needs no flag.
    let qdir = quantized_copy(&dir, Scheme::W4A16_G32, "cli");
    let d = max_rel_diff(&logits(qdir.to_str().unwrap(), 2, &[]), &one);
    assert!(d <= REL_TOL, "quantized checkpoint tp 2: {d:.2e}");
    // Refused, naming the scheme / the tensor.
    let out = tmp.join("x.npy");
    let out = out.to_str().unwrap();
    let e = failure(
        "logits",
        &["--model", model, "--ids", ids, "--out", out, "--tensor-parallel", "2", "--quantize", "w4a8-g32"],
    );
    assert!(e.contains("--tensor-parallel 2") && e.contains("w4a8-g32"), "{e}");
    let e = failure(
        "logits",
        &["--model", model, "--ids", ids, "--out", out, "--tensor-parallel", "8", "--quantize", "w4a16-g32"],
    );
    assert!(e.contains("--tensor-parallel 8") && e.contains("self_attn.o_proj"), "{e}");
    let e = failure(
        "logits",
        &[
            "--model",
            qdir.to_str().unwrap(),
            "--ids",
            ids,
            "--out",
            out,
            "--tensor-parallel",
            "2",
            "--quantize",
            "w4a16-g32",
        ],
    );
    assert!(e.contains("already quantized"), "{e}");
    std::fs::remove_dir_all(&qdir).ok();
    std::fs::remove_dir_all(&tmp).ok();
}

fn run_cli(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_llama32")).arg(cmd).args(args).output().unwrap()
}

/// The stderr of a run that must fail cleanly (an error line, no panic).
fn failure(cmd: &str, args: &[&str]) -> String {
    let o = run_cli(cmd, args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{cmd} {args:?} should fail: {err}");
    assert!(err.contains("error: ") && !err.contains("panicked"), "{cmd} {args:?}: {err}");
    err
}

#[test]
fn cli_cuda_tensor_parallel_flags_are_checked_before_any_device() {
    let text = common::golden_dir("cuda-d64-gqa4");
    let text = text.to_str().unwrap();
    let out = std::env::temp_dir().join(format!("llama32-tp-cuda-flags-{}.npy", std::process::id()));
    let out = out.to_str().unwrap();
    let logits = |extra: &[&str]| {
        let mut args = vec!["--model", text, "--ids", "1,2,3", "--out", out];
        args.extend_from_slice(extra);
        failure("logits", &args)
    };
    let e = logits(&["--device", "cuda", "--tensor-parallel", "2", "--devices", "0,x"]);
    assert!(e.contains("--devices: `x` is not a CUDA device"), "{e}");
    let e = logits(&["--device", "cuda", "--tensor-parallel", "2", "--devices", ","]);
    assert!(e.contains("--devices: no devices given"), "{e}");
    let e = logits(&["--device", "cpu", "--tensor-parallel", "2", "--devices", "0"]);
    assert!(e.contains("--devices 0") && e.contains("--device cpu"), "{e}");
    let e = logits(&["--device", "cuda", "--devices", "0"]);
    assert!(e.contains("--devices 0") && e.contains("--tensor-parallel N > 1"), "{e}");
    let e = logits(&["--device", "cuda", "--tensor-parallel", "0"]);
    assert!(e.contains("--tensor-parallel must be at least 1"), "{e}");
    let e = logits(&["--device", "cuda:x", "--tensor-parallel", "2"]);
    assert!(e.contains("--device"), "{e}");
    // Quantized models run as W4A16 ranks; W4A8 (--quantize, or a W4A8 checkpoint) is refused naming the scheme,
    // and so is a degree whose row-parallel K share is not a multiple of the group, before any device.
    let e = logits(&["--device", "cuda", "--tensor-parallel", "2", "--quantize", "w4a8-g32"]);
    assert!(e.contains("--tensor-parallel 2") && e.contains("does not support w4a8-g32"), "{e}");
    let gqa4 = common::golden_dir("tied-gqa4");
    let args =
        ["--model", gqa4.to_str().unwrap(), "--ids", "1,2", "--out", out, "--device", "cuda", "--tensor-parallel", "8"];
    let e = failure("logits", &[&args[..], &["--quantize", "w4a16-g32"]].concat());
    assert!(e.contains("self_attn.o_proj") && e.contains("group 32"), "{e}");
    let quantized = std::env::temp_dir().join(format!("llama32-tp-cuda-quantized-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&quantized);
    let q = run_cli("quantize", &["--model", text, "--out", quantized.to_str().unwrap(), "--scheme", "w4a8-g32"]);
    assert!(q.status.success(), "quantize: {}", String::from_utf8_lossy(&q.stderr));
    let args = [
        "--model",
        quantized.to_str().unwrap(),
        "--ids",
        "1,2",
        "--out",
        out,
        "--device",
        "cuda",
        "--tensor-parallel",
        "2",
    ];
    let e = failure("logits", &args);
    assert!(e.contains("does not support w4a8-g32"), "{e}");
    std::fs::remove_dir_all(&quantized).ok();
    // A degree that does not divide the model names the field (3 heads).
    let gqa3 = common::golden_dir("cuda-d128-gqa3");
    let args =
        ["--model", gqa3.to_str().unwrap(), "--ids", "1,2", "--out", out, "--device", "cuda", "--tensor-parallel", "2"];
    let e = failure("logits", &args);
    assert!(e.contains("num_attention_heads"), "{e}");
    // Vision checkpoints run as CUDA ranks too (tests/gpu/cuda_tp_vision.rs); their flags are checked before any
    // device: a degree that does not divide the 8 heads, and a quantized split that is not group-aligned.
    let vision = common::golden_dir("mllama-resize");
    let vision = vision.to_str().unwrap();
    let e = failure(
        "logits",
        &["--model", vision, "--ids", "1,2", "--out", out, "--device", "cuda", "--tensor-parallel", "3"],
    );
    assert!(e.contains("num_attention_heads"), "{e}");
    let mut args = vec!["--model", vision, "--ids", "1,2", "--out", out, "--device", "cuda", "--tensor-parallel", "2"];
    args.extend(["--quantize", "w4a16-g32"]);
    let e = failure("logits", &args);
    // W4A16 vision ranks exist, but this model's down_proj share at tp = 2 (48 columns) straddles the 32-groups.
    assert!(e.contains("down_proj") && e.contains("quantization group"), "{e}");
    let dir = std::env::temp_dir().join(format!("llama32-tp-cuda-batch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.jsonl");
    std::fs::write(&input, "").unwrap();
    let (input, output) = (input.to_str().unwrap().to_string(), dir.join("out.jsonl").to_str().unwrap().to_string());
    let batch = |model: &str, extra: &[&str]| {
        let mut args = vec!["--model", model, "--input", &input, "--output", &output, "--no-progress"];
        args.extend_from_slice(extra);
        failure("batch", &args)
    };
    let e = batch(vision, &["--device", "cuda:0", "--tensor-parallel", "3"]);
    assert!(e.contains("num_attention_heads"), "{e}");
    let e = batch(text, &["--device", "cuda", "--tensor-parallel", "2", "--devices", "cuda:0,gpu1"]);
    assert!(e.contains("--devices: `gpu1`"), "{e}");
    let e = batch(text, &["--device", "cpu", "--tensor-parallel", "2", "--devices", "0,1"]);
    assert!(e.contains("--devices 0,1"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cli_cuda_tensor_parallel_without_a_device_fails_clearly() {
    if llama32::ops::cuda::probe().is_ok() {
        eprintln!("skipped: a CUDA device is present (tests/gpu/cuda_tp.rs runs the CUDA ranks)");
        return;
    }
    let text = common::golden_dir("cuda-d64-gqa4");
    let text = text.to_str().unwrap();
    let out = std::env::temp_dir().join(format!("llama32-tp-cuda-none-{}.npy", std::process::id()));
    let out = out.to_str().unwrap();
    for extra in [&["--device", "cuda"][..], &["--device", "cuda", "--devices", "0"], &["--device", "cuda:1"]] {
        let mut args = vec!["--model", text, "--ids", "1,2,3", "--out", out, "--tensor-parallel", "2"];
        args.extend_from_slice(extra);
        let e = failure("logits", &args);
        assert!(e.contains("no usable CUDA device for --tensor-parallel 2"), "{extra:?}: {e}");
        assert!(e.contains(&format!("--device {}", extra[1])), "{extra:?}: {e}");
    }
    assert!(!std::path::Path::new(out).exists());
    // serve/batch load in the engine thread: the error still comes back as an error.
    let dir = std::env::temp_dir().join(format!("llama32-tp-cuda-none-batch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.jsonl");
    std::fs::write(&input, "").unwrap();
    let output = dir.join("out.jsonl");
    let args = [
        "--model",
        text,
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--no-progress",
        "--device",
        "cuda",
        "--tensor-parallel",
        "2",
        "--devices",
        "0",
    ];
    let e = failure("batch", &args);
    assert!(e.contains("no usable CUDA device for --tensor-parallel 2"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `batch ARGS` with a fresh empty input file unless `with_input` is false (a follower needs none); returns the
/// stderr of a run that must fail cleanly, and how long it took.
fn batch_failure(tag: &str, args: &[&str], with_input: bool) -> (String, std::time::Duration) {
    let dir = std::env::temp_dir().join(format!("llama32-tp-multinode-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.jsonl");
    std::fs::write(&input, "").unwrap();
    let output = dir.join("out.jsonl");
    let mut all: Vec<&str> = vec!["--no-progress"];
    if with_input {
        all.extend(["--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()]);
    }
    all.extend_from_slice(args);
    let t0 = std::time::Instant::now();
    let e = failure("batch", &all);
    let took = t0.elapsed();
    assert!(!output.exists(), "a refused run writes no results");
    std::fs::remove_dir_all(&dir).ok();
    (e, took)
}

#[test]
fn cli_multi_node_flags_are_checked_before_any_device() {
    let text = common::golden_dir("cuda-d64-gqa4");
    let text = text.to_str().unwrap();
    // A valid 2-node command on 4 ranks (2 per node), with `extra` appended.
    fn with<'a>(text: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["--model", text, "--device", "cuda", "--tensor-parallel", "4", "--nnodes", "2"];
        args.extend_from_slice(extra);
        args
    }
    let two = |extra: &[&'static str]| with(text, extra);
    let master = ["--master-addr", "127.0.0.1"];
    let args = ["--model", text, "--device", "cpu", "--tensor-parallel", "4", "--nnodes", "2", master[0], master[1]];
    let e = batch_failure("cpu", &args, true).0;
    assert!(e.contains("--nnodes 2") && e.contains("--device cuda"), "{e}");
    let args = ["--model", text, "--device", "cuda", "--tensor-parallel", "3", "--nnodes", "2", "--master-addr", "h"];
    let e = batch_failure("indivisible", &args, true).0;
    assert!(e.contains("--tensor-parallel 3") && e.contains("divisible by --nnodes 2"), "{e}");
    let e = batch_failure("rank", &two(&["--master-addr", "h", "--node-rank", "2"]), true).0;
    assert!(e.contains("--node-rank 2 must be less than --nnodes 2"), "{e}");
    let e = batch_failure("addr", &two(&[]), true).0;
    assert!(e.contains("--master-addr HOST"), "{e}");
    let e = batch_failure("quantize", &two(&[&master[..], &["--quantize", "w4a8-g32"]].concat()), true).0;
    assert!(e.contains("--quantize w4a8-g32"), "{e}");
    let e = batch_failure("port", &two(&[&master[..], &["--master-port", "65535"]].concat()), true).0;
    assert!(e.contains("--master-port 65535"), "{e}");
    let e = batch_failure("devices", &two(&[&master[..], &["--devices", "0"]].concat()), true).0;
    assert!(e.contains("--devices") && e.contains("would share cuda:0"), "{e}");
    // A degree that does not divide the model (3 heads) names the field, on every node, before any device.
    let gqa3 = common::golden_dir("cuda-d128-gqa3");
    let args =
        ["--model", gqa3.to_str().unwrap(), "--device", "cuda", "--tensor-parallel", "2", "--nnodes", "2", master[0]];
    for rank in ["0", "1"] {
        let e = batch_failure("heads", &[&args[..], &[master[1], "--node-rank", rank]].concat(), rank == "0").0;
        assert!(e.contains("num_attention_heads"), "{e}");
    }
    // serve and bench-serve take the same flags.
    let e = failure("serve", &two(&["--node-rank", "5", "--master-addr", "h"]));
    assert!(e.contains("--node-rank 5 must be less than --nnodes 2"), "{e}");
    let e = failure("bench-serve", &two(&[]));
    assert!(e.contains("--master-addr HOST"), "{e}");
    // Node 0 still needs the batch file; without --nnodes, --input is required as before.
    let e = batch_failure("input", &two(&master), false).0;
    assert!(e.contains("--input FILE is required"), "{e}");
    let e = batch_failure("input1", &["--model", text], false).0;
    assert!(e.contains("--input FILE is required"), "{e}");
}

#[test]
fn cli_multi_node_without_a_device_fails_clearly() {
    if llama32::ops::cuda::probe().is_ok() {
        eprintln!("skipped: a CUDA device is present (a multi-node run needs several machines)");
        return;
    }
    let text = common::golden_dir("cuda-d64-gqa4");
    let text = text.to_str().unwrap();
    // Node 0 and node 1 of a valid 2-node run: the error comes before any rendezvous, so nothing waits for the
    // other node (--node-timeout is left at its 600 s default on purpose).
    for rank in ["0", "1"] {
        let mut args = vec!["--model", text, "--device", "cuda", "--tensor-parallel", "4", "--nnodes", "2"];
        args.extend(["--node-rank", rank, "--master-addr", "127.0.0.1", "--master-port", "29731"]);
        // A follower needs no --input (and reads none).
        let (e, took) = batch_failure(&format!("none{rank}"), &args, rank == "0");
        assert!(e.contains("no usable CUDA device for --tensor-parallel 4 over --nnodes 2"), "node {rank}: {e}");
        assert!(e.contains("--device cuda"), "{e}");
        assert!(took < std::time::Duration::from_secs(60), "node {rank} took {took:?}");
        let e = failure("serve", &args);
        assert!(e.contains("no usable CUDA device"), "serve on node {rank}: {e}");
        let e = failure("bench-serve", &[&args[..], &["--devices", "1,0"]].concat());
        assert!(e.contains("no usable CUDA device"), "bench-serve on node {rank}: {e}");
    }
}
