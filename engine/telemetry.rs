//! GPU telemetry through NVML for `llama32 bench`: a background thread samples every watched GPU at a fixed interval
//! (power, the total-energy counter, SM and memory clocks, memory used, temperature, NVLink data counters), and
//! [`Sampler::window`] summarizes the samples between two [`Sampler::mark`]s into a [`GpuWindow`] per GPU.
//!
//! NVML (`libnvidia-ml.so`) is loaded at run time by `nvml-wrapper`, so the crate builds and runs without NVIDIA
//! drivers: [`Telemetry::start`] then returns [`Telemetry::Unavailable`] with the reason, and callers go on without
//! telemetry. Every field of a sample is optional, since boards support different subsets (no energy counter before
//! Volta, no NVLink on PCIe cards).
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
use serde::Serialize;

/// The sampling interval `llama32 bench` uses.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(50);

/// NVML field ids of the NVLink data throughput counters (KiB, payload only), queried with the all-links scope.
const NVLINK_DATA_TX: u32 = 138;
const NVLINK_DATA_RX: u32 = 139;

/// One reading of one GPU; `None` where the board or driver does not support the quantity.
#[derive(Clone, Debug)]
pub struct GpuSample {
    /// When the reading was taken.
    pub at: Instant,
    /// Board power draw in watts.
    pub power_w: Option<f64>,
    /// The board's energy counter since driver load, in millijoules.
    pub energy_mj: Option<u64>,
    /// SM clock in MHz.
    pub sm_clock_mhz: Option<u32>,
    /// Memory clock in MHz.
    pub mem_clock_mhz: Option<u32>,
    /// Device memory in use, in bytes.
    pub memory_used_bytes: Option<u64>,
    /// GPU core temperature in °C.
    pub temperature_c: Option<u32>,
    /// NVLink data transmitted over all links since driver load, in KiB.
    pub nvlink_tx_kib: Option<u64>,
    /// NVLink data received over all links since driver load, in KiB.
    pub nvlink_rx_kib: Option<u64>,
}

/// A watched GPU.
#[derive(Clone, Debug, Serialize)]
pub struct GpuInfo {
    /// The CUDA ordinal the bench named.
    pub cuda_ordinal: usize,
    /// Its NVML index.
    pub nvml_index: u32,
    /// Product name.
    pub name: String,
    /// Device memory in bytes.
    pub memory_total_bytes: Option<u64>,
    /// Enforced power limit in watts.
    pub power_limit_w: Option<f64>,
}

/// A summary of one GPU's samples over a window.
#[derive(Clone, Debug, Serialize)]
pub struct GpuWindow {
    /// The CUDA ordinal.
    pub cuda_ordinal: usize,
    /// The NVML index.
    pub nvml_index: u32,
    /// Product name.
    pub name: String,
    /// Samples in the window.
    pub samples: usize,
    /// Seconds from the first to the last sample.
    pub duration_s: f64,
    /// Time-weighted mean power (W).
    pub power_mean_w: Option<f64>,
    /// Highest power sample (W).
    pub power_max_w: Option<f64>,
    /// Enforced power limit (W).
    pub power_limit_w: Option<f64>,
    /// Energy used in the window (J).
    pub energy_j: Option<f64>,
    /// Where `energy_j` comes from: "counter" (the board's energy counter) or "power_integral" (power samples
    /// integrated over time, where the counter is unsupported).
    pub energy_source: Option<&'static str>,
    /// Mean SM clock (MHz).
    pub sm_clock_mean_mhz: Option<f64>,
    /// Lowest SM clock sample (MHz).
    pub sm_clock_min_mhz: Option<u32>,
    /// Highest SM clock sample (MHz).
    pub sm_clock_max_mhz: Option<u32>,
    /// Mean memory clock (MHz).
    pub mem_clock_mean_mhz: Option<f64>,
    /// Most device memory in use (bytes).
    pub memory_used_max_bytes: Option<u64>,
    /// Device memory (bytes).
    pub memory_total_bytes: Option<u64>,
    /// Highest temperature (°C).
    pub temperature_max_c: Option<u32>,
    /// NVLink bytes sent in the window, all links.
    pub nvlink_tx_bytes: Option<u64>,
    /// NVLink bytes received in the window, all links.
    pub nvlink_rx_bytes: Option<u64>,
    /// NVLink send rate (GB/s, 1e9 bytes).
    pub nvlink_tx_gb_per_s: Option<f64>,
    /// NVLink receive rate (GB/s, 1e9 bytes).
    pub nvlink_rx_gb_per_s: Option<f64>,
}

