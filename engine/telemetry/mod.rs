//! GPU telemetry through NVML for `llama32 bench`: a background thread samples every watched GPU at a fixed interval
//! (power, the total-energy counter, SM and memory clocks, memory used, temperature, NVLink data counters), and
//! [`Sampler::window`] summarizes the samples between two [`Sampler::mark`]s into a [`GpuWindow`] per GPU;
//! [`run_energy`] turns a bench's prefill-only and full windows into its energy figures.
//!
//! NVML (`libnvidia-ml.so`) is loaded at run time by `nvml-wrapper`, so the crate builds and runs without NVIDIA
//! drivers: [`Telemetry::start`] then returns [`Telemetry::Unavailable`] with the reason, and callers go on without
//! telemetry. Every field of a sample is optional, since boards support different subsets (no energy counter before
//! Volta, no NVLink on PCIe cards).
//!
//! # Energy of a window
//! A window's energy comes only from the samples inside it, and is `None` (with [`GpuWindow::energy_note`] saying
//! why) rather than a number the samples cannot support:
//! - A window shorter than [`MIN_WINDOW_INTERVALS`] sampling intervals, or with fewer than two samples inside, has
//!   no energy ([`GpuWindow::window_too_short`]).
//! - With the board's energy counter, the counter's value is stale between its updates (tens of milliseconds on
//!   recent boards), so the difference between two readings is not the energy between them: a reading just after
//!   an update carries energy from before the window. Only the updates seen between two samples inside the window
//!   are used; each is timed to the middle of its two samples (± half their gap). The energy between the first and
//!   the last such update, over the time between them, gives the window's mean power, times the window's length
//!   gives its energy. At least two updates are needed, spanning at least [`MIN_COVERAGE`] of the window, with a
//!   timing uncertainty of the mean power of at most [`MAX_REL_UNCERTAINTY`] ([`GpuWindow::energy_rel_uncertainty`]).
//! - Without the counter, the power samples inside the window are integrated (trapezoids) over the time they span,
//!   which must be at least [`MIN_COVERAGE`] of the window. NVML averages the power reading over up to a second on
//!   Ampere and later boards, which all have the counter.
//!
//! CUDA ordinals are mapped to NVML devices through `CUDA_VISIBLE_DEVICES` (indices or `GPU-` UUIDs) when it is
//! set, else ordinal `i` is NVML index `i`; this matches when CUDA enumerates in PCI order
//! (`CUDA_DEVICE_ORDER=PCI_BUS_ID`, or identical GPUs as on an HGX node).

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::{Device, Nvml};

mod window;

pub use window::{
    run_energy, summarize, GpuInfo, GpuSample, GpuWindow, RunEnergy, MAX_REL_UNCERTAINTY, MIN_COVERAGE,
    MIN_WINDOW_INTERVALS,
};

/// The sampling interval `llama32 bench` uses.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(50);

/// NVML field ids of the NVLink data throughput counters (KiB, payload only), queried with the all-links scope.
const NVLINK_DATA_TX: u32 = 138;
const NVLINK_DATA_RX: u32 = 139;

/// Telemetry for a run: sampling, or the reason it cannot.
pub enum Telemetry {
    /// NVML is sampling the GPUs.
    Sampling(Sampler),
    /// NVML cannot be used; the reason, in words.
    Unavailable(String),
}

impl Telemetry {
    /// Starts sampling the GPUs with CUDA ordinals `cuda_ordinals` every `interval`, or says why it cannot.
    pub fn start(cuda_ordinals: &[usize], interval: Duration) -> Telemetry {
        match Sampler::start(cuda_ordinals, interval) {
            Ok(s) => Telemetry::Sampling(s),
            Err(why) => Telemetry::Unavailable(why),
        }
    }
}

/// A request to the sampling thread: take a sample of every GPU now and send back its time.
struct SampleNow(mpsc::Sender<Instant>);

