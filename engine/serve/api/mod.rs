//! The OpenAI formats: request bodies of `/v1/chat/completions` and `/v1/completions` validated into
//! [`GenerateRequest`]s ([`prepare`]), and the engine's events ([`crate::serve::Event`]) turned back into a
//! response object ([`ResponseBuilder`]) or a stream of chunk objects ([`StreamBuilder`]).
//!
//! Accepted fields: the OpenAI ones (`model`, `messages`/`prompt`, `max_tokens`, `max_completion_tokens`,
//! `temperature`, `top_p`, `n`, `stop`, `seed`, `frequency_penalty`, `presence_penalty`, `logprobs`,
//! `top_logprobs`, `stream`, `stream_options`, `tools`, `tool_choice`, `echo`, `best_of`, `user`), and vLLM's
//! extensions (`top_k`, `min_p`, `repetition_penalty`, `stop_token_ids`, `ignore_eos`, `skip_special_tokens`,
//! `priority` (lower first, as in vLLM, under `--scheduling-policy priority`), `chat_template_kwargs`,
//! `return_token_ids`, `min_tokens`, `prompt_logprobs`); `logit_bias` maps token ids (as strings, OpenAI's shape)
//! to biases in [-100, 100]. Structured outputs ([`crate::serve::guided`]): `response_format`
//! (`json_object`, `json_schema`), and vLLM's `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`
//! and `structured_outputs`. Fields the engine cannot honor (`suffix`) are refused with a 400 naming them rather
//! than silently ignored; unknown fields are ignored, as OpenAI does.
//!
//! `tool_choice`: `"none"` renders the conversation without the tools; `"auto"` (the default when `tools` are
//! given) renders them and parses the answer into `tool_calls`; `"required"` and a named function also force the
//! start of the JSON call (`{"name": "` or `{"name": "f", "parameters": `) into the answer, a prefix, not a grammar.
//!
//! Prompt log-probabilities: `echo` with `logprobs` on `/v1/completions` puts the prompt's tokens first in the
//! choice's `logprobs` (the first token with `null`s, as OpenAI's legacy API did), and `max_tokens: 0` with `echo`
//! returns the prompt alone; this is how lm-evaluation-harness scores log-likelihoods. vLLM's `prompt_logprobs: k`
//! (both endpoints) returns them as vLLM does, a list with `null` first and then `{"id": {"logprob", "rank",
//! "decoded_token"}}` per token. Such a prompt is computed in full (the prefix cache is bypassed for it).
//!
//! `return_token_ids` (vLLM's extension): each choice also carries its generated `token_ids` (the stop token
//! included) and the prompt's `prompt_token_ids` (per choice for completions, at the top level for chat); in a
//! stream each delta carries the ids generated since the last one, and the first chunk of a choice the prompt's.
//! A model without a tokenizer always returns them: its text is empty, so the ids are its only output.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Map, Value as Json};

use super::engine::{EngineInfo, MAX_COMPLETIONS, MAX_TOP_LOGPROBS};
use super::GenerateRequest;
use crate::chat_template::ChatTemplate;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// An OpenAI-style error: HTTP status and the `{"error": {...}}` body.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// What went wrong, naming the field at fault.
    pub message: String,
    /// OpenAI `type`: `invalid_request_error`, `server_error`, ...
    pub kind: &'static str,
    /// The field at fault, when there is one.
    pub param: Option<String>,
}

impl ApiError {
    /// A 400 naming `param`.
    pub fn bad_request(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError { status: 400, message: message.into(), kind: "invalid_request_error", param: param.map(String::from) }
    }

    /// A 400 from a library error; the field is taken from a `field: message` prefix when there is one.
    pub fn from_request_error(e: &Error) -> Self {
        let msg = e.detail();
        // The engine's "request N: " prefix means nothing to a client.
        let msg = match msg.strip_prefix("request ").and_then(|r| r.split_once(": ")) {
            Some((n, rest)) if n.chars().all(|c| c.is_ascii_digit()) => rest.to_string(),
            _ => msg,
        };
        // "field: ..." or "field must ...".
        let end = msg.find(|c: char| !(c.is_ascii_alphanumeric() || "_.[]".contains(c))).unwrap_or(msg.len());
        let (head, rest) = msg.split_at(end);
        let param =
            (!head.is_empty() && (rest.starts_with(':') || rest.starts_with(" must "))).then(|| head.to_string());
        ApiError { status: 400, message: msg, kind: "invalid_request_error", param }
    }

