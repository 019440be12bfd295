"""The PEP 517 build backend of muscle_kernels: setuptools, plus torch as a build requirement of the wheel.

A binary wheel compiles the kernels against torch's headers (setup.py), so an isolated `pip wheel .` or
`python -m build` has to install torch into its build environment; an editable install and the sdist compile
nothing and do not need it. The kernels use the LibTorch stable ABI, so the wheel built against any torch >= 2.11
loads into every torch >= 2.11. MUSCLE_KERNELS_BINARY=0 asks for a pure wheel, without torch at build time.
Building against the torch already installed: `pip wheel . --no-build-isolation` (see docs/install.md).
"""

import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the backend's hooks, re-exported)

TORCH_REQUIREMENT = "torch>=2.11"


def get_requires_for_build_wheel(config_settings=None):
    requires = _setuptools.get_requires_for_build_wheel(config_settings)
    if os.environ.get("MUSCLE_KERNELS_BINARY", "").strip().lower() in ("0", "false", "no", "off"):
        return requires
    return [*requires, TORCH_REQUIREMENT]
