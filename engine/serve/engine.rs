//! The engine thread: one OS thread owns the executor, the scheduler and the detokenizers, and runs
//! schedule -> step -> update while requests come and go.
//!
//! Requests arrive as commands on a channel; each carries an unbounded event channel back to its caller. The loop
//! blocks only when it has no work. A caller that goes away (its [`RequestStream`] dropped, e.g. a client that
//! disconnected) aborts its request at once through the stream's drop guard, and a failed send aborts it at the
//! next token, so its KV blocks are freed. Shutdown stops admission, lets the running requests finish until a
//! deadline, then fails the rest with an error event, so no caller waits forever.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{mpsc as tmpsc, oneshot};

use super::guided::Guide;
use super::images::{ImageSets, Parked};
use super::metrics::Metrics;
use super::{Event, GenerateRequest, TokenLogprob, Usage};
use crate::config::LlamaConfig;
use crate::exec::Executor;
use crate::kv::prefix::{KvManager, SeqId};
use crate::sampling::FinishReason;
use crate::sched::{Scheduler, SchedulerConfig, SeqVision};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::{Error, Result};

mod guides;
mod scoring;

/// Most completions (`best_of`) one request may ask for.
pub const MAX_COMPLETIONS: usize = 128;
/// Most alternatives per position with `logprobs`.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Engine limits.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most new tokens per step (decodes count one each; prefill chunks are cut to fit).
    pub max_step_tokens: usize,
    /// Most running sequences.
    pub max_seqs: usize,
    /// Most sequences waiting for admission before new requests are refused (0: no limit).
    pub max_waiting: usize,
    /// Longest sequence (prompt + output) served; `None`: the model's context length, capped to what the KV cache
    /// holds (so that every accepted request can run alone), as vLLM does. A value above either is an error.
    pub max_model_len: Option<usize>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { max_step_tokens: 2048, max_seqs: 256, max_waiting: 0, max_model_len: None }
    }
}

/// Facts about the running engine.
#[derive(Clone, Debug)]
pub struct EngineInfo {
    /// The model's configuration (vocabulary, context length, EOS ids).
    pub config: LlamaConfig,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the pool.
    pub num_blocks: usize,
    /// Longest sequence (prompt + output) served: the context length, or less (see [`EngineConfig::max_model_len`]).
    pub max_model_len: usize,
}

impl EngineInfo {
    /// Tokens the KV cache holds.
    pub fn kv_tokens(&self) -> usize {
        self.block_size * self.num_blocks
    }
}

enum Command {
    Add { id: u64, req: Box<GenerateRequest>, events: tmpsc::UnboundedSender<Event>, ack: oneshot::Sender<Result<()>> },
    Abort(u64),
    Shutdown { deadline: Option<Instant> },
}

struct Shared {
    tx: Mutex<mpsc::Sender<Command>>,
    metrics: Arc<Metrics>,
    info: EngineInfo,
    next_id: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A cheap, cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
}

/// The events of one submitted request. Dropping it before [`Event::Done`] or [`Event::Error`] aborts the request.
pub struct RequestStream {
    id: u64,
    rx: tmpsc::UnboundedReceiver<Event>,
    shared: Arc<Shared>,
    ended: bool,
}

impl RequestStream {
    /// The engine's id of this request.
    pub fn id(&self) -> u64 {
        self.id
    }

    fn see(&mut self, e: Option<Event>) -> Option<Event> {
        match &e {
            Some(Event::Done(_) | Event::Error(_)) | None => self.ended = true,
            _ => {}
        }
        e
    }

    /// The next event; `None` after the last one.
    pub async fn next(&mut self) -> Option<Event> {
        if self.ended {
            return None;
        }
        let e = self.rx.recv().await;
        self.see(e)
    }

    /// The next event, blocking the thread (not for async contexts).
    pub fn blocking_next(&mut self) -> Option<Event> {
        if self.ended {
            return None;
        }
        let e = self.rx.blocking_recv();
        self.see(e)
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.ended {
            if let Ok(tx) = self.shared.tx.lock() {
                let _ = tx.send(Command::Abort(self.id));
            }
        }
    }
}

