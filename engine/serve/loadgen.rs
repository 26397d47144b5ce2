//! A streaming load generator for the server (`llama32 bench-serve`): `clients` concurrent connections, each
//! sending `/v1/completions` requests with token-id prompts one after another, timing the time to first token,
//! the gaps between streamed chunks (inter-token latency) and the request latency.
//!
//! It speaks plain HTTP/1.1 over tokio (one request per connection, chunked transfer decoding, SSE `data:` events),
//! so it needs no HTTP client library. A chunk normally carries one token; tokens whose text is empty (an
//! incomplete UTF-8 sequence) ride with the next chunk, so ITL is per chunk. Output tokens are counted from the
//! final usage chunk.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value as Json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Error, Result};

/// One load level.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The server.
    pub addr: SocketAddr,
    /// Concurrent clients.
    pub clients: usize,
    /// Requests each client sends, one after another.
    pub requests_per_client: usize,
    /// Prompt length in tokens (random ids, different per request, after BOS).
    pub prompt_tokens: usize,
    /// Tokens generated per request (`ignore_eos`).
    pub max_tokens: usize,
    /// Prompt ids are drawn below this.
    pub vocab: u32,
    /// The first id of every prompt: the model's BOS (Llama 3's `<|begin_of_text|>` is 128000).
    pub bos: u32,
    /// The `model` field.
    pub model: String,
    /// Sent as `Authorization: Bearer KEY` when set (a server started with `--api-key`).
    pub api_key: Option<String>,
    /// Fields added to every request body, over the defaults (e.g. `logprobs`, a `guided_json` schema, sampling
    /// fields); see [`check_extra_body`].
    pub extra_body: serde_json::Map<String, serde_json::Value>,
}

/// Refuses an `extra_body` that the load generator cannot run with: one that replaces the fields it must set itself
/// (`model`, `prompt`, `stream`, `stream_options`), naming the field.
pub fn check_extra_body(extra: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
    match extra.keys().find(|k| ["model", "prompt", "stream", "stream_options"].contains(&k.as_str())) {
        Some(k) => Err(Error::request(format!(
            "`{k}` is set by the load generator (a streamed completion of random prompt ids)"
        ))),
        None => Ok(()),
    }
}

/// Percentiles of one latency, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// Samples.
    pub count: usize,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Stats {
    fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Stats::default();
        }
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        Stats { count: v.len(), mean: v.iter().sum::<f64>() / v.len() as f64, p50: q(0.5), p90: q(0.9), p99: q(0.99) }
    }
}

/// What one load level measured.
#[derive(Clone, Debug, Serialize)]
pub struct LoadResult {
    /// Concurrent clients.
    pub clients: usize,
    /// Requests that completed with `[DONE]` and a finish reason.
    pub ok: usize,
    /// Requests that failed (status, error event, broken stream).
    pub errors: usize,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// Wall time of the level.
    pub seconds: f64,
    /// Output tokens (from the usage chunks).
    pub output_tokens: usize,
    /// Output tokens per second over the level.
    pub output_tok_per_s: f64,
    /// Time to first token, over the successful requests that streamed one (a stream with neither text nor token
    /// ids has no first token and is left out rather than counted as 0).
    pub ttft_ms: Stats,
    /// Time between consecutive streamed chunks of a request.
    pub itl_ms: Stats,
    /// Request latency.
    pub e2e_ms: Stats,
}

struct One {
    ttft: Option<f64>,
    itl: Vec<f64>,
    e2e: f64,
    tokens: usize,
}

