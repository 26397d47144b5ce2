//! The per-sequence [`Sampler`]: logit bias, penalties, temperature, min-p, top-k, top-p and the seeded draw.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::SamplingParams;

/// Index of the largest value; the lowest index wins ties, NaN never wins (`+inf` does).
/// Returns 0 for an empty or all-NaN slice.
pub fn argmax(logits: &[f32]) -> u32 {
    let Some(first) = logits.iter().position(|x| !x.is_nan()) else {
        return 0;
    };
    let (mut best_i, mut best) = (first, logits[first]);
    for (i, &x) in logits.iter().enumerate().skip(first + 1) {
        // NaN compares false, so it never replaces the best; ties keep the lower index.
        if x > best {
            best_i = i;
            best = x;
        }
    }
    best_i as u32
}

/// Descending logit, then ascending id: the total order used by top-k and top-p.
fn by_logit_desc(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// One sequence's sampler: its parameters, its seeded random stream and the token counts the penalties need.
///
/// The full algorithm is specified in the [module docs](super).
#[derive(Clone, Debug)]
pub struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    frequency_penalty: f32,
    presence_penalty: f32,
    /// `(id, bias)`, ids strictly increasing ([`SamplingParams::logit_bias`]).
    logit_bias: Vec<(u32, f32)>,
    /// [`SamplingParams::min_tokens`], and the ids kept from being drawn until then ([`Sampler::with_eos_ids`]).
    min_tokens: usize,
    min_tokens_banned: Vec<u32>,
    /// [`SamplingParams::ignore_eos`]: [`Sampler::with_eos_ids`] then adds nothing.
    ignore_eos: bool,
    rng: ChaCha20Rng,
    /// The prompt's distinct tokens in increasing order, under a repetition penalty (the one penalty that reads
    /// them): with the output's tokens (`counts`), the tokens it penalizes.
    prompt_ids: Vec<u32>,
    /// Occurrences of each token in the output (frequency and presence penalties), in id order.
    counts: BTreeMap<u32, u32>,
    n_output: usize,
    /// Reused buffers: the penalized row and the candidate list.
    row: Vec<f32>,
    cand: Vec<(f32, u32)>,
    wts: Vec<f64>,
}

