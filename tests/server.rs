//! The OpenAI-compatible HTTP server, in process on 127.0.0.1:0 over the tiny CPU model: many concurrent streams
//! against their non-streamed twins, KV exhaustion, client disconnects (streaming and not), malformed input,
//! the side endpoints, and graceful shutdown.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use llama32::serve::api::ServeContext;
use llama32::serve::engine::{EngineConfig, EngineHandle};
use llama32::serve::http::{self, ServerOptions};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A server running in this process.
struct Server {
    base: String,
    client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<llama32::Result<()>>>,
    started: u64,
}

/// The tiny engine (KV cache of `kv_tokens`) and its context, built off the async workers.
async fn tiny(tag: &str, kv_tokens: usize, cfg: EngineConfig) -> Option<(EngineHandle, ServeContext)> {
    let dir = common::tiny_model_dir(tag)?;
    Some(tokio::task::spawn_blocking(move || common::tiny_engine(&dir, kv_tokens, cfg)).await.expect("engine"))
}

async fn start(tag: &str, kv_tokens: usize, cfg: EngineConfig, opts: ServerOptions) -> Option<Server> {
    let (engine, ctx) = tiny(tag, kv_tokens, cfg).await?;
    Some(serve_on(engine, ctx, opts).await)
}

/// A tiny CPU model with no tokenizer (a config.json only: vocabulary 512, random weights), served as `tiny`. It
/// needs no reference data.
async fn start_without_tokenizer(tag: &str) -> Server {
    let dir = std::env::temp_dir().join(format!("llama32-notok-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp model dir");
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16", "vocab_size": 512
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("write config.json");
    let (engine, ctx) = tokio::task::spawn_blocking(move || {
        let d = dir.clone();
        let make = move || -> llama32::Result<Box<dyn llama32::exec::Executor>> {
            let cfg = llama32::config::LlamaConfig::from_model_dir(&d)?;
            let w = llama32::weights::ModelWeights::random(&cfg, 11)?;
            Ok(Box::new(llama32::exec::cpu::CpuExecutor::with_capacity(cfg, w, 2048, 16)?))
        };
        let engine = EngineHandle::start(make, None, EngineConfig::default()).expect("engine starts");
        let ctx = llama32::serve::context_for(Some(&dir), None, engine.info().clone(), "tiny".into()).expect("context");
        (engine, ctx)
    })
    .await
    .expect("engine");
    serve_on(engine, ctx, ServerOptions::default()).await
}

async fn serve_on(engine: EngineHandle, ctx: ServeContext, opts: ServerOptions) -> Server {
    let started = ctx.started;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("local addr"));
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(http::serve(listener, engine, Arc::new(ctx), opts, async move {
        let _ = rx.await;
    }));
    Server { base, client: reqwest::Client::new(), shutdown: Some(tx), task: Some(task), started }
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.client.post(self.url(path)).json(body).send().await.expect("request sent");
        let status = r.status().as_u16();
        let text = r.text().await.expect("response body");
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: response is not JSON ({e}): {text}")))
    }

    async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request sent");
        let status = r.status().as_u16();
        (status, r.json().await.expect("JSON error body"))
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("request sent")
    }

    async fn metrics(&self) -> String {
        self.get("/metrics").await.text().await.expect("metrics text")
    }

    /// Resolves the shutdown future and waits (at most `limit`) for `serve` to return.
    async fn stop(&mut self, limit: Duration) -> llama32::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().expect("server task");
        tokio::time::timeout(limit, task).await.expect("serve returns in time").expect("serve task")
    }
}

/// The value of the sample `name{...}` whose labels contain `label` ("" for any).
fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} ({label}) not found in:\n{text}"))
}

/// A streamed response: the chunk objects, and whether `[DONE]` ended it.
#[derive(Debug, Default)]
struct Sse {
    chunks: Vec<Value>,
    done: bool,
}

impl Sse {
    /// Text of choice `index` (chat deltas or completion texts).
    fn text(&self, index: u64) -> String {
        self.choices(index)
            .filter_map(|c| c["delta"]["content"].as_str().or_else(|| c["text"].as_str()).map(String::from))
            .collect()
    }

    fn choices(&self, index: u64) -> impl Iterator<Item = &Value> {
        self.chunks
            .iter()
            .filter_map(|c| c["choices"].as_array())
            .flatten()
            .filter(move |c| c["index"].as_u64() == Some(index))
    }

    fn finish_reason(&self, index: u64) -> Option<String> {
        let reasons: Vec<&str> = self.choices(index).filter_map(|c| c["finish_reason"].as_str()).collect();
        assert!(reasons.len() <= 1, "several finish reasons: {reasons:?}");
        reasons.first().map(|s| s.to_string())
    }

