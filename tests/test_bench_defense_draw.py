"""The defense benchmark's draws: a learning curve scores every training size on the same evaluation rows."""

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_defense import draw_splits, main  # noqa: E402

from .test_paper_data import attack_folder  # noqa: E402


def _found(n_train=900, n_dev=300, n_test=400, n_poison=120):
    # distinct values per split, so a row drawn from the wrong split would show
    return {
        "train": [f"train-{i}" for i in range(n_train)],
        "dev": [f"dev-{i}" for i in range(n_dev)],
        "test_clean": [f"test-{i}" for i in range(n_test)],
        "test_poison": [f"poison-{i}" for i in range(n_poison)],
        "dev_poison": [f"devpoison-{i}" for i in range(n_poison)],
    }


@pytest.mark.parametrize("seed", [0, 3])
def test_nested_draw_keeps_the_evaluation_rows_and_nests_the_training_rows(seed):
    found = _found()
    draws = {n: draw_splits(found, seed, n, 200, 250, 60, "nested") for n in (100, 400, None)}
    small, mid, full = draws[100], draws[400], draws[None]
    for k in range(1, 5):  # dev, test_clean, test_poison, dev_poison: the same rows at every size
        assert small[k] == mid[k] == full[k]
    assert len(small[0]) == 100 and len(mid[0]) == 400 and full[0] == found["train"]
    assert set(small[0]) < set(mid[0]) < set(full[0])
    # file order kept, the sizes asked for, and the draw is the seed's
    order = {v: i for i, v in enumerate(found["train"])}
    assert [order[v] for v in mid[0]] == sorted(order[v] for v in mid[0])
    assert (len(small[1]), len(small[2]), len(small[3]), len(small[4])) == (200, 250, 60, 30)
    assert draw_splits(found, seed, 400, 200, 250, 60, "nested") == mid
    assert draw_splits(found, seed + 1, 400, 200, 250, 60, "nested")[0] != mid[0]


def test_v1_draw_is_the_earlier_benchmark_draw():
    # the draw of the run files before 2026-12-07: one stream, the training rows first; so dev and test change with
    # the training size (why `nested` is the default)
    found = _found()
    rng = random.Random(5)
    expected_train = [found["train"][i] for i in sorted(rng.sample(range(900), 400))]
    expected_dev = [found["dev"][i] for i in sorted(rng.sample(range(300), 200))]
    train, dev, *_ = draw_splits(found, 5, 400, 200, 250, 60, "v1")
    assert (train, dev) == (expected_train, expected_dev)
    assert draw_splits(found, 5, None, 200, 250, 60, "v1")[1] != dev


def test_an_unknown_draw_is_named():
    with pytest.raises(ValueError, match="draw"):
        draw_splits(_found(), 0, 100, 50, 50, 20, "fresh")


def test_a_run_file_of_another_draw_is_not_mixed_in(tmp_path):
    data = attack_folder(tmp_path / "toy" / "badnets")
    out = tmp_path / "out"
    old = out / "runs" / "default" / "toy-badnets" / "lora-n4-s0.json"
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"cacc": 0.5}))  # a run file from before `draw` was recorded: v1
    argv = ["--data", str(data), "--methods", "lora", "--seeds", "0", "--train-size", "4", "--out", str(out)]
    with pytest.raises(SystemExit, match="--draw v1.*--draw nested"):
        main([*argv, "--model", str(tmp_path / "no-model")])


def _run_file(out, method, size, seed, cacc):
    path = out / "runs" / "ref200" / "toy-badnets" / f"{method}-n{size}-s{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    run = dict(
        tag="ref200",
        attack="toy-badnets",
        method=method,
        seed=seed,
        draw="nested",
        cacc=cacc,
        asr=0.05 + 0.01 * seed,
        train_seconds=10.0,
        step_seconds=0.1,
        steps=100,
        sizes=dict(train=size, poisoned=size // 10, dev=100, ref=20, test_clean=200, test_poison=50),
    )
    path.write_text(json.dumps(run))


def test_the_summary_of_two_sizes_draws_the_curve_with_each_seed(tmp_path):
    from bench_defense import summarise

    for seed, (small, large) in enumerate([(0.80, 0.83), (0.82, 0.81), (0.79, 0.84)]):
        _run_file(tmp_path, "muscle-screen", 200, seed, small)
        _run_file(tmp_path, "muscle-screen", 500, seed, large)
    _run_file(tmp_path, "clean", 500, 0, 0.86)  # a method measured at one size only still gets its point
    summarise(tmp_path)
    table = (tmp_path / "summary.md").read_text()
    assert "| ref200 | toy-badnets | 200 | muscle-screen | 3 | 80.3" in table
    assert "| ref200 | toy-badnets | 500 | muscle-screen | 3 | 82.7" in table
    for name in ("learning_curve.png", "defense.png"):
        assert (tmp_path / name).stat().st_size > 10_000
