//! The CUDA executor on the golden checkpoints: logits against HF transformers' float32 reference (within bf16
//! tolerance), the same steps through the CPU reference, and greedy ids. Skipped without a CUDA device.

use std::path::PathBuf;

use llama32::config::LlamaConfig;
use llama32::exec::cpu::CpuExecutor;
use llama32::exec::cuda::{CudaExecutor, CudaOptions};
use llama32::exec::generate::{build_step, generate, score, GenRequest, GenerateOptions, LogitsWanted, SeqChunk};
use llama32::exec::Executor;
use llama32::kv::BlockAllocator;
use llama32::sampling::SamplingParams;
use llama32::weights::{Checkpoint, ModelWeights, WeightSource};
use serde_json::Value;

/// The golden cases whose head_dim (64, 128) the CUDA attention kernels take.
const CASES: [&str; 2] = ["cuda-d64-gqa4", "cuda-d128-gqa3"];
/// bf16 against an f32 reference is judged by transformers' own bf16 forward on the same checkpoint
/// (`hf_bf16_*_rel_err` in reference.json, relative to the largest reference logit): ours may be at most this
/// factor worse, in the worst logit and on average.
const SLACK: f32 = 1.25;

fn device_ready() -> bool {
    match llama32::ops::cuda::probe() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            false
        }
    }
}

struct Case {
    dir: PathBuf,
    cfg: LlamaConfig,
    reference: Value,
}

impl Case {
    fn load(name: &str) -> Case {
        let dir = crate::common::golden_dir(name);
        let mut cfg = LlamaConfig::from_model_dir(&dir).unwrap();
        cfg.merge_generation_config(&dir).unwrap();
        let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
        Case { dir, cfg, reference: serde_json::from_str(&text).unwrap() }
    }

    fn ids(&self, key: &str) -> Vec<u32> {
        self.reference[key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
    }

    fn cuda(&self, block_size: usize) -> CudaExecutor {
        let ckpt = Checkpoint::open(&self.dir).unwrap();
        let opts = CudaOptions { block_size, kv_tokens: Some(1024), max_step_tokens: 512, ..Default::default() };
        CudaExecutor::new(self.cfg.clone(), WeightSource::Checkpoint(&ckpt), &opts, &|_| {}).unwrap()
    }

    fn cpu(&self) -> CpuExecutor {
        let ckpt = Checkpoint::open(&self.dir).unwrap();
        let w = ModelWeights::load(&ckpt, &self.cfg, &|_| {}).unwrap();
        CpuExecutor::with_capacity(self.cfg.clone(), w, 1024, 16).unwrap()
    }

    fn ref_logits(&self, file: &str) -> Vec<f32> {
        llama32::npy::read_f32(&self.dir.join(file)).unwrap().data
    }
}

/// The error budget of a case, from transformers' bf16-vs-f32 error.
#[derive(Clone, Copy)]
struct Budget {
    max_rel: f32,
    mean_rel: f32,
}

impl Case {
    fn budget(&self) -> Budget {
        let get = |k: &str| self.reference[k].as_f64().unwrap() as f32 * SLACK;
        Budget { max_rel: get("hf_bf16_max_rel_err"), mean_rel: get("hf_bf16_mean_rel_err") }
    }
}

/// Max and mean |got - want| relative to max |want|, within the budget; argmax agreement on rows whose reference
/// top-2 margin exceeds twice the worst-logit budget.
fn compare(name: &str, got: &[f32], want: &[f32], vocab: usize, budget: Budget) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    assert!(got.iter().all(|x| x.is_finite()), "{name}: non-finite logits");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
    let mean = got.iter().zip(want).map(|(a, b)| (a - b).abs() as f64).sum::<f64>() as f32 / got.len() as f32 / scale;
    let argmax = |r: &[f32]| r.iter().enumerate().fold(0, |b, (i, &x)| if x > r[b] { i } else { b });
    for (row, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
        let top = argmax(w);
        let second = w.iter().enumerate().filter(|&(i, _)| i != top).fold(f32::MIN, |m, (_, &x)| m.max(x));
        if w[top] - second > 2.0 * budget.max_rel * scale {
            assert_eq!(argmax(g), top, "{name}: argmax differs at row {row}");
        }
    }
    eprintln!(
        "{name}: max |diff| / max|ref| = {worst:.2e} (budget {:.2e}), mean {mean:.2e} (budget {:.2e})",
        budget.max_rel, budget.mean_rel
    );
    assert!(worst <= budget.max_rel, "{name}: max relative error {worst} exceeds {}", budget.max_rel);
    assert!(mean <= budget.mean_rel, "{name}: mean relative error {mean} exceeds {}", budget.mean_rel);
}

