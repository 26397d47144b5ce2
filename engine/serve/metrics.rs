//! Engine metrics in the Prometheus text format: queue depth, running sequences, KV usage, prefix-cache hit rate,
//! preemptions, request and token counters, throughput, and histograms of time to first token, inter-token
//! latency and request latency. The engine thread records; `/metrics` renders.

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sched::SchedMetrics;

/// Upper bounds (seconds) of the latency histograms' buckets.
const TTFT_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0];
const ITL_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5];
const E2E_BUCKETS: &[f64] = &[0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0];

/// Window over which `llama32_generation_tokens_per_second` is averaged.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// A cumulative histogram with fixed buckets.
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    /// Records one observation (seconds).
    pub fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of the observations.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// Everything `/metrics` shows, as of the last engine step.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Scheduler and KV counters.
    pub sched: SchedMetrics,
    /// Requests accepted by the engine.
    pub requests_received: u64,
    /// Requests finished, by finish reason of their first completion ("stop", "length") or "error"/"aborted".
    pub requests_finished: Vec<(&'static str, u64)>,
    /// Prompt tokens of finished prefills (recomputed ones after preemption included).
    pub prompt_tokens: u64,
    /// Generated tokens.
    pub generation_tokens: u64,
    /// Engine steps run.
    pub steps: u64,
    /// Time to first token (from arrival at the engine).
    pub ttft: Histogram,
    /// Time between consecutive tokens of a sequence.
    pub itl: Histogram,
    /// Request latency (arrival to last token).
    pub e2e: Histogram,
    /// Generated tokens per second over the last 10 s.
    pub tokens_per_s: f64,
    /// Image sets registered with the executor (vision models).
    pub image_sets: usize,
    /// Image sets whose padding tiles were freed.
    pub image_sets_trimmed: u64,
    /// Image sets registered again in full after a trim (a sequence had to rerun rows that see no image).
    pub image_sets_readded: u64,
    /// Requests that had to wait for room in the cross-attention pool.
    pub image_waits: u64,
}

struct Inner {
    snap: Snapshot,
    recent: VecDeque<(Instant, usize)>,
}

