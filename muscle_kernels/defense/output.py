"""Writing a run's files safely: atomic replacement (temp file + os.replace) and strict JSON values."""
from __future__ import annotations

import math
import os
import tempfile
from typing import Callable

__all__ = ["json_safe", "replace_atomically"]


def json_safe(value):
    """NaN and infinities -> None (JSON has no NaN; strict readers reject it), paths -> str, recursively."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def replace_atomically(path: str, write: Callable) -> None:
    """Write `path` by `write(binary file)` into a fresh temporary file beside it, then os.replace it into place.

    The temporary file is created exclusively (O_EXCL: never through a planted link); os.replace swaps the directory
    entry, so a symlink at `path` is replaced, not followed. A crash leaves the old file (or none) and a stray
    .<name>.*.tmp, never a truncated `path`."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
