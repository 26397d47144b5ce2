//! The persistent decode stack's phase timing, summarized on the host: where one timed launch
//! ([`super::StackScratch::phase_times`]) spent its time, per kind of phase.

use crate::{Error, Result};

/// Phases per layer of the stack, in launch order (`L32_DECODE_LAYERS_PHASES` in `kernels/llama32_kernels.h`,
/// which bindgen does not carry over; the GPU test of the timing finds every timestamp written).
pub const PHASES: usize = 5;

/// The phases' names, in launch order.
pub const PHASE_NAMES: [&str; PHASES] = ["norm+qkv+rope", "attention", "o", "norm+gate_up+silu", "down"];

/// One kind of phase of a timed launch, summed over the layers, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhaseTime {
    /// From the first block's start of the phase to the last block's end: the phase's share of the launch.
    pub span_us: f64,
    /// The mean block's own time in the phase (its start to its end).
    pub mean_work_us: f64,
    /// The slowest block's time in the phase.
    pub max_work_us: f64,
    /// From the last block's arrival at the grid barrier after the phase to the first block's departure: the
    /// barrier's release (none after the launch's last phase).
    pub release_us: f64,
}

/// Where one launch of the stack spent its time ([`super::StackScratch::phase_times`]): per kind of phase
/// ([`PHASE_NAMES`]), summed over the layers. The launch's time is the sum of every phase's span and every
/// barrier's release.
#[derive(Clone, Debug, PartialEq)]
pub struct StackPhases {
    /// Decoder layers of the launch.
    pub layers: usize,
    /// Blocks of the grid.
    pub blocks: usize,
    /// From the first block's start to the last block's end, in microseconds.
    pub total_us: f64,
    /// Per kind of phase, in [`PHASE_NAMES`] order.
    pub phases: [PhaseTime; PHASES],
    /// The most any block started a phase before another block ended the phase before it, in ns (0 or less when
    /// every barrier held; a few tens of ns may be the timer's skew between SMs).
    pub worst_overlap_ns: i64,
}

