"""benchmarks/bench_linear_gpu.py without a GPU: the case order and the per-case output that a cut-short run keeps.

The one GPU call may kill the benchmark at its step timeout, so (issue 22) every kind of figure must come early (one
case of each n*r, and the dropout case after its plain twin) and each case's goal line must be printed as the case
ends, not after the last one. The timings and checks are stubbed here: this tests the flow, not the kernels.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_linear_gpu as bench  # noqa: E402


def test_every_kind_of_case_comes_first():
    for quick in (True, False):
        order = bench.cases(quick)
        assert len(order) == len(set(order)), f"a case repeats: {order}"
        head = order[:3]
        assert {nr for _, _, _, nr, _ in head} == set(bench.RANKS), head
        drop = [c for c in head if c[4] > 0]
        assert drop, f"no dropout case among the first three: {head}"
        twin = drop[0][:4] + (0.0,)
        assert twin in head and head.index(twin) < head.index(drop[0]), "the dropout case's plain twin comes first"
    # --quick still runs each shape at each n*r, and one dropout case
    quick = bench.cases(True)
    assert {(i, o, nr) for _, i, o, nr, p in quick if p == 0} == {
        (i, o, nr) for i, o in bench.SHAPES for nr in bench.RANKS
    }
    assert sum(p > 0 for *_, p in quick) == 1


def test_goal_lines_are_printed_as_each_case_ends(monkeypatch, tmp_path, capsys):
    import torch

    cases = [(64, 32, 48, 16, 0.0), (64, 32, 48, 64, 0.0), (64, 32, 48, 16, 0.1)]
    speed = {
        "bare": 1.0,
        "peft": 2.0,
        "paper": 3.0,
        "ours": 1.05,
        "ours-triton": 1.05,
        "ours-cublas": 1.1,
        "ours-shrink": 1.2,
    }
    current = {}

    def make_layers(in_f, out_f, nr, p, device, dtype):
        layers = {k: (k, []) for k in bench.PROVIDERS if not (k == "paper" and p > 0)}
        current["p"] = p
        return layers

    def measure(layer, params, x, dy, mode, cuda_graph, force_fuse=None, rep=100):
        # the dropout case's "ours" costs 1.2x its plain twin: a goal MISS line for the dropout cost
        return speed[layer] * (1.2 if current["p"] > 0 and layer == "ours" else 1.0), 0

    monkeypatch.setattr(bench, "make_layers", make_layers)
    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench, "check_case", lambda layer, x, p: [])
    monkeypatch.setattr(bench, "mask_cost", lambda *a: "mask (stub)")
    monkeypatch.setattr(bench, "plot", lambda rows, path: None)
    bench.run(cases, tmp_path / "linear.csv", False, torch.device("cpu"))
    lines = capsys.readouterr().out.splitlines()
    final = lines.index("goals (all cases):")
    for n, case in enumerate(cases):
        goal = next(i for i, ln in enumerate(lines) if ln.startswith("goal ") and str(case) in ln)
        assert goal < final, f"case {case}: its goal line came only at the end"
        if n + 1 < len(cases):
            nxt = cases[n + 1]
            check_next = next(
                i
                for i, ln in enumerate(lines)
                if ln.startswith("check ") and str(nxt[:3])[1:-1] in ln and f"nr={nxt[3]}, p={nxt[4]}" in ln
            )
            assert goal < check_next, f"case {case}: goal line after the next case started"
    per_case = lines[:final]
    assert any(ln.startswith("goal MISS") and "dropout costs 1.200x" in ln for ln in per_case), per_case
    assert sum(ln.startswith("goal ") for ln in per_case) == len(cases) + 1  # + the dropout cost line
    assert lines[-1].startswith("checks: 0 case(s) failed")