    fn usage(&self) -> Option<&Value> {
        self.chunks.iter().rev().find(|c| c["usage"].is_object()).map(|c| &c["usage"])
    }

    fn error(&self) -> Option<&Value> {
        self.chunks.iter().find(|c| c.get("error").is_some()).map(|c| &c["error"])
    }
}

/// Parses one `data: ...` event into `out`; panics on anything after `[DONE]` or on a malformed event.
fn parse_event(ev: &str, out: &mut Sse) {
    assert!(!out.done, "event after [DONE]: {ev:?}");
    let data = ev.strip_prefix("data: ").unwrap_or_else(|| panic!("not a data event: {ev:?}"));
    if data == "[DONE]" {
        out.done = true;
    } else {
        out.chunks.push(serde_json::from_str(data).unwrap_or_else(|e| panic!("chunk is not JSON ({e}): {data}")));
    }
}

/// Reads up to `max_events` events of a streamed response (all of them with `usize::MAX`); returns them and the
/// response's byte stream for the rest.
async fn read_sse(
    resp: reqwest::Response,
    max_events: usize,
) -> (Sse, impl futures_util::Stream<Item = reqwest::Result<axum::body::Bytes>>) {
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().expect("content type").to_string();
    assert!(ct.starts_with("text/event-stream"), "content type {ct}");
    let mut body = resp.bytes_stream();
    let mut out = Sse::default();
    let mut buf: Vec<u8> = Vec::new();
    let mut seen = 0;
    while seen < max_events {
        let Some(piece) = body.next().await else { break };
        buf.extend_from_slice(&piece.expect("stream chunk"));
        while let Some(at) = buf.windows(2).position(|w| w == b"\n\n") {
            let ev: Vec<u8> = buf.drain(..at + 2).collect();
            parse_event(std::str::from_utf8(&ev[..at]).expect("UTF-8 event"), &mut out);
            seen += 1;
        }
    }
    assert!(buf.is_empty() || seen >= max_events, "unterminated event at the end: {:?}", String::from_utf8_lossy(&buf));
    (out, body)
}

async fn stream_all(srv: &Server, path: &str, body: &Value) -> Sse {
    let resp = srv.client.post(srv.url(path)).json(body).send().await.expect("request sent");
    let (sse, _) = read_sse(resp, usize::MAX).await;
    assert!(sse.done, "stream ended without [DONE]: {sse:?}");
    sse
}

