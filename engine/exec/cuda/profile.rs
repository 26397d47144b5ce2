//! The CUDA step profiler's clock ([`crate::model::profile::OpClock`]): a CUDA event before and after every call,
//! read back once the step has run.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{sys, CudaEvent, CudaStream};

use super::ops::drv;
use crate::model::profile::{unbalanced, OpClock};
use crate::Result;

/// The device's first head start: longer than any text model's step takes to issue.
const FIRST_HEAD_START: Duration = Duration::from_millis(20);

/// Events on the executor's stream, kept for the next step.
pub(super) struct EventClock {
    stream: Arc<CudaStream>,
    events: Vec<CudaEvent>,
    used: usize,
    open: bool,
    labels: Vec<&'static str>,
    /// How long the device waits (`busy_wait`) before the next profiled step: twice the last step's host issue
    /// time, so that the host is done issuing before the device starts.
    pub(super) head_start: Duration,
}

impl EventClock {
    pub(super) fn new(stream: Arc<CudaStream>) -> Self {
        EventClock {
            stream,
            events: Vec::new(),
            used: 0,
            open: false,
            labels: Vec::new(),
            head_start: FIRST_HEAD_START,
        }
    }

    /// Forgets the marks of the current step.
    pub(super) fn reset(&mut self) {
        self.used = 0;
        self.open = false;
        self.labels.clear();
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
        let secs = |a: &CudaEvent, b: &CudaEvent| {
            a.elapsed_ms(b).map(|ms| f64::from(ms) * 1e-3).map_err(drv("read profiling events"))
        };
        let calls = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, &label)| Ok((label, secs(&self.events[2 * i], &self.events[2 * i + 1])?)))
            .collect::<Result<Vec<_>>>()?;
        Ok((calls, secs(&self.events[0], &self.events[self.used - 1])?))
    }
}

impl OpClock for EventClock {
    fn begin(&mut self) -> Result<()> {
        self.open = true;
        self.record()
    }

    fn end(&mut self, label: &'static str) -> Result<()> {
        if !std::mem::replace(&mut self.open, false) {
            return Err(unbalanced(label));
        }
        self.record()?;
        self.labels.push(label);
        Ok(())
    }

    fn finish(&mut self) -> Result<(Vec<(&'static str, f64)>, f64)> {
        let out = self.read();
        self.reset();
        out
    }
}
