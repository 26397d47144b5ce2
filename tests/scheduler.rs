//! Scheduler tests on the CPU backend with the golden checkpoint tests/golden/tied-gqa4: continuous batching,
//! preemption and prefix caching must give exactly the greedy ids HF transformers produced for each prompt alone.

use llama32::config::LlamaConfig;
use llama32::exec::cpu::CpuExecutor;
use llama32::exec::Executor;
use llama32::kv::prefix::{KvManager, SeqId};
use llama32::sampling::{FinishReason, SamplingParams};
use llama32::sched::{run_step, run_to_completion, Scheduler, SchedulerConfig};
use llama32::weights::{Checkpoint, ModelWeights};
use serde_json::Value;

mod common;

struct Case {
    cfg: LlamaConfig,
    weights: ModelWeights,
    reference: Value,
    logits: Vec<f32>,
}

fn load() -> Case {
    let dir = common::golden_dir("tied-gqa4");
    let mut cfg = LlamaConfig::from_model_dir(&dir).unwrap();
    cfg.merge_generation_config(&dir).unwrap();
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let weights = ModelWeights::load(&ckpt, &cfg, &|_| {}).unwrap();
    let logits = llama32::npy::read_f32(&dir.join("logits.npy")).unwrap().data;
    Case { cfg, weights, reference, logits }
}

