"""Optional pieces imported on first use (Triton costs seconds to import, and most users of the CPU paths never need
it). The state is a plain dict per importing module -- {"module", "tried", "error"} -- so that tests can patch it."""

from __future__ import annotations

import importlib
import os


def lazy_import(state: dict, name: str, package: str):
    """The module `name` (relative to `package`), imported once; None when that failed, with the one reason kept in
    state["error"] (ImportError, or a Triton too old for the kernels)."""
    if not state["tried"]:
        state["tried"] = True
        try:
            state["module"] = importlib.import_module(name, package)
        except Exception as exc:
            state["error"] = f"{type(exc).__name__}: {exc}"
    return state["module"]


def triton_interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
