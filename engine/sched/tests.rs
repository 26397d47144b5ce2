//! Property tests of the scheduler with a mock executor that checks the KV cache contents.
//!
//! The mock writes `(token, position)` into each new token's slot and, for every logits row, reads the sequence's
//! whole context back through its block table. The picked id is a hash of that context, so any wrong block (a bad
//! prefix hit, a block reused while still referenced, a lost token after preemption) changes the output.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::config::Preset;
use crate::exec::{Executor, StepOutput};

struct MockExec {
    cfg: LlamaConfig,
    block_size: usize,
    pool: Vec<Option<(u32, u32)>>,
}

impl MockExec {
    fn new(vocab: usize, num_blocks: usize, block_size: usize) -> Self {
        let mut cfg = Preset::Llama32_1B.config();
        cfg.vocab_size = vocab;
        cfg.max_position_embeddings = 256;
        cfg.eos_token_ids = vec![0];
        MockExec { cfg, block_size, pool: vec![None; num_blocks * block_size] }
    }
}

/// The mock model: the next id is a hash of the whole context.
fn next_id(ctx: &[u32], vocab: usize) -> u32 {
    // A hash of its own (not the KV manager's), so that a broken block hash cannot hide here.
    let h = ctx.iter().fold(0x9e37_79b9_7f4a_7c15u64, |h, &t| (h ^ t as u64).wrapping_mul(0x0000_0100_0000_01b3));
    ((h ^ (h >> 29)) % vocab as u64) as u32
}

impl Executor for MockExec {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }
    fn block_size(&self) -> usize {
        self.block_size
    }
    fn num_blocks(&self) -> usize {
        self.pool.len() / self.block_size
    }
    fn step(&mut self, input: &StepInput) -> Result<StepOutput> {
        input.validate(&self.cfg, self.num_blocks(), self.block_size)?;
        for (i, &slot) in input.slot_mapping.iter().enumerate() {
            self.pool[slot as usize] = Some((input.token_ids[i], input.positions[i]));
        }
        let seq_of = input.seq_of_token();
        let vocab = self.cfg.vocab_size;
        let mut logits = Vec::new();
        for &r in &input.logits_rows {
            let (s, pos) = (seq_of[r as usize] as usize, input.positions[r as usize] as usize);
            let table = &input.block_tables[s * input.max_blocks_per_seq..][..input.max_blocks_per_seq];
            let ctx: Vec<u32> = (0..=pos)
                .map(|p| {
                    let slot = table[p / self.block_size] as usize * self.block_size + p % self.block_size;
                    match self.pool[slot] {
                        Some((t, q)) if q as usize == p => t,
                        other => panic!("sequence {s} position {p}: slot {slot} holds {other:?}"),
                    }
                })
                .collect();
            let mut row = vec![0.0f32; vocab];
            row[next_id(&ctx, vocab) as usize] = 1.0;
            logits.extend(row);
        }
        Ok(StepOutput { logits })
    }
}

/// What a request produces alone: the context hash chain until a stop id or `max_tokens`.
fn alone(prompt: &[u32], params: &SamplingParams, vocab: usize) -> (Vec<u32>, FinishReason) {
    let mut ctx = prompt.to_vec();
    let mut out = Vec::new();
    loop {
        let id = next_id(&ctx, vocab);
        ctx.push(id);
        out.push(id);
        if id == 0 || params.stop_token_ids.contains(&id) {
            return (out, FinishReason::Stop);
        }
        if out.len() == params.max_tokens {
            return (out, FinishReason::Length);
        }
    }
}