impl StackPhases {
    /// The summary of one launch's timestamps, `raw[((layer * PHASES + phase) * blocks + block) * 2 + {0: start,
    /// 1: end}]` in ns. An error names a missing (zero) timestamp or a phase that ends before it starts.
    pub fn from_raw(raw: &[u64], layers: usize, blocks: usize) -> Result<Self> {
        let fail = |msg: String| Err(Error::Backend(format!("decode_layers timing: {msg}")));
        if layers == 0 || blocks == 0 || raw.len() != layers * PHASES * blocks * 2 {
            return fail(format!("{} timestamps for {layers} layers of {blocks} blocks", raw.len()));
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        let mut phases = [PhaseTime::default(); PHASES];
        // Every launch has PHASES - 1 or more barriers, so this is always set below.
        let mut worst_overlap_ns = i64::MIN;
        let mut prev_end: Option<u64> = None;
        let (mut first, mut last) = (u64::MAX, 0);
        for l in 0..layers {
            for ph in 0..PHASES {
                let at = |b: usize, i: usize| raw[((l * PHASES + ph) * blocks + b) * 2 + i];
                let (mut min_start, mut max_end, mut sum, mut max_work) = (u64::MAX, 0, 0u64, 0);
                for b in 0..blocks {
                    let (start, end) = (at(b, 0), at(b, 1));
                    if start == 0 || end == 0 {
                        return fail(format!("layer {l} {} block {b} was not timed", PHASE_NAMES[ph]));
                    }
                    if end < start {
                        let name = PHASE_NAMES[ph];
                        return fail(format!("layer {l} {name} block {b} ends {} ns before it starts", start - end));
                    }
                    min_start = min_start.min(start);
                    max_end = max_end.max(end);
                    sum += end - start;
                    max_work = max_work.max(end - start);
                }
                if let Some(e) = prev_end {
                    worst_overlap_ns = worst_overlap_ns.max(e as i64 - min_start as i64);
                    // The release belongs to the phase before this one.
                    let before = if ph == 0 { PHASES - 1 } else { ph - 1 };
                    phases[before].release_us += (min_start as f64 - e as f64) / 1000.0;
                }
                let acc = &mut phases[ph];
                acc.span_us += us(max_end - min_start);
                acc.mean_work_us += us(sum) / blocks as f64;
                acc.max_work_us += us(max_work);
                prev_end = Some(max_end);
                first = first.min(min_start);
                last = last.max(max_end);
            }
        }
        Ok(StackPhases { layers, blocks, total_us: us(last - first), phases, worst_overlap_ns })
    }

    /// The summary as JSON (`llama32 bench --profile` with `--persistent-decode`).
    pub fn to_json(&self) -> serde_json::Value {
        let phases: Vec<_> = PHASE_NAMES
            .iter()
            .zip(&self.phases)
            .map(|(name, p)| {
                serde_json::json!({
                    "phase": name,
                    "span_us": p.span_us,
                    "mean_work_us": p.mean_work_us,
                    "max_work_us": p.max_work_us,
                    "release_us": p.release_us,
                })
            })
            .collect();
        serde_json::json!({
            "layers": self.layers,
            "blocks": self.blocks,
            "total_us": self.total_us,
            "worst_overlap_ns": self.worst_overlap_ns,
            "phases": phases,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Timestamps of `layers` layers of `blocks` blocks: block b starts phase i (in launch order) at 1000 i + b
    /// (departures spread over b ns) and ends it at 1000 i + 600 + 7 b, so phase i spans 600 + 8 (b_max) ns and
    /// the barrier after it releases 400 - 7 b_max ns after the last arrival.
    fn stamps(layers: usize, blocks: usize) -> Vec<u64> {
        let mut raw = vec![0; layers * PHASES * blocks * 2];
        for i in 0..layers * PHASES {
            for b in 0..blocks {
                raw[(i * blocks + b) * 2] = 1_000_000 + 1000 * i as u64 + b as u64;
                raw[(i * blocks + b) * 2 + 1] = 1_000_000 + 1000 * i as u64 + 600 + 7 * b as u64;
            }
        }
        raw
    }

    #[test]
    fn phase_times_add_up_to_the_launch() {
        let (layers, blocks) = (3, 4);
        let p = StackPhases::from_raw(&stamps(layers, blocks), layers, blocks).unwrap();
        // The last block (b = 3) ends last (621) and the first (b = 0) starts first: span 621 ns a phase.
        for (i, ph) in p.phases.iter().enumerate() {
            assert!((ph.span_us - layers as f64 * 0.621).abs() < 1e-9, "{i}: {ph:?}");
            // Work 600 + 6 b ns: mean 609, max 618.
            assert!((ph.mean_work_us - layers as f64 * 0.609).abs() < 1e-9, "{i}: {ph:?}");
            assert!((ph.max_work_us - layers as f64 * 0.618).abs() < 1e-9, "{i}: {ph:?}");
        }
        // Releases: 1000 - 621 = 379 ns after each phase but the launch's last.
        for (i, ph) in p.phases.iter().enumerate() {
            let n = if i == PHASES - 1 { layers - 1 } else { layers };
            assert!((ph.release_us - n as f64 * 0.379).abs() < 1e-9, "{i}: {ph:?}");
        }
        let sum: f64 = p.phases.iter().map(|ph| ph.span_us + ph.release_us).sum();
        assert!((sum - p.total_us).abs() < 1e-9, "{sum} against {}", p.total_us);
        assert_eq!(p.worst_overlap_ns, -379);
        let json = p.to_json();
        assert_eq!(json["phases"].as_array().map(Vec::len), Some(PHASES));
        assert_eq!(json["phases"][1]["phase"], "attention");
    }

    #[test]
    fn phase_times_refuse_missing_or_backward_stamps() {
        let (layers, blocks) = (2, 3);
        let mut raw = stamps(layers, blocks);
        raw[((PHASES + 2) * blocks + 1) * 2] = 0;
        let e = StackPhases::from_raw(&raw, layers, blocks).unwrap_err().to_string();
        assert!(e.contains("layer 1 o block 1 was not timed"), "{e}");
        let mut raw = stamps(layers, blocks);
        raw[1] = raw[0] - 5;
        let e = StackPhases::from_raw(&raw, layers, blocks).unwrap_err().to_string();
        assert!(e.contains("layer 0 norm+qkv+rope block 0 ends 5 ns before it starts"), "{e}");
        assert!(StackPhases::from_raw(&raw[1..], layers, blocks).is_err());
        assert!(StackPhases::from_raw(&[], 0, blocks).is_err());
    }
}
