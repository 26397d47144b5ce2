//! Scheduling policy for continuous batching: admission, chunked prefill under a token budget, and preemption by
//! recompute. The scheduler never touches tensors; it plans [`StepInput`]s over the [`KvManager`]'s block tables
//! and turns the picked ids into text and finished sequences.
//!
//! Each [`Scheduler::schedule`] call plans one step:
//! 1. **Decodes** first, one token per running sequence whose prompt is computed, in priority order (higher
//!    priority first, then earlier arrival). A sequence that needs a new block when none is left preempts the
//!    lowest-priority, latest-arrived running sequence (possibly itself): its blocks are freed and it goes back to
//!    the waiting queue with its generated tokens appended to its prompt, so nothing is lost.
//! 2. **Prefill chunks** of running sequences whose prompt is not yet computed, cut to the remaining budget.
//! 3. **Admission** from the waiting queue (higher priority first, FIFO within a priority) while the budget, the
//!    sequence cap and the free blocks allow; an admitted prompt reuses its cached prefix blocks. Nothing is admitted
//!    in a step that preempted.
//!
//! `n > 1` ([`Scheduler::add_request_n`]) shares the prompt's blocks through the prefix cache: the extra
//! completions are admitted once the first one's prompt is computed, hit its full blocks and recompute only the
//! partial last block, as vLLM V1 does. Forking with copy-on-write ([`KvManager::fork`]) would also share that
//! block, saving at most `block_size - 1` tokens of prefill per extra completion, at the price of a block-copy
//! operation in every executor; it is kept in the block manager but not used.

mod driver;

pub use driver::{plan_images, run_step, run_step_on_host, run_step_scored, run_to_completion};

use std::collections::HashMap;

use crate::config::LlamaConfig;
use crate::exec::generate::{build_step, Generation, LogitsWanted, SeqChunk};
use crate::exec::{SampleSeq, StepInput};
use crate::kv::prefix::{KvManager, KvMetrics, SeqId};
use crate::sampling::{FinishReason, Sampler, SamplingParams, StopChecker};
use crate::{Error, Result};

/// Scheduler limits and model facts.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most new tokens per step (decodes count one each; prefills are cut to fit).
    pub max_step_tokens: usize,
    /// Most running sequences.
    pub max_seqs: usize,
    /// The model's end-of-sequence ids.
    pub eos_ids: Vec<u32>,
    /// Context length: a sequence finishes with "length" when prompt + output reach it.
    pub max_model_len: usize,
    /// Vocabulary size (request validation).
    pub vocab_size: usize,
    /// Most logits rows per step for prompt log-probabilities ([`Scheduler::want_prompt_logits`]): a prompt that
    /// wants them is prefilled in chunks of at most this many tokens, so the `[rows, vocab]` logits stay bounded.
    /// With the sampled rows (at most `max_seqs`) a step has at most `max_seqs` + this many rows; 0 refuses prompt
    /// log-probabilities.
    pub max_prompt_logits_rows: usize,
}

/// Default [`SchedulerConfig::max_prompt_logits_rows`]: 512 rows of a 128256-token vocabulary are 131 MB of bf16
/// logits on a device (within the 1024 rows the CUDA memory plan reserves) and 263 MB as f32 on the host.
pub const DEFAULT_PROMPT_LOGITS_ROWS: usize = 512;

impl SchedulerConfig {
    /// Limits for a model: EOS ids, context length and vocabulary from `cfg`.
    pub fn new(cfg: &LlamaConfig, max_step_tokens: usize, max_seqs: usize) -> Self {
        SchedulerConfig {
            max_step_tokens,
            max_seqs,
            eos_ids: cfg.eos_token_ids.clone(),
            max_model_len: cfg.max_position_embeddings,
            vocab_size: cfg.vocab_size,
            max_prompt_logits_rows: DEFAULT_PROMPT_LOGITS_ROWS,
        }
    }
}

/// One sequence's share of a planned step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedChunk {
    /// The sequence.
    pub seq: SeqId,
    /// Position of the chunk's first token.
    pub start: usize,
    /// Number of tokens.
    pub len: usize,
    /// Whether the chunk ends the sequence's uncomputed tokens, so a next id is picked from its last logits row.
    pub sample: bool,
}