#[test]
fn cuda_logits_match_transformers() {
    if !device_ready() {
        return;
    }
    for name in CASES {
        let case = Case::load(name);
        let mut exec = case.cuda(16);
        let got = score(&mut exec, &case.ids("prompt_ids"), 512).unwrap();
        compare(name, &got, &case.ref_logits("logits.npy"), case.cfg.vocab_size, case.budget());
        // Chunked prefill with an odd block size goes through the same kernels over an existing cache.
        let mut odd = case.cuda(5);
        let chunked = score(&mut odd, &case.ids("prompt_ids"), 7).unwrap();
        let want = case.ref_logits("logits.npy");
        compare(&format!("{name} chunk 7 block 5"), &chunked, &want, case.cfg.vocab_size, case.budget());
    }
}

/// Prompt log-probabilities through the serving engine on the CUDA executor (prefill in 40-token chunks, every row's
/// logits read back, the prompt's blocks cached by an earlier request): transformers' log-softmax within twice the
/// logits budget.
#[test]
fn cuda_engine_prompt_logprobs_match_transformers() {
    use llama32::serve::engine::{EngineConfig, EngineHandle};
    use llama32::serve::GenerateRequest;
    if !device_ready() {
        return;
    }
    for name in CASES {
        let case = Case::load(name);
        let prompt = case.ids("prompt_ids");
        let (dir, cfg) = (case.dir.clone(), case.cfg.clone());
        let make = move || -> llama32::Result<Box<dyn Executor>> {
            let ckpt = Checkpoint::open(&dir)?;
            let opts =
                CudaOptions { block_size: 16, kv_tokens: Some(1024), max_step_tokens: 512, ..Default::default() };
            Ok(Box::new(CudaExecutor::new(cfg, WeightSource::Checkpoint(&ckpt), &opts, &|_| {})?))
        };
        let e = EngineHandle::start(make, None, EngineConfig { max_step_tokens: 40, ..Default::default() }).unwrap();
        let params = SamplingParams { max_tokens: 2, ..SamplingParams::greedy() };
        let mut first = e.submit_blocking(GenerateRequest::new(prompt.clone(), params.clone())).unwrap();
        while first.blocking_next().is_some() {}
        let mut r = GenerateRequest::new(prompt.clone(), params);
        r.prompt_logprobs = Some(3);
        let scores = crate::common::prompt_logprobs_of(e.submit_blocking(r).unwrap(), name);
        assert_eq!(scores.len(), prompt.len() - 1, "{name}");
        let want = case.ref_logits("logits.npy");
        let vocab = case.cfg.vocab_size;
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let tol = 2.0 * case.budget().max_rel as f64 * scale;
        let mut worst = 0f64;
        for (i, lp) in scores.iter().enumerate() {
            assert_eq!(lp.id, prompt[i + 1], "{name}: entry {i}");
            let ls = crate::common::log_softmax(&want[i * vocab..(i + 1) * vocab]);
            worst = worst.max((lp.logprob as f64 - ls[lp.id as usize]).abs());
            assert!(lp.top.len() == 3 && lp.top.windows(2).all(|w| w[0].1 >= w[1].1), "{name}: entry {i}");
        }
        eprintln!("{name}: CUDA prompt logprobs max |diff| {worst:.2e} (tolerance {tol:.2e})");
        assert!(worst <= tol, "{name}: prompt logprobs differ from transformers' by {worst:.2e} (tolerance {tol:.2e})");
    }
}

