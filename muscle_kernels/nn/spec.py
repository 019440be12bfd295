"""AdapterSpec: the hyper-parameters of one adapter layer, validated once (docs/layer.md).

The layer (MuScleLoRALinear), the Hugging Face config (MuScleLoRAConfig, one spec for its LoRA targets and one for
its multi-scale targets), the training Settings and the CLI all go through these checks, so a mistake reads the same
wherever it is made. The default values below are the only place they are written.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._spec import Spec, SpecError, integer, one_of, positive_number, probability, scales

__all__ = ["AdapterSpec", "INIT_MODES"]

INIT_MODES = ("lora", "seed")
# The scales k * alpha / r live in a float32 buffer: above this they are inf, and so is every output of the layer.
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class AdapterSpec(Spec):
    """One adapter layer's shape and scale: n = len(freq_band) branches of rank inner_rank, s = k * alpha / r.

    freq_band: the radial scales k_1..k_n (positive; whole numbers are kept as ints).
    inner_rank: r, the rank of every branch (an integer >= 1).
    alpha: the LoRA-style scale numerator (positive).
    dropout: adapter-input dropout probability in [0, 1).
    init: "lora" (R = 0: the layer starts as its base layer) or "seed" (the paper's kaiming-uniform L and R).

    Plain LoRA of rank r is `AdapterSpec.lora(r, alpha)`: freq_band (1,), init "lora".
    """

    freq_band: tuple[float, ...] = (1, 2, 3, 4)
    inner_rank: int = 1
    alpha: float = 4.0
    dropout: float = 0.0
    init: str = "lora"

    CHECKS = dict(
        freq_band=scales, inner_rank=integer(1), alpha=positive_number, dropout=probability, init=one_of(INIT_MODES)
    )

    def __post_init__(self):
        super().__post_init__()
        self.check_scales(self.freq_band, self.inner_rank, self.alpha)

    @staticmethod
    def check_scales(freq_band, inner_rank, alpha, *, band_name: str = "freq_band", alpha_name: str = "alpha"):
        """Each field may be fine alone and their scales k * alpha / inner_rank still overflow float32 (a band of
        1e300, or alpha 1e300): refuse that, naming alpha when alpha / inner_rank alone overflows, else the band."""
        per_k = alpha / inner_rank
        if max(freq_band) * per_k < FLOAT32_MAX:
            return
        name, value = (alpha_name, alpha) if per_k >= FLOAT32_MAX else (band_name, freq_band)
        raise SpecError(
            name,
            f"values whose scales k * alpha / inner_rank stay finite in float32 (largest band "
            f"{max(freq_band):g}, alpha {alpha:g}, inner_rank {inner_rank})",
            value,
        )

    @classmethod
    def lora(cls, rank: int, alpha: float, dropout: float = 0.0) -> AdapterSpec:
        """Plain LoRA (one branch, scale alpha / rank, as PEFT)."""
        return cls(freq_band=(1,), inner_rank=rank, alpha=alpha, dropout=dropout, init="lora")

    @property
    def n_branches(self) -> int:
        return len(self.freq_band)

    @property
    def rank(self) -> int:
        """n * r: the rows of lora_L (and columns of lora_R)."""
        return len(self.freq_band) * self.inner_rank
