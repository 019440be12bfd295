"""Gradient alignment, side by side: the paper's loop, torch._foreach, ours, and the memory-bandwidth floor.

    python benchmarks/bench_grad_align.py            # full run (CPU lists; on a GPU also the GPU lists)
    python benchmarks/bench_grad_align.py --quick    # a short run

Providers (all align every tensor in place with raw_ratio 0, the "replace" branch of docs/alignment.md):
- paper:   a re-implementation of the paper's step: reference gradients moved to the CPU, a Python loop over the
           parameters that brings each one back, takes both norms with .item() (host syncs), the cosine, and writes
           |cos| ||g|| / ||r|| * r into the gradient.
- foreach: the torch._foreach fallback of muscle_kernels (foreach.py: float64 sums in O(chunk) memory).
- ours:    muscle_kernels.align_gradients_ through the compiled extension (CPU or CUDA kernel).
- floor:   the memory traffic the op cannot avoid, measured with plain torch ops over the same flat buffers that hold
           the gradient lists: read g and r once (the faster of torch.dot(g, r) and g.sum() + r.sum()), then read r
           and write g once (torch.mul(r, c, out=g)).

Lists: BERT-base (201 tensors, 109M), a BERT-base LoRA-only list (r=8 on query/value + the multi-scale head), and on
a GPU also Llama-7B LoRA (r=16 on all linear layers: 448 tensors, 40M) and full BERT-large (393 tensors, 335M).
Results: a table on stdout, rows appended to benchmarks/out/grad_align.csv, a plot in benchmarks/out/grad_align.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from muscle_kernels.ops.grad_align import (
    align_gradients_,  # noqa: E402
    extension,  # noqa: E402
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import append_rows  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


# ---- parameter-shape lists ----
def bert_shapes(hidden: int, layers: int, inter: int, vocab: int = 30522, n_labels: int = 2) -> list[tuple[int, ...]]:
    """Every parameter of BertForSequenceClassification, in model order."""
    shapes = [(vocab, hidden), (512, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4  # query, key, value, attention output
        shapes += [(hidden,), (hidden,)]  # attention LayerNorm
        shapes += [(inter, hidden), (inter,), (hidden, inter), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # output LayerNorm
    shapes += [(hidden, hidden), (hidden,), (n_labels, hidden), (n_labels,)]  # pooler, classifier
    return shapes


def bert_base_lora_shapes() -> list[tuple[int, ...]]:
    """The paper's BERT-base setting: LoRA r=8 on query and value, MSLR (8 branches of rank 1) on the pooler dense
    and the classifier, classifier bias trainable."""
    shapes = []
    for _ in range(12):
        shapes += [(8, 768), (768, 8)] * 2
    shapes += [(8, 768), (768, 8), (8, 768), (2, 8), (2,)]
    return shapes


def llama7b_lora_shapes(r: int = 16) -> list[tuple[int, ...]]:
    shapes = []
    for _ in range(32):
        for out_f, in_f in [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]:
            shapes += [(r, in_f), (out_f, r)]
    return shapes


LISTS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "bert-base": lambda: bert_shapes(768, 12, 3072),
    "bert-base-lora": bert_base_lora_shapes,
    "llama7b-lora-r16": llama7b_lora_shapes,
    "bert-large": lambda: bert_shapes(1024, 24, 4096),
}


# ---- providers ----
def paper_align_(grads: list[torch.Tensor], refs: list[torch.Tensor], raw_ratio: float = 0.0) -> None:
    """The paper's step, faithfully slow: refs parked on the CPU, per-tensor host syncs, a Python loop."""
    ref_cpu = [r.detach().cpu() for r in refs]
    for g, r_cpu in zip(grads, ref_cpu):
        r = r_cpu.to(g.device)
        g_norm = torch.norm(g).item()
        r_norm = torch.norm(r).item()
        if g_norm == 0 or r_norm == 0:
            continue
        cos = F.cosine_similarity(g.flatten(), r.flatten(), dim=0).item()
        aligned = abs(cos) * g_norm / r_norm * r
        g.copy_((1 - raw_ratio) * aligned + raw_ratio * g if raw_ratio else aligned)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(fn: Callable[[], object], device, warmup: int, reps: int) -> float:
    """Median wall time in ms (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def make_list(shapes, device, seed=0):
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    total = sum(sizes)
    gen = torch.Generator(device=device).manual_seed(seed)
    flat_g = torch.randn(total, device=device, generator=gen)
    flat_r = torch.randn(total, device=device, generator=gen).mul_(0.1).add_(flat_g, alpha=0.3)
    grads = [v.view(s) for v, s in zip(flat_g.split(sizes), shapes)]
    refs = [v.view(s) for v, s in zip(flat_r.split(sizes), shapes)]
    return flat_g, flat_r, grads, refs


def run_list(name, device, warmup, reps, paper_reps, providers):
    shapes = LISTS[name]()
    flat_g, flat_r, grads, refs = make_list(shapes, device)
    numel = flat_g.numel()
    res: dict[str, float] = {}
    read_sum = bench(lambda: (flat_g.sum(), flat_r.sum()), device, warmup, reps)
    read_dot = bench(lambda: torch.dot(flat_g, flat_r), device, warmup, reps)
    write = bench(lambda: torch.mul(flat_r, 0.5, out=flat_g), device, warmup, reps)
    res["floor"] = min(read_sum, read_dot) + write
    if "paper" in providers:
        res["paper"] = bench(lambda: paper_align_(grads, refs), device, min(warmup, 1), paper_reps)
    if "foreach" in providers:
        res["foreach"] = bench(lambda: align_gradients_(grads, refs, backend="foreach"), device, warmup, reps)
    if "ours" in providers:
        res["ours"] = bench(lambda: align_gradients_(grads, refs, backend="extension"), device, warmup, reps)
    return len(shapes), numel, res


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} x{os.cpu_count()}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (and only the LoRA lists on GPU)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--lists", nargs="*", default=None, help=f"subset of {list(LISTS)}")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    ext = extension.load_extension()
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    warmup, reps, paper_reps = (1, 3, 2) if args.quick else (2, 10, 5)
    plan = []
    for device in devices:
        names = ["bert-base", "bert-base-lora"]
        if device.type == "cuda":
            names += ["llama7b-lora-r16"] + ([] if args.quick else ["bert-large"])
        for name in names:
            if args.lists is None or name in args.lists:
                plan.append((device, name))
    rows = []
    stamp = dt.datetime.now().isoformat(timespec="seconds")
    for device, name in tqdm(plan, desc="grad_align benchmark"):
        providers = ["paper", "foreach"]
        if ext is not None and extension.has_kernel("grad_align_fused", device.type):
            providers.append("ours")
        n_tensors, numel, res = run_list(name, device, warmup, reps, paper_reps, providers)
        for provider, ms in res.items():
            gbps = 4 * numel * 4 / (ms * 1e-3) / 1e9  # 4 fp32 streams: read g, r; read r, write g
            rows.append(
                dict(
                    date=stamp,
                    device=device.type,
                    device_name=device_name(device),
                    torch=torch.__version__,
                    list=name,
                    n_tensors=n_tensors,
                    numel=numel,
                    provider=provider,
                    ms=round(ms, 3),
                    x_floor=round(ms / res["floor"], 3),
                    speedup_vs_paper=round(res["paper"] / ms, 2),
                    eff_GBps=round(gbps, 1),
                )
            )

    if ext is not None:
        ext_text = ", ".join(f"{k} from the {v}" for k, v in ext.origins.items())
    else:
        ext_text = f"not available ({extension.extension_info('none')['reason']})"
    print(
        f"\ndevice(s): {', '.join(device_name(d) for d in devices)}; torch {torch.__version__}; extension: {ext_text}"
    )
    header = (
        f"{'list':<18}{'tensors':>8}{'numel':>12}  {'provider':<8}{'ms':>10}{'x floor':>9}{'vs paper':>10}{'GB/s':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['device'] + ':' + r['list']:<18}{r['n_tensors']:>8}{r['numel']:>12}  {r['provider']:<8}"
            f"{r['ms']:>10.2f}{r['x_floor']:>9.2f}{r['speedup_vs_paper']:>9.1f}x{r['eff_GBps']:>8.1f}"
        )

    OUT.mkdir(parents=True, exist_ok=True)
    csv_path = OUT / "grad_align.csv"
    append_rows(rows, csv_path)
    if not args.no_plot:
        plot(rows, OUT / "grad_align.png")
    return rows


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    groups = sorted(
        {(r["device"], r["list"]) for r in rows}, key=lambda k: [(r["device"], r["list"]) for r in rows].index(k)
    )
    providers = ["paper", "foreach", "ours", "floor"]
    fig, ax = plt.subplots(figsize=(2.2 + 2.0 * len(groups), 4))
    width = 0.2
    for k, provider in enumerate(providers):
        xs, ys = [], []
        for j, g in enumerate(groups):
            hit = [r for r in rows if (r["device"], r["list"]) == g and r["provider"] == provider]
            if hit:
                xs.append(j + (k - 1.5) * width)
                ys.append(hit[0]["ms"])
        ax.bar(xs, ys, width, label=provider)
    ax.set_xticks(range(len(groups)), [f"{d}\n{n}" for d, n in groups])
    ax.set_yscale("log")
    ax.set_ylabel("ms per step (log)")
    ax.set_title(f"gradient alignment, {rows[0]['date']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
