//! Sampling, penalties and stop handling.
//!
//! Reference data: `tests/data/sampling_reference.json` holds penalized logits and filtered distributions
//! computed with Hugging Face transformers' logits processors and vLLM's penalty formula (see
//! `tests/data/make_sampling_fixtures.py`). The random stream is checked against an independent ChaCha20
//! written here and the published zero-key ChaCha20 keystream.

use std::collections::BTreeSet;
use std::path::PathBuf;

use llama32::sampling::{argmax, FinishReason, Sampler, SamplingParams, StopChecker, StopStep};
use serde_json::Value;

fn params(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams { temperature, seed: Some(seed), ..SamplingParams::default() }
}

fn ln_probs(p: &[f64]) -> Vec<f32> {
    p.iter().map(|&x| x.ln() as f32).collect()
}

fn draw_counts(p: &SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
    // One sampler for all draws: without penalties it is memoryless.
    let mut counts = vec![0; logits.len()];
    let mut s = Sampler::new(p, &[]);
    for _ in 0..n {
        counts[s.sample(logits) as usize] += 1;
    }
    counts
}

fn assert_within_3_sigma(counts: &[usize], probs: &[f64]) {
    let n: usize = counts.iter().sum();
    for (i, (&c, &p)) in counts.iter().zip(probs).enumerate() {
        let mean = n as f64 * p;
        let sigma = (n as f64 * p * (1.0 - p)).sqrt();
        assert!(
            (c as f64 - mean).abs() <= 3.0 * sigma,
            "token {i}: {c} draws, expected {mean:.1} +- {:.1}",
            3.0 * sigma
        );
    }
}

#[test]
fn temperature_one_matches_distribution() {
    let probs = [0.1, 0.2, 0.3, 0.4];
    let counts = draw_counts(&params(1.0, 7), &ln_probs(&probs), 20000);
    assert_within_3_sigma(&counts, &probs);
}

#[test]
fn temperature_two_flattens_distribution() {
    // p_i ∝ exp(ln(q_i) / 2) = sqrt(q_i)
    let q = [0.05, 0.15, 0.3, 0.5];
    let z: f64 = q.iter().map(|x: &f64| x.sqrt()).sum();
    let expect: Vec<f64> = q.iter().map(|x| x.sqrt() / z).collect();
    let counts = draw_counts(&params(2.0, 11), &ln_probs(&q), 20000);
    assert_within_3_sigma(&counts, &expect);
}

fn drawn_set(p: &SamplingParams, logits: &[f32], n: usize) -> BTreeSet<u32> {
    let mut s = Sampler::new(p, &[]);
    (0..n).map(|_| s.sample(logits)).collect()
}

#[test]
fn filters_never_draw_excluded_tokens() {
    let logits = ln_probs(&[0.05, 0.1, 0.15, 0.3, 0.4]);
    let set = |v: &[u32]| v.iter().copied().collect::<BTreeSet<u32>>();
    let base = params(1.0, 3);
    let cases: Vec<(SamplingParams, BTreeSet<u32>)> = vec![
        (SamplingParams { top_k: 2, ..base.clone() }, set(&[3, 4])),
        (SamplingParams { top_k: 1, ..base.clone() }, set(&[4])),
        (SamplingParams { top_k: 5, ..base.clone() }, set(&[0, 1, 2, 3, 4])),
        (SamplingParams { top_k: 9, ..base.clone() }, set(&[0, 1, 2, 3, 4])),
        (SamplingParams { top_p: 0.65, ..base.clone() }, set(&[3, 4])),
        (SamplingParams { top_p: 0.75, ..base.clone() }, set(&[2, 3, 4])),
        (SamplingParams { top_p: 0.3, ..base.clone() }, set(&[4])),
        (SamplingParams { min_p: 0.5, ..base.clone() }, set(&[3, 4])), // p >= 0.2
        (SamplingParams { min_p: 0.3, ..base.clone() }, set(&[2, 3, 4])), // p >= 0.12
        (SamplingParams { min_p: 0.3, top_k: 4, top_p: 0.5, ..base.clone() }, set(&[3, 4])),
    ];
    for (p, allowed) in cases {
        let got = drawn_set(&p, &logits, 3000);
        assert_eq!(got, allowed, "{p:?}");
        let dist: BTreeSet<u32> = Sampler::new(&p, &[]).distribution(&logits).iter().map(|d| d.0).collect();
        assert_eq!(dist, allowed, "distribution of {p:?}");
    }
}

