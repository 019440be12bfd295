"""The frequency recorder (analysis/recorder.py): its rows against a direct computation, the hand-written loop's
on_step hook, the Trainer callback, the plot and `muscle-lora analyze`. Tiny BERTs built from configs: seconds."""

import math
import os

import pytest
import torch
import transformers  # a core dependency
from tiny_models import tiny_factory, tiny_tokenizer

from muscle_kernels.analysis import FrequencyRecorder, Probe, frequency_ratios_dense, mean_input_embedding, read_rows
from muscle_kernels.analysis.recorder import COLUMNS
from muscle_kernels.defense.attacks import BadNets, poison_test, poison_train
from muscle_kernels.defense.corpus import build_corpus
from muscle_kernels.defense.data import Sample
from muscle_kernels.defense.train import Settings, Splits, train_method

transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("freq")
    rows = [Sample(t, l) for t, l in build_corpus(160, seed=3)]
    attack = BadNets()
    splits = Splits(
        train=poison_train(rows[:80], attack, rate=0.2, seed=0),
        dev=rows[80:120],
        test_clean=rows[120:160],
        test_poison=poison_test(rows[120:160], attack, seed=1),
    )
    tokenizer, vocab_size = tiny_tokenizer(tmp, [s.text for s in rows] + list(attack.triggers))
    clean = [s for s in splits.train if not s.poisoned][:20]
    poisoned = [s for s in splits.train if s.poisoned][:12]
    probes = {
        "clean": Probe.from_texts(tokenizer, [s.text for s in clean], [s.label for s in clean], batch_size=8),
        "poisoned": Probe.from_texts(tokenizer, [s.text for s in poisoned], [s.label for s in poisoned], batch_size=5),
    }
    return tmp, splits, tokenizer, tiny_factory(vocab_size, layers=1, intermediate=48), probes


def test_rows_match_a_direct_computation(setup, tmp_path):
    _, _, _, factory, probes = setup
    torch.manual_seed(0)
    model = factory().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    path = str(tmp_path / "f.csv")
    rec = FrequencyRecorder(path, probes, every=3, sigmas_rel=[0.05, 0.5])
    for step in range(7):
        rec(step, model, method="m")
    assert rec.records == 3 and model.training  # steps 0, 3, 6; train mode restored
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    rows = read_rows(path)
    assert list(rows[0]) == list(COLUMNS)
    assert sorted({r["step"] for r in rows}) == [0, 3, 6]
    assert {(r["subset"], r["target"]) for r in rows} == {
        (s, t) for s in ("clean", "poisoned", "all") for t in ("output", "labels")
    }
    # the same quantities by hand: mean input embedding, softmax outputs, the dense fp64 filter
    model.eval()
    with torch.no_grad():
        xs, fs, ys = [], [], []
        for probe in probes.values():
            for b in probe.batches:
                xs.append(mean_input_embedding(model, b))
                fs.append(torch.softmax(model(**b).logits, -1))
            ys.append(torch.nn.functional.one_hot(probe.labels, 2).float())
    x, f, y = torch.cat(xs), torch.cat(fs), torch.cat(ys)
    scale = torch.pdist(x.double()).median().item()
    assert rec.scale == pytest.approx(scale, rel=1e-6)
    sigmas = [0.05 * scale, 0.5 * scale]
    ref_f, ref_y = frequency_ratios_dense(x, f, sigmas), frequency_ratios_dense(x, y, sigmas)
    for r in (r for r in rows if r["step"] == 6 and r["subset"] == "all"):
        ref = (ref_f if r["target"] == "output" else ref_y)[min(sigmas, key=lambda s: abs(s - r["sigma"]))]
        assert r["n"] == 32 and r["method"] == "m"
        norm = (f if r["target"] == "output" else y).double().norm().item()  # fp32 filter vs fp64: abs error
        for key in ("low", "high"):
            assert r[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5 * norm), (r["target"], r["sigma_rel"], key)
        if ref["high"] > 1e-3 * norm:
            assert r["ratio"] == pytest.approx(ref["ratio"], rel=1e-3), (r["target"], r["sigma_rel"])
    # the relative errors per band against the labels, by hand with the dense filter, at the wide sigma
    d = torch.cdist(x.double(), x.double())
    k = torch.softmax(-d / (2 * sigmas[1]), 1)
    e = f.double() - y.double()
    err_low = (k @ e).norm() / (k @ y.double()).norm()
    err_high = (e - k @ e).norm() / (y.double() - k @ y.double()).norm()
    wide = [
        r for r in rows if r["step"] == 6 and r["subset"] == "all" and r["target"] == "output" and r["sigma_rel"] == 0.5
    ][0]
    assert wide["err_low"] == pytest.approx(err_low.item(), rel=1e-4)
    assert wide["err_high"] == pytest.approx(err_high.item(), rel=1e-4)
    lab = [r for r in rows if r["target"] == "labels"]
    assert all(math.isnan(r["err_low"]) for r in lab)
    # the poisoned probes all carry the target label: no high band in y, hence no relative error there (nan)
    assert all(math.isnan(r["err_high"]) for r in rows if r["subset"] == "poisoned")
    # ... and no variation: their centered ratio is 0 / 0
    assert all(math.isnan(r["ratio_centered"]) for r in lab if r["subset"] == "poisoned")
    assert all(r["ratio_centered"] > 0 for r in lab if r["subset"] == "clean")
    # the centered low part by hand, ||K v - mean v||, for the labels (the untrained model's outputs barely vary)
    k_y = torch.softmax(-d / (2 * sigmas[0]), 1) @ y.double()
    narrow = [
        r
        for r in rows
        if r["step"] == 6 and r["subset"] == "all" and r["target"] == "labels" and r["sigma_rel"] == 0.05
    ][0]
    want = (k_y - y.double().mean(0)).norm().item()
    assert want > 1e-3 and narrow["low_centered"] == pytest.approx(want, rel=1e-4)


