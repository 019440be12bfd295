"""Environment switches shared by the ops (one parser, one error message)."""
from __future__ import annotations

import os
from typing import Optional, Sequence


def forced_choice(var: str, choices: Sequence[str]) -> Optional[str]:
    """The value of environment variable `var` when it names one of `choices` other than "auto", else None.

    An unknown value is an error naming the variable: a typo must not silently fall back to the default.
    """
    forced = os.environ.get(var, "").strip()
    if not forced or forced == "auto":
        return None
    if forced not in choices:
        raise ValueError(f"{var}: expected one of {tuple(choices)}, got {forced!r}")
    return forced
