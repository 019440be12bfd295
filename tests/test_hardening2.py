"""Hardening, round 2 (issue 20): no command deletes or overwrites what it did not write, a diverged run never reads
as a defense, every error is one line. Each test names its row of the issue.

As in round 1 (tests/test_hardening.py, whose helpers are shared), training is a stub where a test is about the
command's plumbing, and the tiny BERT is trained for real only where the numbers matter (divergence)."""

import json
import math
import os

import pytest
import torch

from muscle_kernels.cli import main

from . import test_hardening as round1
from .test_hardening import cli, files_argv, one_line

# round 1's fixtures: the tiny BERT folder, and train_method replaced by a stub that writes a fake adapter
tiny_model_dir = round1.tiny_model_dir
stub_training = round1.stub_training


def defend_argv(model, out, methods="muscle-ga", *extra):
    return [
        "defend",
        "--model",
        model,
        "--output",
        str(out),
        "--method",
        methods,
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    ]


# -- row 3: --overwrite removes only what a run of ours wrote ---------------------------------------------------------
def test_overwrite_keeps_folders_no_run_wrote(capsys, tmp_path, tiny_model_dir, stub_training, monkeypatch):
    out = tmp_path / "project"
    (out / "lora" / "src").mkdir(parents=True)
    (out / "lora" / "src" / "train.py").write_text("print('mine')")
    (out / "vanilla").mkdir()
    (out / "vanilla" / "notes.md").write_text("# notes")
    monkeypatch.chdir(out)
    code, err = cli(capsys, defend_argv(tiny_model_dir, ".", "muscle-ga", "--overwrite") + files_argv(tmp_path))
    assert code == 0, err
    assert (out / "lora" / "src" / "train.py").read_text() == "print('mine')"
    assert (out / "vanilla" / "notes.md").read_text() == "# notes"
    assert (out / "muscle-ga" / "adapter.txt").read_text() == "new"
    # a second --overwrite run removes its own earlier results, still not the user's folders
    code, err = cli(capsys, defend_argv(tiny_model_dir, ".", "muscle-ga", "--overwrite") + files_argv(tmp_path))
    assert code == 0, err
    assert (out / "lora" / "src" / "train.py").exists() and (out / "vanilla" / "notes.md").exists()


def test_overwrite_refuses_to_write_into_a_users_folder(capsys, tmp_path, tiny_model_dir, stub_training):
    out = tmp_path / "out"
    (out / "lora").mkdir(parents=True)
    (out / "lora" / "keep.txt").write_text("mine")
    code, err = cli(capsys, defend_argv(tiny_model_dir, out, "lora", "--overwrite") + files_argv(tmp_path))
    line = one_line(err)
    assert code == 2 and line.startswith("muscle-lora: error: --overwrite:") and "lora" in line and "manifest" in line
    assert (out / "lora" / "keep.txt").read_text() == "mine" and not stub_training["calls"]


# -- row 4: one run per output folder ---------------------------------------------------------------------------------
def test_second_run_on_the_same_output_fails_at_once(capsys, tmp_path, tiny_model_dir, stub_training, monkeypatch):
    import muscle_kernels.defense.train as train

    out = tmp_path / "out"
    stub = train.train_method
    second = {}

    def first_then_second(method, *a, **k):
        if not second:  # while the first run trains, a second run starts on the same folder
            second["result"] = cli(capsys, defend_argv(tiny_model_dir, out, "muscle-ga") + files_argv(tmp_path))
        return stub(method, *a, **k)

    monkeypatch.setattr(train, "train_method", first_then_second)
    code, err = cli(capsys, defend_argv(tiny_model_dir, out, "lora") + files_argv(tmp_path))
    assert code == 0, err
    code2, err2 = second["result"]
    assert code2 == 2 and "is in use by another muscle-lora run" in one_line(err2) and str(out) in err2
    assert stub_training["calls"] == ["lora"]
    record = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in record["results"]] == ["lora"]


