//! Offline batch files (`llama32 batch`): an OpenAI batch input file (one request per line, with `custom_id`,
//! `method`, `url` and `body`) run through the engine, results written as OpenAI batch output lines in input order.
//!
//! Lines are parsed and validated ahead of the engine, submitted in groups sorted by prompt ids (requests that share
//! a prefix are admitted together and hit the prefix cache), and drained concurrently; at most
//! [`BatchOptions::max_in_flight`] engine requests are outstanding. Results complete out of order and pass through
//! a reorder buffer, whose ready prefix is written (and the writer flushed) as soon as it is complete.
//!
//! An existing output file is resumed: the results already there are kept, a torn last line (a crash in the middle
//! of a write) is cut off, and only the input lines without a result are run and appended. Lines are matched by
//! `custom_id` and its occurrence: the `k`-th input line with a given id (or without a readable id) is done when
//! the output holds more than `k` results with that id (or with `custom_id: null`).

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::Poll;
use std::time::Instant;

use futures_util::stream::{FuturesUnordered, StreamExt};
use serde_json::{json, Value as Json};

use super::api::{self, ApiError, Endpoint, Prepared, ResponseBuilder, ServeContext};
use super::engine::{EngineHandle, RequestStream};
use super::{Event, GenerateRequest};
use crate::{Error, Result};

/// Where a batch comes from and goes to, and how much runs at once.
#[derive(Clone, Debug)]
pub struct BatchOptions {
    /// Input file: OpenAI batch requests, one JSON object per line.
    pub input: PathBuf,
    /// Output file: one result line per non-blank input line, in input order; an existing file is resumed.
    pub output: PathBuf,
    /// Most engine requests submitted and not yet finished (each prompt of a line counts once).
    pub max_in_flight: usize,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

impl BatchOptions {
    /// Options for `input` -> `output` with the defaults: 1024 requests in flight, no progress bar.
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        BatchOptions { input: input.into(), output: output.into(), max_in_flight: 1024, progress: false }
    }
}

/// What a batch run did.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct BatchSummary {
    /// Non-blank input lines.
    pub total: usize,
    /// Lines whose result was already in the output (resumed run).
    pub skipped: usize,
    /// Results with status 200 written by this run.
    pub succeeded: usize,
    /// Other results written by this run (error records, 400s, 500s).
    pub failed: usize,
    /// Prompt tokens of this run's successful requests.
    pub prompt_tokens: u64,
    /// Completion tokens of this run's successful requests.
    pub completion_tokens: u64,
    /// Wall-clock time of the run.
    pub seconds: f64,
    /// `completion_tokens / seconds`.
    pub output_tokens_per_s: f64,
}

/// Checks, without touching either file, what can be checked before a model is loaded: the input opens, the output
/// can be created in its directory, and the output is not the input (by path, symbolic link or hard link). Returns
/// the opened input.
pub fn check_files(opts: &BatchOptions) -> Result<File> {
    let input = File::open(&opts.input).map_err(|e| Error::io(&opts.input, e))?;
    check_output_dir(&opts.output)?;
    if same_file(&opts.input, &opts.output) {
        return Err(Error::request(format!("batch: the output file {} is the input file", opts.output.display())));
    }
    Ok(input)
}

/// Whether two paths name the same existing file: the same device and inode where the platform has them (a hard
/// link has another path but the same inode), else the same canonical path.
fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// How every result line of an output file starts (serde_json keeps the key order): a torn last line, which an
/// interrupted write leaves, starts so too, or is a prefix of it.
const RECORD_START: &[u8] = b"{\"id\":\"batch_req_";

