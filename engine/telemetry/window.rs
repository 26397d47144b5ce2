//! The window arithmetic of [`crate::telemetry`]: GPU samples, their summary over a window and the energy figures
//! of a bench line. When a window gets an energy figure is described in the docs of [`crate::telemetry`].

use std::time::{Duration, Instant};

use serde::Serialize;

/// A window shorter than this many sampling intervals gets no energy figure.
pub const MIN_WINDOW_INTERVALS: u32 = 2;

/// The least fraction of a window that the energy counter's timed updates (or the power samples) must span for the
/// window to get an energy figure.
pub const MIN_COVERAGE: f64 = 0.5;

/// The largest relative uncertainty of a window's mean power, from the timing of the energy counter's updates, at
/// which the window still gets an energy figure.
pub const MAX_REL_UNCERTAINTY: f64 = 0.5;

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
    /// Seconds from the window's start to its end.
    pub window_s: f64,
    /// Seconds from the first to the last sample in the window.
    pub duration_s: f64,
    /// Time-weighted mean of the power samples in the window (W); NVML's reading is itself an average over up to a
    /// second on Ampere and later boards.
    pub power_mean_w: Option<f64>,
    /// Highest power sample (W).
    pub power_max_w: Option<f64>,
    /// Enforced power limit (W).
    pub power_limit_w: Option<f64>,
    /// Energy used in the window (J); `None` where the samples inside the window cannot support a figure
    /// (`energy_note` says why). See the module docs.
    pub energy_j: Option<f64>,
    /// Where `energy_j` comes from: "counter" (the board's energy counter) or "power_integral" (power samples
    /// integrated over time, where the counter is unsupported).
    pub energy_source: Option<&'static str>,
    /// Bound on the relative error of `energy_j` from the timing of the counter's updates (0.1 = ±10%); `None` for
    /// the power integral, whose error is unknown.
    pub energy_rel_uncertainty: Option<f64>,
    /// Why `energy_j` is `None`, or a caveat on it, in words.
    pub energy_note: Option<String>,
    /// Whether the window is too short (in sampling intervals, samples or energy counter updates) for an energy
    /// figure; a longer window would get one.
    pub window_too_short: bool,
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

/// A window's energy estimate.
struct Energy {
    joules: f64,
    source: &'static str,
    rel_uncertainty: Option<f64>,
    note: Option<String>,
}

/// Why a window has no energy figure: whether a longer window would have one, and the reason in words.
struct NoEnergy {
    too_short: bool,
    why: String,
}

impl NoEnergy {
    fn too_short(why: String) -> NoEnergy {
        NoEnergy { too_short: true, why }
    }
}

fn secs(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64()
}