/// A scored step on the device (prompt rows scored by given ids, token masks, picks scored from masked and plain
/// rows, sampled rows that are not consecutive) against the host reference on the same executor and step: the
/// same picks, ranks and alternatives, log-probabilities within 4e-6 relative.
#[test]
fn cuda_scored_step_matches_host() {
    use llama32::exec::scored::ScoreRow;
    use llama32::sampling::TokenMask;
    if !device_ready() {
        return;
    }
    for name in CASES {
        let case = Case::load(name);
        let (p1, p2) = (case.ids("prompt_ids"), case.ids("prompt2_ids"));
        let mut exec = case.cuda(16);
        let vocab = case.cfg.vocab_size;
        let mut alloc = BlockAllocator::new(exec.num_blocks(), exec.block_size());
        let (mut t1, mut t2, mut t3) = (Vec::new(), Vec::new(), Vec::new());
        alloc.ensure(&mut t1, p1.len() + 1).unwrap();
        alloc.ensure(&mut t2, p2.len() + 1).unwrap();
        alloc.ensure(&mut t3, p1.len() + 1).unwrap();
        // Rows 0..n1: sequence 1's prompt (its last row sampled); n1: sequence 2's last; n1 + 1: sequence 3's last.
        let step = build_step(
            &[
                SeqChunk { tokens: &p1, start_pos: 0, block_table: &t1, logits: LogitsWanted::All },
                SeqChunk { tokens: &p2, start_pos: 0, block_table: &t2, logits: LogitsWanted::Last },
                SeqChunk { tokens: &p1, start_pos: 0, block_table: &t3, logits: LogitsWanted::Last },
            ],
            exec.block_size(),
        )
        .unwrap();
        let n1 = p1.len();
        // Sequence order 1, 3, 2: three runs of one row, so the penalized sequence's lists are a window at index 1.
        let sample_rows = [n1 - 1, n1 + 1, n1];
        let mut strict = TokenMask::new(vocab);
        [3u32, 17, 250].iter().for_each(|&t| strict.allow(t % vocab as u32));
        let mut even = TokenMask::new(vocab);
        (0..vocab as u32).step_by(2).for_each(|t| even.allow(t));
        let masks = vec![None, Some(even.clone()), Some(strict.clone())];
        let mut scores: Vec<ScoreRow> = (0..n1 - 1).map(|i| ScoreRow { row: i, id: Some(p1[i + 1]), top: 4 }).collect();
        scores.push(ScoreRow { row: n1 - 1, id: None, top: 5 });
        scores.push(ScoreRow { row: n1, id: None, top: 0 });
        scores.push(ScoreRow { row: n1 + 1, id: None, top: 20 });
        // A given token on a masked row: scored under the unmasked logits.
        scores.push(ScoreRow { row: n1, id: Some(5), top: 2 });
        let params = [
            SamplingParams::greedy(),
            SamplingParams { repetition_penalty: 1.3, ..SamplingParams::greedy() },
            SamplingParams { temperature: 0.8, top_k: 3, seed: Some(7), ..SamplingParams::default() },
        ];
        let prompts: [&[u32]; 3] = [&p1, &p1, &p2];
        let scored = crate::scored::Scored {
            images: &[],
            params: &params,
            prompts: &prompts,
            sample_rows: &sample_rows,
            masks: &masks,
            scores: &scores,
        };
        let (dev_ids, _) = scored.check(name, &mut exec, &step);
        assert!(even.allows(dev_ids[1]) && strict.allows(dev_ids[2]), "{name}: picks {dev_ids:?} outside their masks");
        eprintln!("{name}: scored step on the device matches the host ({} entries, picks {dev_ids:?})", scores.len());
    }
}

#[test]
fn cuda_batched_step_matches_cpu_step() {
    if !device_ready() {
        return;
    }
    for name in CASES {
        let case = Case::load(name);
        let (p1, p2) = (case.ids("prompt_ids"), case.ids("prompt2_ids"));
        let mut outs = Vec::new();
        let execs: [Box<dyn Executor>; 2] = [Box::new(case.cpu()), Box::new(case.cuda(16))];
        for mut exec in execs {
            let mut alloc = BlockAllocator::new(exec.num_blocks(), exec.block_size());
            let (mut t1, mut t2) = (Vec::new(), Vec::new());
            alloc.ensure(&mut t2, p2.len() + 1).unwrap();
            alloc.ensure(&mut t1, p1.len() + 1).unwrap();
            // A prefill step of two sequences, then a decode step of both.
            let prefill = build_step(
                &[
                    SeqChunk { tokens: &p2, start_pos: 0, block_table: &t2, logits: LogitsWanted::All },
                    SeqChunk { tokens: &p1, start_pos: 0, block_table: &t1, logits: LogitsWanted::Last },
                ],
                exec.block_size(),
            )
            .unwrap();
            let mut logits = exec.step(&prefill).unwrap().logits;
            let decode = build_step(
                &[
                    SeqChunk { tokens: &[7], start_pos: p2.len(), block_table: &t2, logits: LogitsWanted::Last },
                    SeqChunk { tokens: &[9], start_pos: p1.len(), block_table: &t1, logits: LogitsWanted::Last },
                ],
                exec.block_size(),
            )
            .unwrap();
            logits.extend(exec.step(&decode).unwrap().logits);
            outs.push(logits);
        }
        compare(&format!("{name} cuda vs cpu steps"), &outs[1], &outs[0], case.cfg.vocab_size, case.budget());
    }
}

/// Greedy decoding on CUDA, checked by teacher forcing: every token CUDA picks must be a near-argmax of the f32
/// CPU reference at that point of CUDA's own trajectory (within the worst-logit budget), so a wrong pick fails
/// even where bf16 noise legitimately reorders two close candidates.
#[test]
fn cuda_greedy_picks_are_reference_near_argmax() {
    if !device_ready() {
        return;
    }
    for name in CASES {
        let case = Case::load(name);
        assert_greedy_near_argmax(name, &case, &mut case.cuda(16));
    }
}

