#!/usr/bin/env bash
# The one GPU call: everything a lent GPU machine should tell us, in at most 6 minutes with cold caches.
#
#   bash benchmarks/gpu_run.sh [OUTDIR]              # on the GPU machine (OUTDIR defaults to $OUT)
#   bash benchmarks/gpu_run.sh --dry-run OUTDIR      # the same steps on the CPU: tiny sizes, Triton interpreter,
#                                                    # the CPU extension (CI runs it: tests/test_gpu_run_dry.py)
#
# Steps, in order, each under its own `timeout` (and all under one overall deadline); a failing step never stops the
# next one. Estimated on an H100 host (16 cores) with cold caches, from the offline sm_90 compiles
# (benchmarks/sm90_report.py: 0.7-0.8 s per kernel variant, ptxas included, on one loaded core here):
#   step          estimate   limit   what
#   env              3 s       30 s  one line: GPU, driver, python, torch, CUDA, triton, transformers
#   build         60-120 s    240 s  the grad-align extension (`python -m muscle_kernels.build --cuda`,
#                                    TORCH_CUDA_ARCH_LIST=9.0), in the background while the benchmark runs. The
#                                    machine's torch is 2.11, so this is the build against 2.11's own headers
#                                    (offline: tools/build_against_torch.py with the 2.11 wheel)
#   bench_linear 120-150 s    150 s  benchmarks/bench_linear_gpu.py --quick: every case checked (y, dx, dL, dR vs
#                                    fp32), then timed. Case 1 (n*r 16) compiles ~36 variants (5 autotuned GEMM
#                                    modes x 6 configs, the 5th being dx with dR folded in for auto's "triton-fdx",
#                                    shrink, reductions): ~30 s of compiles + ~15 s of checks and timings (7
#                                    providers x 3 modes); case 2 (n*r 64) and case 3 (dropout) ~21 variants each:
#                                    ~30 s; the other 4 cases only re-tune (~11 s each). No case starts after 110 s,
#                                    so the fold's ~15 s of compiles cost about one of the last shapes (the three
#                                    first cases hold every kind of figure); each case's goal line is printed as it
#                                    ends.
#   tests         60-90 s      90 s  the GPU-only tests (Triton kernels and configs at real shapes, registration, auto
#                                    choice, device guard, CUDA grad-align), in parallel (pytest-xdist) with a
#                                    per-test timeout when the plugins exist; stopped with SIGINT so that pytest
#                                    still prints its failure list, and a JUnit XML (tests.xml) of what finished
#   bench_align   20-40 s      40 s  benchmarks/bench_grad_align.py --device cuda --quick
#   bench_freq    10-20 s      25 s  benchmarks/bench_frequency.py --device cuda --n 100000: torch vs Triton
# Sum of the limits: 335 s (the build overlaps the benchmark), under the overall budget of 345 s (GPU_RUN_BUDGET_S),
# under 6 minutes with the packing; the biggest figures (the linear layer's) come first.
# OUTDIR receives exactly two files, gpu_run.tar.gz (every log, CSV and plot) and summary.txt (the step table and
# the lines that matter from each log), rewritten after every step: a call cut short by the device's own limit still
# brings back everything up to the last finished step. Exit status: the number of failed steps (0 only when every
# step passed).
# --dry-run scales every limit with the machine (at least 2x; more when the load per core is high, e.g. 2 cores shared
# with another job; GPU_RUN_SCALE overrides): it checks the plumbing, so it must not time out on a loaded CI box.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:-${OUT:-}}
if [ -z "$out" ]; then echo "usage: gpu_run.sh [--dry-run] OUTDIR (or set OUT)" >&2; exit 2; fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX")
trap 'rm -rf "$work"' EXIT

PY=${PYTHON:-python3}
export PY PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
total_budget=${GPU_RUN_BUDGET_S:-345}  # 6 minutes less the packing at the end
scale=1
if [ "$dry" = 1 ]; then
  # The interpreter and the CPU extension on a CI box: slower than the GPU machine, and maybe sharing its cores.
  # scale = max(2, ceil(2 (load + 1) / cores)), at most 8: e.g. 2 for an idle 2-core box, 4 with 3 busy processes.
  cores=$(nproc 2> /dev/null || echo 1)
  load=$(cut -d' ' -f1 /proc/loadavg 2> /dev/null || echo 0)
  scale=$(awk -v l="$load" -v c="$cores" 'BEGIN { s = 2 * (l + 1) / c; s = (s == int(s)) ? s : int(s) + 1;
                                                  print (s < 2) ? 2 : (s > 8) ? 8 : s }')
  scale=${GPU_RUN_SCALE:-$scale}
  total_budget=$(( total_budget * scale ))
  export TRITON_INTERPRET=1
  build_args=(--cpu-only)
  bench_args=(--dry-run --budget-s $(( 60 * scale )))
  align_args=(--device cpu --quick --lists bert-base-lora --no-plot)
  freq_args=(--device cpu --n 300 --d 16 --backends torch)
  workers=2
