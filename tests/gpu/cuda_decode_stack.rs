//! The persistent decode stack (`--persistent-decode`) at the Llama 3.2 text shapes: random weights at the 1B and 3B
//! widths with two layers and a small vocabulary, bf16 and W4A16. Decode steps of 1 to 8 sequences, eager and from
//! CUDA graphs, give bitwise the logits of the layers one by one with the skinny GEMM at the stack's 8 warps per tile
//! and the W4A16 kernels at its 8 K splits. At these widths each block of the stack runs several tiles of a
//! projection (1B gate_up: 1024 tiles on ~132 SMs) and the contexts split the attention, which the golden cases'
//! small projections and short contexts never do. Skipped without a CUDA device.

use llama32::config::{LlamaConfig, Preset};
use llama32::exec::cuda::{CudaExecutor, CudaOptions};
use llama32::exec::generate::{build_step, LogitsWanted, SeqChunk};
use llama32::exec::Executor;
use llama32::kv::BlockAllocator;
use llama32::quant::Scheme;
use llama32::weights::{Checkpoint, ModelWeights, WeightSource};
use rand::RngExt;

use crate::common::Watchdog;
use crate::cuda_tp::device_ready;

/// A preset's widths with `layers` layers and a 4096-token vocabulary.
fn config(preset: Preset, layers: usize) -> LlamaConfig {
    LlamaConfig { num_hidden_layers: layers, vocab_size: 4096, ..preset.config() }
}

