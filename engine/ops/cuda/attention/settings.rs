//! The paged attention kernels' switches and launch heuristics: which prefill kernel ([`PrefillKernel`]), the
//! decode split-KV policy and its workspace ([`decode_num_splits`], [`decode_workspace_bytes`]), the decode merge
//! and ring depth, and the device queries they need ([`compute_capability`], [`num_sms`]).

use cudarc::driver::CudaStream;

use super::PagedLayout;
use crate::ops::cuda::switch::KernelSwitch;
use crate::{Error, Result};

/// Which paged prefill kernel [`paged_prefill`](super::paged_prefill) runs. Both compute the same attention with the same numerics (f32
/// scores and sums, P rounded to bf16); their bits may differ by f32 summation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillKernel {
    /// mma.sync with ldmatrix operands, 64-row CTAs: every GPU (sm_80, sm_89, sm_90a). The default where the
    /// wgmma kernels cannot run.
    Mma,
    /// Hopper warpgroup MMA (wgmma) with Q, K and V read from swizzled shared memory, 128-row CTAs of two
    /// warpgroups and 128-position KV tiles: compute capability 9.x with a build that holds sm_90a SASS. The
    /// default there until 2026-11-28: on an H100 (2026-11-27) it ran 4 x 4096 causal prefill at 281 TFLOP/s
    /// (d128) and 239 (d64) against the mma kernel's 171 and 183, and 3B / 1B prefill end to end 1.14x / 1.11x
    /// faster; after the eighteenth session's copies and exponentials, 365 and 274 on an H200 (2026-11-28).
    Wgmma,
    /// The wgmma kernel's tiles and products, warp-specialized (`kernels/attention/prefill_sm90_ws.cu`): a
    /// producer warpgroup fills an mbarrier ring of K / V tiles, two consumer warpgroups take turns on the tensor
    /// cores, and each overlaps its softmax with its own P V. Where the wgmma kernel runs. It gives the wgmma
    /// kernel's bits. The default where the wgmma kernels run: once its producer stopped waiting for each tile to
    /// land before issuing the next (eighteenth session), it ran 4 x 4096 causal prefill at 438 TFLOP/s (d128)
    /// and 328 (d64) on an H200 (2026-11-28, nineteenth session) against the wgmma kernel's 365 and 274 and cuDNN
    /// SDPA's 577 (d128), where it had been 21% slower than the wgmma kernel (216 against 274 at d128). (A third
    /// Hopper form, the wgmma kernel with the overlap inside each warpgroup and no producer, ran 343 and 264 there
    /// and was removed.)
    WgmmaWs,
}

impl crate::ops::cuda::switch::KernelSwitch for PrefillKernel {
    /// `auto` (the default: [`PrefillKernel::WgmmaWs`] where it runs, else [`PrefillKernel::Mma`]), `mma`, `wgmma`
    /// or `wgmma-ws`.
    const ENV: &'static str = "LLAMA32_PREFILL_KERNEL";
    const WHAT: &'static str = "prefill kernel";
    const KERNELS: &'static [Self] = &Self::ALL;

    fn name(self) -> &'static str {
        match self {
            PrefillKernel::Mma => "mma",
            PrefillKernel::Wgmma => "wgmma",
            PrefillKernel::WgmmaWs => "wgmma-ws",
        }
    }

    fn env_cell() -> &'static std::sync::OnceLock<Option<String>> {
        static VALUE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        &VALUE
    }
}

impl PrefillKernel {
    /// Every kernel.
    pub const ALL: [PrefillKernel; 3] = [PrefillKernel::Mma, PrefillKernel::Wgmma, PrefillKernel::WgmmaWs];

    /// The kernel [`paged_prefill`](super::paged_prefill) runs on the stream's device: the forced one, else the
    /// warp-specialized wgmma kernel where it runs ([`supported`](Self::supported)), else the mma kernel.
    pub fn configured(stream: &CudaStream) -> Result<Self> {
        if let Some(kernel) = Self::forced()? {
            return Ok(kernel);
        }
        Ok(if PrefillKernel::WgmmaWs.supported(stream)? { PrefillKernel::WgmmaWs } else { PrefillKernel::Mma })
    }

    /// Whether this kernel runs on the stream's device (wgmma: compute capability 9.x, and a kernels library
    /// built with sm_90a SASS).
    pub fn supported(self, stream: &CudaStream) -> Result<bool> {
        Ok(match self {
            PrefillKernel::Mma => true,
            PrefillKernel::Wgmma | PrefillKernel::WgmmaWs => compute_capability(stream)?.0 == 9 && wgmma_built(),
        })
    }
}