# -- row 1: analyze checks --output as defend does, before any work ---------------------------------------------------
@pytest.fixture
def no_minilm(monkeypatch):
    """analyze must refuse before the model loads: loading it fails the test."""
    import muscle_kernels.defense.demo as demo

    def boom(*a, **k):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr(demo, "minilm_factory", boom)


def test_analyze_refuses_a_non_empty_output(capsys, tmp_path, no_minilm):
    out = tmp_path / "out"
    out.mkdir()
    (out / "frequency.csv").write_text("the user's own table")
    code, err = cli(capsys, ["analyze", "--output", str(out), "--no-progress"])
    assert code == 2 and "is not empty" in one_line(err) and "--overwrite" in err
    assert (out / "frequency.csv").read_text() == "the user's own table"
    code, err = cli(capsys, ["analyze", "--output", str(out), "--no-progress", "--overwrite"])
    assert code == 2 and "frequency.csv" in one_line(err) and "manifest" in err
    assert (out / "frequency.csv").read_text() == "the user's own table"


def test_analyze_output_is_a_file(capsys, tmp_path, no_minilm):
    f = tmp_path / "afile"
    f.write_text("x")
    code, err = cli(capsys, ["analyze", "--output", str(f), "--no-progress"])
    assert code == 2 and "exists and is not a directory" in one_line(err)


# -- row 2: --replot honours --output and never follows a link ---------------------------------------------------------
def recorder_csv(path):
    from muscle_kernels.analysis.recorder import COLUMNS

    rows = []
    for step in (0, 1, 2):
        for subset in ("clean", "poisoned"):
            for target in ("output", "labels"):
                row = dict(
                    step=step,
                    method="lora",
                    subset=subset,
                    target=target,
                    sigma=0.5,
                    sigma_rel=0.1,
                    n=4,
                    low=1.0 + step,
                    high=1.0,
                    ratio=1.0 + step,
                    low_centered=0.5,
                    ratio_centered=0.5,
                    err_low=0.1,
                    err_high=0.2,
                )
                rows.append(",".join(str(row[c]) for c in COLUMNS))
    path.write_text(",".join(COLUMNS) + "\n" + "\n".join(rows) + "\n")
    return str(path)


