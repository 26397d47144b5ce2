//! Twin tests of the CUDA `sampling` family against the CPU reference `llama32::sampling`:
//! - `argmax` against `sampling::argmax` on the bf16 rows widened to f32 (ties, NaN, ±inf, ±0, all-NaN and
//!   all--inf rows, Llama 3's vocabulary and odd sizes, 1 to 300 rows): ids must be equal;
//! - `sample` against `Sampler::sample` with the same uniform (a clone of the row's sampler draws it): random logits,
//!   parameters (greedy rows mixed with sampled ones, each filter alone and combined, penalties, top-k beyond the
//!   kernel's compaction buffer and flat nuclei that take its whole-row path): ids must be equal. The GPU's weights
//!   are f32 (the CPU's f64), so rows where `u`, or `top_p`, lies within `MARGIN` of a cumulative-probability
//!   boundary are redrawn first (a new `u`, a slightly smaller `top_p`); every other decision is exact.
//!
//! Without a CUDA build or a device, each test prints "skipped: no CUDA device" and returns.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use half::bf16;
use llama32::ops::cuda;
use llama32::ops::cuda::sampling::{Penalties, PenaltyLists, SampleRow};
use llama32::sampling::{self, Sampler, SamplingParams};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Distance in probability that `u` and `top_p` keep from every cumulative boundary. The GPU's f32 weights carry a
/// relative error of about 2.4e-7 + 1.2e-7 * |(l - max) / T| (exp2f, the scaled argument), so its cumulative sums
/// stay well within this of the CPU's f64 ones.
const MARGIN: f64 = 2e-6;

/// A stream on device 0, or None (after saying why) where CUDA cannot run.
pub(crate) fn stream() -> Option<Arc<CudaStream>> {
    if let Err(e) = cuda::probe() {
        eprintln!("skipped: no CUDA device ({e})");
        return None;
    }
    let ctx = CudaContext::new(0).expect("CUDA context on device 0");
    Some(ctx.new_stream().expect("a CUDA stream"))
}

pub(crate) fn upload<T: DeviceRepr>(stream: &Arc<CudaStream>, v: &[T]) -> CudaSlice<T> {
    stream.clone_htod(v).expect("host to device copy")
}

pub(crate) fn download<T: DeviceRepr + ValidAsZeroBits + Default + Clone>(
    stream: &Arc<CudaStream>,
    v: &CudaSlice<T>,
) -> Vec<T> {
    stream.clone_dtoh(v).expect("device to host copy")
}

/// Standard normal by Box-Muller.
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

pub(crate) fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// One logits row of kind `kind` (0..=9): normal rows at several scales, rows with ties at the maximum, NaN, ±inf,
/// ±0, constant rows, all-NaN and all--inf rows.
pub(crate) fn logits_row(rng: &mut ChaCha8Rng, vocab: usize, kind: usize) -> Vec<bf16> {
    let scale = [0.5f32, 1.0, 2.0, 4.0][rng.random_range(0..4)];
    let mut row: Vec<bf16> = (0..vocab).map(|_| bf16::from_f32(scale * normal(rng))).collect();
    let pick = |rng: &mut ChaCha8Rng| rng.random_range(0..vocab);
    match kind {
        1 => {
            // The maximum repeated at random places, earlier and later.
            let max = row.iter().map(|x| x.to_f32()).fold(f32::NEG_INFINITY, f32::max);
            for _ in 0..rng.random_range(1..5) {
                let i = pick(rng);
                row[i] = bf16::from_f32(max);
            }
        }
        2 => {
            for _ in 0..vocab / 10 + 1 {
                let i = pick(rng);
                row[i] = bf16::NAN;
            }
            row[0] = bf16::NAN;
        }
        3 => row.iter_mut().for_each(|x| *x = bf16::NEG_INFINITY),
        4 => row.iter_mut().for_each(|x| *x = bf16::NAN),
        5 => {
            row.iter_mut().enumerate().for_each(|(i, x)| *x = if i % 3 == 0 { bf16::NAN } else { bf16::NEG_INFINITY });
            let i = pick(rng);
            row[i] = bf16::from_f32(-3.0);
        }
        6 => {
            let (i, j) = (pick(rng), pick(rng));
            row[i] = bf16::INFINITY;
            row[j] = bf16::INFINITY;
        }
        7 => row.iter_mut().for_each(|x| *x = if rng.random::<bool>() { bf16::NEG_ZERO } else { bf16::ZERO }),
        8 => row.iter_mut().for_each(|x| *x = bf16::from_f32(1.5)),
        9 => {
            // A few -inf (masked tokens) and a clear favourite.
            for _ in 0..vocab / 20 + 1 {
                let i = pick(rng);
                row[i] = bf16::NEG_INFINITY;
            }
            let i = pick(rng);
            row[i] = bf16::from_f32(scale * 6.0);
        }
        _ => {}
    }
    row
}