/// Whether the kernels library holds the wgmma prefill's sm_90a SASS (build.rs: `LLAMA32_CUDA_ARCHS` with 90a).
#[cfg(llama32_cuda)]
fn wgmma_built() -> bool {
    // SAFETY: no arguments; reads the current device's compute capability (cached per device).
    unsafe { crate::ops::cuda::ffi::l32_prefill_wgmma_available() != 0 }
}

#[cfg(not(llama32_cuda))]
fn wgmma_built() -> bool {
    false
}

/// The stream's device's compute capability, (major, minor), asked of the driver once per device ordinal (the
/// prefill asks for every call: which kernel, and whether it runs).
pub fn compute_capability(stream: &CudaStream) -> Result<(i32, i32)> {
    use cudarc::driver::sys::CUdevice_attribute::{
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
    };
    static CACHE: std::sync::Mutex<Vec<(usize, (i32, i32))>> = std::sync::Mutex::new(Vec::new());
    let ctx = stream.context();
    let ordinal = ctx.ordinal();
    if let Some(&(_, cc)) = CACHE.lock().ok().as_deref().and_then(|c| c.iter().find(|(o, _)| *o == ordinal)) {
        return Ok(cc);
    }
    let query = |attr| ctx.attribute(attr).map_err(|e| Error::Backend(format!("querying the compute capability: {e}")));
    let cc =
        (query(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?, query(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?);
    if let Ok(mut c) = CACHE.lock() {
        c.push((ordinal, cc));
    }
    Ok(cc)
}

/// The most KV splits the decode kernel takes.
pub const MAX_DECODE_SPLITS: usize = 256;
/// Fewest positions worth a split of their own by default: below this, the merge costs more than the parallelism
/// gains ([`DECODE_SPLIT_ENV`] changes it for an A/B; 1B at batch 1 with 128-192 positions, an H200 measured
/// 0.962 ms a step unsplit against 0.967 split at 64 positions, 2026-11-28).
const MIN_POSITIONS_PER_SPLIT: usize = 256;

/// The environment variable that sets the fewest positions a decode KV split takes (16 to 65536; default 256),
/// read once per process. At batch 1 and short contexts the default leaves one split: 8 CTAs, each walking the
/// whole context tile by tile, which the H100 profile of 2026-11-27 timed at 7 us (1B) and 15 us (3B) a layer at
/// ~140 positions. A smaller value splits such contexts (then a merge kernel runs); an A/B for the benches.
pub const DECODE_SPLIT_ENV: &str = "LLAMA32_DECODE_SPLIT_POSITIONS";

/// [`DECODE_SPLIT_ENV`]'s setting.
static SPLIT_POSITIONS: crate::ops::cuda::EnvCount =
    crate::ops::cuda::EnvCount::new(DECODE_SPLIT_ENV, MIN_POSITIONS_PER_SPLIT, 16..=65536);

/// The fewest positions per decode split in force ([`DECODE_SPLIT_ENV`], default 256); an error names a bad value.
pub fn decode_split_positions() -> Result<usize> {
    SPLIT_POSITIONS.get()
}

/// The number of KV splits for a decode step: enough CTAs (`num_seqs * num_kv_heads * splits`) for about two per
/// SM, but at least 256 positions per split ([`DECODE_SPLIT_ENV`] changes that), at most [`MAX_DECODE_SPLITS`].
///
/// Examples on an H100 (132 SMs), 8 kv heads: batch 64 at 2k context is 512 CTAs already, so 1 split; batch 1 at
/// 16k context: ceil(264 / 8) = 33 splits of about 500 positions; batch 1 at 2k: 8 splits of 256.
pub fn decode_num_splits(layout: &PagedLayout, num_seqs: usize, max_context_len: usize, num_sms: usize) -> usize {
    let ctas = (num_seqs * layout.num_kv_heads).max(1);
    let wanted = (2 * num_sms.max(1)).div_ceil(ctas);
    let min = SPLIT_POSITIONS.or_default();
    let most = (max_context_len / min).clamp(1, MAX_DECODE_SPLITS);
    wanted.clamp(1, most)
}

/// Bytes of workspace [`paged_decode`](super::paged_decode) needs with `num_splits` splits (0 for one split): the splits' f32 partials,
/// then [`DECODE_COUNTER_BYTES`] for the fused merge's counters, which [`paged_decode`](super::paged_decode) takes from the end of the
/// workspace it is given (so that they stay put whatever the step's shape; they must start zeroed, as
/// `alloc_zeros` leaves them, and every launch leaves them zeroed).
pub fn decode_workspace_bytes(layout: &PagedLayout, num_seqs: usize, num_splits: usize) -> usize {
    if num_splits <= 1 {
        return 0;
    }
    4 * num_seqs * layout.num_heads * num_splits * (layout.head_dim + 2) + DECODE_COUNTER_BYTES
}

/// Bytes at the end of a decode workspace kept for the fused merge's counters (one u32 per sequence and kv head):
/// a step with more than `DECODE_COUNTER_BYTES / 4` (sequence, kv head) pairs merges with the merge kernel instead.
pub const DECODE_COUNTER_BYTES: usize = 64 * 1024;

/// The environment variable that picks how decode attention combines its KV splits: `kernel` (the default, as
/// measured: a second, small kernel) or `fused` (the last CTA of each sequence and kv head to finish merges its
/// group, counted on an atomic counter; one launch less per layer, the same bits, but slower: 1B at batch 1 split
/// at 64 positions took 0.995 ms a step against the merge kernel's 0.967 on an H200, 2026-11-28). Read once per
/// process; [`set_decode_fused_merge`] overrides it.
pub const DECODE_MERGE_ENV: &str = "LLAMA32_DECODE_MERGE";

/// The merge [`set_decode_fused_merge`] chose (0: none, the variable's; 1: kernel; 2: fused).
static DECODE_MERGE_SET: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether decode attention merges its splits in the last CTA ([`DECODE_MERGE_ENV`]); an error names a bad value.
pub fn decode_fused_merge() -> Result<bool> {
    static FROM_ENV: std::sync::OnceLock<std::result::Result<bool, String>> = std::sync::OnceLock::new();
    match DECODE_MERGE_SET.load(std::sync::atomic::Ordering::Relaxed) {
        1 => return Ok(false),
        2 => return Ok(true),
        _ => {}
    }
    let parse = |v: &str| match v {
        "" | "kernel" => Some(false),
        "fused" => Some(true),
        _ => None,
    };
    // Nothing to hand to the kernels library: each launch passes the choice in its parameters.
    crate::ops::cuda::switch_from_env(&FROM_ENV, DECODE_MERGE_ENV, "kernel or fused", parse, |_| {})
}

/// Sets how later decode launches merge their splits, process-wide: `Some(true)` fused, `Some(false)` the merge
/// kernel, `None` back to [`DECODE_MERGE_ENV`]. Launches already captured in a CUDA graph keep theirs.
pub fn set_decode_fused_merge(fused: Option<bool>) {
    let v = match fused {
        None => 0,
        Some(false) => 1,
        Some(true) => 2,
    };
    DECODE_MERGE_SET.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// The environment variable that sets the decode kernel's K/V ring: `2` (the default: one tile in flight while the
/// other is used) or `3` (two in flight: 51-53 KB of shared memory per CTA, four CTAs per SM). The same bits either
/// way. On an H200 (2026-11-28, nineteenth session; batch 64, 2k context) the kernel alone went from 0.80 to 1.01
/// of the copy rate at d128 and from 0.88 to 0.93 at d64 with 3 stages; the end-to-end A/B of that run timed
/// windows of fewer sequences than its batch (`llama32 bench`'s `steady_decode_ms_per_step` is the measure for the
/// next one), so the default stays 2. Read once per process; [`set_decode_stages`] overrides it.
pub const DECODE_STAGES_ENV: &str = "LLAMA32_DECODE_STAGES";

/// The decode kernel's ring depth ([`DECODE_STAGES_ENV`], default 2; [`set_decode_stages`]).
static DECODE_STAGES: crate::ops::cuda::EnvCount = crate::ops::cuda::EnvCount::new(DECODE_STAGES_ENV, 2, 2..=3);

/// The decode kernel's ring depth, 2 or 3 ([`DECODE_STAGES_ENV`]); an error names a bad value. Each launch passes
/// it in its parameters.
pub fn decode_stages() -> Result<usize> {
    DECODE_STAGES.get()
}

/// Sets the ring depth of later decode launches, process-wide: `Some(2)` or `Some(3)`, or `None` back to
/// [`DECODE_STAGES_ENV`]. Launches already captured in a CUDA graph keep theirs. Another depth is an error.
pub fn set_decode_stages(stages: Option<usize>) -> Result<()> {
    if DECODE_STAGES.set(stages) {
        return Ok(());
    }
    // Only a depth outside the range is refused.
    let s = stages.unwrap_or_default();
    Err(Error::Request(format!("decode stages: {s} (expected 2 or 3)")))
}

/// The largest [`decode_workspace_bytes`] of any decode step of up to `max_seqs` sequences whose split count comes
/// from [`decode_num_splits`] with these `max_context_len` and `num_sms`: what an executor allocates once.
///
/// Bounded because splits only multiply small batches: `seqs * splits < seqs + 2 * num_sms / num_kv_heads + 1`.
pub fn decode_workspace_bytes_max(
    layout: &PagedLayout,
    max_seqs: usize,
    max_context_len: usize,
    num_sms: usize,
) -> usize {
    (1..=max_seqs)
        .map(|n| decode_workspace_bytes(layout, n, decode_num_splits(layout, n, max_context_len, num_sms)))
        .max()
        .unwrap_or(0)
}

/// Streaming multiprocessors of the stream's device (for [`decode_num_splits`]).
pub fn num_sms(stream: &CudaStream) -> Result<usize> {
    use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
    let n = stream
        .context()
        .attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| Error::Backend(format!("querying the SM count: {e}")))?;
    Ok(n.max(1) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    const L1B: PagedLayout = PagedLayout { num_heads: 32, num_kv_heads: 8, head_dim: 64, block_size: 16 };

    #[test]
    fn prefill_kernel_names_round_trip() {
        for k in PrefillKernel::ALL {
            assert_eq!(PrefillKernel::parse(k.name()).unwrap(), Some(k));
        }
        assert_eq!(PrefillKernel::parse(" auto ").unwrap(), None);
        let e = PrefillKernel::parse("tma").unwrap_err().to_string();
        assert!(e.contains(PrefillKernel::ENV) && e.contains("\"tma\""), "{e}");
    }

    #[test]
    fn split_policy_fills_the_gpu_without_tiny_splits() {
        // The examples of the doc comment (132 SMs, 8 kv heads).
        assert_eq!(decode_num_splits(&L1B, 64, 2048, 132), 1);
        assert_eq!(decode_num_splits(&L1B, 1, 16384, 132), 33);
        assert_eq!(decode_num_splits(&L1B, 1, 2048, 132), 8);
        // Short contexts never split; huge ones stop at the cap.
        assert_eq!(decode_num_splits(&L1B, 1, 100, 132), 1);
        assert_eq!(decode_num_splits(&PagedLayout { num_kv_heads: 1, ..L1B }, 1, 1 << 20, 1000), MAX_DECODE_SPLITS);
        assert_eq!(decode_num_splits(&L1B, 0, 0, 0), 1);
    }

    #[test]
    fn decode_merge_is_set_and_read() {
        if std::env::var_os(DECODE_MERGE_ENV).is_some() {
            eprintln!("skipped: {DECODE_MERGE_ENV} is set");
            return;
        }
        // Only this test sets the merge (the GPU test resets it after itself, in its own binary).
        assert!(!decode_fused_merge().unwrap(), "the merge kernel by default");
        set_decode_fused_merge(Some(true));
        assert!(decode_fused_merge().unwrap());
        set_decode_fused_merge(Some(false));
        assert!(!decode_fused_merge().unwrap());
        set_decode_fused_merge(Some(true));
        set_decode_fused_merge(None);
        assert!(!decode_fused_merge().unwrap(), "None goes back to the variable's");
    }

    #[test]
    fn decode_stages_are_set_and_read() {
        if std::env::var_os(DECODE_STAGES_ENV).is_some() {
            eprintln!("skipped: {DECODE_STAGES_ENV} is set");
            return;
        }
        // Only this test sets the depth in this binary.
        assert_eq!(decode_stages().unwrap(), 2, "the measured ring by default");
        set_decode_stages(Some(3)).unwrap();
        assert_eq!(decode_stages().unwrap(), 3);
        let e = set_decode_stages(Some(4)).unwrap_err().to_string();
        assert!(e.contains("expected 2 or 3"), "{e}");
        assert_eq!(decode_stages().unwrap(), 3, "a refused depth changes nothing");
        set_decode_stages(None).unwrap();
        assert_eq!(decode_stages().unwrap(), 2, "None goes back to the variable's");
    }

    #[test]
    fn workspace_covers_every_split() {
        assert_eq!(decode_workspace_bytes(&L1B, 3, 1), 0);
        assert_eq!(decode_workspace_bytes(&L1B, 3, 4), 4 * 3 * 32 * 4 * 66 + DECODE_COUNTER_BYTES);
        // 132 SMs, 8 kv heads: 1 sequence takes 33 splits, 16 take 3 (48 in all), 32 take 2 (64, the most),
        // 33 and more take 1 (no workspace).
        let max = decode_workspace_bytes_max(&L1B, 256, 131072, 132);
        assert_eq!(max, decode_workspace_bytes(&L1B, 32, 2));
        assert_eq!(decode_workspace_bytes_max(&L1B, 256, 100, 132), 0);
    }
}