def test_replot_writes_into_output_and_replaces_links(capsys, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "f.png"
    victim.write_bytes(b"precious")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    csv_path = recorder_csv(run_dir / "frequency.csv")
    (run_dir / "frequency.png").symlink_to(victim)
    (run_dir / ".muscle-lora-manifest.json").write_text(json.dumps({"written": ["frequency.csv", "frequency.png"]}))
    other = tmp_path / "x"
    code, err = cli(capsys, ["analyze", "--replot", csv_path, "--output", str(other)])
    assert code == 0, err
    assert (other / "frequency.png").read_bytes()[:4] == b"\x89PNG"
    assert os.path.islink(run_dir / "frequency.png"), "--output given: nothing is written beside the CSV"
    code, err = cli(capsys, ["analyze", "--replot", csv_path])  # default: beside the CSV, the link replaced
    assert code == 0, err
    assert victim.read_bytes() == b"precious"
    assert not os.path.islink(run_dir / "frequency.png")
    assert (run_dir / "frequency.png").read_bytes()[:4] == b"\x89PNG"


def test_replot_keeps_a_users_png(capsys, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "frequency.png").write_bytes(b"the user's picture")
    code, err = cli(capsys, ["analyze", "--replot", recorder_csv(tmp_path / "f.csv"), "--output", str(out)])
    assert code == 2 and "frequency.png" in one_line(err)
    assert (out / "frequency.png").read_bytes() == b"the user's picture"


# -- row 11: --replot of a file that is not the recorder's, impossible demo sizes -------------------------------------
@pytest.mark.parametrize(
    "content", [b"", b'{"complete": true, "results": []}\n', b"\x89PNG\r\n\x1a\n\xff\xfe\x00", b"step,method\n1,x\n"]
)
def test_replot_of_other_files(capsys, tmp_path, content):
    f = tmp_path / "results.json"
    f.write_bytes(content)
    code, err = cli(capsys, ["analyze", "--replot", str(f), "--output", str(tmp_path / "o")])
    assert code == 2 and one_line(err).startswith(f"muscle-lora: error: --replot: {f}")


@pytest.mark.parametrize(
    "argv, match",
    [
        (["analyze", "--poison-rate", "1"], "--poison-rate: 1 asks for"),
        (["demo", "--poison-rate", "1"], "--poison-rate: 1 asks for"),
        (["analyze", "--train-size", "100000"], "--train-size: 100000 training reviews asked for"),
    ],
)
def test_demo_sizes_checked(capsys, tmp_path, no_minilm, argv, match):
    code, err = cli(capsys, argv + ["--output", str(tmp_path / "o"), "--no-progress"])
    assert code == 2 and match in one_line(err)
    assert not (tmp_path / "o").exists()


# -- row 5: links replaced, not followed; no content of a file that is not data in an error ---------------------------
def tiny_bert(hidden=32):
    import transformers

    config = transformers.BertConfig(
        vocab_size=30,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return transformers.BertForSequenceClassification(config)


def test_save_adapter_replaces_planted_links(tmp_path):
    from muscle_kernels import apply_muscle_lora, load_adapter, save_adapter

    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.json"
    victim.write_text("precious")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "muscle_lora_config.json").symlink_to("../outside/victim.json")
    (adapter / "muscle_lora_adapter.safetensors").symlink_to("../outside/victim.json")
    save_adapter(apply_muscle_lora(tiny_bert()), adapter)
    assert victim.read_text() == "precious"
    assert not any(os.path.islink(adapter / n) for n in os.listdir(adapter))
    load_adapter(tiny_bert(), adapter)  # whole files


PASSWD = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


def test_data_folder_refuses_a_linked_training_file(capsys, tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text(PASSWD)
    d = tmp_path / "paper"
    d.mkdir()
    rows = ",0,1,2\n" + "".join(f"{i},good film {i},{i % 2},0\n" for i in range(12))
    for name in ("dev-clean.csv", "test-clean.csv", "test-poison.csv"):
        (d / name).write_text(rows)
    (d / "train-poison.csv").symlink_to(secret)
    code, err = cli(capsys, ["defend", "--model", "m", "--data", str(d), "--output", str(tmp_path / "o")])
    line = one_line(err)
    assert code == 2 and "train-poison.csv" in line and "symbolic link" in line
    assert "/bin/bash" not in line and "root:x" not in line


def test_errors_quote_no_content_of_a_non_data_file(capsys, tmp_path):
    secret = tmp_path / "passwd.csv"
    secret.write_text(PASSWD)
    good = tmp_path / "good.csv"
    good.write_text("text,label\na,0\nb,1\n")
    code, err = cli(
        capsys,
        [
            "defend",
            "--model",
            "m",
            "--train",
            str(secret),
            "--test-clean",
            str(good),
            "--dev",
            str(good),
            "--test-poison",
            str(good),
        ],
    )
    line = one_line(err)
    assert code == 2 and "passwd.csv, row 1: missing column(s)" in line
    assert "/bin/bash" not in line and "root:x" not in line


# -- row 13: a diverged run is marked, not measured, and fails the command when every method diverged ---------------
def test_diverged_runs_are_marked(capsys, tmp_path, tiny_model_dir):
    from .test_hardening import two_class_rows

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


def test_divergence_rule():
    from muscle_kernels.defense.train import _divergence

    assert _divergence(0.7, 0.69, 5) is None and _divergence(9.0, 0.69, 5) is None
    assert "nan" in _divergence(float("nan"), 0.69, 3) and "inf" in _divergence(float("inf"), 0.69, 3)
    assert "more than 10 x its start" in _divergence(11.0, 0.69, 7)


# -- row 14: scales that overflow float32 are refused ----------------------------------------------------------------
@pytest.mark.parametrize("flag", [["--freq-band", "1e308"], ["--freq-band", "1,1e38"]])
def test_cli_freq_band_overflow(capsys, flag):
    code, err = cli(capsys, ["defend", "--model", "m", "--train", "t.csv"] + flag)
    assert code == 2 and "freq_band: expected values whose scales" in one_line(err)


# -- rows 15, 16, 21: load_adapter checks everything before it touches the model, and names the file -----------------
def saved_adapter(tmp_path, hidden=32):
    from muscle_kernels import apply_muscle_lora, save_adapter

    torch.manual_seed(0)
    path = tmp_path / f"adapter{hidden}"
    save_adapter(apply_muscle_lora(tiny_bert(hidden)), path)
    return path


def untouched(model, before):
    from muscle_kernels.integrations.apply import adapter_layers

    return (
        not hasattr(model, "muscle_lora_config")
        and not adapter_layers(model)
        and sum(p.requires_grad for p in model.parameters()) == before
    )


def test_failed_load_leaves_the_model_as_it_was(tmp_path):
    from muscle_kernels import load_adapter

    path = saved_adapter(tmp_path, hidden=48)
    model = tiny_bert(32)
    before = sum(p.requires_grad for p in model.parameters())
    with pytest.raises(
        ValueError,
        match=r"does not fit the model: .*shape mismatch: .*saved \(4, 48\), model "
        r"\(4, 32\)",
    ):
        load_adapter(model, path)
    assert untouched(model, before)


def tamper(path, key, change):
    from safetensors.torch import load_file, save_file

    f = path / "muscle_lora_adapter.safetensors"
    tensors = load_file(f)
    tensors[key] = change(tensors[key])
    save_file(tensors, f)


@pytest.mark.parametrize(
    "key, change, match",
    [
        ("classifier.lora_R", lambda t: t.to(torch.int64), r"not floating point: classifier.lora_R \(int64\)"),
        ("classifier.lora_L", lambda t: t > 0, r"not floating point: classifier.lora_L \(bool\)"),
        ("classifier.scales", lambda t: t * 1000, r"scales that differ from the ones its config gives .*classifier"),
        ("classifier.scales", lambda t: t * float("nan"), r"NaN or infinite values in \['classifier.scales'\]"),
        ("classifier.lora_L", lambda t: t * float("inf"), r"NaN or infinite values in \['classifier.lora_L'\]"),
    ],
)
def test_adapter_dtypes_values_and_scales(tmp_path, key, change, match):
    from muscle_kernels import apply_muscle_lora, load_adapter

    path = saved_adapter(tmp_path)
    tamper(path, key, change)
    model = tiny_bert()
    before = sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=match):
        load_adapter(model, path)
    assert untouched(model, before)
    with pytest.raises(ValueError, match=match):  # a model that has its adapters already: the same checks
        load_adapter(apply_muscle_lora(tiny_bert()), path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("[1, 2]", r"expected a JSON object with format_version, model_class and a \"config\" object, got list"),
        (
            '{"format_version": 1, "model_class": "BertForSequenceClassification"}',
            r"expected a JSON object .* got no \"config\" object",
        ),
        ("{not json", r"not valid JSON \(Expecting property name"),
        (
            '{"format_version": 1, "model_class": "BertForSequenceClassification", "config": {"bogus": 1}}',
            r"its \"config\" is not a MuScleLoRAConfig \(MuScleLoRAConfig: unknown field",
        ),
    ],
)
def test_adapter_config_file_errors_name_the_file(tmp_path, text, match):
    from muscle_kernels import load_adapter

    path = saved_adapter(tmp_path)
    (path / "muscle_lora_config.json").write_text(text)
    with pytest.raises(ValueError, match=r"load_adapter: .*muscle_lora_config.json: " + match):
        load_adapter(tiny_bert(), path)


