"""End to end on a tiny BERT built from a config (no downloads, seconds): every method trains, results.json and the
plot are written, and the saved adapter reloads into a fresh model with the same test accuracy. No accuracy goals."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the pipeline needs transformers")

from tiny_models import tiny_factory, tiny_tokenizer  # noqa: E402

from muscle_kernels.defense.attacks import BadNets, poison_test, poison_train  # noqa: E402
from muscle_kernels.defense.corpus import build_corpus  # noqa: E402
from muscle_kernels.defense.data import DataError, Sample  # noqa: E402
from muscle_kernels.defense.train import METHODS, Settings, Splits, evaluate, run_methods, split_reference, train_method  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    rows = [Sample(t, l) for t, l in build_corpus(200, seed=1)]
    attack = BadNets()
    splits = Splits(
        train=poison_train(rows[:100], attack, rate=0.1, seed=0),
        dev=rows[100:150],
        test_clean=rows[150:200],
        test_poison=poison_test(rows[150:200], attack, seed=1),
        dev_poison=poison_test(rows[100:150], attack, seed=2),
    )
    tokenizer, vocab_size = tiny_tokenizer(tmp, [s.text for s in rows] + list(attack.triggers))
    settings = Settings(
        epochs=2, batch_size=16, max_length=40, ref_size=8, ref_batch_size=4, lr=1e-2, vanilla_lr=1e-3, device="cpu"
    )
    return tmp, splits, tokenizer, tiny_factory(vocab_size), settings


def test_all_methods_write_results_and_reloadable_adapters(setup):
    tmp, splits, tokenizer, factory, settings = setup
    out = str(tmp / "run")
    results = run_methods(
        list(METHODS), factory, tokenizer, splits, settings, output_dir=out, progress=False, log=lambda s: None
    )
    with open(os.path.join(out, "results.json")) as f:
        record = json.load(f)
    assert record["complete"] is True
    saved = record["results"]
    assert [r["method"] for r in saved] == [r["method"] for r in results] == list(METHODS)
    for r in saved:
        for key in ("method", "cacc", "asr", "train_seconds", "step_seconds", "settings", "best_epoch", "history"):
            assert key in r, f"{r['method']}: results.json lacks {key!r}"
        assert 0.0 <= r["cacc"] <= 1.0 and 0.0 <= r["asr"] <= 1.0
        assert r["train_seconds"] > 0
        if r["method"] == "muscle-screen":  # the screen's own steps, then 2 epochs over the kept rows + reference
            kept = 100 - r["screen"]["flagged"]
            assert r["train_rows"] == kept + 8 and len(r["suspects"]) == 100
            assert sorted(r["suspect_parts"]) == ["label", "tokens"]
            assert all(len(v) == 100 for v in r["suspect_parts"].values())
            assert r["suspects"] == [max(p) for p in zip(*r["suspect_parts"].values())], "suspicion: the larger part"
            assert r["steps"] == r["screen"]["steps"] + 2 * -(-(kept + 8) // 16)
        else:  # refonly: as many steps as the others, on the 8 reference rows
            assert r["steps"] == 2 * 7 and r["train_rows"] == (8 if r["method"] == "refonly" else 100)
        assert r["best_epoch"] in (1, 2) and len(r["history"]) == 2
        assert r["settings"]["seed"] == 0 and r["settings"]["ref_size"] == 8
    ga = saved[METHODS.index("muscle-ga")]
    assert all("aligned_fraction" in h for h in ga["history"])
    assert os.path.getsize(os.path.join(out, "results.png")) > 1000
    with open(os.path.join(out, "suspects.csv")) as f:
        rows = f.read().splitlines()
    assert rows[0].split(",")[:4] == ["row", "score", "rank", "flagged"] and len(rows) == 101
    screened = saved[METHODS.index("muscle-screen")]
    assert sorted(int(r.split(",")[0]) for r in rows[1:]) == list(range(100))
    assert [int(r.split(",")[2]) for r in rows[1:]] == list(range(1, 101)), "ranked, most suspicious first"
    assert sum(int(r.split(",")[3]) for r in rows[1:]) == screened["screen"]["flagged"]

    # The saved adapter is the best epoch's: reloaded into a fresh model it gives the recorded test accuracy.
    from muscle_kernels.integrations.adapters import load_adapter

    splits_ref = split_reference(splits, settings)
    for method in ("lora", "refonly", "muscle", "muscle-ga", "muscle-screen"):
        torch.manual_seed(123)  # a different fresh head: every trained tensor must come from the file
        model = load_adapter(factory(), os.path.join(out, method))
        cacc = evaluate(model, tokenizer, splits_ref.test_clean, settings, torch.device("cpu"), progress=False)
        rec = saved[METHODS.index(method)]
        assert cacc == pytest.approx(rec["cacc"]), f"{method}: reloaded adapter gives {cacc}, run gave {rec['cacc']}"
    model = transformers.BertForSequenceClassification.from_pretrained(os.path.join(out, "vanilla"))
    cacc = evaluate(model, tokenizer, splits_ref.test_clean, settings, torch.device("cpu"), progress=False)
    assert cacc == pytest.approx(saved[0]["cacc"])


def test_methods_share_seed_and_reference_split(setup):
    _, splits, tokenizer, factory, settings = setup
    ref = split_reference(splits, settings)
    assert len(ref.ref) == 8 and len(ref.dev) == 42
    assert not set(map(id, ref.ref)) & set(map(id, ref.dev)), "reference samples are removed from dev"
    again = split_reference(splits, settings)
    assert again.ref == ref.ref, "the reference set depends on the seed only"


def test_pipeline_errors(setup):
    _, splits, tokenizer, factory, settings = setup
    with pytest.raises(ValueError, match="method: expected one of"):
        train_method("peft", factory, tokenizer, splits, settings)
    with pytest.raises(ValueError, match="muscle-ga needs a clean reference set"):
        train_method("muscle-ga", factory, tokenizer, splits, settings)
    with pytest.raises(ValueError, match="methods: expected some of"):
        run_methods(["lora", "nope"], factory, tokenizer, splits, settings)
    bad = Splits(
        train=splits.train + [Sample("odd one", 3)],
        dev=splits.dev,
        test_clean=splits.test_clean,
        test_poison=splits.test_poison,
    )
    with pytest.raises(DataError, match=r"train: unknown label\(s\) \[3\] for a model with 2 labels"):
        train_method("lora", factory, tokenizer, bad, settings)
    with pytest.raises(DataError, match="cannot give a reference set of 96"):
        split_reference(splits, Settings(ref_size=96))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epochs=0), "epochs: expected an integer >= 1"),
        (dict(lr=-1.0), "lr: expected a positive number"),
        (dict(ref_select="nearest"), r"ref_select: expected one of \('random', 'kmeans'\)"),
        (dict(max_raw_ratio=2.0), r"max_raw_ratio: expected a fraction in \[0, 1\]"),
        (dict(freq_band=[]), "freq_band: expected a non-empty sequence of positive numbers"),
        (dict(ga_warmup_epochs=-1), "ga_warmup_epochs: expected an integer >= 0"),
        (dict(min_ref_loss=float("nan")), "min_ref_loss: expected a number >= 0"),
        (dict(batch_size=2.5), "batch_size: expected an integer"),
    ],
)
def test_settings_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Settings(**kwargs)


def test_builtin_corpus_is_the_generators_output():
    from muscle_kernels.defense.corpus import build_corpus, load_builtin_corpus

    shipped = load_builtin_corpus()
    assert shipped == build_corpus(), "defense/data/reviews.csv is stale: python -m muscle_kernels.defense.corpus"
    assert len(shipped) == 4000 and len({t for t, _ in shipped}) == 4000
    assert sum(l for _, l in shipped) == 2000


def test_builtin_corpus_loads_from_a_zip(tmp_path):
    """Read through importlib.resources, so an install that is not a folder of files (a zip) finds it too."""
    import subprocess
    import sys
    import zipfile

    pkg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "muscle_kernels")
    archive = tmp_path / "pkg.zip"
    with zipfile.ZipFile(archive, "w") as z:  # just the corpus module and its data: it imports nothing else
        z.writestr("muscle_kernels/__init__.py", "")
        z.writestr("muscle_kernels/defense/__init__.py", "")
        z.write(os.path.join(pkg, "defense", "corpus.py"), "muscle_kernels/defense/corpus.py")
        z.write(os.path.join(pkg, "defense", "data", "reviews.csv"), "muscle_kernels/defense/data/reviews.csv")
    code = (
        "import muscle_kernels.defense.corpus as c; assert '.zip' in c.__file__, c.__file__; "
        "print(len(c.load_builtin_corpus()))"
    )
    # -S and a cwd outside the checkout: only the zip can provide muscle_kernels
    done = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={**os.environ, "PYTHONPATH": str(archive)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "4000"


def test_training_loop_goes_through_the_one_training_path(setup, monkeypatch):
    """Every step of the hand-written loop is one AlignClipStep; a 1-epoch run (warm-up 1) never blends."""
    from muscle_kernels.align import step as step_module

    _, splits, tokenizer, factory, settings = setup
    calls = []
    real = step_module.AlignClipStep.__call__

    def spy(self, model, epoch):
        record = real(self, model, epoch)
        calls.append((epoch, self.aligner.gate_config.max_raw_ratio, record.align.branch, self.optimizer is not None))
        return record

    monkeypatch.setattr(step_module.AlignClipStep, "__call__", spy)
    one_epoch = Settings(**{**settings.to_dict(), "epochs": 1, "min_ref_loss": 1e9})  # the gate always fails
    result = train_method(
        "muscle-ga",
        factory,
        tokenizer,
        split_reference(splits, one_epoch),
        one_epoch,
        progress=False,
        log=lambda s: None,
    )
    assert len(calls) == result["steps"] == 7
    assert all(c == (0, 0.0, "raw", True) for c in calls), calls[:2]
