//! CUDA backend: safe wrappers over the kernels in `kernels/*.cu`, one module per kernel family.
//!
//! A family's launcher is declared once in `kernels/llama32_kernels.h` (`l32_<family>_params` plus
//! `l32_<family>(params, stream)`); bindgen turns the header into the private `ffi` module at build time. The wrapper
//! here checks every length and shape before it launches, so a kernel never sees a malformed argument, and maps the
//! launcher's `l32_status` to [`Error::Backend`]. Each family has a CPU twin with the same name and arguments in
//! [`crate::ops::cpu`]; `tests/cuda_kernels.rs` runs both on fresh random inputs and compares them.
//!
//! Memory and streams are cudarc's: wrappers take a [`cudarc::driver::CudaStream`] and device slices
//! ([`cudarc::driver::CudaSlice`] or views), enqueue the kernel on that stream and return without synchronizing.
//!
//! In a build without nvcc (or with `LLAMA32_NO_CUDA=1`, see `build.rs`) this module is a stub:
//! [`is_available`] is false and every wrapper returns `Error::Backend("built without CUDA ...")`.

pub mod activation;
pub mod attention;
pub mod decode_layers;
pub mod embedding;
pub mod encoder_attention;
#[cfg(llama32_cuda)]
mod ffi;
pub mod gather_attention;
pub mod gemv;
pub mod logprobs;
pub mod norm;
pub mod quant;
pub mod rope;
pub mod sampling;
pub mod switch;
pub mod timing;
pub mod vision;

use std::sync::{Arc, OnceLock};

use cudarc::driver::CudaStream;

use crate::{Error, Result};

/// The oldest driver API the static CUDA 13.0 runtime linked into the kernels works with.
const MIN_DRIVER_VERSION: i32 = 13000;

/// True when this binary was built with its CUDA kernels (nvcc was found at build time).
pub fn built_with_cuda() -> bool {
    cfg!(llama32_cuda)
}

/// True when the kernels are built in and a CUDA driver with at least one device is present.
///
/// Never panics, even where `libcuda.so` is missing (cudarc's loader would). Probed once per process.
pub fn is_available() -> bool {
    probe().is_ok()
}

/// Why CUDA cannot be used here, or `Ok(())` when [`is_available`]: a build without CUDA, no driver library,
/// a driver older than CUDA 13.0, or no device. Probed once per process.
pub fn probe() -> Result<()> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(probe_uncached).clone().map_err(Error::Backend)
}

fn probe_uncached() -> Result<(), String> {
    if !built_with_cuda() {
        return Err(NOT_BUILT.into());
    }
    // SAFETY: only tries to dlopen the driver library by its usual names; nothing is called through it.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no CUDA driver: libcuda.so was not found (is the NVIDIA driver installed?)".into());
    }
    // cudarc panics when a driver symbol is missing: contain that, and keep the panic message off stderr.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let probed = std::panic::catch_unwind(|| {
        let count = cudarc::driver::CudaContext::device_count().map_err(|e| format!("cuInit failed: {e}"))?;
        let mut version = 0i32;
        // SAFETY: cuInit succeeded above; the call writes one int.
        let status = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
        if status != cudarc::driver::sys::cudaError_enum::CUDA_SUCCESS {
            return Err(format!("cuDriverGetVersion failed: {status:?}"));
        }
        Ok((count, version))
    });
    std::panic::set_hook(hook);
    let (count, version) = probed.map_err(|_| "the CUDA driver library is incomplete (a symbol is missing)")??;
    if version < MIN_DRIVER_VERSION {
        return Err(format!(
            "the CUDA driver supports CUDA {}.{}, the kernels need 13.0 or newer: update the NVIDIA driver",
            version / 1000,
            version % 1000 / 10
        ));
    }
    if count < 1 {
        return Err("the CUDA driver reports no device".into());
    }
    Ok(())
}

/// The switch an environment variable's trimmed, lower-case value names: `0`, `off`, `false` (off) or `1`, `on`,
/// `true` (on); `None` for anything else, which each variable's reader handles (its default, or an error).
pub(crate) fn on_off(value: &str) -> Option<bool> {
    match value {
        "0" | "off" | "false" => Some(false),
        "1" | "on" | "true" => Some(true),
        _ => None,
    }
}