    /// A 500 (or another server-side status).
    pub fn server(status: u16, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind: "server_error", param: None }
    }

    /// The response body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> Json {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

/// Most prompts in one `/v1/completions` request (each runs `best_of` sequences): a bound on the work one HTTP
/// request can queue ahead of everyone else's.
pub const MAX_PROMPTS: usize = 1024;

/// Most sequences one request may start (prompts times `best_of`): each holds its own copy of its prompt from the
/// moment the request is queued, so this bounds the memory one request can take before any of it runs.
pub const MAX_SEQUENCES: usize = 4096;

/// Most prompt log-probabilities one request may ask for, counted as the response carries them: prompt tokens x (1 +
/// alternatives) for each list (a completion choice may carry both `echo`'s and `prompt_logprobs`), times the
/// choices (a non-streamed chat response has one list for all). A whole 128K-token prompt with 20 alternatives and
/// one choice is 2.75 M. Each becomes a JSON object in the response, so this bounds what one short request can make
/// the server build (128 choices of a long prompt asked for hundreds of GB).
pub const MAX_PROMPT_LOGPROBS: usize = 1 << 22;

/// Sampling defaults from the model's `generation_config.json` (vLLM's `--generation-config auto`); request fields
/// override them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplingDefaults {
    /// `temperature`.
    pub temperature: Option<f32>,
    /// `top_p`.
    pub top_p: Option<f32>,
    /// `top_k`.
    pub top_k: Option<usize>,
    /// `repetition_penalty`.
    pub repetition_penalty: Option<f32>,
}

impl SamplingDefaults {
    /// Reads `generation_config.json` in `dir` (absent file: no defaults).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let v: Json = serde_json::from_str(&text).map_err(|e| Error::config(&path, "<root>", e.to_string()))?;
        let f = |k: &str| -> Result<Option<f32>> {
            match v.get(k) {
                None | Some(Json::Null) => Ok(None),
                Some(x) => {
                    x.as_f64().map(|x| Some(x as f32)).ok_or_else(|| Error::config(&path, k, "expected a number"))
                }
            }
        };
        let top_k = match v.get("top_k") {
            None | Some(Json::Null) => None,
            Some(x) => Some(x.as_u64().ok_or_else(|| Error::config(&path, "top_k", "expected an integer >= 0"))?),
        };
        let d = SamplingDefaults {
            temperature: f("temperature")?,
            top_p: f("top_p")?,
            top_k: top_k.map(|k| k as usize),
            repetition_penalty: f("repetition_penalty")?,
        };
        // Each default must meet the range a request's own value must (SamplingParams::validate), checked here so
        // that a bad file fails at startup, named, instead of failing every request that relies on the default.
        let base = SamplingParams::default();
        for (k, params) in [
            ("temperature", d.temperature.map(|temperature| SamplingParams { temperature, ..base.clone() })),
            ("top_p", d.top_p.map(|top_p| SamplingParams { top_p, ..base.clone() })),
            (
                "repetition_penalty",
                d.repetition_penalty.map(|repetition_penalty| SamplingParams { repetition_penalty, ..base.clone() }),
            ),
        ] {
            match params.map(|p| p.validate(usize::MAX)) {
                Some(Err(Error::Request(m))) => return Err(Error::config(&path, k, m)),
                Some(Err(e)) => return Err(e),
                _ => {}
            }
        }
        Ok(d)
    }
}

/// What the request handlers share: the served model's name, tokenizer, template and limits.
#[derive(Clone)]
pub struct ServeContext {
    /// The name clients must use in `model` (absent `model` also selects it).
    pub model_name: String,
    /// Tokenizer (required for text prompts and text output).
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// Chat template (required for `/v1/chat/completions`).
    pub template: Option<Arc<ChatTemplate>>,
    /// Model and cache facts.
    pub info: EngineInfo,
    /// Sampling defaults.
    pub defaults: SamplingDefaults,
    /// Unix time the server started (the model's `created`).
    pub started: u64,
    /// The image encoder of a Llama 3.2 Vision model (chat requests may then carry `data:` image URLs).
    pub vision: Option<Arc<crate::vision::pipeline::ImageEncoder>>,
    /// The grammar engine of structured outputs (built on the first request that asks for one).
    pub guides: Arc<super::guided::Guides>,
    /// Whether requests may set `priority` (`--scheduling-policy priority`; vLLM refuses it otherwise too).
    pub priority_scheduling: bool,
}

