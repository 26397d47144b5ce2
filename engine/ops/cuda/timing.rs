//! Device-side measurement kernels, which compute nothing a model uses and so have no CPU twin:
//! - a busy wait (`kernels/timing.cu`): the head start the step profiler ([`crate::model::profile`]) gives the host,
//!   so that a profiled step's kernels run back to back;
//! - the grid probe (`kernels/grid_probe.cu`, [`GridProbe`]): what a persistent per-step decode kernel needs to
//!   know first (docs/architecture.md): a grid barrier's latency and soundness, and whether a weight stream
//!   continues across barriers.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{CudaSlice, CudaStream};

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

/// Bytes per block per ring stage of the grid probe's stream (`L32_GRID_PROBE_CHUNK`).
pub const GRID_PROBE_CHUNK: usize = 16 * 1024;
/// The most phases one probe launch takes (`L32_GRID_PROBE_MAX_PHASES`).
pub const GRID_PROBE_MAX_PHASES: usize = 1 << 20;

/// What a [`GridProbe`] launch measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GridProbeMode {
    /// `phases` phases of two grid barriers, each block checking its neighbour's tag after the first
    /// ([`GridProbe::wrong_tags`] counts the wrong ones).
    Barrier,
    /// Every block streams its share of the buffer through a shared-memory ring (8 chunks of 16 KB in flight).
    Stream,
    /// [`GridProbeMode::Stream`] with `phases` grid barriers spread over it, the ring's next chunks in flight across
    /// each.
    StreamBarrier,
    /// [`GridProbeMode::Barrier`] with the grid barrier's earlier form (an `atomicAdd` arrival whose result the
    /// block waits for before it polls), to time the two side by side.
    BarrierAtomic,
}

impl GridProbeMode {
    /// True for the modes that stream the source ([`GridProbeMode::Stream`], [`GridProbeMode::StreamBarrier`]).
    pub fn streams(self) -> bool {
        matches!(self, GridProbeMode::Stream | GridProbeMode::StreamBarrier)
    }
}

/// The grid probe's buffers: a stream source of [`GridProbe::bytes`] bytes (deterministic, not zero), the
/// barrier's state, and one tag and one output word per block. Launches are cooperative, one block per SM.
#[cfg_attr(not(llama32_cuda), allow(dead_code))]
pub struct GridProbe {
    src: CudaSlice<u8>,
    sync: CudaSlice<u32>,
    tags: CudaSlice<u32>,
    out: CudaSlice<u32>,
    blocks: usize,
    /// Bytes the stream modes read (whole chunks; 0 for barrier-only probes).
    bytes: usize,
    /// The xor of every 32-bit word of those bytes (little-endian), taken from the host copy before the upload.
    fold: u32,
}

