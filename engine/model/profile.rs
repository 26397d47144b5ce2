//! Per-operation timing of one step: [`Profiled`] wraps a backend's [`Ops`] and brackets every call with two
//! marks of an [`OpClock`] (the host clock for the synchronous CPU reference, device events for CUDA), so that
//! `llama32 bench --profile` can say where a decode step's time goes, op by op.
//!
//! What a label covers is what the backend does inside that call. A backend that defers work to a later call
//! (the CUDA norm fusion runs `add_rms_norm` inside the next projection) shows the deferred call near zero and the
//! later one with both.
//!
//! [`Profiled::skipping`] is the other measurement: it leaves out every call under some labels (`llama32 bench
//! --ablate`), so that the step time of a run without them, against a full run, is their marginal cost in the
//! real pipeline (CUDA graphs and programmatic dependent launch included), which per-call events cannot see. The
//! outputs of such steps are meaningless.

use crate::exec::StepInput;
use crate::model::{Linear, Norm, Ops};
use crate::Result;

/// A timeline on which calls are bracketed: `begin` before a call, `end` after it.
pub trait OpClock {
    /// Marks the start of the next call.
    fn begin(&mut self) -> Result<()>;
    /// Marks the end of the call begun last, under `label`.
    fn end(&mut self, label: &'static str) -> Result<()>;
    /// Waits for the step's marks and returns every call as (label, seconds), in call order, and the seconds from
    /// the first `begin` to the last `end`. Resets the clock for the next step.
    fn finish(&mut self) -> Result<(Vec<(&'static str, f64)>, f64)>;
}

/// Wall-clock marks, for a backend whose calls return when their work is done (the CPU reference).
#[derive(Debug, Default)]
pub struct HostClock {
    first: Option<std::time::Instant>,
    last: Option<std::time::Instant>,
    open: Option<std::time::Instant>,
    calls: Vec<(&'static str, f64)>,
}

impl OpClock for HostClock {
    fn begin(&mut self) -> Result<()> {
        let now = std::time::Instant::now();
        self.first.get_or_insert(now);
        self.open = Some(now);
        Ok(())
    }

    fn end(&mut self, label: &'static str) -> Result<()> {
        let now = std::time::Instant::now();
        let start = self.open.take().ok_or_else(|| unbalanced(label))?;
        self.calls.push((label, (now - start).as_secs_f64()));
        self.last = Some(now);
        Ok(())
    }

    fn finish(&mut self) -> Result<(Vec<(&'static str, f64)>, f64)> {
        let total = match (self.first.take(), self.last.take()) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => 0.0,
        };
        self.open = None;
        Ok((std::mem::take(&mut self.calls), total))
    }
}

/// A clock that marks nothing: for [`Profiled::skipping`] without timing.
#[derive(Debug, Default)]
pub struct NullClock;

impl OpClock for NullClock {
    fn begin(&mut self) -> Result<()> {
        Ok(())
    }

    fn end(&mut self, _label: &'static str) -> Result<()> {
        Ok(())
    }

    fn finish(&mut self) -> Result<(Vec<(&'static str, f64)>, f64)> {
        Ok((Vec::new(), 0.0))
    }
}

/// The labels whose calls [`Profiled::skipping`] can leave out: every call that only writes its outputs (not
/// `begin_step`, which stages the step's metadata, nor `gather_logits`, which returns the logits).
pub const ABLATABLE: [&str; 16] = [
    "embed",
    "rms_norm",
    "add_rms_norm",
    "final norm",
    "linear qkv",
    "linear o",
    "linear gate_up",
    "linear down",
    "linear lm_head",
    "linear qkv+rope+cache",
    "linear gate_up+silu_mul",
    "rope+cache",
    "attention",
    "silu_mul",
    "gather_rows",
    "all_reduce",
];

/// Parses `--ablate`'s comma-separated labels (surrounding white space ignored, `_` for a space, as in
/// `linear_o`, duplicates dropped) into [`ABLATABLE`] entries; an unknown label is an error that lists the known
/// ones.
pub fn parse_ablation(list: &str) -> Result<Vec<&'static str>> {
    let key = |s: &str| s.replace(' ', "_");
    let mut labels: Vec<&'static str> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let Some(&label) = ABLATABLE.iter().find(|&&l| key(l) == key(item)) else {
            return Err(crate::Error::request(format!(
                "--ablate: unknown call {item:?} (known: {})",
                ABLATABLE.join(", ")
            )));
        };
        if !labels.contains(&label) {
            labels.push(label);
        }
    }
    Ok(labels)
}

/// Checks that `what` (an executor) knows every label of `labels` among `known` (the calls it can leave out); the
/// error names the first unknown one and lists the known ones.
pub fn check_ablation(labels: &[&'static str], known: &[&str], what: &str) -> Result<()> {
    match labels.iter().find(|l| !known.contains(l)) {
        None => Ok(()),
        Some(l) => Err(crate::Error::request(format!(
            "--ablate: {what} has no call {l:?} to leave out (known: {})",
            known.join(", ")
        ))),
    }
}

/// [`crate::model::forward`] over `ops`, with the calls under `skip` left out ([`Profiled::skipping`]; none when
/// empty, which is the plain forward).
pub fn forward_skipping<O: Ops>(
    ops: &mut O,
    skip: &[&'static str],
    dims: crate::model::Dims,
    input: &StepInput,
) -> Result<O::Act> {
    if skip.is_empty() {
        return crate::model::forward(ops, dims, input);
    }
    let mut clock = NullClock;
    crate::model::forward(&mut Profiled::new(ops, &mut clock).skipping(skip), dims, input)
}

/// The error of an `end` without its `begin`.
pub(crate) fn unbalanced(label: &str) -> crate::Error {
    crate::Error::Backend(format!("profile: `{label}` ended without a begin"))
}

/// The label of projection `w` called through `op` ("linear", "linear+rope+cache", "linear+silu_mul").
fn linear_label(op: &'static str, w: Linear) -> &'static str {
    match (op, w) {
        ("linear", Linear::Qkv(_)) => "linear qkv",
        ("linear", Linear::O(_)) => "linear o",
        ("linear", Linear::GateUp(_)) => "linear gate_up",
        ("linear", Linear::Down(_)) => "linear down",
        ("linear", Linear::LmHead) => "linear lm_head",
        ("linear+rope+cache", _) => "linear qkv+rope+cache",
        ("linear+silu_mul", _) => "linear gate_up+silu_mul",
        _ => "linear",
    }
}

/// The label of norm `n` called through `op` ("rms_norm" or "add_rms_norm").
fn norm_label(op: &'static str, n: Norm) -> &'static str {
    match (op, n) {
        (_, Norm::Final) => "final norm",
        ("rms_norm", _) => "rms_norm",
        _ => "add_rms_norm",
    }
}

/// `inner`'s [`Ops`] with every call timed on `clock`. Results are those of `inner` unchanged, unless some labels
/// are [skipped](Self::skipping).
pub struct Profiled<'a, O: Ops, C: OpClock> {
    inner: &'a mut O,
    clock: &'a mut C,
    weight_bytes: Vec<(&'static str, usize)>,
    skip: &'a [&'static str],
}

impl<'a, O: Ops, C: OpClock> Profiled<'a, O, C> {
    /// Times the calls made on `inner` with `clock`.
    pub fn new(inner: &'a mut O, clock: &'a mut C) -> Self {
        Profiled { inner, clock, weight_bytes: Vec::new(), skip: &[] }
    }

    /// Leaves out every call under one of `labels` (see [`ABLATABLE`]; others cannot be left out): it returns at
    /// once, its outputs unwritten, and is neither timed nor counted.
    pub fn skipping(self, labels: &'a [&'static str]) -> Self {
        Profiled { skip: labels, ..self }
    }

    /// The weight bytes ([`Ops::weight_bytes`]) the projection calls read since the last take, per label.
    pub fn take_weight_bytes(&mut self) -> Vec<(&'static str, usize)> {
        std::mem::take(&mut self.weight_bytes)
    }

    /// Adds what a call of projection `w` under `label` reads.
    fn count_weight(&mut self, label: &'static str, w: Linear) {
        let bytes = self.inner.weight_bytes(w);
        match self.weight_bytes.iter_mut().find(|(l, _)| *l == label) {
            Some((_, b)) => *b += bytes,
            None => self.weight_bytes.push((label, bytes)),
        }
    }
    /// Runs `f` on the backend between a `begin` and an `end` under `label`.
    fn timed<T>(&mut self, label: &'static str, f: impl FnOnce(&mut O) -> Result<T>) -> Result<T> {
        self.clock.begin()?;
        let out = f(self.inner)?;
        self.clock.end(label)?;
        Ok(out)
    }

    /// [`timed`](Self::timed) for a call that only writes its outputs, unless `label` is skipped.
    fn op(&mut self, label: &'static str, f: impl FnOnce(&mut O) -> Result<()>) -> Result<()> {
        if self.skip.contains(&label) {
            return Ok(());
        }
        self.timed(label, f)
    }

    /// [`op`](Self::op) for a projection: counts its weight bytes when it runs.
    fn projection(&mut self, label: &'static str, w: Linear, f: impl FnOnce(&mut O) -> Result<()>) -> Result<()> {
        if self.skip.contains(&label) {
            return Ok(());
        }
        self.count_weight(label, w);
        self.timed(label, f)
    }
}

impl<O: Ops, C: OpClock> Ops for Profiled<'_, O, C> {
    type Act = O::Act;

    fn begin_step(&mut self, step: &StepInput) -> Result<()> {
        self.timed("begin_step", |o| o.begin_step(step))
    }

    fn alloc(&mut self, rows: usize, cols: usize) -> Result<Self::Act> {
        self.inner.alloc(rows, cols)
    }

    fn release(&mut self, act: Self::Act) {
        self.inner.release(act)
    }

    fn embed(&mut self, ids: &[u32], out: &mut Self::Act) -> Result<()> {
        self.op("embed", |o| o.embed(ids, out))
    }

    fn rms_norm(&mut self, x: &Self::Act, norm: Norm, out: &mut Self::Act) -> Result<()> {
        self.op(norm_label("rms_norm", norm), |o| o.rms_norm(x, norm, out))
    }

    fn add_rms_norm(
        &mut self,
        residual: &mut Self::Act,
        delta: &Self::Act,
        norm: Norm,
        out: &mut Self::Act,
    ) -> Result<()> {
        self.op(norm_label("add_rms_norm", norm), |o| o.add_rms_norm(residual, delta, norm, out))
    }

    fn linear(&mut self, x: &Self::Act, w: Linear, out: &mut Self::Act) -> Result<()> {
        self.projection(linear_label("linear", w), w, |o| o.linear(x, w, out))
    }

    fn rope_and_cache(&mut self, layer: usize, qkv: &mut Self::Act, step: &StepInput) -> Result<()> {
        self.op("rope+cache", |o| o.rope_and_cache(layer, qkv, step))
    }

    fn attention(&mut self, layer: usize, qkv: &Self::Act, step: &StepInput, out: &mut Self::Act) -> Result<()> {
        self.op("attention", |o| o.attention(layer, qkv, step, out))
    }

    fn silu_mul(&mut self, gate_up: &Self::Act, out: &mut Self::Act) -> Result<()> {
        self.op("silu_mul", |o| o.silu_mul(gate_up, out))
    }

    fn linear_rope_cache(
        &mut self,
        x: &Self::Act,
        w: Linear,
        layer: usize,
        qkv: &mut Self::Act,
        step: &StepInput,
    ) -> Result<()> {
        self.projection(linear_label("linear+rope+cache", w), w, |o| o.linear_rope_cache(x, w, layer, qkv, step))
    }

    fn linear_silu_mul(
        &mut self,
        x: &Self::Act,
        w: Linear,
        gate_up: &mut Self::Act,
        out: &mut Self::Act,
    ) -> Result<()> {
        self.projection(linear_label("linear+silu_mul", w), w, |o| o.linear_silu_mul(x, w, gate_up, out))
    }

    fn weight_bytes(&self, w: Linear) -> usize {
        self.inner.weight_bytes(w)
    }

    fn gather_rows(&mut self, x: &Self::Act, rows: &[u32], out: &mut Self::Act) -> Result<()> {
        self.op("gather_rows", |o| o.gather_rows(x, rows, out))
    }

    fn all_reduce(&mut self, x: &mut Self::Act) -> Result<()> {
        self.op("all_reduce", |o| o.all_reduce(x))
    }

    fn gather_logits(&mut self, local: Self::Act) -> Result<Self::Act> {
        self.timed("gather_logits", |o| o.gather_logits(local))
    }
}

/// One label's share of a profiled step.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OpTime {
    /// What ran (see the module docs).
    pub op: &'static str,
    /// Calls per step.
    pub calls: usize,
    /// Seconds per step, all calls together.
    pub seconds: f64,
    /// Weight bytes the calls read per step (projections only; 0 elsewhere or when the backend does not say).
    pub weight_bytes: usize,
}

/// Where one step's time went, averaged over the profiled steps.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct StepProfile {
    /// Tokens in the step.
    pub tokens: usize,
    /// Sequences in the step.
    pub seqs: usize,
    /// Steps averaged.
    pub steps: usize,
    /// Seconds from the start of the first call to the end of the last, per step.
    pub step_seconds: f64,
    /// Host seconds spent issuing a step's calls (on an asynchronous backend, the time before the device could
    /// run the step back to back).
    pub host_seconds: f64,
    /// Steps whose host issue outlasted the device's head start, so that their times include host launch gaps
    /// (always 0 on the CPU).
    pub late_steps: usize,
    /// Per label, in order of first call.
    pub ops: Vec<OpTime>,
}

impl StepProfile {
    /// An empty profile of a step of `tokens` tokens in `seqs` sequences.
    pub fn new(tokens: usize, seqs: usize) -> Self {
        StepProfile { tokens, seqs, ..Default::default() }
    }