#[test]
fn top_k_renormalizes() {
    // top-k 2 over [0.1, 0.2, 0.3, 0.4] leaves 3/7 and 4/7.
    let p = SamplingParams { top_k: 2, ..params(1.0, 5) };
    let counts = draw_counts(&p, &ln_probs(&[0.1, 0.2, 0.3, 0.4]), 20000);
    assert_within_3_sigma(&counts, &[0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]);
}

/// The top-p nucleus by the specification, with a full sort: `Z` summed in id order, prefix sums in
/// descending-logit order (ties: lower id first), shortest prefix reaching `top_p * Z`.
fn nucleus_by_full_sort(logits: &[f32], temperature: f64, top_p: f64) -> BTreeSet<u32> {
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    let m = logits[order[0] as usize] as f64;
    let w = |i: u32| ((logits[i as usize] as f64 - m) / temperature).exp();
    let z: f64 = (0..logits.len() as u32).map(w).sum();
    let mut cum = 0.0;
    let keep = order.iter().position(|&i| {
        cum += w(i);
        cum >= top_p * z
    });
    order[..keep.map_or(logits.len(), |k| k + 1)].iter().copied().collect()
}

fn xorshift_row(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

#[test]
fn large_vocab_top_k_and_top_p() {
    // A 128256-entry row; the allowed sets are computed here by a full sort.
    let logits = xorshift_row(128_256, 0x1234_5678_9abc_def0, 12.0);
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    let top40: BTreeSet<u32> = order[..40].iter().copied().collect();
    let p = SamplingParams { top_k: 40, ..params(0.8, 9) };
    let dist: BTreeSet<u32> = Sampler::new(&p, &[]).distribution(&logits).iter().map(|d| d.0).collect();
    assert_eq!(dist, top40);
    assert!(drawn_set(&p, &logits, 100).is_subset(&top40));
    for (t, top_p) in [(1.0, 0.5), (0.7, 0.9), (2.0, 0.05)] {
        let nucleus = nucleus_by_full_sort(&logits, t as f64, top_p as f64);
        let p = SamplingParams { top_p, ..params(t, 9) };
        let dist: BTreeSet<u32> = Sampler::new(&p, &[]).distribution(&logits).iter().map(|d| d.0).collect();
        assert_eq!(dist, nucleus, "T={t} top_p={top_p}");
        assert!(drawn_set(&p, &logits, 20).is_subset(&nucleus));
    }
}

#[test]
fn top_p_with_ties_and_outliers() {
    // Heavy ties (8 distinct values), a huge negative outlier, and a wide dynamic range.
    let ties: Vec<f32> = xorshift_row(3000, 77, 8.0).iter().map(|x| x.round()).collect();
    let mut outlier = xorshift_row(3000, 78, 20.0);
    outlier[17] = -1e30;
    outlier[2999] = 1e4;
    let wide: Vec<f32> = xorshift_row(3000, 79, 400.0);
    for row in [&ties, &outlier, &wide] {
        for (t, top_p) in [(1.0f32, 0.3f32), (1.0, 0.8), (0.5, 0.95), (3.0, 0.6), (1.0, 0.999)] {
            let p = SamplingParams { top_p, ..params(t, 1) };
            let dist: BTreeSet<u32> = Sampler::new(&p, &[]).distribution(row).iter().map(|d| d.0).collect();
            assert_eq!(dist, nucleus_by_full_sort(row, t as f64, top_p as f64), "T={t} top_p={top_p}");
        }
    }
}

fn reference() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/sampling_reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("read fixture")).expect("parse fixture")
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("int") as u32).collect()
}

