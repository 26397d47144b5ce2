//! A busy wait on the device (`kernels/timing.cu`): the head start the step profiler
//! ([`crate::model::profile`]) gives the host, so that a profiled step's kernels run back to back.
//!
//! It computes nothing, so unlike the other families it has no CPU twin.

use std::time::Duration;

use cudarc::driver::CudaStream;

use crate::{Error, Result};

/// The longest wait the kernel takes (`L32_BUSY_WAIT_MAX_NS`).
pub const MAX_BUSY_WAIT: Duration = Duration::from_secs(1);

/// Enqueues one warp on `stream` that returns after `wait` of device time; later work in the stream starts after
/// it. Returns without waiting. `wait` is at most [`MAX_BUSY_WAIT`].
pub fn busy_wait(stream: &CudaStream, wait: Duration) -> Result<()> {
    const OP: &str = "busy_wait";
    super::ensure_built()?;
    if wait > MAX_BUSY_WAIT {
        return Err(Error::Backend(format!("{OP}: {wait:?} is longer than the {MAX_BUSY_WAIT:?} the kernel takes")));
    }
    launch(OP, stream, wait.as_nanos() as u64)
}

#[cfg(llama32_cuda)]
fn launch(op: &str, stream: &CudaStream, nanoseconds: u64) -> Result<()> {
    let raw = super::raw_stream(op, stream)?;
    // SAFETY: the kernel takes no pointers; `raw` is this stream's handle with its context current.
    let status = unsafe { super::ffi::l32_busy_wait(nanoseconds, raw) };
    super::check_launch(op, stream, status, || format!("{op} ({nanoseconds} ns)"))
}

#[cfg(not(llama32_cuda))]
fn launch(_op: &str, _stream: &CudaStream, _nanoseconds: u64) -> Result<()> {
    super::ensure_built()
}
