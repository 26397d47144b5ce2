//! Kernel twin tests: every CUDA kernel family (`ops::cuda::<family>`) against its f32 CPU twin
//! (`ops::cpu::<family>`), on fresh random inputs, with the outputs poisoned (NaN) before each launch.
//!
//! The CPU twin runs on the bf16-rounded inputs, so the only differences left are the kernel's own bf16 roundings;
//! each tolerance counts them. Without a CUDA build or a device, each test prints "skipped: no CUDA device" and
//! returns (`scripts/gpu-suite.sh run` reports that as SKIP, which fails the suite on a device machine).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use llama32::ops::{cpu, cuda};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::{cuda_stream as stream, normal, to_f32};

/// One bf16 rounding (round to nearest, 8 significant bits) moves a value by at most 2^-8 of itself.
const BF16_ROUNDING: f32 = 1.0 / 256.0;
/// Llama 3.2's `rms_norm_eps`.
const EPS: f32 = 1e-5;
/// Seeds: each draws its own inputs for every shape.
const SEEDS: [u64; 3] = [1, 2, 3];
/// (rows, hidden): the Llama hidden sizes, odd row counts, a one-warp row, rows whose hidden is not a multiple
/// of 8 (the unvectorized path), and rows too long to keep in registers (the two-pass path).
const SHAPES: [(usize, usize); 12] = [
    (1, 2048),
    (33, 2048),
    (3, 3072),
    (7, 4096),
    (129, 4096),
    (5, 8192),
    (3, 16384),
    (9, 64),
    (2, 1000),
    (3, 1001),
    (2, 40000),
    (2, 40001),
];

/// `n` bf16 values: standard normal, times a per-row scale drawn log-uniformly from [1e-2, 1e2], so rows differ
/// in magnitude by orders (the normalization must undo that).
fn random_rows(rng: &mut ChaCha8Rng, rows: usize, hidden: usize) -> Vec<bf16> {
    let mut out = Vec::with_capacity(rows * hidden);
    for _ in 0..rows {
        let scale = 10f32.powf(rng.random_range(-2.0f32..2.0));
        out.extend((0..hidden).map(|_| bf16::from_f32(scale * normal(rng))));
    }
    out
}

/// Llama-like norm weights: around 1, some negative, some near zero.
fn random_weight(rng: &mut ChaCha8Rng, hidden: usize) -> Vec<bf16> {
    (0..hidden).map(|_| bf16::from_f32(1.0 + 0.5 * normal(rng))).collect()
}

fn upload(stream: &Arc<CudaStream>, v: &[bf16]) -> CudaSlice<bf16> {
    stream.clone_htod(v).expect("host to device copy")
}

fn download(stream: &Arc<CudaStream>, v: &CudaSlice<bf16>) -> Vec<bf16> {
    stream.clone_dtoh(v).expect("device to host copy")
}

/// Asserts `|got - want| <= roundings * 2^-8 * |want| + 1e-6` element by element (NaN fails: an unwritten output).
/// The 1% on top covers the fp32 reduction order and rsqrtf, about 2^-20 of the value.
fn assert_close(what: &str, got: &[bf16], want: &[f32], roundings: f32, hidden: usize) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let rel = roundings * BF16_ROUNDING * 1.01;
    let mut worst = (0.0f32, 0usize);
    for (i, (g, w)) in got.iter().map(|g| g.to_f32()).zip(want).enumerate() {
        let err = (g - w).abs();
        let tol = rel * w.abs() + 1e-6;
        assert!(
            err <= tol,
            "{what}: row {} col {}: got {g}, want {w} (error {err:e} > tolerance {tol:e})",
            i / hidden,
            i % hidden
        );
        if w.abs() > 1e-3 && err / w.abs() > worst.0 {
            worst = (err / w.abs(), i);
        }
    }
    eprintln!("{what}: worst relative error {:.3e} ({:.2} bf16 roundings)", worst.0, worst.0 / BF16_ROUNDING);
}

