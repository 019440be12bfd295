"""Module-name patterns, matched like PEFT's `target_modules`, with errors that name what was meant.

A list entry matches a name equal to it or ending with "." + entry; a single string is a regular expression that
must match the whole name. A pattern that matches nothing is an error listing the closest names in the model.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

__all__ = ["resolve"]


def _close_names(pattern: str, names: Sequence[str], n: int = 5) -> list[str]:
    # Compare against full names and their dotted suffixes, so "querry" finds "...attention.self.query".
    suffixes = {}
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            suffixes.setdefault(".".join(parts[i:]), name)
    close = difflib.get_close_matches(pattern, list(suffixes), n=n, cutoff=0.5)
    return sorted({c for c in close})


def resolve(names: Iterable[str], patterns: str | Sequence[str], field: str) -> list[str]:
    """The names that `patterns` match, in model order; every list entry (or the regex) must match at least one."""
    names = list(names)
    if isinstance(patterns, str):
        try:
            regex = re.compile(patterns)
        except re.error as e:
            raise ValueError(f"{field}: {patterns!r} is not a valid regular expression ({e})") from None
        found = [n for n in names if regex.fullmatch(n)]
        if not found:
            raise ValueError(
                f"{field}: the regular expression {patterns!r} matches no module name; "
                f"close names: {_close_names(patterns, names) or 'none'}"
            )
        return found
    found = []
    for p in patterns:
        hits = [n for n in names if n == p or n.endswith("." + p)]
        if not hits:
            raise ValueError(f"{field}: {p!r} matches no module name; close names: {_close_names(p, names) or 'none'}")
        found.extend(hits)
    seen = set(found)
    return [n for n in names if n in seen]