/// Runs the batch `opts.input` through `engine` and writes (or completes) `opts.output`.
///
/// Must be called from a plain thread: it runs its own (current-thread) tokio runtime. Errors (returned before or
/// while writing) concern the files or the engine as a whole; problems with single lines become result lines.
pub fn run_batch(engine: &EngineHandle, ctx: &ServeContext, opts: &BatchOptions) -> Result<BatchSummary> {
    let started = Instant::now();
    if opts.max_in_flight == 0 {
        return Err(Error::request("batch: max_in_flight must be at least 1"));
    }
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::request("batch: run_batch must be called from a plain thread, not inside a tokio runtime"));
    }
    let input = check_files(opts)?;
    let existing = Existing::load(&opts.output)?;
    if existing.cut > 0 && opts.progress {
        eprintln!(
            "{}: cut off a torn last line ({} bytes) left by an interrupted run",
            opts.output.display(),
            existing.cut
        );
    }
    let file =
        OpenOptions::new().create(true).append(true).open(&opts.output).map_err(|e| Error::io(&opts.output, e))?;
    let mut out = Output { w: BufWriter::new(file), path: opts.output.clone() };
    if existing.missing_newline {
        out.write_raw(b"\n")?;
        out.flush()?;
    }

    let progress = if opts.progress {
        let total = count_nonblank(&opts.input)?;
        let bar = indicatif::ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40.cyan/blue} {pos}/{len} requests [{elapsed_precise} < {eta_precise}] {msg}",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Backend(format!("batch: cannot start an async runtime: {e}")))?;
    let mut run = Run {
        engine,
        ctx,
        opts,
        input: Input { r: BufReader::new(input), path: opts.input.clone(), line: 0, buf: Vec::new() },
        out,
        existing: existing.counts,
        occurrences: HashMap::new(),
        first_line: HashMap::new(),
        reorder: Reorder::default(),
        summary: BatchSummary::default(),
        progress,
        started,
    };
    let result = rt.block_on(run.drive());
    let flushed = run.out.flush();
    run.summary.seconds = started.elapsed().as_secs_f64();
    run.summary.output_tokens_per_s =
        if run.summary.seconds > 0.0 { run.summary.completion_tokens as f64 / run.summary.seconds } else { 0.0 };
    run.progress.set_message(run.rate_message());
    run.progress.finish();
    result?;
    flushed?;
    Ok(run.summary)
}

/// Fails, naming the file, when the output's directory does not exist.
fn check_output_dir(output: &Path) -> Result<()> {
    let dir = match output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => return Ok(()),
    };
    if !dir.is_dir() {
        return Err(Error::io(
            output,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("the output directory {} does not exist", dir.display()),
            ),
        ));
    }
    Ok(())
}

/// Non-blank lines of `path` (for the progress bar's length).
fn count_nonblank(path: &Path) -> Result<u64> {
    let mut r = BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?);
    let mut buf = Vec::new();
    let mut n = 0;
    loop {
        buf.clear();
        if r.read_until(b'\n', &mut buf).map_err(|e| Error::io(path, e))? == 0 {
            return Ok(n);
        }
        if !buf.iter().all(u8::is_ascii_whitespace) {
            n += 1;
        }
    }
}

/// The results an existing output file holds.
#[derive(Default)]
struct Existing {
    /// Results per `custom_id` (None: `custom_id: null`).
    counts: HashMap<Option<String>, usize>,
    /// Bytes cut off the end (a torn last line).
    cut: u64,
    /// The last line is a complete result without its newline.
    missing_newline: bool,
}

impl Existing {
    /// Reads `path` (absent: empty), cutting off a torn last line. A bad line before the last is an error: only
    /// the tail of a crash is repaired, never a good line deleted.
    fn load(path: &Path) -> Result<Self> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::default()),
            Err(e) => return Err(Error::io(path, e)),
        };
        let io = |e| Error::io(path, e);
        let len = file.metadata().map_err(io)?.len();
        let mut r = BufReader::new(&file);
        let mut ex = Existing::default();
        let (mut pos, mut good_end, mut line_no) = (0u64, 0u64, 0usize);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = r.read_until(b'\n', &mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            line_no += 1;
            pos += n as u64;
            let last = pos >= len;
            let has_newline = buf.last() == Some(&b'\n');
            if buf.iter().all(u8::is_ascii_whitespace) {
                if has_newline {
                    good_end = pos;
                }
                continue;
            }
            match serde_json::from_slice::<Json>(&buf) {
                // A result line has the shape this runner writes; an input file (it has `custom_id`s too) or any
                // other JSON lines given as --output are someone's data, not results to resume from.
                Ok(v)
                    if !(v.get("id").and_then(Json::as_str).is_some_and(|i| i.starts_with("batch_req_"))
                        && v.get("response").is_some()
                        && v.get("error").is_some()) =>
                {
                    return Err(Error::request(format!(
                        "{}: line {line_no} is not a batch result (no `id` of batch_req_..., `response` and `error`); \
                         refusing to append to it",
                        path.display()
                    )))
                }
                Ok(v) => {
                    let id = match v.get("custom_id") {
                        Some(Json::String(s)) => Some(s.clone()),
                        Some(Json::Null) => None,
                        _ => {
                            return Err(Error::request(format!(
                                "{}: line {line_no} is not a batch result (no custom_id); refusing to append to it",
                                path.display()
                            )))
                        }
                    };
                    *ex.counts.entry(id).or_default() += 1;
                    good_end = pos;
                    ex.missing_newline = !has_newline;
                }
                // Only what an interrupted write of a result leaves is cut: the last line, without its newline,
                // starting as every result line does. Anything else is someone's data, and is left alone.
                // (A power loss can also leave a block of NUL bytes after the last complete line.)
                Err(_)
                    if last
                        && !has_newline
                        && (buf.starts_with(RECORD_START)
                            || RECORD_START.starts_with(&buf)
                            || buf.iter().all(|&b| b == 0)) =>
                {
                    break
                }
                Err(e) => {
                    return Err(Error::request(format!(
                        "{}: line {line_no} is not valid JSON ({e}) and is not a torn result line (only the last line \
                         of an interrupted write is repaired); refusing to append to it",
                        path.display()
                    )))
                }
            }
        }
        if good_end < len {
            file.set_len(good_end).map_err(io)?;
            ex.cut = len - good_end;
        }
        Ok(ex)
    }
}

