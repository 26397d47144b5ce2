//! W4A16 above [`MAX_DECODE_M`](super::MAX_DECODE_M) rows (prefill; from [`large_min_m`] rows): which path runs
//! ([`W4A16LargeKernel`]), and the Hopper kernel that
//! dequantizes in registers ([`w4a16_gemm_large`], `kernels/quant/w4a16_sm90.cu`). The other path, dequantize a
//! chunk of rows into a scratch and multiply it with cuBLASLt, lives with the executor's buffers
//! (`exec::cuda::quant_bufs`), since it needs the scratch and a cuBLASLt handle.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use super::w4a16::{check_operands, launch_gemm};
use super::{padded_n, CudaQuantLinear, W4A16Kernel};
use crate::ops::cuda::switch::KernelSwitch;
use crate::{Error, Result};

/// How a W4A16 projection of more than [`MAX_DECODE_M`](super::MAX_DECODE_M) rows runs. Both multiply by the same bf16 weights
/// `bf16(s * (q - z))` with f32 accumulation; they differ in the order of the f32 sums. The environment variable
/// [`W4A16LargeKernel::ENV`] (`auto`, `dequant`, `wgmma`, `wgmma-row`) forces one where it runs; `auto` keeps
/// [`W4A16LargeKernel::Dequant`], which an H100 measured 4x faster than [`W4A16LargeKernel::Wgmma`] on 1B prefill
/// (2026-11-28).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum W4A16LargeKernel {
    /// A chunk of rows dequantized into a bf16 scratch ([`super::w4a16_dequant_rows`]), then cuBLASLt; every device.
    Dequant,
    /// `kernels/quant/w4a16_sm90.cu`: Hopper's wgmma with the weights dequantized in registers, no scratch
    /// (compute capability 9.x with sm_90a SASS, [`large_wgmma_available`]).
    Wgmma,
    /// [`W4A16LargeKernel::Wgmma`] with the activations copied in natural k order (four 16-byte copies per thread
    /// and chunk at 128-token tiles instead of sixteen 4-byte ones) and each lane's A fragments composed from the
    /// words of its quad's lanes. Its k16 steps hold other columns than [`W4A16LargeKernel::Wgmma`]'s, so the f32
    /// sums round differently (other bits, within the summation-order bound; H200, 2026-11-28).
    WgmmaRow,
}

impl KernelSwitch for W4A16LargeKernel {
    /// `auto` (the default), `dequant`, `wgmma` or `wgmma-row`.
    const ENV: &'static str = "LLAMA32_W4A16_LARGE";
    const WHAT: &'static str = "large-m W4A16 path";
    const KERNELS: &'static [Self] = &W4A16LargeKernel::ALL;

    fn name(self) -> &'static str {
        match self {
            W4A16LargeKernel::Dequant => "dequant",
            W4A16LargeKernel::Wgmma => "wgmma",
            W4A16LargeKernel::WgmmaRow => "wgmma-row",
        }
    }

    fn env_cell() -> &'static std::sync::OnceLock<Option<String>> {
        static VALUE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        &VALUE
    }
}

impl W4A16LargeKernel {
    /// Every path.
    pub const ALL: [W4A16LargeKernel; 3] =
        [W4A16LargeKernel::Dequant, W4A16LargeKernel::Wgmma, W4A16LargeKernel::WgmmaRow];

    /// True for the kernels of [`w4a16_gemm_large`] (every path but [`W4A16LargeKernel::Dequant`]).
    pub fn is_wgmma(self) -> bool {
        self != W4A16LargeKernel::Dequant
    }

    /// Whether the path runs on the current device.
    pub fn runs(self) -> bool {
        !self.is_wgmma() || large_wgmma_available()
    }

    /// The path the executor takes: the forced one where it runs, else (and for `auto`)
    /// [`W4A16LargeKernel::Dequant`]. An error names a bad value of [`W4A16LargeKernel::ENV`].
    pub fn configured() -> Result<Self> {
        Ok(Self::forced()?.filter(|k| k.runs()).unwrap_or(W4A16LargeKernel::Dequant))
    }
}

/// The environment variable that lowers the fewest rows a W4A16 projection sends down the large-m path
/// ([`W4A16LargeKernel`]) instead of a decode kernel: 1 to [`MAX_DECODE_M`](super::MAX_DECODE_M) + 1 (the default),
/// read once per process. An A/B switch for batched decode, where the decode kernels ran at 0.41-0.46x cuBLAS bf16
/// at m = 64 on the 90B shapes (H200, 2026-11-27) and 1B W4A16 decode at batch 64 took 3.53 ms a step against
/// bf16's 2.72 (H100).
pub const LARGE_MIN_M_ENV: &str = "LLAMA32_W4A16_LARGE_MIN_M";

/// [`LARGE_MIN_M_ENV`]'s setting.
static LARGE_MIN_M: crate::ops::cuda::EnvCount =
    crate::ops::cuda::EnvCount::new(LARGE_MIN_M_ENV, super::MAX_DECODE_M + 1, 1..=super::MAX_DECODE_M + 1);

/// The fewest rows a W4A16 projection takes through the large-m path ([`LARGE_MIN_M_ENV`]; default
/// [`MAX_DECODE_M`](super::MAX_DECODE_M) + 1); an error names a bad value.
pub fn large_min_m() -> Result<usize> {
    LARGE_MIN_M.get()
}