/// Runs one load level.
pub async fn run_load(o: &LoadOptions) -> LoadResult {
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..o.clients {
        let o = o.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for r in 0..o.requests_per_client {
                let seed = (c * 1_000_003 + r * 7919) as u64;
                out.push(one_request(&o, seed).await);
            }
            out
        }));
    }
    let (mut ttft, mut itl, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ok, mut errors, mut tokens, mut first_error) = (0, 0, 0, None);
    for t in tasks {
        let results = match t.await {
            Ok(r) => r,
            Err(e) => vec![Err(Error::Backend(format!("client task failed: {e}")))],
        };
        for r in results {
            match r {
                Ok(one) => {
                    ok += 1;
                    ttft.extend(one.ttft);
                    itl.extend(one.itl);
                    e2e.push(one.e2e);
                    tokens += one.tokens;
                }
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    LoadResult {
        clients: o.clients,
        ok,
        errors,
        first_error,
        seconds,
        output_tokens: tokens,
        output_tok_per_s: tokens as f64 / seconds.max(1e-9),
        ttft_ms: Stats::of(ttft),
        itl_ms: Stats::of(itl),
        e2e_ms: Stats::of(e2e),
    }
}

fn prompt_ids(o: &LoadOptions, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut ids = vec![o.bos];
    for _ in 1..o.prompt_tokens.max(1) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ids.push((s % (o.vocab.clamp(2, 128000) as u64 - 1)) as u32 + 1);
    }
    ids
}

async fn one_request(o: &LoadOptions, seed: u64) -> Result<One> {
    let io = |e: std::io::Error| Error::Backend(format!("{}: {e}", o.addr));
    let mut body = json!({
        "model": o.model, "prompt": prompt_ids(o, seed), "max_tokens": o.max_tokens, "stream": true,
        "ignore_eos": true, "temperature": 0, "stream_options": {"include_usage": true},
    });
    if let Some(obj) = body.as_object_mut() {
        obj.extend(o.extra_body.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let body = body.to_string();
    let auth = o.api_key.as_ref().map_or_else(String::new, |k| format!("Authorization: Bearer {k}\r\n"));
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         {auth}Connection: close\r\n\r\n{body}",
        o.addr,
        body.len()
    );
    let start = Instant::now();
    let mut sock = TcpStream::connect(o.addr).await.map_err(io)?;
    sock.set_nodelay(true).map_err(io)?;
    sock.write_all(req.as_bytes()).await.map_err(io)?;
    let mut raw: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16384];
    // Headers.
    let header_end = loop {
        if let Some(p) = find(&raw, b"\r\n\r\n") {
            break p + 4;
        }
        let n = sock.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            return Err(Error::Backend("connection closed before the response headers".into()));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..header_end]).to_string();
    let status = head.split_whitespace().nth(1).unwrap_or("");
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let mut pending: Vec<u8> = raw[header_end..].to_vec();
    let mut body_bytes: Vec<u8> = Vec::new(); // de-chunked
    let mut sse =
        SseState { start, last: None, ttft: None, itl: Vec::new(), tokens: None, finished: false, done: false };
    loop {
        // De-chunk what has arrived.
        if chunked {
            while let Some(p) = find(&pending, b"\r\n") {
                let size_line = String::from_utf8_lossy(&pending[..p]).to_string();
                let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| Error::Backend(format!("bad chunk size line {size_line:?}")))?;
                if pending.len() < p + 2 + size + 2 {
                    break;
                }
                body_bytes.extend_from_slice(&pending[p + 2..p + 2 + size]);
                pending.drain(..p + 2 + size + 2);
                if size == 0 {
                    sse.done = true;
                }
            }
        } else {
            body_bytes.append(&mut pending);
        }
        // Consume complete SSE events.
        while let Some(p) = find(&body_bytes, b"\n\n") {
            let ev = String::from_utf8_lossy(&body_bytes[..p]).to_string();
            body_bytes.drain(..p + 2);
            if status != "200" {
                continue;
            }
            sse.event(&ev)?;
        }
        if sse.done {
            break;
        }
        let n = tokio::time::timeout(Duration::from_secs(600), sock.read(&mut buf))
            .await
            .map_err(|_| Error::Backend("no data for 600 s".into()))?
            .map_err(io)?;
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
    }
    if status != "200" {
        let text = String::from_utf8_lossy(&body_bytes).to_string();
        return Err(Error::Backend(format!("status {status}: {}", text.chars().take(300).collect::<String>())));
    }
    if !sse.finished {
        return Err(Error::Backend("stream ended without a finish reason".into()));
    }
    Ok(One { ttft: sse.ttft, itl: sse.itl, e2e: start.elapsed().as_secs_f64() * 1e3, tokens: sse.tokens.unwrap_or(0) })
}

struct SseState {
    start: Instant,
    last: Option<Instant>,
    ttft: Option<f64>,
    itl: Vec<f64>,
    tokens: Option<usize>,
    finished: bool,
    done: bool,
}

impl SseState {
    fn event(&mut self, ev: &str) -> Result<()> {
        for line in ev.lines() {
            let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
            if data == "[DONE]" {
                self.done = true;
                continue;
            }
            let v: Json =
                serde_json::from_str(data).map_err(|e| Error::Backend(format!("bad SSE data ({e}): {data}")))?;
            if let Some(err) = v.get("error") {
                return Err(Error::Backend(format!("error event: {err}")));
            }
            if let Some(u) = v.get("usage").and_then(|u| u.get("completion_tokens")).and_then(Json::as_u64) {
                self.tokens = Some(u as usize);
            }
            let Some(c) = v.get("choices").and_then(|c| c.get(0)) else { continue };
            if c.get("finish_reason").is_some_and(|f| !f.is_null()) {
                self.finished = true;
            }
            // A token arrived: text, or (a model without a tokenizer, or `return_token_ids`) token ids.
            let text = c.get("text").and_then(Json::as_str).is_some_and(|t| !t.is_empty());
            let ids = c.get("token_ids").and_then(Json::as_array).is_some_and(|a| !a.is_empty());
            if text || ids {
                let now = Instant::now();
                match self.last {
                    None => self.ttft = Some(now.duration_since(self.start).as_secs_f64() * 1e3),
                    Some(l) => self.itl.push(now.duration_since(l).as_secs_f64() * 1e3),
                }
                self.last = Some(now);
            }
        }
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
