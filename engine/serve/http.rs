//! The OpenAI-compatible HTTP server (`llama32 serve`) on axum.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (JSON or server-sent events), `GET /v1/models`,
//! `GET /v1/models/{id}`, vLLM's `POST /tokenize`, `POST /detokenize` and `GET /version`, `GET /health` and
//! `GET /metrics` (Prometheus). Every error is an OpenAI-style JSON body
//! `{"error": {"message", "type", "param", "code"}}`.
//!
//! A response owns the engine's [`RequestStream`]s of its request: when a client goes away, hyper drops the
//! handler future (non-streaming) or the response body (streaming), which drops the streams and aborts the
//! request in the engine at once, freeing its KV blocks.
//!
//! Shutdown ([`serve`]): new generation requests get a 503, the engine finishes the running requests until
//! [`ServerOptions::shutdown_timeout`] and then ends them with an error, and the server waits for every response in
//! flight (streams included) before it returns. Set `LLAMA32_LOG_REQUESTS=1` to log one line per request to stderr.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, BoxStream, SelectAll, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::api::{self, ApiError, Endpoint, Prepared, ResponseBuilder, ServeContext, StreamBuilder};
use super::engine::{EngineHandle, RequestStream};
use super::Event;
use crate::{Error, Result};

/// Where and how the server listens.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Host name or address to bind.
    pub host: String,
    /// TCP port (0: any free port).
    pub port: u16,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// How long running requests may go on after a shutdown signal before they are ended with an error.
    pub shutdown_timeout: Duration,
    /// How long an HTTP/1 client may take to send a request's headers (also how long an idle keep-alive connection
    /// stays open): a client that trickles its headers is disconnected instead of holding its connection forever.
    pub header_timeout: Duration,
    /// The longest pause allowed while a request body arrives (nginx's `client_body_timeout`): a client that stalls,
    /// or declares more bytes than it sends, gets a 408. A slow but steady upload is not cut.
    pub body_timeout: Duration,
    /// When set, every `/v1/*` request must carry `Authorization: Bearer KEY` (a 401 otherwise), as with vLLM's
    /// `--api-key`; `/health` and `/metrics` stay open for probes and scrapers.
    pub api_key: Option<String>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            host: "127.0.0.1".into(),
            port: 8000,
            max_body_bytes: 16 << 20,
            shutdown_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            api_key: None,
        }
    }
}

/// How long after the engine's shutdown deadline [`serve`] still waits for connections to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long a whole request body may take, however steadily it arrives (a 408 after that).
const BODY_TOTAL_TIMEOUT: Duration = Duration::from_secs(600);

/// How long the accept loop waits after an error that is not the client's (out of file descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Requests with images decoded and encoded at once, at most (fewer on a host with fewer cores): each can take
/// several hundred MB at the decoder's pixel limit, so a burst of small image files must queue rather than run
/// the host out of memory.
const MAX_IMAGE_PREPARATIONS: usize = 4;

