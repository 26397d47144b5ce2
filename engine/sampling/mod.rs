//! Next-token selection and stop handling: the exact CPU reference for GPU sampling.
//!
//! [`SamplingParams`] is the per-request configuration (OpenAI/vLLM field names and semantics),
//! [`Sampler`] turns one logits row into one token id, and [`StopChecker`] decides when a sequence is
//! finished and which decoded text may be streamed so far.
//!
//! # The sampling pipeline (vLLM v1 order)
//!
//! For a logits row `l` (one `f32` per vocabulary entry), [`Sampler::sample`] does:
//!
//! 1. **Logit bias and penalties**, in `f32`, in this order (see [`Sampler::apply_penalties`]):
//!    * logit bias (OpenAI `logit_bias`): `l = l + b` for each listed token (vLLM applies it before the
//!      penalties too);
//!    * repetition (HF/vLLM): for every token that occurs in the prompt or in the output so far,
//!      `l = if l > 0 { l / r } else { l * r }`;
//!    * frequency (OpenAI): `l = l - f * count` where `count` is the token's number of occurrences in
//!      the output (`f * count` computed in `f32`);
//!    * presence (OpenAI): `l = l - p` for every token that occurs at least once in the output;
//!    * `min_tokens` (vLLM): while fewer than `min_tokens` tokens have been generated, the stop ids'
//!      logits become `-inf` ([`Sampler::banned_now`]).
//! 2. **Greedy** if `temperature < 1e-5` (vLLM's epsilon; `0` is the documented "greedy" value):
//!    the result is [`argmax`] of the penalized row and no random number is consumed.
//! 3. Otherwise, in `f64`: NaN and `-inf` logits are excluded, `+inf` is treated as `f32::MAX`, `-0.0`
//!    as `0.0`. With `m` the largest remaining logit, each token gets the scaled logit
//!    `s = (l - m) / T` (so `s <= 0`) and the unnormalized weight `w = exp(s)`.
//! 4. **min-p**: keep tokens with `s >= ln(min_p)`, i.e. `p >= min_p * p_max`.
//! 5. **top-k**: keep the `k` largest logits, ties broken by lower token id (exactly `k` tokens).
//! 6. **top-p**: with `Z` the sum of the surviving weights in ascending id order, walk the survivors in
//!    descending logit order (ties: lower id first) accumulating weights, and keep the shortest prefix
//!    whose sum reaches `top_p * Z` (always at least one token).
//! 7. **Draw**: one uniform `u` in `[0, 1)` is taken from the sequence's ChaCha20 stream
//!    (`(next_u64() >> 11) * 2^-53`); with `Z'` the sum of the kept weights in ascending id order, the
//!    result is the first kept token, in ascending id order, whose running weight sum exceeds `u * Z'`.
//!
//! Every non-greedy call consumes exactly one `u64` from the stream, so a fixed seed and fixed logits
//! give the same ids on every run (the only platform dependence is the last-ulp behavior of `f64::exp`).
//! The cost is `O(V)` plus `O(k log k)` for a small `top_k`; top-p without top-k first bounds the nucleus
//! with a histogram of the scaled logits and sorts only that superset (`O(V log V)` in the worst case).

mod logprob;
mod sampler;
mod stop;

pub use logprob::{token_logprob, TokenLogprob};
pub use sampler::{argmax, Sampler};
pub use stop::{FinishReason, StopChecker, StopStep};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The tokens a row may pick (structured outputs): a bitset over the vocabulary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenMask {
    bits: Vec<u64>,
    len: usize,
}

impl TokenMask {
    /// A mask of `len` tokens allowing none.
    pub fn new(len: usize) -> Self {
        TokenMask { bits: vec![0; len.div_ceil(64)], len }
    }

    /// Allows token `id` (ids past the vocabulary are ignored).
    pub fn allow(&mut self, id: u32) {
        if (id as usize) < self.len {
            self.bits[id as usize / 64] |= 1 << (id % 64);
        }
    }

