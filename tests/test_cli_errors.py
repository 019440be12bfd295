"""`muscle-lora`'s errors: bad input gives one line on stderr that names the option, or the file and row, and exit
code 2, and it is found before any work (before the model loads, before --output is made); an error while running is
one line too where it is the user's to fix (out of memory), and a bug keeps its traceback.

Training is replaced by a stub where a test needs the command to get that far (tests/conftest.py: stub_training)."""

import os

import pytest
import torch

from muscle_kernels.cli import main

from .tiny_models import saved_adapter
from .utils import ROOT, WORDS, cli, defend_argv, files_argv, one_line, rows_csv, two_class_rows


# -- --attack, --poison-rate, --target-label and --device checked against the data and the machine ---------------------
def test_single_class_with_attack(capsys, tmp_path):
    f = rows_csv(tmp_path / "one.csv", [(f"good film {i}", 1) for i in range(400)])
    code, err = cli(capsys, ["defend", "--model", "m", "--train", f, "--test-clean", f, "--attack", "badnets"])
    assert code == 2 and "--attack:" in one_line(err) and "only label 1" in err


def test_poison_rate_one(capsys, tmp_path):
    f = rows_csv(tmp_path / "d.csv", two_class_rows(400))
    code, err = cli(
        capsys,
        ["defend", "--model", "m", "--train", f, "--test-clean", f, "--attack", "badnets", "--poison-rate", "1.0"],
    )
    assert code == 2 and one_line(err).startswith("muscle-lora: error: --poison-rate: 1 asks for")


def test_target_label_out_of_range(capsys, tmp_path):
    f = rows_csv(tmp_path / "d.csv", two_class_rows(400))
    code, err = cli(
        capsys,
        ["defend", "--model", "m", "--train", f, "--test-clean", f, "--attack", "addsent", "--target-label", "5"],
    )
    assert code == 2 and "--target-label: 5 is not a label of" in one_line(err) and "[0, 1]" in err


def test_target_label_without_attack(capsys, tmp_path):
    code, err = cli(capsys, ["defend", "--model", "m", "--target-label", "0"] + files_argv(tmp_path))
    assert code == 2 and "--target-label: only applies with --attack" in one_line(err)


@pytest.mark.parametrize("device", ["gpu7", "meta"])
def test_bad_device(capsys, tmp_path, device):
    code, err = cli(capsys, ["defend", "--model", "m", "--device", device] + files_argv(tmp_path))
    assert code == 2 and f"--device: expected auto, cpu, cuda or cuda:N, got {device!r}" in one_line(err)


def test_cuda_device_without_cuda(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = cli(capsys, ["defend", "--model", "m", "--device", "cuda:1"] + files_argv(tmp_path))
    assert code == 2 and "--device: 'cuda:1' asked for, but no CUDA device is available" in one_line(err)


def test_cuda_index_out_of_range(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, err = cli(capsys, ["defend", "--model", "m", "--device", "cuda:3"] + files_argv(tmp_path))
    assert code == 2 and "--device: 'cuda:3' asked for, but there are 1 CUDA device(s) (cuda:0 .. cuda:0)" in one_line(
        err
    )


# -- --data DIR with the options it does not use -----------------------------------------------------------------------
def paper_dir(tmp_path):
    d = tmp_path / "paper"
    d.mkdir()
    rows = ",0,1,2\n" + "".join(f"{i},{WORDS[i % 6]} {WORDS[(i + 2) % 6]},{i % 2},0\n" for i in range(12))
    for name in ("train-poison.csv", "dev-clean.csv", "test-clean.csv", "test-poison.csv"):
        (d / name).write_text(rows)
    return str(d)


@pytest.mark.parametrize(
    "flag, match",
    [
        (["--dev", "x.csv"], "--dev: --data DIR uses the folder's dev-clean.csv"),
        (["--target-label", "0"], "--target-label: the paper's folders are poisoned already"),
    ],
)
def test_data_with_ignored_flags(capsys, tmp_path, flag, match):
    code, err = cli(capsys, ["defend", "--model", "m", "--data", paper_dir(tmp_path)] + flag)
    assert code == 2 and match in one_line(err)


@pytest.mark.parametrize("flag", [["--text-column", "x"], ["--label-column", "y"]])
def test_data_with_column_options(capsys, tmp_path, flag):
    code, err = cli(capsys, ["defend", "--model", "m", "--data", paper_dir(tmp_path)] + flag)
    assert code == 2 and one_line(err).startswith(f"muscle-lora: error: {flag[0]}: --data DIR reads the paper's")


# -- argument errors: one line, ending with the subcommand's --help ----------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["demo", "--epochs", "0"],
        ["defend"],
        ["defend", "--model", "m", "--attack", "stylebkd"],
        ["demo", "--min-ref-loss", "-1"],
        ["defend", "--model", "m", "--train", "t.csv"],
    ],
)
def test_argument_errors_are_one_line(capsys, argv):
    code, err = cli(capsys, argv)
    assert code == 2 and one_line(err).startswith("muscle-lora")


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


