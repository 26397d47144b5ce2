//! A batch generation loop over any [`Executor`]: chunked prefill under a token budget, then batched decode,
//! with per-sequence sampling and stop handling. The serving scheduler will replace the admission policy; the
//! step construction here is the part it shares.

use crate::exec::{Executor, SampleSeq, StepInput};
use crate::kv::BlockAllocator;
use crate::sampling::{FinishReason, Sampler, SamplingParams, StopChecker};
use crate::{Error, Result};

/// One sequence's share of a step: new tokens from `start_pos`, with or without logits for its last token.
#[derive(Clone, Copy, Debug)]
pub struct SeqChunk<'a> {
    /// The new tokens.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`.
    pub start_pos: usize,
    /// The sequence's block table (covering `start_pos + tokens.len()` tokens).
    pub block_table: &'a [u32],
    /// Which logits rows to return for this sequence.
    pub logits: LogitsWanted,
}

/// Which rows of a chunk need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None (a prefill chunk that does not end the prompt).
    None,
    /// The last token only (the next-token distribution).
    Last,
    /// Every token (scoring, `llama32 logits`).
    All,
}

/// Builds a flat [`StepInput`] from per-sequence chunks.
pub fn build_step(chunks: &[SeqChunk<'_>], block_size: usize) -> Result<StepInput> {
    let max_blocks = chunks.iter().map(|c| c.block_table.len()).max().unwrap_or(0).max(1);
    let mut s = StepInput { max_blocks_per_seq: max_blocks, cu_seqlens: vec![0], ..Default::default() };
    for c in chunks {
        let base = s.token_ids.len() as u32;
        for (j, &id) in c.tokens.iter().enumerate() {
            let pos = c.start_pos + j;
            let block = c.block_table.get(pos / block_size).ok_or_else(|| {
                Error::request(format!("position {pos} is not covered by a block table of {}", c.block_table.len()))
            })?;
            s.token_ids.push(id);
            s.positions.push(pos as u32);
            s.slot_mapping.push(block * block_size as u32 + (pos % block_size) as u32);
        }
        let n = c.tokens.len() as u32;
        match c.logits {
            LogitsWanted::None => {}
            LogitsWanted::Last => s.logits_rows.push(base + n - 1),
            LogitsWanted::All => s.logits_rows.extend(base..base + n),
        }
        s.cu_seqlens.push(base + n);
        s.block_tables.extend_from_slice(c.block_table);
        s.block_tables.extend(std::iter::repeat_n(0, max_blocks - c.block_table.len()));
    }
    Ok(s)
}

/// Logits `[T, vocab]` for every position of `ids`, as one fresh sequence (prefilled in chunks of
/// `chunk_tokens`). The sequence's cache blocks are released afterwards.
pub fn score<E: Executor + ?Sized>(exec: &mut E, ids: &[u32], chunk_tokens: usize) -> Result<Vec<f32>> {
    if ids.is_empty() {
        return Err(Error::request("no token ids to score"));
    }
    let mut alloc = BlockAllocator::new(exec.num_blocks(), exec.block_size());
    let mut table = Vec::new();
    alloc.ensure(&mut table, ids.len())?;
    let mut logits = Vec::with_capacity(ids.len() * exec.config().vocab_size);
    for (k, chunk) in ids.chunks(chunk_tokens.max(1)).enumerate() {
        let c = SeqChunk {
            tokens: chunk,
            start_pos: k * chunk_tokens.max(1),
            block_table: &table,
            logits: LogitsWanted::All,
        };
        let step = build_step(&[c], exec.block_size())?;
        logits.extend(exec.step(&step)?.logits);
    }
    alloc.release(&mut table);
    Ok(logits)
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct GenRequest {
    /// Prompt token ids (already templated and tokenized).
    pub prompt: Vec<u32>,
    /// Sampling and stopping.
    pub params: SamplingParams,
}

/// One finished generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Generated ids; a stop token that ended generation is included, as transformers does.
    pub ids: Vec<u32>,
    /// The emitted text (stop strings and stop tokens excluded).
    pub text: String,
    /// Why generation ended.
    pub finish: FinishReason,
}

/// Options of [`generate`].
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// The model's end-of-sequence ids.
    pub eos_ids: Vec<u32>,
    /// Most new tokens per step (prefill chunks are cut to fit).
    pub max_step_tokens: usize,
}

struct SeqState {
    tokens: Vec<u32>,
    computed: usize,
    prompt_len: usize,
    table: Vec<u32>,
    sampler: Sampler,
    stop: StopChecker,
    text: String,
    finish: Option<FinishReason>,
    /// Greedy with no penalties: the next id is the plain argmax of the logits.
    plain_greedy: bool,
}