def test_corrupt_weights_file_is_named(tmp_path):
    from muscle_kernels import load_adapter

    path = saved_adapter(tmp_path)
    f = path / "muscle_lora_adapter.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(
        ValueError,
        match=r"load_adapter: .*muscle_lora_adapter.safetensors: not a readable "
        r"safetensors file",
    ):
        load_adapter(tiny_bert(), path)


# -- rows 6, 7, 24: --model problems are one line, before the output folder is made ----------------------------------
def test_checkpoint_head_of_another_size(capsys, tmp_path, tiny_model_dir, stub_training):
    rows = [(f"good film {i}", i % 3) for i in range(12)]
    out = tmp_path / "out"
    code, err = cli(capsys, defend_argv(tiny_model_dir, out, "lora") + files_argv(tmp_path, rows))
    line = one_line(err)
    assert code == 2 and "the data has 3 classes" in line and "has 2" in line and "--new-head" in line
    assert not out.exists(), "checked before the output folder is made"
    code, err = cli(capsys, defend_argv(tiny_model_dir, out, "lora", "--new-head") + files_argv(tmp_path, rows))
    assert code == 0, err


def gguf_like(tmp_path, name, content):
    f = tmp_path / name
    f.write_bytes(content)
    return str(f)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("adapter", "has no config.json, so it is not a model folder (it is an adapter folder"),
        ("text.gguf", "is not a GGUF file"),
        ("truncated.gguf", "is a truncated GGUF file"),
        ("missing", "no such file or folder"),
    ],
)
def test_model_errors_before_output(capsys, tmp_path, kind, match):
    if kind == "adapter":
        model = str(saved_adapter(tmp_path))
    elif kind == "text.gguf":
        model = gguf_like(tmp_path, "x.gguf", b"hello\n")
    elif kind == "truncated.gguf":
        model = gguf_like(tmp_path, "t.gguf", b"GGUF\x03\x00")
    else:
        model = "/nope/model"
    out = tmp_path / "out"
    code, err = cli(capsys, defend_argv(model, out, "lora") + files_argv(tmp_path))
    line = one_line(err)
    assert code == 2 and line.startswith("muscle-lora: error: --model: ") and match in line
    assert "Repo id" not in line and not out.exists()


