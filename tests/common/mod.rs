//! Helpers shared by the integration tests (each test binary uses a subset).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use half::bf16;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The reference data folder named by `LLAMA32_TEST_DATA`, or None after printing that the test is skipped.
pub fn data_dir() -> Option<PathBuf> {
    match std::env::var_os("LLAMA32_TEST_DATA") {
        Some(d) => Some(PathBuf::from(d)),
        None => {
            eprintln!("skipped: LLAMA32_TEST_DATA not set");
            None
        }
    }
}

/// `tests/golden/<name>`; `LLAMA32_GOLDEN_DIR` overrides the folder (a test binary run away from its source tree,
/// as on the device machine, where `scripts/gpu-suite.sh` sets it).
pub fn golden_dir(name: &str) -> PathBuf {
    std::env::var_os("LLAMA32_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden"))
        .join(name)
}

/// A stream on device 0, or None (after printing that the test is skipped) where CUDA cannot run.
pub fn cuda_stream() -> Option<Arc<CudaStream>> {
    if let Err(e) = llama32::ops::cuda::probe() {
        eprintln!("skipped: no CUDA device ({e})");
        return None;
    }
    let ctx = CudaContext::new(0).expect("CUDA context on device 0");
    Some(ctx.new_stream().expect("a CUDA stream"))
}

/// Standard normal by Box-Muller.
pub fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// A generator for `seed`.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// bf16 values widened to f32.
pub fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Host to device.
pub fn upload<T: DeviceRepr>(stream: &Arc<CudaStream>, v: &[T]) -> CudaSlice<T> {
    stream.clone_htod(v).expect("host to device copy")
}

/// Device to host.
pub fn download<T: DeviceRepr + ValidAsZeroBits + Default + Clone>(
    stream: &Arc<CudaStream>,
    v: &CudaSlice<T>,
) -> Vec<T> {
    stream.clone_dtoh(v).expect("device to host copy")
}
