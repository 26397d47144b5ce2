//! The CUDA step profiler's clock ([`crate::model::profile::OpClock`]): a CUDA event at every call boundary (the
//! end of one call is the start of the next, as nothing enters the stream between two calls of the recipe), read
//! back once the step has run.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{sys, CudaEvent, CudaStream};

use super::ops::drv;
use crate::model::profile::{unbalanced, OpClock};
use crate::Result;

/// The device's first head start: longer than any text model's step takes to issue.
const FIRST_HEAD_START: Duration = Duration::from_millis(20);
/// The shortest and the longest head start: a host hiccup of a few milliseconds must not make a step late, and a
/// host that blocks while issuing (a full launch queue) must not drive the wait up step after step.
const HEAD_START_RANGE: (Duration, Duration) = (Duration::from_millis(5), Duration::from_millis(100));

/// Events on the executor's stream, kept for the next step.
pub(super) struct EventClock {
    stream: Arc<CudaStream>,
    events: Vec<CudaEvent>,
    used: usize,
    /// The call begun last: the index of its start event.
    open: Option<usize>,
    /// Whether the last event recorded ends a call (the next call may start from it).
    at_boundary: bool,
    /// Per finished call: its label and the indices of its start and end events.
    calls: Vec<(&'static str, usize, usize)>,
    /// How long the device waits (`busy_wait`) before the next profiled step (see [`Self::adapt`]).
    head_start: Duration,
}

impl EventClock {
    pub(super) fn new(stream: Arc<CudaStream>) -> Self {
        EventClock {
            stream,
            events: Vec::new(),
            used: 0,
            open: None,
            at_boundary: false,
            calls: Vec::new(),
            head_start: FIRST_HEAD_START,
        }
    }

    /// The device's head start for the next step.
    pub(super) fn head_start(&self) -> Duration {
        self.head_start
    }

    /// After a step whose calls the host issued in `host`: the next head start is twice that, within
    /// [`HEAD_START_RANGE`]. Returns whether this step was late (the host was still issuing when the device
    /// finished waiting); a late step's `host` may include time blocked on the device, so it does not raise the
    /// head start by more than half again.
    pub(super) fn adapt(&mut self, host: Duration) -> bool {
        let late = host > self.head_start;
        let want = if late { self.head_start.mul_f64(1.5) } else { 2 * host };
        self.head_start = want.clamp(HEAD_START_RANGE.0, HEAD_START_RANGE.1);
        late
    }

    /// Forgets the marks of the current step.
    pub(super) fn reset(&mut self) {
        self.used = 0;
        self.open = None;
        self.at_boundary = false;
        self.calls.clear();
    }

    fn record(&mut self) -> Result<()> {
        if self.used == self.events.len() {
            let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
            let event = self.stream.context().new_event(flags).map_err(drv("create a profiling event"))?;
            self.events.push(event);
        }
        self.events[self.used].record(&self.stream).map_err(drv("record a profiling event"))?;
        self.used += 1;
        Ok(())
    }

    fn read(&self) -> Result<(Vec<(&'static str, f64)>, f64)> {
        if self.used == 0 {
            return Ok((Vec::new(), 0.0));
        }
        let secs = |a: usize, b: usize| {
            self.events[a]
                .elapsed_ms(&self.events[b])
                .map(|ms| f64::from(ms) * 1e-3)
                .map_err(drv("read profiling events"))
        };
        let calls = self.calls.iter().map(|&(label, a, b)| Ok((label, secs(a, b)?))).collect::<Result<Vec<_>>>()?;
        Ok((calls, secs(0, self.used - 1)?))
    }
}

impl OpClock for EventClock {
    fn begin(&mut self) -> Result<()> {
        // Nothing enters the stream between the end of one call and the start of the next.
        if !self.at_boundary {
            self.record()?;
        }
        self.open = Some(self.used - 1);
        Ok(())
    }

    fn end(&mut self, label: &'static str) -> Result<()> {
        let start = self.open.take().ok_or_else(|| unbalanced(label))?;
        self.record()?;
        self.calls.push((label, start, self.used - 1));
        self.at_boundary = true;
        Ok(())
    }

    fn finish(&mut self) -> Result<(Vec<(&'static str, f64)>, f64)> {
        let out = self.read();
        self.reset();
        out
    }
}