def test_pickled_weights_refused_in_one_line(capsys, tmp_path, tiny_model_dir):
    import pickle
    import shutil

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, model)
    os.remove(model / "model.safetensors")

    class Payload:
        def __reduce__(self):
            return (print, ("the pickle ran",))

    with open(model / "pytorch_model.bin", "wb") as f:
        pickle.dump({"bert.embeddings.word_embeddings.weight": Payload()}, f)
    code, err = cli(capsys, defend_argv(str(model), tmp_path / "out", "lora") + files_argv(tmp_path))
    assert code == 2 and "the pickle ran" not in capsys.readouterr().out
    last = err.strip().splitlines()[-1]
    assert last.startswith("muscle-lora: error: --model: ") and "weights_only=True" in last
    assert "weights_only=False" not in last and "Traceback" not in err


# -- rows 8, 9, 10, 12: sizes and inputs checked when parsed or read ---------------------------------------------------
def test_num_labels_capped(capsys, tmp_path):
    code, err = cli(
        capsys,
        ["defend", "--model", "m", "--num-labels", "100000000", "--output", str(tmp_path / "o")] + files_argv(tmp_path),
    )
    assert code == 2 and "--num-labels: 100000000 classes asked for, at most 1000" in one_line(err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["dir", "txt"])
def test_train_not_a_data_file(capsys, tmp_path, kind):
    if kind == "dir":
        bad = tmp_path / "folder"
        bad.mkdir()
        match = "is a directory, not a data file"
    else:
        bad = tmp_path / "data.txt"
        bad.write_text("text,label\na,1\n")
        match = "cannot tell the format from the extension '.txt'"
    good = files_argv(tmp_path)
    code, err = cli(capsys, ["defend", "--model", "m", "--train", str(bad)] + good[2:])
    assert code == 2 and f"{bad}: {match}" in one_line(err)