/// A count read once per process from an environment variable: `default` when unset or blank, else a number in
/// `range`; anything else is an error naming the variable and the range. Each setting is a `static` of its own.
/// [`EnvCount::set`] overrides the variable in process (tests and A/Bs).
pub(crate) struct EnvCount {
    var: &'static str,
    default: usize,
    range: std::ops::RangeInclusive<usize>,
    value: std::sync::OnceLock<std::result::Result<usize, String>>,
    /// The value [`EnvCount::set`] put in force, or `usize::MAX` for none (the variable's).
    set: std::sync::atomic::AtomicUsize,
}

impl EnvCount {
    /// The setting of `var`, read on first use.
    pub(crate) const fn new(var: &'static str, default: usize, range: std::ops::RangeInclusive<usize>) -> Self {
        EnvCount {
            var,
            default,
            range,
            value: std::sync::OnceLock::new(),
            set: std::sync::atomic::AtomicUsize::new(usize::MAX),
        }
    }

    /// Puts `value` in force over the variable, process-wide (`None`: back to the variable's). A value outside the
    /// range changes nothing and returns false.
    pub(crate) fn set(&self, value: Option<usize>) -> bool {
        if value.is_some_and(|v| !self.range.contains(&v)) {
            return false;
        }
        self.set.store(value.unwrap_or(usize::MAX), std::sync::atomic::Ordering::Relaxed);
        true
    }

    fn read(&self) -> std::result::Result<usize, String> {
        match self.set.load(std::sync::atomic::Ordering::Relaxed) {
            usize::MAX => self.env_value().clone(),
            set => Ok(set),
        }
    }

    fn env_value(&self) -> &std::result::Result<usize, String> {
        self.value.get_or_init(|| match std::env::var(self.var) {
            Err(_) => Ok(self.default),
            Ok(v) if v.trim().is_empty() => Ok(self.default),
            Ok(v) => match v.trim().parse::<usize>() {
                Ok(n) if self.range.contains(&n) => Ok(n),
                _ => {
                    Err(format!("{}: {v:?} is not a count in {}..={}", self.var, self.range.start(), self.range.end()))
                }
            },
        })
    }

    /// The count in force; a bad value is an error that names the variable.
    pub(crate) fn get(&self) -> Result<usize> {
        self.read().map_err(Error::Request)
    }

    /// The count in force, or the default where the value is bad (which every kernel call refuses through
    /// [`ensure_built`]).
    pub(crate) fn or_default(&self) -> usize {
        self.read().unwrap_or(self.default)
    }
}

/// What every entry point says in a build without the kernels.
const NOT_BUILT: &str = "built without CUDA: nvcc was not found at build time, or LLAMA32_NO_CUDA was set; \
                         install the toolchain with scripts/install-cuda-toolchain.sh (or set CUDA_HOME) and rebuild";

/// `Ok` in a CUDA build (the first call also applies [`PDL_ENV`]); the "built without CUDA" error in a stub build.
pub(crate) fn ensure_built() -> Result<()> {
    if built_with_cuda() {
        pdl_from_env()?;
        gemv_prefetch_whole()?;
        attention::decode_split_positions()?;
        quant::w4a16_blocks_per_sm()?;
        quant::w4a16_chunk_mib()?;
        quant::large_min_m()?;
        quant::large_splits_setting()?;
        quant::quant_prewait()?;
        quant::w4a16_bulk_variant().map(|_| ())
    } else {
        Err(Error::Backend(NOT_BUILT.into()))
    }
}

/// The environment variable that switches programmatic dependent launch off for the whole process: `0` (or `off`,
/// `false`); `1`, `on`, `true` or unset leave it on (the default since the H200 run of 2026-11-27: 1B batch-1
/// decode 1.113 -> 1.033 ms/step, batch 64 2.784 -> 2.328, bit for bit the same logits). Read once, at the first
/// kernel call; it only changes launches on compute capability 9.x.
pub const PDL_ENV: &str = "LLAMA32_PDL";