/// Samples a set of GPUs on a background thread until dropped.
pub struct Sampler {
    gpus: Vec<GpuInfo>,
    interval: Duration,
    samples: Arc<Mutex<Vec<Vec<GpuSample>>>>,
    requests: Option<mpsc::Sender<SampleNow>>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    /// Loads NVML, finds the GPUs with CUDA ordinals `cuda_ordinals` (duplicates are watched once) and starts the
    /// sampling thread; `Err` says why telemetry is unavailable.
    pub fn start(cuda_ordinals: &[usize], interval: Duration) -> std::result::Result<Sampler, String> {
        let mut ordinals: Vec<usize> = Vec::new();
        for &o in cuda_ordinals {
            if !ordinals.contains(&o) {
                ordinals.push(o);
            }
        }
        if ordinals.is_empty() {
            return Err("no GPUs to watch".into());
        }
        let samples = Arc::new(Mutex::new(vec![Vec::new(); ordinals.len()]));
        let (req_tx, req_rx) = mpsc::channel::<SampleNow>();
        let (ready_tx, ready_rx) = mpsc::channel::<std::result::Result<Vec<GpuInfo>, String>>();
        let shared = samples.clone();
        let interval = interval.max(Duration::from_millis(1));
        let thread = std::thread::Builder::new()
            .name("nvml-telemetry".into())
            .spawn(move || sampling_thread(ordinals, interval, shared, req_rx, ready_tx))
            .map_err(|e| format!("cannot start the telemetry thread: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(gpus)) => Ok(Sampler { gpus, interval, samples, requests: Some(req_tx), thread: Some(thread) }),
            Ok(Err(why)) => {
                let _ = thread.join();
                Err(why)
            }
            Err(_) => {
                let _ = thread.join();
                Err("the telemetry thread stopped while loading NVML".into())
            }
        }
    }

    /// The watched GPUs, in the order of [`Sampler::window`]'s summaries.
    pub fn gpus(&self) -> &[GpuInfo] {
        &self.gpus
    }

    /// The sampling interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Takes a sample of every GPU now and returns its time: a window's bounds, so that the counters' deltas cover
    /// it exactly.
    pub fn mark(&self) -> Instant {
        let (tx, rx) = mpsc::channel();
        let sent = self.requests.as_ref().is_some_and(|r| r.send(SampleNow(tx)).is_ok());
        if sent {
            if let Ok(t) = rx.recv_timeout(Duration::from_secs(5)) {
                return t;
            }
        }
        Instant::now()
    }

    /// Per-GPU summaries of the samples taken from `from` to `to` (both included).
    pub fn window(&self, from: Instant, to: Instant) -> Vec<GpuWindow> {
        let all = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        self.gpus.iter().zip(all.iter()).map(|(info, s)| summarize(info, s, from, to, self.interval)).collect()
    }

    /// Drops the samples taken before `t` (long sweeps keep memory flat).
    pub fn forget_before(&self, t: Instant) {
        let mut all = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        for s in all.iter_mut() {
            s.retain(|x| x.at >= t);
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.requests = None; // Disconnects the thread's channel, which ends it.
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The NVML device of CUDA ordinal `ordinal`, through `CUDA_VISIBLE_DEVICES` when set.
fn nvml_device(nvml: &Nvml, ordinal: usize) -> std::result::Result<Device<'_>, String> {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok().filter(|v| !v.trim().is_empty());
    let entry = match &visible {
        Some(v) => {
            let list: Vec<&str> = v.split(',').map(str::trim).collect();
            let e = list.get(ordinal).copied().ok_or_else(|| {
                format!("cuda:{ordinal} is not among CUDA_VISIBLE_DEVICES={v} ({} devices)", list.len())
            })?;
            Some(e.to_string())
        }
        None => None,
    };
    match entry {
        Some(e) if e.starts_with("GPU-") => {
            nvml.device_by_uuid(e.as_str()).map_err(|err| format!("NVML has no GPU with UUID {e}: {err}"))
        }
        Some(e) => {
            let index: u32 = e.parse().map_err(|_| {
                format!("CUDA_VISIBLE_DEVICES entry `{e}` for cuda:{ordinal} is neither an index nor a GPU- UUID")
            })?;
            nvml.device_by_index(index).map_err(|err| format!("NVML device {index} (cuda:{ordinal}): {err}"))
        }
        None => nvml.device_by_index(ordinal as u32).map_err(|err| format!("NVML device {ordinal}: {err}")),
    }
}

fn sampling_thread(
    ordinals: Vec<usize>,
    interval: Duration,
    samples: Arc<Mutex<Vec<Vec<GpuSample>>>>,
    requests: mpsc::Receiver<SampleNow>,
    ready: mpsc::Sender<std::result::Result<Vec<GpuInfo>, String>>,
) {
    let nvml = match Nvml::init() {
        Ok(n) => n,
        Err(e) => {
            let _ = ready.send(Err(format!("NVML could not be loaded ({e}); is the NVIDIA driver installed?")));
            return;
        }
    };
    let mut devices = Vec::with_capacity(ordinals.len());
    let mut infos = Vec::with_capacity(ordinals.len());
    for &o in &ordinals {
        let d = match nvml_device(&nvml, o) {
            Ok(d) => d,
            Err(why) => {
                let _ = ready.send(Err(why));
                return;
            }
        };
        infos.push(GpuInfo {
            cuda_ordinal: o,
            nvml_index: d.index().unwrap_or(o as u32),
            name: d.name().unwrap_or_else(|_| "unknown".into()),
            memory_total_bytes: d.memory_info().ok().map(|m| m.total),
            power_limit_w: d.enforced_power_limit().ok().map(|mw| mw as f64 / 1e3),
        });
        devices.push(d);
    }
    if ready.send(Ok(infos)).is_err() {
        return;
    }
    let take = |devices: &[Device<'_>]| -> Instant {
        let now = Instant::now();
        let batch: Vec<GpuSample> = devices.iter().map(|d| read(&nvml, d, now)).collect();
        let mut all = samples.lock().unwrap_or_else(|e| e.into_inner());
        for (v, s) in all.iter_mut().zip(batch) {
            v.push(s);
        }
        now
    };
    take(&devices);
    let mut next = Instant::now() + interval;
    loop {
        match requests.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Ok(SampleNow(reply)) => {
                let _ = reply.send(take(&devices));
            }
            Err(RecvTimeoutError::Timeout) => {
                take(&devices);
                next += interval;
                let now = Instant::now();
                if next < now {
                    next = now + interval; // Fell behind (slow NVML calls): skip the missed ticks.
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// One sample of `d` stamped `at`.
fn read(nvml: &Nvml, d: &Device<'_>, at: Instant) -> GpuSample {
    let (nvlink_tx_kib, nvlink_rx_kib) = nvlink_counters(nvml, d);
    GpuSample {
        at,
        power_w: d.power_usage().ok().map(|mw| mw as f64 / 1e3),
        energy_mj: d.total_energy_consumption().ok(),
        sm_clock_mhz: d.clock_info(Clock::SM).ok(),
        mem_clock_mhz: d.clock_info(Clock::Memory).ok(),
        memory_used_bytes: d.memory_info().ok().map(|m| m.used),
        temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
        nvlink_tx_kib,
        nvlink_rx_kib,
    }
}

/// The NVLink data counters summed over all links. The wrapper's `field_values_for` cannot set the scope (it always
/// asks for link 0), so this calls `nvmlDeviceGetFieldValues` itself with the all-links scope, `u32::MAX`.
fn nvlink_counters(nvml: &Nvml, d: &Device<'_>) -> (Option<u64>, Option<u64>) {
    use nvml_wrapper_sys::bindings::{nvmlFieldValue_t, nvmlReturn_enum_NVML_SUCCESS};
    let Ok(get) = nvml.lib().nvmlDeviceGetFieldValues.as_ref() else {
        return (None, None);
    };
    // SAFETY: nvmlFieldValue_t is plain C data (integers and a union of numbers), valid when zeroed.
    let mut values: [nvmlFieldValue_t; 2] = unsafe { std::mem::zeroed() };
    for (v, id) in values.iter_mut().zip([NVLINK_DATA_TX, NVLINK_DATA_RX]) {
        v.fieldId = id;
        v.scopeId = u32::MAX;
    }
    // SAFETY: the handle belongs to `nvml`, which outlives the call; `values` holds the 2 entries the call is told of.
    let status = unsafe { get(d.handle(), values.len() as i32, values.as_mut_ptr()) };
    if status != nvmlReturn_enum_NVML_SUCCESS {
        return (None, None);
    }
    let value = |v: &nvmlFieldValue_t| -> Option<u64> {
        if v.nvmlReturn != nvmlReturn_enum_NVML_SUCCESS {
            return None;
        }
        // SAFETY: the union member read is the one `valueType` names.
        unsafe {
            match v.valueType {
                1 => Some(u64::from(v.value.uiVal)),
                2 => Some(v.value.ulVal),
                3 => Some(v.value.ullVal),
                _ => None,
            }
        }
    };
    (value(&values[0]), value(&values[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_gpus_is_unavailable_with_a_reason() {
        match Telemetry::start(&[], DEFAULT_INTERVAL) {
            Telemetry::Unavailable(why) => assert!(why.contains("no GPUs"), "{why}"),
            Telemetry::Sampling(_) => panic!("sampling nothing"),
        }
    }

    #[test]
    fn device_zero_samples_or_says_why_not() {
        match Telemetry::start(&[0, 0], Duration::from_millis(5)) {
            Telemetry::Unavailable(why) => assert!(!why.trim().is_empty()),
            Telemetry::Sampling(s) => {
                assert_eq!(s.gpus().len(), 1, "a repeated ordinal is watched once");
                assert_eq!(s.interval(), Duration::from_millis(5));
                let a = s.mark();
                std::thread::sleep(Duration::from_millis(30));
                let b = s.mark();
                let w = s.window(a, b);
                assert_eq!(w.len(), 1);
                assert!(w[0].samples >= 2, "{:?}", w[0]);
                assert!(w[0].duration_s > 0.0);
            }
        }
    }
}
