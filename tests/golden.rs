//! Golden tests: the CPU reference against HF transformers on tiny random-weight checkpoints (tests/golden/).
//! Logits must match within 1e-4 relative to the largest reference logit, and greedy ids exactly.

use std::path::PathBuf;

use llama32::config::LlamaConfig;
use llama32::exec::cpu::CpuExecutor;
use llama32::exec::generate::{build_step, generate, score, GenRequest, GenerateOptions, LogitsWanted, SeqChunk};
use llama32::exec::Executor;
use llama32::kv::BlockAllocator;
use llama32::sampling::SamplingParams;
use llama32::weights::{Checkpoint, ModelWeights};
use serde_json::Value;

mod common;

const CASES: [&str; 6] =
    ["tied-gqa4", "untied-gqa2-sharded", "gqa3-f16", "mha-f32-norope-scaling", "cuda-d64-gqa4", "cuda-d128-gqa3"];
const REL_TOL: f32 = 1e-4;

struct Case {
    dir: PathBuf,
    cfg: LlamaConfig,
    reference: Value,
}

impl Case {
    fn load(name: &str) -> Case {
        let dir = common::golden_dir(name);
        let mut cfg = LlamaConfig::from_model_dir(&dir).unwrap();
        cfg.merge_generation_config(&dir).unwrap();
        let reference: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        Case { dir, cfg, reference }
    }