impl Sampler {
    /// A sampler for one sequence whose prompt is `prompt_ids`. The random stream is ChaCha20 seeded with
    /// `SeedableRng::seed_from_u64(seed)`, or from OS entropy when `params.seed` is `None`.
    pub fn new(params: &SamplingParams, prompt_ids: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha20Rng::seed_from_u64(seed),
            None => rand::make_rng::<ChaCha20Rng>(),
        };
        Sampler {
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            min_p: params.min_p,
            repetition_penalty: params.repetition_penalty,
            frequency_penalty: params.frequency_penalty,
            presence_penalty: params.presence_penalty,
            logit_bias: params.logit_bias.clone(),
            min_tokens: params.min_tokens,
            min_tokens_banned: if params.min_tokens > 0 { super::stop_ids(&[], params) } else { Vec::new() },
            ignore_eos: params.ignore_eos,
            rng,
            prompt_ids: if params.repetition_penalty != 1.0 {
                let mut ids = prompt_ids.to_vec();
                ids.sort_unstable();
                ids.dedup();
                ids
            } else {
                Vec::new()
            },
            counts: BTreeMap::new(),
            n_output: 0,
            row: Vec::new(),
            cand: Vec::new(),
            wts: Vec::new(),
        }
    }

    /// Adds the model's EOS ids (unless `ignore_eos`) to the ids that cannot be drawn before `min_tokens` tokens
    /// (`stop_token_ids` are always among them): [`super::stop_ids`], as [`super::StopChecker`] counts them.
    /// Without `min_tokens`, no effect.
    pub fn with_eos_ids(mut self, eos_ids: &[u32]) -> Self {
        if self.min_tokens > 0 && !self.ignore_eos {
            self.min_tokens_banned = super::with_ids(std::mem::take(&mut self.min_tokens_banned), eos_ids);
        }
        self
    }

    /// The ids whose logits are `-inf` for the next draw: the stop ids while fewer than `min_tokens` tokens have
    /// been generated, else none.
    pub fn banned_now(&self) -> &[u32] {
        if self.n_output < self.min_tokens {
            &self.min_tokens_banned
        } else {
            &[]
        }
    }

    /// Whether this sampler decodes greedily (`temperature < 1e-5`).
    pub fn is_greedy(&self) -> bool {
        self.temperature < super::GREEDY_TEMPERATURE_EPS
    }

    /// Number of output tokens recorded so far (by [`sample`](Self::sample) or [`accept`](Self::accept)).
    pub fn num_output_tokens(&self) -> usize {
        self.n_output
    }

    /// Picks the next token from one logits row (one entry per vocabulary id) and records it for the
    /// penalties. Greedy samplers return the argmax of the penalized row; others consume one `u64` of
    /// their random stream.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let mut row = std::mem::take(&mut self.row);
        let penalized: &[f32] = if self.penalties_active() {
            row.clear();
            row.extend_from_slice(logits);
            self.apply_penalties(&mut row);
            &row
        } else {
            logits
        };
        let id = if self.is_greedy() {
            argmax(penalized)
        } else {
            let u = self.next_uniform();
            let mut cand = std::mem::take(&mut self.cand);
            let mut wts = std::mem::take(&mut self.wts);
            self.candidates(penalized, &mut cand);
            let id = draw(&cand, self.temperature, u, &mut wts);
            self.cand = cand;
            self.wts = wts;
            id
        };
        self.row = row;
        self.accept(id);
        id
    }

    /// Whether [`apply_penalties`](Self::apply_penalties) can change anything.
    fn penalties_active(&self) -> bool {
        !self.logit_bias.is_empty()
            || !self.banned_now().is_empty()
            || (self.repetition_penalty != 1.0 && !(self.prompt_ids.is_empty() && self.counts.is_empty()))
            || ((self.frequency_penalty != 0.0 || self.presence_penalty != 0.0) && !self.counts.is_empty())
    }

    /// What the penalties read, in increasing id order: the prompt's distinct tokens (only under a repetition
    /// penalty, the one penalty that reads them) and each output token's occurrences, with the number of output
    /// tokens recorded. Kept as the tokens come, so that a device sampler's penalty lists need no sort of the whole
    /// history each step.
    pub fn history(&self) -> (&[u32], impl Iterator<Item = (u32, u32)> + '_, usize) {
        (&self.prompt_ids, self.counts.iter().map(|(&id, &n)| (id, n)), self.n_output)
    }

    /// Records `id` as generated without sampling it (a forced token); it then counts for the penalties.
    pub fn accept(&mut self, id: u32) {
        *self.counts.entry(id).or_insert(0) += 1;
        self.n_output += 1;
    }

    /// The next uniform number in `[0, 1)` of this sequence's stream: `(next_u64() >> 11) * 2^-53`.
    /// [`sample`](Self::sample) calls this once per non-greedy draw.
    pub fn next_uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Adds the logit bias, then applies the repetition, frequency and presence penalties to `logits` in place, and
    /// sets the logits of [`banned_now`](Self::banned_now) to `-inf`, exactly as [`sample`](Self::sample) does. Ids
    /// outside the row are ignored.
    pub fn apply_penalties(&self, logits: &mut [f32]) {
        // A zero bias is no bias (adding +0 would turn -0 into +0), as in the GPU sampler.
        for &(id, b) in self.logit_bias.iter().filter(|&&(_, b)| b != 0.0) {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += b;
            }
        }
        let r = self.repetition_penalty;
        if r != 1.0 {
            // Every token of the prompt or the output, once.
            let output_only = self.counts.keys().filter(|id| self.prompt_ids.binary_search(id).is_err());
            for &id in self.prompt_ids.iter().chain(output_only) {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / r } else { *l * r };
                }
            }
        }
        let (f, p) = (self.frequency_penalty, self.presence_penalty);
        if f != 0.0 || p != 0.0 {
            for (&id, &count) in &self.counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= f * count as f32;
                    *l -= p;
                }
            }
        }
        for &id in self.banned_now() {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }

    /// The distribution [`sample`](Self::sample) would draw from for this row, without drawing or recording:
    /// `(id, probability)` pairs of the tokens that survive every filter, in ascending id order, summing to 1.
    /// For a greedy sampler it is the single argmax token with probability 1.
    pub fn distribution(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let mut row = logits.to_vec();
        self.apply_penalties(&mut row);
        if self.is_greedy() {
            return vec![(argmax(&row), 1.0)];
        }
        let mut cand = Vec::new();
        self.candidates(&row, &mut cand);
        let mut w = Vec::new();
        let z = weights(&cand, self.temperature, &mut w);
        cand.iter().zip(&w).map(|(&(_, id), &w)| (id, w / z)).collect()
    }

    /// Fills `cand` with the `(logit, id)` pairs that survive min-p, top-k and top-p, in ascending id order
    /// (never empty for a non-empty row). Logits are the penalized ones, before temperature.
    fn candidates(&self, row: &[f32], cand: &mut Vec<(f32, u32)>) {
        cand.clear();
        // Step 3: drop NaN/-inf, clamp +inf, fold -0.0 into 0.0.
        let mut m = f32::NEG_INFINITY;
        for &l in row {
            if !l.is_nan() && l > m {
                m = l;
            }
        }
        if m == f32::NEG_INFINITY {
            // Nothing can be sampled: fall back to the greedy choice.
            cand.push((0.0, argmax(row)));
            return;
        }
        let m = m.min(f32::MAX);
        let t = self.temperature as f64;
        // Step 4: min-p, on the scaled logit s = (l - m) / T >= ln(min_p).
        let min_s = if self.min_p > 0.0 { (self.min_p as f64).ln() } else { f64::NEG_INFINITY };
        for (i, &l) in row.iter().enumerate() {
            if l.is_nan() || l == f32::NEG_INFINITY {
                continue;
            }
            let l = if l == 0.0 { 0.0 } else { l.min(f32::MAX) };
            if min_s > f64::NEG_INFINITY && (l as f64 - m as f64) / t < min_s {
                continue;
            }
            cand.push((l, i as u32));
        }
        // Step 5: top-k by partial selection, then back to id order.
        let k = self.top_k;
        if k > 0 && k < cand.len() {
            cand.select_nth_unstable_by(k - 1, by_logit_desc);
            cand.truncate(k);
            cand.sort_unstable_by_key(|&(_, id)| id);
        }
        // Step 6: top-p.
        if self.top_p < 1.0 && cand.len() > 1 {
            let keep = top_p_prefix(cand, m, t, self.top_p as f64);
            cand.truncate(keep);
            cand.sort_unstable_by_key(|&(_, id)| id);
        }
    }
}