/// The images of a vision request's sequences (Llama 3.2 Vision).
#[derive(Clone, Debug, PartialEq)]
pub struct SeqVision {
    /// The image set's key with the executor ([`crate::exec::Executor::add_images`]).
    pub key: u64,
    /// Hash of the images: seeds the prefix-cache chain, so only requests with the same images share blocks.
    pub salt: u64,
    /// The prompt's cross-attention mask rows, `[prompt tokens, row_len]` (0/1).
    pub mask: std::sync::Arc<Vec<u8>>,
    /// `images * max_num_tiles`.
    pub row_len: usize,
}

/// A chunk's images in a plan: the key and the mask rows of the chunk's tokens (generated tokens repeat the
/// prompt's last row).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanImages {
    /// The image set's key.
    pub key: u64,
    /// `[chunk tokens, row_len]`.
    pub mask: Vec<u8>,
}

/// One planned step: the input to run and which sequence each part belongs to.
#[derive(Clone, Debug, PartialEq)]
pub struct StepPlan {
    /// The step, in the order of `chunks`.
    pub input: StepInput,
    /// Sequence `i` of `input` is `chunks[i]`.
    pub chunks: Vec<PlannedChunk>,
    /// Per chunk: its images (vision requests), or `None`.
    pub images: Vec<Option<PlanImages>>,
    /// The sequence of each sampled logits row, in order.
    pub logits_seqs: Vec<SeqId>,
    /// The logits row of each entry of `logits_seqs`. Without `prompt_rows` this is `0..logits_seqs.len()`.
    pub sample_rows: Vec<usize>,
    /// Runs of prompt rows whose logits score the prompt's next token (prompt log-probabilities).
    pub prompt_rows: Vec<PromptRows>,
}

impl StepPlan {
    /// Whether the plan has rows besides the sampled ones (they need the logits on the host).
    pub fn has_prompt_rows(&self) -> bool {
        !self.prompt_rows.is_empty()
    }
}

/// A run of logits rows of one sequence's prefill chunk that score its prompt: row `first_row + i` holds the
/// logits at position `start + i`, the distribution of prompt token `start + i + 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptRows {
    /// The sequence.
    pub seq: SeqId,
    /// Position of the first row's token.
    pub start: usize,
    /// Number of rows.
    pub len: usize,
    /// Index of the first row among the step's logits rows.
    pub first_row: usize,
}

/// A finished sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    /// The sequence.
    pub seq: SeqId,
    /// Its ids, text and finish reason.
    pub generation: Generation,
}

/// What [`Scheduler::update`] returns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepUpdate {
    /// Text that became final this step, per sequence (non-empty pieces only).
    pub deltas: Vec<(SeqId, String)>,
    /// Sequences that finished this step.
    pub finished: Vec<Finished>,
}

/// Counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedMetrics {
    /// Sequences waiting for admission.
    pub waiting: usize,
    /// Running sequences.
    pub running: usize,
    /// Preemptions so far.
    pub preemptions: u64,
    /// KV cache statistics.
    pub kv: KvMetrics,
}

struct Seq {
    /// Prompt, then generated ids; the last one is uncomputed while decoding.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose K/V is in the cache.
    computed: usize,
    priority: i32,
    params: SamplingParams,
    sampler: Sampler,
    stop: StopChecker,
    text: String,
    plain_greedy: bool,
    /// For the 2nd..nth sequence of an `n > 1` request: the first one, whose prompt must be computed (and its blocks
    /// cached) before this one is admitted, so that it shares the prompt's blocks.
    after: Option<SeqId>,
    vision: Option<SeqVision>,
    /// Its prompt is computed with logits for every row (prompt log-probabilities), bypassing the prefix cache;
    /// cleared once the whole prompt has been computed.
    prompt_logits: bool,
}

/// Continuous-batching scheduler over a [`KvManager`].
pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: KvManager,
    seqs: HashMap<SeqId, Seq>,
    /// Sorted by (priority desc, id asc); ids grow with arrival.
    waiting: Vec<SeqId>,
    /// Sorted like `waiting`.
    running: Vec<SeqId>,
    next_id: SeqId,
    preemptions: u64,
}

impl Scheduler {
    /// A scheduler with an empty queue over `kv` (whose geometry must match the executor's pool).
    pub fn new(cfg: SchedulerConfig, kv: KvManager) -> Result<Self> {
        if cfg.max_step_tokens == 0 || cfg.max_seqs == 0 {
            return Err(Error::request(format!(
                "scheduler: max_step_tokens ({}) and max_seqs ({}) must be at least 1",
                cfg.max_step_tokens, cfg.max_seqs
            )));
        }
        Ok(Scheduler {
            cfg,
            kv,
            seqs: HashMap::new(),
            waiting: Vec::new(),
            running: Vec::new(),
            next_id: 0,
            preemptions: 0,
        })
    }