/// `exec`'s greedy continuation of the case's prompt: every pick within the worst-logit budget of the CPU
/// reference's best at that point of its own trajectory.
fn assert_greedy_near_argmax(name: &str, case: &Case, exec: &mut CudaExecutor) {
    let prompt = case.ids("prompt_ids");
    let n = case.reference["greedy_new_tokens"].as_u64().unwrap() as usize;
    let params = SamplingParams { max_tokens: n, ..SamplingParams::greedy() };
    let reqs = [GenRequest { prompt: prompt.clone(), params }];
    let opts = GenerateOptions { eos_ids: case.cfg.eos_token_ids.clone(), max_step_tokens: 512 };
    let got = generate(exec, &reqs, &opts, &mut |_, _| Ok(String::new()), &mut |_, _| {}).unwrap();
    let ids = &got[0].ids;
    assert_eq!(ids.len(), n, "{name}: generated {} of {n} tokens", ids.len());
    let mut forced = prompt.clone();
    forced.extend_from_slice(&ids[..n - 1]);
    let vocab = case.cfg.vocab_size;
    let cpu = score(&mut case.cpu(), &forced, 512).unwrap();
    let scale = case.reference["logits_max_abs"].as_f64().unwrap() as f32;
    let tol = case.budget().max_rel * scale;
    for (j, &id) in ids.iter().enumerate() {
        let row = &cpu[(prompt.len() - 1 + j) * vocab..][..vocab];
        let best = row.iter().fold(f32::MIN, |m, &x| m.max(x));
        assert!(
            row[id as usize] >= best - tol,
            "{name}: step {j} picked {id} at logit {} but the reference best is {best} (tolerance {tol})",
            row[id as usize]
        );
    }
    let same = ids.iter().zip(&case.ids("greedy_ids")).take_while(|(a, b)| a == b).count();
    eprintln!("{name}: all {n} greedy picks are reference near-argmax; first {same} equal HF f32 greedy");
}