#[test]
fn penalties_and_filters_match_transformers_reference() {
    let r = reference();
    let logits = f32s(&r["logits"]);
    let prompt = u32s(&r["prompt_ids"]);
    let output = u32s(&r["output_ids"]);
    let cases = r["cases"].as_array().expect("cases");
    assert!(cases.len() >= 10);
    for c in cases {
        let name = c["name"].as_str().expect("name");
        let get = |k: &str| c[k].as_f64().expect(k) as f32;
        let p = SamplingParams {
            temperature: get("temperature"),
            top_k: c["top_k"].as_u64().expect("top_k") as usize,
            top_p: get("top_p"),
            min_p: get("min_p"),
            repetition_penalty: get("repetition_penalty"),
            frequency_penalty: get("frequency_penalty"),
            presence_penalty: get("presence_penalty"),
            seed: Some(0),
            ..SamplingParams::default()
        };
        p.validate(logits.len()).expect("valid params");
        let mut s = Sampler::new(&p, &prompt);
        for &id in &output {
            s.accept(id);
        }
        // Penalties: bit-exact against torch float32.
        let mut row = logits.clone();
        s.apply_penalties(&mut row);
        let want = f32s(&c["penalized"]);
        for (i, (a, b)) in row.iter().zip(&want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{name}: penalized logit {i}: {a} vs {b}");
        }
        // Filtered distribution: same support, same probabilities.
        let probs: Vec<f64> = c["probs"].as_array().expect("probs").iter().map(|x| x.as_f64().expect("p")).collect();
        let dist = s.distribution(&logits);
        let support: Vec<u32> = (0..probs.len() as u32).filter(|&i| probs[i as usize] > 0.0).collect();
        assert_eq!(dist.iter().map(|d| d.0).collect::<Vec<_>>(), support, "{name}: support");
        for &(id, pr) in &dist {
            assert!((pr - probs[id as usize]).abs() < 1e-6, "{name}: p[{id}] = {pr}, reference {}", probs[id as usize]);
        }
        // Draws stay inside the support.
        for _ in 0..200 {
            let id = s.clone().sample(&logits);
            assert!(probs[id as usize] > 0.0, "{name}: drew excluded token {id}");
        }
    }
}

#[test]
fn frequency_penalty_accumulates_over_sampled_tokens() {
    // Greedy with frequency penalty 2: logits 10 and 9.5; each pick lowers that token by 2.
    // Step by step: 10>9.5 -> 0; 8<9.5 -> 1; 8>7.5 -> 0; 6<7.5 -> 1; 6>5.5 -> 0.
    let p = SamplingParams { frequency_penalty: 2.0, ..SamplingParams::greedy() };
    let mut s = Sampler::new(&p, &[]);
    let ids: Vec<u32> = (0..5).map(|_| s.sample(&[10.0, 9.5, 0.0])).collect();
    assert_eq!(ids, [0, 1, 0, 1, 0]);
    // Presence penalty 1 only once: 10 -> 9 (< 9.5) -> 1; then both present: 9 vs 8.5 -> 0, and it stays 0.
    let p = SamplingParams { presence_penalty: 1.0, ..SamplingParams::greedy() };
    let mut s = Sampler::new(&p, &[]);
    let ids: Vec<u32> = (0..4).map(|_| s.sample(&[10.0, 9.5, 0.0])).collect();
    assert_eq!(ids, [0, 1, 0, 0]);
    // Repetition penalty covers the prompt: token 0 is in the prompt, 10/1.1 = 9.09 < 9.5.
    let p = SamplingParams { repetition_penalty: 1.1, ..SamplingParams::greedy() };
    assert_eq!(Sampler::new(&p, &[0]).sample(&[10.0, 9.5, 0.0]), 1);
    assert_eq!(Sampler::new(&p, &[2]).sample(&[10.0, 9.5, 0.0]), 0);
    // Negative logits are multiplied: -1 * 3 = -3 < -2.5.
    let p = SamplingParams { repetition_penalty: 3.0, ..SamplingParams::greedy() };
    assert_eq!(Sampler::new(&p, &[0]).sample(&[-1.0, -2.5]), 1);
}

#[test]
fn logit_bias_is_added_before_the_penalties() {
    let row = [10.0, 9.5, 0.0];
    // +1 on token 1 makes it the argmax (10.5 > 10); -100 bans token 0 in a draw too.
    let p = SamplingParams { logit_bias: vec![(1, 1.0)], ..SamplingParams::greedy() };
    assert!(!p.is_plain_greedy(), "a biased greedy row is not a plain argmax");
    assert_eq!(Sampler::new(&p, &[]).sample(&row), 1);
    let p = SamplingParams { logit_bias: vec![(0, -100.0), (1, -100.0)], ..params(1.0, 3) };
    assert_eq!(draw_counts(&p, &[10.0, 9.5, 8.0], 200)[..2], [0, 0]);
    // Bias first, then the repetition penalty on the biased value: token 0 (in the prompt) becomes (10 - 12) * 3 = -6
    // (penalty first would give 10 / 3 - 12 = -8.67); token 1, not in the prompt, only its bias: 9.5 - 12.
    let p = SamplingParams { logit_bias: vec![(0, -12.0), (1, -12.0)], repetition_penalty: 3.0, ..Default::default() };
    let mut biased = row;
    Sampler::new(&p, &[0]).apply_penalties(&mut biased);
    assert_eq!(biased, [(10.0f32 - 12.0) * 3.0, 9.5 - 12.0, 0.0]);
    // Ids outside the row are ignored, as for the penalties.
    let p = SamplingParams { logit_bias: vec![(7, 5.0)], ..SamplingParams::greedy() };
    assert_eq!(Sampler::new(&p, &[]).sample(&row), 0);
}

