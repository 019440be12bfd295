"""Multi-process helpers for tests/test_distributed*.py: spawn N gloo ranks on the CPU with a deadline, and the
per-rank programs (DDP and FSDP2 training with the aligner, the split two-stage op). Not a test module itself.

Each program writes what the parent checks into `out_dir/rank{r}.pt`; the parent compares it with one process whose
batches are the union of the ranks'. Everything is tiny (a 4-layer MLP, 3 steps) so that the process start-up
dominates."""

from __future__ import annotations

import os
import pathlib
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

WORLD = 2
STEPS = 3
BATCH = 4  # per rank, train and reference alike


# -- spawning ------------------------------------------------------------------------------------------------------
def _entry(rank: int, fn: Callable, world: int, out_dir: str, args: tuple):
    os.environ.setdefault("MUSCLE_KERNELS_GRAD_ALIGN_BACKEND", "foreach")  # no JIT build inside the workers
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        dist.destroy_process_group()
    except BaseException:  # report, so that the parent's message says what failed on which rank
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def spawn(fn: Callable, out_dir, *args, world: int = WORLD, timeout: float = 90.0) -> list[dict]:
    """Run fn(rank, world, *args) on `world` gloo ranks; the ranks' results, or an AssertionError naming the rank
    that failed or the deadline that passed (the ranks are then killed: a hang fails the test, it never blocks)."""
    out_dir = str(out_dir)
    ctx = mp.start_processes(_entry, args=(fn, world, out_dir, args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise AssertionError(f"{fn.__name__}: the ranks did not finish within {timeout:.0f} s (a hang)")
    except mp.ProcessRaisedException as e:
        errs = [pathlib.Path(out_dir, f).read_text() for f in sorted(os.listdir(out_dir)) if f.endswith(".err")]
        raise AssertionError(f"{fn.__name__} failed on a rank:\n" + ("\n".join(errs) or str(e))) from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


# -- the model and the data ----------------------------------------------------------------------------------------
def make_model():
    """Linear(3, 1) has a 1-row weight and a 1-element bias: under FSDP2 on 2 ranks their shard on rank 1 is empty."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)
    )


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x).squeeze(-1), y)


def batches(kind: str, rank: int, n: int, nan: bool = False):
    """n batches of BATCH samples for `rank` ("train" or "ref"); nan=True puts a NaN into every reference input."""
    gen = torch.Generator().manual_seed((1000 if kind == "train" else 2000) + 10 * rank)
    out = []
    for _ in range(n):
        x, y = torch.randn(BATCH, 6, generator=gen), torch.randn(BATCH, generator=gen)
        if nan:
            x[0, 0] = float("nan")
        out.append((x, y))
    return out


def union(per_rank: list[list[tuple]]):
    """The batches of one process that sees every rank's samples: step i is the concatenation of the ranks' i-th."""
    return [
        (torch.cat([b[i][0] for b in per_rank]), torch.cat([b[i][1] for b in per_rank]))
        for i in range(len(per_rank[0]))
    ]


CONFIGS = {
    # min_ref_loss=0: the replace branch at every step
    "replace": dict(min_ref_loss=0.0, max_raw_ratio=0.1, warmup_epochs=1, epochs=STEPS),
    # an unreachable min_ref_loss: raw at epoch 0, then blend with a growing ratio
    "gate": dict(min_ref_loss=1e9, max_raw_ratio=0.5, warmup_epochs=1, epochs=STEPS),
    # the reference gradient is the mean over all reference batches at every step
    "all_batches": dict(min_ref_loss=0.0, max_raw_ratio=0.0, one_batch=False),
}


def train(model, wrapped, params, train_b, ref_b, cfg: str, probe=None):
    """STEPS of SGD with the aligner (epoch = step); returns the AlignSteps. `probe(step, fn)` may wrap the align
    call (to count collectives)."""
    from muscle_kernels.align.aligner import GradientAligner

    aligner = GradientAligner(params, ref_b, loss_fn, backend="foreach", **CONFIGS[cfg])
    opt = torch.optim.SGD(params, lr=0.2)
    infos = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss_fn(wrapped, train_b[step]).backward()
        infos.append(aligner.step(wrapped, step) if probe is None else probe(step, lambda: aligner.step(wrapped, step)))
        opt.step()
    return infos


def single_process(cfg: str, world: int = WORLD):
    """Final parameters and branches of one process whose batches are the union of the ranks'."""
    model = make_model()
    train_b = union([batches("train", r, STEPS) for r in range(world)])
    n_ref = 2
    ref_b = union([batches("ref", r, n_ref) for r in range(world)])
    infos = train(model, model, list(model.parameters()), train_b, ref_b, cfg)
    return [p.detach().clone() for p in model.parameters()], [i.branch for i in infos], [i.ref_loss for i in infos]


# -- counting collectives ------------------------------------------------------------------------------------------
class CollectiveLog(TorchDispatchMode):
    """Records every c10d collective dispatched while active as (op name, bytes of its tensor arguments)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("c10d."):
            nbytes = 0
            for a in list(args) + list((kwargs or {}).values()):
                for t in a if isinstance(a, (list, tuple)) else [a]:
                    for u in t if isinstance(t, (list, tuple)) else [t]:
                        if isinstance(u, torch.Tensor):
                            nbytes += u.numel() * u.element_size()
            self.calls.append((name.split(".", 1)[1], nbytes))
        return func(*args, **(kwargs or {}))


def _logged(fn):
    log = CollectiveLog()
    with log:
        out = fn()
    return out, log.calls


# -- the rank programs ---------------------------------------------------------------------------------------------
DDP_VARIANTS = {"static_graph": dict(static_graph=True), "find_unused": dict(find_unused_parameters=True)}


def ddp_program(rank, world, cfgs):
    """Every aligner config under a default DDP, then the "replace" config under the DDP_VARIANTS (keys
    "replace/static_graph", ...)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    runs = [(cfg, cfg, {}) for cfg in cfgs] + [(f"replace/{k}", "replace", kw) for k, kw in DDP_VARIANTS.items()]
    for key, cfg, ddp_kw in runs:
        model = make_model()
        ddp = DDP(model, **ddp_kw)
        logs = {}

        def probe(step, fn):
            res, logs[step] = _logged(fn)
            return res

        infos = train(
            model, ddp, list(ddp.parameters()), batches("train", rank, STEPS), batches("ref", rank, 2), cfg, probe
        )
        # one more plain DDP step: a reducer left waiting by the reference backward would fail here; its collectives
        # show that the log does see the reducer's all-reduce
        _, plain = _logged(lambda: loss_fn(ddp, batches("train", rank, 1)[0]).backward())
        out[key] = dict(
            params=[p.detach().clone() for p in model.parameters()],
            branches=[i.branch for i in infos],
            ref_loss=[i.ref_loss for i in infos],
            collectives=logs,
            plain=plain,
            n_params=len(list(model.parameters())),
            numel=sum(p.numel() for p in model.parameters()),
        )
    return out


def fsdp_program(rank, world, cfgs):
    from torch.distributed.fsdp import fully_shard

    out = {}
    for cfg in cfgs:
        model = make_model()
        for i in (0, 2, 4):
            fully_shard(model[i])
        fully_shard(model)
        logs = {}

        def probe(step, fn):
            res, logs[step] = _logged(fn)
            return res

        # the collectives of one plain forward + backward: what the reference pass may add, and no more
        _, plain = _logged(lambda: loss_fn(model, batches("train", rank, 1)[0]).backward())
        model.zero_grad(set_to_none=True)
        params = list(model.parameters())
        infos = train(model, model, params, batches("train", rank, STEPS), batches("ref", rank, 2), cfg, probe)
        local_numel = [p.to_local().numel() for p in params]
        full = [p.full_tensor().detach().clone() for p in params]  # gathered for the check only, after training
        out[cfg] = dict(
            params=full,
            branches=[i.branch for i in infos],
            ref_loss=[i.ref_loss for i in infos],
            collectives=logs,
            plain=plain,
            n_params=len(params),
            local_numel=local_numel,
            n_batches=2 if CONFIGS[cfg].get("one_batch") is False else 1,
        )
    return out


def misc_program(rank, world, seed):
    """The non-finite reference loss under both engines, the split two-stage op, and the bucketed reference
    all-reduce, in one process group."""
    return dict(
        nonfinite={e: nonfinite_program(rank, world, e) for e in ("ddp", "fsdp2")},
        split=split_op_program(rank, world, seed),
        buckets=bucket_program(rank, world, seed),
    )


def all_programs(rank, world, cfgs, seed):
    """Every program above in one process group (one spawn: the start-up of the ranks dominates the test time)."""
    return dict(
        ddp=ddp_program(rank, world, cfgs), fsdp=fsdp_program(rank, world, cfgs), misc=misc_program(rank, world, seed)
    )


def bucket_program(rank, world, seed):
    """average_reference_ with tiny buckets (several per dtype), mixed dtypes, and a tensor that only rank 0's
    reference loss reaches: returns this rank's result and every rank's inputs, for the parent to check."""
    from muscle_kernels.align import distributed as D

    gen = torch.Generator().manual_seed(seed + rank)
    specs = [
        ((5, 3), torch.float32),
        ((7,), torch.bfloat16),
        ((2, 2), torch.float32),
        ((9,), torch.float64),
        ((4,), torch.bfloat16),
        ((3, 3), torch.float32),
    ]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=d)) for s, d in specs]
    for p in params:
        p.grad = torch.zeros_like(p)
    refs = [torch.randn(s, generator=gen).to(d) for s, d in specs]
    inputs = [r.clone() for r in refs]
    refs[2] = None if rank == 1 else refs[2]  # reached on rank 0 only
    refs[4] = None  # reached on no rank
    old = D.BUCKET_BYTES
    D.BUCKET_BYTES = 40  # a few elements per bucket
    try:
        log = CollectiveLog()
        with log:
            loss, out = D.average_reference_(D.DistContext("replicated", None, world), 1.0 + rank, refs, params)
    finally:
        D.BUCKET_BYTES = old
    return dict(loss=loss, out=out, inputs=inputs, calls=log.calls)


