"""Gradient alignment under data parallelism: DDP (replicated gradients) and FSDP2 (sharded DTensor gradients).

GradientAligner calls the functions here at the places marked "distributed hook" in aligner.py; with one process
(or torch.distributed not initialized) they do nothing.

- `context(model, params)`: which regime this step runs in. None (one process), "replicated" (DDP, or any engine
  whose `.grad` is a plain tensor already averaged over the ranks), or "sharded" (FSDP2: `.grad` is a DTensor).
- Replicated (DDP). Every rank computes the reference gradient of its own reference batch with
  `torch.autograd.grad` on the *unwrapped* module (`ddp.module`), so DDP never sees that forward and backward: its
  reducer is not prepared, no bucket is marked ready, no gradient all-reduce or buffer broadcast is launched (a
  forward through the wrapper would at least broadcast, and can leave the reducer waiting). The reference
  gradients are then averaged over the ranks by bucketed all-reduces (`BUCKET_BYTES` per bucket, one bucket for any
  adapter list), with a small fp32 tail that carries the reference loss and, per tensor, how many ranks' reference
  loss reached it. After that every rank holds identical g and r,
  so the op runs locally and gives identical results: the replicas never drift.
- Sharded (FSDP2). `torch.autograd.grad` cannot reach a sharded parameter (FSDP2 computes with unsharded copies),
  so the reference gradient is produced by FSDP's own machinery: the training `.grad` is set aside, the reference
  loss is back-propagated (FSDP reduce-scatters and averages it into `.grad`, sharded exactly like the training
  gradient), the result is taken as r and the training `.grad` put back. The reduce stage runs on the local shards,
  the [n + 1, 3] fp32 result (the stats, plus a row carrying the reference loss) is summed over the ranks in one
  all-reduce -- 12 bytes per tensor -- and the coefficients and the in-place write are local. No gradient or
  parameter is gathered by the alignment.
- The gate reads globally reduced numbers only (the mean reference loss over the ranks, m from the summed stats), so
  every rank takes the same branch. A non-finite reference loss on any rank makes the global loss non-finite on
  every rank, and the step takes the "raw" branch everywhere (gradients left as they are); every rank still enters
  every collective, so none waits forever.

Set MUSCLE_KERNELS_ALIGN_DISTRIBUTED=off to align each process on its own (independent runs that merely share a
process group).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._env import forced_choice

__all__ = [
    "DistContext",
    "check_engine",
    "context",
    "unwrap_ddp",
    "local_tensors",
    "average_reference_",
    "sharded_reference_gradients",
    "all_reduce_stats",
    "global_stats",
    "safe_loss",
    "BUCKET_BYTES",
]

_ENV = "MUSCLE_KERNELS_ALIGN_DISTRIBUTED"
# The size DDP itself uses for its gradient buckets: big enough to amortize the launch, small enough that the
# flat copies stay a fraction of the reference gradient's own memory.
BUCKET_BYTES = 25 * 1024 * 1024
_engine_checked: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


@dataclass(frozen=True)
class DistContext:
    """How this step is distributed. kind: "replicated" or "sharded"; group: the process group the collectives use
    (None: the default group); world: its size; replicas: for sharded gradients, how many ranks hold each shard
    (1 for FSDP2, >1 for HSDP), which the summed stats are divided by."""

    kind: str
    group: object | None
    world: int
    replicas: int = 1


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The module a DistributedDataParallel wraps (its forward does not touch DDP's reducer); other models as they
    are."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def check_engine(model: torch.nn.Module) -> None:
    """Refuse the engines whose gradients cannot be aligned per tensor (FSDP1), with the reason."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without FSDP
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "model: FSDP1 (FullyShardedDataParallel) flattens the parameters -- their .grad are views "
            "into one flat shard -- so gradients cannot be aligned per tensor; shard with FSDP2 "
            "(torch.distributed.fsdp.fully_shard; Trainer/accelerate: fsdp_version 2) instead"
        )