#[test]
fn min_tokens_holds_back_the_stop_ids() {
    // Token 2 (EOS) leads; with min_tokens 3 the first three draws cannot take it, the fourth can.
    let row = [1.0, 0.5, 9.0, 0.0];
    let p = SamplingParams { min_tokens: 3, max_tokens: 10, ..SamplingParams::greedy() };
    assert!(!p.is_plain_greedy());
    let mut s = Sampler::new(&p, &[]).with_eos_ids(&[2]);
    let ids: Vec<u32> = (0..4).map(|_| s.sample(&row)).collect();
    assert_eq!(ids, [0, 0, 0, 2]);
    // stop_token_ids are held back too, even without EOS ids; ignore_eos leaves EOS free.
    let p = SamplingParams { min_tokens: 1, max_tokens: 4, stop_token_ids: vec![0], ..SamplingParams::greedy() };
    let s = Sampler::new(&p, &[]).with_eos_ids(&[2]);
    assert_eq!(s.banned_now(), &[0, 2]);
    assert_eq!(s.clone().sample(&[5.0, 1.0, 4.0]), 1, "0 and 2 banned");
    let free = SamplingParams { ignore_eos: true, ..p.clone() };
    assert_eq!(Sampler::new(&free, &[]).with_eos_ids(&[2]).banned_now(), &[0]);
    // The held-back ids are the stop checker's: stop_ids, sorted and without repeats.
    let p = SamplingParams { min_tokens: 1, max_tokens: 4, stop_token_ids: vec![9, 3], ..SamplingParams::greedy() };
    let s = Sampler::new(&p, &[]).with_eos_ids(&[9, 1, 1]);
    assert_eq!(s.banned_now(), llama32::sampling::stop_ids(&[9, 1, 1], &p).as_slice());
    assert_eq!(s.banned_now(), &[1, 3, 9]);
    // The distribution agrees with the draws: a banned token has no mass.
    let p = SamplingParams { min_tokens: 2, max_tokens: 4, ..params(1.0, 5) };
    let s = Sampler::new(&p, &[]).with_eos_ids(&[2]);
    assert!(s.distribution(&row).iter().all(|&(id, _)| id != 2));
    // The stop checker lets neither a stop id nor a stop string end the sequence before min_tokens.
    let p = SamplingParams { min_tokens: 3, max_tokens: 8, stop: vec!["ab".into()], ..SamplingParams::greedy() };
    let mut c = StopChecker::new(&[2], &p);
    assert_eq!(c.push(7, "xab").finished, None, "a stop string before min_tokens");
    assert_eq!(c.push(2, "").finished, None, "EOS before min_tokens");
    assert_eq!(c.push(2, "").finished, Some(FinishReason::Stop), "EOS at min_tokens");
    let mut c = StopChecker::new(&[2], &p);
    c.push(7, "x");
    c.push(7, "y");
    let last = c.push(7, "zab");
    assert_eq!((last.emit.as_str(), last.finished), ("z", Some(FinishReason::Stop)));
    let e = SamplingParams { min_tokens: 9, max_tokens: 8, ..SamplingParams::greedy() }.validate(10).unwrap_err();
    assert!(e.to_string().contains("min_tokens must be at most max_tokens (8), got 9"), "{e}");
}

#[test]
fn logit_bias_is_validated() {
    let check = |bias: Vec<(u32, f32)>, needle: &str| {
        let p = SamplingParams { logit_bias: bias, ..SamplingParams::greedy() };
        let e = p.validate(100).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    };
    check(vec![(100, 1.0)], "token id 100 must be in [0, 100)");
    check(vec![(5, 1.0), (5, 2.0)], "strictly increasing");
    check(vec![(6, 1.0), (5, 2.0)], "strictly increasing");
    check(vec![(5, 100.5)], "logit_bias[5] must be in [-100, 100]");
    check(vec![(5, f32::NAN)], "logit_bias[5]");
    let ok = SamplingParams { logit_bias: vec![(0, -100.0), (99, 100.0)], ..SamplingParams::greedy() };
    ok.validate(100).unwrap();
}

