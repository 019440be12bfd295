"""The picture of a FrequencyRecorder file: how the frequency content of the outputs moves during training.

Top row, per probe subset: the ratio ||K f|| / ||f - K f|| of the model's output probabilities against the step, one
line per method (log scale; the labels' own ratio dotted where the labels vary, the target the outputs move toward).
On the poisoned subset the ratio climbs when the outputs collapse onto the target label: the backdoor, a
zero-frequency function there, is being learned. Bottom row: the paper's relative errors against the labels in the
low band (solid) and the high band (dashed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

__all__ = ["plot_frequency"]

_SUBSET_ORDER = ("clean", "poisoned", "all")


def plot_frequency(
    rows: list[dict], path: str, *, sigma_rel: float | None = None, subsets: Sequence[str] | None = None
) -> str:
    """Write the PNG (matplotlib, Agg backend) for one filter width; returns `path`.

    rows: FrequencyRecorder rows (or analysis.read_rows(csv)). sigma_rel: the width to show (default: the middle one
    recorded); subsets: which columns (default: clean and poisoned when recorded, else all of them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("rows: nothing to plot (an empty recorder file?)")
    widths = sorted({r["sigma_rel"] if not math.isnan(r["sigma_rel"]) else r["sigma"] for r in rows})
    key = "sigma" if all(math.isnan(r["sigma_rel"]) for r in rows) else "sigma_rel"
    if sigma_rel is None:
        sigma_rel = widths[len(widths) // 2]
    chosen = [r for r in rows if math.isclose(r[key], sigma_rel, rel_tol=1e-9)]
    if not chosen:
        raise ValueError(f"sigma_rel: {sigma_rel} was not recorded (recorded: {widths})")
    present = sorted(
        {r["subset"] for r in chosen},
        key=lambda s: (_SUBSET_ORDER.index(s) if s in _SUBSET_ORDER else len(_SUBSET_ORDER), s),
    )
    if subsets is None:
        subsets = [s for s in present if s != "all"] or present
    else:
        missing = [s for s in subsets if s not in present]
        if missing:
            raise ValueError(f"subsets: {missing} not recorded (recorded: {present})")
    methods = list(dict.fromkeys(r["method"] for r in chosen))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, len(subsets), figsize=(4.6 * len(subsets), 6.4), squeeze=False, sharex=True)
    for col, subset in enumerate(subsets):
        top, bottom = axes[0][col], axes[1][col]
        for m_i, method in enumerate(methods):
            color = colors[m_i % len(colors)]
            name = method or "model"

            def series(target, field, method=method, subset=subset):
                pts = sorted(
                    (r["step"], r[field])
                    for r in chosen
                    if r["method"] == method and r["subset"] == subset and r["target"] == target
                )
                return [p[0] for p in pts], [p[1] for p in pts]

            steps, ratio = series("output", "ratio")
            top.plot(steps, ratio, marker=".", color=color, label=name)
            lsteps, lratio = series("labels", "ratio")
            # constant labels (the poisoned subset: all the target) have no high part: their ratio is 1 / rounding
            _, lvar = series("labels", "low_centered")
            _, llow = series("labels", "low")
            varies = all(v > 1e-4 * lo for v, lo in zip(lvar, llow))
            if m_i == 0 and lsteps and varies and all(math.isfinite(v) for v in lratio):
                top.plot(lsteps, lratio, ":", color="grey", label="labels")
            for field, style, band in (("err_low", "-", "low"), ("err_high", "--", "high")):
                s, v = series("output", field)
                if any(math.isfinite(e) for e in v):
                    bottom.plot(s, v, style, marker=".", color=color, label=f"{name} {band}")
        top.set_yscale("log")
        top.set_title(f"{subset}: low / high of the outputs")
        bottom.set_title(f"{subset}: relative error vs labels")
        bottom.set_xlabel("step")
        bottom.set_ylim(bottom=0)
        top.legend(fontsize=7)
        if bottom.lines:
            bottom.legend(fontsize=7)
    axes[0][0].set_ylabel("||K f|| / ||f - K f||")
    axes[1][0].set_ylabel("error (solid low, dashed high)")
    width = f"sigma = {sigma_rel:g} x median distance" if key == "sigma_rel" else f"sigma = {sigma_rel:g}"
    fig.suptitle(f"Frequency analysis of the outputs ({width})", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    from .._atomic import replace_atomically

    try:  # atomically: a planted symlink at `path` is replaced, its target left alone; never half a PNG
        replace_atomically(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path
