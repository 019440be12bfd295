"""The data pipeline of a defended run: read the data, hold out a clean dev set, poison the training set and build the
attack's test set (ASR), as `muscle-lora defend` does -- callable from Python without the command line.

    from muscle_kernels.defense.splits import build_splits
    splits = build_splits(train="train.csv", test_clean="test.csv", attack="badnets", poison_rate=0.1)

The error messages name the command line's options (`--train` is `train`, `--poison-rate` is `poison_rate`, ...):
the CLI passes them on word for word, and one text per mistake is kept in one place."""

from __future__ import annotations

import random
from collections.abc import Callable

from .data import DataError, load_file

__all__ = ["build_splits", "SplitsError", "SplitsUsageError", "DEFAULT_POISON_RATE", "DEFAULT_TARGET_LABEL"]

# the defaults of the attack's options (None in build_splits' signature: given or not changes which checks apply)
DEFAULT_POISON_RATE = 0.1
DEFAULT_TARGET_LABEL = 1


class SplitsError(DataError):
    """The data, or an option given with it, cannot make the splits (e.g. a --target-label the data lacks)."""


class SplitsUsageError(SplitsError):
    """The sources given do not make a set of splits (missing or conflicting files); the CLI reports it as a usage
    error, pointing at --help."""


def build_splits(
    *,
    data=None,
    train=None,
    dev=None,
    test_clean=None,
    test_poison=None,
    text_column: str = "text",
    label_column: str = "label",
    attack: str | None = None,
    poison_rate: float | None = None,
    target_label: int | None = None,
    clean_label: bool = False,
    poison_setting: str | None = None,
    force: bool = False,
    seed: int = 0,
    ref_size: int | None = None,
    report: Callable[[str], None] | None = None,
):
    """The `Splits` (defense/train.py) of a run, from either source:

    - `data`: a folder in the paper's format, poisoned already (`poison_setting` / `poison_rate` choose its training
      set when there are several; `force` accepts a training set that looks wrong);
    - or files (.csv/.tsv/.jsonl, columns `text_column` and `label_column`): `train` and `test_clean`, with either
      `attack` ("badnets" or "addsent": `poison_rate` of the training set poisoned towards `target_label`, by default
      0.1 and 1; `clean_label` poisons target-class rows and keeps their labels; `test_poison` is built from
      `test_clean` unless given), or, without `attack`, a poisoned `train` with a clean `dev` and `test_poison`.
      With `attack` and no `dev`, a clean dev set is held out of `train` before poisoning (a fifth of it, at least
      `ref_size` + 50 rows), so that the reference set of muscle-ga drawn from it is clean.

    Everything is seeded by `seed`. `report`, when given, receives a line naming the training set a `data` folder
    gave. Raises SplitsUsageError when the sources given do not make a set of splits, SplitsError when the data does
    not fit the options, and DataError / FileNotFoundError from reading the files."""
    from . import attacks
    from .paper_data import check_training_set, load_paper_folder
    from .train import Splits

    files = dict(text_column=text_column, label_column=label_column)
    _check_source_flags(
        data=data,
        dev=dev,
        text_column=text_column,
        label_column=label_column,
        attack=attack,
        poison_rate=poison_rate,
        target_label=target_label,
        clean_label=clean_label,
    )
    if target_label is None:
        target_label = DEFAULT_TARGET_LABEL
    if attack and poison_rate is None:  # also with data: the folder's <rate>/ is then looked up at this rate
        poison_rate = DEFAULT_POISON_RATE
    if data:
        if train or test_clean or test_poison:
            raise SplitsUsageError("--data: give either --data DIR or the files (--train, --test-clean, ...), not both")
        found = load_paper_folder(data, setting=poison_setting, rate=poison_rate, force=force)
        if report is not None:
            report(
                f"training set {found['source']} ({len(found['train'])} samples, "
                f"{sum(s.poisoned for s in found['train'])} flagged poisoned)"
            )
        if "dev" not in found:
            raise SplitsUsageError(f"--data: {data} has no dev-clean.csv; muscle-ga and best-epoch selection need it")
        if attack:
            raise SplitsUsageError(
                "--attack: the paper's folders are poisoned already; use --attack with clean --train files"
            )
        return Splits(
            train=found["train"],
            dev=found["dev"],
            test_clean=found["test_clean"],
            test_poison=found["test_poison"],
            dev_poison=found.get("dev_poison", []),
        )
    if poison_setting:
        raise SplitsUsageError(
            "--poison-setting: chooses the training set of a --data folder; it has no meaning with --train"
        )
    if not train or not test_clean:
        raise SplitsUsageError("defend: give --data DIR, or --train FILE and --test-clean FILE")
    train_rows = load_file(train, **files)
    test_clean_rows = load_file(test_clean, **files)
    dev_rows = load_file(dev, **files) if dev else None
    if attack:
        made = attacks.make_attack(attack)
        if dev_rows is None:  # hold out clean samples before poisoning: the reference set must be clean
            order = list(range(len(train_rows)))
            random.Random(seed).shuffle(order)
            n_dev = max((ref_size or 0) + 50, len(train_rows) // 5)
            if n_dev >= len(train_rows) // 2:
                raise SplitsUsageError(
                    f"--train: {len(train_rows)} samples are too few to hold out a clean dev set of {n_dev}; give --dev"
                )
            dev_rows = [train_rows[i] for i in sorted(order[:n_dev])]
            train_rows = [train_rows[i] for i in sorted(order[n_dev:])]
        _check_attack(
            train=train,
            dev=dev,
            test_clean=test_clean,
            test_poison=test_poison,
            poison_rate=poison_rate,
            target_label=target_label,
            clean_label=clean_label,
            train_rows=train_rows,
            test_clean_rows=test_clean_rows,
            dev_rows=dev_rows,
        )
        train_rows = attacks.poison_train(
            train_rows, made, rate=poison_rate, target_label=target_label, clean_label=clean_label, seed=seed
        )
        test_poison_rows = (
            load_file(test_poison, **files)
            if test_poison
            else attacks.poison_test(test_clean_rows, made, target_label=target_label, seed=seed + 1)
        )
        dev_poison_rows = attacks.poison_test(dev_rows, made, target_label=target_label, seed=seed + 2)
    else:
        if not test_poison:
            raise SplitsUsageError(
                "--test-poison: needed to measure ASR (or pass --attack to poison clean data yourself)"
            )
        if dev_rows is None:
            raise SplitsUsageError(
                "--dev: a clean dev set is needed (best epoch and the muscle-ga reference set); "
                "or pass --attack to hold one out of clean --train data"
            )
        check_training_set(train_rows, train, force=force)
        test_poison_rows = load_file(test_poison, **files)
        dev_poison_rows = []
    return Splits(
        train=train_rows,
        dev=dev_rows,
        test_clean=test_clean_rows,
        test_poison=test_poison_rows,
        dev_poison=dev_poison_rows,
    )


def _check_source_flags(
    *, data, dev, text_column, label_column, attack, poison_rate, target_label, clean_label
) -> None:
    """Options that the chosen data source would ignore are errors, not silently dropped."""
    if data:
        for option, value, default in (
            ("--text-column", text_column, "text"),
            ("--label-column", label_column, "label"),
        ):
            if value != default:  # the paper's files have fixed columns (0, 1, 2)
                raise SplitsError(
                    f"{option}: --data DIR reads the paper's files, whose columns are fixed (text, "
                    f"label, poison flag); {option} applies to --train / --dev / --test-clean files"
                )
        if dev:
            raise SplitsError(
                "--dev: --data DIR uses the folder's dev-clean.csv; give either --data or the files "
                "(--train, --dev, --test-clean, ...)"
            )
        if target_label is not None:
            raise SplitsError(
                "--target-label: the paper's folders are poisoned already (test-poison.csv carries the "
                "target label); --target-label only applies with --attack on clean --train files"
            )
    if clean_label and not attack:
        raise SplitsError("--clean-label: only applies with --attack (poisoning clean data yourself)")
    if target_label is not None and not attack and not data:
        raise SplitsError(
            "--target-label: only applies with --attack; without it the target is the label of --test-poison"
        )
    if poison_rate is not None and not attack and not data:
        raise SplitsError(
            "--poison-rate: only applies with --attack (the share to poison) or --data (which <rate>/ training set)"
        )


def _check_attack(
    *,
    train,
    dev,
    test_clean,
    test_poison,
    poison_rate,
    target_label,
    clean_label,
    train_rows,
    test_clean_rows,
    dev_rows,
) -> None:
    """What attacks.poison_train / poison_test would refuse, said in terms of the options (the file names: train,
    dev, test_clean, test_poison; their rows: train_rows, ...)."""
    target = target_label
    labels = sorted({s.label for s in train_rows})
    if len(labels) < 2:
        raise SplitsError(
            f"--attack: {train} has only label {labels[0]}; a backdoor attack needs the target "
            "class and at least one other class"
        )
    if target not in labels:
        raise SplitsError(f"--target-label: {target} is not a label of {train} (labels: {labels})")
    n_poison = int(round(poison_rate * len(train_rows)))
    kind = "target" if clean_label else "non-target"
    pool = sum((s.label == target) == bool(clean_label) for s in train_rows)
    if n_poison > pool:
        raise SplitsError(
            f"--poison-rate: {poison_rate:g} asks for {n_poison} poisoned training samples, but the "
            f"{len(train_rows)} training samples hold only {pool} {kind} ones (--target-label "
            f"{target}); at most {pool / len(train_rows):.3f}"
        )
    checks = [("--dev", dev or "the dev set held out of --train", dev_rows)]
    if not test_poison:  # else the poisoned test set is given, not built from --test-clean
        checks.append(("--test-clean", test_clean, test_clean_rows))
    for option, name, split in checks:
        have = {s.label for s in split}
        if target not in have or have == {target}:
            raise SplitsError(
                f"{option}: {name} needs samples of --target-label {target} and of another class to "
                f"measure the attack (labels: {sorted(have)})"
            )
