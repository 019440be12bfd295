"""Validated, frozen specs: one check per kind of value, one message per mistake, wherever the value comes from.

A spec (nn/spec.py's AdapterSpec, align/gate.py's GateConfig) is a frozen dataclass whose fields each name a
check from this module. Building the spec runs every check once; a caller that holds a single value under its own
name (MuScleLoRAConfig's `mslr_alpha`, Settings' `ga_warmup_epochs`, the CLI's `--freq-band`) runs the same check
with `Spec.check(field, value, name=...)`, so the message is the same and names the caller's argument.

This module imports nothing from the package, so every layer may use it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

__all__ = [
    "SpecError",
    "Spec",
    "integer",
    "positive_number",
    "non_negative_number",
    "fraction",
    "probability",
    "one_of",
    "scales",
]


class SpecError(ValueError):
    """`name: expected <what>, got <value>`; `expected` and `value` are kept for callers that phrase it their way."""

    def __init__(self, name: str, expected: str, value: Any):
        self.name, self.expected, self.value = name, expected, value
        super().__init__(f"{name}: expected {expected}, got {value!r}")


Check = Callable[[str, Any], Any]  # (name, value) -> the normalised value, or SpecError


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def integer(low: int) -> Check:
    def check(name, v):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < low:
            raise SpecError(name, f"an integer >= {low}", v)
        return int(v)

    return check


def positive_number(name, v) -> float:
    if not _is_real(v) or not math.isfinite(v) or v <= 0:
        raise SpecError(name, "a positive number", v)
    return float(v)


def non_negative_number(name, v) -> float:
    if not _is_real(v) or not math.isfinite(v) or v < 0:
        raise SpecError(name, "a number >= 0", v)
    return float(v)


def fraction(name, v) -> float:
    if not _is_real(v) or not 0.0 <= v <= 1.0:
        raise SpecError(name, "a fraction in [0, 1]", v)
    return float(v)


def probability(name, v) -> float:
    if not _is_real(v) or not 0.0 <= v < 1.0:
        raise SpecError(name, "a probability in [0, 1)", v)
    return float(v)


def one_of(choices: Sequence[str]) -> Check:
    choices = tuple(choices)

    def check(name, v):
        if v not in choices:
            raise SpecError(name, f"one of {choices}", v)
        return v

    return check


def scales(name, v) -> tuple[float, ...]:
    """A non-empty sequence of positive finite numbers; whole numbers stay ints (the paper's bands are integers)."""
    expected = "a non-empty sequence of positive numbers such as (1, 2, 3, 4)"
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise SpecError(name, expected, v)
    items = tuple(v)
    # Elements may be any real number type (int, float, numpy scalars, 0-dim tensors), but not text or booleans.
    try:
        values = [float(k) for k in items if not isinstance(k, (str, bytes, bool))]
    except (TypeError, ValueError, RuntimeError):
        values = []
    if not items or len(values) != len(items) or not all(math.isfinite(k) and k > 0 for k in values):
        raise SpecError(name, expected, v)
    return tuple(int(k) if k.is_integer() else k for k in values)


class Spec:
    """Base of the frozen spec dataclasses: `CHECKS` maps every field to its check, run once by __post_init__."""

    CHECKS: ClassVar[dict[str, Check]] = {}

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, self.CHECKS[f.name](f.name, getattr(self, f.name)))

    @classmethod
    def check(cls, field: str, value, *, name: str | None = None):
        """Run `field`'s check on one value, naming it `name` (default: the field) in the error."""
        return cls.CHECKS[field](name or field, value)

    def replace(self, **changes):
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)
