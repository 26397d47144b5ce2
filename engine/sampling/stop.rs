//! Stop conditions and stream-safe text emission: EOS / stop token ids, stop strings, `max_tokens`.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::SamplingParams;

/// Why a sequence finished (OpenAI's `finish_reason`); serializes as `"stop"` / `"length"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An EOS id, a stop token id or a stop string ended generation.
    Stop,
    /// `max_tokens` tokens were generated.
    Length,
}

impl FinishReason {
    /// The OpenAI spelling: `"stop"` or `"length"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of feeding one token to a [`StopChecker`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopStep {
    /// Text that is final and may be streamed now (possibly empty).
    pub emit: String,
    /// `Some` once the sequence is finished; `emit` then holds all the remaining text.
    pub finished: Option<FinishReason>,
}

/// Decides when a sequence stops and which decoded text is safe to stream.
///
/// Rules: a token in the EOS ids (unless `ignore_eos`) or in `stop_token_ids` finishes with
/// [`FinishReason::Stop`] and its own text is not emitted; a stop string (which may span several tokens)
/// finishes with `Stop` and neither it nor anything after it is emitted; otherwise the `max_tokens`-th
/// token finishes with [`FinishReason::Length`]. Until then, a tail of the text that could be the start
/// of a stop string is held back. Before the `min_tokens`-th token neither stop ids nor stop strings end the
/// sequence (vLLM's rule; the sampler keeps the stop ids from being drawn then).
#[derive(Clone, Debug)]
pub struct StopChecker {
    stop_ids: Vec<u32>,
    stop_strings: Vec<String>,
    max_tokens: usize,
    min_tokens: usize,
    n_tokens: usize,
    pending: String,
    finished: Option<FinishReason>,
}

impl StopChecker {
    /// A checker for one sequence; `eos_ids` are the model's end-of-sequence ids.
    pub fn new(eos_ids: &[u32], params: &SamplingParams) -> Self {
        StopChecker {
            stop_ids: super::stop_ids(eos_ids, params),
            stop_strings: params.stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            max_tokens: params.max_tokens,
            min_tokens: params.min_tokens,
            n_tokens: 0,
            pending: String::new(),
            finished: None,
        }
    }

    /// Feeds one generated id and the text newly decoded for it. Returns the text that is safe to emit now
    /// and, once the sequence is over, why. After that, further calls emit nothing and repeat the reason.
    pub fn push(&mut self, id: u32, new_text: &str) -> StopStep {
        if let Some(reason) = self.finished {
            return StopStep { emit: String::new(), finished: Some(reason) };
        }
        self.n_tokens += 1;
        // Before min_tokens nothing but max_tokens ends the sequence.
        let checks = self.n_tokens >= self.min_tokens;
        if checks && self.stop_ids.binary_search(&id).is_ok() {
            return self.end(FinishReason::Stop);
        }
        self.pending.push_str(new_text);
        if let Some(pos) = self.earliest_stop().filter(|_| checks) {
            self.pending.truncate(pos);
            return self.end(FinishReason::Stop);
        }
        if self.n_tokens >= self.max_tokens {
            return self.end(FinishReason::Length);
        }
        let keep_from = self.held_tail_start();
        let rest = self.pending.split_off(keep_from);
        let emit = std::mem::replace(&mut self.pending, rest);
        StopStep { emit, finished: None }
    }

    /// Flushes the held-back text (for a sequence ended by something else, e.g. cancellation or a full
    /// context). Returns an empty string after a finishing [`push`](Self::push).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Why the sequence finished, if it has.
    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Number of tokens pushed so far (the finishing one included).
    pub fn num_tokens(&self) -> usize {
        self.n_tokens
    }

    fn end(&mut self, reason: FinishReason) -> StopStep {
        self.finished = Some(reason);
        StopStep { emit: std::mem::take(&mut self.pending), finished: Some(reason) }
    }

    /// Byte offset of the earliest stop-string occurrence in the pending text. Text emitted earlier cannot
    /// hold the start of an occurrence, because any suffix that is a prefix of a stop string is held back.
    fn earliest_stop(&self) -> Option<usize> {
        self.stop_strings.iter().filter_map(|s| self.pending.find(s.as_str())).min()
    }

    /// Start of the longest suffix of the pending text that is a proper prefix of some stop string.
    fn held_tail_start(&self) -> usize {
        let text = self.pending.as_bytes();
        let mut hold = 0;
        for s in &self.stop_strings {
            let s = s.as_bytes();
            let longest = (s.len() - 1).min(text.len());
            for k in (hold + 1..=longest).rev() {
                if text.ends_with(&s[..k]) {
                    hold = k;
                    break;
                }
            }
        }
        let mut start = text.len() - hold;
        // A match always starts on a char boundary (a stop string starts with a leading byte); be safe anyway.
        while !self.pending.is_char_boundary(start) {
            start -= 1;
        }
        start
    }
}