// ------------------------------------------------------------------------------------------------------------------
// argmax

/// (vocab, rows): Llama 3's vocabulary (vector path) at 1, 64 and 300 rows, and odd or tiny sizes.
const ARGMAX_SHAPES: [(usize, usize); 9] =
    [(128_256, 1), (128_256, 64), (128_256, 300), (1, 5), (7, 33), (8, 40), (1000, 17), (4099, 3), (32_768, 12)];

#[test]
fn argmax_matches_cpu() {
    let Some(stream) = stream() else { return };
    for seed in [1u64, 2] {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for (vocab, rows) in ARGMAX_SHAPES {
            let mut logits = Vec::with_capacity(vocab * rows);
            for r in 0..rows {
                logits.extend(logits_row(&mut rng, vocab, (r + seed as usize) % 10));
            }
            let logits_d = upload(&stream, &logits);
            let mut out_d = upload(&stream, &vec![u32::MAX - 1; rows]);
            cuda::sampling::argmax(&stream, &logits_d, vocab, &mut out_d).expect("argmax");
            let got = download(&stream, &out_d);
            for r in 0..rows {
                let want = sampling::argmax(&to_f32(&logits[r * vocab..(r + 1) * vocab]));
                let kind = (r + seed as usize) % 10;
                assert_eq!(got[r], want, "seed {seed} vocab {vocab} rows {rows}: row {r} (kind {kind})");
            }
            eprintln!("argmax seed {seed} vocab {vocab} rows {rows}: all ids equal");
        }
    }
}

// ------------------------------------------------------------------------------------------------------------------
// sample

/// Random parameters of menu entry `kind`: greedy, each filter alone, combinations, penalties, the two cases
/// that take the kernel's whole-row path (top-k above its 4096 candidates; a flat nucleus), and logit bias (set by
/// [`prepare`], which knows the row) greedy and with penalties.
fn params_for(rng: &mut ChaCha8Rng, kind: usize, seed: u64) -> SamplingParams {
    let t = [0.3f32, 0.7, 1.0, 1.5][rng.random_range(0..4)];
    let mut p = SamplingParams { temperature: t, seed: Some(seed), ..SamplingParams::default() };
    match kind {
        0 => p.temperature = 0.0,
        1 => {}
        2 => p.top_k = [1, 5, 40, 200][rng.random_range(0..4)],
        3 => p.top_p = [0.5f32, 0.8, 0.9, 0.95][rng.random_range(0..4)],
        4 => p.min_p = [0.02f32, 0.1, 0.3, 1.0][rng.random_range(0..4)],
        5 => {
            p.top_k = 50;
            p.top_p = 0.9;
            p.min_p = 0.05;
        }
        6 => {
            p.repetition_penalty = 1.3;
            p.frequency_penalty = 0.5;
            p.presence_penalty = -0.4;
            p.top_k = 20;
        }
        7 => {
            p.temperature = 0.0;
            p.repetition_penalty = 1.8;
            p.presence_penalty = 1.0;
        }
        8 => p.top_k = 5000,
        9 => {
            p.temperature = 3.0;
            p.top_p = 0.95;
            p.frequency_penalty = -0.7;
        }
        10 => {
            p.top_p = 0.7;
            p.repetition_penalty = 0.8;
            p.min_p = 0.01;
        }
        11 => {
            p.top_k = 3;
            p.top_p = 0.6;
        }
        12 => p.temperature = 0.0,
        _ => {
            p.repetition_penalty = 1.3;
            p.presence_penalty = 0.5;
            p.top_k = 40;
        }
    }
    p
}
const PARAM_KINDS: usize = 14;
/// The kinds whose rows get a logit bias.
const BIASED: [usize; 2] = [12, 13];