#[test]
fn rms_norm_matches_cpu() {
    let Some(stream) = stream() else { return };
    for seed in SEEDS {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for (rows, hidden) in SHAPES {
            let what = format!("rms_norm seed {seed} rows {rows} hidden {hidden}");
            let x = random_rows(&mut rng, rows, hidden);
            let weight = random_weight(&mut rng, hidden);

            let mut want = vec![f32::NAN; rows * hidden];
            cpu::norm::rms_norm(&to_f32(&x), &to_f32(&weight), EPS, hidden, &mut want);

            let (x_d, w_d) = (upload(&stream, &x), upload(&stream, &weight));
            let mut out_d = upload(&stream, &vec![bf16::NAN; rows * hidden]);
            cuda::norm::rms_norm(&stream, &x_d, &w_d, EPS, hidden, &mut out_d)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let got = download(&stream, &out_d);
            // Two roundings: the normalized row, then its product with the weight.
            assert_close(&what, &got, &want, 2.0, hidden);
        }
    }
}

#[test]
fn add_rms_norm_matches_cpu() {
    let Some(stream) = stream() else { return };
    for seed in SEEDS {
        let mut rng = ChaCha8Rng::seed_from_u64(100 + seed);
        for (rows, hidden) in SHAPES {
            let what = format!("add_rms_norm seed {seed} rows {rows} hidden {hidden}");
            let residual = random_rows(&mut rng, rows, hidden);
            let x = random_rows(&mut rng, rows, hidden);
            let weight = random_weight(&mut rng, hidden);

            let mut want_residual = to_f32(&residual);
            let mut want = vec![f32::NAN; rows * hidden];
            cpu::norm::add_rms_norm(&mut want_residual, &to_f32(&x), &to_f32(&weight), EPS, hidden, &mut want);

            let mut res_d = upload(&stream, &residual);
            let (x_d, w_d) = (upload(&stream, &x), upload(&stream, &weight));
            let mut out_d = upload(&stream, &vec![bf16::NAN; rows * hidden]);
            cuda::norm::add_rms_norm(&stream, &mut res_d, &x_d, &w_d, EPS, hidden, &mut out_d)
                .unwrap_or_else(|e| panic!("{what}: {e}"));

            // The residual stream stays bf16: the kernel rounds the same f32 sum the twin computes, so the two
            // agree bit for bit once the twin's sum is rounded.
            let got_residual = download(&stream, &res_d);
            for (i, (g, w)) in got_residual.iter().zip(&want_residual).enumerate() {
                let w = bf16::from_f32(*w);
                assert!(
                    g.to_bits() == w.to_bits(),
                    "{what}: residual row {} col {}: got {g}, want bf16({w})",
                    i / hidden,
                    i % hidden
                );
            }
            // Four roundings: the residual (which also shifts the mean square, by at most one more) and the
            // two of the norm itself.
            let got = download(&stream, &out_d);
            assert_close(&what, &got, &want, 4.0, hidden);
        }
    }
}

#[test]
fn norm_wrappers_reject_bad_shapes_before_launch() {
    let Some(stream) = stream() else { return };
    let x = upload(&stream, &vec![bf16::ONE; 3 * 64]);
    let w = upload(&stream, &[bf16::ONE; 64]);
    let mut short_out = upload(&stream, &vec![bf16::NAN; 2 * 64]);
    let err = cuda::norm::rms_norm(&stream, &x, &w, EPS, 64, &mut short_out).unwrap_err().to_string();
    assert!(err.contains("`out`"), "{err}");
    let mut out = upload(&stream, &vec![bf16::NAN; 3 * 64]);
    let err = cuda::norm::rms_norm(&stream, &x, &w, EPS, 32, &mut out).unwrap_err().to_string();
    assert!(err.contains("`weight`"), "{err}");
    // Nothing was launched: the output is still poisoned.
    assert!(download(&stream, &out).iter().all(|v| v.is_nan()));
}