/// Token ids from a seeded generator, below `vocab`.
fn ids(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = crate::common::rng(seed);
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// Eight sequences with prompts of 40 to 600 tokens (one prefill step each), then decode rounds with 1, 2, 5 and 8
/// of them: every step's logits, in order, with the skinny GEMM at 8 warps per block and the W4A16 kernels at 8 K
/// splits. `quant`: the random weights quantized to W4A16 (on the CPU, once per call).
fn rounds(cfg: &LlamaConfig, quant: Option<&ModelWeights>, stack: bool, graphs: usize, dog: &Watchdog) -> Vec<f32> {
    let opts =
        CudaOptions { kv_tokens: Some(8192), max_step_tokens: 1024, max_graph_batch: graphs, ..Default::default() };
    let mut exec = match quant {
        Some(w) => CudaExecutor::from_weights(cfg.clone(), w, &opts).unwrap(),
        None => CudaExecutor::new(cfg.clone(), WeightSource::Random(7), &opts, &|_| {}).unwrap(),
    };
    exec.set_persistent_decode(stack).unwrap();
    let logits = llama32::ops::cuda::quant::with_w4a16_splits(8, || {
        llama32::ops::cuda::gemv::with_warps(8, || {
            let mut alloc = BlockAllocator::new(exec.num_blocks(), exec.block_size());
            let prompts: Vec<Vec<u32>> = (0..8).map(|s| ids(s, 40 + 80 * s as usize, cfg.vocab_size)).collect();
            let mut tables: Vec<Vec<u32>> = vec![Vec::new(); 8];
            let mut logits = Vec::new();
            for (p, table) in prompts.iter().zip(tables.iter_mut()) {
                alloc.ensure(table, p.len() + 32).unwrap();
                let chunk = SeqChunk { tokens: p, start_pos: 0, block_table: table, logits: LogitsWanted::Last };
                logits.extend(exec.step(&build_step(&[chunk], exec.block_size()).unwrap()).unwrap().logits);
            }
            let mut next: Vec<usize> = prompts.iter().map(Vec::len).collect();
            let fresh = ids(99, 64, cfg.vocab_size);
            for round in 0..16 {
                let active = [1, 2, 5, 8][round % 4];
                dog.at(format!("stack {stack} graphs {graphs} round {round} ({active} sequences)"));
                let chunks: Vec<_> = (0..active)
                    .map(|s| SeqChunk {
                        tokens: std::slice::from_ref(&fresh[(s + 3 * round) % fresh.len()]),
                        start_pos: next[s],
                        block_table: &tables[s],
                        logits: LogitsWanted::Last,
                    })
                    .collect();
                logits.extend(exec.step(&build_step(&chunks, exec.block_size()).unwrap()).unwrap().logits);
                for p in next.iter_mut().take(active) {
                    *p += 1;
                }
            }
            logits
        })
    })
    .unwrap()
    .unwrap();
    // Every decode round of one sequence, at least, took the stack (larger batches may exceed a small GPU's
    // shared memory); without the switch none.
    let fused = exec.fused_decode_steps();
    assert!(if stack { fused >= 4 } else { fused == 0 }, "stack {stack} graphs {graphs}: {fused} fused steps");
    eprintln!("stack {stack} graphs {graphs}: {fused} of 16 decode steps through the stack");
    logits
}

/// The rounds with and without the stack, at the 1B and 3B widths with two layers, eager and from graphs, compared
/// bitwise; `quant` quantizes the random weights to W4A16 first.
fn stack_matches_the_layers(test: &str, quant: bool) {
    // Never run on a GPU when written: a hung barrier names its step.
    let dog = Watchdog::start(test);
    let what = if quant { "W4A16" } else { "bf16" };
    for (name, preset) in [("1b", Preset::Llama32_1B), ("3b", Preset::Llama32_3B)] {
        let cfg = config(preset, 2);
        let weights = quant.then(|| {
            let mut w = ModelWeights::random(&cfg, 7).unwrap();
            w.quantize_in_place(Scheme::W4A16_G32).unwrap();
            w
        });
        for graphs in [0, 256] {
            let off = rounds(&cfg, weights.as_ref(), false, graphs, &dog);
            let on = rounds(&cfg, weights.as_ref(), true, graphs, &dog);
            assert_eq!(off.len(), on.len());
            assert!(on.iter().all(|x| x.is_finite()), "{name} {what} graphs {graphs}: non-finite logits");
            if let Some(i) = (0..off.len()).find(|&i| off[i].to_bits() != on[i].to_bits()) {
                let row = i / cfg.vocab_size;
                panic!(
                    "{name} {what} graphs {graphs}: logit {i} (row {row}) is {} with the stack, {} without",
                    on[i], off[i]
                );
            }
            eprintln!("{name} {what}, graphs {graphs}: {} logits bitwise equal with and without the stack", off.len());
        }
    }
}

#[test]
fn decode_stack_matches_the_layers_at_the_llama_widths() {
    if !device_ready() {
        return;
    }
    stack_matches_the_layers("decode_stack_matches_the_layers_at_the_llama_widths", false);
}

/// The same with the projections quantized to W4A16 (symmetric, group 32, gate_up paired on upload): the stack's
/// W4A16 tiles against the W4A16 decode kernels at 8 K splits, followed by the RoPE and SiLU * up they fuse.
#[test]
fn decode_stack_w4a16_matches_the_layers_at_the_llama_widths() {
    if !device_ready() {
        return;
    }
    stack_matches_the_layers("decode_stack_w4a16_matches_the_layers_at_the_llama_widths", true);
}

/// The stack refuses W4A8 projections with an error that names the layer and projection, when switched on and when
/// asked for in the options; it takes W4A16 ones.
#[test]
fn decode_stack_refuses_w4a8_projections() {
    if !device_ready() {
        return;
    }
    let dir = crate::common::golden_dir("cuda-d64-gqa4");
    let cfg = LlamaConfig::from_model_dir(&dir).unwrap();
    let bf16 = ModelWeights::load(&Checkpoint::open(&dir).unwrap(), &cfg, &|_| {}).unwrap();
    let opts = CudaOptions { kv_tokens: Some(256), max_step_tokens: 64, ..Default::default() };
    let mut w = bf16.clone();
    w.quantize_in_place(Scheme::W4A8_G32).unwrap();
    let mut exec = CudaExecutor::from_weights(cfg.clone(), &w, &opts).unwrap();
    let err = exec.set_persistent_decode(true).unwrap_err().to_string();
    assert!(err.contains("W4A8") && err.contains("layer 0") && err.contains("`qkv`"), "{err}");
    let on = CudaOptions { persistent_decode: true, ..opts.clone() };
    let err = CudaExecutor::from_weights(cfg.clone(), &w, &on).err().expect("refused").to_string();
    assert!(err.contains("W4A8"), "{err}");
    let mut w = bf16;
    w.quantize_in_place(Scheme::W4A16_G32).unwrap();
    CudaExecutor::from_weights(cfg, &w, &on).expect("the stack takes W4A16 projections");
}

/// The stack's phase timing (`llama32 bench --profile` with `--persistent-decode`): with it on, decode steps give
/// the same logits bit for bit as with it off; every block writes every timestamp; and no block leaves a grid
/// barrier before the last block has arrived at it (within 1 us, for the timer's skew between SMs). Eager and from
/// CUDA graphs, at the 1B widths with two layers and at the 3B widths (head_dim 128) eager.
#[test]
fn decode_stack_phase_timing_changes_no_bit_and_the_barriers_hold() {
    if !device_ready() {
        return;
    }
    let dog = Watchdog::start("decode_stack_phase_timing_changes_no_bit_and_the_barriers_hold");
    for (name, preset, graphs) in
        [("1b", Preset::Llama32_1B, 0), ("1b", Preset::Llama32_1B, 256), ("3b", Preset::Llama32_3B, 0)]
    {
        let cfg = config(preset, 2);
        let prompt = ids(5, 300, cfg.vocab_size);
        let next = ids(6, 8, cfg.vocab_size);
        let run = |timed: bool| {
            let opts = CudaOptions {
                kv_tokens: Some(1024),
                max_step_tokens: 512,
                max_graph_batch: graphs,
                persistent_decode: true,
                ..Default::default()
            };
            let mut exec = CudaExecutor::new(cfg.clone(), WeightSource::Random(7), &opts, &|_| {}).unwrap();
            exec.set_fused_decode_timing(timed).unwrap();
            let mut alloc = BlockAllocator::new(exec.num_blocks(), exec.block_size());
            let mut table = Vec::new();
            alloc.ensure(&mut table, prompt.len() + next.len()).unwrap();
            let chunk = SeqChunk { tokens: &prompt, start_pos: 0, block_table: &table, logits: LogitsWanted::Last };
            let mut logits = exec.step(&build_step(&[chunk], exec.block_size()).unwrap()).unwrap().logits;
            for (i, t) in next.iter().enumerate() {
                dog.at(format!("{name} graphs {graphs} timed {timed} decode step {i}"));
                let chunk = SeqChunk {
                    tokens: std::slice::from_ref(t),
                    start_pos: prompt.len() + i,
                    block_table: &table,
                    logits: LogitsWanted::Last,
                };
                logits.extend(exec.step(&build_step(&[chunk], exec.block_size()).unwrap()).unwrap().logits);
            }
            assert_eq!(exec.fused_decode_steps(), next.len() as u64, "{name}: every decode step took the stack");
            (logits, exec.fused_decode_phases().unwrap())
        };
        let (plain, none) = run(false);
        assert!(none.is_none(), "{name}: phases without timing");
        let (timed, phases) = run(true);
        if let Some(i) = (0..plain.len()).find(|&i| plain[i].to_bits() != timed[i].to_bits()) {
            panic!("{name} graphs {graphs}: logit {i} is {} timed, {} untimed", timed[i], plain[i]);
        }
        let p = phases.expect("the timed launches' phases");
        assert_eq!(p.layers, 2);
        assert!(
            p.worst_overlap_ns < 1000,
            "{name}: a block left a barrier {} ns before the last arrived",
            p.worst_overlap_ns
        );
        assert!(p.total_us > 0.0 && p.phases.iter().all(|ph| ph.span_us > 0.0 && ph.max_work_us >= ph.mean_work_us));
        eprintln!(
            "{name} graphs {graphs}: {} logits bitwise equal timed and untimed; last launch {:.1} us on {} blocks, \
             worst overlap {} ns; {}",
            plain.len(),
            p.total_us,
            p.blocks,
            p.worst_overlap_ns,
            llama32::ops::cuda::decode_layers::PHASE_NAMES
                .iter()
                .zip(&p.phases)
                .map(|(n, ph)| format!(
                    "{n} {:.1} (work {:.1} / {:.1}, release {:.1})",
                    ph.span_us, ph.mean_work_us, ph.max_work_us, ph.release_us
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}
