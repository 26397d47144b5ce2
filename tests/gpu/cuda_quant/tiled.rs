//! The tiled W4A16 kernel's ring depths on the device (its own file to keep cuda_quant.rs short; the test's path is
//! `cuda_quant::tiled::...`).

use half::bf16;
use llama32::ops::cuda::quant::{
    set_w4a16_tiled_stages, w4a16_gemm_with, w4a16_splits, w4a16_workspace_for, CudaQuantLinear, SplitKWorkspace,
    W4A16Choice, W4A16Kernel,
};
use llama32::quant::{QuantLinear, Scheme};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{random_matrix, random_rows, LLAMA_1B, ODD, SEED};
use crate::common::{cuda_stream as stream, download, upload, OnDrop, Watchdog};

/// The tiled kernel with a ring of 3 and 4 stage buffers (`set_w4a16_tiled_stages`, not yet measured) gives the
/// bits of its measured 2-stage form, which `cuda_quant::w4a16_matches_cpu` ties to the direct kernel: odd shapes (one chunk, padded
/// tiles), the 1B shapes, with and without zero points, every token-tile width (m 1 to 64), and the heuristic's,
/// one, three and one-per-chunk splits (stage rings that start past the split's last chunk, empty groups). The
/// depth goes back to the variable's at the end, also on a failure.
#[test]
fn w4a16_tiled_stages_change_no_bit() {
    let Some(stream) = stream() else { return };
    let dog = Watchdog::start("w4a16_tiled_stages_change_no_bit");
    let _reset = OnDrop(|| {
        let _ = set_w4a16_tiled_stages(None);
    });
    let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 0x71ed);
    let sms = llama32::ops::cuda::attention::num_sms(&stream).expect("SM count");
    let cases = ODD.iter().map(|&(k, n)| (k, n, true)).chain(LLAMA_1B.iter().map(|&(k, n)| (k, n, false)));
    let mut runs = 0;
    for (k, n, zeros) in cases {
        let qm = random_matrix(&mut rng, n, k, zeros);
        let w = CudaQuantLinear::upload(&stream, &QuantLinear { matrix: qm, scheme: Scheme::W4A16_G32 }).unwrap();
        let ms: &[usize] = if n * k > 1 << 22 { &[9, 33, 64] } else { &[1, 8, 9, 16, 17, 32, 33, 64] };
        for &m in ms {
            let x_d = upload(&stream, &random_rows(&mut rng, m, k, (-1.0, 1.0), false));
            let heuristic = w4a16_splits(W4A16Kernel::Tiled, m, n, k, sms);
            let mut splits: Vec<usize> = vec![heuristic, 1, 3.min(k / 64)];
            if k / 64 <= 8 {
                splits.push(k / 64);
            }
            splits.dedup();
            let need = splits.iter().fold((0, 0), |a, &sp| {
                let b = w4a16_workspace_for(W4A16Kernel::Tiled, m, n, sp);
                (a.0.max(b.0), a.1.max(b.1))
            });
            let mut ws = SplitKWorkspace::new(&stream, need.0, need.1, sms).expect("workspace");
            for split in splits {
                let mut want: Option<Vec<bf16>> = None;
                for stages in [2, 3, 4] {
                    let what = format!("w4a16 tiled m {m} k {k} n {n} zeros {zeros} splits {split} stages {stages}");
                    set_w4a16_tiled_stages(Some(stages)).unwrap();
                    let choice = W4A16Choice { kernel: W4A16Kernel::Tiled, splits: Some(split) };
                    let mut out = upload(&stream, &vec![bf16::NAN; m * n + 64]);
                    dog.at(format!("launch {what}"));
                    w4a16_gemm_with(&stream, &x_d, &w, m, &mut ws, &mut out, choice)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    let got = download(&stream, &out);
                    dog.at(format!("check {what}"));
                    assert!(got[m * n..].iter().all(|v| v.to_bits() == bf16::NAN.to_bits()), "{what}: wrote past");
                    let got = got[..m * n].to_vec();
                    match &want {
                        None => want = Some(got),
                        Some(want) => {
                            if let Some(i) = (0..m * n).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                                panic!("{what}: out[{}, {}] = {} but 2 stages give {}", i / n, i % n, got[i], want[i]);
                            }
                        }
                    }
                    runs += 1;
                }
            }
        }
    }
    eprintln!("w4a16 tiled stages: {runs} runs, 3 and 4 stages bit-equal to 2");
}