    /// Adds one step: its calls (from [`OpClock::finish`]), the weight bytes per label (from
    /// [`Profiled::take_weight_bytes`]), its seconds from first call to last, and the host's issue time.
    pub fn add_step(
        &mut self,
        calls: &[(&'static str, f64)],
        weight_bytes: &[(&'static str, usize)],
        step_seconds: f64,
        host_seconds: f64,
    ) {
        let mut per_label: Vec<OpTime> = Vec::new();
        for &(op, s) in calls {
            match per_label.iter_mut().find(|t| t.op == op) {
                Some(t) => {
                    t.calls += 1;
                    t.seconds += s;
                }
                None => {
                    let weight_bytes = weight_bytes.iter().find(|(l, _)| *l == op).map_or(0, |&(_, b)| b);
                    per_label.push(OpTime { op, calls: 1, seconds: s, weight_bytes })
                }
            }
        }
        let n = self.steps as f64;
        let avg = |old: f64, new: f64| (old * n + new) / (n + 1.0);
        // A label this step did not call averages in as zero.
        for o in self.ops.iter_mut().filter(|o| per_label.iter().all(|t| t.op != o.op)) {
            o.seconds = avg(o.seconds, 0.0);
        }
        for t in per_label {
            match self.ops.iter_mut().find(|o| o.op == t.op) {
                Some(o) => {
                    o.seconds = avg(o.seconds, t.seconds);
                    o.calls = o.calls.max(t.calls);
                    o.weight_bytes = o.weight_bytes.max(t.weight_bytes);
                }
                None => self.ops.push(OpTime { seconds: avg(0.0, t.seconds), ..t }),
            }
        }
        self.step_seconds = avg(self.step_seconds, step_seconds);
        self.host_seconds = avg(self.host_seconds, host_seconds);
        self.steps += 1;
    }

    /// Seconds of the step inside calls (the rest is between calls).
    pub fn in_calls(&self) -> f64 {
        self.ops.iter().map(|o| o.seconds).sum()
    }

    /// A text table: one line per label with its calls, microseconds per step, share of the step and, for
    /// projections, the rate at which they read their weights (GB/s).
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<26} {:>6} {:>11} {:>7} {:>11}\n",
            format!("op ({} tok, {} seq)", self.tokens, self.seqs),
            "calls",
            "us/step",
            "share",
            "weight GB/s"
        );
        let step = self.step_seconds.max(1e-12);
        let mut ops = self.ops.clone();
        ops.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        for o in &ops {
            let rate = match o.weight_bytes {
                0 => String::new(),
                b => format!("{:.0}", b as f64 / o.seconds.max(1e-12) * 1e-9),
            };
            s.push_str(&format!(
                "{:<26} {:>6} {:>11.1} {:>6.1}% {:>11}\n",
                o.op,
                o.calls,
                o.seconds * 1e6,
                100.0 * o.seconds / step,
                rate
            ));
        }
        let gaps = (self.step_seconds - self.in_calls()).max(0.0);
        s.push_str(&format!(
            "{:<26} {:>6} {:>11.1} {:>6.1}%\n",
            "(between calls)",
            "",
            gaps * 1e6,
            100.0 * gaps / step
        ));
        s.push_str(&format!(
            "{:<26} {:>6} {:>11.1} (host issue {:.1} us, {} steps)\n",
            "step",
            "",
            self.step_seconds * 1e6,
            self.host_seconds * 1e6,
            self.steps
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_average_per_label_and_keep_first_call_order() {
        let mut p = StepProfile::new(1, 1);
        p.add_step(&[("embed", 1.0), ("linear o", 2.0), ("embed", 3.0)], &[("linear o", 6_000_000_000)], 10.0, 1.0);
        p.add_step(&[("embed", 2.0), ("linear o", 4.0), ("embed", 4.0)], &[("linear o", 6_000_000_000)], 20.0, 3.0);
        assert_eq!(p.steps, 2);
        assert_eq!(p.ops.len(), 2);
        assert_eq!((p.ops[0].op, p.ops[0].calls, p.ops[0].seconds), ("embed", 2, 5.0));
        assert_eq!((p.ops[1].op, p.ops[1].calls, p.ops[1].seconds), ("linear o", 1, 3.0));
        assert_eq!((p.step_seconds, p.host_seconds, p.in_calls()), (15.0, 2.0, 8.0));
        let t = p.table();
        assert!(t.lines().nth(1).is_some_and(|l| l.starts_with("embed")), "{t}");
        assert!(t.contains("(between calls)"), "{t}");
        assert_eq!((p.ops[0].weight_bytes, p.ops[1].weight_bytes), (0, 6_000_000_000));
        // A label missing from a step averages in as zero.
        p.add_step(&[("embed", 6.0)], &[], 3.0, 3.0);
        assert_eq!((p.ops[0].seconds, p.ops[1].seconds), (16.0 / 3.0, 2.0));
        // 6 GB in 3 s.
        assert!(t.lines().any(|l| l.starts_with("linear o") && l.ends_with(" 2")), "{t}");
    }

    #[test]
    fn ablation_lists_parse_to_known_labels_once() {
        assert_eq!(parse_ablation("").unwrap(), Vec::<&str>::new());
        assert_eq!(parse_ablation(" attention ,linear o,, attention").unwrap(), vec!["attention", "linear o"]);
        assert_eq!(parse_ablation("linear_o,final_norm,linear o").unwrap(), vec!["linear o", "final norm"]);
        let e = parse_ablation("attention,begin_step").unwrap_err().to_string();
        assert!(e.contains("--ablate") && e.contains("\"begin_step\"") && e.contains("linear lm_head"), "{e}");
        assert!(parse_ablation("gather_logits").is_err());
    }

    #[test]
    fn host_clock_refuses_an_end_without_a_begin() {
        let mut c = HostClock::default();
        assert!(c.end("x").is_err());
        c.begin().unwrap();
        c.end("x").unwrap();
        let (calls, total) = c.finish().unwrap();
        assert_eq!(calls.len(), 1);
        assert!(total >= calls[0].1);
        assert!(c.finish().unwrap().0.is_empty());
    }
}