/// Applies [`PDL_ENV`] once per process; a value it does not know is an error naming the variable, every time.
fn pdl_from_env() -> Result<()> {
    static APPLIED: std::sync::OnceLock<std::result::Result<bool, String>> = std::sync::OnceLock::new();
    switch_from_env(&APPLIED, PDL_ENV, "1 or 0", on_unless_off, set_programmatic_launch_raw).map(|_| ())
}

/// The parse of a switch that is on by default: unset (empty) is on, else [`on_off`].
fn on_unless_off(value: &str) -> Option<bool> {
    if value.is_empty() {
        Some(true)
    } else {
        on_off(value)
    }
}

/// A process-wide on / off switch read from the environment variable `env` once (`cell` keeps the outcome):
/// `parse` maps its trimmed, lower-cased value (empty when unset) to on or off, or `None` for a value it does not
/// know, which is an error naming the variable and the `expected` values, every time. The first read hands the
/// value to `apply` (the kernels library's setter, where the switch lives there).
fn switch_from_env(
    cell: &'static std::sync::OnceLock<std::result::Result<bool, String>>,
    env: &str,
    expected: &str,
    parse: fn(&str) -> Option<bool>,
    apply: fn(bool),
) -> Result<bool> {
    let applied = cell.get_or_init(|| {
        let value = std::env::var(env).unwrap_or_default();
        let value = value.trim().to_ascii_lowercase();
        let on = parse(&value).ok_or_else(|| format!("{env}: unknown value {value:?} (expected {expected})"))?;
        apply(on);
        Ok(on)
    });
    applied.clone().map_err(Error::Request)
}

/// The environment variable that picks what a bf16 skinny GEMM block asks L2 for before it waits for the previous
/// kernel: `first` (the default: each lane's first step, 32 KB a block at k >= 1024) or `whole` (the block's 16
/// weight rows whole, one bulk prefetch per row; Hopper only, and not with the norm prologue). Under programmatic
/// dependent launch `whole` moves more of a small projection's weights (1B qkv and o: 12.6 and 8.4 MB) in while the
/// norm or attention kernel before it runs. The same results either way; the default kernels keep their code (a
/// template argument picks the other one). Measured slower: 1B batch-1 decode took 1.025 ms a step with `whole`
/// against 0.962 with `first` (H200, 2026-11-28). Read once per process.
pub const GEMV_PREFETCH_ENV: &str = "LLAMA32_GEMV_PREFETCH";

/// Applies [`GEMV_PREFETCH_ENV`] once per process and returns whether `whole` is on; a value it does not know is an
/// error naming the variable, every time.
pub fn gemv_prefetch_whole() -> Result<bool> {
    static APPLIED: std::sync::OnceLock<std::result::Result<bool, String>> = std::sync::OnceLock::new();
    let parse = |v: &str| match v {
        "" | "first" => Some(false),
        "whole" => Some(true),
        _ => None,
    };
    switch_from_env(&APPLIED, GEMV_PREFETCH_ENV, "first or whole", parse, set_gemv_prefetch_whole_raw)
}

/// Switches the bf16 skinny GEMM's whole-row L2 prefetch ([`GEMV_PREFETCH_ENV`]) on or off for every later launch,
/// process-wide (it overrides the variable; launches already captured in a CUDA graph keep theirs). The same
/// results either way (the GPU test `cuda_golden::cuda_gemv_whole_prefetch_changes_no_bit` checks it).
pub fn set_gemv_prefetch_whole(enabled: bool) -> Result<()> {
    ensure_built()?;
    set_gemv_prefetch_whole_raw(enabled);
    Ok(())
}

/// True when the whole-row prefetch is on (see [`set_gemv_prefetch_whole`]).
pub fn gemv_prefetch_whole_on() -> bool {
    #[cfg(llama32_cuda)]
    {
        // SAFETY: reads an int from the kernels library's process-wide atomic.
        unsafe { ffi::l32_gemv_prefetch_whole() != 0 }
    }
    #[cfg(not(llama32_cuda))]
    {
        false
    }
}

