"""benchmarks/bench_frequency.py runs (tiny N): the table row comes back from its subprocess with a time and a peak."""

import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_frequency.py"


def test_bench_frequency_smoke(tmp_path):
    out = tmp_path / "rows.jsonl"
    res = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--n",
            "300",
            "--d",
            "8",
            "--sigmas",
            "0.1,1",
            "--chunk",
            "64",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "| torch | cpu | 300 | 8 | 2 |" in res.stdout
    row = json.loads(out.read_text().splitlines()[0])
    assert row["seconds"] > 0 and row["peak_mib"] >= 0 and row["chunk"] == 64