/// What every handler shares.
#[derive(Clone)]
struct AppState {
    engine: EngineHandle,
    ctx: Arc<ServeContext>,
    max_body_bytes: usize,
    body_timeout: Duration,
    shutting_down: Arc<AtomicBool>,
    /// Permits for image preparation ([`MAX_IMAGE_PREPARATIONS`]).
    image_slots: Arc<tokio::sync::Semaphore>,
    /// Permits for request preparation (template and tokenizer): one per core.
    prepare_slots: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

/// The application's routes over `engine`. Request bodies over `opts.max_body_bytes` are refused with a 413 and
/// bodies that stall for `opts.body_timeout` with a 408; while `shutting_down` is set, generation requests and
/// `/health` get a 503.
pub fn router(
    engine: EngineHandle,
    ctx: Arc<ServeContext>,
    opts: &ServerOptions,
    shutting_down: Arc<AtomicBool>,
) -> Router {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let image_slots = Arc::new(tokio::sync::Semaphore::new(cores.min(MAX_IMAGE_PREPARATIONS)));
    let prepare_slots = Arc::new(tokio::sync::Semaphore::new(cores));
    let (max_body_bytes, body_timeout) = (opts.max_body_bytes, opts.body_timeout);
    let state = AppState { engine, ctx, max_body_bytes, body_timeout, shutting_down, image_slots, prepare_slots };
    let app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/version", get(version))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state);
    let app = match opts.api_key.clone() {
        Some(key) => app.layer(axum::middleware::from_fn(move |req: Request, next: Next| {
            let key = key.clone();
            async move { require_api_key(&key, req, next).await }
        })),
        None => app,
    };
    if std::env::var_os("LLAMA32_LOG_REQUESTS").is_some_and(|v| !v.is_empty() && v != "0") {
        app.layer(axum::middleware::from_fn(log_request))
    } else {
        app
    }
}

/// Serves `listener` until `shutdown` resolves, then shuts down gracefully: new generation requests get a 503, the
/// engine gets until `opts.shutdown_timeout` to finish the running requests (after which they end with an error),
/// the responses in flight are completed (connections still open 5 s after that deadline are abandoned), and the
/// engine thread is joined.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: EngineHandle,
    ctx: Arc<ServeContext>,
    opts: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let shutting_down = Arc::new(AtomicBool::new(false));
    let app = router(engine.clone(), ctx, &opts, shutting_down.clone());
    let (flag, eng, timeout) = (shutting_down.clone(), engine.clone(), opts.shutdown_timeout);
    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        flag.store(true, Ordering::SeqCst);
        eng.shutdown(Some(Instant::now() + timeout));
        let _ = fired_tx.send(());
    };
    // A client that never finishes sending its request or stops reading its response would hold a graceful
    // shutdown forever: give up on such connections a while after the engine's deadline.
    let cap = async move {
        match fired_rx.await {
            Ok(()) => tokio::time::sleep(timeout + SHUTDOWN_GRACE).await,
            Err(_) => std::future::pending().await,
        }
    };
    let served = tokio::select! {
        r = accept_loop(listener, app, &opts, signal) => r,
        () = cap => {
            eprintln!("shutdown: gave up waiting for the remaining connections");
            Ok(())
        }
    };
    if !shutting_down.swap(true, Ordering::SeqCst) {
        // The server stopped without a signal (an I/O error): stop the engine too.
        engine.shutdown(Some(Instant::now()));
    }
    let e = engine.clone();
    let joined = tokio::task::spawn_blocking(move || e.join()).await;
    served.map_err(|e| Error::Backend(format!("HTTP server: {e}")))?;
    joined.map_err(|e| Error::Backend(format!("waiting for the engine thread: {e}")))?;
    Ok(())
}

/// Accepts connections on `listener` and serves `app` on each (HTTP/1.1 with [`ServerOptions::header_timeout`])
/// until `signal` resolves; then stops accepting, lets every connection finish its requests in flight, and
/// returns once all are closed. axum's own `serve` sets no header timeout, so a client could hold a connection
/// (and a file descriptor) forever by never finishing its headers.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    opts: &ServerOptions,
    signal: impl Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper::server::conn::http1;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(opts.header_timeout);
    let graceful = GracefulShutdown::new();
    let mut signal = std::pin::pin!(signal);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut signal => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            // The client's failure (it reset or aborted before the accept): nothing to wait for.
            Err(e)
                if matches!(e.kind(), std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset) =>
            {
                continue;
            }
            Err(e) => {
                // Out of file descriptors or memory: keep serving the open connections and try again shortly.
                eprintln!("accepting a connection: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let conn = builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
        let watched = graceful.watch(conn);
        tokio::spawn(async move {
            // A connection's error (the client reset it, a header timeout) concerns that client only.
            let _ = watched.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Runs the server on a new multi-threaded runtime until Ctrl-C or SIGTERM: binds `opts.host:opts.port`, prints
/// `listening on http://HOST:PORT` to stderr, and shuts down as [`serve`] does.
pub fn run_blocking(engine: EngineHandle, ctx: ServeContext, opts: ServerOptions) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("llama32-http")
        .build()
        .map_err(|e| Error::Backend(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async move {
        let addr = if opts.host.contains(':') {
            format!("[{}]:{}", opts.host, opts.port)
        } else {
            format!("{}:{}", opts.host, opts.port)
        };
        let listener = match tokio::net::TcpListener::bind((opts.host.as_str(), opts.port)).await {
            Ok(l) => l,
            Err(e) => {
                engine.shutdown(Some(Instant::now()));
                return Err(Error::io(&addr, std::io::Error::new(e.kind(), format!("cannot listen: {e}"))));
            }
        };
        let port = listener.local_addr().map_or(opts.port, |a| a.port());
        let shown =
            if opts.host.contains(':') { format!("[{}]:{port}", opts.host) } else { format!("{}:{port}", opts.host) };
        eprintln!("listening on http://{shown}");
        let timeout = opts.shutdown_timeout;
        let signal = async move {
            shutdown_signal().await;
            eprintln!(
                "shutting down: finishing running requests (up to {:.0} s); press Ctrl-C again to quit at once",
                timeout.as_secs_f64()
            );
            // Our handlers replaced the default ones: a second signal must still end the process.
            tokio::spawn(async {
                shutdown_signal().await;
                eprintln!("second signal: exiting now");
                std::process::exit(130);
            });
        };
        serve(listener, engine, Arc::new(ctx), opts, signal).await
    })
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Lets a `/v1/*` request through only with `Authorization: Bearer KEY` (compared in constant time); a 401 in
/// OpenAI's shape otherwise. Other paths (`/health`, `/metrics`) pass.
async fn require_api_key(key: &str, req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/v1") {
        return next.run(req).await;
    }
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
        return next.run(req).await;
    }
    let e = ApiError {
        status: 401,
        message: "invalid or missing API key: send `Authorization: Bearer KEY`".into(),
        kind: "invalid_request_error",
        param: None,
    };
    let mut resp = error_response(&e);
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// Equality whose time does not depend on where the first difference is (only on the lengths).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn log_request(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let t = Instant::now();
    let resp = next.run(req).await;
    eprintln!("{method} {path} {} {:.1} ms", resp.status().as_u16(), t.elapsed().as_secs_f64() * 1e3);
    resp
}

/// The seconds a client is told to wait (`Retry-After`) before it retries a request refused with a 429.
const RETRY_AFTER_SECS: &str = "1";

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, Json(e.body())).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
    }
    resp
}

