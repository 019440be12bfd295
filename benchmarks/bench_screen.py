"""How well muscle-screen finds the poisoned rows: detection AUROC, precision at the true poison count and recall at
the screen's own threshold, per part of the screen and combined, against the poison flag column (ground truth for
measuring only: the screen never reads it).

    python benchmarks/bench_screen.py --data ../shared/data/hsol,../shared/data/agnews --parts tokens --seeds 0,1,2
    python benchmarks/bench_screen.py --data ../shared/data/hsol --parts tokens,label --seeds 0     # trains probes
    python benchmarks/bench_screen.py --data ../shared/data/hsol --features words,first --seeds 0,1,2  # an ablation

`--parts tokens` needs no model (seconds); `label` trains muscle-screen's reference-set LoRA for each run (minutes on
a CPU). The rows are drawn like bench_defense.py draws them (same seed, sizes and `--draw`: the same training,
reference and dev rows), so the numbers match that benchmark's muscle-screen runs. Writes screen.csv and screen.md
under --out.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_defense import DRAWS, _attack_dirs, _attack_name, detection, draw_splits  # noqa: E402

from muscle_kernels.defense.screen import FEATURES  # noqa: E402


def screen_one(attack_dir, seed, args, parts):
    from muscle_kernels.defense.paper_data import load_paper_folder
    from muscle_kernels.defense.screen import screen_rows, token_scores
    from muscle_kernels.defense.train import Settings, Splits, split_reference

    found = load_paper_folder(attack_dir)
    # bench_defense's draw (no test rows: the screen is scored on the training rows)
    train, dev, *_ = draw_splits(found, seed, args.train_size, args.dev_size, 0, 0, args.draw)
    flags = [s.poisoned for s in train]
    splits = Splits(
        train=[dataclasses.replace(s, poisoned=False) for s in train], dev=dev, test_clean=[], test_poison=[]
    )
    settings = Settings(seed=seed, ref_size=args.ref_size, device="cpu")
    splits = split_reference(splits, settings)
    raw_train, raw_calib = {}, {}
    if "tokens" in parts:
        raw_train["tokens"], raw_calib["tokens"] = token_scores(
            [s.text for s in splits.train],
            [s.text for s in splits.ref],
            [s.text for s in splits.dev],
            features=args.features.split(","),
            labels=None
            if args.no_label_pairs
            else tuple([s.label for s in part] for part in (splits.train, splits.ref, splits.dev)),
        )
    if "label" in parts:
        import torch

        from muscle_kernels.defense.data import infer_num_labels
        from muscle_kernels.defense.demo import minilm_path
        from muscle_kernels.defense.models import classifier_factory
        from muscle_kernels.defense.train import _fit, _prepare, _steps_per_epoch, label_surprise_scores

        factory, tokenizer = classifier_factory(minilm_path(), infer_num_labels({"train": found["train"]}))
        torch.manual_seed(seed)
        probe = _prepare(factory(), "lora", settings)
        ref_steps = _steps_per_epoch(len(splits.ref), settings)
        steps = settings.screen_epochs * ref_steps  # as train._screen
        _fit(
            probe,
            tokenizer,
            splits.ref,
            settings,
            torch.device("cpu"),
            method="screen",
            total_steps=steps,
            checkpoints=1,
            splits=splits,
            lr=settings.lr,
            progress=False,
            log=lambda s: None,
        )
        raw_train["label"] = label_surprise_scores(probe, tokenizer, splits.train, settings, "cpu")
        raw_calib["label"] = label_surprise_scores(probe, tokenizer, splits.dev, settings, "cpu")
    screen = screen_rows(raw_train, raw_calib, quantile=args.quantile)
    rows = []
    for name, scores in [*sorted(screen.parts.items()), ("combined", screen.scores)]:
        auroc, precision = detection(scores, flags)
        rows.append(dict(attack=_attack_name(attack_dir), seed=seed, part=name, auroc=auroc, precision_at_k=precision))
    flagged = screen.flagged
    rows[-1].update(
        recall=sum(f and p for f, p in zip(flagged, flags)) / max(1, sum(flags)),
        clean_flagged=sum(f and not p for f, p in zip(flagged, flags)) / max(1, len(flags) - sum(flags)),
    )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="paper-format folders (or folders of them), comma-separated")
    p.add_argument("--parts", default="tokens", help="tokens, label or tokens,label")
    p.add_argument("--seeds", default="0")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--dev-size", type=int, default=1000)
    p.add_argument("--ref-size", type=int, default=200)
    p.add_argument("--quantile", type=float, default=0.9)
    p.add_argument("--draw", choices=DRAWS, default="nested", help="bench_defense.py's --draw")
    p.add_argument(
        "--no-label-pairs",
        action="store_true",
        help="score the features alone, not also paired with the row's label (an ablation)",
    )
    p.add_argument(
        "--features",
        default=",".join(FEATURES),
        help=f"the token part's kinds of feature, some of {','.join(FEATURES)} (default: all, as muscle-screen)",
    )
    p.add_argument("--out", default="benchmarks/out/screen")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for data in args.data.split(","):
        for attack_dir in _attack_dirs(data):
            for seed in (int(s) for s in args.seeds.split(",")):
                got = screen_one(attack_dir, seed, args, parts)
                rows.extend(got)
                print(" | ".join(f"{r['attack']} s{seed} {r['part']}: AUROC {r['auroc']:.3f}" for r in got), flush=True)
    with (out / "screen.csv").open("w", newline="") as f:
        w = csv.DictWriter(
            f, fieldnames=["attack", "seed", "part", "auroc", "precision_at_k", "recall", "clean_flagged"]
        )
        w.writeheader()
        w.writerows(rows)
    names = [*sorted({r["part"] for r in rows} - {"combined"}), "combined"]
    lines = [
        "| attack | seeds | " + " | ".join(f"AUROC {n}" for n in names) + " | P@k combined | recall | "
        "clean rows flagged |",
        "|---|---:|" + "---:|" * (len(names) + 3),
    ]
    by_attack = {}
    for r in rows:
        by_attack.setdefault(r["attack"], []).append(r)
    means = {n: [] for n in names}
    for attack, rs in by_attack.items():
        cells = []
        for n in names:
            m = statistics.fmean(r["auroc"] for r in rs if r["part"] == n)
            means[n].append(m)
            cells.append(f"{m:.3f}")
        comb = [r for r in rs if r["part"] == "combined"]
        lines.append(
            f"| {attack} | {len(comb)} | "
            + " | ".join(cells)
            + f" | {statistics.fmean(r['precision_at_k'] for r in comb):.3f}"
            f" | {statistics.fmean(r['recall'] for r in comb):.3f}"
            f" | {100 * statistics.fmean(r['clean_flagged'] for r in comb):.1f}% |"
        )
    lines.append("| **mean** | | " + " | ".join(f"**{statistics.fmean(v):.3f}**" for v in means.values()) + " | | | |")
    (out / "screen.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
