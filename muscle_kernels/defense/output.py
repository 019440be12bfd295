"""Writing a run's files safely: atomic replacement (temp file + os.replace) and strict JSON values."""

from __future__ import annotations

import math
import os

from .._atomic import replace_atomically

__all__ = [
    "json_safe",
    "replace_atomically",
    "OutputError",
    "lock_folder",
    "read_manifest",
    "write_manifest",
    "MANIFEST",
    "LOCK",
]


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


# -- the output folder: one run at a time, and a record of what our runs wrote ---------------------------------------
# --overwrite must remove only what a run of ours wrote: a user's `lora/` folder beside our results is not ours even
# though it has a method's name. Every run records the names it is about to write (before writing them, so that a
# killed run's partial files are covered) in MANIFEST; --overwrite removes those and nothing else. LOCK is held
# (flock) for the whole run, so that two runs on one folder cannot interleave their results.json.
MANIFEST = ".muscle-lora-manifest.json"
LOCK = ".muscle-lora.lock"
BOOKKEEPING = (MANIFEST, LOCK)


class OutputError(ValueError):
    """The output folder cannot be used as asked; the message is one line naming the folder."""


def lock_folder(path: str, option: str = "--output") -> int:
    """Take the folder's lock without waiting; returns the descriptor (closing it releases the lock)."""
    import fcntl

    lock = os.path.join(path, LOCK)
    try:  # O_NOFOLLOW: a planted link at the lock's name is refused, never followed; no O_TRUNC (another run's pid)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OutputError(f"{option}: cannot create the lock file {lock} ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
        except OSError:
            holder = ""
        os.close(fd)
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise OutputError(
            f"{option}: {path} is in use by another muscle-lora run{who}; wait for it to finish or "
            "choose another directory"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    return fd


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


def read_manifest(path: str, option: str = "--output") -> set:
    """The names earlier runs of ours wrote into the folder `path` (empty when there is no manifest)."""
    import json

    full = os.path.join(path, MANIFEST)
    if not os.path.lexists(full):
        return set()
    bad = OutputError(
        f"{option}: {full} is not a muscle-lora manifest; nothing in {path} is removed -- delete that "
        "file, or choose another directory"
    )
    if os.path.islink(full) or not os.path.isfile(full) or os.path.getsize(full) > 1 << 20:
        raise bad
    try:
        with open(full, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError):
        raise bad from None
    names = data.get("written") if isinstance(data, dict) else None
    if not isinstance(names, list) or not all(_plain_name(n) for n in names):
        raise bad
    return set(names)


def write_manifest(path: str, names) -> None:
    import json

    text = json.dumps({"written": sorted(names)}, indent=1) + "\n"
    replace_atomically(os.path.join(path, MANIFEST), lambda f: f.write(text.encode("utf-8")))


def is_stray_temp(name: str, ours) -> bool:
    """A temporary file replace_atomically left beside one of `ours` when a run was killed mid-write."""
    return name.endswith(".tmp") and any(name.startswith(f".{n}.") for n in ours)
