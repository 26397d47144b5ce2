# Sourced by scripts/gpu-suite.sh (its $root, $bundle and GPU_TESTS): `build` (here: the release binary, the GPU
# test binary and the criterion benches into gpu-bundle/ and gpu-bundle.tar.xz), and, on the device machine,
# unpack_bundle, nccl_setup and `run-tp` (the tensor-parallel tests alone).
# shellcheck shell=bash

build() {
  cd "$root"
  # The lent devices are H100/H200 (sm_90a). An all-arch bundle (sm_80/89/90a) is over the device tool's 64 MiB
  # carry limit, so the bundle holds sm_90a only unless LLAMA32_CUDA_ARCHS says otherwise. CI builds every arch.
  export LLAMA32_CUDA_ARCHS="${LLAMA32_CUDA_ARCHS:-90a}"
  echo "building the GPU bundle for LLAMA32_CUDA_ARCHS=$LLAMA32_CUDA_ARCHS" >&2
  cargo build --release --bin llama32
  local args=() t
  for t in "${GPU_TESTS[@]}"; do args+=(--test "$t"); done
  local json
  json=$(mktemp)
  trap 'rm -f "$json"' RETURN
  cargo test --release --no-run --message-format=json "${args[@]}" >"$json"

  rm -rf "$bundle"
  mkdir -p "$bundle/bin" "$bundle/tests"
  cp target/release/llama32 "$bundle/bin/llama32"
  # One line per test executable: "<target name> <path>".
  local name exe found=0
  while read -r name exe; do
    # grep reads all of nm's output (no -q): with pipefail, an early exit would fail nm with SIGPIPE.
    if ! nm "$exe" 2>/dev/null | grep -E ' T l32_[a-z_]+$' >/dev/null; then
      echo "error: $exe has no CUDA kernels: this build found no nvcc (see scripts/install-cuda-toolchain.sh)" >&2
      exit 1
    fi
    cp "$exe" "$bundle/tests/$name"
    found=$((found + 1))
  done < <(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
' "$json")
  if ((found != ${#GPU_TESTS[@]})); then
    echo "error: expected ${#GPU_TESTS[@]} test binaries (${GPU_TESTS[*]}), found $found" >&2
    exit 1
  fi
  # The criterion benches of the CUDA kernel families (bench/cuda_kernels.rs).
  mkdir -p "$bundle/bench"
  local bench_exe
  bench_exe=$(cargo bench --no-run --message-format=json --bench cuda_kernels 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["executable"])
' | tail -1)
  if [[ -z $bench_exe ]]; then
    echo "error: the cuda_kernels bench did not build" >&2
    exit 1
  fi
  cp "$bench_exe" "$bundle/bench/cuda_kernels"
  strip "$bundle"/bin/* "$bundle"/tests/* "$bundle"/bench/*
  # The commit, with "+dirty" when tracked files differ from it (the binaries were built from that tree).
  local rev
  rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [[ $rev != unknown ]] && ! git -C "$root" diff --quiet HEAD -- 2>/dev/null; then rev+="+dirty"; fi
  echo "$rev" >"$bundle/REVISION"
  echo "gpu-bundle/ ($(du -sh "$bundle" | cut -f1)):"
  (cd "$bundle" && ls -l bin tests | grep -v '^total')
  # The binaries (about 59 MB with the working tree's 13 MB) exceed the device tool's 64 MiB; xz packs them to ~13 MB
  # and `run` unpacks them on the device (a few seconds).
  tar -C "$root" -cf - gpu-bundle | xz -T0 -6 >"$root/gpu-bundle.tar.xz"
  echo "gpu-bundle.tar.xz: $(du -sh "$root/gpu-bundle.tar.xz" | cut -f1)"
  echo "next: run(command=\"scripts/gpu-suite.sh run\", carry=[\"gpu-bundle.tar.xz\"])"
}

# On the device machine: unpack gpu-bundle.tar.xz over any gpu-bundle/ a warm machine kept from an earlier call
# (carry the tarball, not the folder, so the two never disagree).
unpack_bundle() {
  if [[ -f "$root/gpu-bundle.tar.xz" ]]; then
    rm -rf "$bundle"
    tar -C "$root" -xJf "$root/gpu-bundle.tar.xz"
    echo "unpacked gpu-bundle.tar.xz (revision $(cat "$bundle/REVISION" 2>/dev/null || echo unknown))"
  fi
}

# NCCL for the tensor-parallel tests: cudarc loads `libnccl.so` (or `libnccl.so.<major>`), not the runtime's
# `libnccl.so.2`. Where only the latter exists (libnccl2 without libnccl-dev, or the NCCL wheel that comes with
# PyTorch), link it as libnccl.so in a temporary folder put first on LD_LIBRARY_PATH.
nccl_setup() {
  local so="" d link
  if ldconfig -p 2>/dev/null | grep -E 'libnccl\.so( |\.13 )' >/dev/null; then return 0; fi
  so=$(ldconfig -p 2>/dev/null | awk '/libnccl\.so\.2 / {print $NF; exit}')
  if [[ -z $so ]] && command -v python3 >/dev/null; then
    d=$(python3 -c 'import os, nvidia.nccl as m; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null || true)
    if [[ -n $d && -e $d/libnccl.so.2 ]]; then so="$d/libnccl.so.2"; fi
  fi
  if [[ -z $so ]]; then
    echo "note: no libnccl.so.2 found: the NCCL tests will report SKIP" >&2
    return 0
  fi
  link=$(mktemp -d)
  ln -sf "$so" "$link/libnccl.so"
  export LD_LIBRARY_PATH="$link${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "NCCL: $so (as $link/libnccl.so)" >&2
}

# The tensor-parallel device checks only: every cuda_tp test of the gpu binary, then their figure lines.
run_tp() {
  cd "$root"
  unpack_bundle
  local exe="$bundle/tests/gpu" logs="${OUT:+$OUT/gpu-suite}" t log rc status failed=0 rows=()
  logs="${logs:-$bundle/logs}"
  mkdir -p "$logs"
  [[ -x $exe ]] || { echo "error: $exe missing: build it with scripts/gpu-suite.sh and carry gpu-bundle.tar.xz" >&2; exit 2; }
  export RUST_BACKTRACE=1 LLAMA32_GOLDEN_DIR="$root/tests/golden"
  nccl_setup
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1 || true
  while read -r t; do
    [[ -n $t ]] || continue
    log="$logs/gpu.$t.log"
    rc=0
    timeout 300 "$exe" --exact "$t" --nocapture --test-threads=1 >"$log" 2>&1 || rc=$?
    if ((rc != 0)); then status=FAIL; elif grep -q 'skipped:' "$log"; then status=SKIP; else status=PASS; fi
    if [[ $status != PASS ]]; then
      failed=$((failed + 1))
      echo "---- $status $t"
      tail -n 15 "$log"
    fi
    rows+=("$(printf '%-4s  %s' "$status" "$t")")
  done < <("$exe" --list --format=terse 2>/dev/null | sed -n 's/: test$//p' | grep '^cuda_tp::')
  grep -h '^cuda-tp ' "$logs"/gpu.cuda_tp::*.log 2>/dev/null || true
  printf '%s\n' "${rows[@]}"
  echo "$((${#rows[@]} - failed)) of ${#rows[@]} passed"
  ((${#rows[@]} > 0 && failed == 0))
}