/// The input file, line by line.
struct Input {
    r: BufReader<File>,
    path: PathBuf,
    /// Number (1-based) of the last line read.
    line: usize,
    buf: Vec<u8>,
}

impl Input {
    /// The next non-blank line and its number, without its line ending.
    fn next_line(&mut self) -> Result<Option<(usize, &[u8])>> {
        loop {
            self.buf.clear();
            let n = self.r.read_until(b'\n', &mut self.buf).map_err(|e| Error::io(&self.path, e))?;
            if n == 0 {
                return Ok(None);
            }
            self.line += 1;
            if !self.buf.iter().all(u8::is_ascii_whitespace) {
                let end = self.buf.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
                return Ok(Some((self.line, &self.buf[..end])));
            }
        }
    }
}

/// The output file.
struct Output {
    w: BufWriter<File>,
    path: PathBuf,
}

impl Output {
    fn write_raw(&mut self, b: &[u8]) -> Result<()> {
        self.w.write_all(b).map_err(|e| Error::io(&self.path, e))
    }
    fn flush(&mut self) -> Result<()> {
        self.w.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// One output line, ready to write.
struct Record {
    line: String,
    /// Status 200.
    ok: bool,
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// Output lines by slot (input order), written as soon as every earlier one is there.
#[derive(Default)]
struct Reorder {
    /// Slot of `slots[0]`.
    base: usize,
    slots: VecDeque<Option<Record>>,
}

impl Reorder {
    fn alloc(&mut self) -> usize {
        self.slots.push_back(None);
        self.base + self.slots.len() - 1
    }
    fn fill(&mut self, slot: usize, r: Record) {
        if let Some(s) = slot.checked_sub(self.base).and_then(|i| self.slots.get_mut(i)) {
            *s = Some(r);
        }
    }
    /// Slots taken and not yet written.
    fn outstanding(&self) -> usize {
        self.slots.len()
    }
}

/// A validated line on its way through the engine.
struct Job {
    slot: usize,
    custom_id: String,
    prep: Prepared,
}

impl Job {
    /// Engine requests it takes.
    fn weight(&self) -> usize {
        self.prep.requests.len()
    }
    /// Sort key: the first prompt's ids.
    fn key(&self) -> &[u32] {
        self.prep.requests.first().map_or(&[], |r| r.prompt.as_slice())
    }
}

/// What a line turned into.
enum Parsed {
    /// Its result is already in the output.
    Skip,
    /// A result that needs no engine (an error record or a 400).
    Ready(Record),
    /// A request for the engine.
    Run(Box<Job>),
}

/// Events of a job's requests (prompt index, event) with consecutive deltas merged, or the error that ended it.
type Outcome = std::result::Result<Vec<(usize, Event)>, String>;

fn batch_id() -> String {
    let call = crate::tool_calls::new_call_id();
    format!("batch_req_{}", call.trim_start_matches("call_"))
}

fn to_line(v: &Json) -> String {
    // Serializing a `Value` cannot fail (its map keys are strings).
    serde_json::to_string(v).unwrap_or_default()
}

/// `v` as JSON, cut to 64 characters for an error message.
fn short_json(v: &Json) -> String {
    let text = v.to_string();
    match text.char_indices().nth(64) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text,
    }
}

/// An error record: no response.
fn error_record(custom_id: Option<&str>, code: &str, message: String) -> Record {
    let v = json!({
        "id": batch_id(), "custom_id": custom_id, "response": null,
        "error": {"code": code, "message": message},
    });
    Record { line: to_line(&v), ok: false, prompt_tokens: 0, completion_tokens: 0 }
}

/// A response record (`status_code` 200 with the response object, or an error status with its body).
fn response_record(custom_id: &str, status: u16, request_id: &str, body: Json) -> Record {
    let v = json!({
        "id": batch_id(), "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": null,
    });
    Record { line: to_line(&v), ok: status == 200, prompt_tokens: 0, completion_tokens: 0 }
}

fn api_error_record(custom_id: &str, endpoint: Endpoint, e: &ApiError) -> Record {
    let prefix = if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" };
    response_record(custom_id, e.status, &api::new_id(prefix), e.body())
}

/// Polls `futs` in order until all are ready: every future's first poll happens before any waiting, in order.
async fn all_in_order<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<Option<Pin<Box<F>>>> = futs.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, o) in futs.iter_mut().zip(out.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *o = Some(v);
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// Drains a job's streams (one per prompt) into its events.
async fn drain(job: Job, streams: Vec<RequestStream>) -> (Job, Outcome) {
    let mut events: Vec<(usize, Event)> = Vec::new();
    for (p, mut s) in streams.into_iter().enumerate() {
        loop {
            match s.next().await {
                Some(Event::Error(m)) => return (job, Err(m)),
                Some(Event::Done(u)) => {
                    events.push((p, Event::Done(u)));
                    break;
                }
                Some(Event::Delta { index, text, ids, logprobs }) => {
                    if let Some((lp, Event::Delta { index: li, text: lt, ids: lids, logprobs: llps })) =
                        events.last_mut()
                    {
                        if *lp == p && *li == index {
                            lt.push_str(&text);
                            lids.extend(ids);
                            llps.extend(logprobs);
                            continue;
                        }
                    }
                    events.push((p, Event::Delta { index, text, ids, logprobs }));
                }
                Some(e) => events.push((p, e)),
                None => return (job, Err("the engine stopped before the request finished".into())),
            }
        }
    }
    (job, Ok(events))
}

/// The state of one run.
struct Run<'a> {
    engine: &'a EngineHandle,
    ctx: &'a ServeContext,
    opts: &'a BatchOptions,
    input: Input,
    out: Output,
    /// Results already in the output, per custom_id.
    existing: HashMap<Option<String>, usize>,
    /// Input lines seen so far, per custom_id.
    occurrences: HashMap<Option<String>, usize>,
    /// The line where each custom_id first appeared.
    first_line: HashMap<String, usize>,
    reorder: Reorder,
    summary: BatchSummary,
    progress: indicatif::ProgressBar,
    started: Instant,
}

impl Run<'_> {
    fn rate_message(&self) -> String {
        let s = self.started.elapsed().as_secs_f64();
        let rate = if s > 0.0 { self.summary.completion_tokens as f64 / s } else { 0.0 };
        format!("{rate:.1} output tok/s")
    }

