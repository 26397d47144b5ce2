//! Build script: the CUDA kernels and their FFI.
//!
//! With nvcc, every `kernels/**/*.cu` is compiled by nvcc (through the `cc` crate) into one static library, linked
//! with the static CUDA runtime; bindgen turns `kernels/llama32_kernels.h` into `OUT_DIR/kernels.rs` (included by
//! `engine/ops/cuda/ffi.rs`), and `cfg(llama32_cuda)` is set. Without nvcc the crate builds its CPU backend only, and
//! `ops::cuda` compiles to a stub whose entry points return `Error::Backend`.
//!
//! nvcc is looked up in `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, then on `PATH`, then in the project's
//! `.cuda-toolchain/cuda/bin` (made by `scripts/install-cuda-toolchain.sh`).
//!
//! Environment:
//! - `LLAMA32_NO_CUDA=1`: build the CPU backend only, even where nvcc exists.
//! - `LLAMA32_REQUIRE_CUDA=1`: fail instead of falling back to the CPU backend (CI sets it).
//! - `LLAMA32_CUDA_ARCHS`: the SASS targets, default `80,89,90a`; e.g. `90a` for a quick local build for H100/H200.

use std::env;
use std::path::{Path, PathBuf};

/// SASS for A100 (sm_80), L40S/RTX 4090 (sm_89) and H100/H200 (sm_90a, which wgmma/TMA kernels need).
const DEFAULT_ARCHS: &str = "80,89,90a";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(llama32_cuda)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    for var in ["CUDA_HOME", "CUDA_PATH", "LLAMA32_NO_CUDA", "LLAMA32_REQUIRE_CUDA", "LLAMA32_CUDA_ARCHS"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let require = env_flag("LLAMA32_REQUIRE_CUDA");

    if env_flag("LLAMA32_NO_CUDA") {
        if require {
            panic!("LLAMA32_NO_CUDA and LLAMA32_REQUIRE_CUDA are both set: unset one of them");
        }
        println!("cargo::warning=LLAMA32_NO_CUDA is set: building the CPU backend only");
        return;
    }
    let Some(nvcc) = find_nvcc(&root) else {
        let how = "install the pinned toolchain with scripts/install-cuda-toolchain.sh, \
                   or set CUDA_HOME to a CUDA 13 toolkit, then rebuild";
        if require {
            panic!("LLAMA32_REQUIRE_CUDA is set but nvcc was not found: {how}");
        }
        println!("cargo::warning=nvcc not found: building the CPU backend only ({how})");
        return;
    };
    let cuda = cuda_root(&nvcc);
    let archs = Archs::from_env();
    if archs.narrowed {
        println!("cargo::warning=LLAMA32_CUDA_ARCHS narrows the kernels to {:?}: not for a release bundle", archs.sass);
    }
    compile_kernels(&root, &nvcc, &cuda, &archs);
    link_cudart(&cuda);
    generate_bindings(&root);
    println!("cargo::rustc-cfg=llama32_cuda");
}

/// True when `var` is set to anything but "", "0", "false" or "no".
fn env_flag(var: &str) -> bool {
    env::var(var).is_ok_and(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false" | "no"))
}

/// The first nvcc of: `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `PATH`, `<project>/.cuda-toolchain/cuda/bin`.
fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let from_homes = ["CUDA_HOME", "CUDA_PATH"]
        .into_iter()
        .filter_map(env::var_os)
        .map(|home| PathBuf::from(home).join("bin").join("nvcc"));
    let from_path = env::var_os("PATH").into_iter().flat_map(|p| env::split_paths(&p).collect::<Vec<_>>());
    let from_path = from_path.map(|dir| dir.join("nvcc"));
    let bundled = std::iter::once(root.join(".cuda-toolchain/cuda/bin/nvcc"));
    from_homes.chain(from_path).chain(bundled).find(|p| p.is_file())
}

/// `<cuda>` for `<cuda>/bin/nvcc`, following symlinks (Debian's /usr/bin/nvcc, the toolchain's `cuda` link).
fn cuda_root(nvcc: &Path) -> PathBuf {
    let real = nvcc.canonicalize().unwrap_or_else(|_| nvcc.to_path_buf());
    real.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| panic!("{}: no <cuda>/bin", real.display()))
}