/// A logit bias for `row`: -100 on its argmax, and up to 6 more tokens, mostly among its 64 largest logits, with
/// biases in [-8, 8] (so they reorder the top), one of them possibly 0 (no bias); ids strictly increasing.
fn bias_for(rng: &mut ChaCha8Rng, row: &[f32]) -> Vec<(u32, f32)> {
    let mut order: Vec<u32> = (0..row.len() as u32).collect();
    order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
    let mut bias = vec![(order[0], -100.0f32)];
    for _ in 0..rng.random_range(0..7) {
        let id = if rng.random_range(0..4) == 0 {
            rng.random_range(0..row.len() as u32)
        } else {
            order[rng.random_range(0..order.len().min(64))]
        };
        let b = if rng.random_range(0..8) == 0 { 0.0 } else { rng.random_range(-8.0f32..8.0) };
        bias.push((id, b));
    }
    bias.sort_by_key(|&(id, _)| id);
    bias.dedup_by_key(|&mut (id, _)| id);
    bias
}

/// Prompt and output tokens for the penalties: mostly among the row's 64 largest logits, so they change the result.
fn history(rng: &mut ChaCha8Rng, row: &[f32]) -> (Vec<u32>, Vec<u32>) {
    let mut order: Vec<u32> = (0..row.len() as u32).collect();
    order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
    let top = &order[..order.len().min(64)];
    let draw = |n: usize, rng: &mut ChaCha8Rng| -> Vec<u32> {
        (0..n)
            .map(|_| {
                if rng.random_range(0..4) == 0 {
                    rng.random_range(0..row.len() as u32)
                } else {
                    top[rng.random_range(0..top.len())]
                }
            })
            .collect()
    };
    let prompt = draw(rng.random_range(0..24), rng);
    let output = draw(rng.random_range(0..12), rng);
    (prompt, output)
}

fn sampler(params: &SamplingParams, prompt: &[u32], output: &[u32]) -> Sampler {
    let mut s = Sampler::new(params, prompt);
    output.iter().for_each(|&t| s.accept(t));
    s
}

/// True when `top_p` lies within MARGIN of a cumulative boundary of the descending walk over what survives
/// min-p and top-k (the distribution with top-p off).
fn top_p_ambiguous(params: &SamplingParams, prompt: &[u32], output: &[u32], row: &[f32]) -> bool {
    if params.top_p >= 1.0 || params.is_greedy() {
        return false;
    }
    let open = SamplingParams { top_p: 1.0, ..params.clone() };
    let mut dist = sampler(&open, prompt, output).distribution(row);
    dist.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut cum = 0.0;
    dist.iter().any(|&(_, p)| {
        cum += p;
        (cum - params.top_p as f64).abs() < MARGIN
    })
}

/// True when `u` lies within MARGIN of a cumulative boundary of the final distribution (ascending ids).
fn u_ambiguous(s: &Sampler, row: &[f32], u: f64) -> bool {
    let mut cum = 0.0;
    s.distribution(row).iter().any(|&(_, p)| {
        cum += p;
        (cum - u).abs() < MARGIN
    })
}

/// One prepared row: its kernel parameters, uniform, history, logit bias and the CPU's choice.
struct Case {
    row: SampleRow,
    u: f64,
    prompt: Vec<u32>,
    output: Vec<u32>,
    penalized: bool,
    bias: Vec<(u32, f32)>,
    want: u32,
    kind: usize,
}

/// Parameters of `kind` for `row`, moved off the ambiguous boundaries, and the CPU's id for them.
fn prepare(rng: &mut ChaCha8Rng, row: &[f32], kind: usize, seed: u64) -> Case {
    let mut params = params_for(rng, kind, seed);
    if BIASED.contains(&kind) {
        params.logit_bias = bias_for(rng, row);
    }
    let (prompt, output) = if matches!(kind, 6 | 7 | 9 | 10 | 13) || rng.random_range(0..4) == 0 {
        history(rng, row)
    } else {
        (Vec::new(), Vec::new())
    };
    for _ in 0..20 {
        if !top_p_ambiguous(&params, &prompt, &output, row) {
            break;
        }
        params.top_p *= 0.97;
    }
    let mut s = sampler(&params, &prompt, &output);
    let mut u = 0.0;
    if !s.is_greedy() {
        for _ in 0..50 {
            u = s.clone().next_uniform();
            if !u_ambiguous(&s, row, u) {
                break;
            }
            s.next_uniform();
        }
    }
    let want = s.clone().sample(row);
    let (penalized, bias) = (params.has_penalties(), params.logit_bias.clone());
    Case { row: SampleRow::new(&params), u, prompt, output, penalized, bias, want, kind }
}

