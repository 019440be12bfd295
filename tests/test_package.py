"""The package's public surface: every advertised name resolves, and importing the package stays light."""
import subprocess
import sys

import muscle_kernels


def test_every_public_name_resolves():
    for name in muscle_kernels.__all__:
        assert getattr(muscle_kernels, name) is not None, name
    assert set(muscle_kernels._LAZY) <= set(dir(muscle_kernels))


def test_import_is_light_and_builds_nothing():
    code = ("import sys, muscle_kernels; "
            "heavy = [m for m in ('transformers', 'peft', 'muscle_kernels.ops.grad_align.extension') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"import muscle_kernels pulled in {out}"