#[test]
fn greedy_is_argmax_with_lowest_index_ties() {
    assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN]), 1);
    assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
    assert_eq!(argmax(&[]), 0);
    assert_eq!(argmax(&[0.0, f32::INFINITY, 5.0, f32::INFINITY]), 1);
    assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    assert_eq!(argmax(&[-5.0, -0.0, 0.0]), 1);
    let mut s = Sampler::new(&SamplingParams::greedy(), &[]);
    assert_eq!(s.sample(&[0.5, 2.0, 2.0, f32::NAN]), 1);
    // Temperatures below 1e-5 are greedy too.
    let mut s = Sampler::new(&params(1e-6, 1), &[]);
    assert!(s.is_greedy());
    assert_eq!(s.sample(&[0.5, 2.0, 1.0]), 1);
    // top_k 1 with temperature picks the argmax (lowest index on ties) as well.
    let p = SamplingParams { top_k: 1, ..params(1.0, 1) };
    assert_eq!(drawn_set(&p, &[1.0, 4.0, 4.0, 0.0], 50), BTreeSet::from([1]));
    // top-k keeps exactly k tokens, ties broken by lower id.
    let p = SamplingParams { top_k: 2, ..params(1.0, 1) };
    assert_eq!(drawn_set(&p, &[1.0, 4.0, 4.0, 4.0, 0.0], 500), BTreeSet::from([1, 2]));
}

#[test]
fn non_finite_logits() {
    // -inf and NaN are never drawn; +inf wins outright.
    let p = params(1.0, 2);
    let got = drawn_set(&p, &[f32::NEG_INFINITY, 0.0, f32::NAN, 0.0], 500);
    assert_eq!(got, BTreeSet::from([1, 3]));
    let got = drawn_set(&p, &[0.0, f32::INFINITY, 100.0], 50);
    assert_eq!(got, BTreeSet::from([1]));
}

/// Independent ChaCha20 (64-bit counter in words 12-13, stream 0 in words 14-15) keystream words.
fn chacha20_words(key: &[u8; 32], blocks: usize) -> Vec<u32> {
    fn qr(s: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
        s[a] = s[a].wrapping_add(s[b]);
        s[d] = (s[d] ^ s[a]).rotate_left(16);
        s[c] = s[c].wrapping_add(s[d]);
        s[b] = (s[b] ^ s[c]).rotate_left(12);
        s[a] = s[a].wrapping_add(s[b]);
        s[d] = (s[d] ^ s[a]).rotate_left(8);
        s[c] = s[c].wrapping_add(s[d]);
        s[b] = (s[b] ^ s[c]).rotate_left(7);
    }
    let mut out = Vec::new();
    for block in 0..blocks as u64 {
        let mut init = [0u32; 16];
        init[..4].copy_from_slice(&[0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574]);
        for i in 0..8 {
            init[4 + i] = u32::from_le_bytes(key[4 * i..4 * i + 4].try_into().unwrap());
        }
        init[12] = block as u32;
        init[13] = (block >> 32) as u32;
        let mut s = init;
        for _ in 0..10 {
            qr(&mut s, 0, 4, 8, 12);
            qr(&mut s, 1, 5, 9, 13);
            qr(&mut s, 2, 6, 10, 14);
            qr(&mut s, 3, 7, 11, 15);
            qr(&mut s, 0, 5, 10, 15);
            qr(&mut s, 1, 6, 11, 12);
            qr(&mut s, 2, 7, 8, 13);
            qr(&mut s, 3, 4, 9, 14);
        }
        out.extend(s.iter().zip(&init).map(|(a, b)| a.wrapping_add(*b)));
    }
    out
}