/// The gencode targets.
struct Archs {
    /// SASS targets such as "80" or "90a".
    sass: Vec<String>,
    /// The virtual architecture shipped as PTX, if any.
    ptx: Option<String>,
    /// True when LLAMA32_CUDA_ARCHS changed the default list.
    narrowed: bool,
}

impl Archs {
    /// Parses LLAMA32_CUDA_ARCHS ("80,89,90a"; "sm_" prefixes and spaces allowed) or takes the default.
    ///
    /// PTX goes with the lowest arch that is not arch-specific (no "a"/"f" suffix): compute_80 by default. A driver
    /// can JIT that PTX for GPUs newer than every SASS target (Blackwell sm_100/sm_120), while compute_90a PTX runs
    /// only on sm_90a itself, where the SASS already is.
    fn from_env() -> Archs {
        let spec = env::var("LLAMA32_CUDA_ARCHS").ok().filter(|s| !s.trim().is_empty());
        let narrowed = spec.is_some();
        let spec = spec.unwrap_or_else(|| DEFAULT_ARCHS.to_string());
        let mut sass: Vec<String> = Vec::new();
        for item in spec.split([',', ' ', ';']).map(str::trim).filter(|s| !s.is_empty()) {
            let arch = item.trim_start_matches("sm_").trim_start_matches("compute_").to_ascii_lowercase();
            let digits = arch.trim_end_matches(['a', 'f']);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || arch.len() - digits.len() > 1 {
                panic!("LLAMA32_CUDA_ARCHS: `{item}` is not an arch like 80, 89 or 90a");
            }
            if !sass.contains(&arch) {
                sass.push(arch);
            }
        }
        if sass.is_empty() {
            panic!("LLAMA32_CUDA_ARCHS names no arch");
        }
        let number = |a: &String| a.trim_end_matches(['a', 'f']).parse::<u32>().unwrap_or(u32::MAX);
        let ptx = sass.iter().filter(|a| a.bytes().all(|b| b.is_ascii_digit())).min_by_key(|a| number(a)).cloned();
        Archs { sass, ptx, narrowed }
    }

    /// The nvcc `-gencode` arguments.
    fn gencode_flags(&self) -> Vec<String> {
        let mut flags: Vec<String> =
            self.sass.iter().map(|a| format!("-gencode=arch=compute_{a},code=sm_{a}")).collect();
        if let Some(a) = &self.ptx {
            flags.push(format!("-gencode=arch=compute_{a},code=compute_{a}"));
        }
        // The wgmma kernels exist only in sm_90a SASS; without it their launchers refuse (L32_UNSUPPORTED) rather
        // than launch a body that traps.
        if self.sass.iter().any(|a| a == "90a") {
            flags.push("-DL32_SASS_SM90A=1".into());
        }
        flags
    }
}

