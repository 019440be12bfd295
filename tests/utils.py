"""Shared helpers for the tests: device choice, dtype tolerances and a comparison that names the tensor; and for
the `muscle-lora` command's tests, running it and reading its one-line errors, small data files and argument lists,
a subprocess under a memory limit, and the record a stubbed training run returns (tests/conftest.py: stub_training)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap

import torch

# the repository root (the working folder of the tests' subprocesses)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Tolerances for comparing a fast path against an fp64 reference, by dtype of the fast path.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=1e-1, rtol=5e-2),
}


def assert_close(
    name: str,
    ref: torch.Tensor,
    got: torch.Tensor,
    *,
    base: torch.Tensor | None = None,
    ratio: float = 2.0,
    atol: float | None = None,
):
    """Compare `got` with `ref` (usually fp64) and name the tensor on failure.

    Without `base`: allclose with the tolerance of got's dtype. With `base` (plain PyTorch computing the same thing
    in got's dtype): flash-attention's rule -- got's max error may be at most `ratio` times base's, plus a small atol.
    """
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: has non-finite values (an unwritten tile?)"
    ref64, got64 = ref.detach().double(), got.detach().double()
    err = (got64 - ref64).abs()
    if base is not None:
        base_err = (base.detach().double() - ref64).abs().max().item()
        tol = atol if atol is not None else TOL[got.dtype]["atol"] * 0.05
        worst = err.max().item()
        assert worst <= ratio * base_err + tol, (
            f"{name}: max error {worst:.3e} > {ratio} x plain-PyTorch error {base_err:.3e} + {tol:.1e} "
            f"(at index {tuple(int(i) for i in torch.nonzero(err == err.max())[0])})"
        )
        return
    tol = TOL[got.dtype]
    bound = (atol if atol is not None else tol["atol"]) + tol["rtol"] * ref64.abs()
    bad = err > bound
    if bad.any():
        idx = torch.nonzero(bad)[:5].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements off (max error {err.max().item():.3e}); "
            f"first bad indices {idx}"
        )


def nearly_orthogonal(seed: int, n: int = 3000, cos: float = 3e-4, dtype: torch.dtype = torch.float32):
    """A pair (g, r) of n values whose dot nearly cancels: r is a unit vector at cosine `cos` from g (in fp64, then
    rounded to `dtype`). The case where an fp32 running sum of <g, r> loses its digits (issue 20, row 19)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    r = torch.randn(n, generator=gen, dtype=torch.float64)
    r = r - (g @ r) / (g @ g) * g
    r = r / r.norm() + cos * g / g.norm()
    return g.to(dtype), r.to(dtype)


# -- the `muscle-lora` command's tests ---------------------------------------------------------------------------------
# Address-space limit of the memory subprocesses (run_limited): importing torch + transformers maps about 3.3 GB of
# virtual memory; every allocation the hardening issue (15) describes is above 10 GB.
MEMORY_LIMIT = 7 * 2**30

# The words of the tiny model's vocabulary (tests/conftest.py: tiny_model_dir) and of the rows two_class_rows makes
WORDS = ["good", "bad", "film", "plot", "fine", "dull", "cf", "mn", "bb", "tq"]


def cli(capsys, argv):
    """(exit code, stderr) of `muscle-lora argv`, whether main returns the code or argparse exits."""
    from muscle_kernels.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    return lines[0]


def rows_csv(path, rows):
    path.write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in rows), encoding="utf-8")
    return str(path)


def two_class_rows(n=12):
    return [(f"{WORDS[i % 6]} {WORDS[(i + 1) % 6]} {WORDS[(i + 3) % 6]}", i % 2) for i in range(n)]


def files_argv(tmp_path, rows=None):
    """--train/--dev/--test-clean/--test-poison of one small clean two-class file (no attack needed)."""
    f = rows_csv(tmp_path / "data.csv", rows or two_class_rows())
    return ["--train", f, "--dev", f, "--test-clean", f, "--test-poison", f, "--ref-size", "2"]


def defend_argv(model, out, methods="muscle-ga", *extra):
    return [
        "defend",
        "--model",
        model,
        "--output",
        str(out),
        "--method",
        methods,
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    ]


def run_limited(code: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run python `code` from the repository root with the address space limited to MEMORY_LIMIT."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    # CUDA hidden: these cases are about host memory, and a CUDA context reserves far more address space than the limit
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stub_record(method, settings):
    return dict(
        method=method,
        cacc=0.75,
        asr=0.25,
        best_epoch=1,
        train_seconds=0.1,
        step_seconds=0.01,
        steps=1,
        history=[dict(epoch=1, train_loss=0.5, dev_acc=0.75, dev_asr=float("nan"))],
        settings=settings.to_dict(),
    )