/// rand_core's `seed_from_u64`: PCG32 output words, little-endian, fill the 32-byte key.
fn pcg32_key(mut state: u64) -> [u8; 32] {
    let mut key = [0u8; 32];
    for chunk in key.chunks_mut(4) {
        state = state.wrapping_mul(0x5851_F42D_4C95_7F2D).wrapping_add(0xA176_54E4_6FBE_17F3);
        let x = ((((state >> 18) ^ state) >> 27) as u32).rotate_right((state >> 59) as u32);
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    key
}

#[test]
fn random_stream_is_specified_chacha20() {
    // The published ChaCha20 keystream for the all-zero key and nonce starts 76b8e0ad a0f13d90 405d6ae5.
    let w = chacha20_words(&[0; 32], 1);
    assert_eq!(&w[..3], &[u32::from_le_bytes([0x76, 0xb8, 0xe0, 0xad]), 0x903d_f1a0, 0xe56a_5d40]);
    for seed in [0u64, 1, 42, u64::MAX] {
        let words = chacha20_words(&pcg32_key(seed), 3);
        let mut s = Sampler::new(&params(1.0, seed), &[]);
        for i in 0..20 {
            let x = words[2 * i] as u64 | (words[2 * i + 1] as u64) << 32;
            assert_eq!(s.next_uniform(), (x >> 11) as f64 / (1u64 << 53) as f64, "seed {seed} draw {i}");
        }
    }
}

#[test]
fn seeded_draws_are_reproducible() {
    let logits: Vec<f32> = (0..50).map(|i| ((i * 37 % 50) as f32) / 10.0).collect();
    let p = SamplingParams { top_p: 0.9, top_k: 20, repetition_penalty: 1.1, ..params(0.9, 1234) };
    let run = |p: &SamplingParams| {
        let mut s = Sampler::new(p, &[1, 2, 3]);
        (0..200).map(|_| s.sample(&logits)).collect::<Vec<u32>>()
    };
    let a = run(&p);
    assert_eq!(a, run(&p));
    assert_ne!(a, run(&SamplingParams { seed: Some(1235), ..p.clone() }));
    // Each draw is inverse-CDF with one uniform: recompute it from the stream and the distribution.
    let mut s = Sampler::new(&p, &[1, 2, 3]);
    let mut shadow = Sampler::new(&p, &[1, 2, 3]);
    for _ in 0..100 {
        let dist = shadow.distribution(&logits);
        let u = shadow.next_uniform();
        let mut acc = 0.0;
        let want = dist.iter().find(|d| {
            acc += d.1;
            u < acc
        });
        let want = want.map_or(dist[dist.len() - 1].0, |d| d.0);
        let got = s.sample(&logits);
        assert_eq!(got, want);
        shadow.accept(got);
    }
    // Unseeded samplers work and differ from each other (with overwhelming probability).
    let q = params(1.0, 0);
    let q = SamplingParams { seed: None, ..q };
    let (mut x, mut y) = (Sampler::new(&q, &[]), Sampler::new(&q, &[]));
    assert_ne!(
        (0..4).map(|_| x.next_uniform()).collect::<Vec<_>>(),
        (0..4).map(|_| y.next_uniform()).collect::<Vec<_>>()
    );
}

#[test]
fn validate_names_field_and_range() {
    let v = 100;
    SamplingParams::default().validate(v).expect("default is valid");
    let bad = |p: SamplingParams, want: &str| {
        let e = p.validate(v).expect_err(want).to_string();
        assert!(e.contains(want), "{e:?} lacks {want:?}");
    };
    let d = SamplingParams::default;
    bad(SamplingParams { top_p: 1.5, ..d() }, "top_p must be in (0, 1], got 1.5");
    bad(SamplingParams { top_p: 0.0, ..d() }, "top_p must be in (0, 1], got 0");
    bad(SamplingParams { top_p: f32::NAN, ..d() }, "top_p must be in (0, 1], got NaN");
    bad(SamplingParams { temperature: -0.5, ..d() }, "temperature must be a finite number >= 0, got -0.5");
    bad(SamplingParams { temperature: f32::NAN, ..d() }, "temperature");
    bad(SamplingParams { temperature: f32::INFINITY, ..d() }, "temperature");
    bad(SamplingParams { min_p: 1.1, ..d() }, "min_p must be in [0, 1], got 1.1");
    bad(SamplingParams { min_p: f32::NAN, ..d() }, "min_p");
    bad(SamplingParams { repetition_penalty: 0.0, ..d() }, "repetition_penalty must be a finite number > 0, got 0");
    bad(SamplingParams { frequency_penalty: 2.5, ..d() }, "frequency_penalty must be in [-2, 2], got 2.5");
    bad(SamplingParams { presence_penalty: -3.0, ..d() }, "presence_penalty must be in [-2, 2], got -3");
    bad(SamplingParams { max_tokens: 0, ..d() }, "max_tokens must be at least 1");
    bad(SamplingParams { stop: vec!["a".into(), String::new()], ..d() }, "stop[1] must be a non-empty string");
    bad(SamplingParams { stop_token_ids: vec![5, 100], ..d() }, "stop_token_ids must be in [0, 100)");
    // Edges that are allowed.
    SamplingParams { top_p: 1.0, min_p: 1.0, frequency_penalty: -2.0, presence_penalty: 2.0, top_k: 1000, ..d() }
        .validate(v)
        .expect("edges are valid");
}

#[test]
fn params_serde() {
    let p: SamplingParams = serde_json::from_str(r#"{"temperature": 0.7, "stop": ["\n\n"], "seed": 5}"#).unwrap();
    assert_eq!(p, SamplingParams { temperature: 0.7, stop: vec!["\n\n".into()], seed: Some(5), ..Default::default() });
    assert_eq!(SamplingParams::greedy().max_tokens, 256);
    assert!(SamplingParams::greedy().is_greedy());
    assert_eq!(serde_json::to_string(&FinishReason::Stop).unwrap(), r#""stop""#);
    assert_eq!(serde_json::to_string(&FinishReason::Length).unwrap(), r#""length""#);
    assert_eq!(serde_json::from_str::<FinishReason>(r#""length""#).unwrap(), FinishReason::Length);
}

// ---------------------------------------------------------------- StopChecker

const EOS: [u32; 2] = [128001, 128009];

fn stop_params(stop: &[&str], max_tokens: usize) -> SamplingParams {
    SamplingParams { stop: stop.iter().map(|s| s.to_string()).collect(), max_tokens, ..Default::default() }
}

/// Feeds `(id, text)` pairs; returns the concatenated emitted text, the per-step emits and the finish reason.
fn run(c: &mut StopChecker, toks: &[(u32, &str)]) -> (String, Vec<String>, Option<FinishReason>) {
    let mut all = String::new();
    let mut steps = Vec::new();
    let mut fin = None;
    for &(id, t) in toks {
        let StopStep { emit, finished } = c.push(id, t);
        all.push_str(&emit);
        steps.push(emit);
        if finished.is_some() {
            fin = finished;
            break;
        }
    }
    if fin.is_none() {
        all.push_str(&c.finish());
    }
    (all, steps, fin)
}

#[test]
fn stop_string_split_across_three_tokens() {
    let mut c = StopChecker::new(&EOS, &stop_params(&["###END"], 100));
    let (all, steps, fin) = run(&mut c, &[(1, "Hello #"), (2, "##E"), (3, "N"), (4, "D and more"), (5, "x")]);
    assert_eq!(all, "Hello ");
    assert_eq!(steps, ["Hello ", "", "", ""]);
    assert_eq!(fin, Some(FinishReason::Stop));
    assert_eq!(c.finish(), "");
    // Pushing after the end emits nothing.
    assert_eq!(c.push(6, "y"), StopStep { emit: String::new(), finished: Some(FinishReason::Stop) });
}

#[test]
fn partial_match_that_is_not_a_stop_is_released() {
    let mut c = StopChecker::new(&EOS, &stop_params(&["</answer>"], 100));
    let (all, steps, fin) = run(&mut c, &[(1, "a </an"), (2, "swer"), (3, "s> b <"), (4, "/x")]);
    assert_eq!(steps, ["a ", "", "</answers> b ", "</x"]);
    assert_eq!(all, "a </answers> b </x");
    assert_eq!(fin, None);
    // Held text is flushed by finish().
    let mut c = StopChecker::new(&EOS, &stop_params(&["STOP"], 100));
    assert_eq!(c.push(1, "go ST").emit, "go ");
    assert_eq!(c.finish(), "ST");
}

/// 64 stop strings of 1 KB that share a 512-byte prefix the text keeps matching: each token costs the checker its
/// new bytes times the strings (trying every held suffix length cost about 0.6 ms a token on the engine thread).
#[test]
fn stop_strings_cost_linear_time() {
    let stops: Vec<String> = (0..64).map(|i| format!("{}b{}", "a".repeat(512), "x".repeat(447 + i))).collect();
    let p = SamplingParams { stop: stops, max_tokens: 20_001, ..SamplingParams::greedy() };
    let mut c = StopChecker::new(&[2], &p);
    let t = std::time::Instant::now();
    let mut emitted = 0;
    for _ in 0..20_000 {
        let st = c.push(7, "a");
        assert_eq!(st.finished, None);
        emitted += st.emit.len();
    }
    // Everything but the 512 held `a`s went out.
    assert_eq!(emitted, 20_000 - 512);
    let last = c.push(7, "bx");
    assert_eq!((last.emit.len(), last.finished), (512 + 2, Some(FinishReason::Length)));
    assert!(t.elapsed() < std::time::Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn multiple_stop_strings_earliest_wins() {
    let mut c = StopChecker::new(&EOS, &stop_params(&["world", "lo w", "\n\n"], 100));
    let (all, _, fin) = run(&mut c, &[(1, "hel"), (2, "lo wor"), (3, "ld")]);
    assert_eq!((all.as_str(), fin), ("hel", Some(FinishReason::Stop)));
    let mut c = StopChecker::new(&EOS, &stop_params(&["world", "\n\n"], 100));
    let (all, _, fin) = run(&mut c, &[(1, "one\n"), (2, "\ntwo world")]);
    assert_eq!((all.as_str(), fin), ("one", Some(FinishReason::Stop)));
    // A stop string inside a single token, followed by more text in that token.
    let mut c = StopChecker::new(&EOS, &stop_params(&["ab"], 100));
    assert_eq!(c.push(1, "xxabyy"), StopStep { emit: "xx".into(), finished: Some(FinishReason::Stop) });
}

#[test]
fn overlapping_prefixes_hold_the_longest_tail() {
    // "aab" must be found although the text first looks like "aa" + "a...".
    let mut c = StopChecker::new(&EOS, &stop_params(&["aab"], 100));
    let (all, steps, fin) = run(&mut c, &[(1, "xa"), (2, "a"), (3, "a"), (4, "b")]);
    assert_eq!(steps, ["x", "", "a", ""]);
    assert_eq!((all.as_str(), fin), ("xa", Some(FinishReason::Stop)));
}

#[test]
fn eos_and_stop_token_ids() {
    let mut c = StopChecker::new(&EOS, &stop_params(&["END"], 100));
    let (all, _, fin) = run(&mut c, &[(1, "Hi E"), (128009, "<|eot_id|>")]);
    assert_eq!((all.as_str(), fin), ("Hi E", Some(FinishReason::Stop)));
    // ignore_eos keeps going (and emits the eos text); stop_token_ids still stop.
    let p = SamplingParams { ignore_eos: true, stop_token_ids: vec![7], ..stop_params(&[], 100) };
    let mut c = StopChecker::new(&EOS, &p);
    let (all, _, fin) = run(&mut c, &[(128001, "<|end_of_text|>"), (2, " more"), (7, "SEVEN"), (3, "z")]);
    assert_eq!((all.as_str(), fin), ("<|end_of_text|> more", Some(FinishReason::Stop)));
    assert_eq!(c.num_tokens(), 3);
}

#[test]
fn max_tokens_gives_length_and_flushes() {
    let mut c = StopChecker::new(&EOS, &stop_params(&["STOP"], 3));
    let (all, steps, fin) = run(&mut c, &[(1, "a"), (2, "b"), (3, "cST"), (4, "OP")]);
    assert_eq!(steps, ["a", "b", "cST"]);
    assert_eq!((all.as_str(), fin), ("abcST", Some(FinishReason::Length)));
    assert_eq!(c.finished(), Some(FinishReason::Length));
    // A stop at the last allowed token is a Stop, not Length.
    let mut c = StopChecker::new(&EOS, &stop_params(&["STOP"], 2));
    let (all, _, fin) = run(&mut c, &[(1, "aST"), (2, "OP")]);
    assert_eq!((all.as_str(), fin), ("a", Some(FinishReason::Stop)));
    let mut c = StopChecker::new(&EOS, &stop_params(&[], 1));
    assert_eq!(c.push(128001, "x").finished, Some(FinishReason::Stop));
}

#[test]
fn multibyte_text_is_split_on_char_boundaries() {
    let mut c = StopChecker::new(&EOS, &stop_params(&["é!"], 100));
    let (all, steps, fin) = run(&mut c, &[(1, "café"), (2, " ça é"), (3, "t"), (4, "é"), (5, "!")]);
    assert_eq!(steps, ["caf", "é ça ", "ét", "", ""]);
    assert_eq!((all.as_str(), fin), ("café ça ét", Some(FinishReason::Stop)));
}