#[test]
fn random_workloads_complete_with_the_ids_they_get_alone() {
    let mut total_preemptions = 0;
    let mut total_hits = 0;
    for seed in 0..40u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let vocab = 64;
        let bs = 1 + rng.random_range(0..6usize);
        let num_blocks = 60 / bs + rng.random_range(0..40usize);
        let mut exec = MockExec::new(vocab, num_blocks, bs);
        let cfg = SchedulerConfig {
            max_step_tokens: 1 + rng.random_range(0..40usize),
            max_seqs: 1 + rng.random_range(0..8usize),
            eos_ids: vec![0],
            max_model_len: 256,
            vocab_size: vocab,
            max_prompt_logits_rows: 1 + rng.random_range(0..12usize),
        };
        let mut sched = Scheduler::new(cfg, KvManager::new(num_blocks, bs).unwrap()).unwrap();
        // Prompts over a tiny alphabet, so that blocks often share a parent and differ only slightly.
        let prefixes: Vec<Vec<u32>> =
            (0..3).map(|_| (0..rng.random_range(0..30usize)).map(|_| rng.random_range(1..4u32)).collect()).collect();
        let n_req = 5 + rng.random_range(0..25usize);
        let mut arrivals: Vec<(usize, Vec<u32>, SamplingParams, i32)> = (0..n_req)
            .map(|_| {
                let mut p = prefixes[rng.random_range(0..3usize)].clone();
                p.extend((0..1 + rng.random_range(0..10usize)).map(|_| rng.random_range(1..4u32)));
                let params = SamplingParams {
                    max_tokens: 1 + rng.random_range(0..30usize),
                    stop_token_ids: vec![rng.random_range(1..vocab as u32)],
                    ..SamplingParams::greedy()
                };
                (rng.random_range(0..60usize), p, params, rng.random_range(-1..2i32))
            })
            .collect();
        arrivals.sort_by_key(|a| a.0);
        let mut want = HashMap::new();
        let mut got = HashMap::new();
        // Sequences that want prompt logits: their prompt, and the argmax of each prompt row so far.
        let mut scored: HashMap<SeqId, (Vec<u32>, Vec<u32>)> = HashMap::new();
        let mut next = 0;
        let mut step = 0;
        while next < arrivals.len() || sched.has_work() {
            while next < arrivals.len() && arrivals[next].0 <= step {
                let (_, p, params, prio) = &arrivals[next];
                let n = if next % 4 == 0 { 1 + next % 3 } else { 1 };
                match sched.add_request_n(p.clone(), params.clone(), n, *prio) {
                    Ok(ids) => {
                        if next % 3 == 1 {
                            sched.want_prompt_logits(ids[0]).unwrap();
                            scored.insert(ids[0], (p.clone(), Vec::new()));
                        }
                        for id in ids {
                            want.insert(id, alone(p, params, vocab));
                        }
                    }
                    Err(e) => assert!(e.to_string().contains("KV blocks"), "seed {seed}: {e}"),
                }
                next += 1;
            }
            if let Some(plan) = sched.schedule().unwrap() {
                assert!(plan.input.num_tokens() <= sched.cfg.max_step_tokens);
                assert!(plan.chunks.len() <= sched.cfg.max_seqs);
                let prompt_rows: usize = plan.prompt_rows.iter().map(|r| r.len).sum();
                assert!(prompt_rows <= sched.cfg.max_prompt_logits_rows, "seed {seed}: {prompt_rows} prompt rows");
                let picked = if plan.has_prompt_rows() {
                    let (picked, logits) = run_step_on_host(&mut sched, &mut exec, &plan).unwrap();
                    let argmax: Vec<u32> = logits.chunks(vocab).map(crate::sampling::argmax).collect();
                    for r in &plan.prompt_rows {
                        let (_, rows) = scored.get_mut(&r.seq).expect("prompt rows of a sequence that wants them");
                        assert_eq!(rows.len().min(r.start), r.start, "seed {seed}: rows skipped before {}", r.start);
                        rows.truncate(r.start); // preempted: computed again
                        rows.extend(&argmax[r.first_row..r.first_row + r.len]);
                    }
                    picked
                } else {
                    run_step(&mut sched, &mut exec, &plan).unwrap()
                };
                for f in sched.update(&plan, &picked, &mut |_, _| Ok(String::new())).unwrap().finished {
                    got.insert(f.seq, (f.generation.ids, f.generation.finish));
                }
            } else {
                assert!(!sched.has_work(), "seed {seed}: work left but nothing scheduled");
            }
            sched.kv().check_invariants().unwrap_or_else(|e| panic!("seed {seed}, step {step}: {e}"));
            step += 1;
            assert!(step < 100_000, "seed {seed}: no progress");
        }
        assert_eq!(got, want, "seed {seed}");
        // Every prompt row of every sequence that asked was computed (none taken from the prefix cache), and row
        // p holds the distribution after the prompt's first p + 1 tokens.
        for (seq, (p, rows)) in &scored {
            let expect: Vec<u32> = (1..p.len()).map(|k| next_id(&p[..k], vocab)).collect();
            if got.contains_key(seq) {
                assert_eq!(rows, &expect, "seed {seed}: prompt rows of sequence {seq}");
            }
        }
        let m = sched.metrics();
        assert_eq!(m.kv.used_blocks, 0, "seed {seed}: blocks leaked");
        total_preemptions += m.preemptions;
        total_hits += m.kv.hit_tokens;
    }
    eprintln!("preemptions {total_preemptions}, hit tokens {total_hits}");
    assert!(total_preemptions > 0 && total_hits > 0, "preemptions {total_preemptions}, hit tokens {total_hits}");
}

/// A scheduler of 8-token steps and 4 sequences over 16 blocks of 4 tokens (vocabulary 32, EOS 0).
fn small(max_prompt_logits_rows: usize) -> Scheduler {
    let cfg = SchedulerConfig {
        max_step_tokens: 8,
        max_seqs: 4,
        eos_ids: vec![0],
        max_model_len: 256,
        vocab_size: 32,
        max_prompt_logits_rows,
    };
    Scheduler::new(cfg, KvManager::new(16, 4).unwrap()).unwrap()
}

#[test]
fn prompt_logits_need_rows_for_them() {
    let mut sched = small(0);
    let a = sched.add_request(vec![1, 2, 3], SamplingParams { max_tokens: 4, ..SamplingParams::greedy() }, 0).unwrap();
    let err = sched.want_prompt_logits(a).unwrap_err().to_string();
    assert!(err.contains("not available"), "{err}");
}

#[test]
fn abort_frees_blocks() {
    let mut exec = MockExec::new(32, 16, 4);
    let mut sched = small(8);
    let params = SamplingParams { max_tokens: 20, ignore_eos: true, ..SamplingParams::greedy() };
    let a = sched.add_request(vec![1, 2, 3, 4, 5], params.clone(), 0).unwrap();
    let b = sched.add_request(vec![6, 7, 8], params, 0).unwrap();
    for _ in 0..3 {
        let plan = sched.schedule().unwrap().unwrap();
        let picked = run_step(&mut sched, &mut exec, &plan).unwrap();
        sched.update(&plan, &picked, &mut |_, _| Ok(String::new())).unwrap();
    }
    assert!(sched.abort(a));
    assert!(!sched.abort(a));
    assert_eq!(sched.kv().table(a).len(), 0);
    let out = run_to_completion(&mut sched, &mut exec, &mut |_, _| Ok(String::new()), &mut |_| {}).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, b);
    assert_eq!(sched.metrics().kv.used_blocks, 0);
}
