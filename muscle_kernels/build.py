"""Build the gradient-alignment extension ahead of time: `python -m muscle_kernels.build [--cpu-only|--cuda] [-v]`.

For production images: run it once at image build time (with TORCH_EXTENSIONS_DIR pointing inside the image, and
MUSCLE_KERNELS_CPU_ARCH set to a portable value if the image runs on other CPUs than the one that builds it); later
processes load the cached library instantly. Prints what was built and where; exits with status 1 if the build
failed (the library itself would fall back to torch._foreach with a warning instead).
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m muscle_kernels.build", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cpu-only", action="store_true", help="build only the CPU kernels")
    group.add_argument("--cuda", action="store_true",
                       help="build the CUDA kernels too (needs a CUDA torch and nvcc; without a visible GPU set "
                            "TORCH_CUDA_ARCH_LIST, default here '8.0;9.0')")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands and output")
    args = parser.parse_args(argv)

    if args.cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    import torch

    from .ops.grad_align import extension

    cuda = True if args.cuda else (False if args.cpu_only else None)
    if cuda and not (torch.version.cuda and extension._cuda_home()):
        print(f"cannot build the CUDA kernels: torch {torch.__version__} is "
              f"{'a CUDA build' if torch.version.cuda else 'CPU-only'}, CUDA_HOME={extension._cuda_home()}",
              file=sys.stderr)
        return 1
    src = extension.source_dir()
    print(f"sources: {src}")
    print(f"cache:   {os.environ.get('TORCH_EXTENSIONS_DIR') or '(torch default: ~/.cache/torch_extensions)'}")
    info = extension.load_extension(cuda=cuda, verbose=args.verbose)
    if info is None:
        print(f"build FAILED: {extension.extension_info().error}", file=sys.stderr)
        return 1
    kernels = [key for key in ("cpu", "cuda") if extension.has_kernel("grad_align_fused", key)]
    print(f"ready:   {info.name} in {info.seconds:.1f} s (built, or loaded from the cache)")
    print(f"library: {info.path}")
    print(f"ops:     {', '.join('muscle_kernels::' + op for op in extension.OPS)}")
    print(f"kernels: {', '.join(kernels)}")
    if "cuda" in kernels:
        print(f"archs:   {os.environ.get('TORCH_CUDA_ARCH_LIST') or extension._arch_list()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
