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


needs_ptxas = pytest.mark.skipif(not _ptxas_present(), reason="Triton's CUDA backend / ptxas is not installed")

# One of each kind: the biggest forward tile, the dropout backward tile, the dx tiles with dR folded in (auto's
# "triton-fdx", at their widest n*r), the widest shrink and reduction, the mask, and the fp32-without-TF32 reduction
# that once spilled.
SCRIPT = """
import json, sys
sys.path.insert(0, {bench!r})
import sm90_report as r
rows = r.report_rows(subset=True, progress=False, dtypes=("bf16", "fp32-ieee"),
                     variants=("fwd T-in-loop", "dx G-loaded+drop", "dx G-in-loop+dR", "dx G-loaded+drop+dR",
                               "dL drop+split", "dR split", "drop+split", "G+dR fused", "dropout mask",
                               "dropout mask, seed on device"))
rows = [x for x in rows if x["dtype"] == "bf16" or x["variant"] == "dR split"]
print(json.dumps({{"rows": rows, "failures": r.failures(rows)}}))
"""


@pytest.mark.slow  # compiles a dozen kernels with ptxas: 12 s here with a warm Triton cache, more without
@needs_ptxas
def test_sm90_report_subset_passes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(bench=str(ROOT / "benchmarks"))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"sm90_report failed:\n{proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    rows, bad = out["rows"], out["failures"]
    seen = {(r["variant"], r["dtype"]) for r in rows}
    for want in [
        ("fwd T-in-loop", "bf16"),
        ("dx G-loaded+drop", "bf16"),
        ("dx G-in-loop+dR", "bf16"),
        ("dx G-loaded+drop+dR", "bf16"),
        ("dL drop+split", "bf16"),
        ("dR split", "bf16"),
        ("dR split", "fp32-ieee"),
        ("drop+split", "bf16"),
        ("G+dR fused", "bf16"),
        ("dropout mask", "bf16"),
        ("dropout mask, seed on device", "bf16"),
    ]:
        assert want in seen, f"sm90 report: no row for {want}"
    assert bad == [], "sm90 report failures:\n" + "\n".join(bad)
    for r in rows:
        if r["dtype"] == "bf16" and r["kernel"] != "bits":  # the dropout-mask kernel has no matmul
            assert r["wgmma"], f"{r['kernel']} {r['variant']}: bf16 without wgmma"
        # Philox runs once, in the mask kernel; the shrink, the dx epilogue and the dL reduction read the packed mask.
        assert bool(r["philox"]) == (r["kernel"] == "bits"), f"{r['kernel']} {r['variant']}: philox {r['philox']}"
        # int64 offsets: no pointer offset inside a loop is an index * stride product in 32 bits
        assert r["loop_i32_offsets"] == [], f"{r['kernel']} {r['variant']}: i32 offsets {r['loop_i32_offsets']}"
        # Every split reduction ends in atomics (ATOMIC=True in these jobs): all relaxed, so no per-element fence.
        has_atomics = r["variant"] in (
            "dL drop+split",
            "dR split",
            "drop+split",
            "G+dR fused",
            "dx G-in-loop+dR",
            "dx G-loaded+drop+dR",
        )
        assert bool(r["atomics"]) == has_atomics, f"{r['kernel']} {r['variant']}: {r['atomics']} atomics"
        assert r["atomics_not_relaxed"] == 0, f"{r['kernel']} {r['variant']}: acq_rel atomics"
        assert r["sass_membar_gpu"] in (0, None), f"{r['kernel']} {r['variant']}: MEMBAR.GPU {r['sass_membar_gpu']}"


def test_atomic_checks_tell_relaxed_from_acq_rel():
    """The report's PTX and SASS parsers on the forms Triton 3.6 / 3.8 emit for sm_90 (the lines below are copied from
    the report's compiles of the dR reduction before and after sem="relaxed")."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sm90_report as r

    relaxed = "\t@%p9 atom.global.gpu.relaxed.add.f32 \t%r105, [ %rd43 + 0 ], %r106;\n\tred.global.add.f32 [%rd1], %r2;"
    acq_rel = "\t@%p9 atom.global.gpu.acq_rel.add.f32 \t%r105, [ %rd43 + 0 ], %r106;\n\tst.global.b32 [%rd1], %r2;"
    assert r.ptx_atomics(relaxed) == (2, 0)  # PTX assumes .relaxed where no semantics is named
    assert r.ptx_atomics(acq_rel) == (1, 1)
    assert r.ptx_atomics("\tld.global.b32 %r1, [%rd1];") == (0, 0)
    rows = [
        dict(
            kernel="reduce",
            variant="dR split",
            dtype="bf16",
            blocks="64",
            warps=8,
            stages=3,
            spills=0,
            smem=0,
            wgmma=True,
            loop_i32_offsets=[],
            philox=0,
            atomics=64,
            atomics_not_relaxed=a,
            sass_membar_gpu=m,
        )
        for a, m in ((0, 0), (64, 64), (0, None))
    ]
    bad = r.failures(rows)
    assert len(bad) == 2 and all("64 w8 s3:" in b for b in bad), bad


SPECIALISATION = """
import json, torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import create_function_from_signature
from muscle_kernels.ops.lowrank_linear import kernels
k = kernels._dropout_bits_kernel
i = k.arg_names.index("seed")
# The binder Triton builds for launches: its specialisation list is (part of) the compile-cache key.
binder = create_function_from_signature(k.signature, k.params, triton.compiler.make_backend(GPUTarget("cuda", 90, 32)))
bits = torch.empty(64, dtype=torch.int32)
specs = [repr(binder(bits, 37, 2, 2, seed, bits, 0.1, SEED_FROM_PTR=False, BLOCK_M=32, BLOCK_W=16)[1])
         for seed in (1, 16, 17, 12345)]
print(json.dumps({"flag": bool(k.params[i].do_not_specialize), "specs": specs}))
"""


@needs_ptxas
def test_dropout_seed_is_not_specialised():
    """A seed of 1 (a constant to Triton) or a multiple of 16 (an alignment hint) must not compile another variant of
    the dropout-mask kernel: the launch's specialisation key is the same for every seed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", SPECIALISATION], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["flag"], "seed is not in the dropout-mask kernel's do_not_specialize"
    assert len(set(out["specs"])) == 1, f"the specialisation changes with the seed: {out['specs']}"