else
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
  build_args=(--cuda)
  bench_args=(--quick --rep 50 --budget-s 110)
  align_args=(--device cuda --quick)
  freq_args=(--device cuda --n 100000 --backends torch,triton)
  workers=12
fi

start=$SECONDS
failed=0
steps=()
remaining() { echo $(( total_budget - (SECONDS - start) )); }
limit() {  # limit WANTED: the step's timeout (times the dry run's scale), cut to what is left of the budget (>= 5 s)
  local want=$(( $1 * scale )) r; r=$(remaining)
  [ "$r" -lt "$want" ] && echo $(( r > 5 ? r : 5 )) || echo "$want"
}
record() {  # record NAME RC SECONDS
  steps+=("$(printf '%-12s rc=%-3s %4s s' "$1" "$2" "$3")")
  [ "$2" -eq 0 ] || failed=$((failed + 1))
}

summary() {  # summary STATE: the step table first, then the lines that matter from each log (those there so far)
  echo "gpu_run $([ "$dry" = 1 ] && echo "--dry-run (CPU, Triton interpreter)" || echo "(GPU)"): $failed failed" \
       "step(s), $((SECONDS - start)) s ($1)"
  [ "$dry" = 1 ] && echo "dry-run limits scaled x$scale (budget $total_budget s)"
  [ -f "$work/env.log" ] && sed 's/^/env: /' "$work/env.log"
  for s in "${steps[@]}"; do echo "step $s"; done
  if [ -f "$work/build.log" ]; then echo "--- build"; tail -n 8 "$work/build.log"; fi
  if [ -f "$work/bench_linear.log" ]; then
    echo "--- bench_linear (checks, goals, choices, as each case ended)"
    # Up to the end-of-run recap (which repeats the per-case lines): a run cut short has no recap at all.
    awk '/^goals \(all cases\):/ { exit } { print }' "$work/bench_linear.log" \
      | grep -E "^check|^goal|^auto |^mask|^budget|TIMEOUT|Error|error" | head -n 80
    grep -E "^autotune|^[0-9]+ goal line|^checks:" "$work/bench_linear.log" | head -n 30
    echo "--- bench_linear table"; grep -E "^ *[0-9]+ +[0-9]+ +[0-9]+ " "$work/bench_linear.log" | head -n 40
  fi
  if [ -f "$work/tests.log" ]; then
    echo "--- tests"
    if grep -q "short test summary info" "$work/tests.log"; then
      sed -n '/short test summary info/,$p' "$work/tests.log" | head -n 60
    else
      tail -n 30 "$work/tests.log"
    fi
    # What finished, from the JUnit XML (written on SIGINT too; not after a SIGKILL)
    [ -f "$work/tests.xml" ] && "$PY" -c '
import sys
import xml.etree.ElementTree as ET
# (the test running when SIGINT came is a <testcase> without a name)
cases = [c for c in ET.parse(sys.argv[1]).getroot().iter("testcase") if c.get("name")]
bad = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
print(f"junit: {len(cases)} test(s) finished, {len(bad)} with a failure or an error")
for c in bad:
    print("junit FAILED " + c.get("classname", "?") + "::" + c.get("name", "?"))
' "$work/tests.xml" 2>&1 | head -n 40
  fi
  if [ -f "$work/bench_align.log" ]; then
    echo "--- bench_align"; grep -E "^[a-z]+:|TIMEOUT|Error" "$work/bench_align.log" | head -n 30
  fi
  if [ -f "$work/bench_freq.log" ]; then echo "--- bench_freq"; tail -n 12 "$work/bench_freq.log"; fi
}
pack() {  # pack STATE: summary.txt and the tarball into OUTDIR now, each replaced by one rename
  summary "$1" > "$work/summary.txt" 2>&1
  tar -czf "$out/.gpu_run.tar.gz.part" -C "$work" . 2> /dev/null
  # tar exits 1 when a file changed while it was read (the background build's log): the archive is still whole.
  [ $? -le 1 ] && mv -f "$out/.gpu_run.tar.gz.part" "$out/gpu_run.tar.gz"
  rm -f "$out/.gpu_run.tar.gz.part"
  cp "$work/summary.txt" "$out/.summary.txt.part" && mv -f "$out/.summary.txt.part" "$out/summary.txt"
}

