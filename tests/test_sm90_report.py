"""The offline sm_90 compile report (benchmarks/sm90_report.py) passes on a representative subset of the kernels.

The report compiles for an H100 without one (Triton's CUDA backend and its bundled ptxas are enough). It runs in a
subprocess because conftest.py turns on the Triton interpreter, whose kernels cannot be compiled.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ptxas_present() -> bool:
    try:
        from triton.backends.nvidia import compiler as nv
    except Exception:
        return False
    try:
        path = nv.get_ptxas(90).path
    except TypeError:
        path = nv.get_ptxas().path
    except Exception:
        return False
    return bool(path) and os.path.exists(path)


pytestmark = pytest.mark.skipif(not _ptxas_present(), reason="Triton's CUDA backend / ptxas is not installed")

# One of each kind: the biggest forward tile, the dropout backward tile, the widest shrink and reduction, the mask, and the
# fp32-without-TF32 reduction that once spilled.
SCRIPT = """
import json, sys
sys.path.insert(0, {bench!r})
import sm90_report as r
rows = r.report_rows(subset=True, progress=False, dtypes=("bf16", "fp32-ieee"),
                     variants=("fwd T-in-loop", "dx G-loaded+drop", "dL drop+split", "dR split", "drop+split",
                               "G+dR fused", "dropout mask"))
rows = [x for x in rows if x["dtype"] == "bf16" or x["variant"] == "dR split"]
print(json.dumps({{"rows": rows, "failures": r.failures(rows)}}))
"""


def test_sm90_report_subset_passes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(bench=str(ROOT / "benchmarks"))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"sm90_report failed:\n{proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    rows, bad = out["rows"], out["failures"]
    seen = {(r["variant"], r["dtype"]) for r in rows}
    for want in [("fwd T-in-loop", "bf16"), ("dx G-loaded+drop", "bf16"), ("dL drop+split", "bf16"),
                 ("dR split", "bf16"), ("dR split", "fp32-ieee"), ("drop+split", "bf16"), ("G+dR fused", "bf16"),
                 ("dropout mask", "bf16")]:
        assert want in seen, f"sm90 report: no row for {want}"
    assert bad == [], "sm90 report failures:\n" + "\n".join(bad)
    for r in rows:
        if r["dtype"] == "bf16" and r["kernel"] != "bits":  # the dropout-mask kernel has no matmul
            assert r["wgmma"], f"{r['kernel']} {r['variant']}: bf16 without wgmma"
        # Philox runs once, in the mask kernel; the shrink, the dx epilogue and the dL reduction read the packed mask.
        assert bool(r["philox"]) == (r["kernel"] == "bits"), f"{r['kernel']} {r['variant']}: philox {r['philox']}"
        # int64 offsets: no pointer offset inside a loop is an index * stride product in 32 bits
        assert r["loop_i32_offsets"] == [], f"{r['kernel']} {r['variant']}: i32 offsets {r['loop_i32_offsets']}"
