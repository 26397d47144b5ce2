//! The serving engine thread on the CPU backend with a tiny random-weight model: requests, streaming events,
//! `n`/`best_of`, log-probabilities, aborts, KV exhaustion and shutdown.

mod common;

use llama32::sampling::{FinishReason, SamplingParams};
use llama32::serve::engine::{EngineConfig, EngineHandle, RequestStream};
use llama32::serve::{Event, GenerateRequest, TokenLogprob, Usage};

/// Everything one request produced: per completion text, ids, logprobs and finish reason; and the usage.
#[derive(Clone, Debug, Default, PartialEq)]
struct Out {
    text: Vec<String>,
    ids: Vec<Vec<u32>>,
    logprobs: Vec<Vec<TokenLogprob>>,
    finish: Vec<Option<FinishReason>>,
    /// The prompt's log-probabilities (sent once, before any delta).
    prompt: Option<Vec<TokenLogprob>>,
    usage: Option<Usage>,
    error: Option<String>,
}

fn drain(mut s: RequestStream, n: usize) -> Out {
    let mut o = Out {
        text: vec![String::new(); n],
        ids: vec![vec![]; n],
        logprobs: vec![vec![]; n],
        finish: vec![None; n],
        ..Default::default()
    };
    while let Some(e) = s.blocking_next() {
        match e {
            Event::Delta { index, text, ids, logprobs } => {
                assert!(o.finish[index].is_none(), "delta after finish");
                o.text[index].push_str(&text);
                o.ids[index].extend(ids);
                o.logprobs[index].extend(logprobs);
            }
            Event::PromptLogprobs(p) => {
                assert!(o.prompt.is_none(), "prompt log-probabilities sent twice");
                assert!(o.ids.iter().all(Vec::is_empty), "prompt log-probabilities after a delta");
                o.prompt = Some(p);
            }
            Event::Finished { index, reason } => o.finish[index] = Some(reason),
            Event::Done(u) => o.usage = Some(u),
            Event::Error(m) => o.error = Some(m),
        }
    }
    o
}

fn prompt(k: u32, len: usize) -> Vec<u32> {
    let mut p = vec![128000];
    p.extend((0..len as u32 - 1).map(|i| 1000 + (i * 37 + k * 101) % 5000));
    p
}

fn sampled(max_tokens: usize, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed: Some(seed),
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

fn engine(tag: &str, kv_tokens: usize, cfg: EngineConfig) -> Option<EngineHandle> {
    let dir = common::tiny_model_dir(tag)?;
    Some(common::tiny_engine(&dir, kv_tokens, cfg).0)
}

#[test]
fn concurrent_requests_equal_their_solo_runs() {
    let Some(e) = engine("solo", 4096, EngineConfig { max_step_tokens: 64, ..Default::default() }) else { return };
    let reqs: Vec<GenerateRequest> =
        (0..12).map(|k| GenerateRequest::new(prompt(k, 20 + 3 * k as usize), sampled(12, k as u64))).collect();
    let solo: Vec<Out> = reqs.iter().map(|r| drain(e.submit_blocking(r.clone()).unwrap(), 1)).collect();
    let streams: Vec<RequestStream> = reqs.iter().map(|r| e.submit_blocking(r.clone()).unwrap()).collect();
    let together: Vec<Out> = streams.into_iter().map(|s| drain(s, 1)).collect();
    for (k, (a, b)) in solo.iter().zip(&together).enumerate() {
        assert_eq!(a.error, None);
        assert_eq!(a.ids[0].len(), 12, "request {k}");
        assert_eq!(a.finish[0], Some(FinishReason::Length));
        assert_eq!(a, b, "request {k}: batched run differs from the solo run");
        let u = a.usage.unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (reqs[k].prompt.len(), 12));
    }
}

