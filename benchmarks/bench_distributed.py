"""Gradient alignment under data parallelism: bytes communicated per aligned step, and the measured cost of an
aligned DDP step against a plain one.

    python benchmarks/bench_distributed.py --figures        # the bytes table only (computed, no processes)
    python benchmarks/bench_distributed.py                  # + timing: 1 process and 2 gloo ranks on the CPU
    python benchmarks/bench_distributed.py --quick          # a short timing run

Bytes (computed from the parameter lists, per aligned step): the buffers each scheme puts on the wire and what one
rank sends in the ring model (all-reduce 2 (w - 1) / w of the buffer, all-gather and reduce-scatter (w - 1) / w of
the whole tensor list), for w = 8 ranks:
- FSDP2 stats: our [n + 1, 3] fp32 all-reduce (12 bytes per tensor);
- gather g, r: all-gathering the training and the reference gradient to align whole tensors (the naive way);
- DDP ref all-reduce: averaging the reference gradient over the ranks (replicated gradients);
- FSDP2 ref reduce-scatter: FSDP's own reduce-scatter of the reference gradient in the second backward (the same
  traffic as the training step's gradient reduce-scatter; listed for scale, it is not the alignment's).

Timing: a MuScleLoRA-adapted tiny BERT (only the adapters train) and the same model fully trainable; each rank runs
fwd + bwd (+ GradientAligner.step) + AdamW on its own batch; the median step time over the ranks' slowest. The
aligned step costs one more forward + backward on the reference batch by design (docs/alignment.md); the columns show
what distribution adds on top of that.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grad_align import bert_shapes  # noqa: E402


def llama2_7b_lora_qv_shapes(r: int = 8):
    """LoRA r=8 on q_proj and v_proj of Llama-2-7B (32 layers, hidden 4096): 128 tensors, 4.2M parameters."""
    return [s for _ in range(32) for _ in range(2) for s in ((r, 4096), (4096, r))]


LISTS = {
    "Llama-2-7B LoRA q,v r=8 (bf16)": (llama2_7b_lora_qv_shapes, 2),
    "Llama-2-7B LoRA q,v r=8 (fp32)": (llama2_7b_lora_qv_shapes, 4),
    "BERT-large full (fp32)": (lambda: bert_shapes(1024, 24, 4096), 4),
}


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def figures(world: int = 8) -> str:
    rows = [
        "| list | tensors | params | FSDP2 stats all-reduce | gather g, r | DDP ref all-reduce | "
        "FSDP2 ref reduce-scatter |",
        "|---|---|---|---|---|---|---|",
    ]
    ring, part = 2 * (world - 1) / world, (world - 1) / world
    for name, (shapes_fn, nbytes) in LISTS.items():
        shapes = shapes_fn()
        n, numel = len(shapes), sum(math.prod(s) for s in shapes)
        stats = 12 * (n + 1)
        grads = numel * nbytes
        ddp = grads + 4 * (n + 1)
        cells = [(stats, ring * stats), (2 * grads, part * 2 * grads), (ddp, ring * ddp), (grads, part * grads)]
        rows.append(
            f"| {name} | {n} | {numel / 1e6:.1f}M | "
            + " | ".join(f"{human(buf)} (sends {human(sent)})" for buf, sent in cells)
            + " |"
        )
    return "\n".join(rows) + f"\n\nbuffer size (bytes one rank sends, ring model, w = {world})"


# -- timing --------------------------------------------------------------------------------------------------------
def _model(full: bool):
    import transformers

    from muscle_kernels import apply_muscle_lora

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = apply_muscle_lora(transformers.BertForSequenceClassification(config))
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def _batch(gen, size=16, seq=32):
    return dict(
        input_ids=torch.randint(2, 1000, (size, seq), generator=gen),
        attention_mask=torch.ones(size, seq, dtype=torch.long),
        labels=torch.randint(0, 2, (size,), generator=gen),
    )


def _rank_main(rank, world, store, steps, warmup, out):
    import torch.distributed as dist

    from muscle_kernels.align.aligner import GradientAligner
    from muscle_kernels.integrations.trainer import hf_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    for full in (False, True):
        model = _model(full)
        wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        params = [p for p in wrapped.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(rank)
        train = [_batch(gen) for _ in range(4)]
        refs = [_batch(gen) for _ in range(2)]
        aligner = GradientAligner(params, refs, hf_loss, min_ref_loss=0.0, max_raw_ratio=0.0)
        opt = torch.optim.AdamW(params, lr=1e-4)
        # the buffer the aligner all-reduces under DDP: every reference gradient plus the fp32 tail
        comm = torch.zeros(sum(p.numel() for p in params) + len(params) + 1)

        def one(step, aligned):
            dist.barrier()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            hf_loss(wrapped, train[step % len(train)]).backward()
            t1 = time.perf_counter()
            if aligned:
                aligner.step(wrapped, 0)
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            if world > 1:
                dist.all_reduce(comm)
            t4 = time.perf_counter()
            t = torch.tensor([t3 - t0, t2 - t1, t4 - t3])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
            return (t * 1e3).tolist()

        plain, aligned, ratios = [], [], []
        # plain and aligned steps interleaved (the order alternating), so that both see the same machine load
        for step in range(warmup + steps):
            first = step % 2 == 0
            a = one(step, first)
            b = one(step, not first)
            p_, a_ = (b, a) if first else (a, b)
            if step >= warmup:
                plain.append(p_)
                aligned.append(a_)
                ratios.append(a_[0] / p_[0])
        med = statistics.median
        results[full] = dict(
            n=(len(params), sum(p.numel() for p in params)),
            plain=med(x[0] for x in plain),
            aligned=med(x[0] for x in aligned),
            ratio=med(ratios),
            align=med(x[1] for x in aligned),
            comm=med(x[2] for x in plain),
        )
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def timing(world: int, steps: int, warmup: int):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.pt")
        mp.spawn(_rank_main, args=(world, os.path.join(tmp, "store"), steps, warmup, out), nprocs=world)
        return torch.load(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figures", action="store_true", help="only the computed bytes table")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--world", type=int, default=8, help="ranks assumed in the bytes table (default 8)")
    args = parser.parse_args(argv)
    print(figures(args.world))
    if args.figures:
        return
    steps, warmup = (5, 2) if args.quick else (30, 5)
    os.environ.setdefault("MUSCLE_KERNELS_GRAD_ALIGN_BACKEND", "foreach")
    res = {w: timing(w, steps, warmup) for w in (1, 2)}
    print(
        f"\nstep time, median of {steps} interleaved pairs of steps (ms); tiny BERT (hidden 128, 2 layers, batch 16 "
        f"x 32 tokens per rank), gloo, {os.cpu_count()} CPU cores, 1 thread per rank"
    )
    print(
        "| trainable | tensors | params | ranks | plain step | aligned step | aligned / plain (median of pairs) | "
        "GradientAligner.step | all-reduce of the reference-gradient size |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for full in (False, True):
        n, numel = res[1][full]["n"]
        for w in (1, 2):
            r = res[w][full]
            comm = f"{r['comm']:.1f}" if w > 1 else "-"
            print(
                f"| {'all' if full else 'adapters'} | {n} | {numel / 1e3:.0f}k | {w} | {r['plain']:.1f} | "
                f"{r['aligned']:.1f} | {r['ratio']:.2f} | {r['align']:.1f} | {comm} |"
            )


if __name__ == "__main__":
    main()
