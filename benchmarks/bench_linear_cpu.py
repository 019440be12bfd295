"""CPU benchmark of the multi-scale low-rank linear layer against what users would otherwise run.

Side by side in one run, at several shapes and ranks, forward and forward+backward (x requires grad, as for any layer
inside a network), each as a ratio to the bare frozen nn.Linear measured in the same run:
- bare:  frozen nn.Linear (the floor: the adapter should cost almost nothing on top of it)
- peft:  PEFT's LoRA layer (peft.tuners.lora.Linear) with r = n*r
- paper: the paper's MultiScaleLowRankLinear (builds the dense R (L*K) delta every step)
- ours:  MuScleLoRALinear (backend "torch" on the CPU)

Times are the fastest block of torch.utils.benchmark's blocked_autorange, over interleaved rounds. Rows go to a CSV (with machine, date and versions).

    python benchmarks/bench_linear_cpu.py              # the default cases (a few minutes on 2 cores)
    python benchmarks/bench_linear_cpu.py --quick      # one small case
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark

# This checkout's package, not whatever muscle_kernels is installed (`python benchmarks/x.py` puts benchmarks/ first).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from muscle_kernels import MuScleLoRALinear  # noqa: E402
from muscle_kernels.nn.paper import PaperMultiScaleLinear  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import append_rows  # noqa: E402

# (tokens, in, out, freq_band, inner_rank): the first case is the one the goals are stated on
DEFAULT_CASES = [
    (2048, 1024, 1024, (1,), 16),
    (2048, 1024, 1024, (1, 2, 3, 4), 4),
    (2048, 768, 3072, (1,), 8),
    (1024, 1024, 1024, tuple(range(1, 10)), 1),
    (4096, 384, 384, (1,), 8),
]
QUICK_CASES = [(512, 512, 512, (1,), 16)]


def make_layers(in_f, out_f, band, rank, dtype=torch.float32):
    torch.manual_seed(0)
    bare = nn.Linear(in_f, out_f, dtype=dtype).requires_grad_(False)
    ours = MuScleLoRALinear.from_linear(
        copy.deepcopy(bare), freq_band=band, inner_rank=rank, alpha=2.0 * rank, init="seed"
    )
    layers = {"bare": bare, "ours": ours, "paper": PaperMultiScaleLinear(ours)}
    try:
        import peft

        holder = nn.Sequential()
        holder.add_module("proj", copy.deepcopy(bare))
        cfg = peft.LoraConfig(r=len(band) * rank, lora_alpha=2.0 * rank, target_modules=["proj"])
        lora = peft.get_peft_model(holder, cfg).base_model.model.proj
        with torch.no_grad():  # the same function as ours: A = L, B = R diag(s) / PEFT's scalar scaling
            lora.lora_A["default"].weight.copy_(ours.lora_L)
            lora.lora_B["default"].weight.copy_(ours.lora_R * ours.scales / lora.scaling["default"])
        layers["peft"] = lora
    except ImportError:
        print("peft is not installed: the PEFT column is left out", file=sys.stderr)
    return layers


def time_layer(layer, x, dy, mode, min_run_time):
    if mode == "fwd":
        stmt = "layer(x)"
    else:
        stmt = "layer(x).backward(dy)"
    timer = benchmark.Timer(stmt, globals={"layer": layer, "x": x, "dy": dy})
    # The fastest block, not the median: on a shared 2-core VM interference only ever adds time, and the median
    # moved by +-10% between identical runs while the minimum stayed within a few percent.
    return min(timer.blocked_autorange(min_run_time=min_run_time).times)


def run(cases, min_run_time, out_csv, rounds=3):
    rows = []
    meta = dict(
        machine=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
    )
    header = f"{'tokens':>6} {'in':>5} {'out':>5} {'n x r':>6} {'mode':>7} | " + " ".join(
        f"{k:>9}" for k in ("bare ms", "peft", "paper", "ours")
    )
    print(header)
    print("-" * len(header))
    for tokens, in_f, out_f, band, rank in cases:
        layers = make_layers(in_f, out_f, band, rank)
        x = torch.randn(tokens, in_f, requires_grad=True)
        dy = torch.randn(tokens, out_f)
        for mode in ("fwd", "fwd+bwd"):
            # interleave the providers `rounds` times and keep each one's fastest time: a shared 2-core machine
            # drifts by +-10% over a minute, and interleaving exposes every provider to the same drift
            times = {}
            for _ in range(rounds):
                for name, layer in layers.items():
                    t = time_layer(layer, x, dy, mode, min_run_time)
                    times[name] = min(times.get(name, float("inf")), t)
            base = times["bare"]
            ratio = {k: v / base for k, v in times.items()}
            print(
                f"{tokens:>6} {in_f:>5} {out_f:>5} {len(band):>2}x{rank:<3} {mode:>7} | {base * 1e3:9.2f} "
                + " ".join(f"{ratio[k]:8.3f}x" if k in ratio else f"{'-':>9}" for k in ("peft", "paper", "ours"))
            )
            for name, t in times.items():
                rows.append(
                    dict(
                        meta,
                        tokens=tokens,
                        in_features=in_f,
                        out_features=out_f,
                        n_branches=len(band),
                        inner_rank=rank,
                        mode=mode,
                        provider=name,
                        ms=round(t * 1e3, 4),
                        ratio_to_bare=round(ratio[name], 4),
                    )
                )
    append_rows(rows, out_csv)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small case, short timings")
    ap.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement (default 1.0)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per case (fastest time kept)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "linear_cpu.csv")
    args = ap.parse_args(argv)
    cases = QUICK_CASES if args.quick else DEFAULT_CASES
    mrt = args.min_run_time or (0.2 if args.quick else 1.0)
    print(
        f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; ratios are to the bare frozen nn.Linear in the same run\n"
    )
    run(cases, mrt, args.out, rounds=args.rounds)


if __name__ == "__main__":
    main()