/// Thread-safe metrics shared by the engine thread (writer) and the server (reader).
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            inner: Mutex::new(Inner {
                snap: Snapshot {
                    sched: SchedMetrics::default(),
                    requests_received: 0,
                    requests_finished: ["stop", "length", "tool_calls", "error", "aborted"]
                        .iter()
                        .map(|&r| (r, 0))
                        .collect(),
                    prompt_tokens: 0,
                    generation_tokens: 0,
                    steps: 0,
                    ttft: Histogram::new(TTFT_BUCKETS),
                    itl: Histogram::new(ITL_BUCKETS),
                    e2e: Histogram::new(E2E_BUCKETS),
                    tokens_per_s: 0.0,
                    image_sets: 0,
                    image_sets_trimmed: 0,
                    image_sets_readded: 0,
                    image_waits: 0,
                },
                recent: VecDeque::new(),
            }),
        }
    }
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// A copy of the current values.
    pub fn snapshot(&self) -> Snapshot {
        self.with(|i| {
            let mut s = i.snap.clone();
            s.tokens_per_s = rate(&i.recent, Instant::now());
            s
        })
    }

    /// Records a request accepted by the engine.
    pub fn request_received(&self) {
        self.with(|i| i.snap.requests_received += 1);
    }

    /// Records a finished request (`reason`: "stop", "length", "tool_calls", "error" or "aborted") and its latency.
    pub fn request_finished(&self, reason: &'static str, latency: Option<Duration>) {
        self.with(|i| {
            match i.snap.requests_finished.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, c)) => *c += 1,
                None => i.snap.requests_finished.push((reason, 1)),
            }
            if let Some(l) = latency {
                i.snap.e2e.observe(l.as_secs_f64());
            }
        });
    }

    /// Records one engine step: scheduler state, prompt tokens computed, tokens generated, and the latencies seen.
    pub fn step(&self, sched: SchedMetrics, prompt_tokens: usize, generated: usize, ttft: &[f64], itl: &[f64]) {
        let now = Instant::now();
        self.with(|i| {
            i.snap.sched = sched;
            i.snap.steps += 1;
            i.snap.prompt_tokens += prompt_tokens as u64;
            i.snap.generation_tokens += generated as u64;
            ttft.iter().for_each(|&v| i.snap.ttft.observe(v));
            itl.iter().for_each(|&v| i.snap.itl.observe(v));
            i.recent.push_back((now, generated));
            while i.recent.front().is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW) {
                i.recent.pop_front();
            }
        });
    }

    /// Records the image sets registered now and the trims and re-registrations so far.
    pub fn set_images(&self, sets: usize, (trimmed, readded): (u64, u64)) {
        self.with(|i| {
            i.snap.image_sets = sets;
            i.snap.image_sets_trimmed = trimmed;
            i.snap.image_sets_readded = readded;
        });
    }

    /// Records a request that waits for room in the cross-attention pool.
    pub fn image_wait(&self) {
        self.with(|i| i.snap.image_waits += 1);
    }

    /// Updates the scheduler gauges alone (after admissions or aborts outside a step).
    pub fn set_sched(&self, sched: SchedMetrics) {
        self.with(|i| i.snap.sched = sched);
    }

    /// The Prometheus text exposition (format 0.0.4) for the served model `model`.
    pub fn render(&self, model: &str) -> String {
        let s = self.snapshot();
        let labels = format!("model_name=\"{}\"", model.replace('\\', "\\\\").replace('"', "\\\""));
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {v}");
        };
        let kv = s.sched.kv;
        metric("llama32_num_requests_waiting", "gauge", "Sequences waiting for admission.", s.sched.waiting as f64);
        metric("llama32_num_requests_running", "gauge", "Sequences running.", s.sched.running as f64);
        let total = kv.used_blocks + kv.cached_blocks + kv.free_blocks;
        let usage = if total == 0 { 0.0 } else { kv.used_blocks as f64 / total as f64 };
        metric("llama32_kv_cache_usage_perc", "gauge", "Fraction of KV blocks held by running sequences.", usage);
        metric("llama32_kv_cache_blocks_total", "gauge", "KV blocks in the pool.", total as f64);
        metric("llama32_kv_cache_blocks_cached", "gauge", "Unreferenced KV blocks kept for prefix reuse.", {
            kv.cached_blocks as f64
        });
        metric("llama32_prefix_cache_hit_rate", "gauge", "Prompt tokens found in the prefix cache / looked up.", {
            kv.hit_rate()
        });
        metric("llama32_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", {
            kv.queried_tokens as f64
        });
        metric("llama32_prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", {
            kv.hit_tokens as f64
        });
        metric("llama32_num_preemptions_total", "counter", "Sequences preempted (recomputed later).", {
            s.sched.preemptions as f64
        });
        metric("llama32_requests_received_total", "counter", "Requests accepted by the engine.", {
            s.requests_received as f64
        });
        metric("llama32_prompt_tokens_total", "counter", "Prompt tokens computed.", s.prompt_tokens as f64);
        metric("llama32_generation_tokens_total", "counter", "Tokens generated.", s.generation_tokens as f64);
        metric("llama32_engine_steps_total", "counter", "Engine steps run.", s.steps as f64);
        metric("llama32_generation_tokens_per_second", "gauge", "Tokens generated per second, last 10 s.", {
            s.tokens_per_s
        });
        metric("llama32_image_sets", "gauge", "Image sets whose cross-attention K/V are held.", s.image_sets as f64);
        metric("llama32_image_sets_trimmed_total", "counter", "Image sets whose padding tiles were freed.", {
            s.image_sets_trimmed as f64
        });
        metric("llama32_image_sets_readded_total", "counter", "Image sets registered again in full after a trim.", {
            s.image_sets_readded as f64
        });
        metric("llama32_image_waits_total", "counter", "Requests that waited for cross-attention pool room.", {
            s.image_waits as f64
        });
        let name = "llama32_request_success_total";
        let _ = writeln!(out, "# HELP {name} Finished requests by finish reason.\n# TYPE {name} counter");
        for (reason, c) in &s.requests_finished {
            let _ = writeln!(out, "{name}{{{labels},finished_reason=\"{reason}\"}} {c}");
        }
        s.ttft.render(&mut out, "llama32_time_to_first_token_seconds", "Time to first token.", &labels);
        s.itl.render(&mut out, "llama32_inter_token_latency_seconds", "Time between tokens of a sequence.", &labels);
        s.e2e.render(&mut out, "llama32_e2e_request_latency_seconds", "Request latency.", &labels);
        out
    }
}

fn rate(recent: &VecDeque<(Instant, usize)>, now: Instant) -> f64 {
    let Some(&(first, _)) = recent.front() else { return 0.0 };
    let tokens: usize = recent.iter().map(|(_, n)| n).sum();
    let span = now.duration_since(first).as_secs_f64().max(1e-3);
    if now.duration_since(first) > RATE_WINDOW {
        return 0.0;
    }
    tokens as f64 / span.max(1.0)
}
