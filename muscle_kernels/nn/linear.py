"""MuScleLoRALinear: a drop-in replacement for nn.Linear with multi-scale low-rank adapter branches (docs/layer.md).

The base weight and bias are frozen; the trainable adapter is lora_L [n*r, in] and lora_R [out, n*r]; the radial
scales s_j = k_i * alpha / r live in a buffer. The forward pass is one call of the fused op (muscle_lora_linear), which
picks the Triton kernels on CUDA and the composed-GEMM path on the CPU. The hyper-parameters are an AdapterSpec
(nn/spec.py), checked once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..ops.lowrank_linear.function import BACKENDS, muscle_lora_linear
from ..ops.lowrank_linear.reference import make_scales, merged_delta
from .spec import INIT_MODES, AdapterSpec

__all__ = ["MuScleLoRALinear", "INIT_MODES"]

_DEFAULT = AdapterSpec()  # the keyword defaults below are read from the spec, so they are written once


class MuScleLoRALinear(nn.Module):
    """``y = x W^T + b + ((drop(x) L^T) * s) R^T`` with n = len(freq_band) branches of rank ``inner_rank``.

    A plain LoRA layer is ``freq_band=(1,), inner_rank=r, alpha=lora_alpha`` (AdapterSpec.lora(r, alpha)).

    The adapter's hyper-parameters are AdapterSpec's fields (nn/spec.py), checked there; `from_linear` also takes
    a ready spec.
    init="lora" (default): L kaiming-uniform(a=sqrt(5)), R zero, so the output equals the base layer's at step 0.
    init="seed": both kaiming-uniform(a=sqrt(5)), as the paper's MultiScaleLowRankLinear.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        freq_band: Sequence[float] = _DEFAULT.freq_band,
        inner_rank: int = _DEFAULT.inner_rank,
        alpha: float = _DEFAULT.alpha,
        dropout: float = _DEFAULT.dropout,
        init: str = _DEFAULT.init,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        spec = AdapterSpec(freq_band=freq_band, inner_rank=inner_rank, alpha=alpha, dropout=dropout, init=init)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base.weight, base.bias, spec, backend)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, spec: AdapterSpec | None = None, *, backend: str = "auto", **fields
    ) -> MuScleLoRALinear:
        """Wrap an existing nn.Linear: its weight and bias Parameters are reused (not copied) and frozen.

        spec: an AdapterSpec; or give its fields as keywords (freq_band=..., alpha=..., as in the constructor)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear.weight, linear.bias, _spec_from(spec, fields), backend)
        return self

    def _setup(self, weight, bias, spec: AdapterSpec, backend):
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        # Plain attributes (not read through the spec) so that e.g. `layer.dropout = 0.1` keeps working.
        self.freq_band, self.inner_rank, self.alpha = spec.freq_band, spec.inner_rank, spec.alpha
        self.dropout, self.init = spec.dropout, spec.init
        self.backend = backend
        self.out_features, self.in_features = weight.shape
        weight.requires_grad_(False)
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            bias.requires_grad_(False)
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        else:
            self.register_parameter("bias", None)
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.lora_L = nn.Parameter(torch.empty(spec.rank, self.in_features, **factory))
        self.lora_R = nn.Parameter(torch.empty(self.out_features, spec.rank, **factory))
        self.register_buffer(
            "scales", make_scales(self.freq_band, self.inner_rank, self.alpha, device=weight.device), persistent=True
        )
        self.merged = False
        self.reset_adapter_parameters()

    @property
    def spec(self) -> AdapterSpec:
        """The layer's hyper-parameters as an AdapterSpec (checked again, since the attributes may be set)."""
        return AdapterSpec(self.freq_band, self.inner_rank, self.alpha, self.dropout, self.init)

    @property
    def n_branches(self) -> int:
        return len(self.freq_band)

    def reset_adapter_parameters(self) -> None:
        if self.merged:
            raise RuntimeError("reset_adapter_parameters: unmerge() first; the base weight holds the old adapter")
        nn.init.kaiming_uniform_(self.lora_L, a=math.sqrt(5))
        if self.init == "seed":
            nn.init.kaiming_uniform_(self.lora_R, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_R)

    # ----------------------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        return muscle_lora_linear(
            x,
            self.weight,
            self.bias,
            self.lora_L,
            self.lora_R,
            self.scales,
            dropout_p=self.dropout,
            training=self.training,
            backend=self.backend,
        )

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """R diag(s) L in fp32 (fp64 for fp64 layers): what merge() adds to the base weight."""
        return merged_delta(self.lora_L, self.lora_R, self.scales)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight: W <- W + R diag(s) L. Forward then costs a bare nn.Linear."""
        if self.merged:
            raise RuntimeError("merge: the adapter is already merged")
        self.weight.copy_((self.weight.to(self._acc_dtype()) + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter again (exact up to rounding in the weight's dtype)."""
        if not self.merged:
            raise RuntimeError("unmerge: the adapter is not merged")
        self.weight.copy_((self.weight.to(self._acc_dtype()) - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    # -- the merged flag is part of the state ---------------------------------------------------------------------
    # A merged layer's weight already holds W + R diag(s) L; a checkpoint of it must say so, or a fresh layer that
    # loads it would add the delta a second time in forward. The flag is saved (as a bool tensor under "merged") only
    # when the layer is merged, so an unmerged layer's state dict keeps exactly its tensors and every earlier
    # checkpoint loads unchanged; loading a state dict without the key means "not merged".
    _MERGED_KEY = "merged"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + self._MERGED_KEY] = torch.tensor(True)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        flag = state_dict.pop(prefix + self._MERGED_KEY, None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if flag is not None and (not isinstance(flag, torch.Tensor) or flag.numel() != 1):
            error_msgs.append(f"{prefix}{self._MERGED_KEY}: expected a one-element bool tensor, got {flag!r}")
            return
        self.merged = bool(flag) if flag is not None else False

    def _acc_dtype(self):
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32

    def extra_repr(self) -> str:
        band = ", ".join(str(k) for k in self.freq_band)
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"freq_band=({band}), inner_rank={self.inner_rank}, alpha={self.alpha:g}"
        )
        if self.dropout:
            text += f", dropout={self.dropout:g}"
        if self.merged:
            text += ", merged=True"
        return text


def _spec_from(spec: AdapterSpec | None, fields: dict) -> AdapterSpec:
    if spec is None:
        return AdapterSpec(**fields)
    if not isinstance(spec, AdapterSpec):
        raise TypeError(f"spec: expected an AdapterSpec, got {type(spec).__name__}")
    if fields:
        raise TypeError(f"spec: given together with {sorted(fields)}; put those fields into the spec instead")
    return spec