/// The step profiler's head start (`kernels/timing.cu`, which computes nothing and so has no CPU twin): the stream
/// stays busy for the time asked, and a wait over the kernel's limit is refused by name before any launch.
#[test]
fn busy_wait_keeps_the_stream_busy() {
    let Some(s) = stream() else { return };
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    for ms in [1u64, 5] {
        let start = s.record_event(timing).unwrap();
        cuda::timing::busy_wait(&s, std::time::Duration::from_millis(ms)).unwrap();
        let end = s.record_event(timing).unwrap();
        let got = start.elapsed_ms(&end).unwrap();
        assert!(got >= ms as f32 * 0.999 && got < ms as f32 + 20.0, "asked {ms} ms, the stream waited {got} ms");
        eprintln!("busy_wait {ms} ms: the stream waited {got:.3} ms");
    }
    let e = cuda::timing::busy_wait(&s, std::time::Duration::from_secs(2)).unwrap_err().to_string();
    assert!(e.contains("busy_wait") && e.contains("longer than"), "{e}");
}

/// The grid probe (`kernels/grid_probe.cu`, no CPU twin: it computes nothing a model uses): its grid barrier and
/// the barrier's earlier form are sound (every block reads its neighbour's tag of the same phase, 2000 phases,
/// twice each in turn, so each leaves the barrier's state ready for the next launch), and its stream modes read every byte (the fold of all blocks equals the
/// host's xor of every word), with and without barriers; a stream too short for its barriers is refused by name.
#[test]
fn grid_probe_barrier_is_sound_and_the_stream_reads_every_byte() {
    use cuda::timing::{GridProbe, GridProbeMode, GRID_PROBE_CHUNK};
    let Some(s) = stream() else { return };
    let blocks = GridProbe::blocks(&s).unwrap();
    if blocks == 0 {
        println!("skipped: a block per SM of the grid probe cannot be resident on this device");
        return;
    }
    // A size 5 bytes short of 21 chunks per block: rounded up to whole chunks, the 21 chunks per block that 20
    // barriers need.
    let mut probe = GridProbe::new(&s, blocks * GRID_PROBE_CHUNK * 21 - 5).unwrap();
    assert_eq!(probe.bytes(), blocks * GRID_PROBE_CHUNK * 21, "rounded up to whole chunks");
    // Both barrier forms, in turn on the same counter: each leaves it fit for the other.
    for round in 0..2 {
        for mode in [GridProbeMode::Barrier, GridProbeMode::BarrierAtomic] {
            probe.launch(&s, mode, 2000).unwrap();
            assert_eq!(
                probe.wrong_tags(&s).unwrap(),
                0,
                "round {round}, {mode:?}: a block read a tag of another phase"
            );
        }
    }
    let want = probe.expected_fold();
    for (mode, phases) in
        [(GridProbeMode::Stream, 0), (GridProbeMode::StreamBarrier, 20), (GridProbeMode::StreamBarrier, 3)]
    {
        probe.launch(&s, mode, phases).unwrap();
        let got = probe.outputs(&s).unwrap().iter().fold(0u32, |acc, &w| acc ^ w);
        assert_eq!(got, want, "{mode:?} with {phases} barriers: the fold of the bytes read");
    }
    let e = probe.launch(&s, GridProbeMode::StreamBarrier, 21).unwrap_err().to_string();
    assert!(e.contains("grid_probe") && e.contains("fewer than"), "{e}");
    eprintln!("grid probe: {blocks} blocks, barrier sound over 2 x 2000 phases, stream folds match");
}