impl Case {
    fn ids(&self, key: &str) -> Vec<u32> {
        self.reference[key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
    }

    fn n_new(&self) -> usize {
        self.reference["greedy_new_tokens"].as_u64().unwrap() as usize
    }

    /// An executor and a scheduler over the same pool of `num_blocks` blocks of `block_size` tokens.
    fn setup(
        &self,
        num_blocks: usize,
        block_size: usize,
        step_tokens: usize,
        max_seqs: usize,
    ) -> (CpuExecutor, Scheduler) {
        let exec = CpuExecutor::new(self.cfg.clone(), self.weights.clone(), num_blocks, block_size).unwrap();
        let kv = KvManager::new(num_blocks, block_size).unwrap();
        let sched = Scheduler::new(SchedulerConfig::new(&self.cfg, step_tokens, max_seqs), kv).unwrap();
        (exec, sched)
    }

    fn greedy(&self) -> SamplingParams {
        SamplingParams { max_tokens: self.n_new(), ..SamplingParams::greedy() }
    }
}

fn no_text(_: SeqId, _: u32) -> llama32::Result<String> {
    Ok(String::new())
}

/// Requests arrive at different steps, with priorities, under a small token budget and sequence cap; every one
/// must produce the reference greedy ids of its prompt.
#[test]
fn concurrent_arrivals_match_reference_greedy_ids() {
    let case = load();
    let (p1, p2) = (case.ids("prompt_ids"), case.ids("prompt2_ids"));
    let (g1, g2) = (case.ids("greedy_ids"), case.ids("greedy2_ids"));
    let (mut exec, mut sched) = case.setup(256, 4, 24, 5);
    // (arrival step, which prompt, priority)
    let arrivals =
        [(0, 1, 0), (0, 2, 0), (1, 2, 1), (3, 1, 0), (3, 2, 2), (7, 1, -1), (12, 2, 0), (12, 1, 3), (30, 2, 0)];
    let mut want = std::collections::HashMap::new();
    let mut got = std::collections::HashMap::new();
    let mut step = 0;
    let mut max_running = 0;
    loop {
        for &(at, which, prio) in arrivals.iter().filter(|a| a.0 == step) {
            let (p, g) = if which == 1 { (&p1, &g1) } else { (&p2, &g2) };
            let id = sched.add_request(p.clone(), case.greedy(), prio).unwrap();
            want.insert(id, (g.clone(), at));
        }
        if !sched.has_work() && step > 30 {
            break;
        }
        if let Some(plan) = sched.schedule().unwrap() {
            assert!(plan.input.num_tokens() <= 24, "token budget exceeded");
            max_running = max_running.max(sched.metrics().running);
            let picked = run_step(&mut sched, &mut exec, &plan).unwrap();
            for f in sched.update(&plan, &picked, &mut no_text).unwrap().finished {
                got.insert(f.seq, f.generation);
            }
        }
        step += 1;
        assert!(step < 2000, "no progress");
    }
    assert!(max_running <= 5);
    assert_eq!(got.len(), arrivals.len());
    for (id, (ids, at)) in &want {
        assert_eq!(&got[id].ids, ids, "request {id} (arrived at step {at})");
        assert_eq!(got[id].finish, FinishReason::Length);
    }
    assert_eq!(sched.metrics().kv.used_blocks, 0, "every block is released");
}

/// A cache far too small for the batch: sequences are preempted and recomputed, and each still produces exactly the
/// ids it produces alone.
#[test]
fn kv_exhaustion_preempts_and_loses_nothing() {
    let case = load();
    let (p1, p2) = (case.ids("prompt_ids"), case.ids("prompt2_ids"));
    let (g1, g2) = (case.ids("greedy_ids"), case.ids("greedy2_ids"));
    // Prompt 1 alone needs ceil((96 + 23) / 4) = 30 blocks; 40 blocks hold one of them plus a little.
    let (mut exec, mut sched) = case.setup(40, 4, 64, 8);
    let mut want = Vec::new();
    for k in 0..6 {
        let (p, g) = if k % 3 == 0 { (&p1, &g1) } else { (&p2, &g2) };
        sched.add_request(p.clone(), case.greedy(), 0).unwrap();
        want.push(g.clone());
    }
    let out = run_to_completion(&mut sched, &mut exec, &mut no_text, &mut |_| {}).unwrap();
    assert!(sched.metrics().preemptions > 0, "the test must force preemption");
    assert_eq!(out.len(), want.len());
    for (k, ((_, g), w)) in out.iter().zip(&want).enumerate() {
        assert_eq!(&g.ids, w, "request {k}");
    }
    eprintln!("preemptions: {}", sched.metrics().preemptions);
}

/// The same long prompt twice: the second run takes its first blocks from the prefix cache, and its last-token
/// logits and greedy ids still equal HF's.
#[test]
fn prefix_cache_hits_and_keeps_logits() {
    let case = load();
    let p1 = case.ids("prompt_ids");
    let vocab = case.cfg.vocab_size;
    let (mut exec, mut sched) = case.setup(64, 16, 512, 4);
    sched.add_request(p1.clone(), case.greedy(), 0).unwrap();
    let first = run_to_completion(&mut sched, &mut exec, &mut no_text, &mut |_| {}).unwrap();
    assert_eq!(first[0].1.ids, case.ids("greedy_ids"));
    assert_eq!(sched.metrics().kv.hit_tokens, 0);
    // Second request: 95 looked-up tokens hit 5 full blocks of 16.
    sched.add_request(p1.clone(), case.greedy(), 0).unwrap();
    let plan = sched.schedule().unwrap().unwrap();
    assert_eq!(sched.metrics().kv.hit_tokens, 80);
    assert_eq!(plan.input.num_tokens(), 16, "only the uncached tail is computed");
    assert_eq!(plan.input.positions[0], 80);
    let logits = exec.step(&plan.input).unwrap().logits;
    let want = &case.logits[(p1.len() - 1) * vocab..p1.len() * vocab];
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let worst = logits.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, common::sticky_nan_max);
    assert!(worst <= 1e-4 * scale, "last-token logits after a prefix hit differ by {worst} (scale {scale})");
    let id = llama32::sampling::argmax(&logits);
    sched.accept_picked(&plan, &[id]);
    let mut finished = sched.update(&plan, &[id], &mut no_text).unwrap().finished;
    while sched.has_work() {
        let plan = sched.schedule().unwrap().unwrap();
        let picked = run_step(&mut sched, &mut exec, &plan).unwrap();
        finished.extend(sched.update(&plan, &picked, &mut no_text).unwrap().finished);
    }
    assert_eq!(finished[0].generation.ids, case.ids("greedy_ids"));
    let m = sched.metrics().kv;
    assert!(m.hit_rate() > 0.4, "hit rate {}", m.hit_rate());
}

/// `n = 3` greedy completions of one prompt: the extra ones share the prompt's blocks through the prefix cache and
/// all produce the reference ids.
#[test]
fn n_completions_share_the_prompt_blocks() {
    let case = load();
    let (p1, g1) = (case.ids("prompt_ids"), case.ids("greedy_ids"));
    let (mut exec, mut sched) = case.setup(64, 16, 256, 4);
    let ids = sched.add_request_n(p1.clone(), case.greedy(), 3, 0).unwrap();
    assert_eq!(ids, vec![0, 1, 2]);
    let out = run_to_completion(&mut sched, &mut exec, &mut no_text, &mut |_| {}).unwrap();
    assert_eq!(out.len(), 3);
    for (id, g) in &out {
        assert_eq!(g.ids, g1, "completion {id}");
    }
    // Each extra completion looks up 95 tokens and hits 5 full blocks of 16.
    assert_eq!(sched.metrics().kv.hit_tokens, 2 * 80);
}