fn shutting_down_error() -> ApiError {
    ApiError::server(503, "server is shutting down")
}

async fn not_found(req: Request) -> Response {
    let e = ApiError {
        status: 404,
        message: format!("{} {}: no such route", req.method(), req.uri().path()),
        kind: "invalid_request_error",
        param: None,
    };
    error_response(&e)
}

async fn method_not_allowed(req: Request) -> Response {
    let e = ApiError {
        status: 405,
        message: format!("{}: method {} is not allowed", req.uri().path(), req.method()),
        kind: "invalid_request_error",
        param: None,
    };
    error_response(&e)
}

async fn health(State(s): State<AppState>) -> Response {
    if s.shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "shutting down"}))).into_response()
    } else {
        Json(json!({"status": "ok"})).into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let text = s.engine.metrics().render(&s.ctx.model_name);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

fn model_card(ctx: &ServeContext) -> Value {
    json!({
        "id": ctx.model_name, "object": "model", "created": ctx.started, "owned_by": "llama32",
        "max_model_len": ctx.info.max_model_len,
    })
}

async fn list_models(State(s): State<AppState>) -> Response {
    Json(json!({"object": "list", "data": [model_card(&s.ctx)]})).into_response()
}

async fn get_model(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    if id == s.ctx.model_name {
        return Json(model_card(&s.ctx)).into_response();
    }
    let e = ApiError {
        status: 404,
        message: format!("model `{id}` does not exist; this server serves `{}`", s.ctx.model_name),
        kind: "invalid_request_error",
        param: Some("model".into()),
    };
    error_response(&e)
}

async fn version() -> Response {
    Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}

/// vLLM's `/tokenize` and `/detokenize` ([`api::tokenize`], [`api::detokenize`]), off the async workers.
async fn token_route(
    s: AppState,
    headers: &HeaderMap,
    body: Body,
    f: fn(&ServeContext, &Value) -> std::result::Result<Value, ApiError>,
) -> Response {
    let bytes = match read_body(headers, body, s.max_body_bytes, s.body_timeout).await {
        Ok(b) => b,
        Err(e) => return error_response(&e),
    };
    let ctx = s.ctx.clone();
    match blocking(&s.prepare_slots, "tokenization", move || f(&ctx, &parse_json(&bytes)?)).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(&e),
    }
}

/// Runs `work` off the async workers (which answer everyone else) once `slots` has a permit, so that only a
/// bounded number run at once. The permit moves into the blocking task: a client that goes away drops its handler,
/// not the work already started, so the permit must live as long as the work. `what` names the work in the 500
/// for a task that panicked.
async fn blocking<T: Send + 'static>(
    slots: &Arc<tokio::sync::Semaphore>,
    what: &str,
    work: impl FnOnce() -> std::result::Result<T, ApiError> + Send + 'static,
) -> std::result::Result<T, ApiError> {
    let Ok(permit) = slots.clone().acquire_owned().await else {
        return Err(shutting_down_error());
    };
    let task = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work()
    });
    task.await.unwrap_or_else(|e| Err(ApiError::server(500, format!("{what} failed: {e}"))))
}