/// The energy of a window of `window_s` seconds from the energy counter readings `points` (time order) inside it.
fn counter_energy(points: &[(Instant, u64)], window_s: f64) -> std::result::Result<Energy, NoEnergy> {
    // The counter's updates seen between two samples: (previous sample's time, sample's time, value).
    let mut updates: Vec<(Instant, Instant, u64)> = Vec::new();
    for w in points.windows(2) {
        let ((t0, v0), (t1, v1)) = (w[0], w[1]);
        if v1 < v0 {
            return Err(NoEnergy {
                too_short: false,
                why: "the energy counter went backwards inside the window (driver reloaded?)".into(),
            });
        }
        if v1 > v0 {
            updates.push((t0, t1, v1));
        }
    }
    let (first, last) = match (updates.first(), updates.last()) {
        (Some(&f), Some(&l)) if updates.len() >= 2 => (f, l),
        _ => {
            return Err(NoEnergy::too_short(format!(
                "the energy counter changed {} time(s) between samples inside the window; timing its updates needs 2",
                updates.len()
            )))
        }
    };
    // Each update happened between its two samples: at their middle, within half their gap.
    let mid = |u: (Instant, Instant, u64)| secs(first.0, u.0) + 0.5 * secs(u.0, u.1);
    let span = mid(last) - mid(first);
    let half_width = 0.5 * (secs(first.0, first.1) + secs(last.0, last.1));
    if span <= half_width {
        return Err(NoEnergy::too_short(format!(
            "the energy counter's updates inside the window are {:.1} ms apart, timed only to ±{:.1} ms",
            span * 1e3,
            half_width * 1e3
        )));
    }
    // The true span lies in span ± half_width; the mean power's worst relative error is on the short side.
    let rel = half_width / (span - half_width);
    if rel > MAX_REL_UNCERTAINTY {
        return Err(NoEnergy::too_short(format!(
            "the energy counter's updates inside the window time its mean power only to ±{:.0}% (at most ±{:.0}% \
             gives a figure)",
            rel * 1e2,
            MAX_REL_UNCERTAINTY * 1e2
        )));
    }
    if span < MIN_COVERAGE * window_s {
        return Err(NoEnergy::too_short(format!(
            "the energy counter's updates span {:.1} ms of the {:.1} ms window",
            span * 1e3,
            window_s * 1e3
        )));
    }
    let joules = (last.2 - first.2) as f64 / 1e3;
    Ok(Energy { joules: joules / span * window_s, source: "counter", rel_uncertainty: Some(rel), note: None })
}

/// The energy of a window of `window_s` seconds from the power readings `power` (time order) inside it.
fn power_energy(power: &[(Instant, f64)], window_s: f64) -> std::result::Result<Energy, NoEnergy> {
    let span = match (power.first(), power.last()) {
        (Some(a), Some(b)) if power.len() >= 2 => secs(a.0, b.0),
        _ => {
            return Err(NoEnergy {
                too_short: power.len() == 1,
                why: format!("no energy counter, and {} power reading(s) in the window", power.len()),
            })
        }
    };
    if span <= 0.0 || span < MIN_COVERAGE * window_s {
        return Err(NoEnergy::too_short(format!(
            "the power readings span {:.1} ms of the {:.1} ms window",
            span * 1e3,
            window_s * 1e3
        )));
    }
    let integral: f64 = power.windows(2).map(|w| 0.5 * (w[0].1 + w[1].1) * secs(w[0].0, w[1].0)).sum();
    Ok(Energy {
        joules: integral / span * window_s,
        source: "power_integral",
        rel_uncertainty: None,
        note: Some("integrated power readings (no energy counter); their error is unknown".into()),
    })
}

