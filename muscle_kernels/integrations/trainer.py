"""Gradient alignment inside the Hugging Face Trainer.

Where it hooks in: the Trainer (transformers 4.46 .. 5.x) finishes the micro-batches of an optimizer step, then
clips the gradients (`args.max_grad_norm`), then calls the `on_pre_optimizer_step` callbacks, then
`optimizer.step()`. The paper aligns *before* clipping (docs/alignment.md: align, clip to 1.0, AdamW), so
MuScleLoRACallback takes clipping over: at train begin it moves `args.max_grad_norm` into itself and sets the
Trainer's to 0; in `on_pre_optimizer_step` it runs align/step.py's AlignClipStep (align, then clip; the Trainer
steps right after), the same step the package's own training loop runs. That keeps every guarantee the Trainer
gives:
- gradient accumulation: `on_pre_optimizer_step` runs once per optimizer step, after the last micro-batch;
- mixed precision: with fp16 the Trainer unscales the gradients before the callback (it measures their norm for the
  log), and accelerate wraps `model.forward` in autocast, so the reference forward runs in the same precision;
- the logged `grad_norm` stays the raw (pre-alignment) norm; the aligned, pre-clip norm is logged as `ga_grad_norm`.

Several processes (align/distributed.py): under DDP the reference gradient is averaged over the ranks; under FSDP2
(`fsdp_config={"fsdp_version": 2}`) the alignment works on the gradient shards with one small all-reduce. FSDP1
(flattened parameters) and DeepSpeed (gradients in its own partitioned buffers, not in `.grad`) are refused.
MuScleLoRATrainer is a thin Trainer subclass that builds the callback from a reference dataset and merges its stats
into the Trainer's own log entries, so every reporter (TensorBoard, W&B, ...) sees them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ..align.step import AlignClipStep, build_aligner

__all__ = ["MuScleLoRACallback", "MuScleLoRATrainer", "hf_loss"]


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict) or hasattr(batch, "items"):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def hf_loss(model: nn.Module, batch) -> torch.Tensor:
    """The default reference loss: a transformers model's own `.loss` on a dict batch that contains `labels`."""
    device = next(model.parameters()).device
    out = model(**_to_device(batch, device))
    loss = out["loss"] if isinstance(out, dict) or hasattr(out, "keys") else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            "hf_loss: the model returned no loss; reference batches must contain `labels` (or pass loss_fn=...)"
        )
    return loss


