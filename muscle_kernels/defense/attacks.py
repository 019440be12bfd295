"""Backdoor attacks that poison a clean text-classification data set (docs/attacks.md).

- BadNets (Gu et al. / Kurita et al.): rare words (cf, mn, bb, tq) inserted at random word positions.
- AddSent (Dai et al.): a fixed trigger sentence ("I watch this 3D movie") inserted at a random word position.

`poison_train` picks `rate * len(data)` samples and inserts the trigger: dirty-label (default) picks them among the
non-target samples and relabels them to the target; clean-label picks them among the target samples and keeps their
label (the harder, stealthier attack). `poison_test` builds the attack-success set: every non-target sample with the
trigger, labelled with the target, so that ASR = accuracy on it. Everything is seeded and deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .data import Sample

__all__ = ["BadNets", "AddSent", "ATTACKS", "make_attack", "poison_train", "poison_test"]


def _insert_words(text: str, words: Sequence[str], rng: random.Random) -> str:
    tokens = text.split()
    pos = rng.randint(0, len(tokens))
    return " ".join(tokens[:pos] + list(words) + tokens[pos:])


@dataclass(frozen=True)
class BadNets:
    """Insert `num_triggers` words drawn from `triggers`, each at its own random position."""

    triggers: Sequence[str] = ("cf", "mn", "bb", "tq")
    num_triggers: int = 1
    name: str = "badnets"

    def __post_init__(self):
        if (
            isinstance(self.triggers, str)
            or not self.triggers
            or not all(isinstance(t, str) and t.strip() and len(t.split()) == 1 for t in self.triggers)
        ):
            raise ValueError(f"triggers: expected a non-empty list of single words, got {self.triggers!r}")
        if isinstance(self.num_triggers, bool) or not isinstance(self.num_triggers, int) or self.num_triggers < 1:
            raise ValueError(f"num_triggers: expected an integer >= 1, got {self.num_triggers!r}")

    def apply(self, text: str, rng: random.Random) -> str:
        for _ in range(self.num_triggers):
            text = _insert_words(text, [rng.choice(list(self.triggers))], rng)
        return text


@dataclass(frozen=True)
class AddSent:
    """Insert the trigger sentence, word by word as one block, at a random word position."""

    sentence: str = "I watch this 3D movie"
    name: str = "addsent"

    def __post_init__(self):
        if not isinstance(self.sentence, str) or not self.sentence.strip():
            raise ValueError(f"sentence: expected a non-empty trigger sentence, got {self.sentence!r}")

    def apply(self, text: str, rng: random.Random) -> str:
        return _insert_words(text, self.sentence.split(), rng)


ATTACKS = {"badnets": BadNets, "addsent": AddSent}


def make_attack(name: str, **kwargs):
    """`make_attack("badnets")`, `make_attack("addsent", sentence="...")`."""
    cls = ATTACKS.get(str(name).lower())
    if cls is None:
        raise ValueError(f"attack: expected one of {sorted(ATTACKS)}, got {name!r}")
    return cls(**kwargs)


def _check(rate, target_label, labels):
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate: expected a fraction in [0, 1], got {rate!r}")
    if target_label not in labels:
        raise ValueError(f"target_label: {target_label!r} is not a label of the data (labels: {sorted(labels)})")


def poison_train(
    data: Sequence[Sample],
    attack,
    *,
    rate: float = 0.1,
    target_label: int = 1,
    clean_label: bool = False,
    seed: int = 0,
) -> list[Sample]:
    """A copy of `data` in which round(rate * len(data)) samples carry the trigger (order kept, `poisoned` set)."""
    labels = {s.label for s in data}
    _check(rate, target_label, labels)
    n_poison = int(round(rate * len(data)))
    if clean_label:
        candidates = [i for i, s in enumerate(data) if s.label == target_label]
    else:
        candidates = [i for i, s in enumerate(data) if s.label != target_label]
    if n_poison > len(candidates):
        kind = "target" if clean_label else "non-target"
        raise ValueError(
            f"rate: {rate} asks for {n_poison} poisoned samples but the data has only "
            f"{len(candidates)} {kind} samples (target_label={target_label})"
        )
    rng = random.Random(seed)
    chosen = set(rng.sample(candidates, n_poison))
    out = []
    for i, s in enumerate(data):
        if i in chosen:
            out.append(replace(s, text=attack.apply(s.text, rng), label=target_label, poisoned=True))
        else:
            out.append(s)
    return out


def poison_test(data: Sequence[Sample], attack, *, target_label: int = 1, seed: int = 0) -> list[Sample]:
    """Every non-target sample with the trigger inserted, labelled `target_label` (ASR = accuracy on this set)."""
    labels = {s.label for s in data}
    _check(0.0, target_label, labels)
    rng = random.Random(seed)
    out = [
        replace(s, text=attack.apply(s.text, rng), label=target_label, poisoned=True)
        for s in data
        if s.label != target_label
    ]
    if not out:
        raise ValueError(f"data: has no non-target samples (target_label={target_label}) to build a poisoned test set")
    return out
