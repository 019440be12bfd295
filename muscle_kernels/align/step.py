"""The one training path with alignment: after backward, align, then clip, then step (docs/alignment.md).

The paper aligns the raw gradient before clipping it (align, clip to 1.0, AdamW). AlignClipStep does exactly that
and nothing else, so the package's hand-written loop (defense/train.py) and its Trainer callback
(integrations/trainer.py) cannot drift apart: a change to the order or to the gate is made here once.

    aligner = build_aligner(params, ref_batches, loss_fn, epochs=num_epochs)   # None: no alignment
    update = AlignClipStep(params, aligner=aligner, max_grad_norm=1.0, optimizer=opt, scheduler=sched)
    for epoch in range(num_epochs):
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            record = update(model, epoch)      # align -> clip -> opt.step() -> sched.step()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .._spec import non_negative_number
from .aligner import AlignStep, GradientAligner
from .gate import GateConfig

__all__ = ["AlignClipStep", "StepRecord", "build_aligner"]

# The gate's field names, from the dataclass itself: a field added to GateConfig is accepted here without a second list.
_GATE_FIELDS = tuple(f.name for f in dataclasses.fields(GateConfig))


def build_aligner(
    params: Iterable[torch.Tensor],
    ref_batches,
    loss_fn: Callable[[torch.nn.Module, Any], Any],
    *,
    epochs: int,
    gate: GateConfig | None = None,
    **aligner_kwargs,
) -> GradientAligner:
    """A GradientAligner for a run of `epochs` epochs.

    gate and aligner_kwargs are GradientAligner's (gate fields such as min_ref_loss override `gate`'s). The gate is
    then fitted to the run with GateConfig.for_epochs: a run that ends before the warm-up is over never blends."""
    overrides = {k: aligner_kwargs.pop(k) for k in _GATE_FIELDS if aligner_kwargs.get(k) is not None}
    config = (gate or GateConfig()).replace(**overrides).for_epochs(epochs)
    return GradientAligner(params, ref_batches, loss_fn, gate=config, epochs=epochs, **aligner_kwargs)


@dataclass
class StepRecord:
    """What one AlignClipStep did: the aligner's AlignStep (None without an aligner) and grad_norm, the norm of the
    (aligned) gradient before clipping (NaN when no parameter had a gradient)."""

    align: AlignStep | None
    grad_norm: float


class AlignClipStep:
    """Call after `loss.backward()`: align the gradients (when there is an aligner), clip them, then step.

    Args:
        params: the trainable tensors; those with a `.grad` are clipped together.
        aligner: a GradientAligner, or None for a step without alignment.
        max_grad_norm: clip the total norm to this; 0 does not clip (the norm is still measured for the record).
        optimizer: stepped after clipping. Leave it None where the caller steps itself (the Hugging Face Trainer
            calls `optimizer.step()` right after its `on_pre_optimizer_step` callbacks).
        scheduler: a learning-rate scheduler stepped after the optimizer (needs `optimizer`).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        aligner: GradientAligner | None = None,
        max_grad_norm: float = 0.0,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler=None,
    ):
        self.params: list[torch.Tensor] = list(params)
        if aligner is not None and not isinstance(aligner, GradientAligner):
            raise TypeError(f"aligner: expected a GradientAligner or None, got {type(aligner).__name__}")
        if scheduler is not None and optimizer is None:
            raise ValueError("scheduler: given without an optimizer; the scheduler steps after the optimizer")
        self.aligner = aligner
        self.max_grad_norm = non_negative_number("max_grad_norm", max_grad_norm)
        self.optimizer = optimizer
        self.scheduler = scheduler

    def __call__(self, model: torch.nn.Module, epoch: float) -> StepRecord:
        info = self.aligner.step(model, epoch) if self.aligner is not None else None
        grad_norm = self.clip()
        if self.optimizer is not None:
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        return StepRecord(info, grad_norm)

    def clip(self) -> float:
        """Clip the parameters' gradients to max_grad_norm (0: measure only); return the norm before clipping."""
        grads = [p for p in self.params if p.grad is not None]
        if not grads:
            return float("nan")
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in grads])
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: the norm is a DTensor