#[test]
fn n_and_best_of_share_the_prompt_and_pick_the_most_likely() {
    let Some(e) = engine("nbest", 4096, EngineConfig::default()) else { return };
    let p = prompt(3, 40);
    // n = 3: three different completions, each reproducible from its own seed (seed + k).
    let mut r = GenerateRequest::new(p.clone(), sampled(10, 100));
    r.n = 3;
    let three = drain(e.submit_blocking(r).unwrap(), 3);
    assert_eq!(three.error, None);
    assert!(three.finish.iter().all(|f| *f == Some(FinishReason::Length)));
    assert_ne!(three.ids[0], three.ids[1]);
    for k in 0..3 {
        let solo = drain(e.submit_blocking(GenerateRequest::new(p.clone(), sampled(10, 100 + k as u64))).unwrap(), 1);
        assert_eq!(solo.ids[0], three.ids[k], "completion {k} differs from its seed's solo run");
    }
    assert_eq!(three.usage.unwrap().completion_tokens, 30);
    // The later completions found the prompt's full blocks in the prefix cache.
    let kv = e.metrics().snapshot().sched.kv;
    assert!(kv.hit_tokens >= 2 * 32, "prefix hits {}", kv.hit_tokens);

    // best_of = 4, n = 2: the two completions with the highest cumulative logprob, best first.
    let mut r = GenerateRequest::new(p.clone(), sampled(6, 7));
    r.n = 2;
    r.best_of = 4;
    r.logprobs = Some(0);
    let best = drain(e.submit_blocking(r).unwrap(), 2);
    assert_eq!(best.error, None);
    let mut all = Vec::new();
    for k in 0..4u64 {
        let mut s = GenerateRequest::new(p.clone(), sampled(6, 7 + k));
        s.logprobs = Some(0);
        let o = drain(e.submit_blocking(s).unwrap(), 1);
        let cum: f64 = o.logprobs[0].iter().map(|l| l.logprob as f64).sum();
        all.push((cum, o.ids[0].clone()));
    }
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    assert_eq!(best.ids, vec![all[0].1.clone(), all[1].1.clone()]);
    assert_eq!(best.usage.unwrap().completion_tokens, 24, "usage counts every generated completion");
}

