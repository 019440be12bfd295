"""GateConfig: the alignment gate's numbers and its decision, written once (docs/alignment.md).

GradientAligner, the training Settings, the Trainer callback and the CLI all take their gate from here: the default
values below are the only place they are written.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._spec import Spec, fraction, integer, non_negative_number

__all__ = ["GateConfig", "BRANCHES"]

BRANCHES = ("replace", "blend", "raw", "skipped")


@dataclass(frozen=True)
class GateConfig(Spec):
    """When a step's gradient is replaced by its projection on the reference gradient, blended, or left raw.

    With m the mean reference-gradient norm and l the reference loss of the step:

        m > min_ref_grad_norm and l > min_ref_loss          -> replace: g <- |<g,r>|/||r||^2 r
        elif max_raw_ratio > 0 and epoch >= warmup_epochs   -> blend with
             rho = max_raw_ratio * (epoch - warmup_epochs) / (epochs - warmup_epochs)
        else                                                -> raw: g unchanged

    min_ref_grad_norm: threshold on m (paper: 5e-7).
    min_ref_loss: threshold on l. The default 0 aligns whenever the reference gradient is usable (the paper's LLM
        setting). The paper's 0.4 for BERT/RoBERTa was tuned at lr 2e-5 over 10 epochs; a model that fits the
        reference batch below it early (a small model, a larger learning rate) then trains on the raw poisoned
        gradient and learns the backdoor (docs/defense.md has the measurements). `GateConfig.paper()` is the
        paper's encoder gate.
    max_raw_ratio: the blend ratio reached at the last epoch when the gate fails (paper: 0.1); 0 never blends.
    warmup_epochs: the first epoch at which blending may happen (paper: 1).
    """

    min_ref_grad_norm: float = 5e-7
    min_ref_loss: float = 0.0
    max_raw_ratio: float = 0.1
    warmup_epochs: int = 1

    CHECKS = dict(
        min_ref_grad_norm=non_negative_number,
        min_ref_loss=non_negative_number,
        max_raw_ratio=fraction,
        warmup_epochs=integer(0),
    )

    @classmethod
    def paper(cls) -> GateConfig:
        """The paper's gate for BERT/RoBERTa (min_ref_loss 0.4)."""
        return cls(min_ref_loss=0.4)

    @property
    def blends(self) -> bool:
        return self.max_raw_ratio > 0

    def for_epochs(self, epochs: int) -> GateConfig:
        """The gate of a run of `epochs` epochs: one that ends before warm-up is over never blends.

        This is the one place of that rule (the hand-written loop and the Trainer callback both come here)."""
        return self if epochs > self.warmup_epochs else self.replace(max_raw_ratio=0.0)

    def check_epochs(self, epochs: int | None) -> None:
        """The blend schedule needs the run's length, longer than the warm-up (errors name `epochs`)."""
        if not self.blends:
            return
        if epochs is None:
            raise ValueError(
                "epochs: the total number of epochs is required when max_raw_ratio > 0 (the blend "
                "ratio grows with epoch / epochs); pass epochs=... or max_raw_ratio=0"
            )
        if epochs <= self.warmup_epochs:
            raise ValueError(
                f"epochs: must be greater than warmup_epochs ({self.warmup_epochs}) when "
                f"max_raw_ratio > 0, got {epochs}"
            )

    def blend_ratio(self, epoch: float, epochs: int | None) -> float:
        """rho for the blend branch at `epoch`, clamped to [0, max_raw_ratio]."""
        if not self.blends:
            return 0.0
        rho = self.max_raw_ratio * (epoch - self.warmup_epochs) / (epochs - self.warmup_epochs)
        return min(max(rho, 0.0), self.max_raw_ratio)

    def decide(
        self, ref_grad_norm: float, ref_loss: float, epoch: float, epochs: int | None
    ) -> tuple[str, float | None]:
        """(branch, raw_ratio) for the reference statistics m, l at `epoch` of `epochs`."""
        if ref_grad_norm > self.min_ref_grad_norm and ref_loss > self.min_ref_loss:
            return "replace", 0.0
        if self.blends and epoch >= self.warmup_epochs:
            return "blend", self.blend_ratio(epoch, epochs)
        return "raw", None