/// Most images in one request.
pub const MAX_IMAGES: usize = 8;

/// The two generation endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

impl Endpoint {
    /// The URL path.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }

    /// Parses a URL path (as in a batch file's `url`).
    pub fn from_path(p: &str) -> Option<Self> {
        match p {
            "/v1/chat/completions" => Some(Endpoint::Chat),
            "/v1/completions" => Some(Endpoint::Completions),
            _ => None,
        }
    }
}

/// A validated request: one [`GenerateRequest`] per prompt plus what the response needs.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Response id (`chatcmpl-...` / `cmpl-...`).
    pub id: String,
    /// Unix time of the request.
    pub created: u64,
    /// The model name echoed back.
    pub model: String,
    /// Stream the answer as server-sent events.
    pub stream: bool,
    /// Send a final usage chunk when streaming.
    pub include_usage: bool,
    /// One engine request per prompt (chat: exactly one).
    pub requests: Vec<GenerateRequest>,
    /// Completions per prompt.
    pub n: usize,
    /// Text put before each completion: the echoed prompt (`echo`), or the forced start of a tool call.
    pub prefixes: Vec<String>,
    /// Parse the answers into `tool_calls`.
    pub parse_tools: bool,
    /// Report log-probabilities.
    pub logprobs: bool,
    /// Completions with `echo` and `logprobs: k`: the prompt's tokens lead the choice's `logprobs` (the first
    /// with `null`s), each with `k` alternatives.
    pub echo_logprobs: Option<usize>,
    /// vLLM's `prompt_logprobs: k`: a `prompt_logprobs` list (per choice for completions, at the top level for
    /// chat) with `k` alternatives a token.
    pub vllm_prompt_logprobs: Option<usize>,
    /// `max_tokens: 0` with `echo`: the one token the engine generates is left out of the response.
    pub prompt_only: bool,
    /// Return the prompt's and the completions' token ids (`return_token_ids`, or a model without a tokenizer).
    pub return_token_ids: bool,
    /// Image files of a chat request (from `data:` URLs), to be encoded by [`attach_images`] before submission.
    pub images: Vec<(String, Vec<u8>)>,
}

/// Typed access to a JSON object's fields, with errors naming the field.
struct Fields<'a>(&'a Map<String, Json>);