/// (vocab, rows): Llama 3's vocabulary, a small vector-path one, odd sizes (scalar path) and a single token.
const SAMPLE_SHAPES: [(usize, usize); 5] = [(128_256, 48), (5000, 60), (4099, 24), (3, 12), (1, 4)];

#[test]
fn sample_matches_cpu() {
    let Some(stream) = stream() else { return };
    for seed in [11u64, 12] {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for (vocab, rows) in SAMPLE_SHAPES {
            let mut logits = Vec::with_capacity(vocab * rows);
            let mut cases = Vec::with_capacity(rows);
            for r in 0..rows {
                // Mostly plain normal rows; every fifth row a special one.
                let logit_kind = if r % 5 == 4 { 1 + (r / 5) % 9 } else { 0 };
                let row = logits_row(&mut rng, vocab, logit_kind);
                let kind = (r + seed as usize) % PARAM_KINDS;
                cases.push(prepare(&mut rng, &to_f32(&row), kind, seed * 1000 + r as u64));
                logits.extend(row);
            }
            // As the executor builds them: a row's history only with a penalty on, and its biased tokens.
            let mut lists = PenaltyLists::new();
            for c in &cases {
                let (prompt, output) = if c.penalized { (&c.prompt[..], &c.output[..]) } else { (&[][..], &[][..]) };
                lists.push_row_biased(prompt, output, &c.bias).expect("penalty lists");
            }
            let params: Vec<SampleRow> = cases.iter().map(|c| c.row).collect();
            let uniforms: Vec<f64> = cases.iter().map(|c| c.u).collect();
            let (logits_d, params_d, uniforms_d) =
                (upload(&stream, &logits), upload(&stream, &params), upload(&stream, &uniforms));
            let mut out_d = upload(&stream, &vec![u32::MAX - 1; rows]);
            if lists.ids().is_empty() {
                cuda::sampling::sample(&stream, &logits_d, vocab, &params_d, &uniforms_d, None, &mut out_d)
                    .expect("sample");
            } else {
                let (o, i, c) =
                    (upload(&stream, lists.offsets()), upload(&stream, lists.ids()), upload(&stream, lists.counts()));
                let b = lists.has_bias().then(|| upload(&stream, lists.bias()));
                let bias = b.as_ref().map(|b| b as &dyn cudarc::driver::DevicePtr<f32>);
                let pen = Penalties { offsets: &o, ids: &i, counts: &c, bias };
                cuda::sampling::sample(&stream, &logits_d, vocab, &params_d, &uniforms_d, Some(&pen), &mut out_d)
                    .expect("sample");
            }
            let got = download(&stream, &out_d);
            for (r, c) in cases.iter().enumerate() {
                assert_eq!(
                    got[r],
                    c.want,
                    "seed {seed} vocab {vocab}: row {r} (params kind {}, {:?}, u {}, {} prompt / {} output tokens)",
                    c.kind,
                    c.row,
                    c.u,
                    c.prompt.len(),
                    c.output.len()
                );
            }
            eprintln!("sample seed {seed} vocab {vocab} rows {rows}: all ids equal the CPU sampler's");
        }
    }
}

#[test]
fn sample_without_penalty_lists_matches_cpu() {
    // Penalty parameters left neutral, so the histories do not matter, and no lists on the device side (None).
    let Some(stream) = stream() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let (vocab, rows) = (128_256, 24);
    let mut logits = Vec::new();
    let mut cases = Vec::new();
    for r in 0..rows {
        let row = logits_row(&mut rng, vocab, if r % 6 == 5 { 9 } else { 0 });
        let kind = [0, 1, 2, 3, 4, 5, 8, 11][r % 8];
        cases.push(prepare(&mut rng, &to_f32(&row), kind, 500 + r as u64));
        logits.extend(row);
    }
    let params: Vec<SampleRow> = cases.iter().map(|c| c.row).collect();
    let uniforms: Vec<f64> = cases.iter().map(|c| c.u).collect();
    let mut out_d = upload(&stream, &vec![u32::MAX - 1; rows]);
    let (l, p, u) = (upload(&stream, &logits), upload(&stream, &params), upload(&stream, &uniforms));
    cuda::sampling::sample(&stream, &l, vocab, &p, &u, None, &mut out_d).expect("sample");
    let got = download(&stream, &out_d);
    for (r, c) in cases.iter().enumerate() {
        assert_eq!(got[r], c.want, "row {r} (params kind {}, {:?}, u {})", c.kind, c.row, c.u);
    }
    eprintln!("sample without penalty lists: {rows} rows equal the CPU sampler's");
}

