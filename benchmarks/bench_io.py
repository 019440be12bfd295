"""Shared by the benchmark scripts: append result rows to a CSV, writing the header only for a new file."""

from __future__ import annotations

import csv
from pathlib import Path


def append_rows(rows: list[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"\nappended {len(rows)} rows to {path}")
    return path