impl Fields<'_> {
    fn get(&self, k: &str) -> Option<&Json> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    fn f32(&self, k: &str) -> ApiResult<Option<f32>> {
        self.get(k)
            .map(|v| {
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| ApiError::bad_request(Some(k), format!("{k}: expected a number")))
            })
            .transpose()
    }
    fn int(&self, k: &str) -> ApiResult<Option<i64>> {
        self.get(k)
            .map(|v| {
                v.as_i64()
                    .or_else(|| v.as_f64().filter(|x| x.fract() == 0.0 && x.abs() < 9e15).map(|x| x as i64))
                    .ok_or_else(|| ApiError::bad_request(Some(k), format!("{k}: expected an integer")))
            })
            .transpose()
    }
    fn uint(&self, k: &str, min: i64, max: i64) -> ApiResult<Option<usize>> {
        match self.int(k)? {
            None => Ok(None),
            Some(v) if v < min || v > max => {
                Err(ApiError::bad_request(Some(k), format!("{k}: must be in [{min}, {max}], got {v}")))
            }
            Some(v) => Ok(Some(v as usize)),
        }
    }
    fn bool(&self, k: &str) -> ApiResult<Option<bool>> {
        self.get(k)
            .map(|v| v.as_bool().ok_or_else(|| ApiError::bad_request(Some(k), format!("{k}: expected true or false"))))
            .transpose()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A fresh response id with `prefix`.
pub fn new_id(prefix: &str) -> String {
    let call = crate::tool_calls::new_call_id();
    format!("{prefix}-{}", call.trim_start_matches("call_"))
}

/// The error for a `model` this server does not serve: a 404, as OpenAI and vLLM answer (the OpenAI client raises
/// NotFoundError).
fn unknown_model(ctx: &ServeContext, m: &str) -> ApiError {
    ApiError {
        status: 404,
        ..ApiError::bad_request(
            Some("model"),
            format!("model: `{m}` does not exist; this server serves `{}`", ctx.model_name),
        )
    }
}

/// Validates `body` for `endpoint` and turns it into engine requests. Errors are 400s naming the field.
pub fn prepare(ctx: &ServeContext, endpoint: Endpoint, body: &Json) -> ApiResult<Prepared> {
    prepare_within(ctx, endpoint, body, ctx.info.max_model_len)
}

/// [`prepare`] against a context length of `ctx_len` tokens (`/tokenize` counts prompts of any length).
fn prepare_within(ctx: &ServeContext, endpoint: Endpoint, body: &Json, ctx_len: usize) -> ApiResult<Prepared> {
    let Json::Object(obj) = body else {
        return Err(ApiError::bad_request(None, "request body: expected a JSON object"));
    };
    let f = Fields(obj);
    let model = match f.get("model") {
        None => ctx.model_name.clone(),
        Some(Json::String(m)) if *m == ctx.model_name => m.clone(),
        Some(Json::String(m)) => return Err(unknown_model(ctx, m)),
        Some(_) => return Err(ApiError::bad_request(Some("model"), "model: expected a string")),
    };
    for legacy in ["functions", "function_call"] {
        if f.get(legacy).is_some() {
            return Err(ApiError::bad_request(
                Some(legacy),
                format!(
                    "{legacy}: the deprecated function-calling fields are not supported; use tools and tool_choice"
                ),
            ));
        }
    }
    if f.get("suffix").is_some_and(|s| s.as_str() != Some("")) {
        return Err(ApiError::bad_request(Some("suffix"), "suffix: not supported by this server"));
    }
    let logit_bias = logit_bias(f.get("logit_bias"))?;
    let min_tokens = f.uint("min_tokens", 0, i64::MAX)?.unwrap_or(0);
    let guide_spec = structured::guide_spec(&f)?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None | Some(Json::Null) => false,
        // As OpenAI and vLLM answer: the options would be silently without effect (an empty object is no option).
        Some(Json::Object(o)) if !stream && o.is_empty() => false,
        Some(_) if !stream => {
            return Err(ApiError::bad_request(
                Some("stream_options"),
                "stream_options: only allowed when stream is true",
            ))
        }
        Some(Json::Object(o)) => Fields(o)
            .bool("include_usage")
            .map_err(|e| ApiError { param: Some("stream_options.include_usage".into()), ..e })?
            .unwrap_or(false),
        Some(_) => return Err(ApiError::bad_request(Some("stream_options"), "stream_options: expected an object")),
    };
    let n = f.uint("n", 1, MAX_COMPLETIONS as i64)?.unwrap_or(1);
    let best_of = f.uint("best_of", 1, MAX_COMPLETIONS as i64)?.unwrap_or(n);
    if best_of < n {
        return Err(ApiError::bad_request(Some("best_of"), format!("best_of ({best_of}) must be at least n ({n})")));
    }
    if stream && best_of > n {
        return Err(ApiError::bad_request(Some("best_of"), "best_of > n is not supported when streaming"));
    }
    // Log-probabilities: chat has `logprobs: bool` + `top_logprobs`; completions has `logprobs: int`.
    let logprobs = match endpoint {
        Endpoint::Chat => {
            let on = f.bool("logprobs")?.unwrap_or(false);
            let top = f.uint("top_logprobs", 0, MAX_TOP_LOGPROBS as i64)?;
            if top.is_some() && !on {
                return Err(ApiError::bad_request(Some("top_logprobs"), "top_logprobs: needs logprobs: true"));
            }
            on.then(|| top.unwrap_or(0))
        }
        Endpoint::Completions => f.uint("logprobs", 0, MAX_TOP_LOGPROBS as i64)?,
    };
    let echo = f.bool("echo")?.unwrap_or(false);
    if echo && endpoint == Endpoint::Chat {
        return Err(ApiError::bad_request(Some("echo"), "echo: only for /v1/completions"));
    }
    // Prompt log-probabilities: OpenAI's `echo` with `logprobs` (in the choice's `logprobs`), vLLM's
    // `prompt_logprobs` (a list of its own).
    let vllm_prompt_logprobs = f.uint("prompt_logprobs", 0, MAX_TOP_LOGPROBS as i64)?;
    let echo_logprobs = if echo { logprobs } else { None };
    let prompt_logprobs = echo_logprobs.max(vllm_prompt_logprobs);
    let mut skip_special = f.bool("skip_special_tokens")?.unwrap_or(true);
    let return_token_ids = f.bool("return_token_ids")?.unwrap_or(false) || ctx.tokenizer.is_none();
    // vLLM's meaning: lower first, and only under `--scheduling-policy priority` (the scheduler's is higher first).
    let priority = f.int("priority")?.unwrap_or(0).clamp(-(i32::MAX as i64), i32::MAX as i64) as i32;
    if priority != 0 && !ctx.priority_scheduling {
        return Err(ApiError::bad_request(
            Some("priority"),
            format!(
                "priority: {priority} needs a server started with --scheduling-policy priority (this one serves \
                 first come, first served)"
            ),
        ));
    }
    let priority = -priority;

    // Prompts.
    let tok = ctx.tokenizer.as_deref();
    let (prompts, parse_tools, images) = match endpoint {
        Endpoint::Chat => {
            let c = prompts::chat(ctx, body)?;
            (vec![(c.ids, c.forced, "messages")], c.parse_tools, c.images)
        }
        Endpoint::Completions => (prompts::completions(ctx, &f, echo, skip_special)?, false, Vec::new()),
    };
    if parse_tools {
        // `<|python_tag|>` (built-in tool calls) must survive detokenization.
        skip_special = false;
    }

    // Sampling.
    let d = &ctx.defaults;
    let cfg = &ctx.info.config;
    let mut max_tokens = match f.uint("max_completion_tokens", 1, i64::MAX)? {
        Some(m) => Some((m, "max_completion_tokens")),
        None => f.uint("max_tokens", 0, i64::MAX)?.map(|m| (m, "max_tokens")),
    };
    // `max_tokens: 0` with `echo`: the prompt alone (with its log-probabilities), as OpenAI's legacy API answers
    // and lm-evaluation-harness asks. The engine generates one token, which the response leaves out.
    let prompt_only = max_tokens.is_some_and(|(m, _)| m == 0);
    if prompt_only {
        if !echo {
            return Err(ApiError::bad_request(
                Some("max_tokens"),
                "max_tokens: 0 is accepted only with echo: true (the prompt alone); otherwise it must be at least 1",
            ));
        }
        if min_tokens > 0 {
            return Err(ApiError::bad_request(Some("min_tokens"), "min_tokens: must be 0 with max_tokens 0"));
        }
        max_tokens = Some((1, "max_tokens"));
    }
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Json::String(s)) => vec![s.clone()],
        Some(Json::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::bad_request(Some("stop"), "stop: expected a string or an array of strings"))?,
        Some(_) => return Err(ApiError::bad_request(Some("stop"), "stop: expected a string or an array of strings")),
    };
    let stop_token_ids = match f.get("stop_token_ids") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().filter(|&t| t <= u32::MAX as u64).map(|t| t as u32)).collect())
            .ok_or_else(|| {
                ApiError::bad_request(Some("stop_token_ids"), "stop_token_ids: expected an array of token ids")
            })?,
    };
    let top_k = match f.int("top_k")? {
        None => d.top_k.unwrap_or(0),
        Some(k) if k <= 0 => 0,
        Some(k) => k as usize,
    };
    let seed = f.int("seed")?.map(|s| s as u64);
    // OpenAI takes top_p in [0, 1]: a nucleus of mass 0 is the single most likely token, which top-k 1 keeps.
    let (top_p, top_k) = match f.f32("top_p")?.or(d.top_p).unwrap_or(1.0) {
        0.0 => (1.0, 1),
        p if !(0.0..=1.0).contains(&p) => {
            return Err(ApiError::bad_request(Some("top_p"), format!("top_p must be in [0, 1], got {p}")));
        }
        p => (p, top_k),
    };
    let base = SamplingParams {
        temperature: f.f32("temperature")?.or(d.temperature).unwrap_or(1.0),
        top_p,
        top_k,
        min_p: f.f32("min_p")?.unwrap_or(0.0),
        repetition_penalty: f.f32("repetition_penalty")?.or(d.repetition_penalty).unwrap_or(1.0),
        frequency_penalty: f.f32("frequency_penalty")?.unwrap_or(0.0),
        presence_penalty: f.f32("presence_penalty")?.unwrap_or(0.0),
        seed,
        max_tokens: 1,
        stop,
        stop_token_ids,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
        logit_bias,
        // Set per prompt, against its max_tokens.
        min_tokens: 0,
    };
    base.validate(cfg.vocab_size).map_err(|e| ApiError::from_request_error(&e))?;
    if !base.stop.is_empty() && tok.is_none() {
        return Err(ApiError::bad_request(
            Some("stop"),
            "stop: stop strings need a tokenizer, and this model has none",
        ));
    }

    if prompts.len() * best_of > MAX_SEQUENCES {
        let field = if best_of == n { "n" } else { "best_of" };
        return Err(ApiError::bad_request(
            Some(field),
            format!(
                "{field}: {} prompts x {best_of} completions is {} sequences in one request; at most {MAX_SEQUENCES}",
                prompts.len(),
                prompts.len() * best_of
            ),
        ));
    }
    let guide = match &guide_spec {
        None => None,
        Some((_, field)) if base.ignore_eos || min_tokens > 0 => {
            let other = if base.ignore_eos { "ignore_eos" } else { "min_tokens" };
            return Err(ApiError::bad_request(
                Some(other),
                format!("{other}: cannot be combined with {field} (a structured output ends where its grammar ends)"),
            ));
        }
        Some((_, field)) if endpoint == Endpoint::Chat && prompts.iter().any(|p| !p.1.is_empty()) => {
            return Err(ApiError::bad_request(
                Some("tool_choice"),
                format!(
                    "tool_choice: a required or named tool call forces the start of the answer, which {field} \
                     would not follow; use one or the other"
                ),
            ));
        }
        Some((spec, field)) => Some(
            ctx.guides
                .compile(spec)
                .map_err(|e| ApiError::bad_request(Some(field), format!("{field}: {}", e.detail())))?,
        ),
    };
    let mut requests = Vec::with_capacity(prompts.len());
    let mut prefixes = Vec::with_capacity(prompts.len());
    let several = prompts.len() > 1;
    let mut prompt_entries = 0usize;
    for (i, (ids, prefix, what)) in prompts.into_iter().enumerate() {
        let label = if several { format!("{what}[{i}]") } else { what.to_string() };
        if ids.is_empty() {
            return Err(ApiError::bad_request(Some(what), format!("{label}: empty prompt")));
        }
        // A vision model's embedding has 8 rows past the vocabulary (the image token is the first).
        let rows = cfg.vocab_size + if ctx.vision.is_some() { crate::vision::config::EXTRA_EMBED_ROWS } else { 0 };
        if let Some(&t) = ids.iter().find(|&&t| t as usize >= rows) {
            return Err(ApiError::bad_request(
                Some(what),
                format!("{label}: token id {t} is outside the vocabulary (size {})", cfg.vocab_size),
            ));
        }
        if ids.len() >= ctx_len {
            return Err(ApiError::bad_request(
                Some(what),
                format!(
                    "{label}: the maximum context length is {ctx_len} tokens, and the prompt has {} tokens",
                    ids.len()
                ),
            ));
        }
        let room = ctx_len - ids.len();
        let max = match max_tokens {
            Some((m, field)) if m > room => {
                return Err(ApiError::bad_request(
                    Some(field),
                    format!(
                        "{field}: the maximum context length is {ctx_len} tokens; the prompt has {} \
                         tokens, leaving room for {room}, but {field} is {m}",
                        ids.len()
                    ),
                ))
            }
            Some((m, _)) => m,
            None if endpoint == Endpoint::Completions => 16.min(room),
            None => room,
        };
        if min_tokens > max {
            return Err(ApiError::bad_request(
                Some("min_tokens"),
                format!("min_tokens: {min_tokens} is more than the {max} tokens {label} may generate"),
            ));
        }
        // A completion choice carries the echoed list and vLLM's each; a chat response carries vLLM's once (each
        // choice's first chunk, streamed).
        let per_token = echo_logprobs.map_or(0, |k| k + 1) + vllm_prompt_logprobs.map_or(0, |k| k + 1);
        let copies = if endpoint == Endpoint::Chat && !stream { 1 } else { n };
        prompt_entries = prompt_entries.saturating_add(ids.len() * per_token * copies);
        let params = SamplingParams { max_tokens: max, min_tokens, ..base.clone() };
        requests.push(GenerateRequest {
            prompt: ids,
            params,
            n,
            best_of,
            logprobs,
            prompt_logprobs,
            priority,
            skip_special_tokens: skip_special,
            images: None,
            guide: guide.clone(),
        });
        prefixes.push(prefix);
    }
    if prompt_entries > MAX_PROMPT_LOGPROBS {
        let field = if vllm_prompt_logprobs.is_some() { "prompt_logprobs" } else { "logprobs" };
        return Err(ApiError::bad_request(
            Some(field),
            format!(
                "{field}: {prompt_entries} prompt log-probabilities (prompt tokens x (1 + alternatives) x choices); \
                 at most {MAX_PROMPT_LOGPROBS} a request"
            ),
        ));
    }
    let prefix = if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" };
    Ok(Prepared {
        endpoint,
        id: new_id(prefix),
        created: unix_now(),
        model,
        stream,
        include_usage,
        requests,
        n,
        prefixes,
        parse_tools,
        logprobs: logprobs.is_some(),
        echo_logprobs,
        vllm_prompt_logprobs,
        prompt_only,
        return_token_ids,
        images,
    })
}