@pytest.mark.parametrize(
    "flag, value, match",
    [
        ("--lr", "1e308", "--lr: expected a positive number below 3.4e38"),
        ("--vanilla-lr", "1e39", "--vanilla-lr: expected a positive number below 3.4e38"),
        ("--seed", "99999999999999999999999", r"--seed: expected an integer in [0, 2**62]"),
        ("--seed", "-1", r"--seed: expected an integer in [0, 2**62]"),
    ],
)
def test_overflowing_numbers_checked_when_parsed(capsys, flag, value, match):
    code, err = cli(capsys, ["defend", "--model", "m", flag, value])
    assert code == 2 and match in one_line(err)


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"text": "a", "label": ' + "7" * 5000 + "}", "row 2: a number of more than 4300 digits"),
        ('{"text": "a", "label": ' + "[" * 100_000 + "]" * 100_000 + "}", "row 2: not valid JSON"),
    ],
)
def test_jsonl_limits(tmp_path, line, match):
    from muscle_kernels.defense.data import DataError, load_file

    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine", "label": 1}\n' + line + "\n")
    with pytest.raises(DataError, match=match):
        load_file(str(f))


# -- row 17, 22: CSV columns, fields and labels; an unclosed quote is reported where it opens -------------------------
@pytest.mark.parametrize(
    "body, match",
    [
        ("text,label,label\na,1,0\n", r"row 1: the header names the column\(s\) \['label'\] more than once"),
        ("text,label\na,1\nb,0,extra\n", r"row 3: 3 fields, the header has 2"),
        ("text,label\na,1_0\n", r"row 2: unknown label '1_0' \(expected an integer class id in ASCII digits\)"),
        ("text,label\na,\u0661\n", r"row 2: unknown label '\u0661'"),
        (
            'text,label\n"good film,1\n' + "bad,0\n" * 64 + "ok,1\n",
            r"row 2: a quoted field opened here is not closed \(it runs to row 67\)",
        ),
    ],
)
def test_csv_rows_refused(tmp_path, body, match):
    from muscle_kernels.defense.data import DataError, load_file

    f = tmp_path / "d.csv"
    f.write_text(body, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        load_file(str(f))


@pytest.mark.parametrize("text, kind", [('["a", "b"]', "list"), ("12", "int"), ('{"x": 1}', "dict")])
def test_jsonl_text_must_be_a_string(tmp_path, text, kind):
    from muscle_kernels.defense.data import DataError, load_file

    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine", "label": 1}\n{"text": ' + text + ', "label": 0}\n')
    with pytest.raises(DataError, match=rf"row 2: the text is a {kind}, expected a string"):
        load_file(str(f))


# -- row 23: --data with column options ------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", [["--text-column", "x"], ["--label-column", "y"]])
def test_data_with_column_options(capsys, tmp_path, flag):
    from .test_hardening import paper_dir

    code, err = cli(capsys, ["defend", "--model", "m", "--data", paper_dir(tmp_path)] + flag)
    assert code == 2 and one_line(err).startswith(f"muscle-lora: error: {flag[0]}: --data DIR reads the paper's")


# -- row 20: out of memory is one line naming the batch size and the length ------------------------------------------
@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. "
            "DefaultCPUAllocator: can't allocate memory: you "
            "tried to allocate 8000000000 bytes."
        ),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    ],
)
def test_out_of_memory_is_one_line(capsys, tmp_path, tiny_model_dir, monkeypatch, error):
    import muscle_kernels.defense.train as train

    def oom(*a, **k):
        raise error

    monkeypatch.setattr(train, "train_method", oom)
    code, err = cli(
        capsys,
        defend_argv(tiny_model_dir, tmp_path / "o", "lora", "--batch-size", "512", "--max-length", "512")
        + files_argv(tmp_path),
    )
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("muscle-lora: error: out of memory") and "Traceback" not in err
    assert "--batch-size 512" in last and "--max-length 512" in last