    fn ids(&self, key: &str) -> Vec<u32> {
        self.reference[key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
    }

    fn executor(&self, block_size: usize) -> CpuExecutor {
        let ckpt = Checkpoint::open(&self.dir).unwrap();
        let w = ModelWeights::load(&ckpt, &self.cfg, &|_| {}).unwrap();
        CpuExecutor::with_capacity(self.cfg.clone(), w, 512, block_size).unwrap()
    }

    fn ref_logits(&self, file: &str) -> Vec<f32> {
        let a = llama32::npy::read_f32(&self.dir.join(file)).unwrap();
        assert_eq!(a.shape[1], self.cfg.vocab_size);
        a.data
    }
}

fn assert_close(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let (mut worst, mut at) = (0.0f32, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        if d.is_nan() || d > worst {
            worst = if d.is_nan() { f32::INFINITY } else { d };
            at = i;
        }
    }
    assert!(
        worst <= REL_TOL * scale,
        "{name}: max |diff| {worst} at {at} (got {}, want {}) exceeds {REL_TOL} x max|ref| {scale}",
        got[at],
        want[at]
    );
    eprintln!("{name}: max |diff| / max|ref| = {:.2e}", worst / scale);
}

#[test]
fn logits_match_transformers() {
    for name in CASES {
        let case = Case::load(name);
        let mut exec = case.executor(16);
        let got = score(&mut exec, &case.ids("prompt_ids"), 512).unwrap();
        assert_close(name, &got, &case.ref_logits("logits.npy"));
    }
}

#[test]
fn chunked_prefill_and_odd_block_sizes_match() {
    for name in ["tied-gqa4", "untied-gqa2-sharded"] {
        let case = Case::load(name);
        let mut exec = case.executor(5);
        let got = score(&mut exec, &case.ids("prompt_ids"), 7).unwrap();
        assert_close(&format!("{name} chunk 7, block 5"), &got, &case.ref_logits("logits.npy"));
    }
}

#[test]
fn two_sequences_in_one_step_match() {
    for name in CASES {
        let case = Case::load(name);
        let mut exec = case.executor(16);
        let (p1, p2) = (case.ids("prompt_ids"), case.ids("prompt2_ids"));
        let mut alloc = BlockAllocator::new(exec.num_blocks(), exec.block_size());
        let (mut t1, mut t2) = (Vec::new(), Vec::new());
        // Allocate the short prompt first so the two block tables interleave differently from a single run.
        alloc.ensure(&mut t2, p2.len()).unwrap();
        alloc.ensure(&mut t1, p1.len()).unwrap();
        let step = build_step(
            &[
                SeqChunk { tokens: &p2, start_pos: 0, block_table: &t2, logits: LogitsWanted::All },
                SeqChunk { tokens: &p1, start_pos: 0, block_table: &t1, logits: LogitsWanted::All },
            ],
            exec.block_size(),
        )
        .unwrap();
        let out = exec.step(&step).unwrap().logits;
        let split = p2.len() * case.cfg.vocab_size;
        assert_close(&format!("{name} prompt2 batched"), &out[..split], &case.ref_logits("logits2.npy"));
        assert_close(&format!("{name} prompt batched"), &out[split..], &case.ref_logits("logits.npy"));
    }
}

#[test]
fn greedy_ids_match_transformers_batched() {
    for name in CASES {
        let case = Case::load(name);
        let mut exec = case.executor(16);
        let n = case.reference["greedy_new_tokens"].as_u64().unwrap() as usize;
        let params = SamplingParams { max_tokens: n, ..SamplingParams::greedy() };
        let reqs = [
            GenRequest { prompt: case.ids("prompt_ids"), params: params.clone() },
            GenRequest { prompt: case.ids("prompt2_ids"), params },
        ];
        let opts = GenerateOptions { eos_ids: case.cfg.eos_token_ids.clone(), max_step_tokens: 64 };
        let out = generate(&mut exec, &reqs, &opts, &mut |_, _| Ok(String::new()), &mut |_, _| {}).unwrap();
        assert_eq!(out[0].ids, case.ids("greedy_ids"), "{name}: greedy ids of prompt");
        assert_eq!(out[1].ids, case.ids("greedy2_ids"), "{name}: greedy ids of prompt2");
    }
}

/// Prompt log-probabilities through the serving engine (prefill in 40-token chunks, the prompt's blocks cached by
/// an earlier request) are the log-softmax of transformers' logits, with its most likely tokens as alternatives.
#[test]
fn prompt_logprobs_through_the_engine_match_transformers() {
    use llama32::serve::engine::{EngineConfig, EngineHandle};
    use llama32::serve::GenerateRequest;
    for name in ["tied-gqa4", "cuda-d128-gqa3"] {
        let case = Case::load(name);
        let prompt = case.ids("prompt_ids");
        let (dir, cfg) = (case.dir.clone(), case.cfg.clone());
        let make = move || -> llama32::Result<Box<dyn Executor>> {
            let w = ModelWeights::load(&Checkpoint::open(&dir)?, &cfg, &|_| {})?;
            Ok(Box::new(CpuExecutor::with_capacity(cfg, w, 512, 16)?))
        };
        let e = EngineHandle::start(make, None, EngineConfig { max_step_tokens: 40, ..Default::default() }).unwrap();
        let params = SamplingParams { max_tokens: 1, ..SamplingParams::greedy() };
        let mut first = e.submit_blocking(GenerateRequest::new(prompt.clone(), params.clone())).unwrap();
        while first.blocking_next().is_some() {}
        let mut r = GenerateRequest::new(prompt.clone(), params);
        r.prompt_logprobs = Some(3);
        let scores = common::prompt_logprobs_of(e.submit_blocking(r).unwrap(), name);
        assert_eq!(scores.len(), prompt.len() - 1, "{name}");
        let want = case.ref_logits("logits.npy");
        let vocab = case.cfg.vocab_size;
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let tol = 3.0 * REL_TOL as f64 * scale;
        let mut worst = 0f64;
        for (i, lp) in scores.iter().enumerate() {
            assert_eq!(lp.id, prompt[i + 1], "{name}: entry {i}");
            let row = &want[i * vocab..(i + 1) * vocab];
            let ls = common::log_softmax(row);
            let hf = |id: u32| ls[id as usize];
            let mut order: Vec<u32> = (0..vocab as u32).collect();
            order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
            worst = worst.max((lp.logprob as f64 - hf(lp.id)).abs());
            assert_eq!(lp.top.len(), 3, "{name}");
            for (k, &(id, v)) in lp.top.iter().enumerate() {
                worst = worst.max((v as f64 - hf(id)).abs()).max((v as f64 - hf(order[k])).abs());
            }
        }
        assert!(worst <= tol, "{name}: prompt logprobs differ from transformers' by {worst:.2e} (tolerance {tol:.2e})");
        eprintln!("{name}: prompt logprobs max |diff| {worst:.2e}");
    }
}

#[test]
fn bad_token_id_is_rejected() {
    let case = Case::load("tied-gqa4");
    let mut exec = case.executor(16);
    let vocab = case.cfg.vocab_size as u32;
    let err = score(&mut exec, &[1, vocab, 2], 512).unwrap_err().to_string();
    assert!(err.contains(&format!("token id {vocab}")) && err.contains("outside the vocabulary"), "{err}");
}

/// `Executor::set_ablation` leaves out exactly the named calls (the profile sees none of them and every other call
/// as often as before), changes the output, and an empty list restores the full step bit for bit. Every label the
/// recipe calls, except `begin_step` and `gather_logits`, can be left out.
#[test]
fn ablated_steps_leave_out_exactly_the_named_calls() {
    use llama32::model::profile::{StepProfile, ABLATABLE};
    let case = Case::load("untied-gqa2-sharded");
    let mut exec = case.executor(16);
    let prompt = case.ids("prompt_ids");
    let mut alloc = BlockAllocator::new(exec.num_blocks(), exec.block_size());
    let mut table = Vec::new();
    alloc.ensure(&mut table, prompt.len()).unwrap();
    let chunk = SeqChunk { tokens: &prompt, start_pos: 0, block_table: &table, logits: LogitsWanted::Last };
    let step = build_step(&[chunk], exec.block_size()).unwrap();
    let full = exec.step(&step).unwrap().logits;
    let mut p = StepProfile::default();
    exec.profile_step(&step, &mut p).unwrap();
    for o in &p.ops {
        assert!(
            ["begin_step", "gather_logits"].contains(&o.op) || ABLATABLE.contains(&o.op),
            "{} cannot be left out",
            o.op
        );
    }
    exec.set_ablation(vec!["attention", "linear o"]).unwrap();
    let ablated = exec.step(&step).unwrap().logits;
    assert_eq!(ablated.len(), full.len());
    assert_ne!(ablated, full, "leaving out attention changed nothing");
    let mut q = StepProfile::default();
    exec.profile_step(&step, &mut q).unwrap();
    let calls = |p: &StepProfile| -> Vec<(&str, usize)> { p.ops.iter().map(|o| (o.op, o.calls)).collect() };
    let kept: Vec<(&str, usize)> =
        calls(&p).into_iter().filter(|(op, _)| *op != "attention" && *op != "linear o").collect();
    assert_eq!(calls(&q), kept);
    exec.set_ablation(Vec::new()).unwrap();
    assert_eq!(exec.step(&step).unwrap().logits, full, "the full step is back");
    // A call the text recipe does not make is refused by name.
    let e = exec.set_ablation(vec!["cross attention"]).unwrap_err().to_string();
    assert!(e.contains("--ablate") && e.contains("\"cross attention\""), "{e}");
}

#[test]
fn profiled_step_returns_the_step_and_times_every_call() {
    use llama32::model::profile::StepProfile;
    let case = Case::load("untied-gqa2-sharded");
    let layers = case.cfg.num_hidden_layers;
    let mut exec = case.executor(16);
    let prompt = case.ids("prompt_ids");
    let mut alloc = BlockAllocator::new(exec.num_blocks(), exec.block_size());
    let mut table = Vec::new();
    alloc.ensure(&mut table, prompt.len() + 1).unwrap();
    let chunk = |tokens, start_pos, logits| SeqChunk { tokens, start_pos, block_table: &table, logits };
    let prefill = build_step(&[chunk(&prompt, 0, LogitsWanted::Last)], exec.block_size()).unwrap();
    let next = [prompt[0]];
    let decode = build_step(&[chunk(&next, prompt.len(), LogitsWanted::Last)], exec.block_size()).unwrap();
    for (kind, step) in [("prefill", &prefill), ("decode", &decode)] {
        // The same step rewrites the same cache slots with the same values, so each run sees the same cache.
        let want = exec.step(step).unwrap().logits;
        let mut p = StepProfile::new(step.num_tokens(), step.num_seqs());
        for _ in 0..2 {
            let got = exec.profile_step(step, &mut p).unwrap().logits;
            assert_eq!(got, want, "{kind}: profiling changed the output");
        }
        assert_eq!((p.steps, p.tokens, p.seqs, p.late_steps), (2, step.num_tokens(), 1, 0), "{kind}");
        let calls: Vec<(&str, usize)> = p.ops.iter().map(|o| (o.op, o.calls)).collect();
        let l = layers;
        let mut expected = vec![
            ("begin_step", 1),
            ("embed", 1),
            ("all_reduce", 2 * l + 1),
            ("rms_norm", 1),
            ("linear qkv+rope+cache", l),
            ("attention", l),
            ("linear o", l),
            ("add_rms_norm", 2 * l - 1),
            ("linear gate_up+silu_mul", l),
            ("linear down", l),
            ("gather_rows", 2),
            ("final norm", 1),
            ("linear lm_head", 1),
            ("gather_logits", 1),
        ];
        if kind == "decode" {
            // Its one row is every row in order: the recipe skips the gathers (the prefill wants its last row).
            expected.retain(|&(op, _)| op != "gather_rows");
        }
        assert_eq!(calls, expected, "{kind}: calls per step in first-call order");
        assert!(p.ops.iter().all(|o| o.seconds >= 0.0 && o.seconds.is_finite()), "{kind}: {p:?}");
        assert!(p.ops.iter().find(|o| o.op == "linear down").is_some_and(|o| o.seconds > 0.0), "{kind}");
        assert!(p.in_calls() <= p.step_seconds * (1.0 + 1e-9), "{kind}: calls outlast the step: {p:?}");
        assert!(p.host_seconds >= p.step_seconds * (1.0 - 1e-9), "{kind}: {p:?}");
        let table = p.table();
        assert!(table.contains("linear lm_head") && table.contains("(between calls)"), "{table}");
    }
}