/// Generates for every request together. `detok(seq, id)` returns the text newly decoded for `id` (the caller
/// keeps one stream decoder per sequence); `on_text(seq, chunk)` receives text as soon as it is final.
pub fn generate<E: Executor + ?Sized>(
    exec: &mut E,
    reqs: &[GenRequest],
    opts: &GenerateOptions,
    detok: &mut dyn FnMut(usize, u32) -> Result<String>,
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<Vec<Generation>> {
    let (block_size, vocab) = (exec.block_size(), exec.config().vocab_size);
    let max_pos = exec.config().max_position_embeddings;
    let mut alloc = BlockAllocator::new(exec.num_blocks(), block_size);
    let mut seqs = Vec::with_capacity(reqs.len());
    let mut reserved = 0usize;
    for (i, r) in reqs.iter().enumerate() {
        let at = |msg: String| Error::request(format!("request {i}: {msg}"));
        r.params.validate(vocab).map_err(|e| match e {
            Error::Request(m) => at(m),
            other => other,
        })?;
        if r.prompt.is_empty() {
            return Err(at("empty prompt".into()));
        }
        if let Some(&bad) = r.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(at(format!("token id {bad} is outside the vocabulary (size {vocab})")));
        }
        let total = r.prompt.len() + r.params.max_tokens;
        if total > max_pos {
            return Err(at(format!(
                "prompt of {} tokens + max_tokens {} exceeds the context length {max_pos}",
                r.prompt.len(),
                r.params.max_tokens
            )));
        }
        reserved += total.div_ceil(block_size);
        seqs.push(SeqState {
            tokens: r.prompt.clone(),
            computed: 0,
            prompt_len: r.prompt.len(),
            table: Vec::new(),
            sampler: Sampler::new(&r.params, &r.prompt).with_eos_ids(&opts.eos_ids),
            stop: StopChecker::new(&opts.eos_ids, &r.params),
            text: String::new(),
            finish: (r.params.max_tokens == 0).then_some(FinishReason::Length),
            plain_greedy: r.params.is_plain_greedy(),
        });
    }
    if reserved > alloc.num_blocks() {
        return Err(Error::request(format!(
            "the batch needs {reserved} KV blocks of {block_size} tokens but the cache has {}; \
             send fewer requests or a larger --kv-tokens",
            alloc.num_blocks()
        )));
    }
    let budget = opts.max_step_tokens.max(1);
    loop {
        // Plan: every unfinished sequence contributes its uncomputed tokens, within the step budget.
        let mut plan: Vec<(usize, usize)> = Vec::new(); // (seq, tokens this step)
        let mut left = budget;
        for (i, s) in seqs.iter().enumerate() {
            if s.finish.is_some() || left == 0 {
                continue;
            }
            let n = (s.tokens.len() - s.computed).min(left);
            plan.push((i, n));
            left -= n;
        }
        if plan.is_empty() {
            break;
        }
        for &(i, n) in &plan {
            let s = &mut seqs[i];
            alloc.ensure(&mut s.table, s.computed + n)?;
        }
        let chunks: Vec<SeqChunk<'_>> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &seqs[i];
                let done = s.computed + n == s.tokens.len();
                SeqChunk {
                    tokens: &s.tokens[s.computed..s.computed + n],
                    start_pos: s.computed,
                    block_table: &s.table,
                    logits: if done { LogitsWanted::Last } else { LogitsWanted::None },
                }
            })
            .collect();
        let step = build_step(&chunks, block_size)?;
        // The sequences whose logits come back this step, in row order.
        let sampling: Vec<usize> =
            plan.iter().filter(|&&(i, n)| seqs[i].computed + n == seqs[i].tokens.len()).map(|&(i, _)| i).collect();
        let picked = if sampling.iter().all(|&i| seqs[i].plain_greedy) {
            // Greedy without penalties: the backend picks the ids (on the device where it can).
            let ids = exec.step_greedy(&step)?;
            for (&i, &id) in sampling.iter().zip(&ids) {
                seqs[i].sampler.accept(id);
            }
            ids
        } else {
            let mut slots: Vec<Option<&mut SeqState>> = seqs.iter_mut().map(Some).collect();
            let mut rows = Vec::with_capacity(sampling.len());
            for &i in &sampling {
                let s = slots[i].take().ok_or_else(|| Error::Backend(format!("sequence {i} sampled twice")))?;
                let (prompt, output) = s.tokens.split_at(s.prompt_len);
                rows.push(SampleSeq { params: &reqs[i].params, sampler: &mut s.sampler, prompt, output });
            }
            exec.step_sample(&step, &mut rows)?
        };
        if picked.len() != sampling.len() {
            return Err(Error::Backend(format!("{} ids picked for {} sequences", picked.len(), sampling.len())));
        }
        let mut row = 0;
        for &(i, n) in &plan {
            let s = &mut seqs[i];
            s.computed += n;
            if s.computed < s.tokens.len() {
                continue;
            }
            let id = picked[row];
            row += 1;
            s.tokens.push(id);
            let piece = detok(i, id)?;
            let st = s.stop.push(id, &piece);
            if !st.emit.is_empty() {
                on_text(i, &st.emit);
                s.text.push_str(&st.emit);
            }
            if let Some(reason) = st.finished {
                s.finish = Some(reason);
                alloc.release(&mut s.table);
            }
        }
    }
    Ok(seqs
        .into_iter()
        .map(|s| Generation {
            ids: s.tokens[s.prompt_len..].to_vec(),
            text: s.text,
            finish: s.finish.unwrap_or(FinishReason::Length),
        })
        .collect())
}
