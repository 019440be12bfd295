"""GradientAligner: the paper's gradient alignment step with its gate (docs/alignment.md), for any training loop.

    aligner = GradientAligner(trainable_params, ref_batches, loss_fn, epochs=num_epochs)
    for epoch in range(num_epochs):
        for batch in train_loader:
            loss = loss_fn(model, batch)
            loss.backward()
            info = aligner.step(model, epoch)        # after backward, before clipping and the optimizer
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step(); optimizer.zero_grad()

align/step.py's AlignClipStep runs exactly those three steps (align, clip, optimizer step) for you; it is what the
package's own training loop and its Trainer callback use.

`loss_fn(model, batch) -> Tensor`: runs the model on one batch and returns the scalar (0-dim) loss to differentiate,
exactly like the training step's loss (same reduction, e.g. the mean cross-entropy over the batch). The aligner calls
it on reference batches only.

`ref_batches`: the clean reference set as an iterable of batches that can be iterated again and again -- a list of
batches or a DataLoader (not a one-shot generator). Each element is passed to loss_fn unchanged (move it to the
model's device in loss_fn or beforehand). refset.py draws the samples (random, or k-means over hidden states).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..ops.grad_align import grad_align_apply_, grad_align_coeffs, grad_align_reduce
from . import distributed as _dist
from .gate import BRANCHES, GateConfig

__all__ = ["GradientAligner", "AlignStep", "BRANCHES", "GateConfig"]


@dataclass
class AlignStep:
    """What one `GradientAligner.step` did.

    branch: "replace" (g <- its projection on r), "blend" (raw_ratio > 0), "raw" (gradients left as they are) or
        "skipped" (no parameter had a gradient).
    raw_ratio: the rho that was applied (0 for replace; None for raw/skipped).
    ref_loss: the reference batch's loss l (mean over batches when one_batch=False).
    ref_grad_norm: m = mean of ||r_t|| over tensors with a nonzero reference gradient (0 if there are none).
    cosines: [n] fp32 cos(g_t, r_t) before alignment for the tensors that had a gradient, in parameter order (NaN
        where g or r is zero); mean_cosine: their mean over finite entries.
    stats: [n, 3] fp32 (<g, r>, ||g||^2, ||r||^2) per tensor, from the op; a row of NaN for a tensor the reference
        loss does not reach (its gradient is left as it is).
    n_tensors: the number of parameters that had a gradient.
    """

    branch: str
    raw_ratio: float | None
    ref_loss: float
    ref_grad_norm: float
    cosines: torch.Tensor
    mean_cosine: float
    stats: torch.Tensor
    n_tensors: int


class GradientAligner:
    """Replace (or blend) each training gradient by its projection on a clean reference gradient (MuScleLoRA's GA).

    Args:
        params: the trainable tensors whose gradients are aligned (e.g. the adapter parameters). A parameter whose
            `.grad` is None at a step (unused, frozen meanwhile) is skipped at that step: no reference gradient is
            computed for it and it is not counted in the stats.
        ref_batches: re-iterable clean reference batches (see the module docstring); cycled, one batch per step.
        loss_fn: `loss_fn(model, batch) -> scalar loss tensor`.
        gate: the gate's numbers (GateConfig; default GateConfig()). min_ref_grad_norm, min_ref_loss, max_raw_ratio
            and warmup_epochs, when given, override single fields of it (see GateConfig for their meaning).
        epochs: the total number of epochs (needed for the blend schedule whenever max_raw_ratio > 0).
        one_batch: True (paper): one reference batch per step; False: the reference gradient is the mean over all
            batches of ref_batches at every step (slower, less noisy).
        autocast: a zero-argument callable returning the context manager the training step's forward runs under, e.g.
            `lambda: torch.autocast("cuda", dtype=torch.bfloat16)`. With None, the reference forward runs in whatever
            autocast state is active where `step` is called -- so either call `step` inside the training step's
            autocast block or pass this.
        backend: the op backend, "auto" | "extension" | "foreach" (see muscle_kernels.ops.grad_align).

    The gate (GateConfig.decide), with m and l of the current reference batch: replace while m > min_ref_grad_norm
    and l > min_ref_loss; otherwise blend from warm-up on (rho growing linearly to max_raw_ratio), else raw.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        ref_batches: Iterable[Any],
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
        *,
        gate: GateConfig | None = None,
        min_ref_grad_norm: float | None = None,
        min_ref_loss: float | None = None,
        max_raw_ratio: float | None = None,
        warmup_epochs: int | None = None,
        epochs: int | None = None,
        one_batch: bool = True,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        backend: str = "auto",
    ):
        if isinstance(params, torch.Tensor):
            raise TypeError("params: expected an iterable of tensors (e.g. model.parameters()), got a single tensor")
        self.params: list[torch.Tensor] = [p for p in params]
        for i, p in enumerate(self.params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{i}]: expected a tensor, got {type(p).__name__}")
        if not self.params:
            raise ValueError("params: got no tensors")
        if isinstance(ref_batches, Iterator):
            raise TypeError(
                "ref_batches: expected a re-iterable collection of batches (a list or a DataLoader), got a "
                "one-shot iterator; it is cycled over many steps"
            )
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable loss_fn(model, batch) -> loss, got {type(loss_fn).__name__}")
        if gate is not None and not isinstance(gate, GateConfig):
            raise TypeError(f"gate: expected a GateConfig, got {type(gate).__name__}")
        overrides = dict(
            min_ref_grad_norm=min_ref_grad_norm,
            min_ref_loss=min_ref_loss,
            max_raw_ratio=max_raw_ratio,
            warmup_epochs=warmup_epochs,
        )
        self.gate_config = (gate or GateConfig()).replace(**{k: v for k, v in overrides.items() if v is not None})
        self.gate_config.check_epochs(epochs)
        self.ref_batches = ref_batches
        self.loss_fn = loss_fn
        self.epochs = epochs
        self.one_batch = one_batch
        self.autocast = autocast
        self.backend = backend
        self._iter: Iterator | None = None

    # -- the schedule and the gate (GateConfig's, with this run's number of epochs) --
    def blend_ratio(self, epoch: float) -> float:
        """rho for the blend branch at `epoch`, clamped to [0, max_raw_ratio]."""
        return self.gate_config.blend_ratio(epoch, self.epochs)

    def gate(self, ref_grad_norm: float, ref_loss: float, epoch: float):
        """(branch, raw_ratio) for the reference statistics m, l at `epoch`."""
        return self.gate_config.decide(ref_grad_norm, ref_loss, epoch, self.epochs)

    # -- the reference gradient --
    def _next_batch(self):
        if self._iter is None:
            self._iter = iter(self.ref_batches)
        try:
            return next(self._iter)
        except StopIteration:
            self._iter = iter(self.ref_batches)
            try:
                return next(self._iter)
            except StopIteration:
                raise ValueError("ref_batches: is empty") from None

    def reference_batches(self) -> list[Any]:
        """The reference batches of one step: the next batch of the cycle (one_batch=True) or all of them. Each
        call advances the cycle."""
        batches = [self._next_batch()] if self.one_batch else list(self.ref_batches)
        if not batches:
            raise ValueError("ref_batches: is empty")
        return batches

    def loss_on(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """loss_fn(model, batch) under the aligner's autocast, checked to be a scalar (0-dim) tensor."""
        with self.autocast() if self.autocast is not None else contextlib.nullcontext():
            loss = self.loss_fn(model, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError(
                "loss_fn: must return a scalar (0-dim) tensor, got "
                f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}"
            )
        return loss

    def reference_gradients(self, model: torch.nn.Module, params: list[torch.Tensor]):
        """(loss, [r_t]) on the next reference batch (or the mean over all of them), via torch.autograd.grad so that
        `.grad` is not touched. A parameter the loss does not depend on gets None.

        Under DDP the result is the mean over the ranks; under FSDP2 it is this rank's loss and the sharded gradient
        from FSDP's own backward (see distributed.py)."""
        return self._reference_gradients(model, params, _dist.context(model, params))

    def _reference_gradients(self, model: torch.nn.Module, params: list[torch.Tensor], ctx: _dist.DistContext | None):
        # -- distributed hook (distributed.py) --
        if ctx is not None and ctx.kind == "sharded":
            return _dist.sharded_reference_gradients(model, params, self.reference_batches(), self.loss_on)
        model = _dist.unwrap_ddp(model)
        # -- end of the hook --
        batches = self.reference_batches()
        total: list[torch.Tensor | None] | None = None
        loss_sum = 0.0
        for batch in batches:
            loss = self.loss_on(model, batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            loss_sum += float(loss.detach())
            if total is None:
                total = list(grads)
            else:
                total = [t if g is None else (g if t is None else t.add_(g)) for t, g in zip(total, grads)]
        if len(batches) > 1:
            total = [None if t is None else t.div_(len(batches)) for t in total]
        if ctx is not None:  # distributed hook: the mean over the ranks, one bucketed all-reduce
            return _dist.average_reference_(ctx, loss_sum / len(batches), total, params)
        return loss_sum / len(batches), total

    # -- one step --
    def step(self, model: torch.nn.Module, epoch: float) -> AlignStep:
        """Align the current `.grad` of the parameters in place (call after loss.backward()). Returns AlignStep."""
        params = [p for p in self.params if p.grad is not None and p.requires_grad]
        if not params:
            return AlignStep(
                "skipped", None, float("nan"), float("nan"), torch.zeros(0), float("nan"), torch.zeros(0, 3), 0
            )
        ctx = _dist.context(model, params)  # once per step: the reference gradient and the stats both need it
        ref_loss, refs = self._reference_gradients(model, params, ctx)
        # A parameter the reference loss does not reach has r = 0: the op would keep its g, so leave it out.
        pairs = [(p.grad, r.to(p.grad.dtype)) for p, r in zip(params, refs) if r is not None]
        grads = _dist.local_tensors([g for g, _ in pairs])  # distributed hook: FSDP2 shards are aligned locally
        refs_used = _dist.local_tensors([r for _, r in pairs])
        if grads:
            stats = grad_align_reduce(grads, refs_used, backend=self.backend)
        else:
            stats = torch.zeros(0, 3)
        # distributed hook: under FSDP2 the stats and the loss are summed over the ranks (one all-reduce)
        stats, ref_loss = _dist.global_stats(ctx, params, stats, ref_loss)
        # Per-tensor cosines for all params with a grad (NaN where the reference loss does not reach the tensor).
        full = torch.full((len(params), 3), float("nan"), dtype=torch.float32, device=stats.device)
        used = torch.tensor([r is not None for r in refs], device=stats.device)
        if grads:
            full[used] = stats
        rr = stats[:, 2].double()
        nonzero = rr[rr > 0]
        ref_grad_norm = float(nonzero.sqrt().mean()) if nonzero.numel() else 0.0
        branch, rho = self.gate(ref_grad_norm, ref_loss, epoch)
        if ctx is not None and not _dist.safe_loss(ref_loss):  # distributed hook: the same safe branch everywhere
            branch, rho = "raw", None
        if branch != "raw" and grads:
            grad_align_apply_(grads, refs_used, grad_align_coeffs(stats, rho), backend=self.backend)
        cos = (full[:, 0].double() / (full[:, 1].double() * full[:, 2].double()).sqrt()).float()
        finite = cos[torch.isfinite(cos)]
        return AlignStep(
            branch,
            rho,
            ref_loss,
            ref_grad_norm,
            cos.cpu(),
            float(finite.mean()) if finite.numel() else float("nan"),
            full.cpu(),
            len(params),
        )
