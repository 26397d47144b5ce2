//! Twin tests of the CUDA `logprobs` family against the CPU reference:
//! - `mask_logits` against `TokenMask::apply` on the bf16 rows widened to f32 (permissive, strict, empty and full
//!   masks on some rows of a buffer, one naming a row past it; the other rows must stay as they were): values must
//!   be equal;
//! - `token_logprobs` against `sampling::token_logprob` (random rows of every kind of `cuda_sampling::logits_row`,
//!   ids inside and past the vocabulary, 0 to 64 alternatives and each entry its own count, entries sharing rows,
//!   one entry past the buffer's rows): ranks and alternatives' ids must be equal, log-probabilities within 4e-6
//!   relative (the two log-sum-exps sum differently).
//!
//! Without a CUDA build or a device, each test prints "skipped: no CUDA device" and returns.

use half::bf16;
use llama32::ops::cuda::logprobs::{mask_logits, mask_words, token_logprobs, ScoredRows, MAX_TOP};
use llama32::sampling::{token_logprob, TokenMask};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::cuda_sampling::{download, logits_row, stream, to_f32, upload};

/// (vocab, rows): Llama 3's vocabulary and odd or tiny sizes.
const SHAPES: [(usize, usize); 6] = [(128_256, 40), (128_256, 3), (1, 4), (33, 9), (1000, 17), (4099, 5)];

/// A random mask over `vocab` of kind `kind`: permissive (90% allowed), strict (a few), none, all.
fn mask_of(rng: &mut ChaCha8Rng, vocab: usize, kind: usize) -> TokenMask {
    let mut m = TokenMask::new(vocab);
    match kind {
        0 => (0..vocab as u32).filter(|_| rng.random_range(0..10) != 0).for_each(|t| m.allow(t)),
        1 => (0..rng.random_range(1..6)).for_each(|_| m.allow(rng.random_range(0..vocab as u32))),
        2 => {}
        _ => (0..vocab as u32).for_each(|t| m.allow(t)),
    }
    m
}

#[test]
fn mask_logits_matches_token_mask() {
    let Some(stream) = stream() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
    for (vocab, rows) in SHAPES {
        let host: Vec<bf16> = (0..rows).flat_map(|r| logits_row(&mut rng, vocab, r % 10)).collect();
        // About half the rows masked, in a shuffled order.
        let mut masked: Vec<usize> = (0..rows).filter(|_| rng.random::<bool>()).collect();
        masked.reverse();
        let mut masks: Vec<TokenMask> = masked.iter().map(|&r| mask_of(&mut rng, vocab, r % 4)).collect();
        // A mask naming a row past the buffer: skipped, nothing written.
        masked.push(rows + 1);
        masks.push(TokenMask::new(vocab));
        let mut bits = Vec::new();
        masks.iter().for_each(|m| mask_words(m, vocab, &mut bits));
        let mut d_logits = upload(&stream, &host);
        let d_rows = upload(&stream, &masked.iter().map(|&r| r as u32).collect::<Vec<_>>());
        let d_bits = upload(&stream, &bits);
        mask_logits(&stream, &mut d_logits, vocab, &d_rows, &d_bits).expect("mask_logits");
        let got = to_f32(&download(&stream, &d_logits));
        for r in 0..rows {
            let mut want = to_f32(&host[r * vocab..(r + 1) * vocab]);
            if let Some(j) = masked.iter().position(|&m| m == r) {
                masks[j].apply(&mut want);
            }
            for (i, (&g, &w)) in got[r * vocab..(r + 1) * vocab].iter().zip(&want).enumerate() {
                assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "vocab {vocab}, row {r}, id {i}");
            }
        }
    }
}