/// True when a W4A16 projection of `rows` rows takes the large-m path ([`large_min_m`]; a bad value of
/// [`LARGE_MIN_M_ENV`], which every kernel call refuses, counts as the default).
pub fn takes_large_path(rows: usize) -> bool {
    rows >= LARGE_MIN_M.or_default()
}

/// True when the current device runs [`w4a16_gemm_large`]: this build holds sm_90a SASS and the device has
/// compute capability 9.x (cached per device in the library).
#[cfg(llama32_cuda)]
pub fn large_wgmma_available() -> bool {
    // SAFETY: no arguments; reads the current device's compute capability (cached per device).
    unsafe { super::super::ffi::l32_w4a16_wgmma_available() != 0 }
}

/// True when the current device runs [`w4a16_gemm_large`]: never in a build without CUDA.
#[cfg(not(llama32_cuda))]
pub fn large_wgmma_available() -> bool {
    false
}

/// How [`w4a16_gemm_large`] runs: which of its kernels, and how many tokens per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LargePlan {
    /// [`W4A16LargeKernel::Wgmma`] or [`W4A16LargeKernel::WgmmaRow`].
    pub kernel: W4A16LargeKernel,
    /// 64 or 128.
    pub tile_m: usize,
}

/// Tokens per block of [`w4a16_gemm_large`] for `m` x `n` on `sms` SMs: 128 when those tiles make two blocks per
/// SM (the kernel's residency), else 64.
pub fn large_tile_m(m: usize, n: usize, sms: usize) -> usize {
    let row_blocks = padded_n(n).div_ceil(128).max(1);
    if row_blocks * m.div_ceil(128) >= 2 * sms {
        128
    } else {
        64
    }
}

/// The plan of `kernel` for `m` x `n` on `sms` SMs (its tile from [`large_tile_m`]).
pub fn large_plan(kernel: W4A16LargeKernel, m: usize, n: usize, sms: usize) -> LargePlan {
    LargePlan { kernel, tile_m: large_tile_m(m, n, sms) }
}

/// `out[m, n] = x[m, k] @ bf16(s * (q - z))^T` for any `m` on Hopper with `plan` (its kernel, and 64 or 128 tokens
/// per block): the weights dequantized in registers (no scratch), f32 accumulation over all of `k`, one bf16
/// rounding per output; the two kernels group the products into wgmma's k16 steps differently, so their f32
/// roundings (not their products) differ.
/// A weight uploaded paired ([`CudaQuantLinear::upload_swiglu`]) writes its output in matrix row order, or with
/// `silu` the `[m, n / 2]` output `silu(gate) * up` (the bits of the plain output followed by the SiLU * up
/// kernel). Errors name the operand at fault, and a device or build without the kernel.
///
/// Enqueued on `stream`; returns without waiting.
pub fn w4a16_gemm_large(
    stream: &CudaStream,
    (x, w, m): (&impl DevicePtr<bf16>, &CudaQuantLinear, usize),
    plan: LargePlan,
    silu: bool,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    const OP: &str = "w4a16_gemm_large";
    super::super::ensure_built()?;
    let fail = |msg: String| Err(Error::Backend(format!("{OP}: {msg}")));
    check_operands(OP, stream, (x, w, m), out, silu)?;
    if !large_wgmma_available() {
        return fail("this device or build has no wgmma W4A16 kernel (compute capability 9.x with sm_90a)".into());
    }
    if !plan.kernel.is_wgmma() {
        return fail(format!("the {} path is not a kernel of this call", plan.kernel.name()));
    }
    if plan.tile_m != 64 && plan.tile_m != 128 {
        return fail(format!("tile_m is {}, must be 64 or 128", plan.tile_m));
    }
    if m == 0 || m >= 1 << 30 {
        return fail(format!("m is {m}, must be in 1..2^30"));
    }
    if w.n == 0 {
        return Ok(());
    }
    launch_gemm(OP, stream, (x, w, m), None, out, (W4A16Kernel::Direct, 1, Some(plan)), silu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_tiles_fill_two_blocks_per_sm() {
        let sms = 132;
        // 1B prefill of 512 tokens: qkv 3072 rows = 24 row blocks x 4 = 96 < 264 -> 64-token tiles.
        assert_eq!(large_tile_m(512, 3072, sms), 64);
        // 90B gate_up at 1024 tokens: 448 x 8 blocks.
        assert_eq!(large_tile_m(1024, 57344, sms), 128);
        assert_eq!(large_tile_m(65, 1, sms), 64);
    }

    #[test]
    fn decode_sizes_keep_the_decode_kernels_by_default() {
        // The default (the variable is not set in the test environment): up to MAX_DECODE_M rows decode kernels.
        if std::env::var(LARGE_MIN_M_ENV).is_err() {
            assert_eq!(large_min_m().unwrap(), super::super::MAX_DECODE_M + 1);
            assert!(!takes_large_path(super::super::MAX_DECODE_M));
            assert!(takes_large_path(super::super::MAX_DECODE_M + 1));
        }
    }

    #[test]
    fn large_kernel_names_round_trip() {
        for k in W4A16LargeKernel::ALL {
            assert_eq!(W4A16LargeKernel::parse(k.name()).unwrap(), Some(k));
            assert_eq!(k.is_wgmma(), k != W4A16LargeKernel::Dequant);
        }
        let e = W4A16LargeKernel::parse("cublas").unwrap_err().to_string();
        assert!(e.contains(W4A16LargeKernel::ENV) && e.contains("cublas"), "{e}");
        // Dequant runs everywhere; so the configured path is never one that cannot run.
        assert!(W4A16LargeKernel::Dequant.runs());
    }
}