def test_hand_written_loop_hook_records_and_changes_nothing(setup, tmp_path):
    _, splits, tokenizer, factory, probes = setup
    settings = Settings(epochs=1, batch_size=16, max_length=40, lr=1e-2, device="cpu", ref_size=8)
    plain = train_method("lora", factory, tokenizer, splits, settings, progress=False, log=lambda s: None)
    calls = []
    rec = FrequencyRecorder(str(tmp_path / "f.csv"), probes, every=2)

    def hook(step, model, method=None):
        calls.append(step)
        rec(step, model, method=method)

    hooked = train_method(
        "lora", factory, tokenizer, splits, settings, progress=False, log=lambda s: None, on_step=hook
    )
    assert calls == list(range(plain["steps"] + 1))
    assert sorted({r["step"] for r in read_rows(rec.path)}) == list(range(0, plain["steps"] + 1, 2))
    assert {r["method"] for r in read_rows(rec.path)} == {"lora"}
    # eval-mode forwards under no_grad draw no random numbers and touch no weights: the same training
    assert hooked["history"][0]["train_loss"] == plain["history"][0]["train_loss"]
    assert (hooked["cacc"], hooked["asr"]) == (plain["cacc"], plain["asr"])


def test_trainer_callback(setup, tmp_path):
    pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    from muscle_kernels.analysis import FrequencyCallback

    _, splits, tokenizer, factory, probes = setup
    enc = tokenizer(
        [s.text for s in splits.train[:24]], padding="max_length", truncation=True, max_length=24, return_tensors="pt"
    )
    data = [
        dict(
            input_ids=enc["input_ids"][i],
            attention_mask=enc["attention_mask"][i],
            labels=torch.tensor(splits.train[i].label),
        )
        for i in range(24)
    ]
    rec = FrequencyRecorder(str(tmp_path / "t.csv"), probes, every=2, sigmas_rel=[0.1])
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=50,
    )
    torch.manual_seed(0)
    trainer = Trainer(
        model=factory(), args=args, train_dataset=data, callbacks=[FrequencyCallback(rec, method="trainer")]
    )
    trainer.train()
    rows = read_rows(rec.path)
    assert sorted({r["step"] for r in rows}) == [0, 2, 4, 6]  # 24 samples / 4 = 6 steps
    assert {r["method"] for r in rows} == {"trainer"} and {r["sigma_rel"] for r in rows} == {0.1}
    with pytest.raises(TypeError, match="recorder: expected a FrequencyRecorder"):
        FrequencyCallback(object())


def test_plot_and_replot(setup, tmp_path):
    from muscle_kernels.analysis import plot_frequency
    from muscle_kernels.cli import main

    _, _, _, factory, probes = setup
    path = str(tmp_path / "frequency.csv")
    rec = FrequencyRecorder(path, probes, every=1, sigmas_rel=[0.1, 0.3])
    for method in ("lora", "muscle-ga"):
        torch.manual_seed(len(method))
        model = factory()
        for step in range(3):
            rec(step, model, method=method)
    png = plot_frequency(read_rows(path), str(tmp_path / "a.png"), sigma_rel=0.3)
    assert os.path.getsize(png) > 10_000
    with pytest.raises(ValueError, match=r"sigma_rel: 0.2 was not recorded \(recorded: \[0.1, 0.3\]\)"):
        plot_frequency(read_rows(path), str(tmp_path / "b.png"), sigma_rel=0.2)
    with pytest.raises(ValueError, match=r"subsets: \['dev'\] not recorded"):
        plot_frequency(read_rows(path), str(tmp_path / "b.png"), subsets=["dev"])
    assert main(["analyze", "--replot", path]) == 0
    assert os.path.getsize(tmp_path / "frequency.png") > 10_000


def test_analyze_command_help_and_errors(capsys):
    from muscle_kernels.cli import main

    with pytest.raises(SystemExit) as e:
        main(["analyze", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "frequency.csv" in text and "--every" in text and "(default: 25)" in text
    assert main(["analyze", "--sigmas", "0.1,0.2", "--sigma", "0.3"]) == 2
    assert "--sigma: 0.3 is not one of --sigmas" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["analyze", "--sigmas", "0.1,-1"])
    assert "expected comma-separated positive numbers" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(every=0), ValueError, r"every: expected a positive number of steps, got 0"),
        (dict(probes={}), ValueError, r"probes: expected at least one probe set"),
        (dict(probes={"all": None}), ValueError, r"probes: the name 'all' is reserved"),
        (dict(probes={"clean": [1, 2]}), TypeError, r"probes\['clean'\]: expected a Probe, got list"),
        (dict(sigmas=[1.0]), ValueError, r"sigmas / sigmas_rel: give exactly one"),
        (dict(sigmas_rel=[0.1, float("nan")]), ValueError, r"sigmas_rel: expected positive finite widths"),
    ],
)
def test_recorder_errors(setup, tmp_path, kw, exc, match):
    probes = setup[4]
    args = dict(probes=probes)
    args.update(kw)
    with pytest.raises(exc, match=match):
        FrequencyRecorder(str(tmp_path / "x.csv"), **args)


def test_probe_errors(setup):
    tokenizer = setup[2]
    with pytest.raises(ValueError, match=r"labels: expected one label per text \(2\), got 1"):
        Probe.from_texts(tokenizer, ["a", "b"], [1])
    with pytest.raises(ValueError, match="texts: a probe set needs at least one sample"):
        Probe.from_texts(tokenizer, [], [])
