#!/usr/bin/env bash
# The one GPU call: the whole test suite on CUDA, the offline sm_90 report, and the GPU benchmarks, in one go
# (well under 10 minutes on an H100). Written for the lent GPU machine (Python 3.12, torch 2.11, triton 3.6, peft,
# pytest and pytest-benchmark preinstalled); works on any CUDA machine with the package's dependencies.
#
#   bash benchmarks/gpu_run.sh [OUTDIR]      # logs, CSVs and plots land in OUTDIR (default $OUT or benchmarks/out/gpu)
#
# Every step runs even if an earlier one fails; the script's exit code is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/out/gpu}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
failed=0
step() {  # step NAME CMD...: run, tee the log, count failures
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$out/summary.txt"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$out/env.txt"

# The wheel test reinstalls torch into a clean venv: that is CI's job, not the GPU's.
step tests python3 -m pytest tests -q -p no:cacheprovider --ignore=tests/test_wheel.py
step sm90_report python3 benchmarks/sm90_report.py --subset
step bench_linear_gpu python3 benchmarks/bench_linear_gpu.py --quick --out "$out/linear_gpu.csv"
step bench_grad_align python3 benchmarks/bench_grad_align.py --device cuda --quick
cp benchmarks/out/*.csv benchmarks/out/*.png "$out/" 2>/dev/null || true
echo "failed steps: $failed" | tee -a "$out/summary.txt"
exit "$failed"