/// OpenAI's `logit_bias` (`{"token id": bias, ...}`) as [`SamplingParams::logit_bias`]: sorted by id, each id
/// once. The ranges (ids in the vocabulary, biases in [-100, 100]) are checked with the other sampling fields.
fn logit_bias(v: Option<&Json>) -> ApiResult<Vec<(u32, f32)>> {
    let bad = |m: String| ApiError::bad_request(Some("logit_bias"), m);
    let Some(v) = v else { return Ok(Vec::new()) };
    let Json::Object(m) = v else {
        return Err(bad("logit_bias: expected an object mapping token ids to biases".into()));
    };
    let mut out = Vec::with_capacity(m.len());
    for (k, b) in m {
        let id: u32 = k.trim().parse().map_err(|_| bad(format!("logit_bias: key `{k}` is not a token id")))?;
        let b = b.as_f64().ok_or_else(|| bad(format!("logit_bias[{k}]: expected a number")))?;
        out.push((id, b as f32));
    }
    out.sort_by_key(|&(id, _)| id);
    if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(bad(format!("logit_bias: token id {} is given twice", w[0].0)));
    }
    Ok(out)
}

/// The bytes of a `data:[<type>][;base64],<data>` image URL; anything else is refused (the server never fetches
/// URLs or reads files for a client).
fn data_url_bytes(k: usize, url: Option<&str>) -> ApiResult<Vec<u8>> {
    let bad = |m: String| ApiError::bad_request(Some("messages"), format!("messages: image {k}: {m}"));
    let url = url.ok_or_else(|| bad("no image data (send an image_url with a data: URL)".into()))?;
    let rest = url
        .strip_prefix("data:")
        .ok_or_else(|| bad("only data: URLs are accepted; this server does not fetch URLs or read files".into()))?;
    let (meta, data) = rest.split_once(',').ok_or_else(|| bad("malformed data: URL (no comma)".into()))?;
    if !meta.ends_with(";base64") {
        return Err(bad("data: URL must be base64-encoded (;base64)".into()));
    }
    use base64::Engine as _;
    let clean: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(clean).map_err(|e| bad(format!("invalid base64: {e}")))
}