#[test]
fn sampling_rejects_bad_shapes() {
    let Some(stream) = stream() else { return };
    let vocab = 100;
    let logits = upload(&stream, &vec![bf16::ZERO; 3 * vocab]);
    let params = upload(&stream, &[SampleRow::new(&SamplingParams::default()); 3]);
    let uniforms = upload(&stream, &[0.5f64; 3]);
    let short_u = upload(&stream, &[0.5f64; 2]);
    let short_p = upload(&stream, &[SampleRow::default(); 4]);
    let mut out = upload(&stream, &[0u32; 3]);
    let mut short_out = upload(&stream, &[0u32; 2]);
    let expect = |r: llama32::Result<()>, what: &str| {
        let e = r.expect_err(what).to_string();
        assert!(e.contains(what), "error `{e}` does not name {what}");
    };
    expect(cuda::sampling::argmax(&stream, &logits, 0, &mut out), "vocab is 0");
    expect(cuda::sampling::argmax(&stream, &logits, 7, &mut out), "`logits`");
    expect(cuda::sampling::argmax(&stream, &logits, vocab, &mut short_out), "`out_ids`");
    expect(cuda::sampling::sample(&stream, &logits, 1 << 20, &params, &uniforms, None, &mut out), "vocab is");
    expect(cuda::sampling::sample(&stream, &logits, vocab, &short_p, &uniforms, None, &mut out), "`params`");
    expect(cuda::sampling::sample(&stream, &logits, vocab, &params, &short_u, None, &mut out), "`uniforms`");
    expect(cuda::sampling::sample(&stream, &logits, vocab, &params, &uniforms, None, &mut short_out), "`out_ids`");
    let (o3, o4, ids, counts1) = (
        upload(&stream, &[0u32; 3]),
        upload(&stream, &[0u32, 1, 1, 2]),
        upload(&stream, &[1u32, 2]),
        upload(&stream, &[0u32]),
    );
    let bad_offsets = Penalties { offsets: &o3, ids: &ids, counts: &ids, bias: None };
    expect(
        cuda::sampling::sample(&stream, &logits, vocab, &params, &uniforms, Some(&bad_offsets), &mut out),
        "`penalties.offsets`",
    );
    let bad_counts = Penalties { offsets: &o4, ids: &ids, counts: &counts1, bias: None };
    expect(
        cuda::sampling::sample(&stream, &logits, vocab, &params, &uniforms, Some(&bad_counts), &mut out),
        "`penalties.counts`",
    );
    let short_bias = upload(&stream, &[1.0f32]);
    let bad_bias = Penalties { offsets: &o4, ids: &ids, counts: &ids, bias: Some(&short_bias) };
    expect(
        cuda::sampling::sample(&stream, &logits, vocab, &params, &uniforms, Some(&bad_bias), &mut out),
        "`penalties.bias`",
    );
    // A well-formed call still works, into poisoned ids: each row's largest logit is id 1 (2.0, then id 2 at 1.5),
    // and a presence penalty of 1 on the tokens seen (row 0: id 1; row 1: none; row 2: id 2) moves row 0 to id 2.
    let mut row = vec![bf16::ZERO; vocab];
    row[1] = bf16::from_f32(2.0);
    row[2] = bf16::from_f32(1.5);
    row[5] = bf16::from_f32(1.0);
    let peaked = upload(&stream, &row.repeat(3));
    let present = SamplingParams { presence_penalty: 1.0, ..SamplingParams::greedy() };
    let params = upload(&stream, &[SampleRow::new(&present); 3]);
    let mut out = upload(&stream, &[u32::MAX - 1; 3]);
    let good = Penalties { offsets: &o4, ids: &ids, counts: &ids, bias: None };
    cuda::sampling::sample(&stream, &peaked, vocab, &params, &uniforms, Some(&good), &mut out).expect("valid call");
    assert_eq!(download(&stream, &out), [2, 1, 1]);
}