    /// Writes the ready prefix of the reorder buffer and flushes the writer.
    fn flush_ready(&mut self) -> Result<()> {
        let mut wrote = false;
        while let Some(Some(_)) = self.reorder.slots.front() {
            let Some(Some(r)) = self.reorder.slots.pop_front() else { break };
            self.reorder.base += 1;
            self.out.write_raw(r.line.as_bytes())?;
            self.out.write_raw(b"\n")?;
            if r.ok {
                self.summary.succeeded += 1;
                self.summary.prompt_tokens += r.prompt_tokens;
                self.summary.completion_tokens += r.completion_tokens;
            } else {
                self.summary.failed += 1;
            }
            self.progress.inc(1);
            wrote = true;
        }
        if wrote {
            self.out.flush()?;
            self.progress.set_message(self.rate_message());
        }
        Ok(())
    }

    /// Validates input line `n`.
    fn parse(&mut self, n: usize, bytes: &[u8]) -> Parsed {
        let input = self.opts.input.display().to_string();
        let msg = |m: String| format!("line {n}: {m} (input {input})");
        let (obj, custom_id, problem) = match std::str::from_utf8(bytes) {
            Err(e) => (None, None, Some(format!("not valid UTF-8 ({e})"))),
            Ok(text) => match serde_json::from_str::<Json>(text) {
                Err(e) => (None, None, Some(format!("invalid JSON: {e}"))),
                Ok(Json::Object(o)) => match o.get("custom_id") {
                    Some(Json::String(s)) => {
                        let id = s.clone();
                        (Some(o), Some(id), None)
                    }
                    None | Some(Json::Null) => (None, None, Some("missing field `custom_id`".to_string())),
                    Some(v) => (None, None, Some(format!("custom_id: expected a string, got {}", short_json(v)))),
                },
                Ok(_) => (None, None, Some("expected a JSON object".to_string())),
            },
        };
        // Resume: skip the lines whose result is already in the output.
        let seen = self.occurrences.entry(custom_id.clone()).or_default();
        let k = *seen;
        *seen += 1;
        if let (Some(id), 0) = (&custom_id, k) {
            self.first_line.insert(id.clone(), n);
        }
        if self.existing.get(&custom_id).is_some_and(|&c| c > k) {
            return Parsed::Skip;
        }
        let (Some(obj), Some(id)) = (obj, custom_id) else {
            return Parsed::Ready(error_record(None, "invalid_request", msg(problem.unwrap_or_default())));
        };
        if k > 0 {
            let first = self.first_line.get(&id).copied().unwrap_or(0);
            return Parsed::Ready(error_record(
                Some(&id),
                "duplicate_custom_id",
                msg(format!("custom_id `{id}` already appeared on line {first}")),
            ));
        }
        match obj.get("method") {
            Some(Json::String(m)) if m.eq_ignore_ascii_case("POST") => {}
            Some(Json::String(m)) => {
                return Parsed::Ready(error_record(
                    Some(&id),
                    "invalid_method",
                    msg(format!("method `{m}` is not supported; only POST")),
                ))
            }
            None | Some(Json::Null) => {
                return Parsed::Ready(error_record(Some(&id), "invalid_method", msg("missing field `method`".into())))
            }
            Some(_) => {
                return Parsed::Ready(error_record(
                    Some(&id),
                    "invalid_method",
                    msg("method: expected a string".into()),
                ))
            }
        }
        let endpoint = match obj.get("url") {
            Some(Json::String(u)) => match Endpoint::from_path(u) {
                Some(e) => e,
                None => {
                    return Parsed::Ready(error_record(
                        Some(&id),
                        "invalid_url",
                        msg(format!(
                            "url `{u}` is not supported; use {} or {}",
                            Endpoint::Chat.path(),
                            Endpoint::Completions.path()
                        )),
                    ))
                }
            },
            None | Some(Json::Null) => {
                return Parsed::Ready(error_record(Some(&id), "invalid_url", msg("missing field `url`".into())))
            }
            Some(_) => {
                return Parsed::Ready(error_record(Some(&id), "invalid_url", msg("url: expected a string".into())))
            }
        };
        let mut body = match obj.get("body") {
            Some(Json::Object(b)) => b.clone(),
            None | Some(Json::Null) => {
                return Parsed::Ready(error_record(Some(&id), "invalid_request", msg("missing field `body`".into())))
            }
            Some(_) => {
                return Parsed::Ready(error_record(
                    Some(&id),
                    "invalid_request",
                    msg("body: expected a JSON object".into()),
                ))
            }
        };
        // Batch results are complete objects: streaming is off whatever the body says.
        body.remove("stream");
        body.remove("stream_options");
        match api::prepare(self.ctx, endpoint, &Json::Object(body))
            .and_then(|mut prep| api::attach_images(self.ctx, &mut prep).map(|()| prep))
        {
            Ok(prep) => Parsed::Run(Box::new(Job { slot: 0, custom_id: id, prep })),
            Err(e) => Parsed::Ready(api_error_record(&id, endpoint, &e)),
        }
    }

