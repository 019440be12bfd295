#!/usr/bin/env bash
# The one GPU call: everything a lent GPU machine should tell us, in at most 6 minutes with cold caches.
#
#   bash benchmarks/gpu_run.sh [OUTDIR]              # on the GPU machine (OUTDIR defaults to $OUT)
#   bash benchmarks/gpu_run.sh --dry-run OUTDIR      # the same steps on the CPU: tiny sizes, Triton interpreter,
#                                                    # the CPU extension (CI runs it: tests/test_gpu_run_dry.py)
#
# Steps, in order, each under its own `timeout` (and all under one overall deadline); a failing step never stops the
# next one:
#   env           one line: GPU, driver, python, torch, CUDA, triton, transformers
#   build         the grad-align extension (`python -m muscle_kernels.build --cuda`, TORCH_CUDA_ARCH_LIST=9.0),
#                 in the background while the benchmark runs
#   bench_linear  benchmarks/bench_linear_gpu.py --quick: every case checked (y, dx, dL, dR vs fp32), then timed
#   tests         the GPU-only tests (Triton kernels and configs at real shapes, registration, auto choice, device
#                 guard, CUDA grad-align), in parallel (pytest-xdist) with a per-test timeout when the plugins exist
#   bench_align   benchmarks/bench_grad_align.py --device cuda --quick
#   bench_freq    benchmarks/bench_frequency.py --device cuda --n 100000: the frequency filter, torch vs Triton
# OUTDIR receives exactly two files: gpu_run.tar.gz (every log, CSV and plot) and summary.txt (the step table and
# the lines that matter from each log). Exit status: the number of failed steps (0 only when every step passed).
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
if [ "$dry" = 1 ]; then
  export TRITON_INTERPRET=1
  build_args=(--cpu-only)
  bench_args=(--dry-run --budget-s 60)
  align_args=(--device cpu --quick --lists bert-base-lora --no-plot)
  freq_args=(--device cpu --n 300 --d 16 --backends torch)
  workers=2
else
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
  build_args=(--cuda)
  bench_args=(--quick --rep 50 --budget-s 95)
  align_args=(--device cuda --quick)
  freq_args=(--device cuda --n 100000 --backends torch,triton)
  workers=12
fi

start=$SECONDS
failed=0
steps=()
remaining() { echo $(( total_budget - (SECONDS - start) )); }
limit() {  # limit WANTED: the step's timeout, cut to what is left of the overall budget (at least 5 s)
  local r; r=$(remaining)
  [ "$r" -lt "$1" ] && echo $(( r > 5 ? r : 5 )) || echo "$1"
}
record() {  # record NAME RC SECONDS
  steps+=("$(printf '%-12s rc=%-3s %4s s' "$1" "$2" "$3")")
  [ "$2" -eq 0 ] || failed=$((failed + 1))
}
step() {  # step NAME TIMEOUT CMD...: run under timeout into work/NAME.log
  local name=$1 t; t=$(limit "$2"); shift 2
  local t0=$SECONDS
  echo "=== $name (timeout ${t}s): $*"
  timeout --kill-after=5 "$t" "$@" > "$work/$name.log" 2>&1
  local rc=$?
  [ "$rc" -eq 124 ] && echo "TIMEOUT after ${t}s" >> "$work/$name.log"
  record "$name" "$rc" $((SECONDS - t0))
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
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

# 3. the linear benchmark with its correctness checks
step bench_linear 130 "$PY" benchmarks/bench_linear_gpu.py "${bench_args[@]}" --out "$work/linear_gpu.csv"

# The tests below load the extension: wait for the build, but keep at least 100 s for the last two steps.
while [ ! -f "$work/build.rc" ] && [ "$(remaining)" -gt 100 ]; do sleep 1; done
if [ -f "$work/build.rc" ]; then
  wait "$build_pid" 2>/dev/null
  record build "$(cat "$work/build.rc")" $((SECONDS - b0))
else
  record build 1 $((SECONDS - b0))
  echo "still building after $((SECONDS - b0)) s: later steps ran without waiting" >> "$work/build.log"
fi

# 4. the GPU-only tests, in parallel with a per-test timeout where the plugins are installed
pytest_args=(-q -p no:cacheprovider -rfEs)
"$PY" -c "import xdist" 2> /dev/null && pytest_args+=(-n "$workers")
"$PY" -c "import pytest_timeout" 2> /dev/null && pytest_args+=(--timeout 90)
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
step tests 115 "$PY" -m pytest "${pytest_args[@]}" "${gpu_tests[@]}" -k "$select"

# 5. the grad-align benchmark (writes into benchmarks/out/: moved into the tarball afterwards)
had_csv=0; [ -f benchmarks/out/grad_align.csv ] && had_csv=1
step bench_align 50 "$PY" benchmarks/bench_grad_align.py "${align_args[@]}"
for f in benchmarks/out/grad_align.csv benchmarks/out/grad_align.png; do
  [ -f "$f" ] || continue
  cp "$f" "$work/"
  [ "$had_csv" = 1 ] || rm -f "$f"
done

# 6. the frequency-analysis filter at N = 100,000: the chunked torch path against the fused Triton kernel
step bench_freq 25 "$PY" benchmarks/bench_frequency.py "${freq_args[@]}" --json "$work/frequency.jsonl"

# Summary: the step table first, then the lines that matter from each log.
{
  echo "gpu_run $([ "$dry" = 1 ] && echo "--dry-run (CPU, Triton interpreter)" || echo "(GPU)"): $failed failed step(s), $((SECONDS - start)) s"
  sed 's/^/env: /' "$work/env.log"
  for s in "${steps[@]}"; do echo "step $s"; done
  echo "--- build"; tail -n 8 "$work/build.log"
  echo "--- bench_linear (checks, goals, choices)"
  grep -E "^check|^goal|goal line|^ *\{'device'|^autotune|^mask|^budget|TIMEOUT|Error|error" "$work/bench_linear.log" | head -n 80
  echo "--- bench_linear table"; grep -E "^ *[0-9]+ +[0-9]+ +[0-9]+ " "$work/bench_linear.log" | head -n 40
  echo "--- tests"; tail -n 40 "$work/tests.log"
  echo "--- bench_align"; grep -E "^[a-z]+:|TIMEOUT|Error" "$work/bench_align.log" | head -n 30
  echo "--- bench_freq"; tail -n 12 "$work/bench_freq.log"
} > "$work/summary.txt" 2>&1
tar -czf "$out/gpu_run.tar.gz" -C "$work" .
cp "$work/summary.txt" "$out/summary.txt"
cat "$out/summary.txt"
exit "$failed"
