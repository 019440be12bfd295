"""Backdoor metrics (docs/attacks.md): clean accuracy (CACC) and attack success rate (ASR)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["accuracy", "attack_success_rate"]


def _as_list(name: str, values) -> list:
    try:
        out = [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a sequence of integer class ids, got {values!r:.80}") from None
    if not out:
        raise ValueError(f"{name}: expected at least one prediction, got an empty sequence")
    return out


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to the labels (CACC when measured on the clean test set)."""
    p, y = _as_list("preds", preds), _as_list("labels", labels)
    if len(p) != len(y):
        raise ValueError(f"preds and labels: expected the same length, got {len(p)} and {len(y)}")
    return sum(a == b for a, b in zip(p, y)) / len(p)


def attack_success_rate(preds: Sequence[int], target_label: int) -> float:
    """Fraction of poisoned samples (non-target samples with the trigger) classified as `target_label`."""
    if isinstance(target_label, bool) or not isinstance(target_label, int):
        raise TypeError(f"target_label: expected an integer class id, got {target_label!r}")
    p = _as_list("preds", preds)
    return sum(a == target_label for a in p) / len(p)
