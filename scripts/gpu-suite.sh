#!/usr/bin/env bash
# The GPU suite: built here, run on a device machine (which has no Rust).
#
#   scripts/gpu-suite.sh [build]  here: builds the release binary and the GPU test binaries, checks they hold the
#                                 kernels, strips them and copies them into gpu-bundle/ (gitignored).
#   scripts/gpu-suite.sh run-tp   on the device machine: only the tensor-parallel tests (tests/gpu/cuda_tp.rs, a
#                                 minute or two) with their `cuda-tp` figure lines; see docs/parallelism.md.
#   scripts/gpu-suite.sh run [STAGES]
#                                 on the device machine, from the repository root (STAGES: see `run` below; default
#                                 all, which takes longer than one 10-minute device call): runs each test of each binary in
#                                 gpu-bundle/tests/ on its own and prints a PASS / FAIL / SKIP / TIME / HANG table last.
#                                 Exit status 0 only when every row is PASS: a SKIP on a device machine means the test
#                                 found no device (or no data), which is a failure there.
#
# A device call then reads:  run(command="scripts/gpu-suite.sh run", carry=["gpu-bundle.tar.xz"], timeout_s=...)
# (the packed bundle: the unpacked one with the working tree is over the device tool's 64 MiB).
# Logs go to $OUT/gpu-suite/ when $OUT is set (the device tool brings that folder back), else gpu-bundle/logs/.
# The tests find the reference data through LLAMA32_TEST_DATA; when unset, `run` looks for shared/llama32 in and
# beside the repository.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bundle="$root/gpu-bundle"
# Integration-test targets that need a GPU: all GPU tests live in one binary, tests/gpu/ (each binary carries the
# whole kernel library, and the device tool carries at most 64 MiB).
GPU_TESTS=(gpu)

# build, unpack_bundle, nccl_setup and run_tp.
# shellcheck source=scripts/gpu-suite-setup.sh
source "$root/scripts/gpu-suite-setup.sh"

# Seconds left before LLAMA32_SUITE_SECONDS (counted from the start of `run`) runs out, capped at $1; 0 when the
# budget is spent. Without LLAMA32_SUITE_SECONDS it prints $1.
suite_start=$(date +%s)
left() {
  local cap=$1 rest
  [[ -n ${LLAMA32_SUITE_SECONDS:-} ]] || { echo "$cap"; return; }
  rest=$((LLAMA32_SUITE_SECONDS - ($(date +%s) - suite_start)))
  ((rest < 5)) && rest=0
  echo $((rest < cap ? rest : cap))
}

# `tmo CAP CMD...`: runs CMD under timeout for at most CAP seconds and what is left of the budget; when nothing is
# left it runs nothing and returns 124, as timeout does.
tmo() {
  local t
  t=$(left "$1")
  shift
  ((t > 0)) || return 124
  timeout "$t" "$@"
}