#[cfg(llama32_cuda)]
fn set_gemv_prefetch_whole_raw(enabled: bool) {
    // SAFETY: stores an int in the kernels library's process-wide atomic; no pointers.
    unsafe { ffi::l32_set_gemv_prefetch_whole(i32::from(enabled)) }
}

#[cfg(not(llama32_cuda))]
fn set_gemv_prefetch_whole_raw(_enabled: bool) {}

#[cfg(llama32_cuda)]
fn set_programmatic_launch_raw(enabled: bool) {
    // SAFETY: stores an int in the kernels library's process-wide atomic; no pointers.
    unsafe { ffi::l32_set_programmatic_launch(i32::from(enabled)) }
}

#[cfg(not(llama32_cuda))]
fn set_programmatic_launch_raw(_enabled: bool) {}

/// Switches programmatic dependent launch (PDL, Hopper sm_90) on or off for every later kernel launch of this
/// library, process-wide (it overrides [`PDL_ENV`]). With it on, a kernel's launch and CTA ramp overlap the tail of
/// the previous kernel in its stream; every kernel waits for that kernel (`griddepcontrol.wait`) before it touches
/// memory, so results are bit for bit the same (the GPU test `cuda_golden` checks this). Launches already
/// captured in a CUDA graph keep the mode they were captured with. Other devices keep ordinary launches (newer
/// ones run this library's compute_80 PTX, which lacks the wait).
pub fn set_programmatic_launch(enabled: bool) -> Result<()> {
    ensure_built()?;
    set_programmatic_launch_raw(enabled);
    Ok(())
}

/// True when programmatic dependent launch is on (see [`set_programmatic_launch`]).
pub fn programmatic_launch() -> bool {
    #[cfg(llama32_cuda)]
    {
        // SAFETY: reads an int from the kernels library's process-wide atomic.
        unsafe { ffi::l32_programmatic_launch() != 0 }
    }
    #[cfg(not(llama32_cuda))]
    {
        false
    }
}

/// A per-thread override of a launch heuristic (the gemv warp count, the W4A16 K splits), for A/B timings and for
/// tests that compare kernels cutting the work the same way.
pub(crate) type ThreadOverride = std::thread::LocalKey<std::cell::Cell<Option<usize>>>;

