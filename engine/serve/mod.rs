//! Serving: an engine thread that runs the continuous-batching [`crate::sched::Scheduler`] over an
//! [`crate::exec::Executor`] for many concurrent requests ([`engine`]), the OpenAI request and response formats
//! ([`api`]), the HTTP server (`llama32 serve`, [`http`]), offline batch files (`llama32 batch`, [`batch`]) and
//! Prometheus metrics ([`metrics`]).
//!
//! Data flow: a handler parses and validates a request body into [`GenerateRequest`]s ([`api`]), submits each to
//! the [`engine::EngineHandle`], and turns the [`Event`]s it receives back into an OpenAI response or a stream of
//! server-sent events. The engine thread owns the executor, the scheduler and the per-sequence detokenizers; it
//! never blocks on a client: events go through unbounded channels, and a closed channel aborts the request.

pub mod api;
pub mod batch;
pub mod engine;
pub mod gbnf;
pub mod guided;
pub mod http;
pub mod images;
pub mod loadgen;
pub mod metrics;

pub use crate::sampling::TokenLogprob;
use crate::sampling::{FinishReason, SamplingParams};

/// One generation request as the engine sees it: prompt ids and how to sample them.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// Prompt token ids (templated and tokenized).
    pub prompt: Vec<u32>,
    /// Sampling and stopping, shared by every completion of the request.
    pub params: SamplingParams,
    /// Completions returned (OpenAI `n`).
    pub n: usize,
    /// Completions generated, of which the `n` with the highest cumulative log-probability are returned
    /// (raised to `n` when smaller; `best_of > n` buffers every completion until all are finished).
    pub best_of: usize,
    /// Return the log-probability of each chosen token and this many most likely alternatives (`Some(0)`: the
    /// chosen token only).
    pub logprobs: Option<usize>,
    /// Return the log-probability of every prompt token after the first, with this many most likely
    /// alternatives, in one [`Event::PromptLogprobs`] (vLLM's `prompt_logprobs`; OpenAI's `echo` with
    /// `logprobs`). The prompt is then computed in full, bypassing the prefix cache.
    pub prompt_logprobs: Option<usize>,
    /// Higher is served first; FIFO within a priority.
    pub priority: i32,
    /// Leave special tokens (other than the stop tokens) out of the text.
    pub skip_special_tokens: bool,
    /// The prompt's images (Llama 3.2 Vision models).
    pub images: Option<RequestImages>,
    /// Structured output: the grammar every completion must follow (each completion gets its own copy).
    pub guide: Option<guided::Guide>,
}

impl GenerateRequest {
    /// A request for one completion of `prompt` with `params`.
    pub fn new(prompt: Vec<u32>, params: SamplingParams) -> Self {
        GenerateRequest {
            prompt,
            params,
            n: 1,
            best_of: 1,
            logprobs: None,
            prompt_logprobs: None,
            priority: 0,
            skip_special_tokens: true,
            images: None,
            guide: None,
        }
    }
}

/// The encoded images of a vision request and the prompt's cross-attention mask.
#[derive(Clone, Debug)]
pub struct RequestImages {
    /// The projector output of every image.
    pub encoded: std::sync::Arc<crate::vision::pipeline::EncodedImages>,
    /// The prompt's mask rows, `[prompt tokens, row_len]`.
    pub mask: std::sync::Arc<Vec<u8>>,
    /// `images * max_num_tiles`.
    pub row_len: usize,
    /// Hash of the encoded images (prefix-cache salt).
    pub hash: u64,
}

impl RequestImages {
    /// The images of `prompt`, whose `<|image|>` tokens (`image_token`) must match the images one to one; the mask
    /// is built as transformers' processor builds it.
    pub fn new(
        encoded: crate::vision::pipeline::EncodedImages,
        prompt: &[u32],
        image_token: u32,
        max_tiles: usize,
    ) -> crate::Result<Self> {
        let mask = crate::vision::text::CrossAttentionMask::from_image_tokens(
            prompt,
            image_token,
            &encoded.num_tiles,
            max_tiles,
        )?;
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        encoded.num_tiles.hash(&mut h);
        for v in &encoded.states {
            v.to_bits().hash(&mut h);
        }
        Ok(RequestImages {
            row_len: mask.row_len(),
            mask: std::sync::Arc::new(mask.data().to_vec()),
            encoded: std::sync::Arc::new(encoded),
            hash: h.finish() | 1,
        })
    }
}

/// What the engine sends back for one request, in order. Every request ends with exactly one [`Event::Done`] or
/// one [`Event::Error`].
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// New output of completion `index` (`0..n`): final text (possibly empty) and the ids generated since the
    /// last delta, with their log-probabilities when asked for.
    Delta {
        /// The completion.
        index: usize,
        /// Text that became final.
        text: String,
        /// Ids generated (a stop token included).
        ids: Vec<u32>,
        /// One entry per id when `logprobs` was asked for, else empty.
        logprobs: Vec<TokenLogprob>,
    },
    /// The log-probabilities of prompt tokens `1..` (the first token has none), each with the requested number of
    /// alternatives; sent once, before the first delta, when [`GenerateRequest::prompt_logprobs`] asked for them.
    PromptLogprobs(Vec<TokenLogprob>),
    /// Completion `index` finished; no more deltas follow for it.
    Finished {
        /// The completion.
        index: usize,
        /// Why it stopped.
        reason: FinishReason,
    },
    /// Every completion finished.
    Done(Usage),
    /// The request failed or was cancelled; nothing follows.
    Error(String),
}

/// Token counts of a finished request (OpenAI `usage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens over every completion (the discarded `best_of` ones included).
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

/// The request handlers' context for a running engine: the tokenizer, and the chat template and sampling
/// defaults of `model_dir` (when given and present there).
pub fn context_for(
    model_dir: Option<&std::path::Path>,
    tokenizer: Option<std::sync::Arc<crate::tokenizer::Tokenizer>>,
    info: engine::EngineInfo,
    model_name: String,
) -> crate::Result<api::ServeContext> {
    let mut template = None;
    let mut defaults = api::SamplingDefaults::default();
    if let Some(dir) = model_dir {
        let has_template =
            ["chat_template.jinja", "tokenizer_config.json", "chat_template.json"].iter().any(|f| dir.join(f).exists());
        if has_template {
            template = Some(std::sync::Arc::new(crate::chat_template::ChatTemplate::from_model_dir(dir)?));
        }
        defaults = api::SamplingDefaults::from_model_dir(dir)?;
    }
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let guides =
        std::sync::Arc::new(guided::Guides::new(tokenizer.clone(), info.config.vocab_size, &info.config.eos_token_ids));
    Ok(api::ServeContext {
        model_name,
        tokenizer,
        template,
        info,
        defaults,
        started,
        vision: None,
        guides,
        priority_scheduling: false,
    })
}