def nonfinite_program(rank, world, engine):
    """Rank 1's reference loss is NaN: both ranks must take the raw branch and leave the training gradient as is."""
    model = make_model()
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for i in (0, 2, 4):
            fully_shard(model[i])
        fully_shard(model)
        wrapped = model
    from muscle_kernels.align.aligner import GradientAligner

    params = list(wrapped.parameters())
    aligner = GradientAligner(
        params,
        batches("ref", rank, 1, nan=(rank == 1)),
        loss_fn,
        backend="foreach",
        min_ref_loss=0.0,
        max_raw_ratio=0.1,
        warmup_epochs=0,
        epochs=2,
    )
    out = {}
    for step in range(2):
        wrapped.zero_grad(set_to_none=True)
        loss_fn(wrapped, batches("train", rank, 2)[step]).backward()
        before = [(p.grad.to_local() if engine == "fsdp2" else p.grad).clone() for p in params]
        info = aligner.step(wrapped, epoch=1)
        after = [(p.grad.to_local() if engine == "fsdp2" else p.grad) for p in params]
        out[step] = dict(
            branch=info.branch, ref_loss=info.ref_loss, unchanged=all(torch.equal(a, b) for a, b in zip(after, before))
        )
    return out


def shard(t, rank, world):
    """Rank `rank`'s dim-0 shard of t as FSDP2 cuts it (torch.chunk; empty for a rank past the last chunk)."""
    chunks = torch.chunk(t, world)
    return chunks[rank] if rank < len(chunks) else t[t.shape[0] :]