async fn tokenize(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    token_route(s, &headers, body, api::tokenize).await
}

async fn detokenize(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    token_route(s, &headers, body, api::detokenize).await
}

async fn chat_completions(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    generate(s, Endpoint::Chat, &headers, body).await
}

async fn completions(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    generate(s, Endpoint::Completions, &headers, body).await
}

/// The 413 for a body over `limit` bytes.
fn too_large(limit: usize) -> ApiError {
    ApiError {
        status: 413,
        ..ApiError::bad_request(None, format!("request body: larger than the limit of {limit} bytes"))
    }
}

/// The 408 for a body that did not arrive in time.
fn body_timed_out(what: String) -> ApiError {
    ApiError { status: 408, ..ApiError::bad_request(None, format!("request body: {what}")) }
}

/// Reads a request body of at most `limit` bytes ([`parse_json`] parses it): a declared `Content-Length` over the
/// limit is refused before any byte is read (413), and a body that pauses for `idle` (or takes
/// [`BODY_TOTAL_TIMEOUT`] in all) gets a 408.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    idle: Duration,
) -> std::result::Result<Vec<u8>, ApiError> {
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let deadline = tokio::time::Instant::now() + BODY_TOTAL_TIMEOUT;
    let mut data = body.into_data_stream();
    // Room for the declared length, but no more than 1 MiB up front: a client's word costs nothing to give.
    let mut bytes = Vec::with_capacity(declared.map_or(0, |n| n.min(1 << 20) as usize));
    loop {
        let wait = (tokio::time::Instant::now() + idle).min(deadline);
        let chunk = match tokio::time::timeout_at(wait, data.next()).await {
            Ok(Some(Ok(c))) => c,
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad_request(None, format!("request body: could not be read: {e}")));
            }
            Err(_) if wait == deadline => {
                return Err(body_timed_out(format!("not complete within {} s", BODY_TOTAL_TIMEOUT.as_secs())));
            }
            Err(_) => {
                let (secs, got) = (idle.as_secs_f64(), bytes.len());
                return Err(body_timed_out(format!("no data for {secs:.0} s (after {got} bytes)")));
            }
        };
        if bytes.len() + chunk.len() > limit {
            return Err(too_large(limit));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// A request body as JSON. Called off the async workers: 16 MB of token ids take about half a second to parse.
fn parse_json(bytes: &[u8]) -> std::result::Result<Value, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ApiError::bad_request(None, format!("request body is not valid UTF-8 (at byte {})", e.valid_up_to()))
    })?;
    serde_json::from_str(text).map_err(|e| ApiError::bad_request(None, format!("request body is not valid JSON: {e}")))
}

/// A generation request: parse, validate, submit every prompt, then answer with JSON or a stream of events.
async fn generate(s: AppState, endpoint: Endpoint, headers: &HeaderMap, body: Body) -> Response {
    if s.shutting_down() {
        return error_response(&shutting_down_error());
    }
    let bytes = match read_body(headers, body, s.max_body_bytes, s.body_timeout).await {
        Ok(b) => b,
        Err(e) => return error_response(&e),
    };
    // Parsing a large body, and rendering and tokenizing a long prompt, take seconds.
    let ctx = s.ctx.clone();
    let prepare = move || api::prepare(&ctx, endpoint, &parse_json(&bytes)?);
    let mut prep = match blocking(&s.prepare_slots, "request preparation", prepare).await {
        Ok(p) => p,
        Err(e) => return error_response(&e),
    };
    if !prep.images.is_empty() {
        // Image decoding and encoding are heavy compute and memory: a few at a time.
        let ctx = s.ctx.clone();
        let encoded =
            blocking(&s.image_slots, "image encoding", move || api::attach_images(&ctx, &mut prep).map(|()| prep));
        match encoded.await {
            Ok(p) => prep = p,
            Err(e) => return error_response(&e),
        }
    }
    let mut streams = Vec::with_capacity(prep.requests.len());
    for req in &prep.requests {
        match s.engine.submit(req.clone()).await {
            Ok(st) => streams.push(st),
            // Dropping `streams` aborts the prompts already submitted.
            Err(e) => return error_response(&submit_error(&s, &e)),
        }
    }
    if prep.stream {
        stream_response(s, prep, streams)
    } else {
        json_response(s, prep, streams).await
    }
}