    /// The result line of a finished job.
    fn finish(&self, job: &Job, outcome: Outcome) -> Record {
        let events = match outcome {
            Ok(ev) => ev,
            Err(m) => return response_record(&job.custom_id, 500, &job.prep.id, ApiError::server(500, m).body()),
        };
        let mut b = ResponseBuilder::new(self.ctx, &job.prep);
        let (mut prompt_tokens, mut completion_tokens) = (0u64, 0u64);
        for (p, e) in events {
            if let Event::Done(u) = &e {
                prompt_tokens += u.prompt_tokens as u64;
                // `max_tokens: 0` with `echo`: the one token generated is not part of the answer.
                if !job.prep.prompt_only {
                    completion_tokens += u.completion_tokens as u64;
                }
            }
            if let Err(m) = b.push(p, e) {
                return response_record(&job.custom_id, 500, &job.prep.id, ApiError::server(500, m).body());
            }
        }
        let mut r = response_record(&job.custom_id, 200, &job.prep.id, b.build());
        r.prompt_tokens = prompt_tokens;
        r.completion_tokens = completion_tokens;
        r
    }

    /// Submits `group` sorted by prompt, every request sent before any acknowledgement is awaited (so the engine
    /// admits them together). Returns the accepted jobs with their streams; refused ones get their 400 result.
    async fn submit(&mut self, mut group: Vec<Job>) -> Result<Vec<(Job, Vec<RequestStream>)>> {
        group.sort_by(|a, b| a.key().cmp(b.key()));
        let reqs: Vec<GenerateRequest> = group.iter().flat_map(|j| j.prep.requests.iter().cloned()).collect();
        let engine = self.engine;
        let mut acks = all_in_order(reqs.into_iter().map(|r| engine.submit(r)).collect()).await.into_iter();
        let mut accepted = Vec::with_capacity(group.len());
        for job in group {
            let mut streams = Vec::with_capacity(job.weight());
            let mut refused = None;
            for ack in acks.by_ref().take(job.weight()) {
                match ack {
                    Ok(s) => streams.push(s),
                    Err(e @ Error::Request(_)) => refused = refused.or(Some(ApiError::from_request_error(&e))),
                    Err(e) => return Err(e),
                }
            }
            match refused {
                // Dropping the accepted streams of a partly refused job aborts them.
                Some(e) => {
                    let r = api_error_record(&job.custom_id, job.prep.endpoint, &e);
                    self.reorder.fill(job.slot, r);
                }
                None => accepted.push((job, streams)),
            }
        }
        Ok(accepted)
    }