#[test]
fn logprobs_match_the_logits_and_do_not_change_the_tokens() {
    let Some(e) = engine("logprobs", 4096, EngineConfig::default()) else { return };
    let p = prompt(5, 30);
    let plain = drain(e.submit_blocking(GenerateRequest::new(p.clone(), sampled(8, 42))).unwrap(), 1);
    let mut r = GenerateRequest::new(p.clone(), sampled(8, 42));
    r.logprobs = Some(5);
    let with = drain(e.submit_blocking(r).unwrap(), 1);
    assert_eq!(plain.ids, with.ids, "asking for logprobs changed the sampled tokens");
    assert_eq!(with.logprobs[0].len(), 8);
    for (lp, &id) in with.logprobs[0].iter().zip(&with.ids[0]) {
        assert_eq!(lp.id, id);
        assert!(lp.logprob <= 0.0 && lp.logprob.is_finite());
        assert_eq!(lp.top.len(), 5);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(lp.top[0].1 >= lp.logprob, "the best alternative is at least as likely as the pick");
    }
    // Against the model itself: score prompt + completion in one pass with the same executor and take each
    // position's log-softmax. The engine ran a prefill and then one decode step a token, so rounding differs a
    // little; an off-by-one row, another sequence's row or logits after the sampling transforms differ by far more.
    let dir = common::tiny_model_dir("logprobs-score").expect("the engine above found the test data");
    let mut ex = common::tiny_executor(&dir, 4096).unwrap();
    let ids: Vec<u32> = p.iter().chain(&with.ids[0]).copied().collect();
    let logits = llama32::exec::generate::score(&mut ex, &ids, 16).unwrap();
    let vocab = logits.len() / ids.len();
    for (i, lp) in with.logprobs[0].iter().enumerate() {
        let row = &logits[(p.len() - 1 + i) * vocab..(p.len() + i) * vocab];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        let want = |id: u32| (row[id as usize] as f64 - lse) as f32;
        assert!((lp.logprob - want(lp.id)).abs() < 1e-3, "token {i}: logprob {} against {}", lp.logprob, want(lp.id));
        let mut order: Vec<u32> = (0..vocab as u32).collect();
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        for (k, &(id, v)) in lp.top.iter().enumerate() {
            assert!((v - want(id)).abs() < 1e-3, "token {i}, alternative {k}: {v} against {}", want(id));
            assert!((v - want(order[k])).abs() < 1e-3, "token {i}: alternative {k} is not the {k}-th most likely");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    // Greedy: the pick is the most likely token.
    let mut g = GenerateRequest::new(p, SamplingParams { max_tokens: 5, ignore_eos: true, ..Default::default() });
    g.logprobs = Some(1);
    let greedy = drain(e.submit_blocking(g).unwrap(), 1);
    for lp in &greedy.logprobs[0] {
        assert_eq!(lp.top[0].0, lp.id);
        assert_eq!(lp.top[0].1, lp.logprob);
    }
}

#[test]
fn prompt_logprobs_score_every_prompt_token_once() {
    // Chunks of 16 tokens: the prompt's rows come over three steps.
    let Some(e) = engine("prompt-lp", 4096, EngineConfig { max_step_tokens: 16, ..Default::default() }) else {
        return;
    };
    let p = prompt(9, 40);
    let mut plain = GenerateRequest::new(p.clone(), sampled(3, 7));
    plain.n = 2;
    // Run first, so that the prompt's blocks are cached: the scored request must not take them.
    let plain = drain(e.submit_blocking(plain).unwrap(), 2);
    let mut r = GenerateRequest::new(p.clone(), sampled(3, 7));
    r.n = 2;
    r.prompt_logprobs = Some(4);
    let scored = drain(e.submit_blocking(r).unwrap(), 2);
    assert_eq!(scored.error, None);
    assert_eq!(scored.ids, plain.ids, "asking for prompt logprobs changed the sampled tokens");
    assert_eq!(scored.usage, plain.usage);
    let lps = scored.prompt.expect("prompt log-probabilities");
    assert_eq!(lps.len(), p.len() - 1, "one entry per prompt token after the first");
    // Against the model itself, scoring the prompt in one pass.
    let dir = common::tiny_model_dir("prompt-lp-score").expect("the engine above found the test data");
    let mut ex = common::tiny_executor(&dir, 4096).unwrap();
    let logits = llama32::exec::generate::score(&mut ex, &p, 40).unwrap();
    let vocab = logits.len() / p.len();
    for (i, lp) in lps.iter().enumerate() {
        let want = common::log_softmax(&logits[i * vocab..(i + 1) * vocab]);
        assert_eq!(lp.id, p[i + 1], "entry {i} scores prompt token {}", i + 1);
        assert!(
            (lp.logprob as f64 - want[lp.id as usize]).abs() < 1e-3,
            "token {}: {} against {}",
            i + 1,
            lp.logprob,
            want[lp.id as usize]
        );
        let better = want.iter().filter(|&&x| x > want[lp.id as usize] + 1e-3).count() as u32;
        let close = want.iter().filter(|&&x| (x - want[lp.id as usize]).abs() <= 1e-3).count() as u32;
        assert!(lp.rank > better && lp.rank <= better + close, "token {}: rank {} ({better} better)", i + 1, lp.rank);
        assert_eq!(lp.top.len(), 4);
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
        for (k, &(id, v)) in lp.top.iter().enumerate() {
            assert!((v as f64 - want[id as usize]).abs() < 1e-3, "token {}, alternative {k}", i + 1);
            assert!((v as f64 - want[order[k]]).abs() < 1e-3, "token {}: alternative {k} is not the {k}-th", i + 1);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    // A one-token prompt has nothing to score: an empty list, still sent.
    let mut one = GenerateRequest::new(vec![128000], sampled(2, 1));
    one.prompt_logprobs = Some(0);
    let one = drain(e.submit_blocking(one).unwrap(), 1);
    assert_eq!(one.prompt, Some(Vec::new()));
    assert_eq!(one.ids[0].len(), 2);
    // The limit is the one of `logprobs`.
    let mut many = GenerateRequest::new(p, sampled(2, 1));
    many.prompt_logprobs = Some(21);
    let err = e.submit_blocking(many).err().expect("refused").to_string();
    assert!(err.contains("prompt_logprobs must be at most 20"), "{err}");
}

/// The tiny CPU executor with a logits-row limit of its own, as a device buffer or memory plan sets one: a step
/// that asks for more rows fails.
struct Limited(llama32::exec::cpu::CpuExecutor, usize);

impl llama32::exec::Executor for Limited {
    fn config(&self) -> &llama32::config::LlamaConfig {
        self.0.config()
    }
    fn block_size(&self) -> usize {
        self.0.block_size()
    }
    fn num_blocks(&self) -> usize {
        self.0.num_blocks()
    }
    fn max_logits_rows(&self) -> Option<usize> {
        Some(self.1)
    }
    fn step(&mut self, input: &llama32::exec::StepInput) -> llama32::Result<llama32::exec::StepOutput> {
        if input.logits_rows.len() > self.1 {
            return Err(llama32::Error::Backend(format!("{} logits rows, limit {}", input.logits_rows.len(), self.1)));
        }
        self.0.step(input)
    }
}

#[test]
fn prompt_logprobs_stay_within_the_executors_logits_rows() {
    let Some(dir) = common::tiny_model_dir("prompt-lp-limit") else { return };
    let start = |limit: usize| {
        let d = dir.clone();
        let make = move || -> llama32::Result<Box<dyn llama32::exec::Executor>> {
            Ok(Box::new(Limited(common::tiny_executor(&d, 4096)?, limit)))
        };
        let cfg = EngineConfig { max_step_tokens: 64, max_seqs: 4, ..Default::default() };
        EngineHandle::start(make, None, cfg).expect("engine starts")
    };
    // 4 sequences may sample: 3 rows a step are left for the prompt's 39.
    let e = start(4 + 3);
    let streams: Vec<RequestStream> = (0..3)
        .map(|k| {
            let mut r = GenerateRequest::new(prompt(30 + k, 40), sampled(6, k as u64));
            r.prompt_logprobs = (k == 0).then_some(2);
            e.submit_blocking(r).unwrap()
        })
        .collect();
    let outs: Vec<Out> = streams.into_iter().map(|s| drain(s, 1)).collect();
    assert!(outs.iter().all(|o| o.error.is_none()), "{:?}", outs.iter().map(|o| &o.error).collect::<Vec<_>>());
    assert_eq!(outs[0].prompt.as_ref().map(Vec::len), Some(39));
    // No row left for them: refused by name, and the engine goes on.
    let e = start(4);
    let mut r = GenerateRequest::new(prompt(1, 10), sampled(2, 1));
    r.prompt_logprobs = Some(0);
    let err = e.submit_blocking(r).err().expect("refused").to_string();
    assert!(err.contains("prompt log-probabilities are not available"), "{err}");
    assert_eq!(drain(e.submit_blocking(GenerateRequest::new(prompt(1, 10), sampled(2, 1))).unwrap(), 1).error, None);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kv_exhaustion_preempts_and_loses_nothing() {
    // 24 blocks of 16 tokens; 10 requests of 40 + 60 tokens need 7 blocks each at the end.
    let Some(e) = engine("preempt", 24 * 16, EngineConfig { max_step_tokens: 128, ..Default::default() }) else {
        return;
    };
    // Every third request also scores its prompt: a preempted prompt computes its rows again.
    let reqs: Vec<GenerateRequest> = (0..10)
        .map(|k| {
            let mut r = GenerateRequest::new(prompt(20 + k, 40), sampled(60, 1000 + k as u64));
            r.prompt_logprobs = (k % 3 == 0).then_some(1);
            r
        })
        .collect();
    let streams: Vec<RequestStream> = reqs.iter().map(|r| e.submit_blocking(r.clone()).unwrap()).collect();
    let together: Vec<Out> = streams.into_iter().map(|s| drain(s, 1)).collect();
    let snap = e.metrics().snapshot();
    assert!(snap.sched.preemptions > 0, "the test must force preemption");
    for (k, (r, o)) in reqs.iter().zip(&together).enumerate() {
        assert_eq!(o.error, None);
        let solo = drain(e.submit_blocking(r.clone()).unwrap(), 1);
        assert_eq!(o.prompt.as_ref().map(Vec::len), r.prompt_logprobs.map(|_| 39), "request {k}");
        // Prompt scores from other batchings may round differently; the rest must be equal.
        let (mut o, mut solo) = (o.clone(), solo);
        for (a, b) in o.prompt.take().into_iter().flatten().zip(solo.prompt.take().into_iter().flatten()) {
            assert_eq!((a.id, a.top[0].0), (b.id, b.top[0].0), "request {k}");
            assert!((a.logprob - b.logprob).abs() < 1e-4, "request {k}: {} against {}", a.logprob, b.logprob);
        }
        assert_eq!(o, solo, "request {k} changed under preemption");
    }
    let kv = e.metrics().snapshot().sched.kv;
    assert_eq!(kv.used_blocks, 0, "blocks leaked");
}

#[test]
fn dropping_a_stream_aborts_its_request_and_frees_its_blocks() {
    let Some(e) = engine("abort", 4096, EngineConfig::default()) else { return };
    let mut long = e.submit_blocking(GenerateRequest::new(prompt(1, 50), sampled(900, 1))).unwrap();
    // Wait for a few tokens, then go away.
    let mut got = 0;
    while got < 3 {
        if let Some(Event::Delta { .. }) = long.blocking_next() {
            got += 1;
        }
    }
    drop(long);
    let t0 = std::time::Instant::now();
    loop {
        let s = e.metrics().snapshot();
        if s.sched.running == 0 && s.sched.kv.used_blocks == 0 {
            break;
        }
        assert!(t0.elapsed().as_secs() < 5, "aborted request still holds {} blocks", s.sched.kv.used_blocks);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let s = e.metrics().snapshot();
    assert!(s.requests_finished.iter().any(|&(r, c)| r == "aborted" && c == 1));
    // The engine goes on serving.
    let o = drain(e.submit_blocking(GenerateRequest::new(prompt(2, 10), sampled(4, 2))).unwrap(), 1);
    assert_eq!(o.ids[0].len(), 4);
}

#[test]
fn refusals_name_the_problem() {
    let Some(e) = engine("refuse", 64, EngineConfig { max_waiting: 2, ..Default::default() }) else { return };
    let err = |r: GenerateRequest| e.submit_blocking(r).err().map(|x| x.to_string()).unwrap_or_default();
    // The prompt fills the context (1024).
    assert!(err(GenerateRequest::new(prompt(0, 1024), sampled(1, 0))).contains("context length"));
    // max_model_len defaults to what the cache holds (64 tokens): prompt + output stop there with "length".
    assert_eq!(e.info().max_model_len, 64);
    let capped = drain(e.submit_blocking(GenerateRequest::new(prompt(0, 40), sampled(60, 0))).unwrap(), 1);
    assert_eq!((capped.ids[0].len(), capped.finish[0]), (24, Some(FinishReason::Length)));
    let mut bad = GenerateRequest::new(prompt(0, 4), sampled(4, 0));
    bad.params.top_p = 0.0;
    assert!(err(bad).contains("top_p"));
    let mut many = GenerateRequest::new(prompt(0, 4), sampled(4, 0));
    many.n = 3;
    // A full queue is transient, not the request's fault: its own variant (429 over HTTP, never a batch result).
    let full = e.submit_blocking(many).err().expect("a full queue refuses");
    assert!(matches!(full, llama32::Error::Overloaded(_)) && full.to_string().contains("queue is full"), "{full}");
}

#[test]
fn shutdown_finishes_running_requests_then_refuses_and_ends() {
    let Some(e) = engine("shutdown", 4096, EngineConfig::default()) else { return };
    let s = e.submit_blocking(GenerateRequest::new(prompt(1, 20), sampled(40, 1))).unwrap();
    e.shutdown(None);
    let o = drain(s, 1);
    assert_eq!(o.error, None);
    assert_eq!(o.ids[0].len(), 40);
    let err = e.submit_blocking(GenerateRequest::new(prompt(1, 20), sampled(4, 1)));
    assert!(err.is_err());
    e.join();

    // With a deadline, what is still running ends with an error event.
    let Some(e) = engine("deadline", 4096, EngineConfig::default()) else { return };
    let s = e.submit_blocking(GenerateRequest::new(prompt(1, 20), sampled(1000, 1))).unwrap();
    e.shutdown(Some(std::time::Instant::now() + std::time::Duration::from_millis(50)));
    let o = drain(s, 1);
    assert!(o.error.as_deref().unwrap_or("").contains("shut down"), "{:?}", o.error);
    e.join();
}

#[test]
fn max_model_len_is_checked_against_the_context_and_the_cache() {
    let Some(dir) = common::tiny_model_dir("maxlen") else { return };
    let start = |kv: usize, m: Option<usize>| {
        let d = dir.clone();
        let make = move || -> llama32::Result<Box<dyn llama32::exec::Executor>> {
            let cfg = llama32::config::LlamaConfig::from_model_dir(&d)?;
            let w = llama32::weights::ModelWeights::random(&cfg, 7)?;
            Ok(Box::new(llama32::exec::cpu::CpuExecutor::with_capacity(cfg, w, kv, 16)?))
        };
        EngineHandle::start(make, None, EngineConfig { max_model_len: m, ..Default::default() })
    };
    assert_eq!(start(4096, None).unwrap().info().max_model_len, 1024, "the context length when the cache is larger");
    assert_eq!(start(4096, Some(100)).unwrap().info().max_model_len, 100);
    let e = start(256, Some(512)).err().expect("larger than the cache").to_string();
    assert!(e.contains("max_model_len 512") && e.contains("KV cache 256"), "{e}");
    let e = start(4096, Some(2000)).err().expect("larger than the context").to_string();
    assert!(e.contains("context length 1024"), "{e}");
}