# -- numbers checked when they are parsed: float32 overflow, too many classes, sizes the demo cannot give --------------
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


@pytest.mark.parametrize("flag", [["--freq-band", "1e308"], ["--freq-band", "1,1e38"]])
def test_cli_freq_band_overflow(capsys, flag):
    code, err = cli(capsys, ["defend", "--model", "m", "--train", "t.csv"] + flag)
    assert code == 2 and "freq_band: expected values whose scales" in one_line(err)


def test_num_labels_capped(capsys, tmp_path):
    code, err = cli(
        capsys,
        ["defend", "--model", "m", "--num-labels", "100000000", "--output", str(tmp_path / "o")] + files_argv(tmp_path),
    )
    assert code == 2 and "--num-labels: 100000000 classes asked for, at most 1000" in one_line(err)
    assert not (tmp_path / "o").exists()


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


# -- --model problems: one line, before the output folder is made ------------------------------------------------------
def test_missing_model(capsys, tmp_path):
    code, err = cli(
        capsys,
        ["defend", "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "o")] + files_argv(tmp_path),
    )
    # issue 20 row 24: a missing folder is said so (not "Repo id must use alphanumeric chars")
    assert code == 2 and one_line(err) == f"muscle-lora: error: --model: {tmp_path}/no-model: no such file or folder"


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


def test_checkpoint_head_of_another_size(capsys, tmp_path, tiny_model_dir, stub_training):
    rows = [(f"good film {i}", i % 3) for i in range(12)]
    out = tmp_path / "out"
    code, err = cli(capsys, defend_argv(tiny_model_dir, out, "lora") + files_argv(tmp_path, rows))
    line = one_line(err)
    assert code == 2 and "the data has 3 classes" in line and "has 2" in line and "--new-head" in line
    assert not out.exists(), "checked before the output folder is made"
    code, err = cli(capsys, defend_argv(tiny_model_dir, out, "lora", "--new-head") + files_argv(tmp_path, rows))
    assert code == 0, err


# -- errors while running: out of memory is one line naming the batch size and the length; a bug keeps its traceback ---
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


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch, tiny_model_dir):
    import muscle_kernels.defense.train as train

    def boom(*a, **k):
        raise ZeroDivisionError("a bug, not bad input")

    monkeypatch.setattr(train, "split_reference", boom)
    with pytest.raises(ZeroDivisionError):
        main(["defend", "--model", tiny_model_dir, "--output", str(tmp_path / "o")] + files_argv(tmp_path))


def test_python_dash_m_reports_analyze_errors_in_one_line(tmp_path):
    """`python -m muscle_kernels.cli`: the module runs as __main__; analyze's errors must still be caught."""
    import subprocess
    import sys

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
