"""Packaging glue: ship the top-level csrc/ sources inside the wheel as muscle_kernels/csrc.

The extension is JIT-built with ninja on first use (muscle_kernels.ops.grad_align.extension), so the wheel itself
stays pure Python; it only has to carry the sources. Everything else lives in pyproject.toml.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class build_py_with_csrc(build_py):
    def run(self):
        super().run()
        dst = Path(self.build_lib) / "muscle_kernels" / "csrc"
        dst.mkdir(parents=True, exist_ok=True)
        for src in sorted((ROOT / "csrc").glob("*")):
            if src.is_file():
                shutil.copy2(src, dst / src.name)


setup(cmdclass={"build_py": build_py_with_csrc})
