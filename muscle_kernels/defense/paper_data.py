"""The paper's poisoned-data folders, read the way the paper's own loader reads them.

One attack folder (e.g. `poison_data/hsol/1/badnets/`) holds the clean evaluation files and two kinds of training
file:

    <attack>/train-clean.csv                   the clean training set
    <attack>/train-poison.csv                  the *pool*: every training sample triggered and relabelled to the
                                               target -- not a training set, the mixed sets are drawn from it
    <attack>/<setting>/<rate>/train-poison.csv the training set: `mix/0.1` (poisoned samples of any class,
                                               relabelled), `clean/0.1` (clean-label: only target-class samples
                                               carry the trigger)
    <attack>/dev-clean.csv, dev-poison.csv, test-clean.csv, test-poison.csv

`load_paper_folder` finds the mixed training set (asking for the setting and rate when there are several), reads the
evaluation files beside it, and refuses a training set that cannot be meant: more than half of it poisoned (the
pool), or a single class.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

from .data import DataError, Sample, load_paper_csv

__all__ = ["find_training_sets", "resolve_training_set", "load_paper_folder", "check_training_set"]

TRAIN_FILE = "train-poison.csv"
# split name -> file name of the evaluation files, beside the attack folder's pool
EVAL_FILES = {
    "dev": "dev-clean.csv",
    "dev_poison": "dev-poison.csv",
    "test_clean": "test-clean.csv",
    "test_poison": "test-poison.csv",
}
MAX_POISONED_SHARE = 0.5


def find_training_sets(directory: str) -> list[tuple[str, str]]:
    """Every (setting, rate) with a `<setting>/<rate>/train-poison.csv` below `directory`, sorted."""
    found = []
    for setting in sorted(os.listdir(directory)):
        sdir = os.path.join(directory, setting)
        if not os.path.isdir(sdir):
            continue
        for rate in sorted(os.listdir(sdir)):
            if os.path.isfile(os.path.join(sdir, rate, TRAIN_FILE)):
                found.append((setting, rate))
    return found


def _same_rate(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def resolve_training_set(directory: str, *, setting: str | None = None, rate: float | None = None) -> tuple[str, str]:
    """(path of the training file, the folder holding the evaluation files) for a paper-format `directory`.

    `directory` is an attack folder (its mixed sets are searched, narrowed by `setting` and `rate`), or a
    `<setting>/<rate>` folder itself (the evaluation files then come from two levels up). Raises DataError naming
    what exists when the choice is missing or ambiguous."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such data directory")
    directory = os.path.normpath(directory)
    here = os.path.join(directory, TRAIN_FILE)
    if not os.path.isfile(os.path.join(directory, EVAL_FILES["test_clean"])) and os.path.isfile(here):
        # a <setting>/<rate> folder: the evaluation files sit in the attack folder two levels up
        attack_dir = os.path.dirname(os.path.dirname(directory))
        if setting is not None or rate is not None:
            raise DataError(
                f"{directory}: this folder is one training set already; --poison-setting and "
                "--poison-rate choose among the sets of an attack folder"
            )
        return here, attack_dir
    sets = find_training_sets(directory)
    chosen = [
        (s, r) for s, r in sets if (setting is None or s == setting) and (rate is None or _same_rate(r, str(rate)))
    ]
    listing = ", ".join(f"{s}/{r}" for s, r in sets)
    if len(chosen) == 1:
        s, r = chosen[0]
        return os.path.join(directory, s, r, TRAIN_FILE), directory
    if not sets:
        if os.path.isfile(here):
            # no mixed sets: only the folder's own file, checked by check_training_set (a pool is refused there)
            return here, directory
        # a dataset folder (hsol/) one level above its attack folders is the likeliest mistake: name them
        attacks = sorted(
            d
            for d in os.listdir(directory)
            if os.path.isdir(os.path.join(directory, d))
            and (
                find_training_sets(os.path.join(directory, d)) or os.path.isfile(os.path.join(directory, d, TRAIN_FILE))
            )
        )
        hint = f"; it holds attack folders ({', '.join(attacks)}): pass one of them" if attacks else ""
        raise FileNotFoundError(
            f"{directory}: no training set (expected <setting>/<rate>/{TRAIN_FILE}, e.g. "
            f"mix/0.1/{TRAIN_FILE}, or {TRAIN_FILE}){hint}"
        )
    wanted = " ".join(
        x for x in (setting and f"--poison-setting {setting}", rate is not None and f"--poison-rate {rate}") if x
    )
    if not chosen:
        raise DataError(f"{directory}: no training set matches {wanted}; it has {listing}")
    raise DataError(
        f"{directory}: several training sets ({listing}); choose one with --poison-setting and --poison-rate"
    )


def check_training_set(train: Sequence[Sample], path: str, *, force: bool = False) -> None:
    """Refuse a training set that is more than half poisoned or has a single class, unless `force`."""
    if force or not train:
        return
    poisoned = sum(s.poisoned for s in train) / len(train)
    if poisoned > MAX_POISONED_SHARE:
        raise DataError(
            f"{path}: {poisoned:.0%} of the {len(train)} training samples are flagged poisoned; this "
            "looks like the paper's pool of poisoned samples, not a training set (use the "
            "<setting>/<rate>/ folder, or --force to train on it anyway)"
        )
    classes = Counter(s.label for s in train)
    if len(classes) < 2:
        raise DataError(
            f"{path}: every training sample has label {next(iter(classes))}; a classifier cannot "
            "learn from one class (--force to train on it anyway)"
        )


def _no_link(path: str) -> None:
    """The files of a --data folder are found by name, not chosen by the user: a symbolic link among them could point
    anywhere (a planted `train-poison.csv -> /etc/passwd`), so it is refused, not followed."""
    if os.path.islink(path):
        raise DataError(
            f"{path}: is a symbolic link; a paper-format folder must hold its files (copy the file in, "
            "or give it with --train / --test-clean ...)"
        )


def load_paper_folder(
    directory: str, *, setting: str | None = None, rate: float | None = None, force: bool = False
) -> dict[str, list[Sample]]:
    """The splits of a paper-format folder: train (the mixed set), dev, test_clean, test_poison and, when present,
    dev_poison; `source` in the result names the training file."""
    train_path, eval_dir = resolve_training_set(directory, setting=setting, rate=rate)
    for path in [train_path] + [os.path.join(eval_dir, name) for name in EVAL_FILES.values()]:
        _no_link(path)
    out: dict[str, list] = {"train": load_paper_csv(train_path)}
    check_training_set(out["train"], train_path, force=force)
    for split, name in EVAL_FILES.items():
        path = os.path.join(eval_dir, name)
        if os.path.isfile(path):
            out[split] = load_paper_csv(path)
        elif split in ("test_clean", "test_poison"):
            raise FileNotFoundError(
                f"{eval_dir}: missing {name} (a paper-format folder holds {', '.join(EVAL_FILES.values())})"
            )
    out["source"] = train_path
    return out