/// Summarizes `samples` (in time order) of the GPU `info`.
pub fn summarize(info: &GpuInfo, samples: &[GpuSample]) -> GpuWindow {
    let duration_s = match (samples.first(), samples.last()) {
        (Some(a), Some(b)) => b.at.duration_since(a.at).as_secs_f64(),
        _ => 0.0,
    };
    let power: Vec<(Instant, f64)> = samples.iter().filter_map(|s| s.power_w.map(|p| (s.at, p))).collect();
    // Trapezoids between consecutive power samples.
    let power_integral = (power.len() >= 2).then(|| {
        power.windows(2).map(|w| 0.5 * (w[0].1 + w[1].1) * w[1].0.duration_since(w[0].0).as_secs_f64()).sum::<f64>()
    });
    let power_span = match (power.first(), power.last()) {
        (Some(a), Some(b)) => b.0.duration_since(a.0).as_secs_f64(),
        _ => 0.0,
    };
    let power_mean_w = match power_integral {
        Some(e) if power_span > 0.0 => Some(e / power_span),
        _ => mean(power.iter().map(|p| p.1)),
    };
    let counter = |f: fn(&GpuSample) -> Option<u64>| -> Option<u64> {
        let first = samples.iter().find_map(f)?;
        let last = samples.iter().rev().find_map(f)?;
        last.checked_sub(first)
    };
    let energy_counter =
        if samples.iter().filter(|s| s.energy_mj.is_some()).count() >= 2 { counter(|s| s.energy_mj) } else { None };
    let (energy_j, energy_source) = match (energy_counter, power_integral) {
        // A counter that has not ticked over a window with power drawn is stale (coarse update period).
        (Some(0), Some(j)) if j > 0.0 => (Some(j), Some("power_integral")),
        (Some(mj), _) => (Some(mj as f64 / 1e3), Some("counter")),
        (None, Some(j)) => (Some(j), Some("power_integral")),
        (None, None) => (None, None),
    };
    let nvlink = |f: fn(&GpuSample) -> Option<u64>| {
        if samples.iter().filter(|s| f(s).is_some()).count() >= 2 {
            counter(f).map(|kib| kib * 1024)
        } else {
            None
        }
    };
    let nvlink_tx_bytes = nvlink(|s| s.nvlink_tx_kib);
    let nvlink_rx_bytes = nvlink(|s| s.nvlink_rx_kib);
    let rate = |b: Option<u64>| b.filter(|_| duration_s > 0.0).map(|b| b as f64 / duration_s / 1e9);
    let sm: Vec<u32> = samples.iter().filter_map(|s| s.sm_clock_mhz).collect();
    GpuWindow {
        cuda_ordinal: info.cuda_ordinal,
        nvml_index: info.nvml_index,
        name: info.name.clone(),
        samples: samples.len(),
        duration_s,
        power_mean_w,
        power_max_w: power.iter().map(|p| p.1).reduce(f64::max),
        power_limit_w: info.power_limit_w,
        energy_j,
        energy_source,
        sm_clock_mean_mhz: mean(sm.iter().map(|&c| c as f64)),
        sm_clock_min_mhz: sm.iter().copied().min(),
        sm_clock_max_mhz: sm.iter().copied().max(),
        mem_clock_mean_mhz: mean(samples.iter().filter_map(|s| s.mem_clock_mhz).map(f64::from)),
        memory_used_max_bytes: samples.iter().filter_map(|s| s.memory_used_bytes).max(),
        memory_total_bytes: info.memory_total_bytes,
        temperature_max_c: samples.iter().filter_map(|s| s.temperature_c).max(),
        nvlink_tx_bytes,
        nvlink_rx_bytes,
        nvlink_tx_gb_per_s: rate(nvlink_tx_bytes),
        nvlink_rx_gb_per_s: rate(nvlink_rx_bytes),
    }
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let (n, s) = v.fold((0usize, 0.0), |(n, s), x| (n + 1, s + x));
    (n > 0).then(|| s / n as f64)
}

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
            Ok(Ok(gpus)) => Ok(Sampler { gpus, samples, requests: Some(req_tx), thread: Some(thread) }),
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
        self.gpus
            .iter()
            .zip(all.iter())
            .map(|(info, s)| {
                let inside: Vec<GpuSample> = s.iter().filter(|x| x.at >= from && x.at <= to).cloned().collect();
                summarize(info, &inside)
            })
            .collect()
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

    fn info() -> GpuInfo {
        GpuInfo {
            cuda_ordinal: 1,
            nvml_index: 3,
            name: "test".into(),
            memory_total_bytes: Some(80 << 30),
            power_limit_w: Some(700.0),
        }
    }

    fn sample(t0: Instant, ms: u64, power: f64) -> GpuSample {
        GpuSample {
            at: t0 + Duration::from_millis(ms),
            power_w: Some(power),
            energy_mj: None,
            sm_clock_mhz: Some(1000 + ms as u32),
            mem_clock_mhz: Some(2600),
            memory_used_bytes: Some(ms << 20),
            temperature_c: Some(40 + ms as u32 / 100),
            nvlink_tx_kib: None,
            nvlink_rx_kib: None,
        }
    }

    #[test]
    fn power_is_integrated_over_time_without_an_energy_counter() {
        let t0 = Instant::now();
        // 100 W for 1 s, then a ramp to 300 W over 1 s: 100 + 200 = 300 J over 2 s.
        let s = vec![sample(t0, 0, 100.0), sample(t0, 1000, 100.0), sample(t0, 2000, 300.0)];
        let w = summarize(&info(), &s);
        assert_eq!(w.samples, 3);
        assert!((w.duration_s - 2.0).abs() < 1e-9);
        assert!((w.energy_j.unwrap() - 300.0).abs() < 1e-6, "{:?}", w.energy_j);
        assert_eq!(w.energy_source, Some("power_integral"));
        assert!((w.power_mean_w.unwrap() - 150.0).abs() < 1e-6);
        assert_eq!(w.power_max_w, Some(300.0));
        assert_eq!((w.sm_clock_min_mhz, w.sm_clock_max_mhz), (Some(1000), Some(3000)));
        assert!((w.sm_clock_mean_mhz.unwrap() - 2000.0).abs() < 1e-9);
        assert_eq!(w.memory_used_max_bytes, Some(2000 << 20));
        assert_eq!(w.temperature_max_c, Some(60));
        assert_eq!((w.cuda_ordinal, w.nvml_index), (1, 3));
        assert!(w.nvlink_tx_bytes.is_none());
    }

    #[test]
    fn counters_give_energy_and_nvlink_deltas() {
        let t0 = Instant::now();
        let mut s = vec![sample(t0, 0, 100.0), sample(t0, 500, 900.0), sample(t0, 1000, 100.0)];
        for (i, x) in s.iter_mut().enumerate() {
            x.energy_mj = Some(5_000_000 + 250_000 * i as u64);
            x.nvlink_tx_kib = Some(1000 + 1_000_000 * i as u64);
            x.nvlink_rx_kib = Some(7);
        }
        s[1].energy_mj = None; // A failed read in the middle does not matter.
        let w = summarize(&info(), &s);
        assert_eq!(w.energy_source, Some("counter"));
        assert!((w.energy_j.unwrap() - 500.0).abs() < 1e-9);
        assert_eq!(w.nvlink_tx_bytes, Some(2_000_000 * 1024));
        assert_eq!(w.nvlink_rx_bytes, Some(0));
        // A counter that did not move while power was drawn falls back to the power integral (0.5 s at 100 W).
        let s2: Vec<GpuSample> =
            [0, 500].iter().map(|&ms| GpuSample { energy_mj: Some(42), ..sample(t0, ms, 100.0) }).collect();
        let w2 = summarize(&info(), &s2);
        assert_eq!(w2.energy_source, Some("power_integral"));
        assert!((w2.energy_j.unwrap() - 50.0).abs() < 1e-6);
        assert!((w.nvlink_tx_gb_per_s.unwrap() - 2_048_000_000.0 / 1e9).abs() < 1e-9);
    }

    #[test]
    fn empty_and_single_sample_windows_have_no_energy() {
        let t0 = Instant::now();
        let w = summarize(&info(), &[]);
        assert_eq!((w.samples, w.energy_j, w.power_mean_w), (0, None, None));
        let w = summarize(&info(), &[sample(t0, 0, 123.0)]);
        assert_eq!(w.power_mean_w, Some(123.0));
        assert!(w.energy_j.is_none());
    }

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
