"""The `muscle-lora` command: argument errors, and `defend` end to end on a tiny local model (seconds)."""

import json
import os

import pytest

from muscle_kernels.cli import build_parser, main


def run_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, match",
    [
        ([], "the following arguments are required"),
        (["train"], "invalid choice: 'train'"),
        (
            ["demo", "--methods", "lora,peft"],
            "expected a comma-separated list of vanilla, lora, refonly, muscle, muscle-ga, muscle-screen",
        ),
        (["demo", "--epochs", "0"], "--epochs: expected a positive integer, got '0'"),
        (["demo", "--lr", "fast"], r"--lr: expected a positive number below 3.4e38 \(float32's largest\), got 'fast'"),
        (["demo", "--poison-rate", "1.5"], r"--poison-rate: expected a fraction in \[0, 1\], got '1.5'"),
        (["demo", "--freq-band", "1,x"], "--freq-band: expected comma-separated numbers such as 1,2,3,4, got '1,x'"),
        (
            ["demo", "--freq-band", "1,0"],
            r"--freq-band: expected a non-empty sequence of positive numbers .*, got '1,0'",
        ),
        (["demo", "--min-ref-loss", "-1"], "min_ref_loss: expected a number >= 0"),
        (["defend"], "give --data DIR, or --train FILE and --test-clean FILE"),
        (["defend", "--model", "m", "--attack", "stylebkd"], "--attack: invalid choice: 'stylebkd'"),
        (["defend", "--model", "m", "--method", ""], "expected a comma-separated list"),
    ],
)
def test_argument_errors(capsys, argv, match):
    import re

    assert re.search(match, run_error(capsys, argv))