/// Every `.cu` under `dir`, sorted, so the archive is the same from build to build.
fn cuda_sources(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        for entry in entries {
            let path = entry.unwrap_or_else(|e| panic!("{}: {e}", d.display())).path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "cu") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Compiles the kernels into `libllama32_kernels.a` (and tells cargo to link it).
///
/// Each `.cu` is its own translation unit with whole-program device code: cc switches to relocatable device code
/// (`--device-c` plus an nvlink step) as soon as one `Build` holds two `.cu` files, which would change how kernels
/// register with the runtime and how the PTX can be JIT-compiled. So every file gets its own `Build`, compiled to an
/// object on a worker thread (files in parallel, up to cargo's job count), and one last `Build` archives them.
fn compile_kernels(root: &Path, nvcc: &Path, cuda: &Path, archs: &Archs) {
    let kernels = root.join("kernels");
    let sources = cuda_sources(&kernels);
    if sources.is_empty() {
        panic!("{}: no .cu files", kernels.display());
    }
    // cc runs the nvcc named by $NVCC; the build script has no other thread yet.
    env::set_var("NVCC", nvcc);
    let jobs = env::var("NUM_JOBS").ok().and_then(|j| j.parse::<usize>().ok()).unwrap_or(1).max(1);
    let workers = jobs.min(sources.len());
    // Spare jobs go to nvcc, which compiles the gencode targets of one file in parallel.
    let gencodes = archs.sass.len() + usize::from(archs.ptx.is_some());
    let threads = (jobs / workers).clamp(1, gencodes);

    let mut base = cc::Build::new();
    base.cuda(true)
        .cudart("none") // linked by link_cudart(): cc looks for it only under <cuda>/targets/<arch>-linux/lib
        .debug(false) // cc turns debug into nvcc -G, which disables device-code optimization
        .opt_level(3)
        .std("c++17")
        .include(&kernels)
        .flag("--expt-relaxed-constexpr")
        .flag("-lineinfo") // source lines for ncu and compute-sanitizer; no effect on the generated code
        .flag(format!("--threads={threads}"));
    let cccl = cuda.join("include").join("cccl");
    if cccl.is_dir() {
        base.include(cccl);
    }
    for flag in archs.gencode_flags() {
        base.flag(flag);
    }

    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<(usize, Result<Vec<PathBuf>, String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(src) = sources.get(i) else { break done };
                        let compiled = base.clone().file(src).try_compile_intermediates().map_err(|e| e.to_string());
                        done.push((i, compiled));
                    }
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a kernel compile thread panicked")).collect()
    });
    let mut objects = vec![Vec::new(); sources.len()];
    let mut failures = Vec::new();
    for (i, result) in results {
        match result {
            Ok(objs) => objects[i] = objs,
            Err(e) => failures.push(format!("{}: {e}", sources[i].display())),
        }
    }
    if !failures.is_empty() {
        panic!("nvcc failed:\n{}", failures.join("\n"));
    }
    cc::Build::new().cpp(true).cpp_link_stdlib("stdc++").objects(objects.concat()).compile("llama32_kernels");
}

/// Links the static CUDA runtime and the system libraries it needs.
fn link_cudart(cuda: &Path) {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let candidates = [
        cuda.join("lib64"),
        cuda.join("lib"),
        cuda.join("targets").join(format!("{arch}-linux")).join("lib"),
        PathBuf::from(format!("/usr/lib/{arch}-linux-gnu")),
    ];
    let Some(dir) = candidates.iter().find(|d| d.join("libcudart_static.a").is_file()) else {
        panic!(
            "libcudart_static.a not found next to {} (looked in {candidates:?}); \
             reinstall the toolchain with scripts/install-cuda-toolchain.sh or set CUDA_HOME",
            cuda.display()
        );
    };
    println!("cargo::rustc-link-search=native={}", dir.display());
    println!("cargo::rustc-link-lib=static=cudart_static");
    for lib in ["rt", "dl", "pthread"] {
        println!("cargo::rustc-link-lib=dylib={lib}");
    }
}

/// bindgen over kernels/llama32_kernels.h (plain C, so no CUDA headers) into OUT_DIR/kernels.rs.
fn generate_bindings(root: &Path) {
    let header = root.join("kernels").join("llama32_kernels.h");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("kernels.rs");
    println!("cargo::rerun-if-env-changed=LIBCLANG_PATH");
    // bindgen panics ("Unable to find libclang") when it cannot load libclang: add the remedy to that message.
    let generated = std::panic::catch_unwind(|| {
        bindgen::Builder::default()
            .header(header.to_string_lossy())
            .allowlist_function("l32_.*")
            .allowlist_type("l32_.*")
            .newtype_enum("l32_.*")
            .derive_default(true)
            .derive_debug(true)
            .generate_comments(true)
            .generate()
    });
    let bindings = match generated {
        Ok(Ok(bindings)) => bindings,
        Ok(Err(e)) => panic!("bindgen on {}: {e}", header.display()),
        Err(_) => panic!(
            "bindgen needs libclang and could not load it (see the message above): install it \
             (Debian/Ubuntu: apt-get install libclang-dev) or set LIBCLANG_PATH to the folder holding libclang.so; \
             or build the CPU backend only with LLAMA32_NO_CUDA=1"
        ),
    };
    bindings.write_to_file(&out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
}
