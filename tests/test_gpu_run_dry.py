"""benchmarks/gpu_run.sh --dry-run: every step of the one-call GPU script runs on the CPU and leaves its two files.

The lent GPU machine gives one 10-minute call at a time, so the script must work the first time there: this runs
the same script, the same steps in the same order, at tiny sizes (Triton interpreter, the CPU extension), and checks
the exit status (0 only when every step passed), the summary and the tarball (at most 8 files come back from the GPU
machine: the script leaves exactly two).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("env", "bench_linear", "build", "tests", "bench_align", "bench_freq")


@pytest.mark.slow  # every step of the GPU script at tiny sizes: minutes on a 2-core CPU
@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils' timeout"
)
def test_gpu_run_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, TMPDIR=str(tmp_path))
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), "--dry-run", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )  # the script's budget scales
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
    for want in [
        "summary.txt",
        "env.log",
        "build.log",
        "bench_linear.log",
        "tests.log",
        "bench_align.log",
        "linear_gpu.csv",
        "grad_align.csv",
        "bench_freq.log",
        "frequency.jsonl",
    ]:
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


@pytest.mark.slow  # waits out a 15 s budget (a hanging stand-in step)
@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils' timeout"
)
def test_gpu_run_a_failing_or_hanging_step_never_stops_the_next(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(fake), TMPDIR=str(tmp_path), GPU_RUN_BUDGET_S="15", GPU_RUN_SCALE="1")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), "--dry-run", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
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
    assert proc.returncode == failed and summary.startswith(
        f"gpu_run --dry-run (CPU, Triton interpreter): {failed} failed"
    )
    assert sorted(p.name for p in out.iterdir()) == ["gpu_run.tar.gz", "summary.txt"]


def _fake(tmp_path, script):
    fake = tmp_path / "python"
    fake.write_text(script)
    fake.chmod(0o755)
    return fake


HANGING_ALIGN = """#!/usr/bin/env bash
case "$*" in
  *bench_linear_gpu.py*) echo "check ok   (1, 2, 3, nr=16, p=0.0)"; echo "goal ok   (1, 2, 3, 16, 0.0): stub" ;;
  *bench_grad_align.py*) echo started > "$MARK"; sleep 120 ;;
  *"-m pytest"*) echo "1 passed in 0.01s" ;;
  *) exit 0 ;;
esac
"""


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils' timeout"
)
def test_gpu_run_packs_after_every_step(tmp_path):
    """The device call may end the script at any moment (its own limit): OUTDIR must already hold the summary and the
    tarball of every step finished so far. The script is killed (SIGKILL, no trap runs) inside the 5th step."""
    import signal
    import time

    fake = _fake(tmp_path, HANGING_ALIGN)
    out, mark = tmp_path / "out", tmp_path / "align-started"
    env = dict(os.environ, PYTHON=str(fake), TMPDIR=str(tmp_path), GPU_RUN_SCALE="1", MARK=str(mark))
    proc = subprocess.Popen(
        ["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), "--dry-run", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not mark.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert mark.exists(), "the grad-align step never started"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert sorted(p.name for p in out.iterdir()) == ["gpu_run.tar.gz", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert "(after tests)" in summary.splitlines()[0], summary
    for name in ("env", "bench_linear", "build", "tests"):
        assert any(ln.startswith(f"step {name} ") and "rc=0 " in ln for ln in summary.splitlines()), summary
    assert "goal ok   (1, 2, 3, 16, 0.0)" in summary, "the benchmark's goal line is in the summary"
    with tarfile.open(out / "gpu_run.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"env.log", "bench_linear.log", "build.log", "tests.log", "summary.txt"} <= names, names


SIGINT_TESTS = """#!/usr/bin/env bash
# pytest runs the stand-in test file below (one failure, then a hang); everything else succeeds at once.
case "$*" in
  *"-m pytest"*)
    args=("$@"); xml=
    for i in "${!args[@]}"; do [ "${args[$i]}" = --junitxml ] && xml=${args[$((i + 1))]}; done
    exec "$REAL_PY" -m pytest -q -p no:cacheprovider -rfEs -o addopts= --junitxml "$xml" "$FAKE_TESTS" ;;
  *xml.etree*) exec "$REAL_PY" "$@" ;;
  *) exit 0 ;;
esac
"""
# A fake test file that gpu_run.sh must report: test_broken fails on purpose (its failure is what the real test
# checks gpu_run lists), test_fine passes.
FAKE_TESTS = """
import time


def test_broken():
    raise AssertionError("the failure that must be listed")


def test_fine():
    pass


def test_hangs():
    time.sleep(300)
"""


@pytest.mark.slow  # waits out a 20 s budget (a hanging stand-in step)
@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils' timeout"
)
def test_gpu_run_tests_step_stopped_still_lists_failures(tmp_path):
    """The tests step is stopped with SIGINT at its limit, so pytest prints its failure list and writes its JUnit
    XML (on SIGTERM it prints nothing): the summary names the failed test although the step timed out."""
    fake = _fake(tmp_path, SIGINT_TESTS)
    tests = tmp_path / "test_stand_in.py"
    tests.write_text(FAKE_TESTS)
    out = tmp_path / "out"
    env = dict(
        os.environ,
        PYTHON=str(fake),
        TMPDIR=str(tmp_path),
        GPU_RUN_SCALE="1",
        GPU_RUN_BUDGET_S="20",
        REAL_PY=sys.executable,
        FAKE_TESTS=str(tests),
    )
    subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), "--dry-run", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = (out / "summary.txt").read_text()
    tests_line = next(ln for ln in summary.splitlines() if ln.startswith("step tests "))
    assert "rc=124" in tests_line, f"the stand-in tests were not cut by the step's timeout:\n{summary}"
    part = summary.split("--- tests", 1)[1]
    assert "FAILED" in part and "test_broken" in part, f"no failure list after SIGINT:\n{summary}"
    assert "junit: 2 test(s) finished, 1 with a failure or an error" in part, summary
    # JUnit's classname is the module's path from pytest's rootdir, which depends on where the checkout and TMPDIR
    # sit (test_stand_in here, pytest-of-root.pytest-7.<dir>.test_stand_in in a checkout under /tmp): match its end.
    assert re.search(r"^junit FAILED (\S+\.)?test_stand_in::test_broken$", part, re.M), summary


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils' timeout"
)
def test_gpu_run_dry_run_limits_scale_with_the_machine(tmp_path):
    """The dry run's limits are the GPU run's times a factor of at least 2 that grows with the load per core (a step
    limit met on an idle 16-core GPU host is not one a shared 2-core CI box can meet)."""
    fake = _fake(tmp_path, "#!/usr/bin/env bash\nexit 0\n")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(fake), TMPDIR=str(tmp_path))
    env.pop("GPU_RUN_SCALE", None)
    env.pop("GPU_RUN_BUDGET_S", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), "--dry-run", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = (out / "summary.txt").read_text()
    scale_line = next(ln for ln in summary.splitlines() if ln.startswith("dry-run limits scaled x"))
    scale = int(scale_line.split("x")[1].split()[0])
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    assert 2 <= scale <= 8, scale_line
    # the same rule as the script, within the load's drift between the two readings
    assert scale >= min(8, max(2, int(2 * (load + 1) / cores - 1))), (scale_line, load, cores)
    assert f"budget {345 * scale} s" in scale_line
    for name, base in (("env", 30), ("bench_linear", 150), ("tests", 90), ("bench_align", 40), ("bench_freq", 25)):
        assert f"=== {name} (timeout {base * scale}s)" in proc.stdout, (name, proc.stdout[-2000:])