    /// The model's end-of-sequence ids.
    pub fn eos_ids(&self) -> &[u32] {
        &self.cfg.eos_ids
    }

    /// The block manager (tables, metrics).
    pub fn kv(&self) -> &KvManager {
        &self.kv
    }

    /// Queue, running and cache counters.
    pub fn metrics(&self) -> SchedMetrics {
        SchedMetrics {
            waiting: self.waiting.len(),
            running: self.running.len(),
            preemptions: self.preemptions,
            kv: self.kv.metrics(),
        }
    }

    /// Whether any sequence is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Queues a request; higher `priority` is served first. Rejects requests that could never complete: bad
    /// parameters or ids, a prompt that fills the context, or more KV blocks than the whole cache holds.
    pub fn add_request(&mut self, prompt: Vec<u32>, params: SamplingParams, priority: i32) -> Result<SeqId> {
        self.check_request(&prompt, &params, None)?;
        let stop = StopChecker::new(&self.cfg.eos_ids, &params);
        Ok(self.push_seq(prompt, params, stop, priority, None, None))
    }

    /// Queues `n` completions of one prompt (OpenAI's `n`), returned as consecutive ids. The first is scheduled like
    /// [`add_request`](Self::add_request); the others wait until its prompt is computed and then take the prompt's
    /// full blocks from the prefix cache, recomputing only the partial last block. With a `seed`, completion `k`
    /// uses `seed + k`, so the completions differ but are reproducible.
    pub fn add_request_n(
        &mut self,
        prompt: Vec<u32>,
        params: SamplingParams,
        n: usize,
        priority: i32,
    ) -> Result<Vec<SeqId>> {
        self.add_request_with(prompt, params, n, priority, None)
    }

    /// [`add_request_n`](Self::add_request_n) for a request that may carry images (`vision`): its sequences'
    /// chunks come with their cross-attention mask rows in [`StepPlan::images`], and its prefix-cache chain is
    /// salted with the images' hash.
    pub fn add_request_with(
        &mut self,
        prompt: Vec<u32>,
        params: SamplingParams,
        n: usize,
        priority: i32,
        vision: Option<SeqVision>,
    ) -> Result<Vec<SeqId>> {
        if n == 0 {
            return Err(Error::request(format!("request {}: n must be at least 1, got 0", self.next_id)));
        }
        self.check_request(&prompt, &params, vision.as_ref())?;
        // One checker, cloned: the completions share its stop strings and their automata tables.
        let stop = StopChecker::new(&self.cfg.eos_ids, &params);
        let first = self.push_seq(prompt.clone(), params.clone(), stop.clone(), priority, None, vision.clone());
        let mut ids = vec![first];
        for k in 1..n {
            let p = SamplingParams { seed: params.seed.map(|s| s.wrapping_add(k as u64)), ..params.clone() };
            ids.push(self.push_seq(prompt.clone(), p, stop.clone(), priority, Some(first), vision.clone()));
        }
        Ok(ids)
    }