step_signal=TERM
step() {  # step NAME TIMEOUT CMD...: run under timeout into work/NAME.log, then pack what there is so far
  local name=$1 t; t=$(limit "$2"); shift 2
  local t0=$SECONDS
  echo "=== $name (timeout ${t}s): $*"
  timeout -s "$step_signal" --kill-after=10 "$t" "$@" > "$work/$name.log" 2>&1
  local rc=$?
  [ "$rc" -eq 124 ] && echo "TIMEOUT after ${t}s (SIG$step_signal)" >> "$work/$name.log"
  record "$name" "$rc" $((SECONDS - t0))
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  pack "after $name"
}

# 1. environment
env_step() {
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  else
    echo "gpu: none (nvidia-smi not found)"
  fi
  "$PY" -c "import sys, os, torch, triton, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__, '| devices', torch.cuda.device_count(), '| cpus', os.cpu_count())"
}
export -f env_step
step env 30 bash -c env_step

# 2. the extension, in the background (nvcc takes a while; the benchmark does not need it)
build_t=$(limit 240)
b0=$SECONDS
( timeout --kill-after=5 "$build_t" "$PY" -m muscle_kernels.build "${build_args[@]}" > "$work/build.log" 2>&1
  echo $? > "$work/build.rc" ) &
build_pid=$!

# 3. the linear benchmark with its correctness checks (each case's lines printed as it ends)
step bench_linear 150 "$PY" benchmarks/bench_linear_gpu.py "${bench_args[@]}" --out "$work/linear_gpu.csv"

# The tests below load the extension: wait for the build, but keep the last three steps' limits.
while [ ! -f "$work/build.rc" ] && [ "$(remaining)" -gt $(( (90 + 40 + 25) * scale )) ]; do sleep 1; done
if [ -f "$work/build.rc" ]; then
  wait "$build_pid" 2>/dev/null
  record build "$(cat "$work/build.rc")" $((SECONDS - b0))
else
  record build 1 $((SECONDS - b0))
  echo "still building after $((SECONDS - b0)) s: later steps ran without waiting" >> "$work/build.log"
fi
pack "after build"

# 4. the GPU-only tests, in parallel with a per-test timeout where the plugins are installed. The step is stopped with
# SIGINT, not SIGTERM: on SIGINT pytest still prints the failures so far and writes the JUnit XML.
pytest_args=(-q -p no:cacheprovider -rfEs --junitxml "$work/tests.xml")
"$PY" -c "import xdist" 2> /dev/null && pytest_args+=(-n "$workers")
if "$PY" -c "import pytest_timeout" 2> /dev/null; then
  pytest_args+=(--timeout $(( 60 * scale )))
else  # no per-test timeout: at least the stack of a test still running after 60 s goes into the log
  pytest_args+=(-o "faulthandler_timeout=$(( 60 * scale ))")
fi
# pyproject's addopts names pytest-benchmark's --benchmark-disable: without that plugin pytest would refuse to start
"$PY" -c "import pytest_benchmark" 2> /dev/null || pytest_args+=(-o "addopts=-ra")
gpu_tests=(tests/test_triton_lowrank.py tests/test_triton_configs.py tests/test_triton_registration.py
           tests/test_triton_guard.py tests/test_lowrank_auto.py tests/test_grad_align.py tests/test_grad_align_gpu.py
           tests/test_frequency_triton.py)
# Everything in the Triton/auto files; of grad-align only the CUDA cases (and anything marked gpu).
select="not test_grad_align or cuda or gpu"
if [ "$dry" = 1 ]; then  # the flow, not the coverage (CI runs these files in full anyway)
  select="test_empty_batch or test_opcheck_triton_ops or test_fake_timer_picks_the_faster or \
test_guard_is_taken_from_the_tensors_device or test_every_shipped_config_interpreted and bfloat16-0- or \
test_coefficient_rule"
fi
step_signal=INT
step tests 90 "$PY" -m pytest "${pytest_args[@]}" "${gpu_tests[@]}" -k "$select"
step_signal=TERM

# 5. the grad-align benchmark (writes into benchmarks/out/: moved into the tarball afterwards)
had_csv=0; [ -f benchmarks/out/grad_align.csv ] && had_csv=1
step bench_align 40 "$PY" benchmarks/bench_grad_align.py "${align_args[@]}"
for f in benchmarks/out/grad_align.csv benchmarks/out/grad_align.png; do
  [ -f "$f" ] || continue
  cp "$f" "$work/"
  [ "$had_csv" = 1 ] || rm -f "$f"
done
pack "after bench_align"  # again: the CSV and plot were copied in after the step's own pack

# 6. the frequency-analysis filter at N = 100,000: the chunked torch path against the fused Triton kernel
step bench_freq 25 "$PY" benchmarks/bench_frequency.py "${freq_args[@]}" --json "$work/frequency.jsonl"

pack "done"
cat "$out/summary.txt"
exit "$failed"