    /// Whether token `id` is allowed.
    pub fn allows(&self, id: u32) -> bool {
        (id as usize) < self.len && self.bits[id as usize / 64] >> (id % 64) & 1 == 1
    }

    /// The bitset: bit `id % 64` of word `id / 64` is set when token `id` is allowed (no bit at or past the
    /// mask's length is set).
    pub fn words(&self) -> &[u64] {
        &self.bits
    }

    /// Sets the logits of every token it does not allow to `-inf`.
    pub fn apply(&self, logits: &mut [f32]) {
        for (i, l) in logits.iter_mut().enumerate() {
            if !self.allows(i as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// Temperatures below this are treated as greedy (vLLM's `_SAMPLING_EPS`).
pub const GREEDY_TEMPERATURE_EPS: f32 = 1e-5;

/// Per-request sampling and stopping configuration. Missing fields in JSON take their [`Default`] values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; `0` (anything below [`GREEDY_TEMPERATURE_EPS`]) means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` turns it off (values above the vocabulary size are clamped).
    pub top_k: usize,
    /// Nucleus sampling mass in `(0, 1]`; `1` turns it off.
    pub top_p: f32,
    /// Keep tokens with probability `>= min_p * max_prob`; `0` turns it off.
    pub min_p: f32,
    /// HF/vLLM repetition penalty over prompt and output tokens (`> 1` discourages repeats); `1` turns it off.
    pub repetition_penalty: f32,
    /// OpenAI frequency penalty in `[-2, 2]`: subtracts `frequency_penalty * count` (output tokens only).
    pub frequency_penalty: f32,
    /// OpenAI presence penalty in `[-2, 2]`: subtracts it once from every token present in the output.
    pub presence_penalty: f32,
    /// Seed of the sequence's random stream; `None` seeds from OS entropy.
    pub seed: Option<u64>,
    /// Maximum number of generated tokens (the stop token included).
    pub max_tokens: usize,
    /// Stop strings: generation ends when the output text contains one; it is not emitted.
    pub stop: Vec<String>,
    /// Token ids that end generation (in addition to the model's EOS ids); their text is not emitted.
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past the model's EOS ids (`stop_token_ids` still apply).
    pub ignore_eos: bool,
    /// OpenAI `logit_bias`: `(token id, bias)` pairs, ids strictly increasing, each bias in
    /// [-[`MAX_LOGIT_BIAS`], [`MAX_LOGIT_BIAS`]], added to the token's logit before the penalties.
    pub logit_bias: Vec<(u32, f32)>,
    /// vLLM's `min_tokens`: until this many tokens are generated, the stop ids (the model's EOS ids unless
    /// `ignore_eos`, and `stop_token_ids`) cannot be sampled (their logits are `-inf`) and stop strings do not end
    /// the sequence. At most `max_tokens`.
    pub min_tokens: usize,
}

/// The ids that end a sequence with `params`: `stop_token_ids`, and `eos_ids` unless `ignore_eos`; sorted, each
/// once.
pub fn stop_ids(eos_ids: &[u32], params: &SamplingParams) -> Vec<u32> {
    with_ids(params.stop_token_ids.clone(), if params.ignore_eos { &[] } else { eos_ids })
}

/// `ids` with `more` added, sorted, each once: how [`stop_ids`] (and the sampler's `min_tokens` list, built in two
/// steps) gather the stop ids.
pub(crate) fn with_ids(mut ids: Vec<u32>, more: &[u32]) -> Vec<u32> {
    ids.extend_from_slice(more);
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The largest `|bias|` of [`SamplingParams::logit_bias`] (OpenAI's range, -100 to 100).
pub const MAX_LOGIT_BIAS: f32 = 100.0;

/// Most stop strings per request (OpenAI takes 4; vLLM has no bound): each is checked after every token.
pub const MAX_STOP_STRINGS: usize = 64;

/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 1024;

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            max_tokens: 256,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logit_bias: Vec::new(),
            min_tokens: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with every filter and penalty off (same as [`Default`]).
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Whether these parameters select greedy decoding (`temperature < 1e-5`).
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE_EPS
    }

    /// Whether any repetition, frequency or presence penalty is on.
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0
    }

    /// Greedy with no penalties, no logit bias and no `min_tokens`: the next id is the plain argmax of the logits,
    /// so a backend may pick it alone.
    pub fn is_plain_greedy(&self) -> bool {
        self.is_greedy() && !self.has_penalties() && self.logit_bias.is_empty() && self.min_tokens == 0
    }

    /// Checks every field against its allowed range; the error names the field, the range and the value.
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        fn check(ok: bool, field: &str, range: &str, value: f32) -> Result<()> {
            if ok {
                Ok(())
            } else {
                Err(Error::request(format!("{field} must be {range}, got {value}")))
            }
        }
        let t = self.temperature;
        check(t.is_finite() && t >= 0.0, "temperature", "a finite number >= 0", t)?;
        let p = self.top_p;
        check(p > 0.0 && p <= 1.0, "top_p", "in (0, 1]", p)?;
        let m = self.min_p;
        check((0.0..=1.0).contains(&m), "min_p", "in [0, 1]", m)?;
        let r = self.repetition_penalty;
        check(r.is_finite() && r > 0.0, "repetition_penalty", "a finite number > 0", r)?;
        let f = self.frequency_penalty;
        check((-2.0..=2.0).contains(&f), "frequency_penalty", "in [-2, 2]", f)?;
        let pp = self.presence_penalty;
        check((-2.0..=2.0).contains(&pp), "presence_penalty", "in [-2, 2]", pp)?;
        if self.max_tokens == 0 {
            return Err(Error::request("max_tokens must be at least 1, got 0"));
        }
        if self.min_tokens > self.max_tokens {
            return Err(Error::request(format!(
                "min_tokens must be at most max_tokens ({}), got {}",
                self.max_tokens, self.min_tokens
            )));
        }
        if let Some(i) = self.stop.iter().position(|s| s.is_empty()) {
            return Err(Error::request(format!("stop[{i}] must be a non-empty string")));
        }
        // Every generated token is checked against every stop string on the engine thread, which serves everyone.
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(Error::request(format!(
                "stop must hold at most {MAX_STOP_STRINGS} strings, got {}",
                self.stop.len()
            )));
        }
        if let Some(i) = self.stop.iter().position(|s| s.len() > MAX_STOP_BYTES) {
            return Err(Error::request(format!(
                "stop[{i}] must be at most {MAX_STOP_BYTES} bytes long, got {}",
                self.stop[i].len()
            )));
        }
        if let Some(&id) = self.stop_token_ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(Error::request(format!(
                "stop_token_ids must be in [0, {vocab_size}) (the vocabulary size), got {id}"
            )));
        }
        for (i, &(id, bias)) in self.logit_bias.iter().enumerate() {
            if id as usize >= vocab_size {
                return Err(Error::request(format!(
                    "logit_bias: token id {id} must be in [0, {vocab_size}) (the vocabulary size)"
                )));
            }
            if i > 0 && self.logit_bias[i - 1].0 >= id {
                return Err(Error::request(format!("logit_bias: token ids must be strictly increasing, got {id}")));
            }
            let ok = bias.is_finite() && bias.abs() <= MAX_LOGIT_BIAS;
            check(ok, &format!("logit_bias[{id}]"), "in [-100, 100]", bias)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::TokenMask;

    #[test]
    fn a_mask_keeps_only_its_tokens() {
        let mut m = TokenMask::new(130);
        for id in [0, 63, 64, 129, 500] {
            m.allow(id);
        }
        assert!(m.allows(63) && m.allows(64) && m.allows(129) && !m.allows(1) && !m.allows(500));
        let mut row: Vec<f32> = (0..130).map(|i| i as f32).collect();
        m.apply(&mut row);
        let kept: Vec<usize> = row.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, _)| i).collect();
        assert_eq!(kept, [0, 63, 64, 129]);
        assert_eq!(crate::sampling::argmax(&row), 129);
    }
}