def test_defend_data_errors(capsys, tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\na good one,1\na bad one,0\n")
    assert "give --data DIR, or --train FILE and --test-clean FILE" in run_error(
        capsys, ["defend", "--model", "m", "--train", str(csv)]
    )
    assert "not both" in run_error(capsys, ["defend", "--model", "m", "--data", str(tmp_path), "--train", str(csv)])
    assert "--test-poison: needed to measure ASR" in run_error(
        capsys, ["defend", "--model", "m", "--train", str(csv), "--test-clean", str(csv)]
    )
    assert "--dev: a clean dev set is needed" in run_error(
        capsys, ["defend", "--model", "m", "--train", str(csv), "--test-clean", str(csv), "--test-poison", str(csv)]
    )
    # a data problem is reported as one line naming the file, not a traceback
    assert main(["defend", "--model", "m", "--train", str(tmp_path / "missing.csv"), "--test-clean", str(csv)]) == 2
    assert "missing.csv: no such data file" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nx,1\n")
    assert main(["defend", "--model", "m", "--train", str(bad), "--test-clean", str(csv), "--attack", "badnets"]) == 2
    assert "bad.csv, row 1: missing column(s) ['text']" in capsys.readouterr().err


def test_parser_defaults():
    args = build_parser().parse_args(["defend", "--model", "m", "--data", "d", "--method", "all"])
    assert args.method == ["vanilla", "lora", "refonly", "muscle", "muscle-ga", "muscle-screen"]
    assert build_parser().parse_args(["defend", "--data", "d"]).method is None  # resolved by the recipe
    assert build_parser().parse_args(["demo"]).output == "muscle-lora-demo"


def test_defend_end_to_end(tmp_path, capsys, tiny_bert_dir):
    pytest.importorskip("transformers", reason="defend needs transformers")
    from muscle_kernels.defense.corpus import build_corpus, write_corpus

    rows = build_corpus(260, seed=2)
    write_corpus(str(tmp_path / "train.csv"), rows[:200])
    write_corpus(str(tmp_path / "test.csv"), rows[200:])
    words = sorted({w for t, _ in rows for w in t.replace(",", " ,").split()} | {"cf", "mn", "bb", "tq"})
    model_dir = tiny_bert_dir(words)
    out = tmp_path / "out"
    # a tiny run: 1 epoch, 8 reference rows, AddSent on 20% of the training rows
    common = ["defend", "--model", str(model_dir), "--train", str(tmp_path / "train.csv"), "--test-clean"]
    common += [str(tmp_path / "test.csv"), "--attack", "addsent", "--poison-rate", "0.2", "--epochs", "1"]
    common += ["--ref-size", "8", "--batch-size", "16", "--max-length", "48", "--no-progress", "--device", "cpu"]
    code = main(common + ["--method", "lora,muscle-ga", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "muscle-ga" in printed and "CACC" in printed
    record = json.loads((out / "results.json").read_text())
    results = record["results"]
    assert record["complete"] is True
    assert [r["method"] for r in results] == ["lora", "muscle-ga"]
    assert results[1]["settings"]["attack"] == "addsent"
    assert os.path.isfile(out / "muscle-ga" / "muscle_lora_adapter.safetensors")
    assert os.path.isfile(out / "results.png")
    assert not os.path.exists(out / "suspects.csv"), "only muscle-screen scores the training rows"

    # No --method: the default, muscle-screen, which also writes every training row's suspicion.
    out = tmp_path / "default"
    code = main(common + ["--output", str(out)])
    assert code == 0
    (result,) = json.loads((out / "results.json").read_text())["results"]
    assert result["method"] == "muscle-screen" and "screen:" in capsys.readouterr().out
    suspects = (out / "suspects.csv").read_text().splitlines()
    assert len(suspects) == 1 + result["screen"]["rows"] == 1 + len(result["suspects"])
    assert os.path.isfile(out / "muscle-screen" / "muscle_lora_adapter.safetensors")


def test_demo_shows_the_attack_the_baseline_and_the_defense():
    from muscle_kernels.defense.demo import DEMO_METHODS
    from muscle_kernels.defense.train import default_method

    assert build_parser().parse_args(["demo"]).methods == list(DEMO_METHODS)
    assert {"lora", "refonly", default_method("default")} <= set(DEMO_METHODS)


def test_demo_splits():
    from muscle_kernels.defense.demo import DEMO_SIZES, demo_splits

    splits = demo_splits()
    n_train, n_dev, n_test = DEMO_SIZES
    assert (len(splits.train), len(splits.dev), len(splits.test_clean)) == (n_train, n_dev, n_test)
    assert sum(s.poisoned for s in splits.train) == round(0.1 * n_train)
    assert len(splits.test_poison) == sum(s.label == 0 for s in splits.test_clean)
    assert all(s.label == 1 and {"cf", "mn", "bb", "tq"} & set(s.text.split()) for s in splits.test_poison)
    texts = lambda xs: {s.text for s in xs}  # noqa: E731
    assert not texts(splits.train) & texts(splits.test_clean) and not texts(splits.dev) & texts(splits.test_clean)


def test_demo_command_wiring(tmp_path, capsys, monkeypatch):
    """`muscle-lora demo` end to end with the model and the data swapped for tiny ones (the real demo takes
    minutes; its numbers are in the README)."""
    pytest.importorskip("transformers", reason="the demo needs transformers")
    from tiny_models import tiny_factory, tiny_tokenizer

    import muscle_kernels.defense.demo as demo
    from muscle_kernels.defense.attacks import BadNets, poison_test, poison_train
    from muscle_kernels.defense.corpus import build_corpus
    from muscle_kernels.defense.data import Sample
    from muscle_kernels.defense.train import Splits

    rows = [Sample(t, l) for t, l in build_corpus(150, seed=3)]
    tokenizer, vocab_size = tiny_tokenizer(tmp_path, [s.text for s in rows] + ["cf", "mn", "bb", "tq"])

    def tiny_splits(poison_rate, seed):
        a = BadNets()
        return Splits(
            train=poison_train(rows[:80], a, rate=poison_rate, seed=seed),
            dev=rows[80:110],
            test_clean=rows[110:],
            test_poison=poison_test(rows[110:], a, seed=seed),
        )

    monkeypatch.setattr(demo, "demo_splits", tiny_splits)
    monkeypatch.setattr(demo, "minilm_factory", lambda: (tiny_factory(vocab_size, layers=1), tokenizer))
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--methods",
                "lora,muscle-ga,vanilla",
                "--epochs",
                "1",
                "--ref-size",
                "8",
                "--output",
                str(out),
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["method"] for r in results] == ["lora", "muscle-ga", "vanilla"]
    # the demo runs with defend's defaults (the recipe's band, the gate's min_ref_loss, the reference set)
    from muscle_kernels.defense.train import Settings

    defaults = Settings().to_dict()
    for key in ("freq_band", "min_ref_loss", "ref_batch_size", "max_length", "lr", "batch_size"):  # ref_size: given
        assert results[0]["settings"][key] == defaults[key], key
    assert (out / "lora").is_dir() and not (out / "vanilla").exists(), "the demo saves adapters, not full models"
    assert "muscle-ga" in capsys.readouterr().out


def test_info_command(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "muscle_kernels" in out and "torch" in out and "grad_align" in out


@pytest.mark.parametrize("command", ["demo", "defend", "analyze", "info"])
def test_help_prints_single_percent_signs(capsys, command):
    # argparse %-formats argument help but not a description, so a "%%" written there reaches the user as is.
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and f"muscle-lora {command}" in out
    assert "%%" not in out


def test_result_table_columns_line_up_for_long_method_names():
    from muscle_kernels.cli import format_table

    rows = [
        dict(method=m, cacc=0.9975, asr=a, best_epoch=2, train_seconds=367.7, step_seconds=1.168)
        for m, a in (("lora", 1.0), ("refonly", 0.0072), ("muscle-screen", 0.0))
    ]
    lines = format_table(rows).splitlines()
    # every column ends at the same character in the header and in each row, whatever the method's name
    ends = {len(line) for line in lines}
    assert len(ends) == 1, lines
    assert [line.index("%") for line in lines[1:]] == [lines[1].index("%")] * 3