impl GridProbe {
    /// The blocks a probe launch takes on the stream's device (one per SM); 0 in a build without CUDA or where a
    /// block per SM cannot be resident.
    pub fn blocks(stream: &CudaStream) -> Result<usize> {
        super::ensure_built()?;
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| Error::Backend(format!("grid probe: binding the context: {e}")))?;
        Ok(probe_blocks())
    }

    /// Buffers for probes on `stream`, with a source of `bytes` rounded up to whole chunks (0 for barrier-only
    /// probes).
    pub fn new(stream: &Arc<CudaStream>, bytes: usize) -> Result<Self> {
        let blocks = Self::blocks(stream)?;
        if blocks == 0 {
            return Err(Error::Backend("grid probe: a block per SM cannot be resident on this device".into()));
        }
        let err = |what: &'static str| {
            move |e: cudarc::driver::DriverError| Error::Backend(format!("grid probe: {what}: {e}"))
        };
        let bytes = bytes.div_ceil(GRID_PROBE_CHUNK) * GRID_PROBE_CHUNK;
        let host: Vec<u8> = (0..bytes.max(16)).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let fold = host[..bytes].chunks_exact(4).fold(0, |acc, w| acc ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        Ok(GridProbe {
            src: stream.clone_htod(&host).map_err(err("upload the source"))?,
            sync: stream.alloc_zeros::<u32>(2).map_err(err("allocate"))?,
            tags: stream.alloc_zeros::<u32>(blocks).map_err(err("allocate"))?,
            out: stream.alloc_zeros::<u32>(blocks).map_err(err("allocate"))?,
            blocks,
            bytes,
            fold,
        })
    }

    /// Blocks per launch.
    pub fn num_blocks(&self) -> usize {
        self.blocks
    }

    /// Bytes a stream mode reads (whole chunks).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Zeroes the outputs, then enqueues one cooperative launch of `mode` with `phases` phases (barriers) on
    /// `stream`; returns without waiting. A stream mode needs at least `blocks * (phases + 1)` chunks.
    pub fn launch(&mut self, stream: &Arc<CudaStream>, mode: GridProbeMode, phases: usize) -> Result<()> {
        const OP: &str = "grid_probe";
        super::ensure_built()?;
        if phases > GRID_PROBE_MAX_PHASES {
            return Err(Error::Backend(format!("{OP}: {phases} phases, at most {GRID_PROBE_MAX_PHASES}")));
        }
        if mode.streams() && self.bytes() / GRID_PROBE_CHUNK < self.blocks * (phases + 1) {
            return Err(Error::Backend(format!(
                "{OP}: {} bytes are fewer than a {GRID_PROBE_CHUNK}-byte chunk per block ({}) and interval ({})",
                self.bytes(),
                self.blocks,
                phases + 1
            )));
        }
        stream.memset_zeros(&mut self.out).map_err(|e| Error::Backend(format!("{OP}: zero the outputs: {e}")))?;
        launch_probe(OP, stream, self, mode, phases)
    }

    /// The outputs of the last launch (waits for it): per block, the wrong tags seen (barrier) or the fold of the
    /// bytes read (stream modes).
    pub fn outputs(&self, stream: &Arc<CudaStream>) -> Result<Vec<u32>> {
        stream.clone_dtoh(&self.out).map_err(|e| Error::Backend(format!("grid probe: read the outputs: {e}")))
    }

    /// The wrong neighbour tags of the last [`GridProbeMode::Barrier`] (or [`GridProbeMode::BarrierAtomic`]) launch,
    /// all blocks together (0 when the barrier is sound).
    pub fn wrong_tags(&self, stream: &Arc<CudaStream>) -> Result<u64> {
        Ok(self.outputs(stream)?.iter().map(|&w| u64::from(w)).sum())
    }

    /// The fold of every 32-bit word of the source (xor), which the stream modes compute on the device, all blocks
    /// together (taken from the host data at construction, so no read-back).
    pub fn expected_fold(&self) -> u32 {
        self.fold
    }
}

#[cfg(llama32_cuda)]
fn probe_blocks() -> usize {
    // SAFETY: no arguments; queries the current device (bound by the caller).
    unsafe { super::ffi::l32_grid_probe_blocks() }.max(0) as usize
}

#[cfg(not(llama32_cuda))]
fn probe_blocks() -> usize {
    0
}

#[cfg(llama32_cuda)]
fn launch_probe(
    op: &str,
    stream: &CudaStream,
    probe: &mut GridProbe,
    mode: GridProbeMode,
    phases: usize,
) -> Result<()> {
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    let (bytes, blocks) = (probe.bytes(), probe.blocks);
    let (src, _src) = probe.src.device_ptr(stream);
    let (sync, _sync) = probe.sync.device_ptr_mut(stream);
    let (tags, _tags) = probe.tags.device_ptr_mut(stream);
    let (out, _out) = probe.out.device_ptr_mut(stream);
    let ffi_mode = match mode {
        GridProbeMode::Barrier => super::ffi::l32_grid_probe_mode::L32_GRID_PROBE_BARRIER,
        GridProbeMode::Stream => super::ffi::l32_grid_probe_mode::L32_GRID_PROBE_STREAM,
        GridProbeMode::StreamBarrier => super::ffi::l32_grid_probe_mode::L32_GRID_PROBE_STREAM_BARRIER,
        GridProbeMode::BarrierAtomic => super::ffi::l32_grid_probe_mode::L32_GRID_PROBE_BARRIER_ATOMIC,
    };
    let params = super::ffi::l32_grid_probe_params {
        src: src as *const std::ffi::c_void,
        bytes: bytes as i64,
        sync: sync as *mut u32,
        tags: tags as *mut u32,
        out: out as *mut u32,
        phases: phases as i32,
        mode: ffi_mode.0 as i32,
    };
    let raw = super::raw_stream(op, stream)?;
    // SAFETY: the pointers come from this probe's live allocations on this stream's device (the source holds
    // `bytes`, tags and out one word per block, sync two words), held until after the launch; phases is in range.
    let status = unsafe { super::ffi::l32_grid_probe(&params, raw) };
    super::check_launch(op, stream, status, || format!("{op} ({mode:?}, {phases} phases, {blocks} blocks)"))
}

#[cfg(not(llama32_cuda))]
fn launch_probe(
    _op: &str,
    _stream: &CudaStream,
    _probe: &mut GridProbe,
    _mode: GridProbeMode,
    _phases: usize,
) -> Result<()> {
    super::ensure_built()
}
