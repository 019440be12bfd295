"""benchmarks/gpu_run.sh --dry-run: every step of the one-call GPU script runs on the CPU and leaves its two files.

The lent GPU machine gives one 10-minute call at a time, so the script must work the first time there: this runs
the same script, the same steps in the same order, at tiny sizes (Triton interpreter, the CPU extension), and checks
the exit status (0 only when every step passed), the summary and the tarball (at most 8 files come back from the GPU
machine: the script leaves exactly two).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("env", "bench_linear", "build", "tests", "bench_align", "bench_freq")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_run_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, TMPDIR=str(tmp_path))
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), "--dry-run", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)
    summary_path = out / "summary.txt"
    assert summary_path.exists(), f"no summary.txt; stdout/stderr tail:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
    summary = summary_path.read_text()
    assert proc.returncode == 0, f"gpu_run.sh --dry-run exited {proc.returncode}:\n{summary}"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_run.tar.gz", "summary.txt"]
    assert summary.startswith("gpu_run --dry-run") and "0 failed step(s)" in summary.splitlines()[0]
    for name in STEPS:
        lines = [ln for ln in summary.splitlines() if ln.startswith(f"step {name} ")]
        assert len(lines) == 1 and "rc=0 " in lines[0], f"step {name}: {lines}"
    assert "check ok" in summary and "check FAIL" not in summary, "the benchmark's correctness checks"
    assert " passed" in summary and " failed" not in summary.split("--- tests", 1)[1].split("--- bench_align")[0]
    with tarfile.open(out / "gpu_run.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    for want in ["summary.txt", "env.log", "build.log", "bench_linear.log", "tests.log", "bench_align.log",
                 "linear_gpu.csv", "grad_align.csv", "bench_freq.log", "frequency.jsonl"]:
        assert want in names, f"tarball lacks {want}: {sorted(names)}"
    # Nothing left behind in the repository or the temporary directory.
    assert not list(tmp_path.glob("gpu_run.*")), "the work directory was not removed"


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python in gpu_run.sh: the benchmark fails, the grad-align benchmark hangs, the rest succeed at once.
case "$*" in
  *bench_linear_gpu.py*) echo "simulated failure"; exit 3 ;;
  *bench_grad_align.py*) sleep 60 ;;
  *"-m pytest"*) echo "1 passed in 0.01s" ;;
  *) exit 0 ;;
esac
"""


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_run_a_failing_or_hanging_step_never_stops_the_next(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(fake), TMPDIR=str(tmp_path), GPU_RUN_BUDGET_S="15")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), "--dry-run", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    summary = (out / "summary.txt").read_text()
    rcs = {}
    for line in summary.splitlines():
        if line.startswith("step "):
            name, rc = line.split()[1], line.split("rc=")[1].split()[0]
            rcs[name] = int(rc)
    assert set(rcs) == set(STEPS), summary
    assert rcs["bench_linear"] == 3 and rcs["tests"] == 0, summary
    assert rcs["bench_align"] == 124, f"the hanging step was not cut by its timeout:\n{summary}"
    failed = sum(rc != 0 for rc in rcs.values())
    assert proc.returncode == failed and summary.startswith(f"gpu_run --dry-run (CPU, Triton interpreter): {failed} failed")
    assert sorted(p.name for p in out.iterdir()) == ["gpu_run.tar.gz", "summary.txt"]
