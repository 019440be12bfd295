"""Build the gradient-alignment kernels ahead of time: `python -m muscle_kernels.build [--cpu-only|--cuda] [-v]`.

For images that install from source (a binary wheel needs none of this): run it once at image build time, with
TORCH_EXTENSIONS_DIR pointing inside the image (it may be read-only later) and MUSCLE_KERNELS_CPU_ARCH set to a
portable value if the image runs on other CPUs than the one that builds it; later processes load the cached
libraries instantly. Prints what was loaded or built and where; exits with status 1 if the build failed (the
library itself would fall back to torch._foreach with a warning instead).
"""

from __future__ import annotations

import argparse
import os
import sys

from ._env import DEFAULT_CUDA_ARCHS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m muscle_kernels.build", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cpu-only", action="store_true", help="build only the CPU kernels")
    group.add_argument(
        "--cuda",
        action="store_true",
        help="build the CUDA kernels too (needs a CUDA torch and nvcc; without a visible GPU set "
        f"TORCH_CUDA_ARCH_LIST, default here {DEFAULT_CUDA_ARCHS!r})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands and output")
    args = parser.parse_args(argv)

    if args.cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    import torch

    from .ops.grad_align import extension

    cuda = True if args.cuda else (False if args.cpu_only else None)
    if cuda and not (torch.version.cuda and extension.cuda_home()):
        print(
            f"cannot build the CUDA kernels: torch {torch.__version__} is "
            f"{'a CUDA build' if torch.version.cuda else 'CPU-only'}, CUDA_HOME={extension.cuda_home()}",
            file=sys.stderr,
        )
        return 1
    print(f"sources: {extension.source_dir()}")
    print(f"cache:   {extension.cache_dir()}")
    info = extension.load_extension(cuda=cuda, verbose=args.verbose)
    if info is None:
        print(f"build FAILED: {extension.extension_info('none')['reason']}", file=sys.stderr)
        return 1
    for flavour, path in info.libraries.items():
        how = "built now" if flavour in info.built else f"from the {info.origins[flavour]}"
        print(f"library: {flavour}: {path} ({how})")
    print(f"ready in {info.seconds:.1f} s")
    print(f"ops:     {', '.join('muscle_kernels::' + op for op in extension.OPS)}")
    print(f"kernels: {', '.join(info.kernels)}")
    if cuda and "cuda" not in info.kernels:
        print(f"CUDA kernels FAILED: {info.cuda_reason}", file=sys.stderr)
        return 1
    if "cuda" in info.kernels:
        print(f"archs:   {extension.cuda_arch_list()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