#[test]
fn token_logprobs_match_cpu() {
    let Some(stream) = stream() else { return };
    let seed = rand::random();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (vocab, rows) in SHAPES {
        for top in [0usize, 1, 5, 20, MAX_TOP] {
            let host: Vec<bf16> = (0..rows).flat_map(|r| logits_row(&mut rng, vocab, r % 10)).collect();
            let widened = to_f32(&host);
            // Two entries a row, in a shuffled order: a random id (sometimes past the vocabulary) and the argmax.
            let mut entries: Vec<(u32, u32)> = Vec::new();
            for r in 0..rows {
                let row = &widened[r * vocab..(r + 1) * vocab];
                let id = if rng.random_range(0..8) == 0 { vocab as u32 + 3 } else { rng.random_range(0..vocab as u32) };
                entries.push((r as u32, id));
                entries.push((r as u32, llama32::sampling::argmax(row)));
            }
            entries.sort_by_key(|_| rng.random::<u32>());
            // Each entry its own number of alternatives (at most `top`), and one entry past the buffer's rows.
            let mut tops: Vec<i32> = entries.iter().map(|_| rng.random_range(0..=top as i32)).collect();
            entries.push((rows as u32 + 2, 0));
            tops.push(top as i32);
            let n = entries.len();
            let d_logits = upload(&stream, &host);
            let d_rows = upload(&stream, &entries.iter().map(|e| e.0).collect::<Vec<_>>());
            let d_ids = upload(&stream, &entries.iter().map(|e| e.1).collect::<Vec<_>>());
            let d_tops = upload(&stream, &tops);
            // Poisoned outputs: every entry must be written.
            let mut lp = upload(&stream, &vec![f32::NAN; n]);
            let mut rank = upload(&stream, &vec![u32::MAX - 1; n]);
            let mut top_ids = upload(&stream, &vec![u32::MAX - 1; (n * top).max(1)]);
            let mut top_lps = upload(&stream, &vec![f32::NAN; (n * top).max(1)]);
            {
                let mut out = ScoredRows {
                    logprob: &mut lp,
                    rank: &mut rank,
                    top_ids: &mut top_ids.slice_mut(..n * top),
                    top_logprobs: &mut top_lps.slice_mut(..n * top),
                };
                token_logprobs(&stream, &d_logits, vocab, &d_rows, &d_ids, Some(&d_tops), top, &mut out)
                    .expect("token_logprobs");
            }
            let host_out = (download(&stream, &lp), download(&stream, &rank));
            let (ti, tl) = (download(&stream, &top_ids), download(&stream, &top_lps));
            let outside = ScoredRows::entry((&host_out.0, &host_out.1, &ti, &tl), top, n - 1, 0, top);
            assert!(outside.logprob.is_nan() && outside.rank == 0 && outside.top.is_empty(), "row past the buffer");
            for (j, &(r, id)) in entries[..n - 1].iter().enumerate() {
                let row = &widened[r as usize * vocab..(r as usize + 1) * vocab];
                let want = token_logprob(row, id, tops[j] as usize);
                // Read with the whole stride: the slots past the entry's own count hold placeholders.
                let got = ScoredRows::entry((&host_out.0, &host_out.1, &ti, &tl), top, j, id, top);
                let at = format!("seed {seed}, vocab {vocab}, top {top}, entry {j} (row {r}, id {id})");
                assert_eq!(got.rank, want.rank, "{at}: rank");
                let ids = |l: &llama32::sampling::TokenLogprob| l.top.iter().map(|t| t.0).collect::<Vec<_>>();
                assert_eq!(ids(&got), ids(&want), "{at}: alternatives");
                let close = |g: f32, w: f32| {
                    g.to_bits() == w.to_bits()
                        || (g.is_nan() && w.is_nan())
                        || ((g - w).abs() as f64) <= 4e-6 * (w.abs() as f64).max(1.0)
                };
                assert!(close(got.logprob, want.logprob), "{at}: logprob {} vs {}", got.logprob, want.logprob);
                // The sign of a zero too (the kernel reads the winner's own logit).
                assert!(got.top.iter().zip(&want.top).all(|(g, w)| g.1 != 0.0 || g.1.to_bits() == w.1.to_bits()));
                for (g, w) in got.top.iter().zip(&want.top) {
                    assert!(close(g.1, w.1), "{at}: alternative {} logprob {} vs {}", w.0, g.1, w.1);
                }
            }
        }
    }
}

#[test]
fn logprobs_reject_bad_shapes() {
    let Some(stream) = stream() else { return };
    let logits = upload(&stream, &[bf16::ZERO; 20]);
    let (rows, ids) = (upload(&stream, &[0u32]), upload(&stream, &[1u32]));
    let mut lp = upload(&stream, &[0f32]);
    let mut rank = upload(&stream, &[0u32]);
    let mut ti = upload(&stream, &[0u32; 2]);
    let mut tl = upload(&stream, &[0f32; 2]);
    let mut out = ScoredRows { logprob: &mut lp, rank: &mut rank, top_ids: &mut ti, top_logprobs: &mut tl };
    let err = |r: llama32::Result<()>| r.unwrap_err().to_string();
    assert!(err(token_logprobs(&stream, &logits, 3, &rows, &ids, None, 2, &mut out)).contains("`logits`"));
    assert!(err(token_logprobs(&stream, &logits, 10, &rows, &ids, None, 3, &mut out)).contains("`out.top_ids`"));
    assert!(err(token_logprobs(&stream, &logits, 10, &rows, &ids, None, MAX_TOP + 1, &mut out)).contains("top is"));
    let two = upload(&stream, &[1i32, 1]);
    assert!(err(token_logprobs(&stream, &logits, 10, &rows, &ids, Some(&two), 2, &mut out)).contains("`entry_top`"));
    token_logprobs(&stream, &logits, 10, &rows, &ids, None, 2, &mut out).expect("matching shapes");
    let mut l = upload(&stream, &[bf16::ZERO; 20]);
    let bits = upload(&stream, &[0u32; 3]);
    assert!(err(mask_logits(&stream, &mut l, 10, &rows, &bits)).contains("`bits`"));
}