/// Encodes a chat request's images (preprocessing, vision encoder, projector: the expensive part, so callers run it
/// off the async workers) and attaches them with the prompt's cross-attention mask to its engine request.
pub fn attach_images(ctx: &ServeContext, prep: &mut Prepared) -> ApiResult<()> {
    if prep.images.is_empty() {
        return Ok(());
    }
    let enc = ctx
        .vision
        .as_ref()
        .ok_or_else(|| ApiError::bad_request(Some("messages"), "messages: image content needs a vision model"))?;
    let images = std::mem::take(&mut prep.images);
    let encoded = enc.encode(&images).map_err(|e| ApiError::bad_request(Some("messages"), format!("messages: {e}")))?;
    let req =
        prep.requests.first_mut().ok_or_else(|| ApiError::server(500, "a chat request without an engine request"))?;
    let im = super::RequestImages::new(encoded, &req.prompt, enc.cfg.image_token_index, enc.cfg.vision.max_num_tiles)
        .map_err(|e| ApiError::bad_request(Some("messages"), format!("messages: {e}")))?;
    req.images = Some(im);
    Ok(())
}

mod prompts;
mod response;
mod structured;
mod tokens;

pub use response::{ResponseBuilder, StreamBuilder};
pub use tokens::{detokenize, tokenize};
