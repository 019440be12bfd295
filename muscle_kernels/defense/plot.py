"""The picture of a run: CACC and ASR per method, and the dev ASR per epoch (when the backdoor is learned)."""

from __future__ import annotations

import math
import os

__all__ = ["plot_results"]


def _number(v) -> bool:
    # dev_asr is NaN in memory and null in a results.json read back (no poisoned dev set)
    return isinstance(v, (int, float)) and not math.isnan(v)


def plot_results(results: list[dict], path: str) -> str:
    """Write a PNG with two panels (matplotlib, Agg backend: no display needed); returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [r["method"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = range(len(methods))
    width = 0.38
    # a diverged run has no CACC / ASR: no bar, and "diverged" written where the bars would be
    cacc = [0.0 if r.get("diverged") else 100 * r["cacc"] for r in results]
    asr = [0.0 if r.get("diverged") else 100 * r["asr"] for r in results]
    b1 = ax1.bar([x - width / 2 for x in xs], cacc, width, label="CACC (clean accuracy)", color="#4878d0")
    b2 = ax1.bar([x + width / 2 for x in xs], asr, width, label="ASR (attack success)", color="#d65f5f")
    for bars in (b1, b2):
        for bar, r in zip(bars, results):
            if not r.get("diverged"):
                ax1.annotate(
                    f"{bar.get_height():.1f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    for x, r in zip(xs, results):
        if r.get("diverged"):
            ax1.annotate("diverged", (x, 2), ha="center", va="bottom", fontsize=8, rotation=90, color="grey")
    ax1.set_xticks(list(xs), methods)
    ax1.set_ylim(0, 110)
    ax1.set_ylabel("% on the test sets (best dev epoch)")
    ax1.legend(loc="lower left", fontsize=8)
    ax1.set_title("Clean accuracy vs backdoor")
    for r in results:
        hist = r.get("history", [])
        ys = [100 * h["dev_asr"] for h in hist if _number(h.get("dev_asr"))]
        if ys:
            ax2.plot(range(1, len(ys) + 1), ys, marker="o", label=r["method"])
    epochs = max((len(r.get("history", [])) for r in results), default=0)
    if epochs:
        ax2.set_xticks(range(1, epochs + 1))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("dev ASR %")
    ax2.set_ylim(-5, 105)
    ax2.set_title("Backdoor learned per epoch")
    if ax2.lines:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    from .output import replace_atomically

    try:  # atomically: an interrupted run never leaves half a PNG, and a planted symlink is replaced, not followed
        replace_atomically(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path