/// Unnormalized weight `exp((l - m) / T)` in `f64`.
fn weight(l: f32, m: f32, t: f64) -> f64 {
    ((l as f64 - m as f64) / t).exp()
}

/// Fills `w` with the weights of `cand` relative to its largest logit and returns their sum (in order).
fn weights(cand: &[(f32, u32)], temperature: f32, w: &mut Vec<f64>) -> f64 {
    let m = cand.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max);
    let t = temperature as f64;
    w.clear();
    w.extend(cand.iter().map(|&(l, _)| weight(l, m, t)));
    w.iter().sum()
}

/// Scaled logits below this share the lowest histogram bin of [`top_p_prefix`] (`exp(-60)` is ~1e-26).
const HIST_FLOOR: f64 = -60.0;
const HIST_BINS: usize = 2048;

/// With `Z` the weight sum of `cand` (given in ascending id order), reorders `cand` so that its leading
/// entries are in descending logit order (ties: lower id first) and returns the length of the shortest
/// such prefix whose running weight sum reaches `top_p * Z` (all if none does). A histogram of the scaled
/// logits bounds the prefix first, so only a superset of it is sorted; the running sum is always taken
/// over the exact sorted order.
fn top_p_prefix(cand: &mut [(f32, u32)], m: f32, t: f64, top_p: f64) -> usize {
    let n = cand.len();
    let scaled = |l: f32| (l as f64 - m as f64) / t;
    let lo = cand.iter().map(|&(l, _)| scaled(l)).fold(0.0f64, f64::min).max(HIST_FLOOR);
    let bin = |l: f32| {
        let s = scaled(l).max(lo);
        if lo >= 0.0 {
            0
        } else {
            (((s - lo) / -lo) * (HIST_BINS - 1) as f64) as usize
        }
    };
    let mut mass = [0.0f64; HIST_BINS];
    let mut z = 0.0f64;
    for &(l, _) in cand.iter() {
        let w = weight(l, m, t);
        z += w;
        mass[bin(l)] += w;
    }
    let target = top_p * z;
    // The bin where the binned mass reaches the target, widened by one bin to absorb rounding.
    let mut cum = 0.0;
    let mut first = 0;
    for b in (0..HIST_BINS).rev() {
        cum += mass[b];
        if cum >= target {
            first = b.saturating_sub(1);
            break;
        }
    }
    // Move the superset (every token in bins >= first: a prefix of the sorted order) to the front.
    let mut len = 0;
    for i in 0..n {
        if bin(cand[i].0) >= first {
            cand.swap(len, i);
            len += 1;
        }
    }
    for span in [len, n] {
        cand[..span].sort_unstable_by(by_logit_desc);
        let mut cum = 0.0f64;
        for (j, &(l, _)) in cand[..span].iter().enumerate() {
            cum += weight(l, m, t);
            if cum >= target {
                return j + 1;
            }
        }
    }
    n
}

/// Inverse-CDF draw over `cand` (ascending id order) with weights `exp((l - max) / T)`; `w` is scratch.
fn draw(cand: &[(f32, u32)], temperature: f32, u: f64, w: &mut Vec<f64>) -> u32 {
    let target = u * weights(cand, temperature, w);
    let mut acc = 0.0f64;
    for (&(_, id), &wi) in cand.iter().zip(w.iter()) {
        acc += wi;
        if target < acc {
            return id;
        }
    }
    // Only reachable through rounding: the last candidate.
    cand.last().map_or(0, |c| c.1)
}