/// Stop token ids, stop strings (seen through the detok callback) and the context length end sequences with the
/// reference ids cut at the right place; the streamed deltas add up to the final text.
#[test]
fn stop_conditions() {
    let case = load();
    let p1 = case.ids("prompt_ids");
    let g1 = case.ids("greedy_ids");
    let text = |ids: &[u32]| ids.iter().map(|i| format!("<{i}>")).collect::<String>();
    let run = |max_model_len: usize, params: Vec<SamplingParams>| {
        let mut cfg = SchedulerConfig::new(&case.cfg, 64, 4);
        cfg.max_model_len = max_model_len;
        let mut exec = CpuExecutor::new(case.cfg.clone(), case.weights.clone(), 64, 8).unwrap();
        let mut sched = Scheduler::new(cfg, KvManager::new(64, 8).unwrap()).unwrap();
        for p in params {
            sched.add_request(p1.clone(), p, 0).unwrap();
        }
        let mut streamed = std::collections::HashMap::<SeqId, String>::new();
        let out = run_to_completion(&mut sched, &mut exec, &mut |_, id| Ok(format!("<{id}>")), &mut |up| {
            for (s, t) in &up.deltas {
                streamed.entry(*s).or_default().push_str(t);
            }
        })
        .unwrap();
        for (s, g) in &out {
            assert_eq!(streamed.get(s).map_or("", |t| t.as_str()), g.text, "sequence {s}: deltas add up to the text");
        }
        out.into_iter().map(|(_, g)| g).collect::<Vec<_>>()
    };
    let by_id = SamplingParams { stop_token_ids: vec![g1[5]], ..case.greedy() };
    let by_text = SamplingParams { stop: vec![format!("<{}>", g1[3])], ..case.greedy() };
    let out = run(case.cfg.max_position_embeddings, vec![by_id, by_text]);
    assert_eq!((out[0].ids.as_slice(), out[0].finish), (&g1[..6], FinishReason::Stop));
    assert_eq!(out[0].text, text(&g1[..5]), "a stop id's text is not emitted");
    assert_eq!((out[1].ids.as_slice(), out[1].finish), (&g1[..4], FinishReason::Stop));
    assert_eq!(out[1].text, text(&g1[..3]), "a stop string is not emitted");
    // A context of 100 tokens: the 96 prompt tokens leave room for 4; the held-back text is flushed.
    let out = run(100, vec![SamplingParams { stop: vec!["<never>".into()], ..case.greedy() }]);
    assert_eq!((out[0].ids.as_slice(), out[0].finish), (&g1[..4], FinishReason::Length));
    assert_eq!(out[0].text, text(&g1[..4]));
}

/// Higher priority is admitted first; FIFO within a priority.
#[test]
fn priority_then_fifo_admission() {
    let case = load();
    let p2 = case.ids("prompt2_ids");
    let (mut exec, mut sched) = case.setup(64, 8, 64, 1);
    let params = SamplingParams { max_tokens: 2, ..SamplingParams::greedy() };
    let ids: Vec<SeqId> =
        [0, 5, 0, 5].iter().map(|&p| sched.add_request(p2.clone(), params.clone(), p).unwrap()).collect();
    let mut order = Vec::new();
    while sched.has_work() {
        let plan = sched.schedule().unwrap().unwrap();
        assert_eq!(plan.chunks.len(), 1, "max_seqs = 1: {:?}", plan.chunks);
        let picked = run_step(&mut sched, &mut exec, &plan).unwrap();
        order.extend(sched.update(&plan, &picked, &mut no_text).unwrap().finished.into_iter().map(|f| f.seq));
    }
    assert_eq!(order, vec![ids[1], ids[3], ids[0], ids[2]]);
}

/// Requests that could never complete are rejected up front, naming the request and the reason.
#[test]
fn impossible_requests_are_rejected() {
    let case = load();
    let p1 = case.ids("prompt_ids");
    let (_, mut sched) = case.setup(8, 4, 64, 4);
    let e = sched.add_request(p1.clone(), case.greedy(), 0).unwrap_err().to_string();
    assert!(e.contains("request 0") && e.contains("KV blocks"), "{e}");
    let e = sched.add_request(vec![1, 9999], case.greedy(), 0).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
    let e = sched.add_request(vec![1; 300], case.greedy(), 0).unwrap_err().to_string();
    assert!(e.contains("context length"), "{e}");
    let e = sched.add_request(vec![1], SamplingParams { top_p: 2.0, ..case.greedy() }, 0).unwrap_err().to_string();
    assert!(e.contains("top_p"), "{e}");
    assert!(!sched.has_work());
}
