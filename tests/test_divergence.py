"""A diverged run (a non-finite loss or weights, or a loss far above its start) is marked diverged, not measured: no
accuracy in results.json or the table, and the command fails when every method diverged. The tiny BERT is trained
for real here: the numbers matter."""

import json
import math

import torch

from .utils import cli, files_argv, two_class_rows


# -- the rule, and the weights after the last step ---------------------------------------------------------------------
def test_divergence_rule():
    from muscle_kernels.defense.train import _divergence

    assert _divergence(0.7, 0.69, 5) is None and _divergence(9.0, 0.69, 5) is None
    assert "nan" in _divergence(float("nan"), 0.69, 3) and "inf" in _divergence(float("inf"), 0.69, 3)
    assert "more than 10 x its start" in _divergence(11.0, 0.69, 7)


def test_an_aligned_run_is_watched_on_its_reference_loss():
    """muscle-ga refuses to fit the rows that disagree with the reference set: their training loss may grow far above
    its start (11.4 against 0.70 on HSOL AddSent, the model at 94% CACC) without the model breaking. Its reference
    loss, the one it follows, is watched; its training loss has to stay finite."""
    from muscle_kernels.defense.train import DivergenceWatch

    plain = DivergenceWatch()
    assert plain(1, 0.7) is None and "loss 11.4 at step 2" in plain(2, 11.4)
    aligned = DivergenceWatch()
    assert aligned(1, 0.7, aligned=True, ref_loss=0.69) is None
    assert aligned(2, 11.4, aligned=True, ref_loss=0.0) is None  # the reference set fitted, training loss up
    assert aligned(3, 12.9, aligned=True, ref_loss=None) is None  # a step without a reference batch
    assert "loss nan at step 4" in aligned(4, float("nan"), aligned=True, ref_loss=0.1)
    assert "reference loss nan at step 5" in aligned(5, 3.0, aligned=True, ref_loss=float("nan"))
    why = aligned(6, 3.0, aligned=True, ref_loss=10.5)
    assert why.startswith("reference loss 10.5 at step 6, more than 10 x its start 0.69"), why


def test_non_finite_weights_after_the_last_step_mark_a_divergence(tmp_path):
    """The last update can break the weights after the last loss was computed (finite): still diverged."""
    from muscle_kernels.align.step import AlignClipStep
    from muscle_kernels.defense.data import Sample
    from muscle_kernels.defense.train import Settings, Splits, train_method

    from .tiny_models import tiny_factory, tiny_tokenizer

    texts = [f"good film {i}" if i % 2 else f"bad plot {i}" for i in range(16)]
    samples = [Sample(t, i % 2) for i, t in enumerate(texts)]
    tokenizer, vocab = tiny_tokenizer(tmp_path, texts)
    real_call = AlignClipStep.__call__

    def poison_after(self, model, epoch):
        done = real_call(self, model, epoch)
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
        return done

    import unittest.mock

    with unittest.mock.patch.object(AlignClipStep, "__call__", poison_after):
        record = train_method(
            "lora",
            tiny_factory(vocab),
            tokenizer,
            Splits(train=samples, dev=samples, test_clean=samples, test_poison=samples[1::2]),
            Settings(epochs=1, batch_size=16, max_length=8, device="cpu"),
            progress=False,
            log=lambda *_: None,
        )
    assert record["diverged"] is True and record["diverged_reason"] == "non-finite weights after step 1"
    assert math.isnan(record["cacc"]) and math.isnan(record["asr"])


# -- the table and results.json; the command fails when every method diverged ------------------------------------------
def test_diverged_row_in_the_table():
    from muscle_kernels.cli import format_table

    rows = [
        dict(method="lora", cacc=0.9, asr=0.1, best_epoch=1, train_seconds=1.0, step_seconds=0.1),
        dict(
            method="muscle-ga",
            diverged=True,
            diverged_reason="loss nan at step 2",
            cacc=float("nan"),
            asr=float("nan"),
            best_epoch=None,
            train_seconds=1.0,
            step_seconds=0.1,
        ),
    ]
    lines = format_table(rows).splitlines()
    assert "90.00%" in lines[1]
    assert lines[2].split()[:3] == ["muscle-ga", "diverged", "diverged"] and "%" not in lines[2]


def test_diverged_runs_are_marked(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    argv = [
        "defend",
        "--model",
        tiny_model_dir,
        "--output",
        str(out),
        "--method",
        "lora,muscle-ga",
        "--lr",
        "1e30",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-length",
        "16",
        "--no-progress",
        "--device",
        "cpu",
    ]
    code, err = cli(capsys, argv + files_argv(tmp_path, two_class_rows(32)))
    # (stderr also holds transformers' loading bars and logging: the error is the last line)
    assert code == 1 and err.strip().splitlines()[-1].startswith("muscle-lora: error: every method diverged")
    record = json.loads((out / "results.json").read_text())
    assert record["complete"] is True
    for r in record["results"]:
        assert r["diverged"] is True and r["cacc"] is None and r["asr"] is None, r
        assert "step" in r["diverged_reason"]
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