fn submit_error(s: &AppState, e: &Error) -> ApiError {
    if s.shutting_down() {
        return shutting_down_error();
    }
    match e {
        Error::Request(_) => ApiError::from_request_error(e),
        // Transient: 429, as OpenAI answers a rate limit, so that clients back off and retry.
        Error::Overloaded(m) => ApiError::server(429, m.clone()),
        Error::Backend(m) => ApiError::server(503, format!("the engine is not available: {m}")),
        other => ApiError::server(500, other.to_string()),
    }
}

/// The status of an error that ended a request in the engine.
fn engine_error(s: &AppState, msg: String) -> ApiError {
    ApiError::server(if s.shutting_down() { 503 } else { 500 }, msg)
}

/// The events of every prompt's stream, tagged with the prompt's index, in arrival order.
fn merge(streams: Vec<RequestStream>) -> SelectAll<BoxStream<'static, (usize, Event)>> {
    stream::select_all(
        streams.into_iter().enumerate().map(|(i, st)| {
            stream::unfold(st, move |mut st| async move { st.next().await.map(|e| ((i, e), st)) }).boxed()
        }),
    )
}

const ENDED_EARLY: &str = "the engine stopped before the request finished";

async fn json_response(s: AppState, prep: Prepared, streams: Vec<RequestStream>) -> Response {
    let total = streams.len();
    let mut events = merge(streams);
    let mut rb = ResponseBuilder::new(&s.ctx, &prep);
    let mut done = 0;
    while let Some((i, ev)) = events.next().await {
        done += matches!(ev, Event::Done(_)) as usize;
        if let Err(msg) = rb.push(i, ev) {
            return error_response(&engine_error(&s, msg));
        }
    }
    if done < total {
        return error_response(&engine_error(&s, ENDED_EARLY.into()));
    }
    // Building and serializing a large response (prompt logprobs of a long prompt, many choices) takes a while:
    // this worker hands its other tasks on meanwhile (on a runtime with several workers; `run` makes one).
    let build = || Json(rb.build()).into_response();
    let multi = tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread;
    let mut resp = if multi { tokio::task::block_in_place(build) } else { build() };
    set_request_id(&mut resp, &prep.id);
    resp
}

/// `x-request-id`: the response's id, which OpenAI's clients expose as `_request_id`.
fn set_request_id(resp: &mut Response, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert("x-request-id", v);
    }
}

fn sse_data(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn stream_response(s: AppState, prep: Prepared, streams: Vec<RequestStream>) -> Response {
    let id = prep.id.clone();
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let driver = async move {
        let total = streams.len();
        let mut events = merge(streams);
        let mut sb = StreamBuilder::new(&s.ctx, &prep);
        let (mut done, mut failed) = (0, false);
        while let Some((i, ev)) = events.next().await {
            done += matches!(ev, Event::Done(_)) as usize;
            match sb.push(i, ev) {
                Ok(chunks) => chunks.iter().for_each(|c| {
                    let _ = tx.send(sse_data(c));
                }),
                Err(msg) => {
                    let _ = tx.send(sse_data(&engine_error(&s, msg).body()));
                    failed = true;
                    break;
                }
            }
        }
        if !failed && done < total {
            let _ = tx.send(sse_data(&engine_error(&s, ENDED_EARLY.into()).body()));
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n"));
    };
    let body = Body::from_stream(Driven { rx, driver: Some(Box::pin(driver)) });
    let mut resp = Response::new(body);
    set_request_id(&mut resp, &id);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// A body stream driven by the future that produces it: the future (which owns the request's engine streams) runs
/// only while the body is polled, and dropping the body (a client that went away) drops it, aborting the request.
struct Driven {
    rx: mpsc::UnboundedReceiver<Bytes>,
    driver: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Stream for Driven {
    type Item = std::result::Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(b)) => return Poll::Ready(Some(Ok(b))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
            let Some(d) = this.driver.as_mut() else { return Poll::Ready(None) };
            match d.as_mut().poll(cx) {
                // Finished: the sender is gone, so the next poll of `rx` drains what is left and ends.
                Poll::Ready(()) => this.driver = None,
                Poll::Pending => {
                    return match this.rx.poll_recv(cx) {
                        Poll::Ready(Some(b)) => Poll::Ready(Some(Ok(b))),
                        Poll::Ready(None) => Poll::Ready(None),
                        Poll::Pending => Poll::Pending,
                    }
                }
            }
        }
    }
}
