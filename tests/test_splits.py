"""build_splits, the data pipeline of `muscle-lora defend`, called from Python: the clean dev set held out before
poisoning, the training set poisoned at the requested rate, the ASR set of triggered non-target rows; and its errors
carry the CLI's texts."""

import pytest

from muscle_kernels.defense.corpus import build_corpus, write_corpus
from muscle_kernels.defense.data import DataError
from muscle_kernels.defense.splits import SplitsError, SplitsUsageError, build_splits


@pytest.fixture
def files(tmp_path):
    rows = build_corpus(300, seed=3)
    write_corpus(str(tmp_path / "train.csv"), rows[:250])
    write_corpus(str(tmp_path / "test.csv"), rows[250:])
    return str(tmp_path / "train.csv"), str(tmp_path / "test.csv")


def test_build_splits_holds_out_dev_and_poisons(files):
    from muscle_kernels.defense.attacks import BadNets
    from muscle_kernels.defense.data import load_file

    train, test = files
    splits = build_splits(train=train, test_clean=test, attack="badnets", poison_rate=0.2, target_label=1, seed=5)
    rows = load_file(train, text_column="text", label_column="label")
    # a fifth of the 250 rows (50, = ref_size 0 + 50) held out as the clean dev set, the rest poisoned
    assert len(splits.dev) == 50 and len(splits.train) == 200
    assert not any(s.poisoned for s in splits.dev)
    assert {s.text for s in splits.dev} <= {s.text for s in rows}
    poisoned = [s for s in splits.train if s.poisoned]
    assert len(poisoned) == round(0.2 * 200) and all(s.label == 1 for s in poisoned)
    triggers = set(BadNets().triggers)
    assert all(triggers & set(s.text.split()) for s in poisoned)
    # the ASR set: every non-target clean test row, with the trigger, labelled with the target
    clean_test = load_file(test, text_column="text", label_column="label")
    assert splits.test_clean == clean_test
    assert len(splits.test_poison) == sum(s.label != 1 for s in clean_test)
    assert all(s.label == 1 and s.poisoned and triggers & set(s.text.split()) for s in splits.test_poison)
    assert splits.dev_poison and all(s.label == 1 for s in splits.dev_poison)
    # seeded: the same call gives the same splits
    assert build_splits(train=train, test_clean=test, attack="badnets", poison_rate=0.2, seed=5) == splits


def test_build_splits_errors_keep_the_cli_texts(files):
    train, test = files
    with pytest.raises(SplitsUsageError, match="defend: give --data DIR, or --train FILE and --test-clean FILE"):
        build_splits(train=train)
    with pytest.raises(SplitsError, match="--target-label: 7 is not a label of") as e:
        build_splits(train=train, test_clean=test, attack="badnets", target_label=7)
    assert isinstance(e.value, DataError) and not isinstance(e.value, SplitsUsageError)
    with pytest.raises(SplitsError, match="--clean-label: only applies with --attack"):
        build_splits(train=train, test_clean=test, clean_label=True)
