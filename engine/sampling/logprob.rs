//! Log-probabilities of a token under a logits row ([`token_logprob`]): the log-softmax, the most likely
//! alternatives and the rank, in one vocabulary pass each, vectorized (the host twin of the CUDA scoring kernel;
//! the serving engine scores every sampled row that wants logprobs and every prompt row of `prompt_logprobs`
//! with it on backends that hand it the logits).

/// A token's log-probability and its most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The token id.
    pub id: u32,
    /// Its log-probability under the model's distribution (log-softmax of the raw logits).
    pub logprob: f32,
    /// The number of tokens at least as likely as it, itself included (vLLM's `rank`: ties share the worse one).
    pub rank: u32,
    /// The most likely tokens at this position, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// `e^x` for `x <= 0` in a form compilers vectorize: `2^n · 2^f`, with `n` the nearest integer to `x·log2(e)`
/// (clamped at -126: smaller terms are negligible next to the maximum's 1) and `2^f = e^(f ln 2)`, `|f| <= 1/2`,
/// from its degree-6 Taylor polynomial (relative error below 2e-7). NaN gives 2^-126.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    // 1.5 · 2^23: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E;
    let t = if t > -126.0 { t } else { -126.0 };
    let r = t + ROUND;
    let f = (t - (r - ROUND)) * std::f32::consts::LN_2;
    let p = 1.0 + f * (1.0 + f * (0.5 + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0))))));
    // n + 127 as the exponent field: the bits of r are those of ROUND plus n.
    let scale = r.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23;
    p * f32::from_bits(scale)
}

/// The largest value of `v` that is not NaN (`-inf` when there is none), in eight lanes.
fn max_not_nan(v: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut it = v.chunks_exact(8);
    for c in &mut it {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    it.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// `ln Σ e^(v - m)` over the values of `v` (NaN ones add nothing measurable), for `m` their maximum: f32 terms
/// summed in eight lanes over blocks of 512, the blocks in f64. Runs the AVX2 build where the CPU has AVX2; both
/// builds do the same operations in the same order (no FMA contraction), so their results are identical.
fn log_sum_exp_below(v: &[f32], m: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above), the only requirement of `log_sum_exp_avx2`.
            return unsafe { log_sum_exp_avx2(v, m) };
        }
    }
    log_sum_exp_body(v, m)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn log_sum_exp_avx2(v: &[f32], m: f32) -> f64 {
    log_sum_exp_body(v, m)
}

#[inline(always)]
fn log_sum_exp_body(v: &[f32], m: f32) -> f64 {
    let mut total = 0f64;
    for block in v.chunks(512) {
        let mut lanes = [0f32; 32];
        let mut it = block.chunks_exact(32);
        for c in &mut it {
            for (l, &x) in lanes.iter_mut().zip(c) {
                *l += exp_nonpositive(x - m);
            }
        }
        let rest: f64 = it.remainder().iter().map(|&x| exp_nonpositive(x - m) as f64).sum();
        total += rest + lanes.iter().map(|&x| x as f64).sum::<f64>();
    }
    total.ln()
}

/// Log-probability of `id` and the `top` most likely ids under `softmax(logits)`: the log-sum-exp in f32 terms with
/// f64 sums (absolute error about 1e-6), one vocabulary pass each for it, the alternatives and the rank.
pub fn token_logprob(logits: &[f32], id: u32, top: usize) -> TokenLogprob {
    let max = max_not_nan(logits);
    let m = max as f64;
    let lse = if m.is_finite() { m + log_sum_exp_below(logits, max) } else { m };
    let lp = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { (v as f64 - lse) as f32 };
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        // Keep the `top` largest, ties broken by lower id, with one sorted insertion per candidate that beats the
        // current worst.
        // Blocks whose maximum does not beat the worst kept value (most of them, once `top` are kept) are skipped.
        for (b, block) in logits.chunks(64).enumerate() {
            if best.len() == top && max_not_nan(block) <= best[top - 1].1 {
                continue;
            }
            for (j, &v) in block.iter().enumerate() {
                if v.is_nan() || (best.len() == top && v <= best[top - 1].1) {
                    continue;
                }
                let at = best.partition_point(|&(_, b)| b >= v);
                best.insert(at, ((b * 64 + j) as u32, v));
                best.truncate(top);
            }
        }
    }
    let rank = match logits.get(id as usize) {
        Some(&v) if !v.is_nan() => logits.iter().filter(|&&x| x >= v).count(),
        // Outside the vocabulary (a vision model's image token) or NaN: after every scored token.
        _ => 1 + logits.iter().filter(|x| !x.is_nan()).count(),
    };
    TokenLogprob {
        id,
        rank: rank as u32,
        logprob: logits.get(id as usize).map_or(f32::NEG_INFINITY, |&v| lp(v)),
        top: best.into_iter().map(|(i, v)| (i, lp(v))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_log_softmax_with_sorted_alternatives() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, f32::NAN, -1.0];
        let lp = token_logprob(&logits, 2, 3);
        let z: f64 = [1.0f64, 3.0, 2.0, 3.0, -1.0].iter().map(|v| v.exp()).sum();
        assert!((lp.logprob as f64 - (2.0 - z.ln())).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        assert!((lp.top[0].1 as f64 - (3.0 - z.ln())).abs() < 1e-6);
        assert_eq!(lp.rank, 3);
        assert_eq!(token_logprob(&logits, 1, 0).rank, 2, "a tie shares the worse rank, as in vLLM");
        assert_eq!(token_logprob(&logits, 5, 0).rank, 5);
        assert!(token_logprob(&logits, 0, 0).top.is_empty());
        assert_eq!(token_logprob(&logits, 4, 1).logprob, f32::NEG_INFINITY);
    }

    /// The vectorized log-sum-exp against an f64 one on a full vocabulary of logits spread like a model's (and a
    /// few -inf, as a mask would leave), and the alternatives against a sort.
    #[test]
    fn fast_log_softmax_matches_f64() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for spread in [0.5f32, 3.0, 30.0] {
            let mut logits: Vec<f32> = (0..128_256).map(|_| rng.random_range(-1.0f32..1.0) * spread).collect();
            for k in 0..10 {
                logits[k * 9973] = f32::NEG_INFINITY;
            }
            let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            let lse = max + logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            for id in [1u32, 17, 5000, 128_255, order[0] as u32, order[7] as u32] {
                let lp = token_logprob(&logits, id, 8);
                let want = logits[id as usize] as f64 - lse;
                assert!((lp.logprob as f64 - want).abs() < 2e-6 * want.abs().max(1.0), "spread {spread}, id {id}");
                let ids: Vec<usize> = lp.top.iter().map(|t| t.0 as usize).collect();
                assert_eq!(ids, order[..8], "spread {spread}");
                let rank = logits.iter().filter(|&&x| x >= logits[id as usize]).count();
                assert_eq!(lp.rank as usize, rank);
            }
        }
    }
}
