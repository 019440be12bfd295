"""docs/defense.png: CACC and ASR per (dataset, attack) for lora, refonly, clean and muscle-screen, from the runs of
bench_defense.py (one tag, one training size), mean over seeds with the std as error bars.

    python benchmarks/plot_defense.py --out /tmp/bd/main --tag ref200 --train-size 2000 --png docs/defense.png
"""

import argparse
import collections
import glob
import json
import statistics as st

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--out", required=True, help="bench_defense.py's --out folder")
p.add_argument("--tag", default="ref200")
p.add_argument("--train-size", default="2000")
p.add_argument("--png", default="docs/defense.png")
args = p.parse_args()
runs = [json.load(open(f)) for f in glob.glob(f"{args.out}/runs/{args.tag}/*/*-n{args.train_size}-s*.json")]
by = collections.defaultdict(list)
for r in runs:
    by[(r["attack"], r["method"])].append(r)
order = [
    "hsol-badnets",
    "hsol-addsent",
    "hsol-stylebkd",
    "hsol-synbkd",
    "agnews-badnets",
    "agnews-addsent",
    "agnews-stylebkd",
    "agnews-synbkd",
]
methods = [("lora", "#d65f5f"), ("refonly", "#956cb4"), ("clean", "#8c8c8c"), ("muscle-screen", "#4878d0")]
fig, axes = plt.subplots(2, 1, figsize=(12, 6.5), sharex=True)
w = 0.2
for ax, key, name in ((axes[0], "cacc", "clean accuracy (CACC) %"), (axes[1], "asr", "attack success rate (ASR) %")):
    for k, (m, c) in enumerate(methods):
        xs, ys, es = [], [], []
        for i, a in enumerate(order):
            rs = by.get((a, m), [])
            if not rs:
                continue
            v = [100 * r[key] for r in rs]
            xs.append(i + (k - 1.5) * w)
            ys.append(st.fmean(v))
            es.append(st.stdev(v) if len(v) > 1 else 0)
        ax.bar(xs, ys, w, yerr=es, color=c, label=m, capsize=2)
    ax.set_ylabel(name)
    ax.grid(axis="y", alpha=0.3)
axes[0].set_ylim(80, 100)
axes[1].set_ylim(0, 100)
axes[0].legend(ncol=4, loc="upper center", bbox_to_anchor=(0.5, 1.18), frameon=False)
axes[1].set_xticks(range(len(order)))
axes[1].set_xticklabels(order, rotation=20)
fig.suptitle(
    f"{args.tag}, {args.train_size} training rows (mean over seeds; error bars: std where 2 seeds)",
    y=0.995,
    fontsize=10,
)
fig.tight_layout()
fig.savefig(args.png, dpi=110)