def context(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> DistContext | None:
    """The distributed regime of an align step over `params` (those with a `.grad`); None for a single process."""
    import torch.distributed as dist

    if forced_choice(_ENV, ("auto", "off")) == "off":
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    sharded = [_is_dtensor(p.grad) for p in params]
    if any(sharded):
        if not all(sharded):
            raise ValueError(
                "params: some gradients are DTensors (FSDP2) and others plain tensors; align the "
                "parameters of one FSDP2 model only"
            )
        return _sharded_context(params)
    if model not in _engine_checked:
        check_engine(model)  # FSDP1's .grad also looks like a plain tensor: refuse it before averaging anything
        _engine_checked.add(model)
    from torch.nn.parallel import DistributedDataParallel

    group = model.process_group if isinstance(model, DistributedDataParallel) else None
    world = dist.get_world_size(group)
    return DistContext("replicated", group, world) if world > 1 else None


def _sharded_context(params: Sequence[torch.Tensor]) -> DistContext:
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard

    g0 = params[0].grad
    mesh = g0.device_mesh
    world = dist.get_world_size()
    if mesh.size() != world:
        raise ValueError(
            f"params: the gradients' device mesh has {mesh.size()} ranks but the process group "
            f"has {world}; alignment supports meshes over all ranks (FSDP2, HSDP)"
        )
    replicas = 1
    for i, p in enumerate(params):
        if p.grad.device_mesh != mesh:
            raise ValueError(f"params[{i}]: its gradient lives on another device mesh than params[0]'s")
    for dim, placement in enumerate(g0.placements):
        if isinstance(placement, Replicate):
            replicas *= mesh.size(dim)
        elif not isinstance(placement, Shard):
            raise ValueError(
                f"params[0]: gradient placement {placement} is not supported (expected Shard "
                "or Replicate, as FSDP2/HSDP make)"
            )
    for i, p in enumerate(params):
        if tuple(p.grad.placements) != tuple(g0.placements):
            raise ValueError(
                f"params[{i}]: gradient placements {p.grad.placements} differ from params[0]'s {g0.placements}"
            )
    return DistContext("sharded", None, world, replicas)


def local_tensors(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The local shards of DTensors (views: writing them writes the DTensor); plain tensors as they are."""
    return [t._local_tensor if _is_dtensor(t) else t for t in tensors]


# -- replicated gradients (DDP) ------------------------------------------------------------------------------------
def _buckets(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of `tensors` grouped by (device, dtype), each group cut into buckets of at most BUCKET_BYTES."""
    groups: dict[tuple[torch.device, torch.dtype], list[list[int]]] = {}
    sizes: dict[tuple[torch.device, torch.dtype], int] = {}
    for i, t in enumerate(tensors):
        key = (t.device, t.dtype)
        nbytes = t.numel() * t.element_size()
        if key not in groups or (sizes[key] + nbytes > BUCKET_BYTES and groups[key][-1]):
            groups.setdefault(key, []).append([])
            sizes[key] = 0
        groups[key][-1].append(i)
        sizes[key] += nbytes
    return [b for bs in groups.values() for b in bs]


def average_reference_(
    ctx: DistContext, loss: float, refs: list[torch.Tensor | None], params: Sequence[torch.Tensor]
) -> tuple[float, list[torch.Tensor | None]]:
    """(mean loss over the ranks, refs averaged over the ranks) for replicated gradients.

    refs[i] is None where this rank's reference loss does not reach params[i]; it is all-reduced as zeros (the
    bucket layout must be the same on every rank) and stays None only where no rank's loss reaches it.
    """
    import torch.distributed as dist

    n = len(refs)
    device = params[0].grad.device if n else torch.device("cpu")
    work = [r if r is not None else torch.zeros_like(p.grad) for r, p in zip(refs, params)]
    tail = torch.tensor([loss] + [float(r is not None) for r in refs], dtype=torch.float32, device=device)
    tensors = work + [tail]

    def finish(bucket, flat, handle):
        handle.wait()
        flat.div_(ctx.world)
        if len(bucket) > 1:
            for i, piece in zip(bucket, torch.split(flat, [tensors[i].numel() for i in bucket])):
                tensors[i].copy_(piece.view_as(tensors[i]))
        elif flat.data_ptr() != tensors[bucket[0]].data_ptr():
            tensors[bucket[0]].copy_(flat.view_as(tensors[bucket[0]]))

    # At most two buckets in flight: the next one is packed and sent while the previous one finishes, and the flat
    # copies never hold more than two buckets of memory.
    pending = []
    for bucket in _buckets(tensors):
        if len(bucket) > 1:
            flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
        else:
            flat = tensors[bucket[0]].reshape(-1)  # a view when contiguous: reduced in place
        pending.append((bucket, flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=ctx.group, async_op=True)))
        if len(pending) > 1:
            finish(*pending.pop(0))
    while pending:
        finish(*pending.pop(0))
    reached = tail[1:].tolist()
    out = [w if reached[i] > 0 else None for i, w in enumerate(work)]
    return float(tail[0]), out


# -- sharded gradients (FSDP2) -------------------------------------------------------------------------------------
def sharded_reference_gradients(
    model: torch.nn.Module,
    params: list[torch.Tensor],
    batches: Sequence[Any],
    loss_on: Callable[[torch.nn.Module, Any], torch.Tensor],
) -> tuple[float, list[torch.Tensor | None]]:
    """(this rank's reference loss, [r_t] sharded like the training gradients) through FSDP2's own backward.

    `batches` are the step's reference batches and `loss_on(model, batch)` their scalar loss (GradientAligner's
    reference_batches() and loss_on). The training gradients of every parameter of `model` (and of `params`) are
    set aside during the reference backward and restored after it, so the training `.grad` comes out unchanged. A
    parameter the loss does not reach gets None (the same on every rank: every rank runs the same graph)."""
    everyone: dict[int, torch.Tensor] = {id(p): p for p in model.parameters() if p.requires_grad}
    everyone.update({id(p): p for p in params})
    saved = {k: p.grad for k, p in everyone.items()}
    loss_sum = 0.0
    try:
        for p in everyone.values():
            p.grad = None
        for batch in batches:
            loss = loss_on(model, batch)
            # Every rank runs this backward, finite loss or not: FSDP's reduce-scatters are collectives.
            loss.backward()
            loss_sum += float(loss.detach())
        refs = [p.grad for p in params]
    finally:
        for k, p in everyone.items():
            p.grad = saved[k]
    if len(batches) > 1:
        refs = [None if r is None else r.div_(len(batches)) for r in refs]
    return loss_sum / len(batches), refs


def _comm_device(ctx: DistContext, device: torch.device) -> torch.device:
    """Where the small stats buffer must live for the group's backend: FSDP2 with CPU offload keeps the gradient
    shards on the CPU, which a pure NCCL group cannot reduce."""
    import torch.distributed as dist

    if device.type == "cpu" and "gloo" not in str(dist.get_backend(ctx.group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def all_reduce_stats(
    ctx: DistContext, stats: torch.Tensor, loss: float, device: torch.device
) -> tuple[torch.Tensor, float]:
    """(global stats, mean loss over the ranks): the local-shard stats [n, 3] and this rank's loss summed over the
    ranks in one fp32 all-reduce of [n + 1, 3]."""
    import torch.distributed as dist

    home, device = device, _comm_device(ctx, device)
    stats = stats.to(device=device, dtype=torch.float32)
    buf = torch.cat([stats, torch.tensor([[loss, 0.0, 0.0]], dtype=torch.float32, device=device)])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=ctx.group)
    glob = buf[:-1]
    if ctx.replicas > 1:  # HSDP: each shard's sums arrive once per replica
        glob = glob / ctx.replicas
    return glob.to(home).contiguous(), float(buf[-1, 0]) / ctx.world


def global_stats(
    ctx: DistContext | None, params: Sequence[torch.Tensor], stats: torch.Tensor, loss: float
) -> tuple[torch.Tensor, float]:
    """(stats, loss) as the gate must see them under `ctx` (the step's context()): summed over the shards for
    sharded gradients, as they are otherwise (replicated gradients were already averaged with the reference
    gradient)."""
    if ctx is not None and ctx.kind == "sharded":
        stats, loss = all_reduce_stats(ctx, stats, loss, params[0].grad._local_tensor.device)
    return stats, loss


def safe_loss(loss: float) -> bool:
    """Whether the globally reduced reference loss lets the gate run (else: the raw branch on every rank)."""
    return math.isfinite(loss)
