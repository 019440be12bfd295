"""The JIT build of the grad_align kernels under hostile conditions (issue 15): a build killed with SIGKILL leaves
its lock and temporary folder behind and a later process neither hangs nor rebuilds twice; two processes that need
the first build at the same moment build once and both load it; a complete build in a read-only cache loads without
the lock; a lock held by a live process times out into the fallback with a warning instead of hanging; a typo in a
switch is an error; a build that is stopped (timeout, Ctrl-C) stops the compilers it started, since ninja runs in its
own process group. Every child process has a hard timeout, so a regression fails instead of hanging CI.

One real CPU build per session (a few seconds with the stable-ABI headers), in a fresh cache.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from muscle_kernels.ops.grad_align import extension

ROOT = Path(__file__).resolve().parents[1]

# Each child aligns fresh random gradients with the extension and checks them against the fp64 oracle, then prints
# its extension_info() as JSON.
CHILD = textwrap.dedent("""
    import json, sys, torch
    import muscle_kernels
    from muscle_kernels.ops.grad_align import paper_align_reference
    gen = torch.Generator().manual_seed(int(sys.argv[1]))
    g = [torch.randn(300, 7, generator=gen), torch.randn(70001, generator=gen).bfloat16()]
    r = [x.float().mul(0.3).add(0.01 * torch.randn(x.shape, generator=gen)).to(x.dtype) for x in g]
    want, _ = paper_align_reference(g, r, 0.1)
    muscle_kernels.align_gradients_(g, r, raw_ratio=0.1, backend="extension")
    for w, x, tol in zip(want, g, (1e-5, 5e-2)):
        assert torch.allclose(x.double(), w, atol=tol * max(1.0, w.abs().max().item())), "wrong result"
    print("RESULT " + json.dumps(muscle_kernels.extension_info()))
""")


def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSCLE_KERNELS_")}
    env.update(TORCH_EXTENSIONS_DIR=str(cache), MUSCLE_KERNELS_BUILD_CUDA="0", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def _start(cache: Path, seed: int, **extra) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(seed)],
        env=_env(cache, **extra),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _result(proc: subprocess.Popen, timeout: float = 300) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"child hung for {timeout} s (a stuck build lock?):\n{out}\n{err[-3000:]}")
    assert proc.returncode == 0, f"child failed:\n{out}\n{err[-3000:]}"
    (line,) = [x for x in out.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[len("RESULT ") :])


def _target(cache: Path, monkeypatch) -> Path:
    """The library path the children will use (same environment but the cache folder)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
    monkeypatch.setenv("MUSCLE_KERNELS_BUILD_CUDA", "0")
    return extension.jit_library_path("cpu")


@pytest.fixture(scope="module")
def killed_then_concurrent(tmp_path_factory):
    """A first build SIGKILLed mid-way, then two processes started together on the same cache."""
    cache = tmp_path_factory.mktemp("jit-cache")
    with pytest.MonkeyPatch.context() as mp:
        target = _target(cache, mp)
    victim = _start(cache, seed=1)
    deadline = time.monotonic() + 120
    while not list(target.parent.glob(target.stem + ".build-*")):  # the build has started compiling
        assert victim.poll() is None, f"the first build ended before it could be killed: {victim.communicate()}"
        assert time.monotonic() < deadline, "the first build never started"
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    left_over = sorted(p.name for p in target.parent.iterdir())
    procs = [_start(cache, seed=s) for s in (2, 3)]
    results = [_result(p) for p in procs]
    return dict(cache=cache, target=target, left_over=left_over, results=results)


@pytest.mark.slow  # JIT builds of the extension (module fixture)
def test_killed_build_leaves_a_stale_lock_that_does_not_hang(killed_then_concurrent):
    state = killed_then_concurrent
    target = state["target"]
    assert target.with_suffix(".lock").name in state["left_over"], state["left_over"]
    assert any(".build-" in name for name in state["left_over"]), state["left_over"]
    assert target.name not in state["left_over"], "the killed build must not leave a library"
    assert target.is_file()
    assert not list(target.parent.glob(target.stem + ".build-*")), "stale build folders are cleaned up"