    fn check_request(&self, prompt: &[u32], params: &SamplingParams, vision: Option<&SeqVision>) -> Result<()> {
        let id = self.next_id;
        let at = |msg: String| Error::request(format!("request {id}: {msg}"));
        let vocab = self.cfg.vocab_size;
        params.validate(vocab).map_err(|e| match e {
            Error::Request(m) => at(m),
            other => other,
        })?;
        if prompt.is_empty() {
            return Err(at("empty prompt".into()));
        }
        if let Some(v) = vision {
            if v.row_len == 0 || v.mask.len() != prompt.len() * v.row_len {
                return Err(at(format!(
                    "cross-attention mask of {} values for {} prompt tokens x {} tiles",
                    v.mask.len(),
                    prompt.len(),
                    v.row_len
                )));
            }
        }
        // Vision models' embedding has rows past the vocabulary (the image token is the first).
        let rows = if vision.is_some() { vocab + crate::vision::config::EXTRA_EMBED_ROWS } else { vocab };
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= rows) {
            return Err(at(format!("token id {bad} is outside the vocabulary (size {vocab})")));
        }
        let max_len = self.cfg.max_model_len;
        if prompt.len() >= max_len {
            return Err(at(format!(
                "prompt of {} tokens leaves no room in the context length {max_len}",
                prompt.len()
            )));
        }
        // The cache holds every token but the last one generated.
        let most_cached = (prompt.len().saturating_add(params.max_tokens) - 1).min(max_len - 1);
        let (bs, nb) = (self.kv.block_size(), self.kv.num_blocks());
        if most_cached.div_ceil(bs) > nb {
            return Err(at(format!(
                "prompt of {} tokens + max_tokens {} needs {} KV blocks of {bs} tokens, the cache has {nb}",
                prompt.len(),
                params.max_tokens,
                most_cached.div_ceil(bs)
            )));
        }
        Ok(())
    }

    fn push_seq(
        &mut self,
        prompt: Vec<u32>,
        params: SamplingParams,
        stop: StopChecker,
        priority: i32,
        after: Option<SeqId>,
        vision: Option<SeqVision>,
    ) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        let seq = Seq {
            after,
            vision,
            sampler: Sampler::new(&params, &prompt).with_eos_ids(&self.cfg.eos_ids),
            stop,
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: 0,
            priority,
            text: String::new(),
            plain_greedy: params.is_plain_greedy(),
            params,
            prompt_logits: false,
        };
        self.seqs.insert(id, seq);
        self.enqueue_waiting(id);
        id
    }

    /// Asks for the logits of every prompt row of `seq` (prompt log-probabilities): its prompt is computed in full,
    /// bypassing the prefix cache, and its chunks' rows appear in [`StepPlan::prompt_rows`]. Only for a sequence
    /// still waiting for its first admission; a preempted sequence recomputes its rows.
    pub fn want_prompt_logits(&mut self, seq: SeqId) -> Result<()> {
        if self.cfg.max_prompt_logits_rows == 0 {
            return Err(Error::request(
                "prompt log-probabilities are not available here: the executor's logits buffer has no rows for them \
                 beyond one per running sequence",
            ));
        }
        let s = self.seqs.get_mut(&seq).ok_or_else(|| Error::request(format!("scheduler: unknown sequence {seq}")))?;
        if s.computed > 0 || self.running.contains(&seq) {
            return Err(Error::request(format!("scheduler: sequence {seq} is already running")));
        }
        s.prompt_logits = true;
        Ok(())
    }

    /// Whether `id` waits for the first sequence of its `n > 1` request to compute the shared prompt.
    fn held(&self, id: SeqId) -> bool {
        let after = self.seqs.get(&id).and_then(|s| s.after);
        after.and_then(|p| self.seqs.get(&p)).is_some_and(|p| p.computed < p.prompt_len)
    }

    /// Drops a waiting or running sequence (a client went away) and frees its blocks. Returns whether it existed.
    pub fn abort(&mut self, seq: SeqId) -> bool {
        self.waiting.retain(|&s| s != seq);
        self.running.retain(|&s| s != seq);
        self.kv.free(seq);
        self.seqs.remove(&seq).is_some()
    }

    fn key(&self, id: SeqId) -> (std::cmp::Reverse<i32>, SeqId) {
        (std::cmp::Reverse(self.seqs.get(&id).map_or(i32::MIN, |s| s.priority)), id)
    }

    fn enqueue_waiting(&mut self, id: SeqId) {
        let k = self.key(id);
        let at = self.waiting.partition_point(|&w| self.key(w) < k);
        self.waiting.insert(at, id);
    }

    /// Frees a running sequence's blocks and queues it again with everything generated so far as its prompt.
    fn preempt(&mut self, id: SeqId) {
        self.running.retain(|&s| s != id);
        self.kv.free(id);
        if let Some(s) = self.seqs.get_mut(&id) {
            s.computed = 0;
        }
        self.preemptions += 1;
        self.enqueue_waiting(id);
    }

    /// Plans the next step, or `None` when there is nothing to run.
    pub fn schedule(&mut self) -> Result<Option<StepPlan>> {
        let mut budget = self.cfg.max_step_tokens;
        let mut chunks: Vec<PlannedChunk> = Vec::new();
        let mut preempted = false;
        // 1. Decodes, in priority order; victims come from the back of the running list.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let s = &self.seqs[&id];
            let kv_len = self.kv.num_tokens(id);
            if kv_len == s.tokens.len() {
                i += 1; // still prefilling
                continue;
            }
            let (computed, new) = (s.computed, s.tokens[kv_len..].to_vec());
            let mut scheduled = true;
            while let Err(e) = self.kv.append(id, &new) {
                let Some(&victim) = self.running.last() else { return Err(e) };
                self.preempt(victim);
                preempted = true;
                if victim == id {
                    scheduled = false;
                    break;
                }
            }
            if scheduled {
                chunks.push(PlannedChunk { seq: id, start: computed, len: 1, sample: true });
                budget -= 1;
                i += 1;
            }
        }
        // 2. Prefill chunks of admitted sequences. Prompts that want every row's logits share a row budget.
        let mut rows_left = self.cfg.max_prompt_logits_rows;
        for &id in &self.running {
            if budget == 0 {
                break;
            }
            let s = &self.seqs[&id];
            let decoding = chunks.iter().any(|c| c.seq == id);
            if decoding || self.kv.num_tokens(id) != s.tokens.len() || s.computed >= s.tokens.len() {
                continue;
            }
            let mut n = (s.tokens.len() - s.computed).min(budget);
            if s.prompt_logits {
                if rows_left == 0 {
                    continue;
                }
                n = n.min(rows_left);
                rows_left -= n;
            }
            chunks.push(PlannedChunk { seq: id, start: s.computed, len: n, sample: s.computed + n == s.tokens.len() });
            budget -= n;
        }
        // 3. Admission, in queue order, passing over held `n > 1` completions.
        let mut j = 0;
        while !preempted && budget > 0 && self.running.len() < self.cfg.max_seqs && j < self.waiting.len() {
            let id = self.waiting[j];
            if self.held(id) {
                j += 1;
                continue;
            }
            let Some(s) = self.seqs.get_mut(&id) else {
                self.waiting.remove(j);
                continue;
            };
            if s.prompt_logits && rows_left == 0 {
                j += 1;
                continue;
            }
            let salt = s.vision.as_ref().map_or(0, |v| v.salt);
            // A prompt that wants every row's logits is computed in full: cached blocks would skip its rows.
            let Ok(a) = self.kv.allocate_with(id, &s.tokens, salt, !s.prompt_logits) else { break };
            self.waiting.remove(j);
            s.computed = a.cached_tokens;
            let mut n = (s.tokens.len() - s.computed).min(budget);
            if s.prompt_logits {
                n = n.min(rows_left);
                rows_left -= n;
            }
            chunks.push(PlannedChunk { seq: id, start: s.computed, len: n, sample: s.computed + n == s.tokens.len() });
            budget -= n;
            let k = self.key(id);
            let at = self.running.partition_point(|&r| self.key(r) < k);
            self.running.insert(at, id);
        }
        if chunks.is_empty() {
            return Ok(None);
        }
        let bs = self.kv.block_size();
        let (mut logits_seqs, mut sample_rows, mut prompt_rows) = (Vec::new(), Vec::new(), Vec::new());
        let mut row = 0;
        let seq_chunks: Vec<SeqChunk<'_>> = chunks
            .iter()
            .map(|c| {
                let s = &self.seqs[&c.seq];
                let logits = if s.prompt_logits {
                    // Every row: the last one of a chunk that ends the prompt is sampled, the others score the
                    // prompt's next token.
                    let scored = c.len - usize::from(c.sample);
                    if scored > 0 {
                        prompt_rows.push(PromptRows { seq: c.seq, start: c.start, len: scored, first_row: row });
                    }
                    row += scored;
                    LogitsWanted::All
                } else if c.sample {
                    LogitsWanted::Last
                } else {
                    LogitsWanted::None
                };
                if c.sample {
                    logits_seqs.push(c.seq);
                    sample_rows.push(row);
                    row += 1;
                }
                SeqChunk {
                    tokens: &s.tokens[c.start..c.start + c.len],
                    start_pos: c.start,
                    block_table: self.kv.table(c.seq),
                    logits,
                }
            })
            .collect();
        let input = build_step(&seq_chunks, bs)?;
        if input.logits_rows.len() != row {
            return Err(Error::Backend(format!("scheduler: {} logits rows planned as {row}", input.logits_rows.len())));
        }
        let images = chunks
            .iter()
            .map(|c| {
                let s = &self.seqs[&c.seq];
                s.vision.as_ref().map(|v| {
                    let last = s.prompt_len - 1;
                    let mut mask = Vec::with_capacity(c.len * v.row_len);
                    for pos in c.start..c.start + c.len {
                        let r = pos.min(last);
                        mask.extend_from_slice(&v.mask[r * v.row_len..(r + 1) * v.row_len]);
                    }
                    PlanImages { key: v.key, mask }
                })
            })
            .collect();
        Ok(Some(StepPlan { input, chunks, images, logits_seqs, sample_rows, prompt_rows }))
    }

    /// Whether every sequence sampled in `plan` decodes greedily without penalties (so the backend may pick the
    /// plain argmax, [`crate::exec::Executor::step_greedy`]).
    pub fn all_plain_greedy(&self, plan: &StepPlan) -> bool {
        plan.logits_seqs.iter().all(|id| self.seqs.get(id).is_some_and(|s| s.plain_greedy))
    }

    /// Records ids picked outside the samplers (by [`crate::exec::Executor::step_greedy`]) in each sampler.
    pub fn accept_picked(&mut self, plan: &StepPlan, picked: &[u32]) {
        for (id, &t) in plan.logits_seqs.iter().zip(picked) {
            if let Some(s) = self.seqs.get_mut(id) {
                s.sampler.accept(t);
            }
        }
    }

    /// The sampling state of each logits row of `plan`, for [`crate::exec::Executor::step_sample`].
    pub fn sample_rows(&mut self, plan: &StepPlan) -> Result<Vec<SampleSeq<'_>>> {
        let mut refs: HashMap<SeqId, &mut Seq> =
            self.seqs.iter_mut().filter(|(id, _)| plan.logits_seqs.contains(id)).map(|(&id, s)| (id, s)).collect();
        let mut rows = Vec::with_capacity(plan.logits_seqs.len());
        for id in &plan.logits_seqs {
            let s =
                refs.remove(id).ok_or_else(|| Error::request(format!("scheduler: sequence {id} is not running")))?;
            let (prompt, output) = s.tokens.split_at(s.prompt_len);
            rows.push(SampleSeq { params: &s.params, sampler: &mut s.sampler, prompt, output });
        }
        Ok(rows)
    }

    /// Applies the outcome of running `plan`: `picked[i]` is the id for `plan.logits_seqs[i]`. `detok(seq, id)`
    /// returns the text newly decoded for `id` (the caller keeps one stream decoder per sequence). Sequences that
    /// finish (EOS or stop id, stop string, `max_tokens`, context length) release their blocks.
    pub fn update(
        &mut self,
        plan: &StepPlan,
        picked: &[u32],
        detok: &mut dyn FnMut(SeqId, u32) -> Result<String>,
    ) -> Result<StepUpdate> {
        if picked.len() != plan.logits_seqs.len() {
            return Err(Error::Backend(format!(
                "{} ids picked for {} sampled sequences",
                picked.len(),
                plan.logits_seqs.len()
            )));
        }
        let mut out = StepUpdate::default();
        let mut row = 0;
        for c in &plan.chunks {
            let id_row = c.sample.then(|| {
                row += 1;
                picked[row - 1]
            });
            // A sequence aborted between schedule and update is skipped.
            let Some(s) = self.seqs.get_mut(&c.seq) else { continue };
            if s.computed != c.start {
                return Err(Error::Backend(format!("scheduler: stale plan for sequence {}", c.seq)));
            }
            s.computed += c.len;
            if s.computed >= s.prompt_len {
                s.prompt_logits = false;
            }
            self.kv.mark_computed(c.seq, s.computed)?;
            let Some(t) = id_row else { continue };
            s.tokens.push(t);
            let piece = detok(c.seq, t)?;
            let st = s.stop.push(t, &piece);
            let mut emit = st.emit;
            let mut finish = st.finished;
            if finish.is_none() && s.tokens.len() >= self.cfg.max_model_len {
                emit.push_str(&s.stop.finish());
                finish = Some(FinishReason::Length);
            }
            if !emit.is_empty() {
                s.text.push_str(&emit);
                out.deltas.push((c.seq, emit));
            }
            if let Some(reason) = finish {
                self.running.retain(|&r| r != c.seq);
                self.kv.free(c.seq);
                if let Some(s) = self.seqs.remove(&c.seq) {
                    let generation =
                        Generation { ids: s.tokens[s.prompt_len..].to_vec(), text: s.text, finish: reason };
                    out.finished.push(Finished { seq: c.seq, generation });
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
