"""Writing a file so that a reader never sees half of it and a planted symlink at its name is replaced, not
followed. Every layer writes files (adapters, plots, results), so this module imports nothing from the package."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

__all__ = ["replace_atomically"]


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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a file we write gets the mode open() would give it
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    # the only way to read the umask is to set it; set it straight back
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