run() {
  # Stages, comma-separated (default all): tests (every GPU test, the correctness gate; GPU_TEST_FILTER, a grep -E
  # pattern, picks some), quant (W4A16/W4A8 kernel benches, their criterion group, the torch peers of that group and 1B
  # end to end in bf16 / W4A16 / W4A8), kernels (ignored kernel benches, criterion, PyTorch peers), vision (the 11B
  # vision benches), vquant (11B and 90B Vision in W4A16 on one GPU, loaded layer by layer; opt-in: not in the default
  # list; LLAMA32_W4A16_KERNEL=direct|pipelined forces one kernel), e2e (llama32 bench, offline throughput,
  # bench-serve), pdl (opt-in: decode rows with and without LLAMA32_PDL=0, back to back, the SwiGLU fusion's ablation,
  # the RoPE fusion and the norm fusion), profile (opt-in: `llama32 bench --profile`, the decode and prefill steps of 1B
  # and 3B call by call, with each call's share of the step and weight-read rate), ncu (opt-in: Nsight Compute over one
  # launch of each W4A16, W4A8, skinny GEMM and attention kernel of interest, the ignored ncu_* tests: duration, DRAM /
  # L2 / SM throughput, occupancy, cycles per issued instruction), prefill (opt-in: the Hopper wgmma prefill attention
  # and its warp-specialized form against the mma.sync one: the golden tests end to end with
  # LLAMA32_PREFILL_KERNEL=wgmma and wgmma-ws, every kernel's TFLOP/s beside torch SDPA, and 3B / 1B prefill end to
  # end with each), targets (opt-in: the text issues' target rows on this
  # card, the decode fusions beside them, the direct W4A16 kernel's L2 prefetch forced off and on
  # (LLAMA32_W4A16_PREFETCH), the marginal cost of each kind of call (`bench --ablate`), and the copy / GEMM
  # ceilings and HF transformers decode), bulk (opt-in: the bulk W4A16 kernel beside the others, kernel by kernel and
  # end to end on 1B and 11B Vision W4A16, forced against the default; GPU_SUITE_SKIP_VISION=1 leaves out the 11B
  # rows), wgmma (opt-in: the Hopper W4A8 kernels beside mma and the large-m W4A16 kernel beside dequantize +
  # cuBLASLt: their tests, the golden end-to-end test with each forced, their criterion lines with cuBLAS at the same
  # shapes, 1B end to end with each), fresh (opt-in: the fourteenth to eighteenth sessions' kernels and switches
  # besides the stack, first run together on an H200 on 2026-11-28, in
  # bench/results/2026-11-28-h200-defaults-stack-attention.md: the prefill and decode twin tests (the eighteenth
  # session's copies, exponentials and rescale vote), the tests of the 3-stage decode K/V ring and of the logit
  # bias / min_tokens in the GPU sampler under a 30-second stall watchdog, then the W4A16 kernels at m = 1, 16, 64
  # (direct-batched among them), the attention kernels with torch SDPA beside them, decode attention with 3 stages
  # beside the default end to end, and 1B W4A16 batch-64 decode through the large-m row kernel), stack (opt-in: the persistent decode stack: its bf16 and W4A16 tests, the split-attention reruns,
  # the grid probe and the A/B decode rows, a few minutes; `run stack,fresh` runs both), defaults (opt-in: end to
  # end, each default the nineteenth session set beside the one it replaced: the warp-specialized prefill against
  # the wgmma one, direct-batched W4A16 at batch 1, the large-m row kernel at batch 64, and the decode K/V ring at
  # 2 and 3 stages at batch 64, then the attention call inside a profiled 3B batch-64 step at each), prewait (opt-in:
  # the quantized kernels' loads before the PDL wait, LLAMA32_QUANT_PREWAIT on and off in turn, twice each, at 1B
  # batch 1 W4A16 with int8 tables and W4A8 and batch 64 W4A16; twelve runs, about three minutes), tma (opt-in: the
  # TMA-fed W4A8 kernels wgmma-tma and wgmma-ws-tma, built without a GPU: their twin tests and the golden end-to-end
  # test with each forced, unless the tests stage ran in the same call; their criterion lines at m = 256 and 1024 beside
  # wgmma-row and wgmma-ws; 1B W4A8 prefill (4 x 2048 tokens) and batch-64 decode with each beside the kernel it
  # would replace; about three minutes), scored (opt-in: bench-serve at 64 clients with logprobs, prompt logprobs,
  # sampling with penalties and a JSON schema, each beside the plain row; about two minutes).
  # LLAMA32_SUITE_SECONDS bounds the whole run: a step that would start past
  # it is reported as TIME. A 15-minute device session runs them as separate calls, tests first.
  # GPU_SUITE_SKIP_CRITERION=1 / GPU_SUITE_SKIP_PEERS=1 leave out the criterion quant group (about two minutes) / the
  # torch peers of the quant stage.
  local stages="${1:-tests,kernels,vision,e2e}"
  want() { [[ ",$stages," == *",$1,"* ]]; }
  # `gpu_bench CAP PATTERN TEST [TAG]`: one ignored bench of the GPU test binary for at most CAP seconds of the
  # budget (its log gpu.TEST[.TAG].bench.log); when it passes, its log lines matching PATTERN (grep -E) join the
  # table; a failure adds a FAIL row instead.
  gpu_bench() {
    local log="$logs/gpu.$3${4:+.$4}.bench.log" rc=0
    tmo "$1" "$bundle/tests/gpu" --ignored --exact "$3" --nocapture --test-threads=1 >"$log" 2>&1 || rc=$?
    if ((rc == 0)); then
      mapfile -t -O "${#benches[@]}" benches < <(grep -E "$2" "$log")
    else
      failed=$((failed + 1))
      rows+=("$(printf '%-4s  %-16s %-48s %7s' FAIL gpu "$3 (benchmark)" -)")
      tail -n 5 "$log"
    fi
  }
  # `peers CAP GROUPS NAME`: scripts/peers.py --only GROUPS for at most CAP seconds, its log $logs/peers.NAME.log;
  # its `peer` lines join the table, a failure adds a FAIL row.
  peers() {
    local log="$logs/peers.$3.log" rc=0
    tmo "$1" python3 "$root/scripts/peers.py" --only "$2" >"$log" 2>&1 || rc=$?
    mapfile -t -O "${#benches[@]}" benches < <(grep -E '^peer ' "$log")
    if ((rc != 0)); then
      failed=$((failed + 1))
      rows+=("$(printf '%-4s  %-16s %-48s %7s' FAIL peers "--only $2 (see $log)" -)")
      tail -n 5 "$log"
    fi
  }
  # `gpu_benches TEST...`: ignored benches of the GPU test binary, at most 540 s each; their BENCH lines join the table.
  gpu_benches() {
    local t
    for t in "$@"; do gpu_bench 540 '^BENCH ' "$t"; done
  }
  # `test_status RC LOG`: TIME (cut off), HANG (its watchdog ended it), FAIL, SKIP (the test printed "skipped:")
  # or PASS for a test's exit status and log. Anything but PASS counts as a failure on a device.
  test_status() {
    if (($1 == 124)); then
      echo TIME
    elif (($1 != 0)) && grep -q '^HANG: ' "$2"; then
      echo HANG # the test's watchdog (tests/common Watchdog) ended it; the log names the launch
    elif (($1 != 0)); then
      echo FAIL
    elif grep -q 'skipped:' "$2"; then
      echo SKIP
    else
      echo PASS
    fi
  }
  # `gpu_test_env TAG TEST [VAR=VALUE...]`: one test of the GPU test binary run again with the given environment
  # (its log gpu.TEST.TAG.log); a row `TEST [TAG]` joins the table, and its figure lines (`w4a8 wgmma:`,
  # `w4a16 large:`) the summary.
  gpu_test_env() {
    local tag=$1 test=$2 log rc=0 status
    shift 2
    log="$logs/gpu.$test.$tag.log"
    (export "$@" && tmo 150 "$bundle/tests/gpu" --exact "$test" --nocapture --test-threads=1) >"$log" 2>&1 || rc=$?
    status=$(test_status "$rc" "$log")
    if [[ $status != PASS ]]; then
      failed=$((failed + 1))
      tail -n 15 "$log"
    fi
    rows+=("$(printf '%-4s  %-16s %-48s %7s' "$status" gpu "$test [$tag]" -)")
    mapfile -t -O "${#benches[@]}" benches < <(grep -E '^(w4a8 wgmma|w4a16 large)[^:]*: ' "$log" || true)
  }
  # `bench_e2e CAP "PRESET BATCH PROMPT GEN [FLAGS]"`: one `llama32 bench` run on CUDA (random weights), for at most
  # CAP seconds of the budget; its JSON line goes to bench.jsonl, a row and a figure line to the table.
  bench_e2e() {
    local preset batch prompt gen extra tag log rc=0 line
    read -r preset batch prompt gen extra <<<"$2"
    # Environment switches under test join the tag and the row.
    local env_tag="${LLAMA32_W4A16_KERNEL:+ w4a16=$LLAMA32_W4A16_KERNEL}${LLAMA32_PDL:+ pdl=$LLAMA32_PDL}"
    env_tag+="${LLAMA32_W4A16_PREFETCH:+ prefetch=$LLAMA32_W4A16_PREFETCH}"
    env_tag+="${LLAMA32_DECODE_SPLIT_POSITIONS:+ split=$LLAMA32_DECODE_SPLIT_POSITIONS}"
    env_tag+="${LLAMA32_W4A16_BLOCKS_PER_SM:+ blocks=$LLAMA32_W4A16_BLOCKS_PER_SM}"
    env_tag+="${LLAMA32_PREFILL_KERNEL:+ prefill=$LLAMA32_PREFILL_KERNEL}"
    env_tag+="${LLAMA32_W4A16_CHUNK_MIB:+ chunk=$LLAMA32_W4A16_CHUNK_MIB}"
    env_tag+="${LLAMA32_W4A8_KERNEL:+ w4a8=$LLAMA32_W4A8_KERNEL}"
    env_tag+="${LLAMA32_W4A16_LARGE:+ large=$LLAMA32_W4A16_LARGE}"
    env_tag+="${LLAMA32_W4A16_LARGE_MIN_M:+ large_min_m=$LLAMA32_W4A16_LARGE_MIN_M}"
    env_tag+="${LLAMA32_W4A16_LARGE_SPLITS:+ large_splits=$LLAMA32_W4A16_LARGE_SPLITS}"
    env_tag+="${LLAMA32_GEMV_PREFETCH:+ gemv_prefetch=$LLAMA32_GEMV_PREFETCH}"
    env_tag+="${LLAMA32_W4A16_TILED_STAGES:+ tiled_stages=$LLAMA32_W4A16_TILED_STAGES}"
    env_tag+="${LLAMA32_DECODE_MERGE:+ merge=$LLAMA32_DECODE_MERGE}"
    env_tag+="${LLAMA32_DECODE_STAGES:+ decode_stages=$LLAMA32_DECODE_STAGES}"
    env_tag+="${LLAMA32_QUANT_PREWAIT:+ prewait=$LLAMA32_QUANT_PREWAIT}"
    tag="$preset.b$batch.p$prompt${extra:+.$(echo "$extra" | tr -c 'a-z0-9' '_')}$(echo "$env_tag" | tr -c 'a-z0-9=\n' '.')"
    log="$logs/bench.$tag.log"
    last_bench_log=$log
    # A preset name, or a model directory (a config.json only) run with random weights.
    local source=(--preset "$preset") name=$preset
    if [[ -d $preset ]]; then
      source=(--model "$preset" --random-weights)
      name=$(basename "$preset")
      tag="$(basename "$preset").${tag#"$preset".}"
      log="$logs/bench.$tag.log"
      last_bench_log=$log
    fi
    # shellcheck disable=SC2086 # $extra is a list of flags
    tmo "$1" "$bundle/bin/llama32" bench "${source[@]}" --device cuda --batch "$batch" \
      --prompt-tokens "$prompt" --gen-tokens "$gen" $extra >"$log" 2>&1 || rc=$?
    line=$(grep '^{' "$log" | tail -1 || true)
    extra="$extra${env_tag:+ [$env_tag ]}"
    if ((rc == 0)) && [[ -n $line ]]; then
      echo "$line" >>"$logs/bench.jsonl"
      rows+=("$(printf '%-4s  %-16s %-48s %7s' PASS bench "$name b$batch p$prompt g$gen $extra" -)")
      benches+=("$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); s=d.get("steady_decode_ms_per_step"); print("%-3s b%-3d prefill %8.0f tok/s  decode %7.2f ms/step %9.0f tok/s  steady %s %s" % (sys.argv[2], d["batch"], d["prefill_tok_per_s"], d["decode_ms_per_step"], d["decode_tok_per_s"], "%7.2f ms/step" % s if s else "-", sys.argv[3]))' "$line" "$name" "$extra")")
    else
      failed=$((failed + 1))
      rows+=("$(printf '%-4s  %-16s %-48s %7s' FAIL bench "$name b$batch p$prompt g$gen $extra" -)")
      tail -n 5 "$log"
    fi
  }
  # `stack_phase_lines`: the persistent decode stack's phases from the last bench's JSON (persistent_decode_phases).
  stack_phase_lines() {
    [[ -f $last_bench_log ]] || return 0
    mapfile -t -O "${#benches[@]}" benches < <(python3 - "$last_bench_log" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("{"):
        continue
    d = json.loads(line)
    p = d.get("persistent_decode_phases")
    if not isinstance(p, dict):
        print("stack phases %s: %s" % (d.get("model"), d.get("persistent_decode_phases_error", "none")))
        continue
    head = "stack phases %s b%d" % (d.get("model"), d["batch"])
    print("%s: %.1f us a launch, %d layers on %d blocks, worst overlap %d ns" % (
        head, p["total_us"], p["layers"], p["blocks"], p["worst_overlap_ns"]))
    for ph in p["phases"]:
        print("%s   %-18s span %8.1f us  work mean %8.1f  max %8.1f  release %6.1f" % (
            head, ph["phase"], ph["span_us"], ph["mean_work_us"], ph["max_work_us"], ph["release_us"]))
PY
    )
  }
  # `ab_lines`: one line per pair of bench.jsonl rows that differ in one switch only (the same model, batch, prompt
  # and other switches): decode ms/step without / with it.
  ab_lines() {
    [[ -f $logs/bench.jsonl ]] || return 0
    mapfile -t -O "${#benches[@]}" benches < <(python3 - "$logs/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
def key(d):
    return (d.get("model"), d.get("embeddings"), d["batch"], d["prompt_tokens"], d.get("w4a16_kernel"))
switches = ("pdl", "fused_swiglu", "fused_rope", "fused_norm", "persistent_decode")
for switch in switches:
    for d in rows:
        if d.get(switch) is not True:
            continue
        for e in rows:
            if e is d or key(e) != key(d) or e.get(switch) is not False:
                continue
            if any(e.get(o) != d.get(o) for o in switches if o != switch):
                continue
            steps = " [%s steps through the stack]" % d.get("persistent_decode_steps") if switch == "persistent_decode" else ""
            # The steady decode steps (every sequence decoding, at one context) where both have them.
            f = "steady_decode_ms_per_step" if d.get("steady_decode_ms_per_step") and e.get("steady_decode_ms_per_step") else "decode_ms_per_step"
            print("A/B %-12s %s b%d: %.3f -> %.3f ms/step (%.2fx)%s%s" % (switch, d.get("model"), d["batch"],
                  e[f], d[f], e[f] / d[f], steps, " steady" if f.startswith("steady") else ""))
            break
PY
    )
  }
  cd "$root"
  unpack_bundle
  if [[ ! -d "$bundle/tests" ]]; then
    echo "error: $bundle/tests missing: build it with scripts/gpu-suite.sh and carry gpu-bundle.tar.xz" >&2
    exit 2
  fi
  # The device tool brings back at most 8 files: with $OUT set, the logs are written to a scratch folder and packed
  # into $OUT/gpu-suite-logs.tgz on exit, beside $OUT/summary.txt (the table printed last).
  local logs
  if [[ -n ${OUT:-} ]]; then
    logs=$(mktemp -d)/gpu-suite
    # shellcheck disable=SC2064 # expand now: $logs is local
    trap "tar czf '$OUT/gpu-suite-logs.tgz' -C '$(dirname "$logs")' gpu-suite 2>/dev/null || true" EXIT
  else
    logs="$bundle/logs"
  fi
  mkdir -p "$logs"
  if [[ -z "${LLAMA32_TEST_DATA:-}" ]]; then
    local d
    for d in "$root/shared/llama32" "$root/../shared/llama32"; do
      if [[ -d "$d" ]]; then export LLAMA32_TEST_DATA="$d"; break; fi
    done
  fi
  export RUST_BACKTRACE=1
  export LLAMA32_GOLDEN_DIR="$root/tests/golden"
  nccl_setup

  local device
  device=$(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1) ||
    device="nvidia-smi failed"
  local rows=() benches=() failed=0 exe name t log status rc start secs last_bench_log=""
  if want tests; then
    for exe in "$bundle"/tests/*; do
      name=$(basename "$exe")
      local tests=()
      # watchdog::* test the test harness's hang guard on the CPU (CI runs them); no device time for them here.
      mapfile -t tests < <("$exe" --list --format=terse 2>/dev/null | sed -n 's/: test$//p' | grep -v '^watchdog::' |
        grep -E "${GPU_TEST_FILTER:-.}")
      if ((${#tests[@]} == 0)); then
        rows+=("$(printf '%-4s  %-16s %-48s %7s' FAIL "$name" "(lists no tests)" -)")
        failed=$((failed + 1))
        continue
      fi
      for t in "${tests[@]}"; do
        log="$logs/$name.$t.log"
        start=$(date +%s.%N)
        rc=0
        if (($(left 150) == 0)); then
          failed=$((failed + 1))
          rows+=("$(printf '%-4s  %-16s %-48s %7s' TIME "$name" "$t" -)")
          continue
        fi
        tmo 150 "$exe" --exact "$t" --nocapture --test-threads=1 >"$log" 2>&1 || rc=$?
        secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1fs", b - a }')
        status=$(test_status "$rc" "$log")
        if [[ $status != PASS ]]; then
          failed=$((failed + 1))
          echo "---- $status $name::$t (last lines of $log)"
          tail -n 15 "$log"
        fi
        rows+=("$(printf '%-4s  %-16s %-48s %7s' "$status" "$name" "$t" "$secs")")
      done
    done
    # The quantized golden end-to-end test again with a Hopper kernel forced: W4A8 wgmma, wgmma-row and wgmma-ws (the
    # executor's prefill and decode projections through kernels/quant/w4a8_sm90.cu), and the large-m W4A16 wgmma-row
    # kernel (kernels/quant/w4a16_sm90.cu); where they do not run, the same run as above. Then with every W4A16
    # projection sent down the large-m path (LLAMA32_W4A16_LARGE_MIN_M=1).
    if [[ -z ${GPU_TEST_FILTER:-} ]]; then
      gpu_test_env w4a8=wgmma cuda_quant::e2e::quantized_checkpoint_on_cuda_matches_cpu LLAMA32_W4A8_KERNEL=wgmma
      gpu_test_env w4a8=wgmma-row cuda_quant::e2e::quantized_checkpoint_on_cuda_matches_cpu LLAMA32_W4A8_KERNEL=wgmma-row
      gpu_test_env w4a8=wgmma-ws cuda_quant::e2e::quantized_checkpoint_on_cuda_matches_cpu LLAMA32_W4A8_KERNEL=wgmma-ws
      gpu_test_env w4a8=wgmma-tma cuda_quant::e2e::quantized_checkpoint_on_cuda_matches_cpu \
        LLAMA32_W4A8_KERNEL=wgmma-tma
      gpu_test_env w4a8=wgmma-ws-tma cuda_quant::e2e::quantized_checkpoint_on_cuda_matches_cpu \
        LLAMA32_W4A8_KERNEL=wgmma-ws-tma
      gpu_test_env large=wgmma-row cuda_quant::e2e::quantized_checkpoint_on_cuda_matches_cpu \
        LLAMA32_W4A16_LARGE=wgmma-row
      # Every W4A16 projection, decode steps and graphs included, through the large-m path (either kind).
      gpu_test_env large_min_m=1 cuda_quant::e2e::quantized_checkpoint_on_cuda_matches_cpu LLAMA32_W4A16_LARGE_MIN_M=1
      gpu_test_env large_min_m=1,wgmma-row cuda_quant::e2e::quantized_checkpoint_on_cuda_matches_cpu \
        LLAMA32_W4A16_LARGE_MIN_M=1 LLAMA32_W4A16_LARGE=wgmma-row
    fi
    # Tensor parallelism on CUDA (tests/gpu/cuda_tp.rs): its `cuda-tp` figure lines join the summary.
    mapfile -t -O "${#benches[@]}" benches < <(grep -h '^cuda-tp ' "$logs"/gpu.cuda_tp::*.log 2>/dev/null || true)
    rc=0
    "$bundle/bin/llama32" --help >"$logs/llama32.help.log" 2>&1 || rc=$?
    if ((rc == 0)); then status=PASS; else status=FAIL; failed=$((failed + 1)); fi
    rows+=("$(printf '%-4s  %-16s %-48s %7s' "$status" llama32 "--help (the release binary starts)" -)")
  fi

  if want quant; then
    # W4A16 figure lines (ignored test), then the criterion `quant` group, the torch peers at the same shapes, and
    # 1B batch-1 decode end to end in bf16 / W4A16 / W4A8.
    gpu_bench 180 'GB/s|TFLOP/s' cuda_quant::quant_throughput
    if [[ -x "$bundle/bench/cuda_kernels" && -z ${GPU_SUITE_SKIP_CRITERION:-} ]]; then
      log="$logs/criterion.quant.log"
      rc=0
      (cd "$(mktemp -d)" && tmo 220 "$bundle/bench/cuda_kernels" --bench --noplot quant) >"$log" 2>&1 || rc=$?
      mapfile -t -O "${#benches[@]}" benches < <(awk '/^quant\// {name=$1} /thrpt:/ {print "criterion " name " " $0}' "$log")
      if ((rc != 0)); then
        failed=$((failed + 1))
        rows+=("$(printf '%-4s  %-16s %-48s %7s' FAIL criterion "quant group (see $log)" -)")
        tail -n 5 "$log"
      fi
    fi
    [[ -n ${GPU_SUITE_SKIP_PEERS:-} ]] || peers 120 ceilings,quant quant
    # 1B, batch and flags, bf16 beside each scheme.
    local q
    for q in "" "--quantize w4a16-g32" "--quantize w4a8-g32"; do bench_e2e 60 "1b 1 128 64 $q"; done
    for q in "16 128 64" "16 128 64 --quantize w4a16-g32" "64 128 64" "64 128 64 --quantize w4a16-g32" \
      "64 128 64 --quantize w4a8-g32"; do
      bench_e2e 60 "1b $q"
    done
    # W4A8 with the Hopper kernel forced (prefill of 64 x 128 tokens at m = 8192, decode at m = 64).
    LLAMA32_W4A8_KERNEL=wgmma bench_e2e 60 "1b 64 128 64 --quantize w4a8-g32"
    # 1B W4A16 with the embedding / lm_head in int8 on the device (`--embeddings int8` at load time: the tables
    # quantized as `llama32 quantize --embeddings int8` does).
    for q in "1 128 64" "16 128 64" "64 128 64"; do bench_e2e 90 "1b $q --quantize w4a16-g32 --embeddings int8"; done
    # The large-m W4A16 path (prefill of 64 x 512 tokens): 32 MiB chunks (the default) against the whole matrix
    # dequantized at once (the path before the ninth session).
    LLAMA32_W4A16_CHUNK_MIB=65536 bench_e2e 60 "1b 64 512 64 --quantize w4a16-g32"
    bench_e2e 60 "1b 64 512 64 --quantize w4a16-g32"
    # The same W4A16 rows with each decode kernel forced (LLAMA32_W4A16_KERNEL; the default picks per shape).
    local kern
    for kern in direct pipelined tiled; do
      export LLAMA32_W4A16_KERNEL=$kern
      for q in "1 128 64" "16 128 64" "64 128 64"; do bench_e2e 60 "1b $q --quantize w4a16-g32"; done
    done
    # The tiled kernel with a 4-stage ring (LLAMA32_W4A16_TILED_STAGES; quant_throughput's tiled/3 and tiled/4
    # lines time it per shape).
    for q in "16 128 64" "64 128 64"; do
      LLAMA32_W4A16_TILED_STAGES=4 bench_e2e 60 "1b $q --quantize w4a16-g32"
    done
    unset LLAMA32_W4A16_KERNEL
  fi

  if want kernels; then
    # Kernel throughput: the tests marked #[ignore] are benchmarks; their figure lines join the table.
    for exe in "$bundle"/tests/*; do
      name=$(basename "$exe")
      while read -r t; do
        [[ -n $t ]] || continue
        # the 11B vision benches run in the vision stage (longer timeouts)
        [[ $t == cuda_vision::bench_* || $t == cuda_vision_quant::bench_* || $t == cuda_encoder_attention::bench_* ]] &&
          continue
        [[ $t == watchdog::* ]] && continue # the watchdog tests' fixture, not a benchmark
        log="$logs/$name.$t.bench.log"
        rc=0
        timeout 120 "$exe" --ignored --exact "$t" --nocapture --test-threads=1 >"$log" 2>&1 || rc=$?
        if ((rc == 0)); then
          mapfile -t -O "${#benches[@]}" benches < <(grep -E 'GB/s|TFLOP/s' "$log")
        else
          failed=$((failed + 1))
          rows+=("$(printf '%-4s  %-16s %-48s %7s' FAIL "$name" "$t (benchmark)" -)")
          tail -n 5 "$log"
        fi
      done < <("$exe" --list --ignored --format=terse 2>/dev/null | sed -n 's/: test$//p')
    done
  fi

  if want vision; then
    # Llama 3.2 Vision at the 11B shapes on random weights (generating them takes most of the time): the encoder time
    # per 4-tile image and batch-1 decode ms/token with one 4-tile image; their BENCH lines join the table.
    if [[ -x "$bundle/tests/gpu" ]]; then
      # The encoder attention alone, beside torch SDPA on the same shape.
      gpu_bench 60 'TFLOP/s' cuda_encoder_attention::bench_encoder_attention_11b
      peers 60 vision vision
      gpu_benches cuda_vision::bench_vision_encoder_11b cuda_vision::bench_mllama_11b_decode
    fi
  fi

  if want vquant && [[ -x "$bundle/tests/gpu" ]]; then
    # Llama 3.2 Vision in W4A16 on random weights at the real shapes, loaded layer by layer: 11B, then 90B on one GPU
    # (the 4-bit issue's target); load time, device memory, KV capacity, batch-1 and batch-16 decode.
    gpu_benches cuda_vision_quant::bench_mllama_11b_w4a16_decode cuda_vision_quant::bench_mllama_90b_w4a16_decode
    # 11B again with the embedding and lm_head in int8 on the device (`--embeddings int8`); GPU_SUITE_INT8_90B=1 adds
    # the 90B run (about 3 more minutes of load).
    LLAMA32_BENCH_INT8_TABLES=1 gpu_bench 540 '^BENCH ' cuda_vision_quant::bench_mllama_11b_w4a16_decode int8
    if [[ -n ${GPU_SUITE_INT8_90B:-} ]]; then
      LLAMA32_BENCH_INT8_TABLES=1 gpu_bench 540 '^BENCH ' cuda_vision_quant::bench_mllama_90b_w4a16_decode int8
    fi
  fi

  if want kernels; then
    # Criterion benches of the kernel families (CUDA-event timing); their "time:" and "thrpt:" lines join the table.
    if [[ -x "$bundle/bench/cuda_kernels" ]]; then
      log="$logs/criterion.log"
      rc=0
      # 420 s: the quant group (W4A16 / W4A8 at the 1B, 11B and 90B shapes) adds about two minutes.
      (cd "$(mktemp -d)" && timeout 420 "$bundle/bench/cuda_kernels" --bench --noplot) >"$log" 2>&1 || rc=$?
      if ((rc == 0)) && ! grep -q 'skipped:' "$log"; then
        rows+=("$(printf '%-4s  %-16s %-48s %7s' PASS criterion "cuda_kernels (all groups)" -)")
        mapfile -t -O "${#benches[@]}" benches < <(awk '/^[a-z_]+\// {name=$1} /thrpt:/ {print "criterion " name " " $0}' "$log")
      else
        failed=$((failed + 1))
        rows+=("$(printf '%-4s  %-16s %-48s %7s' FAIL criterion "cuda_kernels (see $log)" -)")
        tail -n 5 "$log"
      fi
    fi

    # PyTorch peers in the same call (scripts/peers.py --quick: copy/GEMM ceilings, SDPA, and the quant peers torch
    # int4 tinygemm g32 and cuBLAS bf16 at the shapes of the criterion `quant` group); their lines join the table.
    if [[ -f "$root/scripts/peers.py" ]] && command -v python3 >/dev/null; then
      log="$logs/peers.log"
      rc=0
      timeout 300 python3 "$root/scripts/peers.py" --quick >"$log" 2>&1 || rc=$?
      if ((rc == 0)); then
        rows+=("$(printf '%-4s  %-16s %-48s %7s' PASS peers "scripts/peers.py --quick" -)")
        mapfile -t -O "${#benches[@]}" benches < <(grep -E '^peer ' "$log")
      else
        failed=$((failed + 1))
        rows+=("$(printf '%-4s  %-16s %-48s %7s' FAIL peers "scripts/peers.py --quick (see $log)" -)")
        tail -n 5 "$log"
      fi
    fi
  fi

  if want pdl; then
    # A/B of programmatic dependent launch (on by default) on the decode-bound rows, each pair back to back.
    local spec
    for spec in "1b 1 128 64" "3b 1 128 64" "1b 64 512 64" "1b 1 128 64 --quantize w4a16-g32"; do
      bench_e2e 120 "$spec"
      LLAMA32_PDL=0 bench_e2e 120 "$spec"
    done
    # The SwiGLU fusion (on by default) against its ablation, and the RoPE fusion (off by default) against the
    # default, at batch 1 where they matter.
    bench_e2e 120 "1b 1 128 64 --no-fused-swiglu"
    bench_e2e 120 "3b 1 128 64 --no-fused-swiglu"
    # The W4A16 SwiGLU epilogue (paired gate_up rows; on by default) against its ablation, at batch 1 and 16.
    bench_e2e 120 "1b 1 128 64 --quantize w4a16-g32 --no-fused-swiglu"
    bench_e2e 120 "1b 16 128 64 --quantize w4a16-g32"
    bench_e2e 120 "1b 16 128 64 --quantize w4a16-g32 --no-fused-swiglu"
    bench_e2e 120 "1b 1 128 64 --fused-rope"
    bench_e2e 120 "3b 1 128 64 --fused-rope"
    # The norm prologue fusion (off by default), alone and with the RoPE fusion.
    bench_e2e 120 "1b 1 128 64 --fused-norm"
    bench_e2e 120 "3b 1 128 64 --fused-norm"
    bench_e2e 120 "1b 1 128 64 --fused-rope --fused-norm"
    bench_e2e 120 "1b 8 128 64 --fused-norm"
    bench_e2e 120 "1b 8 128 64"
    ab_lines
  fi

  if want stack && [[ -x "$bundle/tests/gpu" ]]; then
    # The persistent decode stack (sixteenth session: bf16; seventeenth: W4A16; first run on an H200 on 2026-11-28):
    # its tests (each launch watched: a hang is reported as HANG within LLAMA32_TEST_STALL_S), then the headline
    # figures beside the measured defaults.
    # (When the tests stage ran in this call, these tests already ran there.)
    local ft
    want tests || for ft in cuda_golden::cuda_persistent_decode_stack_changes_no_bit \
      cuda_decode_stack::decode_stack_matches_the_layers_at_the_llama_widths \
      cuda_decode_stack::decode_stack_w4a16_matches_the_layers_at_the_llama_widths \
      cuda_decode_stack::decode_stack_refuses_w4a8_projections \
      cuda_decode_stack::decode_stack_phase_timing_changes_no_bit_and_the_barriers_hold \
      cuda_kernels::grid_probe_barrier_is_sound_and_the_stream_reads_every_byte; do
      gpu_test_env stack "$ft" LLAMA32_TEST_STALL_S="${LLAMA32_TEST_STALL_S:-30}"
    done
    # The stack's split-KV attention and fused merge: the golden contexts (up to 256) split only below 256
    # positions a split.
    gpu_test_env split=32 cuda_golden::cuda_persistent_decode_stack_changes_no_bit LLAMA32_DECODE_SPLIT_POSITIONS=32 \
      LLAMA32_TEST_STALL_S="${LLAMA32_TEST_STALL_S:-30}"
    # At the default split no block of a 132-SM card runs a second attention item (at most 128 items), and no split
    # is empty; at 16 positions a split the Llama-width test has up to 320 items and empty last splits.
    gpu_test_env split=16 cuda_decode_stack::decode_stack_matches_the_layers_at_the_llama_widths \
      LLAMA32_DECODE_SPLIT_POSITIONS=16 LLAMA32_TEST_STALL_S="${LLAMA32_TEST_STALL_S:-30}"
    # What a persistent per-step decode kernel needs to know (docs/architecture.md): a grid barrier's latency, the
    # weight-like stream with and without barriers, and whether the cooperative launch is captured in a graph.
    gpu_bench 60 'grid probe' cuda_kernels::grid_probe_throughput
    # The stack against the multi-kernel step: bf16 1B and 3B at batch 1 and 1B at batch 8, then W4A16 (issue 6: 1B
    # W4A16 batch 1 >= 2.5x bf16; int8 tables, as that target needs); an A/B line per pair.
    local spec
    for spec in "1b 1 128 64" "3b 1 128 64" "1b 8 128 64" "1b 1 128 64 --quantize w4a16-g32 --embeddings int8" \
      "3b 1 128 64 --quantize w4a16-g32 --embeddings int8"; do
      bench_e2e 45 "$spec"
      bench_e2e 45 "$spec --persistent-decode"
    done
    ab_lines
    # Where the stack's time goes (nineteenth session): its phase timing (`--profile` with `--persistent-decode`),
    # per kind of phase summed over the layers: span, mean and slowest block's work, the grid barrier's release.
    for spec in "1b 1 128 64" "3b 1 128 64" "1b 1 128 64 --quantize w4a16-g32 --embeddings int8"; do
      bench_e2e 60 "$spec --persistent-decode --profile 3"
      stack_phase_lines
    done
    # The multi-kernel W4A16 step with the direct kernel's chunk loads issued together (seventeenth session; the
    # kernel-by-kernel figures are quant_throughput's direct-batched column in fresh).
    LLAMA32_W4A16_KERNEL=direct-batched bench_e2e 45 "1b 1 128 64 --quantize w4a16-g32 --embeddings int8"
  fi

  if want fresh && [[ -x "$bundle/tests/gpu" ]]; then
    # What had never run on a GPU besides the stack (its own stage above) until 2026-11-28, most telling first: the
    # eighteenth session's attention changes, in every decode and prefill of the defaults (the K/V tile loads with
    # cheaper index arithmetic and every table read before the first copy, exp2_ftz, the rescale vote, the wgmma
    # prefill's copies behind its Q K^T, the warp-specialized producer's noinc arrivals, the overlapped wgmma
    # prefill); then the fourteenth session's tests (sampling bias and min_tokens, the 3-stage decode ring) and the
    # fifteenth's (split-K in the large-m W4A16 kernels, its SiLU epilogue on the executor's path). The thirteenth
    # session's list ran on an H200 on 2026-11-28 (bench/results/2026-11-28-h200-fresh-kernels.md).
    # (When the tests stage ran in this call, these tests and the golden row-kernel run below already ran there.)
    local ft
    # The twenty-fourth and twenty-fifth sessions' scored steps (device masks and log-probabilities) come first.
    want tests || for ft in cuda_logprobs::mask_logits_matches_token_mask cuda_logprobs::token_logprobs_match_cpu \
      cuda_logprobs::logprobs_reject_bad_shapes cuda_golden::cuda_scored_step_matches_host \
      cuda_vision::cuda_mllama_scored_step_matches_host cuda_tp::cuda_tp_in_process_ranks_on_one_gpu_match_tp1 \
      cuda_tp_vision::cuda_tp_vision_two_ranks_on_one_gpu_match_tp1 \
      cuda_golden::cuda_engine_prompt_logprobs_match_transformers cuda_attention::paged_prefill_matches_cpu cuda_attention::paged_prefill_ws_matches_wgmma_bits \
      cuda_attention::paged_decode_matches_cpu \
      cuda_attention::paged_decode_stages_change_no_bit cuda_sampling::sample_matches_cpu \
      cuda_golden::cuda_step_sample_matches_cpu_sampler cuda_sampling::sampling_rejects_bad_shapes \
      cuda_w4a16_large::w4a16_large_matches_cpu cuda_w4a16_large::w4a16_large_row_matches_cpu \
      cuda_w4a16_large::w4a16_large_paired_swiglu_matches_plain_then_silu_mul; do
      gpu_test_env fresh "$ft" LLAMA32_TEST_STALL_S="${LLAMA32_TEST_STALL_S:-30}"
    done
    # Every W4A16 projection through the row kernel (split where its grid is small, SiLU fused), golden checkpoint.
    want tests || gpu_test_env large_min_m=1,wgmma-row cuda_quant::e2e::quantized_checkpoint_on_cuda_matches_cpu \
      LLAMA32_W4A16_LARGE_MIN_M=1 LLAMA32_W4A16_LARGE=wgmma-row
    # Decode attention at batch 64, 2k context, with the 3-stage K/V ring beside the default (and prefill), then
    # torch SDPA (flash and cuDNN) and the copy ceiling on the same shapes, for issue 3's ratios after the
    # eighteenth session's copies, exponentials and rescale vote.
    gpu_bench 90 'GB/s|TFLOP/s' cuda_attention::paged_attention_throughput fresh
    [[ -n ${GPU_SUITE_SKIP_PEERS:-} ]] || peers 90 ceilings,sdpa sdpa-fresh
    # W4A16 at m = 1, 16 and 64 on every shape: the decode kernels (at m = 1 the first timing of the one-LOP3
    # dequantization and the pointer-walking loads, against the H200 rows of 2026-11-28; at m = 1 and 16 the
    # direct-batched column) beside, at m = 64, the large-m row kernel with one and with its plan's K splits (lines
    # `row/s1`, `row/sS`).
    LLAMA32_QUANT_MS=1,16,64 gpu_bench 180 'GB/s|TFLOP/s' cuda_quant::quant_throughput m1-16-64
    # End to end where decode attention weighs most: 1B and 3B at batch 64, 1k-token prompts, default and 3 stages.
    local st
    for st in "" 3; do
      LLAMA32_DECODE_STAGES=$st bench_e2e 60 "1b 64 1024 64"
      LLAMA32_DECODE_STAGES=$st bench_e2e 60 "3b 64 1024 64"
    done
    # W4A16 batch-1 decode (the fewer instructions per weight word), then batch 64 through the large-m row kernel
    # against the default decode kernels, with K splits (the default plan) and without
    # (LLAMA32_W4A16_LARGE_SPLITS=1).
    bench_e2e 60 "1b 1 128 64 --quantize w4a16-g32"
    bench_e2e 60 "1b 64 128 64 --quantize w4a16-g32"
    LLAMA32_W4A16_LARGE_MIN_M=33 LLAMA32_W4A16_LARGE=wgmma-row bench_e2e 60 "1b 64 128 64 --quantize w4a16-g32"
    LLAMA32_W4A16_LARGE_MIN_M=33 LLAMA32_W4A16_LARGE=wgmma-row LLAMA32_W4A16_LARGE_SPLITS=1 \
      bench_e2e 60 "1b 64 128 64 --quantize w4a16-g32"
  fi

  if want defaults; then
    # The nineteenth session's defaults against what they replaced (H200, 2026-11-28), end to end: prefill through
    # the warp-specialized kernel (now `auto` on Hopper) and the wgmma one; W4A16 at batch 1 (direct-batched at
    # m <= 8) and at batch 64 and 40 (the row kernel from 33 rows by default since) against
    # LLAMA32_W4A16_LARGE_MIN_M=65 (the decode kernels); then the decode K/V ring at 2 and 3 stages, twice each in
    # turn, where attention weighs most (compare the steady decode figures: the runs' own mix batch sizes).
    local spec st
    for spec in "3b 1 4096 8" "1b 4 2048 8"; do
      bench_e2e 60 "$spec"
      LLAMA32_PREFILL_KERNEL=wgmma bench_e2e 60 "$spec"
    done
    bench_e2e 60 "1b 1 128 64 --quantize w4a16-g32 --embeddings int8"
    bench_e2e 60 "1b 64 128 64 --quantize w4a16-g32"
    LLAMA32_W4A16_LARGE_MIN_M=65 bench_e2e 60 "1b 64 128 64 --quantize w4a16-g32"
    bench_e2e 60 "1b 40 128 64 --quantize w4a16-g32"
    LLAMA32_W4A16_LARGE_MIN_M=65 bench_e2e 60 "1b 40 128 64 --quantize w4a16-g32"
    for spec in "3b 64 1024 64" "3b 64 2048 32" "1b 64 2048 32"; do
      for st in 2 3 2 3; do
        LLAMA32_DECODE_STAGES=$st bench_e2e 60 "$spec"
      done
    done
    # Why the third stage's 1.27x at d128 alone (kernel bench) did not show end to end (2026-11-28): the attention
    # call's time inside a 3B batch-64 step, profiled call by call (the `profile` object and the stderr table of
    # each log), at 2 and 3 stages.
    for st in 2 3; do
      LLAMA32_DECODE_STAGES=$st bench_e2e 90 "3b 64 2048 8 --profile 3"
      grep -E '^(profile:|attention |linear |step )' "$last_bench_log" | sed "s/^/stages $st: /" \
        >>"$logs/decode-stages-profile.txt" || true
    done
    if [[ -f $logs/decode-stages-profile.txt ]]; then
      mapfile -t -O "${#benches[@]}" benches <"$logs/decode-stages-profile.txt"
    fi
  fi

  if want prewait; then
    # The twentieth session's loads before the wait in the quantized kernels (LLAMA32_QUANT_PREWAIT, on by default,
    # built without a GPU): 1B batch 1 in W4A16 (int8 tables, the issue-6 row) and W4A8, and 1B batch 64
    # in W4A16 (the large-m row kernel), on and off in turn, twice each.
    local pw spec
    for spec in "1b 1 128 64 --quantize w4a16-g32 --embeddings int8" "1b 1 128 64 --quantize w4a8-g32" \
      "1b 64 128 64 --quantize w4a16-g32"; do
      for pw in 1 0 1 0; do
        LLAMA32_QUANT_PREWAIT=$pw bench_e2e 60 "$spec"
      done
    done
  fi

  if want scored; then
    # The twenty-fifth session's device picking (scored steps: masks, logprobs, prompt logprobs, penalties on the
    # device, built without a GPU) and the twenty-sixth's sorted penalty lists, end to end: 1B served in-process, 64
    # streaming clients of 512-token prompts and 128 tokens, one request each, plain and with each kind of scored
    # step (bench-serve --extra-body). Their ITL against the plain row is the cost of each.
    local extra name log rc spec tok=()
    # Structured outputs need the tokenizer (the reference data's; without it the guided row is a SKIP).
    [[ -f "${LLAMA32_TEST_DATA:-}/tokenizer.model" ]] && tok=(--tokenizer "$LLAMA32_TEST_DATA/tokenizer.model")
    local schema='{"type":"object","properties":{"text":{"type":"string","maxLength":400}},"required":["text"]}'
    for spec in 'plain|{}' 'logprobs5|{"logprobs": 5}' 'prompt_logprobs1|{"prompt_logprobs": 1}' \
      'sampled_penalized|{"temperature": 1.0, "seed": 1, "repetition_penalty": 1.1, "frequency_penalty": 0.2}' \
      "guided_json|{\"ignore_eos\": false, \"guided_json\": $schema}"; do
      name=${spec%%|*} extra=${spec#*|} log="$logs/scored.$name.log" rc=0
      if [[ $name == guided_json && ${#tok[@]} == 0 ]]; then
        rows+=("$(printf '%-4s  %-16s %-48s %7s' SKIP scored "1b guided_json (no LLAMA32_TEST_DATA tokenizer)" -)")
        continue
      fi
      tmo 120 "$bundle/bin/llama32" bench-serve --preset 1b --random-weights --device cuda "${tok[@]}" --clients 64 \
        --requests-per-client 1 --prompt-tokens 512 --max-tokens 128 --extra-body "$extra" >"$log" 2>&1 || rc=$?
      if ((rc == 0)) && grep -q '^{' "$log"; then
        grep '^{' "$log" >>"$logs/bench.jsonl"
        rows+=("$(printf '%-4s  %-16s %-48s %7s' PASS scored "1b 64 clients p512 g128 $name" -)")
        benches+=("$(grep '^{' "$log" | tail -1 | python3 -c '
import json, sys
d = json.loads(sys.stdin.read())
print("scored %-18s 64 clients: TTFT p50 %7.1f ms  ITL p50 %6.2f p99 %6.2f ms  %8.0f tok/s  ok %d err %d" % (
    sys.argv[1], d["ttft_ms"]["p50"], d["itl_ms"]["p50"], d["itl_ms"]["p99"], d["output_tok_per_s"], d["ok"],
    d["errors"]))' "$name")")
      else
        failed=$((failed + 1))
        rows+=("$(printf '%-4s  %-16s %-48s %7s' FAIL scored "1b 64 clients p512 g128 $name" -)")
        tail -n 5 "$log"
      fi
    done
  fi

  if want tma; then
    # The twenty-first session's W4A8 kernels fed by tensor-map copies (kernels/quant/w4a8_sm90.cu, opt-in through
    # LLAMA32_W4A8_KERNEL, built without a GPU). Their tests first (the tests stage runs them when it ran in this
    # call), each launch under the 30-second stall watchdog.
    local tt w8
    if [[ -x "$bundle/tests/gpu" ]]; then
      want tests || for tt in cuda_w4a8_wgmma::w4a8_wgmma_tma_matches_its_cpu_twin_bit_for_bit \
        cuda_w4a8_wgmma::w4a8_wgmma_ws_tma_matches_its_cpu_twin_bit_for_bit; do
        gpu_test_env tma "$tt" LLAMA32_TEST_STALL_S="${LLAMA32_TEST_STALL_S:-30}"
      done
      for w8 in wgmma-tma wgmma-ws-tma; do
        want tests || gpu_test_env "w4a8=$w8" cuda_quant::e2e::quantized_checkpoint_on_cuda_matches_cpu \
          LLAMA32_W4A8_KERNEL="$w8"
      done
    fi
    # Kernel by kernel at m = 256 and 1024 (1B to 90B shapes): the TMA kernels beside the ones they would replace.
    if [[ -x "$bundle/bench/cuda_kernels" && -z ${GPU_SUITE_SKIP_CRITERION:-} ]]; then
      log="$logs/criterion.tma.log"
      rc=0
      (cd "$(mktemp -d)" && LLAMA32_BENCH_W4A8_M=256,1024 LLAMA32_BENCH_W4A8_TMA=1 tmo 240 \
        "$bundle/bench/cuda_kernels" --bench --noplot \
        'quant/w4a8_wgmma-(row|ws|tma|ws-tma)_m') >"$log" 2>&1 || rc=$?
      mapfile -t -O "${#benches[@]}" benches < <(awk '/^quant\// {name=$1} /thrpt:/ {print "criterion " name " " $0}' "$log")
      if ((rc != 0)); then
        failed=$((failed + 1))
        rows+=("$(printf '%-4s  %-16s %-48s %7s' FAIL criterion "quant/w4a8 tma (see $log)" -)")
        tail -n 5 "$log"
      fi
    fi
    # End to end: 1B W4A8 prefill of 4 x 2048 tokens (m = 8192: wgmma-row by default) and batch-64 decode (m = 64:
    # wgmma-ws by default), each against its TMA form.
    for w8 in wgmma-row wgmma-tma; do
      LLAMA32_W4A8_KERNEL=$w8 bench_e2e 60 "1b 4 2048 8 --quantize w4a8-g32"
    done
    for w8 in wgmma-ws wgmma-ws-tma; do
      LLAMA32_W4A8_KERNEL=$w8 bench_e2e 60 "1b 64 128 64 --quantize w4a8-g32"
    done
  fi

  if want prefill && [[ -x "$bundle/tests/gpu" ]]; then
    # The kernel twin tests (cuda_attention::paged_prefill_matches_cpu, and paged_prefill_ws_matches_wgmma_bits for
    # the warp-specialized kernel) run in the tests stage; here the golden checkpoints go through the executor with
    # each Hopper kernel forced, one process each.
    local pk
    for pk in wgmma wgmma-ws; do
      log="$logs/gpu.cuda_golden.prefill-$pk.log"
      rc=0
      LLAMA32_PREFILL_KERNEL=$pk tmo 150 "$bundle/tests/gpu" cuda_golden:: --test-threads=1 >"$log" 2>&1 || rc=$?
      if ((rc == 0)) && ! grep -q 'skipped:' "$log"; then
        rows+=("$(printf '%-4s  %-16s %-48s %7s' PASS gpu "cuda_golden:: with LLAMA32_PREFILL_KERNEL=$pk" -)")
      else
        failed=$((failed + 1))
        rows+=("$(printf '%-4s  %-16s %-48s %7s' FAIL gpu "cuda_golden:: with LLAMA32_PREFILL_KERNEL=$pk" -)")
        tail -n 15 "$log"
      fi
    done
    gpu_bench 120 'GB/s|TFLOP/s' cuda_attention::paged_attention_throughput
    [[ -n ${GPU_SUITE_SKIP_PEERS:-} ]] || peers 90 ceilings,sdpa sdpa
    # Prefill-bound rows end to end (prefill tok/s), each kernel back to back.
    local pspec
    for pspec in "3b 4 2048 8" "1b 4 4096 8"; do
      for pk in mma wgmma wgmma-ws; do LLAMA32_PREFILL_KERNEL=$pk bench_e2e 90 "$pspec"; done
    done
  fi

  if want targets; then
    # The text issues' targets on this card, back to back: 1B and 3B batch-1 decode (the defaults, then both decode
    # fusions, then the persistent decode stack), 1B batch 64, 1B W4A16 at batch 1 (also with int8 tables, then those
    # through the persistent decode stack) and 16 (the direct kernel's L2 prefetch by
    # shape, then forced off and on at batch 16), 1B batch 1 with each kind of call left out in turn, 1B / 3B batch 1
    # with the decode attention split at 64 and 32 positions; then the W4A16 kernels at the 1B and 90B shapes with
    # that prefetch forced off, then on, and at the 11B and 90B shapes with 8 split-K blocks per SM (default 4);
    # then the copy and GEMM ceilings and HF transformers eager decode (1B, 3B).
    local tspec pf
    for tspec in "1b 1 128 64" "1b 1 128 64 --fused-rope --fused-norm" "1b 1 128 64 --persistent-decode" \
      "3b 1 128 64" "3b 1 128 64 --fused-rope --fused-norm" "3b 1 128 64 --persistent-decode" "1b 64 512 64" \
      "1b 1 128 64 --quantize w4a16-g32" \
      "1b 1 128 64 --quantize w4a16-g32 --embeddings int8" \
      "1b 1 128 64 --quantize w4a16-g32 --embeddings int8 --persistent-decode" "1b 16 128 64 --quantize w4a16-g32"; do
      bench_e2e 60 "$tspec"
    done
    for pf in 0 1; do
      LLAMA32_W4A16_PREFETCH=$pf bench_e2e 60 "1b 16 128 64 --quantize w4a16-g32"
    done
    # The bf16 skinny GEMM asking L2 for its blocks' whole weight rows before it waits (LLAMA32_GEMV_PREFETCH=whole)
    # against the first step only (the default), at batch 1.
    for tspec in "1b 1 128 64" "3b 1 128 64"; do LLAMA32_GEMV_PREFETCH=whole bench_e2e 60 "$tspec"; done
    # Marginal costs in the real pipeline (graphs, PDL): 1B batch 1 with one kind of call left out (`--ablate`; the
    # tokens are meaningless), against the first row above.
    local ab
    for ab in add_rms_norm attention linear_o linear_qkv+rope+cache linear_down linear_lm_head; do
      bench_e2e 60 "1b 1 128 64 --ablate $ab"
    done
    # Decode attention split at short contexts (LLAMA32_DECODE_SPLIT_POSITIONS, default 256): batch 1 of 1B and 3B.
    local sp
    # Then with the splits merged in the decode kernel's last CTA (LLAMA32_DECODE_MERGE=fused: no merge launch).
    for sp in 64 32; do
      LLAMA32_DECODE_SPLIT_POSITIONS=$sp bench_e2e 60 "1b 1 128 64"
      LLAMA32_DECODE_SPLIT_POSITIONS=$sp bench_e2e 60 "3b 1 128 64"
      LLAMA32_DECODE_SPLIT_POSITIONS=$sp LLAMA32_DECODE_MERGE=fused bench_e2e 60 "1b 1 128 64"
      LLAMA32_DECODE_SPLIT_POSITIONS=$sp LLAMA32_DECODE_MERGE=fused bench_e2e 60 "3b 1 128 64"
    done
    if [[ -f $logs/bench.jsonl ]]; then
      mapfile -t -O "${#benches[@]}" benches < <(python3 - "$logs/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
same = ("model", "batch", "prompt_tokens", "fused_rope", "fused_norm", "fused_swiglu", "pdl", "w4a16_prefetch",
        "persistent_decode")
def base_of(d, differ):
    keys = [k for k in same + ("decode_split_positions",) if k != differ]
    return next((e for e in rows if not e.get("ablate") and e.get("decode_split_positions") == 256
                 and all(e.get(k) == d.get(k) for k in keys)), None)
for d in rows:
    split = d.get("decode_split_positions")
    if d.get("ablate"):
        base = base_of(d, None)
        if base:
            a, b = base["decode_ms_per_step"], d["decode_ms_per_step"]
            print("ablate %-24s %s b%d: %.3f -> %.3f ms/step (marginal %.1f us/step)" % (
                ",".join(d["ablate"]), d.get("model"), d["batch"], a, b, (a - b) * 1e3))
    elif split not in (None, 256):
        base = base_of(d, "decode_split_positions")
        if base:
            a, b = base["decode_ms_per_step"], d["decode_ms_per_step"]
            merge = ", fused merge" if d.get("decode_merge") == "fused" else ""
            print("split  %-24s %s b%d: %.3f -> %.3f ms/step (%.2fx)" % (
                "%d positions%s" % (split, merge), d.get("model"), d["batch"], a, b, a / b))
PY
      )
    fi
    ab_lines
    if [[ -x "$bundle/tests/gpu" ]]; then
      for pf in 0 1; do
        LLAMA32_QUANT_SHAPES=1b,90b LLAMA32_W4A16_PREFETCH=$pf gpu_bench 90 'GB/s|TFLOP/s' \
          cuda_quant::quant_throughput "prefetch$pf"
      done
      # More split-K blocks per SM (default 4) on the 11B / 90B shapes: more loads in flight at m = 1.
      LLAMA32_QUANT_SHAPES=11b,90b LLAMA32_W4A16_BLOCKS_PER_SM=8 gpu_bench 90 'GB/s|TFLOP/s' \
        cuda_quant::quant_throughput blocks8
    fi
    [[ -n ${GPU_SUITE_SKIP_PEERS:-} ]] || peers 90 ceilings,hf ceilings-hf
  fi

  if want bulk; then
    # The bulk W4A16 kernel (TMA ring, stream-K; Hopper, m <= 16) beside the others: every kernel at the 1B / 11B /
    # 90B shapes, then 1B W4A16 decode at batch 1 and 16 and 11B Vision W4A16 at batch 1 and 16, each by shape (the
    # default) and with the bulk kernel forced (LLAMA32_W4A16_KERNEL=bulk; it applies at m <= 16), bf16 1B beside.
    [[ -x "$bundle/tests/gpu" ]] && gpu_bench 150 'GB/s|TFLOP/s' cuda_quant::quant_throughput
    local bspec
    for bspec in "1b 1 128 64" "1b 1 128 64 --quantize w4a16-g32" "1b 16 128 64 --quantize w4a16-g32"; do
      bench_e2e 60 "$bspec"
    done
    for bspec in "1b 1 128 64 --quantize w4a16-g32" "1b 16 128 64 --quantize w4a16-g32"; do
      LLAMA32_W4A16_KERNEL=bulk bench_e2e 60 "$bspec"
    done
    if [[ -x "$bundle/tests/gpu" && -z ${GPU_SUITE_SKIP_VISION:-} ]]; then
      gpu_bench 150 '^BENCH ' cuda_vision_quant::bench_mllama_11b_w4a16_decode auto
      LLAMA32_W4A16_KERNEL=bulk gpu_bench 150 '^BENCH ' cuda_vision_quant::bench_mllama_11b_w4a16_decode bulk
    fi
  fi

  if want wgmma; then
    # The Hopper GEMMs beside the default paths: the W4A8 kernels (wgmma, wgmma-serial, wgmma-row, wgmma-ws:
    # kernels/quant/w4a8_sm90.cu) and the large-m W4A16 kernels (wgmma, wgmma-row: kernels/quant/w4a16_sm90.cu).
    # Their twin tests and the golden end-to-end test with each forced, the criterion W4A8 (m = 64, 256, 1024) and
    # large-m W4A16 (m = 256, 1024) lines at the 1B / 11B / 90B shapes with cuBLAS bf16 at the same shapes in the
    # same call, and 1B end to end with each. About six minutes.
    if [[ -x "$bundle/tests/gpu" ]]; then
      local wt wk
      for wt in cuda_w4a8_wgmma::w4a8_wgmma_matches_its_cpu_twin_bit_for_bit \
        cuda_w4a8_wgmma::w4a8_wgmma_row_matches_its_cpu_twin_bit_for_bit \
        cuda_w4a8_wgmma::w4a8_wgmma_ws_matches_its_cpu_twin_bit_for_bit \
        cuda_w4a8_wgmma::w4a8_wgmma_refuses_what_it_cannot_take cuda_quant::w4a8_matches_cpu \
        cuda_w4a16_large::w4a16_large_matches_cpu cuda_w4a16_large::w4a16_large_row_matches_cpu \
        cuda_w4a16_large::w4a16_large_paired_swiglu_matches_plain_then_silu_mul \
        cuda_quant::e2e::quantized_checkpoint_on_cuda_matches_cpu; do
        for wk in auto wgmma wgmma-serial wgmma-row wgmma-ws large large-row; do
          [[ $wk == auto || $wt == *e2e* ]] || continue
          local w8=$wk w16=auto
          [[ $wk == large ]] && w8=auto w16=wgmma
          [[ $wk == large-row ]] && w8=auto w16=wgmma-row
          gpu_test_env "$wk" "$wt" LLAMA32_W4A8_KERNEL="$w8" LLAMA32_W4A16_LARGE="$w16"
        done
      done
    fi
    if [[ -x "$bundle/bench/cuda_kernels" ]]; then
      log="$logs/criterion.wgmma.log"
      rc=0
      (cd "$(mktemp -d)" && LLAMA32_BENCH_W4A8_M=64,256,1024 tmo 240 "$bundle/bench/cuda_kernels" --bench --noplot \
        'quant/w4a(8|16_large)') >"$log" 2>&1 || rc=$?
      mapfile -t -O "${#benches[@]}" benches < <(awk '/^quant\// {name=$1} /thrpt:/ {print "criterion " name " " $0}' "$log")
      if ((rc != 0)); then
        failed=$((failed + 1))
        rows+=("$(printf '%-4s  %-16s %-48s %7s' FAIL criterion "quant/w4a8, w4a16_large (see $log)" -)")
        tail -n 5 "$log"
      fi
    fi
    LLAMA32_PEERS_QUANT_M=64,256,1024 peers 90 quant wgmma
    local w8
    for w8 in mma wgmma wgmma-serial wgmma-row wgmma-ws; do
      LLAMA32_W4A8_KERNEL=$w8 bench_e2e 60 "1b 64 128 64 --quantize w4a8-g32"
    done
    for w8 in dequant wgmma wgmma-row; do
      LLAMA32_W4A16_LARGE=$w8 bench_e2e 60 "1b 64 128 64 --quantize w4a16-g32"
    done
    # Batch-64 decode through the large-m path instead of the decode kernels (LLAMA32_W4A16_LARGE_MIN_M=33), with
    # the dequantize + cuBLASLt path and with the wgmma-row kernel; bf16 at the same batch beside them.
    bench_e2e 60 "1b 64 128 64"
    for w8 in dequant wgmma-row; do
      LLAMA32_W4A16_LARGE_MIN_M=33 LLAMA32_W4A16_LARGE=$w8 bench_e2e 60 "1b 64 128 64 --quantize w4a16-g32"
    done
  fi

  if want ncu && [[ -x "$bundle/tests/gpu" ]]; then
    # Nsight Compute over one launch of each kernel of interest (the ignored ncu_* tests): speed of light, memory
    # workload, occupancy and warp states. The whole report stays in the log; one line per kernel joins the table.
    log="$logs/ncu.log"
    rc=0
    if ! command -v ncu >/dev/null; then
      failed=$((failed + 1))
      rows+=("$(printf '%-4s  %-16s %-48s %7s' FAIL ncu "ncu is not on this machine" -)")
    else
      # --clock-control none: the GPU's own clocks, as in the benches (ncu locks base clocks by default).
      # GPU_SUITE_NCU_KERNELS (a regex of kernel names) narrows the launches profiled.
      tmo 300 ncu --clock-control none --kernel-name regex:"${GPU_SUITE_NCU_KERNELS:-w4a16|w4a8|gemv|prefill|decode}" \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
        --section SchedulerStats --section ComputeWorkloadAnalysis --section LaunchStats \
        "$bundle/tests/gpu" --ignored ncu_ --test-threads=1 --nocapture >"$log" 2>&1 || rc=$?
      local ncu_lines=()
      mapfile -t ncu_lines < <(python3 - "$log" <<'PY'
import re, sys
kernel, grid, m = None, "", {}
def flush():
    if kernel:
        get = lambda k: m.get(k, ("?", ""))
        d = get("Duration")
        name = re.sub(r"\([^()]*\)$", "", kernel.replace("<unnamed>::", "").replace("(anonymous namespace)::", ""))
        name = re.sub(r"^void ", "", name).split("::")[-1]
        print("ncu %-34s %-22s %8s %-2s DRAM %5s%%  L2 %5s%%  SM %5s%%  occupancy %5s%%  cycles/issue %s" % (
            name[:34], grid, d[0], d[1], get("DRAM Throughput")[0], get("L2 Cache Throughput")[0],
            get("Compute (SM) Throughput")[0], get("Achieved Occupancy")[0],
            get("Warp Cycles Per Issued Instruction")[0]))
for line in open(sys.argv[1], errors="replace"):
    h = re.match(r"^  (\S.*?) (\(\d+, \d+, \d+\)x\(\d+, \d+, \d+\)), Context", line)
    if h:
        flush()
        kernel, grid, m = h.group(1), h.group(2).replace(" ", ""), {}
        continue
    v = re.match(r"^\s{4}(\S.*?\S)\s{2,}(\S+)\s+([\d.,]+)\s*$", line)
    if v and kernel and v.group(1) not in m:
        m[v.group(1)] = (v.group(3).replace(",", ""), v.group(2))
flush()
PY
      )
      # PASS needs the targets to have run and ncu to have reported on them (blocked performance counters print
      # no sections).
      if ((rc == 0)) && grep -q '^ncu target' "$log" && ((${#ncu_lines[@]} > 0)); then
        rows+=("$(printf '%-4s  %-16s %-48s %7s' PASS ncu "ncu_* targets (see $log)" -)")
        benches+=("${ncu_lines[@]}")
      else
        failed=$((failed + 1))
        rows+=("$(printf '%-4s  %-16s %-48s %7s' FAIL ncu "ncu_* targets (see $log)" -)")
        tail -n 15 "$log"
      fi
    fi
  fi

  if want profile; then
    # Where a step's time goes, call by call (llama32 bench --profile: eager, with an event around each call, after a
    # device head start long enough for the host to issue the whole step), for the decode-bound rows and the
    # fusions. Each run's decode and prefill tables join the table, prefixed with its spec.
    local pspec plog
    for pspec in "1b 1 128 16" "1b 1 128 16 --fused-rope --fused-norm" "3b 1 128 16" "1b 64 512 16" \
      "1b 1 128 16 --quantize w4a16-g32"; do
      bench_e2e 120 "$pspec --profile 5"
      plog=$last_bench_log
      mapfile -t -O "${#benches[@]}" benches < <(sed -n '/^profile: /,/^step /p' "$plog" | sed "s/^/[$pspec] /")
    done
  fi

  if want e2e; then
    # End-to-end figures on random weights at the real shapes (JSON lines in $logs/bench.jsonl).
    # Each spec: preset, batch, prompt tokens, generated tokens, then extra flags (ablations of graphs / skinny GEMM).
    local spec line
    for spec in "1b 1 128 64" "1b 1 128 64 --no-skinny-gemm" "1b 1 128 64 --cuda-graph-max-batch 0" \
      "1b 1 128 64 --no-fused-swiglu" \
      "3b 1 128 64" "1b 64 512 64" "1b 1 128 64 --quantize w4a16-g32" "1b 1 128 64 --quantize w4a8-g32" \
      "1b 64 512 64 --quantize w4a8-g32"; do
      bench_e2e 180 "$spec"
    done
    # Without programmatic dependent launch (LLAMA32_PDL=0) on the decode-bound rows, beside the rows above.
    export LLAMA32_PDL=0
    for spec in "1b 1 128 64" "3b 1 128 64" "1b 64 512 64"; do bench_e2e 180 "$spec"; done
    unset LLAMA32_PDL

    # Offline throughput through the scheduler (serving issue target: 1B, 2000 x 512 prompt tokens, 256 generated).
    log="$logs/bench.offline.log"
    rc=0
    timeout 240 "$bundle/bin/llama32" bench --preset 1b --device cuda --batch 2000 --prompt-tokens 512 \
      --gen-tokens 256 >"$log" 2>&1 || rc=$?
    line=$(grep '^{' "$log" | tail -1 || true)
    if ((rc == 0)) && [[ -n $line ]]; then
      echo "$line" >>"$logs/bench.jsonl"
      rows+=("$(printf '%-4s  %-16s %-48s %7s' PASS bench "offline 1b 2000 x p512 g256" -)")
      benches+=("$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print("offline 1b 2000x512+256: %.0f output tok/s (%.1f s)" % (d["output_tok_per_s"], d["total_s"]))' "$line")")
    else
      failed=$((failed + 1))
      rows+=("$(printf '%-4s  %-16s %-48s %7s' FAIL bench "offline 1b 2000 x p512 g256" -)")
      tail -n 5 "$log"
    fi

    # Server latency: streaming clients against an in-process server (TTFT / ITL at 1, 16, 64, 256 clients).
    log="$logs/bench-serve.log"
    rc=0
    timeout 300 "$bundle/bin/llama32" bench-serve --preset 1b --random-weights --device cuda --clients 1,16,64,256 \
      --requests-per-client 2 --prompt-tokens 512 --max-tokens 128 >"$log" 2>&1 || rc=$?
    if ((rc == 0)) && grep -q '^{' "$log"; then
      grep '^{' "$log" >>"$logs/bench.jsonl"
      rows+=("$(printf '%-4s  %-16s %-48s %7s' PASS bench-serve "1b p512 g128, 1/16/64/256 clients" -)")
      mapfile -t -O "${#benches[@]}" benches < <(grep '^{' "$log" | python3 -c '
import json, sys
for l in sys.stdin:
    d = json.loads(l)
    print("serve %3d clients: TTFT p50 %7.1f p99 %7.1f ms  ITL p50 %6.2f p99 %6.2f ms  %8.0f tok/s  ok %d err %d" % (
        d["clients"], d["ttft_ms"]["p50"], d["ttft_ms"]["p99"], d["itl_ms"]["p50"], d["itl_ms"]["p99"],
        d["output_tok_per_s"], d["ok"], d["errors"]))')
    else
      failed=$((failed + 1))
      rows+=("$(printf '%-4s  %-16s %-48s %7s' FAIL bench-serve "1b p512 g128, 1/16/64/256 clients" -)")
      tail -n 5 "$log"
    fi
  fi

  local summary=/dev/null
  [[ -n ${OUT:-} ]] && summary="$OUT/summary.txt"
  {
    echo
    echo "GPU suite @ $(cat "$bundle/REVISION" 2>/dev/null || echo unknown) on: $device"
    ((${#benches[@]})) && printf 'bench %s\n' "${benches[@]}"
    echo "LLAMA32_TEST_DATA=${LLAMA32_TEST_DATA:-<unset>}  logs: $logs"
    printf '%s\n' "${rows[@]}"
    echo "$((${#rows[@]} - failed)) of ${#rows[@]} passed"
  } | tee "$summary"
  ((failed == 0))
}

case "${1:-build}" in
  build) build ;;
  run) run "${2:-}" ;;
  run-tp) run_tp ;;
  *)
    echo "usage: scripts/gpu-suite.sh [build|run [tests,quant,kernels,vision,vquant,e2e,pdl,profile,ncu,prefill,targets,bulk,wgmma,stack,fresh,defaults,prewait,tma]|run-tp]" >&2
    exit 2
    ;;
esac