/// What a persistent per-step decode kernel needs to know first (docs/architecture.md), on the bytes of a 1B
/// step (2.47 GB): the latency of one grid barrier of one block per SM, the stream's rate through a shared-memory
/// ring, the same stream cut by 80 barriers (a 1B step's 5 per layer) and by 400, and whether the cooperative
/// launch can be captured in a CUDA graph (the decode steps run as graphs). Lines `grid probe ...`.
#[test]
#[ignore]
fn grid_probe_throughput() {
    use cuda::timing::{GridProbe, GridProbeMode};
    use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
    let Some(probe_stream) = stream() else { return };
    let ctx = probe_stream.context().clone();
    // One stream orders everything here; cudarc's per-buffer events would break the graph capture below.
    // SAFETY: called before this test allocates; every buffer below is used on the one stream created next.
    unsafe { ctx.disable_event_tracking() };
    let s = ctx.new_stream().expect("stream");
    if GridProbe::blocks(&s).unwrap() == 0 {
        println!("skipped: a block per SM of the grid probe cannot be resident on this device");
        return;
    }
    let bytes = 2_471_000_000usize;
    let mut probe = GridProbe::new(&s, bytes).unwrap();
    let bytes = probe.bytes() as f64;
    let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
    // The median of 7 timed launches after one untimed, in ms.
    let time = |probe: &mut GridProbe, mode, phases| -> f64 {
        probe.launch(&s, mode, phases).unwrap();
        let mut ms: Vec<f32> = (0..7)
            .map(|_| {
                let start = s.record_event(timing).unwrap();
                probe.launch(&s, mode, phases).unwrap();
                let end = s.record_event(timing).unwrap();
                start.elapsed_ms(&end).unwrap()
            })
            .collect();
        ms.sort_by(f32::total_cmp);
        f64::from(ms[3])
    };
    let barrier = time(&mut probe, GridProbeMode::Barrier, 1000);
    assert_eq!(probe.wrong_tags(&s).unwrap(), 0);
    eprintln!("grid probe barrier: {:.3} us per grid barrier ({} blocks)", barrier * 1e3 / 2000.0, probe.num_blocks());
    let atomic = time(&mut probe, GridProbeMode::BarrierAtomic, 1000);
    assert_eq!(probe.wrong_tags(&s).unwrap(), 0);
    eprintln!(
        "grid probe barrier (atomic arrival, the form until the twentieth session): {:.3} us per grid barrier",
        atomic * 1e3 / 2000.0
    );
    let stream_ms = time(&mut probe, GridProbeMode::Stream, 0);
    eprintln!("grid probe stream: {:.3} ms, {:.0} GB/s", stream_ms, bytes / stream_ms / 1e6);
    for phases in [80, 400] {
        let t = time(&mut probe, GridProbeMode::StreamBarrier, phases);
        eprintln!(
            "grid probe stream + {phases} barriers: {t:.3} ms, {:.0} GB/s, {:+.3} us per barrier over the stream alone",
            bytes / t / 1e6,
            (t - stream_ms) * 1e3 / phases as f64
        );
    }
    // The decode steps run as CUDA graphs: can the cooperative launch be captured?
    s.synchronize().unwrap();
    let captured = s
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            let launched = probe.launch(&s, GridProbeMode::StreamBarrier, 80).map_err(|e| e.to_string());
            let graph = s.end_capture(CUgraphInstantiate_flags(0)).map_err(|e| e.to_string());
            launched.and(graph)
        });
    match captured {
        Ok(Some(graph)) => {
            graph.launch().unwrap();
            let start = s.record_event(timing).unwrap();
            graph.launch().unwrap();
            let end = s.record_event(timing).unwrap();
            let ms = start.elapsed_ms(&end).unwrap();
            let want = probe.expected_fold();
            let got = probe.outputs(&s).unwrap().iter().fold(0u32, |acc, &w| acc ^ w);
            assert_eq!(got, want, "the graph's fold");
            eprintln!("grid probe in a CUDA graph: captured, {ms:.3} ms for stream + 80 barriers, fold correct");
        }
        Ok(None) => eprintln!("grid probe in a CUDA graph: the capture gave no graph"),
        Err(e) => eprintln!("grid probe in a CUDA graph: not captured ({e})"),
    }
}