impl EngineHandle {
    /// Starts the engine thread. `make_exec` builds the executor on that thread (so it need not be `Send`);
    /// `tokenizer` turns ids into text (without one, text fields stay empty and stop strings are refused).
    /// Returns once the executor is ready, or with its error.
    pub fn start<F>(make_exec: F, tokenizer: Option<Arc<Tokenizer>>, cfg: EngineConfig) -> Result<Self>
    where
        F: FnOnce() -> Result<Box<dyn Executor>> + Send + 'static,
    {
        if cfg.max_step_tokens == 0 || cfg.max_seqs == 0 {
            return Err(Error::request("engine: max_step_tokens and max_seqs must be at least 1"));
        }
        let (tx, rx) = mpsc::channel::<Command>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<EngineInfo>>();
        let metrics = Arc::new(Metrics::default());
        let m2 = metrics.clone();
        let thread = std::thread::Builder::new()
            .name("llama32-engine".into())
            .spawn(move || {
                let setup = || -> Result<(Box<dyn Executor>, Scheduler, EngineInfo)> {
                    let exec = make_exec()?;
                    let (ctx_len, cache) =
                        (exec.config().max_position_embeddings, exec.num_blocks() * exec.block_size());
                    let max_model_len = match cfg.max_model_len {
                        None => ctx_len.min(cache),
                        Some(m) if m == 0 || m > ctx_len || m > cache => {
                            return Err(Error::request(format!(
                            "max_model_len {m} must be in [1, {}] (context length {ctx_len}, KV cache {cache} tokens)",
                            ctx_len.min(cache)
                        )))
                        }
                        Some(m) => m,
                    };
                    let info = EngineInfo {
                        config: exec.config().clone(),
                        block_size: exec.block_size(),
                        num_blocks: exec.num_blocks(),
                        max_model_len,
                    };
                    let kv = KvManager::new(info.num_blocks, info.block_size)?;
                    let mut scfg = SchedulerConfig::new(&info.config, cfg.max_step_tokens, cfg.max_seqs);
                    scfg.max_model_len = max_model_len;
                    // Sampled rows take up to max_seqs of an executor's logits rows; prompt rows get the rest.
                    if let Some(rows) = exec.max_logits_rows() {
                        scfg.max_prompt_logits_rows =
                            scfg.max_prompt_logits_rows.min(rows.saturating_sub(cfg.max_seqs));
                    }
                    Ok((exec, Scheduler::new(scfg, kv)?, info))
                };
                match setup() {
                    Ok((exec, sched, info)) => {
                        let _ = ready_tx.send(Ok(info));
                        let mut core = Core::new(exec, sched, tokenizer.as_deref(), cfg, m2);
                        core.run(rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| Error::Backend(format!("cannot start the engine thread: {e}")))?;
        let info = match ready_rx.recv() {
            Ok(r) => r?,
            Err(_) => return Err(Error::Backend("the engine thread died while loading the model".into())),
        };
        Ok(EngineHandle {
            shared: Arc::new(Shared {
                tx: Mutex::new(tx),
                metrics,
                info,
                next_id: AtomicU64::new(0),
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// The model and cache facts.
    pub fn info(&self) -> &EngineInfo {
        &self.shared.info
    }

    /// The engine's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    fn send(&self, cmd: Command) -> Result<()> {
        let tx = self.shared.tx.lock().map_err(|_| Error::Backend("engine channel poisoned".into()))?;
        tx.send(cmd).map_err(|_| Error::Backend("the engine has stopped".into()))
    }

    fn submit_inner(&self, req: GenerateRequest) -> Result<(RequestStream, oneshot::Receiver<Result<()>>)> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (etx, erx) = tmpsc::unbounded_channel();
        let (atx, arx) = oneshot::channel();
        self.send(Command::Add { id, req: Box::new(req), events: etx, ack: atx })?;
        let stream = RequestStream { id, rx: erx, shared: self.shared.clone(), ended: false };
        Ok((stream, arx))
    }

    /// Queues a request. Fails (with [`Error::Request`]) when the engine refuses it: bad parameters, a prompt
    /// that leaves no room in the context or cannot fit the KV cache, a full queue, or shutdown.
    pub async fn submit(&self, req: GenerateRequest) -> Result<RequestStream> {
        let (mut stream, ack) = self.submit_inner(req)?;
        match ack.await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => {
                stream.ended = true;
                Err(e)
            }
            Err(_) => {
                stream.ended = true;
                Err(Error::Backend("the engine has stopped".into()))
            }
        }
    }

    /// [`submit`](Self::submit) for synchronous callers (not from inside an async runtime).
    pub fn submit_blocking(&self, req: GenerateRequest) -> Result<RequestStream> {
        let (mut stream, ack) = self.submit_inner(req)?;
        match ack.blocking_recv() {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => {
                stream.ended = true;
                Err(e)
            }
            Err(_) => {
                stream.ended = true;
                Err(Error::Backend("the engine has stopped".into()))
            }
        }
    }

    /// Stops admission; running and queued requests go on until `deadline` (none: until they finish), after
    /// which they end with an error event. Returns at once; [`join`](Self::join) waits for the thread.
    pub fn shutdown(&self, deadline: Option<Instant>) {
        let _ = self.send(Command::Shutdown { deadline });
    }

    /// Waits for the engine thread to exit (after [`shutdown`](Self::shutdown)).
    pub fn join(&self) {
        let handle = self.shared.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// A request's state on the engine thread.
struct Req {
    events: tmpsc::UnboundedSender<Event>,
    /// Sequence ids, completion `k` of `best_of` at `seqs[k]`.
    seqs: Vec<SeqId>,
    n: usize,
    /// `best_of > n`: everything is buffered and the best `n` are sent at the end.
    buffered: bool,
    logprobs: Option<usize>,
    prompt_len: usize,
    /// Prompt log-probabilities: the alternatives wanted, the prompt (the rows' targets), the entries so far
    /// (prompt tokens `1..`), and whether they were sent.
    prompt_logprobs: Option<PromptScores>,
    arrived: Instant,
    first_token: bool,
    completion_tokens: usize,
    /// Per completion: finish reason once finished.
    finished: Vec<Option<FinishReason>>,
    /// Per completion (buffered requests): text, ids, logprobs.
    buf: Vec<(String, Vec<u32>, Vec<TokenLogprob>)>,
    cum_logprob: Vec<f64>,
    /// The key of the image set this request holds a reference to.
    image_key: Option<u64>,
}

/// A request's prompt log-probabilities as its prefill computes them.
struct PromptScores {
    top: usize,
    prompt: Vec<u32>,
    scores: Vec<TokenLogprob>,
    sent: bool,
}

struct SeqInfo {
    req: u64,
    /// Index within `best_of`.
    k: usize,
    last_token: Option<Instant>,
}

struct Core<'t> {
    exec: Box<dyn Executor>,
    sched: Scheduler,
    tok: Option<&'t Tokenizer>,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    reqs: HashMap<u64, Req>,
    seqs: HashMap<SeqId, SeqInfo>,
    decoders: HashMap<SeqId, StreamDecoder<'t>>,
    /// Structured outputs: each guided sequence's grammar state.
    guides: HashMap<SeqId, Guide>,
    shutting_down: bool,
    deadline: Option<Instant>,
    /// The image sets registered with the executor (holders, padding-tile trimming).
    images: ImageSets,
    /// Requests whose grammar failed this step, and why.
    guide_failures: Vec<(u64, String)>,
}

impl<'t> Core<'t> {
    /// Drops a request's reference to image set `key`; the last one removes it from the executor.
    fn release_images(&mut self, key: Option<u64>) {
        self.images.release(self.exec.as_mut(), key);
        self.metrics.set_images(self.images.len(), self.images.counts());
    }

    /// Forgets a finished or aborted sequence.
    fn drop_seq(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
        self.decoders.remove(&seq);
        self.guides.remove(&seq);
        self.images.seq_done(seq);
    }

    fn new(
        exec: Box<dyn Executor>,
        sched: Scheduler,
        tok: Option<&'t Tokenizer>,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Core {
            exec,
            sched,
            tok,
            cfg,
            metrics,
            reqs: HashMap::new(),
            seqs: HashMap::new(),
            decoders: HashMap::new(),
            guides: HashMap::new(),
            shutting_down: false,
            deadline: None,
            images: ImageSets::default(),
            guide_failures: Vec::new(),
        }
    }

    /// Admits parked vision requests, oldest first, while their images fit; one that fails gets an error event.
    fn unpark(&mut self) {
        while let Some(p) = self.images.pop_fitting(self.exec.as_ref()) {
            let events = p.events.clone();
            if let Err(e) = self.admit(p.id, p.req, p.events) {
                let _ = events.send(Event::Error(e.to_string()));
                self.metrics.request_finished("error", None);
            }
        }
    }

    fn run(&mut self, rx: mpsc::Receiver<Command>) {
        loop {
            self.unpark();
            if !self.sched.has_work() {
                if self.shutting_down {
                    return;
                }
                match rx.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return, // every handle is gone
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.handle(cmd);
            }
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                self.fail_all("the server shut down before the request finished");
            }
            if self.sched.has_work() {
                self.step();
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Add { id, req, events, ack } => {
                let r = self.add(id, *req, events);
                if r.is_ok() {
                    self.metrics.request_received();
                }
                let _ = ack.send(r);
                self.metrics.set_sched(self.sched.metrics());
            }
            Command::Abort(id) => {
                if self.reqs.contains_key(&id) {
                    self.abort(id);
                    self.metrics.request_finished("aborted", None);
                    self.metrics.set_sched(self.sched.metrics());
                } else if self.images.unpark_id(id) {
                    self.metrics.request_finished("aborted", None);
                }
            }
            Command::Shutdown { deadline } => {
                self.shutting_down = true;
                self.deadline = deadline;
            }
        }
    }

    fn add(&mut self, id: u64, req: GenerateRequest, events: tmpsc::UnboundedSender<Event>) -> Result<()> {
        if self.shutting_down {
            return Err(Error::request("the server is shutting down and accepts no new requests"));
        }
        let mut req = req;
        req.best_of = req.best_of.max(req.n);
        if req.n == 0 || req.best_of > MAX_COMPLETIONS {
            return Err(Error::request(format!(
                "n ({}) must be at least 1 and best_of ({}) at most {MAX_COMPLETIONS}",
                req.n, req.best_of
            )));
        }
        if req.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return Err(Error::request(format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}")));
        }
        if req.prompt_logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return Err(Error::request(format!("prompt_logprobs must be at most {MAX_TOP_LOGPROBS}")));
        }
        if req.guide.is_some() && (req.params.ignore_eos || req.params.min_tokens > 0) {
            return Err(Error::request(
                "structured outputs end where the grammar ends: ignore_eos and min_tokens cannot be combined with them",
            ));
        }
        if self.tok.is_none() && !req.params.stop.is_empty() {
            return Err(Error::request("stop strings need a tokenizer, and this model has none"));
        }
        let waiting = self.sched.metrics().waiting + self.images.parked_seqs();
        if self.cfg.max_waiting > 0 && waiting + req.best_of > self.cfg.max_waiting {
            return Err(Error::Overloaded(format!(
                "the queue is full ({waiting} sequences waiting, limit {}); retry later",
                self.cfg.max_waiting
            )));
        }
        // A vision request whose images do not fit the executor's cross-attention pool yet waits for room.
        if let Some(im) = &req.images {
            if !self.images.admits(self.exec.as_ref(), im.hash, &im.encoded.num_tiles)? {
                self.images.park(Parked { id, req, events });
                self.metrics.image_wait();
                return Ok(());
            }
        }
        self.admit(id, req, events)
    }

    /// Registers an accepted request with the scheduler (and its images with the executor).
    fn admit(&mut self, id: u64, req: GenerateRequest, events: tmpsc::UnboundedSender<Event>) -> Result<()> {
        // Requests with the same images share one image set (its cross-attention K/V), keyed by the images' hash.
        let vision = match &req.images {
            Some(im) => {
                self.images.retain(self.exec.as_mut(), im.hash, &im.encoded)?;
                Some(SeqVision { key: im.hash, salt: im.hash, mask: im.mask.clone(), row_len: im.row_len })
            }
            None => None,
        };
        let image_key = vision.as_ref().map(|v| v.key);
        let added =
            self.sched.add_request_with(req.prompt.clone(), req.params.clone(), req.best_of, req.priority, vision);
        let seqs = match added {
            Ok(s) => s,
            Err(e) => {
                self.release_images(image_key);
                return Err(e);
            }
        };
        if req.prompt_logprobs.is_some() {
            // The first completion computes the prompt (the others wait for it and share its blocks).
            if let Err(e) = seqs.first().map_or(Ok(()), |&s| self.sched.want_prompt_logits(s)) {
                for &s in &seqs {
                    self.sched.abort(s);
                }
                self.release_images(image_key);
                return Err(e);
            }
        }
        for (k, &s) in seqs.iter().enumerate() {
            if let Some(g) = &req.guide {
                self.guides.insert(s, g.clone());
            }
            self.seqs.insert(s, SeqInfo { req: id, k, last_token: None });
            if let Some(key) = image_key {
                self.images.add_seq(s, key);
            }
            if let Some(t) = self.tok {
                self.decoders.insert(s, t.stream_decoder(req.skip_special_tokens));
            }
        }
        let nb = req.best_of;
        self.reqs.insert(
            id,
            Req {
                events,
                n: req.n,
                buffered: req.best_of > req.n,
                logprobs: req.logprobs,
                prompt_len: req.prompt.len(),
                prompt_logprobs: req.prompt_logprobs.map(|top| PromptScores {
                    top,
                    prompt: req.prompt.clone(),
                    scores: Vec::new(),
                    sent: false,
                }),
                arrived: Instant::now(),
                first_token: false,
                completion_tokens: 0,
                finished: vec![None; nb],
                buf: vec![(String::new(), Vec::new(), Vec::new()); nb],
                cum_logprob: vec![0.0; nb],
                seqs,
                image_key,
            },
        );
        Ok(())
    }

    /// Drops a request and frees its sequences.
    fn abort(&mut self, id: u64) {
        if let Some(r) = self.reqs.remove(&id) {
            self.release_images(r.image_key);
            for s in r.seqs {
                self.sched.abort(s);
                self.drop_seq(s);
            }
        }
    }

    fn fail(&mut self, id: u64, msg: &str) {
        if let Some(r) = self.reqs.get(&id) {
            let _ = r.events.send(Event::Error(msg.to_string()));
        }
        self.abort(id);
        self.metrics.request_finished("error", None);
    }

    fn fail_all(&mut self, msg: &str) {
        let ids: Vec<u64> = self.reqs.keys().copied().collect();
        for id in ids {
            self.fail(id, msg);
        }
        for p in self.images.take_parked() {
            let _ = p.events.send(Event::Error(msg.to_string()));
            self.metrics.request_finished("error", None);
        }
        self.metrics.set_sched(self.sched.metrics());
    }

    fn step(&mut self) {
        let plan = match self.sched.schedule() {
            Ok(Some(p)) => p,
            Ok(None) => {
                self.fail_all("scheduler: sequences are left but nothing can be scheduled");
                return;
            }
            Err(e) => {
                self.fail_all(&format!("scheduler: {e}"));
                return;
            }
        };
        let prompt_tokens: usize = plan
            .chunks
            .iter()
            .filter(|c| self.seqs.get(&c.seq).is_some_and(|_| c.len > 1 || !c.sample))
            .map(|c| c.len)
            .sum();
        let refused = self.images.before_step(self.exec.as_mut(), &plan);
        if !refused.is_empty() {
            // Their image set did not fit back in the pool: those requests fail alone (with the executor's reason),
            // this plan is dropped, and the next step is planned without them.
            let mut failed = HashSet::new();
            for (seq, e) in refused {
                let Some(req) = self.seqs.get(&seq).map(|s| s.req) else {
                    // No request to fail: planning again would refuse the same chunk forever.
                    self.fail_all(&format!("step failed: {e}"));
                    return;
                };
                if failed.insert(req) {
                    let msg = format!("images: {} (the cross-attention pool filled up; retry)", e.detail());
                    self.fail(req, &msg);
                }
            }
            self.metrics.set_sched(self.sched.metrics());
            return;
        }
        let ran = self.run_plan(&plan).and_then(|out| {
            self.images.after_step(self.exec.as_mut(), &plan)?;
            Ok(out)
        });
        let (picked, lps, prompt_scores) = match ran {
            Ok(x) => x,
            Err(e) => {
                self.fail_all(&format!("step failed: {e}"));
                return;
            }
        };
        self.advance_guides(&plan, &picked);
        // Before any event goes out, so that a client who sees a token also sees the trims of its step.
        self.metrics.set_images(self.images.len(), self.images.counts());
        for (seq, start, scores) in prompt_scores {
            let ps = self.seqs.get(&seq).and_then(|i| self.reqs.get_mut(&i.req)?.prompt_logprobs.as_mut());
            if let Some(ps) = ps {
                // A preempted prompt computes its rows again from its start.
                ps.scores.truncate(start);
                ps.scores.extend(scores);
            }
        }
        let (tok, decoders) = (self.tok, &mut self.decoders);
        let mut detok = |seq: SeqId, id: u32| -> Result<String> {
            match (tok, decoders.get_mut(&seq)) {
                (Some(_), Some(d)) => d.push(id),
                _ => Ok(String::new()),
            }
        };
        let up = match self.sched.update(&plan, &picked, &mut detok) {
            Ok(u) => u,
            Err(e) => {
                self.fail_all(&format!("scheduler: {e}"));
                return;
            }
        };
        let now = Instant::now();
        let mut texts: HashMap<SeqId, String> = up.deltas.into_iter().collect();
        let finished: HashMap<SeqId, FinishReason> = up.finished.iter().map(|f| (f.seq, f.generation.finish)).collect();
        let (mut ttft, mut itl) = (Vec::new(), Vec::new());
        let mut generated = 0;
        let mut dead: Vec<u64> = Vec::new();
        let mut done: Vec<u64> = Vec::new();
        for ((&seq, &id), lp) in plan.logits_seqs.iter().zip(&picked).zip(lps) {
            let Some(info) = self.seqs.get_mut(&seq) else { continue };
            if self.guide_failures.iter().any(|(req, _)| *req == info.req) {
                continue; // failed: its token is not sent, the error is
            }
            let Some(r) = self.reqs.get_mut(&info.req) else { continue };
            generated += 1;
            r.completion_tokens += 1;
            if !r.first_token {
                r.first_token = true;
                ttft.push(now.duration_since(r.arrived).as_secs_f64());
            }
            if let Some(t) = info.last_token {
                itl.push(now.duration_since(t).as_secs_f64());
            }
            info.last_token = Some(now);
            let k = info.k;
            if let Some(lp) = &lp {
                r.cum_logprob[k] += lp.logprob as f64;
            }
            // Every prompt row comes before the first sampled one.
            if let Some(ps) = r.prompt_logprobs.as_mut().filter(|p| !p.sent) {
                ps.sent = true;
                if r.events.send(Event::PromptLogprobs(std::mem::take(&mut ps.scores))).is_err() {
                    dead.push(info.req);
                    continue;
                }
            }
            let text = texts.remove(&seq).unwrap_or_default();
            let fin = finished.get(&seq).copied();
            if r.buffered {
                let b = &mut r.buf[k];
                b.0.push_str(&text);
                b.1.push(id);
                b.2.extend(lp);
            } else {
                let logprobs = if r.logprobs.is_some() { lp.into_iter().collect() } else { Vec::new() };
                let ok = r.events.send(Event::Delta { index: k, text, ids: vec![id], logprobs }).is_ok()
                    && fin.is_none_or(|reason| r.events.send(Event::Finished { index: k, reason }).is_ok());
                if !ok {
                    dead.push(info.req);
                    continue;
                }
            }
            if let Some(reason) = fin {
                r.finished[k] = Some(reason);
                if r.finished.iter().all(Option::is_some) {
                    done.push(info.req);
                }
                self.drop_seq(seq);
            }
        }
        // A request whose several sequences all found its client gone is aborted (and counted) once.
        dead.sort_unstable();
        dead.dedup();
        for id in dead {
            self.abort(id);
            self.metrics.request_finished("aborted", None);
        }
        // Metrics first, so that a caller who sees `Done` also sees the freed blocks.
        self.metrics.step(self.sched.metrics(), prompt_tokens, generated, &ttft, &itl);
        for id in done {
            self.complete(id);
        }
        self.fail_guided();
    }

    /// Sends a finished request's remaining events: for `best_of > n`, the best `n` completions (highest
    /// cumulative log-probability, ties to the earlier one) as one delta each, then `Done` with the usage.
    fn complete(&mut self, id: u64) {
        let Some(mut r) = self.reqs.remove(&id) else { return };
        self.release_images(r.image_key);
        if r.buffered {
            let mut order: Vec<usize> = (0..r.seqs.len()).collect();
            order.sort_by(|&a, &b| r.cum_logprob[b].total_cmp(&r.cum_logprob[a]).then(a.cmp(&b)));
            for (index, &k) in order.iter().take(r.n).enumerate() {
                let (text, ids, lps) = std::mem::take(&mut r.buf[k]);
                let logprobs = if r.logprobs.is_some() { lps } else { Vec::new() };
                let _ = r.events.send(Event::Delta { index, text, ids, logprobs });
                if let Some(reason) = r.finished[k] {
                    let _ = r.events.send(Event::Finished { index, reason });
                }
            }
        }
        let usage = Usage {
            prompt_tokens: r.prompt_len,
            completion_tokens: r.completion_tokens,
            total_tokens: r.prompt_len + r.completion_tokens,
        };
        let _ = r.events.send(Event::Done(usage));
        let reason = r.finished.first().copied().flatten().map_or("stop", FinishReason::as_str);
        self.metrics.request_finished(reason, Some(r.arrived.elapsed()));
    }
}
