"""GPU benchmark of the multi-scale low-rank linear layer, every measured case checked for correctness first.

bf16, ``triton.testing.do_bench`` medians (CUDA graphs with --cuda-graph), at each case (tokens, in, out, n*r,
dropout p) and in one run:
- bare:        frozen nn.Linear (cuBLAS): the floor
- peft:        PEFT's LoRA layer (peft.tuners.lora.Linear) with r = n*r and the same function
- paper:       the paper's MultiScaleLowRankLinear (dense R (L*K) delta rebuilt at every forward)
- ours:        MuScleLoRALinear, backend "auto" (the fastest of the two below and, where they apply, the variants
               with dR inside another pass over dy: triton-fdy, in the G pass, and triton-fdx, folded into the dx
               GEMM; chosen on first use, each candidate's time printed in the auto-choice lines)
- ours-triton: the fused Triton kernels
- ours-cublas: the cuBLAS-composed path (addmm, then one addmm_ of (T s) with R^T; backward likewise)
- ours-shrink: the Triton kernels with T always from the separate shrink kernel (decides FUSE_T_MAX_R)
Modes: fwd (training forward, autograd on), bwd (backward alone, graph retained), fwd+bwd. x requires grad (as inside
a network); W is frozen, L and R are trained. TFLOP/s counts the bare layer's FLOPs (2*M*in*out per GEMM). Peak memory
is the allocator's peak during one call, above what was allocated before.

Before any timing, y, dx, dL and dR of every fast path (triton, shrink mode, cublas, triton-fdy, triton-fdx) are
checked against an fp32 reference on the same bf16 inputs with the tests' rule (error at most 2x that of plain
PyTorch in bf16, plus one rounding step of the output's magnitude); dropout cases use each path's own mask. A failed
check is printed as "check FAIL" and makes the exit status 1; the timings still run. Each case's goal lines (issue 9)
and new `auto` choices are printed (and flushed) as the case ends, and all of them again at the end.

    python benchmarks/bench_linear_gpu.py --quick          # 8192 tokens x 3 shapes x n*r {16, 64}, + dropout 0.1
                                                           # (n*r 16, 64 and the dropout case first)
    python benchmarks/bench_linear_gpu.py                  # tokens 2048..16384 x 3 shapes x n*r {16, 64}
    python benchmarks/bench_linear_gpu.py --dry-run        # the same flow on the CPU, tiny shapes, Triton interpreter

--budget-s stops starting new cases once that many seconds have passed (rows are appended to the CSV after every
case, so a run cut short still leaves its data).
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton kernels

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from bench_io import append_rows  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
TOKENS = [2048, 4096, 8192, 16384]
RANKS = [16, 64]  # n*r; MSLR with 4 branches: freq_band (1, 2, 3, 4), inner_rank n*r / 4
PROVIDERS = ("bare", "peft", "paper", "ours", "ours-triton", "ours-cublas", "ours-shrink")
BACKEND_OF = {"ours": "auto", "ours-triton": "triton", "ours-cublas": "cublas", "ours-shrink": "triton"}
MODES = ("fwd", "bwd", "fwd+bwd")
CHECKED = "cublas, triton, shrink, triton-fdy, triton-fdx"  # the paths check_case compares with the reference
DRY_CASES = [(37, 48, 80, 16, 0.0), (37, 48, 80, 16, 0.1)]


def cases(quick: bool):
    """(tokens, in, out, n*r, dropout p). The first cases are one of each n*r and the dropout case (with its plain
    twin before it, so its cost can be stated): a run cut short by --budget-s or a timeout still has every kind of
    figure (the first case also pays the compiles, so it is the slowest)."""
    first = [(8192, 4096, 4096, 16, 0.0), (8192, 4096, 4096, 64, 0.0), (8192, 4096, 4096, 16, 0.1)]
    if quick:
        rest = [(8192, i, o, nr, 0.0) for nr in RANKS for i, o in SHAPES]
    else:
        rest = [(t, i, o, nr, 0.0) for nr in RANKS for i, o in SHAPES for t in TOKENS]
        rest += [(8192, i, o, 16, 0.1) for i, o in SHAPES]
    return first + [c for c in rest if c not in first]


def make_layers(in_f, out_f, nr, p, device, dtype):
    from muscle_kernels import MuScleLoRALinear
    from muscle_kernels.nn.paper import PaperMultiScaleLinear

    torch.manual_seed(0)
    bare = nn.Linear(in_f, out_f, device=device, dtype=dtype).requires_grad_(False)
    ours = MuScleLoRALinear.from_linear(
        copy.deepcopy(bare), freq_band=(1, 2, 3, 4), inner_rank=nr // 4, alpha=2.0 * (nr // 4), dropout=p, init="seed"
    ).train()
    layers = {"bare": (bare, []), "ours": (ours, [ours.lora_L, ours.lora_R])}
    if p == 0.0:  # the paper's layer has no adapter dropout
        paper = PaperMultiScaleLinear(ours)
        layers["paper"] = (paper, [paper.lora_L, paper.lora_R])
    for name in ("ours-triton", "ours-cublas", "ours-shrink"):
        twin = copy.deepcopy(ours)
        twin.backend = BACKEND_OF[name]
        layers[name] = (twin, [twin.lora_L, twin.lora_R])
    try:
        import peft

        holder = nn.Sequential()
        holder.add_module("proj", copy.deepcopy(bare))
        cfg = peft.LoraConfig(r=nr, lora_alpha=2.0 * (nr // 4), target_modules=["proj"], lora_dropout=p)
        lora = peft.get_peft_model(holder, cfg).base_model.model.proj
        with torch.no_grad():  # the same function as ours: A = L, B = R diag(s) / PEFT's scalar scaling
            lora.lora_A["default"].weight.copy_(ours.lora_L)
            lora.lora_B["default"].weight.copy_(ours.lora_R * ours.scales.to(dtype) / lora.scaling["default"])
        lora.to(device=device, dtype=dtype).train()
        layers["peft"] = (lora, [lora.lora_A["default"].weight, lora.lora_B["default"].weight])
    except ImportError:
        print("peft is not installed: the PEFT column is left out", file=sys.stderr)
    return {k: layers[k] for k in PROVIDERS if k in layers}


# --------------------------------------------------------------------------------------------------------------------
# Correctness of every measured case.
# --------------------------------------------------------------------------------------------------------------------
def _reference(x, w, b, lo, ro, s, dy, mask, p):
    from muscle_kernels.ops.lowrank_linear.reference import lowrank_linear_reference

    xr, lr, rr = (v.detach().clone().requires_grad_() for v in (x, lo, ro))
    y = lowrank_linear_reference(xr, w, b, lr, rr, s, mask, p)
    dx, dl, dr = torch.autograd.grad(y, [xr, lr, rr], dy)
    return dict(y=y.detach(), dx=dx, dL=dl, dR=dr)


def check_case(layer, x, p, seed=1234):
    """Check each fast path's y, dx, dL, dR on the layer's own tensors; returns a list of failure messages."""
    from muscle_kernels.ops.lowrank_linear import configs, cpu, launch
    from tests.utils import assert_close

    w, b, lo, ro, s = layer.weight.detach(), layer.bias, layer.lora_L.detach(), layer.lora_R.detach(), layer.scales
    b = None if b is None else b.detach()
    x2 = x.detach().reshape(-1, x.shape[-1])
    dtype, dev = x2.dtype, x2.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    dy = torch.randn(x2.shape[0], w.shape[0], device=dev, generator=gen).to(dtype)
    masks = {
        "torch": lambda: cpu.dropout_mask_torch(x2.shape, p, seed, dev),
        "triton": lambda: launch.dropout_mask_triton(x2.shape, p, seed, dev),
    }
    paths = [
        ("cublas", cpu.lowrank_linear_fwd_torch, cpu.lowrank_linear_bwd_torch, "torch", None),
        ("triton", launch.lowrank_linear_fwd_triton, launch.lowrank_linear_bwd_triton, "triton", None),
        ("shrink", launch.lowrank_linear_fwd_triton, launch.lowrank_linear_bwd_triton, "triton", False),
        # dR in the backward's G pass, and dR folded into the dx GEMM: auto's other candidates, timed in its race
        # beside "triton" and "cublas" (each candidate's time is in the printed auto choices)
        ("triton-fdy", launch.lowrank_linear_fwd_triton, launch.lowrank_linear_bwd_triton_fused_dy, "triton", None),
        ("triton-fdx", launch.lowrank_linear_fwd_triton, launch.lowrank_linear_bwd_triton_fold_dx, "triton", None),
    ]
    bad = []
    eps = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 2**-20}[dtype]
    if configs.tf32_allowed():
        print("warning: TF32 is on for fp32 matmuls: the fp32 reference is only TF32-accurate", file=sys.stderr)
    for name, fwd, bwd, mask_kind, fuse in paths:
        mask = masks[mask_kind]() if p > 0 else None
        f32 = [None if v is None else v.float() for v in (x2, w, b, lo, ro)]
        ref = _reference(*f32, s.float(), dy.float(), mask, p)
        base = _reference(x2, w, b, lo, ro, s, dy, mask, p)  # plain PyTorch in bf16: the error budget
        with launch.force_configs(fuse_t=fuse):
            y, t, bits = fwd(x2, w, b, lo, ro, s, p, seed)
            dx, dl, dr = bwd(dy, x2, w, lo, ro, s, t, p, seed, True, True, True, bits)
        for key, got in (("y", y), ("dx", dx), ("dL", dl), ("dR", dr)):
            try:
                assert_close(
                    f"{name} {key}", ref[key], got, base=base[key].float(), atol=2 * eps * ref[key].abs().max().item()
                )
            except AssertionError as exc:
                bad.append(str(exc).splitlines()[0])
    return bad


# --------------------------------------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------------------------------------
def _fn(layer, params, x, dy, mode):
    inputs = [x] + list(params)
    if mode == "fwd":
        return lambda: layer(x)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(layer(x), inputs, dy)
    y = layer(x)
    return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)


def measure(layer, params, x, dy, mode, cuda_graph, force_fuse=None, rep=100):
    from muscle_kernels.ops.lowrank_linear import launch

    with launch.force_configs(fuse_t=force_fuse):
        return _measure(layer, params, x, dy, mode, cuda_graph, rep)


def _measure(layer, params, x, dy, mode, cuda_graph, rep):
    fn = _fn(layer, params, x, dy, mode)
    fn()  # compile, autotune and the auto choice happen outside the timed region
    if x.device.type != "cuda":  # --dry-run: the flow, not the numbers
        t0 = time.perf_counter()
        for _ in range(2):
            fn()
        return (time.perf_counter() - t0) / 2 * 1e3, 0
    import triton.testing as tt

    torch.cuda.synchronize()
    if cuda_graph:
        ms = tt.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    else:
        ms = tt.do_bench(fn, warmup=max(5, rep // 4), rep=rep, return_mode="median")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    return ms, peak


def _flops(tokens, in_f, out_f, mode):
    gemm = 2.0 * tokens * in_f * out_f
    return {"fwd": gemm, "bwd": gemm, "fwd+bwd": 2 * gemm}[mode]


def run(case_list, out_csv: Path, cuda_graph: bool, device, budget_s=None, rep=100):
    import triton

    from muscle_kernels.ops.lowrank_linear.autoselect import auto_choices

    t_start = time.monotonic()
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run, Triton interpreter)"
    meta = dict(
        device=name,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        torch=torch.__version__,
        triton=triton.__version__,
        dtype="bf16",
        timer="do_bench_cudagraph" if cuda_graph else ("do_bench" if device.type == "cuda" else "perf_counter"),
    )
    rows, failures, skipped = [], 0, 0
    shown = set()  # auto choices already printed
    header = (
        f"{'tokens':>6} {'in':>5} {'out':>5} {'n*r':>4} {'p':>4} {'mode':>7} | {'bare ms':>8} {'TF/s':>6} | "
        + " ".join(f"{p:>11}" for p in PROVIDERS[1:])
        + " | peak MB bare/ours"
    )
    print(header)
    print("-" * len(header))
    for tokens, in_f, out_f, nr, p in case_list:
        if budget_s is not None and time.monotonic() - t_start > budget_s:
            skipped += 1
            continue
        layers = make_layers(in_f, out_f, nr, p, device, dtype)
        x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, out_f, device=device, dtype=dtype)
        bad = check_case(layers["ours"][0], x, p)
        failures += bool(bad)
        tag = f"({tokens}, {in_f}, {out_f}, nr={nr}, p={p})"
        print(f"check {'ok  ' if not bad else 'FAIL'} {tag}: y, dx, dL, dR of {CHECKED}")
        for line in bad:
            print(f"check FAIL {tag}: {line}")
        case_rows = []
        for mode in MODES:
            res = {
                prov: measure(layer, params, x, dy, mode, cuda_graph, False if prov == "ours-shrink" else None, rep=rep)
                for prov, (layer, params) in layers.items()
            }
            base = res["bare"][0]
            tf = _flops(tokens, in_f, out_f, mode) / (base * 1e-3) / 1e12
            print(
                f"{tokens:>6} {in_f:>5} {out_f:>5} {nr:>4} {p:>4} {mode:>7} | {base:8.3f} {tf:6.0f} | "
                + " ".join(f"{res[q][0] / base:10.3f}x" if q in res else f"{'-':>11}" for q in PROVIDERS[1:])
                + f" | {res['bare'][1] / 2**20:.0f}/{res['ours'][1] / 2**20:.0f}",
                flush=True,
            )
            for prov, (ms, peak) in res.items():
                case_rows.append(
                    dict(
                        meta,
                        tokens=tokens,
                        in_features=in_f,
                        out_features=out_f,
                        nr=nr,
                        dropout=p,
                        mode=mode,
                        provider=prov,
                        ms=round(ms, 5),
                        ratio_to_bare=round(ms / base, 4),
                        tflops=round(_flops(tokens, in_f, out_f, mode) / (ms * 1e-3) / 1e12, 1),
                        peak_mb=round(peak / 2**20, 1),
                        check="ok" if not bad else "FAIL",
                    )
                )
        if p > 0.0:
            print(mask_cost(tokens, in_f, p, device, rep), flush=True)
        append_rows(case_rows, out_csv)
        rows += case_rows
        # This case's figures now, not after the last case: a step killed by its timeout keeps every finished case.
        print_auto_choices(shown)
        report_goals(rows, only=(tokens, in_f, out_f, nr, p), total=False)
        sys.stdout.flush()
        del layers, x, dy
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if skipped:
        print(f"budget: {skipped} case(s) not run (--budget-s {budget_s})")
    print("auto choices (all):")
    for c in auto_choices():
        print(f"  {c}")
    print_autotune_choices()
    print("goals (all cases):")
    report_goals(rows)
    plot(rows, out_csv.with_suffix(".png"))
    print(f"checks: {failures} case(s) failed")
    return rows, failures


def mask_cost(tokens, in_f, p, device, rep):
    """One line: the time of the dropout-mask kernel alone (the forward's one Philox pass), to tell it apart from the
    rest of dropout's cost."""
    from muscle_kernels.ops.lowrank_linear import launch

    fn = lambda: launch._dropout_bits(tokens, in_f, p, 1234, device)  # noqa: E731
    fn()
    if device.type != "cuda":
        return f"mask {tokens}x{in_f}: (dry run, not timed)"
    import triton.testing as tt

    ms = tt.do_bench(fn, warmup=max(5, rep // 4), rep=rep, return_mode="median")
    return f"mask {tokens}x{in_f}: {ms:.4f} ms for the packed dropout mask ({tokens * in_f / 8 / 2**20:.1f} MiB)"


def print_auto_choices(shown: set):
    """The decisions of backend="auto" made since the last call (`shown` holds those already printed)."""
    from muscle_kernels.ops.lowrank_linear.autoselect import auto_choices

    for c in auto_choices():
        key = repr(sorted((k, v) for k, v in c.items() if k not in ("times_ms", "choice")))
        if key not in shown:
            shown.add(key)
            print(f"auto {c}")


def print_autotune_choices():
    """The tile autotune kept per key of the fused GEMM: shows whether a candidate (e.g. 128x256 with 4 stages) ever
    wins. Keys are (m_bucket, N, K, NR, T_MODE, OUT_DROP, stride_bk, PRECISION, dtypes...)."""
    from muscle_kernels.ops.lowrank_linear import kernels

    cache = getattr(getattr(kernels, "fused_tuned", None), "cache", None) or {}
    for key, cfg in cache.items():
        kw = cfg.kwargs
        print(
            f"autotune {key[:8]} -> {kw.get('BLOCK_M')}x{kw.get('BLOCK_N')}x{kw.get('BLOCK_K')} "
            f"w{cfg.num_warps} s{cfg.num_stages}"
        )


def report_goals(rows, only=None, total=True):
    """The issue's goals, checked on fwd+bwd rows of this run; `only`: the lines of one case (tokens, in, out, n*r,
    p), printed as that case ends (a dropout case also gets its cost against its plain twin, when that ran)."""
    by = {}
    for r in rows:
        if r["mode"] == "fwd+bwd":
            by.setdefault((r["tokens"], r["in_features"], r["out_features"], r["nr"], r["dropout"]), {})[
                r["provider"]
            ] = r["ms"]
    misses = 0
    for key, t in sorted(by.items()):
        if only is not None and key != only:
            continue
        vs_bare = t["ours"] / t["bare"]
        vs_peft = t["peft"] / t["ours"] if "peft" in t else float("nan")
        vs_cublas = t["ours"] / t["ours-cublas"]
        ok = vs_bare <= 1.10 and (vs_peft >= 1.35 or "peft" not in t) and vs_cublas <= 1.02
        misses += not ok
        print(
            f"goal {'ok  ' if ok else 'MISS'} {key}: ours/bare {vs_bare:.3f} (<= 1.10), peft/ours {vs_peft:.2f} "
            f"(>= 1.35), ours/cublas {vs_cublas:.3f} (<= 1, 2% noise), triton/bare "
            f"{t['ours-triton'] / t['bare']:.3f}, shrink/bare {t['ours-shrink'] / t['bare']:.3f}"
        )
    for key, t in sorted(by.items()):
        if key[4] > 0 and (only is None or key == only):
            plain = by.get(key[:4] + (0.0,))
            if plain:
                cost = t["ours"] / plain["ours"]
                print(f"goal {'ok  ' if cost <= 1.10 else 'MISS'} {key}: dropout costs {cost:.3f}x (<= 1.10)")
                misses += cost > 1.10
    if total:
        print(f"{misses} goal line(s) missed")
    return misses


def plot(rows, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    if not rows:
        return
    fig, axes = plt.subplots(1, len(MODES), figsize=(6 * len(MODES), 4.5), sharey=True)
    for ax, mode in zip(axes, MODES):
        sel = [r for r in rows if r["mode"] == mode]
        ident = lambda r: (r["tokens"], r["in_features"], r["out_features"], r["nr"], r["dropout"])  # noqa: E731
        labels = sorted({ident(r) for r in sel})
        xs = range(len(labels))
        for prov in PROVIDERS[1:]:
            ys = [
                next((r["ratio_to_bare"] for r in sel if r["provider"] == prov and ident(r) == lab), float("nan"))
                for lab in labels
            ]
            ax.plot(xs, ys, marker="o", label=prov)
        ax.axhline(1.10, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{t}\n{i}->{o}\nr{n} p{p}" for t, i, o, n, p in labels], fontsize=6)
        ax.set_title(f"{mode} (bf16), time / bare nn.Linear")
    axes[0].set_ylabel("ratio to bare")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8192 tokens, 3 shapes, n*r 16 and 64, one dropout case")
    ap.add_argument("--dry-run", action="store_true", help="the same flow on the CPU: tiny shapes, Triton interpreter")
    ap.add_argument("--cuda-graph", action="store_true", help="time with triton.testing.do_bench_cudagraph")
    ap.add_argument("--rep", type=int, default=100, help="do_bench's rep (ms of timed calls per measurement)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "linear_gpu.csv")
    args = ap.parse_args(argv)
    if args.dry_run:
        device, case_list = torch.device("cpu"), DRY_CASES
    elif not torch.cuda.is_available():
        print(
            "bench_linear_gpu: no CUDA device here; this benchmark needs a GPU (or --dry-run; see also "
            "bench_linear_cpu.py)."
        )
        return 2
    else:
        device, case_list = torch.device("cuda"), cases(args.quick)
        print(
            f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; ratios are to the bare frozen "
            "nn.Linear (cuBLAS) in the same run\n"
        )
    _, failures = run(case_list, args.out, args.cuda_graph, device, args.budget_s, args.rep)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