class MuScleLoRACallback(TrainerCallback):
    """Run the paper's gradient alignment at every optimizer step of a transformers Trainer, then clip.

    Args:
        ref_batches: the clean reference set as re-iterable collated batches (a DataLoader or a list of dicts with
            `labels`); ignored when `aligner` is given.
        aligner: a ready GradientAligner; by default one is built at train begin over the model's trainable
            parameters with `loss_fn` and `aligner_kwargs`.
        loss_fn: `loss_fn(model, batch) -> scalar loss`; default `hf_loss` (the model's own loss on the batch, moved
            to the model's device).
        max_grad_norm: clip norm applied after alignment; None takes the Trainer's `args.max_grad_norm` (whose own
            clipping is switched off during training, because it would run before the alignment).
        aligner_kwargs: GradientAligner keywords (gate, or single gate fields min_ref_grad_norm, min_ref_loss,
            max_raw_ratio, warmup_epochs; epochs, one_batch, autocast, backend). `epochs` defaults to the Trainer's
            number of epochs; a run that ends before the warm-up is over never blends (GateConfig.for_epochs).

    After training, `history` holds one dict per optimizer step (step, epoch, branch, raw_ratio, ref_loss,
    ref_grad_norm, mean_cosine, grad_norm).
    """

    def __init__(
        self,
        ref_batches=None,
        *,
        aligner=None,
        loss_fn: Callable[[nn.Module, Any], Any] | None = None,
        max_grad_norm: float | None = None,
        **aligner_kwargs,
    ):
        if aligner is None and ref_batches is None:
            raise ValueError("MuScleLoRACallback: pass ref_batches (the clean reference batches) or a ready aligner")
        if aligner is not None and (ref_batches is not None or aligner_kwargs or loss_fn is not None):
            raise ValueError(
                "MuScleLoRACallback: with a ready aligner, pass no ref_batches, loss_fn or aligner "
                "keywords (they are the aligner's)"
            )
        if max_grad_norm is not None and (not isinstance(max_grad_norm, (int, float)) or max_grad_norm < 0):
            raise ValueError(f"max_grad_norm: expected None or a number >= 0, got {max_grad_norm!r}")
        self.aligner = aligner
        self.ref_batches = ref_batches
        self.loss_fn = loss_fn or hf_loss
        self.aligner_kwargs = aligner_kwargs
        self.max_grad_norm = max_grad_norm
        self.history: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []
        self._trainer_clip: float | None = None
        self._update: AlignClipStep | None = None

    # -- life cycle --------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if getattr(args, "deepspeed", None):
            raise ValueError(
                "MuScleLoRACallback: DeepSpeed keeps the gradients in its own partitioned buffers, not "
                "in .grad, so they cannot be aligned before its optimizer step; use DDP or FSDP2 "
                "(fsdp_config={'fsdp_version': 2}) instead"
            )
        if model is None:
            raise ValueError("MuScleLoRACallback: the Trainer passed no model to the callback")
        from ..align.distributed import check_engine

        check_engine(model)  # FSDP1 is refused with the reason; DDP and FSDP2 are handled by the aligner
        params = [p for p in model.parameters() if p.requires_grad]
        if self.aligner is None:
            kw = dict(self.aligner_kwargs)
            if kw.get("epochs") is None:
                kw["epochs"] = max(int(math.ceil(state.num_train_epochs or args.num_train_epochs)), 1)
            self.aligner = build_aligner(params, self.ref_batches, self.loss_fn, **kw)
        # Take clipping over (see the module docstring); restored at train end.
        self._trainer_clip = args.max_grad_norm
        if self.max_grad_norm is None:
            self.max_grad_norm = args.max_grad_norm
        args.max_grad_norm = 0.0
        self._update = AlignClipStep(params, aligner=self.aligner, max_grad_norm=self.max_grad_norm or 0.0)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._trainer_clip is not None:
            args.max_grad_norm = self._trainer_clip
            self._trainer_clip = None
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        epoch = int(state.epoch or 0)
        done = self._update(model, epoch)  # align, then clip; the Trainer steps the optimizer next
        info = done.align
        record = dict(
            step=state.global_step + 1,
            epoch=epoch,
            branch=info.branch,
            raw_ratio=info.raw_ratio,
            ref_loss=info.ref_loss,
            ref_grad_norm=info.ref_grad_norm,
            mean_cosine=info.mean_cosine,
            grad_norm=done.grad_norm,
        )
        self.history.append(record)
        self._pending.append(record)
        return control

    # -- logging -----------------------------------------------------------------------------------------------------
    def pop_log_stats(self) -> dict[str, float]:
        """Means over the optimizer steps since the last call, as float log entries (ga_*); {} when none."""
        pending, self._pending = self._pending, []
        if not pending:
            return {}

        def mean(key):
            vals = [r[key] for r in pending if r[key] is not None and math.isfinite(r[key])]
            return sum(vals) / len(vals) if vals else float("nan")

        out = {f"ga_{k}": mean(k) for k in ("ref_loss", "ref_grad_norm", "mean_cosine", "grad_norm")}
        for branch in ("replace", "blend", "raw"):
            out[f"ga_{branch}_frac"] = sum(r["branch"] == branch for r in pending) / len(pending)
        out["ga_raw_ratio"] = mean("raw_ratio")
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        # With a plain Trainer the callback adds its stats here; reporters registered before it miss them (use
        # MuScleLoRATrainer, which adds them before any callback runs).
        if logs is not None and "loss" in logs and self._pending:
            stats = self.pop_log_stats()
            logs.update(stats)
            if state.log_history:
                state.log_history[-1].update(stats)
        return control


class MuScleLoRATrainer(Trainer):
    """A Trainer with gradient alignment: `MuScleLoRATrainer(model, args, train_dataset=..., ref_dataset=...)`.

    ref_dataset: the clean reference samples (tokenized, with labels), batched like the training data
        (per_device_train_batch_size, shuffled, the Trainer's data collator; split over the ranks by a
        DistributedSampler when several processes train); or ref_batches: ready batches.
    ga_loss_fn, ga_max_grad_norm, aligner_kwargs: forwarded to MuScleLoRACallback.
    The ga_* stats join the Trainer's own training log entries.
    """

    def __init__(
        self,
        *args,
        ref_dataset=None,
        ref_batches=None,
        ga_loss_fn=None,
        ga_max_grad_norm=None,
        aligner_kwargs: dict | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if (ref_dataset is None) == (ref_batches is None):
            raise ValueError(
                "MuScleLoRATrainer: pass exactly one of ref_dataset (clean reference samples) and "
                "ref_batches (ready reference batches)"
            )
        if ref_dataset is not None:
            from torch.utils.data import DataLoader

            if hasattr(self, "_remove_unused_columns") and hasattr(ref_dataset, "column_names"):
                ref_dataset = self._remove_unused_columns(ref_dataset, description="reference")
            sampler = None
            if torch.distributed.is_available() and torch.distributed.is_initialized() and self.args.world_size > 1:
                # several processes: each rank draws its own share of the clean samples, and the aligner averages
                # the ranks' reference gradients (align/distributed.py), as DDP does with the training batches
                from torch.utils.data import DistributedSampler

                sampler = DistributedSampler(ref_dataset, shuffle=True, seed=self.args.seed)
            ref_batches = DataLoader(
                ref_dataset,
                batch_size=self.args.per_device_train_batch_size,
                shuffle=sampler is None,
                sampler=sampler,
                collate_fn=self.data_collator,
            )
        self.muscle_callback = MuScleLoRACallback(
            ref_batches, loss_fn=ga_loss_fn, max_grad_norm=ga_max_grad_norm, **(aligner_kwargs or {})
        )
        self.add_callback(self.muscle_callback)

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            logs.update(self.muscle_callback.pop_log_stats())
        return super().log(logs, *args, **kwargs)
