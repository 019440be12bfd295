"""Offline sm_90 (H100) compile report of every shipped config of every Triton kernel of the low-rank linear op.

No GPU needed: each (kernel, variant, dtype, config) is compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`` with the specialisations the runtime would make for typical LLM shapes (unit
strides as constants, pointers / N / K / leading strides divisible by 16), then the PTX goes through ``ptxas -v`` for
registers and spills. Prints a table and exits non-zero when a shipped config spills, needs more than the H100's
227 KiB of shared memory, (fp16/bf16) does not use wgmma, computes a pointer offset in 32 bits inside a loop, runs
Philox anywhere but in the dropout-mask kernel, or has an atomic that is not relaxed: in the PTX every atom/red must be
`.relaxed`, and where Triton's cuobjdump can disassemble the cubin, no kernel with atomics may have a GPU- or
system-scope MEMBAR in its SASS (Triton's default acq_rel puts MEMBAR.ALL.GPU + ERRBAR + CCTL.IVALL around each
element atomic; relaxed is one REDG).

    python benchmarks/sm90_report.py            # everything (a few minutes on 2 cores)
    python benchmarks/sm90_report.py --subset   # the largest config of each kernel/variant/dtype (what the test runs)

As a module: ``report_rows(subset=False) -> list[dict]`` and ``failures(rows) -> list[str]``. It must run without
TRITON_INTERPRET=1 (the interpreter replaces the kernels by Python functions that cannot be compiled).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# The kernels of this checkout, not of whatever muscle_kernels is installed (an editable install of another tree).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H100_SMEM = 227 * 1024
DTYPES = ("fp16", "bf16", "fp32-tf32", "fp32-ieee")
_ELT = {"fp16": 2, "bf16": 2, "fp32-tf32": 4, "fp32-ieee": 4}


def _tl_dtype(dtype: str) -> str:
    return dtype.split("-")[0]


def _precision(dtype: str) -> str:
    return "ieee" if dtype == "fp32-ieee" else "tf32"


def _fold_variants(configs, elt: int, unit: tuple):
    """The dx GEMM with dR folded in (auto's "triton-fdx") at its widest n*r: with G in the K loop (which caps it at
    FUSE_T_MAX_R there) and with G loaded under dropout. None for fp32, which does not fold."""
    fold_r = configs.fold_dx_max_r(elt)
    if not fold_r:
        return []
    in_loop = min(fold_r, configs.FUSE_T_MAX_R)
    loaded = min(fold_r, configs.T_CHUNK)
    fold = dict(HAS_BIAS=False, FOLD_DR=True)
    return [
        ("dx G-in-loop+dR", unit, dict(fold, T_MODE=0, STORE_T=True, OUT_DROP=False, FOLD_R=in_loop, BLOCK_R=in_loop)),
        (
            "dx G-loaded+drop+dR",
            unit,
            dict(fold, T_MODE=1, STORE_T=False, OUT_DROP=True, FOLD_R=fold_r, BLOCK_R=loaded),
        ),
    ]


def _jobs(subset: bool):
    """Every (kernel, variant, dtype, constexprs, unit strides, warps, stages) that the launchers can ship."""
    from muscle_kernels.ops.lowrank_linear import configs

    jobs = []
    for dtype in DTYPES:
        elt, prec = _ELT[dtype], _precision(dtype)
        # Forward: A = x [M, in], B[k, n] = W[n, k]; backward dx: A = dy, B[k, n] = W[k, n] (other unit strides).
        fwd_unit = ("stride_ak", "stride_bk", "stride_pk", "stride_qr", "stride_tr", "stride_cn")
        dx_unit = ("stride_ak", "stride_bn", "stride_pr", "stride_qn", "stride_tr", "stride_cn")
        plain = dict(FOLD_DR=False, FOLD_R=16)
        variants = [
            (
                "fwd T-in-loop",
                fwd_unit,
                dict(HAS_BIAS=True, T_MODE=0, STORE_T=True, OUT_DROP=False, BLOCK_R=configs.FUSE_T_MAX_R),
            ),
            (
                "fwd T-loaded",
                fwd_unit,
                dict(HAS_BIAS=True, T_MODE=1, STORE_T=False, OUT_DROP=False, BLOCK_R=configs.T_CHUNK),
            ),
            (
                "dx G-in-loop",
                dx_unit,
                dict(HAS_BIAS=False, T_MODE=0, STORE_T=True, OUT_DROP=False, BLOCK_R=configs.FUSE_T_MAX_R),
            ),
            (
                "dx G-loaded+drop",
                dx_unit,
                dict(HAS_BIAS=False, T_MODE=1, STORE_T=False, OUT_DROP=True, BLOCK_R=configs.T_CHUNK),
            ),
        ]
        variants = [(name, unit, dict(ce, **plain)) for name, unit, ce in variants]
        variants += _fold_variants(configs, elt, dx_unit + ("stride_tsr", "stride_drr"))
        for name, unit, ce in variants:
            fold = ce["FOLD_R"] if ce["FOLD_DR"] else 0
            cfgs = configs.fused_configs(elt, prec, ce["BLOCK_R"] if ce["T_MODE"] == 0 else 0, fold_r=fold)
            for c in cfgs[:1] if subset else cfgs:
                # EVEN_K: LLM layers' K is a multiple of BLOCK_K (the masked loop compiles to the same tiles).
                meta = dict(ce, UPCAST=False, PRECISION=prec, EVEN_K=True, **c.kwargs)
                jobs.append(("fused", name, dtype, meta, unit, c.num_warps, c.num_stages))
        brs = (256,) if subset else (16, 64, 256)
        for br in brs:
            bm, bk, w, st = configs.shrink_config(br, elt)
            meta = dict(
                HAS_DROP=True,
                ATOMIC=True,
                EVEN_K=True,
                FUSED_DR=False,
                BLOCK_R=br,
                UPCAST=False,
                PRECISION=prec,
                BLOCK_M=bm,
                BLOCK_K=bk,
            )
            jobs.append(("shrink", "drop+split", dtype, meta, ("stride_ak", "stride_tr"), w, st))
            # The backward G pass with dR fused in (auto's "triton-fdy"); the subset takes its widest n*r.
            fdy_br = configs.fused_dy_max_r(prec)
            if br <= fdy_br or subset:
                bm, bk, w, st = configs.shrink_config(min(br, fdy_br), elt)
                meta = dict(meta, HAS_DROP=False, FUSED_DR=True, BLOCK_R=min(br, fdy_br), BLOCK_M=bm, BLOCK_K=bk)
                jobs.append(
                    (
                        "shrink",
                        "G+dR fused",
                        dtype,
                        meta,
                        ("stride_ak", "stride_pr", "stride_tr", "stride_tsr", "stride_drr"),
                        w,
                        st,
                    )
                )
            bm, bn, bc, w, st = configs.reduce_config(br, elt, prec)
            meta = dict(HAS_DROP=False, ATOMIC=True, BLOCK_R=bc, UPCAST=False, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn)
            jobs.append(("reduce", "dR split", dtype, meta, ("stride_an", "stride_gr", "stride_cr"), w, st))
            meta = dict(meta, HAS_DROP=True)
            jobs.append(("reduce", "dL drop+split", dtype, meta, ("stride_an", "stride_gr", "stride_cn"), w, st))
    bm, bw, w = configs.BITS_CONFIG
    jobs.append(("bits", "dropout mask", "bf16", dict(SEED_FROM_PTR=False, BLOCK_M=bm, BLOCK_W=bw), (), w, 1))
    # The seed read from a device tensor (function.py's graph-safe draw)
    jobs.append(
        ("bits", "dropout mask, seed on device", "bf16", dict(SEED_FROM_PTR=True, BLOCK_M=bm, BLOCK_W=bw), (), w, 1)
    )
    return jobs


def _kernel(name):
    from muscle_kernels.ops.lowrank_linear import kernels

    return {
        "fused": kernels._fused_lowrank_mm_kernel,
        "shrink": kernels._shrink_kernel,
        "reduce": kernels._reduce_m_kernel,
        "bits": kernels._dropout_bits_kernel,
    }[name]


def _ptxas():
    from triton.backends.nvidia import compiler as nv

    try:
        return nv.get_ptxas(90).path  # triton >= 3.4
    except TypeError:
        return nv.get_ptxas().path


def ptxas_usage(ptx: str):
    """(registers, spill bytes stored + loaded) of one kernel's PTX, from `ptxas -v` for the PTX's own target."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
        out = subprocess.run(
            [_ptxas(), "-v", f"--gpu-name={arch}", path, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", out).group(1)) + int(
        re.search(r"(\d+) bytes spill loads", out).group(1)
    )
    return regs, spills


def _compile_one(job):
    import triton
    from triton.backends.compiler import GPUTarget

    kname, variant, dtype, meta, unit, warps, stages = job
    fn = _kernel(kname)
    tl_dt = _tl_dtype(dtype)
    fp32_ptrs = {"s_ptr", "t_ptr", "g_ptr", "ts_ptr", "dr_ptr"} | ({"c_ptr"} if kname == "reduce" else set())
    floats = {"p", "drop_scale"}
    signature, constexprs, attrs = {}, {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in meta:
            signature[arg], constexprs[arg] = "constexpr", meta[arg]
        elif arg.endswith("_ptr"):
            signature[arg] = (
                "*i32"
                if arg == "bits_ptr"
                else "*i64"
                if arg == "seed_ptr"
                else "*fp32"
                if arg in fp32_ptrs
                else f"*{tl_dt}"
            )
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in floats:
            signature[arg] = "fp32"
        elif arg in unit:
            signature[arg], constexprs[arg] = "constexpr", 1
        else:
            signature[arg] = "i32"
            # M (tokens) and the seed are arbitrary; sizes and leading strides of LLM layers are multiples of 16.
            if arg.startswith("stride") or arg in ("N", "K", "W", "k_per_split", "m_per_split"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": warps, "num_stages": stages})
    src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    ck = triton.compile(src, target=target, options=options.__dict__)
    ptx = ck.asm["ptx"]
    i32 = loop_i32_offsets(ck.asm["ttir"])
    regs, spills = ptxas_usage(ptx)
    atoms, strong = ptx_atomics(ptx)
    membars = sass_membars(ck.asm.get("cubin"))
    blocks = "x".join(str(meta[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK_W") if k in meta)
    return dict(
        kernel=kname,
        variant=variant,
        dtype=dtype,
        blocks=blocks,
        warps=warps,
        stages=stages,
        registers=regs,
        spills=spills,
        smem=int(ck.metadata.shared),
        wgmma="wgmma.mma_async" in ptx,
        loop_i32_offsets=i32,
        philox=philox_rounds(ptx),
        atomics=atoms,
        atomics_not_relaxed=strong,
        sass_membar_gpu=membars,
    )


_PTX_ATOMIC = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?:atom|red)\.[\w.]+)", flags=re.M)


def ptx_atomics(ptx: str):
    """(atomic instructions, those with acquire/release semantics) in a kernel's PTX. acq_rel / release / acquire
    atomics become a full GPU fence per element in the SASS; the split reductions only need the sum, read after the
    kernel ends. (PTX assumes .relaxed where an atom/red names no semantics.)"""
    ops = _PTX_ATOMIC.findall(ptx)
    return len(ops), sum(1 for op in ops if re.search(r"\.(acq_rel|acquire|release)\b", op))


def sass_membars(cubin):
    """GPU- or system-scope MEMBARs in the SASS of a cubin (a CTA-scope MEMBAR, from Triton's shared-memory barriers,
    is not counted: it is there with or without atomics), or None when cuobjdump cannot disassemble it here."""
    if not cubin:
        return None
    try:
        from triton.tools.disasm import get_sass

        sass = get_sass(cubin)
    except Exception:  # no cuobjdump in this Triton install, or one too old for sm_90: the PTX check still holds
        return None
    return len(re.findall(r"MEMBAR\.\w*\.?(?:GPU|SYS)\b", sass))


# Philox's round multiplier 0xD2511F53 as PTX writes the immediate (signed or unsigned 32-bit).
_PHILOX_A = ("-766435501", "3528531795")


def philox_rounds(ptx: str) -> int:
    """PTX lines using Philox's round constant: non-zero where a kernel runs Philox (only the dropout-mask kernel
    should; the others read the packed mask)."""
    return sum(1 for line in ptx.splitlines() if any(c in line for c in _PHILOX_A))


def loop_i32_offsets(ttir: str):
    """Kernel source lines (file:line) where a pointer offset inside a loop is a product computed in 32 bits.

    Inside the K loop (the M loop of the reductions) an index runs up to out or in, and index * stride overflows
    int32 once out * in >= 2^31 (a 256k-vocabulary head). So every `tt.addptr` inside an `scf.for` body has its offset
    traced back through the definitions made inside loops; an i32 `arith.muli` there is reported. (Offsets computed
    once before a loop are tile index (< BLOCK) times a stride: far below 2^31.)"""
    locs = dict(re.findall(r'^(#loc\d+) = loc\("[^"]*?([^/"]+":\d+)', ttir, flags=re.M))
    alias = dict(re.findall(r'^(#loc\d+) = loc\("[^"]*"\((#loc\d+)\)\)', ttir, flags=re.M))
    defs, in_loop, addptrs, depth = {}, set(), [], 0
    for line in ttir.splitlines():
        m = re.match(r"\s*(%[\w.#]+)(?::\d+)? = (.*)$", line)
        if m:
            defs[m.group(1)] = m.group(2)
            if depth:
                in_loop.add(m.group(1))
                if m.group(2).startswith("tt.addptr"):
                    addptrs.append(m.group(2))
        if "scf.for" in line and line.rstrip().endswith("{"):
            depth += 1
        elif depth and line.strip().startswith("}"):
            depth -= 1

    def where(body):
        ref = re.search(r"loc\((#loc\d+)\)", body)
        key = ref.group(1) if ref else None
        for _ in range(8):
            if key in locs:
                return locs[key].replace('"', "")
            key = alias.get(key)
        return "?"

    def product(name, seen):
        if name not in in_loop or name in seen:
            return None
        seen.add(name)
        body = defs[name].split(" loc(")[0]
        types = body.split(" : ", 1)[1] if " : " in body else ""
        if body.startswith("arith.muli") and re.search(r"\bi32\b|xi32>", types):
            return where(defs[name])
        if body.startswith(("arith.extsi", "tt.addptr")):
            return None
        for op in re.findall(r"%[\w.#]+", body.split(" : ")[0]):
            hit = product(op, seen)
            if hit:
                return hit
        return None

    bad = set()
    for body in addptrs:
        ops = re.findall(r"%[\w.#]+", body.split(" : ")[0])
        if len(ops) == 2:
            hit = product(ops[1], set())
            if hit:
                bad.add(hit)
    return sorted(bad)


def failures(rows):
    """Why each failing row fails (empty list: the report passes)."""
    bad = []
    for r in rows:
        tag = f"{r['kernel']} {r['variant']} {r['dtype']} {r['blocks']} w{r['warps']} s{r['stages']}"
        if r["spills"]:
            bad.append(f"{tag}: spills {r['spills']} bytes")
        if r["smem"] > H100_SMEM:
            bad.append(f"{tag}: shared memory {r['smem']} > {H100_SMEM}")
        if r["dtype"] in ("fp16", "bf16") and not r["wgmma"] and r["kernel"] != "bits":  # the mask kernel has no dot
            bad.append(f"{tag}: no wgmma")
        if r["loop_i32_offsets"]:
            bad.append(f"{tag}: 32-bit pointer offsets in a loop at {', '.join(r['loop_i32_offsets'])}")
        if r["kernel"] == "bits" and not r["philox"]:
            bad.append(f"{tag}: no Philox rounds in the dropout-mask kernel")
        if r["kernel"] != "bits" and r["philox"]:
            bad.append(f"{tag}: runs Philox (the dropout mask must be read from the packed mask, not regenerated)")
        if r.get("atomics_not_relaxed"):
            bad.append(
                f"{tag}: {r['atomics_not_relaxed']} of {r['atomics']} PTX atomics are not .relaxed "
                '(each is a full GPU fence: pass sem="relaxed")'
            )
        if r.get("atomics") and r.get("sass_membar_gpu"):
            bad.append(f"{tag}: {r['sass_membar_gpu']} GPU-scope MEMBARs in the SASS of a kernel with atomics")
    return bad


def report_rows(subset: bool = False, workers: int = 2, progress: bool = True, dtypes=None, variants=None):
    """Compile every shipped config (or a representative subset) for sm_90; one dict per compiled kernel.

    dtypes / variants (e.g. ("bf16",), ("fwd T-in-loop", "dL drop+split")) narrow the jobs further."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("sm90_report: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)")
    jobs = [j for j in _jobs(subset) if (dtypes is None or j[2] in dtypes) and (variants is None or j[1] in variants)]
    from tqdm import tqdm

    with ProcessPoolExecutor(max_workers=workers) as pool:
        it = pool.map(_compile_one, jobs)
        rows = list(tqdm(it, total=len(jobs), desc="sm_90 compile", disable=not progress, file=sys.stderr))
    return rows


def format_table(rows):
    head = (
        "kernel",
        "variant",
        "dtype",
        "blocks (MxNxKxR)",
        "warps",
        "stages",
        "regs",
        "spills",
        "smem KiB",
        "wgmma",
        "i32 loop offsets",
        "philox",
        "atomics (not relaxed)",
        "SASS MEMBAR.GPU",
    )
    lines = [head]
    for r in rows:
        lines.append(
            (
                r["kernel"],
                r["variant"],
                r["dtype"],
                r["blocks"],
                str(r["warps"]),
                str(r["stages"]),
                str(r["registers"]),
                str(r["spills"]),
                f"{r['smem'] / 1024:.1f}",
                "yes" if r["wgmma"] else "no",
                str(len(r["loop_i32_offsets"])),
                "yes" if r["philox"] else "no",
                f"{r['atomics']} ({r['atomics_not_relaxed']})",
                "n/a" if r["sass_membar_gpu"] is None else str(r["sass_membar_gpu"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    fmt = lambda line: "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |"  # noqa: E731
    out = [fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(line) for line in lines[1:]]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", action="store_true", help="only the largest config of each kernel/variant/dtype")
    parser.add_argument("--workers", type=int, default=2, help="parallel compiles (default 2)")
    args = parser.parse_args(argv)
    import triton

    rows = report_rows(subset=args.subset, workers=args.workers)
    print(f"sm_90 compile report, triton {triton.__version__}, ptxas {_ptxas()}")
    print(format_table(rows))
    bad = failures(rows)
    for b in bad:
        print("FAIL:", b)
    print(f"{len(rows)} kernels compiled, {len(bad)} failures")
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