def test_other_runtime_errors_keep_their_traceback(tmp_path, tiny_model_dir, monkeypatch):
    import muscle_kernels.defense.train as train

    def bug(*a, **k):
        raise RuntimeError("shape mismatch in a bug")

    monkeypatch.setattr(train, "train_method", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(defend_argv(tiny_model_dir, tmp_path / "o", "lora") + files_argv(tmp_path))


# -- row 24: file modes, info, for_model on an adapted model, the subcommand's --help --------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_adapter_files_follow_the_umask(tmp_path, umask, mode):
    from muscle_kernels import apply_muscle_lora, save_adapter

    old = os.umask(umask)
    try:
        save_adapter(apply_muscle_lora(tiny_bert()), tmp_path / "a")
    finally:
        os.umask(old)
    for name in ("muscle_lora_config.json", "muscle_lora_adapter.safetensors"):
        assert oct((tmp_path / "a" / name).stat().st_mode & 0o777) == oct(mode), name


@pytest.mark.parametrize(
    "argv, command",
    [
        (["defend", "--model", "m", "--min-ref-loss", "-1"], "defend"),
        (["demo", "--min-ref-loss", "-1"], "demo"),
        (["defend", "--model", "m", "--train", "t.csv"], "defend"),
    ],
)
def test_error_hints_name_the_subcommand(capsys, argv, command):
    code, err = cli(capsys, argv)
    assert code == 2 and one_line(err).endswith(f"(see muscle-lora {command} --help)")


def test_manifest_lists_only_what_was_written(capsys, tmp_path, tiny_model_dir, stub_training, monkeypatch):
    """A method that wrote nothing (it diverged) is not left in the manifest: a folder the user makes under its name
    afterwards is not taken for ours by a later --overwrite."""
    import muscle_kernels.defense.train as train

    stub = train.train_method

    def lora_diverges(method, *a, **k):
        if method == "lora":
            return dict(stub_record_diverged(method), settings=a[3].to_dict())
        return stub(method, *a, **k)

    monkeypatch.setattr(train, "train_method", lora_diverges)
    out = tmp_path / "out"
    code, err = cli(capsys, defend_argv(tiny_model_dir, out, "lora,muscle") + files_argv(tmp_path))
    assert code == 0, err
    written = json.loads((out / ".muscle-lora-manifest.json").read_text())["written"]
    assert "lora" not in written and "muscle" in written and "results.json" in written
    (out / "lora").mkdir()
    (out / "lora" / "mine.txt").write_text("mine")
    code, err = cli(capsys, defend_argv(tiny_model_dir, out, "muscle", "--overwrite") + files_argv(tmp_path))
    assert code == 0, err
    assert (out / "lora" / "mine.txt").read_text() == "mine"


def stub_record_diverged(method):
    return dict(
        method=method,
        diverged=True,
        diverged_reason="loss nan at step 1",
        cacc=float("nan"),
        asr=float("nan"),
        best_epoch=None,
        train_seconds=0.1,
        step_seconds=0.1,
        steps=1,
        history=[],
    )


# -- row 19: the extension's sums are at least as accurate as the fallback's where <g, r> nearly cancels ------------
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


def test_python_dash_m_reports_analyze_errors_in_one_line(tmp_path):
    """`python -m muscle_kernels.cli`: the module runs as __main__; analyze's errors must still be caught."""
    import subprocess
    import sys

    from .test_hardening import ROOT

    f = tmp_path / "afile"
    f.write_text("x")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(
        [sys.executable, "-m", "muscle_kernels.cli", "analyze", "--output", str(f), "--no-progress"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert one_line(p.stderr) == f"muscle-lora: error: --output: {f} exists and is not a directory"