def split_op_program(rank, world, seed):
    """The two-stage op on dim-0 shards (torch.chunk, as FSDP2 shards) with a summed [n, 3] stats all-reduce, against
    align_gradients_ on the whole tensors. Returns the largest error per tensor (relative to the tensor's scale)."""
    from muscle_kernels.align import distributed as D
    from muscle_kernels.ops.grad_align import (
        align_gradients_,
        grad_align_apply_,
        grad_align_coeffs,
        grad_align_reduce,
    )

    gen = torch.Generator().manual_seed(seed)
    specs = [
        ((7, 5), torch.float32),
        ((1, 9), torch.float32),
        ((3,), torch.bfloat16),
        ((1,), torch.float16),
        ((4, 3, 2), torch.float64),
        ((5, 4), torch.bfloat16),
        ((2, 6), torch.float16),
    ]
    whole_g = [torch.randn(s, generator=gen).to(d) for s, d in specs]
    whole_r = [torch.randn(s, generator=gen).to(d) for s, d in specs]
    out = {}
    ctx = D.DistContext("sharded", None, world)
    for rho in (0.0, 0.3):
        want = [g.clone() for g in whole_g]
        want_stats = align_gradients_(want, whole_r, raw_ratio=rho)
        local_g = [shard(g, rank, world).clone() for g in whole_g]
        local_r = [shard(r, rank, world) for r in whole_r]
        stats = grad_align_reduce(local_g, local_r)
        glob, _ = D.all_reduce_stats(ctx, stats, 0.0, torch.device("cpu"))
        grad_align_apply_(local_g, local_r, grad_align_coeffs(glob, rho))
        errs = []
        for g, w in zip(local_g, want):
            part = shard(w, rank, world)
            scale = float(w.double().abs().max())
            errs.append(float((g.double() - part.double()).abs().max()) / scale if g.numel() else 0.0)
        out[rho] = dict(
            errs=errs,
            empty=[g.numel() == 0 for g in local_g],
            stats_err=float(
                ((glob.double() - want_stats.double()).abs() / want_stats.double().abs().clamp_min(1e-6)).max()
            ),
            dtypes=[str(g.dtype) for g in local_g],
        )
    return out