/// Polls `/metrics` until `ok` holds for it (at most `limit`); returns the last text and whether it held.
async fn wait_metrics(srv: &Server, limit: Duration, ok: impl Fn(&str) -> bool) -> (String, bool) {
    let t = Instant::now();
    loop {
        let m = srv.metrics().await;
        if ok(&m) {
            return (m, true);
        }
        if t.elapsed() > limit {
            return (m, false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn idle(m: &str) -> bool {
    metric(m, "llama32_num_requests_running", "") == 0.0
        && metric(m, "llama32_num_requests_waiting", "") == 0.0
        && metric(m, "llama32_kv_cache_usage_perc", "") == 0.0
}

/// Prompt token ids: BOS then `len - 1` ids that depend on `k`.
fn ids(k: u64, len: usize) -> Vec<u32> {
    let mut p = vec![128000u32];
    p.extend((0..len as u64 - 1).map(|i| (1000 + (i * 37 + k * 101) % 5000) as u32));
    p
}

/// Request `k` of the concurrency test: chat for even `k`, completions for odd, seed `k`.
///
/// `top_k` keeps the draws out of the random model's near-uniform tail, where logits that differ by an ulp between
/// batch shapes (the CPU GEMM is not batch-invariant) would flip a sampled token between two runs.
fn client_request(k: u64) -> (&'static str, Value) {
    let max_tokens = 8 + k % 9;
    if k.is_multiple_of(2) {
        let body = json!({
            "model": "tiny", "messages": [{"role": "user", "content": format!("Client {k}: tell me a story.")}],
            "temperature": 0.8, "top_k": 40, "seed": k, "max_tokens": max_tokens, "ignore_eos": true,
        });
        ("/v1/chat/completions", body)
    } else {
        let body = json!({
            "model": "tiny", "prompt": format!("Once upon a time, client {k} said"),
            "temperature": 0.8, "top_k": 40, "seed": k, "max_tokens": max_tokens, "ignore_eos": true,
        });
        ("/v1/completions", body)
    }
}

fn with(mut body: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().expect("object").clone() {
        body[k] = v;
    }
    body
}

/// Text of choice `i` of a non-streamed response.
fn choice_text(resp: &Value, i: usize) -> String {
    let c = &resp["choices"][i];
    c["message"]["content"].as_str().or_else(|| c["text"].as_str()).unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_equal_their_non_streamed_twins() {
    let cfg = EngineConfig { max_seqs: 256, ..Default::default() };
    let Some(srv) = start("http-many", 32768, cfg, ServerOptions::default()).await else { return };
    let srv = Arc::new(srv);
    const CLIENTS: u64 = 256;
    let t = Instant::now();
    let streams: Vec<JoinHandle<Sse>> = (0..CLIENTS)
        .map(|k| {
            let srv = srv.clone();
            tokio::spawn(async move {
                let (path, body) = client_request(k);
                let body = with(body, json!({"stream": true, "stream_options": {"include_usage": true}}));
                stream_all(&srv, path, &body).await
            })
        })
        .collect();
    let mut streamed = Vec::new();
    for (k, h) in streams.into_iter().enumerate() {
        streamed.push(h.await.unwrap_or_else(|e| panic!("client {k}: {e}")));
    }
    eprintln!("{CLIENTS} streams in {:.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let plain: Vec<JoinHandle<(u16, Value)>> = (0..CLIENTS)
        .map(|k| {
            let srv = srv.clone();
            tokio::spawn(async move {
                let (path, body) = client_request(k);
                srv.post(path, &body).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for h in plain {
        answers.push(h.await.expect("client task"));
    }
    eprintln!("{CLIENTS} non-streamed requests in {:.2} s", t.elapsed().as_secs_f64());
    let mut distinct = std::collections::HashSet::new();
    for (k, (sse, (status, resp))) in streamed.iter().zip(&answers).enumerate() {
        let max_tokens = 8 + k as u64 % 9;
        assert_eq!(*status, 200, "client {k}: {resp}");
        assert_eq!(sse.finish_reason(0).as_deref(), Some("length"), "client {k}");
        assert_eq!(resp["choices"][0]["finish_reason"], "length", "client {k}");
        let usage = sse.usage().unwrap_or_else(|| panic!("client {k}: no usage chunk"));
        assert_eq!(usage["completion_tokens"], max_tokens, "client {k}");
        assert_eq!(usage["completion_tokens"], resp["usage"]["completion_tokens"], "client {k}");
        assert_eq!(usage["prompt_tokens"], resp["usage"]["prompt_tokens"], "client {k}");
        let text = sse.text(0);
        assert_eq!(text, choice_text(resp, 0), "client {k}: streamed text differs from the non-streamed one");
        assert_eq!(sse.chunks[0]["id"], sse.chunks.last().expect("chunks")["id"], "client {k}: one id per stream");
        distinct.insert(text);
    }
    // Different seeds and prompts give different texts (the comparison above is not between empty strings).
    // Different seeds and prompts give different texts (the comparison above is not between empty strings).
    eprintln!("DISTINCT {}", distinct.len());
    let mut hist = std::collections::HashMap::new();
    for s in &streamed {
        *hist.entry(s.text(0)).or_insert(0) += 1;
    }
    let mut hv: Vec<_> = hist.into_iter().filter(|x| x.1 > 1).collect();
    hv.sort_by_key(|x| std::cmp::Reverse(x.1));
    for (t, c) in hv.iter().take(10) {
        eprintln!("{c} x {t:?}");
    }
    assert!(distinct.len() > CLIENTS as usize / 2, "only {} distinct texts", distinct.len());
    let m = srv.metrics().await;
    assert_eq!(metric(&m, "llama32_request_success_total", "finished_reason=\"length\""), 2.0 * CLIENTS as f64);
    assert!(idle(&m));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_exhaustion_preempts_and_every_request_still_completes() {
    let Some(srv) = start("http-kv", 320, EngineConfig::default(), ServerOptions::default()).await else { return };
    let srv = Arc::new(srv);
    let req = |k: u64| {
        json!({"model": "tiny", "prompt": ids(k, 40 + k as usize), "max_tokens": 80, "temperature": 0.8, "top_k": 40, "seed": k,
               "ignore_eos": true})
    };
    let tasks: Vec<JoinHandle<String>> = (0..16u64)
        .map(|k| {
            let srv = srv.clone();
            tokio::spawn(async move {
                if k % 2 == 0 {
                    let sse = stream_all(&srv, "/v1/completions", &with(req(k), json!({"stream": true}))).await;
                    assert_eq!(sse.finish_reason(0).as_deref(), Some("length"), "request {k}: {:?}", sse.error());
                    sse.text(0)
                } else {
                    let (status, resp) = srv.post("/v1/completions", &req(k)).await;
                    assert_eq!(status, 200, "request {k}: {resp}");
                    assert_eq!(resp["usage"]["completion_tokens"], 80, "request {k}");
                    choice_text(&resp, 0)
                }
            })
        })
        .collect();
    let mut together = Vec::new();
    for t in tasks {
        together.push(t.await.expect("client task"));
    }
    let m = srv.metrics().await;
    let preemptions = metric(&m, "llama32_num_preemptions_total", "");
    assert!(preemptions > 0.0, "no preemption with a 320-token cache:\n{m}");
    for (k, text) in together.iter().enumerate() {
        let (status, resp) = srv.post("/v1/completions", &req(k as u64)).await;
        assert_eq!(status, 200, "{resp}");
        assert_eq!(*text, choice_text(&resp, 0), "request {k}: the crowded run differs from the solo run");
    }
    assert_eq!(metric(&srv.metrics().await, "llama32_num_preemptions_total", ""), preemptions, "solo runs preempted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_clients_free_their_requests() {
    let Some(srv) = start("http-drop", 4096, EngineConfig::default(), ServerOptions::default()).await else {
        return;
    };
    let long = json!({"model": "tiny", "prompt": ids(1, 12), "max_tokens": 900, "ignore_eos": true, "temperature": 0});

    // Streaming: read a few chunks, then drop the response.
    let resp = srv.client.post(srv.url("/v1/completions")).json(&with(long.clone(), json!({"stream": true}))).send();
    let (sse, rest) = read_sse(resp.await.expect("request sent"), 3).await;
    assert_eq!(sse.chunks.len(), 3);
    assert!(!sse.done);
    let m = srv.metrics().await;
    assert_eq!(metric(&m, "llama32_num_requests_running", ""), 1.0, "the request should still run:\n{m}");
    assert!(metric(&m, "llama32_kv_cache_usage_perc", "") > 0.0);
    drop(rest);
    let (m, ok) = wait_metrics(&srv, Duration::from_secs(3), idle).await;
    assert!(ok, "the request still runs after its client went away:\n{m}");
    assert_eq!(metric(&m, "llama32_request_success_total", "finished_reason=\"aborted\""), 1.0);
    let generated = metric(&m, "llama32_generation_tokens_total", "");
    assert!(generated < 900.0, "{generated} tokens generated: the request ran to its end");

    // Non-streaming: the client gives up while the server works on the answer.
    let srv = Arc::new(srv);
    let s2 = srv.clone();
    let client = tokio::spawn(async move { s2.post("/v1/completions", &long).await });
    let (m, ok) = wait_metrics(&srv, Duration::from_secs(10), |m| {
        metric(m, "llama32_num_requests_running", "") == 1.0
            && metric(m, "llama32_generation_tokens_total", "") > generated + 5.0
    })
    .await;
    assert!(ok, "the non-streamed request did not start:\n{m}");
    client.abort();
    assert!(client.await.is_err_and(|e| e.is_cancelled()));
    let (m, ok) = wait_metrics(&srv, Duration::from_secs(3), idle).await;
    assert!(ok, "the non-streamed request still runs after its client went away:\n{m}");
    assert_eq!(metric(&m, "llama32_request_success_total", "finished_reason=\"aborted\""), 2.0);
    assert!(metric(&m, "llama32_generation_tokens_total", "") < generated + 900.0);
    // And the server still answers.
    let (status, resp) = srv.post("/v1/completions", &json!({"prompt": ids(2, 5), "max_tokens": 3})).await;
    assert_eq!(status, 200, "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400s_naming_the_field() {
    let Some((engine, ctx)) = tiny("http-bad", 4096, EngineConfig::default()).await else { return };
    const LIMIT: usize = 16384;
    let flag = Arc::new(AtomicBool::new(false));
    let opts = ServerOptions { max_body_bytes: LIMIT, ..Default::default() };
    let app = http::router(engine, Arc::new(ctx), &opts, flag.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let srv = Server { base, client: reqwest::Client::new(), shutdown: None, task: None, started: 0 };

    let chat = |extra: Value| with(json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}), extra);
    let cmpl = |extra: Value| with(json!({"prompt": "hello", "max_tokens": 4}), extra);
    let check = |what: &str, (status, body): (u16, Value), needle: &str| {
        assert_eq!(status, 400, "{what}: {body}");
        let msg = body["error"]["message"].as_str().unwrap_or_else(|| panic!("{what}: no error.message in {body}"));
        assert!(msg.contains(needle), "{what}: message {msg:?} does not contain {needle:?}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{what}: {body}");
        assert_eq!(body["error"]["code"], 400, "{what}: {body}");
    };
    let p = "/v1/completions";
    let c = "/v1/chat/completions";
    check("invalid JSON", srv.post_raw(p, b"{\"prompt\": ".to_vec()).await, "not valid JSON");
    check("invalid UTF-8", srv.post_raw(p, b"{\"prompt\": \"\xff\xfe\"}".to_vec()).await, "not valid UTF-8");
    // A body over the limit: 413, with its declared length (refused before it is read).
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(LIMIT + 100)).into_bytes();
    let (status, body) = srv.post_raw(p, big).await;
    assert_eq!((status, &body["error"]["type"]), (413, &json!("invalid_request_error")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains(&LIMIT.to_string()), "{body}");
    check("not an object", srv.post(p, &json!([1, 2])).await, "expected a JSON object");
    let (status, body) = srv.post(c, &chat(json!({"model": "gpt-4"}))).await;
    assert_eq!((status, &body["error"]["param"]), (404, &json!("model")), "unknown model: {body}");
    check("temperature", srv.post(c, &chat(json!({"temperature": -1}))).await, "temperature");
    check("top_p", srv.post(p, &cmpl(json!({"top_p": -0.5}))).await, "top_p");
    let (status, body) = srv.post(p, &cmpl(json!({"n": 0}))).await;
    assert_eq!(body["error"]["param"], "n", "{body}");
    check("n", (status, body), "n:");
    check(
        "long prompt",
        srv.post(p, &json!({"prompt": ids(3, 1100), "max_tokens": 1})).await,
        "maximum context length",
    );
    check("max_tokens", srv.post(p, &cmpl(json!({"max_tokens": 2000}))).await, "max_tokens");
    let bad_role = json!({"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]});
    check("role", srv.post(c, &bad_role).await, "messages[1].role");
    check("stop", srv.post(c, &chat(json!({"stop": 5}))).await, "stop");
    check("return_token_ids", srv.post(p, &cmpl(json!({"return_token_ids": "yes"}))).await, "return_token_ids");
    check("logit_bias key", srv.post(p, &cmpl(json!({"logit_bias": {"fifty": 10}}))).await, "key `fifty`");
    check("logit_bias value", srv.post(p, &cmpl(json!({"logit_bias": {"50": 101}}))).await, "logit_bias[50]");
    check("logit_bias id", srv.post(p, &cmpl(json!({"logit_bias": {"999999": 1}}))).await, "token id 999999");
    check("logit_bias shape", srv.post(c, &chat(json!({"logit_bias": [1, 2]}))).await, "expected an object");
    check("logit_bias twice", srv.post(p, &cmpl(json!({"logit_bias": {"50": 1, "050": 2}}))).await, "given twice");
    check("missing prompt", srv.post(p, &json!({"max_tokens": 2})).await, "prompt");
    check("missing messages", srv.post(c, &json!({"max_tokens": 2})).await, "messages");
    // A template that fails only because of chat_template_kwargs blames them, not the messages.
    let (status, body) = srv.post(c, &chat(json!({"chat_template_kwargs": {"date_string": 5}}))).await;
    assert_eq!(body["error"]["param"], "chat_template_kwargs", "{body}");
    check("chat_template_kwargs", (status, body), "chat_template_kwargs: chat template:");

    let r = srv.get("/v1/nothing").await;
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.expect("JSON 404");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("/v1/nothing")), "{body}");
    let r = srv.get("/v1/completions").await;
    assert_eq!(r.status(), 405);
    let body: Value = r.json().await.expect("JSON 405");
    assert!(body["error"]["message"].is_string(), "{body}");

    // Still serving.
    let (status, resp) = srv.post(c, &chat(json!({}))).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["object"], "chat.completion");
    assert_eq!(resp["choices"][0]["message"]["role"], "assistant");

    // While shutting down: generation requests and /health get 503s.
    flag.store(true, std::sync::atomic::Ordering::SeqCst);
    let (status, body) = srv.post(c, &chat(json!({}))).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("shutting down")), "{body}");
    assert_eq!(srv.get("/health").await.status(), 503);
    assert_eq!(srv.get("/v1/models").await.status(), 200);
}

#[test]
fn run_blocking_names_an_address_it_cannot_bind() {
    let Some(dir) = common::tiny_model_dir("http-bind") else { return };
    let (engine, ctx) = common::tiny_engine(&dir, 256, EngineConfig::default());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let opts = ServerOptions { port, ..Default::default() };
    let err = http::run_blocking(engine.clone(), ctx, opts).expect_err("the port is taken");
    assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");
    engine.join();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_and_response_shapes() {
    let Some(srv) = start("http-endpoints", 4096, EngineConfig::default(), ServerOptions::default()).await else {
        return;
    };
    // Models.
    let models: Value = srv.get("/v1/models").await.json().await.expect("models JSON");
    assert_eq!(models["object"], "list");
    let card = &models["data"][0];
    assert_eq!(models["data"].as_array().map(Vec::len), Some(1));
    assert_eq!((card["id"].as_str(), card["object"].as_str()), (Some("tiny"), Some("model")));
    assert_eq!((card["owned_by"].as_str(), card["max_model_len"].as_u64()), (Some("llama32"), Some(1024)));
    assert_eq!(card["created"], srv.started);
    let one = srv.get("/v1/models/tiny").await;
    assert_eq!(one.status(), 200);
    assert_eq!(one.json::<Value>().await.expect("JSON")["id"], "tiny");
    for missing in ["/v1/models/other", "/v1/models/org/other"] {
        let r = srv.get(missing).await;
        assert_eq!(r.status(), 404, "{missing}");
        assert!(r.json::<Value>().await.expect("JSON")["error"]["message"].is_string());
    }
    // Health and metrics.
    let h = srv.get("/health").await;
    assert_eq!(h.status(), 200);
    assert_eq!(h.json::<Value>().await.expect("JSON"), json!({"status": "ok"}));
    let r = srv.get("/metrics").await;
    assert_eq!(r.headers()["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    let m = r.text().await.expect("metrics");
    for name in [
        "llama32_num_requests_waiting",
        "llama32_num_requests_running",
        "llama32_kv_cache_usage_perc",
        "llama32_prefix_cache_hit_rate",
        "llama32_time_to_first_token_seconds",
        "llama32_inter_token_latency_seconds",
        "llama32_generation_tokens_total",
    ] {
        assert!(m.contains(&format!("# TYPE {name} ")), "{name} missing from /metrics");
    }
    assert!(m.contains("model_name=\"tiny\""));

    // Chat with log-probabilities.
    let c = "/v1/chat/completions";
    let chat = json!({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6, "seed": 3,
                      "logprobs": true, "top_logprobs": 3});
    let (status, resp) = srv.post(c, &chat).await;
    assert_eq!(status, 200, "{resp}");
    let content = resp["choices"][0]["logprobs"]["content"].as_array().expect("logprobs.content");
    assert_eq!(Some(content.len() as u64), resp["usage"]["completion_tokens"].as_u64(), "one entry per token");
    assert!(!content.is_empty());
    for e in content {
        let lp = e["logprob"].as_f64().expect("logprob");
        assert!(lp <= 0.0, "{e}");
        assert!(e["token"].is_string() && e["bytes"].is_array(), "{e}");
        let top: Vec<f64> = e["top_logprobs"]
            .as_array()
            .expect("top_logprobs")
            .iter()
            .map(|t| t["logprob"].as_f64().unwrap())
            .collect();
        assert_eq!(top.len(), 3, "{e}");
        assert!(top.windows(2).all(|w| w[0] >= w[1]), "alternatives not sorted: {top:?}");
        assert!(top.iter().all(|&t| t <= 0.0) && lp <= top[0] + 1e-6, "{e}");
    }

    // The response's id in `x-request-id`, which OpenAI's clients expose as `_request_id`, streamed or not.
    for stream in [false, true] {
        let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": stream});
        let r = srv.client.post(srv.url(c)).json(&body).send().await.expect("request sent");
        let id = r.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let text = r.text().await.expect("body");
        assert!(id.as_deref().is_some_and(|id| id.starts_with("chatcmpl-") && text.contains(id)), "{id:?}: {text}");
    }

    // vLLM's /tokenize, /detokenize and /version.
    let (status, t) = srv.post("/tokenize", &json!({"prompt": "Hello world"})).await;
    assert_eq!(status, 200, "{t}");
    let tokens = t["tokens"].as_array().expect("tokens").clone();
    assert_eq!((t["count"].as_u64(), tokens.first()), (Some(tokens.len() as u64), Some(&json!(128000))), "{t}");
    assert_eq!(t["max_model_len"], 1024);
    let (_, plain) = srv.post("/tokenize", &json!({"prompt": "Hello world", "add_special_tokens": false})).await;
    assert_eq!(plain["tokens"].as_array().map(|v| &v[..]), Some(&tokens[1..]), "{plain}");
    let (status, d) = srv.post("/detokenize", &json!({"tokens": plain["tokens"]})).await;
    assert_eq!((status, &d["prompt"]), (200, &json!("Hello world")), "{d}");
    let messages = json!([{"role": "user", "content": "Hello there"}]);
    let (_, t) = srv.post("/tokenize", &json!({"messages": messages})).await;
    let (_, r) = srv.post(c, &json!({"messages": messages, "max_tokens": 1})).await;
    assert_eq!(t["count"], r["usage"]["prompt_tokens"], "the chat prompt as generation renders it: {t}");
    let (status, e) = srv.post("/tokenize", &json!({"prompt": "a", "messages": messages})).await;
    assert_eq!(status, 400, "{e}");
    let (status, e) = srv.post("/detokenize", &json!({"tokens": [1, -2]})).await;
    assert_eq!((status, &e["error"]["param"]), (400, &json!("tokens")), "{e}");
    let (status, e) = srv.post("/detokenize", &json!({"tokens": [1, 999999]})).await;
    let msg = e["error"]["message"].as_str().unwrap_or_default();
    assert!(status == 400 && msg.contains("999999") && !msg.contains('/'), "no server path in the message: {e}");
    // Prompts longer than the context are counted (clients count to cut); token ids are taken as given; a null
    // `messages` is absent.
    let (status, t) = srv.post("/tokenize", &json!({"prompt": ids(9, 1100), "min_tokens": 5})).await;
    assert_eq!((status, t["count"].as_u64()), (200, Some(1100)), "{t}");
    let (_, t) = srv.post("/tokenize", &json!({"prompt": [128000, 9906], "add_special_tokens": false})).await;
    assert_eq!(t["tokens"], json!([128000, 9906]), "{t}");
    let (status, t) = srv.post("/tokenize", &json!({"prompt": "hi", "messages": null})).await;
    assert_eq!(status, 200, "{t}");
    let v: Value = srv.get("/version").await.json().await.expect("version JSON");
    assert!(v["version"].as_str().is_some_and(|s| !s.is_empty()), "{v}");

    // n = 3.
    let (status, resp) = srv
        .post(
            c,
            &json!({"messages": [{"role": "user", "content": "Hi"}], "n": 3,
                                              "max_tokens": 5, "seed": 1}),
        )
        .await;
    assert_eq!(status, 200, "{resp}");
    let idx: Vec<u64> =
        resp["choices"].as_array().expect("choices").iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(idx, vec![0, 1, 2]);

    // Completions: two prompts, n = 2.
    let (status, resp) = srv
        .post("/v1/completions", &json!({"prompt": ["The sky is", "Rust is"], "n": 2, "max_tokens": 4, "seed": 5}))
        .await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["object"], "text_completion");
    let idx: Vec<u64> =
        resp["choices"].as_array().expect("choices").iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(idx, vec![0, 1, 2, 3]);

    // Streaming with usage.
    let body = json!({"messages": [{"role": "user", "content": "Count"}], "max_tokens": 7, "ignore_eos": true,
                      "stream": true, "stream_options": {"include_usage": true}});
    let sse = stream_all(&srv, c, &body).await;
    let last = sse.chunks.last().expect("chunks");
    assert_eq!(last["choices"], json!([]), "{last}");
    assert_eq!(last["usage"]["completion_tokens"], 7, "{last}");
    assert!(sse.chunks[..sse.chunks.len() - 1].iter().all(|c| c["usage"].is_null()));
    assert_eq!(sse.chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(sse.chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(sse.finish_reason(0).as_deref(), Some("length"));

    // Tools.
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let body = json!({"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools,
                      "max_tokens": 12, "seed": 2});
    let (status, resp) = srv.post(c, &body).await;
    assert_eq!(status, 200, "{resp}");
    let ch = &resp["choices"][0];
    match ch["finish_reason"].as_str() {
        Some("tool_calls") => assert!(ch["message"]["tool_calls"].is_array(), "{resp}"),
        _ => assert!(ch["message"]["content"].is_string(), "{resp}"),
    }
    let tools_prompt = resp["usage"]["prompt_tokens"].as_u64().expect("usage");
    let (_, plain) = srv
        .post(
            c,
            &json!({"messages": [{"role": "user", "content": "Weather in Paris?"}],
                                          "max_tokens": 1}),
        )
        .await;
    assert!(tools_prompt > plain["usage"]["prompt_tokens"].as_u64().unwrap() + 20, "the tools were not rendered");

    // Prefix cache: the same long prompt twice.
    let long = json!({"prompt": ids(9, 300), "max_tokens": 1});
    let (status, resp) = srv.post("/v1/completions", &long).await;
    assert_eq!(status, 200, "{resp}");
    let hits = metric(&srv.metrics().await, "llama32_prefix_cache_hits_total", "");
    let (status, resp) = srv.post("/v1/completions", &long).await;
    assert_eq!(status, 200, "{resp}");
    let m = srv.metrics().await;
    assert!(metric(&m, "llama32_prefix_cache_hits_total", "") >= hits + 256.0, "no prefix-cache hit:\n{m}");
    assert!(metric(&m, "llama32_prefix_cache_hit_rate", "") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_running_streams() {
    let Some(mut srv) = start("http-shutdown", 4096, EngineConfig::default(), ServerOptions::default()).await else {
        return;
    };
    let body = json!({"prompt": ids(4, 10), "max_tokens": 200, "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true}});
    let resp = srv.client.post(srv.url("/v1/completions")).json(&body).send().await.expect("request sent");
    let (mut sse, mut rest) = read_sse(resp, 1).await;
    let reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(piece) = rest.next().await {
            buf.extend_from_slice(&piece.expect("stream chunk"));
        }
        buf
    });
    let _ = srv.shutdown.take().expect("shutdown sender").send(());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = reqwest::Client::new()
        .post(srv.url("/v1/completions"))
        .timeout(Duration::from_secs(10))
        .json(&json!({"prompt": "late", "max_tokens": 2}))
        .send()
        .await;
    match late {
        Ok(r) => {
            assert_eq!(r.status(), 503);
            let body: Value = r.json().await.expect("JSON 503");
            assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("shutting down")), "{body}");
        }
        Err(e) => assert!(!e.is_timeout(), "the late request hung: {e}"),
    }
    let rest = reader.await.expect("reader");
    let text = std::str::from_utf8(&rest).expect("UTF-8");
    for ev in text.split_terminator("\n\n") {
        parse_event(ev, &mut sse);
    }
    assert!(sse.done, "no [DONE]");
    assert!(sse.error().is_none(), "{:?}", sse.error());
    assert_eq!(sse.finish_reason(0).as_deref(), Some("length"));
    assert_eq!(sse.usage().expect("usage")["completion_tokens"], 200);
    srv.stop(Duration::from_secs(5)).await.expect("serve returns Ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_deadline_ends_long_streams_with_an_error() {
    let opts = ServerOptions { shutdown_timeout: Duration::from_millis(50), ..Default::default() };
    let Some(mut srv) = start("http-deadline", 4096, EngineConfig::default(), opts).await else { return };
    let body = json!({"prompt": ids(5, 10), "max_tokens": 900, "ignore_eos": true, "stream": true});
    let resp = srv.client.post(srv.url("/v1/completions")).json(&body).send().await.expect("request sent");
    let (mut sse, mut rest) = read_sse(resp, 2).await;
    let t = Instant::now();
    let stopping = tokio::spawn({
        let limit = Duration::from_secs(5);
        let tx = srv.shutdown.take().expect("shutdown sender");
        let task = srv.task.take().expect("task");
        async move {
            let _ = tx.send(());
            tokio::time::timeout(limit, task).await
        }
    });
    let mut buf = Vec::new();
    while let Some(piece) = rest.next().await {
        buf.extend_from_slice(&piece.expect("stream chunk"));
    }
    for ev in std::str::from_utf8(&buf).expect("UTF-8").split_terminator("\n\n") {
        parse_event(ev, &mut sse);
    }
    assert!(sse.done, "no [DONE]");
    let err = sse.error().expect("an error chunk");
    assert!(err["message"].as_str().is_some_and(|m| m.contains("shut down")), "{err}");
    assert!(sse.finish_reason(0).is_none());
    assert!(sse.text(0).len() < 900 * 8);
    let served = stopping.await.expect("stop task").expect("serve returns in time");
    served.expect("serve task").expect("serve returns Ok");
    assert!(t.elapsed() < Duration::from_secs(5));
}

// What a client may cost others: slow headers and bodies, a full queue, a missing API key.
#[path = "server/limits.rs"]
mod limits;

// The vLLM / OpenAI fields that steer or expose tokens: return_token_ids, logit_bias, min_tokens.
#[path = "server/sampling_fields.rs"]
mod sampling_fields;

// Prompt log-probabilities: echo with logprobs, max_tokens 0, vLLM's prompt_logprobs.
#[path = "server/prompt_logprobs.rs"]
mod prompt_logprobs;

// Structured outputs: response_format, guided_*, structured_outputs.
#[path = "server/structured.rs"]
mod structured;

// Randomized bad fields: every answer a 200 or a 400 with a message.
#[path = "server/fuzz.rs"]
mod fuzz;
