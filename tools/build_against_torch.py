"""Compile and link the grad-align extension against another torch release's own headers, and check that every torch
symbol the libraries need is exported by that release's libraries: the proof that the stable-ABI build
(TORCH_TARGET_VERSION 2.11, csrc/grad_align.cpp) really builds with, and loads into, that torch.

    pip download torch==2.11.0 --no-deps -d /tmp/torch211          # the GPU machine's torch (a CUDA build, ~530 MB)
    python tools/build_against_torch.py --torch /tmp/torch211/torch-2.11.0-*.whl [--cuda] [--out DIR]
    python tools/build_against_torch.py --torch /path/to/site-packages/torch      # an installed torch package

Nothing of that torch is imported (its CUDA libraries need not be installed): the headers and libraries are read
from the wheel or the package directory. The flags are the JIT build's (muscle_kernels.ops.grad_align.extension),
with `-march` dropped so the objects do not depend on this CPU. --cuda also compiles csrc/grad_align_cuda.cu with nvcc
for sm_90 (the H100). Prints one line per step; exit status 0 only when every library built and no torch symbol is
missing. tests/test_grad_align_build.py runs it (slow) when MUSCLE_KERNELS_TORCH_211 names such a wheel or directory.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Undefined symbols that are torch's to provide (C shims of the stable ABI, and any C++ symbol of c10 / at / torch).
_TORCH_SYMBOL = re.compile(r"^(aoti_torch_|torch_|_ZN3c10|_ZN2at|_ZN5torch|_ZNK3c10|_ZNK2at|_ZNK5torch)")


def _torch_tree(spec: Path, work: Path) -> Path:
    """The `torch` package directory (include/, lib/, version.py) of a wheel (the parts needed, extracted) or of an
    installed package."""
    if spec.is_dir():
        return spec
    with zipfile.ZipFile(spec) as wheel:
        names = [
            n for n in wheel.namelist() if n.startswith(("torch/include/", "torch/lib/")) or n == "torch/version.py"
        ]
        wheel.extractall(work, [n for n in names if not n.endswith("/")])
    return work / "torch"


def _version(tree: Path) -> str:
    text = (tree / "version.py").read_text()
    return re.search(r"__version__\s*=\s*'([^']+)'", text).group(1)


def _run(cmd, what):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{' '.join(map(str, cmd))}\n{proc.stderr[-4000:]}")
    return proc.stdout


def _exported(libs):
    out = set()
    for lib in libs:
        text = _run(["nm", "-D", "--defined-only", str(lib)], f"nm {lib.name}")
        out.update(line.split()[-1] for line in text.splitlines() if line.strip())
    return out


def _needed(lib: Path):
    text = _run(["nm", "-D", "--undefined-only", str(lib)], f"nm {lib.name}")
    return {line.split()[-1].split("@")[0] for line in text.splitlines() if line.strip()}


def build(torch_spec: Path, cuda: bool, out: Path, arch: str = "90") -> dict:
    """Build the CPU (and CUDA) library against `torch_spec`; returns {flavour: (library, missing torch symbols,
    number of torch symbols needed)} and the torch version under "version"."""
    from muscle_kernels.ops.grad_align import extension

    src = ROOT / "csrc"
    tree = _torch_tree(torch_spec, out)
    inc = tree / "include"
    includes = ["-I", str(src), "-isystem", str(inc), "-isystem", str(inc / "torch" / "csrc" / "api" / "include")]
    result = {"version": _version(tree)}
    libs = sorted((tree / "lib").glob("lib*.so*"))
    exported = _exported(libs)
    cxx = shutil.which("c++") or shutil.which("g++")
    for flavour in ("cpu", "cuda") if cuda else ("cpu",):
        flags = extension._flags(flavour)
        cflags = [f for f in flags["cflags"] if not f.startswith("-march")]
        objs = [out / f"grad_align_cpp_{flavour}.o"]
        _run(
            [cxx, "-std=c++17", "-fPIC", *cflags, *includes, "-c", str(src / "grad_align.cpp"), "-o", str(objs[0])],
            f"{flavour}: c++ grad_align.cpp",
        )
        link = []
        if flavour == "cuda":
            nvcc = shutil.which("nvcc") or str(Path(extension.cuda_home() or "/usr/local/cuda") / "bin" / "nvcc")
            objs.append(out / "grad_align_cu.o")
            _run(
                [
                    nvcc,
                    "-std=c++17",
                    *flags["cuda_cflags"],
                    "-Xcompiler",
                    "-fPIC",
                    "-gencode",
                    f"arch=compute_{arch},code=sm_{arch}",
                    *includes,
                    "-c",
                    str(src / "grad_align_cuda.cu"),
                    "-o",
                    str(objs[1]),
                ],
                "cuda: nvcc grad_align_cuda.cu",
            )
            cuda_home = Path(extension.cuda_home() or Path(nvcc).resolve().parents[1])
            link = ["-L", str(cuda_home / "lib64"), "-lcudart"]
        lib = out / f"grad_align_{flavour}.so"
        # No -ltorch: the stable-ABI library resolves torch's C shims when torch has loaded it, as the JIT build's does.
        _run([cxx, "-shared", "-o", str(lib), *map(str, objs), *link], f"{flavour}: link")
        wanted = sorted(s for s in _needed(lib) if _TORCH_SYMBOL.match(s))
        result[flavour] = (lib, [s for s in wanted if s not in exported], len(wanted))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch", type=Path, required=True, help="a torch wheel (.whl) or an installed torch package dir")
    ap.add_argument("--cuda", action="store_true", help="also the CUDA library (nvcc, sm_90)")
    ap.add_argument("--arch", default="90", help="CUDA compute capability for --cuda (default 90)")
    ap.add_argument("--out", type=Path, default=None, help="keep the build here (default: a temporary directory)")
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="build_against_torch."))
    out.mkdir(parents=True, exist_ok=True)
    try:
        res = build(args.torch, args.cuda, out, args.arch)
    except RuntimeError as exc:
        print(f"build against {args.torch}: FAILED\n{exc}")
        return 1
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    bad = 0
    for flavour in ("cpu", "cuda"):
        if flavour in res:
            lib, missing, wanted = res[flavour]
            bad += bool(missing)
            print(
                f"torch {res['version']} {flavour}: built {lib.name}, needs {wanted} torch symbols: "
                + (
                    f"{len(missing)} missing: {', '.join(missing[:10])}"
                    if missing
                    else "every one is exported by that torch"
                )
            )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