#[test]
fn cuda_rejects_unsupported_head_dim_up_front() {
    if !device_ready() {
        return;
    }
    let case = Case::load("tied-gqa4");
    let ckpt = Checkpoint::open(&case.dir).unwrap();
    let opts = CudaOptions { kv_tokens: Some(64), ..Default::default() };
    let err = match CudaExecutor::new(case.cfg.clone(), WeightSource::Checkpoint(&ckpt), &opts, &|_| {}) {
        Ok(_) => panic!("head_dim 16 must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("head_dim 16"), "{err}");
}

/// Five sequences with prompts of different lengths, then 36 decode rounds with 1, 3 and 5 of them: every step's
/// logits, in order.
fn prefill_and_decode_rounds(exec: &mut CudaExecutor, prompt: &[u32]) -> Vec<f32> {
    let mut alloc = BlockAllocator::new(exec.num_blocks(), exec.block_size());
    let mut tables: Vec<Vec<u32>> = vec![Vec::new(); 5];
    let mut logits = Vec::new();
    for (s, table) in tables.iter_mut().enumerate() {
        let p = &prompt[..20 + 15 * s];
        alloc.ensure(table, p.len() + 40).unwrap();
        let step = build_step(
            &[SeqChunk { tokens: p, start_pos: 0, block_table: table, logits: LogitsWanted::Last }],
            exec.block_size(),
        )
        .unwrap();
        logits.extend(exec.step(&step).unwrap().logits);
    }
    let mut next_pos: Vec<usize> = (0..5).map(|s| 20 + 15 * s).collect();
    for round in 0..36 {
        let active = [1, 3, 5][round % 3];
        let chunks: Vec<_> = (0..active)
            .map(|s| {
                let tok = std::slice::from_ref(&prompt[(s + round) % prompt.len()]);
                SeqChunk { tokens: tok, start_pos: next_pos[s], block_table: &tables[s], logits: LogitsWanted::Last }
            })
            .collect();
        for p in next_pos.iter_mut().take(active) {
            *p += 1;
        }
        let step = build_step(&chunks, exec.block_size()).unwrap();
        logits.extend(exec.step(&step).unwrap().logits);
    }
    logits
}

/// Decode steps replayed from CUDA graphs (padded to a batch bucket) give the eager logits, across batch sizes that
/// share and that change buckets and contexts that cross a block-table width. Padding changes GEMM shapes and KV
/// split counts, so agreement is to bf16 rounding, not bitwise; stale metadata or a wrong row would be far off.
#[test]
fn cuda_graph_decode_equals_eager() {
    if !device_ready() {
        return;
    }
    let case = Case::load("cuda-d64-gqa4");
    let ckpt = Checkpoint::open(&case.dir).unwrap();
    let make = |graphs: usize| {
        let opts =
            CudaOptions { kv_tokens: Some(4096), max_step_tokens: 512, max_graph_batch: graphs, ..Default::default() };
        CudaExecutor::new(case.cfg.clone(), WeightSource::Checkpoint(&ckpt), &opts, &|_| {}).unwrap()
    };
    let prompt = case.ids("prompt_ids");
    let runs: Vec<Vec<f32>> =
        [0, 256].iter().map(|&graphs| prefill_and_decode_rounds(&mut make(graphs), &prompt)).collect();
    compare("graph replay vs eager decode", &runs[1], &runs[0], case.cfg.vocab_size, case.budget());
}

/// `Executor::set_ablation` on CUDA, eager and from graphs: leaving out attention changes the logits, and clearing
/// the list (which drops the graphs captured without it) gives the full run's logits bit for bit.
#[test]
fn cuda_ablation_leaves_calls_out_of_eager_steps_and_graphs() {
    if !device_ready() {
        return;
    }
    let case = Case::load("cuda-d64-gqa4");
    let ckpt = Checkpoint::open(&case.dir).unwrap();
    let prompt = case.ids("prompt_ids");
    for graphs in [0, 256] {
        let opts =
            CudaOptions { kv_tokens: Some(4096), max_step_tokens: 512, max_graph_batch: graphs, ..Default::default() };
        let mut exec = CudaExecutor::new(case.cfg.clone(), WeightSource::Checkpoint(&ckpt), &opts, &|_| {}).unwrap();
        let full = prefill_and_decode_rounds(&mut exec, &prompt);
        exec.set_ablation(vec!["attention"]).unwrap();
        let ablated = prefill_and_decode_rounds(&mut exec, &prompt);
        assert_eq!(ablated.len(), full.len());
        assert!(ablated.iter().zip(&full).any(|(a, b)| a.to_bits() != b.to_bits()), "graphs {graphs}: no change");
        exec.set_ablation(Vec::new()).unwrap();
        let back = prefill_and_decode_rounds(&mut exec, &prompt);
        if let Some(i) = (0..full.len()).find(|&i| full[i].to_bits() != back[i].to_bits()) {
            panic!("graphs {graphs}: logit {i} is {} after the ablation, {} before", back[i], full[i]);
        }
        eprintln!("graphs {graphs}: attention left out and restored ({} logits)", full.len());
    }
}

/// For every CUDA golden case, eager and from CUDA graphs: the prefill and decode rounds with a switch off and on
/// (`make` builds the executor for a case, a graph limit and the switch) give bitwise-equal logits.
fn assert_switch_changes_no_bit(what: &str, make: &dyn Fn(&Case, &Checkpoint, CudaOptions, bool) -> CudaExecutor) {
    assert_switch_changes_no_bit_at(what, None, make, &|_, _| {});
}

/// [`assert_switch_changes_no_bit`], with every skinny GEMM launch at `warps` warps per block when given
/// ([`llama32::ops::cuda::gemv::with_warps`]); `ran` then checks each executor after its rounds (given the switch),
/// so that a switch whose path never engaged cannot pass by comparing a path with itself.
fn assert_switch_changes_no_bit_at(
    what: &str,
    warps: Option<usize>,
    make: &dyn Fn(&Case, &Checkpoint, CudaOptions, bool) -> CudaExecutor,
    ran: &dyn Fn(&CudaExecutor, bool),
) {
    for name in CASES {
        let case = Case::load(name);
        let ckpt = Checkpoint::open(&case.dir).unwrap();
        let prompt = case.ids("prompt_ids");
        for graphs in [0, 256] {
            let opts = CudaOptions {
                kv_tokens: Some(4096),
                max_step_tokens: 512,
                max_graph_batch: graphs,
                ..Default::default()
            };
            let rounds = |exec: &mut CudaExecutor| match warps {
                Some(w) => {
                    llama32::ops::cuda::gemv::with_warps(w, || prefill_and_decode_rounds(exec, &prompt)).unwrap()
                }
                None => prefill_and_decode_rounds(exec, &prompt),
            };
            let runs: Vec<Vec<f32>> = [false, true]
                .iter()
                .map(|&on| {
                    let mut exec = make(&case, &ckpt, opts.clone(), on);
                    let logits = rounds(&mut exec);
                    ran(&exec, on);
                    logits
                })
                .collect();
            let (off, on) = (&runs[0], &runs[1]);
            assert_eq!(off.len(), on.len());
            if let Some(i) = (0..off.len()).find(|&i| off[i].to_bits() != on[i].to_bits()) {
                panic!("{name} graphs {graphs}: logit {i} is {} with {what}, {} without", on[i], off[i]);
            }
            eprintln!("{name} graphs {graphs}: {} logits bitwise equal with and without {what}", off.len());
        }
    }
}

/// [`assert_switch_changes_no_bit`] for a switch of the executor itself, turned by `set` on a freshly built one.
fn assert_setter_changes_no_bit(what: &str, set: fn(&mut CudaExecutor, bool)) {
    assert_switch_changes_no_bit(what, &|case, ckpt, opts, on| {
        let mut exec = CudaExecutor::new(case.cfg.clone(), WeightSource::Checkpoint(ckpt), &opts, &|_| {}).unwrap();
        set(&mut exec, on);
        exec
    });
}

/// Programmatic dependent launch changes no bit: the same prefill and decode rounds, eager and from CUDA graphs
/// captured with it, give exactly the logits of ordinary launches (each kernel waits for the previous one before it
/// touches memory). Other tests in this process may run while it is on, which must not change their results either.
#[test]
fn cuda_programmatic_launch_changes_no_bit() {
    if !device_ready() {
        return;
    }
    let was = llama32::ops::cuda::programmatic_launch();
    assert_switch_changes_no_bit("PDL", &|case, ckpt, opts, on| {
        llama32::ops::cuda::set_programmatic_launch(on).unwrap();
        CudaExecutor::new(case.cfg.clone(), WeightSource::Checkpoint(ckpt), &opts, &|_| {}).unwrap()
    });
    llama32::ops::cuda::set_programmatic_launch(was).unwrap();
}

/// The skinny GEMM's whole-row L2 prefetch (`LLAMA32_GEMV_PREFETCH=whole`) changes no bit: a prefetch moves no
/// data the kernel reads, only where it comes from.
#[test]
fn cuda_gemv_whole_prefetch_changes_no_bit() {
    if !device_ready() {
        return;
    }
    let was = llama32::ops::cuda::gemv_prefetch_whole_on();
    assert_switch_changes_no_bit("the whole-row gemv prefetch", &|case, ckpt, opts, on| {
        llama32::ops::cuda::set_gemv_prefetch_whole(on).unwrap();
        CudaExecutor::new(case.cfg.clone(), WeightSource::Checkpoint(ckpt), &opts, &|_| {}).unwrap()
    });
    llama32::ops::cuda::set_gemv_prefetch_whole(was).unwrap();
}

/// The SwiGLU fusion into the gate_up projection's skinny GEMM changes no bit: decode steps (batches of 1 to 5
/// rows, eager and from graphs) with and without it give the same logits.
#[test]
fn cuda_silu_gemv_fusion_changes_no_bit() {
    if !device_ready() {
        return;
    }
    assert_setter_changes_no_bit("the SwiGLU fusion", CudaExecutor::set_fuse_swiglu);
}

/// The RoPE + KV-write fusion into the QKV projection's skinny GEMM changes no bit: decode steps (batches of 1 to 5
/// rows, eager and from graphs) with and without it give the same logits.
#[test]
fn cuda_rope_gemv_fusion_changes_no_bit() {
    if !device_ready() {
        return;
    }
    assert_setter_changes_no_bit("the RoPE fusion", CudaExecutor::set_fuse_rope);
}

/// The residual add + RMSNorm fusion into the QKV and gate_up projections' prologue changes no bit: decode steps
/// (batches of 1 to 5 rows, eager and from graphs) with and without it give the same logits.
#[test]
fn cuda_norm_gemv_fusion_changes_no_bit() {
    if !device_ready() {
        return;
    }
    assert_setter_changes_no_bit("the norm fusion", CudaExecutor::set_fuse_norm);
}

/// The norm prologue beside the RoPE epilogue in one QKV kernel, and beside the SwiGLU epilogue in the gate_up one,
/// changes no bit either.
#[test]
fn cuda_norm_and_rope_gemv_fusions_change_no_bit() {
    if !device_ready() {
        return;
    }
    assert_setter_changes_no_bit("the norm fusion (with the RoPE fusion on)", |exec, on| {
        exec.set_fuse_rope(true);
        exec.set_fuse_norm(on);
    });
}

/// The persistent decode stack (every decoder layer of a decode step in one launch) changes no bit: the prefill and
/// decode rounds (decode batches of 1, 3 and 5 sequences; from CUDA graphs padded to 1, 4 and 8) give the logits of
/// the layers one by one, both with the skinny GEMM at the stack's 8 warps per tile. Prefill steps run as before.
/// The same with the projections quantized to W4A16 (the stack's W4A16 tiles against the decode kernels at 8 K
/// splits). The stack's greedy continuation is also held to the CPU reference (as
/// `cuda_greedy_picks_are_reference_near_argmax`).
#[test]
fn cuda_persistent_decode_stack_changes_no_bit() {
    if !device_ready() {
        return;
    }
    // Off, no step may take the stack; on, the decode rounds must (the prefill steps do not).
    let stack_ran = |exec: &CudaExecutor, on: bool| {
        let steps = exec.fused_decode_steps();
        assert_eq!(steps > 0, on, "{steps} decode steps went through the stack with it {}", ["off", "on"][on as usize]);
    };
    assert_switch_changes_no_bit_at(
        "the persistent decode stack",
        Some(8),
        &|case, ckpt, opts, on| {
            let mut exec = CudaExecutor::new(case.cfg.clone(), WeightSource::Checkpoint(ckpt), &opts, &|_| {}).unwrap();
            exec.set_persistent_decode(on).unwrap();
            exec
        },
        &stack_ran,
    );
    // W4A16 projections: the stack's W4A16 tiles against the decode kernels at its 8 K splits.
    llama32::ops::cuda::quant::with_w4a16_splits(8, || {
        assert_switch_changes_no_bit_at(
            "the W4A16 persistent decode stack",
            Some(8),
            &|case, ckpt, opts, on| {
                let mut w = ModelWeights::load(ckpt, &case.cfg, &|_| {}).unwrap();
                w.quantize_in_place(llama32::quant::Scheme::W4A16_G32).unwrap();
                let mut exec = CudaExecutor::from_weights(case.cfg.clone(), &w, &opts).unwrap();
                exec.set_persistent_decode(on).unwrap();
                exec
            },
            &stack_ran,
        )
    })
    .unwrap();
    for name in CASES {
        // End to end at the default warp counts: the stack's greedy picks are the reference's near-argmax.
        let case = Case::load(name);
        let mut exec = case.cuda(16);
        exec.set_persistent_decode(true).unwrap();
        assert_greedy_near_argmax(name, &case, &mut exec);
    }
}

/// `step_greedy` picks on the device exactly the argmax of the logits `step` returns for the same step.
#[test]
fn cuda_step_greedy_is_argmax_of_step_logits() {
    if !device_ready() {
        return;
    }
    let case = Case::load("cuda-d128-gqa3");
    let prompt = case.ids("prompt_ids");
    let mut picks = Vec::new();
    for greedy in [false, true] {
        let mut exec = case.cuda(16);
        let mut alloc = BlockAllocator::new(exec.num_blocks(), exec.block_size());
        let mut tables: Vec<Vec<u32>> = vec![Vec::new(); 3];
        let mut got = Vec::new();
        for (s, table) in tables.iter_mut().enumerate() {
            alloc.ensure(table, 64).unwrap();
            let chunks =
                [SeqChunk { tokens: &prompt[..30 + s], start_pos: 0, block_table: table, logits: LogitsWanted::All }];
            let step = build_step(&chunks, exec.block_size()).unwrap();
            got.extend(if greedy {
                exec.step_greedy(&step).unwrap()
            } else {
                exec.step(&step).unwrap().logits.chunks(case.cfg.vocab_size).map(llama32::sampling::argmax).collect()
            });
        }
        let chunks: Vec<_> = (0..3)
            .map(|s| SeqChunk {
                tokens: &prompt[40..41],
                start_pos: 30 + s,
                block_table: &tables[s],
                logits: LogitsWanted::Last,
            })
            .collect();
        let step = build_step(&chunks, exec.block_size()).unwrap();
        got.extend(if greedy {
            exec.step_greedy(&step).unwrap()
        } else {
            exec.step(&step).unwrap().logits.chunks(case.cfg.vocab_size).map(llama32::sampling::argmax).collect()
        });
        picks.push(got);
    }
    assert_eq!(picks[0].len(), 30 + 31 + 32 + 3);
    assert_eq!(picks[0], picks[1]);
}

/// `step_sample` on the device picks what the CPU sampler picks from the same step's logits with the same random
/// stream, for greedy rows, each filter, penalties over prompt and output ids, logit bias (greedy alone, and
/// sampled with penalties, some biased tokens in the history), and `min_tokens` holding back stop ids (one of them
/// also biased).
#[test]
fn cuda_step_sample_matches_cpu_sampler() {
    use llama32::exec::SampleSeq;
    use llama32::sampling::Sampler;
    if !device_ready() {
        return;
    }
    let case = Case::load("cuda-d64-gqa4");
    let prompt = case.ids("prompt_ids");
    let base = SamplingParams { seed: Some(11), ..SamplingParams::greedy() };
    // Biased tokens from the prompt (so some are in the history) and outside it; sorted, each id once.
    let mut history_bias = vec![(prompt[2], 4.0f32), (prompt[55], -3.0), (100, 7.0), (101, 0.0)];
    history_bias.sort_by_key(|&(id, _)| id);
    history_bias.dedup_by_key(|&mut (id, _)| id);
    let params = [
        SamplingParams { repetition_penalty: 1.3, ..base.clone() },
        SamplingParams { temperature: 0.8, top_k: 20, ..base.clone() },
        SamplingParams { temperature: 1.0, top_p: 0.9, seed: Some(12), ..base.clone() },
        SamplingParams { temperature: 0.7, min_p: 0.05, repetition_penalty: 1.3, seed: Some(13), ..base.clone() },
        SamplingParams {
            temperature: 1.2,
            frequency_penalty: 0.5,
            presence_penalty: 0.3,
            seed: Some(14),
            ..base.clone()
        },
        SamplingParams { temperature: 0.6, top_p: 0.9, top_k: 50, seed: Some(15), ..base.clone() },
        SamplingParams { logit_bias: vec![(3, 6.0), (40, -100.0), (77, 9.5)], ..base.clone() },
        SamplingParams {
            temperature: 0.9,
            repetition_penalty: 1.2,
            logit_bias: history_bias,
            seed: Some(16),
            ..base.clone()
        },
        SamplingParams {
            temperature: 0.5,
            min_tokens: 64,
            max_tokens: 64,
            stop_token_ids: vec![3, prompt[4], 200],
            logit_bias: vec![(3, 50.0)],
            seed: Some(17),
            ..base
        },
    ];
    let n = params.len();
    let outputs: Vec<Vec<u32>> = (0..n).map(|s| prompt[50 + s..58 + s].to_vec()).collect();
    let prompts: Vec<Vec<u32>> = (0..n).map(|s| prompt[..20 + s].to_vec()).collect();
    let mut exec = case.cuda(16);
    let mut alloc = BlockAllocator::new(exec.num_blocks(), exec.block_size());
    let mut tables = vec![Vec::new(); n];
    let mut cpu_picks = Vec::new();
    let mut gpu_picks = Vec::new();
    for round in 0..8 {
        let mut cpu_samplers: Vec<Sampler> = (0..n)
            .map(|s| {
                let mut sm = Sampler::new(&params[s], &prompts[s]);
                for &id in &outputs[s] {
                    sm.accept(id);
                }
                // Advance the stream so every round draws fresh uniforms.
                for _ in 0..round {
                    sm.next_uniform();
                }
                sm
            })
            .collect();
        let mut gpu_samplers = cpu_samplers.clone();
        for t in tables.iter_mut() {
            alloc.ensure(t, 64).unwrap();
        }
        let chunks: Vec<_> = (0..n)
            .map(|s| SeqChunk {
                tokens: &prompts[s],
                start_pos: 0,
                block_table: &tables[s],
                logits: LogitsWanted::Last,
            })
            .collect();
        let step = build_step(&chunks, exec.block_size()).unwrap();
        let logits = exec.step(&step).unwrap().logits;
        cpu_picks
            .extend(cpu_samplers.iter_mut().zip(logits.chunks(case.cfg.vocab_size)).map(|(sm, row)| sm.sample(row)));
        let mut rows: Vec<SampleSeq<'_>> = gpu_samplers
            .iter_mut()
            .enumerate()
            .map(|(s, sampler)| SampleSeq { params: &params[s], sampler, prompt: &prompts[s], output: &outputs[s] })
            .collect();
        gpu_picks.extend(exec.step_sample(&step, &mut rows).unwrap());
        for t in tables.iter_mut() {
            alloc.release(t);
        }
    }
    assert_eq!(gpu_picks, cpu_picks);
    let distinct: std::collections::BTreeSet<_> = cpu_picks.iter().collect();
    assert!(distinct.len() > n, "the sampled rows should not all repeat one id: {cpu_picks:?}");
}

/// The step profiler (`llama32 bench --profile`) returns the step's own logits bit for bit (a decode step runs
/// eagerly in the padded shape its CUDA graph replays), times every call with device events after a head start
/// long enough for the host to issue the whole step, and counts each projection's weight bytes.
#[test]
fn cuda_profiled_steps_return_the_step_and_time_every_call() {
    use llama32::model::profile::StepProfile;
    if !device_ready() {
        return;
    }
    for name in CASES {
        let case = Case::load(name);
        let mut exec = case.cuda(16);
        let bs = exec.block_size();
        let prompt = case.ids("prompt_ids");
        let mut alloc = BlockAllocator::new(exec.num_blocks(), bs);
        let (mut t1, mut t2) = (Vec::new(), Vec::new());
        alloc.ensure(&mut t1, prompt.len() + 1).unwrap();
        alloc.ensure(&mut t2, 21).unwrap();
        let chunk =
            |tokens, start_pos, block_table| SeqChunk { tokens, start_pos, block_table, logits: LogitsWanted::Last };
        let prefill = build_step(&[chunk(&prompt, 0, &t1), chunk(&prompt[..20], 0, &t2)], bs).unwrap();
        let decode = build_step(&[chunk(&prompt[..1], prompt.len(), &t1), chunk(&prompt[1..2], 20, &t2)], bs).unwrap();
        for (kind, step) in [("prefill", &prefill), ("decode", &decode)] {
            // Each run rewrites the same cache slots with the same values.
            let want = exec.step(step).unwrap().logits;
            let mut p = StepProfile::new(step.num_tokens(), step.num_seqs());
            for _ in 0..3 {
                let got = exec.profile_step(step, &mut p).unwrap().logits;
                assert_eq!(got.len(), want.len());
                if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                    panic!("{name} {kind}: profiled logit {i} is {}, the step's {}", got[i], want[i]);
                }
            }
            eprintln!("{name} {kind} step:\n{}", p.table());
            // A host hiccup longer than the head start (at least 5 ms) may make one step late.
            assert!(p.steps == 3 && p.late_steps <= 1, "{name} {kind}: {p:?}");
            let op = |label: &str| p.ops.iter().find(|o| o.op == label).unwrap_or_else(|| panic!("{label}: {p:?}"));
            let layers = case.cfg.num_hidden_layers;
            assert_eq!(op("attention").calls, layers);
            for label in
                ["linear qkv+rope+cache", "linear o", "linear gate_up+silu_mul", "linear down", "linear lm_head"]
            {
                let o = op(label);
                assert!(o.seconds > 0.0 && o.weight_bytes > 0, "{name} {kind} {label}: {o:?}");
            }
            let head = case.cfg.vocab_size * case.cfg.hidden_size * 2;
            assert_eq!(op("linear lm_head").weight_bytes, head);
            assert!(p.in_calls() <= p.step_seconds * 1.0001, "{name} {kind}: calls outlast the step: {p:?}");
        }
    }
}