/// Summarizes the samples of the GPU `info` taken from `from` to `to` (both included) while sampling every
/// `interval`; `samples` are in time order, and those outside the window are ignored. See the module docs for when
/// the window gets an energy figure.
pub fn summarize(info: &GpuInfo, samples: &[GpuSample], from: Instant, to: Instant, interval: Duration) -> GpuWindow {
    let samples: Vec<&GpuSample> = samples.iter().filter(|s| s.at >= from && s.at <= to).collect();
    let window_s = secs(from, to);
    let duration_s = match (samples.first(), samples.last()) {
        (Some(a), Some(b)) => secs(a.at, b.at),
        _ => 0.0,
    };
    let power: Vec<(Instant, f64)> = samples.iter().filter_map(|s| s.power_w.map(|p| (s.at, p))).collect();
    // Trapezoids between consecutive power samples.
    let power_integral = (power.len() >= 2)
        .then(|| power.windows(2).map(|w| 0.5 * (w[0].1 + w[1].1) * secs(w[0].0, w[1].0)).sum::<f64>());
    let power_span = match (power.first(), power.last()) {
        (Some(a), Some(b)) => secs(a.0, b.0),
        _ => 0.0,
    };
    let power_mean_w = match power_integral {
        Some(e) if power_span > 0.0 => Some(e / power_span),
        _ => mean(power.iter().map(|p| p.1)),
    };
    let min_window = interval * MIN_WINDOW_INTERVALS;
    let energy = if to.saturating_duration_since(from) < min_window || samples.len() < 2 {
        Err(NoEnergy::too_short(format!(
            "the {:.1} ms window with {} sample(s) is shorter than {} sampling intervals of {} ms or has fewer than \
             2 samples",
            window_s * 1e3,
            samples.len(),
            MIN_WINDOW_INTERVALS,
            interval.as_secs_f64() * 1e3
        )))
    } else {
        let counter: Vec<(Instant, u64)> = samples.iter().filter_map(|s| s.energy_mj.map(|e| (s.at, e))).collect();
        if counter.len() >= 2 {
            counter_energy(&counter, window_s)
        } else {
            power_energy(&power, window_s)
        }
    };
    let (energy_j, energy_source, energy_rel_uncertainty, energy_note, window_too_short) = match energy {
        Ok(e) => (Some(e.joules), Some(e.source), e.rel_uncertainty, e.note, false),
        Err(n) => (None, None, None, Some(n.why), n.too_short),
    };
    let counter = |f: fn(&GpuSample) -> Option<u64>| -> Option<u64> {
        if samples.iter().filter(|s| f(s).is_some()).count() < 2 {
            return None;
        }
        let first = samples.iter().find_map(|s| f(s))?;
        let last = samples.iter().rev().find_map(|s| f(s))?;
        last.checked_sub(first)
    };
    let nvlink_tx_bytes = counter(|s| s.nvlink_tx_kib).map(|kib| kib * 1024);
    let nvlink_rx_bytes = counter(|s| s.nvlink_rx_kib).map(|kib| kib * 1024);
    let rate = |b: Option<u64>| b.filter(|_| duration_s > 0.0).map(|b| b as f64 / duration_s / 1e9);
    let sm: Vec<u32> = samples.iter().filter_map(|s| s.sm_clock_mhz).collect();
    GpuWindow {
        cuda_ordinal: info.cuda_ordinal,
        nvml_index: info.nvml_index,
        name: info.name.clone(),
        samples: samples.len(),
        window_s,
        duration_s,
        power_mean_w,
        power_max_w: power.iter().map(|p| p.1).reduce(f64::max),
        power_limit_w: info.power_limit_w,
        energy_j,
        energy_source,
        energy_rel_uncertainty,
        energy_note,
        window_too_short,
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

/// The energy figures of one `llama32 bench` line, all GPUs together: a prefill-only run and a full run (prefill and
/// decode), each in its own window. A figure is `None` where a window's energy is (see [`GpuWindow::energy_j`]) or
/// where the two windows' energies contradict each other; `note` says why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunEnergy {
    /// Energy of the full run (J).
    pub energy_j: Option<f64>,
    /// `energy_j` per generated token (J).
    pub j_per_token: Option<f64>,
    /// Energy of the prefill-only run (J).
    pub prefill_energy_j: Option<f64>,
    /// The full run's energy less the prefill-only run's, per token generated after the first (J); `None` when the
    /// prefill-only run measured at least as much as the full run.
    pub decode_j_per_token: Option<f64>,
    /// Bound on the relative error of `decode_j_per_token` from the timing of the energy counters' updates; `None`
    /// where unknown (power integrals).
    pub decode_rel_uncertainty: Option<f64>,
    /// Whether a window was too short for an energy figure (a longer run would get one).
    pub window_too_short: bool,
    /// Why figures are `None`, in words; `None` when every figure is present.
    pub note: Option<String>,
}

/// The energy of `windows` (one per GPU) summed, with the absolute error bound where every GPU has one; the reasons
/// of the GPUs without energy go to `notes`, labelled `label`.
fn total_energy(label: &str, windows: &[GpuWindow], notes: &mut Vec<String>) -> (Option<f64>, Option<f64>) {
    if windows.is_empty() {
        notes.push(format!("{label}: no GPU windows"));
        return (None, None);
    }
    let (mut total, mut bound) = (Some(0.0), Some(0.0));
    for w in windows {
        match w.energy_j {
            Some(e) => {
                total = total.map(|t| t + e);
                bound = bound.zip(w.energy_rel_uncertainty).map(|(b, r)| b + r * e);
            }
            None => {
                let why = w.energy_note.as_deref().unwrap_or("no energy figure");
                notes.push(format!("{label} window, cuda:{}: {why}", w.cuda_ordinal));
                total = None;
            }
        }
    }
    (total, bound.filter(|_| total.is_some()))
}

/// The energy figures of a bench line from its prefill-only windows `prefill` and full-run windows `full` (one per
/// GPU each), `generated_tokens` tokens generated in the full run and `decode_tokens` of them after the first.
pub fn run_energy(
    prefill: &[GpuWindow],
    full: &[GpuWindow],
    generated_tokens: usize,
    decode_tokens: usize,
) -> RunEnergy {
    let mut notes = Vec::new();
    let (e_prefill, b_prefill) = total_energy("prefill-only run", prefill, &mut notes);
    let (e_full, b_full) = total_energy("full run", full, &mut notes);
    let (mut decode_j_per_token, mut decode_rel_uncertainty) = (None, None);
    if let (Some(f), Some(p)) = (e_full, e_prefill) {
        if f <= p {
            notes.push(format!(
                "the prefill-only run measured {p:.3} J, not less than the full run's {f:.3} J: the decode energy is \
                 below what the measurement resolves"
            ));
        } else if decode_tokens == 0 {
            notes.push("no tokens generated after the first".into());
        } else {
            decode_j_per_token = Some((f - p) / decode_tokens as f64);
            decode_rel_uncertainty = b_full.zip(b_prefill).map(|(bf, bp)| (bf + bp) / (f - p));
        }
    }
    RunEnergy {
        energy_j: e_full,
        j_per_token: e_full.map(|e| e / generated_tokens.max(1) as f64),
        prefill_energy_j: e_prefill,
        decode_j_per_token,
        decode_rel_uncertainty,
        window_too_short: prefill.iter().chain(full).any(|w| w.window_too_short),
        note: (!notes.is_empty()).then(|| notes.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::slice::from_ref;

    fn info() -> GpuInfo {
        GpuInfo {
            cuda_ordinal: 1,
            nvml_index: 3,
            name: "test".into(),
            memory_total_bytes: Some(80 << 30),
            power_limit_w: Some(700.0),
        }
    }

    fn at(t0: Instant, ms: f64) -> Instant {
        t0 + Duration::from_secs_f64(ms / 1e3)
    }

    fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
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

    /// A synthetic board: power held at `phases` (each `(end_ms, watts)`, from 0 ms), and an energy counter that the
    /// board brings up to date every `counter_period_ms`, first at `counter_phase_ms`, and holds in between.
    struct Board {
        phases: Vec<(f64, f64)>,
        counter_period_ms: f64,
        counter_phase_ms: f64,
    }

    impl Board {
        /// The energy used from 0 to `ms` (J).
        fn energy_to(&self, ms: f64) -> f64 {
            let mut start = 0.0;
            let mut e = 0.0;
            for &(end, w) in &self.phases {
                e += w * (end.min(ms) - start).max(0.0) / 1e3;
                start = end;
            }
            e
        }

        /// The true energy from `a` to `b` ms (J).
        fn energy(&self, a: f64, b: f64) -> f64 {
            self.energy_to(b) - self.energy_to(a)
        }

        fn power_at(&self, ms: f64) -> f64 {
            self.phases.iter().find(|p| ms < p.0).or(self.phases.last()).map_or(0.0, |p| p.1)
        }

        /// The counter as read at `ms` (mJ since an arbitrary driver load).
        fn counter_at(&self, ms: f64) -> u64 {
            let k = ((ms - self.counter_phase_ms) / self.counter_period_ms).floor();
            let updated = if k < 0.0 { 0.0 } else { self.counter_phase_ms + k * self.counter_period_ms };
            7_000_000_000 + (self.energy_to(updated) * 1e3).round() as u64
        }

        /// Readings every `interval_ms` from 0 to `end_ms` and at each of `marks_ms`, in time order.
        fn samples(&self, t0: Instant, interval_ms: f64, marks_ms: &[f64], end_ms: f64) -> Vec<GpuSample> {
            let mut times: Vec<f64> = (0..).map(|k| k as f64 * interval_ms).take_while(|&t| t <= end_ms).collect();
            times.extend_from_slice(marks_ms);
            times.sort_by(f64::total_cmp);
            times
                .into_iter()
                .map(|t| GpuSample {
                    at: at(t0, t),
                    power_w: Some(self.power_at(t)),
                    energy_mj: Some(self.counter_at(t)),
                    ..sample(t0, 0, 0.0)
                })
                .collect()
        }
    }

    /// The counter difference between the first and the last reading in `[a, b]` ms (J): what a window's energy
    /// was before windows were checked.
    fn naive_counter_delta(s: &[GpuSample], t0: Instant, a: f64, b: f64) -> f64 {
        let inside: Vec<u64> =
            s.iter().filter(|x| x.at >= at(t0, a) && x.at <= at(t0, b)).filter_map(|x| x.energy_mj).collect();
        (inside[inside.len() - 1] - inside[0]) as f64 / 1e3
    }

    #[test]
    fn windows_shorter_than_two_intervals_have_no_energy() {
        // The H200 bench: quantization at 650 W, then a 2.4 ms prefill-only run and a 60 ms full run, a counter
        // updated every 100 ms, samples every 50 ms.
        let (p0, p1, f1) = (3000.0, 3002.4, 3062.4);
        let board = Board {
            phases: vec![(p0, 650.0), (p1, 400.0), (f1, 350.0), (5000.0, 80.0)],
            counter_period_ms: 100.0,
            counter_phase_ms: 37.0,
        };
        let t0 = Instant::now();
        let s = board.samples(t0, 50.0, &[p0, p1, f1], 4000.0);
        // The scenario is the bug's: the counter readings in the full window claim more than its energy.
        assert!(naive_counter_delta(&s, t0, p1, f1) > 2.0 * board.energy(p1, f1));
        let prefill = summarize(&info(), &s, at(t0, p0), at(t0, p1), ms(50));
        let full = summarize(&info(), &s, at(t0, p1), at(t0, f1), ms(50));
        for w in [&prefill, &full] {
            assert_eq!((w.energy_j, w.energy_source, w.energy_rel_uncertainty), (None, None, None), "{w:?}");
            assert!(w.window_too_short, "{w:?}");
            assert!(w.energy_note.as_deref().is_some_and(|n| n.contains("sampling intervals")), "{w:?}");
            assert!(w.samples >= 2, "the marks are inside: {w:?}");
        }
        assert!((full.window_s - 0.060).abs() < 1e-6, "{}", full.window_s);
        let e = run_energy(&[prefill], &[full], 64, 63);
        assert_eq!((e.energy_j, e.j_per_token, e.prefill_energy_j, e.decode_j_per_token), (None, None, None, None));
        assert!(e.window_too_short);
        let note = e.note.unwrap_or_default();
        assert!(note.contains("prefill-only run window, cuda:1") && note.contains("full run window, cuda:1"), "{note}");
    }

    #[test]
    fn a_coarse_counter_gives_no_energy_for_a_short_window_even_with_fast_sampling() {
        let (p1, f1) = (3002.4, 3062.4);
        let board = Board {
            phases: vec![(p1, 650.0), (f1, 350.0), (5000.0, 80.0)],
            counter_period_ms: 100.0,
            counter_phase_ms: 37.0,
        };
        let t0 = Instant::now();
        let s = board.samples(t0, 1.0, &[p1, f1], 4000.0);
        let w = summarize(&info(), &s, at(t0, p1), at(t0, f1), ms(1));
        assert!(w.samples > 50, "{w:?}");
        assert_eq!(w.energy_j, None, "{w:?}");
        assert!(w.window_too_short);
        assert!(w.energy_note.as_deref().is_some_and(|n| n.contains("energy counter changed 1 time")), "{w:?}");
        // The same board over a long window: a figure, within its bound.
        let (a, b) = (1000.0, 1900.0);
        let w = summarize(&info(), &s, at(t0, a), at(t0, b), ms(1));
        let (e, rel) = (w.energy_j.unwrap(), w.energy_rel_uncertainty.unwrap());
        assert!(rel < 0.01, "{w:?}");
        assert!((e - board.energy(a, b)).abs() <= rel * board.energy(a, b), "{e} vs {}", board.energy(a, b));
    }

    #[test]
    fn a_long_window_counts_only_its_own_samples() {
        // Energy counter: 2 kW outside the window, 200 W inside; the reading at the window's start carries an update
        // made before it.
        let (a, b) = (1000.3, 2000.3);
        let board = Board {
            phases: vec![(a, 2000.0), (b, 200.0), (4000.0, 2000.0)],
            counter_period_ms: 20.0,
            counter_phase_ms: 7.0,
        };
        let t0 = Instant::now();
        let s = board.samples(t0, 10.0, &[a, b], 3000.0);
        let truth = board.energy(a, b);
        assert!((truth - 200.0).abs() < 1e-9);
        assert!(naive_counter_delta(&s, t0, a, b) > 1.05 * truth, "the scenario must catch outside energy");
        let w = summarize(&info(), &s, at(t0, a), at(t0, b), ms(10));
        assert_eq!(w.energy_source, Some("counter"));
        let (e, rel) = (w.energy_j.unwrap(), w.energy_rel_uncertainty.unwrap());
        assert!((e - truth).abs() < 0.01 * truth, "{e} vs {truth}");
        assert!(rel > 0.0 && rel < 0.05, "{rel}");
        assert!(!w.window_too_short && w.energy_note.is_none(), "{w:?}");
        // The power samples at 2 kW just outside the window are not averaged in either.
        assert!((w.power_mean_w.unwrap() - 200.0).abs() < 0.01 * 200.0, "{w:?}");

        // Power readings only: 10 kW outside, 100 W inside for 1 s.
        let t0 = Instant::now();
        let mut s: Vec<GpuSample> = (0..=20).map(|i| sample(t0, 1000 + 50 * i, 100.0)).collect();
        s.insert(0, sample(t0, 950, 10_000.0));
        s.push(sample(t0, 2050, 10_000.0));
        let w = summarize(&info(), &s, at(t0, 1000.0), at(t0, 2000.0), ms(50));
        assert_eq!(w.energy_source, Some("power_integral"));
        assert!((w.energy_j.unwrap() - 100.0).abs() < 1e-6, "{w:?}");
        assert_eq!((w.samples, w.energy_rel_uncertainty), (21, None));
        assert!(w.energy_note.is_some(), "the power integral carries a caveat");
    }

    #[test]
    fn prefill_energy_stays_below_the_full_runs_and_decode_is_their_difference() {
        // Load at 650 W, a 400 ms prefill-only run at 420 W, a full run of the same prefill then 1.2 s of decode at
        // 300 W, then idle.
        let (p0, p1, d, f1) = (2000.0, 2400.0, 2800.0, 4000.0);
        let board = |period: f64, phase: f64| Board {
            phases: vec![(p0, 650.0), (p1, 420.0), (d, 420.0), (f1, 300.0), (6000.0, 80.0)],
            counter_period_ms: period,
            counter_phase_ms: phase,
        };
        let decode_tokens = 63;
        let true_decode = 300.0 * 1.2 / decode_tokens as f64;
        let mut cases = 0;
        for period in [1.0, 10.0, 20.0, 50.0, 100.0] {
            for interval in [5u64, 10, 25, 50] {
                for phase in [0.0, 3.3, 17.0, 41.0] {
                    let b = board(period, phase);
                    let t0 = Instant::now();
                    let s = b.samples(t0, interval as f64, &[p0, p1, f1], 5000.0);
                    let prefill = summarize(&info(), &s, at(t0, p0), at(t0, p1), ms(interval));
                    let full = summarize(&info(), &s, at(t0, p1), at(t0, f1), ms(interval));
                    let ctx = format!("counter every {period} ms at {phase}, samples every {interval} ms");
                    for (w, truth) in [(&prefill, b.energy(p0, p1)), (&full, b.energy(p1, f1))] {
                        let e = w.energy_j.unwrap_or_else(|| panic!("{ctx}: {w:?}"));
                        let rel = w.energy_rel_uncertainty.unwrap();
                        // The bound covers the counter's timing; 2% more covers power changing inside the window.
                        assert!((e - truth).abs() <= (rel + 0.02) * truth, "{ctx}: {e} vs {truth} (±{rel})");
                    }
                    let e = run_energy(from_ref(&prefill), from_ref(&full), 64, decode_tokens);
                    let (pe, fe) = (e.prefill_energy_j.unwrap(), e.energy_j.unwrap());
                    assert!(pe < fe, "{ctx}: prefill {pe} J, full {fe} J");
                    let dj = e.decode_j_per_token.unwrap_or_else(|| panic!("{ctx}: {e:?}"));
                    let rel = e.decode_rel_uncertainty.unwrap();
                    assert!((dj - true_decode).abs() <= (rel + 0.1) * true_decode, "{ctx}: {dj} vs {true_decode}");
                    assert!((e.j_per_token.unwrap() - fe / 64.0).abs() < 1e-12);
                    assert!(!e.window_too_short && e.note.is_none(), "{ctx}: {e:?}");
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 80);
    }

    #[test]
    fn contradicting_or_missing_windows_give_no_decode_energy() {
        let t0 = Instant::now();
        let flat = |watts: f64, start: u64| -> Vec<GpuSample> {
            (0..=20).map(|i| sample(t0, start + 50 * i, watts)).collect()
        };
        let high = summarize(&info(), &flat(500.0, 0), t0, at(t0, 1000.0), ms(50));
        let low = summarize(&info(), &flat(300.0, 2000), at(t0, 2000.0), at(t0, 3000.0), ms(50));
        let e = run_energy(from_ref(&high), from_ref(&low), 10, 9);
        assert!((e.prefill_energy_j.unwrap() - 500.0).abs() < 1e-6);
        assert!((e.energy_j.unwrap() - 300.0).abs() < 1e-6);
        assert_eq!(e.decode_j_per_token, None);
        assert!(!e.window_too_short);
        assert!(e.note.as_deref().is_some_and(|n| n.contains("not less than the full run")), "{e:?}");
        // The other way round: a decode figure, unbounded for power integrals.
        let e = run_energy(from_ref(&low), from_ref(&high), 10, 9);
        assert!((e.decode_j_per_token.unwrap() - 200.0 / 9.0).abs() < 1e-6);
        assert_eq!((e.decode_rel_uncertainty, e.note), (None, None));
        // Two GPUs, one without energy: no totals.
        let mut short = summarize(&info(), &flat(300.0, 2000), at(t0, 2000.0), at(t0, 2060.0), ms(50));
        short.cuda_ordinal = 5;
        let e = run_energy(from_ref(&low), &[high, short], 10, 9);
        assert_eq!((e.energy_j, e.j_per_token, e.decode_j_per_token), (None, None, None));
        assert!(e.prefill_energy_j.is_some() && e.window_too_short);
        assert!(e.note.as_deref().is_some_and(|n| n.contains("full run window, cuda:5")), "{e:?}");
        // No tokens after the first.
        let e = run_energy(from_ref(&low), &[summarize(&info(), &flat(900.0, 0), t0, at(t0, 1000.0), ms(50))], 1, 0);
        assert_eq!(e.decode_j_per_token, None);
        assert!(e.j_per_token.is_some());
    }

    #[test]
    fn power_is_integrated_over_time_without_an_energy_counter() {
        let t0 = Instant::now();
        // 100 W for 1 s, then a ramp to 300 W over 1 s: 100 + 200 = 300 J over 2 s.
        let s = vec![sample(t0, 0, 100.0), sample(t0, 1000, 100.0), sample(t0, 2000, 300.0)];
        let w = summarize(&info(), &s, t0, at(t0, 2000.0), ms(50));
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
        // Readings spanning less than half the window give no figure.
        let w = summarize(&info(), &s[..2], t0, at(t0, 2500.0), ms(50));
        assert_eq!(w.energy_j, None);
        assert!(w.window_too_short && w.energy_note.as_deref().is_some_and(|n| n.contains("span")), "{w:?}");
    }

    #[test]
    fn counters_give_energy_and_nvlink_deltas() {
        let t0 = Instant::now();
        // 1 kW: the counter gains 100 J every 100 ms.
        let mut s: Vec<GpuSample> = (0..=10).map(|i| sample(t0, 100 * i, 1000.0)).collect();
        for (i, x) in s.iter_mut().enumerate() {
            x.energy_mj = Some(5_000_000 + 100_000 * i as u64);
            x.nvlink_tx_kib = Some(1000 + 1_000_000 * i as u64);
            x.nvlink_rx_kib = Some(7);
        }
        s[5].energy_mj = None; // A failed read in the middle does not matter.
        let w = summarize(&info(), &s, t0, at(t0, 1000.0), ms(100));
        assert_eq!(w.energy_source, Some("counter"));
        assert!((w.energy_j.unwrap() - 1000.0).abs() < 1e-6, "{w:?}");
        // The first and last updates are each timed to ±50 ms, so their 900 ms span to ±100 ms: the mean power to
        // +100/800.
        assert!((w.energy_rel_uncertainty.unwrap() - 100.0 / 800.0).abs() < 1e-9, "{w:?}");
        assert_eq!(w.nvlink_tx_bytes, Some(10_000_000 * 1024));
        assert_eq!(w.nvlink_rx_bytes, Some(0));
        assert!((w.nvlink_tx_gb_per_s.unwrap() - 10_240_000_000.0 / 1e9).abs() < 1e-9);
        // A counter that does not move while power is drawn gives no figure (the power reading may be a 1 s
        // average), and so does one that goes backwards.
        let mut s2: Vec<GpuSample> =
            (0..=10).map(|i| GpuSample { energy_mj: Some(42), ..sample(t0, 100 * i, 100.0) }).collect();
        let w2 = summarize(&info(), &s2, t0, at(t0, 1000.0), ms(100));
        assert_eq!(w2.energy_j, None);
        assert!(w2.window_too_short && w2.energy_note.as_deref().is_some_and(|n| n.contains("changed 0 time")));
        s2[7].energy_mj = Some(41);
        let w3 = summarize(&info(), &s2, t0, at(t0, 1000.0), ms(100));
        assert_eq!(w3.energy_j, None);
        assert!(!w3.window_too_short && w3.energy_note.as_deref().is_some_and(|n| n.contains("backwards")));
    }

    #[test]
    fn empty_and_single_sample_windows_have_no_energy() {
        let t0 = Instant::now();
        let w = summarize(&info(), &[], t0, at(t0, 1000.0), ms(50));
        assert_eq!((w.samples, w.energy_j, w.power_mean_w), (0, None, None));
        assert!(w.window_too_short);
        let w = summarize(&info(), &[sample(t0, 0, 123.0)], t0, at(t0, 1000.0), ms(50));
        assert_eq!(w.power_mean_w, Some(123.0));
        assert!(w.energy_j.is_none() && w.window_too_short);
    }
}
