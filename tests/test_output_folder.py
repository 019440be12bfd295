"""The output folder (`--output`): checked before any work; --overwrite removes only what a run of ours wrote (the
folder's manifest) and nothing when the run fails to start; one run per folder at a time; an interrupted run (Ctrl-C)
leaves a record that says it is incomplete and no adapter of an older run beside it; `analyze` and `analyze --replot`
follow the same rules and never write through a link.

Training is replaced by a stub (tests/conftest.py: stub_training): these tests are about the command's plumbing."""

import json
import os
import sys

import pytest

from muscle_kernels.cli import main

from .utils import cli, defend_argv, files_argv, one_line


# -- defend: --output is checked before any method trains --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["file", "empty", "read-only"])
def test_bad_output_fails_before_training(capsys, tmp_path, kind, tiny_model_dir, stub_training):
    if kind == "file":
        out = tmp_path / "taken"
        out.write_text("x")
        out, match = str(out), "exists and is not a directory"
    elif kind == "empty":
        out, match = "", "--output: expected a directory path, got ''"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            (ro / "probe").write_text("x")
            out = "/sys"  # running as root, permissions do not bind: take a directory nobody may create files in
        except PermissionError:
            out = str(ro)
        match = f"--output: cannot write to {out}"
    code, err = cli(capsys, ["defend", "--model", tiny_model_dir, "--output", out] + files_argv(tmp_path))
    assert code == 2 and match in one_line(err)
    assert not stub_training["calls"], "no method may train before --output is known to be usable"


# -- --overwrite removes only what a run of ours wrote (the manifest), and nothing for a run that fails to start -------
def plant_old_run(out, victim):
    out.mkdir()
    (out / "results.json").write_text('{"old": true}')
    (out / "results.png").write_bytes(b"OLD")
    for method in ("lora", "muscle-ga"):
        (out / method).mkdir()
        (out / method / "adapter.txt").write_text("old")
    (out / "notes.txt").write_text("the user's own file")
    (out / "vanilla").symlink_to(victim.parent, target_is_directory=True)
    # what that run recorded writing (issue 20: --overwrite removes only the names in the manifest)
    names = ["results.json", "results.png", "lora", "muscle-ga", "vanilla"]
    (out / ".muscle-lora-manifest.json").write_text(json.dumps({"written": names}))


def test_nonempty_output_needs_overwrite(capsys, tmp_path, tiny_model_dir, stub_training):
    victim = tmp_path / "elsewhere" / "keep.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    out = tmp_path / "out"
    plant_old_run(out, victim)
    argv = [
        "defend",
        "--model",
        tiny_model_dir,
        "--output",
        str(out),
        "--method",
        "lora",
        "--no-progress",
        "--device",
        "cpu",
    ] + files_argv(tmp_path)
    code, err = cli(capsys, argv)
    assert code == 2 and "is not empty" in one_line(err) and "--overwrite" in err
    assert (out / "results.json").read_text() == '{"old": true}' and not stub_training["calls"]

    assert cli(capsys, argv + ["--overwrite"])[0] == 0
    record = json.loads((out / "results.json").read_text())
    assert record["complete"] is True and [r["method"] for r in record["results"]] == ["lora"]
    assert (out / "lora" / "adapter.txt").read_text() == "new"
    assert not (out / "muscle-ga").exists(), "an old adapter folder must not sit beside the new record"
    assert not os.path.lexists(out / "vanilla") and victim.read_text() == "precious", (
        "symlinks are removed, not followed"
    )
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_overwrite_never_clears_for_a_failed_start(capsys, tmp_path):
    victim = tmp_path / "elsewhere" / "keep.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    out = tmp_path / "out"
    plant_old_run(out, victim)
    code, err = cli(
        capsys,
        ["defend", "--model", str(tmp_path / "no-model"), "--output", str(out), "--overwrite"] + files_argv(tmp_path),
    )
    assert code == 2 and "no-model: no such file or folder" in one_line(err)
    assert (out / "results.json").read_text() == '{"old": true}' and (out / "lora" / "adapter.txt").exists()


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


# -- one run per output folder -----------------------------------------------------------------------------------------
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


# -- an interrupted run, a missing matplotlib: results.json and the plot say what this run did -------------------------
def test_ctrl_c_during_second_method(capsys, tmp_path, tiny_model_dir, stub_training):
    victim = tmp_path / "elsewhere" / "keep.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    out = tmp_path / "out"
    plant_old_run(out, victim)
    stub_training["interrupt_at"] = 2
    code, err = cli(
        capsys,
        [
            "defend",
            "--model",
            tiny_model_dir,
            "--output",
            str(out),
            "--method",
            "lora,muscle-ga",
            "--no-progress",
            "--device",
            "cpu",
            "--overwrite",
        ]
        + files_argv(tmp_path),
    )
    assert code == 130 and one_line(err) == "muscle-lora: interrupted"
    record = json.loads((out / "results.json").read_text())
    assert record["complete"] is False and [r["method"] for r in record["results"]] == ["lora"]
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG", "the plot must be the new run's"
    assert not (out / "muscle-ga").exists(), "the old run's adapter must not sit beside the new record"


def test_defend_without_matplotlib(capsys, tmp_path, tiny_model_dir, stub_training, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="matplotlib is not installed: results.png is skipped") as seen:
        code = main(
            [
                "defend",
                "--model",
                tiny_model_dir,
                "--output",
                str(out),
                "--method",
                "lora,muscle",
                "--no-progress",
                "--device",
                "cpu",
            ]
            + files_argv(tmp_path)
        )
    assert code == 0
    assert len([w for w in seen if "matplotlib" in str(w.message)]) == 1, "one warning per run"
    printed = capsys.readouterr().out
    assert "CACC" in printed and "muscle " in printed and "no plot" in printed
    assert json.loads((out / "results.json").read_text())["complete"] is True
    assert not (out / "results.png").exists()


# -- analyze checks --output as defend does, before the model loads ----------------------------------------------------
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


# -- analyze --replot: honours --output, replaces links instead of following them, reads only the recorder's CSV -------
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


@pytest.mark.parametrize(
    "content", [b"", b'{"complete": true, "results": []}\n', b"\x89PNG\r\n\x1a\n\xff\xfe\x00", b"step,method\n1,x\n"]
)
def test_replot_of_other_files(capsys, tmp_path, content):
    f = tmp_path / "results.json"
    f.write_bytes(content)
    code, err = cli(capsys, ["analyze", "--replot", str(f), "--output", str(tmp_path / "o")])
    assert code == 2 and one_line(err).startswith(f"muscle-lora: error: --replot: {f}")