// ------------------------------------------------------------------------------------------------------------------
// benchmark

/// Greedy argmax and full sampling at 64 x 128256 (Llama 3's vocabulary), in GB/s of logits read once.
#[test]
#[ignore]
fn sampling_throughput() {
    let Some(stream) = stream() else { return };
    let (vocab, rows) = (128_256usize, 64usize);
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let logits: Vec<bf16> = (0..vocab * rows).map(|_| bf16::from_f32(3.0 * normal(&mut rng))).collect();
    let logits_d = upload(&stream, &logits);
    let mut out_d = upload(&stream, &vec![0u32; rows]);
    let bytes = (vocab * rows * 2) as f64;
    let time = |f: &mut dyn FnMut()| {
        for _ in 0..5 {
            f();
        }
        stream.synchronize().expect("sync");
        let iters = 50;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            f();
        }
        stream.synchronize().expect("sync");
        t.elapsed().as_secs_f64() / iters as f64
    };
    for rows_now in [1usize, 64] {
        let view = logits_d.slice(..rows_now * vocab);
        let mut out = out_d.slice_mut(..rows_now);
        let secs = time(&mut || cuda::sampling::argmax(&stream, &view, vocab, &mut out).expect("argmax"));
        let b = (rows_now * vocab * 2) as f64;
        eprintln!("argmax {rows_now} x {vocab}: {:.1} us, {:.0} GB/s", secs * 1e6, b / secs / 1e9);
    }
    let configs: [(&str, SamplingParams); 6] = [
        ("greedy", SamplingParams::default()),
        ("T=1", SamplingParams { temperature: 1.0, ..SamplingParams::default() }),
        ("T=0.8 top_k=50", SamplingParams { temperature: 0.8, top_k: 50, ..SamplingParams::default() }),
        ("T=0.7 top_p=0.9", SamplingParams { temperature: 0.7, top_p: 0.9, ..SamplingParams::default() }),
        (
            "T=0.7 top_k=40 top_p=0.95 min_p=0.05",
            SamplingParams { temperature: 0.7, top_k: 40, top_p: 0.95, min_p: 0.05, ..SamplingParams::default() },
        ),
        (
            "T=1.5 top_p=0.95 (flat nucleus)",
            SamplingParams { temperature: 1.5, top_p: 0.95, ..SamplingParams::default() },
        ),
    ];
    let uniforms = upload(&stream, &(0..rows).map(|r| (r as f64 + 0.5) / rows as f64).collect::<Vec<_>>());
    for (name, p) in &configs {
        let params = upload(&stream, &vec![SampleRow::new(p); rows]);
        let secs = time(&mut || {
            cuda::sampling::sample(&stream, &logits_d, vocab, &params, &uniforms, None, &mut out_d).expect("sample")
        });
        eprintln!("sample {name} {rows} x {vocab}: {:.1} us, {:.0} GB/s", secs * 1e6, bytes / secs / 1e9);
    }
    // With penalties on 64 tokens per row (the bitmap path).
    let mut lists = PenaltyLists::new();
    for r in 0..rows {
        let prompt: Vec<u32> = (0..48).map(|i| ((r * 7919 + i * 104_729) % vocab) as u32).collect();
        lists.push_row(&prompt, &prompt[..16]).expect("lists");
    }
    let (o, i, c) = (upload(&stream, lists.offsets()), upload(&stream, lists.ids()), upload(&stream, lists.counts()));
    let pen = Penalties { offsets: &o, ids: &i, counts: &c, bias: None };
    let p = SamplingParams {
        temperature: 0.8,
        top_k: 50,
        repetition_penalty: 1.2,
        presence_penalty: 0.5,
        ..Default::default()
    };
    let params = upload(&stream, &vec![SampleRow::new(&p); rows]);
    let secs = time(&mut || {
        cuda::sampling::sample(&stream, &logits_d, vocab, &params, &uniforms, Some(&pen), &mut out_d).expect("sample")
    });
    eprintln!(
        "sample T=0.8 top_k=50 + penalties {rows} x {vocab}: {:.1} us, {:.0} GB/s",
        secs * 1e6,
        bytes / secs / 1e9
    );
}