    /// The main loop: read ahead, submit groups, collect results, write them in order.
    async fn drive(&mut self) -> Result<()> {
        let max = self.opts.max_in_flight;
        let group_size = (max / 4).max(1);
        // Bound on the slots taken and not yet written (the reorder buffer plus what is in flight).
        let window = max.saturating_mul(8).max(64);
        let mut running = FuturesUnordered::new();
        let mut in_flight = 0usize;
        let mut group: Vec<Job> = Vec::new();
        let mut exhausted = false;
        loop {
            while !exhausted && group.len() < group_size && self.reorder.outstanding() < window {
                let Some((n, bytes)) = self.input.next_line()? else {
                    exhausted = true;
                    break;
                };
                let bytes = bytes.to_vec();
                self.summary.total += 1;
                match self.parse(n, &bytes) {
                    Parsed::Skip => {
                        self.summary.skipped += 1;
                        self.progress.inc(1);
                    }
                    Parsed::Ready(r) => {
                        let slot = self.reorder.alloc();
                        self.reorder.fill(slot, r);
                    }
                    Parsed::Run(job) => {
                        let mut job = *job;
                        job.slot = self.reorder.alloc();
                        group.push(job);
                    }
                }
            }
            self.flush_ready()?;
            let weight: usize = group.iter().map(|j| j.weight()).sum();
            let full = group.len() >= group_size || exhausted || self.reorder.outstanding() >= window;
            if !group.is_empty() && full && (in_flight + weight <= max || in_flight == 0) {
                for (job, streams) in self.submit(std::mem::take(&mut group)).await? {
                    in_flight += job.weight();
                    running.push(drain(job, streams));
                }
                self.flush_ready()?;
                continue;
            }
            match running.next().await {
                Some((job, outcome)) => {
                    in_flight -= job.weight();
                    let r = self.finish(&job, outcome);
                    self.reorder.fill(job.slot, r);
                    // Take whatever else has finished before writing.
                    while let Some(Some((job, outcome))) = futures_util::FutureExt::now_or_never(running.next()) {
                        in_flight -= job.weight();
                        let r = self.finish(&job, outcome);
                        self.reorder.fill(job.slot, r);
                    }
                    self.flush_ready()?;
                }
                None if exhausted && group.is_empty() => break,
                None => {}
            }
        }
        self.flush_ready()?;
        if self.reorder.outstanding() > 0 {
            return Err(Error::Backend("batch: results are missing at the end of the run".into()));
        }
        Ok(())
    }
}