@pytest.mark.slow  # JIT builds of the extension (module fixture)
def test_concurrent_first_use_builds_once_and_both_load(killed_then_concurrent):
    results = killed_then_concurrent["results"]
    for info in results:
        assert info["origin"] == "jit" and info["kernels"] == ["cpu"], info
        assert info["libraries"]["cpu"] == str(killed_then_concurrent["target"]), info
    builders = [info for info in results if info["built"]]
    assert len(builders) == 1, f"expected exactly one build, got {[info['built'] for info in results]}"


@pytest.mark.slow  # JIT builds of the extension (module fixture)
def test_complete_build_in_a_read_only_cache_loads_without_the_lock(killed_then_concurrent):
    cache, target = killed_then_concurrent["cache"], killed_then_concurrent["target"]
    target.with_suffix(".lock").unlink()
    folder = target.parent
    modes = {p: p.stat().st_mode for p in (cache, folder)}
    before = sorted(p.name for p in folder.iterdir())
    try:
        for p in modes:
            p.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        info = _result(_start(cache, seed=4), timeout=120)
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert info["origin"] == "jit" and not info["built"] and info["libraries"]["cpu"] == str(target), info
    assert sorted(p.name for p in folder.iterdir()) == before, "loading a complete build must not take the lock"


def test_a_held_lock_times_out_into_the_fallback(tmp_path, monkeypatch):
    """A live process holding the lock (a hung build, say): the waiter gives up after the timeout, warns naming the
    lock, and the fallback computes the right answer."""
    target = _target(tmp_path, monkeypatch)
    target.parent.mkdir(parents=True)
    lock = target.with_suffix(".lock")
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code = CHILD.replace('backend="extension"', 'backend="auto"')
        proc = subprocess.run(
            [sys.executable, "-W", "always", "-c", code, "5"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env=_env(tmp_path, MUSCLE_KERNELS_BUILD_TIMEOUT="1"),
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    info = json.loads(line[len("RESULT ") :])
    assert info["origin"] == "fallback" and "TimeoutError" in info["reason"] and str(lock) in info["reason"], info
    assert proc.stderr.count("torch._foreach fallback") == 1, proc.stderr[-3000:]
    # The wait itself is the lock timeout the child reports (1 s, not the 1800 s default). The wall clock also counts
    # the child's imports, over a minute on a loaded 2-core machine: subprocess.run's timeout bounds it, no assert.
    assert "waited 1 s for the build lock" in info["reason"], info


def test_a_typo_in_a_switch_is_an_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch, muscle_kernels; muscle_kernels.align_gradients_([torch.ones(2)], [torch.ones(2)])",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(tmp_path, MUSCLE_KERNELS_NO_EXTENSION="ture"),
    )
    assert proc.returncode != 0
    assert "MUSCLE_KERNELS_NO_EXTENSION: expected 1/0" in proc.stderr and "'ture'" in proc.stderr, proc.stderr[-2000:]


# -- a stopped JIT build stops its compilers too: ninja runs in its own process group ----------------------------------
def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited (its parent may not reap it)
    except FileNotFoundError:
        return False


def test_interrupted_build_command_stops_its_children(tmp_path):
    import subprocess
    import time

    from muscle_kernels.ops.grad_align.extension import _run_in_own_group

    pidfile = tmp_path / "child.pid"
    # sh stands for ninja, the background sleep for a compiler it started
    with pytest.raises(subprocess.TimeoutExpired):
        _run_in_own_group(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout=2)
    child = int(pidfile.read_text())
    for _ in range(50):
        if not alive(child):
            break
        time.sleep(0.1)
    assert not alive(child), "the build's child process outlived the interrupted build"


def test_jit_build_runs_ninja_in_its_own_group(tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    from muscle_kernels.ops.grad_align import extension

    seen = {}

    def fake_load(**kw):
        seen["run"] = cpp_extension.subprocess.run
        seen["check_output"] = cpp_extension.subprocess.check_output
        out = tmp_path / "lib.so"
        out.write_bytes(b"")
        return str(out)

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    extension._compile("cpu", extension.source_dir(), tmp_path / "target.so", False)
    import subprocess

    assert seen["run"] is extension._run_in_own_group
    assert seen["check_output"] is subprocess.check_output
    assert cpp_extension.subprocess is subprocess, "restored after the build"