/// Runs `f` with `cell` holding `Some(value)` on this thread, then restores what it held (also when `f` panics).
pub(crate) fn with_override<R>(cell: &'static ThreadOverride, value: usize, f: impl FnOnce() -> R) -> R {
    struct Restore(&'static ThreadOverride, Option<usize>);
    impl Drop for Restore {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(cell, cell.with(|c| c.replace(Some(value))));
    f()
}

/// Checks that every operand lives on the device of `stream`, before any pointer is taken.
pub(crate) fn check_same_device(op: &str, stream: &CudaStream, operands: &[(&str, &Arc<CudaStream>)]) -> Result<()> {
    let ordinal = stream.context().ordinal();
    for (name, s) in operands {
        if s.context().ordinal() != ordinal {
            return Err(Error::Backend(format!(
                "{op}: `{name}` is on device {} but the stream is on device {ordinal}",
                s.context().ordinal()
            )));
        }
    }
    Ok(())
}

/// The stream as the launchers take it, with its context made current on this thread (the CUDA runtime launches
/// into the current context).
#[cfg(llama32_cuda)]
fn raw_stream(op: &str, stream: &CudaStream) -> Result<*mut std::ffi::c_void> {
    stream.context().bind_to_thread().map_err(|e| Error::Backend(format!("{op}: binding the CUDA context: {e}")))?;
    Ok(stream.cu_stream().cast())
}

/// After a launch on `stream`: the launcher's status ([`check_status`]), then any pending error of the stream's
/// context, named by `op`.
#[cfg(llama32_cuda)]
fn check_launch(op: &str, stream: &CudaStream, status: ffi::l32_status, what: impl FnOnce() -> String) -> Result<()> {
    check_status(status, what)?;
    stream.context().check_err().map_err(|e| Error::Backend(format!("{op}: {e}")))
}

/// Maps a launcher's status to a `Result`; `what` describes the call ("rms_norm (rows 7, hidden 4096)").
#[cfg(llama32_cuda)]
fn check_status(status: ffi::l32_status, what: impl FnOnce() -> String) -> Result<()> {
    let reason = match status {
        ffi::l32_status::L32_OK => return Ok(()),
        ffi::l32_status::L32_INVALID_ARGUMENT => "invalid argument".to_string(),
        ffi::l32_status::L32_UNSUPPORTED => "unsupported by the kernel".to_string(),
        ffi::l32_status::L32_LAUNCH_FAILED => {
            // SAFETY: returns a static, NUL-terminated string owned by this thread's slot in the kernels library.
            let msg = unsafe { std::ffi::CStr::from_ptr(ffi::l32_last_cuda_error()) };
            format!("launch failed: {}", msg.to_string_lossy())
        }
        other => format!("unknown status {}", other.0),
    };
    Err(Error::Backend(format!("{}: {reason}", what())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `.cu` / `.cuh` under `dir`, recursively.
    fn cuda_sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                cuda_sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "cu" || e == "cuh") {
                out.push(path);
            }
        }
    }

    /// The body of the function whose definition starts at `start` (from its first `{` after the parameter list to
    /// the matching `}`).
    fn body_at(src: &str, start: usize) -> &str {
        let bytes = src.as_bytes();
        // The parameter list: the parenthesised group followed by `{`.
        let mut i = start;
        loop {
            let open = i + src[i..].find('(').expect("a parameter list");
            let mut depth = 0;
            let mut j = open;
            loop {
                match bytes[j] {
                    b'(' => depth += 1,
                    b')' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            if src[j + 1..].trim_start().starts_with('{') {
                i = j + 1 + src[j + 1..].find('{').unwrap();
                break;
            }
            i = j + 1;
        }
        let mut depth = 0;
        for (k, &b) in bytes.iter().enumerate().skip(i) {
            match b {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        return &src[i..=k];
                    }
                }
                _ => {}
            }
        }
        panic!("unbalanced braces after byte {start}");
    }

    /// Programmatic dependent launch is only safe because every kernel waits for the previous one
    /// (`pdl_begin`) before it touches memory a kernel may have written, and because every launch goes through
    /// `launch_kernel` (which sets the attribute): a new kernel that forgets either fails here, without a GPU.
    #[test]
    fn every_kernel_waits_under_pdl_and_launches_through_launch_kernel() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut files = Vec::new();
        cuda_sources(&dir, &mut files);
        let mut kernels = 0;
        for file in &files {
            let src = std::fs::read_to_string(file).unwrap();
            let name = file.strip_prefix(&dir).unwrap().display().to_string();
            if name != "common/launch.cuh" {
                assert!(!src.contains("<<<"), "{name}: launch through launch_kernel, not <<<...>>>");
            }
            let mut from = 0;
            while let Some(at) = src[from..].find("__global__") {
                let start = from + at;
                let body = body_at(&src, start);
                let wait = body.find("pdl_begin();");
                assert!(wait.is_some(), "{name}: the kernel at byte {start} never calls pdl_begin()");
                // Before the wait, only the streaming kernels' weight prefetches and weight copies may touch memory
                // (prefetch_l2*, w4a16_prewait, the bulk kernel's fill, stage_weights, stage_weights_sm90): none of
                // these names holds a banned word, and a load of anything else would.
                let before = &body[..wait.unwrap_or(0)];
                for banned in ["ld_", "load_", "__ldg", "cp_async", "store_", "atomic", "out["] {
                    assert!(!before.contains(banned), "{name}: `{banned}` before pdl_begin() at byte {start}");
                }
                kernels += 1;
                from = start + body.len().max(1);
            }
        }
        assert!(kernels >= 24, "found only {kernels} kernels under {}", dir.display());
    }

    #[test]
    fn probe_never_panics_and_agrees_with_is_available() {
        assert_eq!(probe().is_ok(), is_available());
        if !built_with_cuda() {
            let err = probe().unwrap_err().to_string();
            assert!(err.contains("built without CUDA"), "{err}");
        }
    }
}
